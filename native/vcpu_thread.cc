#include "vcpu_thread.h"

#include <cerrno>
#include <csignal>
#include <ctime>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "core.h"

namespace kh {

// SIGUSR1 belongs to Node's inspector and SIGUSR2 is free for users' handlers;
// a real-time signal above glibc's reserved ones stays out of everyone's way.
int kick_signal() { return SIGRTMIN + 6; }

static void on_kick(int) {}

int64_t kick_install() {
  static bool done = false;
  if (done) return 0;
  struct sigaction sa = {};
  sa.sa_handler = on_kick;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = 0;  // no SA_RESTART: KVM_RUN must return -EINTR
  if (::sigaction(kick_signal(), &sa, nullptr) < 0) return -errno;
  done = true;
  return 0;
}

struct VcpuThread {
  pthread_t th;
  pid_t tid;
  cpu_set_t all;  // the thread's affinity when it started
  int pinned;     // the CPU it is pinned to for a hand-off, or -1
  int32_t *ctl;
  uint8_t *console;
  size_t cap;
  void (*notify)(void *, int32_t);
  void *arg;
};

static inline int32_t load(int32_t *p) { return __atomic_load_n(p, __ATOMIC_SEQ_CST); }
static inline void store(int32_t *p, int32_t v) { __atomic_store_n(p, v, __ATOMIC_SEQ_CST); }
static uint64_t now_ns() {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void *thread_main(void *p) {
  auto *t = static_cast<VcpuThread *>(p);
  int32_t *c = t->ctl;
  sigset_t only_kick;
  sigfillset(&only_kick);
  sigdelset(&only_kick, kick_signal());
  pthread_sigmask(SIG_SETMASK, &only_kick, nullptr);
  store(&c[CTL_TID], (int32_t)gettid_());
  int32_t seen = load(&c[CTL_CMD]);
  store(&c[CTL_DONE], seen);
  for (;;) {
    while (load(&c[CTL_CMD]) == seen) ::syscall(SYS_futex, &c[CTL_CMD], FUTEX_WAIT_PRIVATE, seen, nullptr, nullptr, 0);
    seen = load(&c[CTL_CMD]);
    int32_t op = load(&c[CTL_OP]);
    if (op == OP_RUN) {
      void *run = reinterpret_cast<void *>(((uint64_t)(uint32_t)c[CTL_RUN_HI] << 32) | (uint32_t)c[CTL_RUN_LO]);
      uint32_t len = 0, exits = 0;
      uint64_t t0 = now_ns();
      int64_t r = run_loop(c[CTL_FD], run, (uint16_t)c[CTL_CONSOLE_PORT], (uint32_t)c[CTL_MAX_EXITS], t->console,
                           t->cap, &len, &exits);
      uint64_t ns = now_ns() - t0;
      c[CTL_RET] = (int32_t)r;
      c[CTL_EXITS] = (int32_t)exits;
      c[CTL_CONSOLE_LEN] = (int32_t)len;
      c[CTL_NS_LO] = (int32_t)(uint32_t)ns;
      c[CTL_NS_HI] = (int32_t)(uint32_t)(ns >> 32);
    } else if (op == OP_WRITE) {
      uint32_t len = (uint32_t)c[CTL_MAX_EXITS];
      c[CTL_RET] = (int32_t)write_fd(c[CTL_FD], t->console, len < t->cap ? len : t->cap);
    }
    store(&c[CTL_DONE], seen);
    // The owner may sleep on DONE (thread_wait).
    ::syscall(SYS_futex, &c[CTL_DONE], FUTEX_WAKE_PRIVATE, 1, nullptr, nullptr, 0);
    // An owner that stopped polling waits for the notification. It sets
    // WAITING before its last look at DONE, and this looks at WAITING after
    // setting DONE: one of the two sees the other.
    if (op == OP_RUN && load(&c[CTL_WAITING]) == 1) t->notify(t->arg, seen);
    if (op == OP_EXIT) break;
  }
  return nullptr;
}

VcpuThread *thread_start(int32_t *ctl, uint8_t *console, size_t cap, void (*notify)(void *, int32_t), void *arg,
                         int64_t *err) {
  auto *t = new VcpuThread{{}, 0, {}, -1, ctl, console, cap, notify, arg};
  store(&ctl[CTL_TID], 0);
  store(&ctl[CTL_DONE], -1);
  int e = pthread_create(&t->th, nullptr, thread_main, t);
  if (e) {
    delete t;
    *err = -e;
    return nullptr;
  }
  while (load(&ctl[CTL_DONE]) == -1) sched_yield();
  t->tid = (pid_t)load(&ctl[CTL_TID]);
  if (sched_getaffinity(t->tid, sizeof t->all, &t->all) < 0) CPU_ZERO(&t->all);
  return t;
}

void thread_post(VcpuThread *t, bool on_caller_cpu) {
  if (on_caller_cpu && CPU_COUNT(&t->all) > 1) {
    int cpu = sched_getcpu();
    if (cpu >= 0 && cpu != t->pinned && CPU_ISSET(cpu, &t->all)) {
      cpu_set_t one;
      CPU_ZERO(&one);
      CPU_SET(cpu, &one);
      if (sched_setaffinity(t->tid, sizeof one, &one) == 0) t->pinned = cpu;
    }
  }
  ::syscall(SYS_futex, &t->ctl[CTL_CMD], FUTEX_WAKE_PRIVATE, 1, nullptr, nullptr, 0);
}

// Gives a thread that is still running its start-up affinity back. It is
// first sent off the caller's CPU (queued there behind the caller, it would
// wait for a load balance, milliseconds), so that a long run goes on beside
// the caller instead of taking turns with it.
static void unpin(VcpuThread *t) {
  if (t->pinned < 0) return;
  cpu_set_t others = t->all;
  CPU_CLR(t->pinned, &others);
  if (CPU_COUNT(&others) > 0) sched_setaffinity(t->tid, sizeof others, &others);
  if (sched_setaffinity(t->tid, sizeof t->all, &t->all) == 0) t->pinned = -1;
}

bool thread_wait(VcpuThread *t, int32_t seq, uint64_t wait_ns) {
  int32_t *done = &t->ctl[CTL_DONE];
  uint64_t until = now_ns() + wait_ns;
  for (;;) {
    int32_t v = load(done);
    if (v == seq) return true;
    uint64_t now = now_ns();
    if (now >= until) break;
    struct timespec ts = {(time_t)((until - now) / 1000000000u), (long)((until - now) % 1000000000u)};
    long r = ::syscall(SYS_futex, done, FUTEX_WAIT_PRIVATE, v, &ts, nullptr, 0);
    if (r < 0 && errno == EINTR) break;  // a signal: let the caller's event loop see it
  }
  if (load(done) == seq) return true;
  // A long run: let it move to another CPU while the caller goes on.
  unpin(t);
  return false;
}

int64_t thread_join(VcpuThread *t) {
  int e = pthread_join(t->th, nullptr);
  delete t;
  return -e;
}

int64_t kick(int64_t tid) {
  return ::syscall(SYS_tgkill, ::getpid(), (pid_t)tid, kick_signal()) < 0 ? -errno : 0;
}

}  // namespace kh

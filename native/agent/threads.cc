// kvmharness lab agent: vCPU threads and run time limits (threads.h).
#include "threads.h"

#include <cerrno>
#include <ctime>
#include <linux/kvm.h>
#include <map>
#include <memory>

#include "../core.h"
#include "../vcpu_thread.h"

namespace kh::agent {
namespace {

constexpr size_t CONSOLE_CAP = 65536;

struct Thread {
  VcpuThread *t = nullptr;
  int32_t ctl[CTL_WORDS] = {};
  uint8_t console[CONSOLE_CAP];
  int32_t seq = 0;
  // A run was started and not yet collected.
  bool busy = false;
  struct kvm_run *run = nullptr;
  uint64_t deadline = 0;  // 0: no time limit
  bool timed_out = false;
  // The agent set the run's immediate_exit (a kick); it clears it again.
  bool kicked = false;
};

std::map<int32_t, std::unique_ptr<Thread>> threads;

uint64_t now_ns() {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

int32_t load(const int32_t *p) { return __atomic_load_n(p, __ATOMIC_SEQ_CST); }

Thread *find(int32_t tid) {
  auto it = threads.find(tid);
  return it == threads.end() ? nullptr : it->second.get();
}

bool ended(const Thread &t) { return t.busy && load(&t.ctl[CTL_DONE]) == t.seq; }

void kick(Thread &t) {
  if (!t.busy || ended(t)) return;
  t.run->immediate_exit = 1;
  t.kicked = true;
  kh::kick(load(&t.ctl[CTL_TID]));
}

Ended collect(int32_t tid, Thread &t) {
  const int32_t *c = t.ctl;
  int64_t ret = c[CTL_RET];
  if (t.kicked) t.run->immediate_exit = 0;  // the agent's; one the host set stays
  t.busy = false;
  t.kicked = false;
  uint64_t ns = (uint64_t)(uint32_t)c[CTL_NS_LO] | ((uint64_t)(uint32_t)c[CTL_NS_HI] << 32);
  return {tid, ret, (uint32_t)c[CTL_EXITS], (uint32_t)c[CTL_CONSOLE_LEN], t.timed_out && ret == -EINTR ? 1u : 0u,
          ns, t.console};
}

void no_notify(void *, int32_t) {}

}  // namespace

int64_t thread_new() {
  auto t = std::make_unique<Thread>();
  int64_t err = 0;
  t->t = thread_start(t->ctl, t->console, CONSOLE_CAP, no_notify, nullptr, &err);
  if (!t->t) return err;
  int32_t tid = load(&t->ctl[CTL_TID]);
  threads[tid] = std::move(t);
  return tid;
}

int64_t thread_end(int32_t tid) {
  Thread *t = find(tid);
  if (!t) return -ESRCH;
  if (t->busy) {
    kick(*t);
    while (!ended(*t)) thread_wait(t->t, t->seq, 1000000);
    collect(tid, *t);
  }
  t->ctl[CTL_OP] = kh::OP_EXIT;
  __atomic_store_n(&t->ctl[CTL_CMD], ++t->seq, __ATOMIC_SEQ_CST);
  thread_post(t->t, false);
  int64_t r = thread_join(t->t);
  threads.erase(tid);
  return r;
}

int64_t run_start(int32_t tid, int fd, uint64_t run_addr, uint16_t port, uint32_t max_exits, uint32_t timeout_ms) {
  Thread *t = find(tid);
  if (!t) return -ESRCH;
  if (t->busy) return -EBUSY;
  int32_t *c = t->ctl;
  c[CTL_OP] = kh::OP_RUN;  // the thread's command, not the wire op
  c[CTL_FD] = fd;
  c[CTL_RUN_LO] = (int32_t)(uint32_t)run_addr;
  c[CTL_RUN_HI] = (int32_t)(uint32_t)(run_addr >> 32);
  c[CTL_CONSOLE_PORT] = port;
  c[CTL_MAX_EXITS] = (int32_t)(max_exits ? max_exits : 1);
  c[CTL_WAITING] = 0;
  t->run = reinterpret_cast<struct kvm_run *>((uintptr_t)run_addr);
  t->busy = true;
  t->kicked = false;
  t->timed_out = false;
  t->deadline = timeout_ms ? now_ns() + (uint64_t)timeout_ms * 1000000ull : 0;
  __atomic_store_n(&c[CTL_CMD], ++t->seq, __ATOMIC_SEQ_CST);
  thread_post(t->t, false);
  return 0;
}

void run_wait(const std::vector<int32_t> &tids, uint32_t wait_ms, std::vector<Ended> &out) {
  uint64_t until = wait_ms == WAIT_FOREVER ? UINT64_MAX : now_ns() + (uint64_t)wait_ms * 1000000ull;
  for (;;) {
    Thread *first = nullptr;
    size_t running = 0;
    for (int32_t tid : tids) {
      Thread *t = find(tid);
      if (!t || !t->busy) continue;
      if (ended(*t)) out.push_back(collect(tid, *t));
      else if (running++ == 0) first = t;
    }
    if (!out.empty() || !running) return;
    uint64_t now = now_ns(), next = until;
    for (int32_t tid : tids) {
      Thread *t = find(tid);
      if (!t || !t->busy || !t->deadline || t->timed_out) continue;
      if (now >= t->deadline) {
        t->timed_out = true;
        kick(*t);
      } else if (t->deadline < next) {
        next = t->deadline;
      }
    }
    if (now >= until) return;
    // One futex is waited on; with others running, look at them every millisecond.
    if (running > 1 && next > now + 1000000) next = now + 1000000;
    if (next > now + 1000000000ull) next = now + 1000000000ull;
    thread_wait(first->t, first->seq, next > now ? next - now : 0);
  }
}

int64_t run_kick(int32_t tid) {
  Thread *t = find(tid);
  if (!t) return -ESRCH;
  kick(*t);
  return 0;
}

}  // namespace kh::agent

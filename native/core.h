// kvmharness native core: raw system calls, nothing else.
//
// No N-API types here, so the same core links into a static agent binary.
// Every function returns a non-negative result or -errno; naming the call and
// turning the errno into an exception is the caller's business.
#pragma once
#include <cstddef>
#include <cstdint>

namespace kh {

int64_t open_dev(const char *path, int flags);
int64_t close_fd(int fd);
// ioctl with an integer argument (or none).
int64_t ioctl_int(int fd, unsigned long req, uint64_t arg);
// ioctl with a pointer to a caller-owned buffer.
int64_t ioctl_ptr(int fd, unsigned long req, void *arg);

// mmap returns the address or -errno (addresses below 2^63 on every Linux ABI).
int64_t map(size_t len, int prot, int flags, int fd, int64_t offset);
int64_t unmap(void *addr, size_t len);
// mmap with MAP_FIXED at addr (replacing whatever is mapped there); 0 or -errno.
int64_t map_fixed(void *addr, size_t len, int prot, int flags, int fd, int64_t offset);
int64_t advise(void *addr, size_t len, int advice);
int64_t protect(void *addr, size_t len, int prot);
int64_t memfd(const char *name, unsigned flags);
int64_t falloc(int fd, int mode, int64_t offset, int64_t len);
int64_t truncate_fd(int fd, int64_t len);
int64_t pread_fd(int fd, void *buf, size_t len, int64_t off);
int64_t write_fd(int fd, const void *buf, size_t len);

// KVM_RUN until an exit other than `out` to console_port (0 = none), or
// max_exits returns. Console bytes go to out (up to cap; *out_len counts
// them). Returns KVM_RUN's last result (0 or -errno); *exits counts returns.
// `run` is the vCPU's mapped kvm_run; any thread may call this.
int64_t run_loop(int fd, void *run, uint16_t console_port, uint32_t max_exits, uint8_t *out, size_t cap,
                 uint32_t *out_len, uint32_t *exits);

int64_t gettid_();

// A vCPU thread: a plain OS thread that sleeps on a futex in a control block
// of 32-bit words shared with its owner, runs run_loop when told, and calls
// `notify` when a run ends while the owner waits for it (ctl[CTL_WAITING]).
// The owner writes the command's fields, then ctl[CTL_CMD] (a sequence
// number), then calls thread_post; the thread stores the sequence number in
// ctl[CTL_DONE] when the command has finished. The kick signal is the only
// signal the thread accepts.
enum : int {
  CTL_CMD = 0, CTL_OP = 1, CTL_FD = 2, CTL_RUN_LO = 3, CTL_RUN_HI = 4, CTL_CONSOLE_PORT = 5,
  CTL_MAX_EXITS = 6, CTL_DONE = 8, CTL_RET = 9, CTL_EXITS = 10, CTL_CONSOLE_LEN = 11,
  CTL_NS_LO = 12, CTL_NS_HI = 13, CTL_TID = 14, CTL_WAITING = 15, CTL_WORDS = 16
};
// OP_WRITE: write(ctl[CTL_FD], console, ctl[CTL_MAX_EXITS] bytes) from the
// thread itself, result in ctl[CTL_RET] (a tracefs trace_marker write, which
// tracefs records under the thread id it sees).
enum : int { OP_RUN = 1, OP_EXIT = 2, OP_WRITE = 3 };
struct VcpuThread;
// Starts a thread; returns it, or nullptr with *err = -errno. ctl and console
// must outlive it. The thread's tid is in ctl[CTL_TID] when this returns.
VcpuThread *thread_start(int32_t *ctl, uint8_t *console, size_t cap, void (*notify)(void *, int32_t), void *arg,
                         int64_t *err);
// Wakes the thread after a new ctl[CTL_CMD]. With on_caller_cpu, the thread
// is first pinned to the CPU the caller runs on, so that the hand-off and the
// caller's wait (thread_wait) stay on one CPU instead of waking another.
void thread_post(VcpuThread *t, bool on_caller_cpu);
// Sleeps until the thread has finished command `seq`, for up to wait_ns or
// until a signal arrives; true when it finished. When it has not, the
// thread is unpinned (its start-up affinity again) and goes on alone.
bool thread_wait(VcpuThread *t, int32_t seq, uint64_t wait_ns);
// Waits for a thread that has been told OP_EXIT, and frees it.
int64_t thread_join(VcpuThread *t);
// Installs (once) the handler for the kick signal; KVM_RUN returns -EINTR when
// it arrives, and immediate_exit covers the window before entry.
int64_t kick_install();
int kick_signal();
int64_t kick(int64_t tid);

}  // namespace kh

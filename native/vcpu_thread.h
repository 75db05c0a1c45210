// kvmharness vCPU threads: the futex control block, CPU pinning for the
// hand-off, and the kick signal that interrupts a run.
//
// This is policy, kept native because it was measured (README, "vCPU
// threads"): waking a thread on an idle CPU cost ~100 µs on a VM host, so a
// run is handed over on the owner's CPU and the owner sleeps natively on the
// thread's `done` word; KVM_RUN on libuv's pool cost 45-52 µs per exit.
//
// The control block's word layout (CTL_*, OP_*) is mirrored by
// src/kvm/thread.ts (CTL, CTL_WORDS, OP); test/native-abi.test.ts compiles this
// header and compares the two.
#pragma once
#include <cstddef>
#include <cstdint>

namespace kh {

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

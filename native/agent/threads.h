// kvmharness lab agent: a thread per vCPU (the addon's vcpu_thread.h), so
// that runs go on while the agent serves the host's other requests, and the
// time limit of each run (docs/lab-protocol.md, "Runs and time limits").
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

#include "wire.h"

namespace kh::agent {

// A run that ended, as run_wait collects it.
struct Ended {
  int32_t tid;
  int64_t ret;
  uint32_t exits, console_len, timed_out;
  uint64_t ns;
  const uint8_t *console;  // the thread's buffer: valid until its next run
};

// Starts a vCPU thread; returns its kernel thread id, or -errno.
int64_t thread_new();
// Ends a thread (a run in progress is kicked first) and joins it; -ESRCH if unknown.
int64_t thread_end(int32_t tid);
// Starts a run on thread `tid`: kh::run_loop on fd with kvm_run at run_addr,
// which the caller has checked. timeout_ms > 0: the run is kicked once it has
// lasted that long. -ESRCH for an unknown thread, -EBUSY while it has a run
// that has not been collected.
int64_t run_start(int32_t tid, int fd, uint64_t run_addr, uint16_t port, uint32_t max_exits, uint32_t timeout_ms);
// Waits up to wait_ms (WAIT_FOREVER: until one ends) for a run of the listed
// threads to end, kicking runs past their time limit meanwhile; collects every
// listed run that has ended into `out`. Returns at once when none is running.
void run_wait(const std::vector<int32_t> &tids, uint32_t wait_ms, std::vector<Ended> &out);
// Forces thread tid's run out of KVM_RUN (immediate_exit and the kick
// signal); 0 also when no run is in progress, -ESRCH for an unknown thread.
int64_t run_kick(int32_t tid);

}  // namespace kh::agent

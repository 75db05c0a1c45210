// kvmharness native core: raw system calls, and the KVM_RUN loop.
//
// No N-API types here, so the same core links into a static agent binary.
// Every function returns a non-negative result or -errno; naming the call and
// turning the errno into an exception is the caller's business.
//
// run_loop holds the core's one piece of policy: `out` exits to the console
// port are consumed inside the loop instead of returning to the caller, so a
// guest that prints costs one hand-off between the vCPU thread and its owner
// per run rather than one per byte (the hand-off's measured costs are in the
// README, "vCPU threads"); every other exit returns. The thread that calls it
// locally is in vcpu_thread.h; the lab agent calls it on its only thread.
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

}  // namespace kh

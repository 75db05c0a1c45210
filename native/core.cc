#include "core.h"

#include <cerrno>
#include <cstring>
#include <fcntl.h>
#include <linux/kvm.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

namespace kh {

static inline int64_t ret(long r) { return r < 0 ? -errno : r; }

int64_t open_dev(const char *path, int flags) { return ret(::open(path, flags | O_CLOEXEC)); }
int64_t close_fd(int fd) { return ret(::close(fd)); }

int64_t ioctl_int(int fd, unsigned long req, uint64_t arg) {
  return ret(::ioctl(fd, req, (unsigned long)arg));
}

int64_t ioctl_ptr(int fd, unsigned long req, void *arg) { return ret(::ioctl(fd, req, arg)); }

int64_t map(size_t len, int prot, int flags, int fd, int64_t offset) {
  void *p = ::mmap(nullptr, len, prot, flags, fd, (off_t)offset);
  if (p == MAP_FAILED) return -errno;
  return (int64_t)(uintptr_t)p;
}
int64_t unmap(void *addr, size_t len) { return ret(::munmap(addr, len)); }
int64_t map_fixed(void *addr, size_t len, int prot, int flags, int fd, int64_t offset) {
  void *p = ::mmap(addr, len, prot, flags | MAP_FIXED, fd, (off_t)offset);
  if (p == MAP_FAILED) return -errno;
  return p == addr ? 0 : -EINVAL;
}
int64_t advise(void *addr, size_t len, int advice) { return ret(::madvise(addr, len, advice)); }
int64_t protect(void *addr, size_t len, int prot) { return ret(::mprotect(addr, len, prot)); }
int64_t memfd(const char *name, unsigned flags) { return ret(::syscall(SYS_memfd_create, name, flags)); }
int64_t falloc(int fd, int mode, int64_t offset, int64_t len) {
  return ret(::fallocate(fd, mode, (off_t)offset, (off_t)len));
}
int64_t truncate_fd(int fd, int64_t len) { return ret(::ftruncate(fd, (off_t)len)); }
int64_t pread_fd(int fd, void *buf, size_t len, int64_t off) { return ret(::pread(fd, buf, len, (off_t)off)); }
int64_t write_fd(int fd, const void *buf, size_t len) { return ret(::write(fd, buf, len)); }

int64_t run_loop(int fd, void *run, uint16_t console_port, uint32_t max_exits, uint8_t *out, size_t cap,
                 uint32_t *out_len, uint32_t *exits) {
  auto *r = static_cast<struct kvm_run *>(run);
  uint8_t *base = static_cast<uint8_t *>(run);
  uint32_t n = 0, len = 0;
  int64_t ret;
  for (;;) {
    ret = ioctl_int(fd, KVM_RUN, 0);
    if (ret < 0) break;
    n++;
    if (console_port && r->exit_reason == KVM_EXIT_IO && r->io.port == console_port && r->io.direction == KVM_EXIT_IO_OUT) {
      size_t bytes = (size_t)r->io.size * r->io.count;
      size_t take = bytes < cap - len ? bytes : cap - len;
      std::memcpy(out + len, base + r->io.data_offset, take);
      len += (uint32_t)take;
      if (n < max_exits) continue;
    }
    break;
  }
  *out_len = len;
  *exits = n;
  return ret;
}

int64_t gettid_() { return ::syscall(SYS_gettid); }

}  // namespace kh

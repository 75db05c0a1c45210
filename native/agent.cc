// kvmharness lab agent: performs KVM system calls on request.
//
// A small static program that runs inside the lab's guest (or, for tests, as a
// local child process) and answers framed requests on a byte channel: stdin /
// stdout by default, or a device (`--dev /dev/ttyS1`, `--virtio-port NAME`).
// Every operation maps onto one function of the native core (core.cc), plus
// memory operations that keep the host's mirrors of the agent's mappings
// coherent. The wire format and the coherence rules are in
// docs/lab-protocol.md; the host side is src/lab/protocol.ts and remote.ts.
//
// The same sources build for x86_64 and arm64 (nothing here is x86-only; on
// arm64 the run loop simply never sees an io exit):
// Build: g++ -O2 -static -o kvmharness-agent native/agent.cc native/core.cc
//        aarch64-linux-gnu-g++ -O2 -static -o kvmharness-agent-arm64 native/agent.cc native/core.cc
#include <cerrno>
#include <cstdarg>
#include <csetjmp>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <dirent.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <string>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/utsname.h>
#include <termios.h>
#include <unistd.h>
#include <vector>

#include "core.h"

namespace {

// ---- wire format (docs/lab-protocol.md) ------------------------------------

constexpr uint32_t REQ_MAGIC = 0x5152484b;  // "KHRQ"
constexpr uint32_t REP_MAGIC = 0x5052484b;  // "KHRP"
constexpr uint32_t END_MAGIC = 0x4e45484b;  // "KHEN"
constexpr uint32_t PROTOCOL_VERSION = 1;
constexpr size_t REQ_HEADER = 24;
constexpr size_t REP_HEADER = 40;
constexpr size_t ENTRY = 16;  // {u64 addr, u32 len, u32 flags}
constexpr size_t MAX_FRAME = (size_t)1 << 31;
constexpr size_t PAGE = 4096;
constexpr size_t CONSOLE_CAP = 65536;

enum Op : uint16_t {
  OP_NOP = 0,
  OP_HELLO = 1,
  OP_OPEN = 2,
  OP_CLOSE = 3,
  OP_IOCTL = 4,
  OP_IOCTL_BUF = 5,
  OP_MMAP = 6,
  OP_MUNMAP = 7,
  OP_MADVISE = 8,
  OP_MPROTECT = 9,
  OP_MEMFD = 10,
  OP_FALLOCATE = 11,
  OP_FTRUNCATE = 12,
  OP_PREAD = 13,
  OP_WRITE = 14,
  OP_PEEK = 15,
  OP_POKE = 16,
  OP_RUN = 17,
  OP_READ = 18,
  OP_MKDIR = 19,
  OP_RMDIR = 20,
  OP_EXIT = 21,
};

enum ReqFlag : uint16_t { REQ_PULL = 1 };
enum EntryFlag : uint32_t { ENTRY_ZERO = 1 };
enum Status : uint16_t { ST_OK = 0, ST_BAD_REQUEST = 1, ST_FAULT = 2 };

bool verbose = false;

void logf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void logf(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  std::fprintf(stderr, "kvmharness-agent: ");
  std::vfprintf(stderr, fmt, ap);
  std::fprintf(stderr, "\n");
  va_end(ap);
}

template <typename T>
T get(const uint8_t *p) {
  T v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

struct Out {
  std::vector<uint8_t> b;
  template <typename T>
  void put(T v) {
    size_t o = b.size();
    b.resize(o + sizeof v);
    std::memcpy(b.data() + o, &v, sizeof v);
  }
  void bytes(const void *p, size_t n) {
    size_t o = b.size();
    b.resize(o + n);
    if (n) std::memcpy(b.data() + o, p, n);
  }
};

// ---- guarded memory access -------------------------------------------------
// A copy from or to a mapping may fault (PROT_NONE, a truncated memfd, a
// hugetlb page that cannot be allocated); the fault turns into an error reply
// instead of killing the agent.

sigjmp_buf fault_jmp;
volatile sig_atomic_t fault_armed = 0;

void on_fault(int sig, siginfo_t *, void *) {
  if (fault_armed) {
    fault_armed = 0;
    siglongjmp(fault_jmp, 1);
  }
  std::signal(sig, SIG_DFL);
  std::raise(sig);
}

// Runs f; false if it faulted (f is abandoned at the faulting access).
template <typename F>
bool guarded(F &&f) {
  if (sigsetjmp(fault_jmp, 1)) return false;
  fault_armed = 1;
  f();
  fault_armed = 0;
  return true;
}

// ---- mappings ---------------------------------------------------------------

struct Mapping {
  uint8_t *addr;
  size_t len;
  bool tracked;
  // Residency from mincore() is meaningful (anonymous memory, tmpfs, hugetlbfs):
  // pages that are not resident read as zeroes and are never touched by a scan.
  bool mincore_ok;
  uint8_t *snap;                  // tracked: the content the host last saw
  std::vector<uint8_t> nonzero;   // tracked: per page, snapshot page is not all zero
  size_t pages() const { return (len + PAGE - 1) / PAGE; }
};

std::vector<Mapping> maps;

Mapping *find_map(uint64_t addr, uint64_t len) {
  for (auto &m : maps) {
    uint64_t a = (uint64_t)(uintptr_t)m.addr;
    if (addr >= a && len <= m.len && addr - a <= m.len - len) return &m;
  }
  return nullptr;
}

bool all_zero(const uint8_t *p, size_t n) {
  static const uint8_t zero[PAGE] = {};
  return std::memcmp(p, zero, n) == 0;
}

// Scans one tracked mapping for pages whose content differs from the snapshot,
// updates the snapshot and appends the changed ranges to `pulled`.
void scan(Mapping &m, Out &pulled, uint32_t &npulled) {
  size_t n = m.pages();
  std::vector<uint8_t> resident(n, 1);
  if (m.mincore_ok && ::mincore(m.addr, m.len, resident.data()) < 0) std::fill(resident.begin(), resident.end(), 1);
  // 0 = unchanged, 1 = changed (data), 2 = became zero.
  std::vector<uint8_t> change(n, 0);
  volatile size_t i = 0;
  while (i < n) {
    bool ok = guarded([&] {
      for (; i < n; i = i + 1) {
        size_t off = i * PAGE;
        size_t len = off + PAGE <= m.len ? PAGE : m.len - off;
        if (!(resident[i] & 1)) {
          if (m.nonzero[i]) {
            std::memset(m.snap + off, 0, len);
            change[i] = 2;
          }
          continue;
        }
        if (std::memcmp(m.addr + off, m.snap + off, len) != 0) {
          std::memcpy(m.snap + off, m.addr + off, len);
          change[i] = 1;
        }
      }
    });
    if (!ok) i = i + 1;  // unreadable page: leave it out
  }
  // A changed page whose new content is all zero travels as a zero entry.
  for (size_t k = 0; k < n; k++) {
    if (change[k] == 1) {
      size_t off = k * PAGE;
      size_t len = off + PAGE <= m.len ? PAGE : m.len - off;
      if (all_zero(m.snap + off, len)) change[k] = 2;
    }
    if (change[k]) m.nonzero[k] = change[k] == 1;
  }
  // Consecutive pages of the same kind travel as one entry.
  for (size_t p = 0; p < n;) {
    if (!change[p]) {
      p++;
      continue;
    }
    size_t q = p + 1;
    while (q < n && change[q] == change[p]) q++;
    size_t off = p * PAGE;
    size_t end = q * PAGE < m.len ? q * PAGE : m.len;
    pulled.put<uint64_t>((uint64_t)(uintptr_t)(m.addr + off));
    pulled.put<uint32_t>((uint32_t)(end - off));
    pulled.put<uint32_t>(change[p] == 2 ? (uint32_t)ENTRY_ZERO : 0u);
    if (change[p] == 1) pulled.bytes(m.snap + off, end - off);
    npulled++;
    p = q;
  }
}

// Applies one host write. Inside a tracked mapping, whole pages are merged
// with the snapshot: bytes the host changed win, bytes only the agent's side
// changed are kept (and reported by the next scan). Returns false on a fault.
bool apply_write(uint64_t addr, const uint8_t *data, uint32_t len, bool zero) {
  Mapping *m = find_map(addr, len);
  uint8_t *dst = reinterpret_cast<uint8_t *>((uintptr_t)addr);
  static const uint8_t zeros[PAGE] = {};
  return guarded([&] {
    if (m && m->tracked && (addr - (uint64_t)(uintptr_t)m->addr) % PAGE == 0) {
      size_t base = addr - (uint64_t)(uintptr_t)m->addr;
      for (size_t o = 0; o < len; o += PAGE) {
        size_t n = len - o < PAGE ? len - o : PAGE;
        const uint8_t *h = zero ? zeros : data + o;
        uint8_t *a = dst + o;
        uint8_t *s = m->snap + base + o;
        if (std::memcmp(a, s, n) == 0) {
          std::memcpy(a, h, n);
        } else {
          for (size_t k = 0; k < n; k++)
            if (h[k] != s[k]) a[k] = h[k];
        }
        std::memcpy(s, h, n);
        m->nonzero[(base + o) / PAGE] = !zero && !all_zero(h, n);
      }
    } else if (zero) {
      for (size_t o = 0; o < len; o += PAGE) std::memset(dst + o, 0, len - o < PAGE ? len - o : PAGE);
    } else {
      std::memcpy(dst, data, len);
    }
  });
}

bool guarded_read(uint8_t *dst, uint64_t addr, size_t len) {
  return guarded([&] { std::memcpy(dst, reinterpret_cast<const void *>((uintptr_t)addr), len); });
}

int64_t do_mmap(uint64_t len, int prot, int flags, int fd, int64_t off, bool track) {
  int64_t r = kh::map((size_t)len, prot, flags, fd, off);
  if (r < 0) return r;
  Mapping m{};
  m.addr = reinterpret_cast<uint8_t *>((uintptr_t)r);
  m.len = (size_t)len;
  m.tracked = track;
  if (fd < 0) {
    m.mincore_ok = true;
  } else {
    struct statfs sf;
    m.mincore_ok = (flags & MAP_SHARED) && ::fstatfs(fd, &sf) == 0 &&
                   (sf.f_type == 0x01021994 /* TMPFS_MAGIC */ || sf.f_type == (long)0x958458f6 /* HUGETLBFS_MAGIC */);
  }
  if (track) {
    void *s = ::mmap(nullptr, m.len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (s == MAP_FAILED) {
      int e = errno;
      kh::unmap(m.addr, m.len);
      return -e;
    }
    m.snap = static_cast<uint8_t *>(s);
    m.nonzero.assign(m.pages(), 0);
  }
  maps.push_back(std::move(m));
  return r;
}

int64_t do_munmap(uint64_t addr, uint64_t len) {
  for (size_t i = 0; i < maps.size(); i++) {
    if ((uint64_t)(uintptr_t)maps[i].addr == addr && maps[i].len == len) {
      if (maps[i].snap) ::munmap(maps[i].snap, maps[i].len);
      maps.erase(maps.begin() + (long)i);
      return kh::unmap(reinterpret_cast<void *>((uintptr_t)addr), (size_t)len);
    }
  }
  return -EINVAL;  // only whole mappings this agent made
}

// ---- runs with a time limit --------------------------------------------------

struct kvm_run *volatile run_page = nullptr;
volatile sig_atomic_t alarm_fired = 0;

void on_alarm(int) {
  alarm_fired = 1;
  struct kvm_run *r = run_page;
  if (r) r->immediate_exit = 1;
}

void set_timer(uint32_t ms) {
  struct itimerval it = {};
  it.it_value.tv_sec = ms / 1000;
  it.it_value.tv_usec = (ms % 1000) * 1000;
  ::setitimer(ITIMER_REAL, &it, nullptr);
}

uint64_t now_ns() {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

// ---- channel ----------------------------------------------------------------

int in_fd = 0, out_fd = 1;
std::vector<uint8_t> rbuf(1 << 20);
size_t rpos = 0, rend = 0;

// After a reply, poll for the next request this long before sleeping in
// read(): a sleeping process takes tens of µs to wake on a virtual CPU.
uint64_t spin_ns = 0;

void spin_for_input() {
  if (!spin_ns || rpos != rend) return;
  uint64_t until = now_ns() + spin_ns;
  do {
    int n = 0;
    if (::ioctl(in_fd, FIONREAD, &n) < 0 || n > 0) return;
  } while (now_ns() < until);
}

// Reads exactly n bytes; false at end of input.
bool read_exact(uint8_t *dst, size_t n) {
  spin_for_input();
  while (n) {
    if (rpos == rend) {
      if (n >= rbuf.size()) {
        ssize_t k = ::read(in_fd, dst, n);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) return false;
        dst += k;
        n -= (size_t)k;
        continue;
      }
      ssize_t k = ::read(in_fd, rbuf.data(), rbuf.size());
      if (k < 0 && errno == EINTR) continue;
      if (k <= 0) return false;
      rpos = 0;
      rend = (size_t)k;
    }
    size_t take = rend - rpos < n ? rend - rpos : n;
    std::memcpy(dst, rbuf.data() + rpos, take);
    rpos += take;
    dst += take;
    n -= take;
  }
  return true;
}

bool write_all(const uint8_t *p, size_t n) {
  while (n) {
    ssize_t k = ::write(out_fd, p, n);
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0) return false;
    p += k;
    n -= (size_t)k;
  }
  return true;
}

// ---- requests -----------------------------------------------------------------

struct Reply {
  uint16_t status = ST_OK;
  int64_t result = 0;
  Out payload;
  Out reads;
  uint32_t nreads = 0;
  Out pulled;
  uint32_t npulled = 0;
  void error(uint16_t st, const std::string &msg) {
    status = st;
    result = -EINVAL;
    payload.b.assign(msg.begin(), msg.end());
  }
};

bool send_reply(uint32_t seq, uint16_t op, Reply &r) {
  size_t total = REP_HEADER + r.payload.b.size() + r.reads.b.size() + r.pulled.b.size() + 4;
  Out h;
  h.b.reserve(REP_HEADER);
  h.put<uint32_t>(REP_MAGIC);
  h.put<uint32_t>(seq);
  h.put<uint32_t>((uint32_t)total);
  h.put<uint16_t>(op);
  h.put<uint16_t>(r.status);
  h.put<int64_t>(r.result);
  h.put<uint32_t>((uint32_t)r.payload.b.size());
  h.put<uint32_t>(r.nreads);
  h.put<uint32_t>(r.npulled);
  h.put<uint32_t>(0);
  uint32_t end = END_MAGIC;
  if (total <= 256 * 1024) {
    h.bytes(r.payload.b.data(), r.payload.b.size());
    h.bytes(r.reads.b.data(), r.reads.b.size());
    h.bytes(r.pulled.b.data(), r.pulled.b.size());
    h.put<uint32_t>(end);
    return write_all(h.b.data(), h.b.size());
  }
  return write_all(h.b.data(), h.b.size()) && write_all(r.payload.b.data(), r.payload.b.size()) &&
         write_all(r.reads.b.data(), r.reads.b.size()) && write_all(r.pulled.b.data(), r.pulled.b.size()) &&
         write_all(reinterpret_cast<uint8_t *>(&end), 4);
}

std::string json_escape(const char *s) {
  std::string o;
  for (; *s; s++) {
    if (*s == '"' || *s == '\\') o += '\\';
    if ((unsigned char)*s < 0x20) continue;
    o += *s;
  }
  return o;
}

// Args reader with bounds checks.
struct Args {
  const uint8_t *p;
  size_t n;
  size_t at = 0;
  bool ok = true;
  template <typename T>
  T take() {
    if (n - at < sizeof(T)) {
      ok = false;
      return T{};
    }
    T v = get<T>(p + at);
    at += sizeof(T);
    return v;
  }
  const uint8_t *rest(size_t *len) {
    *len = n - at;
    return p + at;
  }
};

bool exit_requested = false;

void dispatch(uint16_t op, Args &a, Reply &r) {
  switch (op) {
    case OP_NOP:
      r.result = 0;
      return;
    case OP_HELLO: {
      struct utsname u;
      ::uname(&u);
      char buf[1024];
      std::snprintf(buf, sizeof buf,
                    "{\"version\":%u,\"pid\":%d,\"tid\":%lld,\"pageSize\":%ld,\"timeoutSignal\":%d,"
                    "\"sysname\":\"%s\",\"release\":\"%s\",\"machine\":\"%s\"}",
                    PROTOCOL_VERSION, (int)::getpid(), (long long)kh::gettid_(), ::sysconf(_SC_PAGESIZE), SIGALRM,
                    json_escape(u.sysname).c_str(), json_escape(u.release).c_str(), json_escape(u.machine).c_str());
      r.payload.bytes(buf, std::strlen(buf));
      r.result = PROTOCOL_VERSION;
      return;
    }
    case OP_OPEN:
    case OP_MKDIR: {
      uint32_t v = a.take<uint32_t>();
      size_t n;
      const uint8_t *s = a.rest(&n);
      if (!a.ok) break;
      std::string path(reinterpret_cast<const char *>(s), n);
      if (op == OP_OPEN) r.result = kh::open_dev(path.c_str(), (int)v);
      else r.result = ::mkdir(path.c_str(), (mode_t)v) < 0 ? -errno : 0;
      return;
    }
    case OP_RMDIR: {
      size_t n;
      const uint8_t *s = a.rest(&n);
      std::string path(reinterpret_cast<const char *>(s), n);
      r.result = ::rmdir(path.c_str()) < 0 ? -errno : 0;
      return;
    }
    case OP_CLOSE: {
      int32_t fd = a.take<int32_t>();
      if (!a.ok) break;
      r.result = kh::close_fd(fd);
      return;
    }
    case OP_IOCTL: {
      int32_t fd = a.take<int32_t>();
      a.take<uint32_t>();
      uint64_t req = a.take<uint64_t>();
      uint64_t arg = a.take<uint64_t>();
      if (!a.ok) break;
      r.result = kh::ioctl_int(fd, (unsigned long)req, arg);
      return;
    }
    case OP_IOCTL_BUF: {
      int32_t fd = a.take<int32_t>();
      a.take<uint32_t>();
      uint64_t req = a.take<uint64_t>();
      size_t n;
      const uint8_t *s = a.rest(&n);
      if (!a.ok) break;
      std::vector<uint64_t> buf((n + 7) / 8 + 1);  // 8-byte aligned copy
      std::memcpy(buf.data(), s, n);
      r.result = kh::ioctl_ptr(fd, (unsigned long)req, buf.data());
      r.payload.bytes(buf.data(), n);
      return;
    }
    case OP_MMAP: {
      uint64_t len = a.take<uint64_t>();
      int32_t prot = a.take<int32_t>();
      int32_t flags = a.take<int32_t>();
      int32_t fd = a.take<int32_t>();
      uint32_t track = a.take<uint32_t>();
      int64_t off = a.take<int64_t>();
      if (!a.ok) break;
      r.result = do_mmap(len, prot, flags, fd, off, track != 0);
      if (r.result >= 0 && track) scan(maps.back(), r.pulled, r.npulled);
      return;
    }
    case OP_MUNMAP: {
      uint64_t addr = a.take<uint64_t>();
      uint64_t len = a.take<uint64_t>();
      if (!a.ok) break;
      r.result = do_munmap(addr, len);
      return;
    }
    case OP_MADVISE:
    case OP_MPROTECT: {
      uint64_t addr = a.take<uint64_t>();
      uint64_t len = a.take<uint64_t>();
      int32_t v = a.take<int32_t>();
      if (!a.ok) break;
      void *p = reinterpret_cast<void *>((uintptr_t)addr);
      r.result = op == OP_MADVISE ? kh::advise(p, (size_t)len, v) : kh::protect(p, (size_t)len, v);
      return;
    }
    case OP_MEMFD: {
      uint32_t flags = a.take<uint32_t>();
      size_t n;
      const uint8_t *s = a.rest(&n);
      if (!a.ok) break;
      std::string name(reinterpret_cast<const char *>(s), n);
      r.result = kh::memfd(name.c_str(), flags);
      return;
    }
    case OP_FALLOCATE: {
      int32_t fd = a.take<int32_t>();
      int32_t mode = a.take<int32_t>();
      int64_t off = a.take<int64_t>();
      int64_t len = a.take<int64_t>();
      if (!a.ok) break;
      r.result = kh::falloc(fd, mode, off, len);
      return;
    }
    case OP_FTRUNCATE: {
      int32_t fd = a.take<int32_t>();
      a.take<uint32_t>();
      int64_t len = a.take<int64_t>();
      if (!a.ok) break;
      r.result = kh::truncate_fd(fd, len);
      return;
    }
    case OP_PREAD:
    case OP_READ: {
      int32_t fd = a.take<int32_t>();
      a.take<uint32_t>();
      uint64_t len = a.take<uint64_t>();
      int64_t pos = a.take<int64_t>();
      if (!a.ok || len > MAX_FRAME / 2) break;
      std::vector<uint8_t> buf((size_t)len);
      if (op == OP_PREAD) {
        r.result = kh::pread_fd(fd, buf.data(), buf.size(), pos);
      } else {
        ssize_t k = ::read(fd, buf.data(), buf.size());
        r.result = k < 0 ? -errno : k;
      }
      if (r.result > 0) r.payload.bytes(buf.data(), (size_t)r.result);
      return;
    }
    case OP_WRITE: {
      int32_t fd = a.take<int32_t>();
      a.take<uint32_t>();
      size_t n;
      const uint8_t *s = a.rest(&n);
      if (!a.ok) break;
      r.result = kh::write_fd(fd, s, n);
      return;
    }
    case OP_PEEK: {
      uint64_t addr = a.take<uint64_t>();
      uint64_t len = a.take<uint64_t>();
      if (!a.ok || len > MAX_FRAME / 2) break;
      std::vector<uint8_t> buf((size_t)len);
      if (!guarded_read(buf.data(), addr, buf.size())) {
        r.result = -EFAULT;
        return;
      }
      r.payload.bytes(buf.data(), buf.size());
      r.result = 0;
      return;
    }
    case OP_POKE: {
      uint64_t addr = a.take<uint64_t>();
      size_t n;
      const uint8_t *s = a.rest(&n);
      if (!a.ok) break;
      // Raw: a poke inside a tracked mapping leaves the snapshot alone, so the
      // next scan reports the poked pages to the host.
      r.result = guarded([&] { std::memcpy(reinterpret_cast<void *>((uintptr_t)addr), s, n); }) ? 0 : -EFAULT;
      return;
    }
    case OP_RUN: {
      int32_t fd = a.take<int32_t>();
      uint32_t port = a.take<uint32_t>();
      uint64_t run_addr = a.take<uint64_t>();
      uint32_t max_exits = a.take<uint32_t>();
      uint32_t timeout_ms = a.take<uint32_t>();
      if (!a.ok) break;
      if (!find_map(run_addr, PAGE)) {
        r.result = -EFAULT;  // not a mapping of this agent: KVM_RUN would write through it
        return;
      }
      static uint8_t console[CONSOLE_CAP];
      uint32_t len = 0, exits = 0;
      auto *run = reinterpret_cast<struct kvm_run *>((uintptr_t)run_addr);
      alarm_fired = 0;
      run_page = run;
      if (timeout_ms) set_timer(timeout_ms);
      uint64_t t0 = now_ns();
      int64_t ret = kh::run_loop(fd, run, (uint16_t)port, max_exits ? max_exits : 1, console, sizeof console, &len, &exits);
      uint64_t ns = now_ns() - t0;
      if (timeout_ms) set_timer(0);
      run_page = nullptr;
      bool fired = alarm_fired != 0;
      // The agent set immediate_exit; it clears it (a host-set one stays).
      if (fired) run->immediate_exit = 0;
      r.result = ret;
      r.payload.put<uint32_t>(exits);
      r.payload.put<uint32_t>(len);
      r.payload.put<uint32_t>(fired && ret == -EINTR ? 1 : 0);
      r.payload.put<uint32_t>(0);
      r.payload.put<uint64_t>(ns);
      r.payload.bytes(console, len);
      return;
    }
    case OP_EXIT:
      exit_requested = true;
      r.result = 0;
      return;
    default:
      r.error(ST_BAD_REQUEST, "unknown op " + std::to_string(op));
      return;
  }
  r.error(ST_BAD_REQUEST, "op " + std::to_string(op) + ": arguments too short");
}

// Serves one request; false when the channel has ended.
bool serve_one(std::vector<uint8_t> &frame) {
  uint8_t hdr[REQ_HEADER];
  if (!read_exact(hdr, 4)) return false;
  if (get<uint32_t>(hdr) != REQ_MAGIC) {
    // Desynchronised: say so once, then skip bytes until a request magic.
    Reply e;
    e.error(ST_BAD_REQUEST, "desync: bad request magic");
    send_reply(0xffffffff, 0xffff, e);
    logf("desync: bad magic 0x%08x; resynchronising", get<uint32_t>(hdr));
    for (;;) {
      std::memmove(hdr, hdr + 1, 3);
      if (!read_exact(hdr + 3, 1)) return false;
      if (get<uint32_t>(hdr) == REQ_MAGIC) break;
    }
  }
  if (!read_exact(hdr + 4, REQ_HEADER - 4)) return false;
  uint32_t seq = get<uint32_t>(hdr + 4);
  uint32_t total = get<uint32_t>(hdr + 8);
  uint16_t op = get<uint16_t>(hdr + 12);
  uint16_t flags = get<uint16_t>(hdr + 14);
  uint32_t nwrites = get<uint32_t>(hdr + 16);
  uint32_t nreads = get<uint32_t>(hdr + 20);
  Reply r;
  if (total < REQ_HEADER + 4 || total > MAX_FRAME) {
    r.error(ST_BAD_REQUEST, "bad frame length " + std::to_string(total));
    send_reply(seq, op, r);
    return true;
  }
  frame.resize(total - REQ_HEADER);
  if (!read_exact(frame.data(), frame.size())) return false;
  if (get<uint32_t>(frame.data() + frame.size() - 4) != END_MAGIC) {
    r.error(ST_BAD_REQUEST, "desync: bad end marker in request " + std::to_string(seq));
    send_reply(seq, op, r);
    return true;
  }
  const uint8_t *p = frame.data();
  size_t n = frame.size() - 4;
  size_t at = 0;
  // Writes: applied before the operation.
  for (uint32_t i = 0; i < nwrites; i++) {
    if (n - at < ENTRY) {
      r.error(ST_BAD_REQUEST, "truncated write list");
      return send_reply(seq, op, r);
    }
    uint64_t addr = get<uint64_t>(p + at);
    uint32_t len = get<uint32_t>(p + at + 8);
    uint32_t wf = get<uint32_t>(p + at + 12);
    at += ENTRY;
    bool zero = wf & ENTRY_ZERO;
    if (!zero && n - at < len) {
      r.error(ST_BAD_REQUEST, "truncated write data");
      return send_reply(seq, op, r);
    }
    if (!apply_write(addr, p + at, len, zero)) {
      char msg[96];
      std::snprintf(msg, sizeof msg, "write of %u bytes at 0x%llx faulted", len, (unsigned long long)addr);
      r.error(ST_FAULT, msg);
      return send_reply(seq, op, r);
    }
    if (!zero) at += len;
  }
  // Reads: performed after the operation.
  std::vector<std::pair<uint64_t, uint32_t>> reads;
  for (uint32_t i = 0; i < nreads; i++) {
    if (n - at < ENTRY) {
      r.error(ST_BAD_REQUEST, "truncated read list");
      return send_reply(seq, op, r);
    }
    reads.emplace_back(get<uint64_t>(p + at), get<uint32_t>(p + at + 8));
    at += ENTRY;
  }
  Args a{p + at, n - at};
  if (verbose) logf("seq %u op %u writes %u reads %u", seq, op, nwrites, nreads);
  dispatch(op, a, r);
  if (r.status == ST_OK) {
    for (auto &[addr, len] : reads) {
      size_t o = r.reads.b.size();
      r.reads.b.resize(o + len);
      if (!guarded_read(r.reads.b.data() + o, addr, len)) {
        char msg[96];
        std::snprintf(msg, sizeof msg, "read of %u bytes at 0x%llx faulted", len, (unsigned long long)addr);
        r.reads.b.clear();
        r.error(ST_FAULT, msg);
        break;
      }
      r.nreads++;
    }
  }
  if (r.status == ST_OK && (flags & REQ_PULL)) {
    for (auto &m : maps)
      if (m.tracked) scan(m, r.pulled, r.npulled);
  }
  if (!send_reply(seq, op, r)) return false;
  return !exit_requested;
}

int open_virtio_port(const char *name) {
  DIR *d = ::opendir("/sys/class/virtio-ports");
  if (!d) return -1;
  int fd = -1;
  while (struct dirent *e = ::readdir(d)) {
    if (e->d_name[0] == '.') continue;
    std::string p = std::string("/sys/class/virtio-ports/") + e->d_name + "/name";
    char buf[256] = {};
    int f = ::open(p.c_str(), O_RDONLY | O_CLOEXEC);
    if (f < 0) continue;
    ssize_t k = ::read(f, buf, sizeof buf - 1);
    ::close(f);
    while (k > 0 && (buf[k - 1] == '\n' || buf[k - 1] == '\0')) buf[--k] = 0;
    if (k > 0 && std::strcmp(buf, name) == 0) {
      std::string dev = std::string("/dev/") + e->d_name;
      fd = ::open(dev.c_str(), O_RDWR | O_NOCTTY | O_CLOEXEC);
      break;
    }
  }
  ::closedir(d);
  return fd;
}

void prepare_channel(int fd) {
  int fl = ::fcntl(fd, F_GETFL);
  if (fl >= 0 && (fl & O_NONBLOCK)) ::fcntl(fd, F_SETFL, fl & ~O_NONBLOCK);
  if (::isatty(fd)) {
    struct termios t;
    if (::tcgetattr(fd, &t) == 0) {
      ::cfmakeraw(&t);
      t.c_cc[VMIN] = 1;
      t.c_cc[VTIME] = 0;
      ::tcsetattr(fd, TCSANOW, &t);
      // Whatever arrived in cooked mode may have been translated or echoed:
      // drop it; the host repeats its hello until it is answered.
      ::tcflush(fd, TCIFLUSH);
    }
  }
  struct stat st;
  if (::fstat(fd, &st) == 0 && S_ISFIFO(st.st_mode)) ::fcntl(fd, F_SETPIPE_SZ, 1 << 20);
}

void usage() {
  std::fprintf(stderr,
               "usage: kvmharness-agent [--dev PATH | --virtio-port NAME | --in PATH --out PATH] [--spin-us N] [-v]\n"
               "Serves kvmharness lab requests (docs/lab-protocol.md) on stdin/stdout or the given channel.\n");
}

}  // namespace

int main(int argc, char **argv) {
  const char *dev = nullptr, *vport = nullptr, *in_path = nullptr, *out_path = nullptr;
  for (int i = 1; i < argc; i++) {
    std::string a = argv[i];
    if (a == "--dev" && i + 1 < argc) dev = argv[++i];
    else if (a == "--virtio-port" && i + 1 < argc) vport = argv[++i];
    else if (a == "--in" && i + 1 < argc) in_path = argv[++i];
    else if (a == "--out" && i + 1 < argc) out_path = argv[++i];
    else if (a == "--spin-us" && i + 1 < argc) spin_ns = std::strtoull(argv[++i], nullptr, 10) * 1000;
    else if (a == "-v" || a == "--verbose") verbose = true;
    else if (a == "--version") {
      std::printf("kvmharness-agent protocol %u\n", PROTOCOL_VERSION);
      return 0;
    } else {
      usage();
      return 2;
    }
  }
  if (dev || vport) {
    int fd = dev ? ::open(dev, O_RDWR | O_NOCTTY | O_CLOEXEC) : open_virtio_port(vport);
    if (fd < 0) {
      logf("cannot open %s %s: %s", dev ? "device" : "virtio port", dev ? dev : vport, std::strerror(errno));
      return 1;
    }
    in_fd = out_fd = fd;
  } else {
    if (in_path) in_fd = ::open(in_path, O_RDONLY | O_CLOEXEC);
    if (out_path) out_fd = ::open(out_path, O_WRONLY | O_CLOEXEC);
    if (in_fd < 0 || out_fd < 0) {
      logf("cannot open the channel: %s", std::strerror(errno));
      return 1;
    }
  }
  prepare_channel(in_fd);
  if (out_fd != in_fd) prepare_channel(out_fd);
  std::signal(SIGPIPE, SIG_IGN);

  struct sigaction sa = {};
  sa.sa_sigaction = on_fault;
  sa.sa_flags = SA_SIGINFO | SA_NODEFER;
  sigemptyset(&sa.sa_mask);
  ::sigaction(SIGSEGV, &sa, nullptr);
  ::sigaction(SIGBUS, &sa, nullptr);
  struct sigaction al = {};
  al.sa_handler = on_alarm;
  al.sa_flags = 0;  // no SA_RESTART: KVM_RUN must return -EINTR
  sigemptyset(&al.sa_mask);
  ::sigaction(SIGALRM, &al, nullptr);

  std::vector<uint8_t> frame;
  while (serve_one(frame)) {
  }
  return 0;
}

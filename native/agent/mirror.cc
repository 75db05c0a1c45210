// kvmharness lab agent: mappings, page-diff mirrors and guarded copies (mirror.h).
#include "mirror.h"

#include <algorithm>
#include <cerrno>
#include <csetjmp>
#include <csignal>
#include <cstring>
#include <sys/mman.h>
#include <sys/statfs.h>
#include <vector>

#include "../core.h"

namespace kh::agent {
namespace {

// ---- guarded memory access ---------------------------------------------------
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
  // Residency from mincore() is meaningful (anonymous memory, tmpfs, hugetlbfs, guest_memfd):
  // pages that are not resident read as zeroes and are never touched by a scan.
  bool mincore_ok;
  uint8_t *snap;                  // tracked: the content the host last saw
  std::vector<uint8_t> nonzero;   // tracked: per page, snapshot page is not all zero
  std::vector<uint8_t> hole;      // per page, unmapped by a partial do_munmap (empty: none)
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
  bool holes = !m.hole.empty();
  for (size_t p = 0; p < n && m.mincore_ok;) {
    if (holes && m.hole[p]) {
      p++;
      continue;
    }
    size_t q = p + 1;
    while (q < n && !(holes && m.hole[q])) q++;
    size_t end = q * PAGE < m.len ? q * PAGE : m.len;
    if (::mincore(m.addr + p * PAGE, end - p * PAGE, resident.data() + p) < 0)
      std::fill(resident.begin() + (long)p, resident.begin() + (long)q, 1);
    p = q;
  }
  // 0 = unchanged, 1 = changed (data), 2 = became zero.
  std::vector<uint8_t> change(n, 0);
  volatile size_t i = 0;
  while (i < n) {
    bool ok = guarded([&] {
      for (; i < n; i = i + 1) {
        size_t off = i * PAGE;
        size_t len = off + PAGE <= m.len ? PAGE : m.len - off;
        if (holes && m.hole[i]) continue;  // nothing to read; the snapshot keeps what the host saw
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

}  // namespace

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
        // Only the bytes the host changed are stored: a vCPU thread may be
        // writing the page's other bytes at this moment.
        for (size_t k = 0; k < n; k++)
          if (h[k] != s[k]) a[k] = h[k];
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

bool guarded_write(uint64_t addr, const uint8_t *src, size_t len) {
  return guarded([&] { std::memcpy(reinterpret_cast<void *>((uintptr_t)addr), src, len); });
}

int64_t do_mmap(uint64_t len, int prot, int flags, int fd, int64_t off, bool track, Out &pulled, uint32_t &npulled) {
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
                   (sf.f_type == 0x01021994 /* TMPFS_MAGIC */ || sf.f_type == (long)0x958458f6 /* HUGETLBFS_MAGIC */ ||
                    sf.f_type == 0x474d454d /* GUEST_MEMFD_MAGIC: a scan must not fault its pages in */);
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
  if (track) scan(maps.back(), pulled, npulled);
  return r;
}

// The mapping made by do_mmap that holds [addr, addr + len), page-aligned inside it.
static Mapping *inner(uint64_t addr, uint64_t len) {
  Mapping *m = find_map(addr, len);
  if (!m || !len || addr % PAGE || len % PAGE) return nullptr;
  return m;
}

int64_t do_munmap(uint64_t addr, uint64_t len, bool keep) {
  for (size_t i = 0; i < maps.size() && !keep; i++) {
    if ((uint64_t)(uintptr_t)maps[i].addr == addr && maps[i].len == len) {
      if (maps[i].snap) ::munmap(maps[i].snap, maps[i].len);
      maps.erase(maps.begin() + (long)i);
      return kh::unmap(reinterpret_cast<void *>((uintptr_t)addr), (size_t)len);
    }
  }
  Mapping *m = inner(addr, len);
  if (!m) return -EINVAL;  // only whole mappings this agent made, or pages inside one
  int64_t r = kh::unmap(reinterpret_cast<void *>((uintptr_t)addr), (size_t)len);
  if (r < 0) return r;
  if (m->hole.empty()) m->hole.assign(m->pages(), 0);
  size_t first = (addr - (uint64_t)(uintptr_t)m->addr) / PAGE;
  std::fill(m->hole.begin() + (long)first, m->hole.begin() + (long)(first + len / PAGE), 1);
  return 0;
}

int64_t do_remap(uint64_t addr, uint64_t len, int prot, int flags, int fd, int64_t off) {
  Mapping *m = inner(addr, len);
  if (!m) return -EINVAL;
  int64_t r = kh::map_fixed(reinterpret_cast<void *>((uintptr_t)addr), (size_t)len, prot, flags, fd, off);
  if (r < 0 || m->hole.empty()) return r;
  size_t first = (addr - (uint64_t)(uintptr_t)m->addr) / PAGE;
  std::fill(m->hole.begin() + (long)first, m->hole.begin() + (long)(first + len / PAGE), 0);
  return r;
}

bool mapped(uint64_t addr, uint64_t len) { return find_map(addr, len) != nullptr; }

void scan_tracked(Out &pulled, uint32_t &npulled) {
  for (auto &m : maps)
    if (m.tracked) scan(m, pulled, npulled);
}

void guard_install() {
  struct sigaction sa = {};
  sa.sa_sigaction = on_fault;
  sa.sa_flags = SA_SIGINFO | SA_NODEFER;
  sigemptyset(&sa.sa_mask);
  ::sigaction(SIGSEGV, &sa, nullptr);
  ::sigaction(SIGBUS, &sa, nullptr);
}

}  // namespace kh::agent

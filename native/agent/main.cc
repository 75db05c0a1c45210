// kvmharness lab agent: performs KVM system calls on request.
//
// A small static program that runs inside the lab's guest (or, for tests, as a
// local child process) and answers framed requests on a byte channel: stdin /
// stdout by default, or a device (`--dev /dev/ttyS1`, `--virtio-port NAME`).
// Every operation maps onto one function of the native core (core.cc), plus
// memory operations that keep the host's mirrors of the agent's mappings
// coherent (mirror.cc). The wire format (wire.h) and the coherence rules are
// in docs/lab-protocol.md; the host side is src/lab/protocol.ts and remote/.
// This file holds the channel and the dispatch of requests; each vCPU runs on
// a thread of its own (threads.cc), so runs go on while requests are served.
//
// The same sources build for x86_64 and arm64 (nothing here is x86-only; on
// arm64 the run loop simply never sees an io exit):
// Build: g++ -O2 -static -std=c++17 -pthread -o kvmharness-agent native/agent/*.cc native/core.cc native/vcpu_thread.cc
//        aarch64-linux-gnu-g++ (the same arguments) -o kvmharness-agent-arm64
#include <cerrno>
#include <cstdarg>
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
#include <sys/stat.h>
#include <sys/utsname.h>
#include <termios.h>
#include <unistd.h>
#include <vector>

#include "../core.h"
#include "../vcpu_thread.h"
#include "mirror.h"
#include "threads.h"
#include "wire.h"

namespace {

using namespace kh::agent;

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

// A run's record (wire.h RUN_RECORD), then its console bytes; none: still running.
void put_record(Out &o, const Ended *e) {
  o.put<uint32_t>(e ? e->exits : 0);
  o.put<uint32_t>(e ? e->console_len : 0);
  o.put<uint32_t>(e ? e->timed_out : 0);
  o.put<uint32_t>(e ? 0 : 1);
  o.put<uint64_t>(e ? e->ns : 0);
  if (e) o.bytes(e->console, e->console_len);
}

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
                    PROTOCOL_VERSION, (int)::getpid(), (long long)kh::gettid_(), ::sysconf(_SC_PAGESIZE),
                    kh::kick_signal(),
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
      r.result = do_mmap(len, prot, flags, fd, off, track != 0, r.pulled, r.npulled);
      return;
    }
    case OP_MUNMAP: {
      uint64_t addr = a.take<uint64_t>();
      uint64_t len = a.take<uint64_t>();
      if (!a.ok) break;
      // An optional u32 1: pages of a mapping that stays known, even when they are all of it.
      size_t more;
      a.rest(&more);
      uint32_t keep = more >= 4 ? a.take<uint32_t>() : 0;
      r.result = do_munmap(addr, len, keep != 0);
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
      r.result = guarded_write(addr, s, n) ? 0 : -EFAULT;
      return;
    }
    case OP_RUN: {
      int32_t fd = a.take<int32_t>();
      uint32_t port = a.take<uint32_t>();
      uint64_t run_addr = a.take<uint64_t>();
      uint32_t max_exits = a.take<uint32_t>();
      uint32_t timeout_ms = a.take<uint32_t>();
      int32_t thread = a.take<int32_t>();
      uint32_t wait_ms = a.take<uint32_t>();
      if (!a.ok) break;
      if (!mapped(run_addr, PAGE)) {
        r.result = -EFAULT;  // not a mapping of this agent: KVM_RUN would write through it
        return;
      }
      r.result = run_start(thread, fd, run_addr, (uint16_t)port, max_exits, timeout_ms);
      if (r.result < 0) return;
      std::vector<Ended> ended;
      run_wait({thread}, wait_ms, ended);
      if (ended.empty()) {
        put_record(r.payload, nullptr);  // still running: runWait collects it
        return;
      }
      r.result = ended[0].ret;
      put_record(r.payload, &ended[0]);
      return;
    }
    case OP_RUN_WAIT: {
      uint32_t wait_ms = a.take<uint32_t>();
      std::vector<int32_t> tids;
      size_t n;
      const uint8_t *s = a.rest(&n);
      if (!a.ok || n % 4) break;
      for (size_t k = 0; k < n; k += 4) tids.push_back(get<int32_t>(s + k));
      std::vector<Ended> ended;
      run_wait(tids, wait_ms, ended);
      for (const Ended &e : ended) {
        r.payload.put<int32_t>(e.tid);
        r.payload.put<uint32_t>(0);
        r.payload.put<int64_t>(e.ret);
        put_record(r.payload, &e);
      }
      r.result = (int64_t)ended.size();
      return;
    }
    case OP_THREAD:
      r.result = thread_new();
      return;
    case OP_THREAD_END:
    case OP_KICK: {
      int32_t tid = a.take<int32_t>();
      if (!a.ok) break;
      r.result = op == OP_KICK ? run_kick(tid) : thread_end(tid);
      return;
    }
    case OP_REMAP: {
      uint64_t addr = a.take<uint64_t>();
      uint64_t len = a.take<uint64_t>();
      int32_t prot = a.take<int32_t>();
      int32_t flags = a.take<int32_t>();
      int32_t fd = a.take<int32_t>();
      a.take<uint32_t>();
      int64_t off = a.take<int64_t>();
      if (!a.ok) break;
      r.result = do_remap(addr, len, prot, flags, fd, off);
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
  if (r.status == ST_OK && (flags & REQ_PULL)) scan_tracked(r.pulled, r.npulled);
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

  guard_install();
  kh::kick_install();

  std::vector<uint8_t> frame;
  while (serve_one(frame)) {
  }
  return 0;
}

// kvmharness lab agent: the wire format (docs/lab-protocol.md).
//
// The host side is src/lab/protocol.ts; test/native-abi.test.ts compiles this
// header and compares every constant here with its export there.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

namespace kh::agent {

constexpr uint32_t REQ_MAGIC = 0x5152484b;  // "KHRQ"
constexpr uint32_t REP_MAGIC = 0x5052484b;  // "KHRP"
constexpr uint32_t END_MAGIC = 0x4e45484b;  // "KHEN"
constexpr uint32_t PROTOCOL_VERSION = 2;
constexpr size_t REQ_HEADER = 24;
constexpr size_t REP_HEADER = 40;
constexpr size_t ENTRY = 16;  // {u64 addr, u32 len, u32 flags}
constexpr size_t MAX_FRAME = (size_t)1 << 31;
constexpr size_t PAGE = 4096;

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
  OP_THREAD = 22,
  OP_THREAD_END = 23,
  OP_RUN_WAIT = 24,
  OP_KICK = 25,
  OP_REMAP = 26,
};

enum ReqFlag : uint16_t { REQ_PULL = 1 };
enum EntryFlag : uint32_t { ENTRY_ZERO = 1 };
enum Status : uint16_t { ST_OK = 0, ST_BAD_REQUEST = 1, ST_FAULT = 2 };
// A run's record (run, runWait): {u32 exits, u32 consoleLen, u32 timedOut,
// u32 pending, u64 ns}; runWait prefixes i32 thread, u32 0, i64 result.
constexpr size_t RUN_RECORD = 24;
// run: wait for the run's end as long as it takes (the time limit still ends it).
constexpr uint32_t WAIT_FOREVER = 0xffffffff;

// A little-endian value at p (the agent runs on little-endian x86_64 and arm64).
template <typename T>
T get(const uint8_t *p) {
  T v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// A growing little-endian byte string.
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

}  // namespace kh::agent

// kvmharness lab agent: the mappings it made for the host, and the page
// diffs that keep the host's mirrors of them coherent (docs/lab-protocol.md,
// "Coherence"). Every access to memory named by the host is guarded: a fault
// becomes a failed copy instead of killing the agent.
#pragma once
#include <cstddef>
#include <cstdint>

#include "wire.h"

namespace kh::agent {

// Installs the SIGSEGV / SIGBUS handler the guarded copies rely on.
void guard_install();
// memcpy from / to an address the host named; false if the copy faulted.
bool guarded_read(uint8_t *dst, uint64_t addr, size_t len);
bool guarded_write(uint64_t addr, const uint8_t *src, size_t len);

// mmap for the host. A tracked mapping gets a snapshot of what the host has
// seen, and its first scan is appended to `pulled`.
int64_t do_mmap(uint64_t len, int prot, int flags, int fd, int64_t off, bool track, Out &pulled, uint32_t &npulled);
// munmap of a whole mapping made by do_mmap, or of page-aligned pages inside
// one (the mapping stays known, with a hole there; anything else is -EINVAL).
// `keep`: the pages are a hole in a mapping that stays known even when they
// are all of it (a memslot's memory unmapped whole, to be mapped back).
int64_t do_munmap(uint64_t addr, uint64_t len, bool keep = false);
// mmap(MAP_FIXED) over page-aligned pages inside a mapping made by do_mmap
// (filling a hole, or replacing what is there); -EINVAL elsewhere.
int64_t do_remap(uint64_t addr, uint64_t len, int prot, int flags, int fd, int64_t off);
// Whether [addr, addr + len) lies inside one mapping made by do_mmap.
bool mapped(uint64_t addr, uint64_t len);
// Applies one host write (zero: the range becomes zero). Inside a tracked
// mapping, whole pages are merged with the snapshot: bytes the host changed
// win, bytes only the agent's side changed are kept (and reported by the next
// scan). False on a fault.
bool apply_write(uint64_t addr, const uint8_t *data, uint32_t len, bool zero);
// Scans every tracked mapping for pages that differ from the snapshot,
// updates the snapshots and appends the changed ranges to `pulled`.
void scan_tracked(Out &pulled, uint32_t &npulled);

}  // namespace kh::agent

/**
 * KVM's userspace ABI as src/kvm defines it, checked against the C headers.
 *
 * 1. A C program generated from the tables in src/uapi/uapi.ts is compiled once
 *    with `cc` against the installed <linux/kvm.h> and prints, as JSON, every
 *    ioctl number, capability, exit reason, flag, host constant, struct size and
 *    kvm_run offset that the header defines (an entry it lacks prints as null).
 *    It also fills sample structs field by field with distinct values and prints
 *    their bytes and the offset of every field it filled.
 * 2. The installed header may be older than the ABI the project uses. Entries it
 *    lacks are checked against literals written from the kernel's current
 *    include/uapi/linux/kvm.h and arch/x86/include/uapi/asm/kvm.h, each with its
 *    derivation; sample structs the header lacks are laid out from literal
 *    offsets derived the same way.
 * 3. The byte layouts hard-coded in regs.ts, kvm.ts, stats.ts and exits.ts are
 *    checked against the sample bytes: decoders must read the C values back and
 *    encoders must produce the C bytes. kvm.ts runs on a target whose addon is a
 *    recording stand-in, so what it would pass to ioctl() is compared with C.
 */
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import * as U from '../src/uapi/uapi.js';
import {
  decodeRegs,
  decodeSregs,
  encodeRegs,
  encodeSregs,
  REG_NAMES,
  SEG_NAMES,
  type Regs,
  type Segment,
  type Sregs,
} from '../src/kvm/regs.js';
import { decodeStatValues, parseStatsLayout } from '../src/kvm/stats.js';
import { decodeExit } from '../src/kvm/exits.js';
import type { CpuidEntry } from '../src/kvm/cpuid.js';
import type { Kvm } from '../src/kvm/kvm.js';
import { Memslot } from '../src/kvm/memslot.js';
import { Vcpu } from '../src/kvm/vcpu.js';
import { Vm } from '../src/kvm/vm.js';
import type { Addon } from '../src/kvm/sys.js';
import { localFs } from '../src/target/fs.js';
import type { Target } from '../src/kvm/target.js';

// ---- a recording stand-in for the native addon ---------------------------------

const fake = (() => {
  type Buf = ArrayBufferView | ArrayBuffer;
  const view = (b: Buf) =>
    b instanceof ArrayBuffer ? new Uint8Array(b) : new Uint8Array(b.buffer, b.byteOffset, b.byteLength);
  const state = {
    /** ioctlBuf calls: the request and a copy of the buffer as passed in. */
    calls: [] as { req: number; bytes: Uint8Array }[],
    mmaps: [] as { len: number; offset: number }[],
    /** Answers an ioctlBuf call: may write into the buffer; returns the ioctl result. */
    reply: undefined as undefined | ((req: number, buf: Uint8Array) => number),
    address: 0n,
    mmapBuffer: undefined as ArrayBuffer | undefined,
  };
  const addon = {
    ioctl: () => 0,
    ioctlBuf: (_fd: number, req: number, buf: Buf) => {
      const u = view(buf);
      state.calls.push({ req, bytes: u.slice() });
      return state.reply ? state.reply(req, u) : 0;
    },
    addressOf: () => state.address,
    mmap: (len: number, _prot: number, _flags: number, _fd: number, offset: number) => {
      state.mmaps.push({ len, offset });
      return state.mmapBuffer ?? new ArrayBuffer(len);
    },
    munmap: () => 0,
    close: () => 0,
  };
  return { state, addon };
})();

/** A target whose system calls are the stand-in's. */
const fakeTarget = {
  name: 'fake',
  addon: fake.addon as unknown as Addon,
  fs: localFs,
  runner: () => ({
    run: () => ({ ret: 0, exits: 0, console: new Uint8Array(0), ns: 0, timedOut: false }),
    tid: () => 0,
    kick() {},
    close() {},
  }),
  concurrentRuns: false,
} satisfies Target;

// ---- what is checked: TypeScript values and the C expressions for them --------

interface Entry {
  /** Name in the reports: the uapi.ts table and key. */
  key: string;
  ts: number;
  /** C expression for the header's value. */
  c: string;
  /** Macro that must be defined for `c` to compile; null: always compiles. */
  guard: string | null;
}

/** Structs newer than some headers, with a macro the same header change added. */
const STRUCT_GUARD: Partial<Record<keyof typeof U.SIZEOF, string>> = {
  kvm_userspace_memory_region2: 'KVM_SET_USER_MEMORY_REGION2',
  kvm_clear_dirty_log: 'KVM_CLEAR_DIRTY_LOG',
  kvm_create_guest_memfd: 'KVM_CREATE_GUEST_MEMFD',
  kvm_memory_attributes: 'KVM_SET_MEMORY_ATTRIBUTES',
  kvm_pre_fault_memory: 'KVM_PRE_FAULT_MEMORY',
  kvm_dirty_gfn: 'KVM_DIRTY_GFN_F_DIRTY',
  kvm_stats_header: 'KVM_GET_STATS_FD',
  kvm_stats_desc: 'KVM_GET_STATS_FD',
};

/** struct kvm_run member for each RUN offset. */
const RUN_MEMBER: Record<keyof typeof U.RUN, string> = {
  request_interrupt_window: 'request_interrupt_window',
  immediate_exit: 'immediate_exit',
  exit_reason: 'exit_reason',
  if_flag: 'if_flag',
  flags: 'flags',
  cr8: 'cr8',
  apic_base: 'apic_base',
  union: 'hw',
  io_direction: 'io.direction',
  io_size: 'io.size',
  io_port: 'io.port',
  io_count: 'io.count',
  io_data_offset: 'io.data_offset',
  mmio_phys_addr: 'mmio.phys_addr',
  mmio_data: 'mmio.data',
  mmio_len: 'mmio.len',
  mmio_is_write: 'mmio.is_write',
  fail_entry_reason: 'fail_entry.hardware_entry_failure_reason',
  fail_entry_cpu: 'fail_entry.cpu',
  internal_suberror: 'internal.suberror',
  internal_ndata: 'internal.ndata',
  internal_data: 'internal.data',
  system_event_type: 'system_event.type',
  system_event_ndata: 'system_event.ndata',
  system_event_data: 'system_event.data',
  memory_fault_flags: 'memory_fault.flags',
  memory_fault_gpa: 'memory_fault.gpa',
  memory_fault_size: 'memory_fault.size',
  ex_exception: 'ex.exception',
  ex_error_code: 'ex.error_code',
};

const macros = (table: string, values: Readonly<Record<string, number>>, cName = (k: string) => k): Entry[] =>
  Object.entries(values).map(([k, ts]) => ({ key: `${table}.${k}`, ts, c: cName(k), guard: cName(k) }));

const GROUPS: Record<string, Entry[]> = {
  ioctl: macros('IOCTL', U.IOCTL),
  cap: macros('CAP', U.CAP),
  exit: macros('EXIT', U.EXIT),
  flags: [
    ...macros('MEM', U.MEM),
    ...macros('uapi', {
      KVM_MEMORY_ATTRIBUTE_PRIVATE: U.KVM_MEMORY_ATTRIBUTE_PRIVATE,
      KVM_MEMORY_EXIT_FLAG_PRIVATE: U.KVM_MEMORY_EXIT_FLAG_PRIVATE,
      GUEST_MEMFD_FLAG_MMAP: U.GUEST_MEMFD_FLAG_MMAP,
      GUEST_MEMFD_FLAG_INIT_SHARED: U.GUEST_MEMFD_FLAG_INIT_SHARED,
      KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE: U.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
      KVM_DIRTY_LOG_INITIALLY_SET: U.KVM_DIRTY_LOG_INITIALLY_SET,
      KVM_DIRTY_GFN_F_DIRTY: U.KVM_DIRTY_GFN_F_DIRTY,
      KVM_DIRTY_GFN_F_RESET: U.KVM_DIRTY_GFN_F_RESET,
      KVM_DIRTY_LOG_PAGE_OFFSET: U.KVM_DIRTY_LOG_PAGE_OFFSET,
      KVM_EXIT_IO_IN: U.KVM_EXIT_IO_IN,
      KVM_EXIT_IO_OUT: U.KVM_EXIT_IO_OUT,
    }),
    ...macros('VM_TYPE', U.VM_TYPE),
  ],
  host: [
    ...macros('PROT', U.PROT, (k) => `PROT_${k}`),
    ...macros('MAP', U.MAP, (k) => `MAP_${k}`),
    ...macros('MADV', U.MADV, (k) => `MADV_${k}`),
    ...macros('MFD', U.MFD, (k) => `MFD_${k}`),
    ...macros('FALLOC', U.FALLOC, (k) => `FALLOC_FL_${k}`),
    ...macros('uapi', { O_RDWR: U.O_RDWR }),
  ],
  sizeof: (Object.keys(U.SIZEOF) as (keyof typeof U.SIZEOF)[]).map((k) => ({
    key: `SIZEOF.${k}`,
    ts: U.SIZEOF[k],
    c: `sizeof(struct ${k})`,
    guard: STRUCT_GUARD[k] ?? null,
  })),
  run: (Object.keys(U.RUN) as (keyof typeof U.RUN)[]).map((k) => ({
    key: `RUN.${k}`,
    ts: U.RUN[k],
    c: `offsetof(struct kvm_run, ${RUN_MEMBER[k]})`,
    guard: k.startsWith('memory_fault_') ? 'KVM_EXIT_MEMORY_FAULT' : null,
  })),
  // Where the code puts the entries of a struct with a flexible array member.
  flex: [
    {
      key: 'kvm_cpuid2.entries (kvm.ts: SIZEOF.kvm_cpuid2)',
      ts: U.SIZEOF.kvm_cpuid2,
      c: 'offsetof(struct kvm_cpuid2, entries)',
      guard: null,
    },
    {
      key: 'kvm_msrs.entries (kvm.ts: SIZEOF.kvm_msrs)',
      ts: U.SIZEOF.kvm_msrs,
      c: 'offsetof(struct kvm_msrs, entries)',
      guard: null,
    },
    {
      key: 'kvm_stats_desc.name (stats.ts: SIZEOF.kvm_stats_desc)',
      ts: U.SIZEOF.kvm_stats_desc,
      c: 'offsetof(struct kvm_stats_desc, name)',
      guard: 'KVM_GET_STATS_FD',
    },
  ],
};
const ENTRIES: Entry[] = Object.values(GROUPS).flat();
const TS_VALUES: Record<string, number> = Object.fromEntries(ENTRIES.map((e) => [e.key, e.ts]));

// ---- step 2: the kernel's current definitions, derived by hand -----------------
//
// _IOC(dir, type, nr, size) = dir << 30 | size << 16 | type << 8 | nr, with
// _IOC_WRITE = 1, _IOC_READ = 2 (so _IOW: 0x4..., _IOWR: 0xC...) and KVMIO = 0xAE.
// Struct layouts: x86-64 C rules (__u64 aligned to 8, no padding between the
// fields below). Entries also defined by the installed header are controls: the
// same derivation must reproduce what that header computes.

const KERNEL_VALUES: Record<string, number> = {
  // include/uapi/linux/kvm.h
  // #define KVM_SET_USER_MEMORY_REGION2 _IOW(KVMIO, 0x49, struct kvm_userspace_memory_region2)
  //   sizeof = 160 (below): 1 << 30 | 160 << 16 | 0xAE << 8 | 0x49
  'IOCTL.KVM_SET_USER_MEMORY_REGION2': 0x40a0ae49,
  // #define KVM_SET_MEMORY_ATTRIBUTES _IOW(KVMIO, 0xd2, struct kvm_memory_attributes)
  //   sizeof = 32: 1 << 30 | 32 << 16 | 0xAE << 8 | 0xd2
  'IOCTL.KVM_SET_MEMORY_ATTRIBUTES': 0x4020aed2,
  // #define KVM_CREATE_GUEST_MEMFD _IOWR(KVMIO, 0xd4, struct kvm_create_guest_memfd)
  //   sizeof = 64: 3 << 30 | 64 << 16 | 0xAE << 8 | 0xd4
  'IOCTL.KVM_CREATE_GUEST_MEMFD': 0xc040aed4,
  // #define KVM_PRE_FAULT_MEMORY _IOWR(KVMIO, 0xd5, struct kvm_pre_fault_memory)
  //   sizeof = 64: 3 << 30 | 64 << 16 | 0xAE << 8 | 0xd5
  'IOCTL.KVM_PRE_FAULT_MEMORY': 0xc040aed5,
  // Controls. #define KVM_SET_USER_MEMORY_REGION _IOW(KVMIO, 0x46, struct kvm_userspace_memory_region)
  //   sizeof = 4 + 4 + 8 + 8 + 8 = 32: 1 << 30 | 32 << 16 | 0xAE << 8 | 0x46
  'IOCTL.KVM_SET_USER_MEMORY_REGION': 0x4020ae46,
  // #define KVM_CLEAR_DIRTY_LOG _IOWR(KVMIO, 0xc0, struct kvm_clear_dirty_log)
  //   sizeof = 4 + 4 + 8 + 8 = 24: 3 << 30 | 24 << 16 | 0xAE << 8 | 0xc0
  'IOCTL.KVM_CLEAR_DIRTY_LOG': 0xc018aec0,
  // #define KVM_GET_STATS_FD _IO(KVMIO, 0xce): 0xAE << 8 | 0xce
  'IOCTL.KVM_GET_STATS_FD': 0xaece,

  // struct kvm_userspace_memory_region2 { __u32 slot; __u32 flags; __u64 guest_phys_addr;
  //   __u64 memory_size; __u64 userspace_addr; __u64 guest_memfd_offset; __u32 guest_memfd;
  //   __u32 pad1; __u64 pad2[14]; }  = 4+4+8+8+8+8+4+4 + 14*8 = 48 + 112
  'SIZEOF.kvm_userspace_memory_region2': 160,
  // struct kvm_create_guest_memfd { __u64 size; __u64 flags; __u64 reserved[6]; } = 8+8+48
  'SIZEOF.kvm_create_guest_memfd': 64,
  // struct kvm_memory_attributes { __u64 address; __u64 size; __u64 attributes; __u64 flags; } = 4*8
  'SIZEOF.kvm_memory_attributes': 32,
  // struct kvm_pre_fault_memory { __u64 gpa; __u64 size; __u64 flags; __u64 padding[5]; } = 3*8 + 5*8
  'SIZEOF.kvm_pre_fault_memory': 64,
  // Control: struct kvm_userspace_memory_region (above) = 32
  'SIZEOF.kvm_userspace_memory_region': 32,

  // #define KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP 225
  'CAP.KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP': 225,
  // #define KVM_CAP_USER_MEMORY2 231
  'CAP.KVM_CAP_USER_MEMORY2': 231,
  // #define KVM_CAP_MEMORY_FAULT_INFO 232
  'CAP.KVM_CAP_MEMORY_FAULT_INFO': 232,
  // #define KVM_CAP_MEMORY_ATTRIBUTES 233
  'CAP.KVM_CAP_MEMORY_ATTRIBUTES': 233,
  // #define KVM_CAP_GUEST_MEMFD 234
  'CAP.KVM_CAP_GUEST_MEMFD': 234,
  // #define KVM_CAP_VM_TYPES 235
  'CAP.KVM_CAP_VM_TYPES': 235,
  // #define KVM_CAP_PRE_FAULT_MEMORY 236
  'CAP.KVM_CAP_PRE_FAULT_MEMORY': 236,
  // #define KVM_CAP_GUEST_MEMFD_FLAGS 244
  'CAP.KVM_CAP_GUEST_MEMFD_FLAGS': 244,
  // Control: #define KVM_CAP_DIRTY_LOG_RING_ACQ_REL 223
  'CAP.KVM_CAP_DIRTY_LOG_RING_ACQ_REL': 223,

  // #define KVM_EXIT_MEMORY_FAULT 39
  'EXIT.KVM_EXIT_MEMORY_FAULT': 39,
  // #define KVM_MEM_GUEST_MEMFD (1UL << 2)
  'MEM.KVM_MEM_GUEST_MEMFD': 4,
  // #define KVM_MEMORY_ATTRIBUTE_PRIVATE (1ULL << 3)
  'uapi.KVM_MEMORY_ATTRIBUTE_PRIVATE': 8,
  // #define KVM_MEMORY_EXIT_FLAG_PRIVATE (1ULL << 3)   (inside struct kvm_run's memory_fault)
  'uapi.KVM_MEMORY_EXIT_FLAG_PRIVATE': 8,
  // #define GUEST_MEMFD_FLAG_MMAP (1ULL << 0)
  'uapi.GUEST_MEMFD_FLAG_MMAP': 1,
  // #define GUEST_MEMFD_FLAG_INIT_SHARED (1ULL << 1)
  'uapi.GUEST_MEMFD_FLAG_INIT_SHARED': 2,

  // struct kvm_run: __u8 request_interrupt_window; __u8 immediate_exit; __u8 padding1[6]  (0..7)
  //   __u32 exit_reason (8); __u8 ready_for_interrupt_injection (12); __u8 if_flag (13); __u16 flags (14)
  //   __u64 cr8 (16); __u64 apic_base (24); then the exit union at 32, in which
  //   struct { __u64 flags; __u64 gpa; __u64 size; } memory_fault: 32, 40, 48
  'RUN.memory_fault_flags': 32,
  'RUN.memory_fault_gpa': 40,
  'RUN.memory_fault_size': 48,
  // Control: exit_reason, derived above
  'RUN.exit_reason': 8,

  // arch/x86/include/uapi/asm/kvm.h
  // #define KVM_X86_DEFAULT_VM 0
  'VM_TYPE.KVM_X86_DEFAULT_VM': 0,
  // #define KVM_X86_SW_PROTECTED_VM 1
  'VM_TYPE.KVM_X86_SW_PROTECTED_VM': 1,
};

interface Layout {
  size: number;
  /** Offset of each member designator used by the samples below. */
  offsets: Record<string, number>;
}

/** Layouts of the structs (or parts of them) the installed header may lack; derivations as above. */
const KERNEL_LAYOUTS: Record<string, Layout> = {
  // slot 0, flags 4, guest_phys_addr 8, memory_size 16, userspace_addr 24,
  // guest_memfd_offset 32, guest_memfd 40, pad1 44, pad2[14] 48..159
  kvm_userspace_memory_region2: {
    size: 160,
    offsets: {
      slot: 0,
      flags: 4,
      guest_phys_addr: 8,
      memory_size: 16,
      userspace_addr: 24,
      guest_memfd_offset: 32,
      guest_memfd: 40,
    },
  },
  // size 0, flags 8, reserved[6] 16..63
  kvm_create_guest_memfd: { size: 64, offsets: { size: 0, flags: 8 } },
  // address 0, size 8, attributes 16, flags 24
  kvm_memory_attributes: { size: 32, offsets: { address: 0, size: 8, attributes: 16, flags: 24 } },
  // gpa 0, size 8, flags 16, padding[5] 24..63
  kvm_pre_fault_memory: { size: 64, offsets: { gpa: 0, size: 8, flags: 16 } },
  // header 0..31 (see RUN above), union of 256 bytes (char padding[256]) 32..287,
  // __u64 kvm_valid_regs 288, __u64 kvm_dirty_regs 296, union { ...; char padding[2048]; } s 304..2351
  kvm_run: {
    size: 2352,
    offsets: { exit_reason: 8, 'memory_fault.flags': 32, 'memory_fault.gpa': 40, 'memory_fault.size': 48 },
  },
};

// ---- sample structs: filled in C, decoded/encoded by the TypeScript ------------

type Val = bigint | string; // a number, or a C expression the probe evaluates
interface Field {
  /** Member designator, e.g. `io.port`, `entries[1].eax`. */
  m: string;
  w: 1 | 2 | 4 | 8;
  v: Val;
}
interface SampleSpec {
  name: string;
  struct: string;
  /** Macro the installed header must define for the sample to be built in C. */
  guard?: string;
  /** Bytes after the struct (C expression), for flexible array members. */
  extra?: string;
  fields: Field[];
}
const fld = (m: string, w: Field['w'], v: Val | number): Field => ({ m, w, v: typeof v === 'number' ? BigInt(v) : v });

const REGS: Regs = Object.fromEntries(
  REG_NAMES.map((n, i) => [n, BigInt.asUintN(64, 0x1122334455667788n * BigInt(i + 1))]),
) as Regs;

const sampleSeg = (i: number): Segment => ({
  base: BigInt.asUintN(64, 0x0f1e2d3c4b5a6978n * BigInt(i + 3)),
  limit: 0x80000000 + i * 0x01010101,
  selector: 0x1008 + i * 0x0111,
  type: 0x10 + i,
  present: 0x20 + i,
  dpl: 0x30 + i,
  db: 0x40 + i,
  s: 0x50 + i,
  l: 0x60 + i,
  g: 0x70 + i,
  avl: 0x80 + i,
  unusable: 0x90 + i,
});
const SREGS: Sregs = {
  ...(Object.fromEntries(SEG_NAMES.map((n, i) => [n, sampleSeg(i)])) as Record<(typeof SEG_NAMES)[number], Segment>),
  gdt: { base: 0xfedcba9876543210n, limit: 0xabcd },
  idt: { base: 0x0123456789abcdefn, limit: 0x1357 },
  cr0: 0x80050033n,
  cr2: 0x00007f0000001234n,
  cr3: 0x0000000123456000n,
  cr4: 0x00000000003726e0n,
  cr8: 0xfn,
  efer: 0xd01n,
  apicBase: 0xfee00900n,
  interruptBitmap: [0x8000000000000001n, 0x0000000100000002n, 0x4000000000000400n, 0x0102030405060708n],
};

const SEG_FIELDS = [
  ['base', 8],
  ['limit', 4],
  ['selector', 2],
  ['type', 1],
  ['present', 1],
  ['dpl', 1],
  ['db', 1],
  ['s', 1],
  ['l', 1],
  ['g', 1],
  ['avl', 1],
  ['unusable', 1],
] as const;
const CR_FIELDS = [
  ['cr0', 'cr0'],
  ['cr2', 'cr2'],
  ['cr3', 'cr3'],
  ['cr4', 'cr4'],
  ['cr8', 'cr8'],
  ['efer', 'efer'],
  ['apic_base', 'apicBase'],
] as const;

/** kvm_sregs as C members and values. */
function sregsFields(s: Sregs): Field[] {
  const out: Field[] = [];
  for (const n of SEG_NAMES) for (const [k, w] of SEG_FIELDS) out.push(fld(`${n}.${k}`, w, BigInt(s[n][k])));
  for (const t of ['gdt', 'idt'] as const) out.push(fld(`${t}.base`, 8, s[t].base), fld(`${t}.limit`, 2, s[t].limit));
  for (const [c, k] of CR_FIELDS) out.push(fld(c, 8, s[k]));
  s.interruptBitmap.forEach((v, i) => out.push(fld(`interrupt_bitmap[${i}]`, 8, v)));
  return out;
}
const regsFields = (r: Regs): Field[] => REG_NAMES.map((n) => fld(n, 8, r[n]));

// Values the kvm.ts calls below are made with.
const SLOT = 3;
const AS_ID = 1;
const SLOT_FIELD = (AS_ID << 16) | SLOT;
const GPA = 0x0000123456789000n;
const SLOT_SIZE = 0x200000;
const HVA = 0x00007f1122334000n;
const BITMAP_ADDR = 0x00007f5566778000n;
const GMEM_FD = 0x2a;
const GMEM_OFFSET = 0x0000123456780000n;
const ENABLE_CAP = { cap: 192, flags: 0x5a, args: [0x1000n, 0x2222000000000001n, 3n, 0xfffffffffffffffen] };
const CLEAR = { first: 0x12340, num: 0x1c0 };
const GVA = 0xffff800012345678n;
const GMEM_SIZE = 0x40000000n;
const GMEM_FLAGS = 0x3n;
const ATTR = { gpa: 0x0000000100000000n, size: 0x0000000000203000n, attributes: 8n };
const PREFAULT = { gpa: 0x0000000100000000n, size: 0x0000000000200000n, left: 0x30000n };
const CPUID: CpuidEntry[] = [
  { function: 0x7, index: 0x1, flags: 0x1, eax: 0xa0a1a2a3, ebx: 0xb0b1b2b3, ecx: 0xc0c1c2c3, edx: 0xd0d1d2d3 },
  { function: 0x80000008, index: 0x0, flags: 0x0, eax: 0x3030, ebx: 0x01020304, ecx: 0xfffffffe, edx: 0x7fffffff },
];
const MSRS = new Map<number, bigint>([
  [0x10, 0x0123456789abcdefn],
  [0xc0000080, 0xd01n],
]);

const cpuidFields = (entries: readonly CpuidEntry[]): Field[] => [
  fld('nent', 4, entries.length),
  ...entries.flatMap((e, i) =>
    (['function', 'index', 'flags', 'eax', 'ebx', 'ecx', 'edx'] as const).map((k) =>
      fld(`entries[${i}].${k}`, 4, e[k]),
    ),
  ),
];
const msrFields = (withData: boolean): Field[] => [
  fld('nmsrs', 4, MSRS.size),
  ...[...MSRS].flatMap(([index, data], i) => [
    fld(`entries[${i}].index`, 4, index),
    fld(`entries[${i}].data`, 8, withData ? data : 0n),
  ]),
];
const gfn = (name: string, flags: string, slot: number, offset: bigint): SampleSpec => ({
  name,
  struct: 'kvm_dirty_gfn',
  guard: 'KVM_DIRTY_GFN_F_DIRTY',
  fields: [fld('flags', 4, flags), fld('slot', 4, slot), fld('offset', 8, offset)],
});
const statsDesc = (
  name: string,
  flags: string,
  exponent: number,
  size: number,
  offset: number,
  bucket: number,
): SampleSpec => ({
  name,
  struct: 'kvm_stats_desc',
  guard: 'KVM_GET_STATS_FD',
  fields: [
    fld('flags', 4, flags),
    fld('exponent', 2, exponent),
    fld('size', 2, size),
    fld('offset', 4, offset),
    fld('bucket_size', 4, bucket),
  ],
});
const run = (name: string, fields: Field[], guard?: string): SampleSpec => ({ name, struct: 'kvm_run', guard, fields });

const STATS = { nameSize: 48, numDesc: 5, idOffset: 0x40, descOffset: 0x80, dataOffset: 0x200, id: 'kvm-4242' };

const SAMPLES: SampleSpec[] = [
  { name: 'kvm_regs', struct: 'kvm_regs', fields: regsFields(REGS) },
  { name: 'kvm_sregs', struct: 'kvm_sregs', fields: sregsFields(SREGS) },
  {
    name: 'kvm_userspace_memory_region',
    struct: 'kvm_userspace_memory_region',
    fields: [
      fld('slot', 4, SLOT_FIELD),
      fld('flags', 4, 3),
      fld('guest_phys_addr', 8, GPA),
      fld('memory_size', 8, SLOT_SIZE),
      fld('userspace_addr', 8, HVA),
    ],
  },
  {
    name: 'kvm_userspace_memory_region2',
    struct: 'kvm_userspace_memory_region2',
    guard: 'KVM_SET_USER_MEMORY_REGION2',
    fields: [
      fld('slot', 4, SLOT_FIELD),
      fld('flags', 4, 5),
      fld('guest_phys_addr', 8, GPA),
      fld('memory_size', 8, SLOT_SIZE),
      fld('userspace_addr', 8, HVA),
      fld('guest_memfd_offset', 8, GMEM_OFFSET),
      fld('guest_memfd', 4, GMEM_FD),
    ],
  },
  {
    name: 'kvm_dirty_log',
    struct: 'kvm_dirty_log',
    fields: [fld('slot', 4, SLOT_FIELD), fld('dirty_bitmap', 8, BITMAP_ADDR)],
  },
  {
    name: 'kvm_clear_dirty_log',
    struct: 'kvm_clear_dirty_log',
    guard: 'KVM_CLEAR_DIRTY_LOG',
    fields: [
      fld('slot', 4, SLOT_FIELD),
      fld('num_pages', 4, CLEAR.num),
      fld('first_page', 8, CLEAR.first),
      fld('dirty_bitmap', 8, BITMAP_ADDR),
    ],
  },
  {
    name: 'kvm_enable_cap',
    struct: 'kvm_enable_cap',
    fields: [
      fld('cap', 4, ENABLE_CAP.cap),
      fld('flags', 4, ENABLE_CAP.flags),
      ...ENABLE_CAP.args.map((a, i) => fld(`args[${i}]`, 8, a)),
    ],
  },
  { name: 'kvm_translation (in)', struct: 'kvm_translation', fields: [fld('linear_address', 8, GVA)] },
  {
    name: 'kvm_translation (out a)',
    struct: 'kvm_translation',
    fields: [
      fld('linear_address', 8, GVA),
      fld('physical_address', 8, 0x0000001234567000n),
      fld('valid', 1, 1),
      fld('writeable', 1, 0),
      fld('usermode', 1, 1),
    ],
  },
  {
    name: 'kvm_translation (out b)',
    struct: 'kvm_translation',
    fields: [
      fld('linear_address', 8, GVA),
      fld('physical_address', 8, 0x00000000fee00000n),
      fld('valid', 1, 0),
      fld('writeable', 1, 1),
      fld('usermode', 1, 0),
    ],
  },
  {
    name: 'kvm_create_guest_memfd',
    struct: 'kvm_create_guest_memfd',
    guard: 'KVM_CREATE_GUEST_MEMFD',
    fields: [fld('size', 8, GMEM_SIZE), fld('flags', 8, GMEM_FLAGS)],
  },
  {
    name: 'kvm_memory_attributes',
    struct: 'kvm_memory_attributes',
    guard: 'KVM_SET_MEMORY_ATTRIBUTES',
    fields: [fld('address', 8, ATTR.gpa), fld('size', 8, ATTR.size), fld('attributes', 8, ATTR.attributes)],
  },
  {
    name: 'kvm_pre_fault_memory (in)',
    struct: 'kvm_pre_fault_memory',
    guard: 'KVM_PRE_FAULT_MEMORY',
    fields: [fld('gpa', 8, PREFAULT.gpa), fld('size', 8, PREFAULT.size)],
  },
  {
    name: 'kvm_pre_fault_memory (out)',
    struct: 'kvm_pre_fault_memory',
    guard: 'KVM_PRE_FAULT_MEMORY',
    fields: [fld('gpa', 8, PREFAULT.gpa + PREFAULT.size - PREFAULT.left), fld('size', 8, PREFAULT.left)],
  },
  {
    name: 'kvm_cpuid2 + 2 entries',
    struct: 'kvm_cpuid2',
    extra: '2 * sizeof(struct kvm_cpuid_entry2)',
    fields: cpuidFields(CPUID),
  },
  {
    name: 'kvm_msrs + 2 entries',
    struct: 'kvm_msrs',
    extra: '2 * sizeof(struct kvm_msr_entry)',
    fields: msrFields(true),
  },
  {
    name: 'kvm_msrs + 2 entries (indices only)',
    struct: 'kvm_msrs',
    extra: '2 * sizeof(struct kvm_msr_entry)',
    fields: msrFields(false),
  },
  gfn('kvm_dirty_gfn #0', 'KVM_DIRTY_GFN_F_DIRTY', (1 << 16) | 5, 0x1234n),
  gfn('kvm_dirty_gfn #1', 'KVM_DIRTY_GFN_F_DIRTY', 2, 0x00000007ffff0001n),
  gfn('kvm_dirty_gfn #2', '0', 3, 0x99n),
  gfn('kvm_dirty_gfn #3', 'KVM_DIRTY_GFN_F_DIRTY', 4, 5n),
  gfn('kvm_dirty_gfn #0 (reset)', 'KVM_DIRTY_GFN_F_RESET', (1 << 16) | 5, 0x1234n),
  gfn('kvm_dirty_gfn #1 (reset)', 'KVM_DIRTY_GFN_F_RESET', 2, 0x00000007ffff0001n),
  {
    name: 'kvm_stats_header',
    struct: 'kvm_stats_header',
    guard: 'KVM_GET_STATS_FD',
    fields: [
      fld('flags', 4, 0),
      fld('name_size', 4, STATS.nameSize),
      fld('num_desc', 4, STATS.numDesc),
      fld('id_offset', 4, STATS.idOffset),
      fld('desc_offset', 4, STATS.descOffset),
      fld('data_offset', 4, STATS.dataOffset),
    ],
  },
  statsDesc('kvm_stats_desc #0', 'KVM_STATS_TYPE_PEAK | KVM_STATS_UNIT_BYTES | KVM_STATS_BASE_POW2', -3, 1, 8, 0),
  statsDesc(
    'kvm_stats_desc #1',
    'KVM_STATS_TYPE_LINEAR_HIST | KVM_STATS_UNIT_SECONDS | KVM_STATS_BASE_POW10',
    -9,
    4,
    16,
    7,
  ),
  statsDesc('kvm_stats_desc #2', 'KVM_STATS_TYPE_LOG_HIST | KVM_STATS_UNIT_CYCLES | KVM_STATS_BASE_POW10', 0, 2, 48, 0),
  statsDesc('kvm_stats_desc #3', 'KVM_STATS_TYPE_INSTANT | KVM_STATS_UNIT_BOOLEAN | KVM_STATS_BASE_POW10', 0, 1, 64, 0),
  statsDesc('kvm_stats_desc #4', 'KVM_STATS_TYPE_CUMULATIVE | KVM_STATS_UNIT_NONE | KVM_STATS_BASE_POW10', 0, 1, 0, 0),
  run('kvm_run: io', [
    fld('exit_reason', 4, 'KVM_EXIT_IO'),
    fld('io.direction', 1, 'KVM_EXIT_IO_OUT'),
    fld('io.size', 1, 2),
    fld('io.port', 2, 0x3f8),
    fld('io.count', 4, 3),
    fld('io.data_offset', 8, 4096),
  ]),
  run('kvm_run: mmio', [
    fld('exit_reason', 4, 'KVM_EXIT_MMIO'),
    fld('mmio.phys_addr', 8, 0xd0000128n),
    ...[0xa1, 0xb2, 0xc3, 0xd4, 0xe5, 0xf6, 0x07, 0x18].map((b, i) => fld(`mmio.data[${i}]`, 1, b)),
    fld('mmio.len', 4, 8),
    fld('mmio.is_write', 1, 1),
  ]),
  run('kvm_run: internal', [
    fld('exit_reason', 4, 'KVM_EXIT_INTERNAL_ERROR'),
    fld('internal.suberror', 4, 'KVM_INTERNAL_ERROR_EMULATION'),
    fld('internal.ndata', 4, 3),
    fld('internal.data[0]', 8, 0x1111n),
    fld('internal.data[1]', 8, 0x2222000000000000n),
    fld('internal.data[2]', 8, 0x33n),
  ]),
  run('kvm_run: fail_entry', [
    fld('exit_reason', 4, 'KVM_EXIT_FAIL_ENTRY'),
    fld('fail_entry.hardware_entry_failure_reason', 8, 0x80000021n),
    fld('fail_entry.cpu', 4, 5),
  ]),
  run('kvm_run: system_event', [
    fld('exit_reason', 4, 'KVM_EXIT_SYSTEM_EVENT'),
    fld('system_event.type', 4, 'KVM_SYSTEM_EVENT_RESET'),
    fld('system_event.ndata', 4, 2),
    fld('system_event.data[0]', 8, 0xabcdn),
    fld('system_event.data[1]', 8, 0x0123456789n),
  ]),
  run('kvm_run: ex', [
    fld('exit_reason', 4, 'KVM_EXIT_EXCEPTION'),
    fld('ex.exception', 4, 13),
    fld('ex.error_code', 4, 0x18),
  ]),
  run(
    'kvm_run: memory_fault',
    [
      fld('exit_reason', 4, BigInt(KERNEL_VALUES['EXIT.KVM_EXIT_MEMORY_FAULT']!)),
      fld('memory_fault.flags', 8, BigInt(KERNEL_VALUES['uapi.KVM_MEMORY_EXIT_FLAG_PRIVATE']!)),
      fld('memory_fault.gpa', 8, 0x0000000180000000n),
      fld('memory_fault.size', 8, 0x1000n),
    ],
    'KVM_EXIT_MEMORY_FAULT',
  ),
];

// ---- the C program ------------------------------------------------------------

const cString = (s: string) => JSON.stringify(s); // keys here are plain ASCII
const cLiteral = (v: Val) => (typeof v === 'string' ? `(${v})` : v < 0n ? `(${v}LL)` : `0x${v.toString(16)}ULL`);

function cProgram(): string {
  const L: string[] = [];
  L.push(
    '#include <linux/kvm.h>',
    '#include <linux/version.h>',
    '#include <sys/mman.h>',
    '#include <linux/mman.h>',
    '#include <linux/memfd.h>',
    '#include <linux/falloc.h>',
    '#include <fcntl.h>',
    '#include <stddef.h>',
    '#include <stdint.h>',
    '#include <stdio.h>',
    '#include <string.h>',
    '',
    'static const char *sep = "", *fsep = "";',
    'static void value(const char *k, unsigned long long v) { printf("%s\\n%s:%llu", sep, k, v); sep = ","; }',
    'static void absent(const char *k) { printf("%s\\n%s:null", sep, k); sep = ","; }',
    'static void sample_begin(const char *k, size_t size) { printf("%s\\n%s:{\\"size\\":%zu,\\"fields\\":{", sep, k, size); sep = ","; fsep = ""; }',
    'static void field(const char *m, size_t off, size_t w) { printf("%s%s:[%zu,%zu]", fsep, m, off, w); fsep = ","; }',
    'static void sample_end(const void *p, size_t n) {',
    '  const unsigned char *b = p;',
    '  printf("},\\"hex\\":\\"");',
    '  for (size_t i = 0; i < n; i++) printf("%02x", b[i]);',
    '  printf("\\"}");',
    '}',
    '',
    'int main(void) {',
    '  printf("{\\"header\\":\\"%d.%d.%d\\",\\"values\\":{", LINUX_VERSION_CODE >> 16, (LINUX_VERSION_CODE >> 8) & 0xff, LINUX_VERSION_CODE & 0xff);',
  );
  for (const e of ENTRIES) {
    const emit = `  value(${cString(cString(e.key))}, (unsigned long long)(${e.c}));`;
    if (e.guard === null) L.push(emit);
    else L.push(`#ifdef ${e.guard}`, emit, '#else', `  absent(${cString(cString(e.key))});`, '#endif');
  }
  L.push('  printf("},\\"samples\\":{"); sep = "";');
  for (const s of SAMPLES) {
    const body = [
      '  {',
      `    static unsigned char b[sizeof(struct ${s.struct})${s.extra ? ` + ${s.extra}` : ''}] __attribute__((aligned(16)));`,
      `    struct ${s.struct} *v = (struct ${s.struct} *)b;`,
      '    memset(b, 0, sizeof b);',
      ...s.fields.map((f) => `    v->${f.m} = (__typeof__(v->${f.m}))(uintptr_t)${cLiteral(f.v)};`),
      `    sample_begin(${cString(cString(s.name))}, sizeof b);`,
      ...s.fields.map(
        (f) => `    field(${cString(cString(f.m))}, offsetof(struct ${s.struct}, ${f.m}), sizeof(v->${f.m}));`,
      ),
      '    sample_end(b, sizeof b);',
      '  }',
    ];
    if (!s.guard) L.push(...body);
    else L.push(`#ifdef ${s.guard}`, ...body, '#else', `  absent(${cString(cString(s.name))});`, '#endif');
  }
  L.push('  printf("}}\\n");', '  return 0;', '}', '');
  return L.join('\n');
}

interface ProbeSample {
  size: number;
  fields: Record<string, [number, number]>;
  hex: string;
}
interface Probe {
  header: string;
  values: Record<string, number | null>;
  samples: Record<string, ProbeSample | null>;
}

const CC_MISSING =
  "the C compiler 'cc' was not found: these tests compile a program against <linux/kvm.h>; install gcc (e.g. apt-get install gcc linux-libc-dev)";

function buildProbe(dir: string): Probe {
  const src = join(dir, 'uapi_probe.c');
  const exe = join(dir, 'uapi_probe');
  writeFileSync(src, cProgram());
  const cc = spawnSync('cc', ['-std=gnu11', '-O0', '-Wall', '-Werror', '-o', exe, src], { encoding: 'utf8' });
  if (cc.error) {
    if ((cc.error as NodeJS.ErrnoException).code === 'ENOENT') throw new Error(CC_MISSING);
    throw cc.error;
  }
  if (cc.status !== 0) {
    throw new Error(
      `cc failed (${cc.status}) on ${src}; if <linux/kvm.h> is missing, install linux-libc-dev (and gcc):\n${cc.stderr}`,
    );
  }
  const r = spawnSync(exe, [], { encoding: 'utf8', maxBuffer: 64 * 1024 * 1024 });
  if (r.error) throw r.error;
  if (r.status !== 0) throw new Error(`${exe} exited with ${r.status}:\n${r.stderr}`);
  return JSON.parse(r.stdout) as Probe;
}

// ---- the oracle ---------------------------------------------------------------

type Num = number | bigint;
const fmt = (v: Num) => (typeof v === 'bigint' || v >= 0 ? `0x${v.toString(16)} (${v})` : `${v}`);

interface Report {
  checked: string[];
  absent: string[];
  mismatches: string[];
}

/**
 * Compares every name in `ts` with `ref`. A name `ref` gives as null is absent
 * there (not compared); a name `ref` lacks altogether is a mismatch.
 */
function compare(ref: Readonly<Record<string, Num | null | undefined>>, ts: Readonly<Record<string, Num>>): Report {
  const out: Report = { checked: [], absent: [], mismatches: [] };
  for (const [k, t] of Object.entries(ts)) {
    const r = ref[k];
    if (r === null) out.absent.push(k);
    else if (r === undefined) out.mismatches.push(`${k}: no reference value (TypeScript ${fmt(t)})`);
    else if (BigInt(r) !== BigInt(t)) out.mismatches.push(`${k}: reference ${fmt(r)}, TypeScript ${fmt(t)}`);
    else out.checked.push(k);
  }
  return out;
}

const hexOf = (b: Uint8Array) => Buffer.from(b).toString('hex');
const fromHex = (h: string) => new Uint8Array(Buffer.from(h, 'hex'));

/** Differences between reference bytes and TypeScript's, named by the field they fall in. */
function byteDiff(label: string, ref: Uint8Array, got: Uint8Array, fields: Record<string, [number, number]>): string[] {
  const out: string[] = [];
  if (ref.length !== got.length) out.push(`${label}: TypeScript has ${got.length} bytes, the reference ${ref.length}`);
  const spans = Object.entries(fields);
  const seen = new Set<string>();
  for (let i = 0; i < Math.min(ref.length, got.length); i++) {
    if (ref[i] === got[i]) continue;
    const hit = spans.find(([, [o, w]]) => i >= o && i < o + w);
    const [name, [o, w]] = hit ?? [`(unnamed byte ${i})`, [i, 1] as [number, number]];
    if (seen.has(name)) continue;
    seen.add(name);
    out.push(
      `${label}.${name} at ${o}..${o + w - 1}: reference ${hexOf(ref.subarray(o, o + w))}, TypeScript ${hexOf(got.subarray(o, o + w))}`,
    );
  }
  return out;
}

const fieldValues = (fields: readonly Field[]): Record<string, bigint> =>
  Object.fromEntries(fields.map((f) => [f.m, typeof f.v === 'bigint' ? f.v : 0n]));

function encodeLayout(spec: SampleSpec, layout: Layout): ProbeSample {
  const b = new Uint8Array(layout.size);
  const fields: Record<string, [number, number]> = {};
  for (const f of spec.fields) {
    const o = layout.offsets[f.m];
    if (o === undefined) throw new Error(`${spec.name}: no kernel offset for ${f.m}`);
    if (typeof f.v === 'string')
      throw new Error(`${spec.name}.${f.m}: a C expression cannot be laid out without the header`);
    const bits = BigInt(8 * f.w);
    if (f.v >= 1n << bits || f.v < -(1n << (bits - 1n)))
      throw new Error(`${spec.name}.${f.m}: ${f.v} does not fit ${f.w} bytes`);
    const v = BigInt.asUintN(8 * f.w, f.v);
    for (let i = 0; i < f.w; i++) b[o + i] = Number((v >> BigInt(8 * i)) & 0xffn);
    fields[f.m] = [o, f.w];
  }
  return { size: layout.size, fields, hex: hexOf(b) };
}

// ---- the tests ----------------------------------------------------------------

describe('KVM userspace ABI of src/kvm against the C headers', () => {
  let dir: string | undefined;
  let probed: Probe | undefined;
  let probeError: Error | undefined;

  beforeAll(() => {
    dir = mkdtempSync(join(tmpdir(), 'kvmharness-uapi-'));
    try {
      probed = buildProbe(dir);
    } catch (e) {
      probeError = e as Error;
    }
  });
  afterAll(() => {
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  /** The probe's output; every test fails with the build error if there is none. */
  const probe = (): Probe => {
    if (probeError) throw probeError;
    if (!probed) throw new Error('the C probe did not run');
    return probed;
  };
  const absentKeys = () => Object.keys(TS_VALUES).filter((k) => probe().values[k] === null);
  const SPEC = new Map(SAMPLES.map((s) => [s.name, s]));

  /** Reference bytes of a sample: from C, or laid out from the kernel literals. */
  const sample = (name: string): ProbeSample & { source: 'header' | 'kernel' } => {
    const spec = SPEC.get(name);
    if (!spec) throw new Error(`no sample ${name}`);
    const c = probe().samples[name];
    if (c === undefined) throw new Error(`the probe printed no sample ${name}`);
    if (c !== null) return { ...c, source: 'header' };
    const layout = KERNEL_LAYOUTS[spec.struct];
    if (!layout)
      throw new Error(
        `${name}: struct ${spec.struct} is absent from the installed header and has no kernel layout literal`,
      );
    return { ...encodeLayout(spec, layout), source: 'kernel' };
  };
  const bytesOf = (name: string) => fromHex(sample(name).hex);

  beforeEach(() => {
    fake.state.calls = [];
    fake.state.mmaps = [];
    fake.state.reply = undefined;
    fake.state.address = 0n;
    fake.state.mmapBuffer = undefined;
  });
  const lastCall = (req: number) => {
    const c = fake.state.calls.filter((x) => x.req === req).at(-1);
    if (!c) throw new Error(`no ioctl 0x${req.toString(16)} was made`);
    return c.bytes;
  };
  /** Captured ioctl argument compared with a sample. */
  const expectBytes = (name: string, got: Uint8Array) => {
    const s = sample(name);
    expect(byteDiff(name, fromHex(s.hex), got, s.fields)).toEqual([]);
  };
  const newVm = () => new Vm({ target: fakeTarget } as unknown as Kvm, 100);
  const newVcpu = (vm = newVm()) => new Vcpu(vm, 0, 101, new ArrayBuffer(4096));

  it('compiles and runs the probe program with cc', () => {
    const p = probe();
    expect(Object.keys(p.values)).toEqual(ENTRIES.map((e) => e.key));
    expect(Object.keys(p.samples)).toEqual(SAMPLES.map((s) => s.name));
  });

  describe('against the installed <linux/kvm.h>', () => {
    const group = (g: keyof typeof GROUPS) => () => {
      const ts = Object.fromEntries(GROUPS[g]!.map((e) => [e.key, e.ts]));
      const r = compare(probe().values, ts);
      expect(r.mismatches).toEqual([]);
      expect(r.checked.length + r.absent.length).toBe(GROUPS[g]!.length);
    };
    it('ioctl numbers (IOCTL)', group('ioctl'));
    it('capability numbers (CAP)', group('cap'));
    it('exit reasons (EXIT)', group('exit'));
    it('memslot flags, dirty-log and memory-attribute flags, VM types', group('flags'));
    it('host constants (PROT, MAP, MADV, MFD, FALLOC, O_RDWR)', group('host'));
    it('struct sizes (SIZEOF)', group('sizeof'));
    it('kvm_run offsets (RUN)', group('run'));
    it('where flexible array members start', group('flex'));

    it('lists what the installed header lacks (checked only against the kernel literals below)', () => {
      const absent = [
        ...absentKeys(),
        ...SAMPLES.filter((s) => probe().samples[s.name] === null).map((s) => `sample ${s.name}`),
      ];
      console.log(
        `Installed <linux/kvm.h> is Linux ${probe().header}; it lacks ${absent.length} entries:\n  ${absent.join('\n  ')}`,
      );
      // Every entry is either defined by the header (a number) or left to the next step (null).
      const defined = Object.keys(TS_VALUES).filter((k) => typeof probe().values[k] === 'number');
      expect(absentKeys().length + defined.length).toBe(ENTRIES.length);
    });
  });

  describe("against the kernel's current uapi headers (literals)", () => {
    it('every entry absent from the installed header has a literal, and uapi.ts equals it', () => {
      const keys = absentKeys();
      const ts = Object.fromEntries(keys.map((k) => [k, TS_VALUES[k]!]));
      const r = compare(KERNEL_VALUES, ts);
      expect(r.mismatches).toEqual([]);
      expect(r.checked).toEqual(keys);
    });

    it('the literals agree with the installed header wherever it defines them (controls)', () => {
      const defined = Object.keys(KERNEL_VALUES).filter((k) => typeof probe().values[k] === 'number');
      expect(defined.length).toBeGreaterThan(0);
      const r = compare(probe().values, Object.fromEntries(defined.map((k) => [k, KERNEL_VALUES[k]!])));
      expect(r.mismatches).toEqual([]);
    });

    it('the literal layouts agree with the installed header wherever it defines the struct', () => {
      const problems: string[] = [];
      let compared = 0;
      for (const s of SAMPLES) {
        const c = probe().samples[s.name];
        const layout = KERNEL_LAYOUTS[s.struct];
        if (!c || !layout) continue;
        if (c.size !== layout.size)
          problems.push(`${s.name}: sizeof ${c.size} in the header, ${layout.size} in the literal`);
        for (const [m, [off]] of Object.entries(c.fields)) {
          const lit = layout.offsets[m];
          if (lit === undefined) continue;
          compared++;
          if (lit !== off) problems.push(`${s.name}.${m}: offset ${off} in the header, ${lit} in the literal`);
        }
      }
      expect(problems).toEqual([]);
      expect(compared).toBeGreaterThan(0); // kvm_run's exit_reason at least
    });

    it('every sample has a reference, from the header or from the kernel layouts', () => {
      for (const s of SAMPLES) expect(sample(s.name).hex.length).toBeGreaterThan(0);
    });
  });

  describe('byte layouts against C structs filled field by field', () => {
    it('sample widths match the C member sizes', () => {
      const problems: string[] = [];
      for (const s of SAMPLES) {
        const c = probe().samples[s.name];
        if (!c) continue;
        for (const f of s.fields)
          if (c.fields[f.m]![1] !== f.w)
            problems.push(`${s.name}.${f.m}: ${c.fields[f.m]![1]} bytes in C, ${f.w} in the sample`);
      }
      expect(problems).toEqual([]);
    });

    it('regs.ts: decodeRegs reads C kvm_regs field by field; encodeRegs writes the same bytes', () => {
      const c = bytesOf('kvm_regs');
      expect(compare(fieldValues(regsFields(REGS)), fieldValues(regsFields(decodeRegs(c)))).mismatches).toEqual([]);
      expectBytes('kvm_regs', encodeRegs(REGS));
    });

    it('regs.ts: decodeSregs reads C kvm_sregs field by field; encodeSregs writes the same bytes', () => {
      const c = bytesOf('kvm_sregs');
      const r = compare(fieldValues(sregsFields(SREGS)), fieldValues(sregsFields(decodeSregs(c))));
      expect(r.mismatches).toEqual([]);
      expect(r.checked.length).toBe(8 * 12 + 4 + 7 + 4);
      expectBytes('kvm_sregs', encodeSregs(SREGS));
    });

    it('kvm.ts: KVM_SET_USER_MEMORY_REGION and KVM_SET_USER_MEMORY_REGION2 arguments', () => {
      const vm = newVm();
      vm.setUserMemoryRegion(SLOT, 3, GPA, BigInt(SLOT_SIZE), HVA, AS_ID);
      expectBytes('kvm_userspace_memory_region', lastCall(U.IOCTL.KVM_SET_USER_MEMORY_REGION));
      vm.setUserMemoryRegion2(SLOT, 5, GPA, BigInt(SLOT_SIZE), HVA, GMEM_FD, GMEM_OFFSET, AS_ID);
      expectBytes('kvm_userspace_memory_region2', lastCall(U.IOCTL.KVM_SET_USER_MEMORY_REGION2));
    });

    it('kvm.ts: KVM_GET_DIRTY_LOG and KVM_CLEAR_DIRTY_LOG arguments', () => {
      const vm = newVm();
      vm.slots.set(
        `${AS_ID}:${SLOT}`,
        new Memslot(fakeTarget, SLOT, AS_ID, GPA, SLOT_SIZE, 0, new ArrayBuffer(0), HVA, -1, { kind: 'anon' }),
      );
      fake.state.address = BITMAP_ADDR;
      vm.getDirtyLog(SLOT, AS_ID);
      expectBytes('kvm_dirty_log', lastCall(U.IOCTL.KVM_GET_DIRTY_LOG));
      vm.clearDirtyLog(SLOT, CLEAR.first, CLEAR.num, undefined, AS_ID);
      expectBytes('kvm_clear_dirty_log', lastCall(U.IOCTL.KVM_CLEAR_DIRTY_LOG));
    });

    it('kvm.ts: KVM_ENABLE_CAP argument', () => {
      newVm().enableCap(ENABLE_CAP.cap, ENABLE_CAP.args, ENABLE_CAP.flags);
      expectBytes('kvm_enable_cap', lastCall(U.IOCTL.KVM_ENABLE_CAP));
    });

    it('kvm.ts: KVM_TRANSLATE argument in and result out', () => {
      const v = newVcpu();
      for (const [out, expected] of [
        [
          'kvm_translation (out a)',
          { gva: GVA, gpa: 0x0000001234567000n, valid: true, writeable: false, usermode: true },
        ],
        [
          'kvm_translation (out b)',
          { gva: GVA, gpa: 0x00000000fee00000n, valid: false, writeable: true, usermode: false },
        ],
      ] as const) {
        fake.state.reply = (_req, buf) => (buf.set(bytesOf(out).subarray(0, buf.length)), 0);
        expect(v.translate(GVA)).toEqual(expected);
        expectBytes('kvm_translation (in)', lastCall(U.IOCTL.KVM_TRANSLATE));
      }
    });

    it('kvm.ts: KVM_CREATE_GUEST_MEMFD and KVM_SET_MEMORY_ATTRIBUTES arguments', () => {
      const vm = newVm();
      fake.state.reply = () => 55;
      expect(vm.createGuestMemfd(GMEM_SIZE, GMEM_FLAGS)).toBe(55);
      expectBytes('kvm_create_guest_memfd', lastCall(U.IOCTL.KVM_CREATE_GUEST_MEMFD));
      fake.state.reply = undefined;
      vm.setMemoryAttributes(ATTR.gpa, ATTR.size, ATTR.attributes);
      expectBytes('kvm_memory_attributes', lastCall(U.IOCTL.KVM_SET_MEMORY_ATTRIBUTES));
    });

    it('kvm.ts: KVM_PRE_FAULT_MEMORY argument in and bytes left out', () => {
      fake.state.reply = (_req, buf) => (buf.set(bytesOf('kvm_pre_fault_memory (out)').subarray(0, buf.length)), 0);
      expect(newVcpu().preFault(PREFAULT.gpa, PREFAULT.size)).toBe(PREFAULT.left);
      expectBytes('kvm_pre_fault_memory (in)', lastCall(U.IOCTL.KVM_PRE_FAULT_MEMORY));
    });

    it('kvm.ts: KVM_SET_CPUID2 argument and KVM_GET_CPUID2 decoding', () => {
      const v = newVcpu();
      v.setCpuid(CPUID);
      expectBytes('kvm_cpuid2 + 2 entries', lastCall(U.IOCTL.KVM_SET_CPUID2));
      fake.state.reply = (_req, buf) => (buf.set(bytesOf('kvm_cpuid2 + 2 entries')), 0);
      expect(v.getCpuid()).toEqual(CPUID);
    });

    it('kvm.ts: KVM_SET_MSRS argument, KVM_GET_MSRS argument and decoding', () => {
      const v = newVcpu();
      fake.state.reply = () => MSRS.size;
      v.setMsrs(MSRS);
      expectBytes('kvm_msrs + 2 entries', lastCall(U.IOCTL.KVM_SET_MSRS));
      fake.state.reply = (_req, buf) => (buf.set(bytesOf('kvm_msrs + 2 entries')), MSRS.size);
      expect(v.getMsrs([...MSRS.keys()])).toEqual(MSRS);
      expectBytes('kvm_msrs + 2 entries (indices only)', lastCall(U.IOCTL.KVM_GET_MSRS));
    });

    it('kvm.ts: the dirty ring is mapped at KVM_DIRTY_LOG_PAGE_OFFSET, harvested and reset in C layout', () => {
      const ring = ['#0', '#1', '#2', '#3'].map((n) => bytesOf(`kvm_dirty_gfn ${n}`));
      const entry = ring[0]!.length;
      const map = new Uint8Array(ring.length * entry);
      ring.forEach((b, i) => map.set(b, i * entry));
      fake.state.mmapBuffer = map.buffer;
      const vm = newVm();
      vm.dirtyRingBytes = map.length;
      expect(newVcpu(vm).harvestDirtyRing()).toEqual([
        { slot: 5, asId: 1, offset: 0x1234n },
        { slot: 2, asId: 0, offset: 0x00000007ffff0001n },
      ]);
      const pageOffset = probe().values['uapi.KVM_DIRTY_LOG_PAGE_OFFSET'];
      expect(fake.state.mmaps.at(-1)).toEqual({ len: map.length, offset: Number(pageOffset) * 4096 });
      const after = ['#0 (reset)', '#1 (reset)', '#2', '#3'].map((n) => bytesOf(`kvm_dirty_gfn ${n}`));
      const expected = new Uint8Array(map.length);
      after.forEach((b, i) => expected.set(b, i * entry));
      expect(byteDiff('dirty ring', expected, map, sample('kvm_dirty_gfn #0').fields)).toEqual([]);
    });

    it('stats.ts: parses a stats fd image laid out with the C structs', () => {
      const header = bytesOf('kvm_stats_header');
      const descs = [0, 1, 2, 3, 4].map((i) => bytesOf(`kvm_stats_desc #${i}`));
      const names = ['pages_4k', 'halt_wait_hist', 'exit_log_hist', 'guest_mode', 'exits'];
      const descSize = descs[0]!.length + STATS.nameSize; // sizeof(struct kvm_stats_desc) + name_size
      const nameAt = probe().values['kvm_stats_desc.name (stats.ts: SIZEOF.kvm_stats_desc)'];
      expect(typeof nameAt).toBe('number');
      const image = new Uint8Array(STATS.dataOffset + 80);
      image.set(header, 0);
      image.set(Buffer.from(STATS.id, 'latin1'), STATS.idOffset);
      descs.forEach((d, i) => {
        image.set(d, STATS.descOffset + i * descSize);
        image.set(Buffer.from(names[i]!, 'latin1'), STATS.descOffset + i * descSize + Number(nameAt));
      });
      expect(STATS.descOffset + descs.length * descSize).toBeLessThanOrEqual(STATS.dataOffset);
      const data = new DataView(image.buffer, STATS.dataOffset);
      for (let i = 0; i < 10; i++) data.setBigUint64(8 * i, 0x1000n + BigInt(i), true);

      const all = parseStatsLayout((len, pos) => image.slice(pos, pos + len));
      expect(all.header).toEqual({
        flags: 0,
        nameSize: STATS.nameSize,
        numDesc: STATS.numDesc,
        id: STATS.id,
        descOffset: STATS.descOffset,
        dataOffset: STATS.dataOffset,
      });
      expect(all.descs).toEqual([
        { name: 'pages_4k', type: 'peak', unit: 'bytes', base: 2, exponent: -3, size: 1, offset: 8, bucketSize: 0 },
        {
          name: 'halt_wait_hist',
          type: 'linear_hist',
          unit: 'seconds',
          base: 10,
          exponent: -9,
          size: 4,
          offset: 16,
          bucketSize: 7,
        },
        {
          name: 'exit_log_hist',
          type: 'log_hist',
          unit: 'cycles',
          base: 10,
          exponent: 0,
          size: 2,
          offset: 48,
          bucketSize: 0,
        },
        {
          name: 'guest_mode',
          type: 'instant',
          unit: 'boolean',
          base: 10,
          exponent: 0,
          size: 1,
          offset: 64,
          bucketSize: 0,
        },
        { name: 'exits', type: 'cumulative', unit: 'none', base: 10, exponent: 0, size: 1, offset: 0, bucketSize: 0 },
      ]);
      const values = decodeStatValues(all.descs, image.subarray(STATS.dataOffset));
      expect(values.get('pages_4k')).toBe(0x1001n);
      expect(values.get('halt_wait_hist')).toEqual([0x1002n, 0x1003n, 0x1004n, 0x1005n]);
      expect(values.get('guest_mode')).toBe(0x1008n);
    });

    describe('exits.ts: decodeExit on kvm_run images filled in C', () => {
      const image = (name: string) => {
        const b = new Uint8Array(8192);
        b.set(bytesOf(name));
        return b;
      };
      it('io (data at data_offset)', () => {
        const b = image('kvm_run: io');
        b.set([1, 2, 3, 4, 5, 6], 4096);
        expect(decodeExit(new DataView(b.buffer))).toEqual({
          reason: 'io',
          direction: 'out',
          port: 0x3f8,
          size: 2,
          count: 3,
          dataOffset: 4096,
          data: new Uint8Array([1, 2, 3, 4, 5, 6]),
        });
      });
      it('mmio', () => {
        expect(decodeExit(new DataView(image('kvm_run: mmio').buffer))).toEqual({
          reason: 'mmio',
          gpa: 0xd0000128n,
          len: 8,
          isWrite: true,
          data: new Uint8Array([0xa1, 0xb2, 0xc3, 0xd4, 0xe5, 0xf6, 0x07, 0x18]),
        });
      });
      it('internal error', () => {
        expect(decodeExit(new DataView(image('kvm_run: internal').buffer))).toEqual({
          reason: 'internal_error',
          suberror: 1,
          data: [0x1111n, 0x2222000000000000n, 0x33n],
        });
      });
      it('fail_entry', () => {
        expect(decodeExit(new DataView(image('kvm_run: fail_entry').buffer))).toEqual({
          reason: 'fail_entry',
          hardwareReason: 0x80000021n,
          cpu: 5,
        });
      });
      it('system_event', () => {
        expect(decodeExit(new DataView(image('kvm_run: system_event').buffer))).toEqual({
          reason: 'system_event',
          type: 2,
          data: [0xabcdn, 0x0123456789n],
        });
      });
      it('exception', () => {
        expect(decodeExit(new DataView(image('kvm_run: ex').buffer))).toEqual({
          reason: 'exception',
          exception: 13,
          errorCode: 0x18,
        });
      });
      it('memory_fault', () => {
        expect(decodeExit(new DataView(image('kvm_run: memory_fault').buffer))).toEqual({
          reason: 'memory_fault',
          flags: 8n,
          gpa: 0x0000000180000000n,
          size: 0x1000n,
          private: true,
        });
      });
    });
  });

  describe('the oracle reports wrong values', () => {
    it('a wrong ioctl number or size is reported by the comparison used above', () => {
      const p = probe();
      // KVM_GET_REGS as if kvm_regs were 152 bytes: _IOR(KVMIO, 0x81, 152).
      const wrong = {
        'IOCTL.KVM_GET_REGS': 2 * 2 ** 30 + 152 * 2 ** 16 + 0xae81,
        'SIZEOF.kvm_sregs': 320,
        'PROT.READ': 1,
      };
      const r = compare(p.values, wrong);
      expect(r.checked).toEqual(['PROT.READ']);
      expect(r.mismatches).toEqual([
        `IOCTL.KVM_GET_REGS: reference ${fmt(U.IOCTL.KVM_GET_REGS)}, TypeScript ${fmt(0x8098ae81)}`,
        'SIZEOF.kvm_sregs: reference 0x138 (312), TypeScript 0x140 (320)',
      ]);
    });

    it('a wrong value for an entry the installed header lacks is reported against the kernel literal', () => {
      // KVM_PRE_FAULT_MEMORY as if the struct had no padding (24 bytes): _IOWR(KVMIO, 0xd5, 24).
      const r = compare(KERNEL_VALUES, { 'IOCTL.KVM_PRE_FAULT_MEMORY': 0xc018aed5, 'RUN.memory_fault_gpa': 48 });
      expect(r.mismatches).toEqual([
        `IOCTL.KVM_PRE_FAULT_MEMORY: reference ${fmt(0xc040aed5)}, TypeScript ${fmt(0xc018aed5)}`,
        'RUN.memory_fault_gpa: reference 0x28 (40), TypeScript 0x30 (48)',
      ]);
      expect(compare(KERNEL_VALUES, { 'CAP.KVM_CAP_NOT_A_CAP': 1 }).mismatches).toEqual([
        'CAP.KVM_CAP_NOT_A_CAP: no reference value (TypeScript 0x1 (1))',
      ]);
    });

    it('a struct encoded with a field at the wrong offset is reported by field name', () => {
      const s = sample('kvm_sregs');
      const good = fromHex(s.hex);
      // An encoder that writes cr3 over cr2, as if its CR offset were one slot early.
      const bad = good.slice();
      const [cr3] = s.fields['cr3']!;
      bad.copyWithin(cr3 - 8, cr3, cr3 + 8);
      expect(byteDiff('kvm_sregs', good, bad, s.fields)).toEqual([
        `kvm_sregs.cr2 at ${cr3 - 8}..${cr3 - 1}: reference ${hexOf(good.subarray(cr3 - 8, cr3))}, TypeScript ${hexOf(good.subarray(cr3, cr3 + 8))}`,
      ]);
      // A decoder that reads cr3 into cr2, seen by the field-by-field comparison.
      const decoded: Sregs = { ...SREGS, cr2: SREGS.cr3 };
      expect(compare(fieldValues(sregsFields(SREGS)), fieldValues(sregsFields(decoded))).mismatches).toEqual([
        `cr2: reference ${fmt(SREGS.cr2)}, TypeScript ${fmt(SREGS.cr3)}`,
      ]);
    });
  });

  it('summary: what was checked against which header', () => {
    const p = probe();
    const headerValues = Object.keys(TS_VALUES).filter((k) => typeof p.values[k] === 'number').length;
    const kernelValues = absentKeys().length;
    const fieldsFrom = (source: 'header' | 'kernel') => {
      const set = new Set<string>();
      for (const s of SAMPLES) {
        const ref = sample(s.name);
        if (ref.source === source) for (const m of Object.keys(ref.fields)) set.add(`${s.struct}.${m}`);
      }
      return set.size;
    };
    const lines = [
      `installed <linux/kvm.h> (Linux ${p.header}): ${headerValues} constants/sizes/offsets from uapi.ts, ${fieldsFrom('header')} struct fields in ${SAMPLES.filter((s) => p.samples[s.name]).length} sample structs`,
      `kernel uapi literals: ${kernelValues} constants/sizes/offsets from uapi.ts, ${fieldsFrom('kernel')} struct fields in ${SAMPLES.filter((s) => !p.samples[s.name]).length} sample structs`,
    ];
    console.log(lines.join('\n'));
    expect(headerValues + kernelValues).toBe(ENTRIES.length);
  });
});

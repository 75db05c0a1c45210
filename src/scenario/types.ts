// A scenario is data: memslots, the guest's paging mode, mappings, and a
// program of guest and host steps, with optional explicit expectations that
// override the model. This file is the validated, normalised form; the JSON
// form (addresses as "0x..." strings or safe integers) is described by
// schema.ts and docs/scenarios.md.
import type { BackingName } from '../model/vm.js';
import type { StatExpect } from './stats.js';

export type PageSize = '4K' | '2M' | '1G';
export type AccessKind = 'read' | 'write' | 'exec';

export interface PteAttrs {
  /** Present (default true). */
  p: boolean;
  /** Writable (R/W). */
  w: boolean;
  /** User (U/S). */
  u: boolean;
  /** Execute-disable (bit 63). */
  nx: boolean;
  a: boolean;
  d: boolean;
  g: boolean;
  pwt: boolean;
  pcd: boolean;
  /** Protection key 0..15 (leaf only). */
  pkey: number;
}

/** Raw bits applied after the attributes: value = (value & ~clear) | set. */
export interface RawBits {
  /** 1 = 4K PTE ... 4/5 = root entry, as KVM counts. */
  level: number;
  set: bigint;
  clear: bigint;
}

export interface Mapping {
  gva: bigint;
  gpa: bigint;
  /** Bytes; a multiple of the page size. */
  size: bigint;
  page: PageSize;
  leaf: PteAttrs;
  /** Attributes of the non-leaf entries this mapping creates. */
  table: PteAttrs;
  raw: RawBits[];
}

export interface MemslotDecl {
  slot: number;
  gpa: bigint;
  size: bigint;
  backing: BackingName;
  logDirty: boolean;
  readonly: boolean;
  /** (HVA - GPA) mod modulo = offset; absent: wherever mmap puts the memory. */
  hva?: { modulo: '2M' | '1G'; offset: bigint };
  /** 'by-step': KVM gets the slot at its memslot-create step, not before the first step. */
  created: 'at-start' | 'by-step';
}

export interface PagingDecl {
  levels: 4 | 5;
  cr0: { wp: boolean };
  cr4: { smep: boolean; smap: boolean; pke: boolean };
  efer: { nxe: boolean };
  pkru: number;
  /** Model vendor; 'auto' takes it from the guest's CPUID. */
  vendor: 'auto' | 'intel' | 'amd';
}

/** What a guest access is expected to do, overriding the model where given. */
export interface AccessExpect {
  /** false = no fault; a number = #PF with this error code. */
  fault?: false | number;
  /** Value a read returns (bytes of the access size, little-endian). */
  value?: bigint;
  /** PTE values after the step, by level. */
  ptes?: { level: number; value: bigint }[];
}

/** Rewrites one page-table entry (by the guest itself when a guest step, by the VMM when a host step). */
export type PteWriteStep = {
  kind: 'write-pte';
  gva: bigint;
  level: number;
  set: bigint;
  clear: bigint;
  value?: bigint;
};
/** Clears A and D in every entry the walk of `gva` reads. */
export type ClearAdStep = { kind: 'clear-ad'; gva: bigint };

export type GuestStep =
  | PteWriteStep
  | ClearAdStep
  | {
      kind: 'access';
      access: AccessKind;
      gva: bigint;
      size: 1 | 2 | 4 | 8;
      cpl: 0 | 3;
      value: bigint;
      eflagsAc: boolean;
      /** A read made as an implicit supervisor access: the processor loads a segment descriptor from an LDT at gva. */
      implicit?: boolean;
      /** A loop: the access is made `count` times, at gva, gva + stride, ...; it stops at the first fault. */
      loop?: { count: number; stride: bigint };
      expect?: AccessExpect;
    }
  | { kind: 'invlpg'; gva: bigint }
  | { kind: 'reload-cr3' }
  | { kind: 'set-cr0-wp'; value: boolean }
  | { kind: 'set-cr4'; bit: 'smep' | 'smap' | 'pke'; value: boolean };

export type HostStep =
  | PteWriteStep
  | ClearAdStep
  | { kind: 'get-dirty-log'; slot: number; expect?: bigint[] }
  | { kind: 'clear-dirty-log'; slot: number }
  | { kind: 'translate'; gva: bigint; expect?: { valid: boolean; gpa?: bigint } }
  /** KVM_SET_USER_MEMORY_REGION with size 0; the host memory is freed. */
  | { kind: 'memslot-delete'; slot: number }
  /** Allocates a slot declared "created": "by-step" and hands it to KVM. */
  | { kind: 'memslot-create'; slot: number }
  /** The host writes `value` (8 bytes, little-endian) to every 8-byte word of [gpa, gpa+size) through the slot's HVA. */
  | { kind: 'write-memory'; gpa: bigint; size: bigint; value: bigint }
  /** The slot's host memory now appears at `gpa`. */
  | { kind: 'memslot-move'; slot: number; gpa: bigint }
  | { kind: 'memslot-flags'; slot: number; logDirty: boolean; readonly: boolean }
  /** madvise() on [offset, offset+size) of the slot's host memory. */
  | { kind: 'madvise'; slot: number; offset: bigint; size: bigint; advice: 'dontneed' | 'hugepage' | 'nohugepage' }
  /** munmap() of [offset, offset+size) of the slot's host memory; the slot stays. */
  | { kind: 'munmap'; slot: number; offset: bigint; size: bigint }
  /** mmap(MAP_FIXED) of fresh memory of the slot's backing kind over a range an earlier munmap took away. */
  | { kind: 'remap'; slot: number; offset: bigint; size: bigint }
  | { kind: 'mprotect'; slot: number; offset: bigint; size: bigint; prot: 'none' | 'read' | 'read-write' }
  /** KVM_PRE_FAULT_MEMORY of [gpa, gpa+size) (where the host has KVM_CAP_PRE_FAULT_MEMORY). */
  | { kind: 'pre-fault'; gpa: bigint; size: bigint }
  /** fallocate(PUNCH_HOLE | KEEP_SIZE) of [offset, offset+size) of a memfd or guest_memfd slot's file. */
  | { kind: 'punch-hole'; slot: number; offset: bigint; size: bigint }
  /** The VMM reads `size` bytes at `gpa` through its own mapping of the slot; they must equal `expect`. */
  | { kind: 'read-memory'; gpa: bigint; size: 1 | 2 | 4 | 8; expect: bigint }
  /** The slot's guest_memfd is unmapped and closed; the slot stays. */
  | { kind: 'close-guest-memfd'; slot: number };

/** Expected changes of KVM stats over a step, by stat name (see stats.ts). */
export type StepStats = Record<string, StatExpect>;

/**
 * What KVM's host-dimension MMU maps for one page after a step, as the per-GFN
 * picture shows it (run/tdp-follow.ts); only the fields given are checked.
 */
export interface TdpExpect {
  /** GPA of the page (4K aligned). */
  gpa: bigint;
  /** Mapped by a present leaf or an MMIO SPTE. */
  present?: boolean;
  level?: number;
  writable?: boolean;
  executable?: boolean;
  mmio?: boolean;
}

export type Step = (({ side: 'guest' } & GuestStep) | ({ side: 'host' } & HostStep)) & {
  stats?: StepStats;
  tdp?: TdpExpect[];
};

/** What the host does to one race target in every round of a race. */
export type RaceOp = 'dirty-log' | 'dontneed' | 'toggle-dirty-log' | 'delete';

/**
 * A race: every vCPU writes its own pages of each target over and over while
 * the host runs `rounds` rounds of the targets' operations; then a final pass.
 */
export interface RaceDecl {
  /** Pages per vCPU in each target. */
  pages: number;
  rounds: number;
  /** Privilege level the vCPUs' loops run at. */
  cpl: 0 | 3;
  targets: { slot: number; gva: bigint; host: RaceOp[] }[];
}

export interface Scenario {
  name: string;
  description: string;
  arch: 'x86_64';
  vcpus: number;
  /** A multi-vCPU race instead of steps (src/run/race.ts). */
  race?: RaceDecl;
  memslots: MemslotDecl[];
  paging: PagingDecl;
  mappings: Mapping[];
  steps: Step[];
  /** Path of the file it came from, for messages. */
  source?: string;
}

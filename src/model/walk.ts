// Pure model of the x86 long-mode page walk (GVA -> GPA) for 4-level and 5-level
// paging, written to agree bit for bit with KVM's software walker
// (arch/x86/kvm/mmu/paging_tmpl.h, FNAME(walk_addr_generic), PTTYPE 64) and with
// the architecture (Intel SDM vol. 3A ch. 4, AMD APM vol. 2 ch. 5).
//
// What the walker returns for one access:
//   * every entry it read, root first, up to and including the one that ended the
//     walk (KVM emits one kvm_mmu_paging_element tracepoint per entry read);
//   * on success, the GPA, page size, effective U/W/X and the Accessed/Dirty
//     updates in the order KVM performs them (kvm_mmu_set_accessed_bit /
//     kvm_mmu_set_dirty_bit tracepoints);
//   * on a #PF, the error code KVM injects (kvm_mmu_walker_error) and CR2.
//
// Rules, with the source each one comes from:
//
// Order of checks per level (walk_addr_generic): read the entry; if P = 0 stop
//   with a not-present fault; else if a reserved bit is set stop with
//   error code RSVD|P; else, if the entry is a leaf (level 1, or PS = 1 at level
//   2/3) stop descending. Permission checks happen once, on the accumulated
//   rights, after the leaf is found (permission_fault, arch/x86/kvm/mmu.h).
//   SDM §4.7: "no translation" (P = 0 or reserved bit) is reported before rights.
//
// Reserved bits (KVM __reset_rsvds_bits_mask / __is_rsvd_bits_set, mmu.c; SDM
//   tables 4-14..4-20; APM figures 5-18..5-25). M = maxPhyAddr:
//     every level: bits 51:M; bit 63 when EFER.NXE = 0.
//     PML5E, PML4E: bit 7 (PS); on AMD also bit 8 (APM: MBZ in PML4E; Intel ignores
//       it). KVM applies the AMD rule from the *guest* CPUID vendor.
//     PDPTE with PS = 1: bits 29:13; and bit 7 itself when 1 GiB pages are not
//       enumerated (CPUID 0x80000001 EDX[26]).
//     PDE with PS = 1: bits 20:13.
//     PTE: none beyond the common ones (bit 7 is PAT).
//   Bits 62:52 are never reserved in 4/5-level paging (ignored, or the protection
//   key in bits 62:59 of a leaf when CR4.PKE = 1). AMD does not reserve bit 8 of a
//   PDPTE or PDE: KVM once did (commit a0c0feb57992) and dropped it for PDPTEs in
//   commit 5ecad245de2a. The comment above nonleaf_bit8_rsvd in mmu.c still says
//   "PML4Es and PDPEs" although the code applies the bit only to PML4Es and PML5Es;
//   the model follows the code and the APM.
//
// Effective rights (SDM §4.6, APM §5.6): W = AND of R/W, U = AND of U/S over every
//   entry used, XD = OR of bit 63 (only when EFER.NXE = 1). The protection key is
//   the leaf's bits 62:59.
//
// Access checks (permission_fault + update_permission_bitmask + update_pkru_bitmask):
//   user-mode access (CPL 3, not an implicit supervisor access):
//     fault if U = 0; fault if write and W = 0.
//   supervisor-mode access (CPL 0, or any implicit supervisor access such as a
//   descriptor-table or TSS read, even from CPL 3):
//     write and W = 0 faults only if CR0.WP = 1;
//     SMEP: fetch from a user page (U = 1) faults when CR4.SMEP = 1;
//     SMAP: data access to a user page faults when CR4.SMAP = 1, unless the access
//       is explicit, CPL < 3 and EFLAGS.AC = 1. Implicit supervisor accesses are
//       always checked (SDM §4.6.1).
//   fetch: faults if XD (EFER.NXE = 1 only; with NXE = 0 a set bit 63 is reserved).
//   protection keys (CR4.PKE = 1, data access, U = 1 over the whole walk): PKRU.AD
//     of the leaf's key faults any data access; PKRU.WD faults a write if it is a
//     user-mode access or CR0.WP = 1. A key fault sets PK in addition to whatever
//     other protection fault happened (SDM §4.7 defines PK independently).
//
// Error code (walk_addr_generic "error:" label):
//   not present:     W|U|I as applicable, P = 0
//   reserved bit:    RSVD|P |W|U|I
//   protection:      P |PK (if a key fault) |W|U|I
//   W when the access is a write; U when it is a user-mode access (an implicit
//   supervisor access from CPL 3 has U = 0, as on hardware); I when the access is a
//   fetch and (EFER.NXE = 1 or CR4.SMEP = 1) — SDM §4.7 I/D flag; KVM tests
//   is_efer_nx() || is_cr4_smep(). CR2 = the faulting linear address.
//
// Accessed/Dirty (update_accessed_dirty_bits):
//   Only after a walk that ends with no fault. KVM computes the A/D update after
//   permission_fault() returned 0, so a faulting walk changes no entry: the model's
//   adWrites is [] for every fault. The architecture allows this: SDM §4.8 sets A
//   on entries "used as part of linear-address translation" and a faulting walk
//   produces no translation; D is set only by a write that happens. What hardware
//   does to A on a faulting walk is not pinned down: the note under "Interrupt 14"
//   in SDM §6.15 says the PDE's A is set on a protection fault and the PTE's is
//   model specific, and kvm-unit-tests x86/access.c ignores pde.A (but checks that
//   pte.A stays clear) on faulting accesses. KVM sets none; see the note at the end.
//   On success: A is set on every entry lacking it; D on the leaf of a write when
//   clear. KVM loops level = max_level down to the leaf level, i.e. root first,
//   and does one cmpxchg per entry that changes (A and D of the leaf together), so
//   adWrites lists changed entries root first, each with old and new values.
//   KVM skips writing entries that sit in a read-only memslot; the model assumes
//   guest page tables live in writable RAM.
//
// Non-canonical linear addresses never reach the page walk: the access raises #GP
//   (or #SS for stack accesses) without loading CR2. The model returns
//   { ok: false, errorCode: -1, reason: 'non-canonical', cr2: gva, levels: [],
//   adWrites: [] }; cr2 then only echoes the address. Canonical means bits 63:47
//   equal (4-level) or bits 63:56 equal (5-level, CR4.LA57), for the first and the
//   last byte of the access when `size` is given.
//
// Scope: one linear address per call. An access that crosses a page boundary has to
// be split by the caller (the processor translates each page separately).
// readPte(gpa) must return the entry as an unsigned 64-bit value (0 for missing memory).
//
// Where KVM and the architecture differ (or might), as far as this walker is concerned:
//   * A bits on a faulting walk: see above. KVM never sets A on a faulting walk;
//     a processor may set A on the upper entries it used (SDM §6.15 note, §4.10.3:
//     paging-structure caches may be filled, after setting A, even when no
//     translation results). The architecture permits both for 4/5-level paging, so
//     the model follows KVM (empty adWrites) and this is recorded, not flagged.
//   * SMAP and implicit accesses: KVM's permission_fault() decides "not subject to
//     SMAP" from EFLAGS.AC and the PFERR_IMPLICIT_ACCESS flag of its synthetic
//     access code. On the shadow-paging #PF path the access code is the hardware
//     error code, which has no implicit flag, so an implicit supervisor access with
//     EFLAGS.AC = 1 (at CPL 0, or at CPL 3 since the CPL term was dropped in favour
//     of PFERR_IMPLICIT_ACCESS) is judged as an explicit one with the SMAP override.
//     The architecture always applies SMAP to implicit accesses; the model follows
//     the architecture (implicitSupervisor: true). Read from the source, not yet
//     confirmed by a run: a mismatch here in a live comparison is a finding.

import { physAddrRsvdMask, PTE_A, PTE_D, bitRange, PTE_NX, PTE_PS, PTE_G } from '../arch/x86/pte.js';
import type { WrongWalk } from './wrong.js';

export type Vendor = 'intel' | 'amd';
export type AccessKind = 'read' | 'write' | 'exec';

/**
 * Who walks the guest's page tables when the guest accesses memory.
 * - 'kvm': KVM's software walker (shadow paging: every guest #PF goes through
 *   it). The model's rules are KVM's.
 * - 'cpu': the processor, under TDP (EPT/NPT). Same rules, except that a
 *   processor may set A on the entries a faulting walk used (see "A bits on a
 *   faulting walk" below): accessedLatitude() names them.
 * - 'qemu-tcg': QEMU's TCG emulating the processor (the lab's kernels under
 *   test run on it). As 'cpu', and TCG's own deviations from the architecture,
 *   measured in the lab (README, Findings): a reserved-bit #PF has P = 0 in its
 *   error code; bit 8 of an AMD PML4E is not reserved; A may also be set on
 *   the entry whose reserved bit ended the walk.
 */
export type GuestWalker = 'kvm' | 'cpu' | 'qemu-tcg';

export interface PagingConfig {
  levels: 4 | 5;
  /** Guest CPUID vendor (KVM keys the AMD reserved-bit rule on guest_cpuid_is_amd_or_hygon). */
  vendor: Vendor;
  /** Guest MAXPHYADDR, e.g. 48 or 52. */
  maxPhyAddr: number;
  cr0Wp: boolean;
  cr4Smep: boolean;
  cr4Smap: boolean;
  cr4Pke: boolean;
  efer: { nxe: boolean };
  /** 1 GiB pages supported (CPUID 0x80000001 EDX[26]); without it PS = 1 in a PDPTE is a reserved-bit fault. */
  pdpe1gb: boolean;
  /** PKRU, 32 bits: AD of key i is bit 2i, WD is bit 2i+1. */
  pkru: number;
  /** Who walks the guest's tables (default 'kvm'). */
  walker?: GuestWalker;
}

export interface Access {
  gva: bigint;
  kind: AccessKind;
  cpl: 0 | 3;
  /** EFLAGS.AC; overrides SMAP for explicit supervisor data accesses at CPL < 3. */
  eflagsAc?: boolean;
  /** Implicit supervisor-mode access (GDT/LDT/IDT/TSS reads, ...): supervisor mode whatever the CPL, always subject to SMAP. */
  implicitSupervisor?: boolean;
  /** Access size in bytes; only used for the canonical check of the last byte. */
  size?: number;
}

/** One entry read by the walk. level: 5/4 = root ... 1 = 4 KiB PTE, as KVM counts. */
export interface WalkLevel {
  level: number;
  pteGpa: bigint;
  pte: bigint;
  /** true when this entry maps the page (level 1, or PS = 1 at level 2/3) and the walk accepted it. */
  leaf: boolean;
}

export interface AdWrite {
  level: number;
  pteGpa: bigint;
  old: bigint;
  new: bigint;
}

export type WalkResult =
  | {
      ok: true;
      gpa: bigint;
      pageSize: bigint;
      levels: WalkLevel[];
      adWrites: AdWrite[];
      /** AND of R/W, AND of U/S, NOT(OR of XD) over the entries used (raw table rights, before CR0.WP/SMEP/SMAP/PKRU). */
      effective: { w: boolean; u: boolean; x: boolean };
    }
  | {
      ok: false;
      /** #PF error code, or NON_CANONICAL (-1) when the address is not canonical (#GP, no walk). */
      errorCode: number;
      cr2: bigint;
      levels: WalkLevel[];
      adWrites: AdWrite[];
      /** 'not-present' | 'reserved' | 'protection:<causes>' | 'non-canonical'; causes among user, write, nx, smep, smap, pk joined by ','. */
      reason: string;
    };

export const PFERR = { P: 1, W: 2, U: 4, RSVD: 8, I: 16 /* fetch */, PK: 32 } as const;

/** errorCode of a non-canonical access: not a #PF; the processor raises #GP/#SS. */
export const NON_CANONICAL = -1;

/** The exception a faulting access delivers: vector, error code and what CR2 holds after it. */
export type AccessException =
  { vector: 13; errorCode: 0; cr2: 'unchanged' } | { vector: 14; errorCode: number; cr2: bigint };

/**
 * The exception of a faulting walk. A non-canonical address never reaches the
 * walk (SDM vol. 3A §3.3.7.1): the access raises #GP(0), or #SS(0) when it is
 * a stack reference (SS-based: push, pop, RSP/RBP-based operands), which the
 * harness's accesses are not. Only #PF loads CR2 (§6.15, interrupt 14), so
 * after a #GP CR2 still holds its earlier value. Every other fault is a #PF
 * with the walk's error code and CR2 = the faulting address.
 */
export function accessException(w: Extract<WalkResult, { ok: false }>): AccessException {
  if (w.errorCode === NON_CANONICAL) return { vector: 13, errorCode: 0, cr2: 'unchanged' };
  return { vector: 14, errorCode: w.errorCode, cr2: w.cr2 };
}

export type ReadPte = (gpa: bigint) => bigint;
/** A walk under one pre-compiled configuration; `walker` is the configuration's. */
export type CompiledWalk = ((cr3: bigint, access: Access, readPte: ReadPte) => WalkResult) & {
  readonly walker: GuestWalker;
};

// ---------------------------------------------------------------------------------
// Compilation: everything derived from the configuration, as plain numbers.

interface Compiled {
  // snapshot of the source configuration, to detect a mutated cfg object
  readonly vendor: Vendor;
  readonly maxPhyAddr: number;
  readonly pdpe1gb: boolean;
  readonly levels: number;
  readonly nxe: boolean;
  readonly wp: boolean;
  readonly smep: boolean;
  readonly smap: boolean;
  readonly pke: boolean;
  readonly pkru: number;
  readonly walker: GuestWalker;
  // a reserved-bit fault's error code lacks P (qemu-tcg)
  readonly rsvdNoP: boolean;
  readonly fetchI: number; // PFERR.I when fetches report I/D, else 0
  // reserved-bit masks split in 32-bit halves, indexed level * 2 + PS
  readonly rsvdLo: Int32Array;
  readonly rsvdHi: Int32Array;
  // canonical check on the high 32 bits of the address
  readonly canonShift: number;
  readonly canonOnes: number;
  // a deliberately wrong model (wrong.ts)
  readonly ignoreWp: boolean;
  readonly noAccessedUpper: boolean;
  readonly dirtyOnRead: boolean;
  readonly ignoreNx: boolean;
  readonly rsvdAsNp: boolean;
}

/** Reserved-bit mask KVM checks for an entry at `level` whose bit 7 is `ps` (rsvd_bits_mask[ps][level-1]). */
export function reservedMask(cfg: PagingConfig, level: number, ps: 0 | 1): bigint {
  const maxPa = Math.min(Math.max(cfg.maxPhyAddr | 0, 12), 52);
  const high = physAddrRsvdMask(maxPa) | (cfg.efer.nxe ? 0n : PTE_NX);
  switch (level) {
    case 5:
    case 4:
      return high | PTE_PS | (cfg.vendor === 'amd' && cfg.walker !== 'qemu-tcg' ? PTE_G : 0n);
    case 3:
      return ps ? high | (cfg.pdpe1gb ? 0n : PTE_PS) | bitRange(13, 29) : high;
    case 2:
      return ps ? high | bitRange(13, 20) : high;
    case 1:
      return high;
    default:
      throw new RangeError(`no paging level ${level}`);
  }
}

function compile(cfg: PagingConfig, wrong?: ReadonlySet<WrongWalk>): Compiled {
  if (cfg.levels !== 4 && cfg.levels !== 5) throw new RangeError(`levels must be 4 or 5, got ${cfg.levels}`);
  const rsvdLo = new Int32Array(12);
  const rsvdHi = new Int32Array(12);
  for (let level = 1; level <= 5; level++) {
    for (const ps of [0, 1] as const) {
      const m = reservedMask(cfg, level, ps);
      rsvdLo[level * 2 + ps] = Number(m & 0xffffffffn) | 0;
      rsvdHi[level * 2 + ps] = Number(m >> 32n) | 0;
    }
  }
  const f = wrong ?? new Set<WrongWalk>();
  return {
    vendor: cfg.vendor,
    maxPhyAddr: cfg.maxPhyAddr,
    pdpe1gb: cfg.pdpe1gb,
    levels: cfg.levels,
    nxe: cfg.efer.nxe,
    wp: cfg.cr0Wp && !f.has('ignore-wp'),
    smep: cfg.cr4Smep,
    smap: cfg.cr4Smap,
    pke: cfg.cr4Pke,
    pkru: cfg.pkru >>> 0,
    walker: cfg.walker ?? 'kvm',
    rsvdNoP: cfg.walker === 'qemu-tcg',
    fetchI: cfg.efer.nxe || cfg.cr4Smep ? PFERR.I : 0,
    rsvdLo,
    rsvdHi,
    // 4-level: bits 63:47 of the address equal -> bits 31:15 of the high half
    // 5-level: bits 63:56 equal -> bits 31:24 of the high half
    canonShift: cfg.levels === 5 ? 24 : 15,
    canonOnes: cfg.levels === 5 ? 0xff : 0x1ffff,
    ignoreWp: f.has('ignore-wp'),
    noAccessedUpper: f.has('no-accessed-on-upper'),
    dirtyOnRead: f.has('dirty-on-read'),
    ignoreNx: f.has('ignore-nx'),
    rsvdAsNp: f.has('rsvd-as-not-present'),
  };
}

// ---------------------------------------------------------------------------------
// The walk.
//
// Speed: every bigint <-> number conversion goes through one 8-byte scratch buffer
// viewed both as a u64 and as two u32 halves, which costs far less than bigint
// shifts and masks. The scratch is never relied on across the readPte() call, so a
// re-entrant readPte cannot corrupt a walk.

const TWO32 = 4294967296;
const SCRATCH64 = new BigUint64Array(1);
const SCRATCH32 = new Uint32Array(SCRATCH64.buffer); // [0] = low half, [1] = high half (little endian)
if (new Uint8Array(new Uint32Array([1]).buffer)[0] !== 1) throw new Error('walk model assumes a little-endian host');
// offset mask of the page a leaf at a level maps (4 KiB, 2 MiB, 1 GiB)
const PAGE_OFFSET_MASK = [0, 2 ** 12 - 1, 2 ** 21 - 1, 2 ** 30 - 1];
const PAGE_SIZE_BIG = [0n, 1n << 12n, 1n << 21n, 1n << 30n];

// Protection-fault cause bits, and their reason strings (built once per combination).
const C_USER = 1,
  C_WRITE = 2,
  C_NX = 4,
  C_SMEP = 8,
  C_SMAP = 16,
  C_PK = 32;
const CAUSE_NAMES = ['user', 'write', 'nx', 'smep', 'smap', 'pk'];
const REASONS: string[] = [];
for (let m = 0; m < 64; m++) {
  REASONS.push(`protection:${CAUSE_NAMES.filter((_, i) => m & (1 << i)).join(',')}`);
}

function u64(lo: number, hi: number): bigint {
  SCRATCH32[0] = lo;
  SCRATCH32[1] = hi;
  return SCRATCH64[0]!;
}

function fault(errorCode: number, gLo: number, gHi: number, levels: WalkLevel[], reason: string): WalkResult {
  return { ok: false, errorCode, cr2: u64(gLo, gHi), levels, adWrites: [], reason };
}

/** Index into the table at `level` for the address whose halves are lo/hi (bits 12+9(level-1) .. +8). */
function indexAt(level: number, lo: number, hi: number): number {
  switch (level) {
    case 1:
      return (lo >>> 12) & 511;
    case 2:
      return (lo >>> 21) & 511;
    case 3:
      return ((lo >>> 30) | (hi << 2)) & 511;
    case 4:
      return (hi >>> 7) & 511;
    default:
      return (hi >>> 16) & 511;
  }
}

function isCanonical(c: Compiled, hi: number): boolean {
  const top = hi >>> c.canonShift;
  return top === 0 || top === c.canonOnes;
}

function run(c: Compiled, cr3: bigint, access: Access, readPte: ReadPte): WalkResult {
  // Split the address (stores into a BigUint64Array reduce modulo 2^64).
  SCRATCH64[0] = access.gva;
  const gLo = SCRATCH32[0]!;
  const gHi = SCRATCH32[1]!;

  // Canonical check of the first and (when a size is given) the last byte.
  let canonical = isCanonical(c, gHi);
  const size = access.size;
  if (canonical && size !== undefined && size > 1) {
    const lastLo = gLo + (size - 1);
    const lastHi = (gHi + Math.floor(lastLo / TWO32)) % TWO32;
    canonical = isCanonical(c, lastHi);
  }
  if (!canonical) return fault(NON_CANONICAL, gLo, gHi, [], 'non-canonical');

  const kind = access.kind;
  const write = kind === 'write';
  const fetch = kind === 'exec';
  const implicit = access.implicitSupervisor === true;
  const user = access.cpl === 3 && !implicit;
  const baseEc = (write ? PFERR.W : 0) | (user ? PFERR.U : 0) | (fetch ? c.fetchI : 0);

  // Root table: CR3 bits 51:12 (KVM: gpte_to_gfn on the guest pgd).
  SCRATCH64[0] = cr3;
  let tLo = (SCRATCH32[0]! & 0xfffff000) >>> 0;
  let tHi = SCRATCH32[1]! & 0xfffff;

  const levels: WalkLevel[] = [];
  let level = c.levels;
  let perm = 0x6; // R/W | U/S accumulated by AND
  let xdOr = 0; // high halves OR-ed: bit 31 = XD
  let allLo = -1; // low halves AND-ed: bit 5 = A everywhere
  let lo = 0;
  let hi = 0;
  for (;;) {
    SCRATCH32[0] = tLo + indexAt(level, gLo, gHi) * 8;
    SCRATCH32[1] = tHi;
    const pteGpa = SCRATCH64[0]!;
    const pte = readPte(pteGpa);
    SCRATCH64[0] = pte;
    lo = SCRATCH32[0]!;
    hi = SCRATCH32[1]!;

    if ((lo & 1) === 0) {
      levels.push({ level, pteGpa, pte, leaf: false });
      return fault(baseEc, gLo, gHi, levels, 'not-present');
    }
    const ps = (lo >>> 7) & 1;
    const k = level * 2 + ps;
    if ((lo & c.rsvdLo[k]!) !== 0 || (hi & c.rsvdHi[k]!) !== 0) {
      levels.push({ level, pteGpa, pte, leaf: false });
      if (c.rsvdAsNp) return fault(baseEc, gLo, gHi, levels, 'not-present');
      return fault(PFERR.RSVD | (c.rsvdNoP ? 0 : PFERR.P) | baseEc, gLo, gHi, levels, 'reserved');
    }
    // Past the reserved check, PS = 1 can only remain at level 2 or 3.
    const leaf = level === 1 || ps === 1;
    levels.push({ level, pteGpa, pte, leaf });
    perm &= lo;
    xdOr |= hi;
    allLo &= lo;
    if (leaf) break;
    tLo = (lo & 0xfffff000) >>> 0;
    tHi = hi & 0xfffff;
    level--;
  }

  // Effective rights and the access check.
  const effW = (perm & 0x2) !== 0;
  const effU = (perm & 0x4) !== 0;
  const effX = !c.nxe || c.ignoreNx || (xdOr & 0x80000000) === 0;
  const sup = !user;

  let causes = 0;
  if (user && !effU) causes |= C_USER;
  if (write && !effW && (user || c.wp)) causes |= C_WRITE;
  if (fetch) {
    if (!effX) causes |= C_NX;
    if (sup && c.smep && effU) causes |= C_SMEP;
  } else if (effU) {
    if (sup && c.smap && !(access.eflagsAc === true && !implicit && access.cpl !== 3)) causes |= C_SMAP;
    if (c.pke) {
      const rights = (c.pkru >>> (((hi >>> 27) & 0xf) * 2)) & 3; // key = leaf bits 62:59
      if ((rights & 1) !== 0 || ((rights & 2) !== 0 && write && (user || c.wp))) causes |= C_PK;
    }
  }
  if (causes !== 0) {
    const ec = PFERR.P | ((causes & C_PK) !== 0 ? PFERR.PK : 0) | baseEc;
    return fault(ec, gLo, gHi, levels, REASONS[causes]!);
  }

  // Translation: leaf frame + offset within the page.
  const offMask = PAGE_OFFSET_MASK[level]!;
  const gpa = u64(((lo & ~offMask) | (gLo & offMask)) >>> 0, hi & 0xfffff);

  // Accessed/Dirty, root first (update_accessed_dirty_bits iterates max_level down).
  const setD = (write || c.dirtyOnRead) && (lo & 0x40) === 0;
  const adWrites: AdWrite[] = [];
  if ((allLo & 0x20) === 0 || setD) {
    for (let i = 0; i < levels.length; i++) {
      const l = levels[i]!;
      let add = 0n;
      if ((l.pte & PTE_A) === 0n && (l.leaf || !c.noAccessedUpper)) add = PTE_A;
      if (l.leaf && setD) add |= PTE_D;
      if (add !== 0n) adWrites.push({ level: l.level, pteGpa: l.pteGpa, old: l.pte, new: l.pte | add });
    }
  }

  return {
    ok: true,
    gpa,
    pageSize: PAGE_SIZE_BIG[level]!,
    levels,
    adWrites,
    effective: { w: effW, u: effU, x: effX },
  };
}

// ---------------------------------------------------------------------------------
// Public entry points.

let cachedCfg: PagingConfig | undefined;
let cachedCompiled: Compiled | undefined;

function compiledFor(cfg: PagingConfig): Compiled {
  const c = cachedCompiled;
  // Re-validate field by field: the same object may have been mutated between calls.
  if (
    cfg === cachedCfg &&
    c !== undefined &&
    c.levels === cfg.levels &&
    c.nxe === cfg.efer.nxe &&
    c.wp === cfg.cr0Wp &&
    c.smep === cfg.cr4Smep &&
    c.smap === cfg.cr4Smap &&
    c.pke === cfg.cr4Pke &&
    c.pkru === cfg.pkru >>> 0 &&
    c.vendor === cfg.vendor &&
    c.maxPhyAddr === cfg.maxPhyAddr &&
    c.pdpe1gb === cfg.pdpe1gb &&
    c.walker === (cfg.walker ?? 'kvm')
  )
    return c;
  const fresh = compile(cfg);
  cachedCfg = cfg;
  cachedCompiled = fresh;
  return fresh;
}

/**
 * Translate one access. `cr3` supplies the root table (bits 51:12); `readPte`
 * reads a guest-physical quadword. Pure: it never writes guest memory; the A/D
 * updates KVM would make are returned in `adWrites`.
 */
export function walk(cfg: PagingConfig, cr3: bigint, access: Access, readPte: ReadPte): WalkResult {
  return run(compiledFor(cfg), cr3, access, readPte);
}

/** The same walk with some rules deliberately broken (test use only; wrong.ts). */
export function walkWith(
  wrong: ReadonlySet<WrongWalk>,
  cfg: PagingConfig,
  cr3: bigint,
  access: Access,
  readPte: ReadPte,
): WalkResult {
  return run(compile(cfg, wrong), cr3, access, readPte);
}

/**
 * Pre-compile a configuration (a snapshot: later changes to `cfg` are not seen).
 * The returned function is the fastest way to run many walks under one configuration.
 */
export function compileWalk(cfg: PagingConfig, wrong?: ReadonlySet<WrongWalk>): CompiledWalk {
  const c = compile(cfg, wrong);
  return Object.assign((cr3: bigint, access: Access, readPte: ReadPte) => run(c, cr3, access, readPte), {
    walker: c.walker,
  });
}

const EC_NAMES: ReadonlyArray<readonly [number, string]> = [
  [PFERR.P, 'P'],
  [PFERR.W, 'W'],
  [PFERR.U, 'U'],
  [PFERR.RSVD, 'RSVD'],
  [PFERR.I, 'I'],
  [PFERR.PK, 'PK'],
];

/**
 * Error code as flag names joined by '|', in bit order (e.g. "P|W|U").
 * 0 gives "0" (a supervisor read of a not-present page); bits without a name are
 * appended in hex; a negative value (NON_CANONICAL) gives "non-canonical".
 */
export function decodeErrorCode(ec: number): string {
  if (ec < 0) return 'non-canonical';
  if (ec === 0) return '0';
  const parts: string[] = [];
  let rest = ec >>> 0;
  for (const [bit, name] of EC_NAMES) {
    if (rest & bit) {
      parts.push(name);
      rest &= ~bit;
    }
  }
  if (rest !== 0) parts.push(`0x${(rest >>> 0).toString(16)}`);
  return parts.join('|');
}

/**
 * Entries whose A bit the guest's walker may set although the model (KVM's
 * rule: a faulting walk writes no A/D) leaves it clear: for a processor, the
 * present entries a faulting walk used — every entry of a protection fault,
 * the ones above the entry that ended a not-present or reserved-bit walk — and
 * for QEMU TCG also the reserved entry itself. Empty for KVM's walker and for
 * walks that succeed (their A/D writes are exact).
 */
export function accessedLatitude(w: WalkResult, walker: GuestWalker = 'kvm'): bigint[] {
  if (w.ok || walker === 'kvm' || w.errorCode === NON_CANONICAL) return [];
  const last = w.levels.length - 1;
  const out: bigint[] = [];
  w.levels.forEach((l, i) => {
    if ((l.pte & 1n) === 0n || (l.pte & PTE_A) !== 0n) return;
    if (i === last && w.reason === 'reserved' && walker !== 'qemu-tcg') return;
    out.push(l.pteGpa);
  });
  return out;
}

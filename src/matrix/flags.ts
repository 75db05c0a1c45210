// The access matrix's cases: one case is one 32-bit flag word naming the bits of
// the case's PTE and PDE, the access, and the control-register state it runs
// under — the class of kvm-unit-tests x86/access.c (PTE/PDE P, W, U, A, D, NX,
// PDE.PS, reserved bits 51/36/13 one at a time, a read-only PDPTE, user/write/
// fetch/twice accesses, EFER.NXE, CR0.WP, CR4.SMEP, CR4.PKE with PKRU AD/WD and a
// protection key) plus CR4.SMAP with EFLAGS.AC.
//
// The control bits are the highest bits, so numeric order groups cases by the
// control state a batch shares (see controlState()).
//
// Pure: no KVM, no I/O.
import { mulberry32 } from '../model/prng.js';

export const CASE = {
  PTE_P: 1 << 0,
  PTE_W: 1 << 1,
  PTE_U: 1 << 2,
  PTE_A: 1 << 3,
  PTE_D: 1 << 4,
  PTE_NX: 1 << 5,
  PTE_R51: 1 << 6,
  PTE_R36: 1 << 7,
  PDE_P: 1 << 8,
  PDE_W: 1 << 9,
  PDE_U: 1 << 10,
  PDE_A: 1 << 11,
  /** Bit 6 of the PDE: the dirty bit of a 2 MiB leaf, ignored in a PDE that points to a table. */
  PDE_D: 1 << 12,
  PDE_PS: 1 << 13,
  PDE_NX: 1 << 14,
  PDE_R51: 1 << 15,
  PDE_R36: 1 << 16,
  /** Bit 13 of a 2 MiB PDE (inside bits 20:13, reserved); legal only with PDE_PS. */
  PDE_R13: 1 << 17,
  /** The PDPTE above the case's PDE has R/W = 0. */
  PDPTE_RO: 1 << 18,
  /** The leaf carries protection key 1 (and a non-leaf PDE key 2, which must be ignored). */
  PKEY: 1 << 19,
  /** The access runs at CPL 3. */
  USER: 1 << 20,
  WRITE: 1 << 21,
  FETCH: 1 << 22,
  /** A supervisor read of the same address comes first (the walk then sees its A bits). */
  TWICE: 1 << 23,
  /** EFLAGS.AC = 1 during a supervisor data access (the SMAP override). */
  AC: 1 << 24,
  // Control state, shared by a batch.
  NXE: 1 << 25,
  WP: 1 << 26,
  SMEP: 1 << 27,
  SMAP: 1 << 28,
  PKE: 1 << 29,
  /** PKRU.AD of key 1. */
  PKRU_AD: 1 << 30,
  /** PKRU.WD of key 1. */
  PKRU_WD: 2 ** 31,
} as const;

export type CaseBit = keyof typeof CASE;

/** Bits 25..31: the control state; a batch runs cases of one state. */
export const CONTROL_SHIFT = 25;
export const controlState = (f: number): number => f >>> CONTROL_SHIFT;

/** The reserved-bit flags; a case sets at most one reserved bit (NX counts when EFER.NXE = 0). */
const RSVD_FLAGS = CASE.PTE_R51 | CASE.PTE_R36 | CASE.PDE_R51 | CASE.PDE_R36 | CASE.PDE_R13;
const NX_FLAGS = CASE.PTE_NX | CASE.PDE_NX;

/** Guest CPU facts the enumeration depends on (a subset of probe's CpuFeatures). */
export interface MatrixFeatures {
  nx: boolean;
  smep: boolean;
  smap: boolean;
  pku: boolean;
  maxPhyAddr: number;
}

export interface CaseSpace {
  /** Flag bits this vCPU lets a case set. */
  offered: number;
  /** What was left out and why, one line each (features the vCPU lacks, bits that are not reserved here). */
  skipped: string[];
}

/**
 * The flag bits a vCPU with these features can run. A feature the vCPU lacks is
 * never enumerated: without SMEP/SMAP/PKU the CR4 bit would #GP; bit 51 is
 * reserved only below MAXPHYADDR 52 and bit 36 only at MAXPHYADDR 36 or less
 * (elsewhere they are address bits and the case would test nothing).
 */
export function caseSpace(cpu: MatrixFeatures): CaseSpace {
  let offered = 0xffffffff;
  const skipped: string[] = [];
  const drop = (bits: number, why: string) => {
    offered = (offered & ~bits) >>> 0;
    skipped.push(why);
  };
  if (!cpu.nx) drop(CASE.NXE, 'EFER.NXE: no NX in CPUID (bit 63 is then always a reserved bit)');
  if (!cpu.smep) drop(CASE.SMEP, 'CR4.SMEP: no SMEP in CPUID');
  if (!cpu.smap) drop(CASE.SMAP | CASE.AC, 'CR4.SMAP and EFLAGS.AC: no SMAP in CPUID');
  if (!cpu.pku)
    drop(
      CASE.PKE | CASE.PKRU_AD | CASE.PKRU_WD | CASE.PKEY,
      'CR4.PKE, PKRU AD/WD and protection keys: no PKU in CPUID',
    );
  if (cpu.maxPhyAddr >= 52)
    drop(CASE.PTE_R51 | CASE.PDE_R51, `reserved bit 51: MAXPHYADDR ${cpu.maxPhyAddr} makes it an address bit`);
  if (cpu.maxPhyAddr > 36)
    drop(CASE.PTE_R36 | CASE.PDE_R36, `reserved bit 36: MAXPHYADDR ${cpu.maxPhyAddr} makes it an address bit`);
  return { offered: offered >>> 0, skipped };
}

/**
 * Whether a flag word (made of offered bits) is a case the matrix runs. The rules,
 * as in access.c's ac_test_legal():
 *   - an access is a read, a write or a fetch, never a fetch that writes;
 *   - PKRU AD/WD only with CR4.PKE (a key with PKE = 0 is legal: it must be ignored);
 *   - PDE bit 13 only in a 2 MiB PDE (in a table pointer it is an address bit);
 *   - at most one reserved bit (NX bits count as reserved when EFER.NXE = 0): reserved-bit
 *     faults end the walk, and a second bit changes nothing in the error code.
 * and for SMAP: EFLAGS.AC only with CR4.SMAP, for data accesses at CPL 0 (it overrides
 * nothing else).
 */
export function isLegal(f: number): boolean {
  if (f & CASE.FETCH && f & CASE.WRITE) return false;
  if (!(f & CASE.PKE) && f & (CASE.PKRU_AD | CASE.PKRU_WD)) return false;
  if (f & CASE.PDE_R13 && !(f & CASE.PDE_PS)) return false;
  if (f & CASE.AC && (!(f & CASE.SMAP) || f & (CASE.USER | CASE.FETCH))) return false;
  const rsvd = f & (RSVD_FLAGS | (f & CASE.NXE ? 0 : NX_FLAGS));
  return (rsvd & (rsvd - 1)) === 0;
}

/** The next flag word after f made of offered bits only (ac_test_bump's step), or -1 past the last. */
function bump(f: number, offered: number): number {
  const invalid = ~offered >>> 0;
  const next = ((f | invalid) >>> 0) + 1;
  return next > 0xffffffff ? -1 : (next & offered) >>> 0;
}

/** Every legal case of the space, in increasing order (so grouped by control state). */
export function* enumerateCases(space: CaseSpace): Generator<number, void, undefined> {
  for (let f = 0; f !== -1; f = bump(f, space.offered)) if (isLegal(f)) yield f;
}

export function countCases(space: CaseSpace): number {
  let n = 0;
  for (let f = 0; f !== -1; f = bump(f, space.offered)) if (isLegal(f)) n++;
  return n;
}

/**
 * n distinct legal cases drawn uniformly with a seeded PRNG, in increasing order:
 * the same space, n and seed give the same cases. n at or above the number of
 * legal cases gives all of them.
 */
export function sampleCases(space: CaseSpace, n: number, seed: number): Uint32Array {
  if (!Number.isInteger(n) || n < 0) throw new RangeError(`sample size must be a non-negative integer, got ${n}`);
  const total = countCases(space);
  const rand = mulberry32(seed);
  let picked: Uint32Array;
  if (n >= total) {
    picked = Uint32Array.from(enumerateCases(space));
  } else if (n > total / 4) {
    // Dense: a partial Fisher-Yates shuffle over the whole enumeration.
    const all = Uint32Array.from(enumerateCases(space));
    for (let i = 0; i < n; i++) {
      const j = i + (rand() % (total - i));
      const t = all[i]!;
      all[i] = all[j]!;
      all[j] = t;
    }
    picked = all.slice(0, n);
  } else {
    // Sparse: draw flag words over the offered bits and keep the legal ones not yet drawn.
    const positions: number[] = [];
    for (let b = 0; b < 32; b++) if (space.offered & (2 ** b)) positions.push(2 ** b);
    const seen = new Set<number>();
    picked = new Uint32Array(n);
    let k = 0;
    while (k < n) {
      const r = rand();
      let f = 0;
      for (let i = 0; i < positions.length; i++) if (r & (1 << i)) f += positions[i]!;
      if (!isLegal(f) || seen.has(f)) continue;
      seen.add(f);
      picked[k++] = f;
    }
  }
  return picked.sort();
}

// ---------------------------------------------------------------------------------
// Names.

const PTE_NAMES: [number, string][] = [
  [CASE.PTE_P, 'P'],
  [CASE.PTE_W, 'W'],
  [CASE.PTE_U, 'U'],
  [CASE.PTE_A, 'A'],
  [CASE.PTE_D, 'D'],
  [CASE.PTE_NX, 'NX'],
  [CASE.PTE_R51, 'r51'],
  [CASE.PTE_R36, 'r36'],
];
const PDE_NAMES: [number, string][] = [
  [CASE.PDE_P, 'P'],
  [CASE.PDE_W, 'W'],
  [CASE.PDE_U, 'U'],
  [CASE.PDE_A, 'A'],
  [CASE.PDE_D, 'D'],
  [CASE.PDE_PS, 'PS'],
  [CASE.PDE_NX, 'NX'],
  [CASE.PDE_R51, 'r51'],
  [CASE.PDE_R36, 'r36'],
  [CASE.PDE_R13, 'r13'],
];

function bits(f: number, names: [number, string][]): string {
  const out = names.filter(([b]) => f & b).map(([, n]) => n);
  return out.length ? out.join('|') : '0';
}

/**
 * A readable name, e.g. `pte=P|W|U pde=P|W|U|PS user write wp=1 smep=0 nx=1`.
 * Control bits the space does not offer are left out, except wp, smep and nx.
 */
export function caseName(f: number, offered = 0xffffffff): string {
  const parts = [`pte=${bits(f, PTE_NAMES)}`, `pde=${bits(f, PDE_NAMES)}`];
  if (f & CASE.PDPTE_RO) parts.push('pdpte=ro');
  if (f & CASE.PKEY) parts.push('pkey=1');
  parts.push(f & CASE.USER ? 'user' : 'sup');
  parts.push(f & CASE.WRITE ? 'write' : f & CASE.FETCH ? 'fetch' : 'read');
  if (f & CASE.TWICE) parts.push('twice');
  if (f & CASE.AC) parts.push('ac');
  const on = (b: number) => (f & b ? 1 : 0);
  parts.push(`wp=${on(CASE.WP)}`, `smep=${on(CASE.SMEP)}`);
  if (offered & CASE.SMAP) parts.push(`smap=${on(CASE.SMAP)}`);
  parts.push(`nx=${on(CASE.NXE)}`);
  if (offered & CASE.PKE) {
    parts.push(`pke=${on(CASE.PKE)}`);
    if (f & (CASE.PKRU_AD | CASE.PKRU_WD))
      parts.push(`pkru1=${[f & CASE.PKRU_AD ? 'ad' : '', f & CASE.PKRU_WD ? 'wd' : ''].filter(Boolean).join('|')}`);
  }
  return parts.join(' ');
}

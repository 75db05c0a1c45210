// One batch of access-matrix cases on the host side: write each case's tables,
// record and data into a buffer, predict every case with the walk model, and
// after the guest ran, read back what happened and compare.
import { RETURN_GVA } from '../arch/x86/layout.js';
import {
  accessedLatitude,
  decodeErrorCode,
  type AccessKind,
  type CompiledWalk,
  type WalkResult,
} from '../model/walk.js';
import { PTE_A } from '../arch/x86/pte.js';
import { CASE } from './flags.js';
import { bufferBase, dataTag, MatrixMachine, PD_CHUNKS, RECORD, routineIndex, SCRATCH } from './machine.js';

const TWO32 = 2 ** 32;

/** Where a case lives in guest memory, and the entries the guest writes for it. */
export interface Placement {
  gva: number;
  pdeGpa: number;
  pde: bigint;
  /** -1 when the PDE maps a 2 MiB page (no PTE is used). */
  pteGpa: number;
  pte: bigint;
  dataGpa: number;
  record: number;
}

/** What the model says a case does. */
export interface Expected {
  /** -1: no fault; else the #PF error code. */
  ec: number;
  /** The faulting address the model gives CR2 (a fault only; 0 otherwise). */
  cr2: bigint;
  pde: bigint;
  pte: bigint;
  /** The value a read returns (reads that do not fault). */
  value: bigint;
  /** The data quadword after the case. */
  data: bigint;
  /** Entries whose A bit the guest's walker may set beyond the model's (accessedLatitude): 1 = the PDE, 2 = the PTE. */
  mayA: number;
  /** The walks (the first is the supervisor read of a twice case), when asked for: a re-run's report. */
  walks?: WalkResult[];
}

/** What KVM did. */
export interface Observed {
  /** -1: no fault; -2: a CPL 3 case whose record no #PF wrote (it never came back). */
  ec: number;
  cr2: bigint;
  pde: bigint;
  pte: bigint;
  value: bigint;
  data: bigint;
}

export interface Batch {
  /** The buffer (0/1) of the guest the batch was written into. */
  buf: number;
  /** The batch's number in the run; it tags the data quadwords. */
  seq: number;
  flags: Uint32Array;
  at: Placement[];
  expected: Expected[];
}

export const accessKind = (f: number): AccessKind => (f & CASE.WRITE ? 'write' : f & CASE.FETCH ? 'exec' : 'read');

/** Entry bits of the PDE and PTE encodings: [flag, low-half bit, high-half bit]. */
const PTE_BITS: [number, number, number][] = [
  [CASE.PTE_P, 1, 0],
  [CASE.PTE_W, 2, 0],
  [CASE.PTE_U, 4, 0],
  [CASE.PTE_A, 0x20, 0],
  [CASE.PTE_D, 0x40, 0],
  [CASE.PTE_NX, 0, 0x80000000],
  [CASE.PTE_R51, 0, 1 << 19],
  [CASE.PTE_R36, 0, 1 << 4],
];
const PDE_BITS: [number, number, number][] = [
  [CASE.PDE_P, 1, 0],
  [CASE.PDE_W, 2, 0],
  [CASE.PDE_U, 4, 0],
  [CASE.PDE_A, 0x20, 0],
  [CASE.PDE_D, 0x40, 0],
  [CASE.PDE_PS, 0x80, 0],
  [CASE.PDE_R13, 0x2000, 0],
  [CASE.PDE_NX, 0, 0x80000000],
  [CASE.PDE_R51, 0, 1 << 19],
  [CASE.PDE_R36, 0, 1 << 4],
];
const KEY1 = 1 << 27; // protection key 1 in bits 62:59 (high half bits 30:27)
const KEY2 = 2 << 27;

/** Low and high halves of an entry for every combination of its flag bits (PTE: bits 0-7, PDE: bits 8-17). */
function encodings(
  table: [number, number, number][],
  shift: number,
  width: number,
): { lo: Uint32Array; hi: Uint32Array } {
  const lo = new Uint32Array(1 << width),
    hi = new Uint32Array(1 << width);
  for (let v = 0; v < 1 << width; v++) {
    for (const [flag, l, h] of table) {
      if ((v << shift) & flag) {
        lo[v] |= l;
        hi[v] |= h;
      }
    }
  }
  return { lo, hi };
}
const PTE_ENC = encodings(PTE_BITS, 0, 8);
const PDE_ENC = encodings(PDE_BITS, 8, 10);

const u64 = (lo: number, hi: number): bigint => (BigInt(hi >>> 0) << 32n) | BigInt(lo >>> 0);

/**
 * Writes cases[from, to) into buffer `buf` and predicts each with `model`
 * (a walk compiled for the batch's control state). The PDE and PTE go into the
 * case's record: the guest stores them (see machine.ts). The caller arms the header.
 */
export function prepareBatch(
  m: MatrixMachine,
  model: CompiledWalk,
  buf: number,
  seq: number,
  cases: Uint32Array,
  from: number,
  to: number,
  keepWalks = false,
): Batch {
  const n = to - from;
  const flags = cases.subarray(from, to);
  const at: Placement[] = new Array(n);
  const expected: Expected[] = new Array(n);
  const u32 = m.u32;
  const cr3 = m.guest.boot.tables.root;
  const read = (gpa: bigint): bigint => m.u64[Number(gpa) / 8] ?? 0n;
  const counter = [0, 0];
  const rec0 = bufferBase.records(buf);
  const data0 = bufferBase.data(buf);
  const gva0 = bufferBase.gva(buf);
  for (let i = 0; i < n; i++) {
    const f = flags[i]!;
    const g = f & CASE.PDPTE_RO ? 1 : 0;
    const c = counter[g]++;
    const chunk = c >>> 9;
    if (chunk >= PD_CHUNKS) throw new RangeError('too many cases in one batch for the PD pages');
    const gva = gva0 + (g * PD_CHUNKS + chunk) * 2 ** 30 + (c & 511) * 2 ** 21 + i * 8;
    const pdeGpa = m.pd(buf, g, chunk) + (c & 511) * 8;
    const dataGpa = data0 + i * 8;
    const record = rec0 + i * RECORD;
    const pde = { lo: PDE_ENC.lo[(f >>> 8) & 0x3ff]!, hi: PDE_ENC.hi[(f >>> 8) & 0x3ff]! };
    const pte = { lo: PTE_ENC.lo[f & 0xff]!, hi: PTE_ENC.hi[f & 0xff]! };
    let pteGpa = -1;
    if (f & CASE.PDE_PS) {
      pde.lo |= data0;
      if (f & CASE.PKEY) pde.hi |= KEY1;
    } else {
      const pt = m.pt(buf, i);
      pde.lo |= pt;
      if (f & CASE.PKEY) pde.hi |= KEY2;
      pteGpa = pt + ((i * 8) >>> 12) * 8;
      pte.lo |= dataGpa & ~0xfff;
      if (f & CASE.PKEY) pte.hi |= KEY1;
    }
    const tag = dataTag(seq, i, (f & CASE.USER) !== 0);
    u32[dataGpa / 4] = tag.lo;
    u32[dataGpa / 4 + 1] = tag.hi;
    const r = record / 4;
    u32[r] = pdeGpa;
    u32[r + 1] = 0;
    u32[r + 2] = pde.lo >>> 0;
    u32[r + 3] = pde.hi >>> 0;
    u32[r + 4] = pteGpa < 0 ? SCRATCH : pteGpa;
    u32[r + 5] = 0;
    u32[r + 6] = pte.lo >>> 0;
    u32[r + 7] = pte.hi >>> 0;
    u32[r + 8] = gva >>> 0;
    u32[r + 9] = gva / TWO32;
    u32[r + 10] = m.routines[routineIndex(f)]!;
    u32[r + 11] = 0;
    at[i] = {
      gva,
      pdeGpa,
      pde: u64(pde.lo, pde.hi),
      pteGpa,
      pte: pteGpa < 0 ? 0n : u64(pte.lo, pte.hi),
      dataGpa,
      record,
    };
    expected[i] = predict(model, cr3, f, at[i]!, read, u64(tag.lo, tag.hi), keepWalks);
  }
  return { buf, seq, flags, at, expected };
}

/**
 * The model's outcome for one case. A twice case first does a supervisor read;
 * its A/D writes (if it did not fault) are what the second walk reads.
 */
export function predict(
  model: CompiledWalk,
  cr3: bigint,
  f: number,
  p: Placement,
  read: (gpa: bigint) => bigint,
  tag: bigint,
  keepWalks = false,
): Expected {
  const pdeGpa = BigInt(p.pdeGpa);
  const pteGpa = BigInt(p.pteGpa);
  let pde = p.pde;
  let pte = p.pte;
  const gva = BigInt(p.gva);
  const cpl = f & CASE.USER ? 3 : 0;
  const walks: WalkResult[] | undefined = keepWalks ? [] : undefined;
  const apply = (w: WalkResult) => {
    for (const a of w.adWrites) {
      if (a.pteGpa === pdeGpa) pde = a.new;
      else if (a.pteGpa === pteGpa) pte = a.new;
      else throw new Error(`the model writes A/D at 0x${a.pteGpa.toString(16)}, outside the case's PDE and PTE`);
    }
  };
  const current = (gpa: bigint) => (gpa === pdeGpa ? pde : gpa === pteGpa ? pte : read(gpa));
  let mayA = 0;
  const latitude = (w: WalkResult) => {
    for (const at of accessedLatitude(w, model.walker)) mayA |= at === pdeGpa ? 1 : at === pteGpa ? 2 : 0;
  };
  if (f & CASE.TWICE) {
    const first = model(cr3, { gva, kind: 'read', cpl: 0 }, current);
    walks?.push(first);
    apply(first);
    latitude(first);
  }
  const w = model(cr3, { gva, kind: accessKind(f), cpl, eflagsAc: (f & CASE.AC) !== 0 }, current);
  walks?.push(w);
  apply(w);
  latitude(w);
  const wrote = w.ok && f & CASE.WRITE; // a write stores the GVA itself
  return {
    ec: w.ok ? -1 : w.errorCode,
    cr2: w.ok ? 0n : w.cr2,
    pde,
    pte,
    value: tag,
    data: wrote ? gva : tag,
    mayA,
    walks,
  };
}

/**
 * Reads back case i of a batch that ran. The record's first quadword holds the
 * #PF error code, or still the PDE address (-1 after a twice case's first read)
 * when no #PF happened; see machine.ts.
 */
export function observe(m: MatrixMachine, b: Batch, i: number): Observed {
  const p = b.at[i]!;
  const f = b.flags[i]!;
  const u32 = m.u32;
  const r = p.record / 4;
  const lo = u32[r]!,
    hi = u32[r + 1]!;
  const cr2 = u64(u32[r + 2]!, u32[r + 3]!);
  const none = (lo === p.pdeGpa && hi === 0) || (lo === 0xffffffff && hi === 0xffffffff);
  let ec: number;
  if (f & CASE.USER) ec = none ? -2 : cr2 === RETURN_GVA ? -1 : lo;
  else ec = none ? -1 : lo;
  return {
    ec,
    cr2,
    pde: u64(u32[p.pdeGpa / 4]!, u32[p.pdeGpa / 4 + 1]!),
    pte: p.pteGpa < 0 ? 0n : u64(u32[p.pteGpa / 4]!, u32[p.pteGpa / 4 + 1]!),
    value: u64(u32[r + 4]!, u32[r + 5]!),
    data: u64(u32[p.dataGpa / 4]!, u32[p.dataGpa / 4 + 1]!),
  };
}

/**
 * Whether a case did what the model says: fault and error code, CR2 (the model's,
 * to the byte), value read, data, PDE and PTE. `p` is unused: every field is
 * compared with the model's prediction, none with the case's own placement.
 */
export function agrees(f: number, _p: Placement, e: Expected, o: Observed): boolean {
  if (o.ec !== e.ec || o.data !== e.data) return false;
  if (o.pde !== e.pde && !(e.mayA & 1 && o.pde === (e.pde | PTE_A))) return false;
  if (o.pte !== e.pte && !(e.mayA & 2 && o.pte === (e.pte | PTE_A))) return false;
  if (e.ec >= 0) return o.cr2 === e.cr2;
  return f & (CASE.WRITE | CASE.FETCH) ? true : o.value === e.value;
}

/** The outcome key a case is counted under. */
export function outcomeKey(e: Expected): string {
  return e.ec < 0 ? 'ok' : `ok fault ${decodeErrorCode(e.ec)}`;
}

const faultText = (ec: number): string =>
  ec === -1 ? 'none' : ec === -2 ? 'no record (never came back from CPL 3)' : decodeErrorCode(ec);

/** Expected and observed as comparable records, for ctx.expect. Fields that do not apply are left out. */
export function comparable(f: number, p: Placement, e: Expected, o: Observed): { expected: object; observed: object } {
  const read = !(f & (CASE.WRITE | CASE.FETCH));
  const exp: Record<string, unknown> = { fault: faultText(e.ec), pde: e.pde, data: e.data };
  const obs: Record<string, unknown> = { fault: faultText(o.ec), pde: o.pde, data: o.data };
  if (p.pteGpa >= 0) {
    exp.pte = e.pte;
    obs.pte = o.pte;
  }
  if (e.ec >= 0 || o.ec >= 0) {
    exp.cr2 = e.ec >= 0 ? e.cr2 : 'none';
    obs.cr2 = o.ec >= 0 ? o.cr2 : 'none';
  }
  if (read && e.ec === -1) {
    exp.value = e.value;
    obs.value = o.ec === -1 ? o.value : 'none';
  }
  return { expected: exp, observed: obs };
}

// The access matrix: the enumeration against independent counts (a brute force
// over the flag word, and kvm-unit-tests access.c's own rules transliterated), the
// seeded sample, and live runs against /dev/kvm with the real model and with
// deliberately wrong ones.
import { describe, expect, it } from 'vitest';
import { Kvm } from '../src/kvm/kvm.js';
import { agrees, comparable, observe, prepareBatch, type Observed } from '../src/matrix/batch.js';
import { accessMatrix, batchRanges, matrixConfig, runAlone } from '../src/matrix/check.js';
import {
  CASE,
  caseName,
  caseSpace,
  controlState,
  countCases,
  enumerateCases,
  isLegal,
  sampleCases,
  type CaseSpace,
  type MatrixFeatures,
} from '../src/matrix/flags.js';
import { classesOf, Coverage, offeredClasses } from '../src/matrix/coverage.js';
import { MatrixMachine } from '../src/matrix/machine.js';
import { compileWalk, PFERR } from '../src/model/walk.js';
import type { WrongWalk } from '../src/model/wrong.js';
import type { HostProfile } from '../src/probe/probe.js';
import { formatRerun } from '../src/report/rerun.js';
import type { CheckResult, Comparison } from '../src/run/types.js';
import { show } from '../src/run/differ.js';
import { runCheck } from '../src/run/runner.js';
import { describeKvm, failures, withHost } from './support/kvm.js';

const HOST_LIKE: MatrixFeatures = { nx: true, smep: false, smap: false, pku: false, maxPhyAddr: 48 };

/** Legality written out again from the rules, over named booleans rather than masks. */
function legalByHand(f: number): boolean {
  const has = (b: number) => (f & b) !== 0;
  if (has(CASE.FETCH) && has(CASE.WRITE)) return false;
  if ((has(CASE.PKRU_AD) || has(CASE.PKRU_WD)) && !has(CASE.PKE)) return false;
  if (has(CASE.PDE_R13) && !has(CASE.PDE_PS)) return false;
  if (has(CASE.AC) && (!has(CASE.SMAP) || has(CASE.USER) || has(CASE.FETCH))) return false;
  let reserved = 0;
  for (const b of [CASE.PTE_R51, CASE.PTE_R36, CASE.PDE_R51, CASE.PDE_R36, CASE.PDE_R13]) if (has(b)) reserved++;
  if (!has(CASE.NXE)) {
    if (has(CASE.PTE_NX)) reserved++;
    if (has(CASE.PDE_NX)) reserved++;
  }
  return reserved <= 1;
}

/** Counts legal words over every subset of `bits` (each a flag value). */
function bruteForce(bits: number[]): number {
  // Every subset, as the sum of a subset of the low half and one of the high half.
  const sums = (part: number[]) => {
    const out = new Float64Array(2 ** part.length);
    for (let s = 1; s < out.length; s++) {
      const i = 31 - Math.clz32(s);
      out[s] = out[s - 2 ** i]! + part[i]!;
    }
    return out;
  };
  const half = bits.length >> 1;
  const lo = sums(bits.slice(0, half));
  const hi = sums(bits.slice(half));
  let n = 0;
  for (let h = 0; h < hi.length; h++) for (let l = 0; l < lo.length; l++) if (legalByHand(hi[h]! + lo[l]!)) n++;
  return n;
}

/** The flag bits a host like this development host offers, listed by hand. */
const HOST_BITS = [
  CASE.PTE_P,
  CASE.PTE_W,
  CASE.PTE_U,
  CASE.PTE_A,
  CASE.PTE_D,
  CASE.PTE_NX,
  CASE.PTE_R51,
  CASE.PDE_P,
  CASE.PDE_W,
  CASE.PDE_U,
  CASE.PDE_A,
  CASE.PDE_D,
  CASE.PDE_PS,
  CASE.PDE_NX,
  CASE.PDE_R51,
  CASE.PDE_R13,
  CASE.PDPTE_RO,
  CASE.USER,
  CASE.WRITE,
  CASE.FETCH,
  CASE.TWICE,
  CASE.NXE,
  CASE.WP,
];

// kvm-unit-tests x86/access.c's flag word, in its own bit order, and its rules
// (ac_test_legal, ac_test_bump_one, the invalid mask of ac_test_run).
const AC = {
  PTE_W: 0,
  PTE_U: 1,
  PTE_A: 2,
  PTE_D: 3,
  PTE_NX: 4,
  PTE_P: 5,
  PTE_51: 6,
  PTE_36: 7,
  PDE_W: 8,
  PDE_U: 9,
  PDE_A: 10,
  PDE_D: 11,
  PDE_PSE: 12,
  PDE_NX: 13,
  PDE_P: 14,
  PDE_51: 15,
  PDE_36: 16,
  PDE_13: 17,
  PDPTE_RO: 18,
  PKU_AD: 19,
  PKU_WD: 20,
  PKEY: 21,
  USER: 22,
  WRITE: 23,
  FETCH: 24,
  TWICE: 25,
  NX: 26,
  WP: 27,
  SMEP: 28,
  PKE: 29,
  FEP: 30,
} as const;
const NR_AC_FLAGS = 31;
const acm = (...names: (keyof typeof AC)[]) => names.reduce((m, n) => m | (1 << AC[n]), 0);

function acLegal(flags: number): boolean {
  const F = (n: keyof typeof AC) => (flags & (1 << AC[n])) !== 0;
  if (F('SMEP')) return false;
  if (F('FETCH') && F('WRITE')) return false;
  if (F('USER') && F('SMEP')) return false;
  if (!F('PKE') && (F('PKU_AD') || F('PKU_WD'))) return false;
  if (!F('PDE_PSE') && F('PDE_13')) return false;
  let reserved = acm('PDE_51', 'PDE_36', 'PDE_13', 'PTE_51', 'PTE_36');
  if (!F('NX')) reserved |= acm('PDE_NX', 'PTE_NX');
  reserved &= flags;
  return (reserved & (reserved - 1)) === 0;
}

/** access.c's enumeration on a vCPU without PKU and with MAXPHYADDR >= 37, no forced emulation. */
function* accessC(): Generator<number> {
  const invalid = acm('PKU_AD', 'PKU_WD', 'PKEY', 'PKE', 'PDE_36', 'PTE_36', 'FEP');
  for (let flags = 0; ;) {
    if (acLegal(flags)) yield flags;
    const next = ((flags | invalid) >>> 0) + 1; // ac_test_bump_one
    if (next >= 2 ** NR_AC_FLAGS) return;
    flags = (next & ~invalid) >>> 0;
  }
}

/** An access.c flag word in this project's layout. */
function fromAccessC(a: number): number {
  const map: [keyof typeof AC, number][] = [
    ['PTE_W', CASE.PTE_W],
    ['PTE_U', CASE.PTE_U],
    ['PTE_A', CASE.PTE_A],
    ['PTE_D', CASE.PTE_D],
    ['PTE_NX', CASE.PTE_NX],
    ['PTE_P', CASE.PTE_P],
    ['PTE_51', CASE.PTE_R51],
    ['PTE_36', CASE.PTE_R36],
    ['PDE_W', CASE.PDE_W],
    ['PDE_U', CASE.PDE_U],
    ['PDE_A', CASE.PDE_A],
    ['PDE_D', CASE.PDE_D],
    ['PDE_PSE', CASE.PDE_PS],
    ['PDE_NX', CASE.PDE_NX],
    ['PDE_P', CASE.PDE_P],
    ['PDE_51', CASE.PDE_R51],
    ['PDE_36', CASE.PDE_R36],
    ['PDE_13', CASE.PDE_R13],
    ['PDPTE_RO', CASE.PDPTE_RO],
    ['PKU_AD', CASE.PKRU_AD],
    ['PKU_WD', CASE.PKRU_WD],
    ['PKEY', CASE.PKEY],
    ['USER', CASE.USER],
    ['WRITE', CASE.WRITE],
    ['FETCH', CASE.FETCH],
    ['TWICE', CASE.TWICE],
    ['NX', CASE.NXE],
    ['WP', CASE.WP],
    ['SMEP', CASE.SMEP],
    ['PKE', CASE.PKE],
  ];
  let f = 0;
  for (const [n, b] of map) if (a & (1 << AC[n])) f += b;
  return f;
}

describe('case enumeration', () => {
  it('offers only what the vCPU has and says what it left out', () => {
    const s = caseSpace(HOST_LIKE);
    expect(s.offered).toBe(HOST_BITS.reduce((a, b) => a + b, 0));
    expect(s.skipped.join('\n')).toMatch(/SMEP/);
    expect(s.skipped.join('\n')).toMatch(/SMAP/);
    expect(s.skipped.join('\n')).toMatch(/PKU/);
    expect(s.skipped.join('\n')).toMatch(/bit 36.*48/);
    const everything = caseSpace({ nx: true, smep: true, smap: true, pku: true, maxPhyAddr: 36 });
    expect(everything.offered).toBe(0xffffffff);
    expect(everything.skipped).toEqual([]);
    const wide = caseSpace({ nx: false, smep: false, smap: false, pku: false, maxPhyAddr: 52 });
    expect(wide.offered & (CASE.NXE | CASE.PTE_R51 | CASE.PDE_R51 | CASE.PTE_R36 | CASE.PDE_R36)).toBe(0);
  });

  it('counts 1,916,928 legal cases for 4-level paging without SMEP/SMAP/PKU, as a brute force over the flag word does', () => {
    const s = caseSpace(HOST_LIKE);
    expect(countCases(s)).toBe(1_916_928);
    expect(bruteForce(HOST_BITS)).toBe(1_916_928);
  });

  it('is exactly the class kvm-unit-tests access.c enumerates on such a vCPU', () => {
    const s = caseSpace(HOST_LIKE);
    const mine = new Set<number>();
    let n = 0;
    const outside: string[] = [];
    for (const a of accessC()) {
      const f = fromAccessC(a);
      if ((f & ~s.offered) !== 0 || !isLegal(f)) outside.push(caseName(f));
      mine.add(f);
      n++;
    }
    expect(outside.slice(0, 5)).toEqual([]);
    expect(n).toBe(1_916_928);
    expect(mine.size).toBe(n);
  });

  it('agrees with the brute force when reserved bit 36 is offered (MAXPHYADDR 36)', () => {
    const s = caseSpace({ nx: true, smep: false, smap: false, pku: false, maxPhyAddr: 36 });
    const bits = [...HOST_BITS, CASE.PTE_R36, CASE.PDE_R36];
    expect(s.offered).toBe(bits.reduce((a, b) => a + b, 0));
    expect(countCases(s)).toBe(bruteForce(bits));
  });

  it('agrees with the brute force on a space with SMAP, PKU and the 32nd bit', () => {
    // A narrower space keeps the brute force short: the PTE and PDE bits that
    // interact with the features, plus every feature bit.
    const bits = [
      CASE.PTE_P,
      CASE.PTE_W,
      CASE.PTE_U,
      CASE.PTE_NX,
      CASE.PTE_R51,
      CASE.PDE_PS,
      CASE.PDE_R13,
      CASE.PKEY,
      CASE.USER,
      CASE.WRITE,
      CASE.FETCH,
      CASE.AC,
      CASE.NXE,
      CASE.SMAP,
      CASE.PKE,
      CASE.PKRU_AD,
      CASE.PKRU_WD,
    ];
    const space: CaseSpace = { offered: bits.reduce((a, b) => a + b, 0) >>> 0, skipped: [] };
    const all = [...enumerateCases(space)];
    expect(all.length).toBe(bruteForce(bits));
    expect(countCases(space)).toBe(all.length);
    expect(all.some((f) => f >= 2 ** 31)).toBe(true);
  });

  it('enumerates in increasing order, legal words of offered bits only, grouped by control state', () => {
    const s = caseSpace(HOST_LIKE);
    let prev = -1;
    let groups = 0;
    let lastState = -1;
    for (const f of enumerateCases(s)) {
      if (f <= prev || (f & ~s.offered) !== 0 || !legalByHand(f))
        throw new Error(`bad case ${caseName(f)} after ${caseName(prev)}`);
      if (controlState(f) !== lastState) {
        groups++;
        lastState = controlState(f);
      }
      prev = f;
    }
    expect(groups).toBe(4); // NXE x WP
  });

  it('names cases readably', () => {
    const f =
      CASE.PTE_P |
      CASE.PTE_W |
      CASE.PTE_U |
      CASE.PDE_P |
      CASE.PDE_W |
      CASE.PDE_U |
      CASE.PDE_PS |
      CASE.USER |
      CASE.WRITE |
      CASE.WP |
      CASE.NXE;
    expect(caseName(f, caseSpace(HOST_LIKE).offered)).toBe('pte=P|W|U pde=P|W|U|PS user write wp=1 smep=0 nx=1');
    expect(caseName(CASE.PTE_R51 | CASE.PDPTE_RO | CASE.TWICE | CASE.FETCH)).toBe(
      'pte=r51 pde=0 pdpte=ro sup fetch twice wp=0 smep=0 smap=0 nx=0 pke=0',
    );
  });
});

describe('sampling', () => {
  const s = caseSpace(HOST_LIKE);

  it('is reproducible: the same size and seed give the same cases', () => {
    const a = sampleCases(s, 5000, 42);
    const b = sampleCases(s, 5000, 42);
    expect(b).toEqual(a);
    expect(sampleCases(s, 5000, 43)).not.toEqual(a);
  });

  it('gives distinct legal cases in increasing order', () => {
    const a = sampleCases(s, 20000, 1);
    expect(a.length).toBe(20000);
    for (let i = 0; i < a.length; i++) {
      if ((i > 0 && a[i]! <= a[i - 1]!) || !legalByHand(a[i]!) || (a[i]! & ~s.offered) !== 0)
        throw new Error(`bad sample ${caseName(a[i]!)}`);
    }
  });

  it('covers every control state and access kind of the space', () => {
    const a = sampleCases(s, 2000, 1);
    expect(new Set([...a].map(controlState)).size).toBe(4);
    expect([...a].some((f) => f & CASE.USER && f & CASE.FETCH)).toBe(true);
    expect([...a].some((f) => f & CASE.TWICE && f & CASE.WRITE)).toBe(true);
  });

  it('uses the dense path reproducibly and returns everything when asked for more than exists', () => {
    const small: CaseSpace = {
      offered: CASE.PTE_P | CASE.PTE_W | CASE.PTE_NX | CASE.PTE_R51 | CASE.WRITE | CASE.FETCH | CASE.NXE,
      skipped: [],
    };
    const total = countCases(small);
    const dense = sampleCases(small, Math.floor(total / 2), 9);
    expect(dense).toEqual(sampleCases(small, Math.floor(total / 2), 9));
    expect(new Set(dense).size).toBe(dense.length);
    expect([...sampleCases(small, total + 10, 1)]).toEqual([...enumerateCases(small)]);
    expect(() => sampleCases(small, -1, 1)).toThrow(RangeError);
  });

  it('splits cases into batches of one control state each', () => {
    const a = sampleCases(s, 3000, 5);
    const ranges = [...batchRanges(a, 256)];
    expect(ranges[0]![0]).toBe(0);
    expect(ranges.at(-1)![1]).toBe(a.length);
    for (const [from, to] of ranges) {
      expect(to - from).toBeLessThanOrEqual(256);
      expect(new Set([...a.subarray(from, to)].map(controlState)).size).toBe(1);
    }
  });
});

describeKvm('access matrix on this host', () => {
  let kvm: Kvm;
  let profile: HostProfile;
  withHost((k, p) => {
    kvm = k;
    profile = p;
  });

  it('agrees with the model on a sample, over many batches in both buffers', async () => {
    const r = await runCheck(accessMatrix({ sample: 4000, seed: 1, batchSize: 256 }), kvm, profile);
    expect(r.name).toBe('access-matrix');
    expect(r.outcome, failures(r)).toBe('pass');
    expect(r.cases?.checked).toBe(4000);
    expect(r.cases?.byOutcome.mismatch ?? 0).toBe(0);
    expect(Object.keys(r.cases!.byOutcome)).toContain('ok');
    expect(Object.keys(r.cases!.byOutcome).some((k) => k.startsWith('ok fault'))).toBe(true);
    const batches = [...batchRanges(sampleCases(caseSpace(profile.cpu!), 4000, 1), 256)].length;
    expect(r.notes.join('\n')).toMatch(new RegExp(`4000 cases in ${batches} batches, ${batches} guest entries`));
    // Coverage: every class the vCPU offers, with its count, and none missing.
    const coverage = r.comparisons.find((c) => c.what.startsWith('coverage'));
    expect(coverage?.ok, coverage?.observed).toBe(true);
    const offered = offeredClasses(caseSpace(profile.cpu!));
    for (const [d, classes] of Object.entries(offered)) {
      const line = r.notes.find((n) => n.startsWith(`coverage by ${d}: `));
      expect(line, d).toBeDefined();
      for (const c of classes) expect(line).toMatch(new RegExp(`${c.replace(/[|]/g, '\\|')}: [1-9]\\d*`));
    }
  });

  it('runs a CPL 3 access through tables the guest rewrote after an earlier CPL 3 access', async () => {
    // The same GVA, PDE and page table in two consecutive batches of one buffer:
    // first a user write that succeeds, then the PDE is not present.
    const ok =
      CASE.NXE |
      CASE.WP |
      CASE.PDE_P |
      CASE.PDE_W |
      CASE.PDE_U |
      CASE.PDE_A |
      CASE.PTE_P |
      CASE.PTE_W |
      CASE.PTE_U |
      CASE.PTE_A |
      CASE.PTE_D |
      CASE.USER |
      CASE.WRITE;
    const gone = ok & ~CASE.PDE_P;
    const m = MatrixMachine.create(kvm, { levels: 4, batchSize: 1, smap: false, pku: false });
    try {
      for (const [k, f] of [ok, gone].entries()) {
        const b = prepareBatch(m, compileWalk(matrixConfig(profile.cpu!, 4, f)), 0, k, Uint32Array.of(f), 0, 1);
        m.arm(0, 1, m.control(f));
        expect((await m.guest.run()).kind).toBe('done');
        const o = observe(m, b, 0);
        expect(agrees(f, b.at[0]!, b.expected[0]!, o), caseName(f)).toBe(true);
        expect(o.ec).toBe(f === ok ? -1 : 2 | 4);
      }
    } finally {
      m.close();
    }
  });

  const WRONG: WrongWalk[] = ['ignore-wp', 'dirty-on-read', 'ignore-nx', 'no-accessed-on-upper', 'rsvd-as-not-present'];
  for (const mistake of WRONG) {
    it(`reports mismatches with a wrong model (${mistake})`, async () => {
      const r = await runCheck(
        accessMatrix({ sample: 1500, seed: 1, wrong: { walk: new Set([mistake]) } }),
        kvm,
        profile,
      );
      expect(r.outcome).toBe('fail');
      const bad = r.cases!.byOutcome.mismatch ?? 0;
      expect(bad).toBeGreaterThan(0);
      const listed = caseComparisons(r);
      expect(listed.length).toBe(Math.min(bad, 200));
      // The outcome classes are the model's: one that never predicts a class leaves a hole in the coverage too.
      const hole = r.comparisons.find((c) => c.what.startsWith('coverage'))!;
      expect(hole.ok, hole.observed).toBe(mistake !== 'rsvd-as-not-present');
      if (!hole.ok) expect(hole.observed).toBe('["outcome: reserved bit"]');
      expect(listed[0]!.what).toMatch(/^pte=\S+ pde=\S+ .*wp=[01] smep=[01] nx=[01]$/);
      expect(r.comparisons.find((c) => c.what === 'mismatching cases')?.observed).toBe(String(bad));
      // Each listed mismatch (up to 20) is re-run alone, with the walks side by side.
      const reruns = r.notes.filter((n) => n.startsWith('re-run alone'));
      expect(reruns.length).toBe(Math.min(bad, 20));
      expect(reruns[0]).toMatch(/the mismatch reproduces/);
      expect(reruns[0]).toMatch(/model walk 1/);
      expect(reruns[0]).toMatch(/KVM walk 1|tracefs unavailable/);
    });
  }

  // Observations KVM could wrongly produce, each changing one field of the cases
  // it touches: the check must fail, count exactly those cases, and list each
  // with exactly that field differing.
  const D = 0x40n;
  const A = 0x20n;
  const WRONG_OBSERVATIONS: [string, string, (f: number, o: Observed) => Observed][] = [
    [
      'a page-aligned CR2',
      'cr2',
      (_f, o) => (o.ec >= 0 && (o.cr2 & 0xfffn) !== 0n ? { ...o, cr2: o.cr2 & ~0xfffn } : o),
    ],
    ['CR2 one byte off', 'cr2', (_f, o) => (o.ec >= 0 ? { ...o, cr2: o.cr2 ^ 1n } : o)],
    ['a missing A bit on the PDE', 'pde', (_f, o) => (o.ec === -1 && o.pde & A ? { ...o, pde: o.pde & ~A } : o)],
    [
      'an extra D bit on the PTE',
      'pte',
      (f, o) => (o.ec === -1 && !(f & CASE.PDE_PS) && !(o.pte & D) ? { ...o, pte: o.pte | D } : o),
    ],
    ['one flipped error-code flag (U)', 'fault', (_f, o) => (o.ec >= 0 ? { ...o, ec: o.ec ^ PFERR.U } : o)],
    [
      'a read value one off',
      'value',
      (f, o) => (o.ec === -1 && !(f & (CASE.WRITE | CASE.FETCH)) ? { ...o, value: o.value ^ 1n } : o),
    ],
    ['a lost write', 'data', (f, o) => (o.ec === -1 && f & CASE.WRITE ? { ...o, data: o.data ^ 1n } : o)],
  ];
  for (const [name, field, tamper] of WRONG_OBSERVATIONS) {
    it(`reports ${name}, naming the ${field} of each case it touched`, async () => {
      let touched = 0;
      const wrongObservation = (f: number, o: Observed): Observed => {
        const t = tamper(f, o);
        if (t !== o) touched++;
        return t;
      };
      const r = await runCheck(accessMatrix({ sample: 1500, seed: 2, wrongObservation }), kvm, profile);
      expect(touched).toBeGreaterThan(0);
      expect(r.outcome).toBe('fail');
      expect(r.cases!.byOutcome.mismatch).toBe(touched);
      const listed = caseComparisons(r);
      expect(listed.length).toBe(Math.min(touched, 200));
      for (const c of listed) expect(differingFields(c), c.what).toEqual([field]);
    });
  }

  it('reports a case list that drops a whole class (EFER.NXE = 1) by its coverage', async () => {
    const r = await runCheck(
      accessMatrix({ sample: 4000, seed: 1, wrongCases: (c) => c.filter((f) => !(f & CASE.NXE)) }),
      kvm,
      profile,
    );
    expect(r.outcome).toBe('fail');
    expect(r.cases!.byOutcome.mismatch ?? 0).toBe(0);
    const bad = r.comparisons.filter((c) => !c.ok);
    expect(bad.map((c) => c.what)).toEqual(['coverage: classes this vCPU offers that no checked case fell in']);
    expect(bad[0]!.observed).toMatch(/control state: nx=1 wp=0/);
    expect(bad[0]!.observed).toMatch(/control state: nx=1 wp=1/);
    expect(bad[0]!.observed).not.toMatch(/nx=0/);
  });

  it('reports the same mismatches in the same order on one vCPU and on two', async () => {
    const run = (lanes: number) =>
      runCheck(
        accessMatrix({ sample: 1500, seed: 3, lanes, wrong: { walk: new Set<WrongWalk>(['ignore-nx']) } }),
        kvm,
        profile,
      );
    const one = await run(1);
    const two = await run(2);
    expect(one.notes.join('\n')).toMatch(/on 1 vCPU,/);
    expect(two.notes.join('\n')).toMatch(/on 2 vCPUs,/);
    expect(two.cases).toEqual(one.cases);
    expect(two.comparisons).toEqual(one.comparisons);
  });

  it('re-runs one case alone and shows both walks', async () => {
    const f =
      CASE.NXE | CASE.WP | CASE.PDE_P | CASE.PDE_W | CASE.PDE_U | CASE.PTE_P | CASE.PTE_U | CASE.USER | CASE.WRITE;
    const r = await runAlone({ kvm }, profile.cpu!, 4, f);
    expect(r.agrees).toBe(true);
    expect(r.model).toHaveLength(1);
    expect(r.model[0]!.ok).toBe(false);
    const text = formatRerun(r);
    expect(text).toMatch(/PTE @0x[0-9a-f]+ = 0x[0-9a-f]+ \(P U\)/);
    expect(text).toMatch(/#PF P\|W\|U \(protection:write\)/);
    if (typeof r.kvm !== 'string') {
      expect(r.kvm.length).toBeGreaterThan(0);
      expect(text).toMatch(/KVM walk 1:/);
      expect(text).toMatch(/walk addr 0x[0-9a-f]+ access W\|U/);
    }
  });

  it('is not applicable in 5-level mode without LA57', async () => {
    // Large enough to cover every control state of a vCPU with SMEP, SMAP and PKU (80 of them).
    const r = await runCheck(accessMatrix({ sample: 3000, seed: 1, mode: '5level' }), kvm, profile);
    if (profile.cpu?.la57) expect(r.outcome, failures(r)).toBe('pass');
    else {
      expect(r.outcome).toBe('not_applicable');
      expect(r.reason).toMatch(/LA57/);
    }
  });
});

describe('A bits a CPU walker may set on a faulting walk', () => {
  const p = {
    gva: 0x8000000000,
    pdeGpa: 0x9000,
    pde: 0x1000n | 1n,
    pteGpa: 0xa000,
    pte: 0n,
    dataGpa: 0xb000,
    record: 0xc000,
  };
  const e = { ec: 0, cr2: 0x8000000000n, pde: 0x1001n, pte: 0n, value: 7n, data: 7n, mayA: 0 };
  const o = { ec: 0, cr2: 0x8000000000n, pde: 0x1021n, pte: 0n, value: 7n, data: 7n };

  it('an A bit the model allows is accepted; without the allowance it is a mismatch', () => {
    expect(agrees(0, p, { ...e, mayA: 1 }, o)).toBe(true);
    expect(agrees(0, p, e, o)).toBe(false);
  });

  it('the allowance covers only A on the named entry: D, another bit, or the other entry still mismatch', () => {
    expect(agrees(0, p, { ...e, mayA: 1 }, { ...o, pde: 0x1061n })).toBe(false);
    expect(agrees(0, p, { ...e, mayA: 2 }, o)).toBe(false);
    expect(agrees(0, p, { ...e, mayA: 3 }, { ...o, pde: 0x1001n, pte: 0x20n })).toBe(true);
    expect(agrees(0, p, { ...e, mayA: 1 }, { ...o, ec: 1 })).toBe(false);
  });
});

/** The matrix's per-case comparisons that failed. */
function caseComparisons(r: CheckResult): Comparison[] {
  return r.comparisons.filter((c) => !c.ok && c.what !== 'mismatching cases' && !c.what.startsWith('coverage'));
}

/** The fields of a case's `{k: v, ...}` expected and observed texts that differ. */
function differingFields(c: Comparison): string[] {
  const fields = (t: string) =>
    new Map(
      t
        .slice(1, -1)
        .split(', ')
        .map((kv) => kv.split(': ') as [string, string]),
    );
  const e = fields(c.expected);
  const o = fields(c.observed);
  return [...new Set([...e.keys(), ...o.keys()])].filter((k) => e.get(k) !== o.get(k)).sort();
}

describe('wrong observations of one case', () => {
  // A supervisor read through a present, writable 4 KiB PTE that faults on its PTE's reserved bit 51.
  const p = {
    gva: 0x8000201238,
    pdeGpa: 0x9000,
    pde: 0xa027n,
    pteGpa: 0xa000,
    pte: 0x8_0000_000b_0003n,
    dataGpa: 0xb238,
    record: 0xc000,
  };
  const e = {
    ec: PFERR.P | PFERR.RSVD,
    cr2: 0x8000201238n,
    pde: 0xa027n,
    pte: 0x8_0000_000b_0003n,
    value: 7n,
    data: 7n,
    mayA: 0,
  };
  const o: Observed = { ec: e.ec, cr2: e.cr2, pde: e.pde, pte: e.pte, value: 0n, data: 7n };
  const diff = (x: Observed) => {
    const c = comparable(0, p, e, x);
    return differingFields({ what: '', expected: show(c.expected), observed: show(c.observed), ok: false });
  };

  it('agrees with what the model says', () => {
    expect(agrees(0, p, e, o)).toBe(true);
    expect(diff(o)).toEqual([]);
  });

  it("compares CR2 with the model's faulting address, to the byte", () => {
    expect(agrees(0, p, e, { ...o, cr2: 0x8000201000n })).toBe(false);
    expect(diff({ ...o, cr2: 0x8000201000n })).toEqual(['cr2']);
    expect(agrees(0, p, e, { ...o, cr2: 0x8000201239n })).toBe(false);
    // The model's CR2, not the case's address: a model that says otherwise is what is compared.
    expect(agrees(0, p, { ...e, cr2: 0x8000201000n }, { ...o, cr2: 0x8000201000n })).toBe(true);
    expect(comparable(0, p, { ...e, cr2: 0x1234n }, o).expected).toMatchObject({ cr2: 0x1234n });
  });

  it('reports a flipped error-code flag, a missing A bit and an extra D bit, each as its own field', () => {
    expect(agrees(0, p, e, { ...o, ec: e.ec ^ PFERR.W })).toBe(false);
    expect(diff({ ...o, ec: e.ec ^ PFERR.W })).toEqual(['fault']);
    expect(agrees(0, p, e, { ...o, pde: e.pde & ~0x20n })).toBe(false);
    expect(diff({ ...o, pde: e.pde & ~0x20n })).toEqual(['pde']);
    expect(agrees(0, p, e, { ...o, pte: e.pte | 0x40n })).toBe(false);
    expect(diff({ ...o, pte: e.pte | 0x40n })).toEqual(['pte']);
    expect(agrees(0, p, e, { ...o, data: 8n })).toBe(false);
    expect(diff({ ...o, data: 8n })).toEqual(['data']);
  });

  it('compares the value of a read that did not fault', () => {
    const ok = { ...e, ec: -1, cr2: 0n };
    const seen: Observed = { ...o, ec: -1, value: 7n };
    expect(agrees(0, p, ok, seen)).toBe(true);
    expect(agrees(0, p, ok, { ...seen, value: 6n })).toBe(false);
    expect(diff({ ...seen, value: 6n }).length).toBeGreaterThan(0);
    expect(agrees(0, p, ok, { ...seen, ec: PFERR.P })).toBe(false);
  });
});

describe('coverage', () => {
  it('offers the classes of the vCPU: 4 control states and no protection-key faults here, 80 states with everything', () => {
    const here = offeredClasses(caseSpace(HOST_LIKE));
    expect(here['control state']).toEqual(['nx=0 wp=0', 'nx=1 wp=0', 'nx=0 wp=1', 'nx=1 wp=1']);
    expect(here.outcome).toEqual(['no fault', 'not present', 'protection', 'reserved bit']);
    expect(here.access).toHaveLength(6);
    const all = offeredClasses(caseSpace({ nx: true, smep: true, smap: true, pku: true, maxPhyAddr: 36 }));
    expect(all['control state']).toHaveLength(80);
    expect(new Set(all['control state']).size).toBe(80);
    expect(all.outcome).toContain('protection key');
  });

  it("names a case's classes", () => {
    const f = CASE.PDE_PS | CASE.USER | CASE.WRITE | CASE.TWICE | CASE.NXE;
    expect(classesOf(f, PFERR.P | PFERR.W | PFERR.U, caseSpace(HOST_LIKE).offered)).toEqual({
      'control state': 'nx=1 wp=0',
      access: 'write after a read',
      CPL: '3',
      leaf: '2 MiB',
      outcome: 'protection',
    });
    expect(classesOf(CASE.PKE | CASE.PKRU_WD, PFERR.P | PFERR.PK, 0xffffffff)['control state']).toBe(
      'nx=0 wp=0 smep=0 smap=0 pke=1 pkru1=wd',
    );
    expect(classesOf(0, PFERR.RSVD | PFERR.P, 0).outcome).toBe('reserved bit');
    expect(classesOf(0, 0, 0).outcome).toBe('not present');
    expect(classesOf(0, -1, 0).outcome).toBe('no fault');
  });

  it('finds nothing missing in a sample that covers the space, and names each class a dropped class leaves out', () => {
    const space = caseSpace(HOST_LIKE);
    const sample = sampleCases(space, 4000, 1);
    const outcomes = [-1, PFERR.P, 0, PFERR.RSVD | PFERR.P];
    const full = new Coverage(space);
    sample.forEach((f, i) => full.add(f, outcomes[i % 4]!));
    expect(full.missing()).toEqual([]);
    expect(full.lines()).toHaveLength(5);
    expect(full.lines()[0]).toMatch(
      /^coverage by control state: nx=0 wp=0: \d+, nx=1 wp=0: \d+, nx=0 wp=1: \d+, nx=1 wp=1: \d+$/,
    );
    const noNx = new Coverage(space);
    sample.forEach((f, i) => f & CASE.NXE || noNx.add(f, outcomes[i % 4]!));
    expect(noNx.missing()).toEqual(['control state: nx=1 wp=0', 'control state: nx=1 wp=1']);
    const noRsvd = new Coverage(space);
    sample.forEach((f, i) => noRsvd.add(f, outcomes[i % 3]!));
    expect(noRsvd.missing()).toEqual(['outcome: reserved bit']);
    const noUser = new Coverage(space);
    sample.forEach((f, i) => f & CASE.USER || noUser.add(f, outcomes[i % 4]!));
    expect(noUser.missing()).toEqual(['CPL: 3']);
  });
});

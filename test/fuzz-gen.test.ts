import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { planArb, realise, STEP_GENS, type GenHost } from '../src/fuzz/gen.js';
import { STEP_KINDS } from '../src/scenario/steps.js';

const HOSTS: Record<string, GenHost> = {
  everything: {
    maxPhyAddr: 48,
    nx: true,
    smep: true,
    smap: true,
    pku: true,
    la57: true,
    pdpe1gb: true,
    preFault: true,
    hugetlb2m: 4,
    races: true,
    pvm: false,
    guestMemfd: true,
  },
  pvm: {
    maxPhyAddr: 48,
    nx: true,
    smep: false,
    smap: false,
    pku: false,
    la57: false,
    pdpe1gb: false,
    preFault: false,
    hugetlb2m: 0,
    races: true,
    pvm: true,
    guestMemfd: false,
  },
};

describe('fuzz generator', () => {
  for (const [name, host] of Object.entries(HOSTS)) {
    it(`every generated scenario passes the validator (${name})`, () => {
      const errs = new Map<string, number>();
      let steps = 0;
      for (const plan of fc.sample(planArb(host), { seed: 1, numRuns: 2000 })) {
        const r = realise(plan, host);
        if (!r.ok) {
          const k = r.errors[0]!.replace(/0x[0-9a-f]+/g, 'N').replace(/\[\d+\]/g, '[i]');
          errs.set(k, (errs.get(k) ?? 0) + 1);
        } else steps += r.scenario.steps.length;
      }
      expect([...errs]).toEqual([]);
    });
  }
});
it('has a generator for every step kind, and each one generates its kind', () => {
  // StepGenTable is a mapped type over Step['kind']: a kind without an entry does not compile;
  // here, that no entry is dead (one that always returns undefined).
  expect(Object.keys(STEP_GENS).sort()).toEqual(Object.keys(STEP_KINDS).sort());
  const host = HOSTS.everything!;
  const seen = new Set<string>();
  let races = 0;
  for (const plan of fc.sample(planArb(host), { seed: 2, numRuns: 1000 })) {
    const r = realise(plan, host);
    if (r.ok) for (const s of r.scenario.steps) seen.add(s.kind === 'access' ? `access ${s.access}` : s.kind);
    if (r.ok && r.scenario.race) races++;
  }
  const want = [...Object.keys(STEP_KINDS).filter((k) => k !== 'access'), 'access read', 'access write', 'access exec'];
  expect([...seen].sort()).toEqual(want.sort());
  expect(races).toBeGreaterThan(0);
});
it('generates slots created by a step over GPAs mappings use, HVA placements and guest loops at edges', () => {
  const host = HOSTS.everything!;
  const seen = new Set<string>();
  for (const plan of fc.sample(planArb(host), { seed: 3, numRuns: 1000 })) {
    const r = realise(plan, host);
    if (!r.ok) continue;
    const sc = r.scenario;
    for (const m of sc.memslots) {
      if (m.hva) seen.add(`hva ${m.hva.modulo} ${m.hva.offset === 0n ? 'aligned' : 'misaligned'}`);
      if (m.backing === 'guest_memfd') seen.add('guest_memfd slot');
      if (m.created === 'by-step' && sc.mappings.some((x) => x.gpa < m.gpa + m.size && m.gpa < x.gpa + x.size))
        seen.add('created under a mapping');
    }
    for (const s of sc.steps) {
      if (s.side !== 'guest' || s.kind !== 'access' || !s.loop) continue;
      if (s.loop.count >= 512) seen.add('loop of 512 or more');
      if (s.loop.stride === 0x200000n) seen.add('loop over 2M edges');
      if (s.loop.stride === BigInt(s.size)) seen.add('loop over one page');
    }
  }
  expect([...seen].sort()).toEqual(
    [
      'created under a mapping',
      'guest_memfd slot',
      'hva 1G aligned',
      'hva 1G misaligned',
      'hva 2M aligned',
      'hva 2M misaligned',
      'loop of 512 or more',
      'loop over 2M edges',
      'loop over one page',
    ].sort(),
  );
});
it('generates no guest_memfd slot or step where guest_memfd slots do not work', () => {
  const host = HOSTS.pvm!;
  for (const plan of fc.sample(planArb(host), { seed: 4, numRuns: 1000 })) {
    const r = realise(plan, host);
    if (!r.ok) continue;
    expect(r.scenario.memslots.filter((m) => m.backing === 'guest_memfd')).toEqual([]);
    expect(r.scenario.steps.filter((s) => s.kind === 'close-guest-memfd')).toEqual([]);
  }
});

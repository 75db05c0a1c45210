import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { planArb, realise, type GenHost } from '../src/fuzz/gen.js';

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
      console.log(name, steps, [...errs].sort((a, b) => b[1] - a[1]).slice(0, 20));
      expect([...errs]).toEqual([]);
    });
  }
});
it('debug', () => {
  const host = HOSTS.pvm!;
  let planned = 0,
    got = 0,
    n = 0;
  const kinds = new Map<string, [number, number]>();
  for (const plan of fc.sample(planArb(host), { seed: 1, numRuns: 500 })) {
    n++;
    planned += plan.steps.length;
    const r = realise(plan, host);
    if (r.ok) got += r.scenario.steps.length;
    for (const s of plan.steps) {
      const k = kinds.get(s.kind) ?? [0, 0];
      k[0]++;
      kinds.set(s.kind, k);
    }
    if (r.ok)
      for (const s of r.scenario.steps) {
        const k = kinds.get(s.kind)!;
        k[1]++;
      }
  }
  console.log(n, planned, got, kinds);
});

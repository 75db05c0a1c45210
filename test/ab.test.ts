// A/B comparison of two kernels' reports: outcomes that differ, and times that
// differ beyond the noise of the repeats.
import { describe, expect, it } from 'vitest';
import { beyondNoise, compareAb } from '../src/lab/ab.js';
import { abTable } from '../src/report/ab-table.js';
import type { CheckResult, Outcome, RunReport } from '../src/run/types.js';

function report(checks: [string, Outcome, number][]): RunReport {
  const cs: CheckResult[] = checks.map(([name, outcome, durationMs]) => ({
    name,
    description: '',
    outcome,
    comparisons: [],
    notes: [],
    durationMs,
  }));
  return {
    host: { arch: 'x86_64', flavour: 'kvm_amd', tdp: { enabled: true, kind: 'npt' }, tdpMmu: true, device: '/dev/kvm' },
    checks: cs,
    summary: {
      total: cs.length,
      passed: 0,
      failed: 0,
      notApplicable: 0,
      errors: 0,
      durationMs: 0,
      notRun: 0,
      casesChecked: 0,
    },
  };
}

describe('A/B comparison', () => {
  it('the same outcomes and overlapping times: nothing differs', () => {
    const r = compareAb(
      [
        report([
          ['a', 'pass', 10],
          ['b', 'not_applicable', 0],
        ]),
        report([
          ['a', 'pass', 12],
          ['b', 'not_applicable', 0],
        ]),
      ],
      [
        report([
          ['a', 'pass', 11],
          ['b', 'not_applicable', 0],
        ]),
        report([
          ['a', 'pass', 13],
          ['b', 'not_applicable', 0],
        ]),
      ],
    );
    expect(r.outcomeDiffs).toBe(0);
    expect(r.timeDiffs).toBe(0);
  });

  it('a check that passes on the baseline and fails on the kernel is reported', () => {
    const r = compareAb(
      [
        report([
          ['a', 'pass', 10],
          ['b', 'pass', 5],
        ]),
      ],
      [
        report([
          ['a', 'fail', 10],
          ['b', 'pass', 5],
        ]),
      ],
    );
    expect(r.rows.filter((x) => x.outcomeDiffers).map((x) => x.name)).toEqual(['a']);
    expect(abTable(r, { baseline: 'B', kernel: 'A' })).toMatch(/^a .*PASS.*FAIL.*<- outcome differs$/m);
  });

  it('a check that flips between repeats of one kernel is reported, and a check missing on one side', () => {
    const r = compareAb(
      [report([['a', 'pass', 10]]), report([['a', 'fail', 10]])],
      [
        report([
          ['a', 'pass', 10],
          ['c', 'pass', 1],
        ]),
        report([
          ['a', 'pass', 10],
          ['c', 'pass', 1],
        ]),
      ],
    );
    expect(r.rows.map((x) => [x.name, x.outcomeDiffers])).toEqual([
      ['a', true],
      ['c', true],
    ]);
  });

  it('times: medians far apart with disjoint ranges differ; overlapping ranges or close medians do not', () => {
    expect(beyondNoise({ median: 10, min: 9, max: 11 }, { median: 20, min: 19, max: 21 })).toBe(true);
    expect(beyondNoise({ median: 10, min: 9, max: 25 }, { median: 20, min: 19, max: 21 })).toBe(false); // overlap
    expect(beyondNoise({ median: 10, min: 10, max: 10 }, { median: 11, min: 11, max: 11 })).toBe(false); // 10 % apart
    const r = compareAb(
      [report([['a', 'pass', 10]]), report([['a', 'pass', 11]]), report([['a', 'pass', 9]])],
      [report([['a', 'pass', 30]]), report([['a', 'pass', 31]]), report([['a', 'pass', 29]])],
    );
    expect(r.timeDiffs).toBe(1);
    expect(r.rows[0]!.kernelMs).toEqual({ median: 30, min: 29, max: 31 });
  });

  it('not-applicable and error runs carry no time', () => {
    const r = compareAb([report([['a', 'not_applicable', 0]])], [report([['a', 'error', 3]])]);
    expect(r.rows[0]!.baselineMs).toBeNull();
    expect(r.rows[0]!.kernelMs).toBeNull();
    expect(r.rows[0]!.outcomeDiffers).toBe(true);
  });
});

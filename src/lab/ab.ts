// A/B: the same checks against two kernels (the one under test and a
// baseline), each run several times in one boot, compared check by check: the
// outcomes that differ, and the timings that differ beyond the noise of the
// repeats. The table is formatted by report/ab-table.ts.
import type { CheckResult, Outcome, RunReport } from '../run/types.js';

/** A timing differs beyond noise when the medians differ by more than this fraction of the smaller one… */
export const TIME_FRACTION = 0.2;
/** …and the repeats' ranges [min, max] do not overlap. */

export interface AbRow {
  name: string;
  /** Outcomes per repeat (a flaky check shows more than one). */
  baseline: Outcome[];
  kernel: Outcome[];
  outcomeDiffers: boolean;
  /** Median ms over the repeats, and their ranges. */
  baselineMs: { median: number; min: number; max: number } | null;
  kernelMs: { median: number; min: number; max: number } | null;
  timeDiffers: boolean;
}

export interface AbReport {
  rows: AbRow[];
  /** Checks whose outcome differs, or whose outcome varied between repeats of one kernel. */
  outcomeDiffs: number;
  timeDiffs: number;
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

function times(rs: CheckResult[]): AbRow['baselineMs'] {
  const ms = rs.filter((r) => r.outcome === 'pass' || r.outcome === 'fail').map((r) => r.durationMs);
  return ms.length ? { median: median(ms), min: Math.min(...ms), max: Math.max(...ms) } : null;
}

/** Whether two timings differ beyond the noise of their repeats. */
export function beyondNoise(a: NonNullable<AbRow['baselineMs']>, b: NonNullable<AbRow['baselineMs']>): boolean {
  const lo = Math.min(a.median, b.median);
  const apart = Math.abs(a.median - b.median) > TIME_FRACTION * lo;
  const disjoint = a.max < b.min || b.max < a.min;
  return apart && disjoint;
}

/** Compares the repeats of each kernel; checks are matched by name, in the baseline's order, then the kernel's extras. */
export function compareAb(baseline: readonly RunReport[], kernel: readonly RunReport[]): AbReport {
  const names: string[] = [];
  for (const r of [...baseline, ...kernel]) for (const c of r.checks) if (!names.includes(c.name)) names.push(c.name);
  const pick = (rs: readonly RunReport[], n: string) => rs.flatMap((r) => r.checks.filter((c) => c.name === n));
  const rows = names.map((name): AbRow => {
    const b = pick(baseline, name);
    const k = pick(kernel, name);
    const bo = b.map((c) => c.outcome);
    const ko = k.map((c) => c.outcome);
    const outcomeDiffers = new Set([...bo, ...ko]).size > 1 || bo.length !== ko.length;
    const baselineMs = times(b);
    const kernelMs = times(k);
    const timeDiffers = !!baselineMs && !!kernelMs && beyondNoise(baselineMs, kernelMs);
    return { name, baseline: bo, kernel: ko, outcomeDiffers, baselineMs, kernelMs, timeDiffers };
  });
  return {
    rows,
    outcomeDiffs: rows.filter((r) => r.outcomeDiffers).length,
    timeDiffs: rows.filter((r) => r.timeDiffers).length,
  };
}

// The checks whose outcomes differ between lab releases under the same
// profile, with each release's outcome and reason: the footer of
// `lab matrix --release A,B`.
import type { Outcome, RunReport } from '../run/types.js';

const MARK: Record<Outcome, string> = {
  pass: 'PASS',
  fail: 'FAIL',
  not_applicable: 'N/A',
  error: 'ERR',
  not_run: 'SKIP',
};

/** One run of the matrix: a release and a profile, and the run's report or why it did not run. */
export interface ReleaseCell {
  release: string;
  profile: string;
  report: RunReport | string;
}

/**
 * For each profile, the checks whose outcome is not the same on every release
 * that ran it: "access-matrix on npt-tdp: 6.1 N/A (no KVM_PRE_FAULT_MEMORY), 7.2 PASS".
 */
export function releaseDiffs(cells: readonly ReleaseCell[]): string[] {
  const out: string[] = [];
  const profiles = [...new Set(cells.map((c) => c.profile))];
  for (const p of profiles) {
    const runs = cells.filter((c) => c.profile === p && typeof c.report !== 'string');
    if (runs.length < 2) continue;
    const names = [...new Set(runs.flatMap((c) => (c.report as RunReport).checks.map((x) => x.name)))];
    for (const n of names) {
      const per = runs.map((c) => ({
        release: c.release,
        check: (c.report as RunReport).checks.find((x) => x.name === n),
      }));
      if (new Set(per.map((x) => x.check?.outcome ?? '-')).size < 2) continue;
      const what = per.map(({ release, check }) => {
        if (!check) return `${release} -`;
        const why = check.outcome === 'pass' ? '' : (check.reason ?? check.comparisons.find((c) => !c.ok)?.what);
        return `${release} ${MARK[check.outcome]}${why ? ` (${why.split('\n')[0]!.slice(0, 160)})` : ''}`;
      });
      out.push(`${n} on ${p}: ${what.join(', ')}`);
    }
  }
  return out;
}

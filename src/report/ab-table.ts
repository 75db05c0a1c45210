// The A/B comparison of two kernels (lab/ab.ts) as a table.
import { TIME_FRACTION, type AbReport, type AbRow } from '../lab/ab.js';
import type { Outcome } from '../run/types.js';
import { MARK } from './report.js';

/** The A/B table spells out an error and a check not run. */
const OUT: Record<Outcome, string> = { ...MARK, error: 'ERROR', not_run: 'NOT RUN' };

function outcomes(os: Outcome[]): string {
  const set = [...new Set(os)];
  return set.length === 1 ? OUT[set[0]!] : os.map((o) => OUT[o]).join('/');
}

function ms(t: AbRow['baselineMs']): string {
  return t ? `${t.median.toFixed(1)} ms (${t.min.toFixed(1)}–${t.max.toFixed(1)})` : '-';
}

/** The table: every check, its outcomes and median times on both kernels, and what differs. */
export function abTable(r: AbReport, labels: { baseline: string; kernel: string }): string {
  const w = Math.max(5, ...r.rows.map((x) => x.name.length));
  const cols = r.rows.map((x) => [outcomes(x.baseline), ms(x.baselineMs), outcomes(x.kernel), ms(x.kernelMs)]);
  const cw = [0, 1, 2, 3].map((j) => Math.max(j % 2 ? 8 : 7, ...cols.map((c) => c[j]!.length)));
  const head = ['baseline', 'time', 'kernel', 'time'].map((h, j) => h.padEnd(cw[j]!)).join('  ');
  const lines = [`baseline: ${labels.baseline}`, `kernel:   ${labels.kernel}`, '', `${'check'.padEnd(w)}  ${head}`];
  r.rows.forEach((x, i) => {
    const marks = [x.outcomeDiffers ? 'outcome differs' : '', x.timeDiffers ? 'time differs' : '']
      .filter(Boolean)
      .join(', ');
    lines.push(
      `${x.name.padEnd(w)}  ${cols[i]!.map((c, j) => c.padEnd(cw[j]!)).join('  ')}${marks ? `  <- ${marks}` : ''}`,
    );
  });
  lines.push(
    '',
    `${r.outcomeDiffs} check(s) with differing outcomes, ${r.timeDiffs} with times that differ beyond noise (medians more than ${TIME_FRACTION * 100}% apart and the repeats' ranges disjoint)`,
  );
  return lines.join('\n');
}

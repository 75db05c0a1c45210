// `lab matrix`: the checks' outcomes per lab profile, as one table.
import type { RunReport } from '../run/types.js';
import { MARK } from './report.js';

/** Checks as rows, profiles as columns; a row is marked where profiles disagree. */
export function matrixTable(results: ReadonlyMap<string, RunReport | string>): string {
  const profiles = [...results.keys()];
  const reports = profiles.map((p) => results.get(p)!);
  const names = [...new Set(reports.flatMap((r) => (typeof r === 'string' ? [] : r.checks.map((c) => c.name))))];
  const w = Math.max(5, ...names.map((n) => n.length));
  const cw = Math.max(...profiles.map((p) => p.length), 4);
  const lines = [`${'check'.padEnd(w)}  ${profiles.map((p) => p.padEnd(cw)).join('  ')}`];
  for (const n of names) {
    // '-': the profile did not run, or the check is not of its architecture.
    const cells = reports.map((r) => {
      const c = typeof r === 'string' ? undefined : r.checks.find((x) => x.name === n);
      return c ? MARK[c.outcome] : '-';
    });
    const differs = new Set(cells.filter((c) => c !== '-')).size > 1;
    lines.push(`${n.padEnd(w)}  ${cells.map((c) => c.padEnd(cw)).join('  ')}${differs ? '  <- differs' : ''}`);
  }
  lines.push('');
  profiles.forEach((p, i) => {
    const r = reports[i]!;
    lines.push(
      typeof r === 'string'
        ? `${p}: ${r}`
        : `${p}: ${r.summary.passed} passed, ${r.summary.failed} failed, ${r.summary.notApplicable} not applicable, ${r.summary.errors} errors`,
    );
  });
  return lines.join('\n');
}

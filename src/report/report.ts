// Formatters only: a RunReport in, text out.
import { nodeArch } from '../arch/arch.js';
import type { CheckResult, Outcome, RunReport } from '../run/types.js';

/** The mark of each outcome, in every table and progress line that prints one. */
export const MARK: Record<Outcome, string> = {
  pass: 'PASS',
  fail: 'FAIL',
  not_applicable: 'N/A',
  error: 'ERR',
  not_run: 'SKIP',
};

/** An outcome's mark padded to one width, for a column. */
export const tag = (o: Outcome): string => MARK[o].padEnd(4);

export function human(r: RunReport): string {
  const out: string[] = [];
  out.push(
    `host: ${r.host.flavour} on ${nodeArch(r.host.arch)}, TDP ${r.host.tdp.enabled ? r.host.tdp.kind : 'off'}, tdp_mmu ${r.host.tdpMmu ? 'on' : 'off'} (${r.host.device})`,
  );
  const w = Math.max(10, ...r.checks.map((c) => c.name.length));
  for (const c of r.checks) {
    out.push(`${tag(c.outcome)}  ${c.name.padEnd(w)}  ${c.durationMs.toFixed(1).padStart(8)} ms  ${c.description}`);
    if (c.cases)
      out.push(
        `      ${c.cases.checked} cases: ${Object.entries(c.cases.byOutcome)
          .map(([k, n]) => `${k} ${n}`)
          .join(', ')}`,
      );
    out.push(...detail(c).map((l) => `      ${l}`));
  }
  const s = r.summary;
  const why = s.interrupted ? ` (interrupted by ${s.interrupted})` : s.stopped ? ` (${s.stopped})` : '';
  const notRun = s.notRun || s.interrupted ? `, ${s.notRun} not run${why}` : '';
  out.push(
    `${s.passed} passed, ${s.failed} failed, ${s.notApplicable} not applicable, ${s.errors} errors${notRun} (${(s.durationMs / 1000).toFixed(2)} s)${s.casesChecked ? `; ${s.casesChecked} cases checked` : ''}`,
  );
  if (s.stopped && !s.notRun) out.push(`stopped: ${s.stopped}`);
  if (r.consoleLog) out.push(`console log of the kernel under test: ${r.consoleLog}`);
  return out.join('\n');
}

/** The lines explaining a result that is not a plain pass. */
function detail(c: CheckResult): string[] {
  const lines: string[] = [];
  if (c.outcome === 'not_applicable') lines.push(`not applicable here: ${c.reason}`);
  if (c.outcome === 'error') lines.push(`error: ${c.reason}`);
  if (c.outcome === 'not_run') lines.push(`not run: ${c.reason}`);
  for (const k of c.kernel ?? []) {
    lines.push(`kernel: ${k.message}`);
    lines.push(...k.excerpt.map((l) => `  | ${l}`));
  }
  for (const m of c.comparisons) {
    if (m.ok) continue;
    lines.push(`${m.what}: expected ${m.expected}`);
    lines.push(`${' '.repeat(m.what.length)}  observed ${m.observed}`);
  }
  if (c.outcome !== 'pass') lines.push(...c.notes);
  return lines;
}

/**
 * The version of the JSON report's format (docs/report.schema.json). Raised
 * when a field is removed or changes meaning; new fields keep it.
 */
export const REPORT_VERSION = 1;

/** The report as JSON; the KVM host's architecture by Node's name, as before it had one. */
export function json(r: RunReport): string {
  return JSON.stringify({ version: REPORT_VERSION, ...r, host: { ...r.host, arch: nodeArch(r.host.arch) } }, null, 2);
}

/** KTAP version 1, as the kernel's KUnit and kselftests print it. */
export function ktap(r: RunReport): string {
  const out = ['KTAP version 1', `1..${r.checks.length}`];
  r.checks.forEach((c, i) => {
    for (const l of detail(c)) out.push(`# ${l}`);
    const name = c.name.replace(/#/g, '_');
    if (c.outcome === 'not_applicable')
      out.push(`ok ${i + 1} ${name} # SKIP not applicable here: ${oneLine(c.reason ?? '')}`);
    else if (c.outcome === 'not_run') out.push(`ok ${i + 1} ${name} # SKIP not run: ${oneLine(c.reason ?? '')}`);
    else out.push(`${c.outcome === 'pass' ? 'ok' : 'not ok'} ${i + 1} ${name}`);
  });
  const s = r.summary;
  if (r.consoleLog) out.push(`# console log of the kernel under test: ${r.consoleLog}`);
  out.push(`# ${totals(s.passed, s.failed, s.notApplicable + s.notRun, s.errors)}`);
  return out.join('\n');
}

/** KTAP's totals line: errors count as failures. */
function totals(p: number, f: number, n: number, e: number): string {
  return `totals: pass:${p} fail:${f + e} skip:${n}`;
}

const oneLine = (s: string) => s.replace(/\s+/g, ' ');

const xml = (s: string) =>
  s.replace(/[&<>"']/g, (ch) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&apos;' })[ch]!);

export function junit(r: RunReport): string {
  const s = r.summary;
  const skipped = s.notApplicable + s.notRun;
  const out = [
    '<?xml version="1.0" encoding="UTF-8"?>',
    // Jenkins' junit-10.xsd allows skipped on <testsuite> only (test/fixtures/junit-10.xsd).
    `<testsuites tests="${s.total}" failures="${s.failed}" errors="${s.errors}" time="${(s.durationMs / 1000).toFixed(3)}">`,
    `  <testsuite name="kvmharness" hostname="${xml(r.host.flavour)}" tests="${s.total}" failures="${s.failed}" errors="${s.errors}" skipped="${skipped}" time="${(s.durationMs / 1000).toFixed(3)}">`,
  ];
  for (const c of r.checks) {
    const open = `    <testcase classname="kvmharness.${xml(r.host.flavour)}" name="${xml(c.name)}" time="${(c.durationMs / 1000).toFixed(3)}"`;
    const body = detail(c).join('\n');
    if (c.outcome === 'pass') out.push(`${open}/>`);
    else if (c.outcome === 'not_applicable')
      out.push(`${open}><skipped message="${xml(`not applicable here: ${oneLine(c.reason ?? '')}`)}"/></testcase>`);
    else if (c.outcome === 'not_run')
      out.push(`${open}><skipped message="${xml(`not run: ${oneLine(c.reason ?? '')}`)}"/></testcase>`);
    else {
      const tag = c.outcome === 'fail' ? 'failure' : 'error';
      const first = c.comparisons.find((m) => !m.ok);
      const msg = c.kernel?.length
        ? (c.reason ?? c.outcome)
        : first
          ? `${first.what}: expected ${first.expected}, observed ${first.observed}`
          : (c.reason ?? c.outcome);
      out.push(`${open}><${tag} message="${xml(oneLine(msg))}">${xml(body)}</${tag}></testcase>`);
    }
  }
  out.push('  </testsuite>', '</testsuites>');
  return out.join('\n');
}

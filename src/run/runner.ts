// Runs checks one after another: each gets a context that records
// comparisons, the differ decides pass/fail, and nothing a check does can stop
// the checks after it.
import { nodeArch, type Arch } from '../arch/arch.js';
import type { Kvm } from '../kvm/kvm.js';
import { HostError, Unsupported } from '../kvm/sys.js';
import type { HostProfile } from '../probe/probe.js';
import type { KernelProblem } from '../kvm/target.js';
import { same, show } from './differ.js';
import { NotApplicable } from '../base/not-applicable.js';
import type { Check, CheckResult, Comparison, RunReport, WrongExpectation, WrongObservation } from './types.js';

export interface RunOptions {
  wrongExpectation?: WrongExpectation;
  wrongObservation?: WrongObservation;
  onResult?: (r: CheckResult) => void;
  onProgress?: (check: string, done: number, total: number) => void;
}

export async function runCheck(
  check: Check,
  kvm: Kvm,
  profile: HostProfile,
  opts: RunOptions = {},
): Promise<CheckResult> {
  const t0 = performance.now();
  const comparisons: Comparison[] = [];
  const notes: string[] = [];
  let cases: CheckResult['cases'];
  const result = (outcome: CheckResult['outcome'], reason?: string): CheckResult => ({
    name: check.name,
    description: check.description,
    outcome,
    comparisons,
    reason,
    notes,
    durationMs: performance.now() - t0,
    ...(cases ? { cases } : {}),
  });
  if (check.arch && check.arch !== profile.arch) {
    return result('not_applicable', `${nodeArch(check.arch)} guest; this KVM host is ${nodeArch(profile.arch)}`);
  }
  const missing = check.needs.filter((o) => !profile.oracles[o].available);
  const oneOf = check.needsOneOf ?? [];
  if (oneOf.length && oneOf.every((o) => !profile.oracles[o].available)) missing.push(...oneOf);
  if (missing.length) {
    return result('not_applicable', missing.map((o) => `${o}: ${profile.oracles[o].why}`).join('; '));
  }
  try {
    await check.run({
      target: kvm.target,
      kvm,
      profile,
      expect(what, expected, observed) {
        const exp = opts.wrongExpectation ? opts.wrongExpectation(check.name, what, expected) : expected;
        const obs = opts.wrongObservation ? opts.wrongObservation(check.name, what, observed) : observed;
        comparisons.push({ what, expected: show(exp), observed: show(obs), ok: same(exp, obs) });
      },
      note: (l) => notes.push(l),
      cases(c) {
        cases ??= { checked: 0, byOutcome: {} };
        cases.checked += c.checked;
        for (const [k, n] of Object.entries(c.byOutcome)) cases.byOutcome[k] = (cases.byOutcome[k] ?? 0) + n;
      },
      progress: (done, total) => opts.onProgress?.(check.name, done, total),
    });
  } catch (e) {
    // The target lacking an operation is "not applicable here" too.
    if (e instanceof NotApplicable || e instanceof Unsupported) return result('not_applicable', e.message);
    if (e instanceof HostError) throw e;
    return result('error', e instanceof Error ? e.message : String(e));
  }
  if (comparisons.length === 0) return result('error', 'the check compared nothing');
  return result(comparisons.every((c) => c.ok) ? 'pass' : 'fail');
}

/**
 * The checks a run takes: a list that holds checks built for this host's
 * architecture (a suite such as smoke, which has both) runs those and the
 * architecture-neutral ones; a list of other architectures' checks only is
 * kept whole, and each is reported not applicable.
 */
export function forHostArch(checks: readonly Check[], arch: Arch): readonly Check[] {
  const own = checks.filter((c) => !c.arch || c.arch === arch);
  return own.length > 0 ? own : checks;
}

export async function runChecks(
  checks: readonly Check[],
  kvm: Kvm,
  profile: HostProfile,
  opts: RunOptions = {},
): Promise<RunReport> {
  const t0 = performance.now();
  const results: CheckResult[] = [];
  const watch = kvm.target.watch;
  // What the kernel logged before the run (its boot) is none of the checks' doing.
  let stopped = watch ? (await watch.since()).dead : undefined;
  for (const c of forHostArch(checks, profile.arch)) {
    if (stopped) {
      const r = notRun(c, stopped);
      results.push(r);
      opts.onResult?.(r);
      continue;
    }
    // A turn of the event loop between checks: a run whose KVM calls are all
    // synchronous (the lab's) would otherwise see Ctrl-C only when it ends.
    await new Promise<void>((resolve) => setImmediate(resolve));
    let r = await runCheck(c, kvm, profile, opts);
    if (watch) {
      const k = await watch.since();
      if (k.problems.length) r = kernelVerdict(r, k.problems);
      if (k.dead) stopped = `the kernel under test stopped during ${c.name}: ${k.dead}`;
    }
    results.push(r);
    opts.onResult?.(r);
  }
  const report = reportOf(profile, results, performance.now() - t0);
  if (stopped) report.summary.stopped = stopped;
  if (watch?.consoleLog) report.consoleLog = watch.consoleLog;
  return report;
}

/**
 * A check during which the kernel under test logged a problem fails, named
 * after the kernel's message; what the check itself found stays in the result.
 */
export function kernelVerdict(r: CheckResult, problems: KernelProblem[]): CheckResult {
  const first = problems[0]!.message;
  const more =
    problems.length > 1 ? ` (and ${problems.length - 1} more kernel message${problems.length > 2 ? 's' : ''})` : '';
  const had =
    r.outcome === 'error' || r.outcome === 'not_applicable' ? [`the check itself: ${r.outcome}: ${r.reason}`] : [];
  return { ...r, outcome: 'fail', reason: `${first}${more}`, kernel: problems, notes: [...had, ...r.notes] };
}

function notRun(c: Check, why: string): CheckResult {
  return {
    name: c.name,
    description: c.description,
    outcome: 'not_run',
    comparisons: [],
    reason: why,
    notes: [],
    durationMs: 0,
  };
}

/** The report of these results. */
export function reportOf(
  profile: HostProfile,
  results: CheckResult[],
  durationMs: number,
  interrupted?: string,
): RunReport {
  const count = (o: CheckResult['outcome']) => results.filter((r) => r.outcome === o).length;
  return {
    host: {
      arch: profile.arch,
      flavour: profile.flavour,
      tdp: profile.tdp,
      tdpMmu: profile.tdpMmu,
      device: profile.device,
    },
    checks: results,
    summary: {
      total: results.length,
      passed: count('pass'),
      failed: count('fail'),
      notApplicable: count('not_applicable'),
      errors: count('error'),
      notRun: count('not_run'),
      ...(interrupted ? { interrupted } : {}),
      durationMs,
      casesChecked: results.reduce((n, r) => n + (r.cases?.checked ?? 0), 0),
    },
  };
}

/**
 * The report of a run interrupted by `signal`: the results it has, then every
 * other check of `checks` (those forHostArch keeps) as not run; the first of
 * them was under way.
 */
export function interruptedReport(
  checks: readonly Check[],
  done: readonly CheckResult[],
  profile: HostProfile,
  durationMs: number,
  signal: string,
): RunReport {
  const rest = forHostArch(checks, profile.arch).filter((c) => !done.some((r) => r.name === c.name));
  const notRun = rest.map((c, i): CheckResult => ({
    name: c.name,
    description: c.description,
    outcome: 'not_run',
    comparisons: [],
    reason: i === 0 ? `interrupted by ${signal} while it ran` : `the run was interrupted by ${signal}`,
    notes: [],
    durationMs: 0,
  }));
  return reportOf(profile, [...done, ...notRun], durationMs, signal);
}

/** 0 when nothing failed or errored; 1 otherwise. */
export function exitStatus(r: RunReport): 0 | 1 {
  return r.summary.failed || r.summary.errors ? 1 : 0;
}

// `kvmharness run`, and the run options `lab run` shares: arguments in,
// checks run, report out.
import { Option, type Command } from 'commander';
import { parseWrong, WRONG_ENV } from '../model/wrong.js';
import { selectChecks, SUITE_DOCS, type MatrixOptions } from '../checks/suites.js';
import { Kvm } from '../kvm/kvm.js';
import { removeStaleInstances } from '../observe/tracefs.js';
import { probe, type HostProfile } from '../probe/probe.js';
import { localFs } from '../target/fs.js';
import { localTarget } from '../target/local.js';
import type { Target } from '../kvm/target.js';
import { human, json, junit, ktap, tag } from '../report/report.js';
import { onInterrupt } from '../base/interrupt.js';
import { exitStatus, forHostArch, interruptedReport, runChecks } from '../run/runner.js';
import type { Check, CheckResult, RunReport } from '../run/types.js';
import { writeReportFile, writeStdout } from './output.js';

/** A usage error: exit status 2 with one line. */
export class UsageError extends Error {}

/** A one-line progress bar on a terminal: `name [#####.....] done/total`. */
function progressBar(check: string, done: number, total: number): void {
  const w = 30;
  const fill = total ? Math.round((done / total) * w) : 0;
  process.stderr.write(`\r\x1b[K${check} [${'#'.repeat(fill)}${'.'.repeat(w - fill)}] ${done}/${total}`);
}

export function deviceOption(): Option {
  return new Option('--device <path>', 'KVM device (default: $KVMHARNESS_DEVICE or /dev/kvm)');
}

export interface RunCliOptions {
  json?: boolean;
  ktap?: boolean;
  junit?: string;
  list?: boolean;
  device?: string;
  sample?: string;
  seed?: string;
  mode?: string;
  /** Print one line per finished check on stderr even when it is not a terminal (lab runs, which take minutes). */
  progressLines?: boolean;
}

/** The options of `run`, shared with `lab run`. */
export function addRunOptions(c: Command): Command {
  return c
    .argument('[names...]', 'checks, suites or scenario files to run')
    .option('--json', 'print the report as JSON')
    .option('--ktap', 'print the report as KTAP')
    .option('--junit <file>', 'also write a JUnit XML report to FILE')
    .option('--list', 'list the checks and exit')
    .option('--sample <n>', 'access matrix: check a reproducible random subset of N cases')
    .option('--seed <s>', 'access matrix: seed of the subset (default 1)')
    .option('--mode <mode>', 'access matrix: 4level or 5level (default 4level)')
    .addOption(deviceOption());
}

/** What `run --help` says after the options: the suites and the exit statuses. */
export function runHelpText(): string {
  const w = Math.max(...Object.keys(SUITE_DOCS).map((n) => n.length));
  return [
    '',
    'Suites (with no names, all of them):',
    ...Object.entries(SUITE_DOCS).map(([n, d]) => `  ${n.padEnd(w)}  ${d}`),
    'A name may also be a check (see --list) or a scenario file (*.json).',
    '',
    'Exit status:',
    '  0      every check passed or was not applicable',
    '  1      a check failed or ended in an error',
    '  2      bad usage, no usable KVM device, a scenario that does not load, or a report not written',
    '  128+N  interrupted by signal N (130 SIGINT, 143 SIGTERM); the report covers what was checked',
  ].join('\n');
}

/** Parses run options into the checks to run. */
export function checksFor(names: string[], o: RunCliOptions): Check[] {
  if (o.json && o.ktap) throw new UsageError('--json and --ktap are exclusive');
  const count = (flag: string, v: string | undefined, min: number) => {
    if (v === undefined) return undefined;
    if (!/^\d+$/.test(v) || Number(v) < min || !Number.isSafeInteger(Number(v)))
      throw new UsageError(`${flag} needs an integer >= ${min}, got '${v}'`);
    return Number(v);
  };
  if (o.mode !== undefined && o.mode !== '4level' && o.mode !== '5level')
    throw new UsageError(`--mode must be 4level or 5level, got '${o.mode}'`);
  const matrix: MatrixOptions = {
    mode: o.mode as MatrixOptions['mode'],
    sample: count('--sample', o.sample, 1),
    seed: count('--seed', o.seed, 0),
  };
  // Test-only: scenario files run with a deliberately wrong model (model/wrong.ts).
  const wrong = process.env[WRONG_ENV] ? parseWrong(process.env[WRONG_ENV]) : undefined;
  return selectChecks(names, matrix, wrong);
}

/** A run under way, for the report of an interrupted run: the host once probed, and the results so far. */
export interface RunSoFar {
  profile?: HostProfile;
  results: CheckResult[];
  startMs: number;
}

/** Runs checks against the KVM of `target` (this host's, or the lab's) and prints the report. */
export async function runReport(
  target: Target,
  checks: Check[],
  o: RunCliOptions,
  soFar?: RunSoFar,
): Promise<RunReport> {
  const prof = probe(target, o.device);
  const kvm = Kvm.open(target, o.device);
  if (soFar) soFar.profile = prof;
  let report: RunReport | undefined;
  try {
    const live = !o.json && !o.ktap && process.stderr.isTTY;
    let done = 0;
    const total = forHostArch(checks, prof.arch).length;
    const show = live
      ? (r: CheckResult) => process.stderr.write(`\r\x1b[K${tag(r.outcome)} ${r.name}\n`)
      : o.progressLines
        ? (r: CheckResult) =>
            process.stderr.write(
              `[${++done}/${total}] ${tag(r.outcome)} ${r.name} (${(r.durationMs / 1000).toFixed(1)} s)\n`,
            )
        : undefined;
    report = await runChecks(checks, kvm, prof, {
      onResult: soFar
        ? (r) => {
            soFar.results.push(r);
            show?.(r);
          }
        : show,
      onProgress: live ? progressBar : undefined,
    });
  } finally {
    try {
      kvm.close();
    } catch (e) {
      // A kernel under test that crashed or hung cannot close its KVM: the report says so.
      if (!report?.summary.stopped) throw e;
    }
  }
  return report;
}

/** Prints the report and writes the JUnit file; resolves once both are written whole (OutputError when not). */
export async function printReport(report: RunReport, o: RunCliOptions): Promise<void> {
  let failed: unknown;
  try {
    await writeStdout((o.json ? json(report) : o.ktap ? ktap(report) : human(report)) + '\n');
  } catch (e) {
    failed = e;
  }
  // The JUnit file is written even when standard output failed.
  if (o.junit) {
    try {
      writeReportFile(o.junit, junit(report) + '\n', 'JUnit');
    } catch (e) {
      failed ??= e;
    }
  }
  if (failed) throw failed;
}

/** `run`: returns the exit status. */
export async function executeRun(names: string[], o: RunCliOptions): Promise<number> {
  const checks = checksFor(names, o);
  if (o.list) {
    for (const c of checks) console.log(`${c.name.padEnd(28)} ${c.description}`);
    return 0;
  }
  removeStaleInstances(localFs);
  // Interrupted (SIGINT, SIGTERM, ...), the run still reports what it checked
  // and marks the rest not run; the process then exits 128 + the signal.
  const soFar: RunSoFar = { results: [], startMs: performance.now() };
  const off = onInterrupt(async (sig) => {
    if (!soFar.profile) {
      process.stderr.write(`kvmharness: interrupted by ${sig} before any check ran\n`);
      return;
    }
    await printReport(
      interruptedReport(checks, soFar.results, soFar.profile, performance.now() - soFar.startMs, sig),
      o,
    );
  });
  let report: RunReport;
  try {
    report = await runReport(localTarget, checks, o, soFar);
  } finally {
    off();
  }
  await printReport(report, o);
  return exitStatus(report);
}

// kvmharness command line: thin; parsing and exit codes only.
import { Command, CommanderError, Option } from 'commander';
import { writeFileSync } from 'node:fs';
import { SMOKE } from '../checks/smoke.js';
import { Kvm } from '../kvm/kvm.js';
import { HostError } from '../kvm/sys.js';
import { probe } from '../probe/probe.js';
import { formatProfile } from '../report/profile.js';
import { human, json, junit, ktap, tag } from '../report/report.js';
import { exitStatus, forHostArch, runChecks } from '../run/runner.js';
import type { Check, RunReport } from '../run/types.js';
import { registerLab } from './lab.js';
import { LabError } from '../lab/profiles.js';
import { scenarioCheck } from '../run/engine.js';
import { builtinScenarios, loadScenario, resolveScenario, ScenarioError } from '../scenario/load.js';
import type { Scenario } from '../scenario/types.js';
import { registerWalk, WalkUsageError } from './walk.js';
import { accessMatrix } from '../matrix/check.js';

/** A usage error: exit status 2 with one line. */
export class UsageError extends Error {}

/** A scenario as two checks: results and A/D, then KVM's walker trace (a race has no single walk to trace: one check). */
function checksOf(sc: Scenario): Check[] {
  return sc.race ? [scenarioCheck(sc)] : [scenarioCheck(sc), scenarioCheck(sc, { trace: true })];
}

/** Every built-in scenario's checks. */
function scenarioChecks(): Check[] {
  return builtinScenarios().flatMap((name) => checksOf(loadScenario(resolveScenario(name))));
}

/** The access-matrix sample of the default run: finishes in well under 30 s here. */
const DEFAULT_MATRIX_SAMPLE = 300_000;

export interface MatrixOptions {
  mode?: '4level' | '5level';
  sample?: number;
  seed?: number;
}

function suites(m: MatrixOptions = {}): Record<string, readonly Check[]> {
  return {
    smoke: SMOKE,
    scenarios: scenarioChecks(),
    'access-matrix': [accessMatrix({ mode: m.mode, seed: m.seed ?? 1, sample: m.sample ?? DEFAULT_MATRIX_SAMPLE })],
  };
}

/**
 * Resolves names to checks, in the order given: suite names, check names, or
 * paths of scenario files (anything ending in .json).
 */
export function selectChecks(names: string[], matrix: MatrixOptions = {}): Check[] {
  const all = suites(matrix);
  // Named explicitly without --sample, the access matrix runs every legal case.
  if (names.includes('access-matrix')) all['access-matrix'] = [accessMatrix({ mode: matrix.mode, seed: matrix.seed ?? 1, sample: matrix.sample })];
  if (names.length === 0) return Object.values(all).flat();
  const everything = Object.values(all).flat();
  const out: Check[] = [];
  for (const n of names) {
    let found: readonly Check[];
    if (n.endsWith('.json')) {
      const sc = loadScenario(n);
      found = checksOf(sc);
    } else {
      found = all[n] ?? everything.filter((c) => c.name === n);
    }
    if (found.length === 0) throw new UsageError(`unknown check or suite '${n}' (see \`kvmharness run --list\`)`);
    for (const c of found) if (!out.some((o) => o.name === c.name)) out.push(c);
  }
  return out;
}

/** A one-line progress bar on a terminal: `name [#####.....] done/total`. */
function progressBar(check: string, done: number, total: number): void {
  const w = 30;
  const fill = total ? Math.round((done / total) * w) : 0;
  process.stderr.write(`\r\x1b[K${check} [${'#'.repeat(fill)}${'.'.repeat(w - fill)}] ${done}/${total}`);
}

function deviceOption(): Option {
  return new Option('--device <path>', 'KVM device (default: $KVMHARNESS_DEVICE or /dev/kvm)');
}

export function program(): Command {
  const p = new Command('kvmharness')
    .description('Drives /dev/kvm, models both dimensions of paging, and cross-checks the model against what KVM did')
    .exitOverride()
    .configureOutput({ writeErr: (s) => process.stderr.write(s) });

  p.command('probe')
    .description('print this host\'s KVM profile and the oracles it offers')
    .option('--json', 'print JSON')
    .addOption(deviceOption())
    .action((o: { json?: boolean; device?: string }) => {
      const prof = probe(o.device);
      console.log(o.json ? JSON.stringify(prof, null, 2) : formatProfile(prof));
    });

  addRunOptions(p.command('run').description('run checks against KVM (default: every built-in check)')).action(
    async (names: string[], o: RunCliOptions) => {
      process.exitCode = await executeRun(names, o);
    },
  );

  registerWalk(p);
  registerLab(p);
  return p;
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

/** Parses run options into the checks to run. */
export function checksFor(names: string[], o: RunCliOptions): Check[] {
  if (o.json && o.ktap) throw new UsageError('--json and --ktap are exclusive');
  const count = (flag: string, v: string | undefined, min: number) => {
    if (v === undefined) return undefined;
    if (!/^\d+$/.test(v) || Number(v) < min || !Number.isSafeInteger(Number(v))) throw new UsageError(`${flag} needs an integer >= ${min}, got '${v}'`);
    return Number(v);
  };
  if (o.mode !== undefined && o.mode !== '4level' && o.mode !== '5level') throw new UsageError(`--mode must be 4level or 5level, got '${o.mode}'`);
  const matrix: MatrixOptions = { mode: o.mode as MatrixOptions['mode'], sample: count('--sample', o.sample, 1), seed: count('--seed', o.seed, 0) };
  return selectChecks(names, matrix);
}

/** Runs checks against the KVM that addon() reaches (this host's, or the lab's) and prints the report. */
export async function runReport(checks: Check[], o: RunCliOptions): Promise<RunReport> {
  const prof = probe(o.device);
  const kvm = Kvm.open(o.device);
  try {
    const live = !o.json && !o.ktap && process.stderr.isTTY;
    let done = 0;
    const total = forHostArch(checks, prof.arch).length;
    return await runChecks(checks, kvm, prof, {
      onResult: live
        ? (r) => process.stderr.write(`\r\x1b[K${tag(r.outcome)} ${r.name}\n`)
        : o.progressLines
          ? (r) => process.stderr.write(`[${++done}/${total}] ${tag(r.outcome)} ${r.name} (${(r.durationMs / 1000).toFixed(1)} s)\n`)
          : undefined,
      onProgress: live ? progressBar : undefined,
    });
  } finally {
    kvm.close();
  }
}

export function printReport(report: RunReport, o: RunCliOptions): void {
  console.log(o.json ? json(report) : o.ktap ? ktap(report) : human(report));
  if (o.junit) writeFileSync(o.junit, junit(report) + '\n');
}

/** `run`: returns the exit status. */
export async function executeRun(names: string[], o: RunCliOptions): Promise<number> {
  const checks = checksFor(names, o);
  if (o.list) {
    for (const c of checks) console.log(`${c.name.padEnd(28)} ${c.description}`);
    return 0;
  }
  const report = await runReport(checks, o);
  printReport(report, o);
  return exitStatus(report);
}

export async function main(argv: string[]): Promise<number> {
  try {
    await program().parseAsync(argv, { from: 'user' });
    return typeof process.exitCode === 'number' ? process.exitCode : 0;
  } catch (e) {
    if (e instanceof CommanderError) return e.exitCode === 0 ? 0 : 2;
    const msg = e instanceof Error ? e.message : String(e);
    process.stderr.write(`kvmharness: ${msg}\n`);
    const expected = e instanceof HostError || e instanceof UsageError || e instanceof ScenarioError || e instanceof WalkUsageError || e instanceof LabError;
    if (process.env.KVMHARNESS_DEBUG && e instanceof Error && !expected) process.stderr.write(`${e.stack}\n`);
    return 2;
  }
}

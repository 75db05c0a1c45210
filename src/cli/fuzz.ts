// `kvmharness fuzz`: a campaign of random scenarios against this host's KVM
// or a lab kernel's; progress on a terminal, a summary at the end, findings
// written out. Exit 1 when anything was found, 0 otherwise, 2 on bad usage.
import type { Command } from 'commander';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { onInterrupt } from '../base/interrupt.js';
import { campaign, type CampaignSummary, type Shard } from '../fuzz/campaign.js';
import { findingJson, writeFinding, type WrittenFinding } from '../fuzz/findings.js';
import { Kvm } from '../kvm/kvm.js';
import type { Target } from '../kvm/target.js';
import { labRelease } from '../lab/fetch/index.js';
import { profile as profileNamed } from '../lab/profiles.js';
import { openLab } from '../lab/session.js';
import { parseWrong, WRONG_ENV, type Wrong } from '../model/wrong.js';
import { removeStaleInstances } from '../observe/tracefs.js';
import { probe, type HostProfile } from '../probe/probe.js';
import { localFs } from '../target/fs.js';
import { localTarget } from '../target/local.js';
import { writeStdout } from './output.js';
import { deviceOption, UsageError } from './run.js';

/** The version of the --json summary (docs/fuzz.schema.json). */
export const FUZZ_REPORT_VERSION = 1;

/** Without --duration or --cases, a campaign runs this long. */
const DEFAULT_DURATION_S = 60;

interface FuzzCliOptions {
  duration?: string;
  seed?: string;
  cases?: string;
  shard?: string;
  lab?: string;
  release?: string;
  kvmSource?: string;
  out?: string;
  json?: boolean;
  maxSteps?: string;
  device?: string;
}

export interface FuzzArgs {
  seed: number;
  cases?: number;
  durationMs?: number;
  shard: Shard;
  /** kvmSource: KVM built from this kernel source tree, as `lab run --kvm-source` boots it. */
  lab?: { profile: string; release?: string; kvmSource?: string };
  out: string;
  json: boolean;
  maxSteps?: number;
  device?: string;
}

const int = (flag: string, v: string, min: number): number => {
  if (!/^\d+$/.test(v) || !Number.isSafeInteger(Number(v)) || Number(v) < min)
    throw new UsageError(`${flag} needs an integer >= ${min}, got '${v}'`);
  return Number(v);
};

/** Whether `dir` holds KVM's sources as --kvm-source builds them (lab/kvm-source.ts checks the same when it builds). */
function isKvmSource(dir: string): boolean {
  return existsSync(join(dir, 'arch', 'x86', 'kvm', 'Makefile')) && existsSync(join(dir, 'virt', 'kvm'));
}

/** The options, checked: a UsageError names the first bad one. */
export function fuzzArgs(o: FuzzCliOptions): FuzzArgs {
  const seed = o.seed === undefined ? 1 : int('--seed', o.seed, 0);
  if (seed > 0xffffffff) throw new UsageError(`--seed must be below 2^32, got '${o.seed}'`);
  let shard: Shard = { index: 1, count: 1 };
  if (o.shard !== undefined) {
    const m = /^(\d+)\/(\d+)$/.exec(o.shard);
    if (!m || Number(m[2]) < 1 || Number(m[1]) < 1 || Number(m[1]) > Number(m[2]))
      throw new UsageError(`--shard needs I/N with 1 <= I <= N, got '${o.shard}'`);
    shard = { index: Number(m[1]), count: Number(m[2]) };
  }
  const cases = o.cases === undefined ? undefined : int('--cases', o.cases, 1);
  let durationMs: number | undefined;
  if (o.duration !== undefined) {
    const s = Number(o.duration);
    if (!/^\d+(\.\d+)?$/.test(o.duration) || !(s > 0))
      throw new UsageError(`--duration needs a positive number of seconds, got '${o.duration}'`);
    durationMs = s * 1000;
  } else if (cases === undefined) durationMs = DEFAULT_DURATION_S * 1000;
  if (o.release !== undefined && o.lab === undefined) throw new UsageError('--release needs --lab PROFILE');
  if (o.kvmSource !== undefined && o.lab === undefined) throw new UsageError('--kvm-source needs --lab PROFILE');
  if (o.kvmSource !== undefined && !isKvmSource(o.kvmSource))
    throw new UsageError(
      `--kvm-source ${o.kvmSource} is not a kernel source tree with arch/x86/kvm and virt/kvm (\`lab source --release R DIR\` makes one)`,
    );
  if (o.lab !== undefined) {
    const p = profileNamed(o.lab);
    if (p.arch !== 'x86_64')
      throw new UsageError(`--lab ${o.lab}: scenarios are x86; use npt-tdp, npt-legacy or shadow`);
    if (o.release !== undefined) labRelease(o.release);
  }
  if (o.lab !== undefined && o.device !== undefined) throw new UsageError('--device is for this host, not with --lab');
  return {
    seed,
    ...(cases !== undefined ? { cases } : {}),
    ...(durationMs !== undefined ? { durationMs } : {}),
    shard,
    ...(o.lab !== undefined
      ? {
          lab: {
            profile: o.lab,
            ...(o.release ? { release: o.release } : {}),
            ...(o.kvmSource !== undefined ? { kvmSource: o.kvmSource } : {}),
          },
        }
      : {}),
    out: o.out ?? 'fuzz-findings',
    json: !!o.json,
    ...(o.maxSteps !== undefined ? { maxSteps: int('--max-steps', o.maxSteps, 1) } : {}),
    ...(o.device !== undefined ? { device: o.device } : {}),
  };
}

export function registerFuzz(program: Command): Command {
  return program
    .command('fuzz')
    .description('run random scenarios judged by the models after every step; shrink and write out what fails')
    .option('--duration <s>', `run for S seconds (default ${DEFAULT_DURATION_S} when --cases is not given)`)
    .option('--seed <n>', 'seed of the campaign: the same seed gives the same cases (default 1)')
    .option('--cases <n>', 'run N cases (of this shard)')
    .option('--shard <i/n>', 'run shard I of N: the cases k with k mod N = I-1')
    .option('--lab <profile>', "fuzz a lab kernel's KVM: npt-tdp, npt-legacy or shadow")
    .option('--release <r>', 'with --lab: the lab kernel release (default: the newest)')
    .option(
      '--kvm-source <dir>',
      "with --lab: build KVM from this kernel source tree against the release's headers and fuzz it (as lab run)",
    )
    .option('--out <dir>', 'where findings are written (default fuzz-findings)')
    .option('--max-steps <n>', 'most steps per scenario (default 24)')
    .option('--json', 'print the summary as JSON (docs/fuzz.schema.json)')
    .addOption(deviceOption())
    .addHelpText(
      'after',
      [
        '',
        'Exit status:',
        '  0  nothing found',
        '  1  a finding (a mismatch, a case that could not finish, or a kernel complaint), written to --out',
        '  2  bad usage or no usable KVM',
      ].join('\n'),
    )
    .action(async (o: FuzzCliOptions) => {
      process.exitCode = await executeFuzz(fuzzArgs(o));
    });
}

/** `fuzz`: returns the exit status. */
export async function executeFuzz(a: FuzzArgs): Promise<number> {
  const wrong = process.env[WRONG_ENV] ? parseWrong(process.env[WRONG_ENV]) : undefined;
  if (!a.lab) {
    removeStaleInstances(localFs);
    return fuzzOn(localTarget, a, wrong);
  }
  const log = (s: string) => void process.stderr.write(`${s.startsWith('lab: ') ? s : `lab: ${s}`}\n`);
  const s = await openLab({ profile: a.lab.profile, release: a.lab.release, kvmSource: a.lab.kvmSource, log });
  try {
    const from = a.lab.kvmSource ? `, KVM built from ${a.lab.kvmSource}` : '';
    return await fuzzOn(s.target, a, wrong, `${a.lab.profile} ${s.kernel.version}${from}`);
  } finally {
    await s.close();
  }
}

async function fuzzOn(target: Target, a: FuzzArgs, wrong: Wrong | undefined, lab?: string): Promise<number> {
  const profile = probe(target, a.device);
  const kvm = Kvm.open(target, a.device);
  let stop = false;
  let printed: () => void = () => {};
  const summaryPrinted = new Promise<void>((resolve) => (printed = resolve));
  // A signal ends the campaign after the case under way; the process exits
  // 128 + the signal once the summary of the cases before it is printed.
  const off = onInterrupt(async (sig) => {
    stop = true;
    process.stderr.write(`\nkvmharness fuzz: ${sig}: ending the campaign\n`);
    await summaryPrinted;
  });
  const tty = process.stderr.isTTY && !a.json;
  let lastShown = 0;
  const written: WrittenFinding[] = [];
  let sum: CampaignSummary | undefined;
  try {
    sum = await campaign(kvm, profile, {
      seed: a.seed,
      cases: a.cases,
      durationMs: a.durationMs,
      shard: a.shard,
      maxSteps: a.maxSteps,
      wrong,
      stop: () => stop,
      onProgress(p) {
        const now = performance.now();
        if (now - lastShown < (tty ? 250 : 10_000)) return;
        lastShown = now;
        const s = p.elapsedMs / 1000;
        const line =
          `cases ${p.cases} (${(p.cases / s).toFixed(1)}/s)  steps ${p.steps} (${(p.steps / s).toFixed(0)}/s)  ` +
          `findings ${p.findings}  ${s.toFixed(0)} s`;
        process.stderr.write(tty ? `\r\x1b[K${line}` : `fuzz: ${line}\n`);
      },
      async onFinding(f) {
        const w = await writeFinding(a.out, written.length + 1, f, { seed: a.seed, profile, wrong, lab: !!lab });
        written.push(w);
        if (tty) process.stderr.write('\r\x1b[K');
        process.stderr.write(`finding: ${f.signature} (${f.steps} steps, shrunk from ${f.originalSteps}): ${w.dir}\n`);
      },
    });
  } finally {
    try {
      kvm.close();
    } catch (e) {
      // A kernel that crashed or hung took the VM with it: the campaign's finding says so.
      if (sum?.ended !== 'kernel') throw e;
    }
  }
  try {
    if (tty) process.stderr.write('\r\x1b[K');
    const text = a.json
      ? JSON.stringify(summaryJson(sum, profile, written, lab), null, 2)
      : summaryText(sum, written, lab);
    await writeStdout(text + '\n');
  } finally {
    printed();
    off();
  }
  return sum.findings.length > 0 ? 1 : 0;
}

const rate = (n: number, ms: number) => (ms > 0 ? (n * 1000) / ms : 0);

/** The --json summary (docs/fuzz.schema.json). */
export function summaryJson(
  s: CampaignSummary,
  profile: HostProfile,
  written: readonly WrittenFinding[],
  lab?: string,
): Record<string, unknown> {
  return {
    version: FUZZ_REPORT_VERSION,
    seed: s.seed,
    shard: `${s.shard.index}/${s.shard.count}`,
    host: {
      flavour: profile.flavour,
      tdp: profile.tdp.enabled,
      tdpMmu: profile.tdpMmu,
      kernel: profile.kernel?.release ?? null,
      ...(lab ? { lab } : {}),
    },
    walkerTrace: s.trace,
    cases: s.cases,
    steps: s.steps,
    durationMs: Math.round(s.durationMs),
    casesPerSecond: Number(rate(s.cases, s.durationMs).toFixed(2)),
    stepsPerSecond: Number(rate(s.steps, s.durationMs).toFixed(1)),
    ended: s.ended,
    outcomes: s.outcomes,
    notApplicable: Object.entries(s.notApplicable).map(([reason, count]) => ({ reason, count })),
    findings: s.findings.map((f, i) => ({
      ...findingJson(f),
      dir: written[i]?.dir ?? null,
      ...(written[i]?.reproducer ? { reproducer: written[i]!.reproducer } : {}),
    })),
  };
}

export function summaryText(s: CampaignSummary, written: readonly WrittenFinding[], lab?: string): string {
  const sec = s.durationMs / 1000;
  const o = s.outcomes;
  const lines = [
    `fuzz      seed ${s.seed}, shard ${s.shard.index}/${s.shard.count}${lab ? `, lab ${lab}` : ''}; ended by ${s.ended}`,
    `cases     ${s.cases} in ${sec.toFixed(1)} s (${rate(s.cases, s.durationMs).toFixed(1)}/s), ${s.steps} steps (${rate(s.steps, s.durationMs).toFixed(0)}/s)`,
    `oracles   every model of the scenario engine${s.trace ? ", KVM's walker tracepoints" : ''}${lab ? ', the kernel log' : ''}`,
    `outcomes  pass ${o.pass}, not applicable ${o.notApplicable}, fail ${o.fail}, error ${o.error}${o.invalid ? `, invalid scenarios ${o.invalid}` : ''}`,
  ];
  for (const [why, n] of Object.entries(s.notApplicable)) lines.push(`  not applicable ${n}x: ${why}`);
  lines.push(`findings  ${s.findings.length}`);
  s.findings.forEach((f, i) => {
    lines.push(
      `  ${f.signature}: case ${f.caseIndex}, ${f.steps} steps (shrunk from ${f.originalSteps}), seen ${f.repeats + 1}x`,
    );
    if (f.mismatch)
      lines.push(
        `    ${f.mismatch.what}`,
        `      expected ${f.mismatch.expected}`,
        `      observed ${f.mismatch.observed}`,
      );
    else if (f.verdict.reason) lines.push(`    ${f.verdict.reason}`);
    const w = written[i];
    if (w)
      lines.push(
        `    ${w.dir}${w.reproducer ? `  (reproducer.c: ${w.reproducer.exitCode ?? w.reproducer.note})` : ''}`,
      );
  });
  return lines.join('\n');
}

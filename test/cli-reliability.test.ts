// Reports that survive pipes, full disks, signals and PID namespaces, and
// tracefs instances that never outlive their run.
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { human, junit, ktap } from '../src/report/report.js';
import { interruptedReport } from '../src/run/runner.js';
import type { Check, CheckResult } from '../src/run/types.js';
import type { HostProfile } from '../src/probe/probe.js';
import { describeKvm } from './support/kvm.js';

const CLI = join(import.meta.dirname, '..', 'dist', 'src', 'cli', 'bin.js');
const INSTANCES = '/sys/kernel/tracing/instances';
const instancesOf = (pid: number | undefined) =>
  existsSync(INSTANCES) ? readdirSync(INSTANCES).filter((d) => d.startsWith(`kvmharness-${pid}-`)) : [];
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Runs a shell command line (bash, pipefail) with CLI bound to the command line's program. */
function sh(line: string, timeout = 180_000) {
  const r = spawnSync('bash', ['-o', 'pipefail', '-c', line], {
    encoding: 'utf8',
    env: { ...process.env, CLI: `${process.execPath} ${CLI}` },
    timeout,
    maxBuffer: 64 << 20,
  });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

function start(args: string[]) {
  const child = spawn(process.execPath, [CLI, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise<{ code: number | null; stdout: string; stderr: string }>((r) =>
    child.on('close', (code) => r({ code, stdout, stderr })),
  );
  return { child, exited };
}

async function untilInstance(pid: number | undefined, limitMs = 60_000): Promise<void> {
  const deadline = Date.now() + limitMs;
  while (instancesOf(pid).length === 0) {
    if (Date.now() > deadline) throw new Error(`process ${pid} created no tracefs instance within ${limitMs} ms`);
    await sleep(5);
  }
}

describe('the report of an interrupted run', () => {
  const profile = {
    arch: 'x86_64',
    flavour: 'kvm',
    tdp: { enabled: false },
    tdpMmu: false,
    device: '/dev/kvm',
  } as unknown as HostProfile;
  const check = (name: string): Check => ({ name, description: `${name} does things`, needs: [], run: async () => {} });
  const checks = ['a', 'b', 'c', 'd'].map(check);
  const done: CheckResult[] = [
    { name: 'a', description: 'a does things', outcome: 'pass', comparisons: [], notes: [], durationMs: 1 },
  ];
  const r = interruptedReport(checks, done, profile, 5, 'SIGTERM');

  it('marks the check under way and the rest not run', () => {
    expect(r.checks.map((c) => [c.name, c.outcome])).toEqual([
      ['a', 'pass'],
      ['b', 'not_run'],
      ['c', 'not_run'],
      ['d', 'not_run'],
    ]);
    expect(r.checks[1]!.reason).toBe('interrupted by SIGTERM while it ran');
    expect(r.checks[2]!.reason).toBe('the run was interrupted by SIGTERM');
    expect(r.summary).toMatchObject({ total: 4, passed: 1, notRun: 3, interrupted: 'SIGTERM' });
  });

  it('says so in every format', () => {
    const h = human(r);
    expect(h).toMatch(/^SKIP {2}b /m);
    expect(h).toMatch(/^ {6}not run: interrupted by SIGTERM while it ran$/m);
    expect(h.split('\n').at(-1)).toMatch(
      /^1 passed, 0 failed, 0 not applicable, 0 errors, 3 not run \(interrupted by SIGTERM\) /,
    );
    const k = ktap(r);
    expect(k).toContain('ok 3 c # SKIP not run: the run was interrupted by SIGTERM');
    expect(k.split('\n').at(-1)).toBe('# totals: pass:1 fail:0 skip:3');
    const j = junit(r);
    expect(j).toContain(
      '<testcase classname="kvmharness.kvm" name="d" time="0.000"><skipped message="not run: the run was interrupted by SIGTERM"/></testcase>',
    );
    expect(j).toMatch(/<testsuite name="kvmharness" [^>]*tests="4" failures="0" errors="0" skipped="3"/);
  });

  it('an uninterrupted summary line is as before', () => {
    const whole = interruptedReport([], done, profile, 5, 'SIGTERM');
    delete whole.summary.interrupted;
    expect(human(whole).split('\n').at(-1)).toBe('1 passed, 0 failed, 0 not applicable, 0 errors (0.01 s)');
  });
});

describeKvm('reports that survive pipes and signals', () => {
  it('a consumer reading the JSON report from a pipe gets all of it', () => {
    const r = sh(
      `$CLI run scenarios --json | node -e 'const t = require("fs").readFileSync(0, "utf8"); JSON.parse(t); console.log(t.length)'`,
    );
    expect(r.status, r.stderr).toBe(0);
    // Well beyond a pipe's 64 KiB.
    expect(Number(r.stdout.trim())).toBeGreaterThan(256 * 1024);
  });

  it('a report that cannot be written is one line and exit 2', () => {
    const r = sh('$CLI run real_mode_io --json > /dev/full');
    expect(r.status).toBe(2);
    expect(r.stderr).toMatch(/^kvmharness: writing the report to standard output failed: ENOSPC[^\n]*\n$/);
    const dir = mkdtempSync(join(tmpdir(), 'kvmharness-full-'));
    try {
      const j = sh(`$CLI run real_mode_io --junit ${dir}/no/such/dir/junit.xml`);
      expect(j.status).toBe(2);
      expect(j.stderr).toMatch(
        new RegExp(`^kvmharness: writing the JUnit report to ${dir}/no/such/dir/junit.xml failed: ENOENT[^\\n]*\\n$`),
      );
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('SIGTERM five seconds into a run: exit 143, the JSON report and JUnit file whole, the rest not run', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'kvmharness-term-'));
    try {
      const file = join(dir, 'junit.xml');
      const { child, exited } = start(['run', '--json', '--junit', file]);
      await sleep(5000);
      child.kill('SIGTERM');
      const { code, stdout } = await exited;
      expect(code).toBe(143);
      const rep = JSON.parse(stdout);
      expect(rep.summary.interrupted).toBe('SIGTERM');
      expect(rep.summary.notRun).toBeGreaterThan(0);
      expect(rep.summary.passed + rep.summary.notApplicable + rep.summary.notRun).toBe(rep.summary.total);
      // Every check of the run is there: those checked, then those not run.
      const first = rep.checks.findIndex((c: CheckResult) => c.outcome === 'not_run');
      expect(rep.checks.slice(first).every((c: CheckResult) => c.outcome === 'not_run')).toBe(true);
      expect(rep.checks.at(-1).name).toBe('access-matrix');
      const x = readFileSync(file, 'utf8');
      expect(x).toMatch(/^<\?xml version="1.0" encoding="UTF-8"\?>\n<testsuites [^>]*>\n {2}<testsuite [^>]*>\n/);
      expect(x).toMatch(/ {2}<\/testsuite>\n<\/testsuites>\n$/);
      expect(x.match(/<testcase /g)?.length).toBe(rep.summary.total);
      expect(x.match(/<skipped message="not run: /g)?.length).toBe(rep.summary.notRun);
      expect(instancesOf(child.pid)).toEqual([]);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  for (const [sig, code] of [
    ['SIGQUIT', 131],
    ['SIGUSR2', 140],
  ] as const) {
    it(`${sig} removes the run's tracefs instance and reports (exit ${code})`, async () => {
      const { child, exited } = start(['run', 'scenarios', '--ktap']);
      await untilInstance(child.pid);
      child.kill(sig);
      const r = await exited;
      expect(r.code).toBe(code);
      expect(r.stdout).toMatch(new RegExp(`# SKIP not run: the run was interrupted by ${sig}\\n# totals: `));
      expect(instancesOf(child.pid)).toEqual([]);
    });
  }

  it('after SIGKILL, the next run removes the stale tracefs instance and says so', async () => {
    const { child, exited } = start(['run', 'scenarios']);
    await untilInstance(child.pid);
    child.kill('SIGKILL');
    await exited;
    const left = instancesOf(child.pid);
    expect(left.length).toBe(1);
    // An instance younger than 2 s may be a live run's that has not opened its trace_marker yet.
    await sleep(2100);
    const r = sh('$CLI run real_mode_io');
    expect(r.status, r.stderr).toBe(0);
    expect(r.stderr).toContain(`kvmharness: removed stale tracefs instance ${left[0]}\n`);
    expect(instancesOf(child.pid)).toEqual([]);
  });
});

const canUnshare = process.getuid?.() === 0 && spawnSync('unshare', ['-p', '-f', '--mount-proc', 'true']).status === 0;
const TRACE_CHECKS = 'nx:walker-trace accessed_dirty:walker-trace shadow_pages_follow_guest_tables';

describeKvm('inside a PID namespace', () => {
  it.skipIf(!canUnshare)('trace checks pass, two runs at once', async () => {
    const line = `unshare -p -f --mount-proc $CLI run ${TRACE_CHECKS} --json`;
    const run = () =>
      new Promise<{ code: number | null; stdout: string; stderr: string }>((resolve) => {
        const c = spawn('bash', ['-c', line], { env: { ...process.env, CLI: `${process.execPath} ${CLI}` } });
        let stdout = '';
        let stderr = '';
        c.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
        c.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
        c.on('close', (code) => resolve({ code, stdout, stderr }));
      });
    const results = await Promise.all([run(), run()]);
    for (const r of results) {
      expect(r.code, r.stdout + r.stderr).toBe(0);
      const rep = JSON.parse(r.stdout);
      // The walker trace is unavailable only where tracefs is; then these are not applicable.
      expect(rep.summary.failed + rep.summary.errors, r.stdout).toBe(0);
      expect(rep.summary.passed + rep.summary.notApplicable).toBe(3);
    }
  });
});

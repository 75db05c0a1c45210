// A lab kernel that crashes, hangs or warns in the middle of a run
// (KVMHARNESS_LAB=1: boots the lab under QEMU): the check that ran fails,
// named after the kernel's message, the report is complete in --json, the
// exit status is 1, and the console log is kept where the report says. The
// faults are injected when a named check starts (src/lab/fault.ts). Also: the
// bring-up slot 0 is MADV_NOHUGEPAGE in the lab, whose THP mode is "always".
import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Ajv2020 } from 'ajv/dist/2020.js';
import { afterAll, describe, expect, it } from 'vitest';
import { X86Guest } from '../src/arch/x86/guest.js';
import { Kvm } from '../src/kvm/kvm.js';
import { openLab } from '../src/lab/session.js';

const live = process.env.KVMHARNESS_LAB === '1';
const ROOT = join(import.meta.dirname, '..');
const BIN = join(ROOT, 'dist', 'src', 'cli', 'bin.js');
// Only where the lab tests run: the hooks of a file whose tests are all skipped do not run.
const results = live ? mkdtempSync(join(tmpdir(), 'kvmharness-crashtest-')) : '';
afterAll(() => void (results && rmSync(results, { recursive: true, force: true })));
const validate = new Ajv2020({ allErrors: true, strict: true }).compile(
  JSON.parse(readFileSync(join(ROOT, 'docs', 'report.schema.json'), 'utf8')),
);

/** The check the fault hits: the second of the smoke suite on x86. */
const HIT = 'long_mode_store_load';

interface Report {
  checks: { name: string; outcome: string; reason?: string; kernel?: { message: string; excerpt: string[] }[] }[];
  summary: { total: number; failed: number; notRun: number; stopped?: string };
  consoleLog?: string;
}

async function labRun(fault: string): Promise<{ status: number | null; report: Report; stderr: string }> {
  const child = spawn(process.execPath, [BIN, 'lab', 'run', '--profile', 'npt-tdp', '--', 'run', 'smoke', '--json'], {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, KVMHARNESS_LAB_FAULT: `${HIT}=${fault}`, KVMHARNESS_RESULTS: results },
  });
  let out = '';
  let err = '';
  child.stdout.on('data', (d: Buffer) => (out += d.toString()));
  child.stderr.on('data', (d: Buffer) => (err += d.toString()));
  const status = await new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
  let report: Report;
  try {
    report = JSON.parse(out) as Report;
  } catch {
    throw new Error(`no JSON report on stdout (exit ${status}):\n${out}\n${err}`);
  }
  expect(validate(report), JSON.stringify(validate.errors)).toBe(true);
  return { status, report, stderr: err };
}

describe.skipIf(!live || process.arch !== 'x64')('a lab kernel that crashes, hangs or warns mid-run', () => {
  it('a panic fails the check that ran, names the kernel message, and the rest is not run', async () => {
    const { status, report } = await labRun('panic');
    expect(status).toBe(1);
    const hit = report.checks.findIndex((c) => c.name === HIT);
    expect(hit).toBeGreaterThan(0);
    expect(report.checks[hit]).toMatchObject({ outcome: 'fail', reason: 'kernel panic: sysrq triggered crash' });
    expect(
      report.checks[hit]!.kernel![0]!.excerpt.some((l) =>
        l.includes('Kernel panic - not syncing: sysrq triggered crash'),
      ),
    ).toBe(true);
    expect(report.checks.slice(0, hit).every((c) => c.outcome === 'pass')).toBe(true);
    expect(
      report.checks.slice(hit + 1).every((c) => c.outcome === 'not_run' && c.reason!.includes(`stopped during ${HIT}`)),
    ).toBe(true);
    expect(report.summary.total).toBe(report.checks.length);
    expect(report.summary.stopped).toBe(
      `the kernel under test stopped during ${HIT}: kernel panic: sysrq triggered crash`,
    );
    // The whole console, kept in the results directory.
    expect(report.consoleLog!.startsWith(results)).toBe(true);
    const log = readFileSync(report.consoleLog!, 'latin1');
    expect(log).toContain('KVMHARNESS-LAB-READY');
    expect(log).toContain('Kernel panic - not syncing: sysrq triggered crash');
    expect(log).toContain('Call Trace:');
  }, 120_000);

  it('a hang (no reply within the deadline) is the verdict of the check that ran', async () => {
    const t0 = Date.now();
    const { status, report } = await labRun('hang');
    expect(status).toBe(1);
    const hit = report.checks.find((c) => c.name === HIT)!;
    expect(hit.outcome).toBe('fail');
    expect(hit.reason).toMatch(/^hang: no reply from the lab within 20 s$/);
    expect(report.summary.notRun).toBe(report.checks.length - 1 - report.checks.findIndex((c) => c.name === HIT));
    expect(existsSync(report.consoleLog!)).toBe(true);
    expect(Date.now() - t0).toBeLessThan(90_000);
  }, 150_000);

  it('a new KVM warning in the kernel log fails the check during which it was logged; the run goes on', async () => {
    const { status, report } = await labRun('warn');
    expect(status).toBe(1);
    const hit = report.checks.find((c) => c.name === HIT)!;
    expect(hit).toMatchObject({
      outcome: 'fail',
      reason: 'WARNING in kvmharness_injected_warning: kvmharness: an injected warning',
    });
    expect(report.checks.filter((c) => c.outcome === 'fail').map((c) => c.name)).toEqual([HIT]);
    expect(report.summary.notRun).toBe(0);
    expect(report.summary.stopped).toBeUndefined();
    expect(existsSync(report.consoleLog!)).toBe(true);
  }, 120_000);

  it("the bring-up slot 0 is MADV_NOHUGEPAGE in the lab's agent (THP always)", async () => {
    const prev = process.env.KVMHARNESS_RESULTS;
    process.env.KVMHARNESS_RESULTS = results;
    const s = await openLab({ profile: 'npt-tdp', log: () => {} });
    try {
      expect(s.target.fs.read('/sys/kernel/mm/transparent_hugepage/enabled')).toContain('[always]');
      const kvm = Kvm.open(s.target);
      const g = X86Guest.create(kvm);
      try {
        expect(g.vm.memslot(0).vmFlags()).toContain('nh');
      } finally {
        g.close();
        kvm.close();
      }
    } finally {
      await s.close();
      if (prev === undefined) delete process.env.KVMHARNESS_RESULTS;
      else process.env.KVMHARNESS_RESULTS = prev;
    }
  }, 120_000);
});

import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { describeKvm } from './support/kvm.js';

const CLI = join(import.meta.dirname, '..', 'dist', 'src', 'cli', 'bin.js');

function cli(args: string[], env: Record<string, string> = {}) {
  const r = spawnSync(process.execPath, [CLI, ...args], { encoding: 'utf8', env: { ...process.env, ...env }, timeout: 120_000 });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

describe('kvmharness CLI without KVM', () => {
  it('exits 2 with one clear line when the device does not exist', () => {
    const r = cli(['run'], { KVMHARNESS_DEVICE: '/nonexistent' });
    expect(r.status).toBe(2);
    expect(r.stderr.trim().split('\n')).toEqual([expect.stringMatching(/^kvmharness: \/nonexistent does not exist: this host has no KVM/)]);
    expect(r.stdout).toBe('');
  });

  it('honours --device over the environment', () => {
    const r = cli(['probe', '--device', '/nonexistent2']);
    expect(r.status).toBe(2);
    expect(r.stderr).toMatch(/^kvmharness: \/nonexistent2 does not exist/);
  });

  it('says a non-KVM device is not KVM, without a stack trace', () => {
    const r = cli(['probe', '--device', '/dev/null']);
    expect(r.status).toBe(2);
    expect(r.stderr).toMatch(/^kvmharness: \/dev\/null is not a KVM device \(KVM_GET_API_VERSION failed: ENOTTY\)\n$/);
  });

  it('exits 2 on usage errors', () => {
    expect(cli(['frobnicate']).status).toBe(2);
    const r = cli(['run', 'no_such_check']);
    expect(r.status).toBe(2);
    expect(r.stderr).toBe("kvmharness: unknown check or suite 'no_such_check' (see `kvmharness run --list`)\n");
    expect(cli(['run', '--json', '--ktap']).status).toBe(2);
  });

  it('lists checks without touching KVM', () => {
    const r = cli(['run', '--list'], { KVMHARNESS_DEVICE: '/nonexistent' });
    expect(r.status).toBe(0);
    expect(r.stdout).toMatch(/^real_mode_io /m);
  });
});

describeKvm('kvmharness CLI on this host', () => {
  it('probe --json describes this host and its oracles', () => {
    const r = cli(['probe', '--json']);
    expect(r.status).toBe(0);
    const p = JSON.parse(r.stdout);
    expect(p.apiVersion).toBe(12);
    expect(Object.keys(p.oracles)).toContain('walker_tracepoints');
    if (existsSync('/sys/module/kvm_pvm')) {
      expect(p.flavour).toBe('kvm_pvm');
      expect(p.tdp.enabled).toBe(false);
      expect(p.tdpMmu).toBe(false);
      expect(p.oracles.tdp_spte_tracepoints.available).toBe(false);
      expect(p.oracles.stats_faults.available).toBe(false);
    }
  });

  it('run --ktap is valid KTAP and agrees with run --json', () => {
    const k = cli(['run', 'smoke', '--ktap']);
    expect(k.status, k.stdout + k.stderr).toBe(0);
    const lines = k.stdout.trim().split('\n');
    expect(lines[0]).toBe('KTAP version 1');
    const plan = Number(lines[1]!.match(/^1\.\.(\d+)$/)![1]);
    const results = lines.filter((l) => /^(not )?ok \d+ /.test(l));
    expect(results.length).toBe(plan);
    results.forEach((l, i) => expect(l).toMatch(new RegExp(`^(not )?ok ${i + 1} \\S+`)));
    const j = cli(['run', 'smoke', '--json']);
    expect(j.status).toBe(0);
    const rep = JSON.parse(j.stdout);
    const okCount = results.filter((l) => l.startsWith('ok ') && !l.includes('# SKIP')).length;
    expect(rep.summary.passed).toBe(okCount);
    expect(rep.summary.failed).toBe(0);
    expect(rep.summary.passed + rep.summary.notApplicable).toBe(plan);
    expect(rep.summary.passed).toBeGreaterThanOrEqual(7);
  });

  it('writes a JUnit file', () => {
    const dir = mkdtempSync(join(tmpdir(), 'kvmharness-junit-'));
    try {
      const file = join(dir, 'junit.xml');
      const r = cli(['run', 'real_mode_io', '--junit', file]);
      expect(r.status).toBe(0);
      expect(readFileSync(file, 'utf8')).toMatch(/<testcase classname="kvmharness\.[^"]+" name="real_mode_io"/);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

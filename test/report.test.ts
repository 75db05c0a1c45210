import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { human, json, junit, ktap } from '../src/report/report.js';
import type { RunReport } from '../src/run/types.js';

const report: RunReport = {
  host: {
    arch: 'x86_64',
    flavour: 'kvm_pvm',
    tdp: { enabled: false, kind: 'none' },
    tdpMmu: false,
    device: '/dev/kvm',
  },
  checks: [
    {
      name: 'a_pass',
      description: 'passes',
      outcome: 'pass',
      comparisons: [{ what: 'x', expected: '1', observed: '1', ok: true }],
      notes: [],
      durationMs: 1,
    },
    {
      name: 'b_fail',
      description: 'fails',
      outcome: 'fail',
      comparisons: [{ what: 'gpa', expected: '0x10', observed: '0x11', ok: false }],
      notes: ['walk: L4'],
      durationMs: 2,
    },
    {
      name: 'c_na',
      description: 'n/a',
      outcome: 'not_applicable',
      reason: 'tdp_spte_tracepoints: no TDP on this host',
      comparisons: [],
      notes: [],
      durationMs: 0,
    },
    {
      name: 'd_err',
      description: 'errs',
      outcome: 'error',
      reason: 'KVM_RUN failed: EFAULT',
      comparisons: [],
      notes: [],
      durationMs: 0,
    },
  ],
  summary: { total: 4, passed: 1, failed: 1, notApplicable: 1, errors: 1, durationMs: 3, notRun: 0, casesChecked: 0 },
};

/** Jenkins' JUnit schema, and xmllint (Debian's libxml2-utils) to check a file against it. */
const JUNIT_XSD = join(import.meta.dirname, 'fixtures', 'junit-10.xsd');
const xmllint = (file: string) => spawnSync('xmllint', ['--noout', '--schema', JUNIT_XSD, file], { encoding: 'utf8' });

describe('reporters', () => {
  it('KTAP: version line, plan, one result line per check, SKIP for not applicable', () => {
    const lines = ktap(report).split('\n');
    expect(lines[0]).toBe('KTAP version 1');
    expect(lines[1]).toBe('1..4');
    const results = lines.filter((l) => /^(not )?ok \d+ /.test(l));
    expect(results).toEqual([
      'ok 1 a_pass',
      'not ok 2 b_fail',
      'ok 3 c_na # SKIP not applicable here: tdp_spte_tracepoints: no TDP on this host',
      'not ok 4 d_err',
    ]);
    expect(lines).toContain('# gpa: expected 0x10');
    expect(
      lines.every((l) => l.startsWith('#') || /^(not )?ok \d+ /.test(l) || l === 'KTAP version 1' || l === '1..4'),
    ).toBe(true);
  });

  it('human: names the failing comparison with expected and observed', () => {
    const h = human(report);
    expect(h).toMatch(/FAIL {2}b_fail/);
    expect(h).toMatch(/gpa: expected 0x10\n\s+observed 0x11/);
    expect(h).toMatch(/not applicable here: tdp_spte_tracepoints/);
    expect(h.trim().split('\n').at(-1)).toMatch(/^1 passed, 1 failed, 1 not applicable, 1 errors/);
  });

  it('JSON keeps the summary fields', () => {
    const j = JSON.parse(json(report));
    expect(j.summary).toMatchObject({ passed: 1, failed: 1, notApplicable: 1, errors: 1 });
  });

  it("prints the KVM host's architecture by Node's name, in text and JSON", () => {
    expect(human(report).split('\n')[0]).toBe('host: kvm_pvm on x64, TDP off, tdp_mmu off (/dev/kvm)');
    expect(Object.keys(JSON.parse(json(report)).host)).toEqual(Object.keys(report.host));
    expect(JSON.parse(json(report)).host.arch).toBe('x64');
    expect(JSON.parse(json({ ...report, host: { ...report.host, arch: 'arm64' } })).host.arch).toBe('arm64');
  });

  it('JUnit: counts, a failure with the first mismatch, a skipped case, escaped text', () => {
    const x = junit({
      ...report,
      checks: report.checks.map((c) => (c.name === 'd_err' ? { ...c, reason: 'a<b & "c"' } : c)),
    });
    expect(x).toMatch(/<testsuites tests="4" failures="1" errors="1" time="/);
    expect(x).toMatch(/<testsuite name="kvmharness" hostname="kvm_pvm" tests="4" failures="1" errors="1" skipped="1"/);
    expect(x).toMatch(/<failure message="gpa: expected 0x10, observed 0x11">/);
    expect(x).toMatch(/<skipped message="not applicable here: /);
    expect(x).toContain('a&lt;b &amp; &quot;c&quot;');
  });

  it("JUnit validates against Jenkins' junit-10.xsd (xmllint, package libxml2-utils)", () => {
    const dir = mkdtempSync(join(tmpdir(), 'kvmharness-junit-xsd-'));
    try {
      // Every outcome, markup in every text, and a long run's time.
      const all: RunReport = {
        ...report,
        checks: report.checks.map((c) => ({
          ...c,
          reason: c.reason && `${c.reason} <&> "'`,
          notes: ['a <note> & more'],
        })),
        summary: { ...report.summary, durationMs: 1234567.891 },
      };
      const file = join(dir, 'junit.xml');
      writeFileSync(file, junit(all) + '\n');
      const r = xmllint(file);
      expect(r.error, 'xmllint (apt-get install libxml2-utils)').toBeUndefined();
      expect(r.stderr).toBe(`${file} validates\n`);
      expect(r.status).toBe(0);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('the schema test can fail: skipped on <testsuites> is rejected', () => {
    const dir = mkdtempSync(join(tmpdir(), 'kvmharness-junit-xsd-'));
    try {
      const file = join(dir, 'junit.xml');
      writeFileSync(file, junit(report).replace('<testsuites ', '<testsuites skipped="1" '));
      const r = xmllint(file);
      expect(r.stderr).toMatch(/attribute 'skipped': The attribute 'skipped' is not allowed/);
      expect(r.status).not.toBe(0);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

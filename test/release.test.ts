import { describe, expect, it } from 'vitest';
import { labRelease, NEWEST_RELEASE } from '../src/lab/fetch/index.js';
import { checkSeries, releaseRoot } from '../src/lab/fetch/release.js';
import { LabError } from '../src/lab/profiles.js';
import { releaseDiffs } from '../src/report/release-diff.js';
import type { CheckResult, RunReport } from '../src/run/types.js';

const check = (name: string, outcome: CheckResult['outcome'], reason?: string): CheckResult => ({
  name,
  description: '',
  outcome,
  comparisons: [],
  notes: [],
  durationMs: 1,
  ...(reason ? { reason } : {}),
});
const report = (checks: CheckResult[]): RunReport => ({
  host: { arch: 'x86_64', flavour: 'kvm_amd', tdp: { enabled: true, kind: 'npt' }, tdpMmu: true, device: '/dev/kvm' },
  checks,
  summary: {
    total: checks.length,
    passed: 0,
    failed: 0,
    notApplicable: 0,
    errors: 0,
    notRun: 0,
    durationMs: 1,
    casesChecked: 0,
  },
});

describe('lab releases', () => {
  it('names releases by kernel series or suite; the newest is the default', () => {
    expect(labRelease(undefined).name).toBe(NEWEST_RELEASE);
    expect(labRelease('6.12').suite).toBe('trixie');
    expect(labRelease('bookworm').name).toBe('6.1');
    expect(() => labRelease('5.10')).toThrow(LabError);
  });

  it('keeps 6.1 where the lab always cached its kernel, and the others apart', () => {
    expect(releaseRoot('/c', labRelease('6.1'), 'x86_64')).toBe('/c/x86_64');
    expect(releaseRoot('/c', labRelease('7.2'), 'arm64')).toBe('/c/7.2/arm64');
  });

  it('refuses a suite whose kernel has moved to another series', () => {
    expect(() => checkSeries(labRelease('7.2'), '7.2.13-1', 'linux-image-7.2.13+deb14-amd64')).not.toThrow();
    expect(() => checkSeries(labRelease('7.2'), '7.3.1-1', 'linux-image-7.3.1+deb14-amd64')).toThrow(
      /not of the 7\.2 series/,
    );
  });

  it('names the checks whose outcome differs between releases, with the reason', () => {
    const diffs = releaseDiffs([
      {
        release: '6.1',
        profile: 'npt-tdp',
        report: report([check('a', 'pass'), check('pre-fault', 'not_applicable', 'no KVM_PRE_FAULT_MEMORY')]),
      },
      { release: '7.2', profile: 'npt-tdp', report: report([check('a', 'pass'), check('pre-fault', 'pass')]) },
      { release: '7.2', profile: 'shadow', report: 'did not boot: x' },
    ]);
    expect(diffs).toEqual(['pre-fault on npt-tdp: 6.1 N/A (no KVM_PRE_FAULT_MEMORY), 7.2 PASS']);
  });
});

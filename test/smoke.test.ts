import { expect, it } from 'vitest';
import { X86_SMOKE as SMOKE } from '../src/checks/smoke.js';
import { Kvm } from '../src/kvm/kvm.js';
import type { HostProfile } from '../src/probe/probe.js';
import { runCheck } from '../src/run/runner.js';
import type { WrongExpectation } from '../src/run/types.js';
import { describeKvm, failures, withHost } from './support/kvm.js';
import { wrong } from './support/wrong.js';

describeKvm('smoke suite on this host', () => {
  let kvm: Kvm;
  let profile: HostProfile;
  withHost((k, p) => {
    kvm = k;
    profile = p;
  });

  it('has at least 7 checks with unique names', () => {
    const names = SMOKE.map((c) => c.name);
    expect(names.length).toBeGreaterThanOrEqual(7);
    expect(new Set(names).size).toBe(names.length);
  });

  for (const check of SMOKE) {
    it(`${check.name} passes`, async () => {
      const r = await runCheck(check, kvm, profile);
      const why = failures(r);
      if (r.outcome === 'not_applicable') {
        // Only for an oracle the probe says this host lacks, with the reason.
        expect(check.needs.some((o) => !profile.oracles[o].available), why).toBe(true);
        expect(r.reason).toMatch(/\S/);
        return;
      }
      expect(r.outcome, why).toBe('pass');
      expect(r.comparisons.length).toBeGreaterThan(0);
    });

    it(`${check.name} reports a deliberately wrong expectation`, async () => {
      // Each comparison of the check in turn gets a wrong expectation; the
      // check must fail and name exactly that comparison.
      const clean = await runCheck(check, kvm, profile);
      if (clean.outcome !== 'not_applicable') expect(clean.comparisons.length).toBeGreaterThan(0);
      for (const target of clean.comparisons.map((c) => c.what)) {
        const wrongExpectation: WrongExpectation = (_c, what, expected) => (what === target ? wrong(expected) : expected);
        const r = await runCheck(check, kvm, profile, { wrongExpectation });
        expect(r.outcome, `a wrong expectation for '${target}'`).toBe('fail');
        expect(r.comparisons.filter((c) => !c.ok).map((c) => c.what)).toEqual([target]);
      }
    });
  }
});

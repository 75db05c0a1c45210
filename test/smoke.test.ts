import { expect, it } from 'vitest';
import { X86_SMOKE as SMOKE } from '../src/checks/smoke.js';
import { Kvm } from '../src/kvm/kvm.js';
import type { HostProfile } from '../src/probe/probe.js';
import { runCheck } from '../src/run/runner.js';
import type { WrongExpectation, WrongObservation } from '../src/run/types.js';
import { describeKvm, failures, withHost } from './support/kvm.js';
import { wrongs } from './support/wrong.js';

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
        expect(
          check.needs.some((o) => !profile.oracles[o].available) ||
            (!!check.needsOneOf && check.needsOneOf.every((o) => !profile.oracles[o].available)),
          why,
        ).toBe(true);
        expect(r.reason).toMatch(/\S/);
        return;
      }
      expect(r.outcome, why).toBe('pass');
      expect(r.comparisons.length).toBeGreaterThan(0);
    });

    it(`${check.name} reports a deliberately wrong expectation`, async () => {
      // Each comparison of the check in turn gets each wrong expectation that
      // keeps the shape (same-length bytes, a neighbouring value, one page more
      // or less: test/support/wrong.ts); the check must fail and name exactly
      // that comparison.
      const clean = await runCheck(check, kvm, profile);
      if (clean.outcome !== 'not_applicable') expect(clean.comparisons.length).toBeGreaterThan(0);
      for (const target of clean.comparisons.map((c) => c.what)) {
        for (let k = 0; ; k++) {
          let variants = 0;
          const wrongExpectation: WrongExpectation = (_c, what, expected) => {
            if (what !== target) return expected;
            const all = wrongs(expected);
            variants = all.length;
            return all[k];
          };
          const r = await runCheck(check, kvm, profile, { wrongExpectation });
          expect(r.outcome, `wrong expectation ${k} for '${target}'`).toBe('fail');
          expect(r.comparisons.filter((c) => !c.ok).map((c) => c.what)).toEqual([target]);
          if (k + 1 >= variants) break;
        }
      }
    });

    it(`${check.name} reports each wrong observation`, async () => {
      // The same from the other side: each observation made wrong in turn, as a
      // KVM that got one thing wrong would report it.
      const clean = await runCheck(check, kvm, profile);
      for (const target of clean.comparisons.map((c) => c.what)) {
        for (let k = 0; ; k++) {
          let variants = 0;
          const wrongObservation: WrongObservation = (_c, what, observed) => {
            if (what !== target) return observed;
            const all = wrongs(observed);
            variants = all.length;
            return all[k];
          };
          const r = await runCheck(check, kvm, profile, { wrongObservation });
          expect(r.outcome, `wrong observation ${k} for '${target}'`).toBe('fail');
          expect(r.comparisons.filter((c) => !c.ok).map((c) => c.what)).toEqual([target]);
          if (k + 1 >= variants) break;
        }
      }
    });
  }

  // Observations KVM could wrongly produce, each named by the comparison it spoils.
  const byName = (name: string) => SMOKE.find((c) => c.name === name)!;
  type Fault = { vector: number; errorCode: bigint; cr2: bigint };
  type Pte = { at: bigint; value: bigint };
  const KVM_MISTAKES: [string, string, string, (o: unknown) => unknown, RegExp][] = [
    [
      'a page-aligned CR2',
      'guest_page_fault',
      'exception log',
      (o) => (o as Fault[]).map((x) => ({ ...x, cr2: x.cr2 & ~0xfffn })),
      /cr2: 0x70001000\b/,
    ],
    [
      'one flipped error-code flag',
      'guest_page_fault',
      'exception log',
      (o) => (o as Fault[]).map((x, i) => (i === 1 ? { ...x, errorCode: x.errorCode ^ 4n } : x)),
      /errorCode: 0x7\b/,
    ],
    [
      'a missing A bit',
      'dirty_log_walker_ad',
      'PTEs after the walk',
      (o) => (o as Pte[]).map((x, i) => (i === 0 ? { ...x, value: x.value & ~0x20n } : x)),
      /value: 0x[0-9a-f]*[0-9a-f][013489cd]\b/,
    ],
    [
      'an extra dirty page',
      'dirty_log_walker_ad',
      'dirty pages',
      (o) => [...(o as string[]), `0x${(BigInt((o as string[]).at(-1)!) + 0x1000n).toString(16)}`],
      /\S/,
    ],
    ['a missing dirty page', 'dirty_log_walker_ad', 'dirty pages', (o) => (o as string[]).slice(1), /\S/],
  ];
  for (const [mistake, name, target, tamper, seen] of KVM_MISTAKES) {
    it(`${name} reports ${mistake}, naming '${target}'`, async () => {
      const check = byName(name);
      const clean = await runCheck(check, kvm, profile);
      if (clean.outcome === 'not_applicable') return;
      const r = await runCheck(check, kvm, profile, {
        wrongObservation: (_c, what, o) => (what === target ? tamper(o) : o),
      });
      expect(r.outcome).toBe('fail');
      const bad = r.comparisons.filter((c) => !c.ok);
      expect(bad.map((c) => c.what)).toEqual([target]);
      expect(bad[0]!.observed).toMatch(seen);
    });
  }
});

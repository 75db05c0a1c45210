// Whether this machine can run the tests that need /dev/kvm. They skip with a
// visible reason when it cannot, except when KVMHARNESS_REQUIRE_KVM=1 (CI):
// then a missing KVM fails the suite.
import { afterAll, beforeAll, describe, it } from 'vitest';
import { Kvm } from '../../src/kvm/kvm.js';
import { localTarget } from '../../src/target/local.js';
import { probe, type HostProfile } from '../../src/probe/probe.js';
import type { CheckResult } from '../../src/run/types.js';

export const kvmRequired = process.env.KVMHARNESS_REQUIRE_KVM === '1';

export const kvmUnavailable: string | undefined = (() => {
  // The unit tests alone (the mutation run): KVMHARNESS_NO_KVM=1 skips every test that needs KVM.
  if (process.env.KVMHARNESS_NO_KVM === '1') return 'KVMHARNESS_NO_KVM=1';
  try {
    Kvm.open(localTarget).close();
    return undefined;
  } catch (e) {
    return (e as Error).message;
  }
})();

/** describe() for tests that need KVM. */
export function describeKvm(name: string, fn: () => void): void {
  if (!kvmUnavailable) {
    describe(name, fn);
  } else if (kvmRequired) {
    describe(name, () => {
      it('has KVM (KVMHARNESS_REQUIRE_KVM=1)', () => {
        throw new Error(`KVM is required here but unavailable: ${kvmUnavailable}`);
      });
    });
  } else {
    describe.skip(`${name} [skipped: ${kvmUnavailable}]`, fn);
  }
}

/** Opens KVM and probes the host once for a describe block; closes KVM after it. */
export function withHost(use: (kvm: Kvm, profile: HostProfile) => void): void {
  let kvm: Kvm | undefined;
  beforeAll(() => {
    kvm = Kvm.open(localTarget);
    use(kvm, probe(localTarget));
  });
  afterAll(() => kvm?.close());
}

/** A check result's reason and failed comparisons, for assertion messages. */
export function failures(r: CheckResult, most = Infinity): string {
  const bad = r.comparisons.filter((c) => !c.ok).slice(0, most);
  return [r.reason, ...bad.map((c) => `${c.what}: expected ${c.expected} observed ${c.observed}`)].join('\n');
}

// Whether this machine can run the tests that need /dev/kvm. They skip with a
// visible reason when it cannot, except when KVMHARNESS_REQUIRE_KVM=1 (CI):
// then a missing KVM fails the suite.
import { describe, it } from 'vitest';
import { Kvm } from '../../src/kvm/kvm.js';

export const kvmRequired = process.env.KVMHARNESS_REQUIRE_KVM === '1';

export const kvmUnavailable: string | undefined = (() => {
  try {
    Kvm.open().close();
    return undefined;
  } catch (e) {
    return (e as Error).message;
  }
})();

/** describe() for tests that need KVM. */
export function describeKvm(name: string, fn: () => void): void {
  if (!kvmUnavailable) return describe(name, fn);
  if (kvmRequired) {
    return describe(name, () => {
      it('has KVM (KVMHARNESS_REQUIRE_KVM=1)', () => {
        throw new Error(`KVM is required here but unavailable: ${kvmUnavailable}`);
      });
    });
  }
  return describe.skip(`${name} [skipped: ${kvmUnavailable}]`, fn);
}

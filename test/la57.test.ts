// 5-level paging and KVM's rule for CR4.LA57 in KVM_SET_SREGS: the bit is
// reserved unless the vCPU's CPUID offers LA57 *and* KVM itself supports it.
// A CPUID that claims LA57 where KVM lacks it must give "not applicable" with
// the reason, never an error.
import { afterAll, beforeAll, expect, it } from 'vitest';
import { X86Guest } from '../src/arch/x86/guest.js';
import type { CpuidEntry } from '../src/kvm/cpuid.js';
import { Kvm } from '../src/kvm/kvm.js';
import { NotApplicable } from '../src/base/not-applicable.js';
import { localTarget } from '../src/target/local.js';
import { describeKvm } from './support/kvm.js';

const LA57 = 1 << 16; // CPUID.(EAX=7,ECX=0):ECX[16]

describeKvm('5-level paging bring-up', () => {
  let kvm: Kvm;
  beforeAll(() => {
    kvm = Kvm.open(localTarget);
  });
  afterAll(() => kvm.close());

  const leaf7 = (c: CpuidEntry[]) => c.find((e) => e.function === 7 && e.index === 0);
  const isX86 = process.arch === 'x64';

  it.skipIf(!isX86)('a vCPU whose CPUID lacks LA57 is not applicable before any ioctl', () => {
    const cpuid = kvm.supportedCpuid().map((e) => (e === leaf7([e]) ? { ...e, ecx: e.ecx & ~LA57 } : e));
    expect(() => X86Guest.create(kvm, { levels: 5, cpuid })).toThrow(NotApplicable);
  });

  it.skipIf(!isX86)('a CPUID that claims LA57 KVM does not support: not applicable, not KVM_SET_SREGS EINVAL', () => {
    const supported = kvm.supportedCpuid();
    const kvmHasLa57 = !!((leaf7(supported)?.ecx ?? 0) & LA57);
    const cpuid = supported.map((e) => (e === leaf7([e]) ? { ...e, ecx: e.ecx | LA57 } : e));
    let err: unknown;
    try {
      X86Guest.create(kvm, { levels: 5, cpuid }).close();
    } catch (e) {
      err = e;
    }
    if (kvmHasLa57) {
      expect(err).toBeUndefined();
    } else {
      expect(err).toBeInstanceOf(NotApplicable);
      expect((err as Error).message).toMatch(/KVM refuses CR4\.LA57 \(KVM_SET_SREGS: EINVAL\)/);
    }
  });

  it.skipIf(!isX86)('4-level bring-up is unaffected by a CPUID that claims LA57', () => {
    const cpuid = kvm.supportedCpuid().map((e) => (e === leaf7([e]) ? { ...e, ecx: e.ecx | LA57 } : e));
    X86Guest.create(kvm, { levels: 4, cpuid }).close();
  });
});

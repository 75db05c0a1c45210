// arm64 vCPU set-up on the generic Vm / Vcpu: the preferred target, VCPU_INIT
// with its feature bits, and registers through KVM_GET_ONE_REG /
// KVM_SET_ONE_REG (arm64 has no KVM_GET_REGS / KVM_SET_REGS). The ioctls are
// the wrappers of src/kvm (Vm.armPreferredTarget, Vcpu.armVcpuInit,
// Vcpu.getOneReg / setOneReg, which take the register ids below).
import type { Vcpu } from '../../kvm/vcpu.js';
import type { Vm } from '../../kvm/vm.js';
import type { VcpuInit } from '../../kvm/arm64.js';
import { ARM64_CORE, arm64CoreReg, KVM_ARM_VCPU_PSCI_0_2 } from '../../uapi/uapi.js';

export type { VcpuInit } from '../../kvm/arm64.js';

/** KVM_ARM_PREFERRED_TARGET on the VM: the target KVM suggests for this host's CPUs. */
export function preferredTarget(vm: Vm): VcpuInit {
  return vm.armPreferredTarget();
}

/**
 * KVM_ARM_VCPU_INIT with the preferred target and the given feature bits
 * (bit numbers of features[0], e.g. KVM_ARM_VCPU_PSCI_0_2). Calling it again
 * resets the vCPU: registers to their reset values (EL1h, interrupts masked,
 * MMU off) and the vCPU runnable.
 */
export function vcpuInit(vcpu: Vcpu, target: VcpuInit, bits: readonly number[] = [KVM_ARM_VCPU_PSCI_0_2]): void {
  const features = [...target.features];
  for (const bit of bits) features[bit >> 5] = ((features[bit >> 5] ?? 0) | (1 << (bit & 31))) >>> 0;
  vcpu.armVcpuInit({ target: target.target, features });
}

/** One-reg ids of the core registers the guests use. */
export const REG = {
  x: (n: number): bigint => {
    if (!Number.isInteger(n) || n < 0 || n > 30) throw new RangeError(`x${n}: not a general-purpose register`);
    return arm64CoreReg(ARM64_CORE.x(n));
  },
  sp: arm64CoreReg(ARM64_CORE.sp),
  pc: arm64CoreReg(ARM64_CORE.pc),
  pstate: arm64CoreReg(ARM64_CORE.pstate),
} as const;

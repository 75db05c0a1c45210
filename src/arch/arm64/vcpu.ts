// arm64 vCPU set-up on the generic Vm / Vcpu: the preferred target, VCPU_INIT
// with its feature bits, and registers through KVM_GET_ONE_REG /
// KVM_SET_ONE_REG (arm64 has no KVM_GET_REGS / KVM_SET_REGS). Thin, total
// wrappers like src/kvm/kvm.ts: a value or a KvmError naming the call.
import type { Vcpu, Vm } from '../../kvm/kvm.js';
import { addon, check } from '../../kvm/sys.js';
import { ARM64_CORE, ARM64_IOCTL, ARM64_SIZEOF, arm64CoreReg, KVM_ARM_VCPU_PSCI_0_2 } from '../../uapi/uapi.js';

/** struct kvm_vcpu_init, decoded. */
export interface VcpuInit {
  target: number;
  /** features[0..6] as 32-bit words. */
  features: number[];
}

function encodeInit(init: VcpuInit): Uint8Array {
  const b = new Uint8Array(ARM64_SIZEOF.kvm_vcpu_init);
  const dv = new DataView(b.buffer);
  dv.setUint32(0, init.target >>> 0, true);
  for (let i = 0; i < 7; i++) dv.setUint32(4 + 4 * i, (init.features[i] ?? 0) >>> 0, true);
  return b;
}

/** KVM_ARM_PREFERRED_TARGET on the VM: the target KVM suggests for this host's CPUs. */
export function preferredTarget(vm: Vm): VcpuInit {
  const b = new Uint8Array(ARM64_SIZEOF.kvm_vcpu_init);
  check('KVM_ARM_PREFERRED_TARGET', addon().ioctlBuf(vm.fd, ARM64_IOCTL.KVM_ARM_PREFERRED_TARGET, b));
  const dv = new DataView(b.buffer);
  return { target: dv.getUint32(0, true), features: Array.from({ length: 7 }, (_, i) => dv.getUint32(4 + 4 * i, true)) };
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
  check('KVM_ARM_VCPU_INIT', addon().ioctlBuf(vcpu.fd, ARM64_IOCTL.KVM_ARM_VCPU_INIT, encodeInit({ target: target.target, features })), `target ${target.target}`);
}

/** KVM_GET_ONE_REG of a 64-bit register. */
export function getOneReg(vcpu: Vcpu, id: bigint): bigint {
  const value = new BigUint64Array(1);
  const b = new BigUint64Array([id, addon().addressOf(value)]);
  check('KVM_GET_ONE_REG', addon().ioctlBuf(vcpu.fd, ARM64_IOCTL.KVM_GET_ONE_REG, b), `reg 0x${id.toString(16)}`);
  return value[0]!;
}

/** KVM_SET_ONE_REG of a 64-bit register. */
export function setOneReg(vcpu: Vcpu, id: bigint, v: bigint): void {
  const value = new BigUint64Array([BigInt.asUintN(64, v)]);
  const b = new BigUint64Array([id, addon().addressOf(value)]);
  check('KVM_SET_ONE_REG', addon().ioctlBuf(vcpu.fd, ARM64_IOCTL.KVM_SET_ONE_REG, b), `reg 0x${id.toString(16)}`);
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

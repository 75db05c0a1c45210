// struct kvm_vcpu_init, which KVM_ARM_PREFERRED_TARGET fills and
// KVM_ARM_VCPU_INIT takes.
import { ARM64_SIZEOF } from '../uapi/uapi.js';

/** struct kvm_vcpu_init, decoded. */
export interface VcpuInit {
  target: number;
  /** features[0..6] as 32-bit words. */
  features: number[];
}

export function encodeVcpuInit(init: VcpuInit, b = new Uint8Array(ARM64_SIZEOF.kvm_vcpu_init)): Uint8Array {
  const dv = new DataView(b.buffer, b.byteOffset, b.byteLength);
  dv.setUint32(0, init.target >>> 0, true);
  for (let i = 0; i < 7; i++) dv.setUint32(4 + 4 * i, (init.features[i] ?? 0) >>> 0, true);
  return b;
}

export function decodeVcpuInit(b: Uint8Array): VcpuInit {
  const dv = new DataView(b.buffer, b.byteOffset, b.byteLength);
  const features = Array.from({ length: 7 }, (_, i) => dv.getUint32(4 + 4 * i, true));
  return { target: dv.getUint32(0, true), features };
}

// CPUID entries as KVM_GET_SUPPORTED_CPUID, KVM_SET_CPUID2 and KVM_GET_CPUID2
// carry them: a struct kvm_cpuid2 header and its kvm_cpuid_entry2 array.
import { SIZEOF } from '../uapi/uapi.js';

export interface CpuidEntry {
  function: number;
  index: number;
  flags: number;
  eax: number;
  ebx: number;
  ecx: number;
  edx: number;
}

/** A kvm_cpuid2 holding `entries`, with room for `capacity` of them. */
export function cpuidBuffer(entries: readonly CpuidEntry[], capacity = entries.length): Uint8Array {
  const b = new Uint8Array(SIZEOF.kvm_cpuid2 + capacity * SIZEOF.kvm_cpuid_entry2);
  const dv = new DataView(b.buffer);
  dv.setUint32(0, capacity, true);
  entries.forEach((e, i) => {
    const o = SIZEOF.kvm_cpuid2 + i * SIZEOF.kvm_cpuid_entry2;
    [e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx].forEach((v, j) =>
      dv.setUint32(o + 4 * j, v >>> 0, true),
    );
  });
  return b;
}

export function decodeCpuid(b: Uint8Array): CpuidEntry[] {
  const dv = new DataView(b.buffer, b.byteOffset, b.byteLength);
  const n = dv.getUint32(0, true);
  return Array.from({ length: n }, (_, i) => {
    const o = SIZEOF.kvm_cpuid2 + i * SIZEOF.kvm_cpuid_entry2;
    const u = (j: number) => dv.getUint32(o + 4 * j, true);
    return { function: u(0), index: u(1), flags: u(2), eax: u(3), ebx: u(4), ecx: u(5), edx: u(6) };
  });
}

// Ties a running x86 guest to the walk model: the model's configuration is
// derived from the CPUID and control registers the guest really has.
import type { X86Guest } from '../arch/x86/guest.js';
import { CR0, CR4, EFER } from '../arch/x86/bringup.js';
import type { CpuFeatures } from '../probe/probe.js';
import { pagingConfigOf } from '../model/paging.js';
import type { PagingConfig } from '../model/walk.js';

export function pagingConfig(g: X86Guest, cpu: CpuFeatures): PagingConfig {
  const { cr0, cr4, efer } = g.boot;
  return pagingConfigOf(cpu, {
    levels: cr4 & CR4.LA57 ? 5 : 4,
    cr0Wp: (cr0 & CR0.WP) !== 0n,
    cr4Smep: (cr4 & CR4.SMEP) !== 0n,
    cr4Smap: (cr4 & CR4.SMAP) !== 0n,
    cr4Pke: (cr4 & CR4.PKE) !== 0n,
    efer: { nxe: (efer & EFER.NXE) !== 0n },
    pkru: 0,
  });
}

/** Reads PTEs from guest memory for the model (the model never touches KVM). */
export function pteReader(g: X86Guest): (gpa: bigint) => bigint {
  return (gpa) => g.mem.read64(gpa);
}

// What this host's KVM does where hosts differ, for the scenario engine: the
// path a guest access takes when its host memory is gone (hostFaultPath),
// whether the dirty log is the TDP MMU's (tdpLogsDirty), and the TDP model's
// options from the host's module parameters (tdpModelOptions). Each is a
// function of the host profile only.
import { tdpFactsOptions, type ModelVmOptions } from '../model/vm.js';
import { kernelBehaviours } from '../model/kernel.js';
import type { HostProfile } from '../probe/probe.js';
import { hex } from '../base/units.js';

/** How KVM_RUN stops when a guest access needs host memory that is not there. */
export interface HostFaultPrediction {
  path: 'mmio' | 'efault';
  gpa: bigint;
  /** The stop as observedStop() shows it (unused for 'mmio', which is an MMIO exit). */
  stop: unknown;
  why: string;
}

/**
 * What the guest sees when an access needs host memory that munmap took away
 * or mprotect forbids (the model's fault says 'efault'). Hosts differ:
 * - kvm_pvm runs CPL 0 in KVM's instruction emulator, which reads and writes
 *   guest memory through the host mapping and, when that fails, treats the
 *   access as MMIO: an MMIO exit with the access's GPA, length and data
 *   (README, Findings). Measured here for reads and writes under munmap,
 *   PROT_NONE and (writes) PROT_READ.
 * - Elsewhere, and for kvm_pvm's CPL 3 (which runs on shadow pages), the page
 *   fault cannot get a host page and KVM_RUN fails with EFAULT
 *   (kvm_handle_error_pfn). x86 fills a KVM_EXIT_MEMORY_FAULT record only for
 *   private (guest_memfd) memory, so even with KVM_CAP_MEMORY_FAULT_INFO the
 *   exit reason is stale here: measured on kvm_pvm at CPL 3.
 * - A guest_memfd slot whose file is gone (`gmem`): KVM faults its pages in
 *   through the file, finds none (kvm_gmem_get_pfn: EFAULT) and fills the
 *   memory-fault record (kvm_mmu_prepare_memory_fault_exit): the page's GPA,
 *   4 KiB, flags 0 (shared memory; no RWX flags are defined).
 */
export function hostFaultPath(
  profile: HostProfile,
  access: 'read' | 'write' | 'exec',
  cpl: 0 | 3,
  gpa: bigint,
  size: number,
  gmem = false,
): HostFaultPrediction {
  if (gmem) {
    const page = gpa & ~0xfffn;
    return {
      path: 'efault',
      gpa,
      stop: { exit: 'memory_fault', gpa: page, size: 0x1000n, flags: 0n },
      why: `KVM_RUN failed with EFAULT and a memory-fault exit for the ${size}-byte ${access} of GPA ${hex(gpa)}: the slot's guest_memfd is gone`,
    };
  }
  if (profile.flavour === 'kvm_pvm' && cpl === 0 && access !== 'exec') {
    return {
      path: 'mmio',
      gpa,
      stop: undefined,
      why: `kvm_pvm emulates CPL 0: the emulator cannot ${access} the host memory and exits as MMIO`,
    };
  }
  return {
    path: 'efault',
    gpa,
    stop: { kvmRun: 'EFAULT' },
    why: `KVM_RUN failed with EFAULT for the ${size}-byte ${access} of GPA ${hex(gpa)}; the vCPU redoes it on its next run`,
  };
}

/**
 * Whether the dirty log is what KVM's TDP MMU logs (x86 with TDP): it then
 * installs a writable SPTE on a read fault too when the host page is
 * writable, and logs the page dirty as it does (make_spte), so the TDP
 * model's log adds to the pages the guest wrote.
 */
export function tdpLogsDirty(profile: HostProfile): boolean {
  return profile.tdp.enabled && profile.arch === 'x86_64';
}

/**
 * The TDP model's options for this host's kvm module parameters and kernel
 * release (model/kernel.ts), and its MMU (legacy under kvm.tdp_mmu=0).
 */
export function tdpModelOptions(profile: HostProfile): ModelVmOptions {
  const params = profile.moduleParams;
  const kb = profile.kernel?.behaviours ?? kernelBehaviours(undefined);
  return {
    ...tdpFactsOptions(profile),
    eagerSplit: params['kvm.eager_page_split'] !== 'N',
    nxHugePages: params['kvm.nx_huge_pages'] === 'Y',
    splitOnFault: kb.splitOnFault.on,
    recoverHugeInPlace: kb.recoverHugeInPlace.on,
  };
}

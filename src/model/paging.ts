// The walk model's configuration from its two sources: the guest's CPU
// (vendor, MAXPHYADDR, 1 GiB pages) and its paging mode (levels, the
// control-register bits, PKRU). Every caller (a running guest's registers, a
// scenario's declared paging, an access-matrix case) builds it here.
import type { GuestWalker, PagingConfig, Vendor } from './walk.js';

/** What the configuration takes from the CPU; `vendor` is a CPUID vendor string, or 'intel' / 'amd'. */
export interface PagingCpu {
  vendor: string;
  maxPhyAddr: number;
  pdpe1gb: boolean;
}

/** The paging mode: everything a configuration holds that does not come from the CPU. */
export type PagingMode = Omit<PagingConfig, 'vendor' | 'maxPhyAddr' | 'pdpe1gb' | 'walker'>;

/**
 * The model's vendor for a CPUID vendor string: KVM applies AMD's rules to
 * AMD and Hygon guests (guest_cpuid_is_amd_or_hygon) and Intel's to every
 * other.
 */
export function vendorOf(cpuVendor: string): Vendor {
  return cpuVendor === 'AuthenticAMD' || cpuVendor === 'HygonGenuine' || cpuVendor === 'amd' ? 'amd' : 'intel';
}

/** The configuration for a mode on a CPU; `vendor` overrides the CPU's, `walker` names who walks (default 'kvm'). */
export function pagingConfigOf(
  cpu: PagingCpu,
  mode: PagingMode,
  opts: { vendor?: Vendor; walker?: GuestWalker } = {},
): PagingConfig {
  return {
    ...(opts.walker !== undefined ? { walker: opts.walker } : {}),
    ...mode,
    vendor: opts.vendor ?? vendorOf(cpu.vendor),
    maxPhyAddr: cpu.maxPhyAddr,
    pdpe1gb: cpu.pdpe1gb,
  };
}

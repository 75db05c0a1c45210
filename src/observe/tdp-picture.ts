// KVM's real TDP mappings, rebuilt GFN by GFN from kvm_tdp_mmu_spte_changed
// (as_id, gfn, level, old_spte, new_spte), MMIO SPTEs included, and the
// faults KVM took, from kvm_page_fault (address, error code). The tracepoint
// misses some changes (children of an eager huge-page split, write
// permission restored by the fast page-fault path, some frozen -> 0
// transitions; docs/scenarios.md, "The per-GFN TDP picture"), so a
// comparison built on this picture only asks about GFNs whose last change
// went through the traced paths.
import type { TraceEvent } from './tracefs.js';

export type TdpFlavour = 'npt' | 'ept';

/** x86 TDP SPTE bits as KVM's TDP MMU writes them (arch/x86/kvm/mmu/spte.h). */
export const X86_SPTE = {
  /** SPTE_MMU_PRESENT_MASK: set in every shadow-present SPTE. */
  mmuPresent: 1n << 11n,
  writable: 1n << 1n,
  /** PT_PAGE_SIZE_MASK: a leaf above level 1. */
  large: 1n << 7n,
  nptNx: 1n << 63n,
  eptExec: 1n << 2n,
  nptAccessed: 1n << 5n,
  nptDirty: 1n << 6n,
  eptAccessed: 1n << 8n,
  eptDirty: 1n << 9n,
} as const;

export interface TdpMapping {
  present: boolean;
  leaf: boolean;
  writable: boolean;
  executable: boolean;
  accessed: boolean;
  dirty: boolean;
}

/**
 * A cached MMIO SPTE (is_mmio_spte): not shadow-present, and carrying the
 * MMIO value under the MMIO mask. NPT: bit 51 and bit 0 (KVM's default when
 * the host has fewer than 52 physical address bits); EPT: W and X without R,
 * an EPT misconfiguration. Frozen (0x5a0) and empty (0, or bit 63 from 6.9
 * on) entries carry neither.
 */
export function isMmioSpte(spte: bigint, flavour: TdpFlavour): boolean {
  if ((spte & X86_SPTE.mmuPresent) !== 0n) return false;
  if (flavour === 'ept') return (spte & 7n) === 6n;
  const mask = (1n << 51n) | 1n;
  return (spte & mask) === mask;
}

export function decodeTdpSpte(spte: bigint, level: number, flavour: TdpFlavour): TdpMapping {
  const has = (b: bigint) => (spte & b) !== 0n;
  const present = has(X86_SPTE.mmuPresent);
  return {
    present,
    leaf: present && (level === 1 || has(X86_SPTE.large)),
    writable: present && has(X86_SPTE.writable),
    executable: present && (flavour === 'npt' ? !has(X86_SPTE.nptNx) : has(X86_SPTE.eptExec)),
    accessed: present && has(flavour === 'npt' ? X86_SPTE.nptAccessed : X86_SPTE.eptAccessed),
    dirty: present && has(flavour === 'npt' ? X86_SPTE.nptDirty : X86_SPTE.eptDirty),
  };
}

const key = (asId: number, gfn: bigint, level: number) => `${asId}:${gfn.toString(16)}:${level}`;

/** What maps one GFN in KVM's picture (the model's GfnMapping has the same shape). */
export interface ObservedMapping {
  level: number;
  writable: boolean;
  executable: boolean;
  mmio: boolean;
}

/** The last new_spte seen for each (as_id, gfn, level). */
export class TdpPicture {
  private readonly sptes = new Map<string, bigint>();

  constructor(
    readonly flavour: TdpFlavour,
    events: Iterable<TraceEvent> = [],
  ) {
    this.add(events);
  }

  add(events: Iterable<TraceEvent>): void {
    for (const e of events) {
      if (e.id !== 'kvmmmu/kvm_tdp_mmu_spte_changed') continue;
      const f = e.fields;
      if (typeof f.gfn !== 'bigint' || typeof f.new_spte !== 'bigint') continue;
      this.sptes.set(key(Number(f.as_id), f.gfn, Number(f.level)), f.new_spte);
    }
  }

  /**
   * What maps `gfn` as the trace left it: the present leaf, or an MMIO SPTE,
   * at the lowest level that has one; undefined when a table or nothing does.
   */
  mapping(asId: number, gfn: bigint, maxLevel = 5): ObservedMapping | undefined {
    for (let level = 1; level <= maxLevel; level++) {
      const base = gfn & ~((1n << BigInt(9 * (level - 1))) - 1n);
      const spte = this.sptes.get(key(asId, base, level));
      if (spte === undefined) continue;
      // KVM caches MMIO in 4 KiB SPTEs only (a GFN without a slot maps at 4 KiB).
      if (level === 1 && isMmioSpte(spte, this.flavour))
        return { level, writable: false, executable: false, mmio: true };
      const m = decodeTdpSpte(spte, level, this.flavour);
      if (m.leaf) return { level, writable: m.writable, executable: m.executable, mmio: false };
      if (m.present) return undefined;
    }
    return undefined;
  }

  /** The GFN ranges [start, end) of address space `asId` that a leaf or MMIO SPTE of the trace covers, possibly stale. */
  *spans(asId: number): Generator<[bigint, bigint]> {
    for (const [k, spte] of this.sptes) {
      const [as, gfn, level] = k.split(':');
      if (Number(as) !== asId) continue;
      const mmio = Number(level) === 1 && isMmioSpte(spte, this.flavour);
      if (!mmio && !decodeTdpSpte(spte, Number(level), this.flavour).leaf) continue;
      const start = BigInt(`0x${gfn}`);
      yield [start, start + (1n << BigInt(9 * (Number(level) - 1)))];
    }
  }

  /**
   * The leaf that maps `gfn`, as the trace left it: the lowest level whose
   * entry covering gfn is a present leaf, or undefined when none is.
   */
  leaf(asId: number, gfn: bigint, maxLevel = 5): (TdpMapping & { level: number }) | undefined {
    for (let level = 1; level <= maxLevel; level++) {
      const base = gfn & ~((1n << BigInt(9 * (level - 1))) - 1n);
      const spte = this.sptes.get(key(asId, base, level));
      if (spte === undefined) continue;
      const m = decodeTdpSpte(spte, level, this.flavour);
      if (m.leaf) return { ...m, level };
      if (m.present) return undefined; // a table: nothing below it was traced as a leaf
    }
    return undefined;
  }
}

/** KVM's page-fault error code bits (PFERR_*), as kvm_page_fault prints them. */
export const PFERR = {
  present: 1n << 0n,
  write: 1n << 1n,
  user: 1n << 2n,
  rsvd: 1n << 3n,
  fetch: 1n << 4n,
  /** The fault is on the final GPA of the guest's access. */
  guestFinal: 1n << 32n,
  /** The fault is on a guest page-table page, met while walking the guest's tables. */
  guestPage: 1n << 33n,
} as const;

/** One kvm_page_fault: vCPU, guest RIP, faulting GPA (TDP) and error code. */
export interface ObservedFault {
  vcpu: number;
  rip: bigint;
  gpa: bigint;
  errorCode: bigint;
}

/** A kvm_page_fault event's fields (Linux 6.1 and later print them alike), or undefined for another event. */
export function parsePageFault(e: TraceEvent): ObservedFault | undefined {
  if (e.id !== 'kvm/kvm_page_fault') return undefined;
  const f = e.fields;
  if (typeof f.fault_address !== 'bigint' || typeof f.error_code !== 'bigint') return undefined;
  return {
    vcpu: Number(f.vcpu_id ?? -1n),
    rip: typeof f.guest_rip === 'bigint' ? f.guest_rip : 0n,
    gpa: f.fault_address,
    errorCode: f.error_code,
  };
}

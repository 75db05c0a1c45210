// KVM's real TDP mappings, rebuilt GFN by GFN from kvm_tdp_mmu_spte_changed
// (as_id, gfn, level, old_spte, new_spte). The tracepoint misses some changes
// (children of an eager huge-page split, write permission restored by the
// fast page-fault path, some frozen -> 0 transitions; see docs), so a
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

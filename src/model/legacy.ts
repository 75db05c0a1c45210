// The host dimension under x86's legacy MMU with TDP (kvm.tdp_mmu=0, EPT or
// NPT): KVM's direct shadow pages (arch/x86/kvm/mmu/mmu.c, direct_map and
// the rmap walks) instead of the TDP MMU (tdp_mmu.c). Same tree, same
// queries (lookup, mappings, pageCounts) and the same operations as `Tdp`;
// four rules differ, each taken from mmu.c of Linux 6.1 and 7.2, which agree
// on all four:
//
// 1. Prefetch (direct_map -> direct_pte_prefetch): after a fault installs a
//    4 KiB leaf (not a spurious one, MMIO included), KVM maps the other
//    non-present entries of the aligned group of PTE_PREFETCH_NUM (8) in the
//    same table, run by run (__direct_pte_prefetch). A run is mapped only if
//    its first GFN's slot neither logs dirty pages nor is read-only
//    (gfn_to_memslot_dirty_bitmap; gfn_to_hva_many), holds the whole run
//    (else 0 pages), and then as many of its pages as the host already maps
//    writable, from the first on (get_user_pages_fast_only with FOLL_WRITE).
//    A run that maps nothing ends the prefetch. Prefetched leaves are
//    writable, executable and not accessed (make_spte with prefetch). There
//    is no prefetch without A/D bits (sp_ad_disabled: EPT with eptad=0).
// 2. No eager split: kvm_mmu_slot_try_split_huge_pages returns at once
//    without the TDP MMU; dirty logging on only write-protects every leaf of
//    the slot (kvm_mmu_slot_remove_write_access from 4 KiB).
// 3. A write to a write-protected huge leaf of a logging slot is a slow
//    fault (fast_page_fault refuses huge leaves while logging): the fault
//    maps 4 KiB, and on its way direct_map links a new shadow page over the
//    huge leaf, zapping it (__link_shadow_page -> mmu_page_zap_pte), so only
//    the written page stays mapped (Tdp's splitOnFault off).
// 4. Dirty logging off zaps, leaf by leaf, the 4 KiB and 2 MiB leaves whose
//    shadow page a huge page could replace (kvm_mmu_zap_collapsible_spte:
//    sp->gfn inside the slot, sp level below kvm_mmu_max_mapping_level at
//    sp->gfn); the shadow pages stay linked, empty, until a huge fault
//    replaces them (mmu_set_spte over a non-leaf drops the parent pointer).
//
// Not modelled: shadow pages left unlinked keep their leaves (and count in
// pages_*) until KVM reclaims them, and a later link may find such a page
// again (kvm_mmu_find_shadow_page reuses direct pages); the model starts
// every linked table empty. No prefetch while an MMU-notifier invalidation
// is in progress (mmu_invalidate_in_progress): the model's faults never
// overlap one.
import { gfnToHva, slotEnd, type Memslot, type MemslotChange, type Memslots } from './memslots.js';
import {
  SPTE_D,
  SPTE_HOST_W,
  SPTE_LEAF,
  SPTE_MMU_W,
  SPTE_P,
  SPTE_W,
  SPTE_X,
  isPresent,
  makeSpte,
  roundDown,
} from './spte.js';
import { Tdp, slotMaxLevel, type Access, type FaultResult, type TdpOptions } from './tdp.js';
import type { WrongTdp } from './wrong.js';

/** PTE_PREFETCH_NUM: the aligned group of entries one fault may map. */
export const PTE_PREFETCH_NUM = 8;

export interface LegacyOptions extends Omit<TdpOptions, 'arch' | 'eagerSplit' | 'splitOnFault' | 'recoverHugeInPlace'> {
  /** The MMU uses A/D bits (NPT; EPT with eptad=1); without them KVM does not prefetch. */
  adEnabled?: boolean;
}

/** The legacy MMU with TDP: `Tdp` with the four rules above. */
export class LegacyTdp extends Tdp {
  readonly legacy = true;
  private readonly adEnabled: boolean;
  private readonly wrongLegacy: WrongTdp;

  constructor(slots: Memslots, opts: LegacyOptions = {}) {
    super(slots, {
      ...opts,
      arch: 'x86_64',
      eagerSplit: !!opts.wrong?.legacyEagerSplit,
      splitOnFault: false,
      recoverHugeInPlace: false,
    });
    this.adEnabled = opts.adEnabled ?? true;
    this.wrongLegacy = { ...opts.wrong };
  }

  /** A fault as Tdp takes it, then direct_pte_prefetch after a new 4 KiB leaf (rule 1). */
  override fault(asId: number, gfn: number, access: Access = {}): FaultResult {
    const before = this.lookup(asId, gfn);
    const r = super.fault(asId, gfn, access);
    const installed = r.kind === 'map' || (r.kind === 'mmio' && before?.spte !== r.spte);
    if (installed && r.level === 1) this.prefetch(asId, gfn);
    return r;
  }

  /** __direct_pte_prefetch: the non-present runs of gfn's aligned group, in order, until one maps nothing. */
  private prefetch(asId: number, gfn: number): void {
    if (!this.adEnabled || this.wrongLegacy.noPrefetch) return;
    const first = gfn - (gfn % PTE_PREFETCH_NUM);
    let start = -1;
    for (let g = first; g < first + PTE_PREFETCH_NUM; g++) {
      const entry = g === gfn ? undefined : this.lookup(asId, g);
      if (g === gfn || (entry && entry.level === 1 && isPresent(entry.spte))) {
        if (start < 0) continue;
        if (!this.prefetchRun(asId, start, g)) return;
        start = -1;
      } else if (start < 0) start = g;
    }
    if (start >= 0) this.prefetchRun(asId, start, first + PTE_PREFETCH_NUM);
  }

  /** direct_pte_prefetch_many over [start, end); false when it mapped nothing (the prefetch stops). */
  private prefetchRun(asId: number, start: number, end: number): boolean {
    const slot = this.slots.find(asId, start);
    if (!slot || slot.flags.logDirty || slot.flags.readonly) return false;
    if (slotEnd(slot) - start < end - start) return false;
    let mapped = 0;
    for (let g = start; g < end; g++) {
      const page = this.host.writableNow(gfnToHva(slot, g));
      if (!page) break;
      const leaf = makeSpte(page.pfn, SPTE_P | SPTE_LEAF | SPTE_HOST_W | SPTE_W | SPTE_D | SPTE_MMU_W | SPTE_X);
      for (const it of this.walk(asId, g, g + 1, null)) {
        if (it.level !== 1) continue;
        this.trySet(it, leaf); // nothing else writes the model's tables meanwhile
        break;
      }
      mapped++;
    }
    return mapped > 0;
  }

  /**
   * Deleting or moving a slot: kvm_mmu_zap_all_fast as Tdp takes it, except
   * that the legacy MMU's kvm_zap_obsolete_pages commits the zapped shadow
   * pages with a remote TLB flush (kvm_mmu_commit_zap_page) whenever there
   * was one below a root: any leaf or MMIO SPTE means there was.
   */
  override setMemslot(s: Memslot): MemslotChange {
    const had = this.slots.list(s.asId).some((m) => m.slot === s.slot) && this.picture(s.asId).size > 0;
    const ch = super.setMemslot(s);
    if (had && (ch.change === 'delete' || ch.change === 'move') && !this.wrongLegacy.noFlush) this.flushRequests++;
    return ch;
  }

  /** kvm_rmap_zap_collapsible_sptes (rule 4): leaves go one by one, their tables stay. */
  protected override collapse(slot: Memslot): void {
    if (this.wrongLegacy.legacyZapTables) return super.collapse(slot);
    const end = slotEnd(slot);
    for (const it of this.walk(slot.asId, slot.baseGfn, end, [], { only: 'presentLeaf' })) {
      if (it.level > 2) continue;
      const spGfn = roundDown(it.gfn, it.level + 1);
      if (spGfn < slot.baseGfn || spGfn >= end) continue;
      const hostLevel = this.host.lookup(gfnToHva(slot, spGfn))?.level ?? 1;
      if (it.level >= Math.min(hostLevel, slotMaxLevel(slot, spGfn))) continue;
      if (!this.trySet(it, 0)) {
        it.retry();
        continue;
      }
      it.flush(it.gfn, it.level);
    }
  }
}

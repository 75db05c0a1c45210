// The host dimension of two-dimensional paging: what KVM maps for each guest
// frame, modelled in the shape of the x86 TDP MMU (EPT/NPT) and of arm64
// stage-2 (the model's tdp_mmu.c).
//
// - `Tdp`: the operations, each one loop over a walk (tdp-iter.ts): fault-in,
//   zap, write-protect, clear-dirty, dirty-log harvest, huge-page split,
//   removal of a table, the stage-2 break-before-make, and the queries
//   lookup() and mappings().
// - The SPTE encoding and the level arithmetic (arm64 level conversion
//   included) are in spte.ts; the tree and its iterator in tdp-iter.ts; the
//   memslots in memslots.ts and the host memory behind them in host-mm.ts.
//
// The model is compared with KVM GFN by GFN after every scenario step where
// the host traces SPTE changes (run/tdp-follow.ts). Some of what the model
// writes KVM writes without a trace: the children of a huge page split
// (`split` events; KVM fills the table before linking it) and W restored by
// the fast page-fault path (`spte` events marked `fast`). Those are left out
// of the comparison until a traced change reaches them (docs/scenarios.md,
// "The per-GFN TDP picture"). `flushRequests` counts the operations that
// must request a remote TLB flush; invalidating every root (a slot deleted
// or moved) requests none, as in kvm_mmu_zap_all_fast.
//
// Levels are numbered the way KVM's x86 MMU numbers them (spte.ts): 1 = 4 KiB
// leaf, 2 = 2 MiB, 3 = 1 GiB, 4 and 5 = upper tables.

import type { Arch } from '../arch/arch.js';
import { HostMm, type HostChange, type HostPage } from './host-mm.js';
import {
  gfnToHva,
  hvaRanges,
  slotEnd,
  type GfnRange,
  type Memslot,
  type MemslotChange,
  type Memslots,
  MemslotError,
} from './memslots.js';
import {
  PAGES,
  SPTE_A,
  SPTE_D,
  SPTE_HOST_W,
  SPTE_LEAF,
  SPTE_MMIO,
  SPTE_MMU_W,
  SPTE_P,
  SPTE_W,
  SPTE_X,
  fromArmLevel,
  isLeaf,
  isPresent,
  isTable,
  makeSpte,
  roundDown,
  sptePfn,
  spteFlags,
  withBits,
  withoutBits,
  type Spte,
} from './spte.js';
import { Table, TdpIter, tdpIter, type Flush, type Only, type Removed } from './tdp-iter.js';
import type { WrongTdp } from './wrong.js';

// ---------------------------------------------------------------------------
// The model

export interface TdpOptions {
  arch?: Arch;
  /** x86: paging levels of the TDP root, 4 or 5 (root level 4 or 5). */
  levels?: 4 | 5;
  /** arm64: stage-2 start level in arm64 numbering, 0 (4 levels) or 1 (3 levels). */
  startLevel?: 0 | 1;
  /** arm64: IPA size; the root table is concatenated when it maps more than 512 entries. */
  ipaBits?: number;
  /** x86 kvm.nx_huge_pages: huge SPTEs are not executable; executable faults map 4 KiB. */
  nxHugePages?: boolean;
  /** Split huge pages when dirty logging starts (x86 eager_page_split, default on; arm64 eager-split chunk, default off). */
  eagerSplit?: boolean;
  /** x86: cache MMIO in SPTEs (kvm.mmio_caching, default on). */
  mmioCaching?: boolean;
  /** arm64: the CPU has DIC, so stage-2 maps memory executable without an exec fault. */
  dic?: boolean;
  /** x86: deleting or moving a slot zaps every mapping (kvm_mmu_zap_all_fast; default on). */
  slotZapAll?: boolean;
  /**
   * x86: a fault that must map below a present huge leaf splits the leaf
   * into 512 smaller ones (tdp_mmu_split_huge_page in kvm_tdp_mmu_map; the
   * default). Off: the fault zaps the huge leaf and links an empty table,
   * so only the faulting page is mapped, as Linux 6.1's TDP MMU does.
   */
  splitOnFault?: boolean;
  /**
   * x86: when dirty logging stops, a table a huge page could replace is
   * replaced in place by a huge leaf made from its first present leaf
   * (kvm_tdp_mmu_recover_huge_pages, Linux 6.13 on; the default). Off: the
   * table is zapped and the next fault maps huge (zap_collapsible_spte_range).
   */
  recoverHugeInPlace?: boolean;
  /** Walks raise a yield point every N entries (0: never). */
  yieldEvery?: number;
  /** Keep the event log (default on). */
  record?: boolean;
  /** Test-only: a deliberately wrong model (wrong.ts). */
  wrong?: WrongTdp;
}

export type TdpEvent =
  /** An SPTE changed (kvm_tdp_mmu_spte_changed); `fast`: by the fast page-fault path, which that tracepoint does not show. */
  | { kind: 'spte'; asId: number; gfn: number; level: number; old: Spte; new: Spte; fast?: true }
  | { kind: 'flush'; asId: number; ranges: Flush[] }
  /** A huge leaf replaced by a table of 512 smaller leaves (kvm_mmu_split_huge_page); the children are not logged. */
  | { kind: 'split'; asId: number; gfn: number; level: number }
  /** Every root of the address space invalidated and replaced (kvm_mmu_zap_all_fast). */
  | { kind: 'roots'; asId: number }
  /** A removed table freed with its subtree. */
  | { kind: 'teardown'; asId: number; gfn: number; level: number; sptes: number };

export interface Access {
  write?: boolean;
  exec?: boolean;
}

export type FaultKind =
  | 'map' // slow path: a leaf installed or replaced
  | 'fast' // x86 fast path: write permission restored in place
  | 'relax' // arm64: permissions added in place
  | 'spurious' // nothing to do
  | 'mmio' // no memslot: MMIO exit (x86 caches an MMIO SPTE)
  | 'emulate' // write to a read-only slot: emulated, MMIO exit
  | 'efault'; // the HVA is not mapped in the host

export interface FaultResult {
  kind: FaultKind;
  gfn: number;
  /** Level and value of the entry that ends up mapping gfn (0, 0 if none). */
  level: number;
  spte: Spte;
  /**
   * The host invalidated HVA ranges while resolving the fault (a zero page
   * replaced, a huge page split): KVM sees its MMU-notifier sequence move,
   * installs nothing and lets the guest fault again (is_page_fault_stale);
   * the model maps at once. What mapped the GFN for that second fault.
   */
  retried?: 'none' | 'present';
}

export interface MappingRun {
  start: number;
  end: number;
  level: number;
  writable: boolean;
  executable: boolean;
}

/**
 * What maps one GFN, as the per-GFN picture compares it with KVM's
 * (run/tdp-follow.ts): the level of the leaf (or of the MMIO SPTE) and its
 * permissions. No entry: not mapped.
 */
export interface GfnMapping {
  level: number;
  writable: boolean;
  executable: boolean;
  mmio: boolean;
}

export interface ZapResult {
  flush: Flush[];
  removed: Removed[];
  zapped: number;
}

interface FaultCtx {
  asId: number;
  gfn: number;
  slot: Memslot | undefined;
  page: HostPage | undefined;
  write: boolean;
  exec: boolean;
  goal: number;
  /** The level before the NX-huge-page rule lowered it. */
  reqLevel: number;
  hugeDisallowed: boolean;
}

/**
 * TDP state of one VM: a tree per address space over the VM's memslots, and
 * the host memory behind them.
 */
export class Tdp {
  readonly arch: Arch;
  readonly rootLevel: number;
  /** One past the highest GFN the tree maps. */
  readonly maxGfn: number;
  readonly host: HostMm;
  readonly events: TdpEvent[] = [];
  /** Walks not yet released. */
  activeWalks = 0;
  private readonly roots: Table[];
  private readonly dirty = new Map<number, Set<number>>();
  private readonly nxHugePages: boolean;
  private readonly eagerSplit: boolean;
  private readonly mmioCaching: boolean;
  private readonly dic: boolean;
  private readonly slotZapAll: boolean;
  private readonly splitOnFault: boolean;
  private readonly recoverHugeInPlace: boolean;
  private readonly yieldEvery: number;
  /** Keep the event log (TdpOptions.record); a follower that drains it may switch it on. */
  record: boolean;
  /**
   * Operations that requested a remote TLB flush so far: each that zapped or
   * write-protected a present SPTE (a walk that ended with flush ranges), and
   * every start of dirty logging on a slot.
   */
  flushRequests = 0;
  private readonly wrong: WrongTdp;
  private nextTableId = 1;

  constructor(
    readonly slots: Memslots,
    opts: TdpOptions = {},
  ) {
    this.arch = opts.arch ?? 'x86_64';
    this.host = new HostMm(slots);
    let rootSize = 512;
    if (this.arch === 'x86_64') {
      const levels = opts.levels ?? 4;
      if (levels !== 4 && levels !== 5) throw new RangeError(`x86 TDP has 4 or 5 levels, not ${levels}`);
      this.rootLevel = levels;
      this.maxGfn = 512 * PAGES[levels];
    } else {
      // kvm_get_vtcr / stage2_pgtable_levels: levels = (ipaBits - 4 - 4) / 9, at
      // most 16 concatenated tables at the start level.
      const startLevel = opts.startLevel ?? 1;
      const ipaBits = opts.ipaBits ?? (startLevel === 0 ? 48 : 40);
      const levels = Math.floor((ipaBits - 8) / 9);
      if (levels !== 4 - startLevel)
        throw new RangeError(
          `arm64 stage-2 with a ${ipaBits}-bit IPA starts at level ${4 - levels}, not ${startLevel}`,
        );
      this.rootLevel = fromArmLevel(startLevel);
      rootSize = 2 ** (ipaBits - 12 - 9 * (this.rootLevel - 1));
      this.maxGfn = 2 ** (ipaBits - 12);
    }
    if (slots.maxGfn > this.maxGfn)
      throw new RangeError(`memslots allow GFNs up to ${slots.maxGfn}, beyond what the TDP maps (${this.maxGfn})`);
    this.nxHugePages = this.arch === 'x86_64' && (opts.nxHugePages ?? false);
    this.eagerSplit = opts.eagerSplit ?? this.arch === 'x86_64';
    this.mmioCaching = opts.mmioCaching ?? true;
    this.dic = opts.dic ?? false;
    this.slotZapAll = opts.slotZapAll ?? true;
    this.splitOnFault = opts.splitOnFault ?? true;
    this.recoverHugeInPlace = opts.recoverHugeInPlace ?? false;
    this.yieldEvery = opts.yieldEvery ?? 0;
    this.record = opts.record ?? true;
    this.wrong = { ...opts.wrong };
    this.roots = Array.from({ length: slots.asIds }, () => new Table(this.nextTableId++, this.rootLevel, 0, rootSize));
  }

  root(asId: number): Table {
    const root = this.roots[asId];
    if (!root) throw new RangeError(`no address space ${asId}`);
    return root;
  }

  /** Open a walk over one address space; every operation below is a for…of over one. */
  walk(
    asId: number,
    start: number,
    end: number,
    flush: Flush[] | null,
    opts: { only?: Only; minLevel?: number } = {},
  ): TdpIter {
    this.activeWalks++;
    return new TdpIter(this.root(asId), start, Math.min(end, this.maxGfn), {
      asId,
      only: opts.only,
      minLevel: opts.minLevel,
      yieldEvery: this.yieldEvery,
      onFlush: (ranges) => {
        if (ranges.length > 0 && !this.wrong.noFlush) this.flushRequests++;
        this.log({ kind: 'flush', asId, ranges });
        flush?.push(...ranges);
      },
      onRelease: () => {
        this.activeWalks--;
      },
    });
  }

  /*
   * trySet() is the one way an SPTE in a linked table changes (the model of
   * tdp_mmu_set_spte_atomic + handle_changed_spte). Its rules:
   *  - it changes the entry only if the entry still holds it.old; otherwise it
   *    refreshes it.old and returns false, and the caller retries the entry
   *    (it.retry(); continue);
   *  - it keeps Table.child in step with the packed value;
   *  - it logs the change, marked `fast` when it comes from the fast
   *    page-fault path (which kvm_tdp_mmu_spte_changed does not show);
   *  - it marks the GFN dirty when a 4 KiB leaf becomes writable, or changes
   *    frame while writable, in a slot that logs dirty pages;
   *  - a table the entry pointed to and no longer does goes onto it.removed
   *    with its subtree's SPTEs; the caller tears it down after the flush.
   * Tables not yet linked (new, or filled by splitChildren()) are written
   * directly: nothing can reach them, and, as in KVM, nothing is logged.
   */
  trySet(it: TdpIter, spte: Spte, child: Table | null = null, fast = false): boolean {
    const { table, index, level, gfn } = it;
    const old = table.spte[index];
    if (old !== it.old) {
      it.old = old;
      return false;
    }
    table.spte[index] = spte;
    it.old = spte;
    this.log(
      fast
        ? { kind: 'spte', asId: it.asId, gfn, level, old, new: spte, fast }
        : { kind: 'spte', asId: it.asId, gfn, level, old, new: spte },
    );
    if (table.child) {
      const gone = table.child[index];
      table.child[index] = isTable(spte) ? child : null;
      if (gone && gone !== table.child[index]) it.removed.push(this.detached(it.asId, gone));
    }
    if (
      level === 1 &&
      isLeaf(spte) &&
      (spte & SPTE_W) !== 0 &&
      !(isLeaf(old) && (old & SPTE_W) !== 0 && sptePfn(old) === sptePfn(spte))
    ) {
      const slot = this.slots.find(it.asId, gfn);
      if (slot?.flags.logDirty) this.dirtySet(slot).add(gfn);
    }
    return true;
  }

  // -------------------------------------------------------------------------
  // Fault-in

  /**
   * A guest access to `gfn` that faulted (EPT/NPT violation, stage-2 abort).
   * Order as in KVM: no slot → MMIO; write to a read-only slot → emulation;
   * already permitted → spurious; x86 fast path; then the host page (which
   * may invalidate HVA ranges first), the level, and the map walk.
   */
  fault(asId: number, gfn: number, access: Access = {}): FaultResult {
    const write = !!access.write;
    const exec = !!access.exec;
    const slot = this.slots.find(asId, gfn);
    if (!slot) return this.mmio(asId, gfn);
    if (write && slot.flags.readonly) return { kind: 'emulate', gfn, level: 0, spte: 0 };

    const cur = this.lookup(asId, gfn);
    if (cur && isLeaf(cur.spte) && permits(cur.spte, write, exec)) return { kind: 'spurious', gfn, ...cur };
    if (
      this.arch === 'x86_64' &&
      cur &&
      isLeaf(cur.spte) &&
      write &&
      (cur.spte & SPTE_MMU_W) !== 0 &&
      permits(cur.spte, false, exec)
    ) {
      // fast_page_fault: write access restored in place, except on a huge
      // page of a dirty-logging slot (only one page could be logged dirty).
      if (!(cur.level > 1 && slot.flags.logDirty)) return this.fastFault(asId, gfn);
    }

    const host = this.host.fault(slot, gfnToHva(slot, gfn), write);
    if (!host) return { kind: 'efault', gfn, level: 0, spte: 0 };
    for (const [s, e] of host.notify) this.invalidateRange(s, e);
    const retried = host.notify.length === 0 ? undefined : this.lookup(asId, gfn) ? 'present' : 'none';

    const f: FaultCtx = { asId, gfn, slot, page: host.page, write, exec, goal: 1, reqLevel: 1, hugeDisallowed: false };
    this.setGoal(f, host.page.level);
    if (this.arch === 'arm64') {
      const now = this.lookup(asId, gfn);
      const leaf = this.leafFor(f, f.goal);
      if (now && isLeaf(now.spte) && now.level === f.goal && sptePfn(now.spte) === sptePfn(leaf))
        return this.relax(asId, gfn, leaf);
    }
    const r = this.map(f);
    return retried ? { ...r, retried } : r;
  }

  /*
   * The level a fault maps at (kvm_mmu_hugepage_adjust, user_mem_abort): the
   * smallest of
   *  - the host mapping level of the page (4 KiB; THP 2 MiB; hugetlb 2 MiB/1 GiB);
   *  - what the slot allows: the huge page lies wholly inside the slot, and
   *    GPA and HVA are congruent modulo its size (slotMaxLevel);
   *  - 4 KiB while the slot logs dirty pages;
   *  - x86 with nx_huge_pages: 4 KiB for an executable fault (reqLevel keeps
   *    the level it would have had).
   * The guest's own page size plays no part.
   */
  private setGoal(f: FaultCtx, hostLevel: number): void {
    const slot = f.slot!;
    let level = Math.min(hostLevel, slotMaxLevel(slot, f.gfn));
    if (slot.flags.logDirty) level = 1;
    f.reqLevel = level;
    if (this.nxHugePages && f.exec && level > 1) {
      f.hugeDisallowed = true;
      level = 1;
    }
    if (this.wrong.levelOffByOne && level > 1) level--;
    f.goal = level;
  }

  /** The leaf SPTE for a fault at `level` (make_spte / stage2 prot). */
  private leafFor(f: FaultCtx, level: number): Spte {
    if (!f.page) return makeSpte(0, SPTE_MMIO);
    const slot = f.slot!;
    const pfn = f.page.pfn - (f.page.pfn % PAGES[level]);
    const canWrite = f.page.writable && !slot.flags.readonly;
    let flags = SPTE_P | SPTE_LEAF | SPTE_A;
    if (f.page.writable) flags |= SPTE_HOST_W;
    if (this.arch === 'x86_64') {
      if (canWrite) flags |= SPTE_W | SPTE_D | SPTE_MMU_W;
      if (!(level > 1 && this.nxHugePages)) flags |= SPTE_X;
    } else {
      // Stage-2 maps writable on a write fault only while logging dirty pages,
      // and executable only on an exec fault unless the CPU has DIC.
      if (canWrite) flags |= SPTE_MMU_W;
      if (canWrite && (f.write || !slot.flags.logDirty)) flags |= SPTE_W | SPTE_D;
      if (f.exec || this.dic) flags |= SPTE_X;
    }
    return makeSpte(pfn, flags);
  }

  /** No memslot: x86 caches an MMIO SPTE at 4 KiB, arm64 installs nothing. */
  private mmio(asId: number, gfn: number): FaultResult {
    if (this.arch !== 'x86_64' || !this.mmioCaching) return { kind: 'mmio', gfn, level: 0, spte: 0 };
    const f: FaultCtx = {
      asId,
      gfn,
      slot: undefined,
      page: undefined,
      write: false,
      exec: false,
      goal: 1,
      reqLevel: 1,
      hugeDisallowed: false,
    };
    return { ...this.map(f), kind: 'mmio' };
  }

  /** x86 fast_page_fault: set W (and D) on an mmu-writable leaf, outside the slow path. */
  private fastFault(asId: number, gfn: number): FaultResult {
    for (const it of this.walk(asId, gfn, gfn + 1, null, { only: 'presentLeaf' })) {
      const spte = withBits(it.old, SPTE_W | SPTE_D);
      if (!this.trySet(it, spte, null, true)) {
        it.retry();
        continue;
      }
      return { kind: 'fast', gfn, level: it.level, spte };
    }
    throw new Error(`fast page fault found no leaf for gfn ${gfn}`);
  }

  /** arm64 kvm_pgtable_stage2_relax_perms: add W/X in place, no break-before-make. */
  private relax(asId: number, gfn: number, leaf: Spte): FaultResult {
    for (const it of this.walk(asId, gfn, gfn + 1, null, { only: 'presentLeaf' })) {
      const spte = withBits(it.old, spteFlags(leaf) & (SPTE_W | SPTE_D | SPTE_X | SPTE_A));
      if (spte === it.old) return { kind: 'spurious', gfn, level: it.level, spte };
      if (!this.trySet(it, spte)) {
        it.retry();
        continue;
      }
      return { kind: 'relax', gfn, level: it.level, spte };
    }
    throw new Error(`permission relax found no leaf for gfn ${gfn}`);
  }

  /**
   * The map walk (kvm_tdp_mmu_map; stage-2: kvm_pgtable_stage2_map). Down to
   * the goal level, linking a table wherever there is none: an empty one over
   * a hole; over a huge leaf above the goal, x86 links the split leaf (512
   * smaller leaves; without splitOnFault it zaps the leaf and links an empty
   * table) while arm64 breaks the block and links an empty table.
   * At the goal level the leaf goes in; on arm64 replacing a valid entry with
   * a different output (or a table with a block) is break-before-make:
   * invalidate, flush, install, then tear down what the break removed.
   */
  private map(f: FaultCtx): FaultResult {
    let linked = false;
    for (const it of this.walk(f.asId, f.gfn, f.gfn + 1, null)) {
      // disallowed_hugepage_adjust: do not rebuild a huge page over a table
      // that exists because the NX-huge-page rule split it.
      if (
        this.nxHugePages &&
        it.level > 1 &&
        it.level === f.goal &&
        isTable(it.old) &&
        it.table.child![it.index]!.nxDisallowed
      )
        f.goal--;

      if (it.level === f.goal) {
        const leaf = this.leafFor(f, it.level);
        const old = it.old;
        if (old === leaf) return { kind: linked ? 'map' : 'spurious', gfn: f.gfn, level: it.level, spte: leaf };
        if (this.arch === 'arm64' && isPresent(old) && (isTable(old) || sptePfn(old) !== sptePfn(leaf))) {
          if (!this.trySet(it, 0)) {
            it.retry();
            continue;
          }
          it.flush(it.gfn, it.level);
          it.flushNow();
          if (!this.trySet(it, leaf)) throw new Error('break-before-make: the invalid entry changed');
          this.teardown(it.removed.splice(0));
        } else {
          if (!this.trySet(it, leaf)) {
            it.retry();
            continue;
          }
          if (isTable(old) || (isPresent(old) && (sptePfn(old) !== sptePfn(leaf) || (old & ~leaf & SPTE_W) !== 0))) {
            it.flush(it.gfn, it.level);
            it.flushNow();
          }
          this.teardown(it.removed.splice(0));
        }
        return { kind: 'map', gfn: f.gfn, level: it.level, spte: leaf };
      }

      if (isTable(it.old)) continue;

      let child: Table;
      if (!isPresent(it.old)) {
        child = this.newTable(it.level - 1, it.gfn);
      } else if (this.arch === 'x86_64' && this.splitOnFault) {
        child = this.splitChildren(it.old, it.level, it.gfn);
      } else {
        if (!this.trySet(it, 0)) {
          it.retry();
          continue;
        }
        it.flush(it.gfn, it.level);
        it.flushNow();
        child = this.newTable(it.level - 1, it.gfn);
      }
      if (f.hugeDisallowed && f.reqLevel >= it.level) child.nxDisallowed = true;
      const wasLeaf = isLeaf(it.old);
      if (!this.trySet(it, tableSpte(child), child)) {
        it.retry();
        continue;
      }
      linked = true;
      if (wasLeaf) this.log({ kind: 'split', asId: f.asId, gfn: it.gfn, level: it.level });
    }
    throw new Error(`map walk for gfn ${f.gfn} never reached level ${f.goal}`);
  }

  // -------------------------------------------------------------------------
  // Range operations

  /**
   * Zap [start, end): clear every present leaf, and with `tables` every table
   * lying wholly inside the range (with its subtree). Default: x86 keeps the
   * tables (tdp_mmu_zap_leafs), stage-2 removes them (stage2_unmap_walker
   * frees emptied tables). The flush covers each zapped entry's whole span,
   * so a huge leaf the range only touches is flushed whole.
   */
  zap(asId: number, start: number, end: number, opts: { tables?: boolean } = {}): ZapResult {
    const tables = opts.tables ?? this.arch === 'arm64';
    if (this.wrong.zapOneShort) end -= 1;
    const flush: Flush[] = [];
    let zapped = 0;
    const walk = this.walk(asId, start, end, flush, { only: 'present' });
    for (const it of walk) {
      if (it.yieldPoint && it.resched()) continue;
      if (isTable(it.old) && !(tables && it.gfn >= start && it.gfn + PAGES[it.level] <= end)) continue;
      if (!this.trySet(it, 0)) {
        it.retry();
        continue;
      }
      it.flush(it.gfn, it.level);
      zapped++;
    }
    const removed = walk.removed.splice(0);
    this.teardown(removed);
    return { flush, removed, zapped };
  }

  /** Clear W on present leaves at `minLevel` and above (wrprot_gfn_range); MMU-writable stays, so x86's fast path can restore it. */
  writeProtect(asId: number, start: number, end: number, minLevel = 1): Flush[] {
    const flush: Flush[] = [];
    for (const it of this.walk(asId, start, end, flush, { only: 'presentLeaf', minLevel })) {
      if (it.yieldPoint && it.resched()) continue;
      if ((it.old & SPTE_W) === 0) continue;
      if (!this.trySet(it, withoutBits(it.old, SPTE_W))) {
        it.retry();
        continue;
      }
      it.flush(it.gfn, it.level);
    }
    return flush;
  }

  /**
   * kvm_tdp_mmu_clear_dirty_slot where dirty state is tracked by write
   * protection (AMD NPT; arm64 stage-2): every writable leaf loses W and D,
   * so the next write faults and is logged.
   */
  clearDirty(asId: number, start: number, end: number): Flush[] {
    const flush: Flush[] = [];
    for (const it of this.walk(asId, start, end, flush, { only: 'presentLeaf' })) {
      if (it.yieldPoint && it.resched()) continue;
      const old = it.old;
      if ((old & (SPTE_W | SPTE_D)) === 0) continue;
      if (!this.trySet(it, withoutBits(old, SPTE_W | SPTE_D))) {
        it.retry();
        continue;
      }
      if ((old & SPTE_W) !== 0) it.flush(it.gfn, it.level);
    }
    return flush;
  }

  /**
   * KVM_GET_DIRTY_LOG without manual protect: the slot's dirty GFNs (sorted),
   * cleared, and each re-protected (kvm_tdp_mmu_clear_dirty_pt_masked with
   * write protection: W off on the 4 KiB leaf).
   */
  getDirtyLog(asId: number, slotId: number): number[] {
    const slot = this.slots.get(asId, slotId);
    if (!slot) throw new MemslotError('EINVAL', `no slot ${slotId} in as_id ${asId}`);
    if (!slot.flags.logDirty) throw new MemslotError('EINVAL', `slot ${slotId} does not log dirty pages`);
    const set = this.dirtySet(slot);
    const gfns = [...set].sort((a, b) => a - b);
    set.clear();
    this.reprotect(asId, gfns);
    return gfns;
  }

  /**
   * KVM_CLEAR_DIRTY_LOG (manual protect): the slot's logged GFNs in
   * [first, first + count) of the slot leave the log, sorted, and each is
   * re-protected as KVM_GET_DIRTY_LOG does without manual protect.
   */
  clearDirtyLog(asId: number, slotId: number, first: number, count: number): number[] {
    const slot = this.slots.get(asId, slotId);
    if (!slot) throw new MemslotError('EINVAL', `no slot ${slotId} in as_id ${asId}`);
    if (!slot.flags.logDirty) throw new MemslotError('EINVAL', `slot ${slotId} does not log dirty pages`);
    const set = this.dirtySet(slot);
    const lo = slot.baseGfn + first;
    const gfns = [...set].filter((g) => g >= lo && g < lo + count).sort((a, b) => a - b);
    for (const g of gfns) set.delete(g);
    this.reprotect(asId, gfns);
    return gfns;
  }

  /**
   * KVM logs `gfn` dirty from the host side (mark_page_dirty: its own
   * walker's A/D writes through the slot's HVA, e.g. for KVM_TRANSLATE),
   * without any SPTE change.
   */
  markDirty(asId: number, gfn: number): void {
    const slot = this.slots.find(asId, gfn);
    if (slot?.flags.logDirty) this.dirtySet(slot).add(gfn);
  }

  /**
   * W off on the 4 KiB leaves of `gfns` (sorted), so their next write faults
   * and is logged. KVM requests a remote TLB flush whenever it took a dirty
   * bit back (kvm_get_dirty_log_protect, kvm_clear_dirty_log_protect), even
   * where the SPTE was already write-protected.
   */
  private reprotect(asId: number, gfns: number[]): void {
    if (gfns.length === 0) return;
    // One request for the whole call (kvm_flush_remote_tlbs_memslot once the bits are taken back);
    // the write protection itself requests none of its own.
    const requests = this.flushRequests + (this.wrong.noFlush ? 0 : 1);
    const harvested = new Set(gfns);
    const flush: Flush[] = [];
    for (const it of this.walk(asId, gfns[0], gfns[gfns.length - 1] + 1, flush, { only: 'presentLeaf' })) {
      if (it.yieldPoint && it.resched()) continue;
      if (it.level > 1 || (it.old & SPTE_W) === 0 || !harvested.has(it.gfn)) continue;
      if (!this.trySet(it, withoutBits(it.old, SPTE_W))) {
        it.retry();
        continue;
      }
      it.flush(it.gfn, 1);
    }
    this.flushRequests = requests;
  }

  /**
   * Split every huge leaf in [start, end) down to `target` (eager page split,
   * tdp_mmu_split_huge_pages_root; stage-2: kvm_pgtable_stage2_split). The
   * walk steps into each new table, so a 1 GiB leaf splits to 2 MiB leaves
   * that split in turn. Children keep the parent's frames and permissions;
   * x86 makes 4 KiB children executable again under nx_huge_pages. x86 needs
   * no flush (the translation does not change); stage-2 replaces the block by
   * break-before-make.
   */
  split(asId: number, start: number, end: number, target = 1): { split: number; flush: Flush[] } {
    const flush: Flush[] = [];
    let split = 0;
    for (const it of this.walk(asId, start, end, flush, { only: 'presentLeaf', minLevel: target + 1 })) {
      if (it.yieldPoint && it.resched()) continue;
      const child = this.splitChildren(it.old, it.level, it.gfn);
      if (this.arch === 'arm64') {
        if (!this.trySet(it, 0)) {
          it.retry();
          continue;
        }
        it.flush(it.gfn, it.level);
        it.flushNow();
      }
      if (!this.trySet(it, tableSpte(child), child)) {
        it.retry();
        continue;
      }
      this.log({ kind: 'split', asId, gfn: it.gfn, level: it.level });
      split++;
    }
    return { split, flush };
  }

  /**
   * Unlink the table of level `level` that maps `gfn` (kvm_tdp_mmu_zap_sp):
   * its parent entry becomes non-present and the TLB is flushed for the
   * parent entry's span. The table is not freed: call teardown() with the
   * result once nothing can still be walking it.
   */
  removeTable(asId: number, gfn: number, level: number): { removed: Removed | undefined; flush: Flush[] } {
    const flush: Flush[] = [];
    const walk = this.walk(asId, gfn, gfn + 1, flush, { minLevel: level + 1 });
    for (const it of walk) {
      if (it.level !== level + 1) continue;
      if (!isTable(it.old)) break;
      if (!this.trySet(it, 0)) {
        it.retry();
        continue;
      }
      it.flush(it.gfn, it.level);
      break;
    }
    return { removed: walk.removed.pop(), flush };
  }

  /** Free removed tables (after their flush): their entries are dropped and a teardown event logged. */
  teardown(list: readonly Removed[]): void {
    for (const r of list) {
      if (r.table.freed) continue;
      free(r.table);
      this.log({ kind: 'teardown', asId: r.asId, gfn: r.gfn, level: r.level, sptes: r.sptes.length });
    }
  }

  /**
   * After dirty logging stops on x86, zap tables that a huge page could now
   * replace, so that the next faults map huge (zap_collapsible_spte_range);
   * with recoverHugeInPlace, replace each with a huge leaf made from its
   * first present leaf instead (recover_huge_pages_range, make_huge_spte:
   * the small leaf's permissions, the address aligned, NX when NX huge pages
   * are on); a table without a present leaf stays.
   */
  protected collapse(slot: Memslot): void {
    const flush: Flush[] = [];
    const walk = this.walk(slot.asId, slot.baseGfn, slotEnd(slot), flush, { only: 'present', minLevel: 2 });
    for (const it of walk) {
      if (it.yieldPoint && it.resched()) continue;
      if (it.level > 3 || isLeaf(it.old)) continue;
      if (it.gfn < slot.baseGfn) continue;
      const hostLevel = this.host.lookup(gfnToHva(slot, it.gfn))?.level ?? 1;
      if (Math.min(hostLevel, slotMaxLevel(slot, it.gfn)) < it.level) continue;
      let spte = 0;
      if (this.recoverHugeInPlace) {
        const small = firstLeaf(it.table.child?.[it.index] ?? null);
        if (small === undefined) continue;
        const pfn = sptePfn(small) - (sptePfn(small) % PAGES[it.level]);
        spte = makeSpte(pfn, spteFlags(small) & ~(this.nxHugePages ? SPTE_X : 0));
      }
      if (!this.trySet(it, spte)) {
        it.retry();
        continue;
      }
      it.flush(it.gfn, it.level);
    }
    this.teardown(walk.removed.splice(0));
  }

  // -------------------------------------------------------------------------
  // Memslot changes and host changes

  /**
   * KVM_SET_USER_MEMORY_REGION and its MMU consequences
   * (kvm_arch_commit_memory_region): delete or move zaps (on x86 every
   * mapping, kvm_mmu_zap_all_fast); dirty logging on splits huge pages
   * (when eager split is on) and write-protects the slot; off lets x86 zap
   * collapsible tables.
   */
  setMemslot(s: Memslot): MemslotChange {
    const ch = this.slots.set(s);
    switch (ch.change) {
      case 'delete':
      case 'move': {
        // A move keeps the dirty bitmap of a slot that logs before and after it
        // (kvm_prepare_memory_region reuses it, since 5.17): the same pages of the
        // slot stay dirty, at its new GFNs. A deletion drops it.
        const kept = this.dirty.get(dirtyKey(ch.old));
        this.dirty.delete(dirtyKey(ch.old));
        if (ch.change === 'move' && kept?.size && ch.old.flags.logDirty && ch.new.flags.logDirty)
          this.dirty.set(dirtyKey(ch.new), new Set([...kept].map((gfn) => gfn - ch.old.baseGfn + ch.new.baseGfn)));
        if (this.arch === 'x86_64' && this.slotZapAll) {
          // kvm_mmu_zap_all_fast: every root is invalidated and zapped where no
          // vCPU can reach it; vCPUs load new roots (a TLB flush of their own),
          // so no remote TLB flush is requested.
          const flushRequests = this.flushRequests;
          for (let asId = 0; asId < this.roots.length; asId++) {
            this.zap(asId, 0, this.maxGfn, { tables: true });
            this.log({ kind: 'roots', asId });
          }
          this.flushRequests = flushRequests;
        } else {
          this.zap(ch.old.asId, ch.old.baseGfn, slotEnd(ch.old), { tables: true });
        }
        break;
      }
      case 'flags':
        // kvm_mmu_slot_apply_flags does nothing more for a read-only slot (it cannot be dirtied):
        // no split, no write protection, no flush, no recovery of huge pages when logging stops.
        if (this.arch === 'x86_64' && ch.new.flags.readonly) {
          if (!ch.new.flags.logDirty) this.dirty.delete(dirtyKey(ch.new));
          break;
        }
        if (ch.new.flags.logDirty) {
          if (this.eagerSplit) this.split(ch.new.asId, ch.new.baseGfn, slotEnd(ch.new), 1);
          this.writeProtect(ch.new.asId, ch.new.baseGfn, slotEnd(ch.new), 1);
          // kvm_mmu_slot_apply_flags (x86, since 6.0) and kvm_mmu_wp_memory_region
          // (arm64) flush the slot's TLB entries unconditionally once logging is
          // on, mapped pages or not; only KVM_DIRTY_LOG_INITIALLY_SET skips it,
          // and this harness never enables that.
          if (!ch.old.flags.logDirty && !this.wrong.noFlush) this.flushRequests++;
        } else {
          this.dirty.delete(dirtyKey(ch.new));
          if (this.arch === 'x86_64' && !this.wrong.noCollapse) this.collapse(ch.new);
        }
        break;
      case 'create':
      case 'none':
        break;
    }
    return ch;
  }

  /**
   * A host change over [start, end) of the HVA space: the host updates its
   * pages, then every HVA range it notifies is zapped in every slot of every
   * address space it maps to (the MMU-notifier walk: all slots, no early stop).
   */
  invalidateHva(
    start: bigint,
    end: bigint,
    why: HostChange,
    prot?: 'none' | 'read' | 'read-write',
  ): { ranges: GfnRange[]; flush: Flush[] } {
    const ranges: GfnRange[] = [];
    const flush: Flush[] = [];
    for (const [s, e] of this.host.invalidate(start, end, why, prot)) {
      const r = this.invalidateRange(s, e);
      ranges.push(...r.ranges);
      flush.push(...r.flush);
    }
    return { ranges, flush };
  }

  /**
  /**
   * The VMM's own access to `gfn` through the slot's HVA (not a guest access):
   * the host page faults in as for any process, and whatever mapping the host
   * replaces (a zero page written) is reported to the MMU notifiers and zapped.
   * Nothing is mapped and nothing is logged dirty. Undefined: the host has no
   * page there (munmap, a protection that forbids the access).
   */
  hostAccess(asId: number, gfn: number, write: boolean): HostPage | undefined {
    const slot = this.slots.find(asId, gfn);
    if (!slot) throw new RangeError(`no memslot holds gfn ${gfn} in address space ${asId}`);
    const host = this.host.fault(slot, gfnToHva(slot, gfn), write);
    for (const [s, e] of host?.notify ?? []) this.invalidateRange(s, e);
    return host?.page;
  }

  private invalidateRange(start: bigint, end: bigint): { ranges: GfnRange[]; flush: Flush[] } {
    const ranges: GfnRange[] = [];
    const flush: Flush[] = [];
    for (const r of hvaRanges(this.slots, start, end)) {
      ranges.push(r);
      flush.push(...this.zap(r.asId, r.start, r.end).flush);
    }
    return { ranges, flush };
  }

  // -------------------------------------------------------------------------
  // Queries

  /** The entry that ends the walk to `gfn`: a leaf, or a non-present non-zero entry (MMIO). */
  lookup(asId: number, gfn: number): { level: number; spte: Spte } | undefined {
    for (const it of this.walk(asId, gfn, gfn + 1, null)) {
      if (isTable(it.old)) continue;
      return it.old === 0 ? undefined : { level: it.level, spte: it.old };
    }
    return undefined;
  }

  /**
   * Present leaves in [start, end) as runs of equal level and permissions
   * (the per-GFN picture kvm_tdp_mmu_spte_changed events rebuild). A huge
   * leaf that only overlaps the range is reported whole.
   */
  mappings(asId: number, start = 0, end = this.maxGfn): MappingRun[] {
    const runs: MappingRun[] = [];
    for (const it of this.walk(asId, start, end, null, { only: 'presentLeaf' })) {
      const writable = (it.old & SPTE_W) !== 0;
      const executable = (it.old & SPTE_X) !== 0;
      const next = it.gfn + PAGES[it.level];
      const last = runs[runs.length - 1];
      if (
        last &&
        last.end === it.gfn &&
        last.level === it.level &&
        last.writable === writable &&
        last.executable === executable
      )
        last.end = next;
      else runs.push({ start: it.gfn, end: next, level: it.level, writable, executable });
    }
    return runs;
  }

  /**
   * Present leaves per level in [start, end), indexed by level (1 = 4 KiB):
   * what KVM's pages_4k, pages_2m and pages_1g gauges count (one per leaf
   * SPTE, whatever its size), restricted to a range.
   */
  pageCounts(asId: number, start = 0, end = this.maxGfn): number[] {
    const n = [0, 0, 0, 0, 0, 0];
    for (const it of this.walk(asId, start, end, null, { only: 'presentLeaf' })) n[it.level]!++;
    return n;
  }

  /**
   * Every GFN in [start, end) that a present leaf or an MMIO SPTE maps, with
   * what maps it: the model's side of the per-GFN picture. A huge leaf
   * contributes only its GFNs inside the range.
   */
  picture(asId: number, start = 0, end = this.maxGfn): Map<number, GfnMapping> {
    const out = new Map<number, GfnMapping>();
    for (const it of this.walk(asId, start, end, null)) {
      if (it.old === 0 || isTable(it.old)) continue;
      const mmio = (it.old & SPTE_MMIO) !== 0;
      if (!mmio && !isLeaf(it.old)) continue;
      const m: GfnMapping = {
        level: it.level,
        writable: !mmio && (it.old & SPTE_W) !== 0,
        executable: !mmio && (it.old & SPTE_X) !== 0,
        mmio,
      };
      const from = Math.max(it.gfn, start);
      const to = Math.min(it.gfn + PAGES[it.level], end);
      for (let gfn = from; gfn < to; gfn++) out.set(gfn, m);
    }
    return out;
  }

  /** Dirty GFNs logged so far for a slot, without clearing them. */
  peekDirty(asId: number, slotId: number): number[] {
    const slot = this.slots.get(asId, slotId);
    return slot ? [...this.dirtySet(slot)].sort((a, b) => a - b) : [];
  }

  // -------------------------------------------------------------------------

  private log(ev: TdpEvent): void {
    if (this.record) this.events.push(ev);
  }

  private dirtySet(slot: Memslot): Set<number> {
    const key = dirtyKey(slot);
    let set = this.dirty.get(key);
    if (!set) this.dirty.set(key, (set = new Set()));
    return set;
  }

  private newTable(level: number, gfn: number): Table {
    return new Table(this.nextTableId++, level, gfn);
  }

  /** A new, unlinked table of 512 leaves mapping what the huge leaf `huge` at `level` maps (make_huge_page_split_spte). */
  private splitChildren(huge: Spte, level: number, gfn: number): Table {
    const child = this.newTable(level - 1, gfn);
    const step = PAGES[level - 1];
    const pfn = sptePfn(huge);
    let flags = spteFlags(huge);
    if (level - 1 === 1 && this.nxHugePages) flags |= SPTE_X;
    for (let i = 0; i < 512; i++) child.spte[i] = makeSpte(pfn + i * step, flags);
    return child;
  }

  /** A Removed record for a table just unlinked, listing its subtree's present SPTEs. */
  private detached(asId: number, table: Table): Removed {
    const sptes: Removed['sptes'] = [];
    for (const it of tdpIter(table, table.gfn, table.gfn + table.size * PAGES[table.level], { only: 'present' }))
      sptes.push({ gfn: it.gfn, level: it.level, spte: it.old });
    return { asId, gfn: table.gfn, level: table.level, table, sptes };
  }
}

/** The largest level a slot allows at `gfn`: inside the slot, GPA and HVA congruent modulo the size. */
export function slotMaxLevel(slot: Memslot, gfn: number): number {
  const hvaPage = Number(slot.hva >> 12n);
  for (let level = 3; level > 1; level--) {
    const n = PAGES[level];
    const head = roundDown(gfn, level);
    if (head < slot.baseGfn || head + n > slotEnd(slot)) continue;
    if (slot.baseGfn % n !== hvaPage % n) continue;
    return level;
  }
  return 1;
}

function permits(spte: Spte, write: boolean, exec: boolean): boolean {
  return (!write || (spte & SPTE_W) !== 0) && (!exec || (spte & SPTE_X) !== 0);
}

/** Non-leaf SPTE pointing to `child`: full permissions, as KVM's non-leaf SPTEs. */
function tableSpte(child: Table): Spte {
  return makeSpte(child.id, SPTE_P | SPTE_W | SPTE_X | SPTE_A);
}

function dirtyKey(slot: Memslot): number {
  return slot.asId * 65536 + slot.slot;
}

function free(table: Table): void {
  table.freed = true;
  if (table.child) for (const c of table.child) if (c) free(c);
  table.spte.fill(0);
  table.child?.fill(null);
}

/** The first present leaf under a table, depth first (tdp_root_for_each_leaf_pte's first hit). */
function firstLeaf(t: Table | null): Spte | undefined {
  if (!t) return undefined;
  for (let i = 0; i < 512; i++) {
    const s = t.spte[i]!;
    if (isLeaf(s) && isPresent(s)) return s;
    if (isTable(s)) {
      const hit = firstLeaf(t.child?.[i] ?? null);
      if (hit !== undefined) return hit;
    }
  }
  return undefined;
}

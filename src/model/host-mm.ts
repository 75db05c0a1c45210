// The host memory behind the memslots: which host page (and at which host
// page-table level) backs each HVA, the shared zero page for never-written
// anonymous memory, and which HVA ranges the host reports to MMU notifiers
// when it changes a mapping (munmap, madvise(MADV_DONTNEED), mprotect,
// fallocate(PUNCH_HOLE)).
//
// HVAs are bigints, as in the uapi structures; host frames and HVA page
// numbers are numbers.

import type { Memslot, Memslots } from './memslots.js';
import { PAGE_SIZE } from '../base/units.js';

/** Host frame of the shared zero page and of the huge zero page (2 MiB aligned). */
export const ZERO_PFN = 0x100;
export const HUGE_ZERO_PFN = 0x200;
/** Frames handed out to populated memory start here (1 GiB aligned). */
const FIRST_PFN = 0x40000;

/** 4 KiB pages per host mapping at level 1, 2, 3. */
const UNIT = [0, 1, 512, 512 * 512];

/** The host mapping behind one HVA page, as hva_to_pfn() and the host page tables report it. */
export interface HostPage {
  /** Host frame of this 4 KiB page. */
  pfn: number;
  /** Host page-table level mapping it: 1 (PTE), 2 (PMD), 3 (PUD). */
  level: number;
  /** Whether the host mapping is writable (false for the zero pages). */
  writable: boolean;
}

export interface HostFault {
  page: HostPage;
  /** HVA ranges the host invalidated (MMU notifiers) while resolving the fault. */
  notify: [bigint, bigint][];
}

export type HostChange = 'munmap' | 'dontneed' | 'mprotect' | 'punch_hole' | 'hugepage' | 'nohugepage';

/** A page's transparent-huge-page advice (the VMA's VM_HUGEPAGE / VM_NOHUGEPAGE). */
export type ThpAdvice = 'hugepage' | 'nohugepage' | 'default';

interface Unit {
  /** Host frame of the first page, or ZERO_PFN / HUGE_ZERO_PFN. */
  pfn: number;
  zero: boolean;
  /** Page-cache (shared file) memory: MADV_DONTNEED only unmaps it. */
  file: boolean;
  /** hugetlbfs: never split, never partly freed. */
  hugetlb: boolean;
}

/**
 * Host memory as KVM's page-fault path sees it, per 4 KiB HVA page number.
 *
 * Rules, one per backing kind (the VMA is taken to be exactly the slot's
 * HVA range):
 * - anon: 4 KiB pages. A read of a never-written page maps the zero page
 *   read-only; a write allocates, and replacing a zero page notifies its 4 KiB.
 * - thp: a 2 MiB-aligned block wholly inside the VMA is mapped by a PMD: a
 *   write allocates a THP, a read of an untouched block maps the huge zero
 *   page. A write to the huge zero page splits it into 4 KiB zero PTEs
 *   (notifying the 2 MiB) and then copies one page (notifying its 4 KiB).
 *   Blocks that do not fit, or that were split, behave like anon.
 * - hugetlb2m / hugetlb1g: the first touch allocates the whole huge page.
 * - memfd / guest_memfd (shared side): the first touch allocates a page of
 *   `pageSize` (2 MiB only where the block fits inside the VMA).
 * Host frames are handed out in allocation order, aligned to the mapping size.
 */
export class HostMm {
  private readonly units: Map<number, Unit>[] = [new Map(), new Map(), new Map(), new Map()];
  /** 2 MiB blocks (by first page) that hold 4 KiB mappings: no PMD may be installed there. */
  private readonly pteMapped = new Set<number>();
  private readonly unmapped: [number, number][] = [];
  /** Pages whose VMA protection is not read-write (mprotect), by 4 KiB HVA page number. */
  private readonly prot = new Map<number, 'none' | 'read'>();
  /** Pages whose THP advice madvise changed, by 4 KiB HVA page number. */
  private readonly advice = new Map<number, 'hugepage' | 'nohugepage'>();
  private nextPfn = FIRST_PFN;

  /**
   * `slots`: where the memslots' memory lies, so that VMAs (and the host's
   * splits of them) can be known; without them VMA splits notify nothing
   * beyond the changed range, and only a 'thp' slot gets huge pages.
   */
  constructor(private readonly slots?: Memslots) {}

  /**
   * Where an HVA page lies among the host's mappings: its group (pages of one
   * group with equal protection and advice form one VMA) and its mapping's
   * THP advice. Anonymous slots (anon, thp) are private anonymous memory that
   * the host merges with an adjacent one of equal flags; the harness maps
   * anon with MADV_NOHUGEPAGE and thp with MADV_HUGEPAGE. Every other backing
   * is a file of its own. Undefined: no slot's memory there, or hugetlbfs,
   * whose VMAs split only at huge-page boundaries (hugetlb_vm_op_split).
   */
  private layout(page: number): { group: string; advice: ThpAdvice } | undefined {
    if (!this.slots) return undefined;
    const hva = BigInt(page) << 12n;
    for (let asId = 0; asId < this.slots.asIds; asId++) {
      for (const m of this.slots.list(asId)) {
        if (hva < m.hva || hva >= m.hva + (BigInt(m.npages) << 12n)) continue;
        const k = m.backing.kind;
        if (k === 'anon' || k === 'thp') return { group: 'anon', advice: k === 'thp' ? 'hugepage' : 'nohugepage' };
        if (k === 'hugetlb2m' || k === 'hugetlb1g') return undefined;
        return { group: `file ${asId}:${m.slot}`, advice: 'default' };
      }
    }
    return undefined;
  }

  /** The current host mapping of `hva`, without faulting anything in. */
  lookup(hva: bigint): HostPage | undefined {
    const page = Number(hva >> 12n);
    const cur = this.find(page);
    return cur && hostPage(cur, page);
  }

  /**
   * get_user_pages_fast_only(FOLL_WRITE) of one page: the page when the host
   * page tables already map it writable (never the zero page, nothing under
   * munmap or a read-only or PROT_NONE protection); faults nothing in.
   */
  writableNow(hva: bigint): HostPage | undefined {
    const page = Number(hva >> 12n);
    if (this.unmapped.some(([s, e]) => page >= s && page < e) || this.prot.has(page)) return undefined;
    const cur = this.lookup(hva);
    return cur?.writable ? cur : undefined;
  }

  /** Resolve an access by KVM (hva_to_pfn with or without FOLL_WRITE). Undefined: EFAULT. */
  fault(slot: Memslot, hva: bigint, write: boolean): HostFault | undefined {
    const page = Number(hva >> 12n);
    if (this.unmapped.some(([s, e]) => page >= s && page < e)) return undefined;
    const prot = this.prot.get(page);
    if (prot === 'none' || (prot === 'read' && write)) return undefined;
    const notify: [bigint, bigint][] = [];
    let cur = this.find(page);
    if (cur && cur.unit.zero && write) {
      if (cur.level > 1) {
        notify.push(pageRange(cur.head, UNIT[cur.level]!));
        this.splitToPtes(cur.head, cur.level, cur.unit);
      }
      notify.push(pageRange(page, 1));
      this.units[1]!.delete(page);
      cur = undefined;
    }
    if (!cur) {
      const anon = slot.backing.kind === 'anon' || slot.backing.kind === 'thp';
      const level = this.allocLevel(slot, page);
      const head = page - (page % UNIT[level]!);
      const hugetlb = slot.backing.kind === 'hugetlb2m' || slot.backing.kind === 'hugetlb1g';
      let unit: Unit;
      if (anon && !write) unit = { pfn: level > 1 ? HUGE_ZERO_PFN : ZERO_PFN, zero: true, file: false, hugetlb };
      else {
        const n = UNIT[level]!;
        this.nextPfn = Math.ceil(this.nextPfn / n) * n;
        unit = { pfn: this.nextPfn, zero: false, file: !anon && !hugetlb, hugetlb };
        this.nextPfn += n;
      }
      this.units[level]!.set(head, unit);
      if (level === 1) this.pteMapped.add(page - (page % 512));
      cur = { unit, level, head };
    }
    // A PROT_READ page is mapped for reads only, like the zero page.
    const hp = hostPage(cur, page);
    return { page: prot === 'read' ? { ...hp, writable: false } : hp, notify };
  }

  /**
   * A host-side change over [start, end). Returns the HVA ranges reported to
   * MMU notifiers: the range itself, preceded by any whole transparent huge
   * page that had to be split because the range covers only part of it.
   * mprotect keeps the pages; DONTNEED keeps page-cache pages; munmap also
   * makes later faults in the range fail with EFAULT.
   */
  invalidate(start: bigint, end: bigint, why: HostChange, prot?: 'none' | 'read' | 'read-write'): [bigint, bigint][] {
    const notify: [bigint, bigint][] = [];
    if (end <= start) return notify;
    const ps = Number(start >> 12n);
    const pe = Number((end + 4095n) >> 12n);
    if (why === 'hugepage' || why === 'nohugepage') {
      // madvise(MADV_[NO]HUGEPAGE) changes the VMA's flags: splits, no other notification.
      notify.push(...this.vmaSplits(ps, pe, (p) => this.adviceOf(p) !== why));
      for (let p = ps; p < pe; p++) this.advice.set(p, why);
      return notify;
    }
    if (why === 'mprotect' && prot !== undefined) {
      // mprotect_fixup skips a VMA whose flags stay; change_protection notifies the rest.
      const changes = (p: number) => (this.prot.get(p) ?? 'read-write') !== prot;
      notify.push(...this.vmaSplits(ps, pe, changes));
      let run = -1;
      for (let p = ps; p <= pe; p++) {
        const c = p < pe && changes(p);
        if (c && run < 0) run = p;
        if (!c && run >= 0) {
          notify.push(pageRange(run, p - run));
          run = -1;
        }
      }
      this.protect(start, end, prot);
      return notify;
    }
    if (why === 'munmap') notify.push(...this.vmaSplits(ps, pe, () => true));
    if (why !== 'mprotect') {
      for (const level of [3, 2]) {
        const n = UNIT[level]!;
        for (const [head, unit] of this.overlapping(level, ps, pe)) {
          const partial = head < ps || head + n > pe;
          if (partial && !unit.hugetlb) {
            // A THP (or the huge zero page) is split to PTEs before part of it goes.
            notify.push(pageRange(head, n));
            this.splitToPtes(head, level, unit);
          } else if (!(why === 'dontneed' && unit.file)) {
            // hugetlb has no partial pages: the whole huge page goes.
            this.units[level]!.delete(head);
          }
        }
      }
      for (const [head, unit] of this.overlapping(1, ps, pe)) {
        if (why === 'dontneed' && unit.file) continue;
        this.units[1]!.delete(head);
      }
      if (why === 'munmap') this.unmapped.push([ps, pe]);
    }
    notify.push([start, end]);
    return notify;
  }

  /**
   * mprotect of [start, end): later faults that the protection forbids (any
   * access under PROT_NONE, a write under PROT_READ) fail with EFAULT. The
   * pages themselves stay; the caller reports the range to the MMU notifiers
   * with invalidate(start, end, 'mprotect').
   */
  protect(start: bigint, end: bigint, prot: 'none' | 'read' | 'read-write'): void {
    for (let p = Number(start >> 12n); p < Number((end + 4095n) >> 12n); p++) {
      if (prot === 'read-write') this.prot.delete(p);
      else this.prot.set(p, prot);
    }
  }

  /**
   * mmap(MAP_FIXED) of fresh memory over [start, end), after a munmap: faults
   * there succeed again, on new pages (the old ones went with the munmap),
   * with read-write protection.
   */
  remap(start: bigint, end: bigint): void {
    const ps = Number(start >> 12n);
    const pe = Number((end + 4095n) >> 12n);
    const keep: [number, number][] = [];
    for (const [s, e] of this.unmapped) {
      if (e <= ps || s >= pe) keep.push([s, e]);
      else {
        if (s < ps) keep.push([s, ps]);
        if (e > pe) keep.push([pe, e]);
      }
    }
    this.unmapped.splice(0, this.unmapped.length, ...keep);
    for (let p = ps; p < pe; p++) this.prot.delete(p);
  }

  /** The page's THP advice: what madvise set, else its mapping's. */
  private adviceOf(page: number): ThpAdvice {
    return this.advice.get(page) ?? this.layout(page)?.advice ?? 'default';
  }

  /** What makes a page's VMA: pages of one group, protection and advice, side by side, are one VMA. Undefined: unmapped. */
  private vmaKey(page: number): string | undefined {
    const at = this.layout(page);
    if (!at || this.unmapped.some(([s, e]) => page >= s && page < e)) return undefined;
    return `${at.group}|${this.prot.get(page) ?? 'read-write'}|${this.adviceOf(page)}`;
  }

  /**
   * The VMA splits of an operation that changes the VMA flags of the pages
   * of [ps, pe) for which `changes` holds (mprotect, madvise of THP advice,
   * munmap). __split_vma at an address `x` that is not 2 MiB aligned calls
   * vma_adjust_trans_huge, whose split_huge_pmd_address notifies the whole
   * 2 MiB around `x` (MMU_NOTIFY_CLEAR) whenever that 2 MiB lies inside the
   * VMA being split, a huge page there or not; a THP there is split to PTEs.
   * The split at `ps` comes first, so the one at `pe` sees a VMA that starts
   * at `ps` at the earliest. Returns the notified ranges.
   */
  private vmaSplits(ps: number, pe: number, changes: (page: number) => boolean): [bigint, bigint][] {
    const out: [bigint, bigint][] = [];
    if (!this.slots) return out;
    const splitAt = (x: number, inside: number, floor: number) => {
      if (x % 512 === 0 || !changes(inside)) return;
      const key = this.vmaKey(x);
      // A boundary there already (another VMA, a hole) splits nothing.
      if (key === undefined || this.vmaKey(x - 1) !== key) return;
      const head = x - (x % 512);
      if (head < floor) return;
      for (let p = head; p < head + 512; p++) if (this.vmaKey(p) !== key) return;
      out.push(pageRange(head, 512));
      const unit = this.units[2]!.get(head);
      if (unit && !unit.hugetlb) this.splitToPtes(head, 2, unit);
    };
    splitAt(ps, ps, -Infinity);
    splitAt(pe, pe - 1, ps);
    return out;
  }

  private find(page: number): { unit: Unit; level: number; head: number } | undefined {
    for (let level = 1; level <= 3; level++) {
      const head = page - (page % UNIT[level]!);
      const unit = this.units[level]!.get(head);
      if (unit) return { unit, level, head };
    }
    return undefined;
  }

  /** The host page-table level a new allocation at `page` gets. */
  private allocLevel(slot: Memslot, page: number): number {
    const { kind, pageSize } = slot.backing;
    if (kind === 'hugetlb2m') return 2;
    if (kind === 'hugetlb1g') return 3;
    const head = page - (page % 512);
    if (this.slots && (kind === 'anon' || kind === 'thp')) {
      // A PMD-mapped THP needs VM_HUGEPAGE (the harness never leaves anonymous memory
      // at the host's default) and its 2 MiB block wholly inside the VMA.
      if (this.adviceOf(page) !== 'hugepage' || this.pteMapped.has(head)) return 1;
      const key = this.vmaKey(page);
      for (let p = head; p < head + 512; p++) if (this.vmaKey(p) !== key) return 1;
      return 2;
    }
    if (kind === 'anon' || pageSize === PAGE_SIZE) return 1;
    const first = Number(slot.hva >> 12n);
    const fits = head >= first && head + 512 <= first + slot.npages;
    return fits && !this.pteMapped.has(head) ? 2 : 1;
  }

  /** Replace one PMD-mapped unit by 512 PTE-mapped pages of the same frames. */
  private splitToPtes(head: number, level: number, unit: Unit): void {
    this.units[level]!.delete(head);
    for (let i = 0; i < UNIT[level]!; i++)
      this.units[1]!.set(head + i, { ...unit, pfn: unit.zero ? ZERO_PFN : unit.pfn + i });
    this.pteMapped.add(head);
  }

  private *overlapping(level: number, ps: number, pe: number): Generator<[number, Unit]> {
    const map = this.units[level]!;
    const n = UNIT[level]!;
    const first = ps - (ps % n);
    // Both ways yield the same units in address order (the order the host's unmap walk splits them);
    // which one is a matter of speed only.
    // Stryker disable next-line all: the choice between two equal results cannot change behaviour
    if ((pe - first) / n <= map.size) {
      const hits: [number, Unit][] = [];
      for (let head = first; head < pe; head += n) {
        const u = map.get(head);
        if (u) hits.push([head, u]);
      }
      yield* hits;
    } else {
      yield* [...map].filter(([head]) => head + n > ps && head < pe).sort((a, b) => a[0] - b[0]);
    }
  }
}

function hostPage(cur: { unit: Unit; level: number; head: number }, page: number): HostPage {
  return { pfn: cur.unit.pfn + (page - cur.head), level: cur.level, writable: !cur.unit.zero };
}

function pageRange(page: number, n: number): [bigint, bigint] {
  return [BigInt(page) << 12n, BigInt(page + n) << 12n];
}

// The model VM: the model's memslots, the host memory behind them and the TDP
// model over both (tdp.ts), plus the pages the guest dirtied in each logged
// slot since its last harvest. Slot state lives here, once: a step that
// changes a memslot changes it in the VM (src/kvm) and here, and nowhere else.
//
// It also holds the one adapter from a memslot to the model's Memslot:
//   modelSlot()     a memslot as the VMM set it (the binding's Memslot has the
//                   fields of SlotRegion), through fromRegion() and its checks;
//   declaredSlot()  a scenario's declaration at a chosen HVA;
// and the one table of backings (BACKINGS): how the VMM allocates each
// declared kind and which host pages the model then sees behind it.
//
// Pure: no binding import; the binding's types are met structurally.
import type { HostBacking } from '../base/host-backing.js';
import { MEM } from '../uapi/uapi.js';
import { fromRegion, Memslots, type Backing, type Memslot } from './memslots.js';
import { LegacyTdp } from './legacy.js';
import { Tdp, type FaultResult, type TdpOptions } from './tdp.js';
import type { WrongVm } from './wrong.js';
import { hex, PAGE } from '../base/units.js';
import { SPTE_MMIO } from './spte.js';

/** The backing kinds a scenario (and the harness) declares for a memslot. */
export type BackingName = 'anon' | 'shared' | 'memfd' | 'thp' | 'hugetlb2m' | 'hugetlb1g' | 'guest_memfd';

/**
 * Each declared backing: how the VMM allocates it and the host pages the
 * model sees behind it. 'anon' asks for no transparent huge pages
 * (MADV_NOHUGEPAGE): 4 KiB pages whatever the host's THP mode, which is what
 * the model takes 'anon' to be. Under THP "always" a guest write would
 * otherwise fault in a 2 MiB page, and KVM would then map its neighbours
 * writable (and log them dirty) on read faults. 'shared' is a MAP_SHARED
 * mapping of page cache, which the model treats as a memfd. 'guest_memfd' is
 * an mmap-able, initially shared guest_memfd bound with KVM_MEM_GUEST_MEMFD
 * (Linux 6.18): KVM faults its pages in through the file, not the HVA
 * (kvm_mmu_faultin_pfn_gmem), one 4 KiB folio each (max_order 0), allocated
 * and zeroed on first touch and mapped writable whatever the access.
 */
export const BACKINGS: Readonly<Record<BackingName, { alloc: HostBacking; page: Backing }>> = {
  anon: { alloc: { kind: 'anon', thp: false }, page: { kind: 'anon', pageSize: 4096 } },
  shared: { alloc: { kind: 'shared' }, page: { kind: 'memfd', pageSize: 4096 } },
  memfd: { alloc: { kind: 'memfd' }, page: { kind: 'memfd', pageSize: 4096 } },
  thp: { alloc: { kind: 'anon', thp: true }, page: { kind: 'thp', pageSize: 2 << 20 } },
  hugetlb2m: { alloc: { kind: 'hugetlb', pageSize: '2M' }, page: { kind: 'hugetlb2m', pageSize: 2 << 20 } },
  hugetlb1g: { alloc: { kind: 'hugetlb', pageSize: '1G' }, page: { kind: 'hugetlb1g', pageSize: 1 << 30 } },
  guest_memfd: { alloc: { kind: 'guest_memfd' }, page: { kind: 'guest_memfd', pageSize: 4096 } },
};

/** A memslot as the VMM set it with KVM_SET_USER_MEMORY_REGION (src/kvm's Memslot has these fields). */
export interface SlotRegion {
  slot: number;
  asId: number;
  gpa: bigint;
  /** Bytes. */
  size: number | bigint;
  hva: bigint;
  /** KVM_MEM_* bits. */
  flags: number;
}

/** The KVM_MEM_* bits of a slot's flags. */
export function memFlags(f: { logDirty: boolean; readonly: boolean }): number {
  return (f.logDirty ? MEM.KVM_MEM_LOG_DIRTY_PAGES : 0) | (f.readonly ? MEM.KVM_MEM_READONLY : 0);
}

/** The model's view of a memslot: the same GFNs at the same host address, with `backing` behind it. */
export function modelSlot(s: SlotRegion, backing: Backing): Memslot {
  return fromRegion(
    {
      slot: (s.asId << 16) | s.slot,
      flags: s.flags,
      guestPhysAddr: s.gpa,
      memorySize: BigInt(s.size),
      userspaceAddr: s.hva,
    },
    backing,
  );
}

/** A declared memslot (address space 0) at host address `hva`. */
export function declaredSlot(
  d: { slot: number; gpa: bigint; size: bigint; backing: BackingName; logDirty: boolean; readonly: boolean },
  hva: bigint,
): Memslot {
  const gmem = d.backing === 'guest_memfd' ? MEM.KVM_MEM_GUEST_MEMFD : 0;
  const region = { slot: d.slot, asId: 0, gpa: d.gpa, size: d.size, hva, flags: memFlags(d) | gmem };
  return modelSlot(region, BACKINGS[d.backing].page);
}

/**
 * Why KVM refuses KVM_CLEAR_DIRTY_LOG of pages [first, first + count) of a
 * slot of `npages` pages (kvm_clear_dirty_log_protect, 6.1 to 7.2): the first
 * page must be a multiple of 64 (one bitmap word), the range must lie inside
 * the slot, and the page count must be a multiple of 64 unless the range runs
 * to the slot's last page. Undefined when KVM takes it.
 */
export function clearDirtyRefusal(npages: number, first: number, count: number): string | undefined {
  if (first % 64 !== 0) return `first page ${first} is not a multiple of 64`;
  if (first > npages || count > npages - first)
    return `pages [${first}, ${first + count}) run past the slot's ${npages}`;
  if (count < npages - first && count % 64 !== 0)
    return `${count} pages is not a multiple of 64 and does not reach the slot's end`;
  return undefined;
}

/**
 * The probe's facts that choose the host dimension's model (src/probe's
 * HostProfile has these fields).
 */
export interface MmuFacts {
  arch: string;
  tdp: { enabled: boolean; kind: string };
  /** kvm.tdp_mmu; null where the module has no such parameter. */
  tdpMmu: boolean | null;
  moduleParams: Readonly<Record<string, string>>;
}

/** Which MMU maps guest memory with TDP: the TDP MMU, or the legacy MMU's direct shadow pages (x86, kvm.tdp_mmu=0). */
export type TdpMmu = 'tdp' | 'legacy';

export function tdpMmuOf(f: MmuFacts): TdpMmu {
  return f.arch === 'x86_64' && f.tdp.enabled && (f.tdp.kind === 'npt' || f.tdp.kind === 'ept') && f.tdpMmu === false
    ? 'legacy'
    : 'tdp';
}

/** Model options that follow from the facts: which MMU, and (legacy, EPT) whether it has A/D bits to prefetch with. */
export function tdpFactsOptions(f: MmuFacts): Pick<ModelVmOptions, 'mmu' | 'adEnabled'> {
  const mmu = tdpMmuOf(f);
  if (mmu !== 'legacy') return { mmu };
  const eptad = f.moduleParams['kvm_intel.eptad'];
  return { mmu, adEnabled: f.tdp.kind !== 'ept' || eptad === undefined || eptad === 'Y' || eptad === '1' };
}

/**
 * The host dimension's model for a host with these facts: `LegacyTdp` under
 * the legacy MMU with TDP, `Tdp` elsewhere. Both answer the same queries
 * (lookup, mappings, pageCounts) and take the same operations.
 */
export function tdpModelFor(facts: MmuFacts, slots: Memslots, opts: TdpOptions = {}): Tdp {
  return newTdp(slots, { ...opts, ...tdpFactsOptions(facts) });
}

/** The options of ModelVm: the TDP model's, and which MMU (default the TDP MMU). */
export interface ModelVmOptions extends TdpOptions {
  mmu?: TdpMmu;
  /** Legacy MMU only: see LegacyOptions.adEnabled. */
  adEnabled?: boolean;
}

function newTdp(slots: Memslots, opts: ModelVmOptions): Tdp {
  const { mmu, adEnabled, ...tdpOpts } = opts;
  if (mmu !== 'legacy') return new Tdp(slots, tdpOpts);
  const { eagerSplit: _e, splitOnFault: _s, recoverHugeInPlace: _r, arch: _a, ...rest } = tdpOpts;
  return new LegacyTdp(slots, { ...rest, adEnabled });
}

/** A guest access the model faulted in, with what mapped its GFN before (for the fault it predicts). */
export interface GuestFault {
  gfn: number;
  access: 'read' | 'write' | 'exec';
  /** What the TDP model had for the GFN before: nothing, a present leaf, or an MMIO SPTE. */
  before: 'none' | 'present' | 'mmio';
  result: FaultResult;
}

/** A host change of part of a slot's memory, as the MMU notifier reports it. */
export type MemChange = 'munmap' | 'dontneed' | 'mprotect' | 'punch_hole' | 'hugepage' | 'nohugepage';

/**
 * One VM as the model sees it (address space 0): the TDP model over its
 * memslots and host memory, and the pages each dirty-logged slot should
 * report at its next harvest. Host changes reach the TDP model as MMU
 * notifiers report them (Tdp.invalidateHva: every slot the HVA range maps,
 * no early stop), and guest accesses fault in through it.
 */
export class ModelVm {
  readonly tdp: Tdp;
  /** Pages the guest dirtied per logged slot since the last harvest. */
  private readonly dirty = new Map<number, Set<bigint>>();
  /** Guest faults since the last takeFaults(). */
  private faults: GuestFault[] = [];

  /** Test-only: a deliberate mistake (wrong.ts). */
  private readonly wrongVm: WrongVm;

  constructor(opts: ModelVmOptions & { wrongVm?: WrongVm } = {}) {
    const { wrongVm, ...rest } = opts;
    this.tdp = newTdp(new Memslots(), rest);
    this.wrongVm = wrongVm ?? {};
  }

  get slots(): Memslots {
    return this.tdp.slots;
  }

  /** Creates a slot, moves it or changes its flags; turning logging off forgets the pages logged so far. */
  setSlot(m: Memslot): void {
    const ch = this.tdp.setMemslot(m);
    if (!m.flags.logDirty) this.dirty.delete(m.slot);
    else if (ch.change === 'move') {
      // KVM keeps a moved slot's dirty bitmap (Tdp.setMemslot): the pages written stay dirty at their new GPAs.
      const shift = BigInt(ch.new.baseGfn - ch.old.baseGfn) << 12n;
      const set = this.dirty.get(m.slot);
      if (set) this.dirty.set(m.slot, new Set([...set].map((gpa) => gpa + shift)));
    }
  }

  /** Deletes a slot (KVM_SET_USER_MEMORY_REGION with size 0). */
  deleteSlot(slot: number): void {
    this.tdp.setMemslot({ ...this.slot(slot), npages: 0 });
    this.dirty.delete(slot);
  }

  slot(slot: number): Memslot {
    const m = this.tdp.slots.get(0, slot);
    if (!m) throw new RangeError(`the model VM has no memslot ${slot}`);
    return m;
  }

  /** The slot that holds all of [gpa, gpa + len), if one does. */
  slotAt(gpa: bigint, len: number): Memslot | undefined {
    const m = this.tdp.slots.find(0, Number(gpa >> 12n));
    return m && gpa + BigInt(len) <= BigInt(m.baseGfn + m.npages) << 12n ? m : undefined;
  }

  /**
   * Each slot's part of [gpa, gpa + size), in GPA order, as [offset,
   * offset + size) of its memory: where a host step over a GPA range acts.
   * Throws where no slot holds a page (scenario validation refuses such ranges).
   */
  pieces(gpa: bigint, size: bigint): { slot: number; offset: bigint; size: bigint }[] {
    const out: { slot: number; offset: bigint; size: bigint }[] = [];
    const end = gpa + size;
    for (let at = gpa; at < end;) {
      const m = this.tdp.slots.find(0, Number(at >> 12n));
      if (!m) throw new RangeError(`the model VM has no memslot at GPA ${hex(at)}`);
      const base = BigInt(m.baseGfn) << 12n;
      const slotEnd = base + (BigInt(m.npages) << 12n);
      const to = end < slotEnd ? end : slotEnd;
      out.push({ slot: m.slot, offset: at - base, size: to - at });
      at = to;
    }
    return out;
  }

  /** The guest wrote `gpa`: its page is dirty if a logging slot holds it. */
  markDirty(gpa: bigint): void {
    const m = this.slotAt(gpa, 1);
    if (!m?.flags.logDirty) return;
    const set = this.dirty.get(m.slot) ?? new Set<bigint>();
    set.add(gpa & ~(PAGE - 1n));
    this.dirty.set(m.slot, set);
  }

  /**
   * KVM_GET_DIRTY_LOG of `slot`: the pages dirtied and not yet taken back.
   * Without manual protect the get takes them back (a new harvest starts);
   * with KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 (`manual`) it leaves the bitmap as
   * it is (kvm_get_dirty_log_protect copies it), and only a
   * KVM_CLEAR_DIRTY_LOG of their pages (clearDirty) takes them back.
   */
  harvestDirty(slot: number, manual = false): bigint[] {
    const pages = [...(this.dirty.get(slot) ?? [])];
    if (!manual || this.wrongVm.getForgetsManual) this.dirty.delete(slot);
    return pages;
  }

  /** KVM_CLEAR_DIRTY_LOG of pages [first, first + count) of `slot` (one that KVM accepted: clearDirtyRefusal). */
  clearDirty(slot: number, first: number, count: number): void {
    const set = this.dirty.get(slot);
    if (!set) return;
    const base = BigInt(this.slot(slot).baseGfn);
    for (const p of set) {
      const page = Number((p >> 12n) - base);
      if (page >= first && page < first + count) set.delete(p);
    }
  }

  /** A guest access to `gpa` faulting in through the TDP model. */
  fault(gpa: bigint, access: 'read' | 'write' | 'exec'): FaultResult {
    const gfn = Number(gpa >> 12n);
    const cur = this.tdp.lookup(0, gfn);
    const before = !cur ? 'none' : (cur.spte & SPTE_MMIO) !== 0 ? 'mmio' : 'present';
    const result = this.tdp.fault(0, gfn, { write: access === 'write', exec: access === 'exec' });
    this.faults.push({ gfn, access, before, result });
    // KVM retries a fault during which the host invalidated memory: the guest faults again.
    if (result.retried) this.faults.push({ gfn, access, before: result.retried, result });
    return result;
  }

  /** The guest faults since the last call. */
  takeFaults(): GuestFault[] {
    return this.faults.splice(0);
  }

  /**
   * The VMM wrote [gpa, gpa + len) of a slot through its host mapping: those
   * host pages are populated and writable (a later read fault maps them
   * writable, not the zero page).
   */
  hostWrote(gpa: bigint, len: number): void {
    for (let gfn = Number(gpa >> 12n); gfn <= Number((gpa + BigInt(Math.max(len, 1)) - 1n) >> 12n); gfn++) {
      if (this.tdp.slots.find(0, gfn)) this.tdp.hostAccess(0, gfn, true);
    }
  }

  /** A host change of part of a slot's memory; returns what the model zapped, for the notes. */
  change(slot: number, offset: bigint, size: bigint, why: MemChange, prot?: 'none' | 'read' | 'read-write'): string {
    const tdp = this.tdp;
    const m = this.slot(slot);
    const start = m.hva + offset;
    const end = start + size;
    const first = m.baseGfn + Number(offset >> 12n);
    const last = first + Number(size >> 12n);
    const mapped = tdp
      .mappings(0, first, last)
      .reduce((n, r) => n + Math.min(r.end, last) - Math.max(r.start, first), 0);
    const { ranges } = tdp.invalidateHva(start, end, why, prot);
    const gfnRange = (a: number, b: number) => `GFN [${hex(a)}, ${hex(b)})`;
    const zapped = ranges.map((r) => `${gfnRange(r.start, r.end)} of slot ${r.slot.slot}`).join(', ') || 'nothing';
    const pages = `${mapped} mapped page${mapped === 1 ? '' : 's'}`;
    return `model: ${why}${prot ? ` ${prot}` : ''} invalidates ${zapped}; ${pages} there refault on the next access`;
  }

  /**
   * The VMM writes [gpa, gpa + size) through the slots' HVAs: each page faults
   * in on the host (a zero page replaced is zapped where KVM mapped it); no
   * page is logged dirty. Returns what the model did, for the notes.
   */
  hostWrite(gpa: bigint, size: bigint): string {
    const first = Number(gpa >> 12n);
    const last = Number((gpa + size - 1n) >> 12n);
    const before = this.tdp.mappings(0, first, last + 1).reduce((n, r) => n + r.end - r.start, 0);
    for (let gfn = first; gfn <= last; gfn++) {
      if (!this.tdp.hostAccess(0, gfn, true)) throw new RangeError(`the model has no host page at GFN ${hex(gfn)}`);
    }
    const after = this.tdp.mappings(0, first, last + 1).reduce((n, r) => n + r.end - r.start, 0);
    const pages = last - first + 1;
    return `model: the host writes ${pages} page${pages === 1 ? '' : 's'}, none logged dirty; ${before - after} mapped page${before - after === 1 ? '' : 's'} zapped (zero pages replaced)`;
  }

  /**
   * The guest_memfd behind a slot is closed, its mapping gone with it:
   * kvm_gmem_release zaps every SPTE of the binding and clears the slot's
   * file, so a later fault there finds none (kvm_gmem_get_pfn: EFAULT, with a
   * memory-fault exit). The model takes the slot's pages away as munmap does.
   */
  closeGuestMemfd(slot: number): string {
    const m = this.slot(slot);
    const size = BigInt(m.npages) << 12n;
    return this.change(slot, 0n, size, 'munmap').replace('model: munmap', 'model: guest_memfd release');
  }

  /** Fresh host memory over part of a slot (mmap MAP_FIXED after munmap). */
  remap(slot: number, offset: bigint, size: bigint): void {
    const m = this.slot(slot);
    this.tdp.host.remap(m.hva + offset, m.hva + offset + size);
  }

  /**
   * KVM_PRE_FAULT_MEMORY of [gpa, gpa + size): page by page until one has no
   * host memory to map (KVM stops there with EFAULT). Returns what the model
   * did, for the notes, and the GPA where it stopped, if it did.
   */
  preFault(gpa: bigint, size: bigint): { note: string; efault?: bigint } {
    const kinds = new Map<string, number>();
    let efault: bigint | undefined;
    for (let gfn = Number(gpa >> 12n); gfn < Number((gpa + size) >> 12n); gfn++) {
      const k = this.tdp.fault(0, gfn).kind;
      kinds.set(k, (kinds.get(k) ?? 0) + 1);
      if (k === 'efault') {
        efault = BigInt(gfn) << 12n;
        break;
      }
    }
    const note = `model: pre-fault ${[...kinds].map(([k, n]) => `${n} ${k}`).join(', ')}`;
    return efault === undefined ? { note } : { note, efault };
  }
}

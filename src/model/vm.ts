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
import { Tdp, type FaultResult, type TdpOptions } from './tdp.js';
import { hex, PAGE } from '../base/units.js';

/** The backing kinds a scenario (and the harness) declares for a memslot. */
export type BackingName = 'anon' | 'shared' | 'memfd' | 'thp' | 'hugetlb2m' | 'hugetlb1g';

/**
 * Each declared backing: how the VMM allocates it and the host pages the
 * model sees behind it. 'anon' asks for no transparent huge pages
 * (MADV_NOHUGEPAGE): 4 KiB pages whatever the host's THP mode, which is what
 * the model takes 'anon' to be. Under THP "always" a guest write would
 * otherwise fault in a 2 MiB page, and KVM would then map its neighbours
 * writable (and log them dirty) on read faults. 'shared' is a MAP_SHARED
 * mapping of page cache, which the model treats as a memfd.
 */
export const BACKINGS: Readonly<Record<BackingName, { alloc: HostBacking; page: Backing }>> = {
  anon: { alloc: { kind: 'anon', thp: false }, page: { kind: 'anon', pageSize: 4096 } },
  shared: { alloc: { kind: 'shared' }, page: { kind: 'memfd', pageSize: 4096 } },
  memfd: { alloc: { kind: 'memfd' }, page: { kind: 'memfd', pageSize: 4096 } },
  thp: { alloc: { kind: 'anon', thp: true }, page: { kind: 'thp', pageSize: 2 << 20 } },
  hugetlb2m: { alloc: { kind: 'hugetlb', pageSize: '2M' }, page: { kind: 'hugetlb2m', pageSize: 2 << 20 } },
  hugetlb1g: { alloc: { kind: 'hugetlb', pageSize: '1G' }, page: { kind: 'hugetlb1g', pageSize: 1 << 30 } },
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
  const region = { slot: d.slot, asId: 0, gpa: d.gpa, size: d.size, hva, flags: memFlags(d) };
  return modelSlot(region, BACKINGS[d.backing].page);
}

/** A host change of part of a slot's memory, as the MMU notifier reports it. */
export type MemChange = 'munmap' | 'dontneed' | 'mprotect';

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

  constructor(opts: TdpOptions = {}) {
    this.tdp = new Tdp(new Memslots(), opts);
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

  /** The guest wrote `gpa`: its page is dirty if a logging slot holds it. */
  markDirty(gpa: bigint): void {
    const m = this.slotAt(gpa, 1);
    if (!m?.flags.logDirty) return;
    const set = this.dirty.get(m.slot) ?? new Set<bigint>();
    set.add(gpa & ~(PAGE - 1n));
    this.dirty.set(m.slot, set);
  }

  /** The pages dirtied in `slot` since the last harvest, which starts a new one. */
  harvestDirty(slot: number): bigint[] {
    const pages = [...(this.dirty.get(slot) ?? [])];
    this.dirty.delete(slot);
    return pages;
  }

  /** A guest access to `gpa` faulting in through the TDP model. */
  fault(gpa: bigint, access: 'read' | 'write' | 'exec'): FaultResult {
    return this.tdp.fault(0, Number(gpa >> 12n), { write: access === 'write', exec: access === 'exec' });
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
    if (prot) tdp.host.protect(start, end, prot);
    const { ranges } = tdp.invalidateHva(start, end, why);
    const gfnRange = (a: number, b: number) => `GFN [${hex(a)}, ${hex(b)})`;
    const zapped = ranges.map((r) => `${gfnRange(r.start, r.end)} of slot ${r.slot.slot}`).join(', ') || 'nothing';
    const pages = `${mapped} mapped page${mapped === 1 ? '' : 's'}`;
    return `model: ${why}${prot ? ` ${prot}` : ''} invalidates ${zapped}; ${pages} there refault on the next access`;
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

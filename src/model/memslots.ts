// Memslots per address space, and the HVA-range operator that turns a
// host-side change (munmap, madvise(MADV_DONTNEED), mprotect,
// fallocate(PUNCH_HOLE)) into per-slot GFN ranges. The host memory behind the
// slots is host-mm.ts.
//
// What the module models:
// - `Memslots`: KVM_SET_USER_MEMORY_REGION bookkeeping with KVM's checks
//   (virt/kvm/kvm_main.c: check_memory_region_flags, __kvm_set_memory_region):
//   every rejected update throws a MemslotError naming the problem.
// - `hvaRanges()`: the one iteration over "every slot in every address space
//   that an HVA range intersects" (kvm_for_each_memslot_in_hva_range), used by
//   two callers with different contracts: the MMU-notifier invalidation in
//   tdp.ts visits every slot, and `hvaRangeOp()` stops at the first error.
//
// GFNs and page counts are numbers (a GFN is below 2^45 even with 5-level
// paging); HVAs are bigints, as in the uapi structures.

import { MEM } from '../uapi/uapi.js';
import { hex, PAGE } from '../base/units.js';

export const PAGE_SHIFT = 12;

/** KVM_MEM_MAX_NR_PAGES: the largest slot KVM accepts, in 4 KiB pages. */
export const MAX_NR_PAGES = 2 ** 31 - 1;

/** struct kvm_userspace_memory_region(2) flag bits. */
const { KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY, KVM_MEM_GUEST_MEMFD } = MEM;

export type BackingKind = 'anon' | 'thp' | 'hugetlb2m' | 'hugetlb1g' | 'memfd' | 'guest_memfd';

/** What the host maps at the slot's HVA. `pageSize` is in bytes. */
export interface Backing {
  kind: BackingKind;
  pageSize: number;
}

export interface MemslotFlags {
  logDirty: boolean;
  readonly: boolean;
}

export interface Memslot {
  slot: number;
  asId: number;
  baseGfn: number;
  npages: number;
  hva: bigint;
  flags: MemslotFlags;
  backing: Backing;
}

export type MemslotChange =
  | { change: 'create'; new: Memslot }
  | { change: 'delete'; old: Memslot }
  | { change: 'move'; old: Memslot; new: Memslot }
  | { change: 'flags'; old: Memslot; new: Memslot }
  | { change: 'none'; old: Memslot };

export type Errno = 'EINVAL' | 'EEXIST' | 'EBUSY';

/** A rejected memslot update: `errno` is what the ioctl would return, `problem` says why. */
export class MemslotError extends Error {
  constructor(
    readonly errno: Errno,
    readonly problem: string,
  ) {
    super(`${errno}: ${problem}`);
    this.name = 'MemslotError';
  }
}

const SIZES: Record<BackingKind, readonly number[]> = {
  anon: [4096],
  thp: [2 << 20],
  hugetlb2m: [2 << 20],
  hugetlb1g: [1 << 30],
  memfd: [4096, 2 << 20],
  guest_memfd: [4096, 2 << 20],
};

export interface MemslotsOptions {
  /** Address spaces (KVM_CAP_MULTI_ADDRESS_SPACE): 2 on x86 (normal, SMM), 1 on arm64. */
  asIds?: number;
  /** User memslots per address space (KVM_CAP_NR_MEMSLOTS). */
  maxSlots?: number;
  /** One past the highest GFN the MMU can map (x86 4-level: 2^36). */
  maxGfn?: number;
  /** One past the highest user address (access_ok): 2^47 - 4096 on a 4-level x86 host. */
  hvaLimit?: bigint;
}

export function slotEnd(s: Memslot): number {
  return s.baseGfn + s.npages;
}

export function slotHvaEnd(s: Memslot): bigint {
  return s.hva + BigInt(s.npages) * PAGE;
}

/** HVA of `gfn` inside slot `s` (__gfn_to_hva_memslot). */
export function gfnToHva(s: Memslot, gfn: number): bigint {
  return s.hva + BigInt(gfn - s.baseGfn) * PAGE;
}

/**
 * The memslots of one VM, per address space.
 *
 * Readers: `find()` and `hvaRanges()`. Writers: `set()`. A write while an
 * `hvaRanges()` walk is open is refused with EBUSY: in KVM the update would
 * wait in synchronize_srcu() for the reader, which here is the caller itself.
 */
export class Memslots {
  readonly asIds: number;
  readonly maxSlots: number;
  readonly maxGfn: number;
  readonly hvaLimit: bigint;
  /** Open hvaRanges() walks (the SRCU read side). */
  readers = 0;
  private readonly spaces: Memslot[][];
  private readonly last: (Memslot | undefined)[];

  constructor(opts: MemslotsOptions = {}) {
    this.asIds = opts.asIds ?? 2;
    this.maxSlots = opts.maxSlots ?? 32764;
    this.maxGfn = opts.maxGfn ?? 2 ** 36;
    this.hvaLimit = opts.hvaLimit ?? (1n << 47n) - PAGE;
    this.spaces = Array.from({ length: this.asIds }, () => []);
    // Stryker disable next-line ArrayDeclaration: an empty array reads undefined at every index too
    this.last = new Array<Memslot | undefined>(this.asIds);
  }

  /** Slots of one address space ordered by base GFN. */
  list(asId: number): readonly Memslot[] {
    return this.spaces[asId] ?? [];
  }

  get(asId: number, slot: number): Memslot | undefined {
    return this.list(asId).find((s) => s.slot === slot);
  }

  /** The slot holding `gfn` (search_memslots, with its last-hit cache). */
  find(asId: number, gfn: number): Memslot | undefined {
    const hit = this.last[asId];
    if (hit && gfn >= hit.baseGfn && gfn < slotEnd(hit)) return hit;
    const slots = this.list(asId);
    let lo = 0;
    let hi = slots.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      const s = slots[mid]!;
      if (gfn < s.baseGfn) hi = mid;
      else if (gfn >= slotEnd(s)) lo = mid + 1;
      else return (this.last[asId] = s);
    }
    return undefined;
  }

  /**
   * KVM_SET_USER_MEMORY_REGION: create, move, change flags of, or (npages 0)
   * delete a slot. Throws MemslotError; on success returns what changed.
   */
  set(input: Memslot): MemslotChange {
    if (this.readers > 0) throw new MemslotError('EBUSY', 'memslot update inside an hvaRanges() walk');
    const s = cloneSlot(input);
    const { asId, slot } = s;
    if (!Number.isInteger(asId) || asId < 0 || asId >= this.asIds)
      throw new MemslotError('EINVAL', `as_id ${asId} is outside [0, ${this.asIds})`);
    if (!Number.isInteger(slot) || slot < 0 || slot >= this.maxSlots)
      throw new MemslotError('EINVAL', `slot id ${slot} is outside [0, ${this.maxSlots})`);
    const slots = this.spaces[asId]!;
    const old = slots.find((o) => o.slot === slot);

    if (s.npages === 0) {
      if (!old) throw new MemslotError('EINVAL', `no slot ${slot} in as_id ${asId} to delete`);
      slots.splice(slots.indexOf(old), 1);
      this.last[asId] = undefined;
      return { change: 'delete', old };
    }
    this.check(s);

    let change: MemslotChange;
    if (!old) change = { change: 'create', new: s };
    else {
      if (s.npages !== old.npages)
        throw new MemslotError(
          'EINVAL',
          `slot ${slot}: size of an existing slot cannot change (${old.npages} -> ${s.npages} pages)`,
        );
      if (s.hva !== old.hva)
        throw new MemslotError('EINVAL', `slot ${slot}: userspace_addr of an existing slot cannot change`);
      if (s.flags.readonly !== old.flags.readonly)
        throw new MemslotError('EINVAL', `slot ${slot}: KVM_MEM_READONLY cannot be toggled on an existing slot`);
      if (s.backing.kind !== old.backing.kind || s.backing.pageSize !== old.backing.pageSize)
        throw new MemslotError('EINVAL', `slot ${slot}: the backing of an existing slot cannot change`);
      if (s.baseGfn !== old.baseGfn) change = { change: 'move', old, new: s };
      else if (s.flags.logDirty !== old.flags.logDirty) change = { change: 'flags', old, new: s };
      else return { change: 'none', old };
    }

    if (change.change !== 'flags') {
      for (const o of slots) {
        if (o === old) continue;
        if (s.baseGfn < slotEnd(o) && o.baseGfn < slotEnd(s))
          throw new MemslotError(
            'EEXIST',
            `GFN range [${hex(s.baseGfn)}, ${hex(slotEnd(s))}) of slot ${slot} overlaps slot ${o.slot} [${hex(o.baseGfn)}, ${hex(slotEnd(o))}) in as_id ${asId}`,
          );
      }
    }
    if (old) slots.splice(slots.indexOf(old), 1);
    slots.push(s);
    slots.sort((a, b) => a.baseGfn - b.baseGfn);
    this.last[asId] = undefined;
    return change;
  }

  /** The per-slot checks of __kvm_set_memory_region, plus the host's own rules for the backing. */
  private check(s: Memslot): void {
    const { slot, backing, flags } = s;
    if (backing.kind === 'guest_memfd' && flags.readonly)
      throw new MemslotError('EINVAL', `slot ${slot}: KVM_MEM_READONLY cannot be combined with guest_memfd`);
    if (backing.kind === 'guest_memfd' && flags.logDirty)
      throw new MemslotError('EINVAL', `slot ${slot}: dirty logging is not supported on a guest_memfd slot`);
    if (!Number.isInteger(s.npages) || s.npages < 0 || s.npages > MAX_NR_PAGES)
      throw new MemslotError('EINVAL', `slot ${slot}: ${s.npages} pages is not a valid size (max ${MAX_NR_PAGES})`);
    if (!Number.isInteger(s.baseGfn) || s.baseGfn < 0)
      throw new MemslotError('EINVAL', `slot ${slot}: base GFN ${s.baseGfn} is not a frame number`);
    if (slotEnd(s) > this.maxGfn)
      throw new MemslotError(
        'EINVAL',
        `slot ${slot}: ends at GFN ${hex(slotEnd(s))}, beyond the MMU's limit ${hex(this.maxGfn)}`,
      );
    if (s.hva % PAGE !== 0n)
      throw new MemslotError('EINVAL', `slot ${slot}: userspace_addr 0x${s.hva.toString(16)} is not page-aligned`);
    if (s.hva < 0n || slotHvaEnd(s) > this.hvaLimit)
      throw new MemslotError('EINVAL', `slot ${slot}: userspace range ends beyond the user address space (access_ok)`);
    if (!SIZES[backing.kind].includes(backing.pageSize))
      throw new MemslotError(
        'EINVAL',
        `slot ${slot}: ${backing.kind} backing cannot have page size ${backing.pageSize}`,
      );
    if (backing.kind === 'hugetlb2m' || backing.kind === 'hugetlb1g') {
      const size = BigInt(backing.pageSize);
      if (s.hva % size !== 0n || (BigInt(s.npages) * PAGE) % size !== 0n)
        throw new MemslotError(
          'EINVAL',
          `slot ${slot}: a hugetlb mapping is aligned to and sized in ${backing.pageSize >> 20} MiB pages`,
        );
    }
  }
}

/** struct kvm_userspace_memory_region(2) as userspace passes it. */
export interface MemoryRegion {
  /** as_id in bits 31:16, slot id in bits 15:0. */
  slot: number;
  flags: number;
  guestPhysAddr: bigint;
  memorySize: bigint;
  userspaceAddr: bigint;
}

/**
 * Turn an ioctl argument into a Memslot, with KVM's byte-level checks
 * (flag bits, page alignment of size, GPA and HVA, address wrap).
 */
export function fromRegion(r: MemoryRegion, backing: Backing): Memslot {
  const known = KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY | KVM_MEM_GUEST_MEMFD;
  if (r.flags & ~known) throw new MemslotError('EINVAL', `unknown flag bits 0x${(r.flags & ~known).toString(16)}`);
  if (((r.flags & KVM_MEM_GUEST_MEMFD) !== 0) !== (backing.kind === 'guest_memfd'))
    throw new MemslotError('EINVAL', 'KVM_MEM_GUEST_MEMFD must be set exactly for a guest_memfd backing');
  if (r.memorySize % PAGE !== 0n) throw new MemslotError('EINVAL', 'memory_size is not a multiple of the page size');
  if (r.guestPhysAddr % PAGE !== 0n) throw new MemslotError('EINVAL', 'guest_phys_addr is not page-aligned');
  if (r.userspaceAddr % PAGE !== 0n) throw new MemslotError('EINVAL', 'userspace_addr is not page-aligned');
  if (r.guestPhysAddr + r.memorySize >= 1n << 64n)
    throw new MemslotError('EINVAL', 'guest_phys_addr + memory_size wraps');
  return {
    slot: r.slot & 0xffff,
    asId: r.slot >>> 16,
    baseGfn: Number(r.guestPhysAddr >> 12n),
    npages: Number(r.memorySize >> 12n),
    hva: r.userspaceAddr,
    flags: { logDirty: (r.flags & KVM_MEM_LOG_DIRTY_PAGES) !== 0, readonly: (r.flags & KVM_MEM_READONLY) !== 0 },
    backing: { ...backing },
  };
}

function cloneSlot(s: Memslot): Memslot {
  return Object.freeze({
    ...s,
    flags: Object.freeze({ ...s.flags }),
    backing: Object.freeze({ ...s.backing }),
  });
}

// ---------------------------------------------------------------------------
// HVA ranges -> GFN ranges

/** The part of one slot that an HVA range covers, as GFNs [start, end). */
export interface GfnRange {
  asId: number;
  slot: Memslot;
  start: number;
  end: number;
}

/**
 * Every (address space, slot) an HVA range [hvaStart, hvaEnd) intersects, in
 * address-space order and, inside one, in HVA order (the interval tree's
 * order), with the GFNs of every page the range touches:
 * {gfn(page) | page intersects [hvaStart, hvaEnd)}.
 *
 * The walk counts as a reader of `slots` from the first next() until it ends
 * or is abandoned (the finally block runs on break and on throw).
 */
export function* hvaRanges(slots: Memslots, hvaStart: bigint, hvaEnd: bigint): Generator<GfnRange, void, undefined> {
  if (hvaEnd <= hvaStart) return;
  slots.readers++;
  try {
    for (let asId = 0; asId < slots.asIds; asId++) {
      const byHva = [...slots.list(asId)].sort((a, b) => (a.hva < b.hva ? -1 : a.hva > b.hva ? 1 : a.slot - b.slot));
      for (const s of byHva) {
        const end = slotHvaEnd(s);
        if (s.hva >= hvaEnd || end <= hvaStart) continue;
        const lo = hvaStart > s.hva ? hvaStart : s.hva;
        const hi = hvaEnd < end ? hvaEnd : end;
        yield {
          asId,
          slot: s,
          start: s.baseGfn + Number((lo - s.hva) >> 12n),
          end: s.baseGfn + Number((hi - s.hva + PAGE - 1n) >> 12n),
        };
      }
    }
  } finally {
    slots.readers--;
  }
}

export interface HvaOpResult {
  /** The handler's error, or EINVAL for an empty or inverted range. */
  error?: Error;
  /** Ranges whose handler ran and succeeded, in visiting order. */
  done: GfnRange[];
  /** The range whose handler failed; nothing after it was visited. */
  failed?: GfnRange;
}

/**
 * Run `handler` on every GFN range an HVA range maps to, stopping the whole
 * iteration at the first handler error (the contract of
 * kvm_vm_do_hva_range_op, not of the MMU-notifier walk: that one visits every
 * slot and ORs "flush needed"; see Tdp.invalidateHva).
 */
export function hvaRangeOp(
  slots: Memslots,
  hvaStart: bigint,
  hvaEnd: bigint,
  handler: (r: GfnRange) => Error | undefined,
): HvaOpResult {
  if (hvaEnd <= hvaStart) return { error: new MemslotError('EINVAL', 'empty or inverted HVA range'), done: [] };
  const done: GfnRange[] = [];
  for (const r of hvaRanges(slots, hvaStart, hvaEnd)) {
    const error = handler(r);
    if (error) return { error, done, failed: r };
    done.push(r);
  }
  return { done };
}

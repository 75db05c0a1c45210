// A memslot and the host memory behind it: allocation of the backing (the
// host side of a memslot, HostBacking), operations on it (madvise, mprotect,
// munmap and remap, hole punching, THP accounting), and GuestMemory, the
// guest-physical view through the slots.
import { check, mapped, Unsupported, type Addon } from './sys.js';
import { FALLOC, MADV, MAP, MFD, PROT } from '../uapi/uapi.js';
import type { Target } from './target.js';
import type { HostBacking } from '../base/host-backing.js';
import { PAGE_SIZE } from '../base/units.js';

export interface MemslotSpec {
  slot: number;
  gpa: bigint;
  size: number;
  flags?: number;
  backing?: HostBacking;
  /** Address space (x86: 1 is SMM). */
  asId?: number;
  /** guest_memfd to bind (KVM_SET_USER_MEMORY_REGION2 with KVM_MEM_GUEST_MEMFD). */
  guestMemfd?: { fd: number; offset: bigint };
  /** Where the host memory starts relative to the GPA: (hva - gpa) mod `modulo` = `offset` (see placeBacking). */
  placement?: Placement;
}

/** The HVA of a slot's memory relative to its GPA: (hva - gpa) mod `modulo` = `offset` (both 4K multiples). */
export interface Placement {
  modulo: bigint;
  offset: bigint;
}

/** A page of a slot's backing that the process must not touch as usual. */
export type PageState = 'unmapped' | 'prot-none' | 'prot-read';

/** A memslot and the host memory behind it. */
export class Memslot {
  /**
   * Pages (by index in the slot) that munmap or mprotect made unusable:
   * reading an unmapped or PROT_NONE page, or writing a PROT_READ one, from
   * this process would fault, so GuestMemory refuses to.
   */
  pageStates = new Map<number, PageState>();
  constructor(
    /** The target whose memory this is. */
    readonly target: Target,
    readonly slot: number,
    readonly asId: number,
    readonly gpa: bigint,
    readonly size: number,
    public flags: number,
    readonly memory: ArrayBuffer,
    readonly hva: bigint,
    /** memfd (or guest_memfd) backing this slot, or -1. */
    public memfd: number,
    readonly backing: HostBacking,
    /** Byte offset of the slot's first byte in `memory` (non-zero when the slot was placed, see placeBacking). */
    readonly base = 0,
  ) {}
  get bytes(): Uint8Array {
    return new Uint8Array(this.memory, this.base, this.size);
  }
  get npages(): number {
    return this.size / PAGE_SIZE;
  }
  contains(gpa: bigint, len = 1): boolean {
    return gpa >= this.gpa && gpa + BigInt(len) <= this.gpa + BigInt(this.size);
  }
  private range(call: string, offset: number, len: number): void {
    if (offset < 0 || len <= 0 || offset + len > this.size || offset % PAGE_SIZE) {
      throw new RangeError(
        `${call}: range +0x${offset.toString(16)}/0x${len.toString(16)} is not page-aligned inside memslot ${this.slot} (0x${this.size.toString(16)} bytes)`,
      );
    }
  }
  /** madvise() on part of the backing (MADV.DONTNEED, HUGEPAGE, NOHUGEPAGE, ...). */
  madvise(offset: number, len: number, advice: number): void {
    this.range('madvise', offset, len);
    check('madvise', this.target.addon.madvise(this.memory, this.base + offset, len, advice), `memslot ${this.slot}`);
  }
  /**
   * The process holding the memory stores the current bytes of
   * [offset, offset + len) there, changed or not (on this host the bytes are
   * the memory: nothing more to do).
   */
  storeThrough(offset: number, len: number): void {
    if (offset < 0 || len <= 0 || offset + len > this.size)
      throw new RangeError(
        `store: range +0x${offset.toString(16)}/0x${len.toString(16)} is outside memslot ${this.slot}`,
      );
    const store = this.target.addon.storeThrough;
    if (store)
      check('store', store.call(this.target.addon, this.memory, this.base + offset, len), `memslot ${this.slot}`);
  }
  /** mprotect() on part of the backing (PROT bits). */
  mprotect(offset: number, len: number, prot: number): void {
    this.range('mprotect', offset, len);
    check('mprotect', this.target.addon.mprotect(this.memory, this.base + offset, len, prot), `memslot ${this.slot}`);
    const state: PageState | undefined = !(prot & PROT.READ)
      ? 'prot-none'
      : !(prot & PROT.WRITE)
        ? 'prot-read'
        : undefined;
    this.setStates(offset, len, state);
  }
  /** munmap() of part of the backing; remap() puts memory back. Needs a target that maps ranges. */
  munmap(offset: number, len: number): void {
    this.range('munmap', offset, len);
    const r = this.target.ranges;
    if (!r) {
      throw new Unsupported(
        'munmap of part of a memslot',
        `the ${this.target.name} target cannot unmap part of a mapping`,
      );
    }
    check('munmap', r.unmapRange(this.memory, this.base + offset, len), `memslot ${this.slot}`);
    this.setStates(offset, len, 'unmapped');
  }
  /**
   * Maps fresh memory of the slot's backing kind over part of it (MAP_FIXED):
   * anonymous and hugetlb memory comes back zeroed, a memfd's pages with the
   * file's contents, shared anonymous memory as a new zeroed object.
   */
  remap(offset: number, len: number): void {
    this.range('remap', offset, len);
    const r = this.target.ranges;
    if (!r) {
      throw new Unsupported(
        'remapping part of a memslot',
        `the ${this.target.name} target cannot map over part of a mapping`,
      );
    }
    const b = this.backing;
    if (b.kind === 'guest_memfd') throw new Error(`memslot ${this.slot}: a guest_memfd slot's mapping is not remapped`);
    const rw = PROT.READ | PROT.WRITE;
    const flags =
      b.kind === 'anon'
        ? MAP.PRIVATE | MAP.ANONYMOUS | MAP.NORESERVE
        : b.kind === 'shared'
          ? MAP.SHARED | MAP.ANONYMOUS | MAP.NORESERVE
          : b.kind === 'memfd'
            ? MAP.SHARED
            : MAP.PRIVATE | MAP.ANONYMOUS | MAP.HUGETLB | (b.pageSize === '1G' ? MAP.HUGE_1GB : MAP.HUGE_2MB);
    check(
      'mmap(MAP_FIXED)',
      r.remapRange(
        this.memory,
        this.base + offset,
        len,
        rw,
        flags,
        b.kind === 'memfd' ? this.memfd : -1,
        b.kind === 'memfd' ? this.base + offset : 0,
      ),
      `memslot ${this.slot}`,
    );
    if (b.kind === 'anon' && b.thp !== undefined)
      check(
        'madvise',
        this.target.addon.madvise(this.memory, this.base + offset, len, b.thp ? MADV.HUGEPAGE : MADV.NOHUGEPAGE),
      );
    this.setStates(offset, len, undefined);
  }
  private setStates(offset: number, len: number, state: PageState | undefined): void {
    for (let p = offset / PAGE_SIZE; p < (offset + len) / PAGE_SIZE; p++) {
      if (state) this.pageStates.set(p, state);
      else this.pageStates.delete(p);
    }
  }
  /**
   * Bytes of the backing the host maps with transparent huge pages
   * (AnonHugePages of the VMAs inside the slot, from /proc/self/smaps of the
   * process holding the memory), or undefined when smaps cannot be read.
   */
  hugeBytes(): number | undefined {
    const smaps = this.target.fs.read('/proc/self/smaps');
    if (smaps === undefined) return undefined;
    const end = this.hva + BigInt(this.size);
    let inside = false;
    let total = 0;
    for (const line of smaps.split('\n')) {
      const vma = /^([0-9a-f]+)-([0-9a-f]+) /.exec(line);
      if (vma) {
        const from = BigInt(`0x${vma[1]}`);
        inside = from >= this.hva && from < end;
        continue;
      }
      const huge = inside ? /^AnonHugePages:\s+(\d+) kB/.exec(line) : null;
      if (huge) total += Number(huge[1]) * 1024;
    }
    return total;
  }
  /**
   * The VmFlags of the mapping that holds the slot's first byte, from
   * /proc/self/smaps of the process holding the memory ("nh": MADV_NOHUGEPAGE,
   * "hg": MADV_HUGEPAGE), or undefined when smaps cannot be read.
   */
  vmFlags(): string[] | undefined {
    const smaps = this.target.fs.read('/proc/self/smaps');
    if (smaps === undefined) return undefined;
    let inside = false;
    for (const line of smaps.split('\n')) {
      const vma = /^([0-9a-f]+)-([0-9a-f]+) /.exec(line);
      if (vma) {
        inside = BigInt(`0x${vma[1]}`) <= this.hva && this.hva < BigInt(`0x${vma[2]}`);
        continue;
      }
      const flags = inside ? /^VmFlags:\s*(.*)$/.exec(line) : null;
      if (flags) return flags[1]!.trim().split(/\s+/);
    }
    return undefined;
  }
  /**
   * The host mappings that overlap the slot's memory, from /proc/self/smaps of
   * the process holding it: range, AnonHugePages and VmFlags of each (for a
   * note when KVM zapped more than a host change should have made it).
   */
  vmas(): { start: bigint; end: bigint; anonHugeKb: number; flags: string }[] | undefined {
    const smaps = this.target.fs.read('/proc/self/smaps');
    if (smaps === undefined) return undefined;
    const out: { start: bigint; end: bigint; anonHugeKb: number; flags: string }[] = [];
    const end = this.hva + BigInt(this.size);
    let cur: (typeof out)[number] | undefined;
    for (const line of smaps.split('\n')) {
      const vma = /^([0-9a-f]+)-([0-9a-f]+) /.exec(line);
      if (vma) {
        const [a, b] = [BigInt(`0x${vma[1]}`), BigInt(`0x${vma[2]}`)];
        cur = a < end && b > this.hva ? { start: a, end: b, anonHugeKb: 0, flags: '' } : undefined;
        if (cur) out.push(cur);
        continue;
      }
      if (!cur) continue;
      const huge = /^AnonHugePages:\s+(\d+) kB/.exec(line);
      if (huge) cur.anonHugeKb = Number(huge[1]);
      const flags = /^VmFlags:\s*(.*)$/.exec(line);
      if (flags) cur.flags = flags[1]!.trim();
    }
    return out;
  }
  /** Why this process cannot read (or write) [offset, offset+len) of the backing now, or undefined. */
  untouchable(offset: number, len: number, write: boolean): PageState | undefined {
    if (this.pageStates.size === 0) return undefined;
    for (let p = Math.floor(offset / PAGE_SIZE); p * PAGE_SIZE < offset + len; p++) {
      const st = this.pageStates.get(p);
      if (st === 'unmapped' || st === 'prot-none' || (st === 'prot-read' && write)) return st;
    }
    return undefined;
  }
  /** fallocate(PUNCH_HOLE) on a memfd- or guest_memfd-backed slot's file (a placed slot starts at `base` in it). */
  punchHole(offset: number, len: number): void {
    this.range('fallocate', offset, len);
    if (this.memfd < 0) throw new Error(`memslot ${this.slot} is not backed by a memfd or guest_memfd`);
    punchHole(this.target.addon, this.memfd, this.base + offset, len);
  }

  /**
   * Unmaps the slot's guest_memfd and closes it while the slot stays: the
   * file goes (kvm_gmem_release), and guest accesses there fail with a
   * memory-fault exit. This process can no longer read the slot.
   */
  closeGuestMemfd(): void {
    if (this.backing.kind !== 'guest_memfd' || this.memfd < 0)
      throw new Error(`memslot ${this.slot} has no open guest_memfd`);
    check('munmap(guest_memfd)', this.target.addon.munmap(this.memory), `memslot ${this.slot}`);
    check('close(guest_memfd)', this.target.addon.close(this.memfd), `memslot ${this.slot}`);
    this.memfd = -1;
    this.released = true;
    this.setStates(0, this.size, 'unmapped');
  }
  private released = false;

  /** Unmaps the backing and closes its memfd. */
  free(): void {
    if (!this.released) this.target.addon.munmap(this.memory);
    if (this.memfd >= 0) this.target.addon.close(this.memfd);
    this.released = true;
    this.memfd = -1;
  }
}

/** Guest-physical memory as seen through the memslots of address space 0. */
export class GuestMemory {
  constructor(private readonly slots: () => Iterable<Memslot>) {}
  slotOf(gpa: bigint, len = 1): Memslot | undefined {
    for (const s of this.slots()) if (s.asId === 0 && s.contains(gpa, len)) return s;
    return undefined;
  }
  /** A live view of [gpa, gpa+len) inside one memslot; refused where the backing is unmapped or protected. */
  bytes(gpa: bigint, len: number, write = false): Uint8Array {
    const s = this.slotOf(gpa, len);
    if (!s) throw new RangeError(`GPA range 0x${gpa.toString(16)}+0x${len.toString(16)} is not inside one memslot`);
    const why = s.untouchable(Number(gpa - s.gpa), len, write);
    if (why)
      throw new RangeError(
        `GPA range 0x${gpa.toString(16)}+0x${len.toString(16)}: the host memory behind it is ${why}`,
      );
    return new Uint8Array(s.memory, s.base + Number(gpa - s.gpa), len);
  }
  write(gpa: bigint, data: ArrayLike<number>): void {
    this.bytes(gpa, data.length, true).set(data);
  }
  read64(gpa: bigint): bigint {
    const b = this.bytes(gpa, 8);
    return new DataView(b.buffer, b.byteOffset, 8).getBigUint64(0, true);
  }
  write64(gpa: bigint, v: bigint): void {
    const b = this.bytes(gpa, 8, true);
    new DataView(b.buffer, b.byteOffset, 8).setBigUint64(0, BigInt.asUintN(64, v), true);
  }
  read32(gpa: bigint): number {
    const b = this.bytes(gpa, 4);
    return new DataView(b.buffer, b.byteOffset, 4).getUint32(0, true);
  }
  write32(gpa: bigint, v: number): void {
    const b = this.bytes(gpa, 4, true);
    new DataView(b.buffer, b.byteOffset, 4).setUint32(0, v >>> 0, true);
  }
}

/** Maps `size` bytes of host memory of kind `b` (for memfd backing, a new memfd named `name`). */
export function allocBacking(
  a: Addon,
  b: HostBacking,
  size: number,
  name: string,
): { memory: ArrayBuffer; memfd: number } {
  const rw = PROT.READ | PROT.WRITE;
  switch (b.kind) {
    case 'anon': {
      const memory = mapped('mmap(anonymous)', a.mmap(size, rw, MAP.PRIVATE | MAP.ANONYMOUS | MAP.NORESERVE, -1, 0));
      if (b.thp !== undefined) check('madvise', a.madvise(memory, 0, size, b.thp ? MADV.HUGEPAGE : MADV.NOHUGEPAGE));
      return { memory, memfd: -1 };
    }
    case 'shared':
      return {
        memory: mapped('mmap(shared)', a.mmap(size, rw, MAP.SHARED | MAP.ANONYMOUS | MAP.NORESERVE, -1, 0)),
        memfd: -1,
      };
    case 'hugetlb': {
      const flag = b.pageSize === '1G' ? MAP.HUGE_1GB : MAP.HUGE_2MB;
      return {
        memory: mapped(
          `mmap(hugetlb ${b.pageSize})`,
          a.mmap(size, rw, MAP.PRIVATE | MAP.ANONYMOUS | MAP.HUGETLB | flag, -1, 0),
        ),
        memfd: -1,
      };
    }
    case 'guest_memfd':
      throw new Error('a guest_memfd backing is made by Vm.addMemslot, which has the VM it belongs to');
    case 'memfd': {
      const fd = check('memfd_create', a.memfdCreate(name, MFD.CLOEXEC | (b.hugetlb ? MFD.HUGETLB : 0)));
      try {
        check('ftruncate(memfd)', a.ftruncate(fd, size));
        return { memory: mapped('mmap(memfd)', a.mmap(size, rw, MAP.SHARED, fd, 0)), memfd: fd };
      } catch (e) {
        a.close(fd);
        throw e;
      }
    }
  }
}

/**
 * Maps host memory of kind `b` for a slot of `size` bytes at `gpa` whose HVA
 * meets `p`: (hva - gpa) mod p.modulo = p.offset. It maps `size + modulo`
 * bytes (a whole number of huge pages for hugetlb) and starts the slot at the
 * `base` inside them that gives the wanted HVA. Around the slot, the mapping
 * is MADV_NOHUGEPAGE, so the slot's own VMA is exactly its HVA range and no
 * transparent huge page reaches past it (the host model's rule).
 */
export function placeBacking(
  a: Addon,
  b: HostBacking,
  size: number,
  gpa: bigint,
  p: Placement,
  name: string,
): { memory: ArrayBuffer; memfd: number; base: number } {
  const huge = b.kind === 'hugetlb' ? (b.pageSize === '1G' ? 1 << 30 : 2 << 20) : PAGE_SIZE;
  const total = Math.ceil((size + Number(p.modulo)) / huge) * huge;
  const got = allocBacking(a, b, total, name);
  const hva = a.addressOf(got.memory);
  const m = p.modulo;
  const base = Number((((gpa + p.offset - hva) % m) + m) % m);
  // The memory around the slot is PROT_NONE: a mapping of its own, so the slot's VMA is the slot,
  // as for an unplaced slot (a VMA split notifies the 2 MiB around it only inside its VMA), and no
  // transparent huge page of the slot can reach beyond it. hugetlbfs VMAs split only at huge-page
  // boundaries, which the placement's offset need not be.
  if (b.kind !== 'hugetlb') {
    if (base > 0) check('mprotect', a.mprotect(got.memory, 0, base, PROT.NONE));
    if (base + size < total) check('mprotect', a.mprotect(got.memory, base + size, total - base - size, PROT.NONE));
  }
  return { ...got, base };
}

/** fallocate(PUNCH_HOLE|KEEP_SIZE) on a memfd-backed slot's file. */
export function punchHole(a: Addon, fd: number, offset: number, len: number): void {
  check('fallocate(PUNCH_HOLE)', a.fallocate(fd, FALLOC.PUNCH_HOLE | FALLOC.KEEP_SIZE, offset, len));
}

// One type per file descriptor: Kvm (the device), Vm, Vcpu. Every method is a
// thin, total wrapper: it returns a value or throws a KvmError naming the call.
import { addon, check, HostError, KvmError, NotApplicable } from './sys.js';
import { decodeExit, type Exit } from './exits.js';
import { decodeRegs, decodeSregs, encodeRegs, encodeSregs, type Regs, type Sregs } from './regs.js';
import { hostFs } from './hostfs.js';
import { StatsReader } from './stats.js';
import { VcpuThread } from './thread.js';
import {
  CAP, EXIT, FALLOC, IOCTL, KVM_DIRTY_GFN_F_DIRTY, KVM_DIRTY_GFN_F_RESET, KVM_DIRTY_LOG_PAGE_OFFSET,
  MADV, MAP, MEM, MFD, O_RDWR, PROT, RUN, SIZEOF,
} from '../uapi/uapi.js';

export const PAGE_SIZE = 4096;

/** The part of the lab's remote addon a vCPU needs to run there. */
interface RemoteKvm {
  remote: true;
  gettid(): number;
  remoteRun(fd: number, run: bigint, consolePort: number, maxExits: number, timeoutMs: number): {
    ret: number;
    exits: number;
    console: Uint8Array;
    ns: number;
    timedOut: boolean;
  };
}

/**
 * When the event loop last had a turn, as far as vCPU runs know. A run that
 * ends while its caller waits natively resolves without the event loop, so
 * a caller that loops on runs (a vCPU exiting to the host thousands of
 * times) would starve timers, I/O and Ctrl-C; run() yields once it has been
 * longer than TURN_MS.
 */
let lastTurn = 0;
const TURN_MS = 4;
const turn = (): Promise<void> => new Promise((resolve) => setImmediate(resolve));

/** The remote addon when KVM calls go to the lab, else undefined. */
function remote(): RemoteKvm | undefined {
  const a = addon() as Partial<RemoteKvm>;
  return a.remote === true && typeof a.remoteRun === 'function' ? (a as RemoteKvm) : undefined;
}

export function defaultDevice(): string {
  return process.env.KVMHARNESS_DEVICE || '/dev/kvm';
}

export interface CpuidEntry {
  function: number;
  index: number;
  flags: number;
  eax: number;
  ebx: number;
  ecx: number;
  edx: number;
}

function cpuidBuffer(entries: readonly CpuidEntry[], capacity = entries.length): Uint8Array {
  const b = new Uint8Array(SIZEOF.kvm_cpuid2 + capacity * SIZEOF.kvm_cpuid_entry2);
  const dv = new DataView(b.buffer);
  dv.setUint32(0, capacity, true);
  entries.forEach((e, i) => {
    const o = SIZEOF.kvm_cpuid2 + i * SIZEOF.kvm_cpuid_entry2;
    [e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx].forEach((v, j) => dv.setUint32(o + 4 * j, v >>> 0, true));
  });
  return b;
}

function decodeCpuid(b: Uint8Array): CpuidEntry[] {
  const dv = new DataView(b.buffer, b.byteOffset, b.byteLength);
  const n = dv.getUint32(0, true);
  return Array.from({ length: n }, (_, i) => {
    const o = SIZEOF.kvm_cpuid2 + i * SIZEOF.kvm_cpuid_entry2;
    const u = (j: number) => dv.getUint32(o + 4 * j, true);
    return { function: u(0), index: u(1), flags: u(2), eax: u(3), ebx: u(4), ecx: u(5), edx: u(6) };
  });
}

export class Kvm {
  private constructor(
    readonly fd: number,
    readonly path: string,
  ) {}

  /** Opens the KVM device; a HostError says what is missing and how to fix it. */
  static open(path = defaultDevice()): Kvm {
    const r = addon().open(path, O_RDWR);
    if (r < 0) {
      const e = -r;
      if (e === 2) throw new HostError(`${path} does not exist: this host has no KVM (load kvm_intel/kvm_amd, or point --device / KVMHARNESS_DEVICE at the device)`);
      if (e === 13 || e === 1) throw new HostError(`${path}: permission denied (run as root, or add your user to the group that owns ${path})`);
      throw new HostError(`cannot open ${path}: ${new KvmError('open', e).message}`);
    }
    const kvm = new Kvm(r, path);
    let version: number;
    try {
      version = kvm.apiVersion();
    } catch (err) {
      kvm.close();
      throw new HostError(`${path} is not a KVM device (${(err as Error).message})`);
    }
    if (version !== 12) {
      kvm.close();
      throw new HostError(`${path}: KVM API version ${version}, expected 12`);
    }
    return kvm;
  }

  apiVersion(): number {
    return check('KVM_GET_API_VERSION', addon().ioctl(this.fd, IOCTL.KVM_GET_API_VERSION));
  }
  checkExtension(cap: number): number {
    return check('KVM_CHECK_EXTENSION', addon().ioctl(this.fd, IOCTL.KVM_CHECK_EXTENSION, cap));
  }
  private mmapSize = 0;
  /** Size of a vCPU mapping (asked once; it does not change). */
  vcpuMmapSize(): number {
    return (this.mmapSize ||= check('KVM_GET_VCPU_MMAP_SIZE', addon().ioctl(this.fd, IOCTL.KVM_GET_VCPU_MMAP_SIZE)));
  }
  supportedCpuid(): CpuidEntry[] {
    for (let cap = 64; ; cap *= 2) {
      const b = cpuidBuffer([], cap);
      const r = addon().ioctlBuf(this.fd, IOCTL.KVM_GET_SUPPORTED_CPUID, b);
      if (r === -7 /* E2BIG */ && cap < 4096) continue;
      check('KVM_GET_SUPPORTED_CPUID', r);
      return decodeCpuid(b);
    }
  }
  createVm(type = 0): Vm {
    // KVM_CREATE_VM fails with EINTR when a signal arrives while it registers
    // its MMU notifier (mm_take_all_locks); try again, as QEMU does.
    let r = addon().ioctl(this.fd, IOCTL.KVM_CREATE_VM, type);
    for (let i = 0; r === -4 /* EINTR */ && i < 100; i++) r = addon().ioctl(this.fd, IOCTL.KVM_CREATE_VM, type);
    const fd = check('KVM_CREATE_VM', r);
    return new Vm(this, fd);
  }
  close(): void {
    addon().close(this.fd);
  }
}

export type Backing =
  | { kind: 'anon'; thp?: boolean }
  | { kind: 'shared' }
  | { kind: 'memfd'; hugetlb?: boolean }
  | { kind: 'hugetlb'; pageSize: '2M' | '1G' };

export interface MemslotSpec {
  slot: number;
  gpa: bigint;
  size: number;
  flags?: number;
  backing?: Backing;
  /** Address space (x86: 1 is SMM). */
  asId?: number;
  /** guest_memfd to bind (KVM_SET_USER_MEMORY_REGION2 with KVM_MEM_GUEST_MEMFD). */
  guestMemfd?: { fd: number; offset: bigint };
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
    readonly slot: number,
    readonly asId: number,
    readonly gpa: bigint,
    readonly size: number,
    public flags: number,
    readonly memory: ArrayBuffer,
    readonly hva: bigint,
    /** memfd backing this slot, or -1. */
    readonly memfd: number,
    readonly backing: Backing,
  ) {}
  get bytes(): Uint8Array {
    return new Uint8Array(this.memory);
  }
  get npages(): number {
    return this.size / PAGE_SIZE;
  }
  contains(gpa: bigint, len = 1): boolean {
    return gpa >= this.gpa && gpa + BigInt(len) <= this.gpa + BigInt(this.size);
  }
  private range(call: string, offset: number, len: number): void {
    if (offset < 0 || len <= 0 || offset + len > this.size || offset % PAGE_SIZE) {
      throw new RangeError(`${call}: range +0x${offset.toString(16)}/0x${len.toString(16)} is not page-aligned inside memslot ${this.slot} (0x${this.size.toString(16)} bytes)`);
    }
  }
  /** madvise() on part of the backing (MADV.DONTNEED, HUGEPAGE, NOHUGEPAGE, ...). */
  madvise(offset: number, len: number, advice: number): void {
    this.range('madvise', offset, len);
    check('madvise', addon().madvise(this.memory, offset, len, advice), `memslot ${this.slot}`);
  }
  /** mprotect() on part of the backing (PROT bits). */
  mprotect(offset: number, len: number, prot: number): void {
    this.range('mprotect', offset, len);
    check('mprotect', addon().mprotect(this.memory, offset, len, prot), `memslot ${this.slot}`);
    const state: PageState | undefined = !(prot & PROT.READ) ? 'prot-none' : !(prot & PROT.WRITE) ? 'prot-read' : undefined;
    this.setStates(offset, len, state);
  }
  /** munmap() of part of the backing; remap() puts memory back. Needs the local addon. */
  munmap(offset: number, len: number): void {
    this.range('munmap', offset, len);
    const a = addon();
    if (!a.unmapRange) throw new NotApplicable('munmap of part of a memslot needs the local addon (not the lab\'s remote one)');
    check('munmap', a.unmapRange(this.memory, offset, len), `memslot ${this.slot}`);
    this.setStates(offset, len, 'unmapped');
  }
  /**
   * Maps fresh memory of the slot's backing kind over part of it (MAP_FIXED):
   * anonymous and hugetlb memory comes back zeroed, a memfd's pages with the
   * file's contents, shared anonymous memory as a new zeroed object.
   */
  remap(offset: number, len: number): void {
    this.range('remap', offset, len);
    const a = addon();
    if (!a.remapRange) throw new NotApplicable('remapping part of a memslot needs the local addon (not the lab\'s remote one)');
    const b = this.backing;
    const rw = PROT.READ | PROT.WRITE;
    const flags = b.kind === 'anon' ? MAP.PRIVATE | MAP.ANONYMOUS | MAP.NORESERVE
      : b.kind === 'shared' ? MAP.SHARED | MAP.ANONYMOUS
      : b.kind === 'memfd' ? MAP.SHARED
      : MAP.PRIVATE | MAP.ANONYMOUS | MAP.HUGETLB | (b.pageSize === '1G' ? MAP.HUGE_1GB : MAP.HUGE_2MB);
    check('mmap(MAP_FIXED)', a.remapRange(this.memory, offset, len, rw, flags, b.kind === 'memfd' ? this.memfd : -1, b.kind === 'memfd' ? offset : 0), `memslot ${this.slot}`);
    if (b.kind === 'anon' && b.thp !== undefined) check('madvise', a.madvise(this.memory, offset, len, b.thp ? MADV.HUGEPAGE : MADV.NOHUGEPAGE));
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
    const smaps = hostFs().read('/proc/self/smaps');
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
  /** Why this process cannot read (or write) [offset, offset+len) of the backing now, or undefined. */
  untouchable(offset: number, len: number, write: boolean): PageState | undefined {
    if (this.pageStates.size === 0) return undefined;
    for (let p = Math.floor(offset / PAGE_SIZE); p * PAGE_SIZE < offset + len; p++) {
      const st = this.pageStates.get(p);
      if (st === 'unmapped' || st === 'prot-none' || (st === 'prot-read' && write)) return st;
    }
    return undefined;
  }
  /** fallocate(PUNCH_HOLE) on a memfd-backed slot's file. */
  punchHole(offset: number, len: number): void {
    this.range('fallocate', offset, len);
    if (this.memfd < 0) throw new Error(`memslot ${this.slot} is not backed by a memfd`);
    punchHole(this.memfd, offset, len);
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
    if (why) throw new RangeError(`GPA range 0x${gpa.toString(16)}+0x${len.toString(16)}: the host memory behind it is ${why}`);
    return new Uint8Array(s.memory, Number(gpa - s.gpa), len);
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

export interface DirtyGfn {
  slot: number;
  asId: number;
  offset: bigint;
}

export class Vm {
  readonly slots = new Map<string, Memslot>();
  readonly vcpus: Vcpu[] = [];
  readonly mem = new GuestMemory(() => this.slots.values());
  private statsReader: StatsReader | undefined;
  private statsFd = -1;
  private readonly fds: number[] = [];
  private readonly detached: Memslot[] = [];
  dirtyRingBytes = 0;
  private closed = false;

  constructor(
    readonly kvm: Kvm,
    readonly fd: number,
  ) {}

  checkExtension(cap: number): number {
    return check('KVM_CHECK_EXTENSION', addon().ioctl(this.fd, IOCTL.KVM_CHECK_EXTENSION, cap));
  }

  enableCap(cap: number, args: readonly bigint[] = [], flags = 0, name = 'KVM_ENABLE_CAP'): void {
    const b = new Uint8Array(SIZEOF.kvm_enable_cap);
    const dv = new DataView(b.buffer);
    dv.setUint32(0, cap, true);
    dv.setUint32(4, flags, true);
    args.forEach((a, i) => dv.setBigUint64(8 + 8 * i, a, true));
    check(name, addon().ioctlBuf(this.fd, IOCTL.KVM_ENABLE_CAP, b), `cap ${cap}`);
  }

  /** Manual dirty-log protection: GET_DIRTY_LOG stops write-protecting; CLEAR_DIRTY_LOG does it. */
  enableManualDirtyLogProtect(initiallySet = false): void {
    this.enableCap(CAP.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, [initiallySet ? 3n : 1n], 0, 'KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2)');
  }

  /** Enables the per-vCPU dirty ring (before any vCPU exists); bytes = entries * 16. */
  enableDirtyRing(bytes: number): void {
    this.enableCap(CAP.KVM_CAP_DIRTY_LOG_RING, [BigInt(bytes)], 0, 'KVM_ENABLE_CAP(DIRTY_LOG_RING)');
    this.dirtyRingBytes = bytes;
  }

  resetDirtyRings(): number {
    return check('KVM_RESET_DIRTY_RINGS', addon().ioctl(this.fd, IOCTL.KVM_RESET_DIRTY_RINGS));
  }

  setTssAddr(addr: number): void {
    check('KVM_SET_TSS_ADDR', addon().ioctl(this.fd, IOCTL.KVM_SET_TSS_ADDR, addr));
  }

  setIdentityMapAddr(addr: bigint): void {
    const b = new BigUint64Array([addr]);
    check('KVM_SET_IDENTITY_MAP_ADDR', addon().ioctlBuf(this.fd, IOCTL.KVM_SET_IDENTITY_MAP_ADDR, b));
  }

  /** Raw KVM_SET_USER_MEMORY_REGION; size 0 deletes the slot. */
  setUserMemoryRegion(slot: number, flags: number, gpa: bigint, size: bigint, hva: bigint, asId = 0): void {
    const b = memoryRegion(SIZEOF.kvm_userspace_memory_region, slot, flags, gpa, size, hva, asId);
    check('KVM_SET_USER_MEMORY_REGION', addon().ioctlBuf(this.fd, IOCTL.KVM_SET_USER_MEMORY_REGION, b), `slot ${slot}`);
  }

  /** Raw KVM_SET_USER_MEMORY_REGION2 (guest_memfd binding). */
  setUserMemoryRegion2(slot: number, flags: number, gpa: bigint, size: bigint, hva: bigint, gmemFd: number, gmemOffset: bigint, asId = 0): void {
    const b = memoryRegion(SIZEOF.kvm_userspace_memory_region2, slot, flags, gpa, size, hva, asId);
    const dv = new DataView(b.buffer);
    dv.setBigUint64(32, gmemOffset, true);
    dv.setUint32(40, gmemFd, true);
    check('KVM_SET_USER_MEMORY_REGION2', addon().ioctlBuf(this.fd, IOCTL.KVM_SET_USER_MEMORY_REGION2, b), `slot ${slot}`);
  }

  /** Allocates host memory for a memslot and registers it. */
  addMemslot(spec: MemslotSpec): Memslot {
    const { slot, gpa, size, flags = 0, backing = { kind: 'anon' }, asId = 0 } = spec;
    if (size <= 0 || size % PAGE_SIZE) throw new RangeError(`memslot ${slot}: size 0x${size.toString(16)} is not a positive multiple of 4 KiB`);
    if (gpa % BigInt(PAGE_SIZE)) throw new RangeError(`memslot ${slot}: gpa 0x${gpa.toString(16)} is not 4 KiB aligned`);
    const { memory, memfd } = allocBacking(backing, size, `kvmharness-slot${slot}`);
    const hva = addon().addressOf(memory);
    const s = new Memslot(slot, asId, gpa, size, flags, memory, hva, memfd, backing);
    try {
      if (spec.guestMemfd) {
        this.setUserMemoryRegion2(slot, flags | MEM.KVM_MEM_GUEST_MEMFD, gpa, BigInt(size), hva, spec.guestMemfd.fd, spec.guestMemfd.offset, asId);
      } else {
        this.setUserMemoryRegion(slot, flags, gpa, BigInt(size), hva, asId);
      }
    } catch (e) {
      freeBacking(s);
      throw e;
    }
    this.slots.set(`${asId}:${slot}`, s);
    return s;
  }

  memslot(slot: number, asId = 0): Memslot {
    const s = this.slots.get(`${asId}:${slot}`);
    if (!s) throw new RangeError(`no memslot ${slot} in address space ${asId}`);
    return s;
  }

  setMemslotFlags(slot: number, flags: number, asId = 0): void {
    const s = this.memslot(slot, asId);
    this.setUserMemoryRegion(slot, flags, s.gpa, BigInt(s.size), s.hva, asId);
    s.flags = flags;
  }

  /** Moves a memslot to a new GPA (the host memory stays). */
  moveMemslot(slot: number, gpa: bigint, asId = 0): Memslot {
    const s = this.memslot(slot, asId);
    this.setUserMemoryRegion(slot, s.flags, gpa, BigInt(s.size), s.hva, asId);
    const moved = new Memslot(s.slot, asId, gpa, s.size, s.flags, s.memory, s.hva, s.memfd, s.backing);
    moved.pageStates = s.pageStates;
    this.slots.set(`${asId}:${slot}`, moved);
    return moved;
  }

  deleteMemslot(slot: number, asId = 0): void {
    const s = this.memslot(slot, asId);
    this.setUserMemoryRegion(slot, 0, s.gpa, 0n, 0n, asId);
    this.slots.delete(`${asId}:${slot}`);
    freeBacking(s);
  }

  /**
   * Deletes a memslot from KVM but keeps its host memory mapped until the VM
   * is closed, so that what the guest wrote there before the deletion can
   * still be read (the returned Memslot; it is no longer in `slots`).
   */
  detachMemslot(slot: number, asId = 0): Memslot {
    const s = this.memslot(slot, asId);
    this.setUserMemoryRegion(slot, 0, s.gpa, 0n, 0n, asId);
    this.slots.delete(`${asId}:${slot}`);
    this.detached.push(s);
    return s;
  }

  /** KVM_GET_DIRTY_LOG: one bit per page of the slot. */
  getDirtyLog(slot: number, asId = 0): Uint8Array {
    const s = this.memslot(slot, asId);
    const bitmap = new Uint8Array(Math.ceil(s.npages / 64) * 8);
    const b = new Uint8Array(SIZEOF.kvm_dirty_log);
    const dv = new DataView(b.buffer);
    dv.setUint32(0, (asId << 16) | slot, true);
    dv.setBigUint64(8, addon().addressOf(bitmap), true);
    check('KVM_GET_DIRTY_LOG', addon().ioctlBuf(this.fd, IOCTL.KVM_GET_DIRTY_LOG, b), `slot ${slot}`);
    return bitmap;
  }

  /** KVM_CLEAR_DIRTY_LOG for pages [first, first+num) of the slot; bitmap bit i = page first+i. */
  clearDirtyLog(slot: number, first: number, num: number, bitmap?: Uint8Array, asId = 0): void {
    const bits = bitmap ?? new Uint8Array(Math.ceil(num / 64) * 8).fill(0xff);
    const b = new Uint8Array(SIZEOF.kvm_clear_dirty_log);
    const dv = new DataView(b.buffer);
    dv.setUint32(0, (asId << 16) | slot, true);
    dv.setUint32(4, num, true);
    dv.setBigUint64(8, BigInt(first), true);
    dv.setBigUint64(16, addon().addressOf(bits), true);
    check('KVM_CLEAR_DIRTY_LOG', addon().ioctlBuf(this.fd, IOCTL.KVM_CLEAR_DIRTY_LOG, b), `slot ${slot}`);
  }

  createGuestMemfd(size: bigint, flags = 0n): number {
    const b = new Uint8Array(SIZEOF.kvm_create_guest_memfd);
    const dv = new DataView(b.buffer);
    dv.setBigUint64(0, size, true);
    dv.setBigUint64(8, flags, true);
    const fd = check('KVM_CREATE_GUEST_MEMFD', addon().ioctlBuf(this.fd, IOCTL.KVM_CREATE_GUEST_MEMFD, b));
    this.fds.push(fd);
    return fd;
  }

  setMemoryAttributes(gpa: bigint, size: bigint, attributes: bigint): void {
    const b = new Uint8Array(SIZEOF.kvm_memory_attributes);
    const dv = new DataView(b.buffer);
    dv.setBigUint64(0, gpa, true);
    dv.setBigUint64(8, size, true);
    dv.setBigUint64(16, attributes, true);
    check('KVM_SET_MEMORY_ATTRIBUTES', addon().ioctlBuf(this.fd, IOCTL.KVM_SET_MEMORY_ATTRIBUTES, b));
  }

  stats(): StatsReader {
    if (!this.statsReader) {
      this.statsFd = check('KVM_GET_STATS_FD', addon().ioctl(this.fd, IOCTL.KVM_GET_STATS_FD));
      this.statsReader = statsReaderFor(this.statsFd);
    }
    return this.statsReader;
  }

  createVcpu(id = this.vcpus.length): Vcpu {
    const fd = check('KVM_CREATE_VCPU', addon().ioctl(this.fd, IOCTL.KVM_CREATE_VCPU, id));
    let run: ArrayBuffer;
    let size: number;
    try {
      size = this.kvm.vcpuMmapSize();
      const m = addon().mmap(size, PROT.READ | PROT.WRITE, MAP.SHARED, fd, 0);
      run = mmapResult('mmap(kvm_run)', m);
    } catch (e) {
      addon().close(fd);
      throw e;
    }
    const v = new Vcpu(this, id, fd, run);
    this.vcpus.push(v);
    return v;
  }

  /** Releases everything the VM holds: vCPUs, memslot memory, stats and other fds. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    for (const v of this.vcpus) v.close();
    if (this.statsFd >= 0) addon().close(this.statsFd);
    for (const fd of this.fds) addon().close(fd);
    addon().close(this.fd);
    for (const s of this.slots.values()) freeBacking(s);
    for (const s of this.detached) freeBacking(s);
    this.slots.clear();
    this.detached.length = 0;
  }
}

// Scratch buffers for the fixed-size structures of synchronous ioctls: the
// call copies in or out before it returns and decoding builds new objects,
// so one buffer per structure serves every VM and vCPU. Allocating each time
// cost an off-heap ArrayBuffer per call.
const scratch = {
  region: new Uint8Array(SIZEOF.kvm_userspace_memory_region2),
  regs: new Uint8Array(SIZEOF.kvm_regs),
  sregs: new Uint8Array(SIZEOF.kvm_sregs),
};

/** kvm_userspace_memory_region, or the same leading fields of region2 (zeroed beyond them). */
function memoryRegion(size: number, slot: number, flags: number, gpa: bigint, bytes: bigint, hva: bigint, asId: number): Uint8Array {
  const b = scratch.region.subarray(0, size).fill(0);
  const dv = new DataView(b.buffer, b.byteOffset, size);
  dv.setUint32(0, (asId << 16) | slot, true);
  dv.setUint32(4, flags, true);
  dv.setBigUint64(8, gpa, true);
  dv.setBigUint64(16, bytes, true);
  dv.setBigUint64(24, hva, true);
  return b;
}

function mmapResult(call: string, m: ArrayBuffer | number): ArrayBuffer {
  if (typeof m === 'number') throw new KvmError(call, -m);
  return m;
}

function statsReaderFor(fd: number): StatsReader {
  return new StatsReader((buf, pos) => {
    const n = check('pread(stats fd)', addon().pread(fd, buf, pos));
    if (n !== buf.byteLength) throw new KvmError('pread(stats fd)', 5, `short read ${n} of ${buf.byteLength}`);
  });
}

export function allocBacking(b: Backing, size: number, name: string): { memory: ArrayBuffer; memfd: number } {
  const a = addon();
  const rw = PROT.READ | PROT.WRITE;
  switch (b.kind) {
    case 'anon': {
      const memory = mmapResult('mmap(anonymous)', a.mmap(size, rw, MAP.PRIVATE | MAP.ANONYMOUS | MAP.NORESERVE, -1, 0));
      if (b.thp !== undefined) check('madvise', a.madvise(memory, 0, size, b.thp ? MADV.HUGEPAGE : MADV.NOHUGEPAGE));
      return { memory, memfd: -1 };
    }
    case 'shared':
      return { memory: mmapResult('mmap(shared)', a.mmap(size, rw, MAP.SHARED | MAP.ANONYMOUS, -1, 0)), memfd: -1 };
    case 'hugetlb': {
      const flag = b.pageSize === '1G' ? MAP.HUGE_1GB : MAP.HUGE_2MB;
      return { memory: mmapResult(`mmap(hugetlb ${b.pageSize})`, a.mmap(size, rw, MAP.PRIVATE | MAP.ANONYMOUS | MAP.HUGETLB | flag, -1, 0)), memfd: -1 };
    }
    case 'memfd': {
      const fd = check('memfd_create', a.memfdCreate(name, MFD.CLOEXEC | (b.hugetlb ? MFD.HUGETLB : 0)));
      try {
        check('ftruncate(memfd)', a.ftruncate(fd, size));
        return { memory: mmapResult('mmap(memfd)', a.mmap(size, rw, MAP.SHARED, fd, 0)), memfd: fd };
      } catch (e) {
        a.close(fd);
        throw e;
      }
    }
  }
}

function freeBacking(s: Memslot): void {
  addon().munmap(s.memory);
  if (s.memfd >= 0) addon().close(s.memfd);
}

/** fallocate(PUNCH_HOLE|KEEP_SIZE) on a memfd-backed slot's file. */
export function punchHole(fd: number, offset: number, len: number): void {
  check('fallocate(PUNCH_HOLE)', addon().fallocate(fd, FALLOC.PUNCH_HOLE | FALLOC.KEEP_SIZE, offset, len));
}

export interface RunOptions {
  /** Kick the vCPU after this long and report a timeout (default 10 s). */
  timeoutMs?: number;
  /** Collect `out` bytes on this port without returning (0 = none). */
  consolePort?: number;
  /** With consolePort: return after this many exits at most. */
  maxExits?: number;
}

export interface RunResult {
  exit: Exit;
  timedOut: boolean;
  /** KVM_RUN returns inside this run (console exits included). */
  exits: number;
  console: Uint8Array;
  /** Time the vCPU thread spent in its loop. */
  ns: number;
}

export interface Translation {
  gva: bigint;
  gpa: bigint;
  valid: boolean;
  writeable: boolean;
  usermode: boolean;
}

export class Vcpu {
  /** The main thread's own view of kvm_run (exit decoding, immediate_exit). */
  readonly runView: DataView;
  private readonly runAddress: bigint;
  private thread: VcpuThread | undefined;
  private statsReader: StatsReader | undefined;
  private statsFd = -1;
  private ring: { map: ArrayBuffer; view: DataView; entries: number; next: number } | undefined;
  private running = false;
  private closed = false;

  constructor(
    readonly vm: Vm,
    readonly id: number,
    readonly fd: number,
    private readonly runMap: ArrayBuffer,
  ) {
    this.runView = new DataView(runMap);
    this.runAddress = addon().addressOf(runMap);
  }

  getRegs(): Regs {
    check('KVM_GET_REGS', addon().ioctlBuf(this.fd, IOCTL.KVM_GET_REGS, scratch.regs));
    return decodeRegs(scratch.regs);
  }
  setRegs(r: Regs): void {
    check('KVM_SET_REGS', addon().ioctlBuf(this.fd, IOCTL.KVM_SET_REGS, encodeRegs(r, scratch.regs)));
  }
  getSregs(): Sregs {
    check('KVM_GET_SREGS', addon().ioctlBuf(this.fd, IOCTL.KVM_GET_SREGS, scratch.sregs));
    return decodeSregs(scratch.sregs);
  }
  setSregs(s: Sregs): void {
    check('KVM_SET_SREGS', addon().ioctlBuf(this.fd, IOCTL.KVM_SET_SREGS, encodeSregs(s, scratch.sregs)));
  }
  setCpuid(entries: readonly CpuidEntry[]): void {
    check('KVM_SET_CPUID2', addon().ioctlBuf(this.fd, IOCTL.KVM_SET_CPUID2, cpuidBuffer(entries)));
  }
  getCpuid(): CpuidEntry[] {
    const b = cpuidBuffer([], 256);
    check('KVM_GET_CPUID2', addon().ioctlBuf(this.fd, IOCTL.KVM_GET_CPUID2, b));
    return decodeCpuid(b);
  }
  getMsrs(indices: readonly number[]): Map<number, bigint> {
    const b = msrBuffer(indices.map((i) => [i, 0n]));
    const n = check('KVM_GET_MSRS', addon().ioctlBuf(this.fd, IOCTL.KVM_GET_MSRS, b));
    if (n !== indices.length) throw new KvmError('KVM_GET_MSRS', 22, `MSR 0x${indices[n]!.toString(16)} not readable`);
    const dv = new DataView(b.buffer);
    return new Map(indices.map((idx, i) => [idx, dv.getBigUint64(SIZEOF.kvm_msrs + i * SIZEOF.kvm_msr_entry + 8, true)]));
  }
  setMsrs(values: ReadonlyMap<number, bigint>): void {
    const entries = [...values];
    const n = check('KVM_SET_MSRS', addon().ioctlBuf(this.fd, IOCTL.KVM_SET_MSRS, msrBuffer(entries)));
    if (n !== entries.length) throw new KvmError('KVM_SET_MSRS', 22, `MSR 0x${entries[n]![0].toString(16)} not writable`);
  }
  translate(gva: bigint): Translation {
    const b = new Uint8Array(SIZEOF.kvm_translation);
    const dv = new DataView(b.buffer);
    dv.setBigUint64(0, gva, true);
    check('KVM_TRANSLATE', addon().ioctlBuf(this.fd, IOCTL.KVM_TRANSLATE, b));
    return { gva, gpa: dv.getBigUint64(8, true), valid: b[16] !== 0, writeable: b[17] !== 0, usermode: b[18] !== 0 };
  }
  /** KVM_PRE_FAULT_MEMORY; returns the bytes left unprocessed. */
  preFault(gpa: bigint, size: bigint): bigint {
    const b = new Uint8Array(SIZEOF.kvm_pre_fault_memory);
    const dv = new DataView(b.buffer);
    dv.setBigUint64(0, gpa, true);
    dv.setBigUint64(8, size, true);
    check('KVM_PRE_FAULT_MEMORY', addon().ioctlBuf(this.fd, IOCTL.KVM_PRE_FAULT_MEMORY, b));
    return dv.getBigUint64(8, true);
  }
  stats(): StatsReader {
    if (!this.statsReader) {
      this.statsFd = check('KVM_GET_STATS_FD(vcpu)', addon().ioctl(this.fd, IOCTL.KVM_GET_STATS_FD));
      this.statsReader = statsReaderFor(this.statsFd);
    }
    return this.statsReader;
  }

  /** The kernel thread id that runs this vCPU (acquiring its thread now if needed), e.g. for trace filters. */
  async tid(): Promise<number> {
    const r = remote();
    if (r) return r.gettid();
    this.thread ??= VcpuThread.acquire();
    return this.thread.tid;
  }

  /** Runs the vCPU on its own thread until an exit that needs the caller, or the time limit. */
  async run(opts: RunOptions = {}): Promise<RunResult> {
    if (this.closed) throw new Error(`vCPU ${this.id} is closed`);
    if (this.running) throw new Error(`vCPU ${this.id} is already running`);
    const r = remote();
    if (r) return this.runRemote(r, opts);
    this.running = true;
    try {
      const thread = (this.thread ??= VcpuThread.acquire());
      const limitMs = opts.timeoutMs ?? 10_000;
      const start = performance.now();
      let timedOut = false;
      let timer: NodeJS.Timeout | undefined;
      const seq = thread.start({ fd: this.fd, run: this.runAddress, consolePort: opts.consolePort ?? 0, maxExits: opts.maxExits ?? 1 << 30 });
      let reply;
      try {
        if (!thread.poll(seq, Math.floor(limitMs * 1000))) {
          // The time limit is armed only when the run outlasts the polling
          // (about 1 ms): a timer per run cost ~15 µs, more than the short
          // runs it would never fire on.
          timer = setTimeout(() => {
            timedOut = true;
            this.kickThread(thread);
          }, Math.max(0, limitMs - (performance.now() - start)));
          await thread.wait(seq);
          lastTurn = performance.now();
        }
      } finally {
        if (timer) clearTimeout(timer);
        this.runView.setUint8(RUN.immediate_exit, 0);
        reply = thread.finish();
      }
      // KVM_RUN fails with EFAULT and fills kvm_run for a memory-fault exit
      // (KVM_CAP_MEMORY_FAULT_INFO); that is an exit to report, not an error.
      const memoryFault = reply.ret === -14 && this.runView.getUint32(RUN.exit_reason, true) === EXIT.KVM_EXIT_MEMORY_FAULT;
      if (reply.ret < 0 && reply.ret !== -4 /* EINTR */ && !memoryFault) throw new KvmError('KVM_RUN', -reply.ret);
      const exit: Exit = reply.ret === -4 ? { reason: 'intr' } : decodeExit(this.runView);
      if (performance.now() - lastTurn > TURN_MS) {
        await turn();
        lastTurn = performance.now();
      }
      return { exit, timedOut: timedOut && exit.reason === 'intr', exits: reply.exits, console: reply.console, ns: reply.ns };
    } finally {
      this.running = false;
    }
  }

  /**
   * In the lab the agent runs KVM_RUN in its own process with the time limit
   * applied there; the call is synchronous, and kvm_run comes back with it.
   */
  private runRemote(r: RemoteKvm, opts: RunOptions): RunResult {
    const res = r.remoteRun(this.fd, this.runAddress, opts.consolePort ?? 0, opts.maxExits ?? 1 << 30, opts.timeoutMs ?? 10_000);
    this.runView.setUint8(RUN.immediate_exit, 0);
    const memoryFault = res.ret === -14 && this.runView.getUint32(RUN.exit_reason, true) === EXIT.KVM_EXIT_MEMORY_FAULT;
    if (res.ret < 0 && res.ret !== -4 && !memoryFault) throw new KvmError('KVM_RUN', -res.ret);
    const exit: Exit = res.ret === -4 ? { reason: 'intr' } : decodeExit(this.runView);
    return { exit, timedOut: res.timedOut, exits: res.exits, console: res.console, ns: res.ns };
  }

  /** Forces a running vCPU out of KVM_RUN (it returns with an intr exit). */
  kick(): void {
    if (this.thread) this.kickThread(this.thread);
  }
  private kickThread(t: VcpuThread): void {
    this.runView.setUint8(RUN.immediate_exit, 1);
    addon().kick(t.tid);
  }

  /** Maps the dirty ring (after Vm.enableDirtyRing) and returns the GFNs it holds, resetting them. */
  harvestDirtyRing(): DirtyGfn[] {
    if (!this.vm.dirtyRingBytes) throw new Error('the dirty ring is not enabled on this VM');
    if (!this.ring) {
      const m = mmapResult('mmap(dirty ring)', addon().mmap(this.vm.dirtyRingBytes, PROT.READ | PROT.WRITE, MAP.SHARED, this.fd, KVM_DIRTY_LOG_PAGE_OFFSET * PAGE_SIZE));
      this.ring = { map: m, view: new DataView(m), entries: this.vm.dirtyRingBytes / SIZEOF.kvm_dirty_gfn, next: 0 };
    }
    const r = this.ring;
    const out: DirtyGfn[] = [];
    for (;;) {
      const o = (r.next % r.entries) * SIZEOF.kvm_dirty_gfn;
      const flags = r.view.getUint32(o, true);
      if (!(flags & KVM_DIRTY_GFN_F_DIRTY)) break;
      const slot = r.view.getUint32(o + 4, true);
      out.push({ slot: slot & 0xffff, asId: slot >>> 16, offset: r.view.getBigUint64(o + 8, true) });
      r.view.setUint32(o, KVM_DIRTY_GFN_F_RESET, true);
      r.next++;
    }
    return out;
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    if (this.thread) {
      // kvm_run must stay mapped until the thread has left KVM_RUN; a thread
      // that does not leave it is abandoned with its mapping (never reused).
      const t = this.thread;
      if (this.running) this.kickThread(t);
      try {
        t.waitIdle(() => this.kickThread(t));
      } catch (e) {
        addon().close(this.fd);
        throw e;
      }
      VcpuThread.release(t);
    }
    if (this.ring) addon().munmap(this.ring.map);
    addon().munmap(this.runMap);
    if (this.statsFd >= 0) addon().close(this.statsFd);
    addon().close(this.fd);
  }
}

function msrBuffer(entries: readonly (readonly [number, bigint])[]): Uint8Array {
  const b = new Uint8Array(SIZEOF.kvm_msrs + entries.length * SIZEOF.kvm_msr_entry);
  const dv = new DataView(b.buffer);
  dv.setUint32(0, entries.length, true);
  entries.forEach(([idx, v], i) => {
    const o = SIZEOF.kvm_msrs + i * SIZEOF.kvm_msr_entry;
    dv.setUint32(o, idx, true);
    dv.setBigUint64(o + 8, v, true);
  });
  return b;
}

// A VM file descriptor (KVM_CREATE_VM): memslots, dirty logging, guest_memfd,
// memory attributes, stats, and the vCPUs it creates.
import { check, errnoName, mapped, type Addon } from './sys.js';
import { statsReaderFor, type StatsReader } from './stats.js';
import { allocBacking, GuestMemory, Memslot, placeBacking, type MemslotSpec } from './memslot.js';
import { PAGE_SIZE } from '../base/units.js';
import { Vcpu } from './vcpu.js';
import type { Kvm } from './kvm.js';
import { decodeVcpuInit, type VcpuInit } from './arm64.js';
import {
  ARM64_IOCTL,
  ARM64_SIZEOF,
  CAP,
  GUEST_MEMFD_FLAG_INIT_SHARED,
  GUEST_MEMFD_FLAG_MMAP,
  IOCTL,
  MAP,
  MEM,
  PROT,
  SIZEOF,
} from '../uapi/uapi.js';
import { hex } from '../base/units.js';

/** The guest_memfd a 'guest_memfd' backing is made of: mmap-able, its pages shared from the start. */
const SHARED_GMEM = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED;

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

  /** System calls on the VM's target. */
  private readonly sys: Addon;

  constructor(
    readonly kvm: Kvm,
    readonly fd: number,
  ) {
    this.sys = kvm.target.addon;
  }

  checkExtension(cap: number): number {
    return check('KVM_CHECK_EXTENSION', this.sys.ioctl(this.fd, IOCTL.KVM_CHECK_EXTENSION, cap));
  }

  enableCap(cap: number, args: readonly bigint[] = [], flags = 0, name = 'KVM_ENABLE_CAP'): void {
    const b = new Uint8Array(SIZEOF.kvm_enable_cap);
    const dv = new DataView(b.buffer);
    dv.setUint32(0, cap, true);
    dv.setUint32(4, flags, true);
    args.forEach((a, i) => dv.setBigUint64(8 + 8 * i, a, true));
    check(name, this.sys.ioctlBuf(this.fd, IOCTL.KVM_ENABLE_CAP, b), `cap ${cap}`);
  }

  /** Manual dirty-log protection: GET_DIRTY_LOG stops write-protecting; CLEAR_DIRTY_LOG does it. */
  enableManualDirtyLogProtect(initiallySet = false): void {
    this.enableCap(
      CAP.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
      [initiallySet ? 3n : 1n],
      0,
      'KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2)',
    );
  }

  /** Enables the per-vCPU dirty ring (before any vCPU exists); bytes = entries * 16. */
  enableDirtyRing(bytes: number): void {
    this.enableCap(CAP.KVM_CAP_DIRTY_LOG_RING, [BigInt(bytes)], 0, 'KVM_ENABLE_CAP(DIRTY_LOG_RING)');
    this.dirtyRingBytes = bytes;
  }

  resetDirtyRings(): number {
    return check('KVM_RESET_DIRTY_RINGS', this.sys.ioctl(this.fd, IOCTL.KVM_RESET_DIRTY_RINGS));
  }

  setTssAddr(addr: number): void {
    check('KVM_SET_TSS_ADDR', this.sys.ioctl(this.fd, IOCTL.KVM_SET_TSS_ADDR, addr));
  }

  setIdentityMapAddr(addr: bigint): void {
    const b = new BigUint64Array([addr]);
    check('KVM_SET_IDENTITY_MAP_ADDR', this.sys.ioctlBuf(this.fd, IOCTL.KVM_SET_IDENTITY_MAP_ADDR, b));
  }

  /** Raw KVM_SET_USER_MEMORY_REGION; size 0 deletes the slot. */
  setUserMemoryRegion(slot: number, flags: number, gpa: bigint, size: bigint, hva: bigint, asId = 0): void {
    const b = memoryRegion(SIZEOF.kvm_userspace_memory_region, slot, flags, gpa, size, hva, asId);
    check(
      'KVM_SET_USER_MEMORY_REGION',
      this.sys.ioctlBuf(this.fd, IOCTL.KVM_SET_USER_MEMORY_REGION, b),
      `slot ${slot}`,
    );
  }

  /** Raw KVM_SET_USER_MEMORY_REGION2 (guest_memfd binding). */
  setUserMemoryRegion2(
    slot: number,
    flags: number,
    gpa: bigint,
    size: bigint,
    hva: bigint,
    gmemFd: number,
    gmemOffset: bigint,
    asId = 0,
  ): void {
    const b = memoryRegion(SIZEOF.kvm_userspace_memory_region2, slot, flags, gpa, size, hva, asId);
    const dv = new DataView(b.buffer);
    dv.setBigUint64(32, gmemOffset, true);
    dv.setUint32(40, gmemFd, true);
    check(
      'KVM_SET_USER_MEMORY_REGION2',
      this.sys.ioctlBuf(this.fd, IOCTL.KVM_SET_USER_MEMORY_REGION2, b),
      `slot ${slot}`,
    );
  }

  /** Allocates host memory for a memslot and registers it. */
  addMemslot(spec: MemslotSpec): Memslot {
    const { slot, gpa, size, flags = 0, backing = { kind: 'anon' }, asId = 0 } = spec;
    if (size <= 0 || size % PAGE_SIZE)
      throw new RangeError(`memslot ${slot}: size 0x${size.toString(16)} is not a positive multiple of 4 KiB`);
    if (gpa % BigInt(PAGE_SIZE))
      throw new RangeError(`memslot ${slot}: gpa 0x${gpa.toString(16)} is not 4 KiB aligned`);
    if (backing.kind === 'guest_memfd') return this.addGuestMemfdSlot(spec);
    const name = `kvmharness-slot${slot}`;
    const { memory, memfd, base } = spec.placement
      ? placeBacking(this.sys, backing, size, gpa, spec.placement, name)
      : { ...allocBacking(this.sys, backing, size, name), base: 0 };
    const hva = this.sys.addressOf(memory) + BigInt(base);
    const s = new Memslot(this.kvm.target, slot, asId, gpa, size, flags, memory, hva, memfd, backing, base);
    try {
      if (spec.guestMemfd) {
        this.setUserMemoryRegion2(
          slot,
          flags | MEM.KVM_MEM_GUEST_MEMFD,
          gpa,
          BigInt(size),
          hva,
          spec.guestMemfd.fd,
          spec.guestMemfd.offset,
          asId,
        );
      } else {
        this.setUserMemoryRegion(slot, flags, gpa, BigInt(size), hva, asId);
      }
    } catch (e) {
      s.free();
      throw e;
    }
    this.slots.set(`${asId}:${slot}`, s);
    return s;
  }

  /**
   * A slot backed by its own mmap-able, initially shared guest_memfd
   * (KVM_CREATE_GUEST_MEMFD with MMAP | INIT_SHARED, Linux 6.18): the file is
   * mapped as the slot's memory (its userspace_addr) and bound with
   * KVM_SET_USER_MEMORY_REGION2 and KVM_MEM_GUEST_MEMFD at offset 0.
   */
  private addGuestMemfdSlot(spec: MemslotSpec): Memslot {
    const { slot, gpa, size, flags = 0, asId = 0 } = spec;
    const backing = { kind: 'guest_memfd' } as const;
    const fd = this.openGuestMemfd(BigInt(size), BigInt(SHARED_GMEM));
    let memory: ArrayBuffer;
    try {
      memory = mapped('mmap(guest_memfd)', this.sys.mmap(size, PROT.READ | PROT.WRITE, MAP.SHARED, fd, 0));
    } catch (e) {
      this.sys.close(fd);
      throw e;
    }
    const hva = this.sys.addressOf(memory);
    const gflags = flags | MEM.KVM_MEM_GUEST_MEMFD;
    const s = new Memslot(this.kvm.target, slot, asId, gpa, size, gflags, memory, hva, fd, backing);
    try {
      this.setUserMemoryRegion2(slot, gflags, gpa, BigInt(size), hva, fd, 0n, asId);
    } catch (e) {
      s.free();
      throw e;
    }
    this.slots.set(`${asId}:${slot}`, s);
    return s;
  }

  /**
   * Why this VM cannot back a slot with an mmap-able, initially shared
   * guest_memfd, from its capabilities and, where they say no, what
   * KVM_CREATE_GUEST_MEMFD answers; undefined when it can.
   */
  sharedGuestMemfdUnsupported(): string | undefined {
    const cap = this.checkExtension(CAP.KVM_CAP_GUEST_MEMFD);
    const flags = cap ? this.checkExtension(CAP.KVM_CAP_GUEST_MEMFD_FLAGS) : 0;
    if (cap && (flags & SHARED_GMEM) === SHARED_GMEM) return undefined;
    const r = this.sys.ioctlBuf(this.fd, IOCTL.KVM_CREATE_GUEST_MEMFD, guestMemfdArgs(0x1000n, BigInt(SHARED_GMEM)));
    if (r >= 0) this.sys.close(r);
    const types = this.kvm.checkExtension(CAP.KVM_CAP_VM_TYPES);
    // The errno first: report tables cut long reasons.
    return (
      `KVM_CREATE_GUEST_MEMFD(MMAP|INIT_SHARED): ${r < 0 ? errnoName(-r) : 'created'}; default VM: ` +
      `KVM_CAP_GUEST_MEMFD ${cap}, KVM_CAP_GUEST_MEMFD_FLAGS ${hex(flags)}, KVM_CAP_VM_TYPES ${hex(types)} ` +
      `(shared guest_memfd: Linux 6.18)`
    );
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
    const { target, memory, hva, memfd, backing, base } = s;
    const moved = new Memslot(target, s.slot, asId, gpa, s.size, s.flags, memory, hva, memfd, backing, base);
    moved.pageStates = s.pageStates;
    this.slots.set(`${asId}:${slot}`, moved);
    return moved;
  }

  deleteMemslot(slot: number, asId = 0): void {
    const s = this.memslot(slot, asId);
    this.setUserMemoryRegion(slot, 0, s.gpa, 0n, 0n, asId);
    this.slots.delete(`${asId}:${slot}`);
    s.free();
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
    dv.setBigUint64(8, this.sys.addressOf(bitmap), true);
    check('KVM_GET_DIRTY_LOG', this.sys.ioctlBuf(this.fd, IOCTL.KVM_GET_DIRTY_LOG, b), `slot ${slot}`);
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
    dv.setBigUint64(16, this.sys.addressOf(bits), true);
    check('KVM_CLEAR_DIRTY_LOG', this.sys.ioctlBuf(this.fd, IOCTL.KVM_CLEAR_DIRTY_LOG, b), `slot ${slot}`);
  }

  /** KVM_CREATE_GUEST_MEMFD; the VM closes the fd with itself. */
  createGuestMemfd(size: bigint, flags = 0n): number {
    const fd = this.openGuestMemfd(size, flags);
    this.fds.push(fd);
    return fd;
  }

  /** KVM_CREATE_GUEST_MEMFD; the caller owns the fd. */
  private openGuestMemfd(size: bigint, flags: bigint): number {
    const b = guestMemfdArgs(size, flags);
    return check(
      'KVM_CREATE_GUEST_MEMFD',
      this.sys.ioctlBuf(this.fd, IOCTL.KVM_CREATE_GUEST_MEMFD, b),
      `flags ${hex(flags)}`,
    );
  }

  setMemoryAttributes(gpa: bigint, size: bigint, attributes: bigint): void {
    const b = new Uint8Array(SIZEOF.kvm_memory_attributes);
    const dv = new DataView(b.buffer);
    dv.setBigUint64(0, gpa, true);
    dv.setBigUint64(8, size, true);
    dv.setBigUint64(16, attributes, true);
    check('KVM_SET_MEMORY_ATTRIBUTES', this.sys.ioctlBuf(this.fd, IOCTL.KVM_SET_MEMORY_ATTRIBUTES, b));
  }

  /** arm64: KVM_ARM_PREFERRED_TARGET, the vCPU target KVM suggests for this host's CPUs. */
  armPreferredTarget(): VcpuInit {
    const b = new Uint8Array(ARM64_SIZEOF.kvm_vcpu_init);
    check('KVM_ARM_PREFERRED_TARGET', this.sys.ioctlBuf(this.fd, ARM64_IOCTL.KVM_ARM_PREFERRED_TARGET, b));
    return decodeVcpuInit(b);
  }

  stats(): StatsReader {
    if (!this.statsReader) {
      this.statsFd = check('KVM_GET_STATS_FD', this.sys.ioctl(this.fd, IOCTL.KVM_GET_STATS_FD));
      this.statsReader = statsReaderFor(this.sys, this.statsFd);
    }
    return this.statsReader;
  }

  createVcpu(id = this.vcpus.length): Vcpu {
    const fd = check('KVM_CREATE_VCPU', this.sys.ioctl(this.fd, IOCTL.KVM_CREATE_VCPU, id));
    let run: ArrayBuffer;
    let size: number;
    try {
      size = this.kvm.vcpuMmapSize();
      const m = this.sys.mmap(size, PROT.READ | PROT.WRITE, MAP.SHARED, fd, 0);
      run = mapped('mmap(kvm_run)', m);
    } catch (e) {
      this.sys.close(fd);
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
    if (this.statsFd >= 0) this.sys.close(this.statsFd);
    for (const fd of this.fds) this.sys.close(fd);
    this.sys.close(this.fd);
    for (const s of this.slots.values()) s.free();
    for (const s of this.detached) s.free();
    this.slots.clear();
    this.detached.length = 0;
  }
}

/** struct kvm_create_guest_memfd. */
function guestMemfdArgs(size: bigint, flags: bigint): Uint8Array {
  const b = new Uint8Array(SIZEOF.kvm_create_guest_memfd);
  const dv = new DataView(b.buffer);
  dv.setBigUint64(0, size, true);
  dv.setBigUint64(8, flags, true);
  return b;
}

// The region structure of synchronous ioctls: the call copies it in before it
// returns, so one buffer serves every VM. Allocating each time cost an
// off-heap ArrayBuffer per call.
const region = new Uint8Array(SIZEOF.kvm_userspace_memory_region2);

/** kvm_userspace_memory_region, or the same leading fields of region2 (zeroed beyond them). */
function memoryRegion(
  size: number,
  slot: number,
  flags: number,
  gpa: bigint,
  bytes: bigint,
  hva: bigint,
  asId: number,
): Uint8Array {
  const b = region.subarray(0, size).fill(0);
  const dv = new DataView(b.buffer, b.byteOffset, size);
  dv.setUint32(0, (asId << 16) | slot, true);
  dv.setUint32(4, flags, true);
  dv.setBigUint64(8, gpa, true);
  dv.setBigUint64(16, bytes, true);
  dv.setBigUint64(24, hva, true);
  return b;
}

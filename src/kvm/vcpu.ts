// A vCPU file descriptor (KVM_CREATE_VCPU): registers, CPUID, MSRs, address
// translation, pre-faulting, stats, the dirty ring, and runs. A run is
// carried out by the runner the target gave the vCPU at creation; its result
// becomes an exit here.
import { check, KvmError, mapped, type Addon } from './sys.js';
import { cpuidBuffer, decodeCpuid, type CpuidEntry } from './cpuid.js';
import { runExit, type Exit } from './exits.js';
import { decodeRegs, decodeSregs, encodeRegs, encodeSregs, type Regs, type Sregs } from './regs.js';
import type { VcpuRunner } from './runner.js';
import { statsReaderFor, type StatsReader } from './stats.js';
import { PAGE_SIZE } from '../base/units.js';
import type { Vm } from './vm.js';
import { encodeVcpuInit, type VcpuInit } from './arm64.js';
import {
  ARM64_IOCTL,
  IOCTL,
  KVM_DIRTY_GFN_F_DIRTY,
  KVM_DIRTY_GFN_F_RESET,
  KVM_DIRTY_LOG_PAGE_OFFSET,
  MAP,
  PROT,
  RUN,
  SIZEOF,
} from '../uapi/uapi.js';

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

export interface DirtyGfn {
  slot: number;
  asId: number;
  offset: bigint;
}

// Scratch buffers for the fixed-size structures of synchronous ioctls: the
// call copies in or out before it returns and decoding builds new objects,
// so one buffer per structure serves every vCPU. Allocating each time cost
// an off-heap ArrayBuffer per call.
const scratch = {
  regs: new Uint8Array(SIZEOF.kvm_regs),
  sregs: new Uint8Array(SIZEOF.kvm_sregs),
};

export class Vcpu {
  /** The main thread's own view of kvm_run (exit decoding; the runner's immediate_exit). */
  readonly runView: DataView;
  /** System calls on the vCPU's target. */
  private readonly sys: Addon;
  private readonly runner: VcpuRunner;
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
    const target = vm.kvm.target;
    this.sys = target.addon;
    this.runner = target.runner({
      fd,
      runAddress: this.sys.addressOf(runMap),
      immediateExit: (on) => this.runView.setUint8(RUN.immediate_exit, on ? 1 : 0),
    });
  }

  getRegs(): Regs {
    check('KVM_GET_REGS', this.sys.ioctlBuf(this.fd, IOCTL.KVM_GET_REGS, scratch.regs));
    return decodeRegs(scratch.regs);
  }
  setRegs(r: Regs): void {
    check('KVM_SET_REGS', this.sys.ioctlBuf(this.fd, IOCTL.KVM_SET_REGS, encodeRegs(r, scratch.regs)));
  }
  getSregs(): Sregs {
    check('KVM_GET_SREGS', this.sys.ioctlBuf(this.fd, IOCTL.KVM_GET_SREGS, scratch.sregs));
    return decodeSregs(scratch.sregs);
  }
  setSregs(s: Sregs): void {
    check('KVM_SET_SREGS', this.sys.ioctlBuf(this.fd, IOCTL.KVM_SET_SREGS, encodeSregs(s, scratch.sregs)));
  }
  setCpuid(entries: readonly CpuidEntry[]): void {
    check('KVM_SET_CPUID2', this.sys.ioctlBuf(this.fd, IOCTL.KVM_SET_CPUID2, cpuidBuffer(entries)));
  }
  getCpuid(): CpuidEntry[] {
    const b = cpuidBuffer([], 256);
    check('KVM_GET_CPUID2', this.sys.ioctlBuf(this.fd, IOCTL.KVM_GET_CPUID2, b));
    return decodeCpuid(b);
  }
  getMsrs(indices: readonly number[]): Map<number, bigint> {
    const b = msrBuffer(indices.map((i) => [i, 0n]));
    const n = check('KVM_GET_MSRS', this.sys.ioctlBuf(this.fd, IOCTL.KVM_GET_MSRS, b));
    if (n !== indices.length) throw new KvmError('KVM_GET_MSRS', 22, `MSR 0x${indices[n]!.toString(16)} not readable`);
    const dv = new DataView(b.buffer);
    return new Map(
      indices.map((idx, i) => [idx, dv.getBigUint64(SIZEOF.kvm_msrs + i * SIZEOF.kvm_msr_entry + 8, true)]),
    );
  }
  setMsrs(values: ReadonlyMap<number, bigint>): void {
    const entries = [...values];
    const n = check('KVM_SET_MSRS', this.sys.ioctlBuf(this.fd, IOCTL.KVM_SET_MSRS, msrBuffer(entries)));
    if (n !== entries.length)
      throw new KvmError('KVM_SET_MSRS', 22, `MSR 0x${entries[n]![0].toString(16)} not writable`);
  }
  translate(gva: bigint): Translation {
    const b = new Uint8Array(SIZEOF.kvm_translation);
    const dv = new DataView(b.buffer);
    dv.setBigUint64(0, gva, true);
    check('KVM_TRANSLATE', this.sys.ioctlBuf(this.fd, IOCTL.KVM_TRANSLATE, b));
    return { gva, gpa: dv.getBigUint64(8, true), valid: b[16] !== 0, writeable: b[17] !== 0, usermode: b[18] !== 0 };
  }
  /** KVM_PRE_FAULT_MEMORY; returns the bytes left unprocessed. */
  preFault(gpa: bigint, size: bigint): bigint {
    const b = new Uint8Array(SIZEOF.kvm_pre_fault_memory);
    const dv = new DataView(b.buffer);
    dv.setBigUint64(0, gpa, true);
    dv.setBigUint64(8, size, true);
    check('KVM_PRE_FAULT_MEMORY', this.sys.ioctlBuf(this.fd, IOCTL.KVM_PRE_FAULT_MEMORY, b));
    return dv.getBigUint64(8, true);
  }
  /** arm64: KVM_ARM_VCPU_INIT (again: a reset to the registers' reset values). */
  armVcpuInit(init: VcpuInit): void {
    const r = this.sys.ioctlBuf(this.fd, ARM64_IOCTL.KVM_ARM_VCPU_INIT, encodeVcpuInit(init));
    check('KVM_ARM_VCPU_INIT', r, `target ${init.target}`);
  }
  /** KVM_GET_ONE_REG of a 64-bit register. */
  getOneReg(id: bigint): bigint {
    const value = new BigUint64Array(1);
    const b = new BigUint64Array([id, this.sys.addressOf(value)]);
    check('KVM_GET_ONE_REG', this.sys.ioctlBuf(this.fd, ARM64_IOCTL.KVM_GET_ONE_REG, b), `reg 0x${id.toString(16)}`);
    return value[0]!;
  }
  /** KVM_SET_ONE_REG of a 64-bit register. */
  setOneReg(id: bigint, v: bigint): void {
    const value = new BigUint64Array([BigInt.asUintN(64, v)]);
    const b = new BigUint64Array([id, this.sys.addressOf(value)]);
    check('KVM_SET_ONE_REG', this.sys.ioctlBuf(this.fd, ARM64_IOCTL.KVM_SET_ONE_REG, b), `reg 0x${id.toString(16)}`);
  }
  stats(): StatsReader {
    if (!this.statsReader) {
      this.statsFd = check('KVM_GET_STATS_FD(vcpu)', this.sys.ioctl(this.fd, IOCTL.KVM_GET_STATS_FD));
      this.statsReader = statsReaderFor(this.sys, this.statsFd);
    }
    return this.statsReader;
  }

  /** The kernel thread id that runs this vCPU (acquiring its thread now if needed), e.g. for trace filters. */
  async tid(): Promise<number> {
    return this.runner.tid();
  }

  /** Runs the vCPU until an exit that needs the caller, or the time limit. */
  async run(opts: RunOptions = {}): Promise<RunResult> {
    if (this.closed) throw new Error(`vCPU ${this.id} is closed`);
    if (this.running) throw new Error(`vCPU ${this.id} is already running`);
    this.running = true;
    try {
      const reply = await this.runner.run({
        timeoutMs: opts.timeoutMs ?? 10_000,
        consolePort: opts.consolePort ?? 0,
        maxExits: opts.maxExits ?? 1 << 30,
      });
      const exit = runExit(reply.ret, this.runView);
      const timedOut = reply.timedOut && exit.reason === 'intr';
      return { exit, timedOut, exits: reply.exits, console: reply.console, ns: reply.ns };
    } finally {
      this.running = false;
    }
  }

  /** Forces a running vCPU out of KVM_RUN (it returns with an intr exit). */
  kick(): void {
    this.runner.kick();
  }

  /** Maps the dirty ring (after Vm.enableDirtyRing) and returns the GFNs it holds, resetting them. */
  harvestDirtyRing(): DirtyGfn[] {
    if (!this.vm.dirtyRingBytes) throw new Error('the dirty ring is not enabled on this VM');
    if (!this.ring) {
      const m = mapped(
        'mmap(dirty ring)',
        this.sys.mmap(
          this.vm.dirtyRingBytes,
          PROT.READ | PROT.WRITE,
          MAP.SHARED,
          this.fd,
          KVM_DIRTY_LOG_PAGE_OFFSET * PAGE_SIZE,
        ),
      );
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
    try {
      this.runner.close();
    } catch (e) {
      this.sys.close(this.fd);
      throw e;
    }
    if (this.ring) this.sys.munmap(this.ring.map);
    this.sys.munmap(this.runMap);
    if (this.statsFd >= 0) this.sys.close(this.statsFd);
    this.sys.close(this.fd);
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

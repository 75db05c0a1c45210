// A minimal arm64 guest: one VM, one vCPU at EL1 with the MMU off, so every
// guest address is an IPA and only stage-2 translation is in play. Code lives
// in memslot 0; the guest reports through one narrow channel:
//  - done: PSCI SYSTEM_OFF through `hvc #0` (KVM_EXIT_SYSTEM_EVENT, SHUTDOWN);
//  - sync / fail: 8-byte stores to a reserved IPA no memslot covers
//    (KVM_EXIT_MMIO; the value is the store's data).
// With the MMU off, data accesses are Device-nGnRnE: guest programs use
// aligned single-register loads and stores, which KVM can emulate as MMIO.
import type { Exit } from '../../kvm/exits.js';
import { describeExit } from '../../kvm/exits.js';
import type { Kvm } from '../../kvm/kvm.js';
import type { Memslot } from '../../kvm/memslot.js';
import type { Vcpu } from '../../kvm/vcpu.js';
import type { Vm } from '../../kvm/vm.js';
import { KVM_SYSTEM_EVENT, PSCI } from '../../uapi/uapi.js';
import type { A64 } from './asm.js';
import { preferredTarget, REG, vcpuInit, type VcpuInit } from './vcpu.js';

export const LAYOUT = {
  /** Memslot 0: the guest's code. */
  code: 0x10000000n,
  codeSize: 0x10000,
  /** The report channel: a page no memslot covers. */
  channel: 0x3f000000n,
} as const;

/** Offsets in the channel page. */
export const CHANNEL = { sync: 0x0n, fail: 0x8n } as const;

/** Registers the channel emitters clobber; guest programs leave them alone. */
const T0 = 27;
const T1 = 28;

export type GuestStop =
  | { kind: 'done' }
  | { kind: 'sync'; value: bigint }
  | { kind: 'fail'; code: bigint }
  | { kind: 'exit'; exit: Exit }
  | { kind: 'timeout' };

export function describeStop(s: GuestStop): string {
  switch (s.kind) {
    case 'sync':
      return `sync 0x${s.value.toString(16)}`;
    case 'fail':
      return `fail 0x${s.code.toString(16)}`;
    case 'exit':
      return describeExit(s.exit);
    default:
      return s.kind;
  }
}

/** Guest-side emitters of the channel. */
export const channel = {
  /** Reports register `rt` to the host (a sync stop with its value). */
  sync(a: A64, rt: number): A64 {
    return a.mov64(T0, LAYOUT.channel).str(8, rt, T0, Number(CHANNEL.sync));
  },
  /** Reports a failure code. */
  fail(a: A64, code: number): A64 {
    return a.mov64(T0, LAYOUT.channel).mov64(T1, code).str(8, T1, T0, Number(CHANNEL.fail));
  },
  /** PSCI SYSTEM_OFF: the vCPU stops with a system event. Clobbers x0..x3 (KVM returns the PSCI result there). */
  done(a: A64): A64 {
    return a.mov64(0, PSCI.SYSTEM_OFF).hvc(0);
  },
};

export class Arm64Guest {
  private constructor(
    readonly vm: Vm,
    readonly vcpu: Vcpu,
    readonly code: Memslot,
    readonly target: VcpuInit,
  ) {}

  static create(kvm: Kvm): Arm64Guest {
    const vm = kvm.createVm();
    try {
      // 4 KiB host pages: stage-2 maps the code page by page, as checks expect.
      const code = vm.addMemslot({
        slot: 0,
        gpa: LAYOUT.code,
        size: LAYOUT.codeSize,
        backing: { kind: 'anon', thp: false },
      });
      const target = preferredTarget(vm);
      const vcpu = vm.createVcpu(0);
      vcpuInit(vcpu, target);
      return new Arm64Guest(vm, vcpu, code, target);
    } catch (e) {
      vm.close();
      throw e;
    }
  }

  get mem(): Vm['mem'] {
    return this.vm.mem;
  }

  /**
   * Puts a program in memslot 0 at its base and points the vCPU at it. A
   * vCPU that has run is reset first (KVM_ARM_VCPU_INIT again): after
   * SYSTEM_OFF it is powered off.
   */
  load(a: A64, opts: { reset?: boolean } = {}): void {
    const bytes = a.bytes();
    if (!this.code.contains(a.base, bytes.length)) {
      throw new RangeError(`program at 0x${a.base.toString(16)} (${bytes.length} bytes) is not inside the code slot`);
    }
    this.mem.write(a.base, bytes);
    if (opts.reset) vcpuInit(this.vcpu, this.target);
    this.vcpu.setOneReg(REG.pc, a.base);
  }

  reg(n: number): bigint {
    return this.vcpu.getOneReg(REG.x(n));
  }

  setReg(n: number, v: bigint): void {
    this.vcpu.setOneReg(REG.x(n), v);
  }

  pc(): bigint {
    return this.vcpu.getOneReg(REG.pc);
  }

  /** Runs until the guest reports, exits for another reason, or the time limit. */
  async run(opts: { timeoutMs?: number } = {}): Promise<GuestStop> {
    const r = await this.vcpu.run({ timeoutMs: opts.timeoutMs ?? 5000 });
    if (r.timedOut) return { kind: 'timeout' };
    const e = r.exit;
    if (e.reason === 'system_event' && e.type === KVM_SYSTEM_EVENT.SHUTDOWN) return { kind: 'done' };
    if (e.reason === 'mmio' && e.isWrite && e.len === 8) {
      const value = new DataView(e.data.buffer, e.data.byteOffset, 8).getBigUint64(0, true);
      if (e.gpa === LAYOUT.channel + CHANNEL.sync) return { kind: 'sync', value };
      if (e.gpa === LAYOUT.channel + CHANNEL.fail) return { kind: 'fail', code: value };
    }
    return { kind: 'exit', exit: e };
  }

  close(): void {
    this.vm.close();
  }
}

// A long-mode x86-64 guest on one VM: memory, bring-up, a program, and the
// guest -> host channel decoded into stops.
import { describeExit, type Exit } from '../../kvm/exits.js';
import { Kvm } from '../../kvm/kvm.js';
import type { CpuidEntry } from '../../kvm/cpuid.js';
import type { HostBacking } from '../../base/host-backing.js';
import { Vcpu, type RunResult } from '../../kvm/vcpu.js';
import { Vm } from '../../kvm/vm.js';
import type { Asm } from './asm.js';
import type { Sregs } from '../../kvm/regs.js';
import { bringUp, CR4, type BringUp, type BringUpOptions } from './bringup.js';
import { KvmError } from '../../kvm/sys.js';
import { NotApplicable } from '../../base/not-applicable.js';
import {
  RETURN_GVA,
  CHANNEL_PORT,
  CONSOLE_PORT,
  EXC_LOG_CAPACITY,
  EXC_LOG_ENTRY,
  EXC_LOG_HEADER,
  LAYOUT,
  MAILBOX,
  OP,
  SEL,
  VECTOR_NAMES,
} from './layout.js';

export interface ExceptionRecord {
  vector: number;
  errorCode: bigint;
  cr2: bigint;
  rip: bigint;
}

export type GuestStop =
  | { kind: 'done' }
  | { kind: 'fail'; message: string }
  | { kind: 'sync'; id: bigint; values: bigint[] }
  | { kind: 'unexpected_exception'; record: ExceptionRecord | undefined }
  | { kind: 'exit'; exit: Exit }
  | { kind: 'timeout' };

/** Memslot 0's host memory unless a guest asks for other: 4 KiB pages that stay 4 KiB pages. */
export const BRINGUP_BACKING: HostBacking = { kind: 'anon', thp: false };

export interface GuestOptions extends BringUpOptions {
  /** Size of memslot 0 at GPA 0 (default 4 MiB, the identity-mapped region). */
  memSize?: number;
  slotFlags?: number;
  /**
   * Memslot 0's host memory (default: anonymous, MADV_NOHUGEPAGE, so that
   * khugepaged cannot collapse the harness's code and tables, and KVM zap
   * and refault them, in the middle of a check).
   */
  backing?: HostBacking;
  /** CPUID for the vCPU (default: everything KVM supports). */
  cpuid?: CpuidEntry[];
}

export function describeStop(s: GuestStop): string {
  switch (s.kind) {
    case 'fail':
      return `guest failed: ${s.message}`;
    case 'sync':
      return `sync ${s.id}`;
    case 'unexpected_exception':
      return s.record ? `unexpected exception ${describeException(s.record)}` : 'unexpected exception (log empty)';
    case 'exit':
      return `exit: ${describeExit(s.exit)}`;
    default:
      return s.kind;
  }
}

export function describeException(r: ExceptionRecord): string {
  return `${VECTOR_NAMES[r.vector] || `vector ${r.vector}`} error code 0x${r.errorCode.toString(16)} cr2 0x${r.cr2.toString(16)} rip 0x${r.rip.toString(16)}`;
}

const EINVAL = 22;

/**
 * KVM_SET_SREGS with the bring-up's long-mode state, after KVM_SET_CPUID2.
 * KVM takes CR4.LA57 only when it is not among the vCPU's reserved CR4 bits,
 * which KVM_SET_CPUID2 computes from the CPUID given *and* KVM's own
 * capabilities: a CPUID bit KVM itself lacks (kvm_pvm has LA57 only where the
 * host kernel runs 5-level paging) still makes CR4.LA57 reserved, and
 * KVM_SET_SREGS fails with EINVAL. The CPUID bit alone does not tell, so the
 * same state without LA57 is tried: if KVM takes that, the refusal is of
 * 5-level paging, a limit of this host rather than an error.
 */
function setLongModeSregs(vcpu: Vcpu, sregs: Sregs): void {
  try {
    vcpu.setSregs(sregs);
  } catch (e) {
    if (!(sregs.cr4 & CR4.LA57) || !(e instanceof KvmError) || e.errno !== EINVAL) throw e;
    try {
      vcpu.setSregs({ ...sregs, cr4: sregs.cr4 & ~CR4.LA57 });
    } catch {
      throw e;
    }
    throw new NotApplicable(
      "5-level paging: KVM refuses CR4.LA57 (KVM_SET_SREGS: EINVAL) although this vCPU's CPUID offers LA57; " +
        'KVM itself does not support it on this host',
    );
  }
}

export class X86Guest {
  readonly vcpu: Vcpu;
  readonly boot: BringUp;
  /** Guest console output collected so far. */
  console = '';
  private cpuid: CpuidEntry[];

  constructor(
    readonly vm: Vm,
    opts: GuestOptions = {},
  ) {
    const memSize = opts.memSize ?? Number(LAYOUT.identityEnd);
    this.cpuid = opts.cpuid ?? vm.kvm.supportedCpuid();
    const leaf7 = this.cpuid.find((e) => e.function === 7 && e.index === 0);
    if (opts.levels === 5 && !(leaf7 && (leaf7.ecx >>> 16) & 1)) {
      throw new NotApplicable("5-level paging needs LA57, which this vCPU's CPUID does not offer");
    }
    const backing = opts.backing ?? BRINGUP_BACKING;
    vm.addMemslot({ slot: 0, gpa: 0n, size: memSize, flags: opts.slotFlags ?? 0, backing });
    this.boot = bringUp(vm.mem, opts);
    this.vcpu = vm.createVcpu(0);
    this.vcpu.setCpuid(this.cpuid);
    setLongModeSregs(this.vcpu, this.boot.sregs(this.vcpu.getSregs()));
  }

  /** Creates a VM with one vCPU in long mode; close() releases everything. */
  static create(kvm: Kvm, opts: GuestOptions = {}): X86Guest {
    const vm = kvm.createVm();
    try {
      return new X86Guest(vm, opts);
    } catch (e) {
      vm.close();
      throw e;
    }
  }

  get mem() {
    return this.vm.mem;
  }

  /** Writes a program at its origin and points RIP at it. */
  load(program: Asm, entry?: bigint): void {
    const { code } = program.assemble();
    this.mem.write(BigInt(program.origin), code);
    this.vcpu.setRegs(this.boot.regs(entry ?? BigInt(program.origin), this.vcpu.getRegs()));
  }

  /** Runs until the guest reports on its channel, or any other exit. */
  async run(opts: { timeoutMs?: number } = {}): Promise<GuestStop> {
    const r: RunResult = await this.vcpu.run({ timeoutMs: opts.timeoutMs ?? 10_000, consolePort: CONSOLE_PORT });
    this.console += Buffer.from(r.console).toString('latin1');
    if (r.timedOut) return { kind: 'timeout' };
    const e = r.exit;
    if (e.reason !== 'io' || e.port !== CHANNEL_PORT || e.direction !== 'out' || e.size !== 4)
      return { kind: 'exit', exit: e };
    const op = new DataView(e.data.buffer, e.data.byteOffset, 4).getUint32(0, true);
    const regs = this.vcpu.getRegs();
    switch (op) {
      case OP.done:
        return { kind: 'done' };
      case OP.fail:
        return { kind: 'fail', message: this.readString(regs.rsi) };
      case OP.sync:
        return { kind: 'sync', id: regs.rdi, values: [regs.rsi, regs.rdx, regs.rcx, regs.r8, regs.r9] };
      case OP.exception:
        return { kind: 'unexpected_exception', record: this.exceptions().at(-1) };
      default:
        return { kind: 'fail', message: `unknown channel op ${op}` };
    }
  }

  /** Runs and expects the guest to finish with `done`; anything else throws with a description. */
  async runToDone(opts: { timeoutMs?: number } = {}): Promise<void> {
    const s = await this.run(opts);
    if (s.kind !== 'done') throw new Error(`guest did not finish: ${describeStop(s)}`);
  }

  /** The exceptions the guest recorded since the log was last cleared. */
  exceptions(): ExceptionRecord[] {
    const count = this.mem.read32(LAYOUT.excLog);
    const out: ExceptionRecord[] = [];
    for (let i = 0; i < Math.min(count, EXC_LOG_CAPACITY); i++) {
      const o = LAYOUT.excLog + BigInt(EXC_LOG_HEADER + i * EXC_LOG_ENTRY);
      out.push({
        vector: Number(this.mem.read64(o)),
        errorCode: this.mem.read64(o + 8n),
        cr2: this.mem.read64(o + 16n),
        rip: this.mem.read64(o + 24n),
      });
    }
    return out;
  }

  clearExceptions(): void {
    this.mem.write32(LAYOUT.excLog, 0);
  }

  private readString(gpa: bigint, max = 512): string {
    const s = this.vm.mem.slotOf(gpa);
    if (!s) return `<message at unmapped 0x${gpa.toString(16)}>`;
    const b = this.mem.bytes(gpa, Math.min(max, Number(s.gpa + BigInt(s.size) - gpa)));
    const z = b.indexOf(0);
    return Buffer.from(b.subarray(0, z < 0 ? b.length : z)).toString('latin1');
  }

  close(): void {
    this.vm.close();
  }
}

/** Guest-side helpers that emit the channel protocol into a program. */
export const channel = {
  done(a: Asm): Asm {
    return a.movImm('rax', OP.done).out(4, CHANNEL_PORT);
  },
  /** Stops with id in rdi and values in rsi, rdx, rcx, r8, r9 (rax and rdi are clobbered). */
  sync(a: Asm, id: number): Asm {
    return a.movImm('rdi', id).movImm('rax', OP.sync).out(4, CHANNEL_PORT);
  },
  /** Reports failure with a message placed in the program's own bytes. */
  fail(a: Asm, message: string): Asm {
    const label = `msg_${a.size()}`;
    const after = `${label}_after`;
    return a
      .movLabel('rsi', label)
      .movImm('rax', OP.fail)
      .out(4, CHANNEL_PORT)
      .jmp(after)
      .label(label)
      .ascii(message)
      .bytes([0])
      .label(after);
  },
  /**
   * Emits `access` so that a fault in it resumes right after it: the fixup RIP
   * is armed before and cleared after, whether or not the access faulted.
   */
  guarded(a: Asm, access: (a: Asm) => void): Asm {
    const resume = `resume_${a.size()}`;
    a.push('rax')
      .movLabel('rax', resume)
      .store(8, { disp: Number(LAYOUT.mailbox) + MAILBOX.fixup }, 'rax')
      .pop('rax');
    access(a);
    return a.label(resume).storeImm(8, { disp: Number(LAYOUT.mailbox) + MAILBOX.fixup }, 0);
  },
  /**
   * Runs code at CPL 3 and comes back to ring 0 right after: control enters
   * ring 3 at `userEntry` (on a user-accessible page), and the user code must
   * end with a jump to RETURN_GVA. rax and r11 are clobbered.
   */
  toUser(a: Asm, userEntry: bigint, rflags = 2n): Asm {
    const back = `ring0_${a.size()}`;
    const mb = Number(LAYOUT.mailbox);
    a.movLabel('rax', back)
      .store(8, { disp: mb + MAILBOX.ring0Rip }, 'rax')
      .store(8, { disp: mb + MAILBOX.ring0Rsp }, 'rsp')
      .push(SEL.udata)
      .push(Number(LAYOUT.userStackTop))
      .push(Number(rflags | 2n))
      .push(SEL.ucode)
      .movImm('rax', userEntry)
      .push('rax');
    return a.iretq().label(back);
  },
  /**
   * One access at CPL 3 whose fault resumes in ring 3 right after it: the
   * access goes into the user program `u`, the ring-0 program `k` arms the
   * fixup, enters ring 3, and disarms it on return.
   */
  userAccess(k: Asm, u: Asm, access: (u: Asm) => void, rflags = 2n): Asm {
    const entry = BigInt(u.pc);
    access(u);
    const resume = BigInt(u.pc);
    u.movImm('r11', RETURN_GVA).jmp('r11');
    const fixup = { disp: Number(LAYOUT.mailbox) + MAILBOX.fixup };
    k.movImm('rax', resume).store(8, fixup, 'rax');
    channel.toUser(k, entry, rflags);
    return k.storeImm(8, fixup, 0);
  },
};

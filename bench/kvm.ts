// The KVM workloads of `npm run bench`, through the harness (Kvm / Vm / Vcpu).
// bench/ref/ref.c does the same work in plain C; the guests are byte-identical:
// real mode, CS base 0, one 64 KiB memslot at GPA 0, code at 0x1000.
import { Kvm } from '../src/kvm/kvm.js';
import type { Vcpu } from '../src/kvm/vcpu.js';
import type { Vm } from '../src/kvm/vm.js';
import { zeroRegs } from '../src/kvm/regs.js';

export const GUEST = {
  memSize: 0x10000,
  codeGpa: 0x1000n,
  port: 0xe9,
  /** out 0xe9, al; jmp -4 */
  loop: [0xe6, 0xe9, 0xeb, 0xfc],
  /** hlt */
  hlt: [0xf4],
  /** 32-bit flat: mov edi, 0x100000; 1: mov [edi], al; add edi, 0x1000; dec ecx; jnz 1b; hlt */
  touch: [0xbf, 0x00, 0x00, 0x10, 0x00, 0x88, 0x07, 0x81, 0xc7, 0x00, 0x10, 0x00, 0x00, 0x49, 0x75, 0xf5, 0xf4],
  touchBase: 0x100000,
} as const;

/** One memslot, the code, one vCPU in real mode at the code (the same steps as ref.c). */
function realModeGuest(vm: Vm, code: readonly number[]): Vcpu {
  vm.addMemslot({ slot: 0, gpa: 0n, size: GUEST.memSize });
  vm.mem.write(GUEST.codeGpa, code);
  const vcpu = vm.createVcpu();
  const s = vcpu.getSregs();
  s.cs.base = 0n;
  s.cs.selector = 0;
  vcpu.setSregs(s);
  vcpu.setRegs({ ...zeroRegs(), rip: GUEST.codeGpa, rax: BigInt('x'.charCodeAt(0)), rflags: 2n });
  return vcpu;
}

export interface RoundtripResult {
  /** Wall-clock around the whole `await vcpu.run(...)`, per exit. */
  usPerExit: number;
  /** The vCPU thread's own loop time (RunResult.ns), per exit. */
  threadUsPerExit: number;
}

/**
 * n port-I/O exits in one `vcpu.run({consolePort, maxExits: n})`: the vCPU
 * thread handles each exit and re-enters without returning to the caller.
 */
export async function exitRoundtrip(kvm: Kvm, n: number): Promise<RoundtripResult> {
  const vm = kvm.createVm();
  try {
    const vcpu = realModeGuest(vm, GUEST.loop);
    const timeoutMs = Math.max(10_000, n / 10); // 100 µs per exit is far beyond anything seen
    const warm = await vcpu.run({ consolePort: GUEST.port, maxExits: 1000, timeoutMs });
    if (warm.exits !== 1000) throw new Error(`exit_roundtrip warm-up: ${warm.exits} exits, exit ${warm.exit.reason}`);
    const t0 = process.hrtime.bigint();
    const r = await vcpu.run({ consolePort: GUEST.port, maxExits: n, timeoutMs });
    const ns = Number(process.hrtime.bigint() - t0);
    if (r.timedOut || r.exits !== n || r.exit.reason !== 'io' || r.exit.port !== GUEST.port) {
      throw new Error(
        `exit_roundtrip: ${r.exits} of ${n} exits, last exit ${r.exit.reason}${r.timedOut ? ' (timed out)' : ''}`,
      );
    }
    return { usPerExit: ns / n / 1e3, threadUsPerExit: r.ns / n / 1e3 };
  } finally {
    vm.close();
  }
}

/** One whole VM lifecycle: create, memslot, vCPU, real-mode registers, run to HLT, close. */
export async function lifecycleOnce(kvm: Kvm): Promise<void> {
  const vm = kvm.createVm();
  try {
    const vcpu = realModeGuest(vm, GUEST.hlt);
    const r = await vcpu.run({ timeoutMs: 10_000 });
    if (r.exit.reason !== 'hlt') throw new Error(`vm_lifecycle: exit ${r.exit.reason}, expected hlt`);
  } finally {
    vm.close();
  }
}

/** µs per lifecycle over n lifecycles (after one warm-up). */
export async function vmLifecycle(kvm: Kvm, n: number): Promise<number> {
  await lifecycleOnce(kvm);
  const t0 = process.hrtime.bigint();
  for (let i = 0; i < n; i++) await lifecycleOnce(kvm);
  return Number(process.hrtime.bigint() - t0) / n / 1e3;
}

/**
 * fault_in: a fresh VM whose guest (32-bit flat protected mode) writes one
 * byte to each of n untouched pages; µs per page for the run alone.
 */
export async function faultIn(kvm: Kvm, n: number): Promise<number> {
  const vm = kvm.createVm();
  try {
    vm.addMemslot({ slot: 0, gpa: 0n, size: GUEST.touchBase + n * 4096 });
    vm.mem.write(GUEST.codeGpa, GUEST.touch);
    const vcpu = vm.createVcpu();
    const s = vcpu.getSregs();
    const flat = {
      ...s.ds,
      base: 0n,
      limit: 0xffffffff,
      selector: 0x10,
      type: 3,
      present: 1,
      db: 1,
      s: 1,
      g: 1,
      l: 0,
      dpl: 0,
      avl: 0,
      unusable: 0,
    };
    vcpu.setSregs({
      ...s,
      ds: flat,
      es: flat,
      ss: flat,
      fs: flat,
      gs: flat,
      cs: { ...flat, selector: 0x8, type: 11 },
      cr0: s.cr0 | 1n,
    });
    vcpu.setRegs({ ...zeroRegs(), rip: GUEST.codeGpa, rcx: BigInt(n), rflags: 2n });
    const t0 = process.hrtime.bigint();
    const res = await vcpu.run({ timeoutMs: 60_000 });
    const ns = Number(process.hrtime.bigint() - t0);
    if (res.exit.reason !== 'hlt') throw new Error(`fault_in: exit ${res.exit.reason}, expected hlt`);
    return ns / n / 1e3;
  } finally {
    vm.close();
  }
}

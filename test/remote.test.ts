// The lab's remote Addon, end to end without QEMU: the agent runs as a local
// child process over FIFOs and performs its system calls on this machine's
// /dev/kvm, while the harness's TypeScript stays in this process.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { execFileSync } from 'node:child_process';
import { closeSync, fstatSync, mkdtempSync, openSync, rmSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { decodeExit } from '../src/kvm/exits.js';
import { Kvm } from '../src/kvm/kvm.js';
import { decodeRegs, decodeSregs, encodeRegs, encodeSregs } from '../src/kvm/regs.js';
import { localAddon } from '../src/kvm/sys.js';
import { VcpuThread } from '../src/kvm/thread.js';
import { CAP, IOCTL, MADV, MAP, MEM, O_RDWR, PROT, RUN, SIZEOF } from '../src/uapi/uapi.js';
import {
  Args,
  Channel,
  decodeReplyBody,
  decodeReplyHeader,
  encodeRequest,
  OP,
  REP_HEADER,
  REP_MAGIC,
  END_MAGIC,
  requestSize,
} from '../src/lab/protocol.js';
import { RemoteAddon } from '../src/lab/remote/addon.js';
import { buildAgent, spawnAgentProcess, spawnLocalAgent, type LocalAgent } from '../src/lab/remote/agent-process.js';
import { remoteTarget } from '../src/lab/remote/target.js';
import { describeKvm } from './support/kvm.js';

let dir: string;
let agentPath: string;

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'kvmharness-remote-test-'));
  try {
    execFileSync(process.env.CXX || 'g++', ['--version'], { stdio: 'ignore' });
  } catch {
    throw new Error(
      'these tests build the lab agent with g++ -static: install g++ (and the static C library, libc6-dev), or set CXX',
    );
  }
  agentPath = buildAgent(join(dir, 'kvmharness-agent'));
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const us = (n: number) => `${(n / 1000).toFixed(1)} µs`;

interface Timing {
  median: number;
  mean: number;
}
/** Nanoseconds per call of f, after a warm-up. */
function timeIt(n: number, f: () => void): Timing {
  for (let i = 0; i < Math.min(200, n); i++) f();
  const t: number[] = [];
  for (let i = 0; i < n; i++) {
    const t0 = process.hrtime.bigint();
    f();
    t.push(Number(process.hrtime.bigint() - t0));
  }
  const mean = t.reduce((a, b) => a + b, 0) / n;
  t.sort((a, b) => a - b);
  return { median: t[n >> 1]!, mean };
}

describe('lab protocol frames', () => {
  it('encodes a request with writes, reads and arguments, and sizes it exactly', () => {
    const req = {
      op: OP.ioctlBuf,
      flags: 1,
      writes: [{ addr: 0x1000n, data: new Uint8Array([1, 2, 3]) }],
      reads: [{ addr: 0x2000n, len: 8 }],
      args: new Args()
        .i32(5)
        .u32(0)
        .u64(0xae80)
        .bytes(new Uint8Array([9]))
        .done(),
    };
    const b = encodeRequest(7, req, Buffer.alloc(requestSize(req)));
    expect(b.length).toBe(24 + 16 + 3 + 16 + 17 + 4);
    expect(b.readUInt32LE(4)).toBe(7);
    expect(b.readUInt16LE(12)).toBe(OP.ioctlBuf);
    expect(b.readUInt32LE(b.length - 4)).toBe(END_MAGIC);
  });

  it('decodes a reply and refuses a desynchronised one', () => {
    const body = Buffer.alloc(2 + 4 + 16 + 4 + 4);
    body.set([0xaa, 0xbb], 0); // payload
    body.set([1, 2, 3, 4], 2); // one read of 4 bytes
    body.writeBigUInt64LE(0x5000n, 6);
    body.writeUInt32LE(4, 14);
    body.writeUInt32LE(0, 18);
    body.set([5, 6, 7, 8], 22);
    body.writeUInt32LE(END_MAGIC, 26);
    const h = Buffer.alloc(REP_HEADER);
    h.writeUInt32LE(REP_MAGIC, 0);
    h.writeUInt32LE(3, 4);
    h.writeUInt32LE(REP_HEADER + body.length, 8);
    h.writeBigInt64LE(-22n, 16);
    h.writeUInt32LE(2, 24);
    h.writeUInt32LE(1, 28);
    h.writeUInt32LE(1, 32);
    const r = decodeReplyBody(decodeReplyHeader(h), body, [4]);
    expect(r.result).toBe(-22);
    expect([...r.payload]).toEqual([0xaa, 0xbb]);
    expect([...r.reads[0]!]).toEqual([1, 2, 3, 4]);
    expect(r.pulled.map((e) => ({ ...e, data: [...e.data!] }))).toEqual([
      { addr: 0x5000n, len: 4, zero: false, data: [5, 6, 7, 8] },
    ]);
    h.writeUInt32LE(0x12345678, 0);
    expect(() => decodeReplyHeader(h)).toThrow(/desync: reply magic/);
    body.writeUInt32LE(0, 26);
    h.writeUInt32LE(REP_MAGIC, 0);
    expect(() => decodeReplyBody(decodeReplyHeader(h), body, [4])).toThrow(/desync: bad end marker/);
  });
});

describe('lab agent (no KVM needed)', () => {
  let a: LocalAgent;
  let ra: RemoteAddon;
  beforeAll(() => {
    a = spawnLocalAgent(agentPath);
    ra = a.addon;
  });
  afterAll(() => a?.close());

  it('says who it is', () => {
    expect(ra.info.version).toBe(2);
    expect(ra.info.pid).toBe(a.child.pid);
    expect(ra.gettid()).toBe(a.child.pid);
    expect(ra.info.pageSize).toBe(4096);
  });

  it('returns failures as -errno', () => {
    expect(ra.open('/nonexistent/kvm', O_RDWR)).toBe(-2);
    expect(ra.close(9999)).toBe(-9);
    expect(ra.ioctl(9999, IOCTL.KVM_GET_API_VERSION)).toBe(-9);
    expect(ra.munmap(new ArrayBuffer(8))).toBe(-22);
    expect(ra.madvise(new ArrayBuffer(4096), 0, 4096, MADV.DONTNEED)).toBe(-22);
  });

  it('mirrors a mapping: host writes reach the agent, agent-side changes come back', () => {
    const m = ra.mmap(0x4000, PROT.READ | PROT.WRITE, MAP.PRIVATE | MAP.ANONYMOUS, -1, 0);
    if (typeof m === 'number') throw new Error(`mmap: ${m}`);
    const at = ra.addressOf(m);
    const u = new Uint8Array(m);
    u.set([1, 2, 3], 0x1000);
    ra.sync();
    expect([...ra.peek(at + 0x1000n, 4)]).toEqual([1, 2, 3, 0]);
    // A raw poke changes the agent's side only; the next pull brings it here.
    ra.poke(at + 0x2ffen, new Uint8Array([7, 8, 9, 10]));
    expect(u[0x2ffe]).toBe(0);
    ra.sync();
    expect([...u.subarray(0x2ffe, 0x3002)]).toEqual([7, 8, 9, 10]);
    // Both sides changed bytes of one page: each side's bytes survive.
    ra.poke(at + 0x1004n, new Uint8Array([0x44]));
    u[0x1001] = 0x22;
    ra.sync();
    expect([...ra.peek(at + 0x1000n, 5)]).toEqual([1, 0x22, 3, 0, 0x44]);
    expect([...u.subarray(0x1000, 0x1005)]).toEqual([1, 0x22, 3, 0, 0x44]);
    // MADV_DONTNEED drops the pages: the mirror reads zeroes after the call.
    expect(ra.madvise(m, 0, 0x4000, MADV.DONTNEED)).toBe(0);
    expect(u.every((b) => b === 0)).toBe(true);
    expect(ra.munmap(m)).toBe(0);
    expect(m.byteLength).toBe(0); // detached
  });

  it("reads and writes the lab's files", () => {
    const f = join(dir, 'file.txt');
    expect(ra.writeFile(f, 'x')).toBe(-2); // O_TRUNC without O_CREAT
    execFileSync('sh', ['-c', `echo hello > ${f}`]);
    expect(ra.readFile(f).toString()).toBe('hello\n');
    expect(ra.writeFile(f, 'bye')).toBe(3);
    expect(ra.readFile(f).toString()).toBe('bye');
    expect(ra.mkdir(join(dir, 'd'))).toBe(0);
    expect(ra.mkdir(join(dir, 'd'))).toBe(-17);
    expect(ra.rmdir(join(dir, 'd'))).toBe(0);
  });

  it('fails loudly on a desynchronised stream', () => {
    const p = spawnAgentProcess(agentPath);
    const ch = new Channel(p.readFd, p.writeFd, { watchPid: p.child.pid, ownFds: true });
    try {
      expect(ch.call({ op: OP.nop }).result).toBe(0);
      writeSync(p.writeFd, Buffer.from('line noise'));
      expect(() => ch.call({ op: OP.nop })).toThrow(
        /desync: reply #4294967295 to request #2 \(nop\): desync: bad request magic/,
      );
      expect(() => ch.call({ op: OP.nop })).toThrow(/the lab channel is broken/);
    } finally {
      ch.close();
      p.child.kill('SIGKILL');
      p.cleanup(false);
    }
  });

  it("connects through line noise and stale replies, and leaves the caller's descriptors open", () => {
    const p = spawnAgentProcess(agentPath);
    try {
      // Noise and a reply to some earlier request wait in the reply FIFO.
      const inject = openSync(`/proc/self/fd/${p.readFd}`, 'w');
      const stale = Buffer.alloc(REP_HEADER + 4);
      stale.writeUInt32LE(REP_MAGIC, 0);
      stale.writeUInt32LE(12345, 4);
      stale.writeUInt32LE(stale.length, 8);
      stale.writeUInt16LE(OP.hello, 12);
      stale.writeUInt32LE(END_MAGIC, REP_HEADER);
      writeSync(inject, Buffer.concat([Buffer.from('\r\nKHR login: '), stale, Buffer.from('KHRP')]));
      closeSync(inject);
      const ra = RemoteAddon.connect(p.readFd, p.writeFd, { watchPid: p.child.pid });
      expect(ra.info.pid).toBe(p.child.pid);
      expect(ra.ioctl(-1, IOCTL.KVM_GET_API_VERSION)).toBe(-9);
      ra.disconnect();
      expect(fstatSync(p.readFd).isFIFO()).toBe(true); // still open: the caller's
    } finally {
      p.child.kill('SIGKILL');
      p.cleanup();
    }
  });

  it('refuses a host write to memory the agent mapped read-only, and says where', () => {
    const x = spawnLocalAgent(agentPath);
    try {
      const m = x.addon.mmap(0x2000, PROT.READ | PROT.WRITE, MAP.PRIVATE | MAP.ANONYMOUS, -1, 0) as ArrayBuffer;
      expect(x.addon.mprotect(m, 0x1000, 0x1000, PROT.READ)).toBe(0);
      new Uint8Array(m)[0x1000] = 1;
      expect(() => x.addon.sync()).toThrow(/agent refused nop: write of 4096 bytes at 0x[0-9a-f]+ faulted/);
      expect(() => x.addon.sync()).toThrow(/the lab channel is broken/);
    } finally {
      x.close();
    }
  });

  it('times out on an agent that does not answer, and notices one that died', () => {
    const stopped = spawnLocalAgent(agentPath, { rpcTimeoutMs: 300, watchdogTickMs: 20 });
    try {
      stopped.child.kill('SIGSTOP');
      const t0 = Date.now();
      expect(() => stopped.addon.ioctl(3, IOCTL.KVM_GET_API_VERSION)).toThrow(
        /no reply from the agent within the deadline/,
      );
      expect(Date.now() - t0).toBeLessThan(5000);
    } finally {
      stopped.child.kill('SIGKILL');
      stopped.close();
    }
    const dead = spawnLocalAgent(agentPath, { watchdogTickMs: 20 });
    try {
      dead.child.kill('SIGKILL');
      expect(() => {
        for (let i = 0; i < 100; i++) dead.addon.ioctl(3, IOCTL.KVM_GET_API_VERSION);
      }).toThrow(/closed the channel|process exited/);
    } finally {
      dead.close();
    }
  });
});

/** Real-mode set-up through any Addon: CS base 0, RIP at `rip`. */
function realModeVcpu(a: RemoteAddon, vcpu: number, rip: bigint): void {
  const sb = new Uint8Array(SIZEOF.kvm_sregs);
  expect(a.ioctlBuf(vcpu, IOCTL.KVM_GET_SREGS, sb)).toBe(0);
  const s = decodeSregs(sb);
  expect(a.ioctlBuf(vcpu, IOCTL.KVM_SET_SREGS, encodeSregs({ ...s, cs: { ...s.cs, base: 0n, selector: 0 } }))).toBe(0);
  const rb = new Uint8Array(SIZEOF.kvm_regs);
  expect(a.ioctlBuf(vcpu, IOCTL.KVM_GET_REGS, rb)).toBe(0);
  expect(a.ioctlBuf(vcpu, IOCTL.KVM_SET_REGS, encodeRegs({ ...decodeRegs(rb), rip, rflags: 2n }))).toBe(0);
}

interface RawVm {
  vm: number;
  vcpu: number;
  mem: Uint8Array;
  memBuf: ArrayBuffer;
  run: DataView;
  runAddr: bigint;
  close(): void;
}

/** A VM with one 64 KiB memslot at GPA 0 and code at 0x1000, through the raw Addon calls. */
function rawVm(a: RemoteAddon, kvm: number, code: number[], slotFlags = 0): RawVm {
  const vm = a.ioctl(kvm, IOCTL.KVM_CREATE_VM, 0);
  expect(vm).toBeGreaterThan(0);
  const memBuf = a.mmap(0x10000, PROT.READ | PROT.WRITE, MAP.PRIVATE | MAP.ANONYMOUS | MAP.NORESERVE, -1, 0);
  if (typeof memBuf === 'number') throw new Error(`mmap: ${memBuf}`);
  const region = new DataView(new ArrayBuffer(SIZEOF.kvm_userspace_memory_region));
  region.setUint32(4, slotFlags, true);
  region.setBigUint64(16, 0x10000n, true);
  region.setBigUint64(24, a.addressOf(memBuf), true);
  expect(a.ioctlBuf(vm, IOCTL.KVM_SET_USER_MEMORY_REGION, region)).toBe(0);
  const mem = new Uint8Array(memBuf);
  mem.set(code, 0x1000);
  const vcpu = a.ioctl(vm, IOCTL.KVM_CREATE_VCPU, 0);
  expect(vcpu).toBeGreaterThan(0);
  const size = a.ioctl(kvm, IOCTL.KVM_GET_VCPU_MMAP_SIZE);
  const runBuf = a.mmap(size, PROT.READ | PROT.WRITE, MAP.SHARED, vcpu, 0);
  if (typeof runBuf === 'number') throw new Error(`mmap(kvm_run): ${runBuf}`);
  realModeVcpu(a, vcpu, 0x1000n);
  return {
    vm,
    vcpu,
    mem,
    memBuf,
    run: new DataView(runBuf),
    runAddr: a.addressOf(runBuf),
    close() {
      a.munmap(runBuf);
      a.close(vcpu);
      a.close(vm);
      a.munmap(memBuf);
    },
  };
}

describeKvm('remote Addon over a local agent', () => {
  let a: LocalAgent;
  let ra: RemoteAddon;
  let kvm: number;
  beforeAll(() => {
    a = spawnLocalAgent(agentPath);
    ra = a.addon;
    kvm = ra.open('/dev/kvm', O_RDWR);
  });
  afterAll(() => {
    if (kvm > 0) ra.close(kvm);
    a?.close();
  });

  it('opens /dev/kvm in the agent: API version 12', () => {
    expect(kvm).toBeGreaterThan(0);
    expect(ra.ioctl(kvm, IOCTL.KVM_GET_API_VERSION)).toBe(12);
    expect(
      ra.ioctl(kvm, IOCTL.KVM_CHECK_EXTENSION, CAP.KVM_CAP_USER_MEMORY2 >= 0 ? CAP.KVM_CAP_NR_MEMSLOTS : 0),
    ).toBeGreaterThan(0);
    expect(ra.ioctl(kvm, IOCTL.KVM_GET_VCPU_MMAP_SIZE)).toBeGreaterThanOrEqual(4096);
  });

  it("returns KVM's refusals as -errno", () => {
    const vm = ra.ioctl(kvm, IOCTL.KVM_CREATE_VM, 0);
    try {
      const region = new DataView(new ArrayBuffer(SIZEOF.kvm_userspace_memory_region));
      region.setBigUint64(8, 0x123n, true); // unaligned GPA
      region.setBigUint64(16, 0x1000n, true);
      expect(ra.ioctlBuf(vm, IOCTL.KVM_SET_USER_MEMORY_REGION, region)).toBe(-22);
      expect(ra.ioctl(vm, 0xae99)).toBe(-25); // ENOTTY
    } finally {
      ra.close(vm);
    }
  });

  it('runs a real-mode guest to an io exit with data, then to hlt', () => {
    const g = rawVm(ra, kvm, [0xb0, 0x42, 0xe6, 0x10, 0xf4]); // mov al, 0x42; out 0x10, al; hlt
    try {
      const r1 = ra.remoteRun(g.vcpu, g.runAddr, 0, 1, 5000);
      expect(r1.ret).toBe(0);
      expect(r1.exits).toBe(1);
      const e1 = decodeExit(g.run);
      expect(e1).toMatchObject({ reason: 'io', direction: 'out', port: 0x10, size: 1, count: 1 });
      expect(e1.reason === 'io' && [...e1.data]).toEqual([0x42]);
      expect(ra.remoteRun(g.vcpu, g.runAddr, 0, 1, 5000).ret).toBe(0);
      expect(decodeExit(g.run)).toEqual({ reason: 'hlt' });
    } finally {
      g.close();
    }
  });

  it('brings guest writes back to the mirror, and host writes to the guest', () => {
    // mov byte [0x3000], 0x77; mov al, [0x4000]; out 0x10, al; hlt
    const g = rawVm(ra, kvm, [0xc6, 0x06, 0x00, 0x30, 0x77, 0xa0, 0x00, 0x40, 0xe6, 0x10, 0xf4]);
    try {
      g.mem[0x4000] = 0x5a;
      expect(g.mem[0x3000]).toBe(0);
      expect(ra.remoteRun(g.vcpu, g.runAddr, 0, 1, 5000).ret).toBe(0);
      expect(g.mem[0x3000]).toBe(0x77);
      const e = decodeExit(g.run);
      expect(e.reason === 'io' && [...e.data]).toEqual([0x5a]);
    } finally {
      g.close();
    }
  });

  it('collects console output in the agent', () => {
    // mov al, 'A'; out 0xe9, al; inc al; cmp al, 'E'; jne -8; hlt
    const g = rawVm(ra, kvm, [0xb0, 0x41, 0xe6, 0xe9, 0xfe, 0xc0, 0x3c, 0x45, 0x75, 0xf8, 0xf4]);
    try {
      const r = ra.remoteRun(g.vcpu, g.runAddr, 0xe9, 1 << 30, 5000);
      expect(Buffer.from(r.console).toString()).toBe('ABCD');
      expect(r.exits).toBe(5);
      expect(decodeExit(g.run).reason).toBe('hlt');
    } finally {
      g.close();
    }
  });

  it('ends a spinning guest at the time limit, and the vCPU runs again', () => {
    const g = rawVm(ra, kvm, [0xeb, 0xfe]); // jmp $
    try {
      const t0 = Date.now();
      const r = ra.remoteRun(g.vcpu, g.runAddr, 0, 1, 100);
      expect(r).toMatchObject({ ret: -4, timedOut: true });
      expect(Date.now() - t0).toBeLessThan(3000);
      expect(g.run.getUint8(RUN.immediate_exit)).toBe(0);
      // A host-set immediate_exit makes the next run return at once, and stays.
      g.run.setUint8(RUN.immediate_exit, 1);
      expect(ra.remoteRun(g.vcpu, g.runAddr, 0, 1, 5000)).toMatchObject({ ret: -4, timedOut: false });
      g.run.setUint8(RUN.immediate_exit, 0);
      g.mem.set([0xf4], 0x1000); // hlt
      expect(ra.remoteRun(g.vcpu, g.runAddr, 0, 1, 5000).ret).toBe(0);
      expect(decodeExit(g.run).reason).toBe('hlt');
      // A run address that is not the agent's mapping is refused, not followed.
      expect(ra.remoteRun(g.vcpu, 0x1000n, 0, 1, 100).ret).toBe(-14);
    } finally {
      g.close();
    }
  });

  it('fills a dirty log through a buffer that is not a mirror', () => {
    // mov [0x3000], al; mov [0x5000], al; hlt
    const g = rawVm(ra, kvm, [0xa2, 0x00, 0x30, 0xa2, 0x00, 0x50, 0xf4], MEM.KVM_MEM_LOG_DIRTY_PAGES);
    try {
      expect(ra.remoteRun(g.vcpu, g.runAddr, 0, 1, 5000).ret).toBe(0);
      const bitmap = new Uint8Array(8).fill(0xee);
      const log = new DataView(new ArrayBuffer(SIZEOF.kvm_dirty_log));
      log.setUint32(0, 0, true);
      log.setBigUint64(8, ra.addressOf(bitmap), true);
      expect(ra.ioctlBuf(g.vm, IOCTL.KVM_GET_DIRTY_LOG, log)).toBe(0);
      const pages = [...bitmap].flatMap((b, i) =>
        [0, 1, 2, 3, 4, 5, 6, 7].filter((j) => b & (1 << j)).map((j) => i * 8 + j),
      );
      expect(pages).toEqual([3, 5]);
      // Scratch is released after the ioctl; the next bitmap reads clean.
      const again = new Uint8Array(8).fill(0xee);
      log.setBigUint64(8, ra.addressOf(again), true);
      expect(ra.ioctlBuf(g.vm, IOCTL.KVM_GET_DIRTY_LOG, log)).toBe(0);
      expect([...again]).toEqual([0, 0, 0, 0, 0, 0, 0, 0]);
    } finally {
      g.close();
    }
  });

  it('drives Kvm / Vm / Vcpu unchanged on the remote target', async () => {
    const target = remoteTarget(ra);
    expect(target.concurrentRuns).toBe(true);
    const k = Kvm.open(target);
    try {
      expect(k.apiVersion()).toBe(12);
      const vm = k.createVm();
      try {
        const slot = vm.addMemslot({ slot: 0, gpa: 0n, size: 0x10000, flags: MEM.KVM_MEM_LOG_DIRTY_PAGES });
        expect(slot.hva).toBe(ra.addressOf(slot.memory)); // the agent's address
        vm.mem.write(0x1000n, [0xa2, 0x00, 0x70, 0xf4]); // mov [0x7000], al; hlt
        const v = vm.createVcpu();
        const sr = v.getSregs();
        v.setSregs({ ...sr, cs: { ...sr.cs, base: 0n, selector: 0 } });
        v.setRegs({ ...v.getRegs(), rip: 0x1000n, rflags: 2n, rax: 0x99n });
        // The vCPU runs on a thread of its own in the agent (see docs/lab-protocol.md).
        const tid = await v.tid();
        expect(tid).toBeGreaterThan(0);
        expect(tid).not.toBe(ra.info.tid);
        const r = await v.run({ timeoutMs: 5000 });
        expect(r.exit).toEqual({ reason: 'hlt' });
        expect(r.timedOut).toBe(false);
        expect(decodeExit(v.runView)).toEqual({ reason: 'hlt' });
        expect(vm.mem.read32(0x7000n) & 0xff).toBe(0x99);
        expect(v.getRegs().rip).toBe(0x1004n);
        expect([...vm.getDirtyLog(0)]).toEqual([0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0].slice(0, 8));
        expect(v.translate(0x7000n)).toMatchObject({ valid: true, gpa: 0x7000n });
        expect(v.stats().has('exits')).toBe(true);
        vm.memslot(0).madvise(0x7000, 0x1000, MADV.DONTNEED);
        expect(vm.mem.read32(0x7000n)).toBe(0);
        // Part of a mapping unmapped and mapped again: fresh anonymous memory reads as zero.
        vm.mem.write32(0x6000n, 0x1234);
        vm.mem.write32(0x8000n, 0x5678);
        vm.memslot(0).munmap(0x6000, 0x1000);
        vm.memslot(0).remap(0x6000, 0x1000);
        ra.sync();
        expect(vm.mem.read32(0x6000n)).toBe(0);
        expect(vm.mem.read32(0x8000n)).toBe(0x5678);
        // All of a slot's memory unmapped and mapped back: the agent keeps the mapping known.
        const whole = vm.addMemslot({ slot: 1, gpa: 0x100000n, size: 0x2000, backing: { kind: 'anon', thp: false } });
        vm.mem.write32(0x101000n, 0x4321);
        whole.munmap(0, 0x2000);
        whole.remap(0, 0x2000);
        ra.sync();
        expect(vm.mem.read32(0x101000n)).toBe(0);
        // A store of zeros over the zero page reaches the agent (it replaces the page there),
        // though the mirror's bytes do not change.
        const zs = vm.addMemslot({ slot: 2, gpa: 0x200000n, size: 0x2000, backing: { kind: 'anon', thp: false } });
        const rssKb = () => {
          const smaps = ra.readFile('/proc/self/smaps').toString().split('\n');
          const at = smaps.findIndex((l) => l.startsWith(`${zs.hva.toString(16)}-`));
          return Number(/^Rss:\s+(\d+)/m.exec(smaps.slice(at + 1, at + 8).join('\n'))?.[1]);
        };
        ra.peek(zs.hva, 8);
        expect(rssKb()).toBe(0);
        zs.storeThrough(0, 8);
        expect(rssKb()).toBe(4);
      } finally {
        vm.close();
      }
    } finally {
      k.close();
    }
  });

  it('measures the round trip of one call and the overhead of one run', () => {
    const local = localAddon();
    const lkvm = local.open('/dev/kvm', O_RDWR);
    const rows: [string, Timing][] = [];
    rows.push([
      'KVM_CHECK_EXTENSION, native addon',
      timeIt(2000, () => local.ioctl(lkvm, IOCTL.KVM_CHECK_EXTENSION, CAP.KVM_CAP_NR_MEMSLOTS)),
    ]);
    const remoteIoctl = timeIt(2000, () => ra.ioctl(kvm, IOCTL.KVM_CHECK_EXTENSION, CAP.KVM_CAP_NR_MEMSLOTS));
    rows.push(['KVM_CHECK_EXTENSION, remote (no mirrors)', remoteIoctl]);
    const sregs = new Uint8Array(SIZEOF.kvm_sregs);

    // A guest that exits on every entry: out 0x10, al; jmp back.
    const code = [0xe6, 0x10, 0xeb, 0xfc];
    const g = rawVm(ra, kvm, code);
    rows.push([
      'KVM_GET_SREGS, remote (mirrors: 64 KiB memslot, kvm_run)',
      timeIt(2000, () => ra.ioctlBuf(g.vcpu, IOCTL.KVM_GET_SREGS, sregs)),
    ]);
    // A 4 MiB mirror with 64 pages in use, scattered (the worst case for the diff).
    const big = ra.mmap(0x400000, PROT.READ | PROT.WRITE, MAP.PRIVATE | MAP.ANONYMOUS | MAP.NORESERVE, -1, 0);
    if (typeof big === 'number') throw new Error(`mmap: ${big}`);
    const bu = new Uint8Array(big);
    for (let p = 0; p < 64; p++) bu[p * 0x10000] = p + 1;
    try {
      rows.push([
        'KVM_GET_SREGS, remote (+ 4 MiB mirror, 64 pages in use)',
        timeIt(2000, () => ra.ioctlBuf(g.vcpu, IOCTL.KVM_GET_SREGS, sregs)),
      ]);
      let agentNs = 0;
      let runs = 0;
      const remoteRun = timeIt(1000, () => {
        agentNs += ra.remoteRun(g.vcpu, g.runAddr, 0, 1, 5000).ns;
        runs++;
      });
      expect(decodeExit(g.run)).toMatchObject({ reason: 'io', port: 0x10 });
      let i = 0;
      const remoteRunPush = timeIt(1000, () => {
        bu[0x200000] = i++ & 0xff; // one page changed by the host before each run
        ra.remoteRun(g.vcpu, g.runAddr, 0, 1, 5000);
      });

      // The same guest run locally on a native vCPU thread (the local run path), for reference.
      const lvm = local.ioctl(lkvm, IOCTL.KVM_CREATE_VM, 0);
      const lmem = local.mmap(
        0x10000,
        PROT.READ | PROT.WRITE,
        MAP.PRIVATE | MAP.ANONYMOUS | MAP.NORESERVE,
        -1,
        0,
      ) as ArrayBuffer;
      new Uint8Array(lmem).set(code, 0x1000);
      const region = new DataView(new ArrayBuffer(SIZEOF.kvm_userspace_memory_region));
      region.setBigUint64(16, 0x10000n, true);
      region.setBigUint64(24, local.addressOf(lmem), true);
      expect(local.ioctlBuf(lvm, IOCTL.KVM_SET_USER_MEMORY_REGION, region)).toBe(0);
      const lvcpu = local.ioctl(lvm, IOCTL.KVM_CREATE_VCPU, 0);
      const lrun = local.mmap(
        local.ioctl(lkvm, IOCTL.KVM_GET_VCPU_MMAP_SIZE),
        PROT.READ | PROT.WRITE,
        MAP.SHARED,
        lvcpu,
        0,
      ) as ArrayBuffer;
      const sb = new Uint8Array(SIZEOF.kvm_sregs);
      local.ioctlBuf(lvcpu, IOCTL.KVM_GET_SREGS, sb);
      const s = decodeSregs(sb);
      local.ioctlBuf(lvcpu, IOCTL.KVM_SET_SREGS, encodeSregs({ ...s, cs: { ...s.cs, base: 0n, selector: 0 } }));
      const rb = new Uint8Array(SIZEOF.kvm_regs);
      local.ioctlBuf(lvcpu, IOCTL.KVM_GET_REGS, rb);
      local.ioctlBuf(lvcpu, IOCTL.KVM_SET_REGS, encodeRegs({ ...decodeRegs(rb), rip: 0x1000n, rflags: 2n }));
      const req = { fd: lvcpu, run: local.addressOf(lrun), consolePort: 0, maxExits: 1 };
      const thread = VcpuThread.acquire();
      try {
        rows.push([
          'run to an io exit, native vCPU thread',
          timeIt(1000, () => {
            const seq = thread.start(req);
            while (!thread.poll(seq));
            thread.finish();
          }),
        ]);
      } finally {
        VcpuThread.release(thread);
      }
      expect(decodeExit(new DataView(lrun))).toMatchObject({ reason: 'io', port: 0x10 });
      local.munmap(lrun);
      local.close(lvcpu);
      local.close(lvm);
      local.munmap(lmem);

      rows.push(['run to an io exit, remote (wall)', remoteRun]);
      const inLoop = agentNs / runs;
      rows.push(["  of which in the agent's run loop (mean)", { median: inLoop, mean: inLoop }]);
      rows.push([
        '  per-run overhead (wall - agent loop)',
        { median: remoteRun.median - inLoop, mean: remoteRun.mean - inLoop },
      ]);
      rows.push(['run to an io exit, remote, 1 page pushed first', remoteRunPush]);
      const st = ra.stats;
      process.stdout.write(
        `\nlab protocol over a local agent (FIFOs), median / mean:\n${rows.map(([k, v]) => `  ${k.padEnd(58)} ${us(v.median).padStart(10)} ${us(v.mean).padStart(10)}`).join('\n')}\n` +
          `  totals: ${st.rpcs} round trips, ${st.pagesPushed} pages pushed, ${st.pagesPulled} pages pulled, host diffing ${us(st.diffNs / st.rpcs)} per round trip\n`,
      );
      expect(remoteIoctl.median).toBeGreaterThan(rows[0]![1].median);
    } finally {
      local.close(lkvm);
      ra.munmap(big);
      g.close();
    }
  });
});

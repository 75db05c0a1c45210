import { afterAll, beforeAll, expect, it } from 'vitest';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { X86Guest } from '../src/arch/x86/guest.js';
import { Kvm } from '../src/kvm/kvm.js';
import { localTarget } from '../src/target/local.js';
import type { Vm } from '../src/kvm/vm.js';
import { KvmError } from '../src/kvm/sys.js';
import { CAP, MADV, MEM, RUN } from '../src/uapi/uapi.js';
import { describeKvm } from './support/kvm.js';

const fds = () => readdirSync('/proc/self/fd').length;

/** A real-mode VM whose code at 0x1000 is `bytes`. */
function realMode(kvm: Kvm, bytes: number[], flags = 0): Vm {
  const vm = kvm.createVm();
  vm.addMemslot({ slot: 0, gpa: 0n, size: 0x10000, flags });
  vm.mem.write(0x1000n, bytes);
  const v = vm.createVcpu();
  const sr = v.getSregs();
  v.setSregs({ ...sr, cs: { ...sr.cs, base: 0n, selector: 0 } });
  v.setRegs({ ...v.getRegs(), rip: 0x1000n, rflags: 2n });
  return vm;
}

describeKvm('KVM binding', () => {
  let kvm: Kvm;
  beforeAll(() => {
    kvm = Kvm.open(localTarget);
  });
  afterAll(() => kvm.close());

  it('reports API version 12 and a vCPU mmap size of at least one page', () => {
    expect(kvm.apiVersion()).toBe(12);
    expect(kvm.vcpuMmapSize()).toBeGreaterThanOrEqual(4096);
  });

  it('names the ioctl and errno when KVM refuses', () => {
    const vm = kvm.createVm();
    try {
      // Unaligned GPA: KVM answers EINVAL.
      expect(() => vm.setUserMemoryRegion(0, 0, 0x123n, 0x1000n, 0n)).toThrowError(
        new KvmError('KVM_SET_USER_MEMORY_REGION', 22, 'slot 0'),
      );
      expect(() => vm.setUserMemoryRegion(0, 0, 0x123n, 0x1000n, 0n)).toThrow(
        /^KVM_SET_USER_MEMORY_REGION failed: EINVAL/,
      );
    } finally {
      vm.close();
    }
  });

  it('runs a real-mode guest: io exit with data, then hlt', async () => {
    const vm = realMode(kvm, [0xb0, 0x42, 0xe6, 0x10, 0xf4]);
    try {
      const v = vm.vcpus[0]!;
      const r1 = await v.run();
      expect(r1.exit).toMatchObject({ reason: 'io', direction: 'out', port: 0x10, size: 1, count: 1 });
      expect(r1.exit.reason === 'io' && [...r1.exit.data]).toEqual([0x42]);
      expect((await v.run()).exit).toEqual({ reason: 'hlt' });
    } finally {
      vm.close();
    }
  });

  it('completes an io in exit: the guest reads the bytes given to complete()', async () => {
    const vm = realMode(kvm, [0xe4, 0x10, 0xe6, 0x11, 0xf4]); // in al, 0x10; out 0x11, al; hlt
    try {
      const v = vm.vcpus[0]!;
      const r1 = await v.run();
      expect(r1.exit).toMatchObject({ reason: 'io', direction: 'in', port: 0x10, size: 1, count: 1 });
      if (r1.exit.reason !== 'io') throw new Error('no io exit');
      expect(() => r1.exit.reason === 'io' && r1.exit.complete(new Uint8Array([1, 2]))).toThrow(/2 bytes for 1/);
      r1.exit.complete(new Uint8Array([0x5a]));
      const r2 = await v.run();
      expect(r2.exit).toMatchObject({ reason: 'io', direction: 'out', port: 0x11 });
      expect(r2.exit.reason === 'io' && [...r2.exit.data]).toEqual([0x5a]);
      // The completion is not part of the exit's value.
      expect(Object.keys(r2.exit)).not.toContain('complete');
      expect(() => r2.exit.reason === 'io' && r2.exit.complete(new Uint8Array([0]))).toThrow(/takes no data/);
    } finally {
      vm.close();
    }
  });

  it('collects console output inside the vCPU thread', async () => {
    // mov al, 'A'; out 0xe9, al; inc al; cmp al, 'E'; jne -8; hlt
    const vm = realMode(kvm, [0xb0, 0x41, 0xe6, 0xe9, 0xfe, 0xc0, 0x3c, 0x45, 0x75, 0xf8, 0xf4]);
    try {
      const r = await vm.vcpus[0]!.run({ consolePort: 0xe9 });
      expect(Buffer.from(r.console).toString()).toBe('ABCD');
      expect(r.exit.reason).toBe('hlt');
      expect(r.exits).toBe(5);
    } finally {
      vm.close();
    }
  });

  it('kicks a spinning vCPU at the time limit and clears immediate_exit', async () => {
    const vm = realMode(kvm, [0xeb, 0xfe]); // jmp $
    try {
      const v = vm.vcpus[0]!;
      const r = await v.run({ timeoutMs: 100 });
      expect(r.timedOut).toBe(true);
      expect(r.exit.reason).toBe('intr');
      expect(v.runView.getUint8(RUN.immediate_exit)).toBe(0);
      // An explicit kick from the main thread also stops it.
      const p = v.run({ timeoutMs: 10_000 });
      setTimeout(() => v.kick(), 50);
      const k = await p;
      expect(k.exit.reason).toBe('intr');
      expect(k.timedOut).toBe(false);
    } finally {
      vm.close();
    }
  });

  it('gives timers a turn while a caller loops on short runs', async () => {
    const vm = realMode(kvm, [0xf4, 0xeb, 0xfd]); // 1: hlt; jmp 1b — every run ends at once
    try {
      const v = vm.vcpus[0]!;
      const t0 = performance.now();
      let firedAfter = -1;
      setTimeout(() => (firedAfter = performance.now() - t0), 5);
      let runs = 0;
      while (firedAfter < 0 && performance.now() - t0 < 2000) {
        expect((await v.run()).exit.reason).toBe('hlt');
        runs++;
      }
      // Runs end while the caller sleeps natively and resolve without the
      // event loop; without a turn every few ms the timer waits for the loop.
      expect(firedAfter).toBeGreaterThan(0);
      expect(firedAfter).toBeLessThan(100);
      expect(runs).toBeGreaterThan(1);
    } finally {
      vm.close();
    }
  });

  it("moves a long run off the caller's CPU with its start-up affinity back", async () => {
    const allowed = (tid: number | string) =>
      readFileSync(`/proc/self/task/${tid}/status`, 'utf8').match(/Cpus_allowed_list:\s*(\S+)/)![1];
    const vm = realMode(kvm, [0xeb, 0xfe]); // jmp $
    try {
      const v = vm.vcpus[0]!;
      const tid = await v.tid();
      const p = v.run({ timeoutMs: 300 });
      // A short run is pinned to the caller's CPU; past the caller's 1 ms wait
      // the thread's affinity is the process's again.
      await new Promise((r) => setTimeout(r, 50));
      expect(allowed(tid)).toBe(allowed(process.pid));
      expect((await p).timedOut).toBe(true);
    } finally {
      vm.close();
    }
  });

  it('keeps guest memory views, dirty log and CLEAR_DIRTY_LOG consistent', async () => {
    // mov byte [0x3000], al ; mov byte [0x5000], al ; hlt
    const vm = realMode(kvm, [0xa2, 0x00, 0x30, 0xa2, 0x00, 0x50, 0xf4], MEM.KVM_MEM_LOG_DIRTY_PAGES);
    try {
      expect((await vm.vcpus[0]!.run()).exit.reason).toBe('hlt');
      const log = vm.getDirtyLog(0);
      const pages = [...log].flatMap((b, i) =>
        [0, 1, 2, 3, 4, 5, 6, 7].filter((j) => b & (1 << j)).map((j) => i * 8 + j),
      );
      expect(pages).toEqual([3, 5]);
      expect([...vm.getDirtyLog(0)].every((b) => b === 0)).toBe(true);
    } finally {
      vm.close();
    }
  });

  it('harvests the dirty ring when the host offers it', async () => {
    const vm = kvm.createVm();
    try {
      if (!vm.checkExtension(CAP.KVM_CAP_DIRTY_LOG_RING)) return;
      vm.enableDirtyRing(4096 * 4);
      vm.addMemslot({ slot: 0, gpa: 0n, size: 0x10000, flags: MEM.KVM_MEM_LOG_DIRTY_PAGES });
      vm.mem.write(0x1000n, [0xa2, 0x00, 0x70, 0xf4]); // mov [0x7000], al; hlt
      const v = vm.createVcpu();
      const sr = v.getSregs();
      v.setSregs({ ...sr, cs: { ...sr.cs, base: 0n, selector: 0 } });
      v.setRegs({ ...v.getRegs(), rip: 0x1000n, rflags: 2n });
      expect((await v.run()).exit.reason).toBe('hlt');
      expect(v.harvestDirtyRing()).toEqual([{ slot: 0, asId: 0, offset: 7n }]);
      vm.resetDirtyRings();
      expect(v.harvestDirtyRing()).toEqual([]);
    } finally {
      vm.close();
    }
  });

  it('reads VM and vCPU stats by name, with deltas', async () => {
    const vm = realMode(kvm, [0x90, 0x90, 0x90, 0xf4]);
    try {
      const v = vm.vcpus[0]!;
      const s = v.stats();
      expect(s.has('exits')).toBe(true);
      const before = s.read();
      await v.run();
      const after = s.read();
      expect((after.get('exits') as bigint) - (before.get('exits') as bigint)).toBeGreaterThan(0n);
      expect(vm.stats().descs.map((d) => d.name)).toContain('remote_tlb_flush');
    } finally {
      vm.close();
    }
  });

  it('creates and closes VMs without leaking fds', async () => {
    const start = fds();
    for (let i = 0; i < 50; i++) {
      const vm = realMode(kvm, [0xf4]);
      await vm.vcpus[0]!.run();
      vm.stats();
      vm.close();
    }
    expect(fds()).toBe(start);
  });

  it('creates VMs while signals keep arriving (KVM_CREATE_VM is retried after EINTR)', () => {
    // The CPU profiler interrupts the process every 10 µs with SIGPROF;
    // without the retry, one of 300 KVM_CREATE_VMs fails with EINTR.
    const dir = mkdtempSync(join(tmpdir(), 'kvmharness-eintr-'));
    try {
      const kvmJs = new URL('../dist/src/kvm/kvm.js', import.meta.url).href;
      const localJs = new URL('../dist/src/target/local.js', import.meta.url).href;
      const script = [
        `const { Kvm } = await import(${JSON.stringify(kvmJs)});`,
        `const { localTarget } = await import(${JSON.stringify(localJs)});`,
        "const k = Kvm.open(localTarget); for (let i = 0; i < 300; i++) k.createVm().close(); k.close(); console.log('done');",
      ].join(' ');
      const r = spawnSync(
        process.execPath,
        ['--cpu-prof', '--cpu-prof-interval', '10', '--cpu-prof-dir', dir, '--input-type=module', '-e', script],
        { encoding: 'utf8' },
      );
      expect(r.stderr).not.toContain('EINTR');
      expect(r.stdout.trim()).toBe('done');
      expect(r.status).toBe(0);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('moves and deletes memslots and sees the new layout', () => {
    const vm = kvm.createVm();
    try {
      vm.addMemslot({ slot: 3, gpa: 0x100000n, size: 0x2000 });
      vm.mem.write64(0x100008n, 0xabcn);
      vm.moveMemslot(3, 0x200000n);
      expect(vm.mem.read64(0x200008n)).toBe(0xabcn);
      expect(() => vm.mem.read64(0x100008n)).toThrow(/not inside one memslot/);
      vm.deleteMemslot(3);
      expect(vm.slots.size).toBe(0);
    } finally {
      vm.close();
    }
  });

  it('creates a guest_memfd where KVM offers one, or says why not', () => {
    const vm = kvm.createVm();
    try {
      if (!vm.checkExtension(CAP.KVM_CAP_GUEST_MEMFD)) return;
      // The default VM type may refuse guest_memfd; either outcome is named.
      try {
        const fd = vm.createGuestMemfd(0x10000n);
        expect(fd).toBeGreaterThan(0);
      } catch (e) {
        expect((e as Error).message).toMatch(/^KVM_CREATE_GUEST_MEMFD failed: E[A-Z]+/);
      }
    } finally {
      vm.close();
    }
  });
});

describeKvm('host memory behind memslots', () => {
  let kvm: Kvm;
  beforeAll(() => {
    kvm = Kvm.open(localTarget);
  });
  afterAll(() => kvm.close());

  it('MADV_DONTNEED drops anonymous pages: the guest then reads zeroes', async () => {
    // mov al, [0x3000]; out 0x10, al; hlt
    const vm = realMode(kvm, [0xa0, 0x00, 0x30, 0xe6, 0x10, 0xf4]);
    try {
      vm.mem.write(0x3000n, [0x5a]);
      vm.memslot(0).madvise(0x3000, 0x1000, MADV.DONTNEED);
      const r = await vm.vcpus[0]!.run();
      expect(r.exit.reason === 'io' && [...r.exit.data]).toEqual([0]);
    } finally {
      vm.close();
    }
  });

  it("the bring-up slot 0 is MADV_NOHUGEPAGE: khugepaged leaves the harness's own pages alone", () => {
    if (process.arch !== 'x64') return;
    const g = X86Guest.create(kvm);
    try {
      const flags = g.vm.memslot(0).vmFlags();
      expect(flags, 'VmFlags of slot 0 in /proc/self/smaps').toContain('nh');
      expect(flags).not.toContain('hg');
    } finally {
      g.close();
    }
  });

  it('punching a hole in a memfd backing zeroes it for host and guest', async () => {
    const vm = kvm.createVm();
    try {
      const s = vm.addMemslot({ slot: 0, gpa: 0n, size: 0x10000, backing: { kind: 'memfd' } });
      expect(s.memfd).toBeGreaterThan(0);
      vm.mem.write(0x4000n, [1, 2, 3, 4]);
      s.punchHole(0x4000, 0x1000);
      expect([...vm.mem.bytes(0x4000n, 4)]).toEqual([0, 0, 0, 0]);
    } finally {
      vm.close();
    }
  });

  it('names bad ranges and missing backings', () => {
    const vm = kvm.createVm();
    try {
      const s = vm.addMemslot({ slot: 0, gpa: 0n, size: 0x4000 });
      expect(() => s.madvise(0x3000, 0x2000, MADV.DONTNEED)).toThrow(
        /madvise: range \+0x3000\/0x2000 is not page-aligned inside memslot 0/,
      );
      expect(() => s.punchHole(0, 0x1000)).toThrow(/memslot 0 is not backed by a memfd/);
      expect(() => vm.addMemslot({ slot: 1, gpa: 0x10000n, size: 0x1001 })).toThrow(
        /memslot 1: size 0x1001 is not a positive multiple of 4 KiB/,
      );
    } finally {
      vm.close();
    }
  });

  it('hugetlb backing works or fails naming mmap and the errno', () => {
    const vm = kvm.createVm();
    try {
      try {
        const s = vm.addMemslot({ slot: 0, gpa: 0n, size: 0x200000, backing: { kind: 'hugetlb', pageSize: '2M' } });
        expect(s.size).toBe(0x200000);
      } catch (e) {
        expect((e as Error).message).toMatch(/^mmap\(hugetlb 2M\) failed: E[A-Z]+/);
      }
    } finally {
      vm.close();
    }
  });
});

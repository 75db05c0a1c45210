// Host memory behind memslots: the model's mprotect / remap rules
// (HostMm.protect, HostMm.remap, and what Tdp.fault makes of them), the real
// munmap / remap / mprotect of part of a slot (Memslot), and the stats
// expectation syntax (src/scenario/stats.ts).
import { describe, expect, it } from 'vitest';
import { Kvm } from '../src/kvm/kvm.js';
import { localTarget } from '../src/target/local.js';
import { KvmError } from '../src/kvm/sys.js';
import { PROT } from '../src/uapi/uapi.js';
import { Memslots, type Memslot } from '../src/model/memslots.js';
import { Tdp } from '../src/model/tdp.js';
import { parseStatExpect, showStatExpect, statClass, statHolds, statNotApplicable } from '../src/scenario/stats.js';
import type { HostProfile } from '../src/probe/probe.js';
import { describeKvm } from './support/kvm.js';

const HVA = 0x7f0000000000n;
const slot = (): Memslot => ({
  slot: 1,
  asId: 0,
  baseGfn: 0x1000,
  npages: 16,
  hva: HVA,
  flags: { logDirty: false, readonly: false },
  backing: { kind: 'anon', pageSize: 4096 },
});

describe('host memory model: mprotect and remap', () => {
  it('PROT_READ lets reads map the page read-only and fails writes; read-write restores', () => {
    const tdp = new Tdp(new Memslots(), { record: false });
    tdp.setMemslot(slot());
    expect(tdp.fault(0, 0x1001, { write: true }).kind).toBe('map');
    tdp.host.protect(HVA + 0x1000n, HVA + 0x2000n, 'read');
    const { ranges } = tdp.invalidateHva(HVA + 0x1000n, HVA + 0x2000n, 'mprotect');
    expect(ranges.map((r) => [r.start, r.end])).toEqual([[0x1001, 0x1002]]);
    expect(tdp.lookup(0, 0x1001)).toBeUndefined();
    expect(tdp.fault(0, 0x1001).kind).toBe('map');
    expect(tdp.fault(0, 0x1001, { write: true }).kind).toBe('efault');
    // The neighbour keeps its mapping and its write access.
    expect(tdp.fault(0, 0x1000, { write: true }).kind).toBe('map');
    expect(tdp.fault(0, 0x1000, { write: true }).kind).toBe('spurious');
    tdp.host.protect(HVA + 0x1000n, HVA + 0x2000n, 'read-write');
    tdp.invalidateHva(HVA + 0x1000n, HVA + 0x2000n, 'mprotect');
    expect(tdp.fault(0, 0x1001, { write: true }).kind).toBe('map');
  });

  it('PROT_NONE fails every access', () => {
    const tdp = new Tdp(new Memslots(), { record: false });
    tdp.setMemslot(slot());
    tdp.host.protect(HVA, HVA + 0x1000n, 'none');
    expect(tdp.fault(0, 0x1000).kind).toBe('efault');
    expect(tdp.fault(0, 0x1000, { write: true }).kind).toBe('efault');
  });

  it('munmap fails faults until a remap of the range; a partial remap leaves the rest unmapped', () => {
    const tdp = new Tdp(new Memslots(), { record: false });
    tdp.setMemslot(slot());
    for (const gfn of [0x1002, 0x1003, 0x1004]) expect(tdp.fault(0, gfn, { write: true }).kind).toBe('map');
    const { ranges } = tdp.invalidateHva(HVA + 0x2000n, HVA + 0x5000n, 'munmap');
    expect(ranges.map((r) => [r.start, r.end])).toEqual([[0x1002, 0x1005]]);
    for (const gfn of [0x1002, 0x1003, 0x1004]) expect(tdp.fault(0, gfn).kind).toBe('efault');
    tdp.host.remap(HVA + 0x3000n, HVA + 0x4000n);
    expect(tdp.fault(0, 0x1002).kind).toBe('efault');
    expect(tdp.fault(0, 0x1003).kind).toBe('map');
    expect(tdp.fault(0, 0x1004).kind).toBe('efault');
  });

  it('a TDP model with zapOneShort keeps the last page of a munmap mapped (what the engine test catches)', () => {
    const tdp = new Tdp(new Memslots(), { record: false, wrong: { zapOneShort: true } });
    tdp.setMemslot(slot());
    tdp.fault(0, 0x1002, { write: true });
    tdp.invalidateHva(HVA + 0x2000n, HVA + 0x3000n, 'munmap');
    expect(tdp.fault(0, 0x1002).kind).toBe('spurious');
  });
});

describe('stats expectations', () => {
  it('parses exact deltas, ranges and signs, and rejects the rest', () => {
    expect(parseStatExpect(3)).toEqual({ op: '=', delta: 3n });
    expect(parseStatExpect(-2)).toEqual({ op: '=', delta: -2n });
    expect(parseStatExpect('+3')).toEqual({ op: '=', delta: 3n });
    expect(parseStatExpect('-2')).toEqual({ op: '=', delta: -2n });
    expect(parseStatExpect('0')).toEqual({ op: '=', delta: 0n });
    expect(parseStatExpect('>=1')).toEqual({ op: '>=', delta: 1n });
    expect(parseStatExpect('<=0')).toEqual({ op: '<=', delta: 0n });
    for (const bad of ['>1', '=1', '01', '1.5', '', ' 1', true, null, 1.5])
      expect(typeof parseStatExpect(bad), String(bad)).toBe('string');
    for (const v of [3, -2, 0, '>=1', '<=7'])
      expect(parseStatExpect(showStatExpect(parseStatExpect(v) as never))).toEqual(parseStatExpect(v));
  });

  it('decides each kind of expectation', () => {
    expect(statHolds({ op: '=', delta: 1n }, 1n)).toBe(true);
    expect(statHolds({ op: '=', delta: 1n }, 2n)).toBe(false);
    expect(statHolds({ op: '>=', delta: 1n }, 0n)).toBe(false);
    expect(statHolds({ op: '>=', delta: 1n }, 5n)).toBe(true);
    expect(statHolds({ op: '<=', delta: 0n }, -3n)).toBe(true);
    expect(statHolds({ op: '<=', delta: 0n }, 1n)).toBe(false);
  });

  it('is applicable by class: fault stats with stats_faults, shadow stats without TDP, the rest with a stats fd', () => {
    const host = (stats: boolean, tdp: boolean, fd = 1) =>
      ({
        capabilities: { KVM_CAP_BINARY_STATS_FD: fd },
        tdp: { enabled: tdp, kind: tdp ? 'npt' : 'none' },
        oracles: { stats_faults: { available: stats, why: stats ? 'yes' : 'kvm_pvm: no' } },
      }) as unknown as HostProfile;
    expect(statClass('pf_fixed')).toBe('fault');
    expect(statClass('mmu_shadow_zapped')).toBe('shadow');
    expect(statClass('mmio_exits')).toBe('general');
    expect(statNotApplicable('pf_fixed', host(false, false), true)).toBe('stats_faults: kvm_pvm: no');
    expect(statNotApplicable('pf_fixed', host(true, true), true)).toBeUndefined();
    expect(statNotApplicable('mmu_shadow_zapped', host(true, true), true)).toMatch(/uses TDP/);
    expect(statNotApplicable('mmu_shadow_zapped', host(false, false), true)).toBeUndefined();
    expect(statNotApplicable('mmio_exits', host(false, false), true)).toBeUndefined();
    expect(statNotApplicable('mmio_exits', host(false, false), false)).toMatch(/no stat mmio_exits/);
    expect(statNotApplicable('mmio_exits', host(false, false, 0), true)).toMatch(/no binary stats fd/);
  });
});

describeKvm('munmap, remap and mprotect of part of a memslot', () => {
  it('unmapped and protected pages are refused by GuestMemory, and remap brings fresh memory back', () => {
    const kvm = Kvm.open(localTarget);
    const vm = kvm.createVm();
    try {
      const s = vm.addMemslot({ slot: 1, gpa: 0x1000000n, size: 0x4000 });
      vm.mem.write64(0x1001000n, 0x1234n);
      vm.mem.write64(0x1002000n, 0x5678n);
      s.munmap(0x1000, 0x1000);
      expect(() => vm.mem.read64(0x1001000n)).toThrow(/host memory behind it is unmapped/);
      expect(vm.mem.read64(0x1002000n)).toBe(0x5678n);
      // madvise on unmapped memory fails in the kernel (ENOMEM), named by the call.
      expect(() => s.madvise(0x1000, 0x1000, 4)).toThrow(KvmError);
      s.remap(0x1000, 0x1000);
      expect(vm.mem.read64(0x1001000n)).toBe(0n);
      s.mprotect(0x2000, 0x1000, PROT.READ);
      expect(vm.mem.read64(0x1002000n)).toBe(0x5678n);
      expect(() => vm.mem.write64(0x1002000n, 1n)).toThrow(/prot-read/);
      s.mprotect(0x2000, 0x1000, PROT.NONE);
      expect(() => vm.mem.read64(0x1002000n)).toThrow(/prot-none/);
      s.mprotect(0x2000, 0x1000, PROT.READ | PROT.WRITE);
      vm.mem.write64(0x1002000n, 9n);
      expect(vm.mem.read64(0x1002000n)).toBe(9n);
    } finally {
      vm.close();
      kvm.close();
    }
  });

  it("hugeBytes reads the slot's AnonHugePages: none for 4K anonymous memory", () => {
    const kvm = Kvm.open(localTarget);
    const vm = kvm.createVm();
    try {
      const s = vm.addMemslot({ slot: 1, gpa: 0x1000000n, size: 0x400000, backing: { kind: 'anon', thp: false } });
      vm.mem.write64(0x1000000n, 1n);
      expect(s.hugeBytes()).toBe(0);
      const t = vm.addMemslot({ slot: 2, gpa: 0x2000000n, size: 0x400000, backing: { kind: 'anon', thp: true } });
      vm.mem.write64(0x2000000n, 1n);
      // Whether the kernel found a huge page is up to it; the count is whole huge pages.
      expect((t.hugeBytes() ?? -1) % 0x200000).toBe(0);
    } finally {
      vm.close();
      kvm.close();
    }
  });

  it('a memfd page comes back with the file data', () => {
    const kvm = Kvm.open(localTarget);
    const vm = kvm.createVm();
    try {
      const s = vm.addMemslot({ slot: 1, gpa: 0x1000000n, size: 0x2000, backing: { kind: 'memfd' } });
      vm.mem.write64(0x1001000n, 0xabcdn);
      s.munmap(0x1000, 0x1000);
      s.remap(0x1000, 0x1000);
      expect(vm.mem.read64(0x1001000n)).toBe(0xabcdn);
    } finally {
      vm.close();
      kvm.close();
    }
  });

  it('a detached memslot is gone from KVM but its memory stays readable until the VM closes', () => {
    const kvm = Kvm.open(localTarget);
    const vm = kvm.createVm();
    try {
      vm.addMemslot({ slot: 1, gpa: 0x1000000n, size: 0x1000 });
      vm.mem.write64(0x1000000n, 0x77n);
      const gone = vm.detachMemslot(1);
      expect(vm.mem.slotOf(0x1000000n)).toBeUndefined();
      expect(new DataView(gone.memory).getBigUint64(0, true)).toBe(0x77n);
      // KVM has no slot 1 any more: deleting it again is refused.
      expect(() => vm.setUserMemoryRegion(1, 0, 0x1000000n, 0n, 0n)).toThrow(/EINVAL/);
    } finally {
      vm.close();
      kvm.close();
    }
  });
});

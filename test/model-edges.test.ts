// Edges of the model VM and the host memory model that the scenario tests reach only in passing:
// the reasons KVM_CLEAR_DIRTY_LOG is refused, pre-fault stopping at missing memory, the VMM's
// writes beside mapped pages, remapping part of an unmapped range, and which pages KVM's fast
// write path may take.
import { describe, expect, it } from 'vitest';
import { HostMm } from '../src/model/host-mm.js';
import { Memslots } from '../src/model/memslots.js';
import { clearDirtyRefusal, declaredSlot, ModelVm } from '../src/model/vm.js';

const H = 0x7f0000000000n;
const GPA = 0x100000000n;
const anon = (slot: number, gpa: bigint, size: bigint, logDirty = false) =>
  declaredSlot({ slot, gpa, size, backing: 'anon', logDirty, readonly: false }, H);

describe('clearDirtyRefusal (kvm_clear_dirty_log_protect)', () => {
  it('names each reason KVM refuses a clear with EINVAL, and accepts the rest', () => {
    expect(clearDirtyRefusal(130, 1, 64)).toBe('first page 1 is not a multiple of 64');
    expect(clearDirtyRefusal(130, 192, 0)).toBe("pages [192, 192) run past the slot's 130");
    expect(clearDirtyRefusal(130, 64, 67)).toBe("pages [64, 131) run past the slot's 130");
    expect(clearDirtyRefusal(130, 64, 10)).toBe("10 pages is not a multiple of 64 and does not reach the slot's end");
    expect(clearDirtyRefusal(130, 64, 66)).toBeUndefined();
    expect(clearDirtyRefusal(130, 128, 2)).toBeUndefined();
    expect(clearDirtyRefusal(130, 0, 64)).toBeUndefined();
    expect(clearDirtyRefusal(128, 128, 0)).toBeUndefined();
  });
});

describe('ModelVm edges', () => {
  it('stops a pre-fault at the first page without host memory, and says where', () => {
    const vm = new ModelVm();
    vm.setSlot(anon(1, GPA, 0x10000n));
    vm.change(1, 0x2000n, 0x1000n, 'munmap');
    expect(vm.preFault(GPA, 0x4000n)).toEqual({ note: 'model: pre-fault 2 map, 1 efault', efault: GPA + 0x2000n });
    expect(vm.preFault(GPA + 0x3000n, 0x1000n)).toEqual({ note: 'model: pre-fault 1 map' });
  });

  it('counts as zapped only the zero-page mappings a VMM write replaces, not the pages it leaves mapped', () => {
    const vm = new ModelVm();
    vm.setSlot(anon(1, GPA, 0x10000n));
    vm.fault(GPA, 'read');
    vm.fault(GPA + 0x1000n, 'write');
    vm.fault(GPA + 0x2000n, 'read');
    expect(vm.hostWrite(GPA, 0x3000n)).toBe(
      'model: the host writes 3 pages, none logged dirty; 2 mapped pages zapped (zero pages replaced)',
    );
  });
});

describe('HostMm edges', () => {
  const mm = () => {
    const slots = new Memslots({ asIds: 2, maxGfn: 2 ** 36 });
    const m = declaredSlot({ slot: 1, gpa: GPA, size: 0x10000n, backing: 'anon', logDirty: false, readonly: false }, H);
    slots.set(m);
    return { host: new HostMm(slots), m };
  };

  it('remapping part of an unmapped range gives back only that part', () => {
    const { host, m } = mm();
    host.invalidate(H + 0x1000n, H + 0x5000n, 'munmap');
    host.remap(H + 0x2000n, H + 0x3000n);
    const ok = (page: number) => host.fault(m, H + BigInt(page) * 0x1000n, true) !== undefined;
    expect([0, 1, 2, 3, 4, 5].map(ok)).toEqual([true, false, true, false, false, true]);
    host.remap(H, H + 0x10000n);
    expect([1, 3, 4].map(ok)).toEqual([true, true, true]);
  });

  it('offers the fast write path only a page mapped writable now, not the zero page, a hole or a protection', () => {
    const { host, m } = mm();
    expect(host.writableNow(H)).toBeUndefined();
    host.fault(m, H, false);
    expect(host.writableNow(H)).toBeUndefined();
    host.fault(m, H + 0x1000n, true);
    expect(host.writableNow(H + 0x1000n)).toMatchObject({ level: 1, writable: true });
    host.fault(m, H + 0x2000n, true);
    host.protect(H + 0x2000n, H + 0x3000n, 'read');
    expect(host.writableNow(H + 0x2000n)).toBeUndefined();
    host.protect(H + 0x2000n, H + 0x3000n, 'read-write');
    expect(host.writableNow(H + 0x2000n)).toMatchObject({ writable: true });
    host.invalidate(H + 0x1000n, H + 0x2000n, 'munmap');
    expect(host.writableNow(H + 0x1000n)).toBeUndefined();
  });
});

// Expected values are worked out by hand from KVM's memslot rules and the
// HVA -> GFN arithmetic of kvm_handle_hva_range, not captured from the model.

import { describe, expect, test } from 'vitest';
import { HUGE_ZERO_PFN, HostMm, ZERO_PFN } from '../src/model/host-mm.js';
import {
  MemslotError,
  Memslots,
  fromRegion,
  hvaRangeOp,
  hvaRanges,
  type GfnRange,
  type Memslot,
} from '../src/model/memslots.js';
import { Tdp } from '../src/model/tdp.js';
import { MEM } from '../src/uapi/uapi.js';

const { KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY } = MEM;

const H = 0x7f0000000000n;

function slot(p: Partial<Memslot> = {}): Memslot {
  return {
    slot: 0,
    asId: 0,
    baseGfn: 0x1000,
    npages: 512,
    hva: H,
    flags: { logDirty: false, readonly: false },
    backing: { kind: 'anon', pageSize: 4096 },
    ...p,
  };
}

function rejects(fn: () => unknown, errno: string, problem: RegExp): void {
  let err: unknown;
  try {
    fn();
  } catch (e) {
    err = e;
  }
  expect(err).toBeInstanceOf(MemslotError);
  expect((err as MemslotError).errno).toBe(errno);
  expect((err as MemslotError).problem).toMatch(problem);
}

describe('memslot updates', () => {
  test('create, flags, move, no change, delete', () => {
    const ms = new Memslots();
    expect(ms.set(slot()).change).toBe('create');
    expect(ms.set(slot({ flags: { logDirty: true, readonly: false } })).change).toBe('flags');
    expect(ms.set(slot({ baseGfn: 0x3000, flags: { logDirty: true, readonly: false } })).change).toBe('move');
    expect(ms.set(slot({ baseGfn: 0x3000, flags: { logDirty: true, readonly: false } })).change).toBe('none');
    expect(ms.find(0, 0x3000 + 511)?.slot).toBe(0);
    expect(ms.find(0, 0x1000)).toBeUndefined();
    expect(ms.set(slot({ npages: 0 })).change).toBe('delete');
    expect(ms.list(0)).toEqual([]);
  });

  test('a stored slot is a copy', () => {
    const ms = new Memslots();
    const s = slot();
    ms.set(s);
    s.flags.logDirty = true;
    expect(ms.get(0, 0)!.flags.logDirty).toBe(false);
  });

  test('rejections name the problem', () => {
    const ms = new Memslots();
    ms.set(slot());
    rejects(
      () => ms.set(slot({ slot: 1, baseGfn: 0x11ff, hva: H + 0x400000n })),
      'EEXIST',
      /slot 1 overlaps slot 0 \[0x1000, 0x1200\)/,
    );
    rejects(() => ms.set(slot({ slot: 1, baseGfn: 0x2000, hva: H + 0x800n })), 'EINVAL', /not page-aligned/);
    rejects(() => ms.set(slot({ asId: 2 })), 'EINVAL', /as_id 2 is outside \[0, 2\)/);
    rejects(() => ms.set(slot({ slot: 40000 })), 'EINVAL', /slot id 40000/);
    rejects(() => ms.set(slot({ npages: 1024 })), 'EINVAL', /size of an existing slot cannot change/);
    rejects(() => ms.set(slot({ hva: H + 0x1000n })), 'EINVAL', /userspace_addr of an existing slot cannot change/);
    rejects(
      () => ms.set(slot({ flags: { logDirty: false, readonly: true } })),
      'EINVAL',
      /KVM_MEM_READONLY cannot be toggled/,
    );
    rejects(() => ms.set(slot({ slot: 2, npages: 0 })), 'EINVAL', /no slot 2 in as_id 0 to delete/);
    rejects(
      () => ms.set(slot({ slot: 3, baseGfn: 2 ** 36 - 10, hva: H + 0x10000000n })),
      'EINVAL',
      /beyond the MMU's limit/,
    );
    rejects(
      () => ms.set(slot({ slot: 3, baseGfn: 0x9000, hva: (1n << 47n) - 0x1000n })),
      'EINVAL',
      /user address space/,
    );
    rejects(
      () =>
        ms.set(
          slot({
            slot: 3,
            baseGfn: 0x9000,
            backing: { kind: 'guest_memfd', pageSize: 4096 },
            flags: { logDirty: false, readonly: true },
          }),
        ),
      'EINVAL',
      /READONLY cannot be combined with guest_memfd/,
    );
    rejects(
      () =>
        ms.set(
          slot({
            slot: 3,
            baseGfn: 0x9000,
            backing: { kind: 'guest_memfd', pageSize: 4096 },
            flags: { logDirty: true, readonly: false },
          }),
        ),
      'EINVAL',
      /dirty logging is not supported on a guest_memfd slot/,
    );
    rejects(
      () => ms.set(slot({ slot: 3, baseGfn: 0x9000, backing: { kind: 'anon', pageSize: 2 << 20 } })),
      'EINVAL',
      /anon backing cannot have page size 2097152/,
    );
    rejects(
      () =>
        ms.set(slot({ slot: 3, baseGfn: 0x9000, hva: H + 0x1000n, backing: { kind: 'hugetlb2m', pageSize: 2 << 20 } })),
      'EINVAL',
      /hugetlb mapping is aligned to and sized in 2 MiB pages/,
    );
    // A move onto another slot is refused too.
    ms.set(slot({ slot: 1, baseGfn: 0x4000, hva: H + 0x400000n }));
    rejects(() => ms.set(slot({ slot: 1, baseGfn: 0x1100, hva: H + 0x400000n })), 'EEXIST', /overlaps slot 0/);
  });

  test('fromRegion: as_id from the slot field, byte-level checks', () => {
    const s = fromRegion(
      {
        slot: (1 << 16) | 5,
        flags: KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY,
        guestPhysAddr: 0x100000000n,
        memorySize: 0x200000n,
        userspaceAddr: H,
      },
      { kind: 'anon', pageSize: 4096 },
    );
    expect([s.asId, s.slot, s.baseGfn, s.npages, s.flags.logDirty, s.flags.readonly]).toEqual([
      1,
      5,
      0x100000,
      512,
      true,
      true,
    ]);
    const r = { slot: 0, flags: 0, guestPhysAddr: 0n, memorySize: 0x1000n, userspaceAddr: H };
    const anon = { kind: 'anon', pageSize: 4096 } as const;
    rejects(() => fromRegion({ ...r, flags: 0x10 }, anon), 'EINVAL', /unknown flag bits 0x10/);
    rejects(() => fromRegion({ ...r, memorySize: 0x1800n }, anon), 'EINVAL', /memory_size is not a multiple/);
    rejects(() => fromRegion({ ...r, guestPhysAddr: 0x10n }, anon), 'EINVAL', /guest_phys_addr is not page-aligned/);
    rejects(() => fromRegion(r, { kind: 'guest_memfd', pageSize: 4096 }), 'EINVAL', /KVM_MEM_GUEST_MEMFD/);
  });

  test('find with several slots', () => {
    const ms = new Memslots();
    ms.set(slot({ slot: 0, baseGfn: 0x1000 }));
    ms.set(slot({ slot: 1, baseGfn: 0x100, hva: H + 0x200000n }));
    ms.set(slot({ slot: 2, baseGfn: 0x8000, hva: H + 0x400000n }));
    expect([0x100, 0x2ff, 0x300, 0x1000, 0x11ff, 0x8000, 0x81ff, 0x8200].map((g) => ms.find(0, g)?.slot)).toEqual([
      1,
      1,
      undefined,
      0,
      0,
      2,
      2,
      undefined,
    ]);
    expect(ms.find(1, 0x1000)).toBeUndefined();
  });
});

describe('HVA range operator', () => {
  // as0: A (hva H) and B (hva H + 2M); as1: C aliases A's memory (SMM view).
  function threeSlots(): Memslots {
    const ms = new Memslots();
    ms.set(slot({ slot: 1, baseGfn: 0x5000, hva: H + 0x200000n }));
    ms.set(slot({ slot: 0, baseGfn: 0x1000, hva: H }));
    ms.set(slot({ asId: 1, slot: 0, baseGfn: 0x1000, hva: H }));
    return ms;
  }
  const view = (r: GfnRange) => [r.asId, r.slot.slot, r.start, r.end];

  test('GFN ranges cover every page the HVA range touches', () => {
    const ms = threeSlots();
    expect([...hvaRanges(ms, H + 0x1800n, H + 0x201001n)].map(view)).toEqual([
      [0, 0, 0x1001, 0x1200],
      [0, 1, 0x5000, 0x5002],
      [1, 0, 0x1001, 0x1200],
    ]);
    expect([...hvaRanges(ms, H + 0x400000n, H + 0x500000n)]).toEqual([]);
  });

  test('stops at the first error and reports how far it got', () => {
    const ms = threeSlots();
    const called: number[][] = [];
    const r = hvaRangeOp(ms, H + 0x1800n, H + 0x201001n, (g) => {
      called.push(view(g));
      return g.slot.slot === 1 ? new Error('EFAULT') : undefined;
    });
    expect(r.error?.message).toBe('EFAULT');
    expect(r.done.map(view)).toEqual([[0, 0, 0x1001, 0x1200]]);
    expect(view(r.failed!)).toEqual([0, 1, 0x5000, 0x5002]);
    expect(called.length).toBe(2); // address space 1 never visited
    expect(ms.readers).toBe(0);

    const all = hvaRangeOp(ms, H, H + 0x400000n, () => undefined);
    expect([all.error, all.failed, all.done.length]).toEqual([undefined, undefined, 3]);
    expect(hvaRangeOp(ms, H, H, () => undefined).error).toBeInstanceOf(MemslotError);
  });

  test('the handler zaps the TDP model until the error', () => {
    const ms = new Memslots();
    const tdp = new Tdp(ms);
    tdp.setMemslot(slot({ slot: 0, baseGfn: 0x1000, hva: H }));
    tdp.setMemslot(slot({ asId: 1, slot: 0, baseGfn: 0x1000, hva: H }));
    for (const as of [0, 1]) for (const g of [0x1002, 0x1003]) tdp.fault(as, g, { write: true });
    const r = hvaRangeOp(ms, H + 0x2000n, H + 0x4000n, (g) => {
      if (g.asId === 1) return new Error('stop');
      tdp.zap(g.asId, g.start, g.end);
      return undefined;
    });
    expect(r.done.map(view)).toEqual([[0, 0, 0x1002, 0x1004]]);
    expect(tdp.mappings(0)).toEqual([]);
    expect(tdp.mappings(1)).toEqual([{ start: 0x1002, end: 0x1004, level: 1, writable: true, executable: true }]);
    expect(tdp.events.filter((e) => e.kind === 'flush')).toEqual([
      { kind: 'flush', asId: 0, ranges: [{ start: 0x1002, end: 0x1004 }] },
    ]);
  });

  test('a memslot update inside the walk is refused; an abandoned walk lets go', () => {
    const ms = threeSlots();
    expect(() =>
      hvaRangeOp(ms, H, H + 0x1000n, () => {
        ms.set(slot({ slot: 7, baseGfn: 0x9000 }));
        return undefined;
      }),
    ).toThrow(/EBUSY: memslot update inside an hvaRanges\(\) walk/);
    expect(ms.readers).toBe(0);
    expect(ms.get(0, 7)).toBeUndefined();
    for (const r of hvaRanges(ms, H, H + 0x1000n)) {
      expect(ms.readers).toBe(1);
      void r;
      break;
    }
    expect(ms.readers).toBe(0);
    expect(ms.set(slot({ slot: 7, baseGfn: 0x9000 })).change).toBe('create');
  });
});

describe('host memory', () => {
  const anon = slot();
  const thp = slot({ backing: { kind: 'thp', pageSize: 2 << 20 } });
  const memfd = slot({ backing: { kind: 'memfd', pageSize: 4096 } });
  const huge1g = slot({ npages: 512 * 512, backing: { kind: 'hugetlb1g', pageSize: 1 << 30 } });

  test('anon: zero page on read, a write replaces it and notifies its page', () => {
    const mm = new HostMm();
    expect(mm.fault(anon, H + 0x3000n, false)).toEqual({
      page: { pfn: ZERO_PFN, level: 1, writable: false },
      notify: [],
    });
    const w = mm.fault(anon, H + 0x3000n, true)!;
    expect(w.page.writable).toBe(true);
    expect(w.notify).toEqual([[H + 0x3000n, H + 0x4000n]]);
    expect(mm.fault(anon, H + 0x3000n, false)!.page).toEqual(w.page);
  });

  test('THP: huge zero page, then split on write', () => {
    const mm = new HostMm();
    expect(mm.fault(thp, H + 0x5000n, false)!.page).toEqual({ pfn: HUGE_ZERO_PFN + 5, level: 2, writable: false });
    const w = mm.fault(thp, H + 0x5000n, true)!;
    expect(w.notify).toEqual([
      [H, H + 0x200000n],
      [H + 0x5000n, H + 0x6000n],
    ]);
    expect(w.page.level).toBe(1);
    expect(mm.lookup(H + 0x6000n)).toEqual({ pfn: ZERO_PFN, level: 1, writable: false });
  });

  test('hugetlb 1G: one frame range, aligned; munmap makes faults fail', () => {
    const mm = new HostMm();
    const p = mm.fault(huge1g, H + 0x3000n, false)!.page;
    expect([p.level, p.writable, (p.pfn - 3) % (512 * 512)]).toEqual([3, true, 0]);
    expect(mm.lookup(H + 0x7000n)).toEqual({ pfn: p.pfn + 4, level: 3, writable: true });
    expect(mm.invalidate(H, H + 0x40000000n, 'munmap')).toEqual([[H, H + 0x40000000n]]);
    expect(mm.lookup(H + 0x7000n)).toBeUndefined();
    expect(mm.fault(huge1g, H + 0x2000n, false)).toBeUndefined();
  });

  test('DONTNEED keeps page-cache pages, punch-hole drops them, mprotect keeps all', () => {
    const mm = new HostMm();
    const p = mm.fault(memfd, H, true)!.page;
    mm.invalidate(H, H + 0x1000n, 'dontneed');
    expect(mm.lookup(H)).toEqual(p);
    mm.invalidate(H, H + 0x1000n, 'mprotect');
    expect(mm.lookup(H)).toEqual(p);
    mm.invalidate(H, H + 0x1000n, 'punch_hole');
    expect(mm.lookup(H)).toBeUndefined();
  });
});

describe('memslot checks at their boundaries', () => {
  // KVM_MEM_MAX_NR_PAGES is (1 << 31) - 1; the user address space ends at 2^47 - 4096 (TASK_SIZE_MAX).
  const accepts = (ms: Memslots, s: Memslot) => expect(ms.set(s).change).toBe('create');

  test('a slot of KVM_MEM_MAX_NR_PAGES pages is accepted, one page more is not', () => {
    accepts(new Memslots(), slot({ baseGfn: 0, npages: 2 ** 31 - 1, hva: 0n }));
    rejects(() => new Memslots().set(slot({ baseGfn: 0, npages: 2 ** 31, hva: 0n })), 'EINVAL', /2147483648 pages/);
    rejects(() => new Memslots().set(slot({ npages: -1 })), 'EINVAL', /-1 pages is not a valid size/);
    rejects(() => new Memslots().set(slot({ npages: 1.5 })), 'EINVAL', /1\.5 pages is not a valid size/);
  });

  test('the address space and slot id are integers inside their ranges', () => {
    const ms = new Memslots({ asIds: 2, maxSlots: 4 });
    rejects(() => ms.set(slot({ asId: -1 })), 'EINVAL', /as_id -1 is outside \[0, 2\)/);
    rejects(() => ms.set(slot({ asId: 0.5 })), 'EINVAL', /as_id 0\.5/);
    rejects(() => ms.set(slot({ slot: -1 })), 'EINVAL', /slot id -1 is outside \[0, 4\)/);
    rejects(() => ms.set(slot({ slot: 0.5 })), 'EINVAL', /slot id 0\.5/);
    rejects(() => ms.set(slot({ slot: 4 })), 'EINVAL', /slot id 4 is outside \[0, 4\)/);
    accepts(ms, slot({ slot: 3, asId: 1 }));
    expect(ms.list(7)).toEqual([]);
  });

  test('the base GFN is a frame number, and a slot may end exactly at the MMU limit', () => {
    rejects(() => new Memslots().set(slot({ baseGfn: -1 })), 'EINVAL', /base GFN -1 is not a frame number/);
    rejects(() => new Memslots().set(slot({ baseGfn: 0.5 })), 'EINVAL', /base GFN 0\.5/);
    accepts(new Memslots(), slot({ baseGfn: 0 }));
    accepts(new Memslots({ maxGfn: 0x2000 }), slot({ baseGfn: 0x2000 - 512 }));
    rejects(() => new Memslots({ maxGfn: 0x2000 }).set(slot({ baseGfn: 0x2000 - 511 })), 'EINVAL', /MMU's limit/);
  });

  test('the HVA range may end exactly at the end of the user address space, and starts at or above 0', () => {
    const limit = (1n << 47n) - 0x1000n;
    accepts(new Memslots(), slot({ hva: limit - 512n * 0x1000n }));
    rejects(() => new Memslots().set(slot({ hva: (1n << 47n) - 512n * 0x1000n })), 'EINVAL', /access_ok/);
    rejects(() => new Memslots().set(slot({ hva: -0x1000n })), 'EINVAL', /access_ok/);
    accepts(new Memslots(), slot({ hva: 0n }));
    accepts(new Memslots({ hvaLimit: 0x300000n }), slot({ hva: 0x100000n }));
  });

  test('memfd and guest_memfd take 4 KiB or 2 MiB pages; hugetlb is aligned to and sized in its pages', () => {
    for (const kind of ['memfd', 'guest_memfd'] as const)
      for (const pageSize of [4096, 2 << 20]) accepts(new Memslots(), slot({ backing: { kind, pageSize } }));
    rejects(
      () => new Memslots().set(slot({ backing: { kind: 'memfd', pageSize: 1 << 30 } })),
      'EINVAL',
      /memfd backing cannot have page size 1073741824/,
    );
    const g1 = { kind: 'hugetlb1g', pageSize: 1 << 30 } as const;
    accepts(new Memslots(), slot({ baseGfn: 0x40000, npages: 0x40000, backing: g1 }));
    rejects(
      () => new Memslots().set(slot({ baseGfn: 0x40000, npages: 0x40000, hva: H + 0x200000n, backing: g1 })),
      'EINVAL',
      /in 1024 MiB pages/,
    );
    rejects(
      () => new Memslots().set(slot({ npages: 256, backing: { kind: 'hugetlb2m', pageSize: 2 << 20 } })),
      'EINVAL',
      /in 2 MiB pages/,
    );
  });

  test('the backing of an existing slot cannot change, neither its kind nor its page size', () => {
    const ms = new Memslots();
    ms.set(slot({ backing: { kind: 'memfd', pageSize: 4096 } }));
    rejects(() => ms.set(slot({ backing: { kind: 'anon', pageSize: 4096 } })), 'EINVAL', /backing of an existing/);
    rejects(() => ms.set(slot({ backing: { kind: 'memfd', pageSize: 2 << 20 } })), 'EINVAL', /backing of an existing/);
  });

  test('a slot may move onto part of its own old range and sit right next to another', () => {
    // kvm_check_memslot_overlap skips the slot being moved.
    const ms = new Memslots();
    ms.set(slot({ slot: 0, baseGfn: 0x1000 }));
    expect(ms.set(slot({ slot: 0, baseGfn: 0x1100 })).change).toBe('move');
    accepts(ms, slot({ slot: 1, baseGfn: 0x1100 - 512, hva: H + 0x400000n }));
    accepts(ms, slot({ slot: 2, baseGfn: 0x1300, hva: H + 0x800000n }));
  });

  test('a lookup after a delete or a move does not find the slot where it was', () => {
    const ms = new Memslots();
    ms.set(slot({ slot: 0, baseGfn: 0x1000 }));
    ms.set(slot({ slot: 1, baseGfn: 0x1200, hva: H + 0x400000n }));
    expect(ms.find(0, 0x1000)?.slot).toBe(0);
    expect(ms.find(0, 0x1200)?.slot).toBe(1);
    expect(ms.find(0, 0x11ff)?.slot).toBe(0);
    expect(ms.find(0, 0x13ff)?.slot).toBe(1);
    expect(ms.find(0, 0x1400)).toBeUndefined();
    ms.set(slot({ slot: 1, baseGfn: 0x3000, hva: H + 0x400000n }));
    expect(ms.find(0, 0x1200)).toBeUndefined();
    expect(ms.find(0, 0x1000)?.slot).toBe(0);
    ms.set(slot({ slot: 0, npages: 0 }));
    expect(ms.find(0, 0x1000)).toBeUndefined();
  });

  test('a rejection is a MemslotError whose message starts with the errno', () => {
    let err: unknown;
    try {
      new Memslots().set(slot({ slot: 9, npages: 0 }));
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(MemslotError);
    expect((err as Error).name).toBe('MemslotError');
    expect((err as Error).message).toBe('EINVAL: no slot 9 in as_id 0 to delete');
  });
});

describe('fromRegion at its boundaries', () => {
  const r = { slot: 0, flags: 0, guestPhysAddr: 0n, memorySize: 0x1000n, userspaceAddr: H };
  const anon = { kind: 'anon', pageSize: 4096 } as const;

  test('KVM_MEM_GUEST_MEMFD goes with a guest_memfd backing and only with it', () => {
    rejects(() => fromRegion({ ...r, flags: MEM.KVM_MEM_GUEST_MEMFD }, anon), 'EINVAL', /KVM_MEM_GUEST_MEMFD/);
    expect(fromRegion({ ...r, flags: MEM.KVM_MEM_GUEST_MEMFD }, { kind: 'guest_memfd', pageSize: 4096 }).npages).toBe(
      1,
    );
  });

  test('an unaligned userspace_addr is refused', () => {
    rejects(() => fromRegion({ ...r, userspaceAddr: H + 8n }, anon), 'EINVAL', /userspace_addr is not page-aligned/);
  });

  test('a range that reaches 2^64 wraps (u64 arithmetic), one page lower does not', () => {
    rejects(
      () => fromRegion({ ...r, guestPhysAddr: (1n << 64n) - 0x1000n }, anon),
      'EINVAL',
      /guest_phys_addr \+ memory_size wraps/,
    );
    expect(fromRegion({ ...r, guestPhysAddr: (1n << 64n) - 0x2000n }, anon).baseGfn).toBe(2 ** 52 - 2);
  });
});

describe('HVA ranges at their boundaries', () => {
  const view = (g: GfnRange) => [g.asId, g.slot.slot, g.start, g.end];

  test('an empty range touches no page, and the op refuses it with EINVAL', () => {
    const ms = new Memslots();
    ms.set(slot());
    expect([...hvaRanges(ms, H + 0x1000n, H + 0x1000n)]).toEqual([]);
    const r = hvaRangeOp(ms, H + 0x2000n, H + 0x1000n, () => undefined);
    expect((r.error as MemslotError).problem).toBe('empty or inverted HVA range');
    expect(r.done).toEqual([]);
  });

  test('slots are visited in HVA order, aliases of one HVA by slot id; a range ending at a slot misses it', () => {
    const ms = new Memslots();
    ms.set(slot({ slot: 0, baseGfn: 0x1000, hva: H + 0x200000n }));
    ms.set(slot({ slot: 2, baseGfn: 0x2000, hva: H }));
    ms.set(slot({ slot: 1, baseGfn: 0x3000, hva: H }));
    expect([...hvaRanges(ms, H, H + 0x400000n)].map(view)).toEqual([
      [0, 1, 0x3000, 0x3200],
      [0, 2, 0x2000, 0x2200],
      [0, 0, 0x1000, 0x1200],
    ]);
    expect([...hvaRanges(ms, H + 0x1ff000n, H + 0x200000n)].map(view)).toEqual([
      [0, 1, 0x31ff, 0x3200],
      [0, 2, 0x21ff, 0x2200],
    ]);
  });
});

describe('host memory: huge pages, splits and ranges', () => {
  const M2 = 0x200000n;
  const at = (p: Partial<Memslot>) => slot({ npages: 512 * 64, ...p });
  const thp = at({ backing: { kind: 'thp', pageSize: 2 << 20 } });
  const memfd2m = at({ backing: { kind: 'memfd', pageSize: 2 << 20 } });
  const anon = at({});

  test('hugetlb is never split: a partial DONTNEED drops the whole huge page, without a split notification', () => {
    for (const [kind, size] of [
      ['hugetlb2m', 2 << 20],
      ['hugetlb1g', 1 << 30],
    ] as const) {
      const mm = new HostMm();
      const s = slot({ npages: size / 4096, backing: { kind, pageSize: size } });
      expect(mm.fault(s, H, true)!.page.level).toBe(kind === 'hugetlb2m' ? 2 : 3);
      expect(mm.invalidate(H + 0x1000n, H + 0x2000n, 'dontneed')).toEqual([[H + 0x1000n, H + 0x2000n]]);
      expect(mm.lookup(H)).toBeUndefined();
    }
  });

  test('frames are handed out in allocation order, a THP aligned to 512 frames', () => {
    const mm = new HostMm();
    const a = mm.fault(anon, H, true)!.page.pfn;
    const b = mm.fault(anon, H + 0x1000n, true)!.page.pfn;
    const t = mm.fault(thp, H + 4n * M2, true)!.page;
    expect(b).toBe(a + 1);
    expect(t.level).toBe(2);
    expect(t.pfn % 512).toBe(0);
    expect(t.pfn).toBeGreaterThan(b);
  });

  test('DONTNEED drops an anonymous zero-page mapping', () => {
    const mm = new HostMm();
    mm.fault(anon, H, false);
    expect(mm.lookup(H)?.pfn).toBe(ZERO_PFN);
    mm.invalidate(H, H + 0x1000n, 'dontneed');
    expect(mm.lookup(H)).toBeUndefined();
  });

  test('a 2 MiB block that holds a 4 KiB mapping gets no PMD; one freed whole may get a PMD again', () => {
    // anon and thp slots over the same host memory: the anon write maps one 4 KiB page at H + 0x3000.
    const mm = new HostMm();
    mm.fault(anon, H + 0x3000n, true);
    expect(mm.fault(thp, H + 0x5000n, false)!.page.level).toBe(1);
    const mm2 = new HostMm();
    expect(mm2.fault(thp, H, true)!.page.level).toBe(2);
    mm2.invalidate(H, H + M2, 'dontneed');
    expect(mm2.fault(thp, H + 0x1000n, true)!.page.level).toBe(2);
  });

  test('a THP block must lie wholly inside the VMA', () => {
    const mm = new HostMm();
    const off = slot({ hva: H + 0x1000n, npages: 1024, backing: { kind: 'thp', pageSize: 2 << 20 } });
    expect(mm.fault(off, H + 0x1000n, true)!.page.level).toBe(1);
    expect(mm.fault(off, H + M2, true)!.page.level).toBe(2);
    const short = slot({ npages: 768, backing: { kind: 'thp', pageSize: 2 << 20 } });
    expect(new HostMm().fault(short, H + M2, true)!.page.level).toBe(1);
    expect(new HostMm().fault(short, H, true)!.page.level).toBe(2);
  });

  test('an empty invalidation notifies nothing', () => {
    expect(new HostMm().invalidate(H, H, 'munmap')).toEqual([]);
  });

  test('a THP covered whole goes without a split; one covered in part is split first and keeps its other frames', () => {
    const whole = new HostMm();
    whole.fault(thp, H, true);
    expect(whole.invalidate(H - M2, H + M2, 'munmap')).toEqual([[H - M2, H + M2]]);
    expect(whole.lookup(H + 0x1000n)).toBeUndefined();
    const exact = new HostMm();
    exact.fault(thp, H, true);
    expect(exact.invalidate(H, H + M2, 'dontneed')).toEqual([[H, H + M2]]);
    expect(exact.lookup(H)).toBeUndefined();

    for (const [s, e] of [
      [H + 0x1000n, H + 0x2000n],
      [H, H + 0x1000n],
      [H + 0x1ff000n, H + M2 + 0x1000n],
    ]) {
      const mm = new HostMm();
      const pfn = mm.fault(thp, H, true)!.page.pfn;
      expect(mm.invalidate(s!, e!, 'dontneed')).toEqual([
        [H, H + M2],
        [s, e],
      ]);
      expect(mm.lookup(s!)).toBeUndefined();
      const other = s === H ? H + 0x2000n : H;
      expect(mm.lookup(other)).toEqual({ pfn: pfn + Number((other - H) >> 12n), level: 1, writable: true });
    }
  });

  test('a splitting write to the huge zero page maps 512 zero PTEs and nothing past the block', () => {
    const mm = new HostMm();
    mm.fault(thp, H, false);
    mm.fault(thp, H, true);
    expect(mm.lookup(H + M2 - 0x1000n)).toEqual({ pfn: ZERO_PFN, level: 1, writable: false });
    expect(mm.lookup(H + M2)).toBeUndefined();
  });

  test('DONTNEED keeps a page-cache THP covered whole; munmap drops it', () => {
    const mm = new HostMm();
    const p = mm.fault(memfd2m, H, true)!.page;
    expect(p.level).toBe(2);
    mm.invalidate(H, H + M2, 'dontneed');
    expect(mm.lookup(H)).toEqual(p);
    mm.invalidate(H, H + M2, 'munmap');
    expect(mm.lookup(H)).toBeUndefined();
  });

  test('over a long range, only the huge pages inside it are touched; partial ones split in address order', () => {
    const mm = new HostMm();
    // THPs at H + 4M (faulted first), H and H + 66M; the long range ends exactly where the last begins.
    for (const off of [4n, 0n, 66n]) mm.fault(thp, H + off * 0x100000n, true);
    expect(mm.invalidate(H + M2, H + 66n * 0x100000n, 'munmap')).toEqual([[H + M2, H + 66n * 0x100000n]]);
    expect(mm.lookup(H)!.level).toBe(2);
    expect(mm.lookup(H + 4n * 0x100000n)).toBeUndefined();
    expect(mm.lookup(H + 66n * 0x100000n)!.level).toBe(2);

    const two = new HostMm();
    for (const off of [4n, 0n]) two.fault(thp, H + off * 0x100000n, true);
    expect(two.invalidate(H + 0x1000n, H + 6n * 0x100000n - 0x1000n, 'munmap')).toEqual([
      [H, H + M2],
      [H + 2n * M2, H + 3n * M2],
      [H + 0x1000n, H + 6n * 0x100000n - 0x1000n],
    ]);
    // A short range over a hole and one huge page looks at each 2 MiB block.
    const hole = new HostMm();
    for (const off of [0n, 4n, 8n]) hole.fault(thp, H + off * 0x100000n, true);
    expect(hole.invalidate(H + M2, H + 2n * M2 + 0x1000n, 'munmap')).toEqual([
      [H + 2n * M2, H + 3n * M2],
      [H + M2, H + 2n * M2 + 0x1000n],
    ]);
  });

  test('mprotect covers exactly its pages, and read-write lifts it', () => {
    const mm = new HostMm();
    mm.protect(H, H + 0x1000n, 'none');
    expect(mm.fault(anon, H, false)).toBeUndefined();
    expect(mm.fault(anon, H + 0x1000n, false)).toBeDefined();
    mm.protect(H, H + 0x1000n, 'read-write');
    expect(mm.fault(anon, H, true)!.page.writable).toBe(true);
  });

  test('a remap revives only its own pages of an unmapped range, and lifts their protection only', () => {
    const mm = new HostMm();
    mm.invalidate(H, H + 0x3000n, 'munmap');
    mm.remap(H + 0x1000n, H + 0x2000n);
    expect([0n, 0x1000n, 0x2000n].map((o) => mm.fault(anon, H + o, false) !== undefined)).toEqual([false, true, false]);

    const edge = new HostMm();
    edge.invalidate(H, H + 0x1000n, 'munmap');
    edge.invalidate(H + 0x2000n, H + 0x3000n, 'munmap');
    edge.remap(H + 0x1000n, H + 0x2000n);
    expect([0n, 0x1000n, 0x2000n].map((o) => edge.fault(anon, H + o, false) !== undefined)).toEqual([
      false,
      true,
      false,
    ]);

    const prot = new HostMm();
    prot.protect(H, H + 0x2000n, 'none');
    prot.remap(H, H + 0x1000n);
    expect(prot.fault(anon, H, true)).toBeDefined();
    expect(prot.fault(anon, H + 0x1000n, false)).toBeUndefined();
  });
});

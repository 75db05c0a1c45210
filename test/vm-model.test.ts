// The model VM (src/model/vm.ts): slots, dirty pages, faults and host changes
// as a scenario drives them. Expected values are worked out by hand from KVM's
// rules (uapi flag bits, one GFN per 4 KiB, what a munmap or mprotect
// invalidates), not captured from the model.
import { describe, expect, it } from 'vitest';
import { SPTE_W, SPTE_X } from '../src/model/spte.js';
import { LegacyTdp } from '../src/model/legacy.js';
import { Memslots } from '../src/model/memslots.js';
import { Tdp } from '../src/model/tdp.js';
import {
  BACKINGS,
  declaredSlot,
  memFlags,
  ModelVm,
  modelSlot,
  tdpFactsOptions,
  tdpMmuOf,
  tdpModelFor,
  type MmuFacts,
} from '../src/model/vm.js';

const H = 0x7f0000000000n; // 1 GiB-aligned host address
const GPA = 0x100000000n; // 4 GiB: GFN 0x100000

const anon = (slot: number, gpa: bigint, size: bigint, logDirty = false, hva = H) =>
  declaredSlot({ slot, gpa, size, backing: 'anon', logDirty, readonly: false }, hva);

describe('memslot adapters', () => {
  it('sets KVM_MEM_LOG_DIRTY_PAGES (bit 0) and KVM_MEM_READONLY (bit 1)', () => {
    expect(memFlags({ logDirty: false, readonly: false })).toBe(0);
    expect(memFlags({ logDirty: true, readonly: false })).toBe(1);
    expect(memFlags({ logDirty: false, readonly: true })).toBe(2);
    expect(memFlags({ logDirty: true, readonly: true })).toBe(3);
  });

  it('puts the address space in bits 31:16 of the slot and counts 4 KiB pages', () => {
    const m = modelSlot(
      { slot: 3, asId: 1, gpa: 0x200000n, size: 0x3000, hva: H, flags: 3 },
      { kind: 'memfd', pageSize: 4096 },
    );
    expect(m).toEqual({
      slot: 3,
      asId: 1,
      baseGfn: 0x200,
      npages: 3,
      hva: H,
      flags: { logDirty: true, readonly: true },
      backing: { kind: 'memfd', pageSize: 4096 },
    });
  });

  it('declares a slot in address space 0 with the pages of its backing', () => {
    const d = { slot: 2, gpa: 0x40000000n, size: 0x200000n, logDirty: true, readonly: false };
    expect(declaredSlot({ ...d, backing: 'hugetlb2m' }, H)).toEqual({
      slot: 2,
      asId: 0,
      baseGfn: 0x40000,
      npages: 512,
      hva: H,
      flags: { logDirty: true, readonly: false },
      backing: { kind: 'hugetlb2m', pageSize: 2 << 20 },
    });
    // A shared mapping is page cache in 4 KiB pages, which the model takes as a memfd.
    expect(declaredSlot({ ...d, backing: 'shared' }, H).backing).toEqual({ kind: 'memfd', pageSize: 4096 });
  });

  it('allocates each backing as its name says, and anon without THP', () => {
    expect(
      Object.fromEntries(Object.entries(BACKINGS).map(([k, v]) => [k, [v.alloc, v.page.kind, v.page.pageSize]])),
    ).toEqual({
      anon: [{ kind: 'anon', thp: false }, 'anon', 4096],
      shared: [{ kind: 'shared' }, 'memfd', 4096],
      memfd: [{ kind: 'memfd' }, 'memfd', 4096],
      thp: [{ kind: 'anon', thp: true }, 'thp', 2 << 20],
      hugetlb2m: [{ kind: 'hugetlb', pageSize: '2M' }, 'hugetlb2m', 2 << 20],
      hugetlb1g: [{ kind: 'hugetlb', pageSize: '1G' }, 'hugetlb1g', 1 << 30],
      guest_memfd: [{ kind: 'guest_memfd' }, 'guest_memfd', 4096],
    });
  });
});

describe('ModelVm', () => {
  it('finds the slot that holds a whole access, and none across its end or below its start', () => {
    const vm = new ModelVm();
    vm.setSlot(anon(1, GPA, 0x10000n));
    expect(vm.slotAt(GPA + 0xf000n, 0x1000)?.slot).toBe(1);
    expect(vm.slotAt(GPA + 0xffffn, 1)?.slot).toBe(1);
    expect(vm.slotAt(GPA + 0xf000n, 0x1001)).toBeUndefined();
    expect(vm.slotAt(GPA + 0x10000n, 1)).toBeUndefined();
    expect(vm.slotAt(GPA - 1n, 1)).toBeUndefined();
  });

  it('logs the page of each write in a logging slot once, and harvesting starts a new log', () => {
    const vm = new ModelVm();
    vm.setSlot(anon(1, GPA, 0x10000n, true));
    vm.setSlot(anon(2, GPA + 0x10000n, 0x10000n, false, H + 0x10000n));
    vm.markDirty(GPA + 0x1234n);
    vm.markDirty(GPA + 0x1ff0n);
    vm.markDirty(GPA + 0x3000n);
    vm.markDirty(GPA + 0x10000n); // slot 2 does not log
    vm.markDirty(0x1000n); // no slot
    expect(vm.harvestDirty(1)).toEqual([GPA + 0x1000n, GPA + 0x3000n]);
    expect(vm.harvestDirty(1)).toEqual([]);
    expect(vm.harvestDirty(2)).toEqual([]);
  });

  it('keeps the log while logging stays on, and forgets it when logging stops or the slot goes', () => {
    const vm = new ModelVm();
    vm.setSlot(anon(1, GPA, 0x10000n, true));
    vm.markDirty(GPA);
    vm.setSlot(anon(1, GPA, 0x10000n, true));
    expect(vm.harvestDirty(1)).toEqual([GPA]);

    vm.markDirty(GPA);
    vm.setSlot(anon(1, GPA, 0x10000n, false));
    vm.setSlot(anon(1, GPA, 0x10000n, true));
    expect(vm.harvestDirty(1)).toEqual([]);

    vm.markDirty(GPA + 0x2000n);
    vm.deleteSlot(1);
    expect(vm.harvestDirty(1)).toEqual([]);
    expect(vm.slotAt(GPA, 1)).toBeUndefined();
    expect(() => vm.slot(1)).toThrow(/no memslot 1$/);
  });

  it('faults a read in read-only (the zero page) and a write in writable', () => {
    const vm = new ModelVm();
    vm.setSlot(anon(1, GPA, 0x10000n));
    const r = vm.fault(GPA, 'read');
    expect([r.kind, r.level, r.gfn, r.spte & SPTE_W]).toEqual(['map', 1, 0x100000, 0]);
    const w = vm.fault(GPA, 'write');
    expect([w.kind, w.level]).toEqual(['map', 1]);
    expect(w.spte & SPTE_W).not.toBe(0);
    expect(vm.fault(GPA, 'write').kind).toBe('spurious');
  });

  it('faults an exec access as one: under NX huge pages it maps 4 KiB where a read maps 2 MiB', () => {
    const huge = declaredSlot(
      { slot: 1, gpa: 0x40000000n, size: 0x200000n, backing: 'hugetlb2m', logDirty: false, readonly: false },
      H,
    );
    const a = new ModelVm({ nxHugePages: true });
    a.setSlot(huge);
    const x = a.fault(0x40000000n, 'exec');
    expect(x.level).toBe(1);
    expect(x.spte & SPTE_X).not.toBe(0);
    const b = new ModelVm({ nxHugePages: true });
    b.setSlot(huge);
    expect(b.fault(0x40000000n, 'read').level).toBe(2);
  });

  it('says what a munmap invalidates and how many mapped pages refault; faults there fail until a remap', () => {
    const vm = new ModelVm();
    vm.setSlot(anon(1, GPA, 0x10000n));
    for (const off of [0n, 0x1000n, 0x2000n]) vm.fault(GPA + off, 'write');
    expect(vm.change(1, 0x1000n, 0x2000n, 'munmap')).toBe(
      'model: munmap invalidates GFN [0x100001, 0x100003) of slot 1; 2 mapped pages there refault on the next access',
    );
    expect(vm.fault(GPA + 0x1000n, 'read').kind).toBe('efault');
    expect(vm.fault(GPA, 'write').kind).toBe('spurious');
    vm.remap(1, 0x2000n, 0x1000n);
    expect(vm.fault(GPA + 0x1000n, 'read').kind).toBe('efault');
    vm.remap(1, 0x1000n, 0x2000n);
    expect(vm.fault(GPA + 0x1000n, 'read').kind).toBe('map');
    expect(vm.fault(GPA + 0x2000n, 'write').kind).toBe('map');
  });

  it('counts only the pages of a huge leaf inside the range, and applies an mprotect before the zap', () => {
    const vm = new ModelVm();
    vm.setSlot(
      declaredSlot(
        { slot: 2, gpa: 0x40000000n, size: 0x200000n, backing: 'hugetlb2m', logDirty: false, readonly: false },
        H,
      ),
    );
    expect(vm.fault(0x40000000n, 'write').level).toBe(2);
    expect(vm.change(2, 0x1000n, 0x1000n, 'mprotect', 'read')).toBe(
      'model: mprotect read invalidates GFN [0x40001, 0x40002) of slot 2; 1 mapped page there refault on the next access',
    );
    expect(vm.fault(0x40001000n, 'write').kind).toBe('efault');
    const r = vm.fault(0x40001000n, 'read');
    expect(r.kind).toBe('map');
    expect(r.spte & SPTE_W).toBe(0);
  });

  it('names every slot a change reaches, aliases included', () => {
    const vm = new ModelVm();
    vm.setSlot(anon(1, GPA, 0x10000n));
    vm.setSlot(anon(2, GPA + 0x100000n, 0x10000n));
    expect(vm.slots.get(0, 2)?.hva).toBe(H);
    expect(vm.change(1, 0n, 0x1000n, 'dontneed')).toBe(
      'model: dontneed invalidates GFN [0x100000, 0x100001) of slot 1, GFN [0x100100, 0x100101) of slot 2; 0 mapped pages there refault on the next access',
    );
  });

  it('says nothing is invalidated by an empty change', () => {
    const vm = new ModelVm();
    vm.setSlot(anon(1, GPA, 0x10000n));
    expect(vm.change(1, 0n, 0n, 'dontneed')).toBe(
      'model: dontneed invalidates nothing; 0 mapped pages there refault on the next access',
    );
  });

  it('pre-faults each page of a range once, and tallies what it did', () => {
    const vm = new ModelVm();
    vm.setSlot(anon(1, GPA, 0x10000n));
    expect(vm.preFault(GPA, 0x2000n).note).toBe('model: pre-fault 2 map');
    expect(vm.preFault(GPA, 0x3000n).note).toBe('model: pre-fault 2 spurious, 1 map');
  });
});

describe("which MMU model, from the probe's facts", () => {
  const facts = (p: Partial<MmuFacts> & { kind?: string; enabled?: boolean } = {}): MmuFacts => ({
    arch: p.arch ?? 'x86_64',
    tdp: { enabled: p.enabled ?? true, kind: p.kind ?? 'ept' },
    tdpMmu: p.tdpMmu === undefined ? false : p.tdpMmu,
    moduleParams: p.moduleParams ?? {},
  });

  it('takes the legacy MMU only for x86 EPT or NPT with kvm.tdp_mmu=0', () => {
    expect(tdpMmuOf(facts())).toBe('legacy');
    expect(tdpMmuOf(facts({ kind: 'npt' }))).toBe('legacy');
    expect(tdpMmuOf(facts({ tdpMmu: true }))).toBe('tdp');
    expect(tdpMmuOf(facts({ tdpMmu: null }))).toBe('tdp');
    expect(tdpMmuOf(facts({ enabled: false }))).toBe('tdp');
    expect(tdpMmuOf(facts({ kind: 'shadow' }))).toBe('tdp');
    expect(tdpMmuOf(facts({ arch: 'arm64' }))).toBe('tdp');
  });

  it('gives the legacy MMU A/D bits except on EPT with eptad off', () => {
    expect(tdpFactsOptions(facts({ tdpMmu: true }))).toStrictEqual({ mmu: 'tdp' });
    expect(tdpFactsOptions(facts({ kind: 'npt', moduleParams: { 'kvm_intel.eptad': 'N' } }))).toEqual({
      mmu: 'legacy',
      adEnabled: true,
    });
    const ad = (v?: string) =>
      tdpFactsOptions(facts({ moduleParams: v === undefined ? {} : { 'kvm_intel.eptad': v } })).adEnabled;
    expect([ad(), ad('Y'), ad('1'), ad('N'), ad('0')]).toEqual([true, true, true, false, false]);
  });

  it('builds the legacy model with its options, and the TDP MMU model otherwise', () => {
    expect(tdpModelFor(facts({ tdpMmu: true }), new Memslots())).not.toBeInstanceOf(LegacyTdp);
    expect(tdpModelFor(facts({ tdpMmu: true }), new Memslots())).toBeInstanceOf(Tdp);
    const noAd = tdpModelFor(facts({ moduleParams: { 'kvm_intel.eptad': 'N' } }), new Memslots());
    expect(noAd).toBeInstanceOf(LegacyTdp);
    const s = {
      ...declaredSlot({ slot: 1, gpa: GPA, size: 0x10000n, backing: 'anon', logDirty: false, readonly: false }, H),
    };
    noAd.setMemslot(s);
    for (let i = 0; i < 8; i++) noAd.host.fault(s, H + BigInt(i * 4096), true);
    noAd.fault(0, 0x100003, { write: true });
    expect(noAd.pageCounts(0)[1]).toBe(1); // no A/D bits: no prefetch
  });
});

describe('ModelVm: guest faults, VMM writes and guest_memfd', () => {
  it('declares a guest_memfd slot with KVM_MEM_GUEST_MEMFD', () => {
    const m = declaredSlot(
      { slot: 1, gpa: GPA, size: 0x10000n, backing: 'guest_memfd', logDirty: false, readonly: false },
      H,
    );
    expect(m.backing).toEqual({ kind: 'guest_memfd', pageSize: 4096 });
  });

  it('records each guest fault with what was there before, twice when KVM would retry it', () => {
    const vm = new ModelVm();
    vm.setSlot(anon(1, GPA, 0x10000n));
    vm.fault(GPA, 'read');
    vm.fault(GPA, 'write'); // the zero page is replaced: KVM retries
    vm.fault(0x1000n, 'read');
    vm.fault(0x1000n, 'read');
    const f = vm.takeFaults();
    expect(f.map((x) => [x.gfn, x.access, x.before])).toEqual([
      [0x100000, 'read', 'none'],
      [0x100000, 'write', 'present'],
      [0x100000, 'write', 'none'],
      [1, 'read', 'none'],
      [1, 'read', 'mmio'],
    ]);
    expect(f[1]!.result).toBe(f[2]!.result);
    expect(vm.takeFaults()).toEqual([]);
  });

  it('after the VMM wrote pages, a guest read maps them writable; outside every slot nothing happens', () => {
    const vm = new ModelVm();
    vm.setSlot(anon(1, GPA, 0x10000n));
    vm.hostWrote(GPA + 0x1000n, 0x1001);
    vm.hostWrote(GPA + 0x5000n, 0);
    vm.hostWrote(0x1000n, 1);
    const w = (off: bigint) => (vm.fault(GPA + off, 'read').spte & SPTE_W) !== 0;
    expect([0x1000n, 0x2000n, 0x3000n, 0x5000n].map(w)).toEqual([true, true, false, true]);
  });

  it('says how many pages the VMM wrote and how many zero-page mappings that zapped, and logs none', () => {
    const vm = new ModelVm();
    vm.setSlot(anon(1, GPA, 0x10000n, true));
    vm.fault(GPA, 'read');
    expect(vm.hostWrite(GPA, 0x2000n)).toBe(
      'model: the host writes 2 pages, none logged dirty; 1 mapped page zapped (zero pages replaced)',
    );
    expect(vm.hostWrite(GPA + 0x3000n, 0x1000n)).toBe(
      'model: the host writes 1 page, none logged dirty; 0 mapped pages zapped (zero pages replaced)',
    );
    expect(vm.tdp.peekDirty(0, 1)).toEqual([]);
    vm.change(1, 0x5000n, 0x1000n, 'munmap');
    expect(() => vm.hostWrite(GPA + 0x5000n, 0x1000n)).toThrow('the model has no host page at GFN 0x100005');
  });

  it('closing a guest_memfd takes every page of its slot away', () => {
    const vm = new ModelVm();
    vm.setSlot(
      declaredSlot({ slot: 1, gpa: GPA, size: 0x10000n, backing: 'guest_memfd', logDirty: false, readonly: false }, H),
    );
    vm.fault(GPA + 0x2000n, 'write');
    expect(vm.closeGuestMemfd(1)).toBe(
      'model: guest_memfd release invalidates GFN [0x100000, 0x100010) of slot 1; 1 mapped page there refault on the next access',
    );
    expect(vm.fault(GPA + 0x2000n, 'read').kind).toBe('efault');
  });
});

describe('ModelVm: GPA ranges and the dirty log across changes', () => {
  it('splits a GPA range into each slot it crosses, in GPA order, and refuses a gap', () => {
    const vm = new ModelVm();
    vm.setSlot(anon(1, GPA, 0x3000n));
    vm.setSlot(anon(2, GPA + 0x3000n, 0x2000n, false, H + 0x100000n));
    expect(vm.pieces(GPA + 0x1000n, 0x3000n)).toEqual([
      { slot: 1, offset: 0x1000n, size: 0x2000n },
      { slot: 2, offset: 0n, size: 0x1000n },
    ]);
    expect(vm.pieces(GPA + 0x3000n, 0x2000n)).toEqual([{ slot: 2, offset: 0n, size: 0x2000n }]);
    expect(() => vm.pieces(GPA + 0x4000n, 0x2000n)).toThrow(/no memslot at GPA 0x100005000/);
  });

  it('keeps the pages logged when a logging slot moves, at their new GPAs', () => {
    const vm = new ModelVm();
    const s = anon(1, GPA, 0x4000n, true);
    vm.setSlot(s);
    vm.markDirty(GPA + 0x1234n);
    vm.markDirty(GPA + 0x3000n);
    vm.setSlot({ ...s, baseGfn: s.baseGfn + 0x100 });
    expect(vm.harvestDirty(1)).toEqual([GPA + 0x100000n + 0x1000n, GPA + 0x100000n + 0x3000n]);
    expect(vm.harvestDirty(1)).toEqual([]);
  });

  it('with manual protect a get leaves the log; a clear takes back exactly its pages', () => {
    const vm = new ModelVm();
    vm.setSlot(anon(1, GPA, 0x4000n, true));
    for (const p of [0n, 1n, 2n, 3n]) vm.markDirty(GPA + p * 0x1000n);
    expect(vm.harvestDirty(1, true)).toHaveLength(4);
    vm.clearDirty(1, 1, 2);
    expect(vm.harvestDirty(1, true)).toEqual([GPA, GPA + 0x3000n]);
    vm.clearDirty(1, 3, 1);
    expect(vm.harvestDirty(1, true)).toEqual([GPA]);
    vm.clearDirty(2, 0, 64);
    vm.deleteSlot(1);
    expect(vm.harvestDirty(1, true)).toEqual([]);
  });

  it('logs nothing for a write outside every slot or in a slot that does not log', () => {
    const vm = new ModelVm();
    vm.setSlot(anon(1, GPA, 0x2000n));
    vm.markDirty(GPA);
    vm.markDirty(GPA + 0x10000n);
    expect(vm.harvestDirty(1)).toEqual([]);
  });
});

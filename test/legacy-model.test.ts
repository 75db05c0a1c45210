// The legacy MMU's model (kvm.tdp_mmu=0 with TDP) against rules read in
// arch/x86/kvm/mmu/mmu.c of Linux 6.1 and 7.2. Expected values are worked
// out by hand from those rules, not captured from the model; each rule is
// also broken on purpose (src/model/wrong.ts) to show the test notices.
import { describe, expect, it } from 'vitest';
import { LegacyTdp, PTE_PREFETCH_NUM } from '../src/model/legacy.js';
import { Memslots, type Memslot } from '../src/model/memslots.js';
import { decodeSpte } from '../src/model/spte.js';
import type { WrongTdp } from '../src/model/wrong.js';
import { tdpMmuOf, tdpModelFor, ModelVm } from '../src/model/vm.js';
import { Tdp } from '../src/model/tdp.js';

const H = 0x7f0000000000n; // 1 GiB-aligned HVA
const BASE = 0x100000; // 1 GiB-aligned GFN

function slot(p: Partial<Memslot> = {}): Memslot {
  return {
    slot: 1,
    asId: 0,
    baseGfn: BASE,
    npages: 1024,
    hva: H,
    flags: { logDirty: false, readonly: false },
    backing: { kind: 'anon', pageSize: 4096 },
    ...p,
  };
}
const thp = { kind: 'thp', pageSize: 2 << 20 } as const;

function legacy(s: Memslot, wrong?: WrongTdp, adEnabled?: boolean): LegacyTdp {
  const tdp = new LegacyTdp(new Memslots(), { wrong, adEnabled });
  tdp.setMemslot(s);
  return tdp;
}

/** The host writes page `i` of the slot (the page is then mapped writable in the host). */
function hostWrite(tdp: Tdp, s: Memslot, ...pages: number[]): void {
  for (const i of pages) tdp.host.fault(s, s.hva + BigInt(i * 4096), true);
}

/** The slot pages (relative) mapped at 4 KiB, with W. */
function mapped4k(tdp: Tdp, s: Memslot): string[] {
  const out: string[] = [];
  for (let i = 0; i < s.npages; i++) {
    const m = tdp.lookup(0, s.baseGfn + i);
    if (m && m.level === 1 && decodeSpte(m.spte).present) out.push(`${i}${decodeSpte(m.spte).writable ? 'w' : 'r'}`);
  }
  return out;
}

describe('legacy MMU prefetch (direct_pte_prefetch)', () => {
  it('maps the host-writable neighbours in the aligned group of 8 around a 4 KiB fault', () => {
    const s = slot();
    const tdp = legacy(s);
    hostWrite(tdp, s, 8, 9, 10, 12, 13, 14, 15, 16);
    // A read of page 11: page 11 is the host's zero page (read-only map).
    // Group 8..15: run [8, 11) all writable -> mapped; run [12, 16) all
    // writable -> mapped; page 16 is another group.
    expect(tdp.fault(0, BASE + 11).kind).toBe('map');
    expect(mapped4k(tdp, s)).toEqual(['8w', '9w', '10w', '11r', '12w', '13w', '14w', '15w']);
    expect(PTE_PREFETCH_NUM).toBe(8);
  });

  it('stops a run at the first page the host does not map writable, and stops the prefetch on an empty run', () => {
    const s = slot();
    const tdp = legacy(s);
    // Group 0..7, fault on 3. Run [0, 3): page 0 writable, 1 not -> maps 0
    // only (non-zero: go on). Run [4, 8): page 4 not writable -> 0 pages:
    // the prefetch stops.
    hostWrite(tdp, s, 0, 2, 3, 5, 6, 7);
    tdp.fault(0, BASE + 3, { write: true });
    expect(mapped4k(tdp, s)).toEqual(['0w', '3w']);
    // A fault on 1 now: runs [1..1] is the fault itself, [2, 3) writable, 3 present,
    // [4, 8) starts with an unwritable page: maps 2 only.
    tdp.fault(0, BASE + 1, { write: true });
    expect(mapped4k(tdp, s)).toEqual(['0w', '1w', '2w', '3w']);
  });

  it('prefetches nothing for a run that crosses the slot end, in a logging or read-only slot, or without A/D bits', () => {
    // Slot of 6 pages: group 0..7, fault on 0, run [1, 8) needs 7 pages, the slot has 5 -> none.
    const short = slot({ npages: 6 });
    const a = legacy(short);
    hostWrite(a, short, 0, 1, 2, 3, 4, 5);
    a.fault(0, BASE, { write: true });
    expect(mapped4k(a, short)).toEqual(['0w']);
    // Fault on 5 instead: runs [0, 5) fits -> mapped; run [6, 8) is outside the slot -> none.
    a.fault(0, BASE + 5, { write: true });
    expect(mapped4k(a, short)).toEqual(['0w', '1w', '2w', '3w', '4w', '5w']);

    for (const flags of [
      { logDirty: true, readonly: false },
      { logDirty: false, readonly: true },
    ]) {
      const s = slot({ flags });
      const t = legacy(s);
      hostWrite(t, s, 0, 1, 2, 3, 4, 5, 6, 7);
      t.fault(0, BASE + 2);
      expect(mapped4k(t, s)).toHaveLength(1);
    }
    const s = slot();
    const noAd = legacy(s, undefined, false);
    hostWrite(noAd, s, 0, 1, 2, 3);
    noAd.fault(0, BASE + 2);
    expect(mapped4k(noAd, s)).toEqual(['2w']);
  });

  it('prefetches only after a new 4 KiB leaf: not after a huge leaf, a spurious or a fast fault', () => {
    const s = slot({ backing: thp });
    const tdp = legacy(s);
    tdp.fault(0, BASE, { write: true }); // a 2 MiB leaf
    expect(tdp.lookup(0, BASE)?.level).toBe(2);
    expect(tdp.pageCounts(0)).toEqual([0, 0, 1, 0, 0, 0]);
    // The TDP model never prefetches.
    const t = new Tdp(new Memslots(), {});
    const s2 = slot();
    t.setMemslot(s2);
    hostWrite(t, s2, 0, 1, 2);
    t.fault(0, BASE + 1, { write: true });
    expect(mapped4k(t, s2)).toEqual(['1w']);
  });

  it('is noticed when missing (wrong: noPrefetch)', () => {
    const s = slot();
    const wrong = legacy(s, { noPrefetch: true });
    hostWrite(wrong, s, 0, 1, 2);
    wrong.fault(0, BASE + 1, { write: true });
    expect(mapped4k(wrong, s)).not.toEqual(['0w', '1w', '2w']);
  });
});

describe('legacy MMU dirty logging', () => {
  /** A 2 MiB THP block written by the host and mapped by one 2 MiB leaf. */
  function block(wrong?: WrongTdp) {
    const s = slot({ backing: thp });
    const tdp = legacy(s, wrong);
    hostWrite(tdp, s, 0);
    tdp.fault(0, BASE, { write: true });
    return { s, tdp };
  }

  it('does not split when logging starts, write-protects the 2 MiB leaf, and a logged write maps only its page at 4 KiB', () => {
    const { s, tdp } = block();
    tdp.setMemslot({ ...s, flags: { logDirty: true, readonly: false } });
    const huge = tdp.lookup(0, BASE + 0x37)!;
    expect([huge.level, decodeSpte(huge.spte).writable]).toEqual([2, false]);
    // The write is a slow fault (fast_page_fault refuses a huge leaf of a
    // logging slot): the 2 MiB leaf is zapped for the new table; no prefetch.
    expect(tdp.fault(0, BASE + 0x37, { write: true }).kind).toBe('map');
    expect(tdp.mappings(0, BASE, BASE + 512)).toEqual([
      { start: BASE + 0x37, end: BASE + 0x38, level: 1, writable: true, executable: true },
    ]);
    expect(tdp.getDirtyLog(0, 1)).toEqual([BASE + 0x37]);
  });

  it('zaps the leaves, not the table, when logging stops; the next fault maps 2 MiB again', () => {
    const { s, tdp } = block();
    tdp.setMemslot({ ...s, flags: { logDirty: true, readonly: false } });
    tdp.fault(0, BASE + 0x37, { write: true });
    tdp.fault(0, BASE + 0x40, { write: true });
    const mark = tdp.events.length;
    tdp.setMemslot({ ...s, flags: { logDirty: false, readonly: false } });
    // Two leaves zapped (pages_4k -2), no table torn down (no kvm_mmu_prepare_zap_page).
    expect(tdp.pageCounts(0)).toEqual([0, 0, 0, 0, 0, 0]);
    const evs = tdp.events.slice(mark);
    expect(evs.filter((e) => e.kind === 'spte').length).toBe(2);
    expect(evs.filter((e) => e.kind === 'teardown')).toEqual([]);
    tdp.fault(0, BASE + 0x100);
    expect(tdp.lookup(0, BASE + 0x100)?.level).toBe(2);
  });

  it('keeps 4 KiB leaves whose table no huge page could replace', () => {
    // anon 4 KiB host pages: max mapping level 1, nothing is collapsible.
    const s = slot();
    const tdp = legacy(s);
    hostWrite(tdp, s, 0, 1);
    tdp.setMemslot({ ...s, flags: { logDirty: true, readonly: false } });
    tdp.fault(0, BASE, { write: true });
    tdp.fault(0, BASE + 1, { write: true });
    tdp.setMemslot({ ...s, flags: { logDirty: false, readonly: false } });
    expect(tdp.pageCounts(0)[1]).toBe(2);
  });

  it('is noticed with an eager split (wrong: legacyEagerSplit)', () => {
    const { s, tdp } = block({ legacyEagerSplit: true });
    tdp.setMemslot({ ...s, flags: { logDirty: true, readonly: false } });
    expect(tdp.lookup(0, BASE + 0x37)?.level).not.toBe(2);
  });

  it('is noticed with the TDP MMU zap of whole tables at logging off (wrong: legacyZapTables)', () => {
    const { s, tdp } = block({ legacyZapTables: true });
    tdp.setMemslot({ ...s, flags: { logDirty: true, readonly: false } });
    tdp.fault(0, BASE + 0x37, { write: true });
    const mark = tdp.events.length;
    tdp.setMemslot({ ...s, flags: { logDirty: false, readonly: false } });
    expect(tdp.events.slice(mark).filter((e) => e.kind === 'teardown')).not.toEqual([]);
  });
});

describe('the model chosen from the probe facts', () => {
  const facts = (tdpMmu: boolean | null, kind = 'npt', enabled = true) => ({
    arch: 'x86_64',
    tdp: { enabled, kind },
    tdpMmu,
    moduleParams: {},
  });
  it('is the legacy model with TDP and tdp_mmu off, the TDP model otherwise', () => {
    expect(tdpMmuOf(facts(false))).toBe('legacy');
    expect(tdpMmuOf(facts(false, 'ept'))).toBe('legacy');
    expect(tdpMmuOf(facts(true))).toBe('tdp');
    expect(tdpMmuOf(facts(null))).toBe('tdp');
    expect(tdpMmuOf(facts(false, 'none', false))).toBe('tdp');
    expect(tdpMmuOf({ ...facts(false, 'stage2'), arch: 'arm64' })).toBe('tdp');
    expect(tdpModelFor(facts(false), new Memslots())).toBeInstanceOf(LegacyTdp);
    expect(tdpModelFor(facts(true), new Memslots())).not.toBeInstanceOf(LegacyTdp);
    expect(new ModelVm({ mmu: 'legacy' }).tdp).toBeInstanceOf(LegacyTdp);
  });
});

describe('legacy MMU prefetch at its edges', () => {
  it('prefetches a run that starts at GFN 0', () => {
    const s = slot({ baseGfn: 0 });
    const tdp = legacy(s);
    hostWrite(tdp, s, 0, 1, 2, 4, 5, 6, 7);
    tdp.fault(0, 3, { write: true });
    expect(mapped4k(tdp, s)).toEqual(['0w', '1w', '2w', '3w', '4w', '5w', '6w', '7w']);
  });

  it('an empty run ends the prefetch even when a later run could map', () => {
    const s = slot();
    const tdp = legacy(s);
    hostWrite(tdp, s, 1, 2, 3, 4, 6, 7); // page 0 is not mapped in the host: run [0, 5) maps nothing
    tdp.fault(0, BASE + 5, { write: true });
    expect(mapped4k(tdp, s)).toEqual(['5w']);
  });

  it('a run its slot does not hold whole ends the prefetch; one it holds exactly is mapped', () => {
    const a = slot({ npages: 2 });
    const b = slot({ slot: 2, baseGfn: BASE + 2, npages: 1022, hva: H + 0x100000n });
    const tdp = new LegacyTdp(new Memslots());
    tdp.setMemslot(a);
    tdp.setMemslot(b);
    hostWrite(tdp, a, 0, 1);
    hostWrite(tdp, b, 0, 1, 3, 4, 5);
    // Group 0..7, fault on 4 (slot b): run [0, 4) starts in a, which ends at 2: nothing more.
    tdp.fault(0, BASE + 4, { write: true });
    expect([...mapped4k(tdp, a), ...mapped4k(tdp, b).map((p) => `b${p}`)]).toEqual(['b2w']);

    const c = slot({ npages: 4 });
    const d = slot({ slot: 2, baseGfn: BASE + 4, npages: 1020, hva: H + 0x100000n });
    const t2 = new LegacyTdp(new Memslots());
    t2.setMemslot(c);
    t2.setMemslot(d);
    hostWrite(t2, c, 0, 1, 2, 3);
    // Fault on 4 (slot d): run [0, 4) lies exactly in c and is mapped; run [5, 8) has no host pages.
    t2.fault(0, BASE + 4, { write: true });
    expect(mapped4k(t2, c)).toEqual(['0w', '1w', '2w', '3w']);
  });

  it('an MMIO SPTE installed prefetches its group; the same MMIO fault again does not', () => {
    const s = slot({ npages: 3 });
    const tdp = legacy(s);
    hostWrite(tdp, s, 0, 1, 2);
    expect(tdp.fault(0, BASE + 3).kind).toBe('mmio');
    expect(mapped4k(tdp, s)).toEqual(['0w', '1w', '2w']);
    tdp.zap(0, BASE, BASE + 3);
    expect(tdp.fault(0, BASE + 3).kind).toBe('mmio');
    expect(mapped4k(tdp, s)).toEqual([]);
  });

  it('a run without a memslot ends the prefetch', () => {
    const s = slot({ baseGfn: BASE + 4, npages: 1020 });
    const tdp = legacy(s);
    hostWrite(tdp, s, 0, 1, 2, 3);
    expect(tdp.fault(0, BASE + 1).kind).toBe('mmio'); // run [0, 1) has no slot: [2, 4) and [4, 8) are not tried
    expect(mapped4k(tdp, s)).toEqual([]);
  });

  it('logging off skips a leaf whose shadow page has no host page at its first GFN', () => {
    const s = slot();
    const tdp = legacy({ ...s, flags: { logDirty: true, readonly: false } });
    tdp.fault(0, BASE + 5, { write: true });
    tdp.setMemslot(s);
    expect(mapped4k(tdp, s)).toEqual(['5w']);
    expect(tdp.legacy).toBe(true);
  });
});

describe('legacy MMU: a slot deleted or moved requests a remote TLB flush when anything was mapped', () => {
  it('counts one flush for a deletion or a move over a mapping or an MMIO SPTE, none over nothing', () => {
    const s = slot();
    const del = legacy(s);
    del.fault(0, BASE + 1, { write: true });
    const n = del.flushRequests;
    del.setMemslot({ ...s, npages: 0 });
    expect(del.flushRequests - n).toBe(1);

    const mv = legacy(s);
    mv.fault(0, BASE + 1, { write: true });
    const m = mv.flushRequests;
    mv.setMemslot({ ...s, baseGfn: BASE + 4096 });
    expect(mv.flushRequests - m).toBe(1);

    const empty = legacy(s);
    empty.setMemslot({ ...s, npages: 0 });
    expect(empty.flushRequests).toBe(0);

    const mmio = legacy(s);
    mmio.fault(0, 0x500);
    mmio.setMemslot({ ...s, npages: 0 });
    expect(mmio.flushRequests).toBe(1);

    const quiet = legacy(s, { noFlush: true });
    quiet.fault(0, BASE + 1, { write: true });
    quiet.setMemslot({ ...s, npages: 0 });
    expect(quiet.flushRequests).toBe(0);
  });

  it('counts none for a new slot beside a mapping, and one for logging turned on even with nothing to write-protect', () => {
    const s = slot();
    const tdp = legacy(s);
    tdp.fault(0, BASE + 1); // the zero page: read-only, nothing to write-protect
    tdp.setMemslot(slot({ slot: 2, baseGfn: BASE + 4096, hva: H + 0x1000000n }));
    expect(tdp.flushRequests).toBe(0);
    // kvm_mmu_slot_apply_flags flushes unconditionally once logging is on.
    tdp.setMemslot({ ...s, flags: { logDirty: true, readonly: false } });
    expect(tdp.flushRequests).toBe(1);
  });
});

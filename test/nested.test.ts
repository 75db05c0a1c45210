// The two-dimensional walk. Expected counts come from the formula, worked by
// hand: n guest levels, m TDP levels, 4 KiB TDP leaves, nothing cached:
// (n + 1) guest-physical addresses (n table pages + the data page) x m TDP
// references, plus n guest entry reads = (n + 1)(m + 1) - 1 references,
// then the data access itself:
//   4 x 4: 5 * 4 + 4 = 24      4 x 5: 5 * 5 + 4 = 29
//   5 x 4: 6 * 4 + 5 = 29      5 x 5: 6 * 5 + 5 = 35
// Hit/miss patterns and mapping levels are worked out from the TDP rules
// (tdp.ts: a leaf's level is the smallest of the host mapping level and what
// the slot's GPA/HVA alignment allows).
//
// Guest layout used throughout (a 4 KiB guest page per table, in slot 1):
//   GVA = PML5 idx 0 | PML4 idx 1 | PDPT idx 2 | PD idx 3 | PT idx 4 | offset 0x56
//   tables at GPA 0x100000 (root), 0x101000, 0x102000, 0x103000 (, 0x104000 for
//   5-level); the data page follows the last table.
import { describe, expect, test } from 'vitest';
import { Memslots, type Backing, type Memslot } from '../src/model/memslots.js';
import { copyTdp, nestedWalk, type NestedOptions, type NestedRef } from '../src/model/nested.js';
import { sptePfn } from '../src/model/spte.js';
import { Tdp } from '../src/model/tdp.js';
import type { Access, PagingConfig } from '../src/model/walk.js';

const P = 0x1n,
  W = 0x2n,
  U = 0x4n,
  A = 0x20n,
  D = 0x40n;
const GVA = (1n << 39n) | (2n << 30n) | (3n << 21n) | (4n << 12n) | 0x56n;
const IDX = [0n, 4n, 3n, 2n, 1n, 0n]; // IDX[level]: the GVA's index at that guest level
const H = 0x7f0000000000n; // 1 GiB-aligned HVA

function cfg(levels: 4 | 5): PagingConfig {
  return {
    levels,
    vendor: 'intel',
    maxPhyAddr: 48,
    cr0Wp: true,
    cr4Smep: false,
    cr4Smap: false,
    cr4Pke: false,
    efer: { nxe: true },
    pdpe1gb: true,
    pkru: 0,
  };
}

const anon: Backing = { kind: 'anon', pageSize: 4096 };
const thp: Backing = { kind: 'thp', pageSize: 2 << 20 };
const hugetlb1g: Backing = { kind: 'hugetlb1g', pageSize: 1 << 30 };

/** Slot 1: GPA [1 MiB, 5 MiB), anonymous 4 KiB pages, HVA congruent to the GPA. */
function slot(p: Partial<Memslot> = {}): Memslot {
  return {
    slot: 1,
    asId: 0,
    baseGfn: 0x100,
    npages: 1024,
    hva: H + 0x100000n,
    flags: { logDirty: false, readonly: false },
    backing: anon,
    ...p,
  };
}

function vm(tdpLevels: 4 | 5, ...slots: Memslot[]): Tdp {
  const tdp = new Tdp(new Memslots({ maxGfn: tdpLevels === 5 ? 2 ** 45 : 2 ** 36 }), { levels: tdpLevels });
  for (const s of slots) tdp.setMemslot(s);
  return tdp;
}

interface Guest {
  cr3: bigint;
  /** GPA of each guest table page, root first. */
  tables: bigint[];
  dataGpa: bigint;
  read: (gpa: bigint) => bigint;
  mem: Map<bigint, bigint>;
}

/**
 * Guest tables for GVA: `levels` table pages from 0x100000 up, the data page
 * after them (or at `data`), every entry P|W|U plus `bits` (default A|D, so
 * that the walk writes no A/D bit).
 */
function guest(levels: 4 | 5, o: { bits?: bigint; data?: bigint } = {}): Guest {
  const bits = o.bits ?? A | D;
  const mem = new Map<bigint, bigint>();
  const tables = Array.from({ length: levels }, (_, i) => 0x100000n + BigInt(i) * 0x1000n);
  const dataPage = o.data ?? 0x100000n + BigInt(levels) * 0x1000n;
  tables.forEach((t, i) => {
    const level = levels - i;
    const next = i + 1 < levels ? tables[i + 1]! : dataPage;
    mem.set(t + IDX[level]! * 8n, next | P | W | U | bits);
  });
  return { cr3: tables[0]!, tables, dataGpa: dataPage + 0x56n, read: (gpa) => mem.get(gpa) ?? 0n, mem };
}

const read: Access = { gva: GVA, kind: 'read', cpl: 0 };
const write: Access = { gva: GVA, kind: 'write', cpl: 0 };

/** Fault every page of the guest's walk in for write (host pages allocated, 4 KiB leaves). */
function mapAll(tdp: Tdp, g: Guest): void {
  for (const gpa of [...g.tables, g.dataGpa]) tdp.fault(0, Number(gpa >> 12n), { write: true });
}

function run(g: Guest, levels: 4 | 5, tdp: Tdp, access: Access = read, opts: NestedOptions = { faultIn: false }) {
  return nestedWalk(cfg(levels), g.cr3, access, g.read, tdp, 0, opts);
}

/** Kinds in order, compactly: "T4" = TDP level 4, "G3" = guest entry at level 3, "D" = the data access. */
function shape(refs: NestedRef[]): string[] {
  return refs.map((r) => (r.kind === 'tdp' ? `T${r.tdpLevel}` : r.kind === 'guest-pte' ? `G${r.guestLevel}` : 'D'));
}

/** Steps (1-based) of the TDP references that missed. */
function misses(refs: NestedRef[]): number[] {
  return refs.flatMap((r, i) => (r.kind === 'tdp' && !r.hit ? [i + 1] : []));
}

describe('reference counts: (n + 1)(m + 1) - 1 with everything mapped at 4 KiB', () => {
  const cases: [4 | 5, 4 | 5, number][] = [
    [4, 4, 24],
    [4, 5, 29],
    [5, 4, 29],
    [5, 5, 35],
  ];
  for (const [n, m, expected] of cases) {
    test(`${n}-level guest x ${m}-level TDP: ${expected} references, all hits, then the data access`, () => {
      const g = guest(n);
      const tdp = vm(m, slot());
      mapAll(tdp, g);
      const r = run(g, n, tdp);
      expect(r.end).toBe('data');
      expect(r.totals).toEqual({ references: expected, tdp: (n + 1) * m, guestPte: n, tdpMisses: 0 });
      expect(r.refs.length).toBe(expected + 1);
      expect(r.refs.every((x) => x.hit)).toBe(true);
    });
  }

  test('4 x 4 in order: per guest level the TDP walk of its entry root first, then the entry; then the data GPA', () => {
    const g = guest(4);
    const tdp = vm(4, slot());
    mapAll(tdp, g);
    const r = run(g, 4, tdp);
    const tdpWalk = ['T4', 'T3', 'T2', 'T1'];
    expect(shape(r.refs)).toEqual([
      ...tdpWalk,
      'G4',
      ...tdpWalk,
      'G3',
      ...tdpWalk,
      'G2',
      ...tdpWalk,
      'G1',
      ...tdpWalk,
      'D',
    ]);
    // The GPAs translated: each entry's own address, then the data's.
    const pteGpas = [0x100008n, 0x101010n, 0x102018n, 0x103020n];
    expect(r.refs.filter((x) => x.kind === 'guest-pte').map((x) => x.gpa)).toEqual(pteGpas);
    expect(r.refs.filter((x) => x.kind === 'tdp').map((x) => x.gpa)).toEqual(
      [...pteGpas, 0x104056n].flatMap((gpa) => [gpa, gpa, gpa, gpa]),
    );
    expect(r.refs.filter((x) => x.kind === 'tdp').map((x) => x.guestLevel)).toEqual(
      [4, 3, 2, 1, 0].flatMap((l) => [l, l, l, l]),
    );
    const data = r.refs[24]!;
    expect(data).toMatchObject({ kind: 'data', guestLevel: 0, gpa: 0x104056n, access: 'read', hit: true });
    // The host address keeps the page offset, and the data page's leaf SPTE gives its frame.
    const leaf = r.refs[23]!;
    expect(data.hostAddr! & 0xfffn).toBe(0x56n);
    expect(data.hostAddr! >> 12n).toBe(BigInt(Math.floor(leaf.spte! / 4096)));
  });
});

describe('hits and misses', () => {
  test('PML4 and PD pages mapped, PDPT, PT and data pages not: one miss each, at TDP level 1', () => {
    const g = guest(4);
    const tdp = vm(4, slot());
    tdp.fault(0, 0x100, { write: true });
    tdp.fault(0, 0x102, { write: true });
    const r = run(g, 4, tdp);
    // Steps: 1-4 PML4 page, 5 PML4E, 6-9 PDPT page, 10 PDPTE, 11-14 PD page,
    // 15 PDE, 16-19 PT page, 20 PTE, 21-24 data page, 25 data. The upper TDP
    // tables exist (the first fault made them), so each unmapped page misses at
    // its level-1 SPTE.
    expect(misses(r.refs)).toEqual([9, 19, 24]);
    expect(r.totals).toMatchObject({ references: 24, tdpMisses: 3 });
    for (const step of [9, 19, 24])
      expect(r.refs[step - 1]).toMatchObject({ tdpLevel: 1, spte: 0, fault: { kind: 'map', level: 1 } });
    expect(r.end).toBe('data');
  });

  test('an empty tree: the first page misses at the root, the rest where their tables end', () => {
    const g = guest(4);
    const r = run(g, 4, vm(4, slot()));
    // GPA 0x100008 misses at TDP level 4 (nothing at all); its fault builds the
    // tables down to level 1, so the next pages in the same 2 MiB miss at level 1.
    expect(misses(r.refs)).toEqual([1, 9, 14, 19, 24]);
    expect(r.refs.slice(0, 4).map((x) => x.hit)).toEqual([false, true, true, true]);
    expect(r.totals).toMatchObject({ references: 24, tdpMisses: 5 });
  });

  test("faultIn: false leaves the caller's tree, host memory and events alone; faultIn: true maps the misses", () => {
    const g = guest(4);
    const tdp = vm(4, slot());
    tdp.fault(0, 0x100, { write: true });
    const before = { mappings: tdp.mappings(0), events: tdp.events.length, host: tdp.host.lookup(H + 0x101000n) };
    const dry = run(g, 4, tdp, read, { faultIn: false });
    expect({ mappings: tdp.mappings(0), events: tdp.events.length, host: tdp.host.lookup(H + 0x101000n) }).toEqual(
      before,
    );
    const wet = run(g, 4, tdp, read, { faultIn: true });
    expect(wet.refs.map((x) => [x.hit, x.fault?.level])).toEqual(dry.refs.map((x) => [x.hit, x.fault?.level]));
    // Tables faulted for write (host pages allocated); the data page for a read
    // of memory the host never wrote: the zero page, read-only.
    expect(tdp.mappings(0).map((m) => [m.start, m.end, m.level, m.writable])).toEqual([
      [0x100, 0x104, 1, true],
      [0x104, 0x105, 1, false],
    ]);
    // A second walk over the now-filled tree hits everywhere.
    expect(run(g, 4, tdp).totals.tdpMisses).toBe(0);
  });

  test('a page referenced twice: the second reference hits after a read fault-in, misses again when it needs W', () => {
    // The PTE maps the data onto the PT page itself (0x103000). Guest table
    // accesses are reads ('ad-only', and A/D already set), and the host never
    // wrote slot 1, so a read fault maps the zero page read-only.
    const g = guest(4, { data: 0x103000n });
    const opts: NestedOptions = { faultIn: false, tableWrites: 'ad-only' };
    const r = run(g, 4, vm(4, slot()), read, opts);
    expect(misses(r.refs)).toEqual([1, 9, 14, 19]);
    expect(r.refs.slice(20, 24).every((x) => x.hit && x.gpa === 0x103056n)).toBe(true);
    const w = run(g, 4, vm(4, slot()), write, opts);
    expect(misses(w.refs)).toEqual([1, 9, 14, 19, 24]);
    expect(w.refs[23]).toMatchObject({ tdpLevel: 1, access: 'write', fault: { kind: 'map', level: 1 } });
    expect(w.refs[23]!.spte! & 0x2).toBe(0); // present, not writable
    expect(w.refs[24]).toMatchObject({ kind: 'data', access: 'write', hit: true });
  });
});

describe('access rights the TDP references need', () => {
  test("'always' (default): every guest table access is a TDP write; the data access is the guest's", () => {
    const g = guest(4);
    const r = run(g, 4, vm(4, slot()), { gva: GVA, kind: 'exec', cpl: 0 });
    expect(r.refs.filter((x) => x.kind === 'tdp' && x.guestLevel > 0).every((x) => x.access === 'write')).toBe(true);
    expect(r.refs.filter((x) => x.guestLevel === 0).map((x) => x.access)).toEqual([
      'exec',
      'exec',
      'exec',
      'exec',
      'exec',
    ]);
  });

  test("'ad-only': reads, except the entries whose A/D bits the walk sets; those writes are on the guest entries", () => {
    const g = guest(4, { bits: 0n });
    g.mem.set(0x100008n, g.mem.get(0x100008n)! | A); // the PML4E already has A
    const r = run(g, 4, vm(4, slot()), write, { faultIn: false, tableWrites: 'ad-only' });
    const byGuestLevel = (l: number) =>
      r.refs.filter((x) => x.kind === 'tdp' && x.guestLevel === l).map((x) => x.access);
    expect(byGuestLevel(4)).toEqual(['read', 'read', 'read', 'read']);
    for (const l of [3, 2, 1]) expect(byGuestLevel(l)).toEqual(['write', 'write', 'write', 'write']);
    const entries = r.refs.filter((x) => x.kind === 'guest-pte');
    expect(entries.map((x) => x.adWrite && x.adWrite.new & ~x.adWrite.old)).toEqual([undefined, A, A, A | D]);
  });
});

describe('mapping level of a miss, by memslot layout and backing', () => {
  // Tables in slot 1 (anon, faulted in beforehand); the data page in slot 2 at GPA 1 GiB.
  function layout(s2: Partial<Memslot>): { r: ReturnType<typeof run>; dataRefs: NestedRef[] } {
    const g = guest(4, { data: 0x40000000n });
    const tdp = vm(4, slot(), slot({ slot: 2, baseGfn: 0x40000, npages: 1024, hva: H + 0x40000000n, ...s2 }));
    for (const t of g.tables) tdp.fault(0, Number(t >> 12n), { write: true });
    const r = run(g, 4, tdp);
    return { r, dataRefs: r.refs.filter((x) => x.kind === 'tdp' && x.guestLevel === 0) };
  }

  test('THP, GPA and HVA 2 MiB-congruent: maps at level 2, and the TDP walk of that GPA ends there', () => {
    const { r, dataRefs } = layout({ backing: thp });
    // Level 4 hits (the table faults made the root entry); the level-3 entry of
    // GPA 1 GiB is empty; the fault maps a 2 MiB leaf at level 2 under a new
    // level-2 table, which the walk reads next. 3 TDP references, not 4.
    expect(dataRefs.map((x) => [x.tdpLevel, x.hit])).toEqual([
      [4, true],
      [3, false],
      [2, true],
    ]);
    expect(dataRefs[1]!.fault).toMatchObject({ kind: 'map', level: 2 });
    expect(r.totals.references).toBe(23);
  });

  test('THP, HVA off by 4 KiB from the GPA: no 2 MiB block is congruent, so level 1', () => {
    const { dataRefs } = layout({ backing: thp, hva: H + 0x40001000n });
    expect(dataRefs.map((x) => [x.tdpLevel, x.hit])).toEqual([
      [4, true],
      [3, false],
      [2, true],
      [1, true],
    ]);
    expect(dataRefs[1]!.fault).toMatchObject({ kind: 'map', level: 1 });
  });

  test('THP while the slot logs dirty pages: level 1', () => {
    const { dataRefs } = layout({ backing: thp, flags: { logDirty: true, readonly: false } });
    expect(dataRefs[1]!.fault).toMatchObject({ kind: 'map', level: 1 });
  });

  test('hugetlb 1 GiB, 1 GiB-aligned: maps at level 3', () => {
    const { dataRefs } = layout({ backing: hugetlb1g, npages: 512 * 512 });
    expect(dataRefs.map((x) => [x.tdpLevel, x.hit])).toEqual([
      [4, true],
      [3, false],
    ]);
    expect(dataRefs[1]!.fault).toMatchObject({ kind: 'map', level: 3 });
  });

  test('anonymous 4 KiB pages: level 1 whatever the alignment', () => {
    const { dataRefs } = layout({});
    expect(dataRefs[1]!.fault).toMatchObject({ kind: 'map', level: 1 });
  });
});

describe('where the walk stops', () => {
  test('a not-present PDE: the references end with the PDE; no data GPA is translated', () => {
    const g = guest(4);
    g.mem.set(0x102018n, 0n);
    const tdp = vm(4, slot());
    mapAll(tdp, g);
    const r = run(g, 4, tdp);
    expect(r.end).toBe('guest-fault');
    expect(r.guest.ok).toBe(false);
    const tdpWalk = ['T4', 'T3', 'T2', 'T1'];
    expect(shape(r.refs)).toEqual([...tdpWalk, 'G4', ...tdpWalk, 'G3', ...tdpWalk, 'G2']);
    expect(r.refs[14]).toMatchObject({ kind: 'guest-pte', guestLevel: 2, gpa: 0x102018n, pte: 0n });
    expect(r.totals).toEqual({ references: 15, tdp: 12, guestPte: 3, tdpMisses: 0 });
  });

  test('a protection fault: every guest entry is read, the data GPA is not translated', () => {
    const g = guest(4);
    const tdp = vm(4, slot());
    mapAll(tdp, g);
    const r = run(g, 4, tdp, { gva: GVA, kind: 'write', cpl: 3 }); // fine: all entries are W|U
    expect(r.end).toBe('data');
    g.mem.set(0x103020n, g.mem.get(0x103020n)! & ~W);
    const f = run(g, 4, tdp, { gva: GVA, kind: 'write', cpl: 3 });
    expect(f.end).toBe('guest-fault');
    expect(f.totals.references).toBe(20);
    expect(f.refs.at(-1)).toMatchObject({ kind: 'guest-pte', guestLevel: 1 });
  });

  test('a non-canonical address: no references at all', () => {
    const r = run(guest(4), 4, vm(4, slot()), { gva: 0x800000000000n, kind: 'read', cpl: 0 });
    expect(r.end).toBe('guest-fault');
    expect(r.refs).toEqual([]);
  });

  test('a guest table outside every memslot: the miss is an MMIO exit and the walk ends at it', () => {
    const g = guest(4);
    g.mem.set(0x101010n, 0x900000n | P | W | U | A); // the PD moves to GPA 9 MiB, beyond slot 1
    g.mem.set(0x900018n, 0x103000n | P | W | U | A);
    const tdp = vm(4, slot());
    mapAll(tdp, g);
    const r = run(g, 4, tdp);
    expect(r.end).toBe('tdp-exit');
    expect(shape(r.refs)).toEqual(['T4', 'T3', 'T2', 'T1', 'G4', 'T4', 'T3', 'T2', 'T1', 'G3', 'T4', 'T3', 'T2']);
    expect(r.refs.at(-1)).toMatchObject({ gpa: 0x900018n, hit: false, fault: { kind: 'mmio' } });
    expect(r.totals).toMatchObject({ references: 13, tdpMisses: 1 });
  });
});

describe('copyTdp', () => {
  test('a fault on the copy does what the same fault does on an identical model, and the original is untouched', () => {
    const make = () => {
      const t = vm(4, slot({ backing: thp, baseGfn: 0x200, npages: 1024, hva: H + 0x200000n }));
      t.fault(0, 0x200, { write: false });
      return t;
    };
    const a = make();
    const b = make();
    const before = a.mappings(0);
    const c = copyTdp(a);
    for (const gfn of [0x201, 0x300, 0x480])
      expect(c.fault(0, gfn, { write: true })).toEqual(b.fault(0, gfn, { write: true }));
    expect(c.mappings(0)).toEqual(b.mappings(0));
    expect(c.events).toEqual(b.events);
    expect(a.mappings(0)).toEqual(before);
    expect(c.slots.list(0)).toEqual(a.slots.list(0));
    expect(Object.isFrozen(c.slots.list(0)[0])).toBe(true);
  });
});

describe('copyTdp: plain data only', () => {
  test('refuses while a walk is open, and names where it meets a function', () => {
    const t = vm(4, slot());
    const w = t.walk(0, 0, 1, null);
    expect(() => copyTdp(t)).toThrow('copyTdp: a walk of the TDP model is open');
    w.return();
    const poke = (f: (x: Record<string, unknown>) => void, path: string) => {
      const u = vm(4, slot());
      f(u as unknown as Record<string, unknown>);
      expect(() => copyTdp(u)).toThrow(`copyTdp: ${path} is a function; the model is no longer plain data`);
    };
    const dirty = (x: Record<string, unknown>) => x.dirty as Map<unknown, unknown>;
    poke((x) => (x.extra = () => 0), 'tdp.extra');
    poke((x) => dirty(x).set(7, () => 0), 'tdp.dirty.get()');
    poke((x) => dirty(x).set(() => 0, 1), 'tdp.dirty.key');
    poke((x) => dirty(x).set(8, new Set([() => 0])), 'tdp.dirty.get().has()');
    poke((x) => (x.events as unknown[]).push(() => 0), 'tdp.events[0]');
  });

  test('keeps shared references shared and copies typed arrays', () => {
    const t = vm(4, slot());
    t.fault(0, 0x100, { write: true });
    t.slots.find(0, 0x100); // the lookup cache now holds the slot the list holds
    const c = copyTdp(t);
    const last = (c.slots as unknown as { last: unknown[] }).last;
    expect(last[0]).toBe(c.slots.list(0)[0]);
    expect(c.root(0).spte).toBeInstanceOf(t.root(0).spte.constructor);
    expect(c.root(0).spte).not.toBe(t.root(0).spte);
    c.zap(0, 0, 2 ** 36);
    expect(t.lookup(0, 0x100)?.level).toBe(1);
  });
});

describe('TDP references at their addresses', () => {
  test('a TDP reference is the address of the SPTE read: its table and 8 bytes per index', () => {
    const g = guest(4, { data: 0x300000n });
    const tdp = vm(4, slot());
    mapAll(tdp, g);
    const r = run(g, 4, tdp);
    // GFN 0x300 is entry 0x100 of its last-level table, entry 1 of its level-2 table.
    const last = r.refs.filter((x) => x.kind === 'tdp').slice(-4);
    expect(last.map((x) => Number(x.hostAddr! & 0xfffn))).toEqual([0, 0, 8, 0x800]);
  });

  test('a 2 MiB TDP leaf translates with the page offset inside it', () => {
    const g = guest(4);
    const tdp = vm(4, slot({ backing: thp, baseGfn: 0, npages: 1024, hva: H }));
    mapAll(tdp, g);
    const leaf = tdp.lookup(0, 0x104)!;
    expect(leaf.level).toBe(2);
    const r = run(g, 4, tdp);
    const pfn = BigInt(sptePfn(leaf.spte));
    expect(r.refs.at(-1)).toMatchObject({ kind: 'data', hostAddr: ((pfn + 0x104n) << 12n) | 0x56n });
  });
});

describe('misses the TDP model resolves in place', () => {
  test('everything mapped: no TDP reference misses', () => {
    const g = guest(4);
    const tdp = vm(4, slot());
    mapAll(tdp, g);
    expect(run(g, 4, tdp).totals.tdpMisses).toBe(0);
  });

  test('a write-protected leaf: the fast path restores W and the walk goes on to the data', () => {
    const g = guest(4);
    const tdp = vm(4, slot());
    mapAll(tdp, g);
    tdp.writeProtect(0, 0, 2 ** 36);
    const r = run(g, 4, tdp, write, { faultIn: true });
    expect(r.end).toBe('data');
    expect(r.refs.find((x) => x.fault)?.fault?.kind).toBe('fast');
  });

  test('an instruction fetch misses on a huge leaf that NX huge pages made non-executable, and maps 4 KiB', () => {
    const g = guest(4);
    const tdp = new Tdp(new Memslots({ maxGfn: 2 ** 36 }), { levels: 4, nxHugePages: true });
    tdp.setMemslot(slot({ backing: thp, baseGfn: 0, npages: 1024, hva: H }));
    mapAll(tdp, g);
    const r = run(g, 4, tdp, { gva: GVA, kind: 'exec', cpl: 0 }, { faultIn: true });
    expect(r.end).toBe('data');
    const miss = r.refs.find((x) => x.kind === 'tdp' && !x.hit)!;
    expect([miss.tdpLevel, miss.fault?.kind, miss.fault?.level]).toEqual([2, 'map', 1]);
  });
});

// Expected values below are worked out by hand from the rules (KVM's TDP MMU
// and arm64 stage-2), not captured from the model.

import { describe, expect, test } from 'vitest';
import { HUGE_ZERO_PFN, ZERO_PFN } from '../src/model/host-mm.js';
import { Memslots, type Memslot } from '../src/model/memslots.js';
import { SPTE_LEAF, SPTE_P, SPTE_W, armLevel, decodeSpte, fromArmLevel, makeSpte, sptePfn } from '../src/model/spte.js';
import { Table, tdpIter, type Flush } from '../src/model/tdp-iter.js';
import { Tdp, slotMaxLevel, type TdpEvent, type TdpOptions } from '../src/model/tdp.js';

const H = 0x7f0000000000n; // 1 GiB-aligned HVA
const BASE = 0x100000; // GFN of GPA 4 GiB, 1 GiB-aligned
const G1 = 512 * 512; // 4 KiB pages in 1 GiB

function slot(p: Partial<Memslot> = {}): Memslot {
  return {
    slot: 0,
    asId: 0,
    baseGfn: BASE,
    npages: 1024,
    hva: H,
    flags: { logDirty: false, readonly: false },
    backing: { kind: 'anon', pageSize: 4096 },
    ...p,
  };
}
const hugetlb2m = { kind: 'hugetlb2m', pageSize: 2 << 20 } as const;
const hugetlb1g = { kind: 'hugetlb1g', pageSize: 1 << 30 } as const;
const thp = { kind: 'thp', pageSize: 2 << 20 } as const;

function vm(opts: TdpOptions = {}, ...slots: Memslot[]) {
  const maxGfn = opts.arch === 'arm64' ? 2 ** 28 : opts.levels === 5 ? 2 ** 45 : 2 ** 36;
  const ms = new Memslots({ asIds: opts.arch === 'arm64' ? 1 : 2, maxGfn });
  const tdp = new Tdp(ms, opts);
  for (const s of slots) tdp.setMemslot(s);
  return { ms, tdp };
}

function kinds(events: TdpEvent[]): string[] {
  return events.map((e) => (e.kind === 'spte' ? `spte@${e.level}` : e.kind));
}

// A small hand-built tree, root level 3:
//   root[0] -> A (level 2, gfn 0): A[0] -> B (level 1): B[0], B[1] 4 KiB leaves
//                                  A[1] = 2 MiB leaf at gfn 512
//   root[1] = 1 GiB leaf at gfn 262144
function smallTree(): Table {
  const leaf = (pfn: number) => makeSpte(pfn, SPTE_P | SPTE_LEAF | SPTE_W);
  const link = (parent: Table, i: number, child: Table) => {
    parent.spte[i] = makeSpte(child.id, SPTE_P | SPTE_W);
    parent.child![i] = child;
  };
  const root = new Table(1, 3, 0);
  const a = new Table(2, 2, 0);
  const b = new Table(3, 1, 0);
  link(root, 0, a);
  link(a, 0, b);
  b.spte[0] = leaf(100);
  b.spte[1] = leaf(101);
  a.spte[1] = leaf(512);
  root.spte[1] = leaf(G1);
  return root;
}

function visit(root: Table, start: number, end: number, only?: 'all' | 'present' | 'presentLeaf'): [number, number][] {
  const seen: [number, number][] = [];
  for (const it of tdpIter(root, start, end, { only })) seen.push([it.level, it.gfn]);
  return seen;
}

describe('tdpIter', () => {
  test('pre-order over a small tree, by filter', () => {
    const root = smallTree();
    expect(visit(root, 0, 2 * G1, 'present')).toEqual([
      [3, 0],
      [2, 0],
      [1, 0],
      [1, 1],
      [2, 512],
      [3, G1],
    ]);
    expect(visit(root, 0, 2 * G1, 'presentLeaf')).toEqual([
      [1, 0],
      [1, 1],
      [2, 512],
      [3, G1],
    ]);
    expect(visit(root, 0, 3, 'all')).toEqual([
      [3, 0],
      [2, 0],
      [1, 0],
      [1, 1],
      [1, 2],
    ]);
  });

  test('a range starting and ending mid-table', () => {
    const root = smallTree();
    const all = visit(root, 1, 513, 'all');
    // root[0], A[0], B[1..511], A[1]: 2 + 511 + 1 entries
    expect(all.length).toBe(514);
    expect(all.slice(0, 3)).toEqual([
      [3, 0],
      [2, 0],
      [1, 1],
    ]);
    expect(all.slice(-2)).toEqual([
      [1, 511],
      [2, 512],
    ]);
    // Starting at 600 the walk goes down to A[1] and never sees B.
    expect(visit(root, 600, G1 + 1, 'present')).toEqual([
      [3, 0],
      [2, 512],
      [3, G1],
    ]);
    expect(visit(root, 0, 2, 'presentLeaf')).toEqual([
      [1, 0],
      [1, 1],
    ]);
    expect(visit(root, 5, 5, 'all')).toEqual([]);
  });

  test('the state of tdp_iter is visible', () => {
    const root = smallTree();
    const it = tdpIter(root, 1, 2);
    const steps: { level: number; gfn: number; index: number; table: number; pfn: number }[] = [];
    for (const e of it)
      steps.push({ level: e.level, gfn: e.gfn, index: e.index, table: e.table.id, pfn: sptePfn(e.old) });
    expect(steps).toEqual([
      { level: 3, gfn: 0, index: 0, table: 1, pfn: 2 },
      { level: 2, gfn: 0, index: 0, table: 2, pfn: 3 },
      { level: 1, gfn: 1, index: 1, table: 3, pfn: 101 },
    ]);
  });

  test('early stop runs the clean-up exactly once and reports the pending flush', () => {
    const root = smallTree();
    let released = 0;
    const flushed: Flush[][] = [];
    const it = tdpIter(root, 0, 2 * G1, {
      only: 'presentLeaf',
      onRelease: () => released++,
      onFlush: (r) => flushed.push(r),
    });
    let n = 0;
    for (const e of it) {
      e.flush(e.gfn, e.level);
      if (++n === 2) break;
    }
    expect(released).toBe(1);
    expect(flushed).toEqual([[{ start: 0, end: 2 }]]);
    expect(it.held).toBe(false);
    it.return();
    expect(it.next().done).toBe(true);
    expect(released).toBe(1);

    // A throw inside the loop releases too.
    let released2 = 0;
    expect(() => {
      for (const e of tdpIter(root, 0, 10, { onRelease: () => released2++ }))
        if (e.level === 1) throw new Error('stop');
    }).toThrow('stop');
    expect(released2).toBe(1);

    // Running to the end releases once; return() afterwards does nothing more.
    let released3 = 0;
    const it3 = tdpIter(root, 0, 10, { onRelease: () => released3++ });
    for (const e of it3) void e;
    it3.return();
    expect(released3).toBe(1);
  });

  test('yield points: resched restarts from the root and always makes progress', () => {
    const root = smallTree();
    const seen: [number, number][] = [];
    const flushed: Flush[][] = [];
    const it = tdpIter(root, 0, 2 * G1, { only: 'present', yieldEvery: 2, onFlush: (r) => flushed.push(r) });
    for (const e of it) {
      if (e.yieldPoint && e.resched()) continue;
      seen.push([e.level, e.gfn]);
      if (e.old & SPTE_LEAF) e.flush(e.gfn, e.level);
    }
    // 2nd entry: no progress yet, no yield. 4th (B[1]): yields, restart at gfn 1.
    // 6th (A[0] again): refused. 8th (A[1]): yields, restart at 512. 10th: refused.
    expect(seen).toEqual([
      [3, 0],
      [2, 0],
      [1, 0],
      [3, 0],
      [2, 0],
      [1, 1],
      [3, 0],
      [2, 512],
      [3, G1],
    ]);
    expect(it.yields).toBe(2);
    expect(flushed).toEqual([
      [{ start: 0, end: 1 }],
      [{ start: 1, end: 2 }],
      [
        { start: 512, end: 1024 },
        { start: G1, end: 2 * G1 },
      ],
    ]);
  });

  test('retry hands out the same entry again, re-read, after a failed update', () => {
    const { tdp } = vm({}, slot());
    tdp.fault(0, BASE, { write: true });
    tdp.fault(0, BASE + 1, { write: true });
    const seen: [number, number, boolean][] = [];
    let raced = false;
    for (const it of tdp.walk(0, BASE, BASE + 2, null, { only: 'presentLeaf' })) {
      seen.push([it.level, it.gfn, (it.old & SPTE_W) !== 0]);
      if (!raced) {
        raced = true;
        tdp.writeProtect(0, it.gfn, it.gfn + 1); // another walk gets there first
        expect(tdp.trySet(it, 0)).toBe(false);
        expect(it.old & SPTE_W).toBe(0);
        it.retry();
        continue;
      }
    }
    expect(seen).toEqual([
      [1, BASE, true],
      [1, BASE, false],
      [1, BASE + 1, true],
    ]);
    expect(tdp.activeWalks).toBe(0);
  });

  test('5-level root: one entry per level down to a 4 KiB leaf', () => {
    const g4 = 2 ** 40 + 3 * 2 ** 27; // first GFN of the level-4 entry
    const g3 = g4 + 5 * 2 ** 18;
    const g2 = g3 + 7 * 512;
    const gfn = g2 + 9;
    const { tdp } = vm({ levels: 5 }, slot({ baseGfn: g2, npages: 16 }));
    expect(tdp.fault(0, gfn, { write: true })).toMatchObject({ kind: 'map', level: 1 });
    const path: [number, number][] = [];
    for (const it of tdpIter(tdp.root(0), gfn, gfn + 1)) path.push([it.level, it.gfn]);
    expect(path).toEqual([
      [5, 2 ** 40],
      [4, g4],
      [3, g3],
      [2, g2],
      [1, gfn],
    ]);
  });
});

describe('levels', () => {
  test('arm64 lookup levels map onto model levels', () => {
    expect([0, 1, 2, 3].map(fromArmLevel)).toEqual([4, 3, 2, 1]);
    expect(armLevel(2)).toBe(2);
    expect(armLevel(1)).toBe(3);
    expect(new Tdp(new Memslots({ asIds: 1, maxGfn: 2 ** 28 }), { arch: 'arm64', startLevel: 1 }).rootLevel).toBe(3);
    const t48 = new Tdp(new Memslots({ asIds: 1, maxGfn: 2 ** 36 }), { arch: 'arm64', startLevel: 0 });
    expect([t48.rootLevel, t48.root(0).size]).toEqual([4, 512]);
    // 40-bit IPA, start level 1: two concatenated level-1 tables.
    const t40 = new Tdp(new Memslots({ asIds: 1, maxGfn: 2 ** 28 }), { arch: 'arm64', startLevel: 1, ipaBits: 40 });
    expect([t40.root(0).size, t40.maxGfn]).toEqual([1024, 2 ** 28]);
    expect(() => new Tdp(new Memslots({ asIds: 1 }), { arch: 'arm64', startLevel: 1, ipaBits: 48 })).toThrow(
      /starts at level 0/,
    );
  });
});

describe('fault-in level', () => {
  test('host page size: 4K anon, THP 2M, hugetlb 2M and 1G', () => {
    const { tdp } = vm(
      {},
      slot({ slot: 0, baseGfn: BASE, npages: 1024 }),
      slot({ slot: 1, baseGfn: BASE + G1, npages: 1024, hva: H + 0x40000000n, backing: thp }),
      slot({ slot: 2, baseGfn: BASE + 2 * G1, npages: 1024, hva: H + 0x80000000n, backing: hugetlb2m }),
      slot({ slot: 3, baseGfn: BASE + 3 * G1, npages: G1, hva: H + 0xc0000000n, backing: hugetlb1g }),
    );
    expect(tdp.fault(0, BASE + 5, { write: true })).toMatchObject({ kind: 'map', level: 1 });
    expect(tdp.fault(0, BASE + G1 + 5, { write: true })).toMatchObject({ kind: 'map', level: 2 });
    expect(tdp.fault(0, BASE + 2 * G1 + 515, { write: true })).toMatchObject({ kind: 'map', level: 2 });
    expect(tdp.fault(0, BASE + 3 * G1 + 9, { write: true })).toMatchObject({ kind: 'map', level: 3 });
    expect(tdp.mappings(0)).toEqual([
      { start: BASE + 5, end: BASE + 6, level: 1, writable: true, executable: true },
      { start: BASE + G1, end: BASE + G1 + 512, level: 2, writable: true, executable: true },
      { start: BASE + 2 * G1 + 512, end: BASE + 2 * G1 + 1024, level: 2, writable: true, executable: true },
      { start: BASE + 3 * G1, end: BASE + 4 * G1, level: 3, writable: true, executable: true },
    ]);
  });

  test('slot rule: the huge page lies inside the slot, GPA and HVA congruent', () => {
    const s = slot({ npages: 768 });
    expect(slotMaxLevel(s, BASE + 10)).toBe(2);
    expect(slotMaxLevel(s, BASE + 600)).toBe(1); // [BASE+512, BASE+1024) runs past the slot
    expect(slotMaxLevel(slot({ npages: G1 }), BASE + 77)).toBe(3);
    expect(slotMaxLevel(slot({ baseGfn: BASE + 256, npages: 4096 }), BASE + 1024)).toBe(1); // GPA ≢ HVA mod 2M
    expect(slotMaxLevel(slot({ baseGfn: BASE + 512, npages: 2 * G1, hva: H + 0x200000n }), BASE + G1)).toBe(3);
    expect(slotMaxLevel(slot({ baseGfn: BASE + 512, npages: 2 * G1 }), BASE + G1)).toBe(2); // ≢ mod 1G

    // A hugetlb 1G page behind a slot congruent only modulo 2M maps at 2M.
    const { tdp } = vm({}, slot({ baseGfn: BASE + 512, npages: 2 * G1, hva: H, backing: hugetlb1g }));
    expect(tdp.fault(0, BASE + 512 + 3, { write: true })).toMatchObject({ level: 2 });
    // ... and one congruent modulo nothing maps at 4K.
    const v2 = vm({}, slot({ baseGfn: BASE + 256, npages: 1024, hva: H, backing: hugetlb2m }));
    expect(v2.tdp.fault(0, BASE + 256 + 300, { write: true })).toMatchObject({ level: 1 });
  });

  test('dirty logging forces 4K', () => {
    const { tdp } = vm({}, slot({ npages: G1, backing: hugetlb1g, flags: { logDirty: true, readonly: false } }));
    expect(tdp.fault(0, BASE + 1000, { write: true })).toMatchObject({ kind: 'map', level: 1 });
    expect(tdp.peekDirty(0, 0)).toEqual([BASE + 1000]);
  });

  test('read-only slot: reads map non-writable, writes are emulated', () => {
    const { tdp } = vm({}, slot({ backing: hugetlb2m, flags: { logDirty: false, readonly: true } }));
    const r = tdp.fault(0, BASE + 1);
    expect(r.level).toBe(2);
    expect(decodeSpte(r.spte)).toMatchObject({ writable: false, mmuWritable: false, hostWritable: true });
    expect(tdp.fault(0, BASE + 2, { write: true }).kind).toBe('emulate');
  });

  test('nx_huge_pages: exec faults split the huge page, huge leaves are not executable', () => {
    const { tdp } = vm({ nxHugePages: true }, slot({ npages: 1024, backing: hugetlb2m }));
    expect(tdp.fault(0, BASE + 3)).toMatchObject({ kind: 'map', level: 2 });
    expect(tdp.mappings(0)).toEqual([{ start: BASE, end: BASE + 512, level: 2, writable: true, executable: false }]);
    expect(tdp.fault(0, BASE + 4, { exec: true })).toMatchObject({ kind: 'map', level: 1 });
    // The 2M leaf was split into 512 executable 4K leaves.
    expect(tdp.mappings(0)).toEqual([{ start: BASE, end: BASE + 512, level: 1, writable: true, executable: true }]);
    expect(tdp.events.filter((e) => e.kind === 'split')).toEqual([{ kind: 'split', asId: 0, gfn: BASE, level: 2 }]);
    // A later read fault in that 2M does not rebuild the huge page over the NX-split table.
    tdp.zap(0, BASE + 7, BASE + 8);
    expect(tdp.fault(0, BASE + 7)).toMatchObject({ kind: 'map', level: 1 });
    // Another 2M block still maps huge for reads.
    expect(tdp.fault(0, BASE + 600)).toMatchObject({ level: 2 });
  });

  test('never-written anonymous memory maps the zero page read-only', () => {
    const { tdp } = vm(
      {},
      slot(),
      slot({ slot: 1, baseGfn: BASE + 4096, npages: 1024, hva: H + 0x40000000n, backing: thp }),
    );
    const r = tdp.fault(0, BASE + 9);
    expect([r.level, sptePfn(r.spte), (r.spte & SPTE_W) !== 0]).toEqual([1, ZERO_PFN, false]);
    const n = tdp.events.length;
    const w = tdp.fault(0, BASE + 9, { write: true });
    expect(w.kind).toBe('map');
    expect(sptePfn(w.spte)).not.toBe(ZERO_PFN);
    expect(w.spte & SPTE_W).toBe(SPTE_W);
    // The host's copy-on-write invalidates the page: zap, flush, then the new leaf.
    expect(tdp.events.slice(n)).toEqual([
      { kind: 'spte', asId: 0, gfn: BASE + 9, level: 1, old: r.spte, new: 0 },
      { kind: 'flush', asId: 0, ranges: [{ start: BASE + 9, end: BASE + 10 }] },
      { kind: 'spte', asId: 0, gfn: BASE + 9, level: 1, old: 0, new: w.spte },
    ]);

    // THP: the huge zero page at 2M; a write splits it and maps 4K.
    const t = tdp.fault(0, BASE + 4096 + 20);
    expect([t.level, sptePfn(t.spte), (t.spte & SPTE_W) !== 0]).toEqual([2, HUGE_ZERO_PFN, false]);
    expect(tdp.fault(0, BASE + 4096 + 21, { write: true })).toMatchObject({ kind: 'map', level: 1 });
    expect(tdp.lookup(0, BASE + 4096 + 20)).toBeUndefined();
    expect(tdp.mappings(0, BASE + 4096, BASE + 4096 + 512)).toEqual([
      { start: BASE + 4096 + 21, end: BASE + 4096 + 22, level: 1, writable: true, executable: true },
    ]);
    // A read next door now gets the 4K zero page.
    expect(sptePfn(tdp.fault(0, BASE + 4096 + 22).spte)).toBe(ZERO_PFN);
  });

  test('fast path restores write access in place; spurious faults change nothing', () => {
    const { tdp } = vm({}, slot());
    tdp.fault(0, BASE, { write: true });
    tdp.writeProtect(0, BASE, BASE + 1);
    const f = tdp.fault(0, BASE, { write: true });
    expect(f).toMatchObject({ kind: 'fast', level: 1 });
    expect(tdp.events.at(-1)).toMatchObject({ kind: 'spte', fast: true });
    expect(tdp.fault(0, BASE, { write: true }).kind).toBe('spurious');
  });

  test('no memslot: x86 caches an MMIO SPTE, a new slot replaces it', () => {
    const { tdp } = vm({});
    expect(tdp.fault(0, 0x500).kind).toBe('mmio');
    expect(decodeSpte(tdp.lookup(0, 0x500)!.spte)).toMatchObject({ mmio: true, present: false });
    tdp.setMemslot(slot({ baseGfn: 0x400, npages: 512 }));
    expect(tdp.fault(0, 0x500, { write: true })).toMatchObject({ kind: 'map', level: 1 });
  });
});

describe('zap', () => {
  test('flush covers exactly the zapped entries; a huge leaf goes whole', () => {
    const { tdp } = vm(
      {},
      slot(),
      slot({ slot: 1, baseGfn: BASE + 4096, npages: 1024, hva: H + 0x40000000n, backing: hugetlb2m }),
    );
    for (const g of [10, 11, 12]) tdp.fault(0, BASE + g, { write: true });
    tdp.fault(0, BASE + 4096 + 3, { write: true });
    const z = tdp.zap(0, BASE + 10, BASE + 12);
    expect(z.flush).toEqual([{ start: BASE + 10, end: BASE + 12 }]);
    expect(z.zapped).toBe(2);
    expect(z.removed).toEqual([]);
    expect(tdp.lookup(0, BASE + 12)?.level).toBe(1);
    expect(tdp.zap(0, BASE + 4096 + 5, BASE + 4096 + 6).flush).toEqual([
      { start: BASE + 4096, end: BASE + 4096 + 512 },
    ]);
    expect(tdp.lookup(0, BASE + 4096 + 3)).toBeUndefined();
  });

  test('x86 keeps tables unless asked; with tables the subtree is removed and torn down', () => {
    const { tdp } = vm({}, slot());
    tdp.fault(0, BASE + 1, { write: true });
    tdp.fault(0, BASE + 2, { write: true });
    tdp.fault(0, BASE + 700, { write: true });
    const z = tdp.zap(0, BASE, BASE + 512, { tables: true });
    expect(z.flush).toEqual([{ start: BASE, end: BASE + 512 }]);
    expect(z.removed.map((r) => [r.gfn, r.level, r.sptes.map((s) => s.gfn)])).toEqual([
      [BASE, 1, [BASE + 1, BASE + 2]],
    ]);
    expect(z.removed[0].table.freed).toBe(true);
    expect(kinds(tdp.events.slice(-3))).toEqual(['spte@2', 'flush', 'teardown']);
    expect(tdp.lookup(0, BASE + 700)?.level).toBe(1);
  });

  test('removeTable returns the subtree for a later teardown', () => {
    const { tdp } = vm({}, slot());
    tdp.fault(0, BASE + 1, { write: true });
    tdp.fault(0, BASE + 5, { write: true });
    const { removed, flush } = tdp.removeTable(0, BASE + 3, 1);
    expect(flush).toEqual([{ start: BASE, end: BASE + 512 }]);
    expect(removed!.sptes.map((s) => [s.gfn, s.level])).toEqual([
      [BASE + 1, 1],
      [BASE + 5, 1],
    ]);
    expect(removed!.table.freed).toBe(false);
    expect(tdp.lookup(0, BASE + 1)).toBeUndefined();
    tdp.teardown([removed!]);
    expect(removed!.table.freed).toBe(true);
    expect(tdp.events.at(-1)).toEqual({ kind: 'teardown', asId: 0, gfn: BASE, level: 1, sptes: 2 });
  });
});

describe('dirty logging', () => {
  test('enabling it splits each 2M leaf into 512 write-protected 4K leaves', () => {
    const s = slot({ npages: 1024, backing: hugetlb2m });
    const { tdp } = vm({}, s);
    const a = tdp.fault(0, BASE + 1, { write: true });
    tdp.fault(0, BASE + 513, { write: true });
    tdp.setMemslot({ ...s, flags: { logDirty: true, readonly: false } });
    expect(tdp.mappings(0)).toEqual([{ start: BASE, end: BASE + 1024, level: 1, writable: false, executable: true }]);
    expect(tdp.events.filter((e) => e.kind === 'split').length).toBe(2);
    expect(sptePfn(tdp.lookup(0, BASE + 3)!.spte)).toBe(sptePfn(a.spte) + 3);
    // A write restores W through the fast path and is logged once.
    expect(tdp.fault(0, BASE + 3, { write: true }).kind).toBe('fast');
    expect(tdp.getDirtyLog(0, 0)).toEqual([BASE + 3]);
    expect(tdp.lookup(0, BASE + 3)!.spte & SPTE_W).toBe(0);
    expect(tdp.getDirtyLog(0, 0)).toEqual([]);
  });

  test('without eager split a write splits on demand; disabling lets huge pages come back', () => {
    const s = slot({ npages: 512, backing: hugetlb2m });
    const { tdp } = vm({ eagerSplit: false }, s);
    tdp.fault(0, BASE, { write: true });
    tdp.setMemslot({ ...s, flags: { logDirty: true, readonly: false } });
    expect(tdp.mappings(0)).toEqual([{ start: BASE, end: BASE + 512, level: 2, writable: false, executable: true }]);
    expect(tdp.fault(0, BASE + 8, { write: true })).toMatchObject({ kind: 'map', level: 1 });
    expect(tdp.mappings(0)).toEqual([
      { start: BASE, end: BASE + 8, level: 1, writable: false, executable: true },
      { start: BASE + 8, end: BASE + 9, level: 1, writable: true, executable: true },
      { start: BASE + 9, end: BASE + 512, level: 1, writable: false, executable: true },
    ]);
    expect(tdp.peekDirty(0, 0)).toEqual([BASE + 8]);
    tdp.setMemslot(s);
    expect(tdp.mappings(0)).toEqual([]);
    expect(tdp.fault(0, BASE + 8)).toMatchObject({ level: 2 });
  });

  test('recoverHugeInPlace (Linux 6.13 on): logging off replaces the split table with a read-only huge leaf', () => {
    const s = slot({ npages: 512, backing: hugetlb2m });
    const { tdp } = vm({ recoverHugeInPlace: true }, s);
    const a = tdp.fault(0, BASE, { write: true });
    tdp.setMemslot({ ...s, flags: { logDirty: true, readonly: false } });
    expect(tdp.fault(0, BASE + 3, { write: true }).kind).toBe('fast');
    expect(tdp.getDirtyLog(0, 0)).toEqual([BASE + 3]);
    tdp.setMemslot(s);
    // The first present leaf's permissions: read-only after the dirty log re-protected it.
    expect(tdp.mappings(0)).toEqual([{ start: BASE, end: BASE + 512, level: 2, writable: false, executable: true }]);
    expect(sptePfn(tdp.lookup(0, BASE + 7)!.spte)).toBe(sptePfn(a.spte));
    expect(tdp.events.filter((e) => e.kind === 'teardown').length).toBe(1);
    // A write makes it writable in place by the fast path.
    expect(tdp.fault(0, BASE + 8, { write: true })).toMatchObject({ kind: 'fast', level: 2 });
    expect(tdp.mappings(0)).toEqual([{ start: BASE, end: BASE + 512, level: 2, writable: true, executable: true }]);
  });

  test('recoverHugeInPlace: NX huge pages make the recovered leaf non-executable', () => {
    const s = slot({ npages: 512, backing: hugetlb2m });
    const { tdp } = vm({ recoverHugeInPlace: true, nxHugePages: true }, s);
    tdp.fault(0, BASE, { write: true, exec: true });
    expect(tdp.mappings(0)[0]).toMatchObject({ level: 1, executable: true });
    tdp.setMemslot({ ...s, flags: { logDirty: true, readonly: false } });
    tdp.setMemslot(s);
    expect(tdp.mappings(0)).toEqual([{ start: BASE, end: BASE + 512, level: 2, writable: false, executable: false }]);
  });

  test('clearDirty removes W and D from writable leaves and flushes them', () => {
    const { tdp } = vm({}, slot());
    tdp.fault(0, BASE + 1, { write: true });
    tdp.fault(0, BASE + 2);
    tdp.fault(0, BASE + 3, { write: true });
    expect(tdp.clearDirty(0, BASE, BASE + 512)).toEqual([
      { start: BASE + 1, end: BASE + 2 },
      { start: BASE + 3, end: BASE + 4 },
    ]);
    expect(decodeSpte(tdp.lookup(0, BASE + 3)!.spte)).toMatchObject({
      writable: false,
      dirty: false,
      mmuWritable: true,
    });
  });

  test('split of a 1G leaf goes through 2M to 4K', () => {
    const { tdp } = vm({}, slot({ npages: G1, backing: hugetlb1g }));
    tdp.fault(0, BASE, { write: true });
    expect(tdp.split(0, BASE, BASE + G1, 2).split).toBe(1);
    expect(tdp.mappings(0)).toEqual([{ start: BASE, end: BASE + G1, level: 2, writable: true, executable: true }]);
    expect(tdp.split(0, BASE, BASE + G1, 1)).toEqual({ split: 512, flush: [] });
    expect(tdp.mappings(0)).toEqual([{ start: BASE, end: BASE + G1, level: 1, writable: true, executable: true }]);
  });
});

describe('table replaced by a huge leaf', () => {
  test('x86: set the leaf, flush, then tear the table down', () => {
    const s = slot({ npages: 512, backing: hugetlb2m, flags: { logDirty: true, readonly: false } });
    const { ms, tdp } = vm({}, s);
    tdp.fault(0, BASE + 1, { write: true });
    ms.set({ ...s, flags: { logDirty: false, readonly: false } }); // no collapse pass
    const n = tdp.events.length;
    expect(tdp.fault(0, BASE + 2, { write: true })).toMatchObject({ kind: 'map', level: 2 });
    expect(kinds(tdp.events.slice(n))).toEqual(['spte@2', 'flush', 'teardown']);
    expect(tdp.events[n + 1]).toEqual({ kind: 'flush', asId: 0, ranges: [{ start: BASE, end: BASE + 512 }] });
  });

  test('arm64: break-before-make, then the removed table is torn down', () => {
    const s = slot({ npages: 512, backing: hugetlb2m, flags: { logDirty: true, readonly: false } });
    const { tdp } = vm({ arch: 'arm64' }, s);
    tdp.fault(0, BASE + 1, { write: true });
    tdp.fault(0, BASE + 2, { write: true });
    tdp.setMemslot({ ...s, flags: { logDirty: false, readonly: false } });
    const n = tdp.events.length;
    const r = tdp.fault(0, BASE + 3, { write: true });
    expect(r).toMatchObject({ kind: 'map', level: 2 });
    const ev = tdp.events.slice(n);
    expect(kinds(ev)).toEqual(['spte@2', 'flush', 'spte@2', 'teardown']);
    expect(ev[0]).toMatchObject({ gfn: BASE, new: 0 });
    expect(ev[1]).toEqual({ kind: 'flush', asId: 0, ranges: [{ start: BASE, end: BASE + 512 }] });
    expect(ev[2]).toMatchObject({ old: 0, new: r.spte });
    expect(ev[3]).toEqual({ kind: 'teardown', asId: 0, gfn: BASE, level: 1, sptes: 2 });
  });

  test('arm64: logging breaks a block into an empty table, one page mapped', () => {
    const s = slot({ npages: 512, backing: hugetlb2m });
    const { tdp } = vm({ arch: 'arm64' }, s);
    expect(tdp.fault(0, BASE + 4, { write: true })).toMatchObject({ level: 2 });
    tdp.setMemslot({ ...s, flags: { logDirty: true, readonly: false } });
    const n = tdp.events.length;
    expect(tdp.fault(0, BASE + 6, { write: true })).toMatchObject({ kind: 'map', level: 1 });
    expect(kinds(tdp.events.slice(n))).toEqual(['spte@2', 'flush', 'spte@2', 'spte@1']);
    expect(tdp.mappings(0)).toEqual([{ start: BASE + 6, end: BASE + 7, level: 1, writable: true, executable: false }]);
  });

  test('arm64: exec permission is added in place on an exec fault', () => {
    const { tdp } = vm({ arch: 'arm64' }, slot());
    tdp.fault(0, BASE, { write: true });
    expect(tdp.fault(0, BASE, { exec: true })).toMatchObject({ kind: 'relax', level: 1 });
    expect(decodeSpte(tdp.lookup(0, BASE)!.spte)).toMatchObject({ writable: true, executable: true });
  });
});

describe('host changes through the HVA-range walk', () => {
  test('munmap zaps the alias in both address spaces; later faults get EFAULT', () => {
    const { tdp } = vm({}, slot(), slot({ asId: 1 }));
    tdp.fault(0, BASE + 1, { write: true });
    tdp.fault(1, BASE + 1, { write: true });
    const r = tdp.invalidateHva(H, H + 0x2000n, 'munmap');
    // The VMA is split at H + 8 KiB, inside the 2 MiB at H that lies wholly in the VMA:
    // __split_vma -> vma_adjust_trans_huge notifies that 2 MiB first, then the unmap its range.
    expect(r.ranges.map((g) => [g.asId, g.start, g.end])).toEqual([
      [0, BASE, BASE + 512],
      [1, BASE, BASE + 512],
      [0, BASE, BASE + 2],
      [1, BASE, BASE + 2],
    ]);
    expect(r.flush).toEqual([
      { start: BASE + 1, end: BASE + 2 },
      { start: BASE + 1, end: BASE + 2 },
    ]);
    expect(tdp.lookup(0, BASE + 1)).toBeUndefined();
    expect(tdp.lookup(1, BASE + 1)).toBeUndefined();
    expect(tdp.fault(0, BASE + 1).kind).toBe('efault');
  });

  // __split_vma -> vma_adjust_trans_huge -> split_huge_pmd_address notifies the whole 2 MiB
  // around a split address that is not 2 MiB aligned, whenever that 2 MiB lies inside the VMA,
  // a huge page there or not (mm/huge_memory.c, Linux 6.1 to 7.2).
  test('mprotect of the last pages of a 2 MiB-aligned anonymous slot zaps the whole 2 MiB; the same protection again, nothing', () => {
    const { tdp } = vm({}, slot({ npages: 512 }));
    tdp.fault(0, BASE, { write: true });
    const r = tdp.invalidateHva(H + 0x1fe000n, H + 0x200000n, 'mprotect', 'read');
    expect(r.ranges.map((g) => [g.start, g.end])).toEqual([
      [BASE, BASE + 512],
      [BASE + 510, BASE + 512],
    ]);
    expect(r.flush).toEqual([{ start: BASE, end: BASE + 1 }]);
    expect(tdp.lookup(0, BASE)).toBeUndefined();
    tdp.fault(0, BASE, { write: true });
    const again = tdp.invalidateHva(H + 0x1fe000n, H + 0x200000n, 'mprotect', 'read');
    expect(again.ranges).toEqual([]);
    expect(tdp.lookup(0, BASE)).toBeDefined();
  });

  test('a split whose 2 MiB leaves the VMA, or at a 2 MiB boundary, notifies only the range', () => {
    const { tdp } = vm(
      {},
      slot({ hva: H + 0x1000n, npages: 512 }),
      slot({ slot: 1, baseGfn: BASE + 4096, hva: H + 0x40000000n }),
    );
    tdp.fault(0, BASE + 100, { write: true });
    expect(tdp.invalidateHva(H + 0x2000n, H + 0x3000n, 'mprotect', 'read').ranges.map((g) => [g.start, g.end])).toEqual(
      [[BASE + 1, BASE + 2]],
    );
    // Slot 1 (4 MiB at a 1 GiB boundary): a protection of its second 2 MiB splits at 2 MiB boundaries only.
    const r = tdp.invalidateHva(H + 0x40200000n, H + 0x40400000n, 'mprotect', 'none');
    expect(r.ranges.map((g) => [g.start, g.end])).toEqual([[BASE + 4096 + 512, BASE + 4096 + 1024]]);
  });

  test('MADV_HUGEPAGE of the last page of an anonymous VMA whose last 2 MiB lies inside it zaps that 2 MiB', () => {
    // 2 MiB + 4 KiB ending at a 2 MiB boundary; the first page unmapped leaves a VMA of exactly one aligned 2 MiB.
    const { tdp } = vm({}, slot({ hva: H - 0x1000n, npages: 513 }));
    tdp.invalidateHva(H - 0x1000n, H, 'munmap');
    tdp.fault(0, BASE + 512);
    const r = tdp.invalidateHva(H + 0x1ff000n, H + 0x200000n, 'hugepage');
    expect(r.ranges.map((g) => [g.start, g.end])).toEqual([[BASE + 1, BASE + 513]]);
    expect(tdp.lookup(0, BASE + 512)).toBeUndefined();
    // Nothing more when the advice is already there.
    tdp.fault(0, BASE + 512);
    expect(tdp.invalidateHva(H + 0x1ff000n, H + 0x200000n, 'hugepage').ranges).toEqual([]);
  });

  test('adjacent anonymous slots are one VMA: a split near their boundary notifies the 2 MiB across both', () => {
    // Slot 0: [H + 1 MiB, H + 2 MiB); slot 1 right after it: [H + 2 MiB, H + 4 MiB).
    const { tdp } = vm(
      {},
      slot({ hva: H + 0x100000n, npages: 256 }),
      slot({ slot: 1, baseGfn: BASE + 4096, hva: H + 0x200000n, npages: 512 }),
    );
    tdp.fault(0, BASE + 255, { write: true });
    const r = tdp.invalidateHva(H + 0x300000n, H + 0x301000n, 'mprotect', 'read');
    expect(r.ranges.map((g) => [g.start, g.end])).toEqual([
      [BASE + 4096, BASE + 4096 + 512],
      [BASE + 4096 + 256, BASE + 4096 + 257],
    ]);
    // The split at H + 3 MiB lay in the VMA [H + 1 MiB, H + 4 MiB): the 2 MiB at H + 2 MiB, slot 1's first.
    // One at H + 1.5 MiB: the 2 MiB [H, H + 2 MiB) starts below the VMA, so only its own page.
    const low = tdp.invalidateHva(H + 0x180000n, H + 0x181000n, 'mprotect', 'read');
    expect(low.ranges.map((g) => [g.start, g.end])).toEqual([[BASE + 128, BASE + 129]]);
    expect(tdp.lookup(0, BASE + 255)).toBeDefined();
  });

  test('a memfd slot is a VMA of its own; a hugetlb slot splits only at huge-page boundaries', () => {
    const memfd = { kind: 'memfd', pageSize: 4096 } as const;
    const { tdp } = vm(
      {},
      slot({ npages: 512, backing: memfd }),
      slot({ slot: 1, baseGfn: BASE + 4096, hva: H + 0x200000n, npages: 512 }),
      slot({ slot: 2, baseGfn: BASE + 8192, hva: H + 0x40000000n, npages: 512, backing: hugetlb2m }),
    );
    tdp.fault(0, BASE + 1, { write: true });
    tdp.fault(0, BASE + 8192, { write: true });
    // The memfd's VMA is its slot: the 2 MiB at H lies in it.
    expect(tdp.invalidateHva(H + 0x1000n, H + 0x2000n, 'mprotect', 'read').ranges.map((g) => [g.start, g.end])).toEqual(
      [
        [BASE, BASE + 512],
        [BASE + 1, BASE + 2],
      ],
    );
    // Anonymous slot 1 does not merge with the memfd below it: [H + 2 MiB - 4 KiB ...) is another VMA.
    expect(
      tdp.invalidateHva(H + 0x201000n, H + 0x202000n, 'mprotect', 'read').ranges.map((g) => [g.start, g.end]),
    ).toEqual([
      [BASE + 4096, BASE + 4096 + 512],
      [BASE + 4097, BASE + 4098],
    ]);
    const huge = tdp.invalidateHva(H + 0x40001000n, H + 0x40002000n, 'mprotect', 'read');
    expect(huge.ranges.map((g) => [g.start, g.end])).toEqual([[BASE + 8193, BASE + 8194]]);
  });

  test('MADV_HUGEPAGE over an aligned 2 MiB of an anonymous slot lets a write map a THP there; the rest stays 4 KiB', () => {
    const { tdp } = vm({}, slot());
    expect(tdp.fault(0, BASE + 1, { write: true })).toMatchObject({ level: 1 });
    expect(tdp.invalidateHva(H + 0x200000n, H + 0x400000n, 'hugepage').ranges).toEqual([]);
    expect(tdp.fault(0, BASE + 600, { write: true })).toMatchObject({ level: 2 });
    expect(tdp.fault(0, BASE + 2, { write: true })).toMatchObject({ level: 1 });
  });

  test('mprotect of part of a THP splits it: the 2 MiB is notified and refaults at 4 KiB', () => {
    const { tdp } = vm({}, slot({ backing: thp }));
    expect(tdp.fault(0, BASE + 1, { write: true })).toMatchObject({ level: 2 });
    const r = tdp.invalidateHva(H + 0x1000n, H + 0x2000n, 'mprotect', 'read');
    expect(r.ranges.map((g) => [g.start, g.end])).toEqual([
      [BASE, BASE + 512],
      [BASE + 1, BASE + 2],
    ]);
    expect(tdp.fault(0, BASE + 2, { write: true })).toMatchObject({ level: 1 });
  });

  test('DONTNEED of part of a THP notifies the whole 2M', () => {
    const { tdp } = vm({}, slot({ backing: thp }));
    expect(tdp.fault(0, BASE + 1, { write: true })).toMatchObject({ level: 2 });
    const r = tdp.invalidateHva(H + 0x1000n, H + 0x2000n, 'dontneed');
    expect(r.flush).toEqual([{ start: BASE, end: BASE + 512 }]);
    // The rest of the THP is still there at 4K; the dropped page reads as zero.
    expect(tdp.fault(0, BASE + 2)).toMatchObject({ level: 1 });
    expect(decodeSpte(tdp.lookup(0, BASE + 2)!.spte).writable).toBe(true);
    expect(sptePfn(tdp.fault(0, BASE + 1).spte)).toBe(ZERO_PFN);
  });
});

describe('wrong-model switches', () => {
  test('levelOffByOne maps one level lower', () => {
    const ok = vm({}, slot({ backing: hugetlb2m }));
    const bad = vm({ wrong: { levelOffByOne: true } }, slot({ backing: hugetlb2m }));
    expect(ok.tdp.fault(0, BASE, { write: true }).level).toBe(2);
    expect(bad.tdp.fault(0, BASE, { write: true }).level).toBe(1);
    const okG = vm({}, slot({ npages: G1, backing: hugetlb1g }));
    const badG = vm({ wrong: { levelOffByOne: true } }, slot({ npages: G1, backing: hugetlb1g }));
    expect(okG.tdp.fault(0, BASE).level).toBe(3);
    expect(badG.tdp.fault(0, BASE).level).toBe(2);
  });

  test('zapOneShort leaves the last page mapped', () => {
    for (const [wrong, flush, left] of [
      [false, { start: BASE + 10, end: BASE + 13 }, undefined],
      [true, { start: BASE + 10, end: BASE + 12 }, 1],
    ] as const) {
      const { tdp } = vm({ wrong: { zapOneShort: wrong } }, slot());
      for (const g of [10, 11, 12]) tdp.fault(0, BASE + g, { write: true });
      expect(tdp.zap(0, BASE + 10, BASE + 13).flush).toEqual([flush]);
      expect(tdp.lookup(0, BASE + 12)?.level).toBe(left);
    }
  });
});

describe('dirty-log harvests', () => {
  const logging = (p: Partial<Memslot> = {}) => slot({ flags: { logDirty: true, readonly: false }, ...p });
  const errno = (fn: () => unknown, re: RegExp) => expect(fn).toThrow(re);

  test('KVM_CLEAR_DIRTY_LOG takes the logged pages of [first, first + count) of the slot, sorted, and re-protects them', () => {
    const { tdp } = vm({}, logging());
    for (const g of [5, 1, 3, 9]) tdp.fault(0, BASE + g, { write: true });
    expect(tdp.peekDirty(0, 0)).toEqual([BASE + 1, BASE + 3, BASE + 5, BASE + 9]);
    expect(tdp.clearDirtyLog(0, 0, 2, 4)).toEqual([BASE + 3, BASE + 5]);
    expect(tdp.peekDirty(0, 0)).toEqual([BASE + 1, BASE + 9]);
    expect(tdp.lookup(0, BASE + 3)!.spte & SPTE_W).toBe(0);
    expect(tdp.lookup(0, BASE + 1)!.spte & SPTE_W).not.toBe(0);
    expect(tdp.clearDirtyLog(0, 0, 5, 4)).toEqual([]); // ends just below BASE + 9
    expect(tdp.clearDirtyLog(0, 0, 1, 1)).toEqual([BASE + 1]);
    expect(tdp.clearDirtyLog(0, 0, 9, 1)).toEqual([BASE + 9]);
    expect(tdp.peekDirty(0, 0)).toEqual([]);
  });

  test('KVM_GET_DIRTY_LOG gives the pages sorted; both harvests refuse a missing slot or one that does not log', () => {
    const { tdp } = vm({}, logging(), slot({ slot: 1, baseGfn: BASE + 1024, hva: H + 0x400000n }));
    for (const g of [5, 1, 3]) tdp.fault(0, BASE + g, { write: true });
    expect(tdp.getDirtyLog(0, 0)).toEqual([BASE + 1, BASE + 3, BASE + 5]);
    errno(() => tdp.getDirtyLog(0, 7), /EINVAL: no slot 7 in as_id 0/);
    errno(() => tdp.getDirtyLog(0, 1), /EINVAL: slot 1 does not log dirty pages/);
    errno(() => tdp.clearDirtyLog(0, 7, 0, 1), /EINVAL: no slot 7 in as_id 0/);
    errno(() => tdp.clearDirtyLog(0, 1, 0, 1), /EINVAL: slot 1 does not log dirty pages/);
    expect(tdp.peekDirty(0, 7)).toEqual([]);
  });

  test('a harvest re-protects only the harvested writable leaves, in one flush', () => {
    const { tdp } = vm({}, logging());
    tdp.fault(0, BASE + 2); // the zero page: read-only, not logged
    tdp.fault(0, BASE + 1, { write: true });
    tdp.fault(0, BASE + 3, { write: true });
    const n = tdp.events.length;
    expect(tdp.getDirtyLog(0, 0)).toEqual([BASE + 1, BASE + 3]);
    expect(kinds(tdp.events.slice(n))).toEqual(['spte@1', 'spte@1', 'flush']);
    expect(tdp.events.at(-1)).toEqual({
      kind: 'flush',
      asId: 0,
      ranges: [
        { start: BASE + 1, end: BASE + 2 },
        { start: BASE + 3, end: BASE + 4 },
      ],
    });
  });

  test('each address space logs its own slots', () => {
    const { tdp } = vm({}, logging(), logging({ asId: 1 }));
    tdp.fault(1, BASE + 4, { write: true });
    expect(tdp.peekDirty(0, 0)).toEqual([]);
    expect(tdp.peekDirty(1, 0)).toEqual([BASE + 4]);
  });
});

describe('yield points in range operations', () => {
  // Every 4th entry handed out is a yield point: the pending flush goes out, and the walk
  // restarts at that entry. Eight 4 KiB leaves: yields at the 4th and the 7th, so three flushes.
  const flushes = (events: TdpEvent[]) =>
    events.filter((e) => e.kind === 'flush').map((e) => (e.kind === 'flush' ? e.ranges : []));
  const eight = () => {
    const { tdp } = vm({ yieldEvery: 4 }, slot());
    for (let g = 0; g < 8; g++) tdp.fault(0, BASE + g, { write: true });
    return { tdp, n: tdp.events.length };
  };
  const thirds = [
    [{ start: BASE, end: BASE + 3 }],
    [{ start: BASE + 3, end: BASE + 6 }],
    [{ start: BASE + 6, end: BASE + 8 }],
  ];

  test('write protection', () => {
    const { tdp, n } = eight();
    expect(tdp.writeProtect(0, BASE, BASE + 8)).toEqual(thirds.flat());
    expect(flushes(tdp.events.slice(n))).toEqual(thirds);
    expect(tdp.mappings(0)).toEqual([{ start: BASE, end: BASE + 8, level: 1, writable: false, executable: true }]);
  });

  test('clearing dirty bits', () => {
    const { tdp, n } = eight();
    tdp.clearDirty(0, BASE, BASE + 8);
    expect(flushes(tdp.events.slice(n))).toEqual(thirds);
  });

  test('a zap: tables count as entries, and a restart hands them out again', () => {
    // Tables at levels 4, 3, 2, then leaves: the 4th entry (B) is where the walk started, so it does not
    // yield; the 8th (B + 4) does, and the restart hands out three tables and B + 4 again.
    const { tdp, n } = eight();
    tdp.zap(0, BASE, BASE + 8);
    expect(flushes(tdp.events.slice(n))).toEqual([
      [{ start: BASE, end: BASE + 4 }],
      [{ start: BASE + 4, end: BASE + 8 }],
    ]);
  });

  test('the dirty-log harvest', () => {
    const { tdp } = vm({ yieldEvery: 4 }, slot({ flags: { logDirty: true, readonly: false } }));
    for (let g = 0; g < 8; g++) tdp.fault(0, BASE + g, { write: true });
    const n = tdp.events.length;
    tdp.getDirtyLog(0, 0);
    expect(flushes(tdp.events.slice(n))).toEqual(thirds);
  });
});

describe('memslot deletion and moves', () => {
  const b = slot({ slot: 1, baseGfn: BASE + 1024, hva: H + 0x400000n });
  const setup = (opts: TdpOptions) => {
    const two = opts.arch !== 'arm64';
    const { tdp } = vm(opts, slot(), b, ...(two ? [slot({ asId: 1 })] : []));
    tdp.fault(0, BASE + 1, { write: true });
    tdp.fault(0, BASE + 1025, { write: true });
    if (two) tdp.fault(1, BASE + 2, { write: true });
    return tdp;
  };

  test('x86 (kvm_mmu_zap_all_fast): deleting one slot zaps every mapping of every address space, tables too', () => {
    const tdp = setup({});
    tdp.setMemslot({ ...b, npages: 0 });
    expect([tdp.mappings(0), tdp.mappings(1)]).toEqual([[], []]);
    expect(tdp.events.filter((e) => e.kind === 'teardown').length).toBeGreaterThan(0);
    const m = setup({});
    m.setMemslot({ ...b, baseGfn: BASE + 4096 });
    expect([m.mappings(0), m.mappings(1)]).toEqual([[], []]);
  });

  test('x86 without zap-all, and arm64: only the slot goes, with its tables', () => {
    for (const opts of [{ slotZapAll: false }, { arch: 'arm64' as const }]) {
      const tdp = setup(opts);
      tdp.setMemslot({ ...b, npages: 0 });
      expect(tdp.mappings(0).map((r) => r.start)).toEqual([BASE + 1]);
      if (opts.arch !== 'arm64') expect(tdp.mappings(1).map((r) => r.start)).toEqual([BASE + 2]);
      expect(tdp.events.filter((e) => e.kind === 'teardown')).toEqual([
        { kind: 'teardown', asId: 0, gfn: BASE + 1024, level: 1, sptes: 1 },
      ]);
    }
  });
});

describe('more TDP rules', () => {
  test('the deliberately wrong level lowers huge mappings only', () => {
    const { tdp } = vm(
      { wrong: { levelOffByOne: true } },
      slot(),
      slot({ slot: 1, baseGfn: BASE + 1024, hva: H + 0x400000n, backing: hugetlb2m }),
    );
    expect(tdp.fault(0, BASE + 1, { write: true }).level).toBe(1);
    expect(tdp.fault(0, BASE + 1024, { write: true }).level).toBe(1);
  });

  test('runs of mappings break where the level or the exec permission changes', () => {
    const { tdp } = vm({ nxHugePages: true }, slot({ npages: 1024, backing: hugetlb2m }));
    tdp.fault(0, BASE + 3);
    tdp.fault(0, BASE + 3, { exec: true });
    tdp.fault(0, BASE + 512);
    tdp.writeProtect(0, BASE + 4, BASE + 5);
    expect(tdp.mappings(0)).toEqual([
      { start: BASE, end: BASE + 4, level: 1, writable: true, executable: true },
      { start: BASE + 4, end: BASE + 5, level: 1, writable: false, executable: true },
      { start: BASE + 5, end: BASE + 512, level: 1, writable: true, executable: true },
      { start: BASE + 512, end: BASE + 1024, level: 2, writable: true, executable: false },
    ]);
  });

  test('without a memslot, arm64 and x86 without MMIO caching install nothing', () => {
    for (const opts of [{ arch: 'arm64' as const }, { mmioCaching: false }]) {
      const { tdp } = vm(opts);
      expect(tdp.fault(0, 0x500)).toEqual({ kind: 'mmio', gfn: 0x500, level: 0, spte: 0 });
      expect(tdp.lookup(0, 0x500)).toBeUndefined();
    }
  });

  test('the x86 root has 4 or 5 levels, and covers every GFN the memslots allow', () => {
    expect(() => new Tdp(new Memslots(), { levels: 3 as 4 })).toThrow('x86 TDP has 4 or 5 levels, not 3');
    expect(() => new Tdp(new Memslots({ maxGfn: 2 ** 37 }))).toThrow(/memslots allow GFNs up to 137438953472/);
    expect(() => new Tdp(new Memslots()).root(2)).toThrow('no address space 2');
  });

  test('nx_huge_pages is an x86 rule: arm64 maps a huge block for an exec fault', () => {
    const { tdp } = vm({ arch: 'arm64', nxHugePages: true }, slot({ npages: 1024, backing: hugetlb2m }));
    expect(tdp.fault(0, BASE + 3, { exec: true }).level).toBe(2);
  });

  test('arm64 maps writable on a read fault unless the slot logs dirty pages, then only on a write', () => {
    const plain = vm({ arch: 'arm64' }, slot());
    expect(decodeSpte(plain.tdp.fault(0, BASE + 1, { write: true }).spte)).toMatchObject({
      writable: true,
      dirty: true,
    });
    const memfd = { kind: 'memfd', pageSize: 4096 } as const; // no zero page: a read maps the page itself
    const { tdp } = vm({ arch: 'arm64' }, slot({ backing: memfd, flags: { logDirty: true, readonly: false } }));
    tdp.fault(0, BASE + 1, { write: true });
    tdp.fault(0, BASE + 2);
    expect(decodeSpte(tdp.lookup(0, BASE + 2)!.spte)).toMatchObject({ writable: false });
    expect(tdp.fault(0, BASE + 2, { write: true }).kind).toBe('relax');
    expect(decodeSpte(tdp.lookup(0, BASE + 2)!.spte)).toMatchObject({ writable: true, dirty: true });
  });

  test('x86 splits without a flush, arm64 breaks the block first and flushes it', () => {
    const x = vm({}, slot({ npages: 512, backing: hugetlb2m }));
    x.tdp.fault(0, BASE, { write: true });
    expect(x.tdp.split(0, BASE, BASE + 512)).toEqual({ split: 1, flush: [] });
    const a = vm({ arch: 'arm64' }, slot({ npages: 512, backing: hugetlb2m }));
    a.tdp.fault(0, BASE, { write: true });
    expect(a.tdp.split(0, BASE, BASE + 512)).toEqual({ split: 1, flush: [{ start: BASE, end: BASE + 512 }] });
    expect(a.tdp.mappings(0)).toEqual([{ start: BASE, end: BASE + 512, level: 1, writable: true, executable: false }]);
  });

  test('a zap keeps x86 tables and removes stage-2 tables by default', () => {
    const x = vm({}, slot());
    x.tdp.fault(0, BASE + 1, { write: true });
    expect(x.tdp.zap(0, BASE, BASE + 512).removed).toEqual([]);
    const a = vm({ arch: 'arm64' }, slot());
    a.tdp.fault(0, BASE + 1, { write: true });
    expect(a.tdp.zap(0, BASE, BASE + 512).removed.map((r) => [r.gfn, r.level])).toEqual([[BASE, 1]]);
  });

  test('NX huge pages: 2 MiB children of a split 1 GiB leaf stay non-executable, 4 KiB ones are executable', () => {
    const { tdp } = vm({ nxHugePages: true }, slot({ npages: G1, backing: hugetlb1g }));
    tdp.fault(0, BASE);
    tdp.split(0, BASE, BASE + G1, 2);
    expect(tdp.mappings(0)).toEqual([{ start: BASE, end: BASE + G1, level: 2, writable: true, executable: false }]);
    tdp.split(0, BASE, BASE + 512, 1);
    expect(tdp.mappings(0, BASE, BASE + 512)).toEqual([
      { start: BASE, end: BASE + 512, level: 1, writable: true, executable: true },
    ]);
  });

  test('logging off recovers a 1 GiB leaf over two levels of tables from the first leaf found', () => {
    const s = slot({ npages: G1, backing: hugetlb1g });
    const { tdp } = vm({ recoverHugeInPlace: true }, s);
    const a = tdp.fault(0, BASE + 5, { write: true });
    tdp.setMemslot({ ...s, flags: { logDirty: true, readonly: false } });
    tdp.zap(0, BASE, BASE + 600); // the first 2 MiB table is left without a present leaf
    tdp.setMemslot(s);
    expect(tdp.mappings(0)).toEqual([{ start: BASE, end: BASE + G1, level: 3, writable: false, executable: true }]);
    expect(sptePfn(tdp.lookup(0, BASE)!.spte)).toBe(sptePfn(a.spte));
  });
});

describe('TDP model details', () => {
  test('a new model has logged nothing; with record off it logs nothing at all', () => {
    expect(new Tdp(new Memslots()).events).toEqual([]);
    const { tdp } = vm({ record: false }, slot());
    tdp.fault(0, BASE, { write: true });
    expect(tdp.events).toEqual([]);
  });

  test('arm64 with DIC maps memory executable on a read fault', () => {
    const { tdp } = vm({ arch: 'arm64', dic: true }, slot());
    expect(decodeSpte(tdp.fault(0, BASE + 1).spte).executable).toBe(true);
  });

  test('every table has its own id, roots included', () => {
    const { tdp } = vm({}, slot(), slot({ asId: 1 }));
    tdp.fault(0, BASE, { write: true });
    tdp.fault(1, BASE, { write: true });
    const ids = [0, 1].flatMap((as) => {
      const out: number[] = [];
      for (const it of tdpIter(tdp.root(as), BASE, BASE + 1)) out.push(it.table.id);
      return out;
    });
    expect(ids.every((id) => id > 0)).toBe(true);
    expect(new Set(ids).size).toBe(ids.length);
  });

  test('a zap with tables removes only the tables lying wholly inside the range, listing their leaves', () => {
    const { tdp } = vm({}, slot());
    for (const g of [1, 2, 3]) tdp.fault(0, BASE + g, { write: true });
    expect(tdp.zap(0, BASE + 1, BASE + 512, { tables: true }).removed).toEqual([]);
    for (const g of [1, 2, 3]) tdp.fault(0, BASE + g, { write: true });
    const { removed } = tdp.zap(0, BASE, BASE + 512, { tables: true });
    expect(removed.map((r) => [r.gfn, r.level, r.sptes.length])).toEqual([[BASE, 1, 3]]);
    const n = tdp.events.length;
    tdp.teardown(removed); // already torn down by the zap
    expect(tdp.events.length).toBe(n);
  });

  test('clearing dirty bits of a leaf that is not writable needs no flush', () => {
    const { tdp } = vm({}, slot());
    tdp.fault(0, BASE + 1, { write: true });
    tdp.writeProtect(0, BASE + 1, BASE + 2);
    expect(tdp.clearDirty(0, BASE, BASE + 2)).toEqual([]);
    expect(decodeSpte(tdp.lookup(0, BASE + 1)!.spte).dirty).toBe(false);
    // A leaf with neither W nor D (the zero page, read-only) is left alone: no SPTE change at all.
    tdp.fault(0, BASE + 5);
    const n = tdp.events.length;
    tdp.clearDirty(0, BASE + 5, BASE + 6);
    expect(tdp.events.slice(n)).toEqual([]);
  });

  test('removing the table below a huge leaf removes nothing', () => {
    const { tdp } = vm({}, slot({ npages: 512, backing: hugetlb2m }));
    tdp.fault(0, BASE, { write: true });
    expect(tdp.removeTable(0, BASE, 1)).toEqual({ removed: undefined, flush: [] });
    expect(tdp.lookup(0, BASE)?.level).toBe(2);
  });

  test('logging off keeps a table whose first page has no host page behind a huge page', () => {
    const s = slot({ npages: 1024 });
    const { tdp } = vm({}, { ...s, flags: { logDirty: true, readonly: false } });
    tdp.fault(0, BASE + 5, { write: true });
    tdp.setMemslot(s);
    expect(tdp.mappings(0)).toEqual([{ start: BASE + 5, end: BASE + 6, level: 1, writable: true, executable: true }]);
  });

  test('recovery in place leaves a table without a present leaf as it is', () => {
    const s = slot({ npages: 1024, backing: hugetlb2m });
    const { tdp } = vm({ recoverHugeInPlace: true }, s);
    tdp.fault(0, BASE, { write: true });
    tdp.fault(0, BASE + 512, { write: true });
    tdp.setMemslot({ ...s, flags: { logDirty: true, readonly: false } });
    tdp.zap(0, BASE, BASE + 512);
    tdp.setMemslot(s);
    expect(tdp.mappings(0)).toEqual([
      { start: BASE + 512, end: BASE + 1024, level: 2, writable: false, executable: true },
    ]);
  });

  test('a huge page that starts below the slot is not allowed, even when it would end inside it', () => {
    const s = slot({ baseGfn: BASE + 512, npages: G1, hva: H + 0x200000n });
    expect(slotMaxLevel(s, BASE + 1000)).toBe(2);
  });
});

describe('the TDP walk beyond 512 GiB and its flush merging', () => {
  test('a restart at a yield point finds its place in the root above 512 GiB', () => {
    const far = 2 ** 27; // GFN of GPA 512 GiB: root entry 1
    const { tdp } = vm({ yieldEvery: 4 }, slot({ baseGfn: far }));
    for (let g = 0; g < 8; g++) tdp.fault(0, far + g, { write: true });
    const n = tdp.events.length;
    tdp.writeProtect(0, far, far + 8);
    expect(tdp.events.slice(n).filter((e) => e.kind === 'flush').length).toBe(3);
    expect(tdp.mappings(0)).toEqual([{ start: far, end: far + 8, level: 1, writable: false, executable: true }]);
  });

  test('a flush range that ends where the pending one starts is merged into it', () => {
    const got: Flush[][] = [];
    const it = tdpIter(new Table(1, 2, 0), 0, 512, { onFlush: (r) => got.push(r) });
    it.flush(5, 1);
    it.flush(4, 1);
    it.flush(7, 1);
    it.flushNow();
    expect(got).toEqual([
      [
        { start: 4, end: 6 },
        { start: 7, end: 8 },
      ],
    ]);
  });
});

describe('the per-GFN picture and the counters the followers read', () => {
  test('the picture lists each GFN a leaf or an MMIO SPTE maps, a huge leaf only inside the range', () => {
    const { tdp } = vm({}, slot({ npages: 1024, backing: hugetlb2m }));
    tdp.fault(0, BASE + 3);
    tdp.fault(0, 0x500);
    const huge = { level: 2, writable: true, executable: true, mmio: false };
    expect([...tdp.picture(0, BASE + 510, BASE + 514)]).toEqual([
      [BASE + 510, huge],
      [BASE + 511, huge],
    ]);
    expect([...tdp.picture(0, 0x500, 0x501)]).toEqual([
      [0x500, { level: 1, writable: false, executable: false, mmio: true }],
    ]);
    expect(tdp.picture(0, BASE + 512, BASE + 1024).size).toBe(0);
  });

  test('page counts are per leaf level, within the range', () => {
    const { tdp } = vm(
      {},
      slot({ npages: 1024, backing: hugetlb2m }),
      slot({ slot: 1, baseGfn: BASE + 2048, hva: H + 0x800000n }),
    );
    tdp.fault(0, BASE + 3);
    tdp.fault(0, BASE + 2048, { write: true });
    tdp.fault(0, BASE + 2049, { write: true });
    expect(tdp.pageCounts(0)).toEqual([0, 2, 1, 0, 0, 0]);
    expect(tdp.pageCounts(0, BASE + 2049, BASE + 2050)).toEqual([0, 1, 0, 0, 0, 0]);
  });

  test('a flush is requested once per operation that changed a present SPTE, none for a slot deletion', () => {
    const s = slot();
    const { tdp } = vm({}, s);
    tdp.fault(0, BASE + 1, { write: true });
    tdp.fault(0, BASE + 2, { write: true });
    tdp.writeProtect(0, BASE, BASE + 512);
    expect(tdp.flushRequests).toBe(1);
    tdp.writeProtect(0, BASE, BASE + 512);
    expect(tdp.flushRequests).toBe(1);
    tdp.zap(0, BASE, BASE + 512);
    expect(tdp.flushRequests).toBe(2);
    tdp.fault(0, BASE + 1, { write: true });
    tdp.setMemslot({ ...s, npages: 0 });
    expect(tdp.flushRequests).toBe(2);
    expect(tdp.events.filter((e) => e.kind === 'roots')).toEqual([
      { kind: 'roots', asId: 0 },
      { kind: 'roots', asId: 1 },
    ]);
  });

  test('starting dirty logging requests a flush even on a slot with nothing mapped; stopping it there does not', () => {
    // kvm_mmu_slot_apply_flags flushes unconditionally once logging is on (since Linux 6.0).
    const s = slot();
    const { tdp } = vm({}, s);
    const log = { ...s, flags: { ...s.flags, logDirty: true } };
    tdp.setMemslot(log);
    expect(tdp.flushRequests).toBe(1);
    tdp.setMemslot(log);
    expect(tdp.flushRequests).toBe(1);
    tdp.setMemslot(s);
    expect(tdp.flushRequests).toBe(1);
    const quiet = vm({ wrong: { noFlush: true } }, s).tdp;
    quiet.setMemslot(log);
    expect(quiet.flushRequests).toBe(0);
  });

  test('logging turned on or off on a read-only slot changes nothing and requests no flush', () => {
    // kvm_mmu_slot_apply_flags returns at once for KVM_MEM_READONLY (Linux 6.1 to 7.2).
    const ro = slot({ flags: { logDirty: false, readonly: true }, backing: thp });
    const { tdp } = vm({}, ro);
    expect(tdp.fault(0, BASE + 1)).toMatchObject({ level: 2 });
    tdp.setMemslot({ ...ro, flags: { logDirty: true, readonly: true } });
    expect(tdp.flushRequests).toBe(0);
    expect(tdp.lookup(0, BASE + 1)).toMatchObject({ level: 2 });
    tdp.setMemslot(ro);
    expect(tdp.flushRequests).toBe(0);
    expect(tdp.lookup(0, BASE + 1)).toMatchObject({ level: 2 });
  });

  test('a fault that made the host replace a page says KVM would retry it, and what then maps the GFN', () => {
    const { tdp } = vm({}, slot());
    expect('retried' in tdp.fault(0, BASE + 1, { write: true })).toBe(false);
    tdp.fault(0, BASE + 2);
    expect(tdp.fault(0, BASE + 2, { write: true }).retried).toBe('none');
  });

  test("the VMM's own access faults the host page in, zaps what it replaced, and maps and logs nothing", () => {
    const { tdp } = vm({}, slot({ flags: { logDirty: true, readonly: false } }));
    tdp.fault(0, BASE + 1);
    const page = tdp.hostAccess(0, BASE + 1, true)!;
    expect(page.writable).toBe(true);
    expect(tdp.lookup(0, BASE + 1)).toBeUndefined();
    expect(tdp.peekDirty(0, 0)).toEqual([]);
    expect(() => tdp.hostAccess(0, 1, false)).toThrow('no memslot holds gfn 1 in address space 0');
    tdp.invalidateHva(H + 0x3000n, H + 0x4000n, 'munmap');
    expect(tdp.hostAccess(0, BASE + 3, false)).toBeUndefined();
  });
});

describe('Linux 6.1: no split on fault', () => {
  test('a fault below a huge leaf zaps it, flushes its span, links an empty table and maps only the faulting page', () => {
    const { tdp } = vm({ splitOnFault: false, nxHugePages: true }, slot({ npages: 512, backing: hugetlb2m }));
    tdp.fault(0, BASE + 1);
    const n = tdp.events.length;
    expect(tdp.fault(0, BASE + 3, { exec: true })).toMatchObject({ kind: 'map', level: 1 });
    expect(tdp.mappings(0)).toEqual([{ start: BASE + 3, end: BASE + 4, level: 1, writable: true, executable: true }]);
    expect(tdp.events.slice(n).filter((e) => e.kind === 'flush')).toEqual([
      { kind: 'flush', asId: 0, ranges: [{ start: BASE, end: BASE + 512 }] },
    ]);
  });
});

describe('the per-GFN picture and the dirty log, field by field', () => {
  test('a read of the zero page is read-only, a write writable; an MMIO SPTE is neither and says mmio', () => {
    const { tdp } = vm({}, slot());
    tdp.fault(0, BASE + 1);
    tdp.fault(0, BASE + 2, { write: true });
    expect(tdp.fault(0, BASE + 4096).kind).toBe('mmio');
    const p = tdp.picture(0);
    expect(p.get(BASE + 1)).toEqual({ level: 1, writable: false, executable: true, mmio: false });
    expect(p.get(BASE + 2)).toEqual({ level: 1, writable: true, executable: true, mmio: false });
    expect(p.get(BASE + 4096)).toEqual({ level: 1, writable: false, executable: false, mmio: true });
    expect([...p.keys()].sort((a, b) => a - b)).toEqual([BASE + 1, BASE + 2, BASE + 4096]);
  });

  test('the picture of part of a 2 MiB leaf holds just that part, each GFN at level 2', () => {
    const { tdp } = vm({}, slot({ backing: thp }));
    tdp.fault(0, BASE + 1, { write: true });
    const p = tdp.picture(0, BASE + 10, BASE + 12);
    expect([...p.entries()]).toEqual([
      [BASE + 10, { level: 2, writable: true, executable: true, mmio: false }],
      [BASE + 11, { level: 2, writable: true, executable: true, mmio: false }],
    ]);
  });

  test('a logging slot logs a write fault once; the get write-protects and flushes, an empty get neither', () => {
    const s = slot({ flags: { logDirty: true, readonly: false } });
    const { tdp } = vm({}, s);
    tdp.fault(0, BASE + 3);
    expect(tdp.peekDirty(0, 0)).toEqual([]);
    tdp.fault(0, BASE + 3, { write: true });
    tdp.fault(0, BASE + 5, { write: true });
    expect(tdp.peekDirty(0, 0)).toEqual([BASE + 3, BASE + 5]);
    const before = tdp.flushRequests;
    expect(tdp.getDirtyLog(0, 0)).toEqual([BASE + 3, BASE + 5]);
    expect(tdp.flushRequests).toBe(before + 1);
    expect(tdp.lookup(0, BASE + 3)).toMatchObject({ level: 1 });
    expect(decodeSpte(tdp.lookup(0, BASE + 3)!.spte).writable).toBe(false);
    expect(decodeSpte(tdp.lookup(0, BASE + 5)!.spte).writable).toBe(false);
    expect(tdp.getDirtyLog(0, 0)).toEqual([]);
    expect(tdp.flushRequests).toBe(before + 1);
    tdp.fault(0, BASE + 3, { write: true });
    expect(tdp.peekDirty(0, 0)).toEqual([BASE + 3]);
  });

  test('a clear takes back only its pages and re-protects only them', () => {
    const s = slot({ flags: { logDirty: true, readonly: false } });
    const { tdp } = vm({}, s);
    for (const g of [1, 2, 3]) tdp.fault(0, BASE + g, { write: true });
    expect(tdp.clearDirtyLog(0, 0, 2, 1)).toEqual([BASE + 2]);
    expect(decodeSpte(tdp.lookup(0, BASE + 2)!.spte).writable).toBe(false);
    expect(decodeSpte(tdp.lookup(0, BASE + 1)!.spte).writable).toBe(true);
    expect(decodeSpte(tdp.lookup(0, BASE + 3)!.spte).writable).toBe(true);
    expect(tdp.peekDirty(0, 0)).toEqual([BASE + 1, BASE + 3]);
  });

  test('slots of the same number in two address spaces keep logs of their own', () => {
    const s = slot({ flags: { logDirty: true, readonly: false } });
    const { tdp } = vm({}, s, { ...s, asId: 1 });
    tdp.fault(0, BASE + 1, { write: true });
    tdp.fault(1, BASE + 7, { write: true });
    expect(tdp.peekDirty(0, 0)).toEqual([BASE + 1]);
    expect(tdp.peekDirty(1, 0)).toEqual([BASE + 7]);
  });

  test('a logging slot moved while logging keeps its dirty GFNs at the new place; moved to no logging, none', () => {
    const s = slot({ flags: { logDirty: true, readonly: false } });
    const { tdp } = vm({}, s);
    tdp.fault(0, BASE + 1, { write: true });
    tdp.setMemslot({ ...s, baseGfn: BASE + 8192 });
    expect(tdp.peekDirty(0, 0)).toEqual([BASE + 8192 + 1]);
    tdp.fault(0, BASE + 8192 + 2, { write: true });
    tdp.setMemslot({ ...s, baseGfn: BASE + 16384, flags: { logDirty: false, readonly: false } });
    tdp.setMemslot({ ...s, baseGfn: BASE + 16384 });
    expect(tdp.peekDirty(0, 0)).toEqual([]);
  });
});

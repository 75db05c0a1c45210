// The shadow MMU model (src/model/shadow.ts). Expected events, stats and
// translations are worked out by hand from KVM's rules (mmu.c as cited in the
// model's comments), not captured from the model; the emulated-host case is
// what a kvm_pvm host recorded (kvm_mmu_get_page / kvm_mmu_prepare_zap_page
// events and the VM stats) for the same guest program.

import { describe, expect, test } from 'vitest';
import { ShadowMmu, Sp, clearParents, misaligned, spName, unsyncWalk, type ShadowEvent } from '../src/model/shadow.js';
import { WRONG_SHADOWS, type WrongShadow } from '../src/model/wrong.js';

const P = 1n;
const RW = 2n;
const T = P | RW | 4n | 0x20n; // table entry: present, writable, user, accessed

class Mem {
  readonly m = new Map<bigint, bigint>();
  read64(gpa: bigint): bigint {
    return this.m.get(gpa) ?? 0n;
  }
  write64(gpa: bigint, v: bigint): void {
    this.m.set(gpa, v);
  }
  set(table: bigint, i: number, v: bigint): void {
    this.write64((table << 12n) + BigInt(i * 8), v);
  }
}

// Guest tables (gfns): root 0x10 -> PDPT 0x11 -> PD 0x12 -> PT 0x13 and PT 0x14.
// VA (0x4000_0000: L4 0, L3 1, L2 0, L1 0) maps data 0x100; VA + 0x1000 maps PT 0x13
// itself and VA + 0x2000 maps PT 0x14, so the guest can write its own PTEs.
// VB = VA + 2 MiB (L2 1) is mapped by PT 0x14 to data 0x200.
// VC (0x8000_0000: L3 2) goes through PD 0x22 / PT 0x23 and maps PD 0x12 at VC.
const VA = 0x4000_0000n;
const VB = VA + 0x20_0000n;
const VC = 0x8000_0000n;

function tables(): Mem {
  const m = new Mem();
  m.set(0x10n, 0, (0x11n << 12n) | T);
  m.set(0x11n, 1, (0x12n << 12n) | T);
  m.set(0x12n, 0, (0x13n << 12n) | T);
  m.set(0x12n, 1, (0x14n << 12n) | T);
  m.set(0x13n, 0, (0x100n << 12n) | T);
  m.set(0x13n, 1, (0x13n << 12n) | T);
  m.set(0x13n, 2, (0x14n << 12n) | T);
  m.set(0x14n, 0, (0x200n << 12n) | T);
  m.set(0x11n, 2, (0x22n << 12n) | T);
  m.set(0x22n, 0, (0x23n << 12n) | T);
  m.set(0x23n, 0, (0x12n << 12n) | T);
  return m;
}

const ev = (es: ShadowEvent[]) =>
  es.map(
    (e) =>
      `${e.kind} ${spName({ ...e.sp, unsync: false })}${e.kind === 'get' ? (e.created ? ' new' : ' existing') : ''}${e.sp.unsync ? ' (unsync)' : ''}`,
  );

function native(wrong?: WrongShadow) {
  const mem = tables();
  const mmu = new ShadowMmu({ levels: 4, exec: 'native', wrong }, mem, 0x10000n);
  mmu.enter();
  return { mem, mmu };
}

/** The guest writes PTE `i` of PT `pt` through its mapping at `via` (a PTE value pointing at `frame`). */
function writePte(mmu: ShadowMmu, via: bigint, i: number, frame: bigint) {
  return mmu.access(via + BigInt(i * 8), 'write', (frame << 12n) | T);
}

describe('shadow model: unsync, INVLPG, CR3 load (native host)', () => {
  test('first entry loads the root; a read builds one page per guest table on the walk', () => {
    const { mmu } = native();
    expect(ev(mmu.take())).toEqual(['get 10@4 new']);
    const a = mmu.access(VA, 'read');
    expect(a).toEqual({ gpa: 0x100000n, allowed: [0x100n], shadow: 0x100n });
    expect(ev(mmu.take())).toEqual(['get 11@3 new', 'get 12@2 new', 'get 13@1 new']);
    expect(mmu.path(VA).map(spName)).toEqual(['10@4', '11@3', '12@2', '13@1']);
    expect(mmu.stats).toMatchObject({ mmu_cache_miss: 4, mmu_unsync: 0, mmu_pte_write: 0 });
  });

  test('a write to a last-level table through a writable mapping unsyncs it; old or new until INVLPG', () => {
    const { mmu } = native();
    mmu.access(VA, 'read');
    mmu.take();
    // The write faults (no leaf for VA+0x1000), the leaf is for frame 0x13, a
    // level-1 shadowed table: not write-tracked, so it goes unsync, the write lands.
    writePte(mmu, VA + 0x1000n, 0, 0x101n);
    expect(ev(mmu.take())).toEqual(['unsync 13@1']);
    expect(mmu.stats).toMatchObject({ mmu_unsync: 1, mmu_pte_write: 0 });
    expect(
      mmu
        .pages()
        .filter((p) => p.unsync)
        .map(spName),
    ).toEqual(['13@1 unsync']);
    // No invalidation: the architecture allows the old frame; KVM's shadow PTE still maps it.
    expect(mmu.access(VA, 'read')).toEqual({ gpa: 0x101000n, allowed: [0x100n, 0x101n], shadow: 0x100n });
    // INVLPG re-reads the one PTE of the unsync page on the path; the page stays unsync.
    mmu.invlpg(VA);
    expect(mmu.take()).toEqual([]);
    expect(mmu.access(VA, 'read')).toEqual({ gpa: 0x101000n, allowed: [0x101n], shadow: 0x101n });
    expect(mmu.stats.mmu_unsync).toBe(1);
  });

  test('a CR3 load syncs the unsync page (write-protecting it again) and clears the bitmaps', () => {
    const { mmu } = native();
    mmu.access(VA, 'read');
    writePte(mmu, VA + 0x1000n, 0, 0x101n);
    mmu.take();
    mmu.setCr3(0x10000n);
    mmu.enter();
    expect(ev(mmu.take())).toEqual(['sync 13@1 (unsync)']);
    expect(mmu.stats.mmu_unsync).toBe(0);
    expect(mmu.access(VA, 'read')).toEqual({ gpa: 0x101000n, allowed: [0x101n], shadow: 0x101n });
    // Written again: the leaf for 0x13 is read-only now, the write faults and unsyncs again.
    writePte(mmu, VA + 0x1000n, 0, 0x102n);
    expect(ev(mmu.take())).toEqual(['unsync 13@1']);
  });

  test('one walk syncs several unsync children of one parent, in index order', () => {
    const { mmu } = native();
    mmu.access(VA, 'read');
    mmu.take();
    mmu.access(VB, 'read');
    writePte(mmu, VA + 0x1000n, 0, 0x101n); // PT 0x13
    writePte(mmu, VA + 0x2000n, 0, 0x201n); // PT 0x14 (its shadow page is linked at PD index 1)
    expect(ev(mmu.take())).toEqual(['get 14@1 new', 'unsync 13@1', 'unsync 14@1']);
    mmu.setCr3(0x10000n);
    mmu.enter();
    expect(ev(mmu.take())).toEqual(['sync 13@1 (unsync)', 'sync 14@1 (unsync)']);
    expect(mmu.stats.mmu_unsync).toBe(0);
    expect(mmu.access(VB, 'read').allowed).toEqual([0x201n]);
    expect(mmu.access(VB, 'read').shadow).toBe(0x201n);
  });

  test('an upper-level table written three times from elsewhere is zapped (write flooding)', () => {
    const { mmu } = native();
    mmu.access(VA, 'read');
    mmu.take();
    // PD 0x12 is write-tracked: every write through VC (its path avoids 0x12) faults and is
    // emulated before any shadow page is built for VC (page_fault_handle_page_track).
    mmu.access(VC + 8n * 5n, 'write', 0n);
    mmu.access(VC + 8n * 6n, 'write', 0n);
    expect(mmu.stats).toMatchObject({ mmu_pte_write: 2, mmu_flooded: 0, mmu_shadow_zapped: 0 });
    mmu.access(VC + 8n * 7n, 'write', 0n);
    expect(mmu.stats).toMatchObject({ mmu_pte_write: 3, mmu_flooded: 1, mmu_shadow_zapped: 1 });
    expect(ev(mmu.take())).toEqual(['zap 12@2']);
    expect(mmu.path(VA).map(spName)).toEqual(['10@4', '11@3']);
  });

  test('writes through an address whose walk goes through the table keep clearing its count', () => {
    const { mmu, mem } = native();
    // Map PD 0x12 at VA + 0x3000 (PT 0x13 index 3): the write's own walk uses PD 0x12.
    mem.set(0x13n, 3, (0x12n << 12n) | T);
    mmu.access(VA, 'read');
    for (let i = 0; i < 5; i++) mmu.access(VA + 0x3000n + 8n * BigInt(10 + i), 'write', 0n);
    expect(mmu.stats).toMatchObject({ mmu_pte_write: 5, mmu_flooded: 0 });
  });

  test('a table page reused at an upper level zaps its unsync level-1 page (role change)', () => {
    const { mmu, mem } = native();
    mmu.access(VA, 'read');
    writePte(mmu, VA + 0x1000n, 0, 0x101n);
    mmu.take();
    // The guest makes 0x13 a page directory too: PDPT index 3 -> 0x13 (VD = 0xc000_0000).
    // Its entry 0 (now 0x101) is then a page table; 0x101 entry 0 maps 0x300.
    mem.set(0x11n, 3, (0x13n << 12n) | T);
    mem.set(0x101n, 0, (0x300n << 12n) | T);
    expect(mmu.access(0xc000_0000n, 'read').gpa).toBe(0x300000n);
    expect(ev(mmu.take())).toEqual(['zap 13@1 (unsync)', 'sync 13@1 (unsync)', 'get 13@2 new', 'get 101@1 new']);
    expect(mmu.stats).toMatchObject({ mmu_unsync: 0, mmu_shadow_zapped: 1 });
  });

  test('a memslot change zaps every page; the next entry loads a new root', () => {
    const { mmu } = native();
    mmu.access(VA, 'read');
    mmu.take();
    mmu.zapAll();
    expect(ev(mmu.take())).toEqual(['zap 10@4', 'zap 11@3', 'zap 12@2', 'zap 13@1']);
    mmu.enter();
    expect(ev(mmu.take())).toEqual(['zap 10@4', 'get 10@4 new']);
  });
});

describe('shadow model: an emulated host (every instruction emulated)', () => {
  test('only the root exists; every write counts; the third write to the root zaps it', () => {
    const mem = tables();
    const mmu = new ShadowMmu({ levels: 4, exec: 'emulated' }, mem, 0x10000n);
    mmu.enter();
    expect(ev(mmu.take())).toEqual(['get 10@4 new']);
    expect(mmu.access(VA, 'read')).toEqual({ gpa: 0x100000n, allowed: [0x100n], shadow: undefined });
    // The PTE write: emulated, counted, nothing shadows 0x13. The emulator walks the new PTE at once.
    mmu.access(VA + 0x1000n, 'write', (0x101n << 12n) | T);
    expect(mmu.access(VA, 'read')).toEqual({ gpa: 0x101000n, allowed: [0x100n, 0x101n], shadow: undefined });
    mmu.invlpg(VA);
    expect(mmu.access(VA, 'read').allowed).toEqual([0x101n]);
    expect(mmu.take()).toEqual([]);
    // Three writes to the root page (identity-mapped at 0x10000 here).
    mem.set(0x11n, 0, (0x30n << 12n) | T);
    mem.set(0x30n, 0, (0x31n << 12n) | T);
    mem.set(0x31n, 0x10, (0x10n << 12n) | T);
    for (let i = 0; i < 3; i++) mmu.access(0x10000n + 8n * 200n, 'write', 0n);
    expect(mmu.stats).toEqual({
      mmu_unsync: 0,
      mmu_shadow_zapped: 1,
      mmu_pte_write: 4,
      mmu_flooded: 1,
      mmu_cache_miss: 1,
    });
    expect(mmu.take().map((e) => `${e.kind} ${spName(e.sp)} root ${e.sp.rootCount}`)).toEqual(['zap 10@4 root 1']);
    mmu.enter();
    expect(
      mmu.take().map((e) => `${e.kind} ${spName(e.sp)} root ${e.sp.rootCount}${e.sp.invalid ? ' invalid' : ''}`),
    ).toEqual(['zap 10@4 root 0 invalid', 'get 10@4 root 0']);
    expect(mmu.stats).toMatchObject({ mmu_shadow_zapped: 2, mmu_cache_miss: 2 });
  });

  test('a CR3 switch to a cached root reuses it without a lookup and clears its flooding count', () => {
    const mem = tables();
    mem.set(0x40n, 0, (0x11n << 12n) | T); // a second root sharing the PDPT
    const mmu = new ShadowMmu({ levels: 4, exec: 'emulated' }, mem, 0x10000n);
    mmu.enter();
    mmu.setCr3(0x40000n);
    mmu.enter();
    mmu.setCr3(0x10000n);
    mmu.enter();
    expect(ev(mmu.take())).toEqual(['get 10@4 new', 'get 40@4 new']);
  });
});

describe('shadow model: the unsync walk (__mmu_unsync_walk)', () => {
  function tree() {
    const root = new Sp(1, 0x10n, { level: 3, direct: false, access: 7 });
    const pd = new Sp(2, 0x11n, { level: 2, direct: false, access: 7 });
    const a = new Sp(3, 0x12n, { level: 1, direct: false, access: 7 });
    const b = new Sp(4, 0x13n, { level: 1, direct: false, access: 7 });
    const clean = new Sp(5, 0x14n, { level: 1, direct: false, access: 7 });
    root.spt.set(7, pd);
    pd.spt.set(2, a).set(9, clean).set(300, b);
    a.unsync = b.unsync = true;
    root.unsyncChildren.add(7);
    pd.unsyncChildren.add(2).add(9).add(300).add(400); // 9: stale (clean child), 400: no entry
    return { root, pd, a, b };
  }

  test('yields unsync leaves depth first by index; the caller clears the path', () => {
    const { root, pd } = tree();
    const seen: string[] = [];
    for (const { sp, path } of unsyncWalk(root)) {
      seen.push(`${spName(sp)} via ${path.map((p) => `${p.sp.gfn.toString(16)}[${p.index}]`).join(' ')}`);
      sp.unsync = false;
      clearParents(path);
    }
    expect(seen).toEqual(['12@1 unsync via 10[7] 11[2]', '13@1 unsync via 10[7] 11[300]']);
    // Clearing stops at a parent with bits left (11[400], stale until visited), so the
    // root keeps its bit: one pass is not enough, as mmu_sync_children's loop knows.
    expect([...pd.unsyncChildren]).toEqual([]);
    expect([...root.unsyncChildren]).toEqual([7]);
    expect([...unsyncWalk(root)]).toEqual([]);
    expect([...root.unsyncChildren]).toEqual([]);
  });

  test('a caller that stops early leaves the rest marked', () => {
    const { root, pd } = tree();
    for (const { path } of unsyncWalk(root)) {
      clearParents(path);
      break;
    }
    expect([...pd.unsyncChildren].sort((x, y) => x - y)).toEqual([9, 300, 400]);
    expect([...root.unsyncChildren]).toEqual([7]);
  });

  test('detect_write_misaligned', () => {
    expect(misaligned(0x1000n, 8)).toBe(false);
    expect(misaligned(0x1000n, 1)).toBe(false);
    expect(misaligned(0x1004n, 4)).toBe(false);
    expect(misaligned(0x1004n, 8)).toBe(true);
    expect(misaligned(0x1001n, 2)).toBe(true);
    // A single byte is excused only at the start of an entry; fewer than 4 bytes are misaligned otherwise.
    expect(misaligned(0x1008n, 1)).toBe(false);
    expect(misaligned(0x1001n, 1)).toBe(true);
    expect(misaligned(0x1000n, 2)).toBe(true);
    expect(misaligned(0x1ff8n, 8)).toBe(false);
  });
});

describe('shadow model: deliberately wrong models are caught', () => {
  // The same story as the tests above, compared with the hand-worked answers.
  function story(wrong?: WrongShadow): string[] {
    const { mmu } = native(wrong);
    mmu.access(VA, 'read');
    mmu.access(VB, 'read');
    writePte(mmu, VA + 0x1000n, 0, 0x101n);
    writePte(mmu, VA + 0x2000n, 0, 0x201n);
    mmu.invlpg(VA);
    const out = [`after invlpg VA shadow ${mmu.access(VA, 'read').shadow?.toString(16)}`];
    mmu.setCr3(0x10000n);
    mmu.enter();
    out.push(`after cr3 VB shadow ${mmu.access(VB, 'read').shadow?.toString(16)}`, `unsync ${mmu.stats.mmu_unsync}`);
    mmu.take();
    mmu.access(VC, 'write', 0n);
    mmu.access(VC + 8n, 'write', 0n);
    mmu.access(VC + 16n, 'write', 0n);
    out.push(`flooded ${mmu.stats.mmu_flooded}`);
    return out;
  }
  const right = ['after invlpg VA shadow 101', 'after cr3 VB shadow 201', 'unsync 0', 'flooded 1'];

  test('the right model gives the hand-worked answers', () => {
    expect(story()).toEqual(right);
  });
  test('every deliberately wrong shadow model is tried', () => {
    expect([...WRONG_SHADOWS].sort()).toEqual(['never-sync', 'no-flooding', 'sync-misses-last-child']);
  });

  test.each(WRONG_SHADOWS.map((w) => [w]))('%s is caught', (w) => {
    expect(story(w)).not.toEqual(right);
  });
});

describe('shadow model: a VMM write to a guest page table (the shadow findings)', () => {
  test('KVM keeps the old frame through INVLPG and a CR3 load while the page table is not unsync', () => {
    const { mem, mmu } = native();
    mmu.access(VA, 'read');
    mem.set(0x13n, 0, 0n); // the VMM clears the PTE: no trap
    mmu.invlpg(VA);
    expect(mmu.stale(VA)).toBe(0x100n);
    mmu.setCr3(0x10000n);
    expect(mmu.stale(VA)).toBe(0x100n);
    // The architecture allows nothing now; the model's shadow PTE still maps 0x100.
    expect(mmu.access(VA, 'read')).toEqual({ gpa: undefined, allowed: [] });
  });

  test('a guest store that makes the page table unsync lets INVLPG see the VMM write', () => {
    const { mem, mmu } = native();
    mmu.access(VA, 'read');
    mem.set(0x13n, 0, 0n);
    writePte(mmu, VA + 0x1000n, 3, 0x101n); // another entry of PT 0x13: unsync
    // Before the guest invalidates, its TLB may still hold the old translation: not stale yet.
    expect(mmu.stale(VA)).toBeUndefined();
    mmu.invlpg(VA);
    expect(mmu.stale(VA)).toBeUndefined();
    expect(mmu.path(VA).map(spName)).toEqual(['10@4', '11@3', '12@2', '13@1 unsync']);
  });

  test('zapping every page (a memslot change) makes KVM see it', () => {
    const { mem, mmu } = native();
    mmu.access(VA, 'read');
    mem.set(0x13n, 0, 0n);
    mmu.zapAll();
    mmu.enter();
    expect(mmu.stale(VA)).toBeUndefined();
  });

  test('an emulated host has no shadow PTE of its own to go stale', () => {
    const mem = tables();
    const mmu = new ShadowMmu({ levels: 4, exec: 'emulated' }, mem, 0x10000n);
    mmu.enter();
    mmu.access(VA, 'read');
    mem.set(0x13n, 0, 0n);
    expect(mmu.stale(VA)).toBeUndefined();
  });
});

describe('shadow model: guest huge pages, access rights, roots', () => {
  const PS = 0x80n;
  const NX = 1n << 63n;

  test('a guest huge page is shadowed by direct pages down to 4 KiB, at the frame of the access', () => {
    const { mem, mmu } = native();
    const VD = 0xc000_0000n; // L3 3 -> PD 0x30, whose entry 0 maps the 2 MiB page at frame 0x400
    const VE = 0x1_0000_0000n; // L3 4: a 1 GiB page at frame 0x40000
    mem.set(0x11n, 3, (0x30n << 12n) | T);
    mem.set(0x30n, 0, (0x400n << 12n) | T | PS);
    mem.set(0x11n, 4, (0x40000n << 12n) | T | PS);
    mmu.take();
    expect(mmu.access(VD + 0x5123n, 'read')).toEqual({ gpa: 0x405123n, allowed: [0x405n], shadow: 0x405n });
    expect(mmu.path(VD + 0x5123n).map(spName)).toEqual(['10@4', '11@3', '30@2', '400@1 direct']);
    expect(mmu.access(VE + 0x201008n, 'read')).toEqual({ gpa: 0x40201008n, allowed: [0x40201n], shadow: 0x40201n });
    expect(mmu.path(VE + 0x201008n).map(spName)).toEqual(['10@4', '11@3', '40000@2 direct', '40200@1 direct']);
  });

  test("each page's role holds what the guest's entries above it allow (ACC_W, ACC_U, ACC_X)", () => {
    const { mem, mmu } = native();
    const VF = 0x1_4000_0000n; // L3 5 -> PD 0x50 through a read-only entry
    mem.set(0x11n, 5, (0x50n << 12n) | P | 4n | 0x20n);
    mem.set(0x50n, 0, (0x51n << 12n) | T);
    mem.set(0x50n, 1, (0x52n << 12n) | T | NX);
    mem.set(0x50n, 2, (0x53n << 12n) | P | RW | 0x20n);
    for (const pt of [0x51n, 0x52n, 0x53n]) mem.set(pt, 0, (0x500n << 12n) | T);
    for (const off of [0n, 0x20_0000n, 0x40_0000n]) mmu.access(VF + off, 'read');
    const access = Object.fromEntries(mmu.pages().map((p) => [spName(p), p.access]));
    expect([access['50@2'], access['51@1'], access['52@1'], access['53@1']]).toEqual([5, 5, 4, 1]);
  });

  test('with CR0.WP clear a supervisor write through a read-only entry gets a writable shadow PTE', () => {
    const mem = tables();
    mem.set(0x13n, 5, (0x105n << 12n) | P | 4n | 0x20n);
    const mmu = new ShadowMmu({ levels: 4, exec: 'native', cr0Wp: false }, mem, 0x10000n);
    mmu.enter();
    mmu.access(VA, 'read');
    mmu.access(VA + 0x5000n, 'write', 1n);
    mmu.access(VA + 0x5008n, 'write', 2n);
    expect(mmu.stats.mmu_pte_write).toBe(0);
    expect(mem.read64(0x105008n)).toBe(2n);
  });

  test('zap-all zaps the oldest page first; the root in use stays, invalid, until the next entry', () => {
    const { mmu } = native();
    mmu.access(VA, 'read');
    mmu.take();
    mmu.zapAll();
    expect(ev(mmu.take())).toEqual(['zap 10@4', 'zap 11@3', 'zap 12@2', 'zap 13@1']);
    expect(mmu.pages().map((p) => [spName(p), p.invalid, p.rootCount])).toEqual([['10@4', true, 1]]);
    mmu.enter();
    expect(mmu.pages().map((p) => [spName(p), p.invalid])).toEqual([['10@4', false]]);
    expect(mmu.stats.mmu_cache_miss).toBe(5);
  });

  test('three previous roots are kept for a fast switch back; the least recently used one goes', () => {
    const { mmu } = native();
    for (const pgd of [0x60000n, 0x61000n, 0x62000n, 0x63000n]) mmu.setCr3(pgd);
    mmu.take();
    // Cached: 0x62, 0x61, 0x60 (0x10, the oldest, was let go): no page is looked up.
    for (const pgd of [0x60000n, 0x62000n, 0x61000n]) mmu.setCr3(pgd);
    expect(ev(mmu.take())).toEqual([]);
    mmu.setCr3(0x10000n);
    expect(ev(mmu.take())).toEqual(['get 10@4 existing']);
    // Each switch kept the root it left: 0x61, 0x62 and 0x60 are cached now, 0x63 went.
    mmu.setCr3(0x60000n);
    expect(ev(mmu.take())).toEqual([]);
    mmu.setCr3(0x63000n);
    expect(ev(mmu.take())).toEqual(['get 63@4 existing']);
  });
});

describe('shadow model: the unsync walk at its edges', () => {
  const page = (id: number, level: number) => new Sp(id, BigInt(0x10 + id), { level, direct: false, access: 7 });

  test('visits children by index whatever order their bits were set in, and skips a bit cleared meanwhile', () => {
    const pd = page(1, 2);
    const [a, b, c] = [page(2, 1), page(3, 1), page(4, 1)];
    pd.spt.set(300, a).set(9, b).set(200, c);
    a.unsync = b.unsync = c.unsync = true;
    pd.unsyncChildren.add(300).add(9).add(200);
    const seen: number[] = [];
    for (const { sp, path } of unsyncWalk(pd)) {
      seen.push(path.at(-1)!.index);
      sp.unsync = false;
      clearParents(path);
      pd.unsyncChildren.delete(200); // the caller's sync of 9 also took care of 200
    }
    expect(seen).toEqual([9, 300]);
  });

  test('a child whose own walk finds nothing loses its bit in the parent', () => {
    const root = page(1, 3);
    const pd = page(2, 2);
    root.spt.set(5, pd);
    root.unsyncChildren.add(5);
    pd.unsyncChildren.add(7); // stale: no entry at 7
    expect([...unsyncWalk(root)]).toEqual([]);
    expect([...root.unsyncChildren]).toEqual([]);
    expect([...pd.unsyncChildren]).toEqual([]);
  });

  test('the wrong model misses the last of several children only', () => {
    const one = page(1, 2);
    const x = page(2, 1);
    one.spt.set(4, x);
    x.unsync = true;
    one.unsyncChildren.add(4);
    expect([...unsyncWalk(one, 'sync-misses-last-child')].map((r) => r.sp)).toEqual([x]);
    const two = page(3, 2);
    const [y, z] = [page(4, 1), page(5, 1)];
    two.spt.set(1, y).set(2, z);
    y.unsync = z.unsync = true;
    two.unsyncChildren.add(2).add(1);
    expect([...unsyncWalk(two, 'sync-misses-last-child')].map((r) => r.sp)).toEqual([y]);
  });

  test('clearing a path that has no other bits clears it up to the root', () => {
    const root = page(1, 3);
    const pd = page(2, 2);
    root.unsyncChildren.add(7);
    pd.unsyncChildren.add(9);
    clearParents([
      { sp: root, index: 7 },
      { sp: pd, index: 9 },
    ]);
    expect([root.unsyncChildren.size, pd.unsyncChildren.size]).toEqual([0, 0]);
  });
});

describe('shadow model: what traps on a native host', () => {
  test('a write to a data page goes through its shadow PTE: nothing is emulated or counted', () => {
    const { mmu } = native();
    mmu.access(VA, 'write', 5n);
    mmu.access(VA + 8n, 'write', 6n);
    expect(mmu.stats.mmu_pte_write).toBe(0);
  });

  test('a CR3 load syncs at once, the vCPU entering again right after the exit', () => {
    const { mmu } = native();
    mmu.access(VA, 'read');
    writePte(mmu, VA + 0x1000n, 0, 0x101n);
    mmu.take();
    mmu.setCr3(0x10000n);
    expect(ev(mmu.take())).toEqual(['sync 13@1 (unsync)']);
  });

  test('never-sync: neither INVLPG nor a CR3 load syncs the unsync page', () => {
    const { mmu } = native('never-sync');
    mmu.access(VA, 'read');
    writePte(mmu, VA + 0x1000n, 0, 0x101n);
    mmu.invlpg(VA);
    expect(mmu.access(VA, 'read').shadow).toBe(0x100n);
    mmu.take();
    mmu.setCr3(0x10000n);
    expect(ev(mmu.take())).toEqual([]);
    expect(mmu.stats.mmu_unsync).toBe(1);
  });
});

describe('shadow model: pages found again, zapped, and listed', () => {
  test('a page found again through another parent is synced in place and stays unsync', () => {
    const { mmu, mem } = native();
    mmu.access(VA, 'read');
    writePte(mmu, VA + 0x1000n, 0, 0x101n);
    mmu.take();
    // PD 0x12 entry 5 points at PT 0x13 too: VA + 10 MiB walks through it.
    mem.set(0x12n, 5, (0x13n << 12n) | T);
    mmu.access(VA + 0xa0_0000n, 'read');
    expect(ev(mmu.take())).toEqual(['get 13@1 existing (unsync)']);
    // The sync brought the shadow PTE of VA in line without an INVLPG.
    expect(mmu.access(VA, 'read').shadow).toBe(0x101n);
    expect(mmu.stats.mmu_unsync).toBe(1);
  });

  test('a table used at a lower level as well gets a second page; the upper one, in sync, stays', () => {
    const { mmu, mem } = native();
    mmu.access(VA, 'read');
    mem.set(0x22n, 1, (0x12n << 12n) | T); // VC + 2 MiB: PD 0x22 entry 1 -> 0x12 as a page table
    mmu.access(VC, 'read');
    mmu.take();
    mmu.access(VC + 0x20_0000n, 'read');
    expect(ev(mmu.take())).toEqual(['get 12@1 new']);
    expect(mmu.path(VA).map(spName)).toEqual(['10@4', '11@3', '12@2', '13@1']);
  });

  test('a flooded page leaves the hash and its children: the next access links a new one to the old children', () => {
    const { mmu } = native();
    mmu.access(VA, 'read');
    for (const i of [5n, 6n, 7n]) mmu.access(VC + 8n * i, 'write', 0n);
    expect(mmu.pages().map(spName)).toEqual(['10@4', '11@3', '13@1']);
    mmu.take();
    mmu.access(VA, 'read');
    expect(ev(mmu.take())).toEqual(['get 12@2 new', 'get 13@1 existing']);
    expect(mmu.path(VA).map(spName)).toEqual(['10@4', '11@3', '12@2', '13@1']);
  });

  test('zapped roots still in use are listed, invalid, oldest first, until the next entry lets them go', () => {
    const { mmu } = native();
    mmu.setCr3(0x60000n);
    mmu.zapAll();
    expect(mmu.pages().map((p) => [spName(p), p.invalid])).toEqual([
      ['10@4', true],
      ['60@4', true],
    ]);
    mmu.enter();
    expect(mmu.pages().map((p) => [spName(p), p.invalid])).toEqual([['60@4', false]]);
  });
});

describe('shadow model: accesses on a native host, one rule each', () => {
  test('an address the guest no longer maps reaches nothing, but the TLB may still hold its old frame', () => {
    const { mmu, mem } = native();
    mmu.access(VA, 'read');
    mem.set(0x13n, 0, 0n);
    expect(mmu.access(VA, 'read')).toEqual({ gpa: undefined, allowed: [0x100n] });
  });

  test('the frames an access may reach are listed in order', () => {
    const { mmu, mem } = native();
    mmu.access(VA, 'read');
    mem.set(0x13n, 0, (0xffn << 12n) | T); // a VMM write: no trap, the old translation may linger
    expect(mmu.access(VA, 'read').allowed).toEqual([0xffn, 0x100n]);
  });

  test('a read of a write-tracked frame maps it read-only; a read never unsyncs', () => {
    const { mmu } = native();
    mmu.access(VA, 'read');
    expect(mmu.access(VC, 'read').shadow).toBe(0x12n);
    mmu.take();
    mmu.access(VA + 0x1000n, 'read'); // maps PT 0x13 itself
    expect(ev(mmu.take())).toEqual([]);
    expect(mmu.stale(VA)).toBeUndefined();
  });

  test('an access before the first entry is a harness error', () => {
    const mmu = new ShadowMmu({ levels: 4, exec: 'native' }, tables(), 0x10000n);
    expect(() => mmu.access(VA, 'read')).toThrow('shadow model: an access before the first entry');
  });

  test('a guest entry that now points at another table gets a new child page, the old one unlinked', () => {
    const { mmu, mem } = native();
    mmu.access(VA, 'read');
    mem.set(0x12n, 0, (0x15n << 12n) | T); // VMM write: PD 0x12 entry 0 now points at PT 0x15
    mem.set(0x15n, 7, (0x107n << 12n) | T);
    expect(mmu.access(VA + 0x7000n, 'read').shadow).toBe(0x107n);
    expect(mmu.path(VA + 0x7000n).map(spName)).toEqual(['10@4', '11@3', '12@2', '15@1']);
  });

  test('an upper page with unsync children is synced before a second parent links it', () => {
    const { mmu, mem } = native();
    mmu.access(VA, 'read');
    writePte(mmu, VA + 0x1000n, 0, 0x101n);
    mem.set(0x11n, 7, (0x12n << 12n) | T); // PDPT entry 7 -> PD 0x12 as well
    mmu.take();
    mmu.access(0x1_c000_0000n, 'read');
    expect(ev(mmu.take())).toEqual(['get 12@2 existing', 'sync 13@1 (unsync)']);
  });

  test('a write to a frame shadowed only by a direct page does not unsync it', () => {
    const { mmu, mem } = native();
    mem.set(0x11n, 3, (0x30n << 12n) | T);
    mem.set(0x30n, 0, (0x400n << 12n) | T | 0x80n);
    mmu.access(0xc000_0000n, 'read');
    mmu.take();
    mmu.access(0xc000_0000n, 'write', 1n);
    expect(ev(mmu.take())).toEqual([]);
    expect(mmu.stats.mmu_unsync).toBe(0);
  });

  test('an emulated write to a table drops the shadow entry under the written guest entry only', () => {
    const { mmu } = native();
    mmu.access(VA, 'read');
    mmu.access(VB, 'read');
    mmu.access(VC + 8n, 'write', (0x14n << 12n) | T); // PD 0x12 entry 1, emulated once
    expect(mmu.path(VB).map(spName)).toEqual(['10@4', '11@3', '12@2']);
    expect(mmu.path(VA).map(spName)).toEqual(['10@4', '11@3', '12@2', '13@1']);
  });

  test('an emulated write is not counted while no page shadows a guest table', () => {
    const mmu = new ShadowMmu({ levels: 4, exec: 'emulated' }, tables(), 0x10000n);
    mmu.zapAll();
    mmu.access(VA, 'write', 1n);
    expect(mmu.stats.mmu_pte_write).toBe(0);
  });
});

describe('shadow model: write protection and zaps that reach further', () => {
  test('a frame mapped writable before it becomes a shadowed table is write-protected then, so the next write unsyncs it', () => {
    const { mmu, mem } = native();
    mem.set(0x13n, 5, (0x15n << 12n) | T); // VA + 0x5000 maps frame 0x15 as data
    mmu.access(VA + 0x5000n, 'write', 0n);
    mem.set(0x12n, 2, (0x15n << 12n) | T); // PD 0x12 entry 2 -> 0x15 as a page table
    mem.set(0x15n, 0, (0x300n << 12n) | T);
    mmu.access(VA + 0x40_0000n, 'read');
    mmu.take();
    mmu.access(VA + 0x5000n, 'write', (0x301n << 12n) | T);
    expect(ev(mmu.take())).toEqual(['unsync 15@1']);
  });

  test('zapping an upper page zaps its unsync children too', () => {
    const { mmu } = native();
    mmu.access(VA, 'read');
    writePte(mmu, VA + 0x1000n, 0, 0x101n);
    mmu.take();
    for (const i of [5n, 6n, 7n]) mmu.access(VC + 8n * i, 'write', 0n);
    expect(ev(mmu.take())).toEqual(['zap 12@2', 'zap 13@1 (unsync)', 'sync 13@1 (unsync)']);
    expect(mmu.stats.mmu_unsync).toBe(0);
  });

  test('INVLPG re-reads only unsync pages: a VMM change to a synced table stays stale', () => {
    const { mmu, mem } = native();
    mmu.access(VA, 'read');
    mem.set(0x13n, 0, (0x105n << 12n) | T);
    mmu.invlpg(VA);
    expect(mmu.stale(VA)).toBe(0x100n);
  });
});

describe('shadow model: a table shadowed at two levels', () => {
  function twoLevels() {
    const { mmu, mem } = native();
    mmu.access(VA, 'read');
    mem.set(0x22n, 1, (0x12n << 12n) | T); // VC + 2 MiB: PD 0x22 entry 1 -> 0x12 as a page table
    mmu.access(VC, 'read');
    mmu.access(VC + 0x20_0000n, 'read');
    mmu.take();
    return mmu;
  }

  test('write flooding counts only the upper-level page (a level-1 page can go unsync instead)', () => {
    const mmu = twoLevels();
    for (const i of [5n, 6n, 7n]) mmu.access(VC + 8n * i, 'write', 0n);
    expect(ev(mmu.take())).toEqual(['zap 12@2']);
    expect(mmu.stats.mmu_flooded).toBe(1);
  });

  test('zap-all goes oldest page first, not by guest frame', () => {
    const mmu = twoLevels();
    mmu.zapAll();
    expect(ev(mmu.take())).toEqual([
      'zap 10@4',
      'zap 11@3',
      'zap 12@2',
      'zap 13@1',
      'zap 22@2',
      'zap 23@1',
      'zap 12@1',
    ]);
  });
});

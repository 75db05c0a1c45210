// The model SPTE's packing: every flag decodes to its own field, and setting or
// clearing bits leaves the frame and the other flags alone. Pure: no KVM.
import { describe, expect, it } from 'vitest';
import {
  decodeSpte,
  isLeaf,
  isPresent,
  isTable,
  makeSpte,
  SPTE_A,
  SPTE_D,
  SPTE_HOST_W,
  SPTE_LEAF,
  SPTE_MMIO,
  SPTE_MMU_W,
  SPTE_P,
  SPTE_W,
  SPTE_X,
  spteFlags,
  sptePfn,
  withBits,
  withoutBits,
} from '../src/model/spte.js';

const FIELDS: [number, keyof ReturnType<typeof decodeSpte>][] = [
  [SPTE_P, 'present'],
  [SPTE_W, 'writable'],
  [SPTE_X, 'executable'],
  [SPTE_A, 'accessed'],
  [SPTE_D, 'dirty'],
  [SPTE_LEAF, 'leaf'],
  [SPTE_HOST_W, 'hostWritable'],
  [SPTE_MMU_W, 'mmuWritable'],
  [SPTE_MMIO, 'mmio'],
];

describe('model SPTEs', () => {
  const pfn = 2 ** 40 + 5; // above 32 bits: flags must not cut it
  it('decode each flag to its own field, and nothing else', () => {
    for (const [bit, field] of FIELDS) {
      // Present, so that a leaf bit makes a leaf.
      const info = decodeSpte(makeSpte(pfn, SPTE_P | bit));
      expect(info.pfn).toBe(pfn);
      for (const [, other] of FIELDS)
        expect(info[other], `${field} set, ${other}`).toBe(other === field || other === 'present');
    }
    expect(decodeSpte(makeSpte(pfn, 0)).present).toBe(false);
    const all = decodeSpte(
      makeSpte(
        pfn,
        FIELDS.reduce((a, [b]) => a | b, 0),
      ),
    );
    for (const [, f] of FIELDS) expect(all[f], f).toBe(true);
  });

  it('set and clear bits without touching the frame or the other flags', () => {
    const s = makeSpte(pfn, SPTE_P | SPTE_LEAF);
    const w = withBits(s, SPTE_W | SPTE_D);
    expect(sptePfn(w)).toBe(pfn);
    expect(spteFlags(w)).toBe(SPTE_P | SPTE_LEAF | SPTE_W | SPTE_D);
    expect(withBits(w, SPTE_W)).toBe(w); // already set: unchanged
    const c = withoutBits(w, SPTE_D | SPTE_A);
    expect(spteFlags(c)).toBe(SPTE_P | SPTE_LEAF | SPTE_W);
    expect(sptePfn(c)).toBe(pfn);
    expect(withoutBits(c, SPTE_D)).toBe(c); // already clear: unchanged
  });

  it('tells leaves, tables and non-present entries apart', () => {
    expect([isPresent(0), isLeaf(0), isTable(0)]).toEqual([false, false, false]);
    expect([isPresent(SPTE_P), isLeaf(SPTE_P), isTable(SPTE_P)]).toEqual([true, false, true]);
    expect([isPresent(SPTE_P | SPTE_LEAF), isLeaf(SPTE_P | SPTE_LEAF), isTable(SPTE_P | SPTE_LEAF)]).toEqual([
      true,
      true,
      false,
    ]);
    expect([isLeaf(SPTE_LEAF), isTable(SPTE_LEAF)]).toEqual([false, false]);
  });
});

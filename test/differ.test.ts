// The differ against values of every kind the checks compare, each made wrong
// in a way that keeps its shape (test/support/wrong.ts): same-length bytes, a
// neighbouring address, one flipped error-code flag, one page more or less.
// Pure: no KVM.
import { describe, expect, it } from 'vitest';
import type { Kvm } from '../src/kvm/kvm.js';
import type { HostProfile } from '../src/probe/probe.js';
import { same, show } from '../src/run/differ.js';
import { runCheck } from '../src/run/runner.js';
import type { Check } from '../src/run/types.js';
import { wrong, wrongs } from './support/wrong.js';

/** One value of each kind a check hands to ctx.expect, as the checks build them. */
const KINDS: [string, () => unknown][] = [
  ['bytes (guest memory)', () => new Uint8Array([0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88])],
  ['one byte', () => new Uint8Array([0x55])],
  ['address (bigint)', () => 0x8000001000n],
  ['register value (bigint)', () => 0x0123456789abcdefn],
  ['zero (bigint)', () => 0n],
  ['count (number)', () => 0],
  ['error code (number)', () => 0x7],
  ['stop key (string)', () => 'sync 0xbeef'],
  ['stop kind (string)', () => 'done'],
  ['flag (boolean)', () => true],
  ['page set (hex strings)', () => ['0x1001000', '0x11ff000']],
  ['GFN list (numbers)', () => [0x1001, 0x1002, 0x11ff]],
  ['page set (Set of GFNs)', () => new Set([0x1001, 0x1002])],
  ['empty page set', () => []],
  [
    'I/O exit with data',
    () => ({ reason: 'io', direction: 'out', port: 0x42, size: 1, count: 1, data: new Uint8Array([0x5a]) }),
  ],
  [
    'MMIO exit with data',
    () => ({
      reason: 'mmio',
      gpa: 0x100000010n,
      len: 4,
      isWrite: true,
      data: new Uint8Array([0x0d, 0xf0, 0xfe, 0xca]),
    }),
  ],
  ['exception log', () => [{ vector: 14, errorCode: 0x7, cr2: 0x8000001234n }]],
  [
    'PTEs after a walk',
    () => [
      { at: 0x3000n, value: 0x4027n },
      { at: 0x4008n, value: 0x5067n },
    ],
  ],
  ['SPTE mapping', () => ({ level: 1, pfn: 0x1234n, writable: true, huge: false })],
  [
    'slot values (Map)',
    () =>
      new Map<bigint, bigint | string>([
        [0x2000n, 7n],
        [0x3000n, 'no MMIO write'],
      ]),
  ],
  ['matrix case', () => ({ fault: 'P|W|U', pde: 0x1067n, pte: 0x2025n, cr2: 0x8000200008n, data: 0xabcdn })],
];

describe('the differ', () => {
  for (const [kind, make] of KINDS) {
    it(`${kind}: equal when equal, unequal for every shape-keeping wrong variant`, () => {
      expect(same(make(), make()), show(make())).toBe(true);
      const variants = wrongs(make());
      expect(variants.length).toBeGreaterThan(0);
      for (const w of variants) expect(same(w, make()), `${show(w)} against ${show(make())}`).toBe(false);
    });
  }

  it('compares bytes by content: same length, one byte apart, is a difference', () => {
    expect(same(new Uint8Array([1, 2, 3]), new Uint8Array([1, 2, 4]))).toBe(false);
    expect(same(new Uint8Array([1, 2, 3]), new Uint8Array([1, 2, 3]))).toBe(true);
    // A view into a larger buffer shows its own bytes only.
    const big = new Uint8Array([9, 1, 2, 3, 9]);
    expect(same(big.subarray(1, 4), new Uint8Array([1, 2, 3]))).toBe(true);
    expect(same(new Uint16Array([1, 2]), new Uint16Array([1, 3]))).toBe(false);
    expect(same(new Uint16Array([1]), new Uint8Array([1, 0]))).toBe(false);
  });

  it('compares addresses to the byte: a page-aligned CR2 is not the faulting address', () => {
    expect(same(0x8000001234n, 0x8000001000n)).toBe(false);
    expect(same({ cr2: 0x8000001234n }, { cr2: 0x8000001000n })).toBe(false);
  });

  it('compares page sets by members: one page more, one less or another one is a difference', () => {
    const pages = ['0x1000', '0x2000'];
    expect(same(pages, ['0x1000'])).toBe(false);
    expect(same(pages, ['0x1000', '0x2000', '0x3000'])).toBe(false);
    expect(same(pages, ['0x1000', '0x3000'])).toBe(false);
    expect(same(new Set([1, 2]), new Set([1, 3]))).toBe(false);
    expect(same(new Set([1, 2]), new Set([2, 1]))).toBe(true);
  });

  it('tells kinds apart: a number from a bigint or a string of the same digits', () => {
    expect(same(5, 5n)).toBe(false);
    expect(same('5', 5)).toBe(false);
    expect(same('0x5', 5n)).toBe(false);
    expect(same(undefined, 'undefined')).toBe(false);
    expect(same(null, undefined)).toBe(false);
  });
});

describe('canonical text', () => {
  it('is the text a report shows: hex bigints and bytes, separators, sorted keys and set members', () => {
    expect(show([1n, 2n])).toBe('[0x1, 0x2]');
    expect(show(new Uint8Array([0x0d, 0xf0]))).toBe('<0df0>');
    expect(show(new Uint16Array([1]))).toBe('Uint16Array<0100>');
    expect(
      show(
        new Map([
          [1n, 'a'],
          [2n, 'b'],
        ]),
      ),
    ).toBe('Map{0x1: "a", 0x2: "b"}');
    expect(show(new Set([3, 1, 2]))).toBe('Set{1, 2, 3}');
    expect(show({ b: 1, a: [true, null] })).toBe('{a: [true, null], b: 1}');
    expect(show(undefined)).toBe('undefined');
    expect(show(NaN)).toBe('NaN');
    expect(show('x')).toBe('"x"');
  });

  it('makes no two different values one text', () => {
    expect(same({ a: 1, b: 2 }, { b: 2, a: 1 })).toBe(true); // key order is not a difference
    expect(same([1, 23], [12, 3])).toBe(false);
    expect(same([1], { 0: 1 })).toBe(false);
    expect(same(new Map([[1, 2]]), { 1: 2 })).toBe(false);
    expect(same(NaN, null)).toBe(false);
    expect(same(new Set(['a', 'b']), new Set(['a, "b']))).toBe(false);
  });
});

describe('the shape-keeping wrong variants', () => {
  it('keep lengths, flip one bit, add or drop one member', () => {
    const bytes = wrong(new Uint8Array([1, 2, 3])) as Uint8Array;
    expect(bytes.length).toBe(3);
    expect([...bytes]).toEqual([1, 2, 2]);
    expect(wrong(0x8000001000n)).toBe(0x8000001001n);
    expect(wrong(7)).toBe(6);
    expect(wrong('sync 0xbeef')).toBe('sync 0xbeee');
    expect(wrong('done')).toBe('donx');
    expect(wrongs(['0x1000', '0x2000']).slice(0, 2)).toEqual([['0x1000'], ['0x1000', '0x2000', '0x2001']]);
    expect(wrongs({ a: 1n, b: [2] })).toEqual([
      { a: 0n, b: [2] },
      { a: 1n, b: [] },
      { a: 1n, b: [2, 3] },
      { a: 1n, b: [3] },
    ]);
  });
});

describe('the runner decides with the differ', () => {
  for (const [kind, make] of KINDS) {
    it(`${kind}: a check fed each wrong variant fails, naming that comparison only`, async () => {
      for (const w of wrongs(make())) {
        const check: Check = {
          name: 'kinds',
          description: 'one comparison of each kind',
          needs: [],
          run: async (ctx) => {
            ctx.expect('other', 1n, 1n);
            ctx.expect(kind, make(), make());
          },
        };
        const r = await runCheck(check, {} as Kvm, {} as HostProfile, {
          wrongExpectation: (_c, what, e) => (what === kind ? w : e),
        });
        expect(r.outcome, show(w)).toBe('fail');
        expect(r.comparisons.filter((c) => !c.ok).map((c) => c.what)).toEqual([kind]);
        const clean = await runCheck(check, {} as Kvm, {} as HostProfile);
        expect(clean.outcome).toBe('pass');
      }
    });
  }
});

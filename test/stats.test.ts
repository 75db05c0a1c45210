import { describe, expect, it } from 'vitest';
import { decodeStatValues, parseStatsLayout, statDeltas } from '../src/kvm/stats.js';

/** Builds a stats fd image the way KVM lays it out: header, id, descriptors, data. */
function image(
  nameSize: number,
  descs: { name: string; flags: number; exponent?: number; size: number; offset: number; bucket?: number }[],
  data: bigint[],
) {
  const headerSize = 24;
  const idOffset = headerSize;
  const descOffset = idOffset + nameSize;
  const descSize = 16 + nameSize;
  const dataOffset = descOffset + descSize * descs.length;
  const b = new Uint8Array(dataOffset + data.length * 8);
  const dv = new DataView(b.buffer);
  dv.setUint32(0, 0, true);
  dv.setUint32(4, nameSize, true);
  dv.setUint32(8, descs.length, true);
  dv.setUint32(12, idOffset, true);
  dv.setUint32(16, descOffset, true);
  dv.setUint32(20, dataOffset, true);
  b.set(Buffer.from('kvm-1234'), idOffset);
  descs.forEach((d, i) => {
    const o = descOffset + i * descSize;
    dv.setUint32(o, d.flags, true);
    dv.setInt16(o + 4, d.exponent ?? 0, true);
    dv.setUint16(o + 6, d.size, true);
    dv.setUint32(o + 8, d.offset, true);
    dv.setUint32(o + 12, d.bucket ?? 0, true);
    b.set(Buffer.from(d.name), o + 16);
  });
  data.forEach((v, i) => dv.setBigUint64(dataOffset + 8 * i, v, true));
  return { b, dataOffset };
}

describe('stats parser', () => {
  const { b, dataOffset } = image(
    48,
    [
      { name: 'pf_taken', flags: 0x000, size: 1, offset: 0 }, // cumulative, none, pow10
      { name: 'pages_4k', flags: 0x001, size: 1, offset: 8 }, // instant
      { name: 'halt_poll_ns', flags: 0x020, exponent: -9, size: 1, offset: 16 }, // cumulative, seconds
      { name: 'hist', flags: 0x104, size: 3, offset: 24, bucket: 0 }, // log hist, pow2
    ],
    [5n, 100n, 7n, 1n, 2n, 3n],
  );
  const read = (len: number, pos: number) => b.slice(pos, pos + len);
  const { header, descs } = parseStatsLayout(read);

  it('reads the header and the id', () => {
    expect(header).toMatchObject({ nameSize: 48, numDesc: 4, id: 'kvm-1234', dataOffset });
  });

  it('decodes names, types, units, bases, exponents and sizes', () => {
    expect(descs.map((d) => [d.name, d.type, d.unit, d.base, d.exponent, d.size, d.offset])).toEqual([
      ['pf_taken', 'cumulative', 'none', 10, 0, 1, 0],
      ['pages_4k', 'instant', 'none', 10, 0, 1, 8],
      ['halt_poll_ns', 'cumulative', 'seconds', 10, -9, 1, 16],
      ['hist', 'log_hist', 'none', 2, 0, 3, 24],
    ]);
  });

  it('decodes values and computes deltas only for cumulative scalars', () => {
    const before = decodeStatValues(descs, read(48, dataOffset));
    expect(before.get('hist')).toEqual([1n, 2n, 3n]);
    const after = new Map(before);
    after.set('pf_taken', 9n);
    after.set('pages_4k', 90n);
    expect(statDeltas(descs, before, after)).toEqual(
      new Map([
        ['pf_taken', 4n],
        ['pages_4k', 90n],
        ['halt_poll_ns', 0n],
      ]),
    );
  });

  it('refuses a descriptor with an unknown type', () => {
    const bad = image(16, [{ name: 'x', flags: 0x00f, size: 1, offset: 0 }], [0n]);
    expect(() => parseStatsLayout((l, p) => bad.b.slice(p, p + l))).toThrow(/unknown type\/unit in flags 0xf/);
  });
});

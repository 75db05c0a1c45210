// KVM's binary stats (KVM_GET_STATS_FD): the header and descriptors are parsed
// once; each read() returns the current values by name.
import { SIZEOF } from '../uapi/uapi.js';
import { check, KvmError, type Addon } from './sys.js';

export type StatType = 'cumulative' | 'instant' | 'peak' | 'linear_hist' | 'log_hist';
export type StatUnit = 'none' | 'bytes' | 'seconds' | 'cycles' | 'boolean';

export interface StatDesc {
  name: string;
  type: StatType;
  unit: StatUnit;
  base: 10 | 2;
  exponent: number;
  size: number; // number of u64 values
  offset: number; // from the data block
  bucketSize: number;
}

export interface StatsHeader {
  flags: number;
  nameSize: number;
  numDesc: number;
  id: string;
  descOffset: number;
  dataOffset: number;
}

const TYPES: StatType[] = ['cumulative', 'instant', 'peak', 'linear_hist', 'log_hist'];
const UNITS: StatUnit[] = ['none', 'bytes', 'seconds', 'cycles', 'boolean'];

/** Parses a stats header plus descriptors from the bytes at the start of a stats fd. */
export function parseStatsLayout(read: (len: number, pos: number) => Uint8Array): {
  header: StatsHeader;
  descs: StatDesc[];
} {
  const h = read(SIZEOF.kvm_stats_header, 0);
  const hv = new DataView(h.buffer, h.byteOffset, h.byteLength);
  const nameSize = hv.getUint32(4, true);
  const numDesc = hv.getUint32(8, true);
  const idOffset = hv.getUint32(12, true);
  const descOffset = hv.getUint32(16, true);
  const dataOffset = hv.getUint32(20, true);
  const cstr = (b: Uint8Array) => {
    const z = b.indexOf(0);
    return Buffer.from(b.subarray(0, z < 0 ? b.length : z)).toString('latin1');
  };
  const header: StatsHeader = {
    flags: hv.getUint32(0, true),
    nameSize,
    numDesc,
    id: cstr(read(nameSize, idOffset)),
    descOffset,
    dataOffset,
  };
  const descSize = SIZEOF.kvm_stats_desc + nameSize;
  const all = read(descSize * numDesc, descOffset);
  const dv = new DataView(all.buffer, all.byteOffset, all.byteLength);
  const descs: StatDesc[] = [];
  for (let i = 0; i < numDesc; i++) {
    const o = i * descSize;
    const flags = dv.getUint32(o, true);
    const type = TYPES[flags & 0xf];
    const unit = UNITS[(flags >> 4) & 0xf];
    if (type === undefined || unit === undefined)
      throw new Error(`stats descriptor ${i}: unknown type/unit in flags 0x${flags.toString(16)}`);
    descs.push({
      name: cstr(all.subarray(o + SIZEOF.kvm_stats_desc, o + descSize)),
      type,
      unit,
      base: ((flags >> 8) & 0xf) === 1 ? 2 : 10,
      exponent: dv.getInt16(o + 4, true),
      size: dv.getUint16(o + 6, true),
      offset: dv.getUint32(o + 8, true),
      bucketSize: dv.getUint32(o + 12, true),
    });
  }
  return { header, descs };
}

export type StatValues = Map<string, bigint | bigint[]>;

export function decodeStatValues(descs: readonly StatDesc[], data: Uint8Array): StatValues {
  const dv = new DataView(data.buffer, data.byteOffset, data.byteLength);
  const out: StatValues = new Map();
  for (const d of descs) {
    if (d.size === 1) out.set(d.name, dv.getBigUint64(d.offset, true));
    else
      out.set(
        d.name,
        Array.from({ length: d.size }, (_, i) => dv.getBigUint64(d.offset + 8 * i, true)),
      );
  }
  return out;
}

/**
 * after - before for cumulative scalar stats; the after value for instant and
 * peak ones (a delta of a gauge means nothing).
 */
export function statDeltas(descs: readonly StatDesc[], before: StatValues, after: StatValues): Map<string, bigint> {
  const out = new Map<string, bigint>();
  for (const d of descs) {
    const a = after.get(d.name);
    const b = before.get(d.name);
    if (typeof a !== 'bigint' || typeof b !== 'bigint') continue;
    out.set(d.name, d.type === 'cumulative' ? a - b : a);
  }
  return out;
}

/** A stats fd with its layout read once. */
export class StatsReader {
  readonly header: StatsHeader;
  readonly descs: StatDesc[];
  private readonly dataLen: number;
  private readonly buf: Uint8Array;
  constructor(private readonly pread: (buf: Uint8Array, pos: number) => void) {
    const read = (len: number, pos: number) => {
      const b = new Uint8Array(len);
      if (len) pread(b, pos);
      return b;
    };
    ({ header: this.header, descs: this.descs } = parseStatsLayout(read));
    this.dataLen = this.descs.reduce((m, d) => Math.max(m, d.offset + d.size * 8), 0);
    this.buf = new Uint8Array(this.dataLen);
  }
  read(): StatValues {
    this.pread(this.buf, this.header.dataOffset);
    return decodeStatValues(this.descs, this.buf);
  }
  has(name: string): boolean {
    return this.descs.some((d) => d.name === name);
  }
}

/** A stats reader over a VM's or a vCPU's stats fd. */
export function statsReaderFor(a: Addon, fd: number): StatsReader {
  return new StatsReader((buf, pos) => {
    const n = check('pread(stats fd)', a.pread(fd, buf, pos));
    if (n !== buf.byteLength) throw new KvmError('pread(stats fd)', 5, `short read ${n} of ${buf.byteLength}`);
  });
}

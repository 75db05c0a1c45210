// Structural comparison and canonical formatting of expected/observed values.

/**
 * Canonical text of a value: bigints in hex, byte arrays in hex (every byte, so
 * two arrays of one length differ when one byte does), sets in sorted order,
 * stable key order; maps and sets are named, so that neither reads as a record.
 */
export function show(v: unknown): string {
  if (typeof v === 'bigint') return `0x${v.toString(16)}`;
  if (v instanceof Uint8Array) return `<${Buffer.from(v.buffer, v.byteOffset, v.byteLength).toString('hex')}>`;
  if (ArrayBuffer.isView(v)) {
    const name = v.constructor.name;
    return `${name}<${Buffer.from(v.buffer, v.byteOffset, v.byteLength).toString('hex')}>`;
  }
  if (Array.isArray(v)) return `[${v.map(show).join(', ')}]`;
  if (v instanceof Map) return `Map{${[...v].map(([k, x]) => `${show(k)}: ${show(x)}`).join(', ')}}`;
  if (v instanceof Set) return `Set{${[...v].map(show).sort().join(', ')}}`;
  if (v && typeof v === 'object') {
    return `{${Object.keys(v)
      .sort()
      .map((k) => `${k}: ${show((v as Record<string, unknown>)[k])}`)
      .join(', ')}}`;
  }
  if (typeof v === 'string') return JSON.stringify(v);
  return String(v);
}

/** Whether two values are equal: their canonical texts are, character for character. */
export function same(a: unknown, b: unknown): boolean {
  return show(a) === show(b);
}

/** Makes an expectation wrong in a way that cannot be equal to what was observed. */
export function wrong(v: unknown): unknown {
  if (typeof v === 'bigint') return v + 1n;
  if (typeof v === 'number') return v + 1;
  if (typeof v === 'string') return `${v}-not`;
  if (typeof v === 'boolean') return !v;
  if (v instanceof Uint8Array) return Uint8Array.from([...v, 0xee]);
  if (Array.isArray(v)) return [...v, 'extra'];
  return { ...(v as object), wrong: true };
}

// Expectations made wrong while keeping their shape: a differ that compares
// byte arrays by length, numbers by page or page sets by size would let each of
// these through. Every variant differs from the value in one place only:
//   - a byte array: one byte changed, the length kept;
//   - an integer, a bigint, or a hex number inside a string: bit 0 flipped (the
//     neighbouring value of an address, one flag of an error code);
//   - any other string: its last character changed;
//   - a boolean: negated;
//   - an array (a page set, a list of records): one element missing, one extra
//     (a neighbour of the last), or one element made wrong in turn;
//   - a record: one field made wrong in turn.

/** Every shape-keeping wrong variant of `v`, the plainest first. */
export function wrongs(v: unknown): unknown[] {
  if (typeof v === 'bigint') return [v ^ 1n];
  if (typeof v === 'number') return [Number.isInteger(v) ? v ^ 1 : v + 1];
  if (typeof v === 'boolean') return [!v];
  if (typeof v === 'string') return [wrongString(v)];
  if (v === undefined || v === null) return ['not nothing'];
  if (v instanceof Uint8Array) {
    if (v.length === 0) return [Uint8Array.of(0)];
    const out: Uint8Array[] = [];
    for (const i of new Set([v.length - 1, 0])) {
      const w = Uint8Array.from(v);
      w[i]! ^= 1;
      out.push(w);
    }
    return out;
  }
  if (Array.isArray(v)) {
    if (v.length === 0) return [[0]];
    const out: unknown[][] = [v.slice(0, -1), [...v, wrongs(v.at(-1))[0]]];
    v.forEach((x, i) => {
      for (const w of wrongs(x)) out.push(v.map((y, j) => (j === i ? w : y)));
    });
    return out;
  }
  if (v instanceof Map) {
    const out: unknown[] = [];
    for (const [k, x] of v) for (const w of wrongs(x)) out.push(new Map([...v].map(([j, y]) => [j, j === k ? w : y])));
    return out.length ? out : [new Map([['extra', 0]])];
  }
  if (typeof v === 'object') {
    const o = v as Record<string, unknown>;
    const out: unknown[] = [];
    for (const k of Object.keys(o)) for (const w of wrongs(o[k])) out.push({ ...o, [k]: w });
    return out.length ? out : [{ extra: 0 }];
  }
  throw new TypeError(`no wrong variant for a ${typeof v}`);
}

/** The plainest shape-keeping wrong variant of `v`. */
export function wrong(v: unknown): unknown {
  return wrongs(v)[0];
}

/** A string with its last hex number's bit 0 flipped, or else its last character changed. */
function wrongString(s: string): string {
  const m = /0x[0-9a-f]+(?!.*0x[0-9a-f])/i.exec(s) ?? /\d+(?!.*\d)/.exec(s);
  if (m) {
    const hexed = m[0].startsWith('0x') || m[0].startsWith('0X');
    const n = BigInt(m[0]) ^ 1n;
    return s.slice(0, m.index) + (hexed ? `0x${n.toString(16)}` : n.toString()) + s.slice(m.index + m[0].length);
  }
  if (s.length === 0) return 'x';
  const last = s.at(-1)!;
  return s.slice(0, -1) + (last === 'x' ? 'y' : 'x');
}

// The encoder tests' harness (test/asm.test.ts, test/asm-arm64.test.ts): every
// case assembled by GNU as in one batch, the encoder's output for all cases
// laid out back to back for objdump, and the bytes compared case by case.
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';

/** Runs a binutils tool and returns what it printed (stdout, then stderr). */
export type Tool = (tool: string, args: string[]) => string;

export const hexBytes = (b: ArrayLike<number>) => Array.from(b, (x) => x.toString(16).padStart(2, '0')).join(' ');

/**
 * Assembles every case's source between the symbols c<i> and c<i+1> in one
 * run of as (`asArgs` before `-o`), in `dir`: each case's bytes, and what as
 * warned.
 */
export function assembleCases(
  run: Tool,
  dir: string,
  header: string[],
  sources: string[],
  asArgs: string[] = [],
): { bytes: Uint8Array[]; warnings: string } {
  const src = [...header];
  sources.forEach((s, i) => src.push(`c${i}:`, s));
  src.push(`c${sources.length}:`, '');
  const s = join(dir, 'cases.s'),
    o = join(dir, 'cases.o'),
    bin = join(dir, 'cases.bin');
  writeFileSync(s, src.join('\n'));
  const warnings = run('as', [...asArgs, '-o', o, s]);
  run('objcopy', ['-O', 'binary', '-j', '.text', o, bin]);
  const text = readFileSync(bin);
  const at = new Map<string, number>();
  for (const line of run('nm', [o]).split('\n')) {
    const m = /^([0-9a-f]+) \w (c\d+)$/.exec(line);
    if (m) at.set(m[2]!, parseInt(m[1]!, 16));
  }
  return { bytes: sources.map((_, i) => text.subarray(at.get(`c${i}`)!, at.get(`c${i + 1}`)!)), warnings };
}

/**
 * The encoder's output for the cases, back to back, in `dir`/encoder.bin:
 * where each case starts and ends. A case the encoder rejects has no bytes
 * (byteMismatches reports it).
 */
export function encodeAll<C>(
  dir: string,
  cases: C[],
  encode: (k: C) => Uint8Array,
): { file: string; ranges: [number, number][]; total: number } {
  const parts = cases.map((k) => {
    try {
      return encode(k);
    } catch {
      return new Uint8Array();
    }
  });
  const ranges: [number, number][] = [];
  let total = 0;
  for (const p of parts) {
    ranges.push([total, total + p.length]);
    total += p.length;
  }
  const all = new Uint8Array(total);
  parts.forEach((p, i) => all.set(p, ranges[i]![0]));
  const file = join(dir, 'encoder.bin');
  writeFileSync(file, all);
  return { file, ranges, total };
}

/** Differences between the encoder and as for these cases. */
export function byteMismatches<C extends { text: string }>(
  cases: C[],
  asBytes: Map<C, Uint8Array>,
  encode: (k: C) => Uint8Array,
): string[] {
  return cases.flatMap((k) => {
    const want = hexBytes(asBytes.get(k)!);
    let got: string;
    try {
      got = hexBytes(encode(k));
    } catch (e) {
      return [`${k.text}: encoder threw ${(e as Error).message}`];
    }
    return want === got ? [] : [`${k.text}: as ${want} | encoder ${got}`];
  });
}

/**
 * The two comparisons, one test per group of cases: as's bytes against the
 * encoder's, and objdump's reading of the encoder's bytes against the case
 * texts (of the cases `disassembled` keeps: data has no reading).
 */
export function describeComparisons<C>(
  groups: Map<string, C[]>,
  o: {
    warnings: () => string;
    byteMismatches: (cases: C[]) => string[];
    disasmMismatches: (cases: C[]) => string[];
    disassembled?: (k: C) => boolean;
  },
): void {
  describe('encoder bytes equal GNU as bytes', () => {
    it('as assembles the case texts without warnings', () => {
      expect(o.warnings()).toBe('');
    });
    for (const [name, cases] of groups) {
      it(`${name} (${cases.length} cases)`, () => {
        expect(o.byteMismatches(cases)).toEqual([]);
      });
    }
  });

  describe('objdump reads the encoder output as the case texts', () => {
    for (const [name, cases] of groups) {
      const code = o.disassembled ? cases.filter(o.disassembled) : cases;
      if (code.length === 0) continue;
      it(`${name} (${code.length} cases)`, () => {
        expect(o.disasmMismatches(code)).toEqual([]);
      });
    }
  });
}

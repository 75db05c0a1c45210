/**
 * The two tables that C++ and TypeScript both spell out, checked against each other the way
 * test/uapi.test.ts checks <linux/kvm.h>:
 *
 * - the vCPU thread's control block: native/vcpu_thread.h (CTL_*, OP_*) and src/kvm/thread.ts
 *   (CTL, CTL_WORDS, OP);
 * - the lab agent's wire constants: native/agent/wire.h and src/lab/protocol.ts.
 *
 * A small C++ program that includes the header prints every constant the header declares as
 * JSON. The names are read from the header itself, so a constant added on the C++ side alone
 * is seen too. Each TypeScript entry is paired with its C++ name (`runLo` is CTL_RUN_LO,
 * `ioctlBuf` is OP_IOCTL_BUF), and the test fails on a value that differs or on a name without
 * a partner. The last tests change each side in turn and show that the comparison fails.
 */
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { packageRoot } from '../src/kvm/sys.js';
import { CTL, CTL_WORDS, OP as THREAD_OP } from '../src/kvm/thread.js';
import * as P from '../src/lab/protocol.js';

type Table = Record<string, number>;

interface Header {
  path: string;
  namespace: string;
}
const VCPU_THREAD: Header = { path: join(packageRoot, 'native', 'vcpu_thread.h'), namespace: 'kh' };
const WIRE: Header = { path: join(packageRoot, 'native', 'agent', 'wire.h'), namespace: 'kh::agent' };

/** `runLo` -> `RUN_LO`. */
const snake = (k: string) => k.replace(/[A-Z]/g, (c) => `_${c}`).toUpperCase();
const prefixed = (prefix: string, t: Readonly<Record<string, number>>): Table =>
  Object.fromEntries(Object.entries(t).map(([k, v]) => [prefix + snake(k), v]));

/** src/kvm/thread.ts's control block under the C++ names. */
function threadTable(w: Readonly<Record<string, number>> = CTL, words = CTL_WORDS, op = THREAD_OP): Table {
  return { ...prefixed('CTL_', w), CTL_WORDS: words, ...prefixed('OP_', op) };
}

type Scalar =
  | 'PROTOCOL_VERSION'
  | 'REQ_MAGIC'
  | 'REP_MAGIC'
  | 'END_MAGIC'
  | 'REQ_HEADER'
  | 'REP_HEADER'
  | 'ENTRY'
  | 'PAGE'
  | 'MAX_FRAME'
  | 'REQ_PULL'
  | 'ENTRY_ZERO'
  | 'RUN_RECORD'
  | 'WAIT_FOREVER';
type Protocol = Record<Scalar, number> & {
  OP: Readonly<Record<string, number>>;
  STATUS: Readonly<Record<string, number>>;
};

/** src/lab/protocol.ts's constants under the C++ names. */
function protocolTable(p: Protocol = P): Table {
  const { PROTOCOL_VERSION, REQ_MAGIC, REP_MAGIC, END_MAGIC, REQ_HEADER, REP_HEADER, ENTRY, PAGE, MAX_FRAME } = p;
  return {
    PROTOCOL_VERSION,
    REQ_MAGIC,
    REP_MAGIC,
    END_MAGIC,
    REQ_HEADER,
    REP_HEADER,
    ENTRY,
    PAGE,
    MAX_FRAME,
    REQ_PULL: p.REQ_PULL,
    ENTRY_ZERO: p.ENTRY_ZERO,
    RUN_RECORD: p.RUN_RECORD,
    WAIT_FOREVER: p.WAIT_FOREVER,
    ...prefixed('OP_', p.OP),
    ...prefixed('ST_', p.STATUS),
  };
}

/** Every upper-case name the header gives a value (constexpr constants and enumerators). */
function declaredNames(text: string): string[] {
  const code = text.replace(/\/\*[\s\S]*?\*\//g, '').replace(/\/\/.*$/gm, '');
  return [...new Set([...code.matchAll(/\b([A-Z][A-Z0-9_]*)\s*=(?!=)/g)].map((m) => m[1]!))];
}

let dir: string;
beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'kvmharness-native-abi-'));
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));
let builds = 0;

/**
 * Compiles a program that includes the header and prints its constants. With `changed`, the
 * program includes that text instead (a changed copy of the header, in the scratch directory).
 */
function cValues(h: Header, changed?: string): Table {
  const n = builds++;
  let header = h.path;
  if (changed !== undefined) writeFileSync((header = join(dir, `h${n}.h`)), changed);
  const names = declaredNames(changed ?? readFileSync(h.path, 'utf8'));
  const src = join(dir, `p${n}.cc`);
  const exe = join(dir, `p${n}`);
  const sep = (i: number) => (i ? '","' : '""');
  const lines = names.map((k, i) => `  std::printf("%s\\"${k}\\": %llu", ${sep(i)}, (unsigned long long)(${k}));`);
  writeFileSync(
    src,
    [
      '#include <cstdio>',
      `#include "${header}"`,
      `using namespace ${h.namespace};`,
      'int main() {',
      '  std::printf("{");',
      ...lines,
      '  std::printf("}\\n");',
      '  return 0;',
      '}',
      '',
    ].join('\n'),
  );
  const cxx = process.env.CXX || 'g++';
  const cc = spawnSync(cxx, ['-std=c++17', '-Wall', '-Werror', '-o', exe, src], { encoding: 'utf8' });
  if (cc.error) {
    throw new Error(`${cxx}: ${cc.error.message} (these tests compile the native headers: install g++, or set CXX)`);
  }
  if (cc.status !== 0) throw new Error(`${cxx} failed on a program including ${h.path}:\n${cc.stderr}`);
  const r = spawnSync(exe, [], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`${exe} exited with ${r.status}:\n${r.stderr}`);
  return JSON.parse(r.stdout) as Table;
}

/** What differs between the two sides: one line per name. */
function compare(c: Table, ts: Table): string[] {
  const out: string[] = [];
  for (const k of new Set([...Object.keys(c), ...Object.keys(ts)])) {
    if (!(k in ts)) out.push(`${k}: only in C++ (${c[k]})`);
    else if (!(k in c)) out.push(`${k}: only in TypeScript (${ts[k]})`);
    else if (c[k] !== ts[k]) out.push(`${k}: C++ ${c[k]}, TypeScript ${ts[k]}`);
  }
  return out;
}

describe('native/vcpu_thread.h and src/kvm/thread.ts', () => {
  it('lay out the control block and number the commands alike', () => {
    const c = cValues(VCPU_THREAD);
    expect(Object.keys(c)).toContain('CTL_WAITING');
    expect(compare(c, threadTable())).toEqual([]);
  });
});

describe('native/agent/wire.h and src/lab/protocol.ts', () => {
  it('agree on magics, header sizes, ops, flags and status codes', () => {
    const c = cValues(WIRE);
    expect(Object.keys(c)).toContain('OP_EXIT');
    expect(compare(c, protocolTable())).toEqual([]);
  });
});

describe('the comparison fails when one side changes', () => {
  it('sees a changed, an added and a dropped TypeScript entry', () => {
    const c = cValues(VCPU_THREAD);
    expect(compare(c, threadTable({ ...CTL, done: 7 }))).toEqual(['CTL_DONE: C++ 8, TypeScript 7']);
    expect(compare(c, threadTable({ ...CTL, spare: 7 }))).toEqual(['CTL_SPARE: only in TypeScript (7)']);
    const { tid: _, ...noTid } = CTL;
    expect(compare(c, threadTable(noTid))).toEqual(['CTL_TID: only in C++ (14)']);
    const w = cValues(WIRE);
    expect(compare(w, protocolTable({ ...P, OP: { ...P.OP, run: 99 } }))).toEqual(['OP_RUN: C++ 17, TypeScript 99']);
    expect(compare(w, protocolTable({ ...P, REP_HEADER: 48 }))).toEqual(['REP_HEADER: C++ 40, TypeScript 48']);
  });

  it('sees a changed and an added C++ constant', () => {
    const thread = readFileSync(VCPU_THREAD.path, 'utf8');
    const moved = thread.replace('CTL_DONE = 8', 'CTL_DONE = 7');
    expect(moved).not.toBe(thread);
    expect(compare(cValues(VCPU_THREAD, moved), threadTable())).toEqual(['CTL_DONE: C++ 7, TypeScript 8']);
    const wire = readFileSync(WIRE.path, 'utf8');
    const added = wire.replace('  OP_EXIT = 21,\n', '  OP_EXIT = 21,\n  OP_SPARE = 22,\n');
    expect(added).not.toBe(wire);
    expect(compare(cValues(WIRE, added), protocolTable())).toEqual(['OP_SPARE: only in C++ (22)']);
  });
});

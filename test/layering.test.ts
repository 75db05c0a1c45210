/**
 * The rooms of src/ (its top-level folders) and the nevers between them, read from the import
 * lines of every source file:
 *
 * - no two rooms import each other, directly or around a circle;
 * - src/base and src/uapi import nothing outside themselves;
 * - src/kvm, the binding, imports only src/kvm, src/uapi and src/base;
 * - src/model imports only src/model, src/uapi, src/base and arch/x86/pte.ts (types also from
 *   arch/arch.ts): models import no binding;
 * - src/observe imports nothing from src/run, src/checks, src/report or src/cli: observers don't
 *   judge;
 * - src/report takes only types from other rooms, besides the pure rooms (base, arch, model)
 *   and the few pure helpers named in REPORT_VALUES: reporters only format.
 *
 * The last tests give the rules imports that break each of them and show that they are caught.
 */
import { readdirSync, readFileSync } from 'node:fs';
import { dirname, join, relative, resolve } from 'node:path';
import { describe, expect, it } from 'vitest';
import { packageRoot } from '../src/kvm/sys.js';

const SRC = join(packageRoot, 'src');

/** One import: files relative to src/ ('kvm/vm.ts'), and the values it takes (none: types only). */
interface Import {
  from: string;
  to: string;
  values: string[];
}

function sources(dir: string): string[] {
  return readdirSync(dir, { withFileTypes: true }).flatMap((e) => {
    const p = join(dir, e.name);
    if (e.isDirectory()) return sources(p);
    return e.name.endsWith('.ts') ? [p] : [];
  });
}

/** The values an import or export clause takes: `type X` and `import type` take none. */
function valuesOf(typeOnly: boolean, clause: string): string[] {
  if (typeOnly) return [];
  const braces = clause.match(/\{([^}]*)\}/);
  // a default import, or `* as name` (the whole module: '*')
  const outside = clause
    .replace(/\{[^}]*\}/, '')
    .replace(/\*\s+as\s+\w+/, '*')
    .replace(/,/g, ' ')
    .trim();
  const names = outside ? outside.split(/\s+/) : [];
  for (const n of braces ? braces[1]!.split(',') : []) {
    const s = n.trim();
    if (s && !s.startsWith('type ')) names.push(s.split(/\s+as\s+/)[0]!);
  }
  return names;
}

function importsOf(file: string, text: string): Import[] {
  const from = relative(SRC, file);
  const out: Import[] = [];
  const add = (spec: string, values: string[]) => {
    if (!spec.startsWith('.')) return;
    out.push({ from, to: relative(SRC, resolve(dirname(file), spec)).replace(/\.js$/, '.ts'), values });
  };
  const statement = /^\s*(?:import|export)\s+(type\s+)?([^;'"]*?)\s*from\s*'([^']+)'/gm;
  for (const m of text.matchAll(statement)) add(m[3]!, valuesOf(!!m[1], m[2]!));
  for (const m of text.matchAll(/^\s*import\s+'([^']+)'/gm)) add(m[1]!, ['(side effects)']);
  for (const m of text.matchAll(/\bimport\(\s*'([^']+)'\s*\)/g)) add(m[1]!, ['(dynamic)']);
  return out;
}

const room = (file: string): string => file.split('/')[0]!.replace(/\.ts$/, '');

/** Values src/report may take from rooms that are not pure: formatting helpers and a constant. */
const REPORT_VALUES = new Set([
  'run/differ.ts#show', // the canonical text of a value, which the comparisons hold
  'probe/probe.ts#guestWalkerOf', // who walks the guest's tables, a function of the profile
  'lab/ab.ts#TIME_FRACTION', // the A/B noise threshold the table's footnote states
]);

/** The rule an import breaks, or undefined. */
function broken(i: Import): string | undefined {
  const [a, b] = [room(i.from), room(i.to)];
  if (a === b) return undefined;
  const typesOnly = i.values.length === 0;
  switch (a) {
    case 'base':
    case 'uapi':
      return `src/${a} imports nothing outside itself`;
    case 'kvm':
      if (b !== 'uapi' && b !== 'base') return 'src/kvm imports only src/kvm, src/uapi and src/base';
      break;
    case 'model':
      if (['uapi', 'base'].includes(b) || i.to === 'arch/x86/pte.ts') break;
      if (i.to === 'arch/arch.ts' && typesOnly) break;
      return 'src/model imports only src/model, src/uapi, src/base and arch/x86/pte.ts (types from arch/arch.ts)';
    case 'observe':
      if (['run', 'checks', 'report', 'cli'].includes(b)) return `src/observe imports nothing from src/${b}`;
      break;
    case 'report': {
      if (typesOnly || ['base', 'arch', 'model'].includes(b)) break;
      const odd = i.values.filter((v) => !REPORT_VALUES.has(`${i.to}#${v}`));
      if (odd.length) return `src/report takes only types from src/${b} (not ${odd.join(', ')})`;
      break;
    }
  }
  return undefined;
}

/** A circle of rooms that import each other, or undefined. */
function circle(imports: readonly Import[]): string[] | undefined {
  const next = new Map<string, Set<string>>();
  for (const i of imports) {
    const [a, b] = [room(i.from), room(i.to)];
    if (a !== b) next.set(a, (next.get(a) ?? new Set()).add(b));
  }
  const done = new Set<string>();
  const path: string[] = [];
  const visit = (r: string): string[] | undefined => {
    const at = path.indexOf(r);
    if (at >= 0) return [...path.slice(at), r];
    if (done.has(r)) return undefined;
    path.push(r);
    for (const n of next.get(r) ?? []) {
      const c = visit(n);
      if (c) return c;
    }
    path.pop();
    done.add(r);
    return undefined;
  };
  for (const r of next.keys()) {
    const c = visit(r);
    if (c) return c;
  }
  return undefined;
}

const show = (i: Import, why: string) => `${i.from} -> ${i.to}: ${why}`;
const breaches = (imports: readonly Import[]) =>
  imports.flatMap((i) => {
    const why = broken(i);
    return why ? [show(i, why)] : [];
  });

describe('the rooms of src/', () => {
  const imports = sources(SRC).flatMap((f) => importsOf(f, readFileSync(f, 'utf8')));

  it('reads the imports of every room', () => {
    expect(imports.length).toBeGreaterThan(300);
    const rooms = new Set(imports.flatMap((i) => [room(i.from), room(i.to)]));
    for (const r of ['base', 'kvm', 'model', 'observe', 'report', 'run', 'target']) expect(rooms).toContain(r);
    // type-only clauses take no values; the others name theirs
    const vm = imports.find((i) => i.from === 'model/vm.ts' && i.to === 'base/host-backing.ts');
    expect(vm?.values).toEqual([]);
    const units = imports.find((i) => i.from === 'model/vm.ts' && i.to === 'base/units.ts');
    expect(units?.values.sort()).toEqual(['PAGE', 'hex']);
  });

  it('has no circle of rooms', () => {
    expect(circle(imports)).toBeUndefined();
  });

  it('keeps the nevers', () => {
    expect(breaches(imports)).toEqual([]);
  });

  it('catches an import that breaks each rule', () => {
    const i = (from: string, to: string, ...values: string[]): Import => ({ from, to, values });
    expect(
      breaches([
        i('base/units.ts', 'kvm/sys.ts', 'check'),
        i('kvm/vm.ts', 'target/local.ts', 'localTarget'),
        i('kvm/kvm.ts', 'lab/session.ts'),
        i('model/tdp.ts', 'kvm/vm.ts'),
        i('model/vm.ts', 'arch/arch.ts', 'nodeArch'),
        i('observe/tracefs.ts', 'run/differ.ts', 'same'),
        i('report/report.ts', 'run/runner.ts', 'runChecks'),
        i('report/report.ts', 'run/differ.ts', 'show', 'same'),
      ]),
    ).toEqual([
      'base/units.ts -> kvm/sys.ts: src/base imports nothing outside itself',
      'kvm/vm.ts -> target/local.ts: src/kvm imports only src/kvm, src/uapi and src/base',
      'kvm/kvm.ts -> lab/session.ts: src/kvm imports only src/kvm, src/uapi and src/base',
      'model/tdp.ts -> kvm/vm.ts: src/model imports only src/model, src/uapi, src/base and arch/x86/pte.ts' +
        ' (types from arch/arch.ts)',
      'model/vm.ts -> arch/arch.ts: src/model imports only src/model, src/uapi, src/base and arch/x86/pte.ts' +
        ' (types from arch/arch.ts)',
      'observe/tracefs.ts -> run/differ.ts: src/observe imports nothing from src/run',
      'report/report.ts -> run/runner.ts: src/report takes only types from src/run (not runChecks)',
      'report/report.ts -> run/differ.ts: src/report takes only types from src/run (not same)',
    ]);
    expect(breaches([i('report/report.ts', 'run/types.ts'), i('model/tdp.ts', 'arch/arch.ts')])).toEqual([]);
    expect(circle([i('kvm/kvm.ts', 'target/target.ts'), i('target/local.ts', 'kvm/sys.ts')])).toEqual([
      'kvm',
      'target',
      'kvm',
    ]);
    expect(circle([i('a/x.ts', 'b/y.ts'), i('b/y.ts', 'c/z.ts'), i('c/z.ts', 'a/x.ts')])).toEqual(['a', 'b', 'c', 'a']);
    expect(circle([i('a/x.ts', 'b/y.ts'), i('b/y.ts', 'c/z.ts')])).toBeUndefined();
  });

  it('tells a type-only clause from one that takes values', () => {
    const text = [
      "import type { A } from './a.js';",
      "import { type B, c, d as e } from './b.js';",
      "import f, { g } from './c.js';",
      "import * as P from './p.js';",
      "export { h } from './d.js';",
      "export type { I } from './e.js';",
      'import {',
      '  type J,',
      '  k,',
      "} from './f.js';",
    ].join('\n');
    const got = importsOf(join(SRC, 'run', 'x.ts'), text).map((i) => [i.to, i.values]);
    expect(got).toEqual([
      ['run/a.ts', []],
      ['run/b.ts', ['c', 'd']],
      ['run/c.ts', ['f', 'g']],
      ['run/p.ts', ['*']],
      ['run/d.ts', ['h']],
      ['run/e.ts', []],
      ['run/f.ts', ['k']],
    ]);
  });
});

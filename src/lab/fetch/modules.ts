// Module trees: the modules of a lib/modules/<version> directory, their
// .modinfo fields, and the order /init loads them in.
import { spawnSync } from 'node:child_process';
import { existsSync, readdirSync, readFileSync, statSync } from 'node:fs';
import { basename, join, resolve } from 'node:path';
import { gunzipSync } from 'node:zlib';
import { LabError, moduleName } from '../profiles.js';

/** A module file, decompressed (.ko, .ko.xz, .ko.gz, .ko.zst). */
export function readModule(path: string): Buffer {
  if (path.endsWith('.ko')) return readFileSync(path);
  let tool: [string, string[]];
  if (path.endsWith('.ko.gz')) return gunzipSync(readFileSync(path));
  else if (path.endsWith('.ko.xz')) tool = ['xz', ['-dc', path]];
  else if (path.endsWith('.ko.zst')) tool = ['zstd', ['-dcq', path]];
  else throw new LabError(`${path}: not a kernel module file`);
  const r = spawnSync(tool[0], tool[1], { maxBuffer: 1 << 30 });
  if (r.status !== 0)
    throw new LabError(
      `cannot decompress ${path}: ${r.error ? `${tool[0]} not installed` : r.stderr.toString().trim() || `${tool[0]} failed`}`,
    );
  return r.stdout;
}

/** A field of a module's .modinfo ("depends", "vermagic"), or undefined. */
export function modinfo(ko: Buffer, key: string): string | undefined {
  const at = ko.indexOf(`\0${key}=`);
  if (at < 0) return undefined;
  const start = at + key.length + 2;
  const end = ko.indexOf(0, start);
  return ko.toString('latin1', start, end < 0 ? undefined : end);
}

const MODULE_FILE = /\.ko(\.xz|\.gz|\.zst)?$/;
const nameOf = (path: string): string => moduleName(basename(path).replace(MODULE_FILE, ''));

/** What a lib/modules/<version> directory offers: module files by name, modules.dep, modules.builtin. */
export interface ModuleTree {
  dir: string;
  /** Module name (underscores) → absolute path of its file. */
  files: Map<string, string>;
  /** Module name → its modules.dep list (all dependencies, in the order modprobe reverses to load), when modules.dep exists. */
  deps?: Map<string, string[]>;
  /** Module names listed in modules.builtin. */
  builtin: Set<string>;
}

export function moduleTree(dir: string): ModuleTree {
  const files = new Map<string, string>();
  const builtin = new Set<string>();
  let deps: Map<string, string[]> | undefined;
  const depFile = join(dir, 'modules.dep');
  if (existsSync(depFile)) {
    deps = new Map();
    for (const line of readFileSync(depFile, 'utf8').split('\n')) {
      const colon = line.indexOf(':');
      if (colon < 0) continue;
      const path = line.slice(0, colon).trim();
      const name = nameOf(path);
      files.set(name, resolve(dir, path));
      deps.set(
        name,
        line
          .slice(colon + 1)
          .trim()
          .split(/\s+/)
          .filter(Boolean)
          .map(nameOf),
      );
    }
  } else {
    for (const f of readdirSync(dir, { recursive: true, encoding: 'utf8' })) {
      if (MODULE_FILE.test(f) && !files.has(nameOf(f))) files.set(nameOf(f), join(dir, f));
    }
  }
  const bi = join(dir, 'modules.builtin');
  if (existsSync(bi))
    for (const line of readFileSync(bi, 'utf8').split('\n')) if (line.trim()) builtin.add(nameOf(line.trim()));
  return { dir, files, deps, builtin };
}

/**
 * The modules to insmod, in load order, for `names` and everything they depend
 * on, skipping built-in ones. Dependencies come from modules.dep, or from each
 * module's own `depends=` when the tree has no modules.dep.
 */
export function loadOrder(
  tree: ModuleTree,
  names: readonly string[],
  builtin: ReadonlySet<string> = tree.builtin,
): string[] {
  const out: string[] = [];
  const visit = (name: string, from: string | undefined, path: string[]): void => {
    if (out.includes(name) || builtin.has(name)) return;
    if (path.includes(name)) throw new LabError(`module dependency cycle: ${[...path, name].join(' → ')}`);
    const file = tree.files.get(name);
    if (!file)
      throw new LabError(
        from
          ? `${basename(tree.files.get(from)!).replace(MODULE_FILE, '.ko')} needs ${name}.ko, which is not in ${tree.dir}`
          : `no ${name}.ko in ${tree.dir}`,
      );
    const listed = tree.deps?.get(name);
    const direct = listed
      ? [...listed].reverse()
      : (modinfo(readModule(file), 'depends') ?? '').split(',').filter(Boolean).map(moduleName);
    for (const d of direct) visit(d, name, [...path, name]);
    out.push(name);
  };
  for (const n of names) visit(moduleName(n), undefined, []);
  return out;
}

/** The version directory when given lib/modules/<v>, lib/modules or a tree root containing lib/modules/<v>. */
export function modulesVersionDir(dir: string): string {
  if (existsSync(join(dir, 'modules.dep')) || existsSync(join(dir, 'kernel'))) return dir;
  for (const base of [dir, join(dir, 'lib', 'modules')]) {
    if (!existsSync(base) || !statSync(base).isDirectory()) continue;
    const sub = readdirSync(base).filter(
      (d) => existsSync(join(base, d, 'modules.dep')) || existsSync(join(base, d, 'kernel')),
    );
    if (sub.length === 1) return join(base, sub[0]!);
  }
  return dir;
}

// kvm_mutants_killed_run / kvm_mutants_killed_fuzz: how many seeded KVM bugs
// the harness catches. Each file in bench/kvm-mutants/ is a small patch to
// Debian's source of the 6.1 lab kernel (arch/x86/kvm, virt/kvm), headed by
// one line on what it breaks and the lab profile whose MMU runs the code it
// touches. The tree from `lab source --release 6.1` is built with each patch
// (incrementally: one file recompiles), booted in that profile, and judged
// by the built-in suite (`lab run … -- run`) and by a fixed-length fuzz
// campaign (`fuzz --lab …`). The unmodified rebuild must pass both first, so
// a kill is the patch's doing. The CLI is run as a child process, so a
// mutant that crashes the lab's kernel is judged as a user would see it.
import { execFileSync, spawn } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { labCacheDir } from '../src/lab/fetch/index.js';
import { labSource, SOURCE_MARK } from '../src/lab/kvm-source.js';
import { packageRoot } from '../src/kvm/sys.js';
import type { Entry } from './entry.js';

export const MUTANT_RELEASE = '6.1';
export const MUTANTS_DIR = join(packageRoot, 'bench', 'kvm-mutants');

export interface KvmMutant {
  /** The file name without `.patch`, e.g. `01-tdp-zap-huge-only`. */
  name: string;
  /** What the patch breaks, one line. */
  what: string;
  /** The lab profile whose MMU runs the patched code. */
  profile: string;
  /** The patch file. */
  file: string;
}

/** The patches in `dir`, in name order, with their two header lines. */
export function loadMutants(dir: string = MUTANTS_DIR): KvmMutant[] {
  return readdirSync(dir)
    .filter((f) => f.endsWith('.patch'))
    .sort()
    .map((f) => {
      const file = join(dir, f);
      const [what = '', prof = ''] = readFileSync(file, 'utf8').split('\n', 2);
      const m = /^profile: (\S+)$/.exec(prof);
      if (!what || what.startsWith('diff ') || !m) {
        throw new Error(`${file}: the first line must say what the patch breaks and the second "profile: NAME"`);
      }
      return { name: f.replace(/\.patch$/, ''), what, profile: m[1]!, file };
    });
}

export interface Verdict {
  /** `killed`: a check failed or errored, or the kernel crashed; `survived`: everything passed. */
  outcome: 'killed' | 'survived';
  /** The checks (or the fuzz finding) that killed it. */
  by: string[];
  seconds: number;
}

interface Child {
  code: number;
  stdout: string;
  stderr: string;
}

/** `kvmharness ARGS` from dist/ as a child process: its exit code and output (lab build lines go to `log`). */
export function cli(args: string[], log: (s: string) => void): Promise<Child> {
  return new Promise((resolve, reject) => {
    const p = spawn(process.execPath, [join(packageRoot, 'dist', 'src', 'cli', 'bin.js'), ...args], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    p.stdout.on('data', (b: Buffer) => (stdout += b.toString()));
    p.stderr.on('data', (b: Buffer) => {
      stderr += b.toString();
      for (const line of b.toString().split('\n')) if (/^lab: (building|KVM built)/.test(line)) log(line);
    });
    p.on('error', reject);
    p.on('close', (code) => resolve({ code: code ?? 1, stdout, stderr }));
  });
}

function lastLine(s: string): string {
  const lines = s.trim().split('\n');
  return lines[lines.length - 1] ?? '';
}

/** The built-in suite on the tree's modules in `profile`: which checks failed or errored. */
export async function judgeByRun(dir: string, profile: string, log: (s: string) => void): Promise<Verdict> {
  const t0 = performance.now();
  const r = await cli(
    ['lab', 'run', '--release', MUTANT_RELEASE, '--profile', profile, '--kvm-source', dir, '--', 'run', '--json'],
    log,
  );
  const seconds = (performance.now() - t0) / 1000;
  if (r.code !== 0 && r.code !== 1) throw new Error(`lab run exited ${r.code}: ${lastLine(r.stderr)}`);
  let report: { checks: { name: string; outcome: string; reason?: string }[] };
  try {
    report = JSON.parse(r.stdout) as typeof report;
  } catch {
    throw new Error(`lab run printed no JSON report (exit ${r.code}): ${lastLine(r.stderr)}`);
  }
  const by = report.checks.filter((c) => c.outcome === 'fail' || c.outcome === 'error').map((c) => c.name);
  if (r.code === 1 && by.length === 0) throw new Error('lab run exited 1 with no failed check in its report');
  return { outcome: by.length > 0 ? 'killed' : 'survived', by, seconds };
}

/** A fuzz campaign of `cases` cases from seed 1 on the tree's modules in `profile`. */
export async function judgeByFuzz(
  dir: string,
  profile: string,
  cases: number,
  log: (s: string) => void,
): Promise<Verdict> {
  const out = mkdtempSync(join(tmpdir(), 'kvmharness-mutant-fuzz-'));
  const t0 = performance.now();
  try {
    const r = await cli(
      [
        'fuzz',
        '--lab',
        profile,
        '--release',
        MUTANT_RELEASE,
        '--kvm-source',
        dir,
        '--cases',
        String(cases),
        '--seed',
        '1',
        '--out',
        out,
        '--json',
      ],
      log,
    );
    const seconds = (performance.now() - t0) / 1000;
    if (r.code !== 0 && r.code !== 1) throw new Error(`fuzz exited ${r.code}: ${lastLine(r.stderr)}`);
    if (r.code === 0) return { outcome: 'survived', by: [], seconds };
    const names = existsSync(out) ? readdirSync(out) : [];
    return { outcome: 'killed', by: names.length ? names : ['fuzz finding'], seconds };
  } finally {
    rmSync(out, { recursive: true, force: true });
  }
}

function git(dir: string, args: string[]): void {
  // The ceiling keeps git from taking a repository above the tree for the tree's own.
  execFileSync('git', ['apply', ...args], {
    cwd: dir,
    stdio: ['ignore', 'ignore', 'pipe'],
    env: { ...process.env, GIT_CEILING_DIRECTORIES: dirname(dir) },
  });
}

/** Applies `m` to the tree at `dir` for the duration of `f`, and takes it out again whatever happens. */
export async function withMutant<T>(dir: string, m: KvmMutant, f: () => Promise<T>): Promise<T> {
  try {
    git(dir, ['--check', m.file]);
  } catch (e) {
    const why = (e as { stderr?: Buffer }).stderr?.toString().trim().split('\n')[0] ?? '';
    throw new Error(`${m.name} does not apply to ${dir}: ${why}`);
  }
  git(dir, [m.file]);
  try {
    return await f();
  } finally {
    git(dir, ['-R', m.file]);
  }
}

export interface MutantsOptions {
  log: (s: string) => void;
  /** Fuzz cases per mutant; 0 skips the fuzz campaigns. */
  fuzzCases: number;
  /** Only these mutants (names or name prefixes). */
  only?: string[];
}

export interface MutantRow extends KvmMutant {
  run: Verdict;
  fuzz?: Verdict;
}

export async function benchKvmMutants(o: MutantsOptions): Promise<{ entries: Entry[]; rows: MutantRow[] }> {
  const all = loadMutants();
  const mutants = o.only?.length ? all.filter((m) => o.only!.some((p) => m.name.startsWith(p))) : all;
  if (mutants.length === 0) throw new Error(`no mutant is called ${o.only?.join(', ')}`);
  const dir = join(labCacheDir(), `kvm-mutants-${MUTANT_RELEASE}`);
  if (!existsSync(join(dir, SOURCE_MARK))) {
    rmSync(dir, { recursive: true, force: true });
    await labSource({ release: MUTANT_RELEASE, dir, log: o.log });
  }
  // A tree left patched by an interrupted run is put back first.
  for (const m of all) {
    try {
      git(dir, ['-R', '--check', m.file]);
      git(dir, ['-R', m.file]);
      o.log(`kvm mutants: took ${m.name} out of the tree (left in by an earlier run)`);
    } catch {
      // not applied
    }
  }
  for (const profile of [...new Set(mutants.map((m) => m.profile))]) {
    o.log(`kvm mutants: the unmodified rebuild on ${profile}`);
    const base = await judgeByRun(dir, profile, o.log);
    if (base.outcome !== 'survived')
      throw new Error(`the unmodified ${MUTANT_RELEASE} rebuild fails on ${profile}: ${base.by.join(', ')}`);
    if (o.fuzzCases > 0) {
      const f = await judgeByFuzz(dir, profile, o.fuzzCases, o.log);
      if (f.outcome !== 'survived')
        throw new Error(`fuzzing the unmodified ${MUTANT_RELEASE} rebuild on ${profile} finds ${f.by.join(', ')}`);
    }
  }
  const rows: MutantRow[] = [];
  for (const m of mutants) {
    o.log(`kvm mutant ${m.name} (${m.profile}): ${m.what}`);
    const row = await withMutant(dir, m, async () => {
      const run = await judgeByRun(dir, m.profile, o.log);
      const fuzz = o.fuzzCases > 0 ? await judgeByFuzz(dir, m.profile, o.fuzzCases, o.log) : undefined;
      return { ...m, run, fuzz };
    });
    o.log(
      `  run: ${row.run.outcome}${row.run.by.length ? ` by ${row.run.by.join(', ')}` : ''}` +
        (row.fuzz ? `; fuzz: ${row.fuzz.outcome}` : ''),
    );
    rows.push(row);
  }
  const killedRun = rows.filter((r) => r.run.outcome === 'killed').length;
  const entries: Entry[] = [
    {
      name: 'kvm_mutants_killed_run',
      unit: 'killed',
      value: killedRun,
      reference: rows.length,
      note:
        `${killedRun}/${rows.length} on ${MUTANT_RELEASE}; survivors: ` +
        (rows
          .filter((r) => r.run.outcome === 'survived')
          .map((r) => r.name)
          .join(', ') || 'none'),
    },
  ];
  if (o.fuzzCases > 0) {
    const killedFuzz = rows.filter((r) => r.fuzz?.outcome === 'killed').length;
    entries.push({
      name: 'kvm_mutants_killed_fuzz',
      unit: 'killed',
      value: killedFuzz,
      reference: rows.length,
      note: `${killedFuzz}/${rows.length}, ${o.fuzzCases} cases per mutant from seed 1`,
    });
  } else {
    entries.push({ name: 'kvm_mutants_killed_fuzz', unit: 'killed', value: null, note: 'not run (--fuzz-cases 0)' });
  }
  return { entries, rows };
}

/** The per-mutant table the bench prints after its entries. */
export function mutantTable(rows: MutantRow[]): string {
  const head = ['mutant', 'profile', 'run', 'fuzz', 'killed by'];
  const body = rows.map((r) => [
    r.name,
    r.profile,
    r.run.outcome,
    r.fuzz?.outcome ?? '-',
    [...r.run.by, ...(r.fuzz?.outcome === 'killed' ? ['fuzz'] : [])].join(', ') || '-',
  ]);
  const widths = head.map((h, i) => Math.max(h.length, ...body.map((b) => b[i]!.length)));
  return [head, ...body]
    .map((row) =>
      row
        .map((c, i) => c.padEnd(widths[i]!))
        .join('  ')
        .trimEnd(),
    )
    .join('\n');
}

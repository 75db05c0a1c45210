// `npm run bench`: the harness against a C reference on the same KVM work, a
// leak check over many VM lifecycles, and the pure-model benches.
//
//   node dist/bench/main.js [--json] [--rounds N] [--exits N] [--lifecycles N] [--leak N] [--no-lab] [--no-kvm-source]
//   node dist/bench/main.js --kvm-mutants [--fuzz-cases N] [--mutant NAME]... [--json]   (seeded KVM bugs, bench/kvm-mutants/)
//
// stdout: a table, or with --json exactly one JSON array. Progress goes to stderr.
// Exit status 0 whether or not targets are met; 1 only if the bench itself failed.
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import { Kvm } from '../src/kvm/kvm.js';
import { localTarget } from '../src/target/local.js';
import { packageRoot } from '../src/kvm/sys.js';
import { exitRoundtrip, faultIn, lifecycleOnce, vmLifecycle } from './kvm.js';
import { benchKvmSource } from './kvm-source.js';
import { benchKvmMutants, mutantTable } from './kvm-mutants.js';
import { benchFuzz } from './fuzz.js';
import type { Entry } from './entry.js';
import { benchLab } from './lab.js';
import { benchMatrix } from './matrix.js';
import { benchTdpIter } from './tdp.js';
import { benchModelWalks } from './walk.js';

interface Target {
  text: string;
  met: (e: Entry) => boolean;
}

const TARGETS: Record<string, Target> = {
  exit_roundtrip: { text: 'ratio <= 1.10', met: (e) => e.ratio !== undefined && e.ratio <= 1.1 },
  vm_lifecycle: { text: 'ratio <= 1.15', met: (e) => e.ratio !== undefined && e.ratio <= 1.15 },
  fault_in: { text: 'ratio <= 1.10', met: (e) => e.ratio !== undefined && e.ratio <= 1.1 },
  vm_lifecycle_fd_growth: { text: '= 0', met: (e) => e.value === 0 },
  vm_lifecycle_rss_growth_mb: { text: '< 20 MB', met: (e) => e.value !== null && e.value < 20 },
  model_walks_per_s: { text: '>= 2,000,000', met: (e) => e.value !== null && e.value >= 2_000_000 },
  tdp_iter_1m_gfn_ms: { text: '<= 50 ms', met: (e) => e.value !== null && e.value <= 50 },
  matrix_cases_per_s: { text: '>= 20,000', met: (e) => e.value !== null && e.value >= 20_000 },
  matrix_full_4level_s: { text: '< 300 s', met: (e) => e.value !== null && e.value < 300 },
  lab_boot_s: { text: '<= 5 s', met: (e) => e.value !== null && e.value <= 5 },
};

interface Options {
  json: boolean;
  rounds: number;
  exits: number;
  lifecycles: number;
  leak: number;
  matrixFull: boolean;
  pages: number;
  lab: boolean;
  labBoots: number;
  /** lab_kvm_source_verdict_s (--no-kvm-source skips it). */
  kvmSource: boolean;
  /** Only the KVM-mutant bench (--kvm-mutants), with this many fuzz cases per mutant. */
  kvmMutants: boolean;
  fuzzCases: number;
  mutants: string[];
}

function parseArgs(argv: string[]): Options {
  const o: Options = {
    json: false,
    rounds: 7,
    exits: 30_000,
    lifecycles: 300,
    leak: 10_000,
    matrixFull: false,
    pages: 4096,
    lab: true,
    labBoots: 3,
    kvmSource: true,
    kvmMutants: false,
    fuzzCases: 40,
    mutants: [],
  };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    const int = (): number => {
      const v = Number(argv[++i]);
      if (!Number.isInteger(v) || v <= 0) throw new Error(`${a} needs a positive integer`);
      return v;
    };
    if (a === '--json') o.json = true;
    else if (a === '--rounds') o.rounds = int();
    else if (a === '--exits') o.exits = int();
    else if (a === '--lifecycles') o.lifecycles = int();
    else if (a === '--leak') o.leak = int();
    else if (a === '--matrix-full') o.matrixFull = true;
    else if (a === '--pages') o.pages = int();
    else if (a === '--no-lab') o.lab = false;
    else if (a === '--lab-boots') o.labBoots = int();
    else if (a === '--no-kvm-source') o.kvmSource = false;
    else if (a === '--kvm-mutants') o.kvmMutants = true;
    else if (a === '--fuzz-cases') {
      const v = Number(argv[++i]);
      if (!Number.isInteger(v) || v < 0) throw new Error('--fuzz-cases needs a whole number');
      o.fuzzCases = v;
    } else if (a === '--mutant') {
      const v = argv[++i];
      if (!v) throw new Error('--mutant needs a name');
      o.mutants.push(v);
    } else if (a === '--help' || a === '-h') {
      process.stderr.write(
        'usage: node dist/bench/main.js [--json] [--rounds N] [--exits N] [--lifecycles N] [--leak N] [--pages N] [--matrix-full] [--no-lab] [--lab-boots N] [--no-kvm-source]\n       node dist/bench/main.js --kvm-mutants [--fuzz-cases N] [--mutant NAME]... [--json]\n',
      );
      process.exit(0);
    } else throw new Error(`unknown argument ${a}`);
  }
  return o;
}

const progress = (s: string): void => void process.stderr.write(`bench: ${s}\n`);

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}
const fmt = (x: number, digits = 2): string => x.toFixed(digits);
const spread = (xs: number[], digits = 2): string =>
  `min ${fmt(Math.min(...xs), digits)} median ${fmt(median(xs), digits)} max ${fmt(Math.max(...xs), digits)}`;

/** Builds bench/ref/ref.c into a temporary directory; returns the program's path. */
function buildReference(dir: string): string {
  const cc = process.env.CC || 'cc';
  const src = join(packageRoot, 'bench', 'ref', 'ref.c');
  const out = join(dir, 'ref');
  try {
    execFileSync(cc, ['-O2', '-pthread', '-o', out, src], { stdio: ['ignore', 'ignore', 'pipe'] });
  } catch (e) {
    const err = e as NodeJS.ErrnoException & { stderr?: Buffer };
    if (err.code === 'ENOENT')
      throw new Error(
        `no C compiler: \`${cc}\` was not found (install gcc, or set CC) — it is needed to build the C reference ${src}`,
      );
    throw new Error(
      `building the C reference failed: ${cc} -O2 -pthread -o ${out} ${src}\n${err.stderr?.toString() ?? err.message}`,
    );
  }
  return out;
}

function runReference(
  ref: string,
  bench: 'exit_roundtrip' | 'vm_lifecycle' | 'vm_lifecycle_threaded' | 'fault_in',
  n: number,
): number {
  const out = execFileSync(ref, [bench, String(n)], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
  const r = JSON.parse(out.trim()) as { ns_per_exit?: number; us_per_lifecycle?: number; us_per_page?: number };
  const v =
    bench === 'exit_roundtrip' ? r.ns_per_exit! / 1e3 : bench === 'fault_in' ? r.us_per_page! : r.us_per_lifecycle!;
  if (!Number.isFinite(v)) throw new Error(`the C reference printed no result: ${out}`);
  return v;
}

/** global.gc, or the same function obtained without --expose-gc on the command line. */
function findGc(): (() => void) | undefined {
  const g = (globalThis as { gc?: () => void }).gc;
  if (typeof g === 'function') return g;
  try {
    setFlagsFromString('--expose-gc');
    const f = runInNewContext('gc') as unknown;
    return typeof f === 'function' ? (f as () => void) : undefined;
  } catch {
    return undefined;
  }
}

const openFds = (): number => readdirSync('/proc/self/fd').length;
/** kvm_run mappings still in the address space (each one keeps its vCPU, and so its VM, alive). */
const vcpuMappings = (): number =>
  readFileSync('/proc/self/maps', 'utf8')
    .split('\n')
    .filter((l) => l.includes('anon_inode:kvm-vcpu')).length;
const settle = (): Promise<void> => new Promise((r) => setTimeout(r, 50));

async function kvmBenches(kvm: Kvm, o: Options): Promise<Entry[]> {
  const dir = mkdtempSync(join(tmpdir(), 'kvmharness-bench-'));
  try {
    progress('building the C reference');
    const ref = buildReference(dir);

    const cExit: number[] = [],
      hExit: number[] = [],
      hExitThread: number[] = [];
    const cLife: number[] = [],
      cLifeThreaded: number[] = [],
      hLife: number[] = [];
    for (let i = 0; i < o.rounds; i++) {
      progress(`exit_roundtrip round ${i + 1}/${o.rounds} (${o.exits} exits, C then harness)`);
      cExit.push(runReference(ref, 'exit_roundtrip', o.exits));
      const h = await exitRoundtrip(kvm, o.exits);
      hExit.push(h.usPerExit);
      hExitThread.push(h.threadUsPerExit);
    }
    for (let i = 0; i < o.rounds; i++) {
      progress(`vm_lifecycle round ${i + 1}/${o.rounds} (${o.lifecycles} lifecycles, C, threaded C, harness)`);
      cLife.push(runReference(ref, 'vm_lifecycle', o.lifecycles));
      cLifeThreaded.push(runReference(ref, 'vm_lifecycle_threaded', o.lifecycles));
      hLife.push(await vmLifecycle(kvm, o.lifecycles));
    }
    const cFault: number[] = [],
      hFault: number[] = [];
    for (let i = 0; i < o.rounds; i++) {
      progress(`fault_in round ${i + 1}/${o.rounds} (${o.pages} pages, C then harness)`);
      cFault.push(runReference(ref, 'fault_in', o.pages));
      hFault.push(await faultIn(kvm, o.pages));
    }
    progress(`fault_in µs/page: C ${spread(cFault, 3)}; harness ${spread(hFault, 3)}`);
    progress(
      `exit_roundtrip µs/exit: C ${spread(cExit)}; harness ${spread(hExit)}; harness vCPU thread loop ${spread(hExitThread)}`,
    );
    progress(
      `vm_lifecycle µs: C ${spread(cLife, 0)}; threaded C ${spread(cLifeThreaded, 0)}; harness ${spread(hLife, 0)}`,
    );

    const entries: Entry[] = [];
    // The ratio is the median of each round's harness/C ratio: a round's two
    // measurements run back to back, so slow drifts of a shared machine
    // cancel out, where a ratio of two medians would keep them.
    const withRef = (name: string, unit: string, h: number[], c: number[]): Entry => {
      const value = median(h),
        reference = median(c);
      const ratio = median(h.map((x, i) => x / c[i]!));
      return { name, unit, value: round(value, 3), reference: round(reference, 3), ratio: round(ratio, 3) };
    };
    entries.push(withRef('exit_roundtrip', 'us/exit', hExit, cExit));
    entries.push(withRef('vm_lifecycle', 'us', hLife, cLife));
    // Where the difference comes from: C with the harness's thread design
    // against plain C, and the harness against that threaded C.
    entries.push(withRef('vm_lifecycle_threaded_c', 'us', cLifeThreaded, cLife));
    entries.push(withRef('vm_lifecycle_vs_threaded_c', 'us', hLife, cLifeThreaded));
    entries.push(withRef('fault_in', 'us/page', hFault, cFault));

    // Leak check: many lifecycles in this process (the vCPU thread already exists).
    const gc = findGc();
    if (!gc) progress('no gc() available: RSS is read without a forced collection');
    await lifecycleOnce(kvm);
    await settle();
    gc?.();
    const fd0 = openFds(),
      rss0 = process.memoryUsage().rss,
      maps0 = vcpuMappings();
    const t0 = process.hrtime.bigint();
    for (let i = 0; i < o.leak; i++) {
      await lifecycleOnce(kvm);
      if ((i + 1) % 2000 === 0)
        progress(
          `leak check: ${i + 1}/${o.leak} lifecycles, ${openFds()} fds, RSS ${fmt(process.memoryUsage().rss / 2 ** 20, 1)} MiB`,
        );
    }
    const leakUs = Number(process.hrtime.bigint() - t0) / o.leak / 1e3;
    await settle();
    gc?.();
    gc?.();
    const fd1 = openFds(),
      rss1 = process.memoryUsage().rss,
      maps1 = vcpuMappings();
    progress(
      `leak check: ${o.leak} lifecycles at ${fmt(leakUs, 0)} µs each; fds ${fd0} -> ${fd1}; kvm-vcpu mappings ${maps0} -> ${maps1}; RSS ${fmt(rss0 / 2 ** 20, 1)} -> ${fmt(rss1 / 2 ** 20, 1)} MiB${gc ? ' (after gc)' : ''}`,
    );
    entries.push({ name: 'vm_lifecycle_fd_growth', unit: 'count', value: fd1 - fd0 });
    entries.push({ name: 'vm_lifecycle_rss_growth_mb', unit: 'MB', value: round((rss1 - rss0) / 2 ** 20, 2) });
    return entries;
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

const round = (x: number, digits: number): number => Number(x.toFixed(digits));

const LAB_ENTRIES: [string, string][] = [
  ['lab_boot_s', 's'],
  ['lab_check_ms', 'ms'],
  ['fuzz_steps_per_s_lab', 'steps/s'],
  ['lab_kvm_source_verdict_s', 's'],
];

const KVM_ENTRIES: [string, string][] = [
  ['exit_roundtrip', 'us/exit'],
  ['vm_lifecycle', 'us'],
  ['vm_lifecycle_threaded_c', 'us'],
  ['vm_lifecycle_vs_threaded_c', 'us'],
  ['fault_in', 'us/page'],
  ['vm_lifecycle_fd_growth', 'count'],
  ['vm_lifecycle_rss_growth_mb', 'MB'],
];

function table(entries: Entry[]): string {
  const rows = [['bench', 'value', 'unit', 'C reference', 'ratio', 'target', 'met']];
  for (const e of entries) {
    const t = TARGETS[e.name];
    const value =
      e.value === null
        ? e.note?.startsWith('failed')
          ? e.note
          : `not available here: ${e.note ?? 'unknown reason'}`
        : e.value >= 1e5
          ? Math.round(e.value).toLocaleString('en-US')
          : String(e.value);
    rows.push([
      e.name,
      value,
      e.value === null ? '' : e.unit,
      e.reference === undefined ? '' : String(e.reference),
      e.ratio === undefined ? '' : fmt(e.ratio, 3),
      t?.text ?? '',
      e.value === null || !t ? '-' : t.met(e) ? 'yes' : 'NO',
    ]);
  }
  const widths = rows[0]!.map((_, j) =>
    Math.max(...rows.filter((r) => j === 0 || r[2] !== '' || r === rows[0]).map((r) => r[j]!.length)),
  );
  return rows
    .map((r) =>
      r !== rows[0] && r[2] === ''
        ? `${r[0]!.padEnd(widths[0]!)}  ${r[1]}`
        : r
            .map((c, j) => c.padEnd(widths[j]!))
            .join('  ')
            .trimEnd(),
    )
    .join('\n');
}

async function kvmMutants(o: Options): Promise<number> {
  const { entries, rows } = await benchKvmMutants({ log: progress, fuzzCases: o.fuzzCases, only: o.mutants });
  if (o.json) process.stdout.write(`${JSON.stringify(entries)}\n`);
  else process.stdout.write(`${table(entries)}\n\n${mutantTable(rows)}\n`);
  return 0;
}

async function main(): Promise<number> {
  const o = parseArgs(process.argv.slice(2));
  if (o.kvmMutants) return kvmMutants(o);
  const entries: Entry[] = [];
  let failed = false;

  let kvm: Kvm | undefined;
  let unavailable: string | undefined;
  try {
    kvm = Kvm.open(localTarget);
  } catch (e) {
    unavailable = (e as Error).message;
  }
  if (kvm) {
    try {
      entries.push(...(await kvmBenches(kvm, o)));
      progress('access matrix');
      try {
        entries.push(...(await benchMatrix({ full: o.matrixFull })));
      } catch (e) {
        failed = true;
        entries.push({
          name: 'matrix_cases_per_s',
          unit: 'cases/s',
          value: null,
          note: `failed: ${(e as Error).message.split('\n')[0]}`,
        });
      }
    } catch (e) {
      failed = true;
      progress(`KVM benches failed: ${(e as Error).message}`);
      for (const [name, unit] of KVM_ENTRIES)
        entries.push({ name, unit, value: null, note: `failed: ${(e as Error).message.split('\n')[0]}` });
    } finally {
      kvm.close();
    }
    progress('fuzz (30 s)');
    try {
      entries.push(await benchFuzz('fuzz_steps_per_s', 30));
    } catch (e) {
      failed = true;
      entries.push({ name: 'fuzz_steps_per_s', unit: 'steps/s', value: null, note: `failed: ${(e as Error).message}` });
    }
  } else {
    progress(`KVM benches: not available here: ${unavailable}`);
    for (const [name, unit] of KVM_ENTRIES) entries.push({ name, unit, value: null, note: unavailable });
    entries.push({ name: 'matrix_cases_per_s', unit: 'cases/s', value: null, note: unavailable });
    entries.push({ name: 'fuzz_steps_per_s', unit: 'steps/s', value: null, note: unavailable });
  }

  if (!o.lab) {
    for (const [name, unit] of LAB_ENTRIES) entries.push({ name, unit, value: null, note: 'not run (--no-lab)' });
  } else if (unavailable) {
    for (const [name, unit] of LAB_ENTRIES)
      entries.push({
        name,
        unit,
        value: null,
        note: `not available here: the local reference needs KVM: ${unavailable}`,
      });
  } else {
    progress('lab (npt-tdp)');
    try {
      entries.push(...(await benchLab({ boots: o.labBoots, runs: 9, log: progress })));
    } catch (e) {
      progress(`lab benches: ${(e as Error).message.split('\n')[0]}`);
      for (const [name, unit] of LAB_ENTRIES.slice(0, 2))
        entries.push({ name, unit, value: null, note: `not available here: ${(e as Error).message.split('\n')[0]}` });
    }
    progress('lab: fuzz (60 s, npt-tdp)');
    try {
      entries.push(await benchFuzz('fuzz_steps_per_s_lab', 60, 'npt-tdp'));
    } catch (e) {
      entries.push({
        name: 'fuzz_steps_per_s_lab',
        unit: 'steps/s',
        value: null,
        note: `not available here: ${(e as Error).message.split('\n')[0]}`,
      });
    }
    if (!o.kvmSource) {
      entries.push({ name: 'lab_kvm_source_verdict_s', unit: 's', value: null, note: 'not run (--no-kvm-source)' });
    } else {
      progress('lab: KVM from a source tree (6.1, npt-tdp)');
      try {
        entries.push(await benchKvmSource({ log: progress }));
      } catch (e) {
        progress(`lab_kvm_source_verdict_s: ${(e as Error).message.split('\n')[0]}`);
        entries.push({
          name: 'lab_kvm_source_verdict_s',
          unit: 's',
          value: null,
          note: `not available here: ${(e as Error).message.split('\n')[0]}`,
        });
      }
    }
  }

  for (const [name, unit, bench] of [
    ['model_walks_per_s', 'walks/s', benchModelWalks],
    ['tdp_iter_1m_gfn_ms', 'ms', benchTdpIter],
  ] as const) {
    progress(name);
    try {
      entries.push(bench());
    } catch (e) {
      failed = true;
      progress(`${name} failed: ${(e as Error).stack ?? String(e)}`);
      entries.push({ name, unit, value: null, note: `failed: ${(e as Error).message}` });
    }
  }

  if (o.json) process.stdout.write(`${JSON.stringify(entries)}\n`);
  else process.stdout.write(`${table(entries)}\n`);
  return failed ? 1 : 0;
}

main().then(
  (code) => process.exit(code),
  (e: unknown) => {
    process.stderr.write(`bench: ${(e as Error)?.stack ?? String(e)}\n`);
    process.exit(1);
  },
);

// `kvmharness walk SCENARIO --gva ADDR`: the model's page walk for one access
// in a scenario's tables as they are before the first step, without a guest.
// The tables are built by bring-up and buildScenarioTables() in a MemImage, the
// same code the engine runs on real guest memory.
import { Command, CommanderError } from 'commander';
import { bringUp } from '../arch/x86/bringup.js';
import { describePte, LEVEL_NAMES } from '../arch/x86/pte.js';
import { decodeErrorCode, walk, type AccessKind, type PagingConfig, type WalkResult } from '../model/walk.js';
import { probe } from '../probe/probe.js';
import { bringUpOptions, buildScenarioTables, MemImage, pagingConfigFor } from '../scenario/build.js';
import { loadScenario, resolveScenario } from '../scenario/load.js';
import type { Scenario } from '../scenario/types.js';

/** A bad argument: the CLI prints it as one line and exits 2. */
export class WalkUsageError extends Error {}

export interface WalkOptions {
  gva: string;
  access: string;
  cpl: string;
  ac?: boolean;
  vendor?: string;
  maxphyaddr?: string;
  /** false with --no-probe. */
  probe: boolean;
  device?: string;
  json?: boolean;
}

/** CPU features the model uses, and where they came from. */
interface CpuChoice {
  from: 'probe' | 'defaults';
  /** Why, e.g. "probe of /dev/kvm", "--no-probe", "no KVM: ...". */
  why: string;
  vendor: string;
  maxPhyAddr: number;
  pdpe1gb: boolean;
}

const hex = (v: bigint | number) => `0x${v.toString(16)}`;
const pad16 = (v: bigint) => `0x${v.toString(16).padStart(16, '0')}`;
const PAGE_NAMES: Record<string, string> = { '4096': '4K', '2097152': '2M', '1073741824': '1G' };

const DEFAULT_CPU = { vendor: 'amd', maxPhyAddr: 48, pdpe1gb: true } as const;

function parseAddress(s: string): bigint {
  const ok = /^0[xX][0-9a-fA-F]{1,16}$/.test(s) || (/^[0-9]+$/.test(s) && BigInt(s) < 1n << 64n);
  if (!ok) throw new WalkUsageError(`--gva: expected a 64-bit address like 0x1000 (or decimal), got '${s}'`);
  return BigInt(s);
}

function parseArgs(o: WalkOptions): { gva: bigint; kind: AccessKind; cpl: 0 | 3; ac: boolean } {
  const gva = parseAddress(o.gva);
  if (o.access !== 'read' && o.access !== 'write' && o.access !== 'exec') throw new WalkUsageError(`--access: expected read, write or exec, got '${o.access}'`);
  if (o.cpl !== '0' && o.cpl !== '3') throw new WalkUsageError(`--cpl: expected 0 or 3, got '${o.cpl}'`);
  if (o.vendor !== undefined && o.vendor !== 'intel' && o.vendor !== 'amd') throw new WalkUsageError(`--vendor: expected intel or amd, got '${o.vendor}'`);
  if (o.maxphyaddr !== undefined && !(/^[0-9]+$/.test(o.maxphyaddr) && Number(o.maxphyaddr) >= 32 && Number(o.maxphyaddr) <= 52)) {
    throw new WalkUsageError(`--maxphyaddr: expected a number of bits from 32 to 52, got '${o.maxphyaddr}'`);
  }
  const cpl = o.cpl === '3' ? 3 : 0;
  if (o.ac && cpl === 3) throw new WalkUsageError('--ac: EFLAGS.AC overrides SMAP only for CPL 0 accesses');
  return { gva, kind: o.access, cpl, ac: o.ac === true };
}

/** The CPU the model assumes: this host's KVM CPUID when it can be read, else defaults; --vendor/--maxphyaddr override either. */
function chooseCpu(o: Pick<WalkOptions, 'probe' | 'device' | 'vendor' | 'maxphyaddr'>): CpuChoice {
  let cpu: CpuChoice = { from: 'defaults', why: '--no-probe', ...DEFAULT_CPU };
  if (o.probe) {
    try {
      const p = probe(o.device);
      if (p.cpu) cpu = { from: 'probe', why: `probe of ${p.device}`, vendor: p.cpu.vendor, maxPhyAddr: p.cpu.maxPhyAddr, pdpe1gb: p.cpu.pdpe1gb };
      else cpu = { ...cpu, why: `${p.device} offers no x86 CPUID` };
    } catch (e) {
      cpu = { ...cpu, why: `no KVM: ${(e as Error).message.split('\n')[0]}` };
    }
  }
  if (o.vendor !== undefined) cpu = { ...cpu, vendor: o.vendor, why: `${cpu.why}, --vendor ${o.vendor}` };
  if (o.maxphyaddr !== undefined) cpu = { ...cpu, maxPhyAddr: Number(o.maxphyaddr), why: `${cpu.why}, --maxphyaddr ${o.maxphyaddr}` };
  return cpu;
}

interface WalkRun {
  scenario: Scenario;
  cpu: CpuChoice;
  cfg: PagingConfig;
  cr3: bigint;
  access: { gva: bigint; kind: AccessKind; cpl: 0 | 3; ac: boolean };
  result: WalkResult;
}

function runWalk(file: string, o: WalkOptions): WalkRun {
  const access = parseArgs(o);
  const scenario = loadScenario(resolveScenario(file));
  const mem = new MemImage();
  const boot = bringUp(mem, bringUpOptions(scenario));
  buildScenarioTables(scenario, mem, boot);
  const cpu = chooseCpu(o);
  const cfg = pagingConfigFor(scenario, cpu);
  const cr3 = boot.tables.root;
  const result = walk(cfg, cr3, { gva: access.gva, kind: access.kind, cpl: access.cpl, eflagsAc: access.ac }, (gpa) => mem.read64(gpa));
  return { scenario, cpu, cfg, cr3, access, result };
}

const bit = (b: boolean) => (b ? '1' : '0');

function adDelta(oldV: bigint, newV: bigint): string {
  const added = newV & ~oldV;
  return [added & 0x20n ? '+A' : '', added & 0x40n ? '+D' : ''].filter(Boolean).join(' ');
}

/** The walk as text: a table of the entries read, the result, the A/D writes. */
function formatWalk(r: WalkRun): string {
  const { cfg, result: w } = r;
  const lines: string[] = [];
  const kv = (k: string, v: string) => lines.push(`${k.padEnd(10)}${v}`);
  kv('scenario', `${r.scenario.name} (${r.scenario.source})`);
  kv('cpu', `${r.cpu.from === 'probe' ? r.cpu.why : `defaults (${r.cpu.why})`}: vendor ${r.cpu.vendor}, maxphyaddr ${r.cpu.maxPhyAddr}, pdpe1gb ${bit(r.cpu.pdpe1gb)}`);
  kv('paging', `${cfg.levels}-level, CR3 ${hex(r.cr3)}, CR0.WP=${bit(cfg.cr0Wp)}, CR4.SMEP=${bit(cfg.cr4Smep)} SMAP=${bit(cfg.cr4Smap)} PKE=${bit(cfg.cr4Pke)}, EFER.NXE=${bit(cfg.efer.nxe)}, PKRU ${hex(cfg.pkru)}, ${cfg.vendor} rules`);
  kv('access', `${r.access.kind} ${hex(r.access.gva)} at CPL ${r.access.cpl}${r.access.ac ? ' with EFLAGS.AC=1' : ''}`);
  lines.push('');
  if (w.levels.length > 0) {
    const atWidth = Math.max(8, ...w.levels.map((l) => hex(l.pteGpa).length));
    lines.push(`level  ${'entry at'.padEnd(atWidth)}  ${'value'.padEnd(18)}  flags`);
    for (const l of w.levels) {
      lines.push(`${LEVEL_NAMES[l.level]!.padEnd(5)}  ${hex(l.pteGpa).padEnd(atWidth)}  ${pad16(l.pte)}  ${describePte(l.pte, l.level)}${l.leaf ? '  (leaf)' : ''}`);
    }
    lines.push('');
  }
  if (w.ok) {
    kv('result', `gpa ${hex(w.gpa)} (${PAGE_NAMES[w.pageSize.toString()]} page)`);
    kv('rights', `W=${bit(w.effective.w)} U=${bit(w.effective.u)} X=${bit(w.effective.x)}`);
  } else if (w.reason === 'non-canonical') {
    kv('result', `#GP: ${hex(w.cr2)} is not canonical with ${cfg.levels}-level paging (no page walk)`);
  } else {
    kv('result', `#PF error code ${hex(w.errorCode)} (${decodeErrorCode(w.errorCode)}), CR2 ${hex(w.cr2)}: ${w.reason}`);
  }
  if (w.adWrites.length === 0) kv('A/D', w.ok ? 'none (already set)' : 'none (a faulting walk sets no A or D bit)');
  w.adWrites.forEach((a, i) => kv(i === 0 ? 'A/D' : '', `${LEVEL_NAMES[a.level]!.padEnd(5)} ${hex(a.pteGpa)}: ${hex(a.old)} -> ${hex(a.new)} (${adDelta(a.old, a.new)})`));
  return lines.join('\n');
}

/** The walk as JSON (bigints as "0x..." strings). */
function walkJson(r: WalkRun): unknown {
  const { cfg, result: w } = r;
  return {
    scenario: { name: r.scenario.name, source: r.scenario.source },
    cpu: { from: r.cpu.from, why: r.cpu.why, vendor: r.cpu.vendor, maxPhyAddr: r.cpu.maxPhyAddr, pdpe1gb: r.cpu.pdpe1gb },
    paging: {
      levels: cfg.levels,
      cr3: hex(r.cr3),
      cr0Wp: cfg.cr0Wp,
      cr4Smep: cfg.cr4Smep,
      cr4Smap: cfg.cr4Smap,
      cr4Pke: cfg.cr4Pke,
      eferNxe: cfg.efer.nxe,
      pkru: hex(cfg.pkru),
      vendor: cfg.vendor,
    },
    access: { gva: hex(r.access.gva), kind: r.access.kind, cpl: r.access.cpl, eflagsAc: r.access.ac },
    levels: w.levels.map((l) => ({ level: l.level, name: LEVEL_NAMES[l.level], pteGpa: hex(l.pteGpa), pte: hex(l.pte), flags: describePte(l.pte, l.level), leaf: l.leaf })),
    result: w.ok
      ? { ok: true, gpa: hex(w.gpa), pageSize: hex(w.pageSize), effective: w.effective }
      : w.reason === 'non-canonical'
        ? { ok: false, exception: '#GP', reason: w.reason, address: hex(w.cr2) }
        : { ok: false, exception: '#PF', errorCode: hex(w.errorCode), decoded: decodeErrorCode(w.errorCode), cr2: hex(w.cr2), reason: w.reason },
    adWrites: w.adWrites.map((a) => ({ level: a.level, name: LEVEL_NAMES[a.level], pteGpa: hex(a.pteGpa), old: hex(a.old), new: hex(a.new) })),
  };
}

/** Adds the `walk` command to a program; output goes to `out` (default: stdout). */
export function registerWalk(program: Command, out: (s: string) => void = (s) => void process.stdout.write(s)): Command {
  return program
    .command('walk')
    .description("print the model's page walk for one access in a scenario's tables, without running a guest")
    .argument('<scenario>', 'scenario file, or the name of a built-in scenario')
    .requiredOption('--gva <addr>', 'guest-virtual address (0x... or decimal)')
    .option('--access <kind>', 'read, write or exec', 'read')
    .option('--cpl <n>', 'privilege level of the access, 0 or 3', '0')
    .option('--ac', 'EFLAGS.AC = 1 (the SMAP override of a CPL 0 access)')
    .option('--vendor <name>', 'CPU vendor for the model, intel or amd (default: the probe\'s, else amd)')
    .option('--maxphyaddr <bits>', 'MAXPHYADDR for the model (default: the probe\'s, else 48)')
    .option('--no-probe', 'do not read CPU features from KVM; use the defaults')
    .option('--device <path>', 'KVM device to probe (default: $KVMHARNESS_DEVICE or /dev/kvm)')
    .option('--json', 'print JSON')
    .action((file: string, o: WalkOptions) => {
      const r = runWalk(file, o);
      out(`${o.json ? JSON.stringify(walkJson(r), null, 2) : formatWalk(r)}\n`);
    });
}

/** Runs `kvmharness walk ARGS...` in-process: what it printed and the exit status the CLI would give. */
export function walkCommand(args: string[]): { stdout: string; stderr: string; exitCode: number } {
  let stdout = '';
  let stderr = '';
  const p = new Command('kvmharness')
    .exitOverride()
    .configureOutput({ writeOut: (s) => void (stdout += s), writeErr: (s) => void (stderr += s) });
  registerWalk(p, (s) => void (stdout += s));
  try {
    p.parse(['walk', ...args], { from: 'user' });
    return { stdout, stderr, exitCode: 0 };
  } catch (e) {
    if (e instanceof CommanderError) return { stdout, stderr, exitCode: e.exitCode === 0 ? 0 : 2 };
    return { stdout, stderr: `${stderr}kvmharness: ${(e as Error).message}\n`, exitCode: 2 };
  }
}

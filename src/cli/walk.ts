// `kvmharness walk SCENARIO --gva ADDR`: the model's page walk for one access
// in a scenario's tables as they are before the first step, without a guest.
// The tables are built by bring-up and buildScenarioTables() in a MemImage, the
// same code the engine runs on real guest memory.
//
// With --nested it prints both dimensions (model/nested.ts): every TDP and
// guest-table reference of the access, over a TDP model of the scenario's
// memslots that is empty, as at VM start. The model VM (scenarioTdp):
//   - slot 0 is bring-up's [0, 4 MiB), anonymous memory with 4 KiB pages (the
//     engine's X86Guest), then the scenario's memslots, all in address space 0;
//   - backings: anon -> 4 KiB anonymous, shared and memfd -> 4 KiB page cache,
//     thp -> THP (2 MiB), hugetlb2m / hugetlb1g -> hugetlbfs 2 MiB / 1 GiB;
//   - each slot's HVA is congruent to its GPA modulo 1 GiB, the layout in
//     which every huge page the backing offers may be mapped (a real mmap may
//     be less aligned: then KVM maps smaller);
//   - host pages that bring-up and the table builder wrote are populated, as
//     the VMM's writes populated them; other memory is untouched (a read of
//     untouched anonymous memory finds the zero page).
// The walk faults every miss into that tree (faultIn: true), so a page faulted
// in by one reference hits on the next.
import { Command, CommanderError } from 'commander';
import { bringUp } from '../arch/x86/bringup.js';
import { LAYOUT } from '../arch/x86/layout.js';
import { gfnToHva, MemslotError, Memslots, type Memslot } from '../model/memslots.js';
import { nestedWalk } from '../model/nested.js';
import { ShadowMmu, type SpInfo } from '../model/shadow.js';
import { Tdp } from '../model/tdp.js';
import { declaredSlot } from '../model/vm.js';
import { walk, type AccessKind, type PagingConfig } from '../model/walk.js';
import { probe } from '../probe/probe.js';
import {
  formatNested,
  formatWalk,
  nestedJson,
  shadowJson,
  shadowLines,
  walkJson,
  type CpuChoice,
  type NestedRun,
  type WalkRun,
} from '../report/walk.js';
import { localTarget } from '../target/local.js';
import { bringUpOptions, buildScenarioTables, MemImage, pagingConfigFor } from '../scenario/build.js';
import { loadScenario, resolveScenario } from '../scenario/load.js';
import type { MemslotDecl, Scenario } from '../scenario/types.js';

/** A bad argument: the CLI prints it as one line and exits 2. */
export class WalkUsageError extends Error {}

export interface WalkOptions {
  gva: string;
  access: string;
  cpl: string;
  ac?: boolean;
  vendor?: string;
  maxphyaddr?: string;
  /** '0' or '1': whether 1 GiB pages exist (CPUID PDPE1GB), over the probe's or the default. */
  pdpe1gb?: string;
  /** false with --no-probe. */
  probe: boolean;
  device?: string;
  json?: boolean;
  nested?: boolean;
  /** 4 or 5 (default 4); only with --nested. */
  tdpLevels?: string;
  /** Also the shadow pages the shadow MMU model uses for the access. */
  shadow?: boolean;
}

const DEFAULT_CPU = { vendor: 'amd', maxPhyAddr: 48, pdpe1gb: true } as const;

function parseAddress(s: string): bigint {
  const ok = /^0[xX][0-9a-fA-F]{1,16}$/.test(s) || (/^[0-9]+$/.test(s) && BigInt(s) < 1n << 64n);
  if (!ok) throw new WalkUsageError(`--gva: expected a 64-bit address like 0x1000 (or decimal), got '${s}'`);
  return BigInt(s);
}

function parseArgs(o: WalkOptions): { gva: bigint; kind: AccessKind; cpl: 0 | 3; ac: boolean } {
  const gva = parseAddress(o.gva);
  if (o.tdpLevels !== undefined && !o.nested) throw new WalkUsageError('--tdp-levels: only with --nested');
  if (o.tdpLevels !== undefined && o.tdpLevels !== '4' && o.tdpLevels !== '5')
    throw new WalkUsageError(`--tdp-levels: expected 4 or 5, got '${o.tdpLevels}'`);
  if (o.access !== 'read' && o.access !== 'write' && o.access !== 'exec')
    throw new WalkUsageError(`--access: expected read, write or exec, got '${o.access}'`);
  if (o.cpl !== '0' && o.cpl !== '3') throw new WalkUsageError(`--cpl: expected 0 or 3, got '${o.cpl}'`);
  if (o.vendor !== undefined && o.vendor !== 'intel' && o.vendor !== 'amd')
    throw new WalkUsageError(`--vendor: expected intel or amd, got '${o.vendor}'`);
  if (
    o.maxphyaddr !== undefined &&
    !(/^[0-9]+$/.test(o.maxphyaddr) && Number(o.maxphyaddr) >= 32 && Number(o.maxphyaddr) <= 52)
  ) {
    throw new WalkUsageError(`--maxphyaddr: expected a number of bits from 32 to 52, got '${o.maxphyaddr}'`);
  }
  if (o.pdpe1gb !== undefined && o.pdpe1gb !== '0' && o.pdpe1gb !== '1') {
    throw new WalkUsageError(`--pdpe1gb: expected 0 or 1, got '${o.pdpe1gb}'`);
  }
  const cpl = o.cpl === '3' ? 3 : 0;
  if (o.ac && cpl === 3) throw new WalkUsageError('--ac: EFLAGS.AC overrides SMAP only for CPL 0 accesses');
  return { gva, kind: o.access, cpl, ac: o.ac === true };
}

/**
 * The CPU the model assumes: this host's KVM CPUID when it can be read, else
 * defaults; --vendor/--maxphyaddr/--pdpe1gb override either.
 */
function chooseCpu(o: Pick<WalkOptions, 'probe' | 'device' | 'vendor' | 'maxphyaddr' | 'pdpe1gb'>): CpuChoice {
  let cpu: CpuChoice = { from: 'defaults', why: '--no-probe', ...DEFAULT_CPU };
  if (o.probe) {
    try {
      const p = probe(localTarget, o.device);
      if (p.cpu)
        cpu = {
          from: 'probe',
          why: `probe of ${p.device}`,
          vendor: p.cpu.vendor,
          maxPhyAddr: p.cpu.maxPhyAddr,
          pdpe1gb: p.cpu.pdpe1gb,
        };
      else cpu = { ...cpu, why: `${p.device} offers no x86 CPUID` };
    } catch (e) {
      cpu = { ...cpu, why: `no KVM: ${(e as Error).message.split('\n')[0]}` };
    }
  }
  if (o.vendor !== undefined) cpu = { ...cpu, vendor: o.vendor, why: `${cpu.why}, --vendor ${o.vendor}` };
  if (o.maxphyaddr !== undefined)
    cpu = { ...cpu, maxPhyAddr: Number(o.maxphyaddr), why: `${cpu.why}, --maxphyaddr ${o.maxphyaddr}` };
  if (o.pdpe1gb !== undefined) cpu = { ...cpu, pdpe1gb: o.pdpe1gb === '1', why: `${cpu.why}, --pdpe1gb ${o.pdpe1gb}` };
  return cpu;
}

/** A MemImage that remembers which 4 KiB guest frames were written. */
class TouchedImage extends MemImage {
  readonly touched = new Set<number>();

  override write64(gpa: bigint, v: bigint): void {
    this.touch(gpa, 8);
    super.write64(gpa, v);
  }

  override write(gpa: bigint, bytes: ArrayLike<number>): void {
    this.touch(gpa, bytes.length);
    super.write(gpa, bytes);
  }

  private touch(gpa: bigint, n: number): void {
    if (n === 0) return;
    for (let gfn = Number(gpa >> 12n); gfn <= Number((gpa + BigInt(n - 1)) >> 12n); gfn++) this.touched.add(gfn);
  }
}

function runWalk(file: string, o: WalkOptions): WalkRun | NestedRun {
  const access = parseArgs(o);
  const scenario = loadScenario(resolveScenario(file));
  const mem = new TouchedImage();
  const boot = bringUp(mem, bringUpOptions(scenario));
  buildScenarioTables(scenario, mem, boot);
  const cpu = chooseCpu(o);
  const cfg = pagingConfigFor(scenario, cpu);
  const cr3 = boot.tables.root;
  const guestAccess = { gva: access.gva, kind: access.kind, cpl: access.cpl, eflagsAc: access.ac };
  const read = (gpa: bigint) => mem.read64(gpa);
  if (!o.nested) {
    const result = walk(cfg, cr3, guestAccess, read);
    return {
      scenario,
      cpu,
      cfg,
      cr3,
      access,
      result,
      ...(o.shadow ? { shadow: shadowPath(mem, cfg, cr3, access) } : {}),
    };
  }
  const tdp = scenarioTdp(scenario, o.tdpLevels === '5' ? 5 : 4, mem.touched);
  const nested = nestedWalk(cfg, cr3, guestAccess, read, tdp.tdp, 0, { faultIn: true });
  return { scenario, cpu, cfg, cr3, access, result: nested.guest, tdp, nested };
}

/**
 * The shadow pages a native shadow-MMU host uses for the access, from an
 * empty shadow MMU (model/shadow.ts): the root at entry, then the access
 * faults in a page per guest table. The model writes to its own overlay.
 */
function shadowPath(mem: MemImage, cfg: PagingConfig, cr3: bigint, a: WalkRun['access']): SpInfo[] {
  const overlay = new Map<bigint, bigint>();
  const view = {
    read64: (g: bigint) => overlay.get(g) ?? mem.read64(g),
    write64: (g: bigint, v: bigint) => void overlay.set(g, v),
  };
  const mmu = new ShadowMmu({ levels: cfg.levels, exec: 'native', cr0Wp: cfg.cr0Wp }, view, cr3);
  mmu.enter();
  mmu.access(a.gva, a.kind);
  return mmu.path(a.gva);
}

/** The TDP model of a scenario's VM, and the memslots it was given. */
export interface ScenarioTdp {
  tdp: Tdp;
  levels: 4 | 5;
  /** Slot 0 (bring-up's) first, then the scenario's, with the backing declared. */
  slots: { slot: Memslot; declared: MemslotDecl['backing'] }[];
}

const G1 = 1n << 30n;

/**
 * A TDP model (x86, `levels`-level) with a scenario's memslots and nothing
 * mapped, as at VM start; the host pages of the frames in `written` are
 * populated by a write, as the VMM's writes populated them. See the header
 * for the layout.
 */
export function scenarioTdp(s: Scenario, levels: 4 | 5, written: Iterable<number>): ScenarioTdp {
  const decls: MemslotDecl[] = [
    {
      slot: 0,
      gpa: 0n,
      size: LAYOUT.identityEnd,
      backing: 'anon',
      logDirty: false,
      readonly: false,
      created: 'at-start',
    },
    ...s.memslots,
  ];
  // x86 guest-physical addresses: 48 bits with 4-level TDP, 52 (MAXPHYADDR's limit) with 5-level.
  const slots = new Memslots({ maxGfn: levels === 5 ? 2 ** 40 : 2 ** 36 });
  const tdp = new Tdp(slots, { arch: 'x86_64', levels });
  const out: ScenarioTdp['slots'] = [];
  let next = G1;
  for (const d of decls) {
    // Congruent with the GPA modulo 1G, or as the slot's "hva" places it.
    const mod = d.hva?.modulo === '2M' ? 1n << 21n : G1;
    const hva = ((next + G1 - 1n) & ~(G1 - 1n)) + ((d.gpa + (d.hva?.offset ?? 0n)) & (mod - 1n));
    next = hva + d.size;
    let slot: Memslot;
    try {
      slot = declaredSlot(d, hva);
      tdp.setMemslot(slot);
    } catch (e) {
      if (!(e instanceof MemslotError)) throw e;
      throw new WalkUsageError(`--nested: memslot ${d.slot} does not fit a ${levels}-level TDP: ${e.problem}`);
    }
    out.push({ slot, declared: d.backing });
  }
  for (const gfn of written) {
    const slot = slots.find(0, gfn);
    if (slot) tdp.host.fault(slot, gfnToHva(slot, gfn), true);
  }
  return { tdp, levels, slots: out };
}

/** Adds the `walk` command to a program; output goes to `out` (default: stdout). */
export function registerWalk(
  program: Command,
  out: (s: string) => void = (s) => void process.stdout.write(s),
): Command {
  return program
    .command('walk')
    .description("print the model's page walk for one access in a scenario's tables, without running a guest")
    .argument('<scenario>', 'scenario file, or the name of a built-in scenario')
    .requiredOption('--gva <addr>', 'guest-virtual address (0x... or decimal)')
    .option('--access <kind>', 'read, write or exec', 'read')
    .option('--cpl <n>', 'privilege level of the access, 0 or 3', '0')
    .option('--ac', 'EFLAGS.AC = 1 (the SMAP override of a CPL 0 access)')
    .option('--vendor <name>', "CPU vendor for the model, intel or amd (default: the probe's, else amd)")
    .option('--maxphyaddr <bits>', "MAXPHYADDR for the model (default: the probe's, else 48)")
    .option('--pdpe1gb <0|1>', "whether 1 GiB pages exist for the model (CPUID PDPE1GB; default: the probe's, else 1)")
    .option('--no-probe', 'do not read CPU features from KVM; use the defaults')
    .option('--device <path>', 'KVM device to probe (default: $KVMHARNESS_DEVICE or /dev/kvm)')
    .option('--json', 'print JSON')
    .option(
      '--nested',
      'print both dimensions: every TDP and guest-table reference, over an empty TDP model of the memslots',
    )
    .option('--tdp-levels <n>', 'with --nested: TDP levels, 4 or 5 (default 4)')
    .option(
      '--shadow',
      'also the shadow pages a shadow-MMU host uses for the access (model/shadow.ts), and whether each is unsync',
    )
    .action((file: string, o: WalkOptions) => {
      const r = runWalk(file, o);
      const shadow = r.shadow && shadowJson(r.shadow);
      const text =
        'nested' in r
          ? o.json
            ? JSON.stringify(nestedJson(r), null, 2)
            : formatNested(r)
          : o.json
            ? JSON.stringify({ ...walkJson(r), ...(shadow ? { shadow } : {}) }, null, 2)
            : [formatWalk(r), ...(r.shadow ? shadowLines(r.shadow) : [])].join('\n');
      out(`${text}\n`);
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

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
import { describePte, LEVEL_NAMES } from '../arch/x86/pte.js';
import { gfnToHva, MemslotError, Memslots, type Backing, type Memslot } from '../model/memslots.js';
import { nestedWalk, type NestedFault, type NestedRef, type NestedWalk } from '../model/nested.js';
import { ShadowMmu, type SpInfo } from '../model/shadow.js';
import { PAGES } from '../model/spte.js';
import { Tdp } from '../model/tdp.js';
import { decodeErrorCode, walk, type AccessKind, type PagingConfig, type WalkResult } from '../model/walk.js';
import { probe } from '../probe/probe.js';
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
  if (o.tdpLevels !== undefined && !o.nested) throw new WalkUsageError('--tdp-levels: only with --nested');
  if (o.tdpLevels !== undefined && o.tdpLevels !== '4' && o.tdpLevels !== '5') throw new WalkUsageError(`--tdp-levels: expected 4 or 5, got '${o.tdpLevels}'`);
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
      const p = probe(localTarget, o.device);
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
  /** --shadow: the shadow pages on the access's path, root first, after it. */
  shadow?: SpInfo[];
}

interface NestedRun extends WalkRun {
  tdp: ScenarioTdp;
  nested: NestedWalk;
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
    return { scenario, cpu, cfg, cr3, access, result, ...(o.shadow ? { shadow: shadowPath(mem, cfg, cr3, access) } : {}) };
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
  const view = { read64: (g: bigint) => overlay.get(g) ?? mem.read64(g), write64: (g: bigint, v: bigint) => void overlay.set(g, v) };
  const mmu = new ShadowMmu({ levels: cfg.levels, exec: 'native', cr0Wp: cfg.cr0Wp }, view, cr3);
  mmu.enter();
  mmu.access(a.gva, a.kind);
  return mmu.path(a.gva);
}

function shadowLines(sps: SpInfo[]): string[] {
  if (!sps.length) return [kvLine('shadow', 'no shadow page (the guest walk faults)')];
  return sps.map((sp, i) => kvLine(i === 0 ? 'shadow' : '', `l${sp.level} gfn ${hex(sp.gfn)}${sp.direct ? ' direct' : ''} ${sp.unsync ? 'unsync' : 'sync'}${i === 0 ? ' (root)' : ''}`));
}

/** The TDP model of a scenario's VM, and the memslots it was given. */
export interface ScenarioTdp {
  tdp: Tdp;
  levels: 4 | 5;
  /** Slot 0 (bring-up's) first, then the scenario's, with the backing declared. */
  slots: { slot: Memslot; declared: MemslotDecl['backing'] }[];
}

const G1 = 1n << 30n;

/** The model's backing for a scenario backing. */
const BACKINGS: Record<MemslotDecl['backing'], Backing> = {
  anon: { kind: 'anon', pageSize: 4096 },
  shared: { kind: 'memfd', pageSize: 4096 },
  memfd: { kind: 'memfd', pageSize: 4096 },
  thp: { kind: 'thp', pageSize: 2 << 20 },
  hugetlb2m: { kind: 'hugetlb2m', pageSize: 2 << 20 },
  hugetlb1g: { kind: 'hugetlb1g', pageSize: 1 << 30 },
};

/**
 * A TDP model (x86, `levels`-level) with a scenario's memslots and nothing
 * mapped, as at VM start; the host pages of the frames in `written` are
 * populated by a write, as the VMM's writes populated them. See the header
 * for the layout.
 */
export function scenarioTdp(s: Scenario, levels: 4 | 5, written: Iterable<number>): ScenarioTdp {
  const decls: MemslotDecl[] = [
    { slot: 0, gpa: 0n, size: LAYOUT.identityEnd, backing: 'anon', logDirty: false, readonly: false },
    ...s.memslots,
  ];
  // x86 guest-physical addresses: 48 bits with 4-level TDP, 52 (MAXPHYADDR's limit) with 5-level.
  const slots = new Memslots({ maxGfn: levels === 5 ? 2 ** 40 : 2 ** 36 });
  const tdp = new Tdp(slots, { arch: 'x86', levels });
  const out: ScenarioTdp['slots'] = [];
  let next = G1;
  for (const d of decls) {
    const hva = ((next + G1 - 1n) & ~(G1 - 1n)) + (d.gpa & (G1 - 1n));
    next = hva + d.size;
    const slot: Memslot = {
      slot: d.slot,
      asId: 0,
      baseGfn: Number(d.gpa >> 12n),
      npages: Number(d.size >> 12n),
      hva,
      flags: { logDirty: d.logDirty, readonly: d.readonly },
      backing: BACKINGS[d.backing],
    };
    try {
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

const bit = (b: boolean) => (b ? '1' : '0');

function adDelta(oldV: bigint, newV: bigint): string {
  const added = newV & ~oldV;
  return [added & 0x20n ? '+A' : '', added & 0x40n ? '+D' : ''].filter(Boolean).join(' ');
}

const kvLine = (k: string, v: string) => `${k.padEnd(10)}${v}`;

/** scenario, cpu, paging and access lines. */
function headerLines(r: WalkRun): string[] {
  const { cfg } = r;
  return [
    kvLine('scenario', `${r.scenario.name} (${r.scenario.source})`),
    kvLine('cpu', `${r.cpu.from === 'probe' ? r.cpu.why : `defaults (${r.cpu.why})`}: vendor ${r.cpu.vendor}, maxphyaddr ${r.cpu.maxPhyAddr}, pdpe1gb ${bit(r.cpu.pdpe1gb)}`),
    kvLine('paging', `${cfg.levels}-level, CR3 ${hex(r.cr3)}, CR0.WP=${bit(cfg.cr0Wp)}, CR4.SMEP=${bit(cfg.cr4Smep)} SMAP=${bit(cfg.cr4Smap)} PKE=${bit(cfg.cr4Pke)}, EFER.NXE=${bit(cfg.efer.nxe)}, PKRU ${hex(cfg.pkru)}, ${cfg.vendor} rules`),
    kvLine('access', `${r.access.kind} ${hex(r.access.gva)} at CPL ${r.access.cpl}${r.access.ac ? ' with EFLAGS.AC=1' : ''}`),
  ];
}

/** The guest walk's outcome: GPA and rights, or the exception. */
function resultLines(r: WalkRun): string[] {
  const { cfg, result: w } = r;
  if (w.ok) {
    return [
      kvLine('result', `gpa ${hex(w.gpa)} (${PAGE_NAMES[w.pageSize.toString()]} page)`),
      kvLine('rights', `W=${bit(w.effective.w)} U=${bit(w.effective.u)} X=${bit(w.effective.x)}`),
    ];
  }
  if (w.reason === 'non-canonical') return [kvLine('result', `#GP: ${hex(w.cr2)} is not canonical with ${cfg.levels}-level paging (no page walk)`)];
  return [kvLine('result', `#PF error code ${hex(w.errorCode)} (${decodeErrorCode(w.errorCode)}), CR2 ${hex(w.cr2)}: ${w.reason}`)];
}

/** The walk as text: a table of the entries read, the result, the A/D writes. */
function formatWalk(r: WalkRun): string {
  const { result: w } = r;
  const lines = headerLines(r);
  lines.push('');
  if (w.levels.length > 0) {
    const atWidth = Math.max(8, ...w.levels.map((l) => hex(l.pteGpa).length));
    lines.push(`level  ${'entry at'.padEnd(atWidth)}  ${'value'.padEnd(18)}  flags`);
    for (const l of w.levels) {
      lines.push(`${LEVEL_NAMES[l.level]!.padEnd(5)}  ${hex(l.pteGpa).padEnd(atWidth)}  ${pad16(l.pte)}  ${describePte(l.pte, l.level)}${l.leaf ? '  (leaf)' : ''}`);
    }
    lines.push('');
  }
  lines.push(...resultLines(r));
  if (w.adWrites.length === 0) lines.push(kvLine('A/D', w.ok ? 'none (already set)' : 'none (a faulting walk sets no A or D bit)'));
  w.adWrites.forEach((a, i) => lines.push(kvLine(i === 0 ? 'A/D' : '', `${LEVEL_NAMES[a.level]!.padEnd(5)} ${hex(a.pteGpa)}: ${hex(a.old)} -> ${hex(a.new)} (${adDelta(a.old, a.new)})`)));
  return lines.join('\n');
}

/** Page size a TDP level maps: 4K, 2M, 1G. */
function levelPage(level: number): string {
  return PAGE_NAMES[String(PAGES[level]! * 4096)] ?? `level ${level}`;
}

/** What the TDP model did about a miss, in a few words. */
function describeFault(f: NestedFault): string {
  switch (f.kind) {
    case 'map':
      return `mapped ${levelPage(f.level)} (level ${f.level})`;
    case 'fast':
      return `W restored in place (fast path, level ${f.level})`;
    case 'relax':
      return `permissions relaxed (level ${f.level})`;
    case 'spurious':
      return `already mapped (level ${f.level})`;
    case 'mmio':
      return 'no memslot: MMIO exit';
    case 'emulate':
      return 'write to a read-only memslot: emulated';
    case 'efault':
      return 'no host page: EFAULT exit';
  }
}

/** What a reference reads, e.g. "TDP level 4", "guest PML4E", "data write". */
function refWhat(ref: NestedRef): string {
  if (ref.kind === 'tdp') return `TDP level ${ref.tdpLevel}`;
  if (ref.kind === 'guest-pte') return `guest ${LEVEL_NAMES[ref.guestLevel]}`;
  return `data ${ref.access}`;
}

function refValue(ref: NestedRef): string {
  if (ref.spte !== undefined) return pad16(BigInt(ref.spte));
  if (ref.pte !== undefined) return pad16(ref.pte);
  return '';
}

function refResult(ref: NestedRef): string {
  if (ref.fault) return `miss: ${describeFault(ref.fault)}`;
  if (!ref.hit) return 'miss';
  if (ref.adWrite) return `hit, ${adDelta(ref.adWrite.old, ref.adWrite.new)}`;
  return 'hit';
}

const END_TEXT: Record<NestedWalk['end'], string> = {
  data: 'the data access',
  'guest-fault': 'no data access (the guest walk faulted)',
  'tdp-exit': 'no data access (a TDP miss exits to the host)',
};

/** The nested walk as text: the TDP model, a table of every reference, the result, the totals. */
function formatNested(r: NestedRun): string {
  const { nested: n, tdp } = r;
  const lines = headerLines(r);
  lines.push(kvLine('tdp', `${tdp.levels}-level x86, empty at start, misses faulted in; guest table accesses are TDP writes`));
  tdp.slots.forEach(({ slot: s, declared }, i) => {
    const gpa = BigInt(s.baseGfn) << 12n;
    const size = BigInt(s.npages) << 12n;
    const flags = [s.flags.readonly ? ' readonly' : '', s.flags.logDirty ? ' logDirty' : ''].join('');
    lines.push(kvLine(i === 0 ? 'memslots' : '', `${s.slot} [${hex(gpa)}, ${hex(gpa + size)}) ${declared}${flags}, hva ${hex(s.hva)}`));
  });
  lines.push('');
  if (n.refs.length > 0) {
    const w = (f: (x: NestedRef) => string, title: string) => Math.max(title.length, ...n.refs.map((x) => f(x).length));
    const gpaW = w((x) => hex(x.gpa), 'gpa');
    const hostW = w((x) => (x.hostAddr === undefined ? '' : hex(x.hostAddr)), 'host');
    const whatW = w(refWhat, 'read');
    lines.push(`step  ${'read'.padEnd(whatW)}  ${'gpa'.padEnd(gpaW)}  ${'host'.padEnd(hostW)}  ${'value'.padEnd(18)}  result`);
    n.refs.forEach((x, i) => {
      const host = x.hostAddr === undefined ? '' : hex(x.hostAddr);
      lines.push(`${String(i + 1).padStart(4)}  ${refWhat(x).padEnd(whatW)}  ${hex(x.gpa).padEnd(gpaW)}  ${host.padEnd(hostW)}  ${refValue(x).padEnd(18)}  ${refResult(x)}`);
    });
    lines.push('');
  }
  lines.push(...resultLines(r));
  const data = n.refs.find((x) => x.kind === 'data');
  if (data?.hostAddr !== undefined) lines.push(kvLine('host', hex(data.hostAddr)));
  const t = n.totals;
  lines.push(kvLine('totals', `${t.references} references (${t.tdp} TDP, ${t.guestPte} guest PTE), then ${END_TEXT[n.end]}; ${t.tdpMisses} TDP miss${t.tdpMisses === 1 ? '' : 'es'}`));
  return lines.join('\n');
}

/** The walk as JSON (bigints as "0x..." strings). */
function walkJson(r: WalkRun): Record<string, unknown> {
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

/** One reference as JSON: only the fields its kind has. */
function refJson(x: NestedRef, i: number): unknown {
  return {
    step: i + 1,
    kind: x.kind,
    guestLevel: x.guestLevel,
    ...(x.tdpLevel !== undefined ? { tdpLevel: x.tdpLevel } : {}),
    gpa: hex(x.gpa),
    ...(x.hostAddr !== undefined ? { hostAddr: hex(x.hostAddr) } : {}),
    ...(x.spte !== undefined ? { spte: hex(x.spte) } : {}),
    ...(x.pte !== undefined ? { pte: hex(x.pte) } : {}),
    ...(x.access !== undefined ? { access: x.access } : {}),
    hit: x.hit,
    ...(x.fault ? { fault: { kind: x.fault.kind, level: x.fault.level, spte: hex(x.fault.spte), what: describeFault(x.fault) } } : {}),
    ...(x.adWrite ? { adWrite: { old: hex(x.adWrite.old), new: hex(x.adWrite.new) } } : {}),
  };
}

/** The nested walk as JSON: the guest walk's fields, the TDP model, every reference, the totals. */
function nestedJson(r: NestedRun): unknown {
  const { nested: n, tdp } = r;
  return {
    ...walkJson(r),
    tdp: {
      levels: tdp.levels,
      asId: 0,
      slots: tdp.slots.map(({ slot: s, declared }) => ({
        slot: s.slot,
        gpa: hex(BigInt(s.baseGfn) << 12n),
        size: hex(BigInt(s.npages) << 12n),
        backing: declared,
        hva: hex(s.hva),
        readonly: s.flags.readonly,
        logDirty: s.flags.logDirty,
      })),
    },
    refs: n.refs.map(refJson),
    end: n.end,
    totals: n.totals,
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
    .option('--nested', 'print both dimensions: every TDP and guest-table reference, over an empty TDP model of the memslots')
    .option('--tdp-levels <n>', 'with --nested: TDP levels, 4 or 5 (default 4)')
    .option('--shadow', 'also the shadow pages a shadow-MMU host uses for the access (model/shadow.ts), and whether each is unsync')
    .action((file: string, o: WalkOptions) => {
      const r = runWalk(file, o);
      const shadow = r.shadow?.map((sp) => ({ gfn: hex(sp.gfn), level: sp.level, direct: sp.direct, unsync: sp.unsync }));
      const text = 'nested' in r ? (o.json ? JSON.stringify(nestedJson(r), null, 2) : formatNested(r))
        : o.json ? JSON.stringify({ ...walkJson(r), ...(shadow ? { shadow } : {}) }, null, 2)
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

// `kvmharness walk`: a guest walk, and with --nested both dimensions of it,
// as text tables or JSON (bigints as "0x..." strings).
import { describePte, LEVEL_NAMES } from '../arch/x86/pte.js';
import type { Memslot } from '../model/memslots.js';
import type { NestedFault, NestedRef, NestedWalk } from '../model/nested.js';
import type { SpInfo } from '../model/shadow.js';
import { PAGES } from '../model/spte.js';
import { decodeErrorCode, type AccessKind, type PagingConfig, type WalkResult } from '../model/walk.js';
import type { Scenario } from '../scenario/types.js';
import { hex } from '../base/units.js';

const pad16 = (v: bigint) => `0x${v.toString(16).padStart(16, '0')}`;
const PAGE_NAMES: Record<string, string> = { '4096': '4K', '2097152': '2M', '1073741824': '1G' };

/** CPU features the model uses, and where they came from. */
export interface CpuChoice {
  from: 'probe' | 'defaults';
  /** Why, e.g. "probe of /dev/kvm", "--no-probe", "no KVM: ...". */
  why: string;
  vendor: string;
  maxPhyAddr: number;
  pdpe1gb: boolean;
}

/** One walk as `kvmharness walk` ran it. */
export interface WalkRun {
  scenario: Scenario;
  cpu: CpuChoice;
  cfg: PagingConfig;
  cr3: bigint;
  access: { gva: bigint; kind: AccessKind; cpl: 0 | 3; ac: boolean };
  result: WalkResult;
  /** --shadow: the shadow pages on the access's path, root first, after it. */
  shadow?: SpInfo[];
}

/** A walk with --nested: the TDP model it ran over, and every reference. */
export interface NestedRun extends WalkRun {
  tdp: WalkTdp;
  nested: NestedWalk;
}

/** The TDP model of a nested walk: its levels, and its memslots (bring-up's slot 0 first) with the backing declared. */
export interface WalkTdp {
  levels: 4 | 5;
  slots: readonly { slot: Memslot; declared: string }[];
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
    kvLine(
      'cpu',
      `${r.cpu.from === 'probe' ? r.cpu.why : `defaults (${r.cpu.why})`}: vendor ${r.cpu.vendor}, maxphyaddr ${r.cpu.maxPhyAddr}, pdpe1gb ${bit(r.cpu.pdpe1gb)}`,
    ),
    kvLine(
      'paging',
      `${cfg.levels}-level, CR3 ${hex(r.cr3)}, CR0.WP=${bit(cfg.cr0Wp)}, CR4.SMEP=${bit(cfg.cr4Smep)} SMAP=${bit(cfg.cr4Smap)} PKE=${bit(cfg.cr4Pke)}, EFER.NXE=${bit(cfg.efer.nxe)}, PKRU ${hex(cfg.pkru)}, ${cfg.vendor} rules`,
    ),
    kvLine(
      'access',
      `${r.access.kind} ${hex(r.access.gva)} at CPL ${r.access.cpl}${r.access.ac ? ' with EFLAGS.AC=1' : ''}`,
    ),
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
  if (w.reason === 'non-canonical')
    return [kvLine('result', `#GP: ${hex(w.cr2)} is not canonical with ${cfg.levels}-level paging (no page walk)`)];
  return [
    kvLine(
      'result',
      `#PF error code ${hex(w.errorCode)} (${decodeErrorCode(w.errorCode)}), CR2 ${hex(w.cr2)}: ${w.reason}`,
    ),
  ];
}

/** The walk as text: a table of the entries read, the result, the A/D writes. */
export function formatWalk(r: WalkRun): string {
  const { result: w } = r;
  const lines = headerLines(r);
  lines.push('');
  if (w.levels.length > 0) {
    const atWidth = Math.max(8, ...w.levels.map((l) => hex(l.pteGpa).length));
    lines.push(`level  ${'entry at'.padEnd(atWidth)}  ${'value'.padEnd(18)}  flags`);
    for (const l of w.levels) {
      lines.push(
        `${LEVEL_NAMES[l.level]!.padEnd(5)}  ${hex(l.pteGpa).padEnd(atWidth)}  ${pad16(l.pte)}  ${describePte(l.pte, l.level)}${l.leaf ? '  (leaf)' : ''}`,
      );
    }
    lines.push('');
  }
  lines.push(...resultLines(r));
  if (w.adWrites.length === 0)
    lines.push(kvLine('A/D', w.ok ? 'none (already set)' : 'none (a faulting walk sets no A or D bit)'));
  w.adWrites.forEach((a, i) =>
    lines.push(
      kvLine(
        i === 0 ? 'A/D' : '',
        `${LEVEL_NAMES[a.level]!.padEnd(5)} ${hex(a.pteGpa)}: ${hex(a.old)} -> ${hex(a.new)} (${adDelta(a.old, a.new)})`,
      ),
    ),
  );
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
export function formatNested(r: NestedRun): string {
  const { nested: n, tdp } = r;
  const lines = headerLines(r);
  lines.push(
    kvLine('tdp', `${tdp.levels}-level x86, empty at start, misses faulted in; guest table accesses are TDP writes`),
  );
  tdp.slots.forEach(({ slot: s, declared }, i) => {
    const gpa = BigInt(s.baseGfn) << 12n;
    const size = BigInt(s.npages) << 12n;
    const flags = [s.flags.readonly ? ' readonly' : '', s.flags.logDirty ? ' logDirty' : ''].join('');
    lines.push(
      kvLine(
        i === 0 ? 'memslots' : '',
        `${s.slot} [${hex(gpa)}, ${hex(gpa + size)}) ${declared}${flags}, hva ${hex(s.hva)}`,
      ),
    );
  });
  lines.push('');
  if (n.refs.length > 0) {
    const w = (f: (x: NestedRef) => string, title: string) => Math.max(title.length, ...n.refs.map((x) => f(x).length));
    const gpaW = w((x) => hex(x.gpa), 'gpa');
    const hostW = w((x) => (x.hostAddr === undefined ? '' : hex(x.hostAddr)), 'host');
    const whatW = w(refWhat, 'read');
    lines.push(
      `step  ${'read'.padEnd(whatW)}  ${'gpa'.padEnd(gpaW)}  ${'host'.padEnd(hostW)}  ${'value'.padEnd(18)}  result`,
    );
    n.refs.forEach((x, i) => {
      const host = x.hostAddr === undefined ? '' : hex(x.hostAddr);
      lines.push(
        `${String(i + 1).padStart(4)}  ${refWhat(x).padEnd(whatW)}  ${hex(x.gpa).padEnd(gpaW)}  ${host.padEnd(hostW)}  ${refValue(x).padEnd(18)}  ${refResult(x)}`,
      );
    });
    lines.push('');
  }
  lines.push(...resultLines(r));
  const data = n.refs.find((x) => x.kind === 'data');
  if (data?.hostAddr !== undefined) lines.push(kvLine('host', hex(data.hostAddr)));
  const t = n.totals;
  lines.push(
    kvLine(
      'totals',
      `${t.references} references (${t.tdp} TDP, ${t.guestPte} guest PTE), then ${END_TEXT[n.end]}; ${t.tdpMisses} TDP miss${t.tdpMisses === 1 ? '' : 'es'}`,
    ),
  );
  return lines.join('\n');
}

/** The walk as JSON (bigints as "0x..." strings). */
export function walkJson(r: WalkRun): Record<string, unknown> {
  const { cfg, result: w } = r;
  return {
    scenario: { name: r.scenario.name, source: r.scenario.source },
    cpu: {
      from: r.cpu.from,
      why: r.cpu.why,
      vendor: r.cpu.vendor,
      maxPhyAddr: r.cpu.maxPhyAddr,
      pdpe1gb: r.cpu.pdpe1gb,
    },
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
    levels: w.levels.map((l) => ({
      level: l.level,
      name: LEVEL_NAMES[l.level],
      pteGpa: hex(l.pteGpa),
      pte: hex(l.pte),
      flags: describePte(l.pte, l.level),
      leaf: l.leaf,
    })),
    result: w.ok
      ? { ok: true, gpa: hex(w.gpa), pageSize: hex(w.pageSize), effective: w.effective }
      : w.reason === 'non-canonical'
        ? { ok: false, exception: '#GP', reason: w.reason, address: hex(w.cr2) }
        : {
            ok: false,
            exception: '#PF',
            errorCode: hex(w.errorCode),
            decoded: decodeErrorCode(w.errorCode),
            cr2: hex(w.cr2),
            reason: w.reason,
          },
    adWrites: w.adWrites.map((a) => ({
      level: a.level,
      name: LEVEL_NAMES[a.level],
      pteGpa: hex(a.pteGpa),
      old: hex(a.old),
      new: hex(a.new),
    })),
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
    ...(x.fault
      ? { fault: { kind: x.fault.kind, level: x.fault.level, spte: hex(x.fault.spte), what: describeFault(x.fault) } }
      : {}),
    ...(x.adWrite ? { adWrite: { old: hex(x.adWrite.old), new: hex(x.adWrite.new) } } : {}),
  };
}

/** The nested walk as JSON: the guest walk's fields, the TDP model, every reference, the totals. */
export function nestedJson(r: NestedRun): unknown {
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

/** --shadow: the shadow page of each guest table on the walk, root first, and its sync state. */
export function shadowLines(sps: SpInfo[]): string[] {
  if (!sps.length) return [kvLine('shadow', 'no shadow page (the guest walk faults)')];
  return sps.map((sp, i) =>
    kvLine(
      i === 0 ? 'shadow' : '',
      `l${sp.level} gfn ${hex(sp.gfn)}${sp.direct ? ' direct' : ''} ${sp.unsync ? 'unsync' : 'sync'}${i === 0 ? ' (root)' : ''}`,
    ),
  );
}

export function shadowJson(sps: SpInfo[]): unknown[] {
  return sps.map((sp) => ({ gfn: hex(sp.gfn), level: sp.level, direct: sp.direct, unsync: sp.unsync }));
}

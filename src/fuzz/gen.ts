// Random scenarios for `kvmharness fuzz`: fast-check arbitraries of plans
// (arrays of small numbers: choices), realised into scenarios by pure
// functions of the plan and the host's facts. A plan shrinks the way
// fast-check shrinks arrays and numbers (fewer steps, fewer mappings, every
// choice towards 0), and choice 0 is always the plainest option, so a shrunk
// plan realises into a small, plain scenario.
//
// The steps come from STEP_GENS, one entry per step kind (a mapped type over
// Step['kind']: a kind without its generator does not compile). An entry gets
// the state the steps before it left (which slots are live, logging, moved,
// unmapped) and returns a step that is valid there, or undefined when the kind
// has nothing to work on (a dirty-log step with no logging slot).
//
// The choices lean on the places KVM's MMU bugs live: the first and last page
// of a slot, 2 MiB edges, dirty-bitmap word edges (64 pages), slots that are
// adjacent or misaligned to 2 MiB, mappings that straddle two slots or end in
// a hole, ranges that cross a huge-page edge.
import fc from 'fast-check';
import { LAYOUT } from '../arch/x86/layout.js';
import {
  PAGE_1G,
  PAGE_2M,
  PAGE_4K,
  PTE_A,
  PTE_D,
  PTE_G,
  PTE_NX,
  PTE_P,
  PTE_PCD,
  PTE_PS,
  PTE_PWT,
  PTE_RW,
  PTE_US,
} from '../arch/x86/pte.js';
import type { HostProfile } from '../probe/probe.js';
import { scenarioToJson, validateScenario } from '../scenario/load.js';
import type { Mapping, MemslotDecl, PageSize, PteAttrs, RaceOp, RawBits, Scenario, Step } from '../scenario/types.js';

/** The host facts a generator needs: what the guest CPU and KVM offer. */
export interface GenHost {
  maxPhyAddr: number;
  nx: boolean;
  smep: boolean;
  smap: boolean;
  pku: boolean;
  la57: boolean;
  pdpe1gb: boolean;
  /** KVM_CAP_PRE_FAULT_MEMORY. */
  preFault: boolean;
  /** Free 2 MiB hugetlb pages. */
  hugetlb2m: number;
  /** Races run here (several vCPUs on their own threads). */
  races: boolean;
  /** kvm_pvm: CPL 3 accesses to non-canonical addresses are not generated (README, Findings). */
  pvm: boolean;
  /** Shared guest_memfd slots work here (KVM_CREATE_GUEST_MEMFD with MMAP|INIT_SHARED; campaign.ts asks a VM). */
  guestMemfd: boolean;
}

export function genHostOf(p: HostProfile): GenHost {
  const cpu = p.cpu;
  return {
    maxPhyAddr: cpu?.maxPhyAddr ?? 48,
    nx: cpu?.nx ?? true,
    smep: cpu?.smep ?? false,
    smap: cpu?.smap ?? false,
    pku: cpu?.pku ?? false,
    la57: cpu?.la57 ?? false,
    pdpe1gb: cpu?.pdpe1gb ?? false,
    preFault: !!p.capabilities.KVM_CAP_PRE_FAULT_MEMORY,
    hugetlb2m: p.hugetlb['2048kB']?.free ?? 0,
    races: true,
    pvm: p.flavour === 'kvm_pvm',
    guestMemfd: false,
  };
}

// ---------------------------------------------------------------------------------
// Choices.

/** A cursor over a plan's numbers; past the end it reads 0 (the plainest choice). */
export class Picks {
  private i = 0;
  constructor(private readonly a: readonly number[]) {}
  next(): number {
    return this.a[this.i++] ?? 0;
  }
  /** 0..n-1. */
  int(n: number): number {
    return n <= 1 ? 0 : this.next() % n;
  }
  pick<T>(xs: readonly T[]): T {
    return xs[this.int(xs.length)]!;
  }
  /** True with `pct` per cent; a 0 is false. */
  chance(pct: number): boolean {
    return this.next() % 100 >= 100 - pct;
  }
  /** A 64-bit value from two choices. */
  u64(): bigint {
    const v = (BigInt(this.next()) << 48n) ^ (BigInt(this.next()) << 24n) ^ BigInt(this.next());
    return BigInt.asUintN(64, v * 0x9e3779b97f4a7c15n);
  }
}

// Unbiased: choices are spread evenly (fast-check's bias towards small
// numbers would make every choice the plainest); shrinking still goes to 0.
const NAT = fc.noBias(fc.nat({ max: 0xffff }));
const picks = (n: number) => fc.array(NAT, { minLength: n, maxLength: n });

// ---------------------------------------------------------------------------------
// Plans.

export interface StepPlan {
  kind: Step['kind'];
  p: number[];
}

export interface Plan {
  /** Choices of the memslots and paging. */
  skel: number[];
  /** Choices of each mapping. */
  mappings: number[][];
  steps: StepPlan[];
  /** Choices of a race; a plan with one is a race scenario (no steps). */
  race: number[] | null;
}

export interface PlanOptions {
  /** Most steps in a scenario (default 24). */
  maxSteps?: number;
  /** Per cent of plans that are races, where the host runs them (default 5). */
  racePct?: number;
}

/** The arbitrary of plans: steps weighted by STEP_GENS' weights. */
export function planArb(host: GenHost, o: PlanOptions = {}): fc.Arbitrary<Plan> {
  const kinds = (Object.keys(STEP_GENS) as Step['kind'][]).filter((k) => STEP_GENS[k].weight(host) > 0);
  const kind = fc.oneof(...kinds.map((k) => ({ arbitrary: fc.constant(k), weight: STEP_GENS[k].weight(host) })));
  const step = fc.record({ kind, p: picks(12) });
  const racePct = host.races ? (o.racePct ?? 5) : 0;
  return fc.record({
    skel: picks(40),
    mappings: fc.array(picks(24), { minLength: 1, maxLength: 6 }),
    steps: fc.noBias(fc.array(step, { minLength: 1, maxLength: o.maxSteps ?? 24, size: 'max' })),
    race:
      racePct > 0
        ? fc.oneof({ arbitrary: fc.constant(null), weight: 100 - racePct }, { arbitrary: picks(24), weight: racePct })
        : fc.constant(null),
  });
}

// ---------------------------------------------------------------------------------
// The state the steps so far leave.

interface SlotState {
  decl: MemslotDecl;
  /** Where the slot is now (memslot-move). */
  gpa: bigint;
  live: boolean;
  logging: boolean;
  moved: boolean;
  /** 4K page indexes munmap took away (and no remap gave back). */
  unmapped: Set<number>;
  /** 4K page indexes mprotect left without write (the VMM's own accesses would fault there), and those left PROT_NONE. */
  noWrite: Set<number>;
  noRead: Set<number>;
  /** What the memory holds where known: 8-byte words by byte offset (absent: 0), except in `unknown` pages. */
  words: Map<bigint, bigint>;
  unknown: Set<number>;
  /** Pages a stopped guest write may still land in: unknown for good. */
  tainted: Set<number>;
  /** close-guest-memfd closed its file. */
  closed: boolean;
}

/** What a step generator sees. */
export interface GenState {
  host: GenHost;
  sc: Scenario;
  slots: SlotState[];
  /** Mappings guest writes may use (never the code mappings). */
  data: Mapping[];
  /** Mappings onto the code slot, the only exec targets. */
  code: Mapping[];
  /** Highest level whose entries a mapping owns (not bring-up's), by mapping. */
  topLevel: Map<Mapping, number>;
  moves: number;
  /** Slots memslot-create added so far, and the GPA after the last one. */
  creates: number;
  createCursor: bigint;
}

/** One step kind's generator. */
export interface StepGen<S extends Step> {
  /** Relative frequency on this host; 0: never. */
  weight(host: GenHost): number;
  gen(st: GenState, r: Picks): S | undefined;
}

/** One generator per step kind: a kind added to Step without one does not compile. */
export type StepGenTable = { [K in Step['kind']]: StepGen<Extract<Step, { kind: K }>> };

// ---------------------------------------------------------------------------------
// Layout.

/**
 * User slots go in [0x400000, SLOT_END); memslot-create puts its slots from
 * CREATE_BASE (the last 2 MiB before SLOT_END, where mappings point at a hole
 * until then: accesses there were MMIO exits) up to the code slot, or high
 * below MAXPHYADDR (where other mappings point); memslot-move targets from
 * MOVE_BASE.
 */
const SLOT_END = 0xe000000n;
const CREATE_BASE = SLOT_END - 0x200000n;
const CREATE_SLOT = 10;
const CODE_SLOT = 30;
const CODE_GPA = 0xf000000n;
const CODE_SIZE = 0x10000n;
const MOVE_BASE = 0x10000000n;
const MOVE_STRIDE = 0x1000000n;
/** Mapping groups: one with its own PML4E, one sharing PML4E 0 with bring-up (owning its PDPTE). */
const GROUPS = [0x8000000000n, 0x40000000n] as const;
const GROUP_TOP = [4, 3] as const;

const PAGE: Record<PageSize, bigint> = { '4K': PAGE_4K, '2M': PAGE_2M, '1G': PAGE_1G };
const alignDown = (x: bigint, a: bigint) => x - (x % a);
const alignUp = (x: bigint, a: bigint) => alignDown(x + a - 1n, a);

const SLOT_PAGES = [16, 1, 2, 64, 65, 512, 513, 1024] as const;

function attrs(r: Picks, leaf: boolean, host: GenHost, pke: boolean): PteAttrs {
  return {
    p: !r.chance(leaf ? 10 : 4),
    w: !r.chance(leaf ? 35 : 12),
    u: !r.chance(leaf ? 45 : 25),
    nx: r.chance(leaf ? 20 : 8),
    a: r.chance(30),
    d: leaf && r.chance(25),
    g: leaf && r.chance(10),
    pwt: r.chance(5),
    pcd: r.chance(5),
    pkey: leaf && pke ? r.int(16) : 0,
  };
}

/** Bits a raw override or a write-pte may set or clear at `level` of a mapping with `page` leaves: never address bits. */
function pteBits(host: GenHost, level: number, page: PageSize): bigint[] {
  const leafLevel = page === '4K' ? 1 : page === '2M' ? 2 : 3;
  const bits = [PTE_P, PTE_RW, PTE_US, PTE_A, PTE_NX, PTE_PWT, PTE_PCD];
  if (level === leafLevel) bits.push(PTE_D, PTE_G);
  if (host.maxPhyAddr < 52) bits.push(1n << BigInt(host.maxPhyAddr), 1n << 51n);
  if (level >= 4) bits.push(PTE_PS, 1n << 8n);
  if (level === leafLevel && leafLevel > 1) bits.push(1n << 13n);
  return bits;
}

/** A GPA of `slot` leaning on its edges: first page, last page, a 2 MiB edge, a bitmap-word edge, anywhere. */
function slotOffset(r: Picks, size: bigint, gpa: bigint, unit: bigint): bigint {
  const last = size > unit ? size - unit : 0n;
  const twoM = alignUp(gpa + 1n, PAGE_2M) - gpa;
  const word = 64n * PAGE_4K;
  const c = r.int(6);
  let off =
    c === 0
      ? 0n
      : c === 1
        ? last
        : c === 2
          ? twoM - (r.chance(50) ? unit : 0n)
          : c === 3
            ? word * BigInt(r.int(Number(size / word) + 1)) - (r.chance(50) ? PAGE_4K : 0n)
            : c === 4
              ? size / 2n
              : BigInt(r.int(Number(size / PAGE_4K))) * PAGE_4K;
  if (off < 0n) off = 0n;
  if (off > last) off = last;
  return alignDown(off, unit);
}

/** A GPA for a mapping of `bytes` with `page` pages. */
function mappingGpa(r: Picks, st: { slots: SlotState[]; host: GenHost }, page: PageSize, bytes: bigint): bigint {
  const unit = PAGE[page];
  const slots = st.slots.filter((s) => s.decl.slot !== CODE_SLOT);
  const c = r.int(10);
  let gpa: bigint;
  if (c < 6 && slots.length) {
    const s = r.pick(slots);
    gpa = s.decl.gpa + slotOffset(r, s.decl.size, s.decl.gpa, PAGE_4K);
  } else if (c === 6 && slots.length) {
    // Straddling the end of a slot: into the next slot or a hole.
    const s = r.pick(slots);
    gpa = s.decl.gpa + s.decl.size - PAGE_4K;
  } else if (c === 7) {
    // Where memslot-move puts slots.
    gpa = MOVE_BASE + BigInt(r.int(3)) * MOVE_STRIDE + BigInt(r.int(4)) * PAGE_4K;
  } else if (c === 8) {
    // A hole: past every slot.
    gpa = SLOT_END - PAGE_2M + BigInt(r.int(512)) * PAGE_4K;
  } else {
    // High in the physical address space, below MAXPHYADDR.
    gpa = (1n << BigInt(st.host.maxPhyAddr)) - unit * BigInt(1 + r.int(4)) - bytes;
  }
  gpa = alignDown(gpa, unit);
  if (gpa < LAYOUT.identityEnd) gpa = alignUp(LAYOUT.identityEnd, unit);
  // Never onto the code slot: its `ret`s must stay.
  if (gpa < CODE_GPA + CODE_SIZE && CODE_GPA < gpa + bytes) gpa = alignUp(CODE_GPA + CODE_SIZE, unit);
  return gpa;
}

// ---------------------------------------------------------------------------------
// Realising a plan.

const FUZZ_DESCRIPTION = 'A random scenario of kvmharness fuzz.';

/** The scenario a plan makes on `host` (the validated, normalised form), or the validator's errors. */
export function realise(
  plan: Plan,
  host: GenHost,
  name = 'fuzz',
): { ok: true; scenario: Scenario; json: unknown } | { ok: false; errors: string[]; json: unknown } {
  const sc = plan.race ? raceScenario(plan.race, host, name) : stepScenario(plan, host, name);
  const json = scenarioToJson(sc);
  const v = validateScenario(json);
  return v.ok ? { ok: true, scenario: v.scenario, json } : { ok: false, errors: v.errors, json };
}

function baseScenario(name: string): Scenario {
  return {
    name,
    description: FUZZ_DESCRIPTION,
    arch: 'x86_64',
    vcpus: 1,
    memslots: [],
    paging: {
      levels: 4,
      cr0: { wp: true },
      cr4: { smep: false, smap: false, pke: false },
      efer: { nxe: true },
      pkru: 0,
      vendor: 'auto',
    },
    mappings: [],
    steps: [],
  };
}

function stepScenario(plan: Plan, host: GenHost, name: string): Scenario {
  const r = new Picks(plan.skel);
  const sc = baseScenario(name);
  // Paging: each choice 0 is the default.
  const pke = host.pku && r.chance(25);
  sc.paging = {
    levels: host.la57 && r.chance(10) ? 5 : 4,
    cr0: { wp: !r.chance(20) },
    cr4: { smep: host.smep && r.chance(30), smap: host.smap && r.chance(30), pke },
    efer: { nxe: host.nx ? !r.chance(15) : false },
    // Key 0 stays open: the harness's own pages (the CPL 3 stack a fetch's `call` pushes to) have key 0.
    pkru: pke && r.chance(60) ? ((r.next() * 0x10001) & ~3) >>> 0 : 0,
    vendor: 'auto',
  };
  // Memslots: one to three, adjacent or apart, 2 MiB aligned or not.
  const backings: MemslotDecl['backing'][] = ['anon', 'memfd', 'shared', 'thp'];
  let cursor: bigint = LAYOUT.identityEnd;
  const nslots = 1 + r.int(3);
  for (let i = 0; i < nslots; i++) {
    const huge = host.hugetlb2m >= 2 && r.chance(10);
    const pages = BigInt(r.pick(SLOT_PAGES));
    const size = huge ? PAGE_2M * (1n + BigInt(r.int(2))) : pages * PAGE_4K;
    const place = r.int(4);
    let gpa =
      place === 0
        ? alignUp(cursor, PAGE_2M)
        : place === 1
          ? cursor
          : place === 2
            ? alignUp(cursor, PAGE_2M) + PAGE_4K * BigInt(1 + r.int(3))
            : alignUp(cursor, PAGE_2M) + PAGE_2M - PAGE_4K;
    if (huge) gpa = alignUp(gpa, PAGE_2M);
    if (gpa + size > SLOT_END) break;
    cursor = gpa + size;
    const backing = huge ? 'hugetlb2m' : host.guestMemfd && r.chance(15) ? 'guest_memfd' : r.pick(backings);
    sc.memslots.push(slotDecl(r, i + 1, gpa, size, backing, 'at-start'));
  }
  const hasCode = r.chance(50);
  if (hasCode)
    sc.memslots.push({
      slot: CODE_SLOT,
      gpa: CODE_GPA,
      size: CODE_SIZE,
      backing: 'anon',
      logDirty: false,
      readonly: false,
      created: 'at-start',
    });
  const slots: SlotState[] = sc.memslots.map(slotState);
  // Mappings: in two groups of GVAs, each laid out upwards, sharing tables.
  const tableAttrs = GROUPS.map(() => attrs(r, false, host, false));
  const gvaCursor: bigint[] = [...GROUPS];
  const st: GenState = {
    host,
    sc,
    slots,
    data: [],
    code: [],
    topLevel: new Map(),
    moves: 0,
    creates: 0,
    createCursor: CREATE_BASE,
  };
  plan.mappings.forEach((mp, i) => {
    const m = new Picks(mp);
    let g = m.int(2);
    const isCode = hasCode && i > 0 && m.chance(40);
    const page: PageSize = isCode ? '4K' : host.pdpe1gb && m.chance(5) ? '1G' : m.chance(25) ? '2M' : '4K';
    // A 1G leaf under PML4E 0 would own no table entry: it goes in the group with its own PML4E.
    if (page === '1G') g = 0;
    const unit = PAGE[page];
    const count = page === '4K' ? BigInt(m.pick([1, 2, 3, 4, 8, 16])) : page === '2M' ? BigInt(1 + m.int(2)) : 1n;
    const size = count * unit;
    const gva = alignUp(gvaCursor[g]!, unit) + (m.chance(30) ? unit : 0n);
    gvaCursor[g] = gva + size;
    const gpa = isCode
      ? CODE_GPA + BigInt(m.int(Number(CODE_SIZE / PAGE_4K) - Number(count) + 1)) * PAGE_4K
      : mappingGpa(m, st, page, size);
    const leafLevel = page === '4K' ? 1 : page === '2M' ? 2 : 3;
    const top = sc.paging.levels === 5 && g === 0 ? 4 : GROUP_TOP[g]!;
    const raw: RawBits[] = [];
    if (!isCode && m.chance(20)) {
      const level = leafLevel + m.int(top - leafLevel + 1);
      const bit = m.pick(pteBits(host, level, page));
      raw.push(m.chance(50) ? { level, set: bit, clear: 0n } : { level, set: 0n, clear: bit });
    }
    const mapping: Mapping = {
      gva,
      gpa,
      size,
      page,
      leaf: attrs(m, true, host, sc.paging.cr4.pke),
      table: tableAttrs[g]!,
      raw,
    };
    if (isCode) mapping.leaf.nx = m.chance(20);
    sc.mappings.push(mapping);
    (isCode ? st.code : st.data).push(mapping);
    st.topLevel.set(mapping, top);
  });
  for (const s of plan.steps) {
    const step = STEP_GENS[s.kind].gen(st, new Picks(s.p));
    if (step) sc.steps.push(step);
  }
  return sc;
}

/**
 * A slot's declaration: dirty logging and read-only now and then (never on a
 * guest_memfd slot: KVM refuses both), and now and then an HVA placement
 * modulo 2M or 1G: aligned with the GPA (THP can back it with huge pages) or
 * misaligned by a page, by all but a page, or by half.
 */
function slotDecl(
  r: Picks,
  slot: number,
  gpa: bigint,
  size: bigint,
  backing: MemslotDecl['backing'],
  created: MemslotDecl['created'],
): MemslotDecl {
  const gmem = backing === 'guest_memfd';
  const d: MemslotDecl = {
    slot,
    gpa,
    size,
    backing,
    logDirty: !gmem && r.chance(40),
    readonly: !gmem && r.chance(8),
    created,
  };
  if (!gmem && r.chance(30)) {
    const modulo = backing === 'hugetlb2m' || r.chance(60) ? '2M' : '1G';
    const mod = modulo === '2M' ? PAGE_2M : PAGE_1G;
    // A hugetlb2m slot's memory starts on a 2 MiB boundary (and its GPA is one): aligned only.
    const c = backing === 'hugetlb2m' ? 0 : r.int(5);
    const offset = c === 0 ? 0n : c === 1 ? PAGE_4K : c === 2 ? mod - PAGE_4K : c === 3 ? mod / 2n : PAGE_2M;
    d.hva = { modulo, offset: offset % mod };
  }
  return d;
}

function slotState(d: MemslotDecl): SlotState {
  return {
    decl: d,
    gpa: d.gpa,
    live: d.created === 'at-start',
    logging: d.logDirty,
    moved: false,
    unmapped: new Set(),
    noWrite: new Set(),
    noRead: new Set(),
    words: new Map(),
    unknown: new Set(),
    tainted: new Set(),
    closed: false,
  };
}

function raceScenario(p: number[], host: GenHost, name: string): Scenario {
  const r = new Picks(p);
  const sc = baseScenario(name);
  sc.vcpus = 2 + r.int(3);
  const pages = r.pick([1, 2, 4, 8, 16]);
  const cpl = r.chance(30) ? 3 : 0;
  const opsets: RaceOp[][] = [
    ['dirty-log'],
    ['dontneed'],
    ['dirty-log', 'dontneed'],
    ['toggle-dirty-log'],
    ['toggle-dirty-log', 'dontneed'],
    ['delete'],
  ];
  const ntargets = 1 + r.int(2);
  const targets: NonNullable<Scenario['race']>['targets'] = [];
  let gpa: bigint = LAYOUT.identityEnd;
  for (let i = 0; i < ntargets; i++) {
    const ops = r.pick(opsets);
    const bytes = BigInt(sc.vcpus * pages) * PAGE_4K;
    const size = alignUp(bytes + PAGE_4K * BigInt(r.int(3)), PAGE_4K);
    const slot = i + 1;
    sc.memslots.push({
      slot,
      gpa,
      size,
      backing: r.pick(['anon', 'memfd', 'thp'] as const),
      logDirty: ops.includes('dirty-log') || r.chance(30),
      readonly: false,
      created: 'at-start',
    });
    const gva = GROUPS[0] + BigInt(i) * PAGE_1G;
    const leaf: PteAttrs = { ...PLAIN, w: true, u: true };
    const table: PteAttrs = { ...PLAIN, w: true, u: true };
    sc.mappings.push({ gva, gpa, size: bytes, page: '4K', leaf, table, raw: [] });
    targets.push({ slot, gva, host: ops });
    gpa = alignUp(gpa + size, r.chance(50) ? PAGE_2M : PAGE_4K);
  }
  sc.race = { pages, rounds: 1 + r.int(20), cpl, targets };
  return sc;
}

/** Present, read-only, supervisor, executable, nothing else. */
const PLAIN: PteAttrs = {
  p: true,
  w: false,
  u: false,
  nx: false,
  a: false,
  d: false,
  g: false,
  pwt: false,
  pcd: false,
  pkey: 0,
};

// ---------------------------------------------------------------------------------
// Addresses for steps.

/** A GVA inside `m`, leaning on its first and last pages and huge-page edges; `size` bytes fit in one 4K page. */
function gvaIn(r: Picks, m: Mapping, size: number): bigint {
  const pages = m.size / PAGE_4K;
  const c = r.int(4);
  const page =
    c === 0
      ? 0n
      : c === 1
        ? pages - 1n
        : c === 2
          ? (BigInt(r.int(Number(m.size / PAGE_2M) + 1)) * PAGE_2M) / PAGE_4K - (r.chance(50) ? 1n : 0n)
          : BigInt(r.int(Number(pages)));
  const p = page < 0n ? 0n : page >= pages ? pages - 1n : page;
  const sz = BigInt(size);
  const o = r.int(3);
  const off = o === 0 ? 0n : o === 1 ? PAGE_4K - sz : BigInt(r.int(Number(PAGE_4K - sz) + 1));
  return m.gva + p * PAGE_4K + off;
}

/** A GVA for an access or a TLB operation: mostly inside a mapping, sometimes just past one, or non-canonical. */
function anyGva(r: Picks, st: GenState, size: number, from: Mapping[], cpl: 0 | 3): bigint {
  const all = from.length ? from : st.data;
  const c = r.int(10);
  if (c === 8 && all.length) {
    // Just past a mapping: unmapped, or the next mapping, never a code page (its `ret` must stay).
    const m = r.pick(all);
    const gva = m.gva + m.size + BigInt(r.int(Number(PAGE_4K) - size + 1));
    if (!st.code.some((x) => gva >= x.gva && gva < x.gva + x.size)) return gva;
  }
  if (c === 9 && !(cpl === 3 && st.host.pvm)) {
    const half = 1n << BigInt(st.sc.paging.levels === 5 ? 56 : 47);
    return half + BigInt(r.int(16)) * 8n;
  }
  if (!all.length) return GROUPS[0] + BigInt(r.int(16)) * PAGE_4K;
  return gvaIn(r, r.pick(all), size);
}

/** A mapping and one of its entries it owns: level from its leaf up to the top level it does not share with bring-up. */
function entryOf(r: Picks, st: GenState): { m: Mapping; gva: bigint; level: number } | undefined {
  const all = [...st.data, ...st.code];
  if (!all.length) return undefined;
  const m = r.pick(all);
  const leaf = m.page === '4K' ? 1 : m.page === '2M' ? 2 : 3;
  const top = st.topLevel.get(m) ?? leaf;
  return { m, gva: gvaIn(r, m, 1), level: leaf + r.int(top - leaf + 1) };
}

const liveSlots = (st: GenState) => st.slots.filter((s) => s.live && s.decl.slot !== CODE_SLOT);
/** Live slots whose memory is an mmap of the VMM's (not guest_memfd): the targets of madvise, munmap, mprotect, flags. */
const mmapSlots = (st: GenState) => liveSlots(st).filter((s) => s.decl.backing !== 'guest_memfd');

// What the memory holds, for read-memory's expected value. Pages the guest
// may have written, and pages whose contents a host step leaves in doubt, are
// unknown; read-memory reads only known words.

function pagesOf(offset: bigint, size: bigint): number[] {
  const out: number[] = [];
  for (let p = offset / PAGE_4K; p < (offset + size + PAGE_4K - 1n) / PAGE_4K; p++) out.push(Number(p));
  return out;
}

/** The contents of [offset, offset+size) are no longer known. */
function forget(s: SlotState, offset: bigint, size: bigint): void {
  for (const p of pagesOf(offset, size)) s.unknown.add(p);
}

/** [offset, offset+size) (whole pages) reads as zero now, unless a write may still land there (`tainted`). */
function zero(s: SlotState, offset: bigint, size: bigint): void {
  for (const k of [...s.words.keys()]) if (k >= offset && k < offset + size) s.words.delete(k);
  for (const p of pagesOf(offset, size)) if (!s.tainted.has(p)) s.unknown.delete(p);
}

/** A guest write of `size` bytes at `gva` (through the scenario's mappings, whose addresses no step changes). */
function guestWrote(st: GenState, gva: bigint, size: bigint): void {
  const m = st.sc.mappings.find((x) => gva >= x.gva && gva < x.gva + x.size);
  if (!m) return;
  const gpa = m.gpa + (gva - m.gva);
  const s = st.slots.find((x) => x.live && gpa >= x.gpa && gpa < x.gpa + x.decl.size);
  if (!s) return;
  const off = gpa - s.gpa;
  forget(s, off, size);
  for (const p of pagesOf(off, size)) {
    // A write stopped for missing host memory lands when a later run redoes it, after host steps.
    if (s.unmapped.has(p) || s.noWrite.has(p)) s.tainted.add(p);
  }
}

/** Whether a guest access to `gpa` finds host memory now: a live slot there, mapped, and writable for a write. */
function hostProvides(st: GenState, gpa: bigint, access: 'read' | 'write'): boolean {
  const s = st.slots.find((x) => x.live && gpa >= x.gpa && gpa < x.gpa + x.decl.size);
  if (!s || s.closed || (access === 'write' && s.decl.readonly)) return false;
  const p = Number((gpa - s.gpa) / PAGE_4K);
  return !s.unmapped.has(p) && !s.noRead.has(p) && !(access === 'write' && s.noWrite.has(p));
}

/** A live slot at its declared GPA whose VMM mapping may be read (or written) at [offset, offset+size). */
function vmmAccessible(s: SlotState, offset: bigint, size: bigint, write: boolean): boolean {
  if (s.moved || s.closed) return false;
  return pagesOf(offset, size).every((p) => !s.unmapped.has(p) && !s.noRead.has(p) && !(write && s.noWrite.has(p)));
}

/** A range of a slot's host memory in 4K pages: one page at an edge, across a 2 MiB edge, the whole slot. */
function hostRange(r: Picks, s: SlotState): { offset: bigint; size: bigint } {
  const pages = Number(s.decl.size / PAGE_4K);
  const c = r.int(5);
  let first: number;
  let n: number;
  if (c === 0) [first, n] = [0, 1];
  else if (c === 1) [first, n] = [pages - 1, 1];
  else if (c === 2) [first, n] = [0, pages];
  else if (c === 3) {
    // Across the first 2 MiB edge of the slot's host memory as the guest sees it.
    const edge = Number((alignUp(s.decl.gpa + 1n, PAGE_2M) - s.decl.gpa) / PAGE_4K);
    first = Math.max(0, Math.min(pages - 1, edge - 1 - r.int(2)));
    n = 2 + r.int(3);
  } else {
    first = r.int(pages);
    n = 1 + r.int(8);
  }
  n = Math.max(1, Math.min(n, pages - first));
  return { offset: BigInt(first) * PAGE_4K, size: BigInt(n) * PAGE_4K };
}

function touchesUnmapped(s: SlotState, offset: bigint, size: bigint): boolean {
  for (let p = offset / PAGE_4K; p < (offset + size) / PAGE_4K; p++) if (s.unmapped.has(Number(p))) return true;
  return false;
}

/** A host range step's range on a live slot, clear of unmapped memory, in the backing's pages. */
function clearRange(
  r: Picks,
  st: GenState,
  slots = mmapSlots(st),
): { s: SlotState; offset: bigint; size: bigint } | undefined {
  if (!slots.length) return undefined;
  const s = r.pick(slots);
  let { offset, size } = hostRange(r, s);
  if (s.decl.backing === 'hugetlb2m') {
    offset = alignDown(offset, PAGE_2M);
    size = alignUp(size, PAGE_2M);
    if (offset + size > s.decl.size) size = s.decl.size - offset;
  }
  if (touchesUnmapped(s, offset, size)) return undefined;
  return { s, offset, size };
}

/**
 * A guest loop from `gva`: a stride of the access size (every byte of a
 * page), of a page (every page of a range: across 2 MiB edges, into the page
 * past a mapping) or of 2 MiB (huge-page edges), counts at the edges (2, 64,
 * 512, 513). A write loop stays inside its mapping (past it may be a code
 * page, whose `ret` must stay); a read loop may run one stride past it.
 */
function guestLoop(
  r: Picks,
  st: GenState,
  access: 'read' | 'write',
  gva: bigint,
  size: number,
): { count: number; stride: bigint } | undefined {
  const m = st.sc.mappings.find((x) => gva >= x.gva && gva < x.gva + x.size);
  if (!m) return undefined;
  const stride = r.pick([BigInt(size), PAGE_4K, PAGE_4K + BigInt(size), PAGE_2M]);
  let count = r.pick([2, 3, 64, 512, 513]);
  const end = m.gva + m.size + (access === 'read' ? stride : 0n);
  const fit = Number((end - BigInt(size) - gva) / stride) + 1;
  count = Math.min(count, fit);
  if (count < 2) return undefined;
  // Every access stays inside one 4K page, and in memory the host provides
  // (the engine refuses a loop access that would exit as MMIO or find no host memory).
  for (let k = 0; k < count; k++) {
    const a = gva + BigInt(k) * stride;
    if ((a & (PAGE_4K - 1n)) + BigInt(size) > PAGE_4K) return undefined;
    if (st.code.some((x) => a >= x.gva && a < x.gva + x.size) && access === 'write') return undefined;
    const at = st.sc.mappings.find((x) => a >= x.gva && a < x.gva + x.size);
    if (at && !hostProvides(st, at.gpa + (a - at.gva), access)) return undefined;
  }
  return { count, stride };
}

/** A range for write-memory or read-memory's word: an edge of the slot, a page, across a page or 2 MiB edge. */
function memoryRange(r: Picks, s: SlotState): { offset: bigint; size: bigint } {
  const size = s.decl.size;
  const c = r.int(5);
  const twoM = alignUp(s.decl.gpa + 1n, PAGE_2M) - s.decl.gpa;
  let offset: bigint;
  let bytes: bigint;
  if (c === 0) [offset, bytes] = [0n, 8n];
  else if (c === 1) [offset, bytes] = [size - 8n, 8n];
  else if (c === 2) [offset, bytes] = [alignDown(BigInt(r.int(Number(size / PAGE_4K))) * PAGE_4K, PAGE_4K), PAGE_4K];
  else if (c === 3) [offset, bytes] = [twoM - 8n * BigInt(1 + r.int(4)), 16n * BigInt(1 + r.int(4))];
  else [offset, bytes] = [PAGE_4K - 8n, 16n];
  if (offset < 0n || offset >= size) offset = 0n;
  if (offset + bytes > size) bytes = size - offset;
  return { offset, size: bytes };
}

// ---------------------------------------------------------------------------------
// The generators, one per step kind.

const side = (r: Picks): 'guest' | 'host' => (r.chance(50) ? 'host' : 'guest');

export const STEP_GENS: StepGenTable = {
  access: {
    weight: () => 40,
    gen(st, r) {
      const access = r.pick(['read', 'write', 'exec'] as const);
      const cpl = r.chance(40) ? 3 : 0;
      if (access === 'exec') {
        if (!st.code.length) return undefined;
        return {
          side: 'guest',
          kind: 'access',
          access,
          gva: gvaIn(r, r.pick(st.code), 1),
          size: 1,
          cpl,
          value: 0n,
          eflagsAc: false,
        };
      }
      const size = r.pick([8, 4, 2, 1] as const);
      const gva = anyGva(r, st, size, st.data, cpl);
      const value = access === 'write' ? BigInt.asUintN(size * 8, r.u64()) : 0n;
      const eflagsAc = cpl === 0 && st.host.smap && r.chance(30);
      const loop = r.chance(20) ? guestLoop(r, st, access, gva, size) : undefined;
      if (access === 'write')
        for (let k = 0; k < (loop?.count ?? 1); k++)
          guestWrote(st, gva + BigInt(k) * (loop?.stride ?? 0n), BigInt(size));
      return { side: 'guest', kind: 'access', access, gva, size, cpl, value, eflagsAc, ...(loop ? { loop } : {}) };
    },
  },
  invlpg: {
    weight: () => 6,
    gen: (st, r) => ({ side: 'guest', kind: 'invlpg', gva: anyGva(r, st, 1, [...st.data, ...st.code], 0) }),
  },
  'reload-cr3': {
    weight: () => 4,
    gen: () => ({ side: 'guest', kind: 'reload-cr3' }),
  },
  'set-cr0-wp': {
    weight: () => 2,
    gen: (_st, r) => ({ side: 'guest', kind: 'set-cr0-wp', value: r.chance(50) }),
  },
  'set-cr4': {
    weight: (h) => (h.smep || h.smap || h.pku ? 2 : 0),
    gen(st, r) {
      const bits = (['smep', 'smap', 'pke'] as const).filter((b) => st.host[b === 'pke' ? 'pku' : b]);
      if (!bits.length) return undefined;
      return { side: 'guest', kind: 'set-cr4', bit: r.pick(bits), value: r.chance(50) };
    },
  },
  'write-pte': {
    weight: () => 10,
    gen(st, r) {
      const e = entryOf(r, st);
      if (!e) return undefined;
      const bit = r.pick(pteBits(st.host, e.level, e.m.page));
      const set = r.chance(50);
      return {
        side: side(r),
        kind: 'write-pte',
        gva: e.gva,
        level: e.level,
        set: set ? bit : 0n,
        clear: set ? 0n : bit,
      };
    },
  },
  'clear-ad': {
    weight: () => 4,
    gen(st, r) {
      const e = entryOf(r, st);
      return e ? { side: side(r), kind: 'clear-ad', gva: e.gva } : undefined;
    },
  },
  'get-dirty-log': {
    weight: () => 8,
    gen(st, r) {
      const s = liveSlots(st).filter((x) => x.logging);
      return s.length ? { side: 'host', kind: 'get-dirty-log', slot: r.pick(s).decl.slot } : undefined;
    },
  },
  'clear-dirty-log': {
    weight: () => 3,
    gen(st, r) {
      const s = liveSlots(st).filter((x) => x.logging);
      return s.length ? { side: 'host', kind: 'clear-dirty-log', slot: r.pick(s).decl.slot } : undefined;
    },
  },
  'memslot-delete': {
    weight: () => 2,
    gen(st, r) {
      const s = liveSlots(st);
      if (!s.length) return undefined;
      const x = r.pick(s);
      x.live = false;
      return { side: 'host', kind: 'memslot-delete', slot: x.decl.slot };
    },
  },
  'memslot-move': {
    weight: () => 2,
    gen(st, r) {
      const s = mmapSlots(st);
      if (!s.length) return undefined;
      const x = r.pick(s);
      const gpa = MOVE_BASE + BigInt(st.moves++) * MOVE_STRIDE + (r.chance(30) ? PAGE_4K : 0n);
      x.gpa = gpa;
      x.moved = true;
      return { side: 'host', kind: 'memslot-move', slot: x.decl.slot, gpa };
    },
  },
  'memslot-flags': {
    weight: () => 4,
    gen(st, r) {
      const s = mmapSlots(st);
      if (!s.length) return undefined;
      const x = r.pick(s);
      x.logging = r.chance(50) ? !x.logging : x.logging;
      return {
        side: 'host',
        kind: 'memslot-flags',
        slot: x.decl.slot,
        logDirty: x.logging,
        readonly: x.decl.readonly,
      };
    },
  },
  madvise: {
    weight: () => 5,
    gen(st, r) {
      const c = clearRange(r, st);
      if (!c) return undefined;
      const advice = r.pick(['dontneed', 'hugepage', 'nohugepage'] as const);
      // MADV_DONTNEED frees private memory (reads as zero); a shared mapping's pages stay in their file.
      const shared = c.s.decl.backing === 'memfd' || c.s.decl.backing === 'shared';
      if (advice === 'dontneed' && !shared) zero(c.s, c.offset, c.size);
      return { side: 'host', kind: 'madvise', slot: c.s.decl.slot, offset: c.offset, size: c.size, advice };
    },
  },
  munmap: {
    weight: () => 3,
    gen(st, r) {
      const c = clearRange(r, st);
      if (!c) return undefined;
      for (let p = c.offset / PAGE_4K; p < (c.offset + c.size) / PAGE_4K; p++) c.s.unmapped.add(Number(p));
      return { side: 'host', kind: 'munmap', slot: c.s.decl.slot, offset: c.offset, size: c.size };
    },
  },
  remap: {
    weight: () => 3,
    gen(st, r) {
      const s = mmapSlots(st).filter((x) => x.unmapped.size > 0);
      if (!s.length) return undefined;
      const x = r.pick(s);
      // A run of unmapped pages: the first, or all of it.
      const sorted = [...x.unmapped].sort((a, b) => a - b);
      const start = r.pick(sorted);
      let end = start + 1;
      if (r.chance(60)) while (x.unmapped.has(end)) end++;
      const unit = x.decl.backing === 'hugetlb2m' ? Number(PAGE_2M / PAGE_4K) : 1;
      if (start % unit !== 0 || (end - start) % unit !== 0) return undefined;
      for (let p = start; p < end; p++) x.unmapped.delete(p);
      const offset = BigInt(start) * PAGE_4K;
      // Fresh anonymous memory is zero; a memfd's pages come back from its file.
      if (x.decl.backing !== 'memfd') zero(x, offset, BigInt(end - start) * PAGE_4K);
      for (let p = start; p < end; p++) [x.noRead, x.noWrite].forEach((set) => set.delete(p));
      return { side: 'host', kind: 'remap', slot: x.decl.slot, offset, size: BigInt(end - start) * PAGE_4K };
    },
  },
  mprotect: {
    weight: () => 3,
    gen(st, r) {
      const c = clearRange(r, st);
      if (!c) return undefined;
      const prot = r.pick(['read-write', 'read', 'none'] as const);
      for (const p of pagesOf(c.offset, c.size)) {
        if (prot === 'read-write') c.s.noWrite.delete(p);
        else c.s.noWrite.add(p);
        if (prot === 'none') c.s.noRead.add(p);
        else c.s.noRead.delete(p);
      }
      return { side: 'host', kind: 'mprotect', slot: c.s.decl.slot, offset: c.offset, size: c.size, prot };
    },
  },
  'pre-fault': {
    weight: (h) => (h.preFault ? 3 : 0),
    gen(st, r) {
      const s = liveSlots(st).filter((x) => !x.moved && !x.closed);
      if (!s.length) return undefined;
      const x = r.pick(s);
      const { offset, size } = hostRange(r, x);
      return { side: 'host', kind: 'pre-fault', gpa: x.decl.gpa + offset, size };
    },
  },
  'memslot-create': {
    weight: () => 2,
    gen(st, r) {
      if (st.creates >= 3) return undefined;
      const pages = BigInt(r.pick([1, 16, 64, 512, 513]));
      const size = pages * PAGE_4K;
      const c = r.int(5);
      // Over the hole the mappings point at (their accesses there were MMIO exits), or high below MAXPHYADDR.
      const gpa =
        c === 4 && st.creates === 0
          ? alignDown((1n << BigInt(st.host.maxPhyAddr)) - size - PAGE_2M * BigInt(r.int(2)), PAGE_4K)
          : alignUp(st.createCursor, c === 0 ? PAGE_2M : PAGE_4K) + (c === 1 ? PAGE_4K : 0n);
      if (gpa < CODE_GPA + CODE_SIZE && CODE_GPA < gpa + size) return undefined;
      if (st.sc.memslots.some((m) => m.gpa < gpa + size && gpa < m.gpa + m.size)) return undefined;
      if (st.slots.some((x) => x.moved && x.gpa < gpa + size && gpa < x.gpa + x.decl.size)) return undefined;
      const backings: MemslotDecl['backing'][] = ['anon', 'memfd', 'shared', 'thp'];
      if (st.host.guestMemfd) backings.push('guest_memfd');
      const decl = slotDecl(r, CREATE_SLOT + st.creates, gpa, size, r.pick(backings), 'by-step');
      st.sc.memslots.push(decl);
      const x = slotState(decl);
      x.live = true;
      st.slots.push(x);
      st.creates++;
      if (gpa >= st.createCursor && gpa < CODE_GPA) st.createCursor = gpa + size;
      return { side: 'host', kind: 'memslot-create', slot: decl.slot };
    },
  },
  'write-memory': {
    weight: () => 4,
    gen(st, r) {
      const s = liveSlots(st);
      if (!s.length) return undefined;
      const x = r.pick(s);
      const { offset, size } = memoryRange(r, x);
      if (!vmmAccessible(x, offset, size, true)) return undefined;
      const value = r.chance(20) ? 0n : r.u64();
      for (let o = offset; o < offset + size; o += 8n) x.words.set(o, value);
      // A whole page written is known again; a part of an unknown page is not.
      for (const p of pagesOf(offset, size)) {
        const whole = BigInt(p) * PAGE_4K >= offset && BigInt(p + 1) * PAGE_4K <= offset + size;
        if (whole && !x.tainted.has(p)) x.unknown.delete(p);
      }
      return { side: 'host', kind: 'write-memory', gpa: x.decl.gpa + offset, size, value };
    },
  },
  'read-memory': {
    weight: () => 4,
    gen(st, r) {
      const s = liveSlots(st);
      if (!s.length) return undefined;
      const x = r.pick(s);
      // A word that write-memory wrote, else an edge of the slot.
      const written = [...x.words.keys()];
      const word = written.length && r.chance(70) ? r.pick(written) : alignDown(memoryRange(r, x).offset, 8n);
      const size = r.pick([8, 4, 2, 1] as const);
      const offset = word + BigInt(r.int(8 / size) * size);
      if (!vmmAccessible(x, offset, BigInt(size), false) || x.unknown.has(Number(offset / PAGE_4K))) return undefined;
      const v = x.words.get(word) ?? 0n;
      const expect = BigInt.asUintN(size * 8, v >> (8n * (offset - word)));
      return { side: 'host', kind: 'read-memory', gpa: x.decl.gpa + offset, size, expect };
    },
  },
  'punch-hole': {
    weight: () => 3,
    gen(st, r) {
      const slots = liveSlots(st).filter(
        (x) => !x.closed && (x.decl.backing === 'memfd' || x.decl.backing === 'guest_memfd'),
      );
      const c = clearRange(r, st, slots);
      if (!c) return undefined;
      zero(c.s, c.offset, c.size);
      return { side: 'host', kind: 'punch-hole', slot: c.s.decl.slot, offset: c.offset, size: c.size };
    },
  },
  'close-guest-memfd': {
    weight: (h) => (h.guestMemfd ? 1 : 0),
    gen(st, r) {
      const s = liveSlots(st).filter((x) => x.decl.backing === 'guest_memfd' && !x.closed);
      if (!s.length) return undefined;
      const x = r.pick(s);
      x.closed = true;
      return { side: 'host', kind: 'close-guest-memfd', slot: x.decl.slot };
    },
  },
  translate: {
    weight: () => 5,
    gen: (st, r) => ({ side: 'host', kind: 'translate', gva: anyGva(r, st, 1, [...st.data, ...st.code], 0) }),
  },
};

/** How many steps a scenario has, a race counting its rounds. */
export function scenarioSteps(sc: Scenario): number {
  return sc.race ? sc.race.rounds : sc.steps.length;
}

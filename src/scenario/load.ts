// Scenario files: read, parse, validate (shape from schema.ts's field tables,
// then the semantic rules below), and convert to the Scenario type (steps by
// the table of step kinds in steps.ts). Every error names the JSON path of the
// field it is about.
//
// Semantic rules (run once the file has the right shape):
//   file      nests at most MAX_DEPTH levels (checked before anything else).
//   memslots  slot 0 is bring-up's ([0, 0x400000)); user slots are 1 and above,
//             declared once, 4K aligned (hugetlb: aligned to their page), not
//             overlapping bring-up memory or each other, below 2^52, at most
//             4 GiB (MAX_SLOT_BYTES).
//   mappings  gva, gpa and size aligned to the page size; the GVA range canonical
//             for the paging mode and clear of the identity map [0, 0x400000) and
//             of RETURN_GVA's page; no two mappings overlap; GPAs below 2^52;
//             raw levels exist (not above paging.levels, not below the leaf) and
//             are not bring-up's entries or the entry that would map RETURN_GVA;
//             mappings that share a table entry the scenario creates give it the
//             same table attributes; the tables fit bring-up's table pool.
//   steps     accesses stay inside one 4K page, values fit their size, EFLAGS.AC
//             only at CPL 0; no access in RETURN_GVA's page, no write or exec
//             of bring-up memory; levels in write-pte and expect.ptes exist for a
//             mapping covering the gva (write-pte: not a bring-up entry);
//             clear-ad needs a mapping; dirty-log steps name a declared slot
//             with logDirty; expected dirty GPAs are 4K aligned and in the slot
//             (each kind's rules are its `validate` in steps.ts).
// Step gvas that no mapping covers are allowed: that is how not-present faults
// are tested.
import { readdirSync, readFileSync, existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { LAYOUT, RETURN_GVA } from '../arch/x86/layout.js';
import { levelSpan, LEVEL_NAMES, PAGE_4K } from '../arch/x86/pte.js';
import { MAX_NR_PAGES } from '../model/memslots.js';
import { coversReturnGva, isBringUpEntry, leafLevel, mappingAt } from './build.js';
import { at, checkJson, SCENARIO, toJson, type Json } from './schema.js';
import { showStatExpect } from './stats.js';
import { BACKING_PAGE, kindOfTag, range, STEP_KINDS, stepKind, type Side, type StepKind } from './steps.js';
import type {
  Mapping,
  MemslotDecl,
  PagingDecl,
  PteAttrs,
  RaceDecl,
  RaceOp,
  Scenario,
  Step,
  StepStats,
  TdpExpect,
} from './types.js';
import { hex } from '../base/units.js';

/** A scenario that cannot be loaded: the message is "<path>: <first error>" and a count of the others. */
export class ScenarioError extends Error {
  constructor(
    readonly source: string,
    readonly errors: readonly string[],
  ) {
    const more = errors.length - 1;
    const first = (errors[0] ?? 'invalid').replace(/\s*\n\s*/g, ' ');
    super(`${source}: ${first}${more > 0 ? ` (and ${more} more error${more === 1 ? '' : 's'})` : ''}`);
    this.name = 'ScenarioError';
  }
}

export type Validation = { ok: true; scenario: Scenario } | { ok: false; errors: string[] };

/**
 * How deep a scenario file may nest arrays and objects. The deepest field of
 * the format (steps[i].expect.ptes[k].value) is 5 levels down; the bound keeps
 * validation, which recurses, from running out of stack on a hostile file.
 */
export const MAX_DEPTH = 64;

/** How deep `json` nests arrays and objects (the top level is 1), counted without recursion. */
export function jsonDepth(json: unknown): number {
  let max = 0;
  const todo: [unknown, number][] = [[json, 1]];
  while (todo.length > 0) {
    const [v, d] = todo.pop()!;
    if (v === null || typeof v !== 'object') continue;
    if (d > max) max = d;
    for (const x of Array.isArray(v) ? v : Object.values(v)) {
      if (x !== null && typeof x === 'object') todo.push([x, d + 1]);
    }
  }
  return max;
}

/** Validates a parsed scenario file: the normalised Scenario, or every error found. */
export function validateScenario(json: unknown): Validation {
  const depth = jsonDepth(json);
  if (depth > MAX_DEPTH) {
    return { ok: false, errors: [`(top level): nests ${depth} levels deep; a scenario nests at most ${MAX_DEPTH}`] };
  }
  const errors: string[] = [];
  const n = checkJson(SCENARIO, json, '', errors);
  if (errors.length > 0 || n === undefined) return { ok: false, errors };
  const s = toScenario(n as Obj, errors);
  if (errors.length > 0) return { ok: false, errors };
  semanticErrors(s, json as Obj, errors);
  return errors.length > 0 ? { ok: false, errors } : { ok: true, scenario: s };
}

/** Parses and validates scenario text; throws ScenarioError. */
export function parseScenario(text: string, source: string): Scenario {
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (e) {
    throw new ScenarioError(source, [`not valid JSON: ${(e as Error).message}`]);
  }
  const v = validateScenario(json);
  if (!v.ok) throw new ScenarioError(source, v.errors);
  return { ...v.scenario, source };
}

/** Reads, parses and validates a scenario file; throws ScenarioError. */
export function loadScenario(path: string): Scenario {
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    const why =
      code === 'ENOENT'
        ? 'no such file'
        : code === 'EISDIR'
          ? 'is a directory'
          : code === 'EACCES'
            ? 'permission denied'
            : (e as Error).message;
    throw new ScenarioError(path, [`cannot read: ${why}`]);
  }
  return parseScenario(text, path);
}

/** Directory of the built-in scenarios (guests/scenarios at the package root). */
export function builtinScenarioDir(): string {
  let dir = dirname(fileURLToPath(import.meta.url));
  for (let i = 0; i < 4; i++) {
    dir = dirname(dir);
    const candidate = join(dir, 'guests', 'scenarios');
    if (existsSync(candidate)) return candidate;
  }
  throw new Error('guests/scenarios not found above the installed module');
}

/** Names of the built-in scenarios, sorted. */
export function builtinScenarios(): string[] {
  return readdirSync(builtinScenarioDir())
    .filter((f) => f.endsWith('.json'))
    .map((f) => f.slice(0, -5))
    .sort();
}

/**
 * A scenario argument as a path: a file path as given, or the name of a
 * built-in scenario. A bare name that is neither throws a ScenarioError
 * listing the built-in names.
 */
export function resolveScenario(arg: string): string {
  if (arg.includes('/') || arg.endsWith('.json') || existsSync(arg)) return arg;
  const builtin = join(builtinScenarioDir(), `${arg}.json`);
  if (existsSync(builtin)) return builtin;
  throw new ScenarioError(arg, [
    `no such file, and no built-in scenario of that name (built-in: ${builtinScenarios().join(', ')})`,
  ]);
}

// ---------------------------------------------------------------------------------
// Normalised JSON -> Scenario, and back.

type Obj = Record<string, unknown>;

function toAttrs(o: Obj): PteAttrs {
  return {
    p: o.p as boolean,
    w: o.w as boolean,
    u: o.u as boolean,
    nx: o.nx as boolean,
    a: o.a as boolean,
    d: (o.d as boolean | undefined) ?? false,
    g: (o.g as boolean | undefined) ?? false,
    pwt: o.pwt as boolean,
    pcd: o.pcd as boolean,
    pkey: (o.pkey as number | undefined) ?? 0,
  };
}

/** A step from its normalised JSON, by the table of step kinds; a tag no kind has is an error at `path`. */
function toStep(o: Obj, path: string, errors: string[]): Step | undefined {
  const side: Side = 'guest' in o ? 'guest' : 'host';
  const tag = o[side] as string;
  const kind = kindOfTag(side, tag);
  if (kind === undefined) {
    errors.push(at(`${path}.${side}`, `no ${side} step kind is called ${JSON.stringify(tag)}`));
    return undefined;
  }
  const step = (STEP_KINDS[kind] as StepKind<Step>).decode(o, side);
  const withStats = o.stats !== undefined ? { ...step, stats: o.stats as StepStats } : step;
  if (o.tdp === undefined) return withStats;
  const tdp = (o.tdp as Obj[]).map((t) => {
    const e: TdpExpect = { gpa: t.gpa as bigint };
    for (const f of ['present', 'level', 'writable', 'executable', 'mmio'] as const)
      if (t[f] !== undefined) (e as unknown as Obj)[f] = t[f];
    return e;
  });
  tdp.forEach((e, k) => {
    if (e.gpa % 0x1000n !== 0n) errors.push(at(`${path}.tdp[${k}].gpa`, `0x${e.gpa.toString(16)} is not 4K aligned`));
    if (e.present === false && Object.keys(e).length > 2)
      errors.push(at(`${path}.tdp[${k}]`, 'a page expected not present has no level or permissions'));
  });
  return { ...withStats, tdp };
}

function toScenario(n: Obj, errors: string[]): Scenario {
  const p = n.paging as Obj;
  const paging: PagingDecl = {
    levels: p.levels as 4 | 5,
    cr0: { ...(p.cr0 as { wp: boolean }) },
    cr4: { ...(p.cr4 as { smep: boolean; smap: boolean; pke: boolean }) },
    efer: { ...(p.efer as { nxe: boolean }) },
    pkru: Number(p.pkru as bigint),
    vendor: p.vendor as PagingDecl['vendor'],
  };
  const mappings: Mapping[] = (n.mappings as Obj[]).map((m) => {
    const page = m.page as Mapping['page'];
    return {
      gva: m.gva as bigint,
      gpa: m.gpa as bigint,
      size: (m.size as bigint | undefined) ?? levelSpan(leafLevel({ page })),
      page,
      leaf: toAttrs(m.leaf as Obj),
      table: toAttrs(m.table as Obj),
      raw: (m.raw as Obj[]).map((r) => ({ level: r.level as number, set: r.set as bigint, clear: r.clear as bigint })),
    };
  });
  return {
    name: n.name as string,
    description: n.description as string,
    arch: 'x86_64',
    vcpus: n.vcpus as number,
    ...(n.race ? { race: toRace(n.race as Obj) } : {}),
    memslots: (n.memslots as Obj[]).map((m) => ({ ...m }) as unknown as MemslotDecl),
    paging,
    mappings,
    steps: (n.steps as Obj[]).flatMap((o, i) => toStep(o, `steps[${i}]`, errors) ?? []),
  };
}

function toRace(r: Obj): RaceDecl {
  return {
    pages: r.pages as number,
    rounds: r.rounds as number,
    cpl: r.cpl as 0 | 3,
    targets: (r.targets as Obj[]).map((t) => ({
      slot: t.slot as number,
      gva: t.gva as bigint,
      host: [...(t.host as RaceOp[])],
    })),
  };
}

function stepJson(s: Step): Obj {
  const o = stepKind(s).encode(s);
  if (s.stats) o.stats = Object.fromEntries(Object.entries(s.stats).map(([k, e]) => [k, showStatExpect(e)]));
  if (s.tdp) o.tdp = s.tdp.map((e) => ({ ...e }));
  return o;
}

/** The JSON form of a scenario, every field written out; validating it gives the scenario back. */
export function scenarioToJson(s: Scenario): Json {
  const table = ({ p, w, u, pwt, pcd, a, nx }: PteAttrs) => ({ p, w, u, pwt, pcd, a, nx });
  const leaf = ({ p, w, u, pwt, pcd, a, d, g, nx, pkey }: PteAttrs) => ({ p, w, u, pwt, pcd, a, d, g, nx, pkey });
  return toJson({
    name: s.name,
    description: s.description,
    arch: s.arch,
    vcpus: s.vcpus,
    memslots: s.memslots,
    paging: { ...s.paging, pkru: BigInt(s.paging.pkru) },
    mappings: s.mappings.map((m) => ({
      gva: m.gva,
      gpa: m.gpa,
      page: m.page,
      size: m.size,
      leaf: leaf(m.leaf),
      table: table(m.table),
      raw: m.raw,
    })),
    steps: s.steps.map(stepJson),
    ...(s.race ? { race: s.race } : {}),
  });
}

// ---------------------------------------------------------------------------------
// Semantic rules.

const overlaps = (a: bigint, as: bigint, b: bigint, bs: bigint) => a < b + bs && b < a + as;
const PHYS_LIMIT = 1n << 52n;
/** The largest user slot: the harness maps a slot's memory as one ArrayBuffer, which V8 limits to 4 GiB in Node 20. */
export const MAX_SLOT_BYTES = 1n << 32n;
const TOP = 1n << 64n;

/** Whether [gva, gva + size) lies in one canonical half for the paging mode. */
function canonicalRange(gva: bigint, size: bigint, levels: 4 | 5): boolean {
  const half = 1n << BigInt(levels === 5 ? 56 : 47);
  const end = gva + size; // exclusive
  return end <= half || (gva >= TOP - half && end <= TOP);
}

function memslotErrors(s: Scenario, err: (path: string, msg: string) => void): void {
  const seen = new Map<number, number>();
  s.memslots.forEach((m, i) => {
    const p = `memslots[${i}]`;
    if (m.slot === 0)
      err(`${p}.slot`, `slot 0 is reserved for bring-up memory [0x0, ${hex(LAYOUT.identityEnd)}); use 1 or above`);
    const j = seen.get(m.slot);
    if (j !== undefined) err(`${p}.slot`, `slot ${m.slot} is already declared by memslots[${j}]`);
    else seen.set(m.slot, i);
    const page = BACKING_PAGE[m.backing];
    if (m.gpa % page !== 0n) err(`${p}.gpa`, `${hex(m.gpa)} is not aligned to the ${m.backing} page size ${hex(page)}`);
    if (m.size === 0n || m.size % page !== 0n)
      err(`${p}.size`, `${hex(m.size)} is not a non-zero multiple of the ${m.backing} page size ${hex(page)}`);
    if (m.size / PAGE_4K > BigInt(MAX_NR_PAGES))
      err(`${p}.size`, `${hex(m.size)} is larger than KVM's limit of ${MAX_NR_PAGES} pages per slot`);
    else if (m.size > MAX_SLOT_BYTES) {
      const most = `${hex(MAX_SLOT_BYTES)} (4 GiB), the most the harness maps for one slot (one ArrayBuffer)`;
      err(`${p}.size`, `${hex(m.size)} is larger than ${most}`);
    }
    if (m.backing === 'guest_memfd' && m.hva)
      err(`${p}.hva`, 'a guest_memfd slot is mapped where mmap puts its file; it takes no "hva" placement');
    if (m.backing === 'guest_memfd' && (m.logDirty || m.readonly))
      err(
        `${p}.${m.logDirty ? 'logDirty' : 'readonly'}`,
        `KVM refuses ${m.logDirty ? 'dirty logging' : 'KVM_MEM_READONLY'} on a guest_memfd slot`,
      );
    if (m.gpa + m.size > PHYS_LIMIT)
      err(`${p}.gpa`, `${range(m.gpa, m.size)} goes beyond 2^52, the largest guest-physical address`);
    if (overlaps(m.gpa, m.size, 0n, LAYOUT.identityEnd))
      err(`${p}.gpa`, `${range(m.gpa, m.size)} overlaps bring-up memory [0x0, ${hex(LAYOUT.identityEnd)}) (slot 0)`);
    s.memslots.slice(0, i).forEach((o, k) => {
      if (overlaps(m.gpa, m.size, o.gpa, o.size))
        err(`${p}.gpa`, `${range(m.gpa, m.size)} overlaps memslots[${k}] ${range(o.gpa, o.size)}`);
    });
    if (m.hva) {
      const mod = m.hva.modulo === '1G' ? 1n << 30n : 1n << 21n;
      if (m.hva.offset % PAGE_4K !== 0n || m.hva.offset >= mod)
        err(`${p}.hva.offset`, `${hex(m.hva.offset)} must be 4K aligned and below ${m.hva.modulo}`);
      if (m.backing === 'hugetlb2m' && m.hva.modulo === '1G')
        err(`${p}.hva.modulo`, 'a hugetlb2m slot is placed modulo 2M only (modulo 1G would take 512 more huge pages)');
    }
    const creates = s.steps.filter((x) => x.side === 'host' && x.kind === 'memslot-create' && x.slot === m.slot);
    if (m.created === 'by-step' && creates.length !== 1)
      err(`${p}.created`, `a slot created by a step needs exactly one memslot-create step for slot ${m.slot}`);
  });
}

/** Table pages the mappings need beyond bring-up's, and the room left in the pool. */
function tablePool(s: Scenario): { need: bigint; room: bigint } {
  const top = s.paging.levels;
  // Each non-leaf entry the scenario creates points to one new table. Count the
  // distinct such entries per level as merged intervals of entry numbers.
  let need = 0n;
  for (let level = 2; level <= top; level++) {
    const shift = BigInt(9 * (level - 1) + 12);
    const spans = s.mappings
      .filter((m) => level > leafLevel(m))
      .map((m) => [m.gva >> shift, (m.gva + m.size - 1n) >> shift] as [bigint, bigint])
      .sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0));
    const bringUpLast = (LAYOUT.identityEnd - 1n) >> shift; // entries 0..bringUpLast are bring-up's
    let lastEnd = -1n;
    for (const [from0, to] of spans) {
      const from = from0 > lastEnd ? from0 : lastEnd + 1n;
      if (from > to) continue;
      lastEnd = to;
      const ownFrom = from > bringUpLast ? from : bringUpLast + 1n;
      if (ownFrom <= to) need += to - ownFrom + 1n;
    }
  }
  // Bring-up's own tables: the root, and one per non-leaf entry covering [0x1000, identityEnd).
  let bringUp = 1n;
  for (let level = 2; level <= top; level++)
    bringUp += ((LAYOUT.identityEnd - 1n) >> BigInt(9 * (level - 1) + 12)) + 1n;
  return { need, room: (LAYOUT.tablePoolEnd - LAYOUT.tablePool) / PAGE_4K - bringUp };
}

function mappingErrors(s: Scenario, json: Obj, err: (path: string, msg: string) => void): void {
  const levels = s.paging.levels;
  const pool = tablePool(s);
  if (pool.need > pool.room)
    err('mappings', `the page tables need ${pool.need} table pages but bring-up's pool has room for ${pool.room}`);
  // Owner and table attributes of each non-leaf entry the scenario creates (only checked when the pool fits, which bounds the count).
  const owners = new Map<string, { index: number; attrs: string }>();
  const jsonMappings = (json.mappings ?? []) as Obj[];

  s.mappings.forEach((m, i) => {
    const p = `mappings[${i}]`;
    const leaf = leafLevel(m);
    const span = levelSpan(leaf);
    const page = m.page;
    let placed = true;
    if (m.gva % span !== 0n) (err(`${p}.gva`, `${hex(m.gva)} is not aligned to ${page} pages`), (placed = false));
    if (m.gpa % span !== 0n) err(`${p}.gpa`, `${hex(m.gpa)} is not aligned to ${page} pages`);
    if (m.size === 0n || m.size % span !== 0n)
      (err(`${p}.size`, `${hex(m.size)} is not a non-zero multiple of ${page}`), (placed = false));
    if (!placed) return;
    if (m.gpa + m.size > PHYS_LIMIT)
      err(`${p}.gpa`, `${range(m.gpa, m.size)} goes beyond 2^52, the largest guest-physical address`);
    if (!canonicalRange(m.gva, m.size, levels)) {
      const half = 1n << BigInt(levels === 5 ? 56 : 47);
      err(
        `${p}.gva`,
        `${range(m.gva, m.size)} is not canonical with ${levels}-level paging (it must lie below ${hex(half)} or at or above ${hex(TOP - half)})`,
      );
      return;
    }
    if (overlaps(m.gva, m.size, 0n, LAYOUT.identityEnd)) {
      err(`${p}.gva`, `${range(m.gva, m.size)} overlaps the bring-up identity map [0x0, ${hex(LAYOUT.identityEnd)})`);
      return;
    }
    if (overlaps(m.gva, m.size, RETURN_GVA, PAGE_4K)) {
      err(
        `${p}.gva`,
        `${range(m.gva, m.size)} covers RETURN_GVA ${hex(RETURN_GVA)}, which must stay unmapped (it is the way back from CPL 3)`,
      );
      return;
    }
    const clash = s.mappings.findIndex((o, k) => k < i && overlaps(m.gva, m.size, o.gva, o.size));
    if (clash >= 0) {
      const o = s.mappings[clash]!;
      err(`${p}.gva`, `${range(m.gva, m.size)} overlaps mappings[${clash}] ${range(o.gva, o.size)}`);
      return;
    }

    m.raw.forEach((r, k) => {
      const rp = `${p}.raw[${k}].level`;
      if (r.level > levels) return err(rp, `there is no level-${r.level} entry with ${levels}-level paging`);
      if (r.level < leaf) return err(rp, `${page} pages have no level-${r.level} entry (their leaf is level ${leaf})`);
      for (const va of [m.gva, m.gva + m.size - 1n]) {
        if (isBringUpEntry(va, r.level))
          return err(
            rp,
            `the level-${r.level} entry for ${hex(va)} is also bring-up's (it maps [0x0, ${hex(LAYOUT.identityEnd)})); it cannot be overridden`,
          );
        if (coversReturnGva(va, r.level))
          return err(
            rp,
            `the level-${r.level} entry for ${hex(va)} also covers RETURN_GVA ${hex(RETURN_GVA)}; it cannot be overridden`,
          );
      }
    });

    const created = (level: number) => !isBringUpEntry(m.gva, level) || !isBringUpEntry(m.gva + m.size - 1n, level);
    let createsAny = false;
    for (let level = leaf + 1; level <= levels; level++) if (created(level)) createsAny = true;
    if (!createsAny && jsonMappings[i]?.table !== undefined) {
      err(
        `${p}.table`,
        "every table entry above this mapping is bring-up's, so these attributes would apply to nothing",
      );
    }
    if (pool.need > pool.room) return;
    const attrs = JSON.stringify(toJson(m.table));
    for (let level = leaf + 1; level <= levels; level++) {
      const lspan = levelSpan(level);
      for (let va = m.gva & ~(lspan - 1n); va < m.gva + m.size; va += lspan) {
        if (isBringUpEntry(va, level)) continue;
        const key = `${level}:${hex(va)}`;
        const owner = owners.get(key);
        if (!owner) owners.set(key, { index: i, attrs });
        else if (owner.attrs !== attrs && owner.index !== i) {
          err(
            `${p}.table`,
            `differs from mappings[${owner.index}].table, and both use the ${LEVEL_NAMES[level]} for ${hex(va)}`,
          );
          return;
        }
      }
    }
  });
}

/** Each step's rules, by the table of step kinds (steps.ts). */
function stepErrors(s: Scenario, json: Obj, err: (path: string, msg: string) => void): void {
  const jsonSteps = (json.steps ?? []) as Obj[];
  s.steps.forEach((st, i) => stepKind(st).validate(st, { s, i, p: `steps[${i}]`, json: jsonSteps[i]!, err }));
}

/**
 * A race needs more than one vCPU and no steps; each target's pages
 * (vcpus x pages) are mapped writable, in order, onto its slot; logging ops
 * need the slot's dirty log, and one slot is not both logged and toggled.
 */
function raceErrors(s: Scenario, err: (path: string, msg: string) => void): void {
  const r = s.race;
  if (!r) {
    if (s.vcpus > 1) err('vcpus', `${s.vcpus} vCPUs need a "race" (steps run on one vCPU)`);
    return;
  }
  if (s.vcpus < 2) err('vcpus', 'a race needs at least 2 vCPUs');
  if (s.steps.length > 0) err('steps', 'a race scenario has no steps');
  const used = new Map<number, number>();
  r.targets.forEach((t, i) => {
    const p = `race.targets[${i}]`;
    const m = s.memslots.find((x) => x.slot === t.slot);
    if (!m) return err(`${p}.slot`, `memslot ${t.slot} is not declared in "memslots"`);
    if (m.hva)
      err(`${p}.slot`, `a race allocates its slots as mmap places them; memslot ${t.slot}'s "hva" is not taken`);
    const k = used.get(t.slot);
    if (k !== undefined) return err(`${p}.slot`, `memslot ${t.slot} is already the slot of race.targets[${k}]`);
    used.set(t.slot, i);
    const n = BigInt(s.vcpus * r.pages);
    if (t.gva % PAGE_4K !== 0n) return err(`${p}.gva`, `${hex(t.gva)} is not 4K aligned`);
    const first = mappingAt(s, t.gva);
    for (let j = 0n; j < n; j++) {
      const va = t.gva + j * PAGE_4K;
      const mm = mappingAt(s, va);
      if (!mm || !mm.leaf.w || !mm.leaf.p || !mm.table.w || mm.raw.length > 0)
        return err(`${p}.gva`, `${hex(va)} is not covered by a present, writable mapping without raw overrides`);
      if (r.cpl === 3 && !(mm.leaf.u && mm.table.u))
        return err(`${p}.gva`, `${hex(va)} is not mapped for user accesses, which a CPL 3 race needs`);
      const gpa = mm.gpa + (va - mm.gva);
      const want = (first ? first.gpa + (t.gva - first.gva) : 0n) + j * PAGE_4K;
      if (gpa !== want || gpa < m.gpa || gpa + PAGE_4K > m.gpa + m.size)
        return err(
          `${p}.gva`,
          `${hex(va)} does not map page ${j} of the target inside memslot ${t.slot} ${range(m.gpa, m.size)}`,
        );
    }
    const ops = new Set(t.host);
    if (ops.has('delete') && t.host.length !== 1)
      err(`${p}.host`, '"delete" takes the slot away for good, so it must be the target\'s only operation');
    if (ops.has('dirty-log') && !m.logDirty)
      err(`${p}.host`, `"dirty-log" needs memslot ${t.slot} declared with "logDirty": true`);
    if (ops.has('dirty-log') && ops.has('toggle-dirty-log'))
      err(
        `${p}.host`,
        '"dirty-log" and "toggle-dirty-log" on one slot would leave the pages logged in a round unknown; use two targets',
      );
  });
}

function semanticErrors(s: Scenario, json: Obj, errors: string[]): void {
  const err = (path: string, msg: string) => void errors.push(at(path, msg));
  memslotErrors(s, err);
  mappingErrors(s, json, err);
  stepErrors(s, json, err);
  raceErrors(s, err);
}

// Scenario step kinds as one table, keyed by the kind (Step['kind']): for each
// kind its JSON variants (tag, doc, fields: schema.ts builds the "step" spec,
// the JSON Schema and the docs from them), decode (normalised JSON -> Step),
// encode (Step -> JSON) and the semantic rules of validate. What running a
// step does is in the table of the same shape in src/run/step-actions.ts,
// kept apart so that this room stays free of the KVM binding (the `walk`
// command and the docs load scenarios without a VM).
//
// StepKindTable maps every kind of the Step union to its entry, so a kind
// added to the union without an entry does not compile (the shape of zx's
// LogFormatters). A JSON tag with no entry is an error naming the field.
import { LAYOUT, RETURN_GVA } from '../arch/x86/layout.js';
import { PAGE_4K } from '../arch/x86/pte.js';
import { coversReturnGva, isBringUpEntry, leafLevel, mappingAt } from './build.js';
import { array, bool, int, object, oneOf, opt, req, u64, type Field } from './spec.js';
import type { AccessExpect, MemslotDecl, PteWriteStep, Scenario, Step } from './types.js';
import { hex } from '../base/units.js';

type Obj = Record<string, unknown>;
export type Side = Step['side'];

/** One JSON form of a step: `{ "<side>": "<tag>", ...fields }`. */
export interface StepVariant {
  side: Side;
  tag: string;
  doc: string;
  /** The fields besides the tag and "stats", in the order the docs list them. */
  fields: Record<string, Field>;
}

/** Everything the scenario room knows about one step kind. */
export interface StepKind<S> {
  variants: readonly StepVariant[];
  /** The step from its normalised JSON (schema-checked, defaults filled in); `stats` is added by the caller. */
  decode(o: Obj, side: Side): S;
  /** The JSON form, tag first; validating it gives the step back. */
  encode(s: S): Obj;
  /** The semantic rules of this kind (run once the file has the right shape). */
  validate(s: S, c: StepCheck): void;
}

/** One entry per kind of the union `U`: a kind without its entry does not compile. */
export type StepKindTable<U extends { kind: string } = Step> = { [K in U['kind']]: StepKind<Extract<U, { kind: K }>> };

/** What validate sees besides the step. */
export interface StepCheck {
  /** The whole scenario: the steps before this one say what state the slots are in. */
  s: Scenario;
  /** Index of the step in s.steps. */
  i: number;
  /** JSON path of the step, e.g. "steps[3]". */
  p: string;
  /** The step as the file gave it (before defaults), for rules about which fields were given. */
  json: Obj;
  err(path: string, msg: string): void;
}

export const range = (from: bigint, size: bigint) => `[${hex(from)}, ${hex(from + size)})`;

/** The unit of a slot's host memory operations: its backing's page (THP slots are 4K mappings). */
export const BACKING_PAGE: Record<MemslotDecl['backing'], bigint> = {
  anon: PAGE_4K,
  shared: PAGE_4K,
  memfd: PAGE_4K,
  thp: PAGE_4K,
  hugetlb2m: 1n << 21n,
  hugetlb1g: 1n << 30n,
  guest_memfd: PAGE_4K,
};

// ---------------------------------------------------------------------------------
// Fields.

export const LEVEL = int(1, 5, 'Entry level: 1 = PTE, 2 = PDE, 3 = PDPTE, 4 = PML4E, 5 = PML5E.');
const GVA = req(u64('Guest-virtual address.'));
const CPL = opt(oneOf([0, 3], 'Privilege level of the access.'), 0);
const EFLAGS_AC = opt(
  bool(
    'EFLAGS.AC during the access: at CPL 0 the SMAP override for data accesses; at CPL 3, and for fetches, it changes no paging rule (CR0.AM is 0, so it raises no alignment check either).',
  ),
  false,
);
const SIZE = opt(oneOf([1, 2, 4, 8], 'Bytes accessed; the access must not cross a 4K page boundary.'), 8);
const COUNT = opt(
  int(
    1,
    4096,
    'Times the access is made, at gva, gva + stride, ... in one guest loop; the loop stops at the first fault. A read loop compares the sum (mod 2^64) of the values read.',
  ),
  1,
);
const STRIDE = opt(u64("Bytes between the loop's accesses (with `count` above 1)."), '0x1000');
const FAULT = opt({ kind: 'fault', doc: 'false: no fault; a number: #PF with this error code.' });
const PTES = opt(
  array(
    object('expected pte', 'An entry value after the step.', {
      level: req(LEVEL),
      value: req(u64('Expected 64-bit entry value.')),
    }),
    'Entry values after the step, by level.',
  ),
);
const USER_SLOT = req(int(1, 32767, 'Slot number (a declared user slot).'));

const expectOf = (name: string, fields: Record<string, Field>) =>
  opt(object(name, "Expectations that replace the model's prediction where given.", fields));

const guest = (tag: string, doc: string, fields: Record<string, Field>): StepVariant => ({
  side: 'guest',
  tag,
  doc,
  fields,
});
const host = (tag: string, doc: string, fields: Record<string, Field>): StepVariant => ({
  side: 'host',
  tag,
  doc,
  fields,
});

const PTE_CHANGE = {
  gva: GVA,
  level: req(LEVEL),
  set: opt(u64('Bits to set.')),
  clear: opt(u64('Bits to clear.')),
  value: opt(u64('New entry value; exclusive with set and clear.')),
};
const HOST_RANGE = {
  slot: USER_SLOT,
  offset: req(u64('Byte offset in the slot (aligned to the backing page size).')),
  size: req(u64('Bytes (a multiple of the backing page size).')),
};

// ---------------------------------------------------------------------------------
// Decoding helpers.

function toExpect(o: Obj | undefined): AccessExpect | undefined {
  if (!o) return undefined;
  const e: AccessExpect = {};
  if (o.fault !== undefined) e.fault = o.fault === false ? false : Number(o.fault as bigint);
  if (o.value !== undefined) e.value = o.value as bigint;
  if (o.ptes !== undefined)
    e.ptes = (o.ptes as Obj[]).map((p) => ({ level: p.level as number, value: p.value as bigint }));
  return e;
}

function expectJson(e: AccessExpect | undefined, withValue: boolean): Obj | undefined {
  if (!e) return undefined;
  return {
    ...(e.fault !== undefined ? { fault: e.fault === false ? false : BigInt(e.fault) } : {}),
    ...(withValue && e.value !== undefined ? { value: e.value } : {}),
    ...(e.ptes ? { ptes: e.ptes } : {}),
  };
}

function pteWrite(o: Obj): PteWriteStep {
  return {
    kind: 'write-pte',
    gva: o.gva as bigint,
    level: o.level as number,
    set: (o.set as bigint | undefined) ?? 0n,
    clear: (o.clear as bigint | undefined) ?? 0n,
    ...(o.value !== undefined ? { value: o.value as bigint } : {}),
  };
}

// ---------------------------------------------------------------------------------
// Rules shared by several kinds.

function pageName(level: number): string {
  return level === 3 ? '1G' : level === 2 ? '2M' : '4K';
}

/**
 * Checks that the entry at `level` for `gva` is one the scenario knows (a
 * mapping covers gva and the level is between its leaf and the root);
 * `write` also refuses bring-up's entries and the one covering RETURN_GVA.
 */
function entryError(s: Scenario, gva: bigint, level: number, write: boolean): string | undefined {
  if (level > s.paging.levels) return `there is no level-${level} entry with ${s.paging.levels}-level paging`;
  const m = mappingAt(s, gva);
  if (!m) return `no mapping covers ${hex(gva)}, so its level-${level} entry is not known`;
  const leaf = leafLevel(m);
  if (level < leaf) return `${hex(gva)} is mapped by ${pageName(leaf)} pages, which have no level-${level} entry`;
  if (write && isBringUpEntry(gva, level))
    return `the level-${level} entry for ${hex(gva)} is bring-up's; it cannot be written`;
  if (write && coversReturnGva(gva, level))
    return `the level-${level} entry for ${hex(gva)} also covers RETURN_GVA ${hex(RETURN_GVA)}; it cannot be written`;
  return undefined;
}

/** Why the slot cannot be asked for its dirty log at this step; logging follows memslot-flags steps. */
function logSlotError(c: StepCheck, slot: number): string | undefined {
  if (slot === 0) return 'slot 0 is bring-up memory, which does not log dirty pages';
  const m = c.s.memslots.find((x) => x.slot === slot);
  if (!m) return `memslot ${slot} is not declared in "memslots"`;
  let logging = m.logDirty;
  for (const x of c.s.steps.slice(0, c.i))
    if (x.side === 'host' && x.kind === 'memslot-flags' && x.slot === slot) logging = x.logDirty;
  const state = slotState(c.s, c.i, slot);
  if (state !== 'live')
    return `memslot ${slot} is ${state === 'deleted' ? 'deleted by an earlier step' : 'not created yet (memslot-create)'}`;
  if (!logging)
    return `memslot ${slot} does not log dirty pages here (set "logDirty": true, or turn it on with a memslot-flags step)`;
  return undefined;
}

/** Whether a declared slot is in KVM when step `i` runs: not yet created (by a step), live, or deleted. */
export function slotState(s: Scenario, i: number, slot: number): 'absent' | 'live' | 'deleted' {
  const m = s.memslots.find((x) => x.slot === slot);
  if (!m) return 'absent';
  let state: 'absent' | 'live' | 'deleted' = m.created === 'by-step' ? 'absent' : 'live';
  for (const x of s.steps.slice(0, i)) {
    if (x.side !== 'host' || !('slot' in x) || x.slot !== slot) continue;
    if (x.kind === 'memslot-create') state = 'live';
    if (x.kind === 'memslot-delete') state = 'deleted';
  }
  return state;
}

/** The declared user slot a host memory step names, or undefined after reporting why there is none here. */
/** Whether an earlier close-guest-memfd step closed `slot`'s file (an error then). */
function closedBefore(c: StepCheck, slot: number): boolean {
  const closed = c.s.steps
    .slice(0, c.i)
    .some((x) => x.side === 'host' && x.kind === 'close-guest-memfd' && x.slot === slot);
  if (closed) c.err(`${c.p}`, `memslot ${slot}'s guest_memfd was closed by an earlier step`);
  return closed;
}

/** The declared user slot that holds all of [gpa, gpa+size), or an error naming the field. */
function slotHolding(c: StepCheck, gpa: bigint, size: bigint): MemslotDecl | undefined {
  const m = c.s.memslots.find((x) => gpa >= x.gpa && gpa < x.gpa + x.size);
  if (!m) return void c.err(`${c.p}.gpa`, `${hex(gpa)} is not inside a declared user memslot`);
  if (gpa + size > m.gpa + m.size)
    return void c.err(
      `${c.p}.size`,
      `${range(gpa, size)} runs past the end of memslot ${m.slot} ${range(m.gpa, m.size)}`,
    );
  return m;
}

/** A host access of the slot's memory: inside one page of a live slot whose memory is still mapped. */
function hostAccessErrors(c: StepCheck, st: { gpa: bigint; size: number }): void {
  if ((st.gpa & (PAGE_4K - 1n)) + BigInt(st.size) > PAGE_4K)
    return c.err(`${c.p}.gpa`, `${range(st.gpa, BigInt(st.size))} crosses a 4K page boundary`);
  const m = slotHolding(c, st.gpa, BigInt(st.size));
  if (!m || !liveSlot(c, m.slot) || closedBefore(c, m.slot)) return;
  const off = st.gpa - m.gpa;
  if (unmappedBy(c.s.steps.slice(0, c.i), m.slot, off & ~(PAGE_4K - 1n), PAGE_4K).length)
    c.err(`${c.p}.gpa`, `memslot ${m.slot}'s memory at ${hex(st.gpa)} was unmapped by an earlier munmap step`);
}

function liveSlot(c: StepCheck, slot: number): MemslotDecl | undefined {
  const m = c.s.memslots.find((x) => x.slot === slot);
  if (!m) return void c.err(`${c.p}.slot`, `memslot ${slot} is not declared in "memslots"`);
  const state = slotState(c.s, c.i, slot);
  if (state === 'deleted') return void c.err(`${c.p}.slot`, `memslot ${slot} was deleted by an earlier step`);
  if (state === 'absent')
    return void c.err(`${c.p}.slot`, `memslot ${slot} is created by a later memslot-create step; it is not in KVM yet`);
  return m;
}

/** The live slot that holds all of [gpa, gpa+size) at step `c.i`, or undefined after reporting why there is none. */
function liveSlotAt(c: StepCheck, gpa: bigint, size: bigint): MemslotDecl | undefined {
  const m = c.s.memslots.find((x) => gpa >= x.gpa && gpa < x.gpa + x.size && !c.s.steps.slice(0, c.i).some(moves(x)));
  if (!m) return void c.err(`${c.p}.gpa`, `${hex(gpa)} is not inside a declared user memslot (at its declared GPA)`);
  if (gpa + size > m.gpa + m.size)
    return void c.err(
      `${c.p}.size`,
      `${range(gpa, size)} runs past the end of memslot ${m.slot} ${range(m.gpa, m.size)}`,
    );
  return liveSlot(c, m.slot);
}

const moves = (m: MemslotDecl) => (x: Step) => x.side === 'host' && x.kind === 'memslot-move' && x.slot === m.slot;

/**
 * The parts of [offset, offset+size) of a slot's memory that `steps` leave
 * unmapped (munmap takes a range away, remap gives it back), as sorted,
 * disjoint [from, to) intervals. Kept as intervals, not pages: a size comes
 * from the file and may be anything up to 2^64 (even in a step already
 * rejected for it).
 */
function unmappedBy(steps: readonly Step[], slot: number, offset: bigint, size: bigint): [bigint, bigint][] {
  let gone: [bigint, bigint][] = [];
  for (const x of steps) {
    if (x.side !== 'host' || (x.kind !== 'munmap' && x.kind !== 'remap') || x.slot !== slot) continue;
    const [from, to] = [x.offset, x.offset + x.size];
    const kept: [bigint, bigint][] = [];
    for (const [a, b] of gone) {
      if (b <= from || a >= to) kept.push([a, b]);
      else {
        if (a < from) kept.push([a, from]);
        if (b > to) kept.push([to, b]);
      }
    }
    if (x.kind === 'munmap') kept.push([from, to]);
    gone = kept.sort((p, q) => (p[0] < q[0] ? -1 : p[0] > q[0] ? 1 : 0));
  }
  const end = offset + size;
  return gone.filter(([a, b]) => a < end && b > offset).map(([a, b]) => [a > offset ? a : offset, b < end ? b : end]);
}

/** The rules of madvise, munmap, remap and mprotect: a range of a live slot's memory, mapped unless remapped. */
type HostRangeStep = {
  kind: 'madvise' | 'munmap' | 'remap' | 'mprotect' | 'punch-hole';
  slot: number;
  offset: bigint;
  size: bigint;
};

function hostRangeErrors(c: StepCheck, st: HostRangeStep): void {
  const m = liveSlot(c, st.slot);
  if (!m) return;
  const p = c.p;
  if (st.kind === 'punch-hole' && m.backing !== 'memfd' && m.backing !== 'guest_memfd')
    return c.err(
      `${p}.slot`,
      `memslot ${st.slot} is ${m.backing} memory; punch-hole needs a memfd or guest_memfd slot`,
    );
  if (st.kind !== 'punch-hole' && m.backing === 'guest_memfd')
    return c.err(
      `${p}.slot`,
      `memslot ${st.slot} is a guest_memfd slot; of the host range steps only punch-hole applies`,
    );
  if (closedBefore(c, st.slot)) return;
  const unit = st.kind === 'madvise' ? PAGE_4K : BACKING_PAGE[m.backing];
  const what = unit === PAGE_4K ? '4K' : `${m.backing} page (${hex(unit)})`;
  if (st.offset % unit !== 0n || st.size % unit !== 0n || st.size === 0n)
    return c.err(p, `offset and size must be ${what} aligned and size non-zero`);
  if (st.offset + st.size > m.size)
    return c.err(
      `${p}.size`,
      `${hex(st.offset)}+${hex(st.size)} runs past the end of memslot ${st.slot} (${hex(m.size)} bytes)`,
    );
  // Pages of the range that an earlier munmap took away (and no remap gave back).
  const unmapped = unmappedBy(c.s.steps.slice(0, c.i), st.slot, st.offset, st.size);
  const bytes = unmapped.reduce((n, [a, b]) => n + (b - a), 0n);
  if (st.kind === 'remap' && bytes !== st.size) {
    c.err(
      p,
      `remap needs the whole range unmapped by earlier munmap steps; ${hex(st.offset)}+${hex(st.size)} of memslot ${st.slot} is not`,
    );
  }
  if (st.kind !== 'remap' && unmapped.length > 0) {
    c.err(
      p,
      `memslot ${st.slot}'s memory at offset ${hex(unmapped[0]![0])} was unmapped by an earlier munmap step (remap it first)`,
    );
  }
}

/** A kind whose step is a range of a slot's host memory and nothing more (munmap, remap). */
function rangeKind<S extends Extract<Step, { kind: 'munmap' | 'remap' }>>(kind: S['kind'], doc: string): StepKind<S> {
  return {
    variants: [host(kind, doc, HOST_RANGE)],
    decode: (o) =>
      ({ side: 'host', kind, slot: o.slot as number, offset: o.offset as bigint, size: o.size as bigint }) as S,
    encode: (s) => ({ host: s.kind, slot: s.slot, offset: s.offset, size: s.size }),
    validate: (st, c) => hostRangeErrors(c, st),
  };
}

const fits = (size: number) => `${size} byte${size > 1 ? 's' : ''}`;

/**
 * Why an access at `gva` would touch what the harness reserves: RETURN_GVA's
 * page (a fetch fault at RETURN_GVA is taken for the return from CPL 3, so an
 * exec there at CPL 0 shuts the guest down), or, for writes and execs (the
 * engine stores a `ret` at an exec's target), bring-up memory: the identity
 * map, or a mapping onto its GPAs.
 */
function reservedAccess(s: Scenario, st: { access: 'read' | 'write' | 'exec'; gva: bigint }): string | undefined {
  if ((st.gva & ~(PAGE_4K - 1n)) === RETURN_GVA) {
    return (
      `${hex(st.gva)} is in the page of the harness's RETURN_GVA ${hex(RETURN_GVA)}, which stays unmapped ` +
      'as the way back from CPL 3 (a fault there is taken for that return); use another address'
    );
  }
  if (st.access === 'read') return undefined;
  const bringUp =
    `bring-up memory [0x0, ${hex(LAYOUT.identityEnd)}) ` +
    "(the guest's descriptor tables, handlers, stacks, code and page tables), which a step may read but not " +
    (st.access === 'write' ? 'write' : 'execute');
  if (st.gva < LAYOUT.identityEnd) return `${hex(st.gva)} is in ${bringUp}`;
  const m = mappingAt(s, st.gva);
  const gpa = m ? m.gpa + (st.gva - m.gva) : undefined;
  if (gpa !== undefined && gpa < LAYOUT.identityEnd) return `${hex(st.gva)} is mapped to ${hex(gpa)}, in ${bringUp}`;
  return undefined;
}

/** The rules of a loop: every access of it is one a plain step could make; the model predicts all, so no expect. */
function loopErrors(
  st: Extract<Step, { kind: 'access' }>,
  loop: { count: number; stride: bigint },
  c: StepCheck,
): void {
  const p = c.p;
  if (st.implicit) return c.err(`${p}.count`, 'an implicit read is not made in a loop');
  if (st.expect) return c.err(`${p}.expect`, 'a loop is compared with the model only; give no "expect"');
  if (loop.stride === 0n || loop.stride % BigInt(st.size) !== 0n)
    return c.err(`${p}.stride`, `the stride must be a non-zero multiple of the access size (${st.size})`);
  if (st.access === 'write' && st.value >= 1n << BigInt(8 * st.size))
    return c.err(`${p}.value`, `${hex(st.value)} does not fit in ${fits(st.size)}`);
  for (let k = 0; k < loop.count; k++) {
    const gva = st.gva + BigInt(k) * loop.stride;
    if (gva >= 1n << 64n) return c.err(`${p}.count`, `access ${k} of the loop runs past the end of the address space`);
    const why = reservedAccess(c.s, { access: st.access, gva });
    if (why) return c.err(`${p}.gva`, `access ${k} of the loop: ${why}`);
    if (st.access !== 'exec' && (gva & 0xfffn) + BigInt(st.size) > PAGE_4K)
      return c.err(`${p}.gva`, `access ${k} of the loop, at ${hex(gva)}, crosses a 4K page boundary`);
  }
}

// ---------------------------------------------------------------------------------
// The table. Its order is the order of the variants in the schema and the docs
// (guest variants first, then host variants, each in table order).

export const STEP_KINDS: StepKindTable = {
  access: {
    variants: [
      guest('read', 'A load of `size` bytes from `gva`.', {
        gva: GVA,
        size: SIZE,
        cpl: CPL,
        eflagsAc: EFLAGS_AC,
        count: COUNT,
        stride: STRIDE,
        implicit: opt(
          bool(
            'An implicit supervisor read instead of a load: the guest loads FS from an LDT whose only ' +
              'descriptor is at `gva` (the engine writes a data descriptor there). SMAP applies whatever EFLAGS.AC is. ' +
              'CPL 0, size 8, `gva` 8-aligned; no value is compared.',
          ),
          false,
        ),
        expect: expectOf('read expect', {
          fault: FAULT,
          value: opt(u64('Value read (little-endian, `size` bytes).')),
          ptes: PTES,
        }),
      }),
      guest('write', 'A store of `value` (`size` bytes) to `gva`.', {
        gva: GVA,
        size: SIZE,
        cpl: CPL,
        value: opt(u64('Value stored; must fit in `size` bytes.'), '0x0'),
        eflagsAc: EFLAGS_AC,
        count: COUNT,
        stride: STRIDE,
        expect: expectOf('write expect', { fault: FAULT, ptes: PTES }),
      }),
      guest('exec', 'A call to `gva` (the engine puts a `ret` there when memory backs it).', {
        gva: GVA,
        cpl: CPL,
        eflagsAc: EFLAGS_AC,
        count: COUNT,
        stride: STRIDE,
        expect: expectOf('exec expect', { fault: FAULT, ptes: PTES }),
      }),
    ],
    decode(o) {
      const g = o.guest as 'read' | 'write' | 'exec';
      const expect = toExpect(o.expect as Obj | undefined);
      return {
        side: 'guest',
        kind: 'access',
        access: g,
        gva: o.gva as bigint,
        size: g === 'exec' ? 1 : (o.size as 1 | 2 | 4 | 8),
        cpl: o.cpl as 0 | 3,
        value: g === 'write' ? (o.value as bigint) : 0n,
        eflagsAc: o.eflagsAc as boolean,
        ...(o.implicit === true ? { implicit: true } : {}),
        ...((o.count as number) > 1 ? { loop: { count: o.count as number, stride: o.stride as bigint } } : {}),
        ...(expect ? { expect } : {}),
      };
    },
    encode(s) {
      const { access, gva, size, cpl, value, eflagsAc } = s;
      const loop = s.loop ? { count: s.loop.count, stride: s.loop.stride } : {};
      if (access === 'exec') return { guest: access, gva, cpl, eflagsAc, ...loop, expect: expectJson(s.expect, false) };
      const expect = expectJson(s.expect, access === 'read');
      const implicit = s.implicit ? { implicit: true } : {};
      const v = access === 'write' ? { value } : {};
      return { guest: access, gva, size, cpl, ...v, eflagsAc, ...loop, ...implicit, expect };
    },
    validate(st, c) {
      const p = c.p;
      if (st.loop) return loopErrors(st, st.loop, c);
      if (c.json.stride !== undefined) c.err(`${p}.stride`, 'a stride needs "count" above 1');
      const reserved = reservedAccess(c.s, st);
      if (reserved) c.err(`${p}.gva`, reserved);
      if (st.access !== 'exec') {
        const off = st.gva & 0xfffn;
        if (off + BigInt(st.size) > PAGE_4K)
          c.err(
            `${p}.gva`,
            `${st.size === 8 ? 'an' : 'a'} ${st.size}-byte access at ${hex(st.gva)} crosses a 4K page boundary; split it into two steps`,
          );
        const limit = 1n << BigInt(8 * st.size);
        if (st.access === 'write' && st.value >= limit)
          c.err(`${p}.value`, `${hex(st.value)} does not fit in ${fits(st.size)}`);
        if (st.expect?.value !== undefined && st.expect.value >= limit)
          c.err(`${p}.expect.value`, `${hex(st.expect.value)} does not fit in ${fits(st.size)}`);
      }
      if (st.implicit) {
        if (st.cpl !== 0) c.err(`${p}.cpl`, 'an implicit read is made at CPL 0 (the LDT is loaded there)');
        if (st.size !== 8) c.err(`${p}.size`, 'an implicit read loads one 8-byte descriptor: size must be 8');
        if (st.gva % 8n !== 0n) c.err(`${p}.gva`, `an implicit read's descriptor at ${hex(st.gva)} must be 8-aligned`);
        if (st.expect?.value !== undefined) c.err(`${p}.expect.value`, 'an implicit read returns no value');
      }
      st.expect?.ptes?.forEach((e, k) => {
        const why = entryError(c.s, st.gva, e.level, false);
        if (why) c.err(`${p}.expect.ptes[${k}].level`, why);
      });
    },
  },
  invlpg: {
    variants: [guest('invlpg', 'INVLPG of `gva`.', { gva: GVA })],
    decode: (o) => ({ side: 'guest', kind: 'invlpg', gva: o.gva as bigint }),
    encode: (s) => ({ guest: 'invlpg', gva: s.gva }),
    validate() {},
  },
  'reload-cr3': {
    variants: [guest('reload-cr3', 'MOV CR3 with its own value: flushes non-global TLB entries.', {})],
    decode: () => ({ side: 'guest', kind: 'reload-cr3' }),
    encode: () => ({ guest: 'reload-cr3' }),
    validate() {},
  },
  'set-cr0-wp': {
    variants: [guest('set-cr0-wp', 'Sets or clears CR0.WP.', { value: req(bool('New CR0.WP.')) })],
    decode: (o) => ({ side: 'guest', kind: 'set-cr0-wp', value: o.value as boolean }),
    encode: (s) => ({ guest: 'set-cr0-wp', value: s.value }),
    validate() {},
  },
  'set-cr4': {
    variants: [
      guest('set-cr4', 'Sets or clears one CR4 bit.', {
        bit: req(oneOf(['smep', 'smap', 'pke'], 'Which bit.')),
        value: req(bool('New value of the bit.')),
      }),
    ],
    decode: (o) => ({
      side: 'guest',
      kind: 'set-cr4',
      bit: o.bit as 'smep' | 'smap' | 'pke',
      value: o.value as boolean,
    }),
    encode: (s) => ({ guest: 'set-cr4', bit: s.bit, value: s.value }),
    validate() {},
  },
  // Page-table edits are steps of either side: by the guest's own stores, or by the VMM.
  'write-pte': {
    variants: [
      guest(
        'write-pte',
        'The guest rewrites the entry at `level` for `gva` with a store through the identity map (so a shadow MMU sees the write): `value` replaces it, else (old & ~clear) | set.',
        PTE_CHANGE,
      ),
      host(
        'write-pte',
        'The VMM writes the entry at `level` for `gva` (a shadow MMU does not see this write): `value` replaces it, else (old & ~clear) | set.',
        PTE_CHANGE,
      ),
    ],
    decode: (o, side) => ({ side, ...pteWrite(o) }),
    encode(s) {
      const body =
        s.value !== undefined
          ? { gva: s.gva, level: s.level, value: s.value }
          : { gva: s.gva, level: s.level, set: s.set, clear: s.clear };
      return { [s.side]: s.kind, ...body };
    },
    validate(st, c) {
      const j = c.json;
      if (j.value !== undefined && (j.set !== undefined || j.clear !== undefined))
        c.err(`${c.p}.value`, 'give either "value" or "set"/"clear", not both');
      if (j.value === undefined && j.set === undefined && j.clear === undefined)
        c.err(c.p, 'write-pte needs "set", "clear" or "value"');
      const why = entryError(c.s, st.gva, st.level, true);
      if (why) c.err(`${c.p}.level`, why);
    },
  },
  'clear-ad': {
    variants: [
      guest(
        'clear-ad',
        'The guest clears A and D in every entry the walk of `gva` reads, with stores through the identity map.',
        { gva: GVA },
      ),
      host('clear-ad', 'Clears A and D in every entry the walk of `gva` reads.', { gva: GVA }),
    ],
    decode: (o, side) => ({ side, kind: 'clear-ad', gva: o.gva as bigint }),
    encode: (s) => ({ [s.side]: s.kind, gva: s.gva }),
    validate(st, c) {
      if (!mappingAt(c.s, st.gva))
        c.err(`${c.p}.gva`, `no mapping covers ${hex(st.gva)}; clear-ad works on a mapping's entries`);
    },
  },
  'get-dirty-log': {
    variants: [
      host('get-dirty-log', "KVM_GET_DIRTY_LOG of a user slot; compared with `expect`, else with the model's pages.", {
        slot: req(int(0, 32767, 'Slot number.')),
        expect: opt(
          array(
            u64('GPA of a page expected dirty.'),
            'GPAs of the pages expected dirty (4K aligned, inside the slot).',
          ),
        ),
      }),
    ],
    decode: (o) => ({
      side: 'host',
      kind: 'get-dirty-log',
      slot: o.slot as number,
      ...(o.expect !== undefined ? { expect: o.expect as bigint[] } : {}),
    }),
    encode: (s) => ({ host: s.kind, slot: s.slot, expect: s.expect }),
    validate(st, c) {
      const why = logSlotError(c, st.slot);
      if (why) return c.err(`${c.p}.slot`, why);
      const m = c.s.memslots.find((x) => x.slot === st.slot)!;
      st.expect?.forEach((gpa, k) => {
        if (gpa % PAGE_4K !== 0n) c.err(`${c.p}.expect[${k}]`, `${hex(gpa)} is not 4K aligned`);
        else if (gpa < m.gpa || gpa >= m.gpa + m.size)
          c.err(`${c.p}.expect[${k}]`, `${hex(gpa)} is not inside memslot ${m.slot} ${range(m.gpa, m.size)}`);
      });
    },
  },
  'clear-dirty-log': {
    variants: [
      host('clear-dirty-log', 'KVM_CLEAR_DIRTY_LOG of the whole slot.', { slot: req(int(0, 32767, 'Slot number.')) }),
    ],
    decode: (o) => ({ side: 'host', kind: 'clear-dirty-log', slot: o.slot as number }),
    encode: (s) => ({ host: s.kind, slot: s.slot }),
    validate(st, c) {
      const why = logSlotError(c, st.slot);
      if (why) c.err(`${c.p}.slot`, why);
    },
  },
  'memslot-delete': {
    variants: [
      host(
        'memslot-delete',
        'Deletes a user memslot (KVM_SET_USER_MEMORY_REGION with size 0) and frees its host memory; guest accesses to its GPAs then exit as MMIO.',
        {
          slot: USER_SLOT,
        },
      ),
    ],
    decode: (o) => ({ side: 'host', kind: 'memslot-delete', slot: o.slot as number }),
    encode: (s) => ({ host: s.kind, slot: s.slot }),
    validate(st, c) {
      liveSlot(c, st.slot);
    },
  },
  'memslot-create': {
    variants: [
      host(
        'memslot-create',
        'Allocates the host memory of a slot declared `"created": "by-step"` and hands the slot to KVM (KVM_SET_USER_MEMORY_REGION) while the guest runs, over GPAs the guest may already have touched: accesses there exited as MMIO before and reach the memory after.',
        { slot: USER_SLOT },
      ),
    ],
    decode: (o) => ({ side: 'host', kind: 'memslot-create', slot: o.slot as number }),
    encode: (s) => ({ host: s.kind, slot: s.slot }),
    validate(st, c) {
      const m = c.s.memslots.find((x) => x.slot === st.slot);
      if (!m) return c.err(`${c.p}.slot`, `memslot ${st.slot} is not declared in "memslots"`);
      if (m.created !== 'by-step')
        return c.err(`${c.p}.slot`, `memslot ${st.slot} is created at the start; declare it "created": "by-step"`);
      const clash = c.s.memslots.find(
        (x) =>
          x.slot !== st.slot &&
          slotState(c.s, c.i, x.slot) === 'live' &&
          x.gpa < m.gpa + m.size &&
          m.gpa < x.gpa + x.size,
      );
      if (clash)
        c.err(`${c.p}.slot`, `memslot ${st.slot} ${range(m.gpa, m.size)} would overlap live memslot ${clash.slot}`);
    },
  },
  'write-memory': {
    variants: [
      host(
        'write-memory',
        "The host writes `value` (8 bytes, little-endian) to every 8-byte word of [gpa, gpa+size) through the slot's HVA, as a VMM filling guest memory does: KVM does not log these pages dirty, and a guest read then sees the value.",
        {
          gpa: req(u64('First guest-physical address (8-byte aligned, inside one user memslot).')),
          size: req(u64('Bytes (a non-zero multiple of 8).')),
          value: req(u64('The 8-byte value written to every word.')),
        },
      ),
    ],
    decode: (o) => ({
      side: 'host',
      kind: 'write-memory',
      gpa: o.gpa as bigint,
      size: o.size as bigint,
      value: o.value as bigint,
    }),
    encode: (s) => ({ host: s.kind, gpa: s.gpa, size: s.size, value: s.value }),
    validate(st, c) {
      if (st.gpa % 8n !== 0n || st.size % 8n !== 0n || st.size === 0n)
        return c.err(c.p, 'gpa must be 8-byte aligned and size a non-zero multiple of 8');
      const m = liveSlotAt(c, st.gpa, st.size);
      if (!m || closedBefore(c, m.slot)) return;
      const off = st.gpa - m.gpa;
      const page = (off / PAGE_4K) * PAGE_4K;
      const gone = unmappedBy(
        c.s.steps.slice(0, c.i),
        m.slot,
        page,
        ((off + st.size - page + 0xfffn) / PAGE_4K) * PAGE_4K,
      );
      if (gone.length)
        c.err(c.p, `memslot ${m.slot}'s memory at offset ${hex(gone[0]![0])} was unmapped by an earlier munmap step`);
    },
  },
  'memslot-move': {
    variants: [
      host(
        'memslot-move',
        "Moves a user memslot to a new GPA, keeping its host memory; the guest's tables still hold the old GPAs.",
        {
          slot: USER_SLOT,
          gpa: req(u64('New guest-physical base (4K aligned, outside [0, 0x400000)).')),
        },
      ),
    ],
    decode: (o) => ({ side: 'host', kind: 'memslot-move', slot: o.slot as number, gpa: o.gpa as bigint }),
    encode: (s) => ({ host: s.kind, slot: s.slot, gpa: s.gpa }),
    validate(st, c) {
      const m = liveSlot(c, st.slot);
      if (!m) return;
      const p = c.p;
      if (m.backing === 'guest_memfd')
        return c.err(`${p}.slot`, `a guest_memfd slot cannot move (KVM: such slots are immutable); delete it instead`);
      if (st.gpa % PAGE_4K !== 0n) c.err(`${p}.gpa`, `${hex(st.gpa)} is not 4K aligned`);
      else if (st.gpa < 0x400000n) c.err(`${p}.gpa`, `${hex(st.gpa)} is inside bring-up memory [0x0, 0x400000)`);
      else {
        const clash = c.s.memslots.find(
          (x) => x.slot !== st.slot && st.gpa < x.gpa + x.size && x.gpa < st.gpa + m.size,
        );
        if (clash)
          c.err(
            `${p}.gpa`,
            `memslot ${st.slot} moved to ${range(st.gpa, m.size)} would overlap memslot ${clash.slot} ${range(clash.gpa, clash.size)}`,
          );
      }
    },
  },
  'memslot-flags': {
    variants: [
      host(
        'memslot-flags',
        'Changes the flags of a user memslot: dirty logging on or off (KVM refuses to change the read-only flag, so `readonly` must stay as declared).',
        {
          slot: USER_SLOT,
          logDirty: opt(bool('KVM_MEM_LOG_DIRTY_PAGES.'), false),
          readonly: opt(bool('KVM_MEM_READONLY; must equal the declared value.'), false),
        },
      ),
    ],
    decode: (o) => ({
      side: 'host',
      kind: 'memslot-flags',
      slot: o.slot as number,
      logDirty: o.logDirty as boolean,
      readonly: o.readonly as boolean,
    }),
    encode: (s) => ({ host: s.kind, slot: s.slot, logDirty: s.logDirty, readonly: s.readonly }),
    validate(st, c) {
      const m = liveSlot(c, st.slot);
      if (m?.backing === 'guest_memfd')
        return c.err(`${c.p}.slot`, `a guest_memfd slot's flags cannot change (KVM: such slots are immutable)`);
      if (m && st.readonly !== m.readonly) {
        c.err(
          `${c.p}.readonly`,
          `KVM does not let a memslot's read-only flag change (memslot ${st.slot} is declared ${m.readonly ? 'read-only' : 'writable'}); delete it and declare another`,
        );
      }
    },
  },
  madvise: {
    variants: [
      host('madvise', "madvise() on part of a user memslot's host memory.", {
        slot: USER_SLOT,
        offset: req(u64('Byte offset in the slot (4K aligned).')),
        size: req(u64('Bytes (a multiple of 4K).')),
        advice: req(oneOf(['dontneed', 'hugepage', 'nohugepage'], 'MADV_DONTNEED, MADV_HUGEPAGE or MADV_NOHUGEPAGE.')),
      }),
    ],
    decode: (o) => ({
      side: 'host',
      kind: 'madvise',
      slot: o.slot as number,
      offset: o.offset as bigint,
      size: o.size as bigint,
      advice: o.advice as 'dontneed' | 'hugepage' | 'nohugepage',
    }),
    encode: (s) => ({ host: s.kind, slot: s.slot, offset: s.offset, size: s.size, advice: s.advice }),
    validate: (st, c) => hostRangeErrors(c, st),
  },
  munmap: rangeKind(
    'munmap',
    "munmap() of part of a user memslot's host memory; the slot stays, so guest accesses there fail in the host (see docs/scenarios.md for what each host reports).",
  ),
  remap: rangeKind(
    'remap',
    "mmap(MAP_FIXED) of fresh memory of the slot's backing kind over a range an earlier munmap step took away: anonymous memory comes back zeroed, a memfd with its contents.",
  ),
  mprotect: {
    variants: [
      host('mprotect', "mprotect() of part of a user memslot's host memory; `read-write` restores it.", {
        ...HOST_RANGE,
        prot: req(oneOf(['none', 'read', 'read-write'], 'PROT_NONE, PROT_READ or PROT_READ|PROT_WRITE.')),
      }),
    ],
    decode: (o) => ({
      side: 'host',
      kind: 'mprotect',
      slot: o.slot as number,
      offset: o.offset as bigint,
      size: o.size as bigint,
      prot: o.prot as 'none' | 'read' | 'read-write',
    }),
    encode: (s) => ({ host: s.kind, slot: s.slot, offset: s.offset, size: s.size, prot: s.prot }),
    validate: (st, c) => hostRangeErrors(c, st),
  },
  'pre-fault': {
    variants: [
      host(
        'pre-fault',
        'KVM_PRE_FAULT_MEMORY of a GPA range: KVM maps it ahead of guest accesses. Not applicable on hosts without KVM_CAP_PRE_FAULT_MEMORY (the step is then skipped and reported so).',
        {
          gpa: req(u64('First guest-physical address (4K aligned, inside a user memslot).')),
          size: req(u64('Bytes (a non-zero multiple of 4K, inside the same memslot).')),
        },
      ),
    ],
    decode: (o) => ({ side: 'host', kind: 'pre-fault', gpa: o.gpa as bigint, size: o.size as bigint }),
    encode: (s) => ({ host: s.kind, gpa: s.gpa, size: s.size }),
    validate(st, c) {
      const m = c.s.memslots.find((x) => st.gpa >= x.gpa && st.gpa < x.gpa + x.size);
      if (st.gpa % PAGE_4K !== 0n || st.size % PAGE_4K !== 0n || st.size === 0n)
        return c.err(c.p, 'gpa and size must be 4K aligned and size non-zero');
      if (!m) return c.err(`${c.p}.gpa`, `${hex(st.gpa)} is not inside a declared user memslot`);
      if (st.gpa + st.size > m.gpa + m.size)
        return c.err(
          `${c.p}.size`,
          `${range(st.gpa, st.size)} runs past the end of memslot ${m.slot} ${range(m.gpa, m.size)}`,
        );
    },
  },
  'punch-hole': {
    variants: [
      host(
        'punch-hole',
        "fallocate(PUNCH_HOLE | KEEP_SIZE) of part of a memfd or guest_memfd slot's file: its pages are freed (read as zero afterwards) and KVM zaps their mappings (the MMU notifier for a memfd; the guest_memfd's own invalidation for a guest_memfd).",
        HOST_RANGE,
      ),
    ],
    decode: (o) => ({
      side: 'host',
      kind: 'punch-hole',
      slot: o.slot as number,
      offset: o.offset as bigint,
      size: o.size as bigint,
    }),
    encode: (s) => ({ host: s.kind, slot: s.slot, offset: s.offset, size: s.size }),
    validate: (st, c) => hostRangeErrors(c, st),
  },
  'read-memory': {
    variants: [
      host(
        'read-memory',
        "The VMM reads `gpa` through its own mapping of the slot's memory; the value must equal `expect`.",
        {
          gpa: req(u64('Guest-physical address inside a user memslot.')),
          size: SIZE,
          expect: req(u64('Value the read must give (little-endian).')),
        },
      ),
    ],
    decode: (o) => ({
      side: 'host',
      kind: 'read-memory',
      gpa: o.gpa as bigint,
      size: o.size as 1 | 2 | 4 | 8,
      expect: o.expect as bigint,
    }),
    encode: (s) => ({ host: s.kind, gpa: s.gpa, size: s.size, expect: s.expect }),
    validate: (st, c) => hostAccessErrors(c, st),
  },
  'close-guest-memfd': {
    variants: [
      host(
        'close-guest-memfd',
        "Unmaps and closes a guest_memfd slot's file while the slot stays: KVM zaps the slot's mappings, and a guest access there then fails with a KVM_EXIT_MEMORY_FAULT exit (gpa, size and flags checked); the vCPU cannot get past it, so such an access is the scenario's last step.",
        { slot: USER_SLOT },
      ),
    ],
    decode: (o) => ({ side: 'host', kind: 'close-guest-memfd', slot: o.slot as number }),
    encode: (s) => ({ host: s.kind, slot: s.slot }),
    validate(st, c) {
      const m = liveSlot(c, st.slot);
      if (m && m.backing !== 'guest_memfd')
        return c.err(`${c.p}.slot`, `memslot ${st.slot} is ${m.backing} memory, not a guest_memfd slot`);
      if (m) closedBefore(c, st.slot);
    },
  },
  translate: {
    variants: [
      host('translate', "KVM_TRANSLATE of `gva`; compared with `expect`, else with the model's walk.", {
        gva: GVA,
        expect: opt(
          object('translate expect', 'Expected KVM_TRANSLATE result.', {
            valid: req(bool('Whether a translation exists.')),
            gpa: opt(u64('GPA it gives (only when valid).')),
          }),
        ),
      }),
    ],
    decode(o) {
      const e = o.expect as Obj | undefined;
      return {
        side: 'host',
        kind: 'translate',
        gva: o.gva as bigint,
        ...(e
          ? { expect: { valid: e.valid as boolean, ...(e.gpa !== undefined ? { gpa: e.gpa as bigint } : {}) } }
          : {}),
      };
    },
    encode: (s) => ({ host: s.kind, gva: s.gva, expect: s.expect }),
    validate(st, c) {
      if (st.expect && !st.expect.valid && st.expect.gpa !== undefined)
        c.err(`${c.p}.expect.gpa`, 'an invalid translation has no gpa');
    },
  },
};

/** The entry of a step's kind (the one place the union is narrowed by lookup). */
export function stepKind<S extends Step>(s: S): StepKind<S> {
  return STEP_KINDS[s.kind] as unknown as StepKind<S>;
}

/** The variants of every kind, guest side first, each side in table order. */
export function stepVariants(): StepVariant[] {
  const all = Object.values(STEP_KINDS).flatMap((k) => k.variants);
  return [...all.filter((v) => v.side === 'guest'), ...all.filter((v) => v.side === 'host')];
}

/** The kind a JSON tag names on a side, if any. */
export function kindOfTag(side: Side, tag: string): Step['kind'] | undefined {
  for (const [kind, k] of Object.entries(STEP_KINDS) as [Step['kind'], { variants: readonly StepVariant[] }][]) {
    if (k.variants.some((v) => v.side === side && v.tag === tag)) return kind;
  }
  return undefined;
}

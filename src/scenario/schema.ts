// The JSON form of a scenario as tables of fields, one per object. Three
// readers use the same tables, so they cannot disagree:
//   checkJson()      validates a parsed file and returns it normalised (64-bit
//                    values as bigints, defaults filled in), or errors naming
//                    the JSON path of each bad field;
//   jsonSchema()     the JSON Schema (draft 2020-12) in docs/scenario.schema.json;
//   fieldReference() the field tables of docs/scenarios.md.
// The steps' fields come from the table of step kinds (steps.ts). The semantic
// checks (alignment, overlaps, levels, ...) and the conversion to the Scenario
// type are in load.ts and steps.ts.
import {
  array,
  bool,
  int,
  object,
  oneOf,
  opt,
  req,
  u32,
  u64,
  type Json,
  type ObjectSpec,
  type Spec,
  type TaggedSpec,
} from './spec.js';
import { MODEL_STATS, parseStatExpect, STAT_NAMES, STAT_STRING_RE } from './stats.js';
import { LEVEL, stepVariants } from './steps.js';

export type { Json } from './spec.js';

// ---------------------------------------------------------------------------------
// The field tables.

const LEAF_ATTRS = object('leaf attributes', 'Bits of the leaf entry (the PTE, or the PDE/PDPTE of a 2M/1G page).', {
  p: opt(bool('Present (bit 0).'), true),
  w: opt(bool('Writable, R/W (bit 1).'), false),
  u: opt(bool('User, U/S (bit 2).'), false),
  pwt: opt(bool('Page-level write-through (bit 3).'), false),
  pcd: opt(bool('Page-level cache disable (bit 4).'), false),
  a: opt(bool('Accessed (bit 5).'), false),
  d: opt(bool('Dirty (bit 6).'), false),
  g: opt(bool('Global (bit 8).'), false),
  nx: opt(bool('Execute-disable (bit 63); a reserved bit when EFER.NXE = 0.'), false),
  pkey: opt(int(0, 15, 'Protection key (bits 62:59), used when CR4.PKE = 1.'), 0),
});

const TABLE_ATTRS = object('table attributes', 'Bits of the non-leaf entries the mapping creates.', {
  p: opt(bool('Present (bit 0).'), true),
  w: opt(bool('Writable, R/W (bit 1).'), true),
  u: opt(bool('User, U/S (bit 2).'), true),
  pwt: opt(bool('Page-level write-through (bit 3).'), false),
  pcd: opt(bool('Page-level cache disable (bit 4).'), false),
  a: opt(bool('Accessed (bit 5).'), false),
  nx: opt(bool('Execute-disable (bit 63); a reserved bit when EFER.NXE = 0.'), false),
});

const RAW = object(
  'raw override',
  'Bits forced into the entry at one level for every page of the mapping: value = (value & ~clear) | set.',
  {
    level: req(LEVEL),
    set: opt(u64('Bits to set, reserved bits included.'), '0x0'),
    clear: opt(u64('Bits to clear.'), '0x0'),
  },
);

const MAPPING = object('mapping', 'GVA range -> GPA range with pages of one size, added to the bring-up page tables.', {
  gva: req(u64('First guest-virtual address; aligned to the page size.')),
  gpa: req(u64('First guest-physical address; aligned to the page size.')),
  page: opt(oneOf(['4K', '2M', '1G'], 'Page size (1G needs PDPE1GB on the host).'), '4K'),
  size: { spec: u64('Bytes; a non-zero multiple of the page size.'), defaultDoc: 'one page' },
  leaf: opt(LEAF_ATTRS, {}),
  table: opt(TABLE_ATTRS, {}),
  raw: opt(array(RAW, 'Raw bit overrides, applied in order after every mapping is built.'), []),
});

const MEMSLOT = object('memslot', 'A user memslot (slot 0, GPA [0, 0x400000), belongs to bring-up).', {
  slot: req(int(0, 32767, 'Slot number, 1 or above.')),
  gpa: req(u64('Guest-physical base; 4K aligned (2M/1G for hugetlb backings).')),
  size: req(u64('Bytes; a multiple of the backing page size.')),
  backing: opt(
    oneOf(
      ['anon', 'shared', 'memfd', 'thp', 'hugetlb2m', 'hugetlb1g', 'guest_memfd'],
      'Host memory behind the slot. guest_memfd: an mmap-able, initially shared guest_memfd bound with KVM_MEM_GUEST_MEMFD (the scenario is not applicable where the VM does not offer one).',
    ),
    'anon',
  ),
  logDirty: opt(bool('KVM_MEM_LOG_DIRTY_PAGES: the slot keeps a dirty log.'), false),
  readonly: opt(bool('KVM_MEM_READONLY: guest writes exit to the host as MMIO.'), false),
  hva: opt(
    object(
      'memslot hva',
      "Where the slot's host memory starts relative to its GPA: (HVA - GPA) mod `modulo` = `offset`. KVM maps a 2M (1G) page only where the two are congruent modulo 2M (1G) and the host page is that large; without this field the HVA is wherever mmap puts it.",
      {
        modulo: req(oneOf(['2M', '1G'], 'The modulus.')),
        offset: req(u64('The offset, 4K aligned and below `modulo`; 0x0 lines the slot up.')),
      },
    ),
  ),
  created: opt(
    oneOf(['at-start', 'by-step'], 'When KVM gets the slot: before the first step, or at its memslot-create step.'),
    'at-start',
  ),
});

const PAGING = object('paging', "The guest's paging mode when the first step runs.", {
  levels: opt(oneOf([4, 5], '4-level or 5-level paging (5 needs LA57 on the host).'), 4),
  cr0: opt(object('paging.cr0', 'CR0 bits.', { wp: opt(bool('CR0.WP: supervisor writes honour R/W.'), true) }), {}),
  cr4: opt(
    object('paging.cr4', 'CR4 bits (each needs the host feature of the same name).', {
      smep: opt(bool('CR4.SMEP: supervisor fetches from user pages fault.'), false),
      smap: opt(bool('CR4.SMAP: supervisor data accesses to user pages fault unless EFLAGS.AC = 1.'), false),
      pke: opt(bool('CR4.PKE: protection keys for user pages.'), false),
    }),
    {},
  ),
  efer: opt(
    object('paging.efer', 'EFER bits.', {
      nxe: opt(bool('EFER.NXE: bit 63 of an entry is execute-disable (else reserved).'), true),
    }),
    {},
  ),
  pkru: opt(u32('PKRU: AD of key i is bit 2i, WD is bit 2i+1.'), '0x0'),
  vendor: opt(
    oneOf(['auto', 'intel', 'amd'], "Vendor whose reserved-bit rules the model applies; auto takes the guest CPUID's."),
    'auto',
  ),
});

const STATS = opt({
  kind: 'stats',
  doc: 'Expected changes of KVM stats over the step, by stat name: an integer (exact delta), "+n"/"-n" (exact), ">=n" or "<=n", or "model" (pages_2m, pages_1g: the change of the TDP model\'s huge mappings); checked where the host\'s stats describe it, else reported not applicable here.',
});

const TDP = opt(
  array(
    object('tdp expect', "One page's mapping in KVM's TDP after the step; only the fields given are checked.", {
      gpa: req(u64('GPA of the page (4K aligned).')),
      present: opt(bool('Mapped by a present leaf or an MMIO SPTE.')),
      level: opt(int(1, 5, 'Level of the leaf: 1 = 4 KiB, 2 = 2 MiB, 3 = 1 GiB.')),
      writable: opt(bool('The leaf is writable.')),
      executable: opt(bool('The leaf is executable.')),
      mmio: opt(bool('A cached MMIO SPTE (no memslot at the GPA).')),
    }),
    "Per-page expectations of KVM's TDP after the step, compared with the per-GFN picture where the host has one (else not applicable here).",
  ),
);

/** The steps' variants from the table of step kinds (steps.ts): the tag field, the kind's fields, "stats", "tdp". */
const STEP: TaggedSpec = {
  kind: 'tagged',
  name: 'step',
  doc: 'One guest step (code the vCPU runs) or host step (done while the vCPU is stopped).',
  variants: stepVariants().map((v) => ({
    tag: v.side,
    value: v.tag,
    spec: object(`${v.side} ${v.tag}`, v.doc, {
      [v.side]: req(oneOf([v.tag], 'Step kind.')),
      ...v.fields,
      stats: STATS,
      tdp: TDP,
    }),
  })),
};

export const SCENARIO = object('scenario', 'A kvmharness scenario: memory, paging, mappings and a program of steps.', {
  name: req({
    kind: 'string',
    doc: 'Short name, used as the check name.',
    pattern: { re: '^[A-Za-z0-9][A-Za-z0-9_.-]*$', what: "a name of letters, digits, '_', '.' and '-'" },
  }),
  description: req({ kind: 'string', doc: 'What the scenario shows, in a sentence or two.' }),
  arch: opt(oneOf(['x86_64'], 'Guest architecture.'), 'x86_64'),
  vcpus: opt(oneOf([1, 2, 3, 4], 'Number of vCPUs; more than one needs a `race`.'), 1),
  memslots: opt(array(MEMSLOT, 'User memslots.'), []),
  paging: opt(PAGING, {}),
  mappings: opt(array(MAPPING, 'Mappings added to the bring-up page tables.'), []),
  steps: opt(array(STEP, 'The program, run in order.'), []),
  race: opt(
    object(
      'race',
      "A multi-vCPU race, instead of steps: each vCPU writes its own pages of every target again and again (on its own thread) while the host runs the targets' operations round after round; then the vCPUs make a final pass and stop, and nothing may be lost.",
      {
        pages: req(int(1, 64, 'Pages each vCPU writes in each target.')),
        rounds: req(int(1, 1000, 'Host rounds; in each the host waits until every vCPU has finished another pass.')),
        cpl: opt(oneOf([0, 3], "Privilege level of the vCPUs' loops (CPL 3 needs user mappings of the targets)."), 0),
        targets: req(
          array(
            object('race target', 'A range of guest pages and what the host does to its memslot in each round.', {
              slot: req(int(1, 32767, 'Slot number (a declared user slot).')),
              gva: req(
                u64(
                  'First guest-virtual address; a writable mapping must cover vcpus x pages pages from it, in the slot.',
                ),
              ),
              host: req(
                array(
                  oneOf(
                    ['dirty-log', 'dontneed', 'toggle-dirty-log', 'delete'],
                    "KVM_GET_DIRTY_LOG + KVM_CLEAR_DIRTY_LOG of the slot, MADV_DONTNEED of the target's pages, dirty logging turned off or on, or (once, in the middle round, and alone) deleting the slot while the vCPUs write it.",
                  ),
                  'Host operations in each round, in order.',
                ),
              ),
            }),
            'The targets.',
          ),
        ),
      },
    ),
  ),
});

// ---------------------------------------------------------------------------------
// Values.

const MAX_SAFE = BigInt(Number.MAX_SAFE_INTEGER);
const hexRe = (bits: 32 | 64) => `^0[xX]0*[0-9a-fA-F]{1,${bits / 4}}$`;
const U64_RE = { 32: new RegExp(hexRe(32)), 64: new RegExp(hexRe(64)) };

/** Text of a value in an error message (JSON, shortened). */
function show(v: unknown): string {
  const s = JSON.stringify(v) ?? String(v);
  return s.length > 40 ? `${s.slice(0, 37)}...` : s;
}

function u64What(bits: 32 | 64): string {
  return bits === 64
    ? 'a hex string like "0x1000" or a non-negative integer'
    : 'a 32-bit value: a hex string like "0x4" or an integer up to 4294967295';
}

/** Parses a u64 field value; a string error says what was expected. */
function parseU64(v: unknown, bits: 32 | 64 = 64): bigint | string {
  const what = `expected ${u64What(bits)}, got ${show(v)}`;
  if (typeof v === 'string') {
    if (U64_RE[bits].test(v)) return BigInt(v);
    if (/^0[xX][0-9a-fA-F]+$/.test(v)) return `expected at most ${bits} bits, got ${show(v)}`;
    return what;
  }
  if (typeof v === 'number' && Number.isInteger(v) && v >= 0) {
    if (!Number.isSafeInteger(v))
      return `expected a hex string for a value above 2^53 (an integer that large is not exact), got ${show(v)}`;
    if (bits === 32 && v > 0xffffffff) return `expected at most ${bits} bits, got ${v}`;
    return BigInt(v);
  }
  return what;
}

function enumWhat(values: readonly (string | number)[]): string {
  const shown = values.map((x) => show(x));
  if (shown.length === 1) return shown[0]!;
  return `one of ${shown.join(', ')}`;
}

/** Path of a field: a.b, a[3], a["odd key"]. */
function fieldPath(base: string, key: string | number): string {
  if (typeof key === 'number') return `${base}[${key}]`;
  if (/^[A-Za-z_][A-Za-z0-9_-]*$/.test(key)) return base ? `${base}.${key}` : key;
  return `${base}[${JSON.stringify(key)}]`;
}

const isObject = (v: unknown): v is Record<string, unknown> => typeof v === 'object' && v !== null && !Array.isArray(v);

/** The error string for a path (the top level has an empty path). */
export function at(path: string, message: string): string {
  return `${path || '(top level)'}: ${message}`;
}

/**
 * Validates `v` against `spec`, appending "path: message" strings to `errors`.
 * Returns the normalised value (bigints for u64 fields, defaults filled in,
 * fields in table order) or undefined where the value was bad.
 */
export function checkJson(spec: Spec, v: unknown, path: string, errors: string[]): unknown {
  const bad = (message: string) => {
    errors.push(at(path, message));
    return undefined;
  };
  switch (spec.kind) {
    case 'u64': {
      const r = parseU64(v, spec.bits);
      return typeof r === 'string' ? bad(r) : r;
    }
    case 'int':
      if (typeof v !== 'number' || !Number.isInteger(v) || v < spec.min || v > spec.max) {
        return bad(`expected an integer from ${spec.min} to ${spec.max}, got ${show(v)}`);
      }
      return v;
    case 'enum':
      if (!spec.values.includes(v as string | number)) return bad(`expected ${enumWhat(spec.values)}, got ${show(v)}`);
      return v;
    case 'bool':
      if (typeof v !== 'boolean') return bad(`expected true or false, got ${show(v)}`);
      return v;
    case 'string':
      if (typeof v !== 'string' || v.length === 0) return bad(`expected a non-empty string, got ${show(v)}`);
      if (spec.pattern && !new RegExp(spec.pattern.re).test(v))
        return bad(`expected ${spec.pattern.what}, got ${show(v)}`);
      return v;
    case 'fault': {
      if (v === false) return false;
      const r = parseU64(v, 32);
      return typeof r === 'string'
        ? bad(`expected false or a #PF error code (a hex string like "0x7" or an integer), got ${show(v)}`)
        : r;
    }
    case 'stats': {
      if (!isObject(v)) return bad(`expected an object of stat name -> expected delta, got ${show(v)}`);
      const before = errors.length;
      const out: Record<string, unknown> = {};
      for (const [k, x] of Object.entries(v)) {
        if (!STAT_NAMES.includes(k)) {
          errors.push(at(fieldPath(path, k), `unknown stat (known: ${STAT_NAMES.join(', ')})`));
          continue;
        }
        const e = parseStatExpect(x);
        if (typeof e === 'string') errors.push(at(fieldPath(path, k), e));
        else if (e.op === 'model' && !MODEL_STATS.includes(k))
          errors.push(at(fieldPath(path, k), `"model" is for ${MODEL_STATS.join(' and ')} only`));
        else out[k] = e;
      }
      return errors.length === before ? out : undefined;
    }
    case 'array': {
      if (!Array.isArray(v)) return bad(`expected an array, got ${show(v)}`);
      const before = errors.length;
      const out = v.map((x, i) => checkJson(spec.items, x, fieldPath(path, i), errors));
      return errors.length === before ? out : undefined;
    }
    case 'object':
      if (!isObject(v)) return bad(`expected an object, got ${show(v)}`);
      return checkObject(spec, v, path, errors);
    case 'tagged': {
      if (!isObject(v)) return bad(`expected an object, got ${show(v)}`);
      const tags = [...new Set(spec.variants.map((x) => x.tag))];
      const present = tags.filter((t) => t in v);
      if (present.length !== 1) {
        const names = tags.map((t) => `a "${t}"`).join(' or ');
        return bad(present.length === 0 ? `expected ${names} field` : `expected ${names} field, not both`);
      }
      const tag = present[0]!;
      const variant = spec.variants.find((x) => x.tag === tag && x.value === v[tag]);
      if (!variant) {
        const values = spec.variants.filter((x) => x.tag === tag).map((x) => x.value);
        errors.push(at(fieldPath(path, tag), `expected ${enumWhat(values)}, got ${show(v[tag])}`));
        return undefined;
      }
      return checkObject(variant.spec, v, path, errors);
    }
  }
}

function checkObject(
  spec: ObjectSpec,
  v: Record<string, unknown>,
  path: string,
  errors: string[],
): Record<string, unknown> | undefined {
  const before = errors.length;
  const known = Object.keys(spec.fields);
  const got = new Map<string, unknown>();
  for (const [k, x] of Object.entries(v)) {
    const field = Object.hasOwn(spec.fields, k) ? spec.fields[k] : undefined;
    if (!field) errors.push(at(fieldPath(path, k), `unknown field (known: ${known.join(', ')})`));
    else got.set(k, checkJson(field.spec, x, fieldPath(path, k), errors));
  }
  const out: Record<string, unknown> = {};
  for (const [k, field] of Object.entries(spec.fields)) {
    if (got.has(k)) out[k] = got.get(k);
    else if (field.required) errors.push(at(fieldPath(path, k), 'required field missing'));
    else if (field.default !== undefined) out[k] = checkJson(field.spec, field.default, fieldPath(path, k), errors);
  }
  return errors.length === before ? out : undefined;
}

/** The JSON form of a normalised value (bigints as lowercase "0x..." strings). */
export function toJson(v: unknown): Json {
  if (typeof v === 'bigint') return `0x${v.toString(16)}`;
  if (Array.isArray(v)) return v.map(toJson);
  if (isObject(v)) {
    const out: Record<string, Json> = {};
    for (const [k, x] of Object.entries(v)) if (x !== undefined) out[k] = toJson(x);
    return out;
  }
  return v as Json;
}

// ---------------------------------------------------------------------------------
// JSON Schema.

function schemaOf(spec: Spec): Record<string, Json> {
  switch (spec.kind) {
    case 'u64':
      return {
        description: spec.doc,
        oneOf: [
          { type: 'string', pattern: hexRe(spec.bits) },
          { type: 'integer', minimum: 0, maximum: spec.bits === 64 ? Number(MAX_SAFE) : 0xffffffff },
        ],
      };
    case 'int':
      return { description: spec.doc, type: 'integer', minimum: spec.min, maximum: spec.max };
    case 'enum':
      return spec.values.length === 1
        ? { description: spec.doc, const: spec.values[0]! }
        : { description: spec.doc, enum: [...spec.values] };
    case 'bool':
      return { description: spec.doc, type: 'boolean' };
    case 'string':
      return {
        description: spec.doc,
        type: 'string',
        minLength: 1,
        ...(spec.pattern ? { pattern: spec.pattern.re } : {}),
      };
    case 'fault':
      return {
        description: spec.doc,
        oneOf: [
          { const: false },
          { type: 'string', pattern: hexRe(32) },
          { type: 'integer', minimum: 0, maximum: 0xffffffff },
        ],
      };
    case 'stats':
      return { description: spec.doc, $ref: '#/$defs/stats' };
    case 'array':
      return { description: spec.doc, type: 'array', items: schemaOf(spec.items) };
    case 'object': {
      const properties: Record<string, Json> = {};
      for (const [k, f] of Object.entries(spec.fields)) {
        properties[k] = { ...schemaOf(f.spec), ...(f.default !== undefined ? { default: f.default } : {}) };
      }
      const required = Object.entries(spec.fields)
        .filter(([, f]) => f.required)
        .map(([k]) => k);
      return {
        description: spec.doc,
        type: 'object',
        properties,
        ...(required.length ? { required } : {}),
        additionalProperties: false,
      };
    }
    case 'tagged':
      return { description: spec.doc, type: 'object', oneOf: spec.variants.map((x) => schemaOf(x.spec)) };
  }
}

/** The JSON Schema (draft 2020-12) of a scenario file, as docs/scenario.schema.json holds it. */
export function jsonSchema(): Record<string, Json> {
  return {
    $schema: 'https://json-schema.org/draft/2020-12/schema',
    title: 'kvmharness scenario',
    ...schemaOf(SCENARIO),
    $defs: {
      // One definition for every step's "stats" (the stat names are many).
      stats: {
        type: 'object',
        propertyNames: { enum: [...STAT_NAMES] },
        additionalProperties: { oneOf: [{ type: 'integer' }, { type: 'string', pattern: STAT_STRING_RE.source }] },
      },
    },
  };
}

// ---------------------------------------------------------------------------------
// Field reference for the docs.

function typeText(spec: Spec): string {
  switch (spec.kind) {
    case 'u64':
      return spec.bits === 64 ? 'u64' : 'u32';
    case 'int':
      return `integer ${spec.min}..${spec.max}`;
    case 'enum':
      return spec.values.map((x) => `\`${JSON.stringify(x)}\``).join(' \\| ');
    case 'bool':
      return 'boolean';
    case 'string':
      return 'string';
    case 'fault':
      return '`false` \\| u32';
    case 'stats':
      return 'object (stat name -> integer \\| string)';
    case 'array':
      return `array of ${typeText(spec.items)}`;
    case 'object':
      return `object (${spec.name})`;
    case 'tagged':
      return `${spec.name}`;
  }
}

function collect(spec: Spec, out: (ObjectSpec | TaggedSpec)[]): void {
  if (spec.kind === 'array') collect(spec.items, out);
  if (spec.kind === 'tagged') {
    if (out.includes(spec)) return;
    out.push(spec);
    for (const v of spec.variants) collect(v.spec, out);
  }
  if (spec.kind === 'object') {
    if (out.includes(spec) || out.some((o) => o.name === spec.name)) return;
    out.push(spec);
    for (const f of Object.values(spec.fields)) collect(f.spec, out);
  }
}

/** Markdown tables of every object's fields, as docs/scenarios.md holds them between its markers. */
export function fieldReference(): string {
  const objects: (ObjectSpec | TaggedSpec)[] = [];
  collect(SCENARIO, objects);
  const parts: string[] = [];
  for (const o of objects) {
    if (o.kind === 'tagged') {
      parts.push(
        `#### ${o.name}\n\n${o.doc} Kinds: ${o.variants.map((x) => `\`${x.tag}: ${x.value}\``).join(', ')}.\n`,
      );
      continue;
    }
    const rows = Object.entries(o.fields).map(([k, f]) => {
      const dflt = f.required
        ? 'required'
        : f.default !== undefined
          ? `\`${JSON.stringify(f.default)}\``
          : (f.defaultDoc ?? 'not given');
      return `| \`${k}\` | ${typeText(f.spec)} | ${dflt} | ${f.spec.doc} |`;
    });
    parts.push(
      `#### ${o.name}\n\n${o.doc}\n\n| field | type | default | meaning |\n|---|---|---|---|\n${rows.join('\n')}\n`,
    );
  }
  return parts.join('\n');
}

// Scenario files: validation (shape and semantic rules, each error with its
// exact message and JSON path), defaults, the round trip through JSON, the
// generated schema and field reference, the built-in scenarios, and the page
// tables built from a scenario. Expected entry values are derived by hand from
// the entry layout (SDM vol. 3A §4.5) and bring-up's documented pool order.
import { clearDirtyRefusal } from '../src/model/vm.js';
import { mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { bringUp, CR4 } from '../src/arch/x86/bringup.js';
import { walk, type WalkResult } from '../src/model/walk.js';
import { bringUpOptions, buildScenarioTables, MemImage, pagingConfigFor } from '../src/scenario/build.js';
import {
  builtinScenarioDir,
  builtinScenarios,
  loadScenario,
  parseScenario,
  ScenarioError,
  scenarioToJson,
  validateScenario,
} from '../src/scenario/load.js';
import { fieldReference, jsonSchema } from '../src/scenario/schema.js';
import { statClass } from '../src/scenario/stats.js';
import type { Scenario } from '../src/scenario/types.js';

const ROOT = join(import.meta.dirname, '..');
const UPDATE = process.env.KVMHARNESS_UPDATE_DOCS === '1';

// Entry bits, written out independently of src/arch/x86/pte.ts.
const P = 1n,
  W = 2n,
  U = 4n,
  PWT = 8n,
  PCD = 16n,
  A = 32n,
  D = 64n,
  PS = 128n,
  G = 256n;
const NX = 1n << 63n;

type J = Record<string, unknown>;

function base(): J {
  return {
    name: 't',
    description: 'd',
    memslots: [{ slot: 1, gpa: '0x400000', size: '0x400000', logDirty: true }],
    mappings: [{ gva: '0x8000000000', gpa: '0x401000', leaf: { w: true } }],
    steps: [{ guest: 'read', gva: '0x8000000000' }],
  };
}

function errorsOf(json: unknown): string[] {
  const v = validateScenario(json);
  return v.ok ? [] : v.errors;
}

function ok(json: unknown): Scenario {
  const v = validateScenario(json);
  if (!v.ok) throw new Error(v.errors.join('\n'));
  return v.scenario;
}

/** base() with a change applied. */
function edit(f: (j: J & { mappings: J[]; steps: J[]; memslots: J[] }) => void): J {
  const j = base() as J & { mappings: J[]; steps: J[]; memslots: J[] };
  f(j);
  return j;
}

describe('scenario defaults', () => {
  it('fills every default of a minimal scenario and mapping', () => {
    const s = ok({ name: 'min', description: 'the least', mappings: [{ gva: '0x8000000000', gpa: 4096 }] });
    expect(s).toEqual({
      name: 'min',
      description: 'the least',
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
      mappings: [
        {
          gva: 0x8000000000n,
          gpa: 0x1000n,
          size: 0x1000n,
          page: '4K',
          leaf: {
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
          },
          table: {
            p: true,
            w: true,
            u: true,
            nx: false,
            a: false,
            d: false,
            g: false,
            pwt: false,
            pcd: false,
            pkey: 0,
          },
          raw: [],
        },
      ],
      steps: [],
    } satisfies Scenario);
  });

  it('a mapping of 2M or 1G pages is one page by default', () => {
    const s = ok({
      name: 'big',
      description: 'd',
      mappings: [
        { gva: '0x8000000000', gpa: '0x400000', page: '2M' },
        { gva: '0x8040000000', gpa: '0x40000000', page: '1G' },
      ],
    });
    expect(s.mappings.map((m) => m.size)).toEqual([0x200000n, 0x40000000n]);
  });

  it('normalises every step kind', () => {
    const s = ok({
      name: 'steps',
      description: 'd',
      memslots: [{ slot: 1, gpa: '0x400000', size: '0x400000', logDirty: true }],
      mappings: [{ gva: '0x8000000000', gpa: '0x401000' }],
      steps: [
        { guest: 'read', gva: '0x8000000008' },
        {
          guest: 'write',
          gva: '0x8000000008',
          size: 4,
          value: 7,
          cpl: 3,
          expect: { fault: '0x7', ptes: [{ level: 1, value: '0x401001' }] },
        },
        { guest: 'exec', gva: '0x8000000000', expect: { fault: false } },
        { guest: 'read', gva: 0, eflagsAc: true, expect: { value: '0xff' } },
        { guest: 'invlpg', gva: '0x8000000000' },
        { guest: 'reload-cr3' },
        { guest: 'set-cr0-wp', value: false },
        { guest: 'set-cr4', bit: 'smap', value: true },
        { host: 'write-pte', gva: '0x8000000000', level: 1, clear: '0x1' },
        { host: 'write-pte', gva: '0x8000000000', level: 2, value: '0x0' },
        { host: 'clear-ad', gva: '0x8000000000' },
        { host: 'get-dirty-log', slot: 1, expect: ['0x401000'] },
        { host: 'clear-dirty-log', slot: 1 },
        { host: 'translate', gva: '0x8000000000', expect: { valid: true, gpa: '0x401000' } },
        { host: 'translate', gva: '0x9000000000' },
      ],
    });
    expect(s.steps).toEqual([
      {
        side: 'guest',
        kind: 'access',
        access: 'read',
        gva: 0x8000000008n,
        size: 8,
        cpl: 0,
        value: 0n,
        eflagsAc: false,
      },
      {
        side: 'guest',
        kind: 'access',
        access: 'write',
        gva: 0x8000000008n,
        size: 4,
        cpl: 3,
        value: 7n,
        eflagsAc: false,
        expect: { fault: 7, ptes: [{ level: 1, value: 0x401001n }] },
      },
      {
        side: 'guest',
        kind: 'access',
        access: 'exec',
        gva: 0x8000000000n,
        size: 1,
        cpl: 0,
        value: 0n,
        eflagsAc: false,
        expect: { fault: false },
      },
      {
        side: 'guest',
        kind: 'access',
        access: 'read',
        gva: 0n,
        size: 8,
        cpl: 0,
        value: 0n,
        eflagsAc: true,
        expect: { value: 0xffn },
      },
      { side: 'guest', kind: 'invlpg', gva: 0x8000000000n },
      { side: 'guest', kind: 'reload-cr3' },
      { side: 'guest', kind: 'set-cr0-wp', value: false },
      { side: 'guest', kind: 'set-cr4', bit: 'smap', value: true },
      { side: 'host', kind: 'write-pte', gva: 0x8000000000n, level: 1, set: 0n, clear: 1n },
      { side: 'host', kind: 'write-pte', gva: 0x8000000000n, level: 2, set: 0n, clear: 0n, value: 0n },
      { side: 'host', kind: 'clear-ad', gva: 0x8000000000n },
      { side: 'host', kind: 'get-dirty-log', slot: 1, expect: [0x401000n] },
      { side: 'host', kind: 'clear-dirty-log', slot: 1 },
      { side: 'host', kind: 'translate', gva: 0x8000000000n, expect: { valid: true, gpa: 0x401000n } },
      { side: 'host', kind: 'translate', gva: 0x9000000000n },
    ] satisfies Scenario['steps']);
  });

  it('reads hex in either case, with leading zeros, and safe integers', () => {
    const s = ok(
      edit((j) => (j.mappings[0] = { gva: '0X0000008000000000', gpa: 0x401000, size: '0x1000', leaf: { w: true } })),
    );
    expect(s.mappings[0]!.gva).toBe(0x8000000000n);
    expect(s.mappings[0]!.gpa).toBe(0x401000n);
    expect(ok(edit((j) => (j.steps[0]!.gva = '0xFFFFFFFFFFFFF000'))).steps[0]).toMatchObject({
      gva: 0xfffffffffffff000n,
    });
  });
});

describe('scenario validation: shape', () => {
  const HEX = 'expected a hex string like "0x1000" or a non-negative integer';
  const cases: [string, J | unknown, string[]][] = [
    ['a bad hex string', edit((j) => (j.steps[0]!.gva = '12z')), [`steps[0].gva: ${HEX}, got "12z"`]],
    ['a negative number', edit((j) => (j.steps[0]!.gva = -1)), [`steps[0].gva: ${HEX}, got -1`]],
    ['a fraction', edit((j) => (j.mappings[0]!.gpa = 4096.5)), [`mappings[0].gpa: ${HEX}, got 4096.5`]],
    [
      'a hex value over 64 bits',
      edit((j) => (j.steps[0]!.gva = '0x10000000000000000')),
      ['steps[0].gva: expected at most 64 bits, got "0x10000000000000000"'],
    ],
    [
      'an inexact integer',
      edit((j) => (j.steps[0]!.gva = 2 ** 60)),
      [
        'steps[0].gva: expected a hex string for a value above 2^53 (an integer that large is not exact), got 1152921504606847000',
      ],
    ],
    [
      'a 32-bit value over 32 bits',
      edit((j) => (j.paging = { pkru: '0x100000000' })),
      ['paging.pkru: expected at most 32 bits, got "0x100000000"'],
    ],
    ['a top level that is not an object', [], ['(top level): expected an object, got []']],
    ['JSON null', null, ['(top level): expected an object, got null']],
    [
      'missing name and description',
      { mappings: [] },
      ['name: required field missing', 'description: required field missing'],
    ],
    ['an empty description', edit((j) => (j.description = '')), ['description: expected a non-empty string, got ""']],
    [
      'a bad name',
      edit((j) => (j.name = 'two words')),
      ["name: expected a name of letters, digits, '_', '.' and '-', got \"two words\""],
    ],
    [
      'fields named like Object.prototype members, and an odd key',
      JSON.parse('{"name":"t","description":"d","__proto__":1,"constructor":2,"a b":3}'),
      [
        '__proto__: unknown field (known: name, description, arch, vcpus, memslots, paging, mappings, steps, race)',
        'constructor: unknown field (known: name, description, arch, vcpus, memslots, paging, mappings, steps, race)',
        '["a b"]: unknown field (known: name, description, arch, vcpus, memslots, paging, mappings, steps, race)',
      ],
    ],
    [
      'an unknown top-level field',
      edit((j) => (j.cpus = 2)),
      ['cpus: unknown field (known: name, description, arch, vcpus, memslots, paging, mappings, steps, race)'],
    ],
    ['another architecture', edit((j) => (j.arch = 'arm64')), ['arch: expected "x86_64", got "arm64"']],
    ['five vCPUs', edit((j) => (j.vcpus = 5)), ['vcpus: expected one of 1, 2, 3, 4, got 5']],
    [
      'a race without targets',
      edit((j) => (j.race = { pages: 1, rounds: 1 })),
      ['race.targets: required field missing'],
    ],
    [
      'a race op that does not exist',
      edit((j) => (j.race = { pages: 1, rounds: 1, targets: [{ slot: 1, gva: 0, host: ['munmap'] }] })),
      ['race.targets[0].host[0]: expected one of "dirty-log", "dontneed", "toggle-dirty-log", "delete", got "munmap"'],
    ],
    [
      'a misspelt mapping field',
      edit((j) => (j.mappings[0] = { gvaa: '0x8000000000', gpa: '0x401000' })),
      [
        'mappings[0].gvaa: unknown field (known: gva, gpa, page, size, leaf, table, raw, tables)',
        'mappings[0].gva: required field missing',
      ],
    ],
    [
      'a leaf-only bit in table attributes',
      edit((j) => (j.mappings[0]!.table = { d: true })),
      ['mappings[0].table.d: unknown field (known: p, w, u, pwt, pcd, a, nx)'],
    ],
    [
      'a string for a boolean',
      edit((j) => (j.mappings[0]!.leaf = { w: 'yes' })),
      ['mappings[0].leaf.w: expected true or false, got "yes"'],
    ],
    [
      'a key out of range',
      edit((j) => (j.mappings[0]!.leaf = { pkey: 16 })),
      ['mappings[0].leaf.pkey: expected an integer from 0 to 15, got 16'],
    ],
    [
      'an unknown page size',
      edit((j) => (j.mappings[0]!.page = '8K')),
      ['mappings[0].page: expected one of "4K", "2M", "1G", got "8K"'],
    ],
    [
      'a raw override without a level',
      edit((j) => (j.mappings[0]!.raw = [{ set: '0x80' }])),
      ['mappings[0].raw[0].level: required field missing'],
    ],
    [
      'level 6',
      edit((j) => (j.mappings[0]!.raw = [{ level: 6 }])),
      ['mappings[0].raw[0].level: expected an integer from 1 to 5, got 6'],
    ],
    ['paging levels 3', edit((j) => (j.paging = { levels: 3 })), ['paging.levels: expected one of 4, 5, got 3']],
    [
      'an unknown vendor',
      edit((j) => (j.paging = { vendor: 'via' })),
      ['paging.vendor: expected one of "auto", "intel", "amd", got "via"'],
    ],
    [
      'an unknown CR4 bit',
      edit((j) => (j.paging = { cr4: { la57: true } })),
      ['paging.cr4.la57: unknown field (known: smep, smap, pke)'],
    ],
    [
      'an unknown backing',
      edit((j) => (j.memslots[0]!.backing = 'file')),
      [
        'memslots[0].backing: expected one of "anon", "shared", "memfd", "thp", "hugetlb2m", "hugetlb1g", "guest_memfd", got "file"',
      ],
    ],
    ['memslots not an array', edit((j) => ((j as J).memslots = {})), ['memslots: expected an array, got {}']],
    [
      'a step that is not an object',
      edit((j) => ((j as J).steps = ['read'])),
      ['steps[0]: expected an object, got "read"'],
    ],
    [
      'a step with neither tag',
      edit((j) => (j.steps = [{ gva: '0x1000' }])),
      ['steps[0]: expected a "guest" or a "host" field'],
    ],
    [
      'a step with both tags',
      edit((j) => (j.steps = [{ guest: 'read', host: 'clear-ad', gva: '0x1000' }])),
      ['steps[0]: expected a "guest" or a "host" field, not both'],
    ],
    [
      'an unknown guest step',
      edit((j) => (j.steps = [{ guest: 'jump', gva: '0x1000' }])),
      [
        'steps[0].guest: expected one of "read", "write", "exec", "invlpg", "reload-cr3", "set-cr0-wp", "set-cr4", "write-pte", "clear-ad", got "jump"',
      ],
    ],
    [
      'an unknown host step',
      edit((j) => (j.steps = [{ host: 'reboot' }])),
      [
        'steps[0].host: expected one of "write-pte", "clear-ad", "get-dirty-log", "clear-dirty-log", "memslot-delete", "memslot-create", "write-memory", "memslot-move", "memslot-flags", "madvise", "munmap", "remap", "mprotect", "pre-fault", "punch-hole", "read-memory", "close-guest-memfd", "translate", got "reboot"',
      ],
    ],
    [
      'a size on an exec step',
      edit((j) => (j.steps = [{ guest: 'exec', gva: '0x8000000000', size: 1 }])),
      ['steps[0].size: unknown field (known: guest, gva, cpl, eflagsAc, count, stride, expect, stats, tdp)'],
    ],
    [
      'an implicit read that is not a CPL 0 read of 8 aligned bytes',
      edit(
        (j) =>
          (j.steps = [{ guest: 'read', gva: '0x8000000004', size: 4, cpl: 3, implicit: true, expect: { value: 1 } }]),
      ),
      [
        'steps[0].cpl: an implicit read is made at CPL 0 (the LDT is loaded there)',
        'steps[0].size: an implicit read loads one 8-byte descriptor: size must be 8',
        "steps[0].gva: an implicit read's descriptor at 0x8000000004 must be 8-aligned",
        'steps[0].expect.value: an implicit read returns no value',
      ],
    ],
    [
      'a value on a read step',
      edit((j) => (j.steps = [{ guest: 'read', gva: '0x8000000000', value: 1 }])),
      [
        'steps[0].value: unknown field (known: guest, gva, size, cpl, eflagsAc, count, stride, implicit, expect, stats, tdp)',
      ],
    ],
    [
      'an expected value on a write',
      edit((j) => (j.steps = [{ guest: 'write', gva: '0x8000000000', expect: { value: 1 } }])),
      ['steps[0].expect.value: unknown field (known: fault, ptes)'],
    ],
    ['size 3', edit((j) => (j.steps[0]!.size = 3)), ['steps[0].size: expected one of 1, 2, 4, 8, got 3']],
    ['CPL 1', edit((j) => (j.steps[0]!.cpl = 1)), ['steps[0].cpl: expected one of 0, 3, got 1']],
    [
      'fault: true',
      edit((j) => (j.steps[0]!.expect = { fault: true })),
      ['steps[0].expect.fault: expected false or a #PF error code (a hex string like "0x7" or an integer), got true'],
    ],
    [
      'set-cr4 of an unknown bit',
      edit((j) => (j.steps = [{ guest: 'set-cr4', bit: 'la57', value: true }])),
      ['steps[0].bit: expected one of "smep", "smap", "pke", got "la57"'],
    ],
    [
      'set-cr0-wp without a value',
      edit((j) => (j.steps = [{ guest: 'set-cr0-wp' }])),
      ['steps[0].value: required field missing'],
    ],
    [
      'stats that are not an object',
      edit((j) => (j.steps[0]!.stats = ['pf_fixed'])),
      ['steps[0].stats: expected an object of stat name -> expected delta, got ["pf_fixed"]'],
    ],
    [
      'an unknown stat',
      edit((j) => (j.steps[0]!.stats = { pf_fixd: 1 })),
      [
        expect.stringMatching(
          /^steps\[0\]\.stats\.pf_fixd: unknown stat \(known: pf_taken, pf_fixed, .*mmio_exits.*\)$/,
        ) as unknown as string,
      ],
    ],
    [
      'a stat expectation of the wrong syntax',
      edit((j) => (j.steps = [{ host: 'get-dirty-log', slot: 1, stats: { remote_tlb_flush: '>1' } }])),
      [
        'steps[0].stats.remote_tlb_flush: expected an integer delta or a string like ">=1", "+3", "-2" or "<=0", got ">1"',
      ],
    ],
    [
      'a fractional stat delta',
      edit((j) => (j.steps[0]!.stats = { mmio_exits: 0.5 })),
      ['steps[0].stats.mmio_exits: expected an integer delta or a string like ">=1", "+3" or "-2", got 0.5'],
    ],
    [
      'a get-dirty-log expect that is not a list of addresses',
      edit((j) => (j.steps = [{ host: 'get-dirty-log', slot: 1, expect: ['0x401000', 'page 2'] }])),
      [`steps[0].expect[1]: ${HEX}, got "page 2"`],
    ],
  ];
  for (const [what, json, errors] of cases) {
    it(`rejects ${what}`, () => expect(errorsOf(json)).toEqual(errors));
  }

  it('reports every shape error, in document order, before any semantic rule runs', () => {
    const j = edit((j) => {
      j.mappings[0]!.gva = '0x1'; // misaligned, but semantic: not reported while the shape is wrong
      j.steps = [
        { guest: 'read', gva: 'x' },
        { guest: 'write', gva: '0x8000000000', cpl: 2 },
      ];
    });
    expect(errorsOf(j)).toEqual([`steps[0].gva: ${HEX}, got "x"`, 'steps[1].cpl: expected one of 0, 3, got 2']);
  });
});

describe('scenario validation: semantic rules', () => {
  const cases: [string, J, string[]][] = [
    [
      'memslot 0',
      edit((j) => (j.memslots[0]!.slot = 0)),
      ['memslots[0].slot: slot 0 is reserved for bring-up memory [0x0, 0x400000); use 1 or above'],
    ],
    [
      'a memslot over bring-up memory',
      edit((j) => (j.memslots[0]!.gpa = '0x300000')),
      ['memslots[0].gpa: [0x300000, 0x700000) overlaps bring-up memory [0x0, 0x400000) (slot 0)'],
    ],
    [
      'two memslots with one number, overlapping',
      edit((j) => j.memslots.push({ slot: 1, gpa: '0x600000', size: '0x400000' })),
      [
        'memslots[1].slot: slot 1 is already declared by memslots[0]',
        'memslots[1].gpa: [0x600000, 0xa00000) overlaps memslots[0] [0x400000, 0x800000)',
      ],
    ],
    [
      'a misaligned memslot',
      edit((j) => (j.memslots[0]!.size = '0x1800')),
      ['memslots[0].size: 0x1800 is not a non-zero multiple of the anon page size 0x1000'],
    ],
    [
      'a hugetlb2m memslot at a 4K boundary',
      edit((j) => (j.memslots[0] = { slot: 1, gpa: '0x401000', size: '0x200000', backing: 'hugetlb2m' })),
      ['memslots[0].gpa: 0x401000 is not aligned to the hugetlb2m page size 0x200000'],
    ],
    [
      'a memslot past 2^52',
      edit((j) => (j.memslots[0]!.gpa = '0xfffffffffff000')),
      ['memslots[0].gpa: [0xfffffffffff000, 0x1000000003ff000) goes beyond 2^52, the largest guest-physical address'],
    ],
    [
      'a misaligned gva',
      edit((j) => (j.mappings[0]!.gva = '0x8000000800')),
      ['mappings[0].gva: 0x8000000800 is not aligned to 4K pages'],
    ],
    [
      'a 2M mapping at a 4K gpa',
      edit((j) => (j.mappings[0] = { gva: '0x8000000000', gpa: '0x401000', page: '2M' })),
      ['mappings[0].gpa: 0x401000 is not aligned to 2M pages'],
    ],
    [
      'a size that is not whole pages',
      edit((j) => (j.mappings[0]!.size = '0x1800')),
      ['mappings[0].size: 0x1800 is not a non-zero multiple of 4K'],
    ],
    ['a zero size', edit((j) => (j.mappings[0]!.size = 0)), ['mappings[0].size: 0x0 is not a non-zero multiple of 4K']],
    [
      'overlapping mappings',
      edit((j) => j.mappings.push({ gva: '0x7fffffe000', gpa: '0x402000', size: '0x3000' })),
      ['mappings[1].gva: [0x7fffffe000, 0x8000001000) overlaps mappings[0] [0x8000000000, 0x8000001000)'],
    ],
    [
      'a mapping in the identity map',
      edit((j) => (j.mappings[0]!.gva = '0x3ff000')),
      ['mappings[0].gva: [0x3ff000, 0x400000) overlaps the bring-up identity map [0x0, 0x400000)'],
    ],
    [
      "a mapping over RETURN_GVA's page",
      edit((j) => (j.mappings[0] = { gva: '0xe00000', gpa: '0x400000', page: '2M' })),
      [
        'mappings[0].gva: [0xe00000, 0x1000000) covers RETURN_GVA 0xfff000, which must stay unmapped (it is the way back from CPL 3)',
      ],
    ],
    [
      'a non-canonical mapping with 4-level paging',
      edit((j) => (j.mappings[0]!.gva = '0x800000000000')),
      [
        'mappings[0].gva: [0x800000000000, 0x800000001000) is not canonical with 4-level paging (it must lie below 0x800000000000 or at or above 0xffff800000000000)',
      ],
    ],
    [
      'a mapping that crosses into the non-canonical hole',
      edit((j) => (j.mappings[0] = { gva: '0x7ffffffff000', gpa: '0x401000', size: '0x2000' })),
      [
        'mappings[0].gva: [0x7ffffffff000, 0x800000001000) is not canonical with 4-level paging (it must lie below 0x800000000000 or at or above 0xffff800000000000)',
      ],
    ],
    [
      'a gpa past 2^52',
      edit((j) => (j.mappings[0]!.gpa = '0x10000000000000')),
      ['mappings[0].gpa: [0x10000000000000, 0x10000000001000) goes beyond 2^52, the largest guest-physical address'],
    ],
    [
      'a level-5 override with 4-level paging',
      edit((j) => (j.mappings[0]!.raw = [{ level: 5, set: '0x80' }])),
      ['mappings[0].raw[0].level: there is no level-5 entry with 4-level paging'],
    ],
    [
      'a level-1 override on 2M pages',
      edit(
        (j) => (j.mappings[0] = { gva: '0x8000000000', gpa: '0x400000', page: '2M', raw: [{ level: 1, set: '0x2' }] }),
      ),
      ['mappings[0].raw[0].level: 2M pages have no level-1 entry (their leaf is level 2)'],
    ],
    [
      "an override of bring-up's PML4E",
      edit((j) => (j.mappings[0] = { gva: '0x40000000', gpa: '0x401000', raw: [{ level: 4, clear: '0x1' }] })),
      [
        "mappings[0].raw[0].level: the level-4 entry for 0x40000000 is also bring-up's (it maps [0x0, 0x400000)); it cannot be overridden",
      ],
    ],
    [
      'an override of the PDE that covers RETURN_GVA',
      edit((j) => (j.mappings[0] = { gva: '0xe00000', gpa: '0x401000', raw: [{ level: 2, set: '0x80' }] })),
      [
        'mappings[0].raw[0].level: the level-2 entry for 0xe00000 also covers RETURN_GVA 0xfff000; it cannot be overridden',
      ],
    ],
    [
      "table attributes on a mapping whose tables are all bring-up's",
      edit((j) => (j.mappings[0] = { gva: '0x600000', gpa: '0x600000', page: '2M', table: { u: false } })),
      [
        "mappings[0].table: every table entry above this mapping is bring-up's, so these attributes would apply to nothing",
      ],
    ],
    [
      'two mappings that disagree on a shared table entry',
      edit((j) => j.mappings.push({ gva: '0x8000001000', gpa: '0x402000', table: { u: false } })),
      ['mappings[1].table: differs from mappings[0].table, and both use the PDE for 0x8000000000'],
    ],
    [
      'mappings that need more tables than the pool holds',
      edit((j) => (j.mappings[0] = { gva: '0x8000000000', gpa: '0x0', page: '2M', size: '0x20000000000' })),
      ["mappings: the page tables need 2052 table pages but bring-up's pool has room for 235"],
    ],
    [
      'an access across a page boundary',
      edit((j) => (j.steps[0]!.gva = '0x8000000ffc')),
      ['steps[0].gva: an 8-byte access at 0x8000000ffc crosses a 4K page boundary; split it into two steps'],
    ],
    [
      'a value wider than the access',
      edit((j) => (j.steps = [{ guest: 'write', gva: '0x8000000000', size: 1, value: '0x100' }])),
      ['steps[0].value: 0x100 does not fit in 1 byte'],
    ],
    [
      'an expected value wider than the read',
      edit((j) => (j.steps = [{ guest: 'read', gva: '0x8000000000', size: 2, expect: { value: '0x10000' } }])),
      ['steps[0].expect.value: 0x10000 does not fit in 2 bytes'],
    ],
    [
      'expected PTEs of an unmapped address',
      edit((j) => (j.steps = [{ guest: 'read', gva: '0x9000000000', expect: { ptes: [{ level: 4, value: 0 }] } }])),
      ['steps[0].expect.ptes[0].level: no mapping covers 0x9000000000, so its level-4 entry is not known'],
    ],
    [
      'an expected level-1 entry of a 2M page',
      edit((j) => {
        j.mappings[0] = { gva: '0x8000000000', gpa: '0x400000', page: '2M' };
        j.steps = [{ guest: 'read', gva: '0x8000000000', expect: { ptes: [{ level: 1, value: 0 }] } }];
      }),
      ['steps[0].expect.ptes[0].level: 0x8000000000 is mapped by 2M pages, which have no level-1 entry'],
    ],
    [
      'write-pte with nothing to write',
      edit((j) => (j.steps = [{ host: 'write-pte', gva: '0x8000000000', level: 1 }])),
      ['steps[0]: write-pte needs "set", "clear" or "value"'],
    ],
    [
      'write-pte with value and set',
      edit((j) => (j.steps = [{ host: 'write-pte', gva: '0x8000000000', level: 1, value: 0, set: 1 }])),
      ['steps[0].value: give either "value" or "set"/"clear", not both'],
    ],
    [
      'write-pte of an unmapped address',
      edit((j) => (j.steps = [{ host: 'write-pte', gva: '0x9000000000', level: 1, clear: 1 }])),
      ['steps[0].level: no mapping covers 0x9000000000, so its level-1 entry is not known'],
    ],
    [
      "write-pte of bring-up's PML4E",
      edit((j) => {
        j.mappings[0] = { gva: '0x40000000', gpa: '0x401000' };
        j.steps = [{ host: 'write-pte', gva: '0x40000000', level: 4, clear: 1 }];
      }),
      ["steps[0].level: the level-4 entry for 0x40000000 is bring-up's; it cannot be written"],
    ],
    [
      'write-pte at level 5 with 4-level paging',
      edit((j) => (j.steps = [{ host: 'write-pte', gva: '0x8000000000', level: 5, clear: 1 }])),
      ['steps[0].level: there is no level-5 entry with 4-level paging'],
    ],
    [
      'clear-ad of an unmapped address',
      edit((j) => (j.steps = [{ host: 'clear-ad', gva: '0x9000000000' }])),
      ["steps[0].gva: no mapping covers 0x9000000000; clear-ad works on a mapping's entries"],
    ],
    [
      'the dirty log of an undeclared slot',
      edit((j) => (j.steps = [{ host: 'get-dirty-log', slot: 2 }])),
      ['steps[0].slot: memslot 2 is not declared in "memslots"'],
    ],
    [
      'the dirty log of slot 0',
      edit((j) => (j.steps = [{ host: 'clear-dirty-log', slot: 0 }])),
      ['steps[0].slot: slot 0 is bring-up memory, which does not log dirty pages'],
    ],
    [
      'a memslot step on an undeclared slot',
      edit((j) => (j.steps = [{ host: 'memslot-delete', slot: 9 }])),
      ['steps[0].slot: memslot 9 is not declared in "memslots"'],
    ],
    [
      'a step on a slot deleted earlier',
      edit((j) => {
        j.memslots = [{ slot: 1, gpa: '0x1000000', size: '0x10000' }];
        j.steps = [
          { host: 'memslot-delete', slot: 1 },
          { host: 'madvise', slot: 1, offset: '0x0', size: '0x1000', advice: 'dontneed' },
        ];
      }),
      ['steps[1].slot: memslot 1 was deleted by an earlier step'],
    ],
    [
      'a move onto another slot',
      edit((j) => {
        j.memslots = [
          { slot: 1, gpa: '0x1000000', size: '0x10000' },
          { slot: 2, gpa: '0x2000000', size: '0x10000' },
        ];
        j.steps = [{ host: 'memslot-move', slot: 1, gpa: '0x2008000' }];
      }),
      ['steps[0].gpa: memslot 1 moved to [0x2008000, 0x2018000) would overlap memslot 2 [0x2000000, 0x2010000)'],
    ],
    [
      'a read-only flag change',
      edit((j) => {
        j.memslots = [{ slot: 1, gpa: '0x1000000', size: '0x10000' }];
        j.steps = [{ host: 'memslot-flags', slot: 1, readonly: true }];
      }),
      [
        "steps[0].readonly: KVM does not let a memslot's read-only flag change (memslot 1 is declared writable); delete it and declare another",
      ],
    ],
    [
      'madvise past the end of the slot',
      edit((j) => {
        j.memslots = [{ slot: 1, gpa: '0x1000000', size: '0x10000' }];
        j.steps = [{ host: 'madvise', slot: 1, offset: '0xf000', size: '0x2000', advice: 'dontneed' }];
      }),
      ['steps[0].size: 0xf000+0x2000 runs past the end of memslot 1 (0x10000 bytes)'],
    ],
    [
      'a remap of memory no munmap took away, and an mprotect of unmapped memory',
      edit((j) => {
        j.memslots = [{ slot: 1, gpa: '0x1000000', size: '0x10000' }];
        j.steps = [
          { host: 'remap', slot: 1, offset: '0x0', size: '0x1000' },
          { host: 'munmap', slot: 1, offset: '0x1000', size: '0x2000' },
          { host: 'mprotect', slot: 1, offset: '0x2000', size: '0x1000', prot: 'read' },
          { host: 'remap', slot: 1, offset: '0x1000', size: '0x2000' },
          { host: 'mprotect', slot: 1, offset: '0x2000', size: '0x1000', prot: 'read' },
        ];
      }),
      [
        'steps[0]: remap needs the whole range unmapped by earlier munmap steps; 0x0+0x1000 of memslot 1 is not',
        "steps[2]: memslot 1's memory at offset 0x2000 was unmapped by an earlier munmap step (remap it first)",
      ],
    ],
    [
      'munmap of a hugetlb slot in 4K pieces, and a pre-fault outside every slot',
      edit((j) => {
        j.memslots = [{ slot: 1, gpa: '0x1000000', size: '0x200000', backing: 'hugetlb2m' }];
        j.steps = [
          { host: 'munmap', slot: 1, offset: '0x1000', size: '0x1000' },
          { host: 'pre-fault', gpa: '0x3000000', size: '0x1000' },
        ];
      }),
      [
        'steps[0]: offset and size must be hugetlb2m page (0x200000) aligned and size non-zero',
        'steps[1].gpa: 0x3000000 is not inside a declared user memslot',
      ],
    ],
    ['two vCPUs without a race', edit((j) => (j.vcpus = 2)), ['vcpus: 2 vCPUs need a "race" (steps run on one vCPU)']],
    [
      'a race on one vCPU, with steps, over an unmapped page, a slot without a log, and a slot both logged and toggled',
      edit((j) => {
        j.memslots = [
          { slot: 1, gpa: '0x1000000', size: '0x10000', logDirty: true },
          { slot: 2, gpa: '0x2000000', size: '0x10000' },
          { slot: 3, gpa: '0x3000000', size: '0x10000', logDirty: true },
        ];
        j.mappings = [
          { gva: '0x8000000000', gpa: '0x1000000', size: '0x1000', leaf: { w: true } },
          { gva: '0x8000100000', gpa: '0x2000000', size: '0x2000', leaf: { w: true } },
          { gva: '0x8000200000', gpa: '0x3000000', size: '0x2000', leaf: { w: true } },
        ];
        j.race = {
          pages: 2,
          rounds: 1,
          targets: [
            { slot: 1, gva: '0x8000000000', host: ['dirty-log'] },
            { slot: 2, gva: '0x8000100000', host: ['dirty-log'] },
            { slot: 3, gva: '0x8000200000', host: ['dirty-log', 'toggle-dirty-log'] },
          ],
        };
      }),
      [
        'vcpus: a race needs at least 2 vCPUs',
        'steps: a race scenario has no steps',
        'race.targets[0].gva: 0x8000001000 is not covered by a present, writable mapping without raw overrides',
        'race.targets[1].host: "dirty-log" needs memslot 2 declared with "logDirty": true',
        'race.targets[2].host: "dirty-log" and "toggle-dirty-log" on one slot would leave the pages logged in a round unknown; use two targets',
      ],
    ],
    [
      'a CPL 3 race over supervisor pages',
      edit((j) => {
        j.vcpus = 2;
        j.steps = [];
        j.race = { pages: 1, rounds: 1, cpl: 3, targets: [{ slot: 1, gva: '0x8000000000', host: ['dirty-log'] }] };
      }),
      ['race.targets[0].gva: 0x8000000000 is not mapped for user accesses, which a CPL 3 race needs'],
    ],
    [
      'the dirty log of a slot that keeps none',
      edit((j) => {
        j.memslots[0]!.logDirty = false;
        j.steps = [{ host: 'get-dirty-log', slot: 1 }];
      }),
      [
        'steps[0].slot: memslot 1 does not log dirty pages here (set "logDirty": true, or turn it on with a memslot-flags step)',
      ],
    ],
    [
      'expected dirty pages that are misaligned or outside the slot',
      edit((j) => (j.steps = [{ host: 'get-dirty-log', slot: 1, expect: ['0x401008', '0x800000'] }])),
      [
        'steps[0].expect[0]: 0x401008 is not 4K aligned',
        'steps[0].expect[1]: 0x800000 is not inside memslot 1 [0x400000, 0x800000)',
      ],
    ],
    [
      'an invalid translation with a gpa',
      edit((j) => (j.steps = [{ host: 'translate', gva: '0x8000000000', expect: { valid: false, gpa: '0x401000' } }])),
      ['steps[0].expect.gpa: an invalid translation has no gpa'],
    ],
    [
      'an exec at RETURN_GVA and a read in its page',
      edit(
        (j) =>
          (j.steps = [
            { guest: 'read', gva: '0x8000000000' },
            { guest: 'read', gva: '0xfff008' },
            { guest: 'exec', gva: '0xfff000' },
          ]),
      ),
      [1, 2].map(
        (i) =>
          `steps[${i}].gva: ${i === 1 ? '0xfff008' : '0xfff000'} is in the page of the harness's RETURN_GVA 0xfff000, ` +
          'which stays unmapped as the way back from CPL 3 (a fault there is taken for that return); use another address',
      ),
    ],
    [
      'a write and an exec of bring-up memory',
      edit(
        (j) =>
          (j.steps = [
            { guest: 'read', gva: '0x3000' },
            { guest: 'write', gva: '0x3000' },
            { guest: 'exec', gva: '0x100000', cpl: 3 },
          ]),
      ),
      [
        "steps[1].gva: 0x3000 is in bring-up memory [0x0, 0x400000) (the guest's descriptor tables, handlers, stacks, code and page tables), " +
          'which a step may read but not write',
        "steps[2].gva: 0x100000 is in bring-up memory [0x0, 0x400000) (the guest's descriptor tables, handlers, stacks, code and page tables), " +
          'which a step may read but not execute',
      ],
    ],
    [
      "an exec through a mapping onto bring-up's GPAs",
      edit((j) => {
        j.mappings.push({ gva: '0x9000000000', gpa: '0x100000' });
        j.steps = [
          { guest: 'read', gva: '0x9000000000' },
          { guest: 'exec', gva: '0x9000000000' },
        ];
      }),
      [
        "steps[1].gva: 0x9000000000 is mapped to 0x100000, in bring-up memory [0x0, 0x400000) (the guest's descriptor tables, handlers, " +
          'stacks, code and page tables), which a step may read but not execute',
      ],
    ],
    [
      'a memslot over 4 GiB',
      edit((j) => (j.memslots[0]!.size = '0x100001000')),
      [
        'memslots[0].size: 0x100001000 is larger than 0x100000000 (4 GiB), the most the harness maps for one slot (one ArrayBuffer)',
      ],
    ],
  ];
  for (const [what, json, errors] of cases) {
    it(`rejects ${what}`, () => expect(errorsOf(json)).toEqual(errors));
  }

  it('accepts a memslot of exactly 4 GiB', () => {
    expect(errorsOf(edit((j) => (j.memslots[0]!.size = '0x100000000')))).toEqual([]);
  });

  it('checks host ranges of any size at once, never page by page', () => {
    const t0 = performance.now();
    const huge = edit((j) => {
      j.memslots[0]!.size = '0x10000';
      j.steps = [
        { host: 'munmap', slot: 1, offset: '0x0', size: '0x8000000000000000' },
        { host: 'munmap', slot: 1, offset: '0x1000', size: '0x1000' },
        { host: 'remap', slot: 1, offset: '0x0', size: '0xfffffffffffff000' },
      ];
    });
    expect(errorsOf(huge)).toEqual([
      'steps[0].size: 0x0+0x8000000000000000 runs past the end of memslot 1 (0x10000 bytes)',
      "steps[1]: memslot 1's memory at offset 0x1000 was unmapped by an earlier munmap step (remap it first)",
      'steps[2].size: 0x0+0xfffffffffffff000 runs past the end of memslot 1 (0x10000 bytes)',
    ]);
    expect(performance.now() - t0).toBeLessThan(2000);
  });

  it('tells a partly unmapped range from a wholly unmapped one', () => {
    const steps = (...more: J[]) =>
      edit(
        (j) =>
          (j.steps = [
            { host: 'munmap', slot: 1, offset: '0x1000', size: '0x2000' },
            { host: 'remap', slot: 1, offset: '0x2000', size: '0x1000' },
            ...more,
          ]),
      );
    expect(errorsOf(steps({ host: 'remap', slot: 1, offset: '0x1000', size: '0x1000' }))).toEqual([]);
    expect(errorsOf(steps({ host: 'remap', slot: 1, offset: '0x1000', size: '0x2000' }))).toEqual([
      'steps[2]: remap needs the whole range unmapped by earlier munmap steps; 0x1000+0x2000 of memslot 1 is not',
    ]);
    expect(errorsOf(steps({ host: 'madvise', slot: 1, offset: '0x2000', size: '0x3000', advice: 'dontneed' }))).toEqual(
      [],
    );
    expect(errorsOf(steps({ host: 'mprotect', slot: 1, offset: '0x0', size: '0x3000', prot: 'read' }))).toEqual([
      "steps[2]: memslot 1's memory at offset 0x1000 was unmapped by an earlier munmap step (remap it first)",
    ]);
  });

  it('allows step addresses that no mapping covers (not-present faults)', () => {
    const s = ok(
      edit(
        (j) =>
          (j.steps = [
            { guest: 'read', gva: '0x9000000000' },
            { host: 'translate', gva: '0x9000000000' },
            { guest: 'invlpg', gva: '0x1234' },
          ]),
      ),
    );
    expect(s.steps).toHaveLength(3);
  });

  it('accepts an address above 2^47 only with 5-level paging', () => {
    const j = edit((j) => (j.mappings[0]!.gva = '0x1000000000000'));
    expect(errorsOf(j)).toEqual([
      'mappings[0].gva: [0x1000000000000, 0x1000000001000) is not canonical with 4-level paging (it must lie below 0x800000000000 or at or above 0xffff800000000000)',
    ]);
    j.paging = { levels: 5 };
    expect(errorsOf(j)).toEqual([]);
  });

  it('accepts the upper canonical half', () => {
    expect(errorsOf(edit((j) => (j.mappings[0]!.gva = '0xffff800000000000')))).toEqual([]);
    expect(errorsOf(edit((j) => (j.mappings[0]!.gva = '0xfffffffffffff000')))).toEqual([]);
  });

  it('accepts mappings that share table entries with the same attributes, and overrides of the shared entries', () => {
    const j = edit((j) => {
      j.mappings[0]!.table = { a: true };
      j.mappings.push({
        gva: '0x8000001000',
        gpa: '0x402000',
        table: { a: true },
        raw: [{ level: 2, set: '0x8000000000000000' }],
      });
    });
    expect(errorsOf(j)).toEqual([]);
  });
});

describe('loading scenario files', () => {
  // Made in a hook, so a run that filters these tests out leaves nothing behind.
  let dir = '';
  beforeAll(() => void (dir = mkdtempSync(join(tmpdir(), 'kvmharness-scenario-'))));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));
  const file = (name: string, text: string) => {
    const p = join(dir, name);
    writeFileSync(p, text);
    return p;
  };

  it('loads a file and records where it came from', () => {
    const p = file('good.json', JSON.stringify(base()));
    expect(loadScenario(p)).toEqual({ ...ok(base()), source: p });
  });

  it('says "<path>: <first error>" and how many more', () => {
    const p = file(
      'bad.json',
      JSON.stringify(
        edit(
          (j) =>
            (j.steps = [
              { guest: 'read', gva: '12z', cpl: 2 },
              { guest: 'exec', gva: -3 },
            ]),
        ),
      ),
    );
    try {
      loadScenario(p);
    } catch (e) {
      expect(e).toBeInstanceOf(ScenarioError);
      expect((e as ScenarioError).message).toBe(
        `${p}: steps[0].gva: expected a hex string like "0x1000" or a non-negative integer, got "12z" (and 2 more errors)`,
      );
      expect((e as ScenarioError).errors).toHaveLength(3);
    }
    const one = file('one.json', JSON.stringify(edit((j) => (j.vcpus = 9))));
    expect(() => loadScenario(one)).toThrow(`${one}: vcpus: expected one of 1, 2, 3, 4, got 9`);
    expect(() => loadScenario(one)).not.toThrow(/more error/);
  });

  it('reports unreadable files and bad JSON on one line', () => {
    expect(() => loadScenario(join(dir, 'missing.json'))).toThrow(
      `${join(dir, 'missing.json')}: cannot read: no such file`,
    );
    expect(() => loadScenario(dir)).toThrow(`${dir}: cannot read: is a directory`);
    const p = file('syntax.json', '{ "name": "x", }');
    expect(() => loadScenario(p)).toThrow(
      new RegExp(`^${p.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}: not valid JSON: [^\\n]+$`),
    );
  });

  it('names the file and the depth of a file nested too deep, before validation recurses', () => {
    const p = file(
      'deep.json',
      JSON.stringify(base()).replace('"steps":[', `"steps":[${'['.repeat(4999)}${']'.repeat(4999)},`),
    );
    expect(() => loadScenario(p)).toThrow(
      new ScenarioError(p, ['(top level): nests 5001 levels deep; a scenario nests at most 64']),
    );
  });

  it('parseScenario names its source in errors', () => {
    expect(() => parseScenario('[]', 'inline')).toThrow('inline: (top level): expected an object, got []');
  });
});

describe('round trip', () => {
  const rich = edit((j) => {
    j.paging = {
      levels: 4,
      cr0: { wp: false },
      cr4: { smep: true, smap: true, pke: true },
      efer: { nxe: false },
      pkru: '0x24',
      vendor: 'intel',
    };
    j.memslots.push({ slot: 2, gpa: '0x40000000', size: '0x40000000', backing: 'hugetlb1g', readonly: true });
    j.mappings.push({
      gva: '0xffff800000000000',
      gpa: '0x40000000',
      page: '1G',
      size: '0x80000000',
      leaf: { p: false, w: true, u: true, nx: true, a: true, d: true, g: true, pwt: true, pcd: true, pkey: 9 },
      table: { p: false, w: false, u: false, nx: true, a: true, pwt: true, pcd: true },
      raw: [
        { level: 3, set: '0x8000000000000', clear: '0x1' },
        { level: 4, set: '0x80' },
      ],
    });
    j.steps = [
      {
        guest: 'write',
        gva: '0x8000000ff8',
        size: 8,
        cpl: 3,
        value: '0xffffffffffffffff',
        expect: { fault: '0x27', ptes: [{ level: 1, value: '0x8000000000401063' }] },
      },
      { guest: 'read', gva: '0x8000000000', size: 2, eflagsAc: true, expect: { fault: false, value: '0xbeef' } },
      { guest: 'exec', gva: '0x8000000000', cpl: 3 },
      { guest: 'invlpg', gva: '0x8000000000' },
      { guest: 'reload-cr3' },
      { guest: 'set-cr0-wp', value: true },
      { guest: 'set-cr4', bit: 'pke', value: false },
      { host: 'write-pte', gva: '0x8000000000', level: 1, set: '0x2', clear: '0x4' },
      { host: 'write-pte', gva: '0xffff800000000000', level: 3, value: '0x0' },
      { host: 'clear-ad', gva: '0x8000000000' },
      { host: 'get-dirty-log', slot: 1, expect: ['0x401000', '0x402000'] },
      { host: 'get-dirty-log', slot: 1 },
      { host: 'clear-dirty-log', slot: 1 },
      { host: 'translate', gva: '0x8000000000', expect: { valid: false } },
      { host: 'munmap', slot: 1, offset: '0x1000', size: '0x1000' },
      { host: 'remap', slot: 1, offset: '0x1000', size: '0x1000' },
      { host: 'mprotect', slot: 1, offset: '0x0', size: '0x2000', prot: 'none' },
      { host: 'pre-fault', gpa: '0x400000', size: '0x2000' },
      {
        host: 'translate',
        gva: '0xffff800000000000',
        stats: { mmio_exits: 0, pages_4k: '-2', pf_fixed: '>=1', remote_tlb_flush: '<=3', exits: '+4' },
      },
    ];
  });

  it('scenarioToJson then validation gives the scenario back', () => {
    const s = ok(rich);
    const again = ok(JSON.parse(JSON.stringify(scenarioToJson(s))));
    expect(again).toEqual(s);
  });

  it('a race scenario survives the round trip', () => {
    const s = ok(
      edit((j) => {
        j.vcpus = 3;
        j.steps = [];
        j.mappings[0]!.size = '0x6000';
        j.race = {
          pages: 2,
          rounds: 7,
          cpl: 0,
          targets: [{ slot: 1, gva: '0x8000000000', host: ['dirty-log', 'dontneed'] }],
        };
      }),
    );
    expect(s.race).toEqual({
      pages: 2,
      rounds: 7,
      cpl: 0,
      targets: [{ slot: 1, gva: 0x8000000000n, host: ['dirty-log', 'dontneed'] }],
    });
    expect(ok(JSON.parse(JSON.stringify(scenarioToJson(s))))).toEqual(s);
  });

  it('writes 64-bit values as lowercase hex strings and every default out', () => {
    const j = scenarioToJson(
      ok({ name: 'min', description: 'd', mappings: [{ gva: 549755813888, gpa: '0X401000' }] }),
    ) as J;
    expect(j.mappings).toEqual([
      {
        gva: '0x8000000000',
        gpa: '0x401000',
        page: '4K',
        size: '0x1000',
        leaf: { p: true, w: false, u: false, pwt: false, pcd: false, a: false, d: false, g: false, nx: false, pkey: 0 },
        table: { p: true, w: true, u: true, pwt: false, pcd: false, a: false, nx: false },
        raw: [],
      },
    ]);
    expect(j.paging).toEqual({
      levels: 4,
      cr0: { wp: true },
      cr4: { smep: false, smap: false, pke: false },
      efer: { nxe: true },
      pkru: '0x0',
      vendor: 'auto',
    });
  });
});

// ---------------------------------------------------------------------------------
// Generated documents.

/** A validator for the JSON Schema subset jsonSchema() uses, to show the schema accepts and rejects what the validator does. */
let schemaRoot: J = {};
function schemaAccepts(schema: J, v: unknown): boolean {
  if (typeof schema.$ref === 'string') {
    const [, name] = /^#\/\$defs\/(.+)$/.exec(schema.$ref)!;
    return schemaAccepts((schemaRoot.$defs as Record<string, J>)[name!]!, v);
  }
  if ('const' in schema && v !== schema.const) return false;
  if (schema.enum && !(schema.enum as unknown[]).includes(v)) return false;
  const t = schema.type as string | undefined;
  if (t === 'object' && !(typeof v === 'object' && v !== null && !Array.isArray(v))) return false;
  if (t === 'array' && !Array.isArray(v)) return false;
  if (t === 'string' && typeof v !== 'string') return false;
  if (t === 'boolean' && typeof v !== 'boolean') return false;
  if (t === 'integer' && !Number.isInteger(v)) return false;
  if (typeof v === 'string') {
    if (schema.minLength !== undefined && v.length < (schema.minLength as number)) return false;
    if (schema.pattern && !new RegExp(schema.pattern as string).test(v)) return false;
  }
  if (typeof v === 'number') {
    if (schema.minimum !== undefined && v < (schema.minimum as number)) return false;
    if (schema.maximum !== undefined && v > (schema.maximum as number)) return false;
  }
  if (Array.isArray(v) && schema.items && !v.every((x) => schemaAccepts(schema.items as J, x))) return false;
  if (t === 'object') {
    const o = v as J;
    const props = (schema.properties ?? {}) as Record<string, J>;
    if (((schema.required ?? []) as string[]).some((k) => !(k in o))) return false;
    for (const [k, x] of Object.entries(o)) {
      if (schema.propertyNames && !schemaAccepts(schema.propertyNames as J, k)) return false;
      if (props[k]) {
        if (!schemaAccepts(props[k]!, x)) return false;
      } else if (schema.additionalProperties === false) return false;
      else if (typeof schema.additionalProperties === 'object' && !schemaAccepts(schema.additionalProperties as J, x))
        return false;
    }
  }
  if (schema.oneOf && (schema.oneOf as J[]).filter((s) => schemaAccepts(s, v)).length !== 1) return false;
  return true;
}

function between(text: string, begin: RegExp, end: string): { before: string; inside: string; after: string } {
  const b = text.match(begin);
  if (!b || b.index === undefined) throw new Error(`marker ${begin} missing`);
  const start = b.index + b[0].length;
  const stop = text.indexOf(end, start);
  if (stop < 0) throw new Error(`marker ${end} missing`);
  return { before: text.slice(0, start), inside: text.slice(start, stop), after: text.slice(stop) };
}

describe('generated documents', () => {
  it('docs/scenario.schema.json is the schema jsonSchema() builds (KVMHARNESS_UPDATE_DOCS=1 rewrites it)', () => {
    const path = join(ROOT, 'docs', 'scenario.schema.json');
    const generated = `${JSON.stringify(jsonSchema(), null, 2)}\n`;
    if (UPDATE) writeFileSync(path, generated);
    expect(readFileSync(path, 'utf8')).toBe(generated);
  });

  it('docs/scenarios.md holds the field reference fieldReference() builds (KVMHARNESS_UPDATE_DOCS=1 rewrites it)', () => {
    const path = join(ROOT, 'docs', 'scenarios.md');
    const text = readFileSync(path, 'utf8');
    const part = between(text, /<!-- field-reference:begin[^>]*-->\n/, '<!-- field-reference:end -->');
    const generated = `\n${fieldReference()}\n`;
    if (UPDATE) writeFileSync(path, part.before + generated + part.after);
    expect(
      between(readFileSync(path, 'utf8'), /<!-- field-reference:begin[^>]*-->\n/, '<!-- field-reference:end -->')
        .inside,
    ).toBe(generated);
  });

  it('the field reference documents every field with its default', () => {
    const ref = fieldReference();
    expect(ref).toContain('| `p` | boolean | `true` | Present (bit 0). |');
    expect(ref).toContain('| `size` | u64 | one page | Bytes; a non-zero multiple of the page size. |');
    expect(ref).toContain('| `gva` | u64 | required | First guest-virtual address; aligned to the page size. |');
    expect(ref).toContain('#### host write-pte');
  });

  it('the schema accepts every built-in scenario and rejects what the validator rejects for shape', () => {
    const schema = jsonSchema();
    schemaRoot = schema;
    expect(schema.$schema).toBe('https://json-schema.org/draft/2020-12/schema');
    for (const name of builtinScenarios()) {
      expect(
        schemaAccepts(schema, JSON.parse(readFileSync(join(builtinScenarioDir(), `${name}.json`), 'utf8'))),
        name,
      ).toBe(true);
    }
    expect(schemaAccepts(schema, base())).toBe(true);
    for (const bad of [
      edit((j) => (j.steps[0]!.gva = '12z')),
      edit((j) => (j.steps[0]!.size = 3)),
      edit((j) => (j.mappings[0]!.gvaa = 1)),
      edit((j) => (j.steps = [{ guest: 'exec', gva: 0, size: 1 }])),
      edit((j) => (j.steps = [{ host: 'reboot' }])),
      edit((j) => (j.paging = { pkru: '0x100000000' })),
      edit((j) => (j.steps[0]!.gva = '0x10000000000000000')),
      edit((j) => (j.steps[0]!.stats = { pf_fixd: 1 })),
      edit((j) => (j.steps[0]!.stats = { pf_fixed: '>1' })),
      { name: 'x' },
    ]) {
      expect(errorsOf(bad)).not.toEqual([]);
      expect(schemaAccepts(schema, bad), JSON.stringify(bad)).toBe(false);
    }
  });
});

// ---------------------------------------------------------------------------------
// Built-in scenarios.

/**
 * Runs a scenario's steps through the model alone: each access is walked in a
 * MemImage and its A/D writes and stored bytes applied, host steps edit the
 * image. Returns, per access step, the model's walk, to compare with the
 * scenario's explicit expectations.
 */
function simulate(s: Scenario, cpu = { vendor: 'amd', maxPhyAddr: 48, pdpe1gb: true }) {
  const mem = new MemImage();
  const boot = bringUp(mem, bringUpOptions(s));
  const built = buildScenarioTables(s, mem, boot);
  let cfg = pagingConfigFor(s, cpu);
  const read = (gpa: bigint) => mem.read64(gpa);
  const out: { step: number; walk: WalkResult; value?: bigint; ptes: Map<number, bigint> }[] = [];
  const dirty = new Map<number, Set<bigint>>();
  const dirtyLogs: { step: number; pages: bigint[] }[] = [];
  const translations: { step: number; valid: boolean; gpa?: bigint }[] = [];
  s.steps.forEach((st, i) => {
    // write-pte and clear-ad change memory the same way from either side.
    if (st.side === 'guest' && st.kind !== 'write-pte' && st.kind !== 'clear-ad') {
      if (st.kind === 'set-cr0-wp') cfg = { ...cfg, cr0Wp: st.value };
      if (st.kind === 'set-cr4')
        cfg = { ...cfg, [{ smep: 'cr4Smep', smap: 'cr4Smap', pke: 'cr4Pke' }[st.bit]]: st.value };
      if (st.kind !== 'access') return;
      const w = walk(
        cfg,
        boot.tables.root,
        { gva: st.gva, kind: st.access, cpl: st.cpl, eflagsAc: st.eflagsAc, size: st.size },
        read,
      );
      let value: bigint | undefined;
      if (w.ok) {
        for (const a of w.adWrites) mem.write64(a.pteGpa, a.new);
        if (st.access === 'write') {
          mem.write(
            w.gpa,
            [...Array(st.size).keys()].map((b) => Number((st.value >> BigInt(8 * b)) & 0xffn)),
          );
          for (const m of s.memslots)
            if (m.logDirty && w.gpa >= m.gpa && w.gpa < m.gpa + m.size)
              dirty.set(m.slot, (dirty.get(m.slot) ?? new Set()).add(w.gpa & ~0xfffn));
        }
        if (st.access === 'read') value = BigInt.asUintN(st.size * 8, mem.read64(w.gpa));
      }
      const ptes = new Map<number, bigint>();
      for (const p of st.expect?.ptes ?? []) ptes.set(p.level, mem.read64(built.entries(st.gva, p.level)));
      out.push({ step: i, walk: w, value, ptes });
      return;
    }
    switch (st.kind) {
      case 'write-pte': {
        const e = built.entries(st.gva, st.level);
        mem.write64(e, st.value ?? (mem.read64(e) & ~st.clear) | st.set);
        return;
      }
      case 'clear-ad': {
        const w = walk(cfg, boot.tables.root, { gva: st.gva, kind: 'read', cpl: 0 }, read);
        for (const l of w.levels) mem.write64(l.pteGpa, l.pte & ~(A | D));
        return;
      }
      case 'get-dirty-log':
        if ('gpa' in st) throw new Error(`step ${i}: a dirty log over a GPA range is not simulated here`);
        dirtyLogs.push({ step: i, pages: [...(dirty.get(st.slot) ?? [])].sort((a, b) => (a < b ? -1 : 1)) });
        if (!s.steps.some((x) => x.side === 'host' && x.kind === 'clear-dirty-log')) dirty.delete(st.slot);
        return;
      case 'clear-dirty-log':
        if ('gpa' in st) throw new Error(`step ${i}: a clear over a GPA range is not simulated here`);
        if (st.first !== undefined || st.pages !== undefined) {
          // A clear of part of the slot, where KVM takes the range (clearDirtyRefusal).
          const m = s.memslots.find((x) => x.slot === st.slot)!;
          const npages = Number(m.size >> 12n);
          const first = st.first ?? 0;
          const count = st.pages ?? npages - first;
          if (clearDirtyRefusal(npages, first, count)) return;
          for (const p of dirty.get(st.slot) ?? []) {
            const page = Number((p - m.gpa) >> 12n);
            if (page >= first && page < first + count) dirty.get(st.slot)!.delete(p);
          }
          return;
        }
        dirty.delete(st.slot);
        return;
      case 'translate': {
        const w = walk(cfg, boot.tables.root, { gva: st.gva, kind: 'read', cpl: 0 }, read);
        translations.push(w.ok ? { step: i, valid: true, gpa: w.gpa } : { step: i, valid: false });
        return;
      }
    }
  });
  return { out, dirtyLogs, translations };
}

describe('built-in scenarios', () => {
  const names = builtinScenarios();

  it('there are at least 8, one per file, named after the file, each with a description', () => {
    expect(names.length).toBeGreaterThanOrEqual(8);
    expect(readdirSync(builtinScenarioDir()).filter((f) => !f.endsWith('.json'))).toEqual([]);
    for (const n of names) {
      const s = loadScenario(join(builtinScenarioDir(), `${n}.json`));
      expect(s.name).toBe(n);
      expect(s.description.length).toBeGreaterThan(60);
    }
  });

  it('every built-in scenario validates', () => {
    for (const n of names) expect(() => loadScenario(join(builtinScenarioDir(), `${n}.json`)), n).not.toThrow();
  });

  it('1G pages appear only in scenarios whose description says they need pdpe1gb', () => {
    for (const n of names) {
      const s = loadScenario(join(builtinScenarioDir(), `${n}.json`));
      if (s.mappings.some((m) => m.page === '1G')) expect(s.description, n).toMatch(/pdpe1gb/);
    }
  });

  it('together they cover the cases the suite promises', () => {
    const all = names.map((n) => loadScenario(join(builtinScenarioDir(), `${n}.json`)));
    const steps = all.flatMap((s) => s.steps);
    const faults = new Set(
      steps.flatMap((st) =>
        st.side === 'guest' && st.kind === 'access' && typeof st.expect?.fault === 'number' ? [st.expect.fault] : [],
      ),
    );
    // not present (supervisor read, write, user read, fetch), protection with W/U/I, reserved
    for (const ec of [0x0, 0x2, 0x4, 0x10, 0x3, 0x5, 0x7, 0x11, 0x9, 0xb, 0xd])
      expect(faults.has(ec), `error code 0x${ec.toString(16)}`).toBe(true);
    const raws = all.flatMap((s) => s.mappings.flatMap((m) => m.raw));
    for (const level of [2, 3, 4])
      expect(
        raws.some((r) => r.level === level && r.clear & P),
        `not-present level ${level}`,
      ).toBe(true);
    expect(
      all.some((s) => s.mappings.some((m) => !m.leaf.p)),
      'not-present leaf',
    ).toBe(true);
    expect(raws.some((r) => r.level === 4 && r.set & PS)).toBe(true); // PS in a PML4E
    expect(raws.some((r) => r.set & (1n << 51n))).toBe(true); // bit 51
    expect(raws.some((r) => r.level === 2 && r.set & NX)).toBe(true); // NX in a PDE
    expect(all.some((s) => s.mappings.some((m) => m.page === '2M'))).toBe(true);
    expect(steps.some((st) => st.kind === 'set-cr0-wp')).toBe(true);
    for (const kind of [
      'clear-ad',
      'write-pte',
      'get-dirty-log',
      'clear-dirty-log',
      'translate',
      'invlpg',
      'reload-cr3',
    ]) {
      expect(
        steps.some((st) => st.kind === kind),
        kind,
      ).toBe(true);
    }
    expect(all.some((s) => s.memslots.some((m) => m.logDirty && m.slot >= 1 && m.gpa >= 0x400000n))).toBe(true);
    // The host dimension: host memory changes, stats, THP with dirty logging, races.
    for (const kind of ['munmap', 'remap', 'mprotect', 'pre-fault', 'madvise', 'memslot-delete', 'memslot-flags']) {
      expect(
        steps.some((st) => st.kind === kind),
        kind,
      ).toBe(true);
    }
    expect(steps.filter((st) => st.stats).length).toBeGreaterThanOrEqual(2);
    expect(
      all.filter((s) => s.steps.some((st) => st.stats && Object.keys(st.stats).some((k) => statClass(k) === 'general')))
        .length,
    ).toBeGreaterThanOrEqual(2);
    expect(
      all.some(
        (s) =>
          s.memslots.some((m) => m.backing === 'thp') &&
          s.steps.some((st) => st.kind === 'memslot-flags' && st.logDirty),
      ),
    ).toBe(true);
    const ops = new Set(all.flatMap((s) => s.race?.targets.flatMap((t) => t.host) ?? []));
    for (const op of ['dirty-log', 'dontneed', 'toggle-dirty-log', 'delete'])
      expect(ops.has(op as never), op).toBe(true);
    expect(all.some((s) => s.race?.cpl === 3)).toBe(true);
  });

  // Scenarios that change memslots or host memory need the engine's model of
  // guest-physical memory; test/engine.test.ts runs those against KVM.
  const HOST_MEMORY_STEPS = new Set([
    'memslot-delete',
    'memslot-move',
    'memslot-flags',
    'madvise',
    'munmap',
    'remap',
    'mprotect',
    'pre-fault',
    'punch-hole',
    'read-memory',
    'close-guest-memfd',
    'memslot-create',
    'write-memory',
  ]);
  const pureWalk = names.filter(
    (n) => !loadScenario(join(builtinScenarioDir(), `${n}.json`)).steps.some((st) => HOST_MEMORY_STEPS.has(st.kind)),
  );
  for (const n of pureWalk) {
    it(`${n}: its explicit expectations agree with the model`, () => {
      const s = loadScenario(join(builtinScenarioDir(), `${n}.json`));
      const { out, dirtyLogs, translations } = simulate(s);
      for (const r of out) {
        const st = s.steps[r.step]!;
        if (st.side !== 'guest' || st.kind !== 'access' || !st.expect) continue;
        const e = st.expect;
        const where = `${n} step ${r.step}`;
        if (e.fault !== undefined) expect(r.walk.ok ? false : r.walk.errorCode, where).toBe(e.fault);
        if (e.value !== undefined) expect(r.value, where).toBe(e.value);
        for (const p of e.ptes ?? []) expect(r.ptes.get(p.level), `${where} level ${p.level}`).toBe(p.value);
      }
      for (const d of dirtyLogs) {
        const st = s.steps[d.step]!;
        if (st.side === 'host' && st.kind === 'get-dirty-log' && st.expect)
          expect(d.pages, `${n} step ${d.step}`).toEqual(st.expect);
      }
      for (const t of translations) {
        const st = s.steps[t.step]!;
        if (st.side === 'host' && st.kind === 'translate' && st.expect)
          expect({ valid: t.valid, ...(t.gpa !== undefined ? { gpa: t.gpa } : {}) }).toEqual(st.expect);
      }
    });
  }
});

// ---------------------------------------------------------------------------------
// Building the tables.

describe('buildScenarioTables', () => {
  // Bring-up takes pool pages 0x10000 (PML4), 0x11000 (PDPT), 0x12000 (PD),
  // 0x13000 and 0x14000 (PTs of the identity map); the scenario's tables follow
  // in the order its mappings need them.
  const s = ok({
    name: 'tables',
    description: 'd',
    mappings: [
      // PML4[1] -> PDPT 0x15000 -> PD 0x16000 -> PT 0x17000; PTE 0 and 1
      {
        gva: '0x8000000000',
        gpa: '0x401000',
        size: '0x2000',
        leaf: { w: true, u: true, g: true, pkey: 3 },
        table: { a: true },
      },
      // PML4[2] -> PDPT 0x18000 -> PD 0x19000; PDE 1 is a 2M leaf
      {
        gva: '0x10000200000',
        gpa: '0x600000',
        page: '2M',
        leaf: { nx: true, pcd: true, pwt: true, d: true, a: true },
        table: { p: false, w: false, u: false, nx: true },
      },
      // PML4[0] (bring-up's) -> PDPT 0x11000 entry 1 -> PD 0x1a000 -> PT 0x1b000
      {
        gva: '0x40000000',
        gpa: '0x403000',
        leaf: { p: false },
        raw: [
          { level: 1, set: '0x8000000000000' },
          { level: 3, set: '0x10' },
          { level: 2, clear: '0x2' },
        ],
      },
    ],
  });

  function build() {
    const mem = new MemImage();
    const boot = bringUp(mem, bringUpOptions(s));
    return { mem, boot, built: buildScenarioTables(s, mem, boot) };
  }

  it('writes the entries the attributes and overrides describe', () => {
    const { mem, built } = build();
    const PKEY3 = 3n << 59n;
    const expected: [string, bigint, number, bigint, bigint][] = [
      // what, gva, level, entry GPA, value
      ['PML4E of mapping 0', 0x8000000000n, 4, 0x10008n, 0x15000n | P | W | U | A],
      ['PDPTE of mapping 0', 0x8000000000n, 3, 0x15000n, 0x16000n | P | W | U | A],
      ['PDE of mapping 0', 0x8000000000n, 2, 0x16000n, 0x17000n | P | W | U | A],
      ['PTE 0 of mapping 0', 0x8000000000n, 1, 0x17000n, 0x401000n | P | W | U | G | PKEY3],
      ['PTE 1 of mapping 0', 0x8000001000n, 1, 0x17008n, 0x402000n | P | W | U | G | PKEY3],
      ['PML4E of mapping 1', 0x10000200000n, 4, 0x10010n, 0x18000n | NX],
      ['PDPTE of mapping 1', 0x10000200000n, 3, 0x18000n, 0x19000n | NX],
      ['PDE (2M leaf) of mapping 1', 0x10000200000n, 2, 0x19008n, 0x600000n | P | PWT | PCD | A | D | PS | NX],
      ["PML4E of mapping 2 (bring-up's, untouched)", 0x40000000n, 4, 0x10000n, 0x11000n | P | W | U | A],
      ['PDPTE of mapping 2 (created; PCD set by raw)', 0x40000000n, 3, 0x11008n, 0x1a000n | P | W | U | PCD],
      ['PDE of mapping 2 (R/W cleared by raw)', 0x40000000n, 2, 0x1a000n, 0x1b000n | P | U],
      ['PTE of mapping 2 (not present, bit 51 set by raw)', 0x40000000n, 1, 0x1b000n, 0x403000n | (1n << 51n)],
    ];
    for (const [what, gva, level, at, value] of expected) {
      expect(built.entries(gva, level), what).toBe(at);
      expect(mem.read64(at), what).toBe(value);
    }
    expect(() => built.entries(0x9000000000n, 1)).toThrow(
      'no level-1 entry is known for 0x9000000000: no mapping covers it at that level',
    );
  });

  it('a non-present table entry does not make later pages allocate new tables', () => {
    const t = ok({
      name: 't',
      description: 'd',
      mappings: [{ gva: '0x8000000000', gpa: '0x401000', size: '0x3000', table: { p: false } }],
    });
    const mem = new MemImage();
    const boot = bringUp(mem, bringUpOptions(t));
    const built = buildScenarioTables(t, mem, boot);
    expect(boot.tables.tablePages).toEqual([
      0x10000n,
      0x11000n,
      0x12000n,
      0x13000n,
      0x14000n,
      0x15000n,
      0x16000n,
      0x17000n,
    ]);
    expect([0, 1, 2].map((i) => built.entries(0x8000000000n + BigInt(i) * 0x1000n, 1))).toEqual([
      0x17000n,
      0x17008n,
      0x17010n,
    ]);
    expect(mem.read64(0x10008n)).toBe(0x15000n | W | U);
  });

  it('builds the same tables in two memories', () => {
    const a = build();
    const b = build();
    for (const page of a.boot.tables.tablePages) {
      for (let off = 0n; off < 0x1000n; off += 8n) expect(b.mem.read64(page + off)).toBe(a.mem.read64(page + off));
    }
    expect(b.boot.tables.tablePages).toEqual(a.boot.tables.tablePages);
  });

  it('the model walks the built tables', () => {
    const { mem, boot } = build();
    const cfg = pagingConfigFor(s, { vendor: 'GenuineIntel', maxPhyAddr: 48, pdpe1gb: true });
    const r = walk(cfg, boot.tables.root, { gva: 0x8000001234n, kind: 'write', cpl: 3 }, (g) => mem.read64(g));
    expect(r).toMatchObject({ ok: true, gpa: 0x402234n, pageSize: 0x1000n });
    // mapping 1's PML4E is not present (table p: false)
    expect(
      walk(cfg, boot.tables.root, { gva: 0x10000200000n, kind: 'read', cpl: 0 }, (g) => mem.read64(g)),
    ).toMatchObject({ ok: false, errorCode: 0, reason: 'not-present' });
  });
});

describe('paging configuration', () => {
  const s = ok({
    name: 'p',
    description: 'd',
    paging: {
      levels: 5,
      cr0: { wp: false },
      cr4: { smep: true, smap: false, pke: true },
      efer: { nxe: false },
      pkru: '0x24',
    },
  });

  it('pagingConfigFor takes the mode from the scenario and MAXPHYADDR, PDPE1GB and the vendor from the CPU', () => {
    expect(pagingConfigFor(s, { vendor: 'GenuineIntel', maxPhyAddr: 46, pdpe1gb: false })).toEqual({
      levels: 5,
      vendor: 'intel',
      maxPhyAddr: 46,
      cr0Wp: false,
      cr4Smep: true,
      cr4Smap: false,
      cr4Pke: true,
      efer: { nxe: false },
      pdpe1gb: false,
      pkru: 0x24,
    });
    expect(pagingConfigFor(s, { vendor: 'AuthenticAMD', maxPhyAddr: 48, pdpe1gb: true }).vendor).toBe('amd');
    expect(pagingConfigFor(s, { vendor: 'HygonGenuine', maxPhyAddr: 48, pdpe1gb: true }).vendor).toBe('amd');
    expect(pagingConfigFor(s, { vendor: 'amd', maxPhyAddr: 48, pdpe1gb: true }).vendor).toBe('amd');
    expect(pagingConfigFor(s, { vendor: 'intel', maxPhyAddr: 48, pdpe1gb: true }).vendor).toBe('intel');
  });

  it('a vendor in the scenario wins over the CPU', () => {
    const intel = ok({ name: 'v', description: 'd', paging: { vendor: 'intel' } });
    expect(pagingConfigFor(intel, { vendor: 'AuthenticAMD', maxPhyAddr: 48, pdpe1gb: true }).vendor).toBe('intel');
  });

  it('bringUpOptions gives bring-up the same mode', () => {
    expect(bringUpOptions(s)).toEqual({ levels: 5, nxe: false, wp: false, cr4: CR4.SMEP | CR4.PKE });
    const mem = new MemImage();
    const boot = bringUp(mem, bringUpOptions(s));
    expect(boot.cr4 & (CR4.SMEP | CR4.SMAP | CR4.PKE | CR4.LA57)).toBe(CR4.SMEP | CR4.PKE | CR4.LA57);
    expect(boot.tables.levels).toBe(5);
  });
});

describe('MemImage', () => {
  it('reads back bytes and words, aligned or not; unwritten memory is zero', () => {
    const m = new MemImage();
    expect(m.read64(0x1000n)).toBe(0n);
    m.write(0x1003n, [0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99]);
    expect(m.read64(0x1000n)).toBe(0x5544332211000000n);
    expect(m.read64(0x1008n)).toBe(0x0000000099887766n);
    expect(m.read64(0x1003n)).toBe(0x8877665544332211n);
    m.write64(0x2005n, 0x0102030405060708n);
    expect(m.read64(0x2005n)).toBe(0x0102030405060708n);
    expect(m.read64(0x2000n)).toBe(0x0607080000000000n);
    m.write64(0x3000n, -1n);
    expect(m.read64(0x3000n)).toBe(0xffffffffffffffffn);
    m.write(0x3000n, [0, 0, 0, 0, 0, 0, 0, 0]);
    expect(m.read64(0x3000n)).toBe(0n);
  });
});

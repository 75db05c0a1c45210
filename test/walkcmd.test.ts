// `kvmharness walk`: the model's walk for one access in a scenario's tables.
// The expected tables are derived by hand: bring-up takes table pages 0x10000
// (PML4), 0x11000 (PDPT), 0x12000 (PD), 0x13000 and 0x14000 (PTs) from its pool,
// and the scenario's mappings take the next pages in order:
//   mapping 0, gva 0x8000000000: PML4 index 1 -> PDPT 0x15000 -> PD 0x16000 -> PT 0x17000
//   mapping 1, gva 0x8000001000: PTE 1 of that PT
//   mapping 2, gva 0x8000400000: 2M leaf in PDE 2 of PD 0x16000
//   mapping 3, gva 0x10000000000: PML4 index 2 -> PDPT 0x18000 -> PD 0x19000 -> PT 0x1a000
// Entry bits: P 0x1, W 0x2, U 0x4, A 0x20, D 0x40, PS 0x80, NX bit 63 (SDM vol. 3A §4.5).
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { walkCommand } from '../src/cli/walk.js';
import { builtinScenarios } from '../src/scenario/load.js';
import { describeKvm } from './support/kvm.js';

const dir = mkdtempSync(join(tmpdir(), 'kvmharness-walk-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));
const SCENARIO = join(dir, 'walk_table.json');
writeFileSync(
  SCENARIO,
  JSON.stringify({
    name: 'walk_table',
    description: 'Hand-built tables for the walk command tests.',
    mappings: [
      { gva: '0x8000000000', gpa: '0x401000', leaf: { w: true, u: true } },
      { gva: '0x8000001000', gpa: '0x402000', leaf: { u: true, nx: true } },
      { gva: '0x8000400000', gpa: '0x600000', page: '2M', leaf: { w: true, a: true } },
      { gva: '0x10000000000', gpa: '0x403000', table: { u: false }, raw: [{ level: 3, set: '0x8000000000000' }] },
    ],
  }),
);

const HEADER = (access: string, cpu = 'defaults (--no-probe): vendor amd, maxphyaddr 48, pdpe1gb 1') => [
  `scenario  walk_table (${SCENARIO})`,
  `cpu       ${cpu}`,
  'paging    4-level, CR3 0x10000, CR0.WP=1, CR4.SMEP=0 SMAP=0 PKE=0, EFER.NXE=1, PKRU 0x0, amd rules',
  `access    ${access}`,
  '',
];

function run(...args: string[]) {
  return walkCommand([SCENARIO, '--no-probe', ...args]);
}

describe('kvmharness walk: text', () => {
  it('a read through four fresh levels: the GPA, and A set on every entry, root first', () => {
    const r = run('--gva', '0x8000000123');
    expect(r.stderr).toBe('');
    expect(r.exitCode).toBe(0);
    expect(r.stdout).toBe(
      [
        ...HEADER('read 0x8000000123 at CPL 0'),
        'level  entry at  value               flags',
        'PML4E  0x10008   0x0000000000015007  P W U',
        'PDPTE  0x15000   0x0000000000016007  P W U',
        'PDE    0x16000   0x0000000000017007  P W U',
        'PTE    0x17000   0x0000000000401007  P W U  (leaf)',
        '',
        'result    gpa 0x401123 (4K page)',
        'rights    W=1 U=1 X=1',
        'A/D       PML4E 0x10008: 0x15007 -> 0x15027 (+A)',
        '          PDPTE 0x15000: 0x16007 -> 0x16027 (+A)',
        '          PDE   0x16000: 0x17007 -> 0x17027 (+A)',
        '          PTE   0x17000: 0x401007 -> 0x401027 (+A)',
        '',
      ].join('\n'),
    );
  });

  it("--shadow: the shadow pages of the access; a write to the walk's own page table makes it unsync", () => {
    // Bring-up's identity map: root 0x10, PDPT 0x11, PD 0x12, PT 0x13 (the pool's first pages);
    // 0x13000 is that PT itself, writable, so a write to it gets a writable shadow PTE and
    // the level-1 shadow page of 0x13 goes unsync (mmu_try_to_unsync_pages).
    const r = run('--gva', '0x13000', '--access', 'write', '--shadow');
    expect(r.exitCode, r.stderr).toBe(0);
    expect(r.stdout.split('\n').slice(-5, -1)).toEqual([
      'shadow    l4 gfn 0x10 sync (root)',
      '          l3 gfn 0x11 sync',
      '          l2 gfn 0x12 sync',
      '          l1 gfn 0x13 unsync',
    ]);
    const j = JSON.parse(run('--gva', '0x13000', '--shadow', '--json').stdout);
    expect(j.shadow.map((s: { unsync: boolean }) => s.unsync)).toEqual([false, false, false, false]);
  });

  it('a user write to a read-only user page: #PF P|W|U and no A/D writes', () => {
    expect(run('--gva', '0x8000001008', '--access', 'write', '--cpl', '3').stdout).toBe(
      [
        ...HEADER('write 0x8000001008 at CPL 3'),
        'level  entry at  value               flags',
        'PML4E  0x10008   0x0000000000015007  P W U',
        'PDPTE  0x15000   0x0000000000016007  P W U',
        'PDE    0x16000   0x0000000000017007  P W U',
        'PTE    0x17008   0x8000000000402005  P U NX  (leaf)',
        '',
        'result    #PF error code 0x7 (P|W|U), CR2 0x8000001008: protection:write',
        'A/D       none (a faulting walk sets no A or D bit)',
        '',
      ].join('\n'),
    );
  });

  it('a write to a 2M page: the PDE is the leaf and gets D (its A is already set)', () => {
    expect(run('--gva', '0x8000400010', '--access', 'write').stdout).toBe(
      [
        ...HEADER('write 0x8000400010 at CPL 0'),
        'level  entry at  value               flags',
        'PML4E  0x10008   0x0000000000015007  P W U',
        'PDPTE  0x15000   0x0000000000016007  P W U',
        'PDE    0x16010   0x00000000006000a3  P W A PS  (leaf)',
        '',
        'result    gpa 0x600010 (2M page)',
        'rights    W=1 U=0 X=1',
        'A/D       PML4E 0x10008: 0x15007 -> 0x15027 (+A)',
        '          PDPTE 0x15000: 0x16007 -> 0x16027 (+A)',
        '          PDE   0x16010: 0x6000a3 -> 0x6000e3 (+D)',
        '',
      ].join('\n'),
    );
  });

  it('bit 51 in a PDPTE is reserved with MAXPHYADDR 48; with 52 it is an address bit', () => {
    expect(run('--gva', '0x10000000000').stdout).toBe(
      [
        ...HEADER('read 0x10000000000 at CPL 0'),
        'level  entry at  value               flags',
        'PML4E  0x10010   0x0000000000018003  P W',
        'PDPTE  0x18000   0x0008000000019003  P W',
        '',
        'result    #PF error code 0x9 (P|RSVD), CR2 0x10000000000: reserved',
        'A/D       none (a faulting walk sets no A or D bit)',
        '',
      ].join('\n'),
    );
    // Bits 51:12 of the PDPTE now address the PD: 0x8000000019000, where nothing is written.
    expect(run('--gva', '0x10000000000', '--maxphyaddr', '52').stdout).toBe(
      [
        ...HEADER(
          'read 0x10000000000 at CPL 0',
          'defaults (--no-probe, --maxphyaddr 52): vendor amd, maxphyaddr 52, pdpe1gb 1',
        ),
        'level  entry at         value               flags',
        'PML4E  0x10010          0x0000000000018003  P W',
        'PDPTE  0x18000          0x0008000000019003  P W',
        'PDE    0x8000000019000  0x0000000000000000  np',
        '',
        'result    #PF error code 0x0 (0), CR2 0x10000000000: not-present',
        'A/D       none (a faulting walk sets no A or D bit)',
        '',
      ].join('\n'),
    );
  });

  it('a not-present PTE, and a non-canonical address', () => {
    expect(run('--gva', '0x8000002000').stdout).toBe(
      [
        ...HEADER('read 0x8000002000 at CPL 0'),
        'level  entry at  value               flags',
        'PML4E  0x10008   0x0000000000015007  P W U',
        'PDPTE  0x15000   0x0000000000016007  P W U',
        'PDE    0x16000   0x0000000000017007  P W U',
        'PTE    0x17010   0x0000000000000000  np',
        '',
        'result    #PF error code 0x0 (0), CR2 0x8000002000: not-present',
        'A/D       none (a faulting walk sets no A or D bit)',
        '',
      ].join('\n'),
    );
    expect(run('--gva', '0x800000000000', '--vendor', 'intel').stdout).toBe(
      [
        `scenario  walk_table (${SCENARIO})`,
        'cpu       defaults (--no-probe, --vendor intel): vendor intel, maxphyaddr 48, pdpe1gb 1',
        'paging    4-level, CR3 0x10000, CR0.WP=1, CR4.SMEP=0 SMAP=0 PKE=0, EFER.NXE=1, PKRU 0x0, intel rules',
        'access    read 0x800000000000 at CPL 0',
        '',
        'result    #GP: 0x800000000000 is not canonical with 4-level paging (no page walk)',
        'A/D       none (a faulting walk sets no A or D bit)',
        '',
      ].join('\n'),
    );
  });

  it('takes a built-in scenario by name and a decimal address', () => {
    const r = walkCommand(['write_protect', '--gva', String(0x8000000010), '--access', 'write', '--no-probe']);
    expect(r.exitCode).toBe(0);
    expect(r.stdout).toMatch(/^scenario  write_protect \(\S+guests\/scenarios\/write_protect\.json\)\n/);
    expect(r.stdout).toContain('\nPTE    0x17000   0x0000000000401001  P  (leaf)\n');
    expect(r.stdout).toContain('\nresult    #PF error code 0x3 (P|W), CR2 0x8000000010: protection:write\n');
  });
});

describe('kvmharness walk: JSON', () => {
  it('a fetch from an NX page', () => {
    const r = run('--gva', '0x8000001000', '--access', 'exec', '--json');
    expect(r.exitCode).toBe(0);
    expect(JSON.parse(r.stdout)).toEqual({
      scenario: { name: 'walk_table', source: SCENARIO },
      cpu: { from: 'defaults', why: '--no-probe', vendor: 'amd', maxPhyAddr: 48, pdpe1gb: true },
      paging: {
        levels: 4,
        cr3: '0x10000',
        cr0Wp: true,
        cr4Smep: false,
        cr4Smap: false,
        cr4Pke: false,
        eferNxe: true,
        pkru: '0x0',
        vendor: 'amd',
      },
      access: { gva: '0x8000001000', kind: 'exec', cpl: 0, eflagsAc: false },
      levels: [
        { level: 4, name: 'PML4E', pteGpa: '0x10008', pte: '0x15007', flags: 'P W U', leaf: false },
        { level: 3, name: 'PDPTE', pteGpa: '0x15000', pte: '0x16007', flags: 'P W U', leaf: false },
        { level: 2, name: 'PDE', pteGpa: '0x16000', pte: '0x17007', flags: 'P W U', leaf: false },
        { level: 1, name: 'PTE', pteGpa: '0x17008', pte: '0x8000000000402005', flags: 'P U NX', leaf: true },
      ],
      // a supervisor fetch; EFER.NXE = 1 sets I
      result: {
        ok: false,
        exception: '#PF',
        errorCode: '0x11',
        decoded: 'P|I',
        cr2: '0x8000001000',
        reason: 'protection:nx',
      },
      adWrites: [],
    });
  });

  it('a successful read with --ac', () => {
    const j = JSON.parse(run('--gva', '0x8000400fff', '--ac', '--json').stdout);
    expect(j.access).toEqual({ gva: '0x8000400fff', kind: 'read', cpl: 0, eflagsAc: true });
    expect(j.result).toEqual({
      ok: true,
      gpa: '0x600fff',
      pageSize: '0x200000',
      effective: { w: true, u: false, x: true },
    });
    expect(j.adWrites).toEqual([
      { level: 4, name: 'PML4E', pteGpa: '0x10008', old: '0x15007', new: '0x15027' },
      { level: 3, name: 'PDPTE', pteGpa: '0x15000', old: '0x16007', new: '0x16027' },
    ]);
  });
});

describe('kvmharness walk: bad input exits 2 with one line', () => {
  const bad = join(dir, 'bad.json');
  writeFileSync(
    bad,
    JSON.stringify({
      name: 'bad',
      description: 'd',
      steps: [
        { guest: 'read', gva: '12z' },
        { guest: 'exec', gva: '0x1', size: 1 },
      ],
    }),
  );
  const cases: [string, string[], string][] = [
    [
      'an unparseable address',
      [SCENARIO, '--gva', '12z'],
      "kvmharness: --gva: expected a 64-bit address like 0x1000 (or decimal), got '12z'",
    ],
    [
      'an address over 64 bits',
      [SCENARIO, '--gva', '0x10000000000000000'],
      "kvmharness: --gva: expected a 64-bit address like 0x1000 (or decimal), got '0x10000000000000000'",
    ],
    [
      'an unknown access',
      [SCENARIO, '--gva', '0x1000', '--access', 'fetch'],
      "kvmharness: --access: expected read, write or exec, got 'fetch'",
    ],
    ['CPL 1', [SCENARIO, '--gva', '0x1000', '--cpl', '1'], "kvmharness: --cpl: expected 0 or 3, got '1'"],
    [
      'an unknown vendor',
      [SCENARIO, '--gva', '0x1000', '--vendor', 'via'],
      "kvmharness: --vendor: expected intel or amd, got 'via'",
    ],
    [
      'MAXPHYADDR 60',
      [SCENARIO, '--gva', '0x1000', '--maxphyaddr', '60'],
      "kvmharness: --maxphyaddr: expected a number of bits from 32 to 52, got '60'",
    ],
    [
      'EFLAGS.AC at CPL 3',
      [SCENARIO, '--gva', '0x1000', '--cpl', '3', '--ac'],
      'kvmharness: --ac: EFLAGS.AC overrides SMAP only for CPL 0 accesses',
    ],
    ['no --gva', [SCENARIO], "error: required option '--gva <addr>' not specified"],
    ['an unknown option', [SCENARIO, '--gva', '0x1000', '--bogus'], "error: unknown option '--bogus'"],
    [
      'a missing file',
      [join(dir, 'missing.json'), '--gva', '0x1000'],
      `kvmharness: ${join(dir, 'missing.json')}: cannot read: no such file`,
    ],
    [
      'an unknown built-in name',
      ['no_such_scenario', '--gva', '0x1000'],
      `kvmharness: no_such_scenario: no such file, and no built-in scenario of that name (built-in: ${builtinScenarios().join(', ')})`,
    ],
    [
      'an invalid scenario',
      [bad, '--gva', '0x1000'],
      `kvmharness: ${bad}: steps[0].gva: expected a hex string like "0x1000" or a non-negative integer, got "12z" (and 1 more error)`,
    ],
  ];
  for (const [what, args, line] of cases) {
    it(what, () => {
      const r = walkCommand([...args, '--no-probe']);
      expect(r.exitCode).toBe(2);
      expect(r.stdout).toBe('');
      expect(r.stderr).toBe(`${line}\n`);
    });
  }
});

describe('kvmharness walk: CPU features', () => {
  it('falls back to the defaults, and says why, when the device is not KVM', () => {
    const r = walkCommand([SCENARIO, '--gva', '0x8000000000', '--device', join(dir, 'no-kvm')]);
    expect(r.exitCode).toBe(0);
    expect(r.stdout.split('\n')[1]).toMatch(
      /^cpu {7}defaults \(no KVM: [^\n]*no-kvm[^\n]*\): vendor amd, maxphyaddr 48, pdpe1gb 1$/,
    );
  });
});

describe('kvmharness walk --pdpe1gb', () => {
  it('says whether 1 GiB pages exist, over the defaults: without them a PS PDPTE is reserved', () => {
    const walk = (...args: string[]) => walkCommand(['huge_1g', '--gva', '0x8000000000', '--no-probe', ...args]);
    const on = walk('--pdpe1gb', '1');
    expect(on.exitCode).toBe(0);
    expect(on.stdout).toContain('cpu       defaults (--no-probe, --pdpe1gb 1): vendor amd, maxphyaddr 48, pdpe1gb 1\n');
    expect(on.stdout).not.toContain('RSVD');
    const off = walk('--pdpe1gb', '0', '--json');
    expect(off.exitCode).toBe(0);
    const j = JSON.parse(off.stdout);
    expect(j.cpu).toEqual({
      from: 'defaults',
      why: '--no-probe, --pdpe1gb 0',
      vendor: 'amd',
      maxPhyAddr: 48,
      pdpe1gb: false,
    });
    expect(walk('--pdpe1gb', '0').stdout).toMatch(
      /^result {4}#PF error code 0x9 \(P\|RSVD\), CR2 0x8000000000: reserved$/m,
    );
  });

  it('takes only 0 or 1', () => {
    const r = walkCommand(['huge_1g', '--gva', '0x8000000000', '--no-probe', '--pdpe1gb', 'yes']);
    expect(r.exitCode).toBe(2);
    expect(r.stderr).toBe("kvmharness: --pdpe1gb: expected 0 or 1, got 'yes'\n");
  });
});

describeKvm('kvmharness walk with KVM', () => {
  it('takes vendor, MAXPHYADDR and PDPE1GB from the probe', () => {
    const r = walkCommand([SCENARIO, '--gva', '0x8000000000']);
    expect(r.exitCode).toBe(0);
    expect(r.stdout.split('\n')[1]).toMatch(/^cpu {7}probe of \S+: vendor \S+, maxphyaddr \d+, pdpe1gb [01]$/);
    const j = JSON.parse(walkCommand([SCENARIO, '--gva', '0x8000000000', '--json', '--vendor', 'intel']).stdout);
    expect(j.cpu).toMatchObject({ from: 'probe', vendor: 'intel' });
    expect(j.paging.vendor).toBe('intel');
  });
});

// --nested: both dimensions over an empty TDP model. Expected values are worked
// out by hand. accessed_dirty's tables: CR3 0x10000, PDPT 0x15000, PD 0x16000,
// PT 0x17000 (bring-up's pool, slot 0), data 0x401000 (slot 1); both slots
// anonymous 4 KiB memory, so every TDP leaf is 4 KiB. With n guest and m TDP
// levels there are (n + 1)(m + 1) - 1 references before the data access:
// 24 for 4 x 4, 29 for 4 x 5, 35 for 5 x 5. In the empty tree the first GPA
// (0x10008) misses at the TDP root; its fault builds the tables down to level 1
// for [0, 2 MiB), so the other table pages miss at level 1; the data page lies
// in the next 2 MiB, which has no level-1 table yet: it misses at level 2.
describe('kvmharness walk --nested', () => {
  const TDP4 = ['tdp', 'tdp', 'tdp', 'tdp'];
  const KINDS_4X4 = [
    ...TDP4,
    'guest-pte',
    ...TDP4,
    'guest-pte',
    ...TDP4,
    'guest-pte',
    ...TDP4,
    'guest-pte',
    ...TDP4,
    'data',
  ];

  function nested(...args: string[]) {
    const r = walkCommand([...args, '--nested', '--no-probe']);
    expect(r.stderr).toBe('');
    expect(r.exitCode).toBe(0);
    return r.stdout;
  }

  it('accessed_dirty, a read: 24 references, the kinds in order, then the data access', () => {
    const j = JSON.parse(nested('accessed_dirty', '--gva', '0x8000000000', '--json'));
    expect(j.totals).toEqual({ references: 24, tdp: 20, guestPte: 4, tdpMisses: 5 });
    expect(j.end).toBe('data');
    expect(j.refs.map((x: { kind: string }) => x.kind)).toEqual(KINDS_4X4);
    expect(j.refs.map((x: { step: number }) => x.step)).toEqual(Array.from({ length: 25 }, (_, i) => i + 1));
    const tdpRefs = j.refs.filter((x: { kind: string }) => x.kind === 'tdp');
    expect(tdpRefs.map((x: { tdpLevel: number }) => x.tdpLevel)).toEqual([
      4, 3, 2, 1, 4, 3, 2, 1, 4, 3, 2, 1, 4, 3, 2, 1, 4, 3, 2, 1,
    ]);
    expect(tdpRefs.map((x: { gpa: string }) => x.gpa)).toEqual(
      ['0x10008', '0x15000', '0x16000', '0x17000', '0x401000'].flatMap((g) => [g, g, g, g]),
    );
    // Guest table accesses are TDP writes; the data page is translated for the guest's read.
    expect(tdpRefs.map((x: { access: string }) => x.access)).toEqual([
      ...Array(16).fill('write'),
      'read',
      'read',
      'read',
      'read',
    ]);
    // Misses at steps 1 (root), 9, 14, 19 (level 1) and 23 (level 2); each faulted in as a 4 KiB mapping.
    const missed = j.refs.filter((x: { hit: boolean }) => !x.hit);
    expect(missed.map((x: { step: number; tdpLevel: number }) => [x.step, x.tdpLevel])).toEqual([
      [1, 4],
      [9, 1],
      [14, 1],
      [19, 1],
      [23, 2],
    ]);
    expect(missed.map((x: { fault: { kind: string; level: number } }) => [x.fault.kind, x.fault.level])).toEqual(
      Array(5).fill(['map', 1]),
    );
    expect(missed.every((x: { spte: string }) => x.spte === '0x0')).toBe(true);
    // The guest entries as the plain walk reads them, each getting A.
    const entries = j.refs.filter((x: { kind: string }) => x.kind === 'guest-pte');
    expect(
      entries.map((x: { guestLevel: number; gpa: string; pte: string; adWrite: { new: string } }) => [
        x.guestLevel,
        x.gpa,
        x.pte,
        x.adWrite.new,
      ]),
    ).toEqual([
      [4, '0x10008', '0x15007', '0x15027'],
      [3, '0x15000', '0x16007', '0x16027'],
      [2, '0x16000', '0x17007', '0x17027'],
      [1, '0x17000', '0x401003', '0x401023'],
    ]);
    expect(j.refs[24]).toMatchObject({
      step: 25,
      kind: 'data',
      guestLevel: 0,
      gpa: '0x401000',
      access: 'read',
      hit: true,
    });
    expect(j.refs[24].hostAddr).toMatch(/^0x[0-9a-f]*000$/);
    // Slot 0 is bring-up's; HVAs from 1 GiB, each slot at the next 1 GiB boundary plus its GPA modulo 1 GiB.
    expect(j.tdp).toEqual({
      levels: 4,
      asId: 0,
      slots: [
        { slot: 0, gpa: '0x0', size: '0x400000', backing: 'anon', hva: '0x40000000', readonly: false, logDirty: false },
        {
          slot: 1,
          gpa: '0x400000',
          size: '0x400000',
          backing: 'anon',
          hva: '0x80400000',
          readonly: false,
          logDirty: false,
        },
      ],
    });
    expect(j.result).toEqual({
      ok: true,
      gpa: '0x401000',
      pageSize: '0x1000',
      effective: { w: true, u: false, x: true },
    });
  });

  it('text: a row per reference with what is read, the GPA, hit or miss and the mapping level; then the totals', () => {
    const out = nested('accessed_dirty', '--gva', '0x8000001000', '--access', 'write');
    const lines = out.split('\n');
    expect(lines.slice(4, 7)).toEqual([
      'tdp       4-level x86, empty at start, misses faulted in; guest table accesses are TDP writes',
      'memslots  0 [0x0, 0x400000) anon, hva 0x40000000',
      '          1 [0x400000, 0x800000) anon, hva 0x80400000',
    ]);
    const start = lines.indexOf('') + 1;
    expect(lines[start]).toMatch(/^step  read {9}gpa {6}host +value {15}result$/);
    // step, what is read, GPA, result (host column and value left out)
    const rows = lines.slice(start + 1, start + 21).map((l) => {
      const cols = l.trim().split(/ {2,}/);
      return [cols[0], cols[1], cols[2], cols.at(-1)];
    });
    const tdpRows = (first: number, gpa: string, miss: number | undefined) =>
      [4, 3, 2, 1].map((level, i) => [
        String(first + i),
        `TDP level ${level}`,
        gpa,
        level === miss ? 'miss: mapped 4K (level 1)' : 'hit',
      ]);
    expect(rows).toEqual([
      ...tdpRows(1, '0x10008', 4),
      ['5', 'guest PML4E', '0x10008', 'hit'],
      ...tdpRows(6, '0x15000', 1),
      ['10', 'guest PDPTE', '0x15000', 'hit'],
      ...tdpRows(11, '0x16000', 1),
      ['15', 'guest PDE', '0x16000', 'hit'],
      ...tdpRows(16, '0x17008', 1),
      ['20', 'guest PTE', '0x17008', 'hit'],
    ]);
    expect(lines[start + 21]).toBe('');
    // A write to a read-only page at CPL 0 with CR0.WP = 1: the guest walk stops at the PTE.
    expect(lines.slice(start + 22)).toEqual([
      'result    #PF error code 0x3 (P|W), CR2 0x8000001000: protection:write',
      'totals    20 references (16 TDP, 4 guest PTE), then no data access (the guest walk faulted); 4 TDP misses',
      '',
    ]);
  });

  it('--tdp-levels 5: 4 x 5 gives 29 references; the first GPA misses at the level-5 root', () => {
    const j = JSON.parse(nested('accessed_dirty', '--gva', '0x8000000000', '--tdp-levels', '5', '--json'));
    expect(j.totals).toEqual({ references: 29, tdp: 25, guestPte: 4, tdpMisses: 5 });
    expect(j.tdp.levels).toBe(5);
    expect(j.refs[0]).toMatchObject({ kind: 'tdp', tdpLevel: 5, hit: false });
  });

  it('five_level: 5 x 5 gives 35 references, 5 x 4 gives 29', () => {
    const five = JSON.parse(nested('five_level', '--gva', '0x1000000000000', '--tdp-levels', '5', '--json'));
    expect(five.totals).toMatchObject({ references: 35, tdp: 30, guestPte: 5 });
    expect(five.end).toBe('data');
    const four = JSON.parse(nested('five_level', '--gva', '0x1000000000000', '--json'));
    expect(four.totals).toMatchObject({ references: 29, tdp: 24, guestPte: 5 });
  });

  it('bad --tdp-levels use exits 2 with one line', () => {
    const cases: [string[], string][] = [
      [['--tdp-levels', '5'], 'kvmharness: --tdp-levels: only with --nested'],
      [['--nested', '--tdp-levels', '3'], "kvmharness: --tdp-levels: expected 4 or 5, got '3'"],
    ];
    for (const [args, line] of cases) {
      const r = walkCommand(['accessed_dirty', '--gva', '0x8000000000', '--no-probe', ...args]);
      expect(r.exitCode).toBe(2);
      expect(r.stdout).toBe('');
      expect(r.stderr).toBe(`${line}\n`);
    }
  });
});

// KVM_TRANSLATE as KVM's own walker does it, and dirty logs under manual
// protection: gets that leave the bitmap as it is and clears of part of a
// slot, with the ranges KVM refuses. The rules, the model's answers, and (with
// KVM) the built-in scenarios, each comparison of which must report a wrong
// expectation, and the wrong models they must catch.
import { describe, expect, it } from 'vitest';
import { Kvm } from '../src/kvm/kvm.js';
import { clearDirtyRefusal, declaredSlot, ModelVm } from '../src/model/vm.js';
import type { HostProfile } from '../src/probe/probe.js';
import { scenarioCheck } from '../src/run/engine.js';
import { runCheck } from '../src/run/runner.js';
import { loadScenario, resolveScenario, scenarioToJson, validateScenario } from '../src/scenario/load.js';
import type { Scenario } from '../src/scenario/types.js';
import { describeKvm, failures, withHost } from './support/kvm.js';
import { wrong as wrongValue } from './support/wrong.js';

const NEW = [
  'translate_kinds',
  'translate_1g_smap',
  'dirty_log_clear_range',
  'host_range_across_slots',
  'tables_in_user_slot',
];
const load = (name: string): Scenario => loadScenario(resolveScenario(name));

type J = Record<string, unknown>;
/** Two adjacent slots, the second not logging dirty pages. */
function twoSlots(steps: J[]): string[] {
  const v = validateScenario({
    name: 't',
    description: 'd',
    memslots: [
      { slot: 1, gpa: '0x1000000', size: '0x200000', logDirty: true },
      { slot: 2, gpa: '0x1200000', size: '0x200000' },
      { slot: 3, gpa: '0x1600000', size: '0x200000', backing: 'hugetlb2m' },
    ],
    mappings: [],
    steps,
  });
  return v.ok ? [] : v.errors;
}

describe('host steps over GPA ranges: the rules', () => {
  const cases: [string, J[], string[]][] = [
    [
      'a range that runs into a GPA no slot holds',
      [{ host: 'munmap', gpa: '0x13f0000', size: '0x20000' }],
      ['steps[0].gpa: [0x13f0000, 0x1410000): 0x1400000 is in no live user memslot'],
    ],
    [
      'both forms at once',
      [{ host: 'mprotect', slot: 1, offset: 0, gpa: '0x1000000', size: '0x1000', prot: 'read' }],
      ['steps[0]: give either "slot" and "offset", or "gpa" and "size", not both'],
    ],
    [
      'neither form',
      [{ host: 'munmap', size: '0x1000' }],
      ['steps[0]: needs "slot" and "offset", or "gpa" and "size"'],
    ],
    [
      'a GPA range off 4K',
      [{ host: 'madvise', gpa: '0x1000800', size: '0x1000', advice: 'dontneed' }],
      ['steps[0]: gpa and size must be 4K aligned and size non-zero'],
    ],
    [
      'a range that runs past the last slot',
      [{ host: 'munmap', gpa: '0x17ff000', size: '0x2000' }],
      ['steps[0].gpa: [0x17ff000, 0x1801000): 0x1800000 is in no live user memslot'],
    ],
    [
      'a dirty-log get over a slot that does not log',
      [{ host: 'get-dirty-log', gpa: '0x11ff000', size: '0x2000' }],
      [
        'steps[0].gpa: [0x11ff000, 0x1201000): memslot 2 does not log dirty pages here (set "logDirty": true, or turn it on with a memslot-flags step)',
      ],
    ],
    [
      'a dirty-log gpa without a size',
      [{ host: 'clear-dirty-log', gpa: '0x1000000' }],
      ['steps[0]: "gpa" needs "size"'],
    ],
    [
      'a dirty-log clear with both forms',
      [{ host: 'clear-dirty-log', slot: 1, first: 0, gpa: '0x1000000', size: '0x1000' }],
      ['steps[0]: give either "slot" and "first" and "pages", or "gpa" and "size", not both'],
    ],
  ];
  for (const [what, steps, want] of cases) it(`refuses ${what}`, () => expect(twoSlots(steps)).toEqual(want));

  it("refuses a hugetlb slot's part that is not aligned to its 2M pages", () => {
    expect(twoSlots([{ host: 'munmap', gpa: '0x1600000', size: '0x1000' }])).toEqual([
      'steps[0]: offset and size must be hugetlb2m page (0x200000) aligned and size non-zero',
    ]);
  });

  it('writes the GPA forms back out so that validating them gives the steps back', () => {
    const steps = [
      { host: 'munmap', gpa: '0x11ff000', size: '0x2000' },
      { host: 'remap', gpa: '0x11ff000', size: '0x2000' },
      { host: 'madvise', gpa: '0x11ff000', size: '0x2000', advice: 'dontneed' },
      { host: 'mprotect', gpa: '0x11ff000', size: '0x2000', prot: 'read' },
      { host: 'get-dirty-log', gpa: '0x1000000', size: '0x2000' },
      { host: 'clear-dirty-log', gpa: '0x1000000', size: '0x2000' },
    ];
    const v = validateScenario({
      name: 't',
      description: 'd',
      memslots: [
        { slot: 1, gpa: '0x1000000', size: '0x200000', logDirty: true },
        { slot: 2, gpa: '0x1200000', size: '0x200000', logDirty: true },
      ],
      mappings: [],
      steps,
    });
    if (!v.ok) throw new Error(v.errors.join('\n'));
    expect(v.scenario.steps[0]).toEqual({ side: 'host', kind: 'munmap', gpa: 0x11ff000n, size: 0x2000n });
    const again = validateScenario(scenarioToJson(v.scenario));
    expect(again.ok && again.scenario).toEqual(v.scenario);
  });
});

describe('page tables in a user slot: the rules', () => {
  const scenario = (mappings: J[], steps: J[] = [], slot: J = {}) => {
    const v = validateScenario({
      name: 't',
      description: 'd',
      memslots: [
        { slot: 1, gpa: '0x1000000', size: '0x10000', logDirty: true, ...slot },
        { slot: 2, gpa: '0x2000000', size: '0x10000' },
      ],
      mappings,
      steps,
    });
    return v.ok ? [] : v.errors;
  };
  const inSlot = { gva: '0x8000000000', gpa: '0x2000000', leaf: { w: true }, tables: { slot: 1, offset: '0x0' } };
  it('takes a mapping whose tables live in a user slot', () => expect(scenario([inSlot])).toEqual([]));
  it('refuses tables that do not fit from the offset', () =>
    expect(scenario([{ ...inSlot, tables: { slot: 1, offset: '0xf000' } }])).toEqual([
      'mappings[0].tables.offset: the mapping may create 3 table pages, which do not fit in memslot 1 from 0xf000 (0x10000 bytes)',
    ]));
  it('refuses tables over GPAs a mapping maps', () =>
    expect(scenario([{ ...inSlot, gpa: '0x1001000' }])).toEqual([
      'mappings[0].tables: its table pages [0x1000000, 0x1003000) overlap the GPAs mappings[0] maps',
    ]));
  it('refuses a read-only slot', () =>
    expect(scenario([inSlot], [], { readonly: true, logDirty: false })).toEqual([
      'mappings[0].tables.slot: memslot 1 must be writable host memory created at the start to hold page tables',
    ]));
  it('refuses a guest store to an entry there, and host steps that would change or remove the tables', () =>
    expect(
      scenario(
        [inSlot],
        [
          { guest: 'write-pte', gva: '0x8000000000', level: 1, set: '0x2' },
          { host: 'write-pte', gva: '0x8000000000', level: 1, set: '0x2' },
          { host: 'madvise', slot: 1, offset: '0x1000', size: '0x1000', advice: 'dontneed' },
          { host: 'memslot-delete', slot: 1 },
        ],
      ),
    ).toEqual([
      'steps[0].level: the level-1 entry for 0x8000000000 is in a page table in memslot 1 (mappings[0].tables), outside the identity map a guest step stores through; use a host step',
      "steps[2]: memslot 1's memory at [0x0, 0x3000) holds the page tables of mappings[0]; a host memory step cannot change it",
      'steps[3].slot: memslot 1 holds the page tables of mappings[0]; it cannot be deleted',
    ]));
});

describe('clear-dirty-log of part of a slot: the rules and the model', () => {
  it('writes first and pages back out so that validating it gives the step back', () => {
    const v = validateScenario({
      name: 't',
      description: 'd',
      memslots: [{ slot: 1, gpa: '0x1000000', size: '0x82000', logDirty: true }],
      mappings: [],
      steps: [
        { host: 'clear-dirty-log', slot: 1, first: 64, pages: 10 },
        { host: 'clear-dirty-log', slot: 1 },
      ],
    });
    if (!v.ok) throw new Error(v.errors.join('\n'));
    expect(v.scenario.steps[0]).toMatchObject({ kind: 'clear-dirty-log', first: 64, pages: 10 });
    expect(v.scenario.steps[1]).not.toHaveProperty('first');
    const again = validateScenario(scenarioToJson(v.scenario));
    expect(again.ok && again.scenario).toEqual(v.scenario);
  });

  it('takes the ranges kvm_clear_dirty_log_protect takes, and refuses the others', () => {
    // A 130-page slot: words of 64 pages, the last word holding pages 128 and 129.
    const cases: [number, number, boolean][] = [
      [0, 130, true],
      [0, 64, true],
      [64, 64, true],
      [128, 2, true],
      [64, 66, true],
      [0, 0, true],
      [128, 0, true],
      [130, 0, false], // the slot's end, but not a multiple of 64
      [65, 63, false], // first page not a multiple of 64
      [64, 10, false], // short count that does not reach the end
      [128, 3, false], // runs past the end
      [192, 0, false], // starts past the end
      [0, 129, false], // one short of the end, not a multiple of 64
    ];
    for (const [first, count, ok] of cases)
      expect(clearDirtyRefusal(130, first, count) === undefined, `[${first}, +${count})`).toBe(ok);
  });

  it('a get with manual protect keeps the pages; a clear takes back its range only', () => {
    const vm = new ModelVm({ record: false });
    const G = 0x1000000n;
    vm.setSlot(
      declaredSlot(
        { slot: 1, gpa: G, size: 0x82000n, backing: 'anon', logDirty: true, readonly: false },
        0x7f000000n << 12n,
      ),
    );
    for (const p of [0n, 63n, 64n, 129n]) vm.markDirty(G + (p << 12n));
    const all = [G, G + 0x3f000n, G + 0x40000n, G + 0x81000n];
    expect(vm.harvestDirty(1, true)).toEqual(all);
    expect(vm.harvestDirty(1, true)).toEqual(all);
    vm.clearDirty(1, 0, 64);
    expect(vm.harvestDirty(1, true)).toEqual([G + 0x40000n, G + 0x81000n]);
    vm.clearDirty(1, 128, 2);
    expect(vm.harvestDirty(1, true)).toEqual([G + 0x40000n]);
    expect(vm.harvestDirty(1)).toEqual([G + 0x40000n]);
    expect(vm.harvestDirty(1)).toEqual([]);
  });
});

describeKvm('KVM_TRANSLATE and partial dirty-log clears on KVM', () => {
  let kvm: Kvm;
  let profile: HostProfile;
  withHost((k, p) => {
    kvm = k;
    profile = p;
  });

  for (const name of NEW) {
    it(`${name}: passes, and every comparison reports a wrong expectation`, async () => {
      const ok = await runCheck(scenarioCheck(load(name)), kvm, profile);
      if (ok.outcome === 'not_applicable') return; // translate_1g_smap needs PDPE1GB and SMAP
      expect(ok.outcome, failures(ok)).toBe('pass');
      const r = await runCheck(scenarioCheck(load(name)), kvm, profile, {
        wrongExpectation: (_c, _w, e) => wrongValue(e),
      });
      expect(r.comparisons.map((c) => [c.what, c.ok])).toEqual(ok.comparisons.map((c) => [c.what, false]));
    });
  }

  it('dirty_log_clear_range: a model whose get forgets the pages under manual protect is reported at each later get', async () => {
    const r = await runCheck(
      scenarioCheck(load('dirty_log_clear_range'), { wrong: { vm: { getForgetsManual: true } } }),
      kvm,
      profile,
    );
    expect(r.outcome).toBe('fail');
    // Step 2 repeats step 1's get; steps 4, 9 and 12 follow clears of part of the slot;
    // step 14 follows a clear of the whole slot, where both say nothing is dirty.
    expect(r.comparisons.filter((c) => !c.ok).map((c) => c.what)).toEqual(
      [2, 4, 9, 12].map((i) => `step ${i} host get-dirty-log: dirty pages`),
    );
  });

  it('dirty_log_clear_range: an observation where KVM took an unaligned clear is reported', async () => {
    const what = 'step 6 host clear-dirty-log: KVM_CLEAR_DIRTY_LOG of slot 1 pages [65, 128)';
    const r = await runCheck(scenarioCheck(load('dirty_log_clear_range')), kvm, profile, {
      wrongObservation: (_c, w, o) => (w === what ? 'ok' : o),
    });
    expect(r.comparisons.filter((c) => !c.ok).map((c) => [c.what, c.expected, c.observed])).toEqual([
      [what, '"EINVAL"', '"ok"'],
    ]);
  });

  it("host_range_across_slots: an observation that drops the second slot's part of a get is reported by that part", async () => {
    const what = 'step 1 host get-dirty-log: dirty pages of slot 2 in 0x1200000..0x1240000';
    const r = await runCheck(scenarioCheck(load('host_range_across_slots')), kvm, profile, {
      wrongObservation: (_c, w, o) => (w === what ? [] : o),
    });
    expect(r.outcome).toBe('fail');
    expect(r.comparisons.filter((c) => !c.ok).map((c) => c.what)).toEqual([what]);
  });

  it('translate_kinds: a walk model that sets no A bit above the leaf is reported where KVM set them', async () => {
    const r = await runCheck(
      scenarioCheck(load('translate_kinds'), { wrong: { walk: new Set(['no-accessed-on-upper'] as const) } }),
      kvm,
      profile,
    );
    expect(r.outcome).toBe('fail');
    // Steps 0, 9 and 10 walk upper entries nothing walked before; step 12 follows a clear-ad.
    // Steps 1 and 2 share upper entries step 0 already set; failing walks set nothing.
    expect(r.comparisons.filter((c) => !c.ok).map((c) => c.what)).toEqual(
      [
        'step 0 host translate 0x8000000123',
        'step 9 host translate 0x40000000010',
        'step 10 host translate 0x800000000456',
        'step 12 host translate 0x8000000008',
      ].map((n) => `${n}: PTEs after`),
    );
  });
});

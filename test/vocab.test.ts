// The scenario vocabulary of placed, created and host-written memslots, loop
// steps, "model" page-count stats and EFLAGS.AC at CPL 3: the rules that
// refuse bad files, the model's answers, and (with KVM) the built-in
// scenarios that use them, each comparison of which must report a wrong
// expectation, and the wrong models and observations they must catch.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Kvm } from '../src/kvm/kvm.js';
import type { Target } from '../src/kvm/target.js';
import { openLab, type LabSession } from '../src/lab/session.js';
import { declaredSlot, ModelVm } from '../src/model/vm.js';
import { probe, type HostProfile } from '../src/probe/probe.js';
import { scenarioCheck } from '../src/run/engine.js';
import { modelPageCount } from '../src/run/model-stats.js';
import { runCheck } from '../src/run/runner.js';
import { loadScenario, resolveScenario, scenarioToJson, validateScenario } from '../src/scenario/load.js';
import type { Scenario } from '../src/scenario/types.js';
import { localTarget } from '../src/target/local.js';
import { describeKvm, failures, kvmUnavailable, withHost } from './support/kvm.js';
import { wrong as wrongValue } from './support/wrong.js';

type J = Record<string, unknown>;
const NEW = ['thp_hva_aligned', 'thp_hva_misaligned', 'memslot_create_over_mmio', 'dirty_log_every_page'];
const load = (name: string): Scenario => loadScenario(resolveScenario(name));

function base(): J & { memslots: J[]; mappings: J[]; steps: J[] } {
  return {
    name: 't',
    description: 'd',
    memslots: [{ slot: 1, gpa: '0x1000000', size: '0x400000', backing: 'thp', logDirty: true }],
    mappings: [{ gva: '0x8000000000', gpa: '0x1000000', size: '0x400000', leaf: { w: true, u: true } }],
    steps: [{ guest: 'read', gva: '0x8000000000' }],
  };
}
function errorsOf(f: (j: ReturnType<typeof base>) => void): string[] {
  const j = base();
  f(j);
  const v = validateScenario(j);
  return v.ok ? [] : v.errors;
}

describe('scenario vocabulary: the rules', () => {
  const cases: [string, (j: ReturnType<typeof base>) => void, string[]][] = [
    [
      'an hva offset off 4K',
      (j) => (j.memslots[0]!.hva = { modulo: '2M', offset: '0x800' }),
      ['memslots[0].hva.offset: 0x800 must be 4K aligned and below 2M'],
    ],
    [
      'an hva offset past its modulus',
      (j) => (j.memslots[0]!.hva = { modulo: '2M', offset: '0x200000' }),
      ['memslots[0].hva.offset: 0x200000 must be 4K aligned and below 2M'],
    ],
    [
      'a hugetlb2m slot placed modulo 1G',
      (j) => {
        j.memslots[0]!.backing = 'hugetlb2m';
        j.memslots[0]!.hva = { modulo: '1G', offset: '0x0' };
      },
      ['memslots[0].hva.modulo: a hugetlb2m slot is placed modulo 2M only (modulo 1G would take 512 more huge pages)'],
    ],
    [
      'a slot created by a step with no memslot-create',
      (j) => (j.memslots[0]!.created = 'by-step'),
      ['memslots[0].created: a slot created by a step needs exactly one memslot-create step for slot 1'],
    ],
    [
      'memslot-create of a slot created at the start',
      (j) => j.steps.push({ host: 'memslot-create', slot: 1 }),
      ['steps[1].slot: memslot 1 is created at the start; declare it "created": "by-step"'],
    ],
    [
      'a dirty log of a slot before it is created',
      (j) => {
        j.memslots[0]!.created = 'by-step';
        j.steps.push({ host: 'get-dirty-log', slot: 1 }, { host: 'memslot-create', slot: 1 });
      },
      ['steps[1].slot: memslot 1 is not created yet (memslot-create)'],
    ],
    [
      'write-memory outside every slot',
      (j) => j.steps.push({ host: 'write-memory', gpa: '0x3000000', size: 8, value: 1 }),
      ['steps[1].gpa: 0x3000000 is not inside a declared user memslot (at its declared GPA)'],
    ],
    [
      'write-memory past the end of its slot',
      (j) => j.steps.push({ host: 'write-memory', gpa: '0x13ffff8', size: 16, value: 1 }),
      ['steps[1].size: [0x13ffff8, 0x1400008) runs past the end of memslot 1 [0x1000000, 0x1400000)'],
    ],
    [
      'write-memory of a word off 8 bytes',
      (j) => j.steps.push({ host: 'write-memory', gpa: '0x1000004', size: 8, value: 1 }),
      ['steps[1]: gpa must be 8-byte aligned and size a non-zero multiple of 8'],
    ],
    [
      '"model" for a stat the model does not count',
      (j) => (j.steps[0]!.stats = { pf_fixed: 'model' }),
      ['steps[0].stats.pf_fixed: "model" is for pages_2m and pages_1g only'],
    ],
    [
      'a loop with an expectation',
      (j) => (j.steps[0] = { guest: 'read', gva: '0x8000000000', count: 2, expect: { value: 0 } }),
      ['steps[0].expect: a loop is compared with the model only; give no "expect"'],
    ],
    [
      'a loop whose stride is not a multiple of the size',
      (j) => (j.steps[0] = { guest: 'read', gva: '0x8000000000', count: 2, stride: 6 }),
      ['steps[0].stride: the stride must be a non-zero multiple of the access size (8)'],
    ],
    [
      'a loop that runs onto RETURN_GVA',
      (j) => (j.steps[0] = { guest: 'read', gva: '0xffd000', count: 3 }),
      [
        "steps[0].gva: access 2 of the loop: 0xfff000 is in the page of the harness's RETURN_GVA 0xfff000, which stays unmapped as the way back from CPL 3 (a fault there is taken for that return); use another address",
      ],
    ],
    [
      'a loop access that crosses a page',
      (j) => (j.steps[0] = { guest: 'read', gva: '0x8000000ffa', count: 2, size: 4, stride: 4 }),
      ['steps[0].gva: access 1 of the loop, at 0x8000000ffe, crosses a 4K page boundary'],
    ],
    [
      'a stride without a count',
      (j) => (j.steps[0] = { guest: 'read', gva: '0x8000000000', stride: 8 }),
      ['steps[0].stride: a stride needs "count" above 1'],
    ],
  ];
  for (const [what, f, want] of cases) it(`refuses ${what}`, () => expect(errorsOf(f)).toEqual(want));

  it('takes EFLAGS.AC on CPL 3 reads, writes and fetches, and on CPL 0 fetches', () => {
    expect(
      errorsOf((j) => {
        j.steps = [
          { guest: 'read', gva: '0x8000000000', cpl: 3, eflagsAc: true },
          { guest: 'write', gva: '0x8000000000', cpl: 3, eflagsAc: true },
          { guest: 'exec', gva: '0x8000000000', cpl: 3, eflagsAc: true },
          { guest: 'exec', gva: '0x8000000000', eflagsAc: true },
        ];
      }),
    ).toEqual([]);
  });

  it('writes every new field back out so that validating it gives the scenario back', () => {
    const j = base();
    j.memslots[0]!.hva = { modulo: '1G', offset: '0x201000' };
    j.memslots.push({ slot: 2, gpa: '0x2000000', size: '0x1000', created: 'by-step' });
    j.steps = [
      { guest: 'write', gva: '0x8000000000', value: 1, count: 3, stride: '0x2000', stats: { pages_2m: 'model' } },
      { host: 'memslot-create', slot: 2 },
      { host: 'write-memory', gpa: '0x2000000', size: '0x10', value: '0x55' },
      { guest: 'exec', gva: '0x8000000000', cpl: 3, eflagsAc: true },
    ];
    const v = validateScenario(j);
    if (!v.ok) throw new Error(v.errors.join('\n'));
    const again = validateScenario(scenarioToJson(v.scenario));
    expect(again.ok && again.scenario).toEqual(v.scenario);
    expect(v.scenario.steps[0]).toMatchObject({ loop: { count: 3, stride: 0x2000n } });
  });
});

describe('scenario vocabulary: the model', () => {
  const G = 0x1000000n;
  const slot = (offset: bigint) =>
    declaredSlot(
      { slot: 1, gpa: G, size: 0x400000n, backing: 'thp', logDirty: false, readonly: false },
      0x7f0000000000n + offset,
    );
  it('maps a written THP at 2M where HVA and GPA are congruent mod 2M, at 4K where not', () => {
    for (const [offset, level, huge] of [
      [0n, 2, 1n],
      [0x1000n, 1, 0n],
    ] as const) {
      const vm = new ModelVm({ record: false });
      vm.setSlot(slot(offset));
      // GPA 0x1300000: with the 4K offset its HVA still lies in a 2M block inside the VMA (a THP).
      const f = vm.fault(G + 0x300000n, 'write');
      expect(f.level, `offset ${offset}`).toBe(level);
      expect(vm.tdp.host.lookup(vm.slot(1).hva + 0x300000n)?.level).toBe(2);
      expect(modelPageCount(vm, 'pages_2m')).toBe(huge);
    }
  });

  it('a host write replaces a zero page and zaps its mapping; nothing is logged dirty', () => {
    const vm = new ModelVm({ record: false });
    vm.setSlot(
      declaredSlot(
        { slot: 1, gpa: G, size: 0x10000n, backing: 'anon', logDirty: true, readonly: false },
        0x7f00000n << 12n,
      ),
    );
    expect(vm.fault(G + 0x1000n, 'read').kind).toBe('map');
    expect(vm.tdp.mappings(0).length).toBe(1);
    expect(vm.hostWrite(G + 0x1000n, 8n)).toMatch(/1 mapped page zapped/);
    expect(vm.tdp.mappings(0)).toEqual([]);
    expect(vm.harvestDirty(1)).toEqual([]);
    expect(vm.hostWrite(G + 0x1000n, 0x2000n)).toMatch(/the host writes 2 pages, none logged dirty; 0 mapped pages/);
  });
});

describeKvm('scenario vocabulary on KVM', () => {
  let kvm: Kvm;
  let profile: HostProfile;
  withHost((k, p) => {
    kvm = k;
    profile = p;
  });

  for (const name of NEW) {
    it(`${name}: every comparison reports a wrong expectation`, async () => {
      const ok = await runCheck(scenarioCheck(load(name)), kvm, profile);
      expect(ok.outcome, failures(ok)).toBe('pass');
      const r = await runCheck(scenarioCheck(load(name)), kvm, profile, {
        wrongExpectation: (_c, _w, e) => wrongValue(e),
      });
      expect(r.comparisons.map((c) => [c.what, c.ok])).toEqual(ok.comparisons.map((c) => [c.what, false]));
    });
  }

  it("dirty_log_every_page: an observation that drops the dirty page at the slot's end is reported", async () => {
    const what = 'step 1 host get-dirty-log: dirty pages';
    const r = await runCheck(scenarioCheck(load('dirty_log_every_page')), kvm, profile, {
      wrongObservation: (_c, w, o) => (w === what ? (o as string[]).filter((p) => p !== '0x1081000') : o),
    });
    expect(r.outcome).toBe('fail');
    const bad = r.comparisons.filter((c) => !c.ok);
    expect(bad.map((c) => c.what)).toEqual([what]);
    expect(bad[0]!.expected).toContain('0x1081000');
    expect(bad[0]!.observed).not.toContain('0x1081000');
  });

  it('dirty_log_every_page: a walk model that sets no A bit above the leaf is reported by the loops', async () => {
    const r = await runCheck(
      scenarioCheck(load('dirty_log_every_page'), { wrong: { walk: new Set(['no-accessed-on-upper'] as const) } }),
      kvm,
      profile,
    );
    expect(r.outcome).toBe('fail');
    expect(r.comparisons.filter((c) => !c.ok).map((c) => c.what)).toContain(
      'step 0 write64 0x8000000000 cpl0: paging entries after (133)',
    );
  });
});

// A TDP model that maps one level too low must be caught by "pages_2m": "model"
// on a host that counts TDP mappings; KVMHARNESS_LAB=1 runs it in the lab's npt-tdp.
const countsPages = kvmUnavailable
  ? `no KVM: ${kvmUnavailable}`
  : (() => {
      const p = probe(localTarget);
      return p.tdp.enabled && p.oracles.stats_faults.available ? undefined : 'this host does not count TDP mappings';
    })();
const inLab = countsPages !== undefined && process.env.KVMHARNESS_LAB === '1';
const skip =
  countsPages === undefined || inLab ? undefined : `${countsPages}; set KVMHARNESS_LAB=1 to run it in the lab`;
describe.skipIf(skip !== undefined)(
  `THP placement against a wrong TDP model${skip ? ` [skipped: ${skip}]` : ''}`,
  () => {
    let lab: LabSession | undefined;
    let target: Target = localTarget;
    beforeAll(async () => {
      if (inLab) {
        lab = await openLab({ profile: 'npt-tdp', log: () => {} });
        target = lab.target;
      }
    }, 180_000);
    afterAll(async () => {
      await lab?.close();
    });

    it('thp_hva_aligned: passes, and a model with levelOffByOne is reported at the 2M write', async () => {
      const k = Kvm.open(target);
      try {
        const p = probe(target);
        const ok = await runCheck(scenarioCheck(load('thp_hva_aligned')), k, p);
        expect(ok.outcome, failures(ok)).toBe('pass');
        const r = await runCheck(
          scenarioCheck(load('thp_hva_aligned'), { wrong: { tdp: { levelOffByOne: true } } }),
          k,
          p,
        );
        expect(r.outcome).toBe('fail');
        expect(r.comparisons.filter((c) => !c.ok).map((c) => c.what)).toEqual([
          'step 0 write64 0x8000300000 cpl0: stats pages_2m',
        ]);
      } finally {
        k.close();
      }
    }, 120_000);
  },
);

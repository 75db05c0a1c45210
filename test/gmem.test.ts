// guest_memfd: the model's rules for a guest_memfd slot (faults through the
// file map a writable 4 KiB page whatever the access; a punched hole is
// zapped; a released file leaves a memory-fault exit), the scenario rules of
// its steps, and, in the lab (KVMHARNESS_LAB=1, Linux 7.2 and 6.12), the
// built-in guest_memfd checks against KVM with deliberately wrong models and
// expectations.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { tdpGuestMemfdPicture } from '../src/checks/gmem.js';
import { Kvm } from '../src/kvm/kvm.js';
import { openLab, type LabSession } from '../src/lab/session.js';
import { ModelVm, declaredSlot } from '../src/model/vm.js';
import { decodeSpte } from '../src/model/spte.js';
import { probe } from '../src/probe/probe.js';
import { scenarioCheck } from '../src/run/engine.js';
import { hostFaultPath } from '../src/run/host-policy.js';
import { runCheck } from '../src/run/runner.js';
import { loadScenario, resolveScenario, validateScenario } from '../src/scenario/load.js';
import type { HostProfile } from '../src/probe/probe.js';
import { failures } from './support/kvm.js';

const GPA = 0x1000000n;
const HVA = 0x7f0000000000n;
const gfn = (page: number) => Number(GPA >> 12n) + page;

function vmWith(backing: 'guest_memfd' | 'anon' | 'memfd'): ModelVm {
  const vm = new ModelVm();
  vm.setSlot(declaredSlot({ slot: 1, gpa: GPA, size: 0x10000n, backing, logDirty: false, readonly: false }, HVA));
  return vm;
}

function leaf(vm: ModelVm, page: number): string {
  const m = vm.tdp.lookup(0, gfn(page));
  return m ? `level ${m.level} ${decodeSpte(m.spte).writable ? 'writable' : 'read-only'}` : 'not mapped';
}

describe('the TDP model of a guest_memfd slot', () => {
  it('maps a read of a never-written page writable at 4 KiB (an anonymous slot maps the zero page read-only)', () => {
    const gm = vmWith('guest_memfd');
    gm.fault(GPA, 'read');
    expect(leaf(gm, 0)).toBe('level 1 writable');
    const anon = vmWith('anon');
    anon.fault(GPA, 'read');
    expect(leaf(anon, 0)).toBe('level 1 read-only');
  });

  it('zaps exactly the punched pages; zapOneShort (deliberately wrong) keeps the last one', () => {
    for (const [wrong, kept] of [
      [false, ['not mapped', 'not mapped']],
      [true, ['not mapped', 'level 1 writable']],
    ] as const) {
      const vm = new ModelVm(wrong ? { wrong: { zapOneShort: true } } : {});
      vm.setSlot(
        declaredSlot(
          { slot: 1, gpa: GPA, size: 0x10000n, backing: 'guest_memfd', logDirty: false, readonly: false },
          HVA,
        ),
      );
      for (const p of [0, 1, 2, 3]) vm.fault(GPA + BigInt(p << 12), 'write');
      vm.change(1, 0x1000n, 0x2000n, 'punch_hole');
      expect([leaf(vm, 1), leaf(vm, 2)]).toEqual(kept);
      expect([leaf(vm, 0), leaf(vm, 3)]).toEqual(['level 1 writable', 'level 1 writable']);
      // The punched page refaults as a fresh page.
      expect(vm.fault(GPA + 0x1000n, 'read').kind).toBe('map');
    }
  });

  it('a released guest_memfd leaves every fault of the slot failing, as a memory-fault exit of the page', () => {
    const vm = vmWith('guest_memfd');
    vm.fault(GPA + 0x1000n, 'write');
    expect(vm.closeGuestMemfd(1)).toMatch(/^model: guest_memfd release invalidates GFN \[0x1000, 0x1010\) of slot 1/);
    expect(leaf(vm, 1)).toBe('not mapped');
    expect(vm.fault(GPA + 0x1010n, 'read').kind).toBe('efault');
    const profile = { flavour: 'kvm_amd' } as HostProfile;
    expect(hostFaultPath(profile, 'read', 0, GPA + 0x1010n, 4, true).stop).toEqual({
      exit: 'memory_fault',
      gpa: GPA + 0x1000n,
      size: 0x1000n,
      flags: 0n,
    });
    // Other memory: EFAULT without a memory-fault record.
    expect(hostFaultPath(profile, 'read', 0, GPA + 0x1010n, 4).stop).toEqual({ kvmRun: 'EFAULT' });
  });
});

describe('guest_memfd scenario rules', () => {
  const base = (memslots: unknown[], steps: unknown[]) => ({
    name: 't',
    description: 'd',
    memslots,
    mappings: [{ gva: '0x8000000000', gpa: '0x1000000', size: '0x1000' }],
    steps,
  });
  const gmem = { slot: 1, gpa: '0x1000000', size: '0x10000', backing: 'guest_memfd' };
  const errors = (json: unknown) => {
    const v = validateScenario(json);
    return v.ok ? [] : v.errors;
  };

  it('accepts the built-in guest_memfd scenarios', () => {
    for (const n of [
      'guest_memfd_shared',
      'guest_memfd_punch_hole',
      'guest_memfd_pre_fault',
      'guest_memfd_memory_fault',
    ])
      expect(loadScenario(resolveScenario(n)).memslots[0]!.backing).toBe('guest_memfd');
  });

  it('refuses what KVM refuses on a guest_memfd slot, and steps the slot cannot take', () => {
    expect(errors(base([{ ...gmem, logDirty: true }], []))).toEqual([
      'memslots[0].logDirty: KVM refuses dirty logging on a guest_memfd slot',
    ]);
    expect(errors(base([gmem], [{ host: 'memslot-move', slot: 1, gpa: '0x2000000' }]))).toEqual([
      'steps[0].slot: a guest_memfd slot cannot move (KVM: such slots are immutable); delete it instead',
    ]);
    expect(errors(base([gmem], [{ host: 'munmap', slot: 1, offset: '0x0', size: '0x1000' }]))).toEqual([
      'steps[0].slot: memslot 1 is a guest_memfd slot; of the host range steps only punch-hole applies',
    ]);
    expect(
      errors(
        base(
          [{ slot: 1, gpa: '0x1000000', size: '0x10000' }],
          [{ host: 'punch-hole', slot: 1, offset: '0x0', size: '0x1000' }],
        ),
      ),
    ).toEqual(['steps[0].slot: memslot 1 is anon memory; punch-hole needs a memfd or guest_memfd slot']);
    expect(
      errors(
        base(
          [gmem],
          [
            { host: 'close-guest-memfd', slot: 1 },
            { host: 'read-memory', gpa: '0x1000000', expect: '0x0' },
          ],
        ),
      ),
    ).toEqual(["steps[1]: memslot 1's guest_memfd was closed by an earlier step"]);
    expect(errors(base([gmem], [{ host: 'read-memory', gpa: '0x1000ffc', size: 8, expect: '0x1' }]))).toEqual([
      'steps[0].gpa: [0x1000ffc, 0x1001004) crosses a 4K page boundary',
    ]);
  });
});

// In the lab: Linux 7.2 offers an mmap-able, initially shared guest_memfd on
// a default VM; Linux 6.12 does not bind one (measured: KVM_CAP_GUEST_MEMFD 0
// on the VM, KVM_CREATE_GUEST_MEMFD with MMAP fails with EINVAL).
const lab = process.env.KVMHARNESS_LAB === '1';
const GMEM_SCENARIOS = [
  'guest_memfd_shared',
  'guest_memfd_punch_hole',
  'guest_memfd_pre_fault',
  'guest_memfd_memory_fault',
];

describe.skipIf(!lab)(`guest_memfd in the lab (7.2, npt-tdp)${lab ? '' : ' [skipped: set KVMHARNESS_LAB=1]'}`, () => {
  let s: LabSession | undefined;
  let kvm: Kvm;
  let profile: HostProfile;
  beforeAll(async () => {
    s = await openLab({ profile: 'npt-tdp', release: '7.2', log: () => {} });
    kvm = Kvm.open(s.target);
    profile = probe(s.target);
  }, 180_000);
  afterAll(async () => {
    kvm?.close();
    await s?.close();
  });

  it('the built-in guest_memfd scenarios pass', async () => {
    for (const n of GMEM_SCENARIOS) {
      const r = await runCheck(scenarioCheck(loadScenario(resolveScenario(n))), kvm, profile);
      expect(r.outcome, `${n}: ${failures(r)}`).toBe('pass');
    }
  });

  it('a wrong memory-fault gpa is reported naming exactly that field', async () => {
    const sc = loadScenario(resolveScenario('guest_memfd_memory_fault'));
    const r = await runCheck(scenarioCheck(sc), kvm, profile, {
      wrongExpectation: (_c, what, e) => (what.endsWith('memory_fault.gpa') ? (e as bigint) + 0x1000n : e),
    });
    expect(r.comparisons.filter((c) => !c.ok).map((c) => c.what)).toEqual([
      'step 3 read32 0x8000001010 cpl0: memory_fault.gpa',
    ]);
  });

  it('a prediction without the memory-fault record (EFAULT alone) is reported', async () => {
    const sc = loadScenario(resolveScenario('guest_memfd_memory_fault'));
    const r = await runCheck(scenarioCheck(sc), kvm, profile, {
      wrongExpectation: (_c, what, e) =>
        what.endsWith('KVM_RUN stops for the missing host memory') ? { kvmRun: 'EFAULT' } : e,
    });
    expect(r.outcome).toBe('fail');
    expect(r.comparisons.filter((c) => !c.ok).map((c) => c.what)).toEqual([
      'step 3 read32 0x8000001010 cpl0: KVM_RUN stops for the missing host memory',
    ]);
  });

  it('tdp_guest_memfd_picture: the model agrees with KVM; zapOneShort fails at the punched pages', async () => {
    const good = await runCheck(tdpGuestMemfdPicture(), kvm, profile);
    expect(good.outcome, failures(good)).toBe('pass');
    expect(good.comparisons.length).toBeGreaterThan(40);
    const bad = await runCheck(tdpGuestMemfdPicture({ wrong: { tdp: { zapOneShort: true } } }), kvm, profile);
    expect(bad.outcome).toBe('fail');
    expect(bad.comparisons.filter((c) => !c.ok).map((c) => c.what)).toEqual([
      'after fallocate(PUNCH_HOLE): gfn 0x1002',
      'after fallocate(PUNCH_HOLE): gfn 0x1009',
      // The wrong model still holds the pre-faulted page it did not zap; the refaulted one agrees again.
      'after the guest reads a punched page: gfn 0x1009',
    ]);
  });
});

describe.skipIf(!lab)(`guest_memfd in the lab (6.12)${lab ? '' : ' [skipped: set KVMHARNESS_LAB=1]'}`, () => {
  let s: LabSession | undefined;
  beforeAll(async () => {
    s = await openLab({ profile: 'npt-tdp', release: '6.12', log: () => {} });
  }, 180_000);
  afterAll(async () => {
    await s?.close();
  });

  it('is not applicable, with the capabilities and the errno as the reason', async () => {
    const kvm = Kvm.open(s!.target);
    try {
      const r = await runCheck(
        scenarioCheck(loadScenario(resolveScenario('guest_memfd_shared'))),
        kvm,
        probe(s!.target),
      );
      expect(r.outcome).toBe('not_applicable');
      expect(r.reason).toBe(
        'KVM_CREATE_GUEST_MEMFD(MMAP|INIT_SHARED): EINVAL; default VM: KVM_CAP_GUEST_MEMFD 0, KVM_CAP_GUEST_MEMFD_FLAGS 0x0, KVM_CAP_VM_TYPES 0x1 (shared guest_memfd: Linux 6.18)',
      );
    } finally {
      kvm.close();
    }
  });
});

import { describe, expect, it } from 'vitest';
import { decodeTdpSpte, TdpPicture, X86_SPTE } from '../src/observe/tdp-picture.js';
import type { TraceEvent } from '../src/observe/tracefs.js';
import { Memslots } from '../src/model/memslots.js';
import { Tdp } from '../src/model/tdp.js';

const ev = (gfn: bigint, level: number, oldSpte: bigint, newSpte: bigint, asId = 0): TraceEvent => ({
  id: 'kvmmmu/kvm_tdp_mmu_spte_changed',
  pid: 1,
  cpu: 0,
  ts: 0,
  fields: { as_id: BigInt(asId), gfn, level: BigInt(level), old_spte: oldSpte, new_spte: newSpte },
  text: '',
});
const P = X86_SPTE.mmuPresent;

describe('TDP picture from kvm_tdp_mmu_spte_changed', () => {
  it('decodes NPT and EPT leaf bits', () => {
    // An NPT 4K leaf: present, writable, accessed, dirty, executable (NX clear).
    expect(decodeTdpSpte(P | 0x1234000n | 0x2n | 0x20n | 0x40n, 1, 'npt')).toEqual({
      present: true,
      leaf: true,
      writable: true,
      executable: true,
      accessed: true,
      dirty: true,
    });
    // NX set, read-only, 2M leaf via PS.
    expect(decodeTdpSpte(P | (1n << 63n) | 0x80n, 2, 'npt')).toEqual({
      present: true,
      leaf: true,
      writable: false,
      executable: false,
      accessed: false,
      dirty: false,
    });
    // An EPT table entry at level 2 (no PS): not a leaf.
    expect(decodeTdpSpte(P | 0x7n, 2, 'ept').leaf).toBe(false);
    expect(decodeTdpSpte(P | 0x4n | 0x100n | 0x200n, 1, 'ept')).toMatchObject({
      executable: true,
      accessed: true,
      dirty: true,
    });
    // No MMU-present bit: not present (e.g. an MMIO or removed SPTE).
    expect(decodeTdpSpte(0x2n, 1, 'npt').present).toBe(false);
  });

  it('keeps the last change per GFN and level and finds the covering leaf', () => {
    const pic = new TdpPicture('npt', [
      ev(0x1000n, 2, 0n, P | 0x55000n | 0x7n), // a table at level 2 covering 0x1000..0x11ff
      ev(0x1003n, 1, 0n, P | 0x77000n | 0x5n), // 4K leaf, read-only
      ev(0x1003n, 1, P | 0x77000n | 0x5n, P | 0x88000n | 0x7n), // remapped writable
      ev(0x1200n, 2, 0n, P | 0x200000n | 0x87n), // a 2M leaf
      ev(0x1400n, 1, 0n, P | 0x99000n | 0x7n),
      ev(0x1400n, 1, P | 0x99000n | 0x7n, 0n), // zapped
    ]);
    expect(pic.leaf(0, 0x1003n)).toMatchObject({ level: 1, writable: true });
    expect(pic.leaf(0, 0x1004n)).toBeUndefined();
    expect(pic.leaf(0, 0x12abn)).toMatchObject({ level: 2, present: true });
    expect(pic.leaf(0, 0x1400n)).toBeUndefined();
    expect(pic.leaf(1, 0x1003n)).toBeUndefined(); // another address space
  });
});

describe('TDP model: dirty logging over a huge page', () => {
  // One 2 MiB THP block at GFN 0x2200 (HVA and GPA congruent), written by the host.
  const setup = (opts: ConstructorParameters<typeof Tdp>[1] = {}) => {
    const tdp = new Tdp(new Memslots(), { levels: 4, ...opts });
    const slot = {
      slot: 1,
      asId: 0,
      baseGfn: 0x2200,
      npages: 512,
      hva: 0x7f0000200000n,
      flags: { logDirty: false, readonly: false },
      backing: { kind: 'thp' as const, pageSize: 0x200000 },
    };
    tdp.setMemslot(slot);
    tdp.host.fault(slot, slot.hva, true);
    expect(tdp.fault(0, 0x2200, { write: true })).toMatchObject({ kind: 'map', level: 2 });
    return { tdp, slot };
  };
  const levels = (tdp: Tdp) =>
    tdp
      .mappings(0, 0x2200, 0x2400)
      .map((m) => `${m.start.toString(16)}-${m.end.toString(16)} L${m.level} ${m.writable ? 'W' : 'R'}`);

  it('eager split, one logged write, collapse back to 2 MiB', () => {
    const { tdp, slot } = setup();
    tdp.setMemslot({ ...slot, flags: { logDirty: true, readonly: false } });
    expect(levels(tdp)).toEqual(['2200-2400 L1 R']);
    expect(tdp.fault(0, 0x2237, { write: true }).kind).toBe('fast');
    expect(tdp.getDirtyLog(0, 1)).toEqual([0x2237]);
    tdp.setMemslot(slot);
    expect(levels(tdp)).toEqual([]);
    expect(tdp.fault(0, 0x2300, {})).toMatchObject({ kind: 'map', level: 2 });
    expect(levels(tdp)).toEqual(['2200-2400 L2 W']);
  });

  it('without eager split, a logged write splits the huge leaf, or with splitOnFault off zaps it (Linux 6.1)', () => {
    for (const splitOnFault of [true, false]) {
      const { tdp, slot } = setup({ eagerSplit: false, splitOnFault });
      tdp.setMemslot({ ...slot, flags: { logDirty: true, readonly: false } });
      expect(levels(tdp)).toEqual(['2200-2400 L2 R']);
      expect(tdp.fault(0, 0x2237, { write: true })).toMatchObject({ kind: 'map', level: 1 });
      expect(levels(tdp)).toEqual(
        splitOnFault ? ['2200-2237 L1 R', '2237-2238 L1 W', '2238-2400 L1 R'] : ['2237-2238 L1 W'],
      );
      expect(tdp.getDirtyLog(0, 1)).toEqual([0x2237]);
    }
  });

  it('noCollapse (a deliberately wrong model) keeps the 4 KiB leaves after logging stops', () => {
    const { tdp, slot } = setup({ wrong: { noCollapse: true } });
    tdp.setMemslot({ ...slot, flags: { logDirty: true, readonly: false } });
    tdp.setMemslot(slot);
    expect(levels(tdp)).toEqual(['2200-2400 L1 R']);
  });
});

// On a TDP host with the TDP MMU, a deliberately wrong TDP model must be
// caught by the per-GFN comparison. Without one here, KVMHARNESS_LAB=1 runs
// these in the lab's npt-tdp profile (a kernel booted under QEMU).
import { afterAll, beforeAll } from 'vitest';
import { tdpDirtyLogSplitCoalesce, tdpPicture } from '../src/checks/tdp.js';
import { Kvm } from '../src/kvm/kvm.js';
import { openLab, type LabSession } from '../src/lab/session.js';
import { probe } from '../src/probe/probe.js';
import { runCheck } from '../src/run/runner.js';
import { localTarget } from '../src/target/local.js';
import type { Target } from '../src/kvm/target.js';
import { kvmUnavailable } from './support/kvm.js';

const tdpHost = (() => {
  if (kvmUnavailable) return `no KVM: ${kvmUnavailable}`;
  const o = probe(localTarget).oracles.tdp_spte_tracepoints;
  return o.available ? undefined : o.why;
})();
const inLab = tdpHost !== undefined && process.env.KVMHARNESS_LAB === '1';
const skip =
  tdpHost === undefined || inLab
    ? undefined
    : `${tdpHost}; set KVMHARNESS_LAB=1 to run them in the lab's npt-tdp profile`;

describe.skipIf(skip !== undefined)(
  `TDP picture against wrong TDP models${skip ? ` [skipped: ${skip}]` : inLab ? ' (lab, npt-tdp)' : ''}`,
  () => {
    let lab: LabSession | undefined;
    /** This host, or the lab's npt-tdp profile. */
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

    it('the correct model agrees with KVM', async () => {
      const kvm = Kvm.open(target);
      try {
        const r = await runCheck(tdpPicture(), kvm, probe(target));
        expect(r.outcome, JSON.stringify(r.comparisons.filter((c) => !c.ok))).toBe('pass');
      } finally {
        kvm.close();
      }
    });

    it('dirty logging over a THP block: the correct model agrees with KVM', async () => {
      const kvm = Kvm.open(target);
      try {
        const r = await runCheck(tdpDirtyLogSplitCoalesce(), kvm, probe(target));
        expect(r.outcome, JSON.stringify({ reason: r.reason, failed: r.comparisons.filter((c) => !c.ok) })).toBe(
          'pass',
        );
        expect(r.comparisons.length).toBeGreaterThan(8);
      } finally {
        kvm.close();
      }
    });

    // Each wrong model must fail the step it gets wrong.
    const wrongSplitCoalesce: { name: string; opts: Parameters<typeof tdpDirtyLogSplitCoalesce>[0]; step: string }[] = [
      {
        name: 'levelOffByOne',
        opts: { wrong: { tdp: { levelOffByOne: true } } },
        step: '1. after the guest writes the block',
      },
      { name: 'no eager split', opts: { eagerSplit: false }, step: '2. after dirty logging starts' },
      {
        name: 'noCollapse',
        opts: { wrong: { tdp: { noCollapse: true } } },
        step: '5. after the guest touches the block again',
      },
    ];
    for (const w of wrongSplitCoalesce) {
      it(`dirty logging over a THP block: catches ${w.name}`, async () => {
        const kvm = Kvm.open(target);
        try {
          const r = await runCheck(tdpDirtyLogSplitCoalesce(w.opts), kvm, probe(target));
          expect(r.outcome, r.reason).toBe('fail');
          expect(r.comparisons.filter((c) => !c.ok).map((c) => c.what)).toContain(
            `${w.step}: mappings of the block's 512 GFNs`,
          );
        } finally {
          kvm.close();
        }
      });
    }

    for (const wrong of [{ zapOneShort: true }, { levelOffByOne: true }]) {
      it(`catches ${Object.keys(wrong)[0]}`, async () => {
        const kvm = Kvm.open(target);
        try {
          const r = await runCheck(tdpPicture({ wrong: { tdp: wrong } }), kvm, probe(target));
          expect(r.outcome).toBe('fail');
          expect(r.comparisons.some((c) => !c.ok)).toBe(true);
        } finally {
          kvm.close();
        }
      });
    }
  },
);

import { describe, expect, it } from 'vitest';
import { decodeTdpSpte, TdpPicture, X86_SPTE } from '../src/observe/tdp-picture.js';
import type { TraceEvent } from '../src/observe/tracefs.js';

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
    expect(decodeTdpSpte(P | 0x1234000n | 0x2n | 0x20n | 0x40n, 1, 'npt')).toEqual({ present: true, leaf: true, writable: true, executable: true, accessed: true, dirty: true });
    // NX set, read-only, 2M leaf via PS.
    expect(decodeTdpSpte(P | (1n << 63n) | 0x80n, 2, 'npt')).toEqual({ present: true, leaf: true, writable: false, executable: false, accessed: false, dirty: false });
    // An EPT table entry at level 2 (no PS): not a leaf.
    expect(decodeTdpSpte(P | 0x7n, 2, 'ept').leaf).toBe(false);
    expect(decodeTdpSpte(P | 0x4n | 0x100n | 0x200n, 1, 'ept')).toMatchObject({ executable: true, accessed: true, dirty: true });
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

// On a TDP host with the TDP MMU, a deliberately wrong TDP model must be
// caught by the per-GFN comparison. Without one here, KVMHARNESS_LAB=1 runs
// these in the lab's npt-tdp profile (a kernel booted under QEMU).
import { afterAll, beforeAll } from 'vitest';
import { tdpPicture } from '../src/checks/tdp.js';
import { Kvm } from '../src/kvm/kvm.js';
import { openLab, type LabSession } from '../src/lab/session.js';
import { probe } from '../src/probe/probe.js';
import { runCheck } from '../src/run/runner.js';
import { kvmUnavailable } from './support/kvm.js';

const tdpHost = (() => {
  if (kvmUnavailable) return `no KVM: ${kvmUnavailable}`;
  const o = probe().oracles.tdp_spte_tracepoints;
  return o.available ? undefined : o.why;
})();
const inLab = tdpHost !== undefined && process.env.KVMHARNESS_LAB === '1';
const skip = tdpHost === undefined || inLab ? undefined : `${tdpHost}; set KVMHARNESS_LAB=1 to run them in the lab's npt-tdp profile`;

describe.skipIf(skip !== undefined)(`TDP picture against wrong TDP models${skip ? ` [skipped: ${skip}]` : inLab ? ' (lab, npt-tdp)' : ''}`, () => {
  let lab: LabSession | undefined;
  beforeAll(async () => {
    if (inLab) lab = await openLab({ profile: 'npt-tdp', log: () => {} });
  }, 180_000);
  afterAll(async () => {
    await lab?.close();
  });

  it('the correct model agrees with KVM', async () => {
    const kvm = Kvm.open();
    try {
      const r = await runCheck(tdpPicture(), kvm, probe());
      expect(r.outcome, JSON.stringify(r.comparisons.filter((c) => !c.ok))).toBe('pass');
    } finally {
      kvm.close();
    }
  });

  for (const wrong of [{ zapOneShort: true }, { levelOffByOne: true }]) {
    it(`catches ${Object.keys(wrong)[0]}`, async () => {
      const kvm = Kvm.open();
      try {
        const r = await runCheck(tdpPicture({ wrong }), kvm, probe());
        expect(r.outcome).toBe('fail');
        expect(r.comparisons.some((c) => !c.ok)).toBe(true);
      } finally {
        kvm.close();
      }
    });
  }
});

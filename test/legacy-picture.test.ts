// The legacy MMU's per-GFN picture from its tracepoints' text, as Linux
// 6.1 and 7.2 print it (mmutrace.h). Lines are written by hand in those
// formats; expected values follow from mmu.c's rules, not from the code.
import { describe, expect, it } from 'vitest';
import { LegacyPicture } from '../src/observe/legacy-picture.js';
import { tdpObserverFor } from '../src/observe/spte-picture.js';
import type { TraceEvent } from '../src/observe/tracefs.js';

const ev = (name: string, text: string): TraceEvent => ({
  id: `kvmmmu/${name}`,
  pid: 1,
  cpu: 0,
  ts: 0,
  fields: {},
  text,
});
// NPT SPTEs: bit 11 MMU-present, bit 1 W, bit 7 PS, bit 63 NX.
const leaf4k = (pfn: number, w: boolean) =>
  `${((BigInt(pfn) << 12n) | 0x800n | 0x25n | (w ? 0x42n : 0n)).toString(16)}`;
const leaf2m = (pfn: number, w: boolean) =>
  `${((BigInt(pfn) << 12n) | 0x800n | 0xa5n | (w ? 0x42n : 0n)).toString(16)}`;
const setSpte = (gfn: number, spte: string, level: number) =>
  ev('kvm_mmu_set_spte', `gfn ${gfn.toString(16)} spte ${spte} (rwxu) level ${level} at 1234000`);
const getPage = (gfn: number, level: number, created: boolean) =>
  ev(
    'kvm_mmu_get_page',
    `sp gen 0 gfn ${gfn.toString(16)} l${level} 8-byte q0 direct wux !nxe !ad root 0 sync ${created ? 'new' : 'existing'}`,
  );
const zapPage = (gfn: number, level: number) =>
  ev(
    'kvm_mmu_prepare_zap_page',
    `sp gen 0 gfn ${gfn.toString(16)} l${level} 8-byte q0 direct wux !nxe !ad root 0 sync`,
  );

describe('legacy MMU picture', () => {
  it('takes leaves from kvm_mmu_set_spte, the fast path from fast_page_fault, MMIO from mark_mmio_spte', () => {
    const p = new LegacyPicture('npt', [
      setSpte(0x1000, leaf4k(0x5000, false), 1),
      setSpte(0x1001, leaf4k(0x5001, true), 1),
      ev(
        'fast_page_fault',
        `vcpu 0 gva 1000000 error_code P|W|U sptep 00000000d1b8e0d1 old 0x${leaf4k(0x5000, false)} new ${leaf4k(0x5000, true)} spurious 0 fixed 1`,
      ),
      ev('mark_mmio_spte', 'sptep:000000003a8b7e5a gfn fee00 access 6 gen 2'),
    ]);
    expect(p.leaf(0, 0x1000n)).toMatchObject({ level: 1, writable: true });
    expect(p.leaf(0, 0x1001n)).toMatchObject({ level: 1, writable: true });
    expect(p.leaf(0, 0x1002n)).toBeUndefined();
    expect(p.leaf(0, 0xfee00n)).toBeUndefined();
    expect(p.isMmio(0xfee00)).toBe(true);
    expect(p.unparsed).toBe(0);
  });

  it("drops a huge leaf when a table is linked under it, and a table's leaves when a huge leaf replaces it", () => {
    const p = new LegacyPicture('npt', [setSpte(0x1200, leaf2m(0x40000, false), 2)]);
    expect(p.leaf(0, 0x1237n)).toMatchObject({ level: 2, writable: false });
    p.add([getPage(0x1200, 1, true), setSpte(0x1237, leaf4k(0x40037, true), 1)]);
    expect(p.leaf(0, 0x1237n)).toMatchObject({ level: 1, writable: true });
    expect(p.leaf(0, 0x1238n)).toBeUndefined();
    p.add([setSpte(0x1200, leaf2m(0x40000, true), 2)]);
    expect(p.leaf(0, 0x1237n)).toMatchObject({ level: 2 });
  });

  it("unmaps a zapped shadow page's whole range, not a huge leaf that replaced it", () => {
    const p = new LegacyPicture('npt', [getPage(0x1000, 1, true), setSpte(0x1003, leaf4k(1, true), 1)]);
    p.add([zapPage(0x1000, 1)]);
    expect(p.leaf(0, 0x1003n)).toBeUndefined();
    const q = new LegacyPicture('npt', [getPage(0x1000, 1, true), setSpte(0x1000, leaf2m(0x40000, true), 2)]);
    q.add([zapPage(0x1000, 1)]); // the orphaned table goes; the 2 MiB leaf stays
    expect(q.leaf(0, 0x1003n)).toMatchObject({ level: 2 });
  });

  it('says what it cannot see: untraced zaps and write protection, and a reused shadow page', () => {
    const p = new LegacyPicture('npt', [setSpte(0x1000, leaf4k(1, true), 1), setSpte(0x1001, leaf4k(2, true), 1)]);
    p.untraced(0x1000, 0x1001, 'zap');
    p.untraced(0x1001, 0x1003, 'wrprot');
    expect([p.blind(0x1000), p.blind(0x1001), p.blind(0x1002)]).toEqual(['mapping', 'writable', undefined]);
    // A traced write makes the GFN known again.
    p.add([setSpte(0x1000, leaf4k(3, false), 1)]);
    expect(p.blind(0x1000)).toBeUndefined();
    // A shadow page found again keeps leaves the trace did not see go.
    p.add([getPage(0x2000, 1, false)]);
    expect(p.blind(0x2000)).toBe('mapping');
    expect(p.blind(0x21ff)).toBe('mapping');
  });

  it('is the observer for the legacy MMU only', () => {
    const facts = (tdpMmu: boolean) => ({
      arch: 'x86_64',
      tdp: { enabled: true, kind: 'npt' },
      tdpMmu,
      moduleParams: {},
    });
    expect(tdpObserverFor(facts(false))).toMatchObject({ mmu: 'legacy', oracle: 'legacy_spte_tracepoints' });
    expect(tdpObserverFor(facts(false)).picture()).toBeInstanceOf(LegacyPicture);
    expect(tdpObserverFor(facts(true))).toMatchObject({ mmu: 'tdp', events: ['kvmmmu/kvm_tdp_mmu_spte_changed'] });
  });
});

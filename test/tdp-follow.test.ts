// The per-GFN TDP picture after every scenario step (src/run/tdp-follow.ts):
// kvm_page_fault and MMIO SPTEs parsed from real lab traces (Linux 6.1 and
// 7.2), the model's side of the picture, and, in the lab's npt-tdp profile
// (KVMHARNESS_LAB=1), the oracle catching deliberately wrong TDP models.
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Kvm } from '../src/kvm/kvm.js';
import { openLab, type LabSession } from '../src/lab/session.js';
import { Memslots } from '../src/model/memslots.js';
import { Tdp } from '../src/model/tdp.js';
import type { WrongTdp } from '../src/model/wrong.js';
import { isMmioSpte, parsePageFault, PFERR, TdpPicture } from '../src/observe/tdp-picture.js';
import { parseFormat, parseTrace, type EventFormat } from '../src/observe/tracefs.js';
import { probe } from '../src/probe/probe.js';
import { scenarioCheck } from '../src/run/engine.js';
import { runCheck } from '../src/run/runner.js';
import { picturePair } from '../src/run/tdp-follow.js';
import { loadScenario, resolveScenario, scenarioToJson, validateScenario } from '../src/scenario/load.js';

/** A fixture: the two format files, then the trace lines, as the lab's tracefs gave them. */
function labTrace(release: string) {
  const text = readFileSync(join(__dirname, 'fixtures', `lab-trace-npt-tdp-${release}.txt`), 'utf8');
  const [formats, trace] = text.split('=== trace\n');
  const blocks = formats!.split(/\n(?=name: )/).filter((b) => b.startsWith('name: '));
  const byId = new Map<string, EventFormat>();
  for (const b of blocks) {
    const name = /^name: (\w+)/.exec(b)![1]!;
    const id = name === 'kvm_page_fault' ? `kvm/${name}` : `kvmmmu/${name}`;
    byId.set(id, parseFormat(id, b));
  }
  return parseTrace(trace!, byId);
}

describe.each(['6.1', '7.2'])('kvm_page_fault and MMIO SPTEs in a Linux %s lab trace', (release) => {
  const events = labTrace(release);

  it('parses every field of kvm_page_fault (its address is printed 0x%016llx)', () => {
    const faults = events.map(parsePageFault).filter((f) => !!f);
    expect(faults.length).toBe(11);
    // The first: the guest's walk meets the root table (GPA 0x10000), a guest page-table page.
    expect(faults[0]).toEqual({ vcpu: 0, rip: 0x100000n, gpa: 0x10000n, errorCode: 0x200000006n });
    expect(faults[0]!.errorCode & PFERR.guestPage).toBe(PFERR.guestPage);
    // A guest page-table entry's own address, not page aligned.
    expect(faults[3]!.gpa).toBe(0x13800n);
    // The code fetch at the entry point: final GPA, fetch, user.
    expect(faults[4]).toMatchObject({ gpa: 0x100000n, errorCode: 0x100000014n });
    // The read of a never-written page of the slot.
    expect(faults.find((f) => f.gpa === 0x1001000n)).toMatchObject({ rip: 0x10000dn, errorCode: 0x100000004n });
  });

  it('rebuilds the MMIO SPTE of the unbacked GPA and the read-only zero-page leaf', () => {
    const pic = new TdpPicture('npt', events);
    expect(pic.mapping(0, 0x8000n)).toEqual({ level: 1, writable: false, executable: false, mmio: true });
    expect(pic.leaf(0, 0x8000n)).toBeUndefined(); // not a present leaf
    expect(pic.mapping(0, 0x1001n)).toEqual({ level: 1, writable: false, executable: true, mmio: false });
    expect(pic.mapping(0, 0x1000n)).toMatchObject({ level: 1, writable: true, mmio: false });
    expect(pic.mapping(0, 0x1002n)).toBeUndefined();
  });
});

describe('MMIO SPTE decoding', () => {
  it('is the MMIO value under the mask, never an empty or frozen entry', () => {
    expect(isMmioSpte(0x8000008000027n, 'npt')).toBe(true); // from the lab traces above
    for (const v of [0n, 1n << 63n, 0x5a0n, (1n << 63n) | 0x5a0n]) expect(isMmioSpte(v, 'npt')).toBe(false);
    expect(isMmioSpte((1n << 11n) | (1n << 51n) | 1n, 'npt')).toBe(false); // shadow-present
    expect(isMmioSpte(0x6n, 'ept')).toBe(true);
    expect(isMmioSpte(0x7n, 'ept')).toBe(false);
  });
});

describe("the model's side of the picture", () => {
  const slot = {
    slot: 1,
    asId: 0,
    baseGfn: 0x1000,
    npages: 1024,
    hva: 0x7f0000000000n,
    flags: { logDirty: false, readonly: false },
    backing: { kind: 'hugetlb2m' as const, pageSize: 0x200000 },
  };

  it('lists every GFN a leaf or an MMIO SPTE maps, and counts flush requests', () => {
    const tdp = new Tdp(new Memslots(), { levels: 4 });
    tdp.setMemslot(slot);
    tdp.fault(0, 0x1001, { write: true });
    tdp.fault(0, 0x9000, {}); // no slot: MMIO
    const pic = tdp.picture(0);
    expect(pic.size).toBe(513);
    expect(pic.get(0x1000)).toEqual({ level: 2, writable: true, executable: true, mmio: false });
    expect(pic.get(0x9000)).toEqual({ level: 1, writable: false, executable: false, mmio: true });
    expect(tdp.flushRequests).toBe(0);
    tdp.zap(0, 0x1000, 0x1200);
    expect(tdp.flushRequests).toBe(1);
    expect(tdp.picture(0).size).toBe(1);
  });

  it('noFlush (a deliberately wrong model) requests no flush for the same zap', () => {
    const tdp = new Tdp(new Memslots(), { levels: 4, wrong: { noFlush: true } });
    tdp.setMemslot(slot);
    tdp.fault(0, 0x1001, { write: true });
    tdp.zap(0, 0x1000, 0x1200);
    expect(tdp.flushRequests).toBe(0);
  });
});

describe('which MMU model the picture takes, from the probe', () => {
  const profile = (tdp: boolean, tdpMmu: boolean, spte: boolean) =>
    ({
      arch: 'x86_64',
      tdp: { enabled: tdp, kind: tdp ? 'npt' : 'none' },
      tdpMmu,
      oracles: {
        tdp_spte_tracepoints: { available: spte, why: spte ? 'yes' : 'tdp_mmu is off' },
        legacy_spte_tracepoints: { available: tdp && !tdpMmu, why: tdpMmu ? 'tdp_mmu is on' : 'no TDP' },
      },
    }) as unknown as Parameters<typeof picturePair>[0];

  it('the TDP MMU where its SPTE tracepoints are, the legacy MMU under tdp_mmu=0; not applicable on shadow paging', () => {
    expect(picturePair(profile(true, true, true))).toMatchObject({ name: 'TDP MMU' });
    expect(picturePair(profile(true, false, false))).toMatchObject({ name: 'legacy MMU' });
    expect(picturePair(profile(false, false, false))).toEqual({
      why: 'TDP MMU: no SPTE tracepoints (tdp_mmu is off); legacy MMU: no legacy SPTE tracepoints (no TDP)',
    });
  });
});

describe('a step\'s "tdp" expectations', () => {
  const json = JSON.parse(readFileSync(join(__dirname, '..', 'guests', 'scenarios', 'tdp_zap_picture.json'), 'utf8'));

  it('decode, and encode back to the same file', () => {
    const v = validateScenario(json);
    if (!v.ok) throw new Error(v.errors.join('\n'));
    expect(v.scenario.steps[4]!.tdp).toEqual([
      { gpa: 0x11ff000n, present: true, level: 1, writable: true, executable: true },
    ]);
    const again = validateScenario(scenarioToJson(v.scenario));
    expect(again.ok && again.scenario).toEqual(v.scenario);
  });

  it('refuse a GPA that is not 4K aligned, and a page not present with a level', () => {
    const bad = structuredClone(json);
    bad.steps[4].tdp = [{ gpa: '0x11ff008' }, { gpa: '0x1000000', present: false, level: 1 }];
    const v = validateScenario(bad);
    expect(v.ok ? [] : v.errors).toEqual([
      'steps[4].tdp[0].gpa: 0x11ff008 is not 4K aligned',
      'steps[4].tdp[1]: a page expected not present has no level or permissions',
    ]);
  });
});

// In the lab: each deliberately wrong TDP model fails the step and names the GFN and field it gets wrong.
const inLab = process.env.KVMHARNESS_LAB === '1';
describe.skipIf(!inLab)(
  `the per-GFN picture catches wrong TDP models${inLab ? ' (lab, npt-tdp)' : ' [skipped: set KVMHARNESS_LAB=1]'}`,
  () => {
    let lab: LabSession | undefined;
    beforeAll(async () => {
      lab = await openLab({ profile: 'npt-tdp', log: () => {} });
    }, 180_000);
    afterAll(async () => {
      await lab?.close();
    });

    const run = async (name: string, wrong?: WrongTdp) => {
      const kvm = Kvm.open(lab!.target);
      try {
        const check = scenarioCheck(loadScenario(resolveScenario(name)), wrong ? { wrong: { tdp: wrong } } : {});
        return await runCheck(check, kvm, probe(lab!.target));
      } finally {
        kvm.close();
      }
    };
    const failed = (r: Awaited<ReturnType<typeof run>>) => r.comparisons.filter((c) => !c.ok).map((c) => c.what);

    const cases: { scenario: string; wrong: WrongTdp; what: string }[] = [
      // THP at 2 MiB: a model one level low maps the first write at 4 KiB.
      {
        scenario: 'dirty_log_thp',
        wrong: { levelOffByOne: true },
        what: 'step 0 write64 0x8000000000 cpl0: TDP gfn 0x1000 level',
      },
      // MADV_DONTNEED of one page: a zap one page short leaves it mapped.
      {
        scenario: 'madvise_refault',
        wrong: { zapOneShort: true },
        what: 'step 3 host madvise: TDP gfn 0x1001 present',
      },
      // The same zap without a flush request.
      {
        scenario: 'madvise_refault',
        wrong: { noFlush: true },
        what: 'step 3 host madvise: remote TLB flush requested (remote_tlb_flush_requests)',
      },
    ];
    it('tdp_zap_picture: a wrong "tdp" expectation fails naming its step and page', async () => {
      const sc = loadScenario(resolveScenario('tdp_zap_picture'));
      const kvm = Kvm.open(lab!.target);
      try {
        const right = await runCheck(scenarioCheck(sc), kvm, probe(lab!.target));
        expect(right.outcome, JSON.stringify(failed(right))).toBe('pass');
        sc.steps[4] = { ...sc.steps[4]!, tdp: [{ gpa: 0x11ff000n, level: 2 }] };
        const r = await runCheck(scenarioCheck(sc), kvm, probe(lab!.target));
        expect(failed(r)).toEqual(['step 4 write64 0x80001ff000 cpl0: TDP expected at 0x11ff000']);
      } finally {
        kvm.close();
      }
    }, 120_000);

    for (const c of cases) {
      it(`${c.scenario}: the correct model passes; ${Object.keys(c.wrong)[0]} fails naming ${c.what}`, async () => {
        const right = await run(c.scenario);
        expect(right.outcome, JSON.stringify(failed(right))).toBe('pass');
        expect(right.notes.some((n) => /TDP per-GFN picture: \d+ steps compared/.test(n))).toBe(true);
        const r = await run(c.scenario, c.wrong);
        expect(r.outcome).toBe('fail');
        expect(failed(r)).toContain(c.what);
      }, 120_000);
    }
  },
);

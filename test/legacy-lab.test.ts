// The legacy MMU (kvm.tdp_mmu=0 with NPT) against its model, live in the
// lab's npt-legacy profile (KVMHARNESS_LAB=1; KVMHARNESS_LAB_RELEASE picks
// the kernel, default the newest): the correct legacy model agrees with KVM
// in tdp_spte_picture and tdp_dirty_log_split_coalesce, and each deliberately
// wrong one (no prefetch, an eager split, the TDP MMU's zap of whole tables
// at logging off) fails exactly the comparison its mistake shows in.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { tdpDirtyLogSplitCoalesce, tdpPicture } from '../src/checks/tdp.js';
import { Kvm } from '../src/kvm/kvm.js';
import { openLab, type LabSession } from '../src/lab/session.js';
import type { WrongTdp } from '../src/model/wrong.js';
import { probe } from '../src/probe/probe.js';
import { scenarioCheck } from '../src/run/engine.js';
import { runCheck } from '../src/run/runner.js';
import { loadScenario, resolveScenario } from '../src/scenario/load.js';
import type { Check } from '../src/run/types.js';

const live = process.env.KVMHARNESS_LAB === '1';
const release = process.env.KVMHARNESS_LAB_RELEASE;

describe.skipIf(!live)(
  `legacy MMU against its model (lab, npt-legacy${release ? ` ${release}` : ''})${live ? '' : ' [skipped: set KVMHARNESS_LAB=1]'}`,
  () => {
    let lab: LabSession | undefined;
    beforeAll(async () => {
      lab = await openLab({ profile: 'npt-legacy', release, log: () => {} });
    }, 180_000);
    afterAll(async () => {
      await lab?.close();
    });

    const run = async (check: Check) => {
      const kvm = Kvm.open(lab!.target);
      try {
        const profile = probe(lab!.target);
        expect(profile.oracles.legacy_spte_tracepoints.available, profile.oracles.legacy_spte_tracepoints.why).toBe(
          true,
        );
        return await runCheck(check, kvm, profile);
      } finally {
        kvm.close();
      }
    };
    const failed = (r: Awaited<ReturnType<typeof run>>) => r.comparisons.filter((c) => !c.ok).map((c) => c.what);

    it('the per-step picture: the legacy model passes madvise_refault; noPrefetch fails naming the step, GFN and field', async () => {
      const sc = () => loadScenario(resolveScenario('madvise_refault'));
      const right = await run(scenarioCheck(sc()));
      expect(right.outcome, JSON.stringify(failed(right))).toBe('pass');
      const done = right.notes.find((n) => /^legacy MMU per-GFN picture: \d+ steps compared/.test(n));
      expect(done).toMatch(/: 10 steps compared, .* [1-9]\d* page-gauge comparisons$/); // 9 steps and the program's end
      const r = await run(scenarioCheck(sc(), { wrong: { tdp: { noPrefetch: true } } }));
      expect(r.outcome).toBe('fail');
      // The first fault (the guest's walk, on its root table page 0x10) prefetched 0x11..0x17 in KVM, not in the model.
      expect(failed(r)).toContain('step 0 write64 0x8000000000 cpl0: legacy MMU gfn 0x11 present');
    }, 120_000);

    it('the legacy model agrees with KVM in both checks', async () => {
      for (const check of [tdpPicture(), tdpDirtyLogSplitCoalesce()]) {
        const r = await run(check);
        expect(r.outcome, JSON.stringify({ reason: r.reason, failed: failed(r) })).toBe('pass');
      }
    }, 120_000);

    const cases: { name: string; check: (wrong: WrongTdp) => Check; wrong: WrongTdp; failing: string[] }[] = [
      {
        name: 'a missing prefetch',
        check: (tdp) => tdpPicture({ wrong: { tdp } }),
        wrong: { noPrefetch: true },
        failing: ["after the guest faults: the small slot's 512 GFNs"],
      },
      {
        name: 'an eager split when logging starts',
        check: (tdp) => tdpDirtyLogSplitCoalesce({ wrong: { tdp } }),
        wrong: { legacyEagerSplit: true },
        failing: [
          '2. dirty logging on: change of pages_4k/2m/1g',
          "2. after dirty logging starts: mappings of the block's 512 GFNs",
        ],
      },
      {
        name: 'a zap of the whole 512-entry table at logging off',
        check: (tdp) => tdpDirtyLogSplitCoalesce({ wrong: { tdp } }),
        wrong: { legacyZapTables: true },
        failing: ['4. shadow pages zapped over the block (kvm_mmu_prepare_zap_page)'],
      },
    ];
    for (const c of cases) {
      it(`catches ${c.name}`, async () => {
        const r = await run(c.check(c.wrong));
        expect(r.outcome).toBe('fail');
        for (const what of c.failing) expect(failed(r)).toContain(what);
      }, 120_000);
    }
  },
);

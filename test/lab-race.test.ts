/**
 * The race scenarios on the lab's target: each vCPU on a thread of its own in
 * the agent, the host's memslot operations made meanwhile. Through a local
 * agent (the lab's protocol over this host's KVM) always; with
 * KVMHARNESS_LAB=1 also in the lab's npt-tdp profile, where the real TDP MMU
 * runs them and the TDP picture at the end is compared. In both, a race model
 * that drops one dirty bit must be reported exactly as it is locally.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Kvm } from '../src/kvm/kvm.js';
import type { Target } from '../src/kvm/target.js';
import { openLab, type LabSession } from '../src/lab/session.js';
import { buildAgent, spawnLocalAgent, type LocalAgent } from '../src/lab/remote/agent-process.js';
import { remoteTarget } from '../src/lab/remote/target.js';
import { probe } from '../src/probe/probe.js';
import { scenarioCheck } from '../src/run/engine.js';
import { runCheck } from '../src/run/runner.js';
import { loadScenario, resolveScenario } from '../src/scenario/load.js';
import { describeKvm, failures } from './support/kvm.js';

const load = (name: string) => loadScenario(resolveScenario(name));

/** Each race scenario and the target whose dirty log the model's dropped bit belongs to. */
const RACES = [
  ['race_dirty_log_dontneed', 'target 0 (slot 1)'],
  ['race_dirty_log_dontneed_cpl3', 'target 0 (slot 1)'],
  ['memslot_delete_running', 'target 1 (slot 2)'],
] as const;

function raceTests(target: () => Target, lab: boolean): void {
  for (const [name, logged] of RACES) {
    it(`${name} runs its vCPUs beside the host's operations and passes`, async () => {
      const kvm = Kvm.open(target());
      try {
        const prof = probe(target());
        const r = await runCheck(scenarioCheck(load(name)), kvm, prof);
        expect(r.outcome, failures(r)).toBe('pass');
        expect(r.comparisons.map((c) => c.what)).toContain(
          'race: every host round overlaps a whole pass of every vCPU',
        );
        if (lab) {
          // The real TDP MMU: its mappings at the end were compared GFN by GFN.
          expect(prof.oracles.tdp_spte_tracepoints.available).toBe(true);
          const pictures = r.comparisons.filter((c) =>
            c.what.endsWith('TDP mappings at the end (kvm_tdp_mmu_spte_changed)'),
          );
          expect(pictures.length).toBe(2);
        }
      } finally {
        kvm.close();
      }
    });

    it(`${name}: a race model that drops one dirty bit is reported`, async () => {
      const kvm = Kvm.open(target());
      try {
        const r = await runCheck(
          scenarioCheck(load(name), { wrong: { race: { dropDirtyBit: true } } }),
          kvm,
          probe(target()),
        );
        expect(r.outcome).toBe('fail');
        const bad = r.comparisons.filter((c) => !c.ok);
        expect(bad.map((c) => c.what)).toEqual([`race: ${logged}: dirty log over all rounds`]);
        expect(bad[0]!.observed.length).toBeGreaterThan(bad[0]!.expected.length);
      } finally {
        kvm.close();
      }
    });
  }
}

describeKvm('race scenarios through a local agent (the lab protocol, vCPU threads in the agent)', () => {
  let dir: string;
  let agent: LocalAgent;
  beforeAll(() => {
    dir = mkdtempSync(join(tmpdir(), 'kvmharness-lab-race-'));
    agent = spawnLocalAgent(buildAgent(join(dir, 'kvmharness-agent')));
  }, 120_000);
  afterAll(() => {
    agent?.close();
    rmSync(dir, { recursive: true, force: true });
  });
  raceTests(() => remoteTarget(agent.addon), false);
});

const inLab = process.env.KVMHARNESS_LAB === '1';
describe.skipIf(!inLab)(
  `race scenarios in the lab (npt-tdp)${inLab ? '' : ' [skipped: set KVMHARNESS_LAB=1 to boot the lab]'}`,
  () => {
    let lab: LabSession | undefined;
    beforeAll(async () => {
      lab = await openLab({ profile: 'npt-tdp', log: () => {} });
    }, 180_000);
    afterAll(async () => {
      await lab?.close();
    });
    raceTests(() => lab!.target, true);
  },
);

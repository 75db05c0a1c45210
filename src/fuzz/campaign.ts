// A fuzzing campaign: case after case, each a scenario generated from its own
// seed and judged by the oracle; a failed case is shrunk by fast-check to the
// smallest plan whose scenario fails with the same signature.
//
// Case k of a campaign with seed S has the seed caseSeed(S, k), whatever else
// runs: the same seed gives the same cases, and `--shard I/N` runs the cases
// k with k mod N = I - 1, so N shards together run exactly the cases of one
// unsharded run. Each case is one fast-check run (numRuns 1) from its seed;
// fast-check's integrated shrinking of that run is deterministic.
import fc from 'fast-check';
import type { Kvm } from '../kvm/kvm.js';
import type { Wrong } from '../model/wrong.js';
import type { HostProfile } from '../probe/probe.js';
import { scenarioToJson, validateScenario } from '../scenario/load.js';
import type { Scenario } from '../scenario/types.js';
import { genHostOf, planArb, realise, scenarioSteps, type GenHost, type Plan } from './gen.js';
import {
  comparisonKind,
  judge,
  oraclesFor,
  traceOffered,
  type JudgeOptions,
  type Mismatch,
  type Verdict,
} from './oracle.js';

export interface Shard {
  /** 1-based. */
  index: number;
  count: number;
}

export interface CampaignOptions {
  seed: number;
  /** Stop after this many cases (of this shard). */
  cases?: number;
  /** Stop starting cases after this long. */
  durationMs?: number;
  shard?: Shard;
  /** Most steps per scenario. */
  maxSteps?: number;
  /** Most scenarios run while shrinking one finding (default 300). */
  shrinkRuns?: number;
  /** Most time spent shrinking one finding (default 60 s). */
  shrinkMs?: number;
  /** Test-only: a deliberately wrong model. */
  wrong?: Wrong;
  /** Compare KVM's walker tracepoints too, where the host offers them (default true). */
  trace?: boolean;
  /** Asked before each case: true ends the campaign (a signal). */
  stop?: () => boolean;
  onProgress?: (p: Progress) => void;
  /** A new finding, shrunk. */
  onFinding?: (f: Finding) => Promise<void> | void;
}

export interface Progress {
  cases: number;
  steps: number;
  findings: number;
  elapsedMs: number;
}

export interface Finding {
  signature: string;
  /** The case's index in the campaign and its fast-check seed. */
  caseIndex: number;
  caseSeed: number;
  /** The shrunk scenario (normalised) and its JSON file form. */
  scenario: Scenario;
  json: unknown;
  /** The case as generated, before shrinking. */
  original: unknown;
  originalSteps: number;
  steps: number;
  /** Shrinking steps fast-check took. */
  shrinks: number;
  mismatch?: Mismatch;
  verdict: Verdict;
  /** Later cases that failed with the same signature (not shrunk again). */
  repeats: number;
}

export interface CampaignSummary {
  seed: number;
  shard: Shard;
  cases: number;
  steps: number;
  durationMs: number;
  outcomes: { pass: number; fail: number; notApplicable: number; error: number; invalid: number };
  /** Reasons of not-applicable cases, with their counts. */
  notApplicable: Record<string, number>;
  findings: Finding[];
  /** Why the campaign ended: cases, duration, signal, kernel. */
  ended: 'cases' | 'duration' | 'interrupted' | 'kernel';
  trace: boolean;
}

/** `sc` without the steps after its first failing one, if it has any, valid. */
function truncated(sc: Scenario, v: Verdict): { scenario: Scenario; json: unknown } | undefined {
  const m = v.mismatch ? /^step (\d+) /.exec(v.mismatch.what) : null;
  if (!m || sc.race) return undefined;
  const keep = Number(m[1]) + 1;
  if (keep >= sc.steps.length) return undefined;
  const json = scenarioToJson({ ...sc, steps: sc.steps.slice(0, keep) });
  const r = validateScenario(json);
  return r.ok ? { scenario: { ...r.scenario }, json } : undefined;
}

/** The fast-check seed of case k of a campaign with `seed` (a 32-bit mix, independent of the other cases). */
export function caseSeed(seed: number, k: number): number {
  let h = Math.imul(seed ^ 0x9e3779b9, 0x85ebca6b) ^ Math.imul(k + 1, 0xc2b2ae35);
  h = Math.imul(h ^ (h >>> 16), 0x85ebca6b);
  h = Math.imul(h ^ (h >>> 13), 0xc2b2ae35);
  return (h ^ (h >>> 16)) | 0;
}

/** The scenario name of case k. */
export const caseName = (seed: number, k: number) => `fuzz_s${seed}_c${k}`;

/** The cases of a campaign, in order: indexes k of this shard. */
export function* caseIndexes(shard: Shard): Generator<number> {
  for (let k = shard.index - 1; ; k += shard.count) yield k;
}

/** The plan of case k (what the campaign generates for it before any shrinking). */
export function casePlan(host: GenHost, seed: number, k: number, maxSteps?: number): Plan {
  return fc.sample(planArb(host, { maxSteps }), { seed: caseSeed(seed, k), numRuns: 1 })[0]!;
}

/** Whether shared guest_memfd slots work on `kvm` (the campaign generates them only then): asked of a VM. */
export function guestMemfdWorks(kvm: Kvm): boolean {
  const vm = kvm.createVm();
  try {
    return vm.sharedGuestMemfdUnsupported() === undefined;
  } finally {
    vm.close();
  }
}

/** Runs a campaign against `kvm`. */
export async function campaign(kvm: Kvm, profile: HostProfile, o: CampaignOptions): Promise<CampaignSummary> {
  const host = { ...genHostOf(profile), guestMemfd: guestMemfdWorks(kvm) };
  const shard = o.shard ?? { index: 1, count: 1 };
  const trace = (o.trace ?? true) && traceOffered(profile);
  const arb = planArb(host, { maxSteps: o.maxSteps });
  const t0 = performance.now();
  const sum: CampaignSummary = {
    seed: o.seed,
    shard,
    cases: 0,
    steps: 0,
    durationMs: 0,
    outcomes: { pass: 0, fail: 0, notApplicable: 0, error: 0, invalid: 0 },
    notApplicable: {},
    findings: [],
    ended: 'cases',
    trace,
  };
  const known = new Map<string, Finding>();
  const progress = () =>
    o.onProgress?.({
      cases: sum.cases,
      steps: sum.steps,
      findings: sum.findings.length,
      elapsedMs: performance.now() - t0,
    });
  for (const k of caseIndexes(shard)) {
    if (o.cases !== undefined && sum.cases >= o.cases) break;
    if (o.durationMs !== undefined && performance.now() - t0 >= o.durationMs) {
      sum.ended = 'duration';
      break;
    }
    if (o.stop?.()) {
      sum.ended = 'interrupted';
      break;
    }
    const seed = caseSeed(o.seed, k);
    const name = caseName(o.seed, k);
    // The first run is the case; the runs after a failure are fast-check's shrinking.
    let first: { verdict: Verdict; json: unknown; steps: number } | undefined;
    let target: string | undefined;
    let last: { verdict: Verdict; scenario: Scenario; json: unknown } | undefined;
    let shrinkRuns = 0;
    let shrinkUntil = 0;
    const full: JudgeOptions = { trace, wrong: o.wrong };
    let oracles = full;
    let dead = false;
    let fatal: unknown;
    const property = fc.asyncProperty(arb, async (plan) => {
      if (dead) return true;
      const r = realise(plan, host, name);
      if (!r.ok) {
        if (!first) sum.outcomes.invalid++;
        return true;
      }
      if (first && (shrinkRuns++ >= (o.shrinkRuns ?? 300) || performance.now() > shrinkUntil)) return true;
      let v: Verdict;
      try {
        v = await judge(r.scenario, kvm, profile, oracles);
      } catch (e) {
        // A host error (the device, the lab's channel): no case can run any more.
        fatal = e;
        dead = true;
        return true;
      }
      if (v.dead) dead = true;
      if (!first) {
        first = { verdict: v, json: r.json, steps: scenarioSteps(r.scenario) };
        if (!v.signature || known.has(v.signature)) return true;
        target = v.signature;
        last = { verdict: v, scenario: r.scenario, json: r.json };
        oracles = oraclesFor(target, full);
        shrinkUntil = performance.now() + (o.shrinkMs ?? 60_000);
        return false;
      }
      if (v.signature !== target) return true;
      last = { verdict: v, scenario: r.scenario, json: r.json };
      return false;
    });
    const details = await fc.check(property, { seed, numRuns: 1 });
    if (o.stop?.()) {
      // A signal during the case: its clean-ups (trace instances) may have cut it short; it is not counted.
      sum.ended = 'interrupted';
      break;
    }
    if (fatal) throw fatal;
    sum.cases++;
    const f = first as { verdict: Verdict; json: unknown; steps: number } | undefined;
    if (f) {
      sum.steps += f.steps;
      const v = f.verdict;
      if (v.outcome === 'pass') sum.outcomes.pass++;
      else if (v.outcome === 'not_applicable') {
        sum.outcomes.notApplicable++;
        const why = v.reason ?? 'not applicable';
        sum.notApplicable[why] = (sum.notApplicable[why] ?? 0) + 1;
      } else if (v.outcome === 'error') sum.outcomes.error++;
      else sum.outcomes.fail++;
      const again = v.signature ? known.get(v.signature) : undefined;
      if (again) again.repeats++;
      let l = last as { verdict: Verdict; scenario: Scenario; json: unknown } | undefined;
      if (target && l && !dead) {
        // The steps after the first failing one, unless the failure needs them (a clear-dirty-log
        // anywhere changes how the log works; an exec puts its `ret` in place at the start).
        const cut = truncated(l.scenario, l.verdict);
        if (cut) {
          const v = await judge(cut.scenario, kvm, profile, oracles);
          if (v.dead) dead = true;
          if (v.signature === target) l = { verdict: v, ...cut };
        }
      }
      if (target && l && oracles !== full && !dead) {
        // The shrunk scenario judged by every oracle, as `run` will judge it.
        const again = await judge(l.scenario, kvm, profile, full);
        if (again.dead) dead = true;
        const c = again.result.comparisons.find((x) => !x.ok && comparisonKind(x.what) === target);
        if (c)
          l = { ...l, verdict: { ...again, mismatch: { what: c.what, expected: c.expected, observed: c.observed } } };
      }
      if (target && l) {
        const finding: Finding = {
          signature: target,
          caseIndex: k,
          caseSeed: seed,
          scenario: l.scenario,
          json: l.json,
          original: f.json,
          originalSteps: f.steps,
          steps: scenarioSteps(l.scenario),
          shrinks: details.numShrinks,
          ...(l.verdict.mismatch ? { mismatch: l.verdict.mismatch } : {}),
          verdict: l.verdict,
          repeats: 0,
        };
        known.set(target, finding);
        sum.findings.push(finding);
        await o.onFinding?.(finding);
      }
    }
    progress();
    if (dead) {
      sum.ended = 'kernel';
      break;
    }
  }
  sum.durationMs = performance.now() - t0;
  progress();
  return sum;
}

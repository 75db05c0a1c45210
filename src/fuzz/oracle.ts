// The fuzzer's oracle: a scenario run as the scenario engine runs any
// scenario, so every model the engine has judges every step (the guest walk,
// A/D bits, exceptions, MMIO exits, values and memory, dirty logs, stats, the
// shadow MMU model where the host has its tracepoints, KVM's walker trace
// where it has those), and the kernel log of a lab kernel is read after it (a
// BUG, oops or KVM warning fails the case). A step whose oracle the host lacks
// is not applicable, never passed: the result says so and the case counts as
// not applicable.
//
// A failed case is known by its signature: the step kind and the field of its
// first failing comparison ("read: exceptions", "host get-dirty-log: dirty
// pages"), or the kernel's message, or the error. Shrinking keeps a candidate
// only when its signature is the original's.
import type { Kvm } from '../kvm/kvm.js';
import type { KernelProblem } from '../kvm/target.js';
import type { Wrong } from '../model/wrong.js';
import type { HostProfile } from '../probe/probe.js';
import { scenarioCheck } from '../run/engine.js';
import { LoopLimit } from '../run/loop.js';
import { kernelVerdict, runCheck } from '../run/runner.js';
import type { CheckResult } from '../run/types.js';
import type { Scenario } from '../scenario/types.js';

export interface Mismatch {
  /** The comparison as the engine names it: `step 4 read64 0x8000000000 cpl3: exceptions`. */
  what: string;
  expected: string;
  observed: string;
}

export interface Verdict {
  outcome: CheckResult['outcome'];
  /** What a failed or errored case is known by (see signatureOf). */
  signature?: string;
  /** The first failing comparison. */
  mismatch?: Mismatch;
  reason?: string;
  kernel?: KernelProblem[];
  /** The kernel under test stopped (panic, hang): nothing more can run on it. */
  dead?: string;
  result: CheckResult;
}

export interface JudgeOptions {
  /** Compare KVM's walker tracepoints too (where the host offers them). */
  trace: boolean;
  /** false: without the shadow MMU model beside the run (default: where the host has its tracepoints). */
  shadowFollow?: boolean;
  /** false: without the per-GFN TDP picture beside the run (default: where the host has a model and tracepoints). */
  tdpFollow?: boolean;
  /** Test-only: a deliberately wrong model. */
  wrong?: Wrong;
}

/** Why a case whose loop leaves the guest midway is not judged. */
export const LOOP_LIMIT =
  'a guest loop that the model says exits to the host midway (MMIO, missing host memory): the engine runs such accesses only as steps of their own';

/** Whether the walker-trace comparison can run here: tracepoints and KVM's software walker (no TDP). */
export function traceOffered(profile: HostProfile): boolean {
  return profile.oracles.walker_tracepoints.available && !profile.tdp.enabled;
}

/** Runs `sc` against KVM and judges it. */
export async function judge(sc: Scenario, kvm: Kvm, profile: HostProfile, o: JudgeOptions): Promise<Verdict> {
  const inner = scenarioCheck(sc, {
    trace: o.trace && !sc.race,
    wrong: o.wrong,
    shadowFollow: o.shadowFollow,
    tdpFollow: o.tdpFollow,
  });
  // A generated loop that the model says leaves the guest midway is outside what the engine runs
  // as one step: the case is not judged (not applicable, with that reason), never a finding.
  let limit = false;
  const check = {
    ...inner,
    run: async (ctx: Parameters<typeof inner.run>[0]) => {
      try {
        await inner.run(ctx);
      } catch (e) {
        if (e instanceof LoopLimit) limit = true;
        throw e;
      }
    },
  };
  let r = await runCheck(check, kvm, profile);
  if (limit && r.outcome === 'error') r = { ...r, outcome: 'not_applicable', reason: LOOP_LIMIT };
  let dead: string | undefined;
  const watch = kvm.target.watch;
  if (watch) {
    const k = await watch.since();
    if (k.problems.length) r = kernelVerdict(r, k.problems);
    dead = k.dead;
  }
  const first = r.comparisons.find((c) => !c.ok);
  const mismatch = first ? { what: first.what, expected: first.expected, observed: first.observed } : undefined;
  return {
    outcome: r.outcome,
    signature: signatureOf(r),
    ...(mismatch ? { mismatch } : {}),
    ...(r.reason ? { reason: r.reason } : {}),
    ...(r.kernel ? { kernel: r.kernel } : {}),
    ...(dead ? { dead } : {}),
    result: r,
  };
}

/** Numbers, addresses and pids out of a message, so that one kind of message has one signature. */
const general = (s: string) => s.replace(/0x[0-9a-f]+/gi, 'N').replace(/\b\d+\b/g, 'N');

/**
 * What a failed or errored result is known by: `kernel: <message>` when the
 * kernel complained, `error: <reason>` when the case could not finish, else
 * the step kind and field of the first failing comparison.
 */
export function signatureOf(r: CheckResult): string | undefined {
  if (r.kernel?.length) return `kernel: ${general(r.kernel[0]!.message)}`;
  if (r.outcome === 'error') return `error: ${general(r.reason ?? '')}`;
  if (r.outcome !== 'fail') return undefined;
  const first = r.comparisons.find((c) => !c.ok);
  return first ? comparisonKind(first.what) : `fail: ${general(r.reason ?? '')}`;
}

/**
 * The step kind and field of an engine comparison: `step 4 read64 0x8000000000
 * cpl3: exceptions` is `read: exceptions`, `step 2 host get-dirty-log: dirty
 * pages` is `host get-dirty-log: dirty pages`; a comparison of no step (`guest
 * finishes`, a race's) is itself.
 */
export function comparisonKind(what: string): string {
  const m = /^step \d+ ([^:]*): (.*)$/.exec(what);
  if (!m) return general(what);
  const name = m[1]!;
  const access = /^(read|write|exec)\d* /.exec(name);
  const kind = access
    ? access[1]!
    : name.startsWith('host ')
      ? name.split(' ').slice(0, 2).join(' ')
      : name.split(' ')[0]!;
  return `${kind}: ${general(m[2]!)}`;
}

/**
 * The oracles a run needs to show a signature again: KVM's walker trace only
 * for a walker-trace mismatch, the shadow MMU model only for a shadow one,
 * the per-GFN TDP picture only for a TDP one.
 * Shrinking runs candidates with these alone (each tracefs session costs tens
 * of milliseconds a step here); the shrunk scenario is judged again with all.
 */
export function oraclesFor(signature: string, full: JudgeOptions): JudgeOptions {
  const field = signature.slice(signature.indexOf(': ') + 2);
  const kernelOrError = /^(kernel|error|fail): /.test(signature);
  if (kernelOrError) return full;
  return {
    ...full,
    trace: full.trace && /walker trace/.test(field),
    shadowFollow: /shadow/.test(field),
    tdpFollow: /TDP|remote TLB flush/.test(field),
  };
}

// What a check is, what it produced, and how a run is summarised.
import type { Arch } from '../arch/arch.js';
import type { Kvm } from '../kvm/kvm.js';
import type { KernelProblem, Target } from '../kvm/target.js';
import type { HostProfile, Oracle } from '../probe/probe.js';

/**
 * not_run: the run was interrupted (SIGINT, SIGTERM, ...), or the kernel
 * under test crashed or hung, before the check finished or began.
 */
export type Outcome = 'pass' | 'fail' | 'not_applicable' | 'error' | 'not_run';

/** One expected-against-observed record; ok is decided by the differ, not the check. */
export interface Comparison {
  what: string;
  expected: string;
  observed: string;
  ok: boolean;
}

export interface CheckResult {
  name: string;
  description: string;
  outcome: Outcome;
  comparisons: Comparison[];
  /** Why the check is not applicable or was not run, or the error that stopped it. */
  reason?: string;
  notes: string[];
  durationMs: number;
  /** For checks that check many cases (the access matrix): counts per outcome. */
  cases?: CaseCounts;
  /** What the kernel under test logged as going wrong while the check ran (it fails the check). */
  kernel?: KernelProblem[];
}

export interface CaseCounts {
  checked: number;
  /** e.g. { pass: 19990, 'fault P|W': 1234, mismatch: 0 } — keys are the check's own. */
  byOutcome: Record<string, number>;
}

export interface Summary {
  total: number;
  passed: number;
  failed: number;
  notApplicable: number;
  errors: number;
  /** Checks left unfinished by an interrupted run. */
  notRun: number;
  /** The signal that interrupted the run, if one did. */
  interrupted?: string;
  /** Why the run stopped early, when the kernel under test crashed or hung. */
  stopped?: string;
  durationMs: number;
  /** Sum of CheckResult.cases.checked over the run (0 when no check counts cases). */
  casesChecked: number;
}

export interface RunReport {
  host: Pick<HostProfile, 'arch' | 'flavour' | 'tdp' | 'tdpMmu'> & { device: string };
  checks: CheckResult[];
  summary: Summary;
  /** Where the whole console log of the kernel under test is kept (lab runs). */
  consoleLog?: string;
}

/**
 * Lets a caller replace an expectation before it is compared; tests use it to
 * feed a deliberately wrong expectation and see the mismatch reported. (A
 * deliberately wrong model, which makes its expectations wrong at the source,
 * is model/wrong.ts's Wrong.)
 */
export type WrongExpectation = (check: string, what: string, expected: unknown) => unknown;

/**
 * Lets a caller replace an observation before it is compared; tests use it to
 * feed what KVM could wrongly produce (a page-aligned CR2, a missing A bit, an
 * extra dirty page) and see the check report it.
 */
export type WrongObservation = (check: string, what: string, observed: unknown) => unknown;

export interface CheckContext {
  /** The machine under test: its files (tracefs, sysfs) and what it can do. */
  target: Target;
  /** Its KVM device (opened on `target`). */
  kvm: Kvm;
  profile: HostProfile;
  /** Records a comparison; equality is structural, bigints and bytes included. */
  expect(what: string, expected: unknown, observed: unknown): void;
  note(line: string): void;
  /** Adds case counts (many-case checks); a mismatching case must also be recorded with expect(). */
  cases(counts: CaseCounts): void;
  /** Progress for a terminal (done of total); ignored when nobody listens. */
  progress(done: number, total: number): void;
}

export interface Check {
  name: string;
  description: string;
  /** Oracles the check needs; missing ones make it "not applicable here". */
  needs: Oracle[];
  /** At least one of these oracles (the check uses whichever the host has); none of them makes it "not applicable here". */
  needsOneOf?: Oracle[];
  /** The KVM host architecture the check's guest is built for; none: any. */
  arch?: Arch;
  run(ctx: CheckContext): Promise<void>;
}

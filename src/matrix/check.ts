// `kvmharness run access-matrix`: every legal case of the access.c class that this
// vCPU can run (or a seeded sample of them), run on KVM in batches of one
// KVM_RUN each — on two guests side by side where the host has the CPUs — and
// compared case by case with the walk model. Mismatching cases are listed, and
// the first of them re-run alone with KVM's page-walk tracepoints on, so that a
// report shows the model's walk next to the walk KVM did.
import { availableParallelism } from 'node:os';
import { describeStop } from '../arch/x86/guest.js';
import { compileWalk, type CompiledWalk, type GuestWalker, type PagingConfig } from '../model/walk.js';
import { pagingConfigOf } from '../model/paging.js';
import type { Wrong, WrongWalk } from '../model/wrong.js';
import { TraceSession, type TraceEvent } from '../observe/tracefs.js';
import { formatRerun, type Rerun } from '../report/rerun.js';
import { guestWalkerOf, type CpuFeatures } from '../probe/probe.js';
import { NotApplicable } from '../base/not-applicable.js';
import type { Check, CheckContext } from '../run/types.js';
import {
  agrees,
  comparable,
  observe,
  outcomeKey,
  prepareBatch,
  type Batch,
  type Observed,
  type Placement,
} from './batch.js';
import { Coverage } from './coverage.js';
import {
  CASE,
  caseName,
  caseSpace,
  controlState,
  countCases,
  enumerateCases,
  sampleCases,
  type CaseSpace,
} from './flags.js';
import { MatrixMachine, pkruFor } from './machine.js';

export interface AccessMatrixOptions {
  /** Run a seeded random subset of this many cases (default: every legal case). */
  sample?: number;
  /** Seed of the sample (default 1). */
  seed?: number;
  mode?: '4level' | '5level';
  /** Cases per guest entry (default 2048). */
  batchSize?: number;
  /** A deliberately wrong model (test use only): the check must then report mismatches. */
  wrong?: Wrong;
  /** Guests running batches side by side, each on its own vCPU thread (default: 2 where the host has 2 or more CPUs). */
  lanes?: number;
  /** A deliberately wrong observation (test use only): what KVM could wrongly do to a case; the check must report it. */
  wrongObservation?: (f: number, observed: Observed, at: Placement) => Observed;
  /** A deliberately wrong case list (test use only), e.g. one that drops a class: the coverage must report it. */
  wrongCases?: (cases: Uint32Array) => Uint32Array;
}

/** One lane per CPU, at most two: the host side of a lane needs a share of a CPU too. */
function defaultLanes(): number {
  return Math.min(2, availableParallelism());
}

export const DEFAULT_BATCH = 2048;
/** Mismatching cases recorded with ctx.expect one by one; the rest are counted. */
const EXPECT_CAP = 200;
/** Mismatching cases re-run alone with KVM's walker traced. */
const RERUN_CAP = 20;

const WALK_EVENTS = [
  'kvmmmu/kvm_mmu_pagetable_walk',
  'kvmmmu/kvm_mmu_paging_element',
  'kvmmmu/kvm_mmu_set_accessed_bit',
  'kvmmmu/kvm_mmu_set_dirty_bit',
  'kvmmmu/kvm_mmu_walker_error',
];

/** The model's configuration for one control state. */
export function matrixConfig(cpu: CpuFeatures, levels: 4 | 5, f: number, walker: GuestWalker = 'kvm'): PagingConfig {
  const mode = {
    levels,
    cr0Wp: (f & CASE.WP) !== 0,
    cr4Smep: (f & CASE.SMEP) !== 0,
    cr4Smap: (f & CASE.SMAP) !== 0,
    cr4Pke: (f & CASE.PKE) !== 0,
    efer: { nxe: (f & CASE.NXE) !== 0 },
    pkru: f & CASE.PKE ? pkruFor(f) : 0,
  };
  return pagingConfigOf(cpu, mode, { walker });
}

/** [from, to) ranges of sorted cases: one control state each, at most `size` long. */
export function* batchRanges(cases: Uint32Array, size: number): Generator<[number, number]> {
  let from = 0;
  while (from < cases.length) {
    const state = controlState(cases[from]!);
    let to = from + 1;
    while (to < cases.length && to - from < size && controlState(cases[to]!) === state) to++;
    yield [from, to];
    from = to;
  }
}

export function accessMatrix(opts: AccessMatrixOptions = {}): Check {
  if (opts.mode !== undefined && opts.mode !== '4level' && opts.mode !== '5level')
    throw new RangeError(`mode must be 4level or 5level, got ${String(opts.mode)}`);
  if (opts.sample !== undefined && (!Number.isInteger(opts.sample) || opts.sample < 0))
    throw new RangeError(`sample must be a non-negative integer, got ${opts.sample}`);
  const what = opts.sample === undefined ? 'every legal case' : `${opts.sample} sampled cases (seed ${opts.seed ?? 1})`;
  return {
    name: 'access-matrix',
    arch: 'x86_64',
    description: `PTE/PDE bits x access x CPL x control bits (the access.c class, ${opts.mode ?? '4level'}): ${what}, each checked against the walk model (fault, error code, CR2, value, A/D)`,
    needs: ['exits', 'ad_bits'],
    run: (ctx) => runMatrix(ctx, opts),
  };
}

interface Mismatch {
  /** Position in the case list. */
  index: number;
  f: number;
  expected: object;
  observed: object;
}

async function runMatrix(ctx: CheckContext, opts: AccessMatrixOptions): Promise<void> {
  const cpu = ctx.profile.cpu;
  if (!cpu) throw new NotApplicable('the access matrix runs x86 guests only');
  const levels = opts.mode === '5level' ? 5 : 4;
  if (levels === 5 && !cpu.la57)
    throw new NotApplicable("5-level paging needs LA57, which this vCPU's CPUID does not offer");
  const batchSize = opts.batchSize ?? DEFAULT_BATCH;
  const space = caseSpace(cpu);
  ctx.note(`not enumerated on this vCPU: ${space.skipped.length ? space.skipped.join('; ') : 'nothing'}`);
  const drawn =
    opts.sample === undefined
      ? Uint32Array.from(enumerateCases(space))
      : sampleCases(space, opts.sample, opts.seed ?? 1);
  const cases = opts.wrongCases ? opts.wrongCases(drawn) : drawn;
  ctx.note(`${cases.length} of ${countCases(space)} legal cases (${levels}-level paging)`);

  const walker = guestWalkerOf(ctx.profile);
  if (walker !== 'kvm')
    ctx.note(
      `the guest's walks are ${walker === 'qemu-tcg' ? "QEMU TCG's (README, Findings: its deviations are modelled)" : "the processor's"}; A bits a faulting walk may set are accepted either way`,
    );
  const models = new Map<number, CompiledWalk>();
  const modelFor = (f: number): CompiledWalk => {
    const s = controlState(f);
    let w = models.get(s);
    if (!w) models.set(s, (w = compileWalk(matrixConfig(cpu, levels, f, walker), opts.wrong?.walk)));
    return w;
  };

  const byOutcome: Record<string, number> = {};
  let mismatches: Mismatch[] = [];
  let mismatchCount = 0;
  let checked = 0;
  const coverage = new Coverage(space);
  const verify = (m: MatrixMachine, b: Batch, first: number) => {
    for (let i = 0; i < b.flags.length; i++) {
      const f = b.flags[i]!;
      const e = b.expected[i]!;
      const seen = observe(m, b, i);
      const o = opts.wrongObservation ? opts.wrongObservation(f, seen, b.at[i]!) : seen;
      checked++;
      coverage.add(f, e.ec);
      if (agrees(f, b.at[i]!, e, o)) {
        const k = outcomeKey(e);
        byOutcome[k] = (byOutcome[k] ?? 0) + 1;
        continue;
      }
      byOutcome.mismatch = (byOutcome.mismatch ?? 0) + 1;
      mismatchCount++;
      mismatches.push({ index: first + i, f, ...comparable(f, b.at[i]!, e, o) });
      // Keep the first EXPECT_CAP in case order, whichever lane found them.
      if (mismatches.length >= 2 * EXPECT_CAP)
        mismatches = mismatches.sort((x, y) => x.index - y.index).slice(0, EXPECT_CAP);
    }
  };

  // Lanes: one guest each, on its own vCPU thread, taking the next batch when it
  // is ready for one. In a lane, while the guest runs batch k from one buffer,
  // the host checks the lane's previous batch and prepares its next one in the
  // other buffer.
  const ranges = [...batchRanges(cases, batchSize)];
  const lanes = Math.max(1, Math.min(opts.lanes ?? defaultLanes(), ranges.length));
  let next = 0;
  let exits = 0;
  let stopped: string | undefined;
  const take = (): number => (stopped === undefined && next < ranges.length ? next++ : -1);
  const lane = async (m: MatrixMachine): Promise<void> => {
    let prepared = 0;
    const prep = (k: number): Batch | undefined => {
      if (k < 0) return undefined;
      const [from, to] = ranges[k]!;
      return prepareBatch(m, modelFor(cases[from]!), prepared++ % 2, k, cases, from, to);
    };
    let ready = prep(take());
    let done: Batch | undefined;
    while (ready) {
      const cur = ready;
      m.arm(cur.buf, cur.flags.length, m.control(cur.flags[0]!));
      const running = m.guest.run();
      if (done) verify(m, done, ranges[done.seq]![0]);
      ctx.progress(checked, cases.length);
      ready = prep(take());
      const stop = await running;
      exits++;
      if (stop.kind !== 'done') {
        stopped ??= `batch ${cur.seq} (${caseName(cur.flags[0]!, space.offered)} ...): ${describeStop(stop)}`;
        return;
      }
      done = cur;
    }
    if (done) verify(m, done, ranges[done.seq]![0]);
    ctx.progress(checked, cases.length);
  };
  const machines: MatrixMachine[] = [];
  const t0 = performance.now();
  try {
    for (let i = 0; i < lanes; i++)
      machines.push(MatrixMachine.create(ctx.kvm, { levels, batchSize, smap: cpu.smap, pku: cpu.pku }));
    const results = await Promise.allSettled(
      machines.map((m) =>
        lane(m).catch((e: unknown) => {
          stopped ??= `a lane failed: ${(e as Error).message}`; // the other lanes take no more batches
          throw e;
        }),
      ),
    );
    for (const r of results) if (r.status === 'rejected') throw r.reason;
  } finally {
    for (const m of machines) m.close();
  }
  mismatches = mismatches.sort((x, y) => x.index - y.index).slice(0, EXPECT_CAP);
  const s = (performance.now() - t0) / 1000;
  ctx.note(
    `${checked} cases in ${ranges.length} batches, ${exits} guest entries on ${lanes} vCPU${lanes > 1 ? 's' : ''}, ${s.toFixed(2)} s (${Math.round(checked / s)} cases/s)`,
  );
  if (stopped) ctx.expect('every batch ran to its end', 'done', stopped);

  ctx.cases({ checked, byOutcome });
  for (const line of coverage.lines()) ctx.note(line);
  ctx.expect('coverage: classes this vCPU offers that no checked case fell in', [], coverage.missing());
  for (const x of mismatches) ctx.expect(caseName(x.f, space.offered), x.expected, x.observed);
  ctx.expect('mismatching cases', 0, mismatchCount);
  if (mismatchCount > mismatches.length)
    ctx.note(`${mismatchCount - mismatches.length} more mismatching cases are counted but not listed`);

  for (const x of mismatches.slice(0, RERUN_CAP)) {
    ctx.note(await rerunAlone(ctx, cpu, levels, space, x.f, opts.wrong?.walk));
  }
}

// ---------------------------------------------------------------------------------
// A mismatching case alone, with KVM's walker traced.

/** Runs one case in a fresh guest (a batch of one) with the walker tracepoints on. */
export async function runAlone(
  ctx: Pick<CheckContext, 'kvm'>,
  cpu: CpuFeatures,
  levels: 4 | 5,
  f: number,
  wrong?: ReadonlySet<WrongWalk>,
  walker: GuestWalker = 'kvm',
): Promise<Rerun> {
  const m = MatrixMachine.create(ctx.kvm, { levels, batchSize: 1, smap: cpu.smap, pku: cpu.pku });
  try {
    const b = prepareBatch(
      m,
      compileWalk(matrixConfig(cpu, levels, f, walker), wrong),
      0,
      0,
      Uint32Array.of(f),
      0,
      1,
      true,
    );
    m.arm(0, 1, m.control(f));
    let trace: TraceSession | undefined;
    let kvm: TraceEvent[][] | string = 'not traced';
    try {
      trace = TraceSession.open(ctx.kvm.target.fs, WALK_EVENTS, [await m.guest.vcpu.tid()]);
    } catch (e) {
      kvm = `tracefs unavailable: ${(e as Error).message}`;
    }
    try {
      const stop = await m.guest.run();
      if (stop.kind !== 'done') throw new Error(`the re-run stopped early: ${describeStop(stop)}`);
      if (trace) kvm = walksOf(trace.take(), b.at[0]!.gva);
    } finally {
      trace?.close();
    }
    const o = observe(m, b, 0);
    const e = b.expected[0]!;
    return {
      name: caseName(f),
      gva: b.at[0]!.gva,
      ...comparable(f, b.at[0]!, e, o),
      agrees: agrees(f, b.at[0]!, e, o),
      model: e.walks ?? [],
      kvm,
    };
  } finally {
    m.close();
  }
}

/** Splits trace events into walks (each starts at kvm_mmu_pagetable_walk) and keeps those of `gva`. */
export function walksOf(events: TraceEvent[], gva: number): TraceEvent[][] {
  const walks: TraceEvent[][] = [];
  let cur: TraceEvent[] | undefined;
  for (const e of events) {
    if (e.id === 'kvmmmu/kvm_mmu_pagetable_walk') {
      cur = e.fields.addr === BigInt(gva) ? [e] : undefined;
      if (cur) walks.push(cur);
    } else cur?.push(e);
  }
  return walks;
}

async function rerunAlone(
  ctx: CheckContext,
  cpu: CpuFeatures,
  levels: 4 | 5,
  space: CaseSpace,
  f: number,
  wrong?: ReadonlySet<WrongWalk>,
): Promise<string> {
  let r: Rerun;
  try {
    r = await runAlone(ctx, cpu, levels, f, wrong, guestWalkerOf(ctx.profile));
  } catch (e) {
    return `re-run of ${caseName(f, space.offered)} failed: ${(e as Error).message}`;
  }
  return formatRerun(r, caseName(f, space.offered));
}

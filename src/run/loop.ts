// Loop steps: one guest step that makes the same access `count` times, at
// gva, gva + stride, ... (steps.ts "count", "stride"). The model predicts
// every access in turn, as the guest makes them: each walk reads the guest's
// tables with the A/D bits the accesses before it set (an overlay over guest
// memory), each access faults in through the TDP model, and the loop ends at
// the first access the walk faults, which the guest's exception log then
// holds. After the run: the exception, the sum of the values read, every
// paging entry the loop's walks used, and the pages it dirtied.
//
// An access that would leave the guest (MMIO) or stop for missing host
// memory has no place in a loop: the model says which one and the step is an
// error, never a pass.
import type { X86Guest } from '../arch/x86/guest.js';
import { PTE_A } from '../arch/x86/pte.js';
import type { ModelVm } from '../model/vm.js';
import { accessedLatitude, accessException, type Access, type PagingConfig, type WalkResult } from '../model/walk.js';
import { predictAccess, type AccessStep, type PredictFrom } from './predict.js';
import type { CheckContext } from './types.js';
import { hex } from '../base/units.js';

export interface LoopEnv {
  ctx: CheckContext;
  g: X86Guest;
  vm: ModelVm;
  /** The model's walk (with the scenario's deliberate mistakes) reading entries through `read`. */
  walk(access: Access, read: (gpa: bigint) => bigint): WalkResult;
  from(name: string): PredictFrom;
  walker: PagingConfig['walker'];
}

export interface LoopPrediction {
  /** Accesses that complete before the first fault (all of them without one). */
  done: number;
  fault?: { vector: number; errorCode: bigint; cr2: bigint; walk: WalkResult };
  /** Sum of the values the reads load, mod 2^64. */
  sum: bigint;
  /** Every paging entry the walks read, as the model leaves it, by GPA. */
  entries: Map<bigint, { level: number; value: bigint }>;
  /** GPAs the loop's completed accesses touched, and the entries whose A/D bits they set. */
  touched: bigint[];
  adWritten: bigint[];
}

/**
 * A loop step that the engine cannot run as one step: one of its accesses
 * leaves the guest (an MMIO exit, a host fault), as the model predicts. The
 * scenario must make that access a step of its own.
 */
export class LoopLimit extends Error {}

/** The model's prediction of every access of a loop step, in order; the TDP model faults each one in. */
export function predictLoop(
  env: Pick<LoopEnv, 'walk' | 'from'> & { g: { mem: { read64(gpa: bigint): bigint } } },
  s: AccessStep,
  name: string,
): LoopPrediction {
  const loop = s.loop!;
  const overlay = new Map<bigint, bigint>();
  const read = (gpa: bigint) => overlay.get(gpa) ?? env.g.mem.read64(gpa);
  const from = env.from(name);
  const out: LoopPrediction = { done: 0, sum: 0n, entries: new Map(), touched: [], adWritten: [] };
  for (let k = 0; k < loop.count; k++) {
    const gva = s.gva + BigInt(k) * loop.stride;
    const w = env.walk({ gva, kind: s.access, cpl: s.cpl, eflagsAc: s.eflagsAc, size: s.size }, read);
    const p = predictAccess({ ...s, gva, loop: undefined }, w, from);
    for (const e of p.expectPtes) out.entries.set(e.at, { level: e.level, value: e.value });
    if (p.mmio || p.hostFault)
      throw new LoopLimit(
        `${name}: access ${k} of the loop (${hex(gva)}) ${p.mmio ? 'exits as MMIO' : 'finds no host memory'}, as the model says; a loop must stay in memory the host provides, so make that access a step of its own`,
      );
    if (!w.ok) {
      const e = accessException(w);
      if (e.vector !== 14)
        throw new Error(`${name}: access ${k} of the loop (${hex(gva)}) is non-canonical; make it a step of its own`);
      out.fault = { vector: e.vector, errorCode: BigInt(e.errorCode), cr2: w.cr2, walk: w };
      break;
    }
    for (const a of w.adWrites) {
      overlay.set(a.pteGpa, a.new);
      out.adWritten.push(a.pteGpa);
    }
    if (s.access === 'read') out.sum = BigInt.asUintN(64, out.sum + BigInt(p.expectValue as bigint));
    out.touched.push(w.gpa);
    out.done++;
  }
  return out;
}

/** A loop's observations against its prediction; then the model VM takes the pages it dirtied. */
export function compareLoop(env: LoopEnv, s: AccessStep, name: string, p: LoopPrediction, value: bigint): void {
  const { ctx, g, vm } = env;
  const exc = g.exceptions().map((e) => ({ vector: e.vector, errorCode: e.errorCode, cr2: e.cr2 }));
  const f = p.fault;
  ctx.expect(`${name}: exceptions`, f ? [{ vector: f.vector, errorCode: f.errorCode, cr2: f.cr2 }] : [], exc);
  ctx.note(
    `${name}: model: ${p.done} of ${s.loop!.count} accesses complete${f ? `, then a fault at ${hex(f.cr2)}` : ''}`,
  );
  if (s.access === 'read') ctx.expect(`${name}: sum of the values read`, p.sum, value);
  // A processor may set A on the entries a faulting walk used; KVM's walker never does.
  const mayA = new Set(f ? accessedLatitude(f.walk, env.walker) : []);
  const at = [...p.entries.keys()].sort((a, b) => (a < b ? -1 : 1));
  const seen = at.map((gpa) => ({ at: gpa, value: g.mem.read64(gpa) }));
  const expected = at.map((gpa, k) => {
    const want = p.entries.get(gpa)!.value;
    const got = seen[k]!.value;
    return { at: gpa, value: mayA.has(gpa) && got === (want | PTE_A) ? got : want };
  });
  ctx.expect(`${name}: paging entries after (${at.length})`, expected, seen);
  for (const gpa of p.adWritten) vm.markDirty(gpa);
  if (s.access === 'write') for (const gpa of p.touched) vm.markDirty(gpa);
}

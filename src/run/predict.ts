// The model's prediction of one guest access, before it runs: from the
// guest walk (model/walk.ts) over the tables as they are in memory right
// then, and the model VM (model/vm.ts), which says which slot backs the GPA
// and whether its host memory is there (the access faults in through the
// TDP model). A function of model data: the guest's memory reaches it only
// through `peek`.
import { describePte, PTE_A, PTE_D } from '../arch/x86/pte.js';
import { accessException, decodeErrorCode, PFERR, type PagingConfig, type WalkResult } from '../model/walk.js';
import type { ModelVm } from '../model/vm.js';
import type { TracedWalk } from '../observe/walker-trace.js';
import type { HostProfile } from '../probe/probe.js';
import type { GuestStep } from '../scenario/types.js';
import { hostFaultPath, type HostFaultPrediction } from './host-policy.js';
import { hex } from '../base/units.js';

export type AccessStep = Extract<GuestStep, { kind: 'access' }>;

/** What the engine returns for MMIO reads (truncated to the access size). */
export const MMIO_FILL = 0x5a5a5a5a5a5a5a5an;

export interface Prediction {
  walk: WalkResult;
  /** false: no exception; a number: #PF with this error code; 'gp': #GP(0) with CR2 unchanged. */
  expectFault: false | number | 'gp';
  expectValue?: bigint | string;
  /** The MMIO exit the access should cause, if any. */
  mmio?: { gpa: bigint; len: number; isWrite: boolean; data?: Uint8Array };
  /** The access needs host memory that is not there: KVM_RUN stops as this says, and the access is redone on the next run. */
  hostFault?: HostFaultPrediction;
  expectPtes: { level: number; at: bigint; value: bigint }[];
}

/** What a prediction reads besides the walk. */
export interface PredictFrom {
  vm: ModelVm;
  profile: HostProfile;
  walker: PagingConfig['walker'];
  /** Guest memory as the host process sees it, or why the host has none there. */
  peek(gpa: bigint, size: number): bigint | string;
  /** The GPA of the entry at `level` for `gva` (the scenario's tables). */
  entry(gva: bigint, level: number): bigint;
  note(message: string): void;
}

function leBytes(v: bigint, n: number): Uint8Array {
  return Uint8Array.from({ length: n }, (_, i) => Number((v >> BigInt(8 * i)) & 0xffn));
}

/**
 * A scenario's explicit #PF error code as the host's walker reports it: QEMU
 * TCG reports reserved-bit faults without P (README, Findings); the model does
 * the same for its own predictions (GuestWalker 'qemu-tcg').
 */
function walkerErrorCode(
  fault: number | false,
  walker: PagingConfig['walker'],
  note: (m: string) => void,
): number | false {
  if (fault === false || walker !== 'qemu-tcg' || (fault & PFERR.RSVD) === 0 || (fault & PFERR.P) === 0) return fault;
  note(
    `expected error code ${hex(fault)} taken as ${hex(fault & ~PFERR.P)}: QEMU TCG reports reserved-bit faults without P`,
  );
  return fault & ~PFERR.P;
}

/** The model's prediction of access `s`, whose guest walk is `w`; the scenario's explicit expectations win. */
export function predictAccess(s: AccessStep, w: WalkResult, from: PredictFrom): Prediction {
  // A walk that ends at a GPA no slot backs (or a write to a read-only
  // slot) leaves the guest as an MMIO exit; the engine answers reads
  // with MMIO_FILL.
  const slot = w.ok ? from.vm.slotAt(w.gpa, s.size) : undefined;
  // A walk that ends in a slot whose host memory is gone or protected
  // against the access fails in the host; what the guest sees then
  // depends on the host's path (hostFaultPath).
  const fault = w.ok && slot ? from.vm.fault(w.gpa, s.access) : undefined;
  const hostFault =
    w.ok && fault?.kind === 'efault'
      ? hostFaultPath(from.profile, s.access, s.cpl, w.gpa, s.size, slot!.backing.kind === 'guest_memfd')
      : undefined;
  const mmio =
    w.ok &&
    s.access !== 'exec' &&
    (!slot || (slot.flags.readonly && s.access === 'write') || hostFault?.path === 'mmio')
      ? {
          gpa: w.gpa,
          len: s.size,
          isWrite: s.access === 'write',
          ...(s.access === 'write' ? { data: leBytes(s.value, s.size) } : {}),
        }
      : undefined;
  const modelValue =
    s.access !== 'read' || !w.ok
      ? undefined
      : mmio
        ? BigInt.asUintN(s.size * 8, MMIO_FILL)
        : hostFault
          ? undefined
          : from.peek(w.gpa, s.size);
  const after = new Map(w.levels.map((l) => [l.pteGpa, l.pte]));
  for (const a of w.adWrites) after.set(a.pteGpa, a.new);
  return {
    walk: w,
    expectFault:
      s.expect?.fault !== undefined
        ? walkerErrorCode(s.expect.fault, from.walker, from.note)
        : w.ok
          ? false
          : accessException(w).vector === 13
            ? 'gp'
            : w.errorCode,
    expectValue: s.expect?.value ?? (w.ok ? modelValue : 0n),
    mmio,
    ...(hostFault && hostFault.path !== 'mmio' ? { hostFault } : {}),
    expectPtes: s.expect?.ptes
      ? s.expect.ptes.map((p) => ({ level: p.level, at: from.entry(s.gva, p.level), value: p.value }))
      : w.levels.map((l) => ({ level: l.level, at: l.pteGpa, value: after.get(l.pteGpa)! })),
  };
}

/** The model's walk in the shape KVM's tracepoints report it. */
export function modelAsTrace(w: WalkResult): Omit<TracedWalk, 'addr' | 'pferr'> {
  const accessed: bigint[] = [];
  const dirty: bigint[] = [];
  for (const a of w.adWrites) {
    if (a.new & PTE_A && !(a.old & PTE_A)) accessed.push(a.pteGpa);
    if (a.new & PTE_D && !(a.old & PTE_D)) dirty.push(a.pteGpa);
  }
  return {
    elements: w.levels.map((l) => ({ level: l.level, pte: l.pte })),
    ...(w.ok ? {} : { error: w.errorCode }),
    accessed,
    dirty,
  };
}

/** The walk, level by level, for the notes. */
export function describeWalk(w: WalkResult): string {
  const lv = w.levels
    .map((l) => `L${l.level} ${hex(l.pteGpa)}=${hex(l.pte)} [${describePte(l.pte, l.level)}]`)
    .join('; ');
  if (w.ok) return `${lv} -> gpa ${hex(w.gpa)}`;
  if (accessException(w).vector === 13) return '#GP(0): not canonical, no walk';
  return `${lv} -> #PF ${decodeErrorCode(w.errorCode)} (${w.reason})`;
}

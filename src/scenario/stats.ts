// Expected deltas of KVM's binary stats around one scenario step.
//
// A step's "stats" object maps a stat name to what its change over the step
// must be: after - before, read from the VM's and the vCPU's stats fds just
// before the step and once the vCPU has reached the step's sync. Gauges
// (pages_4k, mmu_unsync) are compared the same way: the change of the gauge.
//
//   3 or "3" or "+3"   exactly +3          -2 or "-2"   exactly -2
//   ">=1"              at least +1         "<=0"        at most 0
//   "model"            the delta the TDP model predicts (pages_2m, pages_1g)
//
// Whether an expectation can be checked depends on the host, by the stat's
// class (statClass): the page-fault and page-count stats describe guest
// accesses only where the probe offers the stats_faults oracle; the shadow
// MMU's stats only where there is a shadow MMU (no TDP); the rest wherever the
// stats fd has the stat. Elsewhere the expectation is reported "not
// applicable here".
import type { HostProfile } from '../probe/probe.js';

export interface StatExpect {
  /** 'model': the delta the model predicts (MODEL_STATS only); `delta` is then unused. */
  op: '=' | '>=' | '<=' | 'model';
  delta: bigint;
}

/** Stats whose delta the TDP model predicts ("model"): its count of 2 MiB and 1 GiB leaf mappings. */
export const MODEL_STATS: readonly string[] = ['pages_2m', 'pages_1g'];

/** Scalar stats of x86 KVM's VM and vCPU stats fds (Linux 6.x), by class. */
export const STAT_CLASSES = {
  /** Counted per KVM page fault: meaningful where the probe's stats_faults oracle says so. */
  fault: [
    'pf_taken',
    'pf_fixed',
    'pf_emulate',
    'pf_spurious',
    'pf_fast',
    'pf_mmio_spte_created',
    'pages_4k',
    'pages_2m',
    'pages_1g',
    'nx_lpage_splits',
  ],
  /** The shadow MMU's own counters (and #PFs it injects): meaningful without TDP. */
  shadow: [
    'mmu_shadow_zapped',
    'mmu_pte_write',
    'mmu_pde_zapped',
    'mmu_flooded',
    'mmu_recycled',
    'mmu_cache_miss',
    'mmu_unsync',
    'pf_guest',
    'invlpg',
    'max_mmu_rmap_size',
    'max_mmu_page_hash_collisions',
  ],
  /** Exits, flushes and the rest: wherever the stats fd has them. */
  general: [
    'remote_tlb_flush',
    'remote_tlb_flush_requests',
    'tlb_flush',
    'exits',
    'io_exits',
    'mmio_exits',
    'signal_exits',
    'irq_window_exits',
    'nmi_window_exits',
    'halt_exits',
    'request_irq_exits',
    'irq_exits',
    'host_state_reload',
    'fpu_reload',
    'insn_emulation',
    'insn_emulation_fail',
    'hypercalls',
    'irq_injections',
    'nmi_injections',
    'req_event',
    'l1d_flush',
    'notify_window_exits',
    'halt_successful_poll',
    'halt_attempted_poll',
    'halt_poll_invalid',
    'halt_wakeup',
    'blocking',
  ],
} as const;
export type StatClass = keyof typeof STAT_CLASSES;

export const STAT_NAMES: readonly string[] = Object.values(STAT_CLASSES).flat();

export function statClass(name: string): StatClass | undefined {
  for (const [c, names] of Object.entries(STAT_CLASSES))
    if ((names as readonly string[]).includes(name)) return c as StatClass;
  return undefined;
}

export const STAT_VALUE_RE = /^(>=|<=|\+|-)?(0|[1-9][0-9]{0,17})$/;
/** The JSON Schema pattern of a stat expectation string: a delta as above, or "model". */
export const STAT_STRING_RE = /^((>=|<=|\+|-)?(0|[1-9][0-9]{0,17})|model)$/;

/** Parses one expectation (a JSON integer or a string of the syntax above); a string result is the error. */
export function parseStatExpect(v: unknown): StatExpect | string {
  if (typeof v === 'number') {
    if (!Number.isSafeInteger(v))
      return `expected an integer delta or a string like ">=1", "+3" or "-2", got ${JSON.stringify(v)}`;
    return { op: '=', delta: BigInt(v) };
  }
  if (v === 'model') return { op: 'model', delta: 0n };
  if (typeof v === 'string') {
    const m = STAT_VALUE_RE.exec(v);
    if (m) {
      const n = BigInt(m[2]!);
      if (m[1] === '>=' || m[1] === '<=') return { op: m[1], delta: n };
      return { op: '=', delta: m[1] === '-' ? -n : n };
    }
  }
  return `expected an integer delta or a string like ">=1", "+3", "-2" or "<=0", got ${JSON.stringify(v)}`;
}

/** A delta as the syntax writes it: "+3", "-2", "0". */
export function showDelta(d: bigint): string {
  return d > 0n ? `+${d}` : `${d}`;
}

export function showStatExpect(e: StatExpect): string {
  return e.op === 'model' ? 'model' : e.op === '=' ? showDelta(e.delta) : `${e.op}${e.delta}`;
}

/** Whether `delta` meets `e` (a "model" expectation is resolved to an exact delta first). */
export function statHolds(e: StatExpect, delta: bigint): boolean {
  if (e.op === 'model') throw new Error('a "model" stat expectation is compared with the model\'s delta');
  return e.op === '=' ? delta === e.delta : e.op === '>=' ? delta >= e.delta : delta <= e.delta;
}

/** Why a stat cannot be checked on this host, or undefined when it can. */
export function statNotApplicable(name: string, profile: HostProfile, present: boolean): string | undefined {
  if (!profile.capabilities.KVM_CAP_BINARY_STATS_FD) return 'this KVM has no binary stats fd';
  if (!present) return `this KVM's stats fds have no stat ${name}`;
  switch (statClass(name)) {
    case 'fault':
      return profile.oracles.stats_faults.available ? undefined : `stats_faults: ${profile.oracles.stats_faults.why}`;
    case 'shadow':
      return profile.tdp.enabled
        ? `${name} counts shadow-MMU work; this host uses TDP (${profile.tdp.kind})`
        : undefined;
    default:
      return undefined;
  }
}

// Guest stops as the x86 and arm64 checks both compare them: an MMIO exit as
// a plain record, and a runaway guest kicked out of KVM_RUN at its time limit.
import type { Exit } from '../kvm/exits.js';
import type { CheckContext } from '../run/types.js';

/** A stop of either architecture's guest, as far as these helpers look at it. */
type Stop = { kind: string; exit?: Exit };

/** An MMIO exit as a plain record (a write's data cut to its length), or `other(s)` for any other stop. */
export function mmioOf<S extends Stop>(s: S, other: (s: S) => string): unknown {
  const e = s.kind === 'exit' ? s.exit : undefined;
  if (e?.reason !== 'mmio') return other(s);
  return e.isWrite
    ? { ...e, data: e.data.subarray(0, e.len) }
    : { reason: 'mmio', gpa: e.gpa, len: e.len, isWrite: false };
}

/** The time limit of a runaway guest's run. */
const LIMIT_MS = 150;

/**
 * Runs a guest that spins forever with a time limit, and records that it
 * stopped by the limit and when. Node timers may fire up to a millisecond
 * early; a loaded 2-core machine may deliver the kick late, and the lab adds
 * the agent's round trip, but not seconds.
 */
export async function expectKickAtLimit(
  ctx: CheckContext,
  run: (o: { timeoutMs: number }) => Promise<{ kind: string }>,
): Promise<void> {
  const t0 = performance.now();
  const s = await run({ timeoutMs: LIMIT_MS });
  const ms = performance.now() - t0;
  ctx.expect('stop', 'timeout', s.kind);
  ctx.expect('kicked at the limit (within -10 ms / +2 s)', true, ms >= LIMIT_MS - 10 && ms < LIMIT_MS + 2000);
}

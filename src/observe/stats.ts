// KVM's binary stats around a step: a snapshot of every scalar stat of the
// VM and the vCPU (KVM_GET_STATS_FD readers), by name; histograms are left
// out. The engine compares the change between two snapshots with a step's
// expectations.

/** A stats file descriptor's reader (src/kvm/stats.ts StatsReader). */
export interface StatsSource {
  read(): Iterable<[string, bigint | bigint[]]>;
}

/** Every scalar stat of the sources, by name. */
export function readStats(sources: readonly StatsSource[]): Map<string, bigint> {
  const out = new Map<string, bigint>();
  for (const r of sources) for (const [k, v] of r.read()) if (typeof v === 'bigint') out.set(k, v);
  return out;
}

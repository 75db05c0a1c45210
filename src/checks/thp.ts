// Transparent huge pages as the TDP and stage-2 checks need them: offered by
// the host, and confirmed (in smaps) behind the block a check faulted in.
import { NotApplicable } from '../base/not-applicable.js';
import type { Memslot } from '../kvm/memslot.js';
import type { HostProfile } from '../probe/probe.js';

type Thp = NonNullable<HostProfile['thp']>;

/** The host's THP settings; not applicable where THP is absent or disabled. */
export function needThp(profile: HostProfile): Thp {
  const thp = profile.thp;
  if (!thp || thp.enabled === 'never')
    throw new NotApplicable(
      `transparent huge pages are ${thp ? 'disabled (enabled: never)' : 'absent (no /sys/kernel/mm/transparent_hugepage)'}`,
    );
  return thp;
}

/** Not applicable unless a transparent huge page backs the slot's block after the host wrote it. */
export function confirmThp(s: Memslot, thp: Thp, bytes: number): void {
  const huge = s.hugeBytes();
  if (huge === undefined)
    throw new NotApplicable(
      'smaps of the process holding the memory cannot be read, so a transparent huge page cannot be confirmed',
    );
  if (huge < bytes)
    throw new NotApplicable(
      `no transparent huge page backs the block after the host wrote it (AnonHugePages ${huge / 1024} kB; THP ${thp.enabled}, defrag ${thp.defrag})`,
    );
}

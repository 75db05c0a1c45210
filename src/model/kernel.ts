// What the models assume of KVM for a given Linux release: the behaviours
// that changed between the kernels the lab boots (6.1, 6.12, 7.2) and that
// the built-in checks can see. Pure data and a version comparison; the probe
// reports them, the checks hand them to the models.

/** A KVM behaviour that depends on the kernel release. */
export interface KernelBehaviour {
  /** The model option it sets. */
  key: 'splitOnFault' | 'recoverHugeInPlace' | 'protectedStage2Level0';
  /** The first release with the behaviour ("6.13"). */
  since: string;
  /** What the kernel does from that release on, and before it. */
  from: string;
  before: string;
}

/** The behaviours, from the kernels' MMU changelogs (merge commits "KVM x86 MMU changes for N"). */
export const KERNEL_BEHAVIOURS: readonly KernelBehaviour[] = [
  {
    key: 'splitOnFault',
    since: '6.2',
    from: 'a TDP MMU fault below a present huge leaf splits the leaf into 512 smaller ones (tdp_mmu_split_huge_page)',
    before: 'a TDP MMU fault below a present huge leaf zaps it and links an empty table',
  },
  {
    key: 'recoverHugeInPlace',
    since: '6.13',
    from: 'dirty logging off replaces collapsible TDP MMU tables with a huge leaf in place (kvm_tdp_mmu_recover_huge_pages)',
    before: 'dirty logging off zaps collapsible TDP MMU tables; the next fault maps huge (zap_collapsible_spte_range)',
  },
  {
    // Measured in the lab: 6.1 faults at level 1, 6.12 and 7.2 at level 0;
    // the first release between them with the change is not pinned down.
    key: 'protectedStage2Level0',
    since: '6.12',
    from: "arm64 protected mode: a guest's stage-2 is walked from level 0 (the hypervisor's 48-bit geometry)",
    before: "arm64 protected mode: a guest's stage-2 is walked from level 1 (40-bit IPA), as in the other modes",
  },
];

/** "6.12.118+deb13-amd64" → [6, 12]; undefined when the release does not start with a version. */
export function kernelVersion(release: string | undefined): [number, number] | undefined {
  const m = release ? /^(\d+)\.(\d+)/.exec(release) : null;
  return m ? [Number(m[1]), Number(m[2])] : undefined;
}

/** Whether `version` is at least `since` ("6.13"); an unknown version counts as the newest. */
export function atLeast(version: readonly [number, number] | undefined, since: string): boolean {
  if (!version) return true;
  const [maj, min] = since.split('.').map(Number) as [number, number];
  return version[0] > maj || (version[0] === maj && version[1] >= min);
}

/** The behaviours' settings for a release, each with the sentence that says why. */
export function kernelBehaviours(
  release: string | undefined,
): Record<KernelBehaviour['key'], { on: boolean; why: string }> {
  const v = kernelVersion(release);
  const out = {} as Record<KernelBehaviour['key'], { on: boolean; why: string }>;
  for (const b of KERNEL_BEHAVIOURS) {
    const on = atLeast(v, b.since);
    const when = v ? `${v.join('.')} ${on ? '>=' : '<'} ${b.since}` : `release unknown, assumed >= ${b.since}`;
    out[b.key] = { on, why: `${on ? b.from : b.before} (${when})` };
  }
  return out;
}

// Deliberately wrong models: one vocabulary for every model the checks
// predict with. A test runs a check against a model with one known mistake
// and sees the check fail, which proves that the oracle can notice it.
//
// - `Wrong`: what a check (or a scenario) is run with; one part per model.
// - `WrongWalk`: a rule the guest walk model (walk.ts) breaks.
// - `WrongTdp`: a mistake of the TDP model (tdp.ts) or of its legacy-MMU
//   variant (legacy.ts).
// - `WrongRace`: a mistake of the race model (run/race.ts).
// - `WrongShadow`: a mistake of the shadow MMU model (shadow.ts).
// - `WrongVm`: a mistake of the model VM's dirty log (vm.ts).
//
// Each model takes only its own part (walk.ts a set of WrongWalk, Tdp a
// WrongTdp); a check or the scenario engine takes the whole `Wrong` and hands
// each part on. The field that carries a mistake is called `wrong` everywhere.
// A wrong *expectation*, set on one comparison by the runner without any
// model, is run/types.ts's WrongExpectation.

/** A rule the guest walk model breaks. */
export type WrongWalk = 'ignore-wp' | 'no-accessed-on-upper' | 'dirty-on-read' | 'ignore-nx' | 'rsvd-as-not-present';

export const WRONG_WALKS: readonly WrongWalk[] = [
  'ignore-wp',
  'no-accessed-on-upper',
  'dirty-on-read',
  'ignore-nx',
  'rsvd-as-not-present',
];

/** Mistakes of the TDP model. */
export interface WrongTdp {
  /** Fault-in maps one level below the allowed one (a 2 MiB mapping becomes 4 KiB). */
  levelOffByOne?: boolean;
  /** A zap leaves out the last page of its range. */
  zapOneShort?: boolean;
  /** x86: dirty logging off leaves the 4 KiB mappings in place (no zap of collapsible tables). */
  noCollapse?: boolean;
  /** Legacy MMU: a 4 KiB fault maps only the faulting page (no direct_pte_prefetch of its neighbours). */
  noPrefetch?: boolean;
  /** Legacy MMU: dirty logging on splits huge leaves to 4 KiB, as the TDP MMU's eager split does. */
  legacyEagerSplit?: boolean;
  /**
   * Legacy MMU: dirty logging off zaps each collapsible table with its whole
   * 2 MiB (512 entries), as the TDP MMU does, instead of only its present
   * leaves.
   */
  legacyZapTables?: boolean;
  /** A zap or write protection of present SPTEs requests no remote TLB flush. */
  noFlush?: boolean;
}

/** Mistakes of the race model. */
export interface WrongRace {
  /** One page is left out of the first logged target's expected dirty pages. */
  dropDirtyBit?: boolean;
}

/**
 * Mistakes of the shadow MMU model: an unsync page is never synced (neither
 * by the unsync walk nor by INVLPG); the unsync walk skips the last marked
 * child of each parent; writes never flood (no upper-level page is zapped for
 * repeated writes).
 */
export type WrongShadow = 'never-sync' | 'sync-misses-last-child' | 'no-flooding';

export const WRONG_SHADOWS: readonly WrongShadow[] = ['never-sync', 'sync-misses-last-child', 'no-flooding'];

/** Mistakes of the model VM's dirty log. */
export interface WrongVm {
  /** KVM_GET_DIRTY_LOG takes the reported pages back even with manual protect on (KVM leaves them until a clear). */
  getForgetsManual?: boolean;
}

/** A wrong model for a check: each part makes one model wrong. */
export interface Wrong {
  walk?: ReadonlySet<WrongWalk>;
  tdp?: WrongTdp;
  race?: WrongRace;
  shadow?: WrongShadow;
  vm?: WrongVm;
}

/**
 * The environment variable through which tests run the CLI (`run`, `fuzz`)
 * with a deliberately wrong model: comma-separated parts, `walk=<WrongWalk>`,
 * `tdp=<levelOffByOne|zapOneShort|noCollapse>`, `race=dropDirtyBit`,
 * `shadow=<WrongShadow>`. Not documented for users: it makes the models wrong.
 */
export const WRONG_ENV = 'KVMHARNESS_WRONG_MODEL';

const TDP_WRONGS = ['levelOffByOne', 'zapOneShort', 'noCollapse'] as const;

/** The wrong model a WRONG_ENV value names; an Error naming the bad part otherwise. */
export function parseWrong(spec: string): Wrong {
  const walk = new Set<WrongWalk>();
  const w: Wrong = {};
  for (const part of spec.split(',').filter((p) => p.trim())) {
    const [model, what] = part.trim().split('=') as [string, string | undefined];
    if (model === 'walk' && WRONG_WALKS.includes(what as WrongWalk)) walk.add(what as WrongWalk);
    else if (model === 'tdp' && TDP_WRONGS.includes(what as (typeof TDP_WRONGS)[number]))
      w.tdp = { ...w.tdp, [what!]: true };
    else if (model === 'race' && what === 'dropDirtyBit') w.race = { dropDirtyBit: true };
    else if (model === 'shadow' && WRONG_SHADOWS.includes(what as WrongShadow)) w.shadow = what as WrongShadow;
    else throw new Error(`${WRONG_ENV}: unknown wrong model '${part.trim()}'`);
  }
  if (walk.size) w.walk = walk;
  return w;
}

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

/** A wrong model for a check: each part makes one model wrong. */
export interface Wrong {
  walk?: ReadonlySet<WrongWalk>;
  tdp?: WrongTdp;
  race?: WrongRace;
  shadow?: WrongShadow;
}

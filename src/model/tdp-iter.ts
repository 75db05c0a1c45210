// The tree of SPTE tables and the walk over it (the model's tdp_iter.{h,c}).
//
// - `Table`: one page of SPTEs. One root per address space (as_id).
// - `TdpIter`: a pre-order walk over [start, end) with the state of the
//   kernel's struct tdp_iter in plain view (level, gfn, table, index, old).
//   Used in for…of; stepping is down / side / up; the caller can retry an
//   entry, stop early (clean-up runs in return()), and yield at yield points.
//
// Levels are counted as in spte.ts (1 = 4 KiB leaf).

import { PAGES, SPTE_LEAF, SPTE_P, isTable, roundDown, type Spte } from './spte.js';

// ---------------------------------------------------------------------------
// The tree

/** One page of SPTEs. `child[i]` is the table `spte[i]` points to, kept in step by Tdp.trySet(). */
export class Table {
  readonly spte: Float64Array;
  readonly child: (Table | null)[] | null;
  /** Created by a fault whose huge page the NX-huge-page rule refused (x86). */
  nxDisallowed = false;
  /** Torn down after removal: nothing may use it any more. */
  freed = false;

  constructor(
    readonly id: number,
    readonly level: number,
    /** First GFN the table maps. */
    readonly gfn: number,
    readonly size = 512,
  ) {
    this.spte = new Float64Array(size);
    this.child = level > 1 ? new Array<Table | null>(size).fill(null) : null;
  }
}

// ---------------------------------------------------------------------------
// The iterator

/** A GFN range [start, end) whose TLB entries must be flushed. */
export interface Flush {
  start: number;
  end: number;
}

/** A table unlinked from the tree, with every present SPTE of its subtree, awaiting teardown. */
export interface Removed {
  asId: number;
  /** First GFN and level of the removed table itself. */
  gfn: number;
  level: number;
  table: Table;
  sptes: { gfn: number; level: number; spte: Spte }[];
}

export type Only = 'all' | 'present' | 'presentLeaf';

/** The flag bits an entry must have to be handed out, per filter. */
const WANT: Readonly<Record<Only, number>> = { all: 0, present: SPTE_P, presentLeaf: SPTE_P | SPTE_LEAF };

export interface IterOptions {
  asId?: number;
  /** Lowest level the walk descends to (for_each_tdp_pte_min_level). */
  minLevel?: number;
  /** 'present' and 'presentLeaf' skip other entries (for_each_tdp_present(_leaf)_pte). */
  only?: Only;
  /** Raise `yieldPoint` on every N-th entry handed out (0: never). */
  yieldEvery?: number;
  /** Receives the pending TLB flush ranges when they are flushed. */
  onFlush?: (ranges: Flush[]) => void;
  /** Runs once, when the walk ends or is abandoned. */
  onRelease?: () => void;
}

const DONE: IteratorReturnResult<undefined> = { done: true, value: undefined };

/**
 * A pre-order walk over the entries mapping [start, end), as struct tdp_iter.
 *
 * Between two next() calls the fields describe the current entry: `level`,
 * `gfn` (first GFN it maps), `table` and `index` (the sptep), `old` (the SPTE
 * value read). next() tries, in order: step down into the table `old` points
 * to (re-reading the entry first), step sideways, step up and sideways; the
 * walk ends when it runs off the root or past `end`.
 *
 * The walk holds something until it ends (the model of rcu_read_lock and of
 * the pending TLB flush): release happens exactly once, from next() at the
 * end or from return() when a for…of stops early (break, return, throw). It
 * flushes what is pending and calls onRelease.
 */
export class TdpIter {
  readonly root: Table;
  readonly rootLevel: number;
  readonly minLevel: number;
  readonly start: number;
  readonly end: number;
  readonly asId: number;
  readonly only: Only;
  /** path[level]: the table the walk is in at each level. */
  readonly path: Table[] = [];
  level: number;
  gfn: number;
  table: Table;
  index: number;
  old: Spte;
  /** The GFN the walk is heading for; a restart after a yield walks down to it again. */
  nextLastLevelGfn: number;
  yieldedGfn: number;
  valid: boolean;
  /** Set by resched(): the next step restarts from the root. */
  yielded = false;
  /** True on every `yieldEvery`-th entry: the caller may call resched() here. */
  yieldPoint = false;
  /** Entries handed out so far, and yields taken. */
  visited = 0;
  yields = 0;
  /** TLB flush ranges accumulated and not yet flushed. */
  readonly flushes: Flush[] = [];
  /** Tables this walk unlinked (Tdp.trySet puts them here) and not yet torn down. */
  readonly removed: Removed[] = [];
  held = true;
  private fresh = true;
  /** Flag bits an entry must have to be handed out: none, P, or P and LEAF. */
  private readonly wantMask: number;
  private readonly yieldEvery: number;
  private readonly onFlush: ((ranges: Flush[]) => void) | undefined;
  private readonly onRelease: (() => void) | undefined;
  private readonly result: IteratorYieldResult<TdpIter> = { done: false, value: this };

  constructor(root: Table, start: number, end: number, opts: IterOptions = {}) {
    this.root = root;
    this.rootLevel = root.level;
    this.minLevel = opts.minLevel ?? 1;
    this.start = start;
    this.end = Math.min(end, root.gfn + root.size * PAGES[root.level]);
    this.asId = opts.asId ?? 0;
    this.only = opts.only ?? 'all';
    this.wantMask = WANT[this.only];
    this.yieldEvery = opts.yieldEvery ?? 0;
    this.onFlush = opts.onFlush;
    this.onRelease = opts.onRelease;
    // tdp_iter_start + tdp_iter_restart
    this.nextLastLevelGfn = Math.max(start, root.gfn);
    this.yieldedGfn = this.nextLastLevelGfn;
    this.level = this.rootLevel;
    this.table = root;
    this.path[this.level] = root;
    this.gfn = roundDown(this.nextLastLevelGfn, this.level);
    this.index = (this.gfn - root.gfn) / PAGES[this.level];
    this.old = 0;
    this.valid = start < this.end;
  }

  [Symbol.iterator](): TdpIter {
    return this;
  }

  next(): IteratorResult<TdpIter, undefined> {
    if (!this.held) return DONE;
    for (;;) {
      if (this.fresh) {
        this.fresh = false;
        if (this.valid) this.old = this.table.spte[this.index];
      } else {
        this.step();
      }
      if (!this.valid || this.gfn >= this.end) {
        this.release();
        return DONE;
      }
      if ((this.old & this.wantMask) === this.wantMask) {
        this.visited++;
        this.yieldPoint = this.yieldEvery > 0 && this.visited % this.yieldEvery === 0;
        return this.result;
      }
    }
  }

  /** Stop early: runs the clean-up (once), whatever the caller's reason. */
  return(): IteratorResult<TdpIter, undefined> {
    this.release();
    return DONE;
  }

  /** Hand out the current entry again on the next next(), re-read (after a failed trySet). */
  retry(): void {
    this.fresh = true;
  }

  /**
   * cond_resched() at a yield point: flush what is pending, let go, and
   * restart from the root at nextLastLevelGfn on the next step. Refuses
   * (returns false) when the walk has not moved on since it last yielded, so
   * that it always makes progress. The caller `continue`s after a true.
   */
  resched(): boolean {
    if (this.nextLastLevelGfn === this.yieldedGfn) return false;
    this.flushNow();
    this.yields++;
    this.yielded = true;
    return true;
  }

  /** Add the span of an entry at (gfn, level) to the pending TLB flush. */
  flush(gfn: number, level: number): void {
    const end = gfn + PAGES[level];
    const last = this.flushes[this.flushes.length - 1];
    if (last && gfn <= last.end && end >= last.start) {
      last.start = Math.min(last.start, gfn);
      last.end = Math.max(last.end, end);
    } else {
      this.flushes.push({ start: gfn, end });
    }
  }

  /** Flush what is pending now (break-before-make needs the flush before the make). */
  flushNow(): void {
    if (this.flushes.length === 0) return;
    const ranges = this.flushes.splice(0);
    this.onFlush?.(ranges);
  }

  private release(): void {
    if (!this.held) return;
    this.held = false;
    this.valid = false;
    this.flushNow();
    this.onRelease?.();
  }

  // tdp_iter_next
  private step(): void {
    if (this.yielded) {
      this.restart();
      return;
    }
    if (this.stepDown()) return;
    do {
      if (this.stepSide()) return;
    } while (this.stepUp());
    this.valid = false;
  }

  private restart(): void {
    this.yielded = false;
    this.yieldedGfn = this.nextLastLevelGfn;
    this.level = this.rootLevel;
    this.table = this.root;
    this.gfn = roundDown(this.nextLastLevelGfn, this.level);
    this.index = (this.gfn - this.root.gfn) / PAGES[this.level];
    this.old = this.table.spte[this.index];
  }

  private stepDown(): boolean {
    if (this.level === this.minLevel) return false;
    // Re-read: never walk into a table that is no longer linked from here.
    this.old = this.table.spte[this.index];
    if (!isTable(this.old)) return false;
    const child = this.table.child![this.index]!;
    this.level--;
    this.path[this.level] = child;
    this.table = child;
    this.gfn = roundDown(this.nextLastLevelGfn, this.level);
    this.index = (this.gfn - child.gfn) / PAGES[this.level];
    this.old = child.spte[this.index];
    return true;
  }

  private stepSide(): boolean {
    if (this.index === this.table.size - 1) return false;
    this.gfn += PAGES[this.level];
    this.nextLastLevelGfn = this.gfn;
    this.index++;
    this.old = this.table.spte[this.index];
    return true;
  }

  private stepUp(): boolean {
    if (this.level === this.rootLevel) return false;
    this.level++;
    this.table = this.path[this.level];
    this.gfn = roundDown(this.gfn, this.level);
    this.index = (this.gfn - this.table.gfn) / PAGES[this.level];
    this.old = this.table.spte[this.index];
    return true;
  }
}

/** `for (const it of tdpIter(root, start, end)) { ... }` */
export function tdpIter(root: Table, start: number, end: number, opts: IterOptions = {}): TdpIter {
  return new TdpIter(root, start, end, opts);
}

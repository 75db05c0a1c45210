// The per-GFN picture beside a scenario run: after every step, what the
// model of KVM's host-dimension MMU maps for each GFN (present, level,
// writable, executable, MMIO) against what KVM mapped, rebuilt from its
// tracepoints; the faults KVM took against those the model predicts; and a
// remote TLB flush request for every step in which the model zapped or
// write-protected a present SPTE, against KVM's stats.
//
// A model and an observer of the same picture (GfnMapping) make a pair; the
// pair that applies is chosen from the probe's facts (PICTURE_PAIRS): the
// TDP MMU's, the engine's TDP model (model/tdp.ts, held by the model VM)
// against kvm_tdp_mmu_spte_changed + kvm_page_fault; and the legacy MMU's
// under kvm.tdp_mmu=0, LegacyTdp (model/legacy.ts, which the model VM holds
// there) against the legacy MMU's tracepoints (observe/legacy-picture.ts) +
// kvm_page_fault. Where none applies the picture is not applicable, with the
// reason in the notes.
//
// Feeding. The model predicts the faults of the scenario's own accesses
// (predict.ts faults them in before the run). The guest program's other
// accesses (its code, stack, the sync channel, and the guest page-table
// pages the processor's walk reads: kvm_page_fault with PFERR_GUEST_PAGE,
// error-code bit 33) are not predicted: each fault KVM took there is fed to
// the model after the step, which then decides what it maps. What the VMM
// writes into bring-up memory (slot 0: code, tables, the exception log it
// clears) populates those host pages: each page whose bytes changed between
// two runs is a host write to the model (a page written with the bytes it
// already held is no write in the lab, whose mirror sends only changes).
//
// What the trace cannot see is not compared (docs/scenarios.md, "The per-GFN
// TDP picture"): the children of a huge page split (kvm_mmu_split_huge_page
// writes them before linking the table, untraced) until a traced change
// reaches them, and the W bit that the fast page-fault path restores
// (fast_page_fault, untraced) until a traced change reaches that SPTE.
// The legacy MMU zaps and write-protects leaves through its rmaps without a
// trace event (docs/legacy-mmu.md): after each host operation that may do so
// (untracedBy) its GFNs are blind in the picture until a traced event sets
// them again, and the step is compared through KVM's pages_4k / pages_2m /
// pages_1g gauges against the model's pageCounts() instead.
import type { X86Guest } from '../arch/x86/guest.js';
import type { GfnMapping, TdpEvent } from '../model/tdp.js';
import { gfnToHva, slotEnd, type Memslot } from '../model/memslots.js';
import { PAGES, roundDown } from '../model/spte.js';
import type { GuestFault, ModelVm } from '../model/vm.js';
import type { Untraced } from '../observe/legacy-picture.js';
import { tdpObserverFor, type SptePicture } from '../observe/spte-picture.js';
import { readStats } from '../observe/stats.js';
import { parsePageFault, PFERR, X86_SPTE, type ObservedFault } from '../observe/tdp-picture.js';
import { TraceSession, type TraceEvent } from '../observe/tracefs.js';
import type { HostProfile } from '../probe/probe.js';
import type { GpaRange, HostRange, Step, TdpExpect } from '../scenario/types.js';
import type { CheckContext } from './types.js';
import { hex } from '../base/units.js';

/** What the follower needs of the run. */
export interface PictureEnv {
  ctx: CheckContext;
  g: X86Guest;
  vm: ModelVm;
}

/** A model and an observer of the per-GFN picture, for the hosts whose facts it fits. */
export interface PicturePair {
  name: string;
  /** How the comparisons and notes name the picture. */
  label: string;
  /** Why the pair does not fit this host, or undefined when it does. */
  unfit(profile: HostProfile): string | undefined;
  /** The trace events the observer reads. */
  events: readonly string[];
  /**
   * Where the trace is blind, the model's own events say (the TDP MMU's
   * untraced split children and fast-path W bits); otherwise the picture
   * says, from the host operations marked untraced (the legacy MMU).
   */
  blindFrom: 'model' | 'host-ops';
}

/** The TDP MMU (tdp_mmu=1): model/tdp.ts against kvm_tdp_mmu_spte_changed. */
const TDP_MMU: PicturePair = {
  name: 'TDP MMU',
  label: 'TDP',
  unfit(p) {
    if (p.arch !== 'x86_64') return 'the x86 TDP MMU only';
    const o = p.oracles.tdp_spte_tracepoints;
    return o.available ? undefined : `no SPTE tracepoints (${o.why})`;
  },
  events: ['kvmmmu/kvm_tdp_mmu_spte_changed', 'kvm/kvm_page_fault'],
  blindFrom: 'model',
};

/** The legacy MMU with TDP (tdp_mmu=0): model/legacy.ts against its leaf and shadow-page tracepoints. */
const LEGACY_MMU: PicturePair = {
  name: 'legacy MMU',
  label: 'legacy MMU',
  unfit(p) {
    if (p.arch !== 'x86_64') return 'x86 only';
    const o = p.oracles.legacy_spte_tracepoints;
    return o.available ? undefined : `no legacy SPTE tracepoints (${o.why})`;
  },
  events: [
    ...tdpObserverFor({ arch: 'x86_64', tdp: { enabled: true, kind: 'npt' }, tdpMmu: false, moduleParams: {} }).events,
    'kvm/kvm_page_fault',
  ],
  blindFrom: 'host-ops',
};

/** The pairs, in order of preference. */
export const PICTURE_PAIRS: readonly PicturePair[] = [TDP_MMU, LEGACY_MMU];

/** The pair that fits this host, or why none does. */
export function picturePair(profile: HostProfile): PicturePair | { why: string } {
  const why: string[] = [];
  for (const p of PICTURE_PAIRS) {
    const u = p.unfit(profile);
    if (u === undefined) return p;
    why.push(`${p.name}: ${u}`);
  }
  return { why: why.join('; ') };
}

/** A range of GFNs a host operation may zap or write-protect without a trace event. */
export interface UntracedRange {
  start: number;
  end: number;
  what: Untraced;
}

/** The slot's GFNs [offset, offset + size) of a step given in bytes. */
function slotRange(m: Memslot | undefined, offset: bigint, size: bigint, what: Untraced): UntracedRange[] {
  if (!m) return [];
  const start = m.baseGfn + Number(offset >> 12n);
  return [{ start, end: Math.min(slotEnd(m), start + Number((size + 0xfffn) >> 12n)), what }];
}

const wholeSlot = (m: Memslot | undefined, what: Untraced): UntracedRange[] =>
  m ? [{ start: m.baseGfn, end: slotEnd(m), what }] : [];

type HostStep = Extract<Step, { side: 'host' }>;
type UntracedOf = {
  [K in HostStep['kind']]: (
    s: Extract<HostStep, { kind: K }>,
    slot: (n: number) => Memslot | undefined,
    before: (n: number) => Memslot | undefined,
  ) => UntracedRange[];
};

/**
 * What each host step may change in the legacy MMU without a trace event
 * (docs/legacy-mmu.md): MMU-notifier invalidations zap leaves through the
 * rmaps (kvm_unmap_gfn_range), dirty logging on and the dirty-log calls
 * write-protect them (kvm_mmu_slot_remove_write_access,
 * kvm_arch_mmu_enable_log_dirty_pt_masked), logging off zaps the collapsible
 * ones (kvm_mmu_zap_collapsible_sptes). A host write may replace a zero page
 * (a COW, so an invalidation). Memslot deletion and moves zap every shadow
 * page (kvm_mmu_zap_all_fast, traced); KVM_PRE_FAULT_MEMORY faults, traced.
 * `slot`: the slot now; `before`: as it was when the step began.
 */
/** The GFNs of a GPA range. */
const gpaRange = (r: GpaRange, what: 'zap' | 'wrprot'): UntracedRange[] => [
  { start: Number(r.gpa >> 12n), end: Number((r.gpa + r.size + 0xfffn) >> 12n), what },
];
/** A host memory step's range: a slot's part, or the GFNs of a GPA range. */
const hostRange = (r: HostRange, slot: (n: number) => Memslot | undefined): UntracedRange[] =>
  'gpa' in r ? gpaRange(r, 'zap') : slotRange(slot(r.slot), r.offset, r.size, 'zap');

/**
 * A step that splits a VMA may zap the whole 2 MiB of host memory around
 * each end of its range (HostMm's vmaSplits): up to 511 GFNs either side.
 */
const splitReach = (rs: UntracedRange[]): UntracedRange[] =>
  rs.map((r) => ({ ...r, start: Math.max(0, r.start - 511), end: r.end + 511 }));

const UNTRACED: UntracedOf = {
  // A GPA range names its GFNs; a get over it write-protects the rest of each slot too, not marked here.
  'get-dirty-log': (s, slot) => ('gpa' in s ? gpaRange(s, 'wrprot') : wholeSlot(slot(s.slot), 'wrprot')),
  'clear-dirty-log': (s, slot) => ('gpa' in s ? gpaRange(s, 'wrprot') : wholeSlot(slot(s.slot), 'wrprot')),
  'memslot-delete': () => [],
  'memslot-create': () => [],
  'memslot-move': () => [],
  'write-memory': (s) => [{ start: Number(s.gpa >> 12n), end: Number((s.gpa + s.size + 0xfffn) >> 12n), what: 'zap' }],
  'memslot-flags': (s, slot, before) => {
    const was = before(s.slot)?.flags.logDirty;
    const now = slot(s.slot)?.flags.logDirty;
    if (was === now) return [];
    return wholeSlot(slot(s.slot), now ? 'wrprot' : 'zap');
  },
  madvise: (s, slot) => (s.advice === 'dontneed' ? hostRange(s, slot) : splitReach(hostRange(s, slot))),
  munmap: (s, slot) => splitReach(hostRange(s, slot)),
  remap: (s, slot) => hostRange(s, slot),
  mprotect: (s, slot) => splitReach(hostRange(s, slot)),
  'punch-hole': (s, slot) => slotRange(slot(s.slot), s.offset, s.size, 'zap'),
  'close-guest-memfd': (s, slot, before) => wholeSlot(before(s.slot), 'zap'),
  'pre-fault': () => [],
  'read-memory': () => [],
  translate: () => [],
  'write-pte': () => [],
  'clear-ad': () => [],
};

/** The GFN ranges a host step may change untraced, under the legacy MMU. */
export function untracedBy(
  s: HostStep,
  slot: (n: number) => Memslot | undefined,
  before: (n: number) => Memslot | undefined = slot,
): UntracedRange[] {
  const f = UNTRACED[s.kind] as (s: HostStep, a: typeof slot, b: typeof before) => UntracedRange[];
  return f(s, slot, before);
}

/** A GFN's mapping, one line: "L1 W X", "L2 R NX", "MMIO", "not mapped". */
function show(m: GfnMapping | undefined, blindW = false): string {
  if (!m) return 'not mapped';
  if (m.mmio) return `L${m.level} MMIO`;
  return `L${m.level}${blindW ? '' : m.writable ? ' W' : ' R'} ${m.executable ? 'X' : 'NX'}`;
}

/** Why the model's SPTE at a (gfn, level) cannot be compared with the trace: 'all' (untraced write), 'writable' (W restored untraced). */
type Blind = 'all' | 'writable';
const spteKey = (gfn: number, level: number) => `${gfn}@${level}`;

/** KVM's gauges of leaf SPTEs by level (pages_4k at index 1), as the model's pageCounts() counts them. */
const PAGE_GAUGES = ['', 'pages_4k', 'pages_2m', 'pages_1g'] as const;

export class TdpFollow {
  private picture: SptePicture;
  private readonly blind = new Map<string, Blind>();
  /** The slots as the step began (a host step may delete or change one). */
  private slotsBefore = new Map<number, Memslot>();
  /** The model's leaves by level as the step began, where the step is compared through the gauges. */
  private countsBefore: number[] = [];
  /** GFNs this step marked untraced; its page gauges are then compared. */
  private untracedNow = 0;
  private readonly gauges: string[] = [];
  /** Slot 0's bytes after the last run (fresh anonymous memory: zeros). */
  private slot0 = new Uint8Array(0);
  /** Events taken by acted() during the step. */
  private readonly early: TraceEvent[] = [];
  private flushBefore = 0;
  private statsBefore: Map<string, bigint> | undefined;
  private readonly flushStat: string | undefined;
  /** Totals for the closing note. */
  private steps = 0;
  private gfns = 0;
  private mapped = 0;
  private unseen = 0;
  private faultsChecked = 0;
  private fed = 0;
  private gaugeSteps = 0;
  private gaugeChecks = 0;

  private constructor(
    readonly env: PictureEnv,
    private readonly trace: TraceSession,
    readonly pair: PicturePair,
  ) {
    const { ctx, vm } = env;
    this.picture = this.newPicture();
    vm.tdp.record = true;
    vm.tdp.events.splice(0);
    const slot0 = vm.slots.get(0, 0);
    this.slot0 = new Uint8Array((slot0?.npages ?? 0) * 4096);
    const stats = this.readStats();
    this.flushStat = ['remote_tlb_flush_requests', 'remote_tlb_flush'].find((s) => stats?.has(s));
    if (pair.blindFrom === 'host-ops') for (const g of PAGE_GAUGES) if (g && stats?.has(g)) this.gauges.push(g);
    const traced = pair.events.filter((e) => e !== 'kvm/kvm_page_fault').map((e) => e.split('/')[1]);
    ctx.note(
      `${pair.label} per-GFN picture: the model's against ${traced.join(', ')} after every step; faults against kvm_page_fault; ` +
        (this.flushStat
          ? `remote TLB flush requests against the stat ${this.flushStat}`
          : 'remote TLB flush requests not applicable here (no remote_tlb_flush stats)') +
        (pair.blindFrom === 'host-ops'
          ? this.gauges.length
            ? `; GFNs a host operation zaps or write-protects untraced are compared through ${this.gauges.join(', ')}`
            : '; GFNs a host operation zaps or write-protects untraced are not compared, and no pages_* stats are here to compare instead'
          : ''),
    );
  }

  private newPicture(): SptePicture {
    return tdpObserverFor(this.env.ctx.profile).picture();
  }

  /** A follower when a pair fits this host; otherwise a note says why the picture is not applicable. */
  static async open(env: PictureEnv): Promise<TdpFollow | undefined> {
    const pair = picturePair(env.ctx.profile);
    if ('why' in pair) {
      env.ctx.note(`TDP per-GFN picture not applicable here: ${pair.why}`);
      return undefined;
    }
    const { ctx, g } = env;
    // A host step's zap runs in the ioctl's thread: the main thread (the lab agent's
    // own in the lab), where vCPUs run on threads of their own.
    const tid = await g.vcpu.tid();
    const pids = [...new Set([tid, ctx.target.addon.gettid()])];
    return new TdpFollow(env, TraceSession.open(ctx.target.fs, pair.events, pids), pair);
  }

  close(): void {
    this.trace.close();
    this.env.ctx.note(
      `${this.pair.label} per-GFN picture: ${this.steps} steps compared, ${this.gfns} GFN comparisons (${this.mapped} of GFNs mapped on either side, the rest unmapped on both), ` +
        `${this.unseen} not comparable (written where the trace cannot see); ${this.faultsChecked} predicted faults checked, ${this.fed} faults fed to the model` +
        (this.pair.blindFrom === 'host-ops'
          ? `; ${this.gaugeSteps} steps with untraced changes, ${this.gaugeChecks} page-gauge comparisons`
          : ''),
    );
  }

  private readStats(): Map<string, bigint> | undefined {
    const { ctx, g } = this.env;
    if (!ctx.profile.capabilities.KVM_CAP_BINARY_STATS_FD) return undefined;
    return readStats([g.vm.stats()]);
  }

  /** Before a step: the flush counters, page counts and slots it starts from. */
  begin(): void {
    const { vm } = this.env;
    this.flushBefore = vm.tdp.flushRequests;
    this.statsBefore = this.flushStat || this.gauges.length ? this.readStats() : undefined;
    this.untracedNow = 0;
    if (this.pair.blindFrom !== 'host-ops') return;
    this.slotsBefore = new Map(vm.slots.list(0).map((m) => [m.slot, m]));
    this.countsBefore = vm.tdp.pageCounts(0);
  }

  /**
   * After a host step's action, before the guest runs again: what the action
   * did, so that a new root (memslot deletion) starts a new picture before
   * the new root's entries are traced; under the legacy MMU, the GFNs the
   * action may have changed untraced.
   */
  acted(s?: HostStep): void {
    const events = this.trace.take();
    this.picture.add(events);
    this.early.push(...events);
    this.learn(this.env.vm.tdp.events.splice(0));
    if (!s || this.pair.blindFrom !== 'host-ops') return;
    const { vm } = this.env;
    for (const r of untracedBy(
      s,
      (n) => vm.slots.get(0, n),
      (n) => this.slotsBefore.get(n),
    ))
      this.untraced(r);
  }

  /**
   * Marks [start, end) untraced, widened to the whole of a huge leaf that
   * crosses either end on either side (the rmap zap takes the leaf whole).
   */
  private untraced(r: UntracedRange): void {
    const { vm } = this.env;
    const level = (gfn: number) =>
      Math.max(this.picture.leaf(0, BigInt(gfn))?.level ?? 1, vm.tdp.lookup(0, gfn)?.level ?? 1);
    const start = roundDown(r.start, level(r.start));
    const last = r.end - 1;
    const end = roundDown(last, level(last)) + PAGES[level(last)]!;
    if (end <= start) return;
    this.picture.untraced(start, end, r.what);
    this.untracedNow += end - start;
  }

  /**
   * After a step: the trace into the picture, the faults compared and fed,
   * the flush request, then the picture GFN by GFN. `faults`: whether the
   * step's faults are the model's to predict (not after an access that
   * stopped for missing host memory).
   */
  step(name: string, faults = true, expect?: readonly TdpExpect[]): void {
    const { vm } = this.env;
    const late = this.trace.take();
    this.picture.add(late);
    const events = [...this.early.splice(0), ...late];
    const observed = events.map(parsePageFault).filter((f): f is ObservedFault => !!f);
    const predicted = vm.takeFaults();
    const mine = new Set(predicted.map((f) => f.gfn));
    if (faults)
      this.compareFaults(
        name,
        predicted,
        observed.filter((f) => mine.has(Number(f.gpa >> 12n))),
      );
    for (const f of observed) if (!mine.has(Number(f.gpa >> 12n))) this.feed(f);
    this.learn(vm.tdp.events.splice(0));
    this.compareFlush(name, events);
    this.compareGauges(name);
    this.compare(name);
    if (expect) this.compareExpect(name, expect);
    this.steps++;
  }

  /** The step's explicit per-page expectations (a scenario's "tdp") against KVM's picture. */
  private compareExpect(name: string, expect: readonly TdpExpect[]): void {
    for (const e of expect) {
      const gfn = Number(e.gpa >> 12n);
      const o = this.picture.mapping(0, e.gpa >> 12n);
      const blind = this.picture.blind(gfn);
      if (blind === 'mapping') {
        this.env.ctx.note(
          `${name}: ${this.pair.label} expectation at ${hex(e.gpa)} not comparable: a host operation changed it where the trace cannot see`,
        );
        continue;
      }
      const seen: Record<string, unknown> = { present: !!o };
      const want: Record<string, unknown> = {};
      for (const f of ['present', 'level', 'writable', 'executable', 'mmio'] as const) {
        if (e[f] === undefined || (f === 'writable' && blind === 'writable')) continue;
        want[f] = e[f];
        if (f !== 'present') seen[f] = o?.[f];
      }
      if (want.present === undefined) delete seen.present;
      this.env.ctx.expect(`${name}: TDP expected at ${hex(e.gpa)}`, want, seen);
    }
  }

  /** After a step, with or without a follower: a step's explicit expectations need one. */
  static after(
    f: TdpFollow | undefined,
    ctx: CheckContext,
    name: string,
    faults: boolean,
    expect?: readonly TdpExpect[],
  ): void {
    if (f) f.step(name, faults, expect);
    else if (expect?.length)
      ctx.note(`${name}: tdp expectations not applicable here (no per-GFN picture on this host)`);
  }

  /** The faults the model predicts for the scenario's accesses, in order, against KVM's at those GFNs. */
  private compareFaults(name: string, predicted: GuestFault[], observed: ObservedFault[]): void {
    const want = predicted
      .filter((f) => f.result.kind !== 'spurious' && f.result.kind !== 'efault')
      .map(
        (f) =>
          `${hex(BigInt(f.gfn))} ${f.access}${f.before === 'mmio' ? ' rsvd' : f.before === 'present' ? ' present' : ''}`,
      );
    const seen = observed
      .filter((f) => (f.errorCode & PFERR.guestFinal) !== 0n || (f.errorCode & PFERR.guestPage) === 0n)
      .map((f) => {
        const e = f.errorCode;
        const access = e & PFERR.fetch ? 'exec' : e & PFERR.write ? 'write' : 'read';
        const how = e & PFERR.rsvd ? ' rsvd' : e & PFERR.present ? ' present' : '';
        return `${hex(f.gpa >> 12n)} ${access}${how}`;
      });
    this.faultsChecked += want.length;
    this.env.ctx.expect(`${name}: ${this.pair.label} faults (gfn, access, error code)`, want, seen);
  }

  /** A step with untraced changes: KVM's page gauges moved as the model's leaf counts did. */
  private compareGauges(name: string): void {
    if (!this.untracedNow || !this.gauges.length || !this.statsBefore) return;
    const after = this.readStats();
    const counts = this.env.vm.tdp.pageCounts(0);
    this.gaugeSteps++;
    for (const g of this.gauges) {
      const level = PAGE_GAUGES.indexOf(g as (typeof PAGE_GAUGES)[number]);
      const model = counts[level]! - this.countsBefore[level]!;
      const kvm = Number((after?.get(g) ?? 0n) - (this.statsBefore.get(g) ?? 0n));
      this.gaugeChecks++;
      this.env.ctx.expect(`${name}: ${g} change (untraced zaps and write protection)`, model, kvm);
    }
  }

  /** Before a run: the pages of slot 0 the VMM changed since the last run are host writes. */
  beforeRun(): void {
    const { g, vm } = this.env;
    const slot = vm.slots.get(0, 0);
    if (!slot) return;
    for (let i = 0; i < slot.npages; i++) {
      const gpa = BigInt(slot.baseGfn + i) << 12n;
      const now = g.mem.bytes(gpa, 4096);
      const was = this.slot0.subarray(i * 4096, (i + 1) * 4096);
      if (Buffer.compare(now, was) === 0) continue;
      // A host write over a zero page is a COW: KVM's legacy MMU zaps its leaf untraced.
      const gfn = slot.baseGfn + i;
      if (this.pair.blindFrom === 'host-ops' && !vm.tdp.host.writableNow(gfnToHva(slot, gfn)))
        this.untraced({ start: gfn, end: gfn + 1, what: 'zap' });
      vm.hostWrote(gpa, 4096);
    }
  }

  /** After a run: slot 0 as the guest left it, for the next beforeRun(). */
  afterRun(): void {
    const { g, vm } = this.env;
    const slot = vm.slots.get(0, 0);
    if (!slot) return;
    if (this.slot0.length !== slot.npages * 4096) this.slot0 = new Uint8Array(slot.npages * 4096);
    this.slot0.set(g.mem.bytes(BigInt(slot.baseGfn) << 12n, slot.npages * 4096));
  }

  /** A fault the model does not predict (the program's own accesses, guest page-table pages), fed to it. */
  private feed(f: ObservedFault): void {
    const { vm } = this.env;
    const gfn = Number(f.gpa >> 12n);
    const e = f.errorCode;
    vm.tdp.fault(0, gfn, { write: (e & PFERR.write) !== 0n, exec: (e & PFERR.fetch) !== 0n });
    this.fed++;
  }

  /** Marks what the model wrote where the trace cannot see it, and forgets it once a traced change reaches it. */
  private learn(events: TdpEvent[]): void {
    for (const e of events) {
      if (e.asId !== 0) continue;
      if (e.kind === 'roots') {
        // A new root: what the old one held is out of every vCPU's reach.
        this.picture = this.newPicture();
        this.blind.clear();
      } else if (this.pair.blindFrom !== 'model') {
        continue; // the trace shows the rest (fast_page_fault); the picture marks what it cannot see
      } else if (e.kind === 'split') {
        const step = PAGES[e.level - 1]!;
        for (let gfn = e.gfn; gfn < e.gfn + PAGES[e.level]!; gfn += step)
          this.blind.set(spteKey(gfn, e.level - 1), 'all');
      } else if (e.kind === 'spte') {
        const k = spteKey(e.gfn, e.level);
        if (!e.fast) this.blind.delete(k);
        else if (!this.blind.has(k)) this.blind.set(k, 'writable');
      }
    }
  }

  /** A step that zapped or write-protected a present SPTE in the model must have requested a remote TLB flush. */
  private compareFlush(name: string, events: TraceEvent[]): void {
    const model = this.env.vm.tdp.flushRequests - this.flushBefore;
    const stat = this.flushStat;
    const before = this.statsBefore;
    if (!stat || !before) return;
    const after = this.readStats();
    const delta = (after?.get(stat) ?? 0n) - (before.get(stat) ?? 0n);
    if (model > 0 !== delta > 0n) {
      const lost = events.filter((e) => {
        const f = e.fields;
        return (
          e.id === 'kvmmmu/kvm_tdp_mmu_spte_changed' &&
          typeof f.old_spte === 'bigint' &&
          (f.old_spte & X86_SPTE.mmuPresent) !== 0n
        );
      });
      const hostMaps = [...this.env.g.vm.slots.values()]
        .map((m) => {
          const vmas = m.vmas();
          return `slot ${m.slot} at ${hex(m.hva)}: ${
            vmas
              ?.map((v) => `[${hex(v.start)}, ${hex(v.end)}) AnonHugePages ${v.anonHugeKb} kB, ${v.flags}`)
              .join('; ') ?? 'smaps unreadable'
          }`;
        })
        .join(' | ');
      this.env.ctx.note(
        `${name}: ${stat} changed by ${delta}; the model requested ${model} flush(es); traced changes of present SPTEs: ${lost.map((e) => e.text).join('; ') || 'none'}; host mappings now: ${hostMaps}`,
      );
    }
    this.env.ctx.expect(
      `${name}: remote TLB flush requested (${stat})`,
      model > 0 ? 'requested' : 'not requested',
      delta > 0n ? 'requested' : 'not requested',
    );
  }

  /** Every GFN either side maps, model against trace, field by field. */
  private compare(name: string): void {
    const { vm } = this.env;
    const model = vm.tdp.picture(0);
    const gfns = new Set(model.keys());
    for (const [s, e] of this.picture.spans(0)) for (let g = s; g < e; g++) gfns.add(Number(g));
    const want: string[] = [];
    const seen: string[] = [];
    const wrong: { gfn: number; field: string; model: unknown; kvm: unknown }[] = [];
    let unseen = 0;
    for (const gfn of [...gfns].sort((a, b) => a - b)) {
      const m = model.get(gfn);
      const o = this.picture.mapping(0, BigInt(gfn));
      const seenBlind = this.picture.blind(gfn);
      const blind: Blind | undefined =
        seenBlind === 'mapping'
          ? 'all'
          : ((m ? this.blind.get(spteKey(roundDown(gfn, m.level), m.level)) : undefined) ??
            (seenBlind === 'writable' ? 'writable' : undefined));
      if (blind === 'all') {
        unseen++;
        continue;
      }
      const blindW = blind === 'writable';
      want.push(`${hex(BigInt(gfn))} ${show(m, blindW)}`);
      seen.push(`${hex(BigInt(gfn))} ${show(o, blindW)}`);
      if (!m || !o) {
        if (!!m !== !!o) wrong.push({ gfn, field: 'present', model: !!m, kvm: !!o });
        continue;
      }
      for (const field of ['level', 'mmio', 'writable', 'executable'] as const) {
        if (field === 'writable' && blindW) continue;
        if (m[field] !== o[field]) wrong.push({ gfn, field, model: m[field], kvm: o[field] });
      }
    }
    // Every GFN of every slot is compared: those neither side maps agree without being listed.
    const inSlots = vm.slots.list(0).reduce((n, sl) => n + sl.npages, 0);
    this.gfns += inSlots + [...gfns].filter((g) => !vm.slots.find(0, g)).length;
    this.mapped += want.length;
    this.unseen += unseen;
    const c = this.env.ctx;
    const label = this.pair.label;
    for (const w of wrong.slice(0, 4))
      c.expect(`${name}: ${label} gfn ${hex(BigInt(w.gfn))} ${w.field}`, w.model, w.kvm);
    c.expect(`${name}: ${label} per-GFN picture (${want.length} GFNs mapped on either side)`, runs(want), runs(seen));
  }
}

/** "gfn desc" lines as runs of consecutive GFNs with the same description: "0x1000..0x11ff L1 W X". */
function runs(lines: string[]): string[] {
  const out: string[] = [];
  let start = -1;
  let prev = -1;
  let cur = '';
  const flush = () => {
    if (start >= 0) out.push(`${hex(BigInt(start))}${prev > start ? `..${hex(BigInt(prev))}` : ''} ${cur}`);
  };
  for (const l of lines) {
    const sp = l.indexOf(' ');
    const gfn = Number(l.slice(0, sp));
    const d = l.slice(sp + 1);
    if (gfn === prev + 1 && d === cur) {
      prev = gfn;
      continue;
    }
    flush();
    start = prev = gfn;
    cur = d;
  }
  flush();
  return out;
}

// The per-GFN picture beside a scenario run: after every step, what the
// model of KVM's host-dimension MMU maps for each GFN (present, level,
// writable, executable, MMIO) against what KVM mapped, rebuilt from its
// tracepoints; the faults KVM took against those the model predicts; and a
// remote TLB flush request for every step in which the model zapped or
// write-protected a present SPTE, against KVM's stats.
//
// A model and an observer of the same picture (GfnMapping) make a pair; the
// pair that applies is chosen from the probe's facts (PICTURE_PAIRS). The TDP
// MMU's pair is here: the engine's TDP model (model/tdp.ts, held by the model
// VM) and kvm_tdp_mmu_spte_changed + kvm_page_fault. Another MMU's model
// plugs in as another entry; where none applies the picture is not
// applicable, with the reason in the notes.
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
import type { X86Guest } from '../arch/x86/guest.js';
import type { GfnMapping, TdpEvent } from '../model/tdp.js';
import { PAGES, roundDown } from '../model/spte.js';
import type { GuestFault, ModelVm } from '../model/vm.js';
import { readStats } from '../observe/stats.js';
import { parsePageFault, PFERR, TdpPicture, X86_SPTE, type ObservedFault } from '../observe/tdp-picture.js';
import { TraceSession, type TraceEvent } from '../observe/tracefs.js';
import type { HostProfile } from '../probe/probe.js';
import type { TdpExpect } from '../scenario/types.js';
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
  /** Why the pair does not fit this host, or undefined when it does. */
  unfit(profile: HostProfile): string | undefined;
  /** The trace events the observer reads. */
  events: readonly string[];
}

/** The TDP MMU (tdp_mmu=1): model/tdp.ts against kvm_tdp_mmu_spte_changed. */
const TDP_MMU: PicturePair = {
  name: 'TDP MMU',
  unfit(p) {
    if (p.arch !== 'x86_64') return 'the x86 TDP MMU only';
    const o = p.oracles.tdp_spte_tracepoints;
    return o.available ? undefined : `no SPTE tracepoints (${o.why})`;
  },
  events: ['kvmmmu/kvm_tdp_mmu_spte_changed', 'kvm/kvm_page_fault'],
};

/** The pairs, in order of preference; a model of another MMU adds its own. */
export const PICTURE_PAIRS: readonly PicturePair[] = [TDP_MMU];

/** The pair that fits this host, or why none does. */
export function picturePair(profile: HostProfile): PicturePair | { why: string } {
  const why: string[] = [];
  for (const p of PICTURE_PAIRS) {
    const u = p.unfit(profile);
    if (u === undefined) return p;
    why.push(`${p.name}: ${u}`);
  }
  if (profile.tdp.enabled && profile.tdpMmu === false)
    why.push('no model of the legacy MMU (tdp_mmu=0) is registered for the per-GFN picture');
  return { why: why.join('; ') };
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

export class TdpFollow {
  private picture: TdpPicture;
  private readonly blind = new Map<string, Blind>();
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

  private constructor(
    readonly env: PictureEnv,
    private readonly trace: TraceSession,
  ) {
    const { ctx, vm } = env;
    this.picture = new TdpPicture(ctx.profile.tdp.kind === 'ept' ? 'ept' : 'npt');
    vm.tdp.record = true;
    vm.tdp.events.splice(0);
    const slot0 = vm.slots.get(0, 0);
    this.slot0 = new Uint8Array((slot0?.npages ?? 0) * 4096);
    const stats = this.readStats();
    this.flushStat = ['remote_tlb_flush_requests', 'remote_tlb_flush'].find((s) => stats?.has(s));
    ctx.note(
      `TDP per-GFN picture: the model's against kvm_tdp_mmu_spte_changed after every step; faults against kvm_page_fault; ` +
        (this.flushStat
          ? `remote TLB flush requests against the stat ${this.flushStat}`
          : 'remote TLB flush requests not applicable here (no remote_tlb_flush stats)'),
    );
  }

  /** A follower when a pair fits this host; otherwise a note says why the picture is not applicable. */
  static async open(env: PictureEnv): Promise<TdpFollow | undefined> {
    const pair = picturePair(env.ctx.profile);
    if ('why' in pair) {
      env.ctx.note(`TDP per-GFN picture not applicable here: ${pair.why}`);
      return undefined;
    }
    const { ctx, g } = env;
    // A host step's zap runs in the ioctl's thread: the main thread, where vCPUs run on threads of their own.
    const tid = await g.vcpu.tid();
    const pids = ctx.target.concurrentRuns ? [tid, process.pid] : [tid];
    return new TdpFollow(env, TraceSession.open(ctx.target.fs, pair.events, pids));
  }

  close(): void {
    this.trace.close();
    this.env.ctx.note(
      `TDP per-GFN picture: ${this.steps} steps compared, ${this.gfns} GFN comparisons (${this.mapped} of GFNs mapped on either side, the rest unmapped on both), ` +
        `${this.unseen} not comparable (written where the trace cannot see); ${this.faultsChecked} predicted faults checked, ${this.fed} faults fed to the model`,
    );
  }

  private readStats(): Map<string, bigint> | undefined {
    const { ctx, g } = this.env;
    if (!ctx.profile.capabilities.KVM_CAP_BINARY_STATS_FD) return undefined;
    return readStats([g.vm.stats()]);
  }

  /** Before a step: the flush counters it starts from. */
  begin(): void {
    this.flushBefore = this.env.vm.tdp.flushRequests;
    this.statsBefore = this.flushStat ? this.readStats() : undefined;
  }

  /**
   * After a host step's action, before the guest runs again: what the action
   * did, so that a new root (memslot deletion) starts a new picture before
   * the new root's entries are traced.
   */
  acted(): void {
    const events = this.trace.take();
    this.picture.add(events);
    this.early.push(...events);
    this.learn(this.env.vm.tdp.events.splice(0));
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
    this.compare(name);
    if (expect) this.compareExpect(name, expect);
    this.steps++;
  }

  /** The step's explicit per-page expectations (a scenario's "tdp") against KVM's picture. */
  private compareExpect(name: string, expect: readonly TdpExpect[]): void {
    for (const e of expect) {
      const o = this.picture.mapping(0, e.gpa >> 12n);
      const seen: Record<string, unknown> = { present: !!o };
      const want: Record<string, unknown> = {};
      for (const f of ['present', 'level', 'writable', 'executable', 'mmio'] as const) {
        if (e[f] === undefined) continue;
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
    this.env.ctx.expect(`${name}: TDP faults (gfn, access, error code)`, want, seen);
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
      if (Buffer.compare(now, was) !== 0) vm.hostWrote(gpa, 4096);
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
        this.picture = new TdpPicture(this.picture.flavour);
        this.blind.clear();
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
      this.env.ctx.note(
        `${name}: ${stat} changed by ${delta}; the model requested ${model} flush(es); traced changes of present SPTEs: ${lost.map((e) => e.text).join('; ') || 'none'}`,
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
      const blind = m ? this.blind.get(spteKey(roundDown(gfn, m.level), m.level)) : undefined;
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
    for (const w of wrong.slice(0, 4)) c.expect(`${name}: TDP gfn ${hex(BigInt(w.gfn))} ${w.field}`, w.model, w.kvm);
    c.expect(`${name}: TDP per-GFN picture (${want.length} GFNs mapped on either side)`, runs(want), runs(seen));
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

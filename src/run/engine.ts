// The differential engine: runs a scenario on real KVM one step at a time and
// compares each step's observations with the model's prediction.
//
// The guest program is linear: each guest step's code is followed by a sync
// on the channel, so the vCPU is stopped between steps; host steps happen at
// those stops. The engine is the loop over the steps; each step kind's code
// and host action are in the table of step-actions.ts. For an access, the
// model predicts (predict.ts) from the guest's tables as they are in memory
// right then; after it the engine observes the exception log, the value read,
// the PTEs along the walk and, with `trace`, KVM's walker tracepoints. The
// model VM (model/vm.ts) follows the VM's memslots and host memory, says
// which accesses find no host page (host-policy.ts: what the guest sees then)
// and which pages the dirty log should list. Steps may state expected stats
// deltas (compareStats). Multi-vCPU races run in race.ts.
import { Asm } from '../arch/x86/asm.js';
import { channel, describeStop, X86Guest, type ExceptionRecord, type GuestStop } from '../arch/x86/guest.js';
import { LAYOUT } from '../arch/x86/layout.js';
import { PTE_A } from '../arch/x86/pte.js';
import { KvmError } from '../kvm/sys.js';
import type { Memslot } from '../model/memslots.js';
import { BACKINGS, modelSlot, ModelVm } from '../model/vm.js';
import { accessException, accessedLatitude, walkWith, type PagingConfig, type WalkResult } from '../model/walk.js';
import type { Wrong, WrongWalk } from '../model/wrong.js';
import { readStats } from '../observe/stats.js';
import { TraceSession, type TraceEvent } from '../observe/tracefs.js';
import { tracedWalks, WALKER_EVENTS } from '../observe/walker-trace.js';
import { guestWalkerOf, type HostProfile } from '../probe/probe.js';
import {
  bringUpOptions,
  buildScenarioTables,
  pagingConfigFor,
  slotSpec,
  type ScenarioTables,
} from '../scenario/build.js';
import { showDelta, showStatExpect, statHolds, statNotApplicable } from '../scenario/stats.js';
import type { Scenario, Step, StepStats } from '../scenario/types.js';
import { same, show } from './differ.js';
import { hostFaultPath, tdpLogsDirty, tdpModelOptions } from './host-policy.js';
import { OldTranslations } from './old-translations.js';
import { compareLoop, predictLoop } from './loop.js';
import {
  describeWalk,
  MMIO_FILL,
  modelAsTrace,
  predictAccess,
  type AccessStep,
  type Prediction,
  type PredictFrom,
} from './predict.js';
import { modelPageCount, thpUnconfirmed } from './model-stats.js';
import { runRace } from './race.js';
import { ShadowFollow } from './shadow-follow.js';
import { TdpFollow } from './tdp-follow.js';
import {
  emitWrpkru,
  guestAction,
  hostAction,
  IMPLICIT_DESCRIPTOR,
  type EntryFinder,
  type HostEnv,
} from './step-actions.js';
import { NotApplicable } from '../base/not-applicable.js';
import type { Check, CheckContext } from './types.js';
import { hex } from '../base/units.js';

export interface EngineOptions {
  /** Compare KVM's walker tracepoints with the model's walk (needs tracefs). */
  trace?: boolean;
  /** Test-only: a deliberately wrong model (walk, TDP, race; model/wrong.ts). */
  wrong?: Wrong;
  /** false: no shadow MMU model beside the run (the fuzzer, shrinking a mismatch of another field). */
  shadowFollow?: boolean;
  /** false: no per-GFN TDP picture beside the run (the fuzzer, shrinking a mismatch of another field). */
  tdpFollow?: boolean;
}

/** How a run ended: a guest stop, or KVM_RUN failing (EFAULT without a memory-fault exit), which is an observation. */
type Stop = GuestStop | { kind: 'kvm_run_error'; errno: string };

type GuestSideStep = Extract<Step, { side: 'guest' }>;
type HostSideStep = Extract<Step, { side: 'host' }>;

/** An access that stopped for missing host memory, redone by the next run. */
interface Pending {
  step: number;
  name: string;
  access: AccessStep;
  walk: WalkResult;
  gpa: bigint;
}

/** A step as comparisons and reproducers name it: `step 4 read64 0x8000000000 cpl3`. */
export function stepName(i: number, s: Step): string {
  if (s.side === 'host') return `step ${i} host ${s.kind}${'gva' in s ? ` ${hex(s.gva)}` : ''}`;
  if (s.kind === 'access') return `step ${i} ${s.access}${s.size * 8} ${hex(s.gva)} cpl${s.cpl}`;
  return `step ${i} ${s.kind}`;
}

/** The x86 CPU the scenario needs, or NotApplicable saying what this host lacks. */
export function hostCpu(profile: HostProfile, sc: Scenario, opts: EngineOptions) {
  const cpu = profile.cpu;
  if (!cpu) throw new NotApplicable('x86 scenarios need an x86 host');
  if (opts.trace && profile.tdp.enabled) {
    throw new NotApplicable(
      "with TDP the hardware walks the guest's tables; KVM's walker tracepoints see only the accesses it emulates",
    );
  }
  if (sc.paging.levels === 5 && !cpu.la57)
    throw new NotApplicable('5-level paging needs LA57, which this host does not offer');
  for (const b of ['smep', 'smap', 'pke'] as const) {
    const feature = b === 'pke' ? 'pku' : b;
    const used =
      sc.paging.cr4[b] || sc.steps.some((s) => s.side === 'guest' && s.kind === 'set-cr4' && s.bit === b && s.value);
    if (used && !cpu[feature])
      throw new NotApplicable(
        `CR4.${b.toUpperCase()} needs ${feature.toUpperCase()}, which this host's KVM does not offer`,
      );
  }
  if (sc.mappings.some((m) => m.page === '1G') && !cpu.pdpe1gb)
    throw new NotApplicable('1 GiB pages need PDPE1GB, which this host does not offer');
  return cpu;
}

/**
 * Runs a scenario. With `trace`, KVM's walker tracepoints are captured per
 * step and compared element by element with the model's walk.
 */
export async function runScenario(ctx: CheckContext, sc: Scenario, opts: EngineOptions = {}): Promise<void> {
  const cpu = hostCpu(ctx.profile, sc, opts);
  const g = X86Guest.create(ctx.kvm, { ...bringUpOptions(sc), memSize: Number(LAYOUT.identityEnd) });
  let trace: TraceSession | undefined;
  let shadow: ShadowFollow | undefined;
  let tdp: TdpFollow | undefined;
  try {
    const manualProtect = sc.steps.some((s) => s.side === 'host' && s.kind === 'clear-dirty-log');
    if (manualProtect) g.vm.enableManualDirtyLogProtect();
    if (sc.memslots.some((m) => m.backing === 'guest_memfd')) {
      const why = g.vm.sharedGuestMemfdUnsupported();
      if (why) throw new NotApplicable(why);
    }
    for (const m of sc.memslots) if (m.created === 'at-start') g.vm.addMemslot(slotSpec(m));
    const built = buildScenarioTables(sc, g.mem, g.boot);
    const cfg: PagingConfig = { ...pagingConfigFor(sc, cpu), walker: guestWalkerOf(ctx.profile) };
    if (cfg.walker === 'qemu-tcg')
      ctx.note(
        "the guest's walks are QEMU TCG's (TDP on an emulated CPU): the model applies TCG's measured deviations (README, Findings)",
      );
    else if (cfg.walker === 'cpu')
      ctx.note("the guest's walks are the processor's (TDP): A bits a faulting walk may set are accepted either way");
    const run = new ScenarioRun(ctx, sc, opts, g, built, cfg, manualProtect);
    run.load();
    if (opts.trace) trace = run.trace = TraceSession.open(ctx.target.fs, WALKER_EVENTS, [await g.vcpu.tid()]);
    const follow = { ctx, sc, g, built, walk: (gva: bigint) => run.entries.walk(gva), wrong: opts.wrong?.shadow };
    if (opts.shadowFollow !== false) shadow = run.shadow = await ShadowFollow.open(follow);
    if (opts.tdpFollow !== false) tdp = run.tdp = await TdpFollow.open({ ctx, g, vm: run.vm });
    await run.steps();
  } finally {
    tdp?.close();
    shadow?.close();
    trace?.close();
    g.close();
  }
}

/** One run of a scenario: the guest, the model VM and the paging state the model walks with, step by step. */
class ScenarioRun {
  /** Translations the processor may still use after a host write to the tables (old-translations.ts). */
  private readonly old = new OldTranslations();
  /** The model VM: the VM's memslots and host memory, the TDP model over them, the pages expected dirty. */
  readonly vm: ModelVm;
  readonly wrongWalk: ReadonlySet<WrongWalk>;
  readonly entries: EntryFinder;
  readonly host: HostEnv;
  readonly tdpDirty: boolean;
  readonly canReadStats: boolean;
  trace: TraceSession | undefined;
  /** The shadow MMU model beside the run, on a shadow-MMU host with its tracepoints. */
  shadow: ShadowFollow | undefined;
  /** The per-GFN picture beside the run, where a model of this host's MMU and its tracepoints are. */
  tdp: TdpFollow | undefined;
  pending: Pending | undefined;
  /** The guest has run (its WRPKRU, first in the program, with it). */
  ran = false;

  constructor(
    readonly ctx: CheckContext,
    readonly sc: Scenario,
    opts: EngineOptions,
    readonly g: X86Guest,
    readonly built: ScenarioTables,
    /** Paging state now; guest steps that change it update it after they run. */
    public cfg: PagingConfig,
    manualProtect: boolean,
  ) {
    this.wrongWalk = opts.wrong?.walk ?? new Set<WrongWalk>();
    this.entries = {
      entry: (gva, level) => built.entries(gva, level),
      walk: (gva) => this.plainWalk(gva).levels.map((l) => l.pteGpa),
    };
    // The host dimension: the VM's memslots at their real HVAs, with the
    // declared backings (slot 0, bring-up's, is anonymous memory).
    const declared = new Map(sc.memslots.map((m) => [m.slot, m.backing]));
    const slotOf = (slot: number): Memslot =>
      modelSlot(g.vm.memslot(slot), BACKINGS[declared.get(slot) ?? 'anon'].page);
    const wrong = { ...(opts.wrong?.tdp ? { wrong: opts.wrong.tdp } : {}), wrongVm: opts.wrong?.vm };
    this.vm = new ModelVm({ ...tdpModelOptions(ctx.profile), record: false, ...wrong });
    this.vm.setSlot(slotOf(0));
    for (const m of sc.memslots) if (m.created === 'at-start') this.vm.setSlot(slotOf(m.slot));
    this.tdpDirty = tdpLogsDirty(ctx.profile);
    this.canReadStats = !!ctx.profile.capabilities.KVM_CAP_BINARY_STATS_FD;
    this.host = {
      ctx,
      sc,
      g,
      vm: this.vm,
      entries: this.entries,
      slotOf,
      manualProtect,
      tdpDirty: this.tdpDirty,
      translate: (gva) => this.kvmTranslate(gva),
      plainWalk: (gva) => this.plainWalk(gva),
    };
  }

  read(gpa: bigint): bigint {
    return this.g.mem.read64(gpa);
  }

  /** The model's walk of an access in the guest's tables as they are now. */
  walk(access: Parameters<typeof walkWith>[3], cfg: PagingConfig = this.cfg): WalkResult {
    return walkWith(this.wrongWalk, cfg, this.g.boot.tables.root, access, (gpa) => this.read(gpa));
  }

  /**
   * KVM_TRANSLATE as KVM does it (6.1 to 7.2: kvm_mmu_gva_to_gpa_system):
   * KVM's software walker (paging_tmpl.h) with access 0, a supervisor read,
   * whoever walks the guest's own accesses (the processor, QEMU TCG); SMAP
   * applies unless the vCPU's RFLAGS.AC is set, protection keys apply, W and
   * NX do not. The walker takes no canonical check: it indexes with the
   * address's bits 47:12 (56:12 with 5 levels), as the sign-extended address does.
   */
  kvmTranslate(gva: bigint): WalkResult {
    const top = this.cfg.levels === 5 ? 56n : 47n;
    const low = gva & ((1n << (top + 1n)) - 1n);
    const canon = (low >> top) & 1n ? BigInt.asUintN(64, low | ~((1n << (top + 1n)) - 1n)) : low;
    const eflagsAc = ((this.g.vcpu.getRegs().rflags >> 18n) & 1n) === 1n;
    // PKRU is the guest's once it has run its WRPKRU (its first instruction), 0 before.
    const cfg = { ...this.cfg, walker: 'kvm' as const, ...(this.ran ? {} : { pkru: 0 }) };
    return walkWith(
      this.wrongWalk,
      cfg,
      this.g.boot.tables.root,
      { gva: canon, kind: 'read', cpl: 0, eflagsAc },
      (gpa) => this.read(gpa),
    );
  }

  /** Where the tables lead for `gva` as they are now, whatever the access rights: no WP, SMEP, SMAP or keys. */
  plainWalk(gva: bigint): WalkResult {
    const plain = { ...this.cfg, cr0Wp: false, cr4Smep: false, cr4Smap: false, cr4Pke: false };
    return walkWith(new Set(), plain, this.g.boot.tables.root, { gva, kind: 'read', cpl: 0 }, (gpa) => this.read(gpa));
  }

  /** Guest memory as the host process sees it; a model that expects memory where the host has none gets a description instead. */
  peek(gpa: bigint, size: number): bigint | string {
    const st = this.g.mem.slotOf(gpa, size);
    const why = st?.untouchable(Number(gpa - st.gpa), size, false);
    return why ? `host memory ${why}` : BigInt.asUintN(size * 8, littleEndian(this.g.mem.bytes(gpa, size)));
  }

  /** Writes the program: each guest step's code (STEP_ACTIONS), then a sync carrying the step number. */
  load(): void {
    const { g, sc, cfg } = this;
    // Code for exec accesses: a `ret` at each target that memory backs.
    for (const s of sc.steps) {
      if (s.side !== 'guest' || s.kind !== 'access' || s.access !== 'exec') continue;
      for (let k = 0; k < (s.loop?.count ?? 1); k++) {
        const w = this.plainWalk(s.gva + BigInt(k) * (s.loop?.stride ?? 0n));
        if (
          w.ok &&
          g.mem.slotOf(w.gpa) &&
          !g.mem.slotOf(w.gpa)!.untouchable(Number(w.gpa - g.mem.slotOf(w.gpa)!.gpa), 1, true)
        ) {
          g.mem.write(w.gpa, [0xc3]);
          this.vm.hostWrote(w.gpa, 1);
        }
      }
    }
    // A data descriptor where each implicit read finds its LDT entry.
    for (const s of sc.steps) {
      if (s.side !== 'guest' || s.kind !== 'access' || !s.implicit) continue;
      const w = this.plainWalk(s.gva);
      if (w.ok && g.mem.slotOf(w.gpa, 8)) {
        g.mem.write64(w.gpa, IMPLICIT_DESCRIPTOR);
        this.vm.hostWrote(w.gpa, 8);
      }
    }
    const k = new Asm({ origin: Number(LAYOUT.code) });
    const u = new Asm({ origin: Number(LAYOUT.userCode) });
    if (cfg.cr4Pke) emitWrpkru(k, cfg.pkru);
    const emitter = { k, u, pkru: cfg.pkru, entries: this.entries };
    sc.steps.forEach((s, i) => {
      if (s.side === 'guest') guestAction(s).emit(emitter, s);
      channel.sync(k, i);
    });
    channel.done(k);
    g.mem.write(LAYOUT.userCode, u.assemble().code);
    g.load(k);
  }

  /** The step loop; stops at the first step the guest does not get past. */
  async steps(): Promise<void> {
    const { ctx, sc } = this;
    for (let i = 0; i < sc.steps.length; i++) {
      const s = sc.steps[i]!;
      const name = stepName(i, s);
      this.tdp?.begin();
      const statsBefore = s.stats && this.canReadStats ? this.readStats() : undefined;
      const modelBefore = s.stats && this.modelCounts(s.stats);
      const checkStats = () => {
        if (!s.stats) return;
        const model = modelBefore && { before: modelBefore, after: this.modelCounts(s.stats), thp: this.thpWhy() };
        compareStats(ctx, name, s.stats, statsBefore, statsBefore && this.readStats(), model);
      };
      const go =
        s.side === 'guest' ? await this.guestStep(i, s, name, checkStats) : await this.hostStep(i, s, name, checkStats);
      if (!go) return;
    }
    this.tdp?.begin();
    if (!(await this.finishPending())) return;
    this.tdp?.beforeRun();
    ctx.expect('guest finishes', 'done', describeStop(await this.g.run()));
    this.tdp?.afterRun();
    this.tdp?.step('end of the program');
  }

  /** The model's counts for the step's "model" stat expectations. */
  modelCounts(stats: StepStats): Map<string, bigint> {
    const out = new Map<string, bigint>();
    for (const [k, e] of Object.entries(stats)) if (e.op === 'model') out.set(k, modelPageCount(this.vm, k));
    return out;
  }

  thpWhy(): string | undefined {
    return thpUnconfirmed(this.sc, this.g, this.vm);
  }

  readStats(): Map<string, bigint> {
    return readStats([this.g.vm.stats(), this.g.vcpu.stats()]);
  }

  /** A run; KVM_RUN failing (EFAULT without a memory-fault exit) is an observation, not an error. */
  async runGuest(): Promise<Stop> {
    this.ran = true;
    this.tdp?.beforeRun();
    try {
      return await this.g.run();
    } catch (e) {
      if (e instanceof KvmError && e.call === 'KVM_RUN') return { kind: 'kvm_run_error', errno: e.code };
      throw e;
    } finally {
      this.tdp?.afterRun();
    }
  }

  /** Runs the guest, answering up to four MMIO exits (a read gets MMIO_FILL); the stop after them and the exits. */
  async runThroughMmio(): Promise<{ stop: Stop; mmioSeen: unknown[] }> {
    let stop = await this.runGuest();
    const mmioSeen: unknown[] = [];
    while (stop.kind === 'exit' && stop.exit.reason === 'mmio' && mmioSeen.length < 4) {
      const e = stop.exit;
      mmioSeen.push({
        gpa: e.gpa,
        len: e.len,
        isWrite: e.isWrite,
        ...(e.isWrite ? { data: e.data.subarray(0, e.len) } : {}),
      });
      if (!e.isWrite) e.complete(MMIO_FILL);
      stop = await this.runGuest();
    }
    return { stop, mmioSeen };
  }

  /** Whether the guest stopped at step `i`'s sync; if not, that is recorded. */
  reachedSync(stop: Stop, i: number, name: string): boolean {
    if (stop.kind === 'sync' && stop.id === BigInt(i)) return true;
    this.ctx.expect(`${name}: guest reaches the end of the step`, `sync ${i}`, show(observedStop(stop)));
    return false;
  }

  /** A guest step: predict (accesses), run, observe and compare. Returns whether the scenario goes on. */
  async guestStep(i: number, s: GuestSideStep, name: string, checkStats: () => void): Promise<boolean> {
    const { ctx, g } = this;
    if (s.kind === 'access' && s.loop) return this.loopStep(i, s, name, checkStats);
    const pred = s.kind === 'access' ? this.predict(s, name) : undefined;
    const hadPending = this.pending !== undefined;
    if (!(await this.finishPending())) return false;
    // A #GP leaves CR2 as it was when the step began.
    const cr2Before = pred?.expectFault === 'gp' ? g.vcpu.getSregs().cr2 : undefined;
    g.clearExceptions();
    this.trace?.clear();
    const { stop, mmioSeen } = await this.runThroughMmio();
    if (pred) ctx.expect(`${name}: MMIO exits`, pred.mmio ? [pred.mmio] : [], mmioSeen);
    if (pred?.hostFault && s.kind === 'access') {
      // The vCPU stopped at the access; it redoes it on its next run.
      const seen = observedStop(stop);
      ctx.expect(`${name}: KVM_RUN stops for the missing host memory`, pred.hostFault.stop, seen);
      const fault = pred.hostFault.stop as { exit?: string } | undefined;
      if (fault?.exit === 'memory_fault' && (seen as { exit?: string } | undefined)?.exit === 'memory_fault') {
        // The memory-fault record field by field, so a difference names the field.
        for (const f of ['gpa', 'size', 'flags'] as const)
          ctx.expect(
            `${name}: memory_fault.${f}`,
            (pred.hostFault.stop as Record<string, unknown>)[f],
            (seen as Record<string, unknown>)[f],
          );
      }
      if (!same(pred.hostFault.stop, seen)) return false;
      ctx.note(`${name}: ${pred.hostFault.why}`);
      this.shadow?.stop(name, 'an access that stops for missing host memory is not in the shadow model');
      this.pending = { step: i, name, access: s, walk: pred.walk, gpa: pred.hostFault.gpa };
      checkStats();
      TdpFollow.after(this.tdp, ctx, name, false, s.tdp);
      return true;
    }
    if (!this.reachedSync(stop, i, name)) return false;
    checkStats();
    const paging = guestAction(s).paging;
    if (paging) this.cfg = paging(this.cfg, s);
    this.old.step(s);
    if (pred && s.kind === 'access' && stop.kind === 'sync') {
      this.compareAccess(s, name, pred, stop.values[0]!, cr2Before);
    }
    this.shadow?.step(s, pred !== undefined && pred.expectFault !== false, name);
    TdpFollow.after(this.tdp, ctx, name, !hadPending, s.tdp);
    return true;
  }

  /** A loop step: the model predicts every access in turn (loop.ts), the guest makes them in one run. */
  async loopStep(
    i: number,
    s: Extract<GuestSideStep, { kind: 'access' }>,
    name: string,
    checkStats: () => void,
  ): Promise<boolean> {
    if (!(await this.finishPending())) return false;
    const env = {
      ctx: this.ctx,
      g: this.g,
      vm: this.vm,
      walk: (a: Parameters<typeof walkWith>[3], read: (gpa: bigint) => bigint) =>
        walkWith(this.wrongWalk, this.cfg, this.g.boot.tables.root, a, read),
      from: (n: string) => this.predictFrom(n),
      walker: this.cfg.walker,
    };
    const loop = predictLoop(env, s, name);
    this.g.clearExceptions();
    const stop = await this.runGuest();
    if (!this.reachedSync(stop, i, name)) return false;
    checkStats();
    if (stop.kind === 'sync') compareLoop(env, s, name, loop, stop.values[0]!);
    this.shadow?.stop(name, 'a loop step is not in the shadow model');
    TdpFollow.after(this.tdp, this.ctx, name, true, s.tdp);
    return true;
  }

  /** A host step (the vCPU is stopped at the previous sync), then the run to its own sync. */
  async hostStep(i: number, s: HostSideStep, name: string, checkStats: () => void): Promise<boolean> {
    const hadPending = this.pending !== undefined;
    hostAction(s).act(this.host, s, name);
    this.old.step(s);
    this.tdp?.acted(s);
    // Host steps have a sync too; let the guest reach the next one (after
    // redoing an access that stopped for missing host memory).
    if (!(await this.finishPending())) return false;
    if (!this.reachedSync(await this.runGuest(), i, name)) return false;
    checkStats();
    this.shadow?.step(s, false, name);
    TdpFollow.after(this.tdp, this.ctx, name, !hadPending, s.tdp);
    return true;
  }

  predict(s: AccessStep, name: string): Prediction {
    const implicit = s.implicit ? { implicitSupervisor: true } : {};
    const w = this.walk({ gva: s.gva, kind: s.access, cpl: s.cpl, eflagsAc: s.eflagsAc, size: s.size, ...implicit });
    return predictAccess(s, w, this.predictFrom(name));
  }

  predictFrom(name: string): PredictFrom {
    return {
      vm: this.vm,
      profile: this.ctx.profile,
      walker: this.cfg.walker,
      peek: (gpa, size) => this.peek(gpa, size),
      entry: (gva, level) => this.built.entries(gva, level),
      note: (m) => this.ctx.note(`${name}: ${m}`),
    };
  }

  /** The access's observations against the prediction (exceptions, value read, PTEs, walker trace); then its dirty pages. */
  compareAccess(s: AccessStep, name: string, pred: Prediction, value: bigint, cr2Before: bigint | undefined): void {
    const { ctx, g, cfg } = this;
    const exc = g.exceptions();
    const gpa = this.old.allowed(s, pred);
    if (exc.some((e) => e.vector === 14)) this.old.forgetPage(s.gva);
    if (gpa !== undefined && exc.length === 0) {
      // The old translation, which the architecture allows until something invalidates it.
      ctx.note(
        `${name}: no fault: the translation of an earlier access to this page (GPA ${hex(gpa)}) was used; the tables changed since by a host write and nothing invalidated it, so the architecture allows it beside the model's walk (${describeWalk(pred.walk)}); PTEs and the walker trace are not compared for this access`,
      );
      if (s.access === 'read' && !s.implicit)
        ctx.expect(`${name}: value read (old translation)`, this.peek(gpa, s.size), BigInt.asUintN(s.size * 8, value));
      this.trace?.take();
      return;
    }
    const expected =
      pred.expectFault === false
        ? []
        : pred.expectFault === 'gp'
          ? [{ vector: 13, errorCode: 0n, cr2: cr2Before! }]
          : [{ vector: 14, errorCode: BigInt(pred.expectFault), cr2: pred.walk.ok ? s.gva : pred.walk.cr2 }];
    ctx.expect(`${name}: exceptions`, expected, exc.map(pick));
    if (s.access === 'read' && !s.implicit)
      ctx.expect(`${name}: value read`, pred.expectValue ?? 0n, BigInt.asUintN(s.size * 8, value));
    // A processor may set A on the entries a faulting walk used; KVM's walker never does.
    const mayA = new Set(accessedLatitude(pred.walk, cfg.walker));
    const ptesSeen = pred.expectPtes.map((p) => ({ level: p.level, at: p.at, value: this.read(p.at) }));
    const ptesExpected = pred.expectPtes.map((p, k) => {
      const seen = ptesSeen[k]!.value;
      if (!mayA.has(p.at) || seen !== (p.value | PTE_A) || seen === p.value)
        return { level: p.level, at: p.at, value: p.value };
      ctx.note(
        `${name}: the ${cfg.walker} walker set A on the level-${p.level} entry at ${hex(p.at)} of a faulting walk (allowed)`,
      );
      return { level: p.level, at: p.at, value: seen };
    });
    ctx.expect(`${name}: PTEs after`, ptesExpected, ptesSeen);
    if (pred.walk.ok) {
      for (const a of pred.walk.adWrites) this.vm.markDirty(a.pteGpa);
      if (s.access === 'write' && !pred.mmio) this.vm.markDirty(pred.walk.gpa);
    }
    if (this.trace) compareTrace(ctx, name, s.gva, pred.walk, this.trace.take());
    ctx.note(`${name}: model ${describeWalk(pred.walk)}`);
  }

  /** Runs an access that stopped for missing host memory again; returns whether the scenario goes on. */
  async finishPending(): Promise<boolean> {
    const p = this.pending;
    if (!p) return true;
    const { ctx, g, vm } = this;
    this.pending = undefined;
    // The redone access walks the guest's tables again: a host step in
    // between may have changed them, and then it faults in the guest (or
    // stops elsewhere) before it reaches the missing memory.
    const w = this.walk({
      gva: p.access.gva,
      kind: p.access.access,
      cpl: p.access.cpl,
      eflagsAc: p.access.eflagsAc,
      size: p.access.size,
    });
    if (!w.ok || w.gpa !== p.gpa) return this.redoChanged(p);
    if (!vm.slotAt(p.gpa, p.access.size)) {
      // A host step deleted or moved the slot: the redone access reaches no memory (MMIO).
      ctx.note(`${p.name}: no memslot holds GPA ${hex(p.gpa)} any more; the redone access is predicted again`);
      return this.redoChanged(p, true);
    }
    const stop = await this.runGuest();
    if (vm.fault(p.gpa, p.access.access).kind === 'efault') {
      // Nothing restored the host memory: the access fails again.
      const gmem = vm.slotAt(p.gpa, 1)?.backing.kind === 'guest_memfd';
      const again = hostFaultPath(ctx.profile, p.access.access, p.access.cpl, p.gpa, p.access.size, gmem);
      ctx.expect(`${p.name}: run again without the host memory`, again.stop, observedStop(stop));
      ctx.note(
        `${p.name}: the vCPU cannot get past this access until a host step restores its memory; the steps after it are not run`,
      );
      return false;
    }
    if (stop.kind !== 'sync' || stop.id !== BigInt(p.step)) {
      ctx.expect(`${p.name}: redone on the next run, the access completes`, `sync ${p.step}`, show(observedStop(stop)));
      return false;
    }
    const gpa = p.gpa;
    ctx.expect(`${p.name}: redone: exceptions`, [], g.exceptions().map(pick));
    const bytes = (gpa: bigint) => littleEndian(g.mem.bytes(gpa, p.access.size));
    if (p.access.access === 'read')
      ctx.expect(
        `${p.name}: redone: value read`,
        BigInt.asUintN(p.access.size * 8, bytes(gpa)),
        BigInt.asUintN(p.access.size * 8, stop.values[0]!),
      );
    if (p.access.access === 'write') {
      ctx.expect(`${p.name}: redone: value in memory`, p.access.value, bytes(gpa));
      vm.markDirty(gpa);
    }
    for (const a of p.walk.adWrites) vm.markDirty(a.pteGpa);
    vm.fault(gpa, p.access.access);
    return true;
  }

  /** A stopped access redone after a host step changed its walk: predicted and compared as a new access of its step. */
  async redoChanged(p: Pending, slotGone = false): Promise<boolean> {
    const { ctx, g } = this;
    if (!slotGone)
      ctx.note(`${p.name}: a host step changed the guest's tables; the redone access is predicted again from them`);
    const pred = this.predict(p.access, p.name);
    const cr2Before = pred.expectFault === 'gp' ? g.vcpu.getSregs().cr2 : undefined;
    g.clearExceptions();
    this.trace?.clear();
    const { stop, mmioSeen } = await this.runThroughMmio();
    ctx.expect(`${p.name}: redone: MMIO exits`, pred.mmio ? [pred.mmio] : [], mmioSeen);
    if (pred.hostFault) {
      ctx.expect(
        `${p.name}: redone: KVM_RUN stops for the missing host memory`,
        pred.hostFault.stop,
        observedStop(stop),
      );
      return false;
    }
    if (!this.reachedSync(stop, p.step, p.name)) return false;
    if (stop.kind === 'sync')
      this.compareAccess({ ...p.access }, `${p.name}: redone`, pred, stop.values[0]!, cr2Before);
    return true;
  }
}

/**
 * Compares a step's stat expectations with the change of each stat over the
 * step. A stat this host's stats do not describe (statNotApplicable) is
 * reported as not applicable here, in the notes; it is never compared.
 */
function compareStats(
  ctx: CheckContext,
  name: string,
  want: StepStats,
  before: Map<string, bigint> | undefined,
  after: Map<string, bigint> | undefined,
  model?: { before: Map<string, bigint>; after: Map<string, bigint>; thp: string | undefined },
): void {
  for (const [stat, given] of Object.entries(want)) {
    let e = given;
    if (given.op === 'model') {
      // The model's delta, then compared as an exact one.
      e = { op: '=', delta: model!.after.get(stat)! - model!.before.get(stat)! };
      ctx.note(`${name}: stats ${stat}: the model says ${showStatExpect(e)}`);
    }
    const why =
      statNotApplicable(stat, ctx.profile, !!before?.has(stat) && !!after?.has(stat)) ??
      (given.op === 'model' ? model!.thp : undefined);
    const shown = showStatExpect(e);
    if (why) {
      ctx.note(`${name}: stats ${stat} ${shown}: not applicable here (${why})`);
      continue;
    }
    const delta = after!.get(stat)! - before!.get(stat)!;
    ctx.note(`${name}: stats ${stat} changed by ${showDelta(delta)}`);
    // A delta that meets a range (">=1") is shown as the range itself, so the differ sees equal values.
    ctx.expect(`${name}: stats ${stat}`, shown, statHolds(e, delta) ? shown : showDelta(delta));
  }
}

/** A stop in the terms hostFaultPath predicts. */
function observedStop(stop: Stop): unknown {
  if (stop.kind === 'kvm_run_error') return { kvmRun: stop.errno };
  if (stop.kind === 'exit' && stop.exit.reason === 'memory_fault')
    return { exit: 'memory_fault', gpa: stop.exit.gpa, size: stop.exit.size, flags: stop.exit.flags };
  return describeStop(stop);
}

function pick(e: ExceptionRecord) {
  return { vector: e.vector, errorCode: e.errorCode, cr2: e.cr2 };
}

function littleEndian(b: Uint8Array): bigint {
  let v = 0n;
  for (let i = b.length - 1; i >= 0; i--) v = (v << 8n) | BigInt(b[i]!);
  return v;
}

/** Finds KVM's walk of `gva` among the step's events and compares it with the model's. */
function compareTrace(ctx: CheckContext, name: string, gva: bigint, w: WalkResult, events: TraceEvent[]): void {
  const walks = tracedWalks(events).filter((t) => t.addr === gva);
  const model = modelAsTrace(w);
  if (!w.ok && accessException(w).vector === 13) {
    // A non-canonical address raises #GP before any walk.
    if (walks.length === 0) ctx.note(`${name}: no walk for a non-canonical address (#GP), as the model says`);
    else
      ctx.expect(
        `${name}: KVM walker trace`,
        'no kvm_mmu_pagetable_walk (#GP before any walk)',
        `${walks.length} walk(s)`,
      );
    return;
  }
  if (walks.length === 0) {
    // A translation KVM still holds (a shadow page or a cached walk) is used
    // without walking, as a TLB hit is: allowed when the walk would change
    // nothing and cannot fault. Anything else must have been walked.
    if (w.ok && w.adWrites.length === 0) {
      ctx.note(`${name}: served from a cached translation; KVM did not walk (the model's walk sets no A/D bit)`);
      return;
    }
    ctx.expect(`${name}: KVM walker trace`, model, 'no kvm_mmu_pagetable_walk for this address');
    return;
  }
  // The access's own walk is the first one for its address; a retried
  // instruction may walk again, and that walk must agree as well.
  const kvm = walks[0]!;
  ctx.expect(`${name}: KVM walker trace`, model, {
    elements: kvm.elements,
    ...(kvm.error !== undefined ? { error: kvm.error } : {}),
    accessed: kvm.accessed,
    dirty: kvm.dirty,
  });
}

/** A scenario as a check; `trace` makes the walker-tracepoint variant. */
export function scenarioCheck(sc: Scenario, opts: EngineOptions = {}): Check {
  const race = sc.race;
  if (race) {
    return {
      name: opts.trace ? `${sc.name}:walker-trace` : sc.name,
      description: sc.description,
      arch: 'x86_64',
      needs: ['dirty_log'],
      run: (ctx) => {
        if (opts.trace)
          throw new NotApplicable('a race has no single guest walk per step to compare with the walker tracepoints');
        return runRace(ctx, { ...sc, race }, opts.wrong?.race, opts.wrong?.tdp);
      },
    };
  }
  return {
    name: opts.trace ? `${sc.name}:walker-trace` : sc.name,
    description: opts.trace ? `${sc.description} — KVM's walker tracepoints against the model's walk` : sc.description,
    arch: 'x86_64',
    needs: opts.trace ? ['exception_log', 'ad_bits', 'walker_tracepoints'] : ['exception_log', 'ad_bits'],
    run: (ctx) => runScenario(ctx, sc, opts),
  };
}

// The differential engine: runs a scenario on real KVM one step at a time and
// compares each step's observations with the model's prediction.
//
// The guest program is linear: each guest step's code is followed by a sync
// on the channel, so the vCPU is stopped between steps; host steps happen at
// those stops. Before a step the model predicts from the guest's tables as
// they are in memory right then; after it the engine observes the exception
// log, the value read, the PTEs along the walk, dirty logs and translations.
// A TDP model over the same memslots (hostModel) follows host changes to the
// slots' memory and says which accesses find no host page (hostFaultPath:
// what the guest sees then). Steps may state expected stats deltas
// (compareStats). Multi-vCPU races run in race.ts.
import { Asm } from '../arch/x86/asm.js';
import { channel, describeStop, X86Guest, type ExceptionRecord, type GuestStop } from '../arch/x86/guest.js';
import { LAYOUT } from '../arch/x86/layout.js';
import { describePte, PTE_A, PTE_D } from '../arch/x86/pte.js';
import { TraceSession, type TraceEvent } from '../observe/tracefs.js';
import { accessException, accessedLatitude, decodeErrorCode, PFERR, walkWith, type PagingConfig, type WalkResult } from '../model/walk.js';
import { bringUpOptions, buildScenarioTables, slotBacking, pagingConfigFor } from '../scenario/build.js';
import { showDelta, showStatExpect, statHolds, statNotApplicable } from '../scenario/stats.js';
import type { GuestStep, Scenario, Step, StepStats } from '../scenario/types.js';
import { MADV, MEM, PROT } from '../uapi/uapi.js';
import { KvmError } from '../kvm/sys.js';
import { Memslots, type Memslot as ModelSlot } from '../model/memslots.js';
import { Tdp } from '../model/tdp.js';
import type { Wrong, WrongTdp, WrongWalk } from '../model/wrong.js';
import { guestWalkerOf, type HostProfile } from '../probe/probe.js';
import { same, show } from './differ.js';
import { runRace } from './race.js';
import { NotApplicable, type Check, type CheckContext } from './types.js';

const PAGE = 0x1000n;
const hex = (v: bigint | number) => `0x${v.toString(16)}`;

export const WALKER_EVENTS = [
  'kvmmmu/kvm_mmu_pagetable_walk',
  'kvmmmu/kvm_mmu_paging_element',
  'kvmmmu/kvm_mmu_set_accessed_bit',
  'kvmmmu/kvm_mmu_set_dirty_bit',
  'kvmmmu/kvm_mmu_walker_error',
] as const;

export interface EngineOptions {
  /** Compare KVM's walker tracepoints with the model's walk (needs tracefs). */
  trace?: boolean;
  /** Test-only: a deliberately wrong model (walk, TDP, race; model/wrong.ts). */
  wrong?: Wrong;
}

/** One walk as KVM's walker tracepoints show it. */
export interface TracedWalk {
  addr: bigint;
  pferr: number;
  elements: { level: number; pte: bigint }[];
  error?: number;
  accessed: bigint[];
  dirty: bigint[];
}

/** Groups walker events into walks (each starts with kvm_mmu_pagetable_walk). */
export function tracedWalks(events: readonly TraceEvent[]): TracedWalk[] {
  const out: TracedWalk[] = [];
  let cur: TracedWalk | undefined;
  for (const e of events) {
    const f = e.fields;
    switch (e.id) {
      case 'kvmmmu/kvm_mmu_pagetable_walk':
        cur = { addr: f.addr as bigint, pferr: Number(f.pferr), elements: [], accessed: [], dirty: [] };
        out.push(cur);
        break;
      case 'kvmmmu/kvm_mmu_paging_element':
        cur?.elements.push({ level: Number(f.level), pte: f.pte as bigint });
        break;
      case 'kvmmmu/kvm_mmu_walker_error':
        if (cur) cur.error = Number(f.pferr);
        break;
      case 'kvmmmu/kvm_mmu_set_accessed_bit':
        cur?.accessed.push(f.gpa as bigint);
        break;
      case 'kvmmmu/kvm_mmu_set_dirty_bit':
        cur?.dirty.push(f.gpa as bigint);
        break;
    }
  }
  return out;
}

/** The model's walk in the shape KVM's tracepoints report it. */
export function modelAsTrace(w: WalkResult): Omit<TracedWalk, 'addr' | 'pferr'> {
  const accessed: bigint[] = [];
  const dirty: bigint[] = [];
  for (const a of w.adWrites) {
    if ((a.new & PTE_A) && !(a.old & PTE_A)) accessed.push(a.pteGpa);
    if ((a.new & PTE_D) && !(a.old & PTE_D)) dirty.push(a.pteGpa);
  }
  return {
    elements: w.levels.map((l) => ({ level: l.level, pte: l.pte })),
    ...(w.ok ? {} : { error: w.errorCode }),
    accessed,
    dirty,
  };
}

function describeWalk(w: WalkResult): string {
  const lv = w.levels.map((l) => `L${l.level} ${hex(l.pteGpa)}=${hex(l.pte)} [${describePte(l.pte, l.level)}]`).join('; ');
  if (w.ok) return `${lv} -> gpa ${hex(w.gpa)}`;
  if (accessException(w).vector === 13) return '#GP(0): not canonical, no walk';
  return `${lv} -> #PF ${decodeErrorCode(w.errorCode)} (${w.reason})`;
}

interface Prediction {
  step: number;
  what: string;
  walk: WalkResult;
  /** false: no exception; a number: #PF with this error code; 'gp': #GP(0) with CR2 unchanged. */
  expectFault: false | number | 'gp';
  expectValue?: bigint | string;
  /** The MMIO exit the access should cause, if any. */
  mmio?: { gpa: bigint; len: number; isWrite: boolean; data?: Uint8Array };
  /** The access needs host memory that is not there: KVM_RUN stops as this says, and the access is redone on the next run. */
  hostFault?: HostFaultPrediction;
  expectPtes: { level: number; at: bigint; value: bigint }[];
}

/** What the engine returns for MMIO reads (truncated to the access size). */
export const MMIO_FILL = 0x5a5a5a5a5a5a5a5an;

function leBytes(v: bigint, n: number): Uint8Array {
  return Uint8Array.from({ length: n }, (_, i) => Number((v >> BigInt(8 * i)) & 0xffn));
}

/** Writes the code of one guest step; returns nothing to predict for non-access steps. */
/** Where the guest's own page-table writes go: the GPAs of the entries a step names. */
interface EntryFinder {
  /** The entry at `level` for `gva`. */
  entry(gva: bigint, level: number): bigint;
  /** Every entry the walk of `gva` reads. */
  walk(gva: bigint): bigint[];
}

/** A store of 8 bytes by the guest to a page-table entry, through the identity map: (old & ~clear) | set, or value. */
function emitPteStore(k: Asm, at: bigint, change: { set: bigint; clear: bigint; value?: bigint }): void {
  if (at + 8n > LAYOUT.identityEnd) throw new Error(`the entry at ${hex(at)} is outside the guest's identity map; a guest step cannot write it`);
  k.movImm('rbx', at);
  if (change.value !== undefined) k.movImm('rax', change.value);
  else {
    k.load(8, 'rax', { base: 'rbx' });
    k.movImm('rcx', BigInt.asUintN(64, ~change.clear)).and('rax', 'rcx');
    k.movImm('rcx', change.set).or('rax', 'rcx');
  }
  k.store(8, { base: 'rbx' }, 'rax');
}

function emitGuestStep(k: Asm, u: Asm, s: GuestStep, pkru: number, entries: EntryFinder): void {
  switch (s.kind) {
    case 'write-pte':
      emitPteStore(k, entries.entry(s.gva, s.level), s);
      return;
    case 'clear-ad':
      for (const at of entries.walk(s.gva)) emitPteStore(k, at, { set: 0n, clear: PTE_A | PTE_D });
      return;
    case 'access': {
      const body = (a: Asm) => {
        a.movImm('rbx', s.gva);
        if (s.access === 'read') a.load(s.size, 'rsi', { base: 'rbx' });
        else if (s.access === 'write') a.movImm('rax', s.value).store(s.size, { base: 'rbx' }, 'rax');
        else a.call('rbx');
      };
      k.movImm('rsi', 0);
      if (s.cpl === 3) channel.userAccess(k, u, body, s.eflagsAc ? 1n << 18n : 2n);
      else if (s.eflagsAc) {
        // EFLAGS.AC at CPL 0 through the flags image (STAC would need SMAP).
        k.pushfq().pop('rax').bts('rax', 18).push('rax').popfq();
        channel.guarded(k, body);
        k.pushfq().pop('rax').btr('rax', 18).push('rax').popfq();
      } else channel.guarded(k, body);
      return;
    }
    case 'invlpg':
      k.movImm('rbx', s.gva).invlpg({ base: 'rbx' });
      return;
    case 'reload-cr3':
      k.movFromCr('rax', 3).movToCr(3, 'rax');
      return;
    case 'set-cr0-wp':
      k.movFromCr('rax', 0);
      if (s.value) k.bts('rax', 16);
      else k.btr('rax', 16);
      k.movToCr(0, 'rax');
      return;
    case 'set-cr4': {
      const bit = { smep: 20, smap: 21, pke: 22 }[s.bit];
      k.movFromCr('rax', 4);
      if (s.value) k.bts('rax', bit);
      else k.btr('rax', bit);
      k.movToCr(4, 'rax');
      if (s.bit === 'pke' && s.value) emitWrpkru(k, pkru);
      return;
    }
  }
}

/**
 * A scenario's explicit #PF error code as the host's walker reports it: QEMU
 * TCG reports reserved-bit faults without P (README, Findings); the model does
 * the same for its own predictions (GuestWalker 'qemu-tcg').
 */
function walkerErrorCode(fault: number | false, walker: PagingConfig['walker'], note: (m: string) => void): number | false {
  if (fault === false || walker !== 'qemu-tcg' || (fault & PFERR.RSVD) === 0 || (fault & PFERR.P) === 0) return fault;
  note(`expected error code ${hex(fault)} taken as ${hex(fault & ~PFERR.P)}: QEMU TCG reports reserved-bit faults without P`);
  return fault & ~PFERR.P;
}

/** PKRU := value (WRPKRU needs CR4.PKE = 1, ECX = EDX = 0). */
function emitWrpkru(k: Asm, value: number): void {
  k.movImm('rax', BigInt(value >>> 0)).movImm('rcx', 0).movImm('rdx', 0).wrpkru();
}

function stepName(i: number, s: Step): string {
  if (s.side === 'host') return `step ${i} host ${s.kind}${'gva' in s ? ` ${hex(s.gva)}` : ''}`;
  if (s.kind === 'access') return `step ${i} ${s.access}${s.size * 8} ${hex(s.gva)} cpl${s.cpl}`;
  return `step ${i} ${s.kind}`;
}

/**
 * Runs a scenario. With `trace`, KVM's walker tracepoints are captured per
 * step and compared element by element with the model's walk.
 */
export async function runScenario(ctx: CheckContext, sc: Scenario, opts: EngineOptions = {}): Promise<void> {
  const cpu = ctx.profile.cpu;
  if (!cpu) throw new NotApplicable('x86 scenarios need an x86 host');
  if (opts.trace && ctx.profile.tdp.enabled) {
    throw new NotApplicable("with TDP the hardware walks the guest's tables; KVM's walker tracepoints see only the accesses it emulates");
  }
  if (sc.paging.levels === 5 && !cpu.la57) throw new NotApplicable('5-level paging needs LA57, which this host does not offer');
  for (const b of ['smep', 'smap', 'pke'] as const) {
    const feature = b === 'pke' ? 'pku' : b;
    const used = sc.paging.cr4[b] || sc.steps.some((s) => s.side === 'guest' && s.kind === 'set-cr4' && s.bit === b && s.value);
    if (used && !cpu[feature]) throw new NotApplicable(`CR4.${b.toUpperCase()} needs ${feature.toUpperCase()}, which this host's KVM does not offer`);
  }
  if (sc.mappings.some((m) => m.page === '1G') && !cpu.pdpe1gb) throw new NotApplicable('1 GiB pages need PDPE1GB, which this host does not offer');

  const g = X86Guest.create(ctx.kvm, { ...bringUpOptions(sc), memSize: Number(LAYOUT.identityEnd) });
  let trace: TraceSession | undefined;
  try {
    const manualProtect = sc.steps.some((s) => s.side === 'host' && s.kind === 'clear-dirty-log');
    if (manualProtect) g.vm.enableManualDirtyLogProtect();
    for (const m of sc.memslots) {
      const backing = slotBacking(m.backing);
      g.vm.addMemslot({
        slot: m.slot, gpa: m.gpa, size: Number(m.size), backing,
        flags: (m.logDirty ? MEM.KVM_MEM_LOG_DIRTY_PAGES : 0) | (m.readonly ? MEM.KVM_MEM_READONLY : 0),
      });
    }
    const built = buildScenarioTables(sc, g.mem, g.boot);
    let cfg: PagingConfig = { ...pagingConfigFor(sc, cpu), walker: guestWalkerOf(ctx.profile) };
    if (cfg.walker === 'qemu-tcg') ctx.note('the guest\'s walks are QEMU TCG\'s (TDP on an emulated CPU): the model applies TCG\'s measured deviations (README, Findings)');
    else if (cfg.walker === 'cpu') ctx.note('the guest\'s walks are the processor\'s (TDP): A bits a faulting walk may set are accepted either way');
    const wrongWalk = opts.wrong?.walk ?? new Set<WrongWalk>();
    const read = (gpa: bigint) => g.mem.read64(gpa);
    // Where the tables lead for `gva` as they are now, whatever the access rights: no WP, SMEP, SMAP or keys.
    const plainWalk = (gva: bigint) =>
      walkWith(new Set(), { ...cfg, cr0Wp: false, cr4Smep: false, cr4Smap: false, cr4Pke: false }, g.boot.tables.root, { gva, kind: 'read', cpl: 0 }, read);
    const finder: EntryFinder = {
      entry: (gva, level) => built.entries(gva, level),
      walk: (gva) => plainWalk(gva).levels.map((l) => l.pteGpa),
    };

    // Code for exec accesses: a `ret` at each target that memory backs.
    for (const s of sc.steps) {
      if (s.side !== 'guest' || s.kind !== 'access' || s.access !== 'exec') continue;
      const w = plainWalk(s.gva);
      if (w.ok && g.mem.slotOf(w.gpa)) g.mem.write(w.gpa, [0xc3]);
    }

    // One program: step code, then a sync carrying the step number.
    const k = new Asm({ origin: Number(LAYOUT.code) });
    const u = new Asm({ origin: Number(LAYOUT.userCode) });
    if (cfg.cr4Pke) emitWrpkru(k, cfg.pkru);
    sc.steps.forEach((s, i) => {
      if (s.side === 'guest') emitGuestStep(k, u, s, cfg.pkru, finder);
      channel.sync(k, i);
    });
    channel.done(k);
    g.mem.write(LAYOUT.userCode, u.assemble().code);
    g.load(k);

    if (opts.trace) trace = TraceSession.open(ctx.target.fs, WALKER_EVENTS, [await g.vcpu.tid()]);

    // The model's view of guest-physical memory: which slot backs which GPAs.
    const modelSlots = new Map<number, { gpa: bigint; size: bigint; readonly: boolean; logDirty: boolean }>([
      [0, { gpa: 0n, size: LAYOUT.identityEnd, readonly: false, logDirty: false }],
      ...sc.memslots.map((m) => [m.slot, { gpa: m.gpa, size: m.size, readonly: m.readonly, logDirty: m.logDirty }] as const),
    ]);
    const backing = (gpa: bigint, len: number) =>
      [...modelSlots.values()].find((m) => gpa >= m.gpa && gpa + BigInt(len) <= m.gpa + m.size);

    // The host dimension: a TDP model over the same memslots and host memory
    // (src/model/tdp.ts). It says which guest accesses find their host memory
    // (after munmap / mprotect / madvise) and which GFNs a host change zaps.
    const host = hostModel(ctx, g, sc, opts.wrong?.tdp);
    // Under TDP the dirty log is what KVM's TDP MMU logs; the TDP model predicts it.
    const tdpDirty = ctx.profile.tdp.enabled && ctx.profile.arch === 'x86_64';
    /** Guest memory as the host process sees it; a model that expects memory where the host has none gets a description instead. */
    const peek = (gpa: bigint, size: number): bigint | string => {
      const st = g.mem.slotOf(gpa, size);
      const why = st?.untouchable(Number(gpa - st.gpa), size, false);
      return why ? `host memory ${why}` : BigInt.asUintN(size * 8, littleEndian(g.mem.bytes(gpa, size)));
    };

    // Pages each dirty-logged slot should report at its next get-dirty-log.
    const expectedDirty = new Map<number, Set<bigint>>();
    const markDirty = (gpa: bigint) => {
      const slot = [...modelSlots].find(([, m]) => m.logDirty && gpa >= m.gpa && gpa < m.gpa + m.size)?.[0];
      if (slot === undefined) return;
      const set = expectedDirty.get(slot) ?? new Set<bigint>();
      set.add(gpa & ~(PAGE - 1n));
      expectedDirty.set(slot, set);
    };

    // Stats around a step: read only for steps that state expectations.
    const readStats = (): Map<string, bigint> => {
      const out = new Map<string, bigint>();
      for (const r of [g.vm.stats(), g.vcpu.stats()]) for (const [k, v] of r.read()) if (typeof v === 'bigint') out.set(k, v);
      return out;
    };
    const canReadStats = !!ctx.profile.capabilities.KVM_CAP_BINARY_STATS_FD;

    /** A run; KVM_RUN failing (EFAULT without a memory-fault exit) is an observation, not an error. */
    const runGuest = async (): Promise<GuestStop | { kind: 'kvm_run_error'; errno: string }> => {
      try {
        return await g.run();
      } catch (e) {
        if (e instanceof KvmError && e.call === 'KVM_RUN') return { kind: 'kvm_run_error', errno: e.code };
        throw e;
      }
    };
    // An access that stopped for missing host memory, redone by the next run.
    let pending: { step: number; name: string; access: AccessStep; walk: WalkResult; gpa: bigint } | undefined;
    const finishPending = async (): Promise<boolean> => {
      if (!pending) return true;
      const p = pending;
      pending = undefined;
      const stop = await runGuest();
      if (host.fault(p.gpa, p.access.access).kind === 'efault') {
        // Nothing restored the host memory: the access fails again.
        const again = hostFaultPath(ctx.profile, p.access.access, p.access.cpl, p.gpa, p.access.size);
        ctx.expect(`${p.name}: run again without the host memory`, again.stop, observedStop(stop));
        ctx.note(`${p.name}: the vCPU cannot get past this access until a host step restores its memory; the steps after it are not run`);
        return false;
      }
      if (stop.kind !== 'sync' || stop.id !== BigInt(p.step)) {
        ctx.expect(`${p.name}: redone on the next run, the access completes`, `sync ${p.step}`, show(observedStop(stop)));
        return false;
      }
      const w = p.walk;
      const gpa = p.gpa;
      ctx.expect(`${p.name}: redone: exceptions`, [], g.exceptions().map(pick));
      const bytes = (gpa: bigint) => littleEndian(g.mem.bytes(gpa, p.access.size));
      if (p.access.access === 'read') ctx.expect(`${p.name}: redone: value read`, BigInt.asUintN(p.access.size * 8, bytes(gpa)), BigInt.asUintN(p.access.size * 8, stop.values[0]!));
      if (p.access.access === 'write') {
        ctx.expect(`${p.name}: redone: value in memory`, p.access.value, bytes(gpa));
        markDirty(gpa);
      }
      for (const a of w.adWrites) markDirty(a.pteGpa);
      host.fault(gpa, p.access.access);
      return true;
    };
    for (let i = 0; i < sc.steps.length; i++) {
      const s = sc.steps[i]!;
      const name = stepName(i, s);
      const statsBefore = s.stats && canReadStats ? readStats() : undefined;
      const checkStats = () => {
        if (s.stats) compareStats(ctx, name, s.stats, statsBefore, statsBefore && readStats());
      };
      let pred: Prediction | undefined;
      if (s.side === 'guest' && s.kind === 'access') {
        const w = walkWith(wrongWalk, cfg, g.boot.tables.root, { gva: s.gva, kind: s.access, cpl: s.cpl, eflagsAc: s.eflagsAc, size: s.size }, read);
        // A walk that ends at a GPA no slot backs (or a write to a read-only
        // slot) leaves the guest as an MMIO exit; the engine answers reads
        // with MMIO_FILL.
        const slot = w.ok ? backing(w.gpa, s.size) : undefined;
        // A walk that ends in a slot whose host memory is gone or protected
        // against the access fails in the host; what the guest sees then
        // depends on the host's path (hostFaultPath).
        const fault = w.ok && slot ? host.fault(w.gpa, s.access) : undefined;
        const hostFault = w.ok && fault?.kind === 'efault' ? hostFaultPath(ctx.profile, s.access, s.cpl, w.gpa, s.size) : undefined;
        const mmio = w.ok && s.access !== 'exec' && (!slot || (slot.readonly && s.access === 'write') || hostFault?.path === 'mmio')
          ? { gpa: w.gpa, len: s.size, isWrite: s.access === 'write', ...(s.access === 'write' ? { data: leBytes(s.value, s.size) } : {}) }
          : undefined;
        const modelValue = s.access !== 'read' || !w.ok ? undefined
          : mmio ? BigInt.asUintN(s.size * 8, MMIO_FILL)
          : hostFault ? undefined
          : peek(w.gpa, s.size);
        const after = new Map(w.levels.map((l) => [l.pteGpa, l.pte]));
        for (const a of w.adWrites) after.set(a.pteGpa, a.new);
        pred = {
          step: i,
          what: name,
          walk: w,
          expectFault: s.expect?.fault !== undefined ? walkerErrorCode(s.expect.fault, cfg.walker, (m) => ctx.note(`${name}: ${m}`))
            : w.ok ? false : accessException(w).vector === 13 ? 'gp' : w.errorCode,
          expectValue: s.expect?.value ?? (w.ok ? modelValue : 0n),
          mmio,
          ...(hostFault && hostFault.path !== 'mmio' ? { hostFault } : {}),
          expectPtes: s.expect?.ptes
            ? s.expect.ptes.map((p) => ({ level: p.level, at: built.entries(s.gva, p.level), value: p.value }))
            : w.levels.map((l) => ({ level: l.level, at: l.pteGpa, value: after.get(l.pteGpa)! })),
        };
      }
      if (s.side === 'guest') {
        if (!(await finishPending())) return;
        // A #GP leaves CR2 as it was when the step began.
        const cr2Before = pred?.expectFault === 'gp' ? g.vcpu.getSregs().cr2 : undefined;
        g.clearExceptions();
        trace?.clear();
        let stop = await runGuest();
        const mmioSeen: unknown[] = [];
        while (stop.kind === 'exit' && stop.exit.reason === 'mmio' && mmioSeen.length < 4) {
          const e = stop.exit;
          mmioSeen.push({ gpa: e.gpa, len: e.len, isWrite: e.isWrite, ...(e.isWrite ? { data: e.data.subarray(0, e.len) } : {}) });
          if (!e.isWrite) e.complete(MMIO_FILL);
          stop = await runGuest();
        }
        if (pred) ctx.expect(`${name}: MMIO exits`, pred.mmio ? [pred.mmio] : [], mmioSeen);
        if (pred?.hostFault) {
          // The vCPU stopped at the access; it redoes it on its next run.
          ctx.expect(`${name}: KVM_RUN stops for the missing host memory`, pred.hostFault.stop, observedStop(stop));
          if (!same(pred.hostFault.stop, observedStop(stop))) return;
          ctx.note(`${name}: ${pred.hostFault.why}`);
          pending = { step: i, name, access: s as AccessStep, walk: pred.walk, gpa: pred.hostFault.gpa };
          checkStats();
          continue;
        }
        if (stop.kind !== 'sync' || stop.id !== BigInt(i)) {
          ctx.expect(`${name}: guest reaches the end of the step`, `sync ${i}`, show(observedStop(stop)));
          return;
        }
        checkStats();
        if (s.kind === 'set-cr0-wp') cfg = { ...cfg, cr0Wp: s.value };
        if (s.kind === 'set-cr4') cfg = { ...cfg, [{ smep: 'cr4Smep', smap: 'cr4Smap', pke: 'cr4Pke' }[s.bit]]: s.value };
        if (pred && s.kind === 'access') {
          const exc = g.exceptions();
          const expected = pred.expectFault === false ? []
            : pred.expectFault === 'gp' ? [{ vector: 13, errorCode: 0n, cr2: cr2Before! }]
            : [{ vector: 14, errorCode: BigInt(pred.expectFault), cr2: s.gva }];
          ctx.expect(`${name}: exceptions`, expected, exc.map(pick));
          if (s.access === 'read') ctx.expect(`${name}: value read`, pred.expectValue ?? 0n, BigInt.asUintN(s.size * 8, stop.values[0]!));
          // A processor may set A on the entries a faulting walk used; KVM's walker never does.
          const mayA = new Set(accessedLatitude(pred.walk, cfg.walker));
          const ptesSeen = pred.expectPtes.map((p) => ({ level: p.level, at: p.at, value: read(p.at) }));
          const ptesExpected = pred.expectPtes.map((p, k) => {
            const seen = ptesSeen[k]!.value;
            if (!mayA.has(p.at) || seen !== (p.value | PTE_A) || seen === p.value) return { level: p.level, at: p.at, value: p.value };
            ctx.note(`${name}: the ${cfg.walker} walker set A on the level-${p.level} entry at ${hex(p.at)} of a faulting walk (allowed)`);
            return { level: p.level, at: p.at, value: seen };
          });
          ctx.expect(`${name}: PTEs after`, ptesExpected, ptesSeen);
          if (pred.walk.ok) {
            for (const a of pred.walk.adWrites) markDirty(a.pteGpa);
            if (s.access === 'write' && !pred.mmio) markDirty(pred.walk.gpa);
          }
          if (trace) compareTrace(ctx, name, s.gva, pred.walk, trace.take());
          ctx.note(`${name}: model ${describeWalk(pred.walk)}`);
        }
        continue;
      }
      // Host steps: the vCPU is stopped at the previous sync.
      switch (s.kind) {
        case 'write-pte': {
          const at = built.entries(s.gva, s.level);
          const old = read(at);
          g.mem.write64(at, s.value ?? ((old & ~s.clear) | s.set));
          break;
        }
        case 'clear-ad': {
          for (const l of plainWalk(s.gva).levels) g.mem.write64(l.pteGpa, l.pte & ~(PTE_A | PTE_D));
          break;
        }
        case 'get-dirty-log': {
          const slot = g.vm.memslot(s.slot);
          const bitmap = g.vm.getDirtyLog(s.slot);
          const observed: string[] = [];
          bitmap.forEach((byte, b) => {
            for (let j = 0; j < 8; j++) if (byte & (1 << j)) observed.push(hex(slot.gpa + BigInt(b * 8 + j) * PAGE));
          });
          const pages = new Set((s.expect ?? [...(expectedDirty.get(s.slot) ?? [])]).map((x) => x & ~(PAGE - 1n)));
          if (tdpDirty) {
            // KVM's TDP MMU installs a writable SPTE on a read fault too when the host page is
            // writable, and logs the page dirty as it does (make_spte): the TDP model's log.
            const logged = (manualProtect ? host.tdp.peekDirty(0, s.slot) : host.tdp.getDirtyLog(0, s.slot)).map((gfn) => BigInt(gfn) << 12n);
            const extra = logged.filter((p) => !pages.has(p));
            for (const p of extra) pages.add(p);
            if (extra.length) ctx.note(`${name}: the TDP model also expects ${extra.map(hex).join(', ')}: mapped writable on a read fault, so logged dirty (README, Findings)`);
          }
          const expected = [...pages].sort((a, b) => (a < b ? -1 : 1)).map(hex);
          ctx.expect(`${name}: dirty pages`, expected, observed);
          expectedDirty.delete(s.slot);
          break;
        }
        case 'clear-dirty-log': {
          const slot = g.vm.memslot(s.slot);
          g.vm.clearDirtyLog(s.slot, 0, slot.npages);
          if (tdpDirty) host.tdp.clearDirtyLog(0, s.slot, 0, Number(slot.npages));
          break;
        }
        case 'memslot-delete':
          g.vm.deleteMemslot(s.slot);
          host.deleteSlot(s.slot);
          modelSlots.delete(s.slot);
          expectedDirty.delete(s.slot);
          break;
        case 'memslot-move':
          g.vm.moveMemslot(s.slot, s.gpa);
          host.updateSlot(s.slot);
          modelSlots.set(s.slot, { ...modelSlots.get(s.slot)!, gpa: s.gpa });
          break;
        case 'memslot-flags':
          if (sc.memslots.find((m) => m.slot === s.slot)?.backing === 'thp') {
            const huge = g.vm.memslot(s.slot).hugeBytes();
            ctx.note(`${name}: host backing before the change: ${huge === undefined ? 'unknown (no smaps)' : `${huge >> 10} KiB of ${g.vm.memslot(s.slot).size >> 10} KiB in transparent huge pages`}`);
          }
          g.vm.setMemslotFlags(s.slot, (s.logDirty ? MEM.KVM_MEM_LOG_DIRTY_PAGES : 0) | (s.readonly ? MEM.KVM_MEM_READONLY : 0));
          host.updateSlot(s.slot);
          modelSlots.set(s.slot, { ...modelSlots.get(s.slot)!, logDirty: s.logDirty, readonly: s.readonly });
          if (!s.logDirty) expectedDirty.delete(s.slot);
          break;
        case 'madvise':
          g.vm.memslot(s.slot).madvise(Number(s.offset), Number(s.size), { dontneed: MADV.DONTNEED, hugepage: MADV.HUGEPAGE, nohugepage: MADV.NOHUGEPAGE }[s.advice]);
          if (s.advice === 'dontneed') ctx.note(`${name}: ${host.change(s.slot, s.offset, s.size, 'dontneed')}`);
          break;
        case 'munmap':
          g.vm.memslot(s.slot).munmap(Number(s.offset), Number(s.size));
          ctx.note(`${name}: ${host.change(s.slot, s.offset, s.size, 'munmap')}`);
          break;
        case 'remap':
          g.vm.memslot(s.slot).remap(Number(s.offset), Number(s.size));
          host.remap(s.slot, s.offset, s.size);
          break;
        case 'mprotect':
          g.vm.memslot(s.slot).mprotect(Number(s.offset), Number(s.size), { none: PROT.NONE, read: PROT.READ, 'read-write': PROT.READ | PROT.WRITE }[s.prot]);
          ctx.note(`${name}: ${host.change(s.slot, s.offset, s.size, 'mprotect', s.prot)}`);
          break;
        case 'pre-fault': {
          if (!ctx.profile.capabilities.KVM_CAP_PRE_FAULT_MEMORY) {
            ctx.note(`${name}: not applicable here (KVM_CAP_PRE_FAULT_MEMORY is 0); the step is skipped`);
            break;
          }
          // KVM_PRE_FAULT_MEMORY may stop early (a signal, a reschedule): call again for the rest.
          let left = s.size;
          for (let tries = 0; left > 0n && tries < 64; tries++) left = g.vcpu.preFault(s.gpa + s.size - left, left);
          ctx.expect(`${name}: KVM_PRE_FAULT_MEMORY bytes left`, 0n, left);
          ctx.note(`${name}: ${host.preFault(s.gpa, s.size)}`);
          break;
        }
        case 'translate': {
          const w = walkWith(wrongWalk, cfg, g.boot.tables.root, { gva: s.gva, kind: 'read', cpl: 0 }, read);
          const expected = s.expect ?? (w.ok ? { valid: true, gpa: w.gpa } : { valid: false });
          const t = g.vcpu.translate(s.gva);
          ctx.expect(`${name}: KVM_TRANSLATE`, expected, t.valid ? { valid: true, gpa: t.gpa } : { valid: false });
          break;
        }
      }
      // Host steps have a sync too; let the guest reach the next one (after
      // redoing an access that stopped for missing host memory).
      if (!(await finishPending())) return;
      const stop = await runGuest();
      if (stop.kind !== 'sync' || stop.id !== BigInt(i)) {
        ctx.expect(`${name}: guest reaches the end of the step`, `sync ${i}`, show(observedStop(stop)));
        return;
      }
      checkStats();
    }
    if (!(await finishPending())) return;
    ctx.expect('guest finishes', 'done', describeStop(await g.run()));
  } finally {
    trace?.close();
    g.close();
  }
}

/**
 * Compares a step's stat expectations with the change of each stat over the
 * step. A stat this host's stats do not describe (statNotApplicable) is
 * reported as not applicable here, in the notes; it is never compared.
 */
function compareStats(ctx: CheckContext, name: string, want: StepStats, before: Map<string, bigint> | undefined, after: Map<string, bigint> | undefined): void {
  for (const [stat, e] of Object.entries(want)) {
    const why = statNotApplicable(stat, ctx.profile, !!before?.has(stat) && !!after?.has(stat));
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

type AccessStep = Extract<GuestStep, { kind: 'access' }>;

/** How KVM_RUN stops when a guest access needs host memory that is not there. */
export interface HostFaultPrediction {
  path: 'mmio' | 'efault';
  gpa: bigint;
  /** The stop as observedStop() shows it (unused for 'mmio', which is an MMIO exit). */
  stop: unknown;
  why: string;
}

/**
 * What the guest sees when an access needs host memory that munmap took away
 * or mprotect forbids (the model's fault says 'efault'). Hosts differ:
 * - kvm_pvm runs CPL 0 in KVM's instruction emulator, which reads and writes
 *   guest memory through the host mapping and, when that fails, treats the
 *   access as MMIO: an MMIO exit with the access's GPA, length and data
 *   (README, Findings). Measured here for reads and writes under munmap,
 *   PROT_NONE and (writes) PROT_READ.
 * - Elsewhere, and for kvm_pvm's CPL 3 (which runs on shadow pages), the page
 *   fault cannot get a host page and KVM_RUN fails with EFAULT
 *   (kvm_handle_error_pfn). x86 fills a KVM_EXIT_MEMORY_FAULT record only for
 *   private (guest_memfd) memory, so even with KVM_CAP_MEMORY_FAULT_INFO the
 *   exit reason is stale here: measured on kvm_pvm at CPL 3.
 */
export function hostFaultPath(profile: HostProfile, access: AccessStep['access'], cpl: 0 | 3, gpa: bigint, size: number): HostFaultPrediction {
  if (profile.flavour === 'kvm_pvm' && cpl === 0 && access !== 'exec') {
    return { path: 'mmio', gpa, stop: undefined, why: `kvm_pvm emulates CPL 0: the emulator cannot ${access} the host memory and exits as MMIO` };
  }
  return { path: 'efault', gpa, stop: { kvmRun: 'EFAULT' }, why: `KVM_RUN failed with EFAULT for the ${size}-byte ${access} of GPA ${hex(gpa)}; the vCPU redoes it on its next run` };
}

/** A stop in the terms hostFaultPath predicts. */
function observedStop(stop: GuestStop | { kind: 'kvm_run_error'; errno: string }): unknown {
  if (stop.kind === 'kvm_run_error') return { kvmRun: stop.errno };
  if (stop.kind === 'exit' && stop.exit.reason === 'memory_fault') return { exit: 'memory_fault', gpa: stop.exit.gpa, size: stop.exit.size, flags: stop.exit.flags };
  return describeStop(stop);
}

/**
 * The host dimension of a scenario: a TDP model (tdp.ts) over a Memslots
 * mirror of the VM's slots with their real HVAs, and the host memory model
 * behind them. Host changes go to it as MMU notifiers report them
 * (Tdp.invalidateHva: every slot the HVA range maps, no early stop), and
 * guest accesses fault in through it.
 */
function hostModel(ctx: CheckContext, g: X86Guest, sc: Scenario, wrong?: WrongTdp) {
  const params = ctx.profile.moduleParams;
  const tdp = new Tdp(new Memslots(), {
    eagerSplit: params['kvm.eager_page_split'] !== 'N',
    nxHugePages: params['kvm.nx_huge_pages'] === 'Y',
    record: false,
    ...(wrong ? { wrong } : {}),
  });
  const kinds = new Map(sc.memslots.map((m) => [m.slot, m.backing]));
  const modelOf = (slot: number): ModelSlot => {
    const s = g.vm.memslot(slot);
    const b = kinds.get(slot) ?? 'anon';
    const backing = b === 'thp' ? { kind: 'thp' as const, pageSize: 2 << 20 }
      : b === 'hugetlb2m' ? { kind: 'hugetlb2m' as const, pageSize: 2 << 20 }
      : b === 'hugetlb1g' ? { kind: 'hugetlb1g' as const, pageSize: 1 << 30 }
      : b === 'anon' ? { kind: 'anon' as const, pageSize: 4096 }
      : { kind: 'memfd' as const, pageSize: 4096 };
    return {
      slot, asId: 0, baseGfn: Number(s.gpa >> 12n), npages: s.npages, hva: s.hva,
      flags: { logDirty: (s.flags & MEM.KVM_MEM_LOG_DIRTY_PAGES) !== 0, readonly: (s.flags & MEM.KVM_MEM_READONLY) !== 0 },
      backing,
    };
  };
  tdp.setMemslot(modelOf(0));
  for (const m of sc.memslots) tdp.setMemslot(modelOf(m.slot));
  const gfnRange = (a: number, b: number) => `GFN [${hex(a)}, ${hex(b)})`;
  return {
    tdp,
    fault(gpa: bigint, access: AccessStep['access']) {
      return tdp.fault(0, Number(gpa >> 12n), { write: access === 'write', exec: access === 'exec' });
    },
    deleteSlot(slot: number) {
      tdp.setMemslot({ ...tdp.slots.get(0, slot)!, npages: 0 });
    },
    updateSlot(slot: number) {
      tdp.setMemslot(modelOf(slot));
    },
    /** A host change of part of a slot's memory; returns what the model zapped, for the notes. */
    change(slot: number, offset: bigint, size: bigint, why: 'munmap' | 'dontneed' | 'mprotect', prot?: 'none' | 'read' | 'read-write'): string {
      const m = tdp.slots.get(0, slot)!;
      const start = m.hva + offset;
      const end = start + size;
      const first = m.baseGfn + Number(offset >> 12n);
      const last = first + Number(size >> 12n);
      const mapped = tdp.mappings(0, first, last).reduce((n, r) => n + Math.min(r.end, last) - Math.max(r.start, first), 0);
      if (prot) tdp.host.protect(start, end, prot);
      const { ranges } = tdp.invalidateHva(start, end, why);
      const zapped = ranges.map((r) => `${gfnRange(r.start, r.end)} of slot ${r.slot.slot}`).join(', ') || 'nothing';
      return `model: ${why}${prot ? ` ${prot}` : ''} invalidates ${zapped}; ${mapped} mapped page${mapped === 1 ? '' : 's'} there refault on the next access`;
    },
    remap(slot: number, offset: bigint, size: bigint) {
      const m = tdp.slots.get(0, slot)!;
      tdp.host.remap(m.hva + offset, m.hva + offset + size);
    },
    preFault(gpa: bigint, size: bigint): string {
      const kinds = new Map<string, number>();
      for (let gfn = Number(gpa >> 12n); gfn < Number((gpa + size) >> 12n); gfn++) {
        const k = tdp.fault(0, gfn).kind;
        kinds.set(k, (kinds.get(k) ?? 0) + 1);
      }
      return `model: pre-fault ${[...kinds].map(([k, n]) => `${n} ${k}`).join(', ')}`;
    },
  };
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
    else ctx.expect(`${name}: KVM walker trace`, 'no kvm_mmu_pagetable_walk (#GP before any walk)',
      `${walks.length} walk(s)`);
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
  ctx.expect(`${name}: KVM walker trace`, model, { elements: kvm.elements, ...(kvm.error !== undefined ? { error: kvm.error } : {}), accessed: kvm.accessed, dirty: kvm.dirty });
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
        if (opts.trace) throw new NotApplicable('a race has no single guest walk per step to compare with the walker tracepoints');
        return runRace(ctx, { ...sc, race }, opts.wrong?.race);
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


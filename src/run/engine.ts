// The differential engine: runs a scenario on real KVM one step at a time and
// compares each step's observations with the model's prediction.
//
// The guest program is linear: each guest step's code is followed by a sync
// on the channel, so the vCPU is stopped between steps; host steps happen at
// those stops. Before a step the model predicts from the guest's tables as
// they are in memory right then; after it the engine observes the exception
// log, the value read, the PTEs along the walk, dirty logs and translations.
import { Asm } from '../arch/x86/asm.js';
import { channel, describeStop, X86Guest, type ExceptionRecord } from '../arch/x86/guest.js';
import { LAYOUT } from '../arch/x86/layout.js';
import { describePte, PTE_A, PTE_D } from '../arch/x86/pte.js';
import { TraceSession, type TraceEvent } from '../observe/tracefs.js';
import { decodeErrorCode, walkWith, type PagingConfig, type WalkResult, type ModelFault } from '../model/walk.js';
import { bringUpOptions, buildScenarioTables, pagingConfigFor } from '../scenario/build.js';
import type { GuestStep, Scenario, Step } from '../scenario/types.js';
import { MADV, MEM, RUN } from '../kvm/uapi.js';
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
  /** Test-only: a deliberately wrong model. */
  faults?: ReadonlySet<ModelFault>;
  /** Compare KVM's walker tracepoints with the model's walk (needs tracefs). */
  trace?: boolean;
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
  return w.ok ? `${lv} -> gpa ${hex(w.gpa)}` : `${lv} -> #PF ${decodeErrorCode(w.errorCode)} (${w.reason})`;
}

interface Prediction {
  step: number;
  what: string;
  walk: WalkResult;
  expectFault: false | number;
  expectValue?: bigint;
  /** The MMIO exit the access should cause, if any. */
  mmio?: { gpa: bigint; len: number; isWrite: boolean; data?: Uint8Array };
  expectPtes: { level: number; at: bigint; value: bigint }[];
}

/** What the engine returns for MMIO reads (truncated to the access size). */
export const MMIO_FILL = 0x5a5a5a5a5a5a5a5an;

function leBytes(v: bigint, n: number): Uint8Array {
  return Uint8Array.from({ length: n }, (_, i) => Number((v >> BigInt(8 * i)) & 0xffn));
}

/** Writes the code of one guest step; returns nothing to predict for non-access steps. */
function emitGuestStep(k: Asm, u: Asm, s: GuestStep): void {
  switch (s.kind) {
    case 'access': {
      const body = (a: Asm) => {
        a.movImm('rbx', s.gva);
        if (s.access === 'read') a.load(s.size, 'rsi', { base: 'rbx' });
        else if (s.access === 'write') a.movImm('rax', s.value).store(s.size, { base: 'rbx' }, 'rax');
        else a.call('rbx');
      };
      k.movImm('rsi', 0);
      if (s.cpl === 3) channel.userAccess(k, u, body, s.eflagsAc ? 1n << 18n : 2n);
      else channel.guarded(k, body);
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
      return;
    }
  }
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
    if (sc.steps.some((s) => s.side === 'host' && s.kind === 'clear-dirty-log')) g.vm.enableManualDirtyLogProtect();
    for (const m of sc.memslots) {
      const backing = m.backing === 'thp' ? { kind: 'anon' as const, thp: true }
        : m.backing === 'hugetlb2m' ? { kind: 'hugetlb' as const, pageSize: '2M' as const }
        : m.backing === 'hugetlb1g' ? { kind: 'hugetlb' as const, pageSize: '1G' as const }
        : { kind: m.backing };
      g.vm.addMemslot({
        slot: m.slot, gpa: m.gpa, size: Number(m.size), backing,
        flags: (m.logDirty ? MEM.KVM_MEM_LOG_DIRTY_PAGES : 0) | (m.readonly ? MEM.KVM_MEM_READONLY : 0),
      });
    }
    const built = buildScenarioTables(sc, g.mem, g.boot);
    let cfg: PagingConfig = pagingConfigFor(sc, cpu);
    const faults = opts.faults ?? new Set<ModelFault>();
    const read = (gpa: bigint) => g.mem.read64(gpa);

    // Code for exec accesses: a `ret` at each target that memory backs.
    for (const s of sc.steps) {
      if (s.side !== 'guest' || s.kind !== 'access' || s.access !== 'exec') continue;
      const w = walkWith(new Set(), { ...cfg, cr0Wp: false }, g.boot.tables.root, { gva: s.gva, kind: 'read', cpl: 0 }, read);
      if (w.ok && g.mem.slotOf(w.gpa)) g.mem.write(w.gpa, [0xc3]);
    }

    // One program: step code, then a sync carrying the step number.
    const k = new Asm({ origin: Number(LAYOUT.code) });
    const u = new Asm({ origin: Number(LAYOUT.userCode) });
    sc.steps.forEach((s, i) => {
      if (s.side === 'guest') emitGuestStep(k, u, s);
      channel.sync(k, i);
    });
    channel.done(k);
    g.mem.write(LAYOUT.userCode, u.assemble().code);
    g.load(k);

    if (opts.trace) trace = TraceSession.open(WALKER_EVENTS, [await g.vcpu.tid()]);

    // The model's view of guest-physical memory: which slot backs which GPAs.
    const modelSlots = new Map<number, { gpa: bigint; size: bigint; readonly: boolean; logDirty: boolean }>([
      [0, { gpa: 0n, size: LAYOUT.identityEnd, readonly: false, logDirty: false }],
      ...sc.memslots.map((m) => [m.slot, { gpa: m.gpa, size: m.size, readonly: m.readonly, logDirty: m.logDirty }] as const),
    ]);
    const backing = (gpa: bigint, len: number) =>
      [...modelSlots.values()].find((m) => gpa >= m.gpa && gpa + BigInt(len) <= m.gpa + m.size);

    // Pages each dirty-logged slot should report at its next get-dirty-log.
    const expectedDirty = new Map<number, Set<bigint>>();
    const markDirty = (gpa: bigint) => {
      const slot = [...modelSlots].find(([, m]) => m.logDirty && gpa >= m.gpa && gpa < m.gpa + m.size)?.[0];
      if (slot === undefined) return;
      const set = expectedDirty.get(slot) ?? new Set<bigint>();
      set.add(gpa & ~(PAGE - 1n));
      expectedDirty.set(slot, set);
    };

    for (let i = 0; i < sc.steps.length; i++) {
      const s = sc.steps[i]!;
      const name = stepName(i, s);
      let pred: Prediction | undefined;
      if (s.side === 'guest' && s.kind === 'access') {
        const w = walkWith(faults, cfg, g.boot.tables.root, { gva: s.gva, kind: s.access, cpl: s.cpl, eflagsAc: s.eflagsAc, size: s.size }, read);
        // A walk that ends at a GPA no slot backs (or a write to a read-only
        // slot) leaves the guest as an MMIO exit; the engine answers reads
        // with MMIO_FILL.
        const slot = w.ok ? backing(w.gpa, s.size) : undefined;
        const mmio = w.ok && s.access !== 'exec' && (!slot || (slot.readonly && s.access === 'write'))
          ? { gpa: w.gpa, len: s.size, isWrite: s.access === 'write', ...(s.access === 'write' ? { data: leBytes(s.value, s.size) } : {}) }
          : undefined;
        const modelValue = s.access !== 'read' || !w.ok ? undefined
          : mmio ? BigInt.asUintN(s.size * 8, MMIO_FILL)
          : BigInt.asUintN(s.size * 8, littleEndian(g.mem.bytes(w.gpa, s.size)));
        const after = new Map(w.levels.map((l) => [l.pteGpa, l.pte]));
        for (const a of w.adWrites) after.set(a.pteGpa, a.new);
        pred = {
          step: i,
          what: name,
          walk: w,
          expectFault: s.expect?.fault ?? (w.ok ? false : w.errorCode),
          expectValue: s.expect?.value ?? (w.ok ? modelValue : 0n),
          mmio,
          expectPtes: s.expect?.ptes
            ? s.expect.ptes.map((p) => ({ level: p.level, at: built.entries(s.gva, p.level), value: p.value }))
            : w.levels.map((l) => ({ level: l.level, at: l.pteGpa, value: after.get(l.pteGpa)! })),
        };
      }
      if (s.side === 'guest') {
        g.clearExceptions();
        trace?.clear();
        let stop = await g.run();
        const mmioSeen: unknown[] = [];
        while (stop.kind === 'exit' && stop.exit.reason === 'mmio' && mmioSeen.length < 4) {
          const e = stop.exit;
          mmioSeen.push({ gpa: e.gpa, len: e.len, isWrite: e.isWrite, ...(e.isWrite ? { data: e.data.subarray(0, e.len) } : {}) });
          if (!e.isWrite) g.vcpu.runView.setBigUint64(RUN.mmio_data, MMIO_FILL, true);
          stop = await g.run();
        }
        if (pred) ctx.expect(`${name}: MMIO exits`, pred.mmio ? [pred.mmio] : [], mmioSeen);
        if (stop.kind !== 'sync' || stop.id !== BigInt(i)) {
          ctx.expect(`${name}: guest reaches the end of the step`, `sync ${i}`, describeStop(stop));
          return;
        }
        if (s.kind === 'set-cr0-wp') cfg = { ...cfg, cr0Wp: s.value };
        if (s.kind === 'set-cr4') cfg = { ...cfg, [{ smep: 'cr4Smep', smap: 'cr4Smap', pke: 'cr4Pke' }[s.bit]]: s.value };
        if (pred && s.kind === 'access') {
          const exc = g.exceptions();
          ctx.expect(`${name}: exceptions`, pred.expectFault === false ? [] : [{ vector: 14, errorCode: BigInt(pred.expectFault), cr2: s.gva }], exc.map(pick));
          if (s.access === 'read') ctx.expect(`${name}: value read`, pred.expectValue ?? 0n, BigInt.asUintN(s.size * 8, stop.values[0]!));
          ctx.expect(`${name}: PTEs after`, pred.expectPtes.map((p) => ({ level: p.level, at: p.at, value: p.value })), pred.expectPtes.map((p) => ({ level: p.level, at: p.at, value: read(p.at) })));
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
          const w = walkWith(new Set(), cfg, g.boot.tables.root, { gva: s.gva, kind: 'read', cpl: 0 }, read);
          for (const l of w.levels) g.mem.write64(l.pteGpa, l.pte & ~(PTE_A | PTE_D));
          break;
        }
        case 'get-dirty-log': {
          const slot = g.vm.memslot(s.slot);
          const bitmap = g.vm.getDirtyLog(s.slot);
          const observed: string[] = [];
          bitmap.forEach((byte, b) => {
            for (let j = 0; j < 8; j++) if (byte & (1 << j)) observed.push(hex(slot.gpa + BigInt(b * 8 + j) * PAGE));
          });
          const expected = (s.expect ?? [...(expectedDirty.get(s.slot) ?? [])]).map((x) => x & ~(PAGE - 1n)).sort((a, b) => (a < b ? -1 : 1)).map(hex);
          ctx.expect(`${name}: dirty pages`, expected, observed);
          expectedDirty.delete(s.slot);
          break;
        }
        case 'clear-dirty-log': {
          const slot = g.vm.memslot(s.slot);
          g.vm.clearDirtyLog(s.slot, 0, slot.npages);
          break;
        }
        case 'memslot-delete':
          g.vm.deleteMemslot(s.slot);
          modelSlots.delete(s.slot);
          expectedDirty.delete(s.slot);
          break;
        case 'memslot-move':
          g.vm.moveMemslot(s.slot, s.gpa);
          modelSlots.set(s.slot, { ...modelSlots.get(s.slot)!, gpa: s.gpa });
          break;
        case 'memslot-flags':
          g.vm.setMemslotFlags(s.slot, (s.logDirty ? MEM.KVM_MEM_LOG_DIRTY_PAGES : 0) | (s.readonly ? MEM.KVM_MEM_READONLY : 0));
          modelSlots.set(s.slot, { ...modelSlots.get(s.slot)!, logDirty: s.logDirty, readonly: s.readonly });
          if (!s.logDirty) expectedDirty.delete(s.slot);
          break;
        case 'madvise':
          g.vm.memslot(s.slot).madvise(Number(s.offset), Number(s.size), { dontneed: MADV.DONTNEED, hugepage: MADV.HUGEPAGE, nohugepage: MADV.NOHUGEPAGE }[s.advice]);
          break;
        case 'translate': {
          const w = walkWith(faults, cfg, g.boot.tables.root, { gva: s.gva, kind: 'read', cpl: 0 }, read);
          const expected = s.expect ?? (w.ok ? { valid: true, gpa: w.gpa } : { valid: false });
          const t = g.vcpu.translate(s.gva);
          ctx.expect(`${name}: KVM_TRANSLATE`, expected, t.valid ? { valid: true, gpa: t.gpa } : { valid: false });
          break;
        }
      }
      // Host steps have a sync too; let the guest reach the next one.
      const stop = await g.run();
      if (stop.kind !== 'sync' || stop.id !== BigInt(i)) {
        ctx.expect(`${name}: guest reaches the end of the step`, `sync ${i}`, describeStop(stop));
        return;
      }
    }
    ctx.expect('guest finishes', 'done', describeStop(await g.run()));
  } finally {
    trace?.close();
    g.close();
  }
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
  return {
    name: opts.trace ? `${sc.name}:walker-trace` : sc.name,
    description: opts.trace ? `${sc.description} — KVM's walker tracepoints against the model's walk` : sc.description,
    needs: opts.trace ? ['exception_log', 'ad_bits', 'walker_tracepoints'] : ['exception_log', 'ad_bits'],
    run: (ctx) => runScenario(ctx, sc, opts),
  };
}


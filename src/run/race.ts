// Multi-vCPU races: each vCPU, on its own thread, writes its own pages of
// every target again and again, reading each write back, while the host runs
// rounds of operations on the targets' memslots (KVM_GET_DIRTY_LOG +
// KVM_CLEAR_DIRTY_LOG, MADV_DONTNEED, dirty logging off / on). When the host
// is done it raises a stop flag; each vCPU then makes one final pass and
// stops. Then nothing may be lost:
//   - every read-back saw the value just written (or zero on a target whose
//     memory the host discards with MADV_DONTNEED: the discard may come
//     between the write and the read);
//   - every page holds its final-pass value, as the host process sees it: the
//     final writes reached the memory that backs the slot now, so each page
//     ended mapped or was refaulted;
//   - the dirty log collected over all rounds (plus one harvest after the
//     final pass) holds exactly the pages written while logging was on.
// A "delete" target's slot is deleted once, in the middle round, while the
// vCPUs are writing it: from then on each of their accesses there exits to
// the host as MMIO (the host answers a read with the value last written to
// that GPA, so read-backs still hold), and the final pass's writes to it must
// all arrive as MMIO writes carrying the final values.
// Where the host offers kvm_tdp_mmu_spte_changed (a TDP MMU: the lab's
// npt-tdp), the TDP mappings KVM left at the end are compared GFN by GFN
// with the TDP model's (finalPicture).
// Determinism: each host round waits until every vCPU has finished another
// whole pass, so every round of host operations overlaps guest writes, and
// the final pass runs after the last host operation. Which write a given
// operation meets varies from run to run; no checked outcome depends on it.
import { Asm } from '../arch/x86/asm.js';
import { X86Guest } from '../arch/x86/guest.js';
import { LAYOUT, SEL } from '../arch/x86/layout.js';
import { describeExit } from '../kvm/exits.js';
import type { Vcpu } from '../kvm/vcpu.js';
import { MADV, MEM } from '../uapi/uapi.js';
import { Memslots } from '../model/memslots.js';
import { Tdp } from '../model/tdp.js';
import { declaredSlot, memFlags } from '../model/vm.js';
import type { WrongRace, WrongTdp } from '../model/wrong.js';
import { dirtyPages } from '../observe/dirty-log.js';
import { TdpPicture } from '../observe/tdp-picture.js';
import { TraceSession, type TraceEvent } from '../observe/tracefs.js';
import { bringUpOptions, buildScenarioTables, slotBacking } from '../scenario/build.js';
import type { RaceDecl, Scenario } from '../scenario/types.js';
import { NotApplicable } from '../base/not-applicable.js';
import type { CheckContext } from './types.js';
import { hex, PAGE } from '../base/units.js';

/** The final pass writes with this round number. */
export const FINAL_ROUND = 0xffffffn;

/** The value vCPU `v` writes to its page `p` in round `r`. */
export function raceValue(v: number, r: bigint, p: number): bigint {
  return (BigInt(v) << 56n) | (r << 16n) | BigInt(p);
}

/**
 * Per-vCPU record in guest memory: rounds done, read-back mismatches, the
 * first one, and a marker set after the final pass. It lives in the
 * user-accessible, writable page below the user stack, which CPL 3 loops can
 * reach; the stop flag is on the page after it.
 */
const RECORD = (v: number) => LAYOUT.userStackBase + BigInt(v) * 0x100n;
const R = { rounds: 0n, bad: 8n, badWrote: 16n, badRead: 24n, badGva: 32n, finished: 40n } as const;
const STOP = LAYOUT.userStackBase + 0x1000n;

/**
 * What the race model expects: per target, the GPAs written, and which of
 * them the dirty log must hold. `wrong`: test-only, a deliberately wrong model.
 */
export function raceModel(sc: Scenario & { race: RaceDecl }, wrong: WrongRace = {}) {
  const r = sc.race;
  let dropped = !wrong.dropDirtyBit;
  return r.targets.map((t) => {
    const m = sc.mappings.find((x) => t.gva >= x.gva && t.gva < x.gva + x.size)!;
    const base = m.gpa + (t.gva - m.gva);
    const pages = Array.from({ length: sc.vcpus * r.pages }, (_, i) => base + BigInt(i) * PAGE);
    const logged = t.host.includes('dirty-log') || t.host.includes('toggle-dirty-log');
    let dirty = logged ? [...pages] : [];
    if (logged && !dropped) {
      dirty = dirty.slice(0, -1);
      dropped = true;
    }
    return { target: t, pages, dirty };
  });
}

/**
 * Emits the race loop of vCPU `v`: passes over its pages of every target
 * until the stop flag, then the final pass; then it marks itself finished and
 * spins until the host kicks it out (an `out` would need IOPL 3 at CPL 3).
 */
function emitVcpu(a: Asm, sc: Scenario & { race: RaceDecl }, v: number): void {
  const r = sc.race;
  const L = (n: string) => `v${v}_${n}`;
  const rec = RECORD(v);
  a.label(L('entry'));
  a.movImm('r13', 0)
    .movImm('r14', 0)
    .movImm('r15', BigInt(v) << 56n);
  a.label(L('pass'));
  r.targets.forEach((t, i) => {
    const discards = t.host.includes('dontneed');
    a.movImm('r8', t.gva + BigInt(v * r.pages) * PAGE).movImm('rcx', 0);
    a.label(L(`t${i}`));
    // value = v << 56 | round << 16 | page
    a.mov('rax', 'r13').shl('rax', 16).or('rax', 'rcx').or('rax', 'r15');
    a.store(8, { base: 'r8' }, 'rax').load(8, 'rbx', { base: 'r8' });
    a.cmp('rbx', 'rax').jcc('e', L(`t${i}_ok`));
    if (discards) a.test('rbx', 'rbx').jcc('e', L(`t${i}_ok`));
    a.movImm('rdx', rec)
      .store(8, { base: 'rdx', disp: Number(R.badWrote) }, 'rax')
      .store(8, { base: 'rdx', disp: Number(R.badRead) }, 'rbx');
    a.store(8, { base: 'rdx', disp: Number(R.badGva) }, 'r8')
      .load(8, 'rsi', { base: 'rdx', disp: Number(R.bad) })
      .inc('rsi')
      .store(8, { base: 'rdx', disp: Number(R.bad) }, 'rsi');
    a.label(L(`t${i}_ok`));
    a.add('r8', Number(PAGE))
      .inc('rcx')
      .cmp('rcx', r.pages)
      .jcc('b', L(`t${i}`));
  });
  a.test('r14', 'r14').jcc('ne', L('finish'));
  a.inc('r13').movImm('rdx', rec).store(8, { base: 'rdx' }, 'r13');
  a.movImm('rdx', STOP).load(8, 'rax', { base: 'rdx' }).test('rax', 'rax').jcc('e', L('pass'));
  a.movImm('r13', FINAL_ROUND).movImm('r14', 1).jmp(L('pass'));
  a.label(L('finish'));
  a.movImm('rdx', rec)
    .movImm('rax', 1)
    .store(8, { base: 'rdx', disp: Number(R.finished) }, 'rax');
  a.label(L('spin'));
  a.jmp(L('spin'));
}

const sleep = (ms: number) => new Promise<void>((res) => setTimeout(res, ms));

/** Runs a race scenario (see the file comment). */
export async function runRace(
  ctx: CheckContext,
  sc: Scenario & { race: RaceDecl },
  wrong: WrongRace = {},
  wrongTdp: WrongTdp = {},
): Promise<void> {
  if (!ctx.profile.cpu) throw new NotApplicable('x86 scenarios need an x86 host');
  if (!ctx.target.concurrentRuns) {
    throw new NotApplicable(
      `a race needs vCPU threads running beside the host's operations; the ${ctx.target.name} target runs KVM_RUN synchronously`,
    );
  }
  const r = sc.race;
  const g = X86Guest.create(ctx.kvm, { ...bringUpOptions(sc), memSize: Number(LAYOUT.identityEnd) });
  const runs: Promise<string>[] = [];
  const vcpus: Vcpu[] = [g.vcpu];
  let trace: TraceSession | undefined;
  try {
    const logs = r.targets.some((t) => t.host.includes('dirty-log'));
    if (logs) g.vm.enableManualDirtyLogProtect();
    for (const m of sc.memslots) {
      const backing = slotBacking(m.backing);
      g.vm.addMemslot({ slot: m.slot, gpa: m.gpa, size: Number(m.size), backing, flags: memFlags(m) });
    }
    buildScenarioTables(sc, g.mem, g.boot);
    // CPL 0 runs from the kernel code region, CPL 3 from the user one.
    const user = r.cpl === 3;
    const origin = user ? LAYOUT.userCode : LAYOUT.code;
    const a = new Asm({ origin: Number(origin) });
    for (let v = 0; v < sc.vcpus; v++) emitVcpu(a, sc, v);
    const prog = a.assemble();
    g.mem.write(origin, prog.code);
    const cpuid = g.vcpu.getCpuid();
    for (let v = 1; v < sc.vcpus; v++) {
      const vc = g.vm.createVcpu(v);
      vc.setCpuid(cpuid);
      vc.setSregs(g.boot.sregs(vc.getSregs()));
      vcpus.push(vc);
    }
    vcpus.forEach((vc, v) => {
      // Separate stacks (nothing is pushed in the loop, but an exception would).
      vc.setRegs({
        ...g.boot.regs(BigInt(prog.labels.get(`v${v}_entry`)!), vc.getRegs()),
        rsp: (user ? LAYOUT.userStackTop : LAYOUT.kernelStackTop) - BigInt(v) * 0x400n,
      });
      if (user) {
        // Enter ring 3 directly: user code and data segments (DPL 3).
        const sr = vc.getSregs();
        const udata = { ...sr.ds, selector: SEL.udata, dpl: 3 };
        vc.setSregs({
          ...sr,
          cs: { ...sr.cs, selector: SEL.ucode, dpl: 3 },
          ds: udata,
          es: udata,
          fs: udata,
          gs: udata,
          ss: udata,
        });
      }
    });

    const rounds = (v: number) => g.mem.read64(RECORD(v) + R.rounds);
    const all = () => vcpus.map((_, v) => rounds(v));
    const waitAll = async (past: bigint[]): Promise<boolean> => {
      const until = performance.now() + 10_000;
      while (all().some((n, v) => n <= past[v]!)) {
        if (performance.now() > until || finished.size > 0) return false;
        await sleep(1);
      }
      return true;
    };
    const finished = new Map<number, string>();
    // Every thread: faults run on the vCPU threads, zaps in the host's calls
    // and, on some kernels, in a worker that tears down invalidated roots.
    const hvas = new Map(sc.memslots.map((m) => [m.slot, g.vm.memslot(m.slot).hva]));
    if (ctx.profile.oracles.tdp_spte_tracepoints.available)
      trace = TraceSession.open(ctx.target.fs, [SPTE_CHANGED], [], 16384);
    // GPA ranges of deleted slots, and the MMIO writes the vCPUs made there.
    const deleted: { start: bigint; end: bigint; memory: DataView }[] = [];
    const mmio = new Map<bigint, bigint>();
    let mmioExits = 0;
    const strayMmio: unknown[] = [];
    const runLoop = async (v: number, vc: Vcpu): Promise<string> => {
      for (;;) {
        const res = await vc.run({ timeoutMs: 60_000 });
        const e = res.exit;
        if (e.reason === 'mmio' && e.len === 8 && deleted.some((d) => e.gpa >= d.start && e.gpa < d.end)) {
          mmioExits++;
          if (e.isWrite) mmio.set(e.gpa, new DataView(e.data.buffer, e.data.byteOffset, 8).getBigUint64(0, true));
          else {
            // A read answers with the last MMIO write there, else with what
            // the memory held when the slot went (a write just before the
            // deletion landed in memory; its read-back comes after).
            const d = deleted.find((x) => e.gpa >= x.start && e.gpa < x.end)!;
            e.complete(mmio.get(e.gpa) ?? d.memory.getBigUint64(Number(e.gpa - d.start), true));
          }
          continue;
        }
        if (e.reason === 'mmio' && strayMmio.length < 4)
          strayMmio.push({ vcpu: v, gpa: e.gpa, len: e.len, isWrite: e.isWrite });
        // Kicked out after the final pass, or stopped by something else.
        const done = e.reason === 'intr' && !res.timedOut && g.mem.read64(RECORD(v) + R.finished) === 1n;
        return done ? 'done' : res.timedOut ? 'timed out' : `exit ${describeExit(e)}`;
      }
    };
    for (const [v, vc] of vcpus.entries()) {
      runs.push(
        runLoop(v, vc).then(
          (what) => {
            finished.set(v, what);
            return what;
          },
          (err: Error) => {
            finished.set(v, err.message);
            return err.message;
          },
        ),
      );
    }

    // The host's rounds, each overlapping at least one whole pass of every vCPU.
    const slot = (n: number) => g.vm.memslot(n);
    const union = new Map<number, Set<bigint>>();
    const harvest = (n: number, clear: boolean) => {
      const s = slot(n);
      const bitmap = g.vm.getDirtyLog(n);
      const set = union.get(n) ?? new Set<bigint>();
      for (const gpa of dirtyPages(bitmap, s.gpa)) set.add(gpa);
      union.set(n, set);
      if (clear) g.vm.clearDirtyLog(n, 0, Math.ceil(s.npages / 64) * 64, bitmap);
    };
    let overlapped = 0;
    let ops = 0;
    if (await waitAll(vcpus.map(() => 0n))) {
      for (let round = 0; round < r.rounds; round++) {
        const before = all();
        for (const t of r.targets) {
          for (const op of t.host) {
            if (op === 'delete' && round !== Math.floor(r.rounds / 2)) continue;
            const s = slot(t.slot);
            ops++;
            if (op === 'delete') {
              const gone = g.vm.detachMemslot(t.slot);
              deleted.push({ start: gone.gpa, end: gone.gpa + BigInt(gone.size), memory: new DataView(gone.memory) });
            } else if (op === 'dirty-log') harvest(t.slot, true);
            else if (op === 'dontneed')
              s.madvise(targetOffset(sc, t), sc.vcpus * r.pages * Number(PAGE), MADV.DONTNEED);
            else g.vm.setMemslotFlags(t.slot, s.flags ^ MEM.KVM_MEM_LOG_DIRTY_PAGES);
          }
        }
        if (!(await waitAll(before))) break;
        overlapped++;
      }
    }
    // Logging back on where a round left it off, so the final pass is logged.
    for (const t of r.targets) {
      if (t.host.includes('toggle-dirty-log') && !(slot(t.slot).flags & MEM.KVM_MEM_LOG_DIRTY_PAGES)) {
        g.vm.setMemslotFlags(t.slot, slot(t.slot).flags | MEM.KVM_MEM_LOG_DIRTY_PAGES);
      }
    }
    const afterRounds = all();
    g.mem.write64(STOP, 1n);
    // Every vCPU spins after its final pass; kick each out once it has got there.
    const until = performance.now() + 10_000;
    while (
      vcpus.some((_, v) => g.mem.read64(RECORD(v) + R.finished) !== 1n && !finished.has(v)) &&
      performance.now() < until
    )
      await sleep(1);
    for (const vc of vcpus) vc.kick();
    const ends = await Promise.all(runs);
    runs.length = 0;

    ctx.expect(
      'race: every vCPU finishes',
      vcpus.map(() => 'done'),
      ends,
    );
    ctx.expect('race: every host round overlaps a whole pass of every vCPU', r.rounds, overlapped);
    ctx.note(
      `race: ${sc.vcpus} vCPUs made ${afterRounds.join(' / ')} passes during ${overlapped} host rounds (${ops} host operations)${deleted.length ? `; ${mmioExits} MMIO exits for deleted slots` : ''}`,
    );
    const bad = vcpus
      .map((_, v) => {
        const n = g.mem.read64(RECORD(v) + R.bad);
        return n === 0n
          ? undefined
          : {
              vcpu: v,
              mismatches: n,
              gva: g.mem.read64(RECORD(v) + R.badGva),
              wrote: g.mem.read64(RECORD(v) + R.badWrote),
              read: g.mem.read64(RECORD(v) + R.badRead),
            };
      })
      .filter((x) => x !== undefined);
    ctx.expect('race: every read-back saw its write', [], bad);

    const model = raceModel(sc, wrong);
    ctx.expect('race: no MMIO exits outside deleted slots', [], strayMmio);
    for (const [i, m] of model.entries()) {
      const t = m.target;
      const what = `race: target ${i} (slot ${t.slot})`;
      if (t.host.includes('delete')) {
        // The slot went away under the running vCPUs: the final writes exit as MMIO.
        const want = m.pages.map((gpa, k) => ({
          gpa,
          value: raceValue(Math.floor(k / r.pages), FINAL_ROUND, k % r.pages),
        }));
        ctx.expect(
          `${what}: deleted while running, the final writes exit as MMIO`,
          want,
          m.pages.map((gpa) => ({ gpa, value: mmio.get(gpa) ?? 'no MMIO write' })),
        );
        continue;
      }
      const lost: { gpa: string; value: bigint }[] = [];
      m.pages.forEach((gpa, k) => {
        const v = Math.floor(k / r.pages);
        const want = raceValue(v, FINAL_ROUND, k % r.pages);
        const got = g.mem.read64(gpa);
        if (got !== want && lost.length < 8) lost.push({ gpa: hex(gpa), value: got });
      });
      ctx.expect(`${what}: every page holds its final write`, [], lost);
      if (t.host.includes('dirty-log')) {
        harvest(t.slot, false);
        ctx.expect(
          `${what}: dirty log over all rounds`,
          m.dirty.map(hex),
          [...union.get(t.slot)!].sort((x, y) => (x < y ? -1 : 1)).map(hex),
        );
      } else if (t.host.includes('toggle-dirty-log')) {
        union.delete(t.slot);
        harvest(t.slot, false);
        ctx.expect(
          `${what}: dirty log after the final pass`,
          m.dirty.map(hex),
          [...union.get(t.slot)!].sort((x, y) => (x < y ? -1 : 1)).map(hex),
        );
      }
    }
    if (trace) finalPicture(ctx, sc, model, hvas, trace.take(), wrongTdp);
  } finally {
    trace?.close();
    // A vCPU still running (a failed check above) is kicked by close().
    g.mem.write64(STOP, 1n);
    g.close();
    await Promise.allSettled(runs);
  }
}

const SPTE_CHANGED = 'kvmmmu/kvm_tdp_mmu_spte_changed';
/** x86's FROZEN_SPTE (REMOVED_SPTE before 6.10), without the non-present bit 63 it carries since 6.10. */
const FROZEN = 0x5a0n;
const NONPRESENT = 1n << 63n;

/**
 * The TDP mappings of the race targets at the end, from the trace, against
 * the TDP model's: the scenario's slots, the deleted ones deleted, then the
 * final pass's writes (after the last host operation, so nothing the rounds
 * did in between is left to predict). Compared per GFN: mapped or not, and
 * at which level. Not compared, because the trace cannot see them (see
 * src/observe/tdp-picture.ts): write permission, which KVM_CLEAR_DIRTY_LOG
 * takes away and the fast page-fault path gives back untraced; and GFNs whose
 * last traced change is the teardown of a table (FROZEN_SPTE): a root
 * invalidated by the deletion is zapped while the vCPUs fault the same GFNs
 * into a new root, and the event names no root, so the order of the two in
 * the trace says nothing about the new root.
 */
function finalPicture(
  ctx: CheckContext,
  sc: Scenario & { race: RaceDecl },
  model: ReturnType<typeof raceModel>,
  hvas: Map<number, bigint>,
  events: TraceEvent[],
  wrong: WrongTdp,
): void {
  const tdp = new Tdp(new Memslots(), { levels: 4, wrong });
  for (const m of sc.memslots) tdp.setMemslot(declaredSlot(m, hvas.get(m.slot)!));
  for (const { target: t } of model) {
    if (!t.host.includes('delete')) continue;
    const m = sc.memslots.find((x) => x.slot === t.slot)!;
    tdp.setMemslot(declaredSlot({ ...m, size: 0n }, hvas.get(m.slot)!));
  }
  for (const { target: t, pages } of model)
    if (!t.host.includes('delete')) for (const gpa of pages) tdp.fault(0, Number(gpa / PAGE), { write: true });
  const picture = new TdpPicture(ctx.profile.tdp.kind === 'ept' ? 'ept' : 'npt', events);
  const torn = new Set<bigint>();
  for (const e of events) {
    const f = e.fields;
    if (e.id !== SPTE_CHANGED || f.level !== 1n || typeof f.gfn !== 'bigint' || typeof f.new_spte !== 'bigint')
      continue;
    if ((f.new_spte & ~NONPRESENT) === FROZEN) torn.add(f.gfn);
    else torn.delete(f.gfn);
  }
  const shown = (m: { level: number } | undefined) => (m ? `level ${m.level}` : 'not mapped');
  let skipped = 0;
  for (const [i, { target: t, pages }] of model.entries()) {
    const deleted = t.host.includes('delete');
    const want: string[] = [];
    const got: string[] = [];
    for (const gpa of pages) {
      const gfn = gpa / PAGE;
      // A deleted slot's GFNs stay unmapped whatever root tore them down last.
      if (!deleted && torn.has(gfn)) {
        skipped++;
        continue;
      }
      want.push(`${hex(gfn)} ${shown(tdp.lookup(0, Number(gfn)))}`);
      got.push(`${hex(gfn)} ${shown(picture.leaf(0, gfn))}`);
    }
    ctx.expect(`race: target ${i} (slot ${t.slot}): TDP mappings at the end (kvm_tdp_mmu_spte_changed)`, want, got);
  }
  ctx.note(
    `race: TDP picture from ${events.length} kvm_tdp_mmu_spte_changed events${skipped ? `; ${skipped} GFNs whose last traced change is a table teardown left out (the event names no root)` : ''}`,
  );
}

/** Byte offset of a target's first page in its slot. */
function targetOffset(sc: Scenario, t: RaceDecl['targets'][number]): number {
  const m = sc.mappings.find((x) => t.gva >= x.gva && t.gva < x.gva + x.size)!;
  const slot = sc.memslots.find((x) => x.slot === t.slot)!;
  return Number(m.gpa + (t.gva - m.gva) - slot.gpa);
}

// The shadow MMU against its model (model/shadow.ts), phase by phase: a
// guest writes its own PTEs and then invalidates with INVLPG or a CR3 load,
// makes two page tables of one directory unsync and syncs both with one CR3
// load, writes an upper-level table three times (write flooding), and runs
// on after the host deletes a memslot. After every phase the shadow-page
// events, the picture of shadow pages they add up to and the shadow MMU's
// stats are compared with the model's, and every translation the guest used
// must be one the model allows: old or new after a PTE write without
// invalidation, only the new one after INVLPG or a CR3 load.
import { Asm } from '../arch/x86/asm.js';
import { channel, X86Guest } from '../arch/x86/guest.js';
import { LAYOUT } from '../arch/x86/layout.js';
import { PTE_A, PTE_P, PTE_RW, PTE_US } from '../arch/x86/pte.js';
import { ShadowMmu, type GuestMem, type ShadowEvent, type ShadowStats } from '../model/shadow.js';
import type { Wrong } from '../model/wrong.js';
import {
  parseShadowEvent,
  SHADOW_EVENTS,
  SHADOW_STATS,
  ShadowPicture,
  type ObservedSp,
} from '../observe/shadow-mmu.js';
import { TraceSession } from '../observe/tracefs.js';
import { NotApplicable } from '../base/not-applicable.js';
import { same } from '../run/differ.js';
import type { Check, CheckContext } from '../run/types.js';

/** What the guest does, as the program and the model both read it. */
type Op = { read: bigint } | { write: bigint; value: bigint } | { invlpg: bigint } | { cr3: bigint };

interface Phase {
  name: string;
  /** A host action before the phase's KVM_RUN. */
  host?: 'delete-memslot';
  ops: Op[];
}

const VA = 0x4000_0000n; // PML4 0, PDPT 1, PD 0: a subtree of the check's own tables
const VB = VA + 0x20_0000n; // the same PD, entry 1
const FRAME = (k: number) => 0x38_0000n + BigInt(k) * 0x1000n; // data frames; each holds its own GPA
const TABLE = PTE_P | PTE_RW | PTE_US | PTE_A;
const RESULTS = LAYOUT.data + 0x1000n; // where the guest stores what each read saw

export function shadowMmuModel(opts: { wrong?: Wrong } = {}): Check {
  return {
    name: 'shadow_mmu_follows_model',
    description:
      'without TDP, shadow pages, unsync and sync, write flooding and zaps follow the shadow MMU model phase by phase, ' +
      'and the guest sees only translations the architecture allows',
    needs: ['shadow_page_tracepoints'],
    run: (ctx) => run(ctx, opts.wrong),
  };
}

async function run(ctx: CheckContext, wrong: Wrong | undefined): Promise<void> {
  if (!ctx.profile.cpu) throw new NotApplicable('x86 guests only');
  const g = X86Guest.create(ctx.kvm);
  let trace: TraceSession | undefined;
  try {
    const t = g.boot.tables;
    const ptA = t.entry(VA, 1, TABLE) & ~0xfffn;
    const ptB = t.entry(VB, 1, TABLE) & ~0xfffn;
    const pd = t.entry(VA, 2, TABLE) & ~0xfffn;
    const pte = (pt: bigint, i: number, frame: bigint) => g.mem.write64(pt + BigInt(i * 8), frame | TABLE);
    pte(ptA, 0, FRAME(0));
    pte(ptA, 1, ptA); // VA + 0x1000: PT A itself, writable
    pte(ptA, 2, ptB); // VA + 0x2000: PT B
    pte(ptB, 0, FRAME(10));
    for (let k = 0; k < 16; k++) g.mem.write64(FRAME(k), FRAME(k));
    const root = t.root;
    const writePte = (via: bigint, i: number, frame: bigint): Op => ({
      write: via + BigInt(i * 8),
      value: frame | TABLE,
    });

    const phases: Phase[] = [
      {
        name: 'unsync then INVLPG',
        ops: [{ read: VA }, writePte(VA + 0x1000n, 0, FRAME(1)), { read: VA }, { invlpg: VA }, { read: VA }],
      },
      {
        name: 'unsync then CR3 reload',
        ops: [writePte(VA + 0x1000n, 0, FRAME(2)), { read: VA }, { cr3: root }, { read: VA }],
      },
      {
        name: 'two unsync children, one sync walk',
        ops: [
          { read: VB },
          writePte(VA + 0x1000n, 0, FRAME(3)),
          writePte(VA + 0x2000n, 0, FRAME(11)),
          { read: VA },
          { read: VB },
          { cr3: root },
          { read: VA },
          { read: VB },
        ],
      },
      { name: 'after a memslot deletion', host: 'delete-memslot', ops: [{ read: VA }, { read: VB }] },
      {
        // Three writes to the root, then three to the PD, through the identity map.
        name: 'write flooding',
        ops: [200, 201, 202]
          .map((i) => ({ write: root + BigInt(i * 8), value: 0n }) as Op)
          .concat(
            [300, 301, 302].map((i) => ({ write: pd + BigInt(i * 8), value: 0n })),
            [{ read: VA }],
          ),
      },
    ];

    // The model works on its own image of guest memory, taken before the guest runs.
    const image0 = g.mem.bytes(0n, Number(LAYOUT.identityEnd)).slice();
    const exec = ctx.profile.flavour === 'kvm_pvm' ? 'emulated' : 'native';
    const fresh = (): ShadowMmu => {
      const image = image0.slice();
      const view = new DataView(image.buffer);
      const mem: GuestMem = {
        read64: (gpa) => (gpa + 8n <= BigInt(image.length) ? view.getBigUint64(Number(gpa), true) : 0n),
        write64: (gpa, v) => view.setBigUint64(Number(gpa), v, true),
      };
      return new ShadowMmu({ levels: t.levels, exec, wrong: wrong?.shadow }, mem, root);
    };
    ctx.note(
      `model: ${exec} host (${exec === 'emulated' ? 'every guest instruction is emulated' : 'the guest runs on the shadow tables'})`,
    );

    const a = new Asm({ origin: Number(LAYOUT.code) });
    let slot = 0;
    phases.forEach((p, n) => {
      for (const op of p.ops) {
        if ('read' in op)
          a.movImm('rcx', op.read)
            .load(8, 'rax', { base: 'rcx' })
            .movImm('rcx', RESULTS + BigInt(8 * slot++))
            .store(8, { base: 'rcx' }, 'rax');
        else if ('write' in op) a.movImm('rcx', op.write).movImm('rax', op.value).store(8, { base: 'rcx' }, 'rax');
        else if ('invlpg' in op) a.movImm('rcx', op.invlpg).invlpg({ base: 'rcx' });
        else a.movImm('rax', op.cr3).movToCr(3, 'rax');
      }
      channel.sync(a, n + 1);
    });
    channel.done(a);
    g.load(a);

    const stats = g.vm.stats();
    const statNames = SHADOW_STATS.filter((s) => stats.has(s));
    const readStats = () => {
      const v = stats.read();
      return Object.fromEntries(statNames.map((s) => [s, Number(v.get(s) as bigint)]));
    };
    // The thread that issues the VM's ioctls too: a memslot deletion zaps in
    // it (this process's main thread here, the agent's main thread in the lab).
    const vcpuTid = await g.vcpu.tid();
    const pids = [...new Set([vcpuTid, ctx.target.addon.gettid()])];
    trace = TraceSession.open(ctx.target.fs, SHADOW_EVENTS, pids);
    const picture = new ShadowPicture();
    let before = readStats();

    // KVM may enter the guest more than once within one KVM_RUN (after a host
    // interrupt or a reschedule: exits userspace never sees), and an entry is
    // where it lets go of invalid roots and loads a new one (enter()). So the
    // model says what each phase does with one entry at its start, and, where
    // KVM showed something else, whether one more entry before some operation
    // of the phase accounts for it; earlier phases keep the entries chosen for
    // them. The model is replayed from a fresh image for each alternative.
    const extra = new Map<number, number>(); // phase -> the operation an extra entry came before
    interface Prediction {
      model: ShadowMmu;
      events: ShadowEvent[];
      stats: ShadowStats;
      statsBefore: ShadowStats;
      reads: { gva: bigint; slot: number; allowed: bigint[] }[];
    }
    const predict = (upto: number, entries: Map<number, number>): Prediction => {
      const m = fresh();
      let k = 0;
      let out: Prediction | undefined;
      for (const [n, p] of phases.entries()) {
        if (n > upto) break;
        m.take();
        const statsBefore = { ...m.stats };
        const phaseReads: Prediction['reads'] = [];
        if (p.host === 'delete-memslot') m.zapAll();
        const enter = () => {
          m.enter();
          // The guest fetches its code first: on a native host that faults in the code's tables.
          m.access(LAYOUT.code, 'exec');
        };
        enter();
        p.ops.forEach((op, i) => {
          if (entries.get(n) === i) enter();
          if ('read' in op) {
            const seen = m.access(op.read, 'read');
            phaseReads.push({ gva: op.read, slot: k, allowed: seen.allowed });
            // The guest stores what it read: one more write for the shadow MMU to see.
            m.access(RESULTS + BigInt(8 * k++), 'write', seen.gpa ?? 0n);
          } else if ('write' in op) m.access(op.write, 'write', op.value);
          else if ('invlpg' in op) m.invlpg(op.invlpg);
          else m.setCr3(op.cr3);
        });
        if (n === upto) out = { model: m, events: m.take(), stats: { ...m.stats }, statsBefore, reads: phaseReads };
      }
      return out!;
    };
    let model = fresh();

    for (const [n, p] of phases.entries()) {
      const tag = `phase ${n + 1} (${p.name})`;
      if (p.host === 'delete-memslot') {
        g.vm.addMemslot({ slot: 1, gpa: 0x1000_0000n, size: 0x1000 });
        g.vm.deleteMemslot(1);
      }
      const stop = await g.run();
      ctx.expect(
        `${tag}: guest reaches the phase's end`,
        `sync ${n + 1}`,
        stop.kind === 'sync' ? `sync ${stop.id}` : stop.kind,
      );
      if (stop.kind !== 'sync') return;

      const observed = trace
        .take()
        .map(parseShadowEvent)
        .filter((e): e is ObservedSp => !!e);
      for (const e of observed) picture.add(e);
      const after = readStats();
      const seenEvents = observed.map(observedEvent);
      const seenStats = delta(after, before, statNames);
      const agrees = (q: Prediction) =>
        same(q.events.map(modelEvent), seenEvents) &&
        same(modelPicture(q.model), picture.list()) &&
        same(delta(q.stats, q.statsBefore, statNames), seenStats);
      let pred = predict(n, extra);
      if (!agrees(pred)) {
        for (let i = 0; i < p.ops.length; i++) {
          const alt = predict(n, new Map([...extra, [n, i]]));
          if (!agrees(alt)) continue;
          extra.set(n, i);
          pred = alt;
          ctx.note(
            `${tag}: KVM entered the guest once more before operation ${i + 1} of the phase (an entry userspace ` +
              'does not see, after a host interrupt or reschedule); the model allows it and follows it from here',
          );
          break;
        }
      }
      model = pred.model;
      ctx.expect(`${tag}: shadow-page events`, pred.events.map(modelEvent), seenEvents);
      ctx.expect(`${tag}: shadow pages`, modelPicture(model), picture.list());
      ctx.expect(`${tag}: shadow MMU stats (change)`, delta(pred.stats, pred.statsBefore, statNames), seenStats);
      before = after;
      for (const r of pred.reads) {
        const seen = g.mem.read64(RESULTS + BigInt(8 * r.slot)) >> 12n;
        const allowed = r.allowed.map((f) => f.toString(16));
        const want = allowed.length === 1 ? allowed[0] : `one of ${allowed.join(', ')}`;
        ctx.expect(
          `${tag}: read ${r.slot} of 0x${r.gva.toString(16)} sees frame`,
          want,
          r.allowed.includes(seen) ? want : seen.toString(16),
        );
      }
    }
    ctx.expect('guest finishes', 'done', (await g.run()).kind);
    ctx.note(`shadow pages at the end: ${picture.list().join(', ') || 'none'}`);
  } finally {
    trace?.close();
    g.close();
  }
}

function modelEvent(e: ShadowEvent): string {
  return `${e.kind} ${e.sp.gfn.toString(16)}@${e.sp.level}${e.sp.direct ? ' direct' : ''}${e.kind === 'get' ? (e.created ? ' new' : ' existing') : ''}`;
}

function observedEvent(e: ObservedSp): string {
  return `${e.kind} ${e.gfn.toString(16)}@${e.level}${e.direct ? ' direct' : ''}${e.kind === 'get' ? (e.created ? ' new' : ' existing') : ''}`;
}

function modelPicture(m: ShadowMmu): string[] {
  return m
    .pages()
    .filter((p) => !p.invalid)
    .map((p) => `${p.gfn.toString(16)}@${p.level}${p.direct ? ' direct' : ''}${p.unsync ? ' unsync' : ''}`)
    .sort();
}

function delta(
  now: ShadowStats | Record<string, number>,
  then: ShadowStats | Record<string, number>,
  names: readonly string[],
) {
  const n = now as unknown as Record<string, number>;
  const t = then as unknown as Record<string, number>;
  return Object.fromEntries(names.map((s) => [s, n[s]! - t[s]!]));
}

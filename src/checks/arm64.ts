// The arm64 smoke checks: guest programs at EL1 with the MMU off (so guest
// addresses are IPAs and only stage-2 is in play), each recording expected
// against observed for the runner's differ. The suite runs on arm64 KVM
// hosts, such as the lab's vhe / nvhe / protected profiles.
import { kernelBehaviours } from '../model/kernel.js';
import { A64 } from '../arch/arm64/asm.js';
import { decodeAbort } from '../arch/arm64/esr.js';
import { Arm64Guest, channel, CHANNEL, describeStop, LAYOUT, type GuestStop } from '../arch/arm64/guest.js';
import type { Memslot as KvmMemslot } from '../kvm/memslot.js';
import { CAP, MEM } from '../uapi/uapi.js';
import { Memslots, type Backing } from '../model/memslots.js';
import { modelSlot } from '../model/vm.js';
import { armLevel, isTable } from '../model/spte.js';
import { Tdp } from '../model/tdp.js';
import type { Wrong, WrongTdp } from '../model/wrong.js';
import { dirtyPages } from '../observe/dirty-log.js';
import { TraceSession } from '../observe/tracefs.js';
import { parseGuestFault } from '../observe/stage2-faults.js';
import { NotApplicable } from '../base/not-applicable.js';
import { confirmThp, needThp } from './thp.js';
import type { Check, CheckContext } from '../run/types.js';
import { expectKickAtLimit, mmioOf } from './stops.js';
import { hex, PAGE } from '../base/units.js';

/** Memslot 1 of the checks that need data memory. */
const DATA = 0x20000000n;
/** An IPA no memslot covers (and not the channel's). */
const UNBACKED = 0x30000000n;

/** A guest for the duration of one check; always closed. */
async function withGuest<T>(ctx: CheckContext, fn: (g: Arm64Guest) => Promise<T>): Promise<T> {
  if (ctx.profile.arch !== 'arm64') throw new NotApplicable('arm64 guests only');
  const g = Arm64Guest.create(ctx.kvm);
  try {
    return await fn(g);
  } finally {
    g.close();
  }
}

/** A stop for comparison: 'done', 'sync 0x…', or the exit. */
const stopKey = (s: GuestStop): string => describeStop(s);

const storeLoad: Check = {
  name: 'arm64_store_load',
  arch: 'arm64',
  description:
    'arm64: 1/2/4/8-byte stores reach guest memory, loads read them back (registers through KVM_GET_ONE_REG)',
  needs: ['exits'],
  async run(ctx) {
    await withGuest(ctx, async (g) => {
      g.vm.addMemslot({ slot: 1, gpa: DATA, size: 0x10000, backing: { kind: 'anon', thp: false } });
      const value = 0x8877665544332211n;
      const a = new A64(LAYOUT.code);
      a.mov64(0, DATA + 0x1000n).mov64(1, value);
      a.str(8, 1, 0, 0).str(4, 1, 0, 8).str(2, 1, 0, 12).str(1, 1, 0, 14);
      // x9..x12: PSCI SYSTEM_OFF (done) returns in x0..x3.
      a.ldr(8, 9, 0, 0).ldr(4, 10, 0, 8).ldr(2, 11, 0, 12).ldr(1, 12, 0, 14);
      channel.done(a);
      g.load(a);
      ctx.expect('stop', 'done', stopKey(await g.run()));
      ctx.expect(
        'loaded values (x9..x12)',
        [value, value & 0xffffffffn, value & 0xffffn, value & 0xffn],
        [9, 10, 11, 12].map((n) => g.reg(n)),
      );
      ctx.expect(
        'guest memory',
        new Uint8Array([0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x11, 0x22, 0x33, 0x44, 0x11, 0x22, 0x11, 0]),
        g.mem.bytes(DATA + 0x1000n, 16).slice(),
      );
    });
  },
};

const mmioUnbacked: Check = {
  name: 'arm64_mmio_unbacked_ipa',
  arch: 'arm64',
  description:
    'arm64: an IPA outside every memslot exits as MMIO with the exact address, length and data; a read completes with the data the host supplies',
  needs: ['exits'],
  async run(ctx) {
    await withGuest(ctx, async (g) => {
      const a = new A64(LAYOUT.code);
      a.mov64(0, UNBACKED).mov64(1, 0x1122334455667788n).mov64(2, 0xcafef00d);
      a.str(4, 2, 0, 0x10); // MMIO write, 4 bytes
      a.str(8, 1, 0, 0x18); // MMIO write, 8 bytes
      a.ldr(2, 3, 0, 0x20); // MMIO read, 2 bytes
      a.ldr(1, 4, 0, 0x23); // MMIO read, 1 byte
      channel.sync(a, 3);
      channel.sync(a, 4);
      channel.done(a);
      g.load(a);
      const bytes = (...b: number[]) => new Uint8Array(b);
      ctx.expect(
        'write exit, 4 bytes',
        { reason: 'mmio', gpa: UNBACKED + 0x10n, len: 4, isWrite: true, data: bytes(0x0d, 0xf0, 0xfe, 0xca) },
        mmioOf(await g.run(), stopKey),
      );
      ctx.expect(
        'write exit, 8 bytes',
        {
          reason: 'mmio',
          gpa: UNBACKED + 0x18n,
          len: 8,
          isWrite: true,
          data: bytes(0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11),
        },
        mmioOf(await g.run(), stopKey),
      );
      const completeRead = (st: GuestStop, value: bigint) => {
        if (st.kind === 'exit' && st.exit.reason === 'mmio' && !st.exit.isWrite) st.exit.complete(value);
      };
      const read2 = await g.run();
      ctx.expect(
        'read exit, 2 bytes',
        { reason: 'mmio', gpa: UNBACKED + 0x20n, len: 2, isWrite: false },
        mmioOf(read2, stopKey),
      );
      completeRead(read2, 0xbeefn);
      const read1 = await g.run();
      ctx.expect(
        'read exit, 1 byte',
        { reason: 'mmio', gpa: UNBACKED + 0x23n, len: 1, isWrite: false },
        mmioOf(read1, stopKey),
      );
      completeRead(read1, 0xa5n);
      ctx.expect('2-byte value the guest read', 'sync 0xbeef', stopKey(await g.run()));
      ctx.expect('1-byte value the guest read', 'sync 0xa5', stopKey(await g.run()));
      ctx.expect('final stop', 'done', stopKey(await g.run()));
    });
  },
};

const readonlySlot: Check = {
  name: 'arm64_readonly_memslot',
  arch: 'arm64',
  description: 'arm64: a write to a read-only memslot exits as MMIO and leaves memory unchanged; reads see the memory',
  needs: ['exits'],
  async run(ctx) {
    if (!ctx.kvm.checkExtension(CAP.KVM_CAP_READONLY_MEM)) throw new NotApplicable('KVM_CAP_READONLY_MEM is 0');
    await withGuest(ctx, async (g) => {
      const slot = g.vm.addMemslot({ slot: 1, gpa: DATA, size: 0x1000, flags: MEM.KVM_MEM_READONLY });
      new DataView(slot.memory).setBigUint64(0, 0x0123456789abcdefn, true);
      const a = new A64(LAYOUT.code);
      a.mov64(0, DATA).ldr(8, 1, 0, 0);
      channel.sync(a, 1);
      a.mov64(2, 0x55).str(1, 2, 0, 8);
      channel.done(a);
      g.load(a);
      ctx.expect('value read from the slot', 'sync 0x123456789abcdef', stopKey(await g.run()));
      ctx.expect(
        'write exit',
        { reason: 'mmio', gpa: DATA + 8n, len: 1, isWrite: true, data: new Uint8Array([0x55]) },
        mmioOf(await g.run(), stopKey),
      );
      ctx.expect('final stop', 'done', stopKey(await g.run()));
      ctx.expect('slot memory after the write', 0n, BigInt(new Uint8Array(slot.memory)[8]!));
    });
  },
};

const ANON_4K: Backing = { kind: 'anon', pageSize: 0x1000 };

/**
 * A stage-2 model of the guest's VM: arm64, 40-bit IPA (KVM's default VM
 * type), one address space, user addresses below 2^48 (48-bit VA kernels).
 */
function stage2Model(ctx: CheckContext, slots: readonly { s: KvmMemslot; backing: Backing }[], wrong?: WrongTdp): Tdp {
  // Protected mode walks a guest's stage-2 from level 0 in later kernels (model/kernel.ts).
  const level0 =
    ctx.profile.flavour === 'arm64-protected' &&
    (ctx.profile.kernel?.behaviours ?? kernelBehaviours(undefined)).protectedStage2Level0.on;
  const geometry = level0 ? ({ startLevel: 0, ipaBits: 48 } as const) : ({ startLevel: 1, ipaBits: 40 } as const);
  const tdp = new Tdp(new Memslots({ asIds: 1, maxGfn: 2 ** 28, hvaLimit: (1n << 48n) - PAGE }), {
    arch: 'arm64',
    ...geometry,
    wrong,
  });
  for (const { s, backing } of slots) tdp.setMemslot(modelSlot(s, backing));
  return tdp;
}

/** The model's host learns that the harness itself wrote these pages (present and writable before the guest runs). */
function hostWrote(tdp: Tdp, s: KvmMemslot, offsets: readonly bigint[]): void {
  const slot = tdp.slots.find(0, Number(s.gpa / PAGE))!;
  for (const off of offsets) tdp.host.fault(slot, s.hva + off, true);
}

const gfnOf = (ipa: bigint) => Number(ipa / PAGE);

const dirtyLog: Check = {
  name: 'arm64_dirty_log',
  arch: 'arm64',
  description:
    'arm64: the dirty log lists exactly the pages the guest wrote, before and after KVM_GET_DIRTY_LOG re-protects them, as the stage-2 model harvests them',
  needs: ['dirty_log'],
  async run(ctx) {
    await withGuest(ctx, async (g) => {
      const s = g.vm.addMemslot({
        slot: 1,
        gpa: DATA,
        size: 0x10000,
        flags: MEM.KVM_MEM_LOG_DIRTY_PAGES,
        backing: { kind: 'anon', thp: false },
      });
      const rounds: { write: number[]; read: number[] }[] = [
        { write: [1, 3, 7, 3], read: [5, 9, 1] },
        { write: [3, 12], read: [7, 14] },
      ];
      const a = new A64(LAYOUT.code);
      a.mov64(0, DATA).mov64(1, 0x5a);
      rounds.forEach((r, i) => {
        for (const p of r.write) a.mov64(2, BigInt(p) * PAGE + 0x40n * BigInt(i + 1)).strReg(1, 1, 0, 2);
        for (const p of r.read) a.mov64(2, BigInt(p) * PAGE).ldrReg(8, 3, 0, 2);
        a.mov64(4, i + 1);
        channel.sync(a, 4);
      });
      channel.done(a);
      g.load(a);
      const tdp = stage2Model(ctx, [
        { s: g.code, backing: ANON_4K },
        { s, backing: ANON_4K },
      ]);
      hostWrote(tdp, g.code, [0n]);
      tdp.fault(0, gfnOf(LAYOUT.code), { exec: true });
      const page = (gfn: number) => hex(BigInt(gfn) * PAGE);
      ctx.expect('dirty log before the guest runs', [], dirtyPages(g.vm.getDirtyLog(1), DATA).map(hex));
      tdp.getDirtyLog(0, 1);
      for (const [i, r] of rounds.entries()) {
        ctx.expect(`stop after round ${i + 1}`, `sync 0x${i + 1}`, stopKey(await g.run()));
        for (const p of r.write) tdp.fault(0, gfnOf(DATA) + p, { write: true });
        for (const p of r.read) tdp.fault(0, gfnOf(DATA) + p, {});
        const model = tdp.getDirtyLog(0, 1).map(page);
        ctx.expect(
          `round ${i + 1}: the model's dirty pages are the pages written`,
          [...new Set(r.write)].sort((x, y) => x - y).map((p) => page(gfnOf(DATA) + p)),
          model,
        );
        ctx.expect(`round ${i + 1}: dirty log`, model, dirtyPages(g.vm.getDirtyLog(1), DATA).map(hex));
      }
      ctx.expect('final stop', 'done', stopKey(await g.run()));
    });
  },
};

interface Touch {
  addr: bigint;
  size: 1 | 2 | 4 | 8;
  write: boolean;
}

const stage2Faults: Check = {
  name: 'arm64_stage2_faults',
  arch: 'arm64',
  description:
    'arm64: kvm_guest_fault names exactly the IPAs the guest touched that stage-2 did not yet permit, in order, with access and fault kind as the stage-2 model predicts',
  needs: ['stage2_fault_tracepoints'],
  async run(ctx) {
    await withGuest(ctx, async (g) => {
      const s = g.vm.addMemslot({ slot: 1, gpa: DATA, size: 0x10000, backing: { kind: 'anon', thp: false } });
      // Pages 0-3 written by the host first (present and writable in the
      // host); pages 5 and 6 never touched before the guest does.
      for (let p = 0n; p < 4n; p++) g.mem.write(DATA + p * PAGE + 0x800n, [0xc0, 0xde, Number(p)]);
      const touches: Touch[] = [
        { addr: DATA + 0x18n, size: 8, write: true },
        { addr: DATA + 0x1040n, size: 4, write: false },
        { addr: DATA + 0x1080n, size: 4, write: true }, // mapped writable by the read before
        { addr: DATA + 0x100n, size: 8, write: false },
        { addr: DATA + 0x5022n, size: 2, write: false }, // never written: the host's zero page, read-only
        { addr: DATA + 0x5300n, size: 8, write: false },
        { addr: DATA + 0x6007n, size: 1, write: true },
        { addr: UNBACKED + 0x40n, size: 4, write: false }, // no memslot: a fault, then an MMIO exit
        { addr: DATA + 0x3008n, size: 8, write: true },
      ];
      const a = new A64(LAYOUT.code);
      a.mov64(1, 0x77);
      for (const t of touches) {
        a.mov64(0, t.addr);
        if (t.write) a.str(t.size, 1, 0, 0);
        else a.ldr(t.size, 2, 0, 0);
      }
      channel.done(a);
      g.load(a);

      // The model: every access in order; one that stage-2 does not permit yet faults.
      const tdp = stage2Model(ctx, [
        { s: g.code, backing: ANON_4K },
        { s, backing: ANON_4K },
      ]);
      hostWrote(tdp, g.code, [0n]);
      hostWrote(tdp, s, [0n, 0x1000n, 0x2000n, 0x3000n]);
      const expected: unknown[] = [];
      const access = (addr: bigint, kind: 'read' | 'write' | 'exec') => {
        const gfn = gfnOf(addr);
        const before = tdp.lookup(0, gfn);
        const r = tdp.fault(0, gfn, { write: kind === 'write', exec: kind === 'exec' });
        if (r.kind !== 'spurious')
          expected.push({
            ipa: hex(addr & ~(PAGE - 1n)),
            far: hex(addr),
            access: kind,
            fault: before ? 'permission' : 'translation',
          });
      };
      access(LAYOUT.code, 'exec');
      for (const t of touches) access(t.addr, t.write ? 'write' : 'read');

      const trace = TraceSession.open(ctx.target.fs, ['kvm/kvm_guest_fault'], [await g.vcpu.tid()]);
      try {
        let stop = await g.run();
        while (stop.kind === 'exit' && stop.exit.reason === 'mmio' && !stop.exit.isWrite) stop = await g.run();
        ctx.expect('stop', 'done', stopKey(stop));
        const observed = trace.take().map((e): unknown => {
          const f = parseGuestFault(e.text);
          if (!f) return { unparsed: e.text };
          const ab = decodeAbort(f.esr);
          return {
            ipa: hex(f.ipa),
            far: hex(f.far),
            access: ab?.access ?? `esr ${hex(f.esr)}`,
            fault: ab?.fault ?? `esr ${hex(f.esr)}`,
          };
        });
        ctx.expect('stage-2 faults, in order', expected, observed);
      } finally {
        trace.close();
      }
      ctx.note(
        'a write to a page first read as the zero page faults twice in KVM (permission, then translation after the MMU notifier unmaps it); the program does not do that',
      );
    });
  },
};

const MIB2 = 0x200000n;
/** <asm-generic/mman-common.h>: prefault page tables writable (Linux 5.14). */
const MADV_POPULATE_WRITE = 23;
const THP_2M: Backing = { kind: 'thp', pageSize: 0x200000 };

/** The arm64 lookup level at which a walk of the model's stage-2 to `gfn` stops: the level of its first non-table entry. */
function walkEnd(tdp: Tdp, gfn: number): number {
  for (const it of tdp.walk(0, gfn, gfn + 1, null)) {
    if (isTable(it.old)) continue;
    return armLevel(it.level);
  }
  throw new Error(`the model's walk to gfn ${gfn} found no entry`);
}

/**
 * arm64_block_replaces_table, optionally against a deliberately wrong model
 * (tests use that to see the mismatch reported).
 *
 * A 4 MiB memslot of anonymous memory with MADV_HUGEPAGE holds one 2 MiB
 * block whose HVA is 2 MiB aligned; the slot is placed so that its IPA is
 * 2 MiB aligned too (GPA and HVA congruent modulo 2 MiB). The host faults
 * the block in by writing (MADV_POPULATE_WRITE) so that a transparent huge
 * page backs it, measured through AnonHugePages in smaps before and after the
 * guest runs; without one the check is not applicable.
 * The slot logs dirty pages, so the guest's first write maps one 4 KiB page
 * under a level-3 table. Dirty logging then goes off (a flags-only change,
 * which on arm64 leaves stage-2 as it is), and the guest reads a second page
 * of the block: a translation fault at level 3, after which KVM may map the
 * whole 2 MiB, replacing the table with a block (break-before-make). A write
 * to a third page and a write to the first then tell a block (no fault) from
 * 4 KiB mappings (a fault each).
 */
export function blockReplacesTable(opts: { wrong?: Wrong } = {}): Check {
  return {
    name: 'arm64_block_replaces_table',
    arch: 'arm64',
    description:
      'arm64: after dirty logging stops, a fault in a THP-backed 2 MiB block that holds a 4 KiB page under a table maps the block (the table replaced); kvm_guest_fault as the stage-2 model predicts',
    needs: ['stage2_fault_tracepoints', 'dirty_log'],
    async run(ctx) {
      const thp = needThp(ctx.profile);
      await withGuest(ctx, async (g) => {
        let s = g.vm.addMemslot({
          slot: 1,
          gpa: DATA,
          size: Number(2n * MIB2),
          flags: MEM.KVM_MEM_LOG_DIRTY_PAGES,
          backing: { kind: 'anon', thp: true },
        });
        // The one 2 MiB-aligned HVA block inside the mapping, and an IPA congruent with it.
        const skew = s.hva % MIB2;
        if (skew !== 0n) s = g.vm.moveMemslot(1, DATA + skew);
        const block = s.gpa + (skew === 0n ? 0n : MIB2 - skew);
        ctx.note(
          `slot hva ${hex(s.hva)} (${skew === 0n ? '2 MiB aligned' : `${hex(skew)} past a 2 MiB boundary`}), ipa ${hex(s.gpa)}; block ipa ${hex(block)}`,
        );
        // Faulted in by writes (MADV_POPULATE_WRITE), the block gets a THP. A
        // first access by a read would map the huge zero page, and a write to
        // that splits it into 4 KiB pages (6.1 do_huge_pmd_wp_page); the
        // agent's writes compare the page before they write it, so writing
        // the markers alone leaves no THP.
        s.madvise(Number(block - s.gpa), Number(MIB2), MADV_POPULATE_WRITE);
        const offsets = [0n, 0x1000n, 0x1ff000n].map((o) => block - s.gpa + o);
        for (const off of offsets) g.mem.write(s.gpa + off + 0x800n, [0xb1, 0x0c]);
        confirmThp(s, thp, Number(MIB2));

        const p0 = block + 0x10n;
        const p1 = block + 0x1008n;
        const p511 = block + 0x1ff020n;
        const a = new A64(LAYOUT.code);
        a.mov64(1, 0x77).mov64(0, p0).str(8, 1, 0, 0); // dirty logging on: a 4 KiB page
        a.mov64(3, 1);
        channel.sync(a, 3);
        a.mov64(0, p1).ldr(8, 2, 0, 0); // dirty logging off: the block
        a.mov64(0, p511).str(8, 1, 0, 0);
        a.mov64(0, p0).str(4, 1, 0, 8);
        channel.done(a);
        g.load(a);

        const tdp = stage2Model(
          ctx,
          [
            { s: g.code, backing: ANON_4K },
            { s, backing: THP_2M },
          ],
          opts.wrong?.tdp,
        );
        hostWrote(tdp, g.code, [0n]);
        hostWrote(tdp, s, offsets);
        const expected: unknown[] = [];
        const access = (addr: bigint, kind: 'read' | 'write' | 'exec') => {
          const gfn = gfnOf(addr);
          const before = tdp.lookup(0, gfn);
          const level = walkEnd(tdp, gfn);
          const r = tdp.fault(0, gfn, { write: kind === 'write', exec: kind === 'exec' });
          if (r.kind !== 'spurious')
            expected.push({
              ipa: hex(addr & ~(PAGE - 1n)),
              access: kind,
              fault: before ? 'permission' : 'translation',
              level,
            });
        };
        const observe = (e: { text: string }): unknown => {
          const f = parseGuestFault(e.text);
          if (!f) return { unparsed: e.text };
          const ab = decodeAbort(f.esr);
          return {
            ipa: hex(f.ipa),
            access: ab?.access ?? `esr ${hex(f.esr)}`,
            fault: ab?.fault ?? `esr ${hex(f.esr)}`,
            level: ab?.level,
          };
        };
        const mapping = (ipa: bigint) => {
          const m = tdp.lookup(0, gfnOf(ipa));
          return m ? `${m.level === 2 ? '2 MiB' : m.level === 1 ? '4 KiB' : `level ${m.level}`}` : 'none';
        };

        const trace = TraceSession.open(ctx.target.fs, ['kvm/kvm_guest_fault'], [await g.vcpu.tid()]);
        try {
          access(LAYOUT.code, 'exec');
          access(p0, 'write');
          access(LAYOUT.channel + CHANNEL.sync, 'write');
          ctx.expect('stop after the first write', 'sync 0x1', stopKey(await g.run()));
          const first = mapping(p0);
          ctx.expect(
            'dirty log while logging (the first write)',
            tdp.getDirtyLog(0, 1).map((gfn) => hex(BigInt(gfn) * PAGE)),
            dirtyPages(g.vm.getDirtyLog(1), s.gpa).map(hex),
          );
          g.vm.setMemslotFlags(1, 0);
          tdp.setMemslot(modelSlot(s, THP_2M));
          access(p1, 'read');
          const second = mapping(p1);
          access(p511, 'write');
          access(p0, 'write');
          ctx.expect('final stop', 'done', stopKey(await g.run()));
          ctx.expect('stage-2 faults, in order', expected, trace.take().map(observe));
          ctx.note(`the model maps the first write at ${first} and the read after logging stopped at ${second}`);
        } finally {
          trace.close();
        }
        const after = s.hugeBytes();
        ctx.expect(
          'the block is still a transparent huge page after the run',
          true,
          after !== undefined && after >= Number(MIB2),
        );
      });
    },
  };
}

const timeoutKick: Check = {
  name: 'arm64_runaway_vcpu_timeout',
  arch: 'arm64',
  description: 'arm64: a guest spinning forever is kicked out of KVM_RUN at the time limit and the vCPU can run again',
  needs: ['exits'],
  async run(ctx) {
    await withGuest(ctx, async (g) => {
      const a = new A64(LAYOUT.code);
      const spin = a.here('spin');
      a.b(spin);
      g.load(a);
      await expectKickAtLimit(ctx, (o) => g.run(o));
      const b = new A64(LAYOUT.code + 0x1000n);
      channel.done(b);
      g.load(b);
      ctx.expect('runs again after the kick', 'done', stopKey(await g.run()));
      ctx.expect('pc after SYSTEM_OFF (hvc returned)', b.base + BigInt(b.offset), g.pc());
    });
  },
};

export const ARM64_SMOKE: readonly Check[] = [
  storeLoad,
  mmioUnbacked,
  readonlySlot,
  dirtyLog,
  stage2Faults,
  blockReplacesTable(),
  timeoutKick,
];

// The built-in smoke suite: each check sets up a guest, runs it on real KVM,
// and records expected against observed; the runner's differ judges.
import { Asm } from '../arch/x86/asm.js';
import { X86Guest, channel, describeStop, type GuestStop } from '../arch/x86/guest.js';
import { LAYOUT } from '../arch/x86/layout.js';
import { PTE_A, PTE_D, PTE_NX, PTE_P, PTE_RW, PTE_US } from '../arch/x86/pte.js';
import { CAP, MEM } from '../uapi/uapi.js';
import { walk, type AccessKind } from '../model/walk.js';
import { dirtyPages } from '../observe/dirty-log.js';
import { NotApplicable } from '../base/not-applicable.js';
import type { Check, CheckContext } from '../run/types.js';
import { shadowPages } from './shadow.js';
import { shadowMmuModel } from './shadow-mmu.js';
import { tdpDirtyLogSplitCoalesce, tdpPicture, tdpPreFault } from './tdp.js';
import { tdpGuestMemfdPicture } from './gmem.js';
import { pagingConfig, pteReader } from './x86.js';
import { ARM64_SMOKE } from './arm64.js';
import { expectKickAtLimit, mmioOf } from './stops.js';
import { hex, PAGE } from '../base/units.js';

/** A guest for the duration of one check; always closed. */
async function withGuest<T>(
  ctx: CheckContext,
  opts: ConstructorParameters<typeof X86Guest>[1],
  fn: (g: X86Guest) => Promise<T>,
): Promise<T> {
  if (!ctx.profile.cpu) throw new NotApplicable('x86 guests only');
  const g = X86Guest.create(ctx.kvm, opts);
  try {
    return await fn(g);
  } finally {
    g.close();
  }
}

/** Summarises a stop for comparison: kind plus its payload. */
function stopKey(s: GuestStop): string {
  return s.kind === 'done' ? 'done' : describeStop(s);
}

const realModeIo: Check = {
  name: 'real_mode_io',
  description: 'real-mode out + hlt give an io exit with the byte written, then hlt',
  needs: ['exits'],
  async run(ctx) {
    const vm = ctx.kvm.createVm();
    try {
      vm.addMemslot({ slot: 0, gpa: 0n, size: 0x10000 });
      // mov al, 0x5a; out 0x42, al; hlt   (the same bytes in 16-bit code)
      vm.mem.write(0x1000n, [0xb0, 0x5a, 0xe6, 0x42, 0xf4]);
      const v = vm.createVcpu();
      const sr = v.getSregs();
      v.setSregs({ ...sr, cs: { ...sr.cs, base: 0n, selector: 0 } });
      v.setRegs({ ...v.getRegs(), rip: 0x1000n, rflags: 2n });
      const first = await v.run({ timeoutMs: 5000 });
      const io = first.exit.reason === 'io' ? first.exit : undefined;
      ctx.expect(
        'exit 1',
        { reason: 'io', direction: 'out', port: 0x42, size: 1, count: 1, data: new Uint8Array([0x5a]) },
        io
          ? { reason: io.reason, direction: io.direction, port: io.port, size: io.size, count: io.count, data: io.data }
          : first.exit,
      );
      const second = await v.run({ timeoutMs: 5000 });
      ctx.expect('exit 2', 'hlt', second.exit.reason);
      ctx.expect('rip after hlt', 0x1005n, v.getRegs().rip);
    } finally {
      vm.close();
    }
  },
};

const longModeStoreLoad: Check = {
  name: 'long_mode_store_load',
  description: 'long-mode 1/2/4/8-byte stores land in guest memory and loads read them back',
  needs: ['exits'],
  async run(ctx) {
    await withGuest(ctx, {}, async (g) => {
      const base = LAYOUT.data + 0x1000n;
      const value = 0x8877665544332211n;
      const a = new Asm({ origin: Number(LAYOUT.code) });
      a.movImm('rbx', base).movImm('rax', value);
      a.store(8, { base: 'rbx' }, 'rax')
        .store(4, { base: 'rbx', disp: 8 }, 'rax')
        .store(2, { base: 'rbx', disp: 12 }, 'rax')
        .store(1, { base: 'rbx', disp: 14 }, 'rax');
      a.load(8, 'rsi', { base: 'rbx' })
        .load(4, 'rdx', { base: 'rbx', disp: 8 })
        .load(2, 'rcx', { base: 'rbx', disp: 12 })
        .load(1, 'r8', { base: 'rbx', disp: 14 });
      channel.sync(a, 1);
      channel.done(a);
      g.load(a);
      const s = await g.run();
      ctx.expect('stop', 'sync 1', stopKey(s));
      if (s.kind === 'sync')
        ctx.expect('loaded values', [value, value & 0xffffffffn, value & 0xffffn, value & 0xffn], s.values.slice(0, 4));
      ctx.expect(
        'guest memory',
        new Uint8Array([0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x11, 0x22, 0x33, 0x44, 0x11, 0x22, 0x11, 0]),
        g.mem.bytes(base, 16).slice(),
      );
      ctx.expect('final stop', 'done', stopKey(await g.run()));
    });
  },
};

/** Maps one GVA page to a GPA that no memslot covers. */
const UNBACKED_GPA = 0xc0000000n;
const UNBACKED_GVA = 0x50000000n;

const mmioUnbacked: Check = {
  name: 'mmio_unbacked_gpa',
  description: 'a GPA outside every memslot exits as MMIO with the exact gpa, length and data, both ways',
  needs: ['exits'],
  async run(ctx) {
    await withGuest(ctx, {}, async (g) => {
      g.boot.tables.map(UNBACKED_GVA, UNBACKED_GPA, PAGE, '4K', { leaf: PTE_P | PTE_RW | PTE_A | PTE_D | PTE_NX });
      const a = new Asm({ origin: Number(LAYOUT.code) });
      a.movImm('rbx', UNBACKED_GVA + 0x10n).movImm('rax', 0xcafef00d);
      a.store(4, { base: 'rbx' }, 'rax'); // MMIO write, 4 bytes
      a.load(2, 'rsi', { base: 'rbx', disp: 0x20 }); // MMIO read, 2 bytes
      channel.sync(a, 2);
      channel.done(a);
      g.load(a);
      const write = {
        reason: 'mmio',
        gpa: UNBACKED_GPA + 0x10n,
        len: 4,
        isWrite: true,
        data: new Uint8Array([0x0d, 0xf0, 0xfe, 0xca]),
      };
      ctx.expect('write exit', write, mmioOf(await g.run(), stopKey));
      const r = await g.run();
      ctx.expect(
        'read exit',
        { reason: 'mmio', gpa: UNBACKED_GPA + 0x30n, len: 2, isWrite: false },
        mmioOf(r, stopKey),
      );
      // Complete the read with data the guest must then see.
      if (r.kind === 'exit' && r.exit.reason === 'mmio' && !r.exit.isWrite) r.exit.complete(0xbeefn);
      const s = await g.run();
      ctx.expect('value the guest read', 0xbeefn, s.kind === 'sync' ? s.values[0] : stopKey(s));
    });
  },
};

const READONLY_GPA = 0x800000n;
const READONLY_GVA = 0x60000000n;

const readonlySlot: Check = {
  name: 'readonly_memslot',
  description: 'a write to a read-only memslot exits as MMIO and leaves memory unchanged; reads see the memory',
  needs: ['exits'],
  async run(ctx) {
    if (!ctx.kvm.checkExtension(CAP.KVM_CAP_READONLY_MEM)) throw new NotApplicable('KVM_CAP_READONLY_MEM is 0');
    await withGuest(ctx, {}, async (g) => {
      const slot = g.vm.addMemslot({ slot: 1, gpa: READONLY_GPA, size: 0x1000, flags: MEM.KVM_MEM_READONLY });
      new DataView(slot.memory).setBigUint64(0, 0x0123456789abcdefn, true);
      g.boot.tables.map(READONLY_GVA, READONLY_GPA, PAGE, '4K', { leaf: PTE_P | PTE_RW | PTE_A | PTE_D | PTE_NX });
      const a = new Asm({ origin: Number(LAYOUT.code) });
      a.movImm('rbx', READONLY_GVA).load(8, 'rsi', { base: 'rbx' });
      a.movImm('rax', 0x55).store(1, { base: 'rbx', disp: 8 }, 'rax');
      channel.sync(a, 3);
      channel.done(a);
      g.load(a);
      const write = { reason: 'mmio', gpa: READONLY_GPA + 8n, len: 1, isWrite: true, data: new Uint8Array([0x55]) };
      ctx.expect('write exit', write, mmioOf(await g.run(), stopKey));
      const s = await g.run();
      ctx.expect('value read from the slot', 0x0123456789abcdefn, s.kind === 'sync' ? s.values[0] : stopKey(s));
      ctx.expect('slot memory after the write', 0n, BigInt(new Uint8Array(slot.memory)[8]!));
    });
  },
};

const DATA_GVA = 0x40000000n;
/** A dirty-logged slot holding the check's page tables and data; code and bring-up stay in slot 0. */
const LOGGED_GPA = 0x400000n;
const DATA_GPA = 0x600000n;

const dirtyLogAd: Check = {
  name: 'dirty_log_walker_ad',
  description: 'the dirty log lists exactly the page written plus the page-table pages whose A/D bits the walker set',
  needs: ['dirty_log', 'ad_bits'],
  async run(ctx) {
    await withGuest(ctx, {}, async (g) => {
      g.vm.addMemslot({ slot: 1, gpa: LOGGED_GPA, size: 0x400000, flags: MEM.KVM_MEM_LOG_DIRTY_PAGES });
      // Fresh tables below the shared PML4E and PDPT, in the logged slot, all
      // with A/D clear. (A hardware TDP walker, e.g. AMD NPT, needs write
      // access to every guest table page it reads; here those are exactly
      // the pages whose A bit the walk sets, so both kinds of host agree.)
      let next = LOGGED_GPA;
      const alloc = () => ((next += PAGE), next - PAGE);
      g.boot.tables.map(DATA_GVA, DATA_GPA, PAGE, '4K', {
        leaf: PTE_P | PTE_RW | PTE_NX,
        table: PTE_P | PTE_RW | PTE_US,
        alloc,
      });
      const cfg = pagingConfig(g, ctx.profile.cpu!);
      const read = pteReader(g);
      const model = walk(cfg, g.boot.tables.root, { gva: DATA_GVA + 0x80n, kind: 'write', cpl: 0 }, read);
      if (!model.ok) throw new Error(`the model faults on the check's own mapping: ${model.reason}`);
      const a = new Asm({ origin: Number(LAYOUT.code) });
      a.movImm('rbx', DATA_GVA + 0x80n)
        .movImm('rax', 0x77)
        .store(1, { base: 'rbx' }, 'rax');
      channel.done(a);
      g.load(a);
      g.vm.getDirtyLog(1); // start from a clean log
      ctx.expect('stop', 'done', stopKey(await g.run()));
      const bitmap = g.vm.getDirtyLog(1);
      const dirty = dirtyPages(bitmap, LOGGED_GPA);
      const inSlot = (x: bigint) => x >= LOGGED_GPA && x < LOGGED_GPA + 0x400000n;
      const pages = [...model.adWrites.map((w) => w.pteGpa & ~(PAGE - 1n)), model.gpa & ~(PAGE - 1n)].filter(inSlot);
      const expected = [...new Set(pages)].sort((x, y) => (x < y ? -1 : 1));
      ctx.expect('dirty pages', expected.map(hex), dirty.map(hex));
      ctx.expect(
        'PTEs after the walk',
        model.adWrites.map((w) => ({ at: w.pteGpa, value: w.new })),
        model.adWrites.map((w) => ({ at: w.pteGpa, value: read(w.pteGpa) })),
      );
      ctx.note(`walk: ${model.levels.map((l) => `L${l.level}@${hex(l.pteGpa)}=${hex(l.pte)}`).join(' ')}`);
    });
  },
};

interface FaultCase {
  what: string;
  gva: bigint;
  kind: AccessKind;
  leaf: bigint;
}

const guestPageFault: Check = {
  name: 'guest_page_fault',
  description:
    'guest #PFs are recorded with the CR2 and error code the model predicts (not present, write to read-only, fetch from NX)',
  needs: ['exception_log'],
  async run(ctx) {
    await withGuest(ctx, {}, async (g) => {
      const cases: FaultCase[] = [
        { what: 'read of a not-present page', gva: 0x70000000n, kind: 'read', leaf: 0n },
        { what: 'write to a read-only page', gva: 0x70001008n, kind: 'write', leaf: PTE_P | PTE_A | PTE_D },
        {
          what: 'fetch from an NX page',
          gva: 0x70002000n,
          kind: 'exec',
          leaf: PTE_P | PTE_RW | PTE_A | PTE_D | PTE_NX,
        },
        { what: 'write to a writable page (no fault)', gva: 0x70003010n, kind: 'write', leaf: PTE_P | PTE_RW | PTE_NX },
      ];
      const a = new Asm({ origin: Number(LAYOUT.code) });
      cases.forEach((c, i) => {
        g.boot.tables.map(c.gva & ~(PAGE - 1n), LAYOUT.data + BigInt(i) * PAGE, PAGE, '4K', {
          leaf: c.leaf,
          table: PTE_P | PTE_RW | PTE_US | PTE_A,
        });
        if (c.leaf === 0n) g.mem.write64(g.boot.tables.entry(c.gva, 1), 0n);
        a.movImm('rbx', c.gva);
        channel.guarded(a, (a) => {
          if (c.kind === 'read') a.load(8, 'rax', { base: 'rbx' });
          else if (c.kind === 'write') a.store(8, { base: 'rbx' }, 'rbx');
          else a.call('rbx');
        });
      });
      channel.done(a);
      g.load(a);
      const cfg = pagingConfig(g, ctx.profile.cpu!);
      const predicted = cases.map((c) =>
        walk(cfg, g.boot.tables.root, { gva: c.gva, kind: c.kind, cpl: 0 }, pteReader(g)),
      );
      ctx.expect('stop', 'done', stopKey(await g.run()));
      const expected = predicted.flatMap((p) =>
        p.ok ? [] : [{ vector: 14, errorCode: BigInt(p.errorCode), cr2: p.cr2 }],
      );
      ctx.expect(
        'exception log',
        expected,
        g.exceptions().map(({ vector, errorCode, cr2 }) => ({ vector, errorCode, cr2 })),
      );
    });
  },
};

const translateCheck: Check = {
  name: 'translate_matches_tables',
  description: 'KVM_TRANSLATE gives the GPA the guest page tables map, and no translation where they map none',
  needs: ['translate'],
  async run(ctx) {
    await withGuest(ctx, {}, async (g) => {
      const maps = [
        { gva: 0x40000000n, gpa: 0x201000n, leaf: PTE_P | PTE_RW },
        { gva: 0x40001000n, gpa: 0x202000n, leaf: PTE_P },
        { gva: 0x40002000n, gpa: 0x203000n, leaf: PTE_P | PTE_RW | PTE_US },
      ];
      for (const m of maps) g.boot.tables.map(m.gva, m.gpa, PAGE, '4K', { leaf: m.leaf });
      const probes = [...maps.map((m) => m.gva + 0x123n), 0x40003000n, LAYOUT.code + 0x10n];
      const cfg = pagingConfig(g, ctx.profile.cpu!);
      const expected = probes.map((gva) => {
        const w = walk(cfg, g.boot.tables.root, { gva, kind: 'read', cpl: 0 }, pteReader(g));
        return w.ok ? { gva, valid: true, gpa: w.gpa } : { gva, valid: false };
      });
      const observed = probes.map((gva) => {
        const t = g.vcpu.translate(gva);
        return t.valid ? { gva, valid: true, gpa: t.gpa } : { gva, valid: false };
      });
      expected.forEach((e, i) => ctx.expect(`translate ${hex(probes[i]!)}`, e, observed[i]));
      // x86 KVM fills kvm_translation.writeable = 1 and usermode = 0 whatever
      // the tables say (kvm_arch_vcpu_ioctl_translate), so they carry no
      // information and are not compared; see README, "Findings".
      ctx.note('KVM_TRANSLATE writeable/usermode are constant on x86 and not compared');
    });
  },
};

const timeoutKick: Check = {
  name: 'runaway_vcpu_timeout',
  description: 'a guest spinning forever is kicked out of KVM_RUN at the time limit and the vCPU can run again',
  needs: ['exits'],
  async run(ctx) {
    await withGuest(ctx, {}, async (g) => {
      const a = new Asm({ origin: Number(LAYOUT.code) });
      a.label('spin').jmp('spin');
      g.load(a);
      await expectKickAtLimit(ctx, (o) => g.run(o));
      const b = new Asm({ origin: Number(LAYOUT.code) + 0x1000 });
      channel.done(b);
      g.load(b);
      ctx.expect('runs again after the kick', 'done', stopKey(await g.run()));
    });
  },
};

/** The suite's x86 checks: their guests are x86-64 programs. */
export const X86_SMOKE: readonly Check[] = [
  realModeIo,
  longModeStoreLoad,
  mmioUnbacked,
  readonlySlot,
  dirtyLogAd,
  guestPageFault,
  translateCheck,
  timeoutKick,
  shadowPages,
  shadowMmuModel(),
  tdpPicture(),
  tdpDirtyLogSplitCoalesce(),
  tdpPreFault(),
  tdpGuestMemfdPicture(),
].map((c) => ({ ...c, arch: 'x86_64' }));

/** The smoke suite: a run takes the checks of the KVM host's architecture (runner.forHostArch). */
export const SMOKE: readonly Check[] = [...X86_SMOKE, ...ARM64_SMOKE];

// What running each scenario step kind does, as one table keyed like the
// scenario's table of step kinds (src/scenario/steps.ts): a guest kind has
// `emit` (its code in the guest program) and, where it changes the paging
// state the model walks with, `paging`; a host kind has `act`, which does the
// host's change to the VM and the same change to the model VM, side by side,
// in one place. StepActionTable makes each entry carry what its kind's sides
// need, so a kind added to Step without its handler does not compile.
//
// Apart from src/scenario because it needs the KVM binding and the x86
// assembler; the scenario room stays pure.
import { KvmError } from '../kvm/sys.js';
import { Asm } from '../arch/x86/asm.js';
import { channel, type X86Guest } from '../arch/x86/guest.js';
import { LAYOUT } from '../arch/x86/layout.js';
import { PTE_A, PTE_D } from '../arch/x86/pte.js';
import type { Memslot } from '../model/memslots.js';
import { clearDirtyRefusal, memFlags, type ModelVm } from '../model/vm.js';
import type { PagingConfig, WalkResult } from '../model/walk.js';
import { dirtyPages } from '../observe/dirty-log.js';
import type { HostRange, Scenario, SlotPiece, Step } from '../scenario/types.js';
import { slotSpec } from '../scenario/build.js';
import { MADV, PROT } from '../uapi/uapi.js';
import type { CheckContext } from './types.js';
import { hex, PAGE } from '../base/units.js';

/** Where the guest's own page-table writes go: the GPAs of the entries a step names. */
export interface EntryFinder {
  /** The entry at `level` for `gva`. */
  entry(gva: bigint, level: number): bigint;
  /** Every entry the walk of `gva` reads. */
  walk(gva: bigint): bigint[];
}

/** Where a guest step's code goes: the kernel program, the user program (CPL 3 accesses), and what it needs to know. */
export interface Emitter {
  k: Asm;
  u: Asm;
  /** PKRU to load when the step turns CR4.PKE on. */
  pkru: number;
  entries: EntryFinder;
}

/** What a host step acts on: the VM and the model VM, and the model's walks as the tables are now. */
export interface HostEnv {
  ctx: CheckContext;
  sc: Scenario;
  g: X86Guest;
  vm: ModelVm;
  /** The model's KVM_TRANSLATE of `gva` (KVM's software walker, access 0), with the scenario's deliberate model mistakes. */
  translate(gva: bigint): WalkResult;
  /** Where the tables lead for `gva` as they are now, whatever the access rights. */
  plainWalk(gva: bigint): WalkResult;
  entries: EntryFinder;
  /** The model's view of the VM's slot `slot` as it is now. */
  slotOf(slot: number): Memslot;
  /** The dirty log is the TDP MMU's (host-policy.ts tdpLogsDirty). */
  tdpDirty: boolean;
  /** The VM has KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 on. */
  manualProtect: boolean;
}

type GuestSide<S> = Extract<S, { side: 'guest' }>;
type HostSide<S> = Extract<S, { side: 'host' }>;

export interface GuestAction<S> {
  emit(e: Emitter, s: S): void;
  /** The paging state after the step, where the step changes it. */
  paging?(cfg: PagingConfig, s: S): PagingConfig;
}

export interface HostAction<S> {
  /** Does the step to the VM and to the model VM; `name` heads the step's notes and comparisons. */
  act(h: HostEnv, s: S, name: string): void;
}

/** The handlers a kind needs: guest ones if it has a guest side, host ones if it has a host side. */
export type StepAction<S> = ([GuestSide<S>] extends [never] ? unknown : GuestAction<GuestSide<S>>) &
  ([HostSide<S>] extends [never] ? unknown : HostAction<HostSide<S>>);

/** One entry per kind of the union `U`: a kind without its handlers does not compile. */
export type StepActionTable<U extends { kind: string; side: string } = Step> = {
  [K in U['kind']]: StepAction<Extract<U, { kind: K }>>;
};

/** A store of 8 bytes by the guest to a page-table entry, through the identity map: (old & ~clear) | set, or value. */
function emitPteStore(k: Asm, at: bigint, change: { set: bigint; clear: bigint; value?: bigint }): void {
  if (at + 8n > LAYOUT.identityEnd)
    throw new Error(`the entry at ${hex(at)} is outside the guest's identity map; a guest step cannot write it`);
  k.movImm('rbx', at);
  if (change.value !== undefined) k.movImm('rax', change.value);
  else {
    k.load(8, 'rax', { base: 'rbx' });
    k.movImm('rcx', BigInt.asUintN(64, ~change.clear)).and('rax', 'rcx');
    k.movImm('rcx', change.set).or('rax', 'rcx');
  }
  k.store(8, { base: 'rbx' }, 'rax');
}

/** PKRU := value (WRPKRU needs CR4.PKE = 1, ECX = EDX = 0). */
export function emitWrpkru(k: Asm, value: number): void {
  k.movImm('rax', BigInt(value >>> 0))
    .movImm('rcx', 0)
    .movImm('rdx', 0)
    .wrpkru();
}

/** GDT slot of the LDT descriptor an implicit read uses (after bring-up's six entries), and its selector. */
const LDT_SELECTOR = 0x30n;
/** Where the guest builds the GDTR image that covers the LDT descriptor (in the GDT's page, past it). */
const GDTR_IMAGE = LAYOUT.gdt + 0x40n;
/** Selector of entry 0 of the LDT (TI = 1, RPL 0). */
const LDT_ENTRY0 = 0x4n;
/** The data descriptor an implicit read finds at its gva: flat, present, DPL 0, read/write, accessed (so no A write). */
export const IMPLICIT_DESCRIPTOR = 0x00cf93000000ffffn;

/**
 * An implicit supervisor read of the 8 bytes at `gva`: the guest points a
 * one-entry LDT at gva (a 16-byte system descriptor in the GDT, whose limit
 * it raises), loads it, and loads FS with the LDT's entry 0, so the processor
 * reads the descriptor as a supervisor access whatever EFLAGS.AC says. A
 * fault there is taken with the fixup of channel.guarded; FS and LDTR are
 * nulled afterwards.
 */
function emitImplicitRead(k: Asm, gva: bigint, ac: boolean): void {
  const lo = 0x7n | ((gva & 0xffffffn) << 16n) | (0x82n << 40n) | (((gva >> 24n) & 0xffn) << 56n);
  k.movImm('rbx', LAYOUT.gdt + LDT_SELECTOR);
  k.movImm('rax', lo).store(8, { base: 'rbx' }, 'rax');
  k.movImm('rax', gva >> 32n).store(8, { base: 'rbx', disp: 8 }, 'rax');
  k.movImm('rbx', GDTR_IMAGE);
  k.movImm('rax', LDT_SELECTOR + 0xfn).store(2, { base: 'rbx' }, 'rax');
  k.movImm('rax', LAYOUT.gdt).store(8, { base: 'rbx', disp: 2 }, 'rax');
  k.lgdt({ base: 'rbx' });
  k.movImm('rax', LDT_SELECTOR).lldt('rax');
  if (ac) k.pushfq().pop('rax').bts('rax', 18).push('rax').popfq();
  channel.guarded(k, (a) => void a.movImm('rax', LDT_ENTRY0).movToSeg('fs', 'rax'));
  if (ac) k.pushfq().pop('rax').btr('rax', 18).push('rax').popfq();
  k.movImm('rax', 0).movToSeg('fs', 'rax').lldt('rax');
}

const CR4_BITS = { smep: 20, smap: 21, pke: 22 } as const;
const CR4_CONFIG = { smep: 'cr4Smep', smap: 'cr4Smap', pke: 'cr4Pke' } as const;
/** The slots' parts a host range step acts on: its slot's, or each slot's part of its GPA range. */
const piecesOf = (vm: ModelVm, r: HostRange): SlotPiece[] => ('gpa' in r ? vm.pieces(r.gpa, r.size) : [r]);

const ADVICE = { dontneed: MADV.DONTNEED, hugepage: MADV.HUGEPAGE, nohugepage: MADV.NOHUGEPAGE };
const PROTS = { none: PROT.NONE, read: PROT.READ, 'read-write': PROT.READ | PROT.WRITE };

export const STEP_ACTIONS: StepActionTable = {
  access: {
    emit({ k, u }, s) {
      if (s.implicit) return emitImplicitRead(k, s.gva, s.eflagsAc);
      const one = (a: Asm) => {
        if (s.access === 'read') a.load(s.size, 'rsi', { base: 'rbx' });
        else if (s.access === 'write') a.movImm('rax', s.value).store(s.size, { base: 'rbx' }, 'rax');
        else a.call('rbx');
      };
      // A loop: rcx counts down, rbx steps by the stride (rdx), rsi sums what the reads load.
      const loop = (a: Asm, l: { count: number; stride: bigint }) => {
        const top = `loop_${a.size()}`;
        a.movImm('rcx', l.count).movImm('rdx', l.stride).label(top);
        if (s.access === 'read') a.load(s.size, 'rax', { base: 'rbx' }).add('rsi', 'rax');
        else one(a);
        a.add('rbx', 'rdx').loop(top);
      };
      const body = (a: Asm) => {
        a.movImm('rbx', s.gva);
        if (s.loop) loop(a, s.loop);
        else one(a);
      };
      k.movImm('rsi', 0);
      if (s.cpl === 3) channel.userAccess(k, u, body, s.eflagsAc ? 1n << 18n : 2n);
      else if (s.eflagsAc) {
        // EFLAGS.AC at CPL 0 through the flags image (STAC would need SMAP).
        k.pushfq().pop('rax').bts('rax', 18).push('rax').popfq();
        channel.guarded(k, body);
        k.pushfq().pop('rax').btr('rax', 18).push('rax').popfq();
      } else channel.guarded(k, body);
    },
  },
  invlpg: {
    emit: ({ k }, s) => void k.movImm('rbx', s.gva).invlpg({ base: 'rbx' }),
  },
  'reload-cr3': {
    emit: ({ k }) => void k.movFromCr('rax', 3).movToCr(3, 'rax'),
  },
  'set-cr0-wp': {
    emit({ k }, s) {
      k.movFromCr('rax', 0);
      if (s.value) k.bts('rax', 16);
      else k.btr('rax', 16);
      k.movToCr(0, 'rax');
    },
    paging: (cfg, s) => ({ ...cfg, cr0Wp: s.value }),
  },
  'set-cr4': {
    emit({ k, pkru }, s) {
      k.movFromCr('rax', 4);
      if (s.value) k.bts('rax', CR4_BITS[s.bit]);
      else k.btr('rax', CR4_BITS[s.bit]);
      k.movToCr(4, 'rax');
      if (s.bit === 'pke' && s.value) emitWrpkru(k, pkru);
    },
    paging: (cfg, s) => ({ ...cfg, [CR4_CONFIG[s.bit]]: s.value }),
  },
  'write-pte': {
    emit: ({ k, entries }, s) => emitPteStore(k, entries.entry(s.gva, s.level), s),
    act({ g, entries }, s) {
      const at = entries.entry(s.gva, s.level);
      const old = g.mem.read64(at);
      g.mem.write64(at, s.value ?? (old & ~s.clear) | s.set);
    },
  },
  'clear-ad': {
    emit({ k, entries }, s) {
      for (const at of entries.walk(s.gva)) emitPteStore(k, at, { set: 0n, clear: PTE_A | PTE_D });
    },
    act({ g, plainWalk }, s) {
      for (const l of plainWalk(s.gva).levels) g.mem.write64(l.pteGpa, l.pte & ~(PTE_A | PTE_D));
    },
  },
  'get-dirty-log': {
    act({ ctx, g, vm, tdpDirty, manualProtect }, s, name) {
      // KVM_GET_DIRTY_LOG is of a whole slot; over a GPA range, of each slot it crosses, compared inside it.
      const parts = 'gpa' in s ? vm.pieces(s.gpa, s.size) : [{ slot: s.slot, offset: 0n, size: undefined }];
      for (const part of parts) {
        const slot = g.vm.memslot(part.slot);
        const lo = slot.gpa + part.offset;
        const hi = lo + (part.size ?? BigInt(slot.npages) << 12n);
        const inside = (p: bigint) => p >= lo && p < hi;
        const observed = dirtyPages(g.vm.getDirtyLog(part.slot), slot.gpa).filter(inside).map(hex);
        const modelPages = vm.harvestDirty(part.slot, manualProtect);
        const pages = new Set((s.expect ?? modelPages).map((x) => x & ~(PAGE - 1n)).filter(inside));
        const what =
          part.size === undefined
            ? `${name}: dirty pages`
            : `${name}: dirty pages of slot ${part.slot} in ${hex(lo)}..${hex(hi)}`;
        if (tdpDirty) {
          // KVM's TDP MMU installs a writable SPTE on a read fault too when the host page is
          // writable, and logs the page dirty as it does (make_spte): the TDP model's log.
          const logged = (manualProtect ? vm.tdp.peekDirty(0, part.slot) : vm.tdp.getDirtyLog(0, part.slot))
            .map((gfn) => BigInt(gfn) << 12n)
            .filter(inside);
          const extra = logged.filter((p) => !pages.has(p));
          for (const p of extra) pages.add(p);
          if (extra.length)
            ctx.note(
              `${what}: the TDP model also expects ${extra.map(hex).join(', ')}: mapped writable on a read fault, so logged dirty (README, Findings)`,
            );
        }
        const expected = [...pages].sort((a, b) => (a < b ? -1 : 1)).map(hex);
        ctx.expect(what, expected, observed);
      }
    },
  },
  'clear-dirty-log': {
    act({ ctx, g, vm, tdpDirty }, s, name) {
      const parts =
        'gpa' in s
          ? vm
              .pieces(s.gpa, s.size)
              .map((p) => ({ slot: p.slot, first: Number(p.offset >> 12n), count: Number(p.size >> 12n) }))
          : [{ slot: s.slot, first: s.first ?? 0, count: s.pages }];
      for (const { slot, first, count: given } of parts) {
        const npages = Number(g.vm.memslot(slot).npages);
        const count = given ?? Math.max(npages - first, 0);
        const refused = clearDirtyRefusal(npages, first, count);
        let observed = 'ok';
        try {
          g.vm.clearDirtyLog(slot, first, count);
        } catch (e) {
          if (!(e instanceof KvmError) || e.call !== 'KVM_CLEAR_DIRTY_LOG') throw e;
          observed = e.code;
        }
        const what = `${name}: KVM_CLEAR_DIRTY_LOG of slot ${slot} pages [${first}, ${first + count})`;
        if (refused) ctx.note(`${what}: the model says KVM refuses it: ${refused}`);
        ctx.expect(what, refused ? 'EINVAL' : 'ok', observed);
        if (refused || observed !== 'ok') continue;
        vm.clearDirty(slot, first, count);
        if (tdpDirty) vm.tdp.clearDirtyLog(0, slot, first, count);
      }
    },
  },
  'memslot-delete': {
    act({ g, vm }, s) {
      g.vm.deleteMemslot(s.slot);
      vm.deleteSlot(s.slot);
    },
  },
  'memslot-create': {
    act({ ctx, sc, g, vm, slotOf }, s, name) {
      const m = sc.memslots.find((x) => x.slot === s.slot)!;
      g.vm.addMemslot(slotSpec(m));
      vm.setSlot(slotOf(s.slot));
      ctx.note(`${name}: memslot ${s.slot} at ${hex(m.gpa)}, HVA ${hex(g.vm.memslot(s.slot).hva)}`);
    },
  },
  'write-memory': {
    act({ ctx, g, vm }, s, name) {
      const word = new Uint8Array(8);
      new DataView(word.buffer).setBigUint64(0, BigInt.asUintN(64, s.value), true);
      const bytes = g.mem.bytes(s.gpa, Number(s.size), true);
      for (let off = 0; off < bytes.length; off += 8) bytes.set(word, off);
      // A store even of the bytes already there (zeros over the zero page replace it).
      for (const p of vm.pieces(s.gpa, s.size)) g.vm.memslot(p.slot).storeThrough(Number(p.offset), Number(p.size));
      ctx.note(`${name}: ${vm.hostWrite(s.gpa, s.size)}`);
    },
  },
  'memslot-move': {
    act({ g, vm, slotOf }, s) {
      g.vm.moveMemslot(s.slot, s.gpa);
      vm.setSlot(slotOf(s.slot));
    },
  },
  'memslot-flags': {
    act({ ctx, sc, g, vm, slotOf }, s, name) {
      if (sc.memslots.find((m) => m.slot === s.slot)?.backing === 'thp') {
        const huge = g.vm.memslot(s.slot).hugeBytes();
        ctx.note(
          `${name}: host backing before the change: ${huge === undefined ? 'unknown (no smaps)' : `${huge >> 10} KiB of ${g.vm.memslot(s.slot).size >> 10} KiB in transparent huge pages`}`,
        );
      }
      g.vm.setMemslotFlags(s.slot, memFlags(s));
      vm.setSlot(slotOf(s.slot));
    },
  },
  madvise: {
    act({ ctx, g, vm }, s, name) {
      for (const p of piecesOf(vm, s)) {
        g.vm.memslot(p.slot).madvise(Number(p.offset), Number(p.size), ADVICE[s.advice]);
        ctx.note(`${name}: ${vm.change(p.slot, p.offset, p.size, s.advice)}`);
      }
    },
  },
  munmap: {
    act({ ctx, g, vm }, s, name) {
      for (const p of piecesOf(vm, s)) {
        g.vm.memslot(p.slot).munmap(Number(p.offset), Number(p.size));
        ctx.note(`${name}: ${vm.change(p.slot, p.offset, p.size, 'munmap')}`);
      }
    },
  },
  remap: {
    act({ g, vm }, s) {
      for (const p of piecesOf(vm, s)) {
        g.vm.memslot(p.slot).remap(Number(p.offset), Number(p.size));
        vm.remap(p.slot, p.offset, p.size);
      }
    },
  },
  mprotect: {
    act({ ctx, g, vm }, s, name) {
      for (const p of piecesOf(vm, s)) {
        g.vm.memslot(p.slot).mprotect(Number(p.offset), Number(p.size), PROTS[s.prot]);
        ctx.note(`${name}: ${vm.change(p.slot, p.offset, p.size, 'mprotect', s.prot)}`);
      }
    },
  },
  'pre-fault': {
    act({ ctx, g, vm }, s, name) {
      if (!ctx.profile.capabilities.KVM_CAP_PRE_FAULT_MEMORY) {
        ctx.note(`${name}: not applicable here (KVM_CAP_PRE_FAULT_MEMORY is 0); the step is skipped`);
        return;
      }
      const model = vm.preFault(s.gpa, s.size);
      // KVM_PRE_FAULT_MEMORY may stop early (a signal, a reschedule): call again for the rest.
      // A page without host memory (munmap, PROT_NONE) stops it with EFAULT.
      let left = s.size;
      let error: string | undefined;
      try {
        for (let tries = 0; left > 0n && tries < 64; tries++) left = g.vcpu.preFault(s.gpa + s.size - left, left);
      } catch (e) {
        if (!(e instanceof KvmError && e.call === 'KVM_PRE_FAULT_MEMORY')) throw e;
        error = e.code;
      }
      const end = s.gpa + s.size;
      ctx.expect(
        `${name}: KVM_PRE_FAULT_MEMORY bytes left`,
        model.efault === undefined ? 0n : { left: end - model.efault, error: 'EFAULT' },
        error === undefined && model.efault === undefined ? left : { left, ...(error ? { error } : {}) },
      );
      ctx.note(`${name}: ${model.note}`);
    },
  },
  'punch-hole': {
    act({ ctx, g, vm }, s, name) {
      g.vm.memslot(s.slot).punchHole(Number(s.offset), Number(s.size));
      ctx.note(`${name}: ${vm.change(s.slot, s.offset, s.size, 'punch_hole')}`);
    },
  },
  'read-memory': {
    act({ ctx, g }, s, name) {
      const b = g.mem.bytes(s.gpa, s.size);
      let v = 0n;
      for (let i = s.size - 1; i >= 0; i--) v = (v << 8n) | BigInt(b[i]!);
      ctx.expect(`${name}: value the VMM reads`, BigInt.asUintN(s.size * 8, s.expect), v);
    },
  },
  'close-guest-memfd': {
    act({ ctx, g, vm }, s, name) {
      g.vm.memslot(s.slot).closeGuestMemfd();
      ctx.note(`${name}: ${vm.closeGuestMemfd(s.slot)}`);
    },
  },
  translate: {
    act({ ctx, g, vm, tdpDirty, translate }, s, name) {
      const w = translate(s.gva);
      const expected = s.expect ?? (w.ok ? { valid: true, gpa: w.gpa } : { valid: false });
      const t = g.vcpu.translate(s.gva);
      ctx.expect(`${name}: KVM_TRANSLATE`, expected, t.valid ? { valid: true, gpa: t.gpa } : { valid: false });
      // Its A writes go through the slot's HVA and mark the table pages dirty (kvm_vcpu_mark_page_dirty).
      for (const a of w.adWrites) {
        vm.markDirty(a.pteGpa);
        if (tdpDirty) vm.tdp.markDirty(0, Number(a.pteGpa >> 12n));
      }
      ctx.note(`${name}: model (KVM's walker, access 0) ${w.ok ? `valid, GPA ${hex(w.gpa)}` : `invalid: ${w.reason}`}`);
      if (s.expect) return;
      // KVM's walker sets A on the entries of a walk that succeeds (update_accessed_dirty_bits), none on a failing one.
      const want = w.levels.map((l) => ({
        level: l.level,
        at: l.pteGpa,
        value: w.adWrites.find((a) => a.pteGpa === l.pteGpa)?.new ?? l.pte,
      }));
      const seen = w.levels.map((l) => ({ level: l.level, at: l.pteGpa, value: g.mem.read64(l.pteGpa) }));
      ctx.expect(`${name}: PTEs after`, want, seen);
    },
  },
};

/** The handlers of a guest step's kind (the one place the union is narrowed by lookup). */
export function guestAction<S extends GuestSide<Step>>(s: S): GuestAction<S> {
  return STEP_ACTIONS[s.kind] as unknown as GuestAction<S>;
}

/** The handlers of a host step's kind. */
export function hostAction<S extends HostSide<Step>>(s: S): HostAction<S> {
  return STEP_ACTIONS[s.kind] as unknown as HostAction<S>;
}

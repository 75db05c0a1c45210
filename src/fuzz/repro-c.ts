// A standalone C reproducer of a scenario, in the style of a KVM selftest:
// one file, only libc and <linux/kvm.h>, that replays what the scenario
// engine (src/run/engine.ts) does and checks, after every step, what the
// models predicted. It exits 1 at the first mismatch, printing one line that
// names the step and the field as the engine names its comparison, 0 when
// KVM behaves, and 4 (KSFT_SKIP) when this host cannot run it.
//
// Nothing is observed at generation time: the guest's memory is simulated in
// model terms (SimMem) from bring-up to the last step, so every expected value
// (exceptions, values read, PTEs and their A/D bits, MMIO exits, dirty pages,
// translations) is the models' alone. The guest program, its page tables and
// bring-up are the engine's own (the same builders and step table), embedded
// as bytes. What a reproducer cannot carry yet is refused with one line
// (ReproUnsupported), or, for checks it leaves out, listed in `omitted`.
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Asm } from '../arch/x86/asm.js';
import { bringUp, type GuestMem } from '../arch/x86/bringup.js';
import { channel } from '../arch/x86/guest.js';
import { LAYOUT } from '../arch/x86/layout.js';
import { PTE_A, PTE_D } from '../arch/x86/pte.js';
import { hex, PAGE } from '../base/units.js';
import type { Memslot } from '../model/memslots.js';
import { BACKINGS, clearDirtyRefusal, memFlags, modelSlot, ModelVm, type BackingName } from '../model/vm.js';
import { accessedLatitude, walkWith, type PagingConfig, type WalkResult } from '../model/walk.js';
import type { Wrong, WrongWalk } from '../model/wrong.js';
import { guestWalkerOf, type HostProfile } from '../probe/probe.js';
import { hostCpu, stepName } from '../run/engine.js';
import { tdpLogsDirty, tdpModelOptions } from '../run/host-policy.js';
import { OldTranslations } from '../run/old-translations.js';
import { LoopLimit, predictLoop, type LoopPrediction } from '../run/loop.js';
import { describeWalk, predictAccess, type AccessStep, type Prediction, type PredictFrom } from '../run/predict.js';
import { emitWrpkru, guestAction, IMPLICIT_DESCRIPTOR, type EntryFinder } from '../run/step-actions.js';
import {
  bringUpOptions,
  buildScenarioTables,
  pagingConfigFor,
  slotSpec,
  type ScenarioTables,
} from '../scenario/build.js';
import type { HostRange, Scenario, SlotPiece, Step } from '../scenario/types.js';
import { C_PRELUDE } from './repro-prelude.js';

/** A scenario, or a part of one, that a reproducer cannot carry yet; the message is one line. */
export class ReproUnsupported extends Error {}

/** A failing comparison: the step's index and the field, as the engine names it (`exceptions`, `dirty pages`, ...). */
export interface Mismatch {
  step: number;
  field?: string;
}

export interface ReproOptions {
  /** The host the reproducer is for: the CPU the models walk with, and the host's paths (host-policy.ts). */
  profile: HostProfile;
  /** A deliberately wrong model (model/wrong.ts): its predictions go into the program. */
  wrong?: Wrong;
  /** The mismatch to reproduce: the program ends after its step, and a field it cannot check is refused. */
  mismatch?: Mismatch;
}

export interface Reproducer {
  /** The C program. */
  source: string;
  /** Steps it carries. */
  steps: number;
  /** Checks of the scenario that the program leaves out, one line each. */
  omitted: string[];
}

/** The fields the program checks, named as the engine names its comparisons. */
export const C_FIELDS = [
  'MMIO exits',
  'guest reaches the end of the step',
  'KVM_RUN stops for the missing host memory',
  'exceptions',
  'value read',
  'PTEs after',
  'run again without the host memory',
  'redone on the next run, the access completes',
  'redone: exceptions',
  'redone: value read',
  'redone: value in memory',
  'dirty pages',
  'KVM_TRANSLATE',
  'KVM_PRE_FAULT_MEMORY bytes left',
  'sum of the values read',
  'value the VMM reads',
  'guest finishes',
] as const;

/** The fields whose names carry a count, a slot or a range. */
const C_FIELD_FORMS = [
  { shown: 'paging entries after (N)', re: /^paging entries after \(\d+\)$/ },
  { shown: 'dirty pages of slot N in LO..HI', re: /^dirty pages of slot \d+ in 0x[0-9a-f]+\.\.0x[0-9a-f]+$/ },
  {
    shown: 'KVM_CLEAR_DIRTY_LOG of slot N pages [FIRST, END)',
    re: /^KVM_CLEAR_DIRTY_LOG of slot \d+ pages \[\d+, \d+\)$/,
  },
];

/** Whether the program checks the field the engine names so. */
export function cChecks(field: string): boolean {
  return (C_FIELDS as readonly string[]).includes(field) || C_FIELD_FORMS.some((f) => f.re.test(field));
}

/** The step and field of an engine comparison (`step 4 read64 0x8000000000 cpl3: exceptions`), if it names a step. */
export function parseMismatch(what: string): Mismatch | undefined {
  const m = /^step (\d+) [^:]*: (.*)$/.exec(what);
  return m ? { step: Number(m[1]), field: m[2]! } : undefined;
}

/** The C reproducer of `sc` on the host `opts.profile` describes. */
export function cReproducer(sc: Scenario, opts: ReproOptions): string {
  return reproducer(sc, opts).source;
}

/** The C reproducer of `sc`, with what it leaves out. Throws ReproUnsupported, or NotApplicable for this host. */
export function reproducer(sc: Scenario, opts: ReproOptions): Reproducer {
  if (sc.race || sc.vcpus > 1)
    throw new ReproUnsupported(`${sc.name}: races of several vCPUs are not carried by a C reproducer yet`);
  if (sc.memslots.some((m) => m.backing === 'guest_memfd'))
    throw new ReproUnsupported(`${sc.name}: guest_memfd slots are not carried by a C reproducer yet`);
  const inSlot = sc.mappings.findIndex((m) => m.tables);
  if (inSlot >= 0)
    throw new ReproUnsupported(
      `${sc.name}: mappings[${inSlot}]: page tables in a user slot are not carried by a C reproducer yet`,
    );
  const mm = opts.mismatch;
  if (mm) {
    if (!Number.isInteger(mm.step) || mm.step < 0 || mm.step >= sc.steps.length)
      throw new ReproUnsupported(`${sc.name}: no step ${mm.step} (the scenario has ${sc.steps.length})`);
    if (mm.field !== undefined && !cChecks(mm.field))
      throw new ReproUnsupported(
        `${sc.name}: step ${mm.step}: the field "${mm.field}" is not checked by a C reproducer (it checks: ${[...C_FIELDS, ...C_FIELD_FORMS.map((f) => f.shown)].join(', ')})`,
      );
    sc = { ...sc, steps: sc.steps.slice(0, mm.step + 1) };
  }
  return new Gen(sc, opts).generate();
}

// ---------------------------------------------------------------------------------
// Guest memory in model terms.

type PageState = 'unmapped' | 'prot-none' | 'prot-read';

/** One memslot's host memory: sparse pages, and the pages munmap or mprotect made untouchable. */
interface SimSlot {
  id: number;
  gpa: bigint;
  size: bigint;
  flags: number;
  backing: BackingName;
  /**
   * The host address the model sees it at: any, as long as slots do not
   * overlap and huge pages align (the program aligns THP to 2 MiB), and
   * congruent to the GPA as a placement asks.
   */
  hva: bigint;
  pages: Map<number, Uint8Array>;
  states: Map<number, PageState>;
}

/**
 * Guest-physical memory as the models say it is: what bring-up, the tables
 * and the program wrote, then each step's effect (the value a write stores,
 * the A/D bits the walk sets, PTE stores, host changes to the backing).
 */
class SimMem implements GuestMem {
  readonly slots = new Map<number, SimSlot>();

  add(
    id: number,
    gpa: bigint,
    size: bigint,
    backing: BackingName,
    flags: number,
    place?: { modulo: bigint; offset: bigint },
  ): SimSlot {
    const s: SimSlot = {
      id,
      gpa,
      size,
      flags,
      backing,
      hva: 0x7f0000000000n + (BigInt(id) << 32n) + (place ? (gpa + place.offset) % place.modulo : 0n),
      pages: new Map(),
      states: new Map(),
    };
    this.slots.set(id, s);
    return s;
  }

  slot(id: number): SimSlot {
    const s = this.slots.get(id);
    if (!s) throw new RangeError(`no memslot ${id}`);
    return s;
  }

  slotOf(gpa: bigint, len = 1): SimSlot | undefined {
    for (const s of this.slots.values()) if (gpa >= s.gpa && gpa + BigInt(len) <= s.gpa + s.size) return s;
    return undefined;
  }

  /** Why the host process cannot read (or write) these bytes, as src/kvm's Memslot.untouchable says. */
  untouchable(gpa: bigint, len: number, write: boolean): PageState | undefined {
    const s = this.slotOf(gpa, len);
    if (!s) return undefined;
    for (let p = (gpa - s.gpa) >> 12n; p <= (gpa - s.gpa + BigInt(len) - 1n) >> 12n; p++) {
      const st = s.states.get(Number(p));
      if (st === 'unmapped' || st === 'prot-none' || (st === 'prot-read' && write)) return st;
    }
    return undefined;
  }

  private page(gpa: bigint, create: boolean): { page: Uint8Array | undefined; off: number } {
    const s = this.slotOf(gpa);
    if (!s) throw new RangeError(`GPA ${hex(gpa)} is in no memslot`);
    const idx = Number((gpa - s.gpa) >> 12n);
    let page = s.pages.get(idx);
    if (!page && create) s.pages.set(idx, (page = new Uint8Array(4096)));
    return { page, off: Number(gpa & 0xfffn) };
  }

  read(gpa: bigint, n: number): bigint {
    let v = 0n;
    for (let i = n - 1; i >= 0; i--) {
      const { page, off } = this.page(gpa + BigInt(i), false);
      v = (v << 8n) | BigInt(page?.[off] ?? 0);
    }
    return v;
  }

  write(gpa: bigint, bytes: ArrayLike<number>): void {
    for (let i = 0; i < bytes.length; i++) {
      const { page, off } = this.page(gpa + BigInt(i), true);
      page![off] = bytes[i]!;
    }
  }

  read64(gpa: bigint): bigint {
    return this.read(gpa, 8);
  }

  write64(gpa: bigint, v: bigint): void {
    this.writeN(gpa, v, 8);
  }

  writeN(gpa: bigint, v: bigint, n: number): void {
    this.write(gpa, leBytes(v, n));
  }

  /** Forgets the contents of pages [off, off + size) of a slot (fresh zeroed memory behind them). */
  drop(s: SimSlot, off: bigint, size: bigint): void {
    for (let p = Number(off >> 12n); p < Number((off + size) >> 12n); p++) s.pages.delete(p);
  }

  setState(s: SimSlot, off: bigint, size: bigint, st: PageState | undefined): void {
    for (let p = Number(off >> 12n); p < Number((off + size) >> 12n); p++) {
      if (st) s.states.set(p, st);
      else s.states.delete(p);
    }
  }
}

/** Whether a backing's contents live in a file that outlives the mapping (memfd) or a shared object (MADV_DONTNEED keeps them). */
const keepsOnDontneed = (b: BackingName) => b === 'shared' || b === 'memfd';

function leBytes(v: bigint, n: number): number[] {
  return Array.from({ length: n }, (_, i) => Number((BigInt.asUintN(64, v) >> BigInt(8 * i)) & 0xffn));
}

// ---------------------------------------------------------------------------------
// C text.

const C_BACKING: Record<BackingName, string> = {
  anon: 'ANON',
  thp: 'THP',
  shared: 'SHARED',
  memfd: 'MEMFD',
  hugetlb2m: 'HUGETLB_2M',
  hugetlb1g: 'HUGETLB_1G',
  guest_memfd: 'GUEST_MEMFD', // refused by reproducer() before any C is written
};
const C_ADVICE = { dontneed: 'MADV_DONTNEED', hugepage: 'MADV_HUGEPAGE', nohugepage: 'MADV_NOHUGEPAGE' };
const C_PROT = { none: 'PROT_NONE', read: 'PROT_READ', 'read-write': 'PROT_READ | PROT_WRITE' };

/** A 64-bit constant in C. */
const u64 = (v: bigint | number) => `0x${BigInt.asUintN(64, BigInt(v)).toString(16)}ULL`;
const cstr = (s: string) => `"${s.replace(/[\\"]/g, (c) => `\\${c}`)}"`;
/** Text safe inside a C block comment. */
const ctext = (s: string) => s.replace(/\*\//g, '* /');

/**
 * Non-zero runs of a page as 8-byte words, split where 64 or more zero bytes
 * separate them. A run starts and ends on a word boundary: the bytes that
 * rounding adds are zero (they lie in a gap or at the page's end).
 */
function runs(page: Uint8Array): { off: number; words: bigint[] }[] {
  const out: { off: number; words: bigint[] }[] = [];
  const dv = new DataView(page.buffer, page.byteOffset, page.byteLength);
  let i = 0;
  while (i < page.length) {
    while (i < page.length && page[i] === 0) i++;
    if (i >= page.length) break;
    const start = i & ~7;
    let end = i;
    while (i < page.length) {
      if (page[i] !== 0) end = ++i;
      else if (i - end >= 64) break;
      else i++;
    }
    const words: bigint[] = [];
    for (let o = start; o < end; o += 8) words.push(dv.getBigUint64(o, true));
    out.push({ off: start, words });
  }
  return out;
}

/** A run of guest memory as a C array of little-endian 8-byte words (page-table entries read as they are). */
function wordArray(name: string, words: bigint[]): string {
  const lines: string[] = [];
  for (let i = 0; i < words.length; i += 4)
    lines.push(
      `\t${words
        .slice(i, i + 4)
        .map((w) => `0x${w.toString(16)}`)
        .join(', ')},`,
    );
  return `static const uint64_t ${name}[] = {\n${lines.join('\n')}\n};`;
}

// ---------------------------------------------------------------------------------
// The generator: the engine's step loop, on the models and SimMem.

type GuestSideStep = Extract<Step, { side: 'guest' }>;
type HostSideStep = Extract<Step, { side: 'host' }>;

interface Pending {
  step: number;
  name: string;
  access: AccessStep;
  walk: WalkResult;
  gpa: bigint;
}

class Gen {
  readonly mem = new SimMem();
  /**
   * The engine's book of old translations (run/old-translations.ts). The
   * program cannot tell the generator whether KVM used one, so an entry stays
   * after a step that allowed it (the engine drops it when KVM faulted).
   */
  private readonly old = new OldTranslations();
  readonly vm: ModelVm;
  readonly wrongWalk: ReadonlySet<WrongWalk>;
  readonly cfg0: PagingConfig;
  cfg: PagingConfig;
  readonly built: ScenarioTables;
  readonly root: bigint;
  readonly regs: { cr0: bigint; cr3: bigint; cr4: bigint; efer: bigint };
  readonly manualProtect: boolean;
  readonly tdpDirty: boolean;
  readonly entries: EntryFinder;
  /** The main program, line by line (one tab in). */
  readonly body: string[] = [];
  /** Byte arrays of the guest images. */
  readonly images: string[] = [];
  readonly omitted: string[] = [];
  pending: Pending | undefined;
  preFaultUsed = false;
  ended = false;
  /** The guest has run (its WRPKRU, first in the program, with it). */
  ran = false;
  /**
   * The entries of the walks the guest's own program makes at every run (its
   * code, stack, exception log, descriptor tables): where a scenario's
   * mapping shares one (an upper-level entry) and a step clears its A bit,
   * the program's next walk through it may set A again, or not, as the host's
   * TLB or shadow pages still hold the translation. The engine reads the
   * entry before each prediction; a program written beforehand accepts A set
   * there.
   */
  readonly ownWalks: ReadonlySet<bigint>;

  constructor(
    readonly sc: Scenario,
    readonly opts: ReproOptions,
  ) {
    const { profile } = opts;
    const cpu = hostCpu(profile, sc, {});
    this.wrongWalk = opts.wrong?.walk ?? new Set<WrongWalk>();
    if (sc.memslots.length + 1 > 32) throw new ReproUnsupported(`${sc.name}: more than 31 memslots`);
    this.mem.add(0, 0n, LAYOUT.identityEnd, 'anon', 0);
    const boot = bringUp(this.mem, bringUpOptions(sc));
    this.regs = { cr0: boot.cr0, cr3: boot.tables.root, cr4: boot.cr4, efer: boot.efer };
    this.root = boot.tables.root;
    this.manualProtect = sc.steps.some((s) => s.side === 'host' && s.kind === 'clear-dirty-log');
    for (const m of sc.memslots) if (m.created === 'at-start') this.addSlot(m);
    this.built = buildScenarioTables(sc, this.mem, boot);
    this.cfg0 = this.cfg = { ...pagingConfigFor(sc, cpu), walker: guestWalkerOf(profile) };
    this.entries = {
      entry: (gva, level) => this.built.entries(gva, level),
      walk: (gva) => this.plainWalk(gva).levels.map((l) => l.pteGpa),
    };
    const wrong = { ...(opts.wrong?.tdp ? { wrong: opts.wrong.tdp } : {}), wrongVm: opts.wrong?.vm };
    this.vm = new ModelVm({ ...tdpModelOptions(profile), record: false, ...wrong });
    for (const s of this.mem.slots.values()) this.vm.setSlot(this.slotOf(s.id));
    this.tdpDirty = tdpLogsDirty(profile);
    const own = [LAYOUT.gdt, LAYOUT.idt, LAYOUT.excLog, LAYOUT.mailbox, LAYOUT.handlers, LAYOUT.kernelStackTop - 8n];
    this.ownWalks = new Set(
      [...own, LAYOUT.userStackTop - 8n, LAYOUT.code, LAYOUT.userCode].flatMap((gva) =>
        this.plainWalk(gva).levels.map((l) => l.pteGpa),
      ),
    );
  }

  /** A declared slot's memory in SimMem, placed as it asks. */
  addSlot(m: Scenario['memslots'][number]): SimSlot {
    return this.mem.add(m.slot, m.gpa, m.size, m.backing, memFlags(m), slotSpec(m).placement);
  }

  /** The C statements that allocate a declared slot's memory and hand the slot to KVM. */
  createSlot(m: Scenario['memslots'][number]): string[] {
    const i = this.sc.memslots.indexOf(m) + 1;
    const place = slotSpec(m).placement;
    const at = place ? `, placed so that (HVA - GPA) mod ${hex(place.modulo)} = ${hex(place.offset)}` : '';
    return [
      `/* Memslot ${m.slot}: ${hex(m.size)} bytes at GPA ${hex(m.gpa)}, ${m.backing}${m.logDirty ? ', dirty logging' : ''}${m.readonly ? ', read-only' : ''}${at}. */`,
      `slots[${i}] = (struct slot){ .id = ${m.slot}, .gpa = ${u64(m.gpa)}, .size = ${u64(m.size)}, .flags = ${memFlags(m)}, .backing = ${C_BACKING[m.backing]}${place ? `, .modulo = ${u64(place.modulo)}, .offset = ${u64(place.offset)}` : ''} };`,
      `add_slot(&slots[${i}]);`,
    ];
  }

  /** The model's view of a slot as it is now. */
  slotOf(id: number): Memslot {
    const s = this.mem.slot(id);
    return modelSlot(
      { slot: id, asId: 0, gpa: s.gpa, size: s.size, hva: s.hva, flags: s.flags },
      BACKINGS[s.backing].page,
    );
  }

  walk(access: Parameters<typeof walkWith>[3]): WalkResult {
    return walkWith(this.wrongWalk, this.cfg, this.root, access, (gpa) => this.mem.read64(gpa));
  }

  /**
   * KVM_TRANSLATE as the engine's kvmTranslate: KVM's software walker with
   * access 0 (a supervisor read), the address sign-extended from bit 47 (56),
   * EFLAGS.AC clear (the guest stops at a sync with it clear), PKRU 0 until the
   * guest has run its WRPKRU.
   */
  kvmTranslate(gva: bigint): WalkResult {
    const top = this.cfg.levels === 5 ? 56n : 47n;
    const low = gva & ((1n << (top + 1n)) - 1n);
    const canon = (low >> top) & 1n ? BigInt.asUintN(64, low | ~((1n << (top + 1n)) - 1n)) : low;
    const cfg = { ...this.cfg, walker: 'kvm' as const, ...(this.ran ? {} : { pkru: 0 }) };
    return walkWith(this.wrongWalk, cfg, this.root, { gva: canon, kind: 'read', cpl: 0 }, (gpa) =>
      this.mem.read64(gpa),
    );
  }

  plainWalk(gva: bigint): WalkResult {
    const plain = { ...this.cfg, cr0Wp: false, cr4Smep: false, cr4Smap: false, cr4Pke: false };
    return walkWith(new Set(), plain, this.root, { gva, kind: 'read', cpl: 0 }, (gpa) => this.mem.read64(gpa));
  }

  peek(gpa: bigint, size: number): bigint | string {
    const why = this.mem.untouchable(gpa, size, false);
    return why ? `host memory ${why}` : this.mem.read(gpa, size);
  }

  line(...l: string[]): void {
    for (const x of l) this.body.push(x === '' ? '' : `\t${x}`);
  }

  /** The engine's load(): exec targets, implicit descriptors, then the program of every step. */
  load(): { code: number } {
    const { sc, mem } = this;
    for (const s of sc.steps) {
      if (s.side !== 'guest' || s.kind !== 'access' || s.access !== 'exec') continue;
      for (let k = 0; k < (s.loop?.count ?? 1); k++) {
        const w = this.plainWalk(s.gva + BigInt(k) * (s.loop?.stride ?? 0n));
        if (w.ok && mem.slotOf(w.gpa)) {
          mem.write(w.gpa, [0xc3]);
          this.vm.hostWrote(w.gpa, 1);
        }
      }
    }
    for (const s of sc.steps) {
      if (s.side !== 'guest' || s.kind !== 'access' || !s.implicit) continue;
      const w = this.plainWalk(s.gva);
      if (w.ok && mem.slotOf(w.gpa, 8)) {
        mem.write64(w.gpa, IMPLICIT_DESCRIPTOR);
        this.vm.hostWrote(w.gpa, 8);
      }
    }
    const k = new Asm({ origin: Number(LAYOUT.code) });
    const u = new Asm({ origin: Number(LAYOUT.userCode) });
    if (this.cfg.cr4Pke) emitWrpkru(k, this.cfg.pkru);
    const emitter = { k, u, pkru: this.cfg.pkru, entries: this.entries };
    sc.steps.forEach((s, i) => {
      if (s.side === 'guest') guestAction(s).emit(emitter, s);
      channel.sync(k, i);
    });
    channel.done(k);
    mem.write(LAYOUT.userCode, u.assemble().code);
    const code = k.assemble().code;
    mem.write(LAYOUT.code, code);
    return { code: code.length };
  }

  generate(): Reproducer {
    const { sc } = this;
    this.load();
    // The images, as they are before the first step.
    const setup: string[] = [];
    let n = 0;
    for (const s of [...this.mem.slots.values()].sort((a, b) => a.id - b.id)) {
      for (const [idx, page] of [...s.pages].sort((a, b) => a[0] - b[0])) {
        for (const r of runs(page)) {
          const name = `slot${s.id}_${(idx * 4096 + r.off).toString(16)}`;
          this.images.push(wordArray(name, r.words));
          setup.push(`copy_in(${s.id}, ${u64(idx * 4096 + r.off)}, ${name}, sizeof(${name}));`);
          n += r.words.length * 8;
        }
      }
    }
    this.line(
      'create_vm();',
      '/* Memslot 0: bring-up memory, identity-mapped (GDT, TSS, IDT, handlers, tables, code). */',
    );
    this.line(`slots[0] = (struct slot){ .id = 0, .gpa = 0, .size = ${u64(LAYOUT.identityEnd)}, .backing = ANON };`);
    this.line('add_slot(&slots[0]);', 'create_vcpu();');
    if (this.manualProtect) {
      this.line(
        '/* KVM_CLEAR_DIRTY_LOG is used: manual dirty-log protection, as the harness turns it on. */',
        '{',
        '\tstruct kvm_enable_cap cap = { .cap = KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, .args = { 1 } };',
        '\tif (ioctl(vm_fd, KVM_ENABLE_CAP, &cap))',
        '\t\tfail_errno("KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2)");',
        '}',
      );
    }
    for (const m of sc.memslots) if (m.created === 'at-start') this.line(...this.createSlot(m));
    this.line(`/* Guest images: ${n} bytes of bring-up, page tables, the program and its data. */`, ...setup);
    const r = this.regs;
    this.line(
      `/* Long mode: CR0 ${hex(r.cr0)}, CR3 ${hex(r.cr3)} (the root table), CR4 ${hex(r.cr4)}, EFER ${hex(r.efer)}; RIP at the program. */`,
      `set_long_mode(${u64(r.cr0)}, ${u64(r.cr3)}, ${u64(r.cr4)}, ${u64(r.efer)}, ${u64(LAYOUT.code)}, ${u64(LAYOUT.kernelStackTop)});`,
      '',
    );
    for (let i = 0; i < sc.steps.length && !this.ended; i++) {
      const s = sc.steps[i]!;
      const name = stepName(i, s);
      if (s.stats)
        this.omitted.push(`${name}: stats ${Object.keys(s.stats).join(', ')} (not checked by the C program)`);
      if (s.tdp)
        this.omitted.push(
          `${name}: tdp ${s.tdp.map((t) => hex(t.gpa)).join(', ')} (KVM's per-GFN picture, not checked by the C program)`,
        );
      if (s.side === 'guest') this.guestStep(i, s, name);
      else this.hostStep(i, s, name);
      this.ran = true;
      this.line('');
    }
    if (!this.ended) {
      this.finishPending();
      if (!this.ended) {
        this.line('/* The end: the guest reports done. */', 'step = "end";', '{');
        this.line('\tstruct stop st = run_vcpu();');
        this.line(
          '\tif (st.kind != STOP_DONE)',
          '\t\tMISMATCH("guest finishes", "expected done, observed %s", st.desc);',
          '}',
        );
      }
    }
    return { source: this.source(), steps: sc.steps.length, omitted: this.omitted };
  }

  source(): string {
    const { sc, opts } = this;
    const p = opts.profile;
    const wrong = [...this.wrongWalk, ...Object.keys(opts.wrong?.tdp ?? {})];
    const head = [
      '/*',
      ` * Reproducer of the kvmharness scenario "${sc.name}"${sc.source ? ` (${sc.source})` : ''}.`,
      ...wrapComment(sc.description),
      ' *',
      ` * Generated for a ${p.flavour} host (${p.tdp.enabled ? `TDP: ${p.tdp.kind}` : 'no TDP, shadow MMU'}; guest CPU ${p.cpu?.vendor ?? '?'}, MAXPHYADDR ${this.cfg0.maxPhyAddr}, guest walks by ${this.cfg0.walker}).`,
      ' * Every expected value below is what the models predicted when this file was generated.',
      ...(wrong.length ? [` * With a deliberately wrong model: ${wrong.join(', ')}.`] : []),
      ...(opts.mismatch
        ? [` * Reproduces step ${opts.mismatch.step}${opts.mismatch.field ? `: ${opts.mismatch.field}` : ''}.`]
        : []),
      ...this.omitted.map((o) => ` * Not carried: ${ctext(o)}`),
      ' *',
      ' * Build and run: gcc -O2 -Wall -o repro repro.c && ./repro',
      ' * Exit status: 0 KVM behaved as predicted; 1 the first mismatch (one line: MISMATCH <step>: <field>: ...);',
      ' * 2 a system call failed; 4 (KSFT_SKIP) this host cannot run it.',
      ' */',
    ];
    return [
      ...head,
      C_PRELUDE,
      ...(this.preFaultUsed ? [PRE_FAULT_C] : []),
      '/* ---- guest images ---- */',
      '',
      ...this.images,
      '',
      'int main(void)',
      '{',
      ...this.body,
      '\tprintf("ok: %s\\n", ' + cstr(`${sc.name}: every step as the models predict`) + ');',
      '\treturn 0;',
      '}',
      '',
    ].join('\n');
  }

  stepHeader(i: number, name: string, what: string, model: string[]): void {
    this.line(`/* Step ${i}: ${ctext(what)}`);
    for (const m of model) this.line(` * ${ctext(m)}`);
    this.line(' */', `step = ${cstr(name)};`);
  }

  predict(s: AccessStep, notes: string[]): Prediction {
    const implicit = s.implicit ? { implicitSupervisor: true } : {};
    const w = this.walk({ gva: s.gva, kind: s.access, cpl: s.cpl, eflagsAc: s.eflagsAc, size: s.size, ...implicit });
    return predictAccess(s, w, this.predictFrom(notes));
  }

  predictFrom(notes: string[]): PredictFrom {
    return {
      vm: this.vm,
      profile: this.opts.profile,
      walker: this.cfg.walker,
      peek: (gpa, size) => this.peek(gpa, size),
      entry: (gva, level) => this.built.entries(gva, level),
      note: (m) => notes.push(m),
    };
  }

  /**
   * A loop step, as the engine's loopStep: the model predicts every access in
   * turn (run/loop.ts predictLoop), the guest makes them in one run, and the
   * program checks the exception, the sum of the values read and every paging
   * entry the walks used.
   */
  loopStep(i: number, s: AccessStep, name: string): void {
    this.finishPending();
    if (this.ended) return;
    const notes: string[] = [];
    const env = {
      g: { mem: this.mem },
      walk: (a: Parameters<typeof walkWith>[3], read: (gpa: bigint) => bigint) =>
        walkWith(this.wrongWalk, this.cfg, this.root, a, read),
      from: () => this.predictFrom(notes),
    };
    let p: LoopPrediction;
    try {
      p = predictLoop(env, s, name);
    } catch (e) {
      if (e instanceof LoopLimit) throw new ReproUnsupported(e.message);
      throw e;
    }
    const loop = s.loop!;
    const f = p.fault;
    const verb = s.access === 'read' ? 'reads' : s.access === 'write' ? `writes ${hex(s.value)} to` : 'executes at';
    this.stepHeader(
      i,
      name,
      `the guest ${verb} ${s.size} byte${s.size > 1 ? 's' : ''} at ${hex(s.gva)}, then every ${hex(loop.stride)} bytes, ${loop.count} times, at CPL ${s.cpl}${s.eflagsAc ? ' with EFLAGS.AC' : ''}; the loop stops at the first fault.`,
      [`model: ${p.done} of ${loop.count} accesses complete${f ? `, then a fault at ${hex(f.cr2)}` : ''}`, ...notes],
    );
    const body = ['clear_exceptions();', 'struct stop st = run_vcpu();', `expect_sync(st, ${i});`];
    if (f)
      body.push(
        `/* model: #PF, error code ${hex(f.errorCode)} */`,
        `static const struct exc want_exc[] = { { ${f.vector}, ${u64(f.errorCode)}, ${u64(f.cr2)} } };`,
        'expect_exceptions("exceptions", 1, want_exc);',
      );
    else body.push('/* model: no exception */', 'expect_exceptions("exceptions", 0, NULL);');
    if (s.access === 'read') body.push(`expect_value("sum of the values read", 8, ${u64(p.sum)}, st.rsi);`);
    // A processor may set A on the entries a faulting walk used; KVM's walker never does.
    const mayA = new Set(f ? accessedLatitude(f.walk, this.cfg.walker) : []);
    const at = [...p.entries.keys()].sort((a, b) => (a < b ? -1 : 1));
    const field = cstr(`paging entries after (${at.length})`);
    for (const gpa of at) {
      const e = p.entries.get(gpa)!;
      const alt = (mayA.has(gpa) || this.ownWalks.has(gpa)) && (e.value | PTE_A) !== e.value ? e.value | PTE_A : 0n;
      body.push(`expect_pte(${field}, ${e.level}, ${u64(gpa)}, ${u64(e.value)}, ${u64(alt)});`);
    }
    this.line('{', ...body.map((b) => `\t${b}`), '}');
    // The effect, as the model has it.
    for (const gpa of at) this.mem.write64(gpa, p.entries.get(gpa)!.value);
    if (s.access === 'write') for (const gpa of p.touched) this.mem.writeN(gpa, s.value, s.size);
    for (const gpa of p.adWritten) this.vm.markDirty(gpa);
    if (s.access === 'write') for (const gpa of p.touched) this.vm.markDirty(gpa);
  }

  guestStep(i: number, s: GuestSideStep, name: string): void {
    if (s.kind === 'access' && s.loop) return this.loopStep(i, s, name);
    const notes: string[] = [];
    const pred = s.kind === 'access' ? this.predict(s, notes) : undefined;
    this.finishPending();
    if (this.ended) return;
    const what =
      s.kind === 'access'
        ? `the guest ${s.implicit ? 'implicitly reads (a descriptor load)' : s.access === 'read' ? 'reads' : s.access === 'write' ? `writes ${hex(s.value)} to` : 'executes at'} ${s.size} byte${s.size > 1 ? 's' : ''} at ${hex(s.gva)} at CPL ${s.cpl}${s.eflagsAc ? ' with EFLAGS.AC' : ''}.`
        : `the guest does ${describeGuestStep(s)}.`;
    const model: string[] = [];
    if (pred) model.push(`model: ${describeWalk(pred.walk)}`, ...notes);
    this.stepHeader(i, name, what, model);
    this.line('{');
    const body: string[] = [];
    if (pred?.expectFault === 'gp') body.push('uint64_t cr2_before = get_cr2();');
    body.push('struct mmio seen[4];', 'int n;', 'clear_exceptions();', 'struct stop st = run_step(seen, &n);');
    if (pred) {
      const m = pred.mmio;
      if (m) {
        const data = m.data ? BigInt(`0x${Buffer.from(m.data).reverse().toString('hex') || '0'}`) : 0n;
        body.push(
          `/* model: one MMIO ${m.isWrite ? 'write' : 'read'} exit at GPA ${hex(m.gpa)}, ${m.len} bytes */`,
          `static const struct mmio want_mmio[] = { { ${u64(m.gpa)}, ${m.len}, ${m.isWrite ? 1 : 0}, ${u64(data)} } };`,
          'expect_mmio(n, seen, 1, want_mmio);',
        );
      } else body.push('expect_mmio(n, seen, 0, NULL);');
    } else body.push('expect_mmio(n, seen, 0, NULL);');
    if (pred?.hostFault && s.kind === 'access') {
      body.push(
        `/* model: ${ctext(pred.hostFault.why)} */`,
        `expect_stop_efault("KVM_RUN stops for the missing host memory", st);`,
      );
      this.line(...body.map((b) => `\t${b}`), '}');
      for (const a of pred.walk.adWrites) this.mem.write64(a.pteGpa, a.new);
      this.pending = { step: i, name, access: s, walk: pred.walk, gpa: pred.hostFault.gpa };
      return;
    }
    body.push(`expect_sync(st, ${i});`);
    const paging = guestAction(s).paging;
    if (paging) this.cfg = paging(this.cfg, s);
    this.old.step(s);
    if (pred && s.kind === 'access') body.push(...this.compareAccess(s, pred));
    else this.guestEffect(s);
    this.line(...body.map((b) => `\t${b}`), '}');
  }

  /** What a non-access guest step does to memory (its PTE stores), in the model. */
  guestEffect(s: GuestSideStep): void {
    if (s.kind === 'write-pte') {
      const at = this.entries.entry(s.gva, s.level);
      this.mem.write64(at, s.value ?? (this.mem.read64(at) & ~s.clear) | s.set);
    } else if (s.kind === 'clear-ad') {
      for (const at of this.entries.walk(s.gva)) this.mem.write64(at, this.mem.read64(at) & ~(PTE_A | PTE_D));
    }
  }

  /** The engine's compareAccess, as C, and the access's effect on SimMem and the model VM. */
  compareAccess(s: AccessStep, pred: Prediction): string[] {
    const gpa = this.old.allowed(s, pred);
    if (gpa !== undefined) {
      // As the engine: no exception means the old translation, which the architecture allows until invalidated.
      const old =
        s.access === 'read' && !s.implicit
          ? [`\texpect_value("value read (old translation)", ${s.size}, ${u64(this.mem.read(gpa, s.size))}, st.rsi);`]
          : [];
      return [
        `/* the tables changed by a host write since an earlier access used this page's translation, and nothing invalidated it: the old translation (GPA ${hex(gpa)}) is allowed beside the model's walk */`,
        'if (rd(EXC_LOG, 4) == 0) {',
        ...old,
        '} else {',
        ...this.strictAccess(s, pred).map((l) => `\t${l}`),
        '}',
      ];
    }
    return this.strictAccess(s, pred);
  }

  /** compareAccess without the old translation's latitude. */
  strictAccess(s: AccessStep, pred: Prediction): string[] {
    const out: string[] = [];
    const w = pred.walk;
    if (pred.expectFault === false) out.push('/* model: no exception */', 'expect_exceptions("exceptions", 0, NULL);');
    else if (pred.expectFault === 'gp')
      out.push(
        '/* model: #GP(0), CR2 unchanged */',
        'struct exc want_exc[] = { { 13, 0, cr2_before } };',
        'expect_exceptions("exceptions", 1, want_exc);',
      );
    else
      out.push(
        `/* model: #PF, error code ${hex(pred.expectFault)} */`,
        `static const struct exc want_exc[] = { { 14, ${u64(pred.expectFault)}, ${u64(w.ok ? s.gva : w.cr2)} } };`,
        'expect_exceptions("exceptions", 1, want_exc);',
      );
    if (s.access === 'read' && !s.implicit) {
      const v = pred.expectValue ?? 0n;
      if (typeof v === 'string')
        throw new ReproUnsupported(`the model expects a value from memory the host cannot read (${v})`);
      out.push(`expect_value("value read", ${s.size}, ${u64(v)}, st.rsi);`);
    }
    const mayA = new Set(accessedLatitude(w, this.cfg.walker));
    for (const p of pred.expectPtes) {
      const alt = mayA.has(p.at) || this.ownWalks.has(p.at) ? p.value | PTE_A : 0n;
      out.push(
        `expect_pte("PTEs after", ${p.level}, ${u64(p.at)}, ${u64(p.value)}, ${u64(alt === p.value ? 0n : alt)});`,
      );
    }
    // The effect, as the model has it.
    for (const a of w.adWrites) this.mem.write64(a.pteGpa, a.new);
    if (s.expect?.ptes) for (const p of pred.expectPtes) this.mem.write64(p.at, p.value);
    if (w.ok) {
      for (const a of w.adWrites) this.vm.markDirty(a.pteGpa);
      if (s.access === 'write' && !pred.mmio && pred.expectFault === false) this.mem.writeN(w.gpa, s.value, s.size);
      if (s.access === 'write' && !pred.mmio) this.vm.markDirty(w.gpa);
    }
    return out;
  }

  /** The engine's finishPending: an access that stopped for missing host memory is run again. */
  finishPending(): void {
    const p = this.pending;
    if (!p) return;
    this.pending = undefined;
    const { vm } = this;
    this.line(
      `/* The access of step ${p.step}, which stopped for missing host memory, runs again. */`,
      `step = ${cstr(p.name)};`,
      '{',
    );
    this.line('\tstruct stop st = run_vcpu();');
    if (vm.fault(p.gpa, p.access.access).kind === 'efault') {
      this.line(
        '\t/* model: nothing restored the host memory, so the access fails again; the steps after it are not run */',
        '\texpect_stop_efault("run again without the host memory", st);',
        `\tprintf("ok: %s\\n", ${cstr(`${this.sc.name}: the vCPU cannot get past step ${p.step} until a host step restores its memory, as predicted`)});`,
        '\treturn 0;',
        '}',
      );
      this.ended = true;
      return;
    }
    this.line(
      `\tif (st.kind != STOP_SYNC || st.id != ${p.step})`,
      `\t\tMISMATCH("redone on the next run, the access completes", "expected sync ${p.step}, observed %s", st.desc);`,
      '\texpect_exceptions("redone: exceptions", 0, NULL);',
    );
    const size = p.access.size;
    if (p.access.access === 'read')
      this.line(`\texpect_value("redone: value read", ${size}, rd(${u64(p.gpa)}, ${size}), st.rsi);`);
    if (p.access.access === 'write') {
      this.line(
        `\texpect_value("redone: value in memory", ${size}, ${u64(p.access.value)}, rd(${u64(p.gpa)}, ${size}));`,
      );
      this.mem.writeN(p.gpa, p.access.value, size);
      vm.markDirty(p.gpa);
    }
    this.line('}');
    for (const a of p.walk.adWrites) vm.markDirty(a.pteGpa);
    vm.fault(p.gpa, p.access.access);
  }

  hostStep(i: number, s: HostSideStep, name: string): void {
    const model: string[] = [];
    const code = HOST_STEPS[s.kind](this, s as never, model);
    this.old.step(s);
    this.stepHeader(i, name, `the host ${describeHostStep(s)}.`, model);
    this.line(...code);
    this.finishPending();
    if (this.ended) return;
    this.line(`step = ${cstr(name)};`, `expect_sync(run_vcpu(), ${i});`);
  }

  /** The slots' parts a host range step acts on, as the engine's piecesOf: its slot's, or each slot's part of its GPA range. */
  pieces(r: HostRange): SlotPiece[] {
    return 'gpa' in r ? this.vm.pieces(r.gpa, r.size) : [r];
  }

  /** A slot's C expression. */
  cslot(id: number): string {
    return `slot_by_id(${id})`;
  }

  /** The host's change of part of a slot's memory, in SimMem and the model VM; returns the model's note. */
  hostChange(
    s: { slot: number; offset: bigint; size: bigint },
    why: 'dontneed' | 'munmap' | 'mprotect' | 'hugepage' | 'nohugepage' | 'punch_hole',
    prot?: 'none' | 'read' | 'read-write',
  ): string {
    const sl = this.mem.slot(s.slot);
    if (why === 'dontneed' && !keepsOnDontneed(sl.backing)) this.mem.drop(sl, s.offset, s.size);
    if (why === 'munmap') {
      if (sl.backing !== 'memfd') this.mem.drop(sl, s.offset, s.size);
      this.mem.setState(sl, s.offset, s.size, 'unmapped');
    }
    if (why === 'mprotect')
      this.mem.setState(
        sl,
        s.offset,
        s.size,
        prot === 'none' ? 'prot-none' : prot === 'read' ? 'prot-read' : undefined,
      );
    return this.vm.change(s.slot, s.offset, s.size, why, prot);
  }
}

/** What a host step does in C, and to SimMem and the model VM; `model` collects the comment lines. */
type HostCode<S> = (g: Gen, s: S, model: string[]) => string[];
type HostStepTable = { [K in HostSideStep['kind']]: HostCode<Extract<HostSideStep, { kind: K }>> };

const HOST_STEPS: HostStepTable = {
  'write-pte'(g, s) {
    const at = g.entries.entry(s.gva, s.level);
    const old = g.mem.read64(at);
    g.mem.write64(at, s.value ?? (old & ~s.clear) | s.set);
    return s.value !== undefined
      ? [`wr64(${u64(at)}, ${u64(s.value)});`]
      : [`wr64(${u64(at)}, (rd(${u64(at)}, 8) & ~${u64(s.clear)}) | ${u64(s.set)});`];
  },
  'clear-ad'(g, s) {
    const out: string[] = [];
    for (const l of g.plainWalk(s.gva).levels) {
      g.mem.write64(l.pteGpa, l.pte & ~(PTE_A | PTE_D));
      out.push(`wr64(${u64(l.pteGpa)}, rd(${u64(l.pteGpa)}, 8) & ~${u64(PTE_A | PTE_D)});`);
    }
    return out;
  },
  'get-dirty-log'(g, s, model) {
    const { vm } = g;
    // KVM_GET_DIRTY_LOG is of a whole slot; over a GPA range, of each slot it crosses, compared inside it.
    const parts = 'gpa' in s ? vm.pieces(s.gpa, s.size) : [{ slot: s.slot, offset: 0n, size: undefined }];
    const out: string[] = [];
    for (const part of parts) {
      const sl = g.mem.slot(part.slot);
      const lo = sl.gpa + part.offset;
      const hi = lo + (part.size ?? sl.size);
      const inside = (p: bigint) => p >= lo && p < hi;
      const modelPages = vm.harvestDirty(part.slot, g.manualProtect);
      const pages = new Set((s.expect ?? modelPages).map((x) => x & ~(PAGE - 1n)).filter(inside));
      const field =
        part.size === undefined ? 'dirty pages' : `dirty pages of slot ${part.slot} in ${hex(lo)}..${hex(hi)}`;
      if (g.tdpDirty) {
        const logged = (g.manualProtect ? vm.tdp.peekDirty(0, part.slot) : vm.tdp.getDirtyLog(0, part.slot))
          .map((gfn) => BigInt(gfn) << 12n)
          .filter(inside);
        const extra = logged.filter((p) => !pages.has(p));
        for (const p of extra) pages.add(p);
        if (extra.length)
          model.push(
            `${field}: the TDP model also expects ${extra.map(hex).join(', ')} (mapped writable on a read fault)`,
          );
      }
      const expected = [...pages].sort((a, b) => (a < b ? -1 : 1));
      model.push(`model: ${field} [${expected.map(hex).join(', ')}]${s.expect ? ' (the scenario says so)' : ''}`);
      const call = (n: number, want: string) =>
        `expect_dirty(${cstr(field)}, ${part.slot}, ${u64(lo)}, ${u64(hi)}, ${n}, ${want});`;
      if (!expected.length) out.push(call(0, 'NULL'));
      else
        out.push(
          '{',
          `\tstatic const uint64_t want[] = { ${expected.map(u64).join(', ')} };`,
          `\t${call(expected.length, 'want')}`,
          '}',
        );
    }
    return out;
  },
  'clear-dirty-log'(g, s, model) {
    const parts =
      'gpa' in s
        ? g.vm
            .pieces(s.gpa, s.size)
            .map((p) => ({ slot: p.slot, first: Number(p.offset >> 12n), count: Number(p.size >> 12n) }))
        : [{ slot: s.slot, first: s.first ?? 0, count: s.pages }];
    const out: string[] = [];
    for (const { slot, first, count: given } of parts) {
      const npages = Number(g.mem.slot(slot).size >> 12n);
      const count = given ?? Math.max(npages - first, 0);
      const refused = clearDirtyRefusal(npages, first, count);
      const field = `KVM_CLEAR_DIRTY_LOG of slot ${slot} pages [${first}, ${first + count})`;
      model.push(`model: ${field}: ${refused ? `KVM refuses it (EINVAL): ${refused}` : 'KVM takes it'}`);
      out.push(`clear_dirty(${cstr(field)}, ${slot}, ${first}, ${count}, ${refused ? 1 : 0});`);
      if (refused) continue;
      g.vm.clearDirty(slot, first, count);
      if (g.tdpDirty) g.vm.tdp.clearDirtyLog(0, slot, first, count);
    }
    return out;
  },
  'memslot-delete'(g, s) {
    g.mem.slots.delete(s.slot);
    g.vm.deleteSlot(s.slot);
    return [`delete_slot(${g.cslot(s.slot)});`];
  },
  'memslot-create'(g, s, model) {
    const m = g.sc.memslots.find((x) => x.slot === s.slot)!;
    const sl = g.addSlot(m);
    g.vm.setSlot(g.slotOf(s.slot));
    model.push(`model: memslot ${s.slot} at GPA ${hex(m.gpa)}, HVA ${hex(sl.hva)} in the model`);
    return g.createSlot(m);
  },
  'write-memory'(g, s, model) {
    const why = g.mem.slotOf(s.gpa, Number(s.size))
      ? g.mem.untouchable(s.gpa, Number(s.size), true)
      : 'not inside one memslot';
    if (why) throw new ReproUnsupported(`write-memory at ${hex(s.gpa)}+${hex(s.size)}: the host memory is ${why}`);
    for (let off = 0n; off < s.size; off += 8n) g.mem.write64(s.gpa + off, s.value);
    model.push(g.vm.hostWrite(s.gpa, s.size));
    return [`write_words(${u64(s.gpa)}, ${u64(s.size)}, ${u64(s.value)});`];
  },
  'read-memory'(g, s, model) {
    const why = g.mem.slotOf(s.gpa, s.size) ? g.mem.untouchable(s.gpa, s.size, false) : 'not inside one memslot';
    if (why) throw new ReproUnsupported(`read-memory at ${hex(s.gpa)}: the host memory is ${why}`);
    model.push(
      `the scenario expects ${hex(BigInt.asUintN(s.size * 8, s.expect))}; the models' memory holds ${hex(g.mem.read(s.gpa, s.size))}`,
    );
    return [
      `expect_value("value the VMM reads", ${s.size}, ${u64(BigInt.asUintN(s.size * 8, s.expect))}, rd(${u64(s.gpa)}, ${s.size}));`,
    ];
  },
  'memslot-move'(g, s) {
    g.mem.slot(s.slot).gpa = s.gpa;
    g.vm.setSlot(g.slotOf(s.slot));
    return [`${g.cslot(s.slot)}->gpa = ${u64(s.gpa)};`, `set_region(${g.cslot(s.slot)}, ${g.cslot(s.slot)}->size);`];
  },
  'memslot-flags'(g, s) {
    const flags = memFlags(s);
    g.mem.slot(s.slot).flags = flags;
    g.vm.setSlot(g.slotOf(s.slot));
    return [`${g.cslot(s.slot)}->flags = ${flags};`, `set_region(${g.cslot(s.slot)}, ${g.cslot(s.slot)}->size);`];
  },
  madvise(g, s, model) {
    return g.pieces(s).flatMap((p) => {
      model.push(g.hostChange(p, s.advice));
      return [
        `if (madvise(${g.cslot(p.slot)}->hva + ${u64(p.offset)}, ${u64(p.size)}, ${C_ADVICE[s.advice]}))`,
        '\tfail_errno("madvise");',
      ];
    });
  },
  munmap(g, s, model) {
    return g.pieces(s).flatMap((p) => {
      model.push(g.hostChange(p, 'munmap'));
      return [`if (munmap(${g.cslot(p.slot)}->hva + ${u64(p.offset)}, ${u64(p.size)}))`, '\tfail_errno("munmap");'];
    });
  },
  remap(g, s) {
    return g.pieces(s).map((p) => {
      const sl = g.mem.slot(p.slot);
      if (sl.backing !== 'memfd') g.mem.drop(sl, p.offset, p.size);
      g.mem.setState(sl, p.offset, p.size, undefined);
      g.vm.remap(p.slot, p.offset, p.size);
      return `remap_range(${g.cslot(p.slot)}, ${u64(p.offset)}, ${u64(p.size)});`;
    });
  },
  mprotect(g, s, model) {
    return g.pieces(s).flatMap((p) => {
      model.push(g.hostChange(p, 'mprotect', s.prot));
      return [
        `if (mprotect(${g.cslot(p.slot)}->hva + ${u64(p.offset)}, ${u64(p.size)}, ${C_PROT[s.prot]}))`,
        '\tfail_errno("mprotect");',
      ];
    });
  },
  'pre-fault'(g, s, model) {
    if (!g.opts.profile.capabilities.KVM_CAP_PRE_FAULT_MEMORY) {
      model.push('not applicable here (KVM_CAP_PRE_FAULT_MEMORY is 0): skipped, as the harness skips it');
      return [];
    }
    g.preFaultUsed = true;
    const m = g.vm.preFault(s.gpa, s.size);
    model.push(m.note);
    // A page without host memory stops KVM there with EFAULT: the bytes from it on are left.
    const left = m.efault === undefined ? 0n : s.gpa + s.size - m.efault;
    return [`pre_fault(${u64(s.gpa)}, ${u64(s.size)}, ${u64(left)});`];
  },
  'punch-hole'(g, s, model) {
    const sl = g.mem.slot(s.slot);
    if (sl.backing !== 'memfd') unsupported(s); // guest_memfd slots are refused before
    g.mem.drop(sl, s.offset, s.size);
    model.push(g.hostChange(s, 'punch_hole'));
    return [`punch_hole(${g.cslot(s.slot)}, ${u64(s.offset)}, ${u64(s.size)});`];
  },
  // guest_memfd slots are refused in reproducer(); so is their close.
  'close-guest-memfd': (_g, s) => unsupported(s),
  translate(g, s, model) {
    const w = g.kvmTranslate(s.gva);
    const e = s.expect ?? (w.ok ? { valid: true, gpa: w.gpa } : { valid: false });
    model.push(`model (KVM's walker, access 0): ${e.valid ? `valid, GPA ${hex(e.gpa ?? 0n)}` : 'invalid'}`);
    const out = [`expect_translate(${u64(s.gva)}, ${e.valid ? 1 : 0}, ${u64(e.gpa ?? 0n)});`];
    // KVM's walker sets A on the entries of a walk that succeeds, through the slot's HVA (the pages are dirty).
    for (const a of w.adWrites) {
      g.vm.markDirty(a.pteGpa);
      if (g.tdpDirty) g.vm.tdp.markDirty(0, Number(a.pteGpa >> 12n));
    }
    if (s.expect) {
      for (const a of w.adWrites) g.mem.write64(a.pteGpa, a.new);
      return out;
    }
    for (const l of w.levels) {
      const value = w.adWrites.find((a) => a.pteGpa === l.pteGpa)?.new ?? l.pte;
      const alt = g.ownWalks.has(l.pteGpa) && !(value & PTE_A) ? value | PTE_A : 0n;
      out.push(`expect_pte("PTEs after", ${l.level}, ${u64(l.pteGpa)}, ${u64(value)}, ${u64(alt)});`);
      g.mem.write64(l.pteGpa, value);
    }
    return out;
  },
};

function unsupported(s: HostSideStep): never {
  throw new ReproUnsupported(`the host step ${s.kind} is not carried by a C reproducer yet`);
}

/** KVM_PRE_FAULT_MEMORY, for headers older than 6.10. */
const PRE_FAULT_C = String.raw`#ifndef KVM_PRE_FAULT_MEMORY
struct kvm_pre_fault_memory {
	__u64 gpa;
	__u64 size;
	__u64 flags;
	__u64 padding[5];
};
#define KVM_PRE_FAULT_MEMORY _IOWR(KVMIO, 0xd5, struct kvm_pre_fault_memory)
#endif

/*
 * KVM_PRE_FAULT_MEMORY may stop early (a signal, a reschedule): call again for the rest. A page
 * without host memory stops it with EFAULT: want_left (0: none) bytes are then left.
 */
static void pre_fault(uint64_t gpa, uint64_t size, uint64_t want_left)
{
	struct kvm_pre_fault_memory r = { .gpa = gpa, .size = size };
	int err = 0;
	for (int tries = 0; r.size && tries < 64 && !err; tries++)
		if (ioctl(vcpu_fd, KVM_PRE_FAULT_MEMORY, &r) && errno != EINTR && errno != EAGAIN)
			err = errno;
	if (want_left ? err != EFAULT || r.size != want_left : err || r.size)
		MISMATCH("KVM_PRE_FAULT_MEMORY bytes left", "expected 0x%" X64 "%s, observed 0x%" X64 " (%s)", want_left,
			 want_left ? " with EFAULT" : "", (uint64_t)r.size, err ? strerror(err) : "no error");
}
`;

function describeGuestStep(s: GuestSideStep): string {
  switch (s.kind) {
    case 'invlpg':
      return `INVLPG ${hex(s.gva)}`;
    case 'reload-cr3':
      return 'a CR3 reload';
    case 'set-cr0-wp':
      return `CR0.WP := ${s.value ? 1 : 0}`;
    case 'set-cr4':
      return `CR4.${s.bit.toUpperCase()} := ${s.value ? 1 : 0}`;
    case 'write-pte':
      return `a store to the level-${s.level} entry of ${hex(s.gva)} (${s.value !== undefined ? `:= ${hex(s.value)}` : `set ${hex(s.set)}, clear ${hex(s.clear)}`})`;
    case 'clear-ad':
      return `stores clearing A and D along the walk of ${hex(s.gva)}`;
    case 'access':
      return `an access`;
  }
}

/** Where a host range step acts: part of a slot, or a GPA range over slots. */
const rangeText = (r: HostRange) =>
  'gpa' in r ? `GPA ${hex(r.gpa)}+${hex(r.size)}` : `+${hex(r.offset)}/${hex(r.size)} of slot ${r.slot}`;

function describeHostStep(s: HostSideStep): string {
  switch (s.kind) {
    case 'write-pte':
      return `rewrites the level-${s.level} entry of ${hex(s.gva)} (${s.value !== undefined ? `:= ${hex(s.value)}` : `set ${hex(s.set)}, clear ${hex(s.clear)}`}), which a shadow MMU does not see`;
    case 'clear-ad':
      return `clears A and D along the walk of ${hex(s.gva)}`;
    case 'get-dirty-log':
      return 'gpa' in s
        ? `gets the dirty log of each slot GPA ${hex(s.gpa)}+${hex(s.size)} crosses (KVM_GET_DIRTY_LOG), compared inside the range`
        : `gets the dirty log of slot ${s.slot} (KVM_GET_DIRTY_LOG)`;
    case 'clear-dirty-log':
      return 'gpa' in s
        ? `clears the dirty log of each slot's part of GPA ${hex(s.gpa)}+${hex(s.size)} (KVM_CLEAR_DIRTY_LOG)`
        : s.first === undefined && s.pages === undefined
          ? `clears the whole dirty log of slot ${s.slot} (KVM_CLEAR_DIRTY_LOG)`
          : `clears the dirty log of slot ${s.slot} from page ${s.first ?? 0}${s.pages === undefined ? ' to its end' : `, ${s.pages} pages`} (KVM_CLEAR_DIRTY_LOG)`;
    case 'memslot-delete':
      return `deletes memslot ${s.slot} and frees its memory`;
    case 'memslot-move':
      return `moves memslot ${s.slot} to GPA ${hex(s.gpa)}`;
    case 'memslot-create':
      return `creates memslot ${s.slot}`;
    case 'write-memory':
      return `writes ${hex(s.value)} to every word of ${hex(s.gpa)}+${hex(s.size)} through the HVA`;
    case 'memslot-flags':
      return `sets the flags of memslot ${s.slot}: dirty logging ${s.logDirty ? 'on' : 'off'}, ${s.readonly ? 'read-only' : 'writable'}`;
    case 'madvise':
      return `madvise(${s.advice}) of ${rangeText(s)}`;
    case 'munmap':
      return `munmaps ${rangeText(s)}`;
    case 'remap':
      return `maps fresh memory over ${rangeText(s)}`;
    case 'mprotect':
      return `mprotect(${s.prot}) of ${rangeText(s)}`;
    case 'pre-fault':
      return `pre-faults GPA ${hex(s.gpa)}/${hex(s.size)} (KVM_PRE_FAULT_MEMORY)`;
    case 'translate':
      return `translates ${hex(s.gva)} (KVM_TRANSLATE)`;
    case 'punch-hole':
      return `punches a hole at +${hex(s.offset)}/${hex(s.size)} of slot ${s.slot}'s file`;
    case 'read-memory':
      return `reads ${s.size} byte${s.size > 1 ? 's' : ''} at GPA ${hex(s.gpa)} through its mapping`;
    case 'close-guest-memfd':
      return `closes slot ${s.slot}'s guest_memfd`;
  }
}

function wrapComment(text: string, width = 100): string[] {
  const out: string[] = [];
  let cur = '';
  for (const w of ctext(text).split(/\s+/)) {
    if (cur && cur.length + w.length + 1 > width) {
      out.push(` * ${cur}`);
      cur = w;
    } else cur = cur ? `${cur} ${w}` : w;
  }
  if (cur) out.push(` * ${cur}`);
  return out;
}

// ---------------------------------------------------------------------------------
// Building and running.

export interface RunOutcome {
  /** The program's exit status (0 behaved, 1 mismatch, 2 a system call failed, 4 skip); -1 when it did not build or was killed. */
  exitCode: number;
  stdout: string;
  stderr: string;
}

/**
 * Builds a reproducer with the host's gcc (`-O2 -Wall -Werror`) in a fresh
 * temporary directory and runs it; the directory is removed afterwards. A
 * build failure is exitCode -1 with the compiler's messages in stderr.
 */
export async function buildAndRun(source: string, opts: { cc?: string; timeoutMs?: number } = {}): Promise<RunOutcome> {
  const dir = mkdtempSync(join(tmpdir(), 'kvmharness-repro-'));
  try {
    const c = join(dir, 'repro.c');
    const exe = join(dir, 'repro');
    writeFileSync(c, source);
    const built = await spawnCollect(opts.cc ?? 'gcc', ['-O2', '-Wall', '-Werror', '-o', exe, c], 120_000);
    if (built.exitCode !== 0) return { exitCode: -1, stdout: built.stdout, stderr: built.stderr };
    return await spawnCollect(exe, [], opts.timeoutMs ?? 120_000);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

function spawnCollect(cmd: string, args: string[], timeoutMs: number): Promise<RunOutcome> {
  return new Promise((resolve) => {
    const p = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    p.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    p.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const timer = setTimeout(() => p.kill('SIGKILL'), timeoutMs);
    p.on('error', (e) => {
      clearTimeout(timer);
      resolve({ exitCode: -1, stdout, stderr: `${stderr}${cmd}: ${e.message}\n` });
    });
    p.on('close', (code) => {
      clearTimeout(timer);
      resolve({ exitCode: code ?? -1, stdout, stderr });
    });
  });
}

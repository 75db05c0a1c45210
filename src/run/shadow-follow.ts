// The shadow MMU model (model/shadow.ts) beside a scenario run: on a
// shadow-MMU host every step is done to a ShadowMmu too, and after the step
// the shadow-page events KVM's tracepoints recorded and the picture of shadow
// pages they add up to are compared with the model's. Only the shadow pages
// of the root and of the scenario's own tables are compared (the tables
// under its mappings): the guest program's code, stack and data go through
// shadow pages of bring-up's tables, which the model does not follow access
// by access.
//
// The model works after the guest has run the step, on guest memory as it
// is then (a step is one operation, so that is the memory the operation
// left); the model's own stores are dropped. What each step kind does to the
// model is one table (SHADOW_STEPS), keyed like the scenario's step kinds.
import type { X86Guest } from '../arch/x86/guest.js';
import { isBringUpEntry, leafLevel, type ScenarioTables } from '../scenario/build.js';
import type { Scenario, Step } from '../scenario/types.js';
import { ShadowMmu, type HostExec, type ShadowEvent, type SpInfo } from '../model/shadow.js';
import type { WrongShadow } from '../model/wrong.js';
import { parseShadowEvent, SHADOW_EVENTS, ShadowPicture, type ObservedSp } from '../observe/shadow-mmu.js';
import { TraceSession } from '../observe/tracefs.js';
import type { CheckContext } from './types.js';

const ADDR = 0x000f_ffff_ffff_f000n;
const PTE_A = 0x20n;
const PTE_D = 0x40n;

/** What the follower needs of the run. */
export interface FollowEnv {
  ctx: CheckContext;
  sc: Scenario;
  g: X86Guest;
  built: ScenarioTables;
  /** Every entry the walk of `gva` reads (identity-mapped GPAs). */
  walk(gva: bigint): bigint[];
  wrong?: WrongShadow;
}

/** Why the shadow comparison does not apply on this host or to this scenario, or which host kind the model is. */
export function shadowHost(ctx: CheckContext, sc: Scenario): { exec: HostExec } | { why: string } {
  const p = ctx.profile;
  if (p.tdp.enabled && p.flavour !== 'kvm_pvm')
    return { why: "TDP is on: KVM shadows no guest tables, the guest's walks are the processor's" };
  if (!p.oracles.shadow_page_tracepoints.available)
    return { why: `no shadow-page tracepoints (${p.oracles.shadow_page_tracepoints.why})` };
  if (p.flavour === 'kvm_pvm') {
    if (sc.steps.some((s) => s.side === 'guest' && s.kind === 'access' && s.cpl === 3)) {
      return {
        why: "kvm_pvm runs CPL 3 code on shadow pages and emulates CPL 0; the model's emulated host covers CPL 0 only",
      };
    }
    return { exec: 'emulated' };
  }
  return { exec: 'native' };
}

type StepOf<K extends Step['kind']> = Extract<Step, { kind: K }>;
/** What a step does to the model; a string stops the comparison, saying what the model does not cover. */
type ShadowStep<S> = (f: ShadowFollow, s: S) => void | string;

/** One entry per step kind: a kind added to Step without its entry does not compile. */
const SHADOW_STEPS: { [K in Step['kind']]: ShadowStep<StepOf<K>> } = {
  access(f, s) {
    f.model.access(s.gva, s.access, s.value);
  },
  invlpg: (f, s) => f.model.invlpg(s.gva),
  'reload-cr3': (f) => f.model.setCr3(f.root),
  'set-cr0-wp': () => 'a CR0.WP change (a new MMU role, kvm_mmu_reset_context) is not in the shadow model',
  'set-cr4': () => 'a CR4 change (a new MMU role, kvm_mmu_reset_context) is not in the shadow model',
  'write-pte'(f, s) {
    // The VMM's store does not go through the shadow MMU; the model reads it from memory when it syncs.
    if (s.side === 'host') return;
    const at = f.env.built.entries(s.gva, s.level);
    const old = f.env.g.mem.read64(at);
    if (s.value === undefined) f.model.access(at, 'read');
    f.model.access(at, 'write', s.value ?? old);
  },
  'clear-ad'(f, s) {
    if (s.side === 'host') return;
    for (const at of f.env.walk(s.gva)) {
      f.model.access(at, 'read');
      f.model.access(at, 'write', f.env.g.mem.read64(at) & ~(PTE_A | PTE_D));
    }
  },
  // kvm_arch_flush_shadow_memslot(): every shadow page goes (kvm_mmu_zap_all_fast).
  'memslot-delete': (f) => f.model.zapAll(),
  'memslot-move': (f) => f.model.zapAll(),
  // A new slot zaps nothing (stale MMIO SPTEs die with the memslot generation).
  'memslot-create': () => {},
  'memslot-flags': () => 'a memslot flag change (write-protecting or splitting leaf SPTEs) is not in the shadow model',
  // Host memory changes drop leaf SPTEs through the rmap (kvm_unmap_gfn_range), no shadow page.
  madvise: () => {},
  munmap: () => {},
  remap: () => {},
  mprotect: () => {},
  // The host's stores through the HVA bypass the shadow MMU; the model reads memory when it syncs.
  'write-memory': () => {},
  // The dirty log write-protects leaf SPTEs; KVM_PRE_FAULT_MEMORY is TDP's; KVM_TRANSLATE walks the guest's tables.
  'get-dirty-log': () => {},
  'clear-dirty-log': () => {},
  'pre-fault': () => {},
  translate: () => {},
  // guest_memfd slots need TDP; a memfd's punched pages drop their leaf SPTEs through the rmap, no shadow page.
  'punch-hole': () => {},
  'close-guest-memfd': () => 'a guest_memfd slot is not in the shadow model',
  // The VMM's own loads do not go through the shadow MMU.
  'read-memory': () => {},
};

export class ShadowFollow {
  readonly model: ShadowMmu;
  readonly root: bigint;
  private readonly picture = new ShadowPicture();
  /** GFNs of the scenario's own tables below the root: the shadow pages compared. */
  private readonly gfns: Set<bigint>;
  private stopped = false;
  /** Observed shadow-page events the model places at the next step (see compare). */
  private early: string[] = [];

  private constructor(
    readonly env: FollowEnv,
    exec: HostExec,
    private readonly trace: TraceSession,
  ) {
    const { g, sc } = env;
    this.root = g.boot.tables.root;
    const mem = { read64: (gpa: bigint) => g.mem.read64(gpa), write64: () => {} };
    this.model = new ShadowMmu(
      { levels: sc.paging.levels, exec, cr0Wp: sc.paging.cr0.wp, wrong: env.wrong },
      mem,
      this.root,
    );
    this.gfns = scenarioTables(env);
    env.ctx.note(
      `shadow model: ${exec} host; shadow pages of the scenario's tables (${[...this.gfns].map((x) => x.toString(16)).join(', ') || 'none'}) ` +
        'compared after every step',
    );
  }

  /** A follower when the comparison applies here; otherwise a note says why not. */
  static async open(env: FollowEnv): Promise<ShadowFollow | undefined> {
    const host = shadowHost(env.ctx, env.sc);
    if ('why' in host) {
      env.ctx.note(`shadow model comparison not applicable here: ${host.why}`);
      return undefined;
    }
    // This thread too: a memslot deletion zaps in the ioctl's thread.
    const trace = TraceSession.open(env.ctx.target.fs, SHADOW_EVENTS, [
      await env.g.vcpu.tid(),
      env.ctx.target.addon.gettid(),
    ]);
    return new ShadowFollow(env, host.exec, trace);
  }

  close(): void {
    // Events observed ahead of a step that never came are a mismatch, not a carry.
    if (this.early.length && !this.stopped)
      this.env.ctx.expect('shadow-page events observed ahead of the model', [], this.early);
    this.early = [];
    this.trace.close();
  }

  /**
   * The step, done to the model after KVM did it: a guest step runs in the
   * KVM_RUN that reaches its sync (enter first), a host step acts before it.
   * `faulted`: the guest's access raised an exception, which builds no shadow page.
   */
  step(s: Step, faulted: boolean, name: string): void {
    if (this.stopped) return;
    if (s.side === 'guest') this.model.enter();
    if (s.side === 'guest' && s.kind === 'access') this.staleNote(s.gva, name);
    const why = faulted ? undefined : (SHADOW_STEPS[s.kind] as ShadowStep<Step>)(this, s);
    if (s.side === 'host') this.model.enter();
    if (why) return this.stop(name, why);
    this.compare(name);
  }

  /** Says so when the model's shadow PTE for `gva` maps a frame the architecture no longer allows. */
  private staleNote(gva: bigint, name: string): void {
    const frame = this.model.stale(gva);
    if (frame === undefined) return;
    this.env.ctx.note(
      `${name}: the shadow model says KVM still maps 0x${gva.toString(16)} to frame 0x${frame.toString(16)}, ` +
        "which the guest's tables no longer allow: they changed by a write KVM did not see, in a page that is not " +
        'unsync, and INVLPG and a CR3 load re-read only unsync pages',
    );
  }

  /** Ends the comparison: from here on the run does what the model does not cover. */
  stop(name: string, why: string): void {
    if (this.stopped) return;
    this.stopped = true;
    this.env.ctx.note(`${name}: the shadow model comparison stops here: ${why}`);
  }

  /**
   * The step's shadow-page events and the picture they add up to, against the
   * model's, for the scenario's tables. KVM may do what the model places at
   * the next guest entry before this step's exit reaches the harness (the
   * guest enters again on its way back): events beyond the prediction are
   * carried to the next step, whose prediction must then begin with them
   * exactly, and this step's picture, which already shows them, is not compared.
   */
  private compare(name: string): void {
    const { ctx } = this.env;
    const observed = this.trace
      .take()
      .map(parseShadowEvent)
      .filter((e): e is ObservedSp => !!e);
    for (const e of observed) this.picture.add(e);
    const mine = (e: { gfn: bigint; direct: boolean }) => !e.direct && this.gfns.has(e.gfn);
    const expected = this.model
      .take()
      .filter((e) => mine(e.sp))
      .map(modelEvent);
    const seen = [...this.early, ...observed.filter(mine).map(observedEvent)];
    this.early = [];
    if (seen.length > expected.length && expected.every((e, i) => seen[i] === e)) {
      this.early = seen.slice(expected.length);
      ctx.expect(`${name}: shadow-page events`, expected, seen.slice(0, expected.length));
      ctx.note(
        `${name}: KVM did ${this.early.length} shadow-page event(s) the model places at the next step before this one ended ` +
          `(${this.early.join(', ')}); the next step's prediction must begin with them`,
      );
      return;
    }
    ctx.expect(`${name}: shadow-page events`, expected, seen);
    const pages = this.model
      .pages()
      .filter((p) => !p.invalid && mine(p))
      .map(pageName)
      .sort();
    const seenPages = this.picture
      .list()
      .filter((k) => !k.includes('direct') && this.gfns.has(BigInt(`0x${k.split('@')[0]}`)));
    ctx.expect(`${name}: shadow pages`, pages, seenPages);
  }
}

/** The root and the tables the scenario's mappings created below it (not bring-up's), as GFNs. */
function scenarioTables(env: FollowEnv): Set<bigint> {
  const { sc, g, built } = env;
  const out = new Set<bigint>();
  for (const m of sc.mappings) {
    for (const gva of [m.gva, m.gva + m.size - 1n]) {
      for (let level = sc.paging.levels; level > leafLevel(m); level--) {
        if (isBringUpEntry(gva, level)) continue;
        const e = g.mem.read64(built.entries(gva, level));
        if (e & 1n) out.add((e & ADDR) >> 12n);
      }
    }
  }
  out.add(g.boot.tables.root >> 12n);
  return out;
}

function pageName(p: SpInfo): string {
  return `${p.gfn.toString(16)}@${p.level}${p.unsync ? ' unsync' : ''}`;
}

function modelEvent(e: ShadowEvent): string {
  return `${e.kind} ${e.sp.gfn.toString(16)}@${e.sp.level}${e.kind === 'get' ? (e.created ? ' new' : ' existing') : ''}`;
}

function observedEvent(e: ObservedSp): string {
  return `${e.kind} ${e.gfn.toString(16)}@${e.level}${e.kind === 'get' ? (e.created ? ' new' : ' existing') : ''}`;
}

// KVM's shadow MMU as a model (the model's mmu.c shadow half): what KVM does
// without TDP, where it shadows the guest's own page tables.
//
// - `ShadowMmu`: the shadow pages, keyed by (gfn, role) as
//   kvm_mmu_find_shadow_page() keys them, and the operations a guest drives:
//   enter() (vcpu_enter_guest: free obsolete roots, load a root), setCr3(),
//   invlpg(), access() (a read, write or fetch by the guest), zapAll()
//   (a memslot deleted or moved).
// - `unsyncWalk()`: the walk over a parent's unsync_child_bitmap
//   (__mmu_unsync_walk), an iterator the caller drives: for each unsync page
//   it yields, the caller syncs or zaps it and then clears the path's bits
//   (mmu_pages_clear_parents), as mmu_sync_children() does.
// - What the guest may see (`Access.allowed`): the architecture's rule, kept
//   apart from KVM's state: after a guest writes a PTE without invalidating,
//   the old translation and the new one; after INVLPG of that address or a
//   CR3 load, only the new one.
//
// Two kinds of host: 'native' (the guest runs on the shadow page tables: an
// access with no shadow PTE faults into KVM, which builds shadow pages along
// the guest's walk, FNAME(page_fault) and FNAME(fetch)) and 'emulated' (KVM
// emulates every guest instruction, as kvm_pvm does here: the emulator walks
// the guest's tables itself, no access faults into the shadow MMU, only the
// roots exist, and every guest write goes through kvm_mmu_track_write()).
//
// Not modelled: PAE and 2-level guests (quadrants, PAE roots), nested (guest
// mode roles), SMM, prefetch of neighbouring PTEs, dirty logging, huge host
// pages (a guest huge page is shadowed by direct 4 KiB pages), global pages
// and PCIDs, and the mmu_lock yields of mmu_sync_children().
//
// Levels are counted as in spte.ts: 1 = the 4 KiB page table.

import type { WrongShadow } from './wrong.js';

export type HostExec = 'native' | 'emulated';

/** ACC_* of mmu.h: what the guest's entries above allow, held in role.access. */
export const ACC = { X: 1, W: 2, U: 4, ALL: 7 } as const;

/** The part of kvm_mmu_page_role this model keys pages by (the rest is fixed per ShadowConfig). */
export interface Role {
  level: number;
  /** Stands in for a guest huge page: maps guest frames, shadows no guest table. */
  direct: boolean;
  access: number;
}

export interface ShadowConfig {
  levels: 4 | 5;
  exec: HostExec;
  /** CR0.WP: a supervisor write to a read-only guest page is allowed when clear. */
  cr0Wp?: boolean;
  wrong?: WrongShadow;
}

/** Reads and writes guest memory (the model's own image of it). */
export interface GuestMem {
  read64(gpa: bigint): bigint;
  write64(gpa: bigint, value: bigint): void;
}

/** A leaf shadow PTE: the guest frame it maps and whether the guest may write through it. */
interface Leaf {
  gfn: bigint;
  writable: boolean;
}

/** One shadow page (struct kvm_mmu_page). */
export class Sp {
  unsync = false;
  /** unsync_child_bitmap: indexes of entries whose child page is, or has below it, an unsync page. */
  readonly unsyncChildren = new Set<number>();
  /** Entries: a child shadow page or a leaf. */
  readonly spt = new Map<number, Sp | Leaf>();
  /** parent_ptes: where this page is linked. */
  readonly parents: { sp: Sp; index: number }[] = [];
  rootCount = 0;
  flooding = 0;
  invalid = false;

  constructor(
    readonly id: number,
    readonly gfn: bigint,
    readonly role: Role,
  ) {}

  /** Shadows a guest table (sp_has_gptes): not direct. */
  get hasGptes(): boolean {
    return !this.role.direct;
  }
}

/** A shadow page as the picture and the trace events show it. */
export interface SpInfo {
  gfn: bigint;
  level: number;
  direct: boolean;
  access: number;
  unsync: boolean;
  rootCount: number;
  invalid: boolean;
}

/** What KVM's shadow-page tracepoints would record (mmutrace.h). */
export type ShadowEvent =
  | { kind: 'get'; sp: SpInfo; created: boolean } // kvm_mmu_get_page
  | { kind: 'unsync'; sp: SpInfo } // kvm_mmu_unsync_page
  | { kind: 'sync'; sp: SpInfo } // kvm_mmu_sync_page (kvm_unlink_unsync_page)
  | { kind: 'zap'; sp: SpInfo }; // kvm_mmu_prepare_zap_page

/** The shadow MMU's VM stats (cumulative, except mmu_unsync, a gauge). */
export interface ShadowStats {
  mmu_unsync: number;
  mmu_shadow_zapped: number;
  mmu_pte_write: number;
  mmu_flooded: number;
  mmu_cache_miss: number;
}

export type AccessKind = 'read' | 'write' | 'exec';

export interface Access {
  /** The guest's translation now, or undefined when its tables map nothing (#PF). */
  gpa: bigint | undefined;
  /** Every frame the access may legitimately reach (architecture: stale TLB entries included). */
  allowed: bigint[];
  /** Native hosts: the frame KVM's shadow PTE maps after the access; it must be among `allowed`. */
  shadow?: bigint;
}

/** One level of the guest's walk as FNAME(walk_addr) records it. */
interface GuestStep {
  level: number;
  /** The table this level's entry is in. */
  tableGfn: bigint;
  index: number;
  pte: bigint;
  /** Access allowed by the entries from the root down to this one. */
  access: number;
}

const P = 1n;
const RW = 2n;
const US = 4n;
const PS = 0x80n;
const NX = 1n << 63n;
const ADDR = 0x000f_ffff_ffff_f000n;
const KVM_MMU_NUM_PREV_ROOTS = 3;

export function index(gva: bigint, level: number): number {
  return Number((gva >> BigInt(12 + 9 * (level - 1))) & 511n);
}

export function spInfo(sp: Sp): SpInfo {
  const { gfn, role, unsync, rootCount, invalid } = sp;
  return { gfn, level: role.level, direct: role.direct, access: role.access, unsync, rootCount, invalid };
}

/** "10@4", "16@1 unsync", "200@1 direct": how reports name a shadow page. */
export function spName(s: SpInfo | Sp): string {
  const i = s instanceof Sp ? spInfo(s) : s;
  return `${i.gfn.toString(16)}@${i.level}${i.direct ? ' direct' : ''}${i.unsync ? ' unsync' : ''}`;
}

function isSp(e: Sp | Leaf | undefined): e is Sp {
  return e instanceof Sp;
}

/**
 * The unsync pages below `parent`, in __mmu_unsync_walk()'s order (entries
 * by index, depth first), each with the path of (parent, index) that leads
 * to it. The caller must sync or zap each page it is handed and then call
 * clearParents(path) before asking for the next: the walk reads the bitmaps
 * as the caller leaves them. A bit whose entry holds no page, or a page that
 * is neither unsync nor has unsync children, is cleared on the way
 * (clear_unsync_child_bit).
 */
export function* unsyncWalk(
  parent: Sp,
  wrong?: WrongShadow,
  path: { sp: Sp; index: number }[] = [],
): Generator<{ sp: Sp; path: { sp: Sp; index: number }[] }> {
  const bits = [...parent.unsyncChildren].sort((a, b) => a - b);
  for (const i of bits) {
    if (!parent.unsyncChildren.has(i)) continue;
    if (wrong === 'sync-misses-last-child' && bits.length > 1 && i === bits.at(-1)) {
      // The mistake: the last child's bit is cleared as if it were clean.
      parent.unsyncChildren.delete(i);
      continue;
    }
    const child = parent.spt.get(i);
    if (!isSp(child)) {
      parent.unsyncChildren.delete(i);
      continue;
    }
    const here = [...path, { sp: parent, index: i }];
    if (child.unsyncChildren.size) {
      let found = false;
      for (const x of unsyncWalk(child, wrong, here)) {
        found = true;
        yield x;
      }
      if (!found) parent.unsyncChildren.delete(i);
    } else if (child.unsync) {
      yield { sp: child, path: here };
    } else {
      parent.unsyncChildren.delete(i);
    }
  }
}

/**
 * mmu_pages_clear_parents(): clears the bit of each (parent, index) of the
 * path, from the page's own parent upwards, stopping at the first parent
 * that still has other unsync children.
 */
export function clearParents(path: readonly { sp: Sp; index: number }[]): void {
  for (let k = path.length - 1; k >= 0; k--) {
    const { sp, index: i } = path[k]!;
    sp.unsyncChildren.delete(i);
    if (sp.unsyncChildren.size) return;
  }
}

export class ShadowMmu {
  /** Valid pages by gfn (the page hash); invalid roots still referenced live only in `root`/`prevRoots`. */
  private readonly hash = new Map<bigint, Sp[]>();
  private nextId = 1;
  private events: ShadowEvent[] = [];
  readonly stats: ShadowStats = {
    mmu_unsync: 0,
    mmu_shadow_zapped: 0,
    mmu_pte_write: 0,
    mmu_flooded: 0,
    mmu_cache_miss: 0,
  };
  /** Guest CR3 (the pgd), and the root KVM uses for it once loaded. */
  private cr3: bigint;
  root: Sp | undefined;
  /** mmu->prev_roots: roots kept for a fast CR3 switch back, most recent first. */
  private prevRoots: { pgd: bigint; sp: Sp }[] = [];
  /** KVM_REQ_MMU_SYNC pending. */
  private syncPending = false;
  /** What the guest's TLB may still hold: guest page -> frames used since the last invalidation. */
  private readonly tlb = new Map<bigint, Set<bigint>>();

  constructor(
    readonly cfg: ShadowConfig,
    private readonly mem: GuestMem,
    cr3: bigint,
  ) {
    this.cr3 = cr3 & ADDR;
  }

  /** The events recorded since the last take(). */
  take(): ShadowEvent[] {
    const e = this.events;
    this.events = [];
    return e;
  }

  /** Every valid shadow page, oldest first, plus the invalid roots still in use. */
  pages(): SpInfo[] {
    const all = [...this.hash.values()].flat();
    for (const r of [this.root, ...this.prevRoots.map((p) => p.sp)])
      if (r && r.invalid && !all.includes(r)) all.push(r);
    return all.sort((a, b) => a.id - b.id).map(spInfo);
  }

  /** The shadow pages an access to `gva` goes through, root first (the shadow walk, for_each_shadow_entry). */
  path(gva: bigint): SpInfo[] {
    const out: SpInfo[] = [];
    for (let sp: Sp | Leaf | undefined = this.root; isSp(sp); sp = sp.spt.get(index(gva, sp.role.level)))
      out.push(spInfo(sp));
    return out;
  }

  // -------------------------------------------------------------------------
  // Pages: find, create, zap

  private emit(kind: 'unsync' | 'sync' | 'zap', sp: Sp): void {
    this.events.push({ kind, sp: spInfo(sp) });
  }

  private valid(gfn: bigint): Sp[] {
    return this.hash.get(gfn) ?? [];
  }

  /** indirect_shadow_pages: pages that shadow a guest table. */
  private get indirect(): number {
    let n = 0;
    for (const l of this.hash.values()) n += l.filter((s) => s.hasGptes).length;
    return n;
  }

  /** Upper-level tables are write-tracked (account_shadowed): every write to them traps. */
  private writeTracked(gfn: bigint): boolean {
    return this.valid(gfn).some((s) => s.hasGptes && s.role.level > 1);
  }

  /**
   * kvm_mmu_get_shadow_page(): the valid page for (gfn, role), or a new one.
   * On the way, an unsync page of the gfn with another role is zapped when
   * the new role is an upper level (the gfn is about to be write-tracked);
   * an unsync page found is synced in place but stays unsync; a page found
   * has its write-flooding count cleared.
   */
  private getPage(gfn: bigint, role: Role): Sp {
    let found: Sp | undefined;
    for (const sp of [...this.valid(gfn)].reverse()) {
      if (sp.invalid) continue;
      if (sp.role.level !== role.level || sp.role.direct !== role.direct || sp.role.access !== role.access) {
        if (role.level > 1 && sp.unsync) this.zap(sp);
        continue;
      }
      if (sp.hasGptes && sp.unsync) this.syncPage(sp);
      sp.flooding = 0;
      found = sp;
      break;
    }
    let created = false;
    if (!found) {
      this.stats.mmu_cache_miss++;
      found = new Sp(this.nextId++, gfn, role);
      this.hash.set(gfn, [...this.valid(gfn), found]);
      // account_shadowed(): the guest may no longer write the table unseen.
      if (found.hasGptes) this.writeProtect(gfn);
      created = true;
    }
    this.events.push({ kind: 'get', sp: spInfo(found), created });
    return found;
  }

  /**
   * kvm_mmu_prepare_zap_page(): unsync pages below go first, then the
   * page's entries and its links from parents; an unsync page is unlinked
   * from the unsync state (which records a sync event). A root still in
   * use stays, invalid, until its last user lets go (freeRoot).
   */
  private zap(sp: Sp): void {
    this.emit('zap', sp);
    this.stats.mmu_shadow_zapped++;
    if (sp.role.level > 1) {
      for (const { sp: u, path } of unsyncWalk(sp)) {
        this.zap(u);
        clearParents(path);
      }
    }
    for (const [i, e] of sp.spt) {
      if (isSp(e)) this.unlink(e, sp, i);
    }
    sp.spt.clear();
    for (const { sp: parent, index: i } of [...sp.parents]) this.unlink(sp, parent, i);
    if (sp.unsync) this.unlinkUnsync(sp);
    if (!sp.invalid) {
      const l = this.valid(sp.gfn).filter((s) => s !== sp);
      if (l.length) this.hash.set(sp.gfn, l);
      else this.hash.delete(sp.gfn);
    }
    sp.invalid = true;
  }

  private unlink(child: Sp, parent: Sp, i: number): void {
    parent.spt.delete(i);
    const k = child.parents.findIndex((p) => p.sp === parent && p.index === i);
    if (k >= 0) child.parents.splice(k, 1);
  }

  /** kvm_unlink_unsync_page(): traces kvm_mmu_sync_page. */
  private unlinkUnsync(sp: Sp): void {
    this.emit('sync', sp);
    sp.unsync = false;
    this.stats.mmu_unsync--;
  }

  /** mark_unsync() up the parents: each parent's bit for the child, recursively while new. */
  private markParentsUnsync(sp: Sp): void {
    for (const { sp: parent, index: i } of sp.parents) {
      if (parent.unsyncChildren.has(i)) continue;
      parent.unsyncChildren.add(i);
      if (parent.unsyncChildren.size > 1) continue;
      this.markParentsUnsync(parent);
    }
  }

  /** Makes every leaf shadow PTE mapping `gfn` read-only (kvm_mmu_slot_gfn_write_protect). */
  private writeProtect(gfn: bigint): void {
    for (const l of this.hash.values()) {
      for (const sp of l) for (const e of sp.spt.values()) if (!isSp(e) && e.gfn === gfn) e.writable = false;
    }
  }

  /**
   * kvm_sync_page(): re-reads every guest PTE the page shadows and brings
   * its shadow PTEs in line (a leaf to the guest's frame; dropped where the
   * guest's entry is gone). The page's unsync state is the caller's business.
   */
  private syncPage(sp: Sp): void {
    for (const i of [...sp.spt.keys()]) this.syncSpte(sp, i);
  }

  /** kvm_sync_spte() / FNAME(sync_spte) for one entry of a level-1 page. */
  private syncSpte(sp: Sp, i: number): void {
    const e = sp.spt.get(i);
    if (!e || isSp(e)) return;
    const pte = this.mem.read64((sp.gfn << 12n) + BigInt(i * 8));
    if (!(pte & P)) {
      sp.spt.delete(i);
      return;
    }
    const gfn = (pte & ADDR) >> 12n;
    // A changed frame drops write access until the next write fault.
    sp.spt.set(i, { gfn, writable: gfn === e.gfn && e.writable && (pte & RW) !== 0n });
  }

  // -------------------------------------------------------------------------
  // Roots

  /**
   * vcpu_enter_guest(): roots that were zapped are let go
   * (KVM_REQ_MMU_FREE_OBSOLETE_ROOTS), a missing root is loaded
   * (kvm_mmu_load(): get the root page, then sync it), and a pending
   * KVM_REQ_MMU_SYNC syncs the current root.
   */
  enter(): void {
    this.requests();
    this.load();
  }

  /**
   * Between two guest operations: a native host enters the guest again
   * after every exit, so pending requests run at once; an emulated host
   * (kvm_pvm, as measured here) only loads a missing root before the next
   * instruction and leaves the requests to the next KVM_RUN.
   */
  private settle(): void {
    if (this.cfg.exec === 'native') this.enter();
    else this.load();
  }

  /** KVM_REQ_MMU_FREE_OBSOLETE_ROOTS, then KVM_REQ_MMU_SYNC. */
  private requests(): void {
    for (const p of this.prevRoots.filter((r) => r.sp.invalid)) this.freeRoot(p.sp);
    this.prevRoots = this.prevRoots.filter((r) => !r.sp.invalid);
    if (this.root?.invalid) {
      this.freeRoot(this.root);
      this.root = undefined;
    }
    if (this.syncPending) {
      this.syncPending = false;
      if (this.root) this.syncRoots();
    }
  }

  /** kvm_mmu_reload() / kvm_mmu_load(): a root for the current CR3 when there is none. */
  private load(): void {
    if (!this.root) {
      this.root = this.getPage(this.cr3 >> 12n, { level: this.cfg.levels, direct: false, access: ACC.ALL });
      this.root.rootCount++;
      this.syncRoots();
    }
  }

  /** mmu_free_root_page(): the last user of a zapped root zaps it again, for good. */
  private freeRoot(sp: Sp): void {
    sp.rootCount--;
    if (sp.rootCount === 0 && sp.invalid) this.zap(sp);
  }

  /**
   * kvm_set_cr3() without PCIDs: a new pgd switches roots (a cached
   * previous root for it is reused, fast_pgd_switch(); otherwise the least
   * recently used one is let go and the new root is loaded at the next
   * entry), and every CR3 load syncs the root (KVM_REQ_MMU_SYNC) and
   * flushes the guest's TLB.
   */
  setCr3(cr3: bigint): void {
    const pgd = cr3 & ADDR;
    this.tlb.clear();
    this.syncPending = true;
    if (pgd === this.cr3) return this.settle();
    const old = this.root ? { pgd: this.cr3, sp: this.root } : undefined;
    this.cr3 = pgd;
    const k = this.prevRoots.findIndex((r) => r.pgd === pgd && !r.sp.invalid);
    if (k >= 0) {
      const hit = this.prevRoots.splice(k, 1)[0]!;
      if (old) this.prevRoots.unshift(old);
      this.root = hit.sp;
      hit.sp.flooding = 0;
      this.settle();
      return;
    }
    if (old) this.prevRoots.unshift(old);
    const evicted = this.prevRoots.length > KVM_MMU_NUM_PREV_ROOTS ? this.prevRoots.pop() : undefined;
    if (evicted) this.freeRoot(evicted.sp);
    this.root = undefined;
    this.settle();
  }

  /** kvm_mmu_sync_roots(): the current root, when it has unsync pages below it. */
  private syncRoots(): void {
    const root = this.root;
    if (!root || root.invalid || !(root.unsync || root.unsyncChildren.size)) return;
    this.syncChildren(root);
  }

  /**
   * mmu_sync_children(): every unsync page below `parent`, write-protected
   * again, unlinked from the unsync state and synced.
   */
  private syncChildren(parent: Sp): void {
    if (this.cfg.wrong === 'never-sync') return;
    // Walk again until a walk finds nothing: clearing stops at a parent with
    // bits left, some of them stale, which only the next walk clears.
    for (let found = true; found;) {
      found = false;
      for (const { sp, path } of unsyncWalk(parent, this.cfg.wrong)) {
        found = true;
        this.writeProtect(sp.gfn);
        this.unlinkUnsync(sp);
        this.syncPage(sp);
        clearParents(path);
      }
    }
  }

  // -------------------------------------------------------------------------
  // What the guest does

  /**
   * INVLPG: the guest's TLB forgets the page; KVM walks the shadow path of
   * the address (kvm_mmu_invalidate_addr) and re-reads the guest PTE of every
   * unsync page on it, descending only while the page has unsync children.
   * The pages stay unsync.
   */
  invlpg(gva: bigint): void {
    this.tlb.delete(gva >> 12n);
    if (this.cfg.wrong === 'never-sync') return;
    for (let sp: Sp | Leaf | undefined = this.root; isSp(sp);) {
      const i = index(gva, sp.role.level);
      if (sp.unsync) this.syncSpte(sp, i);
      if (!sp.unsyncChildren.size) break;
      sp = sp.spt.get(i);
    }
    this.settle();
  }

  /** A memslot deleted or moved: kvm_mmu_zap_all_fast(), every page zapped, roots reloaded at the next entry. */
  zapAll(): void {
    // kvm_zap_obsolete_pages(): oldest first (active_mmu_pages from its tail).
    const all = [...this.hash.values()].flat().sort((a, b) => a.id - b.id);
    for (const sp of all) if (!sp.invalid) this.zap(sp);
    this.tlb.clear();
  }

  /** FNAME(walk_addr): the guest's walk of `gva`, or undefined when an entry is not present. */
  private guestWalk(gva: bigint): { steps: GuestStep[]; gfn: bigint; access: number } | undefined {
    const steps: GuestStep[] = [];
    let table = this.cr3;
    let access: number = ACC.ALL;
    for (let level: number = this.cfg.levels; level >= 1; level--) {
      const i = index(gva, level);
      const pte = this.mem.read64(table + BigInt(i * 8));
      if (!(pte & P)) return undefined;
      if (!(pte & RW)) access &= ~ACC.W;
      if (!(pte & US)) access &= ~ACC.U;
      if (pte & NX) access &= ~ACC.X;
      steps.push({ level, tableGfn: table >> 12n, index: i, pte, access });
      if (level === 1 || (level <= 3 && pte & PS)) {
        const span = 1n << BigInt(9 * (level - 1));
        const base = (pte & ADDR & ~((span << 12n) - 1n)) >> 12n;
        return { steps, gfn: base + ((gva >> 12n) & (span - 1n)), access };
      }
      table = pte & ADDR;
    }
    return undefined;
  }

  /**
   * One guest access to `gva` (a write stores `value`, 8 bytes). On an
   * emulated host the write goes through kvm_mmu_track_write(); on a native
   * host an access without a usable shadow PTE faults and is fixed
   * (FNAME(fetch)), and a write that still cannot go through (a write-tracked
   * or just write-protected table) is emulated.
   */
  access(gva: bigint, kind: AccessKind, value = 0n): Access {
    const w = this.guestWalk(gva);
    const vpn = gva >> 12n;
    const allowed = new Set(this.tlb.get(vpn) ?? []);
    if (!w) {
      return { gpa: undefined, allowed: [...allowed] };
    }
    allowed.add(w.gfn);
    let shadow: bigint | undefined;
    let emulate = this.cfg.exec === 'emulated';
    if (this.cfg.exec === 'native') {
      let leaf = this.leafFor(gva);
      const faults = !leaf || (kind === 'write' && !leaf.writable);
      if (faults) {
        if (kind === 'write' && this.writeTracked(w.gfn)) {
          // page_fault_handle_page_track(): the walk's pages lose their flooding count; emulate.
          for (const s of this.pathSps(gva)) s.flooding = 0;
          emulate = true;
        } else {
          leaf = this.fetch(gva, w, kind);
          emulate = kind === 'write' && !leaf.writable;
        }
      }
      // The access goes through the shadow PTE: the frame it maps is what the guest reaches.
      shadow = this.leafFor(gva)?.gfn;
    }
    if (kind === 'write') {
      const gpa = ((shadow ?? w.gfn) << 12n) | (gva & 0xfffn);
      this.mem.write64(gpa & ~7n, value);
      if (emulate) this.trackWrite(gpa & ~7n, 8);
    }
    const frames = this.tlb.get(vpn) ?? new Set<bigint>();
    frames.add(shadow ?? w.gfn);
    this.tlb.set(vpn, frames);
    this.settle();
    return { gpa: (w.gfn << 12n) | (gva & 0xfffn), allowed: [...allowed].sort((a, b) => (a < b ? -1 : 1)), shadow };
  }

  /**
   * Native hosts: the frame a present shadow PTE still maps for `gva` when
   * the architecture no longer allows it (neither the guest's walk now nor a
   * translation the guest's TLB may hold): the processor uses that PTE
   * without asking KVM. This happens when the guest's tables changed by a
   * write KVM did not see (the VMM's) in a page that is not unsync: INVLPG
   * and a CR3 load re-read only unsync pages. Undefined when there is none.
   */
  stale(gva: bigint): bigint | undefined {
    if (this.cfg.exec !== 'native') return undefined;
    const leaf = this.leafFor(gva);
    if (!leaf) return undefined;
    const w = this.guestWalk(gva);
    if (w?.gfn === leaf.gfn || this.tlb.get(gva >> 12n)?.has(leaf.gfn)) return undefined;
    return leaf.gfn;
  }

  private pathSps(gva: bigint): Sp[] {
    const out: Sp[] = [];
    for (let sp: Sp | Leaf | undefined = this.root; isSp(sp); sp = sp.spt.get(index(gva, sp.role.level))) out.push(sp);
    return out;
  }

  private leafFor(gva: bigint): Leaf | undefined {
    const sps = this.pathSps(gva);
    const last = sps.at(-1);
    const e = last?.spt.get(index(gva, last.role.level));
    return e && !isSp(e) ? e : undefined;
  }

  /**
   * FNAME(fetch): links a shadow page for each guest table on the walk (an
   * upper-level page with unsync children is synced before it is linked),
   * stands a direct page in for a guest huge page, and sets the leaf. A
   * writable leaf for a frame that is a shadowed table makes that table's
   * level-1 pages unsync (mmu_try_to_unsync_pages); a write-tracked frame
   * gets a read-only leaf.
   */
  private fetch(gva: bigint, w: NonNullable<ReturnType<ShadowMmu['guestWalk']>>, kind: AccessKind): Leaf {
    if (!this.root) throw new Error('shadow model: an access before the first entry');
    let sp = this.root;
    for (const step of w.steps) {
      if (step.level === 1 || (step.level <= 3 && step.pte & PS)) break;
      const tableGfn = (step.pte & ADDR) >> 12n;
      sp = this.child(sp, index(gva, sp.role.level), tableGfn, {
        level: step.level - 1,
        direct: false,
        access: step.access,
      });
    }
    while (sp.role.level > 1) {
      // A guest huge page: direct pages down to 4 KiB.
      const span = 1n << BigInt(9 * (sp.role.level - 1));
      const base = w.gfn & ~(span - 1n);
      sp = this.child(sp, index(gva, sp.role.level), base, {
        level: sp.role.level - 1,
        direct: true,
        access: w.access,
      });
    }
    const guestWritable = (w.access & ACC.W) !== 0 || !(this.cfg.cr0Wp ?? true);
    let writable = kind === 'write' && guestWritable;
    if (writable) writable = this.tryUnsync(w.gfn);
    const leaf: Leaf = { gfn: w.gfn, writable };
    sp.spt.set(index(gva, 1), leaf);
    return leaf;
  }

  private child(parent: Sp, i: number, gfn: bigint, role: Role): Sp {
    const e = parent.spt.get(i);
    if (isSp(e) && e.gfn === gfn) return e;
    const sp = this.getPage(gfn, role);
    if (role.level > 1 && sp.unsyncChildren.size) this.syncChildren(sp);
    if (e && isSp(e)) this.unlink(e, parent, i);
    parent.spt.set(i, sp);
    sp.parents.push({ sp: parent, index: i });
    if (sp.unsync || sp.unsyncChildren.size) this.markParentsUnsync(sp);
    return sp;
  }

  /** mmu_try_to_unsync_pages(): whether a writable leaf for `gfn` may exist. */
  private tryUnsync(gfn: bigint): boolean {
    if (this.writeTracked(gfn)) return false;
    for (const sp of this.valid(gfn)) {
      if (!sp.hasGptes || sp.unsync) continue;
      this.emit('unsync', sp);
      this.stats.mmu_unsync++;
      sp.unsync = true;
      this.markParentsUnsync(sp);
    }
    return true;
  }

  /**
   * kvm_mmu_track_write(): an emulated write of `bytes` at `gpa`. Counted
   * whenever any page shadows a guest table; each page shadowing the frame
   * is zapped when the write is misaligned (detect_write_misaligned) or the
   * third in a row to an upper-level page (detect_write_flooding); otherwise
   * the shadow PTE under the written entry is dropped.
   */
  private trackWrite(gpa: bigint, bytes: number): void {
    if (!this.indirect) return;
    this.stats.mmu_pte_write++;
    const gfn = gpa >> 12n;
    for (const sp of [...this.valid(gfn)].reverse()) {
      if (!sp.hasGptes || sp.invalid) continue;
      if (misaligned(gpa, bytes) || this.flooded(sp)) {
        this.zap(sp);
        this.stats.mmu_flooded++;
        continue;
      }
      const i = Number((gpa & 0xfffn) / 8n);
      const e = sp.spt.get(i);
      if (isSp(e)) this.unlink(e, sp, i);
      else sp.spt.delete(i);
    }
  }

  /** detect_write_flooding(): level-1 pages may go unsync instead, so only upper levels count. */
  private flooded(sp: Sp): boolean {
    if (sp.role.level === 1 || this.cfg.wrong === 'no-flooding') return false;
    return ++sp.flooding >= 3;
  }
}

/** detect_write_misaligned(): a write that is not one whole 8-byte entry (a single aligned byte excepted). */
export function misaligned(gpa: bigint, bytes: number): boolean {
  const off = Number(gpa & 0xfffn);
  if (off % 8 === 0 && bytes === 1) return false;
  return ((off ^ (off + bytes - 1)) & ~7) !== 0 || bytes < 4;
}

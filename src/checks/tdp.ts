// The host dimension, GFN by GFN: KVM's TDP mappings as kvm_tdp_mmu_spte_changed
// shows them, against the TDP model's, after guest faults and after a host
// MADV_DONTNEED zaps part of a slot (tdp_spte_picture: the slot's first
// pages, then a range from inside it to its last page; and a first fault in a
// slot that logs dirty pages), and through dirty logging over a THP-backed
// 2 MiB block: split, one logged write, collapse back once logging stops,
// then a zap of part of the block, which starts inside the huge leaf
// (tdp_dirty_log_split_coalesce). Both need a TDP
// host with the TDP MMU (the lab's npt-tdp profile on machines without
// hardware TDP).
import { kernelBehaviours } from '../model/kernel.js';
import { Asm } from '../arch/x86/asm.js';
import { channel, describeStop, X86Guest } from '../arch/x86/guest.js';
import { LAYOUT } from '../arch/x86/layout.js';
import { PTE_A, PTE_D, PTE_NX, PTE_P, PTE_RW } from '../arch/x86/pte.js';
import type { Memslot as KvmMemslot } from '../kvm/memslot.js';
import { MADV, MEM } from '../uapi/uapi.js';
import { Memslots, type Backing } from '../model/memslots.js';
import { modelSlot, tdpModelFor } from '../model/vm.js';
import { PAGES, decodeSpte, isLeaf, isPresent } from '../model/spte.js';
import { Tdp } from '../model/tdp.js';
import type { Wrong, WrongTdp } from '../model/wrong.js';
import { dirtyPages } from '../observe/dirty-log.js';
import { decodeTdpSpte, TdpPicture } from '../observe/tdp-picture.js';
import { TraceSession } from '../observe/tracefs.js';
import { readStats } from '../observe/stats.js';
import { parseShadowEvent } from '../observe/shadow-mmu.js';
import { tdpObserverFor, type SptePicture, type SpteObserver } from '../observe/spte-picture.js';
import { NotApplicable } from '../base/not-applicable.js';
import { confirmThp, needThp } from './thp.js';
import type { Check, CheckContext } from '../run/types.js';
import { PAGE_SIZE as PAGE } from '../base/units.js';

const SMALL_GPA = 0x1000000n; // 2 MiB of anonymous memory with 4 KiB host pages
const HUGE_GPA = 0x1200000n; // 2 MiB of hugetlb memory, when the host has a free huge page
const LOGGED_GPA = 0x1400000n; // 16 KiB that log dirty pages from the start
const LOGGED_SIZE = 0x4000;
const GVA = 0x40000000n;

interface Touch {
  gfn: number;
  write: boolean;
}

export function mappingOf(m: { level: number; writable: boolean } | undefined): string {
  return m ? `level ${m.level} ${m.writable ? 'writable' : 'read-only'}` : 'not mapped';
}

/** The per-GFN observer for this host's MMU, or not applicable when its tracepoints are missing. */
function observerFor(ctx: CheckContext): SpteObserver {
  const obs = tdpObserverFor(ctx.profile);
  const o = ctx.profile.oracles[obs.oracle];
  if (!o.available) throw new NotApplicable(`${obs.oracle}: ${o.why}`);
  ctx.note(
    obs.mmu === 'legacy'
      ? 'legacy MMU (kvm.tdp_mmu=0): the legacy model (prefetch, no eager split, leaf zaps at logging off); zaps and write protection are untraced, so those GFNs are compared through pages_4k/pages_2m'
      : 'TDP MMU: the TDP model against kvm_tdp_mmu_spte_changed',
  );
  return obs;
}

/** A GFN's mapping as far as the trace can tell: "untraced" where it cannot, the level alone where W is unknown. */
function seen(picture: SptePicture, gfn: number, m: { level: number; writable: boolean } | undefined): string {
  const blind = picture.blind(gfn);
  if (blind === 'mapping') return 'untraced';
  if (m && blind === 'writable') return `level ${m.level}`;
  return mappingOf(m);
}

/** pages_4k, pages_2m and pages_1g of the VM (KVM's stats fd). */
function pageStats(g: X86Guest): number[] {
  const st = readStats([g.vm.stats()]);
  return [0, Number(st.get('pages_4k') ?? 0n), Number(st.get('pages_2m') ?? 0n), Number(st.get('pages_1g') ?? 0n)];
}

/** The change of the three gauges as "4k +1, 2m -1", zeros left out. */
function pageDelta(before: number[], after: number[]): string {
  const names = ['', '4k', '2m', '1g'];
  const out = [1, 2, 3]
    .filter((l) => after[l]! !== before[l]!)
    .map((l) => `${names[l]} ${after[l]! - before[l]! > 0 ? '+' : ''}${after[l]! - before[l]!}`);
  return out.join(', ') || 'none';
}

export function tdpPicture(opts: { wrong?: Wrong } = {}): Check {
  return {
    name: 'tdp_spte_picture',
    description:
      "KVM's TDP mappings per GFN (kvm_tdp_mmu_spte_changed; legacy MMU: kvm_mmu_set_spte and the shadow-page events) equal the TDP model's after guest faults (a slot's last page, first faults in a dirty-logged slot, neighbours of host-written pages) and after MADV_DONTNEED zaps part of a slot",
    needs: [],
    needsOneOf: ['tdp_spte_tracepoints', 'legacy_spte_tracepoints'],
    run: (ctx) => run(ctx, opts.wrong?.tdp ?? {}),
  };
}

/** The small anonymous slot and, where hugetlb pages can be had, the 2 MiB hugetlb slot of the picture checks. */
function pictureSlots(ctx: CheckContext, g: X86Guest): { small: KvmMemslot; huge?: KvmMemslot } {
  const small = g.vm.addMemslot({ slot: 1, gpa: SMALL_GPA, size: 0x200000, backing: { kind: 'anon', thp: false } });
  try {
    const huge = g.vm.addMemslot({
      slot: 2,
      gpa: HUGE_GPA,
      size: 0x200000,
      backing: { kind: 'hugetlb', pageSize: '2M' },
    });
    return { small, huge };
  } catch (e) {
    ctx.note(`no hugetlb slot: ${(e as Error).message} (2 MiB mappings not compared)`);
    return { small };
  }
}

/** Pages of the small slot the host writes before the guest runs: 0x10..0x17 and 0x20..0x23. */
const HOST_WRITTEN = [
  [0x10, 8],
  [0x20, 4],
] as const;

async function run(ctx: CheckContext, wrong: WrongTdp): Promise<void> {
  const obs = observerFor(ctx);
  const g = X86Guest.create(ctx.kvm);
  let trace: TraceSession | undefined;
  try {
    const { small, huge } = pictureSlots(ctx, g);
    const logged = g.vm.addMemslot({
      slot: 3,
      gpa: LOGGED_GPA,
      size: LOGGED_SIZE,
      flags: MEM.KVM_MEM_LOG_DIRTY_PAGES,
      backing: { kind: 'anon', thp: false },
    });
    const leaf = PTE_P | PTE_RW | PTE_A | PTE_D | PTE_NX;
    g.boot.tables.map(GVA, SMALL_GPA, 0x200000n, '4K', { leaf });
    if (huge) g.boot.tables.map(GVA + 0x200000n, HUGE_GPA, 0x200000n, '4K', { leaf });
    g.boot.tables.map(GVA + (LOGGED_GPA - SMALL_GPA), LOGGED_GPA, BigInt(LOGGED_SIZE), '4K', { leaf });

    // Writes to four pages and to the slot's last page, reads of two
    // never-written pages, writes to two pages of the huge slot (one 2 MiB
    // mapping on a TDP host), and first faults in the dirty-logged slot: a
    // write, a read and a write.
    const smallGfn = Number(SMALL_GPA) / PAGE;
    const touches: Touch[] = [0, 1, 2, 3, 0x1ff].map((i) => ({ gfn: smallGfn + i, write: true }));
    touches.push(...[4, 5].map((i) => ({ gfn: smallGfn + i, write: false })));
    // Next to pages the host wrote: a read and a write (the legacy MMU
    // prefetches their host-writable neighbours, the TDP MMU does not).
    touches.push({ gfn: smallGfn + 0x12, write: false }, { gfn: smallGfn + 0x21, write: true });
    for (const [first, n] of HOST_WRITTEN) small.madvise(first * PAGE, n * PAGE, MADV_POPULATE_WRITE);
    if (huge) touches.push(...[0, 7].map((i) => ({ gfn: Number(HUGE_GPA) / PAGE + i, write: true })));
    touches.push(...[0, 1, 3].map((i) => ({ gfn: Number(LOGGED_GPA) / PAGE + i, write: i !== 1 })));
    const a = new Asm({ origin: Number(LAYOUT.code) });
    for (const t of touches) {
      const gva = GVA + BigInt(t.gfn * PAGE) - SMALL_GPA;
      a.movImm('rbx', gva);
      if (t.write) a.store(1, { base: 'rbx' }, 'rbx');
      else a.load(1, 'rax', { base: 'rbx' });
    }
    channel.done(a);
    g.load(a);

    // The model VM: the same slots at the same host addresses.
    const slots = new Memslots();
    const tdp = tdpModelFor(ctx.profile, slots, { levels: 4, wrong });
    const slot0 = [...g.vm.slots.values()].find((s) => s.slot === 0)!;
    tdp.setMemslot(modelSlot(slot0, { kind: 'anon', pageSize: PAGE }));
    const smallSlot = modelSlot(small, { kind: 'anon', pageSize: PAGE });
    tdp.setMemslot(smallSlot);
    if (huge) tdp.setMemslot(modelSlot(huge, { kind: 'hugetlb2m', pageSize: 0x200000 }));
    tdp.setMemslot(modelSlot(logged, { kind: 'anon', pageSize: PAGE }));
    for (const [first, n] of HOST_WRITTEN)
      for (let i = first; i < first + n; i++) tdp.host.fault(smallSlot, small.hva + BigInt(i * PAGE), true);

    trace = TraceSession.open(ctx.target.fs, obs.events, [await g.vcpu.tid()]);
    ctx.expect('guest finishes', 'done', (await g.run()).kind);
    const picture = obs.picture(trace.take());
    for (const t of touches) tdp.fault(0, t.gfn, { write: t.write });
    const modelOf = (gfn: number) => {
      const m = tdp.lookup(0, gfn);
      return m && isPresent(m.spte) ? { level: m.level, writable: decodeSpte(m.spte).writable } : undefined;
    };
    const compare = (what: string) => {
      // Every GFN of the small slot as runs, then the other slots' touched GFNs.
      ctx.expect(
        `${what}: the small slot's 512 GFNs`,
        runsOf(smallGfn, 512, (gfn) => seen(picture, gfn, modelOf(gfn))),
        runsOf(smallGfn, 512, (gfn) => seen(picture, gfn, picture.leaf(0, BigInt(gfn)))),
      );
      for (const t of touches) {
        if (t.gfn >= smallGfn && t.gfn < smallGfn + 512) continue;
        const kvm = seen(picture, t.gfn, picture.leaf(0, BigInt(t.gfn)));
        ctx.expect(`${what}: gfn 0x${t.gfn.toString(16)}`, seen(picture, t.gfn, modelOf(t.gfn)), kvm);
      }
    };
    compare('after the guest faults');

    // A zap of a host range: traced under the TDP MMU; under the legacy MMU
    // the rmap walk zaps untraced, so the pages_* gauges count what went.
    const zap = (what: string, from: number, to: number) => {
      trace!.clear();
      const statsBefore = pageStats(g);
      const modelBefore = tdp.pageCounts(0);
      small.madvise(from * PAGE, (to - from) * PAGE, MADV.DONTNEED);
      picture.add(trace!.take());
      tdp.invalidateHva(small.hva + BigInt(from * PAGE), small.hva + BigInt(to * PAGE), 'dontneed');
      picture.untraced(smallGfn + from, smallGfn + to, 'zap');
      if (obs.mmu === 'legacy')
        ctx.expect(
          `${what}: change of pages_4k/2m/1g`,
          pageDelta(modelBefore, tdp.pageCounts(0)),
          pageDelta(statsBefore, pageStats(g)),
        );
      compare(what);
    };
    trace.setPids([]); // the zaps run in this process, not on the vCPU thread
    // MADV_DONTNEED on the first three pages of the small slot: KVM's MMU
    // notifier zaps exactly those GFNs.
    zap('after MADV_DONTNEED of 3 pages', 0, 3);
    // MADV_DONTNEED from inside the slot to its last page.
    zap('after MADV_DONTNEED from page 4 to the end of the slot', 4, 512);

    // Last, as it write-protects the logged pages again (outside the traced vCPU thread).
    const page = (gpa: bigint) => `0x${gpa.toString(16)}`;
    const modelLog = tdp.getDirtyLog(0, 3).map((gfn) => page(BigInt(gfn * PAGE)));
    ctx.expect('dirty log of the logged slot', modelLog, dirtyPages(g.vm.getDirtyLog(3), LOGGED_GPA).map(page));
  } finally {
    trace?.close();
    g.close();
  }
}

// ---------------------------------------------------------------------------
// tdp_pre_fault

/** The pages KVM_PRE_FAULT_MEMORY maps ahead of the guest in tdp_pre_fault. */
const PRE_FAULT_PAGES = 16;

/**
 * tdp_pre_fault: KVM_PRE_FAULT_MEMORY (Linux 6.10 on) of 16 pages of an
 * anonymous slot (the first four written by the host, the rest never touched)
 * and of two pages of a hugetlb slot maps them before any guest access as
 * the TDP model's read faults do: the written pages writable at 4 KiB, the
 * untouched ones read-only over the host's zero page, the hugetlb pages with
 * one 2 MiB leaf. Compared through kvm_tdp_mmu_spte_changed, page by page.
 */
export function tdpPreFault(opts: { wrong?: Wrong } = {}): Check {
  return {
    name: 'tdp_pre_fault',
    description:
      "KVM_PRE_FAULT_MEMORY maps a GPA range ahead of the guest as the TDP model's read faults do (kvm_tdp_mmu_spte_changed): host-written pages writable, untouched ones read-only, hugetlb at 2 MiB",
    needs: ['tdp_spte_tracepoints'],
    run: (ctx) => runPreFault(ctx, opts.wrong?.tdp),
  };
}

async function runPreFault(ctx: CheckContext, wrong: WrongTdp | undefined): Promise<void> {
  if (!ctx.profile.capabilities.KVM_CAP_PRE_FAULT_MEMORY) {
    const release = ctx.profile.kernel?.release;
    throw new NotApplicable(
      `KVM_PRE_FAULT_MEMORY came in Linux 6.10; ${release ? `kernel ${release}` : 'this KVM'} has no KVM_CAP_PRE_FAULT_MEMORY`,
    );
  }
  const g = X86Guest.create(ctx.kvm);
  let trace: TraceSession | undefined;
  try {
    const { small, huge } = pictureSlots(ctx, g);
    // The host writes the first four pages; the rest stay untouched.
    small.madvise(0, 4 * PAGE, MADV_POPULATE_WRITE);
    // One run loads the vCPU's MMU (pre-faulting needs its root).
    const a = new Asm({ origin: Number(LAYOUT.code) });
    channel.done(a);
    g.load(a);
    ctx.expect('guest finishes', 'done', (await g.run()).kind);

    const slots = new Memslots();
    const tdp = new Tdp(slots, { levels: 4, wrong });
    const slot0 = [...g.vm.slots.values()].find((s) => s.slot === 0)!;
    tdp.setMemslot(modelSlot(slot0, { kind: 'anon', pageSize: PAGE }));
    tdp.setMemslot(modelSlot(small, { kind: 'anon', pageSize: PAGE }));
    if (huge) tdp.setMemslot(modelSlot(huge, { kind: 'hugetlb2m', pageSize: 0x200000 }));
    for (let i = 0; i < 4; i++)
      tdp.host.fault(tdp.slots.find(0, Number(SMALL_GPA) / PAGE)!, small.hva + BigInt(i * PAGE), true);
    if (huge) tdp.host.fault(tdp.slots.find(0, Number(HUGE_GPA) / PAGE)!, huge.hva, true);
    huge?.madvise(0, 0x200000, MADV_POPULATE_WRITE);

    // The ioctl runs in this process, not on the vCPU thread.
    trace = TraceSession.open(ctx.target.fs, ['kvmmmu/kvm_tdp_mmu_spte_changed'], []);
    trace.clear();
    const ranges: [bigint, number][] = [[SMALL_GPA, PRE_FAULT_PAGES]];
    if (huge) ranges.push([HUGE_GPA, 2]);
    for (const [gpa, pages] of ranges) {
      const size = BigInt(pages * PAGE);
      let left = size;
      for (let tries = 0; left > 0n && tries < 64; tries++) left = g.vcpu.preFault(gpa + size - left, left);
      ctx.expect(`KVM_PRE_FAULT_MEMORY of ${pages} pages at 0x${gpa.toString(16)}: bytes left`, 0n, left);
      for (let i = 0; i < pages; i++) tdp.fault(0, Number(gpa) / PAGE + i);
    }
    const picture = new TdpPicture(ctx.profile.tdp.kind === 'ept' ? 'ept' : 'npt', trace.take());
    for (const [gpa, pages] of ranges) {
      for (let i = 0; i < pages; i++) {
        const gfn = Number(gpa) / PAGE + i;
        const m = tdp.lookup(0, gfn);
        const model = m ? { level: m.level, writable: decodeSpte(m.spte).writable } : undefined;
        ctx.expect(
          `after KVM_PRE_FAULT_MEMORY: gfn 0x${gfn.toString(16)}`,
          mappingOf(model),
          mappingOf(picture.leaf(0, BigInt(gfn))),
        );
      }
    }
  } finally {
    trace?.close();
    g.close();
  }
}

// ---------------------------------------------------------------------------
// tdp_dirty_log_split_coalesce

const MIB2 = 0x200000n;
/** Memslot 1 of the dirty-logging check: 4 MiB, so that a 2 MiB-aligned host block lies inside. */
const DL_GPA = 0x2000000n;
const DL_GVA = 0x80000000n;
/** <asm-generic/mman-common.h>: prefault page tables writable (Linux 5.14). */
const MADV_POPULATE_WRITE = 23;
const THP_2M: Backing = { kind: 'thp', pageSize: 0x200000 };
/** Pages of the block the guest writes while dirty logging is on, and touches after it is off. */
const DIRTIED = 0x37;
const AFTER_READ = 0x100;
const AFTER_WRITE = 0x1ff;
/** First of the two pages of the block zapped at the end. */
const STRADDLE = 0x81;

/** One GFN as a mapping description: level, permission, or not mapped. */
type Picture = (gfn: number) => string;

/** A block's GFNs as runs of equal description: "+0x0..+0x1ff level 2 writable". */
function runsOf(base: number, npages: number, describe: Picture): string[] {
  const out: string[] = [];
  let start = 0;
  let cur = describe(base);
  for (let i = 1; i <= npages; i++) {
    const d = i < npages ? describe(base + i) : undefined;
    if (d === cur) continue;
    out.push(`+0x${start.toString(16)}..+0x${(i - 1).toString(16)} ${cur}`);
    start = i;
    if (d !== undefined) cur = d;
  }
  return out;
}

/**
 * tdp_dirty_log_split_coalesce, optionally against a deliberately wrong model
 * (`wrong`, or `eagerSplit` overriding kvm.eager_page_split) so that tests see
 * the mismatch reported.
 *
 * A 4 MiB slot of anonymous memory with MADV_HUGEPAGE is placed so that the
 * one 2 MiB-aligned host block inside it is 2 MiB aligned in guest-physical
 * space too; MADV_POPULATE_WRITE faults it in as a transparent huge page,
 * confirmed through AnonHugePages in smaps (else: not applicable). Then, with
 * every kvm_tdp_mmu_spte_changed event recorded:
 *  1. the guest writes the block (a 2 MiB leaf);
 *  2. dirty logging goes on (eager split to 4 KiB leaves when
 *     kvm.eager_page_split is set, then write protection of the leaves);
 *  3. the guest writes one page (the fast page-fault path restores W, which
 *     the tracepoint does not show: the traced changes during the run are
 *     compared, then KVM_GET_DIRTY_LOG, which re-protects the page, traced);
 *  4. dirty logging goes off (x86 zaps the tables a huge page can replace);
 *  5. the guest reads one page and writes another (a 2 MiB leaf again);
 *  6. MADV_DONTNEED of two pages inside the block: the zapped range starts
 *     inside the 2 MiB leaf.
 * After each step the per-GFN picture of the block (level, writable,
 * present) is compared with the TDP model fed the same operations, and the
 * dirty log with the model's.
 */
export function tdpDirtyLogSplitCoalesce(opts: { wrong?: Wrong; eagerSplit?: boolean } = {}): Check {
  return {
    name: 'tdp_dirty_log_split_coalesce',
    description:
      "KVM's TDP mappings of a THP-backed 2 MiB block (kvm_tdp_mmu_spte_changed) equal the TDP model's through dirty logging on (split to 4 KiB), one logged write, logging off (collapse back to 2 MiB) and a zap starting inside the 2 MiB leaf; dirty log as the model's",
    needs: ['dirty_log'],
    needsOneOf: ['tdp_spte_tracepoints', 'legacy_spte_tracepoints'],
    run: (ctx) => runSplitCoalesce(ctx, opts),
  };
}

async function runSplitCoalesce(ctx: CheckContext, opts: { wrong?: Wrong; eagerSplit?: boolean }): Promise<void> {
  const obs = observerFor(ctx);
  const legacy = obs.mmu === 'legacy';
  const thp = needThp(ctx.profile);
  const params = ctx.profile.moduleParams;
  const yes = (v: string | undefined) => v === 'Y' || v === 'y' || v === '1';
  // With Intel PML, KVM logs dirty pages by clearing D bits instead of W
  // (kvm_mmu_slot_leaf_clear_dirty); the model write-protects.
  if (ctx.profile.tdp.kind === 'ept' && yes(params['kvm_intel.pml']))
    throw new NotApplicable(
      'kvm_intel.pml=Y: KVM logs dirty pages through PML and D bits, while the TDP model logs them by write protection',
    );
  const splitParam = params['kvm.eager_page_split'];
  const eagerSplit = opts.eagerSplit ?? yes(splitParam);
  if (!legacy)
    ctx.note(
      `kvm.eager_page_split=${splitParam ?? 'absent (no eager split)'}; the model ${eagerSplit ? 'splits' : 'does not split'} huge pages when dirty logging starts`,
    );
  // Linux 6.1's TDP MMU zaps a huge leaf that a 4 KiB fault must go below
  // (later kernels split it); that happens here when eager split is off.
  // Since 6.13, dirty logging off recovers huge leaves in place.
  const release = ctx.profile.kernel?.release ?? ctx.target.fs.read('/proc/sys/kernel/osrelease')?.trim();
  const kb = ctx.profile.kernel?.behaviours ?? kernelBehaviours(release);
  const splitOnFault = kb.splitOnFault.on;
  const recoverHugeInPlace = kb.recoverHugeInPlace.on;
  if (!legacy) ctx.note(`kernel ${release ?? 'release unknown'}: ${kb.splitOnFault.why}; ${kb.recoverHugeInPlace.why}`);

  const g = X86Guest.create(ctx.kvm);
  let trace: TraceSession | undefined;
  try {
    let s = g.vm.addMemslot({ slot: 1, gpa: DL_GPA, size: Number(2n * MIB2), backing: { kind: 'anon', thp: true } });
    const skew = s.hva % MIB2;
    if (skew !== 0n) s = g.vm.moveMemslot(1, DL_GPA + skew);
    const blockOff = skew === 0n ? 0n : MIB2 - skew;
    const block = s.gpa + blockOff;
    ctx.note(`slot hva 0x${s.hva.toString(16)}, gpa 0x${s.gpa.toString(16)}; block gpa 0x${block.toString(16)}`);
    try {
      s.madvise(Number(blockOff), Number(MIB2), MADV_POPULATE_WRITE);
    } catch (e) {
      throw new NotApplicable(
        `MADV_POPULATE_WRITE failed (${(e as Error).message}), so the block cannot be faulted in as a transparent huge page`,
      );
    }
    confirmThp(s, thp, Number(MIB2));

    const leaf = PTE_P | PTE_RW | PTE_A | PTE_D | PTE_NX;
    g.boot.tables.map(DL_GVA, block, MIB2, '4K', { leaf });
    const gva = (page: number) => DL_GVA + BigInt(page * PAGE) + 0x80n;
    const a = new Asm({ origin: Number(LAYOUT.code) });
    a.movImm('rbx', gva(0)).store(8, { base: 'rbx' }, 'rbx');
    channel.sync(a, 1);
    a.movImm('rbx', gva(DIRTIED)).store(8, { base: 'rbx' }, 'rbx');
    channel.sync(a, 2);
    a.movImm('rbx', gva(AFTER_READ)).load(8, 'rax', { base: 'rbx' });
    a.movImm('rbx', gva(AFTER_WRITE)).store(8, { base: 'rbx' }, 'rbx');
    channel.done(a);
    g.load(a);

    // The model VM: the slot at the same host address, its block already
    // written by the host (a THP).
    const nxHugePages = yes(params['kvm.nx_huge_pages']);
    const tdp = tdpModelFor(ctx.profile, new Memslots(), {
      levels: 4,
      wrong: opts.wrong?.tdp,
      eagerSplit,
      nxHugePages,
      splitOnFault,
      recoverHugeInPlace,
    });
    const slotOf = (logDirty: boolean) => ({ ...modelSlot(s, THP_2M), flags: { logDirty, readonly: false } });
    tdp.setMemslot(slotOf(false));
    tdp.host.fault(tdp.slots.find(0, Number(s.gpa) / PAGE)!, s.hva + blockOff, true);

    const base = Number(block) / PAGE;
    const flavour = ctx.profile.tdp.kind === 'ept' ? 'ept' : 'npt';
    const picture = obs.picture();
    const inBlock = (gfn: number) => gfn >= base && gfn < base + 512;
    const modelMapping: Picture = (gfn) => {
      const m = tdp.lookup(0, gfn);
      if (!m || !isPresent(m.spte)) return seen(picture, gfn, undefined);
      return seen(picture, gfn, { level: m.level, writable: decodeSpte(m.spte).writable });
    };
    const kvmMapping: Picture = (gfn) => seen(picture, gfn, picture.leaf(0, BigInt(gfn)));
    const covers = (gfn: number, level: number) => inBlock(gfn) || (gfn <= base && gfn + PAGES[level] > base);
    const change = (gfn: number, level: number, from: string, to: string) =>
      `+0x${(gfn - base).toString(16)}@${level} ${from} -> ${to}`;
    const kvmKind = (spte: unknown, level: number) => {
      const m = decodeTdpSpte(typeof spte === 'bigint' ? spte : 0n, level, flavour);
      return !m.present ? 'none' : !m.leaf ? 'table' : m.writable ? 'leaf W' : 'leaf R';
    };
    const modelKind = (spte: number) =>
      !isPresent(spte) ? 'none' : !isLeaf(spte) ? 'table' : decodeSpte(spte).writable ? 'leaf W' : 'leaf R';
    /** Takes the trace into the picture; returns the traced changes of entries mapping the block ("+gfn@level old -> new"). */
    // The host's reclaim ages the block (MGLRU walks secondary MMUs): an
    // Accessed bit cleared, which 6.13 on traces (kvm_tdp_mmu_age_spte) and
    // the model does not model. Such changes are counted, not compared.
    const accessed = flavour === 'ept' ? 1n << 8n : 1n << 5n;
    let aged = 0;
    let zappedPages: string[] = [];
    const take = (): string[] => {
      const events = trace!.take();
      picture.add(events);
      zappedPages = events.flatMap((e) => {
        const sp = e.id === 'kvmmmu/kvm_mmu_prepare_zap_page' ? parseShadowEvent(e) : undefined;
        return sp?.direct && sp.level < 4 && covers(Number(sp.gfn), sp.level + 1)
          ? [`+0x${(Number(sp.gfn) - base).toString(16)} l${sp.level}`]
          : [];
      });
      const seen: string[] = [];
      for (const e of events) {
        if (e.id !== 'kvmmmu/kvm_tdp_mmu_spte_changed' || typeof e.fields.gfn !== 'bigint') continue;
        const gfn = Number(e.fields.gfn);
        const level = Number(e.fields.level);
        if (!covers(gfn, level)) continue;
        const { old_spte: o, new_spte: n } = e.fields;
        if (typeof o === 'bigint' && typeof n === 'bigint' && (o ^ n) === accessed && (n & accessed) === 0n) {
          aged++;
          continue;
        }
        seen.push(change(gfn, level, kvmKind(o, level), kvmKind(n, level)));
      }
      return seen;
    };
    const summary = (changes: string[]) => {
      const byLevel = new Map<string, number>();
      for (const c of changes) {
        const l = c.slice(c.indexOf('@') + 1, c.indexOf(' '));
        byLevel.set(l, (byLevel.get(l) ?? 0) + 1);
      }
      return [...byLevel].map(([l, n]) => `${n} at level ${l}`).join(', ') || 'none';
    };
    const compare = (what: string, changes: string[], model: Picture = modelMapping) => {
      ctx.note(
        `${what}: ${changes.length} traced SPTE changes over the block (${summary(changes)}); KVM: ${runsOf(base, 512, kvmMapping).join('; ')}`,
      );
      ctx.expect(`${what}: mappings of the block's 512 GFNs`, runsOf(base, 512, model), runsOf(base, 512, kvmMapping));
    };
    const page = (gfn: number) => `+0x${(gfn - base).toString(16)}`;
    const dirtyLog = (bitmap: Uint8Array) => dirtyPages(bitmap, s.gpa).map((gpa) => page(Number(gpa) / PAGE));

    // Under the legacy MMU a host operation zaps and write-protects
    // untraced: the picture is told, and the pages_* gauges and the shadow
    // pages zapped (kvm_mmu_prepare_zap_page) are compared instead.
    const hostOp = (what: string, untraced: 'zap' | 'wrprot' | undefined, op: () => void) => {
      const before = { kvm: pageStats(g), model: tdp.pageCounts(0), events: tdp.events.length };
      op();
      if (untraced) picture.untraced(base, base + 512, untraced);
      if (!legacy) return;
      ctx.expect(
        `${what}: change of pages_4k/2m/1g`,
        pageDelta(before.model, tdp.pageCounts(0)),
        pageDelta(before.kvm, pageStats(g)),
      );
      return before.events;
    };
    const tablesZapped = (mark: number) =>
      tdp.events
        .slice(mark)
        .flatMap((e) =>
          e.kind === 'teardown' && covers(e.gfn, e.level + 1) ? [`+0x${(e.gfn - base).toString(16)} l${e.level}`] : [],
        );

    trace = TraceSession.open(ctx.target.fs, obs.events, []);
    trace.clear();

    // 1. The guest writes the block.
    ctx.expect('stop after the first write', 'sync 1', describeStop(await g.run()));
    tdp.fault(0, base, { write: true });
    compare('1. after the guest writes the block', take());

    // 2. Dirty logging on.
    hostOp('2. dirty logging on', 'wrprot', () => {
      g.vm.setMemslotFlags(1, MEM.KVM_MEM_LOG_DIRTY_PAGES);
      tdp.setMemslot(slotOf(true));
    });
    compare('2. after dirty logging starts', take());
    ctx.expect('2. dirty log before the guest writes', tdp.getDirtyLog(0, 1).map(page), dirtyLog(g.vm.getDirtyLog(1)));

    // 3. One page written while logging.
    const mark = tdp.events.length;
    ctx.expect('stop after the logged write', 'sync 2', describeStop(await g.run()));
    const r = tdp.fault(0, base + DIRTIED, { write: true });
    // The fast page-fault path restores W without kvm_tdp_mmu_spte_changed.
    const modelChanges = tdp.events
      .slice(mark)
      .flatMap((e) =>
        e.kind === 'spte' && !e.fast && covers(e.gfn, e.level)
          ? [change(e.gfn, e.level, modelKind(e.old), modelKind(e.new))]
          : [],
      );
    ctx.note(`3. the model's fault for the logged write: ${r.kind} at level ${r.level}`);
    if (legacy) compare('3. after the logged write', take());
    else ctx.expect('3. traced SPTE changes over the block during the logged write', modelChanges, take());
    const logged = tdp.getDirtyLog(0, 1);
    ctx.expect('3. dirty log after the logged write', logged.map(page), dirtyLog(g.vm.getDirtyLog(1)));
    for (const gfn of logged) picture.untraced(gfn, gfn + 1, 'wrprot');
    compare('3. after KVM_GET_DIRTY_LOG', take());

    // 4. Dirty logging off.
    const mark4 = hostOp('4. dirty logging off', 'zap', () => {
      g.vm.setMemslotFlags(1, 0);
      tdp.setMemslot(slotOf(false));
    });
    compare('4. after dirty logging stops', take());
    if (mark4 !== undefined)
      ctx.expect('4. shadow pages zapped over the block (kvm_mmu_prepare_zap_page)', tablesZapped(mark4), zappedPages);

    // 5. The guest touches the block again. A huge leaf recovered in place
    // (6.13 on) is read-only: the write makes it writable by the fast
    // page-fault path, which kvm_tdp_mmu_spte_changed does not show, so the
    // model is compared as the tracepoint shows it.
    ctx.expect('final stop', 'done', describeStop(await g.run()));
    const mark5 = tdp.events.length;
    tdp.fault(0, base + AFTER_READ, {});
    tdp.fault(0, base + AFTER_WRITE, { write: true });
    const untraced = new Map<string, number>();
    for (const e of tdp.events.slice(mark5)) {
      if (e.kind === 'spte' && e.fast && !untraced.has(`${e.gfn}@${e.level}`))
        untraced.set(`${e.gfn}@${e.level}`, e.old);
    }
    if (untraced.size)
      ctx.note(`5. the model restores W by the fast page-fault path at ${untraced.size} leaf (not traced)`);
    // The legacy MMU's fast path is traced (fast_page_fault).
    const tracedModel: Picture = (gfn) => {
      const m = tdp.lookup(0, gfn);
      if (legacy) return modelMapping(gfn);
      if (!m || !isPresent(m.spte)) return 'not mapped';
      const before = untraced.get(`${gfn - (gfn % PAGES[m.level]!)}@${m.level}`);
      return mappingOf({ level: m.level, writable: decodeSpte(before ?? m.spte).writable });
    };
    compare('5. after the guest touches the block again', take(), tracedModel);

    if (aged)
      ctx.note(
        `${aged} traced changes over the block only cleared the Accessed bit (the host's reclaim aging it): not compared`,
      );
    const after = s.hugeBytes();
    ctx.expect(
      'the block is still a transparent huge page after the run',
      true,
      after !== undefined && after >= Number(MIB2),
    );

    // 6. MADV_DONTNEED of two pages inside the block: the range starts inside
    // the 2 MiB leaf, which goes as a whole (the host splits its huge page).
    trace.setPids([]); // the zap runs in this process, not on the vCPU thread
    hostOp('6. MADV_DONTNEED of 2 pages inside the block', 'zap', () => {
      s.madvise(Number(blockOff) + STRADDLE * PAGE, 2 * PAGE, MADV.DONTNEED);
      const from = s.hva + blockOff + BigInt(STRADDLE * PAGE);
      tdp.invalidateHva(from, from + BigInt(2 * PAGE), 'dontneed');
    });
    compare('6. after MADV_DONTNEED of 2 pages starting inside the 2 MiB leaf', take());
  } finally {
    trace?.close();
    g.close();
  }
}

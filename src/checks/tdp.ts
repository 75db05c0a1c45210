// The host dimension, GFN by GFN: KVM's TDP mappings as kvm_tdp_mmu_spte_changed
// shows them, against the TDP model's, after guest faults and after a host
// MADV_DONTNEED zaps part of a slot. Needs a TDP host with the TDP MMU (the
// lab's npt-tdp profile on machines without hardware TDP).
import { Asm } from '../arch/x86/asm.js';
import { channel, X86Guest } from '../arch/x86/guest.js';
import { LAYOUT } from '../arch/x86/layout.js';
import { PTE_A, PTE_D, PTE_NX, PTE_P, PTE_RW } from '../arch/x86/pte.js';
import type { Memslot as KvmMemslot } from '../kvm/kvm.js';
import { MADV } from '../kvm/uapi.js';
import { Memslots, type Backing } from '../model/memslots.js';
import { Tdp, decodeSpte, type WrongModel } from '../model/tdp.js';
import { TdpPicture } from '../observe/tdp-picture.js';
import { TraceSession } from '../observe/tracefs.js';
import type { Check, CheckContext } from '../run/types.js';

const PAGE = 0x1000;
const SMALL_GPA = 0x1000000n; // 2 MiB of anonymous memory with 4 KiB host pages
const HUGE_GPA = 0x1200000n; // 2 MiB of hugetlb memory, when the host has a free huge page
const GVA = 0x40000000n;

interface Touch {
  gfn: number;
  write: boolean;
}

function modelSlot(s: KvmMemslot, backing: Backing) {
  return {
    slot: s.slot,
    asId: 0,
    baseGfn: Number(s.gpa) / PAGE,
    npages: s.npages,
    hva: s.hva,
    flags: { logDirty: false, readonly: false },
    backing,
  };
}

function mappingOf(m: { level: number; writable: boolean } | undefined): string {
  return m ? `level ${m.level} ${m.writable ? 'writable' : 'read-only'}` : 'not mapped';
}

export function tdpPicture(opts: { wrong?: WrongModel } = {}): Check {
  return {
    name: 'tdp_spte_picture',
    description: "KVM's TDP mappings per GFN (kvm_tdp_mmu_spte_changed) equal the TDP model's after guest faults and after MADV_DONTNEED zaps part of a slot",
    needs: ['tdp_spte_tracepoints'],
    run: (ctx) => run(ctx, opts.wrong ?? {}),
  };
}

async function run(ctx: CheckContext, wrong: WrongModel): Promise<void> {
  const g = X86Guest.create(ctx.kvm);
  let trace: TraceSession | undefined;
  try {
    const small = g.vm.addMemslot({ slot: 1, gpa: SMALL_GPA, size: 0x200000, backing: { kind: 'anon', thp: false } });
    let huge: KvmMemslot | undefined;
    try {
      huge = g.vm.addMemslot({ slot: 2, gpa: HUGE_GPA, size: 0x200000, backing: { kind: 'hugetlb', pageSize: '2M' } });
    } catch (e) {
      ctx.note(`no hugetlb slot: ${(e as Error).message} (2 MiB mappings not compared)`);
    }
    const leaf = PTE_P | PTE_RW | PTE_A | PTE_D | PTE_NX;
    g.boot.tables.map(GVA, SMALL_GPA, 0x200000n, '4K', { leaf });
    if (huge) g.boot.tables.map(GVA + 0x200000n, HUGE_GPA, 0x200000n, '4K', { leaf });

    // Writes to four pages, reads of two never-written pages, writes to two
    // pages of the huge slot (one 2 MiB mapping on a TDP host).
    const touches: Touch[] = [0, 1, 2, 3].map((i) => ({ gfn: Number(SMALL_GPA) / PAGE + i, write: true }));
    touches.push(...[4, 5].map((i) => ({ gfn: Number(SMALL_GPA) / PAGE + i, write: false })));
    if (huge) touches.push(...[0, 7].map((i) => ({ gfn: Number(HUGE_GPA) / PAGE + i, write: true })));
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
    const tdp = new Tdp(slots, { levels: 4, wrong });
    const slot0 = [...g.vm.slots.values()].find((s) => s.slot === 0)!;
    tdp.setMemslot(modelSlot(slot0, { kind: 'anon', pageSize: PAGE }));
    tdp.setMemslot(modelSlot(small, { kind: 'anon', pageSize: PAGE }));
    if (huge) tdp.setMemslot(modelSlot(huge, { kind: 'hugetlb2m', pageSize: 0x200000 }));

    trace = TraceSession.open(['kvmmmu/kvm_tdp_mmu_spte_changed'], [await g.vcpu.tid()]);
    ctx.expect('guest finishes', 'done', (await g.run()).kind);
    const flavour = ctx.profile.tdp.kind === 'ept' ? 'ept' : 'npt';
    const picture = new TdpPicture(flavour, trace.take());
    for (const t of touches) tdp.fault(0, t.gfn, { write: t.write });
    const compare = (what: string) => {
      for (const t of touches) {
        const m = tdp.lookup(0, t.gfn);
        const model = m ? { level: m.level, writable: decodeSpte(m.spte).writable } : undefined;
        const seen = picture.leaf(0, BigInt(t.gfn));
        ctx.expect(`${what}: gfn 0x${t.gfn.toString(16)}`, mappingOf(model), mappingOf(seen));
      }
    };
    compare('after the guest faults');

    // MADV_DONTNEED on the first three pages of the small slot: KVM's MMU
    // notifier zaps exactly those GFNs.
    trace.setPids([]); // the zap runs in this process, not on the vCPU thread
    trace.clear();
    small.madvise(0, 3 * PAGE, MADV.DONTNEED);
    picture.add(trace.take());
    tdp.invalidateHva(small.hva, small.hva + BigInt(3 * PAGE), 'dontneed');
    compare('after MADV_DONTNEED of 3 pages');
  } finally {
    trace?.close();
    g.close();
  }
}

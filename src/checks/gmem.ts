// tdp_guest_memfd_picture: KVM's TDP mappings of a guest_memfd slot, GFN by
// GFN (kvm_tdp_mmu_spte_changed), against the TDP model's. KVM faults a
// guest_memfd slot's pages in through the file (kvm_mmu_faultin_pfn_gmem):
// one 4 KiB folio each, zeroed on first touch and mapped writable whatever
// the access, so a read of a page nobody wrote maps it writable, where an
// anonymous slot maps the zero page read-only. fallocate(PUNCH_HOLE) on the
// file zaps exactly the punched GFNs (kvm_gmem_punch_hole invalidates the
// bindings), and the next access refaults a fresh zeroed page.
import { Asm } from '../arch/x86/asm.js';
import { channel, describeStop, X86Guest } from '../arch/x86/guest.js';
import { LAYOUT } from '../arch/x86/layout.js';
import { PTE_A, PTE_D, PTE_NX, PTE_P, PTE_RW } from '../arch/x86/pte.js';
import { NotApplicable } from '../base/not-applicable.js';
import { PAGE_SIZE as PAGE } from '../base/units.js';
import { Memslots } from '../model/memslots.js';
import { decodeSpte } from '../model/spte.js';
import { Tdp } from '../model/tdp.js';
import { modelSlot } from '../model/vm.js';
import type { Wrong } from '../model/wrong.js';
import { TdpPicture } from '../observe/tdp-picture.js';
import { TraceSession } from '../observe/tracefs.js';
import type { Check, CheckContext } from '../run/types.js';
import { mappingOf } from './tdp.js';

const GMEM_GPA = 0x1000000n;
const GMEM_PAGES = 16;
const GVA = 0x40000000n;
/** Pages (by index in the slot) the guest writes, reads, the host writes first, and KVM_PRE_FAULT_MEMORY maps. */
const WRITTEN = [0, 1];
const READ = [2, 3];
const HOST_WRITTEN = 2;
const PRE_FAULTED = [8, 9, 10, 11];
/** The punched pages: two the guest touched and one pre-faulted. */
const PUNCHED: [number, number][] = [
  [1, 2],
  [9, 1],
];
const HOST_VALUE = 0x5aa5n;

export function tdpGuestMemfdPicture(opts: { wrong?: Wrong } = {}): Check {
  return {
    name: 'tdp_guest_memfd_picture',
    description:
      "KVM's TDP mappings of a guest_memfd slot per GFN (kvm_tdp_mmu_spte_changed) equal the TDP model's: every fault, read or write, maps a writable 4 KiB page; KVM_PRE_FAULT_MEMORY the same; fallocate(PUNCH_HOLE) zaps exactly the punched GFNs, which refault as fresh zeroed pages",
    arch: 'x86_64',
    needs: ['tdp_spte_tracepoints'],
    run: (ctx) => run(ctx, opts.wrong),
  };
}

async function run(ctx: CheckContext, wrong: Wrong | undefined): Promise<void> {
  const g = X86Guest.create(ctx.kvm);
  let trace: TraceSession | undefined;
  try {
    const why = g.vm.sharedGuestMemfdUnsupported();
    if (why) throw new NotApplicable(why);
    const gm = g.vm.addMemslot({ slot: 1, gpa: GMEM_GPA, size: GMEM_PAGES * PAGE, backing: { kind: 'guest_memfd' } });
    const leaf = PTE_P | PTE_RW | PTE_A | PTE_D | PTE_NX;
    g.boot.tables.map(GVA, GMEM_GPA, BigInt(GMEM_PAGES * PAGE), '4K', { leaf });
    const gva = (i: number) => GVA + BigInt(i * PAGE);
    const gfn = (i: number) => Number(GMEM_GPA) / PAGE + i;

    // Phase 1: writes and reads (one of a page the host wrote); phase 2,
    // after the punch: a read of a punched page, its value reported.
    const a = new Asm({ origin: Number(LAYOUT.code) });
    for (const i of WRITTEN) a.movImm('rbx', gva(i)).store(1, { base: 'rbx' }, 'rbx');
    for (const i of READ) a.movImm('rbx', gva(i)).load(1, 'rax', { base: 'rbx' });
    channel.sync(a, 1);
    a.movImm('rbx', gva(HOST_WRITTEN)).load(8, 'rsi', { base: 'rbx' });
    channel.sync(a, 2);
    channel.done(a);
    g.load(a);
    new DataView(gm.memory).setBigUint64(HOST_WRITTEN * PAGE, HOST_VALUE, true);

    const slots = new Memslots();
    const tdp = new Tdp(slots, { levels: 4, wrong: wrong?.tdp });
    const slot0 = [...g.vm.slots.values()].find((s) => s.slot === 0)!;
    tdp.setMemslot(modelSlot(slot0, { kind: 'anon', pageSize: PAGE }));
    const mslot = modelSlot(gm, { kind: 'guest_memfd', pageSize: PAGE });
    tdp.setMemslot(mslot);
    tdp.hostAccess(0, gfn(HOST_WRITTEN), true);

    trace = TraceSession.open(ctx.target.fs, ['kvmmmu/kvm_tdp_mmu_spte_changed'], [await g.vcpu.tid()]);
    const first = await g.run();
    ctx.expect('guest reaches the first sync', 'sync 1', describeStop(first));
    for (const i of WRITTEN) tdp.fault(0, gfn(i), { write: true });
    for (const i of READ) tdp.fault(0, gfn(i));
    // KVM_PRE_FAULT_MEMORY (where the kernel has it) runs in this process, as the punch does.
    trace.setPids([]);
    const preFault = !!ctx.profile.capabilities.KVM_CAP_PRE_FAULT_MEMORY;
    if (preFault) {
      const at = GMEM_GPA + BigInt(PRE_FAULTED[0]! * PAGE);
      const size = BigInt(PRE_FAULTED.length * PAGE);
      let left = size;
      for (let tries = 0; left > 0n && tries < 64; tries++) left = g.vcpu.preFault(at + size - left, left);
      ctx.expect(`KVM_PRE_FAULT_MEMORY of ${PRE_FAULTED.length} pages: bytes left`, 0n, left);
      for (const i of PRE_FAULTED) tdp.fault(0, gfn(i));
    } else ctx.note('no KVM_CAP_PRE_FAULT_MEMORY: the pre-faulted pages stay unmapped (model and KVM)');
    const picture = new TdpPicture(ctx.profile.tdp.kind === 'ept' ? 'ept' : 'npt', trace.take());
    const compare = (what: string) => {
      for (let i = 0; i < GMEM_PAGES; i++) {
        const m = tdp.lookup(0, gfn(i));
        const model = m ? { level: m.level, writable: decodeSpte(m.spte).writable } : undefined;
        ctx.expect(
          `${what}: gfn 0x${gfn(i).toString(16)}`,
          mappingOf(model),
          mappingOf(picture.leaf(0, BigInt(gfn(i)))),
        );
      }
    };
    compare('after the guest faults and KVM_PRE_FAULT_MEMORY');

    trace.clear();
    for (const [i, n] of PUNCHED) {
      gm.punchHole(i * PAGE, n * PAGE);
      tdp.invalidateHva(gm.hva + BigInt(i * PAGE), gm.hva + BigInt((i + n) * PAGE), 'punch_hole');
    }
    picture.add(trace.take());
    compare('after fallocate(PUNCH_HOLE)');

    trace.clear();
    const second = await g.run();
    ctx.expect('guest reaches the second sync', 'sync 2', describeStop(second));
    // The host's value went with the punched page: the refault finds a fresh, zeroed one.
    ctx.expect(
      'the guest reads the punched page the host had written',
      0n,
      second.kind === 'sync' ? second.values[0] : undefined,
    );
    tdp.fault(0, gfn(HOST_WRITTEN));
    picture.add(trace.take());
    compare('after the guest reads a punched page');
    ctx.expect('guest finishes', 'done', describeStop(await g.run()));
  } finally {
    trace?.close();
    g.close();
  }
}

// Shadow-MMU oracle: KVM's kvm_mmu_get_page events against the guest's own
// page-table trees. Without TDP, KVM shadows guest page-table pages: each
// shadow page has a role level, and (unless it is a direct page standing in
// for a guest huge page) its gfn is the guest table page it shadows at that
// level. So every shadow page KVM creates must be a table page of a tree the
// guest loaded, at its level, and the root of every CR3 the guest loads must
// get one.
import { Asm } from '../arch/x86/asm.js';
import { channel, X86Guest } from '../arch/x86/guest.js';
import { LAYOUT } from '../arch/x86/layout.js';
import { guestTablePages, parseShadowPage, type ShadowPage } from '../observe/shadow-pages.js';
import { TraceSession } from '../observe/tracefs.js';
import { NotApplicable } from '../base/not-applicable.js';
import type { Check } from '../run/types.js';

const key = (p: ShadowPage) => `${p.gfn.toString(16)}@${p.level}${p.direct ? ' direct' : ''}`;

export const shadowPages: Check = {
  name: 'shadow_pages_follow_guest_tables',
  description:
    'without TDP, every shadow page KVM creates shadows a guest page-table page at its own level, and each CR3 the guest loads gets a root',
  needs: ['shadow_page_tracepoints'],
  async run(ctx) {
    if (!ctx.profile.cpu) throw new NotApplicable('x86 guests only');
    const g = X86Guest.create(ctx.kvm);
    let trace: TraceSession | undefined;
    try {
      // A second root: a copy of the PML4, so the guest can switch trees.
      const rootA = g.boot.tables.root;
      const rootB = g.boot.alloc();
      g.mem.write(rootB, g.mem.bytes(rootA, 4096).slice());
      const a = new Asm({ origin: Number(LAYOUT.code) });
      a.movImm('rbx', LAYOUT.data).load(8, 'rax', { base: 'rbx' });
      a.movImm('rax', rootB).movToCr(3, 'rax');
      a.load(8, 'rax', { base: 'rbx', disp: 8 });
      a.movImm('rax', rootA).movToCr(3, 'rax');
      channel.done(a);
      g.load(a);
      trace = TraceSession.open(ctx.target.fs, ['kvmmmu/kvm_mmu_get_page'], [await g.vcpu.tid()]);
      const stop = await g.run();
      ctx.expect('guest finishes', 'done', stop.kind);
      const pages = trace
        .take()
        .map(parseShadowPage)
        .filter((p): p is ShadowPage => !!p);
      const levels = g.boot.tables.levels;
      const allowed = new Set([
        ...guestTablePages(rootA, levels, (x) => g.mem.read64(x)),
        ...guestTablePages(rootB, levels, (x) => g.mem.read64(x)),
      ]);
      const seen = new Set(pages.map(key));
      ctx.expect(
        'roots of the loaded CR3s have shadow pages',
        [rootA, rootB].map((r) => `${(r >> 12n).toString(16)}@${levels}`),
        [rootA, rootB].map((r) => `${(r >> 12n).toString(16)}@${levels}`).filter((k) => seen.has(k)),
      );
      ctx.expect(
        'shadow pages that shadow no guest table page at their level',
        [],
        [...seen].filter((k) => !allowed.has(k)),
      );
      ctx.note(`shadow pages: ${[...seen].join(', ') || 'none'} (${pages.filter((p) => p.created).length} created)`);
    } finally {
      trace?.close();
      g.close();
    }
  },
};

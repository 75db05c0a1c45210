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
import { PTE_ADDR_MASK, PTE_P, PTE_PS } from '../arch/x86/pte.js';
import { TraceSession, type TraceEvent } from '../observe/tracefs.js';
import { NotApplicable, type Check } from '../run/types.js';

export interface ShadowPage {
  gfn: bigint;
  level: number;
  direct: boolean;
  created: boolean;
}

/** Parses kvm_mmu_get_page's text ("sp gen 0 gfn 10 l4 8-byte q0 [direct] wux ... new"). */
export function parseShadowPage(e: TraceEvent): ShadowPage | undefined {
  const m = /\bgfn ([0-9a-f]+) l(\d)\b/.exec(e.text);
  if (!m) return undefined;
  return { gfn: BigInt(`0x${m[1]}`), level: Number(m[2]), direct: / direct\b/.test(e.text), created: /\bnew\s*$/.test(e.text) };
}

/**
 * Every guest page-table page reachable from `root`, as "gfn@level", plus the
 * direct pages KVM may use for guest huge pages ("gfn@level direct").
 */
export function guestTablePages(root: bigint, levels: number, read64: (gpa: bigint) => bigint): Set<string> {
  const out = new Set<string>();
  const visit = (table: bigint, level: number) => {
    const key = `${(table >> 12n).toString(16)}@${level}`;
    if (out.has(key)) return;
    out.add(key);
    for (let i = 0n; i < 512n; i++) {
      const e = read64(table + i * 8n);
      if (!(e & PTE_P)) continue;
      const target = e & PTE_ADDR_MASK;
      if (level > 1 && e & PTE_PS && level <= 3) out.add(`${(target >> 12n).toString(16)}@${level - 1} direct`);
      else if (level > 1) visit(target, level - 1);
    }
  };
  visit(root, levels);
  return out;
}

const key = (p: ShadowPage) => `${p.gfn.toString(16)}@${p.level}${p.direct ? ' direct' : ''}`;

export const shadowPages: Check = {
  name: 'shadow_pages_follow_guest_tables',
  description: "without TDP, every shadow page KVM creates shadows a guest page-table page at its own level, and each CR3 the guest loads gets a root",
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
      const pages = trace.take().map(parseShadowPage).filter((p): p is ShadowPage => !!p);
      const levels = g.boot.tables.levels;
      const allowed = new Set([...guestTablePages(rootA, levels, (x) => g.mem.read64(x)), ...guestTablePages(rootB, levels, (x) => g.mem.read64(x))]);
      const seen = new Set(pages.map(key));
      ctx.expect('roots of the loaded CR3s have shadow pages', [rootA, rootB].map((r) => `${(r >> 12n).toString(16)}@${levels}`), [rootA, rootB].map((r) => `${(r >> 12n).toString(16)}@${levels}`).filter((k) => seen.has(k)));
      ctx.expect('shadow pages that shadow no guest table page at their level', [], [...seen].filter((k) => !allowed.has(k)));
      ctx.note(`shadow pages: ${[...seen].join(', ') || 'none'} (${pages.filter((p) => p.created).length} created)`);
    } finally {
      trace?.close();
      g.close();
    }
  },
};

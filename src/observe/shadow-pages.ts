// The shadow MMU as KVM reports it and the guest's table pages it should
// shadow: kvm_mmu_get_page events parsed into plain records, and the table
// pages of a guest's tree read back from guest memory. Observation only; the
// check in checks/shadow.ts compares the two.
import { PTE_ADDR_MASK, PTE_P, PTE_PS } from '../arch/x86/pte.js';
import type { TraceEvent } from './tracefs.js';

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
  return {
    gfn: BigInt(`0x${m[1]}`),
    level: Number(m[2]),
    direct: / direct\b/.test(e.text),
    created: /\bnew\s*$/.test(e.text),
  };
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

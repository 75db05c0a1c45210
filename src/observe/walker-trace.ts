// KVM's guest page-table walker as its tracepoints show it: the events of
// kvmmmu's walker (kvm_mmu_pagetable_walk starts a walk; the element, A/D
// and error events belong to the walk before them) grouped into walks.

import type { TraceEvent } from './tracefs.js';

export const WALKER_EVENTS = [
  'kvmmmu/kvm_mmu_pagetable_walk',
  'kvmmmu/kvm_mmu_paging_element',
  'kvmmmu/kvm_mmu_set_accessed_bit',
  'kvmmmu/kvm_mmu_set_dirty_bit',
  'kvmmmu/kvm_mmu_walker_error',
] as const;

/** One walk as KVM's walker tracepoints show it. */
export interface TracedWalk {
  addr: bigint;
  pferr: number;
  elements: { level: number; pte: bigint }[];
  error?: number;
  accessed: bigint[];
  dirty: bigint[];
}

/** Groups walker events into walks (each starts with kvm_mmu_pagetable_walk). */
export function tracedWalks(events: readonly TraceEvent[]): TracedWalk[] {
  const out: TracedWalk[] = [];
  let cur: TracedWalk | undefined;
  for (const e of events) {
    const f = e.fields;
    switch (e.id) {
      case 'kvmmmu/kvm_mmu_pagetable_walk':
        cur = { addr: f.addr as bigint, pferr: Number(f.pferr), elements: [], accessed: [], dirty: [] };
        out.push(cur);
        break;
      case 'kvmmmu/kvm_mmu_paging_element':
        cur?.elements.push({ level: Number(f.level), pte: f.pte as bigint });
        break;
      case 'kvmmmu/kvm_mmu_walker_error':
        if (cur) cur.error = Number(f.pferr);
        break;
      case 'kvmmmu/kvm_mmu_set_accessed_bit':
        cur?.accessed.push(f.gpa as bigint);
        break;
      case 'kvmmmu/kvm_mmu_set_dirty_bit':
        cur?.dirty.push(f.gpa as bigint);
        break;
    }
  }
  return out;
}

// The model's side of the "model" stat expectations (pages_2m, pages_1g): how
// many 2 MiB and 1 GiB leaves the TDP model holds, and whether the host gave
// the transparent huge pages the model assumes behind them. KVM maps 2 MiB
// only where the host page is huge (THP, hugetlb) and the slot's HVA and GPA
// are congruent modulo 2 MiB; the model's level rule is Tdp.setGoal. Whether
// a THP slot really got THPs is up to the host (THP mode, defrag, free
// memory), so the comparison is not applicable where /proc/self/smaps shows
// fewer THP bytes in a slot than the model's host put there.
import type { X86Guest } from '../arch/x86/guest.js';
import type { ModelVm } from '../model/vm.js';
import type { Scenario } from '../scenario/types.js';

const LEVEL: Record<string, number> = { pages_2m: 2, pages_1g: 3 };
const PAGES = [0, 1, 512, 512 * 512];

/** Leaf mappings of the stat's size in the TDP model now (address space 0). */
export function modelPageCount(vm: ModelVm, stat: string): bigint {
  const level = LEVEL[stat];
  if (level === undefined) throw new Error(`the model does not count ${stat}`);
  let n = 0;
  for (const r of vm.tdp.mappings(0)) if (r.level === level) n += (r.end - r.start) / PAGES[level]!;
  return BigInt(n);
}

/**
 * Why the model's count cannot be compared here, or undefined: a THP-backed
 * slot in which the model's host holds 2 MiB pages that smaps does not show.
 */
export function thpUnconfirmed(sc: Scenario, g: X86Guest, vm: ModelVm): string | undefined {
  for (const d of sc.memslots) {
    if (d.backing !== 'thp') continue;
    const m = vm.slots.get(0, d.slot);
    if (!m) continue;
    let modelHuge = 0;
    for (let off = 0n; off < BigInt(m.npages) << 12n; off += 1n << 21n) {
      const hp = vm.tdp.host.lookup(m.hva + off);
      if (hp?.level === 2 && hp.writable) modelHuge += 2 << 20;
    }
    if (modelHuge === 0) continue;
    const seen = g.vm.memslot(d.slot).hugeBytes();
    if (seen === undefined) return `memslot ${d.slot}'s THPs cannot be confirmed (no /proc/self/smaps)`;
    if (seen < modelHuge)
      return `the host backed memslot ${d.slot} with ${seen >> 10} KiB of THPs where the model assumes ${modelHuge >> 10} KiB (smaps AnonHugePages)`;
  }
  return undefined;
}

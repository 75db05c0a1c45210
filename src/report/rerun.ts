// A mismatching access-matrix case re-run alone (matrix/check.ts): the
// model's walk and KVM's traced walk side by side.
import { describePte, LEVEL_NAMES } from '../arch/x86/pte.js';
import { decodeErrorCode, type WalkResult } from '../model/walk.js';
import type { TraceEvent } from '../observe/tracefs.js';
import { show } from '../run/differ.js';
import { hex } from '../base/units.js';

/** One case run alone (matrix/check.ts runAlone). */
export interface Rerun {
  name: string;
  gva: number;
  expected: object;
  observed: object;
  agrees: boolean;
  model: WalkResult[];
  /** KVM's walks of the case's GVA, or why there are none. */
  kvm: TraceEvent[][] | string;
}

/** The model's walk and KVM's traced walk of one case, side by side. */
export function formatRerun(r: Rerun, name = r.name): string {
  const lines = [
    `re-run alone: ${name} at gva ${hex(r.gva)}: ${r.agrees ? 'KVM agreed with the model this time' : 'the mismatch reproduces'}`,
    `  expected ${show(r.expected)}`,
    `  observed ${show(r.observed)}`,
  ];
  const model = r.model.flatMap((w, i) => [
    `  model walk ${i + 1}${r.model.length > 1 ? (i === 0 ? ' (the supervisor read first)' : ' (the access)') : ''}:`,
    ...modelLines(w),
  ]);
  const kvm =
    typeof r.kvm === 'string'
      ? [`  KVM: ${r.kvm}`]
      : r.kvm.length === 0
        ? ['  KVM: no walk of this GVA was traced']
        : r.kvm.flatMap((w, i) => [`  KVM walk ${i + 1}:`, ...kvmLines(w)]);
  const width = Math.max(...model.map((l) => l.length)) + 2;
  const rows = Math.max(model.length, kvm.length);
  for (let i = 0; i < rows; i++) lines.push(`${(model[i] ?? '').padEnd(width)}| ${kvm[i] ?? ''}`.trimEnd());
  return lines.join('\n');
}

function modelLines(w: WalkResult): string[] {
  const out = w.levels.map(
    (l) => `    ${LEVEL_NAMES[l.level]} @${hex(l.pteGpa)} = ${hex(l.pte)} (${describePte(l.pte, l.level)})`,
  );
  if (w.ok) {
    out.push(`    ok gpa ${hex(w.gpa)}`);
    for (const a of w.adWrites) out.push(`    ${LEVEL_NAMES[a.level]} @${hex(a.pteGpa)} := ${hex(a.new)} (A/D)`);
  } else out.push(`    #PF ${decodeErrorCode(w.errorCode)} (${w.reason})`);
  return out;
}

function kvmLines(w: TraceEvent[]): string[] {
  return w.map((e) => {
    const x = e.fields;
    switch (e.id) {
      case 'kvmmmu/kvm_mmu_pagetable_walk':
        return `    walk addr ${hex(x.addr as bigint)} access ${decodeErrorCode(Number(x.pferr))}`;
      case 'kvmmmu/kvm_mmu_paging_element': {
        const level = Number(x.level);
        return `    ${LEVEL_NAMES[level] ?? `L${level}`} = ${hex(x.pte as bigint)} (${describePte(x.pte as bigint, level)})`;
      }
      case 'kvmmmu/kvm_mmu_set_accessed_bit':
        return `    set A @${hex(x.gpa as bigint)}`;
      case 'kvmmmu/kvm_mmu_set_dirty_bit':
        return `    set D @${hex(x.gpa as bigint)}`;
      case 'kvmmmu/kvm_mmu_walker_error':
        return `    #PF ${decodeErrorCode(Number(x.pferr))}`;
      default:
        return `    ${e.id} ${e.text}`;
    }
  });
}

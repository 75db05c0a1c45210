// The translations a processor may keep using after the VMM rewrote paging
// entries: read and exec accesses that succeeded, with the count of host
// table writes at the time. Until something invalidates one (INVLPG of its
// page, a CR3 load, a CR0 or CR4 write, a #PF at its page), the architecture
// lets the processor use it even after the entries changed (SDM 4.10.4, APM
// 5.5.3): KVM's shadow pages may still map the page the way they did. The
// scenario engine and the C reproducer keep the same book.
import type { AccessStep, Prediction } from './predict.js';
import type { Step } from '../scenario/types.js';

const key = (s: AccessStep): string => `${s.access}:${s.cpl}:${s.gva >> 12n}`;
const cacheable = (s: AccessStep): boolean => s.access === 'read' || s.access === 'exec';

export class OldTranslations {
  private readonly cached = new Map<string, { gpa: bigint; epoch: number }>();
  private tableWrites = 0;

  /** A step done: a host table write makes cached translations stale; INVLPG and control-register writes drop them. */
  step(s: Step): void {
    if (s.side === 'host' && (s.kind === 'write-pte' || s.kind === 'clear-ad')) this.tableWrites++;
    else if (s.side === 'guest' && s.kind === 'invlpg') this.forgetPage(s.gva);
    else if (s.side === 'guest' && (s.kind === 'reload-cr3' || s.kind === 'set-cr4' || s.kind === 'set-cr0-wp'))
      this.cached.clear();
  }

  /** A #PF at `gva` invalidates the translations of its page. */
  forgetPage(gva: bigint): void {
    const page = `:${gva >> 12n}`;
    for (const k of [...this.cached.keys()]) if (k.endsWith(page)) this.cached.delete(k);
  }

  /**
   * Before judging an access: the GPA the old translation gives when the
   * model's walk faults but a translation of the page made before a host
   * table write may still be used; undefined when only the model's walk is
   * allowed. Records the access's own translation when it does not fault.
   */
  allowed(s: AccessStep, pred: Prediction): bigint | undefined {
    if (!cacheable(s)) return undefined;
    const old = this.cached.get(key(s));
    if (pred.expectFault === false && pred.walk.ok)
      this.cached.set(key(s), { gpa: pred.walk.gpa & ~0xfffn, epoch: this.tableWrites });
    if (!old || old.epoch >= this.tableWrites || typeof pred.expectFault !== 'number') return undefined;
    return old.gpa | (s.gva & 0xfffn);
  }
}

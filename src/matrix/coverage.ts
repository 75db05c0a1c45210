// What the access matrix's checked cases covered: how many of each control state,
// access kind, CPL, leaf size and outcome class, against the classes this vCPU's
// case space offers. A class the space offers that no checked case fell in is a
// hole in the check (an enumeration or a sample that silently dropped it), which
// the check reports as a failure.
//
// Pure: no KVM, no I/O.
import { PFERR } from '../model/walk.js';
import { CASE, CONTROL_SHIFT, isLegal, type CaseSpace } from './flags.js';

export const DIMENSIONS = ['control state', 'access', 'CPL', 'leaf', 'outcome'] as const;
export type Dimension = (typeof DIMENSIONS)[number];

const ACCESSES = ['read', 'write', 'fetch'] as const;
const OUTCOMES = ['no fault', 'not present', 'protection', 'reserved bit', 'protection key'] as const;

/** The control state's name: the control bits the space offers, e.g. `nx=1 wp=0`. */
export function controlName(f: number, offered: number): string {
  const on = (b: number) => (f & b ? 1 : 0);
  const parts = [`nx=${on(CASE.NXE)}`, `wp=${on(CASE.WP)}`];
  if (offered & CASE.SMEP) parts.push(`smep=${on(CASE.SMEP)}`);
  if (offered & CASE.SMAP) parts.push(`smap=${on(CASE.SMAP)}`);
  if (offered & CASE.PKE) {
    parts.push(`pke=${on(CASE.PKE)}`);
    const pkru = [f & CASE.PKRU_AD ? 'ad' : '', f & CASE.PKRU_WD ? 'wd' : ''].filter(Boolean).join('|');
    if (f & CASE.PKE) parts.push(`pkru1=${pkru || '0'}`);
  }
  return parts.join(' ');
}

/** The outcome class of a #PF error code (-1: no fault). */
export function outcomeClass(ec: number): (typeof OUTCOMES)[number] {
  if (ec < 0) return 'no fault';
  if (ec & PFERR.RSVD) return 'reserved bit';
  if (ec & PFERR.PK) return 'protection key';
  return ec & PFERR.P ? 'protection' : 'not present';
}

/** The class of a case in each dimension; `ec` is the model's outcome (-1: no fault). */
export function classesOf(f: number, ec: number, offered: number): Record<Dimension, string> {
  const kind = f & CASE.WRITE ? 'write' : f & CASE.FETCH ? 'fetch' : 'read';
  return {
    'control state': controlName(f, offered),
    access: f & CASE.TWICE ? `${kind} after a read` : kind,
    CPL: f & CASE.USER ? '3' : '0',
    leaf: f & CASE.PDE_PS ? '2 MiB' : '4 KiB',
    outcome: outcomeClass(ec),
  };
}

/** Every class the space offers, per dimension, in a stable order. */
export function offeredClasses(space: CaseSpace): Record<Dimension, string[]> {
  const states: string[] = [];
  const controlBits = space.offered >>> CONTROL_SHIFT;
  for (let c = 0; c < 1 << (32 - CONTROL_SHIFT); c++) {
    const f = (c << CONTROL_SHIFT) >>> 0;
    if ((c & ~controlBits) === 0 && isLegal(f)) states.push(controlName(f, space.offered));
  }
  return {
    'control state': states,
    access: ACCESSES.flatMap((a) => [a, `${a} after a read`]),
    CPL: ['0', '3'],
    leaf: ['4 KiB', '2 MiB'],
    outcome: OUTCOMES.filter((o) => o !== 'protection key' || (space.offered & CASE.PKE && space.offered & CASE.PKEY)),
  };
}

/** Counts of checked cases per class. */
export class Coverage {
  private readonly counts = new Map<Dimension, Map<string, number>>(DIMENSIONS.map((d) => [d, new Map()]));

  constructor(private readonly space: CaseSpace) {}

  add(f: number, ec: number): void {
    const cls = classesOf(f, ec, this.space.offered);
    for (const d of DIMENSIONS) {
      const m = this.counts.get(d)!;
      m.set(cls[d], (m.get(cls[d]) ?? 0) + 1);
    }
  }

  count(d: Dimension, cls: string): number {
    return this.counts.get(d)!.get(cls) ?? 0;
  }

  /** Classes the space offers that no case fell in, as `dimension: class`. */
  missing(): string[] {
    const offered = offeredClasses(this.space);
    return DIMENSIONS.flatMap((d) => offered[d].filter((c) => this.count(d, c) === 0).map((c) => `${d}: ${c}`));
  }

  /** One line per dimension: every offered class with its count, then any class seen that is not offered. */
  lines(): string[] {
    const offered = offeredClasses(this.space);
    return DIMENSIONS.map((d) => {
      const seen = [...this.counts.get(d)!.keys()].filter((c) => !offered[d].includes(c));
      const parts = [...offered[d], ...seen].map((c) => `${c}: ${this.count(d, c)}`);
      return `coverage by ${d}: ${parts.join(', ')}`;
    });
  }
}

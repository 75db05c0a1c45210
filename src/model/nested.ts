// Both dimensions of paging composed: the memory references the processor makes
// for one guest access when the guest's page tables (GVA -> GPA, walk.ts) sit in
// guest-physical memory that the TDP tables (GPA -> host, tdp.ts) translate.
//
// What nestedWalk() returns for one access, in the order the hardware makes
// the references (Intel SDM vol. 3C §29.3 "EPT"; AMD APM vol. 2 §15.25
// "Nested Paging"):
//   for each guest level, root first:
//     the TDP walk of the GPA of the guest entry (CR3's table page for the
//     root, then the table each entry points to): one reference per TDP level
//     read, root first, down to the leaf SPTE;
//     the guest entry itself (kind 'guest-pte');
//   then, if the guest walk translated the address, the TDP walk of the data
//   GPA, and the data access itself (kind 'data', the last entry).
//
// Counting. With n guest levels, m TDP levels, 4 KiB TDP leaves and nothing
// cached (no TLB, no paging-structure or nested-translation caches: the model
// has none), each of the n + 1 guest-physical addresses (n table pages and the
// data page) costs m TDP references, plus n guest entry reads:
//   (n + 1) m + n = (n + 1)(m + 1) - 1
// references before the data access: 24 for 4 x 4, 29 for 4 x 5, 35 for 5 x 5
// (Bhargava et al., "Accelerating Two-Dimensional Page Walks for Virtualized
// Systems", ASPLOS 2008, count 24 for 4 x 4 the same way, the data access not
// included). `totals.references` is that count; the 'data' entry is the access
// itself and is not counted in it. A huge TDP leaf ends its TDP walk early
// (a 2 MiB leaf: m - 1 references), so the count shrinks with TDP huge pages.
//
// Hits and misses. A 'tdp' reference hits when the SPTE it reads is present and
// either points to a table or is a leaf that permits the access; otherwise it
// is a miss: an EPT violation / NPT fault / stage-2 fault on that GPA. A miss is
// resolved by the TDP model's fault-in (Tdp.fault) and the walk goes on in the
// tree as the fault left it: the references of that GPA below the missing
// level are read from the new tree, and later references find what the fault
// mapped. So each missed translation is listed once, with the fault's result
// (its kind and the level it mapped at), not as a fault followed by a replay
// of the whole access. A later reference to a page the walk already faulted
// in hits, unless it needs a permission the mapping lacks (a read-only zero
// page mapping, then a write): that is a second miss, counted again.
// 'guest-pte' and 'data' references are made only once their GPA translated,
// so they always hit.
//
// Whose tree. With faultIn: true the faults go into the caller's Tdp. With
// faultIn: false the first miss copies the Tdp (copyTdp) and every fault goes
// into the copy: the caller's tree, host memory and event log are untouched,
// and the walk still sees its own earlier faults.
//
// Access rights the TDP references need:
//   data GPA: the access itself (read, write, or exec);
//   guest paging-structure entries: a write (tableWrites 'always', the
//     default), or a read, and a write only for entries whose A/D bits the walk
//     sets (tableWrites 'ad-only'). AMD NPT treats every guest table access as
//     a user write for the nested check, as does Intel EPT when EPT A/D bits
//     are enabled (EPTP bit 6, which KVM enables when the CPU offers it); KVM's
//     own nested walker does the same (paging_tmpl.h, walk_addr_generic:
//     nested_access = (have_ad ? PFERR_WRITE_MASK : 0) | PFERR_USER_MASK).
//     Intel EPT without A/D bits reads guest entries, and the A/D update is a
//     write (SDM vol. 3C §29.3.3.2): that is 'ad-only'.
//   The A/D write itself is recorded on the 'guest-pte' reference (adWrite).
//
// Where a walk stops (`end`):
//   'data'        the access reached memory;
//   'guest-fault' the guest walk faulted (#PF, or #GP for a non-canonical
//                 address): the references end with the guest entry that
//                 faulted, as the guest walk's `levels` do; none for #GP;
//   'tdp-exit'    a miss the TDP model cannot map (no memslot: MMIO; a write
//                 to a read-only slot: emulation; no host page: EFAULT): the
//                 processor exits to KVM and the walk goes no further.
//
// Host addresses. hostAddr of a 'guest-pte' or 'data' reference is the host
// physical address of the byte: the leaf SPTE's frame plus the offset inside
// its span. hostAddr of a 'tdp' reference is the address of the SPTE read;
// the model numbers its tables rather than placing them, so the table's id
// stands in for the host frame of the table page (as in a table SPTE's frame
// field).

import { decodeSpte, isTable, type Spte } from './spte.js';
import type { FaultKind, FaultResult, Tdp } from './tdp.js';
import {
  walk,
  type Access,
  type AccessKind,
  type AdWrite,
  type PagingConfig,
  type ReadPte,
  type WalkResult,
} from './walk.js';

export type NestedRefKind = 'tdp' | 'guest-pte' | 'data';

/** Which guest table accesses need a writable TDP mapping: all of them, or only the entries whose A/D bits the walk sets. */
export type TableWrites = 'always' | 'ad-only';

/** What Tdp.fault did about a miss. */
export interface NestedFault {
  kind: FaultKind;
  /** Level of the entry that maps the GFN after the fault (0 when nothing does). */
  level: number;
  spte: Spte;
}

export interface NestedRef {
  kind: NestedRefKind;
  /** Guest level the reference serves: 5/4..1 for a guest table entry (as walk.ts counts), 0 for the data page. */
  guestLevel: number;
  /** Level of the SPTE read ('tdp' only), as tdp.ts counts: root 4 or 5 ... 1. */
  tdpLevel?: number;
  /** 'tdp': the GPA being translated (the guest entry's, or the data's); 'guest-pte': the entry's GPA; 'data': the data GPA. */
  gpa: bigint;
  /** 'tdp': address of the SPTE read; otherwise the host physical address the GPA translated to. */
  hostAddr?: bigint;
  /** 'tdp': the SPTE value read (before any fault this reference caused). */
  spte?: Spte;
  /** 'guest-pte': the entry's value as read. */
  pte?: bigint;
  /** What the reference needs of the TDP mapping ('tdp' and 'data'). */
  access?: AccessKind;
  hit: boolean;
  /** 'tdp' misses: the fault-in's result. */
  fault?: NestedFault;
  /** 'guest-pte': the Accessed/Dirty update the walk makes to this entry. */
  adWrite?: AdWrite;
}

export type NestedEnd = 'data' | 'guest-fault' | 'tdp-exit';

export interface NestedWalk {
  /** The guest dimension on its own (walk.ts). */
  guest: WalkResult;
  /** Every reference, in order; a 'data' entry comes last when end is 'data'. */
  refs: NestedRef[];
  end: NestedEnd;
  totals: {
    /** Page-walk references: 'tdp' and 'guest-pte' (the data access is not one). */
    references: number;
    tdp: number;
    guestPte: number;
    /** 'tdp' references that missed: each an EPT violation / NPT fault, faulted in unless it ended the walk. */
    tdpMisses: number;
  };
}

export interface NestedOptions {
  /** Fault misses into the caller's Tdp (true) or into a copy made at the first miss (false). */
  faultIn: boolean;
  /** Default 'always'; see the header. */
  tableWrites?: TableWrites;
}

/** Fault kinds after which the GFN is mapped and the walk can go on. */
const MAPPED: ReadonlySet<FaultKind> = new Set<FaultKind>(['map', 'fast', 'relax', 'spurious']);

/**
 * The tree a walk reads and faults into: the caller's, until the first fault
 * of a walk that must not change it; from then on a copy of it.
 */
class Trees {
  current: Tdp;

  constructor(
    private readonly caller: Tdp,
    private readonly faultIn: boolean,
  ) {
    this.current = caller;
  }

  fault(asId: number, gfn: number, write: boolean, exec: boolean): FaultResult {
    if (!this.faultIn && this.current === this.caller) this.current = copyTdp(this.caller);
    return this.current.fault(asId, gfn, { write, exec });
  }
}

/**
 * The two-dimensional walk for one access. `cr3`, `access` and `readGuestPte`
 * are the guest walk's (walk.ts); `tdp` and `asId` the host dimension. With
 * faultIn: false nothing the caller holds changes; with faultIn: true `tdp`
 * changes only through Tdp.fault.
 */
export function nestedWalk(
  guestCfg: PagingConfig,
  cr3: bigint,
  access: Access,
  readGuestPte: ReadPte,
  tdp: Tdp,
  asId: number,
  opts: NestedOptions,
): NestedWalk {
  const guest = walk(guestCfg, cr3, access, readGuestPte);
  const tableWrites = opts.tableWrites ?? 'always';
  const trees = new Trees(tdp, opts.faultIn);
  const refs: NestedRef[] = [];
  const finish = (end: NestedEnd): NestedWalk => {
    const count = (k: NestedRefKind) => refs.filter((r) => r.kind === k).length;
    const tdpRefs = count('tdp');
    const guestPte = count('guest-pte');
    const tdpMisses = refs.filter((r) => r.kind === 'tdp' && !r.hit).length;
    return { guest, refs, end, totals: { references: tdpRefs + guestPte, tdp: tdpRefs, guestPte, tdpMisses } };
  };

  for (const l of guest.levels) {
    const adWrite = guest.adWrites.find((a) => a.pteGpa === l.pteGpa && a.level === l.level);
    const need: AccessKind = tableWrites === 'always' || adWrite ? 'write' : 'read';
    const hostAddr = translate(trees, asId, l.pteGpa, need, l.level, refs);
    if (hostAddr === undefined) return finish('tdp-exit');
    refs.push({
      kind: 'guest-pte',
      guestLevel: l.level,
      gpa: l.pteGpa,
      hostAddr,
      pte: l.pte,
      hit: true,
      ...(adWrite ? { adWrite } : {}),
    });
  }
  if (!guest.ok) return finish('guest-fault');

  const hostAddr = translate(trees, asId, guest.gpa, access.kind, 0, refs);
  if (hostAddr === undefined) return finish('tdp-exit');
  refs.push({ kind: 'data', guestLevel: 0, gpa: guest.gpa, hostAddr, access: access.kind, hit: true });
  return finish('data');
}

/**
 * The TDP walk of one GPA: pushes one 'tdp' reference per SPTE read, root
 * first, and returns the host address, or undefined when a miss ends in an
 * exit. On a miss it faults the GFN in and reads the tree again as the fault
 * left it, listing only the levels below the one that missed (a fault that
 * mapped a leaf at the missing level itself leaves none). One fault per
 * translation: if the tree still does not permit the access after it, the
 * translation ends there.
 */
function translate(
  trees: Trees,
  asId: number,
  gpa: bigint,
  need: AccessKind,
  guestLevel: number,
  refs: NestedRef[],
): bigint | undefined {
  const gfn = Number(gpa >> 12n);
  const write = need === 'write';
  const exec = need === 'exec';
  let below = Infinity; // levels at and above this one are already listed
  let faulted = false;
  for (;;) {
    let missAt = 0;
    for (const it of trees.current.walk(asId, gfn, gfn + 1, null)) {
      const spte = it.old;
      const info = decodeSpte(spte);
      const table = isTable(spte);
      const hit = table || (info.leaf && (!write || info.writable) && (!exec || info.executable));
      if (it.level < below) {
        const hostAddr = (BigInt(it.table.id) << 12n) + BigInt(it.index * 8);
        refs.push({ kind: 'tdp', guestLevel, tdpLevel: it.level, gpa, hostAddr, spte, access: need, hit });
      }
      if (table) continue;
      if (hit) return (BigInt(info.pfn) << 12n) + (BigInt(gfn - it.gfn) << 12n) + (gpa & 0xfffn);
      missAt = it.level;
      break;
    }
    if (missAt === 0 || faulted) return undefined;
    const r = trees.fault(asId, gfn, write, exec);
    refs[refs.length - 1]!.fault = { kind: r.kind, level: r.level, spte: r.spte };
    if (!MAPPED.has(r.kind)) return undefined;
    faulted = true;
    below = missAt;
  }
}

/**
 * A deep copy of a Tdp (tree, host memory, memslots, dirty sets, event log),
 * for faulting in without touching the original. It copies the object graph
 * as data, keeping prototypes, shared references, typed arrays, Maps, Sets
 * and frozen objects: correct because the model is plain data (no closures,
 * no #private fields, no handles). It throws if it meets a function, so a
 * model that stops being plain data fails loudly rather than sharing state.
 */
export function copyTdp(tdp: Tdp): Tdp {
  if (tdp.activeWalks !== 0) throw new Error('copyTdp: a walk of the TDP model is open');
  return copyData(tdp, new Map(), 'tdp');
}

function copyData<T>(x: T, seen: Map<object, unknown>, path: string): T {
  if (typeof x === 'function') throw new Error(`copyTdp: ${path} is a function; the model is no longer plain data`);
  if (typeof x !== 'object' || x === null) return x;
  const done = seen.get(x);
  if (done !== undefined) return done as T;
  let c: object;
  if (ArrayBuffer.isView(x)) {
    c = (x as unknown as Float64Array).slice();
    seen.set(x, c);
  } else if (x instanceof Map) {
    const m = new Map();
    seen.set(x, m);
    for (const [k, v] of x) m.set(copyData(k, seen, `${path}.key`), copyData(v, seen, `${path}.get()`));
    c = m;
  } else if (x instanceof Set) {
    const s = new Set();
    seen.set(x, s);
    for (const v of x) s.add(copyData(v, seen, `${path}.has()`));
    c = s;
  } else if (Array.isArray(x)) {
    const a: unknown[] = new Array(x.length);
    seen.set(x, a);
    for (let i = 0; i < x.length; i++) a[i] = copyData(x[i], seen, `${path}[${i}]`);
    c = a;
  } else {
    c = Object.create(Object.getPrototypeOf(x)) as object;
    seen.set(x, c);
    for (const k of Reflect.ownKeys(x)) {
      const d = Object.getOwnPropertyDescriptor(x, k)!;
      if ('value' in d) d.value = copyData(d.value, seen, `${path}.${String(k)}`);
      Object.defineProperty(c, k, d);
    }
  }
  if (Object.isFrozen(x)) Object.freeze(c);
  return c as T;
}

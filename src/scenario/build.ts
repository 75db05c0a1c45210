// Turns a scenario's mappings into guest page tables, on top of the tables
// bring-up wrote. The same function builds them in KVM guest memory (the
// engine) and in a MemImage (the `walk` command), so both see identical tables.
//
// Order of the build, and why:
//   1. every mapping is added with PageTables.map(); table entries it creates
//      get P|RW|US so that a later mapping sharing them finds them present;
//   2. the table attributes are written into every non-leaf entry the
//      scenario created (not the ones bring-up created: see isBringUpEntry);
//   3. the raw overrides are applied, mapping by mapping, in order.
// A table entry with P = 0 from step 2 or 3 would make step 1 of a later
// mapping allocate a fresh table over it, which is why 2 and 3 come last.
import { CR4, type BringUp, type BringUpOptions, type GuestMem } from '../arch/x86/bringup.js';
import { LAYOUT, RETURN_GVA } from '../arch/x86/layout.js';
import {
  levelShift,
  levelSpan,
  PTE_A,
  PTE_ADDR_MASK,
  PTE_D,
  PTE_G,
  PTE_NX,
  PTE_P,
  PTE_PCD,
  PTE_PKEY_SHIFT,
  PTE_PKEY_MASK,
  PTE_PWT,
  PTE_RW,
  PTE_US,
} from '../arch/x86/pte.js';
import { PAGE_LEVEL, PageTables } from '../arch/x86/tables.js';
import { pagingConfigOf, type PagingCpu } from '../model/paging.js';
import type { PagingConfig } from '../model/walk.js';
import type { HostBacking } from '../base/host-backing.js';
import { BACKINGS, memFlags } from '../model/vm.js';
import type { Mapping, MemslotDecl, PteAttrs, Scenario } from './types.js';
import { hex } from '../base/units.js';

/** Bits of a leaf entry for these attributes (PS is added by the table builder). */
function leafBits(a: PteAttrs): bigint {
  return (
    (a.p ? PTE_P : 0n) |
    (a.w ? PTE_RW : 0n) |
    (a.u ? PTE_US : 0n) |
    (a.pwt ? PTE_PWT : 0n) |
    (a.pcd ? PTE_PCD : 0n) |
    (a.a ? PTE_A : 0n) |
    (a.d ? PTE_D : 0n) |
    (a.g ? PTE_G : 0n) |
    (a.nx ? PTE_NX : 0n) |
    (BigInt(a.pkey & 15) << PTE_PKEY_SHIFT)
  );
}

/** Bits of a non-leaf entry for these attributes (D, G and the key do not exist there). */
function tableBits(a: PteAttrs): bigint {
  return leafBits(a) & ~(PTE_D | PTE_G | PTE_PKEY_MASK);
}

/** Level of a mapping's leaf entries: 1, 2 or 3. */
export function leafLevel(m: Pick<Mapping, 'page'>): number {
  return PAGE_LEVEL[m.page];
}

/** First address of the region the entry at `level` for `gva` maps. */
function spanStart(gva: bigint, level: number): bigint {
  return gva & ~(levelSpan(level) - 1n);
}

/**
 * Whether the entry at `level` for `gva` is one bring-up created: its region
 * meets the identity map [0, LAYOUT.identityEnd). Scenario table attributes
 * and raw overrides never change these entries, or the guest's own code,
 * stack and tables would move under it.
 */
export function isBringUpEntry(gva: bigint, level: number): boolean {
  return spanStart(gva, level) < LAYOUT.identityEnd;
}

/** Whether the entry at `level` for `gva` also translates RETURN_GVA, which must stay unmapped. */
export function coversReturnGva(gva: bigint, level: number): boolean {
  const start = spanStart(gva, level);
  return RETURN_GVA >= start && RETURN_GVA - start < levelSpan(level);
}

/** The mapping whose GVA range holds `gva`, if any. */
export function mappingAt(s: Pick<Scenario, 'mappings'>, gva: bigint): Mapping | undefined {
  return s.mappings.find((m) => gva >= m.gva && gva - m.gva < m.size);
}

/** Key of the entry at `level` for `gva` (entries at one level are told apart by the GVA bits above the level). */
function entryKey(gva: bigint, level: number): string {
  return `${level}:${(gva >> BigInt(levelShift(level))).toString(16)}`;
}

/** Start of each `level` region that the mapping's GVA range meets. */
function* regions(m: Mapping, level: number): Generator<bigint> {
  const span = levelSpan(level);
  for (let va = spanStart(m.gva, level); va < m.gva + m.size; va += span) yield va;
}

export interface ScenarioTables {
  tables: PageTables;
  /** GPA of the entry at `level` for `gva`; only for addresses inside a mapping, levels from its leaf up. */
  entries: (gva: bigint, level: number) => bigint;
}

/** Adds every mapping of `s` to `boot.tables` in `mem`, then its table attributes and raw overrides. */
export function buildScenarioTables(s: Scenario, mem: GuestMem, boot: BringUp): ScenarioTables {
  const tables = boot.tables;
  const top = tables.levels;
  const at = new Map<string, bigint>();

  for (const m of s.mappings) {
    tables.map(m.gva, m.gpa, m.size, m.page, { leaf: leafBits(m.leaf), table: PTE_P | PTE_RW | PTE_US });
    for (let level = leafLevel(m); level <= top; level++) {
      for (const va of regions(m, level)) {
        const k = entryKey(va, level);
        if (!at.has(k)) at.set(k, tables.entry(va, level)); // present all the way: entry() creates nothing
      }
    }
  }

  for (const m of s.mappings) {
    const bits = tableBits(m.table);
    for (let level = leafLevel(m) + 1; level <= top; level++) {
      for (const va of regions(m, level)) {
        if (isBringUpEntry(va, level)) continue;
        const e = at.get(entryKey(va, level))!;
        mem.write64(e, (mem.read64(e) & PTE_ADDR_MASK) | bits);
      }
    }
  }

  for (const m of s.mappings) {
    for (const r of m.raw) {
      for (const va of regions(m, r.level)) {
        const e = at.get(entryKey(va, r.level))!;
        mem.write64(e, (mem.read64(e) & ~r.clear) | r.set);
      }
    }
  }

  return {
    tables,
    entries(gva, level) {
      const e = at.get(entryKey(gva, level));
      if (e === undefined)
        throw new RangeError(`no level-${level} entry is known for ${hex(gva)}: no mapping covers it at that level`);
      return e;
    },
  };
}

/** The walk model's configuration for a scenario's initial paging state on a CPU. */
export function pagingConfigFor(s: Scenario, cpu: PagingCpu): PagingConfig {
  const p = s.paging;
  const mode = {
    levels: p.levels,
    cr0Wp: p.cr0.wp,
    cr4Smep: p.cr4.smep,
    cr4Smap: p.cr4.smap,
    cr4Pke: p.cr4.pke,
    efer: { nxe: p.efer.nxe },
    pkru: p.pkru,
  };
  return pagingConfigOf(cpu, mode, { vendor: p.vendor === 'auto' ? undefined : p.vendor });
}

/** Bring-up options for a scenario's initial paging state. */
export function bringUpOptions(s: Scenario): BringUpOptions {
  const c = s.paging.cr4;
  return {
    levels: s.paging.levels,
    nxe: s.paging.efer.nxe,
    wp: s.paging.cr0.wp,
    cr4: (c.smep ? CR4.SMEP : 0n) | (c.smap ? CR4.SMAP : 0n) | (c.pke ? CR4.PKE : 0n),
  };
}

/**
 * Guest-physical memory as a sparse image: 8-byte words in a Map, absent
 * words read as zero. Enough for bring-up and the page tables, so the model
 * can walk a scenario's tables without a VM.
 */
export class MemImage implements GuestMem {
  private readonly words = new Map<bigint, bigint>();

  read64(gpa: bigint): bigint {
    const off = gpa & 7n;
    if (off === 0n) return this.words.get(gpa) ?? 0n;
    let v = 0n;
    for (let i = 7n; i >= 0n; i--) v = (v << 8n) | BigInt(this.byte(gpa + i));
    return v;
  }

  write64(gpa: bigint, v: bigint): void {
    const u = BigInt.asUintN(64, v);
    if ((gpa & 7n) === 0n) return this.put(gpa, u);
    for (let i = 0n; i < 8n; i++) this.setByte(gpa + i, Number((u >> (8n * i)) & 0xffn));
  }

  write(gpa: bigint, bytes: ArrayLike<number>): void {
    for (let i = 0; i < bytes.length; i++) this.setByte(gpa + BigInt(i), bytes[i]!);
  }

  private byte(gpa: bigint): number {
    const w = this.words.get(gpa & ~7n) ?? 0n;
    return Number((w >> (8n * (gpa & 7n))) & 0xffn);
  }

  private setByte(gpa: bigint, b: number): void {
    const base = gpa & ~7n;
    const shift = 8n * (gpa & 7n);
    const w = this.words.get(base) ?? 0n;
    this.put(base, (w & ~(0xffn << shift)) | (BigInt(b & 0xff) << shift));
  }

  private put(base: bigint, w: bigint): void {
    if (w === 0n) this.words.delete(base);
    else this.words.set(base, w);
  }
}

/** The host memory behind a scenario's memslot, from the one table of backings (model/vm.ts BACKINGS). */
export function slotBacking(b: MemslotDecl['backing']): HostBacking {
  return BACKINGS[b].alloc;
}

/** What the VMM allocates for a declared slot: the KVM memslot and its host memory, placed as `hva` asks. */
export function slotSpec(m: MemslotDecl): {
  slot: number;
  gpa: bigint;
  size: number;
  backing: HostBacking;
  flags: number;
  placement?: { modulo: bigint; offset: bigint };
} {
  const placement = m.hva && { modulo: m.hva.modulo === '1G' ? 1n << 30n : 1n << 21n, offset: m.hva.offset };
  return {
    slot: m.slot,
    gpa: m.gpa,
    size: Number(m.size),
    backing: slotBacking(m.backing),
    flags: memFlags(m),
    ...(placement ? { placement } : {}),
  };
}

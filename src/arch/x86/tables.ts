// Builds x86-64 guest page tables in guest memory: 4- or 5-level, 4K/2M/1G
// leaves, any raw bits. Tables come from a caller's page allocator, so the
// caller knows exactly which GPAs hold paging structures.
import { levelShift, pteIndex, PTE_A, PTE_ADDR_MASK, PTE_P, PTE_PS, PTE_RW, PTE_US } from './pte.js';

export interface PhysMem {
  read64(gpa: bigint): bigint;
  write64(gpa: bigint, v: bigint): void;
}

export type PageSize = '4K' | '2M' | '1G';
export const PAGE_LEVEL: Record<PageSize, number> = { '4K': 1, '2M': 2, '1G': 3 };

export interface MapOptions {
  /** Bits for the leaf entry besides the address (P is not implied). */
  leaf: bigint;
  /** Bits for table entries created on the way down (default P|RW|US). */
  table?: bigint;
  /** Where tables created on the way down come from (default: the builder's allocator). */
  alloc?: () => bigint;
}

export class PageTables {
  readonly root: bigint;
  /** GPAs of every table page this builder allocated, root first. */
  readonly tablePages: bigint[] = [];

  constructor(
    private readonly mem: PhysMem,
    private readonly allocPage: () => bigint,
    readonly levels: 4 | 5 = 4,
  ) {
    this.root = this.newTable();
  }

  private newTable(alloc: () => bigint = this.allocPage): bigint {
    const gpa = alloc();
    for (let i = 0n; i < 4096n; i += 8n) this.mem.write64(gpa + i, 0n);
    this.tablePages.push(gpa);
    return gpa;
  }

  /** GPA of the entry for `gva` at `level`, creating tables above it with `table` bits. */
  entry(gva: bigint, level: number, table: bigint = PTE_P | PTE_RW | PTE_US, alloc?: () => bigint): bigint {
    let tableGpa = this.root;
    for (let l = this.levels; l > level; l--) {
      const e = tableGpa + BigInt(pteIndex(gva, l) * 8);
      let v = this.mem.read64(e);
      if (!(v & PTE_P) || (v & PTE_PS && l <= 3)) {
        v = this.newTable(alloc) | table;
        this.mem.write64(e, v);
      }
      tableGpa = v & PTE_ADDR_MASK;
    }
    return tableGpa + BigInt(pteIndex(gva, level) * 8);
  }

  /** Maps [gva, gva+size) to [gpa, ...) with pages of one size. */
  map(gva: bigint, gpa: bigint, size: bigint, page: PageSize, opts: MapOptions): void {
    const level = PAGE_LEVEL[page];
    const span = 1n << BigInt(levelShift(level));
    if (gva % span || gpa % span || size % span) {
      throw new RangeError(
        `map: gva 0x${gva.toString(16)}, gpa 0x${gpa.toString(16)} and size 0x${size.toString(16)} must be ${page} aligned`,
      );
    }
    const ps = level > 1 ? PTE_PS : 0n;
    for (let off = 0n; off < size; off += span) {
      this.mem.write64(this.entry(gva + off, level, opts.table, opts.alloc), (gpa + off) | opts.leaf | ps);
    }
  }

  /** Sets the Accessed bit on every table entry (not leaves) — bring-up memory then sees no walker writes. */
  static readonly TABLE_ACCESSED = PTE_P | PTE_RW | PTE_US | PTE_A;
}

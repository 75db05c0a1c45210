// x86 long-mode paging-structure entry layout (4-level and 5-level paging).
//
// Levels are numbered the way KVM numbers them (arch/x86/kvm/mmu/paging_tmpl.h):
//   5 = PML5E, 4 = PML4E, 3 = PDPTE, 2 = PDE, 1 = PTE.
// Bit positions follow Intel SDM vol. 3A §4.5 (tables 4-14 .. 4-20) and
// AMD APM vol. 2 §5.3 / §5.4. Every value is a bigint holding the raw 64-bit
// entry; the helpers here never validate an entry, they only pick bits out of it.

export const PTE_P = 1n << 0n; // present
export const PTE_RW = 1n << 1n; // read/write
export const PTE_US = 1n << 2n; // user/supervisor
export const PTE_PWT = 1n << 3n; // page-level write-through
export const PTE_PCD = 1n << 4n; // page-level cache disable
export const PTE_A = 1n << 5n; // accessed
export const PTE_D = 1n << 6n; // dirty (leaf entries only)
export const PTE_PS = 1n << 7n; // page size (PDPTE, PDE)
export const PTE_PAT_4K = 1n << 7n; // PAT bit of a 4 KiB PTE (same position as PS)
export const PTE_G = 1n << 8n; // global (leaf entries only)
export const PTE_PAT_LARGE = 1n << 12n; // PAT bit of a 2 MiB PDE / 1 GiB PDPTE
export const PTE_NX = 1n << 63n; // execute-disable (XD); reserved when EFER.NXE = 0
export const PTE_PKEY_SHIFT = 59n; // protection key, bits 62:59 of a leaf (CR4.PKE)
export const PTE_PKEY_MASK = 0xfn << PTE_PKEY_SHIFT;

/** Numeric (32-bit) versions of the low flag bits, for code that has split an entry. */
export const PTE_BITS = {
  P: 1 << 0,
  RW: 1 << 1,
  US: 1 << 2,
  PWT: 1 << 3,
  PCD: 1 << 4,
  A: 1 << 5,
  D: 1 << 6,
  PS: 1 << 7,
  G: 1 << 8,
} as const;

/** Mask of bits lo..hi inclusive (like the kernel's GENMASK_ULL(hi, lo)). */
export function bitRange(lo: number, hi: number): bigint {
  if (hi < lo) return 0n;
  return ((1n << BigInt(hi - lo + 1)) - 1n) << BigInt(lo);
}

/** Bits 51:12: the address field of any entry that references a table or a 4 KiB page. */
export const PTE_ADDR_MASK = bitRange(12, 51);

/** Architectural upper bound of the physical-address field (MAXPHYADDR <= 52). */
export const MAX_PHYS_BITS = 52;

/** Reserved physical-address bits of an entry: bits 51:maxPhyAddr (empty when maxPhyAddr >= 52). */
export function physAddrRsvdMask(maxPhyAddr: number): bigint {
  return bitRange(maxPhyAddr, MAX_PHYS_BITS - 1);
}

/** Number of linear-address bits translated below an entry at `level` (12, 21, 30, 39, 48). */
export function levelShift(level: number): number {
  return 12 + 9 * (level - 1);
}

/** Size of the region one entry at `level` maps: 4 KiB, 2 MiB, 1 GiB, 512 GiB, 256 TiB. */
export function levelSpan(level: number): bigint {
  return 1n << BigInt(levelShift(level));
}

export const PAGE_4K = 1n << 12n;
export const PAGE_2M = 1n << 21n;
export const PAGE_1G = 1n << 30n;

/** Address field of a leaf at `level` (bits 51:12, 51:21 or 51:30). */
export function leafAddrMask(level: number): bigint {
  return bitRange(levelShift(level), MAX_PHYS_BITS - 1);
}

/**
 * Bits inside the address field of a large-page leaf that must be zero:
 * bits 20:13 of a 2 MiB PDE and 29:13 of a 1 GiB PDPTE (bit 12 is the PAT bit).
 * Zero for other levels.
 */
export function largePageRsvdMask(level: number): bigint {
  if (level === 2) return bitRange(13, 20);
  if (level === 3) return bitRange(13, 29);
  return 0n;
}

/** Index of the entry for `gva` in the table at `level` (9 bits). */
export function pteIndex(gva: bigint, level: number): number {
  return Number((gva >> BigInt(levelShift(level))) & 511n);
}

export function isPresent(value: bigint): boolean {
  return (value & PTE_P) !== 0n;
}

/** Whether bit 7 means "this entry maps a page" at this level (PDE or PDPTE); a PTE is always a leaf. */
export function isLeafAt(value: bigint, level: number): boolean {
  if (level === 1) return true;
  return (level === 2 || level === 3) && (value & PTE_PS) !== 0n;
}

/** Protection key of an entry (bits 62:59); meaningful only for leaves with CR4.PKE = 1. */
export function pteKey(value: bigint): number {
  return Number((value & PTE_PKEY_MASK) >> PTE_PKEY_SHIFT);
}

/** Physical address an entry points to: next table for non-leaves, page frame for leaves. */
export function pteTarget(value: bigint, level: number): bigint {
  return isLeafAt(value, level) ? value & leafAddrMask(level) : value & PTE_ADDR_MASK;
}

export const LEVEL_NAMES: Readonly<Record<number, string>> = {
  5: 'PML5E',
  4: 'PML4E',
  3: 'PDPTE',
  2: 'PDE',
  1: 'PTE',
};

/**
 * Short flag string for an entry, e.g. `P W U A D PS NX pk=3`.
 * A clear P bit gives `np` (the other bits are then ignored by the processor).
 * Leaf-only bits (D, G, PAT) are shown only where the entry is a leaf; PS only at
 * levels 2..5 (where a set bit 7 is PS, or reserved above level 3); at level 1 bit 7
 * is PAT. The protection key is shown for leaves when non-zero.
 */
export function describePte(value: bigint, level: number): string {
  if ((value & PTE_P) === 0n) return 'np';
  const out: string[] = ['P'];
  if (value & PTE_RW) out.push('W');
  if (value & PTE_US) out.push('U');
  if (value & PTE_PWT) out.push('PWT');
  if (value & PTE_PCD) out.push('PCD');
  if (value & PTE_A) out.push('A');
  const leaf = isLeafAt(value, level);
  if (leaf && value & PTE_D) out.push('D');
  if (level > 1 && value & PTE_PS) out.push('PS');
  if (leaf && value & PTE_G) out.push('G');
  if (level === 1 && value & PTE_PAT_4K) out.push('PAT');
  if (leaf && level > 1 && value & PTE_PAT_LARGE) out.push('PAT');
  if (value & PTE_NX) out.push('NX');
  if (leaf) {
    const k = pteKey(value);
    if (k !== 0) out.push(`pk=${k}`);
  }
  return out.join(' ');
}

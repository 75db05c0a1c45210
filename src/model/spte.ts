// The model SPTE and the level arithmetic (the model's spte.h): how one entry
// of the host dimension's tables is packed, and how levels are counted.
//
// Levels are numbered the way KVM's x86 MMU numbers them everywhere in the
// model: 1 = 4 KiB leaf, 2 = 2 MiB, 3 = 1 GiB, 4 and 5 = upper tables.
// arm64 numbers its lookup levels the other way round (0 = top, 3 = 4 KiB);
// armLevel() / fromArmLevel() convert, and nothing else here uses arm64's
// numbering. With the 4 KiB granule both numberings describe the same tables:
// arm64 level 1 blocks are level-3 leaves here, level 2 blocks are level-2
// leaves, level 3 pages are level-1 leaves.

// ---------------------------------------------------------------------------
// Levels

/** 4 KiB pages that one entry at `level` maps: 1, 512, 512^2, 512^3, 512^4. */
export const PAGES: readonly number[] = [0, 1, 512, 512 ** 2, 512 ** 3, 512 ** 4];

/** arm64 lookup level (0..3) of a model level (4..1). */
export function armLevel(level: number): number {
  return 4 - level;
}

/** Model level (4..1) of an arm64 lookup level (0..3). */
export function fromArmLevel(lookupLevel: number): number {
  return 4 - lookupLevel;
}

/** The first GFN of the entry at `level` that maps `gfn`. */
export function roundDown(gfn: number, level: number): number {
  return gfn - (gfn % PAGES[level]);
}

// ---------------------------------------------------------------------------
// SPTEs
//
// A model SPTE is a number: flag bits in bits 11:0, a frame number from bit
// 12 up (spte = pfn * 4096 + flags). Frames stay below 2^41, so every SPTE is
// an exact integer below 2^53. For a table entry the frame field holds the
// child table's id. Flag bits are tested with `&` (exact for bits below 32);
// they are set and cleared with withBits()/withoutBits(), never with `|`/`&~`,
// which would cut the value to 32 bits.

export type Spte = number;

export const SPTE_P = 0x1; // present (KVM: shadow-present)
export const SPTE_W = 0x2; // writable
export const SPTE_X = 0x4; // executable
export const SPTE_A = 0x20; // accessed
export const SPTE_D = 0x40; // dirty
export const SPTE_LEAF = 0x80; // maps memory (any level; KVM: is_last_spte)
export const SPTE_HOST_W = 0x100; // host mapping writable (KVM: host-writable)
export const SPTE_MMU_W = 0x200; // KVM may make it writable without the slow path (KVM: mmu-writable)
export const SPTE_MMIO = 0x400; // not present: cached MMIO (x86)

export function makeSpte(pfn: number, flags: number): Spte {
  return pfn * 4096 + flags;
}
export function sptePfn(s: Spte): number {
  return Math.floor(s / 4096);
}
export function spteFlags(s: Spte): number {
  return s % 4096;
}
export function isPresent(s: Spte): boolean {
  return (s & SPTE_P) !== 0;
}
export function isLeaf(s: Spte): boolean {
  return (s & (SPTE_P | SPTE_LEAF)) === (SPTE_P | SPTE_LEAF);
}
export function isTable(s: Spte): boolean {
  return (s & (SPTE_P | SPTE_LEAF)) === SPTE_P;
}
export function withBits(s: Spte, bits: number): Spte {
  return s + (bits & ~spteFlags(s));
}
export function withoutBits(s: Spte, bits: number): Spte {
  return s - (bits & spteFlags(s));
}

export interface SpteInfo {
  present: boolean;
  leaf: boolean;
  mmio: boolean;
  pfn: number;
  writable: boolean;
  executable: boolean;
  accessed: boolean;
  dirty: boolean;
  hostWritable: boolean;
  mmuWritable: boolean;
}

export function decodeSpte(s: Spte): SpteInfo {
  return {
    present: isPresent(s),
    leaf: isLeaf(s),
    mmio: (s & SPTE_MMIO) !== 0,
    pfn: sptePfn(s),
    writable: (s & SPTE_W) !== 0,
    executable: (s & SPTE_X) !== 0,
    accessed: (s & SPTE_A) !== 0,
    dirty: (s & SPTE_D) !== 0,
    hostWritable: (s & SPTE_HOST_W) !== 0,
    mmuWritable: (s & SPTE_MMU_W) !== 0,
  };
}

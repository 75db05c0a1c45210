// Throughput of the page-walk model: walks per second over a realistic set of guest
// page tables held in a Map (guest-physical address -> 64-bit entry).
//
// Layout (4-level paging, Intel, MAXPHYADDR 48, NXE, WP, SMEP, SMAP on):
//   PML4[0]   -> low kernel region: 8 page tables of 4 KiB pages (mixed R/W, NX, a
//                few not present) and 8 PDEs mapping 2 MiB pages
//   PML4[1]   -> user region: 16 page tables of user 4 KiB pages (code RX, data RW+NX)
//   PML4[511] -> kernel high half: PDPT[510] maps a 1 GiB page
//   everything else not present.
// Most entries already have A (and D on writable leaves) set, as they would after
// first use; a few do not, so the A/D update path is exercised too.
// The access stream mixes hits (4K/2M/1G, reads, writes, fetches, CPL 0 and 3) with
// faults (not present, user->supervisor, write to read-only, NX fetch, SMEP, SMAP,
// reserved bits).

import { mulberry32 } from '../src/model/prng.js';
import { walk, type Access, type PagingConfig } from '../src/model/walk.js';

const P = 1n,
  RW = 2n,
  US = 4n,
  A = 32n,
  D = 64n,
  PS = 128n,
  NX = 1n << 63n;

interface BenchSet {
  cfg: PagingConfig;
  cr3: bigint;
  mem: Map<bigint, bigint>;
  accesses: Access[];
}

export function buildBenchSet(seed = 1): BenchSet {
  const next = mulberry32(seed);
  const rand = () => next() / 2 ** 32;
  const mem = new Map<bigint, bigint>();
  let nextFrame = 0x100000n; // tables from 1 MiB up
  const alloc = (): bigint => {
    const f = nextFrame;
    nextFrame += 0x1000n;
    return f;
  };
  const set = (table: bigint, index: number, value: bigint): void => {
    mem.set(table + BigInt(index) * 8n, value);
  };

  const pml4 = alloc();
  // low kernel region
  const pdptLow = alloc();
  set(pml4, 0, pdptLow | P | RW | A);
  const pdLow = alloc();
  set(pdptLow, 0, pdLow | P | RW | A);
  for (let t = 0; t < 8; t++) {
    const pt = alloc();
    set(pdLow, t, pt | P | RW | A);
    for (let i = 0; i < 512; i++) {
      const r = rand();
      if (r < 0.03) continue; // not present
      const frame = 0x4000_0000n + BigInt(t * 512 + i) * 0x1000n;
      let e = frame | P | A;
      if (rand() < 0.7) e |= RW | D;
      if (rand() < 0.5) e |= NX;
      if (rand() < 0.02) e &= ~A;
      set(pt, i, e);
    }
  }
  for (let j = 8; j < 16; j++) set(pdLow, j, (0x8000_0000n + BigInt(j) * 0x20_0000n) | P | RW | A | D | PS | NX);

  // user region
  const pdptUser = alloc();
  set(pml4, 1, pdptUser | P | RW | US | A);
  const pdUser = alloc();
  set(pdptUser, 0, pdUser | P | RW | US | A);
  for (let t = 0; t < 16; t++) {
    const pt = alloc();
    set(pdUser, t, pt | P | RW | US | A);
    for (let i = 0; i < 512; i++) {
      if (rand() < 0.02) continue;
      const frame = 0x1_0000_0000n + BigInt(t * 512 + i) * 0x1000n;
      const code = t < 4;
      let e = frame | P | US | A;
      e |= code ? 0n : RW | D | NX;
      if (rand() < 0.02) e &= ~(A | D);
      set(pt, i, e);
    }
  }

  // kernel high half: PML4[511] -> PDPT[510] 1 GiB page
  const pdptHigh = alloc();
  set(pml4, 511, pdptHigh | P | RW | A);
  set(pdptHigh, 510, 0x4000_0000n | P | RW | A | D | PS);
  // a 1 GiB PDPTE with reserved bit 13 set
  set(pdptHigh, 509, 0x4000_0000n | P | RW | A | PS | (1n << 13n));

  const cfg: PagingConfig = {
    levels: 4,
    vendor: 'intel',
    maxPhyAddr: 48,
    cr0Wp: true,
    cr4Smep: true,
    cr4Smap: true,
    cr4Pke: false,
    efer: { nxe: true },
    pdpe1gb: true,
    pkru: 0,
  };

  const lowBase = 0n;
  const userBase = 1n << 39n;
  const highBase = 0xffff_ff80_0000_0000n; // PML4[511]
  const accesses: Access[] = [];
  const kinds = ['read', 'write', 'exec'] as const;
  for (let n = 0; n < 4096; n++) {
    const r = rand();
    const kind = kinds[Math.floor(rand() * 3)]!;
    const off = BigInt(Math.floor(rand() * 4096));
    let gva: bigint;
    let cpl: 0 | 3 = 0;
    if (r < 0.35) {
      gva = lowBase + BigInt(Math.floor(rand() * 8 * 512)) * 0x1000n + off; // kernel 4K
    } else if (r < 0.45) {
      gva = lowBase + 8n * 0x20_0000n + BigInt(Math.floor(rand() * 8 * 0x20_0000)); // kernel 2M
    } else if (r < 0.75) {
      gva = userBase + BigInt(Math.floor(rand() * 16 * 512)) * 0x1000n + off; // user 4K
      cpl = rand() < 0.85 ? 3 : 0;
    } else if (r < 0.85) {
      gva = highBase + 510n * 0x4000_0000n + BigInt(Math.floor(rand() * 0x4000_0000)); // 1G
    } else if (r < 0.9) {
      gva = highBase + 509n * 0x4000_0000n + off; // reserved bit
    } else if (r < 0.95) {
      gva = BigInt(2 + Math.floor(rand() * 254)) << 39n; // not present at PML4
    } else {
      gva = lowBase + BigInt(Math.floor(rand() * 8 * 512)) * 0x1000n + off; // kernel page from CPL 3
      cpl = 3;
    }
    accesses.push({ gva, kind, cpl });
  }
  return { cfg, cr3: pml4, mem, accesses };
}

export function benchModelWalks(): { name: 'model_walks_per_s'; unit: 'walks/s'; value: number } {
  const { cfg, cr3, mem, accesses } = buildBenchSet(1);
  const readPte = (gpa: bigint): bigint => mem.get(gpa) ?? 0n;
  const n = accesses.length;
  let sink = 0;
  const runFor = (count: number): void => {
    for (let i = 0; i < count; i++) {
      const r = walk(cfg, cr3, accesses[i % n]!, readPte);
      sink += r.ok ? r.levels.length : 1;
    }
  };
  runFor(200_000); // warm-up (JIT)
  const walks = 2_000_000;
  const t0 = process.hrtime.bigint();
  runFor(walks);
  const ns = Number(process.hrtime.bigint() - t0);
  if (sink < 0) throw new Error('unreachable');
  return { name: 'model_walks_per_s', unit: 'walks/s', value: Math.round(walks / (ns / 1e9)) };
}

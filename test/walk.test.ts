// Page-walk model tests. Every expected value is derived by hand from the Intel SDM
// vol. 3A ch. 4 / AMD APM vol. 2 ch. 5 rules (and KVM's walk_addr_generic where the
// architecture leaves a choice), never captured from the model's output.
import { describe, expect, it } from 'vitest';
import {
  accessException,
  accessedLatitude,
  NON_CANONICAL,
  PFERR,
  compileWalk,
  decodeErrorCode,
  walk,
  reservedMask,
  walkWith,
  type Access,
  type AdWrite,
  type PagingConfig,
  type WalkLevel,
  type WalkResult,
} from '../src/model/walk.js';
import { mulberry32 } from '../src/model/prng.js';
import { WRONG_WALKS, type WrongWalk } from '../src/model/wrong.js';
import {
  describePte,
  largePageRsvdMask,
  leafAddrMask,
  physAddrRsvdMask,
  pteIndex,
  pteKey,
} from '../src/arch/x86/pte.js';

// Entry bits, written out independently of src/arch/x86/pte.ts.
const P = 1n,
  W = 2n,
  U = 4n,
  PWT = 8n,
  PCD = 16n,
  A = 32n,
  D = 64n,
  PS = 128n,
  G = 256n;
const PAT_LARGE = 1n << 12n;
const NX = 1n << 63n;
const bit = (n: number): bigint => 1n << BigInt(n);
const key = (k: number): bigint => BigInt(k) << 59n;

const EC = PFERR;

function cfg(over: Partial<PagingConfig> = {}): PagingConfig {
  return {
    levels: 4,
    vendor: 'intel',
    maxPhyAddr: 48,
    cr0Wp: true,
    cr4Smep: false,
    cr4Smap: false,
    cr4Pke: false,
    efer: { nxe: true },
    pdpe1gb: true,
    pkru: 0,
    ...over,
  };
}

// Guest memory layout shared by most tests (4-level paging):
//   CR3 -> PML4 @0x1000; PML4[0] -> PDPT @0x2000; PDPT[0] -> PD @0x3000; PD[0] -> PT @0x4000
//   PDPT[1]: 1 GiB page at 0x8000_0000      (gva 0x4000_0000 .. 0x7fff_ffff)
//   PD[1]:   2 MiB page at 0x0060_0000      (gva 0x0020_0000 .. 0x003f_ffff)
//   PT[i]:   4 KiB pages at 0x0010_0000 + i*0x1000 (gva i*0x1000), flags per index
const CR3 = 0x1000n;
const PML4 = 0x1000n,
  PDPT = 0x2000n,
  PD = 0x3000n,
  PT = 0x4000n;
const PML4E0 = PDPT | P | W | U | A;
const PDPTE0 = PD | P | W | U | A;
const PDPTE1_1G = 0x8000_0000n | P | W | U | A | D | PS;
const PDE0 = PT | P | W | U | A;
const PDE1_2M = 0x60_0000n | P | W | U | A | D | PS;
const PTE = {
  1: 0x10_1000n | P | W | U | A | D, // user RW
  2: 0x10_2000n | P | U | A | D, // user RO
  3: 0x10_3000n | P | W | A | D, // supervisor RW
  4: 0x10_4000n | P | W | U | A | D | NX, // user RW NX
  5: 0x10_5000n | P | A | D, // supervisor RO
  6: 0x10_6000n | P | W | U, // user RW, A and D clear
  7: 0x10_7000n | P | W | U | A, // user RW, A set, D clear
  8: 0x10_8000n | P | U | A | D | key(3), // user RO, protection key 3
  9: 0x10_9000n | P | W | U | A | D | key(5), // user RW, protection key 5
} as const;

type Mem = Map<bigint, bigint>;
function tables(): Mem {
  const m: Mem = new Map();
  m.set(PML4 + 0n * 8n, PML4E0);
  m.set(PDPT + 0n * 8n, PDPTE0);
  m.set(PDPT + 1n * 8n, PDPTE1_1G);
  m.set(PD + 0n * 8n, PDE0);
  m.set(PD + 1n * 8n, PDE1_2M);
  for (const [i, v] of Object.entries(PTE)) m.set(PT + BigInt(i) * 8n, v);
  return m;
}
const reader =
  (m: Mem) =>
  (gpa: bigint): bigint =>
    m.get(gpa) ?? 0n;

function run(m: Mem, a: Partial<Access> & { gva: bigint }, c: PagingConfig = cfg(), cr3 = CR3): WalkResult {
  const access: Access = { kind: 'read', cpl: 0, ...a };
  return walk(c, cr3, access, reader(m));
}

/** Levels of a walk through PML4[0] / PDPT[0] / PD[0] to PT[i], given the entries' values. */
function path4k(i: number, pml4e = PML4E0, pdpte = PDPTE0, pde = PDE0, pte?: bigint): WalkLevel[] {
  return [
    { level: 4, pteGpa: 0x1000n, pte: pml4e, leaf: false },
    { level: 3, pteGpa: 0x2000n, pte: pdpte, leaf: false },
    { level: 2, pteGpa: 0x3000n, pte: pde, leaf: false },
    { level: 1, pteGpa: 0x4000n + BigInt(i) * 8n, pte: pte ?? PTE[i as keyof typeof PTE], leaf: true },
  ];
}

function expectOk(r: WalkResult): Extract<WalkResult, { ok: true }> {
  if (!r.ok) throw new Error(`expected a translation, got ${r.reason} ec=${decodeErrorCode(r.errorCode)}`);
  return r;
}
function expectFault(r: WalkResult): Extract<WalkResult, { ok: false }> {
  if (r.ok) throw new Error(`expected a fault, got gpa 0x${r.gpa.toString(16)}`);
  return r;
}

describe('translation', () => {
  it('4 KiB page: gpa = frame + offset, every level recorded root first', () => {
    const r = expectOk(run(tables(), { gva: 0x1abcn }));
    expect(r.gpa).toBe(0x10_1abcn);
    expect(r.pageSize).toBe(0x1000n);
    expect(r.levels).toEqual(path4k(1));
    expect(r.adWrites).toEqual([]);
    expect(r.effective).toEqual({ w: true, u: true, x: true });
  });

  it('2 MiB page: walk stops at the PDE with PS=1', () => {
    const r = expectOk(run(tables(), { gva: 0x20_0000n + 0x1_2345n }));
    expect(r.gpa).toBe(0x60_0000n + 0x1_2345n);
    expect(r.pageSize).toBe(0x20_0000n);
    expect(r.levels).toEqual([
      { level: 4, pteGpa: 0x1000n, pte: PML4E0, leaf: false },
      { level: 3, pteGpa: 0x2000n, pte: PDPTE0, leaf: false },
      { level: 2, pteGpa: 0x3008n, pte: PDE1_2M, leaf: true },
    ]);
  });

  it('1 GiB page: walk stops at the PDPTE with PS=1', () => {
    const r = expectOk(run(tables(), { gva: 0x4000_0000n + 0x1234_5678n }));
    expect(r.gpa).toBe(0x8000_0000n + 0x1234_5678n);
    expect(r.pageSize).toBe(0x4000_0000n);
    expect(r.levels).toEqual([
      { level: 4, pteGpa: 0x1000n, pte: PML4E0, leaf: false },
      { level: 3, pteGpa: 0x2008n, pte: PDPTE1_1G, leaf: true },
    ]);
  });

  it('PAT bit 12 of a large page is not part of the frame address', () => {
    const m = tables();
    m.set(PD + 8n, PDE1_2M | PAT_LARGE | PWT | PCD | G);
    expect(expectOk(run(m, { gva: 0x20_0010n })).gpa).toBe(0x60_0010n);
    m.set(PDPT + 8n, PDPTE1_1G | PAT_LARGE);
    expect(expectOk(run(m, { gva: 0x4000_0010n })).gpa).toBe(0x8000_0010n);
  });

  it('PAT (bit 7) of a 4 KiB PTE is not a page-size bit', () => {
    const m = tables();
    m.set(PT + 8n, PTE[1] | PS);
    const r = expectOk(run(m, { gva: 0x1008n }));
    expect(r.gpa).toBe(0x10_1008n);
    expect(r.pageSize).toBe(0x1000n);
  });

  it('bits 62:52 are ignored (not reserved, not address)', () => {
    const m = tables();
    m.set(PT + 8n, PTE[1] | bit(52) | bit(58) | key(15));
    m.set(PD, PDE0 | bit(62));
    expect(expectOk(run(m, { gva: 0x1000n })).gpa).toBe(0x10_1000n);
  });

  it('address bits up to MAXPHYADDR-1 are used', () => {
    const m = tables();
    m.set(PT + 8n, PTE[1] | bit(47));
    expect(expectOk(run(m, { gva: 0x1001n })).gpa).toBe(bit(47) | 0x10_1001n);
    const m52 = tables();
    m52.set(PT + 8n, PTE[1] | bit(51));
    expect(expectOk(run(m52, { gva: 0x1001n }, cfg({ maxPhyAddr: 52 }))).gpa).toBe(bit(51) | 0x10_1001n);
  });

  it('CR3 bits 11:0 (PCID / PWT / PCD) and bits 63:52 do not move the root', () => {
    const r = expectOk(run(tables(), { gva: 0x1000n }, cfg(), CR3 | 0xfffn | bit(63)));
    expect(r.levels[0]!.pteGpa).toBe(0x1000n);
  });

  it('upper-half addresses index the top of the PML4; cr2 is the full 64-bit address', () => {
    const m = tables();
    // 0xffff_8000_0000_0000 -> PML4[256] (not present)
    const r = expectFault(run(m, { gva: 0xffff_8000_0000_1234n }));
    expect(r.levels).toEqual([{ level: 4, pteGpa: 0x1000n + 256n * 8n, pte: 0n, leaf: false }]);
    expect(r.cr2).toBe(0xffff_8000_0000_1234n);
    expect(r.errorCode).toBe(0);
  });

  it('5-level paging walks PML5 -> PML4 -> PDPT -> PD -> PT', () => {
    const m = tables();
    // PML5 at 0x9000; gva bits 56:48 = 1 -> PML5[1] -> the 4-level PML4 above
    const PML5 = 0x9000n;
    const PML5E1 = PML4 | P | W | U | A;
    m.set(PML5 + 8n, PML5E1);
    const gva = (1n << 48n) | 0x1234n;
    const r = expectOk(run(m, { gva }, cfg({ levels: 5 }), PML5));
    expect(r.gpa).toBe(0x10_1234n);
    expect(r.levels).toEqual([{ level: 5, pteGpa: 0x9008n, pte: PML5E1, leaf: false }, ...path4k(1)]);
  });
});

describe('canonical addresses', () => {
  it('4-level: bit 47 must be copied into 63:48', () => {
    const r = expectFault(run(tables(), { gva: 0x0000_8000_0000_0000n }));
    expect(r.errorCode).toBe(NON_CANONICAL);
    expect(r.errorCode).toBe(-1);
    expect(r.reason).toBe('non-canonical');
    expect(r.levels).toEqual([]);
    expect(r.adWrites).toEqual([]);
    expect(expectFault(run(tables(), { gva: 0xfff0_0000_0000_0000n })).errorCode).toBe(-1);
    // highest canonical lower-half address walks normally (PML4[255], not present)
    expect(expectFault(run(tables(), { gva: 0x0000_7fff_ffff_ffffn })).errorCode).toBe(0);
  });

  it('5-level: bit 56 must be copied into 63:57', () => {
    const c5 = cfg({ levels: 5 });
    // canonical under LA57, walks PML5[255] (not present)
    const r = expectFault(run(tables(), { gva: 0x0080_0000_0000_0000n - 1n }, c5));
    expect(r.errorCode).toBe(0);
    expect(expectFault(run(tables(), { gva: 0x0000_8000_0000_0000n }, c5)).errorCode).toBe(0);
    expect(expectFault(run(tables(), { gva: 0x0100_0000_0000_0000n }, c5)).errorCode).toBe(-1);
  });

  it('the last byte of a sized access must be canonical too', () => {
    const last = 0x0000_7fff_ffff_fffcn;
    expect(expectFault(run(tables(), { gva: last, size: 4 })).errorCode).toBe(0);
    expect(expectFault(run(tables(), { gva: last, size: 8 })).errorCode).toBe(-1);
  });

  // SDM vol. 3A §3.3.7.1: a non-canonical reference raises #GP (#SS for the
  // stack) with error code 0 (§6.15, interrupt 13: "the processor ... pushes
  // an error code of 0" for such a fault), and only #PF loads CR2 (§6.15,
  // interrupt 14). So the exception carries no walk result at all.
  it('a non-canonical access raises #GP(0) and leaves CR2 alone; a walk fault is a #PF with CR2', () => {
    // 0x0000_8000_0000_0000: bit 47 = 1, bits 63:48 = 0 -> not canonical with 4 levels.
    expect(accessException(expectFault(run(tables(), { gva: 0x0000_8000_0000_0000n })))).toEqual({
      vector: 13,
      errorCode: 0,
      cr2: 'unchanged',
    });
    // A write that ends in the hole: the last byte 0x8000_0000_0003 is not canonical.
    expect(
      accessException(expectFault(run(tables(), { gva: 0x0000_7fff_ffff_fffcn, kind: 'write', size: 8 }))),
    ).toEqual({
      vector: 13,
      errorCode: 0,
      cr2: 'unchanged',
    });
    // A fetch and a CPL 3 read there: still #GP(0), no W/U/I bits (no #PF error code at all).
    for (const a of [{ kind: 'exec' as const }, { kind: 'read' as const, cpl: 3 as const }]) {
      expect(accessException(expectFault(run(tables(), { gva: 0xfff0_0000_0000_0000n, ...a })))).toEqual({
        vector: 13,
        errorCode: 0,
        cr2: 'unchanged',
      });
    }
    // 5 levels: bit 56 = 0 and bits 63:57 = 1 (0xfe00_...) is not canonical; 0x0000_8000_0000_0000 is,
    // and walks: PML5E[0] (the table at CR3) is present, the level-4 entry [256] is not -> #PF,
    // error code 0 (read, CPL 0), CR2 = the address.
    const c5 = cfg({ levels: 5 });
    expect(accessException(expectFault(run(tables(), { gva: 0xfe00_0000_0000_0000n }, c5))).vector).toBe(13);
    expect(accessException(expectFault(run(tables(), { gva: 0x0000_8000_0000_0000n }, c5)))).toEqual({
      vector: 14,
      errorCode: 0,
      cr2: 0x0000_8000_0000_0000n,
    });
    // 4 levels, canonical upper half, PML4E[256] not present, CPL 3 read: #PF U (0x4), CR2 = the address.
    expect(accessException(expectFault(run(tables(), { gva: 0xffff_8000_0000_0000n, cpl: 3 })))).toEqual({
      vector: 14,
      errorCode: 4,
      cr2: 0xffff_8000_0000_0000n,
    });
  });

  it("negative bigints are read as 64-bit two's complement", () => {
    const r = expectFault(run(tables(), { gva: -0x8000_0000_0000n + 0x10n }));
    expect(r.cr2).toBe(0xffff_8000_0000_0010n);
    expect(r.errorCode).toBe(0);
  });
});

describe('not-present entries', () => {
  it('stops at the first entry with P=0, error code has P=0', () => {
    const m = tables();
    m.set(PD, 0n);
    const r = expectFault(run(m, { gva: 0x1000n, kind: 'write', cpl: 3 }));
    expect(r.errorCode).toBe(EC.W | EC.U);
    expect(r.cr2).toBe(0x1000n);
    expect(r.reason).toBe('not-present');
    expect(r.levels).toEqual([
      { level: 4, pteGpa: 0x1000n, pte: PML4E0, leaf: false },
      { level: 3, pteGpa: 0x2000n, pte: PDPTE0, leaf: false },
      { level: 2, pteGpa: 0x3000n, pte: 0n, leaf: false },
    ]);
    expect(r.adWrites).toEqual([]);
  });

  it('a not-present PTE, supervisor read: error code 0', () => {
    const r = expectFault(run(tables(), { gva: 0x1f_f123n }));
    expect(r.errorCode).toBe(0);
    expect(r.levels).toEqual([
      ...path4k(0).slice(0, 3),
      { level: 1, pteGpa: 0x4000n + 0x1ffn * 8n, pte: 0n, leaf: false },
    ]);
    expect(r.cr2).toBe(0x1f_f123n);
  });

  it('reserved bits in a not-present entry are ignored (P is checked first)', () => {
    const m = tables();
    m.set(PT + 8n, bit(51) | PS | NX | 0x10_1000n);
    const r = expectFault(run(m, { gva: 0x1000n }));
    expect(r.errorCode).toBe(0);
    expect(r.reason).toBe('not-present');
  });

  it('fetch from a not-present page sets I only when NXE or SMEP is on', () => {
    const m = tables();
    m.set(PT + 8n, 0n);
    expect(expectFault(run(m, { gva: 0x1000n, kind: 'exec' })).errorCode).toBe(EC.I);
    const noNx = cfg({ efer: { nxe: false } });
    expect(expectFault(run(m, { gva: 0x1000n, kind: 'exec' }, noNx)).errorCode).toBe(0);
    expect(expectFault(run(m, { gva: 0x1000n, kind: 'exec', cpl: 3 }, noNx)).errorCode).toBe(EC.U);
    const smepOnly = cfg({ efer: { nxe: false }, cr4Smep: true });
    expect(expectFault(run(m, { gva: 0x1000n, kind: 'exec' }, smepOnly)).errorCode).toBe(EC.I);
  });
});

describe('reserved bits', () => {
  const RSVD_P = EC.RSVD | EC.P;

  it('physical-address bits 51:MAXPHYADDR in a PTE', () => {
    const m = tables();
    const bad = PTE[1] | bit(48);
    m.set(PT + 8n, bad);
    const r = expectFault(run(m, { gva: 0x1000n }));
    expect(r.errorCode).toBe(RSVD_P);
    expect(r.reason).toBe('reserved');
    expect(r.levels).toEqual(path4k(1, PML4E0, PDPTE0, PDE0, bad).map((l) => ({ ...l, leaf: false })));
    expect(r.adWrites).toEqual([]);
    // the same bit is an address bit with MAXPHYADDR 52
    expect(run(m, { gva: 0x1000n }, cfg({ maxPhyAddr: 52 })).ok).toBe(true);
    // MAXPHYADDR 36: bit 36 reserved, bit 35 not
    m.set(PT + 8n, PTE[1] | bit(36));
    expect(expectFault(run(m, { gva: 0x1000n }, cfg({ maxPhyAddr: 36 }))).errorCode).toBe(RSVD_P);
    m.set(PT + 8n, PTE[1] | bit(35));
    expect(run(m, { gva: 0x1000n }, cfg({ maxPhyAddr: 36 })).ok).toBe(true);
  });

  it('physical-address bits are checked at every level, and the walk stops there', () => {
    for (const [gpa, val, depth] of [
      [PML4, PML4E0 | bit(51), 1],
      [PDPT, PDPTE0 | bit(50), 2],
      [PD, PDE0 | bit(49), 3],
    ] as const) {
      const m = tables();
      m.set(gpa, val);
      const r = expectFault(run(m, { gva: 0x1000n, kind: 'write', cpl: 3 }));
      expect(r.errorCode).toBe(RSVD_P | EC.W | EC.U);
      expect(r.levels).toHaveLength(depth);
      expect(r.levels[depth - 1]).toEqual({ level: 5 - depth, pteGpa: gpa, pte: val, leaf: false });
    }
  });

  it('bit 63 is reserved at every level when EFER.NXE = 0', () => {
    const noNx = cfg({ efer: { nxe: false } });
    const m = tables();
    m.set(PML4, PML4E0 | NX);
    const r = expectFault(run(m, { gva: 0x1000n, kind: 'exec', cpl: 3 }, noNx));
    // fetch without NXE/SMEP: no I bit
    expect(r.errorCode).toBe(RSVD_P | EC.U);
    expect(r.levels).toHaveLength(1);
    // with NXE the same entry is legal (and forbids the fetch)
    const r2 = expectFault(run(m, { gva: 0x1000n, kind: 'exec', cpl: 3 }));
    expect(r2.errorCode).toBe(EC.P | EC.U | EC.I);
    expect(r2.reason).toBe('protection:nx');
    // a leaf with XD and NXE=0
    const m2 = tables();
    expect(expectFault(run(m2, { gva: 0x4000n }, noNx)).errorCode).toBe(RSVD_P);
  });

  it('PS in a PML4E is reserved (Intel and AMD)', () => {
    for (const vendor of ['intel', 'amd'] as const) {
      const m = tables();
      m.set(PML4, PML4E0 | PS);
      const r = expectFault(run(m, { gva: 0x1000n }, cfg({ vendor })));
      expect(r.errorCode).toBe(RSVD_P);
      expect(r.levels).toHaveLength(1);
    }
  });

  it('bit 8 of a PML4E: ignored on Intel, reserved on AMD', () => {
    const m = tables();
    m.set(PML4, PML4E0 | G);
    expect(run(m, { gva: 0x1000n }, cfg({ vendor: 'intel' })).ok).toBe(true);
    const r = expectFault(run(m, { gva: 0x1000n }, cfg({ vendor: 'amd' })));
    expect(r.errorCode).toBe(RSVD_P);
    expect(r.levels).toEqual([{ level: 4, pteGpa: 0x1000n, pte: PML4E0 | G, leaf: false }]);
  });

  it('bit 8 of a non-leaf PDPTE or PDE is ignored on AMD too', () => {
    const m = tables();
    m.set(PDPT, PDPTE0 | G);
    m.set(PD, PDE0 | G);
    expect(run(m, { gva: 0x1000n }, cfg({ vendor: 'amd' })).ok).toBe(true);
  });

  it('5-level: PS and (AMD) bit 8 in a PML5E are reserved', () => {
    const c5i = cfg({ levels: 5 });
    const c5a = cfg({ levels: 5, vendor: 'amd' });
    const PML5 = 0x9000n;
    const m = tables();
    m.set(PML5, PML4 | P | W | U | A | PS);
    expect(expectFault(run(m, { gva: 0x1000n }, c5i, PML5)).errorCode).toBe(RSVD_P);
    m.set(PML5, PML4 | P | W | U | A | G);
    expect(run(m, { gva: 0x1000n }, c5i, PML5).ok).toBe(true);
    const r = expectFault(run(m, { gva: 0x1000n }, c5a, PML5));
    expect(r.errorCode).toBe(RSVD_P);
    expect(r.levels).toEqual([{ level: 5, pteGpa: 0x9000n, pte: PML4 | P | W | U | A | G, leaf: false }]);
  });

  it('2 MiB PDE: bits 20:13 are reserved, bit 12 (PAT) is not', () => {
    for (const b of [13, 16, 20]) {
      const m = tables();
      m.set(PD + 8n, PDE1_2M | bit(b));
      const r = expectFault(run(m, { gva: 0x20_0000n, kind: 'write' }));
      expect(r.errorCode).toBe(RSVD_P | EC.W);
      expect(r.levels).toHaveLength(3);
      expect(r.levels[2]).toEqual({ level: 2, pteGpa: 0x3008n, pte: PDE1_2M | bit(b), leaf: false });
    }
    // the same bits in a non-leaf PDE are address bits of the page table
    const m = tables();
    m.set(PD, PDE0 | bit(13)); // page table at 0x6000
    m.set(0x6000n + 8n, 0x77_7000n | P | A);
    const r = expectOk(run(m, { gva: 0x1000n }));
    expect(r.levels[3]!.pteGpa).toBe(0x6008n);
    expect(r.gpa).toBe(0x77_7000n);
  });

  it('1 GiB PDPTE: bits 29:13 are reserved', () => {
    for (const b of [13, 21, 29]) {
      const m = tables();
      m.set(PDPT + 8n, PDPTE1_1G | bit(b));
      const r = expectFault(run(m, { gva: 0x4000_0000n, cpl: 3 }));
      expect(r.errorCode).toBe(RSVD_P | EC.U);
      expect(r.levels).toEqual([
        { level: 4, pteGpa: 0x1000n, pte: PML4E0, leaf: false },
        { level: 3, pteGpa: 0x2008n, pte: PDPTE1_1G | bit(b), leaf: false },
      ]);
    }
  });

  it('PS in a PDPTE is reserved without 1 GiB page support', () => {
    const c = cfg({ pdpe1gb: false });
    const r = expectFault(run(tables(), { gva: 0x4000_0000n }, c));
    expect(r.errorCode).toBe(RSVD_P);
    expect(r.levels).toHaveLength(2);
    // 4 KiB and 2 MiB mappings are unaffected
    expect(run(tables(), { gva: 0x1000n }, c).ok).toBe(true);
    expect(run(tables(), { gva: 0x20_0000n }, c).ok).toBe(true);
  });

  it('a reserved-bit fault reports W, U and I of the access', () => {
    const m = tables();
    m.set(PT + 8n, PTE[1] | bit(50));
    expect(expectFault(run(m, { gva: 0x1000n, kind: 'exec', cpl: 3 })).errorCode).toBe(EC.RSVD | EC.P | EC.U | EC.I);
    expect(expectFault(run(m, { gva: 0x1000n, kind: 'write' })).errorCode).toBe(EC.RSVD | EC.P | EC.W);
  });

  it('a reserved bit wins over a permission violation (walk stops before the check)', () => {
    const m = tables();
    m.set(PT + 3n * 8n, PTE[3] | bit(49)); // supervisor page, user access
    expect(expectFault(run(m, { gva: 0x3000n, cpl: 3 })).errorCode).toBe(EC.RSVD | EC.P | EC.U);
  });
});

describe('permissions', () => {
  it('user access to a supervisor page', () => {
    const r = expectFault(run(tables(), { gva: 0x3000n, cpl: 3 }));
    expect(r.errorCode).toBe(EC.P | EC.U);
    expect(r.reason).toBe('protection:user');
    expect(r.levels).toEqual(path4k(3));
    expect(r.adWrites).toEqual([]);
    expect(r.cr2).toBe(0x3000n);
  });

  it('U/S is the AND over all levels', () => {
    const m = tables();
    const pdeSup = PDE0 & ~U;
    m.set(PD, pdeSup);
    const r = expectFault(run(m, { gva: 0x1000n, cpl: 3 }));
    expect(r.errorCode).toBe(EC.P | EC.U);
    expect(r.levels).toEqual(path4k(1, PML4E0, PDPTE0, pdeSup));
    // supervisor may still read it
    const ok = expectOk(run(m, { gva: 0x1000n }));
    expect(ok.effective).toEqual({ w: true, u: false, x: true });
  });

  it('user write to a read-only page', () => {
    const r = expectFault(run(tables(), { gva: 0x2000n, kind: 'write', cpl: 3 }));
    expect(r.errorCode).toBe(EC.P | EC.W | EC.U);
    expect(r.reason).toBe('protection:write');
  });

  it('R/W is the AND over all levels', () => {
    const m = tables();
    m.set(PDPT, PDPTE0 & ~W);
    const r = expectFault(run(m, { gva: 0x1000n, kind: 'write', cpl: 3 }));
    expect(r.errorCode).toBe(EC.P | EC.W | EC.U);
    expect(expectOk(run(m, { gva: 0x1000n, cpl: 3 })).effective).toEqual({ w: false, u: true, x: true });
  });

  it('supervisor write to a read-only page: faults with CR0.WP=1, allowed (and dirties) with WP=0', () => {
    const r = expectFault(run(tables(), { gva: 0x5000n, kind: 'write' }));
    expect(r.errorCode).toBe(EC.P | EC.W);
    const m = tables();
    m.set(PT + 5n * 8n, 0x10_5000n | P | A);
    const ok = expectOk(run(m, { gva: 0x5000n, kind: 'write' }, cfg({ cr0Wp: false })));
    expect(ok.gpa).toBe(0x10_5000n);
    expect(ok.adWrites).toEqual([{ level: 1, pteGpa: 0x4028n, old: 0x10_5000n | P | A, new: 0x10_5000n | P | A | D }]);
    // user writes are not affected by CR0.WP
    expect(expectFault(run(tables(), { gva: 0x2000n, kind: 'write', cpl: 3 }, cfg({ cr0Wp: false }))).errorCode).toBe(
      EC.P | EC.W | EC.U,
    );
  });

  it('NX on the leaf or on any upper level forbids fetches (OR of XD)', () => {
    const r = expectFault(run(tables(), { gva: 0x4000n, kind: 'exec', cpl: 3 }));
    expect(r.errorCode).toBe(EC.P | EC.U | EC.I);
    expect(r.reason).toBe('protection:nx');
    expect(run(tables(), { gva: 0x4000n, kind: 'read', cpl: 3 }).ok).toBe(true);
    const m = tables();
    m.set(PML4, PML4E0 | NX);
    const r2 = expectFault(run(m, { gva: 0x1000n, kind: 'exec' }));
    expect(r2.errorCode).toBe(EC.P | EC.I);
    expect(r2.levels).toEqual(path4k(1, PML4E0 | NX));
    expect(expectOk(run(m, { gva: 0x1000n })).effective.x).toBe(false);
  });

  it('fetches without NXE never fault on XD (bit 63 would be reserved)', () => {
    const r = expectOk(run(tables(), { gva: 0x1000n, kind: 'exec', cpl: 3 }, cfg({ efer: { nxe: false } })));
    expect(r.effective.x).toBe(true);
  });

  it('user fetch from a supervisor page', () => {
    expect(expectFault(run(tables(), { gva: 0x3000n, kind: 'exec', cpl: 3 })).errorCode).toBe(EC.P | EC.U | EC.I);
    // and with NXE=0, SMEP=0 the I bit is not reported
    expect(
      expectFault(run(tables(), { gva: 0x3000n, kind: 'exec', cpl: 3 }, cfg({ efer: { nxe: false } }))).errorCode,
    ).toBe(EC.P | EC.U);
  });

  it('SMEP: supervisor fetch from a user page', () => {
    const c = cfg({ cr4Smep: true });
    const r = expectFault(run(tables(), { gva: 0x1000n, kind: 'exec' }, c));
    expect(r.errorCode).toBe(EC.P | EC.I);
    expect(r.reason).toBe('protection:smep');
    // not a user page if any level has U/S=0
    const m = tables();
    m.set(PDPT, PDPTE0 & ~U);
    expect(run(m, { gva: 0x1000n, kind: 'exec' }, c).ok).toBe(true);
    // user fetch and supervisor reads are not affected
    expect(run(tables(), { gva: 0x1000n, kind: 'exec', cpl: 3 }, c).ok).toBe(true);
    expect(run(tables(), { gva: 0x1000n }, c).ok).toBe(true);
    // without SMEP the fetch is allowed
    expect(run(tables(), { gva: 0x1000n, kind: 'exec' }).ok).toBe(true);
  });

  it('SMEP with NXE=0 still reports I', () => {
    const c = cfg({ cr4Smep: true, efer: { nxe: false } });
    expect(expectFault(run(tables(), { gva: 0x1000n, kind: 'exec' }, c)).errorCode).toBe(EC.P | EC.I);
  });

  it('SMAP: supervisor data access to a user page', () => {
    const c = cfg({ cr4Smap: true });
    const r = expectFault(run(tables(), { gva: 0x1000n }, c));
    expect(r.errorCode).toBe(EC.P);
    expect(r.reason).toBe('protection:smap');
    expect(expectFault(run(tables(), { gva: 0x1000n, kind: 'write' }, c)).errorCode).toBe(EC.P | EC.W);
    // explicit access with EFLAGS.AC=1 at CPL 0 is allowed
    expect(run(tables(), { gva: 0x1000n, eflagsAc: true }, c).ok).toBe(true);
    expect(run(tables(), { gva: 0x1000n, kind: 'write', eflagsAc: true }, c).ok).toBe(true);
    // fetches are not data accesses
    expect(run(tables(), { gva: 0x1000n, kind: 'exec' }, c).ok).toBe(true);
    // supervisor pages and user-mode accesses are unaffected
    expect(run(tables(), { gva: 0x3000n }, c).ok).toBe(true);
    expect(run(tables(), { gva: 0x1000n, cpl: 3 }, c).ok).toBe(true);
  });

  it('SMAP: implicit supervisor accesses are checked even with EFLAGS.AC=1, and report U=0 at CPL 3', () => {
    const c = cfg({ cr4Smap: true });
    const r0 = expectFault(run(tables(), { gva: 0x1000n, implicitSupervisor: true, eflagsAc: true }, c));
    expect(r0.errorCode).toBe(EC.P);
    const r3 = expectFault(run(tables(), { gva: 0x1000n, cpl: 3, implicitSupervisor: true, eflagsAc: true }, c));
    expect(r3.errorCode).toBe(EC.P);
    expect(r3.reason).toBe('protection:smap');
    // implicit supervisor write to a read-only user page with WP=1: write + smap
    const r4 = expectFault(run(tables(), { gva: 0x2000n, kind: 'write', cpl: 3, implicitSupervisor: true }, c));
    expect(r4.errorCode).toBe(EC.P | EC.W);
    expect(r4.reason).toBe('protection:write,smap');
    // without SMAP an implicit access from CPL 3 reaches supervisor pages
    expect(run(tables(), { gva: 0x3000n, cpl: 3, implicitSupervisor: true }).ok).toBe(true);
  });

  it('protection keys: AD blocks data accesses to user pages', () => {
    const c = cfg({ cr4Pke: true, pkru: 1 << (3 * 2) }); // AD3
    const r = expectFault(run(tables(), { gva: 0x8000n, cpl: 3 }, c));
    expect(r.errorCode).toBe(EC.P | EC.U | EC.PK);
    expect(r.reason).toBe('protection:pk');
    // supervisor read of the user page is blocked too
    expect(expectFault(run(tables(), { gva: 0x8000n }, c)).errorCode).toBe(EC.P | EC.PK);
    // fetches ignore PKRU
    expect(run(tables(), { gva: 0x8000n, kind: 'exec', cpl: 3 }, c).ok).toBe(true);
    // other keys are unaffected
    expect(run(tables(), { gva: 0x9000n, cpl: 3 }, c).ok).toBe(true);
    // CR4.PKE=0: no key checks
    expect(run(tables(), { gva: 0x8000n, cpl: 3 }, cfg({ pkru: 1 << 6 })).ok).toBe(true);
  });

  it('protection keys: WD blocks user writes, and supervisor writes only with CR0.WP=1', () => {
    const wd5 = 2 << (5 * 2);
    const c = cfg({ cr4Pke: true, pkru: wd5 });
    expect(run(tables(), { gva: 0x9000n, cpl: 3 }, c).ok).toBe(true);
    expect(expectFault(run(tables(), { gva: 0x9000n, kind: 'write', cpl: 3 }, c)).errorCode).toBe(
      EC.P | EC.W | EC.U | EC.PK,
    );
    expect(expectFault(run(tables(), { gva: 0x9000n, kind: 'write' }, c)).errorCode).toBe(EC.P | EC.W | EC.PK);
    expect(run(tables(), { gva: 0x9000n, kind: 'write' }, cfg({ cr4Pke: true, pkru: wd5, cr0Wp: false })).ok).toBe(
      true,
    );
    expect(
      expectFault(
        run(tables(), { gva: 0x9000n, kind: 'write', cpl: 3 }, cfg({ cr4Pke: true, pkru: wd5, cr0Wp: false })),
      ).errorCode,
    ).toBe(EC.P | EC.W | EC.U | EC.PK);
  });

  it('protection keys apply only to user pages (U/S=1 at every level)', () => {
    const m = tables();
    m.set(PD, PDE0 & ~U);
    const c = cfg({ cr4Pke: true, pkru: 0xffff_ffff });
    expect(run(m, { gva: 0x8000n }, c).ok).toBe(true);
    // a supervisor-only leaf carrying a key
    m.set(PT + 3n * 8n, PTE[3] | key(1));
    expect(run(m, { gva: 0x3000n, kind: 'write' }, c).ok).toBe(true);
  });

  it('a key violation adds PK to an ordinary protection fault', () => {
    const c = cfg({ cr4Pke: true, pkru: 1 << 6 }); // AD3; page 8 is read-only
    const r = expectFault(run(tables(), { gva: 0x8000n, kind: 'write', cpl: 3 }, c));
    expect(r.errorCode).toBe(EC.P | EC.W | EC.U | EC.PK);
    expect(r.reason).toBe('protection:write,pk');
  });

  it('several violations at once are all listed in the reason', () => {
    const c = cfg({ cr4Smep: true });
    const m = tables();
    // supervisor fetch from a user NX page: nx + smep
    const r = expectFault(run(m, { gva: 0x4000n, kind: 'exec' }, c));
    expect(r.errorCode).toBe(EC.P | EC.I);
    expect(r.reason).toBe('protection:nx,smep');
  });

  it('large pages: permissions combine with the upper levels', () => {
    const m = tables();
    m.set(PD + 8n, (PDE1_2M & ~W) | NX);
    expect(expectFault(run(m, { gva: 0x20_0000n, kind: 'write', cpl: 3 })).errorCode).toBe(EC.P | EC.W | EC.U);
    expect(expectFault(run(m, { gva: 0x20_0000n, kind: 'exec' })).errorCode).toBe(EC.P | EC.I);
    m.set(PDPT + 8n, PDPTE1_1G & ~U);
    expect(expectFault(run(m, { gva: 0x4000_0000n, cpl: 3 })).errorCode).toBe(EC.P | EC.U);
  });
});

describe('accessed and dirty', () => {
  it('a read sets A on every entry lacking it, root first, and never D', () => {
    const m = tables();
    const e4 = PDPT | P | W | U,
      e3 = PD | P | W | U,
      e2 = PT | P | W | U;
    m.set(PML4, e4);
    m.set(PDPT, e3);
    m.set(PD, e2);
    const r = expectOk(run(m, { gva: 0x6000n, cpl: 3 }));
    expect(r.adWrites).toEqual([
      { level: 4, pteGpa: 0x1000n, old: e4, new: e4 | A },
      { level: 3, pteGpa: 0x2000n, old: e3, new: e3 | A },
      { level: 2, pteGpa: 0x3000n, old: e2, new: e2 | A },
      { level: 1, pteGpa: 0x4030n, old: PTE[6], new: PTE[6] | A },
    ] satisfies AdWrite[]);
    // the levels report the values read, before the update
    expect(r.levels).toEqual(path4k(6, e4, e3, e2));
  });

  it('only entries that change are written', () => {
    const m = tables();
    m.set(PDPT, PDPTE0 & ~A);
    const r = expectOk(run(m, { gva: 0x1000n }));
    expect(r.adWrites).toEqual([{ level: 3, pteGpa: 0x2000n, old: PDPTE0 & ~A, new: PDPTE0 }]);
  });

  it('a write sets A and D on the leaf in one update', () => {
    const r = expectOk(run(tables(), { gva: 0x6000n, kind: 'write', cpl: 3 }));
    expect(r.adWrites).toEqual([{ level: 1, pteGpa: 0x4030n, old: PTE[6], new: PTE[6] | A | D }]);
  });

  it('a write to a clean page with A already set sets D only', () => {
    const r = expectOk(run(tables(), { gva: 0x7000n, kind: 'write' }));
    expect(r.adWrites).toEqual([{ level: 1, pteGpa: 0x4038n, old: PTE[7], new: PTE[7] | D }]);
    // reads and fetches leave it clean
    expect(expectOk(run(tables(), { gva: 0x7000n })).adWrites).toEqual([]);
    expect(expectOk(run(tables(), { gva: 0x7000n, kind: 'exec' })).adWrites).toEqual([]);
  });

  it('nothing to do when A (and D for writes) are already set', () => {
    expect(expectOk(run(tables(), { gva: 0x1000n, kind: 'write', cpl: 3 })).adWrites).toEqual([]);
  });

  it('D goes on the large-page leaf; upper non-leaf entries never get D', () => {
    const m = tables();
    const pdpte = PDPTE0 & ~A;
    const pde = (PDE1_2M & ~(A | D)) | G;
    m.set(PDPT, pdpte);
    m.set(PD + 8n, pde);
    const r = expectOk(run(m, { gva: 0x20_1000n, kind: 'write' }));
    expect(r.adWrites).toEqual([
      { level: 3, pteGpa: 0x2000n, old: pdpte, new: pdpte | A },
      { level: 2, pteGpa: 0x3008n, old: pde, new: pde | A | D },
    ]);
    const m1 = tables();
    m1.set(PDPT + 8n, PDPTE1_1G & ~D);
    expect(expectOk(run(m1, { gva: 0x4000_0000n, kind: 'write' })).adWrites).toEqual([
      { level: 3, pteGpa: 0x2008n, old: PDPTE1_1G & ~D, new: PDPTE1_1G },
    ]);
  });

  it('no A/D update on any faulting walk (KVM updates only after permission_fault passes)', () => {
    const m = tables();
    m.set(PML4, PML4E0 & ~A);
    m.set(PDPT, PDPTE0 & ~A);
    m.set(PT + 2n * 8n, 0x10_2000n | P | U); // read-only, A/D clear
    const prot = expectFault(run(m, { gva: 0x2000n, kind: 'write', cpl: 3 }));
    expect(prot.errorCode).toBe(EC.P | EC.W | EC.U);
    expect(prot.adWrites).toEqual([]);
    m.set(PT + 8n, 0n);
    expect(expectFault(run(m, { gva: 0x1000n })).adWrites).toEqual([]);
    m.set(PT + 8n, PTE[1] | bit(51));
    expect(expectFault(run(m, { gva: 0x1000n })).adWrites).toEqual([]);
  });

  it('5-level: the PML5E gets A first', () => {
    const m = tables();
    const PML5 = 0x9000n;
    const e5 = PML4 | P | W | U;
    m.set(PML5, e5);
    const r = expectOk(run(m, { gva: 0x6000n, kind: 'write' }, cfg({ levels: 5 }), PML5));
    expect(r.adWrites).toEqual([
      { level: 5, pteGpa: 0x9000n, old: e5, new: e5 | A },
      { level: 1, pteGpa: 0x4030n, old: PTE[6], new: PTE[6] | A | D },
    ]);
  });
});

describe('wrong walk models flip outcomes', () => {
  const cases: Record<WrongWalk, { c: PagingConfig; m: () => Mem; a: Access }> = {
    'ignore-wp': { c: cfg(), m: tables, a: { gva: 0x5000n, kind: 'write', cpl: 0 } },
    'no-accessed-on-upper': {
      c: cfg(),
      m: () => {
        const m = tables();
        m.set(PD, PDE0 & ~A);
        return m;
      },
      a: { gva: 0x1000n, kind: 'read', cpl: 0 },
    },
    'dirty-on-read': { c: cfg(), m: tables, a: { gva: 0x7000n, kind: 'read', cpl: 0 } },
    'ignore-nx': { c: cfg(), m: tables, a: { gva: 0x4000n, kind: 'exec', cpl: 3 } },
    'rsvd-as-not-present': {
      c: cfg(),
      m: () => {
        const m = tables();
        m.set(PT + 8n, PTE[1] | bit(50));
        return m;
      },
      a: { gva: 0x1000n, kind: 'read', cpl: 0 },
    },
  };

  it('covers every wrong walk', () => {
    expect(Object.keys(cases).sort()).toEqual([...WRONG_WALKS].sort());
  });

  it('ignore-wp: a supervisor write to a read-only page succeeds', () => {
    const { c, m, a } = cases['ignore-wp'];
    expect(expectFault(walk(c, CR3, a, reader(m()))).errorCode).toBe(EC.P | EC.W);
    expect(walkWith(new Set(['ignore-wp']), c, CR3, a, reader(m())).ok).toBe(true);
  });

  it('no-accessed-on-upper: the PDE keeps A=0', () => {
    const { c, m, a } = cases['no-accessed-on-upper'];
    expect(expectOk(walk(c, CR3, a, reader(m()))).adWrites).toEqual([
      { level: 2, pteGpa: 0x3000n, old: PDE0 & ~A, new: PDE0 },
    ]);
    expect(expectOk(walkWith(new Set(['no-accessed-on-upper']), c, CR3, a, reader(m()))).adWrites).toEqual([]);
  });

  it('dirty-on-read: a read dirties the leaf', () => {
    const { c, m, a } = cases['dirty-on-read'];
    expect(expectOk(walk(c, CR3, a, reader(m()))).adWrites).toEqual([]);
    expect(expectOk(walkWith(new Set(['dirty-on-read']), c, CR3, a, reader(m()))).adWrites).toEqual([
      { level: 1, pteGpa: 0x4038n, old: PTE[7], new: PTE[7] | D },
    ]);
  });

  it('ignore-nx: a fetch from an NX page succeeds', () => {
    const { c, m, a } = cases['ignore-nx'];
    expect(expectFault(walk(c, CR3, a, reader(m()))).errorCode).toBe(EC.P | EC.U | EC.I);
    expect(walkWith(new Set(['ignore-nx']), c, CR3, a, reader(m())).ok).toBe(true);
  });

  it('rsvd-as-not-present: P and RSVD vanish from the error code', () => {
    const { c, m, a } = cases['rsvd-as-not-present'];
    expect(expectFault(walk(c, CR3, a, reader(m()))).errorCode).toBe(EC.RSVD | EC.P);
    expect(expectFault(walkWith(new Set(['rsvd-as-not-present']), c, CR3, a, reader(m()))).errorCode).toBe(0);
  });

  it('with nothing wrong walkWith equals walk', () => {
    for (const { c, m, a } of Object.values(cases)) {
      expect(walkWith(new Set(), c, CR3, a, reader(m()))).toEqual(walk(c, CR3, a, reader(m())));
    }
  });
});

describe('configuration handling', () => {
  it('a mutated configuration object is re-read', () => {
    const c = cfg();
    const m = tables();
    expect(run(m, { gva: 0x5000n, kind: 'write' }, c).ok).toBe(false);
    c.cr0Wp = false;
    expect(run(m, { gva: 0x5000n, kind: 'write' }, c).ok).toBe(true);
    c.efer.nxe = false;
    expect(expectFault(run(m, { gva: 0x4000n }, c)).errorCode).toBe(EC.RSVD | EC.P);
    c.maxPhyAddr = 40;
    m.set(PT + 8n, PTE[1] | bit(41));
    expect(expectFault(run(m, { gva: 0x1000n }, c)).errorCode).toBe(EC.RSVD | EC.P);
  });

  it('compileWalk gives the same answers as walk', () => {
    const c = cfg({ cr4Smap: true, cr4Smep: true });
    const fn = compileWalk(c);
    const m = tables();
    for (const gva of [0x1000n, 0x2000n, 0x3000n, 0x4000n, 0x20_0000n, 0x4000_0000n, 0x1f_f000n]) {
      for (const kind of ['read', 'write', 'exec'] as const) {
        for (const cpl of [0, 3] as const) {
          const a: Access = { gva, kind, cpl };
          expect(fn(CR3, a, reader(m))).toEqual(walk(c, CR3, a, reader(m)));
        }
      }
    }
  });
});

describe('decodeErrorCode', () => {
  it('names the bits in order', () => {
    expect(decodeErrorCode(EC.P | EC.W | EC.U | EC.RSVD | EC.I | EC.PK)).toBe('P|W|U|RSVD|I|PK');
    expect(decodeErrorCode(7)).toBe('P|W|U');
    expect(decodeErrorCode(0x11)).toBe('P|I');
    expect(decodeErrorCode(0)).toBe('0');
    expect(decodeErrorCode(-1)).toBe('non-canonical');
    expect(decodeErrorCode(0x8001)).toBe('P|0x8000');
  });
});

describe('pte helpers', () => {
  it('describePte', () => {
    expect(describePte(0n, 1)).toBe('np');
    expect(describePte(0x10_1000n | P | W | U | A | D | NX | key(3), 1)).toBe('P W U A D NX pk=3');
    expect(describePte(0x60_0000n | P | W | A | D | PS | G, 2)).toBe('P W A D PS G');
    expect(describePte(PT | P | W | U | A | D, 2)).toBe('P W U A'); // D means nothing in a non-leaf
    expect(describePte(0x10_1000n | P | PWT | PCD | PS, 1)).toBe('P PWT PCD PAT');
    expect(describePte(0x8000_0000n | P | PS | PAT_LARGE | A, 3)).toBe('P A PS PAT');
    expect(describePte(PML4E0 | PS, 4)).toBe('P W U A PS');
  });

  it('masks and indices', () => {
    expect(physAddrRsvdMask(48)).toBe(0x000f_0000_0000_0000n);
    expect(physAddrRsvdMask(52)).toBe(0n);
    expect(leafAddrMask(2)).toBe(0x000f_ffff_ffe0_0000n);
    expect(leafAddrMask(3)).toBe(0x000f_ffff_c000_0000n);
    expect(largePageRsvdMask(2)).toBe(0x1f_e000n);
    expect(largePageRsvdMask(3)).toBe(0x3fff_e000n);
    expect(pteIndex(0xffff_ffff_8000_0000n, 4)).toBe(511);
    expect(pteIndex(0xffff_ffff_8000_0000n, 3)).toBe(510);
    expect(pteKey(key(9) | NX)).toBe(9);
  });
});

// ---------------------------------------------------------------------------------
// Property tests: random entries along one path, random configuration and access.

/**
 * Straightforward reference written from the SDM/APM text (bigint arithmetic,
 * no shared code with the model). Used as a second oracle in the property test.
 */
function reference(c: PagingConfig, cr3: bigint, a: Access, mem: Mem): WalkResult {
  const gva = BigInt.asUintN(64, a.gva);
  const vaBits = c.levels === 5 ? 57 : 48;
  const top = gva >> BigInt(vaBits - 1);
  const ones = (1n << BigInt(64 - vaBits + 1)) - 1n;
  if (top !== 0n && top !== ones)
    return { ok: false, errorCode: -1, cr2: gva, levels: [], adWrites: [], reason: 'non-canonical' };
  const userMode = a.cpl === 3 && !a.implicitSupervisor;
  let ecBase = 0;
  if (a.kind === 'write') ecBase |= 2;
  if (userMode) ecBase |= 4;
  if (a.kind === 'exec' && (c.efer.nxe || c.cr4Smep)) ecBase |= 16;
  const maxPa = BigInt(c.maxPhyAddr);
  let addrRsvd = 0n;
  for (let b = maxPa; b < 52n; b++) addrRsvd |= 1n << b;
  const levels: WalkLevel[] = [];
  let table = cr3 & 0x000f_ffff_ffff_f000n;
  let rw = true,
    us = true,
    xd = false;
  let leafLevel = 0;
  let leafPte = 0n;
  for (let lvl: number = c.levels; lvl >= 1; lvl--) {
    const idx = (gva >> BigInt(12 + 9 * (lvl - 1))) & 0x1ffn;
    const at = table + idx * 8n;
    const e = mem.get(at) ?? 0n;
    if ((e & 1n) === 0n) {
      levels.push({ level: lvl, pteGpa: at, pte: e, leaf: false });
      return { ok: false, errorCode: ecBase, cr2: gva, levels, adWrites: [], reason: 'not-present' };
    }
    const psBit = (e >> 7n) & 1n;
    let rsvd = (e & addrRsvd) !== 0n || (!c.efer.nxe && e >> 63n === 1n);
    if (lvl >= 4 && psBit === 1n) rsvd = true;
    if (lvl >= 4 && c.vendor === 'amd' && ((e >> 8n) & 1n) === 1n) rsvd = true;
    if (lvl === 3 && psBit === 1n && (!c.pdpe1gb || ((e >> 13n) & 0x1ffffn) !== 0n)) rsvd = true;
    if (lvl === 2 && psBit === 1n && ((e >> 13n) & 0xffn) !== 0n) rsvd = true;
    if (rsvd) {
      levels.push({ level: lvl, pteGpa: at, pte: e, leaf: false });
      return { ok: false, errorCode: ecBase | 9, cr2: gva, levels, adWrites: [], reason: 'reserved' };
    }
    rw &&= (e & 2n) !== 0n;
    us &&= (e & 4n) !== 0n;
    xd ||= c.efer.nxe && e >> 63n === 1n;
    const isLeaf = lvl === 1 || ((lvl === 2 || lvl === 3) && psBit === 1n);
    levels.push({ level: lvl, pteGpa: at, pte: e, leaf: isLeaf });
    if (isLeaf) {
      leafLevel = lvl;
      leafPte = e;
      break;
    }
    table = e & 0x000f_ffff_ffff_f000n;
  }
  const sup = !userMode;
  const causes: string[] = [];
  if (userMode && !us) causes.push('user');
  if (a.kind === 'write' && !rw && (userMode || c.cr0Wp)) causes.push('write');
  if (a.kind === 'exec' && xd) causes.push('nx');
  if (a.kind === 'exec' && sup && c.cr4Smep && us) causes.push('smep');
  const acOverride = a.cpl === 0 && !a.implicitSupervisor && a.eflagsAc === true;
  if (a.kind !== 'exec' && sup && c.cr4Smap && us && !acOverride) causes.push('smap');
  let pk = false;
  if (c.cr4Pke && a.kind !== 'exec' && us) {
    const k = Number((leafPte >> 59n) & 15n);
    const ad = (c.pkru >>> (2 * k)) & 1;
    const wd = (c.pkru >>> (2 * k + 1)) & 1;
    pk = ad === 1 || (wd === 1 && a.kind === 'write' && (userMode || c.cr0Wp));
  }
  if (pk) causes.push('pk');
  if (causes.length > 0) {
    return {
      ok: false,
      errorCode: ecBase | 1 | (pk ? 32 : 0),
      cr2: gva,
      levels,
      adWrites: [],
      reason: `protection:${causes.join(',')}`,
    };
  }
  const shift = BigInt(12 + 9 * (leafLevel - 1));
  const size = 1n << shift;
  const frame = leafPte & 0x000f_ffff_ffff_f000n & ~(size - 1n);
  const adWrites: AdWrite[] = [];
  for (const l of levels) {
    let nv = l.pte | 32n;
    if (l.leaf && a.kind === 'write') nv |= 64n;
    if (nv !== l.pte) adWrites.push({ level: l.level, pteGpa: l.pteGpa, old: l.pte, new: nv });
  }
  return {
    ok: true,
    gpa: frame | (gva & (size - 1n)),
    pageSize: size,
    levels,
    adWrites,
    effective: { w: rw, u: us, x: !xd },
  };
}

describe('properties over random entries', () => {
  const FLAG_POOL = [
    P,
    W,
    U,
    PWT,
    PCD,
    A,
    D,
    PS,
    G,
    NX,
    bit(12),
    bit(13),
    bit(20),
    bit(29),
    bit(47),
    bit(51),
    key(1),
    key(6),
  ];

  function randomCase(next: () => number) {
    const pick = (n: number) => next() % n;
    const chance = (p: number) => next() / 4294967296 < p;
    const levels = chance(0.3) ? 5 : 4;
    const c = cfg({
      levels: levels as 4 | 5,
      vendor: chance(0.5) ? 'amd' : 'intel',
      maxPhyAddr: [36, 40, 46, 48, 52][pick(5)]!,
      cr0Wp: chance(0.7),
      cr4Smep: chance(0.5),
      cr4Smap: chance(0.5),
      cr4Pke: chance(0.5),
      efer: { nxe: chance(0.7) },
      pdpe1gb: chance(0.7),
      pkru: next() & (chance(0.5) ? 0x0000_0f0f : 0xffff_ffff),
    });
    // one path of tables at 0x10000 * level; entries point to the next one
    const mem: Mem = new Map();
    const idx = [0, pick(512), pick(512), pick(512), pick(512), pick(512)];
    let gva = 0n;
    for (let l = 1; l <= levels; l++) gva |= BigInt(idx[l]!) << BigInt(12 + 9 * (l - 1));
    gva |= BigInt(pick(4096));
    if (levels === 4 && (gva >> 47n) & 1n) gva |= 0xffff_0000_0000_0000n;
    if (levels === 5 && (gva >> 56n) & 1n) gva |= 0xff00_0000_0000_0000n;
    if (chance(0.03)) gva ^= 1n << 60n; // occasionally non-canonical
    const cr3 = BigInt(levels) * 0x10000n;
    for (let l = levels; l >= 1; l--) {
      let e = l > 1 ? BigInt(l - 1) * 0x10000n : 0x1234_5000n;
      // mostly sane entries with random extra bits
      if (chance(0.93)) e |= P;
      if (chance(0.8)) e |= W;
      if (chance(0.8)) e |= U;
      if (chance(0.7)) e |= A;
      if (chance(0.5)) e |= D;
      if (l === 2 || l === 3 ? chance(0.25) : chance(0.04)) e |= PS;
      for (let k = 0; k < 2; k++) if (chance(0.15)) e |= FLAG_POOL[pick(FLAG_POOL.length)]!;
      if (e & PS && (l === 2 || l === 3)) e &= ~(l === 2 ? 0x1f_f000n : 0x3fff_f000n) | bit(13);
      mem.set(cr3 - BigInt(levels - l) * 0x10000n + BigInt(idx[l]!) * 8n, e);
    }
    const kind = (['read', 'write', 'exec'] as const)[pick(3)]!;
    const a: Access = {
      gva,
      kind,
      cpl: chance(0.5) ? 3 : 0,
      eflagsAc: chance(0.3),
      implicitSupervisor: chance(0.15),
    };
    return { c, cr3, mem, a };
  }

  it('invariants hold and the model agrees with the reference', () => {
    const next = mulberry32(0xc0ffee);
    let oks = 0,
      faults = 0,
      rsvd = 0,
      prot = 0;
    for (let n = 0; n < 20000; n++) {
      const { c, cr3, mem, a } = randomCase(next);
      const r = walk(c, cr3, a, reader(mem));
      const userMode = a.cpl === 3 && !a.implicitSupervisor;
      if (r.ok) {
        oks++;
        // every entry used is present; only the last is a leaf; levels descend from the root
        expect(r.levels.every((l) => (l.pte & P) === P)).toBe(true);
        expect(r.levels.map((l) => l.leaf)).toEqual(r.levels.map((_, i) => i === r.levels.length - 1));
        expect(r.levels.map((l) => l.level)).toEqual(r.levels.map((_, i) => c.levels - i));
        expect(r.gpa & (r.pageSize - 1n)).toBe(BigInt.asUintN(64, a.gva) & (r.pageSize - 1n));
        if (a.kind === 'write' && (userMode || c.cr0Wp)) expect(r.effective.w).toBe(true);
        if (userMode) expect(r.effective.u).toBe(true);
        if (a.kind === 'exec') expect(r.effective.x).toBe(true);
        // A/D: only A or D added, root first, D only on the leaf of a write
        let prev = 6;
        for (const w of r.adWrites) {
          expect(w.level).toBeLessThan(prev);
          prev = w.level;
          expect(w.new & ~w.old & ~(A | D)).toBe(0n);
          expect(w.old & ~w.new).toBe(0n);
          if ((w.new & ~w.old & D) !== 0n) {
            expect(a.kind).toBe('write');
            expect(w.level).toBe(r.levels[r.levels.length - 1]!.level);
          }
        }
      } else if (r.errorCode === -1) {
        expect(r.levels).toEqual([]);
      } else {
        faults++;
        const ec = r.errorCode;
        expect((ec & EC.U) !== 0).toBe(userMode);
        expect((ec & EC.W) !== 0).toBe(a.kind === 'write');
        if (ec & EC.RSVD) {
          rsvd++;
          expect(ec & EC.P).toBe(EC.P);
        }
        if (ec & EC.I) expect(a.kind).toBe('exec');
        if (ec & EC.PK) {
          expect(ec & EC.P).toBe(EC.P);
          expect(a.kind).not.toBe('exec');
        }
        const last = r.levels[r.levels.length - 1]!;
        expect((ec & EC.P) === 0).toBe((last.pte & P) === 0n);
        if ((ec & (EC.P | EC.RSVD)) === EC.P) prot++;
        expect(r.adWrites).toEqual([]);
        expect(r.cr2).toBe(BigInt.asUintN(64, a.gva));
        // the walk stopped at the first entry that is not present or has reserved bits
        expect(r.levels.slice(0, -1).every((l) => (l.pte & P) === P && !l.leaf)).toBe(true);
      }
      expect(r).toEqual(reference(c, cr3, a, mem));
    }
    // the generator reaches every outcome often enough to mean something
    expect(oks).toBeGreaterThan(1000);
    expect(rsvd).toBeGreaterThan(1000);
    expect(prot).toBeGreaterThan(1000);
    expect(faults).toBeGreaterThan(5000);
  });
});

// Who walks: KVM's software walker, a processor under TDP, or QEMU's TCG (the
// lab). Expected values follow the GuestWalker rules in src/model/walk.ts.
describe('guest walker variants', () => {
  const amd = (walker: PagingConfig['walker']) => cfg({ vendor: 'amd', walker });

  it('a reserved-bit fault: RSVD|P for KVM and a processor, RSVD without P for QEMU TCG', () => {
    const m = tables();
    m.set(PT + 6n * 8n, PTE[6] | bit(51));
    for (const [walker, ec] of [
      ['kvm', EC.RSVD | EC.P],
      ['cpu', EC.RSVD | EC.P],
      ['qemu-tcg', EC.RSVD],
    ] as const) {
      expect(expectFault(run(m, { gva: 0x6000n }, cfg({ walker }))).errorCode, walker).toBe(ec);
    }
  });

  it('bit 8 of an AMD PML4E is reserved for KVM and a processor, ignored by QEMU TCG', () => {
    const m = tables();
    m.set(PML4, PML4E0 | G);
    expect(expectFault(run(m, { gva: 0x1000n }, amd('kvm'))).errorCode).toBe(EC.RSVD | EC.P);
    expect(expectFault(run(m, { gva: 0x1000n }, amd('cpu'))).errorCode).toBe(EC.RSVD | EC.P);
    expect(expectOk(run(m, { gva: 0x1000n }, amd('qemu-tcg'))).gpa).toBe(0x10_1000n);
  });

  it("accessedLatitude: none for KVM's walker or a walk that succeeds", () => {
    const m = tables();
    m.set(PML4, PDPT | P | W | U); // A clear on the PML4E
    m.set(PT + 6n * 8n, 0n); // not present
    const w = run(m, { gva: 0x6000n }, cfg());
    expect(accessedLatitude(w, 'kvm')).toEqual([]);
    expect(accessedLatitude(run(m, { gva: 0x1000n }), 'cpu')).toEqual([]);
  });

  it('accessedLatitude: the present upper entries of a not-present walk, never the not-present entry, and only entries with A clear', () => {
    const m = tables();
    m.set(PML4, PDPT | P | W | U); // A clear
    m.set(PDPT, PD | P | W | U | A); // A already set: nothing to allow
    m.set(PD, PT | P | W | U); // A clear
    m.set(PT + 6n * 8n, 0n);
    const w = run(m, { gva: 0x6000n });
    expect(accessedLatitude(w, 'cpu')).toEqual([0x1000n, 0x3000n]);
    expect(accessedLatitude(w, 'qemu-tcg')).toEqual([0x1000n, 0x3000n]);
  });

  it('accessedLatitude: the reserved entry itself only for QEMU TCG; every entry of a protection fault', () => {
    const m = tables();
    m.set(PML4, PDPT | P | W | U);
    m.set(PT + 6n * 8n, PTE[6] | bit(51)); // A clear, reserved bit
    const w = run(m, { gva: 0x6000n });
    expect(accessedLatitude(w, 'cpu')).toEqual([0x1000n]);
    expect(accessedLatitude(w, 'qemu-tcg')).toEqual([0x1000n, 0x4030n]);
    m.set(PT + 6n * 8n, PTE[6] & ~W); // user RO, A clear: a write faults on protection
    const p = run(m, { gva: 0x6000n, kind: 'write', cpl: 3 });
    expect(expectFault(p).reason).toBe('protection:write');
    expect(accessedLatitude(p, 'cpu')).toEqual([0x1000n, 0x4030n]);
  });
});

// Gaps mutation testing found: each test below kills mutants that every other test let live.
describe('what mutation testing found untested', () => {
  it('a configuration object changed between walks is compiled again, field by field', () => {
    const c = cfg({ cr0Wp: false, cr4Smep: false, cr4Smap: false, cr4Pke: false, efer: { nxe: true }, pdpe1gb: true });
    const m = tables();
    // Each change turns an access that translates into one that faults (or the reverse).
    const flips: [string, () => void, Partial<Access> & { gva: bigint }][] = [
      ['CR0.WP', () => (c.cr0Wp = true), { gva: 0x5000n, kind: 'write' }],
      ['CR4.SMEP', () => (c.cr4Smep = true), { gva: 0x1000n, kind: 'exec' }],
      ['CR4.SMAP', () => (c.cr4Smap = true), { gva: 0x1000n }],
      ['CR4.PKE', () => ((c.cr4Pke = true), (c.pkru = 1 << (2 * 3))), { gva: 0x8000n, cpl: 3 }],
      ['PKRU', () => (c.pkru = 0), { gva: 0x8000n, cpl: 3 }],
      ['EFER.NXE', () => (c.efer = { nxe: false }), { gva: 0x4000n }],
      ['PDPE1GB', () => (c.pdpe1gb = false), { gva: 0x4000_0000n }],
      ['MAXPHYADDR', () => (c.maxPhyAddr = 36), { gva: 0x20_0000n }],
      ['levels', () => (c.levels = 5), { gva: 0x1000n }],
    ];
    if (c.maxPhyAddr === 48) m.set(PD + 8n, PDE1_2M | bit(40)); // an address bit at 48, reserved at 36
    for (const [what, change, access] of flips) {
      const before = run(m, access, c);
      change();
      const after = run(m, access, c);
      expect(after.ok === before.ok && (after.ok || (!before.ok && after.errorCode === before.errorCode)), what).toBe(
        false,
      );
    }
  });

  it('the vendor and the walker of a changed configuration take effect too', () => {
    const c = cfg({ vendor: 'intel' });
    const m = tables();
    m.set(PML4, PML4E0 | bit(8)); // reserved in an AMD PML4E only
    expect(run(m, { gva: 0x1000n }, c).ok).toBe(true);
    c.vendor = 'amd';
    expect(run(m, { gva: 0x1000n }, c).ok).toBe(false);
    const w = cfg();
    const np = tables();
    np.set(PT + 8n, 0n);
    expect(walk(w, CR3, { gva: 0x1000n, kind: 'read', cpl: 0 }, reader(np)).ok).toBe(false);
    expect(compileWalk(cfg()).walker).toBe('kvm');
    expect(compileWalk(cfg({ walker: 'cpu' })).walker).toBe('cpu');
    expect(compileWalk(cfg({ walker: 'qemu-tcg' })).walker).toBe('qemu-tcg');
  });

  it('an access whose last byte crosses out of the canonical range is not canonical', () => {
    const top = 0x7fff_ffff_fff8n; // the last quadword below the hole
    const r = run(tables(), { gva: top, size: 8 });
    expect(r.ok === false && r.errorCode === NON_CANONICAL).toBe(false);
    const across = expectFault(run(tables(), { gva: top + 1n, size: 8 }));
    expect(across.errorCode).toBe(NON_CANONICAL);
    const one = run(tables(), { gva: 0x7fff_ffff_ffffn, size: 1 });
    expect(one.ok === false && one.errorCode === NON_CANONICAL).toBe(false);
  });

  it("KVM's own walker is allowed no A bit on a faulting walk; a CPU walker is", () => {
    const m = tables();
    m.set(PT + 8n, PTE[6] & ~W); // user RO with A clear: a write faults
    const f = expectFault(run(m, { gva: 0x1000n, kind: 'write', cpl: 3 }));
    expect(accessedLatitude(f)).toEqual([]);
    expect(accessedLatitude(f, 'kvm')).toEqual([]);
    expect(accessedLatitude(f, 'cpu')).toContain(PT + 8n);
  });

  it("walks that set no A/D bit write nothing; one that sets D writes only the leaf's D", () => {
    expect(expectOk(run(tables(), { gva: 0x1000n, kind: 'write' })).adWrites).toEqual([]);
    const w = expectOk(run(tables(), { gva: 0x7000n, kind: 'write' }));
    expect(w.adWrites).toEqual([{ level: 1, pteGpa: PT + 7n * 8n, old: PTE[7], new: PTE[7] | D }]);
  });

  it('turning on CR4.PKE alone in a configuration already walked with takes effect', () => {
    const c = cfg({ pkru: 1 << (2 * 3) }); // AD of key 3, CR4.PKE = 0
    const m = tables();
    expect(run(m, { gva: 0x8000n, cpl: 3 }, c).ok).toBe(true);
    c.cr4Pke = true; // nothing else changes
    // PTE 8: user page, key 3, whose AD is set: a user read faults with P|U|PK.
    expect(expectFault(run(m, { gva: 0x8000n, cpl: 3 }, c)).errorCode).toBe(EC.P | EC.U | EC.PK);
    c.cr4Pke = false;
    expect(run(m, { gva: 0x8000n, cpl: 3 }, c).ok).toBe(true);
  });

  it('changing only the walker of a configuration already walked with takes effect', () => {
    const c = cfg();
    const m = tables();
    m.set(PT + 8n, PTE[1] | bit(51)); // reserved at MAXPHYADDR 48
    expect(expectFault(run(m, { gva: 0x1000n }, c)).errorCode).toBe(EC.RSVD | EC.P);
    c.walker = 'qemu-tcg'; // TCG reports a reserved-bit fault without P
    expect(expectFault(run(m, { gva: 0x1000n }, c)).errorCode).toBe(EC.RSVD);
    c.walker = 'kvm';
    expect(expectFault(run(m, { gva: 0x1000n }, c)).errorCode).toBe(EC.RSVD | EC.P);
  });

  it('an access whose first byte is below the upper half and whose last byte is in it is not canonical', () => {
    // 0xffff_7fff_ffff_fffc: bits 63:47 are not all equal; its last byte 0xffff_8000_0000_0003 is canonical.
    const r = expectFault(run(tables(), { gva: 0xffff_7fff_ffff_fffcn, size: 8 }));
    expect(r.errorCode).toBe(NON_CANONICAL);
    expect(expectFault(run(tables(), { gva: 0xffff_7fff_ffff_fffcn })).errorCode).toBe(NON_CANONICAL);
  });

  it('every level and PS value of a freshly compiled walk has its own reserved-bit mask', () => {
    // A configuration object never walked with before, compiled once, so the masks are built in this test.
    const w = compileWalk(cfg());
    const go = (m: Mem, gva: bigint) => w(CR3, { gva, kind: 'read', cpl: 0 }, reader(m));
    // 4 KiB PTE with PAT (bit 7) and frame bit 20: neither is reserved (bits 20:13 are only in a 2 MiB PDE).
    const pat = tables();
    pat.set(PT + 8n, 0x10_0000n | P | W | U | A | D | PS);
    expect(expectOk(go(pat, 0x1000n)).gpa).toBe(0x10_0000n);
    // 2 MiB PDE with frame bit 21 (an address bit there, reserved only in a 1 GiB PDPTE): translates.
    const big = tables();
    big.set(PD + 8n, 0x20_0000n | P | W | U | A | D | PS);
    expect(expectOk(go(big, 0x20_0123n)).gpa).toBe(0x20_0123n);
    // 1 GiB PDPTE: a leaf, PS not reserved with PDPE1GB; with bit 13 set it is.
    expect(expectOk(go(tables(), 0x4000_0123n)).gpa).toBe(0x8000_0123n);
    const r13 = tables();
    r13.set(PDPT + 8n, PDPTE1_1G | bit(13));
    expect(expectFault(go(r13, 0x4000_0000n)).reason).toBe('reserved');
    // 2 MiB PDE with bit 13 set: reserved.
    big.set(PD + 8n, 0x20_0000n | P | W | U | A | D | PS | bit(13));
    expect(expectFault(go(big, 0x20_0000n)).reason).toBe('reserved');
  });

  it('a paging mode of other than 4 or 5 levels, and an entry level outside 1..5, are refused', () => {
    const read: Access = { gva: 0x1000n, kind: 'read', cpl: 0 };
    expect(() => walk(cfg({ levels: 3 as 4 }), CR3, read, reader(tables()))).toThrow(
      new RangeError('levels must be 4 or 5, got 3'),
    );
    expect(() => compileWalk(cfg({ levels: 6 as 5 }))).toThrow(new RangeError('levels must be 4 or 5, got 6'));
    expect(() => reservedMask(cfg(), 0, 0)).toThrow(new RangeError('no paging level 0'));
    expect(() => reservedMask(cfg(), 6, 1)).toThrow(new RangeError('no paging level 6'));
  });

  it('the wrong walks give the reasons they are named for', () => {
    const m = tables();
    m.set(PT + 8n, PTE[1] | bit(51));
    const rsvd = expectFault(
      walkWith(
        new Set<WrongWalk>(['rsvd-as-not-present']),
        cfg(),
        CR3,
        { gva: 0x1000n, kind: 'read', cpl: 0 },
        reader(m),
      ),
    );
    expect(rsvd.reason).toBe('not-present');
    const wp = walkWith(
      new Set<WrongWalk>(['ignore-wp']),
      cfg(),
      CR3,
      { gva: 0x5000n, kind: 'write', cpl: 0 },
      reader(tables()),
    );
    expect(wp.ok).toBe(true);
  });
});

describe('mulberry32', () => {
  // The generator as published (Tommy Ettinger's mulberry32), in 32-bit unsigned BigInt arithmetic.
  function reference(seed: number): () => number {
    const M = 0xffffffffn;
    const mul = (a: bigint, b: bigint) => (a * b) & M;
    let s = BigInt(seed >>> 0);
    return () => {
      s = (s + 0x6d2b79f5n) & M;
      let t = s;
      t = mul(t ^ (t >> 15n), t | 1n);
      t = (t ^ ((t + mul(t ^ (t >> 7n), t | 61n)) & M)) & M;
      return Number((t ^ (t >> 14n)) & M);
    };
  }

  it('gives the published sequence for several seeds', () => {
    for (const seed of [0, 1, 42, 0xdeadbeef]) {
      const a = mulberry32(seed);
      const b = reference(seed);
      for (let i = 0; i < 8; i++) expect(a()).toBe(b());
    }
  });
});

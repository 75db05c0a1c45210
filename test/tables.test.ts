import { describe, expect, it } from 'vitest';
import { PageTables } from '../src/arch/x86/tables.js';
import { PTE_A, PTE_P, PTE_PS, PTE_RW, PTE_US } from '../src/arch/x86/pte.js';

function memory() {
  const m = new Map<bigint, bigint>();
  let next = 0x10000n;
  return {
    m,
    mem: { read64: (a: bigint) => m.get(a) ?? 0n, write64: (a: bigint, v: bigint) => void m.set(a, v) },
    alloc: () => ((next += 0x1000n), next - 0x1000n),
  };
}

describe('page-table builder', () => {
  it('builds a 4-level path for a 4K page with the given bits', () => {
    const { mem, alloc, m } = memory();
    const t = new PageTables(mem, alloc, 4);
    expect(t.root).toBe(0x10000n);
    // gva 0x40201000: PML4 0, PDPT 1, PD 1, PT 1
    t.map(0x40201000n, 0x5000n, 0x1000n, '4K', { leaf: PTE_P | PTE_RW });
    expect(m.get(0x10000n)).toBe(0x11000n | PTE_P | PTE_RW | PTE_US);
    expect(m.get(0x11000n + 8n)).toBe(0x12000n | PTE_P | PTE_RW | PTE_US);
    expect(m.get(0x12000n + 8n)).toBe(0x13000n | PTE_P | PTE_RW | PTE_US);
    expect(m.get(0x13000n + 8n)).toBe(0x5000n | PTE_P | PTE_RW);
    expect(t.tablePages).toEqual([0x10000n, 0x11000n, 0x12000n, 0x13000n]);
    expect(t.entry(0x40201000n, 1)).toBe(0x13008n);
  });

  it('sets PS on 2M and 1G leaves and rejects misaligned ranges', () => {
    const { mem, alloc, m } = memory();
    const t = new PageTables(mem, alloc, 4);
    t.map(0x200000n, 0x400000n, 0x200000n, '2M', { leaf: PTE_P, table: PTE_P | PTE_A });
    expect(m.get(0x12000n + 8n)).toBe(0x400000n | PTE_P | PTE_PS);
    expect(m.get(0x10000n)).toBe(0x11000n | PTE_P | PTE_A);
    expect(() => t.map(0x201000n, 0n, 0x200000n, '2M', { leaf: PTE_P })).toThrow(/must be 2M aligned/);
  });

  it('uses a fifth level when asked', () => {
    const { mem, alloc, m } = memory();
    const t = new PageTables(mem, alloc, 5);
    t.map(1n << 48n, 0x9000n, 0x1000n, '4K', { leaf: PTE_P });
    expect(m.get(0x10000n + 8n)).toBe(0x11000n | PTE_P | PTE_RW | PTE_US); // PML5 index 1
    expect(t.tablePages.length).toBe(5);
  });
});

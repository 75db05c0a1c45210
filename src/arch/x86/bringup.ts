// x86-64 guest bring-up: GDT, TSS, IDT with a recording handler for every
// exception vector, identity-mapped low memory, and the long-mode register
// state entered directly through KVM_SET_SREGS.
import type { Regs, Segment, Sregs } from '../../kvm/regs.js';
import { Asm } from './asm.js';
import {
  CHANNEL_PORT,
  ERROR_CODE_VECTORS,
  EXC_LOG_CAPACITY,
  EXC_LOG_ENTRY,
  EXC_LOG_HEADER,
  LAYOUT,
  MAILBOX,
  OP,
  RETURN_GVA,
  RING0_VECTOR,
  SEL,
} from './layout.js';
import { PTE_A, PTE_D, PTE_NX, PTE_P, PTE_RW, PTE_US } from './pte.js';
import { PageTables, type PhysMem } from './tables.js';

export interface GuestMem extends PhysMem {
  write(gpa: bigint, bytes: ArrayLike<number>): void;
}

export interface BringUpOptions {
  levels?: 4 | 5;
  /** EFER.NXE (default true). */
  nxe?: boolean;
  /** CR0.WP (default true). */
  wp?: boolean;
  /** Extra CR4 bits (SMEP 1<<20, SMAP 1<<21, PKE 1<<22); PAE and LA57 are set as needed. */
  cr4?: bigint;
}

export const CR0 = { PE: 1n, MP: 2n, ET: 0x10n, NE: 0x20n, WP: 1n << 16n, AM: 1n << 18n, PG: 1n << 31n } as const;
export const CR4 = {
  PAE: 1n << 5n,
  OSFXSR: 1n << 9n,
  LA57: 1n << 12n,
  SMEP: 1n << 20n,
  SMAP: 1n << 21n,
  PKE: 1n << 22n,
} as const;
export const EFER = { SCE: 1n, LME: 1n << 8n, LMA: 1n << 10n, NXE: 1n << 11n } as const;

/** A page allocator over the layout's table pool. */
export function poolAllocator(
  start = LAYOUT.tablePool,
  end = LAYOUT.tablePoolEnd,
): { alloc: () => bigint; used: () => bigint } {
  let next = start;
  return {
    alloc() {
      if (next >= end) throw new RangeError(`page-table pool exhausted at 0x${end.toString(16)}`);
      const p = next;
      next += 0x1000n;
      return p;
    },
    used: () => next,
  };
}

function gdt(): Uint8Array {
  const b = new Uint8Array(0x30);
  const dv = new DataView(b.buffer);
  // Flat descriptors: limit 0xfffff, G=1. Access byte | flags nibble.
  const desc = (i: number, access: number, flags: number) => {
    dv.setUint16(i * 8, 0xffff, true);
    b[i * 8 + 5] = access;
    b[i * 8 + 6] = (flags << 4) | 0xf;
  };
  desc(1, 0x9b, 0xa); // kernel code64: P, DPL0, S, exec/read/accessed; G, L
  desc(2, 0x93, 0xc); // kernel data: P, DPL0, S, read/write/accessed; G, DB
  desc(3, 0xf3, 0xc); // user data, DPL3
  desc(4, 0xfb, 0xa); // user code64, DPL3
  // 64-bit TSS (busy), base LAYOUT.tss, limit 0x67.
  const base = Number(LAYOUT.tss);
  dv.setUint16(5 * 8, 0x67, true);
  dv.setUint16(5 * 8 + 2, base & 0xffff, true);
  b[5 * 8 + 4] = (base >> 16) & 0xff;
  b[5 * 8 + 5] = 0x8b;
  b[5 * 8 + 7] = (base >> 24) & 0xff;
  return b;
}

function tss(): Uint8Array {
  const b = new Uint8Array(0x68);
  const dv = new DataView(b.buffer);
  dv.setBigUint64(4, LAYOUT.kernelStackTop, true); // RSP0: stack for exceptions taken from CPL 3
  dv.setUint16(0x66, 0x68, true); // no I/O bitmap
  return b;
}

/**
 * Exception handlers: one stub per vector pushes (error code or 0, vector) and
 * jumps to a common routine that appends {vector, error code, CR2, RIP} to the
 * exception log. If the mailbox holds a fixup RIP, the handler clears it and
 * resumes there; otherwise it reports an unexpected exception to the host.
 */
function handlers(): { code: Uint8Array; stubs: number[] } {
  const a = new Asm({ origin: Number(LAYOUT.handlers) });
  const stubs: number[] = [];
  for (let v = 0; v < 256; v++) {
    stubs.push(a.pc);
    if (!ERROR_CODE_VECTORS.has(v)) a.push(0);
    a.push(v).jmp('common');
  }
  const log = Number(LAYOUT.excLog);
  a.label('common')
    .push('rax')
    .push('rbx')
    .push('rcx')
    .push('rdx')
    // Frame: rdx rcx rbx rax vector errcode rip cs rflags rsp ss
    // A fetch fault at RETURN_GVA is the user program's way back to ring 0.
    .movImm('rax', RETURN_GVA)
    .load(8, 'rcx', { base: 'rsp', disp: 48 })
    .cmp('rax', 'rcx')
    .jcc('e', 'user_return')
    .movImm('rbx', log)
    .load(4, 'rax', { base: 'rbx' })
    .mov('rcx', 'rax')
    .and('rcx', EXC_LOG_CAPACITY > 64 ? 127 : 63)
    .cmp('rcx', EXC_LOG_CAPACITY)
    .jcc('b', 'slot_ok')
    .movImm('rcx', EXC_LOG_CAPACITY - 1)
    .label('slot_ok')
    .shl('rcx', Math.log2(EXC_LOG_ENTRY))
    .lea('rcx', { base: 'rbx', index: 'rcx', disp: EXC_LOG_HEADER })
    .load(8, 'rdx', { base: 'rsp', disp: 32 })
    .store(8, { base: 'rcx' }, 'rdx')
    .load(8, 'rdx', { base: 'rsp', disp: 40 })
    .store(8, { base: 'rcx', disp: 8 }, 'rdx')
    .movFromCr('rdx', 2)
    .store(8, { base: 'rcx', disp: 16 }, 'rdx')
    .load(8, 'rdx', { base: 'rsp', disp: 48 })
    .store(8, { base: 'rcx', disp: 24 }, 'rdx')
    .add('rax', 1)
    .store(4, { base: 'rbx' }, 'rax')
    .movImm('rbx', Number(LAYOUT.mailbox))
    .load(8, 'rax', { base: 'rbx' })
    .test('rax', 'rax')
    .jcc('z', 'unexpected')
    .storeImm(8, { base: 'rbx' }, 0)
    .store(8, { base: 'rsp', disp: 48 }, 'rax') // resume at the fixup RIP
    .pop('rdx')
    .pop('rcx')
    .pop('rbx')
    .pop('rax')
    .add('rsp', 16)
    .iretq()
    .label('user_return')
    .pop('rdx')
    .pop('rcx')
    .pop('rbx')
    .pop('rax')
    .label('ring0')
    // Drop the user frame and continue in ring 0 where the program asked.
    .load(8, 'rsp', { disp: Number(LAYOUT.mailbox) + MAILBOX.ring0Rsp })
    .jmp({ disp: Number(LAYOUT.mailbox) + MAILBOX.ring0Rip })
    .label('unexpected')
    .movImm('rax', OP.exception)
    .out(4, CHANNEL_PORT)
    .label('stuck')
    .hlt()
    .jmp('stuck');
  const out = a.assemble();
  stubs[RING0_VECTOR] = out.labels.get('ring0')!;
  return { code: out.code, stubs };
}

function idt(stubs: number[]): Uint8Array {
  const b = new Uint8Array(256 * 16);
  const dv = new DataView(b.buffer);
  stubs.forEach((addr, v) => {
    const o = v * 16;
    dv.setUint16(o, addr & 0xffff, true);
    dv.setUint16(o + 2, SEL.kcode, true);
    b[o + 5] = v === 3 || v === RING0_VECTOR ? 0xee : 0x8e; // present interrupt gate; #BP and the ring-0 return callable from CPL 3
    dv.setUint16(o + 6, (addr >>> 16) & 0xffff, true);
    dv.setUint32(o + 8, Math.floor(addr / 2 ** 32), true);
  });
  return b;
}

export interface BringUp {
  tables: PageTables;
  alloc: () => bigint;
  cr0: bigint;
  cr4: bigint;
  efer: bigint;
  /** Applies long-mode state to sregs read from the vCPU. */
  sregs(base: Sregs): Sregs;
  regs(entry: bigint, base: Regs): Regs;
}

/** Writes GDT, TSS, IDT, handlers and identity-mapped tables into guest memory. */
export function bringUp(mem: GuestMem, opts: BringUpOptions = {}): BringUp {
  const levels = opts.levels ?? 4;
  mem.write(LAYOUT.gdt, gdt());
  mem.write(LAYOUT.tss, tss());
  const h = handlers();
  if (LAYOUT.handlers + BigInt(h.code.length) > LAYOUT.kernelStackTop - 0x4000n)
    throw new Error('exception handlers overflow their region');
  mem.write(LAYOUT.handlers, h.code);
  mem.write(LAYOUT.idt, idt(h.stubs));
  mem.write(LAYOUT.excLog, new Uint8Array(4096));
  mem.write(LAYOUT.mailbox, new Uint8Array(4096));

  const pool = poolAllocator();
  const tables = new PageTables(mem, pool.alloc, levels);
  const table = PTE_P | PTE_RW | PTE_US | PTE_A;
  const leaf = PTE_P | PTE_RW | PTE_A | PTE_D;
  const nx = opts.nxe === false ? 0n : PTE_NX;
  const map = (from: bigint, to: bigint, bits: bigint) =>
    tables.map(from, from, to - from, '4K', { leaf: bits, table });
  map(0x1000n, LAYOUT.userStackBase, leaf | nx); // descriptor tables, logs, handlers, kernel stack
  map(LAYOUT.handlers, LAYOUT.handlers + 0x2000n, leaf); // handlers are executable
  map(LAYOUT.userStackBase, LAYOUT.userStackTop, leaf | PTE_US | nx);
  map(LAYOUT.tablePool, LAYOUT.code, leaf | nx);
  map(LAYOUT.code, LAYOUT.userCode, leaf);
  map(LAYOUT.userCode, LAYOUT.userCodeEnd, leaf | PTE_US);
  map(LAYOUT.data, LAYOUT.identityEnd, leaf | nx);

  const cr0 = CR0.PE | CR0.MP | CR0.ET | CR0.NE | CR0.PG | (opts.wp === false ? 0n : CR0.WP);
  const cr4 = CR4.PAE | CR4.OSFXSR | (levels === 5 ? CR4.LA57 : 0n) | (opts.cr4 ?? 0n);
  const efer = EFER.LME | EFER.LMA | (opts.nxe === false ? 0n : EFER.NXE);
  const seg = (selector: number, type: number, l: number, db: number, dpl = 0): Segment => ({
    base: 0n,
    limit: 0xffffffff,
    selector,
    type,
    present: 1,
    dpl,
    db,
    s: 1,
    l,
    g: 1,
    avl: 0,
    unusable: 0,
  });
  return {
    tables,
    alloc: pool.alloc,
    cr0,
    cr4,
    efer,
    sregs(base) {
      const data = seg(SEL.kdata, 3, 0, 1);
      return {
        ...base,
        cs: seg(SEL.kcode, 11, 1, 0),
        ds: data,
        es: data,
        fs: data,
        gs: data,
        ss: data,
        tr: {
          base: LAYOUT.tss,
          limit: 0x67,
          selector: SEL.tss,
          type: 11,
          present: 1,
          dpl: 0,
          db: 0,
          s: 0,
          l: 0,
          g: 0,
          avl: 0,
          unusable: 0,
        },
        ldt: { ...base.ldt, unusable: 1, present: 0, selector: 0 },
        gdt: { base: LAYOUT.gdt, limit: 0x2f },
        idt: { base: LAYOUT.idt, limit: 256 * 16 - 1 },
        cr0,
        cr3: tables.root,
        cr4,
        efer,
      };
    },
    regs(entry, base) {
      return { ...base, rip: entry, rsp: LAYOUT.kernelStackTop, rflags: 2n };
    },
  };
}

// kvm_regs / kvm_sregs as plain objects, with their byte layouts in one place.
import { SIZEOF } from '../uapi/uapi.js';

export const REG_NAMES = [
  'rax',
  'rbx',
  'rcx',
  'rdx',
  'rsi',
  'rdi',
  'rsp',
  'rbp',
  'r8',
  'r9',
  'r10',
  'r11',
  'r12',
  'r13',
  'r14',
  'r15',
  'rip',
  'rflags',
] as const;
export type RegName = (typeof REG_NAMES)[number];
export type Regs = Record<RegName, bigint>;

export interface Segment {
  base: bigint;
  limit: number;
  selector: number;
  type: number;
  present: number;
  dpl: number;
  db: number;
  s: number;
  l: number;
  g: number;
  avl: number;
  unusable: number;
}
export interface DTable {
  base: bigint;
  limit: number;
}
export const SEG_NAMES = ['cs', 'ds', 'es', 'fs', 'gs', 'ss', 'tr', 'ldt'] as const;
export type SegName = (typeof SEG_NAMES)[number];
export interface Sregs extends Record<SegName, Segment> {
  gdt: DTable;
  idt: DTable;
  cr0: bigint;
  cr2: bigint;
  cr3: bigint;
  cr4: bigint;
  cr8: bigint;
  efer: bigint;
  apicBase: bigint;
  interruptBitmap: bigint[];
}

/** All general-purpose registers zero (a new object each call). */
export function zeroRegs(): Regs {
  return {
    rax: 0n,
    rbx: 0n,
    rcx: 0n,
    rdx: 0n,
    rsi: 0n,
    rdi: 0n,
    rsp: 0n,
    rbp: 0n,
    r8: 0n,
    r9: 0n,
    r10: 0n,
    r11: 0n,
    r12: 0n,
    r13: 0n,
    r14: 0n,
    r15: 0n,
    rip: 0n,
    rflags: 0n,
  };
}

export function decodeRegs(b: Uint8Array): Regs {
  const dv = new DataView(b.buffer, b.byteOffset, SIZEOF.kvm_regs);
  const q = (i: number): bigint => dv.getBigUint64(i * 8, true);
  return {
    rax: q(0),
    rbx: q(1),
    rcx: q(2),
    rdx: q(3),
    rsi: q(4),
    rdi: q(5),
    rsp: q(6),
    rbp: q(7),
    r8: q(8),
    r9: q(9),
    r10: q(10),
    r11: q(11),
    r12: q(12),
    r13: q(13),
    r14: q(14),
    r15: q(15),
    rip: q(16),
    rflags: q(17),
  };
}

export function encodeRegs(r: Regs, b = new Uint8Array(SIZEOF.kvm_regs)): Uint8Array {
  const dv = new DataView(b.buffer, b.byteOffset, SIZEOF.kvm_regs);
  // setBigUint64 stores a negative or too large value modulo 2^64 itself.
  for (let i = 0; i < REG_NAMES.length; i++) dv.setBigUint64(i * 8, r[REG_NAMES[i]!], true);
  return b;
}

function getSeg(dv: DataView, o: number): Segment {
  return {
    base: dv.getBigUint64(o, true),
    limit: dv.getUint32(o + 8, true),
    selector: dv.getUint16(o + 12, true),
    type: dv.getUint8(o + 14),
    present: dv.getUint8(o + 15),
    dpl: dv.getUint8(o + 16),
    db: dv.getUint8(o + 17),
    s: dv.getUint8(o + 18),
    l: dv.getUint8(o + 19),
    g: dv.getUint8(o + 20),
    avl: dv.getUint8(o + 21),
    unusable: dv.getUint8(o + 22),
  };
}
function setSeg(dv: DataView, o: number, s: Segment): void {
  dv.setBigUint64(o, s.base, true);
  dv.setUint32(o + 8, s.limit >>> 0, true);
  dv.setUint16(o + 12, s.selector, true);
  dv.setUint8(o + 14, s.type);
  dv.setUint8(o + 15, s.present);
  dv.setUint8(o + 16, s.dpl);
  dv.setUint8(o + 17, s.db);
  dv.setUint8(o + 18, s.s);
  dv.setUint8(o + 19, s.l);
  dv.setUint8(o + 20, s.g);
  dv.setUint8(o + 21, s.avl);
  dv.setUint8(o + 22, s.unusable);
  dv.setUint8(o + 23, 0);
}

const DT_OFF = 8 * SIZEOF.kvm_segment; // 192
const CR_OFF = DT_OFF + 2 * SIZEOF.kvm_dtable; // 224
const CR_NAMES = ['cr0', 'cr2', 'cr3', 'cr4', 'cr8', 'efer', 'apicBase'] as const;
const BITMAP_OFF = CR_OFF + CR_NAMES.length * 8; // 280

export function decodeSregs(b: Uint8Array): Sregs {
  const dv = new DataView(b.buffer, b.byteOffset, SIZEOF.kvm_sregs);
  const seg = (i: number): Segment => getSeg(dv, i * SIZEOF.kvm_segment);
  const q = (o: number): bigint => dv.getBigUint64(o, true);
  return {
    cs: seg(0),
    ds: seg(1),
    es: seg(2),
    fs: seg(3),
    gs: seg(4),
    ss: seg(5),
    tr: seg(6),
    ldt: seg(7),
    gdt: { base: q(DT_OFF), limit: dv.getUint16(DT_OFF + 8, true) },
    idt: { base: q(DT_OFF + 16), limit: dv.getUint16(DT_OFF + 24, true) },
    cr0: q(CR_OFF),
    cr2: q(CR_OFF + 8),
    cr3: q(CR_OFF + 16),
    cr4: q(CR_OFF + 24),
    cr8: q(CR_OFF + 32),
    efer: q(CR_OFF + 40),
    apicBase: q(CR_OFF + 48),
    interruptBitmap: [q(BITMAP_OFF), q(BITMAP_OFF + 8), q(BITMAP_OFF + 16), q(BITMAP_OFF + 24)],
  };
}

export function encodeSregs(s: Sregs, b = new Uint8Array(SIZEOF.kvm_sregs)): Uint8Array {
  const dv = new DataView(b.buffer, b.byteOffset, SIZEOF.kvm_sregs);
  for (let i = 0; i < SEG_NAMES.length; i++) setSeg(dv, i * SIZEOF.kvm_segment, s[SEG_NAMES[i]!]);
  dv.setBigUint64(DT_OFF, s.gdt.base, true);
  dv.setUint16(DT_OFF + 8, s.gdt.limit, true);
  dv.setBigUint64(DT_OFF + 16, s.idt.base, true);
  dv.setUint16(DT_OFF + 24, s.idt.limit, true);
  for (let i = 0; i < CR_NAMES.length; i++) dv.setBigUint64(CR_OFF + i * 8, s[CR_NAMES[i]!], true);
  for (let i = 0; i < 4; i++) dv.setBigUint64(BITMAP_OFF + i * 8, s.interruptBitmap[i] ?? 0n, true);
  return b;
}

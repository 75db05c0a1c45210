// kvm_regs / kvm_sregs as plain objects, with their byte layouts in one place.
import { SIZEOF } from './uapi.js';

export const REG_NAMES = [
  'rax', 'rbx', 'rcx', 'rdx', 'rsi', 'rdi', 'rsp', 'rbp',
  'r8', 'r9', 'r10', 'r11', 'r12', 'r13', 'r14', 'r15', 'rip', 'rflags',
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

export function decodeRegs(b: Uint8Array): Regs {
  const dv = new DataView(b.buffer, b.byteOffset, SIZEOF.kvm_regs);
  const r = {} as Regs;
  REG_NAMES.forEach((n, i) => (r[n] = dv.getBigUint64(i * 8, true)));
  return r;
}

export function encodeRegs(r: Regs, b = new Uint8Array(SIZEOF.kvm_regs)): Uint8Array {
  const dv = new DataView(b.buffer, b.byteOffset, SIZEOF.kvm_regs);
  REG_NAMES.forEach((n, i) => dv.setBigUint64(i * 8, BigInt.asUintN(64, r[n]), true));
  return b;
}

const SEG_FIELDS = ['type', 'present', 'dpl', 'db', 's', 'l', 'g', 'avl', 'unusable'] as const;

function getSeg(dv: DataView, o: number): Segment {
  const s = { base: dv.getBigUint64(o, true), limit: dv.getUint32(o + 8, true), selector: dv.getUint16(o + 12, true) } as Segment;
  SEG_FIELDS.forEach((f, i) => (s[f] = dv.getUint8(o + 14 + i)));
  return s;
}
function setSeg(dv: DataView, o: number, s: Segment): void {
  dv.setBigUint64(o, s.base, true);
  dv.setUint32(o + 8, s.limit >>> 0, true);
  dv.setUint16(o + 12, s.selector, true);
  SEG_FIELDS.forEach((f, i) => dv.setUint8(o + 14 + i, s[f]));
  dv.setUint8(o + 23, 0);
}

const DT_OFF = 8 * SIZEOF.kvm_segment; // 192
const CR_OFF = DT_OFF + 2 * SIZEOF.kvm_dtable; // 224
const CR_NAMES = ['cr0', 'cr2', 'cr3', 'cr4', 'cr8', 'efer', 'apicBase'] as const;
const BITMAP_OFF = CR_OFF + CR_NAMES.length * 8; // 280

export function decodeSregs(b: Uint8Array): Sregs {
  const dv = new DataView(b.buffer, b.byteOffset, SIZEOF.kvm_sregs);
  const s = {} as Sregs;
  SEG_NAMES.forEach((n, i) => (s[n] = getSeg(dv, i * SIZEOF.kvm_segment)));
  s.gdt = { base: dv.getBigUint64(DT_OFF, true), limit: dv.getUint16(DT_OFF + 8, true) };
  s.idt = { base: dv.getBigUint64(DT_OFF + 16, true), limit: dv.getUint16(DT_OFF + 24, true) };
  CR_NAMES.forEach((n, i) => (s[n] = dv.getBigUint64(CR_OFF + i * 8, true)));
  s.interruptBitmap = [0, 1, 2, 3].map((i) => dv.getBigUint64(BITMAP_OFF + i * 8, true));
  return s;
}

export function encodeSregs(s: Sregs, b = new Uint8Array(SIZEOF.kvm_sregs)): Uint8Array {
  const dv = new DataView(b.buffer, b.byteOffset, SIZEOF.kvm_sregs);
  SEG_NAMES.forEach((n, i) => setSeg(dv, i * SIZEOF.kvm_segment, s[n]));
  dv.setBigUint64(DT_OFF, s.gdt.base, true);
  dv.setUint16(DT_OFF + 8, s.gdt.limit, true);
  dv.setBigUint64(DT_OFF + 16, s.idt.base, true);
  dv.setUint16(DT_OFF + 24, s.idt.limit, true);
  CR_NAMES.forEach((n, i) => dv.setBigUint64(CR_OFF + i * 8, s[n], true));
  s.interruptBitmap.forEach((v, i) => dv.setBigUint64(BITMAP_OFF + i * 8, v, true));
  return b;
}

/**
 * A small AArch64 (A64) encoder for guest programs.
 *
 * Every instruction is one 32-bit word, so layout is a single pass: words are
 * appended as methods are called, and references to labels that are not bound
 * yet are patched by `bytes()`. A reference to a label that is already bound
 * is encoded (and range-checked) at once.
 *
 * Registers are numbers 0..30; 31 is xzr/wzr or sp as the instruction's
 * encoding says (each method's comment names which). `sf` selects the 64-bit
 * (x, the default) or 32-bit (w) form. Encodings are the ones GNU as picks for
 * the same text; aliases (mov, cmp, lsl, lsr, ret) encode as the instruction
 * they stand for.
 *
 * Out-of-range immediates, misaligned offsets, branch targets out of range
 * and bad register numbers throw a RangeError naming the instruction and the
 * value.
 */
import { signedHex as hex } from '../../base/units.js';

/** A general-purpose register number 0..30; 31 means xzr/wzr or sp, per instruction. */
export type XReg = number;

/** Condition codes (the cond field of B.cond), with the usual aliases. */
const CONDS = {
  eq: 0,
  ne: 1,
  cs: 2,
  hs: 2,
  cc: 3,
  lo: 3,
  mi: 4,
  pl: 5,
  vs: 6,
  vc: 7,
  hi: 8,
  ls: 9,
  ge: 10,
  lt: 11,
  gt: 12,
  le: 13,
  al: 14,
} as const;
export type Cond = keyof typeof CONDS;

/** A system register's encoding as MRS/MSR (register) take it: op0 is 2 or 3. */
export interface SysRegEncoding {
  op0: 2 | 3;
  op1: number;
  crn: number;
  crm: number;
  op2: number;
}

type Named = SysRegEncoding & { readonly?: true };
const sr = (op0: 2 | 3, op1: number, crn: number, crm: number, op2: number, readonly?: true): Named => ({
  op0,
  op1,
  crn,
  crm,
  op2,
  ...(readonly ? { readonly } : {}),
});

/** Named system registers; `readonly` ones are rejected by msr. */
const SYSREGS = {
  MIDR_EL1: sr(3, 0, 0, 0, 0, true),
  MPIDR_EL1: sr(3, 0, 0, 0, 5, true),
  ID_AA64PFR0_EL1: sr(3, 0, 0, 4, 0, true),
  ID_AA64MMFR0_EL1: sr(3, 0, 0, 7, 0, true),
  SCTLR_EL1: sr(3, 0, 1, 0, 0),
  CPACR_EL1: sr(3, 0, 1, 0, 2),
  TTBR0_EL1: sr(3, 0, 2, 0, 0),
  TTBR1_EL1: sr(3, 0, 2, 0, 1),
  TCR_EL1: sr(3, 0, 2, 0, 2),
  SPSR_EL1: sr(3, 0, 4, 0, 0),
  ELR_EL1: sr(3, 0, 4, 0, 1),
  SP_EL0: sr(3, 0, 4, 1, 0),
  SPSEL: sr(3, 0, 4, 2, 0),
  CURRENTEL: sr(3, 0, 4, 2, 2, true),
  ESR_EL1: sr(3, 0, 5, 2, 0),
  FAR_EL1: sr(3, 0, 6, 0, 0),
  PAR_EL1: sr(3, 0, 7, 4, 0),
  MAIR_EL1: sr(3, 0, 10, 2, 0),
  AMAIR_EL1: sr(3, 0, 10, 3, 0),
  VBAR_EL1: sr(3, 0, 12, 0, 0),
  ISR_EL1: sr(3, 0, 12, 1, 0, true),
  CONTEXTIDR_EL1: sr(3, 0, 13, 0, 1),
  TPIDR_EL1: sr(3, 0, 13, 0, 4),
  CNTKCTL_EL1: sr(3, 0, 14, 1, 0),
  NZCV: sr(3, 3, 4, 2, 0),
  DAIF: sr(3, 3, 4, 2, 1),
  TPIDR_EL0: sr(3, 3, 13, 0, 2),
  CNTFRQ_EL0: sr(3, 3, 14, 0, 0),
  CNTPCT_EL0: sr(3, 3, 14, 0, 1, true),
  CNTVCT_EL0: sr(3, 3, 14, 0, 2, true),
  CNTP_TVAL_EL0: sr(3, 3, 14, 2, 0),
  CNTP_CTL_EL0: sr(3, 3, 14, 2, 1),
  CNTP_CVAL_EL0: sr(3, 3, 14, 2, 2),
  CNTV_TVAL_EL0: sr(3, 3, 14, 3, 0),
  CNTV_CTL_EL0: sr(3, 3, 14, 3, 1),
  CNTV_CVAL_EL0: sr(3, 3, 14, 3, 2),
} as const satisfies Record<string, Named>;
export type SysRegName = keyof typeof SYSREGS;
/** The names msr and mrs accept (all of them are readable; see `SYSREG_READONLY` for msr). */
export const SYSREG_NAMES = Object.keys(SYSREGS) as SysRegName[];
/** The named registers msr rejects. */
export const SYSREG_READONLY = SYSREG_NAMES.filter((n) => (SYSREGS[n] as Named).readonly);
export type SysReg = SysRegName | SysRegEncoding;

/** A position in the code. Made by `label()` or `here()`; only the A64 that made it can bind or use it. */
export interface Label {
  /** For error messages: the name given to `label()`, or `L<n>`. */
  readonly name: string;
}

/** How a label reference is encoded: the field, its width in bits and its scale. */
const PCREL = {
  /** B, BL: imm26 at bits 25:0, in words. */
  imm26: { shift: 0, bits: 26, scale: 4 },
  /** B.cond, CBZ/CBNZ, LDR (literal): imm19 at bits 23:5, in words. */
  imm19: { shift: 5, bits: 19, scale: 4 },
  /** ADR: immhi:immlo, in bytes. */
  adr: { shift: 0, bits: 21, scale: 1 },
} as const;
type PcRelKind = keyof typeof PCREL;

type Fixup = { index: number; label: Label; kind: PcRelKind; insn: string };

/** An integer in lo..hi, or a RangeError naming the instruction, the operand and the value. */
function int(insn: string, what: string, v: number, lo: number, hi: number, fmt: (x: number) => string = hex): number {
  if (typeof v !== 'number' || !Number.isInteger(v))
    throw new RangeError(`${insn}: ${what} ${String(v)} is not an integer`);
  if (v < lo || v > hi) throw new RangeError(`${insn}: ${what} ${fmt(v)} out of range ${fmt(lo)}..${fmt(hi)}`);
  return v;
}

/** A register number 0..31. */
function reg(insn: string, what: string, r: XReg): number {
  return int(insn, `register ${what}`, r, 0, 31, String);
}

function bool(insn: string, what: string, v: boolean): boolean {
  if (v !== true && v !== false) throw new RangeError(`${insn}: ${what} must be true or false, got ${String(v)}`);
  return v;
}

/** Bits 31 (sf) set for the 64-bit form. */
const sfBit = (insn: string, sf: boolean): number => (bool(insn, 'sf', sf) ? 0x8000_0000 : 0);

/** Mnemonic of the unsigned-offset / register-offset loads and stores by size. */
const LDST_NAME: Record<number, string> = { 1: 'b', 2: 'h', 4: '', 8: '' };
/** The size field (bits 31:30) by access size. */
const LDST_SIZE: Record<number, number> = { 1: 0, 2: 1, 4: 2, 8: 3 };

/** Move-wide opcodes (bits 30:23 with sf = 0). */
const MOVE_WIDE = { movn: 0x1280_0000, movz: 0x5280_0000, movk: 0x7280_0000 } as const;
/** Add/subtract (immediate) opcodes with sf = 0. */
const ADDSUB_IMM = { add: 0x1100_0000, sub: 0x5100_0000, subs: 0x7100_0000 } as const;
/** Add/subtract and logical (shifted register) opcodes with sf = 0, shift LSL #0. */
const REG3 = {
  add: 0x0b00_0000,
  sub: 0x4b00_0000,
  subs: 0x6b00_0000,
  and: 0x0a00_0000,
  orr: 0x2a00_0000,
  eor: 0x4a00_0000,
} as const;

export class A64 {
  /** Load address of the first instruction. */
  readonly base: bigint;
  private readonly words: number[] = [];
  /** Every label this assembler made, with its offset once bound. */
  private readonly labels = new Map<Label, number | undefined>();
  private readonly fixups: Fixup[] = [];

  constructor(base: bigint | number = 0n) {
    if (typeof base === 'number' && !Number.isSafeInteger(base)) {
      throw new RangeError(`A64: base ${String(base)} is not an integer in the safe range (use a bigint)`);
    }
    const b = BigInt(base);
    if (b < 0n || b >= 1n << 64n) throw new RangeError(`A64: base ${hex(b)} out of range 0x0..0xffffffffffffffff`);
    if (b % 4n !== 0n) throw new RangeError(`A64: base ${hex(b)} is not 4-byte aligned`);
    this.base = b;
  }

  /** Bytes emitted so far. */
  get offset(): number {
    return this.words.length * 4;
  }

  // ---- labels ----------------------------------------------------------------

  /** A new, unbound label. */
  label(name?: string): Label {
    const l: Label = Object.freeze({ name: name ?? `L${this.labels.size}` });
    this.labels.set(l, undefined);
    return l;
  }

  /** Bind a label to the current offset (once). */
  bind(l: Label): this {
    const at = this.own(l, 'bind');
    if (at !== undefined) throw new Error(`bind: label '${l.name}' is already bound at offset ${hex(at)}`);
    this.labels.set(l, this.offset);
    return this;
  }

  /** A new label bound at the current offset. */
  here(name?: string): Label {
    const l = this.label(name);
    this.bind(l);
    return l;
  }

  /** Address (base + offset) of a bound label. */
  labelAddress(l: Label): bigint {
    const at = this.own(l, 'labelAddress');
    if (at === undefined) throw new Error(`labelAddress: label '${l.name}' is not bound`);
    return BigInt.asUintN(64, this.base + BigInt(at));
  }

  private own(l: Label, insn: string): number | undefined {
    if (!this.labels.has(l)) throw new Error(`${insn}: label '${String(l?.name)}' was not made by this assembler`);
    return this.labels.get(l);
  }

  // ---- encoding core ---------------------------------------------------------

  private emit(w: number): this {
    this.words.push(w >>> 0);
    return this;
  }

  /** Emit `w` with a pc-relative reference to `l` in the field of `kind`. */
  private emitRef(w: number, l: Label, kind: PcRelKind, insn: string): this {
    const at = this.own(l, insn);
    const index = this.words.length;
    this.emit(at === undefined ? w : w | this.pcrel(kind, at - index * 4, l, insn));
    if (at === undefined) this.fixups.push({ index, label: l, kind, insn });
    return this;
  }

  /** The field bits for a byte displacement, range-checked. */
  private pcrel(kind: PcRelKind, delta: number, l: Label, insn: string): number {
    const { shift, bits, scale } = PCREL[kind];
    const lo = -(2 ** (bits - 1)) * scale,
      hi = (2 ** (bits - 1) - 1) * scale;
    if (delta < lo || delta > hi) {
      throw new RangeError(
        `${insn}: label '${l.name}' at offset ${hex(delta)} from the instruction, out of range ${hex(lo)}..${hex(hi)}`,
      );
    }
    const imm = (delta / scale) & (2 ** bits - 1);
    if (kind === 'adr') return ((imm & 3) << 29) | ((imm >>> 2) << 5);
    return imm << shift;
  }

  /** The code, little-endian, with every label reference resolved. */
  bytes(): Buffer {
    const words = [...this.words];
    for (const f of this.fixups) {
      const at = this.labels.get(f.label);
      if (at === undefined) {
        throw new Error(
          `bytes: label '${f.label.name}' is not bound (used by ${f.insn} at offset ${hex(f.index * 4)})`,
        );
      }
      words[f.index] = (words[f.index]! | this.pcrel(f.kind, at - f.index * 4, f.label, f.insn)) >>> 0;
    }
    const out = Buffer.alloc(words.length * 4);
    words.forEach((w, i) => out.writeUInt32LE(w, i * 4));
    return out;
  }

  // ---- moves -----------------------------------------------------------------

  private moveWide(insn: keyof typeof MOVE_WIDE, rd: XReg, imm16: number, shift: number, sf: boolean): this {
    const d = reg(insn, 'rd', rd);
    const imm = int(insn, 'imm16', imm16, 0, 0xffff);
    const wide = sfBit(insn, sf);
    if (shift !== 0 && shift !== 16 && shift !== 32 && shift !== 48) {
      throw new RangeError(`${insn}: shift ${String(shift)} is not 0, 16, 32 or 48`);
    }
    if (!wide && shift > 16) throw new RangeError(`${insn}: shift ${shift} needs the 64-bit form (sf)`);
    return this.emit(MOVE_WIDE[insn] | wide | ((shift / 16) << 21) | (imm << 5) | d);
  }

  /** `movz rd, #imm16, lsl #shift`: rd = imm16 << shift. rd 31 is xzr. */
  movz(rd: XReg, imm16: number, shift: 0 | 16 | 32 | 48 = 0, sf = true): this {
    return this.moveWide('movz', rd, imm16, shift, sf);
  }

  /** `movk rd, #imm16, lsl #shift`: replace those 16 bits of rd. */
  movk(rd: XReg, imm16: number, shift: 0 | 16 | 32 | 48 = 0, sf = true): this {
    return this.moveWide('movk', rd, imm16, shift, sf);
  }

  /** `movn rd, #imm16, lsl #shift`: rd = ~(imm16 << shift). */
  movn(rd: XReg, imm16: number, shift: 0 | 16 | 32 | 48 = 0, sf = true): this {
    return this.moveWide('movn', rd, imm16, shift, sf);
  }

  /**
   * Any 64-bit value (-2^63..2^64-1) into rd, in the fewest move-wide
   * instructions: movz then movk for each other non-zero 16-bit chunk, or movn
   * then movk for each other chunk that is not 0xffff, whichever is shorter
   * (movz on a tie).
   */
  mov64(rd: XReg, value: bigint | number): this {
    if (typeof value === 'number' && !Number.isSafeInteger(value)) {
      throw new RangeError(`mov64: value ${String(value)} is not an integer in the safe range (use a bigint)`);
    }
    const v = BigInt(value);
    if (v < -(1n << 63n) || v >= 1n << 64n)
      throw new RangeError(`mov64: value ${hex(v)} out of range -0x8000000000000000..0xffffffffffffffff`);
    reg('mov64', 'rd', rd);
    const u = BigInt.asUintN(64, v);
    const chunks = [0, 1, 2, 3].map((i) => Number((u >> BigInt(16 * i)) & 0xffffn));
    const inverted = chunks.filter((c) => c === 0xffff).length > chunks.filter((c) => c === 0).length;
    const fill = inverted ? 0xffff : 0;
    const first = Math.max(
      0,
      chunks.findIndex((c) => c !== fill),
    );
    const hw = (i: number) => (i * 16) as 0 | 16 | 32 | 48;
    if (inverted) this.movn(rd, ~chunks[first]! & 0xffff, hw(first));
    else this.movz(rd, chunks[first]!, hw(first));
    chunks.forEach((c, i) => {
      if (i > first && c !== fill) this.movk(rd, c, hw(i));
    });
    return this;
  }

  /** `mov rd, rn` as `orr rd, xzr, rn`: 31 is xzr on both sides (use `addImm(rd, 31, 0)` to copy sp). */
  movReg(rd: XReg, rn: XReg, sf = true): this {
    return this.reg3('orr', rd, 31, reg('mov', 'rn', rn), sf, 'mov');
  }

  // ---- arithmetic and logic --------------------------------------------------

  private addSubImm(
    insn: keyof typeof ADDSUB_IMM,
    rd: XReg,
    rn: XReg,
    imm12: number,
    shift12: boolean,
    sf: boolean,
    name: string = insn,
  ): this {
    const d = reg(name, 'rd', rd),
      n = reg(name, 'rn', rn);
    const imm = int(name, 'imm12', imm12, 0, 0xfff);
    const sh = bool(name, 'shift12', shift12) ? 1 << 22 : 0;
    return this.emit(ADDSUB_IMM[insn] | sfBit(name, sf) | sh | (imm << 10) | (n << 5) | d);
  }

  /** `add rd, rn, #imm12{, lsl #12}`: rd and rn 31 are sp. */
  addImm(rd: XReg, rn: XReg, imm12: number, shift12 = false, sf = true): this {
    return this.addSubImm('add', rd, rn, imm12, shift12, sf);
  }

  /** `sub rd, rn, #imm12{, lsl #12}`: rd and rn 31 are sp. */
  subImm(rd: XReg, rn: XReg, imm12: number, shift12 = false, sf = true): this {
    return this.addSubImm('sub', rd, rn, imm12, shift12, sf);
  }

  /** `subs rd, rn, #imm12{, lsl #12}`: rd 31 is xzr, rn 31 is sp. */
  subsImm(rd: XReg, rn: XReg, imm12: number, shift12 = false, sf = true): this {
    return this.addSubImm('subs', rd, rn, imm12, shift12, sf);
  }

  /** `cmp rn, #imm12` (`subs xzr, rn, #imm12`): rn 31 is sp. */
  cmpImm(rn: XReg, imm12: number, sf = true): this {
    return this.addSubImm('subs', 31, rn, imm12, false, sf, 'cmp');
  }

  private reg3(insn: keyof typeof REG3, rd: XReg, rn: XReg, rm: XReg, sf: boolean, name: string = insn): this {
    const d = reg(name, 'rd', rd),
      n = reg(name, 'rn', rn),
      m = reg(name, 'rm', rm);
    return this.emit(REG3[insn] | sfBit(name, sf) | (m << 16) | (n << 5) | d);
  }

  /** `add rd, rn, rm`: 31 is xzr everywhere (the shifted-register form). */
  addReg(rd: XReg, rn: XReg, rm: XReg, sf = true): this {
    return this.reg3('add', rd, rn, rm, sf);
  }

  /** `sub rd, rn, rm`: 31 is xzr everywhere. */
  subReg(rd: XReg, rn: XReg, rm: XReg, sf = true): this {
    return this.reg3('sub', rd, rn, rm, sf);
  }

  /** `subs rd, rn, rm`: 31 is xzr everywhere. */
  subsReg(rd: XReg, rn: XReg, rm: XReg, sf = true): this {
    return this.reg3('subs', rd, rn, rm, sf);
  }

  /** `cmp rn, rm` (`subs xzr, rn, rm`). */
  cmpReg(rn: XReg, rm: XReg, sf = true): this {
    return this.reg3('subs', 31, rn, rm, sf, 'cmp');
  }

  /** `and rd, rn, rm`: 31 is xzr everywhere. */
  andReg(rd: XReg, rn: XReg, rm: XReg, sf = true): this {
    return this.reg3('and', rd, rn, rm, sf);
  }

  /** `orr rd, rn, rm`: 31 is xzr everywhere. */
  orrReg(rd: XReg, rn: XReg, rm: XReg, sf = true): this {
    return this.reg3('orr', rd, rn, rm, sf);
  }

  /** `eor rd, rn, rm`: 31 is xzr everywhere. */
  eorReg(rd: XReg, rn: XReg, rm: XReg, sf = true): this {
    return this.reg3('eor', rd, rn, rm, sf);
  }

  /** `ubfm rd, rn, #immr, #imms` (N = sf): the bitfield move under lsl and lsr. */
  private ubfm(name: string, rd: XReg, rn: XReg, immr: number, imms: number, sf: boolean): this {
    const d = reg(name, 'rd', rd),
      n = reg(name, 'rn', rn);
    const wide = sfBit(name, sf);
    return this.emit(0x5300_0000 | wide | (wide ? 1 << 22 : 0) | (immr << 16) | (imms << 10) | (n << 5) | d);
  }

  /** `lsl rd, rn, #shift` (0..63, or 0..31 for w): ubfm rd, rn, #(-shift mod width), #(width-1-shift). 31 is xzr. */
  lslImm(rd: XReg, rn: XReg, shift: number, sf = true): this {
    const width = bool('lsl', 'sf', sf) ? 64 : 32;
    const s = int('lsl', 'shift', shift, 0, width - 1, String);
    return this.ubfm('lsl', rd, rn, (width - s) % width, width - 1 - s, sf);
  }

  /** `lsr rd, rn, #shift` (0..63, or 0..31 for w): ubfm rd, rn, #shift, #(width-1). 31 is xzr. */
  lsrImm(rd: XReg, rn: XReg, shift: number, sf = true): this {
    const width = bool('lsr', 'sf', sf) ? 64 : 32;
    const s = int('lsr', 'shift', shift, 0, width - 1, String);
    return this.ubfm('lsr', rd, rn, s, width - 1, sf);
  }

  // ---- loads and stores ------------------------------------------------------

  private ldstName(load: boolean, size: 1 | 2 | 4 | 8): string {
    const suffix = LDST_NAME[size];
    if (suffix === undefined) throw new RangeError(`${load ? 'ldr' : 'str'}: size ${String(size)} is not 1, 2, 4 or 8`);
    return (load ? 'ldr' : 'str') + suffix;
  }

  /** The unsigned scaled 12-bit offset form: 0..4095*size, a multiple of size. */
  private ldst(load: boolean, size: 1 | 2 | 4 | 8, rt: XReg, rn: XReg, imm: number): this {
    const name = this.ldstName(load, size);
    const t = reg(name, 'rt', rt),
      n = reg(name, 'rn', rn);
    const off = int(name, 'offset', imm, 0, 0xfff * size);
    if (off % size !== 0) throw new RangeError(`${name}: offset ${hex(off)} is not a multiple of ${size}`);
    return this.emit(
      0x3900_0000 | (LDST_SIZE[size]! << 30) | (load ? 1 << 22 : 0) | ((off / size) << 10) | (n << 5) | t,
    );
  }

  /** The register-offset form `[rn, rm]` (LSL #0). */
  private ldstReg(load: boolean, size: 1 | 2 | 4 | 8, rt: XReg, rn: XReg, rm: XReg): this {
    const name = this.ldstName(load, size);
    const t = reg(name, 'rt', rt),
      n = reg(name, 'rn', rn),
      m = reg(name, 'rm', rm);
    return this.emit(0x3820_6800 | (LDST_SIZE[size]! << 30) | (load ? 1 << 22 : 0) | (m << 16) | (n << 5) | t);
  }

  /**
   * `ldrb/ldrh/ldr wt, [rn, #imm]` (sizes 1, 2, 4; zero-extended) or `ldr xt` (size 8):
   * imm is a byte offset 0..4095*size, a multiple of size. rt 31 is xzr, rn 31 is sp.
   */
  ldr(size: 1 | 2 | 4 | 8, rt: XReg, rn: XReg, imm = 0): this {
    return this.ldst(true, size, rt, rn, imm);
  }

  /** `strb/strh/str wt, [rn, #imm]` or `str xt`: as ldr. rt 31 is xzr (stores zero), rn 31 is sp. */
  str(size: 1 | 2 | 4 | 8, rt: XReg, rn: XReg, imm = 0): this {
    return this.ldst(false, size, rt, rn, imm);
  }

  /** `ldrb/ldrh/ldr wt, [rn, rm]` or `ldr xt, [rn, rm]`: rn 31 is sp, rt and rm 31 are xzr. */
  ldrReg(size: 1 | 2 | 4 | 8, rt: XReg, rn: XReg, rm: XReg): this {
    return this.ldstReg(true, size, rt, rn, rm);
  }

  /** `strb/strh/str wt, [rn, rm]` or `str xt, [rn, rm]`: rn 31 is sp, rt and rm 31 are xzr. */
  strReg(size: 1 | 2 | 4 | 8, rt: XReg, rn: XReg, rm: XReg): this {
    return this.ldstReg(false, size, rt, rn, rm);
  }

  /** `ldr xt/wt, label`: the label within ±1 MiB. rt 31 is xzr. */
  ldrLiteral(rt: XReg, label: Label, sf = true): this {
    const t = reg('ldr', 'rt', rt);
    return this.emitRef((bool('ldr', 'sf', sf) ? 0x5800_0000 : 0x1800_0000) | t, label, 'imm19', 'ldr');
  }

  /** `adr rd, label`: rd = the label's address, within ±1 MiB. rd 31 is xzr. */
  adr(rd: XReg, label: Label): this {
    return this.emitRef(0x1000_0000 | reg('adr', 'rd', rd), label, 'adr', 'adr');
  }

  // ---- branches --------------------------------------------------------------

  /** `b label` (±128 MiB). */
  b(label: Label): this {
    return this.emitRef(0x1400_0000, label, 'imm26', 'b');
  }

  /** `bl label` (±128 MiB): x30 = return address. */
  bl(label: Label): this {
    return this.emitRef(0x9400_0000, label, 'imm26', 'bl');
  }

  /** `b.cond label` (±1 MiB). */
  bCond(cond: Cond, label: Label): this {
    const cc = Object.hasOwn(CONDS, cond) ? CONDS[cond] : undefined;
    if (cc === undefined) throw new RangeError(`b.cond: unknown condition '${String(cond)}'`);
    return this.emitRef(0x5400_0000 | cc, label, 'imm19', `b.${cond}`);
  }

  /** `cbz rt, label` (±1 MiB). rt 31 is xzr. */
  cbz(rt: XReg, label: Label, sf = true): this {
    return this.emitRef(0x3400_0000 | sfBit('cbz', sf) | reg('cbz', 'rt', rt), label, 'imm19', 'cbz');
  }

  /** `cbnz rt, label` (±1 MiB). rt 31 is xzr. */
  cbnz(rt: XReg, label: Label, sf = true): this {
    return this.emitRef(0x3500_0000 | sfBit('cbnz', sf) | reg('cbnz', 'rt', rt), label, 'imm19', 'cbnz');
  }

  /** `br xn`. */
  br(rn: XReg): this {
    return this.emit(0xd61f_0000 | (reg('br', 'rn', rn) << 5));
  }

  /** `blr xn`. */
  blr(rn: XReg): this {
    return this.emit(0xd63f_0000 | (reg('blr', 'rn', rn) << 5));
  }

  /** `ret {xn}` (x30 by default). */
  ret(rn: XReg = 30): this {
    return this.emit(0xd65f_0000 | (reg('ret', 'rn', rn) << 5));
  }

  // ---- exceptions and system -------------------------------------------------

  /** The exception-generating instructions: imm16 at bits 20:5. */
  private exception(insn: string, op: number, imm16: number): this {
    return this.emit(op | (int(insn, 'imm16', imm16, 0, 0xffff) << 5));
  }

  /** `hvc #imm16`: call the hypervisor (an exit to the VMM under KVM). */
  hvc(imm16: number): this {
    return this.exception('hvc', 0xd400_0002, imm16);
  }

  svc(imm16: number): this {
    return this.exception('svc', 0xd400_0001, imm16);
  }

  brk(imm16: number): this {
    return this.exception('brk', 0xd420_0000, imm16);
  }

  nop(): this {
    return this.emit(0xd503_201f);
  }

  wfi(): this {
    return this.emit(0xd503_207f);
  }

  isb(): this {
    return this.emit(0xd503_3fdf);
  }

  /** `dsb sy`. */
  dsbSy(): this {
    return this.emit(0xd503_3f9f);
  }

  /** `dmb sy`. */
  dmbSy(): this {
    return this.emit(0xd503_3fbf);
  }

  eret(): this {
    return this.emit(0xd69f_03e0);
  }

  /** `tlbi vmalle1` (sys #0, c8, c7, #0, xzr): invalidate this PE's stage-1 EL1&0 TLB entries. */
  tlbiVmalle1(): this {
    return this.emit(0xd508_871f);
  }

  /** The op0:op1:CRn:CRm:op2 field (bits 20:5) of MSR/MRS (register). */
  private sysreg(insn: string, r: SysReg, write: boolean): number {
    let e: SysRegEncoding;
    if (typeof r === 'string') {
      const named = Object.hasOwn(SYSREGS, r) ? (SYSREGS[r] as Named) : undefined;
      if (!named)
        throw new RangeError(
          `${insn}: unknown system register '${r}' (name one of ${SYSREG_NAMES.join(', ')} or give {op0, op1, crn, crm, op2})`,
        );
      if (write && named.readonly) throw new RangeError(`${insn}: system register ${r} is read-only`);
      e = named;
    } else if (typeof r === 'object' && r !== null) {
      e = r;
    } else {
      throw new RangeError(`${insn}: system register ${String(r)} is neither a name nor {op0, op1, crn, crm, op2}`);
    }
    const op0 = int(insn, 'op0', e.op0, 2, 3, String);
    const op1 = int(insn, 'op1', e.op1, 0, 7, String);
    const crn = int(insn, 'crn', e.crn, 0, 15, String);
    const crm = int(insn, 'crm', e.crm, 0, 15, String);
    const op2 = int(insn, 'op2', e.op2, 0, 7, String);
    return (op0 << 19) | (op1 << 16) | (crn << 12) | (crm << 8) | (op2 << 5);
  }

  /** `msr sysreg, xt`: rt 31 is xzr. Named read-only registers are rejected. */
  msr(sysreg: SysReg, rt: XReg): this {
    return this.emit(0xd500_0000 | this.sysreg('msr', sysreg, true) | reg('msr', 'rt', rt));
  }

  /** `mrs xt, sysreg`: rt 31 is xzr. */
  mrs(rt: XReg, sysreg: SysReg): this {
    return this.emit(0xd520_0000 | this.sysreg('mrs', sysreg, false) | reg('mrs', 'rt', rt));
  }

  // ---- raw data --------------------------------------------------------------

  /** A raw 32-bit word (-2^31..2^32-1), little-endian like the instructions. */
  word(w: number): this {
    return this.emit(int('word', 'value', w, -0x8000_0000, 0xffff_ffff));
  }
}

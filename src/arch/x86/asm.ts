/**
 * A small x86-64 encoder for guest programs.
 *
 * Every instruction has a size that is known when it is emitted (branches to
 * labels always use rel32, `loop`/`jrcxz` rel8, label addresses a fixed-width
 * immediate), so layout is a single pass: bytes are appended as methods are
 * called and label references are patched by `assemble()`.
 *
 * Encodings follow what GNU as picks for the same Intel-syntax text: the
 * `r/m, reg` opcode for register-to-register forms, imm8 when a sign-extended
 * byte holds the value, the accumulator short form for rax with imm32, disp8
 * when it fits and disp32 otherwise, disp8 = 0 for an rbp/r13 base, a SIB byte
 * for an rsp/r12 base and SIB with no base for absolute addresses.
 */
import { signedHex as hex } from '../../base/units.js';

/** General-purpose registers in encoding order: the index is the register number. */
const REGS = [
  'rax',
  'rcx',
  'rdx',
  'rbx',
  'rsp',
  'rbp',
  'rsi',
  'rdi',
  'r8',
  'r9',
  'r10',
  'r11',
  'r12',
  'r13',
  'r14',
  'r15',
] as const;

export type Reg64 = (typeof REGS)[number];
export type Size = 1 | 2 | 4 | 8;
export type Scale = 1 | 2 | 4 | 8;
/** A memory operand: `[base + index*scale + disp]`, or `[rip + label + disp]`. */
export type Mem = { base?: Reg64; index?: Reg64; scale?: Scale; disp?: number } | { rip: string; disp?: number };

/** Condition codes (the low nibble of Jcc/SETcc/CMOVcc), with the usual aliases. */
const CONDS = {
  o: 0,
  no: 1,
  b: 2,
  c: 2,
  nae: 2,
  ae: 3,
  nb: 3,
  nc: 3,
  e: 4,
  z: 4,
  ne: 5,
  nz: 5,
  be: 6,
  na: 6,
  a: 7,
  nbe: 7,
  s: 8,
  ns: 9,
  p: 10,
  pe: 10,
  np: 11,
  po: 11,
  l: 12,
  nge: 12,
  ge: 13,
  nl: 13,
  le: 14,
  ng: 14,
  g: 15,
  nle: 15,
} as const;
export type Cond = keyof typeof CONDS;

/** Segment registers, numbered as in the ModRM.reg field of `mov Sreg`. */
const SEGS = { es: 0, cs: 1, ss: 2, ds: 3, fs: 4, gs: 5 } as const;
export type Seg = keyof typeof SEGS;
/** Segment registers that `mov Sreg, r/m` may load (loading cs is #UD). */
export type LoadableSeg = Exclude<Seg, 'cs'>;

/** Control registers reachable with `mov cr, r64` (cr8 takes REX.R). */
const CRS = [0, 2, 3, 4, 8] as const;
export type Cr = (typeof CRS)[number];

/** SIB.scale field by scale factor. */
const SCALE_BITS: Record<number, number> = { 1: 0, 2: 1, 4: 2, 8: 3 };

/**
 * Operand size: the legacy prefix, REX.W and the "w" bit (opcode bit 0, set for
 * word/dword/qword forms, clear for byte forms).
 */
const SIZES: Record<Size, { pfx: number[]; w: boolean; wbit: 0 | 1 }> = {
  1: { pfx: [], w: false, wbit: 0 },
  2: { pfx: [0x66], w: false, wbit: 1 },
  4: { pfx: [], w: false, wbit: 1 },
  8: { pfx: [], w: true, wbit: 1 },
};

/** Group-1 arithmetic: ModRM.reg extension; `r/m, reg` is ext*8+1, `rax, imm32` is ext*8+5. */
const ALU = { add: 0, or: 1, adc: 2, sbb: 3, and: 4, sub: 5, xor: 6, cmp: 7 } as const;
/** Group-2 shifts and rotates: ModRM.reg extension of D1 (by 1), D3 (by cl), C1 (by imm8). */
const SHIFT = { rol: 0, ror: 1, rcl: 2, rcr: 3, shl: 4, shr: 5, sar: 7 } as const;
/** One-operand group-3/group-5 forms: opcode and ModRM.reg extension. */
const UNARY = {
  inc: [0xff, 0],
  dec: [0xff, 1],
  not: [0xf7, 2],
  neg: [0xf7, 3],
} as const satisfies Record<string, readonly [number, number]>;
/** Bit tests: 0F BA /ext ib, or 0F (A3 + 8*(ext-4)) /r with the bit index in a register. */
const BITTEST = { bt: 4, bts: 5, btr: 6, btc: 7 } as const;
/** Group-7 memory forms (0F 01 /ext m). */
const SYSMEM = { sgdt: 0, sidt: 1, lgdt: 2, lidt: 3, invlpg: 7 } as const;
/** Group-6 forms on a 16-bit register (0F 00 /ext). */
const SYSREG16 = { lldt: 2, ltr: 3 } as const;

/** Instructions without operands. */
const FIXED = {
  nop: [0x90],
  hlt: [0xf4],
  cli: [0xfa],
  sti: [0xfb],
  cld: [0xfc],
  std: [0xfd],
  ret: [0xc3],
  int3: [0xcc],
  iretq: [0x48, 0xcf],
  ud2: [0x0f, 0x0b],
  pushfq: [0x9c],
  popfq: [0x9d],
  cpuid: [0x0f, 0xa2],
  rdmsr: [0x0f, 0x32],
  wrmsr: [0x0f, 0x30],
  rdtsc: [0x0f, 0x31],
  rdtscp: [0x0f, 0x01, 0xf9],
  pause: [0xf3, 0x90],
  lfence: [0x0f, 0xae, 0xe8],
  mfence: [0x0f, 0xae, 0xf0],
  sfence: [0x0f, 0xae, 0xf8],
  stac: [0x0f, 0x01, 0xcb],
  clac: [0x0f, 0x01, 0xca],
  rdpkru: [0x0f, 0x01, 0xee],
  wrpkru: [0x0f, 0x01, 0xef],
  swapgs: [0x0f, 0x01, 0xf8],
  xgetbv: [0x0f, 0x01, 0xd0],
  xsetbv: [0x0f, 0x01, 0xd1],
  wbinvd: [0x0f, 0x09],
  clts: [0x0f, 0x06],
  syscall: [0x0f, 0x05],
  vmcall: [0x0f, 0x01, 0xc1],
} as const satisfies Record<string, readonly number[]>;

type AluOps = {
  /** `op dst, src` on 64-bit operands; a number is a sign-extended imm32 (imm8 form when it fits). */
  [K in keyof typeof ALU]: (dst: Reg64, src: Reg64 | number) => Asm;
};
type ShiftOps = {
  /** Shift/rotate a 64-bit register by an immediate 0..63 or by cl. */
  [K in keyof typeof SHIFT]: (dst: Reg64, count: number | 'cl') => Asm;
};
type UnaryOps = { [K in keyof typeof UNARY]: (dst: Reg64) => Asm };
type BitTestOps = {
  /** Test (and set/reset/complement) bit `bit` (0..63 or a register) of a 64-bit register. */
  [K in keyof typeof BITTEST]: (dst: Reg64, bit: number | Reg64) => Asm;
};
type SysMemOps = { [K in keyof typeof SYSMEM]: (m: Mem) => Asm };
type SysReg16Ops = {
  /** Encodes the 16-bit register form; the register is named by its 64-bit name. */
  [K in keyof typeof SYSREG16]: (r: Reg64) => Asm;
};
type FixedOps = { [K in keyof typeof FIXED]: () => Asm };

export type AsmResult = {
  code: Uint8Array;
  /** Label name -> absolute address (origin + offset). */
  labels: Map<string, number>;
};

const S8: readonly [bigint, bigint] = [-0x80n, 0x7fn];
const S32: readonly [bigint, bigint] = [-0x8000_0000n, 0x7fff_ffffn];
const U32: readonly [bigint, bigint] = [0n, 0xffff_ffffn];

/** How to write an immediate: signed or unsigned views of `bits` bits are both accepted. */
function anyInt(bits: number): readonly [bigint, bigint] {
  return [-(1n << BigInt(bits - 1)), (1n << BigInt(bits)) - 1n];
}

/** Convert to bigint, rejecting non-integers and numbers that lost precision. */
function toBig(v: number | bigint, what: string): bigint {
  if (typeof v === 'bigint') return v;
  if (typeof v !== 'number' || !Number.isSafeInteger(v)) {
    throw new Error(`${what} ${String(v)} is not an integer in the safe range (use a bigint)`);
  }
  return BigInt(v);
}

function checked(v: number | bigint, [lo, hi]: readonly [bigint, bigint], what: string): bigint {
  const b = toBig(v, what);
  if (b < lo || b > hi) throw new Error(`${what} ${hex(b)} out of range ${hex(lo)}..${hex(hi)}`);
  return b;
}

function fits(v: bigint, [lo, hi]: readonly [bigint, bigint]): boolean {
  return v >= lo && v <= hi;
}

/** Little-endian bytes of the low `size` bytes of v (two's complement). */
function le(v: bigint, size: number): number[] {
  const out: number[] = [];
  let u = BigInt.asUintN(size * 8, v);
  for (let i = 0; i < size; i++, u >>= 8n) out.push(Number(u & 0xffn));
  return out;
}

function regNum(r: unknown): number {
  const n = REGS.indexOf(r as Reg64);
  if (n < 0) throw new Error(`unknown register '${String(r)}' (expected a 64-bit name: ${REGS.join(', ')})`);
  return n;
}

function isReg(x: unknown): x is Reg64 {
  return REGS.includes(x as Reg64);
}

/** A reference to a label, patched into `size` bytes at assemble time. */
type LabelRef = {
  label: string;
  addend: number;
  /** true: target - end of instruction; false: absolute address. */
  pcrel: boolean;
  size: 1 | 4 | 8;
};

/** Encoded ModRM (+ SIB + displacement) and the REX.R/X/B bits it needs. */
type ModRM = { rex: number; bytes: number[]; rip?: { at: number; label: string; addend: number } };

/**
 * The ModRM/SIB encoder used by every register and memory operand.
 * `reg` is the ModRM.reg value: a register number (0..15) or an opcode extension.
 * `rm` is a register number (mod = 11) or a memory operand.
 */
function modrm(reg: number, rm: number | Mem): ModRM {
  const r = (reg & 7) << 3;
  const rexR = (reg >> 3) << 2;
  if (typeof rm === 'number') return { rex: rexR | (rm >> 3), bytes: [0xc0 | r | (rm & 7)] };
  if (typeof rm !== 'object' || rm === null) throw new Error(`bad memory operand ${String(rm)}`);
  const disp = Number(checked(rm.disp ?? 0, S32, 'displacement'));
  if ('rip' in rm) {
    if ('base' in rm || 'index' in rm) throw new Error('a rip-relative operand cannot also have a base or index');
    if (typeof rm.rip !== 'string' || rm.rip === '') throw new Error('rip-relative operand needs a label name');
    // mod=00 rm=101: [rip + disp32]
    return { rex: rexR, bytes: [0x05 | r, 0, 0, 0, 0], rip: { at: 1, label: rm.rip, addend: disp } };
  }
  const base = rm.base === undefined ? undefined : regNum(rm.base);
  const index = rm.index === undefined ? undefined : regNum(rm.index);
  if (index === 4) throw new Error('rsp cannot be an index register');
  if (rm.scale !== undefined && index === undefined)
    throw new Error(`scale ${rm.scale} given without an index register`);
  const ss = SCALE_BITS[rm.scale ?? 1];
  if (ss === undefined) throw new Error(`invalid scale ${String(rm.scale)} (expected 1, 2, 4 or 8)`);
  // SIB.index = 100 with REX.X = 0 means "no index".
  const sibIndex = index === undefined ? 4 : index & 7;
  const rex = rexR | (((index ?? 0) >> 3) << 1) | ((base ?? 0) >> 3);
  const dispBytes = (size: number) => le(BigInt(disp), size);

  if (base === undefined) {
    // mod=00 rm=100, SIB.base=101: [index*scale + disp32], or absolute disp32 without index.
    return { rex, bytes: [0x04 | r, (ss << 6) | (sibIndex << 3) | 5, ...dispBytes(4)] };
  }
  // mod=00 with base 101 (rbp/r13) would mean rip/no-base, so those bases always carry a disp8.
  const mod = disp === 0 && (base & 7) !== 5 ? 0 : fits(BigInt(disp), S8) ? 1 : 2;
  const tail = mod === 0 ? [] : dispBytes(mod === 1 ? 1 : 4);
  // rm=100 (rsp/r12) means "SIB follows", so those bases always need a SIB byte.
  if (index === undefined && (base & 7) !== 4) return { rex, bytes: [(mod << 6) | r | (base & 7), ...tail] };
  return { rex, bytes: [(mod << 6) | r | 4, (ss << 6) | (sibIndex << 3) | (base & 7), ...tail] };
}

/** One instruction, in encoding order. */
type Insn = {
  /** Legacy prefixes (operand size, rep). */
  pfx?: readonly number[];
  /** REX.W: 64-bit operand size. */
  w?: boolean;
  op: readonly number[];
  /** Register encoded in the low 3 bits of the last opcode byte (push, pop, mov r, imm). */
  opReg?: number;
  /** ModRM.reg: register number or opcode extension. */
  reg?: number;
  /** ModRM.rm: register number or memory operand. */
  rm?: number | Mem;
  /** Register numbers used as byte registers: 4..7 then mean spl..dil and need a REX prefix. */
  byteRegs?: readonly number[];
  imm?: { value: bigint; size: 1 | 2 | 4 | 8 } | LabelRef;
};

type Fixup = LabelRef & { at: number; end: number };

export class Asm {
  /** Address of byte 0 of the output. */
  readonly origin: number;
  private readonly buf: number[] = [];
  private readonly offsets = new Map<string, number>();
  private readonly fixups: Fixup[] = [];

  constructor(opts: { origin?: number } = {}) {
    const origin = opts.origin ?? 0;
    if (!Number.isSafeInteger(origin) || origin < 0)
      throw new Error(`origin ${String(origin)} must be a non-negative safe integer`);
    this.origin = origin;
  }

  /** Address of the next byte to be emitted. */
  get pc(): number {
    return this.origin + this.buf.length;
  }

  /** Number of bytes emitted so far (layout is final as soon as an instruction is emitted). */
  size(): number {
    return this.buf.length;
  }

  label(name: string): this {
    if (typeof name !== 'string' || name === '') throw new Error('label name must be a non-empty string');
    if (isReg(name)) throw new Error(`label name '${name}' is a register name`);
    if (this.offsets.has(name)) throw new Error(`duplicate label '${name}'`);
    this.offsets.set(name, this.buf.length);
    return this;
  }

  /** Resolve label references and return the code and the label addresses. */
  assemble(): AsmResult {
    const code = Uint8Array.from(this.buf);
    for (const f of this.fixups) {
      const target = this.offsets.get(f.label);
      if (target === undefined) throw new Error(`unknown label '${f.label}'`);
      const v = f.pcrel ? BigInt(target + f.addend - f.end) : BigInt(this.origin + target + f.addend);
      const range = f.pcrel ? (f.size === 1 ? S8 : S32) : f.size === 4 ? U32 : anyInt(64);
      if (!fits(v, range)) {
        const kind = f.pcrel ? `rel${f.size * 8} displacement` : `${f.size * 8}-bit address`;
        throw new Error(
          `label '${f.label}' out of range: ${kind} ${hex(v)} does not fit ${hex(range[0])}..${hex(range[1])}`,
        );
      }
      code.set(le(v, f.size), f.at);
    }
    const labels = new Map<string, number>();
    for (const [name, off] of this.offsets) labels.set(name, this.origin + off);
    return { code, labels };
  }

  // ---- encoding core -------------------------------------------------------

  private emit(i: Insn): this {
    const start = this.buf.length;
    const op = [...i.op];
    let rex = i.w ? 8 : 0;
    if (i.opReg !== undefined) {
      rex |= i.opReg >> 3;
      op[op.length - 1] |= i.opReg & 7;
    }
    const m = i.rm === undefined ? undefined : modrm(i.reg ?? 0, i.rm);
    if (m) rex |= m.rex;
    const needRex = rex !== 0 || (i.byteRegs ?? []).some((n) => n >= 4 && n < 8);
    const head = [...(i.pfx ?? []), ...(needRex ? [0x40 | rex] : []), ...op];
    const body = m?.bytes ?? [];
    const imm = i.imm;
    const immBytes =
      imm === undefined ? [] : 'value' in imm ? le(imm.value, imm.size) : new Array<number>(imm.size).fill(0);
    this.buf.push(...head, ...body, ...immBytes);
    const end = this.buf.length;
    if (m?.rip) {
      const { at, label, addend } = m.rip;
      this.fixups.push({ label, addend, pcrel: true, size: 4, at: start + head.length + at, end });
    }
    if (imm && 'label' in imm) this.fixups.push({ ...imm, at: start + head.length + body.length, end });
    return this;
  }

  private fixed(bytes: readonly number[]): this {
    return this.emit({ op: bytes });
  }

  private alu(ext: number, dst: Reg64, src: Reg64 | number): this {
    const d = regNum(dst);
    if (typeof src !== 'number') return this.emit({ w: true, op: [ext * 8 + 1], reg: regNum(src), rm: d });
    const v = checked(src, S32, 'immediate');
    if (fits(v, S8)) return this.emit({ w: true, op: [0x83], reg: ext, rm: d, imm: { value: v, size: 1 } });
    if (d === 0) return this.emit({ w: true, op: [ext * 8 + 5], imm: { value: v, size: 4 } });
    return this.emit({ w: true, op: [0x81], reg: ext, rm: d, imm: { value: v, size: 4 } });
  }

  private shift(ext: number, dst: Reg64, count: number | 'cl'): this {
    const d = regNum(dst);
    if (count === 'cl') return this.emit({ w: true, op: [0xd3], reg: ext, rm: d });
    const n = checked(count, [0n, 63n], 'shift count');
    if (n === 1n) return this.emit({ w: true, op: [0xd1], reg: ext, rm: d });
    return this.emit({ w: true, op: [0xc1], reg: ext, rm: d, imm: { value: n, size: 1 } });
  }

  private bitTest(ext: number, dst: Reg64, bit: number | Reg64): this {
    const d = regNum(dst);
    if (typeof bit !== 'number')
      return this.emit({ w: true, op: [0x0f, 0xa3 + 8 * (ext - 4)], reg: regNum(bit), rm: d });
    const n = checked(bit, [0n, 63n], 'bit index');
    return this.emit({ w: true, op: [0x0f, 0xba], reg: ext, rm: d, imm: { value: n, size: 1 } });
  }

  /** Operand-size encoding for `size`, rejecting sizes outside `allowed`. */
  private sized(size: Size, what: string, allowed: readonly Size[] = [1, 2, 4, 8]) {
    const s = allowed.includes(size) ? SIZES[size] : undefined;
    if (!s) throw new Error(`${what}: invalid size ${String(size)} (expected ${allowed.join(', ')})`);
    return s;
  }

  // ---- data moves ----------------------------------------------------------

  /**
   * Load an immediate into a 64-bit register, shortest form first:
   * `mov r32, imm32` (zero-extends) for 0..2^32-1, `mov r64, simm32` for other
   * values that sign-extend from 32 bits, else `movabs r64, imm64`.
   * Accepts -2^63..2^64-1.
   */
  movImm(dst: Reg64, imm: number | bigint): this {
    const d = regNum(dst);
    const v = BigInt.asUintN(64, checked(imm, [-(1n << 63n), (1n << 64n) - 1n], 'immediate'));
    if (v <= U32[1]) return this.emit({ op: [0xb8], opReg: d, imm: { value: v, size: 4 } });
    if (fits(BigInt.asIntN(64, v), S32))
      return this.emit({ w: true, op: [0xc7], reg: 0, rm: d, imm: { value: v, size: 4 } });
    return this.emit({ w: true, op: [0xb8], opReg: d, imm: { value: v, size: 8 } });
  }

  /** `mov dst, src` (64-bit). */
  mov(dst: Reg64, src: Reg64): this {
    return this.emit({ w: true, op: [0x89], reg: regNum(src), rm: regNum(dst) });
  }

  /** Load `size` bytes zero-extended into a 64-bit register: movzx for 1 and 2, `mov r32` for 4, `mov r64` for 8. */
  load(size: Size, dst: Reg64, m: Mem): this {
    const s = this.sized(size, 'load');
    const op = size < 4 ? [0x0f, 0xb6 | (size >> 1)] : [0x8b];
    return this.emit({ w: s.w, op, reg: regNum(dst), rm: m });
  }

  /** `mov [m], r8/r16/r32/r64`. */
  store(size: Size, m: Mem, src: Reg64): this {
    const s = this.sized(size, 'store');
    const r = regNum(src);
    return this.emit({ pfx: s.pfx, w: s.w, op: [0x88 | s.wbit], reg: r, rm: m, byteRegs: size === 1 ? [r] : [] });
  }

  /** `mov byte/word/dword/qword [m], imm`; a qword immediate is a sign-extended imm32. */
  storeImm(size: Size, m: Mem, imm: number | bigint): this {
    const s = this.sized(size, 'storeImm');
    const value = checked(imm, size === 8 ? S32 : anyInt(size * 8), `${size}-byte store immediate`);
    return this.emit({
      pfx: s.pfx,
      w: s.w,
      op: [0xc6 | s.wbit],
      reg: 0,
      rm: m,
      imm: { value, size: size === 8 ? 4 : size },
    });
  }

  lea(dst: Reg64, m: Mem): this {
    return this.emit({ w: true, op: [0x8d], reg: regNum(dst), rm: m });
  }

  /**
   * Absolute address of a label (origin + offset) into a register: `movabs r64, imm64`
   * (bits = 64), or `mov r32, imm32` (bits = 32; assemble() checks the address is below 4 GiB).
   */
  movLabel(dst: Reg64, label: string, bits: 32 | 64 = 64): this {
    if (bits !== 32 && bits !== 64) throw new Error(`movLabel: invalid width ${String(bits)} (expected 32 or 64)`);
    const ref: LabelRef = { label, addend: 0, pcrel: false, size: bits === 64 ? 8 : 4 };
    return this.emit({ w: bits === 64, op: [0xb8], opReg: regNum(dst), imm: ref });
  }

  // ---- arithmetic / logic (the ALU, SHIFT, UNARY and BITTEST families are generated below) ----

  /** `test dst, src` (64-bit); a number is a sign-extended imm32 (there is no imm8 form). */
  test(dst: Reg64, src: Reg64 | number): this {
    const d = regNum(dst);
    if (typeof src !== 'number') return this.emit({ w: true, op: [0x85], reg: regNum(src), rm: d });
    const value = checked(src, S32, 'immediate');
    if (d === 0) return this.emit({ w: true, op: [0xa9], imm: { value, size: 4 } });
    return this.emit({ w: true, op: [0xf7], reg: 0, rm: d, imm: { value, size: 4 } });
  }

  /** `push r64`, or `push simm8/simm32` (sign-extended to 64 bits). */
  push(src: Reg64 | number): this {
    if (typeof src !== 'number') return this.emit({ op: [0x50], opReg: regNum(src) });
    const value = checked(src, S32, 'immediate');
    return fits(value, S8)
      ? this.emit({ op: [0x6a], imm: { value, size: 1 } })
      : this.emit({ op: [0x68], imm: { value, size: 4 } });
  }

  pop(dst: Reg64): this {
    return this.emit({ op: [0x58], opReg: regNum(dst) });
  }

  // ---- control flow --------------------------------------------------------

  /** Near jump or call: rel32 to a label, or indirect through a register or memory (FF /ext). */
  private branch(rel: number, ext: number, target: string | Reg64 | Mem): this {
    if (typeof target === 'object') return this.emit({ op: [0xff], reg: ext, rm: target });
    if (isReg(target)) return this.emit({ op: [0xff], reg: ext, rm: regNum(target) });
    return this.emit({ op: [rel], imm: this.rel(target, 4) });
  }

  private rel(label: string, size: 1 | 4): LabelRef {
    if (typeof label !== 'string' || label === '')
      throw new Error(`branch target must be a label name, got ${String(label)}`);
    return { label, addend: 0, pcrel: true, size };
  }

  jmp(target: string | Reg64 | Mem): this {
    return this.branch(0xe9, 4, target);
  }

  call(target: string | Reg64 | Mem): this {
    return this.branch(0xe8, 2, target);
  }

  /** `jcc rel32`. */
  jcc(cond: Cond, label: string): this {
    const cc = (CONDS as Record<string, number>)[cond];
    if (cc === undefined) throw new Error(`unknown condition '${String(cond)}'`);
    return this.emit({ op: [0x0f, 0x80 | cc], imm: this.rel(label, 4) });
  }

  /** `loop rel8`: decrement rcx, jump if non-zero. */
  loop(label: string): this {
    return this.emit({ op: [0xe2], imm: this.rel(label, 1) });
  }

  /** `jrcxz rel8`. */
  jrcxz(label: string): this {
    return this.emit({ op: [0xe3], imm: this.rel(label, 1) });
  }

  // ---- system --------------------------------------------------------------

  /** `int imm8` (always CD ib, also for 3: `int3` is the CC form). */
  int(n: number): this {
    return this.emit({ op: [0xcd], imm: { value: checked(n, [0n, 255n], 'interrupt vector'), size: 1 } });
  }

  private cr(cr: Cr): number {
    if (!CRS.includes(cr))
      throw new Error(`invalid control register cr${String(cr)} (expected ${CRS.map((c) => `cr${c}`).join(', ')})`);
    return cr;
  }

  /** `mov crN, r64`. */
  movToCr(cr: Cr, src: Reg64): this {
    return this.emit({ op: [0x0f, 0x22], reg: this.cr(cr), rm: regNum(src) });
  }

  /** `mov r64, crN`. */
  movFromCr(dst: Reg64, cr: Cr): this {
    return this.emit({ op: [0x0f, 0x20], reg: this.cr(cr), rm: regNum(dst) });
  }

  private seg(seg: Seg, allowed: readonly Seg[]): number {
    if (!allowed.includes(seg))
      throw new Error(`invalid segment register '${String(seg)}' (expected ${allowed.join(', ')})`);
    return SEGS[seg];
  }

  /** `mov Sreg, r32` (the selector is the low 16 bits of src). */
  movToSeg(seg: LoadableSeg, src: Reg64): this {
    return this.emit({ op: [0x8e], reg: this.seg(seg, ['ds', 'es', 'ss', 'fs', 'gs']), rm: regNum(src) });
  }

  /** `mov r32, Sreg` (zero-extends the selector). */
  movFromSeg(dst: Reg64, seg: Seg): this {
    return this.emit({ op: [0x8c], reg: this.seg(seg, Object.keys(SEGS) as Seg[]), rm: regNum(dst) });
  }

  /** `in al/ax/eax, imm8|dx`. */
  in(size: 1 | 2 | 4, port: number | 'dx'): this {
    return this.io(0xe4, size, port);
  }

  /** `out imm8|dx, al/ax/eax`. */
  out(size: 1 | 2 | 4, port: number | 'dx'): this {
    return this.io(0xe6, size, port);
  }

  /** in/out: `op` is the imm8-port byte form; the dx forms are op+8, the wider forms set the w bit. */
  private io(op: number, size: Size, port: number | 'dx'): this {
    const s = this.sized(size, op === 0xe4 ? 'in' : 'out', [1, 2, 4]);
    if (port === 'dx') return this.emit({ pfx: s.pfx, op: [op | 8 | s.wbit] });
    const value = checked(port, [0n, 255n], 'port');
    return this.emit({ pfx: s.pfx, op: [op | s.wbit], imm: { value, size: 1 } });
  }

  /** `rep stos [rdi], al/ax/eax/rax`: store rcx elements of rax at rdi. */
  repStos(size: Size): this {
    const s = this.sized(size, 'repStos');
    return this.emit({ pfx: [...s.pfx, 0xf3], w: s.w, op: [0xaa | s.wbit] });
  }

  /** `rep movs [rdi], [rsi]`: copy rcx elements from rsi to rdi. */
  repMovs(size: Size): this {
    const s = this.sized(size, 'repMovs');
    return this.emit({ pfx: [...s.pfx, 0xf3], w: s.w, op: [0xa4 | s.wbit] });
  }

  // ---- raw data ------------------------------------------------------------

  bytes(b: ArrayLike<number>): this {
    const out = Array.from(b, (v, i) => Number(checked(v, [0n, 255n], `byte ${i}`)));
    this.buf.push(...out);
    return this;
  }

  u8(v: number): this {
    this.buf.push(...le(checked(v, anyInt(8), 'u8 value'), 1));
    return this;
  }

  u16(v: number): this {
    this.buf.push(...le(checked(v, anyInt(16), 'u16 value'), 2));
    return this;
  }

  u32(v: number): this {
    this.buf.push(...le(checked(v, anyInt(32), 'u32 value'), 4));
    return this;
  }

  u64(v: number | bigint): this {
    this.buf.push(...le(checked(v, anyInt(64), 'u64 value'), 8));
    return this;
  }

  /** Absolute address of a label as a 64-bit data word (e.g. for pointer tables). */
  u64Label(label: string): this {
    this.fixups.push({ label, addend: 0, pcrel: false, size: 8, at: this.buf.length, end: this.buf.length + 8 });
    this.buf.push(0, 0, 0, 0, 0, 0, 0, 0);
    return this;
  }

  /** ASCII text, without a terminator. */
  ascii(s: string): this {
    const codes = Array.from(s, (c) => c.charCodeAt(0));
    const bad = codes.findIndex((c) => c > 0x7f);
    if (bad >= 0) throw new Error(`ascii: non-ASCII character at index ${bad}`);
    this.buf.push(...codes);
    return this;
  }

  /** Pad with `fill` until the address (origin + offset) is a multiple of n (a power of two). */
  align(n: number, fill = 0x90): this {
    if (!Number.isSafeInteger(n) || n <= 0 || (n & (n - 1)) !== 0)
      throw new Error(`align: ${String(n)} is not a power of two`);
    const f = Number(checked(fill, [0n, 255n], 'align fill byte'));
    while (this.pc % n !== 0) this.buf.push(f);
    return this;
  }

  // ---- generated instruction families ---------------------------------------

  static {
    const proto = Asm.prototype as unknown as Record<string, unknown>;
    const define = (names: object, make: (name: string) => unknown) => {
      for (const name of Object.keys(names)) proto[name] = make(name);
    };
    define(
      ALU,
      (n) =>
        function (this: Asm, dst: Reg64, src: Reg64 | number) {
          return this.alu(ALU[n as keyof typeof ALU], dst, src);
        },
    );
    define(
      SHIFT,
      (n) =>
        function (this: Asm, dst: Reg64, count: number | 'cl') {
          return this.shift(SHIFT[n as keyof typeof SHIFT], dst, count);
        },
    );
    define(
      UNARY,
      (n) =>
        function (this: Asm, dst: Reg64) {
          const [op, ext] = UNARY[n as keyof typeof UNARY];
          return this.emit({ w: true, op: [op], reg: ext, rm: regNum(dst) });
        },
    );
    define(
      BITTEST,
      (n) =>
        function (this: Asm, dst: Reg64, bit: number | Reg64) {
          return this.bitTest(BITTEST[n as keyof typeof BITTEST], dst, bit);
        },
    );
    define(
      SYSMEM,
      (n) =>
        function (this: Asm, m: Mem) {
          if (typeof m !== 'object' || m === null) throw new Error(`${n} takes a memory operand`);
          return this.emit({ op: [0x0f, 0x01], reg: SYSMEM[n as keyof typeof SYSMEM], rm: m });
        },
    );
    define(
      SYSREG16,
      (n) =>
        function (this: Asm, r: Reg64) {
          return this.emit({ op: [0x0f, 0x00], reg: SYSREG16[n as keyof typeof SYSREG16], rm: regNum(r) });
        },
    );
    define(
      FIXED,
      (n) =>
        function (this: Asm) {
          return this.fixed(FIXED[n as keyof typeof FIXED]);
        },
    );
  }
}

/* The generated methods: add/or/adc/sbb/and/sub/xor/cmp, rol/ror/rcl/rcr/shl/shr/sar,
 * inc/dec/not/neg, bt/bts/btr/btc, sgdt/sidt/lgdt/lidt/invlpg, lldt/ltr and the
 * operand-less instructions of FIXED. */
export interface Asm extends AluOps, ShiftOps, UnaryOps, BitTestOps, SysMemOps, SysReg16Ops, FixedOps {}

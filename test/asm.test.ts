/**
 * The x86-64 encoder checked against GNU binutils.
 *
 * Every case pairs an encoder call with its Intel-syntax text, written the way
 * `objdump -M intel` prints it. The texts of all cases are assembled by GNU as
 * in one batch (each case between its own pair of symbols) and the bytes of
 * each case are compared with the encoder's. Separately, the encoder's output
 * for all cases is disassembled by objdump in one run and every instruction
 * boundary and text is compared with the case's text.
 */
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Asm, type Cond, type Mem, type Reg64, type Size } from '../src/arch/x86/asm.js';
import {
  assembleCases,
  byteMismatches as asMismatches,
  describeComparisons,
  encodeAll,
  hexBytes,
} from './support/binutils.js';

// ---- register names as the disassembler prints them ---------------------------

const R64 = [
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
const R32 = [
  'eax',
  'ecx',
  'edx',
  'ebx',
  'esp',
  'ebp',
  'esi',
  'edi',
  'r8d',
  'r9d',
  'r10d',
  'r11d',
  'r12d',
  'r13d',
  'r14d',
  'r15d',
];
const R16 = [
  'ax',
  'cx',
  'dx',
  'bx',
  'sp',
  'bp',
  'si',
  'di',
  'r8w',
  'r9w',
  'r10w',
  'r11w',
  'r12w',
  'r13w',
  'r14w',
  'r15w',
];
const R8 = [
  'al',
  'cl',
  'dl',
  'bl',
  'spl',
  'bpl',
  'sil',
  'dil',
  'r8b',
  'r9b',
  'r10b',
  'r11b',
  'r12b',
  'r13b',
  'r14b',
  'r15b',
];
const BY_SIZE: Record<Size, readonly string[]> = { 1: R8, 2: R16, 4: R32, 8: R64 };
const PTR: Record<Size, string> = { 1: 'BYTE PTR', 2: 'WORD PTR', 4: 'DWORD PTR', 8: 'QWORD PTR' };
const sub = (r: Reg64, size: Size) => BY_SIZE[size][R64.indexOf(r)]!;

/** An immediate as objdump prints it: unsigned, in the operand width. */
const hx = (v: number | bigint, bits = 64) => `0x${BigInt.asUintN(bits, BigInt(v)).toString(16)}`;
/** A signed displacement as objdump prints it after a register. */
const sdisp = (d: number) => (d < 0 ? `-0x${(-d).toString(16)}` : `+0x${d.toString(16)}`);

type PlainMem = { base?: Reg64; index?: Reg64; scale?: 1 | 2 | 4 | 8; disp?: number };

/** A memory operand in objdump's Intel syntax (it prints disp8 = 0 as +0x0 and omits the disp of mod = 00). */
function memText(m: PlainMem): string {
  const disp = m.disp ?? 0;
  if (!m.base && !m.index) return `ds:${hx(disp)}`;
  const index = m.index ? `${m.index}*${m.scale ?? 1}` : '';
  const regs = m.base ? (index ? `${m.base}+${index}` : m.base) : index;
  const forcedDisp = !m.base || m.base === 'rbp' || m.base === 'r13';
  return `[${regs}${disp !== 0 || forcedDisp ? sdisp(disp) : ''}]`;
}

// ---- cases ------------------------------------------------------------------------

/** Expected disassembly of one instruction; a function gets the address where the case starts. */
type Dis = string | ((start: number) => string);

type Case = {
  /** Intel-syntax text (as objdump prints it); statements separated by ';'. */
  text: string;
  build: (a: Asm) => unknown;
  /** Source for GNU as when it is not `text` (labels, branch targets, data directives). */
  gas?: string;
  /** Expected disassembly when it is not the statements of `text`. */
  dis?: Dis[];
  /** Data rather than code: compared with as, not disassembled. */
  data?: boolean;
  origin?: number;
};

const groups = new Map<string, Case[]>();
function group(name: string, cases: Case[]): void {
  groups.set(name, cases);
}
const c = (text: string, build: (a: Asm) => unknown, more: Partial<Case> = {}): Case => ({ text, build, ...more });

const IMMS = [0, 1, 0x7f, -1, -0x80, 0x80, -0x81, 0x1234, 0x7fffffff, -0x80000000];

// Register-register and register-immediate arithmetic.
const ALU_OPS = ['add', 'or', 'adc', 'sbb', 'and', 'sub', 'xor', 'cmp'] as const;
group(
  'alu',
  ALU_OPS.flatMap((op) => [
    ...R64.map((r, i) => c(`${op} ${r}, ${R64[(i * 5 + 3) % 16]}`, (a) => a[op](r, R64[(i * 5 + 3) % 16]!))),
    ...R64.flatMap((r) => IMMS.map((v) => c(`${op} ${r}, ${hx(v)}`, (a) => a[op](r, v)))),
  ]),
);
group('test', [
  ...R64.map((r, i) => c(`test ${r}, ${R64[15 - i]}`, (a) => a.test(r, R64[15 - i]!))),
  ...R64.flatMap((r) => IMMS.map((v) => c(`test ${r}, ${hx(v)}`, (a) => a.test(r, v)))),
]);
group(
  'mov reg',
  R64.flatMap((d) => R64.map((s) => c(`mov ${d}, ${s}`, (a) => a.mov(d, s)))),
);

const MOV_IMMS: (number | bigint)[] = [
  0,
  1,
  0x7fffffff,
  0x80000000,
  0xffffffff,
  0x100000000,
  -1,
  -0x80000000,
  -0x80000001,
  0x123456789abcdef0n,
  0xffffffffffffffffn,
  0x8000000000000000n,
  -(2n ** 63n),
];
/** The form movImm must pick: mov r32 (zero-extends), mov r64 with simm32, or movabs. */
function movImmText(r: Reg64, v: number | bigint): string {
  const u = BigInt.asUintN(64, BigInt(v));
  if (u < 2n ** 32n) return `mov ${sub(r, 4)}, ${hx(u)}`;
  const s = BigInt.asIntN(64, u);
  if (s >= -(2n ** 31n) && s < 2n ** 31n) return `mov ${r}, ${hx(u)}`;
  return `movabs ${r}, ${hx(u)}`;
}
group(
  'movImm',
  R64.flatMap((r) => MOV_IMMS.map((v) => c(movImmText(r, v), (a) => a.movImm(r, v)))),
);

const SHIFT_OPS = ['rol', 'ror', 'rcl', 'rcr', 'shl', 'shr', 'sar'] as const;
group(
  'shift',
  SHIFT_OPS.flatMap((op) =>
    R64.flatMap((r) => [
      c(`${op} ${r}, 1`, (a) => a[op](r, 1)),
      c(`${op} ${r}, cl`, (a) => a[op](r, 'cl')),
      c(`${op} ${r}, 0x0`, (a) => a[op](r, 0)),
      c(`${op} ${r}, 0xc`, (a) => a[op](r, 12)),
      c(`${op} ${r}, 0x3f`, (a) => a[op](r, 63)),
    ]),
  ),
);

const UNARY_OPS = ['inc', 'dec', 'neg', 'not'] as const;
group(
  'unary',
  UNARY_OPS.flatMap((op) => R64.map((r) => c(`${op} ${r}`, (a) => a[op](r)))),
);

const BT_OPS = ['bt', 'bts', 'btr', 'btc'] as const;
group(
  'bit test',
  BT_OPS.flatMap((op) =>
    R64.flatMap((r, i) => [
      c(`${op} ${r}, 0x0`, (a) => a[op](r, 0)),
      c(`${op} ${r}, 0x3f`, (a) => a[op](r, 63)),
      c(`${op} ${r}, ${R64[(i + 7) % 16]}`, (a) => a[op](r, R64[(i + 7) % 16]!)),
    ]),
  ),
);

group('push/pop', [
  ...R64.map((r) => c(`push ${r}`, (a) => a.push(r))),
  ...R64.map((r) => c(`pop ${r}`, (a) => a.pop(r))),
  ...IMMS.map((v) => c(`push ${hx(v)}`, (a) => a.push(v))),
  c('pushf', (a) => a.pushfq()),
  c('popf', (a) => a.popfq()),
]);

// Memory operands: every base, no base, index registers with the special encodings, all
// scales, and displacements on each side of the disp8/disp32 boundaries.
const BASES: (Reg64 | undefined)[] = [undefined, ...R64];
const INDEXES: { index?: Reg64; scale?: 1 | 2 | 4 | 8 }[] = [
  {},
  { index: 'rax' },
  { index: 'rax', scale: 2 },
  { index: 'rax', scale: 4 },
  { index: 'rax', scale: 8 },
  { index: 'rbp', scale: 1 },
  { index: 'rbp', scale: 8 },
  { index: 'r12', scale: 1 },
  { index: 'r12', scale: 4 },
  { index: 'r13', scale: 2 },
  { index: 'r15', scale: 8 },
  { index: 'rdi', scale: 1 },
];
const DISPS = [0, 1, -1, 0x7f, -0x80, 0x80, -0x81, 0x12345678, 0x7fffffff, -0x80000000];
const ALL_MEMS: PlainMem[] = BASES.flatMap((base) =>
  INDEXES.flatMap((ix) => DISPS.map((disp) => ({ ...(base ? { base } : {}), ...ix, disp }))),
);
group(
  'lea addressing',
  ALL_MEMS.map((m, i) => {
    const dst = R64[i % 16]!;
    return c(`lea ${dst}, ${memText(m)}`, (a) => a.lea(dst, m));
  }),
);

/** A smaller set of memory operands, with every special case, for the other memory forms. */
const MEMS: PlainMem[] = [
  { base: 'rax' },
  { base: 'rsp' },
  { base: 'rbp' },
  { base: 'r12' },
  { base: 'r13' },
  { base: 'r8' },
  { base: 'r15', disp: 0x7f },
  { base: 'rbx', disp: -0x80 },
  { base: 'rcx', disp: 0x80 },
  { base: 'rdx', disp: -0x81 },
  { base: 'rsi', disp: 0x7fffffff },
  { base: 'rdi', disp: -0x80000000 },
  { base: 'rbp', disp: 8 },
  { base: 'r13', disp: 0x1000 },
  { base: 'rsp', disp: 8 },
  { base: 'r12', disp: -8 },
  { base: 'rax', index: 'rbx' },
  { base: 'rbp', index: 'rax', scale: 2 },
  { base: 'r13', index: 'r12', scale: 4, disp: 0x10 },
  { base: 'rsp', index: 'rbp', scale: 8 },
  { base: 'r12', index: 'r13', scale: 1, disp: -0x100 },
  { base: 'r9', index: 'r15', scale: 8, disp: 0x12345678 },
  { index: 'rax', scale: 8 },
  { index: 'r12', scale: 2, disp: 0x1000 },
  { index: 'rbp', disp: -8 },
  { disp: 0x1000 },
  { disp: 0 },
  { disp: -0x80 },
  { disp: 0x7fffffff },
  { disp: -0x80000000 },
];
const SIZES: Size[] = [1, 2, 4, 8];

group(
  'load',
  SIZES.flatMap((size) =>
    MEMS.map((m, i) => {
      const dst = R64[(i * 3) % 16]!;
      const text =
        size < 4
          ? `movzx ${sub(dst, 4)}, ${PTR[size]} ${memText(m)}`
          : `mov ${sub(dst, size)}, ${PTR[size]} ${memText(m)}`;
      return c(text, (a) => a.load(size, dst, m));
    }),
  ),
);
group(
  'store',
  SIZES.flatMap((size) =>
    MEMS.flatMap((m, i) =>
      [R64[i % 16]!, R64[(i + 4) % 16]!].map((src) =>
        c(`mov ${PTR[size]} ${memText(m)}, ${sub(src, size)}`, (a) => a.store(size, m, src)),
      ),
    ),
  ),
);
const STORE_IMMS: Record<Size, number[]> = {
  1: [0, 0x7f, 0xff, -1, -0x80],
  2: [0, 0x1234, 0xffff, -1, -0x8000],
  4: [0, 0x12345678, 0xffffffff, -1, -0x80000000],
  8: [0, 1, -1, 0x7fffffff, -0x80000000],
};
group(
  'storeImm',
  SIZES.flatMap((size) =>
    MEMS.flatMap((m, i) => {
      const imms = STORE_IMMS[size];
      return [imms[i % imms.length]!, imms[(i + 2) % imms.length]!].map((v) =>
        c(`mov ${PTR[size]} ${memText(m)}, ${hx(v, size === 8 ? 64 : size * 8)}`, (a) => a.storeImm(size, m, v)),
      );
    }),
  ),
);
group('indirect branch', [
  ...R64.flatMap((r) => [c(`jmp ${r}`, (a) => a.jmp(r)), c(`call ${r}`, (a) => a.call(r))]),
  ...MEMS.flatMap((m) => [
    c(`jmp QWORD PTR ${memText(m)}`, (a) => a.jmp(m)),
    c(`call QWORD PTR ${memText(m)}`, (a) => a.call(m)),
  ]),
]);
group(
  'descriptor tables',
  MEMS.flatMap((m) => [
    c(`lgdt ${memText(m)}`, (a) => a.lgdt(m)),
    c(`lidt ${memText(m)}`, (a) => a.lidt(m)),
    c(`sgdt ${memText(m)}`, (a) => a.sgdt(m)),
    c(`sidt ${memText(m)}`, (a) => a.sidt(m)),
    c(`invlpg BYTE PTR ${memText(m)}`, (a) => a.invlpg(m)),
  ]),
);

// rip-relative operands: the displacement counts from the end of the instruction,
// including any immediate that follows it.
const ripDis = (text: string, len: number, target: number) => (s: number) =>
  `${text.replace('$', sdisp(target - len))} # ${hx(s + target)}`;
group('rip-relative', [
  c('lea rax, [rip+0x1]', (a) => a.lea('rax', { rip: 't' }).nop().label('t'), {
    gas: 'lea rax, [rip+1f]; nop; 1:',
    dis: [ripDis('lea rax,[rip$]', 7, 8), 'nop'],
  }),
  c('lea r13, [rip+0x11]', (a) => a.lea('r13', { rip: 't', disp: 0x10 }).nop().label('t'), {
    gas: 'lea r13, [rip+1f+0x10]; nop; 1:',
    dis: [ripDis('lea r13,[rip$]', 7, 0x18), 'nop'],
  }),
  c('lea rax, [rip-0x8]', (a) => a.label('t').nop().lea('rax', { rip: 't', disp: -1 }), {
    gas: '1: nop; lea rax, [rip+1b-1]',
    dis: ['nop', (s) => `lea rax,[rip+0xfffffffffffffff7] # ${hx(s - 1)}`],
  }),
  c('mov rcx, QWORD PTR [rip+0x0]', (a) => a.load(8, 'rcx', { rip: 't' }).label('t'), {
    gas: 'mov rcx, QWORD PTR [rip+1f]; 1:',
    dis: [ripDis('mov rcx,QWORD PTR [rip$]', 7, 7)],
  }),
  c('movzx r9d, BYTE PTR [rip]', (a) => a.load(1, 'r9', { rip: 't' }).label('t'), {
    gas: 'movzx r9d, BYTE PTR [rip+1f]; 1:',
    dis: [ripDis('movzx r9d,BYTE PTR [rip$]', 8, 8)],
  }),
  c('mov BYTE PTR [rip], sil', (a) => a.store(1, { rip: 't' }, 'rsi').label('t'), {
    gas: 'mov BYTE PTR [rip+1f], sil; 1:',
    dis: [ripDis('mov BYTE PTR [rip$],sil', 7, 7)],
  }),
  c('mov DWORD PTR [rip], imm', (a) => a.storeImm(4, { rip: 't' }, 5).label('t'), {
    gas: 'mov DWORD PTR [rip+1f], 0x5; 1:',
    dis: [ripDis('mov DWORD PTR [rip$],0x5', 10, 10)],
  }),
  c('mov WORD PTR [rip], imm', (a) => a.storeImm(2, { rip: 't' }, 0x1234).label('t'), {
    gas: 'mov WORD PTR [rip+1f], 0x1234; 1:',
    dis: [ripDis('mov WORD PTR [rip$],0x1234', 9, 9)],
  }),
  c('mov QWORD PTR [rip], imm', (a) => a.label('t').storeImm(8, { rip: 't', disp: 8 }, -1), {
    gas: '1: mov QWORD PTR [rip+1b+8], -1',
    dis: [(s) => `mov QWORD PTR [rip+0xfffffffffffffffd],0xffffffffffffffff # ${hx(s + 8)}`],
  }),
  c('jmp QWORD PTR [rip]', (a) => a.jmp({ rip: 't' }).label('t').u64(0), {
    gas: 'jmp QWORD PTR [rip+1f]; 1: .quad 0',
    dis: [
      ripDis('jmp QWORD PTR [rip$]', 6, 6),
      'add BYTE PTR [rax],al',
      'add BYTE PTR [rax],al',
      'add BYTE PTR [rax],al',
      'add BYTE PTR [rax],al',
    ],
  }),
  c('lgdt [rip]', (a) => a.lgdt({ rip: 't' }).label('t'), {
    gas: 'lgdt [rip+1f]; 1:',
    dis: [ripDis('lgdt [rip$]', 7, 7)],
  }),
  c('invlpg [rip]', (a) => a.invlpg({ rip: 't' }).label('t'), {
    gas: 'invlpg BYTE PTR [rip+1f]; 1:',
    dis: [ripDis('invlpg BYTE PTR [rip$]', 7, 7)],
  }),
]);

// Branches to labels are always rel32 ({disp32} makes as do the same); loop/jrcxz are rel8.
const CONDS: Cond[] = ['o', 'no', 'b', 'ae', 'e', 'ne', 'be', 'a', 's', 'ns', 'p', 'np', 'l', 'ge', 'le', 'g'];
const to = (mnemonic: string, offset: number) => (s: number) => `${mnemonic} ${hx(s + offset)}`;
group('branches', [
  c('jmp forward', (a) => a.jmp('t').nop().label('t'), { gas: '{disp32} jmp 1f; nop; 1:', dis: [to('jmp', 6), 'nop'] }),
  c('jmp backward', (a) => a.label('t').nop().jmp('t'), { gas: '1: nop; {disp32} jmp 1b', dis: ['nop', to('jmp', 0)] }),
  c('jmp self', (a) => a.label('t').jmp('t'), { gas: '1: {disp32} jmp 1b', dis: [to('jmp', 0)] }),
  c('call forward', (a) => a.call('t').int3().label('t'), { gas: 'call 1f; int3; 1:', dis: [to('call', 6), 'int3'] }),
  c('call backward', (a) => a.label('t').ret().call('t'), { gas: '1: ret; call 1b', dis: ['ret', to('call', 0)] }),
  ...CONDS.flatMap((cc) => [
    c(`j${cc} forward`, (a) => a.jcc(cc, 't').nop().label('t'), {
      gas: `{disp32} j${cc} 1f; nop; 1:`,
      dis: [to(`j${cc}`, 7), 'nop'],
    }),
    c(`j${cc} backward`, (a) => a.label('t').hlt().jcc(cc, 't'), {
      gas: `1: hlt; {disp32} j${cc} 1b`,
      dis: ['hlt', to(`j${cc}`, 0)],
    }),
  ]),
  c('jz alias', (a) => a.jcc('z', 't').label('t'), { gas: '{disp32} je 1f; 1:', dis: [to('je', 6)] }),
  c('loop backward', (a) => a.label('t').dec('rax').loop('t'), {
    gas: '1: dec rax; loop 1b',
    dis: ['dec rax', to('loop', 0)],
  }),
  c('loop forward', (a) => a.loop('t').nop().label('t'), { gas: 'loop 1f; nop; 1:', dis: [to('loop', 3), 'nop'] }),
  c('jrcxz', (a) => a.jrcxz('t').nop().label('t'), { gas: 'jrcxz 1f; nop; 1:', dis: [to('jrcxz', 3), 'nop'] }),
  c('ret', (a) => a.ret()),
]);

// Absolute label addresses depend on the origin.
group('label addresses', [
  c('movabs rax, 0x10000a', (a) => a.movLabel('rax', 't').label('t'), { origin: 0x100000 }),
  c(
    'nop; nop; nop; nop; movabs r15, 0x7fff0000000e',
    (a) => a.nop().nop().nop().nop().movLabel('r15', 't').label('t'),
    {
      origin: 0x7fff00000000,
    },
  ),
  c('mov eax, 0x200005', (a) => a.movLabel('rax', 't', 32).label('t'), { origin: 0x200000 }),
  c('mov r11d, 0xfffffff6', (a) => a.label('t').movLabel('r11', 't', 32), { origin: 0xfffffff6 }),
  c('label table', (a) => a.u64Label('t').label('t'), { origin: 0x1000, gas: '.quad 0x1008', data: true }),
]);

group('system', [
  ...([0, 2, 3, 4, 8] as const).flatMap((cr) =>
    R64.flatMap((r, i) =>
      i % 5 === cr % 5 || r === 'r15' || r === 'rax'
        ? [c(`mov cr${cr}, ${r}`, (a) => a.movToCr(cr, r)), c(`mov ${r}, cr${cr}`, (a) => a.movFromCr(r, cr))]
        : [],
    ),
  ),
  ...(['ds', 'es', 'ss', 'fs', 'gs'] as const).flatMap((s) =>
    (['rax', 'rdi', 'r8', 'r15'] as const).map((r) => c(`mov ${s}, ${sub(r, 4)}`, (a) => a.movToSeg(s, r))),
  ),
  ...(['cs', 'ds', 'es', 'ss', 'fs', 'gs'] as const).flatMap((s) =>
    (['rcx', 'r12'] as const).map((r) => c(`mov ${sub(r, 4)}, ${s}`, (a) => a.movFromSeg(r, s))),
  ),
  ...R64.flatMap((r) => [c(`ltr ${sub(r, 2)}`, (a) => a.ltr(r)), c(`lldt ${sub(r, 2)}`, (a) => a.lldt(r))]),
  ...([1, 2, 4] as const).flatMap((size) => {
    const acc = sub('rax', size);
    return [
      c(`in ${acc}, 0x60`, (a) => a.in(size, 0x60)),
      c(`in ${acc}, 0xff`, (a) => a.in(size, 0xff)),
      c(`in ${acc}, dx`, (a) => a.in(size, 'dx')),
      c(`out 0x80, ${acc}`, (a) => a.out(size, 0x80)),
      c(`out 0x0, ${acc}`, (a) => a.out(size, 0)),
      c(`out dx, ${acc}`, (a) => a.out(size, 'dx')),
    ];
  }),
  c('int 0x0', (a) => a.int(0)),
  c('int 0x80', (a) => a.int(0x80)),
  c('int 0xff', (a) => a.int(0xff)),
  // as writes `int 3` as int3 (CC); the encoder keeps CD 03, a software interrupt.
  c('int 0x3', (a) => a.int(3), { gas: '.byte 0xcd, 0x03' }),
  ...SIZES.flatMap((size) => {
    const dst = `${PTR[size]} es:[rdi]`;
    return [
      c(`rep stos ${dst}, ${sub('rax', size)}`, (a) => a.repStos(size)),
      c(`rep movs ${dst}, ${PTR[size]} ds:[rsi]`, (a) => a.repMovs(size)),
    ];
  }),
  ...(
    [
      ['nop', (a) => a.nop()],
      ['hlt', (a) => a.hlt()],
      ['cli', (a) => a.cli()],
      ['sti', (a) => a.sti()],
      ['cld', (a) => a.cld()],
      ['std', (a) => a.std()],
      ['int3', (a) => a.int3()],
      ['iretq', (a) => a.iretq()],
      ['ud2', (a) => a.ud2()],
      ['cpuid', (a) => a.cpuid()],
      ['rdmsr', (a) => a.rdmsr()],
      ['wrmsr', (a) => a.wrmsr()],
      ['rdtsc', (a) => a.rdtsc()],
      ['rdtscp', (a) => a.rdtscp()],
      ['pause', (a) => a.pause()],
      ['lfence', (a) => a.lfence()],
      ['mfence', (a) => a.mfence()],
      ['sfence', (a) => a.sfence()],
      ['stac', (a) => a.stac()],
      ['clac', (a) => a.clac()],
      ['rdpkru', (a) => a.rdpkru()],
      ['wrpkru', (a) => a.wrpkru()],
      ['swapgs', (a) => a.swapgs()],
      ['xgetbv', (a) => a.xgetbv()],
      ['xsetbv', (a) => a.xsetbv()],
      ['wbinvd', (a) => a.wbinvd()],
      ['clts', (a) => a.clts()],
      ['syscall', (a) => a.syscall()],
      ['vmcall', (a) => a.vmcall()],
    ] as [string, (a: Asm) => unknown][]
  ).map(([text, build]) => c(text, build)),
]);

group('data', [
  c('bytes', (a) => a.bytes([0, 1, 0x7f, 0x80, 0xff]), { gas: '.byte 0, 1, 0x7f, 0x80, 0xff', data: true }),
  c('bytes from Uint8Array', (a) => a.bytes(new Uint8Array([0xde, 0xad])), { gas: '.byte 0xde, 0xad', data: true }),
  c('u8', (a) => a.u8(0xab).u8(-1), { gas: '.byte 0xab, 0xff', data: true }),
  c('u16', (a) => a.u16(0x1234).u16(0xffff).u16(-2), { gas: '.word 0x1234, 0xffff, 0xfffe', data: true }),
  c('u32', (a) => a.u32(0x12345678).u32(0xffffffff).u32(-0x80000000), {
    gas: '.long 0x12345678, 0xffffffff, 0x80000000',
    data: true,
  }),
  c(
    'u64',
    (a) =>
      a
        .u64(0x123456789abcdef0n)
        .u64(-1)
        .u64(2 ** 53 - 1),
    {
      gas: '.quad 0x123456789abcdef0, 0xffffffffffffffff, 0x1fffffffffffff',
      data: true,
    },
  ),
  c('ascii', (a) => a.ascii('Hello, guest!\n'), { gas: '.ascii "Hello, guest!\\n"', data: true }),
]);

// Control case: the naive encoding of [r13] (mod = 00, which means [rip+disp32]) must be caught.
const WRONG: Case = c('mov rax, QWORD PTR [r13+0x0]', (a) => a.bytes([0x49, 0x8b, 0x05, 0, 0, 0, 0]));

// ---- running binutils once for all cases ---------------------------------------------

const ALL: Case[] = [...[...groups.values()].flat(), WRONG];
const CODE: Case[] = ALL.filter((k) => !k.data);

const statements = (s: string) =>
  s
    .split(';')
    .map((x) => x.trim())
    .filter((x) => x !== '');
/** The text with objdump's `ds:ADDR` written `[ADDR]` (as warns about a segment on lea). */
const gasSource = (k: Case) =>
  k.gas ??
  statements(k.text)
    .map((x) => x.replace(/ds:(0x[0-9a-f]+)/, '[$1]'))
    .join('\n');
const normalize = (s: string) => s.replace(/\s+/g, ' ').replace(/ ?, ?/g, ',').trim();

function encode(k: Case): Uint8Array {
  const a = new Asm({ origin: k.origin ?? 0 });
  k.build(a);
  return a.assemble().code;
}

function run(tool: string, args: string[]): string {
  const r = spawnSync(tool, args, { encoding: 'utf8', maxBuffer: 256 * 1024 * 1024 });
  if (r.error) {
    const code = (r.error as NodeJS.ErrnoException).code;
    throw new Error(
      code === 'ENOENT'
        ? `GNU binutils is required for the encoder tests but '${tool}' was not found; install binutils (e.g. apt-get install binutils)`
        : `${tool}: ${r.error.message}`,
    );
  }
  if (r.status !== 0) throw new Error(`${tool} ${args.join(' ')} failed (${r.status}):\n${r.stderr}`);
  return r.stdout + r.stderr;
}

type Insn = { offset: number; text: string };

/** Parse `objdump -d` output into instructions (continuation lines hold only bytes). */
function parseObjdump(out: string): Insn[] {
  const insns: Insn[] = [];
  for (const line of out.split('\n')) {
    const m = /^\s*([0-9a-f]+):\t[0-9a-f]{2}(?: [0-9a-f]{2})*\s*(?:\t(.*))?$/.exec(line);
    if (m?.[2]) insns.push({ offset: parseInt(m[1]!, 16), text: normalize(m[2]) });
  }
  return insns;
}

let tmp = '';
/** Bytes as assembled for each case. */
const gasBytes = new Map<Case, Uint8Array>();
let gasWarnings = '';
/** objdump's view of the encoder's bytes for each code case. */
const disasm = new Map<Case, { start: number; insns: Insn[]; startsOnBoundary: boolean }>();

/** Assemble all cases with as, and disassemble the encoder's output for them with objdump. */
function runBinutils(): void {
  tmp = mkdtempSync(join(tmpdir(), 'asm-test-'));
  for (const tool of ['as', 'nm', 'objcopy', 'objdump']) run(tool, ['--version']);

  // 1. as: every case between the symbols c<i> and c<i+1>.
  const as = assembleCases(run, tmp, ['.intel_syntax noprefix', '.code64', '.text'], ALL.map(gasSource), ['--64']);
  gasWarnings = as.warnings;
  ALL.forEach((k, i) => gasBytes.set(k, as.bytes[i]!));

  // 2. objdump: the encoder's output for all code cases, back to back.
  const { file, ranges, total } = encodeAll(tmp, CODE, encode);
  const insns = parseObjdump(run('objdump', ['-D', '-z', '-b', 'binary', '-m', 'i386:x86-64', '-M', 'intel', file]));
  const offsets = new Set(insns.map((x) => x.offset));
  CODE.forEach((k, i) => {
    const [start, end] = ranges[i]!;
    disasm.set(k, {
      start,
      insns: insns.filter((x) => x.offset >= start && x.offset < end),
      startsOnBoundary: offsets.has(start) && (end === total || offsets.has(end)),
    });
  });
}

/** Differences between the encoder and as for these cases. */
const byteMismatches = (cases: Case[]): string[] => asMismatches(cases, gasBytes, encode);

/** Differences between objdump's reading of the encoder's bytes and the case texts. */
function disasmMismatches(cases: Case[]): string[] {
  return cases.flatMap((k) => {
    const d = disasm.get(k)!;
    const want = (k.dis ?? statements(k.text)).map((x) => normalize(typeof x === 'function' ? x(d.start) : x));
    const got = d.insns.map((x) => x.text);
    const problems: string[] = [];
    if (!d.startsOnBoundary) problems.push(`${k.text}: instruction boundary does not match the case boundary`);
    if (JSON.stringify(want) !== JSON.stringify(got))
      problems.push(`${k.text}: objdump says ${JSON.stringify(got)}, expected ${JSON.stringify(want)}`);
    return problems;
  });
}

describe('against GNU binutils', () => {
  beforeAll(runBinutils, 120_000);
  afterAll(() => {
    if (tmp) rmSync(tmp, { recursive: true, force: true });
  });

  describeComparisons(groups, {
    warnings: () => gasWarnings,
    byteMismatches,
    disasmMismatches,
    disassembled: (k) => !k.data,
  });

  describe('the comparison catches a wrong encoding', () => {
    it('reports the naive [r13] encoding against as', () => {
      expect(byteMismatches([WRONG])).toEqual([
        'mov rax, QWORD PTR [r13+0x0]: as 49 8b 45 00 | encoder 49 8b 05 00 00 00 00',
      ]);
    });
    it('reports it against objdump too', () => {
      expect(disasmMismatches([WRONG])).toEqual([
        'mov rax, QWORD PTR [r13+0x0]: objdump says ["mov rax,QWORD PTR [rip+0x0] # 0x' +
          `${(disasm.get(WRONG)!.start + 7).toString(16)}"], expected ["mov rax,QWORD PTR [r13+0x0]"]`,
      ]);
    });
  });
});

// ---- unit tests --------------------------------------------------------------------

const bytesOf = (build: (a: Asm) => unknown, origin = 0) => {
  const a = new Asm({ origin });
  build(a);
  return hexBytes(a.assemble().code);
};

describe('label fix-ups', () => {
  it('patches forward and backward rel32 branches relative to the end of the instruction', () => {
    const a = new Asm();
    a.label('top').jmp('end').call('fn').jcc('ne', 'top').label('fn').ret().label('end').hlt();
    const { code, labels } = a.assemble();
    expect(hexBytes(code)).toBe(
      [
        'e9 0c 00 00 00', // jmp end: 0x11 - 0x05
        'e8 06 00 00 00', // call fn: 0x10 - 0x0a
        '0f 85 f0 ff ff ff', // jne top: 0x00 - 0x10
        'c3',
        'f4',
      ].join(' '),
    );
    expect([...labels]).toEqual([
      ['top', 0],
      ['fn', 0x10],
      ['end', 0x11],
    ]);
  });

  it('patches loop rel8 and rejects targets out of rel8 range', () => {
    expect(bytesOf((a) => a.label('l').nop().loop('l'))).toBe('90 e2 fd');
    const far = new Asm().label('l').bytes(new Uint8Array(127)).loop('l');
    expect(() => far.assemble()).toThrow(/label 'l' out of range: rel8 displacement -0x81/);
    expect(hexBytes(new Asm().label('l').bytes(new Uint8Array(126)).loop('l').assemble().code.subarray(126))).toBe(
      'e2 80',
    );
  });

  it('computes rip-relative displacements from the end of the instruction, after any immediate', () => {
    expect(bytesOf((a) => a.lea('rax', { rip: 'd' }).label('d'))).toBe('48 8d 05 00 00 00 00');
    expect(bytesOf((a) => a.label('d').lea('rax', { rip: 'd', disp: 4 }))).toBe('48 8d 05 fd ff ff ff');
    // 4-byte immediate after the displacement: the target is 10 bytes back from the end.
    expect(bytesOf((a) => a.label('d').storeImm(4, { rip: 'd' }, 1))).toBe('c7 05 f6 ff ff ff 01 00 00 00');
    expect(bytesOf((a) => a.label('d').storeImm(1, { rip: 'd' }, 1))).toBe('c6 05 f9 ff ff ff 01');
  });

  it('rip-relative displacements do not depend on the origin', () => {
    const build = (a: Asm) => a.lea('rdi', { rip: 'msg' }).hlt().label('msg').ascii('hi');
    expect(bytesOf(build, 0)).toBe(bytesOf(build, 0xffff_0000_1000));
  });

  it('movLabel gives the absolute address origin + offset, 64- or 32-bit', () => {
    expect(bytesOf((a) => a.nop().label('x').movLabel('rdx', 'x'), 0x40_0000)).toBe('90 48 ba 01 00 40 00 00 00 00 00');
    expect(bytesOf((a) => a.movLabel('r9', 'x', 32).label('x'), 0x7000)).toBe('41 b9 06 70 00 00');
    expect(() => new Asm({ origin: 0xffff_fffe }).movLabel('rax', 'x', 32).label('x').assemble()).toThrow(
      /label 'x' out of range: 32-bit address 0x100000003/,
    );
  });

  it('labels map holds absolute addresses; size() and repeated assemble() are consistent', () => {
    const a = new Asm({ origin: 0x1000 }).nop().label('a').jmp('b').label('b');
    expect(a.size()).toBe(6);
    expect(a.pc).toBe(0x1006);
    const r1 = a.assemble(),
      r2 = a.assemble();
    expect(r1.labels.get('a')).toBe(0x1001);
    expect(r1.labels.get('b')).toBe(0x1006);
    expect(hexBytes(r1.code)).toBe(hexBytes(r2.code));
    expect(r1.code).not.toBe(r2.code);
  });

  it('u64Label stores absolute addresses (pointer tables)', () => {
    expect(bytesOf((a) => a.u64Label('e').label('e'), 0x1234_5678_9000)).toBe('08 90 78 56 34 12 00 00');
  });

  it('align pads the address, not the offset, with the fill byte', () => {
    expect(bytesOf((a) => a.nop().align(4), 0x1000)).toBe('90 90 90 90');
    expect(bytesOf((a) => a.align(16, 0xcc), 0x100d)).toBe('cc cc cc');
    expect(bytesOf((a) => a.align(8, 0), 0x2000)).toBe('');
    const a = new Asm({ origin: 0x3001 }).align(0x1000, 0).label('page');
    expect(a.assemble().labels.get('page')).toBe(0x4000);
  });

  it('fills pages with rep stosq / copies with rep movsb', () => {
    expect(bytesOf((a) => a.movImm('rcx', 512).xor('rax', 'rax').repStos(8))).toBe('b9 00 02 00 00 48 31 c0 f3 48 ab');
    expect(bytesOf((a) => a.repMovs(1))).toBe('f3 a4');
  });
});

describe('absolute and rip-relative memory forms', () => {
  it('encodes an absolute address as SIB with no base and no index', () => {
    expect(bytesOf((a) => a.load(8, 'rax', { disp: 0x1000 }))).toBe('48 8b 04 25 00 10 00 00');
    expect(bytesOf((a) => a.store(4, { disp: -4 }, 'r8'))).toBe('44 89 04 25 fc ff ff ff');
    expect(bytesOf((a) => a.lgdt({}))).toBe('0f 01 14 25 00 00 00 00');
  });

  it('encodes rip-relative as mod=00 rm=101', () => {
    expect(bytesOf((a) => a.load(8, 'r12', { rip: 'x' }).label('x'))).toBe('4c 8b 25 00 00 00 00');
  });

  it('keeps the CD 03 form for int(3)', () => {
    expect(bytesOf((a) => a.int(3).int3())).toBe('cd 03 cc');
  });
});

describe('errors name the problem', () => {
  const bad = (build: (a: Asm) => unknown) => () => build(new Asm());
  const cast = <T>(x: unknown) => x as T;

  it('labels', () => {
    expect(() => new Asm().jmp('nowhere').assemble()).toThrow("unknown label 'nowhere'");
    expect(() => new Asm().lea('rax', { rip: 'data' }).assemble()).toThrow("unknown label 'data'");
    expect(() => new Asm().movLabel('rax', 'x').assemble()).toThrow("unknown label 'x'");
    expect(bad((a) => a.label('x').nop().label('x'))).toThrow("duplicate label 'x'");
    expect(bad((a) => a.label('rax'))).toThrow("label name 'rax' is a register name");
    expect(bad((a) => a.label(''))).toThrow('label name must be a non-empty string');
    expect(bad((a) => a.jcc(cast<Cond>('zz'), 'x'))).toThrow("unknown condition 'zz'");
  });

  it('registers', () => {
    expect(bad((a) => a.mov(cast<Reg64>('eax'), 'rbx'))).toThrow("unknown register 'eax'");
    expect(bad((a) => a.add('rax', cast<Reg64>('r16')))).toThrow("unknown register 'r16'");
    expect(bad((a) => a.load(8, 'rax', { base: cast<Reg64>('ebx') }))).toThrow("unknown register 'ebx'");
    expect(bad((a) => a.movToCr(cast<0>(1), 'rax'))).toThrow('invalid control register cr1');
    expect(bad((a) => a.movToSeg(cast<'ds'>('cs'), 'rax'))).toThrow("invalid segment register 'cs'");
  });

  it('memory operands', () => {
    expect(bad((a) => a.lea('rax', { base: 'rax', index: 'rsp' }))).toThrow('rsp cannot be an index register');
    expect(bad((a) => a.lea('rax', { base: 'rax', index: 'rbx', scale: cast<1>(3) }))).toThrow('invalid scale 3');
    expect(bad((a) => a.lea('rax', { base: 'rax', scale: 2 }))).toThrow('scale 2 given without an index register');
    expect(bad((a) => a.lea('rax', { base: 'rax', disp: 0x8000_0000 }))).toThrow(
      'displacement 0x80000000 out of range',
    );
    expect(bad((a) => a.lea('rax', { disp: 1.5 }))).toThrow('displacement 1.5 is not an integer');
    expect(bad((a) => a.lea('rax', cast<Mem>({ rip: 'x', base: 'rax' })))).toThrow(
      'rip-relative operand cannot also have a base',
    );
    expect(bad((a) => a.lgdt(cast<Mem>('rax')))).toThrow('lgdt takes a memory operand');
  });

  it('immediates', () => {
    expect(bad((a) => a.add('rax', 0x8000_0000))).toThrow('immediate 0x80000000 out of range -0x80000000..0x7fffffff');
    expect(bad((a) => a.test('rbx', -0x8000_0001))).toThrow('immediate -0x80000001 out of range');
    expect(bad((a) => a.push(0x8000_0000))).toThrow('immediate 0x80000000 out of range');
    expect(bad((a) => a.movImm('rax', 2n ** 64n))).toThrow('immediate 0x10000000000000000 out of range');
    expect(bad((a) => a.movImm('rax', 2 ** 53))).toThrow('not an integer in the safe range (use a bigint)');
    expect(bad((a) => a.storeImm(1, { base: 'rax' }, 0x100))).toThrow('1-byte store immediate 0x100 out of range');
    expect(bad((a) => a.storeImm(8, { base: 'rax' }, 0xffff_ffff))).toThrow(
      '8-byte store immediate 0xffffffff out of range',
    );
    expect(bad((a) => a.shl('rax', 64))).toThrow('shift count 0x40 out of range 0x0..0x3f');
    expect(bad((a) => a.bts('rax', -1))).toThrow('bit index -0x1 out of range');
    expect(bad((a) => a.int(256))).toThrow('interrupt vector 0x100 out of range');
    expect(bad((a) => a.in(1, 0x100))).toThrow('port 0x100 out of range');
    expect(bad((a) => a.u16(0x10000))).toThrow('u16 value 0x10000 out of range');
    expect(bad((a) => a.bytes([1, 256]))).toThrow('byte 1 0x100 out of range');
  });

  it('sizes and other arguments', () => {
    expect(bad((a) => a.in(cast<1>(8), 'dx'))).toThrow('in: invalid size 8 (expected 1, 2, 4)');
    expect(bad((a) => a.load(cast<1>(3), 'rax', {}))).toThrow('load: invalid size 3');
    expect(bad((a) => a.movLabel('rax', 'x', cast<32>(16)))).toThrow('movLabel: invalid width 16');
    expect(bad((a) => a.align(3))).toThrow('align: 3 is not a power of two');
    expect(bad((a) => a.ascii('é'))).toThrow('ascii: non-ASCII character at index 0');
    expect(() => new Asm({ origin: -1 })).toThrow('origin -1 must be a non-negative safe integer');
  });
});

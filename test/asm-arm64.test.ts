/**
 * The AArch64 encoder checked against GNU binutils for aarch64.
 *
 * Every case pairs an encoder call with its assembly text, written the way
 * `aarch64-linux-gnu-objdump` prints it (with the canonical source for as
 * where objdump prints an alias as would not pick back, or where branch
 * targets are labels). The sources of all cases are assembled by
 * aarch64-linux-gnu-as in one batch (each case between its own pair of
 * symbols) and the bytes of each case are compared with the encoder's.
 * Separately, the encoder's output for all cases is disassembled by objdump
 * in one run and every instruction is compared with the case's text.
 *
 * Without the cross binutils the comparison is skipped with the reason, except
 * under KVMHARNESS_REQUIRE_KVM=1 (CI), where it fails.
 */
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  A64,
  SYSREG_NAMES,
  SYSREG_READONLY,
  type Cond,
  type Label,
  type SysReg,
  type SysRegEncoding,
} from '../src/arch/arm64/asm.js';
import { mulberry32 } from '../src/model/prng.js';
import {
  assembleCases,
  byteMismatches as asMismatches,
  describeComparisons,
  encodeAll,
  hexBytes,
} from './support/binutils.js';

// ---- register names and immediates as the disassembler prints them ---------------

/** Register n of the 64-bit (sf) or 32-bit view; 31 is the zero register or sp. */
const R = (n: number, sf = true, r31: 'zr' | 'sp' = 'zr') =>
  n !== 31 ? `${sf ? 'x' : 'w'}${n}` : r31 === 'sp' ? (sf ? 'sp' : 'wsp') : sf ? 'xzr' : 'wzr';
const hx = (v: number | bigint, bits = 64) => `0x${BigInt.asUintN(bits, BigInt(v)).toString(16)}`;

/** A sample of registers with the special ones: 0, 30 (lr) and 31. */
const REGS = [0, 1, 2, 7, 8, 15, 16, 17, 18, 28, 29, 30, 31];
/** A different register from REGS for a second or third operand. */
const other = (r: number, k: number) => REGS[(REGS.indexOf(r) + k) % REGS.length]!;
const SFS = [true, false];

// ---- cases ------------------------------------------------------------------------

/** Expected disassembly of one instruction; a function gets the byte offset where the case starts. */
type Dis = string | ((start: number) => string);

type Case = {
  /** objdump's text; statements separated by ';'. */
  text: string;
  build: (a: A64) => unknown;
  /** Source for as when it is not `text`. */
  gas?: string;
  /** Expected disassembly when it is not the statements of `text`. */
  dis?: Dis[];
  base?: bigint;
};

const groups = new Map<string, Case[]>();
function group(name: string, cases: Case[]): void {
  groups.set(name, cases);
}
const c = (text: string, build: (a: A64) => unknown, more: Partial<Case> = {}): Case => ({ text, build, ...more });

type Wide = 'movz' | 'movn' | 'movk';
type Shift = 0 | 16 | 32 | 48;

/**
 * A move-wide instruction: the canonical source and objdump's text, which is
 * the `mov` alias with the resulting value except for movk, for a zero
 * immediate with a shift, and for a 32-bit movn of 0xffff.
 */
function wide(op: Wide, rd: number, imm: number, shift: Shift, sf = true): { gas: string; dis: string } {
  const bits = sf ? 64 : 32;
  const lsl = shift ? `, lsl #${shift}` : '';
  const gas = `${op} ${R(rd, sf)}, #${hx(imm)}${lsl}`;
  const value = BigInt(imm) << BigInt(shift);
  const alias = op !== 'movk' && !(imm === 0 && shift !== 0) && !(op === 'movn' && !sf && imm === 0xffff);
  return { gas, dis: alias ? `mov ${R(rd, sf)}, #${hx(op === 'movn' ? ~value : value, bits)}` : gas };
}

const WIDE_IMMS = [0, 1, 0x1234, 0x7fff, 0x8000, 0xffff];
group(
  'move wide',
  (['movz', 'movn', 'movk'] as const).flatMap((op) =>
    SFS.flatMap((sf) =>
      REGS.flatMap((rd, i) =>
        ((sf ? [0, 16, 32, 48] : [0, 16]) as Shift[]).flatMap((shift) =>
          [WIDE_IMMS[i % 6]!, WIDE_IMMS[(i + 3) % 6]!, 0, 0xffff].map((imm) => {
            const w = wide(op, rd, imm, shift, sf);
            return c(w.dis, (a) => a[op](rd, imm, shift, sf), { gas: w.gas });
          }),
        ),
      ),
    ),
  ),
);

/** mov64 values and the sequences it must pick (fewest instructions; movz on a tie). */
const MOV64: [bigint | number, [Wide, number, Shift][]][] = [
  [0, [['movz', 0, 0]]],
  [1, [['movz', 1, 0]]],
  [0xffff, [['movz', 0xffff, 0]]],
  [0x10000, [['movz', 1, 16]]],
  [
    0x12345678,
    [
      ['movz', 0x5678, 0],
      ['movk', 0x1234, 16],
    ],
  ],
  [
    0xdeadbeef,
    [
      ['movz', 0xbeef, 0],
      ['movk', 0xdead, 16],
    ],
  ],
  [
    0xffffffff,
    [
      ['movz', 0xffff, 0],
      ['movk', 0xffff, 16],
    ],
  ],
  [0x100000000, [['movz', 1, 32]]],
  [0x4000_0000_0000n, [['movz', 0x4000, 32]]],
  [
    0x1234_0000_0000_5678n,
    [
      ['movz', 0x5678, 0],
      ['movk', 0x1234, 48],
    ],
  ],
  [
    0x123456789abcdef0n,
    [
      ['movz', 0xdef0, 0],
      ['movk', 0x9abc, 16],
      ['movk', 0x5678, 32],
      ['movk', 0x1234, 48],
    ],
  ],
  [0x8000000000000000n, [['movz', 0x8000, 48]]],
  [-(2n ** 63n), [['movz', 0x8000, 48]]],
  [0x7fffffffffffffffn, [['movn', 0x8000, 48]]],
  [0xffffffffffffffffn, [['movn', 0, 0]]],
  [-1, [['movn', 0, 0]]],
  [-2, [['movn', 1, 0]]],
  [-0x10000, [['movn', 0xffff, 0]]],
  [
    -0x12345678,
    [
      ['movn', 0x5677, 0],
      ['movk', 0xedcb, 16],
    ],
  ],
  [
    0xffffffff00001234n,
    [
      ['movn', 0xedcb, 0],
      ['movk', 0, 16],
    ],
  ],
  [0xffff1234ffffffffn, [['movn', 0xedcb, 32]]],
  [0x0000ffffffffffffn, [['movn', 0xffff, 48]]],
  [2 ** 53 - 1, [['movn', 0xffe0, 48]]],
  [
    0xffff0000ffff0000n,
    [
      ['movz', 0xffff, 16],
      ['movk', 0xffff, 48],
    ],
  ],
  [
    0x0000ffff0000ffffn,
    [
      ['movz', 0xffff, 0],
      ['movk', 0xffff, 32],
    ],
  ],
  [
    0xfedcba9876543210n,
    [
      ['movz', 0x3210, 0],
      ['movk', 0x7654, 16],
      ['movk', 0xba98, 32],
      ['movk', 0xfedc, 48],
    ],
  ],
];
group(
  'mov64',
  MOV64.flatMap(([value, seq], i) =>
    [0, 30, 31, REGS[i % REGS.length]!].map((rd) => {
      const ws = seq.map(([op, imm, shift]) => wide(op, rd, imm, shift));
      return c(ws.map((w) => w.dis).join('; '), (a) => a.mov64(rd, value), { gas: ws.map((w) => w.gas).join('\n') });
    }),
  ),
);

group(
  'movReg',
  SFS.flatMap((sf) =>
    REGS.flatMap((rd, i) =>
      [other(rd, 1 + i), 31].map((rm) =>
        c(`mov ${R(rd, sf)}, ${R(rm, sf)}`, (a) => a.movReg(rd, rm, sf), {
          gas: `orr ${R(rd, sf)}, ${R(31, sf)}, ${R(rm, sf)}`,
        }),
      ),
    ),
  ),
);

// Add/subtract (immediate): rd and rn 31 are sp, except subs's rd (the zero register).
const IMM12 = [0, 1, 0x10, 0x7ff, 0xfff];
const imm12Text = (imm: number, sh: boolean) => `#${hx(imm)}${sh ? ', lsl #12' : ''}`;
group(
  'add/sub immediate',
  SFS.flatMap((sf) =>
    REGS.flatMap((rd, i) =>
      [other(rd, 3), 31].flatMap((rn) =>
        [IMM12[i % 5]!, 0, 0xfff].flatMap((imm) =>
          [false, true].flatMap((sh) => {
            const d = R(rd, sf, 'sp'),
              n = R(rn, sf, 'sp'),
              dz = R(rd, sf);
            const src = (op: string, dst: string) => `${op} ${dst}, ${n}, ${imm12Text(imm, sh)}`;
            const addDis = !sh && imm === 0 && (rd === 31 || rn === 31) ? `mov ${d}, ${n}` : src('add', d);
            return [
              c(addDis, (a) => a.addImm(rd, rn, imm, sh, sf), { gas: src('add', d) }),
              c(src('sub', d), (a) => a.subImm(rd, rn, imm, sh, sf)),
              c(
                rd === 31 ? `cmp ${n}, ${imm12Text(imm, sh)}` : src('subs', dz),
                (a) => a.subsImm(rd, rn, imm, sh, sf),
                { gas: src('subs', dz) },
              ),
            ];
          }),
        ),
      ),
    ),
  ),
);
group(
  'cmp immediate',
  SFS.flatMap((sf) =>
    REGS.flatMap((rn, i) =>
      [IMM12[i % 5]!, 0xfff].map((imm) => c(`cmp ${R(rn, sf, 'sp')}, #${hx(imm)}`, (a) => a.cmpImm(rn, imm, sf))),
    ),
  ),
);

// Shifted-register forms: 31 is the zero register everywhere.
const reg3Dis = (op: string, d: string, n: string, m: string, rd: number, rn: number) => {
  if (op === 'sub' && rn === 31) return `neg ${d}, ${m}`;
  if (op === 'subs' && rd === 31) return `cmp ${n}, ${m}`;
  if (op === 'subs' && rn === 31) return `negs ${d}, ${m}`;
  if (op === 'orr' && rn === 31) return `mov ${d}, ${m}`;
  return `${op} ${d}, ${n}, ${m}`;
};
const REG3_OPS = [
  ['add', 'addReg'],
  ['sub', 'subReg'],
  ['subs', 'subsReg'],
  ['and', 'andReg'],
  ['orr', 'orrReg'],
  ['eor', 'eorReg'],
] as const;
group(
  'register operands',
  REG3_OPS.flatMap(([op, method]) =>
    SFS.flatMap((sf) =>
      REGS.flatMap((rd, i) =>
        [
          [other(rd, 1), other(rd, 2 + i)],
          [31, other(rd, 5)],
          [other(rd, 4), 31],
          [31, 31],
        ].map(([rn, rm]) => {
          const [d, n, m] = [R(rd, sf), R(rn!, sf), R(rm!, sf)];
          return c(reg3Dis(op, d, n, m, rd, rn!), (a) => a[method](rd, rn!, rm!, sf), {
            gas: `${op} ${d}, ${n}, ${m}`,
          });
        }),
      ),
    ),
  ),
);
group(
  'cmp register',
  SFS.flatMap((sf) =>
    REGS.flatMap((rn) =>
      [other(rn, 1), 31].map((rm) => c(`cmp ${R(rn, sf)}, ${R(rm, sf)}`, (a) => a.cmpReg(rn, rm, sf))),
    ),
  ),
);

// lsl #0 is ubfm #0, #width-1, which objdump prints as lsr #0.
group(
  'shift immediate',
  SFS.flatMap((sf) =>
    REGS.flatMap((rd, i) => {
      const [d, n] = [R(rd, sf), R(other(rd, 1 + i), sf)];
      const rn = other(rd, 1 + i);
      return (sf ? [0, 1, 7, 31, 32, 63] : [0, 1, 15, 31]).flatMap((s) => [
        c(`${s === 0 ? 'lsr' : 'lsl'} ${d}, ${n}, #${s}`, (a) => a.lslImm(rd, rn, s, sf), {
          gas: `lsl ${d}, ${n}, #${s}`,
        }),
        c(`lsr ${d}, ${n}, #${s}`, (a) => a.lsrImm(rd, rn, s, sf)),
      ]);
    }),
  ),
);

// Loads and stores: every size, rt 31 = zero register, rn 31 = sp, offsets to the top of the range.
const SIZES = [1, 2, 4, 8] as const;
const ldst = (load: boolean, size: 1 | 2 | 4 | 8) =>
  `${load ? 'ldr' : 'str'}${size === 1 ? 'b' : size === 2 ? 'h' : ''}`;
group(
  'load/store unsigned offset',
  SIZES.flatMap((size) =>
    [true, false].flatMap((load) =>
      REGS.flatMap((rt, i) =>
        [0, size, 8 * size, 0x123 * size, 4095 * size].map((off, k) => {
          const rn = k === 1 ? 31 : other(rt, 1 + i);
          const mem = `[${R(rn, true, 'sp')}${off ? `, #${off}` : ''}]`;
          const text = `${ldst(load, size)} ${R(rt, size === 8)}, ${mem}`;
          return c(text, (a) => (load ? a.ldr(size, rt, rn, off) : a.str(size, rt, rn, off)));
        }),
      ),
    ),
  ),
);
group(
  'load/store register offset',
  SIZES.flatMap((size) =>
    [true, false].flatMap((load) =>
      REGS.flatMap((rt, i) =>
        [
          [other(rt, 1 + i), other(rt, 2)],
          [31, other(rt, 3)],
          [other(rt, 5), 31],
        ].map(([rn, rm]) => {
          const text = `${ldst(load, size)} ${R(rt, size === 8)}, [${R(rn!, true, 'sp')}, ${R(rm!)}]`;
          return c(text, (a) => (load ? a.ldrReg(size, rt, rn!, rm!) : a.strReg(size, rt, rn!, rm!)));
        }),
      ),
    ),
  ),
);

// Label references: the disassembly gives the absolute target (offset in the output).
const CONDS: Cond[] = [
  'eq',
  'ne',
  'cs',
  'hs',
  'cc',
  'lo',
  'mi',
  'pl',
  'vs',
  'vc',
  'hi',
  'ls',
  'ge',
  'lt',
  'gt',
  'le',
  'al',
];
/** objdump's name for each condition (it prints cs for hs and cc for lo). */
const condName = (cc: Cond) => (cc === 'hs' ? 'cs' : cc === 'lo' ? 'cc' : cc);
const to = (text: string, offset: number) => (s: number) => `${text}0x${(s + offset).toString(16)}`;
const nops = (n: number) => new Array<string>(n).fill('nop');

/** One label-taking instruction, with its as text (target `%`) and its build. */
type RefInsn = { name: string; gas: string; dis: string; build: (a: A64, l: Label) => unknown };
const REFS: RefInsn[] = [
  { name: 'b', gas: 'b %', dis: 'b ', build: (a, l) => a.b(l) },
  { name: 'bl', gas: 'bl %', dis: 'bl ', build: (a, l) => a.bl(l) },
  ...CONDS.map((cc): RefInsn => ({
    name: `b.${cc}`,
    gas: `b.${cc} %`,
    dis: `b.${condName(cc)} `,
    build: (a, l) => a.bCond(cc, l),
  })),
  ...[0, 17, 30, 31].flatMap((r) =>
    SFS.flatMap((sf): RefInsn[] => [
      {
        name: `cbz ${R(r, sf)}`,
        gas: `cbz ${R(r, sf)}, %`,
        dis: `cbz ${R(r, sf)}, `,
        build: (a, l) => a.cbz(r, l, sf),
      },
      {
        name: `cbnz ${R(r, sf)}`,
        gas: `cbnz ${R(r, sf)}, %`,
        dis: `cbnz ${R(r, sf)}, `,
        build: (a, l) => a.cbnz(r, l, sf),
      },
      {
        name: `ldr ${R(r, sf)}`,
        gas: `ldr ${R(r, sf)}, %`,
        dis: `ldr ${R(r, sf)}, `,
        build: (a, l) => a.ldrLiteral(r, l, sf),
      },
    ]),
  ),
  ...[0, 9, 30, 31].map((r): RefInsn => ({
    name: `adr ${R(r)}`,
    gas: `adr ${R(r)}, %`,
    dis: `adr ${R(r)}, `,
    build: (a, l) => a.adr(r, l),
  })),
];
const at = (r: RefInsn, target: string) => r.gas.replace('%', target);
group(
  'label references',
  REFS.flatMap((r) => [
    c(
      `${r.name} forward`,
      (a) => {
        const l = a.label();
        r.build(a, l);
        a.nop().nop().bind(l);
      },
      { gas: `${at(r, '1f')}; nop; nop; 1:`, dis: [to(r.dis, 12), 'nop', 'nop'] },
    ),
    c(
      `${r.name} backward`,
      (a) => {
        const l = a.here();
        a.nop().nop().nop();
        r.build(a, l);
      },
      { gas: `1: nop; nop; nop; ${at(r, '1b')}`, dis: ['nop', 'nop', 'nop', to(r.dis, 0)] },
    ),
    c(`${r.name} self`, (a) => r.build(a, a.here()), { gas: `1: ${at(r, '1b')}`, dis: [to(r.dis, 0)] }),
    c(
      `${r.name} next`,
      (a) => {
        const l = a.label();
        r.build(a, l);
        a.bind(l);
      },
      { gas: `${at(r, '1f')}; 1:`, dis: [to(r.dis, 4)] },
    ),
  ]),
);

/**
 * The edges of the ±1 MiB range of b.cond, cbz, cbnz, ldr (literal) and adr, both
 * ways: each instruction refers to its own label exactly -1 MiB or +1 MiB - 4
 * away. b and bl, whose range is ±128 MiB, take the same distances.
 */
const FAR = REFS.filter((r) =>
  ['b', 'bl', 'b.ne', 'cbz x17', 'cbnz w30', 'ldr x0', 'ldr wzr', 'adr x9'].includes(r.name),
);
const MIB = 1 << 20;
group('label references at the edge of range', [
  c(
    'backward -1 MiB',
    (a) => {
      const ls = FAR.map(() => {
        const l = a.here();
        a.nop();
        return l;
      });
      while (a.offset < MIB) a.nop();
      FAR.forEach((r, i) => r.build(a, ls[i]!));
    },
    {
      gas: [
        ...FAR.map((_, i) => `.Lfar_b${i}: nop`),
        `.fill ${MIB / 4 - FAR.length}, 4, 0xd503201f`,
        ...FAR.map((r, i) => at(r, `.Lfar_b${i}`)),
      ].join('\n'),
      dis: [...nops(MIB / 4), ...FAR.map((r, i) => to(r.dis, 4 * i))],
    },
  ),
  c(
    'forward +1 MiB - 4',
    (a) => {
      const ls = FAR.map(() => a.label());
      FAR.forEach((r, i) => r.build(a, ls[i]!));
      while (a.offset < MIB - 4) a.nop();
      for (const l of ls) a.bind(l).nop();
    },
    {
      gas: [
        ...FAR.map((r, i) => at(r, `.Lfar_f${i}`)),
        `.fill ${MIB / 4 - 1 - FAR.length}, 4, 0xd503201f`,
        ...FAR.map((_, i) => `.Lfar_f${i}: nop`),
      ].join('\n'),
      dis: [...FAR.map((r, i) => to(r.dis, MIB - 4 + 4 * i)), ...nops(MIB / 4 - 1)],
    },
  ),
]);

group(
  'register branches',
  [0, 1, 15, 29, 30, 31]
    .flatMap((r) => [
      c(`br ${R(r)}`, (a) => a.br(r)),
      c(`blr ${R(r)}`, (a) => a.blr(r)),
      c(r === 30 ? 'ret' : `ret ${R(r)}`, (a) => a.ret(r)),
    ])
    .concat([c('ret', (a) => a.ret())]),
);

group(
  'exceptions',
  [0, 1, 0x1234, 0x8000, 0xffff].flatMap((imm) => [
    c(`hvc #${hx(imm)}`, (a) => a.hvc(imm)),
    c(`svc #${hx(imm)}`, (a) => a.svc(imm)),
    c(`brk #${hx(imm)}`, (a) => a.brk(imm)),
  ]),
);

group('system', [
  c('nop', (a) => a.nop()),
  c('wfi', (a) => a.wfi()),
  c('isb', (a) => a.isb()),
  c('dsb sy', (a) => a.dsbSy()),
  c('dmb sy', (a) => a.dmbSy()),
  c('eret', (a) => a.eret()),
  c('tlbi vmalle1', (a) => a.tlbiVmalle1()),
  c('msr sctlr_el1, x0; isb; tlbi vmalle1; dsb sy; isb', (a) =>
    a.msr('SCTLR_EL1', 0).isb().tlbiVmalle1().dsbSy().isb(),
  ),
]);

const REQUIRED_NAMES = [
  'SCTLR_EL1',
  'TTBR0_EL1',
  'TTBR1_EL1',
  'TCR_EL1',
  'MAIR_EL1',
  'VBAR_EL1',
  'ESR_EL1',
  'FAR_EL1',
  'ELR_EL1',
  'SPSR_EL1',
  'CURRENTEL',
  'MPIDR_EL1',
  'CNTVCT_EL0',
  'DAIF',
  'SP_EL0',
];
const RAW: [SysRegEncoding, string][] = [
  [{ op0: 3, op1: 0, crn: 15, crm: 2, op2: 0 }, 's3_0_c15_c2_0'],
  [{ op0: 3, op1: 7, crn: 15, crm: 15, op2: 7 }, 's3_7_c15_c15_7'],
  [{ op0: 2, op1: 0, crn: 0, crm: 0, op2: 0 }, 's2_0_c0_c0_0'],
  [{ op0: 3, op1: 0, crn: 1, crm: 0, op2: 0 }, 'sctlr_el1'],
  [{ op0: 3, op1: 3, crn: 14, crm: 0, op2: 2 }, 'cntvct_el0'],
];
group('system registers', [
  ...SYSREG_NAMES.flatMap((name, i) => {
    const reg = name.toLowerCase();
    const [rt, rt2] = [REGS[i % REGS.length]!, 31 - (i % 3)];
    return [
      c(`mrs ${R(rt)}, ${reg}`, (a) => a.mrs(rt, name)),
      c(`mrs ${R(rt2)}, ${reg}`, (a) => a.mrs(rt2, name)),
      ...(SYSREG_READONLY.includes(name)
        ? []
        : [c(`msr ${reg}, ${R(rt)}`, (a) => a.msr(name, rt)), c(`msr ${reg}, ${R(rt2)}`, (a) => a.msr(name, rt2))]),
    ];
  }),
  ...RAW.flatMap(([e, name]) => [
    c(`mrs x3, ${name}`, (a) => a.mrs(3, e)),
    ...(name === 'cntvct_el0' ? [] : [c(`msr ${name}, x30`, (a) => a.msr(e, 30))]),
  ]),
]);

group('raw words', [
  c('nop', (a) => a.word(0xd503201f), { gas: '.inst 0xd503201f' }),
  c('ret', (a) => a.word(-0x29a0fc40), { gas: '.inst 0xd65f03c0' }),
  c('udf #0', (a) => a.word(0), { gas: '.inst 0' }),
  c('word 0xffffffff', (a) => a.word(0xffffffff), { gas: '.inst 0xffffffff', dis: ['.inst 0xffffffff ; undefined'] }),
  c('word -1', (a) => a.word(-1), { gas: '.inst 0xffffffff', dis: ['.inst 0xffffffff ; undefined'] }),
  c('b self', (a) => a.word(0x14000000), { gas: '.inst 0x14000000', dis: [to('b ', 0)] }),
]);

// A guest-like program: the base does not change pc-relative encodings.
group('program', [
  c(
    'exception vector and hvc loop',
    (a) => {
      const vectors = a.label('vectors'),
        loop = a.label('loop'),
        data = a.label('data');
      a.adr(0, vectors).msr('VBAR_EL1', 0).isb();
      a.mov64(1, 0x4000_1000)
        .ldrLiteral(2, data)
        .bind(loop)
        .ldr(8, 3, 1, 8)
        .addImm(3, 3, 1)
        .str(8, 3, 1, 8)
        .cmpImm(3, 10)
        .bCond('lo', loop)
        .hvc(0)
        .b(loop)
        .bind(data)
        .word(0xdeadbeef)
        .word(0)
        .bind(vectors)
        .eret();
    },
    {
      base: 0x4000_0000n,
      gas:
        'adr x0, 3f; msr vbar_el1, x0; isb; movz x1, #0x1000; movk x1, #0x4000, lsl #16; ldr x2, 2f\n' +
        '1: ldr x3, [x1, #8]; add x3, x3, #1; str x3, [x1, #8]; cmp x3, #10; b.lo 1b; hvc #0; b 1b\n' +
        '2: .inst 0xdeadbeef, 0\n3: eret',
      dis: [
        to('adr x0, ', 60),
        'msr vbar_el1, x0',
        'isb',
        'mov x1, #0x1000',
        'movk x1, #0x4000, lsl #16',
        to('ldr x2, ', 52),
        'ldr x3, [x1, #8]',
        'add x3, x3, #0x1',
        'str x3, [x1, #8]',
        'cmp x3, #0xa',
        to('b.cc ', 24),
        'hvc #0x0',
        to('b ', 24),
        '.inst 0xdeadbeef ; undefined',
        'udf #0',
        'eret',
      ],
    },
  ),
]);

// Control case: a wrong encoding (add with the ADD immediate opcode's sf bit clear) must be caught.
const WRONG: Case = c('add x0, x1, #0x10', (a) => a.word(0x11004020));

// ---- running binutils once for all cases ---------------------------------------------

const ALL: Case[] = [...[...groups.values()].flat(), WRONG];

const statements = (s: string) =>
  s
    .split(/[;\n]/)
    .map((x) => x.trim())
    .filter((x) => x !== '');
/** objdump's text without its trailing comment, spaces collapsed and none after commas. */
const normalize = (s: string) =>
  s
    .replace(/\s*\/\/.*$/, '')
    .replace(/\s+/g, ' ')
    .replace(/ ?, ?/g, ',')
    .trim();

function encode(k: Case): Buffer {
  const a = new A64(k.base ?? 0n);
  k.build(a);
  return a.bytes();
}

const PREFIX = 'aarch64-linux-gnu-';
const TOOLS = ['as', 'nm', 'objcopy', 'objdump'];

function run(tool: string, args: string[]): string {
  const r = spawnSync(PREFIX + tool, args, { encoding: 'utf8', maxBuffer: 512 * 1024 * 1024 });
  if (r.error) throw new Error(`${PREFIX}${tool}: ${r.error.message}`);
  if (r.status !== 0) throw new Error(`${PREFIX}${tool} ${args.join(' ')} failed (${r.status}):\n${r.stderr}`);
  return r.stdout + r.stderr;
}

/** Why the binutils comparison cannot run here, or undefined when it can. */
const binutilsMissing: string | undefined = (() => {
  for (const tool of TOOLS) {
    const r = spawnSync(PREFIX + tool, ['--version'], { encoding: 'utf8' });
    if (r.error || r.status !== 0) {
      return `${PREFIX}${tool} not found; install GNU binutils for aarch64 (apt-get install binutils-aarch64-linux-gnu)`;
    }
  }
  return undefined;
})();

type Insn = { offset: number; text: string };

/** Parse `objdump -d` output of an aarch64 binary into instructions. */
function parseObjdump(out: string): Insn[] {
  const insns: Insn[] = [];
  for (const line of out.split('\n')) {
    const m = /^\s*([0-9a-f]+):\t[0-9a-f]{8} \t(.*)$/.exec(line);
    if (m) insns.push({ offset: parseInt(m[1]!, 16), text: normalize(m[2]!) });
  }
  return insns;
}

let tmp = '';
/** Bytes as assembled for each case. */
const gasBytes = new Map<Case, Uint8Array>();
let gasWarnings = '';
/** objdump's view of the encoder's bytes for each case. */
const disasm = new Map<Case, { start: number; insns: Insn[] }>();

/** Assemble all cases with as, and disassemble the encoder's output for them with objdump. */
function runBinutils(): void {
  tmp = mkdtempSync(join(tmpdir(), 'asm-arm64-test-'));

  // 1. as: every case between the symbols c<i> and c<i+1>.
  const as = assembleCases(
    run,
    tmp,
    ['.text'],
    ALL.map((k) => statements(k.gas ?? k.text).join('\n')),
  );
  gasWarnings = as.warnings;
  ALL.forEach((k, i) => gasBytes.set(k, as.bytes[i]!));

  // 2. objdump: the encoder's output for all cases, back to back.
  const { file, ranges } = encodeAll(tmp, ALL, encode);
  const insns = parseObjdump(run('objdump', ['-D', '-z', '-b', 'binary', '-m', 'aarch64', file]));
  let j = 0;
  ALL.forEach((k, i) => {
    const [start, end] = ranges[i]!;
    const mine: Insn[] = [];
    while (j < insns.length && insns[j]!.offset < end) mine.push(insns[j++]!);
    disasm.set(k, { start, insns: mine });
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
    if (want.length === got.length && want.every((w, i) => w === got[i])) return [];
    const i = want.findIndex((w, n) => w !== got[n]);
    const first = i < 0 ? want.length : i;
    return [
      `${k.text}: objdump says ${JSON.stringify(got.slice(first, first + 4))} at instruction ${first} of ${got.length}, ` +
        `expected ${JSON.stringify(want.slice(first, first + 4))} of ${want.length}`,
    ];
  });
}

if (binutilsMissing && process.env.KVMHARNESS_REQUIRE_KVM === '1') {
  describe('AArch64 encoder against GNU binutils', () => {
    it('has the aarch64 binutils (KVMHARNESS_REQUIRE_KVM=1)', () => {
      throw new Error(`the aarch64 encoder check is required here: ${binutilsMissing}`);
    });
  });
} else {
  // The default reporter does not list skipped suites, so the reason also goes to stderr.
  if (binutilsMissing) console.warn(`asm-arm64: skipping the comparison with GNU binutils: ${binutilsMissing}`);
  const suite = binutilsMissing ? describe.skip : describe;
  const title = binutilsMissing
    ? `AArch64 encoder against GNU binutils [skipped: ${binutilsMissing}]`
    : 'AArch64 encoder against GNU binutils';
  suite(title, () => {
    beforeAll(runBinutils, 120_000);
    afterAll(() => {
      if (tmp) rmSync(tmp, { recursive: true, force: true });
    });

    describeComparisons(groups, { warnings: () => gasWarnings, byteMismatches, disasmMismatches });

    describe('the comparison catches a wrong encoding', () => {
      it('reports a 32-bit add against as', () => {
        expect(byteMismatches([WRONG])).toEqual(['add x0, x1, #0x10: as 20 40 00 91 | encoder 20 40 00 11']);
      });
      it('reports it against objdump too', () => {
        expect(disasmMismatches([WRONG])).toEqual([
          'add x0, x1, #0x10: objdump says ["add w0,w1,#0x10"] at instruction 0 of 1, expected ["add x0,x1,#0x10"] of 1',
        ]);
      });
    });
  });
}

// ---- unit tests --------------------------------------------------------------------

const words = (build: (a: A64) => unknown, base: bigint | number = 0n) => {
  const a = new A64(base);
  build(a);
  const b = a.bytes();
  return Array.from({ length: b.length / 4 }, (_, i) =>
    b
      .readUInt32LE(i * 4)
      .toString(16)
      .padStart(8, '0'),
  ).join(' ');
};

describe('mov64 picks the shortest sequence', () => {
  /** Run a move-wide sequence on a 64-bit register. */
  function execute(code: Buffer): { value: bigint; count: number } {
    let x = 0n;
    for (let i = 0; i < code.length; i += 4) {
      const w = code.readUInt32LE(i);
      expect(w >>> 31, 'sf').toBe(1);
      const opc = (w >>> 29) & 3,
        hw = BigInt(16 * ((w >>> 21) & 3)),
        imm = BigInt((w >>> 5) & 0xffff);
      if (opc === 2)
        x = imm << hw; // movz
      else if (opc === 0)
        x = BigInt.asUintN(64, ~(imm << hw)); // movn
      else if (opc === 3 && i > 0)
        x = (x & ~(0xffffn << hw)) | (imm << hw); // movk
      else throw new Error(`unexpected word ${w.toString(16)} at ${i}`);
    }
    return { value: x, count: code.length / 4 };
  }

  it('loads every value of a seeded sample of 16-bit chunk patterns in max(1, 4 - max(#0x0000, #0xffff)) instructions', () => {
    const next = mulberry32(12345);
    const rand = () => next() >>> 16;
    const kinds = [() => 0, () => 0xffff, () => rand(), () => rand() & 0xff, () => 0x8000];
    for (let n = 0; n < 5000; n++) {
      const chunks = [0, 1, 2, 3].map(() => kinds[rand() % kinds.length]!());
      const v = chunks.reduce((acc, ch, i) => acc | (BigInt(ch) << BigInt(16 * i)), 0n);
      const best = Math.max(
        1,
        4 - Math.max(chunks.filter((ch) => ch === 0).length, chunks.filter((ch) => ch === 0xffff).length),
      );
      const a = new A64().mov64(n % 31, n % 2 ? v : BigInt.asIntN(64, v));
      const got = execute(a.bytes());
      expect(got.value, hx(v)).toBe(v);
      expect(got.count, hx(v)).toBe(best);
    }
  });

  it('takes numbers and bigints alike', () => {
    expect(words((a) => a.mov64(5, -5))).toBe(words((a) => a.mov64(5, 0xfffffffffffffffbn)));
    expect(words((a) => a.mov64(5, 2 ** 53 - 1))).toBe(words((a) => a.mov64(5, 2n ** 53n - 1n)));
  });
});

describe('labels', () => {
  it('patches forward references in bytes() and encodes bound ones at once', () => {
    const a = new A64();
    const top = a.here('top'),
      end = a.label('end');
    a.b(end).bCond('ne', top).cbz(3, end).adr(4, top).bind(end).ret();
    const b = a.bytes();
    expect(hexBytes(b)).toBe(hexBytes(a.bytes()));
    expect(b).not.toBe(a.bytes());
    expect(Array.from({ length: 5 }, (_, i) => b.readUInt32LE(i * 4).toString(16))).toEqual([
      '14000004', // b +16
      '54ffffe1', // b.ne -4
      'b4000043', // cbz x3, +8
      '10ffffa4', // adr x4, -12
      'd65f03c0',
    ]);
  });

  it('offset counts bytes; labelAddress is base + offset', () => {
    const a = new A64(0x4000_0000n);
    expect(a.offset).toBe(0);
    const start = a.here();
    a.nop().nop();
    const l = a.label();
    expect(a.offset).toBe(8);
    a.nop().bind(l);
    expect(a.labelAddress(start)).toBe(0x4000_0000n);
    expect(a.labelAddress(l)).toBe(0x4000_000cn);
    const b = new A64(0xffff_ffff_ffff_f000n);
    b.nop();
    expect(b.labelAddress(b.here())).toBe(0xffff_ffff_ffff_f004n);
  });

  it('pc-relative encodings do not depend on the base', () => {
    const build = (a: A64) => {
      const d = a.label();
      a.adr(0, d).ldrLiteral(1, d).b(d).bind(d).word(7);
    };
    expect(words(build, 0)).toBe(words(build, 0xffff_0000_1000n));
  });

  it('names the unbound label and where it is used', () => {
    const a = new A64();
    a.nop().bl(a.label('handler'));
    expect(() => a.bytes()).toThrow(new Error("bytes: label 'handler' is not bound (used by bl at offset 0x4)"));
    const b = new A64();
    b.cbnz(0, b.label());
    expect(() => b.bytes()).toThrow("bytes: label 'L0' is not bound (used by cbnz at offset 0x0)");
    expect(() => b.labelAddress(b.label('x'))).toThrow("labelAddress: label 'x' is not bound");
  });

  it('binds once, and only its own labels', () => {
    const a = new A64();
    const l = a.here('l');
    a.nop();
    expect(() => a.bind(l)).toThrow("bind: label 'l' is already bound at offset 0x0");
    const foreign = new A64().here('f');
    expect(() => a.b(foreign)).toThrow("b: label 'f' was not made by this assembler");
    expect(() => a.bind(foreign)).toThrow("bind: label 'f' was not made by this assembler");
    expect(() => a.labelAddress(foreign)).toThrow("labelAddress: label 'f' was not made by this assembler");
  });
});

describe('errors name the instruction and the value', () => {
  const bad = (build: (a: A64) => unknown) => () => build(new A64());
  const cast = <T>(x: unknown) => x as T;
  const range = (build: (a: A64) => unknown, message: string) => {
    expect(bad(build)).toThrow(RangeError);
    expect(bad(build)).toThrow(message);
  };

  it('registers', () => {
    range((a) => a.movz(32, 0), 'movz: register rd 32 out of range 0..31');
    range((a) => a.addReg(0, -1, 2), 'add: register rn -1 out of range 0..31');
    range((a) => a.cmpReg(1, 40), 'cmp: register rm 40 out of range 0..31');
    range((a) => a.ldr(8, 1.5, 0), 'ldr: register rt 1.5 is not an integer');
    range((a) => a.strReg(4, 0, 0, 99), 'str: register rm 99 out of range');
    range((a) => a.ret(32), 'ret: register rn 32 out of range');
    range((a) => a.br(-1), 'br: register rn -1 out of range');
    range((a) => a.mrs(33, 'DAIF'), 'mrs: register rt 33 out of range');
    range((a) => a.movReg(0, 31.5), 'mov: register rn 31.5 is not an integer');
    range((a) => a.mov64(31 + 1, 0), 'mov64: register rd 32 out of range');
    range((a) => a.cbz(32, a.here()), 'cbz: register rt 32 out of range');
    range((a) => a.movz(cast<number>('x0'), 0), 'movz: register rd x0 is not an integer');
  });

  it('immediates', () => {
    range((a) => a.movz(0, 0x10000), 'movz: imm16 0x10000 out of range 0x0..0xffff');
    range((a) => a.movk(0, -1), 'movk: imm16 -0x1 out of range 0x0..0xffff');
    range((a) => a.movn(0, 0.5), 'movn: imm16 0.5 is not an integer');
    range((a) => a.movz(0, 1, cast<0>(8)), 'movz: shift 8 is not 0, 16, 32 or 48');
    range((a) => a.movk(0, 1, 32, false), 'movk: shift 32 needs the 64-bit form (sf)');
    range((a) => a.mov64(0, 2n ** 64n), 'mov64: value 0x10000000000000000 out of range');
    range((a) => a.mov64(0, -(2n ** 63n) - 1n), 'mov64: value -0x8000000000000001 out of range');
    range(
      (a) => a.mov64(0, 2 ** 53),
      'mov64: value 9007199254740992 is not an integer in the safe range (use a bigint)',
    );
    range((a) => a.addImm(0, 1, 0x1000), 'add: imm12 0x1000 out of range 0x0..0xfff');
    range((a) => a.subImm(0, 1, -1), 'sub: imm12 -0x1 out of range');
    range((a) => a.subsImm(0, 1, 4096, true), 'subs: imm12 0x1000 out of range');
    range((a) => a.cmpImm(0, 0x1000), 'cmp: imm12 0x1000 out of range');
    range((a) => a.addImm(0, 1, 1, cast<boolean>(1)), 'add: shift12 must be true or false, got 1');
    range((a) => a.lslImm(0, 1, 64), 'lsl: shift 64 out of range 0..63');
    range((a) => a.lslImm(0, 1, 32, false), 'lsl: shift 32 out of range 0..31');
    range((a) => a.lsrImm(0, 1, -1), 'lsr: shift -1 out of range 0..63');
    range((a) => a.hvc(0x10000), 'hvc: imm16 0x10000 out of range 0x0..0xffff');
    range((a) => a.svc(-1), 'svc: imm16 -0x1 out of range');
    range((a) => a.brk(1.5), 'brk: imm16 1.5 is not an integer');
    range((a) => a.word(2 ** 32), 'word: value 0x100000000 out of range -0x80000000..0xffffffff');
    range((a) => a.word(-(2 ** 31) - 1), 'word: value -0x80000001 out of range');
    range((a) => a.addReg(0, 1, 2, cast<boolean>('yes')), 'add: sf must be true or false, got yes');
  });

  it('load/store offsets and sizes', () => {
    range((a) => a.ldr(8, 0, 1, 4), 'ldr: offset 0x4 is not a multiple of 8');
    range((a) => a.ldr(8, 0, 1, 0x8000), 'ldr: offset 0x8000 out of range 0x0..0x7ff8');
    range((a) => a.str(4, 0, 1, -4), 'str: offset -0x4 out of range 0x0..0x3ffc');
    range((a) => a.ldr(2, 0, 1, 3), 'ldrh: offset 0x3 is not a multiple of 2');
    range((a) => a.str(1, 0, 1, 0x1000), 'strb: offset 0x1000 out of range 0x0..0xfff');
    range((a) => a.ldr(cast<1>(3), 0, 1), 'ldr: size 3 is not 1, 2, 4 or 8');
    range((a) => a.strReg(cast<1>(16), 0, 1, 2), 'str: size 16 is not 1, 2, 4 or 8');
  });

  it('conditions and system registers', () => {
    range((a) => a.bCond(cast<Cond>('nv'), a.here()), "b.cond: unknown condition 'nv'");
    range((a) => a.bCond(cast<Cond>('toString'), a.here()), "b.cond: unknown condition 'toString'");
    for (const name of ['CURRENTEL', 'MPIDR_EL1', 'CNTVCT_EL0'] as const) {
      range((a) => a.msr(name, 0), `msr: system register ${name} is read-only`);
      expect(bad((a) => a.mrs(0, name))).not.toThrow();
    }
    range((a) => a.msr(cast<SysReg>('sctlr_el1'), 0), "msr: unknown system register 'sctlr_el1'");
    range((a) => a.mrs(0, cast<SysReg>('HCR_EL2')), "mrs: unknown system register 'HCR_EL2'");
    range((a) => a.mrs(0, cast<SysReg>(5)), 'mrs: system register 5 is neither a name nor {op0, op1, crn, crm, op2}');
    range((a) => a.msr({ op0: cast<3>(1), op1: 0, crn: 0, crm: 0, op2: 0 }, 0), 'msr: op0 1 out of range 2..3');
    range((a) => a.msr({ op0: 3, op1: 8, crn: 0, crm: 0, op2: 0 }, 0), 'msr: op1 8 out of range 0..7');
    range((a) => a.mrs(0, { op0: 3, op1: 0, crn: 16, crm: 0, op2: 0 }), 'mrs: crn 16 out of range 0..15');
    range((a) => a.mrs(0, { op0: 3, op1: 0, crn: 0, crm: -1, op2: 0 }), 'mrs: crm -1 out of range 0..15');
    range((a) => a.mrs(0, { op0: 3, op1: 0, crn: 0, crm: 0, op2: 9 }), 'mrs: op2 9 out of range 0..7');
    for (const name of REQUIRED_NAMES) expect(SYSREG_NAMES).toContain(name);
  });

  it('branch targets out of range, at the call for bound labels and in bytes() for forward ones', () => {
    const far = (build: (a: A64, l: Label) => unknown, gap: number) => {
      const a = new A64();
      const back = a.here('back');
      for (let i = 0; i < gap / 4; i++) a.nop();
      return () => build(a, back);
    };
    // One word further back than -1 MiB.
    expect(far((a, l) => a.bCond('eq', l), MIB + 4)).toThrow(
      new RangeError("b.eq: label 'back' at offset -0x100004 from the instruction, out of range -0x100000..0xffffc"),
    );
    expect(far((a, l) => a.cbz(0, l), MIB + 4)).toThrow(RangeError);
    expect(far((a, l) => a.cbnz(0, l, false), MIB + 4)).toThrow("cbnz: label 'back' at offset -0x100004");
    expect(far((a, l) => a.ldrLiteral(0, l), MIB + 4)).toThrow("ldr: label 'back' at offset -0x100004");
    expect(far((a, l) => a.adr(0, l), MIB + 4)).toThrow(
      "adr: label 'back' at offset -0x100004 from the instruction, out of range -0x100000..0xfffff",
    );
    expect(far((a, l) => a.bCond('eq', l), MIB)).not.toThrow();
    expect(far((a, l) => a.b(l).bl(l), MIB + 4)).not.toThrow();

    // +1 MiB forward: emitting is fine, bytes() throws.
    const a = new A64();
    const fwd = a.label('fwd');
    a.bCond('hs', fwd);
    while (a.offset < MIB) a.nop();
    a.bind(fwd);
    expect(() => a.bytes()).toThrow(
      new RangeError("b.hs: label 'fwd' at offset 0x100000 from the instruction, out of range -0x100000..0xffffc"),
    );
  });

  it('base', () => {
    expect(() => new A64(2)).toThrow(new RangeError('A64: base 0x2 is not 4-byte aligned'));
    expect(() => new A64(-4)).toThrow(new RangeError('A64: base -0x4 out of range 0x0..0xffffffffffffffff'));
    expect(() => new A64(2n ** 64n)).toThrow(RangeError);
    expect(() => new A64(2 ** 53)).toThrow(
      'A64: base 9007199254740992 is not an integer in the safe range (use a bigint)',
    );
  });
});

// The guest that runs access-matrix batches: one KVM_RUN per batch, many cases
// per batch, each case with its own GVA, PDE and page table.
//
// Guest-physical layout (above the bring-up's identity-mapped 4 MiB unless noted):
//   LAYOUT.code      the batch program and the lean #PF handler (identity-mapped, supervisor)
//   LAYOUT.userCode  the CPL 3 access stubs (identity-mapped, user)
//   HEADER           one page (identity-mapped): +0 the batch's first record, +8 CR0,
//                    +16 CR4, +24 EFER, +32 PKRU; +0x40 a scratch quadword; +0x800 the
//                    iret frames into ring 3 (read, write, fetch)
//   records(b)       one 48-byte record per case, buffer b = 0/1 (identity-mapped)
//   data(b)          2 MiB: case i's data quadword at data(b) + 8i; 2 MiB leaves map all of it
//   tables(b)        a PDPT, PD pages, and one page table per case position; identity-
//                    mapped with 2 MiB pages so that the guest can write the entries
// Two buffers let the host prepare batch k+1 while the guest runs batch k.
//
// Case i of a batch in buffer b, whose PDE is the c-th of its group g (g = 1 when
// the PDPTE is read-only):
//   gva = (1 + b) << 39 | (256g + c/512) << 30 | (c % 512) << 21 | 8i
//   PML4E[1 + b] -> PDPT(b); PDPTE[256g + c/512] -> PD(b, g, c/512), A set (never written);
//   PDE -> PT(b, i) or a 2 MiB leaf at data(b); PTE at PT(b, i) + 8 * (8i >> 12) -> data page.
//   Either way the access reaches data(b) + 8i.
//
// The guest, not the host, writes each case's PDE and PTE. On a shadow-paging
// host KVM keeps its shadow of a guest page table coherent by write-protecting
// it: a guest write traps and updates the shadow, a write by the VMM process
// does not. Seen on kvm_pvm, where CPL 3 code runs natively on the shadow tables
// (ring 0 is emulated and walks the guest tables): a CPL 3 access after the host
// had cleared the PDE still succeeded through the old translation, although the
// guest had executed INVLPG for the address and reloaded CR3.
//
// A record is a stream the program pops, with RSP as the cursor:
//   +0 PDE address, +8 PDE, +16 PTE address, +24 PTE, +32 GVA, +40 routine
// `next` stores the PDE and PTE (pop rdi; pop [rdi]), loads the GVA, invlpg, and
// `ret`s into the case's routine, leaving RSP at the record's end. The routine
// performs the access: in ring 0 directly, at CPL 3 through iretq after pointing
// TSS.RSP0 at the record's end. RSP is 16-byte aligned there, so the frame of a
// #PF — from CPL 0 or CPL 3 — lands on the record itself, error code at +0; the
// lean handler adds CR2 at +8 and rax at +16, and continues in ring 0 at r14
// (normally `next`) with RSP at the record's end. A CPL 3 access that does not
// fault comes back the same way, through its fetch fault at RETURN_GVA, so the
// handler is also the way back from ring 3, as the bring-up handler's
// RETURN_GVA path is. After the case:
//   +0  error code; still the PDE address (or -1 after a twice case's first read)
//       when no #PF happened
//   +8  CR2       +16 the value read (the routine stores it for ring-0 reads)
// Fetches jump to the data quadword, which holds `jmp r14` (ring 0: on to the
// next case) or `jmp r11` (CPL 3: r11 = RETURN_GVA).
//
// Registers while a batch runs: rsp the record cursor, rbx the GVA, r14 where the
// handler resumes.
import { Asm } from '../arch/x86/asm.js';
import { CR0, CR4, EFER } from '../arch/x86/bringup.js';
import { X86Guest } from '../arch/x86/guest.js';
import { CHANNEL_PORT, LAYOUT, OP, RETURN_GVA, SEL } from '../arch/x86/layout.js';
import type { Kvm } from '../kvm/kvm.js';
import { CASE } from './flags.js';
import { PAGE_SIZE } from '../base/units.js';

const MIB = 0x100000;
export const HEADER = Number(LAYOUT.data);
export const RECORD = 48;
const FRAMES = HEADER + 0x800;
/** A quadword the guest may write when a case has no PTE (2 MiB pages) and for the terminator. */
export const SCRATCH = HEADER + 0x40;
const RECORDS = HEADER + PAGE_SIZE;
const RECORDS_BYTES = 0xf0000; // per buffer, inside the identity-mapped data region
/** Cases per batch at most (one record is the terminator). */
export const MAX_BATCH = Math.floor(RECORDS_BYTES / RECORD) - 1;
const DATA = 4 * MIB;
const TABLES = 8 * MIB;
/** PDPTEs per group (a group: the cases under writable, or read-only, PDPTEs). */
export const PD_CHUNKS = 256;
const TSS_RSP0 = Number(LAYOUT.tss) + 4;
const IA32_EFER = 0xc0000080;

/** The data quadword's code bytes: `jmp r14` and `jmp r11`. */
const JMP_R14 = 0xe6ff41;
const JMP_R11 = 0xe3ff41;

export const bufferBase = {
  records: (b: number) => RECORDS + b * RECORDS_BYTES,
  data: (b: number) => DATA + b * 2 * MIB,
  gva: (b: number) => (1 + b) * 2 ** 39,
};

/** Routine selector bits: which code a case jumps to. */
const R_WRITE = 1,
  R_FETCH = 2,
  R_USER = 4,
  R_TWICE = 8,
  R_AC = 16;
const ROUTINES = 32;

export function routineIndex(f: number): number {
  return (
    (f & CASE.WRITE ? R_WRITE : 0) |
    (f & CASE.FETCH ? R_FETCH : 0) |
    (f & CASE.USER ? R_USER : 0) |
    (f & CASE.TWICE ? R_TWICE : 0) |
    (f & CASE.AC ? R_AC : 0)
  );
}

/** Control registers for a batch: the bring-up's, with WP/SMEP/SMAP/PKE/NXE and PKRU from the flags. */
export interface ControlRegs {
  cr0: bigint;
  cr4: bigint;
  efer: bigint;
  pkru: number;
}

/**
 * PKRU for a case, as access.c sets it: key 2 (the key a non-leaf PDE carries)
 * has AD and WD set, key 1 (the leaf's key) has AD/WD from the flags.
 */
export function pkruFor(f: number): number {
  return 0x30 | (f & CASE.PKRU_WD ? 8 : 0) | (f & CASE.PKRU_AD ? 4 : 0);
}

export interface MachineOptions {
  levels: 4 | 5;
  batchSize: number;
  /** Guest has SMAP: the handler clears EFLAGS.AC. */
  smap: boolean;
  /** Guest has PKU: the batch prologue loads PKRU when CR4.PKE is set. */
  pku: boolean;
}

/** Geometry of the page tables of one buffer. */
function tableGeometry(batchSize: number) {
  const chunks = Math.ceil(batchSize / 512);
  const bytes = (1 + 2 * chunks + batchSize) * PAGE_SIZE;
  return { chunks, span: Math.ceil(bytes / (2 * MIB)) * 2 * MIB };
}

/** The guest, its program, and typed views of its memory. */
export class MatrixMachine {
  readonly guest: X86Guest;
  readonly batchSize: number;
  /** 32-bit view of guest memory (slot 0), indexed by GPA / 4. */
  readonly u32: Uint32Array;
  /** 64-bit view of guest memory, indexed by GPA / 8. */
  readonly u64: BigUint64Array;
  readonly routines: number[] = [];
  private readonly done: number;
  private readonly geo: ReturnType<typeof tableGeometry>;

  private constructor(guest: X86Guest, opts: MachineOptions) {
    this.guest = guest;
    this.batchSize = opts.batchSize;
    this.geo = tableGeometry(opts.batchSize);
    const mem = guest.vm.memslot(0).memory;
    this.u32 = new Uint32Array(mem);
    this.u64 = new BigUint64Array(mem);
    const prog = program(opts);
    guest.mem.write(LAYOUT.code, prog.kernel.code);
    guest.mem.write(LAYOUT.userCode, prog.user.code);
    for (let r = 0; r < ROUTINES; r++) this.routines.push(prog.kernel.labels.get(`routine_${r}`) ?? -1);
    this.done = prog.kernel.labels.get('done')!;
    // Static iret frames into ring 3, one per access kind.
    for (const [k, name] of ['read', 'write', 'fetch'].entries()) {
      const frame = FRAMES + k * 64;
      this.w64(frame, prog.user.labels.get(`user_${name}`)!);
      this.w64(frame + 8, SEL.ucode);
      this.w64(frame + 16, 2);
      this.w64(frame + 24, Number(LAYOUT.userStackTop));
      this.w64(frame + 32, SEL.udata);
    }
    // The lean #PF handler replaces IDT entry 14 (a 64-bit interrupt gate, DPL 0).
    const pf = prog.kernel.labels.get('pf')!;
    const gate = Number(LAYOUT.idt) + 14 * 16;
    this.u32[gate / 4] = ((SEL.kcode << 16) | (pf & 0xffff)) >>> 0;
    this.u32[gate / 4 + 1] = (((pf >>> 16) << 16) | 0x8e00) >>> 0;
    this.u32[gate / 4 + 2] = 0;
    this.u32[gate / 4 + 3] = 0;
    // The table region, identity-mapped for the guest's own PDE/PTE stores.
    const tables = guest.boot.tables;
    tables.map(BigInt(TABLES), BigInt(TABLES), BigInt(2 * this.geo.span), '2M', { leaf: 0x63n, table: 0x27n }); // P W A D
    // Upper levels: PML4E[1 + b] -> PDPT(b) -> PD(b, g, m), all with A set.
    for (let b = 0; b < 2; b++) {
      const pml4e = Number(tables.entry(BigInt(bufferBase.gva(b)), 4));
      const pdpt = this.tables(b);
      this.w64(pml4e, pdpt + 0x27); // P W U A
      for (let g = 0; g < 2; g++) {
        for (let m = 0; m < this.geo.chunks; m++) {
          this.w64(pdpt + (g * PD_CHUNKS + m) * 8, this.pd(b, g, m) + (g ? 0x25 : 0x27)); // P (W) U A
        }
      }
    }
    guest.vcpu.setRegs(guest.boot.regs(BigInt(prog.kernel.labels.get('batch')!), guest.vcpu.getRegs()));
  }

  static create(kvm: Kvm, opts: MachineOptions): MatrixMachine {
    if (!Number.isInteger(opts.batchSize) || opts.batchSize < 1 || opts.batchSize > MAX_BATCH) {
      throw new RangeError(`batch size must be 1..${MAX_BATCH}, got ${opts.batchSize}`);
    }
    const memSize = TABLES + 2 * tableGeometry(opts.batchSize).span;
    // No NX in the bring-up's own mappings: batches run with EFER.NXE = 0 too,
    // where bit 63 is reserved.
    const guest = X86Guest.create(kvm, { levels: opts.levels, memSize, nxe: false, wp: true });
    try {
      return new MatrixMachine(guest, opts);
    } catch (e) {
      guest.close();
      throw e;
    }
  }

  w64(gpa: number, v: number): void {
    this.u32[gpa / 4] = v >>> 0;
    this.u32[gpa / 4 + 1] = Math.floor(v / 2 ** 32) >>> 0;
  }

  tables(b: number): number {
    return TABLES + b * this.geo.span;
  }
  pd(b: number, g: number, m: number): number {
    return this.tables(b) + (1 + g * this.geo.chunks + m) * PAGE_SIZE;
  }
  pt(b: number, i: number): number {
    return this.tables(b) + (1 + 2 * this.geo.chunks + i) * PAGE_SIZE;
  }

  /** Control registers for a case's control state. */
  control(f: number): ControlRegs {
    const boot = this.guest.boot;
    const cr0 = (boot.cr0 & ~CR0.WP) | (f & CASE.WP ? CR0.WP : 0n);
    const cr4 =
      (boot.cr4 & ~(CR4.SMEP | CR4.SMAP | CR4.PKE)) |
      (f & CASE.SMEP ? CR4.SMEP : 0n) |
      (f & CASE.SMAP ? CR4.SMAP : 0n) |
      (f & CASE.PKE ? CR4.PKE : 0n);
    const efer = (boot.efer & ~EFER.NXE) | (f & CASE.NXE ? EFER.NXE : 0n);
    return { cr0, cr4, efer, pkru: f & CASE.PKE ? pkruFor(f) : 0 };
  }

  /** Writes the header of the batch in buffer b and its terminating record. */
  arm(b: number, count: number, regs: ControlRegs): void {
    const rec = bufferBase.records(b);
    const end = rec + count * RECORD;
    this.w64(end, SCRATCH);
    this.w64(end + 8, 0);
    this.w64(end + 16, SCRATCH);
    this.w64(end + 24, 0);
    this.w64(end + 32, 0);
    this.w64(end + 40, this.done);
    this.w64(HEADER, rec);
    this.u64[HEADER / 8 + 1] = regs.cr0;
    this.u64[HEADER / 8 + 2] = regs.cr4;
    this.u64[HEADER / 8 + 3] = regs.efer;
    this.w64(HEADER + 32, regs.pkru);
  }

  close(): void {
    this.guest.close();
  }
}

/** `pop qword [rdi]` (8F /0), which the encoder does not offer. */
const POP_M64_RDI = [0x8f, 0x07];

/** The batch program (supervisor) and the ring-3 stubs (user). */
function program(opts: MachineOptions) {
  const k = new Asm({ origin: Number(LAYOUT.code) });
  const next = (a: Asm) =>
    a
      .pop('rdi')
      .bytes(POP_M64_RDI) // PDE
      .pop('rdi')
      .bytes(POP_M64_RDI) // PTE
      .pop('rbx')
      .invlpg({ base: 'rbx' })
      .ret();

  // Batch prologue: control state from the header, registers, first case.
  k.label('batch')
    .movImm('rsi', HEADER)
    .load(8, 'rax', { base: 'rsi', disp: 8 })
    .movToCr(0, 'rax')
    .load(8, 'rax', { base: 'rsi', disp: 16 })
    .movToCr(4, 'rax')
    .movImm('rcx', IA32_EFER)
    .load(4, 'rax', { base: 'rsi', disp: 24 })
    .load(4, 'rdx', { base: 'rsi', disp: 28 })
    .wrmsr();
  if (opts.pku) {
    k.load(8, 'rax', { base: 'rsi', disp: 16 })
      .bt('rax', 22)
      .jcc('nc', 'no_pke')
      .movImm('rcx', 0)
      .movImm('rdx', 0)
      .load(4, 'rax', { base: 'rsi', disp: 32 })
      .wrpkru()
      .label('no_pke');
  }
  k.movLabel('r14', 'next').load(8, 'rsp', { base: 'rsi' }).label('next');
  next(k);

  k.label('done').movImm('rax', OP.done).out(4, CHANNEL_PORT).jmp('batch');

  // The lean #PF handler: the CPU wrote the error code at the record's start.
  k.label('pf')
    .movFromCr('rdx', 2)
    .store(8, { base: 'rsp', disp: 8 }, 'rdx')
    .store(8, { base: 'rsp', disp: 16 }, 'rax')
    .add('rsp', RECORD);
  if (opts.smap) k.clac();
  k.jmp('r14');

  // Routines: twice (a supervisor read first) x ring x access x EFLAGS.AC.
  for (let r = 0; r < ROUTINES; r++) {
    const user = (r & R_USER) !== 0;
    const ac = (r & R_AC) !== 0;
    if (r & R_WRITE && r & R_FETCH) continue;
    if (ac && (user || r & R_FETCH || !opts.smap)) continue;
    k.label(`routine_${r}`);
    if (r & R_TWICE) {
      k.movLabel('r14', `second_${r}`)
        .load(8, 'rax', { base: 'rbx' })
        .label(`second_${r}`)
        .movLabel('r14', 'next')
        .storeImm(8, { base: 'rsp', disp: -RECORD }, -1);
    }
    if (user) {
      const frame = FRAMES + (r & R_WRITE ? 64 : r & R_FETCH ? 128 : 0);
      k.store(8, { disp: TSS_RSP0 }, 'rsp').movImm('rsp', frame).iretq();
      continue;
    }
    if (ac) k.stac();
    if (r & R_FETCH) {
      k.jmp('rbx'); // the data quadword: jmp r14
      continue;
    }
    if (r & R_WRITE) k.store(8, { base: 'rbx' }, 'rbx');
    else k.load(8, 'rax', { base: 'rbx' });
    if (ac) k.clac();
    if (!(r & R_WRITE)) k.store(8, { base: 'rsp', disp: 16 - RECORD }, 'rax');
    next(k);
  }

  // Ring 3 (runs natively on some hosts): the access, then back through the
  // fetch fault at RETURN_GVA.
  const u = new Asm({ origin: Number(LAYOUT.userCode) });
  u.label('user_read').load(8, 'rax', { base: 'rbx' }).movImm('r11', RETURN_GVA).jmp('r11');
  u.label('user_write').store(8, { base: 'rbx' }, 'rbx').movImm('r11', RETURN_GVA).jmp('r11');
  u.label('user_fetch').movImm('r11', RETURN_GVA).jmp('rbx'); // the data quadword: jmp r11
  return { kernel: k.assemble(), user: u.assemble() };
}

/**
 * The data quadword of case i before anything writes it: the code a fetch runs
 * (`jmp r14` in ring 0, `jmp r11` at CPL 3), a byte of the batch number, and the
 * case position — what a read must return.
 */
export function dataTag(seq: number, i: number, user: boolean): { lo: number; hi: number } {
  return {
    lo: ((user ? JMP_R11 : JMP_R14) | ((seq & 0xff) << 24)) >>> 0,
    hi: (i | (((seq >>> 8) & 0xff) << 24)) >>> 0,
  };
}

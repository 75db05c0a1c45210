// Where bring-up puts things in guest-physical memory. The low 4 MiB are
// identity-mapped (GVA = GPA) with 4K pages whose A and D bits are pre-set, so
// the guest walker never writes to bring-up tables and a check's dirty log
// and A/D observations see only what the check itself caused.
export const LAYOUT = {
  gdt: 0x1000n,
  tss: 0x2000n,
  idt: 0x3000n,
  /** Exception log: u32 count at +0, entries of 32 bytes from +64. */
  excLog: 0x4000n,
  /** Mailbox: see MAILBOX for the fields. */
  mailbox: 0x5000n,
  handlers: 0x6000n,
  kernelStackTop: 0xc000n,
  userStackBase: 0xc000n,
  userStackTop: 0x10000n,
  /** Bring-up page tables and tables that checks allocate. */
  tablePool: 0x10000n,
  tablePoolEnd: 0x100000n,
  code: 0x100000n,
  userCode: 0x180000n,
  userCodeEnd: 0x200000n,
  data: 0x200000n,
  identityEnd: 0x400000n,
} as const;

/** Offsets in the mailbox page. */
export const MAILBOX = {
  /** Fixup RIP: an exception handler resumes there once and clears it. */
  fixup: 0,
  /** Where vector RING0_VECTOR resumes in ring 0, and with which RSP. */
  ring0Rip: 8,
  ring0Rsp: 16,
} as const;
/**
 * The way back from CPL 3: user code jumps to RETURN_GVA, which no table maps;
 * the #PF handler sees that fault address, drops the user frame without
 * logging, and continues in ring 0 at MAILBOX.ring0Rip. An exception is used
 * because exception delivery works on every host: KVM's emulator cannot
 * emulate `int n` outside real mode (a host that emulates every instruction
 * raises #UD), and on kvm_pvm an emulated `syscall` left the next fetch
 * checked as a user access. `int RING0_VECTOR` reaches the same code on hosts
 * that execute it natively.
 */
export const RETURN_GVA = 0xfff000n;
export const RING0_VECTOR = 0x81;

export const EXC_LOG_ENTRY = 32;
export const EXC_LOG_HEADER = 64;
export const EXC_LOG_CAPACITY = (4096 - EXC_LOG_HEADER) / EXC_LOG_ENTRY; // 126

export const SEL = { kcode: 0x08, kdata: 0x10, udata: 0x18 | 3, ucode: 0x20 | 3, tss: 0x28 } as const;

/** The guest -> host channel: `out dx, eax` with op in eax. */
export const CHANNEL_PORT = 0x10;
/** Bytes written here are collected as guest console output. */
export const CONSOLE_PORT = 0xe9;
export const OP = { done: 0, fail: 1, sync: 2, exception: 3 } as const;

/** Vectors that push an error code. */
export const ERROR_CODE_VECTORS = new Set([8, 10, 11, 12, 13, 14, 17, 21, 29, 30]);
export const VECTOR_NAMES = [
  '#DE',
  '#DB',
  'NMI',
  '#BP',
  '#OF',
  '#BR',
  '#UD',
  '#NM',
  '#DF',
  'CSO',
  '#TS',
  '#NP',
  '#SS',
  '#GP',
  '#PF',
  '',
  '#MF',
  '#AC',
  '#MC',
  '#XM',
  '#VE',
  '#CP',
];

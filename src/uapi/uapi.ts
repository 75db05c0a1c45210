// KVM's userspace ABI as this project uses it: ioctl numbers, struct sizes and
// offsets, capability and exit numbers. The installed headers may be older
// (Linux 6.1 on Debian 12), so everything is defined here and
// test/uapi.test.ts checks it against <linux/kvm.h> wherever that defines it.

const IOC_NONE = 0;
const IOC_WRITE = 1;
const IOC_READ = 2;

function ioc(dir: number, nr: number, size: number): number {
  // Computed with arithmetic, not bit operators: _IOR/_IOWR set bit 31 and JS
  // bitwise results are signed 32-bit.
  return dir * 2 ** 30 + size * 2 ** 16 + 0xae * 2 ** 8 + nr;
}
const io = (nr: number) => ioc(IOC_NONE, nr, 0);
const ior = (nr: number, size: number) => ioc(IOC_READ, nr, size);
const iow = (nr: number, size: number) => ioc(IOC_WRITE, nr, size);
const iowr = (nr: number, size: number) => ioc(IOC_READ | IOC_WRITE, nr, size);

/** Struct sizes in bytes (x86-64 layout). */
export const SIZEOF = {
  kvm_regs: 144,
  kvm_sregs: 312,
  kvm_segment: 24,
  kvm_dtable: 16,
  kvm_userspace_memory_region: 32,
  kvm_userspace_memory_region2: 160,
  kvm_dirty_log: 16,
  kvm_clear_dirty_log: 24,
  kvm_enable_cap: 104,
  kvm_translation: 24,
  kvm_cpuid2: 8,
  kvm_cpuid_entry2: 40,
  kvm_msrs: 8,
  kvm_msr_entry: 16,
  kvm_create_guest_memfd: 64,
  kvm_memory_attributes: 32,
  kvm_pre_fault_memory: 64,
  kvm_dirty_gfn: 16,
  kvm_stats_header: 24,
  kvm_stats_desc: 16, // without the name, which is header.name_size bytes
} as const;

export const IOCTL = {
  KVM_GET_API_VERSION: io(0x00),
  KVM_CREATE_VM: io(0x01),
  KVM_CHECK_EXTENSION: io(0x03),
  KVM_GET_VCPU_MMAP_SIZE: io(0x04),
  KVM_GET_SUPPORTED_CPUID: iowr(0x05, SIZEOF.kvm_cpuid2),
  KVM_CREATE_VCPU: io(0x41),
  KVM_GET_DIRTY_LOG: iow(0x42, SIZEOF.kvm_dirty_log),
  KVM_SET_USER_MEMORY_REGION: iow(0x46, SIZEOF.kvm_userspace_memory_region),
  KVM_SET_TSS_ADDR: io(0x47),
  KVM_SET_IDENTITY_MAP_ADDR: iow(0x48, 8),
  KVM_SET_USER_MEMORY_REGION2: iow(0x49, SIZEOF.kvm_userspace_memory_region2),
  KVM_RUN: io(0x80),
  KVM_GET_REGS: ior(0x81, SIZEOF.kvm_regs),
  KVM_SET_REGS: iow(0x82, SIZEOF.kvm_regs),
  KVM_GET_SREGS: ior(0x83, SIZEOF.kvm_sregs),
  KVM_SET_SREGS: iow(0x84, SIZEOF.kvm_sregs),
  KVM_TRANSLATE: iowr(0x85, SIZEOF.kvm_translation),
  KVM_GET_MSRS: iowr(0x88, SIZEOF.kvm_msrs),
  KVM_SET_MSRS: iow(0x89, SIZEOF.kvm_msrs),
  KVM_SET_CPUID2: iow(0x90, SIZEOF.kvm_cpuid2),
  KVM_GET_CPUID2: iowr(0x91, SIZEOF.kvm_cpuid2),
  KVM_ENABLE_CAP: iow(0xa3, SIZEOF.kvm_enable_cap),
  KVM_CLEAR_DIRTY_LOG: iowr(0xc0, SIZEOF.kvm_clear_dirty_log),
  KVM_RESET_DIRTY_RINGS: io(0xc7),
  KVM_GET_STATS_FD: io(0xce),
  KVM_SET_MEMORY_ATTRIBUTES: iow(0xd2, SIZEOF.kvm_memory_attributes),
  KVM_CREATE_GUEST_MEMFD: iowr(0xd4, SIZEOF.kvm_create_guest_memfd),
  KVM_PRE_FAULT_MEMORY: iowr(0xd5, SIZEOF.kvm_pre_fault_memory),
} as const;
export type IoctlName = keyof typeof IOCTL;

export const CAP = {
  KVM_CAP_SET_TSS_ADDR: 4,
  KVM_CAP_EXT_CPUID: 7,
  KVM_CAP_NR_VCPUS: 9,
  KVM_CAP_NR_MEMSLOTS: 10,
  KVM_CAP_SYNC_MMU: 16,
  KVM_CAP_SET_IDENTITY_MAP_ADDR: 37,
  KVM_CAP_MAX_VCPUS: 66,
  KVM_CAP_READONLY_MEM: 81,
  KVM_CAP_MULTI_ADDRESS_SPACE: 118,
  KVM_CAP_MAX_VCPU_ID: 128,
  KVM_CAP_IMMEDIATE_EXIT: 136,
  KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: 168,
  KVM_CAP_X86_USER_SPACE_MSR: 188,
  KVM_CAP_DIRTY_LOG_RING: 192,
  KVM_CAP_BINARY_STATS_FD: 203,
  KVM_CAP_VM_DISABLE_NX_HUGE_PAGES: 220,
  KVM_CAP_DIRTY_LOG_RING_ACQ_REL: 223,
  KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP: 225,
  KVM_CAP_USER_MEMORY2: 231,
  KVM_CAP_MEMORY_FAULT_INFO: 232,
  KVM_CAP_MEMORY_ATTRIBUTES: 233,
  KVM_CAP_GUEST_MEMFD: 234,
  KVM_CAP_VM_TYPES: 235,
  KVM_CAP_PRE_FAULT_MEMORY: 236,
  KVM_CAP_GUEST_MEMFD_FLAGS: 244,
} as const;
export type CapName = keyof typeof CAP;

export const EXIT = {
  KVM_EXIT_UNKNOWN: 0,
  KVM_EXIT_EXCEPTION: 1,
  KVM_EXIT_IO: 2,
  KVM_EXIT_HYPERCALL: 3,
  KVM_EXIT_DEBUG: 4,
  KVM_EXIT_HLT: 5,
  KVM_EXIT_MMIO: 6,
  KVM_EXIT_IRQ_WINDOW_OPEN: 7,
  KVM_EXIT_SHUTDOWN: 8,
  KVM_EXIT_FAIL_ENTRY: 9,
  KVM_EXIT_INTR: 10,
  KVM_EXIT_INTERNAL_ERROR: 17,
  KVM_EXIT_SYSTEM_EVENT: 24,
  KVM_EXIT_X86_RDMSR: 29,
  KVM_EXIT_X86_WRMSR: 30,
  KVM_EXIT_MEMORY_FAULT: 39,
} as const;

export const MEM = {
  KVM_MEM_LOG_DIRTY_PAGES: 1,
  KVM_MEM_READONLY: 2,
  KVM_MEM_GUEST_MEMFD: 4,
} as const;

export const KVM_MEMORY_ATTRIBUTE_PRIVATE = 1 << 3;
export const KVM_MEMORY_EXIT_FLAG_PRIVATE = 1 << 3;
/** KVM_CREATE_GUEST_MEMFD flags (Linux 6.18): mmap-able, and its pages shared (host-faultable) from the start. */
export const GUEST_MEMFD_FLAG_MMAP = 1 << 0;
export const GUEST_MEMFD_FLAG_INIT_SHARED = 1 << 1;
export const KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1;
export const KVM_DIRTY_LOG_INITIALLY_SET = 2;
export const KVM_DIRTY_GFN_F_DIRTY = 1;
export const KVM_DIRTY_GFN_F_RESET = 2;
/** Page offset of the dirty ring in a vCPU mapping (x86). */
export const KVM_DIRTY_LOG_PAGE_OFFSET = 64;

export const VM_TYPE = { KVM_X86_DEFAULT_VM: 0, KVM_X86_SW_PROTECTED_VM: 1 } as const;

/** kvm_run offsets (x86-64). */
export const RUN = {
  request_interrupt_window: 0,
  immediate_exit: 1,
  exit_reason: 8,
  if_flag: 13,
  flags: 14,
  cr8: 16,
  apic_base: 24,
  union: 32,
  // io
  io_direction: 32,
  io_size: 33,
  io_port: 34,
  io_count: 36,
  io_data_offset: 40,
  // mmio
  mmio_phys_addr: 32,
  mmio_data: 40,
  mmio_len: 48,
  mmio_is_write: 52,
  // fail_entry
  fail_entry_reason: 32,
  fail_entry_cpu: 40,
  // internal
  internal_suberror: 32,
  internal_ndata: 36,
  internal_data: 40,
  // system_event
  system_event_type: 32,
  system_event_ndata: 36,
  system_event_data: 40,
  // memory_fault
  memory_fault_flags: 32,
  memory_fault_gpa: 40,
  memory_fault_size: 48,
  // ex
  ex_exception: 32,
  ex_error_code: 36,
} as const;

export const KVM_EXIT_IO_IN = 0;
export const KVM_EXIT_IO_OUT = 1;

/** Host constants the binding needs (Linux x86-64 / arm64 generic values). */
export const PROT = { NONE: 0, READ: 1, WRITE: 2, EXEC: 4 } as const;
export const MAP = {
  SHARED: 0x01,
  PRIVATE: 0x02,
  FIXED: 0x10,
  ANONYMOUS: 0x20,
  NORESERVE: 0x4000,
  POPULATE: 0x8000,
  HUGETLB: 0x40000,
  HUGE_2MB: 21 << 26,
  HUGE_1GB: 30 << 26,
} as const;
export const MADV = { NORMAL: 0, DONTNEED: 4, REMOVE: 9, HUGEPAGE: 14, NOHUGEPAGE: 15 } as const;
export const MFD = { CLOEXEC: 1, ALLOW_SEALING: 2, HUGETLB: 4 } as const;
export const FALLOC = { KEEP_SIZE: 1, PUNCH_HOLE: 2 } as const;
export const O_RDWR = 2;

// ---- arm64 ------------------------------------------------------------------
// arm64 uses the generic _IOC layout, so its ioctl numbers come from ioc() as
// the x86 ones do. Kept apart from IOCTL/SIZEOF, which test/uapi.test.ts checks
// against the x86 <linux/kvm.h>; test/arm64.test.ts checks these against the
// arm64 headers of the cross toolchain.

/** arm64 struct sizes in bytes. */
export const ARM64_SIZEOF = {
  /** struct kvm_vcpu_init { __u32 target; __u32 features[7]; } */
  kvm_vcpu_init: 32,
  /** struct kvm_one_reg { __u64 id; __u64 addr; } */
  kvm_one_reg: 16,
  /** struct kvm_reg_list { __u64 n; __u64 reg[]; } */
  kvm_reg_list: 8,
} as const;

export const ARM64_IOCTL = {
  KVM_GET_ONE_REG: iow(0xab, ARM64_SIZEOF.kvm_one_reg),
  KVM_SET_ONE_REG: iow(0xac, ARM64_SIZEOF.kvm_one_reg),
  KVM_ARM_VCPU_INIT: iow(0xae, ARM64_SIZEOF.kvm_vcpu_init),
  KVM_ARM_PREFERRED_TARGET: ior(0xaf, ARM64_SIZEOF.kvm_vcpu_init),
  KVM_GET_REG_LIST: iowr(0xb0, ARM64_SIZEOF.kvm_reg_list),
} as const;

export const ARM64_CAP = {
  KVM_CAP_ARM_PSCI: 87,
  KVM_CAP_ARM_PSCI_0_2: 102,
  KVM_CAP_ARM_VM_IPA_SIZE: 165,
} as const;

/** Bits of kvm_vcpu_init.features[0]. */
export const KVM_ARM_VCPU_POWER_OFF = 0;
export const KVM_ARM_VCPU_EL1_32BIT = 1;
export const KVM_ARM_VCPU_PSCI_0_2 = 2;

/** kvm_run.system_event.type */
export const KVM_SYSTEM_EVENT = { SHUTDOWN: 1, RESET: 2, CRASH: 3 } as const;

/** One-reg ids: KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_CORE | (offset in struct kvm_regs / 4). */
export const KVM_REG_ARM64 = 0x6000000000000000n;
export const KVM_REG_SIZE_U64 = 0x0030000000000000n;
export const KVM_REG_ARM_CORE = 0x0010n << 16n;

/** Byte offsets in arm64 struct kvm_regs (struct user_pt_regs first: regs[31], sp, pc, pstate). */
export const ARM64_CORE = {
  x: (n: number) => n * 8,
  sp: 31 * 8,
  pc: 32 * 8,
  pstate: 33 * 8,
  sp_el1: 34 * 8,
  elr_el1: 35 * 8,
} as const;

/** The one-reg id of the 64-bit core register at `offset` in struct kvm_regs. */
export function arm64CoreReg(offset: number): bigint {
  return KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_CORE | BigInt(offset / 4);
}

/** PSCI 0.2 function ids (SMC32 calling convention), called with hvc #0. */
export const PSCI = { VERSION: 0x84000000, SYSTEM_OFF: 0x84000008, SYSTEM_RESET: 0x84000009 } as const;

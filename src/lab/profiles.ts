// The lab's profiles: which KVM configuration a lab boot gives, as data.
//
// A profile names the architecture, the QEMU machine that offers hardware
// virtualization under TCG, the kernel command line, and KVM's module
// parameters. Both architectures boot under QEMU's TCG (src/lab/qemu.ts).
import type { Arch } from '../arch/arch.js';

/** Something the lab cannot do: a bad kernel path, a missing tool, a failed boot. The message is one line unless it carries a console tail. */
export class LabError extends Error {
  constructor(
    message: string,
    /** The console log file of a failed boot, kept for reading. */
    readonly consoleLog?: string,
  ) {
    super(message);
    this.name = 'LabError';
  }
}

/** Module parameters by module name (underscores, as in /sys/module), then parameter name. */
export type ModParams = Record<string, Record<string, string>>;

export interface Profile {
  name: string;
  arch: Arch;
  summary: string;
  /** QEMU's program. */
  qemu: string;
  /** The machine: accelerator, CPU, memory, firmware. Kernel, initrd, console and agent channel are added by bootLab. */
  machine: readonly string[];
  /** The kernel's console device (no /dev/). */
  console: string;
  /** The guest device the agent talks on. */
  agentTty: string;
  /**
   * The name of the virtio-serial port the agent talks on, when its line is
   * one (arm64: the virt machine has a single PL011, the console); then
   * agentTty is that port's device node, which is not a tty.
   */
  agentPort?: string;
  /** Kernel command line words besides console=, for example kvm-arm.mode=nvhe. */
  append: readonly string[];
  /** The modules /init loads (KVM's, or the agent channel's where KVM is built in), dependencies resolved from the kernel's module tree. */
  modules: readonly string[];
  /** KVM's parameters: given to insmod, or on the command line when the module is built in. */
  modparams: ModParams;
}

/**
 * The x86 lab: AMD SVM with nested paging offered by TCG; 4-level NPT (no
 * LA57). Two CPUs, so that two vCPU threads of the agent run at the same time
 * (the race scenarios), emulated by one host thread in turns: with a thread
 * per CPU (MTTCG) the lab kernel's live code patching (static keys, int3
 * then the new bytes) broke once in a full run on 7.2 ("Oops: int3" in
 * __schedule: a CPU still ran the int3 after the patch had ended).
 */
const X86_MACHINE = [
  '-accel',
  'tcg,thread=single',
  '-cpu',
  'max,-la57',
  '-m',
  '1G',
  '-smp',
  '2',
  '-bios',
  '/usr/share/qemu/qboot.rom',
] as const;

/** The arm64 lab: EL2 offered by TCG, GICv3. */
const ARM64_MACHINE = [
  '-M',
  'virt,virtualization=on,gic-version=3',
  '-cpu',
  'max,pauth-impdef=on',
  '-accel',
  'tcg',
  '-m',
  '1G',
  '-smp',
  '1',
] as const;

/** The KVM modules of each architecture and the config option that builds each. */
export const KVM_MODULES: Record<Arch, readonly { module: string; config: string }[]> = {
  x86_64: [
    { module: 'kvm', config: 'CONFIG_KVM' },
    { module: 'kvm_amd', config: 'CONFIG_KVM_AMD' },
  ],
  arm64: [], // built in (CONFIG_KVM=y)
};

/** arm64: what the agent's virtio-serial port needs, loaded unless built in (Debian builds both as modules). */
export const ARM64_CHANNEL_MODULES: readonly { module: string; config: string }[] = [
  { module: 'virtio_mmio', config: 'CONFIG_VIRTIO_MMIO' },
  { module: 'virtio_console', config: 'CONFIG_VIRTIO_CONSOLE' },
];

/** x86: the same channel over PCI (Debian builds both as modules). */
export const X86_CHANNEL_MODULES: readonly { module: string; config: string }[] = [
  { module: 'virtio_pci', config: 'CONFIG_VIRTIO_PCI' },
  { module: 'virtio_console', config: 'CONFIG_VIRTIO_CONSOLE' },
];

/** The name of the virtio-serial port the agent talks on (both architectures). */
export const AGENT_PORT = 'kvmharness.agent';

/**
 * x86 words: PCI interrupt routing without ACPI. The agent's virtio device
 * uses MSI-X; routing its legacy interrupt through ACPI's link devices took
 * ~300 ms of AML under TCG at every boot (virtio_pci's probe, initcall_debug).
 */
const X86_APPEND = ['pci=noacpi'] as const;

function x86(name: string, summary: string, modparams: ModParams): Profile {
  // The agent's line is a virtio-serial port on PCI: a 16550 line carries about 60 KB/s.
  const modules = [...KVM_MODULES.x86_64, ...X86_CHANNEL_MODULES].map((m) => m.module);
  return {
    name,
    arch: 'x86_64',
    summary,
    qemu: 'qemu-system-x86_64',
    machine: X86_MACHINE,
    console: 'ttyS0',
    agentTty: '/dev/vport0p1',
    agentPort: AGENT_PORT,
    append: [...X86_APPEND],
    modules,
    modparams,
  };
}

function arm64(name: string, summary: string, append: string[]): Profile {
  // The virt machine has one non-secure PL011 (the console); the agent's line
  // is a virtio-serial port: raw bytes, no tty layer in between.
  const modules = ARM64_CHANNEL_MODULES.map((m) => m.module);
  return {
    name,
    arch: 'arm64',
    summary,
    qemu: 'qemu-system-aarch64',
    machine: ARM64_MACHINE,
    console: 'ttyAMA0',
    agentTty: '/dev/vport0p1',
    agentPort: AGENT_PORT,
    append,
    modules,
    modparams: {},
  };
}

export const PROFILES: readonly Profile[] = [
  x86('npt-tdp', 'AMD NPT, TDP MMU (kvm tdp_mmu=1, kvm_amd npt=1 nested=0)', {
    kvm: { tdp_mmu: '1' },
    kvm_amd: { npt: '1', nested: '0' },
  }),
  x86('npt-legacy', 'AMD NPT, legacy (non-TDP) MMU (kvm tdp_mmu=0, kvm_amd npt=1 nested=0)', {
    kvm: { tdp_mmu: '0' },
    kvm_amd: { npt: '1', nested: '0' },
  }),
  x86('shadow', 'shadow paging (kvm_amd npt=0 nested=0)', { kvm_amd: { npt: '0', nested: '0' } }),
  arm64('vhe', 'arm64 VHE (KVM at EL2, the default with -cpu max)', []),
  arm64('nvhe', 'arm64 nVHE (kvm-arm.mode=nvhe)', ['kvm-arm.mode=nvhe']),
  arm64('protected', 'arm64 protected nVHE (kvm-arm.mode=protected)', ['kvm-arm.mode=protected']),
];

export const DEFAULT_PROFILE = 'npt-tdp';

/** The profile of that name with `modparams` ("kvm.tdp_mmu=0 kvm_amd.avic=1") merged over its own. */
export function profile(name: string, modparams?: string): Profile {
  const p = PROFILES.find((q) => q.name === name);
  if (!p) throw new LabError(`unknown lab profile '${name}' (known: ${PROFILES.map((q) => q.name).join(', ')})`);
  return modparams === undefined ? p : withModparams(p, modparams);
}

/** The module name as the kernel spells it in /sys/module: dashes become underscores. */
export function moduleName(s: string): string {
  return s.replace(/-/g, '_');
}

// Words end up in /init (a shell script) and on the kernel command line: keep
// them to characters that need no quoting in either.
const MODPARAM = /^([A-Za-z0-9_-]+)\.([A-Za-z0-9_]+)=([A-Za-z0-9_.,:+-]*)$/;

/** Parses whitespace-separated words "module.param=value" ("kvm.tdp_mmu=0 kvm-amd.avic=1"). */
export function parseModparams(s: string): ModParams {
  const out: ModParams = {};
  for (const word of s.trim().split(/\s+/).filter(Boolean)) {
    const m = MODPARAM.exec(word);
    if (!m)
      throw new LabError(
        `bad module parameter '${word}': expected module.param=value (value of letters, digits and _.,:+-)`,
      );
    const mod = moduleName(m[1]!);
    (out[mod] ??= {})[m[2]!] = m[3]!;
  }
  return out;
}

/** A copy of p with the extra parameters merged over its own (the later word wins). */
export function withModparams(p: Profile, extra: string | ModParams): Profile {
  const add = typeof extra === 'string' ? parseModparams(extra) : extra;
  const modparams: ModParams = {};
  for (const [mod, params] of Object.entries(p.modparams)) modparams[mod] = { ...params };
  for (const [mod, params] of Object.entries(add))
    modparams[moduleName(mod)] = { ...modparams[moduleName(mod)], ...params };
  return { ...p, modparams };
}

/** "kvm.tdp_mmu=1 kvm_amd.npt=1 …", for logs and reports. */
export function formatModparams(m: ModParams): string {
  return Object.entries(m)
    .flatMap(([mod, params]) => Object.entries(params).map(([k, v]) => `${mod}.${k}=${v}`))
    .join(' ');
}

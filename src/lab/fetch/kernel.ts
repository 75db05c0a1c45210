// A kernel the lab can boot, and the checks that make one: what each
// architecture's lab needs from a kernel's config, its module tree and its
// image, known before any boot.
import { existsSync, readFileSync } from 'node:fs';
import type { Arch } from '../../arch/arch.js';
import { ARM64_CHANNEL_MODULES, KVM_MODULES, X86_CHANNEL_MODULES, LabError } from '../profiles.js';
import { parseConfig } from './config.js';
import { loadOrder, modinfo, moduleTree, readModule } from './modules.js';

/** A kernel the lab can boot, with what /init needs from its module tree. */
export interface LabKernel {
  arch: Arch;
  /** The release, as `uname -r` prints it: 6.1.0-56-amd64. */
  version: string;
  /** arm64: the uncompressed Image, booted directly. */
  image?: string;
  /** The uncompressed ELF kernel with a PVH entry, booted directly (fast, 4-level NPT); undefined when the kernel has no PVH entry. */
  vmlinux?: string;
  /** The compressed kernel, booted only when there is no PVH vmlinux. */
  bzImage?: string;
  /** lib/modules/<version>; undefined when everything the lab loads is built in. */
  modulesDir?: string;
  /** A static busybox for the initramfs. */
  busybox: string;
  /** The kernel's config file, when one was found. */
  config?: string;
  /** KVM modules built into the kernel (their parameters go on the command line). */
  builtin: readonly string[];
  /** The Debian package the kernel came from: "linux-image-6.1.0-56-amd64 6.1.192-2". */
  package?: string;
  /** The lab release it is (lab fetch --release): "6.12"; undefined for the user's own kernel. */
  release?: string;
  /** Modules booted instead of the tree's (module name → .ko), e.g. KVM built from a source tree (--kvm-source). */
  moduleOverrides?: Readonly<Record<string, string>>;
}

/** A config option the lab needs: "y" or "y or m" ("ym"), and what for. */
interface Need {
  option: string;
  values: string;
  why: string;
}

/** Options the x86 lab needs, "y" or "y or m", and what for. */
const X86_NEEDS: readonly Need[] = [
  { option: 'CONFIG_KVM', values: 'ym', why: 'KVM' },
  { option: 'CONFIG_KVM_AMD', values: 'ym', why: 'AMD SVM/NPT' },
  { option: 'CONFIG_TRACING', values: 'y', why: "tracefs for KVM's tracepoints" },
  { option: 'CONFIG_SERIAL_8250', values: 'y', why: 'the serial console' },
  { option: 'CONFIG_SERIAL_8250_CONSOLE', values: 'y', why: 'the console on ttyS0' },
  { option: 'CONFIG_PCI', values: 'y', why: "the agent's virtio-serial port (virtio-pci)" },
  { option: 'CONFIG_VIRTIO_PCI', values: 'ym', why: "the agent's virtio-serial port" },
  { option: 'CONFIG_VIRTIO_CONSOLE', values: 'ym', why: "the agent's virtio-serial port" },
  { option: 'CONFIG_BLK_DEV_INITRD', values: 'y', why: 'the initramfs' },
  { option: 'CONFIG_RD_GZIP', values: 'y', why: 'the gzip initramfs' },
  { option: 'CONFIG_DEVTMPFS', values: 'y', why: '/dev' },
];

/** Options the arm64 lab needs, and what for. */
const ARM64_NEEDS: readonly Need[] = [
  { option: 'CONFIG_KVM', values: 'y', why: 'KVM (built in on arm64)' },
  { option: 'CONFIG_TRACING', values: 'y', why: "tracefs for KVM's tracepoints" },
  { option: 'CONFIG_SERIAL_AMBA_PL011', values: 'y', why: 'the PL011 console' },
  { option: 'CONFIG_SERIAL_AMBA_PL011_CONSOLE', values: 'y', why: 'the console on ttyAMA0' },
  { option: 'CONFIG_VIRTIO_MMIO', values: 'ym', why: "the virt machine's virtio transport (the agent's line)" },
  { option: 'CONFIG_VIRTIO_CONSOLE', values: 'ym', why: "the agent's virtio-serial port" },
  { option: 'CONFIG_BLK_DEV_INITRD', values: 'y', why: 'the initramfs' },
  { option: 'CONFIG_RD_GZIP', values: 'y', why: 'the gzip initramfs' },
  { option: 'CONFIG_DEVTMPFS', values: 'y', why: '/dev' },
];

/** What is known of a kernel before it is checked; configText is a config read from the image itself. */
interface Candidate {
  version?: string;
  vmlinux?: string;
  bzImage?: string;
  modulesDir?: string;
  config?: string;
  configText?: string;
  busybox: string;
  package?: string;
}

/** The candidate's config, parsed, when one is known (a file or embedded text). */
function candidateConfig(c: { config?: string; configText?: string }): Map<string, string> | undefined {
  const text = c.configText ?? (c.config && existsSync(c.config) ? readFileSync(c.config, 'utf8') : undefined);
  return text === undefined ? undefined : parseConfig(text);
}

/** A problem for each option the config does not set as needed. */
function unmetNeeds(config: Map<string, string>, needs: readonly Need[]): string[] {
  const problems: string[] = [];
  for (const n of needs) {
    const v = config.get(n.option) ?? 'n';
    if (!n.values.includes(v)) problems.push(`${n.option} is ${v === 'n' ? 'not set' : `=${v}`} (needed for ${n.why})`);
  }
  return problems;
}

/**
 * Checks that a kernel has what the lab needs, as far as can be known before
 * boot: the config options (when a config is known), the KVM modules and their
 * dependencies in the module tree, the modules' vermagic against the kernel's
 * release, a bootable image. Throws one LabError naming everything missing.
 */
export function checkX86Kernel(c: Candidate): LabKernel {
  const config = candidateConfig(c);
  const problems = config ? unmetNeeds(config, X86_NEEDS) : [];
  const builtin = new Set<string>();
  const tree = c.modulesDir ? moduleTree(c.modulesDir) : undefined;
  const unplaced: string[] = [];
  for (const m of [...KVM_MODULES.x86_64, ...X86_CHANNEL_MODULES]) {
    const v = config?.get(m.config);
    const file = `${m.module.replace(/_/g, '-')}.ko`;
    if (v === 'y' || tree?.builtin.has(m.module)) builtin.add(m.module);
    else if (config && v !== 'm')
      continue; // reported above
    else if (!tree) unplaced.push(config ? file : `${file} (unless ${m.config}=y)`);
    else if (!tree.files.has(m.module))
      problems.push(`no ${file} in ${tree.dir} (the lab needs a kernel built with ${m.config})`);
  }
  if (unplaced.length)
    problems.push(`the lab needs ${unplaced.join(' and ')}: give the modules directory lib/modules/<version>`);
  let vermagic: string | undefined;
  if (tree && problems.length === 0) {
    try {
      const order = loadOrder(
        tree,
        [...KVM_MODULES.x86_64, ...X86_CHANNEL_MODULES].map((m) => m.module),
        builtin,
      );
      const kvm = order.find((n) => n === 'kvm') ?? order[0];
      if (kvm) vermagic = modinfo(readModule(tree.files.get(kvm)!), 'vermagic')?.split(' ')[0];
    } catch (e) {
      if (!(e instanceof LabError)) throw e;
      problems.push(e.message);
    }
  }
  const version = c.version ?? vermagic;
  if (vermagic && version && vermagic !== version)
    problems.push(`the modules are built for ${vermagic} but the kernel is ${version}`);
  if (!c.vmlinux && !c.bzImage)
    problems.push('no bootable image (a vmlinux with a PVH entry, CONFIG_PVH=y, or a bzImage)');
  if (problems.length) throw new LabError(`kernel ${c.vmlinux ?? c.bzImage ?? c.modulesDir}: ${problems.join('; ')}`);
  return {
    arch: 'x86_64',
    version: version ?? 'unknown',
    vmlinux: c.vmlinux,
    bzImage: c.bzImage,
    modulesDir: c.modulesDir,
    busybox: c.busybox,
    config: c.config && existsSync(c.config) ? c.config : undefined,
    builtin: [...builtin],
    package: c.package,
  };
}

/**
 * The arm64 counterpart of checkX86Kernel(): KVM built in, the virtio modules
 * of the agent's channel in the module tree unless built in, their vermagic
 * against the release, an Image to boot.
 */
export function checkArm64Kernel(c: Omit<Candidate, 'vmlinux' | 'bzImage'> & { image?: string }): LabKernel {
  const config = candidateConfig(c);
  const problems = config ? unmetNeeds(config, ARM64_NEEDS) : [];
  const tree = c.modulesDir ? moduleTree(c.modulesDir) : undefined;
  const builtin = new Set<string>(['kvm']);
  const wanted: string[] = [];
  for (const m of ARM64_CHANNEL_MODULES) {
    const v = config?.get(m.config);
    if (v === 'y' || tree?.builtin.has(m.module)) builtin.add(m.module);
    else if (config && v !== 'm')
      continue; // reported above
    else if (!tree)
      problems.push(
        `the lab needs ${m.module.replace(/_/g, '-')}.ko${config ? '' : ` (unless ${m.config}=y)`}: give the modules directory lib/modules/<version>`,
      );
    else if (!tree.files.has(m.module))
      problems.push(`no ${m.module}.ko in ${tree.dir} (the lab needs a kernel built with ${m.config})`);
    else wanted.push(m.module);
  }
  let vermagic: string | undefined;
  if (tree && wanted.length && problems.length === 0) {
    try {
      loadOrder(tree, wanted, builtin);
      vermagic = modinfo(readModule(tree.files.get(wanted[0]!)!), 'vermagic')?.split(' ')[0];
    } catch (e) {
      if (!(e instanceof LabError)) throw e;
      problems.push(e.message);
    }
  }
  const version = c.version ?? vermagic;
  if (vermagic && version && vermagic !== version)
    problems.push(`the modules are built for ${vermagic} but the kernel is ${version}`);
  if (!c.image) problems.push('no arm64 Image to boot');
  if (problems.length) throw new LabError(`kernel ${c.image ?? c.modulesDir}: ${problems.join('; ')}`);
  return {
    arch: 'arm64',
    version: version ?? 'unknown',
    image: c.image,
    modulesDir: c.modulesDir,
    busybox: c.busybox,
    config: c.config && existsSync(c.config) ? c.config : undefined,
    builtin: [...builtin],
    package: c.package,
  };
}

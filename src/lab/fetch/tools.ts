// The host's tools the lab needs (QEMU, xz, the arm64 cross toolchain), found
// on $PATH or installed from Debian's packages.
import { accessSync, constants, existsSync, statSync } from 'node:fs';
import { delimiter, join } from 'node:path';
import type { Arch } from '../../arch/arch.js';
import { LabError } from '../profiles.js';
import { aptInstall, isRoot } from './apt.js';

/** The program's path on $PATH (plus the sbin directories), or undefined. */
export function which(bin: string): string | undefined {
  if (bin.includes('/')) return existsSync(bin) ? bin : undefined;
  const dirs = [...(process.env.PATH ?? '').split(delimiter), '/usr/local/sbin', '/usr/sbin', '/sbin'];
  for (const d of dirs) {
    if (!d) continue;
    const p = join(d, bin);
    try {
      accessSync(p, constants.X_OK);
      if (statSync(p).isFile()) return p;
    } catch {
      // not here
    }
  }
  return undefined;
}

/** A program or file the lab needs, and the Debian package that provides it. */
interface Tool {
  need: string;
  pkg: string;
}

/** What booting the x86 lab needs on the host. */
export const X86_TOOLS: readonly Tool[] = [
  { need: 'qemu-system-x86_64', pkg: 'qemu-system-x86' },
  { need: '/usr/share/qemu/qboot.rom', pkg: 'qemu-system-data' },
  { need: 'xz', pkg: 'xz-utils' },
];

/** What booting the arm64 lab needs on the host: QEMU and the cross toolchain for the agent. */
export const ARM64_TOOLS: readonly Tool[] = [
  { need: 'qemu-system-aarch64', pkg: 'qemu-system-arm' },
  { need: 'aarch64-linux-gnu-g++', pkg: 'g++-aarch64-linux-gnu' },
  { need: '/usr/aarch64-linux-gnu/lib/libc.a', pkg: 'libc6-dev-arm64-cross' },
];

/** The tools each architecture's lab needs. */
export const LAB_TOOLS: Record<Arch, readonly Tool[]> = { x86_64: X86_TOOLS, arm64: ARM64_TOOLS };

/** Installs the packages of whichever tools are missing (needs root), updating the package lists first when a package is not found. */
export async function ensureTools(tools: readonly Tool[], log: (s: string) => void): Promise<void> {
  const missing = tools.filter((t) => !which(t.need));
  if (missing.length === 0) return;
  const pkgs = [...new Set(missing.map((t) => t.pkg))];
  const what = missing.map((t) => t.need).join(', ');
  if (!isRoot())
    throw new LabError(
      `the lab needs ${what}: install with \`apt-get install -y --no-install-recommends ${pkgs.join(' ')}\` as root`,
    );
  log(`lab: installing ${pkgs.join(' ')}`);
  await aptInstall(pkgs, log);
  const still = missing.filter((t) => !which(t.need));
  if (still.length)
    throw new LabError(`still missing after installing ${pkgs.join(' ')}: ${still.map((t) => t.need).join(', ')}`);
}

// `kvmharness lab fetch`: Debian's stock kernel of each lab architecture and
// its static busybox, downloaded and unpacked into the per-user cache on first
// use and named by the cache's manifest; later fetches are offline.
import { existsSync, mkdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import type { Arch } from '../../arch/arch.js';
import { LabError } from '../profiles.js';
import { candidateVersion, DEB_ARCH, ensureDebArch, fetchBusybox, kernelPackage, safeName, unpackDeb } from './apt.js';
import { labCacheDir, readManifest, writeManifest } from './cache.js';
import { extractVmlinux, hasPvhNote } from './image.js';
import { checkArm64Kernel, checkX86Kernel, type LabKernel } from './kernel.js';
import { ensureTools, LAB_TOOLS } from './tools.js';

/** A Debian kernel package unpacked in the cache. */
interface Unpacked {
  /** The package: linux-image-6.1.0-56-amd64. */
  pkg: string;
  /** The kernel release: 6.1.0-56-amd64. */
  release: string;
  /** Where the package is unpacked. */
  dir: string;
}

/** What is known of the unpacked kernel besides its image, as the checks take it. */
interface Found {
  version: string;
  modulesDir: string;
  config: string;
  busybox: string;
  package: string;
}

/** The package's compressed kernel, boot/vmlinuz-<release>. */
const vmlinuz = (dir: string, release: string): string => join(dir, 'boot', `vmlinuz-${release}`);

/** How Debian's kernel of each architecture is named in the log, prepared while unpacking, and checked. */
const DEBIAN_KERNEL: Record<
  Arch,
  {
    /** The kernel as the log names it. */
    name: string;
    /** The architecture's packages must be made visible to apt first (ensureDebArch). */
    foreign: boolean;
    /** Runs on the unpacked tree before it is moved into the cache. */
    unpacked?: (tree: string, u: Unpacked, log: (s: string) => void) => Promise<void>;
    /** The kernel the lab boots, checked. */
    check: (u: Unpacked, found: Found, log: (s: string) => void) => LabKernel;
  }
> = {
  // The vmlinux inside the bzImage is extracted once, to boot by PVH when it has the entry.
  x86_64: {
    name: 'kernel',
    foreign: false,
    unpacked: async (tree, u, log) => {
      const bz = vmlinuz(tree, u.release);
      if (!existsSync(bz)) throw new LabError(`${u.pkg} has no boot/vmlinuz-${u.release}`);
      log('lab: extracting vmlinux from the bzImage');
      extractVmlinux(bz, join(tree, 'vmlinux'));
    },
    check: (u, found, log) => {
      const vmlinux = join(u.dir, 'vmlinux');
      const pvh = hasPvhNote(readFileSync(vmlinux));
      if (!pvh) log('lab: the kernel has no PVH entry (CONFIG_PVH); it will boot as a bzImage');
      return checkX86Kernel({ ...found, vmlinux: pvh ? vmlinux : undefined, bzImage: vmlinuz(u.dir, u.release) });
    },
  },
  // The package's vmlinuz is an uncompressed Image; KVM is built in, and the
  // agent's virtio channel comes from the module tree.
  arm64: {
    name: 'arm64 kernel',
    foreign: true,
    check: (u, found) => checkArm64Kernel({ ...found, image: vmlinuz(u.dir, u.release) }),
  },
};

/**
 * The default lab kernel: Debian's stock kernel of `arch` (the package
 * linux-image-amd64 or linux-image-arm64 depends on) and static busybox,
 * downloaded and unpacked into the per-user cache on first use; later calls
 * are offline. Installs the tools the lab needs when missing. `refresh` looks
 * for a newer kernel package.
 */
export async function labFetch(opts: {
  cacheDir?: string;
  log: (s: string) => void;
  refresh?: boolean;
  arch?: Arch;
}): Promise<LabKernel> {
  const { log } = opts;
  const arch = opts.arch ?? 'x86_64';
  const debian = DEBIAN_KERNEL[arch];
  const cache = labCacheDir(opts.cacheDir);
  const root = join(cache, arch);
  await ensureTools(LAB_TOOLS[arch], log);
  if (!opts.refresh) {
    const k = readManifest(root, arch);
    if (k) {
      log(`lab: ${debian.name} ${k.version} (cached)`);
      return k;
    }
  }
  if (debian.foreign) await ensureDebArch(arch, log);
  mkdirSync(root, { recursive: true });
  log(`lab: looking up Debian's ${arch} kernel package`);
  const pkg = await kernelPackage(log, arch);
  const deb = `${pkg}:${DEB_ARCH[arch]}`;
  const pkgVersion = await candidateVersion(deb, log);
  const release = pkg.slice('linux-image-'.length);
  const u: Unpacked = { pkg, release, dir: join(root, safeName(`${pkg}_${pkgVersion}`)) };
  const unpacked = debian.unpacked;
  await unpackDeb(deb, u.dir, log, unpacked && ((tree) => unpacked(tree, u, log)));
  const busybox = await fetchBusybox(cache, log, arch);
  const k = debian.check(
    u,
    {
      version: u.release,
      modulesDir: join(u.dir, 'lib', 'modules', u.release),
      config: join(u.dir, 'boot', `config-${u.release}`),
      busybox,
      package: `${pkg} ${pkgVersion}`,
    },
    log,
  );
  writeManifest(root, k);
  log(`lab: ${debian.name} ${k.version} (${k.package}) cached in ${u.dir}`);
  return k;
}

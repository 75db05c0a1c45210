// `kvmharness lab fetch`: Debian's stock kernel of each lab architecture and
// its static busybox, downloaded and unpacked into the per-user cache on first
// use and named by the cache's manifest; later fetches are offline.
import { existsSync, mkdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import type { Arch } from '../../arch/arch.js';
import { LabError } from '../profiles.js';
import {
  aptRefresh,
  candidateVersion,
  packageDepends,
  DEB_ARCH,
  fetchBusybox,
  kernelPackage,
  labAptSource,
  safeName,
  unpackDeb,
} from './apt.js';
import { labCacheDir, readManifest, writeManifest } from './cache.js';
import { extractVmlinux, hasPvhNote } from './image.js';
import { checkArm64Kernel, checkX86Kernel, type LabKernel } from './kernel.js';
import { checkSeries, labRelease, releaseRoot } from './release.js';
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

const escape = (s: string): string => s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');

/** The first of `paths` that exists, else the first. */
const firstThere = (paths: readonly string[]): string => paths.find((p) => existsSync(p)) ?? paths[0]!;

/**
 * The package's kernel image: boot/vmlinuz-<release>, or since Debian split
 * the image package (sid, linux-binary-<release>) usr/lib/modules/<release>/vmlinuz.
 */
const vmlinuz = (dir: string, release: string): string =>
  firstThere([join(dir, 'boot', `vmlinuz-${release}`), join(dir, 'usr', 'lib', 'modules', release, 'vmlinuz')]);

/** The kernel's config: boot/config-<release>, or usr/lib/modules/<release>/config (linux-base-<release>). */
const kernelConfig = (dir: string, release: string): string =>
  firstThere([join(dir, 'boot', `config-${release}`), join(dir, 'usr', 'lib', 'modules', release, 'config')]);

/** The module tree: lib/modules/<release>, or usr/lib/modules/<release> (trixie on). */
const modulesOf = (dir: string, release: string): string =>
  firstThere([join(dir, 'lib', 'modules', release), join(dir, 'usr', 'lib', 'modules', release)]);

/** How Debian's kernel of each architecture is named in the log, prepared while unpacking, and checked. */
const DEBIAN_KERNEL: Record<
  Arch,
  {
    /** The kernel as the log names it. */
    name: string;
    /** Runs on the unpacked tree before it is moved into the cache. */
    unpacked?: (tree: string, u: Unpacked, log: (s: string) => void) => Promise<void>;
    /** The kernel the lab boots, checked. */
    check: (u: Unpacked, found: Found, log: (s: string) => void) => LabKernel;
  }
> = {
  // The vmlinux inside the bzImage is extracted once, to boot by PVH when it has the entry.
  x86_64: {
    name: 'kernel',
    unpacked: async (tree, u, log) => {
      const bz = vmlinuz(tree, u.release);
      if (!existsSync(bz))
        throw new LabError(`${u.pkg} has no boot/vmlinuz-${u.release} nor usr/lib/modules/${u.release}/vmlinuz`);
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
    check: (u, found) => checkArm64Kernel({ ...found, image: vmlinuz(u.dir, u.release) }),
  },
};

/**
 * A lab kernel: Debian's stock kernel of `arch` and `release` (the package
 * linux-image-amd64 or linux-image-arm64 of the release's suite depends on,
 * looked up through the lab's own apt configuration) and static busybox,
 * downloaded and unpacked into the per-user cache on first use; later calls
 * are offline. Installs the tools the lab needs when missing. `refresh` looks
 * for a newer kernel package. The default release is the newest.
 */
export async function labFetch(opts: {
  cacheDir?: string;
  log: (s: string) => void;
  refresh?: boolean;
  arch?: Arch;
  release?: string;
}): Promise<LabKernel> {
  const { log } = opts;
  const arch = opts.arch ?? 'x86_64';
  const release = labRelease(opts.release);
  const debian = DEBIAN_KERNEL[arch];
  const cache = labCacheDir(opts.cacheDir);
  const root = releaseRoot(cache, release, arch);
  await ensureTools(LAB_TOOLS[arch], log);
  if (!opts.refresh) {
    const k = readManifest(root, arch);
    if (k) {
      log(`lab: ${debian.name} ${k.version} (cached)`);
      return { ...k, release: release.name };
    }
  }
  const src = labAptSource(cache, release.suite);
  if (opts.refresh) await aptRefresh(log, src);
  mkdirSync(root, { recursive: true });
  log(`lab: looking up Debian ${release.suite}'s ${arch} kernel package (release ${release.name})`);
  const pkg = await kernelPackage(log, arch, src);
  const deb = `${pkg}:${DEB_ARCH[arch]}`;
  const pkgVersion = await candidateVersion(deb, log, src);
  checkSeries(release, pkgVersion, pkg);
  const version = pkg.slice('linux-image-'.length);
  const u: Unpacked = { pkg, release: version, dir: join(root, safeName(`${pkg}_${pkgVersion}`)) };
  const unpacked = debian.unpacked;
  // sid splits the kernel into linux-base-, linux-binary- and linux-modules-<release>.
  const parts = (await packageDepends(deb, log, src)).filter((d) =>
    new RegExp(`^linux-(base|binary|modules)-${escape(version)}$`).test(d),
  );
  const debs = [deb, ...parts.map((d) => `${d}:${DEB_ARCH[arch]}`)];
  await unpackDeb(debs, u.dir, log, unpacked && ((tree) => unpacked(tree, u, log)), src);
  const busybox = await fetchBusybox(cache, log, arch, src);
  const k = debian.check(
    u,
    {
      version: u.release,
      modulesDir: modulesOf(u.dir, u.release),
      config: kernelConfig(u.dir, u.release),
      busybox,
      package: `${pkg} ${pkgVersion}`,
    },
    log,
  );
  writeManifest(root, { ...k, release: release.name });
  log(`lab: ${debian.name} ${k.version} (${k.package}) cached in ${u.dir}`);
  return { ...k, release: release.name };
}

// The kernel a lab session boots: the user's own kernel and modules, checked
// for what the lab needs before any boot, or the default Debian kernel.
import { createHash } from 'node:crypto';
import { accessSync, constants, existsSync, mkdirSync, readFileSync, statSync } from 'node:fs';
import { join, resolve } from 'node:path';
import type { Arch } from '../../arch/arch.js';
import { LabError } from '../profiles.js';
import { ensureDebArch, fetchBusybox } from './apt.js';
import { labCacheDir } from './cache.js';
import { findConfig } from './config.js';
import { labFetch } from './fetch.js';
import {
  bzImageRelease,
  elfRelease,
  extractVmlinux,
  hasPvhNote,
  head,
  isArm64Image,
  isBzImage,
  isElf,
} from './image.js';
import { checkArm64Kernel, checkX86Kernel, type LabKernel } from './kernel.js';
import { modulesVersionDir } from './modules.js';
import { isReleaseName } from './release.js';
import { ensureTools, LAB_TOOLS, X86_TOOLS } from './tools.js';

/** Throws a one-line LabError unless `path` exists and is readable. */
function readable(path: string, what: string): string {
  const p = resolve(path);
  try {
    accessSync(p, constants.R_OK);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    throw new LabError(code === 'ENOENT' ? `${what} not found: ${path}` : `cannot read ${what} ${path}: ${code}`);
  }
  return p;
}

/**
 * The user's own kernel: a bzImage or an uncompressed vmlinux, and the module
 * directory (lib/modules/<version>) holding kvm.ko and kvm-amd.ko unless they
 * are built in. A bzImage is unpacked once into the cache to boot by PVH.
 * The config is looked for beside the image, in a build tree, or embedded
 * (CONFIG_IKCONFIG). Without `kernel`, the lab kernel of `release` (default:
 * the newest) is fetched; `kernel` may also name a release ("6.12").
 * `busybox` overrides the static busybox otherwise fetched into the cache.
 */
export async function resolveKernel(opts: {
  kernel?: string;
  release?: string;
  modules?: string;
  config?: string;
  busybox?: string;
  cacheDir?: string;
  arch?: Arch;
  log?: (s: string) => void;
}): Promise<LabKernel> {
  const log = opts.log ?? (() => {});
  const arch = opts.arch ?? 'x86_64';
  if (opts.kernel && isReleaseName(opts.kernel) && !existsSync(opts.kernel)) {
    if (opts.release !== undefined)
      throw new LabError(`--kernel ${opts.kernel} names a release: give it or --release, not both`);
    if (opts.modules) throw new LabError(`--kernel ${opts.kernel} names a lab release, which brings its own modules`);
    return labFetch({ cacheDir: opts.cacheDir, log, arch, release: opts.kernel });
  }
  if (!opts.kernel) {
    if (opts.modules) throw new LabError('a modules directory was given without a kernel');
    return labFetch({ cacheDir: opts.cacheDir, log, arch, release: opts.release });
  }
  if (opts.release !== undefined) throw new LabError('--release names a lab kernel: give it or --kernel, not both');
  const image = readable(opts.kernel, 'kernel image');
  if (!statSync(image).isFile()) throw new LabError(`kernel image is not a file: ${opts.kernel}`);
  let modulesDir: string | undefined;
  if (opts.modules) {
    modulesDir = modulesVersionDir(readable(opts.modules, 'modules directory'));
    if (!statSync(modulesDir).isDirectory())
      throw new LabError(`modules directory is not a directory: ${opts.modules}`);
  }
  const config = opts.config ? readable(opts.config, 'kernel config') : undefined;
  const h = head(image, 0x1000);
  let k: LabKernel;
  if (arch === 'arm64') {
    if (!isArm64Image(h))
      throw new LabError(
        `kernel image ${opts.kernel} is not an arm64 Image (no "ARM\\x64" magic at 0x38; pass arch/arm64/boot/Image)`,
      );
    const img = readFileSync(image);
    const version = elfRelease(img);
    const found = findConfig({ given: config, image, kernel: img, version, modulesDir }, log);
    k = checkArm64Kernel({ version, image, modulesDir, ...found, busybox: '' });
  } else {
    k = await x86Kernel({ given: opts.kernel, image, head: h, modulesDir, config, cacheDir: opts.cacheDir }, log);
  }
  if (opts.busybox) return { ...k, busybox: readable(opts.busybox, 'busybox') };
  await ensureTools(LAB_TOOLS[arch], log);
  if (arch === 'arm64') await ensureDebArch(arch, log);
  return { ...k, busybox: await fetchBusybox(labCacheDir(opts.cacheDir), log, arch) };
}

/**
 * The user's x86 kernel, checked, without its busybox: a vmlinux with a PVH
 * entry (extracted into the cache from a bzImage) or else the bzImage.
 */
async function x86Kernel(
  o: { given: string; image: string; head: Buffer; modulesDir?: string; config?: string; cacheDir?: string },
  log: (s: string) => void,
): Promise<LabKernel> {
  const { given, image, head: h, modulesDir, config } = o;
  if (isArm64Image(h)) {
    throw new LabError(`kernel image ${given} is an arm64 Image: use --arch arm64 with an arm64 profile`);
  }
  let vmlinux: string | undefined;
  let bzImage: string | undefined;
  let version: string | undefined;
  if (isBzImage(h)) {
    bzImage = image;
    version = bzImageRelease(h);
    const st = statSync(image);
    const key = createHash('sha256').update(`${image}\0${st.size}\0${st.mtimeMs}`).digest('hex').slice(0, 16);
    const dir = join(labCacheDir(o.cacheDir), 'user', key);
    vmlinux = join(dir, 'vmlinux');
    if (!existsSync(vmlinux)) {
      await ensureTools(
        X86_TOOLS.filter((t) => t.need === 'xz'),
        log,
      );
      mkdirSync(dir, { recursive: true });
      log(`lab: extracting vmlinux from ${given}`);
      extractVmlinux(image, vmlinux);
    }
  } else if (isElf(h)) {
    vmlinux = image;
  } else {
    throw new LabError(`kernel image ${given} is neither a bzImage nor an ELF vmlinux`);
  }
  const elf = readFileSync(vmlinux);
  if (elf.readUInt16LE(0x12) !== 62) throw new LabError(`kernel image ${given} is not an x86_64 kernel`);
  version ??= elfRelease(elf);
  if (!hasPvhNote(elf)) {
    if (!bzImage) {
      throw new LabError(`kernel image ${given} has no PVH entry (CONFIG_PVH is not set): pass its bzImage instead`);
    }
    log('lab: the kernel has no PVH entry (CONFIG_PVH); booting the bzImage');
    vmlinux = undefined;
  }
  const found = findConfig({ given: config, image, kernel: elf, version, modulesDir }, log);
  return checkX86Kernel({ version, vmlinux, bzImage, modulesDir, ...found, busybox: '' });
}

// The lab's per-user cache and the manifest that names the fetched kernel of
// each architecture, so that a second fetch runs no apt command at all.
import { existsSync, readFileSync, renameSync, writeFileSync } from 'node:fs';
import { homedir } from 'node:os';
import { isAbsolute, join, relative, resolve } from 'node:path';
import type { Arch } from '../../arch/arch.js';
import type { LabKernel } from './kernel.js';

/** `$XDG_CACHE_HOME/kvmharness/lab`, or `~/.cache/kvmharness/lab`. */
export function labCacheDir(cacheDir?: string): string {
  if (cacheDir) return resolve(cacheDir);
  const xdg = process.env.XDG_CACHE_HOME;
  return join(xdg && isAbsolute(xdg) ? xdg : join(homedir(), '.cache'), 'kvmharness', 'lab');
}

/** `<cache>/<arch>/default.json`: the kernel's paths relative to `<cache>/<arch>`. */
interface Manifest {
  arch?: Arch;
  version: string;
  package: string;
  image?: string;
  vmlinux: string;
  bzImage: string;
  modulesDir: string;
  busybox: string;
  config?: string;
  builtin: string[];
  /** The lab release (absent in manifests written before releases: 6.1). */
  release?: string;
}

/** The kernel the manifest in `root` names, when it is of `arch` and its files are all there. */
export function readManifest(root: string, arch: Arch): LabKernel | undefined {
  try {
    const m = JSON.parse(readFileSync(join(root, 'default.json'), 'utf8')) as Manifest;
    if ((m.arch ?? 'x86_64') !== arch) return undefined;
    const k: LabKernel = {
      arch,
      version: m.version,
      image: m.image ? join(root, m.image) : undefined,
      vmlinux: m.vmlinux ? join(root, m.vmlinux) : undefined,
      bzImage: m.bzImage ? join(root, m.bzImage) : undefined,
      modulesDir: join(root, m.modulesDir),
      busybox: join(root, m.busybox),
      config: m.config ? join(root, m.config) : undefined,
      builtin: m.builtin,
      package: m.package,
      release: m.release,
    };
    const paths = [k.image, k.vmlinux, k.bzImage, k.modulesDir, k.busybox].filter((p) => p !== undefined);
    return paths.length >= 3 && paths.every((p) => existsSync(p)) ? k : undefined;
  } catch {
    return undefined;
  }
}

/** Writes the manifest of `k` into `root`, atomically. */
export function writeManifest(root: string, k: LabKernel): void {
  const rel = (p: string | undefined): string => (p ? relative(root, p) : '');
  const m: Manifest = {
    arch: k.arch,
    version: k.version,
    package: k.package ?? '',
    image: k.image ? rel(k.image) : undefined,
    vmlinux: rel(k.vmlinux),
    bzImage: rel(k.bzImage),
    modulesDir: rel(k.modulesDir),
    busybox: rel(k.busybox),
    config: k.config ? rel(k.config) : undefined,
    builtin: [...k.builtin],
    release: k.release,
  };
  const tmp = join(root, `.default.json.${process.pid}`);
  writeFileSync(tmp, JSON.stringify(m, null, 2) + '\n');
  renameSync(tmp, join(root, 'default.json'));
}

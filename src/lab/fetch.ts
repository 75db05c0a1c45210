// The lab's kernel: Debian's stock x86_64 or arm64 kernel fetched into a
// per-user cache, or the user's own kernel and modules, checked for what the
// lab needs before any boot.
//
// Nothing is installed system-wide except tools (QEMU, xz): the kernel and
// busybox packages are downloaded with `apt-get download` and unpacked with
// `dpkg-deb -x` into the cache. A second labFetch() reads the cache's manifest
// and runs no apt command at all.
import { spawn, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import {
  accessSync, closeSync, constants, existsSync, mkdirSync, mkdtempSync, openSync, readdirSync, readFileSync, readSync,
  renameSync, rmSync, statSync, writeFileSync,
} from 'node:fs';
import { homedir } from 'node:os';
import { basename, delimiter, dirname, isAbsolute, join, relative, resolve } from 'node:path';
import { gunzipSync } from 'node:zlib';
import { ARM64_CHANNEL_MODULES, KVM_MODULES, X86_CHANNEL_MODULES, LabError, moduleName, type LabArch } from './profiles.js';

export { LabError } from './profiles.js';

/** A kernel the lab can boot, with what /init needs from its module tree. */
export interface LabKernel {
  arch: LabArch;
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
}

/** `$XDG_CACHE_HOME/kvmharness/lab`, or `~/.cache/kvmharness/lab`. */
export function labCacheDir(cacheDir?: string): string {
  if (cacheDir) return resolve(cacheDir);
  const xdg = process.env.XDG_CACHE_HOME;
  return join(xdg && isAbsolute(xdg) ? xdg : join(homedir(), '.cache'), 'kvmharness', 'lab');
}

// ---------------------------------------------------------------------------
// Processes and tools

interface Ran {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs a program (no shell) to completion; rejects only when it cannot be started. */
function run(cmd: string, args: readonly string[], opts: { cwd?: string } = {}): Promise<Ran> {
  return new Promise((done, fail) => {
    const child = spawn(cmd, args, { cwd: opts.cwd, stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, DEBIAN_FRONTEND: 'noninteractive', LC_ALL: 'C' } });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (s: string) => (stdout += s));
    child.stderr.setEncoding('utf8').on('data', (s: string) => (stderr += s));
    child.on('error', (e) => fail(new LabError(`cannot run ${cmd}: ${(e as NodeJS.ErrnoException).code ?? e.message}`)));
    child.on('close', (code, signal) => done({ code: code ?? (signal ? 128 : 1), stdout, stderr }));
  });
}

/** The last meaningful line of a failed command's output, for a one-line message. */
function lastLine(r: Ran): string {
  const lines = `${r.stderr}\n${r.stdout}`.split('\n').map((l) => l.trim()).filter((l) => l && !l.startsWith('W:'));
  const err = lines.filter((l) => l.startsWith('E:'));
  return (err[err.length - 1] ?? lines[lines.length - 1] ?? `exit status ${r.code}`).slice(0, 300);
}

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
export const LAB_TOOLS: Record<LabArch, readonly Tool[]> = { x86_64: X86_TOOLS, arm64: ARM64_TOOLS };

/** Debian's name of each lab architecture. */
const DEB_ARCH: Record<LabArch, string> = { x86_64: 'amd64', arm64: 'arm64' };

const isRoot = (): boolean => process.getuid?.() === 0;

let aptUpdated = false;

async function aptUpdate(log: (s: string) => void, force = false): Promise<void> {
  if (aptUpdated && !force) return;
  if (!isRoot()) throw new LabError('the package lists need `apt-get update`, which needs root');
  log('lab: apt-get update');
  const r = await run('apt-get', ['update']);
  if (r.code !== 0) throw new LabError(`apt-get update failed: ${lastLine(r)}`);
  aptUpdated = true;
}

/** Runs an apt command; when it fails and the lists were not refreshed yet, runs `apt-get update` and tries once more. */
async function apt(cmd: string, args: readonly string[], log: (s: string) => void, cwd?: string): Promise<Ran> {
  let r = await run(cmd, args, { cwd });
  if (r.code !== 0 && !aptUpdated && isRoot()) {
    await aptUpdate(log);
    r = await run(cmd, args, { cwd });
  }
  return r;
}

/**
 * Makes Debian's packages of a foreign architecture visible to apt
 * (`dpkg --add-architecture` and `apt-get update`, as root); nothing of that
 * architecture is installed, the lab only downloads and unpacks.
 */
async function ensureDebArch(arch: LabArch, log: (s: string) => void): Promise<void> {
  const deb = DEB_ARCH[arch];
  const native = (await run('dpkg', ['--print-architecture'])).stdout.trim();
  if (native === deb) return;
  const foreign = (await run('dpkg', ['--print-foreign-architectures'])).stdout.split(/\s+/);
  if (foreign.includes(deb)) return;
  if (!isRoot()) throw new LabError(`the ${arch} lab needs Debian's ${deb} packages: run \`dpkg --add-architecture ${deb} && apt-get update\` as root`);
  log(`lab: dpkg --add-architecture ${deb}`);
  const r = await run('dpkg', ['--add-architecture', deb]);
  if (r.code !== 0) throw new LabError(`dpkg --add-architecture ${deb} failed: ${lastLine(r)}`);
  await aptUpdate(log, true);
}

/** Installs the packages of whichever tools are missing (needs root), updating the package lists first when a package is not found. */
export async function ensureTools(tools: readonly Tool[], log: (s: string) => void): Promise<void> {
  const missing = tools.filter((t) => !which(t.need));
  if (missing.length === 0) return;
  const pkgs = [...new Set(missing.map((t) => t.pkg))];
  const what = missing.map((t) => t.need).join(', ');
  if (!isRoot()) throw new LabError(`the lab needs ${what}: install with \`apt-get install -y --no-install-recommends ${pkgs.join(' ')}\` as root`);
  log(`lab: installing ${pkgs.join(' ')}`);
  const r = await apt('apt-get', ['install', '-y', '--no-install-recommends', ...pkgs], log);
  if (r.code !== 0) throw new LabError(`apt-get install ${pkgs.join(' ')} failed: ${lastLine(r)}`);
  const still = missing.filter((t) => !which(t.need));
  if (still.length) throw new LabError(`still missing after installing ${pkgs.join(' ')}: ${still.map((t) => t.need).join(', ')}`);
}

// ---------------------------------------------------------------------------
// Debian packages into the cache

/** "1:1.35.0-4+deb12u1" → "1_1.35.0-4+deb12u1": safe in a file name. */
const safeName = (s: string): string => s.replace(/[^A-Za-z0-9.+_-]/g, '_');

/** The candidate version of a package. */
async function candidateVersion(pkg: string, log: (s: string) => void): Promise<string> {
  const r = await apt('apt-cache', ['show', '--no-all-versions', pkg], log);
  const v = /^Version:\s*(\S+)/m.exec(r.stdout)?.[1];
  if (r.code !== 0 || !v) throw new LabError(`no Debian package ${pkg} here (${r.code !== 0 ? lastLine(r) : 'no version'}); the lab needs Debian's apt repositories`);
  return v;
}

/**
 * Downloads a package with `apt-get download` and unpacks it with `dpkg-deb -x`
 * into `dest`, atomically: a partial unpack never looks complete. `after` runs
 * on the unpacked tree before it is moved into place.
 */
async function unpackDeb(pkg: string, dest: string, log: (s: string) => void, after?: (root: string) => Promise<void>): Promise<void> {
  if (existsSync(dest)) return;
  mkdirSync(dirname(dest), { recursive: true });
  const tmp = mkdtempSync(join(dirname(dest), `.partial-${process.pid}-`));
  try {
    log(`lab: downloading ${pkg}`);
    const t0 = Date.now();
    const dl = await apt('apt-get', ['download', pkg], log, tmp);
    const deb = readdirSync(tmp).find((f) => f.endsWith('.deb'));
    if (dl.code !== 0 || !deb) throw new LabError(`apt-get download ${pkg} failed: ${lastLine(dl)}`);
    const root = join(tmp, 'root');
    const x = await run('dpkg-deb', ['-x', join(tmp, deb), root]);
    if (x.code !== 0) throw new LabError(`dpkg-deb -x ${deb} failed: ${lastLine(x)}`);
    rmSync(join(tmp, deb));
    if (after) await after(root);
    log(`lab: ${pkg} unpacked in ${((Date.now() - t0) / 1000).toFixed(1)} s`);
    try {
      renameSync(root, dest);
    } catch (e) {
      // Another process finished the same unpack first: use theirs.
      if (!existsSync(dest)) throw e;
    }
  } finally {
    rmSync(tmp, { recursive: true, force: true });
  }
}

interface Manifest {
  arch?: LabArch;
  version: string;
  package: string;
  image?: string;
  vmlinux: string;
  bzImage: string;
  modulesDir: string;
  busybox: string;
  config?: string;
  builtin: string[];
}

function readManifest(root: string, arch: LabArch): LabKernel | undefined {
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
    };
    const paths = [k.image, k.vmlinux, k.bzImage, k.modulesDir, k.busybox].filter((p) => p !== undefined);
    return paths.length >= 3 && paths.every((p) => existsSync(p)) ? k : undefined;
  } catch {
    return undefined;
  }
}

function writeManifest(root: string, k: LabKernel): void {
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
  };
  const tmp = join(root, `.default.json.${process.pid}`);
  writeFileSync(tmp, JSON.stringify(m, null, 2) + '\n');
  renameSync(tmp, join(root, 'default.json'));
}

/** Debian's static busybox for the lab's architecture, unpacked into the cache; returns the binary's path. */
async function fetchBusybox(cache: string, log: (s: string) => void, arch: LabArch = 'x86_64'): Promise<string> {
  const root = join(cache, arch);
  const have = existsSync(root) ? readdirSync(root).filter((d) => d.startsWith('busybox-static_')).sort() : [];
  for (const d of have.reverse()) if (existsSync(join(root, d, 'bin', 'busybox'))) return join(root, d, 'bin', 'busybox');
  const pkg = `busybox-static:${DEB_ARCH[arch]}`;
  const dest = join(root, `busybox-static_${safeName(await candidateVersion(pkg, log))}`);
  await unpackDeb(pkg, dest, log);
  const bin = join(dest, 'bin', 'busybox');
  if (!existsSync(bin)) throw new LabError(`busybox-static unpacked without bin/busybox (in ${dest})`);
  return bin;
}

/** The real kernel package linux-image-amd64 (-arm64) depends on now: linux-image-6.1.0-56-amd64. */
async function kernelPackage(log: (s: string) => void, arch: LabArch = 'x86_64'): Promise<string> {
  const deb = DEB_ARCH[arch];
  for (;;) {
    const dep = await apt('apt-cache', ['depends', `linux-image-${deb}:${deb}`], log);
    const pkg = /Depends:\s*(linux-image-[^\s:]+)/.exec(dep.stdout)?.[1];
    if (pkg) return pkg;
    if (aptUpdated || !isRoot()) throw new LabError(`cannot find Debian's ${arch} kernel package (apt-cache depends linux-image-${deb}: ${dep.code !== 0 ? lastLine(dep) : 'no linux-image dependency'})`);
    await aptUpdate(log);
  }
}

/**
 * The default lab kernel: Debian's stock x86_64 kernel (the package
 * linux-image-amd64 depends on) and static busybox, downloaded and unpacked
 * into the per-user cache on first use; later calls are offline. Installs the
 * tools the lab needs when missing. `refresh` looks for a newer kernel package.
 */
export async function labFetch(opts: { cacheDir?: string; log: (s: string) => void; refresh?: boolean; arch?: LabArch }): Promise<LabKernel> {
  if (opts.arch === 'arm64') return fetchArm64(opts);
  const { log } = opts;
  const cache = labCacheDir(opts.cacheDir);
  const root = join(cache, 'x86_64');
  await ensureTools(X86_TOOLS, log);
  if (!opts.refresh) {
    const k = readManifest(root, 'x86_64');
    if (k) {
      log(`lab: kernel ${k.version} (cached)`);
      return k;
    }
  }
  mkdirSync(root, { recursive: true });
  log("lab: looking up Debian's x86_64 kernel package");
  const pkg = await kernelPackage(log);
  const pkgVersion = await candidateVersion(`${pkg}:amd64`, log);
  const release = pkg.slice('linux-image-'.length);
  const dir = join(root, safeName(`${pkg}_${pkgVersion}`));
  await unpackDeb(`${pkg}:amd64`, dir, log, async (tree) => {
    const bz = join(tree, 'boot', `vmlinuz-${release}`);
    if (!existsSync(bz)) throw new LabError(`${pkg} has no boot/vmlinuz-${release}`);
    log('lab: extracting vmlinux from the bzImage');
    extractVmlinux(bz, join(tree, 'vmlinux'));
  });
  const busybox = await fetchBusybox(cache, log);
  const vmlinux = join(dir, 'vmlinux');
  const pvh = hasPvhNote(readFileSync(vmlinux));
  if (!pvh) log('lab: the kernel has no PVH entry (CONFIG_PVH); it will boot as a bzImage');
  const k = checkKernel({
    version: release,
    vmlinux: pvh ? vmlinux : undefined,
    bzImage: join(dir, 'boot', `vmlinuz-${release}`),
    modulesDir: join(dir, 'lib', 'modules', release),
    config: join(dir, 'boot', `config-${release}`),
    busybox,
    package: `${pkg} ${pkgVersion}`,
  });
  writeManifest(root, k);
  log(`lab: kernel ${k.version} (${k.package}) cached in ${dir}`);
  return k;
}

/**
 * Debian's stock arm64 kernel (the package linux-image-arm64 depends on) and
 * static busybox, downloaded and unpacked into the cache like the x86 ones.
 * The package's vmlinuz is an uncompressed Image; KVM is built in, and the
 * agent's virtio channel comes from the module tree.
 */
async function fetchArm64(opts: { cacheDir?: string; log: (s: string) => void; refresh?: boolean }): Promise<LabKernel> {
  const { log } = opts;
  const cache = labCacheDir(opts.cacheDir);
  const root = join(cache, 'arm64');
  await ensureTools(ARM64_TOOLS, log);
  if (!opts.refresh) {
    const k = readManifest(root, 'arm64');
    if (k) {
      log(`lab: arm64 kernel ${k.version} (cached)`);
      return k;
    }
  }
  await ensureDebArch('arm64', log);
  mkdirSync(root, { recursive: true });
  log("lab: looking up Debian's arm64 kernel package");
  const pkg = await kernelPackage(log, 'arm64');
  const pkgVersion = await candidateVersion(`${pkg}:arm64`, log);
  const release = pkg.slice('linux-image-'.length);
  const dir = join(root, safeName(`${pkg}_${pkgVersion}`));
  await unpackDeb(`${pkg}:arm64`, dir, log);
  const busybox = await fetchBusybox(cache, log, 'arm64');
  const k = checkArm64Kernel({
    version: release,
    image: join(dir, 'boot', `vmlinuz-${release}`),
    modulesDir: join(dir, 'lib', 'modules', release),
    config: join(dir, 'boot', `config-${release}`),
    busybox,
    package: `${pkg} ${pkgVersion}`,
  });
  writeManifest(root, k);
  log(`lab: arm64 kernel ${k.version} (${k.package}) cached in ${dir}`);
  return k;
}

// ---------------------------------------------------------------------------
// Kernel images

/** Reads up to n bytes from the start of a file. */
function head(path: string, n: number): Buffer {
  const fd = openSync(path, 'r');
  try {
    const b = Buffer.alloc(n);
    return b.subarray(0, readSync(fd, b, 0, n, 0));
  } finally {
    closeSync(fd);
  }
}

const isElf = (b: Buffer): boolean => b.length >= 64 && b.readUInt32BE(0) === 0x7f454c46;
/** The arm64 Image header: magic "ARM\x64" at offset 0x38 (Documentation/arm64/booting.rst). */
const isArm64Image = (b: Buffer): boolean => b.length >= 64 && b.readUInt32LE(0x38) === 0x644d5241;
const isBzImage = (b: Buffer): boolean => b.length >= 0x260 && b.toString('latin1', 0x202, 0x206) === 'HdrS';

/** The release word of a bzImage's kernel_version string ("6.1.0-56-amd64 (debian-kernel@…) #1 …"). */
function bzImageRelease(b: Buffer): string | undefined {
  const off = b.readUInt16LE(0x20e);
  if (!off || off + 0x200 >= b.length) return undefined;
  const end = b.indexOf(0, off + 0x200);
  return b.toString('latin1', off + 0x200, end < 0 ? undefined : end).split(' ')[0] || undefined;
}

/** The release in an uncompressed kernel's banner "Linux version 6.1.0-56-amd64 (…". */
function elfRelease(b: Buffer): string | undefined {
  const at = b.indexOf('Linux version ');
  if (at < 0) return undefined;
  return /^Linux version (\S+)/.exec(b.toString('latin1', at, at + 200))?.[1];
}

/** Whether a 64-bit x86 ELF kernel carries the Xen PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY) that QEMU boots directly. */
function hasPvhNote(b: Buffer): boolean {
  if (!isElf(b) || b[4] !== 2 || b[5] !== 1) return false; // ELFCLASS64, little-endian
  const phoff = Number(b.readBigUInt64LE(0x20));
  const phentsize = b.readUInt16LE(0x36);
  const phnum = b.readUInt16LE(0x38);
  for (let i = 0; i < phnum; i++) {
    const ph = phoff + i * phentsize;
    if (ph + 56 > b.length || b.readUInt32LE(ph) !== 4) continue; // PT_NOTE
    const off = Number(b.readBigUInt64LE(ph + 8));
    const end = Math.min(off + Number(b.readBigUInt64LE(ph + 32)), b.length);
    for (let n = off; n + 12 <= end; ) {
      const namesz = b.readUInt32LE(n);
      const descsz = b.readUInt32LE(n + 4);
      const type = b.readUInt32LE(n + 8);
      const name = b.toString('latin1', n + 12, n + 12 + Math.max(0, namesz - 1));
      if (name === 'Xen' && type === 18) return true;
      n += 12 + ((namesz + 3) & ~3) + ((descsz + 3) & ~3);
    }
  }
  return false;
}

/** The compressed kernel inside a bzImage, by its header's payload fields. */
function bzPayload(b: Buffer): Buffer {
  const setupSects = b[0x1f1] || 4;
  const start = (setupSects + 1) * 512 + b.readUInt32LE(0x248);
  const len = b.readUInt32LE(0x24c);
  if (start > 0 && len > 0 && start + len <= b.length) return b.subarray(start, start + len);
  // Old header: find the XZ stream by its magic.
  const xz = b.indexOf(Buffer.from([0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00]));
  if (xz < 0) throw new LabError('cannot find the compressed kernel in the bzImage');
  return b.subarray(xz);
}

/** Writes the uncompressed ELF kernel inside a bzImage to `out` (XZ with `xz -dc --single-stream`, gzip in-process, zstd with `zstd -dc`). */
export function extractVmlinux(bzImage: string, out: string): void {
  const b = readFileSync(bzImage);
  if (!isBzImage(b)) throw new LabError(`${bzImage} is not a bzImage (no HdrS header)`);
  const p = bzPayload(b);
  let tool: [string, string[]] | undefined;
  if (p.subarray(0, 6).equals(Buffer.from([0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00]))) tool = ['xz', ['-dc', '--single-stream']];
  else if (p.readUInt32LE(0) === 0xfd2fb528) tool = ['zstd', ['-dcq']];
  else if (p[0] === 0x1f && p[1] === 0x8b) {
    writeFileSync(out, gunzipSync(p.subarray(0, p.length - 4)));
    return;
  }
  if (!tool) throw new LabError(`${bzImage}: the kernel is compressed in a format the lab cannot unpack (magic ${p.subarray(0, 4).toString('hex')}); pass the uncompressed vmlinux instead`);
  if (!which(tool[0])) throw new LabError(`${bzImage} is ${tool[0]}-compressed and ${tool[0]} is not installed`);
  const tmp = `${out}.${process.pid}.tmp`;
  const fd = openSync(tmp, 'w');
  try {
    const r = spawnSync(tool[0], tool[1], { input: p, stdio: ['pipe', fd, 'pipe'], maxBuffer: 1 << 20 });
    // zstd and xz both stop at the end of the stream; the 4 size bytes after it are the bzImage's.
    if (r.status !== 0 || statSync(tmp).size === 0) throw new LabError(`${tool[0]} could not unpack the kernel in ${bzImage}: ${(r.stderr?.toString() ?? '').trim().split('\n')[0] ?? r.error?.message}`);
  } catch (e) {
    rmSync(tmp, { force: true });
    throw e;
  } finally {
    closeSync(fd);
  }
  renameSync(tmp, out);
}

// ---------------------------------------------------------------------------
// Module trees

/** A module file, decompressed (.ko, .ko.xz, .ko.gz, .ko.zst). */
export function readModule(path: string): Buffer {
  if (path.endsWith('.ko')) return readFileSync(path);
  let tool: [string, string[]];
  if (path.endsWith('.ko.gz')) return gunzipSync(readFileSync(path));
  else if (path.endsWith('.ko.xz')) tool = ['xz', ['-dc', path]];
  else if (path.endsWith('.ko.zst')) tool = ['zstd', ['-dcq', path]];
  else throw new LabError(`${path}: not a kernel module file`);
  const r = spawnSync(tool[0], tool[1], { maxBuffer: 1 << 30 });
  if (r.status !== 0) throw new LabError(`cannot decompress ${path}: ${r.error ? `${tool[0]} not installed` : (r.stderr.toString().trim() || `${tool[0]} failed`)}`);
  return r.stdout;
}

/** A field of a module's .modinfo ("depends", "vermagic"), or undefined. */
export function modinfo(ko: Buffer, key: string): string | undefined {
  const at = ko.indexOf(`\0${key}=`);
  if (at < 0) return undefined;
  const start = at + key.length + 2;
  const end = ko.indexOf(0, start);
  return ko.toString('latin1', start, end < 0 ? undefined : end);
}

const MODULE_FILE = /\.ko(\.xz|\.gz|\.zst)?$/;
const nameOf = (path: string): string => moduleName(basename(path).replace(MODULE_FILE, ''));

/** What a lib/modules/<version> directory offers: module files by name, modules.dep, modules.builtin. */
export interface ModuleTree {
  dir: string;
  /** Module name (underscores) → absolute path of its file. */
  files: Map<string, string>;
  /** Module name → its modules.dep list (all dependencies, in the order modprobe reverses to load), when modules.dep exists. */
  deps?: Map<string, string[]>;
  /** Module names listed in modules.builtin. */
  builtin: Set<string>;
}

export function moduleTree(dir: string): ModuleTree {
  const files = new Map<string, string>();
  const builtin = new Set<string>();
  let deps: Map<string, string[]> | undefined;
  const depFile = join(dir, 'modules.dep');
  if (existsSync(depFile)) {
    deps = new Map();
    for (const line of readFileSync(depFile, 'utf8').split('\n')) {
      const colon = line.indexOf(':');
      if (colon < 0) continue;
      const path = line.slice(0, colon).trim();
      const name = nameOf(path);
      files.set(name, resolve(dir, path));
      deps.set(name, line.slice(colon + 1).trim().split(/\s+/).filter(Boolean).map(nameOf));
    }
  } else {
    for (const f of readdirSync(dir, { recursive: true, encoding: 'utf8' })) {
      if (MODULE_FILE.test(f) && !files.has(nameOf(f))) files.set(nameOf(f), join(dir, f));
    }
  }
  const bi = join(dir, 'modules.builtin');
  if (existsSync(bi)) for (const line of readFileSync(bi, 'utf8').split('\n')) if (line.trim()) builtin.add(nameOf(line.trim()));
  return { dir, files, deps, builtin };
}

/**
 * The modules to insmod, in load order, for `names` and everything they depend
 * on, skipping built-in ones. Dependencies come from modules.dep, or from each
 * module's own `depends=` when the tree has no modules.dep.
 */
export function loadOrder(tree: ModuleTree, names: readonly string[], builtin: ReadonlySet<string> = tree.builtin): string[] {
  const out: string[] = [];
  const visit = (name: string, from: string | undefined, path: string[]): void => {
    if (out.includes(name) || builtin.has(name)) return;
    if (path.includes(name)) throw new LabError(`module dependency cycle: ${[...path, name].join(' → ')}`);
    const file = tree.files.get(name);
    if (!file) throw new LabError(from ? `${basename(tree.files.get(from)!).replace(MODULE_FILE, '.ko')} needs ${name}.ko, which is not in ${tree.dir}` : `no ${name}.ko in ${tree.dir}`);
    const listed = tree.deps?.get(name);
    const direct = listed ? [...listed].reverse() : (modinfo(readModule(file), 'depends') ?? '').split(',').filter(Boolean).map(moduleName);
    for (const d of direct) visit(d, name, [...path, name]);
    out.push(name);
  };
  for (const n of names) visit(moduleName(n), undefined, []);
  return out;
}

// ---------------------------------------------------------------------------
// Checking a kernel before boot

/** A kernel config as a map: CONFIG_X → "y" | "m" | "n" | value. */
export function parseConfig(text: string): Map<string, string> {
  const m = new Map<string, string>();
  for (const line of text.split('\n')) {
    const set = /^(CONFIG_\w+)=(.*)$/.exec(line);
    if (set) m.set(set[1]!, set[2]!.replace(/^"(.*)"$/, '$1'));
    const unset = /^# (CONFIG_\w+) is not set/.exec(line);
    if (unset) m.set(unset[1]!, 'n');
  }
  return m;
}

/** The config embedded by CONFIG_IKCONFIG in an uncompressed kernel, if any. */
function embeddedConfig(image: Buffer): string | undefined {
  const st = image.indexOf('IKCFG_ST');
  if (st < 0) return undefined;
  const ed = image.indexOf('IKCFG_ED', st);
  try {
    return gunzipSync(image.subarray(st + 8, ed < 0 ? undefined : ed)).toString('utf8');
  } catch {
    return undefined;
  }
}

/** Options the x86 lab needs, "y" or "y or m", and what for. */
const X86_NEEDS: readonly { option: string; values: string; why: string }[] = [
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

/**
 * Checks that a kernel has what the lab needs, as far as can be known before
 * boot: the config options (when a config is known), the KVM modules and their
 * dependencies in the module tree, the modules' vermagic against the kernel's
 * release, a bootable image. Throws one LabError naming everything missing.
 */
function checkKernel(c: Candidate): LabKernel {
  const problems: string[] = [];
  const text = c.configText ?? (c.config && existsSync(c.config) ? readFileSync(c.config, 'utf8') : undefined);
  const config = text === undefined ? undefined : parseConfig(text);
  if (config) {
    for (const n of X86_NEEDS) {
      const v = config.get(n.option) ?? 'n';
      if (!n.values.includes(v)) problems.push(`${n.option} is ${v === 'n' ? 'not set' : `=${v}`} (needed for ${n.why})`);
    }
  }
  const builtin = new Set<string>();
  const tree = c.modulesDir ? moduleTree(c.modulesDir) : undefined;
  const unplaced: string[] = [];
  for (const m of [...KVM_MODULES.x86_64, ...X86_CHANNEL_MODULES]) {
    const v = config?.get(m.config);
    const file = `${m.module.replace(/_/g, '-')}.ko`;
    if (v === 'y' || tree?.builtin.has(m.module)) builtin.add(m.module);
    else if (config && v !== 'm') continue; // reported above
    else if (!tree) unplaced.push(config ? file : `${file} (unless ${m.config}=y)`);
    else if (!tree.files.has(m.module)) problems.push(`no ${file} in ${tree.dir} (the lab needs a kernel built with ${m.config})`);
  }
  if (unplaced.length) problems.push(`the lab needs ${unplaced.join(' and ')}: give the modules directory lib/modules/<version>`);
  let vermagic: string | undefined;
  if (tree && problems.length === 0) {
    try {
      const order = loadOrder(tree, [...KVM_MODULES.x86_64, ...X86_CHANNEL_MODULES].map((m) => m.module), builtin);
      const kvm = order.find((n) => n === 'kvm') ?? order[0];
      if (kvm) vermagic = modinfo(readModule(tree.files.get(kvm)!), 'vermagic')?.split(' ')[0];
    } catch (e) {
      if (!(e instanceof LabError)) throw e;
      problems.push(e.message);
    }
  }
  const version = c.version ?? vermagic;
  if (vermagic && version && vermagic !== version) problems.push(`the modules are built for ${vermagic} but the kernel is ${version}`);
  if (!c.vmlinux && !c.bzImage) problems.push('no bootable image (a vmlinux with a PVH entry, CONFIG_PVH=y, or a bzImage)');
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

/** Options the arm64 lab needs, and what for. */
const ARM64_NEEDS: readonly { option: string; values: string; why: string }[] = [
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

/**
 * The arm64 counterpart of checkKernel(): KVM built in, the virtio modules
 * of the agent's channel in the module tree unless built in, their vermagic
 * against the release, an Image to boot.
 */
function checkArm64Kernel(c: Omit<Candidate, 'vmlinux' | 'bzImage'> & { image?: string }): LabKernel {
  const problems: string[] = [];
  const text = c.configText ?? (c.config && existsSync(c.config) ? readFileSync(c.config, 'utf8') : undefined);
  const config = text === undefined ? undefined : parseConfig(text);
  if (config) {
    for (const n of ARM64_NEEDS) {
      const v = config.get(n.option) ?? 'n';
      if (!n.values.includes(v)) problems.push(`${n.option} is ${v === 'n' ? 'not set' : `=${v}`} (needed for ${n.why})`);
    }
  }
  const tree = c.modulesDir ? moduleTree(c.modulesDir) : undefined;
  const builtin = new Set<string>(['kvm']);
  const wanted: string[] = [];
  for (const m of ARM64_CHANNEL_MODULES) {
    const v = config?.get(m.config);
    if (v === 'y' || tree?.builtin.has(m.module)) builtin.add(m.module);
    else if (config && v !== 'm') continue; // reported above
    else if (!tree) problems.push(`the lab needs ${m.module.replace(/_/g, '-')}.ko${config ? '' : ` (unless ${m.config}=y)`}: give the modules directory lib/modules/<version>`);
    else if (!tree.files.has(m.module)) problems.push(`no ${m.module}.ko in ${tree.dir} (the lab needs a kernel built with ${m.config})`);
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
  if (vermagic && version && vermagic !== version) problems.push(`the modules are built for ${vermagic} but the kernel is ${version}`);
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

/** The version directory when given lib/modules/<v>, lib/modules or a tree root containing lib/modules/<v>. */
function modulesVersionDir(dir: string): string {
  if (existsSync(join(dir, 'modules.dep')) || existsSync(join(dir, 'kernel'))) return dir;
  for (const base of [dir, join(dir, 'lib', 'modules')]) {
    if (!existsSync(base) || !statSync(base).isDirectory()) continue;
    const sub = readdirSync(base).filter((d) => existsSync(join(base, d, 'modules.dep')) || existsSync(join(base, d, 'kernel')));
    if (sub.length === 1) return join(base, sub[0]!);
  }
  return dir;
}

/**
 * The user's own kernel: a bzImage or an uncompressed vmlinux, and the module
 * directory (lib/modules/<version>) holding kvm.ko and kvm-amd.ko unless they
 * are built in. A bzImage is unpacked once into the cache to boot by PVH.
 * The config is looked for beside the image, in a build tree, or embedded
 * (CONFIG_IKCONFIG). Without `kernel`, the default lab kernel is fetched.
 * `busybox` overrides the static busybox otherwise fetched into the cache.
 */
export async function resolveKernel(opts: {
  kernel?: string;
  modules?: string;
  config?: string;
  busybox?: string;
  cacheDir?: string;
  arch?: LabArch;
  log?: (s: string) => void;
}): Promise<LabKernel> {
  const log = opts.log ?? (() => {});
  const arch = opts.arch ?? 'x86_64';
  if (!opts.kernel) {
    if (opts.modules) throw new LabError('a modules directory was given without a kernel');
    return labFetch({ cacheDir: opts.cacheDir, log, arch });
  }
  const image = readable(opts.kernel, 'kernel image');
  if (!statSync(image).isFile()) throw new LabError(`kernel image is not a file: ${opts.kernel}`);
  let modulesDir: string | undefined;
  if (opts.modules) {
    modulesDir = modulesVersionDir(readable(opts.modules, 'modules directory'));
    if (!statSync(modulesDir).isDirectory()) throw new LabError(`modules directory is not a directory: ${opts.modules}`);
  }
  const config = opts.config ? readable(opts.config, 'kernel config') : undefined;
  const h = head(image, 0x1000);
  if (arch === 'arm64') {
    if (!isArm64Image(h)) throw new LabError(`kernel image ${opts.kernel} is not an arm64 Image (no "ARM\\x64" magic at 0x38; pass arch/arm64/boot/Image)`);
    const img = readFileSync(image);
    const version = elfRelease(img);
    const configText = config ? undefined : embeddedConfig(img);
    const found = config ?? configCandidates(image, version, modulesDir).find((p) => existsSync(p));
    if (!found && configText === undefined) log('lab: no kernel config found; checking the module tree only');
    const k = checkArm64Kernel({ version, image, modulesDir, config: found, configText: found ? undefined : configText, busybox: '' });
    if (opts.busybox) return { ...k, busybox: readable(opts.busybox, 'busybox') };
    await ensureTools(ARM64_TOOLS, log);
    await ensureDebArch('arm64', log);
    return { ...k, busybox: await fetchBusybox(labCacheDir(opts.cacheDir), log, 'arm64') };
  }
  if (isArm64Image(h)) throw new LabError(`kernel image ${opts.kernel} is an arm64 Image: use --arch arm64 with an arm64 profile`);
  let vmlinux: string | undefined;
  let bzImage: string | undefined;
  let version: string | undefined;
  if (isBzImage(h)) {
    bzImage = image;
    version = bzImageRelease(h);
    const st = statSync(image);
    const key = createHash('sha256').update(`${image}\0${st.size}\0${st.mtimeMs}`).digest('hex').slice(0, 16);
    const dir = join(labCacheDir(opts.cacheDir), 'user', key);
    vmlinux = join(dir, 'vmlinux');
    if (!existsSync(vmlinux)) {
      await ensureTools(X86_TOOLS.filter((t) => t.need === 'xz'), log);
      mkdirSync(dir, { recursive: true });
      log(`lab: extracting vmlinux from ${opts.kernel}`);
      extractVmlinux(image, vmlinux);
    }
  } else if (isElf(h)) {
    vmlinux = image;
  } else {
    throw new LabError(`kernel image ${opts.kernel} is neither a bzImage nor an ELF vmlinux`);
  }
  const elf = readFileSync(vmlinux);
  if (elf.readUInt16LE(0x12) !== 62) throw new LabError(`kernel image ${opts.kernel} is not an x86_64 kernel`);
  version ??= elfRelease(elf);
  const configText = config ? undefined : embeddedConfig(elf);
  if (!hasPvhNote(elf)) {
    if (!bzImage) throw new LabError(`kernel image ${opts.kernel} has no PVH entry (CONFIG_PVH is not set): pass its bzImage instead`);
    log('lab: the kernel has no PVH entry (CONFIG_PVH); booting the bzImage');
    vmlinux = undefined;
  }
  const found = config ?? configCandidates(image, version, modulesDir).find((p) => existsSync(p));
  if (!found && configText === undefined) log('lab: no kernel config found; checking the module tree only');
  const c: Candidate = { version, vmlinux, bzImage, modulesDir, config: found, configText: found ? undefined : configText, busybox: '' };
  const k = checkKernel(c);
  if (opts.busybox) return { ...k, busybox: readable(opts.busybox, 'busybox') };
  await ensureTools(X86_TOOLS, log);
  return { ...k, busybox: await fetchBusybox(labCacheDir(opts.cacheDir), log) };
}

/** Where a kernel's config may be: config-<v> beside the image or in ../boot, .config of a build tree, the module tree's build link. */
function configCandidates(image: string, version: string | undefined, modulesDir: string | undefined): string[] {
  const dir = dirname(image);
  const out: string[] = [];
  if (version) out.push(join(dir, `config-${version}`));
  out.push(join(dir, '.config'), resolve(dir, '../../../.config')); // vmlinux in the tree root; arch/x86/boot/bzImage
  if (modulesDir) {
    out.push(join(modulesDir, 'build', '.config'), join(modulesDir, 'config'));
    const v = version ?? basename(modulesDir);
    out.push(resolve(modulesDir, '../../../boot', `config-${v}`));
  }
  return out;
}

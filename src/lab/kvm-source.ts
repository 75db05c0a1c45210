// Patch validation from a KVM source tree: `lab source` unpacks Debian's
// source of a lab release's exact kernel (KVM's directories, or all of it),
// and `lab run --kvm-source DIR` builds kvm.ko, kvm-amd.ko and kvm-intel.ko
// from DIR's arch/x86/kvm and virt/kvm out of tree against the release's
// headers (make -C /usr/src/linux-headers-<release> M=DIR/arch/x86/kvm, with
// a Kbuild beside KVM's Makefile: kbuild rebuilds only what changed), checks
// them against the booted kernel (vermagic and the CRC of every symbol they
// import, as the stock modules import them), and boots the lab with them.
import { spawn } from 'node:child_process';
import { existsSync, mkdirSync, readdirSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { cpus } from 'node:os';
import { join, resolve } from 'node:path';
import { labCacheDir, labFetch, labRelease, moduleTree, readModule, type LabKernel } from './fetch/index.js';
import { aptInstall, candidateVersion, labAptSource, unpackDeb } from './fetch/apt.js';
import { modinfo } from './fetch/modules.js';
import { LabError } from './profiles.js';

/** The file `lab source` leaves in the tree: which release and package it is the source of. */
export const SOURCE_MARK = '.kvmharness-source.json';

/** The KVM modules built from a tree, by module name. */
const KVM_KOS = { kvm: 'kvm.ko', kvm_amd: 'kvm-amd.ko', kvm_intel: 'kvm-intel.ko' } as const;

/** The release a tree made by `lab source` is of, if it says. */
export function sourceRelease(dir: string): string | undefined {
  try {
    return (JSON.parse(readFileSync(join(dir, SOURCE_MARK), 'utf8')) as { release?: string }).release;
  } catch {
    return undefined;
  }
}

function run(cmd: string, args: readonly string[], log?: (s: string) => void): Promise<{ code: number; out: string }> {
  return new Promise((done, fail) => {
    const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, LC_ALL: 'C' } });
    let out = '';
    const take = (d: Buffer) => {
      out += d.toString();
      if (out.length > 1 << 20) out = out.slice(-(1 << 19));
    };
    child.stdout.on('data', take);
    child.stderr.on('data', take);
    child.on('error', (e) =>
      fail(new LabError(`cannot run ${cmd}: ${(e as NodeJS.ErrnoException).code ?? e.message}`)),
    );
    child.on('close', (code) => {
      if (log && code !== 0) log(out.split('\n').slice(-20).join('\n'));
      done({ code: code ?? 1, out });
    });
  });
}

/**
 * `lab source --release R DIR`: Debian's linux-source-<series> package of
 * exactly the version of the release's cached kernel, its KVM directories
 * (arch/x86/kvm, virt/kvm; `full`: the whole tree) unpacked into DIR.
 */
export async function labSource(o: {
  release?: string;
  dir: string;
  full?: boolean;
  log: (s: string) => void;
}): Promise<string> {
  const release = labRelease(o.release);
  const kernel = await labFetch({ release: release.name, arch: 'x86_64', log: o.log });
  const pkgVersion = kernel.package?.split(' ')[1];
  if (!pkgVersion)
    throw new LabError(
      `the cached ${release.name} kernel does not name its Debian package; run \`lab fetch --release ${release.name} --refresh\``,
    );
  const pkg = `linux-source-${release.name}`;
  const cache = labCacheDir();
  const where = join(cache, 'source', `${pkg}_${pkgVersion}`);
  // The suite's sources first (one version each), then the host's (they may keep older ones).
  if (!existsSync(where)) {
    const suite = labAptSource(cache, release.suite);
    const have = await candidateVersion(pkg, o.log, suite).catch(() => undefined);
    const src = have === pkgVersion ? suite : undefined;
    await unpackDeb(`${pkg}=${pkgVersion}`, where, o.log, undefined, src).catch((e: unknown) => {
      throw new LabError(
        `no ${pkg} ${pkgVersion} (the source of ${kernel.version}) in Debian's archive here: ${(e as Error).message}`,
      );
    });
  }
  const tarball = join(where, 'usr', 'src', `${pkg}.tar.xz`);
  if (!existsSync(tarball)) throw new LabError(`${pkg} ${pkgVersion} has no usr/src/${pkg}.tar.xz`);
  const dir = resolve(o.dir);
  if (existsSync(dir) && readdirSync(dir).length) throw new LabError(`${o.dir} is not empty`);
  mkdirSync(dir, { recursive: true });
  const top = `${pkg}/`;
  const parts = o.full ? [] : ['arch/x86/kvm', 'virt/kvm'].map((p) => top + p);
  o.log(
    `lab: unpacking ${o.full ? 'the whole tree' : 'arch/x86/kvm and virt/kvm'} of ${pkg} ${pkgVersion} into ${dir}`,
  );
  const r = await run('tar', ['-xJf', tarball, '-C', dir, '--strip-components=1', ...parts]);
  if (r.code !== 0) throw new LabError(`tar could not unpack ${tarball}: ${r.out.trim().split('\n').pop()}`);
  writeFileSync(
    join(dir, SOURCE_MARK),
    JSON.stringify({ release: release.name, kernel: kernel.version, package: `${pkg} ${pkgVersion}` }, null, 2) + '\n',
  );
  return dir;
}

/** A module's imported symbols and their CRCs (the __versions section: 64-byte entries, CRC then name). */
export function moduleVersions(ko: Buffer): Map<string, number> {
  const out = new Map<string, number>();
  if (ko.readUInt32BE(0) !== 0x7f454c46 || ko[4] !== 2) return out;
  const shoff = Number(ko.readBigUInt64LE(0x28));
  const shentsize = ko.readUInt16LE(0x3a);
  const shnum = ko.readUInt16LE(0x3c);
  const shstrndx = ko.readUInt16LE(0x3e);
  const sec = (i: number) => {
    const h = shoff + i * shentsize;
    return {
      name: ko.readUInt32LE(h),
      offset: Number(ko.readBigUInt64LE(h + 0x18)),
      size: Number(ko.readBigUInt64LE(h + 0x20)),
    };
  };
  const strtab = sec(shstrndx);
  for (let i = 0; i < shnum; i++) {
    const s = sec(i);
    const at = strtab.offset + s.name;
    if (ko.toString('latin1', at, ko.indexOf(0, at)) !== '__versions') continue;
    for (let e = s.offset; e + 64 <= s.offset + s.size; e += 64) {
      const crc = ko.readUInt32LE(e);
      const name = ko.toString('latin1', e + 8, ko.indexOf(0, e + 8));
      out.set(name, crc);
    }
  }
  return out;
}

/**
 * Why the built module does not match the stock one of the booted kernel,
 * or undefined: vermagic, then the CRC of each symbol both import from the
 * kernel (a symbol only the built module imports is checked when the stock
 * tree's other modules or the kernel export it with a known CRC: not here).
 */
export function mismatch(built: Buffer, stock: Buffer, name: string): string | undefined {
  const bv = modinfo(built, 'vermagic');
  const sv = modinfo(stock, 'vermagic');
  if (bv !== sv) return `${name}: vermagic '${bv ?? 'none'}' but the booted kernel's is '${sv ?? 'none'}'`;
  const bs = moduleVersions(built);
  const ss = moduleVersions(stock);
  const off = [...bs].filter(([sym, crc]) => ss.has(sym) && ss.get(sym) !== crc).map(([sym]) => sym);
  if (off.length)
    return `${name}: ${off.length} symbol version(s) differ from the booted kernel's (${off.slice(0, 3).join(', ')}${off.length > 3 ? ', …' : ''})`;
  return undefined;
}

/** The headers tree of the kernel, installed from Debian's linux-headers-<release> when missing (as root). */
async function headersDir(kernel: LabKernel, log: (s: string) => void): Promise<string> {
  const dir = `/usr/src/linux-headers-${kernel.version}`;
  if (existsSync(join(dir, 'Makefile'))) return dir;
  log(`lab: installing linux-headers-${kernel.version} (to build KVM against)`);
  try {
    await aptInstall([`linux-headers-${kernel.version}`], log);
  } catch (e) {
    throw new LabError(
      `cannot build against ${kernel.version}: ${(e as Error).message} (its headers must install on this host)`,
    );
  }
  if (!existsSync(join(dir, 'Makefile')))
    throw new LabError(`linux-headers-${kernel.version} installed no ${dir}/Makefile`);
  return dir;
}

/**
 * The Kbuild beside KVM's Makefile: the Makefile itself, with the paths it
 * takes from the kernel tree ($(srctree)/arch/x86/kvm, $(srctree)/virt/kvm)
 * pointed into the source tree, and arch/x86 on the include path so that
 * the tracepoint headers' TRACE_INCLUDE_PATH (../../arch/x86/kvm) resolves.
 */
export function kbuildFor(makefile: string): string {
  return [
    '# Written by kvmharness lab run --kvm-source: KVM built out of tree against',
    "# the lab kernel's headers. Remove it to build in a full tree again.",
    'ccflags-y += -I $(src)/..',
    makefile
      .replace(/\$\(srctree\)\/arch\/x86\/kvm/g, '$(src)')
      .replace(/\$\(srctree\)\/virt\/kvm/g, '$(src)/../../../virt/kvm'),
  ].join('\n');
}

/**
 * Builds KVM's modules from the tree at `dir` against the kernel's headers
 * (incrementally), checks them against the kernel's stock modules, and
 * returns the kernel with them in place of the stock ones.
 */
export async function withKvmSource(kernel: LabKernel, dir: string, log: (s: string) => void): Promise<LabKernel> {
  if (kernel.arch !== 'x86_64') throw new LabError('--kvm-source builds x86 KVM: use an x86 profile');
  if (!kernel.modulesDir)
    throw new LabError(`the kernel ${kernel.version} has no module tree to check the built modules against`);
  const kvmDir = resolve(dir, 'arch', 'x86', 'kvm');
  const makefile = join(kvmDir, 'Makefile');
  if (!existsSync(makefile) || !existsSync(resolve(dir, 'virt', 'kvm'))) {
    throw new LabError(
      `${dir} is not a kernel source tree with arch/x86/kvm and virt/kvm (\`lab source --release R DIR\` makes one)`,
    );
  }
  const headers = await headersDir(kernel, log);
  const kbuild = kbuildFor(readFileSync(makefile, 'utf8'));
  const kbuildPath = join(kvmDir, 'Kbuild');
  if (!existsSync(kbuildPath) || readFileSync(kbuildPath, 'utf8') !== kbuild) {
    const tmp = `${kbuildPath}.${process.pid}.tmp`;
    writeFileSync(tmp, kbuild);
    renameSync(tmp, kbuildPath);
  }
  log(`lab: building KVM from ${dir} against ${headers}`);
  const t0 = Date.now();
  const r = await run('make', ['-C', headers, `M=${kvmDir}`, `-j${Math.max(1, cpus().length)}`, 'modules'], log);
  if (r.code !== 0)
    throw new LabError(`building KVM from ${dir} failed (make exit ${r.code}); the compiler's last lines are above`);
  log(`lab: KVM built in ${((Date.now() - t0) / 1000).toFixed(1)} s`);
  const stock = moduleTree(kernel.modulesDir);
  const overrides: Record<string, string> = {};
  for (const [name, file] of Object.entries(KVM_KOS)) {
    const built = join(kvmDir, file);
    if (!existsSync(built)) continue;
    const theirs = stock.files.get(name);
    if (!theirs) continue;
    const why = mismatch(readFileSync(built), readModule(theirs), file);
    if (why) throw new LabError(`${dir} does not match the booted kernel ${kernel.version}: ${why}`);
    overrides[name] = built;
  }
  if (!overrides.kvm) throw new LabError(`the build of ${dir} made no kvm.ko`);
  return { ...kernel, moduleOverrides: { ...kernel.moduleOverrides, ...overrides } };
}

/** Removes what a build left in the tree (make clean), for tests. */
export async function cleanKvmSource(kernel: LabKernel, dir: string): Promise<void> {
  const kvmDir = resolve(dir, 'arch', 'x86', 'kvm');
  await run('make', ['-C', `/usr/src/linux-headers-${kernel.version}`, `M=${kvmDir}`, 'clean']);
  rmSync(join(kvmDir, 'Kbuild'), { force: true });
}

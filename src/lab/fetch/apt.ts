// Debian's packages into the lab's cache: apt-get download and dpkg-deb -x,
// never an install of a kernel. The package lists are refreshed
// (`apt-get update`) once when a lookup fails, and a foreign architecture is
// added to dpkg when the lab needs its packages. A kernel release's packages
// come through the lab's own apt configuration (its own sources list, lists
// and status file under the cache, one per Debian suite): the host's sources
// are left as they are.
import { spawn } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import type { Arch } from '../../arch/arch.js';
import { LabError } from '../profiles.js';

interface Ran {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs a program (no shell) to completion; rejects only when it cannot be started. */
function run(cmd: string, args: readonly string[], opts: { cwd?: string } = {}): Promise<Ran> {
  return new Promise((done, fail) => {
    const child = spawn(cmd, args, {
      cwd: opts.cwd,
      stdio: ['ignore', 'pipe', 'pipe'],
      env: { ...process.env, DEBIAN_FRONTEND: 'noninteractive', LC_ALL: 'C' },
    });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (s: string) => (stdout += s));
    child.stderr.setEncoding('utf8').on('data', (s: string) => (stderr += s));
    child.on('error', (e) =>
      fail(new LabError(`cannot run ${cmd}: ${(e as NodeJS.ErrnoException).code ?? e.message}`)),
    );
    child.on('close', (code, signal) => done({ code: code ?? (signal ? 128 : 1), stdout, stderr }));
  });
}

/** The last meaningful line of a failed command's output, for a one-line message. */
function lastLine(r: Ran): string {
  const lines = `${r.stderr}\n${r.stdout}`
    .split('\n')
    .map((l) => l.trim())
    .filter((l) => l && !l.startsWith('W:'));
  const err = lines.filter((l) => l.startsWith('E:'));
  return (err[err.length - 1] ?? lines[lines.length - 1] ?? `exit status ${r.code}`).slice(0, 300);
}

/** Debian's name of each lab architecture. */
export const DEB_ARCH: Record<Arch, string> = { x86_64: 'amd64', arm64: 'arm64' };

export const isRoot = (): boolean => process.getuid?.() === 0;

/** Which package lists apt reads: the host's, or one of the lab's own (a Debian suite's). */
export interface AptSource {
  /** For messages: "the host's", "trixie". */
  name: string;
  /** The `-o` options that point apt at this configuration (none for the host's). */
  options: readonly string[];
  /** Whether `apt-get update` ran for it in this process. */
  updated: boolean;
}

/** The host's own apt configuration. */
const HOST: AptSource = { name: "the host's", options: [], updated: false };

/** The Debian suites of each lab apt configuration: a suite and its updates. */
const SUITE_LISTS: Record<string, readonly string[]> = {
  bookworm: ['debian bookworm', 'debian bookworm-updates', 'debian-security bookworm-security'],
  trixie: ['debian trixie', 'debian trixie-updates', 'debian-security trixie-security'],
  sid: ['debian sid'],
};

const labSources = new Map<string, AptSource>();

/**
 * The lab's own apt configuration for a Debian suite, under `<cache>/apt/<suite>`:
 * its sources list, package lists and an empty dpkg status, for both lab
 * architectures. Needs no `dpkg --add-architecture`, and no root once the
 * lists are there.
 */
export function labAptSource(cache: string, suite: string): AptSource {
  const dir = join(cache, 'apt', suite);
  const known = labSources.get(dir);
  if (known) return known;
  const lists = SUITE_LISTS[suite];
  if (!lists) throw new LabError(`no lab apt configuration for Debian ${suite}`);
  for (const d of ['lists/partial', 'cache/archives/partial', 'preferences.d'])
    mkdirSync(join(dir, d), { recursive: true });
  const keyring = '/usr/share/keyrings/debian-archive-keyring.gpg';
  const text = lists.map((l) => {
    const [archive, s] = l.split(' ');
    return `deb [signed-by=${keyring}] http://deb.debian.org/${archive} ${s} main\n`;
  });
  writeFileSync(join(dir, 'sources.list'), text.join(''));
  if (!existsSync(join(dir, 'status'))) writeFileSync(join(dir, 'status'), '');
  const options = [
    `Dir::Etc::sourcelist=${join(dir, 'sources.list')}`,
    'Dir::Etc::sourceparts=-',
    `Dir::Etc::preferencesparts=${join(dir, 'preferences.d')}`,
    'Dir::Etc::preferences=/dev/null',
    `Dir::State::Lists=${join(dir, 'lists')}`,
    `Dir::State::status=${join(dir, 'status')}`,
    `Dir::Cache=${join(dir, 'cache')}`,
    'APT::Architectures::=amd64',
    'APT::Architectures::=arm64',
  ].flatMap((o) => ['-o', o]);
  const src: AptSource = { name: suite, options, updated: false };
  labSources.set(dir, src);
  return src;
}

/** Whether the lab's apt configuration for the suite has package lists (a lookup can run without `apt-get update`). */
const hasLists = (src: AptSource): boolean => {
  const o = src.options.find((x) => x.startsWith('Dir::State::Lists='));
  return !o || readdirSync(o.slice('Dir::State::Lists='.length)).some((f) => /_Packages(\.\w+)?$/.test(f));
};

/**
 * apt and dpkg take their locks without waiting, so two lab runs that
 * install or update at once (two --kvm-source builds installing the same
 * headers) fail with "Unable to acquire the dpkg frontend lock". Every apt
 * call of the lab's therefore waits its turn on one lock file (flock(1)).
 */
const APT_LOCK = '/run/lock/kvmharness-apt.lock';
const aptLocked = (cmd: string, args: readonly string[]): [string, string[]] => [
  'flock',
  ['-w', '900', APT_LOCK, cmd, ...args],
];

async function aptUpdate(log: (s: string) => void, force = false, src: AptSource = HOST): Promise<void> {
  if (src.updated && !force) return;
  if (!isRoot()) throw new LabError('the package lists need `apt-get update`, which needs root');
  log(`lab: apt-get update${src === HOST ? '' : ` (the lab's ${src.name} sources)`}`);
  const r = await run(...aptLocked('apt-get', [...src.options, 'update']));
  if (r.code !== 0) throw new LabError(`apt-get update failed: ${lastLine(r)}`);
  src.updated = true;
}

/** Runs an apt command; when it fails and the lists were not refreshed yet, runs `apt-get update` and tries once more. */
async function apt(
  cmd: string,
  args: readonly string[],
  log: (s: string) => void,
  cwd?: string,
  src: AptSource = HOST,
): Promise<Ran> {
  if (!src.updated && !hasLists(src)) await aptUpdate(log, false, src);
  let r = await run(...aptLocked(cmd, [...src.options, ...args]), { cwd });
  if (r.code !== 0 && !src.updated && isRoot()) {
    await aptUpdate(log, false, src);
    r = await run(...aptLocked(cmd, [...src.options, ...args]), { cwd });
  }
  return r;
}

/** `apt-get install -y --no-install-recommends` (needs root); throws a LabError naming the packages when it fails. */
export async function aptInstall(pkgs: readonly string[], log: (s: string) => void): Promise<void> {
  const r = await apt('apt-get', ['install', '-y', '--no-install-recommends', ...pkgs], log);
  if (r.code !== 0) throw new LabError(`apt-get install ${pkgs.join(' ')} failed: ${lastLine(r)}`);
}

/**
 * Makes Debian's packages of a foreign architecture visible to apt
 * (`dpkg --add-architecture` and `apt-get update`, as root); nothing of that
 * architecture is installed, the lab only downloads and unpacks.
 */
export async function ensureDebArch(arch: Arch, log: (s: string) => void): Promise<void> {
  const deb = DEB_ARCH[arch];
  const native = (await run('dpkg', ['--print-architecture'])).stdout.trim();
  if (native === deb) return;
  const foreign = (await run('dpkg', ['--print-foreign-architectures'])).stdout.split(/\s+/);
  if (foreign.includes(deb)) return;
  if (!isRoot())
    throw new LabError(
      `the ${arch} lab needs Debian's ${deb} packages: run \`dpkg --add-architecture ${deb} && apt-get update\` as root`,
    );
  log(`lab: dpkg --add-architecture ${deb}`);
  const r = await run('dpkg', ['--add-architecture', deb]);
  if (r.code !== 0) throw new LabError(`dpkg --add-architecture ${deb} failed: ${lastLine(r)}`);
  await aptUpdate(log, true);
}

/** Refreshes the package lists of `src` (`lab fetch --refresh`). */
export const aptRefresh = (log: (s: string) => void, src: AptSource): Promise<void> => aptUpdate(log, true, src);

/** "1:1.35.0-4+deb12u1" → "1_1.35.0-4+deb12u1": safe in a file name. */
export const safeName = (s: string): string => s.replace(/[^A-Za-z0-9.+_-]/g, '_');

/** The candidate version of a package. */
export async function candidateVersion(pkg: string, log: (s: string) => void, src: AptSource = HOST): Promise<string> {
  const r = await apt('apt-cache', ['show', '--no-all-versions', pkg], log, undefined, src);
  const v = /^Version:\s*(\S+)/m.exec(r.stdout)?.[1];
  if (r.code !== 0 || !v)
    throw new LabError(
      `no Debian package ${pkg} here (${r.code !== 0 ? lastLine(r) : 'no version'}); the lab needs Debian's apt repositories`,
    );
  return v;
}

/** The real kernel package linux-image-amd64 (-arm64) depends on now: linux-image-6.1.0-56-amd64. */
export async function kernelPackage(log: (s: string) => void, arch: Arch, src: AptSource = HOST): Promise<string> {
  const deb = DEB_ARCH[arch];
  for (;;) {
    const dep = await apt('apt-cache', ['depends', `linux-image-${deb}:${deb}`], log, undefined, src);
    const pkg = /Depends:\s*(linux-image-[^\s:]+)/.exec(dep.stdout)?.[1];
    if (pkg) return pkg;
    if (src.updated || !isRoot())
      throw new LabError(
        `cannot find Debian's ${arch} kernel package in ${src.name} sources (apt-cache depends linux-image-${deb}: ${dep.code !== 0 ? lastLine(dep) : 'no linux-image dependency'})`,
      );
    await aptUpdate(log, false, src);
  }
}

/** The names a package depends on directly ("Depends:" lines of apt-cache depends, without alternatives' markers). */
export async function packageDepends(pkg: string, log: (s: string) => void, src: AptSource = HOST): Promise<string[]> {
  const r = await apt('apt-cache', ['depends', pkg], log, undefined, src);
  if (r.code !== 0) throw new LabError(`apt-cache depends ${pkg} failed: ${lastLine(r)}`);
  return [...r.stdout.matchAll(/^\s*\|?Depends:\s*<?([^\s:>]+)/gm)].map((m) => m[1]!);
}

/**
 * Downloads a package with `apt-get download` and unpacks it with `dpkg-deb -x`
 * into `dest`, atomically: a partial unpack never looks complete. `after` runs
 * on the unpacked tree before it is moved into place.
 */
export async function unpackDeb(
  pkg: string | readonly string[],
  dest: string,
  log: (s: string) => void,
  after?: (root: string) => Promise<void>,
  src: AptSource = HOST,
): Promise<void> {
  if (existsSync(dest)) return;
  mkdirSync(dirname(dest), { recursive: true });
  const tmp = mkdtempSync(join(dirname(dest), `.partial-${process.pid}-`));
  try {
    const pkgs = typeof pkg === 'string' ? [pkg] : pkg;
    log(`lab: downloading ${pkgs.join(' ')}`);
    const t0 = Date.now();
    const dl = await apt('apt-get', ['download', ...pkgs], log, tmp, src);
    const debs = readdirSync(tmp).filter((f) => f.endsWith('.deb'));
    if (dl.code !== 0 || debs.length < pkgs.length)
      throw new LabError(`apt-get download ${pkgs.join(' ')} failed: ${lastLine(dl)}`);
    const root = join(tmp, 'root');
    for (const deb of debs) {
      const x = await run('dpkg-deb', ['-x', join(tmp, deb), root]);
      if (x.code !== 0) throw new LabError(`dpkg-deb -x ${deb} failed: ${lastLine(x)}`);
      rmSync(join(tmp, deb));
    }
    if (after) await after(root);
    log(`lab: ${pkgs.join(' ')} unpacked in ${((Date.now() - t0) / 1000).toFixed(1)} s`);
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

/** Debian's static busybox for the lab's architecture, unpacked into the cache; returns the binary's path. */
export async function fetchBusybox(
  cache: string,
  log: (s: string) => void,
  arch: Arch,
  src: AptSource = HOST,
): Promise<string> {
  const root = join(cache, arch);
  // bookworm's package has bin/busybox; trixie's and sid's (merged /usr) usr/bin/busybox.
  const binOf = (dir: string) => ['bin', 'usr/bin'].map((d) => join(dir, d, 'busybox')).find((p) => existsSync(p));
  const have = existsSync(root)
    ? readdirSync(root)
        .filter((d) => d.startsWith('busybox-static_'))
        .sort()
    : [];
  for (const d of have.reverse()) {
    const bin = binOf(join(root, d));
    if (bin) return bin;
  }
  const pkg = `busybox-static:${DEB_ARCH[arch]}`;
  const dest = join(root, `busybox-static_${safeName(await candidateVersion(pkg, log, src))}`);
  await unpackDeb(pkg, dest, log, undefined, src);
  const bin = binOf(dest);
  if (!bin) throw new LabError(`busybox-static unpacked without bin/busybox or usr/bin/busybox (in ${dest})`);
  return bin;
}

// The lab's initramfs: a gzip'd newc cpio with static busybox, the KVM modules
// and their dependencies, the agent, and an /init that loads KVM with the
// profile's parameters, says READY on the console and runs the agent on its
// virtio-serial port. /init powers the machine off on any failure and when the agent
// exits, so the host never waits on a guest that can't go on.
import { spawnSync } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { basename, join } from 'node:path';
import { gzipSync } from 'node:zlib';
import { loadOrder, moduleTree, readModule, type LabKernel } from './fetch/index.js';
import { LabError, type Profile } from './profiles.js';

/** One file, directory, symlink or device node of the archive. */
export interface CpioEntry {
  /** Path inside the archive, without a leading slash. */
  path: string;
  /** Permission bits and file type (S_IFREG, S_IFDIR, S_IFLNK, S_IFCHR). */
  mode: number;
  /** File contents, or a symlink's target. */
  data?: Buffer;
  /** A device node's major and minor numbers. */
  rdev?: readonly [number, number];
}

export const S_IFDIR = 0o040000;
export const S_IFREG = 0o100000;
export const S_IFLNK = 0o120000;
export const S_IFCHR = 0o020000;

const pad4 = (n: number): Buffer => Buffer.alloc((4 - (n % 4)) % 4);

/** The entries as an uncompressed "newc" (070701) cpio archive, as the kernel unpacks it. */
export function newc(entries: readonly CpioEntry[]): Buffer {
  const parts: Buffer[] = [];
  const put = (ino: number, e: CpioEntry): void => {
    const data = e.data ?? Buffer.alloc(0);
    const name = Buffer.from(`${e.path}\0`, 'utf8');
    const fields = [
      ino,
      e.mode,
      0,
      0,
      (e.mode & 0o170000) === S_IFDIR ? 2 : 1,
      0,
      data.length,
      0,
      0,
      e.rdev?.[0] ?? 0,
      e.rdev?.[1] ?? 0,
      name.length,
      0,
    ];
    const head = Buffer.from('070701' + fields.map((f) => f.toString(16).padStart(8, '0')).join(''), 'latin1');
    parts.push(head, name, pad4(head.length + name.length), data, pad4(data.length));
  };
  entries.forEach((e, i) => put(i + 1, e));
  put(0, { path: 'TRAILER!!!', mode: 0 });
  return Buffer.concat(parts);
}

/** A module /init loads: its file in the archive (/lib/modules/<file>) and its insmod parameters. */
export interface ModuleLoad {
  name: string;
  file: string;
  source: string;
  params: string[];
}

/**
 * What the profile needs from the kernel: the modules to insmod in order (the
 * profile's KVM modules and their dependencies) with their parameters, and
 * the `module.param=value` words for modules built into the kernel.
 */
export function modulePlan(kernel: LabKernel, profile: Profile): { loads: ModuleLoad[]; cmdline: string[] } {
  if (profile.arch !== kernel.arch)
    throw new LabError(`profile ${profile.name} is for ${profile.arch}, the kernel is ${kernel.arch}`);
  const builtin = new Set(kernel.builtin);
  const wanted = profile.modules.filter((m) => !builtin.has(m));
  let loads: ModuleLoad[] = [];
  if (wanted.length) {
    if (!kernel.modulesDir)
      throw new LabError(
        `the kernel ${kernel.version} has no modules directory and ${wanted.join(', ')} is not built in`,
      );
    const tree = moduleTree(kernel.modulesDir);
    for (const [name, file] of Object.entries(kernel.moduleOverrides ?? {})) tree.files.set(name, file);
    loads = loadOrder(tree, wanted, new Set([...tree.builtin, ...builtin])).map((name) => {
      const source = tree.files.get(name)!;
      const params = Object.entries(profile.modparams[name] ?? {}).map(([k, v]) => `${k}=${v}`);
      return { name, file: basename(source).replace(/\.ko\.(xz|gz|zst)$/, '.ko'), source, params };
    });
  }
  const cmdline: string[] = [];
  for (const [mod, params] of Object.entries(profile.modparams)) {
    if (loads.some((l) => l.name === mod)) continue;
    if (!builtin.has(mod) && profile.modules.length > 0) {
      throw new LabError(
        `module parameters for ${mod}, which the lab does not load (it loads ${loads.map((l) => l.name).join(', ')})`,
      );
    }
    for (const [k, v] of Object.entries(params)) cmdline.push(`${mod}.${k}=${v}`);
  }
  return { loads, cmdline };
}

/** The /init script: everything it prints to the host starts with KVMHARNESS-LAB-. */
export function initScript(
  profile: Profile,
  loads: readonly ModuleLoad[],
  opts: { installApplets?: boolean } = {},
): string {
  const q = (s: string): string => `'${s.replace(/'/g, `'\\''`)}'`;
  const lines = [
    '#!/bin/sh',
    `# kvmharness lab init, profile ${profile.name}: mount, load KVM, run the agent on ${profile.agentTty}.`,
    '# Every way out powers the machine off (QEMU runs with -no-reboot, so a reboot ends it too).',
    ...(opts.installApplets ? ['/bin/busybox --install -s'] : []),
    'PATH=/bin:/sbin:/usr/bin:/usr/sbin',
    'export PATH',
    'set -f',
    'fail() {',
    '  echo "KVMHARNESS-LAB-FAIL $*"',
    '  poweroff -f',
    '  reboot -f',
    '  exit 1',
    '}',
    '# step WHAT COMMAND...: runs COMMAND, or fails naming WHAT with its error output on the same line.',
    'step() {',
    '  what=$1',
    '  shift',
    '  out=$("$@" 2>&1) || fail "$what failed: $(echo $out)"',
    '  [ -z "$out" ] || echo "$out"',
    '}',
    'step "mount /proc" mount -t proc proc /proc',
    'step "mount /sys" mount -t sysfs sysfs /sys',
    'step "mount /dev" mount -t devtmpfs devtmpfs /dev',
    'step "mount tracefs" mount -t tracefs nodev /sys/kernel/tracing',
    'step "mount /tmp" mount -t tmpfs tmpfs /tmp',
    ...loads.map(
      (l) => `step ${q(`insmod ${l.file}`)} insmod /lib/modules/${l.file}${l.params.map((p) => ` ${p}`).join('')}`,
    ),
    `[ -c /dev/kvm ] || fail "no /dev/kvm after loading ${loads.length && profile.arch === 'x86_64' ? 'the KVM modules' : 'KVM'}"`,
    ...(profile.agentPort
      ? agentPortWait(profile.agentPort)
      : [
          `[ -c ${profile.agentTty} ] || fail "no ${profile.agentTty} for the agent"`,
          // Raw before the agent opens it: the line is 8-bit clean from the first byte.
          `step ${q(`stty ${profile.agentTty}`)} stty -F ${profile.agentTty} raw -echo clocal -crtscts`,
        ]),
    ...Object.entries(profile.modparams).flatMap(([mod, params]) =>
      Object.keys(params).map(
        (k) => `echo "KVMHARNESS-LAB-PARAM ${mod}.${k}=$(cat /sys/module/${mod}/parameters/${k} 2>/dev/null)"`,
      ),
    ),
    'echo "KVMHARNESS-LAB-READY $(uname -r)"',
    profile.agentPort ? `/agent --virtio-port ${profile.agentPort}` : `/agent --dev ${profile.agentTty}`,
    'echo "KVMHARNESS-LAB-EXIT $?"',
    'poweroff -f',
    'reboot -f',
    '',
  ];
  return lines.join('\n');
}

/**
 * Waits (up to 5 s) for the host to name the agent's virtio-serial port: the
 * name arrives on the device's control queue after the driver has bound. A
 * virtio port is a plain character device, no tty, so no stty is needed.
 */
function agentPortWait(port: string): string[] {
  // No globs: /init runs with `set -f`.
  return [
    'i=0',
    'port=',
    'while [ -z "$port" ]; do',
    '  for p in $(ls /sys/class/virtio-ports 2>/dev/null); do',
    `    [ "$(cat /sys/class/virtio-ports/$p/name 2>/dev/null)" = ${port} ] && port=$p`,
    '  done',
    '  [ -n "$port" ] && break',
    `  i=$((i + 1)); [ $i -le 500 ] || fail "no virtio port ${port} for the agent"`,
    '  usleep 10000',
    'done',
    `[ -c /dev/$port ] || fail "no /dev/$port for the agent's virtio port ${port}"`,
  ];
}

/** busybox's applets as paths ("bin/sh", "usr/bin/env"), when the binary runs here; undefined for a foreign one. */
function applets(busybox: string): string[] | undefined {
  const r = spawnSync(busybox, ['--list-full'], { encoding: 'utf8' });
  if (r.status !== 0 || !r.stdout) return undefined;
  return r.stdout
    .split('\n')
    .map((l) => l.trim().replace(/^\/+/, ''))
    .filter((l) => /^[\w./[-]+$/.test(l));
}

/**
 * Writes the lab's initramfs (gzip'd newc cpio) and returns its path:
 * /init, busybox and its applet links, /lib/modules/*.ko (decompressed), /agent.
 * With `dir`, the file is `<dir>/initramfs-<profile>-<hash of the archive>.cpio.gz`,
 * kept and reused while its content is the same: two runs that boot different
 * modules never write or read each other's file. Written atomically either way.
 */
export function buildInitramfs(opts: {
  kernel: LabKernel;
  agentBinary: string;
  profile: Profile;
  out?: string;
  dir?: string;
}): string {
  const { kernel, profile } = opts;
  if (!existsSync(opts.agentBinary)) throw new LabError(`agent binary not found: ${opts.agentBinary}`);
  if (!existsSync(kernel.busybox)) throw new LabError(`busybox not found: ${kernel.busybox}`);
  const { loads } = modulePlan(kernel, profile);
  const links = applets(kernel.busybox);
  const dir = (path: string): CpioEntry => ({ path, mode: S_IFDIR | 0o755 });
  const file = (path: string, data: Buffer, perm = 0o644): CpioEntry => ({ path, mode: S_IFREG | perm, data });
  const entries: CpioEntry[] = [
    ...[
      'bin',
      'sbin',
      'usr',
      'usr/bin',
      'usr/sbin',
      'dev',
      'proc',
      'sys',
      'tmp',
      'run',
      'etc',
      'root',
      'lib',
      'lib/modules',
    ].map(dir),
    // The kernel opens /dev/console for /init before devtmpfs is mounted.
    { path: 'dev/console', mode: S_IFCHR | 0o600, rdev: [5, 1] },
    { path: 'dev/null', mode: S_IFCHR | 0o666, rdev: [1, 3] },
    file('bin/busybox', readFileSync(kernel.busybox), 0o755),
  ];
  const seen = new Set(entries.map((e) => e.path));
  for (const l of links ?? ['bin/sh']) {
    if (seen.has(l) || !l.includes('/')) continue;
    seen.add(l);
    entries.push({ path: l, mode: S_IFLNK | 0o777, data: Buffer.from('/bin/busybox') });
  }
  for (const l of loads) entries.push(file(`lib/modules/${l.file}`, readModule(l.source)));
  entries.push(file('agent', readFileSync(opts.agentBinary), 0o755));
  entries.push(file('init', Buffer.from(initScript(profile, loads, { installApplets: !links })), 0o755));
  const archive = newc(entries);
  let out = opts.out;
  if (out === undefined) {
    if (opts.dir === undefined) throw new LabError('buildInitramfs needs out or dir');
    mkdirSync(opts.dir, { recursive: true });
    const key = createHash('sha256').update(archive).digest('hex').slice(0, 20);
    out = join(opts.dir, `initramfs-${profile.name}-${key}.cpio.gz`);
    if (existsSync(out)) return out;
  }
  const tmp = `${out}.${process.pid}.${randomBytes(4).toString('hex')}.tmp`;
  try {
    writeFileSync(tmp, gzipSync(archive, { level: 6 }));
    renameSync(tmp, out);
  } catch (e) {
    rmSync(tmp, { force: true });
    throw e;
  }
  return out;
}

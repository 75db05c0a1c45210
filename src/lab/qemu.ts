// The lab's QEMU process: boots the lab kernel and initramfs under TCG, waits
// for /init's READY line on the console, and hands the agent's line to the
// caller as two FIFOs.
//
// The console (x86 ttyS0, arm64 the PL011 ttyAMA0) is QEMU's stdout, a log
// file, read back and watched for KVMHARNESS-LAB-* lines. The agent's line (a
// named virtio-serial port: virtio-pci on x86, virtio-mmio on arm64) is a
// pipe chardev: QEMU reads <dir>/agent.in and writes <dir>/agent.out, raw
// bytes both ways. QEMU is torn down on
// close(), on a failed boot, on process exit and on SIGINT/SIGTERM, and dies
// with this process (parent-death signal) when setpriv is there.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import {
  closeSync,
  existsSync,
  mkdtempSync,
  openSync,
  readdirSync,
  readFileSync,
  readSync,
  rmSync,
  writeFileSync,
  writeSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { which, type LabKernel } from './fetch/index.js';
import { modulePlan } from './initramfs.js';
import { LabError, type Profile } from './profiles.js';

/** A booted lab: KVM loaded with the profile's parameters, the agent started on its line. */
export interface Lab {
  /** FIFO the host writes; the bytes arrive on the guest's agent line (its virtio-serial port). */
  readonly agentIn: string;
  /** FIFO the host reads; the bytes the guest wrote on its agent line. */
  readonly agentOut: string;
  /**
   * The guest console (kernel messages, /init, the agent's stderr): the file
   * bootLab was asked to write (kept), else one in the lab's temporary
   * directory (removed by close()).
   */
  readonly consoleLog: string;
  /** `uname -r` in the guest. */
  readonly kernelRelease: string;
  /** From starting QEMU to /init's READY line. */
  readonly bootMs: number;
  /** The profile's module parameters as the guest's /sys/module shows them: "kvm.tdp_mmu" → "Y". */
  readonly params: Readonly<Record<string, string>>;
  /** QEMU's process id. */
  readonly pid: number;
  /** Whether QEMU is still running. */
  running(): boolean;
  /** The last lines of the console, for error messages. */
  consoleTail(lines?: number): string;
  /**
   * Lets QEMU's output reach the console log: until QEMU has exited and all
   * it wrote is read, or `ms` at most while it runs (the log is written from
   * the event loop, which a synchronous call to the agent holds up).
   */
  settle(ms: number): Promise<void>;
  /** Stops QEMU (SIGTERM, then SIGKILL after a grace period) and removes the lab's temporary directory. */
  close(): Promise<void>;
}

export const QBOOT = '/usr/share/qemu/qboot.rom';
const DEFAULT_BOOT_TIMEOUT_MS = 60_000;
const GRACE_MS = 2_000;

/**
 * Boot work that has nothing to do with KVM and is slow under TCG, skipped:
 * the crypto manager's self-tests (crypto_algapi_init: ~290 ms of a 6.1
 * boot) and the SP800-108 KDF's self-test (crypto_kdf108_init: 240-380 ms),
 * measured with initcall_debug on the npt-tdp profile.
 */
export const SKIP_AT_BOOT = ['cryptomgr.notests=1', 'initcall_blacklist=crypto_kdf108_init'] as const;

/**
 * The kernel command line: console, no reboot loop on panic, quiet, eight
 * 2 MiB huge pages reserved (hugetlb-backed memslots, so that checks can see
 * 2 MiB TDP mappings), SKIP_AT_BOOT, the profile's words, parameters of
 * built-in modules.
 */
export function kernelCmdline(kernel: LabKernel, profile: Profile): string {
  return [
    `console=${profile.console}`,
    'panic=-1',
    'quiet',
    'hugepages=8',
    ...SKIP_AT_BOOT,
    ...profile.append,
    ...modulePlan(kernel, profile).cmdline,
  ].join(' ');
}

/**
 * QEMU's arguments (an array for spawn, never a shell line). The console is
 * the serial port on stdio; the agent's line is a named virtio-serial port on
 * a pipe chardev at `agentPath` (QEMU opens agentPath.in and agentPath.out).
 */
export function qemuArgs(o: { kernel: LabKernel; initramfs: string; profile: Profile; agentPath: string }): string[] {
  const { kernel, profile } = o;
  if (profile.arch !== kernel.arch)
    throw new LabError(
      `profile ${profile.name} is for ${profile.arch}, the kernel ${kernel.version} is ${kernel.arch}`,
    );
  if (profile.arch === 'arm64') return arm64Args(o);
  // A PVH vmlinux boots fast through qboot; a bzImage goes through SeaBIOS.
  const image = kernel.vmlinux ?? kernel.bzImage;
  if (!image) throw new LabError(`kernel ${kernel.version} has no bootable image`);
  const machine = kernel.vmlinux ? [...profile.machine] : dropBios(profile.machine);
  return bootArgs(machine, image, o, 'virtio-serial-pci');
}

/**
 * arm64: the Image booted directly on the virt machine; the console on the
 * PL011, the agent on a named virtio-serial port (virtio-mmio transport).
 */
function arm64Args(o: { kernel: LabKernel; initramfs: string; profile: Profile; agentPath: string }): string[] {
  const { kernel, profile } = o;
  if (!kernel.image) throw new LabError(`kernel ${kernel.version} has no arm64 Image`);
  return bootArgs([...profile.machine], kernel.image, o, 'virtio-serial-device');
}

/** The arguments both architectures share: no defaults, the image and initramfs, the console on stdio, the agent's named port on `bus`. */
function bootArgs(
  machine: string[],
  image: string,
  o: { kernel: LabKernel; initramfs: string; profile: Profile; agentPath: string },
  bus: string,
): string[] {
  if (!o.profile.agentPort) throw new LabError(`profile ${o.profile.name} names no virtio port for the agent`);
  return [
    ...machine,
    '-nodefaults',
    '-no-user-config',
    '-display',
    'none',
    '-no-reboot',
    '-net',
    'none',
    '-kernel',
    image,
    '-initrd',
    o.initramfs,
    '-append',
    kernelCmdline(o.kernel, o.profile),
    '-chardev',
    'stdio,id=console,signal=off',
    '-serial',
    'chardev:console',
    '-device',
    bus,
    '-chardev',
    `pipe,id=agent,path=${o.agentPath}`,
    '-device',
    `virtserialport,chardev=agent,name=${o.profile.agentPort},nr=1`,
  ];
}

function dropBios(args: readonly string[]): string[] {
  const out: string[] = [];
  for (let i = 0; i < args.length; i++) {
    if (args[i] === '-bios') i++;
    else out.push(args[i]!);
  }
  return out;
}

// ---------------------------------------------------------------------------
// Every QEMU this process started, until it is reaped: torn down on exit and on signals.

interface Running {
  child: ChildProcess;
  dir: string;
  /** Keep the directory (a failed boot's console log) when tearing down. */
  keep: boolean;
}

const live = new Set<Running>();
let hooked = false;

/** Whether pid is gone or a zombie (our child not reaped yet). */
function dead(pid: number): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'latin1');
    return stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3) === 'Z';
  } catch {
    return true;
  }
}

const sleeper = new Int32Array(new SharedArrayBuffer(4));

/** Synchronous teardown for exit and signal handlers, where no promise will ever settle. */
function killSync(r: Running, graceMs: number): void {
  const pid = r.child.pid;
  if (pid !== undefined && r.child.exitCode === null && r.child.signalCode === null && !dead(pid)) {
    try {
      process.kill(pid, 'SIGTERM');
      for (const t0 = Date.now(); !dead(pid) && Date.now() - t0 < graceMs;) Atomics.wait(sleeper, 0, 0, 10);
      if (!dead(pid)) process.kill(pid, 'SIGKILL');
    } catch {
      // already gone
    }
  }
  removeDir(r);
  live.delete(r);
}

const LAB_DIR_PREFIX = 'kvmharness-lab-';

/**
 * Removes lab directories left by a process that died without running its
 * handlers (SIGKILL): those whose owner is gone and whose FIFOs are still
 * there. A failed boot's kept console log has no FIFOs and stays.
 */
function sweepStale(): void {
  let names: string[];
  try {
    names = readdirSync(tmpdir()).filter((n) => n.startsWith(LAB_DIR_PREFIX));
  } catch {
    return;
  }
  for (const n of names) {
    const dir = join(tmpdir(), n);
    try {
      const owner = Number(readFileSync(join(dir, 'owner'), 'utf8'));
      if (owner !== process.pid && existsSync(join(dir, 'agent.in')) && dead(owner))
        rmSync(dir, { recursive: true, force: true });
    } catch {
      // not ours, or gone already
    }
  }
}

function removeDir(r: Running): void {
  if (r.keep) {
    for (const f of ['agent.in', 'agent.out', 'owner']) rmSync(join(r.dir, f), { force: true });
  } else {
    rmSync(r.dir, { recursive: true, force: true });
  }
}

function onSignal(sig: NodeJS.Signals): void {
  for (const r of [...live]) killSync(r, 1_000);
  // Alone, this listener would swallow the signal: re-raise it for the default action.
  if (process.listenerCount(sig) === 1) {
    process.removeListener(sig, onSignal);
    process.kill(process.pid, sig);
  }
}

function hook(): void {
  if (hooked) return;
  hooked = true;
  process.on('exit', () => {
    for (const r of [...live]) killSync(r, 500);
  });
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
}

/** Stops a QEMU: SIGTERM, SIGKILL after the grace period; resolves once it is reaped. */
async function stop(r: Running): Promise<void> {
  const c = r.child;
  if (c.exitCode === null && c.signalCode === null) {
    const exited = new Promise<void>((done) => c.once('exit', () => done()));
    c.kill('SIGTERM');
    let timer: NodeJS.Timeout | undefined;
    const late = await Promise.race([
      exited.then(() => false),
      new Promise<boolean>((done) => (timer = setTimeout(() => done(true), GRACE_MS))),
    ]);
    clearTimeout(timer);
    if (late) {
      c.kill('SIGKILL');
      await exited;
    }
  }
  removeDir(r);
  live.delete(r);
}

// ---------------------------------------------------------------------------

const MARK = /KVMHARNESS-LAB-(READY|FAIL|PARAM|EXIT)\b ?(.*)$/;

/** Console lines, control characters other than tab removed. */
function cleanLines(text: string): string[] {
  return text
    .split('\n')
    .map((l) => l.replace(/[\x00-\x08\x0b-\x1f\x7f]/g, ''))
    .filter((l) => l.trim() !== '');
}

function tailOf(file: string, n: number): string {
  try {
    return cleanLines(readFileSync(file, 'latin1')).slice(-n).join('\n');
  } catch {
    return '';
  }
}

/**
 * Boots the lab: QEMU under TCG with the kernel and initramfs, until /init
 * prints KVMHARNESS-LAB-READY (KVM loaded, the agent starting on its line).
 * A FAIL line, QEMU exiting or the time limit (default 60 s) throw a LabError
 * with the console's last lines; the console log is then kept.
 */
export async function bootLab(opts: {
  kernel: LabKernel;
  initramfs: string;
  profile: Profile;
  bootTimeoutMs?: number;
  log?: (s: string) => void;
  /** Write the console log here, and keep it (default: in the lab's temporary directory). */
  consoleLog?: string;
}): Promise<Lab> {
  const log = opts.log ?? (() => {});
  const { kernel, profile } = opts;
  if (!existsSync(opts.initramfs)) throw new LabError(`initramfs not found: ${opts.initramfs}`);
  const qemu = which(profile.qemu);
  if (!qemu)
    throw new LabError(
      `${profile.qemu} is not installed (the lab's fetch installs it: apt-get install ${profile.arch === 'arm64' ? 'qemu-system-arm' : 'qemu-system-x86'})`,
    );
  if (kernel.vmlinux && profile.machine.includes(QBOOT) && !existsSync(QBOOT))
    throw new LabError(`${QBOOT} is missing (package qemu-system-data)`);

  sweepStale();
  const dir = mkdtempSync(join(tmpdir(), LAB_DIR_PREFIX));
  writeFileSync(join(dir, 'owner'), `${process.pid}\n`);
  const agentPath = join(dir, 'agent');
  const consoleLog = opts.consoleLog ?? join(dir, 'console.log');
  const mk = spawnSync('mkfifo', ['-m', '600', `${agentPath}.in`, `${agentPath}.out`], { encoding: 'utf8' });
  if (mk.status !== 0) {
    rmSync(dir, { recursive: true, force: true });
    throw new LabError(`mkfifo in ${dir} failed: ${mk.stderr?.trim() || mk.error?.message}`);
  }
  const args = qemuArgs({ kernel, initramfs: opts.initramfs, profile, agentPath });
  // setpriv --pdeathsig: QEMU gets SIGKILL if this process dies without running any handler.
  const setpriv = which('setpriv');
  const [cmd, argv] = setpriv ? [setpriv, ['--pdeathsig', 'KILL', '--', qemu, ...args]] : [qemu, args];
  // QEMU writes the console straight into the log (its stdout is the file):
  // a pipe read by this process's event loop would fill while a synchronous
  // call to the agent holds that loop up, and QEMU's serial port then drops
  // bytes (a crash's own lines among them).
  const logFd = openSync(consoleLog, 'a');
  writeSync(logFd, `# ${[qemu, ...args].join(' ')}\n`);
  const readFd = openSync(consoleLog, 'r');

  hook();
  const t0 = Date.now();
  log(`lab: booting ${kernel.version} (profile ${profile.name})…`);
  const child = spawn(cmd, argv, { stdio: ['ignore', logFd, 'pipe'] });
  const r: Running = { child, dir, keep: false };
  live.add(r);

  let partial = '';
  const params: Record<string, string> = {};
  let ready: ((release: string) => void) | undefined;
  let failed: ((why: string) => void) | undefined;
  let logOpen = true;
  let panic: string | undefined;
  const onLine = (line: string): void => {
    const m = MARK.exec(line);
    if (!m) {
      panic ??= /Kernel panic - not syncing: (.*)/.exec(line)?.[1]?.trim();
      return;
    }
    const [, kind, rest = ''] = m;
    if (kind === 'READY') ready?.(rest.trim());
    else if (kind === 'FAIL') failed?.(rest.trim());
    else if (kind === 'PARAM') {
      const eq = rest.indexOf('=');
      if (eq > 0) params[rest.slice(0, eq)] = rest.slice(eq + 1).trim();
    } else if (kind === 'EXIT') log(`lab: the agent exited with status ${rest.trim()}`);
  };
  // Console lines as they reach the log, read back from it.
  const rbuf = Buffer.alloc(1 << 16);
  const poll = (): void => {
    if (!logOpen) return;
    for (let n; (n = readSync(readFd, rbuf, 0, rbuf.length, null)) > 0;) {
      const lines = (partial + rbuf.toString('latin1', 0, n)).split('\n');
      partial = lines.pop()!;
      for (const l of lines) onLine(l.replace(/\r$/, ''));
    }
  };
  const poller = setInterval(poll, 20);
  poller.unref();
  // QEMU's own messages (stderr) go into the log too.
  child.stderr!.on('data', (chunk: Buffer) => {
    if (logOpen) writeSync(logFd, chunk);
  });
  // 'close': QEMU has exited and everything it wrote is in the log.
  const drained = new Promise<void>((done) =>
    child.once('close', () => {
      clearInterval(poller);
      poll();
      if (partial) onLine(partial);
      partial = '';
      done();
    }),
  );
  const closeLog = (): void => {
    clearInterval(poller);
    if (logOpen) {
      closeSync(logFd);
      closeSync(readFd);
    }
    logOpen = false;
  };

  let timer: NodeJS.Timeout | undefined;
  try {
    const release = await new Promise<string>((resolve, reject) => {
      ready = resolve;
      failed = (why) => reject(new LabError(`lab boot failed: ${why}`));
      child.once('error', (e) => reject(new LabError(`cannot start ${qemu}: ${e.message}`)));
      // Read everything QEMU wrote first: a FAIL line gives the better reason.
      child.once(
        'exit',
        (code, signal) =>
          void drained.then(() =>
            reject(
              new LabError(
                panic
                  ? `the lab kernel panicked during boot: ${panic}`
                  : `QEMU exited during boot (${signal ?? `status ${code}`})`,
              ),
            ),
          ),
      );
      const limit = opts.bootTimeoutMs ?? DEFAULT_BOOT_TIMEOUT_MS;
      timer = setTimeout(
        () =>
          reject(
            new LabError(
              `lab boot timed out after ${Number((limit / 1000).toFixed(1))} s without KVMHARNESS-LAB-READY`,
            ),
          ),
        limit,
      );
    });
    clearTimeout(timer);
    ready = failed = undefined;
    const bootMs = Date.now() - t0;
    log(
      `lab: ready in ${(bootMs / 1000).toFixed(1)} s (${release}${
        Object.keys(params).length
          ? `, ${Object.entries(params)
              .map(([k, v]) => `${k}=${v}`)
              .join(' ')}`
          : ''
      })`,
    );
    let closing: Promise<void> | undefined;
    return {
      agentIn: `${agentPath}.in`,
      agentOut: `${agentPath}.out`,
      consoleLog,
      kernelRelease: release,
      bootMs,
      params,
      pid: child.pid!,
      running: () => child.exitCode === null && child.signalCode === null,
      consoleTail: (n = 20) => tailOf(consoleLog, n),
      async settle(ms) {
        let timer: NodeJS.Timeout | undefined;
        await Promise.race([drained, new Promise((done) => (timer = setTimeout(done, ms)))]);
        clearTimeout(timer);
      },
      close: () =>
        (closing ??= (async () => {
          await stop(r);
          closeLog();
        })()),
    };
  } catch (e) {
    clearTimeout(timer);
    ready = failed = undefined;
    r.keep = true;
    await stop(r);
    await Promise.race([drained, new Promise((done) => setTimeout(done, 500))]);
    closeLog();
    const tail = tailOf(consoleLog, 20);
    throw new LabError(`${(e as Error).message} (console: ${consoleLog})${tail ? `\n${tail}` : ''}`, consoleLog);
  }
}

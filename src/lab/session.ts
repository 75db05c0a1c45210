// One lab session: a kernel under test booted in QEMU with the agent on its
// own line (x86: the second serial port; arm64: a virtio-serial port), and
// a target for it — KVM calls through the RemoteAddon, sysfs and tracefs
// through the agent — so that the unchanged checks, models and reports run
// here against the lab's KVM when they are handed that target.
import { createHash, randomBytes } from 'node:crypto';
import { closeSync, existsSync, mkdirSync, openSync, readdirSync, readFileSync, renameSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { constants as fsc } from 'node:fs';
import type { Arch } from '../arch/arch.js';
import type { Target } from '../kvm/target.js';
import { labCacheDir, resolveKernel, type LabKernel } from './fetch/index.js';
import { buildInitramfs } from './initramfs.js';
import { sourceRelease, withKvmSource } from './kvm-source.js';
import { profile as profileNamed, LabError, type Profile } from './profiles.js';
import { bootLab, type Lab } from './qemu.js';
import { RemoteAddon } from './remote/addon.js';
import { agentHeaders, agentSources, buildAgent } from './remote/agent-process.js';
import { remoteTarget } from './remote/target.js';
import { labWatch } from './watch.js';

export interface LabSessionOptions {
  profile: string;
  /** The architecture asked for (--arch); the profile must be of it. */
  arch?: Arch;
  modparams?: string;
  kernel?: string;
  modules?: string;
  /** The lab release to boot (lab fetch --release); default the newest, or the release `lab source` made kvmSource of. */
  release?: string;
  /** A kernel source tree whose KVM is built and booted instead of the stock modules (x86). */
  kvmSource?: string;
  bootTimeoutMs?: number;
  log: (s: string) => void;
}

export interface LabSession {
  lab: Lab;
  kernel: LabKernel;
  profile: Profile;
  remote: RemoteAddon;
  /** The lab's KVM and files, for Kvm.open, probe and the checks; its kernel log watched check by check. */
  target: Target;
  /** The results directory of this session: console.log, the whole console, kept after close(). */
  results: string;
  close(): Promise<void>;
}

/** How long the agent has to answer a request (beyond a run's own time limit): longer, the lab has hung. */
export const AGENT_TIMEOUT_MS = 20_000;

/** Results directories kept: the oldest beyond these are removed when a session opens. */
const RESULTS_KEPT = 50;

/**
 * Where lab sessions keep their results (the console log):
 * $KVMHARNESS_RESULTS, else results/ in the lab's cache.
 */
export function resultsRoot(): string {
  const env = process.env.KVMHARNESS_RESULTS;
  return env ? env : join(labCacheDir(), 'results');
}

/** A new results directory for a session of `profile`: <root>/<UTC time>-<profile>-<pid>[-n]; the oldest pruned. */
function resultsDir(profile: string): string {
  const root = resultsRoot();
  mkdirSync(root, { recursive: true });
  const old = readdirSync(root)
    .filter((n) => /^\d{8}T\d{6}Z-/.test(n))
    .sort();
  for (const n of old.slice(0, Math.max(0, old.length - RESULTS_KEPT + 1)))
    rmSync(join(root, n), { recursive: true, force: true });
  const stamp = new Date()
    .toISOString()
    .replace(/[-:]/g, '')
    .replace(/\.\d+Z$/, 'Z');
  for (let i = 0; ; i++) {
    const dir = join(root, `${stamp}-${profile}-${process.pid}${i ? `-${i}` : ''}`);
    if (existsSync(dir)) continue;
    mkdirSync(dir, { recursive: true });
    return dir;
  }
}

/** The compiler of each architecture's static agent (arm64: Debian's cross compiler). */
const AGENT_CXX: Record<Arch, string> = { x86_64: process.env.CXX || 'g++', arm64: 'aarch64-linux-gnu-g++' };

/**
 * The agent binary for the lab's architecture, built into the cache under a
 * name keyed by its sources' content and the compiler: a changed source makes
 * a new binary and never rewrites one another run may be booting.
 */
function agentBinary(arch: Arch, log: (s: string) => void): string {
  const dir = join(labCacheDir(), 'agent');
  mkdirSync(dir, { recursive: true });
  const h = createHash('sha256').update(AGENT_CXX[arch]);
  for (const f of [...agentSources, ...agentHeaders]) h.update(f).update(readFileSync(f));
  const out = join(dir, `kvmharness-agent-${arch}-${h.digest('hex').slice(0, 16)}`);
  if (existsSync(out)) return out;
  log(`building the lab agent (static, ${arch})`);
  const tmp = `${out}.${process.pid}.${randomBytes(4).toString('hex')}.tmp`;
  try {
    buildAgent(tmp, AGENT_CXX[arch]);
    renameSync(tmp, out);
  } finally {
    rmSync(tmp, { force: true });
  }
  return out;
}

/** Boots the lab and connects to its agent; the session's target reaches its KVM and files. */
export async function openLab(o: LabSessionOptions): Promise<LabSession> {
  const prof = profileNamed(o.profile, o.modparams);
  if (o.arch && prof.arch !== o.arch) throw new LabError(`lab profile ${prof.name} is for ${prof.arch}, not ${o.arch}`);
  const release = o.release ?? (o.kvmSource && !o.kernel ? sourceRelease(o.kvmSource) : undefined);
  let kernel = await resolveKernel({ kernel: o.kernel, modules: o.modules, release, arch: prof.arch, log: o.log });
  if (o.kvmSource) kernel = await withKvmSource(kernel, o.kvmSource, o.log);
  const agent = agentBinary(prof.arch, o.log);
  const initramfs = buildInitramfs({
    kernel,
    agentBinary: agent,
    profile: prof,
    dir: join(labCacheDir(), 'initramfs'),
  });
  o.log(`booting ${kernel.version} (${prof.name})`);
  const results = resultsDir(prof.name);
  const consoleLog = join(results, 'console.log');
  const lab = await bootLab({
    kernel,
    initramfs,
    profile: prof,
    bootTimeoutMs: o.bootTimeoutMs,
    log: o.log,
    consoleLog,
  });
  let readFd = -1;
  let writeFd = -1;
  try {
    if (!existsSync(lab.agentOut)) throw new LabError('the lab has no agent line');
    readFd = openSync(lab.agentOut, fsc.O_RDONLY);
    writeFd = openSync(lab.agentIn, fsc.O_WRONLY);
    const remote = connect(readFd, writeFd, lab);
    return {
      lab,
      kernel,
      profile: prof,
      remote,
      target: { ...remoteTarget(remote), watch: labWatch(lab, remote, AGENT_TIMEOUT_MS) },
      results,
      async close() {
        try {
          remote.disconnect();
        } catch {
          // the lab is going away anyway
        }
        closeFds();
        await lab.close();
      },
    };
  } catch (e) {
    closeFds();
    await lab.close();
    throw e;
  }
  function closeFds() {
    for (const fd of [readFd, writeFd])
      if (fd >= 0)
        try {
          closeSync(fd);
        } catch {
          /* closed */
        }
    readFd = writeFd = -1;
  }
}

/** Connects to the agent; the handshake itself repeats its hello until the agent, started just after READY, answers. */
function connect(readFd: number, writeFd: number, lab: Lab): RemoteAddon {
  try {
    // The watchdog also ends a wait when QEMU has exited (a panic ends it: -no-reboot, panic=-1).
    return RemoteAddon.connect(readFd, writeFd, { rpcTimeoutMs: AGENT_TIMEOUT_MS, watchPid: lab.pid });
  } catch (e) {
    throw new LabError(`the lab's agent did not answer: ${(e as Error).message}\n${lab.consoleTail(20)}`);
  }
}

// One lab session: a kernel under test booted in QEMU with the agent on its
// second serial line, and this process pointed at it — every KVM call goes
// through the RemoteAddon, sysfs and tracefs through the agent — so the
// unchanged checks, models and reports run here against the lab's KVM.
import { closeSync, existsSync, mkdirSync, openSync } from 'node:fs';
import { join } from 'node:path';
import { constants as fsc } from 'node:fs';
import { setHostFs, type HostFs } from '../kvm/hostfs.js';
import { resetAddon, setAddon } from '../kvm/sys.js';
import { labCacheDir, resolveKernel, type LabKernel } from './fetch.js';
import { buildInitramfs } from './initramfs.js';
import { profile as profileNamed, LabError, type Profile } from './profiles.js';
import { bootLab, type Lab } from './qemu.js';
import { buildAgent, RemoteAddon } from './remote.js';

export interface LabSessionOptions {
  profile: string;
  modparams?: string;
  kernel?: string;
  modules?: string;
  bootTimeoutMs?: number;
  log: (s: string) => void;
}

export interface LabSession {
  lab: Lab;
  kernel: LabKernel;
  profile: Profile;
  remote: RemoteAddon;
  close(): Promise<void>;
}

const ARCH: Record<string, string> = { x86_64: 'x64', aarch64: 'arm64' };

/** The lab's files as the agent reaches them (tracefs is mounted by /init). */
export function remoteFs(r: RemoteAddon): HostFs {
  const exists = (path: string) => {
    const fd = r.open(path, fsc.O_RDONLY);
    if (fd < 0) return false;
    r.close(fd);
    return true;
  };
  const fail = (what: string, path: string, ret: number) => {
    if (ret < 0) throw new Error(`${what} ${path} in the lab failed: errno ${-ret}`);
  };
  return {
    arch: () => ARCH[r.info.machine] ?? r.info.machine,
    uid: () => 0,
    read(path) {
      try {
        return r.readFile(path).toString('utf8');
      } catch {
        return undefined;
      }
    },
    write: (path, data) => fail('write', path, r.writeFile(path, data)),
    exists,
    mkdir: (path) => fail('mkdir', path, r.mkdir(path)),
    rmdir: (path) => fail('rmdir', path, r.rmdir(path)),
    list: () => [],
    mountTracefs(path) {
      if (!exists(`${path}/events`)) throw new Error('tracefs is not mounted in the lab');
    },
  };
}

/** The agent binary for the lab's architecture, built once into the cache. */
function agentBinary(log: (s: string) => void): string {
  const dir = join(labCacheDir(), 'agent');
  mkdirSync(dir, { recursive: true });
  const out = join(dir, 'kvmharness-agent-x86_64');
  log('building the lab agent (static)');
  buildAgent(out);
  return out;
}

/** Boots the lab and points this process's KVM calls and host files at it. */
export async function openLab(o: LabSessionOptions): Promise<LabSession> {
  const prof = profileNamed(o.profile, o.modparams);
  if (prof.arch !== 'x86_64') throw new LabError(`lab profile ${prof.name} (${prof.arch}) is not available here: only x86_64 profiles boot in this version`);
  const kernel = await resolveKernel({ kernel: o.kernel, modules: o.modules, log: o.log });
  const agent = agentBinary(o.log);
  const initramfs = buildInitramfs({ kernel, agentBinary: agent, profile: prof, out: join(labCacheDir(), `initramfs-${prof.name}-${kernel.version}.cpio.gz`) });
  o.log(`booting ${kernel.version} (${prof.name})`);
  const lab = await bootLab({ kernel, initramfs, profile: prof, bootTimeoutMs: o.bootTimeoutMs, log: o.log });
  let readFd = -1;
  let writeFd = -1;
  try {
    if (!existsSync(lab.agentOut)) throw new LabError('the lab has no agent line');
    readFd = openSync(lab.agentOut, fsc.O_RDONLY);
    writeFd = openSync(lab.agentIn, fsc.O_WRONLY);
    const remote = connect(readFd, writeFd, lab);
    setAddon(remote);
    const prevFs = setHostFs(remoteFs(remote));
    o.log(`lab ready in ${(lab.bootMs / 1000).toFixed(1)} s: ${lab.kernelRelease}, ${Object.entries(lab.params).map(([k, v]) => `${k}=${v}`).join(' ')}`);
    return {
      lab,
      kernel,
      profile: prof,
      remote,
      async close() {
        resetAddon();
        setHostFs(prevFs);
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
    for (const fd of [readFd, writeFd]) if (fd >= 0) try { closeSync(fd); } catch { /* closed */ }
    readFd = writeFd = -1;
  }
}

/** Connects to the agent; the handshake itself repeats its hello until the agent, started just after READY, answers. */
function connect(readFd: number, writeFd: number, lab: Lab): RemoteAddon {
  try {
    return RemoteAddon.connect(readFd, writeFd, { rpcTimeoutMs: 20_000 });
  } catch (e) {
    throw new LabError(`the lab's agent did not answer: ${(e as Error).message}\n${lab.consoleTail(20)}`);
  }
}

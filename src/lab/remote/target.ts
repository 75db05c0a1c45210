// The lab as a target: KVM calls through the RemoteAddon, files through the
// agent, each vCPU on a thread of its own in the agent.
import { constants as fsc } from 'node:fs';
import type { HostFs, Target } from '../../kvm/target.js';
import { drainKmsg } from '../../target/fs.js';
import type { RemoteAddon } from './addon.js';

const ARCH: Record<string, string> = { x86_64: 'x64', aarch64: 'arm64' };
/** O_NONBLOCK in the lab (the same value on x86-64 and arm64). */
const O_NONBLOCK = 0o4000;

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
    kernelLog() {
      const fd = r.open('/dev/kmsg', fsc.O_RDONLY | O_NONBLOCK);
      if (fd < 0) return undefined;
      try {
        return drainKmsg(() => r.read(fd, 8192));
      } finally {
        r.close(fd);
      }
    },
  };
}

/**
 * The lab's KVM as a target. Each vCPU runs on a thread of its own in the
 * agent, beside the calls the host makes meanwhile (concurrentRuns), and the
 * agent unmaps and maps over part of a mapping (`ranges`).
 */
export function remoteTarget(r: RemoteAddon): Target {
  return {
    name: 'lab',
    addon: r,
    fs: remoteFs(r),
    runner: (vcpu) => r.runner(vcpu),
    concurrentRuns: true,
    ranges: r,
  };
}

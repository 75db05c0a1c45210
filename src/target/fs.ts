// This host's files as a target's file-system view (HostFs, kvm/target.ts);
// another machine's are reached through whatever carries its system calls. The probe
// reads sysfs through it, tracefs sessions are driven through it, and
// Memslot.hugeBytes reads /proc/self/smaps of the process that holds guest
// memory through it; nothing else uses it.
import { execFileSync } from 'node:child_process';
import {
  closeSync,
  constants,
  existsSync,
  mkdirSync,
  openSync,
  readdirSync,
  readFileSync,
  readSync,
  rmdirSync,
  statSync,
  writeFileSync,
} from 'node:fs';
import { arch } from 'node:os';
import type { HostFs } from '../kvm/target.js';

const O_NONBLOCK = 0o4000; // the same on x86-64 and arm64

/** Reads /dev/kmsg record by record until EAGAIN; `read` returns bytes or -errno (EPIPE: a record was overwritten, go on). */
export function drainKmsg(read: () => Uint8Array | number, max = 100_000): string {
  const lines: string[] = [];
  for (let i = 0; i < max; i++) {
    const b = read();
    if (typeof b === 'number') {
      if (b === -32) continue; // EPIPE
      break;
    }
    if (!b.length) break;
    const text = Buffer.from(b).toString('utf8');
    // "prio,seq,usec,flags;message\n": the message part.
    lines.push(text.slice(text.indexOf(';') + 1).replace(/\n$/, ''));
  }
  return lines.join('\n');
}

export const localFs: HostFs = {
  arch: () => arch(),
  uid: () => process.getuid?.() ?? -1,
  read(path) {
    try {
      return readFileSync(path, 'utf8');
    } catch {
      return undefined;
    }
  },
  write: (path, data) => writeFileSync(path, data),
  gidOf(path) {
    try {
      return statSync(path).gid;
    } catch {
      return undefined;
    }
  },
  exists: (path) => existsSync(path),
  mkdir: (path) => mkdirSync(path),
  rmdir: (path) => rmdirSync(path),
  list(path) {
    try {
      return readdirSync(path);
    } catch {
      return [];
    }
  },
  mountTracefs(path) {
    try {
      execFileSync('mount', ['-t', 'tracefs', 'nodev', path], { stdio: 'pipe' });
    } catch (e) {
      // What mount said (e.g. "permission denied"), not "Command failed: ...".
      const said = String((e as { stderr?: unknown }).stderr ?? '')
        .trim()
        .split('\n')
        .pop();
      throw new Error(`mount -t tracefs on ${path} failed: ${said || (e as Error).message.split('\n')[0]}`);
    }
  },
  kernelLog() {
    let fd: number;
    try {
      fd = openSync('/dev/kmsg', constants.O_RDONLY | O_NONBLOCK);
    } catch {
      return undefined;
    }
    try {
      const buf = Buffer.alloc(8192);
      return drainKmsg(() => {
        try {
          return buf.subarray(0, readSync(fd, buf, 0, buf.length, null));
        } catch (e) {
          const code = (e as NodeJS.ErrnoException).code;
          return code === 'EPIPE' ? -32 : -11;
        }
      });
    } finally {
      closeSync(fd);
    }
  },
};

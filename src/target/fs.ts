// The file-system view of a target: this host's own files, or another
// machine's, reached through whatever carries its system calls. The probe
// reads sysfs through it, tracefs sessions are driven through it, and
// Memslot.hugeBytes reads /proc/self/smaps of the process that holds guest
// memory through it; nothing else uses it.
import { execFileSync } from 'node:child_process';
import { closeSync, constants, existsSync, mkdirSync, openSync, readdirSync, readFileSync, readSync, rmdirSync, statSync, writeFileSync } from 'node:fs';
import { arch } from 'node:os';

export interface HostFs {
  /** Node-style architecture name of the KVM host ('x64', 'arm64'). */
  arch(): string;
  /** Effective uid on the KVM host. */
  uid(): number;
  /** File contents, or undefined when the file cannot be read. */
  read(path: string): string | undefined;
  write(path: string, data: string): void;
  exists(path: string): boolean;
  mkdir(path: string): void;
  rmdir(path: string): void;
  /** The group id that owns a file, or undefined when it cannot be found (the permission hint names the group). */
  gidOf?(path: string): number | undefined;
  /** Entries of a directory ([] when it cannot be read). */
  list(path: string): string[];
  /** mount -t tracefs nodev PATH */
  mountTracefs(path: string): void;
  /** The kernel's message buffer as /dev/kmsg gives it (read without waiting), or undefined when it cannot be read. */
  kernelLog?(): string | undefined;
}

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
      const said = String((e as { stderr?: unknown }).stderr ?? '').trim().split('\n').pop();
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

// The file-system view of the machine whose KVM is under test: this host's
// own files, or (in the lab) the files of the kernel under test, reached
// through the agent. The probe reads sysfs through it and tracefs sessions
// are driven through it; nothing else uses it.
import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, readdirSync, readFileSync, rmdirSync, writeFileSync } from 'node:fs';
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
  /** Entries of a directory ([] when it cannot be read). */
  list(path: string): string[];
  /** mount -t tracefs nodev PATH */
  mountTracefs(path: string): void;
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
    execFileSync('mount', ['-t', 'tracefs', 'nodev', path], { stdio: 'pipe' });
  },
};

let current: HostFs = localFs;
export function hostFs(): HostFs {
  return current;
}
/** Points probe and tracefs at another machine's files (the lab); returns the previous view. */
export function setHostFs(fs: HostFs): HostFs {
  const prev = current;
  current = fs;
  return prev;
}

// The machine whose KVM is under test, handed to Kvm.open and to every
// check: how its system calls are made, how its files are read, how a vCPU
// runs there, and what it can do beyond the common system calls. The binding
// declares here what it needs of a target; src/target holds this host's
// (local.ts), and a target elsewhere is built to the same shape.
import type { Addon, RangeMapping } from './sys.js';
import type { RunnerVcpu, VcpuRunner } from './runner.js';

export interface Target {
  /** Names the target in messages ('local', 'lab'). */
  readonly name: string;
  /** System calls and ioctls on the target. */
  readonly addon: Addon;
  /** The target's files (sysfs, procfs, tracefs). */
  readonly fs: HostFs;
  /** The runner a vCPU gets when it is created. */
  runner(vcpu: RunnerVcpu): VcpuRunner;
  /**
   * Whether vCPU runs go on while the caller does other work (each vCPU on
   * its own thread), so that host operations can race them.
   */
  readonly concurrentRuns: boolean;
  /** munmap and mmap(MAP_FIXED) over part of a mapping, where the target offers them. */
  readonly ranges?: RangeMapping;
}

/** The file-system view of a target (src/target/fs.ts has this host's). */
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

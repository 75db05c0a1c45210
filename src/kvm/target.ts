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
  /** What its kernel logs, where it is a kernel under test (the lab's): read after every check. */
  readonly watch?: KernelWatch;
}

/** Something the kernel under test said went wrong: a BUG, oops, panic, WARN from KVM, lockup; or a hang. */
export interface KernelProblem {
  /** As the kernel named it, e.g. "kernel BUG in __handle_changed_spte: Invalid SPTE change: ...". */
  message: string;
  /** The log lines around it. */
  excerpt: string[];
}

/** The kernel log of a target, read check by check. */
export interface KernelWatch {
  /**
   * The problems logged since the last call. `dead` says how the kernel
   * stopped answering (it crashed or hung): then no further check can run,
   * and the problems say why as far as its console does.
   */
  since(): Promise<{ problems: KernelProblem[]; dead?: string }>;
  /** Where the whole console log of the kernel under test is kept. */
  readonly consoleLog?: string;
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

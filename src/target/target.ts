// The machine whose KVM is under test, handed to Kvm.open and to every
// check: how its system calls are made, how its files are read, how a vCPU
// runs there, and what it can do beyond the common system calls. This host is
// one target (local.ts); the lab's session builds another from its agent.
import type { Addon, RangeMapping } from '../kvm/sys.js';
import type { RunnerVcpu, VcpuRunner } from '../kvm/runner.js';
import type { HostFs } from './fs.js';

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

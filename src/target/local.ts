// This host as a target: the native addon's system calls, this host's files,
// a native thread per vCPU.
import { ThreadRunner } from '../kvm/runner.js';
import { localAddon } from '../kvm/sys.js';
import { localFs } from './fs.js';
import type { Target } from '../kvm/target.js';

export const localTarget: Target = {
  name: 'local',
  // The addon is loaded on first use, so that a missing build is reported
  // by the call that needs it (a HostError), not on import.
  get addon() {
    return localAddon();
  },
  fs: localFs,
  runner: (vcpu) => new ThreadRunner(vcpu),
  concurrentRuns: true,
  get ranges() {
    return localAddon();
  },
};

// Faults injected into the lab kernel when a named check starts, so that a
// crash, a hang or a KVM warning in the middle of a run can be seen to become
// that check's verdict (tests; KVMHARNESS_LAB_FAULT=<check>=<fault>).
//   panic  echo c > /proc/sysrq-trigger: the kernel panics, QEMU exits
//   hang   QEMU stopped (SIGSTOP): nothing answers any more
//   warn   a KVM WARNING record written to /dev/kmsg: the check runs on
import type { Check } from '../run/types.js';
import { LabError } from './profiles.js';

export const FAULTS = ['panic', 'hang', 'warn'] as const;
export type LabFault = (typeof FAULTS)[number];

/** The environment variable that asks for a fault: `<check>=<fault>`. */
export const FAULT_ENV = 'KVMHARNESS_LAB_FAULT';

export function parseFault(spec: string): { check: string; fault: LabFault } {
  const eq = spec.lastIndexOf('=');
  const fault = spec.slice(eq + 1) as LabFault;
  if (eq <= 0 || !FAULTS.includes(fault))
    throw new LabError(`${FAULT_ENV} must be <check>=${FAULTS.join('|')}, got '${spec}'`);
  return { check: spec.slice(0, eq), fault };
}

/** The warning `warn` writes: as __warn prints one from KVM's TDP MMU. */
export const INJECTED_WARNING =
  'WARNING: CPU: 0 PID: 1 at arch/x86/kvm/mmu/tdp_mmu.c:1 kvmharness_injected_warning+0x0/0x10 [kvm]';

/** `checks` with the named one starting with the fault; `qemuPid` is the lab's QEMU (for hang). */
export function withFault(checks: readonly Check[], spec: string, qemuPid: number): Check[] {
  const { check, fault } = parseFault(spec);
  if (!checks.some((c) => c.name === check)) throw new LabError(`${FAULT_ENV}: no check ${check} in this run`);
  return checks.map((c) =>
    c.name !== check
      ? c
      : {
          ...c,
          async run(ctx) {
            const fs = ctx.target.fs;
            if (fault === 'panic') fs.write('/proc/sysrq-trigger', 'c');
            else if (fault === 'hang') {
              process.kill(qemuPid, 'SIGSTOP');
              fs.read('/proc/version');
            } else {
              // One record a write, ended by a newline (else it waits for its continuation).
              fs.write('/dev/kmsg', '<4>------------[ cut here ]------------\n');
              fs.write('/dev/kmsg', '<4>kvmharness: an injected warning\n');
              fs.write('/dev/kmsg', `<4>${INJECTED_WARNING}\n`);
            }
            await c.run(ctx);
          },
        },
  );
}

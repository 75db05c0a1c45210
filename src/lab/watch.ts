// The lab kernel's log, check by check: /dev/kmsg through the agent while it
// answers, the console log when it no longer does (the kernel crashed or
// hung), each problem named by kernel-log.ts.
import { constants as fsc, readFileSync, statSync } from 'node:fs';
import type { KernelProblem, KernelWatch } from '../kvm/target.js';
import { kernelProblems } from './kernel-log.js';
import { LabTimeoutError } from './protocol.js';
import type { Lab } from './qemu.js';
import type { RemoteAddon } from './remote/addon.js';

/** O_NONBLOCK in the lab (the same value on x86-64 and arm64). */
const O_NONBLOCK = 0o4000;
/** How long a lab that stopped answering, QEMU still running, gets to print the rest of its console. */
const SETTLE_MS = 1_500;
/** Console lines kept with a hang that printed nothing recognisable. */
const TAIL = 30;

/**
 * /dev/kmsg records ("prio,seq,usec,flags;message", then " KEY=value"
 * lines) as console lines: "[seconds] message", one line per line of the
 * message (kmsg escapes a newline inside a record as \x0a).
 */
export function kmsgLines(records: readonly string[]): string {
  const out: string[] = [];
  for (const rec of records) {
    const semi = rec.indexOf(';');
    if (semi < 0) continue;
    const usec = Number(rec.slice(0, semi).split(',')[2] ?? NaN);
    const stamp = Number.isFinite(usec) ? `[${(usec / 1e6).toFixed(6).padStart(12)}] ` : '';
    const msg = rec.slice(semi + 1).split('\n')[0]!;
    for (const l of msg.split('\\x0a')) out.push(stamp + l);
  }
  return out.join('\n');
}

function sizeOf(file: string): number {
  try {
    return statSync(file).size;
  } catch {
    return 0;
  }
}

function readFrom(file: string, from: number): string {
  try {
    return readFileSync(file)
      .subarray(from)
      .toString('latin1')
      .replace(/[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]/g, '');
  } catch {
    return '';
  }
}

/** The lab kernel's watch: `timeoutMs` is the agent's reply deadline, for the message of a hang. */
export function labWatch(lab: Lab, remote: RemoteAddon, timeoutMs: number): KernelWatch {
  let kmsg: number | undefined;
  let consoleAt = sizeOf(lab.consoleLog);
  const drain = (): string => {
    kmsg ??= remote.open('/dev/kmsg', fsc.O_RDONLY | O_NONBLOCK);
    if (kmsg < 0) {
      const e = kmsg;
      kmsg = undefined;
      throw new Error(`open /dev/kmsg in the lab: errno ${-e}`);
    }
    const records: string[] = [];
    for (let i = 0; i < 100_000; i++) {
      const b = remote.read(kmsg, 8192);
      if (typeof b === 'number') {
        if (b === -32) continue; // EPIPE: records were overwritten; go on
        break;
      }
      if (!b.length) break;
      records.push(Buffer.from(b).toString('utf8'));
    }
    return kmsgLines(records);
  };
  return {
    consoleLog: lab.consoleLog,
    async since() {
      const from = consoleAt;
      if (!remote.failure) {
        try {
          const text = drain();
          consoleAt = sizeOf(lab.consoleLog);
          return { problems: kernelProblems(text) };
        } catch {
          // The agent no longer answers, or cannot read the log: the console says why.
          if (!remote.failure) return { problems: [] };
        }
      }
      await lab.settle(SETTLE_MS);
      const text = readFrom(lab.consoleLog, from);
      consoleAt = sizeOf(lab.consoleLog);
      const problems: KernelProblem[] = kernelProblems(text);
      const failure = remote.failure;
      const why =
        failure instanceof LabTimeoutError && failure.reason === 'deadline'
          ? `no reply from the lab within ${Number((timeoutMs / 1000).toFixed(1))} s`
          : (failure?.message ?? 'the lab stopped answering');
      const dead = problems[0]?.message ?? (lab.running() ? `hang: ${why}` : `the lab's QEMU exited: ${why}`);
      if (!problems.length) {
        // Nothing new on the console: its last lines, as they were.
        const lines = text.split('\n').filter((l) => l.trim());
        problems.push({
          message: dead,
          excerpt: lines.length ? lines.slice(-TAIL) : lab.consoleTail(TAIL).split('\n'),
        });
      }
      return { problems, dead };
    },
  };
}

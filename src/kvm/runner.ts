// A vCPU's runner carries out KVM_RUN for it. The target gives each vCPU its
// runner when the vCPU is created: on this host a native thread per vCPU
// (ThreadRunner, over thread.ts); a target elsewhere runs it there and
// answers when the run is over. The runner brings back KVM_RUN's raw result;
// the vCPU decodes the exit (Vcpu.run).
import { localAddon } from './sys.js';
import { VcpuThread, type RunReply } from './thread.js';

/** What a runner gets of its vCPU. */
export interface RunnerVcpu {
  readonly fd: number;
  /** Address of kvm_run on the target; it stays mapped until the runner is closed. */
  readonly runAddress: bigint;
  /** Sets (kick) or clears kvm_run.immediate_exit. */
  immediateExit(on: boolean): void;
}

export interface RunLimits {
  /** The run is ended (an intr exit, timedOut) after this long. */
  timeoutMs: number;
  /** Port whose `out` bytes are collected without returning; 0 for none. */
  consolePort: number;
  /** With consolePort: return after this many exits at most. */
  maxExits: number;
}

/** What a run brings back before its exit is decoded from kvm_run. */
export interface RunnerReply extends RunReply {
  /** The time limit ended the run. */
  timedOut: boolean;
}

export interface VcpuRunner {
  /** Runs until an exit that needs the caller, or the time limit; immediate_exit is clear afterwards. */
  run(limits: RunLimits): Promise<RunnerReply> | RunnerReply;
  /** The kernel thread id that runs the vCPU (for trace filters). */
  tid(): number;
  /** Forces a running vCPU out of KVM_RUN (the run returns -EINTR). */
  kick(): void;
  /** Stops a run in progress and frees what the runner holds; kvm_run stays mapped. */
  close(): void;
}

/**
 * When the event loop last had a turn, as far as vCPU runs know. A run that
 * ends while its caller waits natively resolves without the event loop, so
 * a caller that loops on runs (a vCPU exiting to the host thousands of
 * times) would starve timers, I/O and Ctrl-C; run() yields once it has been
 * longer than TURN_MS.
 */
let lastTurn = 0;
const TURN_MS = 4;
const turn = (): Promise<void> => new Promise((resolve) => setImmediate(resolve));

/** Runs a vCPU on a native thread of this process, borrowed from the pool on first use. */
export class ThreadRunner implements VcpuRunner {
  private thread: VcpuThread | undefined;
  private running = false;

  constructor(private readonly vcpu: RunnerVcpu) {}

  tid(): number {
    this.thread ??= VcpuThread.acquire();
    return this.thread.tid;
  }

  async run(limits: RunLimits): Promise<RunnerReply> {
    const thread = (this.thread ??= VcpuThread.acquire());
    this.running = true;
    const start = performance.now();
    let timedOut = false;
    let timer: NodeJS.Timeout | undefined;
    let reply: RunReply;
    try {
      const { fd, runAddress } = this.vcpu;
      const seq = thread.start({ fd, run: runAddress, consolePort: limits.consolePort, maxExits: limits.maxExits });
      try {
        if (!thread.poll(seq, Math.floor(limits.timeoutMs * 1000))) {
          // The time limit is armed only when the run outlasts the polling
          // (about 1 ms): a timer per run cost ~15 µs, more than the short
          // runs it would never fire on.
          timer = setTimeout(
            () => {
              timedOut = true;
              this.kickThread(thread);
            },
            Math.max(0, limits.timeoutMs - (performance.now() - start)),
          );
          await thread.wait(seq);
          lastTurn = performance.now();
        }
      } finally {
        if (timer) clearTimeout(timer);
        this.vcpu.immediateExit(false);
        reply = thread.finish();
      }
      if (performance.now() - lastTurn > TURN_MS) {
        await turn();
        lastTurn = performance.now();
      }
    } finally {
      this.running = false;
    }
    return { ...reply, timedOut };
  }

  kick(): void {
    if (this.thread) this.kickThread(this.thread);
  }

  private kickThread(t: VcpuThread): void {
    this.vcpu.immediateExit(true);
    localAddon().kick(t.tid);
  }

  close(): void {
    const t = this.thread;
    if (!t) return;
    // kvm_run must stay mapped until the thread has left KVM_RUN; a thread
    // that does not leave it is abandoned with its mapping (never reused).
    if (this.running) this.kickThread(t);
    t.waitIdle(() => this.kickThread(t));
    this.thread = undefined;
    VcpuThread.release(t);
  }
}

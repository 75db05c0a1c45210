// One OS thread per running vCPU. KVM_RUN blocks its thread, so it never runs
// on the libuv pool or on the main thread: each vCPU borrows a worker thread
// from a small pool of its own and keeps it while it lives.
//
// Owner and worker talk through shared memory: the worker sleeps in
// Atomics.wait on a command word and the owner wakes it with Atomics.notify,
// a futex wake instead of two event-loop hops. The owner polls the worker's
// 'done' word, and only a run that outlasts the polling is waited for with a
// message. The worker calls the native run loop with the address of the
// owner's kvm_run mapping (memory is shared by all threads; only ArrayBuffer
// views are per isolate), which collects console output without leaving
// native code and returns on every other exit; the owner decodes that exit
// from its own view.
import { Worker } from 'node:worker_threads';
import { addonPath } from './sys.js';

export interface RunRequest {
  fd: number;
  /** Address of the vCPU's kvm_run mapping; it must stay mapped until the run returns. */
  run: bigint;
  /** Port whose `out` bytes are collected without leaving the thread; 0 for none. */
  consolePort: number;
  /** Stop after this many console exits even if the guest goes on. */
  maxExits: number;
}
export interface RunReply {
  /** KVM_RUN's result: 0, or -errno (-EINTR after a kick). */
  ret: number;
  /** Number of KVM_RUN calls that returned. */
  exits: number;
  console: Uint8Array;
  /** Nanoseconds the thread spent in its loop. */
  ns: number;
}

/** Words of the shared control block. */
const W = {
  cmd: 0, // sequence number of the last command (owner increments)
  op: 1,
  fd: 2,
  runLo: 3,
  runHi: 4,
  consolePort: 5,
  maxExits: 6,
  done: 8, // sequence number of the last finished command (worker sets)
  ret: 9,
  exits: 10,
  consoleLen: 11,
  nsLo: 12,
  nsHi: 13,
  tid: 14,
  /** 1 while the owner waits for the worker's message (it stopped polling). */
  waiting: 15,
} as const;
const OP = { run: 1, exit: 2, wake: 3 } as const;
const CONSOLE_BYTES = 65536;
/** How long a vCPU thread woken ahead of its first run polls for it before it sleeps. */
const WAKE_SPIN_NS = 500_000n;
/** How long run() polls for a short run to finish before yielding to the event loop. */
const SPIN_NS = 300_000n;

const workerSource = `
const { workerData, parentPort } = require('node:worker_threads');
const k = require(workerData.addonPath);
const W = workerData.w, OP = workerData.op;
const ctl = new Int32Array(workerData.ctl);
const out = new Uint8Array(workerData.console);
const res = new Int32Array(2);
k.kickInstall();
ctl[W.tid] = k.gettid();
let seen = 0;
Atomics.store(ctl, W.done, 0);
parentPort.postMessage(0);
let spinNs = 0n;
for (;;) {
  // After a wake-up command, poll for the next command for a short while
  // before sleeping again: waking a sleeping thread costs tens of µs (more
  // inside a VM, where an idle CPU is halted).
  const spinUntil = process.hrtime.bigint() + spinNs;
  while (Atomics.load(ctl, W.cmd) === seen && process.hrtime.bigint() < spinUntil);
  spinNs = 0n;
  Atomics.wait(ctl, W.cmd, seen);
  seen = Atomics.load(ctl, W.cmd);
  const op = ctl[W.op];
  if (op === OP.run) {
    const run = (BigInt(ctl[W.runHi] >>> 0) << 32n) | BigInt(ctl[W.runLo] >>> 0);
    const t0 = process.hrtime.bigint();
    ctl[W.ret] = k.runLoop(ctl[W.fd], run, ctl[W.consolePort], ctl[W.maxExits], out, res);
    const ns = process.hrtime.bigint() - t0;
    ctl[W.exits] = res[0]; ctl[W.consoleLen] = res[1];
    ctl[W.nsLo] = Number(ns & 0xffffffffn) | 0; ctl[W.nsHi] = Number(ns >> 32n) | 0;
  }
  else if (op === OP.wake) spinNs = workerData.wakeSpinNs;
  Atomics.store(ctl, W.done, seen);
  // An owner that stopped polling waits for this message on its event loop.
  if (op === OP.run && Atomics.load(ctl, W.waiting) === 1) parentPort.postMessage(seen);
  if (op === OP.exit) break;
}
`;

export class VcpuThread {
  private seq = 0;
  private busy = false;
  private waiter: { seq: number; resolve: () => void } | undefined;
  private constructor(
    private readonly worker: Worker,
    private readonly ctl: Int32Array,
    private readonly console: Uint8Array,
    /** Kernel thread id, the target of kicks. */
    readonly tid: number,
  ) {
    worker.on('message', (seq: number) => {
      if (this.waiter && seq >= this.waiter.seq) this.waiter.resolve();
    });
  }

  static async spawn(): Promise<VcpuThread> {
    const ctlBuf = new SharedArrayBuffer(64 * 4);
    const consoleBuf = new SharedArrayBuffer(CONSOLE_BYTES);
    const ctl = new Int32Array(ctlBuf);
    Atomics.store(ctl, W.done, -1);
    const worker = new Worker(workerSource, { eval: true, workerData: { addonPath, w: W, op: OP, ctl: ctlBuf, console: consoleBuf, wakeSpinNs: WAKE_SPIN_NS } });
    await new Promise<void>((resolve, reject) => {
      worker.once('error', reject);
      worker.once('message', () => resolve());
    });
    worker.unref();
    return new VcpuThread(worker, ctl, new Uint8Array(consoleBuf), ctl[W.tid]!);
  }

  /**
   * Posts a command; it is finished when `done` reaches the returned sequence
   * number. The previous command must have finished first: the worker reads
   * the fields after it sees the sequence number change, so overwriting them
   * early would hand it the next command's fields under the previous number.
   */
  private post(op: number, fields: Partial<Record<keyof typeof W, number>> = {}): number {
    while (!this.finished(this.seq));
    for (const [k, v] of Object.entries(fields)) this.ctl[W[k as keyof typeof W]] = v;
    this.ctl[W.op] = op;
    const seq = ++this.seq;
    Atomics.store(this.ctl, W.cmd, seq);
    Atomics.notify(this.ctl, W.cmd);
    return seq;
  }

  private finished(seq: number): boolean {
    return Atomics.load(this.ctl, W.done) === seq;
  }

  async run(req: RunRequest): Promise<RunReply> {
    if (this.busy) throw new Error('vCPU thread is already running a vCPU');
    this.busy = true;
    try {
      const seq = this.post(OP.run, {
        fd: req.fd,
        runLo: Number(req.run & 0xffffffffn) | 0,
        runHi: Number(req.run >> 32n) | 0,
        consolePort: req.consolePort,
        maxExits: Math.min(req.maxExits, 0x7fffffff),
      });
      // Most runs end within a fraction of a millisecond: poll for those
      // (a few µs each) before yielding to the event loop (a hop of ~100 µs on
      // an idle machine). Polling, not Atomics.wait: a signal that arrives while
      // the main thread sleeps in Atomics.wait was seen to be lost, Ctrl-C
      // included. The event loop is held for at most SPIN_NS per run.
      const until = process.hrtime.bigint() + SPIN_NS;
      while (!this.finished(seq) && process.hrtime.bigint() < until);
      if (!this.finished(seq)) {
        this.worker.ref();
        try {
          // The worker posts a message when a run ends; waiting for it keeps
          // the event loop (timers, the time-limit kick, Ctrl-C) running.
          // Atomics.waitAsync was used here and was seen to spin.
          // Set `waiting` before the last look at `done`, and the worker looks
          // at `waiting` after setting `done`: one of the two sees the other.
          await new Promise<void>((resolve) => {
            this.waiter = { seq, resolve };
            Atomics.store(this.ctl, W.waiting, 1);
            if (this.finished(seq)) resolve();
          });
          Atomics.store(this.ctl, W.waiting, 0);
          this.waiter = undefined;
        } finally {
          this.worker.unref();
        }
      }
      const c = this.ctl;
      return {
        ret: c[W.ret]!,
        exits: c[W.exits]!,
        console: this.console.slice(0, c[W.consoleLen]),
        ns: (c[W.nsHi]! >>> 0) * 2 ** 32 + (c[W.nsLo]! >>> 0),
      };
    } finally {
      this.busy = false;
    }
  }

  /**
   * Wakes the thread ahead of a run that is about to come (a vCPU was just
   * created): it then polls for the run instead of sleeping through it.
   */
  wake(): void {
    if (!this.busy && this.finished(this.seq)) this.post(OP.wake);
  }

  /**
   * Blocks until the last command has finished. `kick` (if given) is repeated
   * every 10 ms in case a run re-entered KVM_RUN after an earlier kick; after
   * `limitMs` the thread is given up with an error rather than waited for
   * forever.
   */
  waitIdle(kick?: () => void, limitMs = 5000): void {
    const start = performance.now();
    let lastKick = start;
    while (!this.finished(this.seq)) {
      const now = performance.now();
      if (kick && now - lastKick > 10) {
        kick();
        lastKick = now;
      }
      if (now - start > limitMs) throw new Error(`vCPU thread ${this.tid} did not leave KVM_RUN within ${limitMs} ms`);
    }
  }

  /** Ends the thread. */
  exit(): void {
    this.waitIdle();
    this.post(OP.exit);
    this.waitIdle();
  }

  // Idle threads are kept for the next vCPU: spawning a worker costs
  // milliseconds, a VM lifecycle about one.
  private static idle: VcpuThread[] = [];
  static async acquire(): Promise<VcpuThread> {
    return VcpuThread.idle.pop() ?? VcpuThread.spawn();
  }
  /** An idle thread if one is ready now (never spawns). */
  static tryAcquire(): VcpuThread | undefined {
    return VcpuThread.idle.pop();
  }
  /** Returns an idle thread to the pool. */
  static release(t: VcpuThread): void {
    if (VcpuThread.idle.length < 8) VcpuThread.idle.push(t);
    else t.exit();
  }
}

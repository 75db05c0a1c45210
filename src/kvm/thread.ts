// One OS thread per running vCPU. KVM_RUN blocks its thread, so it never runs
// on the libuv pool or on the main thread: each vCPU borrows a native thread
// (a pthread started by the addon, no JS on it) from a small pool of its own
// and keeps it while it lives.
//
// Owner and thread talk through a control block of 32-bit words in shared
// memory: the thread sleeps on a futex on the command word, and the owner
// wakes it with threadPost (for a run, after pinning it to the owner's CPU).
// The owner sleeps on the thread's 'done' word for up to 1 ms, and only a run
// that outlasts that is waited for with a notification (a thread-safe
// function call onto the event loop). The thread runs the native
// run loop on the owner's kvm_run mapping, which collects console output
// without leaving native code and returns on every other exit; the owner
// decodes that exit from its own view.
import { localAddon, type ThreadAddon } from './sys.js';

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

/** Words of the shared control block (native/vcpu_thread.h, CTL_*; test/native-abi.test.ts compares them). */
export const CTL = {
  cmd: 0, // sequence number of the last command (owner increments)
  op: 1,
  fd: 2,
  runLo: 3,
  runHi: 4,
  consolePort: 5,
  maxExits: 6,
  done: 8, // sequence number of the last finished command (thread sets)
  ret: 9,
  exits: 10,
  consoleLen: 11,
  nsLo: 12,
  nsHi: 13,
  tid: 14,
  /** 1 while the owner waits for the thread's notification (it stopped polling). */
  waiting: 15,
} as const;
export const CTL_WORDS = 16;
export const OP = { run: 1, exit: 2, write: 3 } as const;
const CONSOLE_BYTES = 65536;
/** The console output of a run that wrote none (a copy per run cost an ArrayBuffer). */
const NO_BYTES = new Uint8Array(0);
/** How long the caller sleeps on a run before waiting for it on the event loop. */
const SHORT_WAIT_US = 1000;

export class VcpuThread {
  private seq = 0;
  private busy = false;
  private waiter: { seq: number; resolve: () => void } | undefined;
  private handle: unknown;
  private constructor(
    private readonly k: ThreadAddon,
    private readonly ctl: Int32Array,
    private readonly console: Uint8Array,
  ) {
    this.handle = k.threadStart(ctl, console, (seq: number) => {
      if (this.waiter && seq >= this.waiter.seq) this.waiter.resolve();
    });
    if (typeof this.handle === 'number') throw new Error(`starting a vCPU thread failed: errno ${-this.handle}`);
    this.seq = Atomics.load(ctl, CTL.done);
    this.tid = Atomics.load(ctl, CTL.tid);
    VcpuThread.live.set(this.tid, this);
  }
  /** Kernel thread id, the target of kicks. */
  readonly tid: number;

  static spawn(): VcpuThread {
    const ctl = new Int32Array(new SharedArrayBuffer(CTL_WORDS * 4));
    const console = new Uint8Array(new SharedArrayBuffer(CONSOLE_BYTES));
    const k = localAddon();
    k.kickInstall();
    return new VcpuThread(k, ctl, console);
  }

  /**
   * Posts a command; it is finished when `done` reaches the returned sequence
   * number. The previous command must have finished first: the thread reads
   * the fields after it sees the sequence number change, so overwriting them
   * early would hand it the next command's fields under the previous number.
   */
  private post(op: number, onCallerCpu = false): number {
    while (!this.finished(this.seq));
    this.ctl[CTL.op] = op;
    const seq = ++this.seq;
    Atomics.store(this.ctl, CTL.cmd, seq);
    this.k.threadPost(this.handle, onCallerCpu);
    return seq;
  }

  private finished(seq: number): boolean {
    return Atomics.load(this.ctl, CTL.done) === seq;
  }

  /** Starts a run; returns its sequence number for poll() and wait(). finish() ends it. */
  start(req: RunRequest): number {
    if (this.busy) throw new Error('vCPU thread is already running a vCPU');
    while (!this.finished(this.seq));
    this.busy = true;
    const c = this.ctl;
    c[CTL.fd] = req.fd;
    // User-space addresses are below 2^47: exact as a double, no BigInt arithmetic per run.
    const run = Number(req.run);
    c[CTL.runLo] = (run % 2 ** 32) | 0;
    c[CTL.runHi] = Math.floor(run / 2 ** 32) | 0;
    c[CTL.consolePort] = req.consolePort;
    c[CTL.maxExits] = Math.min(req.maxExits, 0x7fffffff);
    return this.post(OP.run, true);
  }

  /**
   * Most runs end within a fraction of a millisecond. The run starts on the
   * caller's CPU (post pins the thread there) and the caller sleeps on the
   * thread's 'done' word for up to SHORT_WAIT_US, natively: the hand-off is then
   * a switch between two threads on one CPU, where waking a thread on an idle
   * CPU cost ~100 µs on a VM host. A longer run is unpinned and waited for on
   * the event loop (wait()). A signal ends the sleep early, so Ctrl-C is seen
   * at once (V8's Atomics.wait was seen to lose it).
   */
  poll(seq: number, pollUs = SHORT_WAIT_US): boolean {
    return this.k.threadWait(this.handle, seq, Math.min(SHORT_WAIT_US, pollUs));
  }

  /** Waits on the event loop (timers, the time-limit kick, Ctrl-C keep running) for run `seq` to end. */
  async wait(seq: number): Promise<void> {
    this.k.threadRef(this.handle, true);
    try {
      // The thread notifies the event loop when a run ends. Set `waiting`
      // before the last look at `done`, and the thread looks at `waiting`
      // after setting `done`: one of the two sees the other.
      await new Promise<void>((resolve) => {
        this.waiter = { seq, resolve };
        Atomics.store(this.ctl, CTL.waiting, 1);
        if (this.finished(seq)) resolve();
      });
      Atomics.store(this.ctl, CTL.waiting, 0);
      this.waiter = undefined;
    } finally {
      this.k.threadRef(this.handle, false);
    }
  }

  /** The result of the run that just ended; the thread is free for the next one. */
  finish(): RunReply {
    const c = this.ctl;
    this.busy = false;
    return {
      ret: c[CTL.ret]!,
      exits: c[CTL.exits]!,
      console: c[CTL.consoleLen] ? this.console.slice(0, c[CTL.consoleLen]) : NO_BYTES,
      ns: (c[CTL.nsHi]! >>> 0) * 2 ** 32 + (c[CTL.nsLo]! >>> 0),
    };
  }

  /**
   * Blocks until the last command has finished. `kick` (if given) is repeated
   * every 10 ms in case a run re-entered KVM_RUN after an earlier kick; after
   * `limitMs` the thread is given up with an error rather than waited for
   * forever.
   */
  waitIdle(kick?: () => void, limitMs = 5000): void {
    if (this.finished(this.seq)) return;
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

  /**
   * Has the thread itself write `data` to `fd`; returns write(2)'s result
   * (bytes written, or -errno). Tracefs records a write to trace_marker under
   * the thread id it sees, which inside a PID namespace is not `tid`.
   */
  write(fd: number, data: Uint8Array, limitMs = 5000): number {
    if (this.busy) throw new Error('vCPU thread is running a vCPU');
    if (data.length > CONSOLE_BYTES) throw new RangeError(`a vCPU thread writes at most ${CONSOLE_BYTES} bytes`);
    while (!this.finished(this.seq));
    this.console.set(data);
    this.ctl[CTL.fd] = fd;
    this.ctl[CTL.maxExits] = data.length;
    const seq = this.post(OP.write);
    const start = performance.now();
    while (!this.poll(seq)) {
      if (performance.now() - start > limitMs)
        throw new Error(`vCPU thread ${this.tid} did not finish a write within ${limitMs} ms`);
    }
    return this.ctl[CTL.ret]!;
  }

  /** Ends the thread. */
  exit(): void {
    this.waitIdle();
    this.post(OP.exit);
    this.k.threadJoin(this.handle);
    VcpuThread.live.delete(this.tid);
  }

  /** Threads that have not exited, by tid. */
  private static live = new Map<number, VcpuThread>();
  /** The live thread with this tid (as this process's PID namespace numbers it), if it is one of ours. */
  static byTid(tid: number): VcpuThread | undefined {
    return VcpuThread.live.get(tid);
  }

  // Idle threads are kept for the next vCPU.
  private static idle: VcpuThread[] = [];
  static acquire(): VcpuThread {
    return VcpuThread.idle.pop() ?? VcpuThread.spawn();
  }
  /** Returns an idle thread to the pool. */
  static release(t: VcpuThread): void {
    if (VcpuThread.idle.length < 8) VcpuThread.idle.push(t);
    else t.exit();
  }
}

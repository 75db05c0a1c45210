// One OS thread per running vCPU. KVM_RUN blocks its thread, so it never runs
// on the libuv pool or on the main thread: each vCPU borrows a worker thread
// from a small pool of its own, keeps it while it lives, and the worker maps
// its own view of kvm_run (mappings are not shared across isolates).
//
// The worker's loop handles only what must not cost a round trip: output on
// the console port is collected and the guest continues. Every other exit
// returns to the owner, which decodes it from its own kvm_run view.
import { Worker } from 'node:worker_threads';
import { addonPath } from './sys.js';
import { EXIT, IOCTL, KVM_EXIT_IO_OUT, MAP, PROT, RUN } from './uapi.js';

export interface RunRequest {
  fd: number;
  mmapSize: number;
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

const workerSource = `
const { parentPort, workerData } = require('node:worker_threads');
const k = require(workerData.addonPath);
const C = workerData.c;
k.kickInstall();
let fd = -1, map = null, dv = null;
function attach(newFd, size) {
  if (fd === newFd && map) return;
  detach();
  const m = k.mmap(size, C.PROT_RW, C.MAP_SHARED, newFd, 0);
  if (typeof m === 'number') throw new Error('mmap of kvm_run failed: ' + m);
  fd = newFd; map = m; dv = new DataView(m);
}
function detach() { if (map) k.munmap(map); fd = -1; map = null; dv = null; }
parentPort.on('message', (m) => {
  if (m.op === 'detach') { if (m.fd === fd) detach(); return; }
  if (m.op === 'exit') { detach(); process.exit(0); }
  const t0 = process.hrtime.bigint();
  let ret = 0, exits = 0, out = [];
  try { attach(m.fd, m.mmapSize); } catch (e) { parentPort.postMessage({ ret: -9, exits: 0, console: new Uint8Array(0), ns: 0 }); return; }
  for (;;) {
    ret = k.ioctl(fd, C.KVM_RUN, 0);
    if (ret < 0) break;
    exits++;
    if (m.consolePort && dv.getUint32(C.EXIT_REASON, true) === C.EXIT_IO &&
        dv.getUint16(C.IO_PORT, true) === m.consolePort && dv.getUint8(C.IO_DIR) === C.IO_OUT) {
      const len = dv.getUint8(C.IO_SIZE) * dv.getUint32(C.IO_COUNT, true);
      const off = Number(dv.getBigUint64(C.IO_DATA_OFFSET, true));
      if (out.length < 65536) out.push(...new Uint8Array(map, off, len));
      if (exits < m.maxExits) continue;
    }
    break;
  }
  const ns = Number(process.hrtime.bigint() - t0);
  parentPort.postMessage({ ret, exits, console: Uint8Array.from(out), ns });
});
parentPort.postMessage({ tid: k.gettid() });
`;

const constantsForWorker = {
  PROT_RW: PROT.READ | PROT.WRITE,
  MAP_SHARED: MAP.SHARED,
  KVM_RUN: IOCTL.KVM_RUN,
  EXIT_REASON: RUN.exit_reason,
  EXIT_IO: EXIT.KVM_EXIT_IO,
  IO_PORT: RUN.io_port,
  IO_DIR: RUN.io_direction,
  IO_OUT: KVM_EXIT_IO_OUT,
  IO_SIZE: RUN.io_size,
  IO_COUNT: RUN.io_count,
  IO_DATA_OFFSET: RUN.io_data_offset,
};

export class VcpuThread {
  private pending: ((r: RunReply) => void) | undefined;
  private constructor(
    private readonly worker: Worker,
    /** Kernel thread id, the target of kicks. */
    readonly tid: number,
  ) {
    worker.on('message', (r: RunReply) => {
      const p = this.pending;
      this.pending = undefined;
      p?.(r);
    });
  }

  static async spawn(): Promise<VcpuThread> {
    const worker = new Worker(workerSource, { eval: true, workerData: { addonPath, c: constantsForWorker } });
    const tid = await new Promise<number>((resolve, reject) => {
      worker.once('message', (m: { tid: number }) => resolve(m.tid));
      worker.once('error', reject);
    });
    worker.unref();
    return new VcpuThread(worker, tid);
  }

  run(req: RunRequest): Promise<RunReply> {
    if (this.pending) throw new Error('vCPU thread is already running a vCPU');
    return new Promise<RunReply>((resolve, reject) => {
      const onError = (e: Error) => {
        this.pending = undefined;
        reject(e);
      };
      this.worker.once('error', onError);
      this.pending = (r) => {
        this.worker.off('error', onError);
        resolve(r);
      };
      this.worker.ref();
      this.worker.postMessage(req);
    }).finally(() => this.worker.unref());
  }

  /** Drops the thread's kvm_run mapping of `fd` (the vCPU is going away). */
  detach(fd: number): void {
    this.worker.postMessage({ op: 'detach', fd });
  }

  terminate(): Promise<number> {
    return this.worker.terminate();
  }

  // Idle threads are kept for the next vCPU: spawning a worker costs
  // milliseconds, a VM lifecycle about one.
  private static idle: VcpuThread[] = [];
  static async acquire(): Promise<VcpuThread> {
    return VcpuThread.idle.pop() ?? VcpuThread.spawn();
  }
  static release(t: VcpuThread, fd: number): void {
    t.detach(fd);
    if (VcpuThread.idle.length < 8) VcpuThread.idle.push(t);
    else void t.terminate();
  }
}

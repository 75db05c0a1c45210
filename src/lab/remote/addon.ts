// RemoteAddon: the Addon interface carried out by the lab agent, so that the
// harness's TypeScript runs on the host while KVM runs in the lab's kernel,
// and the vCPU runner that runs KVM_RUN there.
//
// Memory the agent maps is mirrored by a local buffer of the same length;
// addressOf(mirror) is the agent's address, so structures that carry host
// virtual addresses (memslots) are right where KVM reads them. Mirrors and
// the agent's mappings are kept coherent by page diffs (mirror.ts).
import { constants as fsc } from 'node:fs';
import { createRequire } from 'node:module';
import { constants } from 'node:os';
import { addonPath, type Addon, type RangeMapping } from '../../kvm/sys.js';
import type { RunLimits, RunnerReply, RunnerVcpu, VcpuRunner } from '../../kvm/runner.js';
import { IOCTL, MAP, PROT } from '../../uapi/uapi.js';
import {
  Args,
  Channel,
  LabProtocolError,
  LabTimeoutError,
  OP,
  PAGE,
  PROTOCOL_VERSION,
  REQ_PULL,
  RUN_RECORD,
  WAIT_FOREVER,
  type ChannelOptions,
  type ReadEntry,
  type Reply,
  type Request,
  type WriteEntry,
} from '../protocol.js';
import { Mirrors, type Mirror, type Native } from './mirror.js';

/** What the agent says about itself (HELLO). */
export interface AgentInfo {
  version: number;
  pid: number;
  /** The agent's main thread: the one that makes every system call but KVM_RUN. */
  tid: number;
  pageSize: number;
  /** The signal that kicks a vCPU thread out of KVM_RUN (its time limit too). */
  timeoutSignal: number;
  sysname: string;
  release: string;
  machine: string;
}

export interface RemoteOptions extends ChannelOptions {
  /** Also pull after these ioctl requests (KVM_RUN, KVM_RESET_DIRTY_RINGS and KVM_TRANSLATE always pull). */
  pullAfterIoctls?: readonly number[];
  /** Pull after every ioctl (slow with large memory; for suspicion of a missed change). */
  pullAfterEveryIoctl?: boolean;
  /** Size of the agent-side scratch arena for buffers passed by address. Default 1 MiB. */
  scratchBytes?: number;
  /** Diff mirrors only on pages present in this process (via /proc/self/pagemap). Default true. */
  usePagemap?: boolean;
  /** How long connect() waits for the agent's first answer (default rpcTimeoutMs). */
  connectTimeoutMs?: number;
  /** connect() repeats its hello this often until answered (default 1 s; needs the watchdog). */
  helloRetryMs?: number;
}

export interface RemoteStats {
  /** Round trips. */
  rpcs: number;
  /** Time in round trips (ns). */
  rpcNs: number;
  bytesSent: number;
  bytesReceived: number;
  pagesPushed: number;
  pagesPulled: number;
  /** Time spent diffing mirrors on the host (ns). */
  diffNs: number;
}

const PROT_RW = PROT.READ | PROT.WRITE;
const SCRATCH_MAP = MAP.PRIVATE | MAP.ANONYMOUS | MAP.NORESERVE;
const { EINVAL } = constants.errno;

interface Scratch {
  view: Uint8Array;
  addr: bigint;
  /** A dedicated mapping (arena full) to unmap after use. */
  own: boolean;
}

const FIONREAD = 0x541b;

/**
 * How long the agent waits for a run's end before answering "still running"
 * (a run that ends sooner costs one round trip, as a synchronous one did),
 * and how long a poll for the end of runs in progress waits there at most:
 * the host gets a turn at least this often while vCPUs run.
 */
const FIRST_WAIT_MS = 2;
const POLL_WAIT_MAX_MS = 16;
/** How long past its time limit a run may go before the lab counts as hung. */
const RUN_GRACE_MS = 10_000;
/** A run without a time limit counts as hung after this long. */
const UNLIMITED_RUN_MS = 300_000;
/**
 * A run answered at once resolves without the event loop, so a caller that
 * loops on runs (a vCPU exiting to the host thousands of times) would starve
 * timers, the poller (other vCPUs' runs) and Ctrl-C: such a run yields once
 * the event loop has not had a turn for this long (as ThreadRunner does).
 */
const TURN_MS = 4;
let lastTurn = 0;
const turn = (): Promise<void> =>
  new Promise((resolve) =>
    setImmediate(() => {
      lastTurn = performance.now();
      resolve();
    }),
  );

/** A run in progress in the agent, waited for by the poller. */
interface Pending {
  tid: number;
  /** performance.now() after which the run is overdue: its time limit and RUN_GRACE_MS are past. */
  until: number;
  resolve(r: RunnerReply): void;
  reject(e: unknown): void;
}

function loadNative(): Native | undefined {
  try {
    return createRequire(import.meta.url)(addonPath) as Native;
  } catch {
    return undefined;
  }
}

function bytesOf(buf: ArrayBufferView | ArrayBuffer): Uint8Array {
  return buf instanceof ArrayBuffer ? new Uint8Array(buf) : new Uint8Array(buf.buffer, buf.byteOffset, buf.byteLength);
}

/** A run's record at `at` (RUN_RECORD bytes, then its console); undefined while the run is pending. */
function runRecord(p: Buffer, at: number, ret: number): { reply: RunnerReply; end: number } | undefined {
  if (p.readUInt32LE(at + 12) !== 0) return undefined;
  const len = p.readUInt32LE(at + 4);
  const end = at + RUN_RECORD + len;
  return {
    reply: {
      ret,
      exits: p.readUInt32LE(at),
      timedOut: p.readUInt32LE(at + 8) !== 0,
      ns: Number(p.readBigUInt64LE(at + 16)),
      console: Uint8Array.prototype.slice.call(p.subarray(at + RUN_RECORD, end)),
    },
    end,
  };
}

export class RemoteAddon implements Addon, RangeMapping {
  readonly info: AgentInfo;
  /** The agent's vCPU thread of each vCPU fd that ran. */
  private readonly threads = new Map<number, number>();
  private readonly pending = new Map<number, Pending>();
  private pollWaitMs = 1;
  private polling = false;
  private readonly ch: Channel;
  private readonly mirrors: Mirrors;
  private scratch: Scratch[] = [];
  private arena = 0n;
  private readonly arenaSize: number;
  private arenaUsed = 0;
  private readonly pullAfter: Set<number>;
  private readonly pullAll: boolean;

  private constructor(ch: Channel, opts: RemoteOptions) {
    this.ch = ch;
    this.mirrors = new Mirrors(loadNative(), opts.usePagemap ?? true);
    // KVM_TRANSLATE walks the guest's tables with KVM's walker, which sets A bits in guest memory.
    this.pullAfter = new Set([
      IOCTL.KVM_RUN,
      IOCTL.KVM_RESET_DIRTY_RINGS,
      IOCTL.KVM_TRANSLATE,
      ...(opts.pullAfterIoctls ?? []),
    ]);
    this.pullAll = opts.pullAfterEveryIoctl ?? false;
    this.arenaSize = opts.scratchBytes ?? 1 << 20;
    const hello = this.ch.handshake(
      { op: OP.hello },
      opts.helloRetryMs ?? 1000,
      opts.connectTimeoutMs ?? this.ch.rpcTimeoutMs,
    );
    const info = JSON.parse(Buffer.from(hello.payload).toString('utf8')) as AgentInfo;
    if (info.version !== PROTOCOL_VERSION)
      throw new LabProtocolError(`the agent speaks protocol ${info.version}, this host ${PROTOCOL_VERSION}`);
    this.info = info;
    const a = this.rpc({
      op: OP.mmap,
      args: new Args().u64(this.arenaSize).i32(PROT_RW).i32(SCRATCH_MAP).i32(-1).u32(0).i64(0).done(),
    });
    if (a.result < 0) throw new LabProtocolError(`the agent cannot map its scratch arena: errno ${-a.result}`);
    this.arena = a.result64;
  }

  /**
   * Connects to an agent on a pair of descriptors (replies on readFd, requests
   * on writeFd). The descriptors stay the caller's (closed by neither a failed
   * connect nor disconnect) unless `ownFds`.
   */
  static connect(readFd: number, writeFd: number, opts: RemoteOptions = {}): RemoteAddon {
    const native = loadNative();
    const n = new Int32Array(1);
    const available = native ? (fd: number) => (native.ioctlBuf(fd, FIONREAD, n) < 0 ? -1 : n[0]!) : undefined;
    const ch = new Channel(readFd, writeFd, { available, ...opts });
    try {
      return new RemoteAddon(ch, opts);
    } catch (e) {
      ch.close();
      throw e;
    }
  }

  get stats(): RemoteStats {
    const s = this.ch.stats;
    return {
      rpcs: s.calls,
      rpcNs: s.ns,
      bytesSent: s.bytesSent,
      bytesReceived: s.bytesReceived,
      ...this.mirrors.counters,
    };
  }

  // ---- coherence (mirror.ts) ----------------------------------------------

  /** One round trip; pushes mirror changes first (unless `push` is false), applies pulled pages after. */
  private rpc(req: Request, opts: { push?: boolean; extraMs?: number } = {}): Reply {
    let writes = req.writes;
    if (opts.push ?? true) {
      const w: WriteEntry[] = [];
      this.mirrors.collectPushes(w);
      if (req.writes) w.push(...req.writes);
      writes = w;
    }
    const r = this.ch.call({ ...req, writes }, opts.extraMs ?? 0);
    if (r.pulled.length) this.mirrors.applyPulls(r);
    return r;
  }

  /** Pushes host changes and pulls the agent's: both sides agree afterwards. */
  sync(): void {
    this.rpc({ op: OP.nop, flags: REQ_PULL });
  }

  // ---- buffers passed by address -------------------------------------------

  addressOf(buf: ArrayBufferView | ArrayBuffer): bigint {
    const ab = buf instanceof ArrayBuffer ? buf : (buf.buffer as ArrayBuffer);
    const off = buf instanceof ArrayBuffer ? 0 : buf.byteOffset;
    const m = this.mirrors.get(ab);
    if (m) return m.remote + BigInt(off);
    const view = bytesOf(buf);
    const known = this.scratch.find(
      (s) =>
        s.view.buffer === view.buffer && s.view.byteOffset === view.byteOffset && s.view.byteLength === view.byteLength,
    );
    if (known) return known.addr;
    const at = (this.arenaUsed + 63) & ~63;
    if (at + view.byteLength <= this.arenaSize) {
      this.arenaUsed = at + view.byteLength;
      const s = { view, addr: this.arena + BigInt(at), own: false };
      this.scratch.push(s);
      return s.addr;
    }
    const len = Math.max(PAGE, Math.ceil(view.byteLength / PAGE) * PAGE);
    const r = this.rpc({
      op: OP.mmap,
      args: new Args().u64(len).i32(PROT_RW).i32(SCRATCH_MAP).i32(-1).u32(0).i64(0).done(),
    });
    if (r.result < 0) throw new LabProtocolError(`the agent cannot map ${len} bytes of scratch: errno ${-r.result}`);
    const s = { view, addr: r.result64, own: true };
    this.scratch.push(s);
    return s.addr;
  }

  /** Scratch buffers go out before an ioctl and come back after it; then they are released. */
  private ioctlRpc(req: Request, ioctlReq: number): Reply {
    const scratch = this.scratch;
    this.scratch = [];
    this.arenaUsed = 0;
    const writes: WriteEntry[] = scratch.map((s) => ({ addr: s.addr, data: s.view }));
    const reads: ReadEntry[] = scratch.map((s) => ({ addr: s.addr, len: s.view.byteLength }));
    const pull = this.pullAll || this.pullAfter.has(ioctlReq);
    const r = this.rpc({ ...req, writes, reads, flags: pull ? REQ_PULL : 0 });
    scratch.forEach((s, i) => s.view.set(r.reads[i]!));
    for (const s of scratch) {
      if (s.own)
        this.rpc({
          op: OP.munmap,
          args: new Args()
            .u64(s.addr)
            .u64(Math.max(PAGE, Math.ceil(s.view.byteLength / PAGE) * PAGE))
            .done(),
        });
    }
    return r;
  }

  // ---- the Addon interface ---------------------------------------------------

  open(path: string, flags: number): number {
    return this.rpc({ op: OP.open, args: new Args().u32(flags).str(path).done() }).result;
  }

  close(fd: number): number {
    this.endThread(fd);
    return this.rpc({ op: OP.close, args: new Args().i32(fd).done() }).result;
  }

  ioctl(fd: number, req: number, arg: number | bigint = 0): number {
    return this.ioctlRpc({ op: OP.ioctl, args: new Args().i32(fd).u32(0).u64(req).u64(arg).done() }, req).result;
  }

  ioctlBuf(fd: number, req: number, buf: ArrayBufferView | ArrayBuffer): number {
    const b = bytesOf(buf);
    const r = this.ioctlRpc({ op: OP.ioctlBuf, args: new Args().i32(fd).u32(0).u64(req).bytes(b).done() }, req);
    b.set(r.payload.subarray(0, b.length));
    return r.result;
  }

  mmap(len: number, prot: number, flags: number, fd: number, offset: number): ArrayBuffer | number {
    // The mirror exists before the reply is applied: the reply carries the mapping's initial content.
    const local = this.mirrors.allocLocal(len);
    const pushes: WriteEntry[] = [];
    this.mirrors.collectPushes(pushes);
    const r = this.ch.call({
      op: OP.mmap,
      writes: pushes,
      args: new Args().u64(len).i32(prot).i32(flags).i32(fd).u32(1).i64(offset).done(),
    });
    if (r.result < 0) {
      this.mirrors.freeLocal(local.buf);
      this.mirrors.freeLocal(local.snapBuf);
      return r.result;
    }
    const m: Mirror = { remote: r.result64, len, ...local };
    this.mirrors.add(m);
    this.mirrors.applyPulls(r);
    return m.buf;
  }

  munmap(ab: ArrayBuffer): number {
    const m = this.mirrors.get(ab);
    if (!m) return ab.byteLength === 0 ? 0 : -EINVAL;
    const r = this.rpc({ op: OP.munmap, args: new Args().u64(m.remote).u64(m.len).done() });
    if (r.result < 0) return r.result;
    this.mirrors.remove(m);
    return r.result;
  }

  /** The mirror's bytes written into the agent's mapping as they are, changed or not (a VMM store). */
  storeThrough(buf: ArrayBuffer, offset: number, len: number): number {
    const at = this.range(buf, offset, len);
    if (at === undefined) return -EINVAL;
    this.poke(at, new Uint8Array(buf, offset, len).slice());
    return 0;
  }

  /** munmap of whole pages inside a mirror's mapping in the agent; the mirror keeps its bytes. */
  unmapRange(buf: ArrayBuffer, offset: number, len: number): number {
    const at = this.range(buf, offset, len);
    if (at === undefined) return -EINVAL;
    // keep = 1: the mapping stays known (and mapped back by remapRange) even when the range is all of it.
    return this.rpc({ op: OP.munmap, flags: REQ_PULL, args: new Args().u64(at).u64(len).u32(1).done() }).result;
  }

  /** mmap(MAP_FIXED) over whole pages inside a mirror's mapping; the next pull brings the new content. */
  remapRange(
    buf: ArrayBuffer,
    offset: number,
    len: number,
    prot: number,
    flags: number,
    fd: number,
    fileOffset: number,
  ): number {
    const at = this.range(buf, offset, len);
    if (at === undefined) return -EINVAL;
    return this.rpc({
      op: OP.remap,
      flags: REQ_PULL,
      args: new Args().u64(at).u64(len).i32(prot).i32(flags).i32(fd).u32(0).i64(fileOffset).done(),
    }).result;
  }

  private range(buf: ArrayBuffer, offset: number, len: number): bigint | undefined {
    const m = this.mirrors.get(buf);
    if (!m || offset < 0 || len < 0 || offset + len > m.len) return undefined;
    return m.remote + BigInt(offset);
  }

  madvise(buf: ArrayBuffer, offset: number, len: number, advice: number): number {
    const at = this.range(buf, offset, len);
    if (at === undefined) return -EINVAL;
    return this.rpc({ op: OP.madvise, flags: REQ_PULL, args: new Args().u64(at).u64(len).i32(advice).done() }).result;
  }

  mprotect(buf: ArrayBuffer, offset: number, len: number, prot: number): number {
    const at = this.range(buf, offset, len);
    if (at === undefined) return -EINVAL;
    return this.rpc({ op: OP.mprotect, args: new Args().u64(at).u64(len).i32(prot).done() }).result;
  }

  memfdCreate(name: string, flags: number): number {
    return this.rpc({ op: OP.memfd, args: new Args().u32(flags).str(name).done() }).result;
  }

  fallocate(fd: number, mode: number, offset: number, len: number): number {
    return this.rpc({
      op: OP.fallocate,
      flags: REQ_PULL,
      args: new Args().i32(fd).i32(mode).i64(offset).i64(len).done(),
    }).result;
  }

  ftruncate(fd: number, len: number): number {
    return this.rpc({ op: OP.ftruncate, flags: REQ_PULL, args: new Args().i32(fd).u32(0).i64(len).done() }).result;
  }

  pread(fd: number, buf: ArrayBufferView | ArrayBuffer, pos: number): number {
    const b = bytesOf(buf);
    const r = this.rpc({ op: OP.pread, args: new Args().i32(fd).u32(0).u64(b.length).i64(pos).done() });
    if (r.result > 0) b.set(r.payload.subarray(0, r.result));
    return r.result;
  }

  write(fd: number, buf: ArrayBufferView | ArrayBuffer): number {
    return this.rpc({ op: OP.write, args: new Args().i32(fd).u32(0).bytes(bytesOf(buf)).done() }).result;
  }

  // ---- vCPU runs ------------------------------------------------------------

  /** The agent's thread for vCPU fd, started on first use. */
  private threadOf(fd: number): number {
    let tid = this.threads.get(fd);
    if (tid === undefined) {
      const r = this.rpc({ op: OP.thread });
      if (r.result < 0) throw new LabProtocolError(`the agent cannot start a vCPU thread: errno ${-r.result}`);
      this.threads.set(fd, (tid = r.result));
    }
    return tid;
  }

  /** Ends vCPU fd's thread in the agent, if it has one; a run in progress is kicked and its end delivered first. */
  private endThread(fd: number): void {
    const tid = this.threads.get(fd);
    if (tid === undefined) return;
    if (this.pending.has(tid)) {
      this.kick(tid);
      this.collect([tid], WAIT_FOREVER);
    }
    this.threads.delete(fd);
    const r = this.rpc({ op: OP.threadEnd, flags: REQ_PULL, args: new Args().i32(tid).done() });
    if (r.result < 0) throw new LabProtocolError(`ending vCPU thread ${tid} in the agent: errno ${-r.result}`);
  }

  /** Starts a run on the fd's thread and waits for it up to waitMs; undefined while it goes on. */
  private startRun(fd: number, runAddr: bigint, limits: RunLimits, waitMs: number): RunnerReply | undefined {
    const tid = this.threadOf(fd);
    const ms = Math.max(0, Math.min(Math.ceil(limits.timeoutMs), 0xfffffffe));
    const r = this.rpc(
      {
        op: OP.run,
        flags: REQ_PULL,
        args: new Args()
          .i32(fd)
          .u32(limits.consolePort)
          .u64(runAddr)
          .u32(Math.min(Math.max(limits.maxExits, 1), 0xffffffff))
          .u32(ms)
          .i32(tid)
          .u32(waitMs)
          .done(),
      },
      { extraMs: waitMs === WAIT_FOREVER ? ms : waitMs },
    );
    const p = Buffer.from(r.payload.buffer, r.payload.byteOffset, r.payload.byteLength);
    if (p.length < RUN_RECORD) {
      if (r.result < 0) return { ret: r.result, exits: 0, console: new Uint8Array(0), ns: 0, timedOut: false };
      throw new LabProtocolError('short reply to run');
    }
    return runRecord(p, 0, r.result)?.reply;
  }

  /**
   * KVM_RUN in the agent, on the vCPU fd's thread, until an exit other than
   * `out` to consolePort (0 = none), maxExits returns, or the time limit
   * (0 = none) kicks it. Synchronous: the agent answers when the run is over.
   * Mirrors are pushed before and pulled after, the kvm_run mapping
   * (runAddr's mirror) included.
   */
  remoteRun(fd: number, runAddr: bigint, consolePort: number, maxExits: number, timeoutMs: number): RunnerReply {
    return this.startRun(fd, runAddr, { consolePort, maxExits, timeoutMs }, WAIT_FOREVER)!;
  }

  /**
   * A vCPU's runner in the agent: each vCPU runs on a thread of its own there.
   * A run that ends within FIRST_WAIT_MS is answered at once; a longer one goes
   * on while the host does other work (other calls, other vCPUs' runs), and
   * the poller collects its end. The agent applies the time limit.
   */
  runner(vcpu: RunnerVcpu): VcpuRunner {
    return {
      run: (l: RunLimits) => {
        const done = this.startRun(vcpu.fd, vcpu.runAddress, l, FIRST_WAIT_MS);
        if (done) {
          vcpu.immediateExit(false);
          return performance.now() - lastTurn > TURN_MS ? turn().then(() => done) : done;
        }
        const tid = this.threadOf(vcpu.fd);
        return new Promise<RunnerReply>((resolve, reject) => {
          const limit = l.timeoutMs > 0 ? l.timeoutMs : UNLIMITED_RUN_MS;
          this.pending.set(tid, { tid, until: performance.now() + limit + RUN_GRACE_MS, resolve, reject });
          this.pollWaitMs = 1;
          this.schedulePoll();
        }).then((r) => {
          vcpu.immediateExit(false);
          return r;
        });
      },
      tid: () => this.threadOf(vcpu.fd),
      kick: () => {
        const tid = this.threads.get(vcpu.fd);
        if (tid !== undefined) this.kick(tid);
      },
      close: () => this.endThread(vcpu.fd),
    };
  }

  private schedulePoll(): void {
    if (this.polling || !this.pending.size) return;
    this.polling = true;
    // setImmediate: timers and I/O of the host get their turn between polls;
    // the wait in the agent paces them.
    setImmediate(() => {
      lastTurn = performance.now();
      this.polling = false;
      this.poll();
    });
  }

  /** One round trip that collects the runs that have ended (pulling mirrors, so the host sees the guest's progress). */
  private poll(): void {
    if (!this.pending.size) return;
    try {
      const n = this.collect([...this.pending.keys()], this.pollWaitMs);
      this.pollWaitMs = n > 0 ? 1 : Math.min(this.pollWaitMs * 2, POLL_WAIT_MAX_MS);
      // A vCPU thread that the agent's kick cannot stop (it died in the kernel, holding a lock, or
      // the kernel hangs under it) never ends its run: past its limit and the grace, the lab has hung.
      const now = performance.now();
      const overdue = [...this.pending.values()].find((p) => now > p.until);
      if (overdue) {
        const e = new LabTimeoutError(
          `the run on the agent's vCPU thread ${overdue.tid} did not end ${RUN_GRACE_MS / 1000} s after its time limit; the lab may have hung`,
        );
        this.ch.fail(e);
        throw e;
      }
    } catch (e) {
      const all = [...this.pending.values()];
      this.pending.clear();
      for (const p of all) p.reject(e);
      return;
    }
    this.schedulePoll();
  }

  /** Waits up to waitMs in the agent for runs of these threads to end, and delivers each that has; returns how many. */
  private collect(tids: number[], waitMs: number): number {
    const args = new Args().u32(waitMs);
    for (const t of tids) args.i32(t);
    const r = this.rpc({ op: OP.runWait, flags: REQ_PULL, args: args.done() }, { extraMs: waitMs });
    const p = Buffer.from(r.payload.buffer, r.payload.byteOffset, r.payload.byteLength);
    const ended: [Pending | undefined, RunnerReply][] = [];
    let at = 0;
    for (let k = 0; k < r.result; k++) {
      const tid = p.readInt32LE(at);
      const rec = runRecord(p, at + 16, Number(p.readBigInt64LE(at + 8)));
      if (!rec) throw new LabProtocolError(`desync: a pending run in the reply to runWait`);
      at = rec.end;
      ended.push([this.pending.get(tid), rec.reply]);
      this.pending.delete(tid);
    }
    for (const [w, reply] of ended) w?.resolve(reply);
    return r.result;
  }

  /** The agent's main thread id (the one that makes every system call but KVM_RUN). */
  gettid(): number {
    return this.info.tid;
  }
  /** The agent installs its kick handler at start-up. */
  kickInstall(): number {
    return 0;
  }
  kickSignal(): number {
    return this.info.timeoutSignal;
  }
  /** Kicks the agent's vCPU thread `tid` out of KVM_RUN (nothing when it is not running). */
  kick(tid: number): number {
    return this.rpc({ op: OP.kick, args: new Args().i32(tid).done() }).result;
  }

  // ---- beyond the Addon interface -------------------------------------------

  /** Reads agent memory (raw: not a mirror update). */
  peek(addr: bigint, len: number): Uint8Array {
    const r = this.rpc({ op: OP.peek, args: new Args().u64(addr).u64(len).done() }, { push: false });
    if (r.result < 0)
      throw new LabProtocolError(`peek of ${len} bytes at 0x${addr.toString(16)} failed: errno ${-r.result}`);
    return Uint8Array.prototype.slice.call(r.payload);
  }

  /** Writes agent memory (raw: inside a mapping, the next pull brings the change to its mirror). */
  poke(addr: bigint, data: Uint8Array): void {
    const r = this.rpc({ op: OP.poke, args: new Args().u64(addr).bytes(data).done() }, { push: false });
    if (r.result < 0)
      throw new LabProtocolError(`poke of ${data.length} bytes at 0x${addr.toString(16)} failed: errno ${-r.result}`);
  }

  /** read(2) on an agent fd (sysfs, tracefs pipes); returns the bytes or -errno. */
  read(fd: number, len: number): Uint8Array | number {
    const r = this.rpc({ op: OP.read, args: new Args().i32(fd).u32(0).u64(len).i64(-1).done() });
    return r.result < 0 ? r.result : Uint8Array.prototype.slice.call(r.payload);
  }

  /** A whole file of the lab's file system (sysfs, procfs, tracefs). */
  readFile(path: string): Buffer {
    const fd = this.open(path, fsc.O_RDONLY);
    if (fd < 0) throw new LabProtocolError(`open ${path} in the lab: errno ${-fd}`);
    try {
      const parts: Uint8Array[] = [];
      for (;;) {
        const b = this.read(fd, 65536);
        if (typeof b === 'number') throw new LabProtocolError(`read ${path} in the lab: errno ${-b}`);
        if (!b.length) break;
        parts.push(b);
      }
      return Buffer.concat(parts);
    } finally {
      this.close(fd);
    }
  }

  /** Writes a file of the lab's file system (one write(2), as `echo x > file` does). */
  writeFile(path: string, data: string | Uint8Array): number {
    const fd = this.open(path, fsc.O_WRONLY | fsc.O_TRUNC);
    if (fd < 0) return fd;
    try {
      return this.write(fd, typeof data === 'string' ? Buffer.from(data) : data);
    } finally {
      this.close(fd);
    }
  }

  mkdir(path: string, mode = 0o755): number {
    return this.rpc({ op: OP.mkdir, args: new Args().u32(mode).str(path).done() }).result;
  }

  rmdir(path: string): number {
    return this.rpc({ op: OP.rmdir, args: new Args().str(path).done() }).result;
  }

  /** Why the channel to the agent can no longer be used (no reply in time, the agent gone), if it cannot. */
  get failure(): Error | undefined {
    return this.ch.failure;
  }

  /** Local mirrors by agent address (tests, diagnostics). */
  mirrorOf(remote: bigint): ArrayBuffer | undefined {
    return this.mirrors.at(remote, 1)?.buf;
  }

  /** Asks the agent to exit, then closes the channel (and its descriptors if it owns them). Mirrors stay readable. */
  disconnect(): void {
    const runs = [...this.pending.values()];
    this.pending.clear();
    for (const p of runs) p.reject(new LabProtocolError('the lab agent was disconnected during a run'));
    if (!this.ch.failure) {
      try {
        this.ch.call({ op: OP.exit }, 0);
      } catch {
        /* the agent may already be gone */
      }
    }
    this.ch.close();
    this.mirrors.close();
  }
}

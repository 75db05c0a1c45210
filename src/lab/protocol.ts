// The lab agent's wire protocol (host side): frame layout, encoding and
// decoding, and a synchronous channel over a pair of file descriptors.
//
// The host side is synchronous because the Addon interface is: a request is
// written with fs.writeSync and its reply read with fs.readSync before the
// call returns. A watchdog thread enforces a deadline on every reply (a
// blocking read cannot time out by itself). docs/lab-protocol.md describes
// the format; native/agent/ is the other end (its constants in native/agent/wire.h,
// which test/native-abi.test.ts compares with the exports here).
import { closeSync, constants as fsc, openSync, readSync, writeSync } from 'node:fs';
import { Worker } from 'node:worker_threads';

export const PROTOCOL_VERSION = 2;
/** "KHRQ", "KHRP", "KHEN" as little-endian u32. */
export const REQ_MAGIC = 0x5152484b;
export const REP_MAGIC = 0x5052484b;
export const END_MAGIC = 0x4e45484b;
export const REQ_HEADER = 24;
export const REP_HEADER = 40;
/** A write, read or pulled entry: {u64 addr, u32 len, u32 flags}. */
export const ENTRY = 16;
export const PAGE = 4096;
/** Largest frame either side accepts. */
export const MAX_FRAME = 2 ** 31;

export const OP = {
  nop: 0,
  hello: 1,
  open: 2,
  close: 3,
  ioctl: 4,
  ioctlBuf: 5,
  mmap: 6,
  munmap: 7,
  madvise: 8,
  mprotect: 9,
  memfd: 10,
  fallocate: 11,
  ftruncate: 12,
  pread: 13,
  write: 14,
  peek: 15,
  poke: 16,
  run: 17,
  read: 18,
  mkdir: 19,
  rmdir: 20,
  exit: 21,
  thread: 22,
  threadEnd: 23,
  runWait: 24,
  kick: 25,
  remap: 26,
} as const;
export type OpName = keyof typeof OP;
const opNames = new Map<number, OpName>(Object.entries(OP).map(([k, v]) => [v, k as OpName]));
export function opName(op: number): string {
  return opNames.get(op) ?? `op ${op}`;
}

/** Request flag: after the operation, scan every tracked mapping and return the changed pages. */
export const REQ_PULL = 1;
/** Entry flag: the range is all zero; no data follows. */
export const ENTRY_ZERO = 1;
export const STATUS = { ok: 0, badRequest: 1, fault: 2 } as const;
/** A run's record in run and runWait replies: {u32 exits, u32 consoleLen, u32 timedOut, u32 pending, u64 ns}. */
export const RUN_RECORD = 24;
/** run: wait for the run's end as long as it takes (its time limit still ends it). */
export const WAIT_FOREVER = 0xffffffff;

/** Bytes to store at a remote address before the operation. */
export interface WriteEntry {
  addr: bigint;
  data: Uint8Array;
}
/** Bytes to read from a remote address after the operation. */
export interface ReadEntry {
  addr: bigint;
  len: number;
}
/** A range of a tracked mapping whose content changed on the agent's side. */
export interface PulledEntry {
  addr: bigint;
  len: number;
  /** The range is now all zero (no data). */
  zero: boolean;
  /** The new content (a view into the channel's reply buffer: copy it before the next call). */
  data: Uint8Array | undefined;
}

export interface Request {
  op: number;
  flags?: number;
  writes?: readonly WriteEntry[];
  reads?: readonly ReadEntry[];
  args?: Uint8Array;
}

export interface Reply {
  op: number;
  status: number;
  /** The operation's result: >= 0, or -errno. */
  result: number;
  /** The same, exact for 64-bit values (addresses). */
  result64: bigint;
  /** Operation-specific bytes (a view into the reply buffer). */
  payload: Uint8Array;
  /** One view per requested read, in order. */
  reads: Uint8Array[];
  pulled: PulledEntry[];
}

/** The channel to the agent failed, or the agent answered out of protocol. */
export class LabProtocolError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'LabProtocolError';
  }
}
/** No reply within the deadline (the lab's kernel may have hung), or the agent process exited. */
export class LabTimeoutError extends LabProtocolError {
  constructor(
    message: string,
    /** 'deadline': no reply in time; 'exited': the watched agent process is gone. */
    readonly reason: 'deadline' | 'exited' = 'deadline',
  ) {
    super(message);
    this.name = 'LabTimeoutError';
  }
}

/** Little-endian argument builder. */
export class Args {
  private b = Buffer.alloc(64);
  private n = 0;
  private room(k: number): void {
    if (this.n + k > this.b.length) {
      const nb = Buffer.alloc(Math.max(this.b.length * 2, this.n + k));
      this.b.copy(nb, 0, 0, this.n);
      this.b = nb;
    }
  }
  u32(v: number): this {
    this.room(4);
    this.b.writeUInt32LE(v >>> 0, this.n);
    this.n += 4;
    return this;
  }
  i32(v: number): this {
    this.room(4);
    this.b.writeInt32LE(v | 0, this.n);
    this.n += 4;
    return this;
  }
  u64(v: number | bigint): this {
    this.room(8);
    this.b.writeBigUInt64LE(BigInt.asUintN(64, BigInt(v)), this.n);
    this.n += 8;
    return this;
  }
  i64(v: number | bigint): this {
    this.room(8);
    this.b.writeBigInt64LE(BigInt.asIntN(64, BigInt(v)), this.n);
    this.n += 8;
    return this;
  }
  bytes(v: Uint8Array): this {
    this.room(v.length);
    this.b.set(v, this.n);
    this.n += v.length;
    return this;
  }
  str(s: string): this {
    return this.bytes(Buffer.from(s, 'utf8'));
  }
  done(): Uint8Array {
    return this.b.subarray(0, this.n);
  }
}

/** Size of the frame that encodes `req`. */
export function requestSize(req: Request): number {
  let n = REQ_HEADER + 4 + (req.args?.length ?? 0) + ENTRY * (req.reads?.length ?? 0);
  for (const w of req.writes ?? []) n += ENTRY + w.data.length;
  return n;
}

/** Encodes a request into `out` (which must hold requestSize(req) bytes); returns the frame's view. */
export function encodeRequest(seq: number, req: Request, out: Buffer): Buffer {
  const total = requestSize(req);
  if (total > MAX_FRAME) throw new LabProtocolError(`request of ${total} bytes exceeds the frame limit`);
  const b = out.subarray(0, total);
  b.writeUInt32LE(REQ_MAGIC, 0);
  b.writeUInt32LE(seq >>> 0, 4);
  b.writeUInt32LE(total, 8);
  b.writeUInt16LE(req.op, 12);
  b.writeUInt16LE(req.flags ?? 0, 14);
  b.writeUInt32LE(req.writes?.length ?? 0, 16);
  b.writeUInt32LE(req.reads?.length ?? 0, 20);
  let at = REQ_HEADER;
  for (const w of req.writes ?? []) {
    b.writeBigUInt64LE(w.addr, at);
    b.writeUInt32LE(w.data.length, at + 8);
    b.writeUInt32LE(0, at + 12);
    b.set(w.data, at + ENTRY);
    at += ENTRY + w.data.length;
  }
  for (const r of req.reads ?? []) {
    b.writeBigUInt64LE(r.addr, at);
    b.writeUInt32LE(r.len, at + 8);
    b.writeUInt32LE(0, at + 12);
    at += ENTRY;
  }
  if (req.args) {
    b.set(req.args, at);
    at += req.args.length;
  }
  b.writeUInt32LE(END_MAGIC, at);
  return b;
}

export interface ReplyHeader {
  seq: number;
  total: number;
  op: number;
  status: number;
  result64: bigint;
  payloadLen: number;
  nreads: number;
  npulled: number;
}

export function decodeReplyHeader(h: Uint8Array): ReplyHeader {
  const b = Buffer.from(h.buffer, h.byteOffset, REP_HEADER);
  const magic = b.readUInt32LE(0);
  if (magic !== REP_MAGIC)
    throw new LabProtocolError(
      `desync: reply magic 0x${magic.toString(16).padStart(8, '0')}, expected 0x${REP_MAGIC.toString(16)}`,
    );
  const total = b.readUInt32LE(8);
  if (total < REP_HEADER + 4 || total > MAX_FRAME) throw new LabProtocolError(`desync: reply length ${total}`);
  return {
    seq: b.readUInt32LE(4),
    total,
    op: b.readUInt16LE(12),
    status: b.readUInt16LE(14),
    result64: b.readBigInt64LE(16),
    payloadLen: b.readUInt32LE(24),
    nreads: b.readUInt32LE(28),
    npulled: b.readUInt32LE(32),
  };
}

/** Decodes a reply's body (the bytes after the header, trailer included). */
export function decodeReplyBody(h: ReplyHeader, body: Buffer, readLens: readonly number[]): Reply {
  const end = body.length - 4;
  if (end < 0 || body.readUInt32LE(end) !== END_MAGIC)
    throw new LabProtocolError(`desync: bad end marker in the reply to ${opName(h.op)} #${h.seq}`);
  const short = () => new LabProtocolError(`desync: reply to ${opName(h.op)} #${h.seq} is shorter than its contents`);
  let at = 0;
  if (h.payloadLen > end) throw short();
  const payload = body.subarray(0, h.payloadLen);
  at = h.payloadLen;
  const reads: Uint8Array[] = [];
  if (h.status === STATUS.ok && h.nreads !== readLens.length)
    throw new LabProtocolError(
      `reply to ${opName(h.op)} #${h.seq} has ${h.nreads} reads, ${readLens.length} were asked`,
    );
  for (let i = 0; i < h.nreads; i++) {
    const len = readLens[i] ?? 0;
    if (at + len > end) throw short();
    reads.push(body.subarray(at, at + len));
    at += len;
  }
  const pulled: PulledEntry[] = [];
  for (let i = 0; i < h.npulled; i++) {
    if (at + ENTRY > end) throw short();
    const addr = body.readBigUInt64LE(at);
    const len = body.readUInt32LE(at + 8);
    const zero = (body.readUInt32LE(at + 12) & ENTRY_ZERO) !== 0;
    at += ENTRY;
    let data: Uint8Array | undefined;
    if (!zero) {
      if (at + len > end) throw short();
      data = body.subarray(at, at + len);
      at += len;
    }
    pulled.push({ addr, len, zero, data });
  }
  if (at !== end)
    throw new LabProtocolError(`desync: ${end - at} stray bytes in the reply to ${opName(h.op)} #${h.seq}`);
  return { op: h.op, status: h.status, result64: h.result64, result: Number(h.result64), payload, reads, pulled };
}

// ---- the channel ------------------------------------------------------------

export interface ChannelOptions {
  /** Deadline for a reply, beyond the time an operation asks for itself (a run's limit). Default 60 s. */
  rpcTimeoutMs?: number;
  /** Check the deadline on a watchdog thread (default true). Without it a hung agent blocks forever. */
  watchdog?: boolean;
  /** A local agent's process id: the watchdog also ends a wait when that process has exited. */
  watchPid?: number;
  /** Watchdog period (default 100 ms). */
  watchdogTickMs?: number;
  /**
   * Before sleeping in a blocking read, poll this long for the reply (a
   * sleeping thread takes tens of µs to wake on a virtual CPU). Needs
   * `available`. Default 0.
   */
  spinUs?: number;
  /** Bytes ready to read on a descriptor (FIONREAD), or < 0 if unknown. */
  available?: (fd: number) => number;
  /** close() closes both descriptors too (default: they stay the caller's). */
  ownFds?: boolean;
}

export interface ChannelStats {
  calls: number;
  bytesSent: number;
  bytesReceived: number;
  /** Time spent in call(), total. */
  ns: number;
}

/** Words of the watchdog's control block. */
const WD = { armed: 0, why: 1, stop: 2 } as const;
const WD_DEADLINE_BYTE = 16;

const watchdogSource = `
const { workerData } = require('node:worker_threads');
const fs = require('node:fs');
const ctl = new Int32Array(workerData.ctl);
const deadline = new Float64Array(workerData.ctl, ${WD_DEADLINE_BYTE}, 1);
const W = workerData.w;
function alive(pid) {
  try {
    const s = fs.readFileSync('/proc/' + pid + '/stat', 'latin1');
    const st = s.slice(s.lastIndexOf(')') + 2, s.lastIndexOf(')') + 3);
    return st !== 'Z' && st !== 'X';
  } catch { return false; }
}
for (;;) {
  Atomics.wait(ctl, W.stop, 0, workerData.tickMs);
  if (Atomics.load(ctl, W.stop)) break;
  const armed = Atomics.load(ctl, W.armed);
  if (armed <= 0) continue;
  let why = 0;
  if (Date.now() > deadline[0]) why = 1;
  else if (workerData.pid && !alive(workerData.pid)) why = 2;
  if (!why) continue;
  // Claim the call: the owner's disarm fails from now on, so no late byte
  // can be mistaken for the next reply.
  if (Atomics.compareExchange(ctl, W.armed, armed, -armed) !== armed) continue;
  Atomics.store(ctl, W.why, why);
  // Wake the owner's blocking read by writing one byte into its own FIFO.
  try {
    const fd = fs.openSync('/proc/self/fd/' + workerData.readFd, fs.constants.O_WRONLY | fs.constants.O_NONBLOCK);
    try { fs.writeSync(fd, Buffer.from([0])); } finally { fs.closeSync(fd); }
  } catch {}
}
`;

/**
 * A synchronous request/response channel to the agent. `readFd` carries
 * replies (a FIFO opened for blocking reads), `writeFd` requests (ideally
 * non-blocking: a full pipe is then waited on with the same deadline).
 */
export class Channel {
  private seq = 0;
  private out = Buffer.alloc(1 << 16);
  private rbuf = Buffer.alloc(1 << 16);
  private rpos = 0;
  private rend = 0;
  private body = Buffer.alloc(1 << 16);
  private readonly hdr = Buffer.alloc(REP_HEADER);
  private broken: Error | undefined;
  private readonly ctl: Int32Array | undefined;
  private readonly deadline: Float64Array | undefined;
  private readonly worker: Worker | undefined;
  private readonly sleeper = new Int32Array(new SharedArrayBuffer(4));
  readonly stats: ChannelStats = { calls: 0, bytesSent: 0, bytesReceived: 0, ns: 0 };
  readonly rpcTimeoutMs: number;
  private readonly spinNs: bigint;
  private readonly available: ((fd: number) => number) | undefined;
  private readonly ownFds: boolean;

  constructor(
    readonly readFd: number,
    readonly writeFd: number,
    opts: ChannelOptions = {},
  ) {
    this.rpcTimeoutMs = opts.rpcTimeoutMs ?? 60_000;
    this.available = opts.available;
    this.ownFds = opts.ownFds ?? false;
    this.spinNs = this.available ? BigInt(Math.round((opts.spinUs ?? 0) * 1000)) : 0n;
    if (opts.watchdog ?? true) {
      const sab = new SharedArrayBuffer(WD_DEADLINE_BYTE + 8);
      this.ctl = new Int32Array(sab);
      this.deadline = new Float64Array(sab, WD_DEADLINE_BYTE, 1);
      this.worker = new Worker(watchdogSource, {
        eval: true,
        workerData: { ctl: sab, w: WD, readFd, pid: opts.watchPid ?? 0, tickMs: opts.watchdogTickMs ?? 100 },
      });
      this.worker.unref();
    }
  }

  /** Why the channel can no longer be used, if it cannot. */
  get failure(): Error | undefined {
    return this.broken;
  }

  /** Marks the channel unusable for `e` (the agent answers, but cannot finish what it was asked). */
  fail(e: Error): void {
    this.broken ??= e;
  }

  /**
   * Sends one request and returns its reply. Views in the reply point into
   * the channel's buffer: they are valid until the next call.
   * `extraMs` extends the deadline (an operation with its own time limit).
   */
  call(req: Request, extraMs = 0): Reply {
    if (this.broken) throw new LabProtocolError(`the lab channel is broken: ${this.broken.message}`);
    try {
      return this.exchange(req, Date.now() + this.rpcTimeoutMs + extraMs, false);
    } catch (e) {
      this.broken ??= e as Error;
      if (this.ctl) Atomics.store(this.ctl, WD.armed, 0);
      throw e;
    }
  }

  /**
   * The first exchange on a fresh channel: sends `req` (which must be
   * idempotent, like hello) every `attemptMs` until a reply with the
   * attempt's sequence number arrives or `totalMs` have passed. Bytes before
   * that reply are skipped: a serial line may carry echoes and line noise
   * from before the agent made it raw, the agent may have flushed an early
   * request, and an earlier attempt's reply or wake-up byte may still come.
   */
  handshake(req: Request, attemptMs: number, totalMs: number): Reply {
    if (this.broken) throw new LabProtocolError(`the lab channel is broken: ${this.broken.message}`);
    const until = Date.now() + totalMs;
    // A random start keeps replies to an earlier connection's requests apart.
    this.seq = (Math.random() * 0x3fffffff) | 0;
    let last: Error | undefined;
    while (Date.now() < until) {
      try {
        return this.exchange(req, Math.min(until, Date.now() + (this.ctl ? attemptMs : totalMs)), true);
      } catch (e) {
        if (!(e instanceof LabTimeoutError) || e.reason === 'exited') {
          this.broken ??= e as Error;
          throw e;
        }
        last = e;
        if (this.ctl) Atomics.store(this.ctl, WD.armed, 0);
      }
    }
    const e = new LabTimeoutError(
      `the agent did not answer ${opName(req.op)} within ${totalMs} ms (${last?.message ?? 'no attempt'})`,
    );
    this.broken ??= e;
    throw e;
  }

  private exchange(req: Request, deadlineMs: number, scanning: boolean): Reply {
    const t0 = process.hrtime.bigint();
    const seq = (this.seq = (this.seq + 1) & 0x7fffffff || 1);
    try {
      const size = requestSize(req);
      if (this.out.length < size) this.out = Buffer.alloc(Math.max(size, this.out.length * 2));
      const frame = encodeRequest(seq, req, this.out);
      this.arm(seq, deadlineMs);
      this.writeAll(frame, deadlineMs, seq);
      let h: ReplyHeader;
      for (;;) {
        if (scanning) this.scanToMagic(seq);
        this.readExact(this.hdr, 0, REP_HEADER, seq);
        if (!scanning) {
          h = decodeReplyHeader(this.hdr);
          break;
        }
        try {
          h = decodeReplyHeader(this.hdr);
        } catch {
          continue; // a magic inside noise: look for the next one
        }
        if (h.seq === seq && h.op === req.op) break;
        this.readBody(h, seq); // someone else's reply: skip it
      }
      if (h.seq !== seq) {
        const detail =
          h.status !== STATUS.ok
            ? `: ${Buffer.from(this.readBody(h, seq)).subarray(0, h.payloadLen).toString('utf8')}`
            : '';
        throw new LabProtocolError(`desync: reply #${h.seq} to request #${seq} (${opName(req.op)})${detail}`);
      }
      if (h.op !== req.op)
        throw new LabProtocolError(`desync: reply to ${opName(h.op)}, request was ${opName(req.op)}`);
      const body = this.readBody(h, seq);
      this.disarm(seq);
      this.stats.calls++;
      this.stats.bytesSent += frame.length;
      this.stats.bytesReceived += h.total;
      const reply = decodeReplyBody(
        h,
        body,
        (req.reads ?? []).map((r) => r.len),
      );
      if (reply.status !== STATUS.ok) {
        const msg = Buffer.from(reply.payload).toString('utf8');
        throw new LabProtocolError(`agent refused ${opName(req.op)}: ${msg}`);
      }
      return reply;
    } finally {
      this.stats.ns += Number(process.hrtime.bigint() - t0);
    }
  }

  /** Skips input up to (not including) the next reply magic. */
  private scanToMagic(seq: number): void {
    const m = Buffer.alloc(4);
    m.writeUInt32LE(REP_MAGIC);
    let matched = 0;
    for (;;) {
      while (this.rpos < this.rend) {
        const b = this.rbuf[this.rpos++]!;
        matched = b === m[matched] ? matched + 1 : b === m[0] ? 1 : 0;
        if (matched === 4) {
          this.rpos -= 4; // the header read starts at the magic
          return;
        }
      }
      this.fill(seq, matched); // a partial magic stays in front of the new bytes
    }
  }

  private readBody(h: ReplyHeader, seq: number): Buffer {
    const n = h.total - REP_HEADER;
    if (this.body.length < n) this.body = Buffer.alloc(Math.max(n, this.body.length * 2));
    this.readExact(this.body, 0, n, seq);
    return this.body.subarray(0, n);
  }

  private arm(seq: number, deadlineMs: number): void {
    if (!this.ctl || !this.deadline) return;
    this.deadline[0] = deadlineMs;
    Atomics.store(this.ctl, WD.why, 0);
    Atomics.store(this.ctl, WD.armed, seq);
  }

  private disarm(seq: number): void {
    if (!this.ctl) return;
    if (Atomics.compareExchange(this.ctl, WD.armed, seq, 0) !== seq) this.fired(seq);
  }

  private fired(seq: number): never {
    const why = this.ctl ? Atomics.load(this.ctl, WD.why) : 1;
    if (why === 2) throw new LabTimeoutError(`the agent process exited (request #${seq})`, 'exited');
    throw new LabTimeoutError(`no reply from the agent within the deadline (request #${seq}); the lab may have hung`);
  }

  private checkFired(seq: number): void {
    if (this.ctl && Atomics.load(this.ctl, WD.armed) === -seq) this.fired(seq);
  }

  private writeAll(b: Buffer, deadlineMs: number, seq: number): void {
    let off = 0;
    let idle = 0;
    while (off < b.length) {
      let n: number;
      try {
        n = writeSync(this.writeFd, b, off, b.length - off);
      } catch (e) {
        const code = (e as NodeJS.ErrnoException).code;
        if (code === 'EAGAIN') {
          this.checkFired(seq);
          if (Date.now() > deadlineMs) this.fired(seq);
          // A full pipe: the agent is busy with an earlier part of the frame.
          Atomics.wait(this.sleeper, 0, 0, idle++ < 10 ? 0.05 : 1);
          continue;
        }
        if (code === 'EPIPE')
          throw new LabProtocolError('the agent closed the channel (EPIPE while sending a request)');
        throw new LabProtocolError(`writing to the agent failed: ${(e as Error).message}`);
      }
      off += n;
      idle = 0;
    }
  }

  /** Refills the read buffer; the last `keep` bytes of the old content stay in front. */
  private fill(seq: number, keep = 0): void {
    let n: number;
    if (keep) this.rbuf.copy(this.rbuf, 0, this.rend - keep, this.rend);
    if (this.spinNs > 0n && this.available) {
      const until = process.hrtime.bigint() + this.spinNs;
      while (this.available(this.readFd) === 0 && process.hrtime.bigint() < until);
    }
    for (;;) {
      try {
        n = readSync(this.readFd, this.rbuf, keep, this.rbuf.length - keep, null);
        break;
      } catch (e) {
        const code = (e as NodeJS.ErrnoException).code;
        if (code === 'EAGAIN') {
          // A non-blocking reply fd: poll (slower than a blocking read).
          this.checkFired(seq);
          Atomics.wait(this.sleeper, 0, 0, 0.05);
          continue;
        }
        if (code === 'EINTR') continue;
        throw new LabProtocolError(`reading from the agent failed: ${(e as Error).message}`);
      }
    }
    this.checkFired(seq);
    if (n === 0) throw new LabProtocolError('the agent closed the channel (end of file)');
    this.rpos = keep;
    this.rend = keep + n;
  }

  private readExact(dst: Buffer, off: number, len: number, seq: number): void {
    while (len > 0) {
      if (this.rpos === this.rend) {
        if (len >= this.rbuf.length) {
          // Large bodies go straight into their buffer.
          let n: number;
          try {
            n = readSync(this.readFd, dst, off, len, null);
          } catch (e) {
            const code = (e as NodeJS.ErrnoException).code;
            if (code === 'EAGAIN' || code === 'EINTR') {
              this.checkFired(seq);
              if (code === 'EAGAIN') Atomics.wait(this.sleeper, 0, 0, 0.05);
              continue;
            }
            throw new LabProtocolError(`reading from the agent failed: ${(e as Error).message}`);
          }
          this.checkFired(seq);
          if (n === 0) throw new LabProtocolError('the agent closed the channel (end of file)');
          off += n;
          len -= n;
          continue;
        }
        this.fill(seq);
      }
      const take = Math.min(len, this.rend - this.rpos);
      this.rbuf.copy(dst, off, this.rpos, this.rpos + take);
      this.rpos += take;
      off += take;
      len -= take;
    }
  }

  /** Stops the watchdog (and closes both descriptors when it owns them). */
  close(): void {
    if (this.ctl) {
      Atomics.store(this.ctl, WD.stop, 1);
      Atomics.notify(this.ctl, WD.stop);
    }
    void this.worker?.terminate();
    this.broken ??= new Error('closed');
    if (!this.ownFds) return;
    for (const fd of new Set([this.readFd, this.writeFd])) {
      try {
        closeSync(fd);
      } catch {
        /* already closed */
      }
    }
  }
}

/**
 * Opens the host ends of a QEMU `-chardev pipe,path=P` channel: the host
 * writes requests to `P.in` (QEMU reads it) and reads replies from `P.out`.
 * QEMU must already have both FIFOs open (it opens them at start-up).
 */
export function openFifoPair(path: string): { readFd: number; writeFd: number } {
  const readFd = openSync(`${path}.out`, fsc.O_RDONLY);
  const writeFd = openSync(`${path}.in`, fsc.O_WRONLY | fsc.O_NONBLOCK);
  return { readFd, writeFd };
}

// RemoteAddon: the Addon interface carried out by the lab agent, so that the
// harness's TypeScript runs on the host while KVM runs in the lab's kernel.
//
// Memory the agent maps is mirrored by a local buffer of the same length;
// addressOf(mirror) is the agent's address, so structures that carry host
// virtual addresses (memslots) are right where KVM reads them. Mirrors and
// the agent's mappings are kept coherent by page diffs that ride on the
// requests and replies (docs/lab-protocol.md, "Coherence").
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { closeSync, constants as fsc, mkdtempSync, openSync, readSync, rmSync } from 'node:fs';
import { createRequire } from 'node:module';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { addonPath, HostError, packageRoot, type Addon } from '../kvm/sys.js';
import { IOCTL } from '../uapi/uapi.js';
import {
  Args, Channel, LabProtocolError, OP, PAGE, PROTOCOL_VERSION,
  REQ_PULL, type ChannelOptions, type ReadEntry, type Reply, type Request, type WriteEntry,
} from './protocol.js';

/** What the agent says about itself (HELLO). */
export interface AgentInfo {
  version: number;
  pid: number;
  /** The thread that runs KVM_RUN (the agent is single-threaded): the target for trace filters. */
  tid: number;
  pageSize: number;
  /** The signal the agent's run time limit uses (SIGALRM). */
  timeoutSignal: number;
  sysname: string;
  release: string;
  machine: string;
}

export interface RemoteRunResult {
  /** KVM_RUN's last result: 0 or -errno (-EINTR after the time limit or a host-set immediate_exit). */
  ret: number;
  /** KVM_RUN returns inside this run (console exits included). */
  exits: number;
  console: Uint8Array;
  /** Time the agent spent in its run loop. */
  ns: number;
  /** The agent's time limit ended the run. */
  timedOut: boolean;
}

export interface RemoteOptions extends ChannelOptions {
  /** Also pull after these ioctl requests (KVM_RUN and KVM_RESET_DIRTY_RINGS always pull). */
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

const PROT_RW = 3;
const MAP_PRIVATE = 0x02;
const MAP_ANONYMOUS = 0x20;
const MAP_NORESERVE = 0x4000;
const MADV_DONTNEED = 4;
const MADV_NOHUGEPAGE = 15;
const EINVAL = 22;
/** Mirrors larger than this are diffed only on their present pages (pagemap). */
const PAGEMAP_MIN = 256 * 1024;

/** A local buffer standing for an agent mapping. */
interface Mirror {
  remote: bigint;
  len: number;
  buf: ArrayBuffer;
  u8: Buffer;
  /** The content both sides agreed on at the last sync. */
  snap: Buffer;
  snapBuf: ArrayBuffer;
  /** Local address (when the mirror is a local mapping), for pagemap. */
  local: bigint | undefined;
}

interface Scratch {
  view: Uint8Array;
  addr: bigint;
  /** A dedicated mapping (arena full) to unmap after use. */
  own: boolean;
}

type Native = Pick<Addon, 'mmap' | 'munmap' | 'addressOf' | 'madvise' | 'ioctlBuf'>;
const FIONREAD = 0x541b;

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

/** Detaches an ArrayBuffer so that no view can use it afterwards. */
function detach(ab: ArrayBuffer): void {
  try {
    structuredClone(ab, { transfer: [ab] });
  } catch {
    /* not transferable (external): leave it */
  }
}

export class RemoteAddon implements Addon {
  readonly remote = true as const;
  readonly info: AgentInfo;
  private readonly ch: Channel;
  private readonly mirrors = new Map<ArrayBuffer, Mirror>();
  private readonly native: Native | undefined;
  /** Local buffers made by the native addon's mmap (freed with its munmap). */
  private readonly mapped = new WeakSet<ArrayBuffer>();
  private pagemapFd = -1;
  private pagemapBuf = Buffer.alloc(0);
  private scratch: Scratch[] = [];
  private arena = 0n;
  private readonly arenaSize: number;
  private arenaUsed = 0;
  private readonly pullAfter: Set<number>;
  private readonly pullAll: boolean;
  private counters = { pagesPushed: 0, pagesPulled: 0, diffNs: 0 };

  private constructor(ch: Channel, opts: RemoteOptions) {
    this.ch = ch;
    this.native = loadNative();
    this.pullAfter = new Set([IOCTL.KVM_RUN, IOCTL.KVM_RESET_DIRTY_RINGS, ...(opts.pullAfterIoctls ?? [])]);
    this.pullAll = opts.pullAfterEveryIoctl ?? false;
    this.arenaSize = opts.scratchBytes ?? 1 << 20;
    if ((opts.usePagemap ?? true) && this.native) {
      try {
        this.pagemapFd = openSync('/proc/self/pagemap', fsc.O_RDONLY);
      } catch {
        this.pagemapFd = -1;
      }
    }
    const hello = this.ch.handshake({ op: OP.hello }, opts.helloRetryMs ?? 1000, opts.connectTimeoutMs ?? this.ch.rpcTimeoutMs);
    const info = JSON.parse(Buffer.from(hello.payload).toString('utf8')) as AgentInfo;
    if (info.version !== PROTOCOL_VERSION) throw new LabProtocolError(`the agent speaks protocol ${info.version}, this host ${PROTOCOL_VERSION}`);
    this.info = info;
    const a = this.rpc({ op: OP.mmap, args: new Args().u64(this.arenaSize).i32(PROT_RW).i32(MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE).i32(-1).u32(0).i64(0).done() });
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
    return { rpcs: s.calls, rpcNs: s.ns, bytesSent: s.bytesSent, bytesReceived: s.bytesReceived, ...this.counters };
  }

  // ---- coherence ------------------------------------------------------------

  /** Pages of every mirror that changed since the last sync, as writes; the snapshots take the new content. */
  private collectPushes(out: WriteEntry[]): void {
    const t0 = process.hrtime.bigint();
    for (const m of this.mirrors.values()) this.diffMirror(m, out);
    this.counters.diffNs += Number(process.hrtime.bigint() - t0);
  }

  private presentPages(m: Mirror): number[] | undefined {
    if (this.pagemapFd < 0 || m.local === undefined) return undefined;
    const np = Math.ceil(m.len / PAGE);
    const need = np * 8;
    if (this.pagemapBuf.length < need) this.pagemapBuf = Buffer.alloc(Math.max(need, this.pagemapBuf.length * 2));
    try {
      const pos = Number(m.local / BigInt(PAGE)) * 8;
      let got = 0;
      while (got < need) {
        const n = readSync(this.pagemapFd, this.pagemapBuf, got, need - got, pos + got);
        if (n <= 0) return undefined;
        got += n;
      }
    } catch {
      return undefined;
    }
    const out: number[] = [];
    const b = this.pagemapBuf;
    for (let i = 0; i < np; i++) {
      // Bit 63 present, bit 62 swapped: the high byte of the little-endian entry.
      if (b[i * 8 + 7]! & 0xc0) out.push(i);
    }
    return out;
  }

  private diffMirror(m: Mirror, out: WriteEntry[]): void {
    const np = Math.ceil(m.len / PAGE);
    const { u8, snap, len } = m;
    const dirty: number[] = [];
    // Small mirrors are compared whole; large ones only where this process has
    // pages (a page never touched here is zero on both sides of the diff).
    const present = len > PAGEMAP_MIN ? this.presentPages(m) : undefined;
    if (present) {
      // Runs of consecutive present pages are compared whole first.
      for (let k = 0; k < present.length; ) {
        let j = k + 1;
        while (j < present.length && present[j] === present[j - 1]! + 1) j++;
        const off = present[k]! * PAGE;
        const end = Math.min((present[j - 1]! + 1) * PAGE, len);
        if (j - k === 1 || u8.compare(snap, off, end, off, end) !== 0) {
          for (let q = k; q < j; q++) {
            const po = present[q]! * PAGE;
            const pe = Math.min(po + PAGE, len);
            if (u8.compare(snap, po, pe, po, pe) !== 0) dirty.push(present[q]!);
          }
        }
        k = j;
      }
    } else {
      const CHUNK = 16 * PAGE;
      for (let off = 0; off < len; off += CHUNK) {
        const end = Math.min(off + CHUNK, len);
        if (u8.compare(snap, off, end, off, end) === 0) continue;
        for (let i = off / PAGE; i < Math.min(np, end / PAGE); i++) {
          const po = i * PAGE;
          const pe = Math.min(po + PAGE, len);
          if (u8.compare(snap, po, pe, po, pe) !== 0) dirty.push(i);
        }
      }
    }
    for (let k = 0; k < dirty.length; ) {
      let j = k + 1;
      while (j < dirty.length && dirty[j] === dirty[j - 1]! + 1) j++;
      const off = dirty[k]! * PAGE;
      const end = Math.min((dirty[j - 1]! + 1) * PAGE, m.len);
      const data = m.u8.subarray(off, end);
      m.snap.set(data, off);
      out.push({ addr: m.remote + BigInt(off), data });
      this.counters.pagesPushed += j - k;
      k = j;
    }
  }

  private mirrorAt(addr: bigint, len: number): Mirror | undefined {
    for (const m of this.mirrors.values()) {
      if (addr >= m.remote && addr + BigInt(len) <= m.remote + BigInt(m.len)) return m;
    }
    return undefined;
  }

  private applyPulls(r: Reply): void {
    for (const p of r.pulled) {
      const m = this.mirrorAt(p.addr, p.len);
      if (!m) continue;
      const off = Number(p.addr - m.remote);
      this.counters.pagesPulled += Math.ceil(p.len / PAGE);
      if (p.zero) {
        const cur = m.u8.subarray(off, off + p.len);
        const snap = m.snap.subarray(off, off + p.len);
        if (Buffer.compare(cur, snap) === 0 && this.native && m.local !== undefined && off % PAGE === 0 && p.len % PAGE === 0) {
          // Dropping the pages keeps them non-present (and out of later diffs).
          this.native.madvise(m.buf, off, p.len, MADV_DONTNEED);
          this.native.madvise(m.snapBuf, off, p.len, MADV_DONTNEED);
        } else {
          this.merge(m, off, new Uint8Array(p.len));
        }
      } else if (p.data) {
        this.merge(m, off, p.data);
      }
    }
  }

  /** Takes the agent's content; bytes the host changed since the last sync (none, normally) win. */
  private merge(m: Mirror, off: number, data: Uint8Array): void {
    const cur = m.u8.subarray(off, off + data.length);
    const snap = m.snap.subarray(off, off + data.length);
    if (Buffer.compare(cur, snap) === 0) {
      cur.set(data);
    } else {
      for (let i = 0; i < data.length; i++) if (cur[i] === snap[i]) cur[i] = data[i]!;
    }
    snap.set(data);
  }

  /** One round trip; pushes mirror changes first (unless `push` is false), applies pulled pages after. */
  private rpc(req: Request, opts: { push?: boolean; extraMs?: number } = {}): Reply {
    let writes = req.writes;
    if (opts.push ?? true) {
      const w: WriteEntry[] = [];
      this.collectPushes(w);
      if (req.writes) w.push(...req.writes);
      writes = w;
    }
    const r = this.ch.call({ ...req, writes }, opts.extraMs ?? 0);
    if (r.pulled.length) this.applyPulls(r);
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
    const known = this.scratch.find((s) => s.view.buffer === view.buffer && s.view.byteOffset === view.byteOffset && s.view.byteLength === view.byteLength);
    if (known) return known.addr;
    const at = (this.arenaUsed + 63) & ~63;
    if (at + view.byteLength <= this.arenaSize) {
      this.arenaUsed = at + view.byteLength;
      const s = { view, addr: this.arena + BigInt(at), own: false };
      this.scratch.push(s);
      return s.addr;
    }
    const len = Math.max(PAGE, Math.ceil(view.byteLength / PAGE) * PAGE);
    const r = this.rpc({ op: OP.mmap, args: new Args().u64(len).i32(PROT_RW).i32(MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE).i32(-1).u32(0).i64(0).done() });
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
      if (s.own) this.rpc({ op: OP.munmap, args: new Args().u64(s.addr).u64(Math.max(PAGE, Math.ceil(s.view.byteLength / PAGE) * PAGE)).done() });
    }
    return r;
  }

  // ---- the Addon interface ---------------------------------------------------

  open(path: string, flags: number): number {
    return this.rpc({ op: OP.open, args: new Args().u32(flags).str(path).done() }).result;
  }

  close(fd: number): number {
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
    const local = this.allocLocal(len);
    const pushes: WriteEntry[] = [];
    this.collectPushes(pushes);
    const r = this.ch.call({ op: OP.mmap, writes: pushes, args: new Args().u64(len).i32(prot).i32(flags).i32(fd).u32(1).i64(offset).done() });
    if (r.result < 0) {
      this.freeLocal(local.buf);
      this.freeLocal(local.snapBuf);
      return r.result;
    }
    const m: Mirror = { remote: r.result64, len, ...local };
    this.mirrors.set(m.buf, m);
    this.applyPulls(r);
    return m.buf;
  }

  private allocLocal(len: number): Omit<Mirror, 'remote' | 'len'> {
    const mk = (): { buf: ArrayBuffer; local: bigint | undefined } => {
      if (this.native) {
        const ab = this.native.mmap(len, PROT_RW, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (typeof ab !== 'number') {
          this.mapped.add(ab);
          this.native.madvise(ab, 0, ab.byteLength, MADV_NOHUGEPAGE);
          return { buf: ab, local: this.native.addressOf(ab) };
        }
      }
      return { buf: new ArrayBuffer(len), local: undefined };
    };
    const a = mk();
    const s = mk();
    return { buf: a.buf, u8: Buffer.from(a.buf), snapBuf: s.buf, snap: Buffer.from(s.buf), local: a.local !== undefined && s.local !== undefined ? a.local : undefined };
  }

  private freeLocal(ab: ArrayBuffer): void {
    if (this.native && this.mapped.has(ab)) this.native.munmap(ab);
    else detach(ab);
  }

  munmap(ab: ArrayBuffer): number {
    const m = this.mirrors.get(ab);
    if (!m) return ab.byteLength === 0 ? 0 : -EINVAL;
    const r = this.rpc({ op: OP.munmap, args: new Args().u64(m.remote).u64(m.len).done() });
    if (r.result < 0) return r.result;
    this.mirrors.delete(ab);
    this.freeLocal(m.buf);
    this.freeLocal(m.snapBuf);
    return r.result;
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
    return this.rpc({ op: OP.fallocate, flags: REQ_PULL, args: new Args().i32(fd).i32(mode).i64(offset).i64(len).done() }).result;
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

  /**
   * KVM_RUN in the agent until an exit other than `out` to consolePort (0 =
   * none), maxExits returns, or the time limit (0 = none) sets immediate_exit
   * and interrupts it. Mirrors are pushed before and pulled after, the
   * kvm_run mapping (runAddr's mirror) included.
   */
  remoteRun(fd: number, runAddr: bigint, consolePort: number, maxExits: number, timeoutMs: number): RemoteRunResult {
    const ms = Math.max(0, Math.min(Math.ceil(timeoutMs), 0xffffffff));
    const r = this.rpc(
      { op: OP.run, flags: REQ_PULL, args: new Args().i32(fd).u32(consolePort).u64(runAddr).u32(Math.min(Math.max(maxExits, 1), 0xffffffff)).u32(ms).done() },
      { extraMs: ms },
    );
    const p = Buffer.from(r.payload.buffer, r.payload.byteOffset, r.payload.byteLength);
    if (p.length < 24) {
      if (r.result < 0) return { ret: r.result, exits: 0, console: new Uint8Array(0), ns: 0, timedOut: false };
      throw new LabProtocolError('short reply to run');
    }
    const len = p.readUInt32LE(4);
    return {
      ret: r.result,
      exits: p.readUInt32LE(0),
      timedOut: p.readUInt32LE(8) !== 0,
      ns: Number(p.readBigUInt64LE(16)),
      console: Uint8Array.prototype.slice.call(p.subarray(24, 24 + len)),
    };
  }

  /** The agent's thread id (it runs KVM_RUN on its only thread). */
  gettid(): number {
    return this.info.tid;
  }
  /** The agent installs its time-limit handler at start-up. */
  kickInstall(): number {
    return 0;
  }
  kickSignal(): number {
    return this.info.timeoutSignal;
  }
  /**
   * No-op: a remote run holds the host until it returns, so nothing can kick
   * it meanwhile; the run's time limit does. Setting immediate_exit in the
   * kvm_run mirror before a run still makes that run return -EINTR at once.
   */
  kick(_tid: number): number {
    return 0;
  }

  // ---- beyond the Addon interface -------------------------------------------

  /** Reads agent memory (raw: not a mirror update). */
  peek(addr: bigint, len: number): Uint8Array {
    const r = this.rpc({ op: OP.peek, args: new Args().u64(addr).u64(len).done() }, { push: false });
    if (r.result < 0) throw new LabProtocolError(`peek of ${len} bytes at 0x${addr.toString(16)} failed: errno ${-r.result}`);
    return Uint8Array.prototype.slice.call(r.payload);
  }

  /** Writes agent memory (raw: inside a mapping, the next pull brings the change to its mirror). */
  poke(addr: bigint, data: Uint8Array): void {
    const r = this.rpc({ op: OP.poke, args: new Args().u64(addr).bytes(data).done() }, { push: false });
    if (r.result < 0) throw new LabProtocolError(`poke of ${data.length} bytes at 0x${addr.toString(16)} failed: errno ${-r.result}`);
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

  /** Local mirrors by agent address (tests, diagnostics). */
  mirrorOf(remote: bigint): ArrayBuffer | undefined {
    return this.mirrorAt(remote, 1)?.buf;
  }

  /** Asks the agent to exit, then closes the channel (and its descriptors if it owns them). Mirrors stay readable. */
  disconnect(): void {
    if (!this.ch.failure) {
      try {
        this.ch.call({ op: OP.exit }, 0);
      } catch {
        /* the agent may already be gone */
      }
    }
    this.ch.close();
    if (this.pagemapFd >= 0) closeSync(this.pagemapFd);
    this.pagemapFd = -1;
  }
}

/** Whether an Addon is carried out by a lab agent. */
export function isRemote(a: Addon): a is RemoteAddon {
  return (a as Partial<RemoteAddon>).remote === true;
}

// ---- building and running an agent locally --------------------------------

export const agentSources = ['agent/main.cc', 'agent/mirror.cc', 'core.cc'].map((f) => join(packageRoot, 'native', f));
/** The headers the agent's sources include (a newer one means a rebuild too). */
export const agentHeaders = ['agent/wire.h', 'agent/mirror.h', 'core.h'].map((f) => join(packageRoot, 'native', f));

/** Builds the static agent binary at `out` (g++ -O2 -static; `cxx` may name a cross compiler). */
export function buildAgent(out: string, cxx = process.env.CXX || 'g++'): string {
  try {
    execFileSync(cxx, ['-O2', '-static', '-std=c++17', '-o', out, ...agentSources], { stdio: ['ignore', 'ignore', 'pipe'] });
  } catch (e) {
    const err = e as NodeJS.ErrnoException & { stderr?: Buffer };
    if (err.code === 'ENOENT') throw new HostError(`building the lab agent needs a C++ compiler: ${cxx} was not found (install g++, or set CXX)`);
    throw new HostError(`building the lab agent failed: ${err.stderr?.toString().trim() || err.message}`);
  }
  return out;
}

export interface AgentProcess {
  child: ChildProcess;
  /** The host's ends: replies are read from readFd (blocking), requests written to writeFd (non-blocking). */
  readFd: number;
  writeFd: number;
  /** Removes the FIFOs; closes the host's ends too unless a Channel owns them (it closes them itself). */
  cleanup(closeFds?: boolean): void;
}

/**
 * Starts the agent as a local child process whose stdin / stdout are FIFOs
 * (Node's own child pipes are sockets that its event loop also reads).
 */
export function spawnAgentProcess(agentPath: string, agentArgs: readonly string[] = []): AgentProcess {
  const dir = mkdtempSync(join(tmpdir(), 'kvmharness-agent-'));
  const fds: number[] = [];
  const closeAll = () => {
    for (const fd of fds.splice(0)) {
      try {
        closeSync(fd);
      } catch {
        /* closed */
      }
    }
  };
  try {
    const req = join(dir, 'req');
    const rep = join(dir, 'rep');
    execFileSync('mkfifo', ['-m', '600', req, rep]);
    // Replies: the host reads with blocking reads. Opening a FIFO for reading
    // blocks until there is a writer; a short-lived O_RDWR holder provides one.
    const keeper = openSync(rep, fsc.O_RDWR);
    fds.push(keeper);
    const readFd = openSync(rep, fsc.O_RDONLY);
    const childWrite = openSync(rep, fsc.O_WRONLY);
    fds.push(childWrite);
    // Requests: the host writes without blocking (a full pipe is waited on
    // with a deadline); the agent makes its end blocking.
    const childRead = openSync(req, fsc.O_RDONLY | fsc.O_NONBLOCK);
    fds.push(childRead);
    const writeFd = openSync(req, fsc.O_WRONLY | fsc.O_NONBLOCK);
    const child = spawn(agentPath, [...agentArgs], { stdio: [childRead, childWrite, 'inherit'] });
    child.on('error', () => {});
    closeAll();
    const host = [readFd, writeFd];
    const cleanup = (closeFds = true) => {
      for (const fd of host.splice(0)) {
        if (!closeFds) continue;
        try {
          closeSync(fd);
        } catch {
          /* closed by the channel */
        }
      }
      rmSync(dir, { recursive: true, force: true });
    };
    if (child.pid === undefined) {
      cleanup();
      throw new HostError(`cannot start the lab agent ${agentPath}`);
    }
    child.unref();
    return { child, readFd, writeFd, cleanup };
  } catch (e) {
    closeAll();
    rmSync(dir, { recursive: true, force: true });
    throw e;
  }
}

export interface LocalAgent {
  addon: RemoteAddon;
  child: ChildProcess;
  /** Ends the agent and removes its FIFOs. */
  close(): void;
}

/** Runs the agent as a local child process and connects to it: the lab's protocol over this machine's KVM. */
export function spawnLocalAgent(agentPath: string, opts: RemoteOptions & { agentArgs?: string[] } = {}): LocalAgent {
  const p = spawnAgentProcess(agentPath, opts.agentArgs);
  let addon: RemoteAddon;
  try {
    addon = RemoteAddon.connect(p.readFd, p.writeFd, { watchPid: p.child.pid, ...opts, ownFds: true });
  } catch (e) {
    p.child.kill('SIGKILL');
    p.cleanup(false); // connect() closed the descriptors
    throw e;
  }
  return {
    addon,
    child: p.child,
    close() {
      addon.disconnect();
      p.cleanup(false);
    },
  };
}

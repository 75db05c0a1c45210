// Mirrors: a local buffer of the same length for each mapping the agent
// makes, kept coherent with it by page diffs that ride on the requests and
// replies (docs/lab-protocol.md, "Coherence"). Host changes go out as writes
// (collectPushes); the agent's changes come back as pulled pages
// (applyPulls), merged so that bytes the host changed meanwhile win.
import { closeSync, constants as fsc, openSync, readSync } from 'node:fs';
import type { Addon } from '../../kvm/sys.js';
import { MADV, MAP, PROT } from '../../uapi/uapi.js';
import { PAGE, type Reply, type WriteEntry } from '../protocol.js';

/** Mirrors larger than this are diffed only on their present pages (pagemap). */
const PAGEMAP_MIN = 256 * 1024;

/** A local buffer standing for an agent mapping. */
export interface Mirror {
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

/** The native addon's calls the mirrors use for local mappings, when it is built. */
export type Native = Pick<Addon, 'mmap' | 'munmap' | 'addressOf' | 'madvise' | 'ioctlBuf'>;

/** Detaches an ArrayBuffer so that no view can use it afterwards. */
function detach(ab: ArrayBuffer): void {
  try {
    structuredClone(ab, { transfer: [ab] });
  } catch {
    /* not transferable (external): leave it */
  }
}

export class Mirrors {
  private readonly byBuffer = new Map<ArrayBuffer, Mirror>();
  /** Local buffers made by the native addon's mmap (freed with its munmap). */
  private readonly mapped = new WeakSet<ArrayBuffer>();
  private pagemapFd = -1;
  private pagemapBuf = Buffer.alloc(0);
  readonly counters = { pagesPushed: 0, pagesPulled: 0, diffNs: 0 };

  /** `usePagemap`: diff large mirrors only on the pages present in this process. */
  constructor(
    private readonly native: Native | undefined,
    usePagemap: boolean,
  ) {
    if (usePagemap && native) {
      try {
        this.pagemapFd = openSync('/proc/self/pagemap', fsc.O_RDONLY);
      } catch {
        this.pagemapFd = -1;
      }
    }
  }

  get(buf: ArrayBuffer): Mirror | undefined {
    return this.byBuffer.get(buf);
  }

  add(m: Mirror): void {
    this.byBuffer.set(m.buf, m);
  }

  /** Forgets a mirror and frees its local buffers. */
  remove(m: Mirror): void {
    this.byBuffer.delete(m.buf);
    this.freeLocal(m.buf);
    this.freeLocal(m.snapBuf);
  }

  /** Pages of every mirror that changed since the last sync, as writes; the snapshots take the new content. */
  collectPushes(out: WriteEntry[]): void {
    const t0 = process.hrtime.bigint();
    for (const m of this.byBuffer.values()) this.diffMirror(m, out);
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
      for (let k = 0; k < present.length;) {
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
    for (let k = 0; k < dirty.length;) {
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

  /** The mirror holding [addr, addr+len) of the agent's memory. */
  at(addr: bigint, len: number): Mirror | undefined {
    for (const m of this.byBuffer.values()) {
      if (addr >= m.remote && addr + BigInt(len) <= m.remote + BigInt(m.len)) return m;
    }
    return undefined;
  }

  /** Takes the pages a reply pulled from the agent into their mirrors. */
  applyPulls(r: Reply): void {
    for (const p of r.pulled) {
      const m = this.at(p.addr, p.len);
      if (!m) continue;
      const off = Number(p.addr - m.remote);
      this.counters.pagesPulled += Math.ceil(p.len / PAGE);
      if (p.zero) {
        const cur = m.u8.subarray(off, off + p.len);
        const snap = m.snap.subarray(off, off + p.len);
        if (
          Buffer.compare(cur, snap) === 0 &&
          this.native &&
          m.local !== undefined &&
          off % PAGE === 0 &&
          p.len % PAGE === 0
        ) {
          // Dropping the pages keeps them non-present (and out of later diffs).
          this.native.madvise(m.buf, off, p.len, MADV.DONTNEED);
          this.native.madvise(m.snapBuf, off, p.len, MADV.DONTNEED);
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

  /** Local buffers for a new mirror of `len` bytes: local mappings when the native addon is there. */
  allocLocal(len: number): Omit<Mirror, 'remote' | 'len'> {
    const mk = (): { buf: ArrayBuffer; local: bigint | undefined } => {
      if (this.native) {
        const ab = this.native.mmap(len, PROT.READ | PROT.WRITE, MAP.PRIVATE | MAP.ANONYMOUS | MAP.NORESERVE, -1, 0);
        if (typeof ab !== 'number') {
          this.mapped.add(ab);
          this.native.madvise(ab, 0, ab.byteLength, MADV.NOHUGEPAGE);
          return { buf: ab, local: this.native.addressOf(ab) };
        }
      }
      return { buf: new ArrayBuffer(len), local: undefined };
    };
    const a = mk();
    const s = mk();
    return {
      buf: a.buf,
      u8: Buffer.from(a.buf),
      snapBuf: s.buf,
      snap: Buffer.from(s.buf),
      local: a.local !== undefined && s.local !== undefined ? a.local : undefined,
    };
  }

  freeLocal(ab: ArrayBuffer): void {
    if (this.native && this.mapped.has(ab)) this.native.munmap(ab);
    else detach(ab);
  }

  /** Stops reading pagemap; the mirrors stay readable. */
  close(): void {
    if (this.pagemapFd >= 0) closeSync(this.pagemapFd);
    this.pagemapFd = -1;
  }
}

// KVM's tracepoints as plain records. Each session is a private tracefs
// instance filtered to the harness's own vCPU threads; it is removed on every
// exit path — close(), process exit, SIGINT/SIGTERM/SIGHUP/SIGQUIT/SIGUSR2 —
// so runs never disturb each other; what SIGKILL leaves the next run removes.
//
// Containers. tracefs is the host's: it numbers threads in the initial PID
// namespace, both in set_event_pid and in the events it records, while a
// process in a PID namespace (a container, `unshare -p`) knows its threads by
// its own namespace's numbers. /proc's NSpid cannot bridge the two there: a
// container's /proc is its own namespace's and lists no outer id. So the
// session asks tracefs itself: each thread to filter on writes a marker to the
// instance's trace_marker (a vCPU thread does so from native code,
// VcpuThread.write), and the pid tracefs recorded with the marker is the id
// to filter on. Learnt once per thread; outside a namespace it is the same id.
//
// Instance names are `kvmharness-<pid>-<random>-<n>`: the random part keeps
// two processes with one pid in two namespaces apart. A session keeps its
// instance's trace_marker open while it lives, and the kernel refuses (EBUSY)
// to remove an instance any of whose files is open; so at start-up a run
// removes every kvmharness-* instance the kernel lets it remove (one created
// in the last seconds excepted): those are exactly the ones whose owner died
// without removing them, whatever namespace it ran in.
import { randomBytes } from 'node:crypto';
import { closeSync, constants, openSync, rmdirSync, statSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { NotApplicable } from '../base/not-applicable.js';
import { VcpuThread } from '../kvm/thread.js';
import { hookSignals, onCleanup } from '../base/interrupt.js';
import type { HostFs } from '../kvm/target.js';
import { localFs } from '../target/fs.js';

export const TRACEFS = '/sys/kernel/tracing';

export interface EventFormat {
  /** "group/name" */
  id: string;
  fields: { name: string; type: string; offset: number; size: number; signed: boolean }[];
  /** The print fmt string and the REC-> field each conversion prints, in order. */
  printFmt: string;
  printArgs: string[];
  /** A matcher for the text the event prints, derived from the print fmt, or undefined when it is too complex. */
  parse?: (text: string) => Record<string, bigint | string> | undefined;
}

export interface TraceEvent {
  id: string;
  pid: number;
  cpu: number;
  ts: number;
  fields: Record<string, bigint | string>;
  text: string;
}

/** Parses an event's format file. */
export function parseFormat(id: string, text: string): EventFormat {
  const fields: EventFormat['fields'] = [];
  for (const m of text.matchAll(/field:(.+?)\s+(\w+)(\[\d*\])?;\s*offset:(\d+);\s*size:(\d+);\s*signed:(\d);/g)) {
    if (m[2]!.startsWith('common_')) continue;
    fields.push({ type: m[1]!.trim(), name: m[2]!, offset: Number(m[4]), size: Number(m[5]), signed: m[6] === '1' });
  }
  const pf = text.match(/print fmt: "((?:[^"\\]|\\.)*)"(.*)$/m);
  const printFmt = pf?.[1] ?? '';
  const printArgs = [...(pf?.[2] ?? '').matchAll(/(?:^|,)\s*(?:\(\w+\))?REC->(\w+)/g)].map((m) => m[1]!);
  return { id, fields, printFmt, printArgs, parse: matcher(printFmt, printArgs) };
}

/**
 * Builds a parser for simple print formats: literal text and %llx/%x/%u/%d/%lld/%llu
 * conversions, with a zero-padded width allowed (kvm_page_fault's
 * "0x%016llx"), and one trailing %s (a flag decoding) allowed and ignored.
 */
function matcher(fmt: string, args: string[]): EventFormat['parse'] {
  const convs = [...fmt.matchAll(/%(?:0?\d+)?(ll|l)?([xudi]|s)/g)];
  if (convs.length === 0 || fmt.includes('%%')) return undefined;
  const numeric = convs.filter((c) => c[2] !== 's');
  const strings = convs.length - numeric.length;
  if (strings > 1 || (strings === 1 && convs.at(-1)![2] !== 's')) return undefined;
  if (args.length < numeric.length) return undefined;
  let re = '^';
  let last = 0;
  const kinds: ('hex' | 'dec')[] = [];
  for (const c of convs) {
    re += escape(fmt.slice(last, c.index));
    if (c[2] === 's') re += '(?:.*)';
    else {
      re += c[2] === 'x' ? '([0-9a-f]+)' : '(-?\\d+)';
      kinds.push(c[2] === 'x' ? 'hex' : 'dec');
    }
    last = c.index! + c[0].length;
  }
  re += escape(fmt.slice(last)) + '\\s*$';
  const rx = new RegExp(re);
  const names = args.slice(0, numeric.length);
  return (text) => {
    const m = rx.exec(text);
    if (!m) return undefined;
    const out: Record<string, bigint> = {};
    names.forEach((n, i) => (out[n] = BigInt(kinds[i] === 'hex' ? `0x${m[i + 1]}` : m[i + 1]!)));
    return out;
  };
}

const escape = (s: string) => s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');

const LINE = /^\s*(.*)-(\d+)\s+\[(\d+)\]\s+(?:\S+\s+)?(\d+\.\d+):\s+(\w+):\s?(.*)$/;

/** Parses the text of a tracefs `trace` file into events (comment lines skipped). */
export function parseTrace(text: string, formats: ReadonlyMap<string, EventFormat>): TraceEvent[] {
  const byName = new Map([...formats.values()].map((f) => [f.id.split('/')[1]!, f]));
  const out: TraceEvent[] = [];
  for (const line of text.split('\n')) {
    if (!line || line.startsWith('#')) continue;
    const m = LINE.exec(line);
    if (!m) continue;
    const f = byName.get(m[5]!);
    if (!f) continue;
    const payload = m[6]!;
    out.push({
      id: f.id,
      pid: Number(m[2]),
      cpu: Number(m[3]),
      ts: Number(m[4]),
      fields: f.parse?.(payload) ?? {},
      text: payload,
    });
  }
  return out;
}

/** Mounts the target's tracefs when it is not mounted and the process may do so. */
export function ensureTracefs(fs: HostFs): void {
  if (fs.exists(join(TRACEFS, 'events'))) return;
  if (fs.uid() !== 0) throw new NotApplicable('tracefs is not mounted and mounting it needs root');
  try {
    fs.mountTracefs(TRACEFS);
  } catch (e) {
    throw new NotApplicable(`tracefs is not mounted and mounting failed: ${(e as Error).message.split('\n')[0]}`);
  }
}

const live = new Set<TraceSession>();

/** Removes every open session's instance (exit paths call this). */
export function closeAllSessions(): void {
  for (const s of live) s.close();
}

let hooked = false;

/**
 * Removes instances on process exit and on SIGINT/SIGTERM/SIGHUP/SIGQUIT/
 * SIGUSR2 (then exits 128 + the signal's number, base/interrupt.ts). Programs
 * call this at start-up so that no signal can arrive between creating an
 * instance and hooking its removal; open() calls it too.
 */
export function hookExit(): void {
  if (hooked) return;
  hooked = true;
  onCleanup(closeAllSessions);
  hookSignals();
}

const PREFIX = 'kvmharness-';
/** This process's part of its instances' names: its pid, for a reader, and random bits, unique across namespaces. */
const OWNER = `${process.pid}-${randomBytes(4).toString('hex')}`;
/** An instance younger than this may be a live run's between its mkdir and its opening trace_marker. */
const STALE_AFTER_MS = 2000;
let seq = 0;
let swept = false;

/**
 * Removes the tracefs instances of runs that died without removing them
 * (SIGKILL): every kvmharness-* instance the kernel lets us remove, since it
 * refuses while a live session holds one of its files open. Says so through
 * `say`; returns the names removed. Once per process; this host only (a
 * lab boots a fresh kernel), and only where tracefs is mounted.
 */
export function removeStaleInstances(
  fs: HostFs,
  say: (line: string) => void = (l) => process.stderr.write(`${l}\n`),
): string[] {
  if (swept || fs !== localFs) return [];
  swept = true;
  const dir = join(TRACEFS, 'instances');
  const removed: string[] = [];
  for (const name of localFs.list(dir)) {
    const m = /^kvmharness-(\d+)-(?:([0-9a-f]{8})-)?\d+$/.exec(name);
    if (!m || name.startsWith(`${PREFIX}${OWNER}-`)) continue;
    // Names without the random part come from versions that held no file open:
    // theirs is stale when their pid is gone (as far as this namespace can tell).
    if (!m[2] && alive(Number(m[1]))) continue;
    const path = join(dir, name);
    try {
      if (Date.now() - statSync(path).mtimeMs < STALE_AFTER_MS) continue;
      rmdirSync(path);
    } catch {
      continue; // EBUSY: its owner is alive; or gone already, or not ours to remove
    }
    removed.push(name);
    say(`kvmharness: removed stale tracefs instance ${name}`);
  }
  return removed;
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code !== 'ESRCH';
  }
}

/** The thread id tracefs sees, per thread (a VcpuThread, or this process's main thread), once learnt. */
const tracedIds = new WeakMap<object, number>();
const MAIN_THREAD = {};

export class TraceSession {
  readonly formats = new Map<string, EventFormat>();
  private closed = false;
  /** The instance's trace_marker, held open while the session lives: it keeps the instance from being taken as stale. */
  private marker: number | undefined;

  private constructor(
    /** The files of the target whose kernel is traced. */
    private readonly fs: HostFs,
    readonly dir: string,
  ) {}

  /**
   * Creates a private instance in the tracefs of `fs` with `events` enabled
   * for the given thread ids (as this process knows them: its vCPU threads'
   * or its own pid). Events the kernel does not have make the session
   * NotApplicable.
   */
  static open(fs: HostFs, events: readonly string[], pids: readonly number[], bufferKb = 4096): TraceSession {
    ensureTracefs(fs);
    for (const e of events) {
      if (!fs.exists(join(TRACEFS, 'events', e, 'format')))
        throw new NotApplicable(`trace event ${e} does not exist in this kernel`);
    }
    hookExit();
    removeStaleInstances(fs);
    const local = fs === localFs;
    const dir = join(TRACEFS, 'instances', local ? `${PREFIX}${OWNER}-${seq++}` : `${PREFIX}${process.pid}-${seq++}`);
    fs.mkdir(dir);
    const s = new TraceSession(fs, dir);
    live.add(s);
    try {
      if (local) s.marker = openSync(join(dir, 'trace_marker'), constants.O_WRONLY);
      s.write('tracing_on', '0');
      s.write('buffer_size_kb', String(bufferKb));
      s.setPids(pids);
      for (const e of events) {
        s.formats.set(e, parseFormat(e, fs.read(join(TRACEFS, 'events', e, 'format')) ?? ''));
        s.write(`events/${e}/enable`, '1');
      }
      s.write('tracing_on', '1');
    } catch (e) {
      s.close();
      throw e;
    }
    return s;
  }

  private write(file: string, value: string): void {
    this.fs.write(join(this.dir, file), value);
  }

  /** Restricts the instance to these threads (set_event_pid), given by the ids this process knows them by. */
  setPids(pids: readonly number[]): void {
    this.write('set_event_pid', this.traced(pids).join(' ') || '');
  }

  /**
   * The ids tracefs knows these threads by (see the top of this file). Each
   * thread not met before writes a marker to the instance; the pid recorded
   * with it is the answer. In the lab, tracefs is the lab kernel's and its
   * agent's thread ids are that kernel's own: nothing to learn.
   */
  private traced(tids: readonly number[]): number[] {
    if (this.fs !== localFs || tids.length === 0) return [...tids];
    const key = (tid: number): object => {
      if (tid === process.pid) return MAIN_THREAD;
      const t = VcpuThread.byTid(tid);
      if (!t)
        throw new Error(
          `thread ${tid} is neither this process's main thread nor one of its vCPU threads: tracefs cannot be told its id`,
        );
      return t;
    };
    const keys = tids.map(key);
    const unknown = keys.map((k, i) => [k, tids[i]!] as const).filter(([k]) => !tracedIds.has(k));
    if (unknown.length) this.learn(unknown);
    return keys.map((k) => tracedIds.get(k)!);
  }

  private learn(threads: readonly (readonly [object, number])[]): void {
    const nonce = randomBytes(6).toString('hex');
    const wasOn = this.fs.read(join(this.dir, 'tracing_on'))?.trim() === '1';
    this.write('tracing_on', '1');
    for (const [k, tid] of threads) {
      const text = Buffer.from(`kvmharness-thread ${nonce} ${tid}\n`);
      const n = k === MAIN_THREAD ? writeSync(this.marker!, text) : (k as VcpuThread).write(this.marker!, text);
      if (n !== text.length)
        throw new Error(`writing a trace marker from thread ${tid} failed${n < 0 ? `: errno ${-n}` : ''}`);
    }
    const text = this.fs.read(join(this.dir, 'trace')) ?? '';
    this.clear();
    if (!wasOn) this.write('tracing_on', '0');
    const marks = new Map<number, number>();
    for (const line of text.split('\n')) {
      const m = LINE.exec(line);
      const mark = m?.[5] === 'tracing_mark_write' ? /^kvmharness-thread (\w+) (\d+)$/.exec(m[6]!.trim()) : null;
      if (mark && mark[1] === nonce) marks.set(Number(mark[2]), Number(m![2]));
    }
    for (const [k, tid] of threads) {
      const id = marks.get(tid);
      if (id === undefined)
        throw new Error(`tracefs recorded no marker from thread ${tid}, so its id there is unknown`);
      tracedIds.set(k, id);
    }
  }

  clear(): void {
    this.write('trace', '');
  }

  /** Returns the events recorded since the last clear() and clears the buffer. */
  take(): TraceEvent[] {
    const text = this.fs.read(join(this.dir, 'trace')) ?? '';
    this.clear();
    return parseTrace(text, this.formats);
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    live.delete(this);
    try {
      this.write('tracing_on', '0');
      for (const e of this.formats.keys()) this.write(`events/${e}/enable`, '0');
    } catch {
      // the instance may be half-made; removing it is what matters
    }
    if (this.marker !== undefined) {
      closeSync(this.marker);
      this.marker = undefined;
    }
    try {
      this.fs.rmdir(this.dir);
    } catch {
      // already gone
    }
  }
}

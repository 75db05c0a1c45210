// KVM's tracepoints as plain records. Each session is a private tracefs
// instance filtered to the harness's own vCPU threads; it is removed on every
// exit path — close(), process exit, SIGINT/SIGTERM — so runs never disturb
// each other or leave state behind.
import { join } from 'node:path';
import { NotApplicable } from '../kvm/sys.js';
import type { HostFs } from '../target/fs.js';

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
 * conversions, with one trailing %s (a flag decoding) allowed and ignored.
 */
function matcher(fmt: string, args: string[]): EventFormat['parse'] {
  const convs = [...fmt.matchAll(/%(ll|l)?([xudi]|s)/g)];
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
    out.push({ id: f.id, pid: Number(m[2]), cpu: Number(m[3]), ts: Number(m[4]), fields: f.parse?.(payload) ?? {}, text: payload });
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
 * Removes instances on process exit and on SIGINT/SIGTERM/SIGHUP (then exits
 * 130/143/129). Programs call this at start-up so that no signal can arrive
 * between creating an instance and hooking its removal; open() calls it too.
 */
export function hookExit(): void {
  if (hooked) return;
  hooked = true;
  process.on('exit', closeAllSessions);
  const codes = { SIGINT: 130, SIGTERM: 143, SIGHUP: 129 } as const;
  for (const sig of Object.keys(codes) as (keyof typeof codes)[]) {
    process.on(sig, () => {
      closeAllSessions();
      process.exit(codes[sig]);
    });
  }
}

let seq = 0;

export class TraceSession {
  readonly formats = new Map<string, EventFormat>();
  private closed = false;

  private constructor(
    /** The files of the target whose kernel is traced. */
    private readonly fs: HostFs,
    readonly dir: string,
  ) {}

  /**
   * Creates a private instance in the tracefs of `fs` with `events` enabled
   * for the given thread ids. Events the kernel does not have make the
   * session NotApplicable.
   */
  static open(fs: HostFs, events: readonly string[], pids: readonly number[], bufferKb = 4096): TraceSession {
    ensureTracefs(fs);
    for (const e of events) {
      if (!fs.exists(join(TRACEFS, 'events', e, 'format'))) throw new NotApplicable(`trace event ${e} does not exist in this kernel`);
    }
    hookExit();
    const dir = join(TRACEFS, 'instances', `kvmharness-${process.pid}-${seq++}`);
    fs.mkdir(dir);
    const s = new TraceSession(fs, dir);
    live.add(s);
    try {
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

  /** Restricts the instance to these thread ids (set_event_pid). */
  setPids(pids: readonly number[]): void {
    this.write('set_event_pid', pids.join(' ') || '');
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
    try {
      this.fs.rmdir(this.dir);
    } catch {
      // already gone
    }
  }
}

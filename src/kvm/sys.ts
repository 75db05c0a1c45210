// The one place that loads the native addon and turns its raw -errno results
// into errors that name the call.
import { createRequire } from 'node:module';
import { existsSync, readFileSync } from 'node:fs';
import { constants } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

export interface Addon {
  open(path: string, flags: number): number;
  close(fd: number): number;
  ioctl(fd: number, req: number, arg?: number | bigint): number;
  ioctlBuf(fd: number, req: number, buf: ArrayBufferView | ArrayBuffer): number;
  mmap(len: number, prot: number, flags: number, fd: number, offset: number): ArrayBuffer | number;
  munmap(ab: ArrayBuffer): number;
  addressOf(buf: ArrayBufferView | ArrayBuffer): bigint;
  madvise(buf: ArrayBuffer, offset: number, len: number, advice: number): number;
  mprotect(buf: ArrayBuffer, offset: number, len: number, prot: number): number;
  memfdCreate(name: string, flags: number): number;
  fallocate(fd: number, mode: number, offset: number, len: number): number;
  ftruncate(fd: number, len: number): number;
  pread(fd: number, buf: ArrayBufferView | ArrayBuffer, pos: number): number;
  write(fd: number, buf: ArrayBufferView | ArrayBuffer): number;
  gettid(): number;
  kickInstall(): number;
  kickSignal(): number;
  kick(tid: number): number;
  /**
   * Stores the buffer's bytes [offset, offset + len) into the memory it
   * stands for even where they are unchanged, so that the process holding
   * that memory writes its pages as a VMM store would (a target whose
   * buffers are copies passes on only changed bytes otherwise). Absent where
   * the buffer is the memory itself.
   */
  storeThrough?(buf: ArrayBuffer, offset: number, len: number): number;
}

/** Mapping over part of a mapped buffer, which a target may offer (the native addon does). */
export interface RangeMapping {
  /** munmap of part of a mapped buffer (the buffer stays attached). */
  unmapRange(buf: ArrayBuffer, offset: number, len: number): number;
  /** mmap(MAP_FIXED) over part of a mapped buffer. */
  remapRange(
    buf: ArrayBuffer,
    offset: number,
    len: number,
    prot: number,
    flags: number,
    fd: number,
    fileOffset: number,
  ): number;
}

/** The native addon's vCPU threads (this host's: ThreadRunner uses them). */
export interface ThreadAddon {
  /** Starts a thread on a control block of 16 words; a handle, or -errno. */
  threadStart(ctl: Int32Array, console: Uint8Array, onDone: (seq: number) => void): unknown;
  /** Wakes the thread after a new command word, first pinning it to the caller's CPU if asked. */
  threadPost(handle: unknown, onCallerCpu: boolean): void;
  /** Sleeps up to waitUs (a signal ends it early) for the thread to finish command `seq`; whether it did. An unfinished run is unpinned. */
  threadWait(handle: unknown, seq: number, waitUs: number): boolean;
  /** Whether a pending notification keeps the event loop alive. */
  threadRef(handle: unknown, on: boolean): void;
  /** After an exit command: waits for the thread and frees it (0 or -errno). */
  threadJoin(handle: unknown): number;
}

/** The package's root directory (where package.json and build/ live). */
export const packageRoot: string = (() => {
  let dir = dirname(fileURLToPath(import.meta.url));
  for (;;) {
    const pj = join(dir, 'package.json');
    if (existsSync(pj) && JSON.parse(readFileSync(pj, 'utf8')).name === 'kvmharness') return dir;
    const up = dirname(dir);
    if (up === dir) throw new Error('kvmharness: cannot find the package root');
    dir = up;
  }
})();

export const addonPath = join(packageRoot, 'build', 'Release', 'kvmharness.node');

export type NativeAddon = Addon & RangeMapping & ThreadAddon;
let loaded: NativeAddon | undefined;

/** The native addon of this process (the local target's system calls). */
export function localAddon(): NativeAddon {
  if (!loaded) {
    if (!existsSync(addonPath)) {
      throw new HostError(`the native addon is not built (${addonPath}); run \`npm install\` in ${packageRoot}`);
    }
    loaded = createRequire(import.meta.url)(addonPath) as NativeAddon;
  }
  return loaded;
}

const errnoNames = new Map<number, string>();
for (const [name, num] of Object.entries(constants.errno)) if (!errnoNames.has(num)) errnoNames.set(num, name);
export function errnoName(errno: number): string {
  return errnoNames.get(errno) ?? `errno ${errno}`;
}

/** A system call or ioctl failed; `call` names it, `errno` says how. */
export class KvmError extends Error {
  constructor(
    readonly call: string,
    readonly errno: number,
    detail?: string,
  ) {
    super(`${call} failed: ${errnoName(errno)}${detail ? ` (${detail})` : ''}`);
    this.name = 'KvmError';
  }
  get code(): string {
    return errnoName(this.errno);
  }
}

/** The host cannot do what was asked (no /dev/kvm, no permission, addon missing). */
export class HostError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'HostError';
  }
}

/**
 * The target does not offer an operation (a capability it lacks). The
 * binding's error; the harness reports it as "not applicable here".
 */
export class Unsupported extends Error {
  constructor(
    readonly call: string,
    why: string,
  ) {
    super(`${call}: ${why}`);
    this.name = 'Unsupported';
  }
}

/** Returns r, or throws a KvmError naming the call when r is -errno. */
export function check(call: string, r: number, detail?: string): number {
  if (r < 0) throw new KvmError(call, -r, detail);
  return r;
}

/** A mapping, or throws a KvmError naming the call when mmap returned -errno. */
export function mapped(call: string, m: ArrayBuffer | number): ArrayBuffer {
  if (typeof m === 'number') throw new KvmError(call, -m);
  return m;
}

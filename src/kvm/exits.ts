// KVM exits as one discriminated union, decoded from a vCPU's kvm_run page.
// An exit that waits for data from the host (an MMIO read, a port `in`)
// carries its completion: complete() writes the data into kvm_run, where the
// next KVM_RUN hands it to the guest.
import { constants } from 'node:os';
import { EXIT, KVM_EXIT_IO_OUT, RUN } from '../uapi/uapi.js';
import { KvmError } from './sys.js';
import { hex } from '../base/units.js';

export type Exit =
  | {
      reason: 'io';
      direction: 'in' | 'out';
      port: number;
      size: number;
      count: number;
      dataOffset: number;
      data: Uint8Array;
      /** For `in`: the size * count bytes the guest reads, written into kvm_run for the next run. */
      complete(data: Uint8Array): void;
    }
  | {
      reason: 'mmio';
      gpa: bigint;
      len: number;
      isWrite: boolean;
      data: Uint8Array;
      /** For a read: the value the guest reads (its low `len` bytes), written into kvm_run for the next run. */
      complete(value: bigint): void;
    }
  | { reason: 'hlt' }
  | { reason: 'shutdown' }
  | { reason: 'internal_error'; suberror: number; data: bigint[] }
  | { reason: 'fail_entry'; hardwareReason: bigint; cpu: number }
  | { reason: 'memory_fault'; flags: bigint; gpa: bigint; size: bigint; private: boolean }
  | { reason: 'system_event'; type: number; data: bigint[] }
  | { reason: 'exception'; exception: number; errorCode: number }
  | { reason: 'intr' }
  | { reason: 'unknown'; raw: number };

export type ExitReason = Exit['reason'];

/** A copy of `len` bytes at `off` in kvm_run. */
function bytesAt(run: DataView, off: number, len: number): Uint8Array {
  return new Uint8Array(run.buffer, run.byteOffset + off, len).slice();
}
/** Up to 16 u64s at `off` in kvm_run. */
function u64sAt(run: DataView, off: number, n: number): bigint[] {
  return Array.from({ length: Math.min(n, 16) }, (_, i) => run.getBigUint64(off + 8 * i, true));
}

/**
 * Attaches an exit's completion as a property that is not part of its value:
 * comparisons, reports and copies of the exit see only the decoded fields.
 */
function completing<E extends object, D>(e: E, complete: (data: D) => void): E & { complete(data: D): void } {
  return Object.defineProperty(e, 'complete', { value: complete }) as E & { complete(data: D): void };
}

/** Decodes the exit in `run` (a view of the whole kvm_run mapping). */
export function decodeExit(run: DataView): Exit {
  const raw = run.getUint32(RUN.exit_reason, true);
  switch (raw) {
    case EXIT.KVM_EXIT_IO: {
      const size = run.getUint8(RUN.io_size);
      const count = run.getUint32(RUN.io_count, true);
      const dataOffset = Number(run.getBigUint64(RUN.io_data_offset, true));
      const direction: 'in' | 'out' = run.getUint8(RUN.io_direction) === KVM_EXIT_IO_OUT ? 'out' : 'in';
      const len = size * count;
      const data = dataOffset + len <= run.byteLength ? bytesAt(run, dataOffset, len) : new Uint8Array(0);
      const port = run.getUint16(RUN.io_port, true);
      const e = { reason: 'io' as const, direction, port, size, count, dataOffset, data };
      return completing(e, (bytes: Uint8Array) => {
        if (direction === 'out') throw new Error(`an io out exit (port 0x${e.port.toString(16)}) takes no data`);
        if (bytes.length > len || dataOffset + len > run.byteLength) {
          throw new RangeError(`io in exit (port 0x${e.port.toString(16)}): ${bytes.length} bytes for ${len}`);
        }
        new Uint8Array(run.buffer, run.byteOffset + dataOffset, bytes.length).set(bytes);
      });
    }
    case EXIT.KVM_EXIT_MMIO: {
      const len = run.getUint32(RUN.mmio_len, true);
      const e = {
        reason: 'mmio' as const,
        gpa: run.getBigUint64(RUN.mmio_phys_addr, true),
        len,
        isWrite: run.getUint8(RUN.mmio_is_write) !== 0,
        data: bytesAt(run, RUN.mmio_data, Math.min(len, 8)),
      };
      return completing(e, (value: bigint) => {
        if (e.isWrite) throw new Error(`an MMIO write exit (gpa 0x${e.gpa.toString(16)}) takes no data`);
        run.setBigUint64(RUN.mmio_data, BigInt.asUintN(64, value), true);
      });
    }
    case EXIT.KVM_EXIT_HLT:
      return { reason: 'hlt' };
    case EXIT.KVM_EXIT_SHUTDOWN:
      return { reason: 'shutdown' };
    case EXIT.KVM_EXIT_INTERNAL_ERROR:
      return {
        reason: 'internal_error',
        suberror: run.getUint32(RUN.internal_suberror, true),
        data: u64sAt(run, RUN.internal_data, run.getUint32(RUN.internal_ndata, true)),
      };
    case EXIT.KVM_EXIT_FAIL_ENTRY:
      return {
        reason: 'fail_entry',
        hardwareReason: run.getBigUint64(RUN.fail_entry_reason, true),
        cpu: run.getUint32(RUN.fail_entry_cpu, true),
      };
    case EXIT.KVM_EXIT_MEMORY_FAULT: {
      const flags = run.getBigUint64(RUN.memory_fault_flags, true);
      return {
        reason: 'memory_fault',
        flags,
        gpa: run.getBigUint64(RUN.memory_fault_gpa, true),
        size: run.getBigUint64(RUN.memory_fault_size, true),
        private: (flags & 8n) !== 0n,
      };
    }
    case EXIT.KVM_EXIT_SYSTEM_EVENT:
      return {
        reason: 'system_event',
        type: run.getUint32(RUN.system_event_type, true),
        data: u64sAt(run, RUN.system_event_data, run.getUint32(RUN.system_event_ndata, true)),
      };
    case EXIT.KVM_EXIT_EXCEPTION:
      return {
        reason: 'exception',
        exception: run.getUint32(RUN.ex_exception, true),
        errorCode: run.getUint32(RUN.ex_error_code, true),
      };
    case EXIT.KVM_EXIT_INTR:
      return { reason: 'intr' };
    default:
      return { reason: 'unknown', raw };
  }
}

const { EFAULT, EINTR } = constants.errno;

/**
 * The exit of a KVM_RUN that returned `ret`, from its kvm_run: -EINTR (a
 * kick, the time limit, a signal) is an intr exit; -EFAULT with a
 * memory-fault exit filled in (KVM_CAP_MEMORY_FAULT_INFO) is that exit, not
 * an error; any other -errno throws a KvmError.
 */
export function runExit(ret: number, run: DataView): Exit {
  if (ret === -EINTR) return { reason: 'intr' };
  const memoryFault = ret === -EFAULT && run.getUint32(RUN.exit_reason, true) === EXIT.KVM_EXIT_MEMORY_FAULT;
  if (ret < 0 && !memoryFault) throw new KvmError('KVM_RUN', -ret);
  return decodeExit(run);
}

export const INTERNAL_ERROR_SUBERRORS: Record<number, string> = {
  1: 'emulation',
  2: 'simultaneous exception',
  3: 'delivery event',
  4: 'unexpected exit reason',
};

/** One line describing an exit, for reports. */
export function describeExit(e: Exit): string {
  const dataHex = (d: Uint8Array) => Buffer.from(d).toString('hex');
  switch (e.reason) {
    case 'io':
      return `io ${e.direction} port ${hex(e.port)} size ${e.size} count ${e.count}${e.direction === 'out' ? ` data ${dataHex(e.data)}` : ''}`;
    case 'mmio':
      return `mmio ${e.isWrite ? 'write' : 'read'} gpa ${hex(e.gpa)} len ${e.len}${e.isWrite ? ` data ${dataHex(e.data.subarray(0, e.len))}` : ''}`;
    case 'internal_error':
      return `internal_error suberror ${e.suberror} (${INTERNAL_ERROR_SUBERRORS[e.suberror] ?? '?'}) data [${e.data.map(hex).join(', ')}]`;
    case 'fail_entry':
      return `fail_entry hardware reason ${hex(e.hardwareReason)} cpu ${e.cpu}`;
    case 'memory_fault':
      return `memory_fault gpa ${hex(e.gpa)} size ${hex(e.size)} flags ${hex(e.flags)}`;
    case 'system_event':
      return `system_event type ${e.type}`;
    case 'exception':
      return `exception ${e.exception} error code ${hex(e.errorCode)}`;
    case 'unknown':
      return `unknown exit reason ${e.raw}`;
    default:
      return e.reason;
  }
}

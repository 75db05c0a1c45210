// The syndrome (ESR_EL2) of a stage-2 abort decoded into what was accessed
// and why it faulted. Decoding only; no judgement. The kvm_guest_fault
// events that carry it are parsed in observe/stage2-faults.ts.

/** ESR_EL2.EC values of aborts from a lower exception level. */
export const EC = { IABT_LOW: 0x20, DABT_LOW: 0x24 } as const;

export type AbortAccess = 'read' | 'write' | 'exec';

export interface Abort {
  access: AbortAccess;
  /** 'translation' / 'permission' / 'access flag', or the raw fault status code. */
  fault: string;
  /** The lookup level the fault status names (translation, permission, access flag faults). */
  level: number | undefined;
}

/** Decodes the syndrome of an instruction or data abort; undefined for any other exception class. */
export function decodeAbort(esr: bigint): Abort | undefined {
  const ec = Number((esr >> 26n) & 0x3fn);
  if (ec !== EC.IABT_LOW && ec !== EC.DABT_LOW) return undefined;
  const fsc = Number(esr & 0x3fn);
  // WnR (bit 6) is meaningful for data aborts only.
  const access: AbortAccess = ec === EC.IABT_LOW ? 'exec' : (esr >> 6n) & 1n ? 'write' : 'read';
  const kinds: Record<number, string> = { 0b0001: 'translation', 0b0010: 'access flag', 0b0011: 'permission' };
  const kind = kinds[fsc >> 2];
  return kind
    ? { access, fault: kind, level: fsc & 3 }
    : { access, fault: `fsc 0x${fsc.toString(16)}`, level: undefined };
}

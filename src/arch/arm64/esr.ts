// Stage-2 aborts as KVM's kvm_guest_fault tracepoint reports them: the
// syndrome (ESR_EL2) decoded into what was accessed and why it faulted, and
// the event's text parsed into plain records. Decoding only; no judgement.

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
  return kind ? { access, fault: kind, level: fsc & 3 } : { access, fault: `fsc 0x${fsc.toString(16)}`, level: undefined };
}

/** One kvm_guest_fault event: the faulting IPA (page-aligned), the syndrome, the FAR and the guest PC. */
export interface GuestFault {
  ipa: bigint;
  esr: bigint;
  far: bigint;
  pc: bigint;
}

// TP_printk("ipa %#llx, hsr %#08lx, hxfar %#08lx, pc 0x%016lx", ...): `%#x` prints 0 as "0".
const NUM = '(0x[0-9a-f]+|0)';
const GUEST_FAULT = new RegExp(`^ipa ${NUM}, hsr ${NUM}, hxfar ${NUM}, pc 0x([0-9a-f]+)\\s*$`);

/** Parses the text of a kvm_guest_fault event; undefined when it has another shape. */
export function parseGuestFault(text: string): GuestFault | undefined {
  const m = GUEST_FAULT.exec(text.trim());
  if (!m) return undefined;
  return { ipa: BigInt(m[1]!), esr: BigInt(m[2]!), far: BigInt(m[3]!), pc: BigInt(`0x${m[4]}`) };
}

// Stage-2 aborts as KVM's kvm_guest_fault tracepoint reports them: the
// event's text parsed into plain records (the syndrome is decoded by
// arch/arm64/esr.ts). Observation only; no judgement.

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

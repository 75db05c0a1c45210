// Units every room may use: a value in hex as the reports print it, and the
// 4 KiB page.

/** `0x` and the value's hex digits. */
export const hex = (v: bigint | number): string => `0x${v.toString(16)}`;

/** A signed value in hex: -0x10 for -16 (hex() would print 0x-10). */
export function signedHex(v: bigint | number): string {
  const b = BigInt(v);
  return b < 0n ? `-0x${(-b).toString(16)}` : `0x${b.toString(16)}`;
}

/** Bytes in a 4 KiB page. */
export const PAGE_SIZE = 4096;
/** PAGE_SIZE as a bigint, for guest-physical and host-virtual addresses. */
export const PAGE = 0x1000n;

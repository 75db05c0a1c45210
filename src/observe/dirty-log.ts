// The dirty log as pages: KVM_GET_DIRTY_LOG's bitmap (bit i of byte b is page
// 8b + i of the slot) turned into the guest-physical addresses of the pages
// it marks, in ascending order.
import { PAGE } from '../base/units.js';

/** The GPAs of the pages a slot's dirty bitmap marks; `base` is the slot's first GPA. */
export function dirtyPages(bitmap: Uint8Array, base: bigint): bigint[] {
  const out: bigint[] = [];
  bitmap.forEach((byte, b) => {
    for (let j = 0; j < 8; j++) if (byte & (1 << j)) out.push(base + BigInt(b * 8 + j) * PAGE);
  });
  return out;
}

// The one seeded pseudo-random generator: reproducible samples (the access
// matrix's --sample/--seed), random property-test cases, bench workloads.

/** mulberry32: a small seeded PRNG giving 32-bit unsigned integers. */
export function mulberry32(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return (t ^ (t >>> 14)) >>> 0;
  };
}

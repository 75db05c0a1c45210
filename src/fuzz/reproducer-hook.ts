// A finding's C reproducer (src/fuzz/repro-c.ts): reproducer.c, built and
// run to confirm that it shows the mismatch (exit status 1) before the
// finding is reported. A finding the reproducer cannot carry yet (a race) is
// reported with the reason instead.
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { Wrong } from '../model/wrong.js';
import type { HostProfile } from '../probe/probe.js';
import type { Finding } from './campaign.js';
import { buildAndRun, parseMismatch, reproducer } from './repro-c.js';

export interface ReproducerResult {
  /** reproducer.c was written. */
  written: boolean;
  /** Its exit status when built and run (1: the mismatch shows), if it was. */
  exitCode?: number;
  /** Why there is none, or what it leaves out. */
  note?: string;
}

/** Writes `dir`/reproducer.c for `f` and, with `run`, builds and runs it. */
export async function writeReproducer(
  dir: string,
  f: Finding,
  profile: HostProfile,
  wrong: Wrong | undefined,
  /** Build and run it here (not for a lab's KVM, which this host's program cannot reach). */
  run: boolean,
): Promise<ReproducerResult> {
  try {
    const mismatch = f.mismatch ? parseMismatch(f.mismatch.what) : undefined;
    const { source } = reproducer(f.scenario, { profile, wrong, ...(mismatch ? { mismatch } : {}) });
    writeFileSync(join(dir, 'reproducer.c'), source);
    if (!run) return { written: true, note: "not run: the finding is the lab's KVM" };
    const r = await buildAndRun(source);
    return { written: true, exitCode: r.exitCode };
  } catch (e) {
    return { written: false, note: e instanceof Error ? e.message.split('\n')[0] : String(e) };
  }
}

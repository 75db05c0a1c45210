// The hook for a finding's C reproducer (src/fuzz/repro-c.ts, where it
// exists): it is loaded by name at run time, so the fuzzer works without it.
// With it, every finding gets reproducer.c, built and run to confirm that it
// shows the mismatch (exit status 1) before the finding is reported.
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { Wrong } from '../model/wrong.js';
import type { HostProfile } from '../probe/probe.js';
import type { Finding } from './campaign.js';

export interface ReproducerResult {
  /** reproducer.c was written. */
  written: boolean;
  /** Its exit status when built and run (1: the mismatch shows), if it was. */
  exitCode?: number;
  /** Why there is none, or what it leaves out. */
  note?: string;
}

/** What the module is expected to export. */
interface ReproModule {
  reproducer(
    sc: Finding['scenario'],
    o: { profile: HostProfile; wrong?: Wrong; mismatch?: { step: number; field?: string } },
  ): { source: string };
  parseMismatch(what: string): { step: number; field?: string } | undefined;
  buildAndRun(source: string): Promise<{ exitCode: number }>;
}

/** The C reproducer module, or undefined where it does not exist. */
async function reproModule(): Promise<ReproModule | undefined> {
  const name = './repro-c.js';
  try {
    return (await import(name)) as ReproModule;
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ERR_MODULE_NOT_FOUND') return undefined;
    throw e;
  }
}

/** Writes `dir`/reproducer.c for `f` and confirms it, where the module exists; undefined where it does not. */
export async function writeReproducer(
  dir: string,
  f: Finding,
  profile: HostProfile,
  wrong: Wrong | undefined,
  /** Build and run it here (not for a lab's KVM, which this host's program cannot reach). */
  run: boolean,
): Promise<ReproducerResult | undefined> {
  const mod = await reproModule();
  if (!mod) return undefined;
  try {
    const mismatch = f.mismatch ? mod.parseMismatch(f.mismatch.what) : undefined;
    const { source } = mod.reproducer(f.scenario, { profile, wrong, ...(mismatch ? { mismatch } : {}) });
    writeFileSync(join(dir, 'reproducer.c'), source);
    if (!run) return { written: true, note: "not run: the finding is the lab's KVM" };
    const r = await mod.buildAndRun(source);
    return { written: true, exitCode: r.exitCode };
  } catch (e) {
    return { written: false, note: e instanceof Error ? e.message.split('\n')[0] : String(e) };
  }
}

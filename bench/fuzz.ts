// fuzz_steps_per_s / fuzz_steps_per_s_lab: the fuzzer's throughput, a
// campaign of fixed length from seed 1 (`kvmharness fuzz --duration S
// --json`) here and in the lab's npt-tdp profile: generated steps judged per
// second, shrinking of any finding included. No C reference: nothing else
// judges a step.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Entry } from './entry.js';
import { cli } from './kvm-mutants.js';

/** A campaign of `seconds` from seed 1 (with `lab`, in that lab profile). */
export async function benchFuzz(name: string, seconds: number, lab?: string): Promise<Entry> {
  const out = mkdtempSync(join(tmpdir(), 'kvmharness-bench-fuzz-'));
  try {
    const args = ['fuzz', '--duration', String(seconds), '--seed', '1', '--out', out, '--json'];
    if (lab) args.push('--lab', lab);
    const r = await cli(args, () => {});
    if (r.code !== 0 && r.code !== 1) {
      const last = r.stderr.trim().split('\n').pop() ?? '';
      throw new Error(`fuzz exited ${r.code}: ${last}`);
    }
    const s = JSON.parse(r.stdout) as { cases: number; steps: number; durationMs: number; findings: unknown[] };
    const value = Math.round((s.steps / s.durationMs) * 1000 * 10) / 10;
    return {
      name,
      unit: 'steps/s',
      value,
      note: `${s.cases} cases, ${s.steps} steps in ${(s.durationMs / 1000).toFixed(1)} s, ${s.findings.length} finding(s)${lab ? `, lab ${lab}` : ''}`,
    };
  } finally {
    rmSync(out, { recursive: true, force: true });
  }
}

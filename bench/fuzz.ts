// fuzz_steps_per_s / fuzz_steps_per_s_lab: the fuzzer's throughput, a
// campaign of fixed length from seed 1 (`kvmharness fuzz --duration S
// --json`) here and in the lab's npt-tdp profile: generated steps judged per
// second, shrinking of any finding included. No C reference: nothing else
// judges a step.
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { packageRoot } from '../src/kvm/sys.js';
import type { Entry } from './entry.js';

/** A campaign of `seconds` from seed 1 (with `lab`, in that lab profile). */
export async function benchFuzz(name: string, seconds: number, lab?: string): Promise<Entry> {
  const out = mkdtempSync(join(tmpdir(), 'kvmharness-bench-fuzz-'));
  try {
    const args = ['fuzz', '--duration', String(seconds), '--seed', '1', '--out', out, '--json'];
    if (lab) args.push('--lab', lab);
    const r = await new Promise<{ code: number; stdout: string; stderr: string }>((resolve, reject) => {
      const p = spawn(process.execPath, [join(packageRoot, 'dist', 'src', 'cli', 'bin.js'), ...args], {
        stdio: ['ignore', 'pipe', 'pipe'],
      });
      let stdout = '';
      let stderr = '';
      p.stdout.on('data', (b: Buffer) => (stdout += b.toString()));
      p.stderr.on('data', (b: Buffer) => (stderr += b.toString()));
      p.on('error', reject);
      p.on('close', (code) => resolve({ code: code ?? 1, stdout, stderr }));
    });
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

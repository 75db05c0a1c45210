// Throughput of the access matrix against this machine's /dev/kvm: checked cases
// per second of a seeded sample (the whole check: sampling, guest set-up, batches,
// model, comparison), and optionally the time of the complete 4-level matrix.
//
//   benchMatrix()                 matrix_cases_per_s (median of 3 runs of 100,000 cases)
//   benchMatrix({ full: true })   also matrix_full_4level_s (every legal case; minutes)
import { accessMatrix } from '../src/matrix/check.js';
import { Kvm } from '../src/kvm/kvm.js';
import { localTarget } from '../src/target/local.js';
import { probe } from '../src/probe/probe.js';
import { runCheck } from '../src/run/runner.js';

export type MatrixBenchEntry =
  | { name: 'matrix_cases_per_s'; unit: 'cases/s'; value: number }
  | { name: 'matrix_full_4level_s'; unit: 's'; value: number };

export interface MatrixBenchOptions {
  /** Cases per timed run (default 100,000). */
  cases?: number;
  /** Timed runs; the median is reported (default 3). */
  rounds?: number;
  /** Also time the complete 4-level matrix. */
  full?: boolean;
  log?: (line: string) => void;
}

const median = (xs: number[]): number => {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
};

export async function benchMatrix(opts: MatrixBenchOptions = {}): Promise<MatrixBenchEntry[]> {
  const cases = opts.cases ?? 100_000;
  const rounds = opts.rounds ?? 3;
  const log = opts.log ?? ((l: string) => void process.stderr.write(`bench: ${l}\n`));
  const profile = probe(localTarget);
  const kvm = Kvm.open(localTarget);
  try {
    const timed = async (sample: number | undefined, seed: number) => {
      const t0 = performance.now();
      const r = await runCheck(accessMatrix({ sample, seed }), kvm, profile);
      const s = (performance.now() - t0) / 1000;
      if (r.outcome !== 'pass')
        throw new Error(
          `access-matrix did not pass (${r.outcome}): ${
            r.reason ??
            r.comparisons
              .filter((c) => !c.ok)
              .map((c) => c.what)
              .slice(0, 3)
              .join('; ')
          }`,
        );
      return { s, checked: r.cases?.checked ?? 0 };
    };
    await timed(2000, 99); // warm-up: JIT, vCPU thread
    const rates: number[] = [];
    for (let i = 0; i < rounds; i++) {
      const { s, checked } = await timed(cases, i + 1);
      rates.push(checked / s);
      log(
        `matrix_cases_per_s round ${i + 1}/${rounds}: ${checked} cases in ${s.toFixed(2)} s = ${Math.round(checked / s)} cases/s`,
      );
    }
    const out: MatrixBenchEntry[] = [{ name: 'matrix_cases_per_s', unit: 'cases/s', value: Math.round(median(rates)) }];
    if (opts.full) {
      log('matrix_full_4level_s: every legal 4-level case (minutes)');
      const { s, checked } = await timed(undefined, 1);
      log(`matrix_full_4level_s: ${checked} cases in ${s.toFixed(1)} s`);
      out.push({ name: 'matrix_full_4level_s', unit: 's', value: Number(s.toFixed(1)) });
    }
    return out;
  } finally {
    kvm.close();
  }
}

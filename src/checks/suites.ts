// The built-in checks by suite, and the selection of checks by name: suite
// names, check names and scenario files.
import { accessMatrix } from '../matrix/check.js';
import { scenarioCheck } from '../run/engine.js';
import type { Check } from '../run/types.js';
import { builtinScenarios, loadScenario, resolveScenario } from '../scenario/load.js';
import type { Scenario } from '../scenario/types.js';
import type { Wrong } from '../model/wrong.js';
import { SMOKE } from './smoke.js';

/** A name that selects no check. */
export class SelectionError extends Error {}

/** A scenario as two checks: results and A/D, then KVM's walker trace (a race has no single walk to trace: one check). */
function checksOf(sc: Scenario, wrong?: Wrong): Check[] {
  return sc.race
    ? [scenarioCheck(sc, { wrong })]
    : [scenarioCheck(sc, { wrong }), scenarioCheck(sc, { trace: true, wrong })];
}

/** Every built-in scenario's checks. */
function scenarioChecks(): Check[] {
  return builtinScenarios().flatMap((name) => checksOf(loadScenario(resolveScenario(name))));
}

/** The access-matrix sample of the default run: finishes in well under 30 s here. */
const DEFAULT_MATRIX_SAMPLE = 300_000;

export interface MatrixOptions {
  mode?: '4level' | '5level';
  sample?: number;
  seed?: number;
}

/** The suites by name, with what each holds (for `run --help`). */
export const SUITE_DOCS: Readonly<Record<string, string>> = {
  smoke: 'small guests: exits, memslots, dirty log, #PF, KVM_TRANSLATE, shadow and TDP pictures (x86 or arm64)',
  scenarios: 'every built-in scenario (guests/scenarios): results and A/D, then the walker trace',
  'access-matrix': `the access matrix, a sample of ${DEFAULT_MATRIX_SAMPLE} cases (every legal case when named alone)`,
};

/** The suites by name: smoke, the built-in scenarios, the access matrix (sampled). */
function suites(m: MatrixOptions = {}): Record<string, readonly Check[]> {
  return {
    smoke: SMOKE,
    scenarios: scenarioChecks(),
    'access-matrix': [accessMatrix({ mode: m.mode, seed: m.seed ?? 1, sample: m.sample ?? DEFAULT_MATRIX_SAMPLE })],
  };
}

/**
 * Resolves names to checks, in the order given: suite names, check names, or
 * paths of scenario files (anything ending in .json).
 */
export function selectChecks(names: string[], matrix: MatrixOptions = {}, wrong?: Wrong): Check[] {
  const all = suites(matrix);
  // Named explicitly without --sample, the access matrix runs every legal case.
  if (names.includes('access-matrix'))
    all['access-matrix'] = [accessMatrix({ mode: matrix.mode, seed: matrix.seed ?? 1, sample: matrix.sample })];
  if (names.length === 0) return Object.values(all).flat();
  const everything = Object.values(all).flat();
  const out: Check[] = [];
  for (const n of names) {
    let found: readonly Check[];
    if (n.endsWith('.json')) {
      const sc = loadScenario(n);
      found = checksOf(sc, wrong);
    } else {
      found = all[n] ?? everything.filter((c) => c.name === n);
    }
    if (found.length === 0) throw new SelectionError(`unknown check or suite '${n}' (see \`kvmharness run --list\`)`);
    for (const c of found) if (!out.some((o) => o.name === c.name)) out.push(c);
  }
  return out;
}

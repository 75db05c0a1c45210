// A finding on disk: DIR/<nn>-<signature>/ with the shrunk scenario
// (scenario.json, which `kvmharness run` reproduces), the case as generated
// (original.json), the mismatch (mismatch.txt, mismatch.json), what the shrunk
// run noted (notes.txt), the kernel's
// messages (kernel.log, where the kernel complained) and, where the C
// reproducer module exists, reproducer.c.
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { Wrong } from '../model/wrong.js';
import type { HostProfile } from '../probe/probe.js';
import type { Finding } from './campaign.js';
import { writeReproducer, type ReproducerResult } from './reproducer-hook.js';

export interface WrittenFinding {
  dir: string;
  reproducer?: ReproducerResult;
}

const slug = (s: string) =>
  s
    .toLowerCase()
    .replace(/[^a-z0-9]+/g, '-')
    .replace(/^-|-$/g, '')
    .slice(0, 60);

/** What `mismatch.json` holds, and the --json summary's finding (besides its directory). */
export function findingJson(f: Finding): Record<string, unknown> {
  return {
    signature: f.signature,
    case: f.caseIndex,
    caseSeed: f.caseSeed,
    steps: f.steps,
    originalSteps: f.originalSteps,
    shrinks: f.shrinks,
    repeats: f.repeats,
    outcome: f.verdict.outcome,
    ...(f.mismatch ? { mismatch: f.mismatch } : {}),
    ...(f.verdict.reason ? { reason: f.verdict.reason } : {}),
    ...(f.verdict.kernel ? { kernel: f.verdict.kernel.map((k) => k.message) } : {}),
  };
}

/** Writes finding number `n` under `out`; returns its directory. */
export async function writeFinding(
  out: string,
  n: number,
  f: Finding,
  how: { seed: number; profile: HostProfile; wrong?: Wrong; lab: boolean },
): Promise<WrittenFinding> {
  const dir = join(out, `${String(n).padStart(3, '0')}-${slug(f.signature)}`);
  mkdirSync(dir, { recursive: true });
  const described = (json: unknown, what: string) => ({
    ...(json as Record<string, unknown>),
    description: `Found by kvmharness fuzz --seed ${how.seed} (case ${f.caseIndex}), ${what}: ${f.signature}.`,
  });
  writeFileSync(join(dir, 'scenario.json'), JSON.stringify(described(f.json, 'shrunk'), null, 2) + '\n');
  writeFileSync(join(dir, 'original.json'), JSON.stringify(described(f.original, 'as generated'), null, 2) + '\n');
  writeFileSync(join(dir, 'mismatch.json'), JSON.stringify(findingJson(f), null, 2) + '\n');
  const m = f.mismatch;
  const text = [
    `signature  ${f.signature}`,
    `case       ${f.caseIndex} of --seed ${how.seed} (fast-check seed ${f.caseSeed})`,
    `size       ${f.steps} steps, shrunk from ${f.originalSteps} in ${f.shrinks} shrinking steps`,
    `outcome    ${f.verdict.outcome}${f.verdict.reason ? `: ${f.verdict.reason}` : ''}`,
    ...(m ? [`mismatch   ${m.what}`, `  expected ${m.expected}`, `  observed ${m.observed}`] : []),
    '',
    `reproduce  kvmharness run ${join(dir, 'scenario.json')}`,
    '',
  ].join('\n');
  writeFileSync(join(dir, 'mismatch.txt'), text);
  // What the run noted on the way (the models' decisions, KVM's traced changes, counters): the first
  // place to look when asking which side is wrong.
  const notes = f.verdict.result.notes;
  if (notes.length) writeFileSync(join(dir, 'notes.txt'), notes.join('\n') + '\n');
  if (f.verdict.kernel?.length)
    writeFileSync(
      join(dir, 'kernel.log'),
      f.verdict.kernel.map((k) => [k.message, ...k.excerpt].join('\n')).join('\n\n') + '\n',
    );
  const reproducer = await writeReproducer(dir, f, how.profile, how.wrong, !how.lab);
  return { dir, ...(reproducer ? { reproducer } : {}) };
}

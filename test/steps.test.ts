// The tables of step kinds are exhaustive by type: a kind added to the Step
// union without its entry (scenario/steps.ts) or without its handlers
// (run/step-actions.ts) does not compile. Shown by compiling a small module
// that extends the union, once with every handler (it compiles) and once
// with each one left out (each is an error naming what is missing).
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import ts from 'typescript';
import { describe, expect, it } from 'vitest';
import { STEP_KINDS, stepVariants } from '../src/scenario/steps.js';
import { STEP_ACTIONS } from '../src/run/step-actions.js';

const ROOT = resolve(import.meta.dirname, '..');

/** A module that adds a host kind 'balloon' and a guest kind 'hop' to Step; the parts given are its handlers. */
function extension(parts: { kinds: string; actions: string }): string {
  const src = (p: string) => JSON.stringify(join(ROOT, 'src', p));
  return `
import { STEP_KINDS, type StepKindTable } from ${src('scenario/steps.js')};
import { STEP_ACTIONS, type StepActionTable } from ${src('run/step-actions.js')};
import type { Step } from ${src('scenario/types.js')};

type Balloon = { side: 'host'; kind: 'balloon'; pages: number };
type Hop = { side: 'guest'; kind: 'hop' };
type Next = Step | Balloon | Hop;

const entry = { variants: [], decode: () => { throw new Error('x'); }, encode: () => ({}), validate() {} };
export const kinds: StepKindTable<Next> = { ...STEP_KINDS, ${parts.kinds} };
export const actions: StepActionTable<Next> = { ...STEP_ACTIONS, ${parts.actions} };
void entry;
`;
}

/** The errors tsc gives for a module. */
function compile(text: string): string[] {
  const dir = mkdtempSync(join(tmpdir(), 'kvmharness-steps-'));
  try {
    const file = join(dir, 'next.mts');
    writeFileSync(file, text);
    const program = ts.createProgram([file], {
      target: ts.ScriptTarget.ES2022,
      module: ts.ModuleKind.NodeNext,
      moduleResolution: ts.ModuleResolutionKind.NodeNext,
      lib: ['lib.es2023.d.ts', 'lib.es2024.sharedmemory.d.ts'],
      types: ['node'],
      typeRoots: [join(ROOT, 'node_modules', '@types')],
      strict: true,
      skipLibCheck: true,
      noEmit: true,
    });
    return ts
      .getPreEmitDiagnostics(program)
      .filter((d) => d.category === ts.DiagnosticCategory.Error)
      .map((d) => {
        const where = d.file && d.file.fileName !== file ? `${d.file.fileName}: ` : '';
        return `${where}${ts.flattenDiagnosticMessageText(d.messageText, '\n')}`;
      });
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

describe('the tables of step kinds', () => {
  it('have one entry and one handler set per kind', () => {
    const kinds = Object.keys(STEP_KINDS).sort();
    expect(Object.keys(STEP_ACTIONS).sort()).toEqual(kinds);
    expect(stepVariants().map((v) => `${v.side} ${v.tag}`)).toContain('host translate');
  });

  it('a kind with every handler compiles; a kind without one does not', () => {
    const full = {
      kinds: 'balloon: entry, hop: entry',
      actions: 'balloon: { act() {} }, hop: { emit() {} }',
    };
    expect(compile(extension(full))).toEqual([]);

    const noEntry = compile(extension({ ...full, kinds: 'hop: entry' }));
    expect(noEntry).toHaveLength(1);
    expect(noEntry[0]).toMatch(/Property 'balloon' is missing in type/);

    const noAct = compile(extension({ ...full, actions: 'balloon: {}, hop: { emit() {} }' }));
    expect(noAct).toHaveLength(1);
    expect(noAct[0]).toMatch(/Property 'act' is missing in type '\{\}'/);

    const noEmit = compile(extension({ ...full, actions: 'balloon: { act() {} }, hop: {}' }));
    expect(noEmit).toHaveLength(1);
    expect(noEmit[0]).toMatch(/Property 'emit' is missing in type '\{\}'/);
  }, 120_000);
});

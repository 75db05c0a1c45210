// The JSON report against its published schema (docs/report.schema.json),
// with ajv: the reporter's output, a real run's output, and the schema
// rejecting what it must.
import { spawnSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { Ajv2020 } from 'ajv/dist/2020.js';
import { describe, expect, it } from 'vitest';
import { json, REPORT_VERSION } from '../src/report/report.js';
import type { RunReport } from '../src/run/types.js';
import { describeKvm } from './support/kvm.js';

const ROOT = join(import.meta.dirname, '..');
const schema = JSON.parse(readFileSync(join(ROOT, 'docs', 'report.schema.json'), 'utf8'));
const validate = new Ajv2020({ allErrors: true, strict: true }).compile(schema);
const problems = (doc: unknown): string[] =>
  validate(doc) ? [] : (validate.errors ?? []).map((e) => `${e.instancePath || '/'} ${e.message}`);

const report: RunReport = {
  host: {
    arch: 'x86_64',
    flavour: 'kvm_pvm',
    tdp: { enabled: false, kind: 'none' },
    tdpMmu: false,
    device: '/dev/kvm',
  },
  checks: [
    {
      name: 'a',
      description: 'passes',
      outcome: 'pass',
      comparisons: [{ what: 'x', expected: '1', observed: '1', ok: true }],
      notes: [],
      durationMs: 1,
    },
    {
      name: 'b',
      description: 'fails',
      outcome: 'fail',
      comparisons: [{ what: 'x', expected: '1', observed: '2', ok: false }],
      notes: ['n'],
      durationMs: 2,
    },
    {
      name: 'c',
      description: 'n/a',
      outcome: 'not_applicable',
      reason: 'no TDP',
      comparisons: [],
      notes: [],
      durationMs: 0,
    },
    {
      name: 'd',
      description: 'errs',
      outcome: 'error',
      reason: 'KVM_RUN failed: EFAULT',
      comparisons: [],
      notes: [],
      durationMs: 0,
    },
    {
      name: 'f',
      description: 'interrupted',
      outcome: 'not_run',
      reason: 'the run was interrupted by SIGTERM',
      comparisons: [],
      notes: [],
      durationMs: 0,
    },
    {
      name: 'e',
      description: 'many cases',
      outcome: 'pass',
      comparisons: [],
      notes: [],
      durationMs: 5,
      cases: { checked: 3, byOutcome: { pass: 2, 'fault P|W': 1 } },
    },
  ],
  summary: {
    total: 6,
    passed: 2,
    failed: 1,
    notApplicable: 1,
    errors: 1,
    notRun: 1,
    interrupted: 'SIGTERM',
    durationMs: 8,
    casesChecked: 3,
  },
};

describe('JSON report schema', () => {
  it('the reporter writes version 1, and every outcome validates', () => {
    const doc = JSON.parse(json(report));
    expect(doc.version).toBe(REPORT_VERSION);
    expect(problems(doc)).toEqual([]);
  });

  it('a run the kernel under test stopped validates: the kernel message, the console log', () => {
    const crashed: RunReport = {
      ...report,
      checks: [
        {
          name: 'g',
          description: 'crashed',
          outcome: 'fail',
          reason: 'kernel BUG in __handle_changed_spte: Invalid SPTE change',
          comparisons: [],
          notes: [],
          durationMs: 3,
          kernel: [
            {
              message: 'kernel BUG in __handle_changed_spte: Invalid SPTE change',
              excerpt: ['kernel BUG at arch/x86/kvm/mmu/tdp_mmu.c:1!'],
            },
          ],
        },
        {
          name: 'h',
          description: 'after',
          outcome: 'not_run',
          reason: 'the kernel under test stopped during g',
          comparisons: [],
          notes: [],
          durationMs: 0,
        },
      ],
      summary: {
        total: 2,
        passed: 0,
        failed: 1,
        notApplicable: 0,
        errors: 0,
        notRun: 1,
        stopped: 'the kernel under test stopped during g',
        durationMs: 3,
        casesChecked: 0,
      },
      consoleLog: '/tmp/results/console.log',
    };
    expect(problems(JSON.parse(json(crashed)))).toEqual([]);
  });

  it('rejects what the format does not allow', () => {
    const doc = JSON.parse(json(report));
    expect(problems({ ...doc, version: 2 })).toEqual(['/version must be equal to constant']);
    const { version: _, ...noVersion } = doc;
    expect(problems(noVersion)).toEqual(["/ must have required property 'version'"]);
    const badOutcome = { ...doc, checks: [{ ...doc.checks[0], outcome: 'skipped' }] };
    expect(problems(badOutcome)).toContain('/checks/0/outcome must be equal to one of the allowed values');
    const extra = { ...doc, summary: { ...doc.summary, skipped: 0 } };
    expect(problems(extra)).toEqual(['/summary must NOT have additional properties']);
  });

  it('documents every outcome value the types allow', () => {
    const outcomes: RunReport['checks'][number]['outcome'][] = ['pass', 'fail', 'not_applicable', 'error', 'not_run'];
    expect(schema.$defs.outcome.enum).toEqual(outcomes);
    for (const o of outcomes) expect(schema.$defs.outcome.description).toContain(`${o}:`);
  });
});

describeKvm('JSON report schema, real runs', () => {
  it('`run --json` output validates', () => {
    const cli = join(ROOT, 'dist', 'src', 'cli', 'bin.js');
    const r = spawnSync(process.execPath, [cli, 'run', '--json', 'real_mode_io', 'five_level', 'nx'], {
      encoding: 'utf8',
      timeout: 120_000,
    });
    expect(r.stderr).toBe('');
    const doc = JSON.parse(r.stdout);
    expect(problems(doc)).toEqual([]);
    expect(doc.checks.map((c: { name: string }) => c.name)).toContain('five_level');
  });
});

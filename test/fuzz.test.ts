// kvmharness fuzz: cases from seeds (deterministic, sharded without overlap or
// gap), signatures, the options, the --json summary against its schema; and on
// KVM, a deliberately wrong model found, shrunk to a small scenario that `run`
// fails the same way under that model and passes under the right one, the
// shrinking deterministic, and a short campaign with the right model clean.
import { spawnSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Ajv2020 } from 'ajv/dist/2020.js';
import { afterAll, describe, expect, it } from 'vitest';
import { fuzzArgs, summaryJson } from '../src/cli/fuzz.js';
import { caseIndexes, casePlan, caseSeed, type CampaignSummary } from '../src/fuzz/campaign.js';
import { comparisonKind, oraclesFor, signatureOf } from '../src/fuzz/oracle.js';
import { parseWrong } from '../src/model/wrong.js';
import type { HostProfile } from '../src/probe/probe.js';
import type { CheckResult } from '../src/run/types.js';
import type { GenHost } from '../src/fuzz/gen.js';
import { describeKvm } from './support/kvm.js';

const ROOT = join(import.meta.dirname, '..');
const CLI = join(ROOT, 'dist', 'src', 'cli', 'bin.js');
const schema = JSON.parse(readFileSync(join(ROOT, 'docs', 'fuzz.schema.json'), 'utf8'));
const validate = new Ajv2020({ allErrors: true, strict: true }).compile(schema);
const problems = (doc: unknown): string[] =>
  validate(doc) ? [] : (validate.errors ?? []).map((e) => `${e.instancePath || '/'} ${e.message}`);

function cli(args: string[], env: Record<string, string> = {}) {
  const r = spawnSync(process.execPath, [CLI, ...args], {
    encoding: 'utf8',
    env: { ...process.env, ...env },
    timeout: 300_000,
  });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

const HOST: GenHost = {
  maxPhyAddr: 48,
  nx: true,
  smep: false,
  smap: false,
  pku: false,
  la57: false,
  pdpe1gb: false,
  preFault: false,
  hugetlb2m: 0,
  races: true,
  pvm: true,
  guestMemfd: false,
};

describe('fuzz cases', () => {
  it('gives the same plan for the same seed and case, and others for others', () => {
    expect(casePlan(HOST, 7, 3)).toEqual(casePlan(HOST, 7, 3));
    expect(casePlan(HOST, 7, 3)).not.toEqual(casePlan(HOST, 7, 4));
    expect(casePlan(HOST, 7, 3)).not.toEqual(casePlan(HOST, 8, 3));
    const seeds = new Set(Array.from({ length: 1000 }, (_, k) => caseSeed(1, k)));
    expect(seeds.size).toBe(1000);
  });

  it('splits the cases of one run exactly between shards', () => {
    const first = (shard: { index: number; count: number }, n: number) => {
      const out: number[] = [];
      for (const k of caseIndexes(shard)) {
        if (out.length === n) break;
        out.push(k);
      }
      return out;
    };
    const whole = first({ index: 1, count: 1 }, 30);
    const halves = [...first({ index: 1, count: 2 }, 15), ...first({ index: 2, count: 2 }, 15)].sort((a, b) => a - b);
    expect(halves).toEqual(whole);
    const thirds = [1, 2, 3].flatMap((i) => first({ index: i, count: 3 }, 10)).sort((a, b) => a - b);
    expect(thirds).toEqual(whole);
  });
});

describe('fuzz signatures', () => {
  it('names a mismatch by its step kind and field', () => {
    expect(comparisonKind('step 4 read64 0x8000000000 cpl3: exceptions')).toBe('read: exceptions');
    expect(comparisonKind('step 0 exec8 0x8000001fff cpl0: PTEs after')).toBe('exec: PTEs after');
    expect(comparisonKind('step 2 host get-dirty-log: dirty pages')).toBe('host get-dirty-log: dirty pages');
    expect(comparisonKind('step 2 host translate 0x8000000000: KVM_TRANSLATE')).toBe('host translate: KVM_TRANSLATE');
    expect(comparisonKind('step 9 invlpg: shadow pages')).toBe('invlpg: shadow pages');
    expect(comparisonKind('guest finishes')).toBe('guest finishes');
  });

  it('prefers the kernel, then an error, to the comparisons', () => {
    const r: CheckResult = {
      name: 'x',
      description: '',
      outcome: 'fail',
      comparisons: [
        { what: 'step 1 write32 0x8000000010 cpl0: value in memory', expected: '1', observed: '2', ok: false },
      ],
      notes: [],
      durationMs: 1,
    };
    expect(signatureOf(r)).toBe('write: value in memory');
    expect(signatureOf({ ...r, outcome: 'error', reason: 'KVM_RUN failed: EFAULT (vcpu 0)' })).toBe(
      'error: KVM_RUN failed: EFAULT (vcpu N)',
    );
    expect(signatureOf({ ...r, kernel: [{ message: 'WARNING in kvm_mmu_zap at 0xffff1234', excerpt: [] }] })).toBe(
      'kernel: WARNING in kvm_mmu_zap at N',
    );
    expect(signatureOf({ ...r, outcome: 'pass', comparisons: [] })).toBeUndefined();
    expect(signatureOf({ ...r, outcome: 'not_applicable', comparisons: [] })).toBeUndefined();
  });

  it('shrinks with the trace and shadow oracles only for their own mismatches', () => {
    const full = { trace: true };
    const none = { trace: false, shadowFollow: false, tdpFollow: false };
    expect(oraclesFor('read: PTEs after', full)).toEqual(none);
    expect(oraclesFor('read: KVM walker trace', full)).toEqual({ ...none, trace: true });
    expect(oraclesFor('invlpg: shadow pages', full)).toEqual({ ...none, shadowFollow: true });
    expect(oraclesFor('host munmap: TDP gfn N present', full)).toEqual({ ...none, tdpFollow: true });
    expect(oraclesFor('write: remote TLB flush requested (remote_tlb_flush)', full)).toEqual({
      ...none,
      tdpFollow: true,
    });
    expect(oraclesFor('kernel: BUG', full)).toBe(full);
  });
});

describe('fuzz options', () => {
  it.each([
    [['--shard', '3/2'], /--shard needs I\/N/],
    [['--shard', '0/2'], /--shard needs I\/N/],
    [['--cases', '0'], /--cases needs an integer >= 1/],
    [['--duration', 'soon'], /--duration needs a positive number/],
    [['--seed', 'x'], /--seed needs an integer/],
    [['--release', '7.2'], /--release needs --lab/],
    [['--lab', 'vhe'], /scenarios are x86/],
    [['--lab', 'nonesuch'], /nonesuch/],
    [['--kvm-source', '/tmp'], /--kvm-source needs --lab/],
    [
      ['--lab', 'npt-tdp', '--release', '6.1', '--kvm-source', '/nonexistent'],
      /\/nonexistent is not a kernel source tree/,
    ],
  ])('%j is a usage error: exit 2, one line', (args, msg) => {
    const r = cli(['fuzz', ...args]);
    expect(r.status).toBe(2);
    expect(r.stderr.trim().split('\n')).toEqual([expect.stringMatching(msg)]);
    expect(r.stdout).toBe('');
  });

  it('passes --kvm-source with --lab and --release to the lab session', () => {
    const dir = mkdtempSync(join(tmpdir(), 'kvmharness-src-'));
    try {
      mkdirSync(join(dir, 'arch', 'x86', 'kvm'), { recursive: true });
      mkdirSync(join(dir, 'virt', 'kvm'), { recursive: true });
      writeFileSync(join(dir, 'arch', 'x86', 'kvm', 'Makefile'), '');
      const a = fuzzArgs({ lab: 'npt-tdp', release: '6.1', kvmSource: dir, cases: '5', seed: '1', json: true });
      expect(a.lab).toEqual({ profile: 'npt-tdp', release: '6.1', kvmSource: dir });
      expect(fuzzArgs({ lab: 'npt-tdp' }).lab).toEqual({ profile: 'npt-tdp' });
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('refuses an unknown wrong model in its test-only variable', () => {
    expect(() => parseWrong('walk=nonesuch')).toThrow(/unknown wrong model 'walk=nonesuch'/);
    expect(parseWrong('walk=ignore-wp,tdp=zapOneShort')).toEqual({
      walk: new Set(['ignore-wp']),
      tdp: { zapOneShort: true },
    });
  });
});

describe('fuzz --json summary', () => {
  const sum: CampaignSummary = {
    seed: 1,
    shard: { index: 1, count: 2 },
    cases: 3,
    steps: 20,
    durationMs: 1500,
    outcomes: { pass: 1, fail: 1, notApplicable: 1, error: 0, invalid: 0 },
    notApplicable: { 'a race needs vCPU threads': 1 },
    findings: [],
    ended: 'cases',
    trace: true,
  };
  const profile = { flavour: 'kvm_pvm', tdp: { enabled: false, kind: 'none' }, tdpMmu: false } as HostProfile;

  it('matches docs/fuzz.schema.json', () => {
    expect(problems(summaryJson(sum, profile, []))).toEqual([]);
  });

  it('is refused by the schema with a field it does not describe, or a wrong version', () => {
    expect(problems({ ...summaryJson(sum, profile, []), extra: 1 })).not.toEqual([]);
    expect(problems({ ...summaryJson(sum, profile, []), version: 2 })).not.toEqual([]);
  });
});

describeKvm('kvmharness fuzz on this host', () => {
  const tmp = mkdtempSync(join(tmpdir(), 'kvmharness-fuzz-'));
  afterAll(() => rmSync(tmp, { recursive: true, force: true }));

  const fuzz = (out: string, args: string[], env: Record<string, string> = {}) => {
    const r = cli(['fuzz', '--json', '--out', join(tmp, out), ...args], env);
    const doc = JSON.parse(r.stdout) as {
      cases: number;
      steps: number;
      findings: {
        signature: string;
        steps: number;
        originalSteps: number;
        dir: string;
        reproducer?: { written: boolean; exitCode?: number; note?: string };
      }[];
    };
    expect(problems(doc)).toEqual([]);
    return { ...r, doc };
  };

  /** The kinds of the failing comparisons of `run FILE --json`. */
  const runKinds = (file: string, env: Record<string, string> = {}) => {
    const r = cli(['run', file, '--json'], env);
    const report = JSON.parse(r.stdout) as { checks: CheckResult[] };
    return {
      status: r.status,
      kinds: report.checks.flatMap((c) => c.comparisons.filter((x) => !x.ok).map((x) => comparisonKind(x.what))),
    };
  };

  it.each([
    ['walk=dirty-on-read', 4],
    ['walk=ignore-wp', 20],
  ])(
    'with the wrong model %s finds a mismatch, shrinks it, and run FILE fails the same way (only) under that model',
    (wrong, cases) => {
      const env = { KVMHARNESS_WRONG_MODEL: wrong };
      const r = fuzz(wrong, ['--cases', String(cases), '--seed', '1'], env);
      expect(r.status).toBe(1);
      expect(r.doc.findings.length).toBeGreaterThan(0);
      for (const f of r.doc.findings) {
        console.log(`${wrong}: ${f.signature}: ${f.steps} steps, shrunk from ${f.originalSteps}`);
        expect(f.steps).toBeLessThanOrEqual(4);
        expect(f.steps).toBeLessThanOrEqual(f.originalSteps);
        const file = join(f.dir, 'scenario.json');
        expect(readdirSync(f.dir)).toEqual(
          expect.arrayContaining(['scenario.json', 'original.json', 'mismatch.txt', 'mismatch.json']),
        );
        // The C reproducer shows the wrong model's claim failing on KVM: exit 1.
        expect(f.reproducer).toEqual({ written: true, exitCode: 1 });
        const wrongRun = runKinds(file, env);
        expect(wrongRun.status).toBe(1);
        expect(wrongRun.kinds).toContain(f.signature);
        const rightRun = runKinds(file);
        expect(rightRun).toEqual({ status: 0, kinds: [] });
      }
    },
    300_000,
  );

  it('shrinks deterministically: the same seed gives the same shrunk scenario', () => {
    const env = { KVMHARNESS_WRONG_MODEL: 'walk=dirty-on-read' };
    const a = fuzz('det-a', ['--cases', '2', '--seed', '1'], env);
    const b = fuzz('det-b', ['--cases', '2', '--seed', '1'], env);
    expect(a.doc.findings.length).toBeGreaterThan(0);
    const files = (d: typeof a.doc) =>
      d.findings.map((f) => {
        const j = JSON.parse(readFileSync(join(f.dir, 'scenario.json'), 'utf8')) as Record<string, unknown>;
        return { ...j, description: '' };
      });
    expect(files(b.doc)).toEqual(files(a.doc));
    expect(b.doc.steps).toBe(a.doc.steps);
  }, 300_000);

  it('finds nothing with the right model in a short campaign; the shards cover its steps', () => {
    const whole = fuzz('right', ['--cases', '6', '--seed', '2']);
    expect(whole.status).toBe(0);
    expect(whole.doc.findings).toEqual([]);
    expect(whole.doc.cases).toBe(6);
    const one = fuzz('right-1', ['--cases', '3', '--seed', '2', '--shard', '1/2']);
    const two = fuzz('right-2', ['--cases', '3', '--seed', '2', '--shard', '2/2']);
    expect(one.doc.steps + two.doc.steps).toBe(whole.doc.steps);
  }, 300_000);
});

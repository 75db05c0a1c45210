// The C reproducer (src/fuzz/repro-c.ts): it builds with gcc -Wall -Werror
// and exits 0 where the scenario passes; with a deliberately wrong model it
// exits 1 naming the step and field that the engine itself reports with the
// same model; a finding of this host's KVM exits 1 here.
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { buildAndRun, C_FIELDS, parseMismatch, reproducer, ReproUnsupported } from '../src/fuzz/repro-c.js';
import type { Kvm } from '../src/kvm/kvm.js';
import type { WrongWalk } from '../src/model/wrong.js';
import type { HostProfile } from '../src/probe/probe.js';
import { scenarioCheck } from '../src/run/engine.js';
import { runCheck } from '../src/run/runner.js';
import { loadScenario, resolveScenario } from '../src/scenario/load.js';
import type { Scenario } from '../src/scenario/types.js';
import { describeKvm, withHost } from './support/kvm.js';

const load = (name: string): Scenario => loadScenario(resolveScenario(name));
const finding = (name: string): Scenario =>
  loadScenario(join(import.meta.dirname, '..', 'guests', 'findings', `${name}.json`));
/** The scenario with its explicit access expectations dropped, so that the model decides every one. */
const bare = (sc: Scenario): Scenario => ({
  ...sc,
  steps: sc.steps.map((s) => (s.side === 'guest' && s.kind === 'access' ? { ...s, expect: undefined } : s)),
});
const CLI = join(import.meta.dirname, '..', 'dist', 'src', 'cli', 'bin.js');

describe('mismatch names', () => {
  it("parses the engine's comparison names into step and field", () => {
    expect(parseMismatch('step 4 read64 0x8000000000 cpl3: exceptions')).toEqual({ step: 4, field: 'exceptions' });
    expect(parseMismatch('step 12 host get-dirty-log: dirty pages')).toEqual({ step: 12, field: 'dirty pages' });
    expect(parseMismatch('step 3 write32 0x1000 cpl0: redone: value in memory')).toEqual({
      step: 3,
      field: 'redone: value in memory',
    });
    expect(parseMismatch('guest finishes')).toBeUndefined();
  });
});

describeKvm('C reproducers on this host', () => {
  let profile: HostProfile;
  let kvm: Kvm;
  withHost((k, p) => {
    kvm = k;
    profile = p;
  });

  it('refuses what it cannot carry, in one line', () => {
    const race = load('race_dirty_log_dontneed');
    expect(() => reproducer(race, { profile })).toThrow(ReproUnsupported);
    expect(() => reproducer(race, { profile })).toThrow(/races of several vCPUs/);
    expect(() => reproducer(load('guest_memfd_shared'), { profile })).toThrow(/guest_memfd slots are not carried/);
    const sc = load('dirty_log');
    expect(() => reproducer(sc, { profile, mismatch: { step: 3, field: 'stats remote_tlb_flush_requests' } })).toThrow(
      /not checked by a C reproducer/,
    );
    expect(() => reproducer(sc, { profile, mismatch: { step: 1, field: 'KVM walker trace' } })).toThrow(
      ReproUnsupported,
    );
    expect(() => reproducer(sc, { profile, mismatch: { step: 99 } })).toThrow(/no step 99/);
    // Stats expectations are listed as left out, not silently dropped.
    expect(reproducer(sc, { profile }).omitted.join('\n')).toMatch(/step 3 host get-dirty-log: stats/);
  });

  it('ends the program after the step of the mismatch', () => {
    const sc = load('accessed_dirty');
    const r = reproducer(sc, { profile, mismatch: { step: 1, field: 'PTEs after' } });
    expect(r.steps).toBe(2);
    expect(r.source).toContain('step = "step 1 ');
    expect(r.source).not.toContain('step = "step 2 ');
  });

  // Scenarios that pass here, one of each kind of host step and backing.
  const passing = [
    'accessed_dirty',
    'dirty_log_manual_clear',
    'dirty_log_thp',
    'madvise_refault',
    'memslot_delete',
    'memslot_move',
    'mmio_unbacked',
    'mprotect_backing',
    'munmap_remap',
    'reserved_bits',
    'shadow_vmm_pte_write_zap',
    'user_supervisor',
  ];
  for (const name of passing) {
    it(`${name}: builds with -Wall -Werror and exits 0 where the scenario passes`, async () => {
      const sc = load(name);
      const engine = await runCheck(scenarioCheck(sc), kvm, profile);
      const r = await buildAndRun(reproducer(sc, { profile }).source);
      expect(r.stderr).not.toMatch(/error|warning/);
      if (engine.outcome === 'not_applicable') return;
      expect(engine.outcome).toBe('pass');
      expect(r.exitCode, r.stdout).toBe(0);
      expect(r.stdout).toMatch(/^ok: /m);
    });
  }

  // Each wrong walk model the engine's tests use: the program exits 1 at the
  // first comparison the engine itself fails with that model.
  const wrong: [string, WrongWalk][] = [
    ['write_protect', 'ignore-wp'],
    ['accessed_dirty', 'dirty-on-read'],
    ['accessed_dirty', 'no-accessed-on-upper'],
    ['nx', 'ignore-nx'],
    ['reserved_bits', 'rsvd-as-not-present'],
  ];
  for (const [name, mistake] of wrong) {
    it(`${name}: with '${mistake}' it exits 1 naming the step and field the engine reports`, async () => {
      const sc = bare(load(name));
      const w = { walk: new Set([mistake]) };
      const engine = await runCheck(scenarioCheck(sc, { wrong: w }), kvm, profile);
      const first = engine.comparisons.find((c) => !c.ok);
      expect(first, 'the engine reports the wrong model').toBeDefined();
      const mm = parseMismatch(first!.what)!;
      expect(C_FIELDS).toContain(mm.field);
      const r = await buildAndRun(reproducer(sc, { profile, wrong: w }).source);
      expect(r.exitCode, r.stdout + r.stderr).toBe(1);
      const line = r.stdout.trim().split('\n').at(-1)!;
      expect(line.startsWith(`MISMATCH step ${mm.step} `), line).toBe(true);
      expect(line).toContain(`: ${mm.field}: `);
      // Generated for that mismatch alone, it reproduces it too.
      const only = await buildAndRun(reproducer(sc, { profile, wrong: w, mismatch: mm }).source);
      expect(only.exitCode).toBe(1);
      expect(only.stdout.trim()).toBe(line);
    });
  }

  it('a finding of this host exits 1 at the step and field the engine fails', async (ctx) => {
    if (profile.flavour !== 'kvm_pvm') ctx.skip();
    const sc = finding('shadow_stale_after_vmm_pte_write');
    const engine = await runCheck(scenarioCheck(sc), kvm, profile);
    expect(engine.outcome).toBe('fail');
    const mm = parseMismatch(engine.comparisons.find((c) => !c.ok)!.what)!;
    const r = await buildAndRun(reproducer(sc, { profile }).source);
    expect(r.exitCode, r.stdout).toBe(1);
    expect(r.stdout).toMatch(new RegExp(`^MISMATCH step ${mm.step} [^:]*: ${mm.field}: `, 'm'));
  });

  it('kvmharness repro writes the program, runs it, and refuses bad input in one line', () => {
    const cli = (...args: string[]) => spawnSync(process.execPath, [CLI, 'repro', ...args], { encoding: 'utf8' });
    const ok = cli('nx', '--run');
    expect(ok.status, ok.stdout + ok.stderr).toBe(0);
    expect(ok.stdout).toMatch(/^ok: nx: /m);
    const src = cli('nx');
    expect(src.status).toBe(0);
    expect(src.stdout).toMatch(/#include <linux\/kvm.h>/);
    const race = cli('race_dirty_log_dontneed');
    expect(race.status).toBe(2);
    expect(race.stderr.trim().split('\n')).toHaveLength(1);
    const missing = cli('/nonexistent/x.json');
    expect(missing.status).toBe(2);
    expect(missing.stderr.trim().split('\n')).toHaveLength(1);
  });
});

// The scenario features the fuzzer generates, in the C reproducer
// (src/fuzz/repro-c.ts): guest loops, host steps over GPA ranges,
// write-memory and read-memory, memslot-create, partial KVM_CLEAR_DIRTY_LOG
// and placed slots. Each program builds and exits 0 where the engine passes;
// with a deliberately wrong model (or expectation) it exits 1 at the step and
// field the engine itself fails.
import { describe, expect, it } from 'vitest';
import { casePlan } from '../src/fuzz/campaign.js';
import { genHostOf, realise } from '../src/fuzz/gen.js';
import { buildAndRun, cChecks, parseMismatch, reproducer, ReproUnsupported } from '../src/fuzz/repro-c.js';
import type { Kvm } from '../src/kvm/kvm.js';
import type { Wrong } from '../src/model/wrong.js';
import type { HostProfile } from '../src/probe/probe.js';
import { scenarioCheck } from '../src/run/engine.js';
import { runCheck } from '../src/run/runner.js';
import { loadScenario, resolveScenario, validateScenario } from '../src/scenario/load.js';
import type { Scenario } from '../src/scenario/types.js';
import { describeKvm, withHost } from './support/kvm.js';

const load = (name: string): Scenario => loadScenario(resolveScenario(name));
const inline = (json: object): Scenario => {
  const v = validateScenario({ description: 'A test scenario.', arch: 'x86_64', ...json });
  if (!v.ok) throw new Error(v.errors.join('\n'));
  return v.scenario;
};
/** The scenario with one step's explicit value expectation replaced. */
const expecting = (sc: Scenario, step: number, value: bigint): Scenario => ({
  ...sc,
  steps: sc.steps.map((s, i) => {
    if (i !== step) return s;
    if (s.side === 'host' && s.kind === 'read-memory') return { ...s, expect: value };
    if (s.side === 'guest' && s.kind === 'access') return { ...s, expect: { ...s.expect, value } };
    throw new Error(`step ${step} has no value to expect`);
  }),
});

describe('C field names', () => {
  it('takes the fields whose names carry a count, a slot or a range', () => {
    expect(cChecks('paging entries after (3)')).toBe(true);
    expect(cChecks('dirty pages of slot 2 in 0x1200000..0x1240000')).toBe(true);
    expect(cChecks('KVM_CLEAR_DIRTY_LOG of slot 1 pages [64, 74)')).toBe(true);
    expect(cChecks('sum of the values read')).toBe(true);
    expect(cChecks('value the VMM reads')).toBe(true);
    expect(cChecks('paging entries after')).toBe(false);
    expect(cChecks('stats pages_2m')).toBe(false);
  });
});

describeKvm('C reproducers of the features the fuzzer generates', () => {
  let profile: HostProfile;
  let kvm: Kvm;
  withHost((k, p) => {
    kvm = k;
    profile = p;
  });

  /** The engine's outcome and the program's, under the same model; the program must end as the engine does. */
  async function agree(sc: Scenario, wrong?: Wrong): Promise<{ outcome: string; stdout: string }> {
    const engine = await runCheck(scenarioCheck(sc, { wrong, shadowFollow: false, tdpFollow: false }), kvm, profile);
    const r = await buildAndRun(reproducer(sc, { profile, wrong }).source);
    expect(r.stderr, 'builds without warnings').not.toMatch(/error|warning/);
    if (engine.outcome === 'not_applicable') return { outcome: engine.outcome, stdout: r.stdout };
    if (engine.outcome === 'pass') {
      expect(r.exitCode, r.stdout).toBe(0);
      expect(r.stdout).toMatch(/^ok: /m);
      return { outcome: 'pass', stdout: r.stdout };
    }
    expect(engine.outcome, engine.reason).toBe('fail');
    const mm = parseMismatch(engine.comparisons.find((c) => !c.ok)!.what)!;
    expect(cChecks(mm.field!), mm.field).toBe(true);
    expect(r.exitCode, r.stdout + r.stderr).toBe(1);
    const line = r.stdout.trim().split('\n').at(-1)!;
    expect(line.startsWith(`MISMATCH step ${mm.step} `), line).toBe(true);
    expect(line).toContain(`: ${mm.field}: `);
    return { outcome: 'fail', stdout: r.stdout };
  }

  // A host write to the tables with no invalidation since: the old translation is allowed in C as in
  // the engine; after a CR3 load it is not (the program then holds the strict expectation alone).
  it('allows the old translation after a host table write until a CR3 load, as the engine does', async () => {
    const sc = (invalidate: boolean) =>
      inline({
        name: invalidate ? 'stale_after_cr3' : 'stale_allowed',
        memslots: [{ slot: 1, gpa: '0xf000000', size: '0x10000' }],
        mappings: [{ gva: '0x8000001000', gpa: '0xf000000', size: '0x1000', leaf: { w: true, u: true } }],
        steps: [
          { guest: 'read', gva: '0x8000001000', cpl: 3 },
          { host: 'write-pte', gva: '0x8000001000', level: 2, set: '0x8000000000000' },
          ...(invalidate ? [{ guest: 'reload-cr3' }] : []),
          { guest: 'read', gva: '0x8000001008', cpl: 3 },
        ],
      });
    const lenient = reproducer(sc(false), { profile }).source;
    expect(lenient).toContain('the old translation (GPA 0xf000008) is allowed');
    expect(lenient).toContain('expect_value("value read (old translation)", 8, 0x0ULL, st.rsi);');
    expect((await agree(sc(false))).outcome).toBe('pass');
    const strict = reproducer(sc(true), { profile }).source;
    expect(strict).not.toContain('old translation');
    await agree(sc(true));
  });

  // Built-in scenarios, one or more features each; all pass on this host.
  const passing: [string, string][] = [
    ['dirty_log_every_page', 'write and read loops over 130 pages, strided loops'],
    ['host_range_across_slots', 'dirty-log get, clear and madvise over GPA ranges across two slots'],
    ['dirty_log_clear_range', 'partial KVM_CLEAR_DIRTY_LOG, refused ones (EINVAL) included'],
    ['memslot_create_over_mmio', 'memslot-create over MMIO, write-memory'],
    ['vma_split_notifies_2m', 'placed slots (2 MiB, offsets 0 and 4 KiB), mprotect and madvise'],
    ['dirty_log_edges_before_logging', 'a placed THP slot, a 512-page loop, write-memory'],
  ];
  for (const [name, what] of passing) {
    it(`${name} (${what}): exits 0 where the engine passes`, async () => {
      const { outcome } = await agree(load(name));
      expect(outcome).toBe('pass');
    });
  }

  // A wrong model whose claim a carried feature's check exposes.
  const wrong: [string, string, Wrong, string][] = [
    // The loop's walks: A on the upper entries, checked over every entry the loop used.
    ['dirty_log_every_page', 'a loop', { walk: new Set(['no-accessed-on-upper']) }, 'paging entries after'],
    // A dirty-log get over a GPA range with manual protect: the pages stay until a clear.
    ['host_range_across_slots', 'a GPA range', { vm: { getForgetsManual: true } }, 'dirty pages of slot'],
    // Only the cleared part of the bitmap is taken back.
    ['dirty_log_clear_range', 'a partial clear', { vm: { getForgetsManual: true } }, 'dirty pages'],
  ];
  for (const [name, feature, w, field] of wrong) {
    it(`${name}: ${feature} under a wrong model exits 1 where the engine fails`, async () => {
      const { outcome, stdout } = await agree(load(name), w);
      expect(outcome).toBe('fail');
      expect(stdout).toContain(`: ${field}`);
    });
  }

  it('a loop that faults: the exception ends it, and a wrong NX rule is exposed', async () => {
    // Four pages, the third not executable: the loop of calls stops there.
    const sc = inline({
      name: 'loop_exec_nx',
      memslots: [{ slot: 1, gpa: '0x1000000', size: '0x4000' }],
      mappings: [
        { gva: '0x8000000000', gpa: '0x1000000', size: '0x2000' },
        { gva: '0x8000002000', gpa: '0x1002000', size: '0x1000', leaf: { nx: true } },
        { gva: '0x8000003000', gpa: '0x1003000', size: '0x1000' },
      ],
      steps: [
        { guest: 'exec', gva: '0x8000000000', count: 4 },
        { guest: 'read', gva: '0x8000000000', count: 2 },
      ],
    });
    expect((await agree(sc)).outcome).toBe('pass');
    const bad = await agree(sc, { walk: new Set(['ignore-nx']) });
    expect(bad.outcome).toBe('fail');
    expect(bad.stdout).toMatch(/^MISMATCH step 0 exec8 0x8000000000 cpl0: exceptions: /m);
  });

  it('write-memory and memslot-create: a wrong value expected after them is exposed', async () => {
    const sc = load('memslot_create_over_mmio');
    // Step 4 reads the value write-memory stored in the slot memslot-create made.
    const bad = await agree(expecting(sc, 4, 0x1122334455667789n));
    expect(bad.outcome).toBe('fail');
    expect(bad.stdout).toMatch(/^MISMATCH step 4 read64 0x8000001ff8 cpl0: value read: /m);
  });

  // A memfd slot placed 4 KiB into its file's mapping: the hole and the remap are at the slot's own offsets in the file.
  it('read-memory, punch-hole and remap of a placed memfd slot: the VMM reads what the file holds', async () => {
    const sc = inline({
      name: 'read_memory_punch_hole',
      memslots: [
        { slot: 1, gpa: '0x1000000', size: '0x4000', backing: 'memfd', hva: { modulo: '2M', offset: '0x1000' } },
      ],
      mappings: [{ gva: '0x8000000000', gpa: '0x1000000', size: '0x4000', leaf: { w: true } }],
      steps: [
        { guest: 'write', gva: '0x8000001008', value: '0x1234567890abcdef' },
        { host: 'read-memory', gpa: '0x1001008', size: 8, expect: '0x1234567890abcdef' },
        { host: 'read-memory', gpa: '0x100100c', size: 2, expect: '0x5678' },
        { host: 'punch-hole', slot: 1, offset: '0x1000', size: '0x1000' },
        { guest: 'read', gva: '0x8000001008' },
        { host: 'read-memory', gpa: '0x1001008', size: 8, expect: '0x0' },
        { guest: 'write', gva: '0x8000002010', value: '0x77' },
        { host: 'munmap', slot: 1, offset: '0x2000', size: '0x1000' },
        { host: 'remap', slot: 1, offset: '0x2000', size: '0x1000' },
        { host: 'read-memory', gpa: '0x1002010', size: 8, expect: '0x77' },
        { guest: 'read', gva: '0x8000002010' },
      ],
    });
    expect((await agree(sc)).outcome).toBe('pass');
    const bad = await agree(expecting(sc, 2, 0x5679n));
    expect(bad.stdout).toMatch(
      /^MISMATCH step 2 host read-memory: value the VMM reads: expected 0x5679, observed 0x5678$/m,
    );
  });

  it('places a slot as "hva" asks: (HVA - GPA) mod 2 MiB is the offset', async () => {
    const sc = load('vma_split_notifies_2m');
    const repro = reproducer(sc, { profile });
    // Its per-GFN expectations are listed as left out, not silently dropped.
    expect(repro.omitted.join('\n')).toMatch(/step 2 host mprotect: tdp 0x1000000, 0x1180000/);
    const r = await buildAndRun(repro.source);
    expect(r.exitCode, r.stdout).toBe(0);
    const placed = [...r.stdout.matchAll(/^memslot (\d+): HVA (0x[0-9a-f]+), GPA (0x[0-9a-f]+), placed: /gm)];
    expect(placed.map((m) => Number(m[1]))).toEqual([1, 2]);
    for (const [, slot, hva, gpa] of placed) {
      const want = sc.memslots.find((m) => m.slot === Number(slot))!.hva!.offset;
      expect((BigInt(hva!) - BigInt(gpa!)) % (2n << 20n), `slot ${slot}`).toBe(want);
    }
  });

  it('still refuses tables in a user slot in one line', () => {
    const sc = load('dirty_log_every_page');
    const withTables = { ...sc, mappings: sc.mappings.map((m) => ({ ...m, tables: { slot: 1, offset: 0n } })) };
    expect(() => reproducer(withTables, { profile })).toThrow(ReproUnsupported);
    expect(() => reproducer(withTables, { profile })).toThrow(/page tables in a user slot are not carried/);
  });

  it("the fuzzer's first single-vCPU cases: each program ends as the engine does", async () => {
    const host = { ...genHostOf(profile), guestMemfd: false };
    let carried = 0;
    for (let k = 0; k < 24; k++) {
      const r = realise(casePlan(host, 7, k), host, `fuzz_s7_c${k}`);
      if (!r.ok || r.scenario.race) continue;
      await agree(r.scenario);
      carried++;
    }
    expect(carried).toBeGreaterThan(15);
  }, 300_000);
});

import { spawn } from 'node:child_process';
import { existsSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { Kvm } from '../src/kvm/kvm.js';
import type { WrongShadow, WrongWalk } from '../src/model/wrong.js';
import type { HostProfile } from '../src/probe/probe.js';
import { scenarioCheck } from '../src/run/engine.js';
import { runCheck } from '../src/run/runner.js';
import { judge, LOOP_LIMIT } from '../src/fuzz/oracle.js';
import { builtinScenarios, loadScenario, resolveScenario, validateScenario } from '../src/scenario/load.js';
import type { Scenario } from '../src/scenario/types.js';
import { parseFormat, parseTrace, TRACEFS, type TraceEvent } from '../src/observe/tracefs.js';
import { tracedWalks } from '../src/observe/walker-trace.js';
import { describeKvm, failures, withHost } from './support/kvm.js';
import { wrong as wrongValue } from './support/wrong.js';

const WALK_FORMAT = `name: kvm_mmu_pagetable_walk
ID: 1
format:
	field:unsigned short common_type;	offset:0;	size:2;	signed:0;
	field:int common_pid;	offset:4;	size:4;	signed:1;

	field:__u64 addr;	offset:8;	size:8;	signed:0;
	field:__u32 pferr;	offset:16;	size:4;	signed:0;

print fmt: "addr %llx pferr %x %s", REC->addr, REC->pferr, __print_flags(REC->pferr, "|", { ((((1UL))) << (0)), "P" })
`;
const ELEMENT_FORMAT = `name: kvm_mmu_paging_element
format:
	field:__u64 pte;	offset:8;	size:8;	signed:0;
	field:__u32 level;	offset:16;	size:4;	signed:0;

print fmt: "pte %llx level %u", REC->pte, REC->level
`;

describe('tracefs parsing', () => {
  it('reads fields and builds a matcher from the print fmt', () => {
    const f = parseFormat('kvmmmu/kvm_mmu_pagetable_walk', WALK_FORMAT);
    expect(f.fields.map((x) => [x.name, x.offset, x.size])).toEqual([
      ['addr', 8, 8],
      ['pferr', 16, 4],
    ]);
    expect(f.printArgs).toEqual(['addr', 'pferr']); // the flags decoding is a call, not a field
    expect(f.parse!('addr 7000000 pferr 2 W')).toEqual({ addr: 0x7000000n, pferr: 2n });
    expect(f.parse!('something else')).toBeUndefined();
  });

  it('parses trace lines into events and groups walks', () => {
    const formats = new Map([
      ['kvmmmu/kvm_mmu_pagetable_walk', parseFormat('kvmmmu/kvm_mmu_pagetable_walk', WALK_FORMAT)],
      ['kvmmmu/kvm_mmu_paging_element', parseFormat('kvmmmu/kvm_mmu_paging_element', ELEMENT_FORMAT)],
    ]);
    const text = [
      '# tracer: nop',
      '            node-27011   [000] .....   652.775399: kvm_mmu_pagetable_walk: addr 7000000 pferr 0 ',
      '            node-27011   [000] .....   652.775399: kvm_mmu_paging_element: pte 11027 level 4',
      '            node-27011   [001] .....   652.775400: kvm_mmu_paging_element: pte 0 level 3',
    ].join('\n');
    const ev = parseTrace(text, formats);
    expect(ev.map((e) => [e.id, e.pid, e.cpu])).toEqual([
      ['kvmmmu/kvm_mmu_pagetable_walk', 27011, 0],
      ['kvmmmu/kvm_mmu_paging_element', 27011, 0],
      ['kvmmmu/kvm_mmu_paging_element', 27011, 1],
    ]);
    const extra: TraceEvent[] = [
      { id: 'kvmmmu/kvm_mmu_walker_error', pid: 1, cpu: 0, ts: 0, fields: { pferr: 0n }, text: '' },
    ];
    expect(tracedWalks([...ev, ...extra])).toEqual([
      {
        addr: 0x7000000n,
        pferr: 0,
        elements: [
          { level: 4, pte: 0x11027n },
          { level: 3, pte: 0n },
        ],
        error: 0,
        accessed: [],
        dirty: [],
      },
    ]);
  });
});

const ours = () =>
  existsSync(join(TRACEFS, 'instances'))
    ? readdirSync(join(TRACEFS, 'instances')).filter((d) => d.startsWith(`kvmharness-${process.pid}-`))
    : [];

describeKvm('scenarios on this host', () => {
  let kvm: Kvm;
  let profile: HostProfile;
  const load = (name: string): Scenario => loadScenario(resolveScenario(name));
  withHost((k, p) => {
    kvm = k;
    profile = p;
  });

  for (const name of builtinScenarios()) {
    for (const trace of [false, true]) {
      it(`${name}${trace ? ' (walker trace)' : ''} passes or says why it cannot run here`, async () => {
        const r = await runCheck(scenarioCheck(load(name), { trace }), kvm, profile);
        const why = failures(r);
        expect(['pass', 'not_applicable'], why).toContain(r.outcome);
        if (r.outcome === 'not_applicable') expect(r.reason).toMatch(/\S/);
      });
    }
  }

  it('leaves no tracefs instance behind', () => {
    expect(ours()).toEqual([]);
  });

  // A deliberately wrong model must be caught by each oracle: the exception
  // log (error codes), the A/D read-back, and KVM's walker tracepoints.
  const wrong: [string, WrongWalk, RegExp][] = [
    ['write_protect', 'ignore-wp', /exceptions/],
    ['accessed_dirty', 'dirty-on-read', /PTEs after/],
    ['accessed_dirty', 'no-accessed-on-upper', /PTEs after/],
    ['nx', 'ignore-nx', /exceptions/],
    ['reserved_bits', 'rsvd-as-not-present', /exceptions/],
  ];
  for (const [name, mistake, oracle] of wrong) {
    it(`${name}: a model with '${mistake}' is reported by the direct oracles and by the walker trace`, async () => {
      const sc = load(name);
      // Explicit expectations override the model; drop them so that the model decides.
      const bare: Scenario = {
        ...sc,
        steps: sc.steps.map((s) => (s.side === 'guest' && s.kind === 'access' ? { ...s, expect: undefined } : s)),
      };
      const direct = await runCheck(scenarioCheck(bare, { wrong: { walk: new Set([mistake]) } }), kvm, profile);
      expect(direct.outcome).toBe('fail');
      expect(
        direct.comparisons
          .filter((c) => !c.ok)
          .map((c) => c.what)
          .join('\n'),
      ).toMatch(oracle);
      const traced = await runCheck(
        scenarioCheck(bare, { wrong: { walk: new Set([mistake]) }, trace: true }),
        kvm,
        profile,
      );
      if (traced.outcome === 'not_applicable') return;
      expect(
        traced.comparisons
          .filter((c) => !c.ok)
          .map((c) => c.what)
          .join('\n'),
      ).toMatch(/KVM walker trace/);
    });
  }

  // Observations KVM could wrongly produce, fed to each oracle of a scenario in
  // turn: each must fail the check naming exactly the comparison it spoiled.
  type Fault = { vector: number; errorCode: bigint; cr2: bigint };
  type Pte = { level: number; at: bigint; value: bigint };
  type Trace = { accessed: bigint[]; dirty: bigint[] };
  const KVM_MISTAKES: [string, RegExp, (o: unknown) => unknown | undefined][] = [
    // CR2 of the page rather than of the byte (or, at a page-aligned address, the byte after it).
    [
      'a page-aligned CR2',
      /: exceptions$/,
      (o) => {
        const log = o as Fault[];
        if (log.length === 0) return undefined;
        const cr2 = log[0]!.cr2 & 0xfffn ? log[0]!.cr2 & ~0xfffn : log[0]!.cr2 | 8n;
        return [{ ...log[0]!, cr2 }, ...log.slice(1)];
      },
    ],
    [
      'one flipped error-code flag',
      /: exceptions$/,
      (o) => {
        const log = o as Fault[];
        return log.length ? [{ ...log[0]!, errorCode: log[0]!.errorCode ^ 2n }, ...log.slice(1)] : undefined;
      },
    ],
    [
      'a missing A bit',
      /: PTEs after$/,
      (o) => {
        const ptes = o as Pte[];
        const i = ptes.findIndex((p) => p.value & 0x20n);
        return i < 0 ? undefined : ptes.map((p, j) => (j === i ? { ...p, value: p.value & ~0x20n } : p));
      },
    ],
    [
      'an extra D bit',
      /: PTEs after$/,
      (o) => {
        const ptes = o as Pte[];
        const i = ptes.findIndex((p) => p.level === 1 && p.value & 1n && !(p.value & 0x40n));
        return i < 0 ? undefined : ptes.map((p, j) => (j === i ? { ...p, value: p.value | 0x40n } : p));
      },
    ],
    [
      'an extra dirty page',
      /: dirty pages$/,
      (o) => {
        const pages = o as string[];
        const last = pages.length ? BigInt(pages.at(-1)!) : 0x1000n;
        return [...pages, `0x${(last + 0x1000n).toString(16)}`];
      },
    ],
    ['a missing dirty page', /: dirty pages$/, (o) => ((o as string[]).length ? (o as string[]).slice(1) : undefined)],
    [
      'a missing A bit in the walker trace',
      /: KVM walker trace$/,
      (o) => {
        const t = o as Trace;
        return typeof o === 'object' && t.accessed.length ? { ...t, accessed: t.accessed.slice(1) } : undefined;
      },
    ],
    [
      'an extra D bit in the walker trace',
      /: KVM walker trace$/,
      (o) => {
        const t = o as Trace;
        return typeof o === 'object' && t.accessed.length ? { ...t, dirty: [...t.dirty, t.accessed[0]!] } : undefined;
      },
    ],
  ];
  const mistakesFed = new Set<string>();
  for (const [name, trace] of [
    ['write_protect', false],
    ['accessed_dirty', true],
    ['dirty_log', false],
    ['nx', true],
  ] as const) {
    it(`${name}${trace ? ' (traced)' : ''}: every oracle reports observations KVM could wrongly produce`, async () => {
      const check = scenarioCheck(load(name), { trace });
      const clean = await runCheck(check, kvm, profile);
      if (clean.outcome === 'not_applicable') return;
      expect(clean.outcome, failures(clean)).toBe('pass');
      let fed = 0;
      for (const [mistake, at, tamper] of KVM_MISTAKES) {
        // The first comparison the mistake matches and applies to.
        for (const target of clean.comparisons.map((c) => c.what).filter((w) => at.test(w))) {
          let applied = false;
          const r = await runCheck(check, kvm, profile, {
            wrongObservation: (_c, what, o) => {
              if (what !== target) return o;
              const t = tamper(o);
              applied = t !== undefined;
              return applied ? t : o;
            },
          });
          if (!applied) continue;
          fed++;
          mistakesFed.add(mistake);
          expect(r.outcome, `${mistake} at '${target}'`).toBe('fail');
          expect(
            r.comparisons.filter((c) => !c.ok).map((c) => c.what),
            mistake,
          ).toEqual([target]);
          break;
        }
      }
      expect(fed).toBeGreaterThan(0);
    });
  }

  it('fed each of those observations to some oracle', () => {
    expect([...mistakesFed].sort()).toEqual(KVM_MISTAKES.map(([m]) => m).sort());
  });

  it('pdpte_ps: a PS=1 PDPTE is checked live, as a reserved-bit fault on a host without 1 GiB pages', async () => {
    for (const trace of [false, true]) {
      const r = await runCheck(scenarioCheck(load('pdpte_ps'), { trace }), kvm, profile);
      if (trace && r.outcome === 'not_applicable') continue;
      expect(r.outcome, failures(r)).toBe('pass');
      const faults = r.comparisons.filter((c) => c.what.endsWith(': exceptions')).map((c) => c.expected);
      if (!profile.cpu!.pdpe1gb) {
        expect(faults).toEqual(
          [0x9, 0xb, 0xd].map((ec) => `[{cr2: 0x8000000010, errorCode: 0x${ec.toString(16)}, vector: 14}]`),
        );
      }
    }
  });

  it('an implicit read is a descriptor load at its gva: it faults where the page is absent and reads nothing', async () => {
    const sc = load('smap_implicit');
    // Without SMAP (not needed for this): one user page, one not-present page.
    const base = { ...sc, paging: { ...sc.paging, cr4: { ...sc.paging.cr4, smap: false } } };
    const m = sc.mappings[1]!;
    const mappings = [sc.mappings[0]!, { ...m, leaf: { ...m.leaf, p: false } }];
    const read = (gva: bigint, eflagsAc: boolean) => ({
      side: 'guest' as const,
      kind: 'access' as const,
      access: 'read' as const,
      gva,
      size: 8 as const,
      cpl: 0 as const,
      value: 0n,
      eflagsAc,
      implicit: true,
    });
    const steps = [read(0x8000000200n, false), read(0x8000001200n, true), read(0x8000000208n, true)];
    const r = await runCheck(scenarioCheck({ ...base, mappings, steps }), kvm, profile);
    expect(r.outcome, failures(r)).toBe('pass');
    const faults = r.comparisons.filter((c) => c.what.endsWith(': exceptions')).map((c) => c.observed);
    expect(faults).toEqual(['[]', '[{cr2: 0x8000001200, errorCode: 0x0, vector: 14}]', '[]']);
    expect(r.comparisons.some((c) => c.what.includes('value read'))).toBe(false);
  });

  it('reports a wrong explicit expectation', async () => {
    const sc = load('write_protect');
    const i = sc.steps.findIndex((s) => s.side === 'guest' && s.kind === 'access');
    const steps = sc.steps.map((s, j) =>
      j === i && s.side === 'guest' && s.kind === 'access' ? { ...s, expect: { fault: 0x4 as const } } : s,
    );
    const r = await runCheck(scenarioCheck({ ...sc, steps }), kvm, profile);
    expect(r.outcome).toBe('fail');
    expect(r.comparisons.filter((c) => !c.ok).map((c) => c.what)).toContain(
      `step ${i} ${(steps[i] as { access: string }).access}${8 * (steps[i] as { size: number }).size} ${'0x' + (steps[i] as { gva: bigint }).gva.toString(16)} cpl${(steps[i] as { cpl: number }).cpl}: exceptions`,
    );
  });

  it('guest-side write-pte and clear-ad really change the entries: dropping them makes the next accesses disagree', async () => {
    for (const name of ['invlpg_write_pte', 'accessed_dirty']) {
      const sc = load(name);
      const kinds = sc.steps.filter(
        (s) => s.side === 'guest' && (s.kind === 'write-pte' || s.kind === 'clear-ad'),
      ).length;
      expect(kinds, name).toBeGreaterThan(0);
      expect((await runCheck(scenarioCheck(sc), kvm, profile)).outcome, name).toBe('pass');
      // The same scenario with those guest stores turned into no-ops (INVLPG of the address instead).
      const steps = sc.steps.map((s) =>
        s.side === 'guest' && (s.kind === 'write-pte' || s.kind === 'clear-ad')
          ? { side: 'guest' as const, kind: 'invlpg' as const, gva: s.gva }
          : s,
      );
      const r = await runCheck(scenarioCheck({ ...sc, steps }), kvm, profile);
      expect(r.outcome, name).toBe('fail');
    }
  });

  it('reports a wrong stats expectation, naming the step and the stat', async () => {
    const sc = load('memslot_delete');
    const i = sc.steps.findIndex((s) => s.stats?.mmio_exits?.delta === 1n);
    expect(i).toBeGreaterThan(0);
    const steps = sc.steps.map((s, j) =>
      j === i ? { ...s, stats: { mmio_exits: { op: '=' as const, delta: 0n } } } : s,
    );
    const r = await runCheck(scenarioCheck({ ...sc, steps }), kvm, profile);
    expect(r.outcome).toBe('fail');
    const bad = r.comparisons.filter((c) => !c.ok);
    expect(bad.map((c) => [c.what.replace(/^step (\d+) .*: /, 'step $1: '), c.expected, c.observed])).toEqual([
      [`step ${i}: stats mmio_exits`, '"0"', '"+1"'],
    ]);
  });

  it('a range that the delta misses is reported too', async () => {
    const sc = load('dirty_log');
    const i = sc.steps.findIndex((s) => s.stats?.remote_tlb_flush_requests?.op === '>=');
    const steps = sc.steps.map((s, j) =>
      j === i ? { ...s, stats: { remote_tlb_flush_requests: { op: '<=' as const, delta: 0n } } } : s,
    );
    const r = await runCheck(scenarioCheck({ ...sc, steps }), kvm, profile);
    expect(r.outcome).toBe('fail');
    expect(r.comparisons.filter((c) => !c.ok).map((c) => c.what)).toEqual([
      expect.stringMatching(new RegExp(`^step ${i} host get-dirty-log: stats remote_tlb_flush_requests$`)),
    ]);
  });

  it('a fault stat is compared only where the probe offers stats_faults; elsewhere it is noted, never passed', async () => {
    const sc = load('madvise_refault');
    const i = sc.steps.findIndex((s) => s.stats?.pf_fixed);
    expect(i).toBeGreaterThan(0);
    const r = await runCheck(scenarioCheck(sc), kvm, profile);
    const compared = r.comparisons.filter((c) => c.what.endsWith('stats pf_fixed'));
    if (profile.oracles.stats_faults.available) {
      expect(compared).toHaveLength(1);
      return;
    }
    expect(compared).toEqual([]);
    expect(r.notes.filter((n) => n.includes('stats pf_fixed'))).toEqual([
      expect.stringMatching(/^step \d+ .*: stats pf_fixed >=1: not applicable here \(stats_faults: /),
    ]);
    // The same scenario on a profile that claims fault stats compares them.
    const claimed: HostProfile = {
      ...profile,
      oracles: { ...profile.oracles, stats_faults: { available: true, why: 'test' } },
    };
    const r2 = await runCheck(scenarioCheck(sc), kvm, claimed);
    expect(r2.comparisons.filter((c) => c.what.endsWith('stats pf_fixed'))).toHaveLength(1);
  });

  // The host dimension: a TDP model whose zap leaves out the last page of its
  // range keeps the munmap'd / mprotect'd page mapped, so it predicts that the
  // access succeeds; KVM refaults it and finds no host memory.
  for (const name of ['munmap_remap', 'mprotect_backing']) {
    it(`${name}: a TDP model with zapOneShort is reported by the refault`, async () => {
      const good = await runCheck(scenarioCheck(load(name)), kvm, profile);
      expect(good.outcome, failures(good)).toBe('pass');
      const r = await runCheck(scenarioCheck(load(name), { wrong: { tdp: { zapOneShort: true } } }), kvm, profile);
      expect(r.outcome).toBe('fail');
      expect(
        r.comparisons
          .filter((c) => !c.ok)
          .map((c) => c.what)
          .join('\n'),
      ).toMatch(/MMIO exits|KVM_RUN stops for the missing host memory|guest reaches the end of the step/);
    });
  }

  it('a wrong prediction of how KVM_RUN stops for missing host memory is reported', async () => {
    const sc = load('munmap_remap');
    const r = await runCheck(scenarioCheck(sc), kvm, profile, {
      wrongExpectation: (_c, what, e) =>
        what.endsWith('KVM_RUN stops for the missing host memory')
          ? { exit: 'memory_fault', gpa: 0x1001000n, size: 0x1000n, flags: 0n }
          : e,
    });
    expect(r.outcome).toBe('fail');
    expect(r.comparisons.filter((c) => !c.ok).map((c) => [c.what, c.observed])).toEqual([
      ['step 5 read64 0x8000001000 cpl3: KVM_RUN stops for the missing host memory', '{kvmRun: "EFAULT"}'],
      ['step 15 read64 0x8000010000 cpl3: KVM_RUN stops for the missing host memory', '{kvmRun: "EFAULT"}'],
    ]);
  });

  // With manual dirty-log protection, KVM_CLEAR_DIRTY_LOG of the whole slot
  // clears a page written since the last KVM_GET_DIRTY_LOG too: the next
  // get-dirty-log reports nothing (found by kvmharness fuzz --seed 1, case 94).
  it('a page written before a clear-dirty-log of the whole slot is not reported by the next get', async () => {
    const v = validateScenario({
      name: 'clear_after_write',
      description: 'get, write, clear, get',
      memslots: [{ slot: 2, gpa: '0x600000', size: '0x10000', logDirty: true }],
      mappings: [{ gva: '0x8000002000', gpa: '0x60f000', size: '0x1000', leaf: { w: true, u: true } }],
      steps: [
        { host: 'get-dirty-log', slot: 2 },
        { guest: 'write', gva: '0x80000026f0', size: 4, value: '0x7cbbfec7' },
        { host: 'clear-dirty-log', slot: 2 },
        { host: 'get-dirty-log', slot: 2 },
        { guest: 'write', gva: '0x80000026f0', size: 4, value: '0x1' },
        { host: 'get-dirty-log', slot: 2 },
      ],
    });
    if (!v.ok) throw new Error(v.errors.join('\n'));
    const r = await runCheck(scenarioCheck(v.scenario), kvm, profile);
    expect(r.outcome, failures(r)).toBe('pass');
    const dirty = r.comparisons.filter((c) => c.what.endsWith('dirty pages')).map((c) => c.expected);
    expect(dirty).toEqual(['[]', '[]', '["0x60f000"]']);
  });

  // After a host write to a paging entry and no invalidation, the processor may still use the
  // translation an earlier access made (found by kvmharness fuzz --seed 7, case 185: kvm_pvm's
  // shadow page still maps the page). A CR3 load in between takes that latitude away.
  it('accepts an old translation after a host table write only until something invalidates it', async () => {
    const sc = (invalidate: boolean) => {
      const v = validateScenario({
        name: invalidate ? 'stale_after_cr3' : 'stale_allowed',
        description: 'exec a page, set a reserved bit in its PDE from the host, exec the page again',
        memslots: [{ slot: 1, gpa: '0xf000000', size: '0x10000' }],
        mappings: [{ gva: '0x8000001000', gpa: '0xf000000', size: '0x1000', leaf: { w: true, u: true } }],
        steps: [
          { guest: 'exec', gva: '0x8000001000', cpl: 3 },
          { host: 'write-pte', gva: '0x8000001000', level: 2, set: '0x8000000000000' },
          ...(invalidate ? [{ guest: 'reload-cr3' }] : []),
          { guest: 'exec', gva: '0x80000010ba', cpl: 3 },
        ],
      });
      if (!v.ok) throw new Error(v.errors.join('\n'));
      return v.scenario;
    };
    const r = await runCheck(scenarioCheck(sc(false)), kvm, profile);
    const oldUsed = (x: typeof r) =>
      x.notes.some((n) => n.includes('the translation of an earlier access to this page'));
    const excs = (x: typeof r) => x.comparisons.filter((c) => /exec8 0x80000010ba cpl3: exceptions$/.test(c.what));
    expect(r.outcome, failures(r)).toBe('pass');
    // Either the processor used the old translation (noted, no exception comparison) or it walked anew.
    if (oldUsed(r)) expect(excs(r)).toEqual([]);
    else expect(excs(r).map((c) => c.expected)).toEqual(['[{cr2: 0x80000010ba, errorCode: 0x1d, vector: 14}]']);
    const strict = await runCheck(scenarioCheck(sc(true)), kvm, profile);
    expect(oldUsed(strict)).toBe(false);
    expect(excs(strict).map((c) => c.expected)).toEqual(['[{cr2: 0x80000010ba, errorCode: 0x1d, vector: 14}]']);
  });

  // An access stopped for missing host memory, then its slot deleted by a host step: the redone
  // access reaches no memslot and exits as MMIO (found by kvmharness fuzz --seed 1, case 193).
  it('redoes an access whose slot a host step deleted as an MMIO access', async () => {
    const v = validateScenario({
      name: 'redo_after_slot_delete',
      description: 'PROT_NONE over a page, a CPL 3 read there (stopped), the slot deleted',
      memslots: [{ slot: 1, gpa: '0x400000', size: '0x10000' }],
      mappings: [{ gva: '0x8000000000', gpa: '0x400000', size: '0x1000', leaf: { w: true, u: true } }],
      steps: [
        { host: 'mprotect', slot: 1, offset: '0x0', size: '0x1000', prot: 'none' },
        { guest: 'read', gva: '0x8000000000', cpl: 3 },
        { host: 'memslot-delete', slot: 1 },
      ],
    });
    if (!v.ok) throw new Error(v.errors.join('\n'));
    const r = await runCheck(scenarioCheck(v.scenario), kvm, profile);
    expect(r.outcome, failures(r)).toBe('pass');
    const mmio = r.comparisons.find((c) => c.what.endsWith('redone: MMIO exits'));
    expect(mmio?.expected).toBe('[{gpa: 0x400000, isWrite: false, len: 8}]');
  });

  // A loop whose accesses leave the guest midway cannot run as one step: `run` says so as an
  // error naming the access; the fuzzer does not judge such a generated case (never a finding).
  it('a loop that reaches missing host memory is an error for run and not judged by fuzz', async () => {
    const v = validateScenario({
      name: 'loop_into_hole',
      description: 'a write loop over three pages, the middle one unmapped on the host',
      memslots: [{ slot: 1, gpa: '0x1000000', size: '0x10000' }],
      mappings: [{ gva: '0x8000000000', gpa: '0x1000000', size: '0x3000', leaf: { w: true, u: true } }],
      steps: [
        { host: 'munmap', slot: 1, offset: '0x1000', size: '0x1000' },
        { guest: 'write', gva: '0x8000000000', value: '0x1', count: 3, stride: '0x1000' },
      ],
    });
    if (!v.ok) throw new Error(v.errors.join('\n'));
    const r = await runCheck(scenarioCheck(v.scenario), kvm, profile);
    expect(r.outcome).toBe('error');
    expect(r.reason).toMatch(/access 1 of the loop \(0x8000001000\) (exits as MMIO|finds no host memory)/);
    const j = await judge(v.scenario, kvm, profile, { trace: false });
    expect([j.outcome, j.result.reason, j.signature]).toEqual(['not_applicable', LOOP_LIMIT, undefined]);
  });

  // An access stopped for missing host memory is redone by the next run; a
  // host step in between that clears U in the PDE makes the redone CPL 3
  // access fault in the guest before it reaches the missing memory.
  it('an access redone after a host step changed its walk is predicted again from the tables', async () => {
    const v = validateScenario({
      name: 'redo_after_pte_write',
      description: 'munmap, a CPL 3 read there (stopped), U cleared in the PDE by the host, the next step',
      memslots: [{ slot: 1, gpa: '0x1000000', size: '0x10000' }],
      mappings: [{ gva: '0x8000000000', gpa: '0x1000000', size: '0x3000', leaf: { w: true, u: true } }],
      steps: [
        { host: 'munmap', slot: 1, offset: '0x1000', size: '0x1000' },
        { guest: 'read', gva: '0x8000001000', cpl: 3 },
        { host: 'write-pte', gva: '0x8000001000', level: 2, clear: '0x4' },
        { guest: 'read', gva: '0x8000000000' },
      ],
    });
    if (!v.ok) throw new Error(v.errors.join('\n'));
    const r = await runCheck(scenarioCheck(v.scenario), kvm, profile);
    if (!r.notes.some((n) => n.includes('the redone access is predicted again')))
      return expect(r.outcome, failures(r)).toBe('pass'); // the read did not stop (kvm_pvm's CPL 0 path, a pre-faulted page)
    expect(r.outcome, failures(r)).toBe('pass');
    // The redone access's exceptions are compared: a wrong expectation (no fault) is reported naming the step.
    const w = await runCheck(scenarioCheck(v.scenario), kvm, profile, {
      wrongExpectation: (_c, what, e) => (what.endsWith('redone: exceptions') ? [] : e),
    });
    expect(w.comparisons.filter((c) => !c.ok).map((c) => c.what)).toEqual([
      'step 1 read64 0x8000001000 cpl3: redone: exceptions',
    ]);
  });

  // The shadow MMU model beside the run: a model that never floods is caught
  // on any shadow-MMU host (kvm_pvm zaps the flooded root, a native host the
  // flooded page directory); one whose sync misses the last child, or that
  // never syncs, only where the guest runs on the shadow pages (unsync pages
  // exist there alone).
  const shadowWrong: [string, WrongShadow, boolean][] = [
    ['shadow_write_flooding', 'no-flooding', false],
    ['shadow_unsync_children', 'sync-misses-last-child', true],
    ['shadow_unsync_cr3_reload', 'never-sync', true],
  ];
  for (const [name, mistake, nativeOnly] of shadowWrong) {
    it(`${name}: a shadow model with ${mistake} is reported where the shadow comparison applies`, async () => {
      const r = await runCheck(scenarioCheck(load(name), { wrong: { shadow: mistake } }), kvm, profile);
      const applies = r.notes.some((n) => n.startsWith('shadow model: '));
      const caught = applies && (!nativeOnly || r.notes.some((n) => n.startsWith('shadow model: native')));
      if (!caught) return expect(['pass', 'not_applicable']).toContain(r.outcome);
      expect(r.outcome).toBe('fail');
      expect(
        r.comparisons
          .filter((c) => !c.ok)
          .map((c) => c.what)
          .join('\n'),
      ).toMatch(/shadow-page events|shadow pages/);
    });
  }

  // Races: a model that drops one dirty bit, and every comparison fed a wrong expectation.
  for (const [name, logged] of [
    ['race_dirty_log_dontneed', 'target 0 (slot 1)'],
    ['race_dirty_log_dontneed_cpl3', 'target 0 (slot 1)'],
    ['memslot_delete_running', 'target 1 (slot 2)'],
  ]) {
    it(`${name}: a race model that drops one dirty bit is reported`, async () => {
      const r = await runCheck(scenarioCheck(load(name!), { wrong: { race: { dropDirtyBit: true } } }), kvm, profile);
      expect(r.outcome).toBe('fail');
      const bad = r.comparisons.filter((c) => !c.ok);
      expect(bad.map((c) => c.what)).toEqual([`race: ${logged}: dirty log over all rounds`]);
      // The observed log has the page the model left out.
      expect(bad[0]!.observed.length).toBeGreaterThan(bad[0]!.expected.length);
    });
  }

  for (const name of ['race_dirty_log_dontneed', 'memslot_delete_running']) {
    it(`${name}: every race comparison reports a wrong expectation`, async () => {
      const ok = await runCheck(scenarioCheck(load(name)), kvm, profile);
      expect(ok.outcome, failures(ok)).toBe('pass');
      const r = await runCheck(scenarioCheck(load(name)), kvm, profile, {
        wrongExpectation: (_c, _w, e) => wrongValue(e),
      });
      expect(
        r.comparisons.map((c) => [c.what, c.ok]),
        r.reason,
      ).toEqual(ok.comparisons.map((c) => [c.what, false]));
    });
  }

  it('dirty_log_thp: a model that logs whole 2 MiB blocks is reported', async () => {
    const sc = load('dirty_log_thp');
    const i = sc.steps.findIndex(
      (s) => s.side === 'host' && s.kind === 'get-dirty-log' && (s.expect?.length ?? 0) === 2,
    );
    const block = Array.from({ length: 512 }, (_, k) => `0x${(0x1000000 + k * 0x1000).toString(16)}`);
    const r = await runCheck(scenarioCheck(sc), kvm, profile, {
      wrongExpectation: (_c, what, e) => (what === `step ${i} host get-dirty-log: dirty pages` ? block : e),
    });
    expect(r.outcome).toBe('fail');
    expect(r.comparisons.filter((c) => !c.ok).map((c) => [c.what, c.observed])).toEqual([
      [`step ${i} host get-dirty-log: dirty pages`, '["0x1001000", "0x11ff000"]'],
    ]);
  });

  it('removes its tracefs instance when interrupted', async () => {
    const cli = join(import.meta.dirname, '..', 'dist', 'src', 'cli', 'bin.js');
    const child = spawn(process.execPath, [cli, 'run', 'scenarios'], { stdio: ['ignore', 'pipe', 'pipe'] });
    // Wait until an instance of the child exists, then interrupt it.
    const deadline = Date.now() + 30_000;
    while (
      !readdirSync(join(TRACEFS, 'instances')).some((d) => d.startsWith(`kvmharness-${child.pid}-`)) &&
      Date.now() < deadline
    ) {
      await new Promise((r) => setTimeout(r, 5));
    }
    child.kill('SIGINT');
    const code = await new Promise<number | null>((r) => child.on('exit', (c) => r(c)));
    expect(code).toBe(130);
    expect(readdirSync(join(TRACEFS, 'instances')).filter((d) => d.startsWith(`kvmharness-${child.pid}-`))).toEqual([]);
  });
});

describe('shadow-page oracle parsing', () => {
  it('reads gfn, level, direct and new from kvm_mmu_get_page text', async () => {
    const { parseShadowPage, guestTablePages } = await import('../src/observe/shadow-pages.js');
    const ev = (text: string): TraceEvent => ({
      id: 'kvmmmu/kvm_mmu_get_page',
      pid: 1,
      cpu: 0,
      ts: 0,
      fields: {},
      text,
    });
    expect(parseShadowPage(ev('sp gen 0 gfn 10 l4 8-byte q0 wux nxe ad root 0 sync new'))).toEqual({
      gfn: 0x10n,
      level: 4,
      direct: false,
      created: true,
    });
    expect(parseShadowPage(ev('sp gen 0 gfn 200 l1 8-byte q0 direct wux nxe ad root 0 sync existing'))).toEqual({
      gfn: 0x200n,
      level: 1,
      direct: true,
      created: false,
    });
    // A 4-level tree: root 0x1000 -> PDPT 0x2000 -> PD 0x3000 with one 2M leaf at 0x200000 and one PT 0x4000.
    const mem = new Map<bigint, bigint>([
      [0x1000n, 0x2000n | 1n],
      [0x2000n, 0x3000n | 1n],
      [0x3000n, 0x200000n | 0x81n],
      [0x3008n, 0x4000n | 1n],
    ]);
    expect([...guestTablePages(0x1000n, 4, (a) => mem.get(a) ?? 0n)].sort()).toEqual(
      ['1@4', '2@3', '200@1 direct', '3@2', '4@1'].sort(),
    );
  });
});

// A kernel under test that logs a problem: the names kernel-log.ts gives what
// the kernel printed, and the runner's verdict (the check fails, named after
// the kernel's message; after a crash or hang the rest is not run).
import { describe, expect, it } from 'vitest';
import type { Kvm } from '../src/kvm/kvm.js';
import { kernelProblems } from '../src/lab/kernel-log.js';
import { kmsgLines } from '../src/lab/watch.js';
import type { HostProfile } from '../src/probe/probe.js';
import { human, junit, ktap } from '../src/report/report.js';
import { exitStatus, runChecks } from '../src/run/runner.js';
import type { Check } from '../src/run/types.js';
import type { KernelProblem, KernelWatch } from '../src/kvm/target.js';

const BUG = `[   41.100000] kvm: some earlier message
[   42.123456] Invalid SPTE change: cannot replace a present leaf
[   42.123460] SPTE with another present leaf SPTE mapping a
[   42.123461] different PFN!
[   42.123462] as_id: 0 gfn: 1000 old_spte: 600000010000b77 new_spte: 600000020000b77 level: 1
[   42.123500] ------------[ cut here ]------------
[   42.123510] kernel BUG at arch/x86/kvm/mmu/tdp_mmu.c:512!
[   42.123600] invalid opcode: 0000 [#1] PREEMPT SMP NOPTI
[   42.123700] CPU: 0 PID: 100 Comm: agent Not tainted 6.1.0-50-amd64 #1  Debian 6.1.176-1
[   42.123800] RIP: 0010:__handle_changed_spte+0x6f4/0x700 [kvm]
[   42.123900] Call Trace:
[   42.124000]  <TASK>
[   42.124100]  tdp_mmu_set_spte_atomic+0x9a/0xf0 [kvm]`;

describe('kernel log problems', () => {
  it('names a BUG after the function it hit and the message printed before it', () => {
    const [p, ...rest] = kernelProblems(BUG);
    expect(p!.message).toBe('kernel BUG in __handle_changed_spte: Invalid SPTE change: cannot replace a present leaf');
    expect(p!.excerpt).toContain('[   42.123510] kernel BUG at arch/x86/kvm/mmu/tdp_mmu.c:512!');
    expect(p!.excerpt.some((l) => l.includes('RIP: 0010:__handle_changed_spte'))).toBe(true);
    expect(rest).toEqual([]);
  });

  it('counts a WARN from KVM, with its message, and leaves warnings from elsewhere alone', () => {
    const log = [
      '[    9.000000] ------------[ cut here ]------------',
      '[    9.000001] WARNING: CPU: 0 PID: 7 at drivers/gpu/drm/foo.c:10 foo_bar+0x1/0x2',
      '[   10.000000] ------------[ cut here ]------------',
      '[   10.000010] kvm_mmu_free_roots: stale root',
      '[   10.000020] WARNING: CPU: 0 PID: 100 at arch/x86/kvm/mmu/mmu.c:3500 kvm_mmu_free_roots+0x1c/0x200 [kvm]',
      '[   11.000000] ------------[ cut here ]------------',
      '[   11.000020] WARNING: CPU: 0 PID: 100 at arch/x86/kvm/x86.c:12 kvm_arch_vcpu_ioctl_run+0x1c/0x200 [kvm]',
    ].join('\n');
    expect(kernelProblems(log).map((p) => p.message)).toEqual([
      'WARNING in kvm_mmu_free_roots: kvm_mmu_free_roots: stale root',
      'WARNING in kvm_arch_vcpu_ioctl_run',
    ]);
  });

  it('names panics, oopses, lockups, stalls and arm64 internal errors', () => {
    const log = [
      '[    1.0] BUG: kernel NULL pointer dereference, address: 0000000000000008',
      '[    1.0] #PF: supervisor read access in kernel mode',
      '[    1.0] Oops: 0000 [#1] PREEMPT SMP NOPTI',
      '[    1.1] RIP: 0010:kvm_tdp_mmu_map+0x10/0x300 [kvm]',
      '[    2.0] watchdog: BUG: soft lockup - CPU#0 stuck for 22s! [agent:100]',
      '[    3.0] rcu: INFO: rcu_preempt self-detected stall on CPU',
      '[    4.0] INFO: task agent:100 blocked for more than 120 seconds.',
      '[    5.0] Internal error: Oops - BUG: 00000000f2000800 [#1] SMP',
      '[    5.1] pc : kvm_pgtable_stage2_map+0x20/0x40',
      '[    6.0] Kernel panic - not syncing: Fatal exception',
    ].join('\n');
    expect(kernelProblems(log).map((p) => p.message)).toEqual([
      'BUG: kernel NULL pointer dereference in kvm_tdp_mmu_map',
      'BUG: soft lockup - CPU#0 stuck for 22s! [agent:100]',
      'rcu_preempt self-detected stall on CPU',
      'task agent:100 blocked for more than 120 seconds',
      'Internal error: Oops - BUG: 00000000f2000800 [#1] SMP in kvm_pgtable_stage2_map',
      'kernel panic: Fatal exception',
    ]);
  });

  it('reads /dev/kmsg records as console lines, a record of several lines split', () => {
    const text = kmsgLines([
      '3,10,42123456,-;Invalid SPTE change: cannot replace\\x0adifferent PFN!\n SUBSYSTEM=x',
      '4,11,42123500,c;next',
    ]);
    expect(text.split('\n')).toEqual([
      '[   42.123456] Invalid SPTE change: cannot replace',
      '[   42.123456] different PFN!',
      '[   42.123500] next',
    ]);
    expect(kernelProblems('[ 1.0] all is well\n[ 2.0] kvm: loaded')).toEqual([]);
  });
});

const profile = {
  arch: 'x86_64',
  device: '/dev/kvm',
  flavour: 'kvm_amd',
  tdp: { enabled: true, kind: 'npt' },
  tdpMmu: true,
  oracles: {},
} as unknown as HostProfile;

const check = (name: string, ok = true): Check => ({
  name,
  description: name,
  needs: [],
  run: async (ctx) => ctx.expect('x', 1, ok ? 1 : 2),
});

/** A kvm whose target's kernel says, check by check, what `script` holds. */
function kvmWith(script: { problems: KernelProblem[]; dead?: string }[]): Kvm {
  let i = 0;
  const watch: KernelWatch = { consoleLog: '/results/console.log', since: async () => script[i++] ?? { problems: [] } };
  return { target: { watch } } as unknown as Kvm;
}

describe('a kernel problem as a verdict', () => {
  const bug: KernelProblem = {
    message: 'kernel BUG in __handle_changed_spte: Invalid SPTE change',
    excerpt: ['kernel BUG at x!'],
  };

  it('a WARN during a check fails that check; the run goes on', async () => {
    const warn: KernelProblem = { message: 'WARNING in kvm_mmu_free_roots', excerpt: ['WARNING: ...'] };
    const r = await runChecks(
      [check('a'), check('b'), check('c')],
      kvmWith([{ problems: [] }, { problems: [] }, { problems: [warn] }]),
      profile,
    );
    expect(r.checks.map((c) => c.outcome)).toEqual(['pass', 'fail', 'pass']);
    expect(r.checks[1]!.reason).toBe('WARNING in kvm_mmu_free_roots');
    expect(r.checks[1]!.kernel).toEqual([warn]);
    expect(r.summary.stopped).toBeUndefined();
    expect(r.consoleLog).toBe('/results/console.log');
    expect(exitStatus(r)).toBe(1);
  });

  it('a crash fails the check that ran, names the kernel message, and the rest is not run', async () => {
    const r = await runChecks(
      [check('a'), check('b'), check('c')],
      kvmWith([{ problems: [] }, { problems: [] }, { problems: [bug], dead: bug.message }]),
      profile,
    );
    expect(r.checks.map((c) => [c.name, c.outcome])).toEqual([
      ['a', 'pass'],
      ['b', 'fail'],
      ['c', 'not_run'],
    ]);
    expect(r.checks[1]!.reason).toBe(bug.message);
    expect(r.checks[2]!.reason).toBe(`the kernel under test stopped during b: ${bug.message}`);
    expect(r.summary).toMatchObject({
      total: 3,
      passed: 1,
      failed: 1,
      notRun: 1,
      stopped: `the kernel under test stopped during b: ${bug.message}`,
    });
    expect(exitStatus(r)).toBe(1);
    const text = human(r);
    expect(text).toContain(`kernel: ${bug.message}`);
    expect(text).toContain('  | kernel BUG at x!');
    expect(text).toContain('console log of the kernel under test: /results/console.log');
    expect(ktap(r)).toContain('not ok 2 b');
    expect(junit(r)).toContain(`<failure message="${bug.message}"`);
  });

  it('an error the crash caused stays in the notes of the failed check', async () => {
    const broken: Check = {
      name: 'b',
      description: 'b',
      needs: [],
      run: async () => {
        throw new Error('the lab channel is broken');
      },
    };
    const r = await runChecks([broken], kvmWith([{ problems: [] }, { problems: [bug], dead: bug.message }]), profile);
    expect(r.checks[0]).toMatchObject({ outcome: 'fail', reason: bug.message });
    expect(r.checks[0]!.notes).toEqual(['the check itself: error: the lab channel is broken']);
  });
});

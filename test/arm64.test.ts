// arm64: the ABI numbers against the cross toolchain's headers, the stage-2
// abort decoding, the runner's choice of checks by architecture, and — with
// KVMHARNESS_LAB=1 — the arm64 lab: each profile boots and probes as itself,
// the arm64 smoke checks pass, and each reports a deliberately wrong
// expectation, naming exactly it (and the block-over-table check a wrong model).
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { decodeAbort } from '../src/arch/arm64/esr.js';
import { parseGuestFault } from '../src/observe/stage2-faults.js';
import { ARM64_SMOKE, blockReplacesTable } from '../src/checks/arm64.js';
import { SMOKE, X86_SMOKE } from '../src/checks/smoke.js';
import { Kvm } from '../src/kvm/kvm.js';
import * as U from '../src/uapi/uapi.js';
import { openLab, type LabSession } from '../src/lab/session.js';
import { probe, type HostProfile } from '../src/probe/probe.js';
import { forHostArch, runCheck } from '../src/run/runner.js';
import type { WrongExpectation } from '../src/run/types.js';
import { failures } from './support/kvm.js';
import { wrong } from './support/wrong.js';

describe('arm64 stage-2 aborts', () => {
  it('parses kvm_guest_fault events as the 6.1 kernel prints them', () => {
    expect(parseGuestFault('ipa 0x20005000, hsr 0x93c1804f, hxfar 0x20005008, pc 0x00000010000010')).toEqual({
      ipa: 0x20005000n,
      esr: 0x93c1804fn,
      far: 0x20005008n,
      pc: 0x10000010n,
    });
    expect(parseGuestFault('ipa 0, hsr 0x82000005, hxfar 0, pc 0x0000000000000000')).toEqual({
      ipa: 0n,
      esr: 0x82000005n,
      far: 0n,
      pc: 0n,
    });
    expect(parseGuestFault('vcpu 0 exit')).toBeUndefined();
  });

  it('decodes instruction and data aborts: access from EC and WnR, the fault kind and level from the status code', () => {
    expect(decodeAbort(0x82000005n)).toEqual({ access: 'exec', fault: 'translation', level: 1 });
    expect(decodeAbort(0x93c28006n)).toEqual({ access: 'read', fault: 'translation', level: 2 });
    expect(decodeAbort(0x93c1804fn)).toEqual({ access: 'write', fault: 'permission', level: 3 });
    expect(decodeAbort(0x93c1804bn)).toEqual({ access: 'write', fault: 'access flag', level: 3 });
    expect(decodeAbort(0x92000010n)).toEqual({ access: 'read', fault: 'fsc 0x10', level: undefined });
    expect(decodeAbort(0x5a000000n)).toBeUndefined(); // an HVC, not an abort
  });
});

describe('checks by architecture', () => {
  it('the smoke suite holds both architectures; a run takes those of the host', () => {
    expect(SMOKE.length).toBe(X86_SMOKE.length + ARM64_SMOKE.length);
    expect(new Set(SMOKE.map((c) => c.name)).size).toBe(SMOKE.length);
    expect(X86_SMOKE.every((c) => c.arch === 'x86_64')).toBe(true);
    expect(ARM64_SMOKE.every((c) => c.arch === 'arm64')).toBe(true);
    expect(forHostArch(SMOKE, 'arm64')).toEqual(ARM64_SMOKE);
    expect(forHostArch(SMOKE, 'x86_64')).toEqual(X86_SMOKE);
    // Only another architecture's checks, named on purpose: kept, to be reported not applicable.
    expect(forHostArch(ARM64_SMOKE, 'x86_64')).toEqual(ARM64_SMOKE);
  });

  it('reports a check of another architecture not applicable, with the reason', async () => {
    const r = await runCheck(ARM64_SMOKE[0]!, {} as Kvm, { arch: 'x86_64', oracles: {} } as HostProfile);
    expect(r.outcome).toBe('not_applicable');
    expect(r.reason).toBe('arm64 guest; this KVM host is x64');
  });
});

// ---- the arm64 ABI against the cross toolchain's <linux/kvm.h> -----------------

const crossCc = spawnSync('aarch64-linux-gnu-gcc', ['--version']).status === 0 ? 'aarch64-linux-gnu-gcc' : undefined;

describe.skipIf(!crossCc)(
  `arm64 uapi${crossCc ? '' : ' [skipped: no aarch64-linux-gnu-gcc for the arm64 headers (apt-get install gcc-aarch64-linux-gnu)]'}`,
  () => {
    // Made in beforeAll, not while collecting: a skipped suite's body still runs, its hooks do not.
    let work = '';
    beforeAll(() => {
      work = mkdtempSync(join(tmpdir(), 'kvmharness-arm64-uapi-'));
    });
    afterAll(() => rmSync(work, { recursive: true, force: true }));

    it('ioctl numbers, struct sizes, feature bits and core register ids equal the headers', () => {
      const u64 = (v: number | bigint) => `${BigInt(v)}ULL`;
      const asserts = [
        ...Object.entries(U.ARM64_IOCTL).map(
          ([k, v]) => `_Static_assert((unsigned long long)${k} == ${u64(v)}, "${k}");`,
        ),
        `_Static_assert(sizeof(struct kvm_vcpu_init) == ${U.ARM64_SIZEOF.kvm_vcpu_init}, "kvm_vcpu_init");`,
        `_Static_assert(sizeof(struct kvm_one_reg) == ${U.ARM64_SIZEOF.kvm_one_reg}, "kvm_one_reg");`,
        `_Static_assert(sizeof(struct kvm_reg_list) == ${U.ARM64_SIZEOF.kvm_reg_list}, "kvm_reg_list");`,
        ...Object.entries(U.ARM64_CAP).map(([k, v]) => `_Static_assert(${k} == ${v}, "${k}");`),
        `_Static_assert(KVM_ARM_VCPU_PSCI_0_2 == ${U.KVM_ARM_VCPU_PSCI_0_2}, "PSCI_0_2");`,
        `_Static_assert(KVM_ARM_VCPU_POWER_OFF == ${U.KVM_ARM_VCPU_POWER_OFF}, "POWER_OFF");`,
        `_Static_assert(KVM_SYSTEM_EVENT_SHUTDOWN == ${U.KVM_SYSTEM_EVENT.SHUTDOWN}, "SHUTDOWN");`,
        `_Static_assert((KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_CORE | KVM_REG_ARM_CORE_REG(regs.pc)) == ${u64(U.arm64CoreReg(U.ARM64_CORE.pc))}, "pc");`,
        `_Static_assert((KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_CORE | KVM_REG_ARM_CORE_REG(regs.pstate)) == ${u64(U.arm64CoreReg(U.ARM64_CORE.pstate))}, "pstate");`,
        `_Static_assert((KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_CORE | KVM_REG_ARM_CORE_REG(regs.sp)) == ${u64(U.arm64CoreReg(U.ARM64_CORE.sp))}, "sp");`,
        `_Static_assert((KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_CORE | KVM_REG_ARM_CORE_REG(regs.regs[7])) == ${u64(U.arm64CoreReg(U.ARM64_CORE.x(7)))}, "x7");`,
        `_Static_assert((KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_CORE | KVM_REG_ARM_CORE_REG(sp_el1)) == ${u64(U.arm64CoreReg(U.ARM64_CORE.sp_el1))}, "sp_el1");`,
      ];
      const src = join(work, 'abi.c');
      writeFileSync(
        src,
        `#include <stddef.h>\n#include <linux/kvm.h>\n${asserts.join('\n')}\nint main(void) { return 0; }\n`,
      );
      const r = spawnSync(crossCc!, ['-fsyntax-only', src], { encoding: 'utf8' });
      expect(r.stderr).toBe('');
      expect(r.status).toBe(0);
    });
  },
);

// ---- the arm64 lab -------------------------------------------------------------

const live = process.env.KVMHARNESS_LAB === '1';
const skipLab = live ? undefined : 'set KVMHARNESS_LAB=1 to fetch the arm64 lab kernel and boot its profiles (~40 s)';

const FLAVOUR = { vhe: 'arm64-vhe', nvhe: 'arm64-nvhe', protected: 'arm64-protected' } as const;

for (const name of ['nvhe', 'vhe', 'protected'] as const) {
  describe.skipIf(skipLab !== undefined)(`arm64 lab, profile ${name}${skipLab ? ` [skipped: ${skipLab}]` : ''}`, () => {
    let s: LabSession;
    let kvm: Kvm;
    let profile: HostProfile;
    beforeAll(async () => {
      s = await openLab({ profile: name, arch: 'arm64', log: () => {} });
      process.stderr.write(`arm64 lab ${name}: ${(s.lab.bootMs / 1000).toFixed(2)} s to READY\n`);
      kvm = Kvm.open(s.target);
      profile = probe(s.target);
    }, 120_000);
    afterAll(async () => {
      kvm?.close();
      await s?.close();
      if (s) expect(s.lab.running()).toBe(false);
    });

    it(`probes as arm64, flavour ${FLAVOUR[name]}, with the stage-2 fault tracepoint`, () => {
      expect(profile.arch).toBe('arm64');
      expect(profile.flavour).toBe(FLAVOUR[name]);
      expect(profile.tdp).toEqual({ enabled: true, kind: 'stage2' });
      expect(profile.cpu).toBeNull(); // no CPUID on arm64
      expect(profile.oracles.stage2_fault_tracepoints.available).toBe(true);
    });

    for (const check of ARM64_SMOKE) {
      it(`${check.name} passes`, async () => {
        const r = await runCheck(check, kvm, profile);
        expect(r.outcome, failures(r)).toBe('pass');
      }, 60_000);

      // The wrong expectations run once, on the first profile: it is about the checks, not the kernel.
      it.skipIf(name !== 'nvhe')(
        `${check.name} reports a deliberately wrong expectation`,
        async () => {
          const clean = await runCheck(check, kvm, profile);
          expect(clean.comparisons.length).toBeGreaterThan(0);
          for (const target of clean.comparisons.map((c) => c.what)) {
            const wrongExpectation: WrongExpectation = (_c, what, expected) =>
              what === target ? wrong(expected) : expected;
            const r = await runCheck(check, kvm, profile, { wrongExpectation });
            expect(r.outcome, `a wrong expectation for '${target}'`).toBe('fail');
            expect(r.comparisons.filter((c) => !c.ok).map((c) => c.what)).toEqual([target]);
          }
        },
        120_000,
      );
    }

    it.skipIf(name !== 'nvhe')(
      'arm64_block_replaces_table reports a model that maps the block at 4 KiB',
      async () => {
        const r = await runCheck(blockReplacesTable({ wrong: { tdp: { levelOffByOne: true } } }), kvm, profile);
        expect(r.outcome, failures(r)).toBe('fail');
        const bad = r.comparisons.filter((c) => !c.ok);
        expect(bad.map((c) => c.what)).toEqual(['stage-2 faults, in order']);
        // KVM: one level-3 fault (the read that maps the block). The wrong model
        // maps that read at 4 KiB, so the two writes after it fault at level 3
        // too: a translation fault, and a permission fault on the page the
        // dirty log write-protected.
        const level3 = (text: string) => text.match(/level: 3\}/g)?.length ?? 0;
        expect(level3(bad[0]!.observed)).toBe(1);
        expect(level3(bad[0]!.expected)).toBe(3);
        expect(bad[0]!.expected).toMatch(/access: "write", fault: "permission", ipa: "0x[0-9a-f]+", level: 3\}\]$/);
      },
      60_000,
    );
  });
}

import { spawnSync } from 'node:child_process';
import { chmodSync, chownSync, existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { SUITE_DOCS } from '../src/checks/suites.js';
import { Kvm, permissionHint } from '../src/kvm/kvm.js';
import type { Target } from '../src/kvm/target.js';
import { describeKvm } from './support/kvm.js';

const CLI = join(import.meta.dirname, '..', 'dist', 'src', 'cli', 'bin.js');

function cli(args: string[], env: Record<string, string> = {}) {
  const r = spawnSync(process.execPath, [CLI, ...args], {
    encoding: 'utf8',
    env: { ...process.env, ...env },
    timeout: 120_000,
  });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

describe('kvmharness CLI without KVM', () => {
  it('exits 2 with one clear line when the device does not exist', () => {
    const r = cli(['run'], { KVMHARNESS_DEVICE: '/nonexistent' });
    expect(r.status).toBe(2);
    expect(r.stderr.trim().split('\n')).toEqual([
      expect.stringMatching(/^kvmharness: \/nonexistent does not exist: this host has no KVM/),
    ]);
    expect(r.stdout).toBe('');
  });

  it('honours --device over the environment', () => {
    const r = cli(['probe', '--device', '/nonexistent2']);
    expect(r.status).toBe(2);
    expect(r.stderr).toMatch(/^kvmharness: \/nonexistent2 does not exist/);
  });

  it('says a non-KVM device is not KVM, without a stack trace', () => {
    const r = cli(['probe', '--device', '/dev/null']);
    expect(r.status).toBe(2);
    expect(r.stderr).toMatch(/^kvmharness: \/dev\/null is not a KVM device \(KVM_GET_API_VERSION failed: ENOTTY\)\n$/);
  });

  it('exits 2 on usage errors', () => {
    expect(cli(['frobnicate']).status).toBe(2);
    const r = cli(['run', 'no_such_check']);
    expect(r.status).toBe(2);
    expect(r.stderr).toBe("kvmharness: unknown check or suite 'no_such_check' (see `kvmharness run --list`)\n");
    expect(cli(['run', '--json', '--ktap']).status).toBe(2);
  });

  it('says a device path that is a directory is one, on one line', () => {
    const dir = mkdtempSync(join(tmpdir(), 'kvmharness-dev-'));
    try {
      for (const args of [
        ['probe', '--device', dir],
        ['run', 'real_mode_io', '--device', dir],
      ]) {
        const r = cli(args);
        expect(r.status).toBe(2);
        expect(r.stderr).toBe(
          `kvmharness: ${dir} is a directory, not a KVM device (point --device / KVMHARNESS_DEVICE at the device node, as /dev/kvm)\n`,
        );
      }
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('--version prints the version of package.json', () => {
    const { version } = JSON.parse(readFileSync(join(import.meta.dirname, '..', 'package.json'), 'utf8')) as {
      version: string;
    };
    for (const flag of ['--version', '-V']) {
      const r = cli([flag]);
      expect(r.status).toBe(0);
      expect(r.stdout).toBe(`${version}\n`);
    }
  });

  it('run --help names every suite and the exit statuses', () => {
    const r = cli(['run', '--help']);
    expect(r.status).toBe(0);
    for (const [name, doc] of Object.entries(SUITE_DOCS))
      expect(r.stdout).toMatch(new RegExp(`^  ${name} +${doc.replace(/[()]/g, '\\$&')}$`, 'm'));
    expect(r.stdout).toContain(
      'Exit status:\n  0      every check passed or was not applicable\n  1      a check failed or ended in an error\n  2 ',
    );
    expect(r.stdout).toMatch(/^ {2}128\+N {2}interrupted by signal N \(130 SIGINT, 143 SIGTERM\)/m);
  });

  it('the permission hint names the group that owns the device', () => {
    const target = (gid: number | undefined, groups: string) =>
      ({
        addon: { open: () => -13 },
        fs: { gidOf: () => gid, read: (p: string) => (p === '/etc/group' ? groups : undefined) },
      }) as unknown as Target;
    const groups = 'root:x:0:\nkvm:x:993:alice\n';
    expect(() => Kvm.open(target(993, groups), '/dev/kvm')).toThrow(
      '/dev/kvm: permission denied (run as root, or add your user to group kvm, which owns /dev/kvm: sudo usermod -aG kvm $USER, then log in again)',
    );
    expect(permissionHint(target(0, groups), '/dev/kvm')).toBe(
      '/dev/kvm is owned by group root: run as root, or give it a group of its own (e.g. kvm) that your user is in',
    );
    // Unknown gid, or a target that cannot stat: the hint without a name.
    expect(permissionHint(target(5000, groups), '/dev/kvm')).toBe(
      'run as root, or add your user to the group that owns /dev/kvm',
    );
    expect(permissionHint(target(undefined, groups), '/dev/kvm')).toBe(
      'run as root, or add your user to the group that owns /dev/kvm',
    );
  });

  // As root, an unprivileged user (nobody) opens a file of a group it is not in.
  // As root, through setpriv; and only where user nobody can read the checkout
  // (a clone in a mktemp -d directory, mode 0700, is not).
  const asNobody =
    process.getuid?.() === 0 &&
    existsSync('/usr/bin/setpriv') &&
    spawnSync('/usr/bin/setpriv', ['--reuid=65534', '--regid=65534', '--clear-groups', 'test', '-r', CLI]).status === 0;
  it.skipIf(!asNobody)('an unprivileged user is told which group owns the device', () => {
    const group = readFileSync('/etc/group', 'utf8')
      .split('\n')
      .map((l) => l.split(':'))
      .find((f) => Number(f[2]) > 0 && Number(f[2]) < 60000 && !f[3]);
    if (!group) return;
    const dir = mkdtempSync(join(tmpdir(), 'kvmharness-perm-'));
    try {
      chmodSync(dir, 0o755);
      const dev = join(dir, 'kvm');
      writeFileSync(dev, '');
      chownSync(dev, 0, Number(group[2]));
      chmodSync(dev, 0o660);
      const r = spawnSync(
        '/usr/bin/setpriv',
        ['--reuid=65534', '--regid=65534', '--clear-groups', process.execPath, CLI, 'probe', '--device', dev],
        { encoding: 'utf8' },
      );
      expect(r.status).toBe(2);
      expect(r.stderr).toBe(
        `kvmharness: ${dev}: permission denied (run as root, or add your user to group ${group[0]}, which owns ${dev}: sudo usermod -aG ${group[0]} $USER, then log in again)\n`,
      );
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('lists checks without touching KVM', () => {
    const r = cli(['run', '--list'], { KVMHARNESS_DEVICE: '/nonexistent' });
    expect(r.status).toBe(0);
    expect(r.stdout).toMatch(/^real_mode_io /m);
  });
});

describeKvm('kvmharness CLI on this host', () => {
  it('probe --json describes this host and its oracles', () => {
    const r = cli(['probe', '--json']);
    expect(r.status).toBe(0);
    const p = JSON.parse(r.stdout);
    expect(p.apiVersion).toBe(12);
    expect(Object.keys(p.oracles)).toContain('walker_tracepoints');
    if (existsSync('/sys/module/kvm_pvm')) {
      expect(p.flavour).toBe('kvm_pvm');
      expect(p.tdp.enabled).toBe(false);
      expect(p.tdpMmu).toBe(false);
      expect(p.oracles.tdp_spte_tracepoints.available).toBe(false);
      expect(p.oracles.stats_faults.available).toBe(false);
    }
  });

  it('run --ktap is valid KTAP and agrees with run --json', () => {
    const k = cli(['run', 'smoke', '--ktap']);
    expect(k.status, k.stdout + k.stderr).toBe(0);
    const lines = k.stdout.trim().split('\n');
    expect(lines[0]).toBe('KTAP version 1');
    const plan = Number(lines[1]!.match(/^1\.\.(\d+)$/)![1]);
    const results = lines.filter((l) => /^(not )?ok \d+ /.test(l));
    expect(results.length).toBe(plan);
    results.forEach((l, i) => expect(l).toMatch(new RegExp(`^(not )?ok ${i + 1} \\S+`)));
    const j = cli(['run', 'smoke', '--json']);
    expect(j.status).toBe(0);
    const rep = JSON.parse(j.stdout);
    const okCount = results.filter((l) => l.startsWith('ok ') && !l.includes('# SKIP')).length;
    expect(rep.summary.passed).toBe(okCount);
    expect(rep.summary.failed).toBe(0);
    expect(rep.summary.passed + rep.summary.notApplicable).toBe(plan);
    expect(rep.summary.passed).toBeGreaterThanOrEqual(7);
  });

  // As a container without tracefs and without CAP_SYS_ADMIN: a private mount
  // namespace with read-only tmpfs over tracefs and debugfs, the capability
  // dropped. The probe says why tracefs is out of reach, and the trace checks
  // are not applicable with that reason.
  const canHide =
    process.getuid?.() === 0 &&
    existsSync('/usr/bin/unshare') &&
    existsSync('/usr/bin/setpriv') &&
    existsSync('/sys/kernel/tracing');
  it.skipIf(!canHide)(
    'where tracefs cannot be reached, the probe says why and the trace checks are not applicable',
    () => {
      const hidden = (args: string[]) => {
        const script =
          'mount -t tmpfs -o ro tmpfs /sys/kernel/tracing && { mount -t tmpfs -o ro tmpfs /sys/kernel/debug 2>/dev/null || true; } ' +
          '&& exec setpriv --bounding-set=-sys_admin --inh-caps=-sys_admin "$@"';
        const r = spawnSync(
          'unshare',
          ['-m', '--propagation', 'private', 'sh', '-c', script, 'sh', process.execPath, CLI, ...args],
          { encoding: 'utf8', timeout: 120_000 },
        );
        return { status: r.status, stdout: r.stdout, stderr: r.stderr };
      };
      const why =
        'not mounted, and mounting it needs CAP_SYS_ADMIN, which this process lacks, as in a container without it';
      const p = hidden(['probe', '--json']);
      expect(p.status).toBe(0);
      const prof = JSON.parse(p.stdout);
      expect(prof.tracefs).toEqual({ state: 'absent', path: '/sys/kernel/tracing', events: {}, why });
      const x86 = prof.arch === 'x64';
      const names = x86 ? ['nx', 'nx:walker-trace', 'shadow_pages_follow_guest_tables'] : ['arm64_stage2_faults'];
      const r = hidden(['run', ...names, '--json']);
      expect(r.status, r.stderr).toBe(0);
      const checks = JSON.parse(r.stdout).checks as { name: string; outcome: string; reason?: string }[];
      const trace = checks.filter((c) => c.name !== 'nx');
      if (x86) {
        expect(trace.find((c) => c.name === 'nx:walker-trace')).toMatchObject({
          outcome: 'not_applicable',
          reason: `walker_tracepoints: tracefs absent: ${why}`,
        });
        // Under TDP there are no shadow pages, whatever tracefs offers.
        const shadow = trace.find((c) => c.name === 'shadow_pages_follow_guest_tables')!;
        expect(shadow.outcome).toBe('not_applicable');
        if (!prof.tdp.enabled) expect(shadow.reason).toBe(`shadow_page_tracepoints: tracefs absent: ${why}`);
        expect(checks.find((c) => c.name === 'nx')!.outcome).toMatch(/^(pass|not_applicable)$/);
      } else {
        expect(trace[0]).toMatchObject({
          outcome: 'not_applicable',
          reason: `stage2_fault_tracepoints: tracefs absent: ${why}`,
        });
      }
    },
  );

  it('writes a JUnit file', () => {
    const dir = mkdtempSync(join(tmpdir(), 'kvmharness-junit-'));
    try {
      const file = join(dir, 'junit.xml');
      const r = cli(['run', 'real_mode_io', '--junit', file]);
      expect(r.status).toBe(0);
      expect(readFileSync(file, 'utf8')).toMatch(/<testcase classname="kvmharness\.[^"]+" name="real_mode_io"/);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

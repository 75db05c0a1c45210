// The seeded KVM bugs of the mutant bench: each patch says what it breaks and
// where it runs, applies to Debian's source of the lab kernel it was written
// for, and is taken out again whatever the run does.
import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { loadMutants, withMutant, type KvmMutant } from '../bench/kvm-mutants.js';

const PROFILES = ['npt-tdp', 'npt-legacy', 'shadow'];
const dirs: string[] = [];
afterEach(() => {
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});
function scratch(): string {
  const d = mkdtempSync(join(tmpdir(), 'kvmharness-mutants-test-'));
  dirs.push(d);
  return d;
}

describe('the KVM mutants', () => {
  const mutants = loadMutants();

  it('are at least 12, each with what it breaks, an x86 profile and one changed file of KVM', () => {
    expect(mutants.length).toBeGreaterThanOrEqual(12);
    const files = new Set<string>();
    for (const m of mutants) {
      expect(m.what.length, m.name).toBeGreaterThan(20);
      expect(PROFILES, m.name).toContain(m.profile);
      const changed = [...readFileSync(m.file, 'utf8').matchAll(/^\+\+\+ b\/(\S+)$/gm)].map((x) => x[1]!);
      expect(changed, m.name).toHaveLength(1);
      expect(changed[0], m.name).toMatch(/^(arch\/x86\/kvm|virt\/kvm)\//);
      files.add(changed[0]!.split('/').pop()!);
    }
    for (const f of ['tdp_mmu.c', 'mmu.c', 'spte.c', 'paging_tmpl.h', 'kvm_main.c']) expect([...files]).toContain(f);
  });

  it('refuses a patch without its header, naming the file', () => {
    const d = scratch();
    writeFileSync(join(d, 'x.patch'), 'diff --git a/f b/f\n');
    expect(() => loadMutants(d)).toThrow(/x\.patch: the first line must say what the patch breaks/);
  });

  it('is taken out of the tree after the run, also when the run throws', async () => {
    const d = scratch();
    const tree = join(d, 'tree');
    mkdirSync(join(tree, 'virt'), { recursive: true });
    writeFileSync(join(tree, 'virt', 'f.c'), 'a\nb\nc\n');
    const patch = join(d, '01-x.patch');
    writeFileSync(
      patch,
      'b becomes B\nprofile: npt-tdp\n\ndiff --git a/virt/f.c b/virt/f.c\n--- a/virt/f.c\n+++ b/virt/f.c\n@@ -1,3 +1,3 @@\n a\n-b\n+B\n c\n',
    );
    const [m] = loadMutants(d) as [KvmMutant];
    const seen = await withMutant(tree, m, async () => readFileSync(join(tree, 'virt', 'f.c'), 'utf8'));
    expect(seen).toBe('a\nB\nc\n');
    expect(readFileSync(join(tree, 'virt', 'f.c'), 'utf8')).toBe('a\nb\nc\n');
    await expect(
      withMutant(tree, m, async () => {
        throw new Error('the lab broke');
      }),
    ).rejects.toThrow('the lab broke');
    expect(readFileSync(join(tree, 'virt', 'f.c'), 'utf8')).toBe('a\nb\nc\n');
    writeFileSync(join(tree, 'virt', 'f.c'), 'x\n');
    await expect(withMutant(tree, m, async () => 0)).rejects.toThrow(/01-x does not apply to/);
  });
});

const cached = (() => {
  try {
    return execFileSync('sh', ['-c', 'ls -d "${XDG_CACHE_HOME:-$HOME/.cache}"/kvmharness/lab/kvm-mutants-6.1'], {
      encoding: 'utf8',
    }).trim();
  } catch {
    return undefined;
  }
})();
const skip = !process.env.KVMHARNESS_LAB ? 'set KVMHARNESS_LAB=1 to unpack the 6.1 source' : undefined;

describe.skipIf(skip !== undefined)(
  `the KVM mutants on Debian's 6.1 source${skip ? ` [skipped: ${skip}]` : ''}`,
  () => {
    it('each applies to the source of the lab kernel and comes out again', async () => {
      const { labSource } = await import('../src/lab/kvm-source.js');
      const tree = cached && existsSync(cached) ? cached : join(scratch(), 'src');
      if (tree !== cached) await labSource({ release: '6.1', dir: tree, log: () => {} });
      for (const m of loadMutants()) {
        const file = readFileSync(m.file, 'utf8').match(/^\+\+\+ b\/(\S+)$/m)![1]!;
        const before = readFileSync(join(tree, file), 'utf8');
        const during = await withMutant(tree, m, async () => readFileSync(join(tree, file), 'utf8'));
        expect(during, m.name).not.toBe(before);
        expect(readFileSync(join(tree, file), 'utf8'), m.name).toBe(before);
      }
    }, 300_000);
  },
);

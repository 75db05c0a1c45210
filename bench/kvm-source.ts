// lab_kvm_source_verdict_s: the patch-validation path, from an edit of a KVM
// source tree to the verdict. A tree from `lab source --release 6.1` is
// built and booted once as it is (tdp_spte_picture passes); then one line of
// arch/x86/kvm/mmu/tdp_mmu.c breaks the zapping of 4 KiB leaves, and the
// time from that edit through the incremental build, the boot and the check
// to its FAIL is the entry. The tree is kept in the cache, so later benches
// build incrementally from the start.
import { existsSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { tdpPicture } from '../src/checks/tdp.js';
import { Kvm } from '../src/kvm/kvm.js';
import { labCacheDir } from '../src/lab/fetch/index.js';
import { labSource, SOURCE_MARK } from '../src/lab/kvm-source.js';
import { openLab } from '../src/lab/session.js';
import { probe } from '../src/probe/probe.js';
import { runCheck } from '../src/run/runner.js';
import type { Outcome } from '../src/run/types.js';
import type { Entry } from './entry.js';

const RELEASE = '6.1';
const ZAP = 'tdp_mmu_set_spte(kvm, &iter, 0);';

/** tdp_mmu_zap_leafs with its zap restricted to huge leaves: MADV_DONTNEED of 4 KiB pages leaves them mapped. */
export function breakZapping(source: string): string {
  const fn = source.indexOf('static bool tdp_mmu_zap_leafs(');
  const at = fn < 0 ? -1 : source.indexOf(ZAP, fn);
  if (at < 0) throw new Error('tdp_mmu.c has no tdp_mmu_zap_leafs with the zap this bench edits');
  return `${source.slice(0, at)}if (iter.level > PG_LEVEL_4K) ${ZAP}${source.slice(at + ZAP.length)}`;
}

async function verdict(dir: string, log: (s: string) => void): Promise<Outcome> {
  const s = await openLab({ profile: 'npt-tdp', release: RELEASE, kvmSource: dir, log });
  try {
    const kvm = Kvm.open(s.target);
    try {
      return (await runCheck(tdpPicture(), kvm, probe(s.target))).outcome;
    } finally {
      kvm.close();
    }
  } finally {
    await s.close();
  }
}

export async function benchKvmSource(o: { log: (s: string) => void }): Promise<Entry> {
  const dir = join(labCacheDir(), 'bench-kvm-source');
  if (!existsSync(join(dir, SOURCE_MARK))) {
    rmSync(dir, { recursive: true, force: true });
    await labSource({ release: RELEASE, dir, log: o.log });
  }
  const file = join(dir, 'arch', 'x86', 'kvm', 'mmu', 'tdp_mmu.c');
  const original = readFileSync(file, 'utf8');
  o.log('kvm source: build and boot the tree as it is');
  const before = await verdict(dir, o.log);
  if (before !== 'pass') throw new Error(`tdp_spte_picture is ${before} with the unmodified ${RELEASE} tree`);
  const t0 = performance.now();
  writeFileSync(file, breakZapping(original));
  let after: Outcome;
  try {
    after = await verdict(dir, o.log);
  } finally {
    writeFileSync(file, original);
  }
  const s = (performance.now() - t0) / 1000;
  if (after !== 'fail') throw new Error(`tdp_spte_picture is ${after}, not fail, with 4 KiB zapping broken`);
  o.log(`lab_kvm_source_verdict_s: ${s.toFixed(1)} s`);
  return {
    name: 'lab_kvm_source_verdict_s',
    unit: 's',
    value: Number(s.toFixed(1)),
    note: `${RELEASE}, npt-tdp: one-line edit of tdp_mmu.c to tdp_spte_picture FAIL (incremental build, boot, check)`,
  };
}

// Lab benches: boot to the first check (lab_boot_s), and what one check costs
// inside the lab against the same check run on this host's KVM (lab_check_ms).
//
// The first needs the lab's kernel (fetched, or fetched here) and QEMU; where
// the lab cannot boot, the entries say why and carry no value.
import { SMOKE } from '../src/checks/smoke.js';
import { Kvm } from '../src/kvm/kvm.js';
import { localTarget } from '../src/target/local.js';
import type { Target } from '../src/kvm/target.js';
import { openLab } from '../src/lab/session.js';
import { probe } from '../src/probe/probe.js';
import { runCheck } from '../src/run/runner.js';
import type { Check } from '../src/run/types.js';

import type { Entry } from './entry.js';

const FIRST = 'real_mode_io';
const MEASURED = 'long_mode_store_load';

function check(name: string): Check {
  const c = SMOKE.find((x) => x.name === name);
  if (!c) throw new Error(`no smoke check ${name}`);
  return c;
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

/** ms per run of `c` against the KVM of `target`, over `n` runs; every run must pass. */
async function timeCheck(target: Target, c: Check, n: number): Promise<number[]> {
  const prof = probe(target);
  const kvm = Kvm.open(target);
  try {
    const out: number[] = [];
    for (let i = 0; i < n; i++) {
      const r = await runCheck(c, kvm, prof);
      if (r.outcome !== 'pass')
        throw new Error(`${c.name} did not pass (${r.outcome}${r.reason ? `: ${r.reason}` : ''})`);
      out.push(r.durationMs);
    }
    return out;
  } finally {
    kvm.close();
  }
}

/**
 * `boots` boots of the npt-tdp profile: each from QEMU's start to the end of
 * the first check; in the last boot, `runs` runs of one check, compared with
 * as many runs of it here (measured first, before the lab boots).
 */
export async function benchLab(o: { boots: number; runs: number; log: (s: string) => void }): Promise<Entry[]> {
  const local = await timeCheck(localTarget, check(MEASURED), o.runs);
  const bootS: number[] = [];
  let inLab: number[] = [];
  for (let b = 0; b < o.boots; b++) {
    o.log(`lab boot ${b + 1}/${o.boots}`);
    const t0 = performance.now();
    const s = await openLab({ profile: 'npt-tdp', log: (m) => void (b === 0 && o.log(m)) });
    try {
      await timeCheck(s.target, check(FIRST), 1);
      bootS.push((performance.now() - t0) / 1000);
      if (b === o.boots - 1) inLab = await timeCheck(s.target, check(MEASURED), o.runs);
    } finally {
      await s.close();
    }
  }
  const lab = median(inLab);
  const here = median(local);
  o.log(
    `lab_boot_s: boots ${bootS.map((x) => x.toFixed(2)).join(', ')} s; lab_check_ms: ${lab.toFixed(1)} ms in the lab, ${here.toFixed(1)} ms here`,
  );
  const round = (x: number, d: number): number => Number(x.toFixed(d));
  return [
    {
      name: 'lab_boot_s',
      unit: 's',
      value: round(median(bootS), 2),
      note: `npt-tdp, QEMU start to the end of ${FIRST}; boots ${bootS.map((x) => x.toFixed(2)).join(', ')}`,
    },
    {
      name: 'lab_check_ms',
      unit: 'ms',
      value: round(lab, 1),
      reference: round(here, 1),
      ratio: round(lab / here, 3),
      note: `${MEASURED}, median of ${o.runs}; reference: the same check on this host's KVM, not C`,
    },
  ];
}

// A non-canonical access on real KVM: #GP(0), CR2 untouched, no page walk
// (SDM vol. 3A §3.3.7.1). Before, the engine expected a #PF with error code -1.
import { expect, it } from 'vitest';
import type { Kvm } from '../src/kvm/kvm.js';
import type { HostProfile } from '../src/probe/probe.js';
import { scenarioCheck } from '../src/run/engine.js';
import { runCheck } from '../src/run/runner.js';
import { parseScenario } from '../src/scenario/load.js';
import { describeKvm, failures, withHost } from './support/kvm.js';

const SCENARIO = JSON.stringify({
  name: 'non_canonical',
  description: 'reads and a write in the non-canonical hole, between faults that load CR2',
  memslots: [{ slot: 1, gpa: '0x400000', size: '0x200000' }],
  mappings: [{ gva: '0x10000000', gpa: '0x401000', leaf: { w: true, u: true } }],
  steps: [
    { guest: 'read', gva: '0x10000000' },
    { guest: 'read', gva: '0x800000000000' },
    { guest: 'read', gva: '0x20000000' },
    { guest: 'read', gva: '0x800000000000', cpl: 3 },
    { guest: 'write', gva: '0x7ffffffffffc', size: 4, value: '0x1' },
    { guest: 'read', gva: '0x8000000000000000' },
  ],
});

describeKvm('non-canonical accesses', () => {
  let kvm: Kvm;
  let profile: HostProfile;
  withHost((k, p) => {
    kvm = k;
    profile = p;
  });

  it.skipIf(process.arch !== 'x64')('expect #GP(0) with CR2 unchanged, and no walk', async () => {
    const sc = parseScenario(SCENARIO, 'non_canonical');
    for (const trace of [false, true]) {
      const r = await runCheck(scenarioCheck(sc, { trace }), kvm, profile);
      if (r.outcome === 'not_applicable') continue; // the walker-trace variant without tracefs
      expect(r.outcome, failures(r)).toBe('pass');
      const gp = r.comparisons.filter((c) => c.what.endsWith(': exceptions') && c.expected.includes('vector: 13'));
      expect(gp.map((c) => c.what.replace(/: exceptions$/, ''))).toEqual([
        'step 1 read64 0x800000000000 cpl0',
        'step 3 read64 0x800000000000 cpl3',
        'step 5 read64 0x8000000000000000 cpl0',
      ]);
      // CR2 after a #GP is the address of the last #PF before it (none yet: 0).
      expect(gp.map((c) => c.expected)).toEqual([
        '[{cr2: 0x0, errorCode: 0x0, vector: 13}]',
        '[{cr2: 0x20000000, errorCode: 0x0, vector: 13}]',
        '[{cr2: 0x7ffffffffffc, errorCode: 0x0, vector: 13}]',
      ]);
    }
  });
});

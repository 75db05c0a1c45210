// The walk model's configuration is built in one place: every caller maps the
// CPU vendor the same way.
import { describe, expect, it } from 'vitest';
import { matrixConfig } from '../src/matrix/check.js';
import { pagingConfigOf, vendorOf } from '../src/model/paging.js';
import type { CpuFeatures } from '../src/probe/probe.js';

const cpu = (vendor: string): CpuFeatures => ({
  vendor,
  brand: '',
  maxPhyAddr: 46,
  linearAddressBits: 48,
  nx: true,
  smep: true,
  smap: true,
  pku: true,
  la57: false,
  pdpe1gb: false,
});
const mode = {
  levels: 4,
  cr0Wp: true,
  cr4Smep: false,
  cr4Smap: false,
  cr4Pke: false,
  efer: { nxe: true },
  pkru: 0,
} as const;

describe('paging configuration', () => {
  it("takes AMD's rules for AMD and Hygon guests and Intel's for every other", () => {
    expect(['AuthenticAMD', 'HygonGenuine', 'amd', 'GenuineIntel', 'intel', 'CentaurHauls'].map(vendorOf)).toEqual([
      'amd',
      'amd',
      'amd',
      'intel',
      'intel',
      'intel',
    ]);
    for (const v of ['AuthenticAMD', 'GenuineIntel', 'CentaurHauls'])
      expect(matrixConfig(cpu(v), 4, 0).vendor).toBe(vendorOf(v));
  });

  it('takes MAXPHYADDR and 1 GiB pages from the CPU, the rest from the mode; a vendor given overrides the CPU', () => {
    expect(pagingConfigOf(cpu('AuthenticAMD'), mode)).toEqual({
      ...mode,
      vendor: 'amd',
      maxPhyAddr: 46,
      pdpe1gb: false,
    });
    expect(pagingConfigOf(cpu('AuthenticAMD'), mode, { vendor: 'intel', walker: 'cpu' })).toMatchObject({
      vendor: 'intel',
      walker: 'cpu',
    });
    // Without a walker given the configuration has no walker key at all (the walk model's default, KVM's walker).
    expect('walker' in pagingConfigOf(cpu('GenuineIntel'), mode)).toBe(false);
  });
});

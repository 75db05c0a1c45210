import { describe, expect, it } from 'vitest';
import { atLeast, kernelBehaviours, kernelVersion } from '../src/model/kernel.js';

describe('kernel behaviours', () => {
  it('reads the version of a Debian release', () => {
    expect(kernelVersion('6.1.0-50-amd64')).toEqual([6, 1]);
    expect(kernelVersion('6.12.118+deb13-amd64')).toEqual([6, 12]);
    expect(kernelVersion('7.2.13+deb14-arm64')).toEqual([7, 2]);
    expect(kernelVersion(undefined)).toBeUndefined();
    expect(atLeast([6, 12], '6.13')).toBe(false);
    expect(atLeast([7, 2], '6.13')).toBe(true);
    expect(atLeast(undefined, '6.13')).toBe(true);
  });

  it('gives each lab release its TDP MMU behaviours, with the reason', () => {
    const on = (r: string) => Object.fromEntries(Object.entries(kernelBehaviours(r)).map(([k, v]) => [k, v.on]));
    expect(on('6.1.0-50-amd64')).toEqual({
      splitOnFault: false,
      recoverHugeInPlace: false,
      protectedStage2Level0: false,
    });
    expect(on('6.12.118+deb13-amd64')).toEqual({
      splitOnFault: true,
      recoverHugeInPlace: false,
      protectedStage2Level0: true,
    });
    expect(on('7.2.13+deb14-amd64')).toEqual({
      splitOnFault: true,
      recoverHugeInPlace: true,
      protectedStage2Level0: true,
    });
    expect(kernelBehaviours('6.12.118+deb13-amd64').recoverHugeInPlace.why).toMatch(
      /zaps collapsible .* \(6\.12 < 6\.13\)/,
    );
  });

  it('compares major before minor, and counts the release named as reached', () => {
    expect(atLeast([6, 13], '6.13')).toBe(true);
    expect(atLeast([7, 0], '6.13')).toBe(true);
    expect(atLeast([5, 20], '6.13')).toBe(false);
    expect(atLeast([6, 2], '6.2')).toBe(true);
    expect(atLeast([6, 1], '6.2')).toBe(false);
    expect(kernelVersion('10.1.0-1-amd64')).toEqual([10, 1]);
    expect(kernelVersion('')).toBeUndefined();
    expect(kernelVersion('linux-6.1')).toBeUndefined();
  });

  it('names the kernel function behind each behaviour on either side of its release', () => {
    const old = kernelBehaviours('6.1.0-50-amd64');
    const now = kernelBehaviours('7.2.13+deb14-amd64');
    expect(now.splitOnFault.why).toMatch(
      /^a TDP MMU fault below a present huge leaf splits .*tdp_mmu_split_huge_page\) \(7\.2 >= 6\.2\)$/,
    );
    expect(old.splitOnFault.why).toMatch(/^a TDP MMU fault below a present huge leaf zaps it .* \(6\.1 < 6\.2\)$/);
    expect(now.recoverHugeInPlace.why).toMatch(/kvm_tdp_mmu_recover_huge_pages\) \(7\.2 >= 6\.13\)$/);
    expect(old.recoverHugeInPlace.why).toMatch(/zap_collapsible_spte_range\) \(6\.1 < 6\.13\)$/);
    expect(now.protectedStage2Level0.why).toMatch(/walked from level 0 .* \(7\.2 >= 6\.12\)$/);
    expect(old.protectedStage2Level0.why).toMatch(/walked from level 1 \(40-bit IPA\).* \(6\.1 < 6\.12\)$/);
    const unknown = kernelBehaviours(undefined);
    expect(unknown.splitOnFault).toEqual({
      on: true,
      why: expect.stringMatching(/\(release unknown, assumed >= 6\.2\)$/),
    });
  });
});

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
});

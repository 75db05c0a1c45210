// The deliberately wrong models' vocabulary: what KVMHARNESS_WRONG_MODEL may name.
import { describe, expect, it } from 'vitest';
import { parseWrong, WRONG_ENV, WRONG_SHADOWS, WRONG_WALKS } from '../src/model/wrong.js';

describe('parseWrong', () => {
  it('reads every walk rule, the TDP mistakes, the race and shadow mistakes, several at once', () => {
    for (const w of WRONG_WALKS) expect(parseWrong(`walk=${w}`)).toEqual({ walk: new Set([w]) });
    for (const s of WRONG_SHADOWS) expect(parseWrong(`shadow=${s}`)).toEqual({ shadow: s });
    expect(parseWrong('tdp=levelOffByOne, tdp=noCollapse,walk=ignore-wp , race=dropDirtyBit')).toEqual({
      tdp: { levelOffByOne: true, noCollapse: true },
      walk: new Set(['ignore-wp']),
      race: { dropDirtyBit: true },
    });
    expect(parseWrong('tdp=zapOneShort')).toEqual({ tdp: { zapOneShort: true } });
    expect(parseWrong(' , ')).toEqual({});
  });

  it('refuses an unknown model or mistake, naming the part and the variable', () => {
    for (const bad of ['walk=nope', 'tdp=noFlush', 'race=other', 'shadow=never', 'wat', 'walk'])
      expect(() => parseWrong(`walk=ignore-nx,${bad}`)).toThrow(`${WRONG_ENV}: unknown wrong model '${bad}'`);
  });
});

// The unit tests of the models and the differ, without KVM: what `npm run
// mutation` runs against each mutant of src/model/ and src/run/differ.ts.
import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: [
      'test/differ.test.ts',
      'test/spte.test.ts',
      'test/walk.test.ts',
      'test/paging.test.ts',
      'test/tdp.test.ts',
      'test/memslots.test.ts',
      'test/nested.test.ts',
      'test/shadow-model.test.ts',
      'test/kernel-behaviour.test.ts',
      'test/vm-model.test.ts',
      'test/legacy-model.test.ts',
      'test/tdp-follow.test.ts',
      'test/legacy-follow.test.ts',
      'test/scenario.test.ts',
      'test/tdp-picture.test.ts',
      'test/hostmem.test.ts',
      'test/engine.test.ts',
      'test/wrong.test.ts',
      'test/vocab.test.ts',
      'test/translate-dirty-range.test.ts',
      'test/gmem.test.ts',
      'test/fuzz-gen.test.ts',
      'test/repro-c.test.ts',
      'test/model-edges.test.ts',
    ],
    env: { KVMHARNESS_NO_KVM: '1' },
    testTimeout: 120_000,
    hookTimeout: 120_000,
  },
});

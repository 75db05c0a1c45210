import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    globalSetup: ['test/support/build.ts'],
    reporters: ['default', './test/support/summary.ts'],
    testTimeout: 120_000,
    hookTimeout: 120_000,
    // KVM tests create VMs and vCPU threads; one file at a time keeps a 2-core
    // machine from being oversubscribed.
    fileParallelism: false,
  },
});

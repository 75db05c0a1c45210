import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    testTimeout: 60_000,
    hookTimeout: 60_000,
    // KVM tests create VMs and vCPU threads; keep files in one process at a time
    // so that a 2-core machine is not oversubscribed and timings stay sane.
    fileParallelism: false,
  },
});

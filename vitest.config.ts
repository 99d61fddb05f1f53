import { defineConfig } from 'vitest/config';

// tgtd, e2fsck, mkfs.ext4 and nbd-client live in /usr/sbin, often not on a user's PATH; scripts/setup
// finds them there, so the tests (forked with this environment) must too.
const dirs = (process.env.PATH ?? '').split(':');
process.env.PATH = [...dirs, ...['/usr/sbin', '/sbin'].filter((d) => !dirs.includes(d))].join(':');

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    globalSetup: ['test/helpers/global-setup.ts'],
    setupFiles: ['test/helpers/setup-env.ts'],
    testTimeout: 120_000,
    hookTimeout: 120_000,
    pool: 'forks',
    maxWorkers: 2,
    reporters: ['default'],
  },
});

// Every `up` the suite starts, and every CLI command it runs, finds the admin token in the
// environment (one of the documented ways to give it: docs/SECURITY.md). The way `up` makes a
// token file on first start, and the CLI finds it there, is tested by test/security-admin.test.ts,
// which clears this variable for its own processes.
import { randomBytes } from 'node:crypto';
import { afterAll } from 'vitest';
import { removeTmpDirs } from './servers.js';

process.env.BLOCKMIRROR_ADMIN_TOKEN ??= `test-${randomBytes(16).toString('hex')}`;

// Registered before the file's own hooks, so it runs after them (vitest runs after-hooks as a
// stack): the file has stopped its servers by then. A file's directories go when it ends, not
// when the whole run does, so a run never holds more than its running files' data on disk.
afterAll(removeTmpDirs);

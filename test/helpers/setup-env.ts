// Every `up` the suite starts, and every CLI command it runs, finds the admin token in the
// environment (one of the documented ways to give it: docs/SECURITY.md). The way `up` makes a
// token file on first start, and the CLI finds it there, is tested by test/security-admin.test.ts,
// which clears this variable for its own processes.
import { randomBytes } from 'node:crypto';

process.env.BLOCKMIRROR_ADMIN_TOKEN ??= `test-${randomBytes(16).toString('hex')}`;

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

// BLOCKMIRROR_CPU_LOG=FILE: each test file appends the CPU it used (its worker, and every process it
// started and reaped: servers, clients, VMs), to find what makes the suite slow on a loaded machine
// (scripts/suite-cpu sums it up). From /proc/self/stat: utime, stime, cutime, cstime in clock ticks.
const cpuLog = process.env.BLOCKMIRROR_CPU_LOG;
if (cpuLog) {
  const { readFileSync, appendFileSync } = await import('node:fs');
  const { beforeAll, expect } = await import('vitest');
  const ticks = (): [number, number] => {
    const f = readFileSync('/proc/self/stat', 'utf8').split(') ')[1]!.split(' ');
    return [Number(f[11]) + Number(f[12]), Number(f[13]) + Number(f[14])];
  };
  let start: [number, number] = [0, 0];
  const wall = Date.now();
  beforeAll(() => {
    start = ticks();
  });
  afterAll(() => {
    const [self, children] = ticks();
    const file = (expect.getState().testPath ?? 'unknown').replace(/^.*\/test\//, 'test/');
    appendFileSync(cpuLog, `${file}\t${(self - start[0]) / 100}\t${(children - start[1]) / 100}\t${(Date.now() - wall) / 1000}\n`);
  });
}

// One temporary directory per test run, under the system's own: every test process (forked
// with this environment) and every server it starts puts its files there through TMPDIR, and
// the whole directory goes when the run ends, passed or failed. A run leaves nothing behind,
// however a test ends (a CI run once failed when leaked etcd data dirs filled the disk).
// BLOCKMIRROR_KEEP_TMP=1 keeps it for a post-mortem; its path is printed at the start.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

export default function setup(): () => void {
  const run = fs.mkdtempSync(path.join(os.tmpdir(), 'bm-run-'));
  process.env.TMPDIR = run;
  if (process.env.BLOCKMIRROR_KEEP_TMP) console.log(`test files in ${run} (kept: BLOCKMIRROR_KEEP_TMP)`);
  return () => {
    if (!process.env.BLOCKMIRROR_KEEP_TMP) fs.rmSync(run, { recursive: true, force: true, maxRetries: 5 });
  };
}

// libiscsi's iscsi-test-cu, the whole suite, against our target and against tgt in the same run.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import fs from 'node:fs';
import path from 'node:path';
import { requireTools } from './helpers/clients.js';
import { parseCu, startIscsiServe, startTgtd, type CuSummary, type IscsiServe, type Tgtd } from './helpers/iscsi.js';
import { freePort, run, tmpDir } from './helpers/servers.js';

const SIZE = 256 << 20;

describe('iscsi-test-cu -t ALL --dataloss', () => {
  let ours: IscsiServe;
  let tgt: Tgtd;
  let dir: string;

  beforeAll(async () => {
    requireTools('iscsi-test-cu', 'tgtd', 'tgtadm');
    dir = tmpDir('bm-iscsi-cu-');
    const file = path.join(dir, 'tgt.img');
    fs.writeFileSync(file, '');
    fs.truncateSync(file, SIZE);
    ours = await startIscsiServe(['--size', '256MiB']);
    tgt = await startTgtd(file);
  });

  afterAll(async () => {
    await ours?.stop();
    await tgt?.stop();
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  async function suite(url: string): Promise<CuSummary> {
    // iscsi-test-cu writes CUnit files into its working directory.
    const r = await run('nice', ['-n', '10', 'iscsi-test-cu', '-d', '-t', 'ALL', url], { timeoutMs: 280_000, cwd: dir });
    return parseCu(r.stdout + r.stderr);
  }

  it('passes every test on our target and skips fewer as "not implemented" than tgt', async () => {
    const mine = await suite(ours.lunUrl);
    const theirs = await suite(tgt.lunUrl);
    const report = { ours: { run: mine.run, passed: mine.passed, failed: mine.failures, notImplemented: mine.notImplemented.length }, tgt: { run: theirs.run, passed: theirs.passed, failed: theirs.failures, notImplemented: theirs.notImplemented.length } };
    console.log(JSON.stringify(report, null, 1));
    expect(mine.run).toBeGreaterThanOrEqual(200);
    expect(mine.failures).toEqual([]);
    expect(mine.failed).toBe(0);
    expect(mine.passed).toBe(mine.run);
    expect(theirs.run).toBeGreaterThanOrEqual(200); // tgt really ran, so the comparison means something
    expect(mine.notImplemented.length).toBeLessThan(theirs.notImplemented.length);
  }, 600_000);
});

describe('iscsi-test-cu multipath tests through two portals of one target', () => {
  let mp: IscsiServe;
  let second: number;
  let dir: string;
  beforeAll(async () => {
    requireTools('iscsi-test-cu');
    dir = tmpDir('bm-iscsi-mp-');
    second = await freePort();
    mp = await startIscsiServe(['--size', '64MiB', '--iscsi-portal', `127.0.0.1:${second}`]);
  });
  afterAll(async () => {
    await mp?.stop();
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  // MultipathIO.Reset is left out: it needs unit attentions after a LUN reset, which we do not raise yet (docs/iscsi.md).
  for (const t of ['Simple', 'CompareAndWrite', 'CompareAndWriteAsync']) {
    it(`passes MultipathIO.${t} with one path per portal`, async () => {
      const other = mp.lunUrl.replace(`:${mp.iscsiPort}/`, `:${second}/`);
      const r = await run('iscsi-test-cu', ['-d', '-t', `ALL.MultipathIO.${t}`, mp.lunUrl, other], { timeoutMs: 120_000, cwd: dir });
      const sum = parseCu(r.stdout + r.stderr);
      expect(r.stdout + r.stderr).toContain('found matching LU device identifier for all (2) paths');
      expect(sum).toMatchObject({ run: 1, passed: 1, failed: 0, skips: [] });
    }, 150_000);
  }
});

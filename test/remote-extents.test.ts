// Never stale through the paths that describe data (issue 11, part 1): a remote mirror whose sync
// daemon is behind never reports its Invalid clusters as holes, so sparse-aware copies from it
// (nbdcopy and qemu-img, which skip holes) equal the master byte for byte.
import fs from 'node:fs';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { nbdinfoMap, pseudoRandom } from './helpers/clients.js';
import { SSProcess, loopbackAddrs, twoSSYaml, writeConfig } from './helpers/remote.js';
import { run, tmpDir } from './helpers/servers.js';

const MiB = 1024 * 1024;
const procs: SSProcess[] = [];
afterEach(async () => {
  await Promise.all(procs.splice(0).map((p) => p.kill()));
});

async function start(mode: 'sync' | 'async') {
  const [a, b] = await loopbackAddrs();
  // The daemon copies 256 KiB/s: the mirror stays behind for the whole test.
  const cfg = writeConfig(twoSSYaml(a, b, [{ name: 'p', mode, vol: 1, syncRate: '256KiB' }], { peerTimeout: '2s', size: '32MiB' }));
  const ss1 = new SSProcess(1, cfg.file, a);
  const ss2 = new SSProcess(2, cfg.file, b);
  procs.push(ss1, ss2);
  await ss1.start();
  await ss2.start();
  await ss1.waitPair('p', (x) => x.state === 'PAIR', 'PAIR');
  return { cfg, ss1, ss2 };
}

async function writeRandom(uri: string, dir: string, offset: number, data: Buffer): Promise<void> {
  const file = path.join(dir, `w-${offset}.bin`);
  fs.writeFileSync(file, data);
  const r = await run('qemu-io', ['-f', 'raw', '-c', `write -s ${file} ${offset} ${data.length}`, uri]);
  expect(r.code, r.stderr + r.stdout).toBe(0);
}

async function expectCopiesEqualMaster(ss1: SSProcess, ss2: SSProcess, dir: string, from: number, length: number): Promise<void> {
  const extents = await nbdinfoMap(ss2.uri(1));
  const holes = extents.filter((e) => (e.type & 1) !== 0 && e.offset < from + length && e.offset + e.length > from);
  expect(holes, 'nbdinfo --map of the mirror shows a hole where the master has data').toEqual([]);
  const master = path.join(dir, 'master.img');
  const viaNbdcopy = path.join(dir, 'nbdcopy.img');
  const viaQemu = path.join(dir, 'qemu.img');
  expect((await run('nbdcopy', [ss1.uri(1), master])).code).toBe(0);
  const c = await run('nbdcopy', [ss2.uri(1), viaNbdcopy]);
  expect(c.code, c.stderr).toBe(0);
  const q = await run('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', ss2.uri(1), viaQemu]);
  expect(q.code, q.stderr).toBe(0);
  const want = fs.readFileSync(master);
  expect(fs.readFileSync(viaNbdcopy).equals(want), 'nbdcopy of the mirror equals the master').toBe(true);
  expect(fs.readFileSync(viaQemu).equals(want), 'qemu-img convert of the mirror equals the master').toBe(true);
}

describe('extents of a remote mirror that is behind', () => {
  it('async: never a hole where the master wrote, and sparse copies from the mirror equal the master', async () => {
    const { ss1, ss2 } = await start('async');
    const dir = tmpDir('bm-ext-');
    await writeRandom(ss1.uri(1), dir, 4 * MiB, pseudoRandom(6 * MiB, 11));
    const p = await ss1.pair('p');
    expect(p!.mirrors[0]!.invalidClusters).toBeGreaterThan(0); // the daemon is behind: the test means something
    await expectCopiesEqualMaster(ss1, ss2, dir, 4 * MiB, 6 * MiB);
  });

  it('sync in COPY after a split and a throttled resync: same', async () => {
    const { cfg, ss1, ss2 } = await start('sync');
    const dir = tmpDir('bm-ext-');
    const cli = (...args: string[]) => run(process.execPath, [ss1.cliPath, ...args]);
    expect((await cli('pair', 'split', 'p', '-c', cfg.file)).code).toBe(0);
    await writeRandom(ss1.uri(1), dir, 8 * MiB, pseudoRandom(6 * MiB, 12));
    expect((await cli('pair', 'resync', 'p', '-c', cfg.file)).code).toBe(0);
    const p = await ss1.waitPair('p', (x) => x.state === 'COPY' && x.mirrors[0]!.connected === true, 'COPY');
    expect(p.mirrors[0]!.invalidClusters).toBeGreaterThan(0);
    await expectCopiesEqualMaster(ss1, ss2, dir, 8 * MiB, 6 * MiB);
  });
});

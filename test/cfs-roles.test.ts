// The CFS follows its pairs' states and roles (issue 11): reads only from current copies, writes
// to the pair's current master. A swap in the middle of a loop of puts and gets, a split while
// files are read and rewritten, and a takeover after kill -9 of the master's storage system: no
// put or get fails, none returns old bytes, and every file is checked byte for byte at the end.
// Two storage systems in two processes; the CFS server runs in storage system 2's.
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { SSProcess, inSync, loopbackAddrs, twoSSYaml, writeConfig } from './helpers/remote.js';
import { CLI, freePort, run } from './helpers/servers.js';

const procs: SSProcess[] = [];
afterEach(async () => {
  await Promise.all(procs.splice(0).map((p) => p.kill()));
});

async function cluster(mode: 'sync' | 'async') {
  const [a, b] = await loopbackAddrs();
  const cfsPort = await freePort();
  const yaml = `${twoSSYaml(a, b, [{ name: 'p', mode, vol: 1 }], { peerTimeout: '1s', size: '64MiB' })}cfs:\n  listen: 127.0.0.1:${cfsPort}\n  dataDir: meta\n  ss: 2\n  blockSize: 64KiB\n`;
  const { dir, file } = writeConfig(yaml);
  const ss1 = new SSProcess(1, file, a);
  const ss2 = new SSProcess(2, file, b);
  procs.push(ss1, ss2);
  await Promise.all([ss1.start(), ss2.start()]);
  await ss1.waitPair('p', inSync, 'in sync');
  const cfs = (args: string[]) => run(process.execPath, [CLI, 'cfs', ...args, '-c', file], { timeoutMs: 60_000 });
  const pair = (args: string[]) => run(process.execPath, [CLI, 'pair', ...args, '-c', file], { timeoutMs: 60_000 });
  /** put random bytes at `name`, returning them. */
  const put = async (name: string, bytes: number) => {
    const data = crypto.randomBytes(bytes);
    const local = path.join(dir, `in-${path.basename(name)}`);
    fs.writeFileSync(local, data);
    const r = await cfs(['put', local, name]);
    expect(r.code, `put ${name}: ${r.stderr}`).toBe(0);
    return data;
  };
  const get = async (name: string) => {
    const out = path.join(dir, `out-${path.basename(name)}-${crypto.randomBytes(4).toString('hex')}`);
    const r = await cfs(['get', name, out]);
    expect(r.code, `get ${name}: ${r.stderr}`).toBe(0);
    return fs.readFileSync(out);
  };
  return { dir, file, ss1, ss2, cfs, pair, put, get };
}

describe('the CFS across role and state changes', () => {
  it('keeps putting and getting through a swap, writing to the new master, every file intact', async () => {
    const c = await cluster('sync');
    const files = new Map<string, Buffer>();
    let swap: Promise<{ code: number | null; stderr: string }> | undefined;
    for (let i = 0; i < 8; i++) {
      if (i === 3) swap = c.pair(['swap', 'p']);
      const name = `/f${i}`;
      files.set(name, await c.put(name, 1024 * 1024 + i * 4099));
      expect((await c.get(name)).equals(files.get(name)!), `${name} right after its put`).toBe(true);
    }
    const s = await swap!;
    expect(s.code, s.stderr).toBe(0);
    const after = await c.ss2.waitPair('p', (p) => p.role === 'master' && p.state === 'PAIR', 'ss2 master');
    expect(after.epoch).toBe(2);
    // Writes after the swap went to storage system 2, and every file reads back whole.
    files.set('/after', await c.put('/after', 3 * 1024 * 1024));
    for (const [name, data] of files) expect((await c.get(name)).equals(data), name).toBe(true);
  });

  it('never serves the split mirror: a file rewritten after the split reads back new, every time', async () => {
    const c = await cluster('async');
    const before = await c.put('/doc', 2 * 1024 * 1024);
    // Reads are spread over both copies while the pair is in sync.
    for (let i = 0; i < 3; i++) expect((await c.get('/doc')).equals(before)).toBe(true);
    const split = await c.pair(['split', 'p']);
    expect(split.code, split.stderr).toBe(0);
    const now = await c.put('/doc', 2 * 1024 * 1024);
    for (let i = 0; i < 6; i++) expect((await c.get('/doc')).equals(now), `get ${i} after the split`).toBe(true);
    const resync = await c.pair(['resync', 'p']);
    expect(resync.code, resync.stderr).toBe(0);
    await c.ss1.waitPair('p', inSync, 'in sync again');
    for (let i = 0; i < 3; i++) expect((await c.get('/doc')).equals(now)).toBe(true);
  });

  it('goes on after kill -9 of the master and a takeover: old files whole, new writes on the survivor', async () => {
    const c = await cluster('sync');
    const files = new Map<string, Buffer>();
    for (let i = 0; i < 3; i++) files.set(`/k${i}`, await c.put(`/k${i}`, 512 * 1024 + i));
    await c.ss1.kill('SIGKILL');
    await c.ss2.waitPair('p', (p) => p.stale === true || p.state === 'PSUE', 'the master gone');
    const t = await c.pair(['takeover', 'p']);
    expect(t.code, t.stderr).toBe(0);
    await c.ss2.waitPair('p', (p) => p.role === 'master', 'ss2 master');
    files.set('/after', await c.put('/after', 1024 * 1024));
    for (const [name, data] of files) expect((await c.get(name)).equals(data), name).toBe(true);
  });
});

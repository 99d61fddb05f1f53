// Kodama's figure 5 layouts (issue 11): one pair's master in storage system 1 and its mirrors in
// storage systems 2 and 3 (three processes), and a pair mixing a mirror inside the master's
// storage system with one in another. For each: writes, reads of every mirror while the async
// one lags (they fall back to the master), kill -9 of one mirror's storage system with writes
// going on, its return and resync, the CFS on top; every copy byte for byte at the end.
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SSProcess, inSync, qemuIo, sameBytes, writeConfig, type SSAddr } from './helpers/remote.js';
import { CLI, freePort, run } from './helpers/servers.js';

let dir: string;
let file: string;
const ss: SSProcess[] = [];

beforeAll(async () => {
  const addr = async (): Promise<SSAddr> => ({ host: '127.0.0.1', nbd: await freePort(), admin: await freePort(), peer: await freePort() });
  const a = [await addr(), await addr(), await addr()];
  const cfsPort = await freePort();
  const sys = (id: number, s: SSAddr, vols: number[]) =>
    `  - id: ${id}\n    nbd: 127.0.0.1:${s.nbd}\n    admin: 127.0.0.1:${s.admin}\n    peer: 127.0.0.1:${s.peer}\n    dataDir: ss${id}\n    volumes: [ ${vols.map((v) => `{ id: ${v}, size: 32MiB }`).join(', ')} ]`;
  const cfg = writeConfig(`peerTimeout: 1s
storageSystems:
${sys(1, a[0]!, [1, 2, 3])}
${sys(2, a[1]!, [1, 2])}
${sys(3, a[2]!, [1])}
pairs:
  - { name: fig5, mode: sync, master: { ss: 1, vol: 1 }, mirrors: [ { ss: 2, vol: 1 }, { ss: 3, vol: 1 } ] }
  - { name: mixed, mode: async, master: { ss: 1, vol: 2 }, mirrors: [ { ss: 1, vol: 3 }, { ss: 2, vol: 2 } ], syncRate: 256KiB }
cfs:
  listen: 127.0.0.1:${cfsPort}
  dataDir: meta
  blockSize: 64KiB
`);
  dir = cfg.dir;
  file = cfg.file;
  for (let i = 0; i < 3; i++) ss.push(new SSProcess(i + 1, file, a[i]!));
  await Promise.all(ss.map((s) => s.start()));
  await ss[0]!.waitPair('fig5', inSync, 'fig5 in sync');
  await ss[0]!.waitPair('mixed', inSync, 'mixed in sync');
});

afterAll(async () => {
  await Promise.all(ss.map((s) => s.kill()));
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

const cfs = (args: string[]) => run(process.execPath, [CLI, 'cfs', ...args, '-c', file], { timeoutMs: 60_000 });
const copies = { fig5: [[0, 1], [1, 1], [2, 1]], mixed: [[0, 2], [0, 3], [1, 2]] } as const;

async function putGet(name: string, pair: string, bytes: number): Promise<Buffer> {
  const data = crypto.randomBytes(bytes);
  const local = path.join(dir, `${pair}-${path.basename(name)}`);
  fs.writeFileSync(local, data);
  const put = await cfs(['put', '--pair', pair, local, name]);
  expect(put.code, put.stderr).toBe(0);
  const out = `${local}.out`;
  const get = await cfs(['get', name, out]);
  expect(get.code, get.stderr).toBe(0);
  expect(fs.readFileSync(out).equals(data), name).toBe(true);
  return data;
}

describe("Kodama's figure 5: a pair's mirrors in two other storage systems, and local with remote", () => {
  it('reads the master data from every mirror, the lagging async ones included', async () => {
    expect((await qemuIo(ss[0]!.uri(1), ['write -P 0x51 0 4M'])).code).toBe(0);
    expect((await qemuIo(ss[0]!.uri(2), ['write -P 0x52 0 4M'])).code).toBe(0);
    const mixed = await ss[0]!.pair('mixed');
    expect(mixed!.mirrors.some((m) => m.invalidClusters > 0)).toBe(true); // 256 KiB/s: still copying
    for (const [i, vol] of copies.fig5.slice(1)) {
      const r = await qemuIo(ss[i]!.uri(vol), ['read -P 0x51 0 4M'], true);
      expect(r.code, `fig5 on ss${i + 1}: ${r.stdout}`).toBe(0);
    }
    for (const [i, vol] of copies.mixed.slice(1)) {
      const r = await qemuIo(ss[i]!.uri(vol), ['read -P 0x52 0 4M'], true);
      expect(r.code, `mixed ss${i + 1}/vol${vol}: ${r.stdout}`).toBe(0);
    }
  });

  it('keeps writing through kill -9 of one mirror storage system, resyncs it, and the CFS works throughout', async () => {
    const files = new Map<string, Buffer>();
    files.set('/a', await putGet('/a', 'fig5', 700_000));
    files.set('/b', await putGet('/b', 'mixed', 900_000));
    await ss[2]!.kill('SIGKILL');
    const down = await ss[0]!.waitPair('fig5', (p) => p.state === 'PSUE', 'fig5 suspended');
    expect(down.error).toMatch(/storage system 3/);
    expect((await qemuIo(ss[0]!.uri(1), ['write -P 0x61 8M 2M'])).code).toBe(0);
    files.set('/c', await putGet('/c', 'fig5', 1_000_000));
    // The other mirror of fig5 still takes every write at once (sync): read it there.
    const r = await qemuIo(ss[1]!.uri(1), ['read -P 0x61 8M 2M'], true);
    expect(r.code, r.stdout).toBe(0);
    await ss[2]!.start();
    await ss[0]!.waitPair('fig5', inSync, 'fig5 in sync again', 30_000);
    await ss[0]!.waitPair('mixed', inSync, 'mixed in sync', 60_000);
    for (const [name, data] of files) {
      const out = path.join(dir, `final-${name.slice(1)}`);
      const g = await cfs(['get', name, out]);
      expect(g.code, g.stderr).toBe(0);
      expect(fs.readFileSync(out).equals(data), name).toBe(true);
    }
  });

  it('ends with every copy equal to its master, byte for byte', async () => {
    for (const [pair, list] of Object.entries(copies)) {
      const [mi, mv] = list[0]!;
      for (const [i, vol] of list.slice(1)) {
        expect(await sameBytes(ss[mi]!.volumeFile(dir, mv), ss[i]!.volumeFile(dir, vol)), `${pair}: ss${i + 1}/vol${vol}`).toBe(true);
      }
    }
  });
});

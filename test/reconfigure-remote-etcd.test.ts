// A logical volume on a real 3-member etcd gains a mirror in a third storage system at run time
// (issue 16): its row in the volume mirrors table shows the new mirror COPY, then PAIR, while the
// mirror it had stays PAIR (promotable) throughout; removed, the new mirror leaves the row.
import fs from 'node:fs';
import path from 'node:path';
import { Etcd3 } from 'etcd3';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { EtcdCluster } from './helpers/etcd.js';
import { SSProcess, inSync, nSSPairYaml, type SSAddr } from './helpers/remote.js';
import { CLI, freePort, run, tmpDir } from './helpers/servers.js';

let etcd: EtcdCluster;
beforeAll(async () => {
  etcd = await EtcdCluster.start(3);
}, 60_000);
afterAll(async () => {
  await etcd?.stop();
});

const procs: SSProcess[] = [];
afterEach(async () => {
  await Promise.all(procs.splice(0).map((p) => p.kill()));
});

function yaml(prefix: string, a: SSAddr[], mirrors: number[], rate?: string): string {
  return nSSPairYaml(a, mirrors, { name: 'lv1', syncRate: rate, tail: `etcd:\n  endpoints: [ ${etcd.endpoints.join(', ')} ]\n  prefix: ${prefix}\n  leaseTtl: 2s\n` });
}

type Row = { ss: number; vol: number; state: string }[];

async function waitFor<T>(what: string, probe: () => T | undefined | Promise<T | undefined>, ms = 90_000): Promise<T> {
  const deadline = Date.now() + ms;
  while (Date.now() < deadline) {
    const v = await probe();
    if (v !== undefined) return v;
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`timed out waiting for ${what}`);
}

describe('a mirror in another storage system joins and leaves a logical volume on etcd', () => {
  it('the mirrors row shows the new mirror COPY, then PAIR, the old one PAIR all along, and loses the new one when it is removed', { timeout: 300_000 }, async () => {
    const prefix = `/bm-reconf-remote-${process.pid}`;
    const a: SSAddr[] = [];
    for (let i = 0; i < 3; i++) a.push({ host: '127.0.0.1', nbd: await freePort(), admin: await freePort(), peer: await freePort() });
    const dir = tmpDir('bm-reconf-remote-etcd-');
    const file = path.join(dir, 'cluster.yaml');
    fs.writeFileSync(file, yaml(prefix, a, [2]));
    const ss = [1, 2, 3].map((id) => new SSProcess(id, file, a[id - 1]!));
    procs.push(...ss);
    for (const p of ss) await p.start();
    await ss[0]!.waitPair('lv1', inSync, 'PAIR');
    // Some data, so the full copy has something to do.
    const w = await run('nbdcopy', ['--', '[', 'nbdkit', 'pattern', '16M', ']', ss[0]!.uri(1)]);
    expect(w.code, w.stderr).toBe(0);

    const client = new Etcd3({ hosts: etcd.endpoints.map((e) => `http://${e}`) });
    const rows: Row[] = [];
    const watcher = await client.watch().key(`${prefix}/mirrors/lv1`).create();
    watcher.on('put', (kv) => rows.push((JSON.parse(kv.value.toString()) as { mirrors: Row }).mirrors));
    try {
      await waitFor('2:1 in PAIR in the mirrors table', () => (rows.at(-1)?.some((m) => m.ss === 2 && m.state === 'PAIR') ? true : undefined));
      const from = rows.length - 1;
      fs.writeFileSync(file, yaml(prefix, a, [2, 3], '2MiB'));
      const added = await run(process.execPath, [CLI, 'apply', '-c', file], { timeoutMs: 120_000 });
      expect(added.code, added.stderr).toBe(0);
      await waitFor('3:1 in COPY in the mirrors table', () => (rows.some((r) => r.some((m) => m.ss === 3 && m.state === 'COPY')) ? true : undefined));
      fs.writeFileSync(file, yaml(prefix, a, [2, 3]));
      expect((await run(process.execPath, [CLI, 'apply', '-c', file], { timeoutMs: 120_000 })).code).toBe(0);
      await waitFor('3:1 in PAIR in the mirrors table', () => (rows.at(-1)?.some((m) => m.ss === 3 && m.state === 'PAIR') ? true : undefined));
      const firstCopy = rows.findIndex((r) => r.some((m) => m.ss === 3 && m.state === 'COPY'));
      const firstPair = rows.findIndex((r) => r.some((m) => m.ss === 3 && m.state === 'PAIR'));
      expect(firstCopy).toBeGreaterThan(-1);
      expect(firstCopy).toBeLessThan(firstPair);
      // The mirror the volume had was never outdated by the change: a failover could promote it throughout.
      expect(rows.slice(from).flatMap((r) => r.filter((m) => m.ss === 2).map((m) => m.state)).filter((s) => s !== 'PAIR')).toEqual([]);

      fs.writeFileSync(file, yaml(prefix, a, [2]));
      const removed = await run(process.execPath, [CLI, 'apply', '-c', file], { timeoutMs: 120_000 });
      expect(removed.code, removed.stderr).toBe(0);
      await waitFor('the mirrors table without 3:1', () => {
        const last = rows.at(-1);
        return last && last.length === 1 && last[0]!.ss === 2 && last[0]!.state === 'PAIR' ? true : undefined;
      });
      for (const p of ss) await p.kill('SIGTERM');
      for (const id of [2, 3]) expect((await run('cmp', [ss[0]!.volumeFile(dir, 1), ss[id - 1]!.volumeFile(dir, 1)])).code).toBe(0);
    } finally {
      await watcher.cancel();
      client.close();
    }
  });
});

// Live reconfiguration of a cluster on a real 3-member etcd (docs/cluster.md): a storage system
// added at run time registers and appears in the tables; a mirror added to a logical volume
// under fio --verify shows in the volume mirrors table as COPY, then PAIR; a mirror removed
// leaves the table. The copies are compared byte for byte at the end.
import fs from 'node:fs';
import path from 'node:path';
import { Etcd3 } from 'etcd3';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { adminFetch } from './helpers/admin.js';
import { fio } from './helpers/clients.js';
import { EtcdCluster } from './helpers/etcd.js';
import { SSProcess, loopbackAddrs, type SSAddr } from './helpers/remote.js';
import { CLI, run, tmpDir } from './helpers/servers.js';

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

interface Shape {
  systems: [SSAddr, number[]][];
  mirrors: number[];
  rate?: string;
}

function yaml(prefix: string, s: Shape): string {
  const ss = s.systems
    .map(
      ([a, vols], i) => `  - id: ${i + 1}
    nbd: ${a.host}:${a.nbd}
    admin: ${a.host}:${a.admin}
    dataDir: ss${i + 1}
    volumes:
${vols.map((v) => `      - { id: ${v}, size: 16MiB }`).join('\n')}`,
    )
    .join('\n');
  return `storageSystems:
${ss}
pairs:
  - name: lv1
    mode: sync
    master: { ss: 1, vol: 1 }
    mirrors: [ ${s.mirrors.map((m) => `{ ss: 1, vol: ${m} }`).join(', ')} ]${s.rate ? `\n    syncRate: ${s.rate}` : ''}
etcd:
  endpoints: [ ${etcd.endpoints.join(', ')} ]
  prefix: ${prefix}
  leaseTtl: 2s
`;
}

async function dump(file: string): Promise<{ storageSystems: { id: number }[]; mirrors: Record<string, { mirrors: { ss: number; vol: number; state: string }[] }> }> {
  const r = await run(process.execPath, [CLI, 'etcd', 'dump', '-c', file, '--json']);
  expect(r.code, r.stderr).toBe(0);
  return JSON.parse(r.stdout);
}

async function waitFor<T>(what: string, probe: () => Promise<T | undefined>, ms = 60_000): Promise<T> {
  const deadline = Date.now() + ms;
  while (Date.now() < deadline) {
    const v = await probe();
    if (v !== undefined) return v;
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`timed out waiting for ${what}`);
}

describe('live reconfiguration with etcd', () => {
  it('a storage system added at run time registers; a mirror added to a logical volume is COPY then PAIR in the mirrors table, and one removed leaves it', { timeout: 300_000 }, async () => {
    const prefix = `/bm-reconf-${process.pid}`;
    const [a, b] = await loopbackAddrs();
    const dir = tmpDir('bm-reconf-etcd-');
    const file = path.join(dir, 'cluster.yaml');
    fs.writeFileSync(file, yaml(prefix, { systems: [[a, [1, 2, 3]]], mirrors: [2] }));
    const ss1 = new SSProcess(1, file, a);
    procs.push(ss1);
    await ss1.start();
    await ss1.waitPair('lv1', (p) => p.state === 'PAIR', 'PAIR', 60_000);

    // Every value the volume mirrors table takes, from an etcd watch.
    const client = new Etcd3({ hosts: etcd.endpoints.map((e) => `http://${e}`) });
    const rows: { ss: number; vol: number; state: string }[][] = [];
    const watcher = await client.watch().key(`${prefix}/mirrors/lv1`).create();
    watcher.on('put', (kv) => rows.push((JSON.parse(kv.value.toString()) as { mirrors: { ss: number; vol: number; state: string }[] }).mirrors));
    try {
      // A second storage system in the YAML: the running one is told, and notes it must be started.
      fs.writeFileSync(file, yaml(prefix, { systems: [[a, [1, 2, 3]], [b, [1]]], mirrors: [2] }));
      const told = await run(process.execPath, [CLI, 'apply', '-c', file], { timeoutMs: 60_000 });
      expect(told.stdout).toBe(`no changes\nnote: storage system 2 does not answer (ECONNREFUSED): it is not changed; if it is new, start it with blockmirror up -c ${file} --only 2\n`);
      expect(told.code, told.stderr).toBe(0);
      const ss2 = new SSProcess(2, file, b);
      procs.push(ss2);
      await ss2.start();
      await waitFor('storage system 2 in etcd', async () => ((await dump(file)).storageSystems.some((s) => s.id === 2) ? true : undefined));
      // ss1's dashboard asks the storage system added at run time too, without a restart.
      await waitFor('storage system 2 on ss1\'s dashboard', async () => {
        const view = (await (await adminFetch(`http://${a.host}:${a.admin}/api/cluster`)).json()) as { storageSystems: { id: number; reachable: boolean }[] };
        return view.storageSystems.some((x) => x.id === 2 && x.reachable) ? true : undefined;
      });

      // fio writes and verifies through the master while the logical volume gains a mirror.
      const job = fio(ss1.uri(1), dir, ['--name=lv', '--rw=randwrite', '--bs=4k', '--iodepth=8', '--size=16M', '--verify=crc32c', '--verify_backlog=128', '--verify_fatal=1', '--time_based', '--runtime=40']);
      let fioDone = false;
      void job.then(() => (fioDone = true), () => (fioDone = true));
      fs.writeFileSync(file, yaml(prefix, { systems: [[a, [1, 2, 3]], [b, [1]]], mirrors: [2, 3], rate: '4MiB' }));
      const added = await run(process.execPath, [CLI, 'apply', '-c', file], { timeoutMs: 60_000 });
      expect(added.stdout).toBe('plan (1 change):\n  ss1: lv1: add mirror 1:3 (full copy, then PAIR), syncRate unlimited -> 4MiB/s\napplied 1 change\n');
      expect(added.code, added.stderr).toBe(0);
      const copy = await waitFor('1:3 in COPY in the mirrors table', async () => (rows.some((r) => r.some((m) => m.vol === 3 && m.state === 'COPY')) ? true : undefined));
      expect(copy).toBe(true);
      fs.writeFileSync(file, yaml(prefix, { systems: [[a, [1, 2, 3]], [b, [1]]], mirrors: [2, 3] }));
      expect((await run(process.execPath, [CLI, 'apply', '-c', file], { timeoutMs: 60_000 })).code).toBe(0);
      await waitFor('1:3 in PAIR in the mirrors table', async () => {
        const last = rows[rows.length - 1];
        return last?.some((m) => m.vol === 3 && m.state === 'PAIR') ? true : undefined;
      });
      const firstCopy = rows.findIndex((r) => r.some((m) => m.vol === 3 && m.state === 'COPY'));
      const firstPair = rows.findIndex((r) => r.some((m) => m.vol === 3 && m.state === 'PAIR'));
      expect(firstCopy).toBeLessThan(firstPair);

      // The first mirror leaves the logical volume.
      fs.writeFileSync(file, yaml(prefix, { systems: [[a, [1, 2, 3]], [b, [1]]], mirrors: [3] }));
      const removed = await run(process.execPath, [CLI, 'apply', '-c', file], { timeoutMs: 60_000 });
      expect(removed.stdout).toBe('plan (1 change):\n  ss1: lv1: remove mirror 1:2 (it becomes a simplex volume)\napplied 1 change\n');
      await waitFor('the mirrors table without 1:2', async () => {
        const m = (await dump(file)).mirrors.lv1?.mirrors;
        return m && m.length === 1 && m[0]!.vol === 3 && m[0]!.state === 'PAIR' ? true : undefined;
      });
      expect(fioDone).toBe(false);
      const jobs = await job;
      expect(jobs[0]!.error).toBe(0);
      await ss1.waitPair('lv1', (p) => p.state === 'PAIR' && p.mirrors.every((m) => m.invalidClusters === 0), 'PAIR');
      // Master and mirror byte for byte.
      const files = [];
      for (const vol of [1, 3]) {
        const f = path.join(dir, `lv1-vol${vol}.img`);
        expect((await run('nbdcopy', [ss1.uri(vol), f])).code).toBe(0);
        files.push(f);
      }
      expect((await run('cmp', files)).code).toBe(0);
    } finally {
      await watcher.cancel();
      client.close();
    }
  });
});

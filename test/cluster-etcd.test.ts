// The symmetric cluster on a real 3-member etcd (docs/cluster.md): storage systems register
// under leases, a gateway follows each logical volume's master, and a sync pair fails over by
// itself when its master's storage system dies — with fio verifying every block through the
// gateway the whole time.
import fs from 'node:fs';
import path from 'node:path';
import { afterEach, beforeAll, afterAll, describe, expect, it } from 'vitest';
import { EtcdCluster } from './helpers/etcd.js';
import { SSProcess, loopbackAddrs, sameBytes, twoSSYaml, writeConfig, type SSAddr } from './helpers/remote.js';
import { CLI, freePort, run, tmpDir } from './helpers/servers.js';
import { spawn, type ChildProcess } from 'node:child_process';

let etcd: EtcdCluster;
beforeAll(async () => {
  etcd = await EtcdCluster.start(3);
});
afterAll(async () => {
  await etcd?.stop();
});

const procs: SSProcess[] = [];
const gateways: ChildProcess[] = [];
afterEach(async () => {
  for (const g of gateways.splice(0)) if (g.exitCode === null) g.kill('SIGKILL');
  await Promise.all(procs.splice(0).map((p) => p.kill()));
});

let prefixN = 0;
function clusterYaml(a: SSAddr, b: SSAddr, opts: { mode?: 'sync' | 'async'; autoFailover?: string; endpoints?: string[] } = {}): { dir: string; file: string; prefix: string } {
  const prefix = `/bm-test-${process.pid}-${prefixN++}`;
  const base = twoSSYaml(a, b, [{ name: 'pair1', mode: opts.mode ?? 'sync', vol: 1 }], { peerTimeout: '1s', size: '64MiB' });
  const withFailover = opts.autoFailover ? base.replace('    mirrors: [ { ss: 2, vol: 1 } ]', `    mirrors: [ { ss: 2, vol: 1 } ]\n    autoFailover: ${opts.autoFailover}`) : base;
  const text = `${withFailover}etcd:\n  endpoints: [ ${(opts.endpoints ?? etcd.endpoints).join(', ')} ]\n  prefix: ${prefix}\n  leaseTtl: 2s\n`;
  return { ...writeConfig(text), prefix };
}

async function startGateway(file: string): Promise<{ port: number; proc: ChildProcess; stderr: () => string }> {
  const port = await freePort();
  let err = '';
  const proc = spawn(process.execPath, [CLI, 'gateway', '-c', file, '--listen', `127.0.0.1:${port}`, '--log-level', 'info'], { stdio: ['ignore', 'ignore', 'pipe'] });
  proc.stderr!.setEncoding('utf8').on('data', (d: string) => (err += d));
  gateways.push(proc);
  for (let i = 0; i < 400; i++) {
    const r = await run('nbdinfo', ['--size', `nbd://127.0.0.1:${port}/pair1`]).catch(() => undefined);
    if (r?.code === 0) return { port, proc, stderr: () => err };
    if (proc.exitCode !== null) break;
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`the gateway did not start: ${err}`);
}

async function dump(file: string) {
  const r = await run(process.execPath, [CLI, 'etcd', 'dump', '-c', file, '--json']);
  expect(r.code, r.stderr).toBe(0);
  return JSON.parse(r.stdout) as {
    storageSystems: { id: number }[];
    logicalVolumes: { name: string; master: { ss: number; vol: number }; epoch: number }[];
    pairs: Record<string, { state: string }>;
    history: { name: string; epoch: number; from: { ss: number }; to: { ss: number }; reason: string }[];
  };
}

async function startPair(opts: Parameters<typeof clusterYaml>[2] = {}) {
  const [a, b] = await loopbackAddrs();
  const cfg = clusterYaml(a, b, opts);
  const ss1 = new SSProcess(1, cfg.file, a);
  const ss2 = new SSProcess(2, cfg.file, b);
  procs.push(ss1, ss2);
  await ss1.start();
  await ss2.start();
  await ss1.waitPair('pair1', (p) => p.state === 'PAIR', 'PAIR');
  return { a, b, cfg, ss1, ss2 };
}

/** The killed master ss1 restarts, becomes the mirror of ss2, is resynced, and ends byte for byte identical. */
async function oldMasterRejoins({ cfg, ss1, ss2 }: Pick<Awaited<ReturnType<typeof startPair>>, 'cfg' | 'ss1' | 'ss2'>): Promise<void> {
  await ss1.start();
  await ss2.waitPair('pair1', (p) => p.role === 'master' && p.state === 'PAIR' && p.mirrors.every((m) => m.invalidClusters === 0 && m.connected === true), 'PAIR with ss1 as its mirror', 30_000);
  await ss1.kill('SIGTERM');
  await ss2.kill('SIGTERM');
  expect(await sameBytes(ss1.volumeFile(cfg.dir, 1), ss2.volumeFile(cfg.dir, 1))).toBe(true);
}

/** fio writing through the gateway to pair1 with crc32c verification, running; done() once it has ended. */
function fioThroughGateway(port: number, name: string, bs: string, ioSize: string) {
  const fio = run(
    'fio',
    [
      `--name=${name}`, '--ioengine=nbd', `--uri=nbd://127.0.0.1:${port}/pair1`, '--rw=randwrite', `--bs=${bs}`, '--iodepth=8',
      '--size=32M', `--io_size=${ioSize}`, '--verify=crc32c', '--verify_fatal=1', '--do_verify=1', '--output-format=json', `--directory=${tmpDir('bm-fio-')}`,
    ],
    { timeoutMs: 180_000 },
  );
  let ended = false;
  void fio.then(() => (ended = true));
  return { fio, done: () => ended };
}

/** Until volume 1 of the storage system has taken more than `bytes` of writes (at most ~10 s). */
async function writtenOnMaster(ss: { status(): Promise<unknown> }, bytes: number): Promise<void> {
  for (let i = 0; i < 400; i++) {
    const st = (await ss.status()) as { storageSystems: { volumes: { id: number; writeBytes: number }[] }[] } | undefined;
    if ((st?.storageSystems[0]?.volumes.find((x) => x.id === 1)?.writeBytes ?? 0) > bytes) return;
    await new Promise((r) => setTimeout(r, 25));
  }
}

describe('a cluster on etcd', () => {
  it('registers each storage system, seeds the tables from the YAML and prints them with etcd dump', async () => {
    const { cfg } = await startPair();
    let d = await dump(cfg.file);
    for (let i = 0; i < 100 && d.pairs.pair1?.state !== 'PAIR'; i++) {
      await new Promise((r) => setTimeout(r, 100));
      d = await dump(cfg.file);
    }
    expect(d.storageSystems.map((s) => s.id).sort()).toEqual([1, 2]);
    expect(d.logicalVolumes).toEqual([{ name: 'pair1', master: { ss: 1, vol: 1 }, epoch: 1, mode: 'sync', size: 64 * 1024 * 1024 }]);
    expect(d.pairs.pair1!.state).toBe('PAIR');
    expect(d.history).toEqual([]);
    const human = await run(process.execPath, [CLI, 'etcd', 'dump', '-c', cfg.file]);
    expect(human.stdout).toContain('pair1  master ss1/vol1  epoch 1  sync  PAIR');
  });

  it('keeps fio --verify=crc32c through a gateway free of errors while the master storage system is killed and its sync mirror takes over by itself', async () => {
    const { cfg, ss1, ss2 } = await startPair();
    const gw = await startGateway(cfg.file);
    const { fio, done } = fioThroughGateway(gw.port, 'failover', '4k', '160M');
    // Kill the master once fio is well under way: wait for its writes to reach the master.
    await writtenOnMaster(ss1, 4 * 1024 * 1024);
    const killedAt = performance.now();
    await ss1.kill();
    // The kill lands in the middle of the workload, not after it.
    expect(done()).toBe(false);
    const promoted = await ss2.waitPair('pair1', (p) => p.role === 'master', 'the master role', 30_000);
    const failoverMs = performance.now() - killedAt;
    expect(promoted.epoch).toBe(2);
    const r = await fio;
    const job = JSON.parse(r.stdout.slice(r.stdout.indexOf('{'))) as { jobs: { error: number; write: { io_bytes: number } }[] };
    expect(r.code, r.stderr + r.stdout.slice(0, 2000)).toBe(0);
    expect(job.jobs[0]!.error).toBe(0);
    expect(r.stderr).not.toMatch(/verify|error/i);
    console.log(`failover: master killed -> mirror promoted in ${Math.round(failoverMs)} ms; fio wrote ${job.jobs[0]!.write.io_bytes} bytes and verified them`);
    const d = await dump(cfg.file);
    expect(d.logicalVolumes[0]).toMatchObject({ master: { ss: 2, vol: 1 }, epoch: 2 });
    expect(d.history).toEqual([expect.objectContaining({ name: 'pair1', epoch: 2, from: { ss: 1, vol: 1 }, to: { ss: 2, vol: 1 }, reason: 'storage system 1 lost its etcd lease' })]);
    const st = await run(process.execPath, [CLI, 'status', '-c', cfg.file]);
    // The tables: ss1 without a lease, pair1 mastered by ss2 in epoch 2, one failover with its time.
    expect(st.stdout).toMatch(/^ +1 +no lease +- +-$/m);
    expect(st.stdout).toMatch(/^  pair1 +ss2\/vol1 +2 +sync +\S+ +ss1\/vol1 \S+$/m);
    expect(st.stdout).toMatch(/^  \d{4}-\d\d-\d\dT[\d:.]+Z +pair1 +2 +ss1\/vol1 +ss2\/vol1 +storage system 1 lost its etcd lease$/m);

    // The old master comes back as a mirror of the new one, is resynced, and ends identical.
    await oldMasterRejoins({ cfg, ss1, ss2 });
  }, 240_000);

  it('keeps fio --verify=crc32c with 1 MiB writes through a gateway free of errors while the master is killed, sending the writes in flight again to the new master', async () => {
    const { cfg, ss1, ss2 } = await startPair();
    const gw = await startGateway(cfg.file);
    const { fio, done } = fioThroughGateway(gw.port, 'failover-1m', '1m', '1G');
    await writtenOnMaster(ss1, 16 * 1024 * 1024);
    await ss1.kill();
    expect(done()).toBe(false);
    await ss2.waitPair('pair1', (p) => p.role === 'master', 'the master role', 30_000);
    const r = await fio;
    expect(r.code, r.stderr + r.stdout.slice(0, 2000)).toBe(0);
    const job = JSON.parse(r.stdout.slice(r.stdout.indexOf('{'))) as { jobs: { error: number; write: { io_bytes: number } }[] };
    expect(job.jobs[0]!.error).toBe(0);
    // Many passes over the 32 MiB: the kill landed among overwrites, which verify must tell apart.
    expect(job.jobs[0]!.write.io_bytes).toBeGreaterThan(4 * 32 * 1024 * 1024);
    expect(r.stderr).not.toMatch(/verify|error/i);
    // The kill caught writes in flight, and the gateway held them for the new master.
    expect(gw.stderr()).toContain('holding it until the master is back');
    await oldMasterRejoins({ cfg, ss1, ss2 });
  }, 240_000);

  it('goes on without a pause when one etcd member of three is killed', async () => {
    const { cfg, ss1 } = await startPair();
    const gw = await startGateway(cfg.file);
    const uri = `nbd://127.0.0.1:${gw.port}/pair1`;
    expect((await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x31 0 1M', uri])).code).toBe(0);
    await etcd.kill(2);
    try {
      const w = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x32 1M 1M', '-c', 'read -P 0x31 0 1M', '-c', 'read -P 0x32 1M 1M', uri]);
      expect(w.stdout + w.stderr).not.toMatch(/fail|error/i);
      expect(w.code).toBe(0);
      const p = await ss1.pair('pair1');
      expect(p?.role).toBe('master');
      expect((await dump(cfg.file)).logicalVolumes[0]!.epoch).toBe(1);
    } finally {
      // Bring the member back for the tests after this one.
      await etcd.restart(2);
    }
  });

  it('leaves an async pair down without autoFailover: allowDataLoss, and says why', async () => {
    const { cfg, ss1, ss2 } = await startPair({ mode: 'async' });
    await ss1.kill();
    for (let i = 0; i < 200 && !ss2.stderr.includes('lost its lease'); i++) await new Promise((r) => setTimeout(r, 50));
    expect(ss2.stderr).toContain('pair1: the master\'s storage system 1 lost its lease; it is an async pair, whose mirror may lack acknowledged writes: set autoFailover: allowDataLoss to fail over anyway');
    expect((await ss2.pair('pair1'))?.role).toBe('mirror');
    expect((await dump(cfg.file)).logicalVolumes[0]!.master.ss).toBe(1);
  });

  it('refuses to start with one clear line when etcd is not reachable', async () => {
    const [a, b] = await loopbackAddrs();
    const dead = await freePort();
    const cfg = clusterYaml(a, b, { endpoints: [`127.0.0.1:${dead}`] });
    const r = await run(process.execPath, [CLI, 'up', '-c', cfg.file, '--only', '1'], { timeoutMs: 30_000 });
    expect(r.code).toBe(2);
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
    expect(r.stderr).toMatch(new RegExp(`^blockmirror: etcd at 127\\.0\\.0\\.1:${dead} is not reachable \\(connect ECONNREFUSED 127\\.0\\.0\\.1:${dead}\\); start etcd, or remove etcd: from the YAML to run from the YAML alone\\n$`));
  });

  it('ignores corrupt keys in etcd with a log line, and goes on serving', async () => {
    const { cfg, ss1, ss2 } = await startPair();
    const put = (key: string, value: string) => run('etcdctl', ['--endpoints', etcd.endpoints.join(','), 'put', `${cfg.prefix}/${key}`, value]);
    expect((await put('lv/ghost', '{not json')).code).toBe(0);
    expect((await put('ss/9', '{"id": "nine"}')).code).toBe(0);
    expect((await put('weird/x', '1')).code).toBe(0);
    for (let i = 0; i < 100 && !ss2.stderr.includes('weird/x'); i++) await new Promise((r) => setTimeout(r, 50));
    expect(ss2.stderr).toContain(`etcd: ignoring key ${cfg.prefix}/lv/ghost: the value is not JSON`);
    expect(ss2.stderr).toContain(`etcd: ignoring key ${cfg.prefix}/weird/x: unknown table`);
    expect(ss1.proc?.exitCode).toBe(null);
    const w = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x41 0 64k', ss1.uri(1)]);
    expect(w.code, w.stderr).toBe(0);
    expect(fs.existsSync(path.join(cfg.dir, 'ss1'))).toBe(true);
  });
});

describe('a gateway with TLS on both sides', () => {
  it('serves a logical volume over STARTTLS (PSK) from storage systems that require TLS with client certificates', async () => {
    const { makePki } = await import('./helpers/pki.js');
    const pki = makePki();
    try {
      const [a, b] = await loopbackAddrs();
      const prefix = `/bm-test-${process.pid}-tls`;
      const client = pki.cert('gateway');
      const base = twoSSYaml(a, b, [{ name: 'pair1', mode: 'sync', vol: 1 }], { peerTimeout: '1s', size: '16MiB', tls: { ca: pki.ca, certs: { 1: pki.cert('ss1'), 2: pki.cert('ss2') } } })
        // The storage systems' NBD ports require TLS and a client certificate from the CA; the gateway shows security.client.
        .replace(/tls: \{ mode: off,/g, 'tls: { mode: require, verifyClients: true,')
        .replace(`security:\n  ca: ${pki.ca}\n`, `security:\n  ca: ${pki.ca}\n  client: { cert: ${client.cert}, key: ${client.key} }\n`);
      const cfg = writeConfig(`${base}etcd:\n  endpoints: [ ${etcd.endpoints.join(', ')} ]\n  prefix: ${prefix}\n  leaseTtl: 2s\n`);
      const ss1 = new SSProcess(1, cfg.file, a);
      const ss2 = new SSProcess(2, cfg.file, b);
      procs.push(ss1, ss2);
      await ss1.start();
      await ss2.start();
      await ss1.waitPair('pair1', (p) => p.state === 'PAIR', 'PAIR');
      // Without TLS, the storage system says no: the gateway below must be speaking TLS to it.
      expect((await run('nbdinfo', [`nbd://127.0.0.1:${a.nbd}/vol1`])).code).not.toBe(0);

      const psk = pki.pskFile('gw.psk', { alice: undefined });
      const port = await freePort();
      let err = '';
      const proc = spawn(process.execPath, [CLI, 'gateway', '-c', cfg.file, '--listen', `127.0.0.1:${port}`, '--tls', 'require', '--tls-psk', psk.path, '--log-level', 'info'], { stdio: ['ignore', 'ignore', 'pipe'] });
      proc.stderr!.setEncoding('utf8').on('data', (d: string) => (err += d));
      gateways.push(proc);
      const uri = `nbds://alice@127.0.0.1:${port}/pair1?tls-psk-file=${psk.path}`;
      let ready = false;
      for (let i = 0; i < 400 && !ready && proc.exitCode === null; i++) {
        ready = (await run('nbdinfo', ['--size', uri])).code === 0;
        if (!ready) await new Promise((r) => setTimeout(r, 50));
      }
      expect(ready, err).toBe(true);
      expect((await run('nbdinfo', [`nbd://127.0.0.1:${port}/pair1`])).code).not.toBe(0); // plaintext refused at the gateway

      const data = Buffer.alloc(4 * 1024 * 1024);
      for (let i = 0; i < data.length; i += 4) data.writeUInt32LE(i * 2654435761 >>> 0, i);
      const local = path.join(cfg.dir, 'in.img');
      fs.writeFileSync(local, data);
      const put = await run('nbdcopy', [local, uri]);
      expect(put.code, put.stderr).toBe(0);
      const back = path.join(cfg.dir, 'back.img');
      const get = await run('nbdcopy', [uri, back]);
      expect(get.code, get.stderr).toBe(0);
      expect(fs.readFileSync(back).subarray(0, data.length).equals(data)).toBe(true);
      await ss1.waitPair('pair1', (p) => p.state === 'PAIR' && p.mirrors.every((m) => m.invalidClusters === 0), 'in sync');
      expect(await sameBytes(ss1.volumeFile(cfg.dir, 1), ss2.volumeFile(cfg.dir, 1))).toBe(true);
    } finally {
      pki.cleanup();
    }
  });
});

// `blockmirror up` with real clients: pairs in YAML, mirror reads that never
// return stale data, status, split/resync, and kill -9 in the middle of a
// workload followed by a restart.
import fs from 'node:fs';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { FileBitmapStore } from '../src/controller/bitmap-store.js';
import { CLI, freePort, run, startUp, tmpDir, type RunningCluster } from './helpers/servers.js';
import { adminFetch } from './helpers/admin.js';

const MiB = 1024 * 1024;
const running: RunningCluster[] = [];
afterEach(async () => {
  await Promise.all(running.splice(0).map((c) => c.stop('SIGKILL')));
});

interface Ports {
  nbd: number;
  admin: number;
}

async function ports(): Promise<Ports> {
  return { nbd: await freePort(), admin: await freePort() };
}

function yaml(p: Ports, opts: { dataDir?: boolean; syncRate?: string; cache?: boolean } = {}): string {
  return `
clusterSize: 64KiB
storageSystems:
  - id: 1
    nbd: 127.0.0.1:${p.nbd}
    admin: 127.0.0.1:${p.admin}
${opts.dataDir ? '    dataDir: data\n' : ''}${opts.cache === false ? '' : '    cache: { size: 8MiB }\n'}    volumes:
      - { id: 8, size: 64MiB }
      - { id: 7, size: 64MiB }
      - { id: 5, size: 32MiB }
      - { id: 6, size: 32MiB }
      - { id: 9, size: 16MiB }
pairs:
  - name: pair1
    mode: async
    master: { ss: 1, vol: 8 }
    mirrors: [ { ss: 1, vol: 7 } ]
${opts.syncRate ? `    syncRate: ${opts.syncRate}\n` : ''}  - name: pair2
    mode: sync
    master: { ss: 1, vol: 5 }
    mirrors: [ { ss: 1, vol: 6 } ]
`;
}

async function up(p: Ports, opts: Parameters<typeof yaml>[1] = {}, dir = tmpDir('bm-up-')): Promise<RunningCluster> {
  const file = path.join(dir, 'cluster.yaml');
  fs.writeFileSync(file, yaml(p, opts));
  const c = await startUp(file, [p.nbd, p.admin]);
  running.push(c);
  return c;
}

const uri = (p: Ports, vol: number) => `nbd://127.0.0.1:${p.nbd}/vol${vol}`;

async function status(c: RunningCluster) {
  const r = await run(process.execPath, [CLI, 'status', '-c', c.configPath, '--json']);
  expect(r.code, r.stderr).toBe(0);
  return JSON.parse(r.stdout) as {
    storageSystems: { id: number; volumes: { id: number; role: string; readBytes: number; writeBytes: number; writeOps: number }[] }[];
    pairs: { name: string; mode: string; state: string; mirrors: { ss: number; vol: number; invalidClusters: number }[] }[];
  };
}

/** Poll the admin API directly (the CLI is tested by status()): cheaper than a process per poll. */
async function waitForPair(c: RunningCluster, name: string, state: string, ms = 60_000) {
  const admin = /admin: 127\.0\.0\.1:(\d+)/.exec(fs.readFileSync(c.configPath, 'utf8'))![1];
  const deadline = Date.now() + ms;
  let last = '';
  while (Date.now() < deadline) {
    const s = (await (await adminFetch(`http://127.0.0.1:${admin}/api/status`)).json()) as Awaited<ReturnType<typeof status>>;
    const p = s.pairs.find((x) => x.name === name)!;
    last = `${p.state} ${JSON.stringify(p.mirrors)}`;
    if (p.state === state) return p;
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`${name} did not reach ${state}; last: ${last}`);
}

async function qemuIo(target: string, cmds: string[], readOnly = false) {
  const args = ['-f', 'raw', ...(readOnly ? ['-r'] : []), ...cmds.flatMap((c) => ['-c', c]), target];
  return run('qemu-io', args);
}

describe('blockmirror up', () => {
  it('exports every volume, and a mirror read returns a write acknowledged on the master at once', async () => {
    const p = await ports();
    // A daemon this slow needs a minute for the 4 MiB: the mirror must fall back to the master.
    const c = await up(p, { syncRate: '64KiB' });
    const w = await qemuIo(uri(p, 8), ['write -P 0x5c 0 4M']);
    expect(w.code, w.stderr + w.stdout).toBe(0);
    const r = await qemuIo(uri(p, 7), ['read -P 0x5c 0 4M'], true);
    expect(r.stdout).not.toMatch(/verification failed/);
    expect(r.code, r.stdout).toBe(0);
    const s = await status(c);
    const pair1 = s.pairs.find((x) => x.name === 'pair1')!;
    expect(pair1.mode).toBe('async');
    expect(pair1.state).toBe('COPY');
    expect(pair1.mirrors[0]!.invalidClusters).toBeGreaterThan(0);
    const vols = s.storageSystems[0]!.volumes;
    expect(vols.find((v) => v.id === 8)).toMatchObject({ role: 'master' });
    expect(vols.find((v) => v.id === 7)).toMatchObject({ role: 'mirror' });
    expect(vols.find((v) => v.id === 9)).toMatchObject({ role: 'simplex' });
    expect(vols.find((v) => v.id === 8)!.writeBytes).toBe(4 * MiB);
  });

  it('makes mirrors read-only to hosts (READ_ONLY flag, EPERM on writes)', async () => {
    const p = await ports();
    await up(p);
    const info = await run('nbdinfo', ['--json', uri(p, 7)]);
    expect(JSON.parse(info.stdout).exports[0].is_read_only).toBe(true);
    const masterInfo = await run('nbdinfo', ['--json', uri(p, 8)]);
    expect(JSON.parse(masterInfo.stdout).exports[0].is_read_only).toBe(false);
    const py = await run('/usr/bin/python3', [
      '-c',
      `import nbd,sys\nh=nbd.NBD()\nh.set_strict_mode(0)\nh.connect_uri(sys.argv[1])\ntry:\n  h.pwrite(b'x'*512,0)\n  print('written')\nexcept nbd.Error as e:\n  print(e.errno)`,
      uri(p, 7),
    ]);
    expect(py.stdout.trim()).toBe('EPERM');
  });

  it('survives fio with crc32c verify on the masters of an async and a sync pair, and the mirrors end identical', async () => {
    const p = await ports();
    const c = await up(p);
    for (const vol of [8, 5]) {
      const f = await run('fio', [
        '--name=v', '--ioengine=nbd', `--uri=${uri(p, vol)}`, '--rw=randwrite', '--bs=4k', '--iodepth=16',
        '--size=8M', '--verify=crc32c', '--do_verify=1', '--verify_fatal=1', '--verify_state_save=0', '--output-format=terse',
      ], { timeoutMs: 60_000 });
      expect(f.code, f.stderr).toBe(0);
    }
    await waitForPair(c, 'pair1', 'PAIR');
    await waitForPair(c, 'pair2', 'PAIR');
    const dir = tmpDir('bm-copy-');
    for (const [m, n] of [[8, 7], [5, 6]] as const) {
      const a = path.join(dir, `m${m}.img`);
      const b = path.join(dir, `m${n}.img`);
      expect((await run('nbdcopy', [uri(p, m), a])).code).toBe(0);
      expect((await run('nbdcopy', [uri(p, n), b])).code).toBe(0);
      expect(fs.readFileSync(a).equals(fs.readFileSync(b))).toBe(true);
    }
  });

  it('keeps flushed data and the bitmap across kill -9, resumes the sync and ends with identical files', async () => {
    const p = await ports();
    const dir = tmpDir('bm-crash-');
    let c = await up(p, { dataDir: true, syncRate: '2MiB' }, dir);
    // Flushed (qemu-io writes with FUA by default) and then a stream of writes in flight when the process dies.
    expect((await qemuIo(uri(p, 8), ['write -P 0x11 0 8M', 'flush'])).code).toBe(0);
    const fio = run('fio', ['--name=k', '--ioengine=nbd', `--uri=${uri(p, 8)}`, '--rw=randwrite', '--bs=64k', '--iodepth=8', '--offset=16M', '--size=32M', '--time_based', '--runtime=30'], { timeoutMs: 60_000 });
    await new Promise((r) => setTimeout(r, 1500));
    await c.stop('SIGKILL');
    await fio;
    running.splice(running.indexOf(c), 1);

    const bitmap = fs.readFileSync(path.join(dir, 'data', 'pairs', 'pair1.bitmap'));
    const bits = bitmap.subarray(4096).reduce((n, b) => n + popcount(b), 0);
    expect(bits).toBeGreaterThan(0); // what the mirror misses is on disk

    // Restart without the rate limit: the daemon resumes from the persisted bitmap.
    fs.writeFileSync(path.join(dir, 'cluster.yaml'), yaml(p, { dataDir: true }));
    c = await startUp(path.join(dir, 'cluster.yaml'), [p.nbd, p.admin]);
    running.push(c);
    const r = await qemuIo(uri(p, 8), ['read -P 0x11 0 8M'], true);
    expect(r.stdout).not.toMatch(/verification failed/);
    expect(r.code).toBe(0);
    const r7 = await qemuIo(uri(p, 7), ['read -P 0x11 0 8M'], true);
    expect(r7.code).toBe(0);
    await waitForPair(c, 'pair1', 'PAIR');
    expect(await c.stop('SIGTERM')).toBe(0);
    running.splice(running.indexOf(c), 1);
    const a = fs.readFileSync(path.join(dir, 'data', 'vol8.img'));
    const b = fs.readFileSync(path.join(dir, 'data', 'vol7.img'));
    expect(a.equals(b)).toBe(true);
    // A clean stop after PAIR leaves no bit set (read through the bitmap store, which checks the format).
    const after = await FileBitmapStore.open(path.join(dir, 'data', 'pairs', 'pair1.bitmap'), { clusterSize: 64 * 1024, clusters: (64 * MiB) / (64 * 1024), mirrors: 1 });
    expect(after.loaded![0]!.every((x) => x === 0)).toBe(true);
    await after.store.close();
  });

  it('splits a pair into a writable point-in-time copy and resyncs it with the master winning', async () => {
    const p = await ports();
    const c = await up(p);
    expect((await qemuIo(uri(p, 8), ['write -P 0x21 0 2M'])).code).toBe(0);
    await waitForPair(c, 'pair1', 'PAIR');
    const split = await run(process.execPath, [CLI, 'pair', 'split', 'pair1', '-c', c.configPath]);
    expect(split.code, split.stderr).toBe(0);
    expect(split.stdout).toMatch(/pair1: PSUS/);
    expect((await qemuIo(uri(p, 8), ['write -P 0x22 0 1M'])).code).toBe(0); // master side
    const mw = await qemuIo(uri(p, 7), ['write -P 0x33 1M 1M']); // mirror side, now writable
    expect(mw.code, mw.stderr + mw.stdout).toBe(0);
    const pit = await qemuIo(uri(p, 7), ['read -P 0x21 0 1M'], true); // the point-in-time image, not the master's 0x22
    expect(pit.stdout).not.toMatch(/verification failed/);
    expect(pit.code, pit.stderr + pit.stdout).toBe(0);
    const own = await qemuIo(uri(p, 7), ['read -P 0x33 1M 1M'], true); // and its own write
    expect(own.code, own.stderr + own.stdout).toBe(0);
    expect(own.stdout).not.toMatch(/verification failed/);
    const resync = await run(process.execPath, [CLI, 'pair', 'resync', 'pair1', '-c', c.configPath]);
    expect(resync.code, resync.stderr).toBe(0);
    await waitForPair(c, 'pair1', 'PAIR');
    const check = await qemuIo(uri(p, 7), ['read -P 0x22 0 1M', 'read -P 0x21 1M 1M'], true);
    expect(check.stdout).not.toMatch(/verification failed/);
    expect(check.code).toBe(0);
  });

  it('refuses a wrong config with the key path and exit code 2, and starts nothing', async () => {
    const p = await ports();
    const dir = tmpDir('bm-bad-');
    const file = path.join(dir, 'bad.yaml');
    fs.writeFileSync(file, yaml(p).replace('mirrors: [ { ss: 1, vol: 7 } ]', 'mirrors: [ { ss: 1, vol: 70 } ]'));
    const r = await run(process.execPath, [CLI, 'up', '-c', file]);
    expect(r.code).toBe(2);
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
    expect(r.stderr).toMatch(/pairs\[0\]\.mirrors\[0\]/);
    const missing = await run(process.execPath, [CLI, 'up', '-c', path.join(dir, 'nope.yaml')]);
    expect(missing.code).toBe(2);
    const only = await run(process.execPath, [CLI, 'up', '-c', file.replace('bad', 'good'), '--only', 'x']);
    expect(only.code).toBe(2);
  });
});

function popcount(b: number): number {
  let n = 0;
  for (let v = b; v; v &= v - 1) n++;
  return n;
}

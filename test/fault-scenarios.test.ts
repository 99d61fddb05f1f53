// Failure paths of pairs driven through the fault layer, as an operator would: `blockmirror up`
// runs the storage system, `blockmirror fault set|clear|list` injects and clears the faults,
// qemu-io writes and reads over NBD, and every scenario ends with a byte-for-byte compare of
// the volumes' files.
import fs from 'node:fs';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { sameBytes } from './helpers/remote.js';
import { CLI, freePort, run, startUp, tmpDir, type RunningCluster } from './helpers/servers.js';
import { adminFetch } from './helpers/admin.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const CLUSTER = 64 * KiB;
const running: RunningCluster[] = [];
afterEach(async () => {
  await Promise.all(running.splice(0).map((c) => c.stop('SIGKILL')));
});

interface Cluster {
  c: RunningCluster;
  nbd: number;
  admin: number;
  file: string;
  data: string;
}

async function start(extra = ''): Promise<Cluster> {
  const nbd = await freePort();
  const admin = await freePort();
  const dir = tmpDir('bm-fault-');
  const file = path.join(dir, 'cluster.yaml');
  fs.writeFileSync(
    file,
    `
clusterSize: 64KiB
storageSystems:
  - id: 1
    nbd: 127.0.0.1:${nbd}
    admin: 127.0.0.1:${admin}
    dataDir: data
    volumes:
      - { id: 5, size: 16MiB }
      - { id: 6, size: 16MiB }
      - { id: 3, size: 16MiB }
      - { id: 4, size: 16MiB }
pairs:
  - { name: pair2, mode: sync, master: { ss: 1, vol: 5 }, mirrors: [ { ss: 1, vol: 6 } ] }
  - { name: fenced, mode: sync, fence: data, master: { ss: 1, vol: 3 }, mirrors: [ { ss: 1, vol: 4 } ] }
${extra}`,
  );
  const c = await startUp(file, [nbd, admin]);
  running.push(c);
  return { c, nbd, admin, file, data: path.join(dir, 'data') };
}

const uri = (k: Cluster, vol: number) => `nbd://127.0.0.1:${k.nbd}/vol${vol}`;
const qemuIo = (target: string, cmds: string[], readOnly = false) => run('qemu-io', ['-f', 'raw', ...(readOnly ? ['-r'] : []), ...cmds.flatMap((c) => ['-c', c]), target]);
const cli = (...args: string[]) => run(process.execPath, [CLI, ...args]);

interface PairRow {
  name: string;
  state: string;
  error?: string;
  mirrors: { invalidClusters: number; copiedBytes: number }[];
}

async function pair(k: Cluster, name: string): Promise<PairRow> {
  const s = (await (await adminFetch(`http://127.0.0.1:${k.admin}/api/status`)).json()) as { pairs: PairRow[] };
  return s.pairs.find((p) => p.name === name)!;
}

async function waitForPair(k: Cluster, name: string, ok: (p: PairRow) => boolean, what: string): Promise<PairRow> {
  let last: PairRow | undefined;
  for (let i = 0; i < 400; i++) {
    last = await pair(k, name);
    if (ok(last)) return last;
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`${name} never became ${what}; last: ${JSON.stringify(last)}`);
}

describe('faults injected into a running storage system', () => {
  it('suspends a sync pair (PSUE) when its mirror returns EIO, keeps acknowledging, and resyncs exactly the tracked clusters after fault clear', async () => {
    const k = await start();
    expect((await qemuIo(uri(k, 5), ['write -P 0x11 0 1M'])).code).toBe(0);
    await waitForPair(k, 'pair2', (p) => p.state === 'PAIR', 'PAIR');

    const set = await cli('fault', 'set', '-c', k.file, '1:6', 'error', '--op', 'write');
    expect(set.code, set.stderr).toBe(0);
    expect(set.stdout).toBe('1:6: error, on write\n');

    // Each write is acknowledged: fence never keeps the master writing and tracks the clusters.
    const writes = [
      ['write -P 0x22 4M 256k', 4],
      ['write -P 0x33 8M 64k', 1],
      ['write -P 0x44 12582912 100', 1],
    ] as const;
    for (const [cmd] of writes) {
      const w = await qemuIo(uri(k, 5), [cmd]);
      expect(w.code, w.stderr + w.stdout).toBe(0);
      expect(w.stdout).not.toMatch(/error/i);
    }
    const tracked = writes.reduce((n, [, clusters]) => n + clusters, 0);
    const suspended = await pair(k, 'pair2');
    expect(suspended.state).toBe('PSUE');
    expect(suspended.error).toContain('injected I/O error');
    expect(suspended.mirrors[0]!.invalidClusters).toBe(tracked);

    // While suspended, the mirror still never returns stale data: Invalid clusters come from the master.
    const r = await qemuIo(uri(k, 6), ['read -P 0x22 4M 256k', 'read -P 0x33 8M 64k', 'read -P 0x11 0 1M'], true);
    expect(r.stdout + r.stderr).not.toMatch(/fail|error/i);
    expect(r.code).toBe(0);

    const list = await cli('fault', 'list', '-c', k.file);
    expect(list.stdout).toBe('1:6: error, on write\n');
    const clear = await cli('fault', 'clear', '-c', k.file, '1:6');
    expect(clear.code, clear.stderr).toBe(0);
    expect((await cli('fault', 'list', '-c', k.file)).stdout).toBe('no faults\n');

    const before = suspended.mirrors[0]!.copiedBytes;
    const resync = await cli('pair', 'resync', 'pair2', '-c', k.file);
    expect(resync.code, resync.stderr).toBe(0);
    const after = await waitForPair(k, 'pair2', (p) => p.state === 'PAIR', 'PAIR after the resync');
    expect(after.mirrors[0]!.copiedBytes - before).toBe(tracked * CLUSTER);

    expect(await k.c.stop('SIGTERM')).toBe(0);
    expect(await sameBytes(path.join(k.data, 'vol5.img'), path.join(k.data, 'vol6.img'))).toBe(true);
  });

  it('refuses writes with EIO while a fence-data pair cannot write its mirror, and takes them again after clear and resync', async () => {
    const k = await start();
    expect((await qemuIo(uri(k, 3), ['write -P 0x51 0 512k'])).code).toBe(0);
    expect((await cli('fault', 'set', '-c', k.file, '1:4', 'error', '--op', 'write')).code).toBe(0);

    const refused = await qemuIo(uri(k, 3), ['write -P 0x52 1M 64k']);
    expect(refused.stdout + refused.stderr).toMatch(/Input\/output error/);
    expect((await pair(k, 'fenced')).state).toBe('PSUE');
    const again = await qemuIo(uri(k, 3), ['write -P 0x53 2M 4k']);
    expect(again.stdout + again.stderr).toMatch(/Input\/output error/);

    expect((await cli('fault', 'clear', '-c', k.file, '1:4')).code).toBe(0);
    expect((await cli('pair', 'resync', 'fenced', '-c', k.file)).code).toBe(0);
    await waitForPair(k, 'fenced', (p) => p.state === 'PAIR', 'PAIR');
    const w = await qemuIo(uri(k, 3), ['write -P 0x54 1M 64k']);
    expect(w.code, w.stderr + w.stdout).toBe(0);
    const back = await qemuIo(uri(k, 4), ['read -P 0x54 1M 64k', 'read -P 0x51 0 512k'], true);
    expect(back.stdout + back.stderr).not.toMatch(/fail|error/i);

    expect(await k.c.stop('SIGTERM')).toBe(0);
    expect(await sameBytes(path.join(k.data, 'vol3.img'), path.join(k.data, 'vol4.img'))).toBe(true);
  });

  it('starts with the faults of the YAML, shows them in status, and a read of a corrupt range differs from what was written', async () => {
    const k = await start('faults:\n  - { target: "1:5", kind: corrupt, range: "0:4KiB" }\n');
    const s = (await (await adminFetch(`http://127.0.0.1:${k.admin}/api/status`)).json()) as { storageSystems: { faults?: { target: string; description: string }[] }[] };
    expect(s.storageSystems[0]!.faults).toEqual([{ target: '1:5', kind: 'corrupt', description: 'corrupt, bytes 0+4096' }]);
    expect((await qemuIo(uri(k, 5), ['write -P 0x66 0 64k'])).code).toBe(0);
    const bad = await qemuIo(uri(k, 5), ['read -P 0x66 0 4k'], true);
    expect(bad.stdout).toMatch(/Pattern verification failed/);
    const good = await qemuIo(uri(k, 5), ['read -P 0x66 4k 60k'], true);
    expect(good.stdout + good.stderr).not.toMatch(/fail/i);
    const human = await cli('status', '-c', k.file);
    expect(human.stdout).toContain('1:5: corrupt, bytes 0+4096');
  });

  it('answers bad fault requests with one clear line: 400 for bad options, 404 for an unknown volume, exit 2 from the CLI', async () => {
    const k = await start();
    const put = (target: string, kind: string, body: unknown) =>
      adminFetch(`http://127.0.0.1:${k.admin}/api/faults/${encodeURIComponent(target)}/${kind}`, { method: 'PUT', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });
    const badOpt = await put('1:5', 'error', { probability: 7 });
    expect(badOpt.status).toBe(400);
    expect(await badOpt.json()).toEqual({ error: 'fault error on 1:5: probability: Too big: expected number to be <=1' });
    const unknown = await put('1:99', 'error', {});
    expect(unknown.status).toBe(404);
    expect(((await unknown.json()) as { error: string }).error).toBe('storage system 1 has no volume 1:99 (its volumes: 1:5, 1:6, 1:3, 1:4)');
    const noLink = await put('link:1-2', 'drop', {});
    expect(noLink.status).toBe(404);
    const cliBad = await cli('fault', 'set', '-c', k.file, 'vol5', 'error');
    expect(cliBad.code).toBe(2);
    expect(cliBad.stderr).toBe('blockmirror: fault target "vol5" is not valid: a target is SS:VOL (e.g. 1:8) or link:A-B (e.g. link:1-2)\n');
    const cliKind = await cli('fault', 'set', '-c', k.file, '1:5', 'delay');
    expect(cliKind.code).toBe(2);
    expect(cliKind.stderr).toBe('blockmirror: fault delay on 1:5: give the delay with --ms N\n');
    // Nothing was set by any of these.
    expect((await cli('fault', 'list', '-c', k.file)).stdout).toBe('no faults\n');
  });
});

// Live reconfiguration under a real workload: fio writes and verifies through the master while a
// mirror joins (COPY, then PAIR) and another one leaves; pair create and delete survive a restart
// of `up`; SIGHUP applies the edited file. Every scenario ends with a byte-for-byte compare.
import fs from 'node:fs';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { adminFetch } from './helpers/admin.js';
import { fio } from './helpers/clients.js';
import { CLI, freePort, run, startUp, tmpDir, type RunningCluster } from './helpers/servers.js';
import { SSProcess, loopbackAddrs, twoSSYaml, writeConfig } from './helpers/remote.js';

const running: RunningCluster[] = [];
const procs: SSProcess[] = [];
afterEach(async () => {
  await Promise.all(running.splice(0).map((c) => c.stop('SIGKILL')));
  await Promise.all(procs.splice(0).map((p) => p.kill()));
});

interface Ports {
  nbd: number;
  admin: number;
}

function yaml(p: Ports, volumes: number[], pairs: string): string {
  return `storageSystems:
  - id: 1
    nbd: 127.0.0.1:${p.nbd}
    admin: 127.0.0.1:${p.admin}
    dataDir: data
    cache: { size: 8MiB }
    volumes:
${volumes.map((id) => `      - { id: ${id}, size: 16MiB }`).join('\n')}
pairs:${pairs === '' ? ' []' : `\n${pairs}`}
`;
}

async function up(file: string, p: Ports): Promise<RunningCluster> {
  const c = await startUp(file, [p.nbd, p.admin], [], undefined);
  running.push(c);
  return c;
}

interface PairRow {
  name: string;
  state: string;
  mirrors: { vol: number; invalidClusters: number }[];
}
interface Report {
  storageSystems: { volumes: { id: number; role: string; writeOps: number }[] }[];
  pairs: PairRow[];
}

async function status(p: Ports): Promise<Report> {
  return (await (await adminFetch(`http://127.0.0.1:${p.admin}/api/status`)).json()) as Report;
}

async function waitFor<T>(what: string, probe: () => Promise<T | undefined>, ms = 60_000): Promise<T> {
  const deadline = Date.now() + ms;
  while (Date.now() < deadline) {
    const v = await probe();
    if (v !== undefined) return v;
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`timed out waiting for ${what}`);
}

const uri = (p: Ports, vol: number) => `nbd://127.0.0.1:${p.nbd}/vol${vol}`;

async function sameData(p: Ports, vols: number[], dir: string): Promise<void> {
  const files: string[] = [];
  for (const v of vols) {
    const f = path.join(dir, `copy-${v}-${Date.now()}.img`);
    const r = await run('nbdcopy', [uri(p, v), f]);
    expect(r.code, r.stderr).toBe(0);
    files.push(f);
  }
  for (const f of files.slice(1)) {
    const r = await run('cmp', [files[0]!, f]);
    expect(r.code, `${files[0]} and ${f} differ: ${r.stdout}`).toBe(0);
  }
}

const cli = (...args: string[]) => run(process.execPath, [CLI, ...args], { timeoutMs: 120_000 });

describe('live reconfiguration with hosts writing', () => {
  it('a mirror added under fio --verify copies in COPY, then joins in PAIR; a mirror removed leaves; fio sees no error and the copies match', { timeout: 240_000 }, async () => {
    const p = { nbd: await freePort(), admin: await freePort() };
    const dir = tmpDir('bm-reconf-fio-');
    const file = path.join(dir, 'cluster.yaml');
    const pair = (mirrors: number[], rate?: string) => `  - name: pair1
    mode: sync
    master: { ss: 1, vol: 5 }
    mirrors: [ ${mirrors.map((m) => `{ ss: 1, vol: ${m} }`).join(', ')} ]${rate ? `\n    syncRate: ${rate}` : ''}`;
    fs.writeFileSync(file, yaml(p, [5, 6], pair([6])));
    await up(file, p);
    await waitFor('PAIR', async () => ((await status(p)).pairs[0]?.state === 'PAIR' ? true : undefined));
    // fio writes unique patterns and reads them back (verify_backlog) for the whole scenario.
    const job = fio(uri(p, 5), dir, ['--name=reconf', '--rw=randwrite', '--bs=4k', '--iodepth=8', '--size=16M', '--verify=crc32c', '--verify_backlog=128', '--verify_fatal=1', '--time_based', '--runtime=45']);
    let fioDone = false;
    void job.then(() => (fioDone = true), () => (fioDone = true));
    const writes = async () => (await status(p)).storageSystems[0]!.volumes.find((v) => v.id === 5)!.writeOps;
    const w0 = await waitFor('fio writing', async () => ((await writes()) > 100 ? writes() : undefined));
    // A slow copy (4 MiB/s for 16 MiB), so COPY is seen; then the rate limit goes.
    fs.writeFileSync(file, yaml(p, [5, 6, 10], pair([6, 10], '4MiB')));
    const added = await cli('apply', '-c', file);
    expect(added.stdout).toBe('plan (2 changes):\n  ss1: add volume 10 (16MiB)\n  ss1: pair1: add mirror 1:10 (full copy, then PAIR), syncRate unlimited -> 4MiB/s\napplied 2 changes\n');
    expect(added.code, added.stderr).toBe(0);
    const copying = await waitFor('COPY', async () => {
      const row = (await status(p)).pairs[0]!;
      return row.state === 'COPY' && row.mirrors.find((m) => m.vol === 10)!.invalidClusters > 0 ? row : undefined;
    });
    expect(copying.mirrors.map((m) => m.vol)).toEqual([6, 10]);
    fs.writeFileSync(file, yaml(p, [5, 6, 10], pair([6, 10])));
    expect((await cli('apply', '-c', file)).code).toBe(0);
    await waitFor('PAIR with the new mirror', async () => {
      const row = (await status(p)).pairs[0]!;
      return row.state === 'PAIR' && row.mirrors.every((m) => m.invalidClusters === 0) ? row : undefined;
    });
    // The first mirror leaves; it is a simplex volume afterwards.
    fs.writeFileSync(file, yaml(p, [5, 6, 10], pair([10])));
    const removed = await cli('apply', '-c', file);
    expect(removed.stdout).toBe('plan (1 change):\n  ss1: pair1: remove mirror 1:6 (it becomes a simplex volume)\napplied 1 change\n');
    // Every change above happened while fio was writing.
    expect(fioDone).toBe(false);
    expect(await writes()).toBeGreaterThan(w0);
    const jobs = await job;
    expect(jobs[0]!.error).toBe(0);
    const s = await status(p);
    expect(s.pairs[0]).toMatchObject({ state: 'PAIR', mirrors: [{ vol: 10, invalidClusters: 0 }] });
    expect(s.storageSystems[0]!.volumes.find((v) => v.id === 6)!.role).toBe('simplex');
    await sameData(p, [5, 10], dir);
  });

  it('pair create and pair delete change the running storage system and its YAML, and a restart of up keeps them', { timeout: 180_000 }, async () => {
    const p = { nbd: await freePort(), admin: await freePort() };
    const dir = tmpDir('bm-reconf-pair-');
    const file = path.join(dir, 'cluster.yaml');
    fs.writeFileSync(file, `# our cluster\n${yaml(p, [5, 6], '')}`);
    let c = await up(file, p);
    const data = path.join(dir, 'data.bin');
    fs.writeFileSync(data, Buffer.from(Array.from({ length: 4 * 1024 * 1024 }, (_, i) => (i * 7 + (i >> 12)) & 0xff)));
    const wrote = await run('nbdcopy', [data, uri(p, 5)]);
    expect(wrote.code, wrote.stderr).toBe(0);
    const created = await cli('pair', 'create', 'pair1', '-c', file, '--master', '1:5', '--mirror', '1:6', '--mode', 'async', '--wait');
    expect(created.stdout).toBe('plan (1 change):\n  ss1: create pair pair1 (async, master 1:5, mirror 1:6: full copy, then PAIR)\napplied 1 change\nevery pair is in sync\n');
    expect(created.code, created.stderr).toBe(0);
    const text = fs.readFileSync(file, 'utf8');
    expect(text).toMatch(/^# our cluster\n/);
    expect(text).toContain('  - name: pair1\n    mode: async\n    master: { ss: 1, vol: 5 }\n    mirrors: [ { ss: 1, vol: 6 } ]');
    await sameData(p, [5, 6], dir);
    // The same name twice is refused before anything runs.
    const twice = await cli('pair', 'create', 'pair1', '-c', file, '--master', '1:5', '--mirror', '1:6');
    expect(twice.stderr).toBe(`blockmirror: pair create: ${file} already has a pair named pair1\n`);
    expect(twice.code).toBe(2);

    await c.stop('SIGTERM');
    running.splice(running.indexOf(c), 1);
    c = await up(file, p);
    const again = await waitFor('pair1 after the restart', async () => (await status(p)).pairs.find((x) => x.name === 'pair1'));
    // Its bitmap was kept: nothing to copy again.
    expect(again).toMatchObject({ state: 'PAIR', mirrors: [{ vol: 6, invalidClusters: 0 }] });
    await sameData(p, [5, 6], dir);

    const deleted = await cli('pair', 'delete', 'pair1', '-c', file);
    expect(deleted.stdout).toBe('plan (1 change):\n  ss1: delete pair pair1 (1:5 and 1:6 become simplex volumes)\napplied 1 change\n');
    expect(deleted.code, deleted.stderr).toBe(0);
    expect(fs.readFileSync(file, 'utf8')).not.toContain('pair1');
    await c.stop('SIGTERM');
    running.splice(running.indexOf(c), 1);
    await up(file, p);
    const s = await status(p);
    expect(s.pairs).toEqual([]);
    expect(s.storageSystems[0]!.volumes.map((v) => v.role)).toEqual(['simplex', 'simplex']);
    // Both copies kept their data.
    await sameData(p, [5, 6], dir);
    const back = path.join(dir, 'back.bin');
    expect((await run('nbdcopy', [uri(p, 6), back])).code).toBe(0);
    const written = fs.readFileSync(data);
    expect(fs.readFileSync(back).subarray(0, written.length).equals(written)).toBe(true);
  });

  it('SIGHUP to up applies the edited file, and a bad edit is logged and changes nothing', { timeout: 120_000 }, async () => {
    const p = { nbd: await freePort(), admin: await freePort() };
    const dir = tmpDir('bm-reconf-hup-');
    const file = path.join(dir, 'cluster.yaml');
    fs.writeFileSync(file, yaml(p, [5], ''));
    const c = await startUp(file, [p.nbd, p.admin], ['--log-level', 'info']);
    running.push(c);
    fs.writeFileSync(file, yaml(p, [5, 9], ''));
    c.proc.kill('SIGHUP');
    await waitFor('vol9', async () => ((await run('nbdinfo', ['--size', uri(p, 9)])).code === 0 ? true : undefined));
    expect(c.stderr()).toContain('SIGHUP: applied 1 change(s)');
    fs.writeFileSync(file, yaml(p, [5, 9], '').replace('size: 16MiB', 'size: lots'));
    c.proc.kill('SIGHUP');
    await waitFor('the refusal in the log', async () => (c.stderr().includes('SIGHUP: nothing applied:') ? true : undefined));
    expect(c.stderr()).toContain(`SIGHUP: nothing applied: ${file}: storageSystems[0].volumes[0].size: `);
    // Still serving both volumes.
    for (const vol of [5, 9]) expect((await run('nbdinfo', ['--size', uri(p, vol)])).stdout.trim()).toBe(String(16 * 1024 * 1024));
  });

  it('changes the sync rate, fence level and peerTimeout of a pair across storage systems on both of them, and refuses a change of its layout', { timeout: 120_000 }, async () => {
    const [a, b] = await loopbackAddrs();
    const { file, dir } = writeConfig(twoSSYaml(a, b, [{ name: 'pair1', mode: 'sync', vol: 1 }], { peerTimeout: '1s' }));
    const ss1 = new SSProcess(1, file, a);
    const ss2 = new SSProcess(2, file, b);
    procs.push(ss1, ss2);
    await ss1.start();
    await ss2.start();
    await ss1.waitPair('pair1', (p) => p.state === 'PAIR', 'PAIR');
    // fio writes through the master while the settings change.
    const job = fio(ss1.uri(1), dir, ['--name=remote', '--rw=randwrite', '--bs=4k', '--iodepth=4', '--size=8M', '--verify=crc32c', '--verify_backlog=64', '--verify_fatal=1', '--time_based', '--runtime=8']);
    fs.writeFileSync(file, twoSSYaml(a, b, [{ name: 'pair1', mode: 'sync', vol: 1, syncRate: '16MiB', fence: 'data' }], { peerTimeout: '3s' }));
    const r = await cli('apply', '-c', file);
    expect(r.stdout).toBe('plan (4 changes):\n  ss1: peerTimeout 1000 ms -> 3000 ms\n  ss1: pair1: syncRate unlimited -> 16MiB/s, fence never -> data\n  ss2: peerTimeout 1000 ms -> 3000 ms\n  ss2: pair1: syncRate unlimited -> 16MiB/s, fence never -> data\napplied 4 changes\n');
    expect(r.code, r.stderr).toBe(0);
    for (const ss of [ss1, ss2]) {
      const st = (await ss.status()) as unknown as { storageSystems: { peerTimeout: number }[]; pairs: { fence: string; syncRate?: number; role: string }[] };
      expect(st.storageSystems[0]!.peerTimeout).toBe(3000);
      expect(st.pairs[0]!.fence).toBe('data');
      // The mirror's side takes the rate too: it uses it once it becomes the master.
      if (st.pairs[0]!.role === 'master') expect(st.pairs[0]!.syncRate).toBe(16 * 1024 * 1024);
    }
    // The layout of a pair across storage systems (here its mode) needs a restart: refused, nothing applied.
    fs.writeFileSync(file, twoSSYaml(a, b, [{ name: 'pair1', mode: 'async', vol: 1 }], { peerTimeout: '1s' }));
    const refused = await cli('apply', '-c', file);
    expect(refused.stderr).toBe('blockmirror: storage system 1: pair pair1 spans storage systems: its mode, master and autoResync cannot change at run time; restart the storage systems of the pair with the new YAML; nothing was applied\n');
    expect(refused.code).toBe(1);
    expect(((await ss1.status()) as unknown as { storageSystems: { peerTimeout: number }[] }).storageSystems[0]!.peerTimeout).toBe(3000);
    expect((await job)[0]!.error).toBe(0);
    await ss1.waitPair('pair1', (p) => p.state === 'PAIR' && p.mirrors.every((m) => m.invalidClusters === 0), 'PAIR');
    await ss1.kill('SIGTERM');
    await ss2.kill('SIGTERM');
    const cmp = await run('cmp', [ss1.volumeFile(dir, 1), ss2.volumeFile(dir, 1)]);
    expect(cmp.code, cmp.stdout).toBe(0);
  });
});

// Live reconfiguration of a pair across storage systems (issue 16): `blockmirror apply` adds a
// mirror in a third storage system to a running sync pair (it copies in full, in COPY, then
// joins in PAIR) and removes it again, while fio writes and verifies through the master, with
// each storage system in its own `up --only` process. Ends with a byte-for-byte compare.
import fs from 'node:fs';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { fio, pseudoRandom } from './helpers/clients.js';
import { CLI, freePort, run, startUp, type RunningCluster } from './helpers/servers.js';
import { SSProcess, inSync, nSSPairYaml, writeConfig, type SSAddr } from './helpers/remote.js';

const procs: SSProcess[] = [];
const ups: RunningCluster[] = [];
afterEach(async () => {
  await Promise.all(procs.splice(0).map((p) => p.kill()));
  await Promise.all(ups.splice(0).map((u) => u.stop('SIGKILL')));
});

const cli = (...args: string[]) => run(process.execPath, [CLI, ...args], { timeoutMs: 120_000 });

async function addrs(n: number): Promise<SSAddr[]> {
  const out: SSAddr[] = [];
  for (let i = 0; i < n; i++) out.push({ host: '127.0.0.1', nbd: await freePort(), admin: await freePort(), peer: await freePort() });
  return out;
}

/** Three storage systems, vol1 in each; pair1's master is ss1 vol1, its mirrors vol1 of `mirrors`. */
function yaml(a: SSAddr[], mirrors: number[], syncRate?: string): string {
  return nSSPairYaml(a, mirrors, { name: 'pair1', syncRate });
}

async function start(file: string, a: SSAddr[], ids: number[]): Promise<SSProcess[]> {
  const out = ids.map((id) => new SSProcess(id, file, a[id - 1]!));
  procs.push(...out);
  for (const p of out) await p.start();
  return out;
}

/** nbdcopy each export to a file and compare them all with the first. */
async function sameExports(uris: string[], dir: string): Promise<void> {
  const files: string[] = [];
  for (const [i, u] of uris.entries()) {
    const f = path.join(dir, `export-${i}-${Date.now()}.img`);
    const r = await run('nbdcopy', [u, f]);
    expect(r.code, r.stderr).toBe(0);
    files.push(f);
  }
  for (const f of files.slice(1)) {
    const r = await run('cmp', [files[0]!, f]);
    expect(r.code, `${files[0]} and ${f} differ: ${r.stdout}`).toBe(0);
  }
  for (const f of files) fs.rmSync(f);
}

describe('a mirror in another storage system joins and leaves a running pair', () => {
  it('apply adds a third copy under fio --verify (COPY, then PAIR, all copies equal), then removes it while fio writes on; fio sees no error, and no link to the removed one stays', { timeout: 300_000 }, async () => {
    const a = await addrs(3);
    const { file, dir } = writeConfig(yaml(a, [2]));
    const [ss1, ss2, ss3] = await start(file, a, [1, 2, 3]);
    await ss1!.waitPair('pair1', inSync, 'PAIR');
    const verify = ['--rw=randwrite', '--bs=4k', '--iodepth=8', '--size=16M', '--verify=crc32c', '--verify_backlog=128', '--verify_fatal=1', '--time_based'];
    const job1 = fio(ss1!.uri(1), dir, ['--name=add', ...verify, '--runtime=20']);
    let done1 = false;
    void job1.then(() => (done1 = true), () => (done1 = true));

    // A slow copy (4 MiB/s for 16 MiB), so COPY is seen.
    fs.writeFileSync(file, yaml(a, [2, 3], '4MiB'));
    const added = await cli('apply', '-c', file);
    expect(added.stderr).toBe('');
    expect(added.stdout).toBe(
      // In the order the processes apply: ss3 takes its mirror before its master ss1 attaches it.
      'plan (4 changes):\n' +
        '  ss2: pair1: syncRate unlimited -> 4MiB/s\n' +
        '  ss3: pair1: vol1 joins as a mirror of 1:1 (copied in full from the master, then PAIR)\n' +
        '  ss1: pair1: syncRate unlimited -> 4MiB/s\n' +
        '  ss1: pair1: add mirror 3:1 (full copy at 4MiB/s, then PAIR)\n' +
        'applied 4 changes\n',
    );
    expect(added.code).toBe(0);
    const copying = await ss1!.waitPair('pair1', (p) => p.state === 'COPY' && (p.mirrors.find((m) => m.ss === 3)?.invalidClusters ?? 0) > 0, 'COPY with the new mirror');
    expect(copying.mirrors.map((m) => `${m.ss}:${m.vol}`)).toEqual(['2:1', '3:1']);
    expect(copying.epoch).toBe(1);
    // The new mirror's side follows the master in its generation.
    const side = await ss3!.waitPair('pair1', (p) => p.role === 'mirror', 'the mirror role');
    expect(side).toMatchObject({ epoch: 1, master: { ss: 1, vol: 1 } });
    expect(done1).toBe(false);
    // The rate limit goes; the new mirror finishes its copy and the pair is in PAIR.
    fs.writeFileSync(file, yaml(a, [2, 3]));
    expect((await cli('apply', '-c', file)).code).toBe(0);
    expect((await job1)[0]!.error).toBe(0);
    await ss1!.waitPair('pair1', (p) => inSync(p) && p.mirrors.length === 2, 'PAIR with both mirrors', 120_000);
    await sameExports([ss1!.uri(1), ss2!.uri(1), ss3!.uri(1)], dir);

    // The third copy leaves while fio writes on.
    const job2 = fio(ss1!.uri(1), dir, ['--name=remove', ...verify, '--runtime=12']);
    let done2 = false;
    void job2.then(() => (done2 = true), () => (done2 = true));
    await new Promise((r) => setTimeout(r, 2000));
    fs.writeFileSync(file, yaml(a, [2]));
    const removed = await cli('apply', '-c', file);
    expect(removed.stdout).toBe(
      'plan (2 changes):\n' +
        '  ss1: pair1: remove mirror 3:1 (replication to it stops; it becomes a simplex volume)\n' +
        '  ss3: pair1: vol1 leaves the pair (it becomes a simplex volume with its data)\n' +
        'applied 2 changes\n',
    );
    expect(removed.code, removed.stderr).toBe(0);
    expect(done2).toBe(false);
    expect((await job2)[0]!.error).toBe(0);
    const after = await ss1!.waitPair('pair1', inSync, 'PAIR');
    expect(after.mirrors.map((m) => `${m.ss}:${m.vol}`)).toEqual(['2:1']);
    expect((await ss3!.status())!.pairs).toEqual([]);
    // No pair is shared with ss3 any more: its link to ss1 and ss2 and theirs to it are closed.
    const links = async (p: SSProcess) => ((await p.status())!.storageSystems[0]!.peers ?? []).map((l) => l.ss);
    expect(await links(ss1!)).toEqual([2]);
    expect(await links(ss2!)).toEqual([1]);
    expect(await links(ss3!)).toEqual([]);
    // ss3's volume is a plain volume now: hosts may write it.
    const w = await run('nbdcopy', ['--', '[', 'nbdkit', 'pattern', '64k', ']', ss3!.uri(1)]);
    expect(w.code, w.stderr).toBe(0);
    for (const p of [ss1!, ss2!, ss3!]) await p.kill('SIGTERM');
    const cmp = await run('cmp', [ss1!.volumeFile(dir, 1), ss2!.volumeFile(dir, 1)]);
    expect(cmp.code, cmp.stdout).toBe(0);
  });

  it('while the new mirror copies, reads of its export (nbdcopy with extents, nbdinfo --map) equal the master', { timeout: 180_000 }, async () => {
    const a = await addrs(3);
    const { file, dir } = writeConfig(yaml(a, [2]));
    const [ss1, , ss3] = await start(file, a, [1, 2, 3]);
    await ss1!.waitPair('pair1', inSync, 'PAIR');
    // Data in the first half only, so a mirror that reported its own holes would skip it.
    const data = path.join(dir, 'data.bin');
    fs.writeFileSync(data, pseudoRandom(8 * 1024 * 1024, 16));
    const wrote = await run('nbdcopy', [data, ss1!.uri(1)]);
    expect(wrote.code, wrote.stderr).toBe(0);
    const master = path.join(dir, 'master.img');
    expect((await run('nbdcopy', [ss1!.uri(1), master])).code).toBe(0);
    fs.writeFileSync(file, yaml(a, [2, 3], '512KiB'));
    const added = await cli('apply', '-c', file);
    expect(added.code, added.stderr).toBe(0);
    await ss1!.waitPair('pair1', (p) => p.state === 'COPY' && (p.mirrors.find((m) => m.ss === 3)?.invalidClusters ?? 0) > 0, 'COPY');
    const copy = path.join(dir, 'mirror.img');
    const r = await run('nbdcopy', [ss3!.uri(1), copy]);
    expect(r.code, r.stderr).toBe(0);
    // Still copying when the read finished: the Invalid clusters came from the master.
    const still = await ss1!.pair('pair1');
    expect(still!.mirrors.find((m) => m.ss === 3)!.invalidClusters).toBeGreaterThan(0);
    expect((await run('cmp', [master, copy])).code).toBe(0);
    // No hole where the master holds data.
    const map = await run('nbdinfo', ['--map', '--json', ss3!.uri(1)]);
    expect(map.code, map.stderr).toBe(0);
    const extents = JSON.parse(map.stdout) as { offset: number; length: number; type: number }[];
    const holesBelow8M = extents.filter((e) => e.offset < 8 * 1024 * 1024 && (e.type & 1) !== 0);
    expect(holesBelow8M).toEqual([]);
  });

  it('adding a mirror on a storage system that is down fails with one line and leaves the pair as it was; an unknown one is refused by the YAML check', { timeout: 180_000 }, async () => {
    const a = await addrs(3);
    const { file } = writeConfig(yaml(a, [2]));
    const [ss1] = await start(file, a, [1, 2]);
    await ss1!.waitPair('pair1', inSync, 'PAIR');
    fs.writeFileSync(file, yaml(a, [2, 3]));
    const down = await cli('apply', '-c', file);
    expect(down.code).toBe(1);
    expect(down.stderr).toMatch(/^blockmirror: ss1: pair1: add mirror 3:1 \(full copy, then PAIR\): storage system 3 is not connected over the peer channel.*: start it \(blockmirror up --only 3\), then apply again; nothing applied/);
    expect(down.stderr.trim().split('\n')).toHaveLength(1);
    const p = await ss1!.waitPair('pair1', inSync, 'PAIR');
    expect(p.mirrors.map((m) => `${m.ss}:${m.vol}`)).toEqual(['2:1']);
    fs.writeFileSync(file, yaml(a, [2]).replace('mirrors: [ { ss: 2, vol: 1 } ]', 'mirrors: [ { ss: 2, vol: 1 }, { ss: 9, vol: 1 } ]'));
    const unknown = await cli('apply', '-c', file);
    expect(unknown.code).toBe(2);
    expect(unknown.stderr).toBe(`blockmirror: ${file}: pairs[0].mirrors[1]: storage system 9 does not exist\n`);
    expect((await ss1!.pair('pair1'))!.mirrors).toHaveLength(1);
  });

  it('a mirror added while the other mirror\'s storage system is down joins the suspended pair, reads through the master, and both copy once that one is back', { timeout: 240_000 }, async () => {
    const a = await addrs(3);
    const { file, dir } = writeConfig(yaml(a, [2]));
    const [ss1, ss2, ss3] = await start(file, a, [1, 2, 3]);
    await ss1!.waitPair('pair1', inSync, 'PAIR');
    await ss2!.kill('SIGKILL');
    await ss1!.waitPair('pair1', (p) => p.state === 'PSUE', 'PSUE');
    // Written while the pair is suspended: tracked for ss2, and there for the new mirror to copy.
    const data = path.join(dir, 'data.bin');
    fs.writeFileSync(data, pseudoRandom(4 * 1024 * 1024, 7));
    expect((await run('nbdcopy', [data, ss1!.uri(1)])).code).toBe(0);
    fs.writeFileSync(file, yaml(a, [2, 3]));
    const added = await cli('apply', '-c', file);
    expect(added.code, added.stderr).toBe(0);
    expect(added.stdout).toContain('  ss1: pair1: add mirror 3:1 (full copy, then PAIR)\n');
    expect(added.stdout).toContain('note: storage system 2 does not answer');
    const suspended = await ss1!.waitPair('pair1', (p) => p.mirrors.length === 2, 'two mirrors');
    expect(suspended.state).toBe('PSUE');
    // The new mirror has nothing of its own yet: a read of it is the master's data.
    const master = path.join(dir, 'master.img');
    const copy = path.join(dir, 'mirror.img');
    expect((await run('nbdcopy', [ss1!.uri(1), master])).code).toBe(0);
    const r = await run('nbdcopy', [ss3!.uri(1), copy]);
    expect(r.code, r.stderr).toBe(0);
    expect((await run('cmp', [master, copy])).code).toBe(0);
    // ss2 comes back with the new YAML: the pair resyncs by itself and both mirrors copy.
    await ss2!.start();
    await ss1!.waitPair('pair1', (p) => inSync(p) && p.mirrors.length === 2, 'PAIR with both mirrors', 120_000);
    for (const p of [ss1!, ss2!, ss3!]) await p.kill('SIGTERM');
    for (const p of [ss2!, ss3!]) expect((await run('cmp', [ss1!.volumeFile(dir, 1), p.volumeFile(dir, 1)])).code).toBe(0);
  });

  it('refuses with one line what still needs a restart: its mode, and a pair inside one storage system given a mirror in another', { timeout: 120_000 }, async () => {
    const a = await addrs(3);
    const { file } = writeConfig(yaml(a, [2]));
    const [ss1] = await start(file, a, [1, 2]);
    await ss1!.waitPair('pair1', inSync, 'PAIR');
    const refused = async (text: string) => {
      fs.writeFileSync(file, text);
      const r = await cli('apply', '-c', file);
      expect(r.code).toBe(1);
      return r.stderr;
    };
    expect(await refused(yaml(a, [2]).replace('mode: sync', 'mode: async'))).toBe(
      'blockmirror: storage system 1: pair pair1 spans storage systems: its mode, master and autoResync cannot change at run time; restart the storage systems of the pair with the new YAML; nothing was applied\n',
    );
    // A local pair on ss1 (vol2 -> vol3) that would get a mirror on ss2.
    const local = (mirrors: string) => yaml(a, [2]).replace('      - { id: 1, size: 16MiB }', '      - { id: 1, size: 16MiB }\n      - { id: 2, size: 16MiB }\n      - { id: 3, size: 16MiB }') + `  - name: pair2\n    mode: sync\n    master: { ss: 1, vol: 2 }\n    mirrors: [ ${mirrors} ]\n`;
    fs.writeFileSync(file, local('{ ss: 1, vol: 3 }'));
    const made = await cli('apply', '-c', file);
    expect(made.code, made.stderr).toBe(0);
    expect(await refused(local('{ ss: 1, vol: 3 }, { ss: 3, vol: 1 }'))).toMatch(/pair pair2 is inside this storage system: giving it a mirror in another storage system at run time is not supported; restart the storage systems of the pair with the new YAML; nothing was applied\n$/);
    expect((await ss1!.pair('pair1'))!.mirrors).toHaveLength(1);
  });

  it('one up process running all three storage systems joins the new mirror before its master attaches it, and drops it from the master before it leaves', { timeout: 180_000 }, async () => {
    const a = await addrs(3);
    const { file, dir } = writeConfig(yaml(a, [2]));
    ups.push(await startUp(file, a.map((x) => x.admin)));
    const ss1 = new SSProcess(1, file, a[0]!);
    await ss1.waitPair('pair1', inSync, 'PAIR');
    const w = await run('nbdcopy', ['--', '[', 'nbdkit', 'pattern', '16M', ']', ss1.uri(1)]);
    expect(w.code, w.stderr).toBe(0);
    fs.writeFileSync(file, yaml(a, [2, 3]));
    const added = await cli('apply', '-c', file);
    // Plan lines in the order the steps run: ss3 joins before ss1 adds it.
    expect(added.stdout).toBe('plan (2 changes):\n  ss3: pair1: vol1 joins as a mirror of 1:1 (copied in full from the master, then PAIR)\n  ss1: pair1: add mirror 3:1 (full copy, then PAIR)\napplied 2 changes\n');
    expect(added.code, added.stderr).toBe(0);
    await ss1.waitPair('pair1', (p) => inSync(p) && p.mirrors.length === 2, 'PAIR with both mirrors', 120_000);
    const ss3 = new SSProcess(3, file, a[2]!);
    expect((await ss3.pair('pair1'))!.role).toBe('mirror');
    fs.writeFileSync(file, yaml(a, [2]));
    const removed = await cli('apply', '-c', file);
    expect(removed.stdout).toBe('plan (2 changes):\n  ss1: pair1: remove mirror 3:1 (replication to it stops; it becomes a simplex volume)\n  ss3: pair1: vol1 leaves the pair (it becomes a simplex volume with its data)\napplied 2 changes\n');
    expect(removed.code, removed.stderr).toBe(0);
    expect((await ss3.status())!.pairs).toEqual([]);
    await ups.splice(0)[0]!.stop('SIGTERM');
    for (const id of [2, 3]) expect((await run('cmp', [path.join(dir, 'ss1', 'vol1.img'), path.join(dir, `ss${id}`, 'vol1.img')])).code).toBe(0);
  });
});


// Live reconfiguration of pairs across storage systems (issue 16) when it cannot go as planned,
// each storage system in its own `up --only` process: a change no single order of the processes
// can apply is refused before anything is applied; an add whose new mirror's storage system is
// down is rolled back, link and all; a kill -9 of the master in the middle of its reshape (crash
// points, src/util/crash-point.ts) loses no bit, whichever YAML it restarts with, and neither does
// one in the rebuild of a pair inside one storage system. Each ends with a byte-for-byte compare.
import fs from 'node:fs';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { pseudoRandom } from './helpers/clients.js';
import { CLI, freePort, run } from './helpers/servers.js';
import { adminFetch } from './helpers/admin.js';
import { SSProcess, inSync, writeConfig, type SSAddr } from './helpers/remote.js';

const procs: SSProcess[] = [];
afterEach(async () => {
  await Promise.all(procs.splice(0).map((p) => p.kill()));
});

const cli = (...args: string[]) => run(process.execPath, [CLI, ...args], { timeoutMs: 120_000 });

async function addrs(n: number): Promise<SSAddr[]> {
  const out: SSAddr[] = [];
  for (let i = 0; i < n; i++) out.push({ host: '127.0.0.1', nbd: await freePort(), admin: await freePort(), peer: await freePort() });
  return out;
}

interface Pair {
  name: string;
  master: string;
  mirrors: string[];
}

/** Storage systems with vol1 and vol2 (16 MiB) in each, and sync pairs given as "ss:vol". */
function yaml(a: SSAddr[], pairs: Pair[]): string {
  const ref = (r: string) => `{ ss: ${r.split(':')[0]}, vol: ${r.split(':')[1]} }`;
  const ss = a.map((s, i) => `  - id: ${i + 1}\n    nbd: ${s.host}:${s.nbd}\n    admin: ${s.host}:${s.admin}\n    peer: ${s.host}:${s.peer}\n    dataDir: ss${i + 1}\n    volumes:\n      - { id: 1, size: 16MiB }\n      - { id: 2, size: 16MiB }`);
  const pr = pairs.map((p) => `  - name: ${p.name}\n    mode: sync\n    master: ${ref(p.master)}\n    mirrors: [ ${p.mirrors.map(ref).join(', ')} ]`);
  return `peerTimeout: 2s\nstorageSystems:\n${ss.join('\n')}\npairs:\n${pr.join('\n')}\n`;
}

async function start(file: string, a: SSAddr[], ids: number[]): Promise<SSProcess[]> {
  const out = ids.map((id) => new SSProcess(id, file, a[id - 1]!));
  procs.push(...out);
  for (const p of out) await p.start();
  return out;
}

/** GET /api/config: the YAML the process runs. */
async function running(p: SSProcess): Promise<string> {
  const res = await adminFetch(`http://${p.addr.host}:${p.addr.admin}/api/config`);
  expect(res.status).toBe(200);
  return ((await res.json()) as { yaml: string }).yaml;
}

/** What each storage system runs and reports of its pairs: the same before and after a refused apply. */
async function snapshot(ps: SSProcess[]): Promise<unknown[]> {
  return Promise.all(ps.map(async (p) => ({ yaml: await running(p), pairs: (await p.status())!.pairs.map((x) => ({ name: x.name, role: x.role, master: x.master, mirrors: x.mirrors.map((m) => `${m.ss}:${m.vol}`) })) })));
}

describe('a change of a pair\'s mirrors that cannot go as planned', () => {
  it('a change that needs ss1 before ss2 and ss2 before ss1 (one pair drops its mirror on ss2, another gains one there) is refused with one line, and no storage system changes', { timeout: 180_000 }, async () => {
    const a = await addrs(3);
    const before: Pair[] = [
      { name: 'pair1', master: '1:1', mirrors: ['2:1', '3:1'] },
      { name: 'pair2', master: '1:2', mirrors: ['3:2'] },
    ];
    const { file } = writeConfig(yaml(a, before));
    const dir = path.dirname(file);
    const ss = await start(file, a, [1, 2, 3]);
    for (const name of ['pair1', 'pair2']) await ss[0]!.waitPair(name, inSync, 'PAIR');
    for (const vol of [1, 2]) {
      const w = await run('nbdcopy', ['--', '[', 'nbdkit', 'pattern', '16M', ']', ss[0]!.uri(vol)]);
      expect(w.code, w.stderr).toBe(0);
    }
    for (const name of ['pair1', 'pair2']) await ss[0]!.waitPair(name, inSync, 'PAIR');
    const was = await snapshot(ss);

    // pair1 drops 2:1 (its master must stop first: ss1, then ss2); pair2 gains 2:2 (its side must exist first: ss2, then ss1).
    fs.writeFileSync(
      file,
      yaml(a, [
        { name: 'pair1', master: '1:1', mirrors: ['3:1'] },
        { name: 'pair2', master: '1:2', mirrors: ['3:2', '2:2'] },
      ]),
    );
    const r = await cli('apply', '-c', file);
    expect(r.stderr).toBe(
      'blockmirror: ss1 must apply before ss2 (pair1 drops mirror 2:1), ss2 must apply before ss1 (pair2 gains mirror 2:2): no order of the storage systems does all of that in one pass; apply it in two steps (a YAML with one of these changes, then the whole); nothing was applied\n',
    );
    expect(r.code).toBe(1);
    expect(r.stdout).toBe('');
    expect(await snapshot(ss)).toEqual(was);
    // Still replicating to every mirror it had.
    const p1 = await ss[0]!.waitPair('pair1', inSync, 'PAIR');
    expect(p1.mirrors.map((m) => `${m.ss}:${m.vol}`)).toEqual(['2:1', '3:1']);
    expect((await ss[1]!.pair('pair1'))!.role).toBe('mirror');

    // The two steps the line asks for both apply.
    fs.writeFileSync(
      file,
      yaml(a, [
        { name: 'pair1', master: '1:1', mirrors: ['2:1', '3:1'] },
        { name: 'pair2', master: '1:2', mirrors: ['3:2', '2:2'] },
      ]),
    );
    const first = await cli('apply', '-c', file);
    expect(first.code, first.stderr).toBe(0);
    fs.writeFileSync(
      file,
      yaml(a, [
        { name: 'pair1', master: '1:1', mirrors: ['3:1'] },
        { name: 'pair2', master: '1:2', mirrors: ['3:2', '2:2'] },
      ]),
    );
    const second = await cli('apply', '-c', file);
    expect(second.code, second.stderr).toBe(0);
    await ss[0]!.waitPair('pair2', (p) => inSync(p) && p.mirrors.length === 2, 'PAIR with both mirrors', 120_000);
    expect((await ss[0]!.pair('pair1'))!.mirrors.map((m) => `${m.ss}:${m.vol}`)).toEqual(['3:1']);
    // Every copy of each pair equals its master, byte for byte.
    for (const p of ss) await p.kill('SIGTERM');
    for (const [vol, copies] of [[1, [ss[2]!]], [2, [ss[1]!, ss[2]!]]] as const) {
      for (const c of copies) expect((await run('cmp', [ss[0]!.volumeFile(dir, vol), c.volumeFile(dir, vol)])).code).toBe(0);
    }
  });

  it('an add whose new mirror\'s storage system is down fails and is rolled back: the master keeps replicating to its mirror and forgets the link (status lists no such peer); once that storage system is up, the same apply adds it', { timeout: 180_000 }, async () => {
    const a = await addrs(3);
    const one: Pair[] = [{ name: 'pair1', master: '1:1', mirrors: ['2:1'] }];
    const two: Pair[] = [{ name: 'pair1', master: '1:1', mirrors: ['2:1', '3:1'] }];
    const { file, dir } = writeConfig(yaml(a, one));
    const [ss1, ss2] = await start(file, a, [1, 2]);
    await ss1!.waitPair('pair1', inSync, 'PAIR');
    const w = await run('nbdcopy', ['--', '[', 'nbdkit', 'pattern', '16M', ']', ss1!.uri(1)]);
    expect(w.code, w.stderr).toBe(0);
    const peersOf = async (p: SSProcess) => (await p.status())!.storageSystems[0]!.peers!.map((x) => `${x.ss}:${x.connected ? 'up' : 'down'}`);
    expect(await peersOf(ss1!)).toEqual(['2:up']);

    fs.writeFileSync(file, yaml(a, two));
    const failed = await cli('apply', '-c', file);
    expect(failed.code).toBe(1);
    expect(failed.stderr).toMatch(/^blockmirror: ss1: pair1: add mirror 3:1 \(full copy, then PAIR\): storage system 3 is not connected over the peer channel.*: start it \(blockmirror up --only 3\), then apply again; nothing applied[^\n]*\n$/);
    // The link made for the new mirror went with the failed step: ss1 does not redial storage system 3.
    expect(await peersOf(ss1!)).toEqual(['2:up']);
    const kept = await ss1!.waitPair('pair1', inSync, 'PAIR');
    expect(kept.mirrors.map((m) => `${m.ss}:${m.vol}`)).toEqual(['2:1']);
    expect(await running(ss1!)).toBe(yaml(a, one));
    expect((await ss2!.pair('pair1'))!.role).toBe('mirror');

    // Storage system 3 comes up (as the mirror the YAML makes it); the same apply now adds it over a link made anew.
    const [ss3] = await start(file, a, [3]);
    const added = await cli('apply', '-c', file);
    expect(added.code, added.stderr).toBe(0);
    const both = await ss1!.waitPair('pair1', (p) => inSync(p) && p.mirrors.length === 2, 'PAIR with both mirrors', 120_000);
    expect(both.mirrors.map((m) => `${m.ss}:${m.vol}`)).toEqual(['2:1', '3:1']);
    expect(await peersOf(ss1!)).toEqual(['2:up', '3:up']);
    expect((await ss3!.pair('pair1'))!.role).toBe('mirror');
    for (const p of [ss1!, ss2!, ss3!]) await p.kill('SIGTERM');
    for (const p of [ss2!, ss3!]) expect((await run('cmp', [ss1!.volumeFile(dir, 1), p.volumeFile(dir, 1)])).code).toBe(0);
  });

  it.each(['reshape:old-closed', 'reshape:bitmap-replaced'])(
    'a kill -9 of the master at %s while it adds a mirror loses no bit: restarted with the old YAML it runs the old pair with its bits, with the new YAML the new pair with the new mirror all Invalid; then every copy equals the master',
    { timeout: 300_000 },
    async (point) => {
      const a = await addrs(3);
      const one: Pair[] = [{ name: 'pair1', master: '1:1', mirrors: ['2:1'] }];
      const two: Pair[] = [{ name: 'pair1', master: '1:1', mirrors: ['2:1', '3:1'] }];
      const { file, dir } = writeConfig(yaml(a, one));
      const ss = [1, 2, 3].map((id) => new SSProcess(id, file, a[id - 1]!));
      procs.push(...ss);
      const [ss1, ss2, ss3] = ss as [SSProcess, SSProcess, SSProcess];
      ss1.env = { BLOCKMIRROR_CRASH_AT: point };
      for (const p of ss) await p.start();
      await ss1.waitPair('pair1', inSync, 'PAIR');
      // ss2 goes down; what is written now is tracked in ss1's bits for it, and only there.
      await ss2.kill('SIGKILL');
      await ss1.waitPair('pair1', (p) => p.state === 'PSUE', 'PSUE');
      const data = path.join(dir, 'data.bin');
      fs.writeFileSync(data, pseudoRandom(4 * 1024 * 1024, 11));
      const w = await run('nbdcopy', [data, ss1.uri(1)]);
      expect(w.code, w.stderr).toBe(0);
      const before = (await ss1.pair('pair1'))!;
      const tracked = before.mirrors[0]!.invalidClusters;
      expect(tracked).toBeGreaterThan(0);
      expect(tracked).toBeLessThan(before.clusters!);

      // ss3 joins, then ss1 dies in its reshape; apply gives ss3 its previous YAML back.
      const died = new Promise<NodeJS.Signals | null>((r) => ss1.proc!.once('exit', (_code, signal) => r(signal)));
      fs.writeFileSync(file, yaml(a, two));
      const r = await cli('apply', '-c', file);
      expect(r.code).toBe(1);
      expect(await died).toBe('SIGKILL');
      expect(r.stderr).toMatch(/storage system 3 went back to the previous YAML\n$/);
      expect((await ss3.status())!.pairs).toEqual([]);
      // The files the crash left, to restart from twice.
      const pairs = path.join(dir, 'ss1', 'pairs');
      const crashed = path.join(dir, 'crashed');
      fs.cpSync(pairs, crashed, { recursive: true });
      ss1.env = {};

      // With the old YAML: the old pair, its bits for ss2 all there.
      fs.writeFileSync(file, yaml(a, one));
      await ss1.start();
      const old = await ss1.waitPair('pair1', (p) => p.role === 'master', 'the master role');
      expect(old.mirrors.map((m) => [`${m.ss}:${m.vol}`, m.invalidClusters])).toEqual([['2:1', tracked]]);
      await ss1.kill('SIGKILL');

      // With the new YAML, from the same files: the new pair, ss2's bits kept, ss3 all Invalid.
      fs.rmSync(pairs, { recursive: true });
      fs.cpSync(crashed, pairs, { recursive: true });
      fs.writeFileSync(file, yaml(a, two));
      await ss1.start();
      const next = await ss1.waitPair('pair1', (p) => p.role === 'master', 'the master role');
      expect(next.mirrors.map((m) => [`${m.ss}:${m.vol}`, m.invalidClusters])).toEqual([
        ['2:1', tracked],
        ['3:1', before.clusters],
      ]);

      // ss3 takes its part again, ss2 comes back: both copy, and every copy equals the master.
      const joined = await cli('apply', '-c', file);
      expect(joined.code, joined.stderr).toBe(0);
      await ss2.start();
      await ss1.waitPair('pair1', (p) => inSync(p) && p.mirrors.length === 2, 'PAIR with both mirrors', 120_000);
      for (const p of ss) await p.kill('SIGTERM');
      for (const p of [ss2, ss3]) expect((await run('cmp', [ss1.volumeFile(dir, 1), p.volumeFile(dir, 1)])).code).toBe(0);
    },
  );

  it.each(['rebuild:old-closed', 'rebuild:bitmap-replaced'])(
    'a kill -9 at %s while a pair inside one storage system gains a mirror loses no bit either: the old YAML restarts the old pair with its bits, the new YAML the new pair with the new mirror all Invalid',
    { timeout: 240_000 },
    async (point) => {
      const a = await addrs(1);
      // Both mirrors fail their writes (from the YAML, so again after each restart): bits are tracked and nothing copies them away.
      const local = (mirrors: string[]) =>
        yaml(a, [{ name: 'pair1', master: '1:1', mirrors }]).replace('      - { id: 2, size: 16MiB }', '      - { id: 2, size: 16MiB }\n      - { id: 3, size: 16MiB }') +
        'faults:\n  - { target: "1:2", kind: error }\n  - { target: "1:3", kind: error }\n';
      const { file, dir } = writeConfig(local(['1:2']));
      const ss1 = new SSProcess(1, file, a[0]!);
      procs.push(ss1);
      ss1.env = { BLOCKMIRROR_CRASH_AT: point };
      await ss1.start();
      const data = path.join(dir, 'data.bin');
      fs.writeFileSync(data, pseudoRandom(4 * 1024 * 1024, 13));
      const w = await run('nbdcopy', [data, ss1.uri(1)]);
      expect(w.code, w.stderr).toBe(0);
      const before = await ss1.waitPair('pair1', (p) => p.state === 'PSUE', 'PSUE');
      const tracked = before.mirrors[0]!.invalidClusters;
      expect(tracked).toBeGreaterThan(0);
      expect(tracked).toBeLessThan(before.clusters!);

      const died = new Promise<NodeJS.Signals | null>((r) => ss1.proc!.once('exit', (_code, signal) => r(signal)));
      fs.writeFileSync(file, local(['1:2', '1:3']));
      expect((await cli('apply', '-c', file)).code).toBe(1);
      expect(await died).toBe('SIGKILL');
      const pairs = path.join(dir, 'ss1', 'pairs');
      const crashed = path.join(dir, 'crashed');
      fs.cpSync(pairs, crashed, { recursive: true });
      ss1.env = {};

      fs.writeFileSync(file, local(['1:2']));
      await ss1.start();
      const old = await ss1.waitPair('pair1', () => true, 'the pair');
      expect(old.mirrors.map((m) => [`${m.ss}:${m.vol}`, m.invalidClusters])).toEqual([['1:2', tracked]]);
      await ss1.kill('SIGKILL');

      fs.rmSync(pairs, { recursive: true });
      fs.cpSync(crashed, pairs, { recursive: true });
      fs.writeFileSync(file, local(['1:2', '1:3']));
      await ss1.start();
      const next = await ss1.waitPair('pair1', () => true, 'the pair');
      expect(next.mirrors.map((m) => [`${m.ss}:${m.vol}`, m.invalidClusters])).toEqual([
        ['1:2', tracked],
        ['1:3', before.clusters],
      ]);

      // The faults cleared and the pair resynced, every copy equals the master.
      const admin = `http://${a[0]!.host}:${a[0]!.admin}`;
      for (const t of ['1:2', '1:3']) expect((await adminFetch(`${admin}/api/faults/${t}`, { method: 'DELETE' })).status).toBe(200);
      const resync = await adminFetch(`${admin}/api/pairs/pair1/resync`, { method: 'POST' });
      expect(resync.status, await resync.clone().text()).toBe(200);
      await ss1.waitPair('pair1', (p) => p.state === 'PAIR' && p.mirrors.every((m) => m.invalidClusters === 0), 'PAIR', 120_000);
      await ss1.kill('SIGTERM');
      for (const vol of [2, 3]) expect((await run('cmp', [ss1.volumeFile(dir, 1), ss1.volumeFile(dir, vol)])).code).toBe(0);
    },
  );
});

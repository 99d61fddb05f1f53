// The cluster file system with real processes: `blockmirror up` with a cfs: section (or `up
// --no-cfs` plus `cfs serve`), the CLI, and library clients. Balance over the copies of a pair,
// concurrent clients, never a torn block, kill -9 of the CFS server at any moment, and a copy's
// storage system killed in the middle of a read.
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import type { CfsClient } from '../src/cfs/client.js';
import { pattern, startCfsCluster, type CfsCluster, type CfsClusterOptions } from './helpers/cfs.js';
import { CLI, freePort, run, startUp, tmpDir, type RunningCluster } from './helpers/servers.js';
import { adminFetch } from './helpers/admin.js';
import { CfsError } from '../src/cfs/protocol.js';

/**
 * What a client sees when the server dies under it: a lost or timed-out connection, or, for a file
 * with writes not yet committed, EIO saying those writes are lost with the connection.
 */
function lostServer(e: unknown): boolean {
  if (!(e instanceof CfsError)) return false;
  return e.code === 'ECONNRESET' || e.code === 'ETIMEDOUT' || (e.code === 'EIO' && e.message.startsWith('lost the connection to the CFS server'));
}
/** A file the workload just renamed or removed may be gone: that, and only that, is not an error. */
function absentOk(e: unknown): undefined {
  if (e instanceof CfsError && e.code === 'ENOENT') return undefined;
  throw e;
}

const MiB = 1024 * 1024;
const BLOCK = 64 * 1024;
const cleanup: (() => Promise<unknown>)[] = [];
afterEach(async () => {
  // Last registered, first undone: a mount goes before the cluster under it.
  for (const f of cleanup.splice(0).reverse()) await f().catch(() => {});
});

async function cluster(opts: CfsClusterOptions = {}): Promise<CfsCluster> {
  const c = await startCfsCluster(opts);
  cleanup.push(() => c.stop());
  return c;
}

function ok(r: { code: number | null; stderr: string }) {
  expect(r.code, r.stderr).toBe(0);
}

/** One line on stderr, the given exit code, and the message. */
function refused(r: { code: number | null; stderr: string }, code: number, message: RegExp) {
  expect(r.code, r.stderr).toBe(code);
  expect(r.stderr.trim().split('\n'), r.stderr).toHaveLength(1);
  expect(r.stderr).toMatch(message);
}

async function usage(c: CfsCluster) {
  const r = await c.cli(['usage', '--json']);
  ok(r);
  return JSON.parse(r.stdout) as { pairs: { name: string; copies: { ss: number; vol: number; role: string; mirror: number; opens: number; opensTotal: number; failed?: boolean }[] }[] };
}

async function until(what: string, check: () => Promise<boolean>, ms = 30_000) {
  const deadline = Date.now() + ms;
  while (Date.now() < deadline) {
    if (await check()) return;
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`timed out waiting for ${what}`);
}

describe('cfs CLI', () => {
  it('puts, gets, cats and lists files, makes directories, moves and removes them', async () => {
    const c = await cluster();
    const data = pattern('a', 5 * MiB + 123);
    const local = path.join(c.dir, 'in.bin');
    fs.writeFileSync(local, data);
    const out = path.join(c.dir, 'out.bin');
    // Each CLI call is a process; independent ones run side by side.
    const all = async (...calls: Promise<{ code: number | null; stderr: string; stdout: string }>[]) => {
      const rs = await Promise.all(calls);
      rs.forEach(ok);
      return rs.map((r) => r.stdout);
    };
    await all(c.cli(['put', local, '/a.bin']), c.cli(['put', '-', '/hello.txt'], { input: 'hello, cfs\n' }), c.cli(['mkdir', '/docs']));
    const [, ls, cat] = await all(c.cli(['get', '/a.bin', out]), c.cli(['ls']), c.cli(['cat', '/hello.txt']));
    expect(fs.readFileSync(out).equals(data)).toBe(true);
    // name, size in bytes (right-aligned), mtime (UTC, to the second)
    expect(ls).toMatch(/^a\.bin +5243003 {2}\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\ndocs\/ +0 {2}\S+\nhello\.txt +11 {2}\S+\n$/);
    expect(cat).toBe('hello, cfs\n');

    // mv into a directory, and put into one under the local name (a path ending in /).
    await all(c.cli(['mv', '/a.bin', '/docs']), c.cli(['put', local, '/docs/']));
    await all(c.cli(['mv', '/docs/a.bin', '/docs/b.bin']));
    const [json, root, one] = await all(c.cli(['ls', '/docs', '--json']), c.cli(['ls', '/']), c.cli(['ls', '/docs/b.bin']));
    expect((JSON.parse(json!) as { entries: { name: string; type: string; size: number }[] }).entries.map((e) => [e.name, e.type, e.size])).toEqual([
      ['b.bin', 'file', data.length],
      ['in.bin', 'file', data.length],
    ]);
    expect(root).toMatch(/^docs\/ +0 +\S+\nhello\.txt +11 +\S+\n$/);
    expect(one).toMatch(/^b\.bin {2}5243003 /);

    const [rmFile, rmDir] = await Promise.all([c.cli(['rm', '/docs/b.bin']), c.cli(['rm', '/docs'])]);
    ok(rmFile);
    refused(rmDir, 1, /is a directory: \/docs/);
    await all(c.cli(['rm', '-r', '/docs']), c.cli(['rm', '/hello.txt']));
    expect((await c.cli(['ls'])).stdout).toBe('');

    const client = await c.client();
    expect(await client.check()).toEqual({ consistent: true, problems: [] });
    const space = await client.space();
    expect(space.pairs[0]).toMatchObject({ usedBlocks: 0, freeBlocks: (128 * MiB) / BLOCK });
  });

  it('says what is wrong in one line and exits non-zero', async () => {
    const c = await cluster();
    const local = path.join(c.dir, 'x.txt');
    fs.writeFileSync(local, 'x');
    ok(await c.cli(['mkdir', '/d']));
    ok(await c.cli(['put', local, '/f']));
    // Each case is a whole CLI process; they run side by side.
    const cases: [string[], number, RegExp][] = [
      [['get', '/nope', path.join(c.dir, 'o')], 1, /^blockmirror: no such file: \/nope$/m],
      [['cat', '/nope'], 1, /no such file: \/nope/],
      [['cat', '/d'], 1, /is a directory: \/d/],
      [['ls', '/nope'], 1, /no such file: \/nope/],
      [['ls', '/f/x'], 1, /not a directory: \/f/],
      [['put', path.join(c.dir, 'missing'), '/m'], 1, /no such local file: .*missing/],
      [['put', c.dir, '/m'], 1, /is a directory: /],
      [['put', local, '/d'], 1, /is a directory: \/d/],
      [['put', local, '/nodir/f'], 1, /no such file: \/nodir/],
      [['put', '--no-clobber', local, '/f'], 1, /file exists: \/f/],
      [['mkdir', '/d'], 1, /file exists: \/d/],
      [['mkdir', '/f/sub'], 1, /not a directory: \/f/],
      [['mv', '/nope', '/x'], 1, /no such file: \/nope/],
      [['mv', '/d', '/d/inside'], 1, /into itself/],
      [['rm', '/nope'], 1, /no such file: \/nope/],
      [['ls', '/../etc'], 1, /"\.\." is not allowed/],
      [['frobnicate'], 2, /cfs: unknown command "frobnicate"/],
      [['get', '/f'], 2, /missing required argument/],
    ];
    for (let i = 0; i < cases.length; i += 6) {
      const batch = cases.slice(i, i + 6);
      const results = await Promise.all(batch.map(([args]) => c.cli(args)));
      results.forEach((r, j) => refused(r, batch[j]![1], batch[j]![2]));
    }
    // A configuration without a cfs: section, and a server that is not there.
    const plain = path.join(c.dir, 'plain.yaml');
    fs.writeFileSync(plain, fs.readFileSync(c.config, 'utf8').replace(/^cfs:[\s\S]*$/m, ''));
    refused(await run(process.execPath, [CLI, 'cfs', 'ls', '-c', plain]), 2, /has no cfs: section/);
    const port = await freePort();
    refused(await c.cli(['ls', '--server', `127.0.0.1:${port}`]), 1, /cannot reach the CFS server at 127\.0\.0\.1:\d+: ECONNREFUSED/);
    // Nothing was left behind by the failed puts.
    const client = await c.client();
    expect(await client.check()).toEqual({ consistent: true, problems: [] });
    expect((await client.space()).pairs[0]!.usedBlocks).toBe(1);
  });
});

describe('cfs server: copies and the usage table', () => {
  it('spreads concurrent opens over every copy of a pair and rotates ties; close returns them', async () => {
    const c = await cluster({ layout: 'two-mirrors' });
    const local = path.join(c.dir, 'f');
    fs.writeFileSync(local, pattern('f', MiB));
    ok(await c.cli(['put', local, '/f']));
    const before = (await usage(c)).pairs[0]!.copies.reduce((n, x) => n + x.opensTotal, 0);

    const clients = await Promise.all([0, 1, 2].map(() => c.client()));
    const files = await Promise.all(Array.from({ length: 9 }, (_, i) => clients[i % 3]!.open('/f')));
    const per = [0, 0, 0];
    for (const f of files) per[f.copy.mirror]!++;
    expect(per).toEqual([3, 3, 3]);
    const u = (await usage(c)).pairs[0]!;
    expect(u.name).toBe('pair1');
    expect(u.copies.map((x) => [x.ss, x.vol, x.role, x.opens])).toEqual([
      [1, 8, 'master', 3],
      [1, 7, 'mirror', 3],
      [1, 6, 'mirror', 3],
    ]);
    expect(u.copies.reduce((n, x) => n + x.opensTotal, 0)).toBe(before + 9);
    // Each handle reads the same bytes, whichever copy it was given.
    for (const f of files.slice(0, 3)) {
      const buf = Buffer.alloc(MiB);
      expect(await f.read(buf, 0)).toBe(MiB);
      expect(buf.equals(pattern('f', MiB))).toBe(true);
    }
    await Promise.all(files.map((f) => f.close()));
    expect((await usage(c)).pairs[0]!.copies.map((x) => x.opens)).toEqual([0, 0, 0]);

    // One open at a time: every copy is tied at 0, and the ties go round.
    const seen: number[] = [];
    for (let i = 0; i < 3; i++) {
      const f = await clients[0]!.open('/f');
      seen.push(f.copy.mirror);
      await f.close();
    }
    expect([...seen].sort()).toEqual([0, 1, 2]);

    // A client that goes away without closing gives its opens back.
    await Promise.all([1, 2, 3, 4].map(() => clients[1]!.open('/f')));
    expect((await usage(c)).pairs[0]!.copies.reduce((n, x) => n + x.opens, 0)).toBe(4);
    await clients[1]!.close();
    await until('opens returned', async () => (await usage(c)).pairs[0]!.copies.every((x) => x.opens === 0));
  });

  it('serves several clients at once: concurrent puts and gets from separate processes', async () => {
    const c = await cluster();
    const N = 4;
    const files = Array.from({ length: N }, (_, i) => ({ local: path.join(c.dir, `in${i}`), data: pattern(`c${i}`, 3 * MiB + i * 4097) }));
    for (const f of files) fs.writeFileSync(f.local, f.data);
    const puts = await Promise.all(files.map((f, i) => c.cli(['put', f.local, `/c${i}`])));
    puts.forEach(ok);
    const gets = await Promise.all(files.map((_, i) => c.cli(['get', `/c${i}`, path.join(c.dir, `out${i}`)])));
    gets.forEach(ok);
    files.forEach((f, i) => expect(fs.readFileSync(path.join(c.dir, `out${i}`)).equals(f.data), `file ${i}`).toBe(true));
    // Puts of the same name race: one of them wins, whole.
    const same = await Promise.all(files.map((f) => c.cli(['put', f.local, '/same'])));
    same.forEach(ok);
    const out = path.join(c.dir, 'same.out');
    ok(await c.cli(['get', '/same', out]));
    const got = fs.readFileSync(out);
    expect(files.some((f) => f.data.equals(got))).toBe(true);
    const client = await c.client();
    expect(await client.check()).toEqual({ consistent: true, problems: [] });
    await until('replaced blocks freed', async () => (await client.space()).pairs[0]!.deferredBlocks === 0);
    const used = (await client.space()).pairs[0]!.usedBlocks;
    expect(used).toBe([...files.map((f) => f.data.length), got.length].reduce((n, len) => n + Math.ceil(len / BLOCK), 0));
  });
});

describe('cfs consistency', () => {
  /** Every block of `buf` holds one byte value, and they are all `version`. */
  function uniform(buf: Buffer): number[] {
    const versions = new Set<number>();
    for (let at = 0; at < buf.length; at += BLOCK) {
      const block = buf.subarray(at, at + BLOCK);
      const v = block[0]!;
      if (!block.every((b) => b === v)) throw new Error(`torn block at ${at}`);
      versions.add(v);
    }
    return [...versions];
  }

  it('is close-to-open, and a reader sees whole versions, never a torn block', async () => {
    const c = await cluster();
    const SIZE = 4 * MiB;
    const writer = await c.client();
    const reader = await c.client();
    await writer.writeFile('/v', Buffer.alloc(SIZE, 1));

    // A file opened before a commit keeps reading what it opened, whole.
    const early = await reader.open('/v');
    const w = await writer.open('/v', 'r+');
    await w.write(Buffer.alloc(SIZE, 2), 0);
    const mid = await reader.open('/v');
    expect(uniform(await readAll(mid))).toEqual([1]); // not committed yet: not visible
    await w.sync();
    expect(uniform(await readAll(early))).toEqual([1]);
    const late = await reader.open('/v');
    expect(uniform(await readAll(late))).toEqual([2]); // close-to-open
    await w.close();
    // Blocks of old versions stay allocated while a handle that can read them is open.
    expect((await reader.space()).pairs[0]!.deferredBlocks).toBe(SIZE / BLOCK);
    await Promise.all([early.close(), mid.close(), late.close()]);
    expect((await reader.space()).pairs[0]!.deferredBlocks).toBe(0);

    // Writers rewrite the file in pieces and commit; readers open, read and check, concurrently.
    let stop = false;
    let commits = 0;
    const writing = (async () => {
      const f = await writer.open('/v', 'r+');
      for (let v = 3; v < 23; v++) {
        for (let at = 0; at < SIZE; at += MiB) await f.write(Buffer.alloc(MiB, v), at);
        await f.sync();
        commits++;
      }
      await f.close();
      stop = true;
    })();
    const seen = new Set<number>();
    const reading = (async () => {
      while (!stop) {
        const f = await reader.open('/v');
        const versions = uniform(await readAll(f));
        expect(versions).toHaveLength(1); // one commit's view, whole
        seen.add(versions[0]!);
        await f.close();
      }
    })();
    await Promise.all([writing, reading]);
    expect(commits).toBe(20);
    expect(seen.size).toBeGreaterThan(1);
    expect(uniform(await reader.readFile('/v'))).toEqual([22]);
    expect(await reader.check()).toEqual({ consistent: true, problems: [] });
  });

  it('truncates, appends, overwrites partial blocks and keeps holes zero', async () => {
    const c = await cluster();
    const client = await c.client();
    const model = Buffer.alloc(3 * BLOCK + 100, 7);
    await client.writeFile('/t', model);
    const f = await client.open('/t', 'r+');
    // A write in the middle of a block, another across a block boundary.
    const a = pattern('a', 1000);
    await f.write(a, 5000);
    a.copy(model, 5000);
    const b = pattern('b', 3000);
    await f.write(b, BLOCK - 1000);
    b.copy(model, BLOCK - 1000);
    // Shrink into a block, then grow past the old end: the bytes in between read as zeros.
    await f.truncate(BLOCK + 10);
    await f.truncate(2 * BLOCK + 50);
    let expected = Buffer.concat([model.subarray(0, BLOCK + 10), Buffer.alloc(BLOCK + 40)]);
    expect((await readAll(f)).equals(expected)).toBe(true);
    await f.close();
    expect((await client.readFile('/t')).equals(expected)).toBe(true);
    // A write far past the end leaves a hole, which reads as zeros and takes no blocks.
    const g = await client.open('/t', 'r+');
    await g.write(Buffer.from('tail'), 10 * BLOCK);
    await g.close();
    expected = Buffer.concat([expected, Buffer.alloc(10 * BLOCK - expected.length), Buffer.from('tail')]);
    expect((await client.readFile('/t')).equals(expected)).toBe(true);
    expect((await client.stat('/t')).blocks).toBe(3); // blocks 0 and 1 (2 is a hole since the truncate) and 10
    await client.truncate('/t', 0);
    expect(await client.stat('/t')).toMatchObject({ size: 0, blocks: 0 });
    expect(await client.check()).toEqual({ consistent: true, problems: [] });
  });
});

describe('cfs crash safety', () => {
  it('kill -9 of the CFS server mid-put: after restart the namespace is consistent and the put left nothing', async () => {
    const c = await cluster({ onDisk: true, separateServer: true });
    const a = pattern('a', 4 * MiB + 5);
    fs.writeFileSync(path.join(c.dir, 'a'), a);
    ok(await c.cli(['put', path.join(c.dir, 'a'), '/a']));

    // A put from a pipe that is still being fed when the server dies.
    const feeder = spawn(process.execPath, [CLI, 'cfs', 'put', '-', '/b', '-c', c.config], { stdio: ['pipe', 'ignore', 'pipe'] });
    cleanup.push(async () => feeder.kill('SIGKILL'));
    let feederErr = '';
    feeder.stderr.setEncoding('utf8').on('data', (d: string) => (feederErr += d));
    const feederExit = new Promise<number | null>((r) => feeder.once('exit', (code) => r(code)));
    feeder.stdin.on('error', () => {});
    feeder.stdin.write(pattern('b', 16 * MiB));
    const watcher = await c.client();
    await until('the put to reserve blocks', async () => (await watcher.space()).pairs[0]!.reservedBlocks > 0);
    await c.server!.kill('SIGKILL');
    feeder.stdin.end(pattern('b2', 4 * MiB));
    expect(await feederExit).toBe(1);
    expect(feederErr).toMatch(/lost the connection to the CFS server/);

    await c.startServer();
    const after = await c.client();
    expect((await after.readdir('/')).map((e) => e.name)).toEqual(['a']);
    expect((await after.readFile('/a')).equals(a)).toBe(true);
    expect(await after.check()).toEqual({ consistent: true, problems: [] });
    const space = (await after.space()).pairs[0]!;
    expect(space.usedBlocks).toBe(Math.ceil(a.length / BLOCK));
    expect(space.freeBlocks).toBe(space.totalBlocks - space.usedBlocks);
    // The blocks the put had reserved are free again: a file that needs them fits, and /a is intact.
    const big = path.join(c.dir, 'big');
    fs.writeFileSync(big, pattern('big', 120 * MiB));
    ok(await c.cli(['put', big, '/big']));
    expect((await after.readFile('/a')).equals(a)).toBe(true);
    expect((await after.readFile('/big')).equals(pattern('big', 120 * MiB))).toBe(true);
  });

  it('kill -9 at random moments of a busy workload: every restart finds a consistent namespace of whole files', async () => {
    const c = await cluster({ onDisk: true, separateServer: true });
    // A file's content says what it is: 16 bytes of header (name hash, version, length) then its pattern.
    const content = (name: string, version: number) => {
      const len = 20_000 + ((version * 7919) % 300_000);
      const body = pattern(`${name}:${version}`, len);
      const head = Buffer.alloc(16);
      head.write(name.padEnd(8).slice(0, 8), 0);
      head.writeUInt32LE(version, 8);
      head.writeUInt32LE(len, 12);
      return Buffer.concat([head, body]);
    };
    const whole = (buf: Buffer) => {
      const name = buf.subarray(0, 8).toString().trim();
      const version = buf.readUInt32LE(8);
      return buf.equals(content(name, version));
    };
    let version = 0;
    for (let round = 0; round < 5; round++) {
      const client = await c.client();
      let running = true;
      let stopped: unknown;
      const work = (async () => {
        try {
          await client.mkdir('/dir', { parents: true });
          while (running) {
            const v = ++version;
            const name = `f${v % 6}`;
            await client.writeFile(`/dir/${name}`, content(name, v));
            if (v % 3 === 0) await client.rename(`/dir/${name}`, `/dir/r${v % 4}`);
            if (v % 5 === 0) await client.unlink(`/dir/r${v % 4}`).catch(absentOk);
            if (v % 7 === 0) {
              const f = await client.open(`/dir/${name}`, 'r+').catch(absentOk);
              if (f) {
                // An in-place rewrite of the same version: whole before and after.
                await f.write(content(name, v), 0);
                await f.close();
              }
            }
          }
        } catch (e) {
          stopped = e;
        }
      })();
      await new Promise((r) => setTimeout(r, 150 + Math.random() * 600));
      await c.server!.kill('SIGKILL');
      running = false;
      await work;
      // The loop ends with the server's death, a lost connection, or not at all (it saw running go false first).
      if (stopped !== undefined) expect(lostServer(stopped), `round ${round}: ${String(stopped)}`).toBe(true);
      stopped = undefined;
      await c.startServer();
      const check = await c.client();
      expect(await check.check(), `round ${round}`).toEqual({ consistent: true, problems: [] });
      const entries = await check.readdir('/dir').catch(() => []);
      for (const e of entries) expect(whole(await check.readFile(`/dir/${e.name}`)), `round ${round}: /dir/${e.name}`).toBe(true);
      const space = (await check.space()).pairs[0]!;
      expect(space.freeBlocks + space.usedBlocks).toBe(space.totalBlocks);
    }
    expect(version).toBeGreaterThan(10);
  });
});

describe('cfs failover', () => {
  it("finishes a read from another copy when the copy's storage system is killed mid-read", async () => {
    const dir = tmpDir('bm-cfs-ha-');
    cleanup.push(async () => fs.rmSync(dir, { recursive: true, force: true }));
    const p = { nbd1: await freePort(), admin1: await freePort(), peer1: await freePort(), nbd2: await freePort(), admin2: await freePort(), peer2: await freePort(), cfs: await freePort() };
    const config = path.join(dir, 'cluster.yaml');
    fs.writeFileSync(
      config,
      `peerTimeout: 1s
storageSystems:
  - id: 1
    nbd: 127.0.0.1:${p.nbd1}
    admin: 127.0.0.1:${p.admin1}
    peer: 127.0.0.1:${p.peer1}
    volumes: [ { id: 8, size: 64MiB } ]
  - id: 2
    nbd: 127.0.0.1:${p.nbd2}
    admin: 127.0.0.1:${p.admin2}
    peer: 127.0.0.1:${p.peer2}
    volumes: [ { id: 8, size: 64MiB } ]
pairs:
  - { name: pair1, mode: async, master: { ss: 1, vol: 8 }, mirrors: [ { ss: 2, vol: 8 } ] }
cfs:
  listen: 127.0.0.1:${p.cfs}
`,
    );
    const ss2: RunningCluster = await startUp(config, [p.nbd2, p.admin2], ['--only', '2']);
    cleanup.push(() => ss2.stop('SIGKILL'));
    const ss1: RunningCluster = await startUp(config, [p.nbd1, p.admin1, p.cfs], ['--only', '1']);
    cleanup.push(() => ss1.stop('SIGKILL'));
    const { CfsClient } = await import('../src/cfs/client.js');
    const client: CfsClient = await CfsClient.connect({ server: { host: '127.0.0.1', port: p.cfs } });
    cleanup.push(() => client.close());
    const data = pattern('ha', 24 * MiB);
    await client.writeFile('/movie', data);
    // The mirror in storage system 2 holds the data once the pair is in PAIR.
    await until('pair1 in PAIR', async () => {
      const s = (await (await adminFetch(`http://127.0.0.1:${p.admin1}/api/status`)).json()) as { pairs: { name: string; state: string }[] };
      return s.pairs.find((x) => x.name === 'pair1')?.state === 'PAIR';
    }, 60_000);

    // Ties rotate: of two opens, one reads from the mirror in storage system 2.
    const first = await client.open('/movie');
    const second = await client.open('/movie');
    const onMirror = [first, second].find((f) => f.copy.ss === 2)!;
    expect(onMirror.copy).toMatchObject({ ss: 2, vol: 8, mirror: 1 });
    const got = Buffer.alloc(data.length);
    expect(await onMirror.read(got.subarray(0, 8 * MiB), 0)).toBe(8 * MiB);

    await ss2.stop('SIGKILL');
    // The rest of the read, in flight all at once, fails on storage system 2 and finishes on the master.
    expect(await onMirror.read(got.subarray(8 * MiB), 8 * MiB)).toBe(16 * MiB);
    expect(got.equals(data)).toBe(true);
    expect(onMirror.copy).toMatchObject({ ss: 1, mirror: 0 });
    const u = await client.usage();
    expect(u.pairs[0]!.copies.find((x) => x.ss === 2)).toMatchObject({ failed: true });
    // New opens pass the failed copy over while it is marked.
    const third = await client.open('/movie');
    expect(third.copy.ss).toBe(1);
    await Promise.all([first.close(), second.close(), third.close()]);
  });
});

async function readAll(f: { size: number; read(b: Buffer, at: number): Promise<number> }): Promise<Buffer> {
  const buf = Buffer.alloc(f.size);
  let at = 0;
  while (at < buf.length) {
    const n = await f.read(buf.subarray(at), at);
    if (n === 0) break;
    at += n;
  }
  return buf;
}

describe('cfs metadata journal and allocator', () => {
  it('replays the journal after a snapshot and cuts a torn tail', async () => {
    const { JournalStore, JOURNAL_HEADER } = await import('../src/cfs/journal.js');
    const { Namespace } = await import('../src/cfs/namespace.js');
    const dir = tmpDir('bm-cfs-journal-');
    cleanup.push(async () => fs.rmSync(dir, { recursive: true, force: true }));
    let ns = new Namespace(BLOCK);
    let state = await JournalStore.load(dir);
    let store = await JournalStore.open(dir, state, () => ns.snapshot());
    const apply = (body: Parameters<typeof ns.apply>[0]) => {
      ns.apply(body);
      store.append(body);
    };
    apply({ t: 'mkdir', parent: 1, name: 'd', ino: 2, mtime: 1 });
    apply({ t: 'create', parent: 2, name: 'f', ino: 3, pair: 'p', mtime: 2 });
    apply({ t: 'write', ino: 3, size: 3 * BLOCK, mtime: 3, extents: [[0, 10, 3]] });
    await store.sync();
    await store.close();
    // A crash in the middle of the next append: half a frame at the end.
    const journal = path.join(dir, 'journal');
    const before = fs.statSync(journal).size;
    fs.appendFileSync(journal, Buffer.from([200, 0, 0, 0, 1, 2, 3, 4, 5]));

    state = await JournalStore.load(dir);
    expect(state.tornBytes).toBe(9);
    expect(fs.statSync(journal).size).toBe(before);
    ns = new Namespace(BLOCK);
    for (const r of state.records) ns.apply(r);
    expect(ns.resolve('/d/f')).toMatchObject({ type: 'file', size: 3 * BLOCK, map: [10, 11, 12] });
    // Opening compacts: a snapshot holds everything, the journal is empty, and records go on from there.
    store = await JournalStore.open(dir, state, () => ns.snapshot());
    expect(fs.statSync(journal).size).toBe(JOURNAL_HEADER);
    const rename = { t: 'rename' as const, from: [2, 'f'] as [number, string], to: [1, 'g'] as [number, string], mtime: 4 };
    ns.apply(rename);
    expect(store.append(rename).seq).toBe(4);
    await store.close();
    // A frame whose checksum does not match ends the journal there too.
    const bytes = fs.readFileSync(journal);
    bytes[bytes.length - 2] ^= 0xff;
    fs.writeFileSync(journal, bytes);
    state = await JournalStore.load(dir);
    expect(state.records).toHaveLength(0);
    expect(state.tornBytes).toBe(bytes.length - JOURNAL_HEADER);
    const again = Namespace.fromSnapshot(state.snapshot!, BLOCK);
    expect(again.resolve('/d/f')).toMatchObject({ ino: 3, map: [10, 11, 12] });
  });

  it('allocates contiguous runs near the goal, merges what is freed and refuses a double free', async () => {
    const { BlockAllocator } = await import('../src/cfs/allocator.js');
    const a = new BlockAllocator(100);
    expect(a.allocate(10)).toEqual([[0, 10]]);
    expect(a.allocate(5, 10)).toEqual([[10, 5]]); // continues where the file ends
    expect(a.allocate(10, 50)).toEqual([[50, 10]]);
    a.release(0, 10);
    expect(a.allocate(20, 15)).toEqual([[15, 20]]); // the first long-enough run after the goal
    a.release(10, 5);
    expect(a.freeBlocks).toBe(100 - 30);
    expect(a.extents()).toEqual([[0, 15], [35, 15], [60, 40]]);
    expect(() => a.release(12, 2)).toThrow(/double free/);
    expect(a.allocate(71)).toEqual([]); // not enough: nothing taken
    expect(a.allocate(60)).toEqual([[0, 15], [35, 5], [60, 40]]); // fragmented: the largest runs, returned in volume order
    expect(a.extents()).toEqual([[40, 10]]);
    expect(a.take(45, 5)).toBe(true);
    expect(a.take(45, 1)).toBe(false); // already used
    expect(a.take(100, 1)).toBe(false); // outside the volume
    expect(a.freeBlocks).toBe(5);
  });
});

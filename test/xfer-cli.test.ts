// blockmirror xfer between real processes through a real `blockmirror serve` export: two hosts
// that share nothing but the volume exchange a file byte for byte, over two paths with one cut
// mid-transfer, a corrupted segment or pointer table on the export is refused, gc reclaims the
// part of a killed sender, and bad input gets one line and a non-zero exit.
import { spawn, type ChildProcess } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { connect } from '../src/nbd/client.js';
import { BLOCK, PTR, PtrFlag } from '../src/xfer/layout.js';
import { XferCorruptError } from '../src/xfer/errors.js';
import { openPath } from '../src/xfer/paths.js';
import { XferVolume } from '../src/xfer/volume.js';
import { recv } from '../src/xfer/receiver.js';
import { sendMessages, type Reader } from '../src/xfer/sender.js';
import { CLI, freePort, run, startServe, tmpDir, type CmdResult, type RunningServer } from './helpers/servers.js';
import { FAST, HookedPath } from './helpers/xfer.js';
import { Output, fileReader } from '../src/cli/xfer.js';
import { preadNoWait, pwritevSync } from '../src/blockdev/native.js';

// Tests that start a dozen CLI processes: each takes seconds to start on a loaded machine.
const CLI_HEAVY = 120_000;

const cleanups: (() => Promise<unknown>)[] = [];
afterEach(async () => {
  while (cleanups.length) await cleanups.pop()!().catch(() => undefined);
});

async function serve(size = '64MiB'): Promise<RunningServer> {
  const s = await startServe(['--size', size]);
  cleanups.push(() => s.stop());
  return s;
}

const xfer = (args: string[], timeoutMs = 60_000) => run(process.execPath, [CLI, 'xfer', ...args], { timeoutMs });

function spawnXfer(args: string[]): { proc: ChildProcess; done: Promise<CmdResult> } {
  const proc = spawn(process.execPath, [CLI, 'xfer', ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  proc.stdout!.setEncoding('utf8').on('data', (d: string) => (stdout += d));
  proc.stderr!.setEncoding('utf8').on('data', (d: string) => (stderr += d));
  const done = new Promise<CmdResult>((resolve) => proc.once('close', (code) => resolve({ code, stdout, stderr })));
  cleanups.push(async () => {
    if (proc.exitCode === null && proc.signalCode === null) proc.kill('SIGKILL');
    await done;
  });
  return { proc, done };
}

const sha256 = (file: string) => createHash('sha256').update(fs.readFileSync(file)).digest('hex');

function randomFile(dir: string, bytes: number): string {
  const f = path.join(dir, 'in.bin');
  fs.writeFileSync(f, randomBytes(bytes));
  return f;
}

/** A TCP relay to the export: a second path that the test can cut. */
async function relay(port: number) {
  let relayed = 0;
  const sockets = new Set<net.Socket>();
  const listeners: ((n: number) => void)[] = [];
  const server = net.createServer((client) => {
    const upstream = net.connect(port, '127.0.0.1');
    for (const s of [client, upstream]) {
      sockets.add(s);
      s.on('error', () => s.destroy());
      s.on('close', () => sockets.delete(s));
    }
    client.on('data', (d) => {
      relayed += d.length;
      listeners.forEach((l) => l(relayed));
    });
    client.pipe(upstream).pipe(client);
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const cut = () => {
    server.close();
    for (const s of sockets) s.destroy();
  };
  cleanups.push(async () => cut());
  return {
    port: (server.address() as net.AddressInfo).port,
    /** Resolves once the clients have pushed at least `n` bytes through. */
    after: (n: number) => new Promise<void>((resolve) => listeners.push((total) => total >= n && resolve())),
    relayed: () => relayed,
    cut,
  };
}

describe('xfer between processes through blockmirror serve', () => {
  it('moves a 6 MiB file from one process to another byte for byte', async () => {
    const s = await serve();
    const dir = tmpDir('bm-xfer-cli-');
    const input = randomFile(dir, 6 << 20);
    const out = path.join(dir, 'out.bin');
    const f = await xfer(['format', s.uri, '--seg-size', '256KiB', '--segments', '32', '--max-conn', '2']);
    expect(f.stdout).toBe('formatted 1 device(s): 32 segments of 256KiB, 2 connections of 16 segments each\n');
    const r = spawnXfer(['recv', '--dev', s.uri, '--as', '2', '--out', out]);
    const sent = await xfer(['send', '--dev', s.uri, '--from', '1', '--to', '2', input]);
    const got = await r.done;
    expect(sent.stderr).toMatch(/^sent 6291456 bytes in 25 segments over connection 0\n$/);
    expect(got.stderr).toMatch(/^received 6291456 bytes in 25 segments from 1 over connection 0 \(1 message\)\n$/);
    expect([sent.code, got.code]).toEqual([0, 0]);
    expect(sha256(out)).toBe(sha256(input));
    const ls = await xfer(['ls', '--dev', s.uri, '--json']);
    expect(JSON.parse(ls.stdout).connections.map((c: { state: string; segmentsInUse: number }) => [c.state, c.segmentsInUse])).toEqual([['free', 0], ['free', 0]]);
  });

  it('writes what it receives to stdout whole before it exits, through a pipe that is read slowly', async () => {
    // recv exits the moment its work is done (process.exit, no teardown): nothing it wrote may be
    // cut off, even when the reader of its pipe lags.
    const s = await serve();
    const dir = tmpDir('bm-xfer-cli-');
    const input = randomFile(dir, 5 << 20);
    expect((await xfer(['format', s.uri, '--seg-size', '256KiB', '--segments', '32', '--max-conn', '1'])).code).toBe(0);
    const proc = spawn(process.execPath, [CLI, 'xfer', 'recv', '--dev', s.uri, '--as', '2'], { stdio: ['ignore', 'pipe', 'pipe'] });
    cleanups.push(async () => void proc.kill('SIGKILL'));
    const chunks: Buffer[] = [];
    proc.stdout!.on('data', (d: Buffer) => {
      chunks.push(d);
      proc.stdout!.pause();
      setTimeout(() => proc.stdout!.resume(), 2);
    });
    const exited = new Promise<number | null>((resolve) => proc.once('close', resolve));
    const sent = await xfer(['send', '--dev', s.uri, '--from', '1', '--to', '2', input]);
    expect([sent.code, await exited]).toEqual([0, 0]);
    expect(Buffer.concat(chunks).equals(fs.readFileSync(input))).toBe(true);
  });

  it('carries several files as the messages of one connection, each into its own file', async () => {
    const s = await serve();
    const dir = tmpDir('bm-xfer-cli-');
    // Empty, one byte, exactly one segment's data, and several segments with a partial last one.
    const sizes = [0, 1, 256 * 1024 - 64, 3 * (256 * 1024) + 5];
    const inputs = sizes.map((n, i) => {
      const f = path.join(dir, `in-${i}.bin`);
      fs.writeFileSync(f, randomBytes(n));
      return f;
    });
    const outDir = path.join(dir, 'out');
    fs.mkdirSync(outDir);
    await xfer(['format', s.uri, '--seg-size', '256KiB', '--segments', '4', '--max-conn', '1']);
    const r = spawnXfer(['recv', '--dev', s.uri, '--as', '2', '--out-dir', outDir]);
    const sent = await xfer(['send', '--dev', s.uri, '--from', '1', '--to', '2', ...inputs]);
    const got = await r.done;
    expect([sent.code, got.code], sent.stderr + got.stderr).toEqual([0, 0]);
    expect(got.stderr).toMatch(/over connection 0 \(4 messages\)\n$/);
    expect(fs.readdirSync(outDir).sort()).toEqual(['message-1', 'message-2', 'message-3', 'message-4']);
    inputs.forEach((f, i) => expect(sha256(path.join(outDir, `message-${i + 1}`)), `message ${i + 1}`).toBe(sha256(f)));
  });

  it('goes on over the other path when one path is cut mid-transfer, on both hosts', async () => {
    const s = await serve();
    const cable = await relay(s.port);
    const paths = ['--dev', s.uri, '--dev', `nbd://127.0.0.1:${cable.port}/disk`];
    const dir = tmpDir('bm-xfer-cli-');
    const input = randomFile(dir, 24 << 20);
    const out = path.join(dir, 'out.bin');
    await xfer(['format', s.uri, '--seg-size', '256KiB', '--segments', '32', '--max-conn', '1']);
    const r = spawnXfer(['recv', ...paths, '--as', '2', '--out', out]);
    const w = spawnXfer(['send', ...paths, '--from', '1', '--to', '2', input]);
    await cable.after(4 << 20);
    cable.cut();
    const [sent, got] = await Promise.all([w.done, r.done]);
    expect([sent.code, got.code], sent.stderr + got.stderr).toEqual([0, 0]);
    expect(sha256(out)).toBe(sha256(input));
    // Both used the relayed path and both lost it.
    expect(sent.stderr).toContain(`failed; going on over the others`);
    expect(got.stderr).toContain(`failed; going on over the others`);
    expect(cable.relayed()).toBeLessThan(24 << 20);
  });

  it('reclaims with gc the connection and segments of a sender and receiver killed with -9', async () => {
    const s = await serve();
    const dir = tmpDir('bm-xfer-cli-');
    const input = randomFile(dir, 8 << 20);
    await xfer(['format', s.uri, '--seg-size', '64KiB', '--segments', '8', '--max-conn', '1']);
    // The receiver writes to a pipe nobody reads: it stalls, so the sender fills every segment.
    const r = spawnXfer(['recv', '--dev', s.uri, '--as', '2']);
    r.proc.stdout!.pause();
    const w = spawnXfer(['send', '--dev', s.uri, '--from', '1', '--to', '2', input]);
    let conn: { state: string; segmentsInUse: number } | undefined;
    for (;;) {
      conn = JSON.parse((await xfer(['ls', '--dev', s.uri, '--json'])).stdout).connections[0];
      if (conn!.state === 'connected' && conn!.segmentsInUse > 0) break;
    }
    w.proc.kill('SIGKILL');
    r.proc.kill('SIGKILL');
    await Promise.all([w.done, r.done]);
    const before = JSON.parse((await xfer(['ls', '--dev', s.uri, '--json'])).stdout).connections[0];
    expect(before.state).toBe('connected');
    const gc = await xfer(['gc', '--dev', s.uri, '--timeout', '300']);
    expect(gc.code).toBe(0);
    expect(gc.stdout).toBe(`reclaimed connection 0: the sender half of process 1, ${before.segmentsInUse} segments\nreclaimed connection 0: the receiver half of process 2\n`);
    const after = JSON.parse((await xfer(['ls', '--dev', s.uri, '--json'])).stdout).connections[0];
    expect([after.state, after.segmentsInUse]).toEqual(['free', 0]);
    // The only slot is usable again.
    const out = path.join(dir, 'out.bin');
    const again = spawnXfer(['recv', '--dev', s.uri, '--as', '2', '--out', out]);
    expect((await xfer(['send', '--dev', s.uri, '--from', '1', '--to', '2', input])).code).toBe(0);
    expect((await again.done).code).toBe(0);
    expect(sha256(out)).toBe(sha256(input));
  }, CLI_HEAVY);

  it('resumes a sender and then a receiver killed with -9 from the on-disk tables, delivering the file exactly once', async () => {
    const s = await serve();
    const dir = tmpDir('bm-xfer-cli-');
    const input = randomFile(dir, 4 << 20);
    const out = path.join(dir, 'out.bin');
    await xfer(['format', s.uri, '--seg-size', '8KiB', '--segments', '8', '--max-conn', '1']);
    const watch = await XferVolume.open([s.uri]);
    cleanups.push(() => watch.close());
    const highest = async (table: 'ptr' | 'ack') => {
      const t = table === 'ptr' ? await watch.readPtr(0) : await watch.readAck(0);
      return Math.max(0, ...t.entries.filter((e) => e.flag !== 0).map((e) => e.seq));
    };
    const until = async (table: 'ptr' | 'ack', seq: number) => {
      while ((await highest(table)) < seq) await new Promise((r) => setTimeout(r, 5));
    };
    const send = ['send', '--dev', s.uri, '--from', '1', '--to', '2', '--heartbeat-ms', '100', input];
    const recvArgs = ['recv', '--dev', s.uri, '--as', '2', '--out', out, '--heartbeat-ms', '100'];
    const r1 = spawnXfer(recvArgs);
    const w1 = spawnXfer(send);
    await until('ptr', 100);
    w1.proc.kill('SIGKILL');
    expect((await w1.done).code).toBeNull();
    const w2 = spawnXfer([...send, '--resume']);
    await until('ack', 300);
    r1.proc.kill('SIGKILL');
    expect((await r1.done).code).toBeNull();
    const r2 = spawnXfer([...recvArgs, '--resume']);
    const [sent, got] = await Promise.all([w2.done, r2.done]);
    expect([sent.code, got.code], sent.stderr + got.stderr).toEqual([0, 0]);
    expect(got.stderr).toMatch(/received \d+ bytes in 517 segments from 1 over connection 0 \(\d+ messages?\)\n$/);
    expect(sent.stderr).toContain('"msg":"resuming connection"');
    expect(got.stderr).toContain('"msg":"resuming connection"');
    expect(sha256(out)).toBe(sha256(input));
    expect(JSON.parse((await xfer(['ls', '--dev', s.uri, '--json'])).stdout).connections[0].state).toBe('free');
  }, CLI_HEAVY);

  it('refuses a segment header corrupted on the export, delivering nothing, and the sender says the receiver left', async () => {
    const s = await serve();
    const dir = tmpDir('bm-xfer-cli-');
    await xfer(['format', s.uri, '--seg-size', '64KiB', '--segments', '8', '--max-conn', '1']);
    const w = spawnXfer(['send', '--dev', s.uri, '--from', '1', '--to', '2', '--timeout', '5000', randomFile(dir, 100_000)]);
    const vandal = await connect(s.uri);
    cleanups.push(() => vandal.disconnect());
    let corrupted = false;
    const path0 = await openPath(s.uri);
    let vol: XferVolume | undefined;
    vol = await XferVolume.fromPaths([
      new HookedPath(path0, {
        // The first time the receiver reads segment 0, someone else has just damaged its header.
        read: async (off, data) => {
          if (!vol || corrupted || off !== vol.segments(0)[0]!.offset) return undefined;
          corrupted = true;
          await vandal.pwrite(Buffer.alloc(16, 0xee), off + 16);
          return path0.read(off, data.length);
        },
      }),
    ]);
    cleanups.push(() => vol!.close());
    const got: Buffer[] = [];
    const err = await recv(vol, 2, async (d) => void got.push(d), { ...FAST, retries: 5 }).catch((e: Error) => e);
    expect(err).toBeInstanceOf(XferCorruptError);
    expect((err as Error).message).toMatch(/^segment 0 \(seq 1\) of connection 0 header: fails its checksum .*; refused after 5 reads/);
    expect(got).toEqual([]);
    const sent = await w.done;
    expect(sent.code).toBe(1);
    expect(sent.stderr).toBe('blockmirror: receiver 2 left connection 0 before the last message\n');
  });

  it('refuses a pointer table corrupted on the export', async () => {
    const s = await serve();
    const dir = tmpDir('bm-xfer-cli-');
    await xfer(['format', s.uri, '--seg-size', '64KiB', '--segments', '8', '--max-conn', '1']);
    spawnXfer(['send', '--dev', s.uri, '--from', '1', '--to', '2', randomFile(dir, 1000)]);
    const vandal = await connect(s.uri);
    cleanups.push(() => vandal.disconnect());
    const path0 = await openPath(s.uri);
    let corrupted = false;
    let vol: XferVolume | undefined;
    vol = await XferVolume.fromPaths([
      new HookedPath(path0, {
        // Once the sender's pointer table shows its one segment, a bit of it flips on the export.
        read: async (off, data) => {
          if (!vol || corrupted || off !== vol.mcb.ptrTables || !PTR.matches(data)) return undefined;
          const t = PTR.decode('ptr', data);
          if (t.entries[0]!.flag !== PtrFlag.WRITTEN) return undefined;
          corrupted = true;
          const bad = Buffer.from(data);
          bad[100]! ^= 4;
          await vandal.pwrite(bad, off);
          return path0.read(off, BLOCK);
        },
      }),
    ]);
    cleanups.push(() => vol!.close());
    const got: Buffer[] = [];
    await expect(recv(vol, 2, async (d) => void got.push(d), { ...FAST, retries: 5 })).rejects.toThrow(
      /^pointer table of connection 0: fails its checksum .*torn, stale or damaged; refused after 5 reads/,
    );
    expect(corrupted).toBe(true);
    expect(got).toEqual([]);
  });
});

describe('xfer send pacing', () => {
  it('puts each segment on the wire before it reads further into its input, not once every buffer is full', async () => {
    // The sender reads a cached file on its own thread without waiting, so filling the next
    // buffers is a chain of promise jobs, and the NBD client sends at the end of the tick: the
    // first writes used to leave only once four 4 MiB segments were in flight and a fifth and
    // sixth were read. Here the sender's only path goes through a relay that counts the bytes, and
    // the input notes, at each read, how much had gone through.
    const s = await serve('96MiB');
    const f = await xfer(['format', s.uri, '--seg-size', '4MiB', '--segments', '16', '--max-conn', '1']);
    expect(f.code).toBe(0);
    const cable = await relay(s.port);
    const a = await XferVolume.open([`nbd://127.0.0.1:${cable.port}/disk`]);
    const b = await XferVolume.open([s.uri]);
    cleanups.push(() => a.close(), () => b.close());
    expect(a.inFlight).toBe(4);
    const data = randomBytes(8 * a.capacity);
    const seenAtRead: number[] = [];
    let at = 0;
    const input: Reader = {
      read: (buf, offset, length) => {
        seenAtRead.push(cable.relayed());
        const n = Math.min(length, data.length - at);
        data.copy(buf, offset, at, at + n);
        at += n;
        return Promise.resolve(n);
      },
    };
    const got: Buffer[] = [];
    await Promise.all([
      sendMessages(a, 1, 2, [input], FAST),
      recv(b, 2, async (piece) => void got.push(Buffer.from(piece)), FAST),
    ]);
    expect(Buffer.concat(got).equals(data)).toBe(true);
    // One read per piece. Before the fifth (what four in flight and one held back need), the
    // first segment's payload was going through (the relay runs on this thread too, so it moves
    // a socket read's worth per turn: 0.3 MB by then); with the old pacing nothing but the
    // tables' 12 KiB had, until the sixth.
    expect(seenAtRead.length).toBeGreaterThanOrEqual(8);
    expect(seenAtRead[4]! - seenAtRead[0]!).toBeGreaterThan(64 << 10);
  });
});

describe('xfer bad input', () => {
  it('answers each mistake with one line and a non-zero exit', async () => {
    const s = await serve('8MiB');
    const dir = tmpDir('bm-xfer-cli-');
    const closedPort = await freePort();
    const cases: [string[], number, RegExp][] = [
      [['format', s.uri, '--seg-size', '1000'], 2, /--seg-size 1000: a multiple of 4096 bytes/],
      [['format', s.uri, '--segments', 'many'], 2, /--segments "many": expected an integer/],
      [['format', s.uri, '--seg-size', '1MiB', '--segments', '64'], 2, /is 8388608 bytes; this geometry needs/],
      // The defaults: 64 segments of 4 MiB, 4 connections (72 KiB of tables).
      [['format', s.uri], 2, /is 8388608 bytes; this geometry needs 268509184 \(tables and 64 segments of 4194304\)/],
      [['ls', '--dev', s.uri], 1, /is not a transfer device \(it starts with zeroes, neither "MAS_EMC" nor "SEC_EMC"\): format it with blockmirror xfer format/],
      [['send', '--from', '1', '--to', '2', '-'], 2, /give the volume with --dev/],
      [['send', '--dev', s.uri, '--from', '0', '--to', '2'], 2, /--from "0": a process ID is an integer from 1 to 4294967295/],
      [['send', '--dev', s.uri, '--from', '1', '--to', '2', path.join(dir, 'missing')], 2, /send: cannot read .*missing: ENOENT/],
      [['recv', '--dev', s.uri, '--as', 'two'], 2, /--as "two": a process ID/],
      [['send', '--dev', s.uri, '--from', '1', '--to', '2', '--resume', '-'], 2, /send --resume needs the FILEs again \(stdin cannot be rewound\)/],
      [['recv', '--dev', s.uri, '--as', '2', '--resume'], 2, /recv --resume needs --out FILE or --out-dir DIR/],
      [['recv', '--dev', s.uri, '--as', '2', '--out', 'a', '--out-dir', dir], 2, /recv: give --out or --out-dir, not both/],
      [['recv', '--dev', s.uri, '--as', '2', '--out-dir', path.join(dir, 'nowhere')], 2, /recv: --out-dir .*nowhere is not a directory/],
      [['send', '--dev', s.uri, '--from', '1', '--to', '2', path.join(dir, 'a'), '-'], 2, /send: stdin \(-\) is the only message when given/],
      [['recv', '--dev', 'http://x/y', '--as', '2'], 2, /--dev http:\/\/x\/y: unknown scheme/],
      [['ls', '--dev', path.join(dir, 'nothing')], 2, /--dev .*nothing: ENOENT/],
      [['gc', '--dev', s.uri, '--timeout', '-1'], 2, /--timeout "-1": expected an integer/],
      [['ls', '--dev', `nbd://127.0.0.1:${closedPort}/x`], 1, new RegExp(`^blockmirror: --dev nbd://127\\.0\\.0\\.1:${closedPort}/x: nothing listens there; start the storage system \\(blockmirror up or serve\\) or check the address\n$`)],
      [['frobnicate'], 2, /xfer: unknown command "frobnicate" \(expected format, send, recv, ls or gc\)/],
    ];
    for (const [args, code, message] of cases) {
      const r = await xfer(args);
      expect([r.code, r.stderr], args.join(' ')).toEqual([code, expect.stringMatching(message)]);
      expect(r.stderr.trim().split('\n'), args.join(' ')).toHaveLength(1);
    }
    const help = await xfer(['send', '--help']);
    expect(help.stdout).toMatch(/Example:\n {2}blockmirror xfer send --dev nbd:/);
  }, CLI_HEAVY);
});

describe('xfer send reading its FILE', () => {
  it('reads a file whole from any start, from the page cache when it can and through the pool when it cannot, short reads included', async () => {
    const dir = tmpDir('bm-xfer-read-');
    const file = path.join(dir, 'in.bin');
    const data = randomBytes(3 * 1024 * 1024 + 12345);
    fs.writeFileSync(file, data);
    const fh = await fs.promises.open(file, 'r');
    cleanups.push(() => fh.close());
    let cached = 0;
    let pooled = 0;
    const real = (fd: number, buf: Buffer, pos: number) => {
      const n = preadNoWait(fd, buf, pos);
      if (n >= 0) cached++;
      return n;
    };
    const never = () => {
      pooled++;
      return -1;
    };
    // Half of the calls say the cache does not have it, the others read at most 1000 bytes from it.
    let k = 0;
    const mixed = (fd: number, buf: Buffer, pos: number) => (k++ % 2 ? -1 : preadNoWait(fd, buf.subarray(0, Math.min(buf.length, 1000)), pos));
    for (const [nowait, start] of [
      [real, 0],
      [never, 0],
      [mixed, 0],
      [real, 1_000_003],
      [mixed, data.length],
    ] as const) {
      const reader = fileReader(fh, start, nowait);
      const got: Buffer[] = [];
      const buf = Buffer.alloc(256 * 1024 + 64);
      for (let n = -1; n !== 0; ) {
        n = await reader.read(buf, 64, 256 * 1024);
        got.push(Buffer.from(buf.subarray(64, 64 + n)));
      }
      expect(Buffer.concat(got).equals(data.subarray(start))).toBe(true);
    }
    // The file was just written: the page cache had it, and the fallback was taken when told to.
    expect(cached).toBeGreaterThan(0);
    expect(pooled).toBeGreaterThan(0);
  });
});

describe('xfer recv writing its output', () => {
  const pieces = Array.from({ length: 6 }, (_, i) => randomBytes(100_000 + i));
  const deliverAll = async (out: Output) => {
    await out.open();
    for (const p of pieces) await out.deliver(p, 1);
    await out.close();
  };

  it('writes pieces into a file on its own thread, and through the pool once a write had to wait for the disk', async () => {
    const dir = tmpDir('bm-xfer-out-');
    const plain = new Output(path.join(dir, 'a'), undefined, false);
    await deliverAll(plain);
    expect(fs.readFileSync(path.join(dir, 'a')).equals(Buffer.concat(pieces))).toBe(true);
    expect(plain.writes).toEqual({ sync: 6, pool: 0 });
    // A disk that makes the second write sleep 5 ms: the rest go to the pool (for a second).
    let calls = 0;
    const slow = (fd: number, bufs: readonly Buffer[], pos: number) => {
      const r = pwritevSync(fd, bufs, pos);
      if (++calls !== 2) return r;
      const until = performance.now() + 5;
      while (performance.now() < until);
      return { ...r, slept: true };
    };
    const throttled = new Output(path.join(dir, 'b'), undefined, false, slow);
    await deliverAll(throttled);
    expect(fs.readFileSync(path.join(dir, 'b')).equals(Buffer.concat(pieces))).toBe(true);
    expect(throttled.writes).toEqual({ sync: 2, pool: 4 });
    // A short synchronous write is finished by the pool, at the right place.
    const short = new Output(path.join(dir, 'c'), undefined, false, (fd, bufs, pos) => pwritevSync(fd, [bufs[0]!.subarray(0, 1000)], pos));
    await deliverAll(short);
    expect(fs.readFileSync(path.join(dir, 'c')).equals(Buffer.concat(pieces))).toBe(true);
    expect(short.writes).toEqual({ sync: 6, pool: 6 });
  });

  it('sends a FIFO its pieces in order through the pool, and /dev/null takes them on its own thread', async () => {
    const dir = tmpDir('bm-xfer-out-');
    const fifo = path.join(dir, 'fifo');
    expect((await run('mkfifo', [fifo])).code).toBe(0);
    const copy = path.join(dir, 'copy');
    const reader = run('sh', ['-c', 'cat "$0" > "$1"', fifo, copy]);
    const out = new Output(fifo, undefined, false);
    await deliverAll(out);
    expect((await reader).code).toBe(0);
    expect(fs.readFileSync(copy).equals(Buffer.concat(pieces))).toBe(true);
    expect(out.writes).toEqual({ sync: 0, pool: 6 });
    const devNull = new Output('/dev/null', undefined, false);
    await deliverAll(devNull);
    expect(devNull.writes).toEqual({ sync: 6, pool: 0 });
  });
});

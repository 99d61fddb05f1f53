// blockmirror xfer at the size and in the settings of issue 17, slow scenarios in a file of their
// own: two processes as two hosts move a 256 MiB file through one export of a running storage
// system, each over two NBD connections; and a transfer through the master of a sync pair across
// two storage systems, each host with a path to both copies, survives a swap of the pair in the
// middle: the writes follow the new master, and the file arrives byte for byte.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { formatVolume } from '../src/xfer/volume.js';
import { CLI, run, startServe, tmpDir, type CmdResult } from './helpers/servers.js';
import { SSProcess, inSync, loopbackAddrs, twoSSYaml, writeConfig } from './helpers/remote.js';

const cleanups: (() => Promise<unknown>)[] = [];
afterEach(async () => {
  while (cleanups.length) await cleanups.pop()!().catch(() => undefined);
});

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

async function sha256(file: string): Promise<string> {
  const h = createHash('sha256');
  for await (const chunk of fs.createReadStream(file, { highWaterMark: 1 << 20 })) h.update(chunk as Buffer);
  return h.digest('hex');
}

function randomFile(dir: string, mib: number): string {
  const f = path.join(dir, 'in.bin');
  const fd = fs.openSync(f, 'w');
  for (let i = 0; i < mib; i++) fs.writeSync(fd, randomBytes(1 << 20));
  fs.closeSync(fd);
  cleanups.push(async () => fs.rmSync(dir, { recursive: true, force: true }));
  return f;
}

describe('xfer through a running storage system', () => {
  it('moves a 256 MiB file between two processes, each with two NBD connections to the export, byte for byte', async () => {
    const s = await startServe(['--size', '128MiB']);
    cleanups.push(() => s.stop());
    const dir = tmpDir('bm-xfer-ss-');
    const input = randomFile(dir, 256);
    const out = path.join(dir, 'out.bin');
    const f = await run(process.execPath, [CLI, 'xfer', 'format', s.uri, '--seg-size', '1MiB', '--segments', '64', '--max-conn', '1'], { timeoutMs: 60_000 });
    expect(f.code, f.stderr).toBe(0);
    const paths = ['--dev', s.uri, '--dev', s.uri];
    const r = spawnXfer(['recv', ...paths, '--as', '2', '--out', out]);
    const w = spawnXfer(['send', ...paths, '--from', '1', '--to', '2', input]);
    const [sent, got] = await Promise.all([w.done, r.done]);
    expect([sent.code, got.code], sent.stderr + got.stderr).toEqual([0, 0]);
    expect(got.stderr).toMatch(/^received 268435456 bytes in 257 segments from 1 over connection 0 \(1 message\)\n$/);
    expect(fs.statSync(out).size).toBe(256 << 20);
    expect(await sha256(out)).toBe(await sha256(input));
  }, 600_000);

  it('finishes a transfer through the master of a sync pair swapped in the middle, the paths following the new master, byte for byte', async () => {
    const [a, b] = await loopbackAddrs();
    const { dir, file } = writeConfig(twoSSYaml(a, b, [{ name: 'p', mode: 'sync', vol: 1 }], { peerTimeout: '1s', size: '64MiB' }));
    const ss1 = new SSProcess(1, file, a);
    const ss2 = new SSProcess(2, file, b);
    cleanups.push(() => ss1.kill(), () => ss2.kill());
    await Promise.all([ss1.start(), ss2.start()]);
    await ss1.waitPair('p', inSync, 'in sync');
    // Formatted through the master; the sync pair puts it on the mirror too.
    await formatVolume([ss1.uri(1)], { segSize: 256 * 1024, segments: 32, maxConn: 1 });
    const input = randomFile(dir, 48);
    // Each host has a path to each copy: writes land on whichever is the master at the time.
    const paths = ['--dev', ss1.uri(1), '--dev', ss2.uri(1), '--failover-ms', '30000', '--timeout', '120000'];
    // The receiver writes to a FIFO the test stops reading: its deliveries wait (in a thread, its
    // event loop and NBD connections stay live), the sender fills the window and waits, and the
    // swap lands in the middle of the transfer; then the test reads on.
    const fifo = path.join(dir, 'out.fifo');
    expect(spawnSync('mkfifo', [fifo]).status).toBe(0);
    const r = spawnXfer(['recv', ...paths, '--as', '2', '--out', fifo]);
    const reader = fs.createReadStream(fifo, { highWaterMark: 1 << 20 });
    const chunks: Buffer[] = [];
    let received = 0;
    let stopped = false;
    const stalled = new Promise<void>((resolve) =>
      reader.on('data', (d) => {
        chunks.push(d as Buffer);
        received += d.length;
        if (received >= 8 << 20 && !stopped) {
          stopped = true;
          reader.pause();
          resolve();
        }
      }),
    );
    const readAll = new Promise<void>((resolve, reject) => reader.once('end', resolve).once('error', reject));
    const w = spawnXfer(['send', ...paths, '--from', '1', '--to', '2', input]);
    await stalled;
    const swap = await run(process.execPath, [CLI, 'pair', 'swap', 'p', '-c', file], { timeoutMs: 60_000 });
    expect(swap.code, swap.stderr).toBe(0);
    expect(w.proc.exitCode, 'the sender was still at work when the swap completed').toBeNull();
    reader.resume();
    const [sent, got] = await Promise.all([w.done, r.done, readAll]);
    expect([sent.code, got.code], sent.stderr + got.stderr).toEqual([0, 0]);
    expect(createHash('sha256').update(Buffer.concat(chunks)).digest('hex')).toBe(await sha256(input));
    // The sender wrote to storage system 1 after the swap, was refused, and went on through 2.
    expect(sent.stderr).toContain(`path ${ss1.uri(1)} to the master device failed; going on over the others`);
    // The transfer ended on the new master: storage system 2, in the pair's next epoch.
    const after = await ss2.waitPair('p', (p) => p.role === 'master' && p.state === 'PAIR', 'ss2 master');
    expect(after.epoch).toBe(2);
    const ls = await run(process.execPath, [CLI, 'xfer', 'ls', '--dev', ss2.uri(1), '--json'], { timeoutMs: 60_000 });
    expect(JSON.parse(ls.stdout).connections.map((c: { state: string }) => c.state)).toEqual(['free']);
  }, 300_000);
});

// Zero-copy READ replies (views of the memory store in the socket's write queue) as a real
// client sees them: python3-libnbd queues many READs and, behind them, trims, zeroes and
// rewrites of the same bytes, and reads no reply until all are sent. Every reply must hold, for
// each block, one instant's bytes of that block (never a mix, never another offset's data).
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import path from 'node:path';
import readline from 'node:readline';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import pino from 'pino';
import { AtomicDevice } from '../src/blockdev/atomic.js';
import { MemoryDevice } from '../src/blockdev/memory.js';
import { ExportTable } from '../src/nbd/exports.js';
import { NbdServer } from '../src/nbd/server.js';
import { PY_DIR, assertHealthy, requireLibnbdPython, runPy, startTarget, type Target } from './helpers/raw.js';
import { PYTHON } from './helpers/servers.js';

interface Race {
  replies: number;
  blocks_checked: number;
  versions_seen: number;
  torn: string[];
  leak: string[];
  final_ok: boolean;
}

let t: Target;

beforeAll(async () => {
  await requireLibnbdPython();
  t = await startTarget({ sizeMiB: 16 });
});

afterAll(async () => {
  await t?.stop();
});

describe('READ replies served from the store while later commands change it', () => {
  it('gives every READ one instant of each block, never torn and never another offset\'s pages, and ends with what the last commands left', async () => {
    const r = await runPy<Race>('views_race.py', [t.uri, '4']);
    expect(r.leak).toEqual([]);
    expect(r.torn).toEqual([]);
    expect(r.replies).toBe(4 * 3 * 16);
    // The replies carried written data, not only zeroes: the check had something to check.
    expect(r.versions_seen).toBeGreaterThan(r.blocks_checked / 4);
    expect(r.final_ok).toBe(true);
    await assertHealthy(t);
  });
});

describe('READ replies a client never reads', () => {
  it('keep the pages they show out of reuse while queued, and give them all back when the client goes away', async () => {
    const MiB = 1024 * 1024;
    const dev = new MemoryDevice(16 * MiB);
    await dev.write(0, Buffer.alloc(16 * MiB, 0x5a));
    const exports = new ExportTable();
    exports.add({ name: 'disk', description: '', device: new AtomicDevice(dev), readOnly: false });
    const server = new NbdServer({ exports, log: pino({ level: 'silent' }) });
    const addr = await server.listen({ kind: 'tcp', host: '127.0.0.1', port: 0 });
    const client = spawn(PYTHON, [path.join(PY_DIR, 'views_abandon.py'), `nbd://${addr}/disk`, String(16 * MiB)], {
      stdio: ['pipe', 'pipe', 'inherit'],
      env: { ...process.env, PYTHONDONTWRITEBYTECODE: '1' },
    });
    try {
      const [line] = (await once(readline.createInterface({ input: client.stdout! }), 'line')) as [string];
      expect(line).toBe('queued');
      // 32 MiB of replies, more than the kernel's buffers: the rest wait in the server, holding their
      // pages, and the TRIM behind them retires those pages instead of freeing them.
      await vi.waitFor(() => expect(dev.retiredBytes).toBeGreaterThan(0), { timeout: 10_000 });
      expect(dev.allocatedBytes).toBe(0);
      const exited = once(client, 'exit');
      client.stdin!.end();
      await exited;
      await vi.waitFor(() => expect(server.connectionsTo('disk')).toBe(0), { timeout: 10_000 });
      expect(dev.heldBytes).toBe(0);
      expect(dev.retiredBytes).toBe(0);
    } finally {
      client.kill();
      await server.close();
    }
  });
});

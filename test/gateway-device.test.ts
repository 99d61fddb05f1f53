// A gateway's logical volume (src/gateway/logical-volume.ts) against real NBD servers, with the
// etcd tables faked: what it does when the table names a copy that cannot take writes.
import { randomBytes } from 'node:crypto';
import pino from 'pino';
import { afterEach, describe, expect, it } from 'vitest';
import { ConnectionPool, LogicalVolumeDevice } from '../src/gateway/logical-volume.js';
import { connect } from '../src/nbd/client.js';
import { FakeStore } from './helpers/fake-cluster-store.js';
import { startServe, type RunningServer } from './helpers/servers.js';

const SIZE = 1 << 20;

const servers: RunningServer[] = [];
afterEach(async () => {
  await Promise.all(servers.splice(0).map((s) => s.stop()));
});

describe('a gateway logical volume', () => {
  it('holds a write while the table names a read-only copy, and lands it on the master the table names next (never EPERM to the host)', async () => {
    const mirror = await startServe(['--size', String(SIZE), '--name', 'vol1', '--read-only']);
    const master = await startServe(['--size', String(SIZE), '--name', 'vol1']);
    servers.push(mirror, master);
    const store = new FakeStore();
    store.tables.storageSystems.set(1, { nbd: `127.0.0.1:${mirror.port}` });
    store.tables.storageSystems.set(2, { nbd: `127.0.0.1:${master.port}` });
    // A stale table: it still names the copy that is a mirror now.
    store.point(1);
    const pool = new ConnectionPool(5000);
    const logged: string[] = [];
    const log = pino({ level: 'warn' }, { write: (line: string) => void logged.push(line) });
    const lv = new LogicalVolumeDevice('lv', SIZE, store.asStore, pool, log, 30_000);
    const data = randomBytes(4096);
    const write = lv.write(8192, data);
    let settled = false;
    void write.then(() => (settled = true), () => (settled = true));
    // The client refuses writes on the read-only export itself: the write must wait, not fail.
    const probe = await connect({ host: '127.0.0.1', port: mirror.port, exportName: 'vol1' });
    expect(probe.readOnly).toBe(true);
    await probe.close();
    // Once it has tried that copy (it says so once), the write is still held, not answered.
    for (let i = 0; i < 2000 && !logged.some((l) => l.includes('holding it')); i++) await new Promise((r) => setTimeout(r, 5));
    expect(logged.join('')).toContain('the export is read-only');
    expect(settled).toBe(false);
    store.point(2);
    await write;
    const c = await connect({ host: '127.0.0.1', port: master.port, exportName: 'vol1' });
    const back = Buffer.alloc(4096);
    await c.pread(back, 8192);
    await c.close();
    expect(back.equals(data)).toBe(true);
    await pool.close();
  });
});

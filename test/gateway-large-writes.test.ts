// Large WRITEs through a gateway (src/gateway/logical-volume.ts): a master that dies while a host is
// in the middle of sending a multi-MiB WRITE costs the host a pause, never an error, and the new
// master gets every byte; a host that leaves mid-payload lands nothing. The gateway here is the real
// NBD server and logical volume in this process, with the etcd tables faked (as in
// gateway-device.test.ts); the hosts are fio and a raw socket that stops mid-payload on purpose.
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import pino from 'pino';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { ConnectionPool, LogicalVolumeDevice } from '../src/gateway/logical-volume.js';
import { ExportTable } from '../src/nbd/exports.js';
import { NbdServer } from '../src/nbd/server.js';
import { connect } from '../src/nbd/client.js';
import { Cmd } from '../src/protocol/constants.js';
import { RawClient, encodeRequest } from './helpers/raw.js';
import { FakeStore } from './helpers/fake-cluster-store.js';
import { run, startServe, tmpDir, type RunningServer } from './helpers/servers.js';

const MiB = 1024 * 1024;
const SIZE = 64 * MiB;

interface Gateway {
  port: number;
  store: FakeStore;
  logged: string[];
  server: NbdServer;
  stop(): Promise<void>;
}

const cleanups: Array<() => Promise<unknown>> = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

/** A gateway in this process serving logical volume `lv`, whose masters are the given ports (ss1, ss2, ...). */
async function startGateway(masters: number[]): Promise<Gateway> {
  const store = new FakeStore();
  masters.forEach((port, i) => store.tables.storageSystems.set(i + 1, { nbd: `127.0.0.1:${port}` }));
  store.point(1);
  const pool = new ConnectionPool(5000);
  const logged: string[] = [];
  const log = pino({ level: 'warn' }, { write: (line: string) => void logged.push(line) });
  const exports = new ExportTable();
  exports.add({ name: 'lv', description: 'through a gateway', device: new LogicalVolumeDevice('lv', SIZE, store.asStore, pool, log, 30_000), readOnly: false });
  const server = new NbdServer({ exports, log });
  const addr = await server.listen({ kind: 'tcp', host: '127.0.0.1', port: 0 });
  const stop = async () => {
    await server.close();
    await pool.close();
  };
  cleanups.push(stop);
  return { port: Number(addr.slice(addr.lastIndexOf(':') + 1)), store, logged, server, stop };
}

async function serve(): Promise<RunningServer> {
  const s = await startServe(['--size', String(SIZE), '--name', 'vol1']);
  cleanups.push(() => s.stop());
  return s;
}

/** A host on a raw socket, attached to `lv` through the gateway. */
async function rawHost(port: number): Promise<RawClient> {
  const host = await RawClient.connect({ host: '127.0.0.1', port });
  cleanups.push(async () => host.destroy());
  await host.readGreeting();
  host.sendClientFlags(3); // FIXED_NEWSTYLE | NO_ZEROES
  const go = await host.go('lv');
  expect(go.export?.size).toBe(BigInt(SIZE));
  return host;
}

async function readBack(port: number, offset: number, length: number): Promise<Buffer> {
  const c = await connect({ host: '127.0.0.1', port, exportName: 'vol1' });
  try {
    return await c.pread(length, offset);
  } finally {
    await c.close();
  }
}

describe('a gateway forwarding large WRITEs', () => {
  it('answers the host with success when the master is killed with -9 while the host is in the middle of an 8 MiB WRITE, and the new master holds the whole write', async () => {
    const old = await serve();
    const next = await serve();
    const gw = await startGateway([old.port, next.port]);
    const host = await rawHost(gw.port);
    // A write before, so the gateway holds a pooled connection to the old master, which the kill breaks.
    const before = randomBytes(64 * 1024);
    host.sendRequest({ type: Cmd.WRITE, cookie: 1n, offset: 0n, length: before.length, payload: before });
    expect((await host.nextReply()).error).toBe(0);
    const data = randomBytes(8 * MiB);
    const offset = 16 * MiB;
    await host.writeAndDrain(Buffer.concat([encodeRequest({ type: Cmd.WRITE, cookie: 2n, offset: BigInt(offset), length: data.length }), data.subarray(0, 3 * MiB)]));
    await old.stop('SIGKILL');
    await host.writeAndDrain(data.subarray(3 * MiB));
    // The table still names the dead master: the write fails there and is held, not answered.
    await vi.waitFor(() => expect(gw.logged.join('')).toContain('holding it until the master is back'), { timeout: 10_000, interval: 10 });
    gw.store.point(2);
    const reply = await host.nextReply(30_000);
    expect(reply).toMatchObject({ cookie: 2n, error: 0 });
    expect((await readBack(next.port, offset, data.length)).equals(data)).toBe(true);
    // The host's connection goes on: a read through the gateway gives the same bytes.
    host.sendRequest({ type: Cmd.READ, cookie: 3n, offset: BigInt(offset), length: data.length });
    const back = await host.nextReply(30_000);
    expect(back.error).toBe(0);
    expect(back.data!.equals(data)).toBe(true);
  });

  it('lands nothing of a WRITE whose host goes away mid-payload, and serves the next host at once', async () => {
    const master = await serve();
    const gw = await startGateway([master.port]);
    const host = await rawHost(gw.port);
    const offset = 4 * MiB;
    await host.writeAndDrain(Buffer.concat([encodeRequest({ type: Cmd.WRITE, cookie: 1n, offset: BigInt(offset), length: 4 * MiB }), Buffer.alloc(2 * MiB, 0xee)]));
    host.destroy();
    await vi.waitFor(() => expect(gw.server.connectionsTo('lv')).toBe(0), { timeout: 10_000 });
    const next = await rawHost(gw.port);
    const data = randomBytes(2 * MiB);
    next.sendRequests([{ type: Cmd.WRITE, cookie: 1n, offset: BigInt(offset + MiB), length: data.length, payload: data }, { type: Cmd.FLUSH, cookie: 2n }]);
    expect([(await next.nextReply(30_000)).error, (await next.nextReply(30_000)).error]).toEqual([0, 0]);
    const back = await readBack(master.port, offset, 4 * MiB);
    // The abandoned write left nothing: no byte of it reached the master.
    expect(back.subarray(0, MiB).equals(Buffer.alloc(MiB))).toBe(true);
    expect(back.subarray(MiB, 3 * MiB).equals(data)).toBe(true);
    expect(back.subarray(3 * MiB).equals(Buffer.alloc(MiB))).toBe(true);
  });

  it('keeps fio --verify=crc32c free of errors with writes of 4 KiB to 4 MiB through the gateway, and the master holds what fio wrote', async () => {
    const master = await serve();
    const gw = await startGateway([master.port]);
    const dir = tmpDir('bm-fio-');
    const r = await run('fio', [
      '--name=cut-through', '--ioengine=nbd', `--uri=nbd://127.0.0.1:${gw.port}/lv`, '--rw=randwrite', '--bsrange=4k-4m', '--bs_unaligned=0', '--iodepth=8',
      `--size=${32 * MiB}`, '--verify=crc32c', '--verify_fatal=1', '--do_verify=1', '--output-format=json', `--directory=${dir}`, '--thread',
    ], { timeoutMs: 120_000 });
    expect(r.code, r.stderr + r.stdout.slice(0, 2000)).toBe(0);
    const job = JSON.parse(r.stdout.slice(r.stdout.indexOf('{'))).jobs[0];
    expect(job.error).toBe(0);
    expect(job.write.io_bytes).toBeGreaterThanOrEqual(32 * MiB);
    // What the host reads through the gateway is what the master holds, byte for byte.
    const img = `${dir}/through-gateway.raw`;
    const direct = `${dir}/master.raw`;
    for (const [uri, file] of [[`nbd://127.0.0.1:${gw.port}/lv`, img], [master.uri, direct]] as const) {
      const c = await run('nbdcopy', [uri, file], { timeoutMs: 60_000 });
      expect(c.code, c.stderr).toBe(0);
    }
    expect(fs.readFileSync(img).equals(fs.readFileSync(direct))).toBe(true);
    fs.rmSync(img);
    fs.rmSync(direct);
  });
});

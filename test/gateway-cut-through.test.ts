// Cut-through forwarding in a gateway (src/gateway/logical-volume.ts, writeStream): a large WRITE
// goes on to the master while the host is still sending its payload, and a master that dies in the
// middle of it costs the host a pause, never an error. The gateway here is the real NBD server and
// logical volume in this process, with the etcd tables faked (as in gateway-device.test.ts); the
// hosts are fio, qemu-io and a raw socket that stops in the middle of a payload on purpose.
import { EventEmitter } from 'node:events';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import pino from 'pino';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { ConnectionPool, LogicalVolumeDevice } from '../src/gateway/logical-volume.js';
import type { ClusterStore } from '../src/cluster/etcd/store.js';
import { ExportTable } from '../src/nbd/exports.js';
import { NbdServer } from '../src/nbd/server.js';
import { connect } from '../src/nbd/client.js';
import { Cmd, REQUEST_SIZE } from '../src/protocol/constants.js';
import { RawClient, encodeRequest } from './helpers/raw.js';
import { closeFakeServers, fakeServer, readRequest, serveHandshake, simpleReply, type Peer } from './helpers/fake-nbd.js';
import { run, startServe, tmpDir, type RunningServer } from './helpers/servers.js';

const MiB = 1024 * 1024;
const SIZE = 64 * MiB;

/** The tables a logical volume reads, and their 'change' event. */
class FakeStore extends EventEmitter {
  readonly tables = {
    logicalVolumes: new Map<string, { name: string; master: { ss: number; vol: number } }>(),
    storageSystems: new Map<number, { nbd: string }>(),
    mirrors: new Map<string, { mirrors: { ss: number; vol: number; state: string }[] }>(),
  };
  point(ss: number): void {
    this.tables.logicalVolumes.set('lv', { name: 'lv', master: { ss, vol: 1 } });
    this.emit('change');
  }
}

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
  await closeFakeServers();
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
  exports.add({ name: 'lv', description: 'through a gateway', device: new LogicalVolumeDevice('lv', SIZE, store as unknown as ClusterStore, pool, log, 30_000), readOnly: false });
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

/** Bytes the process has read with read(2) and friends, sockets included (/proc/PID/io rchar). */
function bytesRead(pid: number): number {
  return Number(/rchar: (\d+)/.exec(fs.readFileSync(`/proc/${pid}/io`, 'utf8'))![1]);
}

describe('a gateway forwarding large WRITEs cut-through', () => {
  it('sends a 4 MiB WRITE on to the master while the host has sent only its first MiB, and the master gets every byte in order', async () => {
    const data = randomBytes(4 * MiB);
    let seen: { header: { type: number; offset: number; length: number }; early: Buffer; rest?: Buffer } | undefined;
    let hostSentRest!: () => void;
    const hostDone = new Promise<void>((r) => (hostSentRest = r));
    let restSent = false;
    const master = await fakeServer(async (p: Peer) => {
      await serveHandshake(p, { size: SIZE });
      const h = await p.read(REQUEST_SIZE);
      const header = { type: h.readUInt16BE(6), offset: Number(h.readBigUInt64BE(16)), length: h.readUInt32BE(24) };
      // The host holds back its last 3 MiB until this much has come through: only a forward that
      // starts before the payload is complete can get here.
      const early = Buffer.from(await p.read(MiB / 2));
      seen = { header, early };
      expect(restSent).toBe(false);
      hostSentRest();
      seen.rest = Buffer.from(await p.read(header.length - MiB / 2));
      p.write(simpleReply(h.readBigUInt64BE(8)));
      // The next request on this connection: the host's FLUSH, after the stream; then the
      // gateway's own FLUSH when it shuts down.
      for (;;) {
        const next = await readRequest(p);
        expect(next.type).toBe(Cmd.FLUSH);
        p.write(simpleReply(next.cookie));
      }
    });
    const gw = await startGateway([master.port]);
    const host = await rawHost(gw.port);
    host.write(Buffer.concat([encodeRequest({ type: Cmd.WRITE, cookie: 7n, offset: BigInt(8 * MiB), length: data.length }), data.subarray(0, MiB)]));
    // Store-and-forward never gets here: the master would see nothing until the host sent the rest.
    const stalled = new Promise<never>((_, reject) => setTimeout(() => reject(new Error('the master got none of the payload while the host held back its last 3 MiB')), 10_000).unref());
    await Promise.race([hostDone, stalled]);
    restSent = true;
    host.write(data.subarray(MiB));
    host.sendRequest({ type: Cmd.FLUSH, cookie: 8n });
    const replies = [await host.nextReply(), await host.nextReply()];
    expect(replies.map((r) => [r.cookie, r.error])).toEqual([[7n, 0], [8n, 0]]);
    expect(seen!.header).toEqual({ type: Cmd.WRITE, offset: 8 * MiB, length: 4 * MiB });
    expect(Buffer.concat([seen!.early, seen!.rest!]).equals(data)).toBe(true);
  });

  it('answers the host with success when the master is killed with -9 in the middle of a streamed WRITE, and the new master holds the whole write', async () => {
    const old = await serve();
    const next = await serve();
    const gw = await startGateway([old.port, next.port]);
    const host = await rawHost(gw.port);
    // A write before, so the gateway's connection to the old master is up and the stream starts at once.
    const before = randomBytes(64 * 1024);
    host.sendRequest({ type: Cmd.WRITE, cookie: 1n, offset: 0n, length: before.length, payload: before });
    expect((await host.nextReply()).error).toBe(0);
    const data = randomBytes(8 * MiB);
    const offset = 16 * MiB;
    const readBefore = bytesRead(old.proc.pid!);
    await host.writeAndDrain(Buffer.concat([encodeRequest({ type: Cmd.WRITE, cookie: 2n, offset: BigInt(offset), length: data.length }), data.subarray(0, 3 * MiB)]));
    // The old master has read most of what the host sent so far: the write is in flight to it, mid-payload.
    await vi.waitFor(() => expect(bytesRead(old.proc.pid!) - readBefore).toBeGreaterThan(2 * MiB), { timeout: 10_000, interval: 10 });
    await old.stop('SIGKILL');
    gw.store.point(2);
    await host.writeAndDrain(data.subarray(3 * MiB));
    const reply = await host.nextReply(30_000);
    expect(reply).toMatchObject({ cookie: 2n, error: 0 });
    expect(gw.logged.join('')).toContain('the master failed a streamed write');
    expect((await readBack(next.port, offset, data.length)).equals(data)).toBe(true);
    // The host's connection goes on: a read through the gateway gives the same bytes.
    host.sendRequest({ type: Cmd.READ, cookie: 3n, offset: BigInt(offset), length: data.length });
    const back = await host.nextReply(30_000);
    expect(back.error).toBe(0);
    expect(back.data!.equals(data)).toBe(true);
  });

  it('drops a WRITE whose host goes away mid-payload without landing any of it, and serves the next host at once', async () => {
    const master = await serve();
    const gw = await startGateway([master.port]);
    const host = await rawHost(gw.port);
    const offset = 4 * MiB;
    await host.writeAndDrain(Buffer.concat([encodeRequest({ type: Cmd.WRITE, cookie: 1n, offset: BigInt(offset), length: 4 * MiB }), Buffer.alloc(2 * MiB, 0xee)]));
    const readBefore = bytesRead(master.proc.pid!);
    await vi.waitFor(() => expect(bytesRead(master.proc.pid!) - readBefore).toBeGreaterThan(0), { timeout: 10_000, interval: 10 });
    host.destroy();
    await vi.waitFor(() => expect(gw.server.connectionsTo('lv')).toBe(0), { timeout: 10_000 });
    const next = await rawHost(gw.port);
    const data = randomBytes(2 * MiB);
    next.sendRequests([{ type: Cmd.WRITE, cookie: 1n, offset: BigInt(offset + MiB), length: data.length, payload: data }, { type: Cmd.FLUSH, cookie: 2n }]);
    expect([(await next.nextReply(30_000)).error, (await next.nextReply(30_000)).error]).toEqual([0, 0]);
    const back = await readBack(master.port, offset, 4 * MiB);
    // The abandoned write left nothing: the master never got all of its payload, so it wrote none of it.
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

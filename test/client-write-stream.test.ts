// The NBD client's streamed WRITE (pwriteStream, src/nbd/client/client.ts): the payload goes out
// piece by piece as it is pushed, the connection is the stream's until its last byte, and giving
// one up never leaves the server with a payload made up of anything but what was pushed. Against
// a scripted fake server that reads the wire exactly.
import { afterEach, describe, expect, it } from 'vitest';
import { randomBytes } from 'node:crypto';
import { connect, NbdConnectionError } from '../src/nbd/client.js';
import { Cmd, REQUEST_SIZE } from '../src/protocol/constants.js';
import { closeFakeServers, fakeServer, readRequest, rejection, serveHandshake, simpleReply, type Peer } from './helpers/fake-nbd.js';

const KiB = 1024;

afterEach(closeFakeServers);

/** A fake server's view of one request header. */
function header(h: Buffer) {
  return { type: h.readUInt16BE(6), cookie: h.readBigUInt64BE(8), offset: Number(h.readBigUInt64BE(16)), length: h.readUInt32BE(24) };
}

/** A promise that resolves once `go` is called. */
function gate(): { wait: Promise<void>; go: () => void } {
  let go!: () => void;
  return { wait: new Promise<void>((r) => (go = r)), go };
}

describe('a streamed WRITE from the NBD client', () => {
  it('sends each piece as it is pushed, and a FLUSH asked for meanwhile only after the last byte', async () => {
    const data = randomBytes(192 * KiB);
    const firstPieceIn = gate();
    const order: string[] = [];
    const { port } = await fakeServer(async (p: Peer) => {
      await serveHandshake(p);
      const w = header(await p.read(REQUEST_SIZE));
      const first = Buffer.from(await p.read(64 * KiB));
      firstPieceIn.go();
      const rest = Buffer.from(await p.read(w.length - 64 * KiB));
      order.push(`WRITE ${w.offset}+${w.length} ${Buffer.concat([first, rest]).equals(data) ? 'intact' : 'corrupt'}`);
      const f = await readRequest(p);
      order.push(f.type === Cmd.FLUSH ? 'FLUSH' : `type ${f.type}`);
      p.write(simpleReply(w.cookie), simpleReply(f.cookie));
    });
    const c = await connect({ host: '127.0.0.1', port });
    const s = c.pwriteStream(4096, data.length);
    s.push(data.subarray(0, 64 * KiB));
    const flushed = c.flush();
    // The server has the first piece while the rest is not even pushed.
    await firstPieceIn.wait;
    s.push(data.subarray(64 * KiB, 100 * KiB));
    s.push(data.subarray(100 * KiB));
    await Promise.all([s.done, flushed]);
    expect(order).toEqual([`WRITE 4096+${data.length} intact`, 'FLUSH']);
    await c.close();
  });

  it('drops a streamed WRITE given up before its header went out, and the connection carries on', async () => {
    const a = randomBytes(128 * KiB);
    const seen: string[] = [];
    const { port } = await fakeServer(async (p: Peer) => {
      await serveHandshake(p);
      for (;;) {
        const r = await readRequest(p);
        seen.push(`${r.type === Cmd.WRITE ? 'WRITE' : r.type === Cmd.FLUSH ? 'FLUSH' : r.type} ${r.offset}+${r.length}${r.payload ? (r.payload.equals(a) ? ' a' : ' other') : ''}`);
        p.write(simpleReply(r.cookie));
      }
    });
    const c = await connect({ host: '127.0.0.1', port });
    const first = c.pwriteStream(0, a.length);
    first.push(a.subarray(0, 1000));
    // Queued behind the first stream: nothing of it is on the wire yet.
    const second = c.pwriteStream(1 << 20, 128 * KiB);
    second.push(Buffer.alloc(4 * KiB, 0xee));
    const why = new Error('the host went away');
    second.abort(why);
    expect(await rejection(second.done)).toBe(why);
    first.push(a.subarray(1000));
    await first.done;
    await c.flush();
    expect(seen).toEqual([`WRITE 0+${a.length} a`, 'FLUSH 0+0']);
    expect(c.isOpen).toBe(true);
    await c.close();
  });

  it('closes the connection when a streamed WRITE is given up mid-payload, failing what waits behind it, and the server never gets a whole payload', async () => {
    let serverGot = 0;
    const closedByClient = gate();
    const pieceIn = gate();
    const { port } = await fakeServer(async (p: Peer) => {
      await serveHandshake(p);
      try {
        await p.read(REQUEST_SIZE);
        for (;;) {
          serverGot += (await p.read(1)).length;
          if (serverGot === 64 * KiB) pieceIn.go();
        }
      } catch {
        closedByClient.go();
      }
    });
    const c = await connect({ host: '127.0.0.1', port });
    const s = c.pwriteStream(0, 128 * KiB);
    s.push(Buffer.alloc(64 * KiB, 1));
    const flushed = c.flush();
    await pieceIn.wait;
    s.abort(new Error('the host went away'));
    const err = await rejection(s.done);
    expect(err).toBeInstanceOf(NbdConnectionError);
    expect((err as NbdConnectionError).code).toBe('ECONNABORTED');
    expect(((await rejection(flushed)) as NbdConnectionError).code).toBe('ECONNABORTED');
    await closedByClient.wait;
    expect(serverGot).toBe(64 * KiB);
    expect(c.isOpen).toBe(false);
  });

  it('refuses locally a streamed WRITE that runs past the end of the export, or has no payload', async () => {
    const { port } = await fakeServer(async (p: Peer) => {
      await serveHandshake(p, { size: 1 << 20 });
      await new Promise(() => undefined);
    });
    const c = await connect({ host: '127.0.0.1', port });
    const past = c.pwriteStream((1 << 20) - 4096, 8192);
    expect(((await rejection(past.done)) as NbdConnectionError).code).toBe('ENOSPC');
    past.push(Buffer.alloc(8192)); // a refused stream takes pieces and sends nothing
    expect(((await rejection(c.pwriteStream(0, 0).done)) as NbdConnectionError).code).toBe('EINVAL');
    expect(c.inFlight).toBe(0);
    await c.close();
  });
});

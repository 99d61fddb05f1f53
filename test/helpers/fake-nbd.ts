// A scripted fake NBD server for client tests that need a misbehaving or a precisely
// choreographed peer (replies out of order, split, cut off mid-payload).
import net from 'node:net';
import {
  NBDMAGIC,
  IHAVEOPT,
  OPTION_REPLY_MAGIC,
  SIMPLE_REPLY_MAGIC,
  STRUCTURED_REPLY_MAGIC,
  HandshakeFlag,
  TransmissionFlag,
  Opt,
  Rep,
  Info,
  Cmd,
  ReplyFlag,
  REQUEST_SIZE,
} from '../../src/protocol/constants.js';

const SIZE = 64 * 1024 * 1024;

// Every fake server and its sockets, closed by closeFakeServers() (call it in afterEach).
const servers: net.Server[] = [];
const serverSockets: net.Socket[] = [];
export async function closeFakeServers(): Promise<void> {
  for (const s of serverSockets.splice(0)) s.destroy();
  await Promise.all(servers.splice(0).map((s) => new Promise((r) => s.close(r))));
}

/** Pull-style reader over a server-side socket. */
export class Peer {
  private buf = Buffer.alloc(0);
  private wake: (() => void) | undefined;
  closed = false;
  constructor(readonly sock: net.Socket) {
    sock.on('data', (d) => {
      this.buf = Buffer.concat([this.buf, d]);
      this.wake?.();
    });
    sock.on('close', () => {
      this.closed = true;
      this.wake?.();
    });
    sock.on('error', () => undefined);
  }
  async read(n: number): Promise<Buffer> {
    while (this.buf.length < n) {
      if (this.closed) throw new Error('peer closed');
      await new Promise<void>((r) => (this.wake = r));
    }
    const out = this.buf.subarray(0, n);
    this.buf = this.buf.subarray(n);
    return out;
  }
  write(...parts: Buffer[]): void {
    this.sock.write(Buffer.concat(parts));
  }
  /** Resolves when the client has closed the connection. */
  whenClosed(): Promise<void> {
    return new Promise((r) => (this.closed ? r() : this.sock.once('close', () => r())));
  }
}

export const be = (bytes: number, n: number | bigint) => {
  const b = Buffer.alloc(bytes);
  if (bytes === 8) b.writeBigUInt64BE(BigInt(n));
  else if (bytes === 4) b.writeUInt32BE(Number(n));
  else b.writeUInt16BE(Number(n));
  return b;
};

export interface FakeOptions {
  sr?: boolean;
  go?: boolean;
  size?: number;
  flags?: number;
}

/** The server half of a minimal handshake. */
export async function serveHandshake(p: Peer, o: FakeOptions = {}): Promise<void> {
  const size = o.size ?? SIZE;
  const flags = o.flags ?? TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH;
  p.write(be(8, NBDMAGIC), be(8, IHAVEOPT), be(2, HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES));
  await p.read(4);
  const reply = (opt: number, type: number, data = Buffer.alloc(0)) =>
    p.write(be(8, OPTION_REPLY_MAGIC), be(4, opt), be(4, type), be(4, data.length), data);
  for (;;) {
    const h = await p.read(16);
    const opt = h.readUInt32BE(8);
    const len = h.readUInt32BE(12);
    if (len) await p.read(len);
    if (opt === Opt.EXPORT_NAME) return p.write(be(8, size), be(2, flags));
    if (opt === Opt.STRUCTURED_REPLY && o.sr !== false) reply(opt, Rep.ACK);
    else if (opt === Opt.GO && o.go !== false) {
      reply(opt, Rep.INFO, Buffer.concat([be(2, Info.EXPORT), be(8, size), be(2, flags)]));
      return reply(opt, Rep.ACK);
    } else reply(opt, Rep.ERR_UNSUP);
  }
}

export type FakeRequest = Awaited<ReturnType<typeof readRequest>>;
export async function readRequest(p: Peer) {
  const h = await p.read(REQUEST_SIZE);
  const r = { flags: h.readUInt16BE(4), type: h.readUInt16BE(6), cookie: h.readBigUInt64BE(8), offset: Number(h.readBigUInt64BE(16)), length: h.readUInt32BE(24) };
  const payload = r.type === Cmd.WRITE ? await p.read(r.length) : undefined;
  return { ...r, payload };
}

export const simpleReply = (cookie: bigint, error = 0) => Buffer.concat([be(4, SIMPLE_REPLY_MAGIC), be(4, error), be(8, cookie)]);
export const chunk = (cookie: bigint, type: number, payload: Buffer, done: boolean) =>
  Buffer.concat([be(4, STRUCTURED_REPLY_MAGIC), be(2, done ? ReplyFlag.DONE : 0), be(2, type), be(8, cookie), be(4, payload.length), payload]);

/** A TCP server running `script` for each connection; resolves with its port. */
export async function fakeServer(script: (p: Peer) => Promise<void>): Promise<{ port: number; peers: Promise<Peer>[] }> {
  const peers: Promise<Peer>[] = [];
  const server = net.createServer((sock) => {
    serverSockets.push(sock);
    const p = new Peer(sock);
    peers.push(script(p).then(() => p, () => p));
  });
  servers.push(server);
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  return { port: (server.address() as net.AddressInfo).port, peers };
}


/** The error `p` rejects with; fails the test if it resolves. */
export async function rejection(p: Promise<unknown>): Promise<Error> {
  try {
    await p;
  } catch (err) {
    return err as Error;
  }
  throw new Error('expected the promise to reject, but it resolved');
}

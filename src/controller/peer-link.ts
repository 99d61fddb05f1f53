// The replication control channel between two storage systems (docs/replication.md).
//
// One TCP connection per pair of storage systems, whatever the number of pairs
// they share. The one with the lower id dials the other's `peer` address; the
// other accepts. Frames are a 4-byte big-endian length and a JSON object:
//
//   {t:"hello", from, to}         first frame of the dialer; answered by {t:"welcome", from, to}
//   {t:"req", id, op, ...}        a request; answered by {t:"res", id, ok, error?, ...}
//   {t:"msg", op, ...}            a one-way message, ordered with the requests
//   {t:"ping"}                    keep-alive, every timeout/5
//
// Liveness: any frame refreshes `lastHeard`. A peer silent for `timeoutMs`, or
// a request unanswered for `timeoutMs`, takes the link down (the socket is
// destroyed: a cut cable gives no RST, so we never wait for one). The mirror
// side's lease (`fresh`) is half of that: it stops trusting its bitmap before
// the master stops waiting for it, so an async write acknowledged after the
// master gave up can never be read stale on the mirror.
import { EventEmitter } from 'node:events';
import net from 'node:net';
import type { Logger } from 'pino';

export interface PeerAddress {
  host: string;
  port: number;
}

export type PeerMessage = Record<string, unknown> & { op: string };
export type RequestHandler = (msg: PeerMessage) => Promise<Record<string, unknown> | void> | Record<string, unknown> | void;
export type MessageHandler = (msg: PeerMessage) => void;

/** Largest frame: a bitmap snapshot of a 4 TiB volume in 64 KiB clusters, base64, fits. */
const MAX_FRAME = 64 * 1024 * 1024;
const RECONNECT_MIN_MS = 100;
const RECONNECT_MAX_MS = 1000;

export class PeerLinkError extends Error {
  override readonly name = 'PeerLinkError';
}

export interface PeerLinkOptions {
  self: number;
  peer: number;
  /** The peer's control address (dialled when self < peer). */
  address: PeerAddress;
  timeoutMs: number;
  log: Logger;
}

/**
 * Events: "up" (a new session; handlers may run their handshakes), "down" (reason).
 */
export class PeerLink extends EventEmitter {
  readonly self: number;
  readonly peer: number;
  private socket: net.Socket | null = null;
  private nextId = 1;
  private readonly pending = new Map<number, { resolve: (v: Record<string, unknown>) => void; reject: (e: Error) => void; timer: NodeJS.Timeout; op: string }>();
  private readonly handlers = new Map<string, RequestHandler>();
  private readonly listeners_ = new Map<string, MessageHandler>();
  private lastHeard = 0;
  private heartbeat: NodeJS.Timeout | null = null;
  private reconnect: NodeJS.Timeout | null = null;
  private backoff = RECONNECT_MIN_MS;
  private closed = false;
  /** Counts sessions, so a handshake can tell that the link it started on went away. */
  session = 0;
  lastError = '';

  constructor(private readonly opts: PeerLinkOptions) {
    super();
    this.self = opts.self;
    this.peer = opts.peer;
    this.setMaxListeners(0);
  }

  get up(): boolean {
    return this.socket !== null;
  }

  /** Heard from the peer within half the timeout: the mirror side may trust what it was told. */
  get fresh(): boolean {
    return this.up && performance.now() - this.lastHeard < this.opts.timeoutMs / 2;
  }

  get timeoutMs(): number {
    return this.opts.timeoutMs;
  }

  get dials(): boolean {
    return this.self < this.peer;
  }

  start(): void {
    if (this.dials) this.dial();
  }

  onRequest(op: string, handler: RequestHandler): void {
    this.handlers.set(op, handler);
  }

  onMessage(op: string, handler: MessageHandler): void {
    this.listeners_.set(op, handler);
  }

  /** A request; rejects with PeerLinkError when the link is down or the peer does not answer in time. */
  request(op: string, body: Record<string, unknown>): Promise<Record<string, unknown>> {
    if (!this.socket) return Promise.reject(new PeerLinkError(`storage system ${this.peer} is not connected${this.lastError ? ` (${this.lastError})` : ''}`));
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        const err = new PeerLinkError(`storage system ${this.peer} did not answer ${op} within ${this.opts.timeoutMs} ms`);
        reject(err);
        this.drop(err.message);
      }, this.opts.timeoutMs);
      this.pending.set(id, { resolve, reject, timer, op });
      this.send({ ...body, t: 'req', id, op });
    });
  }

  /** A one-way message; dropped when the link is down (the next session's handshake resends state). */
  message(op: string, body: Record<string, unknown>): void {
    if (this.socket) this.send({ ...body, t: 'msg', op });
  }

  /** A connection the peer server accepted and matched to this link by its hello. */
  adopt(socket: net.Socket, rest: Buffer): void {
    if (this.closed) {
      socket.destroy();
      return;
    }
    if (this.socket) this.drop('the peer connected again');
    this.writeFrame(socket, { t: 'welcome', from: this.self, to: this.peer });
    this.attach(socket, rest);
  }

  private dial(): void {
    if (this.closed || this.socket || this.reconnect) return;
    const { host, port } = this.opts.address;
    const socket = net.connect({ host, port });
    socket.setNoDelay(true);
    let buf: Buffer = Buffer.alloc(0);
    const giveUp = setTimeout(() => socket.destroy(new Error(`no welcome within ${this.opts.timeoutMs} ms`)), this.opts.timeoutMs);
    const onData = (chunk: Buffer) => {
      buf = Buffer.concat([buf, chunk]);
      const frame = readFrame(buf);
      if (!frame) return;
      clearTimeout(giveUp);
      socket.off('data', onData);
      socket.off('error', onError);
      socket.off('close', onClose);
      const { msg, used } = frame;
      if (msg === null || msg.t !== 'welcome' || msg.from !== this.peer) {
        this.lastError = `${host}:${port} is not storage system ${this.peer}`;
        socket.destroy();
        this.scheduleDial();
        return;
      }
      this.attach(socket, buf.subarray(used));
    };
    const onError = (e: Error) => {
      this.lastError = e.message;
    };
    const onClose = () => {
      clearTimeout(giveUp);
      this.scheduleDial();
    };
    socket.on('data', onData);
    socket.on('error', onError);
    socket.on('close', onClose);
    socket.once('connect', () => this.writeFrame(socket, { t: 'hello', from: this.self, to: this.peer }));
  }

  private scheduleDial(): void {
    if (this.closed || !this.dials || this.reconnect || this.socket) return;
    this.reconnect = setTimeout(() => {
      this.reconnect = null;
      this.dial();
    }, this.backoff);
    this.reconnect.unref();
    this.backoff = Math.min(RECONNECT_MAX_MS, this.backoff * 2);
  }

  private attach(socket: net.Socket, rest: Buffer): void {
    this.socket = socket;
    this.session++;
    this.backoff = RECONNECT_MIN_MS;
    this.lastHeard = performance.now();
    this.lastError = '';
    socket.setNoDelay(true);
    let buf: Buffer = rest;
    const onData = (chunk: Buffer) => {
      buf = buf.length === 0 ? chunk : Buffer.concat([buf, chunk]);
      this.lastHeard = performance.now();
      for (;;) {
        const frame = readFrame(buf);
        if (!frame) break;
        buf = buf.subarray(frame.used);
        if (frame.msg === null) {
          this.drop('malformed frame from the peer');
          return;
        }
        this.dispatch(frame.msg);
        if (this.socket !== socket) return;
      }
      if (buf.length > 0 && buf.length >= 4 && buf.readUInt32BE(0) > MAX_FRAME) this.drop('oversized frame from the peer');
    };
    socket.on('data', onData);
    socket.on('error', (e) => {
      this.lastError = e.message;
    });
    socket.on('close', () => {
      if (this.socket === socket) this.drop(this.lastError || 'connection closed');
    });
    const every = Math.max(20, Math.floor(this.opts.timeoutMs / 5));
    this.heartbeat = setInterval(() => {
      if (performance.now() - this.lastHeard > this.opts.timeoutMs) this.drop(`silent for ${this.opts.timeoutMs} ms`);
      else this.send({ t: 'ping' });
    }, every);
    this.heartbeat.unref();
    this.opts.log.info({ peer: this.peer }, `link to storage system ${this.peer} up`);
    if (rest.length > 0) onData(Buffer.alloc(0));
    this.emit('up');
  }

  private dispatch(msg: Record<string, unknown>): void {
    switch (msg.t) {
      case 'ping':
        return;
      case 'res': {
        const p = this.pending.get(msg.id as number);
        if (!p) return;
        this.pending.delete(msg.id as number);
        clearTimeout(p.timer);
        if (msg.ok) p.resolve(msg);
        else p.reject(new PeerLinkError(String(msg.error ?? `${p.op} failed on storage system ${this.peer}`)));
        return;
      }
      case 'msg': {
        const h = this.listeners_.get(String(msg.op));
        try {
          h?.(msg as PeerMessage);
        } catch (e) {
          this.opts.log.error({ err: (e as Error).message, op: msg.op }, 'peer message handler failed');
        }
        return;
      }
      case 'req': {
        const id = msg.id;
        const h = this.handlers.get(String(msg.op));
        const socket = this.socket;
        const answer = (body: Record<string, unknown>) => {
          if (this.socket === socket) this.send({ ...body, t: 'res', id });
        };
        if (!h) {
          answer({ ok: false, error: `storage system ${this.self} does not know ${String(msg.op)}` });
          return;
        }
        Promise.resolve()
          .then(() => h(msg as PeerMessage))
          .then(
            (r) => answer({ ...(r ?? {}), ok: true }),
            (e: Error) => answer({ ok: false, error: e.message }),
          );
        return;
      }
      default:
        this.drop(`unexpected frame ${JSON.stringify(msg.t)} from the peer`);
    }
  }

  private send(msg: Record<string, unknown>): void {
    if (this.socket) this.writeFrame(this.socket, msg);
  }

  private writeFrame(socket: net.Socket, msg: Record<string, unknown>): void {
    const body = Buffer.from(JSON.stringify(msg), 'utf8');
    const head = Buffer.allocUnsafe(4);
    head.writeUInt32BE(body.length, 0);
    socket.cork();
    socket.write(head);
    socket.write(body);
    process.nextTick(() => socket.uncork());
  }

  /** Take the link down now: pending requests fail, handlers hear "down", and the dialer redials. */
  drop(reason: string): void {
    const socket = this.socket;
    if (!socket) return;
    this.socket = null;
    this.lastError = reason;
    socket.destroy();
    if (this.heartbeat) clearInterval(this.heartbeat);
    this.heartbeat = null;
    for (const [id, p] of this.pending) {
      clearTimeout(p.timer);
      p.reject(new PeerLinkError(`link to storage system ${this.peer} went down: ${reason}`));
      this.pending.delete(id);
    }
    this.opts.log.warn({ peer: this.peer, reason }, `link to storage system ${this.peer} down`);
    this.emit('down', reason);
    this.scheduleDial();
  }

  close(): void {
    this.closed = true;
    if (this.reconnect) clearTimeout(this.reconnect);
    this.reconnect = null;
    this.drop('closing');
  }
}

function readFrame(buf: Buffer): { msg: Record<string, unknown> | null; used: number } | null {
  if (buf.length < 4) return null;
  const len = buf.readUInt32BE(0);
  if (len > MAX_FRAME) return { msg: null, used: 4 };
  if (buf.length < 4 + len) return null;
  let msg: unknown;
  try {
    msg = JSON.parse(buf.toString('utf8', 4, 4 + len));
  } catch {
    msg = null;
  }
  const ok = msg !== null && typeof msg === 'object' && !Array.isArray(msg);
  return { msg: ok ? (msg as Record<string, unknown>) : null, used: 4 + len };
}

/**
 * The accepting side: one listener per storage system. A connection must open
 * with a hello naming a configured peer and this storage system; anything
 * else is closed without an answer.
 */
export class PeerServer {
  private server: net.Server | null = null;
  private readonly sockets = new Set<net.Socket>();

  constructor(
    private readonly self: number,
    private readonly links: Map<number, PeerLink>,
    private readonly log: Logger,
  ) {}

  async listen(addr: PeerAddress): Promise<void> {
    const server = net.createServer((socket) => this.accept(socket));
    await new Promise<void>((resolve, reject) => {
      server.once('error', (e) => reject(new Error(`peer channel: cannot listen on ${addr.host}:${addr.port}: ${e.message}`)));
      server.listen({ host: addr.host, port: addr.port }, resolve);
    });
    this.server = server;
  }

  private accept(socket: net.Socket): void {
    this.sockets.add(socket);
    socket.on('close', () => this.sockets.delete(socket));
    socket.on('error', () => {});
    let buf: Buffer = Buffer.alloc(0);
    const giveUp = setTimeout(() => socket.destroy(), 10_000);
    const onData = (chunk: Buffer) => {
      buf = Buffer.concat([buf, chunk]);
      const frame = readFrame(buf);
      if (!frame) {
        if (buf.length > 4096) socket.destroy();
        return;
      }
      clearTimeout(giveUp);
      socket.off('data', onData);
      const msg = frame.msg;
      const link = msg && msg.t === 'hello' && msg.to === this.self ? this.links.get(msg.from as number) : undefined;
      if (!link || link.dials) {
        this.log.warn({ from: socket.remoteAddress, hello: msg }, 'peer channel: refused a connection that is not from a peer of this storage system');
        socket.destroy();
        return;
      }
      link.adopt(socket, buf.subarray(frame.used));
    };
    socket.on('data', onData);
  }

  async close(): Promise<void> {
    const server = this.server;
    this.server = null;
    for (const s of this.sockets) s.destroy();
    if (server) await new Promise<void>((r) => server.close(() => r()));
  }
}

// The replication control channel between two storage systems (docs/replication.md).
//
// One TCP connection per pair of storage systems, whatever the number of pairs they share. The
// one with the lower id dials the other's `peer` address; the other accepts. Frames and messages
// are in framing.ts and messages.ts: every frame is checked there, and a bad one — oversized,
// not JSON, of an unknown type, malformed, or out of order for the handshake — is logged with its
// reason and closes the connection. It never reaches a pair, and never changes a state.
//
// Liveness: any frame refreshes `lastHeard`. A peer silent for `timeoutMs`, or a request
// unanswered for `timeoutMs`, takes the link down (the socket is destroyed: a cut cable gives no
// RST, so we never wait for one). The mirror side's lease (`heardRecently`) is half of that: it
// stops trusting its bitmap before the master stops waiting for it.
//
// Backpressure: frames leave in order through one lane; while the socket holds more than
// HIGH_WATER bytes unsent, or MAX_PENDING requests await answers, new requests wait for room.
//
// Faults (fault-table.ts): delay holds every received frame `ms` (+ jitter), order kept; drop is a
// silent cut (nothing read or written, no RST, redials go nowhere) until cleared; reset destroys
// the connection and refuses new ones until cleared.
//
// Security (docs/SECURITY.md): with `tls`, every connection is mutual TLS against the cluster CA,
// and a storage system's identity is its certificate's CN (ss1, ss2, ...). A hello or data frame
// whose `from` differs from the certificate is refused. Replication data (NBD) rides on its own
// connections to the same port, opened with a `data` frame: never through the host-facing port.
import { EventEmitter } from 'node:events';
import net from 'node:net';
import tls from 'node:tls';
import type { Logger } from 'pino';
import type { LinkFault } from '../fault-table.js';
import { FrameReader, MAX_FRAME, encodeFrame } from './framing.js';
import { BadFrame, PROTOCOL_VERSION, parseFrame, parseRequest, parseResponse, type Frame, type Op, type RequestOf, type ResponseOf } from './messages.js';

export interface PeerAddress {
  host: string;
  port: number;
}

export type RequestHandler<K extends Op> = (body: RequestOf<K>) => Promise<ResponseOf<K>> | ResponseOf<K>;

const RECONNECT_MIN_MS = 100;
const RECONNECT_MAX_MS = 1000;
const HIGH_WATER = 4 * 1024 * 1024;
const MAX_PENDING = 4096;

export class PeerLinkError extends Error {
  override readonly name = 'PeerLinkError';
}

/** Mutual TLS on the peer channel: this storage system's certificate (CN=ssN) and the cluster CA. */
export interface PeerTls {
  cert: Buffer;
  key: Buffer;
  ca: Buffer;
}

export interface PeerLinkOptions {
  self: number;
  peer: number;
  /** The peer's control address (dialled when self < peer). */
  address: PeerAddress;
  timeoutMs: number;
  log: Logger;
  tls?: PeerTls;
}

/** ss3 -> 3; anything else -> undefined. */
export function identityOf(cn: unknown): number | undefined {
  const m = typeof cn === 'string' ? /^ss([1-9]\d{0,8})$/.exec(cn) : null;
  return m ? Number(m[1]) : undefined;
}

/** Connect to a peer's control address: plain TCP, or mutual TLS checking that the far end is storage system `peer`. */
function dialPeer(address: PeerAddress, peer: number, creds: PeerTls | undefined): net.Socket {
  if (!creds) return net.connect({ host: address.host, port: address.port });
  return tls.connect({
    host: address.host,
    port: address.port,
    cert: creds.cert,
    key: creds.key,
    ca: creds.ca,
    minVersion: 'TLSv1.3',
    checkServerIdentity: (_host, cert) =>
      identityOf(cert.subject?.CN) === peer ? undefined : new Error(`the certificate at ${address.host}:${address.port} names ${String(cert.subject?.CN)}, not ss${peer}`),
  });
}

interface Pending {
  op: Op;
  resolve: (v: unknown) => void;
  reject: (e: Error) => void;
  timer: NodeJS.Timeout;
}

/** Events: "up" (a new session; handlers may run their handshakes), "down" (reason). */
export class PeerLink extends EventEmitter {
  readonly self: number;
  readonly peer: number;
  private socket: net.Socket | null = null;
  private nextId = 1;
  private readonly pending = new Map<number, Pending>();
  private readonly handlers = new Map<Op, (body: unknown) => Promise<unknown> | unknown>();
  private lastHeard = 0;
  private heartbeat: NodeJS.Timeout | null = null;
  private reconnect: NodeJS.Timeout | null = null;
  private backoff = RECONNECT_MIN_MS;
  private closed = false;
  private lane: Promise<void> = Promise.resolve();
  private roomWaiters: (() => void)[] = [];
  private faultNow: LinkFault | null = null;
  /** Frames held by a delay fault, dispatched in order. */
  private delayedUntil = 0;
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
  get heardRecently(): boolean {
    return this.up && performance.now() - this.lastHeard < this.opts.timeoutMs / 2;
  }

  get timeoutMs(): number {
    return this.opts.timeoutMs;
  }

  /** peerTimeout changed at run time: silence and unanswered requests are judged by it from now on. */
  setTimeoutMs(ms: number): void {
    this.opts.timeoutMs = ms;
  }

  /** The peer's control address, for messages. */
  get address(): PeerAddress {
    return this.opts.address;
  }

  get dials(): boolean {
    return this.self < this.peer;
  }

  get fault(): LinkFault | null {
    return this.faultNow;
  }

  start(): void {
    if (this.dials) this.dial();
  }

  onRequest<K extends Op>(op: K, handler: RequestHandler<K>): void {
    this.handlers.set(op, handler as (body: unknown) => Promise<unknown> | unknown);
  }

  /** A request; rejects with PeerLinkError when the link is down or the peer does not answer in time. */
  request<K extends Op>(op: K, body: RequestOf<K>): Promise<ResponseOf<K>> {
    if (!this.socket) return Promise.reject(new PeerLinkError(`storage system ${this.peer} is not connected${this.lastError ? ` (${this.lastError})` : ''}`));
    const id = this.nextId++;
    const socket = this.socket;
    return new Promise<ResponseOf<K>>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        const err = new PeerLinkError(`storage system ${this.peer} did not answer ${op} within ${this.opts.timeoutMs} ms`);
        reject(err);
        this.drop(err.message);
      }, this.opts.timeoutMs);
      this.pending.set(id, { op, resolve: resolve as (v: unknown) => void, reject, timer });
      const frame = encodeFrame({ ...body, t: 'req', id, op });
      // One lane keeps frames in order; a full socket or too many unanswered requests hold it.
      if (!this.full()) this.write(socket, frame);
      else this.lane = this.lane.then(() => this.room()).then(() => {
        if (this.socket === socket) this.write(socket, frame);
      });
    });
  }

  private full(): boolean {
    return this.roomWaiters.length > 0 || (this.socket !== null && (this.socket.writableLength > HIGH_WATER || this.pending.size > MAX_PENDING));
  }

  private room(): Promise<void> {
    const s = this.socket;
    if (!s || (s.writableLength <= HIGH_WATER && this.pending.size <= MAX_PENDING)) return Promise.resolve();
    return new Promise((r) => this.roomWaiters.push(r));
  }

  private wakeRoom(): void {
    const s = this.socket;
    if (s && (s.writableLength > HIGH_WATER || this.pending.size > MAX_PENDING)) return;
    for (const w of this.roomWaiters.splice(0)) w();
  }

  /** Set or clear a fault on this end of the link. */
  setFault(fault: LinkFault | null): void {
    this.faultNow = fault;
    if (fault?.kind === 'reset') this.drop('injected fault: reset');
    if (fault?.kind === 'drop') this.socket?.pause();
    if (!fault) {
      this.socket?.resume();
      if (!this.socket) this.scheduleDial();
    }
  }

  /** A connection the peer server accepted and matched to this link by its hello. */
  adopt(socket: net.Socket, reader: FrameReader): void {
    if (this.closed || this.faultNow?.kind === 'reset' || this.faultNow?.kind === 'drop') {
      socket.destroy();
      return;
    }
    if (this.socket) this.drop('the peer connected again');
    reader.maxFrame = MAX_FRAME;
    socket.write(encodeFrame({ t: 'welcome', v: PROTOCOL_VERSION, from: this.self, to: this.peer }));
    this.attach(socket, reader);
  }

  private dial(): void {
    if (this.closed || this.socket || this.reconnect) return;
    if (this.faultNow?.kind === 'drop' || this.faultNow?.kind === 'reset') {
      this.lastError = `injected fault: ${this.faultNow.kind}`;
      this.scheduleDial();
      return;
    }
    const { host, port } = this.opts.address;
    const socket = dialPeer(this.opts.address, this.peer, this.opts.tls);
    socket.setNoDelay(true);
    const reader = new FrameReader();
    const giveUp = setTimeout(() => socket.destroy(new Error(`no welcome within ${this.opts.timeoutMs} ms`)), this.opts.timeoutMs);
    const cleanup = () => {
      clearTimeout(giveUp);
      socket.off('data', onData);
      socket.off('error', onError);
      socket.off('close', onClose);
    };
    const onData = (chunk: Buffer) => {
      let texts: string[];
      let first: Frame;
      try {
        texts = reader.push(chunk);
        if (texts.length === 0) return;
        first = parseFrame(texts[0]!);
        if (first.t !== 'welcome' || first.from !== this.peer || first.to !== this.self) throw new BadFrame(`a ${first.t} frame where storage system ${this.peer}'s welcome belongs`);
        if (first.v !== PROTOCOL_VERSION) throw new BadFrame(`protocol version ${first.v}; this storage system speaks ${PROTOCOL_VERSION} (upgrade both)`);
      } catch (e) {
        cleanup();
        this.lastError = `${host}:${port} is not storage system ${this.peer}: ${(e as Error).message}`;
        this.opts.log.warn({ peer: this.peer, reason: (e as Error).message }, `peer channel: refused ${host}:${port}: ${(e as Error).message}`);
        socket.destroy();
        this.scheduleDial();
        return;
      }
      cleanup();
      this.attach(socket, reader, texts.slice(1));
    };
    const onError = (e: Error) => {
      this.lastError = e.message;
    };
    const onClose = () => {
      cleanup();
      this.scheduleDial();
    };
    socket.on('data', onData);
    socket.on('error', onError);
    socket.on('close', onClose);
    socket.once(this.opts.tls ? 'secureConnect' : 'connect', () => socket.write(encodeFrame({ t: 'hello', v: PROTOCOL_VERSION, from: this.self, to: this.peer })));
  }

  /**
   * A data connection to the peer for one export (replication writes, or reads of the master):
   * the same port and credentials as the control channel, then NBD. Resolves once the frame is
   * sent; the peer answers with the NBD greeting, or closes the connection if it refuses.
   */
  openData(exportName: string): Promise<net.Socket> {
    if (this.faultNow?.kind === 'drop' || this.faultNow?.kind === 'reset') {
      return Promise.reject(new PeerLinkError(`storage system ${this.peer}: injected fault: ${this.faultNow.kind}`));
    }
    const socket = dialPeer(this.opts.address, this.peer, this.opts.tls);
    socket.setNoDelay(true);
    return new Promise((resolve, reject) => {
      const giveUp = setTimeout(() => socket.destroy(new Error(`no connection within ${this.opts.timeoutMs} ms`)), this.opts.timeoutMs);
      socket.once('error', (e) => {
        clearTimeout(giveUp);
        reject(new PeerLinkError(`data connection to storage system ${this.peer}: ${e.message}`, { cause: e }));
      });
      socket.once(this.opts.tls ? 'secureConnect' : 'connect', () => {
        clearTimeout(giveUp);
        socket.write(encodeFrame({ t: 'data', v: PROTOCOL_VERSION, from: this.self, to: this.peer, export: exportName }));
        resolve(socket);
      });
    });
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

  private attach(socket: net.Socket, reader: FrameReader, early: string[] = []): void {
    this.socket = socket;
    this.session++;
    this.backoff = RECONNECT_MIN_MS;
    this.lastHeard = performance.now();
    this.lastError = '';
    socket.setNoDelay(true);
    const take = (texts: string[]) => {
      for (const text of texts) {
        if (this.socket !== socket) return;
        let frame: Frame;
        try {
          frame = parseFrame(text);
        } catch (e) {
          this.badFrame(socket, e as Error);
          return;
        }
        this.receive(socket, frame);
      }
    };
    socket.on('data', (chunk: Buffer) => {
      if (this.socket !== socket) return;
      this.lastHeard = performance.now();
      let texts: string[];
      try {
        texts = reader.push(chunk);
      } catch (e) {
        this.badFrame(socket, e as Error);
        return;
      }
      take(texts);
    });
    socket.on('drain', () => this.wakeRoom());
    socket.on('error', (e) => {
      this.lastError = e.message;
    });
    socket.on('close', () => {
      if (this.socket === socket) this.drop(this.lastError || 'connection closed');
    });
    const every = Math.max(20, Math.floor(this.opts.timeoutMs / 5));
    this.heartbeat = setInterval(() => {
      if (performance.now() - this.lastHeard > this.opts.timeoutMs) this.drop(`silent for ${this.opts.timeoutMs} ms`);
      else if (this.faultNow?.kind !== 'drop') this.write(socket, encodeFrame({ t: 'ping' }));
    }, every);
    this.heartbeat.unref();
    if (this.faultNow?.kind === 'drop') socket.pause();
    this.opts.log.info({ peer: this.peer }, `link to storage system ${this.peer} up`);
    take(early);
    if (this.socket === socket) this.emit('up');
  }

  private badFrame(socket: net.Socket, e: Error): void {
    if (this.socket !== socket) return;
    const why = e instanceof BadFrame ? `storage system ${this.peer} sent ${e.message}` : e.message;
    this.opts.log.error({ peer: this.peer, reason: why }, `peer channel: ${why}; closing the connection`);
    this.drop(why);
  }

  /** A frame from the peer, through the delay fault if one is set. */
  private receive(socket: net.Socket, frame: Frame): void {
    const f = this.faultNow;
    if (f?.kind !== 'delay') return this.dispatch(socket, frame);
    const at = Math.max(this.delayedUntil, performance.now() + (f.ms ?? 0) + (f.jitter ? Math.random() * f.jitter : 0));
    this.delayedUntil = at;
    setTimeout(() => {
      if (this.socket === socket) this.dispatch(socket, frame);
    }, at - performance.now());
  }

  private dispatch(socket: net.Socket, frame: Frame): void {
    switch (frame.t) {
      case 'ping':
        return;
      case 'res': {
        const p = this.pending.get(frame.id);
        if (!p) return;
        this.pending.delete(frame.id);
        clearTimeout(p.timer);
        this.wakeRoom();
        if (!frame.ok) return p.reject(new PeerLinkError(frame.error ?? `${p.op} failed on storage system ${this.peer}`));
        try {
          p.resolve(parseResponse(p.op, frame.body));
        } catch (e) {
          p.reject(e as Error);
          this.badFrame(socket, e as Error);
        }
        return;
      }
      case 'req': {
        let body: unknown;
        try {
          body = parseRequest(frame.op, frame.body);
        } catch (e) {
          this.badFrame(socket, e as Error);
          return;
        }
        const answer = (msg: object) => {
          if (this.socket === socket) this.write(socket, encodeFrame({ ...msg, t: 'res', id: frame.id }));
        };
        const h = this.handlers.get(frame.op);
        if (!h) return answer({ ok: false, error: `storage system ${this.self} does not handle ${frame.op}` });
        Promise.resolve()
          .then(() => h(body))
          .then(
            (r) => answer({ ...(r as object), ok: true }),
            (e: Error) => answer({ ok: false, error: e.message }),
          );
        return;
      }
      default:
        this.badFrame(socket, new BadFrame(`a ${frame.t} frame after the handshake`));
    }
  }

  private write(socket: net.Socket, frame: Buffer): void {
    // A dropped link sends nothing: the peer hears silence, as through a cut cable.
    if (this.faultNow?.kind === 'drop') return;
    socket.write(frame);
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
    for (const w of this.roomWaiters.splice(0)) w();
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

/** The peer server hands a data connection over: `from` is the authenticated storage system. */
export type DataHandler = (socket: net.Socket, from: number, exportName: string) => void;

/**
 * The accepting side: one listener per storage system. A connection must open with a hello
 * naming a configured peer and this storage system, in our protocol version, or with a data
 * frame from a configured peer; anything else is logged and closed without an answer, and
 * changes nothing. With TLS, the peer's certificate must be signed by the cluster CA and its CN
 * must be the storage system the frame claims to come from.
 */
export class PeerServer {
  private server: net.Server | null = null;
  private readonly sockets = new Set<net.Socket>();

  constructor(
    private readonly self: number,
    private readonly links: Map<number, PeerLink>,
    private readonly log: Logger,
    private readonly opts: { tls?: PeerTls; onData?: DataHandler } = {},
  ) {}

  async listen(addr: PeerAddress): Promise<void> {
    const creds = this.opts.tls;
    const server = creds
      ? tls.createServer({ cert: creds.cert, key: creds.key, ca: creds.ca, requestCert: true, rejectUnauthorized: true, minVersion: 'TLSv1.3' }, (socket) => this.accept(socket))
      : net.createServer((socket) => this.accept(socket));
    if (creds) {
      server.on('tlsClientError', (e: Error, socket: net.Socket) => {
        const from = `${socket.remoteAddress}:${socket.remotePort}`;
        this.log.warn({ from, reason: e.message }, `peer channel: refused a connection from ${from}: TLS: ${e.message}`);
      });
    }
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
    const from = `${socket.remoteAddress}:${socket.remotePort}`;
    // With TLS the CA has vouched for the certificate; its CN says which storage system this is.
    let identity: number | undefined;
    if (this.opts.tls) {
      const cn = (socket as tls.TLSSocket).getPeerCertificate().subject?.CN;
      identity = identityOf(cn);
      if (identity === undefined) {
        this.log.warn({ from, cn }, `peer channel: refused a connection from ${from}: its certificate (CN=${String(cn)}) names no storage system`);
        socket.destroy();
        return;
      }
    }
    // A hello is small: a stranger gets 4 KiB and 10 s to send one.
    const reader = new FrameReader(4096);
    const giveUp = setTimeout(() => refuse('no hello within 10 s'), 10_000);
    const refuse = (why: string) => {
      clearTimeout(giveUp);
      socket.off('data', onData);
      this.log.warn({ from, reason: why }, `peer channel: refused a connection from ${from}: ${why}`);
      socket.destroy();
    };
    const onData = (chunk: Buffer) => {
      let texts: string[];
      let hello: Frame;
      try {
        texts = reader.push(chunk);
        if (texts.length === 0) return;
        hello = parseFrame(texts[0]!);
      } catch (e) {
        refuse((e as Error).message);
        return;
      }
      if (hello.t !== 'hello' && hello.t !== 'data') return refuse(`a ${hello.t} frame before any hello`);
      if (hello.v !== PROTOCOL_VERSION) return refuse(`protocol version ${hello.v}; this storage system speaks ${PROTOCOL_VERSION}`);
      if (identity !== undefined && hello.from !== identity) return refuse(`its certificate says storage system ${identity}, but its ${hello.t} frame claims to come from ${hello.from}`);
      if (texts.length > 1 || reader.buffered > 0) return refuse(`frames after the ${hello.t} before the answer`);
      const link = hello.to === this.self ? this.links.get(hello.from) : undefined;
      if (hello.t === 'data') {
        if (!link || !this.opts.onData) return refuse(`a data connection from storage system ${hello.from} to ${hello.to}, which shares no pair with storage system ${this.self}`);
        if (link.fault?.kind === 'drop' || link.fault?.kind === 'reset') return refuse(`injected fault on the link to storage system ${hello.from}: ${link.fault.kind}`);
        clearTimeout(giveUp);
        socket.off('data', onData);
        this.opts.onData(socket, hello.from, hello.export);
        return;
      }
      if (!link || link.dials) return refuse(`a hello from storage system ${hello.from} to ${hello.to}, which is not a peer that dials storage system ${this.self}`);
      clearTimeout(giveUp);
      socket.off('data', onData);
      link.adopt(socket, reader);
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

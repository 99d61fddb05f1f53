// NBD client: fixed-newstyle handshake, then pipelined commands matched to
// replies by cookie. Used for replication writes and fallback reads between
// storage systems, the CFS and transfers, so it favours: many requests in
// flight, READ payloads read straight into the caller's buffer, and failing
// fast and loudly.
//
// Pieces, one concern each (src/nbd/client/):
//   Inbox         the transport's single 'data' listener; exact-length reads
//                 for the handshake, then hands the stream to the parser
//   DirectReads   the `onread` of sockets connect() makes: READ payloads go
//                 from the kernel into the caller's buffer (receive.ts)
//   negotiate()   the option haggling, one awaited read per step
//   RequestPolicy the choke point that refuses locally what the server did not
//                 advertise (strict mode), like libnbd's strict flags
//   InFlight      cookie -> command table plus the per-request timeout sweep
//   RequestWriter cork-per-tick batching and backpressure ('drain') queue
//   NbdClient     commands, reply routing, connection lifecycle
//
// Timeouts: a command that exceeds timeoutMs is rejected with ETIMEDOUT and
// the connection is closed. Keeping it open would be possible (cookies are
// unique, so a late reply could simply be dropped), but the request is lost
// either way: its write may still land later, and a server that sits on one
// request this long is stuck, so the others would wait just as long. Closing
// fails every pending request at once, makes their outcome explicitly
// unknown, and lets the caller reconnect or fail over.
import net from 'node:net';
import { performance } from 'node:perf_hooks';
import {
  TransmissionFlag,
  Opt,
  Rep,
  Cmd,
  CmdFlag,
  ReplyType,
  BASE_ALLOCATION,
  isErrorReply,
  isErrorChunk,
  nameOf,
} from '../../protocol/constants.js';
import {
  NbdProtocolError,
  ReplyParser,
  decodeServerReply,
  encodeRequest,
  type BlockSizeInfo,
  type BlockStatusExtent,
  type ReplyEvent,
} from '../../protocol/replies.js';
import { Inbox, NbdTransport, Negotiated, greet, handshake, negotiate, openSocket, startTls, unexpected } from './handshake.js';
import { Command, InFlight, RequestPolicy, RequestWriter } from './requests.js';
import { DirectReads, DIRECT_MIN, type DirectReceiver } from './receive.js';
import { ConnectOptions, ResolvedOptions, resolveOptions } from './options.js';
import { NbdConnectionError, NbdOptionError, NbdTimeoutError, refused, serverError } from './errors.js';

/** Largest cookie before they start again from 1: a V8 small integer on every platform. */
export const COOKIE_MAX = 2 ** 30 - 1;

// ---------------------------------------------------------------------------
// Public entry points

/** Connect and negotiate; resolves once the export is open for commands. */
export async function connect(target: string | ConnectOptions, options: ConnectOptions = {}): Promise<NbdClient> {
  const o = resolveOptions(target, options);
  // TLS records are decrypted into buffers Node allocates: only plain sockets read in place.
  const reads = o.tls ? undefined : new DirectReads();
  const { socket, peer } = openSocket(o, reads);
  return open(socket, peer, o, reads);
}

/** Negotiate over an already connected transport (a TLS socket, an in-process duplex pair). */
export async function connectTransport(transport: NbdTransport, options: ConnectOptions = {}): Promise<NbdClient> {
  return open(transport, 'transport', resolveOptions(options, {}));
}

export async function open(transport: NbdTransport, peer: string, o: ResolvedOptions, reads?: DirectReads): Promise<NbdClient> {
  let greeting: { fixed: boolean; noZeroes: boolean } | undefined;
  if (o.tls) {
    if (!(transport instanceof net.Socket)) throw refused('connect', 'EINVAL', 'TLS needs a socket transport');
    ({ transport, greeting } = await startTls(transport, peer, o));
  }
  const { io, result } = await handshake(transport, peer, o, 'connect', (io) => negotiate(io, o, greeting), reads);
  return new NbdClient(transport, io.inbox, peer, result, o, reads);
}

export interface ExportListing {
  name: string;
  description: string;
}

/** LIST the server's exports, then ABORT: for tooling, like `nbdinfo --list`. */
export async function listExports(target: string | ConnectOptions, options: ConnectOptions = {}): Promise<ExportListing[]> {
  const o = resolveOptions(target, options);
  let { socket, peer } = openSocket(o);
  let greeting: { fixed: boolean; noZeroes: boolean } | undefined;
  if (o.tls) ({ transport: socket, greeting } = await startTls(socket, peer, o));
  const { result } = await handshake(socket, peer, o, 'list', async (io) => {
    const { fixed } = greeting ?? (await greet(io));
    if (!fixed) throw refused('list', 'ENOTSUP', `${peer} does not speak fixed newstyle, so it cannot LIST`);
    io.option(Opt.LIST);
    const found: ExportListing[] = [];
    for (;;) {
      const r = await io.reply(Opt.LIST);
      if (r.reply === Rep.SERVER) found.push(decodeServerReply(r.payload));
      else if (r.reply === Rep.ACK) break;
      else if (isErrorReply(r.reply)) throw new NbdOptionError(Opt.LIST, r.reply, r.payload.toString('utf8'));
      else throw unexpected(Opt.LIST, r.reply);
    }
    io.option(Opt.ABORT);
    // Waiting for the ACK lets the server close first and log a clean exit; a server that just closes is fine too.
    await io.reply(Opt.ABORT).catch(() => undefined);
    return found;
  });
  socket.destroy();
  return result;
}

// ---------------------------------------------------------------------------
// The client

/** A WRITE's data: one buffer, or pieces sent back to back. */
export type WritePayload = Uint8Array | readonly Uint8Array[];

export interface ReadOptions {
  /** DF: ask for the data in one chunk (needs SEND_DF). */
  df?: boolean;
}
export interface WriteOptions {
  fua?: boolean;
}
export interface ZeroOptions {
  noHole?: boolean;
  fastZero?: boolean;
  fua?: boolean;
}
export interface BlockStatusOptions {
  /** REQ_ONE: at most one extent, within the request. */
  reqOne?: boolean;
  /** Context to report (default base:allocation); it must have been negotiated. */
  context?: string;
}

export class NbdClient implements DirectReceiver {
  readonly exportName: string;
  /** Export size in bytes. */
  readonly size: number;
  /** Transmission flags (TransmissionFlag bits). */
  readonly flags: number;
  /** Advertised block sizes, or the protocol defaults (1 / 4096 / 32 MiB) when none were sent. */
  readonly blockSize: Readonly<BlockSizeInfo>;
  readonly description: string;
  readonly structuredReplies: boolean;
  /** Negotiated meta contexts, name -> id. */
  readonly metaContexts: ReadonlyMap<string, number>;
  /** Resolves when the connection has ended: undefined after a clean disconnect(), else why it died. Never rejects. */
  readonly closed: Promise<Error | undefined>;

  private readonly table: InFlight;
  private readonly writer: RequestWriter;
  private readonly parser: ReplyParser;
  private readonly policy: RequestPolicy;
  private nextCookie = 1;
  private current: Command | undefined; // the command whose reply (chunk) the parser is inside
  private closing = false;
  private ended = false;
  private death: Error | undefined;
  private resolveClosed!: (reason: Error | undefined) => void;
  private disconnectTimer: NodeJS.Timeout | undefined;
  private readonly readTally = { direct: 0, copied: 0 };

  /** @internal use connect() or connectTransport(). */
  constructor(
    private readonly transport: NbdTransport,
    inbox: Inbox,
    private readonly peer: string,
    n: Negotiated,
    private readonly o: ResolvedOptions,
    reads?: DirectReads,
  ) {
    this.exportName = n.exportName;
    this.size = n.size;
    this.flags = n.flags;
    this.blockSize = { ...n.blockSize };
    this.description = n.description;
    this.structuredReplies = n.structuredReplies;
    this.metaContexts = n.metaContexts;
    this.closed = new Promise((r) => (this.resolveClosed = r));
    this.policy = new RequestPolicy(n, o.strict);
    this.table = new InFlight(o.timeoutMs, this.timedOut);
    this.writer = new RequestWriter(transport);
    this.parser = new ReplyParser({
      structuredReplies: n.structuredReplies,
      readTarget: (cookie) => {
        const c = this.table.get(cookie);
        return c && c.type === Cmd.READ ? c : undefined;
      },
      onEvent: this.onReply,
    });
    transport.on('drain', () => this.writer.drained());
    inbox.handoff({
      data: this.onData,
      end: () => this.onEnd(),
      error: (err) => this.onError(err),
      close: () => this.onClose(),
    });
    reads?.takeOver(this);
  }

  get readOnly(): boolean {
    return this.has(TransmissionFlag.READ_ONLY);
  }
  get canMultiConn(): boolean {
    return this.has(TransmissionFlag.CAN_MULTI_CONN);
  }
  get canFlush(): boolean {
    return this.has(TransmissionFlag.SEND_FLUSH);
  }
  get canFua(): boolean {
    return this.has(TransmissionFlag.SEND_FUA);
  }
  get canTrim(): boolean {
    return this.has(TransmissionFlag.SEND_TRIM);
  }
  get canZero(): boolean {
    return this.has(TransmissionFlag.SEND_WRITE_ZEROES);
  }
  get canFastZero(): boolean {
    return this.has(TransmissionFlag.SEND_FAST_ZERO);
  }
  get canCache(): boolean {
    return this.has(TransmissionFlag.SEND_CACHE);
  }
  get canDf(): boolean {
    return this.has(TransmissionFlag.SEND_DF) && this.structuredReplies;
  }
  get isRotational(): boolean {
    return this.has(TransmissionFlag.ROTATIONAL);
  }
  /** Commands sent or queued and not yet answered. */
  get inFlight(): number {
    return this.table.size;
  }
  /** True until disconnect() starts or the connection dies. */
  get isOpen(): boolean {
    return !this.closing && !this.ended;
  }

  /**
   * READ payload bytes so far: `direct` were read by the kernel straight into
   * the callers' buffers, `copied` came in a socket chunk and were copied.
   */
  get readBytes(): Readonly<{ direct: number; copied: number }> {
    return this.readTally;
  }

  private has(flag: number): boolean {
    return (this.flags & flag) !== 0;
  }

  /**
   * Read into `dest` (its whole length) or into a new buffer of `length`
   * bytes; holes are zero-filled. Resolves with the destination. On a socket
   * connect() made without TLS, large payloads are read by the kernel straight
   * into `dest` (receive.ts); otherwise each byte is copied once into it.
   * Until the promise settles, `dest` belongs to the client.
   */
  pread(dest: Buffer | number, offset: number, opts: ReadOptions = {}): Promise<Buffer> {
    const length = typeof dest === 'number' ? dest : dest.length;
    const flags = opts.df ? CmdFlag.DF : 0;
    const refusal = this.policy.check('pread', Cmd.READ, flags, offset, length);
    if (refusal) return Promise.reject(refusal);
    // Unzeroed is safe: completion requires data and holes to cover every byte.
    const buf = typeof dest === 'number' ? Buffer.allocUnsafe(length) : dest;
    return this.submit<Buffer>('pread', Cmd.READ, flags, offset, length, buf, undefined);
  }

  /** Write `data` at `offset`. The buffer is sent as is: do not modify it until the promise settles. */
  /** `data` may be a list of pieces (sent as one payload, without joining them first). */
  pwrite(data: WritePayload, offset: number, opts: WriteOptions = {}): Promise<void> {
    const flags = opts.fua ? CmdFlag.FUA : 0;
    const length = data instanceof Uint8Array ? data.length : data.reduce((n, b) => n + b.length, 0);
    const refusal = this.policy.check('pwrite', Cmd.WRITE, flags, offset, length);
    if (refusal) return Promise.reject(refusal);
    return this.submit<void>('pwrite', Cmd.WRITE, flags, offset, length, undefined, data);
  }

  flush(): Promise<void> {
    const refusal = this.policy.check('flush', Cmd.FLUSH, 0, 0, 0);
    if (refusal) return Promise.reject(refusal);
    return this.submit<void>('flush', Cmd.FLUSH, 0, 0, 0, undefined, undefined);
  }

  trim(offset: number, length: number, opts: WriteOptions = {}): Promise<void> {
    const flags = opts.fua ? CmdFlag.FUA : 0;
    const refusal = this.policy.check('trim', Cmd.TRIM, flags, offset, length);
    if (refusal) return Promise.reject(refusal);
    return this.submit<void>('trim', Cmd.TRIM, flags, offset, length, undefined, undefined);
  }

  zero(offset: number, length: number, opts: ZeroOptions = {}): Promise<void> {
    const flags = (opts.fua ? CmdFlag.FUA : 0) | (opts.noHole ? CmdFlag.NO_HOLE : 0) | (opts.fastZero ? CmdFlag.FAST_ZERO : 0);
    const refusal = this.policy.check('zero', Cmd.WRITE_ZEROES, flags, offset, length);
    if (refusal) return Promise.reject(refusal);
    return this.submit<void>('zero', Cmd.WRITE_ZEROES, flags, offset, length, undefined, undefined);
  }

  cache(offset: number, length: number): Promise<void> {
    const refusal = this.policy.check('cache', Cmd.CACHE, 0, offset, length);
    if (refusal) return Promise.reject(refusal);
    return this.submit<void>('cache', Cmd.CACHE, 0, offset, length, undefined, undefined);
  }

  /**
   * Extents of one meta context from `offset`, as the server sent them: they
   * may cover less than `length`, and (without reqOne) the last may run past it.
   */
  blockStatus(offset: number, length: number, opts: BlockStatusOptions = {}): Promise<BlockStatusExtent[]> {
    const context = opts.context ?? BASE_ALLOCATION;
    const id = this.metaContexts.get(context);
    const flags = opts.reqOne ? CmdFlag.REQ_ONE : 0;
    if (id === undefined && this.o.strict) return Promise.reject(refused('blockStatus', 'ENOTSUP', `meta context ${context} was not negotiated`));
    const refusal = this.policy.check('blockStatus', Cmd.BLOCK_STATUS, flags, offset, length);
    if (refusal) return Promise.reject(refusal);
    return this.submit<BlockStatusExtent[]>('blockStatus', Cmd.BLOCK_STATUS, flags, offset, length, undefined, undefined, context, id);
  }

  /**
   * Clean end: new commands are refused, the ones in flight are answered,
   * then DISC is sent and the connection closed. Resolves when closed.
   */
  async disconnect(): Promise<void> {
    if (!this.closing && !this.ended) {
      this.closing = true;
      await this.table.whenIdle();
      if (!this.ended) {
        this.writer.send(encodeRequest({ flags: 0, type: Cmd.DISC, cookie: this.newCookie(), offset: 0, length: 0 }));
        this.transport.end();
        // The server MUST close after DISC; don't let one that doesn't keep us open.
        this.disconnectTimer = setTimeout(() => this.transport.destroy(), this.o.handshakeTimeoutMs);
        this.disconnectTimer.unref();
      }
    }
    await this.closed;
  }

  /** Hard close: everything in flight fails with ECONNABORTED. */
  async close(): Promise<void> {
    this.die(new NbdConnectionError('ECONNABORTED', `connection to ${this.peer} closed by the client`));
    await this.closed;
  }

  // -- sending

  /** The result type follows the command (Command.settle): the public methods state it. */
  private submit<T>(
    op: string,
    type: number,
    flags: number,
    offset: number,
    length: number,
    buf: Buffer | undefined,
    payload: WritePayload | undefined,
    context?: string,
    contextId?: number,
  ): Promise<T> {
    if (this.ended) return Promise.reject(new NbdConnectionError('ENOTCONN', `${op}: connection to ${this.peer} is closed`, { cause: this.death }));
    if (this.closing) return Promise.reject(new NbdConnectionError('ESHUTDOWN', `${op}: disconnect in progress`));
    const cookie = this.newCookie();
    const c = new Command(op, cookie, type, offset, length, performance.now(), buf, context, contextId);
    const promise = c.start() as Promise<T>;
    this.table.add(c);
    this.writer.send(encodeRequest({ flags, type, cookie, offset, length }), payload);
    return promise;
  }

  /**
   * Cookies are small integers, 1 to COOKIE_MAX, so they and the table's keys are never heap
   * objects. After COOKIE_MAX they start again from 1, skipping any still in flight (a command
   * that old has long timed out in practice, but a reply must never reach the wrong command).
   */
  private newCookie(): number {
    let cookie = this.nextCookie;
    while (this.table.get(cookie)) cookie = cookie >= COOKIE_MAX ? 1 : cookie + 1;
    this.nextCookie = cookie >= COOKIE_MAX ? 1 : cookie + 1;
    return cookie;
  }

  // -- receiving

  private readonly onData = (chunk: Buffer): void => {
    this.received(chunk, chunk.length);
  };

  /** @internal DirectReceiver: bytes in a buffer that is reused once this returns (or a 'data' chunk). */
  received(chunk: Buffer, n: number): boolean {
    if (this.ended) return false;
    try {
      this.parser.feed(chunk, n);
    } catch (err) {
      this.broken(err);
    }
    return !this.ended;
  }

  /**
   * @internal DirectReceiver: inside a large enough READ payload, the rest of it in the
   * caller's buffer. A range outside the request is left to the scratch path,
   * where the 'data' event's check kills the connection.
   */
  directTarget(): Buffer | undefined {
    const left = this.parser.dataRemaining;
    const c = this.current;
    if (left < DIRECT_MIN || !c?.buf || this.ended) return undefined;
    const at = this.parser.dataCursor - c.offset;
    if (at < 0 || at + left > c.length) return undefined;
    return c.buf.subarray(at, at + left);
  }

  /** @internal DirectReceiver: n bytes of the payload landed in the buffer directTarget() gave. */
  directFilled(n: number): boolean {
    if (this.ended) return false;
    try {
      this.current!.seen += n;
      this.readTally.direct += n;
      this.parser.skipData(n);
    } catch (err) {
      this.broken(err);
    }
    return !this.ended;
  }

  private broken(err: unknown): void {
    this.die(err instanceof NbdProtocolError ? err : new NbdProtocolError(`reply handling failed: ${String(err)}`, { cause: err }));
  }

  private expect(cookie: number): Command {
    const c = this.table.get(cookie);
    if (!c) throw new NbdProtocolError(`reply for unknown cookie ${cookie}`);
    return c;
  }

  /** Routes parser events; throwing NbdProtocolError here kills the connection. */
  private readonly onReply = (e: ReplyEvent): void => {
    switch (e.type) {
      case 'simple': {
        const c = (this.current = this.expect(e.cookie));
        if (e.error) c.error ??= serverError(c.op, e.error, '');
        return;
      }
      case 'chunk': {
        const c = (this.current = this.expect(e.cookie));
        const t = e.replyType;
        if ((t === ReplyType.OFFSET_DATA || t === ReplyType.OFFSET_HOLE) && c.type !== Cmd.READ) {
          throw new NbdProtocolError(`${nameOf('reply', t)} chunk in the reply to ${nameOf('cmd', c.type)}`);
        }
        if (t === ReplyType.BLOCK_STATUS && c.type !== Cmd.BLOCK_STATUS) {
          throw new NbdProtocolError(`BLOCK_STATUS chunk in the reply to ${nameOf('cmd', c.type)}`);
        }
        // proto.md: an unknown non-error chunk type means the client must hang up.
        if (t !== ReplyType.NONE && t !== ReplyType.OFFSET_DATA && t !== ReplyType.OFFSET_HOLE && t !== ReplyType.BLOCK_STATUS && !isErrorChunk(t)) {
          throw new NbdProtocolError(`unknown chunk type ${t}`);
        }
        return;
      }
      case 'data': {
        const c = this.current!;
        const at = this.within(c, e.offset, e.data.length);
        e.data.copy(c.buf!, at);
        c.seen += e.data.length;
        this.readTally.copied += e.data.length;
        return;
      }
      case 'hole': {
        const c = this.current!;
        const at = this.within(c, e.offset, e.length);
        c.buf!.fill(0, at, at + e.length);
        c.seen += e.length;
        return;
      }
      case 'blockStatus': {
        const c = this.current!;
        c.extents ??= new Map();
        const prev = c.extents.get(e.contextId);
        c.extents.set(e.contextId, prev ? prev.concat(e.extents) : e.extents);
        return;
      }
      case 'error': {
        const c = this.current!;
        c.error ??= serverError(c.op, e.error, e.message, e.offset);
        return;
      }
      case 'unknown':
        throw new NbdProtocolError(`unknown chunk type ${e.replyType}`);
      case 'done': {
        const c = this.current!;
        this.current = undefined;
        this.table.delete(c.cookie);
        c.settle(c.error);
        return;
      }
    }
  };

  /** Position of [offset, offset+length) in the read buffer; anything outside is a broken server. */
  private within(c: Command, offset: number, length: number): number {
    const at = offset - c.offset;
    if (at < 0 || at + length > c.length) {
      throw new NbdProtocolError(`read reply covers ${offset}+${length}, outside the request ${c.offset}+${c.length}`);
    }
    return at;
  }

  // -- lifecycle

  private readonly timedOut = (c: Command): void => {
    const err = new NbdTimeoutError(c.op, this.o.timeoutMs ?? 0);
    this.table.delete(c.cookie);
    c.settle(err);
    this.die(new NbdConnectionError('ECONNABORTED', `connection to ${this.peer} closed: ${err.message}`, { cause: err }));
  };

  private onEnd(): void {
    // After DISC the server closes once everything is answered: that is the clean end.
    if (this.closing && this.table.size === 0) return;
    this.die(new NbdConnectionError('ECONNRESET', `${this.peer} closed the connection${this.midReply()} with ${this.table.size} requests in flight`));
  }

  private onError(err: Error): void {
    const code = (err as NodeJS.ErrnoException).code ?? 'ECONNRESET';
    this.die(new NbdConnectionError(code, `connection to ${this.peer} failed: ${err.message}`, { cause: err }));
  }

  private onClose(): void {
    if (this.disconnectTimer) clearTimeout(this.disconnectTimer);
    if (this.ended) return;
    if (this.closing && this.table.size === 0) {
      this.ended = true;
      this.table.drain(); // empty already: this stops its sweep timer
      this.writer.discard();
      this.resolveClosed(undefined);
      return;
    }
    this.die(new NbdConnectionError('ECONNRESET', `connection to ${this.peer} closed${this.midReply()} with ${this.table.size} requests in flight`));
  }

  private midReply(): string {
    const left = this.parser.dataRemaining;
    if (left > 0) return ` ${left} bytes before the end of a READ reply`;
    return this.parser.idle ? '' : ' in the middle of a reply';
  }

  /** The one way a connection fails: every pending command gets `reason`, the transport is destroyed. */
  private die(reason: Error): void {
    if (this.ended) return;
    this.ended = true;
    this.death = reason;
    this.current = undefined;
    this.writer.discard();
    for (const c of this.table.drain()) c.settle(reason);
    this.transport.destroy();
    this.resolveClosed(reason);
  }
}



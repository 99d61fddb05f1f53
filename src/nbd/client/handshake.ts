// NBD client: the transport's listeners and the fixed-newstyle handshake, one awaited read per step.
import net from 'node:net';
import {
  HandshakeFlag,
  ClientFlag,
  Opt,
  Rep,
  Info,
  MAX_OPTION_LENGTH,
  MIN_BLOCK,
  PREFERRED_BLOCK,
  MAX_PAYLOAD,
  OPTION_REPLY_HEADER_SIZE,
  isErrorReply,
  nameOf,
} from '../../protocol/constants.js';
import {
  NbdProtocolError,
  GREETING_SIZE,
  EXPORT_NAME_REPLY_SIZE,
  EXPORT_NAME_ZERO_PAD,
  decodeGreeting,
  decodeOptionReplyHeader,
  decodeInfoReply,
  decodeMetaContextReply,
  decodeExportNameReply,
  encodeClientFlags,
  encodeOption,
  encodeExportQuery,
  encodeMetaContextQuery,
  type BlockSizeInfo,
} from '../../protocol/replies.js';
import { NbdConnectionError, NbdOptionError, NbdTimeoutError } from './errors.js';
import { ResolvedOptions } from './options.js';
import type { DirectReads } from './receive.js';

// ---------------------------------------------------------------------------
// Transport

/** What the client needs of a socket; net.Socket fits, tests may pass any duplex. */
export interface NbdTransport {
  write(chunk: Uint8Array): boolean;
  cork(): void;
  uncork(): void;
  end(): void;
  destroy(error?: Error): void;
  on(event: 'data', listener: (chunk: Buffer) => void): unknown;
  on(event: 'error', listener: (err: Error) => void): unknown;
  on(event: 'drain' | 'end' | 'close', listener: () => void): unknown;
}

export interface WireSink {
  data(chunk: Buffer): void;
  end(): void;
  error(err: Error): void;
  close(): void;
}

/**
 * Owns the transport's listeners from the first byte, so nothing is lost
 * between the handshake and the transmission phase: chunks and terminal
 * events that arrive before handoff() are queued and replayed in order.
 */
export class Inbox {
  private chunks: Buffer[] = [];
  private queued = 0;
  private terminal: Error | undefined;
  private readonly events: Array<'end' | 'close' | Error> = [];
  private waiter: { n: number; resolve: (b: Buffer) => void; reject: (e: Error) => void } | undefined;
  private sink: WireSink | undefined;
  private readonly listeners: Array<[string, (...a: never[]) => void]>;

  constructor(
    private readonly t: NbdTransport,
    private readonly peer: string,
  ) {
    this.listeners = [
      ['data', (c: Buffer) => this.receive(c)],
      ['end', () => (this.sink ? this.sink.end() : this.stop('end'))],
      ['close', () => (this.sink ? this.sink.close() : this.stop('close'))],
      ['error', (e: Error) => (this.sink ? this.sink.error(e) : this.stop(e))],
    ];
    for (const [ev, fn] of this.listeners) (t.on as (e: string, f: (...a: never[]) => void) => unknown)(ev, fn);
  }

  /** Stop listening (STARTTLS hands the socket to TLS); what arrived and was not read is returned. */
  release(): number {
    const off = (this.t as unknown as { off?: (e: string, f: (...a: never[]) => void) => unknown }).off;
    for (const [ev, fn] of this.listeners) off?.call(this.t, ev, fn);
    return this.queued;
  }

  /** Bytes from the transport: its 'data' events, or DirectReads for a socket made with `onread`. */
  receive(c: Buffer): void {
    if (this.sink) this.sink.data(c);
    else this.push(c);
  }

  read(n: number): Promise<Buffer> {
    if (this.queued >= n) return Promise.resolve(this.take(n));
    if (this.terminal) return Promise.reject(this.terminal);
    return new Promise((resolve, reject) => (this.waiter = { n, resolve, reject }));
  }

  /** End the handshake with an error (timeout, abort): pending and later reads reject. */
  fail(err: Error): void {
    this.terminal ??= err;
    const w = this.waiter;
    this.waiter = undefined;
    w?.reject(this.terminal);
  }

  handoff(sink: WireSink): void {
    this.sink = sink;
    const chunks = this.chunks;
    this.chunks = [];
    this.queued = 0;
    for (const c of chunks) sink.data(c);
    for (const e of this.events) {
      if (e === 'end') sink.end();
      else if (e === 'close') sink.close();
      else sink.error(e);
    }
  }

  private push(c: Buffer): void {
    this.chunks.push(c);
    this.queued += c.length;
    const w = this.waiter;
    if (w && this.queued >= w.n) {
      this.waiter = undefined;
      w.resolve(this.take(w.n));
    }
  }

  private stop(e: 'end' | 'close' | Error): void {
    this.events.push(e);
    if (e instanceof Error) {
      const code = (e as NodeJS.ErrnoException).code ?? 'ECONNRESET';
      this.fail(new NbdConnectionError(code, `connect ${this.peer}: ${e.message}`, { cause: e }));
    } else {
      const wanted = this.waiter ? ` while waiting for ${this.waiter.n} bytes` : '';
      this.fail(new NbdProtocolError(`truncated handshake: ${this.peer} closed the connection${wanted}`));
    }
  }

  /** Exactly n bytes: a view when one chunk holds them, else one exact-length join. */
  private take(n: number): Buffer {
    if (n === 0) return Buffer.alloc(0);
    this.queued -= n;
    const first = this.chunks[0];
    if (first.length >= n) {
      if (first.length === n) this.chunks.shift();
      else this.chunks[0] = first.subarray(n);
      return first.subarray(0, n);
    }
    const parts: Buffer[] = [];
    let left = n;
    while (left > 0) {
      const c = this.chunks[0];
      if (c.length <= left) {
        parts.push(c);
        this.chunks.shift();
        left -= c.length;
      } else {
        parts.push(c.subarray(0, left));
        this.chunks[0] = c.subarray(left);
        left = 0;
      }
    }
    return Buffer.concat(parts, n);
  }
}

// ---------------------------------------------------------------------------
// Handshake

export interface Negotiated {
  exportName: string;
  size: number;
  flags: number;
  blockSize: BlockSizeInfo;
  /** The server sent INFO_BLOCK_SIZE: its minimum is binding. */
  blockSizeAdvertised: boolean;
  description: string;
  structuredReplies: boolean;
  metaContexts: Map<string, number>;
}

export const DEFAULT_BLOCK_SIZE: BlockSizeInfo = { min: MIN_BLOCK, preferred: PREFERRED_BLOCK, max: MAX_PAYLOAD };

export class HandshakeIO {
  constructor(
    readonly transport: NbdTransport,
    readonly inbox: Inbox,
  ) {}

  read(n: number): Promise<Buffer> {
    return this.inbox.read(n);
  }

  send(b: Buffer): void {
    this.transport.write(b);
  }

  option(option: number, data?: Buffer): void {
    this.send(encodeOption(option, data));
  }

  /** One option reply: header, checked against the option we sent, and its payload. */
  async reply(option: number): Promise<{ reply: number; payload: Buffer }> {
    const h = decodeOptionReplyHeader(await this.read(OPTION_REPLY_HEADER_SIZE));
    if (h.option !== option) {
      throw new NbdProtocolError(`reply to ${nameOf('opt', h.option)} while waiting for ${nameOf('opt', option)}`);
    }
    if (h.length > MAX_OPTION_LENGTH) {
      throw new NbdProtocolError(`${nameOf('rep', h.reply)} reply to ${nameOf('opt', option)} of ${h.length} bytes`);
    }
    const payload = h.length ? await this.read(h.length) : Buffer.alloc(0);
    return { reply: h.reply, payload };
  }
}

export function unexpected(option: number, reply: number): NbdProtocolError {
  return new NbdProtocolError(`unexpected ${nameOf('rep', reply)} reply to ${nameOf('opt', option)}`);
}

export async function greet(io: HandshakeIO): Promise<{ fixed: boolean; noZeroes: boolean }> {
  const { handshakeFlags } = decodeGreeting(await io.read(GREETING_SIZE));
  const fixed = (handshakeFlags & HandshakeFlag.FIXED_NEWSTYLE) !== 0;
  const noZeroes = (handshakeFlags & HandshakeFlag.NO_ZEROES) !== 0;
  // Echo only what was offered: a server MUST close on client flags it did not offer.
  io.send(encodeClientFlags((fixed ? ClientFlag.C_FIXED_NEWSTYLE : 0) | (noZeroes ? ClientFlag.C_NO_ZEROES : 0)));
  return { fixed, noZeroes };
}

/** Any refusal means simple replies: old servers answer ERR_UNSUP, some ERR_POLICY. */
export async function optStructuredReply(io: HandshakeIO): Promise<boolean> {
  io.option(Opt.STRUCTURED_REPLY);
  const r = await io.reply(Opt.STRUCTURED_REPLY);
  if (r.reply === Rep.ACK) return true;
  if (isErrorReply(r.reply)) return false;
  throw unexpected(Opt.STRUCTURED_REPLY, r.reply);
}

/** Selected contexts (name -> id); a refusal leaves none selected, which blockStatus reports later. */
export async function optSetMetaContext(io: HandshakeIO, exportName: string, queries: string[]): Promise<Map<string, number>> {
  io.option(Opt.SET_META_CONTEXT, encodeMetaContextQuery(exportName, queries));
  const selected = new Map<string, number>();
  for (;;) {
    const r = await io.reply(Opt.SET_META_CONTEXT);
    if (r.reply === Rep.META_CONTEXT) {
      const { id, name } = decodeMetaContextReply(r.payload);
      selected.set(name, id);
    } else if (r.reply === Rep.ACK) {
      return selected;
    } else if (isErrorReply(r.reply)) {
      return new Map();
    } else {
      throw unexpected(Opt.SET_META_CONTEXT, r.reply);
    }
  }
}

export function checkBlockSize(b: BlockSizeInfo): BlockSizeInfo {
  const pow2 = (n: number) => n > 0 && (n & (n - 1)) === 0;
  if (!pow2(b.min) || b.min > 65536 || !pow2(b.preferred) || b.preferred < b.min || b.max < b.min) {
    throw new NbdProtocolError(`invalid INFO_BLOCK_SIZE min ${b.min} preferred ${b.preferred} max ${b.max}`);
  }
  return b;
}

export type ExportDetails = Pick<Negotiated, 'size' | 'flags' | 'blockSize' | 'blockSizeAdvertised' | 'description'>;

/** GO with INFO_BLOCK_SIZE (so the server may state constraints) and INFO_DESCRIPTION; undefined if GO is unsupported. */
export async function optGo(io: HandshakeIO, exportName: string): Promise<ExportDetails | undefined> {
  io.option(Opt.GO, encodeExportQuery(exportName, [Info.BLOCK_SIZE, Info.DESCRIPTION]));
  let exp: { size: number; flags: number } | undefined;
  let blockSize: BlockSizeInfo | undefined;
  let description = '';
  for (;;) {
    const r = await io.reply(Opt.GO);
    if (r.reply === Rep.INFO) {
      const info = decodeInfoReply(r.payload);
      if (info.info === 'export') exp = info;
      else if (info.info === 'blockSize') blockSize = checkBlockSize(info.blockSize);
      else if (info.info === 'description') description = info.description;
    } else if (r.reply === Rep.ACK) {
      if (!exp) throw new NbdProtocolError('GO succeeded without INFO_EXPORT');
      return { size: exp.size, flags: exp.flags, blockSize: blockSize ?? DEFAULT_BLOCK_SIZE, blockSizeAdvertised: !!blockSize, description };
    } else if (r.reply === Rep.ERR_UNSUP) {
      return undefined;
    } else if (isErrorReply(r.reply)) {
      throw new NbdOptionError(Opt.GO, r.reply, r.payload.toString('utf8'));
    } else {
      throw unexpected(Opt.GO, r.reply);
    }
  }
}

/** The pre-GO way in: no error reply exists, a refusal is a closed connection. */
export async function optExportName(io: HandshakeIO, exportName: string, noZeroes: boolean): Promise<ExportDetails> {
  io.option(Opt.EXPORT_NAME, Buffer.from(exportName, 'utf8'));
  try {
    const { size, flags } = decodeExportNameReply(await io.read(EXPORT_NAME_REPLY_SIZE));
    if (!noZeroes) await io.read(EXPORT_NAME_ZERO_PAD);
    return { size, flags, blockSize: DEFAULT_BLOCK_SIZE, blockSizeAdvertised: false, description: '' };
  } catch (err) {
    if (!(err instanceof NbdProtocolError)) throw err;
    throw new NbdProtocolError(`server closed the connection after EXPORT_NAME ${JSON.stringify(exportName)} (no such export?)`, { cause: err });
  }
}

/**
 * Greeting, then STARTTLS and the TLS handshake on the same socket. Returns the TLS socket, on
 * which negotiation goes on without a second greeting.
 */
export async function startTls(socket: net.Socket, peer: string, o: ResolvedOptions): Promise<{ transport: net.Socket; greeting: { fixed: boolean; noZeroes: boolean } }> {
  const { io, result } = await handshake(socket, peer, o, 'connect', async (io) => {
    const g = await greet(io);
    if (!g.fixed) throw new NbdConnectionError('ENOTSUP', `${peer} does not speak fixed newstyle, so it cannot STARTTLS`);
    io.option(Opt.STARTTLS);
    const r = await io.reply(Opt.STARTTLS);
    if (isErrorReply(r.reply)) throw new NbdOptionError(Opt.STARTTLS, r.reply, r.payload.toString('utf8') || `${peer} refused TLS`);
    if (r.reply !== Rep.ACK) throw unexpected(Opt.STARTTLS, r.reply);
    return g;
  });
  if (io.inbox.release() > 0) {
    socket.destroy();
    throw new NbdProtocolError(`${peer} sent data after acknowledging STARTTLS`);
  }
  try {
    // Loaded here, not at the top: node:tls costs every plain-TCP client (the CLI) ~10 ms of start-up.
    const { connectTls } = await import('../tls.js');
    return { transport: await connectTls(socket, o.host, o.tls!, o.handshakeTimeoutMs), greeting: result };
  } catch (e) {
    socket.destroy();
    throw new NbdConnectionError('EPROTO', `connect ${peer}: ${(e as Error).message}`, { cause: e });
  }
}

export async function negotiate(io: HandshakeIO, o: ResolvedOptions, greeting?: { fixed: boolean; noZeroes: boolean }): Promise<Negotiated> {
  const { fixed, noZeroes } = greeting ?? (await greet(io));
  // Without fixed newstyle the server cannot answer options: EXPORT_NAME is the only way in.
  const structuredReplies = fixed && o.structuredReplies ? await optStructuredReply(io) : false;
  const metaContexts = structuredReplies && o.metaContexts.length ? await optSetMetaContext(io, o.exportName, o.metaContexts) : new Map<string, number>();
  const details = (fixed ? await optGo(io, o.exportName) : undefined) ?? (await optExportName(io, o.exportName, noZeroes));
  return { exportName: o.exportName, ...details, structuredReplies, metaContexts };
}

/**
 * Run a handshake over a fresh transport under one deadline and the caller's
 * AbortSignal; on any failure the transport is destroyed.
 */
export async function handshake<T>(
  transport: NbdTransport,
  peer: string,
  o: ResolvedOptions,
  op: string,
  run: (io: HandshakeIO) => Promise<T>,
  reads?: DirectReads,
): Promise<{ io: HandshakeIO; result: T }> {
  const inbox = new Inbox(transport, peer);
  reads?.attach(inbox);
  const io = new HandshakeIO(transport, inbox);
  const timer = setTimeout(() => inbox.fail(new NbdTimeoutError(`${op} ${peer}`, o.handshakeTimeoutMs)), o.handshakeTimeoutMs);
  const onAbort = () => inbox.fail(new NbdConnectionError('ABORT_ERR', `${op} ${peer}: aborted`, { cause: o.signal?.reason }));
  if (o.signal?.aborted) onAbort();
  o.signal?.addEventListener('abort', onAbort, { once: true });
  try {
    return { io, result: await run(io) };
  } catch (err) {
    transport.destroy();
    throw err;
  } finally {
    clearTimeout(timer);
    o.signal?.removeEventListener('abort', onAbort);
  }
}

// Node's default 16 KiB makes a burst of small requests hit 'drain' after
// four 4 KiB writes; 1 MiB lets one tick's burst go out as one writev while
// still bounding what sits in user space (measured: +15-20% 4 KiB IOPS).
export const WRITE_HIGH_WATER_MARK = 1 << 20;

/**
 * A connected socket. With `reads`, it reads through them (receive.ts: READ payloads straight into
 * the caller's buffer), and emits no 'data' events: give the same `reads` to handshake().
 */
export function openSocket(o: ResolvedOptions, reads?: DirectReads): { socket: net.Socket; peer: string } {
  const opts = { writableHighWaterMark: WRITE_HIGH_WATER_MARK, ...(reads ? { onread: reads.onread } : {}) };
  const socket = o.path ? net.connect({ path: o.path, ...opts }) : net.connect({ host: o.host, port: o.port, ...opts });
  socket.setNoDelay(true); // requests are small and latency-bound; Nagle would hold them
  return { socket, peer: o.path ?? `${o.host}:${o.port}` };
}


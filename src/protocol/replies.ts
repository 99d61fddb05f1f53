// Client side of the NBD wire: request and option encoders, option-reply
// decoders, and an incremental parser for transmission replies. Pure: no
// sockets, no timers, so every byte path can be driven from a test.
//
// The reply parser is a small state table in the libnbd manner: each state
// knows how many bytes it wants; headers that straddle socket chunks are
// gathered into a fixed scratch buffer, complete frames are read in place
// (views), and read payloads are handed on as views of the incoming chunk so
// the client copies them exactly once, into the caller's buffer.
import { constants as osConstants } from 'node:os';
import {
  NBDMAGIC,
  IHAVEOPT,
  OPTION_REPLY_MAGIC,
  REQUEST_MAGIC,
  SIMPLE_REPLY_MAGIC,
  STRUCTURED_REPLY_MAGIC,
  Info,
  ReplyFlag,
  ReplyType,
  isErrorChunk,
  nameOf,
  REQUEST_SIZE,
  SIMPLE_REPLY_SIZE,
  CHUNK_HEADER_SIZE,
  OPTION_HEADER_SIZE,
  OPTION_REPLY_HEADER_SIZE,
  MAX_STRING,
  MAX_PAYLOAD,
} from './constants.js';

/** The stream from the server cannot be parsed any more: the connection must be closed. */
export class NbdProtocolError extends Error {
  override readonly name = 'NbdProtocolError';
  readonly code = 'EPROTO';
  readonly errno = osConstants.errno.EPROTO;
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
  }
}

// ---------------------------------------------------------------------------
// Shared helpers

const TWO_32 = 2 ** 32;

/** u64 as a JS number; offsets and sizes past 2^53 cannot be addressed by this client. */
function readU64(buf: Buffer, at: number, what: string): number {
  const hi = buf.readUInt32BE(at);
  const lo = buf.readUInt32BE(at + 4);
  if (hi >= 0x200000) throw new NbdProtocolError(`${what} 0x${buf.toString('hex', at, at + 8)} is beyond 2^53`);
  return hi * TWO_32 + lo;
}

/**
 * A reply's u64 cookie as a number, with no allocation (a bigint is a heap object per reply). It
 * is exact below 2^53; above, it is rounded, which cannot make it equal any cookie a client of
 * ours issued (they stay far below 2^53), so such a reply is still refused as an unknown cookie.
 */
function readCookie(buf: Buffer, at: number): number {
  return buf.readUInt32BE(at) * TWO_32 + buf.readUInt32BE(at + 4);
}

function writeU64(buf: Buffer, at: number, value: number): void {
  buf.writeUInt32BE(Math.floor(value / TWO_32), at);
  buf.writeUInt32BE(value >>> 0, at + 4);
}

function utf8(s: string, what: string): Buffer {
  const b = Buffer.from(s, 'utf8');
  if (b.length > MAX_STRING) throw new RangeError(`${what} is ${b.length} bytes, more than ${MAX_STRING}`);
  return b;
}

// ---------------------------------------------------------------------------
// Handshake: encoders

/** NBDMAGIC, IHAVEOPT, u16 handshake flags. */
export const GREETING_SIZE = 18;
/** u64 size, u16 transmission flags (then 124 zero bytes unless NO_ZEROES). */
export const EXPORT_NAME_REPLY_SIZE = 10;
export const EXPORT_NAME_ZERO_PAD = 124;

export function encodeClientFlags(flags: number): Buffer {
  const b = Buffer.allocUnsafe(4);
  b.writeUInt32BE(flags >>> 0, 0);
  return b;
}

/** IHAVEOPT, u32 option, u32 length, data. */
export function encodeOption(option: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const b = Buffer.allocUnsafe(OPTION_HEADER_SIZE + data.length);
  b.writeBigUInt64BE(IHAVEOPT, 0);
  b.writeUInt32BE(option, 8);
  b.writeUInt32BE(data.length, 12);
  data.copy(b, OPTION_HEADER_SIZE);
  return b;
}

/** INFO / GO data: u32 name length, name, u16 n, n x u16 info request. */
export function encodeExportQuery(exportName: string, infos: readonly number[]): Buffer {
  const name = utf8(exportName, 'export name');
  const b = Buffer.allocUnsafe(4 + name.length + 2 + 2 * infos.length);
  b.writeUInt32BE(name.length, 0);
  name.copy(b, 4);
  let at = 4 + name.length;
  b.writeUInt16BE(infos.length, at);
  for (const i of infos) b.writeUInt16BE(i, (at += 2));
  return b;
}

/** LIST_META_CONTEXT / SET_META_CONTEXT data: u32 name length, name, u32 n, n x (u32 length, query). */
export function encodeMetaContextQuery(exportName: string, queries: readonly string[]): Buffer {
  const parts = [utf8(exportName, 'export name'), ...queries.map((q) => utf8(q, 'meta context query'))];
  const b = Buffer.allocUnsafe(4 + parts.reduce((n, p) => n + 4 + p.length, 0));
  let at = 0;
  const put = (p: Buffer) => {
    b.writeUInt32BE(p.length, at);
    p.copy(b, at + 4);
    at += 4 + p.length;
  };
  put(parts[0]);
  b.writeUInt32BE(queries.length, at);
  at += 4;
  for (const p of parts.slice(1)) put(p);
  return b;
}

// ---------------------------------------------------------------------------
// Handshake: decoders

export interface Greeting {
  handshakeFlags: number;
}

export function decodeGreeting(b: Buffer): Greeting {
  const magic = b.readBigUInt64BE(0);
  if (magic !== NBDMAGIC) throw new NbdProtocolError(`not an NBD server: greeting starts 0x${b.toString('hex', 0, 8)}`);
  const style = b.readBigUInt64BE(8);
  if (style !== IHAVEOPT) {
    throw new NbdProtocolError(`unsupported handshake 0x${b.toString('hex', 8, 16)} (only newstyle is implemented; oldstyle is not)`);
  }
  return { handshakeFlags: b.readUInt16BE(16) };
}

export interface OptionReplyHeader {
  option: number;
  reply: number;
  length: number;
}

/** magic, u32 option, u32 reply type, u32 length. */
export function decodeOptionReplyHeader(b: Buffer): OptionReplyHeader {
  const magic = b.readBigUInt64BE(0);
  if (magic !== OPTION_REPLY_MAGIC) throw new NbdProtocolError(`bad option reply magic 0x${b.toString('hex', 0, 8)}`);
  return { option: b.readUInt32BE(8), reply: b.readUInt32BE(12), length: b.readUInt32BE(16) };
}
export { OPTION_REPLY_HEADER_SIZE };

export interface ExportInfo {
  size: number;
  flags: number;
}

export interface BlockSizeInfo {
  min: number;
  preferred: number;
  max: number;
}

export type InfoReply =
  | { info: 'export'; size: number; flags: number }
  | { info: 'name'; name: string }
  | { info: 'description'; description: string }
  | { info: 'blockSize'; blockSize: BlockSizeInfo }
  | { info: 'unknown'; type: number };

/** Payload of REP_INFO: u16 info type, then type-specific fields. */
export function decodeInfoReply(p: Buffer): InfoReply {
  if (p.length < 2) throw new NbdProtocolError(`REP_INFO of ${p.length} bytes`);
  const type = p.readUInt16BE(0);
  const exact = (n: number) => {
    if (p.length !== n) throw new NbdProtocolError(`${nameOf('info', type)} info of ${p.length} bytes, expected ${n}`);
  };
  switch (type) {
    case Info.EXPORT:
      exact(12);
      return { info: 'export', size: readU64(p, 2, 'export size'), flags: p.readUInt16BE(10) };
    case Info.NAME:
      return { info: 'name', name: p.toString('utf8', 2) };
    case Info.DESCRIPTION:
      return { info: 'description', description: p.toString('utf8', 2) };
    case Info.BLOCK_SIZE:
      exact(14);
      return { info: 'blockSize', blockSize: { min: p.readUInt32BE(2), preferred: p.readUInt32BE(6), max: p.readUInt32BE(10) } };
    default:
      return { info: 'unknown', type };
  }
}

/** Payload of REP_SERVER (LIST): u32 name length, name, description in the rest. */
export function decodeServerReply(p: Buffer): { name: string; description: string } {
  if (p.length < 4) throw new NbdProtocolError(`REP_SERVER of ${p.length} bytes`);
  const n = p.readUInt32BE(0);
  if (n > p.length - 4) throw new NbdProtocolError(`REP_SERVER name length ${n} overruns its ${p.length}-byte reply`);
  return { name: p.toString('utf8', 4, 4 + n), description: p.toString('utf8', 4 + n) };
}

/** Payload of REP_META_CONTEXT: u32 context id, name. */
export function decodeMetaContextReply(p: Buffer): { id: number; name: string } {
  if (p.length < 4) throw new NbdProtocolError(`REP_META_CONTEXT of ${p.length} bytes`);
  return { id: p.readUInt32BE(0), name: p.toString('utf8', 4) };
}

/** Successful EXPORT_NAME: u64 size, u16 transmission flags. */
export function decodeExportNameReply(b: Buffer): ExportInfo {
  return { size: readU64(b, 0, 'export size'), flags: b.readUInt16BE(8) };
}

// ---------------------------------------------------------------------------
// Transmission: requests

export interface RequestHeader {
  flags: number;
  type: number;
  /**
   * The u64 cookie. A client may use numbers (below 2^53): they cost no allocation, where a
   * bigint is a heap object per request and per reply.
   */
  cookie: number | bigint;
  offset: number;
  length: number;
}

/** magic, u16 flags, u16 type, u64 cookie, u64 offset, u32 length: 28 bytes. */
export function writeRequest(dst: Buffer, at: number, r: RequestHeader): void {
  dst.writeUInt32BE(REQUEST_MAGIC, at);
  dst.writeUInt16BE(r.flags, at + 4);
  dst.writeUInt16BE(r.type, at + 6);
  if (typeof r.cookie === 'bigint') dst.writeBigUInt64BE(r.cookie, at + 8);
  else writeU64(dst, at + 8, r.cookie);
  writeU64(dst, at + 16, r.offset);
  dst.writeUInt32BE(r.length, at + 24);
}

/**
 * A fresh header per request: the socket keeps a reference until the bytes
 * are flushed, so a shared buffer would be overwritten under it. Small
 * allocUnsafe buffers come from Node's pool, so this is cheap.
 */
export function encodeRequest(r: RequestHeader): Buffer {
  const b = Buffer.allocUnsafe(REQUEST_SIZE);
  writeRequest(b, 0, r);
  return b;
}

// ---------------------------------------------------------------------------
// Transmission: reply parser

export interface BlockStatusExtent {
  length: number;
  flags: number;
}

/**
 * What the parser reports, in stream order. For one reply:
 *
 *   simple reply:      simple, data*, done
 *   structured chunk:  chunk, (data* | hole | blockStatus | error | unknown)?, done if flags has DONE
 *
 * `data` views alias the fed chunk: copy them before the callback returns if
 * they must outlive it. Offsets are absolute disk offsets.
 */
export type ReplyEvent =
  | { type: 'simple'; cookie: number; error: number }
  | { type: 'chunk'; cookie: number; flags: number; replyType: number; length: number }
  | { type: 'data'; cookie: number; offset: number; data: Buffer }
  | { type: 'hole'; cookie: number; offset: number; length: number }
  | { type: 'blockStatus'; cookie: number; contextId: number; extents: BlockStatusExtent[] }
  | { type: 'error'; cookie: number; replyType: number; error: number; message: string; offset?: number }
  | { type: 'unknown'; cookie: number; replyType: number; payload: Buffer }
  | { type: 'done'; cookie: number };

/** Where a successful simple READ reply's data goes: only the client knows the request's length. */
export interface ReadTarget {
  offset: number;
  length: number;
}

export interface ReplyParserOptions {
  /** Structured replies were negotiated: without them a structured chunk is a protocol error. */
  structuredReplies: boolean;
  /** The READ request behind a cookie, or undefined for any other command. */
  readTarget(cookie: number): ReadTarget | undefined;
  onEvent(event: ReplyEvent): void;
  /** Largest non-data chunk payload to buffer (default MAX_PAYLOAD). */
  maxChunkPayload?: number;
}

// Parser states. HEADER wants a 16- or 20-byte header (size known after the
// 4-byte magic); DATA_OFFSET wants the u64 that opens an OFFSET_DATA payload;
// DATA streams `remaining` bytes as data events; PAYLOAD collects `remaining`
// bytes and decodes the whole chunk payload; FAILED refuses everything.
const S = { HEADER: 0, DATA_OFFSET: 1, DATA: 2, PAYLOAD: 3, FAILED: 4 } as const;
type S = (typeof S)[keyof typeof S];

export class ReplyParser {
  private state: S = S.HEADER;
  private readonly scratch = Buffer.allocUnsafe(CHUNK_HEADER_SIZE); // straddling headers only
  private have = 0; // bytes of scratch filled
  private headerSize = 0; // 0 until the magic is known
  private cookie = 0;
  private flags = 0; // chunk flags; a simple reply behaves as one chunk with DONE
  private replyType = 0;
  private length = 0; // whole chunk payload length
  private remaining = 0;
  private cursor = 0; // disk offset of the next data byte
  private parts: Buffer[] = [];
  private failure: NbdProtocolError | undefined;
  private readonly maxChunkPayload: number;

  constructor(private readonly opts: ReplyParserOptions) {
    this.maxChunkPayload = opts.maxChunkPayload ?? MAX_PAYLOAD;
  }

  /** True between replies: closing the stream now loses no partial reply. */
  get idle(): boolean {
    return this.state === S.HEADER && this.have === 0;
  }

  /**
   * Bytes of the current data payload (a simple READ reply's data, or an
   * OFFSET_DATA chunk's after its offset) still to come; 0 anywhere else.
   * With dataCursor, where a reader may put them itself (then skipData()).
   */
  get dataRemaining(): number {
    return this.state === S.DATA ? this.remaining : 0;
  }

  /** Disk offset of the next data byte (meaningful while dataRemaining > 0). */
  get dataCursor(): number {
    return this.cursor;
  }

  /**
   * The reader placed the next n bytes of the data payload itself (read
   * straight into the READ's buffer): move past them as if fed, without a
   * data event; done follows when the payload and the reply are complete.
   */
  skipData(n: number): void {
    if (this.failure) throw this.failure;
    try {
      if (this.state !== S.DATA || n > this.remaining || n <= 0) {
        throw new NbdProtocolError(`skipData(${n}) outside a data payload (${this.state === S.DATA ? this.remaining : 0} bytes left)`);
      }
      this.cursor += n;
      this.remaining -= n;
      if (this.remaining === 0) this.endChunk();
    } catch (err) {
      // The stream's position is no longer known: refuse everything after.
      this.fail(err);
      throw err;
    }
  }

  /**
   * Consume one chunk from the socket (its first `end` bytes). Throws
   * NbdProtocolError (and refuses all later input) when the stream is
   * broken; errors thrown by onEvent propagate and likewise leave the parser
   * failed. The chunk may be reused once this returns: the parser keeps no
   * view of it (data events' views must be used before the callback returns).
   */
  feed(chunk: Buffer, end = chunk.length): void {
    if (this.failure) throw this.failure;
    try {
      this.consume(chunk, end);
    } catch (err) {
      this.fail(err);
      throw err;
    }
  }

  private fail(err: unknown): void {
    this.state = S.FAILED;
    this.failure = err instanceof NbdProtocolError ? err : new NbdProtocolError(`reply handler failed: ${String(err)}`, { cause: err });
  }

  private consume(chunk: Buffer, end: number): void {
    let pos = 0;
    while (pos < end) {
      switch (this.state) {
        case S.HEADER: {
          const avail = end - pos;
          if (this.have === 0 && avail >= 4) {
            const size = this.sizeFor(chunk.readUInt32BE(pos));
            if (avail >= size) {
              pos += size;
              this.header(chunk, pos - size);
              break;
            }
          }
          if (this.have < 4) {
            const n = Math.min(4 - this.have, avail);
            chunk.copy(this.scratch, this.have, pos, pos + n);
            this.have += n;
            pos += n;
            if (this.have < 4) break;
            this.headerSize = this.sizeFor(this.scratch.readUInt32BE(0));
          }
          const n = Math.min(this.headerSize - this.have, end - pos);
          chunk.copy(this.scratch, this.have, pos, pos + n);
          this.have += n;
          pos += n;
          if (this.have === this.headerSize) {
            this.have = 0;
            this.header(this.scratch, 0);
          }
          break;
        }
        case S.DATA_OFFSET: {
          if (this.have === 0 && end - pos >= 8) {
            this.cursor = readU64(chunk, pos, 'OFFSET_DATA offset');
            pos += 8;
          } else {
            const n = Math.min(8 - this.have, end - pos);
            chunk.copy(this.scratch, this.have, pos, pos + n);
            this.have += n;
            pos += n;
            if (this.have < 8) break;
            this.have = 0;
            this.cursor = readU64(this.scratch, 0, 'OFFSET_DATA offset');
          }
          this.state = S.DATA;
          break;
        }
        case S.DATA: {
          const n = Math.min(this.remaining, end - pos);
          const offset = this.cursor;
          this.cursor += n;
          this.remaining -= n;
          pos += n;
          this.opts.onEvent({ type: 'data', cookie: this.cookie, offset, data: chunk.subarray(pos - n, pos) });
          if (this.remaining === 0) this.endChunk();
          break;
        }
        case S.PAYLOAD: {
          const n = Math.min(this.remaining, end - pos);
          if (this.parts.length === 0 && n === this.length) {
            pos += n;
            this.remaining = 0;
            this.payload(chunk.subarray(pos - n, pos));
            break;
          }
          // A copy: the chunk may be a read buffer that is reused once feed() returns.
          this.parts.push(Buffer.copyBytesFrom(chunk, pos, n));
          this.remaining -= n;
          pos += n;
          if (this.remaining === 0) {
            const whole = Buffer.concat(this.parts, this.length);
            this.parts = [];
            this.payload(whole);
          }
          break;
        }
        case S.FAILED:
          throw this.failure ?? new NbdProtocolError('parser failed');
      }
    }
  }

  private sizeFor(magic: number): number {
    if (magic === SIMPLE_REPLY_MAGIC) return SIMPLE_REPLY_SIZE;
    if (magic === STRUCTURED_REPLY_MAGIC) {
      if (!this.opts.structuredReplies) throw new NbdProtocolError('structured reply chunk, but structured replies were not negotiated');
      return CHUNK_HEADER_SIZE;
    }
    throw new NbdProtocolError(`bad reply magic 0x${magic.toString(16).padStart(8, '0')}`);
  }

  private header(b: Buffer, at: number): void {
    if (b.readUInt32BE(at) === SIMPLE_REPLY_MAGIC) this.simpleHeader(b, at);
    else this.chunkHeader(b, at);
  }

  private simpleHeader(b: Buffer, at: number): void {
    const error = b.readUInt32BE(at + 4);
    const cookie = readCookie(b, at + 8);
    this.cookie = cookie;
    this.flags = ReplyFlag.DONE;
    this.opts.onEvent({ type: 'simple', cookie, error });
    const target = error === 0 ? this.opts.readTarget(cookie) : undefined;
    if (target && target.length > 0) {
      this.cursor = target.offset;
      this.remaining = target.length;
      this.state = S.DATA;
    } else {
      this.opts.onEvent({ type: 'done', cookie });
    }
  }

  private chunkHeader(b: Buffer, at: number): void {
    const flags = b.readUInt16BE(at + 4);
    const replyType = b.readUInt16BE(at + 6);
    const cookie = readCookie(b, at + 8);
    const length = b.readUInt32BE(at + 16);
    this.cookie = cookie;
    this.flags = flags;
    this.replyType = replyType;
    this.length = length;
    this.opts.onEvent({ type: 'chunk', cookie, flags, replyType, length });
    const bad = (why: string) =>
      new NbdProtocolError(`${nameOf('reply', replyType)} chunk for cookie ${cookie} ${why} (length ${length})`);
    switch (replyType) {
      case ReplyType.NONE:
        if (length !== 0) throw bad('has a payload');
        if (!(flags & ReplyFlag.DONE)) throw bad('lacks the DONE flag');
        return this.endChunk();
      case ReplyType.OFFSET_DATA:
        if (length < 9) throw bad('is too short');
        this.remaining = length - 8;
        this.state = S.DATA_OFFSET;
        return;
      case ReplyType.OFFSET_HOLE:
        if (length !== 12) throw bad('is not 12 bytes');
        break;
      case ReplyType.BLOCK_STATUS:
        if (length < 12 || (length - 4) % 8 !== 0) throw bad('is not 4 + 8n bytes with n >= 1');
        break;
      case ReplyType.ERROR_OFFSET:
        if (length < 14) throw bad('is too short');
        break;
      default:
        // ERROR and unknown error types share the 6-byte prefix (proto.md: decode unknown errors as ERROR).
        if (isErrorChunk(replyType) && length < 6) throw bad('is too short');
    }
    if (length > this.maxChunkPayload) throw bad(`exceeds ${this.maxChunkPayload} bytes`);
    if (length === 0) return this.payload(Buffer.alloc(0));
    this.remaining = length;
    this.state = S.PAYLOAD;
  }

  private payload(p: Buffer): void {
    const { cookie, replyType } = this;
    switch (replyType) {
      case ReplyType.OFFSET_HOLE: {
        const size = p.readUInt32BE(8);
        if (size === 0) throw new NbdProtocolError(`OFFSET_HOLE of size 0 for cookie ${cookie}`);
        this.opts.onEvent({ type: 'hole', cookie, offset: readU64(p, 0, 'OFFSET_HOLE offset'), length: size });
        break;
      }
      case ReplyType.BLOCK_STATUS: {
        const extents: BlockStatusExtent[] = new Array((p.length - 4) / 8);
        for (let i = 0, at = 4; at < p.length; i++, at += 8) {
          extents[i] = { length: p.readUInt32BE(at), flags: p.readUInt32BE(at + 4) };
        }
        this.opts.onEvent({ type: 'blockStatus', cookie, contextId: p.readUInt32BE(0), extents });
        break;
      }
      default: {
        if (!isErrorChunk(replyType)) {
          this.opts.onEvent({ type: 'unknown', cookie, replyType, payload: p });
          break;
        }
        const error = p.readUInt32BE(0);
        const msgLen = p.readUInt16BE(4);
        const tail = replyType === ReplyType.ERROR_OFFSET ? 8 : 0;
        if (error === 0) throw new NbdProtocolError(`${nameOf('reply', replyType)} chunk with error 0 for cookie ${cookie}`);
        const fits = replyType === ReplyType.ERROR_OFFSET ? 6 + msgLen + tail === p.length : 6 + msgLen <= p.length;
        if (!fits) throw new NbdProtocolError(`${nameOf('reply', replyType)} message length ${msgLen} does not fit its ${p.length}-byte chunk`);
        const message = p.toString('utf8', 6, 6 + msgLen);
        if (tail) {
          const offset = readU64(p, 6 + msgLen, 'ERROR_OFFSET offset');
          this.opts.onEvent({ type: 'error', cookie, replyType, error, message, offset });
        } else {
          this.opts.onEvent({ type: 'error', cookie, replyType, error, message });
        }
      }
    }
    this.endChunk();
  }

  private endChunk(): void {
    this.state = S.HEADER;
    if (this.flags & ReplyFlag.DONE) this.opts.onEvent({ type: 'done', cookie: this.cookie });
  }
}

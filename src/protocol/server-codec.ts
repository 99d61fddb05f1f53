// Server-side encoders and option-payload decoders, pure (no I/O).
import {
  CHUNK_HEADER_SIZE,
  IHAVEOPT,
  Info,
  NBDMAGIC,
  OPTION_REPLY_MAGIC,
  OPTION_REPLY_HEADER_SIZE,
  ReplyFlag,
  ReplyType,
  SIMPLE_REPLY_MAGIC,
  SIMPLE_REPLY_SIZE,
  STRUCTURED_REPLY_MAGIC,
} from './constants.js';

/** NBDMAGIC, IHAVEOPT, u16 handshake flags. */
export function encodeGreeting(handshakeFlags: number): Buffer {
  const b = Buffer.allocUnsafe(18);
  b.writeBigUInt64BE(NBDMAGIC, 0);
  b.writeBigUInt64BE(IHAVEOPT, 8);
  b.writeUInt16BE(handshakeFlags, 16);
  return b;
}

/** magic, u32 option, u32 reply type, u32 length, data. */
export function encodeOptionReply(option: number, type: number, data: Buffer = EMPTY): Buffer {
  const b = Buffer.allocUnsafe(OPTION_REPLY_HEADER_SIZE + data.length);
  b.writeBigUInt64BE(OPTION_REPLY_MAGIC, 0);
  b.writeUInt32BE(option, 8);
  b.writeUInt32BE(type >>> 0, 12);
  b.writeUInt32BE(data.length, 16);
  data.copy(b, OPTION_REPLY_HEADER_SIZE);
  return b;
}

const EMPTY = Buffer.alloc(0);

export const encodeString = (s: string): Buffer => Buffer.from(s, 'utf8');

/** REP_SERVER payload: u32 name length, name, description. */
export function encodeServerEntry(name: string, description: string): Buffer {
  const n = encodeString(name);
  const d = encodeString(description);
  const b = Buffer.allocUnsafe(4 + n.length + d.length);
  b.writeUInt32BE(n.length, 0);
  n.copy(b, 4);
  d.copy(b, 4 + n.length);
  return b;
}

export function encodeInfoExport(size: number, flags: number): Buffer {
  const b = Buffer.allocUnsafe(12);
  b.writeUInt16BE(Info.EXPORT, 0);
  b.writeBigUInt64BE(BigInt(size), 2);
  b.writeUInt16BE(flags, 10);
  return b;
}

export function encodeInfoString(type: number, s: string): Buffer {
  const v = encodeString(s);
  const b = Buffer.allocUnsafe(2 + v.length);
  b.writeUInt16BE(type, 0);
  v.copy(b, 2);
  return b;
}

export function encodeInfoBlockSize(min: number, preferred: number, max: number): Buffer {
  const b = Buffer.allocUnsafe(14);
  b.writeUInt16BE(Info.BLOCK_SIZE, 0);
  b.writeUInt32BE(min, 2);
  b.writeUInt32BE(preferred, 6);
  b.writeUInt32BE(max, 10);
  return b;
}

/** REP_META_CONTEXT payload: u32 id, name. */
export function encodeMetaContext(id: number, name: string): Buffer {
  const n = encodeString(name);
  const b = Buffer.allocUnsafe(4 + n.length);
  b.writeUInt32BE(id, 0);
  n.copy(b, 4);
  return b;
}

/** Reply to EXPORT_NAME: u64 size, u16 flags, then 124 zeroes unless NO_ZEROES. */
export function encodeExportNameReply(size: number, flags: number, noZeroes: boolean): Buffer {
  const b = Buffer.alloc(noZeroes ? 10 : 134);
  b.writeBigUInt64BE(BigInt(size), 0);
  b.writeUInt16BE(flags, 8);
  return b;
}

/**
 * Simple reply header into `b` at `at`: magic, u32 error, u64 cookie.
 * Callers preallocate header+payload so a READ goes out as one buffer.
 */
export function writeSimpleReply(b: Buffer, at: number, error: number, cookie: Buffer): void {
  b.writeUInt32BE(SIMPLE_REPLY_MAGIC, at);
  b.writeUInt32BE(error, at + 4);
  cookie.copy(b, at + 8);
}

export function encodeSimpleReply(error: number, cookie: Buffer): Buffer {
  const b = Buffer.allocUnsafe(SIMPLE_REPLY_SIZE);
  writeSimpleReply(b, 0, error, cookie);
  return b;
}

/** Structured chunk header into `b` at `at`: magic, u16 flags, u16 type, u64 cookie, u32 length. */
export function writeChunkHeader(b: Buffer, at: number, flags: number, type: number, cookie: Buffer, length: number): void {
  b.writeUInt32BE(STRUCTURED_REPLY_MAGIC, at);
  b.writeUInt16BE(flags, at + 4);
  b.writeUInt16BE(type, at + 6);
  cookie.copy(b, at + 8);
  b.writeUInt32BE(length, at + 16);
}

/** ERROR chunk (final): u32 error, u16 message length, message. */
export function encodeErrorChunk(cookie: Buffer, error: number, message: string): Buffer {
  const m = Buffer.from(message.slice(0, 1024), 'utf8');
  const b = Buffer.allocUnsafe(CHUNK_HEADER_SIZE + 6 + m.length);
  writeChunkHeader(b, 0, ReplyFlag.DONE, ReplyType.ERROR, cookie, 6 + m.length);
  b.writeUInt32BE(error, CHUNK_HEADER_SIZE);
  b.writeUInt16BE(m.length, CHUNK_HEADER_SIZE + 4);
  m.copy(b, CHUNK_HEADER_SIZE + 6);
  return b;
}

/** BLOCK_STATUS chunk (final): u32 context id, then (u32 length, u32 flags) per extent. */
export function encodeBlockStatusChunk(cookie: Buffer, contextId: number, extents: { length: number; flags: number }[]): Buffer {
  const len = 4 + 8 * extents.length;
  const b = Buffer.allocUnsafe(CHUNK_HEADER_SIZE + len);
  writeChunkHeader(b, 0, ReplyFlag.DONE, ReplyType.BLOCK_STATUS, cookie, len);
  b.writeUInt32BE(contextId, CHUNK_HEADER_SIZE);
  let at = CHUNK_HEADER_SIZE + 4;
  for (const e of extents) {
    b.writeUInt32BE(e.length, at);
    b.writeUInt32BE(e.flags, at + 4);
    at += 8;
  }
  return b;
}

// ---- option payload decoders ----

export class OptionFormatError extends Error {
  override readonly name = 'OptionFormatError';
}

export interface InfoRequest {
  name: string;
  requests: number[];
}

/** INFO/GO data: u32 name length, name, u16 n, n x u16 info type. */
export function decodeInfoRequest(d: Buffer): InfoRequest {
  if (d.length < 6) throw new OptionFormatError('INFO/GO data shorter than 6 bytes');
  const nameLen = d.readUInt32BE(0);
  if (nameLen > d.length - 6) throw new OptionFormatError('export name length exceeds option length');
  const name = d.toString('utf8', 4, 4 + nameLen);
  const n = d.readUInt16BE(4 + nameLen);
  if (d.length !== 6 + nameLen + 2 * n) throw new OptionFormatError('information request count does not match option length');
  const requests: number[] = [];
  for (let i = 0; i < n; i++) requests.push(d.readUInt16BE(6 + nameLen + 2 * i));
  return { name, requests };
}

export interface MetaContextRequest {
  name: string;
  queries: string[];
}

/** LIST/SET_META_CONTEXT data: u32 name length, name, u32 count, count x (u32 length, query). */
export function decodeMetaContextRequest(d: Buffer): MetaContextRequest {
  if (d.length < 8) throw new OptionFormatError('meta context data shorter than 8 bytes');
  const nameLen = d.readUInt32BE(0);
  if (nameLen > d.length - 8) throw new OptionFormatError('export name length exceeds option length');
  const name = d.toString('utf8', 4, 4 + nameLen);
  let at = 4 + nameLen;
  const count = d.readUInt32BE(at);
  at += 4;
  const queries: string[] = [];
  for (let i = 0; i < count; i++) {
    if (at + 4 > d.length) throw new OptionFormatError('query count exceeds option length');
    const qLen = d.readUInt32BE(at);
    at += 4;
    if (qLen > d.length - at) throw new OptionFormatError('query length exceeds option length');
    queries.push(d.toString('utf8', at, at + qLen));
    at += qLen;
  }
  if (at !== d.length) throw new OptionFormatError('trailing bytes after meta context queries');
  return { name, queries };
}

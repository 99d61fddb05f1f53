// The CFS wire protocol: one JSON object per line over TCP, both ways.
//
//   client -> server   {"id":7,"op":"open","path":"/a","mode":"r"}
//   server -> client   {"id":7,"ok":true,"handle":3,...}
//                      {"id":7,"ok":false,"code":"ENOENT","message":"no such file: /a"}
//
// Requests on one connection may be answered out of order (a commit waits for its journal fsync,
// a stat does not). Handles belong to the connection that opened them: when it closes, the server
// closes them (docs/cfs.md, "Opens that outlive their client").
//
// A file's allocation travels as extents [fileBlock, volBlock, count]: blocks fileBlock..+count of
// the file are blocks volBlock..+count of the pair's master volume (byte offset = volBlock * blockSize).
// That is the patent's block list (SS_ID, Vol_ID, Offset) run-length encoded; the SS and volume are
// the pair's master, given once.

export const CFS_PROTOCOL_VERSION = 1;

/** A line longer than this is a broken or hostile peer: the connection is closed. */
export const MAX_LINE = 16 * 1024 * 1024;

export type Extent = [fileBlock: number, volBlock: number, count: number];
/** A run of volume blocks handed out by `alloc`. */
export type VolRun = [volBlock: number, count: number];

export type FileType = 'file' | 'dir';

export interface VolumeAddress {
  ss: number;
  vol: number;
}

/** One copy of a pair: mirror 0 is the master, i is mirror i. */
export interface CopyRef extends VolumeAddress {
  mirror: number;
}

export interface StatReply {
  ino: number;
  type: FileType;
  size: number;
  /** Milliseconds since the epoch. */
  mtime: number;
  /** Allocated blocks (holes excluded). */
  blocks: number;
  pair?: string;
}

export interface DirEntry {
  name: string;
  type: FileType;
  size: number;
  mtime: number;
}

/** The file allocation list of an open file (`file_allocation_list` in Kodama's drawings), with the handle that holds it. */
export interface OpenReply {
  handle: number;
  ino: number;
  size: number;
  mtime: number;
  pair: string;
  blockSize: number;
  /** The copy this handle reads from. */
  copy: CopyRef;
  /** Writes always go here. */
  master: VolumeAddress;
  extents: Extent[];
}

export interface FileView {
  size: number;
  mtime: number;
  extents: Extent[];
}

export interface UsageCopy {
  ss: number;
  vol: number;
  role: 'master' | 'mirror';
  mirror: number;
  opens: number;
  opensTotal: number;
  /** Set while the copy is skipped after a client reported it failing. */
  failed?: boolean;
}

export interface UsageReport {
  pairs: { name: string; copies: UsageCopy[] }[];
}

export interface SpaceReport {
  blockSize: number;
  files: number;
  dirs: number;
  pairs: { name: string; totalBlocks: number; usedBlocks: number; freeBlocks: number; reservedBlocks: number; deferredBlocks: number }[];
}

export interface CheckReport {
  consistent: boolean;
  problems: string[];
}

export interface HelloReply {
  version: number;
  /** Changes on every server start: handles of an earlier boot are stale. */
  bootId: string;
  blockSize: number;
  storageSystems: { id: number; host: string; port: number }[];
}

/** What each op takes and answers. The id and op travel beside these. */
export interface Ops {
  hello: { args: { version: number; client: string; token?: string }; reply: HelloReply };
  ping: { args: Record<string, never>; reply: Record<string, never> };
  stat: { args: { path: string }; reply: StatReply };
  readdir: { args: { path: string }; reply: { entries: DirEntry[] } };
  mkdir: { args: { path: string; parents?: boolean }; reply: Record<string, never> };
  rmdir: { args: { path: string }; reply: Record<string, never> };
  unlink: { args: { path: string }; reply: Record<string, never> };
  rename: { args: { from: string; to: string }; reply: Record<string, never> };
  setmtime: { args: { path: string; mtime: number }; reply: Record<string, never> };
  /**
   * mode r: read; rw: read and write in place (copy-on-write per block, visible at commit);
   * replace: a new file that replaces `path` atomically at its first commit (put).
   * `ino` instead of `path` re-opens a file a client already had open (after a reconnect).
   */
  open: {
    args: { path?: string; ino?: number; mode: 'r' | 'rw' | 'replace'; create?: boolean; exclusive?: boolean; pair?: string };
    reply: OpenReply;
  };
  /** The current committed view of an open file (close-to-open for a handle kept open). */
  refresh: { args: { handle: number }; reply: FileView };
  /** The handle's copy failed: pick another one. */
  reopen: { args: { handle: number; failed: number }; reply: { copy: CopyRef } };
  /**
   * A write to the master failed in a way that says it may have moved (a swap, a takeover): look
   * at the pairs again and answer the pair's current master, and a current copy to read from.
   */
  where: { args: { handle: number }; reply: { master: VolumeAddress; copy: CopyRef } };
  /** Reserve `count` free blocks of the master volume for the handle; near `goal` if it can. */
  alloc: { args: { handle: number; count: number; goal?: number }; reply: { runs: VolRun[] } };
  /**
   * Make the handle's writes visible: map the extents (blocks from its reservations, data already
   * written and flushed on the master), cut the file to `trunc` blocks first if given, and set the size
   * (exactly with setSize, else grow only).
   */
  commit: { args: { handle: number; size: number; setSize?: boolean; trunc?: number; extents: Extent[] }; reply: FileView };
  close: { args: { handle: number }; reply: Record<string, never> };
  usage: { args: Record<string, never>; reply: UsageReport };
  space: { args: Record<string, never>; reply: SpaceReport };
  /** Consistency check of the allocation: no shared blocks, no block both used and free. */
  check: { args: Record<string, never>; reply: CheckReport };
}

export type OpName = keyof Ops;

export type Request = { [K in OpName]: { id: number; op: K } & Ops[K]['args'] }[OpName];

export type Reply = ({ id: number; ok: true } & Record<string, unknown>) | { id: number; ok: false; code: ErrorCode; message: string };

/** errno names the server answers with; the FUSE layer passes them on as they are. */
export const ERROR_CODES = [
  'ENOENT', 'EEXIST', 'ENOTDIR', 'EISDIR', 'ENOTEMPTY', 'EINVAL', 'ENOSPC', 'EBADF', 'ESTALE', 'EBUSY',
  'ENAMETOOLONG', 'EIO', 'EPROTO', 'ECONNRESET', 'ETIMEDOUT', 'EXDEV',
] as const;
export type ErrorCode = (typeof ERROR_CODES)[number];

/** A CFS operation failed. The message is one line meant for people: "no such file: /x". */
export class CfsError extends Error {
  override readonly name = 'CfsError';
  constructor(
    readonly code: ErrorCode,
    message: string,
    options?: { cause?: unknown },
  ) {
    super(message, options);
  }
}

export function isErrorCode(v: unknown): v is ErrorCode {
  return typeof v === 'string' && (ERROR_CODES as readonly string[]).includes(v);
}

/**
 * Splits a byte stream into lines. A line inside one chunk is handed on as a view; only a line that
 * straddles chunks is joined, once, with an exact-length concat.
 */
export class LineSplitter {
  private parts: Buffer[] = [];
  private held = 0;

  constructor(
    private readonly onLine: (line: Buffer) => void,
    private readonly max = MAX_LINE,
  ) {}

  feed(chunk: Buffer): void {
    let start = 0;
    for (;;) {
      const nl = chunk.indexOf(0x0a, start);
      if (nl < 0) break;
      if (this.held === 0) this.onLine(chunk.subarray(start, nl));
      else {
        this.parts.push(chunk.subarray(start, nl));
        const line = Buffer.concat(this.parts, this.held + nl - start);
        this.parts = [];
        this.held = 0;
        this.onLine(line);
      }
      start = nl + 1;
    }
    if (start < chunk.length) {
      this.parts.push(chunk.subarray(start));
      this.held += chunk.length - start;
      if (this.held > this.max) throw new CfsError('EPROTO', `a message longer than ${this.max} bytes`);
    }
  }
}

export function encodeLine(message: object): Buffer {
  return Buffer.from(`${JSON.stringify(message)}\n`);
}

/** "/a//b/./c/" -> "/a/b/c"; refuses "..", empty names and names that cannot be stored. */
/** PATH_MAX: a longer path is refused before it is split. */
export const MAX_PATH = 4096;

export function normalizePath(input: string): string {
  if (typeof input !== 'string' || input.length === 0) throw new CfsError('EINVAL', 'a path is required');
  if (Buffer.byteLength(input) > MAX_PATH) throw new CfsError('ENAMETOOLONG', `path longer than ${MAX_PATH} bytes`);
  if (input.includes('\0')) throw new CfsError('EINVAL', `invalid path ${JSON.stringify(input)}`);
  const names: string[] = [];
  for (const part of input.split('/')) {
    if (part === '' || part === '.') continue;
    if (part === '..') throw new CfsError('EINVAL', `invalid path ${input}: ".." is not allowed`);
    if (Buffer.byteLength(part) > 255) throw new CfsError('ENAMETOOLONG', `file name too long: ${part.slice(0, 40)}...`);
    names.push(part);
  }
  return `/${names.join('/')}`;
}

export function splitPath(p: string): string[] {
  return p === '/' ? [] : p.slice(1).split('/');
}

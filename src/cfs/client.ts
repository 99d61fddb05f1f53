// The CFS client library (the "CFS client" of Kodama's drawings): metadata requests to the CFS server over
// one connection, file data straight to and from the storage systems over NBD.
//
//   const cfs = await CfsClient.connect({ server: { host: '127.0.0.1', port: 7070 } });
//   await cfs.putFile('video.mp4', '/films/video.mp4');
//   const f = await cfs.open('/films/video.mp4');          // r, r+, w (atomic replace), wx
//   const n = await f.read(buf, 0);
//   await f.close();
//
// Opens belong to the connection: if it drops, the server closes them. With `reconnect` (the FUSE
// mount), the next request connects again and files with nothing uncommitted re-open by themselves.
import fs from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import type { Readable, Writable } from 'node:stream';
import { DataPath, type NbdAddress } from './datapath.js';
import { CfsFile, type FileHost, type OpenMode } from './file.js';
import {
  CFS_PROTOCOL_VERSION,
  CfsError,
  LineSplitter,
  encodeLine,
  isErrorCode,
  normalizePath,
  type CheckReport,
  type DirEntry,
  type HelloReply,
  type OpName,
  type Ops,
  type Reply,
  type SpaceReport,
  type StatReply,
  type UsageReport,
} from './protocol.js';

export { CfsError, CfsFile };
export type { DirEntry, OpenMode, StatReply, UsageReport, SpaceReport, CheckReport };

export interface CfsClientOptions {
  server: { host: string; port: number };
  /** The NBD address of a storage system; default: as the server's configuration gives it (a wildcard host becomes the server's host). */
  nbd?: (ss: number) => NbdAddress | undefined;
  /** Shown in the server's logs. */
  name?: string;
  /** Connect again after the connection to the server is lost (default false: requests then fail). */
  reconnect?: boolean;
  /** Per request to the server, and per NBD command (default 30 s). */
  timeoutMs?: number;
  /** NBD connections per export (default 2). */
  connectionsPerExport?: number;
  /** The server's token (cfs.tokenFile), when it asks for one. */
  token?: string;
  /** Speak TLS to the server and check its certificate against this CA (cfs.tls). */
  tlsCa?: Buffer;
}

export interface TransferOptions {
  /** Called as bytes move: done so far, and the total when known. */
  onProgress?: (done: number, total: number | undefined) => void;
  /** The pair to put a new file on (default: the one with the most free space). */
  pair?: string;
  /** Refuse to replace an existing file. */
  exclusive?: boolean;
}

/**
 * Bytes per request of put and get, and how many are in flight. What is in flight should fit in the
 * CPU's caches: each chunk is copied in by the kernel and out again (to the local file or the
 * socket) right after. 256 MiB in-process, 5 runs each, A B alternated: get 2 MiB x 4 150-180 ms
 * against 210-230 ms with 8 MiB x 4; put 160-190 ms against 200-215 ms (1 MiB x 8 and 4 MiB x 4
 * fell between the two).
 */
const CHUNK = 2 * 1024 * 1024;
const DEPTH = 4;
const DEFAULT_TIMEOUT_MS = 30_000;
/** The server drops a connection silent for 30 s; ping well within that. */
const PING_MS = 10_000;

class Rpc {
  private nextId = 1;
  private readonly pending = new Map<number, { resolve: (r: Record<string, unknown>) => void; reject: (e: Error) => void; timer: NodeJS.Timeout }>();
  private dead: CfsError | undefined;
  private readonly pinger: NodeJS.Timeout;

  private constructor(
    private readonly socket: net.Socket,
    private readonly where: string,
    private readonly timeoutMs: number,
    private readonly onLost: () => void,
  ) {
    const splitter = new LineSplitter((line) => this.onLine(line));
    socket.on('data', (chunk: Buffer) => {
      try {
        splitter.feed(chunk);
      } catch (e) {
        this.fail(new CfsError('EPROTO', `CFS server at ${where}: ${(e as Error).message}`));
      }
    });
    socket.on('error', (e) => this.fail(new CfsError('ECONNRESET', `lost the connection to the CFS server at ${where}: ${e.message}`)));
    socket.on('close', () => this.fail(new CfsError('ECONNRESET', `lost the connection to the CFS server at ${where}`)));
    this.pinger = setInterval(() => void this.call('ping', {}).catch(() => {}), PING_MS);
    this.pinger.unref();
  }

  static async connect(host: string, port: number, timeoutMs: number, onLost: () => void, tlsCa?: Buffer): Promise<Rpc> {
    const where = host.includes(':') ? `[${host}]:${port}` : `${host}:${port}`;
    // node:tls only when used: it costs every plain-TCP `cfs` command ~10 ms of start-up.
    const tls = tlsCa ? await import('node:tls') : undefined;
    return new Promise((resolve, reject) => {
      // With a CA, TLS: the server's certificate must be signed by it and name `host` (docs/SECURITY.md).
      const socket = tls && tlsCa ? tls.connect({ host, port, ca: tlsCa, ...(net.isIP(host) ? {} : { servername: host }) }) : net.connect({ host, port });
      const timer = setTimeout(() => socket.destroy(new Error(`no answer within ${timeoutMs} ms`)), timeoutMs);
      socket.once(tlsCa ? 'secureConnect' : 'connect', () => {
        clearTimeout(timer);
        socket.setNoDelay(true);
        socket.removeAllListeners('error');
        resolve(new Rpc(socket, where, timeoutMs, onLost));
      });
      socket.once('error', (e) => {
        clearTimeout(timer);
        reject(new CfsError('ECONNRESET', `cannot reach the CFS server at ${where}: ${(e as NodeJS.ErrnoException).code ?? e.message}`));
      });
    });
  }

  get alive(): boolean {
    return this.dead === undefined;
  }

  call<K extends OpName>(op: K, args: Ops[K]['args']): Promise<Ops[K]['reply']> {
    if (this.dead) return Promise.reject(this.dead);
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new CfsError('ETIMEDOUT', `${op}: the CFS server at ${this.where} did not answer within ${this.timeoutMs} ms`));
      }, this.timeoutMs);
      this.pending.set(id, { resolve: resolve as (r: Record<string, unknown>) => void, reject, timer });
      this.socket.write(encodeLine({ ...args, id, op }));
    });
  }

  close(): void {
    this.fail(new CfsError('ECONNRESET', 'the client is closed'));
  }

  private onLine(line: Buffer): void {
    let r: Reply;
    try {
      r = JSON.parse(line.toString('utf8')) as Reply;
    } catch {
      return this.fail(new CfsError('EPROTO', `CFS server at ${this.where} sent something that is not JSON`));
    }
    const p = this.pending.get(r.id);
    if (!p) return;
    this.pending.delete(r.id);
    clearTimeout(p.timer);
    if (r.ok) {
      const { id: _id, ok: _ok, ...result } = r;
      p.resolve(result);
    }
    else p.reject(new CfsError(isErrorCode(r.code) ? r.code : 'EIO', typeof r.message === 'string' ? r.message : 'the CFS server refused the request'));
  }

  private fail(err: CfsError): void {
    if (this.dead) return;
    this.dead = err;
    clearInterval(this.pinger);
    this.socket.destroy();
    for (const p of this.pending.values()) {
      clearTimeout(p.timer);
      p.reject(err);
    }
    this.pending.clear();
    this.onLost();
  }
}

export class CfsClient implements FileHost {
  readonly data: DataPath;
  private rpc: Rpc | undefined;
  private connecting: Promise<Rpc> | undefined;
  private gen = 0;
  private hello: HelloReply;
  private closed = false;

  private constructor(
    private readonly opts: CfsClientOptions,
    rpc: Rpc,
    hello: HelloReply,
  ) {
    this.rpc = rpc;
    this.hello = hello;
    this.data = new DataPath((ss) => this.nbdAddress(ss), {
      connections: opts.connectionsPerExport ?? 2,
      timeoutMs: opts.timeoutMs ?? DEFAULT_TIMEOUT_MS,
    });
  }

  static async connect(opts: CfsClientOptions): Promise<CfsClient> {
    let client: CfsClient | undefined;
    const { rpc, hello } = await CfsClient.open(opts, () => client?.lost());
    client = new CfsClient(opts, rpc, hello);
    return client;
  }

  private static async open(opts: CfsClientOptions, onLost: () => void): Promise<{ rpc: Rpc; hello: HelloReply }> {
    const rpc = await Rpc.connect(opts.server.host, opts.server.port, opts.timeoutMs ?? DEFAULT_TIMEOUT_MS, onLost, opts.tlsCa);
    try {
      const hello = await rpc.call('hello', { version: CFS_PROTOCOL_VERSION, client: opts.name ?? `${os.hostname()}:${process.pid}`, ...(opts.token ? { token: opts.token } : {}) });
      return { rpc, hello };
    } catch (e) {
      rpc.close();
      throw e;
    }
  }

  /** Bumped each time the server connection is lost: files opened before must open again. */
  get generation(): number {
    return this.gen;
  }

  get blockSize(): number {
    return this.hello.blockSize;
  }

  call<K extends OpName>(op: K, args: Ops[K]['args']): Promise<Ops[K]['reply']> {
    if (this.closed) return Promise.reject(new CfsError('EBADF', 'the CFS client is closed'));
    if (this.rpc?.alive) return this.rpc.call(op, args);
    if (!this.opts.reconnect) return this.rpc!.call(op, args); // rejects with why it was lost
    return this.reconnect().then((rpc) => rpc.call(op, args));
  }

  private lost(): void {
    this.gen++;
  }

  private reconnect(): Promise<Rpc> {
    this.connecting ??= CfsClient.open(this.opts, () => this.lost())
      .then(({ rpc, hello }) => {
        this.rpc = rpc;
        this.hello = hello;
        return rpc;
      })
      .finally(() => (this.connecting = undefined));
    return this.connecting;
  }

  private nbdAddress(ss: number): NbdAddress {
    const given = this.opts.nbd?.(ss);
    if (given) return given;
    const s = this.hello.storageSystems.find((x) => x.id === ss);
    if (!s) throw new CfsError('EIO', `the CFS server does not know storage system ${ss}`);
    const wildcard = s.host === '0.0.0.0' || s.host === '::';
    return { host: wildcard ? this.opts.server.host : s.host, port: s.port };
  }

  // -------------------------------------------------------------------------------------------
  // Namespace

  stat(path: string): Promise<StatReply> {
    return this.call('stat', { path: normalizePath(path) });
  }

  async readdir(path: string): Promise<DirEntry[]> {
    return (await this.call('readdir', { path: normalizePath(path) })).entries;
  }

  async mkdir(path: string, opts: { parents?: boolean } = {}): Promise<void> {
    await this.call('mkdir', { path: normalizePath(path), ...(opts.parents ? { parents: true } : {}) });
  }

  async rmdir(path: string): Promise<void> {
    await this.call('rmdir', { path: normalizePath(path) });
  }

  async unlink(path: string): Promise<void> {
    await this.call('unlink', { path: normalizePath(path) });
  }

  async rename(from: string, to: string): Promise<void> {
    await this.call('rename', { from: normalizePath(from), to: normalizePath(to) });
  }

  async setMtime(path: string, mtime: number): Promise<void> {
    await this.call('setmtime', { path: normalizePath(path), mtime });
  }

  async truncate(path: string, size: number): Promise<void> {
    const f = await this.open(path, 'r+');
    try {
      await f.truncate(size);
    } catch (e) {
      await f.close({ discard: true });
      throw e;
    }
    await f.close();
  }

  /**
   * r: read. r+: read and write an existing file (with `create`, make it if missing). w: a new file
   * that replaces `path` atomically when first synced or closed. wx: like w, but `path` must not exist.
   */
  async open(path: string, mode: OpenMode = 'r', opts: { create?: boolean; pair?: string } = {}): Promise<CfsFile> {
    const p = normalizePath(path);
    const wire = mode === 'r' ? 'r' : mode === 'r+' ? 'rw' : 'replace';
    const o = await this.call('open', {
      path: p,
      mode: wire,
      ...(mode === 'wx' ? { exclusive: true } : {}),
      ...(opts.create && mode === 'r+' ? { create: true } : {}),
      ...(opts.pair ? { pair: opts.pair } : {}),
    });
    return new CfsFile(this, p, mode, o);
  }

  usage(): Promise<UsageReport> {
    return this.call('usage', {});
  }

  space(): Promise<SpaceReport> {
    return this.call('space', {});
  }

  check(): Promise<CheckReport> {
    return this.call('check', {});
  }

  // -------------------------------------------------------------------------------------------
  // Whole files

  async readFile(path: string): Promise<Buffer> {
    const f = await this.open(path, 'r');
    try {
      const buf = Buffer.allocUnsafe(f.size);
      let at = 0;
      while (at < buf.length) at += await f.read(buf.subarray(at, Math.min(buf.length, at + CHUNK)), at);
      return buf;
    } finally {
      await f.close();
    }
  }

  async writeFile(path: string, data: Uint8Array, opts: TransferOptions = {}): Promise<void> {
    const f = await this.open(path, opts.exclusive ? 'wx' : 'w', opts.pair ? { pair: opts.pair } : {});
    try {
      await f.reserve(Math.ceil(data.length / f.blockSize));
      for (let at = 0; at < data.length; at += CHUNK) await f.write(data.subarray(at, Math.min(data.length, at + CHUNK)), at);
    } catch (e) {
      await f.close({ discard: true }).catch(() => {});
      throw e;
    }
    await f.close();
  }

  /**
   * Copy a local file (or a stream) into the CFS: blocks reserved up front (one contiguous run if the
   * pair has one), DEPTH chunks in flight, FLUSH, then one commit that makes the file appear whole.
   */
  async putFile(source: string | Readable, path: string, opts: TransferOptions = {}): Promise<number> {
    const f = await this.open(path, opts.exclusive ? 'wx' : 'w', opts.pair ? { pair: opts.pair } : {});
    let written = 0;
    try {
      if (typeof source === 'string') written = await this.putLocal(f, source, opts);
      else written = await this.putStream(f, source, opts);
    } catch (e) {
      await f.close({ discard: true }).catch(() => {});
      throw e;
    }
    await f.close();
    return written;
  }

  private async putLocal(f: CfsFile, local: string, opts: TransferOptions): Promise<number> {
    const fh = await openLocal(local, 'r');
    try {
      const { size } = await fh.stat();
      await f.reserve(Math.ceil(size / f.blockSize));
      let next = 0;
      let done = 0;
      const worker = async () => {
        const buf = Buffer.allocUnsafe(Math.min(CHUNK, Math.max(size, 1)));
        while (next < size) {
          const at = next;
          next += CHUNK;
          const n = Math.min(CHUNK, size - at);
          const { bytesRead } = await fh.read(buf, 0, n, at);
          if (bytesRead !== n) throw new CfsError('EIO', `${local} changed size while being copied`);
          await f.write(buf.subarray(0, n), at);
          done += n;
          opts.onProgress?.(done, size);
        }
      };
      await Promise.all(Array.from({ length: DEPTH }, worker));
      return size;
    } finally {
      await fh.close();
    }
  }

  private async putStream(f: CfsFile, stream: Readable, opts: TransferOptions): Promise<number> {
    let at = 0;
    let buf = Buffer.allocUnsafe(CHUNK);
    let fill = 0;
    const inFlight = new Set<Promise<void>>();
    const send = async (data: Buffer, pos: number) => {
      const p = f.write(data, pos).then(() => {
        inFlight.delete(p);
        opts.onProgress?.(pos + data.length, undefined);
      });
      inFlight.add(p);
      if (inFlight.size >= DEPTH) await Promise.race(inFlight);
    };
    for await (const chunk of stream as AsyncIterable<Buffer>) {
      let off = 0;
      while (off < chunk.length) {
        const n = Math.min(chunk.length - off, CHUNK - fill);
        chunk.copy(buf, fill, off, off + n);
        fill += n;
        off += n;
        if (fill === CHUNK) {
          await send(buf, at);
          at += CHUNK;
          buf = Buffer.allocUnsafe(CHUNK);
          fill = 0;
        }
      }
    }
    if (fill > 0) await send(buf.subarray(0, fill), at);
    await Promise.all(inFlight);
    return at + fill;
  }

  /** Copy a CFS file to a local file (positioned writes, DEPTH chunks in flight) or a stream (in order). */
  async getFile(path: string, target: string | Writable, opts: TransferOptions = {}): Promise<number> {
    const f = await this.open(path, 'r');
    try {
      const size = f.size;
      if (typeof target !== 'string') return await this.getStream(f, target, opts);
      const fh = await openLocal(target, 'w');
      try {
        let next = 0;
        let done = 0;
        const worker = async () => {
          const buf = Buffer.allocUnsafe(Math.min(CHUNK, Math.max(size, 1)));
          while (next < size) {
            const at = next;
            next += CHUNK;
            const n = await f.read(buf.subarray(0, Math.min(CHUNK, size - at)), at);
            await fh.write(buf, 0, n, at);
            done += n;
            opts.onProgress?.(done, size);
          }
        };
        await Promise.all(Array.from({ length: DEPTH }, worker));
        await fh.truncate(size);
      } finally {
        await fh.close();
      }
      return size;
    } finally {
      await f.close();
    }
  }

  /** In order, to a stream; a reader that goes away (EPIPE: `cfs cat | head`) ends it quietly. */
  private async getStream(f: CfsFile, out: Writable, opts: TransferOptions): Promise<number> {
    const size = f.size;
    let broken: Error | undefined;
    const onError = (e: Error) => (broken ??= e);
    out.on('error', onError);
    const reads: Promise<Buffer>[] = [];
    let issued = 0;
    const issue = () => {
      while (reads.length < DEPTH && issued < size) {
        const at = issued;
        const n = Math.min(CHUNK, size - at);
        issued += n;
        const buf = Buffer.allocUnsafe(n);
        const p = f.read(buf, at).then(() => buf);
        p.catch(() => {}); // awaited in order below; this only keeps an early failure from counting as unhandled
        reads.push(p);
      }
    };
    let done = 0;
    issue();
    try {
      while (reads.length > 0 && !broken) {
        const buf = await reads.shift()!;
        issue();
        if (!out.write(buf)) await new Promise<void>((resolve) => {
          const go = () => {
            out.off('drain', go);
            out.off('error', go);
            resolve();
          };
          out.on('drain', go);
          out.on('error', go);
        });
        done += buf.length;
        opts.onProgress?.(done, size);
      }
    } finally {
      out.off('error', onError);
      await Promise.allSettled(reads);
    }
    if (broken && (broken as NodeJS.ErrnoException).code !== 'EPIPE') throw new CfsError('EIO', `write failed: ${broken.message}`);
    return done;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.rpc?.close();
    await this.data.close();
  }
}

async function openLocal(file: string, flags: 'r' | 'w'): Promise<fs.FileHandle> {
  try {
    return await fs.open(file, flags);
  } catch (e) {
    const err = e as NodeJS.ErrnoException;
    if (err.code === 'ENOENT') throw new CfsError('ENOENT', flags === 'r' ? `no such local file: ${file}` : `cannot create ${file}: no such directory`);
    if (err.code === 'EISDIR') throw new CfsError('EISDIR', `is a directory: ${file}`);
    throw new CfsError('EIO', `${file}: ${err.message.replace(/^\w+: /, '')}`);
  }
}

// A deliberately dumb NBD client over a raw node:net socket, for tests that
// must send bytes no real client would (bad magic, unknown flags, truncated
// frames) and then look at exactly what comes back.
//
// Reading is pull-style: every `read(n)` waits until n bytes are queued, so a
// test reads the protocol in the order it expects it and a missing or extra
// byte shows up as a timeout or a wrong field, not as silent resync.
import net from 'node:net';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import type { ChildProcess } from 'node:child_process';
import {
  NBDMAGIC, IHAVEOPT, OPTION_REPLY_MAGIC, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC,
  HandshakeFlag, ClientFlag, Opt, Rep, Info, Cmd, ReplyFlag, ReplyType, BASE_ALLOCATION, isErrorReply, isErrorChunk,
  REQUEST_SIZE, SIMPLE_REPLY_SIZE, CHUNK_HEADER_SIZE, OPTION_HEADER_SIZE, OPTION_REPLY_HEADER_SIZE, nameOf,
} from '../../src/protocol/constants.js';
import { startServe, startNbdkit, run, ROOT, PYTHON, type RunningServer, type CmdResult } from './servers.js';

export class ConnectionClosedError extends Error {
  override name = 'ConnectionClosedError';
  constructor(wanted: number, had: number) {
    super(`connection closed while waiting for ${wanted} bytes (${had} queued)`);
  }
}

export class ReadTimeoutError extends Error {
  override name = 'ReadTimeoutError';
  constructor(wanted: number, had: number, ms: number) {
    super(`no ${wanted} bytes within ${ms} ms (${had} queued)`);
  }
}

/** FIFO of received chunks; `read(n)` hands out exactly n bytes, joined once. */
export class ByteQueue {
  private chunks: Buffer[] = [];
  private head = 0; // bytes of chunks[0] already consumed
  private queued = 0;
  private ended = false;
  private waiter: (() => void) | null = null;

  get length(): number { return this.queued; }

  push(b: Buffer): void {
    if (b.length === 0) return;
    this.chunks.push(b);
    this.queued += b.length;
    this.wake();
  }

  end(): void {
    this.ended = true;
    this.wake();
  }

  private wake(): void {
    const w = this.waiter;
    this.waiter = null;
    w?.();
  }

  private take(n: number): Buffer {
    const parts: Buffer[] = [];
    let left = n;
    while (left > 0) {
      const c = this.chunks[0];
      const avail = c.length - this.head;
      const k = Math.min(avail, left);
      parts.push(c.subarray(this.head, this.head + k));
      left -= k;
      if (k === avail) { this.chunks.shift(); this.head = 0; } else this.head += k;
    }
    this.queued -= n;
    return parts.length === 1 ? parts[0] : Buffer.concat(parts, n);
  }

  async read(n: number, timeoutMs = 5000): Promise<Buffer> {
    const deadline = Date.now() + timeoutMs;
    while (this.queued < n) {
      if (this.ended) throw new ConnectionClosedError(n, this.queued);
      const left = deadline - Date.now();
      if (left <= 0) throw new ReadTimeoutError(n, this.queued, timeoutMs);
      await new Promise<void>((resolve) => {
        const t = setTimeout(() => { this.waiter = null; resolve(); }, left);
        this.waiter = () => { clearTimeout(t); resolve(); };
      });
    }
    return this.take(n);
  }
}

export interface Endpoint { host: string; port: number }

export interface OptionReply { option: number; type: number; data: Buffer }

export interface InfoExport { size: bigint; flags: number }
export interface BlockSizes { minimum: number; preferred: number; maximum: number }

export interface GoResult {
  /** Final reply type: Rep.ACK on success, an ERR_* otherwise. */
  final: number;
  replies: OptionReply[];
  export?: InfoExport;
  name?: string;
  description?: string;
  blockSize?: BlockSizes;
}

export interface Request {
  type: number;
  flags?: number;
  cookie: bigint;
  offset?: bigint;
  length?: number;
  /** Bytes sent after the header (a WRITE's payload, or anything for hostile tests). */
  payload?: Buffer;
}

export interface Chunk { flags: number; type: number; cookie: bigint; payload: Buffer }

export interface Reply {
  cookie: bigint;
  /** 0 on success, else the NBD errno (from a simple reply or an ERROR chunk). */
  error: number;
  /** 'simple' or 'structured': which framing the server used. */
  kind: 'simple' | 'structured';
  /** READ data assembled from a simple reply or OFFSET_DATA/OFFSET_HOLE chunks. */
  data?: Buffer;
  /** Every structured chunk of this reply, in arrival order. */
  chunks: Chunk[];
}

const u32 = (v: number): Buffer => { const b = Buffer.alloc(4); b.writeUInt32BE(v >>> 0); return b; };
const u16 = (v: number): Buffer => { const b = Buffer.alloc(2); b.writeUInt16BE(v); return b; };

/** Data of INFO/GO: u32 name length, name, u16 n, n x u16 info requests. */
export function goData(name: string, infos: number[] = []): Buffer {
  const n = Buffer.from(name, 'utf8');
  return Buffer.concat([u32(n.length), n, u16(infos.length), ...infos.map(u16)]);
}

/** Data of LIST_/SET_META_CONTEXT: u32 name length, name, u32 count, count x (u32 length, query). */
export function metaContextData(name: string, queries: string[]): Buffer {
  const n = Buffer.from(name, 'utf8');
  const qs = queries.map((q) => Buffer.from(q, 'utf8'));
  return Buffer.concat([u32(n.length), n, u32(qs.length), ...qs.flatMap((q) => [u32(q.length), q])]);
}

/** IHAVEOPT, option, declared length (defaults to the data's), data. */
export function encodeOption(option: number, data: Buffer = Buffer.alloc(0), declaredLength = data.length): Buffer {
  const h = Buffer.alloc(OPTION_HEADER_SIZE);
  h.writeBigUInt64BE(IHAVEOPT, 0);
  h.writeUInt32BE(option >>> 0, 8);
  h.writeUInt32BE(declaredLength >>> 0, 12);
  return Buffer.concat([h, data]);
}

export function encodeRequest(r: Request): Buffer {
  const h = Buffer.alloc(REQUEST_SIZE);
  h.writeUInt32BE(REQUEST_MAGIC, 0);
  h.writeUInt16BE(r.flags ?? 0, 4);
  h.writeUInt16BE(r.type, 6);
  h.writeBigUInt64BE(r.cookie, 8);
  h.writeBigUInt64BE(r.offset ?? 0n, 16);
  h.writeUInt32BE(r.length ?? 0, 24);
  return r.payload ? Buffer.concat([h, r.payload]) : h;
}

export class RawClient {
  readonly queue = new ByteQueue();
  private closedFlag = false;
  readonly closed: Promise<void>;
  /** cookie -> READ range: frames simple READ replies and places structured data chunks. */
  private readonly reads = new Map<bigint, { offset: bigint; length: number; covered: number }>();
  private readonly partial = new Map<bigint, Reply>();
  readonly received: Reply[] = [];

  private constructor(readonly sock: net.Socket) {
    sock.setNoDelay(true);
    sock.on('data', (d: Buffer) => this.queue.push(d));
    // A hostile test expects the peer to slam the door: EPIPE/ECONNRESET are
    // just another way of seeing "closed".
    sock.on('error', () => {});
    this.closed = new Promise((resolve) => sock.once('close', () => {
      this.closedFlag = true;
      this.queue.end();
      resolve();
    }));
    sock.once('end', () => this.queue.end());
  }

  static connect(ep: Endpoint, timeoutMs = 5000): Promise<RawClient> {
    return new Promise((resolve, reject) => {
      const sock = net.connect({ host: ep.host, port: ep.port });
      const t = setTimeout(() => { sock.destroy(); reject(new Error(`connect to ${ep.host}:${ep.port} timed out`)); }, timeoutMs);
      sock.once('error', (e) => { clearTimeout(t); reject(e); });
      sock.once('connect', () => { clearTimeout(t); sock.removeAllListeners('error'); resolve(new RawClient(sock)); });
    });
  }

  get isClosed(): boolean { return this.closedFlag; }

  /** True if the server closed the connection within `ms` (bytes it sent meanwhile are kept in the queue). */
  async waitClosed(ms = 3000): Promise<boolean> {
    let t: NodeJS.Timeout | undefined;
    const timeout = new Promise<false>((resolve) => { t = setTimeout(() => resolve(false), ms); });
    const r = await Promise.race([this.closed.then(() => true as const), timeout]);
    clearTimeout(t);
    return r;
  }

  write(b: Buffer): void {
    if (!this.sock.destroyed && this.sock.writable) this.sock.write(b);
  }

  /** Resolves once `b` is handed to the kernel (or the socket died). */
  writeAndDrain(b: Buffer): Promise<void> {
    return new Promise((resolve) => {
      if (this.sock.destroyed || !this.sock.writable) { resolve(); return; }
      this.sock.write(b, () => resolve());
    });
  }

  read(n: number, timeoutMs = 5000): Promise<Buffer> { return this.queue.read(n, timeoutMs); }

  destroy(): void { this.sock.destroy(); }

  // ---- handshake -------------------------------------------------------

  /** Reads NBDMAGIC, IHAVEOPT, u16 handshake flags; returns the flags. */
  async readGreeting(): Promise<number> {
    const g = await this.read(18);
    const magic = g.readBigUInt64BE(0);
    const ihaveopt = g.readBigUInt64BE(8);
    if (magic !== NBDMAGIC) throw new Error(`bad server magic 0x${magic.toString(16)}`);
    if (ihaveopt !== IHAVEOPT) throw new Error(`not newstyle: 0x${ihaveopt.toString(16)}`);
    return g.readUInt16BE(16);
  }

  sendClientFlags(flags: number): void { this.write(u32(flags)); }

  /** IHAVEOPT, option, declared length, then `data` (which may be shorter or longer than declared). */
  sendRawOption(option: number, declaredLength: number, data: Buffer = Buffer.alloc(0)): void {
    this.write(encodeOption(option, data, declaredLength));
  }

  sendOption(option: number, data: Buffer = Buffer.alloc(0)): void {
    this.sendRawOption(option, data.length, data);
  }

  async readOptionReply(timeoutMs = 5000): Promise<OptionReply> {
    const h = await this.read(OPTION_REPLY_HEADER_SIZE, timeoutMs);
    const magic = h.readBigUInt64BE(0);
    if (magic !== OPTION_REPLY_MAGIC) throw new Error(`bad option reply magic 0x${magic.toString(16)}`);
    const option = h.readUInt32BE(8);
    const type = h.readUInt32BE(12);
    const len = h.readUInt32BE(16);
    const data = len ? await this.read(len, timeoutMs) : Buffer.alloc(0);
    return { option, type, data };
  }

  /** Reads replies to one option up to and including the final one (ACK or an error). */
  async optionReplies(timeoutMs = 5000): Promise<OptionReply[]> {
    const out: OptionReply[] = [];
    for (;;) {
      const r = await this.readOptionReply(timeoutMs);
      out.push(r);
      if (r.type === Rep.ACK || isErrorReply(r.type)) return out;
    }
  }

  /** One option, all its replies. */
  async option(option: number, data?: Buffer): Promise<OptionReply[]> {
    this.sendOption(option, data);
    return this.optionReplies();
  }

  /** INFO or GO for `name`; parses the INFO replies. On ACK after GO, transmission has begun. */
  async go(name: string, infos: number[] = [Info.NAME, Info.DESCRIPTION, Info.BLOCK_SIZE], option: number = Opt.GO): Promise<GoResult> {
    const replies = await this.option(option, goData(name, infos));
    const res: GoResult = { final: replies[replies.length - 1].type, replies };
    for (const r of replies) {
      if (r.type !== Rep.INFO) continue;
      const t = r.data.readUInt16BE(0);
      if (t === Info.EXPORT) res.export = { size: r.data.readBigUInt64BE(2), flags: r.data.readUInt16BE(10) };
      else if (t === Info.NAME) res.name = r.data.subarray(2).toString('utf8');
      else if (t === Info.DESCRIPTION) res.description = r.data.subarray(2).toString('utf8');
      else if (t === Info.BLOCK_SIZE) {
        res.blockSize = { minimum: r.data.readUInt32BE(2), preferred: r.data.readUInt32BE(6), maximum: r.data.readUInt32BE(10) };
      }
    }
    return res;
  }

  /** EXPORT_NAME; reads size, flags and (unless `noZeroes`) the 124 zero bytes. */
  async exportName(name: string, noZeroes: boolean, timeoutMs = 5000): Promise<InfoExport & { zeroes?: Buffer }> {
    this.sendOption(Opt.EXPORT_NAME, Buffer.from(name, 'utf8'));
    const b = await this.read(10, timeoutMs);
    const res: InfoExport & { zeroes?: Buffer } = { size: b.readBigUInt64BE(0), flags: b.readUInt16BE(8) };
    if (!noZeroes) res.zeroes = await this.read(124, timeoutMs);
    return res;
  }

  // ---- transmission ----------------------------------------------------

  /** Registers a READ sent some other way (inside a hand-made buffer) so its reply can be framed. */
  noteRead(r: Request): void {
    if (r.type === Cmd.READ) this.reads.set(r.cookie, { offset: r.offset ?? 0n, length: r.length ?? 0, covered: 0 });
  }

  sendRequest(r: Request): void {
    this.noteRead(r);
    this.write(encodeRequest(r));
  }

  /** Encodes many requests into one buffer (one write() call: pipelining). */
  sendRequests(rs: Request[]): void {
    rs.forEach((r) => this.noteRead(r));
    this.write(Buffer.concat(rs.map(encodeRequest)));
  }

  /** Sends requests one byte per write (each its own TCP segment, thanks to NO_DELAY), to test reassembly. */
  async dribble(rs: Request[]): Promise<void> {
    rs.forEach((r) => this.noteRead(r));
    for (const b of Buffer.concat(rs.map(encodeRequest))) {
      await this.writeAndDrain(Buffer.from([b]));
      await new Promise((r) => setImmediate(r));
    }
  }

  /** Next complete reply, whichever cookie it belongs to (structured chunks are collected until DONE). */
  async nextReply(timeoutMs = 5000): Promise<Reply> {
    for (;;) {
      const m = (await this.read(4, timeoutMs)).readUInt32BE(0);
      if (m === SIMPLE_REPLY_MAGIC) {
        const h = await this.read(SIMPLE_REPLY_SIZE - 4, timeoutMs);
        const error = h.readUInt32BE(0);
        const cookie = h.readBigUInt64BE(4);
        if (this.partial.has(cookie)) throw new Error(`simple reply for cookie ${cookie} after structured chunks`);
        const rd = this.reads.get(cookie);
        this.reads.delete(cookie);
        const reply: Reply = { cookie, error, kind: 'simple', chunks: [] };
        if (rd && error === 0) reply.data = rd.length ? await this.read(rd.length, timeoutMs) : Buffer.alloc(0);
        this.received.push(reply);
        return reply;
      }
      if (m !== STRUCTURED_REPLY_MAGIC) throw new Error(`bad reply magic 0x${m.toString(16)}`);
      const h = await this.read(CHUNK_HEADER_SIZE - 4, timeoutMs);
      const flags = h.readUInt16BE(0);
      const type = h.readUInt16BE(2);
      const cookie = h.readBigUInt64BE(4);
      const len = h.readUInt32BE(12);
      const payload = len ? await this.read(len, timeoutMs) : Buffer.alloc(0);
      let reply = this.partial.get(cookie);
      const rd = this.reads.get(cookie);
      if (!reply) {
        reply = { cookie, error: 0, kind: 'structured', chunks: [] };
        if (rd) reply.data = Buffer.alloc(rd.length);
        this.partial.set(cookie, reply);
      }
      reply.chunks.push({ flags, type, cookie, payload });
      if (isErrorChunk(type)) {
        if (reply.error === 0) reply.error = payload.readUInt32BE(0);
      } else if (type === ReplyType.OFFSET_DATA || type === ReplyType.OFFSET_HOLE) {
        if (!rd || !reply.data) throw new Error(`${nameOf('reply', type)} chunk for cookie ${cookie}, which is not a READ`);
        const at = payload.readBigUInt64BE(0) - rd.offset;
        const n = type === ReplyType.OFFSET_DATA ? payload.length - 8 : payload.readUInt32BE(8);
        if (at < 0n || at + BigInt(n) > BigInt(rd.length) || n === 0) {
          throw new Error(`${nameOf('reply', type)} chunk [${at}, +${n}) outside READ ${rd.offset}+${rd.length} (cookie ${cookie})`);
        }
        if (type === ReplyType.OFFSET_DATA) payload.copy(reply.data, Number(at), 8);
        else reply.data.fill(0, Number(at), Number(at) + n);
        rd.covered += n;
      }
      if (flags & ReplyFlag.DONE) {
        this.partial.delete(cookie);
        this.reads.delete(cookie);
        if (reply.error !== 0) delete reply.data;
        else if (rd && rd.covered !== rd.length) {
          throw new Error(`successful READ ${rd.offset}+${rd.length} (cookie ${cookie}) covered ${rd.covered} bytes`);
        }
        this.received.push(reply);
        return reply;
      }
    }
  }

  /** Sends one request and waits for its reply (no other request may be in flight). */
  async request(r: Request, timeoutMs = 5000): Promise<Reply> {
    this.sendRequest(r);
    const reply = await this.nextReply(timeoutMs);
    if (reply.cookie !== r.cookie) throw new Error(`reply cookie ${reply.cookie} != request cookie ${r.cookie}`);
    return reply;
  }

  /** DISC, then wait for the server to close. */
  async disconnect(): Promise<void> {
    this.sendRequest({ type: Cmd.DISC, cookie: 0n });
    await this.waitClosed(2000);
    this.destroy();
  }
}

export interface Session {
  client: RawClient;
  size: bigint;
  flags: number;
  go: GoResult;
}

/**
 * Fixed newstyle + NO_ZEROES handshake, optional STRUCTURED_REPLY and
 * SET_META_CONTEXT base:allocation, then GO. Throws if anything is refused.
 */
export async function openSession(ep: Endpoint, opts: { name?: string; structured?: boolean; metaContext?: boolean } = {}): Promise<Session> {
  const client = await RawClient.connect(ep);
  try {
    const hs = await client.readGreeting();
    if (!(hs & HandshakeFlag.FIXED_NEWSTYLE)) throw new Error(`server did not offer fixed newstyle (flags ${hs})`);
    client.sendClientFlags(ClientFlag.C_FIXED_NEWSTYLE | (hs & HandshakeFlag.NO_ZEROES ? ClientFlag.C_NO_ZEROES : 0));
    const name = opts.name ?? '';
    if (opts.structured || opts.metaContext) {
      const r = await client.option(Opt.STRUCTURED_REPLY);
      if (r[r.length - 1].type !== Rep.ACK) throw new Error(`STRUCTURED_REPLY refused: ${nameOf('rep', r[r.length - 1].type)}`);
    }
    if (opts.metaContext) {
      const r = await client.option(Opt.SET_META_CONTEXT, metaContextData(name, [BASE_ALLOCATION]));
      const ok = r.some((x) => x.type === Rep.META_CONTEXT && x.data.subarray(4).toString() === BASE_ALLOCATION);
      if (!ok || r[r.length - 1].type !== Rep.ACK) throw new Error(`SET_META_CONTEXT ${BASE_ALLOCATION} not granted`);
    }
    const go = await client.go(name);
    if (go.final !== Rep.ACK || !go.export) throw new Error(`GO "${name}" failed: ${nameOf('rep', go.final)}`);
    return { client, size: go.export.size, flags: go.export.flags, go };
  } catch (e) {
    client.destroy();
    throw e;
  }
}

/** Reads `length` bytes at `offset` on an open session; throws on an error reply. */
export async function readAt(c: RawClient, offset: bigint, length: number, cookie = 1n): Promise<Buffer> {
  const r = await c.request({ type: Cmd.READ, cookie, offset, length });
  if (r.error !== 0) throw new Error(`READ ${offset}+${length}: ${nameOf('err', r.error)}`);
  return r.data ?? Buffer.alloc(0);
}

export async function writeAt(c: RawClient, offset: bigint, data: Buffer, cookie = 2n, flags = 0): Promise<void> {
  const r = await c.request({ type: Cmd.WRITE, cookie, offset, length: data.length, payload: data, flags });
  if (r.error !== 0) throw new Error(`WRITE ${offset}+${data.length}: ${nameOf('err', r.error)}`);
}

// ---- targets ---------------------------------------------------------------

export interface Target extends Endpoint {
  kind: 'serve' | 'nbdkit';
  /** The export every client should name ('disk'). */
  exportName: string;
  /** nbd://host:port/disk */
  uri: string;
  size: bigint;
  description: string;
  readOnly: boolean;
  server: RunningServer;
  proc: ChildProcess;
  alive(): boolean;
  stop(): Promise<number | null>;
}

/**
 * The server under test: `blockmirror serve` unless BM_TARGET=nbdkit, which
 * starts an nbdkit memory export shaped like serve's (one export named
 * 'disk', '' mapped to it, others refused, a description) so the tests
 * themselves can be checked against the reference server.
 */
export async function startTarget(opts: {
  sizeMiB: number; readOnly?: boolean; description?: string; kind?: 'serve' | 'nbdkit';
  /** Back the export with this (new) file instead of memory. */
  file?: string;
}): Promise<Target> {
  const kind = opts.kind ?? (process.env.BM_TARGET === 'nbdkit' ? 'nbdkit' : 'serve');
  const description = opts.description ?? 'blockmirror test volume';
  let server: RunningServer;
  if (kind === 'serve') {
    const args = ['--size', `${opts.sizeMiB}MiB`, '--name', 'disk', '--description', description];
    if (opts.readOnly) args.push('--read-only');
    if (opts.file) args.push('--file', opts.file);
    server = await startServe(args);
  } else {
    if (opts.file) {
      fs.writeFileSync(opts.file, '');
      fs.truncateSync(opts.file, opts.sizeMiB * 1024 * 1024);
    }
    server = await startNbdkit([
      ...(opts.readOnly ? ['-r'] : []),
      '--filter=exportname', ...(opts.file ? ['file', opts.file] : ['memory', `${opts.sizeMiB}M`]),
      'exportname-list=explicit', 'exportname-strict=true', 'exportname=disk', 'exportname=',
      'default-export=disk', `exportdesc=fixed:${description}`,
    ]);
  }
  const proc = server.proc;
  return {
    kind, host: server.host, port: server.port, exportName: 'disk', uri: `nbd://${server.host}:${server.port}/disk`, size: BigInt(opts.sizeMiB) * 1024n * 1024n,
    description, readOnly: opts.readOnly ?? false, server, proc,
    alive: () => proc.exitCode === null && proc.signalCode === null,
    stop: () => server.stop(),
  };
}

/**
 * Proves the server still works for a well-behaved newcomer: a fresh
 * connection writes random bytes at a random 4 KiB-aligned offset and reads
 * them back (only reads on a read-only export). Throws with a readable message otherwise.
 */
export async function assertHealthy(t: Target): Promise<void> {
  if (!t.alive()) throw new Error(`server process died (exit ${t.proc.exitCode}, signal ${t.proc.signalCode}): ${t.server.stderr().slice(-2000)}`);
  const s = await openSession(t, { name: t.exportName, structured: true });
  try {
    const blocks = Number(t.size / 4096n) - 1;
    const offset = BigInt(Math.floor(Math.random() * blocks) * 4096);
    if (t.readOnly) {
      await readAt(s.client, offset, 4096, 0xbeefn);
    } else {
      const data = randomBytes(4096);
      await writeAt(s.client, offset, data, 0xfeedn);
      const back = await readAt(s.client, offset, 4096, 0xbeefn);
      if (!back.equals(data)) throw new Error(`fresh client read back different bytes at ${offset}`);
    }
  } finally {
    await s.client.disconnect();
  }
  if (!t.alive()) throw new Error('server process died during the health check');
}

/** Resident set size of a process in bytes (Linux /proc). */
export async function rssBytes(pid: number): Promise<number> {
  const { readFile } = await import('node:fs/promises');
  const s = await readFile(`/proc/${pid}/status`, 'utf8');
  const m = /VmRSS:\s+(\d+) kB/.exec(s);
  if (!m) throw new Error(`no VmRSS for pid ${pid}`);
  return Number(m[1]) * 1024;
}

// ---- python3-libnbd probes (test/py/*.py) -----------------------------------

export const PY_DIR = path.join(ROOT, 'test/py');

/** Fails (never skips) with a clear message when Debian's python3-libnbd is missing. */
export async function requireLibnbdPython(): Promise<void> {
  let r: CmdResult;
  try {
    r = await run(PYTHON, ['-c', 'import nbd; print(nbd.NBD().get_version())']);
  } catch (e) {
    throw new Error(`${PYTHON} cannot be run (${(e as Error).message}): install python3 and python3-libnbd`);
  }
  if (r.code !== 0) throw new Error(`${PYTHON} cannot import nbd: install python3-libnbd (apt-get install python3-libnbd)\n${r.stderr}`);
}

/** Runs test/py/SCRIPT with ARGS and returns the JSON it printed; throws with its stderr if it failed. */
export async function runPy<T = unknown>(script: string, args: string[]): Promise<T> {
  const r = await run(PYTHON, [path.join(PY_DIR, script), ...args], { env: { PYTHONDONTWRITEBYTECODE: '1' }, timeoutMs: 20_000 });
  if (r.code !== 0) throw new Error(`${script} ${args.join(' ')} exited with ${r.code}:\n${r.stderr}`);
  const lines = r.stdout.trim().split('\n');
  return JSON.parse(lines[lines.length - 1]) as T;
}

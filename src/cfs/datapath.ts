// The client's data path: NBD connections straight to the storage systems (Kodama's drawings, "data
// I/O request"), cached per export (vol<ID> of a storage system) and shared by every open file.
// A connection that dies leaves the cache, so the next request reconnects or fails over.
//
// With a read worker (the FUSE mount), reads into shared memory are done by a worker thread with its
// own connections: receiving and parsing megabytes of replies then never holds up the event loop
// that answers the kernel's FUSE requests.
import { createRequire } from 'node:module';
import type { Worker } from 'node:worker_threads';
import { connect, NbdConnectionError, NbdError, NbdOptionError, NbdProtocolError, NbdTimeoutError, type NbdClient } from '../nbd/client.js';
import { CfsError, type VolumeAddress } from './protocol.js';
import type { ClientTls } from '../nbd/tls.js';
import { currentExportName } from '../controller/current-copy.js';

export interface NbdAddress {
  host: string;
  port: number;
  /** STARTTLS with these credentials (a storage system with tls: require). */
  tls?: ClientTls;
}

export interface DataPathOptions {
  /** Connections per export; requests are spread over them round-robin. */
  connections: number;
  /** Per NBD command: a storage system that hangs this long counts as failed. */
  timeoutMs: number;
}

export class DataPath {
  private readonly lanes = new Map<string, { conns: (Promise<NbdClient> | undefined)[]; next: number }>();
  private closed = false;
  private workers: ReadWorker[] = [];
  private nextWorker = 0;

  constructor(
    private readonly address: (ss: number) => NbdAddress,
    private readonly opts: DataPathOptions,
  ) {}

  /** A connection to export vol<vol> of storage system `ss`. */
  get(at: VolumeAddress): Promise<NbdClient> {
    if (this.closed) return Promise.reject(new CfsError('EIO', 'the client is closed'));
    const key = `${at.ss}/${at.vol}`;
    let lane = this.lanes.get(key);
    if (!lane) {
      lane = { conns: new Array(this.opts.connections).fill(undefined), next: 0 };
      this.lanes.set(key, lane);
    }
    const i = lane.next;
    lane.next = (i + 1) % lane.conns.length;
    const cached = lane.conns[i];
    if (cached) return cached;
    const addr = this.address(at.ss);
    // The `@current` export fails instead of serving a copy that is no longer current (current-copy.ts).
    const p = connect({ host: addr.host, port: addr.port, exportName: currentExportName(at.vol), timeoutMs: this.opts.timeoutMs, handshakeTimeoutMs: Math.min(this.opts.timeoutMs, 10_000), ...(addr.tls ? { tls: addr.tls } : {}) });
    const l = lane;
    l.conns[i] = p;
    p.then(
      (c) => void c.closed.then(() => l.conns[i] === p && (l.conns[i] = undefined)),
      () => l.conns[i] === p && (l.conns[i] = undefined),
    );
    return p;
  }

  /** Read dest.length bytes at `offset` of the export into `dest`. */
  async pread(at: VolumeAddress, dest: Buffer, offset: number): Promise<void> {
    if (this.workers.length > 0 && dest.buffer instanceof SharedArrayBuffer) {
      const w = this.workers[this.nextWorker++ % this.workers.length]!;
      return w.pread(this.address(at.ss), at, dest, offset);
    }
    const c = await this.get(at);
    await c.pread(dest, offset);
  }

  async pwrite(at: VolumeAddress, data: Uint8Array, offset: number): Promise<void> {
    const c = await this.get(at);
    await c.pwrite(data, offset);
  }

  /** From now on, reads into SharedArrayBuffer memory go through `count` worker threads, round-robin. */
  useReadWorkers(count = 1): void {
    while (this.workers.length < count) this.workers.push(new ReadWorker(this.opts));
  }

  /** FLUSH the export: with CAN_MULTI_CONN one flush covers writes acknowledged on every connection. */
  async flush(at: VolumeAddress): Promise<void> {
    const c = await this.get(at);
    await c.flush();
  }

  /** Forget the connections to an export (after a failure), closing them. */
  drop(at: VolumeAddress): void {
    const lane = this.lanes.get(`${at.ss}/${at.vol}`);
    if (!lane) return;
    for (const p of lane.conns) p?.then((c) => c.close(), () => {});
    lane.conns.fill(undefined);
  }

  /** Forget the connections to an export everywhere, the read worker's included. */
  dropAll(at: VolumeAddress): void {
    this.drop(at);
    for (const w of this.workers) w.drop(at);
  }

  async close(): Promise<void> {
    this.closed = true;
    const all = [...this.lanes.values()].flatMap((l) => l.conns.filter((p): p is Promise<NbdClient> => p !== undefined));
    this.lanes.clear();
    await Promise.all([...all.map((p) => p.then((c) => c.disconnect(), () => {})), ...this.workers.map((w) => w.close())]);
  }
}

/** A read the worker could not do; `copyFailure` as isCopyFailure() judged it there. */
export class WorkerReadError extends Error {
  override readonly name = 'WorkerReadError';
  constructor(
    message: string,
    readonly copyFailure: boolean,
    readonly code: string,
  ) {
    super(message);
  }
}

export interface WorkerRequest {
  id: number;
  op: 'read' | 'drop';
  ss: number;
  vol: number;
  host?: string;
  port?: number;
  tls?: ClientTls;
  sab?: SharedArrayBuffer;
  byteOffset?: number;
  length?: number;
  offset?: number;
}

export interface WorkerReply {
  id: number;
  error?: { message: string; copyFailure: boolean; code: string };
}

/** The main thread's side of read-worker.ts. */
class ReadWorker {
  private readonly worker: Worker;
  private readonly pending = new Map<number, { resolve: () => void; reject: (e: Error) => void }>();
  private nextId = 1;
  private dead: Error | undefined;

  constructor(opts: DataPathOptions) {
    // node:worker_threads only here: only the FUSE mount has read workers, and loading the module
    // cost every `cfs get`/`put`/`ls` ~8 ms at start (issue 18).
    const { Worker: WorkerClass } = createRequire(import.meta.url)('node:worker_threads') as typeof import('node:worker_threads');
    this.worker = new WorkerClass(new URL('./read-worker.js', import.meta.url), { workerData: opts });
    this.worker.unref();
    this.worker.on('message', (r: WorkerReply) => {
      const p = this.pending.get(r.id);
      if (!p) return;
      this.pending.delete(r.id);
      if (r.error) p.reject(new WorkerReadError(r.error.message, r.error.copyFailure, r.error.code));
      else p.resolve();
    });
    this.worker.on('error', (e) => this.fail(e));
    this.worker.on('exit', () => this.fail(new Error('the read worker stopped')));
  }

  pread(addr: NbdAddress, at: VolumeAddress, dest: Buffer, offset: number): Promise<void> {
    if (this.dead) return Promise.reject(new CfsError('EIO', this.dead.message));
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      const req: WorkerRequest = { id, op: 'read', ss: at.ss, vol: at.vol, host: addr.host, port: addr.port, ...(addr.tls ? { tls: addr.tls } : {}), sab: dest.buffer as SharedArrayBuffer, byteOffset: dest.byteOffset, length: dest.length, offset };
      this.worker.postMessage(req);
    });
  }

  drop(at: VolumeAddress): void {
    if (!this.dead) this.worker.postMessage({ id: 0, op: 'drop', ss: at.ss, vol: at.vol } satisfies WorkerRequest);
  }

  async close(): Promise<void> {
    this.fail(new Error('the client is closed'));
    await this.worker.terminate();
  }

  private fail(e: Error): void {
    this.dead ??= e;
    for (const p of this.pending.values()) p.reject(new CfsError('EIO', `read worker: ${e.message}`));
    this.pending.clear();
  }
}

/** Did the copy fail (storage system gone, hung or broken), as opposed to a bad request of ours? */
export function isCopyFailure(e: unknown): boolean {
  if (e instanceof WorkerReadError) return e.copyFailure;
  if (e instanceof NbdConnectionError || e instanceof NbdTimeoutError || e instanceof NbdProtocolError || e instanceof NbdOptionError) return true;
  if (e instanceof NbdError) return e.origin === 'server' && e.code !== 'EINVAL';
  // Connecting can fail below the NBD layer (ECONNREFUSED before any handshake byte).
  return typeof (e as NodeJS.ErrnoException | undefined)?.code === 'string' && !(e instanceof CfsError);
}

/** An NBD failure as the one-line error a CFS user sees. */
export function dataError(op: string, at: VolumeAddress, e: unknown): CfsError {
  if (e instanceof CfsError) return e;
  const code = e instanceof NbdTimeoutError || (e instanceof WorkerReadError && e.code === 'ETIMEDOUT') ? 'ETIMEDOUT' : 'EIO';
  return new CfsError(code, `${op} on storage system ${at.ss} volume ${at.vol} failed: ${(e as Error).message}`, { cause: e });
}

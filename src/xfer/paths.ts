// The paths to a transfer device: an NBD export (one connection per path), a local block device
// or a file. Several paths may lead to the same device (the same MCB or SEC block at block 0);
// a PathSet spreads the I/O of one device over its live paths, least loaded first, and carries
// an operation over to another path when one fails. A failed NBD path reconnects in the
// background and rejoins.
//
// Cache bypass (seed 4, "easy to miss"): polling must see the other host's writes.
//   nbd://     no host cache in between: a completed write is in the export's one store
//   block dev  opened O_DIRECT (and O_DSYNC): every read and write goes to the device; the
//              buffers are aligned (pool.ts, blockdev/native's alignedBuffer), and a caller's
//              unaligned buffer goes through an aligned bounce buffer
//   file       for tests on one host: the page cache is shared by both processes; `direct`
//              (--direct on the command line) opens it O_DIRECT too, where the filesystem can
import fs from 'node:fs';
import type { Logger } from 'pino';
import { alignedBuffer, isAligned } from '../blockdev/native.js';
import { connect, type NbdClient } from '../nbd/client.js';
import { XferPathError, XferUsageError } from './errors.js';

export interface XferPath {
  /** As given on the command line. */
  readonly name: string;
  readonly size: number;
  /** Into `dest` (at least `length` bytes) when given: the result is then its first `length` bytes. */
  read(offset: number, length: number, dest?: Buffer): Promise<Buffer>;
  write(offset: number, data: Buffer): Promise<void>;
  /** Opened with O_DIRECT: give it block-aligned buffers, or it copies through its own. */
  readonly direct?: boolean;
  /** Reopen after a failure; resolves false while the path is still down. */
  reconnect(): Promise<boolean>;
  close(): Promise<void>;
}

export interface PathOptions {
  /** Per-command timeout of NBD paths: a stuck path fails over instead of hanging (ms). */
  timeoutMs?: number;
  /** Open files with O_DIRECT too (block devices always are); refused where the filesystem cannot. */
  direct?: boolean;
}

/** Open one --dev value: nbd://, nbds://, nbd+unix://, or a local path (block device or file). */
export async function openPath(spec: string, opts: PathOptions = {}): Promise<XferPath> {
  if (/^nbds?(\+unix)?:\/\//.test(spec)) return NbdPath.open(spec, opts.timeoutMs ?? 10_000);
  if (/^[a-z][a-z0-9+.-]*:\/\//i.test(spec)) throw new XferUsageError(`--dev ${spec}: unknown scheme (expected nbd://HOST:PORT/NAME, a block device or a file)`);
  return LocalPath.open(spec, opts.direct ?? false);
}

class NbdPath implements XferPath {
  private constructor(
    readonly name: string,
    private client: NbdClient,
    private readonly timeoutMs: number,
  ) {}

  static async open(uri: string, timeoutMs: number): Promise<NbdPath> {
    const client = await connect(uri, { timeoutMs }).catch((e: Error & { code?: string }) => {
      // The client's message names the address again ("connect 127.0.0.1:1: connect ECONNREFUSED
      // 127.0.0.1:1"): say what failed once, and what to check.
      const refused = e.code === 'ECONNREFUSED' || /ECONNREFUSED/.test(e.message);
      const why = refused ? 'nothing listens there; start the storage system (blockmirror up or serve) or check the address' : e.message;
      throw new XferPathError(`--dev ${uri}: ${why}`, { cause: e });
    });
    return new NbdPath(uri, client, timeoutMs);
  }

  get size(): number {
    return this.client.size;
  }

  read(offset: number, length: number, dest?: Buffer): Promise<Buffer> {
    return this.failFast(this.client.pread(dest ? dest.subarray(0, length) : length, offset));
  }

  write(offset: number, data: Buffer): Promise<void> {
    return this.failFast(this.client.pwrite(data, offset));
  }

  // A failed command (a timeout on a live socket included) closes the connection at once: a
  // write still queued on it must not go out later, from a buffer the caller has reused.
  private failFast<T>(p: Promise<T>): Promise<T> {
    return p.catch((e: unknown) => {
      void this.client.close();
      throw e;
    });
  }

  async reconnect(): Promise<boolean> {
    try {
      const c = await connect(this.name, { timeoutMs: this.timeoutMs });
      void this.client.close();
      this.client = c;
      return true;
    } catch {
      return false;
    }
  }

  async close(): Promise<void> {
    if (this.client.isOpen) await this.client.disconnect().catch(() => this.client.close());
  }
}

class LocalPath implements XferPath {
  private constructor(
    readonly name: string,
    private readonly fd: number,
    readonly size: number,
    readonly direct: boolean,
  ) {}

  static async open(file: string, directFile: boolean): Promise<LocalPath> {
    let st: fs.Stats;
    try {
      st = await fs.promises.stat(file);
    } catch (e) {
      throw new XferUsageError(`--dev ${file}: ${(e as Error).message}`);
    }
    if (!st.isFile() && !st.isBlockDevice()) throw new XferUsageError(`--dev ${file}: neither a file nor a block device`);
    // Polling must see the other host's writes: a block device bypasses this host's cache.
    const direct = st.isBlockDevice() || directFile;
    const flags = fs.constants.O_RDWR | fs.constants.O_DSYNC | (direct ? fs.constants.O_DIRECT : 0);
    const fd = await new Promise<number>((resolve, reject) =>
      fs.open(file, flags, (err, fd) =>
        err
          ? reject(new XferUsageError(`--dev ${file}: ${err.message}${direct && err.code === 'EINVAL' ? ' (its filesystem refuses O_DIRECT: use a file on another one, or a block device)' : ''}`))
          : resolve(fd),
      ),
    );
    const size = st.isBlockDevice() ? await blockDeviceSize(file) : st.size;
    return new LocalPath(file, fd, size, direct);
  }

  async read(offset: number, length: number, dest?: Buffer): Promise<Buffer> {
    let buf = dest ? dest.subarray(0, length) : this.direct ? alignedBuffer(length) : Buffer.allocUnsafe(length);
    const bounce = this.direct && !isAligned(buf);
    if (bounce) buf = alignedBuffer(length);
    const n = await new Promise<number>((resolve, reject) => fs.read(this.fd, buf, 0, length, offset, (err, n) => (err ? reject(err) : resolve(n))));
    if (n !== length) throw new Error(`short read at ${offset}: ${n} of ${length}`);
    if (bounce && dest) {
      buf.copy(dest);
      return dest.subarray(0, length);
    }
    return buf;
  }

  async write(offset: number, data: Buffer): Promise<void> {
    let buf = data;
    if (this.direct && !isAligned(buf)) {
      buf = alignedBuffer(data.length);
      data.copy(buf);
    }
    const n = await new Promise<number>((resolve, reject) => fs.write(this.fd, buf, 0, buf.length, offset, (err, n) => (err ? reject(err) : resolve(n))));
    if (n !== data.length) throw new Error(`short write at ${offset}`);
  }

  async reconnect(): Promise<boolean> {
    return true;
  }

  close(): Promise<void> {
    return new Promise((resolve) => fs.close(this.fd, () => resolve()));
  }
}

/** A block device's stat size is 0: sysfs has it, in 512-byte sectors. */
async function blockDeviceSize(file: string): Promise<number> {
  const dev = (await fs.promises.realpath(file)).replace(/^\/dev\//, '');
  const sectors = Number((await fs.promises.readFile(`/sys/class/block/${dev}/size`, 'utf8')).trim());
  return sectors * 512;
}

interface Member {
  path: XferPath;
  live: boolean;
  inFlight: number;
}

/** The live paths to one device; every operation goes to the least loaded and fails over. */
export class PathSet {
  private readonly members: Member[];
  private next = 0;
  private readonly timers = new Set<NodeJS.Timeout>();
  private closed = false;

  constructor(
    /** "device 0 (master)" etc., for messages. */
    readonly label: string,
    paths: XferPath[],
    private readonly log?: Logger,
    private readonly rejoinMs = 1000,
    private readonly graceMs = 0,
  ) {
    this.members = paths.map((path) => ({ path, live: true, inFlight: 0 }));
  }

  get size(): number {
    return Math.min(...this.members.map((m) => m.path.size));
  }

  get paths(): { name: string; live: boolean }[] {
    return this.members.map((m) => ({ name: m.path.name, live: m.live }));
  }

  /** Some path opened with O_DIRECT: buffers handed to the set should be aligned. */
  get direct(): boolean {
    return this.members.some((m) => m.path.direct === true);
  }

  read(offset: number, length: number, dest?: Buffer): Promise<Buffer> {
    return this.run('read', (p) => p.read(offset, length, dest));
  }

  write(offset: number, data: Buffer): Promise<void> {
    return this.run('write', (p) => p.write(offset, data));
  }

  /** Least loaded live path, round-robin among equals. */
  private pick(): Member | undefined {
    let best: Member | undefined;
    const n = this.members.length;
    for (let i = 0; i < n; i++) {
      const m = this.members[(this.next + i) % n];
      if (m.live && (!best || m.inFlight < best.inFlight)) best = m;
    }
    this.next = (this.next + 1) % n;
    return best;
  }

  // A failed write is repeated whole on another path: the same bytes at the same place, so a late
  // copy landing from the dead path changes nothing. The caller awaits it before writing the
  // pointer table, so "data before pointers" holds whichever path carries each.
  //
  // With no live path left, every path is tried again for up to `graceMs` before the operation
  // fails: the master of a pair that is being swapped refuses writes before the new master
  // takes them, and a path that comes back in time carries the operation.
  private async run<T>(op: string, fn: (p: XferPath) => Promise<T>): Promise<T> {
    let lastErr: unknown;
    let giveUpAt: number | undefined;
    for (;;) {
      const m = this.pick();
      if (!m && !this.closed && Date.now() < (giveUpAt ??= Date.now() + this.graceMs)) {
        await this.rejoinNow();
        if (!this.members.some((x) => x.live)) await new Promise((r) => setTimeout(r, 100));
        continue;
      }
      if (!m) throw new XferPathError(`${op} on ${this.label}: every path failed (${this.members.map((x) => x.path.name).join(', ')}): ${(lastErr as Error | undefined)?.message ?? 'none open'}`, { cause: lastErr });
      m.inFlight++;
      try {
        return await fn(m.path);
      } catch (e) {
        lastErr = e;
        if (m.live) this.lose(m, e as Error);
      } finally {
        m.inFlight--;
      }
    }
  }

  /** Try every down path once, now. */
  private async rejoinNow(): Promise<void> {
    await Promise.all(
      this.members
        .filter((m) => !m.live)
        .map(async (m) => {
          if ((await m.path.reconnect()) && !this.closed && !m.live) {
            m.live = true;
            this.log?.warn({ path: m.path.name }, `path ${m.path.name} to ${this.label} rejoined`);
          }
        }),
    );
  }

  private lose(m: Member, err: Error): void {
    m.live = false;
    this.log?.warn({ path: m.path.name, err: err.message }, `path ${m.path.name} to ${this.label} failed; going on over the others`);
    const retry = () => {
      if (this.closed) return;
      const t = setTimeout(() => {
        this.timers.delete(t);
        if (m.live) return; // rejoined by rejoinNow
        void m.path.reconnect().then((ok) => {
          if (this.closed) return;
          if (m.live) return;
          if (!ok) return retry();
          m.live = true;
          this.log?.warn({ path: m.path.name }, `path ${m.path.name} to ${this.label} rejoined`);
        });
      }, this.rejoinMs);
      t.unref();
      this.timers.add(t);
    };
    retry();
  }

  async close(): Promise<void> {
    this.closed = true;
    for (const t of this.timers) clearTimeout(t);
    await Promise.all(this.members.map((m) => m.path.close().catch(() => undefined)));
  }
}

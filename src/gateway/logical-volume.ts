// One logical volume as a gateway serves it (Zambeel's gateway, over NBD): a BlockDevice that
// forwards each request to the volume's current master, found in the logical volume table, and
// keeps forwarding across a failover.
//
//   outcome of a request at the master             what the gateway does
//   success                                         answers the host
//   the connection fails (kill -9, cut, timeout)    drops it; waits for the table to change or
//   ESHUTDOWN (the master fenced itself)            the master to come back; sends it again
//   EPERM (the copy is no longer the master, or
//     was not yet when we connected: its export
//     said READ_ONLY then, and the client refuses
//     writes on that connection itself)
//   EIO on a read (the master's device failed)      reads the same range from each mirror in
//                                                   turn (VOL0 -> VOL1 -> VOL2, claim 6)
//   any other error (EINVAL, ENOSPC, EIO write)     answers the host with it
//
// Sending a request again is safe: a write carries its data and lands at the same offset (a
// write that reached the old master and is sent again to the new one leaves the same bytes), and
// a FLUSH sent to the new master covers every write it acknowledged. The host sees a pause,
// never an error, unless no master appears within `retryMs`.
import type { Logger } from 'pino';
import { BlockDeviceError, type BlockDevice, type Extent, type Payload, type ZeroOptions } from '../blockdev/types.js';
import { NbdConnectionError, NbdError, NbdTimeoutError, connect, type NbdClient } from '../nbd/client.js';
import type { ClusterStore } from '../cluster/etcd/store.js';
import type { ClientTls } from '../nbd/tls.js';
import { currentExportName } from '../controller/current-copy.js';

export interface Copy {
  ss: number;
  vol: number;
}

/** Connections to storage systems' exports, shared by every logical volume of one gateway. */
export class ConnectionPool {
  private readonly clients = new Map<string, Promise<NbdClient>>();

  constructor(
    private readonly timeoutMs: number,
    /** STARTTLS credentials for the storage system at an address, if it asks for TLS. */
    private readonly tlsFor: (addr: string) => ClientTls | undefined = () => undefined,
  ) {}

  get(addr: string, exportName: string): Promise<NbdClient> {
    const key = `${addr}/${exportName}`;
    let c = this.clients.get(key);
    if (!c) {
      const m = /^(?:\[([^\]]+)\]|([^:]+)):(\d+)$/.exec(addr);
      if (!m) return Promise.reject(new NbdConnectionError('EINVAL', `bad NBD address ${addr}`));
      const tls = this.tlsFor(addr);
      c = connect({ host: m[1] ?? m[2]!, port: Number(m[3]), exportName, timeoutMs: this.timeoutMs, ...(tls ? { tls } : {}) });
      this.clients.set(key, c);
      c.catch(() => this.clients.delete(key));
    }
    return c;
  }

  drop(addr: string, exportName: string): void {
    const key = `${addr}/${exportName}`;
    const c = this.clients.get(key);
    this.clients.delete(key);
    if (c) void c.then((x) => x.close()).catch(() => {});
  }

  async close(): Promise<void> {
    const all = [...this.clients.values()];
    this.clients.clear();
    await Promise.all(all.map((c) => c.then((x) => x.close()).catch(() => {})));
  }
}

type Outcome = 'retry' | 'fail';

function classify(e: unknown): Outcome {
  if (e instanceof NbdConnectionError || e instanceof NbdTimeoutError) return 'retry';
  // EPERM from either side: a write refused by the server, or by our client because the export it
  // connected to was a read-only mirror then (a stale table during a failover). Both mean "not the
  // master on this connection"; the retry drops it and connects again. Answering the host instead
  // gave it EPERM for every write on that pooled connection (a CI run: 7500 errors).
  if (e instanceof NbdError && (e.code === 'EPERM' || (e.code === 'ESHUTDOWN' && e.origin === 'server'))) return 'retry';
  return 'fail';
}

export class LogicalVolumeDevice implements BlockDevice {
  readonly readOnly = false;
  /** Every connection of every host lands on the one master, whose cache is shared. */
  readonly multiConnSafe = true;
  readonly fastZero = false;

  constructor(
    readonly name: string,
    readonly size: number,
    private readonly store: ClusterStore,
    private readonly pool: ConnectionPool,
    private readonly log: Logger,
    private readonly retryMs = 60_000,
  ) {}

  /** The current master's NBD address and export, if the tables know a live one. */
  private master(): { addr: string; exportName: string; copy: Copy } | undefined {
    const lv = this.store.tables.logicalVolumes.get(this.name);
    const ss = lv ? this.store.tables.storageSystems.get(lv.master.ss) : undefined;
    if (!lv || !ss) return undefined;
    return { addr: ss.nbd, exportName: `vol${lv.master.vol}`, copy: lv.master };
  }

  private mirrors(): { addr: string; exportName: string }[] {
    const rows = this.store.tables.mirrors.get(this.name)?.mirrors ?? [];
    const lv = this.store.tables.logicalVolumes.get(this.name);
    const out: { addr: string; exportName: string }[] = [];
    for (const m of rows) {
      if (lv && m.ss === lv.master.ss && m.vol === lv.master.vol) continue;
      // Only a mirror etcd says is in PAIR, and through its `@current` export, which refuses to
      // serve data the moment that copy stops being current (docs/never-stale.md).
      if (m.state !== 'PAIR') continue;
      const ss = this.store.tables.storageSystems.get(m.ss);
      if (ss) out.push({ addr: ss.nbd, exportName: currentExportName(m.vol) });
    }
    return out;
  }

  /** Resolves at the next change of the tables, or after `ms`. */
  private changed(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const done = () => {
        clearTimeout(t);
        this.store.off('change', done);
        resolve();
      };
      const t = setTimeout(done, ms);
      this.store.on('change', done);
    });
  }

  private async run<T>(op: string, fn: (c: NbdClient) => Promise<T>, readFallback = false): Promise<T> {
    const deadline = performance.now() + this.retryMs;
    let last = 'no master is registered';
    let tries = 0;
    for (;;) {
      const m = this.master();
      if (m) {
        try {
          const c = await this.pool.get(m.addr, m.exportName);
          return await fn(c);
        } catch (e) {
          if (readFallback && e instanceof NbdError && e.origin === 'server' && e.code === 'EIO') return this.readFromMirrors(op, fn, e);
          if (classify(e) === 'fail') throw toDeviceError(e, `${this.name}: ${op}`);
          last = (e as Error).message;
          this.pool.drop(m.addr, m.exportName);
          if (tries++ === 0) this.log.warn({ lv: this.name, master: `ss${m.copy.ss}/vol${m.copy.vol}`, err: last }, `${this.name}: the master failed a request; holding it until the master is back or another takes over`);
        }
      }
      if (performance.now() > deadline) throw new BlockDeviceError('EIO', `${this.name}: ${op}: no master answered within ${this.retryMs} ms (${last})`);
      await this.changed(tries === 0 ? 50 : 200);
    }
  }

  /** The master's device failed a read: the mirrors hold the same blocks (Zambeel claim 6). */
  private async readFromMirrors<T>(op: string, fn: (c: NbdClient) => Promise<T>, first: Error): Promise<T> {
    for (const m of this.mirrors()) {
      try {
        return await fn(await this.pool.get(m.addr, m.exportName));
      } catch (e) {
        this.log.warn({ lv: this.name, mirror: m.exportName, err: (e as Error).message }, `${this.name}: ${op} failed on a mirror too`);
      }
    }
    throw toDeviceError(first, `${this.name}: ${op}`);
  }

  read(offset: number, dest: Buffer): Promise<void> {
    return this.run('read', async (c) => {
      await c.pread(dest, offset);
    }, true);
  }

  write(offset: number, data: Payload, fua = false): Promise<void> {
    // Sent as it came, pieces and all: the server hands the payload back to its pool only once
    // this resolves, so each try may send it again, and a failed try's connection is destroyed
    // (pool.drop) before the next one. Joining a 1 MiB payload cost a quarter of the gateway's CPU.
    return this.run('write', (c) => c.pwrite(data, offset, { fua }));
  }

  flush(): Promise<void> {
    return this.run('flush', (c) => c.flush());
  }

  trim(offset: number, length: number, fua = false): Promise<void> {
    return this.run('trim', (c) => c.trim(offset, length, { fua }));
  }

  zero(offset: number, length: number, opts: ZeroOptions = {}): Promise<void> {
    return this.run('zero', (c) => c.zero(offset, length, { fua: opts.fua === true }));
  }

  /** Allocation is the master's business; a gateway says "data" everywhere, which is always true enough. */
  async extents(_offset: number, length: number): Promise<Extent[]> {
    return [{ length, flags: 0 }];
  }

  async close(): Promise<void> {}
}

function toDeviceError(e: unknown, what: string): BlockDeviceError {
  if (e instanceof BlockDeviceError) return e;
  const code = (e as { code?: string }).code;
  const known = ['EPERM', 'EIO', 'ENOMEM', 'EINVAL', 'ENOSPC', 'EOVERFLOW', 'ENOTSUP', 'ESHUTDOWN'];
  return new BlockDeviceError((code && known.includes(code) ? code : 'EIO') as BlockDeviceError['errno'], `${what}: ${(e as Error).message}`, { cause: e });
}

// The cluster tables in etcd (tables.ts), as one process sees them: a snapshot kept current by
// a watch, a leased registration for each storage system the process runs, and the one
// transaction that moves a logical volume's master (failover). etcd does the agreeing; we never
// decide anything two processes could decide differently.
//
// Lease and fencing. A storage system counts its own registration as live only until half the
// TTL after the last renewal it saw acknowledged. etcd expires it a full TTL after the last
// renewal it processed, which is later. So a master stops acknowledging host writes (agent.ts)
// before any mirror can be promoted in its place: two masters never acknowledge at once.
import { EventEmitter } from 'node:events';
import { Etcd3, type Lease } from 'etcd3';
import type { Logger } from 'pino';
import type { EtcdConfig } from '../config.js';
import { Keys, apply, emptyTables, type HistoryRecord, type LvRecord, type SsRecord, type Tables } from './tables.js';

export class EtcdUnreachableError extends Error {
  override readonly name = 'EtcdUnreachableError';
}

export interface Registration {
  readonly id: number;
  /** Is our registration certainly live now (renewed within half the TTL)? */
  readonly live: boolean;
  close(): Promise<void>;
}

/** Events: "change" (the tables changed), "corrupt" ({key, problem}). */
export class ClusterStore extends EventEmitter {
  readonly keys: Keys;
  tables: Tables = emptyTables();
  private watcher: { cancel(): Promise<void> } | null = null;
  private readonly registrations = new Set<LeaseRegistration>();

  private constructor(
    readonly client: Etcd3,
    readonly config: EtcdConfig,
    private readonly log: Logger,
  ) {
    super();
    this.setMaxListeners(0);
    this.keys = new Keys(config.prefix);
  }

  /** Connect and read the tables; one clear error if no endpoint answers within `timeoutMs`. */
  static async connect(config: EtcdConfig, log: Logger, timeoutMs = 5000): Promise<ClusterStore> {
    const hosts = config.endpoints.map((e) => (e.includes('://') ? e : `http://${e}`));
    const client = new Etcd3({ hosts, dialTimeout: timeoutMs });
    const store = new ClusterStore(client, config, log);
    try {
      await Promise.race([
        store.reload(),
        new Promise((_, reject) => setTimeout(() => reject(new Error(`no answer within ${timeoutMs} ms`)), timeoutMs).unref()),
      ]);
    } catch (e) {
      client.close();
      throw new EtcdUnreachableError(`etcd at ${config.endpoints.join(', ')} is not reachable (${grpcReason(e as Error)}); start etcd, or remove etcd: from the YAML to run from the YAML alone`, { cause: e });
    }
    await store.watch();
    return store;
  }

  /** Read every key under the prefix into a fresh snapshot. */
  async reload(): Promise<Tables> {
    const res = await this.client.getAll().prefix(`${this.config.prefix}/`).exec();
    const tables = emptyTables();
    for (const kv of res.kvs) apply(tables, this.keys, kv.key.toString(), kv.value.toString(), kv.mod_revision);
    for (const c of tables.corrupt) this.warnCorrupt(c);
    tables.corrupt = [];
    tables.history.sort((a, b) => a.at.localeCompare(b.at));
    this.tables = tables;
    return tables;
  }

  private warnCorrupt(c: { key: string; problem: string }): void {
    this.log.warn({ key: c.key, problem: c.problem }, `etcd: ignoring key ${c.key}: ${c.problem}`);
    this.emit('corrupt', c);
  }

  private async watch(): Promise<void> {
    const w = await this.client.watch().prefix(`${this.config.prefix}/`).create();
    w.on('put', (kv) => this.applyChange(kv.key.toString(), kv.value.toString(), kv.mod_revision));
    w.on('delete', (kv) => this.applyChange(kv.key.toString(), null, kv.mod_revision));
    // A watch that had to reconnect may have missed events: read everything again.
    w.on('connected', () => void this.reload().then(() => this.emit('change')).catch(() => {}));
    w.on('error', (e: Error) => this.log.warn({ err: e.message }, 'etcd watch error; it reconnects'));
    this.watcher = w;
  }

  private applyChange(key: string, value: string | null, revision: string): void {
    const before = this.tables.corrupt.length;
    apply(this.tables, this.keys, key, value, revision);
    for (const c of this.tables.corrupt.slice(before)) this.warnCorrupt(c);
    this.tables.corrupt = [];
    this.emit('change');
  }

  /** Create the rows of logical volumes that do not exist yet (the YAML seeds the tables once). */
  async seed(rows: { lv: LvRecord; mirrors: { ss: number; vol: number; mode: 'sync' | 'async'; state: string }[] }[]): Promise<void> {
    for (const { lv, mirrors } of rows) {
      await this.client
        .if(this.keys.lv(lv.name), 'Create', '==', 0)
        .then(this.client.put(this.keys.lv(lv.name)).value(JSON.stringify(lv)), this.client.put(this.keys.mirrors(lv.name)).value(JSON.stringify({ mirrors })))
        .commit();
    }
    await this.reload();
  }

  /** A logical volume deleted at run time (`blockmirror apply`): its rows go; its failover history stays. */
  async drop(name: string): Promise<void> {
    for (const key of [this.keys.lv(name), this.keys.mirrors(name), this.keys.pair(name)]) await this.client.delete().key(key).exec();
  }

  /** Register a storage system under a lease; renewed in the background until closed. */
  async register(rec: SsRecord): Promise<Registration> {
    const reg = new LeaseRegistration(this, rec, this.log);
    await reg.start();
    this.registrations.add(reg);
    return reg;
  }

  /**
   * Move a logical volume's master, if its row is still the one we saw (same revision): the
   * compare-and-set only one candidate can win. Records the move in the history.
   */
  async promote(name: string, seen: LvRecord & { revision: string }, to: { ss: number; vol: number }, reason: string): Promise<boolean> {
    const next: LvRecord = { name, master: to, epoch: seen.epoch + 1, mode: seen.mode, size: seen.size };
    const history: HistoryRecord = { name, at: new Date().toISOString(), epoch: next.epoch, from: seen.master, to, reason };
    const res = await this.client
      .if(this.keys.lv(name), 'Mod', '==', seen.revision)
      .then(this.client.put(this.keys.lv(name)).value(JSON.stringify(next)), this.client.put(this.keys.history(name, next.epoch)).value(JSON.stringify(history)))
      .commit();
    return res.succeeded;
  }

  /** Record a master the controller moved by itself (swap, takeover by hand) in a newer epoch. */
  async recordMaster(name: string, master: { ss: number; vol: number }, epoch: number, reason: string): Promise<boolean> {
    const seen = this.tables.logicalVolumes.get(name);
    if (!seen || seen.epoch >= epoch) return false;
    const next: LvRecord = { name, master, epoch, mode: seen.mode, size: seen.size };
    const history: HistoryRecord = { name, at: new Date().toISOString(), epoch, from: seen.master, to: master, reason };
    const res = await this.client
      .if(this.keys.lv(name), 'Mod', '==', seen.revision)
      .then(this.client.put(this.keys.lv(name)).value(JSON.stringify(next)), this.client.put(this.keys.history(name, epoch)).value(JSON.stringify(history)))
      .commit();
    return res.succeeded;
  }

  async put(key: string, value: unknown): Promise<void> {
    await this.client.put(key).value(JSON.stringify(value));
  }

  async close(): Promise<void> {
    for (const r of this.registrations) await r.close();
    this.registrations.clear();
    await this.watcher?.cancel().catch(() => {});
    this.client.close();
  }
}

/**
 * A storage system's registration. We renew it ourselves every TTL/4 and note when each renewal
 * was *sent*: etcd restarts the TTL no earlier than that, so "sent + TTL" is a lower bound of
 * the expiry etcd will apply. We call ourselves live until 3/4 of the TTL after that point,
 * keeping a quarter of the TTL as margin for clock-rate differences.
 */
class LeaseRegistration implements Registration {
  private lease: Lease | null = null;
  private renewedAt = -Infinity;
  private closed = false;
  private timer: NodeJS.Timeout | null = null;

  constructor(
    private readonly store: ClusterStore,
    private readonly rec: SsRecord,
    private readonly log: Logger,
  ) {}

  get id(): number {
    return this.rec.id;
  }

  get live(): boolean {
    return performance.now() - this.renewedAt < (this.store.config.leaseTtl * 3) / 4;
  }

  async start(): Promise<void> {
    const ttlSeconds = Math.max(1, Math.round(this.store.config.leaseTtl / 1000));
    const lease = this.store.client.lease(ttlSeconds, { autoKeepAlive: false });
    const sent = performance.now();
    await lease.put(this.store.keys.ss(this.rec.id)).value(JSON.stringify(this.rec));
    this.lease = lease;
    this.renewedAt = sent;
    this.schedule();
  }

  private schedule(): void {
    if (this.closed) return;
    this.timer = setTimeout(() => void this.renew(), this.store.config.leaseTtl / 4);
    this.timer.unref();
  }

  private async renew(): Promise<void> {
    this.timer = null;
    const lease = this.lease;
    if (this.closed) return;
    const sent = performance.now();
    try {
      if (!lease) throw new Error('no lease');
      const res = await lease.keepaliveOnce();
      if (Number(res.TTL) <= 0) throw new Error('the lease has expired');
      this.renewedAt = Math.max(this.renewedAt, sent);
    } catch (e) {
      if (this.closed) return;
      if (lease && performance.now() - this.renewedAt > this.store.config.leaseTtl) {
        // Past the TTL: etcd has dropped it, so a new lease and a new registration are needed.
        this.log.error({ ss: this.rec.id, err: (e as Error).message }, `storage system ${this.rec.id} lost its etcd lease; registering again`);
        this.lease = null;
      }
      if (!this.lease) {
        await this.start().catch((err: Error) => {
          this.log.warn({ ss: this.rec.id, err: err.message }, 'etcd registration failed; retrying');
          this.schedule();
        });
        return;
      }
    }
    this.schedule();
  }

  async close(): Promise<void> {
    this.closed = true;
    if (this.timer) clearTimeout(this.timer);
    const lease = this.lease;
    this.lease = null;
    // A clean stop gives the lease back at once: the others need not wait out the TTL.
    if (lease) await lease.revoke().catch(() => {});
  }
}

/**
 * The cause a person can act on, without gRPC's wrapping: "14 UNAVAILABLE: No connection
 * established. Last error: Error: connect ECONNREFUSED 127.0.0.1:1. Resolution note: " becomes
 * "connect ECONNREFUSED 127.0.0.1:1".
 */
function grpcReason(e: Error): string {
  const first = e.message.split('\n')[0]!;
  const last = /Last error: (?:Error: )?(.*?)\.?\s*(?:Resolution note:.*)?$/.exec(first);
  return (last?.[1] || first.replace(/^\d+ [A-Z_]+: /, '')).trim();
}

// What `blockmirror up` does with etcd (docs/cluster.md), for the storage systems it runs:
//
//   register    each storage system under a lease (TTL `etcd.leaseTtl`), renewed in the background
//   seed        the logical volume and volume mirrors tables from the YAML, once (create-if-absent)
//   publish     every TTL/2, the state of the pairs whose master it holds (pairs, mirrors tables),
//               and a master it got by hand (swap, takeover) in a newer epoch
//   fence       a master volume refuses host I/O (ESHUTDOWN) when the lease cannot be renewed
//               in time, or when the logical volume table names another master in a newer epoch
//   fail over   when a master's registration expires, the storage system holding its sync mirror
//               (in PAIR) moves the logical volume to itself with one compare-and-set, then takes
//               the pair over in that epoch. Async pairs only with autoFailover: allowDataLoss.
//
// Only etcd decides who wins: two mirrors racing for one logical volume run the same
// transaction against the same revision, and one of them fails.
import type { Logger } from 'pino';
import type { ClusterHooks, StorageSystem } from '../../controller/storage-system.js';
import type { VolRef } from '../../controller/status.js';
import type { PairController } from '../../controller/pair-controller.js';
import type { ClusterConfig, PairConfig } from '../config.js';
import { ClusterStore, type Registration } from './store.js';
import type { LvRecord, PairRecord } from './tables.js';
import { etcdView, type EtcdView } from './view.js';

export class ClusterAgent {
  private readonly registrations = new Map<number, Registration>();
  private timer: NodeJS.Timeout | null = null;
  private readonly failing = new Set<string>();
  /** Logical volumes we told the log we will not fail over, so it says it once. */
  private readonly heldBack = new Set<string>();
  private closed = false;

  private constructor(
    private config: ClusterConfig,
    private readonly store: ClusterStore,
    private readonly systems: StorageSystem[],
    private readonly log: Logger,
  ) {}

  /**
   * Connect to etcd and seed the tables. Start the storage systems with `agent.guard` as their
   * host guard (their masters refuse I/O until registered), then `attach` them.
   */
  static async connect(config: ClusterConfig, log: Logger): Promise<ClusterAgent> {
    const etcd = config.etcd!;
    const store = await ClusterStore.connect(etcd, log);
    const agent = new ClusterAgent(config, store, [], log);
    try {
      await store.seed(config.pairs.map((p) => seedRow(config, p)));
    } catch (e) {
      await agent.close();
      throw e;
    }
    return agent;
  }

  readonly guard = (ss: StorageSystem, pair: PairController, vol: number): string | null => this.fenceReason(ss, pair, vol);

  /**
   * A pair we master suspended: its mirrors are outdated in the volume mirrors table before any
   * write is acknowledged without them, so no failover can promote one of them (only a mirror
   * whose row says PAIR is promoted). Without a live lease this fails, and the writes wait.
   */
  readonly onSuspend = async (pair: string, mirrors: VolRef[], reason: string): Promise<void> => {
    await this.writeMirrors(pair, () => mirrors.map((m) => ({ ss: m.ss, vol: m.vol, state: 'PSUE' })));
    this.log.warn({ pair, reason }, `${pair}: mirrors recorded outdated in etcd`);
  };

  private readonly mirrorWrites = new Map<string, Promise<void>>();

  /**
   * Writes of one pair's mirrors row, one at a time, each computing its value when its turn
   * comes: a periodic "PAIR" computed before a suspension can never land after its "PSUE".
   */
  private writeMirrors(pair: string, rows: () => { ss: number; vol: number; state: string }[] | null): Promise<void> {
    const prev = this.mirrorWrites.get(pair) ?? Promise.resolve();
    const next = prev
      .catch(() => {})
      .then(async () => {
        const mode = this.store.tables.logicalVolumes.get(pair)?.mode ?? 'sync';
        const now = rows();
        if (now) await this.store.put(this.store.keys.mirrors(pair), { mirrors: now.map((r) => ({ ...r, mode })) });
      });
    this.mirrorWrites.set(pair, next);
    return next;
  }

  /** The tables as this process sees them, for the dashboard (cluster/etcd/view.ts). */
  view(): EtcdView {
    return etcdView(this.store.tables, this.config.storageSystems.map((s) => s.id));
  }

  /** The hooks to start storage systems with. */
  get hooks(): ClusterHooks {
    return { hostGuard: this.guard, onSuspend: this.onSuspend };
  }

  /** Register the storage systems (started with `guard`) and start publishing and watching. */
  async attach(systems: StorageSystem[]): Promise<void> {
    const { config, store, log } = this;
    const etcd = config.etcd!;
    this.systems.push(...systems);
    try {
      for (const ss of systems) {
        const cfg = config.storageSystems.find((s) => s.id === ss.spec.id)!;
        const reg = await store.register({
          id: ss.spec.id,
          nbd: ss.nbdAddr,
          admin: `${cfg.admin.host}:${cfg.admin.port}`,
          ...(cfg.peer ? { peer: `${cfg.peer.host}:${cfg.peer.port}` } : {}),
          pid: process.pid,
          startedAt: new Date().toISOString(),
        });
        this.registrations.set(ss.spec.id, reg);
      }
    } catch (e) {
      await this.close();
      throw e;
    }
    store.on('change', () => this.check());
    this.tick();
    log.info({ endpoints: etcd.endpoints, prefix: etcd.prefix }, `cluster metadata in etcd (${etcd.endpoints.join(', ')}${etcd.prefix})`);
  }

  /**
   * The YAML changed at run time (`blockmirror apply`, cluster/reconfigure.ts), and our storage
   * systems run it now. Pairs created get their rows, pairs deleted lose theirs, a master moved
   * by the YAML is recorded in a new epoch; the mirrors rows follow at the next publish, which
   * runs now: a mirror added shows as COPY, then PAIR.
   */
  async reconfigured(config: ClusterConfig): Promise<void> {
    const old = this.config;
    this.config = config;
    const ours = (p: PairConfig) => this.systems.some((ss) => ss.spec.id === p.master.ss);
    const before = new Map(old.pairs.map((p) => [p.name, p]));
    const after = new Map(config.pairs.map((p) => [p.name, p]));
    const created = config.pairs.filter((p) => !before.has(p.name) && ours(p));
    if (created.length > 0) await this.store.seed(created.map((p) => seedRow(config, p)));
    for (const p of old.pairs) if (!after.has(p.name) && ours(p)) await this.store.drop(p.name);
    for (const p of config.pairs) {
      const was = before.get(p.name);
      const lv = this.store.tables.logicalVolumes.get(p.name);
      if (!was || !ours(p) || !lv || (was.master.ss === p.master.ss && was.master.vol === p.master.vol)) continue;
      await this.store.recordMaster(p.name, p.master, lv.epoch + 1, 'the master was changed in the YAML (blockmirror apply)');
    }
    await this.publish();
  }

  /** Why volume `vol` (a master) of `pair` on `ss` must refuse host I/O now, or null. */
  fenceReason(ss: StorageSystem, pair: PairController, vol: number): string | null {
    const reg = this.registrations.get(ss.spec.id);
    if (!reg) return `storage system ${ss.spec.id} is not registered in etcd yet`;
    if (!reg.live) return `storage system ${ss.spec.id} cannot renew its etcd lease, so it no longer serves ${pair.name} (fenced; a mirror may be taking over)`;
    const lv = this.store.tables.logicalVolumes.get(pair.name);
    // The common case costs two lookups: the table names this very copy.
    if (!lv || (lv.master.ss === ss.spec.id && lv.master.vol === vol)) return null;
    const epoch = pair.status().epoch ?? 1;
    if (lv.epoch > epoch) return `${pair.name} is mastered by storage system ${lv.master.ss} in epoch ${lv.epoch}; this copy (epoch ${epoch}) is fenced until it rejoins as a mirror`;
    return null;
  }

  private tick(): void {
    if (this.closed) return;
    void this.publish()
      .catch((e: Error) => this.log.warn({ err: e.message }, 'etcd: cannot publish pair states'))
      .finally(() => {
        if (this.closed) return;
        this.timer = setTimeout(() => this.tick(), this.config.etcd!.leaseTtl / 2);
        this.timer.unref();
      });
    this.check();
  }

  /** The pairs we master: their rows, and a master moved by hand in a newer epoch. */
  private async publish(): Promise<void> {
    for (const ss of this.systems) {
      if (!this.registrations.get(ss.spec.id)?.live) continue;
      for (const pair of ss.pairs.values()) {
        const st = pair.status();
        if (st.role === 'mirror') continue;
        const epoch = st.epoch ?? 1;
        const lv = this.store.tables.logicalVolumes.get(pair.name);
        if (lv && epoch > lv.epoch) await this.store.recordMaster(pair.name, st.master, epoch, `storage system ${ss.spec.id} became master by hand`);
        const row: PairRecord = {
          state: st.state,
          epoch,
          master: st.master,
          at: new Date().toISOString(),
          mirrors: st.mirrors.map((m) => ({ ss: m.ss, vol: m.vol, invalidClusters: m.invalidClusters, ...(m.connected !== undefined ? { connected: m.connected } : {}) })),
        };
        await this.store.put(this.store.keys.pair(pair.name), row);
        await this.writeMirrors(pair.name, () => {
          // Read again at its turn: the pair may have suspended since.
          const now = pair.status();
          // Per mirror: in a pair in COPY, a mirror with nothing left to copy is in PAIR, and one
          // that joined at run time is in COPY until its full copy is done (only PAIR is promoted).
          return now.role === 'mirror' ? null : now.mirrors.map((m) => ({ ss: m.ss, vol: m.vol, state: now.state === 'COPY' && m.invalidClusters === 0 ? 'PAIR' : now.state }));
        });
      }
    }
  }

  /** Look for logical volumes whose master's registration is gone and which we hold a mirror of. */
  private check(): void {
    if (this.closed) return;
    const t = this.store.tables;
    for (const lv of t.logicalVolumes.values()) {
      if (t.storageSystems.has(lv.master.ss) || this.failing.has(lv.name)) continue;
      for (const ss of this.systems) {
        const pair = ss.pairs.get(lv.name);
        if (!pair || !this.registrations.get(ss.spec.id)?.live) continue;
        const mine = pair.volumes[0]!;
        if (pair.roleOf(mine) !== 'mirror') continue;
        this.failing.add(lv.name);
        void this.failOver(ss, pair, lv, mine)
          .catch((e: Error) => this.log.error({ pair: lv.name, err: e.message }, `failover of ${lv.name} failed`))
          .finally(() => this.failing.delete(lv.name));
      }
    }
  }

  private async failOver(ss: StorageSystem, pair: PairController, lv: LvRecord & { revision: string }, vol: number): Promise<void> {
    const spec = this.config.pairs.find((p) => p.name === lv.name);
    const why = this.refusal(spec, pair, lv);
    if (why) {
      if (!this.heldBack.has(lv.name)) this.log.error({ pair: lv.name }, `${lv.name}: the master's storage system ${lv.master.ss} lost its lease; ${why}`);
      this.heldBack.add(lv.name);
      return;
    }
    const reason = `storage system ${lv.master.ss} lost its etcd lease`;
    const won = await this.store.promote(lv.name, lv, { ss: ss.spec.id, vol }, reason);
    if (!won) return; // another candidate moved it first, or the row changed: the watch brings the news
    this.log.warn({ pair: lv.name, epoch: lv.epoch + 1, from: lv.master.ss }, `failover: storage system ${ss.spec.id} takes over ${lv.name} in epoch ${lv.epoch + 1} (${reason})`);
    await pair.takeover({ force: true, epoch: lv.epoch + 1 });
    this.heldBack.delete(lv.name);
  }

  /** Why this mirror must not be promoted automatically, or null. */
  private refusal(spec: PairConfig | undefined, pair: PairController, lv: LvRecord): string | null {
    if (!spec || spec.autoFailover === false) return 'autoFailover is false: it stays down until `pair takeover` by hand';
    if (lv.mode === 'async' && spec.autoFailover !== 'allowDataLoss') return 'it is an async pair, whose mirror may lack acknowledged writes: set autoFailover: allowDataLoss to fail over anyway, or run `pair takeover` by hand';
    // The master's last word on this mirror: PAIR, or outdated (written before it acknowledged
    // anything without it), or the initial copy that never finished.
    const mine = pair.status().mirrors.find((m) => pair.volumes.includes(m.vol) && m.ss === this.systemOf(pair));
    const row = this.store.tables.mirrors.get(lv.name)?.mirrors.find((m) => m.ss === mine?.ss && m.vol === mine?.vol);
    if (row?.state !== 'PAIR' && spec.autoFailover !== 'allowDataLoss') {
      return `its mirror is ${row?.state ?? 'unknown'} in etcd, not PAIR, so it may lack acknowledged writes: run \`pair takeover\` by hand to accept that`;
    }
    return null;
  }

  private systemOf(pair: PairController): number | undefined {
    return this.systems.find((ss) => ss.pairs.get(pair.name) === pair)?.spec.id;
  }

  async close(): Promise<void> {
    this.closed = true;
    if (this.timer) clearTimeout(this.timer);
    await this.store.close();
  }
}

function seedRow(config: ClusterConfig, p: PairConfig) {
  return {
    lv: { name: p.name, master: p.master, epoch: 1, mode: p.mode, size: volumeSize(config, p) },
    mirrors: p.mirrors.map((m) => ({ ...m, mode: p.mode, state: 'COPY' })),
  };
}

function volumeSize(config: ClusterConfig, p: PairConfig): number {
  const ss = config.storageSystems.find((s) => s.id === p.master.ss);
  return ss?.volumes.find((v) => v.id === p.master.vol)?.size ?? 1;
}

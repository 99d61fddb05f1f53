// A storage system: its volumes (memory or files in dataDir), its cache
// memory, the pairs whose volumes it holds, the sync daemon, and the NBD
// exports "vol<ID>" through which hosts reach the I/O processor.
//
// The stack of each volume is composed in volume-stack.ts. The pairs, whatever their kind,
// are PairControllers in one table (pair-controller.ts); faults are injected per volume and
// per link through the fault table (fault-table.ts).
import fs from 'node:fs';
import path from 'node:path';
import type { Logger } from 'pino';
import { startSystemIscsi, type PairMembership, type SystemIscsiSpec } from '../iscsi/wiring.js';
import type { IscsiServer } from '../iscsi/server.js';
import { ExportTable } from '../nbd/exports.js';
import { NbdServer } from '../nbd/server.js';
import type { ServerTls } from '../nbd/tls.js';
import { AllowList } from '../util/allow-list.js';
import { crashPoint } from '../util/crash-point.js';
import { CacheMemory } from './cache.js';
import type { FaultRequest, FaultStatus } from './fault-table.js';
import { SystemFaults } from './system-faults.js';
import { CurrentCopyDevice, currentExportName } from './current-copy.js';
import { LocalPair, type LocalPairContext } from './local-pair.js';
import type { PairSpec } from './pair.js';
import type { PairController } from './pair-controller.js';
import type { PeerTls } from './peer/link.js';
import { Peers } from './remote/peers.js';
import { RemotePair, type RemotePairSpec } from './remote/remote-pair.js';
import { PairCommandError, type AdminTarget, type IscsiSessionStatus, type PairBitmap, type PairStatus, type TargetMetrics, type SSReport, type VolRef } from './status.js';
import { SyncDaemon } from './sync-daemon.js';
import { SAMPLE_MS, ThroughputHistory, type PairTotals } from './throughput.js';
import { SvolGroup, type SvolGroupSpec } from './svol/group.js';
import { LogicalVolume, PvolVolume } from './svol/logical-volume.js';
import type { SvolGroupStatus } from './svol/status.js';
import { PROTOCOLS, totalCounters } from './volume-stats.js';
import { buildHostStack, closeVolumeStack, frontDevices, openVolumeStack, type FrontDevices, type VolumeStack } from './volume-stack.js';
import type { BlockDevice } from '../blockdev/types.js';
import { SlabPool } from '../blockdev/memory.js';
import type { ChapSecrets } from '../iscsi/chap.js';

/** A volume of a storage system, as the YAML's `volumes:` gives it (cluster/config.ts). */
export interface VolumeEntry {
  id: number;
  size: number;
  /** A target of its own for this volume (LUN 0) instead of the storage system's target. */
  iscsiTarget?: string;
  /** CHAP and allow-list of that target of its own; default: the storage system's (only one of chap and chapFile). */
  iscsiChap?: ChapSecrets;
  /** Absolute. */
  iscsiChapFile?: string;
  iscsiAllow?: string[];
  /** Who may attach its NBD export (util/allow-list.ts); default: the storage system's `allow`. */
  allow?: string[];
}

export interface StorageSystemSpec {
  id: number;
  nbd: { host: string; port: number };
  nbdSocket?: string;
  /** Shown in status; the admin server itself is started by the cluster layer. */
  admin?: string;
  /** Absolute; omitted -> volumes in memory. */
  dataDir?: string;
  cache?: { size: number; policy?: 'write-back' | 'write-through'; bypass?: number };
  volumes: VolumeEntry[];
  /** NBD STARTTLS on the host-facing listener (credentials already read). */
  tls?: ServerTls;
  /** Who may attach the NBD exports, unless a volume has its own list. */
  allow?: string[];
  /** Said once at start (loose key-file permissions and the like). */
  warnings?: string[];
  clusterSize: number;
  /** Pairs whose master and mirrors are all in this storage system. */
  pairs: PairSpec[];
  /** Pairs that span this storage system and others (docs/replication.md). */
  remotePairs?: RemotePairSpec[];
  /** Mutual TLS on the peer channel (credentials already read). */
  peerTls?: PeerTls;
  /** This storage system's control-channel address, when it has remote pairs. */
  peer?: { host: string; port: number };
  /** The storage systems it shares pairs with: where their control channel and NBD listen. */
  peers?: { id: number; peer: { host: string; port: number }; nbd: { host: string; port: number } }[];
  /** ms; default 5000. */
  peerTimeout?: number;
  /** The iSCSI target of this storage system (docs/iscsi.md). */
  iscsi?: SystemIscsiSpec;
  /** Faults to inject from the start (the YAML's `faults:` that concern this storage system). */
  faults?: FaultRequest[];
  /** P-VOLs with their S-VOL groups (docs/svol.md). */
  svolGroups?: SvolGroupSpec[];
}

/** Why master volume `vol` of `pair` in `ss` must refuse host I/O now (ESHUTDOWN), or null. */
export type HostGuard = (ss: StorageSystem, pair: PairController, vol: number) => string | null;

/** What the cluster layer (etcd) hooks into a storage system. */
export interface ClusterHooks {
  hostGuard?: HostGuard;
  /** A pair across storage systems suspended: record its mirrors outdated before writes go on. */
  onSuspend?: (pair: string, mirrors: VolRef[], reason: string) => Promise<void>;
}

export type SvolCommand = 'init' | 'split' | 'resync' | 'restore' | 'attr' | 'verify';

export class StorageSystem implements AdminTarget {
  readonly nbd: NbdServer;
  iscsi?: IscsiServer;
  private iscsiAddress = '';
  readonly daemon: SyncDaemon;
  /** Every pair whose volumes this storage system holds, whatever its kind. */
  readonly pairs = new Map<string, PairController>();
  /** The peer channel: links, listener, peer exports, our parts of pairs across storage systems (their run-time joins, reshapes and leaves). */
  readonly peers: Peers;
  private readonly volumes = new Map<number, VolumeStack>();
  /** Volume id -> the pair holding it. */
  private readonly pairOf = new Map<number, PairController>();
  /** S-VOL groups by name (svol/group.ts). */
  readonly svolGroups = new Map<string, SvolGroup>();
  /** Logical ID -> what hosts reach it through (NBD and iSCSI). */
  private readonly logicalHosts = new Map<number, FrontDevices>();
  private cache: CacheMemory | undefined;
  /** The memory of its memory volumes, one pool: pages pass between them without a copy (memory.ts). */
  private readonly pool = new SlabPool();
  private nbdAddress = '';
  /** Set by the cluster layer (etcd): why a master volume must refuse I/O now, or null. */
  private hostGuard: ((pair: PairController, vol: number) => string | null) | null = null;
  private onSuspend: ClusterHooks['onSuspend'];
  /** Each pair's recent throughput, for the dashboard's sparklines (throughput.ts). */
  private readonly throughput = new ThroughputHistory();
  private throughputTimer: NodeJS.Timeout | undefined;
  private readonly faultTable: SystemFaults;

  private constructor(
    /** As started, then as last reconfigured (reconfigure.ts). */
    public spec: StorageSystemSpec,
    private readonly log: Logger,
  ) {
    this.nbd = new NbdServer({ exports: new ExportTable(), log, ...(spec.tls ? { tls: spec.tls } : {}) });
    this.daemon = new SyncDaemon({ log });
    this.peers = new Peers({
      spec: () => this.spec,
      log,
      daemon: this.daemon,
      volumes: this.volumes,
      nbd: this.nbd,
      onSuspend: () => this.onSuspend,
      addPair: (p) => this.addPair(p),
      removePair: (p) => {
        this.pairs.delete(p.name);
        for (const vol of p.volumes) this.pairOf.delete(vol);
      },
      reexport: (v) => {
        this.nbd.exports.remove(`vol${v.id}`);
        this.nbd.exports.remove(currentExportName(v.id));
        this.exportVolume(v);
      },
    });
    this.faultTable = new SystemFaults(spec.id, this.volumes, this.peers.links, this.log);
  }

  /** Open volumes, build pairs and exports, and start serving. A host guard (the cluster layer's fencing) applies from the first request. */
  static async start(spec: StorageSystemSpec, log: Logger, opts: ClusterHooks = {}): Promise<StorageSystem> {
    const ss = new StorageSystem(spec, log.child({ ss: spec.id }));
    for (const w of spec.warnings ?? []) ss.log.warn(w);
    if (opts.hostGuard) ss.hostGuard = (pair, vol) => opts.hostGuard!(ss, pair, vol);
    ss.onSuspend = opts.onSuspend;
    try {
      await ss.open();
      await ss.listen();
      ss.throughputTimer = setInterval(() => ss.sampleThroughput(), SAMPLE_MS).unref();
    } catch (e) {
      await ss.close().catch(() => {});
      throw e;
    }
    return ss;
  }

  private async open(): Promise<void> {
    const { spec } = this;
    const dir = spec.dataDir ? path.join(spec.dataDir, 'pairs') : undefined;
    if (dir) fs.mkdirSync(dir, { recursive: true });
    if (spec.cache) this.cache = new CacheMemory({ size: spec.cache.size, bypass: spec.cache.bypass, log: this.log });
    if (this.cache) this.cache.writeThrough = spec.cache?.policy === 'write-through';

    // The volume stacks (volume-stack.ts): bottom halves first, as the pairs write through them.
    for (const v of spec.volumes) this.volumes.set(v.id, await openVolumeStack(spec.id, v, { ...(spec.dataDir ? { dataDir: spec.dataDir } : {}), ...(this.cache ? { cache: this.cache } : {}), pool: this.pool }));
    const views = new Map([...this.volumes.values()].map((v) => [v.id, { device: v.device, createdEmpty: v.createdEmpty }]));

    for (const p of spec.pairs) this.addPair(new LocalPair(p, this.localPairContext(views, dir)));
    for (const p of this.openLinks()) this.addPair(p);
    for (const p of this.pairs.values()) await p.open();
    // S-VOL groups: members are reached only through their logical IDs, never as vol<physical>.
    const hidden = new Set<number>();
    const pvolLayer = new Map<number, PvolVolume>();
    const svolDir = spec.dataDir ? path.join(spec.dataDir, 'svol') : undefined;
    for (const g of spec.svolGroups ?? []) {
      const group = new SvolGroup(g, { clusterSize: spec.clusterSize, volumes: this.volumes, dir: svolDir, log: this.log });
      await group.open();
      this.svolGroups.set(g.name, group);
      for (const vol of group.volumes) if (vol !== g.pvol) hidden.add(vol);
      pvolLayer.set(g.pvol, new PvolVolume(this.volumes.get(g.pvol)!.device, group));
      group.logicalIds.forEach((id, i) => this.logicalHosts.set(id, frontDevices(new LogicalVolume(group, i, this.volumes)).front));
    }
    if (this.peers.links.size > 0) await this.peers.listen();

    for (const v of this.volumes.values()) {
      const pair = this.pairOf.get(v.id);
      // NBD's top of the stack; iSCSI takes its own (listen()), over the same layers and range locks.
      const host = buildHostStack(v, pair?.hostDevice(v.id) ?? pvolLayer.get(v.id), this.guardOf(v.id)).nbd;
      if (hidden.has(v.id)) continue;
      // The other storage systems of a pair across systems read this volume over the peer channel (a mirror's Invalid clusters).
      if (pair instanceof RemotePair) this.peers.exportVolume(v, pair);
      this.exportVolume(v);
    }
    for (const [id, { nbd: host }] of this.logicalHosts) {
      const group = [...this.svolGroups.values()].find((g) => g.logicalIds.includes(id))!;
      const allow = spec.allow;
      this.nbd.exports.add({ name: `vol${id}`, description: `SS${spec.id} vol${id}: logical S-VOL of group ${group.name}`, device: host, readOnly: false, ...(allow?.length ? { allow: new AllowList(allow) } : {}) });
    }
    for (const f of spec.faults ?? []) this.setFault(f);
  }

  private localPairContext(volumes: LocalPairContext['volumes'], dir: string | undefined): LocalPairContext {
    return { self: this.spec.id, clusterSize: this.spec.clusterSize, volumes, daemon: this.daemon, dir, log: this.log };
  }

  /**
   * The guard of volume `vol`'s host stack, where the cluster layer fences (etcd): none on the
   * YAML-only path. It looks the pair up on each request: a volume may join or leave a pair at
   * run time (reconfigure.ts).
   */
  private guardOf(vol: number): (() => string | null) | undefined {
    const hostGuard = this.hostGuard;
    if (!hostGuard) return undefined;
    return () => {
      const pair = this.pairOf.get(vol);
      return pair && pair.roleOf(vol) === 'master' ? hostGuard(pair, vol) : null;
    };
  }

  /** The NBD exports of a volume: vol<ID>, and vol<ID>@current (the CFS's: it fails rather than serve a copy that is not current). */
  private exportVolume(v: VolumeStack): void {
    const { spec } = this;
    const pair = this.pairOf.get(v.id);
    const host = v.front!.nbd;
    const pvolOf = [...this.svolGroups.values()].find((g) => g.spec.pvol === v.id);
    const description = pair ? `${pair.roleOf(v.id)} of ${pair.name}` : pvolOf ? `P-VOL of S-VOL group ${pvolOf.name}` : 'simplex volume';
    const allow = spec.volumes.find((x) => x.id === v.id)?.allow ?? spec.allow;
    const acl = allow?.length ? { allow: new AllowList(allow) } : {};
    this.nbd.exports.add({ name: `vol${v.id}`, description: `SS${spec.id} vol${v.id}: ${description}`, device: host, readOnly: false, ...acl });
    const current = pair ? new CurrentCopyDevice(host, () => pair.staleReason(v.id)) : host;
    this.nbd.exports.add({ name: currentExportName(v.id), description: `SS${spec.id} vol${v.id}, current data only`, device: current, readOnly: false, hidden: true, ...acl });
  }

  // ---- live reconfiguration (reconfigure.ts plans the changes and undoes them on failure) ----

  /** Clients attached to volume `vol` now: NBD connections to its exports, and any iSCSI session of this storage system. */
  hostsOn(vol: number): number {
    return this.nbd.connectionsTo(`vol${vol}`) + this.nbd.connectionsTo(currentExportName(vol)) + (this.iscsi ? this.iscsiSessions().length : 0);
  }

  /** A new simplex volume, exported at once. In memory, or dataDir/vol<ID>.img (kept, with its data, if it exists). */
  async addVolume(entry: VolumeEntry): Promise<void> {
    const { spec } = this;
    const v = await openVolumeStack(spec.id, entry, { ...(spec.dataDir ? { dataDir: spec.dataDir } : {}), ...(this.cache ? { cache: this.cache } : {}), pool: this.pool });
    this.volumes.set(v.id, v);
    buildHostStack(v, undefined, this.guardOf(v.id));
    this.exportVolume(v);
    this.log.info({ vol: v.id, size: v.size }, `volume ${v.id} added`);
  }

  /** Stop exporting a simplex volume; it stays open (for an undo) until `closeDetached`. */
  detachVolume(vol: number): VolumeStack {
    const v = this.volumes.get(vol)!;
    this.nbd.exports.remove(`vol${vol}`);
    this.nbd.exports.remove(currentExportName(vol));
    this.volumes.delete(vol);
    return v;
  }

  /** Export a detached volume again (the undo of a removal). */
  reattachVolume(v: VolumeStack): void {
    this.volumes.set(v.id, v);
    this.exportVolume(v);
  }

  /** Close a detached volume for good: the cache destages it; its file stays in dataDir. */
  async closeDetached(v: VolumeStack): Promise<void> {
    await closeVolumeStack(v);
    this.log.info({ vol: v.id }, `volume ${v.id} removed`);
  }

  /** The controller's view of a volume (below any pair), for copying data across a resize. */
  volumeDevice(vol: number): BlockDevice | undefined {
    return this.volumes.get(vol)?.device;
  }

  /**
   * Replace pair `old` (or none) by a pair of `spec` (or none), under held host I/O: the
   * volumes of both stop at their switch layer, the old pair closes (daemon copies finished,
   * bits persisted), the new one opens from `seed` (default: the old pair's bits, a new mirror
   * all Invalid), and each volume resumes on its new pair layer, or as simplex.
   * Returns the bits the old pair had, for an undo.
   */
  async replaceLocalPair(old: string | null, spec: PairSpec | null, seed?: Map<string, Uint8Array>): Promise<Map<string, Uint8Array>> {
    const before = old === null ? undefined : this.pairs.get(old);
    if (before !== undefined && !(before instanceof LocalPair)) throw new Error(`pair ${old} spans storage systems`);
    const vols = new Set([...(before?.volumes ?? []), ...(spec ? [spec.master.vol, ...spec.mirrors.map((m) => m.vol)] : [])]);
    const stacks = [...vols].map((id) => this.volumes.get(id)!);
    await Promise.all(stacks.map((v) => v.slot!.hold()));
    const bits = before?.bits() ?? new Map<string, Uint8Array>();
    let after: LocalPair | undefined;
    try {
      if (before) {
        await before.close();
        crashPoint('rebuild:old-closed');
        this.pairs.delete(before.name);
        for (const vol of before.volumes) this.pairOf.delete(vol);
        if (spec === null || spec.name !== before.name) before.removeFiles();
      }
      if (spec) {
        const views = new Map(stacks.map((v) => [v.id, { device: v.device, createdEmpty: false }]));
        after = new LocalPair(spec, { ...this.localPairContext(views, this.pairDir), seed: seed ?? bits });
        await after.open();
        this.addPair(after);
      }
    } finally {
      for (const v of stacks) {
        v.slot!.release(this.pairOf.get(v.id)?.hostDevice(v.id) ?? v.device);
        this.nbd.exports.remove(`vol${v.id}`);
        this.nbd.exports.remove(currentExportName(v.id));
        this.exportVolume(v);
      }
    }
    return bits;
  }

  private get pairDir(): string | undefined {
    return this.spec.dataDir ? path.join(this.spec.dataDir, 'pairs') : undefined;
  }

  /** peerTimeout at run time: every link and pair across storage systems. */
  setPeerTimeout(ms: number): void {
    for (const l of this.peers.links.values()) l.setTimeoutMs(ms);
    for (const p of this.pairs.values()) if (p instanceof RemotePair) p.setPeerTimeout(ms);
  }

  /** The cache's bypass size at run time (cache/memory.ts, rule 5): later writes follow it. */
  setCacheBypass(bytes: number): void {
    if (this.cache) this.cache.bypassBytes = bytes;
  }

  /** The cache policy at run time; going write-through first destages what is dirty. */
  async setCachePolicy(policy: 'write-back' | 'write-through'): Promise<void> {
    if (!this.cache) return;
    this.cache.writeThrough = policy === 'write-through';
    if (policy === 'write-through') await this.cache.destageAll();
  }

  private addPair(p: PairController): void {
    this.pairs.set(p.name, p);
    for (const vol of p.volumes) this.pairOf.set(vol, p);
  }

  /** The control channels to the storage systems we share pairs with, and our parts of those pairs. */
  private openLinks(): PairController[] {
    const { spec } = this;
    const remote = spec.remotePairs ?? [];
    if (remote.length === 0) return [];
    for (const peer of spec.peers ?? []) this.peers.linkTo(peer);
    for (const given of remote) this.peers.remotes.set(given.name, this.peers.remotePair(given));
    return [...this.peers.remotes.values()];
  }

  private async listen(): Promise<void> {
    const { spec } = this;
    this.nbdAddress = await this.nbd.listen({ kind: 'tcp', ...spec.nbd });
    if (spec.nbdSocket) await this.nbd.listen({ kind: 'unix', path: spec.nbdSocket });
    // iSCSI serves the same host devices as NBD: one controller path, and COMPARE AND WRITE atomic across both.
    const hidden = new Set([...this.svolGroups.values()].flatMap((g) => g.volumes.filter((v) => v !== g.spec.pvol)));
    const vols: Parameters<typeof startSystemIscsi>[2] = spec.volumes
      .filter((v) => !hidden.has(v.id))
      .map((v) => ({
        id: v.id,
        device: this.volumes.get(v.id)!.front!.iscsi,
        member: (): PairMembership => {
          const pair = this.pairOf.get(v.id);
          return pair ? { pair: pair.name, role: pair.roleOf(v.id), acrossSystems: pair.volumes.length === 1 } : undefined;
        },
        ...(v.iscsiTarget ? { target: v.iscsiTarget } : {}),
        ...(v.iscsiChap ? { chap: v.iscsiChap } : {}),
        ...(v.iscsiChapFile ? { chapFile: v.iscsiChapFile } : {}),
        ...(v.iscsiAllow ? { allow: v.iscsiAllow } : {}),
      }));
    // A logical S-VOL is a LUN under its logical ID: an RO member is write protected.
    for (const [id, front] of this.logicalHosts) vols.push({ id, device: front.iscsi });
    if (spec.iscsi) {
      const started = await startSystemIscsi(spec.id, spec.iscsi, vols, spec.dataDir, this.log);
      this.iscsi = started.server;
      this.iscsiAddress = started.address;
    }
    this.log.info({ nbd: this.nbdAddress, socket: spec.nbdSocket, volumes: [...this.nbd.exports.list()].map((e) => e.name) }, `storage system ${spec.id} serving NBD on ${this.nbdAddress}`);
    // Sessions start once our own NBD listener is up: the peers' data connections come to it.
    for (const link of this.peers.links.values()) link.start();
  }

  /** The NBD address actually bound (port 0 in the config picks a free port). */
  get nbdAddr(): string {
    return this.nbdAddress;
  }

  report(): SSReport {
    const c = this.cache?.stats;
    const faults = this.faults();
    return {
      storageSystems: [
        {
          id: this.spec.id,
          nbd: this.nbdAddress,
          ...(this.spec.nbdSocket ? { nbdSocket: this.spec.nbdSocket } : {}),
          admin: this.spec.admin ?? '',
          ...(c && this.spec.cache ? { cache: { size: this.spec.cache.size, dirtyBytes: c.dirtyBytes, usedBytes: c.usedBytes, hits: c.hits, misses: c.misses, policy: this.cache!.writeThrough ? 'write-through' : 'write-back', bypass: this.cache!.bypassBytes, bypassedBytes: c.bypassedBytes } } : {}),
          peerTimeout: this.spec.peerTimeout ?? 5000,
          ...(this.peers.links.size > 0
            ? { peers: [...this.peers.links.values()].map((l) => ({ ss: l.peer, connected: l.up, ...(l.up || !l.lastError ? {} : { error: l.lastError }) })) }
            : {}),
          ...(faults.length > 0 ? { faults } : {}),
          ...(this.iscsi ? { iscsi: { address: this.iscsiAddress, sessions: this.iscsiSessions() } } : {}),
          volumes: [...this.volumes.values()].map((v) => {
            const pair = this.pairOf.get(v.id);
            return {
              id: v.id,
              export: `vol${v.id}`,
              size: v.size,
              role: pair ? pair.roleOf(v.id) : ('simplex' as const),
              ...(pair ? { pair: pair.name } : {}),
              ...totalCounters(v.io!),
            };
          }),
        },
      ],
      pairs: [...this.pairs.values()].map((p) => this.withThroughput(p.status())),
      ...(this.svolGroups.size > 0 ? { svolGroups: [...this.svolGroups.values()].map((g) => g.status()) } : {}),
    };
  }

  /** The running totals of the pairs whose master is here: the master's storage system measures a pair. */
  private sampleThroughput(): void {
    const totals = new Map<string, PairTotals>();
    for (const p of this.pairs.values()) {
      const s = p.status();
      const io = s.master.ss === this.spec.id ? this.volumes.get(s.master.vol)?.io : undefined;
      const host = io ? totalCounters(io) : undefined;
      if (host) totals.set(p.name, { readBytes: host.readBytes, writeBytes: host.writeBytes, copiedBytes: s.mirrors.reduce((n, m) => n + m.copiedBytes, 0) });
    }
    this.throughput.sample(totals);
  }

  private withThroughput(s: PairStatus): PairStatus {
    const t = this.throughput.of(s.name);
    return t ? { ...s, throughput: t } : s;
  }

  // ---- S-VOL groups (svol/group.ts) ----

  private svolGroup(name: string): SvolGroup {
    const g = this.svolGroups.get(name);
    if (!g) throw new PairCommandError('not-found', `no S-VOL group named ${name} in storage system ${this.spec.id}${this.svolGroups.size ? ` (it has ${[...this.svolGroups.keys()].join(', ')})` : ''}`);
    return g;
  }

  svolStatus(name: string): SvolGroupStatus {
    return this.svolGroup(name).status();
  }

  async svolCommand(name: string, command: SvolCommand, opts: { member?: string; attr?: 'RO' | 'RW' | 'spare' } = {}): Promise<SvolGroupStatus> {
    const g = this.svolGroup(name);
    if ((command === 'restore' || command === 'attr') && opts.member === undefined) throw new PairCommandError('refused', `${command} ${name}: name the member (its logical ID)`);
    if (command === 'init') await g.init();
    else if (command === 'split') await g.split();
    else if (command === 'resync') await g.resync(opts.member);
    else if (command === 'restore') await g.restore(opts.member!);
    else if (command === 'verify') await g.verify();
    else {
      if (opts.attr === undefined) throw new PairCommandError('refused', `attr ${name} ${opts.member}: give the attribute, RO, RW or spare`);
      await g.setAttr(opts.member!, opts.attr);
    }
    return g.status();
  }

  private pair(name: string): PairController {
    const p = this.pairs.get(name);
    if (!p) throw new PairCommandError('no-such-pair', `no pair named ${name} in storage system ${this.spec.id}`);
    return p;
  }

  /** Starts a verify in the background; its progress is in the pair's status. */
  async verify(name: string): Promise<PairStatus> {
    const p = this.pair(name);
    await p.verify();
    return p.status();
  }

  async swap(name: string): Promise<PairStatus> {
    const p = this.pair(name);
    await p.swap();
    return p.status();
  }

  async takeover(name: string): Promise<PairStatus> {
    const p = this.pair(name);
    await p.takeover();
    return p.status();
  }

  async split(name: string): Promise<PairStatus> {
    const p = this.pair(name);
    await p.split();
    return p.status();
  }

  async resync(name: string): Promise<PairStatus> {
    const p = this.pair(name);
    await p.resync();
    return p.status();
  }

  bitmap(name: string, buckets: number): PairBitmap {
    return this.pair(name).bitmap(buckets);
  }

  metrics(): TargetMetrics {
    return {
      // Per front end; iSCSI only where this storage system has a target.
      volumes: [...this.volumes.values()].flatMap((v) =>
        PROTOCOLS.filter((p) => p === 'nbd' || this.iscsi).map((protocol) => ({ id: v.id, protocol, counters: v.io![protocol].counters, latency: v.io![protocol].latency })),
      ),
      nbd: { connections: this.nbd.stats.connections, totalConnections: this.nbd.stats.totalConnections },
      ...(this.iscsi ? { iscsi: { sessions: this.iscsiSessions().length } } : {}),
      ...(this.spec.dataDir ? {} : { memory: { bytes: this.pool.slabBytes, sharedBytes: this.pool.sharedBytes, evictions: this.pool.evictions, compactions: this.pool.compactions } }),
    };
  }

  private iscsiSessions(): IscsiSessionStatus[] {
    return (this.iscsi?.sessions() ?? [])
      .filter((s) => !s.discovery)
      .map((s) => ({ initiator: s.initiator, address: s.address, target: s.target, connections: s.connections, luns: s.luns, commands: s.commands, readBytes: s.readBytes, writeBytes: s.writeBytes }));
  }

  // ---- fault injection (system-faults.ts) ----

  /** Set a fault on one of our volumes, or on our end of a link; refused with a clear line otherwise. */
  setFault(req: FaultRequest): FaultStatus[] {
    return this.faultTable.set(req);
  }

  /** Clear the faults of a target (every kind, or one). */
  clearFault(targetText: string, kind?: string): FaultStatus[] {
    return this.faultTable.clear(targetText, kind);
  }

  faults(): FaultStatus[] {
    return this.faultTable.list();
  }

  /** Graceful stop: finish NBD requests, stop the daemon, destage the cache, persist bitmaps. */
  async close(): Promise<void> {
    clearInterval(this.throughputTimer);
    await this.iscsi?.close();
    await this.nbd.close();
    await this.peers.close();
    await this.daemon.stop();
    // An offline fault would hold the destage forever: a stopping storage system lets go of its faults.
    for (const v of this.volumes.values()) v.faults.clear();
    for (const p of this.pairs.values()) await p.close();
    for (const g of this.svolGroups.values()) await g.close();
    await this.cache?.close();
    for (const v of this.volumes.values()) await closeVolumeStack(v);
  }
}

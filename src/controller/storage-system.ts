// A storage system: its volumes (memory or files in dataDir), its cache
// memory, the pairs whose volumes it holds, the sync daemon, and the NBD
// exports "vol<ID>" through which hosts reach the I/O processor.
//
// Stack of one volume, top to bottom:
//   CountingDevice (host I/O counters)
//     -> MasterVolume | MirrorVolume (pair write/read modules)   [paired volumes]
//       -> CachedDevice (cache memory, if configured)
//         -> FileDevice | MemoryDevice (the volume itself)
import fs from 'node:fs';
import path from 'node:path';
import type { Logger } from 'pino';
import { MemoryDevice } from '../blockdev/memory.js';
import { openFileDevice } from '../blockdev/file.js';
import type { BlockDevice, Extent, Payload, ZeroOptions } from '../blockdev/types.js';
import { AtomicDevice } from '../blockdev/atomic.js';
import { startSystemIscsi, type SystemIscsiSpec } from '../iscsi/wiring.js';
import type { IscsiServer } from '../iscsi/server.js';
import { ExportTable } from '../nbd/exports.js';
import { NbdServer } from '../nbd/server.js';
import { CacheMemory } from './cache.js';
import { FileBitmapStore, MemoryBitmapStore, type BitmapStore } from './bitmap-store.js';
import { Pair, PairStateError, type PairSpec } from './pair.js';
import { PeerLink, PeerServer } from './peer-link.js';
import { readPairState, savePairState } from './pair-files.js';
import { RemotePair, type RemotePairSpec } from './remote-pair.js';
import { SyncDaemon } from './sync-daemon.js';
import { CountingDevice } from './volume-stats.js';
import { PairCommandError, type AdminTarget, type PairBitmap, type PairStatus, type SSReport, type TargetMetrics, type VolRef, type VolumeRole } from './status.js';

export interface StorageSystemSpec {
  id: number;
  nbd: { host: string; port: number };
  nbdSocket?: string;
  /** Shown in status; the admin server itself is started by the cluster layer. */
  admin?: string;
  /** Absolute; omitted -> volumes in memory. */
  dataDir?: string;
  cache?: { size: number };
  volumes: { id: number; size: number; iscsiTarget?: string }[];
  clusterSize: number;
  /** Pairs whose master and mirrors are all in this storage system. */
  pairs: PairSpec[];
  /** Pairs that span this storage system and others (docs/replication.md). */
  remotePairs?: RemotePairSpec[];
  /** This storage system's control-channel address, when it has remote pairs. */
  peer?: { host: string; port: number };
  /** The storage systems it shares pairs with: where their control channel and NBD listen. */
  peers?: { id: number; peer: { host: string; port: number }; nbd: { host: string; port: number } }[];
  /** ms; default 5000. */
  peerTimeout?: number;
  /** The iSCSI target of this storage system (docs/iscsi.md). */
  iscsi?: SystemIscsiSpec;
}

interface Volume {
  id: number;
  size: number;
  /** The volume's own storage, below any cache. */
  backing: BlockDevice;
  /** What the controller reads and writes (the cache when there is one). */
  device: BlockDevice;
  /** Was the backing file created by this start (so it holds only zeroes)? */
  fresh: boolean;
  role: VolumeRole;
  pair?: string;
  host?: CountingDevice;
  /** The host device every front end (NBD, iSCSI) calls: COMPARE AND WRITE is atomic against all writes. */
  atomic?: AtomicDevice;
}

export class StorageSystem implements AdminTarget {
  readonly nbd: NbdServer;
  iscsi?: IscsiServer;
  readonly daemon: SyncDaemon;
  readonly pairs = new Map<string, Pair>();
  readonly remotePairs = new Map<string, RemotePair>();
  private readonly links = new Map<number, PeerLink>();
  private peerServer: PeerServer | null = null;
  private readonly volumes = new Map<number, Volume>();
  private cache: CacheMemory | undefined;
  private nbdAddress = '';

  private constructor(
    readonly spec: StorageSystemSpec,
    private readonly log: Logger,
  ) {
    this.nbd = new NbdServer({ exports: new ExportTable(), log });
    this.daemon = new SyncDaemon({ log });
  }

  /** Open volumes, build pairs and exports, and start serving. */
  static async start(spec: StorageSystemSpec, log: Logger): Promise<StorageSystem> {
    const ss = new StorageSystem(spec, log.child({ ss: spec.id }));
    try {
      await ss.open();
      await ss.listen();
    } catch (e) {
      await ss.close().catch(() => {});
      throw e;
    }
    return ss;
  }

  private async open(): Promise<void> {
    const { spec } = this;
    if (spec.dataDir) fs.mkdirSync(path.join(spec.dataDir, 'pairs'), { recursive: true });
    if (spec.cache) this.cache = new CacheMemory({ size: spec.cache.size, log: this.log });

    for (const v of spec.volumes) {
      let backing: BlockDevice;
      let fresh = true;
      if (spec.dataDir) {
        const file = path.join(spec.dataDir, `vol${v.id}.img`);
        fresh = !fs.existsSync(file);
        backing = await openFileDevice(file, { size: v.size });
      } else backing = new MemoryDevice(v.size);
      const device = this.cache ? this.cache.wrap(backing, `vol${v.id}`) : backing;
      this.volumes.set(v.id, { id: v.id, size: v.size, backing, device, fresh, role: 'simplex' });
    }

    for (const p of spec.pairs) await this.openPair(p);
    await this.openRemotePairs();

    for (const v of this.volumes.values()) {
      let dev: BlockDevice = v.device;
      const pair = v.pair ? this.pairs.get(v.pair) : undefined;
      const remote = v.pair ? this.remotePairs.get(v.pair) : undefined;
      if (pair && v.role === 'master') dev = pair.masterDevice();
      if (pair && v.role === 'mirror') dev = pair.mirrorDevice(pair.mirrors.findIndex((m) => m.ref.vol === v.id));
      // The role of a volume in a pair across storage systems can change (swap, takeover): ask each time.
      if (remote) dev = new RoleDevice(() => remote.hostDevice(v.id));
      v.host = new CountingDevice(dev);
      v.atomic = new AtomicDevice(v.host);
      const description = v.pair ? `${v.role} of ${v.pair}` : 'simplex volume';
      this.nbd.exports.add({ name: `vol${v.id}`, description: `SS${spec.id} vol${v.id}: ${description}`, device: v.atomic, readOnly: false });
    }
  }

  private async openPair(p: PairSpec): Promise<void> {
    const { spec } = this;
    const vol = (ref: VolRef): Volume => {
      const v = this.volumes.get(ref.vol);
      if (ref.ss !== spec.id || !v) throw new Error(`pair ${p.name}: ss${ref.ss}/vol${ref.vol} is not a volume of storage system ${spec.id}`);
      return v;
    };
    const master = vol(p.master);
    const mirrors = p.mirrors.map(vol);
    master.role = 'master';
    master.pair = p.name;
    for (const m of mirrors) {
      m.role = 'mirror';
      m.pair = p.name;
    }
    const clusters = Math.ceil(master.size / spec.clusterSize);
    let store: BitmapStore;
    let loaded: Uint8Array[] | null = null;
    const statePath = spec.dataDir ? path.join(spec.dataDir, 'pairs', `${p.name}.state.json`) : undefined;
    if (spec.dataDir) {
      const opened = await FileBitmapStore.open(path.join(spec.dataDir, 'pairs', `${p.name}.bitmap`), {
        clusterSize: spec.clusterSize,
        clusters,
        mirrors: mirrors.length,
      });
      store = opened.store;
      loaded = opened.loaded;
    } else store = new MemoryBitmapStore(clusters, mirrors.length);

    // Known identical: every volume of the pair was created empty by this start.
    const identical = master.fresh && mirrors.every((m) => m.fresh);
    const pair = new Pair({
      name: p.name,
      mode: p.mode,
      clusterSize: spec.clusterSize,
      master: { ref: p.master, device: master.device },
      mirrors: mirrors.map((m, i) => ({ ref: p.mirrors[i]!, device: m.device })),
      store,
      loaded,
      identical,
      initialState: readPairState(statePath),
      syncRate: p.syncRate,
      ...(p.fence ? { fence: p.fence } : {}),
      log: this.log,
      onInvalid: () => this.daemon.wake(),
      onHostWrite: () => this.daemon.noteHostIo(),
      onStateChange: (state) => savePairState(statePath, state),
    });
    this.pairs.set(p.name, pair);
    this.daemon.add(pair);
    this.log.info({ pair: p.name, mode: p.mode, state: pair.state, invalid: pair.mirrors.map((m) => m.bitmap.invalidCount) }, 'pair ready');
  }

  private async openRemotePairs(): Promise<void> {
    const { spec } = this;
    const remote = spec.remotePairs ?? [];
    if (remote.length === 0) return;
    const timeoutMs = spec.peerTimeout ?? 5000;
    const nbd = new Map<number, { host: string; port: number }>([[spec.id, spec.nbd]]);
    for (const peer of spec.peers ?? []) {
      nbd.set(peer.id, peer.nbd);
      const link = new PeerLink({ self: spec.id, peer: peer.id, address: peer.peer, timeoutMs, log: this.log });
      this.links.set(peer.id, link);
      for (const op of ['attach', 'swap', 'snapshot', 'bits', 'state', 'resync', 'hashes']) {
        link.onRequest(op, (msg) => {
          const rp = this.remotePairs.get(String(msg.pair));
          if (!rp || !rp.copies.some((c) => c.ss === peer.id)) throw new Error(`storage system ${spec.id} has no pair ${String(msg.pair)} shared with storage system ${peer.id}`);
          return rp.handle(peer.id, msg);
        });
      }
    }
    for (const p of remote) {
      for (const ref of [p.master, ...p.mirrors]) {
        if (ref.ss !== spec.id) continue;
        const v = this.volumes.get(ref.vol);
        if (!v) throw new Error(`pair ${p.name}: ss${ref.ss}/vol${ref.vol} is not a volume of storage system ${spec.id}`);
        v.pair = p.name;
        v.role = ref === p.master ? 'master' : 'mirror';
      }
      const dir = spec.dataDir ? path.join(spec.dataDir, 'pairs') : undefined;
      const clusters = (size: number) => Math.ceil(size / spec.clusterSize);
      const mine = [p.master, ...p.mirrors].filter((r) => r.ss === spec.id);
      const size = this.volumes.get(mine[0]!.vol)!.size;
      const rp = new RemotePair(p, {
        self: spec.id,
        clusterSize: spec.clusterSize,
        peerTimeout: timeoutMs,
        volumes: new Map(mine.map((r) => [r.vol, { device: this.volumes.get(r.vol)!.device, fresh: this.volumes.get(r.vol)!.fresh }])),
        links: this.links,
        nbd,
        exports: this.nbd.exports,
        daemon: this.daemon,
        openStore: async (slots) => {
          if (!dir) return { store: new MemoryBitmapStore(clusters(size), slots), loaded: null };
          return FileBitmapStore.open(path.join(dir, `${p.name}.bitmap`), { clusterSize: spec.clusterSize, clusters: clusters(size), mirrors: slots });
        },
        ...(dir ? { generationFile: path.join(dir, `${p.name}.generation.json`), statePath: path.join(dir, `${p.name}.state.json`) } : {}),
        log: this.log,
      });
      this.remotePairs.set(p.name, rp);
      await rp.open();
    }
    if (spec.peer) {
      this.peerServer = new PeerServer(spec.id, this.links, this.log);
      await this.peerServer.listen(spec.peer);
    }
  }

  private async listen(): Promise<void> {
    const { spec } = this;
    this.nbdAddress = await this.nbd.listen({ kind: 'tcp', ...spec.nbd });
    if (spec.nbdSocket) await this.nbd.listen({ kind: 'unix', path: spec.nbdSocket });
    const vols = spec.volumes.map((v) => ({ id: v.id, device: this.volumes.get(v.id)!.atomic!, target: v.iscsiTarget }));
    if (spec.iscsi) this.iscsi = (await startSystemIscsi(spec.id, spec.iscsi, vols, spec.dataDir, this.log)).server;
    this.log.info({ nbd: this.nbdAddress, socket: spec.nbdSocket, volumes: [...this.volumes.keys()].map((v) => `vol${v}`) }, `storage system ${spec.id} serving NBD on ${this.nbdAddress}`);
    // Sessions start once our own NBD listener is up: the peers' data connections come to it.
    for (const link of this.links.values()) link.start();
  }

  /** The NBD address actually bound (port 0 in the config picks a free port). */
  get nbdAddr(): string {
    return this.nbdAddress;
  }

  report(): SSReport {
    const c = this.cache?.stats;
    return {
      storageSystems: [
        {
          id: this.spec.id,
          nbd: this.nbdAddress,
          ...(this.spec.nbdSocket ? { nbdSocket: this.spec.nbdSocket } : {}),
          admin: this.spec.admin ?? '',
          ...(c && this.spec.cache ? { cache: { size: this.spec.cache.size, dirtyBytes: c.dirtyBytes, usedBytes: c.usedBytes, hits: c.hits, misses: c.misses } } : {}),
          ...(this.links.size > 0
            ? { peers: [...this.links.values()].map((l) => ({ ss: l.peer, connected: l.up, ...(l.up || !l.lastError ? {} : { error: l.lastError }) })) }
            : {}),
          volumes: [...this.volumes.values()].map((v) => ({
            id: v.id,
            export: `vol${v.id}`,
            size: v.size,
            role: v.role,
            ...(v.pair ? { pair: v.pair } : {}),
            ...v.host!.counters,
          })),
        },
      ],
      pairs: [...this.pairs.values()].map((p) => p.status()).concat([...this.remotePairs.values()].map((p) => p.status())),
    };
  }

  private pair(name: string): Pair {
    const p = this.pairs.get(name) ?? this.remotePairs.get(name)?.pair;
    if (!p) {
      if (this.remotePairs.has(name)) throw new PairCommandError('refused', `storage system ${this.spec.id} holds a mirror of ${name}; ask the master's storage system`);
      throw new PairCommandError('no-such-pair', `no pair named ${name} in storage system ${this.spec.id}`);
    }
    return p;
  }

  /** Starts a verify in the background; its progress is in the pair's status. */
  async verify(name: string): Promise<PairStatus> {
    const rp = this.remotePairs.get(name);
    const p = rp ? rp.pairToVerify() : this.pair(name);
    if (p.verifyProgress?.running) throw new PairCommandError('refused', `${name}: a verify is already running`);
    void p.verify().catch((e: Error) => this.log.error({ pair: name, err: e.message }, 'verify failed'));
    return (rp ?? p).status();
  }

  async swap(name: string): Promise<PairStatus> {
    const rp = this.remotePairs.get(name);
    if (!rp) {
      this.pair(name);
      throw new PairCommandError('refused', `swap ${name}: master and mirror are in the same storage system; swap is for pairs across storage systems`);
    }
    await rp.swap();
    return rp.status();
  }

  async takeover(name: string): Promise<PairStatus> {
    const rp = this.remotePairs.get(name);
    if (!rp) {
      this.pair(name);
      throw new PairCommandError('refused', `takeover ${name}: master and mirror are in the same storage system; takeover is for pairs across storage systems`);
    }
    await rp.takeover();
    return rp.status();
  }

  async split(name: string): Promise<PairStatus> {
    const rp = this.remotePairs.get(name);
    if (rp) {
      await rp.split();
      return rp.status();
    }
    const p = this.pair(name);
    try {
      await p.split();
    } catch (e) {
      if (e instanceof PairStateError) throw new PairCommandError('refused', e.message);
      throw e;
    }
    return p.status();
  }

  async resync(name: string): Promise<PairStatus> {
    const rp = this.remotePairs.get(name);
    if (rp) {
      await rp.resync();
      return rp.status();
    }
    const p = this.pair(name);
    await p.resync();
    return p.status();
  }

  bitmap(name: string, buckets: number): PairBitmap {
    const p = this.pair(name);
    const mirrors = p.mirrors.map((m) => ({ ...m.ref, invalidClusters: m.bitmap.invalidCount, invalid: Array.from(m.bitmap.invalidPerBucket(buckets)) }));
    return { name, clusters: p.clusters, buckets: mirrors[0]?.invalid.length ?? 0, mirrors };
  }

  metrics(): TargetMetrics {
    return {
      volumes: [...this.volumes.values()].map((v) => ({ id: v.id, latency: v.host!.latency })),
      nbd: { connections: this.nbd.stats.connections, totalConnections: this.nbd.stats.totalConnections },
    };
  }

  /** Graceful stop: finish NBD requests, stop the daemon, destage the cache, persist bitmaps. */
  async close(): Promise<void> {
    await this.iscsi?.close();
    await this.nbd.close();
    await this.peerServer?.close();
    for (const l of this.links.values()) l.close();
    await this.daemon.stop();
    for (const p of this.pairs.values()) await p.close();
    for (const p of this.remotePairs.values()) await p.close();
    await this.cache?.close();
    for (const v of this.volumes.values()) await v.device.close();
  }
}

/** A volume whose behaviour follows its current role in a pair across storage systems. */
class RoleDevice implements BlockDevice {
  constructor(private readonly current: () => BlockDevice) {}
  get size(): number {
    return this.current().size;
  }
  get readOnly(): boolean {
    return this.current().readOnly;
  }
  get multiConnSafe(): boolean {
    return this.current().multiConnSafe;
  }
  get fastZero(): boolean {
    return this.current().fastZero;
  }
  read(offset: number, dest: Buffer): Promise<void> {
    return this.current().read(offset, dest);
  }
  write(offset: number, data: Payload, fua?: boolean): Promise<void> {
    return this.current().write(offset, data, fua);
  }
  flush(): Promise<void> {
    return this.current().flush();
  }
  trim(offset: number, length: number, fua?: boolean): Promise<void> {
    return this.current().trim(offset, length, fua);
  }
  zero(offset: number, length: number, opts?: ZeroOptions): Promise<void> {
    return this.current().zero(offset, length, opts);
  }
  extents(offset: number, length: number): Promise<Extent[]> {
    return this.current().extents(offset, length);
  }
  async close(): Promise<void> {}
}

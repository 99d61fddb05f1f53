// What a storage system reports about itself: the shape of the admin API's
// GET /api/status and of `blockmirror status --json`.
import type { FaultRequest, FaultStatus } from './fault-table.js';
import type { IoCounters, LatencyHistogram, Protocol } from './volume-stats.js';
import type { SvolGroupStatus } from './svol/status.js';
import type { ThroughputSamples } from './throughput.js';

export type PairState = 'COPY' | 'PAIR' | 'PSUS' | 'PSUE';
export type PairMode = 'sync' | 'async';
export type VolumeRole = 'master' | 'mirror' | 'simplex';

export interface VolRef {
  ss: number;
  vol: number;
}

export interface VolumeStatus {
  id: number;
  /** NBD export name, "vol<ID>". */
  export: string;
  size: number;
  role: VolumeRole;
  /** Pair name when role is master or mirror. */
  pair?: string;
  readBytes: number;
  writeBytes: number;
  readOps: number;
  writeOps: number;
}

export interface StorageSystemStatus {
  id: number;
  /** NBD address "host:port" (and socket path if any). */
  nbd: string;
  nbdSocket?: string;
  admin: string;
  cache?: {
    size: number;
    dirtyBytes: number;
    usedBytes: number;
    hits: number;
    misses: number;
    policy?: 'write-back' | 'write-through';
    /** Writes of at least this many bytes go past the cache (0: none). */
    bypass?: number;
    /** Bytes those writes took straight to the volumes since start. */
    bypassedBytes?: number;
  };
  /** How long a silent peer storage system is given, ms (changes at run time with `blockmirror apply`). */
  peerTimeout?: number;
  /** Replication links to the storage systems this one shares pairs with. */
  peers?: PeerStatus[];
  /** Faults injected now (fault-table.ts), if any. */
  faults?: FaultStatus[];
  /** The iSCSI target of this storage system (docs/iscsi.md), with the sessions logged in now. */
  iscsi?: { address: string; sessions: IscsiSessionStatus[] };
  volumes: VolumeStatus[];
}

export interface MirrorStatus extends VolRef {
  invalidClusters: number;
  /** Fraction of clusters valid, 0..1 (1 when in sync). */
  syncProgress: number;
  /** Bytes the sync daemon has copied to this mirror since start. */
  copiedBytes: number;
  /** Bytes per second the sync daemon copied to this mirror over the last 10 s (copy-rate.ts). */
  copyRate?: number;
  /** Seconds until in sync at that rate: 0 in sync, null unknown (suspended, or nothing copied lately). */
  etaSeconds?: number | null;
  /** A mirror in another storage system: is the replication session up? */
  connected?: boolean;
}

export interface VerifyStatus {
  running: boolean;
  /** Clusters compared so far, over all mirrors. */
  checked: number;
  total: number;
  /** Clusters found different and marked Invalid. */
  differences: number;
  /** The first differing clusters (at most 100). */
  differing: number[];
  error?: string;
}

export interface PairStatus {
  name: string;
  mode: PairMode;
  state: PairState;
  master: VolRef;
  clusterSize: number;
  clusters: number;
  syncRate?: number;
  /** Why the pair is in PSUE, if it is. */
  error?: string;
  /** Sync pairs: what happens when a mirror cannot be written (never: suspend; data: refuse writes). */
  fence?: 'never' | 'data';
  /**
   * This storage system's part in the pair. A pair spanning storage systems is
   * reported by each of them: the master's report is the authoritative one.
   */
  role?: 'master' | 'mirror';
  /** Pairs spanning storage systems: the generation, bumped by swap and takeover. */
  epoch?: number;
  /** Reported by a mirror's storage system: it cannot hear its master, so its data may be stale. */
  stale?: boolean;
  /** The last or running verify. */
  verify?: VerifyStatus;
  mirrors: MirrorStatus[];
  /** Recent host and copy throughput (throughput.ts), reported by the master's storage system. */
  throughput?: ThroughputSamples;
}

/**
 * Which of several reports of one pair to believe (a pair across storage systems is reported
 * by each of them): its master's in the newest epoch, since after a swap or a takeover two
 * storage systems may both have called themselves master; then a mirror that hears its master;
 * then any. `fromMaster`: the report comes from the storage system named as the pair's master,
 * which decides for reports without a role.
 */
export function reportRank(p: PairStatus, fromMaster: boolean): number {
  if (p.role === 'master' || (p.role === undefined && fromMaster)) return 1_000_000 + (p.epoch ?? 0);
  return p.stale ? 0 : 1;
}

/** A storage system in a merged cluster view: its own report, or why it did not answer. */
export type SSView = (StorageSystemStatus & { reachable: true }) | { id: number; admin?: string; reachable: false; error: string };

/** A pair in a merged cluster view: the row, and the storage system whose report it is. */
export interface PairRow extends PairStatus {
  ss: number;
}

/** What one storage system answered when asked for its status. */
export interface ReportAnswer {
  id: number;
  admin?: string;
  report?: SSReport;
  error?: string;
}

/**
 * The cluster as `status`, the dashboard and the admin API's /api/cluster show it: every storage
 * system once, in the order asked; every pair once, from the report `reportRank` believes most.
 * `masterOf` names the configured master of each pair (default: the master the report names).
 */
export function mergeReports(answers: ReportAnswer[], opts: { pairOrder?: readonly string[]; masterOf?: ReadonlyMap<string, number> } = {}): { storageSystems: SSView[]; pairs: PairRow[] } {
  const storageSystems: SSView[] = [];
  const pairs = new Map<string, { row: PairRow; rank: number }>();
  for (const a of answers) {
    if (a.report === undefined) {
      storageSystems.push({ id: a.id, ...(a.admin !== undefined ? { admin: a.admin } : {}), reachable: false, error: a.error ?? 'no answer' });
      continue;
    }
    // A report describes its own storage system; take that one, or all if it says more.
    const own = a.report.storageSystems.filter((s) => s.id === a.id);
    for (const s of own.length > 0 ? own : a.report.storageSystems) storageSystems.push({ ...s, reachable: true });
    for (const p of a.report.pairs) {
      const rank = reportRank(p, a.id === (opts.masterOf?.get(p.name) ?? p.master.ss));
      const prior = pairs.get(p.name);
      if (!prior || rank > prior.rank) pairs.set(p.name, { row: { ...p, ss: a.id }, rank });
    }
  }
  // The order given first (the YAML's), then whatever else the storage systems know.
  const order = [...(opts.pairOrder ?? []), ...[...pairs.keys()].filter((n) => !opts.pairOrder?.includes(n))];
  return { storageSystems, pairs: order.filter((n) => pairs.has(n)).map((n) => pairs.get(n)!.row) };
}

/** One iSCSI session logged in to a storage system's target (secrets never appear here). */
export interface IscsiSessionStatus {
  initiator: string;
  /** The initiator's IP address. */
  address: string;
  target: string;
  connections: number;
  luns: number[];
  commands: number;
  readBytes: number;
  writeBytes: number;
}

export interface PeerStatus {
  ss: number;
  connected: boolean;
  /** Why the link is down, when it is. */
  error?: string;
}

/** GET /api/status of one storage system. */
export interface SSReport {
  storageSystems: StorageSystemStatus[];
  pairs: PairStatus[];
  /** S-VOL groups (docs/svol.md), when the storage system has any. */
  svolGroups?: SvolGroupStatus[];
}

/** GET /api/pairs/NAME/bitmap: each mirror's Invalid clusters, counted per bucket of clusters. */
export interface PairBitmap {
  name: string;
  clusters: number;
  /** Buckets per mirror: as many as asked for, or `clusters` if fewer. Bucket i holds clusters [floor(i*clusters/buckets), floor((i+1)*clusters/buckets)). */
  buckets: number;
  mirrors: (VolRef & { invalidClusters: number; invalid: number[] })[];
}

/** What /metrics needs beyond report(). */
export interface TargetMetrics {
  /** Host I/O of each volume by front end (see CountingDevice): a row per volume and protocol served. */
  volumes: { id: number; protocol: Protocol; counters: IoCounters; latency: { read: LatencyHistogram; write: LatencyHistogram } }[];
  nbd: { connections: number; totalConnections: number };
  /** iSCSI sessions logged in now (normal sessions; discovery ones are left out). */
  iscsi?: { sessions: number };
  /**
   * The memory of the memory volumes (blockdev/memory.ts), absent when the volumes are files:
   * bytes of slabs, bytes of pages shared between volumes instead of copied (a same-SS sync
   * mirror's), shared pages copied so that their owner could write in place, and large writes
   * that moved pages to find room in runs.
   */
  memory?: { bytes: number; sharedBytes: number; evictions: number; compactions: number };
}

/** What the admin API needs from a storage system. */
export interface AdminTarget {
  report(): SSReport;
  /** Throws PairCommandError for an unknown pair (404) or a refused transition (409). */
  split(pair: string): Promise<PairStatus>;
  resync(pair: string): Promise<PairStatus>;
  /** Starts a verify and returns at once; its progress is in the pair's status. */
  verify?(pair: string): Promise<PairStatus>;
  /** Planned role swap, run on the master's storage system. */
  swap?(pair: string): Promise<PairStatus>;
  /** Unplanned: the mirror's storage system promotes its copy. */
  takeover?(pair: string): Promise<PairStatus>;
  /** For the dashboard's heatmaps; throws PairCommandError (404) for an unknown pair. Without it, the bitmap route answers 404. */
  bitmap?(pair: string, buckets: number): PairBitmap;
  /** Without it, /metrics has no per-volume I/O counters, latency histograms or connection counts. */
  metrics?(): TargetMetrics;
  /** Fault injection (fault-table.ts); without them the fault routes answer 409. */
  faults?(): FaultStatus[];
  setFault?(req: FaultRequest): FaultStatus[];
  clearFault?(target: string, kind?: string): FaultStatus[];
  /** S-VOL groups (docs/svol.md); without them the svol routes answer 404. */
  svolStatus?(name: string): SvolGroupStatus;
  svolCommand?(name: string, command: 'init' | 'split' | 'resync' | 'restore' | 'attr' | 'verify', opts?: { member?: string; attr?: 'RO' | 'RW' | 'spare' }): Promise<SvolGroupStatus>;
}

/**
 * A pair command the controller refused. `kind` says why; only the admin layer turns it into
 * an HTTP status (no-such-pair and not-found -> 404, refused -> 409, unavailable -> 503).
 */
export type PairCommandErrorKind = 'no-such-pair' | 'not-found' | 'refused' | 'unavailable';

export class PairCommandError extends Error {
  override readonly name = 'PairCommandError';
  constructor(
    readonly kind: PairCommandErrorKind,
    message: string,
    options?: { cause?: unknown },
  ) {
    super(message, options);
  }
}

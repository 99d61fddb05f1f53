// What a storage system reports about itself: the shape of the admin API's
// GET /api/status and of `blockmirror status --json`.

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
  cache?: { size: number; dirtyBytes: number; usedBytes: number; hits: number; misses: number };
  volumes: VolumeStatus[];
}

export interface MirrorStatus extends VolRef {
  invalidClusters: number;
  /** Fraction of clusters valid, 0..1 (1 when in sync). */
  syncProgress: number;
  /** Bytes the sync daemon has copied to this mirror since start. */
  copiedBytes: number;
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
  mirrors: MirrorStatus[];
}

/** GET /api/status of one storage system. */
export interface SSReport {
  storageSystems: StorageSystemStatus[];
  pairs: PairStatus[];
}

/** What the admin API needs from a storage system. */
export interface AdminTarget {
  report(): SSReport;
  /** Throws PairCommandError for an unknown pair (404) or a refused transition (409). */
  split(pair: string): Promise<PairStatus>;
  resync(pair: string): Promise<PairStatus>;
}

export class PairCommandError extends Error {
  override readonly name = 'PairCommandError';
  constructor(
    readonly status: 404 | 409,
    message: string,
  ) {
    super(message);
  }
}

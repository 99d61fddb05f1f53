// What an S-VOL group reports: the admin API's GET /api/svol/:name, `blockmirror svol query`.
import type { LogicalState } from './group-file.js';

export interface SvolMemberStatus {
  /** The ID hosts see (export vol<logicalId>); absent for a volume of the pool (spare or replaced). */
  logicalId?: number;
  /** The physical volume behind it now. */
  vol: number;
  attr: 'RO' | 'RW' | 'spare';
  state: LogicalState | 'spare';
  /** Split generation of its image. */
  generation?: number;
  /** Access frequency: reads and writes that reached this volume (host and restore). */
  reads: number;
  writes: number;
  /** Clusters that differ from the P-VOL: still to copy while paired, changed on either side while split. */
  changedClusters?: number;
  /** Bytes copied from the P-VOL since start. */
  copiedBytes?: number;
  /** 4 KiB blocks of its volume whose checksum is known: reads of those are checked. */
  checkedBlocks?: number;
  /**
   * RW members: changed clusters not yet copied from the increments to the member's own volume
   * (reads take them from the increments meanwhile). 0 once the volume is current.
   */
  destagePending?: number;
  /** RW members: their increments volume. */
  increments?: { vol: number; clusters: number; bytes: number; capacity: number };
  error?: string;
}

export interface SvolRestoreStatus {
  logicalId: number;
  target: number;
  donor: number;
  failed: number;
  copiedClusters: number;
  /** Copied and flushed, and so recorded: a restart resumes the restore here. */
  checkpointClusters: number;
  totalClusters: number;
  reason: string;
}

/** The last `svol verify`: per member, the clusters found different from the P-VOL where neither side changed. */
export interface SvolVerifyStatus {
  time: string;
  checkedClusters: number;
  members: { logicalId: number; vol: number; differing: number; first: number[] }[];
}

export interface SvolGroupStatus {
  name: string;
  pvol: number;
  state: 'simplex' | 'paired' | 'split';
  /** Split generation: bumped by every split. */
  generation: number;
  /** ISO time of the last split, while split. */
  splitTime?: string;
  clusterSize: number;
  clusters: number;
  /** Host reads of an RO logical ID spread over its RO siblings of the same split generation. */
  spreadReads: boolean;
  /** A member request that takes longer fails the member (0: never). */
  ioTimeoutMs: number;
  /** Member reads that failed their checksum, and member requests that timed out, since start. */
  checksumMismatches: number;
  ioTimeouts: number;
  members: SvolMemberStatus[];
  restore?: SvolRestoreStatus;
  verify?: SvolVerifyStatus;
}

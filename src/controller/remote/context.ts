// What a storage system lends its part of a pair across storage systems.
import type { Logger } from 'pino';
import type { BlockDevice } from '../../blockdev/types.js';
import type { ExportTable } from '../../nbd/exports.js';
import type { BitmapStore, SlotTable } from '../bitmap-store.js';
import type { FenceLevel, PairSpec } from '../pair.js';
import type { PeerLink } from '../peer/link.js';
import type { VolRef } from '../status.js';
import type { SyncDaemon } from '../sync-daemon.js';

/** `master` is as configured: the current master may differ after a swap or a takeover. */
export interface RemotePairSpec extends PairSpec {
  fence: FenceLevel;
  autoResync: boolean;
}

export interface RemotePairContext {
  self: number;
  clusterSize: number;
  peerTimeout: number;
  /** This storage system's volumes of the pair: id -> device (below any pair logic), and whether this start created it empty. */
  volumes: Map<number, { device: BlockDevice; createdEmpty: boolean }>;
  links: Map<number, PeerLink>;
  /**
   * What the peers may open over their data connections (PeerLink.openData): the replication
   * exports, each allowed only to its session's master. Never the host-facing table.
   */
  peerExports: ExportTable;
  daemon: SyncDaemon;
  /**
   * One slot per mirror in master role (slot 0 only for the mirror role). `copies`: who the slots
   * are for (master role), kept in the file so a restart remaps bits by copy (bitmap-store.ts).
   * `seed`: a new store with these bits, replacing the file whole (a reshape).
   */
  openStore(slots: number, opts?: { copies?: SlotTable; seed?: Uint8Array[] }): Promise<{ store: BitmapStore; loaded: Uint8Array[] | null }>;
  generationFile?: string;
  statePath?: string;
  /** The cluster layer (etcd): record the mirrors outdated before writes go on without them. */
  onSuspend?: (pair: string, mirrors: VolRef[], reason: string) => Promise<void>;
  log: Logger;
}

// What a storage system holds for each pair whose volumes it has, whatever the pair's kind:
// a pair inside this storage system (LocalPair), or this storage system's part of a pair
// across storage systems (controller/remote/). StorageSystem keeps a table of these and
// never asks which kind a pair is.
//
//   command    local pair                    pair across storage systems
//   split      quiesce, flush mirrors, PSUS  same, run on the current master's SS
//   resync     copy what changed, master     same; mirrors hand over their own changes
//   verify     checksums per cluster         only checksums cross the network
//   swap       refused (one SS)              planned role change, new epoch
//   takeover   refused (one SS)              mirror promotes itself, new epoch
//
// Refusals are PairCommandError (status.ts); the admin layer maps their kind to HTTP.
import type { BlockDevice } from '../blockdev/types.js';
import type { FenceLevel } from './pair.js';
import type { PairBitmap, PairStatus, VolumeRole } from './status.js';

export interface TakeoverOptions {
  force?: boolean;
  /** The epoch to take over in (default: the current one + 1). */
  epoch?: number;
}

export interface PairController {
  readonly name: string;
  /** This storage system's volumes of the pair. */
  readonly volumes: readonly number[];
  /** Open bitmaps and state, start sessions with peers. Called once, before hostDevice. */
  open(): Promise<void>;
  /**
   * The device hosts reach volume `vol` through, over any front end (NBD, iSCSI). One object
   * per volume for the pair's life: it follows role changes (swap, takeover) by itself.
   */
  hostDevice(vol: number): BlockDevice;
  /** The role volume `vol` has now. */
  roleOf(vol: number): Exclude<VolumeRole, 'simplex'>;
  /**
   * Why a read of volume `vol` may not return the pair's current data, or null when it does:
   * the master, and a mirror in PAIR or COPY (its Invalid clusters come from the master) that
   * trusts its bitmap. A split or suspended mirror is a point-in-time image, not current.
   */
  staleReason(vol: number): string | null;
  /** The pair's row, as this storage system sees it (status.ts: one shape for every consumer). */
  status(): PairStatus;
  /** Each mirror's Invalid clusters per bucket (the dashboard's heatmap). */
  bitmap(buckets: number): PairBitmap;
  split(): Promise<void>;
  resync(): Promise<void>;
  /** Starts a verify and returns once it runs; its progress is in status().verify. */
  verify(): Promise<void>;
  swap(): Promise<void>;
  /**
   * Promote this storage system's mirror in a new epoch. By hand it is refused while the
   * master is reachable; `force` (the cluster layer, after etcd moved the logical volume's
   * master to us in `epoch`) skips that check: the old master has fenced itself.
   */
  takeover(opts?: TakeoverOptions): Promise<void>;
  /** Change the sync rate and the fence level at run time (`blockmirror apply`). */
  configure(o: { syncRate: number | undefined; fence: FenceLevel }): void;
  /** Graceful stop: finish, persist, end sessions. Does not close the volumes. */
  close(): Promise<void>;
}

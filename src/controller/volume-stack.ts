// The stack of one volume, composed here and nowhere else. Top to bottom:
//
//   layer            file                       what it does
//   AtomicDevice     blockdev/atomic            range locks: COMPARE AND WRITE atomic against every
//                                               write, from NBD and iSCSI alike (one per front
//                                               end, all sharing one lock table)
//   CountingDevice   controller/volume-stats    host I/O counters and latency (what hosts asked),
//                                               one per front end: the metrics' protocol label
//   GuardDevice      blockdev/guard             refuses all I/O (ESHUTDOWN) while the storage
//                                               system cannot prove it masters the pair (etcd
//                                               lease, epoch); with etcd only
//   SwitchDevice     blockdev/switch            where live reconfiguration swaps the pair layer
//                                               (a volume joins or leaves a pair, a pair gains
//                                               or loses a mirror) under connected hosts
//   pair layer       controller/pair, remote/   master: Data Write module (sync or async);
//                                               mirror: Check Invalid -> mirror or master
//                                               (absent for a simplex volume)
//   FaultDevice      blockdev/fault             injected errors, delays, offline, corruption
//   CachedDevice     controller/cache           the storage system's cache memory (if configured)
//   backend          blockdev/file | memory     the volume itself
//
// Front ends (NBD, iSCSI) see the top; the pair layer, the sync daemon and the verify see
// the "controller view" (FaultDevice and below), so an injected fault hits mirroring exactly
// as a failing disk would, and the cache never hides a fault from the controller.
import fs from 'node:fs';
import path from 'node:path';
import { FaultDevice, FaultSet } from '../blockdev/fault.js';
import { openFileDevice } from '../blockdev/file.js';
import { AtomicDevice } from '../blockdev/atomic.js';
import { GuardDevice, type Guard } from '../blockdev/guard.js';
import { SwitchDevice } from '../blockdev/switch.js';
import { MemoryDevice, SlabPool } from '../blockdev/memory.js';
import { RangeLock } from '../blockdev/range-lock.js';
import type { BlockDevice } from '../blockdev/types.js';
import type { CacheMemory } from './cache.js';
import { CountingDevice, PROTOCOLS, type HostIo, type Protocol } from './volume-stats.js';

export interface VolumeSpec {
  id: number;
  size: number;
}

/** One volume of a storage system: its layers, bottom half first. */
export interface VolumeStack {
  id: number;
  size: number;
  /** The volume's own storage, below the cache. */
  backing: BlockDevice;
  /** Its faults, changed at run time (fault table). */
  faults: FaultSet;
  /** What the controller reads and writes: faults, cache, backend. */
  device: BlockDevice;
  /** The layer under the faults (the cache, or the backend), which owns the volume's storage. */
  owner: BlockDevice;
  /** The backing file was created by this start (so it holds only zeroes). */
  createdEmpty: boolean;
  /** The host I/O counters per front end, once buildHostStack has built the top half. */
  io?: HostIo;
  /** What each front end (NBD, iSCSI) reaches: the top of the stack. */
  front?: FrontDevices;
  /** Above the pair layer: what reconfiguration swaps it through (reconfigure.ts). */
  slot?: SwitchDevice;
}

/**
 * The bottom half: backend, cache memory, fault layer. `dataDir` absent means memory, on `pool`,
 * the storage system's memory shared by its memory volumes, so that a sync pair's mirror in the
 * same storage system takes the master's pages instead of copying them (memory.ts).
 */
export async function openVolumeStack(ssId: number, v: VolumeSpec, opts: { dataDir?: string; cache?: CacheMemory; pool?: SlabPool }): Promise<VolumeStack> {
  let backing: BlockDevice;
  let createdEmpty = true;
  if (opts.dataDir) {
    const file = path.join(opts.dataDir, `vol${v.id}.img`);
    createdEmpty = !fs.existsSync(file);
    backing = await openFileDevice(file, { size: v.size });
  } else backing = new MemoryDevice(v.size, false, opts.pool);
  const cached = opts.cache ? opts.cache.wrap(backing, `vol${v.id}`) : backing;
  const faults = new FaultSet();
  const device = new FaultDevice(cached, faults, `ss${ssId}/vol${v.id}`);
  return { id: v.id, size: v.size, backing, faults, device, owner: cached, createdEmpty };
}

/** The top of a volume's stack for each front end. */
export type FrontDevices = Record<Protocol, AtomicDevice>;

/**
 * The top half: the pair layer the volume's pair hands out (or none for a simplex volume),
 * then the host counters. Returns what the front ends export.
 */
export function buildHostStack(v: VolumeStack, pairLayer: BlockDevice | undefined, guard?: Guard): FrontDevices {
  v.slot = new SwitchDevice(pairLayer ?? v.device);
  const fronts = frontDevices(guard ? new GuardDevice(v.slot, guard) : v.slot);
  v.io = fronts.io;
  v.front = fronts.front;
  return fronts.front;
}

/**
 * Counters and atomic layer per front end over one device. The range locks are one table, so a
 * COMPARE AND WRITE over iSCSI stays atomic against an NBD write to the same bytes.
 */
export function frontDevices(below: BlockDevice): { io: HostIo; front: FrontDevices } {
  const locks = new RangeLock();
  const io = Object.fromEntries(PROTOCOLS.map((p) => [p, new CountingDevice(below)])) as HostIo;
  const front = Object.fromEntries(PROTOCOLS.map((p) => [p, new AtomicDevice(io[p], locks)])) as FrontDevices;
  return { io, front };
}

/** Close a volume: the cache destages and closes the backend; without one, the backend closes. */
export function closeVolumeStack(v: VolumeStack): Promise<void> {
  return v.owner.close();
}

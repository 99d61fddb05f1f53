// Builds and starts an iSCSI server for a set of volumes: used by `blockmirror serve --iscsi` and
// by StorageSystem (one target per storage system, each volume a LUN, or a target per volume).
import path from 'node:path';
import type { Logger } from 'pino';
import type { BlockDevice } from '../blockdev/types.js';
import type { AtomicDevice } from '../blockdev/atomic.js';
import type { ChapSecrets } from './chap.js';
import { LogicalUnit } from './scsi/lu.js';
import { AluaState, type AluaStateValue } from './scsi/types.js';
import { readChapFile } from './chap-file.js';
import { IscsiServer } from './server.js';
import type { TargetSpec } from './target.js';

export interface IscsiVolume {
  /** LUN within its target. */
  lun: number;
  /** Unit serial number (e.g. "ss1-vol3"). */
  serial: string;
  device: BlockDevice;
  atomic?: AtomicDevice;
  alua?: () => AluaStateValue;
  /** The device identity shared with other LUs (LogicalUnitOptions.deviceId). */
  deviceId?: () => string | undefined;
  /** A target of its own instead of the default one. */
  target?: string;
  /** That target's CHAP and allow-list; default: the wiring's. */
  chap?: ChapSecrets;
  allow?: string[];
}

export interface IscsiWiring {
  listen: { host: string; port: number };
  /** Default target name, for volumes that name none. */
  target: string;
  volumes: IscsiVolume[];
  chap?: ChapSecrets;
  allow?: string[];
  /** Addresses SendTargets reports; default: the listen address. */
  portals?: string[];
  /** Directory for persistent-reservation state (one JSON per LUN); none keeps it in memory. */
  dataDir?: string;
  /** Target port group (and relative target port) of every target here; default 1. */
  portGroup?: number;
  log: Logger;
}

export async function startIscsi(w: IscsiWiring): Promise<{ server: IscsiServer; address: string; targets: TargetSpec[] }> {
  const targets = new Map<string, TargetSpec>();
  for (const v of w.volumes) {
    const name = (v.target ?? w.target).toLowerCase();
    let t = targets.get(name);
    if (!t) {
      const luns = new Map<number, LogicalUnit>();
      // The first volume of a target of its own brings its auth (the config checks that the others agree).
      const own = v.target !== undefined && name !== w.target.toLowerCase();
      t = { name, luns, chap: own ? (v.chap ?? w.chap) : w.chap, allow: own ? (v.allow ?? w.allow) : w.allow };
      targets.set(name, t);
    }
    const luns = t.luns;
    if (luns.has(v.lun)) throw new Error(`iSCSI target ${name}: LUN ${v.lun} used twice`);
    luns.set(
      v.lun,
      new LogicalUnit({
        lun: v.lun,
        device: v.device,
        atomic: v.atomic,
        serial: v.serial,
        targetName: name,
        alua: v.alua,
        deviceId: v.deviceId,
        ...(w.portGroup !== undefined ? { portGroup: w.portGroup } : {}),
        prFile: w.dataDir ? path.join(w.dataDir, `${v.serial}.pr.json`) : undefined,
        luns: () => [...luns.keys()].sort((a, b) => a - b),
      }),
    );
  }
  // Discovery sessions prove the default target's secret, whichever targets have secrets of their own.
  const server = new IscsiServer({ log: w.log, targets: [...targets.values()], portals: w.portals, ...(w.chap ? { discoveryChap: w.chap } : {}) });
  const address = await server.listen(w.listen.host, w.listen.port);
  return { server, address, targets: [...targets.values()] };
}

/** The iSCSI part of a storage system's spec (the cluster layer fills it from the YAML). */
export interface SystemIscsiSpec {
  listen: { host: string; port: number };
  target: string;
  chapFile?: string;
  /** Inline secrets, instead of chapFile. */
  chap?: ChapSecrets;
  allow?: string[];
}

/**
 * A volume's pair as its storage system sees it now: the pair's name, this volume's role, and
 * whether the pair's other volumes are on other storage systems (then each is a path of one device).
 */
export type PairMembership = { pair: string; role: 'master' | 'mirror'; acrossSystems: boolean } | undefined;

/**
 * ALUA and device identity of a volume, for multipath across the storage systems of a pair:
 *
 *   volume                              device identity (NAA)   ALUA state of its port group
 *   not in a pair                       its own                 active/optimized (read-only: DATA PROTECT)
 *   a pair's master                     the pair's (*)          active/optimized
 *   a pair's mirror, read-only          the pair's (*)          standby (writes: NOT READY 04/0B)
 *   a split mirror (takes host writes)  its own                 active/optimized
 *   (*) when the pair spans storage systems; a pair inside one storage system keeps one identity
 *       per LUN: two LUNs of one target port are not two paths.
 *
 * A split mirror is another device (a point-in-time copy that hosts write): sharing the pair's
 * identity then would let multipath spread one device's writes over two diverging copies.
 */
export function pairPath(device: BlockDevice, member: () => PairMembership): { alua: () => AluaStateValue; deviceId: () => string | undefined } {
  const shared = () => {
    const m = member();
    return m !== undefined && (m.role === 'master' || device.readOnly) ? m : undefined;
  };
  return {
    alua: () => (shared()?.role === 'mirror' ? AluaState.STANDBY : AluaState.ACTIVE_OPTIMIZED),
    deviceId: () => {
      const m = shared();
      return m?.acrossSystems ? `pair/${m.pair}` : undefined;
    },
  };
}

/**
 * Start the iSCSI target of a storage system: every volume a LUN (numbered by volume id) of the
 * system's target, or LUN 0 of the target its YAML names. The target's port group is the
 * storage system's ID; ALUA and identity follow the volume's pair (pairPath).
 */
export async function startSystemIscsi(
  ssId: number,
  spec: SystemIscsiSpec,
  volumes: Array<{ id: number; device: AtomicDevice; member?: () => PairMembership; target?: string; chap?: ChapSecrets; chapFile?: string; allow?: string[] }>,
  dataDir: string | undefined,
  log: Logger,
): Promise<{ server: IscsiServer; address: string }> {
  const r = await startIscsi({
    listen: spec.listen,
    target: spec.target,
    chap: spec.chap ?? (spec.chapFile ? readChapFile(spec.chapFile) : undefined),
    allow: spec.allow,
    dataDir,
    portGroup: ssId,
    log,
    volumes: volumes.map((v) => ({
      lun: v.target ? 0 : v.id,
      serial: `ss${ssId}-vol${v.id}`,
      device: v.device,
      atomic: v.device,
      target: v.target,
      chap: v.chap ?? (v.chapFile ? readChapFile(v.chapFile) : undefined),
      allow: v.allow,
      ...pairPath(v.device, v.member ?? (() => undefined)),
    })),
  });
  log.info({ address: r.address, targets: r.targets.map((t) => t.name) }, `iSCSI: listening on ${r.address}`);
  return { server: r.server, address: r.address };
}

// The cluster of storage systems described by one YAML file: which of them
// this process runs (`--only`), and the spec each storage system gets.
import type { Logger } from 'pino';
import { StorageSystem, type ClusterHooks, type StorageSystemSpec } from '../controller/storage-system.js';
import type { ClusterConfig, PairConfig } from './config.js';
import { parseFaultTarget } from '../controller/fault-table.js';
import { credentialsFor } from './credentials.js';

export class ClusterError extends Error {
  override readonly name = 'ClusterError';
}

/**
 * The spec of storage system `id`: its volumes, the pairs it runs alone (master and every
 * mirror inside it), and the pairs it shares with other storage systems, with where to
 * reach those (their control channel and NBD addresses).
 */
export function specFor(config: ClusterConfig, id: number): StorageSystemSpec {
  const ss = config.storageSystems.find((s) => s.id === id);
  if (!ss) throw new ClusterError(`${config.source}: no storage system with id ${id}`);
  const spans = (p: PairConfig) => p.mirrors.some((m) => m.ss !== p.master.ss);
  const involves = (p: PairConfig) => p.master.ss === id || p.mirrors.some((m) => m.ss === id);
  const local = config.pairs.filter((p) => p.master.ss === id && !spans(p));
  const remote = config.pairs.filter((p) => spans(p) && involves(p));
  for (const p of remote) {
    const here = [p.master, ...p.mirrors].filter((r) => r.ss === id);
    if (here.length > 1 && p.master.ss !== id) {
      throw new ClusterError(`${config.source}: pair ${p.name}: storage system ${id} holds ${here.length} mirrors of a master in storage system ${p.master.ss}; a storage system may hold one mirror of a remote master`);
    }
  }
  const peerIds = new Set(remote.flatMap((p) => [p.master, ...p.mirrors].map((r) => r.ss)).filter((x) => x !== id));
  const peers = config.storageSystems
    .filter((s) => peerIds.has(s.id))
    // loadConfig requires `peer` on every storage system of a pair across storage systems.
    .map((s) => ({ id: s.id, peer: s.peer!, nbd: s.nbd }));
  const creds = credentialsFor(config, id);
  return {
    ...(creds.nbd ? { tls: creds.nbd } : {}),
    ...(creds.peer ? { peerTls: creds.peer } : {}),
    ...(ss.allow ? { allow: ss.allow } : {}),
    ...(creds.warnings.length ? { warnings: creds.warnings } : {}),
    id: ss.id,
    nbd: ss.nbd,
    ...(ss.nbdSocket ? { nbdSocket: ss.nbdSocket } : {}),
    admin: `${ss.admin.host}:${ss.admin.port}`,
    ...(ss.dataDir ? { dataDir: ss.dataDir } : {}),
    ...(ss.cache ? { cache: ss.cache } : {}),
    ...(ss.iscsi ? { iscsi: ss.iscsi } : {}),
    volumes: ss.volumes,
    clusterSize: config.clusterSize,
    pairs: local.map((p) => ({ name: p.name, mode: p.mode, master: p.master, mirrors: p.mirrors, fence: p.fence, ...(p.syncRate !== undefined ? { syncRate: p.syncRate } : {}) })),
    remotePairs: remote.map((p) => ({
      name: p.name,
      mode: p.mode,
      master: p.master,
      mirrors: p.mirrors,
      fence: p.fence,
      autoResync: p.autoResync,
      ...(p.syncRate !== undefined ? { syncRate: p.syncRate } : {}),
    })),
    ...(ss.peer ? { peer: ss.peer } : {}),
    peers,
    peerTimeout: config.peerTimeout,
    ...(ss.svolGroups?.length ? { svolGroups: ss.svolGroups } : {}),
    faults: config.faults.filter((f) => {
      const t = parseFaultTarget(f.target);
      return t.type === 'volume' ? t.ss === id : t.a === id || t.b === id;
    }),
  };
}

/** Which storage systems to run: all, or the ids of `--only`. */
export function selectIds(config: ClusterConfig, only?: number[]): number[] {
  const all = config.storageSystems.map((s) => s.id);
  if (!only) return all;
  for (const id of only) if (!all.includes(id)) throw new ClusterError(`--only: ${config.source} has no storage system ${id} (it has ${all.join(', ')})`);
  return only;
}

/** Start the selected storage systems; if one fails, stop those already started. */
export async function startStorageSystems(config: ClusterConfig, ids: number[], log: Logger, opts: ClusterHooks = {}): Promise<StorageSystem[]> {
  const specs = ids.map((id) => specFor(config, id)); // validate all before starting any
  const started: StorageSystem[] = [];
  try {
    for (const spec of specs) started.push(await StorageSystem.start(spec, log, opts));
  } catch (e) {
    await Promise.all(started.map((s) => s.close().catch(() => {})));
    throw e;
  }
  return started;
}

// The cluster of storage systems described by one YAML file: which of them
// this process runs (`--only`), and the spec each storage system gets.
import type { Logger } from 'pino';
import { StorageSystem, type StorageSystemSpec } from '../controller/storage-system.js';
import type { ClusterConfig } from './config.js';

export class ClusterError extends Error {
  override readonly name = 'ClusterError';
}

/** The spec of storage system `id`: its volumes and the pairs it masters. */
export function specFor(config: ClusterConfig, id: number): StorageSystemSpec {
  const ss = config.storageSystems.find((s) => s.id === id);
  if (!ss) throw new ClusterError(`${config.source}: no storage system with id ${id}`);
  const pairs = config.pairs.filter((p) => p.master.ss === id);
  for (const p of config.pairs) {
    const remote = p.mirrors.find((m) => m.ss !== p.master.ss);
    if (remote && (p.master.ss === id || remote.ss === id)) {
      throw new ClusterError(
        `${config.source}: pair ${p.name}: mirror ss${remote.ss}/vol${remote.vol} is in another storage system than its master (ss${p.master.ss}); remote mirrors are not supported yet`,
      );
    }
  }
  return {
    id: ss.id,
    nbd: ss.nbd,
    ...(ss.nbdSocket ? { nbdSocket: ss.nbdSocket } : {}),
    admin: `${ss.admin.host}:${ss.admin.port}`,
    ...(ss.dataDir ? { dataDir: ss.dataDir } : {}),
    ...(ss.cache ? { cache: ss.cache } : {}),
    volumes: ss.volumes,
    clusterSize: config.clusterSize,
    pairs: pairs.map((p) => ({ name: p.name, mode: p.mode, master: p.master, mirrors: p.mirrors, ...(p.syncRate !== undefined ? { syncRate: p.syncRate } : {}) })),
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
export async function startStorageSystems(config: ClusterConfig, ids: number[], log: Logger): Promise<StorageSystem[]> {
  const specs = ids.map((id) => specFor(config, id)); // validate all before starting any
  const started: StorageSystem[] = [];
  try {
    for (const spec of specs) started.push(await StorageSystem.start(spec, log));
  } catch (e) {
    await Promise.all(started.map((s) => s.close().catch(() => {})));
    throw e;
  }
  return started;
}

// What `blockmirror status` and the dashboard show of the etcd tables (docs/cluster.md): one
// plain JSON value, so the CLI renders it as text and the page as tables.
//
//   section          from                        health / state
//   storageSystems   P/ss/ID (leased) + the YAML  "up" while its lease lives; "no lease" when the
//                                                 YAML names it and etcd has no registration
//   logicalVolumes   P/lv/NAME + P/pairs/NAME     master, epoch, mode; the master's last pair state
//   mirrors          P/mirrors/NAME               each mirror's mode and state (PAIR, PSUE, COPY)
//   history          P/history/NAME/EPOCH         failovers, oldest first: time, epoch, from, to, why
import type { HistoryRecord, Tables } from './tables.js';

export interface EtcdView {
  storageSystems: { id: number; health: 'up' | 'no lease'; nbd?: string; admin?: string; startedAt?: string }[];
  logicalVolumes: { name: string; master: { ss: number; vol: number }; epoch: number; mode: 'sync' | 'async'; size: number; state?: string }[];
  mirrors: { name: string; mirrors: { ss: number; vol: number; mode: 'sync' | 'async'; state: string }[] }[];
  history: HistoryRecord[];
}

/** The view of `tables`; `configured` are the storage system IDs of the YAML (shown even without a lease). */
export function etcdView(tables: Tables, configured: number[]): EtcdView {
  const ids = [...new Set([...configured, ...tables.storageSystems.keys()])].sort((a, b) => a - b);
  const byName = <T>(m: Map<string, T>) => [...m.entries()].sort(([a], [b]) => a.localeCompare(b));
  return {
    storageSystems: ids.map((id) => {
      const r = tables.storageSystems.get(id);
      return r ? { id, health: 'up', nbd: r.nbd, admin: r.admin, startedAt: r.startedAt } : { id, health: 'no lease' };
    }),
    logicalVolumes: byName(tables.logicalVolumes).map(([name, lv]) => {
      const state = tables.pairs.get(name)?.state;
      return { name, master: lv.master, epoch: lv.epoch, mode: lv.mode, size: lv.size, ...(state ? { state } : {}) };
    }),
    mirrors: byName(tables.mirrors).map(([name, m]) => ({ name, mirrors: m.mirrors })),
    history: [...tables.history].sort((a, b) => a.at.localeCompare(b.at) || a.epoch - b.epoch),
  };
}

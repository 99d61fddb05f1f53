// The `svolGroups:` key of a storage system (docs/svol.md): a P-VOL and its group of S-VOLs
// (Tomita, US 7,146,526). The shape is in config.ts (SvolGroupSchema); the checks against the
// rest of the file are here (checkSvol).
//
//   svolGroups:
//     - name: backup
//       pvol: 1
//       members:
//         - { vol: 2, attr: RO }                   exported as vol2 (its logical ID)
//         - { vol: 3, attr: RW, increments: 9 }    vol9 holds vol3's changes since the split
//         - { vol: 4, attr: RO, logicalId: 40 }    exported as vol40
//         - { vol: 5, attr: spare }                not exported until it replaces a member
//       spreadReads: true                          reads of an RO ID spread over its RO siblings
//       ioTimeout: 30s                             a member request hanging longer fails the member
import { formatSize } from '../util/size.js';
import type { ClusterConfig, RawProblem, Segment } from './config.js';

export type SvolAttr = 'RO' | 'RW' | 'spare';

export interface SvolMemberConfig {
  vol: number;
  attr: SvolAttr;
  /** The ID hosts see (export vol<logicalId>); default the member's own volume id; none for a spare. */
  logicalId?: number;
  /** The volume of the same storage system that logs the member's writes since the split (RW). */
  increments?: number;
}

export interface SvolGroupConfig {
  name: string;
  pvol: number;
  members: SvolMemberConfig[];
  /** Spread host reads of an RO logical ID over its healthy RO siblings of the same split generation. */
  spreadReads?: boolean;
  /** Milliseconds a member's request may take before the member is declared failed (default 30 s). */
  ioTimeout?: number;
}

/** Bytes an increments volume needs besides its data: a 4 KiB header and a 4-byte map entry per P-VOL cluster, in whole clusters. */
export function incrementsOverhead(pvolSize: number, clusterSize: number): number {
  const clusters = Math.ceil(pvolSize / clusterSize);
  return Math.ceil((4096 + 4 * clusters) / clusterSize) * clusterSize;
}

/** The logical ID of a member as configured (none for a spare). */
export function logicalIdOf(m: SvolMemberConfig): number | undefined {
  return m.attr === 'spare' ? undefined : (m.logicalId ?? m.vol);
}

export function checkSvol(cfg: ClusterConfig, problems: RawProblem[]): void {
  const report = (at: Segment[], message: string) => problems.push({ path: at, message });
  const names = new Map<string, string>();
  cfg.storageSystems.forEach((ss, i) => {
    const groups = ss.svolGroups ?? [];
    if (groups.length === 0) return;
    const vols = new Map(ss.volumes.map((v) => [v.id, v]));
    // Volume -> where it is used first: pairs, then the groups in file order.
    const used = new Map<number, string>();
    cfg.pairs.forEach((p, k) => {
      for (const r of [p.master, ...p.mirrors]) if (r.ss === ss.id && !used.has(r.vol)) used.set(r.vol, `pair "${cfg.pairs[k]!.name}"`);
    });
    const take = (vol: number, at: Segment[], what: string): boolean => {
      if (!vols.has(vol)) {
        report(at, `volume ${vol} does not exist in storage system ${ss.id}`);
        return false;
      }
      const prior = used.get(vol);
      if (prior) {
        report(at, `volume ${vol} of storage system ${ss.id} is already used by ${prior}; a volume has one role`);
        return false;
      }
      used.set(vol, what);
      return true;
    };
    const logical = new Map<number, string>();
    groups.forEach((g, j) => {
      const base: Segment[] = ['storageSystems', i, 'svolGroups', j];
      const where = `storageSystems[${i}].svolGroups[${j}]`;
      const other = names.get(g.name);
      if (other) report([...base, 'name'], `duplicate S-VOL group name "${g.name}" (also ${other}.name)`);
      else names.set(g.name, where);
      const pvolOk = take(g.pvol, [...base, 'pvol'], `the P-VOL of group "${g.name}"`);
      const pvolSize = vols.get(g.pvol)?.size;
      if (!g.members.some((m) => m.attr !== 'spare')) report([...base, 'members'], `group "${g.name}" has only spares: give at least one member attr RO or RW`);
      g.members.forEach((m, k) => {
        const at: Segment[] = [...base, 'members', k];
        if (!take(m.vol, [...at, 'vol'], `member ${k} of group "${g.name}"`)) return;
        const size = vols.get(m.vol)!.size;
        if (pvolOk && pvolSize !== undefined && size !== pvolSize) {
          report([...at, 'vol'], `volume ${m.vol} is ${formatSize(size)} but the P-VOL ${g.pvol} is ${formatSize(pvolSize)} (an S-VOL must be the same size)`);
        }
        if (m.attr === 'spare' && m.logicalId !== undefined) {
          report([...at, 'logicalId'], 'a spare is not exported: it takes the logical ID of the member it replaces (leave logicalId out)');
        }
        if (m.attr === 'RW' && m.increments === undefined) {
          report(at, `missing required key: increments (an RW member logs its writes since the split in a volume of its own, e.g. increments: 9)`);
        }
        if (m.increments !== undefined && take(m.increments, [...at, 'increments'], `the increments of member ${k} of group "${g.name}"`) && pvolSize !== undefined) {
          const need = incrementsOverhead(pvolSize, cfg.clusterSize) + cfg.clusterSize;
          const have = vols.get(m.increments)!.size;
          if (have < need) report([...at, 'increments'], `increments volume ${m.increments} is ${formatSize(have)}, too small: its map of the P-VOL's clusters and one cluster of data need ${formatSize(need)}`);
        }
        const lid = logicalIdOf(m);
        if (lid !== undefined) {
          const prior = logical.get(lid);
          if (prior) report([...at, m.logicalId === undefined ? 'vol' : 'logicalId'], `logical ID ${lid} is already taken by ${prior} (set logicalId to a free number)`);
          else logical.set(lid, `${where}.members[${k}]`);
        }
      });
    });
    // A logical ID is exported as vol<ID>: it must not shadow a volume exported under its own id.
    for (const [lid, where] of logical) {
      const owner = used.get(lid);
      const memberOf = groups.some((g) => g.members.some((m) => m.vol === lid && logicalIdOf(m) === lid));
      if (vols.has(lid) && !memberOf && (owner === undefined || owner.startsWith('pair') || owner.startsWith('the P-VOL'))) {
        report(['storageSystems', i, 'svolGroups'], `logical ID ${lid} of ${where} is the id of volume ${lid}, which is exported as vol${lid} itself; set logicalId to a free number`);
      }
    }
  });
}

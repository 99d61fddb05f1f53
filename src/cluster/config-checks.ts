// Pass 3 of the configuration: the checks that need the whole file (config.ts has the passes).
import net from 'node:net';
import path from 'node:path';
import { parseFaultTarget } from '../controller/fault-table.js';
import type { VolRef } from '../controller/status.js';
import { formatSize } from '../util/size.js';
import { CfsConfig, ClusterConfig, DEFAULT_CFS_BLOCK_SIZE, HostPort, MISSING, Parsed, RawProblem, Segment, StorageSystemConfig } from './config.js';
import { formatHostPort, formatPath, isPlainObject } from './config-problems.js';
// ---------------------------------------------------------------------------------------------
// Pass 3: the checks that need the whole file.

export function crossCheck(cfg: ClusterConfig, problems: RawProblem[]): void {
  const report = (at: Segment[], message: string) => problems.push({ path: at, message });

  const ssById = new Map<number, { ss: StorageSystemConfig; index: number }>();
  cfg.storageSystems.forEach((ss, i) => {
    const first = ssById.get(ss.id);
    if (first) report(['storageSystems', i, 'id'], `duplicate storage system id ${ss.id} (also storageSystems[${first.index}].id)`);
    else ssById.set(ss.id, { ss, index: i });
    const seen = new Map<number, number>();
    ss.volumes.forEach((vol, j) => {
      const k = seen.get(vol.id);
      if (k !== undefined) report(['storageSystems', i, 'volumes', j, 'id'], `duplicate volume id ${vol.id} in storage system ${ss.id} (also volumes[${k}])`);
      else seen.set(vol.id, j);
    });
  });

  checkEndpoints(cfg, report);

  // Volume -> where it was first used, to refuse a volume in two pairs or twice in one.
  const used = new Map<string, { pair: number; at: string }>();
  const needsPeer = new Set<number>();
  const names = new Map<string, number>();
  cfg.pairs.forEach((pair, i) => {
    const other = names.get(pair.name);
    if (other !== undefined) report(['pairs', i, 'name'], `duplicate pair name "${pair.name}" (also pairs[${other}].name)`);
    else names.set(pair.name, i);

    const refs: { ref: VolRef; at: Segment[] }[] = [
      { ref: pair.master, at: ['pairs', i, 'master'] },
      ...pair.mirrors.map((ref, j) => ({ ref, at: ['pairs', i, 'mirrors', j] })),
    ];
    let masterSize: number | undefined;
    for (const { ref, at } of refs) {
      const owner = ssById.get(ref.ss)?.ss;
      const vol = owner?.volumes.find((v) => v.id === ref.vol);
      if (!owner) {
        report(at, `storage system ${ref.ss} does not exist`);
        continue;
      }
      if (!vol) {
        report(at, `volume ${ref.vol} does not exist in storage system ${ref.ss}`);
        continue;
      }
      const key = `${ref.ss}/${ref.vol}`;
      const prior = used.get(key);
      if (prior) {
        const where = prior.pair === i ? 'in this pair' : `in pair "${cfg.pairs[prior.pair]!.name}"`;
        report(at, `volume ${ref.vol} of storage system ${ref.ss} is already used ${where} (${prior.at})`);
        continue;
      }
      used.set(key, { pair: i, at: formatPath(at) });
      if (ref.ss !== pair.master.ss && ssById.has(pair.master.ss)) {
        for (const end of [pair.master.ss, ref.ss]) {
          const s = ssById.get(end);
          if (s && s.ss.peer === undefined && !needsPeer.has(end)) {
            needsPeer.add(end);
            report(['storageSystems', s.index, 'peer'], `missing required key: pair "${pair.name}" spans storage systems ${pair.master.ss} and ${ref.ss}, which reach each other at their peer address (e.g. peer: 127.0.0.1:7001)`);
          }
        }
      }
      if (at[2] === 'master') masterSize = vol.size;
      else if (masterSize !== undefined && vol.size !== masterSize) {
        report(at, `volume ${ref.vol} of storage system ${ref.ss} is ${formatSize(vol.size)} but its master is ${formatSize(masterSize)} (a mirror must be the same size)`);
      }
    }
  });

  // A fault names a volume that exists, or a link that exists: two storage systems sharing a pair.
  cfg.faults.forEach((f, k) => {
    const t = parseFaultTarget(f.target);
    if (t.type === 'volume') {
      const s = ssById.get(t.ss);
      if (!s) report(['faults', k, 'target'], `no storage system ${t.ss} (fault target ${f.target})`);
      else if (!s.ss.volumes.some((v) => v.id === t.vol)) report(['faults', k, 'target'], `storage system ${t.ss} has no volume ${t.vol} (fault target ${f.target})`);
      return;
    }
    const linked = cfg.pairs.some((p) => {
      const ends = new Set([p.master, ...p.mirrors].map((r) => r.ss));
      return ends.has(t.a) && ends.has(t.b);
    });
    if (!linked) report(['faults', k, 'target'], `storage systems ${t.a} and ${t.b} share no pair, so there is no link ${f.target} to fault`);
  });
}

// ---------------------------------------------------------------------------------------------
// The `cfs:` section: defaults, then the checks against the rest of the file.

export function buildCfs(c: NonNullable<Parsed['cfs']>, cfg: ClusterConfig, baseDir: string): CfsConfig {
  const out: CfsConfig = {
    listen: c.listen,
    blockSize: c.blockSize ?? DEFAULT_CFS_BLOCK_SIZE,
    pairs: c.pairs ?? cfg.pairs.map((p) => p.name),
    ss: c.ss ?? Math.min(...cfg.storageSystems.map((s) => s.id)),
    readFromMaster: c.readFromMaster ?? true,
    tls: c.tls ?? false,
  };
  if (c.dataDir !== undefined) out.dataDir = path.resolve(baseDir, c.dataDir);
  if (c.tokenFile !== undefined) out.tokenFile = path.resolve(baseDir, c.tokenFile);
  return out;
}

export function checkCfs(cfg: ClusterConfig, problems: RawProblem[]): void {
  const cfs = cfg.cfs;
  if (cfs === undefined) return;
  const report = (at: Segment[], message: string) => problems.push({ path: at, message });
  const known = cfg.pairs.map((p) => p.name);
  if (cfs.pairs.length === 0) report(['cfs'], 'the file system needs at least one pair to keep files on, and pairs: has none');
  const seen = new Map<string, number>();
  cfs.pairs.forEach((name, i) => {
    const first = seen.get(name);
    if (first !== undefined) return report(['cfs', 'pairs', i], `pair "${name}" is listed twice (also cfs.pairs[${first}])`);
    seen.set(name, i);
    const pair = cfg.pairs.find((p) => p.name === name);
    if (!pair) return report(['cfs', 'pairs', i], `pair "${name}" does not exist (${known.length === 0 ? 'pairs: is empty' : `pairs: ${known.join(', ')}`})`);
    const master = cfg.storageSystems.find((s) => s.id === pair.master.ss)?.volumes.find((v) => v.id === pair.master.vol);
    if (master && master.size < cfs.blockSize) {
      report(['cfs', 'pairs', i], `the master of pair "${name}" (${formatSize(master.size)}) is smaller than one block (cfs.blockSize ${formatSize(cfs.blockSize)})`);
    }
  });
  if (!cfg.storageSystems.some((s) => s.id === cfs.ss)) report(['cfs', 'ss'], `storage system ${cfs.ss} does not exist`);

  // Metadata must be as durable as the data it describes.
  const onDisk = cfg.storageSystems.findIndex((s) => s.dataDir !== undefined && cfg.pairs.some((p) => cfs.pairs.includes(p.name) && [p.master, ...p.mirrors].some((r) => r.ss === s.id)));
  if (cfs.dataDir === undefined && onDisk >= 0) {
    report(['cfs', 'dataDir'], `${MISSING}: the volumes of the file system's pairs are on disk (storageSystems[${onDisk}].dataDir), so its metadata must be too`);
  }
  const sameDir = cfg.storageSystems.findIndex((s) => s.dataDir !== undefined && s.dataDir === cfs.dataDir);
  if (sameDir >= 0) report(['cfs', 'dataDir'], `data directory ${cfs.dataDir} is already used by storageSystems[${sameDir}].dataDir`);

  if (cfs.listen.port !== 0) {
    for (const [i, ss] of cfg.storageSystems.entries()) {
      for (const [key, hp] of Object.entries(ss) as [string, unknown][]) {
        if (!isHostPort(hp) || hp.port !== cfs.listen.port || !hostsOverlap(canonicalHost(hp.host), canonicalHost(cfs.listen.host))) continue;
        report(['cfs', 'listen'], `port ${hp.port} on ${cfs.listen.host} is already used by storageSystems[${i}].${key} (${formatHostPort(hp)})`);
      }
    }
  }
}

export function isHostPort(v: unknown): v is HostPort {
  return isPlainObject(v) && typeof v.host === 'string' && typeof v.port === 'number' && Object.keys(v).length === 2;
}

/** Two listeners clash on one port when their hosts overlap; a wildcard host overlaps every host. */
export function checkEndpoints(cfg: ClusterConfig, report: (at: Segment[], message: string) => void): void {
  const tcp: { at: Segment[]; hp: HostPort; canon: string }[] = [];
  const sockets = new Map<string, string>();
  const dataDirs = new Map<string, string>();
  cfg.storageSystems.forEach((ss, i) => {
    for (const key of ['nbd', 'admin', 'peer'] as const) {
      const hp = ss[key];
      if (hp === undefined) continue;
      const at: Segment[] = ['storageSystems', i, key];
      // Port 0 asks the kernel for a free port: it never clashes.
      const clash = hp.port === 0 ? undefined : tcp.find((t) => t.hp.port === hp.port && hostsOverlap(t.canon, canonicalHost(hp.host)));
      if (clash) report(at, `port ${hp.port} on ${hp.host} is already used by ${formatPath(clash.at)} (${formatHostPort(clash.hp)})`);
      else tcp.push({ at, hp, canon: canonicalHost(hp.host) });
    }
    if (ss.nbdSocket !== undefined) {
      const first = sockets.get(ss.nbdSocket);
      if (first) report(['storageSystems', i, 'nbdSocket'], `socket ${ss.nbdSocket} is already used by ${first}`);
      else sockets.set(ss.nbdSocket, `storageSystems[${i}].nbdSocket`);
    }
    if (ss.dataDir !== undefined) {
      const first = dataDirs.get(ss.dataDir);
      if (first) report(['storageSystems', i, 'dataDir'], `data directory ${ss.dataDir} is already used by ${first}`);
      else dataDirs.set(ss.dataDir, `storageSystems[${i}].dataDir`);
    }
  });
}

export const WILDCARD_HOSTS = new Set(['0.0.0.0', '::']);
export const LOOPBACK_HOSTS = new Set(['127.0.0.1', '::1']);

export function canonicalHost(host: string): string {
  const h = host.toLowerCase();
  // The URL parser canonicalises IPv6 spellings: 0:0::0 -> ::, 0:0:0:0:0:0:0:1 -> ::1.
  // includes(':') first: net.isIPv6's first call compiles a large regular expression, 7-12 ms of
  // every CLI start that reads a configuration of IPv4 addresses (issue 18).
  return h.includes(':') && net.isIPv6(h) ? new URL(`http://[${h}]/`).hostname.slice(1, -1) : h;
}

export function hostsOverlap(a: string, b: string): boolean {
  if (a === b || WILDCARD_HOSTS.has(a) || WILDCARD_HOSTS.has(b)) return true;
  return (a === 'localhost' && LOOPBACK_HOSTS.has(b)) || (b === 'localhost' && LOOPBACK_HOSTS.has(a));
}


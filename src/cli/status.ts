// `blockmirror status -c FILE [--json]`: ask every storage system's admin API,
// merge the answers into one cluster view, print it.
import type { Command } from 'commander';
import { getStatus, type AdminEndpoint } from '../admin/client.js';
import { clientAdminToken } from '../cluster/admin-token.js';
import type { LivePair } from '../cfs/server.js';
import { adminClientCa } from '../cluster/credentials.js';
import type { ClusterConfig, StorageSystemConfig } from '../cluster/config.js';
import { mergeReports as mergeClusterReports, type PairRow, type ReportAnswer, type SSView, type StorageSystemStatus } from '../controller/status.js';
import type { EtcdView } from '../cluster/etcd/view.js';
import { loadConfigOrUsage } from './config-cache.js';
import { UsageError } from './errors.js';
import { humanBytes } from './progress.js';

// humanBytes lives in progress.ts, which `cfs put/get` load without the rest of this module.
export { humanBytes };

export const DEFAULT_STATUS_TIMEOUT_MS = 3000;

/** `blockmirror status --json`: the merged view (controller/status.ts), plus etcd's tables. */
export interface ClusterStatus {
  storageSystems: SSView[];
  pairs: PairRow[];
  /** With etcd (docs/cluster.md): its tables (cluster/etcd/view.ts), or why they could not be read. */
  etcd?: EtcdView | { error: string };
}

/** The etcd tables a status shows; never throws (an unreachable etcd is reported in the status). */
async function readEtcd(config: ClusterConfig, timeoutMs: number): Promise<ClusterStatus['etcd']> {
  const [{ ClusterStore }, { etcdView }, { pino }] = await Promise.all([import('../cluster/etcd/store.js'), import('../cluster/etcd/view.js'), import('pino')]);
  try {
    const store = await ClusterStore.connect(config.etcd!, pino({ level: 'silent' }), timeoutMs);
    try {
      return etcdView(store.tables, config.storageSystems.map((s) => s.id));
    } finally {
      await store.close();
    }
  } catch (e) {
    return { error: (e as Error).message };
  }
}

interface StatusOptions {
  config: string;
  json?: boolean;
  timeout: string;
}

export function registerStatusCommand(program: Command): void {
  program
    .command('status')
    .description('show every storage system, volume and pair of a cluster (asks each admin API)')
    .requiredOption('-c, --config <file>', 'cluster configuration (YAML)')
    .option('--json', 'print the merged status as JSON on stdout')
    .option('--timeout <ms>', 'how long to wait for each storage system', String(DEFAULT_STATUS_TIMEOUT_MS))
    .action(async (opts: StatusOptions) => {
      const config = await loadConfigOrUsage(opts.config);
      const timeoutMs = parseTimeout(opts.timeout);
      const status = await collectStatus(config, timeoutMs);
      if (config.etcd) status.etcd = await readEtcd(config, timeoutMs);
      process.stdout.write(opts.json ? `${JSON.stringify(status, null, 2)}\n` : renderStatus(status, opts.config));
      // Still printed what is known; the exit code says something was missing.
      if (status.storageSystems.some((s) => !s.reachable)) process.exitCode = 1;
    });
}

/** loadConfig, with every failure a one-line usage error; cached per version of the file (config-cache.ts). */
export { loadConfigOrUsage };

/** Where to reach a storage system's admin API; throws when the file leaves the port to the kernel. */
export function adminEndpoint(config: ClusterConfig, ss: StorageSystemConfig): AdminEndpoint {
  if (ss.admin.port === 0) {
    throw new Error(`storage system ${ss.id}: admin port is 0 in the configuration (any free port), so its address is not known`);
  }
  const token = clientAdminToken(config, ss.id);
  const ca = adminClientCa(config);
  return { ss: ss.id, host: ss.admin.host, port: ss.admin.port, ...(token ? { token } : {}), ...(ca ? { ca } : {}) };
}

export function parseTimeout(text: string): number {
  const ms = Number(text);
  if (!Number.isInteger(ms) || ms <= 0) throw new UsageError(`invalid --timeout "${text}" (expected milliseconds, e.g. 3000)`);
  return ms;
}

/** Asks every storage system in parallel and merges the reports; never throws for an unreachable one. */
export async function collectStatus(config: ClusterConfig, timeoutMs: number): Promise<ClusterStatus> {
  const answers = await Promise.all(
    config.storageSystems.map(async (ss) => {
      try {
        return { id: ss.id, report: await getStatus(adminEndpoint(config, ss), timeoutMs) };
      } catch (e) {
        return { id: ss.id, error: (e as Error).message };
      }
    }),
  );
  return mergeReports(config, answers);
}

/**
 * The pairs as the CFS server needs them (cfs/server.ts LivePair): each pair's current master,
 * and the mirrors whose reads are current (the pair in PAIR or COPY, the mirror connected). Pairs
 * no storage system reported are left out, so the server keeps its last view of them.
 */
export async function livePairs(config: ClusterConfig, timeoutMs: number): Promise<Map<string, LivePair>> {
  const st = await collectStatus(config, timeoutMs);
  const out = new Map<string, LivePair>();
  for (const p of st.pairs) {
    const current = (p.state === 'PAIR' || p.state === 'COPY') && !p.stale;
    const readable = current ? p.mirrors.filter((m) => m.connected !== false).map((m) => ({ ss: m.ss, vol: m.vol })) : [];
    out.set(p.name, { master: { ss: p.master.ss, vol: p.master.vol }, readable });
  }
  return out;
}

/**
 * One entry per configured storage system, in configuration order. A pair is
 * reported once, by the storage system holding its master (the one that runs
 * the pair); when that one is unreachable, by whichever mirror side answered.
 */
export function mergeReports(config: ClusterConfig, answers: ReportAnswer[]): ClusterStatus {
  return mergeClusterReports(answers, { pairOrder: config.pairs.map((p) => p.name), masterOf: new Map(config.pairs.map((p) => [p.name, p.master.ss])) });
}


// ---------------------------------------------------------------------------
// The human-readable form.

/** `configFile` names the YAML in the hints (what to run next). */
export function renderStatus(status: ClusterStatus, configFile = 'FILE'): string {
  const out: string[] = [];

  out.push('STORAGE SYSTEMS');
  out.push(
    ...table(
      ['SS', 'NBD', 'ADMIN', 'CACHE'],
      status.storageSystems.map((s) =>
        s.reachable
          ? [String(s.id), s.nbdSocket ? `${s.nbd} ${s.nbdSocket}` : s.nbd, s.admin, cacheText(s.cache)]
          : [String(s.id), 'UNREACHABLE', '', ''],
      ),
      'llll',
    ),
  );
  for (const s of status.storageSystems) {
    if (!s.reachable) out.push(`  ${s.error}${/ is not reachable: /.test(s.error) ? `; start it on its host (blockmirror up -c ${configFile} --only ${s.id}) or check its admin address` : ''}`);
  }

  const volumes = status.storageSystems.flatMap((s) => (s.reachable ? s.volumes.map((v) => ({ ss: s.id, v })) : []));
  out.push('', 'VOLUMES');
  if (volumes.length === 0) out.push('  (none known)');
  else {
    out.push(
      ...table(
        ['SS', 'VOL', 'EXPORT', 'SIZE', 'ROLE', 'PAIR', 'READ', 'WRITTEN', 'READS', 'WRITES'],
        volumes.map(({ ss, v }) => [
          String(ss),
          String(v.id),
          v.export,
          humanBytes(v.size),
          v.role,
          v.pair ?? '-',
          humanBytes(v.readBytes),
          humanBytes(v.writeBytes),
          String(v.readOps),
          String(v.writeOps),
        ]),
        'rrlrllrrrr',
      ),
    );
  }

  out.push('', 'PAIRS');
  if (status.pairs.length === 0) out.push('  (none known)');
  else {
    const rows: string[][] = [];
    for (const p of status.pairs) {
      const first = [p.name, p.mode, p.state, volRef(p.master)];
      if (p.mirrors.length === 0) rows.push([...first, '-', '', '', '', '']);
      p.mirrors.forEach((m, i) => {
        const lead = i === 0 ? first : ['', '', '', ''];
        rows.push([...lead, volRef(m), String(m.invalidClusters), percent(m.syncProgress), humanBytes(m.copiedBytes), eta(m.etaSeconds)]);
      });
    }
    out.push(...table(['PAIR', 'MODE', 'STATE', 'MASTER', 'MIRROR', 'INVALID', 'SYNCED', 'COPIED', 'ETA'], rows, 'lllllrrrr'));
    for (const p of status.pairs) if (p.error) out.push(`  ${p.name}: ${p.state}: ${p.error}`);
    for (const p of status.pairs) {
      if (p.role === 'mirror') out.push(`  ${p.name}: the master's storage system ${p.master.ss} did not answer; shown as its mirror sees it${p.stale ? ' (its data may be stale, so it refuses host reads; pair takeover there makes it the master)' : ''}`);
    }
  }

  const sessions = status.storageSystems.flatMap((s) => (s.reachable && s.iscsi ? s.iscsi.sessions.map((x) => ({ ss: s.id, x })) : []));
  if (status.storageSystems.some((s) => s.reachable && s.iscsi)) {
    out.push('', 'ISCSI SESSIONS');
    if (sessions.length === 0) out.push('  (none logged in)');
    else {
      out.push(
        ...table(
          ['SS', 'INITIATOR', 'ADDRESS', 'TARGET', 'CONNS', 'LUNS', 'COMMANDS', 'READ', 'WRITTEN'],
          sessions.map(({ ss, x }) => [String(ss), x.initiator, x.address, x.target, String(x.connections), x.luns.join(',') || '-', String(x.commands), humanBytes(x.readBytes), humanBytes(x.writeBytes)]),
          'lllllrrrr',
        ),
      );
    }
  }

  if (status.etcd) out.push(...renderEtcd(status.etcd));

  // Faults injected on purpose (docs/faults.md): an operator must never mistake one for a real failure.
  const faults = status.storageSystems.flatMap((s) => (s.reachable ? (s.faults ?? []) : []));
  const shown = new Set<string>();
  const lines = faults.filter((f) => !shown.has(`${f.target} ${f.kind}`) && shown.add(`${f.target} ${f.kind}`)).map((f) => `  ${f.target}: ${f.description}`);
  if (lines.length > 0) out.push('', 'INJECTED FAULTS', ...lines);
  return `${out.join('\n')}\n`;
}

/** The etcd tables (docs/cluster.md): storage systems' leases, logical volumes, mirrors, failovers. */
function renderEtcd(etcd: EtcdView | { error: string }): string[] {
  const out = ['', 'CLUSTER TABLES (etcd)'];
  if ('error' in etcd) return [...out, `  ${etcd.error}`];
  const ref = (r: { ss: number; vol: number }) => `ss${r.ss}/vol${r.vol}`;
  out.push(...table(['SS', 'HEALTH', 'NBD', 'REGISTERED'], etcd.storageSystems.map((s) => [String(s.id), s.health, s.nbd ?? '-', s.startedAt ?? '-']), 'rlll'));
  out.push('');
  const mirrorsOf = (name: string) => etcd.mirrors.find((m) => m.name === name)?.mirrors.map((m) => `${ref(m)} ${m.state}`).join(', ') || '-';
  out.push(...table(['LOGICAL VOLUME', 'MASTER', 'EPOCH', 'MODE', 'STATE', 'MIRRORS'], etcd.logicalVolumes.map((lv) => [lv.name, ref(lv.master), String(lv.epoch), lv.mode, lv.state ?? '-', mirrorsOf(lv.name)]), 'llrlll'));
  out.push('', 'FAILOVER HISTORY (etcd)');
  if (etcd.history.length === 0) out.push('  (no failover yet)');
  else out.push(...table(['TIME', 'VOLUME', 'EPOCH', 'FROM', 'TO', 'REASON'], etcd.history.map((h) => [h.at, h.name, String(h.epoch), ref(h.from), ref(h.to), h.reason]), 'llrlll'));
  return out;
}

function cacheText(cache: StorageSystemStatus['cache']): string {
  if (cache === undefined) return 'none';
  const lookups = cache.hits + cache.misses;
  const hitRate = lookups === 0 ? '-' : percent(cache.hits / lookups);
  const bypass = cache.bypass === undefined ? '' : cache.bypass === 0 ? ', every write cached' : `, writes ≥ ${humanBytes(cache.bypass)} and sequential streams past ${humanBytes(cache.bypass)} bypass it (${humanBytes(cache.bypassedBytes ?? 0)} so far)`;
  return `${humanBytes(cache.size)} (used ${humanBytes(cache.usedBytes)}, dirty ${humanBytes(cache.dirtyBytes)}, hits ${hitRate}${bypass})`;
}

function volRef(r: { ss: number; vol: number }): string {
  return `${r.ss}:${r.vol}`;
}

/** The controller's sync ETA: 42s, 3m07s, 2h05m; "-" when in sync or unknown (suspended, not measured yet). */
export function eta(seconds: number | null | undefined): string {
  if (seconds === null || seconds === undefined || seconds <= 0) return '-';
  const pad = (n: number) => String(n).padStart(2, '0');
  if (seconds < 60) return `${seconds}s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)}m${pad(seconds % 60)}s`;
  return `${Math.floor(seconds / 3600)}h${pad(Math.floor((seconds % 3600) / 60))}m`;
}

/** Rounded down to 0.1 %, so that "100.0%" only ever means in sync. */
export function percent(fraction: number): string {
  return `${(Math.floor(fraction * 1000) / 10).toFixed(1)}%`;
}

/** Two-space indented columns; align is one letter per column, l or r. */
function table(headers: string[], rows: string[][], align: string): string[] {
  const widths = headers.map((h, c) => Math.max(h.length, ...rows.map((r) => (r[c] ?? '').length)));
  const line = (cells: string[]) =>
    `  ${cells
      .map((cell, c) => (align[c] === 'r' ? cell.padStart(widths[c]!) : cell.padEnd(widths[c]!)))
      .join('  ')
      .trimEnd()}`;
  return [line(headers), ...rows.map(line)];
}

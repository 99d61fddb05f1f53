// GET /metrics of one storage system, in the Prometheus text format.
//
// Every value is read at scrape time, from the counters the storage system
// keeps anyway (host I/O counters and latency buckets, bitmaps, cache stats,
// NBD connections): the I/O path pays for a few increments, nothing more.
// Each admin server has its own Registry, not prom-client's global one,
// because one process may run several storage systems.
//
//   metric                                     type       labels
//   blockmirror_volume_size_bytes              gauge      ss, vol
//   blockmirror_volume_read_bytes_total        counter    ss, vol, protocol (nbd, iscsi)
//   blockmirror_volume_write_bytes_total       counter    ss, vol, protocol
//   blockmirror_volume_read_ops_total          counter    ss, vol, protocol
//   blockmirror_volume_write_ops_total         counter    ss, vol, protocol
//   blockmirror_volume_read_latency_seconds    histogram  ss, vol, protocol
//   blockmirror_volume_write_latency_seconds   histogram  ss, vol, protocol
//   blockmirror_pair_state                     gauge      ss, pair, state   (1 for the current state, 0 for the others)
//   blockmirror_pair_clusters                  gauge      ss, pair
//   blockmirror_mirror_invalid_clusters        gauge      ss, pair, mirror  (mirror="ss2/vol7")
//   blockmirror_sync_copied_bytes_total        counter    ss, pair, mirror
//   blockmirror_cache_size_bytes               gauge      ss
//   blockmirror_cache_used_bytes               gauge      ss
//   blockmirror_cache_dirty_bytes              gauge      ss
//   blockmirror_cache_hits_total               counter    ss
//   blockmirror_cache_misses_total             counter    ss
//   blockmirror_cache_bypassed_bytes_total     counter    ss
//   blockmirror_nbd_connections                gauge      ss
//   blockmirror_nbd_connections_total          counter    ss
//   blockmirror_frontend_sessions              gauge      ss, protocol (nbd, iscsi)
//   blockmirror_memory_bytes                   gauge      ss         (memory volumes only)
//   blockmirror_memory_shared_bytes            gauge      ss
//   blockmirror_memory_unshared_pages_total    counter    ss
//   blockmirror_memory_compactions_total       counter    ss
import type { FastifyInstance } from 'fastify';
import { Counter, Gauge, Registry, type Metric } from 'prom-client';
import type { AdminTarget, PairState, SSReport, TargetMetrics } from '../controller/status.js';
import { LATENCY_BOUNDS, type LatencyHistogram } from '../controller/volume-stats.js';
import type { RouteAdder } from './server.js';

type Labels = Record<string, string>;
type Row<T> = [Labels, T];

interface Snapshot {
  report: SSReport;
  metrics: TargetMetrics | undefined;
}

const PAIR_STATES: readonly PairState[] = ['COPY', 'PAIR', 'PSUS', 'PSUE'];

export function registerMetrics(app: FastifyInstance, target: AdminTarget, route: RouteAdder): void {
  const registry = new Registry();
  // Taken once per scrape, so that every family describes the same moment and report() runs once.
  let snap: Snapshot = { report: { storageSystems: [], pairs: [] }, metrics: undefined };

  const counter = (name: string, help: string, rows: () => Row<number>[]) =>
    new Counter({
      name,
      help,
      labelNames: labelNamesOf(name),
      registers: [registry],
      collect() {
        // Counters only go up through inc(); start from zero and add the live total.
        this.reset();
        for (const [labels, value] of rows()) this.inc(labels, value);
      },
    });
  const gauge = (name: string, help: string, rows: () => Row<number>[]) =>
    new Gauge({
      name,
      help,
      labelNames: labelNamesOf(name),
      registers: [registry],
      collect() {
        this.reset(); // a pair or volume that is gone must not linger
        for (const [labels, value] of rows()) this.set(labels, value);
      },
    });
  const histogram = (name: string, help: string, rows: () => Row<LatencyHistogram>[]) =>
    registry.registerMetric(new CountedHistogram(name, help, rows) as unknown as Metric);

  // The rows of each family: [labels, source] for every volume, pair, mirror or cache.
  // Pairs, latencies and connections belong to the storage system serving this API.
  const self = () => String(snap.report.storageSystems[0]?.id ?? '');
  const volumes = () =>
    snap.report.storageSystems.flatMap((ss) => ss.volumes.map((v): Row<typeof v> => [{ ss: String(ss.id), vol: String(v.id) }, v]));
  // Host I/O, a row per volume and front end (iSCSI only where the storage system has a target).
  const io = () => (snap.metrics?.volumes ?? []).map((v): Row<typeof v> => [{ ss: self(), vol: String(v.id), protocol: v.protocol }, v]);
  const pairs = () => snap.report.pairs.map((p): Row<typeof p> => [{ ss: self(), pair: p.name }, p]);
  const mirrors = () => pairs().flatMap(([labels, p]) => p.mirrors.map((m): Row<typeof m> => [{ ...labels, mirror: `ss${m.ss}/vol${m.vol}` }, m]));
  const caches = () => snap.report.storageSystems.flatMap((ss) => (ss.cache ? [[{ ss: String(ss.id) }, ss.cache] as Row<typeof ss.cache>] : []));
  const nbd = () => (snap.metrics ? [[{ ss: self() }, snap.metrics.nbd] as Row<TargetMetrics['nbd']>] : []);
  const memory = () => (snap.metrics?.memory ? [[{ ss: self() }, snap.metrics.memory] as Row<NonNullable<TargetMetrics['memory']>>] : []);

  gauge('blockmirror_volume_size_bytes', 'Volume size in bytes.', () => volumes().map(([l, v]) => [l, v.size]));
  counter('blockmirror_volume_read_bytes_total', 'Bytes read by hosts, by protocol (nbd, iscsi).', () => io().map(([l, v]) => [l, v.counters.readBytes]));
  counter('blockmirror_volume_write_bytes_total', 'Bytes written by hosts, by protocol (nbd, iscsi).', () => io().map(([l, v]) => [l, v.counters.writeBytes]));
  counter('blockmirror_volume_read_ops_total', 'Read requests from hosts, by protocol.', () => io().map(([l, v]) => [l, v.counters.readOps]));
  counter('blockmirror_volume_write_ops_total', 'Write requests from hosts, by protocol.', () => io().map(([l, v]) => [l, v.counters.writeOps]));
  histogram('blockmirror_volume_read_latency_seconds', 'Time the storage system took to serve a host read, by protocol.', () => io().map(([l, v]) => [l, v.latency.read]));
  histogram('blockmirror_volume_write_latency_seconds', 'Time the storage system took to acknowledge a host write, by protocol.', () => io().map(([l, v]) => [l, v.latency.write]));

  gauge('blockmirror_pair_state', 'Pair state: 1 for the current one (COPY, PAIR, PSUS, PSUE), 0 for the others.', () =>
    pairs().flatMap(([l, p]) => PAIR_STATES.map((state): Row<number> => [{ ...l, state }, p.state === state ? 1 : 0])),
  );
  gauge('blockmirror_pair_clusters', 'Clusters per volume of the pair (the bitmap size).', () => pairs().map(([l, p]) => [l, p.clusters]));
  gauge('blockmirror_mirror_invalid_clusters', 'Clusters the mirror does not have up to date.', () => mirrors().map(([l, m]) => [l, m.invalidClusters]));
  counter('blockmirror_sync_copied_bytes_total', 'Bytes the sync daemon copied to the mirror.', () => mirrors().map(([l, m]) => [l, m.copiedBytes]));

  gauge('blockmirror_cache_size_bytes', 'Cache memory capacity.', () => caches().map(([l, c]) => [l, c.size]));
  gauge('blockmirror_cache_used_bytes', 'Cache memory in use.', () => caches().map(([l, c]) => [l, c.usedBytes]));
  gauge('blockmirror_cache_dirty_bytes', 'Cached bytes not yet written to the volumes.', () => caches().map(([l, c]) => [l, c.dirtyBytes]));
  counter('blockmirror_cache_hits_total', 'Cache blocks found in the cache by a read.', () => caches().map(([l, c]) => [l, c.hits]));
  counter('blockmirror_cache_misses_total', 'Cache blocks a read had to fetch from the volume.', () => caches().map(([l, c]) => [l, c.misses]));
  counter('blockmirror_cache_bypassed_bytes_total', 'Bytes of large writes and sequential streams that went past the cache, straight to the volumes.', () => caches().map(([l, c]) => [l, c.bypassedBytes ?? 0]));

  gauge('blockmirror_nbd_connections', 'NBD connections open now (handshake done).', () => nbd().map(([l, n]) => [l, n.connections]));
  counter('blockmirror_nbd_connections_total', 'NBD connections accepted since start.', () => nbd().map(([l, n]) => [l, n.totalConnections]));
  // Host sessions of every front end, by protocol: NBD connections and iSCSI sessions.
  gauge('blockmirror_frontend_sessions', 'Host sessions open now, by protocol (nbd: connections; iscsi: logged-in sessions).', () => {
    const m = snap.metrics;
    if (!m) return [];
    const rows: Row<number>[] = [[{ ss: self(), protocol: 'nbd' }, m.nbd.connections]];
    if (m.iscsi) rows.push([{ ss: self(), protocol: 'iscsi' }, m.iscsi.sessions]);
    return rows;
  });

  gauge('blockmirror_memory_bytes', 'Memory of the memory volumes: slabs of 1 MiB.', () => memory().map(([l, m]) => [l, m.bytes]));
  gauge('blockmirror_memory_shared_bytes', 'Pages a volume shares with another instead of a copy (a same-SS sync mirror\'s).', () => memory().map(([l, m]) => [l, m.sharedBytes]));
  counter('blockmirror_memory_unshared_pages_total', 'Shared pages copied for the volume that had them, so that their owner could write in place.', () => memory().map(([l, m]) => [l, m.evictions]));
  counter('blockmirror_memory_compactions_total', 'Large writes that moved pages to make room for themselves in runs.', () => memory().map(([l, m]) => [l, m.compactions]));

  route(app, 'GET', '/metrics', async (_req, reply) => {
    snap = { report: target.report(), metrics: target.metrics?.() };
    const text = await registry.metrics();
    return reply.type(registry.contentType).send(text);
  });
}

/** The label names follow from the family, so each definition above states only its rows. */
function labelNamesOf(name: string): string[] {
  if (name === 'blockmirror_volume_size_bytes') return ['ss', 'vol'];
  if (name.startsWith('blockmirror_volume_')) return ['ss', 'vol', 'protocol'];
  if (name === 'blockmirror_pair_state') return ['ss', 'pair', 'state'];
  if (name === 'blockmirror_frontend_sessions') return ['ss', 'protocol'];
  if (name.startsWith('blockmirror_pair_')) return ['ss', 'pair'];
  if (name.startsWith('blockmirror_mirror_') || name.startsWith('blockmirror_sync_')) return ['ss', 'pair', 'mirror'];
  return ['ss'];
}

/**
 * A histogram whose buckets are counted elsewhere (LatencyHistogram, on the
 * I/O path) and read at scrape time. prom-client's Histogram only takes one
 * observation at a time, so this speaks the registry's metric protocol
 * itself: a name, a type, and get() with the _bucket, _sum and _count series.
 */
class CountedHistogram {
  readonly type = 'histogram';
  readonly aggregator = 'sum';

  constructor(
    readonly name: string,
    readonly help: string,
    private readonly rows: () => Row<LatencyHistogram>[],
  ) {}

  async get() {
    const values: { metricName: string; labels: Record<string, string | number>; value: number }[] = [];
    for (const [labels, h] of this.rows()) {
      let cumulative = 0;
      for (let i = 0; i <= LATENCY_BOUNDS.length; i++) {
        cumulative += h.counts[i]!;
        values.push({ metricName: `${this.name}_bucket`, labels: { ...labels, le: LATENCY_BOUNDS[i] ?? '+Inf' }, value: cumulative });
      }
      values.push({ metricName: `${this.name}_sum`, labels, value: h.sum });
      values.push({ metricName: `${this.name}_count`, labels, value: cumulative });
    }
    return { name: this.name, help: this.help, type: this.type, values, aggregator: this.aggregator };
  }
}

// /metrics and the dashboard's JSON routes, against real storage systems in
// this process (started from YAML, as `blockmirror up` does) with real NBD
// clients writing to them.
import http from 'node:http';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { pino } from 'pino';
import { startAdminServer, type AdminServer } from '../src/admin/server.js';
import type { ClusterView, DashboardFrame } from '../src/admin/dashboard.js';
import { parseConfig } from '../src/cluster/config.js';
import { startStorageSystems } from '../src/cluster/cluster.js';
import { ClusterBitmap } from '../src/controller/bitmap.js';
import type { AdminTarget, PairBitmap } from '../src/controller/status.js';
import type { StorageSystem } from '../src/controller/storage-system.js';
import { connect, type NbdClient } from '../src/nbd/client.js';
import { freePort } from './helpers/servers.js';

const log = pino({ level: 'silent' });
const KiB = 1024;
const MiB = 1024 * KiB;

// SS 1 runs an async pair whose sync daemon is slow (64 KiB/s: one cluster a
// second), so that Invalid clusters stay visible, and a sync pair. SS 2 runs
// two pairs, the sync one for the memory volumes' shared pages. SS 3 is in the file but never started.
function yaml(admin: number[]): string {
  return `
clusterSize: 64KiB
storageSystems:
  - id: 1
    nbd: 127.0.0.1:0
    admin: 127.0.0.1:${admin[0]}
    cache: { size: 8MiB }
    volumes:
      - { id: 8, size: 64MiB }
      - { id: 7, size: 64MiB }
      - { id: 5, size: 16MiB }
      - { id: 6, size: 16MiB }
  - id: 2
    nbd: 127.0.0.1:0
    admin: 127.0.0.1:${admin[1]}
    volumes:
      - { id: 1, size: 16MiB }
      - { id: 2, size: 16MiB }
      - { id: 3, size: 16MiB }
      - { id: 4, size: 16MiB }
  - id: 3
    nbd: 127.0.0.1:0
    admin: 127.0.0.1:${admin[2]}
    volumes:
      - { id: 1, size: 16MiB }
pairs:
  - { name: pair1, mode: async, master: { ss: 1, vol: 8 }, mirrors: [ { ss: 1, vol: 7 } ], syncRate: 64KiB }
  - { name: pair2, mode: sync, master: { ss: 1, vol: 5 }, mirrors: [ { ss: 1, vol: 6 } ] }
  - { name: pair3, mode: async, master: { ss: 2, vol: 1 }, mirrors: [ { ss: 2, vol: 2 } ] }
  - { name: pair4, mode: sync, master: { ss: 2, vol: 3 }, mirrors: [ { ss: 2, vol: 4 } ] }
`;
}

let systems: StorageSystem[] = [];
const admins: AdminServer[] = [];
let base: string;
let client: NbdClient;

beforeAll(async () => {
  const ports = [await freePort(), await freePort(), await freePort()];
  const config = parseConfig(yaml(ports), 'metrics.yaml', '/tmp');
  systems = await startStorageSystems(config, [1, 2], log);
  const peers = config.storageSystems.map((s) => ({ id: s.id, host: s.admin.host, port: s.admin.port }));
  for (const [i, ss] of systems.entries()) admins.push(await startAdminServer(ss, { host: '127.0.0.1', port: ports[i]!, log, peers }));
  base = `http://${admins[0]!.address}`;
  client = await connect(`nbd://${systems[0]!.nbdAddr}/vol8`);
});

afterAll(async () => {
  await client?.close();
  await Promise.all(admins.map((a) => a.close()));
  await Promise.all(systems.map((s) => s.close()));
});

async function get(path: string, init: RequestInit = {}): Promise<{ status: number; text: string; headers: Headers }> {
  const res = await fetch(`${base}${path}`, init);
  return { status: res.status, text: await res.text(), headers: res.headers };
}

async function metrics(): Promise<string> {
  const r = await get('/metrics');
  expect(r.status).toBe(200);
  return r.text;
}

/** The value of one sample, e.g. value(text, 'blockmirror_volume_write_ops_total{ss="1",vol="8"}'). */
function value(text: string, series: string): number {
  const line = text.split('\n').find((l) => l.startsWith(`${series} `));
  if (line === undefined) throw new Error(`no sample ${series} in:\n${text}`);
  return Number(line.slice(series.length + 1));
}

async function until<T>(what: string, probe: () => Promise<T | undefined>, ms = 20_000): Promise<T> {
  const deadline = Date.now() + ms;
  for (;;) {
    const v = await probe();
    if (v !== undefined) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

describe('/metrics', () => {
  it('serves the Prometheus text format with every blockmirror family and its labels', async () => {
    const r = await get('/metrics');
    expect(r.status).toBe(200);
    expect(r.headers.get('content-type')).toBe('text/plain; version=0.0.4; charset=utf-8');
    const families = [...r.text.matchAll(/^# TYPE (\S+) (\S+)$/gm)].map((m) => `${m[1]} ${m[2]}`);
    expect(families).toEqual(
      expect.arrayContaining([
        'blockmirror_volume_read_bytes_total counter',
        'blockmirror_volume_write_bytes_total counter',
        'blockmirror_volume_read_ops_total counter',
        'blockmirror_volume_write_ops_total counter',
        'blockmirror_volume_read_latency_seconds histogram',
        'blockmirror_volume_write_latency_seconds histogram',
        'blockmirror_pair_state gauge',
        'blockmirror_mirror_invalid_clusters gauge',
        'blockmirror_sync_copied_bytes_total counter',
        'blockmirror_cache_hits_total counter',
        'blockmirror_cache_misses_total counter',
        'blockmirror_cache_dirty_bytes gauge',
        'blockmirror_cache_bypassed_bytes_total counter',
        'blockmirror_nbd_connections gauge',
      ]),
    );
    expect(families.every((f) => f.startsWith('blockmirror_'))).toBe(true);
    expect(value(r.text, 'blockmirror_pair_state{ss="1",pair="pair2",state="PAIR"}')).toBe(1);
    expect(value(r.text, 'blockmirror_pair_state{ss="1",pair="pair2",state="PSUS"}')).toBe(0);
    expect(value(r.text, 'blockmirror_nbd_connections{ss="1"}')).toBe(1);
    // Each storage system reports its own: SS 2's pair is not on SS 1's page.
    expect(r.text).not.toContain('pair3');
  });

  it('counts host writes and reads with their latencies, and the Invalid clusters they leave', async () => {
    const before = await metrics();
    const vol = '{ss="1",vol="8",protocol="nbd"}';
    await client.pwrite(Buffer.alloc(MiB, 0xab), 8 * MiB);
    await client.pwrite(Buffer.alloc(64 * KiB, 0xcd), 32 * MiB);
    await client.pread(64 * KiB, 8 * MiB);
    const after = await metrics();
    expect(value(after, `blockmirror_volume_write_bytes_total${vol}`) - value(before, `blockmirror_volume_write_bytes_total${vol}`)).toBe(MiB + 64 * KiB);
    // No iSCSI target on this storage system: no iscsi rows.
    expect(after).not.toContain('protocol="iscsi"');
    expect(value(after, `blockmirror_volume_write_ops_total${vol}`) - value(before, `blockmirror_volume_write_ops_total${vol}`)).toBe(2);
    expect(value(after, `blockmirror_volume_read_bytes_total${vol}`) - value(before, `blockmirror_volume_read_bytes_total${vol}`)).toBe(64 * KiB);
    // Every request lands in one latency bucket: the histogram's count is the op count, and +Inf holds them all.
    const ops = value(after, `blockmirror_volume_write_ops_total${vol}`);
    expect(value(after, `blockmirror_volume_write_latency_seconds_count${vol}`)).toBe(ops);
    expect(value(after, 'blockmirror_volume_write_latency_seconds_bucket{ss="1",vol="8",protocol="nbd",le="+Inf"}')).toBe(ops);
    expect(value(after, `blockmirror_volume_write_latency_seconds_sum${vol}`)).toBeGreaterThan(0);
    expect(value(after, `blockmirror_volume_read_latency_seconds_count${vol}`)).toBe(value(after, `blockmirror_volume_read_ops_total${vol}`));
    const buckets = [...after.matchAll(/^blockmirror_volume_write_latency_seconds_bucket\{ss="1",vol="8",protocol="nbd",le="[^"]+"\} (\d+)$/gm)].map((m) => Number(m[1]));
    expect(buckets).toEqual([...buckets].sort((a, b) => a - b)); // cumulative
    // 1 MiB + 64 KiB on 64 KiB clusters: 17 Invalid, and the daemon copies one a second.
    expect(value(after, 'blockmirror_mirror_invalid_clusters{ss="1",pair="pair1",mirror="ss1/vol7"}')).toBeGreaterThanOrEqual(15);
    expect(value(after, 'blockmirror_pair_state{ss="1",pair="pair1",state="COPY"}')).toBe(1);
    expect(value(after, 'blockmirror_cache_hits_total{ss="1"}') + value(after, 'blockmirror_cache_misses_total{ss="1"}')).toBeGreaterThan(0);
    // The 1 MiB write went past the cache, straight to the volume (cache/memory.ts, rule 5).
    const bypassed = 'blockmirror_cache_bypassed_bytes_total{ss="1"}';
    expect(value(after, bypassed) - value(before, bypassed)).toBeGreaterThanOrEqual(MiB);
    await until('the sync daemon to copy a cluster', async () => {
      const v = value(await metrics(), 'blockmirror_sync_copied_bytes_total{ss="1",pair="pair1",mirror="ss1/vol7"}');
      return v > 0 ? v : undefined;
    });
  });

  it('shows the memory a same-SS sync mirror shares with its master instead of copying, and the pages it unshares', async () => {
    // SS 2 has no cache memory: a sync mirror there takes the master's pages of a 1 MiB WRITE.
    const ss2 = `http://${admins[1]!.address}/metrics`;
    const text = async () => (await fetch(ss2)).text();
    const before = await text();
    expect(value(before, 'blockmirror_memory_shared_bytes{ss="2"}')).toBe(0);
    const c = await connect(`nbd://${systems[1]!.nbdAddr}/vol3`);
    try {
      for (let m = 0; m < 8; m++) await c.pwrite(Buffer.alloc(MiB, 0x40 + m), m * MiB);
      const after = await text();
      // 16 MiB if the mirror copied; the pages that came with each request's header are copied.
      expect(value(after, 'blockmirror_memory_shared_bytes{ss="2"}')).toBeGreaterThanOrEqual(7 * MiB);
      expect(value(after, 'blockmirror_memory_bytes{ss="2"}')).toBeLessThanOrEqual(10 * MiB);
      // A small write to a shared page: the mirror gets a copy of its own, the master writes in place.
      await c.pwrite(Buffer.alloc(4 * KiB, 0x99), 4 * MiB + 8 * KiB);
      const later = await text();
      expect(value(later, 'blockmirror_memory_unshared_pages_total{ss="2"}') - value(after, 'blockmirror_memory_unshared_pages_total{ss="2"}')).toBe(1);
      expect(value(later, 'blockmirror_memory_shared_bytes{ss="2"}')).toBe(value(after, 'blockmirror_memory_shared_bytes{ss="2"}') - 4 * KiB);
      expect(value(later, 'blockmirror_memory_compactions_total{ss="2"}')).toBe(0);
    } finally {
      await c.close();
    }
    // Both copies hold every byte written.
    const m = await connect(`nbd://${systems[1]!.nbdAddr}/vol3`);
    const r = await connect(`nbd://${systems[1]!.nbdAddr}/vol4`);
    try {
      const want = Buffer.concat(Array.from({ length: 8 }, (_, i) => Buffer.alloc(MiB, 0x40 + i)));
      want.fill(0x99, 4 * MiB + 8 * KiB, 4 * MiB + 12 * KiB);
      expect((await m.pread(8 * MiB, 0)).equals(want)).toBe(true);
      expect((await r.pread(8 * MiB, 0)).equals(want)).toBe(true);
    } finally {
      await m.close();
      await r.close();
    }
  });

  it('counts NBD connections as they come and go', async () => {
    const extra = await connect(`nbd://${systems[0]!.nbdAddr}/vol5`);
    expect(value(await metrics(), 'blockmirror_nbd_connections{ss="1"}')).toBe(2);
    const total = value(await metrics(), 'blockmirror_nbd_connections_total{ss="1"}');
    await extra.close();
    await until('the connection to close', async () => (value(await metrics(), 'blockmirror_nbd_connections{ss="1"}') === 1 ? true : undefined));
    expect(value(await metrics(), 'blockmirror_nbd_connections_total{ss="1"}')).toBe(total);
  });

  it('works for a storage system that exposes no latencies or bitmaps', async () => {
    const bare: AdminTarget = {
      report: () => ({ storageSystems: [{ id: 4, nbd: '', admin: '', volumes: [] }], pairs: [] }),
      split: async () => Promise.reject(new Error('no')),
      resync: async () => Promise.reject(new Error('no')),
    };
    const server = await startAdminServer(bare, { host: '127.0.0.1', port: 0, log });
    try {
      const r = await fetch(`http://${server.address}/metrics`);
      expect(r.status).toBe(200);
      expect(await r.text()).toContain('# TYPE blockmirror_volume_read_latency_seconds histogram');
      const b = await fetch(`http://${server.address}/api/pairs/x/bitmap`);
      expect(b.status).toBe(404);
    } finally {
      await server.close();
    }
  });
});

describe('GET /api/pairs/NAME/bitmap', () => {
  it('counts each mirror\'s Invalid clusters per bucket', async () => {
    const r = await get('/api/pairs/pair1/bitmap?buckets=64');
    expect(r.status).toBe(200);
    const b = JSON.parse(r.text) as PairBitmap;
    expect(b).toMatchObject({ name: 'pair1', clusters: 1024, buckets: 64 });
    const m = b.mirrors[0]!;
    expect(m).toMatchObject({ ss: 1, vol: 7 });
    expect(m.invalid).toHaveLength(64);
    expect(m.invalid.reduce((x, y) => x + y, 0)).toBe(m.invalidClusters);
    expect(m.invalid.every((n) => n <= 16)).toBe(true); // 1024 / 64 clusters per bucket
  });

  it('gives one bucket per cluster when asked for more buckets than clusters, and 1024 by default', async () => {
    const more = JSON.parse((await get('/api/pairs/pair2/bitmap?buckets=5000')).text) as PairBitmap;
    expect(more.buckets).toBe(256);
    expect(more.mirrors[0]!.invalid).toHaveLength(256);
    const byDefault = JSON.parse((await get('/api/pairs/pair1/bitmap')).text) as PairBitmap;
    expect(byDefault.buckets).toBe(1024);
  });

  it('answers a bad bucket count with 400 and a one-line JSON error', async () => {
    for (const q of ['abc', '0', '-1', '1.5', '65537', '99999999999999999999', '', '1&buckets=2']) {
      const r = await get(`/api/pairs/pair1/bitmap?buckets=${q}`);
      expect(r.status, q).toBe(400);
      expect(r.headers.get('content-type'), q).toMatch(/^application\/json/);
      const body = JSON.parse(r.text) as { error: string };
      expect(body.error, q).toMatch(/^buckets must be an integer from 1 to 65536, got /);
      expect(body.error).not.toContain('\n');
    }
  });

  it('answers an unknown pair with 404, and a wrong method with 405', async () => {
    const missing = await get('/api/pairs/nope/bitmap?buckets=8');
    expect(missing.status).toBe(404);
    expect(JSON.parse(missing.text)).toEqual({ error: 'no pair named nope in storage system 1' });
    const post = await get('/api/pairs/pair1/bitmap', { method: 'POST' });
    expect(post.status).toBe(405);
    expect(post.headers.get('allow')).toBe('GET, HEAD');
  });
});

describe('ClusterBitmap.invalidPerBucket', () => {
  it('agrees with counting bit by bit, for any size, bucket count and bit pattern', () => {
    let seed = 42;
    const random = () => ((seed = (Math.imul(seed, 1103515245) + 12345) >>> 0) / 2 ** 32);
    for (let round = 0; round < 200; round++) {
      const clusters = 1 + Math.floor(random() * 3000);
      const bm = new ClusterBitmap(clusters);
      const density = random();
      for (let c = 0; c < clusters; c++) if (random() < density) bm.setInvalid(c);
      const buckets = 1 + Math.floor(random() ** 3 * clusters * 1.2); // mostly few, long buckets: whole words get counted
      const n = Math.min(buckets, clusters);
      const expected = new Uint32Array(n);
      for (let i = 0; i < n; i++) {
        for (let c = Math.floor((i * clusters) / n); c < Math.floor(((i + 1) * clusters) / n); c++) if (bm.isInvalid(c)) expected[i]!++;
      }
      expect(bm.invalidPerBucket(buckets), `clusters ${clusters}, buckets ${buckets}`).toEqual(expected);
    }
  });
});

describe('GET /api/cluster', () => {
  it('merges the peers\' reports and marks a storage system that does not answer as unreachable', async () => {
    const r = await get('/api/cluster');
    expect(r.status).toBe(200);
    const view = JSON.parse(r.text) as ClusterView;
    expect(view.self).toBe(1);
    expect(view.storageSystems.map((s) => [s.id, s.reachable])).toEqual([
      [1, true],
      [2, true],
      [3, false],
    ]);
    const down = view.storageSystems[2]!;
    expect(down.reachable === false && down.error).toMatch(/^storage system 3 \(127\.0\.0\.1:\d+\) is not reachable: connect ECONNREFUSED$/);
    expect(view.pairs.map((p) => [p.name, p.ss])).toEqual([
      ['pair1', 1],
      ['pair2', 1],
      ['pair3', 2],
      ['pair4', 2],
    ]);
    // Any storage system's view is the same cluster.
    const fromTwo = (await (await fetch(`http://${admins[1]!.address}/api/cluster`)).json()) as ClusterView;
    expect(fromTwo.self).toBe(2);
    expect(fromTwo.pairs.map((p) => p.name)).toEqual(['pair1', 'pair2', 'pair3', 'pair4']);
  });
});

describe('GET /api/events', () => {
  /** Reads the stream until the first data event; resolves with it and the still-open response. */
  function firstFrame(url: string): Promise<{ frame: DashboardFrame; res: http.IncomingMessage }> {
    return new Promise((resolve, reject) => {
      http.get(url, (res) => {
        let text = '';
        res.setEncoding('utf8');
        res.on('data', (d: string) => {
          text += d;
          const m = /^data: (.*)\n\n/m.exec(text);
          if (m) resolve({ frame: JSON.parse(m[1]!) as DashboardFrame, res });
        });
        res.on('error', reject);
      }).on('error', reject);
    });
  }

  it('streams the cluster with each pair\'s heatmap, including the pairs of peers', async () => {
    const { frame, res } = await firstFrame(`${base}/api/events`);
    expect(res.headers['content-type']).toBe('text/event-stream; charset=utf-8');
    expect(frame.pairs.map((p) => p.name)).toEqual(['pair1', 'pair2', 'pair3', 'pair4']);
    expect(Object.keys(frame.bitmaps).sort()).toEqual(['pair1', 'pair2', 'pair3', 'pair4']);
    expect(frame.bitmaps.pair1!.mirrors[0]!.invalid).toHaveLength(1024);
    expect(frame.bitmaps.pair3!.mirrors[0]).toMatchObject({ ss: 2, vol: 2 });
    expect(frame.storageSystems.find((s) => s.id === 3)?.reachable).toBe(false);
    res.destroy();
  });

  it('ends open event streams when the server closes, so close() does not hang', async () => {
    const port = await freePort();
    const server = await startAdminServer(systems[1]!, { host: '127.0.0.1', port, log });
    const { res } = await firstFrame(`http://${server.address}/api/events`);
    const ended = new Promise((r) => res.on('close', r));
    // A close() that waited for the stream would never resolve: the test would time out.
    await server.close();
    await ended;
    expect(res.destroyed || res.complete).toBe(true);
  });
});

describe('cross-origin requests', () => {
  it('refuses a command sent by a page of another site, and leaves the pair alone', async () => {
    const r = await get('/api/pairs/pair2/split', { method: 'POST', headers: { origin: 'http://evil.example' } });
    expect(r.status).toBe(403);
    expect(JSON.parse(r.text)).toEqual({ error: 'cross-origin request from http://evil.example refused' });
    const pair = JSON.parse((await get('/api/pairs/pair2')).text) as { state: string };
    expect(pair.state).toBe('PAIR');
  });
});

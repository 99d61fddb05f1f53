// The admin HTTP API against an in-memory AdminTarget, over real loopback
// sockets, and the client functions the CLI uses.
import http from 'node:http';
import net from 'node:net';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { pino } from 'pino';
import { startAdminServer, type AdminServer } from '../src/admin/server.js';
import { AdminReplyError, AdminUnreachableError, getStatus, pairCommand } from '../src/admin/client.js';
import { collectStatus, humanBytes, mergeReports, percent, renderStatus } from '../src/cli/status.js';
import type { ClusterConfig } from '../src/cluster/config.js';
import { PairCommandError, type AdminTarget, type PairState, type PairStatus, type SSReport } from '../src/controller/status.js';

/** One storage system with one sync pair: PAIR --split--> PSUS --resync--> COPY (then PAIR on the next report). */
class FakeTarget implements AdminTarget {
  state: PairState = 'PAIR';
  failReport = false;
  splits = 0;

  pair(): PairStatus {
    const invalid = this.state === 'PAIR' ? 0 : 12;
    return {
      name: 'pair1',
      mode: 'sync',
      state: this.state,
      master: { ss: 1, vol: 0 },
      clusterSize: 65536,
      clusters: 1024,
      mirrors: [{ ss: 2, vol: 0, invalidClusters: invalid, syncProgress: (1024 - invalid) / 1024, copiedBytes: 0 }],
    };
  }

  report(): SSReport {
    if (this.failReport) throw new Error('bitmap store is gone');
    const snapshot: SSReport = {
      storageSystems: [
        {
          id: 1,
          nbd: '127.0.0.1:10809',
          admin: '127.0.0.1:9001',
          volumes: [{ id: 0, export: 'vol0', size: 64 * 2 ** 20, role: 'master', pair: 'pair1', readBytes: 4096, writeBytes: 8192, readOps: 1, writeOps: 2 }],
        },
      ],
      pairs: [this.pair()],
    };
    // COPY finishes as soon as someone looks: enough for the state machine here.
    if (this.state === 'COPY') this.state = 'PAIR';
    return snapshot;
  }

  async split(name: string): Promise<PairStatus> {
    this.check(name);
    if (this.state !== 'PAIR') throw new PairCommandError('refused', `cannot split ${name}: it is ${this.state}, not PAIR`);
    this.splits++;
    this.state = 'PSUS';
    await new Promise((r) => setTimeout(r, 5)); // a split drains in-flight writes before it answers
    return this.pair();
  }

  async resync(name: string): Promise<PairStatus> {
    this.check(name);
    if (this.state !== 'PSUS' && this.state !== 'PSUE') throw new PairCommandError('refused', `cannot resync ${name}: it is ${this.state}`);
    this.state = 'COPY';
    return this.pair();
  }

  private check(name: string): void {
    if (name !== 'pair1') throw new PairCommandError('no-such-pair', `no pair named "${name}"`);
  }
}

const log = pino({ level: 'silent' });
let target: FakeTarget;
let server: AdminServer;
let base: string;

beforeAll(async () => {
  target = new FakeTarget();
  server = await startAdminServer(target, { host: '127.0.0.1', port: 0, log });
  base = `http://${server.address}`;
});

afterAll(async () => {
  await server.close();
});

beforeEach(() => {
  target.state = 'PAIR';
  target.failReport = false;
});

async function call(method: string, path: string, init: RequestInit = {}): Promise<{ status: number; body: any; headers: Headers }> {
  const res = await fetch(`${base}${path}`, { method, ...init });
  const text = await res.text();
  return { status: res.status, body: text === '' ? undefined : JSON.parse(text), headers: res.headers };
}

/** A request fetch would refuse to send (bad framing, raw bytes): write it on a socket and read the reply. */
function rawRequest(text: string): Promise<string> {
  const [host, port] = server.address.split(':');
  return new Promise((resolve, reject) => {
    const sock = net.connect(Number(port), host, () => sock.end(text));
    let out = '';
    sock.setEncoding('utf8');
    sock.on('data', (d) => (out += d));
    sock.on('end', () => resolve(out));
    sock.on('error', reject);
  });
}

/** A port nobody listens on: bind one, note it, close it. */
async function deadPort(): Promise<number> {
  const s = net.createServer();
  await new Promise<void>((r) => s.listen(0, '127.0.0.1', r));
  const port = (s.address() as net.AddressInfo).port;
  await new Promise((r) => s.close(r));
  return port;
}

describe('admin server', () => {
  it('binds to the address it is given and reports the real port', () => {
    expect(server.address).toMatch(/^127\.0\.0\.1:\d+$/);
    expect(server.address.endsWith(':0')).toBe(false);
  });

  it('answers /healthz with ok', async () => {
    const r = await call('GET', '/healthz');
    expect(r.status).toBe(200);
    expect(r.headers.get('content-type')).toMatch(/^application\/json/);
    expect(r.body).toEqual({ ok: true });
  });

  it('returns the target report as JSON on GET /api/status', async () => {
    const r = await call('GET', '/api/status');
    expect(r.status).toBe(200);
    expect(r.body.storageSystems[0].volumes[0]).toMatchObject({ export: 'vol0', role: 'master', pair: 'pair1', writeOps: 2 });
    expect(r.body.pairs).toEqual([target.pair()]);
  });

  it('returns one pair on GET /api/pairs/NAME and 404 with an error for an unknown one', async () => {
    const ok = await call('GET', '/api/pairs/pair1');
    expect(ok.status).toBe(200);
    expect(ok.body).toMatchObject({ name: 'pair1', state: 'PAIR', mode: 'sync' });

    const missing = await call('GET', '/api/pairs/nope');
    expect(missing.status).toBe(404);
    expect(missing.body).toEqual({ error: 'no pair named "nope"' });
  });

  it('splits a pair and returns its new status wrapped in { pair }', async () => {
    const r = await call('POST', '/api/pairs/pair1/split');
    expect(r.status).toBe(200);
    expect(r.body.pair).toMatchObject({ name: 'pair1', state: 'PSUS' });
    expect(r.body.pair.mirrors[0].invalidClusters).toBe(12);
    expect((await call('GET', '/api/pairs/pair1')).body.state).toBe('PSUS');
  });

  it('resyncs a split pair into COPY', async () => {
    target.state = 'PSUS';
    const r = await call('POST', '/api/pairs/pair1/resync');
    expect(r.status).toBe(200);
    expect(r.body.pair.state).toBe('COPY');
  });

  it('turns a refused transition into 409 with the target message', async () => {
    target.state = 'PSUS';
    const r = await call('POST', '/api/pairs/pair1/split');
    expect(r.status).toBe(409);
    expect(r.body).toEqual({ error: 'cannot split pair1: it is PSUS, not PAIR' });
    const again = await call('POST', '/api/pairs/pair1/resync', { body: '' });
    expect(again.status).toBe(200);
    const twice = await call('POST', '/api/pairs/pair1/resync');
    expect(twice.status).toBe(409);
  });

  it('turns a command on an unknown pair into 404', async () => {
    for (const cmd of ['split', 'resync']) {
      const r = await call('POST', `/api/pairs/ghost/${cmd}`);
      expect(r.status).toBe(404);
      expect(r.body).toEqual({ error: 'no pair named "ghost"' });
    }
  });

  it('decodes percent-encoded pair names', async () => {
    const r = await call('GET', `/api/pairs/${encodeURIComponent('a b/c')}`);
    expect(r.status).toBe(404);
    expect(r.body.error).toBe('no pair named "a b/c"');
  });

  it('accepts a JSON body of {} or nothing on a pair command', async () => {
    const r = await call('POST', '/api/pairs/pair1/split', { body: '{}', headers: { 'content-type': 'application/json' } });
    expect(r.status).toBe(200);
    target.state = 'PAIR';
    const empty = await call('POST', '/api/pairs/pair1/split', { body: '', headers: { 'content-type': 'application/json' } });
    expect(empty.status).toBe(200);
  });

  it('answers a malformed JSON body with 400 and an error, and leaves the pair alone', async () => {
    const r = await call('POST', '/api/pairs/pair1/split', { body: '{"force": tru', headers: { 'content-type': 'application/json' } });
    expect(r.status).toBe(400);
    expect(r.body.error).toMatch(/^malformed JSON body: /);
    expect(target.state).toBe('PAIR');
  });

  it('answers an unsupported content type with 415 and an error', async () => {
    const r = await call('POST', '/api/pairs/pair1/split', { body: '<split/>', headers: { 'content-type': 'application/xml' } });
    expect(r.status).toBe(415);
    expect(typeof r.body.error).toBe('string');
    expect(target.state).toBe('PAIR');
  });

  it('answers an oversized body with 413 and an error', async () => {
    const r = await call('POST', '/api/pairs/pair1/split', { body: JSON.stringify({ pad: 'x'.repeat(100_000) }), headers: { 'content-type': 'application/json' } });
    expect(r.status).toBe(413);
    expect(typeof r.body.error).toBe('string');
  });

  it('answers an unknown route with 404 and an error naming it', async () => {
    for (const path of ['/api', '/api/pairs', '/api/pairs/pair1/delete', '/api/statuses?x=1']) {
      const r = await call('GET', path);
      expect(r.status, path).toBe(404);
      expect(r.body.error, path).toMatch(/^no route GET \//);
      expect(r.body.error, path).not.toContain('?');
    }
  });

  it('answers a wrong method on a known route with 405, Allow and an error', async () => {
    const get = await call('GET', '/api/pairs/pair1/split');
    expect(get.status).toBe(405);
    expect(get.headers.get('allow')).toBe('POST');
    expect(get.body.error).toContain('use POST');
    expect(target.state).toBe('PAIR');

    const post = await call('POST', '/api/status');
    expect(post.status).toBe(405);
    expect(post.headers.get('allow')).toBe('GET, HEAD');

    const del = await call('DELETE', '/api/pairs/pair1');
    expect(del.status).toBe(405);
    expect(del.body.error).toMatch(/DELETE/);
  });

  it('answers HEAD on a GET route without a body', async () => {
    const res = await fetch(`${base}/healthz`, { method: 'HEAD' });
    expect(res.status).toBe(200);
    expect(await res.text()).toBe('');
  });

  it('tolerates a trailing slash', async () => {
    expect((await call('GET', '/api/status/')).status).toBe(200);
  });

  it('answers a malformed URL with 400 and an error', async () => {
    const reply = await rawRequest('GET /api/pairs/%E0%A4%A HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n');
    expect(reply).toMatch(/^HTTP\/1\.1 400 /);
    expect(JSON.parse(reply.slice(reply.indexOf('\r\n\r\n') + 4))).toHaveProperty('error');
  });

  it('survives a request that is not HTTP at all and keeps serving', async () => {
    const reply = await rawRequest('\x16\x03\x01 this is not http\r\n\r\n');
    expect(reply).toMatch(/^HTTP\/1\.1 400 /);
    expect((await call('GET', '/healthz')).status).toBe(200);
  });

  it('turns an unexpected target error into 500 with its message and keeps serving', async () => {
    target.failReport = true;
    const r = await call('GET', '/api/status');
    expect(r.status).toBe(500);
    expect(r.body).toEqual({ error: 'bitmap store is gone' });
    target.failReport = false;
    expect((await call('GET', '/api/status')).status).toBe(200);
  });

  it('serves many concurrent requests, and of concurrent splits exactly one wins', async () => {
    const before = target.splits;
    const statuses = Array.from({ length: 50 }, () => call('GET', '/api/status'));
    const splits = Array.from({ length: 10 }, () => call('POST', '/api/pairs/pair1/split'));
    const [s, p] = await Promise.all([Promise.all(statuses), Promise.all(splits)]);
    expect(s.every((r) => r.status === 200)).toBe(true);
    expect(p.filter((r) => r.status === 200).map((r) => r.body.pair.state)).toEqual(['PSUS']);
    for (const r of p.filter((r) => r.status !== 200)) {
      expect(r.status).toBe(409);
      expect(r.body.error).toBe('cannot split pair1: it is PSUS, not PAIR');
    }
    expect(target.splits - before).toBe(1);
  });

  it('refuses to start on an address already in use, with a message naming it', async () => {
    const port = Number(server.address.split(':')[1]);
    await expect(startAdminServer(target, { host: '127.0.0.1', port, log })).rejects.toThrow(
      new RegExp(`admin API: cannot listen on 127\\.0\\.0\\.1:${port}: .*EADDRINUSE`),
    );
  });

  it('closes promptly while a keep-alive connection is idle', async () => {
    const other = await startAdminServer(target, { host: '127.0.0.1', port: 0, log });
    const agent = new http.Agent({ keepAlive: true });
    await new Promise<void>((resolve, reject) => {
      http.get(`http://${other.address}/healthz`, { agent }, (res) => {
        res.resume();
        res.on('end', resolve);
      }).on('error', reject);
    });
    const t0 = Date.now();
    await other.close();
    expect(Date.now() - t0).toBeLessThan(2000);
    agent.destroy();
  });
});

describe('admin client', () => {
  it('fetches a status report', async () => {
    const report = await getStatus(server.address, 3000);
    expect(report.pairs[0]!.name).toBe('pair1');
    expect(report.storageSystems[0]!.id).toBe(1);
  });

  it('sends split and resync and returns the pair status', async () => {
    const [host, port] = server.address.split(':');
    const ep = { ss: 1, host: host!, port: Number(port) };
    expect((await pairCommand(ep, 'pair1', 'split', 3000)).state).toBe('PSUS');
    expect((await pairCommand(ep, 'pair1', 'resync', 3000)).state).toBe('COPY');
  });

  it('reports a refused transition as AdminReplyError with status 409 and the server message', async () => {
    const [host, port] = server.address.split(':');
    const err = await pairCommand({ ss: 1, host: host!, port: Number(port) }, 'pair1', 'resync', 3000).catch((e) => e);
    expect(err).toBeInstanceOf(AdminReplyError);
    expect(err.status).toBe(409);
    expect(err.serverMessage).toBe('cannot resync pair1: it is PAIR');
    expect(err.message).toBe(`resync pair1: storage system 1 (${server.address}) replied 409: cannot resync pair1: it is PAIR`);
  });

  it('reports an unknown pair as AdminReplyError with status 404', async () => {
    const err = await pairCommand(server.address, 'who/me', 'split', 3000).catch((e) => e);
    expect(err).toBeInstanceOf(AdminReplyError);
    expect(err.status).toBe(404);
    expect(err.message).toBe(`split who/me: admin API at ${server.address} replied 404: no pair named "who/me"`);
  });

  it('reports a 500 with the server message', async () => {
    target.failReport = true;
    const err = await getStatus(server.address, 3000).catch((e) => e);
    expect(err).toBeInstanceOf(AdminReplyError);
    expect(err.status).toBe(500);
    expect(err.message).toContain('replied 500: bitmap store is gone');
  });

  it('says which storage system is not reachable and why', async () => {
    const port = await deadPort();
    const err = await getStatus({ ss: 1, host: '127.0.0.1', port }, 3000).catch((e) => e);
    expect(err).toBeInstanceOf(AdminUnreachableError);
    expect(err.code).toBe('ECONNREFUSED');
    expect(err.message).toBe(`storage system 1 (127.0.0.1:${port}) is not reachable: connect ECONNREFUSED`);

    const cmd = await pairCommand({ ss: 2, host: '127.0.0.1', port }, 'pair1', 'split', 3000).catch((e) => e);
    expect(cmd).toBeInstanceOf(AdminUnreachableError);
    expect(cmd.message).toBe(`split pair1: storage system 2 (127.0.0.1:${port}) is not reachable: connect ECONNREFUSED`);
  });

  it('gives up on a server that accepts but never answers after the timeout', async () => {
    const sockets: net.Socket[] = [];
    const silent = net.createServer((s) => sockets.push(s));
    await new Promise<void>((r) => silent.listen(0, '127.0.0.1', r));
    const port = (silent.address() as net.AddressInfo).port;
    try {
      const t0 = Date.now();
      const err = await getStatus({ ss: 3, host: '127.0.0.1', port }, 200).catch((e) => e);
      expect(Date.now() - t0).toBeLessThan(2000);
      expect(err).toBeInstanceOf(AdminUnreachableError);
      expect(err.code).toBe('ETIMEDOUT');
      expect(err.message).toBe(`storage system 3 (127.0.0.1:${port}) is not reachable: no answer within 200 ms`);
    } finally {
      for (const s of sockets) s.destroy();
      await new Promise((r) => silent.close(r));
    }
  });

  it('reports a server that is not the admin API as a reply error', async () => {
    const other = http.createServer((_req, res) => res.end('<html>hello</html>'));
    await new Promise<void>((r) => other.listen(0, '127.0.0.1', r));
    const port = (other.address() as net.AddressInfo).port;
    try {
      const err = await getStatus({ ss: 4, host: '127.0.0.1', port }, 3000).catch((e) => e);
      expect(err).toBeInstanceOf(AdminReplyError);
      expect(err.message).toBe(`storage system 4 (127.0.0.1:${port}) sent a reply that is not JSON`);
    } finally {
      await new Promise((r) => other.close(r));
    }
  });
});

describe('cluster status merge', () => {
  function config(ports: number[]): ClusterConfig {
    return {
      source: 'test.yaml',
      clusterSize: 65536,
      peerTimeout: 5000,
      faults: [],
      security: { insecure: false, adminHosts: [], adminReadOpen: false, adminTls: false },
      storageSystems: ports.map((port, i) => ({
        id: i + 1,
        nbd: { host: '127.0.0.1', port: 10809 + i },
        admin: { host: '127.0.0.1', port },
        volumes: [{ id: 0, size: 64 * 2 ** 20 }],
      })),
      pairs: [{ name: 'pair1', mode: 'sync', master: { ss: 1, vol: 0 }, mirrors: [{ ss: 2, vol: 0 }], fence: 'never', autoResync: true, autoFailover: true }],
    };
  }

  function reportOf(ss: number, state: PairState): SSReport {
    const fake = new FakeTarget();
    fake.state = state;
    const r = fake.report();
    r.storageSystems[0]!.id = ss;
    return r;
  }

  it('lists every storage system once, in configuration order, and each pair once from its master', () => {
    const merged = mergeReports(config([1, 2]), [
      { id: 2, report: reportOf(2, 'PSUE') },
      { id: 1, report: reportOf(1, 'PAIR') },
    ]);
    expect(merged.storageSystems.map((s) => [s.id, s.reachable])).toEqual([
      [2, true],
      [1, true],
    ]);
    expect(merged.pairs).toHaveLength(1);
    expect(merged.pairs[0]!.state).toBe('PAIR');
  });

  it('keeps an unreachable storage system as an entry with its error, and takes a pair from a mirror when the master is down', () => {
    const merged = mergeReports(config([1, 2]), [
      { id: 1, error: 'storage system 1 (127.0.0.1:1) is not reachable: connect ECONNREFUSED' },
      { id: 2, report: reportOf(2, 'PSUE') },
    ]);
    expect(merged.storageSystems[0]).toEqual({ id: 1, reachable: false, error: 'storage system 1 (127.0.0.1:1) is not reachable: connect ECONNREFUSED' });
    expect(merged.pairs.map((p) => p.state)).toEqual(['PSUE']);
  });

  it('asks every storage system in parallel and marks the dead one unreachable', async () => {
    const port = Number(server.address.split(':')[1]);
    const dead = await deadPort();
    const status = await collectStatus(config([port, dead, 0]), 3000);
    expect(status.storageSystems.map((s) => s.reachable)).toEqual([true, false, false]);
    const [, down, zero] = status.storageSystems;
    expect(down).toMatchObject({ id: 2, error: `storage system 2 (127.0.0.1:${dead}) is not reachable: connect ECONNREFUSED` });
    expect(zero).toMatchObject({ id: 3, error: expect.stringContaining('admin port is 0') });
    expect(status.pairs.map((p) => p.name)).toEqual(['pair1']);
  });

  it('renders volumes and pairs as a table with human sizes and sync progress', () => {
    const r = reportOf(1, 'PSUS');
    const text = renderStatus({
      storageSystems: [{ ...r.storageSystems[0]!, reachable: true }, { id: 2, reachable: false, error: 'storage system 2 (127.0.0.1:9) is not reachable: connect ECONNREFUSED' }],
      pairs: r.pairs.map((p) => ({ ...p, ss: 1 })),
    });
    expect(text).toMatch(/^  1\s+127\.0\.0\.1:10809\s+127\.0\.0\.1:9001\s+none$/m);
    expect(text).toMatch(/^  2\s+UNREACHABLE$/m);
    expect(text).toContain('  storage system 2 (127.0.0.1:9) is not reachable: connect ECONNREFUSED');
    expect(text).toMatch(/^\s+1\s+0\s+vol0\s+64MiB\s+master\s+pair1\s+4KiB\s+8KiB\s+1\s+2$/m);
    expect(text).toMatch(/^  pair1\s+sync\s+PSUS\s+1:0\s+2:0\s+12\s+98\.8%\s+0B\s+-$/m);
  });

  it('renders the etcd tables: leases, logical volumes with their mirrors, and the failover history', () => {
    const text = renderStatus({
      storageSystems: [],
      pairs: [],
      etcd: {
        storageSystems: [{ id: 1, health: 'no lease' }, { id: 2, health: 'up', nbd: '127.0.0.1:10810', admin: '127.0.0.1:9002', startedAt: '2026-01-02T03:04:05.000Z' }],
        logicalVolumes: [{ name: 'pair1', master: { ss: 2, vol: 1 }, epoch: 3, mode: 'sync', size: 1 << 20, state: 'PSUE' }],
        mirrors: [{ name: 'pair1', mirrors: [{ ss: 1, vol: 1, mode: 'sync', state: 'PSUE' }] }],
        history: [{ name: 'pair1', at: '2026-01-02T03:05:00.000Z', epoch: 3, from: { ss: 1, vol: 1 }, to: { ss: 2, vol: 1 }, reason: 'storage system 1 lost its etcd lease' }],
      },
    });
    expect(text).toMatch(/^ +1 +no lease +- +-$/m);
    expect(text).toMatch(/^ +2 +up +127\.0\.0\.1:10810 +2026-01-02T03:04:05\.000Z$/m);
    expect(text).toMatch(/^  pair1 +ss2\/vol1 +3 +sync +PSUE +ss1\/vol1 PSUE$/m);
    expect(text).toMatch(/^  2026-01-02T03:05:00\.000Z +pair1 +3 +ss1\/vol1 +ss2\/vol1 +storage system 1 lost its etcd lease$/m);
    expect(renderStatus({ storageSystems: [], pairs: [], etcd: { error: 'etcd at 127.0.0.1:1 is not reachable' } })).toContain('CLUSTER TABLES (etcd)\n  etcd at 127.0.0.1:1 is not reachable');
  });

  it('never rounds an incomplete sync up to 100%', () => {
    expect(percent(0.99999)).toBe('99.9%');
    expect(percent(1)).toBe('100.0%');
    expect(percent(0)).toBe('0.0%');
  });

  it('prints sizes in binary units with one decimal when not exact', () => {
    expect(humanBytes(0)).toBe('0B');
    expect(humanBytes(1023)).toBe('1023B');
    expect(humanBytes(1536)).toBe('1.5KiB');
    expect(humanBytes(2 ** 30)).toBe('1GiB');
    expect(humanBytes(1_000_000_000)).toBe('953.7MiB');
    expect(humanBytes(2 ** 20 - 1)).toBe('1.0MiB');
  });
});

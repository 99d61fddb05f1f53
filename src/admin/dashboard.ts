// The dashboard of one storage system: a page at /, and the JSON behind it.
// The page shows the whole cluster of the YAML, not only this storage system:
// this one's report is merged with what its peers' admin APIs answer.
//
//   GET /                                   the page (files in src/admin/page/)
//   GET /assets/app.js, /assets/style.css
//   GET /api/cluster                        ClusterView
//   GET /api/pairs/:name/bitmap?buckets=N   PairBitmap        400 bad N, 404 unknown pair
//   GET /api/events                         server-sent events: a DashboardFrame every FEED_INTERVAL_MS
//
// The page's commands (split, resync, verify) are the admin API's own
// POST /api/pairs/NAME/<command>, which is also what the CLI sends. The page
// sends them to this storage system only, for the pairs it runs, and links
// to the dashboard of the storage system that runs any other pair.
import type { SvolGroupStatus } from '../controller/svol/status.js';
import fs from 'node:fs';
import { PassThrough } from 'node:stream';
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import type { Logger } from 'pino';
import { getJson, getStatus, type AdminEndpoint } from './client.js';
import { PairCommandError, mergeReports, type AdminTarget, type PairBitmap, type PairRow, type SSReport, type SSView } from '../controller/status.js';
import type { RouteAdder } from './server.js';
import type { EtcdView } from '../cluster/etcd/view.js';

/** Another storage system of the cluster, as the YAML gives its admin API. */
export interface AdminPeer {
  id: number;
  host: string;
  /** 0 when the YAML leaves the port to the kernel: then its address is not known. */
  port: number;
  /** Its admin token, when this host knows it (docs/SECURITY.md). */
  token?: string;
  /** HTTPS: the CA its certificate is checked against (security.adminTls). */
  ca?: Buffer;
}

function endpointOf(p: AdminPeer): AdminEndpoint {
  return { ss: p.id, host: p.host, port: p.port, ...(p.token ? { token: p.token } : {}), ...(p.ca ? { ca: p.ca } : {}) };
}


/** GET /api/cluster. */
export interface ClusterView {
  /** The storage system serving this view. */
  self: number;
  /** This one and every peer, in YAML order; an unreachable one says why. */
  storageSystems: SSView[];
  /** Each pair once, from the storage system running it (its master's) when that one answers. */
  pairs: PairRow[];
  /** The S-VOL groups of the storage systems that answered (docs/svol.md). */
  svolGroups: (SvolGroupStatus & { ss: number })[];
  /** With etcd: the cluster tables as this storage system's process reads them (docs/cluster.md). */
  etcd?: EtcdView;
}

/** One event of GET /api/events. */
export interface DashboardFrame extends ClusterView {
  /** Milliseconds since the epoch, when the frame was put together (for rates and ETAs). */
  time: number;
  /** Heatmap of each pair in `pairs`, by name, DASHBOARD_BUCKETS buckets per mirror; absent if its storage system did not answer. */
  bitmaps: Record<string, PairBitmap>;
}

export interface DashboardOptions {
  peers: AdminPeer[];
  route: RouteAdder;
  log: Logger;
  etcd?: () => EtcdView;
}

/** How often the live feed sends a frame. */
export const FEED_INTERVAL_MS = 400;
/** How long a peer may take to answer before it is shown as unreachable. */
export const PEER_TIMEOUT_MS = 1500;
/** Heatmap cells per mirror on the page. */
export const DASHBOARD_BUCKETS = 1024;
/** Largest ?buckets= the bitmap route accepts: more than any screen shows. */
export const MAX_BUCKETS = 65536;

// The page is plain files, read once at start. tsc does not copy them to
// dist/, and src/admin/ and dist/admin/ are both two levels below the
// package root, so one relative path finds them from the sources and from
// the build alike.
const PAGE_DIR = new URL('../../src/admin/page/', import.meta.url);
const PAGE_FILES: readonly { url: string; file: string; type: string }[] = [
  { url: '/', file: 'index.html', type: 'text/html; charset=utf-8' },
  { url: '/assets/app.js', file: 'app.js', type: 'text/javascript; charset=utf-8' },
  { url: '/assets/style.css', file: 'style.css', type: 'text/css; charset=utf-8' },
];
/** The page loads its own script and style and talks to its own origin; nothing else, nothing from the internet. */
const CSP = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

interface NameParams {
  name: string;
}

export function registerDashboard(app: FastifyInstance, target: AdminTarget, opts: DashboardOptions): void {
  const { route } = opts;
  for (const { url, file, type } of PAGE_FILES) {
    const body = fs.readFileSync(new URL(file, PAGE_DIR));
    route(app, 'GET', url, async (_req, reply) =>
      reply.type(type).header('cache-control', 'no-cache').header('content-security-policy', CSP).header('x-content-type-options', 'nosniff').send(body),
    );
  }

  route(app, 'GET', '/api/cluster', async () => withEtcd((await gather(target, opts.peers)).view, opts.etcd));

  route(app, 'GET', '/api/pairs/:name/bitmap', async (req) => {
    const name = (req.params as NameParams).name;
    const buckets = parseBuckets((req.query as Record<string, unknown>).buckets);
    if (!target.bitmap) throw new PairCommandError('no-such-pair', `storage system has no bitmap for pair ${name}`);
    return target.bitmap(name, buckets);
  });

  const feed = new Feed(async () => withEtcd(await frame(target, opts.peers), opts.etcd), opts.log);
  route(app, 'GET', '/api/events', async (req, reply) => events(req, reply, feed));
  // Event streams never end by themselves: end them, or close() waits forever.
  app.addHook('preClose', (done) => {
    feed.close();
    done();
  });
}

/** The etcd tables join the view as they are in this process: etcd, not the peers, is their source. */
function withEtcd<T extends ClusterView>(view: T, etcd: (() => EtcdView) | undefined): T {
  return etcd ? { ...view, etcd: etcd() } : view;
}

function parseBuckets(raw: unknown): number {
  if (raw === undefined) return DASHBOARD_BUCKETS;
  const n = typeof raw === 'string' && /^\d{1,6}$/.test(raw) ? Number(raw) : NaN;
  if (!(n >= 1 && n <= MAX_BUCKETS)) {
    throw Object.assign(new Error(`buckets must be an integer from 1 to ${MAX_BUCKETS}, got ${JSON.stringify(raw)}`), { statusCode: 400 });
  }
  return n;
}

// ---------------------------------------------------------------------------
// The cluster view: this storage system's report plus each peer's.

interface Answer {
  id: number;
  admin: string;
  report?: SSReport;
  error?: string;
}

async function frame(target: AdminTarget, peers: AdminPeer[]): Promise<DashboardFrame> {
  const { view, ownIds } = await gather(target, peers);
  const bitmaps: Record<string, PairBitmap> = {};
  await Promise.all(
    view.pairs.map(async (p) => {
      try {
        const b = ownIds.has(p.ss) ? target.bitmap?.(p.name, DASHBOARD_BUCKETS) : await peerBitmap(peers.find((x) => x.id === p.ss), p.name);
        if (b) bitmaps[p.name] = b;
      } catch {
        // The heatmap stays blank for this frame; the pair's state says why (gone, or its storage system down).
      }
    }),
  );
  return { time: Date.now(), ...view, bitmaps };
}

/** Asks every peer in parallel, and merges their reports with this storage system's own. */
async function gather(target: AdminTarget, peers: AdminPeer[]): Promise<{ view: ClusterView; ownIds: Set<number> }> {
  const own = target.report();
  const self = own.storageSystems[0]?.id ?? 0;
  const ownIds = new Set(own.storageSystems.map((s) => s.id));
  const ownAnswer: Answer = { id: self, admin: own.storageSystems[0]?.admin ?? '', report: own };
  // This storage system first if the YAML does not list it (a bare admin server in tests has no peers).
  const order = peers.some((p) => ownIds.has(p.id)) ? peers : [{ id: self, host: '', port: 0 }, ...peers];
  const answers = await Promise.all(order.map((p) => (ownIds.has(p.id) ? ownAnswer : askPeer(p))));
  return { view: merge(self, answers), ownIds };
}

async function peerBitmap(peer: AdminPeer | undefined, pair: string): Promise<PairBitmap | undefined> {
  if (!peer) return undefined;
  const path = `/api/pairs/${encodeURIComponent(pair)}/bitmap?buckets=${DASHBOARD_BUCKETS}`;
  return (await getJson(endpointOf(peer), path, PEER_TIMEOUT_MS)) as PairBitmap | undefined;
}

async function askPeer(p: AdminPeer): Promise<Answer> {
  const admin = hostPort(p);
  if (p.port === 0) return { id: p.id, admin, error: `storage system ${p.id}: its admin port is 0 in the configuration, so its address is not known` };
  try {
    return { id: p.id, admin, report: await getStatus(endpointOf(p), PEER_TIMEOUT_MS) };
  } catch (e) {
    return { id: p.id, admin, error: (e as Error).message };
  }
}

/** Storage systems in the order asked; a pair from the storage system of its master if that one answered, else from any. */
function merge(self: number, answers: Answer[]): ClusterView {
  const svolGroups = answers.flatMap((a) => (a.report?.svolGroups ?? []).map((g) => ({ ...g, ss: a.id })));
  return { self, ...mergeReports(answers), svolGroups };
}

function hostPort(p: { host: string; port: number }): string {
  return p.host.includes(':') ? `[${p.host}]:${p.port}` : `${p.host}:${p.port}`;
}

// ---------------------------------------------------------------------------
// The live feed: one timer for all the event streams of this server, running
// only while someone watches.

function events(req: FastifyRequest, reply: FastifyReply, feed: Feed): FastifyReply {
  reply
    .type('text/event-stream; charset=utf-8')
    .header('cache-control', 'no-store')
    // The stream is the whole connection: once it ends, so does the socket, even during close().
    .header('connection', 'close');
  // HEAD gets the headers; a stream nobody reads would stay subscribed.
  if (req.method === 'HEAD') return reply.send();
  const stream = new PassThrough();
  stream.write(`retry: 1000\n\n`); // how soon EventSource reconnects after the server went away
  feed.add(stream);
  return reply.send(stream);
}

class Feed {
  private readonly clients = new Set<PassThrough>();
  private timer: NodeJS.Timeout | undefined;
  private busy = false;
  private closed = false;

  constructor(
    private readonly next: () => Promise<DashboardFrame>,
    private readonly log: Logger,
  ) {}

  add(stream: PassThrough): void {
    if (this.closed) {
      stream.end();
      return;
    }
    this.clients.add(stream);
    // fastify destroys the stream when the client goes away.
    stream.on('close', () => this.clients.delete(stream));
    if (!this.busy && this.timer === undefined) void this.tick();
  }

  close(): void {
    this.closed = true;
    clearTimeout(this.timer);
    for (const c of this.clients) c.end();
    this.clients.clear();
  }

  private async tick(): Promise<void> {
    this.timer = undefined;
    if (this.closed || this.clients.size === 0) return;
    this.busy = true;
    const started = performance.now();
    try {
      const text = `data: ${JSON.stringify(await this.next())}\n\n`;
      // A client that has not taken the last frame yet skips this one instead of queueing it.
      for (const c of this.clients) if (!c.writableNeedDrain) c.write(text);
    } catch (e) {
      this.log.warn({ err: (e as Error).message }, 'dashboard feed: cannot build a frame');
    } finally {
      this.busy = false;
    }
    if (this.closed || this.clients.size === 0) return;
    this.timer = setTimeout(() => void this.tick(), Math.max(0, FEED_INTERVAL_MS - (performance.now() - started)));
  }
}

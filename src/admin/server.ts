// The admin HTTP API of one storage system: status and pair commands over JSON.
// Routes (docs/admin-api.md has the request and reply shapes):
//
//   GET  /api/status              SSReport
//   GET  /api/pairs/:name         PairStatus                   404 unknown pair
//   POST /api/pairs/:name/split   { pair: PairStatus }         404 unknown pair, 409 refused
//   POST /api/pairs/:name/resync  { pair: PairStatus }         404 unknown pair, 409 refused
//   POST /api/pairs/:name/verify  { pair: PairStatus }         starts a verify; progress in pair.verify
//   POST /api/pairs/:name/swap    { pair: PairStatus }         planned role swap (on the master's SS)
//   POST /api/pairs/:name/takeover { pair: PairStatus }        promote the mirror (on the mirror's SS)
//   GET  /api/faults              { faults: FaultStatus[] }
//   PUT  /api/faults/:target/:kind { faults }  body: fault options (docs/faults.md)   400 bad options, 404 no such target
//   DELETE /api/faults/:target    { faults }  ?kind= to clear one kind
//   GET  /api/svol/:name          SvolGroupStatus              404 unknown group
//   POST /api/svol/:name/init|split|resync|restore|attr|verify  { group: SvolGroupStatus }
//                                 body { member?, attr? }      404 unknown group or member, 409 refused
//   GET  /api/config              { yaml }                      live reconfiguration (config-routes.ts)
//   POST /api/config              body { yaml, dryRun? }       { changes, notes, applied }  400, 409 refused, 500 undone
//   GET  /healthz                 { ok: true }
//   GET  /metrics                 Prometheus text format       (metrics.ts)
//   GET  /, /api/cluster, /api/events, /api/pairs/:name/bitmap  the dashboard (dashboard.ts)
//
// Access (docs/SECURITY.md), checked before anything else:
//   - the Host header must be this server's: an IP address or localhost with its port, or a name
//     in security.adminHosts; anything else is DNS rebinding and gets 421;
//   - every request but /healthz and the dashboard's static files needs `Authorization: Bearer
//     TOKEN` (GET too, unless adminReadOpen), else 401; the token is compared in constant time.
//
// Every error reply, whoever raised it (router, body parser, target), is
// `{ "error": "<one line>" }` with a 4xx or 5xx status: the client and the CLI
// print that line as is.
import Fastify, { type FastifyError, type FastifyInstance, type FastifyReply, type FastifyRequest } from 'fastify';
import net from 'node:net';
import * as z from 'zod';
import type { Logger } from 'pino';
import { sameSecret } from '../util/secrets.js';
import { FaultRequestSchema } from '../controller/fault-table.js';
import { PairCommandError, type AdminTarget, type PairCommandErrorKind, type PairStatus } from '../controller/status.js';
import { registerConfigRoutes, type ConfigHandler } from './config-routes.js';
import { registerDashboard, type AdminPeer } from './dashboard.js';
import { registerMetrics } from './metrics.js';
import type { EtcdView } from '../cluster/etcd/view.js';

export interface AdminServerOptions {
  host: string;
  port: number;
  log: Logger;
  /** Every storage system of the cluster (this one included), for the dashboard's cluster view. */
  peers?: AdminPeer[];
  auth?: AdminAuth;
  /** Serve HTTPS with this certificate (security.adminTls). */
  https?: { cert: Buffer; key: Buffer };
  /** With etcd: the cluster tables as this process sees them, for the dashboard (docs/cluster.md). */
  etcd?: () => EtcdView;
  /** Live reconfiguration (`up` only): GET/POST /api/config. */
  config?: ConfigHandler;
}

export interface AdminAuth {
  token: string;
  /** GET and HEAD need no token. */
  readOpen: boolean;
  /** Host names (with or without a port) this API may be called by, besides addresses and localhost. */
  hosts: string[];
}

/** Paths anyone may GET: liveness, and the dashboard's page, which holds no data and asks for the token. */
const OPEN_PATHS = new Set(['/healthz', '/', '/assets/app.js', '/assets/style.css']);

export interface AdminServer {
  /** "host:port" actually bound (the port is real when 0 was asked for). */
  address: string;
  close(): Promise<void>;
}

/** Methods fastify can route; a known path asked with any other one gets 405. */
const METHODS = ['GET', 'HEAD', 'POST', 'PUT', 'PATCH', 'DELETE', 'OPTIONS'] as const;
type Method = (typeof METHODS)[number];

/** The one place a controller refusal becomes an HTTP status. */
const HTTP_STATUS: Record<PairCommandErrorKind, number> = { 'no-such-pair': 404, 'not-found': 404, refused: 409, unavailable: 503 };

/** The body of an S-VOL group command: the member by logical ID (or pool volume), the new attribute. */
const SvolBody = z.strictObject({ member: z.union([z.number().int().positive(), z.string().regex(/^(vol)?\d+$/)]).optional(), attr: z.enum(['RO', 'RW', 'spare']).optional() });

interface NameParams {
  name: string;
}

export async function startAdminServer(target: AdminTarget, opts: AdminServerOptions): Promise<AdminServer> {
  const log = opts.log;
  const app = buildApp(target, log, { ...(opts.peers ? { peers: opts.peers } : {}), ...(opts.auth ? { auth: opts.auth } : {}), ...(opts.https ? { https: opts.https } : {}), ...(opts.etcd ? { etcd: opts.etcd } : {}), ...(opts.config ? { config: opts.config } : {}) });
  try {
    await app.listen({ host: opts.host, port: opts.port });
  } catch (e) {
    await app.close().catch(() => {});
    throw new Error(`admin API: cannot listen on ${formatHostPort(opts.host, opts.port)}: ${(e as Error).message}`, { cause: e });
  }
  const bound = app.server.address();
  const address = bound !== null && typeof bound === 'object' ? formatHostPort(bound.address, bound.port) : String(bound);
  log.info({ admin: address }, `admin API listening on ${opts.https ? 'https' : 'http'}://${address}/`);
  return {
    address,
    close: async () => {
      await app.close();
    },
  };
}

/** The fastify instance without a listener; tests may `inject()` into it. */
export function buildApp(target: AdminTarget, log: Logger, opts: Pick<AdminServerOptions, 'peers' | 'auth' | 'https' | 'etcd' | 'config'> = {}): FastifyInstance {
  const app = Fastify({
    ...(opts.https ? { https: { cert: opts.https.cert, key: opts.https.key, minVersion: 'TLSv1.2' as const } } : {}),
    // Our own logger does the request lines, at debug: an admin poll every
    // second must not fill the log at info.
    logger: false,
    // Nothing here takes a body bigger than a few bytes.
    bodyLimit: 64 * 1024,
    // Idle keep-alive connections (fetch keeps them) must not hold close() up.
    forceCloseConnections: 'idle',
    return503OnClosing: true,
    routerOptions: { ignoreTrailingSlash: true, maxParamLength: 512 },
    // Only FST_ERR_BAD_URL (a path that does not percent-decode) comes here today.
    frameworkErrors: (error, _req, reply) => {
      void (reply as unknown as FastifyReply).code(error.statusCode ?? 400).send({ error: errorLine(error) });
    },
  });

  app.addHook('onResponse', (req, reply, done) => {
    log.debug({ method: req.method, url: req.url, status: reply.statusCode, ms: Math.round(reply.elapsedTime * 10) / 10 }, 'admin request');
    done();
  });

  // The routes take no body, but a client may send `{}` or an empty body with
  // a JSON content type; anything else that claims to be JSON must parse.
  app.removeContentTypeParser('application/json');
  app.addContentTypeParser('application/json', { parseAs: 'string' }, (_req, body, done) => {
    const text = (body as string).trim();
    if (text === '') return done(null, undefined);
    try {
      done(null, JSON.parse(text));
    } catch (e) {
      done(httpError(400, `malformed JSON body: ${(e as Error).message}`), undefined);
    }
  });

  app.setErrorHandler((err: FastifyError | Error, req: FastifyRequest, reply: FastifyReply) => {
    if (err instanceof PairCommandError) return reply.code(HTTP_STATUS[err.kind]).send({ error: err.message });
    const status = (err as FastifyError).statusCode;
    if (status !== undefined && status >= 400 && status < 500) return reply.code(status).send({ error: errorLine(err) });
    log.error({ err, method: req.method, url: req.url }, `admin API: ${req.method} ${req.url} failed: ${err.message}`);
    return reply.code(status !== undefined && status >= 500 && status < 600 ? status : 500).send({ error: errorLine(err) });
  });

  const auth = opts.auth;
  if (auth) {
    const named = new Set(auth.hosts.map((h) => h.toLowerCase()));
    app.addHook('onRequest', (req, reply, done) => {
      const host = (req.headers.host ?? '').toLowerCase();
      if (!hostAllowed(host, req.socket.localPort ?? 0, named)) {
        log.warn({ host, from: req.socket.remoteAddress }, `admin API: refused a request for Host ${host || '(none)'} from ${req.socket.remoteAddress}`);
        void reply.code(421).send({ error: `Host ${host || '(none)'} is not a name of this admin API; if it is yours, add it to security.adminHosts` });
        return;
      }
      const read = req.method === 'GET' || req.method === 'HEAD';
      if ((read && (auth.readOpen || OPEN_PATHS.has(pathOf(req.url)))) || hasToken(req, auth.token)) return done();
      void reply
        .code(401)
        .header('www-authenticate', 'Bearer realm="blockmirror"')
        .send({ error: 'this admin API needs its token: send Authorization: Bearer TOKEN (blockmirror admin token -c FILE prints it)' });
    });
  }

  // A page of another site must not drive this API through an admin's browser
  // (CSRF): browsers send Origin on cross-origin requests; the CLI sends none.
  app.addHook('onRequest', (req, reply, done) => {
    const origin = req.headers.origin;
    if (origin === undefined || originHost(origin) === req.headers.host) return done();
    void reply.code(403).send({ error: `cross-origin request from ${origin} refused` });
  });

  app.setNotFoundHandler((req, reply) => reply.code(404).send({ error: `no route ${req.method} ${pathOf(req.url)}` }));

  route(app, 'GET', '/healthz', async () => ({ ok: true }));

  route(app, 'GET', '/api/status', async () => target.report());

  route(app, 'GET', '/api/pairs/:name', async (req) => findPair(target, (req.params as NameParams).name));

  route(app, 'POST', '/api/pairs/:name/split', async (req): Promise<{ pair: PairStatus }> => ({
    pair: await target.split((req.params as NameParams).name),
  }));

  route(app, 'POST', '/api/pairs/:name/resync', async (req): Promise<{ pair: PairStatus }> => ({
    pair: await target.resync((req.params as NameParams).name),
  }));

  // verify starts in the background (its progress is in the pair's status); swap and takeover
  // answer once the roles have changed. A target without them answers 409.
  for (const command of ['verify', 'swap', 'takeover'] as const) {
    route(app, 'POST', `/api/pairs/:name/${command}`, async (req): Promise<{ pair: PairStatus }> => {
      const name = (req.params as NameParams).name;
      const run = target[command]?.bind(target);
      if (!run) {
        findPair(target, name);
        throw new PairCommandError('refused', `${command} ${name}: not supported by this storage system`);
      }
      return { pair: await run(name) };
    });
  }

  // Fault injection (docs/faults.md). The body of a PUT is the fault's options; range in bytes.
  route(app, 'GET', '/api/faults', async () => ({ faults: target.faults?.() ?? [] }));
  route(app, 'PUT', '/api/faults/:target/:kind', async (req) => {
    const { target: t, kind } = req.params as { target: string; kind: string };
    if (!target.setFault) throw new PairCommandError('refused', 'this storage system takes no faults');
    const body = req.body === undefined ? {} : req.body;
    if (typeof body !== 'object' || body === null || Array.isArray(body)) throw httpError(400, 'the body must be a JSON object of fault options');
    const parsed = FaultRequestSchema.safeParse({ ...body, target: t, kind });
    if (!parsed.success) throw httpError(400, `fault ${kind} on ${t}: ${parsed.error.issues.map((i) => `${i.path.join('.') || 'body'}: ${i.message}`).join('; ')}`);
    return { faults: target.setFault(parsed.data) };
  });
  route(app, 'DELETE', '/api/faults/:target', async (req) => {
    const t = (req.params as { target: string }).target;
    const kind = (req.query as { kind?: string }).kind;
    if (!target.clearFault) throw new PairCommandError('refused', 'this storage system takes no faults');
    return { faults: target.clearFault(t, kind) };
  });

  // S-VOL groups (docs/svol.md).
  route(app, 'GET', '/api/svol/:name', async (req) => {
    const name = (req.params as NameParams).name;
    if (!target.svolStatus) throw new PairCommandError('not-found', `no S-VOL group named ${name}`);
    return target.svolStatus(name);
  });
  for (const command of ['init', 'split', 'resync', 'restore', 'attr', 'verify'] as const) {
    route(app, 'POST', `/api/svol/:name/${command}`, async (req) => {
      const name = (req.params as NameParams).name;
      if (!target.svolCommand) throw new PairCommandError('not-found', `no S-VOL group named ${name}`);
      const body = req.body === undefined ? {} : req.body;
      const parsed = SvolBody.safeParse(body);
      if (!parsed.success) throw httpError(400, `${command} ${name}: ${parsed.error.issues.map((i) => `${i.path.join('.') || 'body'}: ${i.message}`).join('; ')}`);
      const opts = { ...(parsed.data.member !== undefined ? { member: String(parsed.data.member) } : {}), ...(parsed.data.attr !== undefined ? { attr: parsed.data.attr } : {}) };
      return { group: await target.svolCommand(name, command, opts) };
    });
  }

  registerConfigRoutes(app, opts.config);
  registerMetrics(app, target, route);
  registerDashboard(app, target, { peers: opts.peers ?? [], route, log, ...(opts.etcd ? { etcd: opts.etcd } : {}) });

  return app;
}

export type RouteAdder = typeof route;

/** Registers `method url` and a 405 with Allow for every other method on the same path. */
function route(app: FastifyInstance, method: Method, url: string, handler: (req: FastifyRequest, reply: FastifyReply) => Promise<unknown>): void {
  app.route({ method, url, handler: async (req, reply) => handler(req, reply) });
  const allowed: Method[] = method === 'GET' ? ['GET', 'HEAD'] : [method];
  const others = METHODS.filter((m) => !allowed.includes(m));
  app.route({
    method: others,
    url,
    handler: async (req, reply) =>
      reply
        .code(405)
        .header('allow', allowed.join(', '))
        .send({ error: `method ${req.method} not allowed on ${pathOf(req.url)} (use ${method})` }),
  });
}

function findPair(target: AdminTarget, name: string): PairStatus {
  const pair = target.report().pairs.find((p) => p.name === name);
  if (pair === undefined) throw new PairCommandError('no-such-pair', `no pair named "${name}"`);
  return pair;
}

function httpError(statusCode: number, message: string): FastifyError {
  return Object.assign(new Error(message), { statusCode, code: 'BM_ADMIN_BAD_REQUEST', name: 'AdminRequestError' }) as FastifyError;
}

/** The error text on one line (fastify's own messages and JSON.parse's are single-line already). */
function errorLine(err: Error): string {
  return (err.message || err.name || 'error').replace(/\s*\n\s*/g, ' ');
}

/** "host:port" of an Origin header, as a Host header would say it; undefined if it is not a URL ("null"). */
function originHost(origin: string): string | undefined {
  try {
    return new URL(origin).host;
  } catch {
    return undefined;
  }
}

function hasToken(req: FastifyRequest, token: string): boolean {
  const h = req.headers.authorization;
  const m = typeof h === 'string' ? /^Bearer\s+(\S+)\s*$/i.exec(h) : null;
  return m !== null && sameSecret(m[1]!, token);
}

/**
 * DNS rebinding points a name the attacker owns at this address: a Host header with an IP
 * address or localhost cannot be one, so only names must be listed.
 */
function hostAllowed(host: string, port: number, named: Set<string>): boolean {
  const m = /^(\[[0-9a-f:.]+\]|[a-z0-9.-]+)(?::(\d{1,5}))?$/.exec(host);
  if (!m) return false;
  const name = m[1]!;
  const p = m[2] === undefined ? 80 : Number(m[2]);
  const literal = net.isIP(name.replace(/^\[|\]$/g, '')) !== 0;
  if ((literal || name === 'localhost') && p === port) return true;
  return named.has(host) || (m[2] === undefined ? false : named.has(name) && p === port);
}

function pathOf(url: string): string {
  const q = url.indexOf('?');
  return q < 0 ? url : url.slice(0, q);
}

function formatHostPort(host: string, port: number): string {
  return host.includes(':') ? `[${host}]:${port}` : `${host}:${port}`;
}

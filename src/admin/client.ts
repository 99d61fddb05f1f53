// Client side of the admin HTTP API (src/admin/server.ts), on node:http and node:https. Not on
// the global fetch: its first use loads undici and compiles its WebAssembly parser, which cost
// `blockmirror status` more CPU than all the rest of its start-up (issue 18, bench/RESULTS.md).
// Two failures are kept apart, because the CLI reports them differently:
//   AdminUnreachableError  no HTTP answer at all (refused, unknown host, timeout)
//   AdminReplyError        an HTTP answer that is an error (404, 409, 500) or not
//                          the JSON we expect
import http from 'node:http';
import net from 'node:net';
import type { FaultStatus } from '../controller/fault-table.js';
import type { PairStatus, SSReport } from '../controller/status.js';
import type { SvolGroupStatus } from '../controller/svol/status.js';
import { AdminReplyError, AdminUnreachableError } from './errors.js';

export { AdminClientError, AdminReplyError, AdminUnreachableError } from './errors.js';

/** Where an admin API listens, and optionally which storage system it is (for messages). */
export interface AdminEndpoint {
  host: string;
  port: number;
  /** Storage-system id: messages then say "storage system 1 (127.0.0.1:9001)". */
  ss?: number;
  /** The admin token (Authorization: Bearer). */
  token?: string;
  /** HTTPS, with the server's certificate checked against this CA (security.adminTls). */
  ca?: Buffer;
}

export type PairCommand = 'split' | 'resync' | 'verify' | 'swap' | 'takeover';

/** GET /api/status. */
export async function getStatus(addr: AdminEndpoint | string, timeoutMs: number): Promise<SSReport> {
  const ep = toEndpoint(addr);
  const body = await request(ep, 'GET', '/api/status', timeoutMs, '');
  if (!isObject(body) || !Array.isArray(body.storageSystems) || !Array.isArray(body.pairs)) {
    throw new AdminReplyError(`${describe(ep)} sent a status report without storageSystems and pairs`, 200);
  }
  return body as unknown as SSReport;
}

/** POST /api/pairs/NAME/split or /resync; resolves with the pair's status after the command. */
export async function pairCommand(addr: AdminEndpoint | string, name: string, command: PairCommand, timeoutMs: number): Promise<PairStatus> {
  const ep = toEndpoint(addr);
  const op = `${command} ${name}: `;
  const body = await request(ep, 'POST', `/api/pairs/${encodeURIComponent(name)}/${command}`, timeoutMs, op);
  if (!isObject(body) || !isObject(body.pair) || typeof body.pair.state !== 'string') {
    throw new AdminReplyError(`${op}${describe(ep)} sent a reply without the pair's status`, 200);
  }
  return body.pair as unknown as PairStatus;
}

/** "storage system 1 (127.0.0.1:9001)" or "admin API at 127.0.0.1:9001". */
export function describe(ep: AdminEndpoint): string {
  const hp = hostPort(ep);
  return ep.ss === undefined ? `admin API at ${hp}` : `storage system ${ep.ss} (${hp})`;
}

/** PUT /api/faults/TARGET/KIND: set a fault; resolves with the storage system's faults after it. */
export async function setFault(addr: AdminEndpoint | string, target: string, kind: string, options: Record<string, unknown>, timeoutMs: number): Promise<FaultStatus[]> {
  const ep = toEndpoint(addr);
  const body = await request(ep, 'PUT', `/api/faults/${encodeURIComponent(target)}/${encodeURIComponent(kind)}`, timeoutMs, `fault set ${target} ${kind}: `, options);
  return faultsOf(ep, body);
}

/** DELETE /api/faults/TARGET: clear a target's faults (every kind, or one). */
export async function clearFault(addr: AdminEndpoint | string, target: string, kind: string | undefined, timeoutMs: number): Promise<FaultStatus[]> {
  const ep = toEndpoint(addr);
  const q = kind ? `?kind=${encodeURIComponent(kind)}` : '';
  return faultsOf(ep, await request(ep, 'DELETE', `/api/faults/${encodeURIComponent(target)}${q}`, timeoutMs, `fault clear ${target}: `));
}

export type SvolCommandName = 'init' | 'split' | 'resync' | 'restore' | 'attr' | 'verify';

/** GET /api/svol/NAME: the group's members, map, states and restore progress. */
export async function svolQuery(addr: AdminEndpoint | string, name: string, timeoutMs: number): Promise<SvolGroupStatus> {
  const ep = toEndpoint(addr);
  const body = await request(ep, 'GET', `/api/svol/${encodeURIComponent(name)}`, timeoutMs, `svol query ${name}: `);
  if (!isObject(body) || !Array.isArray(body.members)) throw new AdminReplyError(`svol query ${name}: ${describe(ep)} sent a reply without the group's members`, 200);
  return body as unknown as SvolGroupStatus;
}

/** POST /api/svol/NAME/COMMAND; resolves with the group's status after the command. */
export async function svolCommand(addr: AdminEndpoint | string, name: string, command: SvolCommandName, opts: { member?: string; attr?: string }, timeoutMs: number): Promise<SvolGroupStatus> {
  const ep = toEndpoint(addr);
  const body = await request(ep, 'POST', `/api/svol/${encodeURIComponent(name)}/${command}`, timeoutMs, `svol ${command} ${name}: `, opts);
  if (!isObject(body) || !isObject(body.group) || !Array.isArray(body.group.members)) throw new AdminReplyError(`svol ${command} ${name}: ${describe(ep)} sent a reply without the group's status`, 200);
  return body.group as unknown as SvolGroupStatus;
}

/** What POST /api/config answers (cluster/reconfigure.ts). */
export interface ApplyReply {
  changes: string[];
  notes: string[];
  applied: boolean;
}

/** GET /api/config: the YAML the storage system's process runs now. */
export async function getConfig(addr: AdminEndpoint | string, timeoutMs: number): Promise<string> {
  const ep = toEndpoint(addr);
  const body = await request(ep, 'GET', '/api/config', timeoutMs, 'config: ');
  if (!isObject(body) || typeof body.yaml !== 'string') throw new AdminReplyError(`config: ${describe(ep)} sent a reply without the YAML`, 200);
  return body.yaml;
}

/** POST /api/config: plan (dryRun) or apply a YAML on the storage system's process. */
export async function applyConfig(addr: AdminEndpoint | string, yaml: string, dryRun: boolean, timeoutMs: number): Promise<ApplyReply> {
  const ep = toEndpoint(addr);
  const body = await request(ep, 'POST', '/api/config', timeoutMs, '', { yaml, dryRun });
  if (!isObject(body) || !Array.isArray(body.changes) || !Array.isArray(body.notes)) throw new AdminReplyError(`apply: ${describe(ep)} sent a reply without the list of changes`, 200);
  return body as unknown as ApplyReply;
}

/** GET /api/faults. */
export async function listFaults(addr: AdminEndpoint | string, timeoutMs: number): Promise<FaultStatus[]> {
  const ep = toEndpoint(addr);
  return faultsOf(ep, await request(ep, 'GET', '/api/faults', timeoutMs, 'fault list: '));
}

function faultsOf(ep: AdminEndpoint, body: unknown): FaultStatus[] {
  if (!isObject(body) || !Array.isArray(body.faults)) throw new AdminReplyError(`${describe(ep)} sent a reply without the list of faults`, 200);
  return body.faults as FaultStatus[];
}

/** One exchange, over HTTPS when the cluster's CA is given (security.adminTls). */
async function exchange(ep: AdminEndpoint, method: string, path: string, headers: Record<string, string>, body: string | undefined, signal: AbortSignal): Promise<{ ok: boolean; status: number; statusText: string; text: string }> {
  const options = { host: ep.host, port: ep.port, path, method, headers, signal };
  // node:https (and TLS) only for a cluster that uses it.
  const https = ep.ca ? await import('node:https') : undefined;
  return new Promise((resolve, reject) => {
    const onResponse = (res: http.IncomingMessage) => {
      let text = '';
      res.setEncoding('utf8');
      res.on('data', (d: string) => (text += d));
      res.on('end', () => resolve({ ok: res.statusCode! >= 200 && res.statusCode! < 300, status: res.statusCode!, statusText: res.statusMessage ?? '', text }));
      res.on('error', reject);
    };
    const req = https && ep.ca ? https.request({ ...options, ca: ep.ca, ...(net.isIP(ep.host) ? {} : { servername: ep.host }) }, onResponse) : http.request(options, onResponse);
    req.on('error', reject);
    req.end(body);
  });
}

/** GET a JSON document (the dashboard's peer bitmaps); undefined for an error status. */
export async function getJson(ep: AdminEndpoint, path: string, timeoutMs: number): Promise<unknown> {
  const headers: Record<string, string> = { accept: 'application/json', ...(ep.token ? { authorization: `Bearer ${ep.token}` } : {}) };
  const r = await exchange(ep, 'GET', path, headers, undefined, AbortSignal.timeout(timeoutMs));
  return r.ok ? JSON.parse(r.text) : undefined;
}

async function request(ep: AdminEndpoint, method: 'GET' | 'POST' | 'PUT' | 'DELETE', path: string, timeoutMs: number, op: string, json?: unknown): Promise<unknown> {
  // One signal for the whole exchange: a server that accepts and then never
  // finishes the body times out the same as one that never answers.
  const signal = AbortSignal.timeout(timeoutMs);
  let text: string;
  let res: { ok: boolean; status: number; statusText: string };
  try {
    const headers: Record<string, string> = { accept: 'application/json' };
    if (json !== undefined) headers['content-type'] = 'application/json';
    if (ep.token) headers.authorization = `Bearer ${ep.token}`;
    const r = await exchange(ep, method, path, headers, json !== undefined ? JSON.stringify(json) : undefined, signal);
    res = r;
    text = r.text;
  } catch (e) {
    const [code, why] = networkCause(e, timeoutMs);
    throw new AdminUnreachableError(`${op}${describe(ep)} is not reachable: ${why}`, code, { cause: e, ...(ep.ss !== undefined ? { ss: ep.ss } : {}) });
  }
  let body: unknown;
  try {
    body = text === '' ? undefined : JSON.parse(text);
  } catch {
    body = undefined;
  }
  if (!res.ok) {
    const serverMessage = isObject(body) && typeof body.error === 'string' ? body.error : undefined;
    const what = serverMessage ?? (text.trim().split('\n')[0]?.slice(0, 200) || res.statusText);
    throw new AdminReplyError(`${op}${describe(ep)} replied ${res.status}: ${what}`, res.status, serverMessage);
  }
  if (body === undefined) throw new AdminReplyError(`${op}${describe(ep)} sent a reply that is not JSON`, res.status);
  return body;
}

/** [code, short reason] of a request that got no HTTP answer. */
function networkCause(e: unknown, timeoutMs: number): [string, string] {
  const err = e as Error & { cause?: unknown };
  if (err?.name === 'TimeoutError' || err?.name === 'AbortError') return ['ETIMEDOUT', `no answer within ${timeoutMs} ms`];
  // With several addresses to try (localhost: ::1 and 127.0.0.1) the error is
  // an AggregateError that carries the code but no syscall; `cause` is for
  // callers that wrap the socket error.
  const cause = (err?.cause ?? err) as NodeJS.ErrnoException & { errors?: NodeJS.ErrnoException[] };
  const code = cause?.code ?? 'EIO';
  const syscall = cause?.syscall ?? cause?.errors?.[0]?.syscall;
  if (cause?.code !== undefined && syscall !== undefined) return [code, `${syscall} ${cause.code}`];
  return [code, (cause?.message || err?.message || String(e)).replace(/\s*\n\s*/g, ' ')];
}

function toEndpoint(addr: AdminEndpoint | string): AdminEndpoint {
  if (typeof addr !== 'string') return addr;
  const m = /^(?:\[([^\]]+)\]|([^:]+)):(\d+)$/.exec(addr);
  if (!m) throw new TypeError(`invalid admin address "${addr}" (expected HOST:PORT)`);
  return { host: m[1] ?? m[2]!, port: Number(m[3]) };
}

function hostPort(ep: AdminEndpoint): string {
  return ep.host.includes(':') ? `[${ep.host}]:${ep.port}` : `${ep.host}:${ep.port}`;
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

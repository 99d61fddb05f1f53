// NBD client options and nbd:// URIs.
import {
  DEFAULT_PORT,
  MAX_STRING,
} from '../../protocol/constants.js';
import fs from 'node:fs';
import path from 'node:path';
import { refused } from './errors.js';
import type { ClientTls } from '../tls.js';
import { parsePskFile, SecretFileError } from '../../util/secrets.js';

// ---------------------------------------------------------------------------
// Options

export interface ConnectOptions {
  host?: string;
  port?: number;
  /** Unix socket path (instead of host/port). */
  path?: string;
  exportName?: string;
  /**
   * Per-command timeout; none by default. A command that exceeds it fails with
   * ETIMEDOUT and closes the connection (see the top of this file for why).
   * Also bounds the handshake unless handshakeTimeoutMs is set.
   */
  timeoutMs?: number;
  /** Default: timeoutMs, else 10 s. */
  handshakeTimeoutMs?: number;
  /** Ask for structured replies (default true); falls back to simple replies if refused. */
  structuredReplies?: boolean;
  /** Meta contexts to select, e.g. ['base:allocation']; needs structured replies. */
  metaContexts?: string[];
  /** Aborts the connection attempt (not the connection once established). */
  signal?: AbortSignal;
  /** Refuse locally what the server did not advertise (default true). */
  strict?: boolean;
  /** STARTTLS with these credentials before anything else; refused by a server without TLS. */
  tls?: ClientTls;
}

export interface ResolvedOptions {
  host: string;
  port: number;
  path: string | undefined;
  exportName: string;
  timeoutMs: number | undefined;
  handshakeTimeoutMs: number;
  structuredReplies: boolean;
  metaContexts: string[];
  signal: AbortSignal | undefined;
  strict: boolean;
  tls: ClientTls | undefined;
}

export interface NbdUri {
  host?: string;
  port?: number;
  path?: string;
  exportName: string;
  tls?: ClientTls;
}

/**
 * libnbd's URI forms: `nbd://host[:port]/export`, `nbd+unix:///export?socket=PATH`, and with TLS
 * `nbds://[identity@]host[:port]/export` with `?tls-psk-file=FILE` (the identity's key from a
 * psk file) or `?tls-certificates=DIR` (DIR/ca-cert.pem, and client-cert.pem/client-key.pem when
 * present, as libnbd and qemu lay them out).
 */
export function parseNbdUri(uri: string): NbdUri {
  let u: URL;
  try {
    u = new URL(uri);
  } catch {
    throw refused('connect', 'EINVAL', `not a URI: ${uri}`);
  }
  const exportName = decodeURIComponent(u.pathname.replace(/^\//, ''));
  switch (u.protocol) {
    case 'nbd:':
      return {
        host: u.hostname.replace(/^\[(.*)\]$/, '$1') || 'localhost',
        port: u.port ? Number(u.port) : DEFAULT_PORT,
        exportName,
      };
    case 'nbd+unix:': {
      const path = u.searchParams.get('socket');
      if (!path) throw refused('connect', 'EINVAL', `${uri} has no ?socket=PATH`);
      return { path, exportName };
    }
    case 'nbds:':
      return {
        host: u.hostname.replace(/^\[(.*)\]$/, '$1') || 'localhost',
        port: u.port ? Number(u.port) : DEFAULT_PORT,
        exportName,
        tls: uriTls(u),
      };
    case 'nbds+unix:': {
      const path = u.searchParams.get('socket');
      if (!path) throw refused('connect', 'EINVAL', `${uri} has no ?socket=PATH`);
      return { path, exportName, tls: uriTls(u) };
    }
    default:
      throw refused('connect', 'EINVAL', `unsupported URI scheme ${u.protocol} in ${uri}`);
  }
}

function uriTls(u: URL): ClientTls {
  const read = (f: string) => {
    try {
      return fs.readFileSync(f);
    } catch (e) {
      throw refused('connect', 'EINVAL', `cannot read ${f}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`);
    }
  };
  const pskFile = u.searchParams.get('tls-psk-file');
  if (pskFile) {
    const identity = decodeURIComponent(u.username) || process.env.USER || '';
    let keys: Map<string, Buffer>;
    try {
      keys = parsePskFile(read(pskFile).toString('utf8'), pskFile);
    } catch (e) {
      if (e instanceof SecretFileError) throw refused('connect', 'EINVAL', e.message);
      throw e;
    }
    const key = keys.get(identity);
    if (!key) throw refused('connect', 'EINVAL', `${pskFile} has no key for identity ${JSON.stringify(identity)} (put it in the URI: nbds://IDENTITY@host/export)`);
    return { psk: { identity, key } };
  }
  const dir = u.searchParams.get('tls-certificates');
  if (dir) {
    const f = (n: string) => path.join(dir, n);
    return {
      ca: read(f('ca-cert.pem')),
      ...(fs.existsSync(f('client-cert.pem')) ? { cert: read(f('client-cert.pem')), key: read(f('client-key.pem')) } : {}),
    };
  }
  return {};
}

export function resolveOptions(target: string | ConnectOptions, extra: ConnectOptions): ResolvedOptions {
  // A URI names the whole target: it replaces any host, port, path or export given beside it.
  const o: ConnectOptions =
    typeof target === 'string' ? { ...extra, host: undefined, port: undefined, path: undefined, ...parseNbdUri(target) } : { ...target, ...extra };
  const exportName = o.exportName ?? '';
  if (Buffer.byteLength(exportName) > MAX_STRING) throw refused('connect', 'EINVAL', `export name longer than ${MAX_STRING} bytes`);
  return {
    host: o.host ?? 'localhost',
    port: o.port ?? DEFAULT_PORT,
    path: o.path,
    exportName,
    timeoutMs: o.timeoutMs,
    handshakeTimeoutMs: o.handshakeTimeoutMs ?? o.timeoutMs ?? 10_000,
    structuredReplies: o.structuredReplies ?? true,
    metaContexts: o.metaContexts ?? [],
    signal: o.signal,
    strict: o.strict ?? true,
    tls: o.tls,
  };
}


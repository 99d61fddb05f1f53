// NBD client options and nbd:// URIs.
import {
  DEFAULT_PORT,
  MAX_STRING,
} from '../../protocol/constants.js';
import { refused } from './errors.js';

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
}

export interface NbdUri {
  host?: string;
  port?: number;
  path?: string;
  exportName: string;
}

/** `nbd://host[:port]/export` or `nbd+unix:///export?socket=PATH` (libnbd's URI forms, TLS excepted). */
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
    case 'nbds+unix:':
      throw refused('connect', 'ENOTSUP', 'TLS (nbds://) is not supported by this client');
    default:
      throw refused('connect', 'EINVAL', `unsupported URI scheme ${u.protocol} in ${uri}`);
  }
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
  };
}


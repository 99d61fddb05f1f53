// The NBD server: listeners (TCP, unix socket, an inherited fd for socket
// activation), one handshake then one Connection per client, and a graceful
// shutdown that answers what is in flight and flushes every device.
import net from 'node:net';
import fs from 'node:fs';
import type { Logger } from 'pino';
import { ExportTable } from './exports.js';
import { HandshakeAbort, negotiate } from './handshake.js';
import { ConnectionClosed } from './socket-reader.js';
import { Connection } from './transmission.js';
import { TlsRefused, TlsServer, type ServerTls } from './tls.js';

export type ListenSpec =
  | { kind: 'tcp'; host: string; port: number }
  | { kind: 'unix'; path: string }
  | { kind: 'fd'; fd: number };

export interface NbdServerOptions {
  exports: ExportTable;
  log: Logger;
  /** A client that has not finished negotiating after this long is dropped. */
  handshakeTimeoutMs?: number;
  /** NBD_OPT_STARTTLS: off when absent. */
  tls?: ServerTls;
}

/** Refusals logged once per (address, export): a client retrying in a loop does not flood the log. */
const MAX_REMEMBERED_REFUSALS = 10_000;

export class NbdServer {
  private readonly listeners: net.Server[] = [];
  private readonly handshaking = new Set<net.Socket>();
  private readonly connections = new Set<Connection>();
  /** Connections per export name: live reconfiguration refuses to remove a volume in use. */
  private readonly perExport = new Map<string, number>();
  private stopping = false;
  private readonly tls: TlsServer | undefined;
  private readonly refusals = new Set<string>();
  /** Connections now and since start (the volumes count their own I/O: CountingDevice). */
  readonly stats = {
    connections: 0,
    totalConnections: 0,
  };

  constructor(private readonly opts: NbdServerOptions) {
    this.tls = opts.tls && opts.tls.mode !== 'off' ? new TlsServer(opts.tls) : undefined;
  }

  /** off, allow or require: what STARTTLS offers here. */
  get tlsMode(): 'off' | 'allow' | 'require' {
    return this.tls?.policy.mode ?? 'off';
  }

  get exports(): ExportTable {
    return this.opts.exports;
  }

  /** Start listening; resolves with a printable address (e.g. "127.0.0.1:10809"). */
  listen(spec: ListenSpec): Promise<string> {
    const srv = net.createServer({ allowHalfOpen: true, noDelay: true }, (s) => this.accept(s));
    this.listeners.push(srv);
    return new Promise((resolve, reject) => {
      srv.once('error', reject);
      const ready = () => {
        srv.off('error', reject);
        srv.on('error', (e) => this.opts.log.error({ err: e.message }, 'listener error'));
        const a = srv.address();
        resolve(typeof a === 'string' ? a : a ? `${a.address.includes(':') ? `[${a.address}]` : a.address}:${a.port}` : `fd ${(spec as { fd: number }).fd}`);
      };
      if (spec.kind === 'tcp') srv.listen({ host: spec.host, port: spec.port }, ready);
      else if (spec.kind === 'unix') {
        removeStaleSocket(spec.path);
        srv.listen({ path: spec.path }, ready);
      } else srv.listen({ fd: spec.fd }, ready);
    });
  }

  /**
   * Serve NBD on a connection accepted elsewhere (the peer channel's data connections), with its
   * own export table and the identity the transport proved. Shut down with the server.
   */
  serveConnection(socket: net.Socket, exports: ExportTable, identity: string): void {
    this.accept(socket, exports, identity);
  }

  private accept(socket: net.Socket, exports: ExportTable = this.opts.exports, identity?: string): void {
    const log = this.opts.log.child({ peer: socket.remoteAddress ? `${socket.remoteAddress}:${socket.remotePort}` : 'unix' });
    if (this.stopping) {
      socket.destroy();
      return;
    }
    socket.setNoDelay(true);
    socket.on('error', () => socket.destroy());
    this.handshaking.add(socket);
    const timer = setTimeout(() => {
      log.warn('handshake timed out');
      socket.destroy();
    }, this.opts.handshakeTimeoutMs ?? 30_000);
    const address = socket.remoteAddress ?? 'unix';
    const refused = (name: string, identity: string) => {
      const key = `${address}\0${name}`;
      if (this.refusals.has(key)) return;
      if (this.refusals.size >= MAX_REMEMBERED_REFUSALS) this.refusals.clear();
      this.refusals.add(key);
      log.warn({ export: name, address, identity }, `refused ${address}${identity ? ` (${identity})` : ''} access to export ${name}: not in its allow list`);
    };
    const tlsServer = identity === undefined ? this.tls : undefined;
    negotiate(socket, { exports, log, shuttingDown: () => this.stopping, ...(tlsServer ? { tls: tlsServer } : {}), ...(identity !== undefined ? { identity } : {}), refused })
      .then((neg) => {
        clearTimeout(timer);
        this.handshaking.delete(socket);
        if (!neg) return;
        if (neg.socket.destroyed) return;
        const conn = new Connection(neg.socket, neg, log.child({ export: neg.export.name }));
        this.connections.add(conn);
        this.stats.connections++;
        this.stats.totalConnections++;
        const name = neg.export.name;
        this.perExport.set(name, (this.perExport.get(name) ?? 0) + 1);
        log.debug({ export: name, sr: neg.structuredReplies }, 'client connected');
        void conn.done.then(() => {
          this.connections.delete(conn);
          this.stats.connections--;
          const left = (this.perExport.get(name) ?? 1) - 1;
          if (left > 0) this.perExport.set(name, left);
          else this.perExport.delete(name);
          log.debug('client disconnected');
        });
      })
      .catch((err: unknown) => {
        clearTimeout(timer);
        this.handshaking.delete(socket);
        if (err instanceof HandshakeAbort) log.info({ reason: err.message }, 'handshake refused');
        else if (err instanceof TlsRefused) log.warn({ address, reason: err.message }, `TLS refused for ${address}: ${err.message}`);
        else if (!(err instanceof ConnectionClosed)) log.debug({ err: (err as Error).message }, 'handshake failed');
        socket.destroy();
      });
  }

  /** How many clients are attached to export `name` now. */
  connectionsTo(name: string): number {
    return this.perExport.get(name) ?? 0;
  }

  /** Stop accepting, finish requests in flight, flush every device, close. */
  async close(): Promise<void> {
    this.stopping = true;
    // A listener's close callback waits for its connections: stop accepting first, end them, then wait.
    const closed = Promise.all(this.listeners.map((l) => new Promise<void>((r) => l.close(() => r()))));
    for (const s of this.handshaking) s.destroy();
    await Promise.all([...this.connections].map((c) => c.shutdown()));
    await closed;
    const devices = new Set(this.opts.exports.list().map((e) => e.device));
    await Promise.all([...devices].map((d) => d.flush().catch((e: Error) => this.opts.log.error({ err: e.message }, 'flush at shutdown failed'))));
  }
}

/** A unix socket path left by a previous run would make listen() fail with EADDRINUSE. */
function removeStaleSocket(path: string): void {
  try {
    if (fs.statSync(path).isSocket()) fs.unlinkSync(path);
  } catch {
    // absent: nothing to remove
  }
}

// The iSCSI target server: listeners (portals), targets, sessions. One connection per session
// (MaxConnections=1, ERL 0). A new login with the ISID of a live session of the same initiator
// and target reinstates it: the old connection is dropped and its tasks aborted (RFC 7143 6.3.5).
import net from 'node:net';
import type { Logger } from 'pino';
import { LoginStatus } from '../protocol/iscsi/constants.js';
import { IscsiConnection, type ConnectionHooks } from './connection.js';
import type { LoginResult } from './login.js';
import type { ChapSecrets } from './chap.js';
import { initiatorPortName, normaliseName, type TargetSpec } from './target.js';

export interface IscsiServerOptions {
  log: Logger;
  targets: TargetSpec[];
  /** Addresses SendTargets reports ("host:port"); default: where we listen. */
  portals?: string[];
  nopIntervalMs?: number;
  nopTimeoutMs?: number;
  loginTimeoutMs?: number;
  /** Commands per session in flight (the CmdSN window). */
  queueDepth?: number;
  /** What discovery sessions must prove; default: the first target with CHAP. */
  discoveryChap?: ChapSecrets;
}

export interface IscsiSessionInfo {
  initiator: string;
  isid: string;
  tsih: number;
  address: string;
  target: string;
  discovery: boolean;
  connections: number;
  luns: number[];
  commands: number;
  readBytes: number;
  writeBytes: number;
}

export class IscsiServer {
  private readonly listeners: net.Server[] = [];
  private readonly connections = new Set<IscsiConnection>();
  private readonly targets = new Map<string, TargetSpec>();
  private readonly listening: string[] = [];
  private nextTsih = 1;
  private readonly hooks: ConnectionHooks;

  constructor(private readonly opts: IscsiServerOptions) {
    for (const t of opts.targets) this.addTarget(t);
    this.hooks = {
      log: opts.log,
      findTarget: (n) => this.targets.get(normaliseName(n)),
      targets: () => [...this.targets.values()],
      ...(opts.discoveryChap ? { discoveryChap: opts.discoveryChap } : {}),
      portals: () => this.opts.portals ?? this.listening,
      admit: (c, r) => this.admit(c, r),
      closed: (c) => {
        this.connections.delete(c);
        const s = c.session;
        if (!s?.target) return;
        // A reinstated session has the same initiator port and already joined: its nexus lives on.
        const port = c.initiatorPort;
        if ([...this.connections].some((o) => o.session?.target === s.target && o.phase === 'ffp' && o.initiatorPort === port)) return;
        for (const lu of s.target.luns.values()) lu.nexusLost(port);
      },
      reset: (t, lun, cold) => this.reset(t, lun, cold),
      nopIntervalMs: opts.nopIntervalMs ?? 10_000,
      nopTimeoutMs: opts.nopTimeoutMs ?? 30_000,
      loginTimeoutMs: opts.loginTimeoutMs ?? 15_000,
      queueDepth: opts.queueDepth ?? 64,
    };
  }

  addTarget(t: TargetSpec): void {
    const name = normaliseName(t.name);
    if (this.targets.has(name)) throw new Error(`iSCSI target ${t.name} defined twice`);
    this.targets.set(name, { ...t, name });
  }

  listen(host: string, port: number): Promise<string> {
    const srv = net.createServer({ noDelay: true }, (s) => this.accept(s));
    this.listeners.push(srv);
    return new Promise((resolve, reject) => {
      srv.once('error', reject);
      srv.listen({ host, port }, () => {
        srv.off('error', reject);
        srv.on('error', (e) => this.opts.log.error({ err: e.message }, 'iscsi listener error'));
        const a = srv.address() as net.AddressInfo;
        const addr = `${a.address.includes(':') ? `[${a.address}]` : a.address}:${a.port}`;
        this.listening.push(addr);
        resolve(addr);
      });
    });
  }

  private accept(s: net.Socket): void {
    s.setKeepAlive(true, 30_000);
    this.connections.add(new IscsiConnection(s, this.hooks));
  }

  private admit(conn: IscsiConnection, r: LoginResult): number | { status: number } {
    if (r.tsih !== 0) {
      // Adding a connection to a session: we run one connection per session.
      const live = [...this.connections].some((c) => c.session?.tsih === r.tsih);
      return { status: live ? LoginStatus.TOO_MANY_CONNECTIONS : LoginStatus.SESSION_DOES_NOT_EXIST };
    }
    if (!r.discovery) {
      for (const c of this.connections) {
        const s = c.session;
        if (c !== conn && s && !s.discovery && s.isid === r.isid && s.initiatorName === r.initiatorName && s.target === r.target) {
          this.opts.log.info({ initiator: r.initiatorName, tsih: s.tsih }, 'iscsi session reinstated; old connection dropped');
          c.close();
        }
      }
    }
    // From now on this I_T nexus hears of resets and role changes (unit attentions).
    if (!r.discovery && r.target) for (const lu of r.target.luns.values()) lu.nexusJoined(initiatorPortName(r.initiatorName, r.isid));
    const tsih = this.nextTsih;
    this.nextTsih = (this.nextTsih % 0xffff) + 1;
    return tsih;
  }

  private reset(t: TargetSpec, lun: number | undefined, cold: boolean): void {
    for (const [id, lu] of t.luns) if (lun === undefined || id === lun) lu.reset();
    for (const c of this.connections) {
      if (c.session?.target !== t) continue;
      c.abortTasks(lun);
      if (cold) c.close();
    }
  }

  sessions(): IscsiSessionInfo[] {
    return [...this.connections]
      .filter((c) => c.session && c.phase === 'ffp')
      .map((c) => {
        const s = c.session!;
        return {
          initiator: s.initiatorName,
          isid: `0x${s.isid.toString(16).padStart(12, '0')}`,
          tsih: s.tsih,
          address: c.remoteAddress,
          target: s.target?.name ?? '',
          discovery: s.discovery,
          connections: 1,
          luns: s.target ? [...s.target.luns.keys()] : [],
          ...c.counters,
        };
      });
  }

  async close(): Promise<void> {
    for (const l of this.listeners) l.close();
    for (const c of this.connections) c.close();
    await Promise.all(this.listeners.map((l) => new Promise<void>((r) => (l.listening ? l.close(() => r()) : r()))));
  }
}

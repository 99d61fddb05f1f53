// A gateway (Zambeel's symmetric front end, docs/cluster.md): a stateless NBD server that exports
// every logical volume of the cluster by name and forwards each request to the volume's current
// master, as the etcd tables say. It keeps no placement state of its own: any number of gateways
// can run, any of them serves any volume, and a host may attach through any.
import type { Logger } from 'pino';
import { ExportTable } from '../nbd/exports.js';
import { NbdServer } from '../nbd/server.js';
import type { ServerTls } from '../nbd/tls.js';
import { AllowList } from '../util/allow-list.js';
import type { ClusterConfig } from '../cluster/config.js';
import { ClusterStore } from '../cluster/etcd/store.js';
import { clientTlsFor } from '../cluster/credentials.js';
import { ConnectionPool, LogicalVolumeDevice } from './logical-volume.js';

export interface GatewayOptions {
  /** A TCP address, or a listening socket handed over by systemd (socket activation). */
  listen: { host: string; port: number } | { fd: number };
  /** How long a request waits for a master before it fails with EIO. */
  retryMs?: number;
  /** NBD STARTTLS on the gateway's own listener (docs/SECURITY.md). */
  tls?: ServerTls;
  /** Who may attach the logical volumes (util/allow-list.ts). */
  allow?: string[];
}

export class Gateway {
  private constructor(
    readonly nbd: NbdServer,
    readonly address: string,
    private readonly store: ClusterStore,
    private readonly pool: ConnectionPool,
  ) {}

  static async start(config: ClusterConfig, opts: GatewayOptions, log: Logger): Promise<Gateway> {
    if (!config.etcd) throw new Error(`${config.source}: a gateway needs the etcd: section (it finds each volume's master there)`);
    const store = await ClusterStore.connect(config.etcd, log);
    // A storage system with tls: mode allow or require gets STARTTLS with the cluster's client credential.
    const tlsFor = (addr: string) => {
      const ss = config.storageSystems.find((s) => `${s.nbd.host.includes(':') ? `[${s.nbd.host}]` : s.nbd.host}:${s.nbd.port}` === addr);
      return ss ? clientTlsFor(config, ss.id) : undefined;
    };
    const pool = new ConnectionPool(Math.max(1000, config.peerTimeout), tlsFor);
    const exports = new ExportTable();
    const allow = opts.allow?.length ? { allow: new AllowList(opts.allow) } : {};
    const add = () => {
      for (const lv of store.tables.logicalVolumes.values()) {
        if (exports.get(lv.name)) continue;
        exports.add({
          name: lv.name,
          description: `logical volume ${lv.name} (${lv.mode}), through a gateway`,
          device: new LogicalVolumeDevice(lv.name, lv.size, store, pool, log, opts.retryMs),
          readOnly: false,
          ...allow,
        });
      }
    };
    add();
    // A logical volume added at run time is served from then on.
    store.on('change', add);
    const nbd = new NbdServer({ exports, log, ...(opts.tls ? { tls: opts.tls } : {}) });
    let address: string;
    try {
      address = await nbd.listen('fd' in opts.listen ? { kind: 'fd', fd: opts.listen.fd } : { kind: 'tcp', ...opts.listen });
    } catch (e) {
      await store.close();
      const where = 'fd' in opts.listen ? `the socket systemd passed (fd ${opts.listen.fd})` : `${opts.listen.host}:${opts.listen.port}`;
      throw new Error(`gateway: cannot listen on ${where}: ${(e as Error).message}`, { cause: e });
    }
    log.info({ nbd: address, volumes: [...store.tables.logicalVolumes.keys()] }, `gateway serving NBD on ${address}`);
    return new Gateway(nbd, address, store, pool);
  }

  async close(): Promise<void> {
    await this.nbd.close();
    await this.pool.close();
    await this.store.close();
  }
}

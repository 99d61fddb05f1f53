// `blockmirror up -c FILE [--only IDS]`: start the storage systems of a YAML
// file, each with its NBD exports and its admin API, until SIGTERM/SIGINT.
// SIGHUP reads FILE again and applies what changed (cluster/reconfigure.ts), as
// `blockmirror apply` does through the admin API.
import type { Command } from 'commander';
import type { Logger } from 'pino';
import type { AdminServer } from '../admin/server.js';
import type { ClusterConfig } from '../cluster/config.js';
import type { ClusterAgent } from '../cluster/etcd/agent.js';
import type { StorageSystem } from '../controller/storage-system.js';
import { UsageError } from './errors.js';
import { addressInUse, addressInUseError, yamlKeyOf } from './listen-error.js';
import { cliLogger } from './logger.js';
import { catchStopSignals } from './signals.js';

export function registerUpCommand(program: Command): void {
  program
    .command('up')
    .description('start the storage systems of a YAML config (all, or those of --only)')
    .requiredOption('-c, --config <file>', 'cluster YAML (see config/)')
    .option('--only <ids>', 'comma-separated storage system ids to run in this process, e.g. 1,3')
    .option('--no-cfs', 'do not run the CFS server here even if the YAML has cfs: (run it with `cfs serve`)')
    .action(async (opts: { config: string; only?: string; cfs?: boolean }, cmd: Command) => {
      const log = await cliLogger(cmd);
      await up(opts, log);
    });
}

export function parseOnly(text: string): number[] {
  const ids = text.split(',').map((s) => s.trim());
  if (ids.some((s) => !/^\d+$/.test(s))) throw new UsageError(`--only: expected comma-separated storage system ids, e.g. 1,3 (got "${text}")`);
  return ids.map(Number);
}

async function up(opts: { config: string; only?: string; cfs?: boolean }, log: Logger): Promise<void> {
  // From the first moment: a SIGHUP while starting (its default would end the process) is kept
  // and applied once the storage systems are up.
  let onHup: (() => void) | null = null;
  let hupWaiting = false;
  process.on('SIGHUP', () => {
    if (onHup) onHup();
    else hupWaiting = true;
  });
  // And a SIGTERM or SIGINT stops it gracefully once it is up (a second one exits at once).
  const stop = catchStopSignals(log);
  // Loaded here, not at the top: `serve` and `--help` need none of the controller, fastify or the YAML stack.
  const [{ startAdminServer }, { ConfigError, loadConfig }, { ClusterError, selectIds, startStorageSystems }, { clientAdminToken, serverAdminToken }] = await Promise.all([
    import('../admin/server.js'),
    import('../cluster/config.js'),
    import('../cluster/cluster.js'),
    import('../cluster/admin-token.js'),
  ]);
  let systems: StorageSystem[] = [];
  const admins: AdminServer[] = [];
  let cfsServer: { close(): Promise<void> } | undefined;
  let agent: ClusterAgent | undefined;
  let config: ClusterConfig | undefined;
  let ids: number[] = [];
  let reconfigurer: import('../cluster/reconfigure.js').ClusterReconfigurer | undefined;
  try {
    const cfg = loadConfig(opts.config);
    config = cfg;
    ids = selectIds(cfg, opts.only ? parseOnly(opts.only) : undefined);
    if (config.etcd) {
      // With etcd (docs/cluster.md): masters are fenced until registered, and fail over by themselves.
      const { ClusterAgent: Agent } = await import('../cluster/etcd/agent.js');
      const a = await Agent.connect(config, log);
      agent = a;
      systems = await startStorageSystems(config, ids, log, a.hooks);
      await a.attach(systems);
    } else systems = await startStorageSystems(config, ids, log);
    // Every admin API needs a token (docs/SECURITY.md); made on first start where the CLI finds it.
    const tokens = new Map<number, string>();
    for (const id of ids) {
      const t = serverAdminToken(config, id);
      tokens.set(id, t.token);
      if (t.note) log.warn(t.note);
    }
    const sec = config.security;
    const { adminClientCa, adminServerTls } = await import('../cluster/credentials.js');
    // Each dashboard shows the whole cluster: it asks every storage system of the file, with its token if known here.
    const peersOf = (c: ClusterConfig) => {
      const ca = adminClientCa(c);
      return c.storageSystems.map((s) => {
        const token = tokens.get(s.id) ?? clientAdminToken(c, s.id);
        return { id: s.id, host: s.admin.host, port: s.admin.port, ...(token ? { token } : {}), ...(ca ? { ca } : {}) };
      });
    };
    // One list shared by every dashboard of this process, updated in place by apply (a storage system added at run time shows at once).
    const peersTls = peersOf(cfg);
    const { ClusterReconfigurer } = await import('../cluster/reconfigure.js');
    const ag = agent;
    reconfigurer = new ClusterReconfigurer(cfg, opts.config, systems, log, async (next) => {
      peersTls.splice(0, peersTls.length, ...peersOf(next));
      await ag?.reconfigured(next);
    });
    for (const ss of systems) {
      const a = config.storageSystems.find((s) => s.id === ss.spec.id)!.admin;
      const auth = { token: tokens.get(ss.spec.id)!, readOpen: sec.adminReadOpen, hosts: sec.adminHosts };
      const https = adminServerTls(cfg, ss.spec.id);
      const etcd = agent ? { etcd: agent.view.bind(agent) } : {};
      admins.push(await startAdminServer(ss, { host: a.host, port: a.port, log: log.child({ ss: ss.spec.id }), peers: peersTls, auth, config: reconfigurer, ...(https ? { https } : {}), ...etcd }));
    }
    // The CFS server (docs/cfs.md) runs in the process of the storage system cfs.ss names.
    if (config.cfs && opts.cfs !== false && ids.includes(config.cfs.ss)) {
      const { CfsServer } = await import('../cfs/server.js');
      const { livePairs } = await import('./status.js');
      const { cfsServerTls } = await import('../cluster/credentials.js');
      const tls = cfsServerTls(cfg);
      cfsServer = await CfsServer.start(cfg, log, { pairView: () => livePairs(cfg, 1000), ...(tls ? { tls } : {}) });
    }
  } catch (e) {
    await agent?.close().catch(() => {});
    await cfsServer?.close().catch(() => {});
    await Promise.all(admins.map((a) => a.close().catch(() => {})));
    await Promise.all(systems.map((s) => s.close().catch(() => {})));
    if (e instanceof ConfigError || e instanceof ClusterError || (e as Error).name === 'EtcdUnreachableError') throw new UsageError((e as Error).message);
    const inUse = addressInUse(e);
    const key = inUse && config && yamlKeyOf(config, ids, inUse);
    if (inUse && key) throw addressInUseError(`${opts.config}: ${key}`, inUse, `change the port of ${key}`, e);
    throw e;
  }
  for (let i = 0; i < systems.length; i++) {
    log.info({ ss: systems[i]!.spec.id, nbd: systems[i]!.nbdAddr, admin: admins[i]!.address }, `storage system ${systems[i]!.spec.id} up`);
  }
  const r = reconfigurer!;
  onHup = () => {
    log.info(`SIGHUP: reading ${opts.config} again`);
    r.apply(undefined, { dryRun: false }).then(
      (res) => log.info({ changes: res.changes, notes: res.notes }, res.changes.length ? `SIGHUP: applied ${res.changes.length} change(s)` : 'SIGHUP: no changes'),
      (e: Error) => log.error({ err: e.message }, `SIGHUP: nothing applied: ${e.message}`),
    );
  };
  if (hupWaiting) onHup();
  await stop.until(async () => {
    await agent?.close();
    await cfsServer?.close();
    await Promise.all(admins.map((a) => a.close()));
    await Promise.all(systems.map((s) => s.close()));
  });
}

// `blockmirror gateway -c FILE --listen HOST:PORT`: a stateless NBD front end that exports every
// logical volume of an etcd-backed cluster by name and follows its master across failovers.
// `blockmirror etcd dump -c FILE`: print the cluster tables as etcd holds them.
import type { Command } from 'commander';
import type { Logger } from 'pino';
import { UsageError } from './errors.js';
import { addressInUse, addressInUseError } from './listen-error.js';
import { parseListen } from './serve.js';
import { cliLogger } from './logger.js';
import { catchStopSignals } from './signals.js';
import { socketActivationFds } from './socket-activation.js';
import { addTlsOptions, serverTlsOptions, type TlsCliOptions } from './tls-options.js';
import { loadConfigOrUsage } from './status.js';

interface GatewayCliOptions extends TlsCliOptions {
  config: string;
  listen: string;
  retry: string;
}

export function registerGatewayCommand(program: Command): void {
  const command = program
    .command('gateway')
    .description('serve every logical volume of an etcd-backed cluster over NBD, following each one\'s master')
    .requiredOption('-c, --config <file>', 'cluster YAML with an etcd: section')
    .option('--listen <host:port>', 'TCP address to listen on (under systemd socket activation, the socket systemd passes instead)', '127.0.0.1:10810')
    .option('--retry <ms>', 'how long a request waits for a master before it fails', '60000');
  addTlsOptions(command).action(async (opts: GatewayCliOptions, cmd: Command) => {
      const log = await cliLogger(cmd);
      await gateway(opts, log);
    });

  const etcd = program.command('etcd').description('look at the cluster tables in etcd');
  etcd
    .command('dump')
    .description('print the storage systems, logical volumes, mirrors, pair states and failover history held in etcd')
    .requiredOption('-c, --config <file>', 'cluster YAML with an etcd: section')
    .option('--json', 'machine-readable output')
    .action(async (opts: { config: string; json?: boolean }) => {
      const config = await loadConfigOrUsage(opts.config);
      if (!config.etcd) throw new UsageError(`${opts.config} has no etcd: section; the YAML alone describes this cluster`);
      const [{ ClusterStore, EtcdUnreachableError }, { pino }] = await Promise.all([import('../cluster/etcd/store.js'), import('pino')]);
      let store;
      try {
        store = await ClusterStore.connect(config.etcd, pino({ level: 'silent' }));
      } catch (e) {
        if (e instanceof EtcdUnreachableError) throw new UsageError(e.message);
        throw e;
      }
      try {
        const t = await store.reload();
        const obj = {
          storageSystems: [...t.storageSystems.values()],
          logicalVolumes: [...t.logicalVolumes.values()].map(({ revision: _r, ...lv }) => lv),
          mirrors: Object.fromEntries(t.mirrors),
          pairs: Object.fromEntries(t.pairs),
          history: t.history,
        };
        process.stdout.write(opts.json ? `${JSON.stringify(obj, null, 2)}\n` : renderDump(obj));
      } finally {
        await store.close();
      }
    });
}

async function gateway(opts: GatewayCliOptions, log: Logger): Promise<void> {
  const config = await loadConfigOrUsage(opts.config);
  if (!config.etcd) throw new UsageError(`${opts.config} has no etcd: section; a gateway finds each volume's master in etcd (config/etcd.yaml is an example)`);
  // Under systemd socket activation (targets/blockmirror-gateway.socket) the socket unit's
  // ListenStream= is the address and --listen is not used.
  const activated = socketActivationFds();
  if (activated.length > 1) throw new UsageError(`socket activation: a gateway listens on one socket, systemd passed ${activated.length} (keep one ListenStream= in the .socket unit)`);
  const listen = activated.length === 1 ? { fd: activated[0]! } : parseListen(opts.listen);
  const tls = serverTlsOptions(opts, 'fd' in listen ? [] : [listen]);
  const retryMs = Number(opts.retry);
  if (!Number.isInteger(retryMs) || retryMs < 100) throw new UsageError(`--retry: expected milliseconds (at least 100), got "${opts.retry}"`);
  const [{ Gateway }, { EtcdUnreachableError }] = await Promise.all([import('../gateway/gateway.js'), import('../cluster/etcd/store.js')]);
  const stop = catchStopSignals(log);
  let gw;
  try {
    gw = await Gateway.start(config, { listen, retryMs, ...(tls ? { tls } : {}), ...(opts.allow?.length ? { allow: opts.allow } : {}) }, log);
  } catch (e) {
    if (e instanceof EtcdUnreachableError) throw new UsageError(e.message);
    const inUse = addressInUse(e);
    if (inUse) throw addressInUseError('--listen', inUse, 'choose another --listen', e);
    throw e;
  }
  if ('fd' in listen && !gw.address.startsWith('/')) {
    // The socket's address is known only now: the same rule as --listen, an exposed TCP listener needs TLS.
    try {
      serverTlsOptions(opts, [parseListen(gw.address)]);
    } catch (e) {
      await gw.close();
      throw new UsageError(`the socket systemd passed, ${(e as Error).message.replace(/^--listen /, '')}`);
    }
  }
  await stop.until(() => gw.close());
}

interface Dump {
  storageSystems: { id: number; nbd: string; admin: string }[];
  logicalVolumes: { name: string; master: { ss: number; vol: number }; epoch: number; mode: string }[];
  pairs: Record<string, { state: string }>;
  history: { name: string; at: string; epoch: number; from: { ss: number; vol: number }; to: { ss: number; vol: number }; reason: string }[];
}

function renderDump(d: Dump): string {
  const out: string[] = ['STORAGE SYSTEMS (registered, leased)'];
  for (const s of d.storageSystems) out.push(`  ${s.id}  nbd ${s.nbd}  admin ${s.admin}`);
  if (d.storageSystems.length === 0) out.push('  (none)');
  out.push('', 'LOGICAL VOLUMES');
  for (const lv of d.logicalVolumes) out.push(`  ${lv.name}  master ss${lv.master.ss}/vol${lv.master.vol}  epoch ${lv.epoch}  ${lv.mode}  ${d.pairs[lv.name]?.state ?? '-'}`);
  if (d.logicalVolumes.length === 0) out.push('  (none)');
  out.push('', 'FAILOVER HISTORY');
  for (const h of d.history) out.push(`  ${h.at}  ${h.name}  epoch ${h.epoch}  ss${h.from.ss}/vol${h.from.vol} -> ss${h.to.ss}/vol${h.to.vol}  ${h.reason}`);
  if (d.history.length === 0) out.push('  (none)');
  return `${out.join('\n')}\n`;
}

// A listen address another process holds: the message names the address, the option or YAML key
// that set it, and what to do. Lower layers wrap the socket error (`admin API: cannot listen on
// ...`, with `cause`), so the EADDRINUSE is looked for down the cause chain.
import type { ClusterConfig, HostPort } from '../cluster/config.js';

export class AddressInUseError extends Error {
  override readonly name = 'AddressInUseError';
  readonly code = 'EADDRINUSE';
}

/** The address of the EADDRINUSE somewhere in `e`'s cause chain. */
export function addressInUse(e: unknown): HostPort | undefined {
  for (let c: unknown = e, depth = 0; c instanceof Error && depth < 8; c = c.cause, depth++) {
    const err = c as NodeJS.ErrnoException & { address?: string; port?: number };
    if (err.code === 'EADDRINUSE' && typeof err.port === 'number') return { host: err.address ?? '', port: err.port };
  }
  return undefined;
}

/** `where`: what set the address (`--listen`, `config.yaml: storageSystems[0].nbd`); `fix`: how to change it. */
export function addressInUseError(where: string, at: HostPort, fix: string, cause: unknown): AddressInUseError {
  const hp = at.host.includes(':') ? `[${at.host}]:${at.port}` : `${at.host}:${at.port}`;
  return new AddressInUseError(
    `${where}: ${hp} is already in use by another process; stop that process (ss -ltnp 'sport = :${at.port}' shows it) or ${fix}`,
    { cause },
  );
}

/** The YAML key whose address is `at`, among the storage systems this process runs and the CFS server. */
export function yamlKeyOf(config: ClusterConfig, ids: number[], at: HostPort): string | undefined {
  const keys: { key: string; hp: HostPort }[] = [];
  config.storageSystems.forEach((s, i) => {
    if (!ids.includes(s.id)) return;
    keys.push({ key: `storageSystems[${i}].nbd`, hp: s.nbd }, { key: `storageSystems[${i}].admin`, hp: s.admin });
    if (s.peer) keys.push({ key: `storageSystems[${i}].peer`, hp: s.peer });
    if (s.iscsi) keys.push({ key: `storageSystems[${i}].iscsi`, hp: s.iscsi.listen });
  });
  if (config.cfs) keys.push({ key: 'cfs.listen', hp: config.cfs.listen });
  const samePort = keys.filter((k) => k.hp.port === at.port);
  return (samePort.find((k) => k.hp.host === at.host) ?? samePort[0])?.key;
}

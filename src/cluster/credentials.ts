// Credentials named by the YAML, read once when a storage system (or a gateway, or the CFS)
// starts. Files with loose permissions are used but reported, once, by the caller's log.
import fs from 'node:fs';
import type { PeerTls } from '../controller/peer/link.js';
import type { ServerTls, ClientTls } from '../nbd/tls.js';
import { looseWarning, parsePskFile, readSecretFile, SecretFileError } from '../util/secrets.js';
import type { ClusterConfig } from './config.js';
import { peerTlsConfigured } from './config-security.js';


export interface Credentials {
  /** NBD STARTTLS on the host-facing listener. */
  nbd?: ServerTls;
  /** Mutual TLS on the peer channel (control and replication data). */
  peer?: PeerTls;
  /** Loose permissions and the like: logged once at start. */
  warnings: string[];
}

function readPublic(file: string, what: string): Buffer {
  try {
    return fs.readFileSync(file);
  } catch (e) {
    throw new SecretFileError(`cannot read the ${what} ${file}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`, { cause: e });
  }
}

function readKey(file: string, what: string, warnings: string[]): Buffer {
  const f = readSecretFile(file, what);
  if (f.loose) warnings.push(looseWarning(file, what));
  return Buffer.from(f.text);
}

export function credentialsFor(config: ClusterConfig, ssId: number): Credentials {
  const ss = config.storageSystems.find((s) => s.id === ssId);
  const warnings: string[] = [];
  const out: Credentials = { warnings };
  const tls = ss?.tls;
  if (!tls) return out;
  const cert = tls.cert ? readPublic(tls.cert, 'certificate') : undefined;
  const key = tls.key ? readKey(tls.key, 'private key', warnings) : undefined;
  const ca = config.security.ca ? readPublic(config.security.ca, 'CA certificate') : undefined;
  let psk: Map<string, Buffer> | undefined;
  if (tls.pskFile) {
    const f = readSecretFile(tls.pskFile, 'psk file');
    if (f.loose) warnings.push(looseWarning(tls.pskFile, 'psk file'));
    psk = parsePskFile(f.text, tls.pskFile);
  }
  if (tls.mode !== 'off') {
    out.nbd = {
      mode: tls.mode,
      verifyClients: tls.verifyClients,
      credentials: { ...(cert ? { cert } : {}), ...(key ? { key } : {}), ...(ca ? { ca } : {}), ...(psk ? { psk } : {}) },
    };
  }
  if (peerTlsConfigured(config, ssId)) out.peer = { cert: cert!, key: key!, ca: ca! };
  return out;
}

/** What our own NBD clients present to the storage systems of this cluster (gateways, the CFS). */
export function clientTlsFor(config: ClusterConfig, ssId: number): ClientTls | undefined {
  const ss = config.storageSystems.find((s) => s.id === ssId);
  if (!ss?.tls || ss.tls.mode === 'off') return undefined;
  const ca = config.security.ca ? readPublic(config.security.ca, 'CA certificate') : undefined;
  const c = config.security.client;
  return {
    ...(ca ? { ca } : {}),
    ...(c ? { cert: readPublic(c.cert, 'client certificate'), key: Buffer.from(readSecretFile(c.key, 'client private key').text) } : {}),
  };
}

/** cfs.tls: the certificate and key of the storage system that runs the CFS server. */
export function cfsServerTls(config: ClusterConfig): { cert: Buffer; key: Buffer } | undefined {
  const cfs = config.cfs;
  if (!cfs?.tls) return undefined;
  const ss = config.storageSystems.find((s) => s.id === cfs.ss)!;
  return { cert: readPublic(ss.tls!.cert!, 'certificate'), key: Buffer.from(readSecretFile(ss.tls!.key!, 'private key').text) };
}

/** cfs.tls: the CA the clients check the CFS server's certificate against. */
export function cfsClientCa(config: ClusterConfig): Buffer | undefined {
  return config.cfs?.tls && config.security.ca ? readPublic(config.security.ca, 'CA certificate') : undefined;
}

/** security.adminTls: this storage system's certificate and key for HTTPS. */
export function adminServerTls(config: ClusterConfig, ssId: number): { cert: Buffer; key: Buffer } | undefined {
  if (!config.security.adminTls) return undefined;
  const ss = config.storageSystems.find((s) => s.id === ssId)!;
  return { cert: readPublic(ss.tls!.cert!, 'certificate'), key: Buffer.from(readSecretFile(ss.tls!.key!, 'private key').text) };
}

/** security.adminTls: the CA admin clients check the servers' certificates against. */
export function adminClientCa(config: ClusterConfig): Buffer | undefined {
  return config.security.adminTls && config.security.ca ? readPublic(config.security.ca, 'CA certificate') : undefined;
}

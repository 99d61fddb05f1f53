// The `security:` section and each storage system's `tls:` and `allow:` (docs/SECURITY.md):
// building them with absolute paths, and the checks that refuse an exposed cluster.
//
//   listener on a non-loopback address   needs                                  unless
//   storageSystems[].nbd                 tls.mode: require                      security.insecure
//   storageSystems[].peer                security.ca and the SS's tls cert/key   security.insecure
//   storageSystems[].iscsi               iscsiChap or iscsiChapFile             security.insecure
//   cfs.listen                           cfs.tokenFile and cfs.tls              security.insecure
//   storageSystems[].admin               nothing more: every call needs the admin token (HTTPS with security.adminTls)
import net from 'node:net';
import path from 'node:path';
import type { ClusterConfig, HostPort, Parsed, RawProblem, SecurityConfig, Segment } from './config.js';

export function buildSecurity(p: Parsed, config: ClusterConfig, baseDir: string): SecurityConfig {
  const s = p.security ?? {};
  const out: SecurityConfig = { insecure: s.insecure ?? false, adminHosts: s.adminHosts ?? [], adminReadOpen: s.adminReadOpen ?? false, adminTls: s.adminTls ?? false };
  if (s.ca !== undefined) out.ca = path.resolve(baseDir, s.ca);
  if (s.adminTokenFile !== undefined) out.adminTokenFile = path.resolve(baseDir, s.adminTokenFile);
  if (s.client !== undefined) out.client = { cert: path.resolve(baseDir, s.client.cert), key: path.resolve(baseDir, s.client.key) };
  void config;
  return out;
}

export function isLoopback(host: string): boolean {
  if (host === 'localhost') return true;
  if (net.isIPv4(host)) return host.startsWith('127.');
  return host === '::1';
}

/** Mutual TLS on the peer channel: the cluster CA and this storage system's certificate. */
export function peerTlsConfigured(config: ClusterConfig, ssId: number): boolean {
  const ss = config.storageSystems.find((s) => s.id === ssId);
  return config.security.ca !== undefined && ss?.tls?.cert !== undefined && ss.tls.key !== undefined;
}

export function checkSecurity(config: ClusterConfig, problems: RawProblem[]): void {
  const report = (at: Segment[], message: string) => problems.push({ path: at, message });
  const sec = config.security;
  const insecureHint = 'or set security.insecure: true to accept the risk (docs/SECURITY.md)';
  const show = (hp: HostPort) => (hp.host.includes(':') ? `[${hp.host}]:${hp.port}` : `${hp.host}:${hp.port}`);
  const spans = config.pairs.filter((p) => p.mirrors.some((m) => m.ss !== p.master.ss));
  const peered = new Set(spans.flatMap((p) => [p.master, ...p.mirrors].map((r) => r.ss)));

  config.storageSystems.forEach((ss, i) => {
    const tls = ss.tls;
    if (tls) {
      if ((tls.cert === undefined) !== (tls.key === undefined)) report(['storageSystems', i, 'tls'], 'give cert and key together (the certificate and its private key)');
      if (tls.mode !== 'off' && tls.cert === undefined && tls.pskFile === undefined) {
        report(['storageSystems', i, 'tls', 'mode'], `TLS mode ${tls.mode} needs a credential: cert and key, or pskFile`);
      }
      if (tls.verifyClients && sec.ca === undefined && tls.pskFile === undefined) {
        report(['storageSystems', i, 'tls', 'verifyClients'], 'verifyClients needs security.ca (the CA that signs client certificates) or a pskFile');
      }
    }
    if (sec.adminTls && (tls?.cert === undefined || sec.ca === undefined)) {
      report(['storageSystems', i, 'tls'], `security.adminTls serves the admin API over HTTPS with each storage system's certificate: storage system ${ss.id} needs tls.cert and tls.key, and security.ca for the clients`);
    }
    if (sec.ca !== undefined && peered.has(ss.id) && (tls?.cert === undefined || tls.key === undefined)) {
      report(['storageSystems', i, 'tls'], `security.ca turns on mutual TLS between storage systems: storage system ${ss.id} needs tls.cert and tls.key (a certificate with CN=ss${ss.id} signed by that CA)`);
    }
    if (sec.insecure) return;
    if (!isLoopback(ss.nbd.host) && tls?.mode !== 'require') {
      report(['storageSystems', i, 'nbd'], `NBD on ${show(ss.nbd)} is reachable from other hosts without TLS: set tls: {mode: require, ...} ${insecureHint}`);
    }
    if (ss.peer && !isLoopback(ss.peer.host) && !(sec.ca !== undefined && tls?.cert !== undefined)) {
      report(['storageSystems', i, 'peer'], `the peer channel on ${show(ss.peer)} is reachable from other hosts without mutual TLS: set security.ca and this storage system's tls.cert and tls.key ${insecureHint}`);
    }
    if (ss.iscsi && !isLoopback(ss.iscsi.listen.host) && ss.iscsi.chapFile === undefined && ss.iscsi.chap === undefined) {
      report(['storageSystems', i, 'iscsi'], `iSCSI on ${show(ss.iscsi.listen)} is reachable from other hosts without CHAP: set iscsiChap or iscsiChapFile ${insecureHint}`);
    }
  });
  const cfs = config.cfs;
  if (cfs?.tls) {
    const runner = config.storageSystems.find((s) => s.id === cfs.ss);
    if (!runner?.tls?.cert || sec.ca === undefined) report(['cfs', 'tls'], `cfs.tls serves the certificate of storage system ${cfs.ss} (the one running the CFS server): it needs tls.cert and tls.key, and security.ca for the clients to check it`);
  }
  if (cfs && !sec.insecure && !isLoopback(cfs.listen.host) && (cfs.tokenFile === undefined || !cfs.tls)) {
    report(['cfs', 'listen'], `the CFS server on ${show(cfs.listen)} is reachable from other hosts without client authentication over TLS: set cfs.tokenFile and cfs.tls ${insecureHint}`);
  }
}

// The NBD TLS and access options of `serve` and `gateway`, named as nbdkit names them, and the
// server policy they make (docs/SECURITY.md).
import fs from 'node:fs';
import path from 'node:path';
import type { Command } from 'commander';
import { isLoopback } from '../cluster/config-security.js';
import type { ServerTls } from '../nbd/tls.js';
import { allowEntryProblem } from '../util/allow-list.js';
import { parsePskFile, SecretFileError } from '../util/secrets.js';
import { UsageError } from './errors.js';

export interface TlsCliOptions {
  tls?: string;
  tlsCertificates?: string;
  tlsPsk?: string;
  tlsVerifyPeer?: boolean;
  allow?: string[];
  insecure?: boolean;
}

export function addTlsOptions(cmd: Command): Command {
  return cmd
    .option('--tls <mode>', 'NBD STARTTLS: off, allow (also "on", as nbdkit says) or require', 'off')
    .option('--tls-certificates <dir>', 'server-cert.pem and server-key.pem (and ca-cert.pem for --tls-verify-peer), as nbdkit and qemu lay them out')
    .option('--tls-psk <file>', 'TLS-PSK keys, one IDENTITY:HEXKEY per line (psktool makes them)')
    .option('--tls-verify-peer', 'require a client certificate signed by DIR/ca-cert.pem, or a PSK')
    .option('--allow <entry...>', 'NBD clients allowed: addresses, subnets (10.0.0.0/8) and TLS identities (* wildcard)')
    .option('--insecure', 'listen on a non-loopback address without --tls require');
}

/** The --tls options as a server policy; refuses what cannot work, and an exposed listener without TLS. */
export function serverTlsOptions(opts: TlsCliOptions, listeners: { host: string; port: number }[]): ServerTls | undefined {
  const mode = opts.tls === 'on' ? 'allow' : opts.tls;
  if (mode !== 'off' && mode !== 'allow' && mode !== 'require') throw new UsageError(`--tls: expected off, allow or require, got "${opts.tls}"`);
  for (const e of opts.allow ?? []) {
    const problem = allowEntryProblem(e);
    if (problem) throw new UsageError(`--allow: ${problem}`);
  }
  const exposed = listeners.find((l) => !isLoopback(l.host));
  if (exposed && mode !== 'require' && !opts.insecure) {
    throw new UsageError(`--listen ${exposed.host}:${exposed.port} is reachable from other hosts without TLS: add --tls require with --tls-certificates or --tls-psk, or --insecure to accept the risk`);
  }
  if (mode === 'off') return undefined;
  if (!opts.tlsCertificates && !opts.tlsPsk) throw new UsageError(`--tls ${opts.tls} needs --tls-certificates DIR or --tls-psk FILE`);
  const read = (f: string, what: string) => {
    try {
      return fs.readFileSync(f);
    } catch (e) {
      throw new UsageError(`cannot read the ${what} ${f}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`);
    }
  };
  const credentials: ServerTls['credentials'] = {};
  if (opts.tlsCertificates) {
    const d = opts.tlsCertificates;
    credentials.cert = read(path.join(d, 'server-cert.pem'), 'certificate');
    credentials.key = read(path.join(d, 'server-key.pem'), 'private key');
    if (opts.tlsVerifyPeer) credentials.ca = read(path.join(d, 'ca-cert.pem'), 'CA certificate');
  }
  if (opts.tlsPsk) {
    try {
      credentials.psk = parsePskFile(read(opts.tlsPsk, 'psk file').toString('utf8'), opts.tlsPsk);
    } catch (e) {
      if (e instanceof SecretFileError) throw new UsageError(e.message);
      throw e;
    }
  }
  return { mode, credentials, verifyClients: opts.tlsVerifyPeer === true };
}


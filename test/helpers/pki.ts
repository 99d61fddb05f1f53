// Test credentials made with openssl: a cluster CA, certificates for servers (storage systems,
// with SANs for loopback), clients and storage-system identities, a foreign CA whose
// certificates must be refused, and PSK files in the `identity:hexkey` format of nbdkit and qemu.
//
// A directory per client holds the file names libnbd, qemu and nbdkit look for:
// ca-cert.pem, client-cert.pem, client-key.pem (and server-cert.pem, server-key.pem).
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

export interface Pki {
  dir: string;
  ca: string;
  /** Cert and key files of `name`, signed by the CA (or by the foreign CA for names starting "foreign-"). */
  cert(name: string): { cert: string; key: string };
  /** A directory in libnbd/qemu layout for a client named `name` (ca-cert.pem from the cluster CA). */
  clientDir(name: string): string;
  /** Writes a psk file with these identities (random keys unless given) and returns its path and keys. */
  pskFile(file: string, ids: Record<string, string | undefined>): { path: string; keys: Record<string, string> };
  cleanup(): void;
}

const openssl = (args: string[], cwd: string) => execFileSync('openssl', args, { cwd, stdio: ['ignore', 'pipe', 'pipe'] });

function makeCa(dir: string, name: string): void {
  openssl(['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-days', '30', '-subj', `/CN=${name}`,
    '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign,cRLSign',
    '-keyout', `${name}-key.pem`, '-out', `${name}.pem`], dir);
}

export function makePki(): Pki {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bm-pki-'));
  makeCa(dir, 'ca');
  makeCa(dir, 'foreign-ca');
  const made = new Map<string, { cert: string; key: string }>();
  const cert = (name: string) => {
    let c = made.get(name);
    if (c) return c;
    const issuer = name.startsWith('foreign-') ? 'foreign-ca' : 'ca';
    const cn = name.replace(/^foreign-/, '');
    const ext = path.join(dir, `${name}.ext`);
    fs.writeFileSync(ext, [
      'basicConstraints=critical,CA:FALSE',
      'keyUsage=critical,digitalSignature,keyEncipherment',
      'extendedKeyUsage=serverAuth,clientAuth',
      `subjectAltName=DNS:localhost,DNS:${cn},IP:127.0.0.1,IP:::1`,
    ].join('\n'));
    openssl(['req', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-subj', `/CN=${cn}`, '-keyout', `${name}-key.pem`, '-out', `${name}.csr`], dir);
    openssl(['x509', '-req', '-in', `${name}.csr`, '-CA', `${issuer}.pem`, '-CAkey', `${issuer}-key.pem`, '-CAcreateserial', '-days', '30', '-extfile', ext, '-out', `${name}.pem`], dir);
    fs.chmodSync(path.join(dir, `${name}-key.pem`), 0o600);
    c = { cert: path.join(dir, `${name}.pem`), key: path.join(dir, `${name}-key.pem`) };
    made.set(name, c);
    return c;
  };
  return {
    dir,
    ca: path.join(dir, 'ca.pem'),
    cert,
    clientDir(name) {
      const d = path.join(dir, `client-${name}`);
      if (fs.existsSync(d)) return d;
      fs.mkdirSync(d);
      const c = cert(name);
      fs.copyFileSync(path.join(dir, 'ca.pem'), path.join(d, 'ca-cert.pem'));
      fs.copyFileSync(c.cert, path.join(d, 'client-cert.pem'));
      fs.copyFileSync(c.key, path.join(d, 'client-key.pem'));
      fs.chmodSync(path.join(d, 'client-key.pem'), 0o600);
      return d;
    },
    pskFile(file, ids) {
      const keys: Record<string, string> = {};
      for (const [id, k] of Object.entries(ids)) keys[id] = k ?? randomBytes(32).toString('hex');
      const p = path.join(dir, file);
      fs.mkdirSync(path.dirname(p), { recursive: true });
      fs.writeFileSync(p, Object.entries(keys).map(([id, k]) => `${id}:${k}\n`).join(''), { mode: 0o600 });
      return { path: p, keys };
    },
    cleanup: () => fs.rmSync(dir, { recursive: true, force: true }),
  };
}

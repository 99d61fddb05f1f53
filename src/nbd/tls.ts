// TLS for NBD (NBD_OPT_STARTTLS), both ends, with X.509 certificates and TLS-PSK on one port.
//
// What Node's TLSSocket needs to interoperate with GnuTLS clients (libnbd, qemu, nbd-client):
//   - TLS_AES_128_GCM_SHA256 first, with honorCipherOrder: else the PSK binder check fails;
//   - a sessionIdContext, or OpenSSL refuses client certificates ("session id context uninitialized");
//   - ssl.verifyError() to check a client certificate: a TLSSocket made by hand never sets .authorized;
//   - "no certificate and no PSK" refused explicitly: GnuTLS sends no certificate at all when the
//     server's CA is not one it has a certificate from.
//
// A client's identity, which access lists match, is its PSK identity or its certificate's CN.
import tls from 'node:tls';
import type { Socket } from 'node:net';

export type TlsMode = 'off' | 'allow' | 'require';

export interface TlsCredentials {
  cert?: Buffer;
  key?: Buffer;
  /** Verifies client certificates (server) or the server's certificate (client). */
  ca?: Buffer;
  /** identity -> key (server: every client's; client: one entry, the identity it presents). */
  psk?: Map<string, Buffer>;
}

export interface ServerTls {
  mode: TlsMode;
  credentials: TlsCredentials;
  /** Require a client certificate signed by `ca`, or a PSK. */
  verifyClients: boolean;
}

export class TlsRefused extends Error {
  override readonly name = 'TlsRefused';
}

const CIPHERS = ['TLS_AES_128_GCM_SHA256', 'TLS_AES_256_GCM_SHA384', 'TLS_CHACHA20_POLY1305_SHA256', tls.DEFAULT_CIPHERS, 'PSK'].join(':');

/** A server context built once per listener: credentials are parsed at start, not per client. */
export class TlsServer {
  private readonly context: tls.SecureContext;

  constructor(readonly policy: ServerTls) {
    const c = policy.credentials;
    this.context = tls.createSecureContext({
      ...(c.cert ? { cert: c.cert } : {}),
      ...(c.key ? { key: c.key } : {}),
      ...(c.ca ? { ca: c.ca } : {}),
      ciphers: CIPHERS,
      honorCipherOrder: true,
      minVersion: 'TLSv1.2',
      sessionIdContext: 'blockmirror-nbd',
    });
  }

  /** Run the TLS handshake on an accepted socket. Resolves with the TLS socket and the client's identity ('' when anonymous). */
  upgrade(socket: Socket, timeoutMs = 10_000): Promise<{ socket: tls.TLSSocket; identity: string }> {
    const psk = this.policy.credentials.psk;
    let pskIdentity: string | undefined;
    const secure = new tls.TLSSocket(socket, {
      isServer: true,
      secureContext: this.context,
      requestCert: this.policy.verifyClients && this.policy.credentials.ca !== undefined,
      rejectUnauthorized: false,
      ...(psk
        ? {
            pskCallback: (_s: tls.TLSSocket, identity: string) => {
              const key = psk.get(identity);
              if (key) pskIdentity = identity;
              return key ?? null;
            },
          }
        : {}),
    } as tls.TLSSocketOptions);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => fail(new TlsRefused(`no TLS handshake within ${timeoutMs} ms`)), timeoutMs);
      const fail = (e: Error) => {
        clearTimeout(timer);
        secure.destroy();
        reject(e instanceof TlsRefused ? e : new TlsRefused(`TLS handshake failed: ${e.message}`, { cause: e }));
      };
      secure.once('error', fail);
      secure.once('secure', () => {
        clearTimeout(timer);
        secure.off('error', fail);
        try {
          resolve({ socket: secure, identity: this.identify(secure, pskIdentity) });
        } catch (e) {
          secure.destroy();
          reject(e as Error);
        }
      });
    });
  }

  private identify(s: tls.TLSSocket, pskIdentity: string | undefined): string {
    if (pskIdentity !== undefined) return pskIdentity;
    const peer = s.getPeerCertificate();
    const hasCert = peer !== null && typeof peer === 'object' && Object.keys(peer).length > 0;
    if (hasCert) {
      const err = (s as unknown as { ssl: { verifyError(): Error | null } }).ssl.verifyError();
      if (err) throw new TlsRefused(`client certificate refused: ${err.message}`);
      return typeof peer.subject?.CN === 'string' ? peer.subject.CN : '';
    }
    if (this.policy.verifyClients) throw new TlsRefused('the client presented neither a certificate signed by the configured CA nor a known PSK');
    return '';
  }
}

export interface ClientTls {
  /** Verifies the server's certificate; with neither ca nor psk the system's CAs are used. */
  ca?: Buffer;
  cert?: Buffer;
  key?: Buffer;
  psk?: { identity: string; key: Buffer };
  /** The name the server's certificate must carry (default: the host dialled). */
  servername?: string;
}

/** Upgrade a client socket after the server acknowledged STARTTLS. */
export function connectTls(socket: Socket, host: string, opts: ClientTls, timeoutMs: number): Promise<tls.TLSSocket> {
  return new Promise((resolve, reject) => {
    const psk = opts.psk;
    const name = opts.servername ?? host;
    const secure = tls.connect({
      socket,
      ...(opts.ca ? { ca: opts.ca } : {}),
      ...(opts.cert ? { cert: opts.cert } : {}),
      ...(opts.key ? { key: opts.key } : {}),
      ciphers: CIPHERS,
      minVersion: 'TLSv1.2',
      // SNI takes names only; an address is still checked against the certificate's IP SANs.
      ...(/^[\d.]+$|:/.test(name) ? {} : { servername: name }),
      checkServerIdentity: (_h: string, cert: tls.PeerCertificate) => (psk ? undefined : tls.checkServerIdentity(name, cert)),
      ...(psk ? { pskCallback: () => ({ psk: psk.key, identity: psk.identity }) } : {}),
    });
    const timer = setTimeout(() => {
      secure.destroy();
      reject(new TlsRefused(`no TLS handshake with ${host} within ${timeoutMs} ms`));
    }, timeoutMs);
    secure.once('error', (e) => {
      clearTimeout(timer);
      reject(new TlsRefused(`TLS with ${host} failed: ${e.message}`, { cause: e }));
    });
    secure.once('secureConnect', () => {
      clearTimeout(timer);
      resolve(secure);
    });
  });
}

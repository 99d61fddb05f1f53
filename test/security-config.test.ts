// The `security:`, `tls:` and `allow:` keys: what they accept, and the refusal of a cluster that
// would listen on other hosts' networks without protection.
import { describe, expect, it } from 'vitest';
import { ConfigError, parseConfig } from '../src/cluster/config.js';
import { AllowList } from '../src/util/allow-list.js';

const base = (ss: string, extra = '') => `${extra}storageSystems:
  - id: 1
    admin: 127.0.0.1:0
${ss}
    volumes: [ { id: 1, size: 1MiB } ]
`;

function problems(text: string): string {
  try {
    parseConfig(text, 'c.yaml', '/etc/bm');
  } catch (e) {
    if (e instanceof ConfigError) return e.message;
    throw e;
  }
  return '';
}

describe('listeners on other hosts', () => {
  it('refuses NBD on a non-loopback address without tls: require, naming the key and both ways out', () => {
    expect(problems(base('    nbd: 0.0.0.0:10809'))).toContain(
      'storageSystems[0].nbd: NBD on 0.0.0.0:10809 is reachable from other hosts without TLS: set tls: {mode: require, ...} or set security.insecure: true to accept the risk (docs/SECURITY.md)',
    );
  });

  it('accepts it with TLS required, or with security.insecure', () => {
    expect(problems(base('    nbd: 0.0.0.0:10809\n    tls: { mode: require, pskFile: k.psk }'))).toBe('');
    expect(problems(base('    nbd: 0.0.0.0:10809', 'security: { insecure: true }\n'))).toBe('');
    expect(problems(base('    nbd: "[::1]:10809"'))).toBe('');
  });

  it('refuses a peer channel on another network without mutual TLS', () => {
    const text = `storageSystems:
  - { id: 1, nbd: "127.0.0.1:0", admin: "127.0.0.1:0", peer: "10.0.0.1:7001", volumes: [ { id: 1, size: 1MiB } ] }
  - { id: 2, nbd: "127.0.0.1:0", admin: "127.0.0.1:0", peer: "10.0.0.2:7001", volumes: [ { id: 1, size: 1MiB } ] }
pairs:
  - { name: p, mode: sync, master: { ss: 1, vol: 1 }, mirrors: [ { ss: 2, vol: 1 } ] }
`;
    const msg = problems(text);
    expect(msg).toContain('storageSystems[0].peer: the peer channel on 10.0.0.1:7001 is reachable from other hosts without mutual TLS: set security.ca and this storage system\'s tls.cert and tls.key');
    expect(msg).toContain('storageSystems[1].peer: the peer channel on 10.0.0.2:7001');
  });

  it('requires every storage system of a pair across systems to have a certificate once security.ca is set', () => {
    const text = `security: { ca: ca.pem }
storageSystems:
  - { id: 1, nbd: "127.0.0.1:0", admin: "127.0.0.1:0", peer: "127.0.0.1:7001", tls: { mode: off, cert: a.pem, key: a.key }, volumes: [ { id: 1, size: 1MiB } ] }
  - { id: 2, nbd: "127.0.0.1:0", admin: "127.0.0.1:0", peer: "127.0.0.1:7002", volumes: [ { id: 1, size: 1MiB } ] }
pairs:
  - { name: p, mode: sync, master: { ss: 1, vol: 1 }, mirrors: [ { ss: 2, vol: 1 } ] }
`;
    expect(problems(text)).toContain('storageSystems[1].tls: security.ca turns on mutual TLS between storage systems: storage system 2 needs tls.cert and tls.key (a certificate with CN=ss2 signed by that CA)');
  });
});

describe('the CFS on another network', () => {
  it('needs its token and TLS there, and TLS needs the certificate of the storage system running it', () => {
    const cfs = (extra: string) => `storageSystems:
  - { id: 1, nbd: "127.0.0.1:0", admin: "127.0.0.1:0", volumes: [ { id: 1, size: 1MiB }, { id: 2, size: 1MiB } ] }
pairs:
  - { name: p, mode: sync, master: { ss: 1, vol: 1 }, mirrors: [ { ss: 1, vol: 2 } ] }
cfs: { listen: "0.0.0.0:7070"${extra} }
`;
    expect(problems(cfs(', tokenFile: t'))).toContain('cfs.listen: the CFS server on 0.0.0.0:7070 is reachable from other hosts without client authentication over TLS: set cfs.tokenFile and cfs.tls or set security.insecure: true');
    expect(problems(cfs(', tokenFile: t, tls: true'))).toContain('cfs.tls: cfs.tls serves the certificate of storage system 1 (the one running the CFS server): it needs tls.cert and tls.key, and security.ca for the clients to check it');
  });
});

describe('tls and allow keys', () => {
  it('refuses a TLS mode without a credential, a cert without its key, and verifyClients without a CA', () => {
    expect(problems(base('    nbd: 127.0.0.1:0\n    tls: { mode: require }'))).toContain('storageSystems[0].tls.mode: TLS mode require needs a credential: cert and key, or pskFile');
    expect(problems(base('    nbd: 127.0.0.1:0\n    tls: { mode: allow, cert: c.pem }'))).toContain('storageSystems[0].tls: give cert and key together');
    expect(problems(base('    nbd: 127.0.0.1:0\n    tls: { mode: allow, cert: c.pem, key: k.pem, verifyClients: true }'))).toContain(
      'storageSystems[0].tls.verifyClients: verifyClients needs security.ca (the CA that signs client certificates) or a pskFile',
    );
    expect(problems(base('    nbd: 127.0.0.1:0\n    tls: { mode: always, pskFile: k }'))).toContain('storageSystems[0].tls.mode: expected off, allow or require, got "always"');
  });

  it('resolves credential paths against the YAML directory', () => {
    const c = parseConfig(base('    nbd: 127.0.0.1:0\n    tls: { mode: allow, cert: pki/c.pem, key: /k.pem, pskFile: k.psk }\n    allow: [ 10.0.0.0/8, alice ]', 'security: { ca: pki/ca.pem, adminHosts: [ Array.Example.com ] }\n'), 'c.yaml', '/etc/bm');
    expect(c.storageSystems[0]!.tls).toEqual({ mode: 'allow', cert: '/etc/bm/pki/c.pem', key: '/k.pem', pskFile: '/etc/bm/k.psk', verifyClients: false });
    expect(c.storageSystems[0]!.allow).toEqual(['10.0.0.0/8', 'alice']);
    expect(c.security).toEqual({ insecure: false, ca: '/etc/bm/pki/ca.pem', adminHosts: ['array.example.com'], adminReadOpen: false, adminTls: false });
  });

  it('refuses allow entries that are neither addresses, subnets nor names', () => {
    expect(problems(base('    nbd: 127.0.0.1:0\n    allow: [ 10.0.0.0/33 ]'))).toContain('storageSystems[0].allow[0]: "10.0.0.0/33" has a prefix longer than 32 bits');
    expect(problems(base('    nbd: 127.0.0.1:0\n    allow: [ "a b" ]'))).toContain('"a b" is neither an address, a subnet (10.0.0.0/8) nor a name pattern');
  });

  it('matches addresses, subnets and name patterns, both kinds when both are listed', () => {
    const nets = new AllowList(['10.0.0.0/8', '::1']);
    expect([nets.allows('', '10.1.2.3'), nets.allows('', '::ffff:10.1.2.3'), nets.allows('', '::1'), nets.allows('alice', '192.168.0.1'), nets.allows('', '')]).toEqual([true, true, true, false, false]);
    const names = new AllowList(['alice', 'host-*']);
    expect([names.allows('alice', '1.2.3.4'), names.allows('host-7', '::1'), names.allows('', '127.0.0.1'), names.allows('bob', '127.0.0.1')]).toEqual([true, true, false, false]);
    const both = new AllowList(['alice', '127.0.0.0/8']);
    expect([both.allows('alice', '127.0.0.1'), both.allows('alice', '10.0.0.1'), both.allows('bob', '127.0.0.1')]).toEqual([true, false, false]);
  });
});

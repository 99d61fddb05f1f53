import { describe, expect, it } from 'vitest';
import { parseConfig, ConfigError } from '../src/cluster/config.js';
import { parseChapSecrets } from '../src/iscsi/chap-file.js';
import { AllowList } from '../src/iscsi/target.js';

const yaml = (ss: string, vol = '') => `storageSystems:
  - id: 2
    nbd: 127.0.0.1:0
    admin: 127.0.0.1:0
${ss}
    volumes:
      - { id: 1, size: 1MiB${vol} }
`;

describe('iSCSI keys in the YAML', () => {
  it('defaults the port to 3260 and the target to iqn.2026-12.org.blockmirror:ssN', () => {
    const c = parseConfig(yaml('    iscsi: 127.0.0.1'), 'c.yaml', '/etc/bm');
    expect(c.storageSystems[0]!.iscsi).toEqual({ listen: { host: '127.0.0.1', port: 3260 }, target: 'iqn.2026-12.org.blockmirror:ss2' });
  });
  it('takes a target name, a CHAP file relative to the YAML, an allow-list and a per-volume target', () => {
    const c = parseConfig(yaml('    iscsi: "[::1]:3261"\n    iscsiTarget: iqn.2026-12.com.Example:Array\n    iscsiChapFile: chap.txt\n    iscsiAllow: ["iqn.1994-05.com.redhat:*", 10.0.0.0/8]', ', iscsiTarget: "iqn.2026-12.com.example:vol1"'), 'c.yaml', '/etc/bm');
    expect(c.storageSystems[0]!.iscsi).toEqual({ listen: { host: '::1', port: 3261 }, target: 'iqn.2026-12.com.example:array', chapFile: '/etc/bm/chap.txt', allow: ['iqn.1994-05.com.redhat:*', '10.0.0.0/8'] });
    expect(c.storageSystems[0]!.volumes[0]!.iscsiTarget).toBe('iqn.2026-12.com.example:vol1');
  });
  it('refuses a bad target name, a bad address, and iSCSI options without iscsi:', () => {
    expect(() => parseConfig(yaml('    iscsi: 127.0.0.1\n    iscsiTarget: not-an-iqn'), 'c.yaml', '/')).toThrow(/expected an iSCSI name/);
    expect(() => parseConfig(yaml('    iscsi: "1.2.3.4:99999"'), 'c.yaml', '/')).toThrow(ConfigError);
    expect(() => parseConfig(yaml('    iscsiTarget: iqn.2026-12.org.x:y'), 'c.yaml', '/')).toThrow(/need iscsi: HOST:PORT/);
  });
});

describe('CHAP secrets file', () => {
  it('reads one-way and mutual secrets', () => {
    expect(parseChapSecrets('alice:0123456789abcdef\n', 'f')).toEqual({ user: 'alice', secret: '0123456789abcdef' });
    expect(parseChapSecrets('a:0123456789ab\nt:ba9876543210\n', 'f')).toMatchObject({ mutualUser: 't', mutualSecret: 'ba9876543210' });
  });
  it('refuses short secrets, a missing colon and the same secret both ways, without echoing the secret', () => {
    for (const bad of ['alice:s3cr3t', 'alice', 'a:0123456789ab\nt:0123456789ab', '']) {
      let msg = '';
      try {
        parseChapSecrets(bad, 'f');
      } catch (e) {
        msg = (e as Error).message;
      }
      expect(msg).toMatch(/^f: /);
      expect(msg).not.toContain('0123456789ab');
      expect(msg).not.toContain('s3cr3t');
    }
  });
});

describe('initiator allow-list', () => {
  it('matches IQN patterns and CIDRs, both required when both are given', () => {
    const a = new AllowList(['iqn.1994-05.com.redhat:*', '10.0.0.0/8']);
    expect(a.allows('iqn.1994-05.com.redhat:host1', '10.1.2.3')).toBe(true);
    expect(a.allows('iqn.1994-05.com.redhat:host1', '::ffff:10.1.2.3')).toBe(true);
    expect(a.allows('iqn.1994-05.com.redhat:host1', '192.168.0.1')).toBe(false);
    expect(a.allows('iqn.2000-01.com.other:x', '10.1.2.3')).toBe(false);
    expect(new AllowList(undefined).allows('anything', '1.2.3.4')).toBe(true);
  });
});

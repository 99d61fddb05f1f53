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

describe('inline CHAP and per-target auth in the YAML', () => {
  const secret = 'inline-secret-0123';
  const mutual = 'mutual-secret-4567';
  const problem = (ss: string, vol = '') => {
    try {
      parseConfig(yaml(ss, vol), 'c.yaml', '/etc/bm');
    } catch (e) {
      expect(e).toBeInstanceOf(ConfigError);
      return (e as Error).message;
    }
    throw new Error('the config was accepted');
  };

  it('takes one-way and mutual CHAP inline on the storage system', () => {
    const one = parseConfig(yaml(`    iscsi: 127.0.0.1\n    iscsiChap: { user: alice, secret: "${secret}" }`), 'c.yaml', '/etc/bm');
    expect(one.storageSystems[0]!.iscsi!.chap).toEqual({ user: 'alice', secret });
    const both = parseConfig(yaml(`    iscsi: 127.0.0.1\n    iscsiChap: { user: alice, secret: "${secret}", mutualUser: tgt, mutualSecret: "${mutual}" }`), 'c.yaml', '/etc/bm');
    expect(both.storageSystems[0]!.iscsi!.chap).toEqual({ user: 'alice', secret, mutualUser: 'tgt', mutualSecret: mutual });
    expect(both.storageSystems[0]!.iscsi!.chapFile).toBeUndefined();
  });

  it("gives a volume's own target its own CHAP (inline or file) and allow-list, and leaves the other volumes to the storage system's", () => {
    const c = parseConfig(
      `storageSystems:
  - id: 2
    nbd: 127.0.0.1:0
    admin: 127.0.0.1:0
    iscsi: 127.0.0.1
    iscsiChapFile: ss.chap
    volumes:
      - { id: 1, size: 1MiB }
      - { id: 2, size: 1MiB, iscsiTarget: "iqn.2026-12.org.x:v2", iscsiChap: { user: bob, secret: "${secret}" }, iscsiAllow: [10.0.0.0/8] }
      - { id: 3, size: 1MiB, iscsiTarget: "iqn.2026-12.org.x:v3", iscsiChapFile: v3.chap }
`,
      'c.yaml',
      '/etc/bm',
    );
    const [v1, v2, v3] = c.storageSystems[0]!.volumes;
    expect(v1).toEqual({ id: 1, size: 1024 * 1024 });
    expect(v2).toMatchObject({ iscsiTarget: 'iqn.2026-12.org.x:v2', iscsiChap: { user: 'bob', secret }, iscsiAllow: ['10.0.0.0/8'] });
    expect(v3).toMatchObject({ iscsiTarget: 'iqn.2026-12.org.x:v3', iscsiChapFile: '/etc/bm/v3.chap' });
    expect(c.storageSystems[0]!.iscsi!.chapFile).toBe('/etc/bm/ss.chap');
  });

  it('refuses bad CHAP keys with one line each, never showing a secret', () => {
    const cases: Array<[string, string, RegExp]> = [
      [`    iscsi: 127.0.0.1\n    iscsiChap: { user: alice, secret: "${secret}" }\n    iscsiChapFile: chap.txt`, '', /storageSystems\[0\]\.iscsiChap: give iscsiChap \(secrets inline\) or iscsiChapFile \(secrets in a file\), not both/],
      ['    iscsi: 127.0.0.1\n    iscsiChap: { user: alice, secret: "short-s3cr" }', '', /iscsiChap\.secret: the CHAP secret is shorter than 12 characters/],
      [`    iscsi: 127.0.0.1\n    iscsiChap: { user: alice, secret: "${secret}", mutualUser: t }`, '', /iscsiChap: give mutualUser and mutualSecret together/],
      [`    iscsi: 127.0.0.1\n    iscsiChap: { user: alice, secret: "${secret}", mutualUser: t, mutualSecret: "${secret}" }`, '', /mutualSecret: the mutual CHAP secret must differ/],
      [`    iscsi: 127.0.0.1\n    iscsiChap: "alice:${secret}"`, '', /iscsiChap: expected a mapping \{user, secret, mutualUser, mutualSecret\} \(the value is not shown\)/],
      ['    iscsi: 127.0.0.1\n    iscsiChap: { user: alice, secret: 123456789012345 }', '', /iscsiChap\.secret: expected a CHAP secret in quotes/],
      [`    iscsi: 127.0.0.1\n    iscsiChap: { user: alice, secert: "${secret}" }`, '', /iscsiChap\.secert: unknown key \(did you mean "secret"\?\)/],
      [`    iscsiChap: { user: alice, secret: "${secret}" }`, '', /need iscsi: HOST:PORT/],
      ['    iscsi: 127.0.0.1', `, iscsiChap: { user: bob, secret: "${secret}" }`, /volumes\[0\]: iscsiChap, iscsiChapFile and iscsiAllow on a volume apply to a target of its own: add iscsiTarget/],
      ['    iscsi: 127.0.0.1', `, iscsiTarget: "iqn.2026-12.org.x:v", iscsiChap: { user: bob, secret: "${secret}" }, iscsiChapFile: f`, /volumes\[0\]\.iscsiChap: give iscsiChap .* not both/],
      ['    iscsi: 127.0.0.1', `, iscsiTarget: "iqn.2026-12.org.blockmirror:ss2", iscsiAllow: [10.0.0.0/8]`, /target iqn.2026-12.org.blockmirror:ss2 is the storage system's/],
    ];
    for (const [ss, vol, want] of cases) {
      const msg = problem(ss, vol);
      expect(msg).toMatch(want);
      expect(msg.trim().split('\n'), msg).toHaveLength(1);
      for (const s of [secret, 'short-s3cr', '123456789012345']) expect(msg).not.toContain(s);
    }
  });

  it('refuses two volumes that share a target but disagree on its CHAP', () => {
    const msg = problem('    iscsi: 127.0.0.1', `, iscsiTarget: "iqn.2026-12.org.x:v", iscsiChap: { user: bob, secret: "${secret}" } }\n      - { id: 2, size: 1MiB, iscsiTarget: "iqn.2026-12.org.x:v"`);
    expect(msg).toMatch(/volumes\[1\]: volumes 1 and 2 share target iqn.2026-12.org.x:v: give both the same iscsiChap, iscsiChapFile and iscsiAllow/);
    expect(msg).not.toContain(secret);
  });

  it('accepts inline CHAP where the security check requires CHAP on a non-loopback listener', () => {
    expect(problem('    iscsi: 0.0.0.0:3260', '')).toMatch(/without CHAP: set iscsiChap or iscsiChapFile/);
    expect(parseConfig(yaml(`    iscsi: 0.0.0.0:3260\n    iscsiChap: { user: alice, secret: "${secret}" }`), 'c.yaml', '/').storageSystems[0]!.iscsi!.chap!.user).toBe('alice');
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

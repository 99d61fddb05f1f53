import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, it, expect } from 'vitest';
import { stringify } from 'yaml';
import { ConfigError, DEFAULT_CACHE_BYPASS, loadConfig, parseConfig, type ClusterConfig } from '../src/cluster/config.js';
import { DEFAULT_BYPASS } from '../src/controller/cache/blocks.js';

const repo = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const fixtures = path.join(repo, 'test', 'fixtures', 'config');
const MiB = 2 ** 20;
const GiB = 2 ** 30;

// Tests write wrong configs on purpose, so a draft is untyped.
type Draft = any;

/** A valid two-SS cluster; each test breaks one thing. */
function base(): Draft {
  return {
    clusterSize: '64KiB',
    storageSystems: [
      {
        id: 1,
        nbd: '127.0.0.1:10809',
        admin: '127.0.0.1:9001',
        volumes: [
          { id: 8, size: '1GiB' },
          { id: 7, size: '1GiB' },
          { id: 9, size: '256MiB' },
        ],
      },
      {
        id: 2,
        nbd: '127.0.0.1:10810',
        admin: '127.0.0.1:9002',
        volumes: [
          { id: 1, size: '1GiB' },
          { id: 2, size: '1GiB' },
        ],
      },
    ],
    pairs: [{ name: 'pair1', mode: 'async', master: { ss: 1, vol: 8 }, mirrors: [{ ss: 1, vol: 7 }] }],
  };
}

function parse(text: string): ClusterConfig {
  return parseConfig(text, 'config.yaml', '/srv/bm');
}

function accept(edit: (c: Draft) => void = () => {}): ClusterConfig {
  const c = base();
  edit(c);
  return parse(stringify(c));
}

function errorOf(text: string): ConfigError {
  try {
    parse(text);
  } catch (e) {
    expect(e).toBeInstanceOf(ConfigError);
    return e as ConfigError;
  }
  throw new Error('the config was accepted');
}

/** Breaks the base config and expects the message to start `config.yaml: <keyPath>: ` and to contain `text`. */
function refuse(edit: (c: Draft) => void, keyPath: string, text: string): ConfigError {
  const c = base();
  edit(c);
  const err = errorOf(stringify(c));
  expect(err.message.startsWith(`config.yaml: ${keyPath}: `), err.message).toBe(true);
  expect(err.message).toContain(text);
  return err;
}

describe('YAML and the top level', () => {
  it('refuses a YAML syntax error and gives its line and column', () => {
    const err = errorOf('storageSystems:\n  - id: 1\n    volumes: [ { id: 1 }\npairs: []\n');
    expect(err.message).toMatch(/^config\.yaml:4:1: YAML syntax error: /);
    expect(err.problems[0]).toMatchObject({ path: '', line: 4, col: 1 });
  });

  it('refuses a key written twice in one mapping as a YAML error', () => {
    expect(errorOf('pairs: []\npairs: []\n').message).toMatch(/^config\.yaml:2:1: YAML syntax error: Map keys must be unique/);
  });

  it('refuses a top level that is a list, a scalar or empty', () => {
    expect(errorOf('- id: 1\n').message).toBe('config.yaml:1:1: the top level must be a mapping with storageSystems and pairs, got a list');
    expect(errorOf('hello\n').message).toContain('the top level must be a mapping');
    expect(errorOf('').message).toContain('got an empty document');
    expect(errorOf('# only a comment\n').message).toContain('got an empty document');
  });

  it('refuses an unresolved YAML alias', () => {
    expect(errorOf('storageSystems: *nowhere\n').message).toMatch(/^config\.yaml: YAML error: .*nowhere/);
  });
});

describe('unknown keys', () => {
  it('refuses a misspelt pair key and suggests the right one', () => {
    refuse((c) => {
      c.pairs[0].mirorrs = c.pairs[0].mirrors;
      delete c.pairs[0].mirrors;
    }, 'pairs[0].mirorrs', 'unknown key (did you mean "mirrors"?)');
  });

  it('refuses an unknown key at the top level', () => {
    refuse((c) => (c.storageSystem = []), 'storageSystem', 'unknown key');
  });

  it('refuses unknown keys in a storage system, a volume, a cache and a volume reference', () => {
    refuse((c) => (c.storageSystems[1].port = 1), 'storageSystems[1].port', 'unknown key (expected one of: id, nbd, nbdSocket, admin, peer, dataDir, cache, volumes, iscsi, iscsiTarget, iscsiChap, iscsiChapFile, iscsiAllow, tls, allow, svolGroups)');
    refuse((c) => (c.storageSystems[0].volumes[2].name = 'x'), 'storageSystems[0].volumes[2].name', 'unknown key');
    refuse((c) => (c.storageSystems[0].cache = { size: '1MiB', evict: 'lru' }), 'storageSystems[0].cache.evict', 'unknown key');
    refuse((c) => (c.pairs[0].master.volume = 8), 'pairs[0].master.volume', 'unknown key');
  });
});

describe('missing keys and wrong types', () => {
  it('refuses a missing required key', () => {
    refuse((c) => delete c.storageSystems, 'storageSystems', 'missing required key');
    refuse((c) => delete c.storageSystems[1].nbd, 'storageSystems[1].nbd', 'missing required key');
    refuse((c) => delete c.storageSystems[0].admin, 'storageSystems[0].admin', 'missing required key');
    refuse((c) => delete c.storageSystems[0].volumes, 'storageSystems[0].volumes', 'missing required key');
    refuse((c) => delete c.storageSystems[0].volumes[1].size, 'storageSystems[0].volumes[1].size', 'missing required key');
    refuse((c) => delete c.pairs[0].mode, 'pairs[0].mode', 'missing required key');
    refuse((c) => delete c.pairs[0].master, 'pairs[0].master', 'missing required key');
    refuse((c) => delete c.pairs[0].mirrors, 'pairs[0].mirrors', 'missing required key');
    refuse((c) => delete c.pairs[0].name, 'pairs[0].name', 'missing required key');
  });

  it('refuses ids that are not positive integers', () => {
    refuse((c) => (c.storageSystems[0].id = 'one'), 'storageSystems[0].id', 'expected a positive integer, got "one"');
    refuse((c) => (c.storageSystems[0].id = 0), 'storageSystems[0].id', 'expected a positive integer, got 0');
    refuse((c) => (c.storageSystems[1].volumes[0].id = 1.5), 'storageSystems[1].volumes[0].id', 'expected a positive integer, got 1.5');
    refuse((c) => (c.pairs[0].mirrors[0].vol = -7), 'pairs[0].mirrors[0].vol', 'expected a positive integer, got -7');
  });

  it('refuses a list where a mapping belongs and the other way round', () => {
    refuse((c) => (c.storageSystems = { id: 1 }), 'storageSystems', 'expected a list, got a mapping');
    refuse((c) => (c.storageSystems[0].volumes = 'vol8'), 'storageSystems[0].volumes', 'expected a list, got "vol8"');
    refuse((c) => (c.pairs[0].master = [1, 8]), 'pairs[0].master', 'expected a mapping, got a list');
    refuse((c) => (c.pairs = null), 'pairs', 'expected a list, got an empty value');
  });

  it('refuses a mode other than sync or async', () => {
    refuse((c) => (c.pairs[0].mode = 'semi-sync'), 'pairs[0].mode', 'expected sync or async, got "semi-sync"');
  });

  it('refuses a pair name that would not fit in an admin API URL', () => {
    refuse((c) => (c.pairs[0].name = 'my pair/1'), 'pairs[0].name', 'expected a pair name');
  });
});

describe('sizes', () => {
  it('refuses a size it cannot read, saying what it expected', () => {
    const err = refuse((c) => (c.storageSystems[0].volumes[1].size = '1GB!'), 'storageSystems[0].volumes[1].size', 'invalid size "1GB!"');
    expect(err.message).toBe('config.yaml: storageSystems[0].volumes[1].size: invalid size "1GB!" (expected e.g. 512, 64KiB, 256MiB, 1GiB)');
    refuse((c) => (c.storageSystems[0].volumes[1].size = true), 'storageSystems[0].volumes[1].size', 'expected a size such as 512, 64KiB, 1GiB, got true');
  });

  it('refuses a volume of size 0 or not a multiple of 512', () => {
    refuse((c) => (c.storageSystems[0].volumes[2].size = 0), 'storageSystems[0].volumes[2].size', 'a volume size must be greater than 0');
    refuse((c) => (c.storageSystems[0].volumes[2].size = 1000), 'storageSystems[0].volumes[2].size', 'volume size 1000 is not a multiple of 512 bytes');
    refuse((c) => (c.storageSystems[0].volumes[2].size = '1.25KiB'), 'storageSystems[0].volumes[2].size', 'volume size "1.25KiB" is not a multiple of 512 bytes');
  });

  it('refuses a clusterSize that is not a power of two from 4KiB to 64MiB', () => {
    for (const bad of ['48KiB', '2KiB', '128MiB', 0]) {
      refuse((c) => (c.clusterSize = bad), 'clusterSize', 'clusterSize must be a power of two from 4KiB to 64MiB');
    }
  });

  it('refuses a zero cache, a cache policy it does not know and a bad syncRate', () => {
    refuse((c) => (c.storageSystems[0].cache = { size: 0 }), 'storageSystems[0].cache.size', 'a cache size must be greater than 0');
    refuse((c) => (c.storageSystems[0].cache = { size: '1MiB', policy: 'lru' }), 'storageSystems[0].cache.policy', 'expected write-back or write-through, got "lru"');
    refuse((c) => (c.storageSystems[0].cache = { size: '1MiB', bypass: 'big' }), 'storageSystems[0].cache.bypass', 'invalid size "big"');
    refuse((c) => (c.storageSystems[0].cache = { size: '1MiB', bypass: -1 }), 'storageSystems[0].cache.bypass', 'invalid size -1');
    refuse((c) => (c.pairs[0].syncRate = 'fast'), 'pairs[0].syncRate', 'invalid size "fast"');
    refuse((c) => (c.pairs[0].syncRate = 0), 'pairs[0].syncRate', 'syncRate must be greater than 0');
  });

  it('reads sizes given as plain numbers and a syncRate written per second', () => {
    const cfg = accept((c) => {
      c.clusterSize = 4096;
      c.storageSystems[0].volumes[2].size = 512;
      c.storageSystems[0].cache = { size: 1048576 };
      c.pairs[0].syncRate = '100MiB/s';
    });
    expect(cfg.clusterSize).toBe(4096);
    expect(cfg.storageSystems[0]!.volumes[2]).toEqual({ id: 9, size: 512 });
    expect(cfg.storageSystems[0]!.cache).toEqual({ size: MiB, policy: 'write-back', bypass: DEFAULT_CACHE_BYPASS });
    const none = accept((c) => (c.storageSystems[0].cache = { size: '1MiB', bypass: 0 }));
    expect(none.storageSystems[0]!.cache).toEqual({ size: MiB, policy: 'write-back', bypass: 0 });
    // The CLI's default is the cache's own (two constants, so the CLI does not load the cache to parse a file).
    expect(DEFAULT_CACHE_BYPASS).toBe(DEFAULT_BYPASS);
    expect(cfg.pairs[0]!.syncRate).toBe(100 * MiB);
  });
});

describe('addresses', () => {
  it('refuses an address without a port, with a port out of range, or with a bad host', () => {
    refuse((c) => (c.storageSystems[0].nbd = 'localhost'), 'storageSystems[0].nbd', 'invalid address "localhost" (expected HOST:PORT');
    refuse((c) => (c.storageSystems[0].nbd = '127.0.0.1:70000'), 'storageSystems[0].nbd', 'invalid port 70000');
    refuse((c) => (c.storageSystems[0].admin = 'my_host:9001'), 'storageSystems[0].admin', 'invalid host "my_host"');
    refuse((c) => (c.storageSystems[0].admin = '[nothost]:9001'), 'storageSystems[0].admin', 'invalid IPv6 address "nothost"');
    refuse((c) => (c.storageSystems[0].admin = 9001), 'storageSystems[0].admin', 'expected an address HOST:PORT, got 9001');
  });

  it('refuses a bare IPv6 address and says to bracket it', () => {
    refuse((c) => (c.storageSystems[0].nbd = '::1:10809'), 'storageSystems[0].nbd', 'invalid address "::1:10809" (put an IPv6 address in brackets');
  });

  it('reads a bracketed IPv6 address and port 0', () => {
    const cfg = accept((c) => {
      c.storageSystems[0].nbd = '[::1]:10809';
      c.storageSystems[0].admin = 'localhost:0';
    });
    expect(cfg.storageSystems[0]!.nbd).toEqual({ host: '::1', port: 10809 });
    expect(cfg.storageSystems[0]!.admin).toEqual({ host: 'localhost', port: 0 });
  });

  it('refuses the same port twice on one host, across nbd and admin and across storage systems', () => {
    refuse((c) => (c.storageSystems[1].nbd = '127.0.0.1:10809'), 'storageSystems[1].nbd', 'port 10809 on 127.0.0.1 is already used by storageSystems[0].nbd (127.0.0.1:10809)');
    refuse((c) => (c.storageSystems[0].admin = '127.0.0.1:10809'), 'storageSystems[0].admin', 'port 10809 on 127.0.0.1 is already used by storageSystems[0].nbd');
    refuse((c) => (c.storageSystems[1].admin = '127.0.0.1:9001'), 'storageSystems[1].admin', 'already used by storageSystems[0].admin');
  });

  it('treats 0.0.0.0 and :: as overlapping every host', () => {
    // security.insecure: the wildcard listeners would otherwise also be refused for having no TLS.
    refuse((c) => ((c.security = { insecure: true }), (c.storageSystems[1].nbd = '0.0.0.0:10809')), 'storageSystems[1].nbd', 'port 10809 on 0.0.0.0 is already used by storageSystems[0].nbd');
    refuse((c) => ((c.security = { insecure: true }), (c.storageSystems[1].nbd = '[::]:10809')), 'storageSystems[1].nbd', 'port 10809 on :: is already used by storageSystems[0].nbd');
    refuse((c) => {
      c.security = { insecure: true };
      c.storageSystems[0].nbd = '[0:0::0]:10809';
      c.storageSystems[1].nbd = '10.0.0.1:10809';
    }, 'storageSystems[1].nbd', 'already used by storageSystems[0].nbd ([0:0::0]:10809)');
  });

  it('treats localhost as overlapping the loopback addresses', () => {
    refuse((c) => (c.storageSystems[1].nbd = 'localhost:10809'), 'storageSystems[1].nbd', 'port 10809 on localhost is already used');
  });

  it('accepts one port on different hosts, and port 0 any number of times', () => {
    expect(() => accept((c) => (c.storageSystems[1].nbd = '127.0.0.2:10809'))).not.toThrow();
    expect(() =>
      accept((c) => {
        for (const ss of c.storageSystems) ss.nbd = ss.admin = '127.0.0.1:0';
      }),
    ).not.toThrow();
  });

  it('refuses one unix socket for two storage systems, however the path is spelt', () => {
    refuse((c) => {
      c.storageSystems[0].nbdSocket = 'run/bm.sock';
      c.storageSystems[1].nbdSocket = '/srv/bm/run/../run/bm.sock';
    }, 'storageSystems[1].nbdSocket', 'socket /srv/bm/run/bm.sock is already used by storageSystems[0].nbdSocket');
  });

  it('refuses a unix socket path longer than the kernel allows', () => {
    refuse((c) => (c.storageSystems[0].nbdSocket = `${'x'.repeat(120)}.sock`), 'storageSystems[0].nbdSocket', 'unix sockets allow at most 107');
  });
});

describe('storage systems and volumes', () => {
  it('refuses a cluster without storage systems', () => {
    refuse((c) => {
      c.storageSystems = [];
      c.pairs = [];
    }, 'storageSystems', 'at least one storage system is required');
  });

  it('refuses duplicate storage system ids', () => {
    refuse((c) => (c.storageSystems[1].id = 1), 'storageSystems[1].id', 'duplicate storage system id 1 (also storageSystems[0].id)');
  });

  it('refuses duplicate volume ids within one storage system', () => {
    refuse((c) => (c.storageSystems[0].volumes[2].id = 8), 'storageSystems[0].volumes[2].id', 'duplicate volume id 8 in storage system 1 (also volumes[0])');
  });

  it('accepts the same volume id in two storage systems', () => {
    expect(() => accept((c) => (c.storageSystems[1].volumes[0].id = 8))).not.toThrow();
  });

  it('refuses one dataDir for two storage systems, however the path is spelt', () => {
    refuse((c) => {
      c.storageSystems[0].dataDir = 'data/ss1';
      c.storageSystems[1].dataDir = './data/../data/ss1/';
    }, 'storageSystems[1].dataDir', 'data directory /srv/bm/data/ss1 is already used by storageSystems[0].dataDir');
  });
});

describe('pairs', () => {
  it('refuses a pair without mirrors', () => {
    refuse((c) => (c.pairs[0].mirrors = []), 'pairs[0].mirrors', 'a pair needs at least one mirror');
  });

  it('refuses duplicate pair names', () => {
    refuse((c) => c.pairs.push({ name: 'pair1', mode: 'sync', master: { ss: 2, vol: 1 }, mirrors: [{ ss: 2, vol: 2 }] }), 'pairs[1].name', 'duplicate pair name "pair1" (also pairs[0].name)');
  });

  it('refuses a master or mirror in a storage system that does not exist', () => {
    refuse((c) => (c.pairs[0].master = { ss: 3, vol: 8 }), 'pairs[0].master', 'storage system 3 does not exist');
    refuse((c) => (c.pairs[0].mirrors[0].ss = 5), 'pairs[0].mirrors[0]', 'storage system 5 does not exist');
  });

  it('refuses a master or mirror volume that does not exist', () => {
    const err = refuse((c) => (c.pairs[0].mirrors[0].vol = 10), 'pairs[0].mirrors[0]', 'volume 10 does not exist in storage system 1');
    expect(err.message).toBe('config.yaml: pairs[0].mirrors[0]: volume 10 does not exist in storage system 1');
    refuse((c) => (c.pairs[0].master.vol = 3), 'pairs[0].master', 'volume 3 does not exist in storage system 1');
  });

  it('refuses a master that is also listed as its own mirror', () => {
    refuse((c) => c.pairs[0].mirrors.push({ ss: 1, vol: 8 }), 'pairs[0].mirrors[1]', 'volume 8 of storage system 1 is already used in this pair (pairs[0].master)');
  });

  it('refuses a mirror listed twice in one pair', () => {
    refuse((c) => c.pairs[0].mirrors.push({ ss: 1, vol: 7 }), 'pairs[0].mirrors[1]', 'already used in this pair (pairs[0].mirrors[0])');
  });

  it('refuses a volume used in two pairs', () => {
    refuse(
      (c) => c.pairs.push({ name: 'pair2', mode: 'sync', master: { ss: 2, vol: 1 }, mirrors: [{ ss: 1, vol: 7 }] }),
      'pairs[1].mirrors[0]',
      'volume 7 of storage system 1 is already used in pair "pair1" (pairs[0].mirrors[0])',
    );
  });

  it('refuses a mirror whose size differs from its master', () => {
    refuse((c) => (c.pairs[0].mirrors[0].vol = 9), 'pairs[0].mirrors[0]', 'volume 9 of storage system 1 is 256MiB but its master is 1GiB (a mirror must be the same size)');
  });

  it('accepts a cluster without pairs: every volume is simplex', () => {
    expect(accept((c) => delete c.pairs).pairs).toEqual([]);
    expect(accept((c) => (c.pairs = [])).pairs).toEqual([]);
  });
});

describe('the whole message', () => {
  it('joins several problems with "; " in file order, the first on the first line', () => {
    const err = errorOf(
      [
        'storageSystems:',
        '  - id: 1',
        '    nbd: 127.0.0.1:10809',
        '    admin: 127.0.0.1:9001',
        '    volumes:',
        '      - { id: 8, size: 1GB! }',
        'pairs:',
        '  - name: p',
        '    mode: semi',
        '    master: { ss: 1, vol: 8 }',
        '    mirorrs: []',
        '',
      ].join('\n'),
    );
    expect(err.message.split('\n')).toHaveLength(1);
    expect(err.message).toMatch(/^config\.yaml: storageSystems\[0\]\.volumes\[0\]\.size: invalid size "1GB!"/);
    expect(err.message).toContain('; pairs[0].mode: expected sync or async, got "semi"');
    expect(err.message).toContain('; pairs[0].mirorrs: unknown key (did you mean "mirrors"?)');
    expect(err.problems.map((p) => [p.path, p.line])).toEqual([
      ['storageSystems[0].volumes[0].size', 6],
      ['pairs[0].mode', 9],
      ['pairs[0].mirorrs', 11],
    ]);
  });

  it('caps a long list of problems', () => {
    const err = refuse((c) => {
      c.storageSystems[0].volumes = Array.from({ length: 15 }, (_, i) => ({ id: i + 1, size: 'big' }));
    }, 'storageSystems[0].volumes[0].size', 'invalid size "big"');
    expect(err.problems.length).toBeGreaterThanOrEqual(15);
    expect(err.message).toMatch(/; and \d+ more problems$/);
  });
});

describe('loading files', () => {
  it('loads config/demo.yaml: one in-memory storage system, an async and a sync pair, a simplex volume', () => {
    const cfg = loadConfig(path.join(repo, 'config', 'demo.yaml'));
    expect(cfg.clusterSize).toBe(64 * 1024);
    expect(cfg.storageSystems).toHaveLength(1);
    const ss = cfg.storageSystems[0]!;
    expect(ss).toMatchObject({ id: 1, nbd: { host: '127.0.0.1', port: 10809 }, admin: { host: '127.0.0.1', port: 9001 }, cache: { size: 64 * MiB } });
    expect(ss.dataDir).toBeUndefined();
    expect(ss.volumes).toEqual([
      { id: 8, size: GiB },
      { id: 7, size: GiB },
      { id: 5, size: 256 * MiB },
      { id: 6, size: 256 * MiB },
      { id: 9, size: 256 * MiB },
    ]);
    expect(cfg.pairs.map((p) => [p.name, p.mode, p.master.vol, p.mirrors.map((m) => m.vol)])).toEqual([
      ['pair1', 'async', 8, [7]],
      ['pair2', 'sync', 5, [6]],
    ]);
  });

  it('loads config/two-pairs.yaml with its data directories next to the file', () => {
    const cfg = loadConfig(path.join(repo, 'config', 'two-pairs.yaml'));
    expect(cfg.storageSystems.map((s) => s.dataDir)).toEqual([path.join(repo, 'config', 'data', 'ss1'), path.join(repo, 'config', 'data', 'ss2')]);
    expect(cfg.pairs).toHaveLength(2);
    for (const pair of cfg.pairs) for (const m of pair.mirrors) expect(m.ss).toBe(pair.master.ss);
  });

  it('resolves a relative dataDir and nbdSocket against the YAML file, not the working directory', () => {
    const cfg = loadConfig(path.relative(process.cwd(), path.join(fixtures, 'relative-paths.yaml')));
    expect(cfg.storageSystems[0]!.dataDir).toBe(path.join(fixtures, 'data', 'ss1'));
    expect(cfg.storageSystems[0]!.nbdSocket).toBe(path.join(fixtures, 'run', 'ss1.sock'));
  });

  it('keeps an absolute dataDir as it is', () => {
    expect(accept((c) => (c.storageSystems[0].dataDir = '/var/lib/bm/ss1')).storageSystems[0]!.dataDir).toBe('/var/lib/bm/ss1');
  });

  it('applies the defaults: 64KiB clusters, no pairs, no cache, volumes in memory, no sync limit', () => {
    const cfg = parse('storageSystems:\n  - { id: 1, nbd: "127.0.0.1:0", admin: "127.0.0.1:0", volumes: [ { id: 1, size: 1MiB } ] }\n');
    expect(cfg).toEqual({
      source: 'config.yaml',
      clusterSize: 64 * 1024,
      peerTimeout: 5000,
      storageSystems: [{ id: 1, nbd: { host: '127.0.0.1', port: 0 }, admin: { host: '127.0.0.1', port: 0 }, volumes: [{ id: 1, size: MiB }] }],
      pairs: [],
      faults: [],
      security: { insecure: false, adminHosts: [], adminReadOpen: false, adminTls: false },
    });
    expect(accept().pairs[0]).not.toHaveProperty('syncRate');
    expect(accept().pairs[0]).toMatchObject({ fence: 'never', autoResync: true });
  });

  it('reads the keys of pairs across storage systems: peer, peerTimeout, fence, autoResync', () => {
    const cfg = accept((c) => {
      const d = c as unknown as Record<string, unknown> & { storageSystems: Record<string, unknown>[]; pairs: Record<string, unknown>[] };
      d.peerTimeout = '1.5s';
      d.storageSystems[0]!.peer = '127.0.0.1:7001';
      d.storageSystems[1]!.peer = '127.0.0.1:7002';
      d.pairs[0] = { name: 'p', mode: 'sync', master: { ss: 1, vol: 8 }, mirrors: [{ ss: 2, vol: 1 }], fence: 'data', autoResync: false };
    });
    expect(cfg.peerTimeout).toBe(1500);
    expect(cfg.storageSystems[1]!.peer).toEqual({ host: '127.0.0.1', port: 7002 });
    expect(cfg.pairs[0]).toMatchObject({ fence: 'data', autoResync: false });
    expect(parse('peerTimeout: 250\nstorageSystems:\n  - { id: 1, nbd: "127.0.0.1:0", admin: "127.0.0.1:0", volumes: [] }\n').peerTimeout).toBe(250);
  });

  it('refuses bad values of the keys of pairs across storage systems', () => {
    const bad = (edit: (d: Record<string, unknown> & { storageSystems: Record<string, unknown>[]; pairs: Record<string, unknown>[] }) => void, at: string, message: string) =>
      refuse((c) => edit(c as unknown as Parameters<typeof edit>[0]), at, message);
    bad((d) => (d.peerTimeout = 'soon'), 'peerTimeout', 'expected a duration such as 5s or 500ms, got "soon"');
    bad((d) => (d.peerTimeout = 10), 'peerTimeout', 'peerTimeout must be from 100ms to 600s, got 10');
    bad((d) => (d.pairs[0]!.fence = 'status'), 'pairs[0].fence', 'expected never or data, got "status"');
    bad((d) => (d.pairs[0]!.autoResync = 'yes'), 'pairs[0].autoResync', 'expected true or false, got "yes"');
    bad((d) => (d.storageSystems[0]!.peer = '127.0.0.1:0'), 'storageSystems[0].peer', 'the peer port cannot be 0');
    bad((d) => ((d.storageSystems[0]!.peer = '127.0.0.1:9001')), 'storageSystems[0].peer', 'port 9001 on 127.0.0.1 is already used by storageSystems[0].admin');
    bad(
      (d) => (d.pairs[0] = { name: 'p', mode: 'sync', master: { ss: 1, vol: 8 }, mirrors: [{ ss: 2, vol: 1 }] }),
      'storageSystems[0].peer',
      'missing required key: pair "p" spans storage systems 1 and 2',
    );
  });

  it('names the file in the message of a broken file it loads', () => {
    const file = path.join(fixtures, 'broken.yaml');
    expect(() => loadConfig(file)).toThrow(`${file}: storageSystems[0].volumes[0].size: invalid size "1GB!"`);
  });

  it('refuses a file it cannot read, naming the file', () => {
    const file = path.join(fixtures, 'missing.yaml');
    expect(() => loadConfig(file)).toThrow(`${file}: cannot read the file (no such file: check the path; config/ has examples, e.g. config/demo.yaml)`);
  });
});

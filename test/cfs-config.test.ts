// The cfs: section of the cluster YAML: defaults, paths, and every mistake refused with its key path.
import { describe, expect, it } from 'vitest';
import { stringify } from 'yaml';
import { ConfigError, parseConfig, type ClusterConfig } from '../src/cluster/config.js';

// Tests write wrong configs on purpose, so a draft is untyped.
type Draft = any;

function base(): Draft {
  return {
    storageSystems: [
      { id: 2, nbd: '127.0.0.1:10810', admin: '127.0.0.1:9002', volumes: [{ id: 1, size: '1GiB' }, { id: 2, size: '1GiB' }] },
      {
        id: 1,
        nbd: '127.0.0.1:10809',
        admin: '127.0.0.1:9001',
        volumes: [
          { id: 8, size: '1GiB' },
          { id: 7, size: '1GiB' },
          { id: 6, size: '32KiB' },
          { id: 5, size: '32KiB' },
        ],
      },
    ],
    pairs: [
      { name: 'pair1', mode: 'async', master: { ss: 1, vol: 8 }, mirrors: [{ ss: 1, vol: 7 }] },
      { name: 'pair2', mode: 'sync', master: { ss: 2, vol: 1 }, mirrors: [{ ss: 2, vol: 2 }] },
    ],
    cfs: { listen: '127.0.0.1:7070' },
  };
}

function accept(edit: (c: Draft) => void = () => {}): ClusterConfig {
  const c = base();
  edit(c);
  return parseConfig(stringify(c), 'config.yaml', '/srv/bm');
}

/** Breaks the base config and expects the message to start `config.yaml: <keyPath>: ` and to contain `text`. */
function refuse(edit: (c: Draft) => void, keyPath: string, text: string): void {
  const c = base();
  edit(c);
  let err: unknown;
  try {
    parseConfig(stringify(c), 'config.yaml', '/srv/bm');
  } catch (e) {
    err = e;
  }
  expect(err).toBeInstanceOf(ConfigError);
  const message = (err as ConfigError).message;
  expect(message.startsWith(`config.yaml: ${keyPath}: `), message).toBe(true);
  expect(message).toContain(text);
}

describe('cfs: section', () => {
  it('is optional', () => {
    expect(accept((c) => delete c.cfs).cfs).toBeUndefined();
  });

  it('fills in the defaults: 64 KiB blocks, every pair, the lowest storage system, reads from the master too', () => {
    expect(accept().cfs).toEqual({
      listen: { host: '127.0.0.1', port: 7070 },
      blockSize: 64 * 1024,
      pairs: ['pair1', 'pair2'],
      ss: 1,
      readFromMaster: true,
      tls: false,
    });
  });

  it('takes every key, and resolves dataDir against the YAML file', () => {
    const cfs = accept((c) => {
      c.cfs = { listen: '[::1]:7070', dataDir: 'meta/cfs', blockSize: '1MiB', pairs: ['pair2'], ss: 2, readFromMaster: false };
    }).cfs;
    expect(cfs).toEqual({ listen: { host: '::1', port: 7070 }, dataDir: '/srv/bm/meta/cfs', blockSize: 2 ** 20, pairs: ['pair2'], ss: 2, readFromMaster: false, tls: false });
    expect(accept((c) => (c.cfs.dataDir = '/var/lib/cfs')).cfs!.dataDir).toBe('/var/lib/cfs');
  });

  it('refuses a missing or malformed listen address', () => {
    refuse((c) => delete c.cfs.listen, 'cfs.listen', 'missing required key');
    refuse((c) => (c.cfs.listen = 7070), 'cfs.listen', 'expected an address HOST:PORT');
    refuse((c) => (c.cfs = 'yes'), 'cfs', 'expected a mapping');
  });

  it('refuses a block size that is not a power of two from 4KiB to 64MiB', () => {
    refuse((c) => (c.cfs.blockSize = '48KiB'), 'cfs.blockSize', 'blockSize must be a power of two from 4KiB to 64MiB, got "48KiB"');
    refuse((c) => (c.cfs.blockSize = 2048), 'cfs.blockSize', 'must be a power of two');
    refuse((c) => (c.cfs.blockSize = '128MiB'), 'cfs.blockSize', 'must be a power of two');
    refuse((c) => (c.cfs.blockSize = 'big'), 'cfs.blockSize', 'invalid size "big"');
  });

  it('refuses pairs that do not exist, are listed twice, or whose master is smaller than a block', () => {
    refuse((c) => (c.cfs.pairs = ['pair1', 'nope']), 'cfs.pairs[1]', 'pair "nope" does not exist (pairs: pair1, pair2)');
    refuse((c) => (c.cfs.pairs = ['pair2', 'pair2']), 'cfs.pairs[1]', 'pair "pair2" is listed twice (also cfs.pairs[0])');
    refuse((c) => (c.cfs.pairs = []), 'cfs.pairs', 'list at least one pair, or leave pairs out');
    refuse((c) => delete c.pairs, 'cfs', 'needs at least one pair');
    refuse(
      (c) => c.pairs.push({ name: 'tiny', mode: 'async', master: { ss: 1, vol: 6 }, mirrors: [{ ss: 1, vol: 5 }] }),
      'cfs.pairs[2]',
      'the master of pair "tiny" (32KiB) is smaller than one block (cfs.blockSize 64KiB)',
    );
  });

  it('refuses a storage system that does not exist to host the server', () => {
    refuse((c) => (c.cfs.ss = 9), 'cfs.ss', 'storage system 9 does not exist');
  });

  it('wants metadata on disk when the volumes are on disk, and in a directory of its own', () => {
    refuse((c) => (c.storageSystems[1].dataDir = 'ss1'), 'cfs.dataDir', 'missing required key: the volumes of the file system\'s pairs are on disk (storageSystems[1].dataDir)');
    // A storage system on disk that holds none of the file system's pairs does not count.
    expect(accept((c) => {
      c.storageSystems[0].dataDir = 'ss2';
      c.cfs.pairs = ['pair1'];
    }).cfs!.dataDir).toBeUndefined();
    refuse((c) => {
      c.storageSystems[1].dataDir = 'data';
      c.cfs.dataDir = './data';
    }, 'cfs.dataDir', 'data directory /srv/bm/data is already used by storageSystems[1].dataDir');
  });

  it('refuses a listen port already taken by a storage system', () => {
    refuse((c) => (c.cfs.listen = '127.0.0.1:9001'), 'cfs.listen', 'port 9001 on 127.0.0.1 is already used by storageSystems[1].admin (127.0.0.1:9001)');
    refuse((c) => ((c.security = { insecure: true }), (c.cfs.listen = '0.0.0.0:10810')), 'cfs.listen', 'already used by storageSystems[0].nbd');
    expect(accept((c) => (c.cfs.listen = '127.0.0.2:9001')).cfs!.listen).toEqual({ host: '127.0.0.2', port: 9001 });
    expect(accept((c) => (c.cfs.listen = '127.0.0.1:0')).cfs!.listen.port).toBe(0);
  });

  it('suggests the key meant by a typo', () => {
    refuse((c) => (c.cfs.blocksize = '64KiB'), 'cfs.blocksize', 'unknown key (did you mean "blockSize"?)');
    refuse((c) => (c.cfs.color = 'red'), 'cfs.color', 'unknown key (expected one of: listen, dataDir, blockSize, pairs, ss, readFromMaster, tokenFile, tls)');
  });
});

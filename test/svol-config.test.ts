// The `svolGroups:` key of a storage system (docs/svol.md): accepted shapes, defaults, and one
// clear line per mistake, in the style of config.test.ts.
import { describe, expect, it } from 'vitest';
import { stringify } from 'yaml';
import { ConfigError, parseConfig, type ClusterConfig } from '../src/cluster/config.js';

type Draft = any;

function base(): Draft {
  return {
    clusterSize: '64KiB',
    storageSystems: [
      {
        id: 1,
        nbd: '127.0.0.1:10809',
        admin: '127.0.0.1:9001',
        volumes: [
          { id: 1, size: '64MiB' },
          { id: 2, size: '64MiB' },
          { id: 3, size: '64MiB' },
          { id: 4, size: '64MiB' },
          { id: 5, size: '64MiB' },
          { id: 9, size: '16MiB' },
          { id: 10, size: '64MiB' },
          { id: 11, size: '64MiB' },
        ],
        svolGroups: [
          {
            name: 'backup',
            pvol: 1,
            members: [
              { vol: 2, attr: 'RO' },
              { vol: 3, attr: 'RW', increments: 9 },
              { vol: 4, attr: 'RO', logicalId: 40 },
              { vol: 5, attr: 'spare' },
            ],
          },
        ],
      },
    ],
    pairs: [{ name: 'pair1', mode: 'sync', master: { ss: 1, vol: 10 }, mirrors: [{ ss: 1, vol: 11 }] }],
  };
}

function accept(edit: (c: Draft) => void = () => {}): ClusterConfig {
  const c = base();
  edit(c);
  return parseConfig(stringify(c), 'config.yaml', '/srv/bm');
}

/** Expects exactly one problem: `config.yaml: <keyPath>: ` then a message containing `text`. */
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
  const e = err as ConfigError;
  expect(e.problems.length, e.message).toBe(1);
  expect(e.message.split('\n').length).toBe(1);
  expect(e.message.startsWith(`config.yaml: ${keyPath}: `), e.message).toBe(true);
  expect(e.message).toContain(text);
}

const group = (c: Draft) => c.storageSystems[0].svolGroups[0];

describe('svolGroups in the configuration', () => {
  it('accepts a group with RO, RW and spare members and keeps logicalId and increments as given', () => {
    const cfg = accept();
    expect(cfg.storageSystems[0]!.svolGroups).toEqual([
      {
        name: 'backup',
        pvol: 1,
        members: [
          { vol: 2, attr: 'RO' },
          { vol: 3, attr: 'RW', increments: 9 },
          { vol: 4, attr: 'RO', logicalId: 40 },
          { vol: 5, attr: 'spare' },
        ],
      },
    ]);
  });

  it('takes spreadReads and ioTimeout per group (a duration in ms or s)', () => {
    const cfg = accept((c) => Object.assign(group(c), { spreadReads: true, ioTimeout: '2.5s' }));
    expect(cfg.storageSystems[0]!.svolGroups![0]).toMatchObject({ spreadReads: true, ioTimeout: 2500 });
    expect(accept((c) => (group(c).ioTimeout = 400)).storageSystems[0]!.svolGroups![0]!.ioTimeout).toBe(400);
    expect(accept().storageSystems[0]!.svolGroups![0]).not.toHaveProperty('ioTimeout');
  });

  it('refuses a spreadReads that is not true or false, and an ioTimeout that is not a duration from 100ms to 600s', () => {
    refuse((c) => (group(c).spreadReads = 'yes'), 'storageSystems[0].svolGroups[0].spreadReads', 'expected true or false, got "yes"');
    refuse((c) => (group(c).ioTimeout = '5m'), 'storageSystems[0].svolGroups[0].ioTimeout', 'expected a duration such as 30s or 500ms, got "5m"');
    refuse((c) => (group(c).ioTimeout = '50ms'), 'storageSystems[0].svolGroups[0].ioTimeout', 'ioTimeout must be from 100ms to 600s, got "50ms"');
    refuse((c) => (group(c).ioTimeout = 700_000), 'storageSystems[0].svolGroups[0].ioTimeout', 'ioTimeout must be from 100ms to 600s, got 700000');
  });

  it('refuses an unknown attribute and names the three', () => {
    refuse((c) => (group(c).members[0].attr = 'ro'), 'storageSystems[0].svolGroups[0].members[0].attr', 'expected RO, RW or spare, got "ro"');
  });

  it('refuses a misspelt member key and suggests the right one', () => {
    refuse(
      (c) => {
        group(c).members[2].logicalID = 40;
        delete group(c).members[2].logicalId;
      },
      'storageSystems[0].svolGroups[0].members[2].logicalID',
      'unknown key (did you mean "logicalId"?)',
    );
  });

  it('refuses a member volume that does not exist', () => {
    refuse((c) => (group(c).members[0].vol = 77), 'storageSystems[0].svolGroups[0].members[0].vol', 'volume 77 does not exist in storage system 1');
  });

  it('refuses a P-VOL that is also a pair volume', () => {
    refuse((c) => (group(c).pvol = 10), 'storageSystems[0].svolGroups[0].pvol', 'volume 10 of storage system 1 is already used by pair "pair1"');
  });

  it('refuses a volume used twice in one group', () => {
    refuse((c) => (group(c).members[1].increments = 2), 'storageSystems[0].svolGroups[0].members[1].increments', 'volume 2 of storage system 1 is already used by member 0 of group "backup"');
  });

  it('refuses a member of another size than its P-VOL', () => {
    refuse(
      (c) => {
        c.storageSystems[0].volumes.push({ id: 12, size: '32MiB' });
        group(c).members[0].vol = 12;
      },
      'storageSystems[0].svolGroups[0].members[0].vol',
      'volume 12 is 32MiB but the P-VOL 1 is 64MiB (an S-VOL must be the same size)',
    );
  });

  it('refuses an RW member without an increments volume', () => {
    refuse((c) => delete group(c).members[1].increments, 'storageSystems[0].svolGroups[0].members[1]', 'missing required key: increments');
  });

  it('refuses an increments volume too small for the map of the P-VOL', () => {
    refuse(
      (c) => {
        c.storageSystems[0].volumes.push({ id: 12, size: '64KiB' });
        group(c).members[1].increments = 12;
      },
      'storageSystems[0].svolGroups[0].members[1].increments',
      "increments volume 12 is 64KiB, too small: its map of the P-VOL's clusters and one cluster of data need 128KiB",
    );
  });

  it('refuses a logicalId on a spare', () => {
    refuse((c) => (group(c).members[3].logicalId = 50), 'storageSystems[0].svolGroups[0].members[3].logicalId', 'a spare is not exported');
  });

  it('refuses two members with one logical ID', () => {
    refuse((c) => (group(c).members[2].logicalId = 2), 'storageSystems[0].svolGroups[0].members[2].logicalId', 'logical ID 2 is already taken by storageSystems[0].svolGroups[0].members[0]');
  });

  it('refuses a logical ID that shadows a volume exported under its own id', () => {
    refuse((c) => (group(c).members[2].logicalId = 10), 'storageSystems[0].svolGroups', 'logical ID 10 of storageSystems[0].svolGroups[0].members[2] is the id of volume 10, which is exported as vol10 itself');
  });

  it('refuses a group of spares only', () => {
    refuse((c) => (group(c).members = [{ vol: 5, attr: 'spare' }]), 'storageSystems[0].svolGroups[0].members', 'has only spares');
  });

  it('refuses a group without members', () => {
    refuse((c) => (group(c).members = []), 'storageSystems[0].svolGroups[0].members', 'a group needs at least one member');
  });

  it('refuses two groups of one name', () => {
    refuse(
      (c) => c.storageSystems[0].svolGroups.push({ name: 'backup', pvol: 10, members: [{ vol: 11, attr: 'RO' }] }) && (c.pairs = []),
      'storageSystems[0].svolGroups[1].name',
      'duplicate S-VOL group name "backup"',
    );
  });
});

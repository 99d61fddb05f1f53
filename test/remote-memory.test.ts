// Pairs of memory volumes, all storage systems in this process (issue 18):
//   - cross-SS sync: a host WRITE of 1 MiB lands in the master volume's memory straight from the
//     host's socket (the pair's master forwards the store's write target), and the replicated
//     WRITE is sent from those pages and lands in the mirror volume's memory straight from the
//     data connection; a fault set on the mirror volume turns the target off there and still fails
//     the replicated writes;
//   - cross-SS async, and same-SS sync and async pairs: fio's verified 1 MiB writes into the
//     master's memory, a steady random write load with the sync daemon at its busy pace.
// fio verifies every block through the master, and each scenario ends comparing every copy's own
// bytes with the master's, and with every slot of the master's store accounted for.
import { afterEach, describe, expect, it, vi } from 'vitest';
import pino from 'pino';
import { MemoryDevice } from '../src/blockdev/memory.js';
import type { BlockDevice, WriteTarget } from '../src/blockdev/types.js';
import { parseConfig } from '../src/cluster/config.js';
import { startStorageSystems } from '../src/cluster/cluster.js';
import type { StorageSystem } from '../src/controller/storage-system.js';
import { connect } from '../src/nbd/client.js';
import { freePort, run } from './helpers/servers.js';
import { requireTools } from './helpers/clients.js';
import { encodeRequest, openSession } from './helpers/raw.js';
import { expectSlotsBack } from './helpers/memory.js';
import { Cmd } from '../src/protocol/constants.js';

const MiB = 1024 * 1024;
const SIZE = 32 * MiB;
const log = pino({ level: 'silent' });

let systems: StorageSystem[] = [];
afterEach(async () => {
  vi.restoreAllMocks();
  await Promise.all(systems.map((s) => s.close()));
  systems = [];
});

interface Counts {
  opened: number;
  committed: number;
  aborted: number;
  /** Targets held for mirrors to be written from (a sync pair's master). */
  held: number;
}

/** Counts the write targets memory volumes hand out and how they end, per volume. */
function countTargets() {
  const by = new Map<MemoryDevice, Counts>();
  const of = (d: MemoryDevice): Counts => {
    let c = by.get(d);
    if (!c) by.set(d, (c = { opened: 0, committed: 0, aborted: 0, held: 0 }));
    return c;
  };
  const real = MemoryDevice.prototype.writeTarget;
  vi.spyOn(MemoryDevice.prototype, 'writeTarget').mockImplementation(function (this: MemoryDevice, offset: number, length: number, from: number): WriteTarget | null {
    const t = real.call(this, offset, length, from);
    if (!t) return null;
    const n = of(this);
    n.opened++;
    return {
      pieces: t.pieces,
      commit: (head, fua) => {
        n.committed++;
        return t.commit(head, fua);
      },
      abort: () => {
        n.aborted++;
        t.abort();
      },
      hold: () => {
        n.held++;
        return t.hold!();
      },
    };
  });
  return { of, devices: by };
}

/** The memory store under volume `vol`'s stack (the bottom of openVolumeStack's layers). */
function store(ss: StorageSystem, vol: number): MemoryDevice {
  const stack = (ss as unknown as { volumes: Map<number, { backing: BlockDevice }> }).volumes.get(vol)!;
  expect(stack.backing).toBeInstanceOf(MemoryDevice);
  return stack.backing as MemoryDevice;
}


async function fioVerify(uri: string, rw = 'write', bs = '1M', extra: string[] = []): Promise<void> {
  const f = await run('fio', [
    '--name=v', '--ioengine=nbd', `--uri=${uri}`, `--rw=${rw}`, `--bs=${bs}`, '--iodepth=8', `--size=${SIZE}`, ...extra,
    '--verify=crc32c', '--do_verify=1', '--verify_fatal=1', '--verify_state_save=0', '--output-format=terse',
  ], { timeoutMs: 60_000 });
  expect(f.code, f.stderr).toBe(0);
}

async function twoSystems(mode: 'sync' | 'async' = 'sync'): Promise<{ ss1: StorageSystem; ss2: StorageSystem; uri: string }> {
  const peers = [await freePort(), await freePort()];
  const admins = [await freePort(), await freePort()]; // required by the config; nothing listens here
  const yaml = `clusterSize: 64KiB
peerTimeout: 2s
storageSystems:
${[1, 2]
  .map(
    (id) => `  - id: ${id}
    nbd: 127.0.0.1:0
    admin: 127.0.0.1:${admins[id - 1]}
    peer: 127.0.0.1:${peers[id - 1]}
    volumes:
      - { id: 5, size: 32MiB }`,
  )
  .join('\n')}
pairs:
  - { name: spair, mode: ${mode}, master: { ss: 1, vol: 5 }, mirrors: [ { ss: 2, vol: 5 } ] }
`;
  systems = await startStorageSystems(parseConfig(yaml, 'remote-memory.yaml', '/tmp'), [1, 2], log);
  const [ss1, ss2] = systems as [StorageSystem, StorageSystem];
  await waitFor(() => pairOf(ss1)?.state === 'PAIR' && pairOf(ss1)?.mirrors[0]?.connected === true, 'the pair in PAIR with its mirror connected');
  return { ss1, ss2, uri: `nbd://${ss1.nbdAddr}/vol5` };
}

function pairOf(ss: StorageSystem) {
  return ss.report().pairs.find((p) => p.name === 'spair');
}

async function waitFor(ok: () => boolean, what: string, ms = 20_000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!ok()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

async function readVolume(uri: string): Promise<Buffer> {
  const c = await connect(uri);
  try {
    return await c.pread(SIZE, 0);
  } finally {
    await c.disconnect();
  }
}

describe('replicated writes into a memory mirror', () => {
  it('land in the master\'s and in the mirror\'s memory without a copy, fio verifies through the master, and the mirror\'s own bytes equal the master\'s', async () => {
    requireTools('fio');
    const n = countTargets();
    const { ss1, ss2, uri } = await twoSystems();
    await fioVerify(uri);
    const p = pairOf(ss1)!;
    expect(p).toMatchObject({ state: 'PAIR', role: 'master' });
    expect(p.mirrors[0]).toMatchObject({ invalidClusters: 0, connected: true });
    // Both volumes hand out targets, one per 1 MiB write: the host's on the master, held while the
    // replicated write is sent from its pages, and the replicated one on the mirror.
    const master = n.of(store(ss1, 5));
    const mirror = n.of(store(ss2, 5));
    expect(n.devices.size).toBe(2);
    for (const c of [master, mirror]) {
      expect(c.opened).toBeGreaterThanOrEqual(SIZE / MiB);
      expect(c.committed).toBe(c.opened);
      expect(c.aborted).toBe(0);
    }
    expect(master.held).toBe(master.committed);
    expect(mirror.held).toBe(0);
    const own = Buffer.alloc(SIZE);
    await store(ss2, 5).read(0, own);
    expect(own.equals(await readVolume(uri))).toBe(true);
    expectSlotsBack(store(ss1, 5));
    expect(store(ss2, 5).reservedBytes).toBe(0);
  });

  it('with an error fault set on the mirror volume, take no target there and suspend the pair; after the automatic resync the copies are equal', async () => {
    requireTools('fio');
    const n = countTargets();
    const { ss1, uri } = await twoSystems();
    const ss2 = systems[1]!;
    ss2.setFault({ target: '2:5', kind: 'error', op: 'write' });
    const f = await run('fio', ['--name=w', '--ioengine=nbd', `--uri=${uri}`, '--rw=write', '--bs=1M', '--iodepth=8', '--size=8M', '--output-format=terse'], { timeoutMs: 60_000 });
    expect(f.code, f.stderr).toBe(0); // fence: never, the master goes on
    await waitFor(() => pairOf(ss1)?.state === 'PSUE', 'the pair suspended');
    expect(n.of(store(ss2, 5)).opened).toBe(0);
    // The master still took its payloads into its memory, and gave back every page it held for the failed mirror writes.
    expect(n.of(store(ss1, 5)).committed).toBeGreaterThan(0);
    expectSlotsBack(store(ss1, 5));
    ss2.clearFault('2:5');
    // The failed replicated write dropped the link; once it is back, autoResync copies what the mirror missed.
    await waitFor(() => pairOf(ss1)?.state === 'PAIR' && pairOf(ss1)?.mirrors[0]?.invalidClusters === 0, 'the resync done', 40_000);
    expect(n.of(store(ss2, 5)).opened).toBeGreaterThan(0); // the resync's 4 MiB copies landed in the mirror's memory
    const own = Buffer.alloc(SIZE);
    await store(ss2, 5).read(0, own);
    expect(own.equals(await readVolume(uri))).toBe(true);
  });
});

describe('an async cross-SS pair of memory volumes', () => {
  it('takes fio\'s verified 1 MiB writes into the master\'s memory, marks them for the daemon, and the mirror\'s own bytes end equal to the master\'s', async () => {
    requireTools('fio');
    const n = countTargets();
    const { ss1, ss2, uri } = await twoSystems('async');
    await fioVerify(uri);
    const master = n.of(store(ss1, 5));
    expect(master.committed).toBeGreaterThanOrEqual(SIZE / MiB);
    expect(master.held).toBe(0); // async: no mirror is written from the host's pages
    await waitFor(() => pairOf(ss1)?.state === 'PAIR' && pairOf(ss1)?.mirrors[0]?.invalidClusters === 0, 'the daemon done', 40_000);
    const own = Buffer.alloc(SIZE);
    await store(ss2, 5).read(0, own);
    expect(own.equals(await readVolume(uri))).toBe(true);
    expectSlotsBack(store(ss1, 5));
  });

  it('takes fio\'s verified 4k writes while the daemon keeps its pace, then copies the rest: the mirror\'s own bytes equal the master\'s', async () => {
    requireTools('fio');
    const { ss1, ss2, uri } = await twoSystems('async');
    const f = await run('fio', [
      '--name=a', '--ioengine=nbd', `--uri=${uri}`, '--rw=randwrite', '--bs=4k', '--iodepth=16', `--size=${SIZE}`, '--io_size=16M',
      '--verify=crc32c', '--do_verify=1', '--verify_fatal=1', '--verify_state_save=0', '--output-format=terse',
    ], { timeoutMs: 60_000 });
    expect(f.code, f.stderr).toBe(0);
    await waitFor(() => pairOf(ss1)?.state === 'PAIR' && pairOf(ss1)?.mirrors[0]?.invalidClusters === 0, 'the daemon done', 40_000);
    const own = Buffer.alloc(SIZE);
    await ss2.volumeDevice(5)!.read(0, own); // below the pair layer: the mirror's own copy, never the master's
    expect(own.equals(await readVolume(uri))).toBe(true);
  });
});

async function oneSystem(): Promise<StorageSystem> {
  const admin = await freePort(); // required by the config; nothing listens here
  const yaml = `clusterSize: 64KiB
storageSystems:
  - id: 1
    nbd: 127.0.0.1:0
    admin: 127.0.0.1:${admin}
    volumes:
      - { id: 5, size: 32MiB }
      - { id: 6, size: 32MiB }
      - { id: 7, size: 32MiB }
      - { id: 8, size: 32MiB }
pairs:
  - { name: spair, mode: sync, master: { ss: 1, vol: 5 }, mirrors: [ { ss: 1, vol: 6 } ] }
  - { name: apair, mode: async, master: { ss: 1, vol: 8 }, mirrors: [ { ss: 1, vol: 7 } ] }
`;
  systems = await startStorageSystems(parseConfig(yaml, 'local-memory.yaml', '/tmp'), [1], log);
  const ss = systems[0]!;
  const state = (name: string) => ss.report().pairs.find((p) => p.name === name);
  await waitFor(() => state('spair')?.state === 'PAIR' && state('apair')?.state === 'PAIR', 'both pairs in PAIR');
  return ss;
}

describe('pairs of memory volumes in one storage system', () => {
  it('take fio\'s verified 1 MiB writes into the masters\' memory; the sync mirror is written from the master\'s pages, the async one by the daemon, and every copy ends equal to its master', async () => {
    requireTools('fio');
    const n = countTargets();
    const ss = await oneSystem();
    const uri = (vol: number) => `nbd://${ss.nbdAddr}/vol${vol}`;
    await Promise.all([fioVerify(uri(5)), fioVerify(uri(8))]);
    const sync = n.of(store(ss, 5));
    const async = n.of(store(ss, 8));
    for (const c of [sync, async]) {
      expect(c.committed).toBeGreaterThanOrEqual(SIZE / MiB);
      expect(c.aborted).toBe(0);
    }
    expect(sync.held).toBe(sync.committed);
    expect(async.held).toBe(0);
    const state = (name: string) => ss.report().pairs.find((p) => p.name === name)!;
    expect(state('spair')).toMatchObject({ state: 'PAIR' });
    expect(state('spair').mirrors[0]!.invalidClusters).toBe(0); // a sync mirror misses nothing
    await waitFor(() => state('apair').state === 'PAIR' && state('apair').mirrors[0]!.invalidClusters === 0, 'the daemon done', 40_000);
    for (const [master, mirror] of [[5, 6], [8, 7]] as const) {
      const want = Buffer.alloc(SIZE);
      await store(ss, master).read(0, want);
      expect(want.equals(await readVolume(uri(master)))).toBe(true);
      const own = Buffer.alloc(SIZE);
      await store(ss, mirror).read(0, own);
      expect(own.equals(want), `vol${mirror}`).toBe(true);
      expectSlotsBack(store(ss, master));
    }
  });

  it('leave a sync pair\'s copies, its bitmap and the master\'s pages as they were when a host goes away mid-payload', async () => {
    const n = countTargets();
    const ss = await oneSystem();
    const [host, port] = ss.nbdAddr.split(':') as [string, string];
    const before = Buffer.alloc(SIZE);
    await store(ss, 5).read(0, before);
    const s = await openSession({ host, port: Number(port) }, { name: 'vol5' });
    // A 2 MiB WRITE whose payload stops after 700 KiB.
    await s.client.writeAndDrain(encodeRequest({ type: Cmd.WRITE, cookie: 7n, offset: 65536n + 100n, length: 2 * MiB, payload: Buffer.alloc(700 * 1024, 0xee) }));
    await waitFor(() => store(ss, 5).reservedBytes > 0, 'the payload landing in the master\'s pages');
    s.client.destroy();
    await waitFor(() => n.of(store(ss, 5)).aborted === 1, 'the target given back');
    expect(n.of(store(ss, 5)).committed).toBe(0);
    expectSlotsBack(store(ss, 5));
    const spair = ss.report().pairs.find((p) => p.name === 'spair')!;
    expect(spair).toMatchObject({ state: 'PAIR' });
    expect(spair.mirrors[0]!.invalidClusters).toBe(0);
    for (const vol of [5, 6]) {
      const now = Buffer.alloc(SIZE);
      await store(ss, vol).read(0, now);
      expect(now.equals(before), `vol${vol}`).toBe(true);
    }
  });
});

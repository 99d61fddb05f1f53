// Cross-SS pairs of memory volumes, both storage systems in this process (issue 18):
//   - sync: the replicated WRITEs of 1 MiB land in the mirror volume's memory straight from the
//     data connection (its replication export offers the memory store's write target); a fault set
//     on the mirror volume turns the target off and still fails the replicated writes;
//   - async: a steady random write load with the sync daemon at its busy pace, then the catch-up.
// fio verifies every block through the master, and each scenario ends comparing the mirror's own
// bytes with the master's.
import { afterEach, describe, expect, it, vi } from 'vitest';
import pino from 'pino';
import { MemoryDevice } from '../src/blockdev/memory.js';
import type { WriteTarget } from '../src/blockdev/types.js';
import { parseConfig } from '../src/cluster/config.js';
import { startStorageSystems } from '../src/cluster/cluster.js';
import type { StorageSystem } from '../src/controller/storage-system.js';
import { connect } from '../src/nbd/client.js';
import { freePort, run } from './helpers/servers.js';
import { requireTools } from './helpers/clients.js';

const MiB = 1024 * 1024;
const SIZE = 32 * MiB;
const log = pino({ level: 'silent' });

let systems: StorageSystem[] = [];
afterEach(async () => {
  vi.restoreAllMocks();
  await Promise.all(systems.map((s) => s.close()));
  systems = [];
});

/** Counts the write targets memory volumes hand out and how they end, and which volumes gave them. */
function countTargets() {
  const n = { opened: 0, committed: 0, aborted: 0, devices: new Set<MemoryDevice>() };
  const real = MemoryDevice.prototype.writeTarget;
  vi.spyOn(MemoryDevice.prototype, 'writeTarget').mockImplementation(function (this: MemoryDevice, offset: number, length: number, from: number): WriteTarget | null {
    const t = real.call(this, offset, length, from);
    if (!t) return null;
    n.opened++;
    n.devices.add(this);
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
    };
  });
  return n;
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
  it('land in the mirror volume\'s memory without a copy, fio verifies through the master, and the mirror\'s own bytes equal the master\'s', async () => {
    requireTools('fio');
    const n = countTargets();
    const { ss1, uri } = await twoSystems();
    const f = await run('fio', [
      '--name=v', '--ioengine=nbd', `--uri=${uri}`, '--rw=write', '--bs=1M', '--iodepth=8', `--size=${SIZE}`,
      '--verify=crc32c', '--do_verify=1', '--verify_fatal=1', '--verify_state_save=0', '--output-format=terse',
    ], { timeoutMs: 60_000 });
    expect(f.code, f.stderr).toBe(0);
    const p = pairOf(ss1)!;
    expect(p).toMatchObject({ state: 'PAIR', role: 'master' });
    expect(p.mirrors[0]).toMatchObject({ invalidClusters: 0, connected: true });
    // Only the mirror volume hands out targets (the master's stack offers none), one per replicated 1 MiB write.
    expect(n.devices.size).toBe(1);
    expect(n.opened).toBeGreaterThanOrEqual(SIZE / MiB);
    expect(n.committed + n.aborted).toBe(n.opened);
    expect(n.aborted).toBe(0);
    const [mirror] = [...n.devices];
    const own = Buffer.alloc(SIZE);
    await mirror!.read(0, own);
    expect(own.equals(await readVolume(uri))).toBe(true);
    expect(mirror!.reservedBytes).toBe(0);
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
    expect(n.opened).toBe(0);
    ss2.clearFault('2:5');
    // The failed replicated write dropped the link; once it is back, autoResync copies what the mirror missed.
    await waitFor(() => pairOf(ss1)?.state === 'PAIR' && pairOf(ss1)?.mirrors[0]?.invalidClusters === 0, 'the resync done', 40_000);
    const [mirror] = [...n.devices];
    expect(mirror).toBeDefined(); // the resync's 4 MiB copies landed in the mirror's memory
    const own = Buffer.alloc(SIZE);
    await mirror!.read(0, own);
    expect(own.equals(await readVolume(uri))).toBe(true);
  });
});

describe('an async cross-SS pair of memory volumes under a steady random write load', () => {
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

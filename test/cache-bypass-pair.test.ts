// A sync pair in one storage system with cache memory: a large WRITE goes past both caches
// (cache/memory.ts, rule 5), lands in the master's pages through the write targets of every layer,
// and the mirror adopts those pages instead of copying them, as it does without a cache. Small
// writes are still staged in the caches; at the end both copies are equal byte for byte, through
// the caches and on the stores, and every slot of the pool is back in one place.
import { describe, expect, it } from 'vitest';
import { pino } from 'pino';
import { FaultDevice, FaultSet } from '../src/blockdev/fault.js';
import { MemoryDevice, SlabPool } from '../src/blockdev/memory.js';
import type { BlockDevice } from '../src/blockdev/types.js';
import { MemoryBitmapStore } from '../src/controller/bitmap-store.js';
import { CacheMemory } from '../src/controller/cache.js';
import { Pair } from '../src/controller/pair.js';
import { pseudoRandom } from './helpers/clients.js';
import { expectSlotsBack } from './helpers/memory.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE = 8 * MiB;
const CLUSTER = 64 * KiB;
const log = pino({ level: 'silent' });

async function bytes(dev: BlockDevice, offset: number, length: number): Promise<Buffer> {
  const b = Buffer.alloc(length);
  await dev.read(offset, b);
  return b;
}

function rig(bypass: number) {
  const pool = new SlabPool();
  const cache = new CacheMemory({ size: 4 * MiB, destageDelayMs: 60_000, bypass });
  const mems = [new MemoryDevice(SIZE, false, pool), new MemoryDevice(SIZE, false, pool)] as const;
  const cached = mems.map((m, i) => cache.wrap(m, `vol${i + 1}`));
  const pair = new Pair({
    name: 'p',
    mode: 'sync',
    clusterSize: CLUSTER,
    master: { ref: { ss: 1, vol: 1 }, device: new FaultDevice(cached[0]!, new FaultSet(), 'ss1/vol1') },
    mirrors: [{ ref: { ss: 1, vol: 2 }, device: new FaultDevice(cached[1]!, new FaultSet(), 'ss1/vol2') }],
    store: new MemoryBitmapStore(SIZE / CLUSTER, 1),
    loaded: null,
    identical: true,
    fence: 'never',
    log,
    cleanDelayMs: 3_600_000,
  });
  return { cache, mems, cached, pair, host: pair.masterDevice() };
}

/** A WRITE as the NBD server does it with a target: the payload after `from` lands in the target's pieces. */
async function targetWrite(host: BlockDevice, offset: number, data: Buffer, from: number): Promise<boolean> {
  const t = host.writeTarget?.(offset, data.length, from);
  if (!t) {
    await host.write(offset, data);
    return false;
  }
  let at = from;
  for (const p of t.pieces) at += data.copy(p, 0, at);
  await t.commit(data.subarray(0, from));
  return true;
}

describe('a sync pair with cache memory', () => {
  it('takes a 1 MiB WRITE into the master\'s pages past the cache, the mirror adopts them, and both copies stay equal under small cached writes', async () => {
    const r = rig(1 * MiB);
    const model = Buffer.alloc(SIZE);
    const big = pseudoRandom(2 * MiB, 5);
    expect(await targetWrite(r.host, 1 * MiB, big.subarray(0, 1 * MiB), 0)).toBe(true);
    expect(r.mems[1].adoptedBytes).toBe(1 * MiB);
    expect(r.mems[1].storeBytes).toBe(0); // the mirror made no page of its own
    // write() goes past the caches too, but a plain buffer is copied, not adopted.
    await r.host.write(2 * MiB, big.subarray(1 * MiB));
    big.copy(model, 1 * MiB);
    expect(r.cache.stats).toMatchObject({ bypassedBytes: 4 * MiB, dirtyBytes: 0 }); // 2 MiB on each copy
    expect(r.mems[1].adoptedBytes).toBe(1 * MiB);

    // Small writes over the shared pages: staged in the cache, then destaged by copy on write.
    for (let i = 0; i < 64; i++) {
      const off = ((i * 7919 * 4 * KiB) % (3 * MiB)) + 512;
      const d = pseudoRandom(4 * KiB - 512, 100 + i);
      await r.host.write(off, d);
      d.copy(model, off);
    }
    expect(r.cache.stats.dirtyBytes).toBeGreaterThan(0);
    for (const dev of [r.host, r.pair.mirrorDevice(0), r.cached[1]!]) expect((await bytes(dev, 0, SIZE)).equals(model)).toBe(true);
    await r.host.flush();
    expect(r.cache.stats.dirtyBytes).toBe(0);
    for (const m of r.mems) expect((await bytes(m, 0, SIZE)).equals(model)).toBe(true);
    await r.cache.close();
    for (const c of r.cached) await c.close();
    for (const m of r.mems) expectSlotsBack(m);
  });

  it('copies into both caches when the bypass is off: no target, nothing adopted, and the copies still equal', async () => {
    const r = rig(0);
    const big = pseudoRandom(1 * MiB, 6);
    expect(await targetWrite(r.host, 0, big, 0)).toBe(false);
    expect(r.cache.stats).toMatchObject({ bypassedBytes: 0, dirtyBytes: 2 * MiB });
    await r.host.flush();
    expect(r.mems[1].adoptedBytes).toBe(0);
    for (const m of r.mems) expect((await bytes(m, 0, 1 * MiB)).equals(big)).toBe(true);
    await r.cache.close();
    for (const c of r.cached) await c.close();
  });
});

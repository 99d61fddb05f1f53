import { afterEach, describe, expect, it } from 'vitest';
import { MemoryDevice } from '../src/blockdev/memory.js';
import { BlockDeviceError, type BlockDevice, type Extent, type Payload, type ZeroOptions } from '../src/blockdev/types.js';
import { CacheMemory, type CachedDevice } from '../src/controller/cache.js';

const KiB = 1024;
const MiB = 1024 * KiB;

/**
 * A MemoryDevice seen through a probe: counts calls, and can hold backing
 * writes (the data is copied when the write is submitted, as a device with
 * its own queue would) or reads, or fail writes.
 */
class ProbeDevice implements BlockDevice {
  readonly size: number;
  readonly readOnly = false;
  readonly multiConnSafe = true;
  readonly fastZero = true;
  reads = 0;
  flushes = 0;
  closed = false;
  writes: { offset: number; length: number; fua: boolean }[] = [];
  /** Called at each backing write, before it lands (e.g. to check an invariant). */
  onWrite: (() => void) | undefined;
  failWrites = 0;
  private writeGate: Promise<void> | null = null;
  private trimGate: Promise<void> | null = null;
  private readGate: Promise<void> | null = null;
  /** Random small delays (in event-loop turns) on every op. */
  jitter = false;

  constructor(readonly inner: MemoryDevice) {
    this.size = inner.size;
  }

  holdWrites(): () => void {
    let release!: () => void;
    this.writeGate = new Promise((r) => (release = r));
    return () => {
      this.writeGate = null;
      release();
    };
  }

  holdTrims(): () => void {
    let release!: () => void;
    this.trimGate = new Promise((r) => (release = r));
    return () => {
      this.trimGate = null;
      release();
    };
  }

  holdReads(): () => void {
    let release!: () => void;
    this.readGate = new Promise((r) => (release = r));
    return () => {
      this.readGate = null;
      release();
    };
  }

  private async wiggle(): Promise<void> {
    if (!this.jitter) return;
    const n = Math.floor(Math.random() * 3);
    for (let i = 0; i < n; i++) await new Promise((r) => setImmediate(r));
  }

  async read(offset: number, dest: Buffer): Promise<void> {
    this.reads++;
    if (this.readGate) await this.readGate;
    await this.wiggle();
    this.inner.readSync(offset, dest);
  }

  async write(offset: number, data: Payload, fua = false): Promise<void> {
    const copy = Buffer.concat(Buffer.isBuffer(data) ? [data] : [...data]);
    this.writes.push({ offset, length: copy.length, fua });
    this.onWrite?.();
    if (this.writeGate) await this.writeGate;
    await this.wiggle();
    if (this.failWrites > 0) {
      this.failWrites--;
      throw new BlockDeviceError('EIO', 'write: injected failure');
    }
    this.inner.writeSync(offset, copy);
  }

  async flush(): Promise<void> {
    this.flushes++;
  }

  trims = 0;

  async trim(offset: number, length: number): Promise<void> {
    this.trims++;
    if (this.trimGate) await this.trimGate;
    await this.inner.trim(offset, length);
  }

  zero(offset: number, length: number, opts?: ZeroOptions): Promise<void> {
    return this.inner.zero(offset, length, opts);
  }

  extents(offset: number, length: number): Promise<Extent[]> {
    return this.inner.extents(offset, length);
  }

  async close(): Promise<void> {
    this.closed = true;
  }
}

const caches: CacheMemory[] = [];

afterEach(async () => {
  for (const c of caches.splice(0)) await c.close().catch(() => {});
});

function setup(opts: { device?: number; cache?: number; blockSize?: number; delay?: number } = {}) {
  const mem = new MemoryDevice(opts.device ?? 1 * MiB);
  const probe = new ProbeDevice(mem);
  const cache = new CacheMemory({ size: opts.cache ?? 256 * KiB, blockSize: opts.blockSize ?? 64 * KiB, destageDelayMs: opts.delay ?? 60_000 });
  caches.push(cache);
  const dev = cache.wrap(probe, 'vol0');
  return { mem, probe, cache, dev };
}

function filled(n: number, byte: number): Buffer {
  return Buffer.alloc(n, byte);
}

/** Deterministic, position-dependent bytes: any misplaced byte shows. */
function pattern(n: number, seed: number): Buffer {
  const b = Buffer.allocUnsafe(n);
  let x = (seed * 2654435761) >>> 0 || 1;
  for (let i = 0; i < n; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    b[i] = x & 0xff;
  }
  return b;
}

async function readBack(dev: BlockDevice, offset: number, n: number): Promise<Buffer> {
  const b = Buffer.alloc(n);
  await dev.read(offset, b);
  return b;
}

function backing(mem: MemoryDevice, offset: number, n: number): Buffer {
  const b = Buffer.alloc(n);
  mem.readSync(offset, b);
  return b;
}

/** Byte comparison that is fast on big buffers and names the first difference. */
function expectBytes(actual: Buffer, expected: Buffer): void {
  if (actual.equals(expected)) return;
  let i = 0;
  while (i < actual.length && actual[i] === expected[i]) i++;
  expect.fail(`buffers differ at byte ${i} (length ${actual.length} vs ${expected.length}): got ${actual[i]}, expected ${expected[i]}`);
}

async function until(cond: () => boolean): Promise<void> {
  for (let i = 0; i < 1000 && !cond(); i++) await new Promise((r) => setImmediate(r));
  expect(cond()).toBe(true);
}

describe('CacheMemory', () => {
  it('counts a hit for each cached block read and a miss for each block read from the backing', async () => {
    const { cache, dev, probe } = setup();
    await readBack(dev, 0, 64 * KiB);
    expect(cache.stats).toMatchObject({ hits: 0, misses: 1 });
    await readBack(dev, 0, 64 * KiB);
    expect(cache.stats).toMatchObject({ hits: 1, misses: 1 });
    await readBack(dev, 32 * KiB, 64 * KiB); // half cached block 0, half uncached block 1
    expect(cache.stats).toMatchObject({ hits: 2, misses: 2 });
    expect(probe.reads).toBe(2);
  });

  it('serves a read after a write from the cache without touching the backing device', async () => {
    const { dev, probe, mem } = setup();
    const data = pattern(4 * KiB, 1);
    await dev.write(8 * KiB, data);
    expectBytes(await readBack(dev, 8 * KiB, 4 * KiB), data);
    expect(probe.reads).toBe(0);
    expect(probe.writes).toHaveLength(0);
    expect(mem.allocatedBytes).toBe(0);
  });

  it('reads the rest of a unit from the backing device before a write that covers it only in part', async () => {
    const { dev, mem } = setup();
    const old = pattern(64 * KiB, 2);
    mem.writeSync(0, old);
    await dev.write(10, filled(100, 0xee));
    const expected = Buffer.from(old);
    expected.fill(0xee, 10, 110);
    expectBytes(await readBack(dev, 0, 64 * KiB), expected);
    await dev.flush();
    expectBytes(backing(mem, 0, 64 * KiB), expected);
  });

  it('never holds more than its size while writing ten times its size, and everything reads back after a flush', async () => {
    const { cache, dev, probe, mem } = setup({ device: 4 * MiB, cache: 256 * KiB, blockSize: 16 * KiB, delay: 5 });
    probe.jitter = true;
    let maxUsed = 0;
    const sample = (): void => {
      maxUsed = Math.max(maxUsed, cache.stats.usedBytes);
    };
    probe.onWrite = sample;
    const model = Buffer.alloc(4 * MiB);
    let written = 0;
    let seed = 10;
    const inFlight = new Set<Promise<void>>();
    const ranges: [number, number][] = [];
    while (written < 10 * cache.size) {
      const len = 1 + ((seed * 7919) % (40 * KiB));
      const off = ((seed * 104729) % (4 * MiB - len)) & ~511;
      // Writes in flight together are disjoint, so the expected content is exact.
      if (inFlight.size >= 8 || ranges.some(([s, e]) => s < off + len && off < e)) {
        await Promise.all(inFlight);
        ranges.length = 0;
      }
      ranges.push([off, off + len]);
      const data = pattern(len, seed++);
      data.copy(model, off);
      const pieces = [data.subarray(0, len >> 1), data.subarray(len >> 1)];
      const p = dev.write(off, seed % 2 ? data : pieces).then(() => {
        sample();
        inFlight.delete(p);
      });
      inFlight.add(p);
      written += len;
    }
    await Promise.all(inFlight);
    expect(maxUsed).toBeLessThanOrEqual(cache.size);
    expect(maxUsed).toBe(cache.size);
    await dev.flush();
    expect(cache.stats.dirtyBytes).toBe(0);
    expectBytes(backing(mem, 0, 4 * MiB), model);
    expectBytes((await readBack(dev, 0, 4 * MiB)), model);
    expect(cache.stats.usedBytes).toBeLessThanOrEqual(cache.size);
  });

  it('flushes exactly the dirty data to the backing device, coalescing neighbouring blocks into one write', async () => {
    const { cache, dev, probe, mem } = setup({ device: 2 * MiB, cache: 512 * KiB });
    mem.writeSync(1 * MiB, pattern(64 * KiB, 3));
    await readBack(dev, 1 * MiB, 64 * KiB); // cached clean: not written back
    const a = pattern(3 * 64 * KiB, 4); // three whole blocks
    const b = pattern(4 * KiB, 5);
    await dev.write(128 * KiB, a);
    await dev.write(600 * KiB, b);
    expect(mem.allocatedBytes).toBe(64 * KiB);
    expect(cache.stats.dirtyBytes).toBe(4 * 64 * KiB);

    await dev.flush();
    expect(probe.writes).toEqual([
      { offset: 128 * KiB, length: a.length, fua: false },
      { offset: 600 * KiB, length: b.length, fua: false },
    ]);
    expect(probe.flushes).toBe(1);
    expect(cache.stats.destagedBytes).toBe(a.length + b.length);
    expect(cache.stats.dirtyBytes).toBe(0);
    const expected = Buffer.alloc(2 * MiB);
    a.copy(expected, 128 * KiB);
    b.copy(expected, 600 * KiB);
    pattern(64 * KiB, 3).copy(expected, 1 * MiB);
    expectBytes(backing(mem, 0, 2 * MiB), expected);

    await dev.flush(); // nothing dirty: no more writes
    expect(probe.writes).toHaveLength(2);
  });

  it('has a FUA write on the backing device before its promise resolves', async () => {
    const { dev, probe, mem } = setup();
    const data = pattern(6 * KiB, 6);
    await dev.write(3 * KiB, data, true);
    expectBytes(backing(mem, 3 * KiB, 6 * KiB), data);
    expect(probe.flushes).toBe(1);
    await dev.write(100 * KiB, data); // without FUA it stays in cache
    expectBytes(backing(mem, 100 * KiB, 6 * KiB), Buffer.alloc(6 * KiB));
  });

  it('keeps a write that lands on a block while the block is being destaged, and destages it again', async () => {
    const { cache, dev, probe, mem } = setup();
    await dev.write(0, filled(64 * KiB, 0xaa));
    const release = probe.holdWrites();
    const flushed = dev.flush();
    await until(() => probe.writes.length === 1); // the destage took 0xaa and is in flight
    await dev.write(0, filled(4 * KiB, 0xbb));
    expectBytes(await readBack(dev, 0, 8 * KiB), Buffer.concat([filled(4 * KiB, 0xbb), filled(4 * KiB, 0xaa)]));
    release();
    await flushed;
    // The flush covered what was written before it; the newer write is still dirty.
    expectBytes(backing(mem, 0, 4 * KiB), filled(4 * KiB, 0xaa));
    expect(cache.stats.dirtyBytes).toBe(64 * KiB);
    await dev.flush();
    expectBytes(backing(mem, 0, 8 * KiB), Buffer.concat([filled(4 * KiB, 0xbb), filled(4 * KiB, 0xaa)]));
    expect(cache.stats.dirtyBytes).toBe(0);
  });

  it('flushes a write that landed while an older destage of its block was in flight', async () => {
    const { dev, probe, mem } = setup();
    await dev.write(0, filled(64 * KiB, 0xaa));
    const release = probe.holdWrites();
    const first = dev.flush();
    await until(() => probe.writes.length === 1);
    await dev.write(0, filled(4 * KiB, 0xbb));
    const second = dev.flush(); // must not settle for the destage that predates the write
    release();
    await Promise.all([first, second]);
    expectBytes(backing(mem, 0, 8 * KiB), Buffer.concat([filled(4 * KiB, 0xbb), filled(4 * KiB, 0xaa)]));
  });

  it('keeps a write that lands during a background destage', async () => {
    const { cache, dev, probe, mem } = setup({ delay: 0 });
    const release = probe.holdWrites();
    await dev.write(0, filled(64 * KiB, 1));
    await until(() => probe.writes.length === 1);
    await dev.write(0, filled(64 * KiB, 2));
    release();
    await until(() => probe.writes.length === 2 && cache.stats.dirtyBytes === 0);
    expectBytes(backing(mem, 0, 64 * KiB), filled(64 * KiB, 2));
  });

  it('does not resurrect trimmed or zeroed data when dirty blocks are flushed later', async () => {
    const { cache, dev, mem } = setup({ cache: 1 * MiB }); // below the high-water mark: all stays dirty
    await dev.write(0, filled(256 * KiB, 0x11));
    expect(cache.stats.dirtyBytes).toBe(256 * KiB);
    await dev.trim(64 * KiB, 64 * KiB); // one whole block
    await dev.zero(1000, 3000); // part of a block, not unit-aligned
    await dev.trim(200 * KiB, 4 * KiB, true);
    const expected = filled(256 * KiB, 0x11);
    expected.fill(0, 64 * KiB, 128 * KiB);
    expected.fill(0, 1000, 4000);
    expected.fill(0, 200 * KiB, 204 * KiB);
    // Flush before reading: a read could refill trimmed units and hide stale ones.
    await dev.flush();
    expectBytes(backing(mem, 0, 256 * KiB), expected);
    expectBytes(await readBack(dev, 0, 256 * KiB), expected);
  });

  it('lets a destage already in flight land before a trim of the same range', async () => {
    const { dev, probe, mem } = setup();
    await dev.write(0, filled(64 * KiB, 0x22));
    const release = probe.holdWrites();
    const flushed = dev.flush();
    await until(() => probe.writes.length === 1);
    let trimmed = false;
    const trim = dev.trim(0, 64 * KiB).then(() => (trimmed = true));
    await new Promise((r) => setImmediate(r));
    expect(trimmed).toBe(false); // waits for the destage it must not be overtaken by
    release();
    await Promise.all([flushed, trim]);
    expectBytes(backing(mem, 0, 64 * KiB), Buffer.alloc(64 * KiB));
    await dev.flush();
    expectBytes(backing(mem, 0, 64 * KiB), Buffer.alloc(64 * KiB));
    expectBytes(await readBack(dev, 0, 64 * KiB), Buffer.alloc(64 * KiB));
  });

  it.each([
    ['a whole block', 0, 64 * KiB],
    ['part of a block', 4 * KiB, 8 * KiB],
  ])('does not cache data that a read fetched from the backing before a trim of %s completed', async (_what, off, len) => {
    const { dev, probe, mem } = setup();
    mem.writeSync(0, filled(64 * KiB, 0x33));
    const release = probe.holdReads();
    const racing = readBack(dev, 0, 64 * KiB); // a miss: the backing read is held
    await until(() => probe.reads === 1);
    await dev.trim(off, len);
    // Let the held read return what it would have seen had it run before the trim.
    mem.writeSync(0, filled(64 * KiB, 0x33));
    release();
    expectBytes(await racing, filled(64 * KiB, 0x33)); // concurrent with the trim: old data is a fine answer
    mem.zero(off, len);
    // ...but it must not have been kept in cache.
    const expected = filled(64 * KiB, 0x33).fill(0, off, off + len);
    expectBytes(await readBack(dev, 0, 64 * KiB), expected);
  });

  it('starts no background destage of a range while a trim of it is under way', async () => {
    const { cache, dev, probe, mem } = setup({ cache: 1 * MiB });
    await dev.write(0, filled(64 * KiB, 0x44));
    const releaseTrim = probe.holdTrims();
    const releaseWrites = probe.holdWrites();
    const trim = dev.trim(0, 64 * KiB);
    await until(() => probe.trims === 1);
    // Past the high-water mark: the destager runs at once.
    await dev.write(64 * KiB, filled(9 * 64 * KiB, 0x55));
    await until(() => probe.writes.length > 0);
    for (let i = 0; i < 10; i++) await new Promise((r) => setImmediate(r));
    expect(probe.writes.filter((w) => w.offset < 64 * KiB)).toEqual([]);
    releaseTrim();
    await trim;
    releaseWrites();
    await dev.flush();
    expect(probe.writes.filter((w) => w.offset < 64 * KiB)).toEqual([]);
    expectBytes(backing(mem, 0, 64 * KiB), Buffer.alloc(64 * KiB));
    expectBytes(await readBack(dev, 0, 64 * KiB), Buffer.alloc(64 * KiB));
    expect(cache.stats.dirtyBytes).toBe(0);
  });

  it('makes a flush wait for a trim under way before destaging its range', async () => {
    const { dev, probe, mem } = setup();
    await dev.write(0, filled(64 * KiB, 0x44));
    const releaseTrim = probe.holdTrims();
    const trim = dev.trim(0, 64 * KiB);
    await until(() => probe.trims === 1);
    const flushed = dev.flush();
    for (let i = 0; i < 10; i++) await new Promise((r) => setImmediate(r));
    expect(probe.writes).toEqual([]);
    releaseTrim();
    await Promise.all([trim, flushed]);
    expect(probe.writes).toEqual([]); // the trim dropped the dirty block: nothing left to write
    expectBytes(backing(mem, 0, 64 * KiB), Buffer.alloc(64 * KiB));
  });

  it('never returns data older than a write that completed before the read started', async () => {
    const { dev, probe } = setup({ device: 256 * KiB, cache: 64 * KiB, blockSize: 16 * KiB, delay: 0 });
    probe.jitter = true;
    let completed = 0; // highest version whose write completed
    const reads: Promise<void>[] = [];
    const writes: Promise<void>[] = [];
    for (let v = 1; v <= 120; v++) {
      // Other blocks keep the cache evicting and destaging.
      writes.push(dev.write(((v % 12) + 2) * 16 * KiB, filled(16 * KiB, v)));
      writes.push(dev.write(0, filled(20 * KiB, v)).then(() => void (completed = Math.max(completed, v))));
      const floor = completed;
      reads.push(
        readBack(dev, 0, 20 * KiB).then((got) => {
          for (const byte of [got[0]!, got[8 * KiB]!, got[16 * KiB]!, got[20 * KiB - 1]!]) {
            expect(byte).toBeGreaterThanOrEqual(floor);
          }
        }),
      );
      if (v % 4 === 0) await Promise.all(writes.splice(0));
    }
    await Promise.all([...writes, ...reads]);
  });

  it('shares one budget between the volumes of a storage system', async () => {
    const cache = new CacheMemory({ size: 256 * KiB, blockSize: 64 * KiB, destageDelayMs: 60_000 });
    caches.push(cache);
    const a = cache.wrap(new MemoryDevice(1 * MiB), 'vol0');
    const b = cache.wrap(new MemoryDevice(1 * MiB), 'vol1');
    await readBack(a, 0, 256 * KiB);
    expect(cache.stats.usedBytes).toBe(256 * KiB);
    await b.write(0, filled(128 * KiB, 9));
    expect(cache.stats.usedBytes).toBe(256 * KiB);
    expect(cache.stats.dirtyBytes).toBe(128 * KiB);
    // vol0's least recently used blocks made room for vol1's.
    const misses = cache.stats.misses;
    await readBack(a, 128 * KiB, 128 * KiB);
    expect(cache.stats.misses).toBe(misses);
    await readBack(a, 0, 64 * KiB);
    expect(cache.stats.misses).toBe(misses + 1);
    expect(cache.stats.usedBytes).toBe(256 * KiB);
    expectBytes(await readBack(b, 0, 128 * KiB), filled(128 * KiB, 9));
  });

  it('makes writers wait for destaging when every block is dirty', async () => {
    const { cache, dev, probe, mem } = setup({ cache: 128 * KiB, blockSize: 64 * KiB });
    const release = probe.holdWrites();
    await dev.write(0, filled(128 * KiB, 1));
    let done = false;
    const third = dev.write(128 * KiB, filled(64 * KiB, 2)).then(() => (done = true));
    await until(() => probe.writes.length > 0);
    expect(done).toBe(false);
    expect(cache.stats.usedBytes).toBe(128 * KiB);
    release();
    await third;
    await dev.flush();
    expectBytes(backing(mem, 0, 192 * KiB), Buffer.concat([filled(128 * KiB, 1), filled(64 * KiB, 2)]));
  });

  it('keeps data dirty after a failed destage and reports the failure at flush', async () => {
    const { cache, dev, probe, mem } = setup();
    await dev.write(0, filled(4 * KiB, 7));
    probe.failWrites = 1;
    await expect(dev.flush()).rejects.toMatchObject({ errno: 'EIO' });
    expect(cache.stats.dirtyBytes).toBe(64 * KiB);
    expectBytes(await readBack(dev, 0, 4 * KiB), filled(4 * KiB, 7));
    await dev.flush();
    expectBytes(backing(mem, 0, 4 * KiB), filled(4 * KiB, 7));
  });

  it('writes dirty data back before reporting extents', async () => {
    const { dev } = setup();
    await dev.write(64 * KiB, filled(4 * KiB, 1));
    const ext = await dev.extents(0, 128 * KiB);
    expect(ext).toEqual([
      { length: 64 * KiB, flags: 3 },
      { length: 4 * KiB, flags: 0 },
      { length: 60 * KiB, flags: 3 },
    ]);
  });

  it('takes size and capabilities from the backing device and refuses writes to a read-only one', async () => {
    const cache = new CacheMemory({ size: 256 * KiB });
    caches.push(cache);
    const ro = cache.wrap(new MemoryDevice(1 * MiB, true), 'ro');
    expect(ro).toMatchObject({ size: 1 * MiB, readOnly: true, multiConnSafe: true, fastZero: true });
    await expect(ro.write(0, filled(512, 1))).rejects.toMatchObject({ errno: 'EPERM' });
    expect(cache.stats.dirtyBytes).toBe(0);
  });

  it('destages and closes the backing device on close, then refuses requests', async () => {
    const { dev, probe, mem } = setup();
    await dev.write(0, filled(8 * KiB, 5));
    await dev.close();
    expect(probe.closed).toBe(true);
    expectBytes(backing(mem, 0, 8 * KiB), filled(8 * KiB, 5));
    await expect(readBack(dev, 0, 512)).rejects.toMatchObject({ errno: 'ESHUTDOWN' });
  });

  it('destages every volume when the cache memory closes, and the volumes still close afterwards', async () => {
    const { cache, dev, mem } = setup({ delay: 60_000 });
    const other = new MemoryDevice(1 * MiB);
    const dev2: CachedDevice = cache.wrap(other, 'vol1');
    await dev.write(0, filled(4 * KiB, 1));
    await dev2.write(0, filled(4 * KiB, 2));
    await cache.close();
    expect(cache.stats.dirtyBytes).toBe(0);
    expectBytes(backing(mem, 0, 4 * KiB), filled(4 * KiB, 1));
    expectBytes(backing(other, 0, 4 * KiB), filled(4 * KiB, 2));
    await expect(dev.write(0, filled(1, 1))).rejects.toMatchObject({ errno: 'ESHUTDOWN' });
    await dev.close();
    await dev2.close();
    expect(cache.stats.usedBytes).toBe(0);
  });

  it('forgets everything, dirty or not, on a crash and leaves the backing as it was', async () => {
    const { cache, dev, mem } = setup();
    await dev.write(0, filled(4 * KiB, 1), true);
    await dev.write(0, filled(4 * KiB, 2));
    cache.crash();
    expect(cache.stats).toMatchObject({ usedBytes: 0, dirtyBytes: 0 });
    expectBytes(backing(mem, 0, 4 * KiB), filled(4 * KiB, 1));
    await expect(readBack(dev, 0, 512)).rejects.toMatchObject({ errno: 'ESHUTDOWN' });
  });
});

describe('CacheMemory: large writes go past the cache (rule 5)', () => {
  it('writes a 1 MiB write straight to the volume, and what the cache held of its range, dirty or clean, is not written or read again', async () => {
    const { cache, dev, probe, mem } = setup({ device: 4 * MiB, cache: 512 * KiB });
    await dev.write(0, filled(4 * KiB, 1)); // dirty in block 0
    mem.writeSync(1 * MiB - 64 * KiB, filled(64 * KiB, 2));
    await readBack(dev, 1 * MiB - 64 * KiB, 64 * KiB); // clean in the last block of the range
    await dev.write(1 * MiB, filled(4 * KiB, 3)); // dirty just past it: stays
    const data = pattern(1 * MiB, 4);
    await dev.write(0, [data.subarray(0, 100), data.subarray(100)]);
    expect(probe.writes).toEqual([{ offset: 0, length: 1 * MiB, fua: false }]);
    expect(cache.stats).toMatchObject({ bypassedBytes: 1 * MiB, dirtyBytes: 64 * KiB, usedBytes: 64 * KiB });
    expectBytes(backing(mem, 0, 1 * MiB), data);
    const reads = probe.reads;
    expectBytes(await readBack(dev, 0, 1 * MiB + 4 * KiB), Buffer.concat([data, filled(4 * KiB, 3)]));
    expect(probe.reads).toBeGreaterThan(reads); // from the volume: the cache let the range go
    await dev.flush();
    expect(probe.writes.slice(1)).toEqual([{ offset: 1 * MiB, length: 4 * KiB, fua: false }]);
    expectBytes(backing(mem, 0, 1 * MiB + 4 * KiB), Buffer.concat([data, filled(4 * KiB, 3)]));
  });

  it('sends a sequential stream of 128 KiB writes past the cache once it has written the bypass size, but not random ones, nor a stream of writes smaller than a cache block', async () => {
    const { cache, dev, mem } = setup({ device: 16 * MiB, cache: 8 * MiB });
    const model = Buffer.alloc(16 * MiB);
    const put = async (off: number, len: number, seed: number): Promise<void> => {
      const d = pattern(len, seed);
      d.copy(model, off);
      await dev.write(off, d);
    };
    // Two streams at once, interleaved, as two writers would send them.
    for (let i = 0; i < 12; i++) {
      await put(i * 128 * KiB, 128 * KiB, i);
      await put(8 * MiB + i * 128 * KiB, 128 * KiB, 100 + i);
    }
    // Each stream's first MiB (8 writes) was staged, the next 4 writes went past.
    expect(cache.stats.bypassedBytes).toBe(2 * 4 * 128 * KiB);
    const staged = cache.stats.dirtyBytes;
    expect(staged).toBe(2 * MiB);
    // 128 KiB writes that do not follow one another stay in the cache.
    for (let i = 0; i < 12; i++) await put(4 * MiB + ((i * 5) % 12) * 256 * KiB, 128 * KiB, 200 + i);
    expect(cache.stats.bypassedBytes).toBe(1 * MiB);
    // Nor does a stream of 32 KiB writes, smaller than a cache block, however long.
    for (let i = 0; i < 64; i++) await put(12 * MiB + i * 32 * KiB, 32 * KiB, 300 + i);
    expect(cache.stats.bypassedBytes).toBe(1 * MiB);
    expectBytes(await readBack(dev, 0, 16 * MiB), model);
    await dev.flush();
    expectBytes(backing(mem, 0, 16 * MiB), model);
  });

  it('stages a large write when the bypass is 0, and one whose ends are not on a unit\'s boundary', async () => {
    const { cache, dev } = setup({ device: 4 * MiB, cache: 8 * MiB });
    await dev.write(512, filled(1 * MiB, 1)); // units of 2 KiB
    expect(cache.stats.bypassedBytes).toBe(0);
    expect(cache.stats.dirtyBytes).toBeGreaterThan(1 * MiB);
    cache.bypassBytes = 0;
    await dev.write(2 * MiB, filled(1 * MiB, 2));
    expect(cache.stats.bypassedBytes).toBe(0);
    expect(cache.stats.dirtyBytes).toBeGreaterThan(2 * MiB);
    cache.bypassBytes = 1 * MiB;
    await dev.write(2 * MiB, filled(1 * MiB - 2 * KiB, 3)); // aligned, one unit short of the size
    expect(cache.stats.bypassedBytes).toBe(0);
    await dev.write(2 * MiB + 2 * KiB, filled(1 * MiB, 4)); // aligned and large enough
    expect(cache.stats.bypassedBytes).toBe(1 * MiB);
    expectBytes(await readBack(dev, 2 * MiB, 2 * KiB), filled(2 * KiB, 3));
    expectBytes(await readBack(dev, 2 * MiB + 2 * KiB, 1 * MiB), filled(1 * MiB, 4));
    await dev.flush();
    expectBytes(await readBack(dev, 2 * MiB, 1 * MiB + 2 * KiB), Buffer.concat([filled(2 * KiB, 3), filled(1 * MiB, 4)]));
  });

  it('lets a destage of its range already in flight land first, and starts none until it has landed', async () => {
    const { cache, dev, probe, mem } = setup({ device: 4 * MiB, cache: 512 * KiB });
    await dev.write(64 * KiB, filled(4 * KiB, 1));
    const release = probe.holdWrites();
    const flushing = dev.flush(); // the destage of block 1 waits in the backing
    await until(() => probe.writes.length === 1);
    await dev.write(64 * KiB, filled(4 * KiB, 2)); // dirty again, behind the destage
    const big = dev.write(0, filled(1 * MiB, 3));
    for (let i = 0; i < 5; i++) await new Promise((r) => setImmediate(r));
    expect(probe.writes).toHaveLength(1); // the large write waits for the destage
    release();
    await Promise.all([flushing, big]);
    expect(probe.writes.map((w) => w.length)).toEqual([4 * KiB, 1 * MiB]);
    await dev.flush(); // nothing older left to land over it
    expectBytes(backing(mem, 0, 1 * MiB), filled(1 * MiB, 3));
    expectBytes(await readBack(dev, 0, 1 * MiB), filled(1 * MiB, 3));
    expect(cache.stats.dirtyBytes).toBe(0);
  });

  it('drops a read\'s fill that read the volume before the large write landed', async () => {
    const { dev, probe, mem } = setup({ device: 4 * MiB, cache: 512 * KiB });
    mem.writeSync(0, filled(1 * MiB + 64 * KiB, 1));
    const release = probe.holdReads();
    const racing = readBack(dev, 0, 64 * KiB); // a miss: the block is allocated, the backing read held
    await until(() => probe.reads === 1);
    await dev.write(2 * KiB, filled(1 * MiB, 2)); // starts mid-block, on a unit's boundary
    // Let the held read return what it would have seen had it run before the write.
    mem.writeSync(0, filled(1 * MiB + 64 * KiB, 1));
    release();
    expectBytes(await racing, filled(64 * KiB, 1)); // concurrent with the write: old data is a fine answer
    mem.writeSync(2 * KiB, filled(1 * MiB, 2));
    // ...but it must not have been kept in cache.
    expectBytes(await readBack(dev, 2 * KiB, 1 * MiB), filled(1 * MiB, 2));
    expectBytes(await readBack(dev, 0, 2 * KiB), filled(2 * KiB, 1));
  });

  it('keeps the acknowledged dirty data of its range when the large write fails, and writes it at the next flush', async () => {
    const { cache, dev, probe, mem } = setup({ device: 4 * MiB, cache: 512 * KiB });
    await dev.write(0, filled(4 * KiB, 1));
    probe.failWrites = 1;
    await expect(dev.write(0, filled(1 * MiB, 2))).rejects.toMatchObject({ errno: 'EIO' });
    expect(cache.stats.bypassedBytes).toBe(0);
    expectBytes(await readBack(dev, 0, 4 * KiB), filled(4 * KiB, 1));
    await dev.flush();
    expectBytes(backing(mem, 0, 8 * KiB), Buffer.concat([filled(4 * KiB, 1), filled(4 * KiB, 0)]));
  });

  it('has a FUA write, or any write under write-through, on the volume with FUA before it answers', async () => {
    const { cache, dev, probe } = setup({ device: 4 * MiB, cache: 512 * KiB });
    await dev.write(0, filled(1 * MiB, 1), true);
    cache.writeThrough = true;
    await dev.write(1 * MiB, filled(1 * MiB, 2));
    expect(probe.writes).toEqual([
      { offset: 0, length: 1 * MiB, fua: true },
      { offset: 1 * MiB, length: 1 * MiB, fua: true },
    ]);
  });

  it('lands a WRITE\'s payload in the memory store\'s pages through its write target, and gives them back if the volume closed first', async () => {
    const cache = new CacheMemory({ size: 512 * KiB, destageDelayMs: 60_000 });
    caches.push(cache);
    const mem = new MemoryDevice(4 * MiB);
    const dev = cache.wrap(mem, 'vol0');
    await dev.write(0, filled(4 * KiB, 1)); // dirty, in the range: replaced
    expect(dev.writeTarget(0, 64 * KiB, 0)).toBeNull(); // too small: staged
    expect(dev.writeTarget(512, 1 * MiB, 0)).toBeNull(); // not on a unit's boundary
    const t = dev.writeTarget(0, 1 * MiB, 4 * KiB)!;
    expect(t).not.toBeNull();
    const data = pattern(1 * MiB, 7);
    let at = 4 * KiB;
    for (const p of t.pieces) at += data.copy(p, 0, at);
    expect(at).toBe(1 * MiB);
    await t.commit(data.subarray(0, 4 * KiB));
    expect(cache.stats).toMatchObject({ bypassedBytes: 1 * MiB, dirtyBytes: 0 });
    expectBytes(await readBack(dev, 0, 1 * MiB), data);
    await dev.flush();
    expectBytes(backing(mem, 0, 1 * MiB), data);

    const late = dev.writeTarget(1 * MiB, 1 * MiB, 0)!;
    expect(mem.reservedBytes).toBe(1 * MiB);
    await dev.close();
    await expect(late.commit(Buffer.alloc(0))).rejects.toMatchObject({ errno: 'ESHUTDOWN' });
    expect(mem.reservedBytes).toBe(0);
  });
});

import { describe, it, expect } from 'vitest';
import fc from 'fast-check';
import { RangeLock } from '../src/blockdev/range-lock.js';
import { AtomicDevice, MiscompareError } from '../src/blockdev/atomic.js';
import { MemoryDevice } from '../src/blockdev/memory.js';
import { FilterDevice } from '../src/blockdev/filter.js';
import type { Payload } from '../src/blockdev/types.js';

/** A device whose writes land in two halves with a yield between: a torn write is visible to a racing reader. */
class TearingDevice extends FilterDevice {
  override async write(offset: number, data: Payload): Promise<void> {
    const b = Buffer.isBuffer(data) ? data : Buffer.concat(data as Buffer[]);
    const half = b.length >> 1;
    await this.next.write(offset, b.subarray(0, half));
    await new Promise((r) => setImmediate(r));
    await this.next.write(offset + half, b.subarray(half));
  }
}

describe('RangeLock', () => {
  it('lets disjoint ranges through at once and makes overlapping ones wait in arrival order', async () => {
    const lock = new RangeLock();
    const order: string[] = [];
    const r1 = await lock.acquire(0, 10);
    const r2 = await lock.acquire(10, 10); // disjoint: granted at once
    const p3 = lock.acquire(5, 10).then((rel) => (order.push('c'), rel));
    const p4 = lock.acquire(6, 1).then((rel) => (order.push('d'), rel));
    await new Promise((r) => setImmediate(r));
    expect(order).toEqual([]);
    const tick = () => new Promise((r) => setImmediate(r));
    r1();
    await tick();
    expect(order).toEqual([]); // d still waits for c, which came first
    r2();
    const rel3 = await p3;
    await tick();
    expect(order).toEqual(['c']);
    rel3();
    (await p4)();
    expect(order).toEqual(['c', 'd']);
    expect(lock.size).toBe(0);
  });
});

describe('AtomicDevice', () => {
  it('writes on a match, and on a miscompare writes nothing and names the first differing byte', async () => {
    const mem = new MemoryDevice(1 << 16);
    const dev = new AtomicDevice(mem);
    await dev.write(512, Buffer.alloc(512, 1));
    await dev.compareAndWrite(512, Buffer.alloc(512, 1), Buffer.alloc(512, 2));
    const got = Buffer.alloc(512);
    await dev.read(512, got);
    expect(got.equals(Buffer.alloc(512, 2))).toBe(true);
    const exp = Buffer.alloc(512, 2);
    exp[100] = 9;
    const err = await dev.compareAndWrite(512, exp, Buffer.alloc(512, 3)).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(MiscompareError);
    expect((err as MiscompareError).firstDifference).toBe(100);
    await dev.read(512, got);
    expect(got.equals(Buffer.alloc(512, 2))).toBe(true);
  });

  it('never lets a compare see a torn write, for random interleavings of writes and compare-and-writes', async () => {
    await fc.assert(
      fc.asyncProperty(fc.array(fc.integer({ min: 0, max: 255 }), { minLength: 2, maxLength: 12 }), async (fills) => {
        const dev = new AtomicDevice(new TearingDevice(new MemoryDevice(4096)));
        await dev.write(0, Buffer.alloc(1024, fills[0]!));
        // Writers fill the block with one byte value; a CAW expecting the first value sees
        // either all-old or all-new, never a mix, or it would write a mix of its own.
        const ops = fills.slice(1).map((v, i) =>
          i % 2 ? dev.write(0, Buffer.alloc(1024, v)) : dev.compareAndWrite(0, Buffer.alloc(1024, fills[0]!), Buffer.alloc(1024, v)).catch((e: unknown) => {
            if (!(e instanceof MiscompareError)) throw e;
            expect(e.firstDifference).toBe(0); // a torn block would differ first in its second half
          }),
        );
        await Promise.all(ops);
        const got = Buffer.alloc(1024);
        await dev.read(0, got);
        expect(got.every((b) => b === got[0])).toBe(true);
      }),
      { numRuns: 200 },
    );
  });
});

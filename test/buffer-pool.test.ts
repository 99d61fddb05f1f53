// The I/O buffer pool (src/util/buffer-pool.ts): power-of-two classes from 4 KiB to 64 MiB, reuse
// after put(), a cap on idle bytes, eviction of the stalest class when full. NBD READ replies take
// their data buffer from it at the read's own size (transmission.ts), so a 1 MiB read holds 1 MiB,
// not a 2 MiB class.
import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { BufferPool } from '../src/util/buffer-pool.js';

describe('the I/O buffer pool', () => {
  it('gives exactly n bytes in the smallest power-of-two class that holds them', () => {
    const pool = new BufferPool();
    for (const [n, cls] of [
      [4096, 4096],
      [4097, 8192],
      [65536, 65536],
      [1 << 20, 1 << 20],
      [(1 << 20) + 16, 2 << 20],
    ] as const) {
      const b = pool.get(n);
      expect(b.length).toBe(n);
      expect(b.buffer.byteLength).toBe(cls);
    }
  });

  it('hands a buffer given back to the next request of its class, and 4 KiB reads are pooled', () => {
    const pool = new BufferPool();
    for (const n of [4096, 3000, 1 << 20]) {
      const a = pool.get(n);
      pool.put(a);
      const b = pool.get(n);
      expect(b.buffer).toBe(a.buffer);
      const c = pool.get(n);
      expect(c.buffer).not.toBe(a.buffer);
    }
  });

  it('does not pool buffers of 2 KiB or less, nor buffers it did not make', () => {
    const pool = new BufferPool();
    const small = pool.get(2048);
    pool.put(small);
    const next = pool.get(2048);
    // Node's own pool slices one slab for small buffers: the next one is another slice, never the same bytes.
    expect(next.buffer === small.buffer && next.byteOffset === small.byteOffset).toBe(false);
    const foreign = Buffer.alloc(8192);
    pool.put(foreign.subarray(16));
    expect(pool.get(8192).buffer).not.toBe(foreign.buffer);
  });

  it('keeps at most maxPooled idle bytes', () => {
    const pool = new BufferPool(64 * 1024);
    const bufs = Array.from({ length: 3 }, () => pool.get(32 * 1024));
    for (const b of bufs) pool.put(b);
    const again = [pool.get(32 * 1024), pool.get(32 * 1024), pool.get(32 * 1024)].map((b) => b.buffer);
    expect(again.filter((ab) => bufs.some((b) => b.buffer === ab))).toHaveLength(2);
  });
});

const KiB = 1024;
const MiB = 1024 * KiB;

describe('the I/O buffer pool when full', () => {
  it('makes room for a returned 4 MiB buffer by evicting idle 256 KiB ones, and hands it out next', () => {
    const pool = new BufferPool(8 * MiB);
    const small = Array.from({ length: 31 }, () => pool.get(256 * KiB));
    for (const b of small) pool.put(b); // 7.75 MiB idle
    const big = pool.get(4 * MiB);
    pool.put(big);
    expect(pool.idleBytes).toBe(8 * MiB);
    expect(pool.get(4 * MiB).buffer).toBe(big.buffer);
  });

  it('evicts the class returned to least recently, and its oldest buffer first', () => {
    const pool = new BufferPool(128 * KiB + 32 * KiB);
    const a = pool.get(64 * KiB); // its class is returned to first
    const b = pool.get(32 * KiB);
    const c = pool.get(32 * KiB);
    pool.put(a);
    pool.put(b);
    pool.put(c);
    pool.put(pool.get(128 * KiB)); // room for 128 KiB: a goes (the stalest class), then b (the older 32 KiB one)
    expect(pool.idleBytes).toBe(128 * KiB + 32 * KiB);
    expect(pool.get(64 * KiB).buffer).not.toBe(a.buffer);
    expect(pool.get(32 * KiB).buffer).toBe(c.buffer);
  });

  it('drops a returned buffer when the pool is full of idle ones of its own class', () => {
    const pool = new BufferPool(2 * 16 * KiB);
    const bufs = Array.from({ length: 3 }, () => pool.get(16 * KiB));
    for (const b of bufs) pool.put(b);
    expect(pool.idleBytes).toBe(2 * 16 * KiB);
    expect(new Set([pool.get(16 * KiB).buffer, pool.get(16 * KiB).buffer])).toEqual(new Set([bufs[0]!.buffer, bufs[1]!.buffer]));
  });

  it('never hands out memory that is still out, and never holds more than its limit (model)', () => {
    const sizes = [3000, 4 * KiB, 5 * KiB, 16 * KiB, 100 * KiB, 256 * KiB, MiB, MiB + 16, 4 * MiB];
    fc.assert(
      fc.property(fc.array(fc.tuple(fc.boolean(), fc.nat({ max: sizes.length - 1 }), fc.nat()), { maxLength: 120 }), fc.integer({ min: 1, max: 12 }), (ops, limitMiB) => {
        const pool = new BufferPool(limitMiB * MiB);
        const out: Buffer[] = [];
        for (const [take, si, pick] of ops) {
          if (take || out.length === 0) {
            const b = pool.get(sizes[si]!);
            expect(b.length).toBe(sizes[si]);
            // Small buffers are slices of Node's shared slab: the same ArrayBuffer, other bytes.
            for (const o of out) expect(o.buffer === b.buffer && o.byteOffset === b.byteOffset).toBe(false);
            out.push(b);
          } else {
            pool.put(out.splice(pick % out.length, 1)[0]!);
          }
          expect(pool.idleBytes).toBeLessThanOrEqual(limitMiB * MiB);
        }
      }),
      { numRuns: 100 },
    );
  });
});

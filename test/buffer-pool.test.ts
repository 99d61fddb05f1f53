// The I/O buffer pool (src/util/buffer-pool.ts): power-of-two classes from 4 KiB to 64 MiB, reuse
// after put(), a cap on idle bytes. NBD READ replies take their data buffer from it at the read's
// own size (transmission.ts), so a 1 MiB read holds 1 MiB, not a 2 MiB class.
import { describe, expect, it } from 'vitest';
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

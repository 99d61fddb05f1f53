// The sparse memory device against a plain Buffer: random writes (whole
// buffers and piece lists), trims, zeroes and reads at odd offsets.
import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { MemoryDevice } from '../src/blockdev/memory.js';
import { pseudoRandom } from './helpers/clients.js';

const SIZE = 3 * 1024 * 1024 + 5000; // not a whole number of pages or slabs

type Op =
  | { kind: 'write'; off: number; len: number; seed: number; pieces: number }
  | { kind: 'trim' | 'zero' | 'zeroKeep'; off: number; len: number }
  | { kind: 'read'; off: number; len: number };

const span = fc
  .tuple(fc.integer({ min: 0, max: SIZE - 1 }), fc.integer({ min: 1, max: 200_000 }))
  .map(([off, len]) => ({ off, len: Math.min(len, SIZE - off) }));

const op: fc.Arbitrary<Op> = fc.oneof(
  fc.tuple(span, fc.integer(), fc.integer({ min: 1, max: 4 })).map(([s, seed, pieces]) => ({ kind: 'write' as const, ...s, seed, pieces })),
  span.map((s) => ({ kind: 'trim' as const, ...s })),
  span.map((s) => ({ kind: 'zero' as const, ...s })),
  span.map((s) => ({ kind: 'zeroKeep' as const, ...s })),
  span.map((s) => ({ kind: 'read' as const, ...s })),
);


describe('MemoryDevice', () => {
  it('reads back exactly what a plain buffer would hold after any sequence of writes, trims and zeroes', async () => {
    await fc.assert(
      fc.asyncProperty(fc.array(op, { maxLength: 30 }), async (ops) => {
        const dev = new MemoryDevice(SIZE);
        const model = Buffer.alloc(SIZE);
        for (const o of ops) {
          if (o.kind === 'write') {
            const data = pseudoRandom(o.len, o.seed);
            const cut = Math.floor(o.len / o.pieces);
            const pieces = o.pieces === 1 ? data : Array.from({ length: o.pieces }, (_, i) => data.subarray(i * cut, i === o.pieces - 1 ? o.len : (i + 1) * cut));
            await dev.write(o.off, pieces);
            data.copy(model, o.off);
          } else if (o.kind === 'read') {
            const got = Buffer.alloc(o.len, 0xee);
            await dev.read(o.off, got);
            expect(got.equals(model.subarray(o.off, o.off + o.len))).toBe(true);
          } else {
            if (o.kind === 'trim') await dev.trim(o.off, o.len);
            else await dev.zero(o.off, o.len, { noHole: o.kind === 'zeroKeep' });
            model.fill(0, o.off, o.off + o.len);
          }
        }
        const all = Buffer.alloc(SIZE, 0xee);
        await dev.read(0, all);
        expect(all.equals(model)).toBe(true);
        // Holes are reported only where the data is zero.
        let at = 0;
        for (const e of await dev.extents(0, SIZE)) {
          if (e.flags & 2) expect(model.subarray(at, at + e.length).every((x) => x === 0)).toBe(true);
          at += e.length;
        }
        expect(at).toBe(SIZE);
      }),
      { numRuns: 60 },
    );
  });

  it('costs memory only for pages written, and gives trimmed pages back for reuse', async () => {
    const dev = new MemoryDevice(1024 * 1024 * 1024);
    expect(dev.allocatedBytes).toBe(0);
    await dev.write(5 * 4096 + 100, Buffer.alloc(10, 1));
    expect(dev.allocatedBytes).toBe(4096);
    expect(await dev.extents(0, 8 * 4096)).toEqual([
      { length: 5 * 4096, flags: 3 },
      { length: 4096, flags: 0 },
      { length: 2 * 4096, flags: 3 },
    ]);
    await dev.trim(0, 8 * 4096);
    expect(dev.allocatedBytes).toBe(0);
  });

  it('keeps pages apart on a sparse device of 20 TiB, past page 2^32, at the cost of the pages written', async () => {
    const dev = new MemoryDevice(20 * 2 ** 40);
    const low = 1023 * 4096; // the last page of the page table's first chunk (1024 pages)
    const high = low + 2 ** 32 * 4096; // the same page number modulo 2^32
    await dev.write(low, Buffer.alloc(4096, 0xaa));
    await dev.write(high, Buffer.alloc(8192, 0xbb)); // two pages, in two chunks
    const at = async (offset: number, n: number) => {
      const b = Buffer.alloc(n);
      await dev.read(offset, b);
      return b;
    };
    expect((await at(low, 4096)).equals(Buffer.alloc(4096, 0xaa))).toBe(true);
    expect((await at(high - 4096, 4 * 4096)).equals(Buffer.concat([Buffer.alloc(4096), Buffer.alloc(8192, 0xbb), Buffer.alloc(4096)]))).toBe(true);
    expect((await at(low + 4096, 4096)).equals(Buffer.alloc(4096))).toBe(true);
    expect(dev.allocatedBytes).toBe(3 * 4096);
    expect(await dev.extents(high - 4096, 4 * 4096)).toEqual([
      { length: 4096, flags: 3 },
      { length: 2 * 4096, flags: 0 },
      { length: 4096, flags: 3 },
    ]);
    await dev.trim(high, 2 * 4096);
    expect((await at(high, 8192)).equals(Buffer.alloc(8192))).toBe(true);
    expect((await at(low, 4096)).equals(Buffer.alloc(4096, 0xaa))).toBe(true);
    expect(dev.allocatedBytes).toBe(4096);
  });

  it('finds a write target a run of free slots below scattered ones, rather than refusing it', async () => {
    const dev = new MemoryDevice(16 << 20);
    await dev.write(0, Buffer.alloc(2 << 20, 7)); // pages 0-511 in slots 0-511
    await dev.trim(1 << 20, 1 << 20); // slots 256-511 free, in one run
    for (let p = 0; p < 256; p += 2) await dev.trim(p * 4096, 4096); // then every other slot of 0-255
    const payload = Buffer.from(Array.from({ length: 256 << 10 }, (_, i) => (i * 31) & 0xff));
    // The lowest free slots, and the last ones freed, are the scattered ones: 64 pages from them
    // would be 64 socket reads. Refused before, for as long as the free list stayed as it was.
    const t = dev.writeTarget(4 << 20, payload.length, 0);
    expect(t).not.toBeNull();
    // At most one run per 16 pages (each run is a socket read): here the 4 highest scattered
    // slots and 60 of the run above them.
    expect(t!.pieces.length).toBeLessThanOrEqual(5);
    let at = 0;
    for (const piece of t!.pieces) at += payload.copy(piece, 0, at);
    expect(at).toBe(payload.length);
    await t!.commit(Buffer.alloc(0));
    const back = Buffer.alloc(payload.length);
    await dev.read(4 << 20, back);
    expect(back.equals(payload)).toBe(true);
    const kept = Buffer.alloc(4096);
    await dev.read(4096, kept);
    expect(kept.equals(Buffer.alloc(4096, 7))).toBe(true);
    expect(dev.allocatedBytes + dev.freeBytes).toBe(dev.storeBytes);
    expect(dev.storeBytes).toBe(2 << 20); // no new slot was needed
  });

  it('lets a view or a held target taken before close() release into nothing, not into the pages written since', async () => {
    const dev = new MemoryDevice(1 << 20);
    await dev.write(0, Buffer.alloc(8192, 1));
    const view = dev.readViews(0, 8192)!;
    const t = dev.writeTarget(0, 65536, 0)!;
    const held = t.hold!();
    await dev.close();
    await dev.write(0, Buffer.alloc(8192, 2)); // slab 0 again, under the same slot numbers
    const fresh = dev.readViews(0, 4096)!;
    view.release();
    held.release();
    expect(dev.heldBytes).toBe(4096); // only the fresh view's page
    await dev.write(0, Buffer.alloc(4096, 3)); // copy on write: the fresh view keeps its bytes
    expect(fresh.pieces[0]!.equals(Buffer.alloc(4096, 2))).toBe(true);
    fresh.release();
    expect(dev.heldBytes).toBe(0);
  });

  it('refuses writes, trims and zeroes when read-only', async () => {
    const dev = new MemoryDevice(8192, true);
    await expect(dev.write(0, Buffer.alloc(1))).rejects.toMatchObject({ errno: 'EPERM' });
    await expect(dev.trim(0, 4096)).rejects.toMatchObject({ errno: 'EPERM' });
    await expect(dev.zero(0, 4096)).rejects.toMatchObject({ errno: 'EPERM' });
  });
});

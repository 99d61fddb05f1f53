// The sparse memory device against a plain Buffer: random writes (whole
// buffers and piece lists), trims, zeroes and reads at odd offsets.
import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { MemoryDevice } from '../src/blockdev/memory.js';
import { pseudoRandom } from './helpers/clients.js';
import { expectSlotsBack } from './helpers/memory.js';
import type { ReadViews } from '../src/blockdev/types.js';

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

  it('empties whole slabs for large writes over pages first written in random order, instead of refusing them for good', async () => {
    const MiB = 1 << 20;
    const dev = new MemoryDevice(64 * MiB);
    const model = Buffer.alloc(16 * MiB);
    // Every page of 16 MiB first written in a shuffled order: page p sits in a random slot.
    const order = Array.from({ length: 4096 }, (_, i) => i);
    let x = 12345;
    for (let i = order.length - 1; i > 0; i--) {
      x = (Math.imul(x, 1103515245) + 12345) >>> 0;
      const j = (x >>> 8) % (i + 1);
      [order[i], order[j]] = [order[j]!, order[i]!];
    }
    for (const p of order) {
      const b = Buffer.alloc(4096, p & 0xff);
      await dev.write(p * 4096, b);
      b.copy(model, p * 4096);
    }
    const store = dev.storeBytes;
    // Rewritten a MiB at a time, twice: each rewrite frees 256 scattered slots, which never make runs.
    let refused = 0;
    for (let pass = 0; pass < 2; pass++) {
      for (let m = 0; m < 16; m++) {
        const payload = pseudoRandom(MiB, 100 * pass + m + 1);
        const t = dev.writeTarget(m * MiB, MiB, 0);
        if (t === null) {
          refused++;
          await dev.write(m * MiB, payload);
        } else {
          expect(t.pieces.length).toBeLessThanOrEqual(1 + 256 / 16); // few socket reads
          let at = 0;
          for (const piece of t.pieces) at += payload.copy(piece, 0, at);
          await t.commit(Buffer.alloc(0));
        }
        payload.copy(model, m * MiB);
        // Pages moved out of the emptied slabs keep their bytes (most are rewritten only later).
        const now = Buffer.alloc(16 * MiB);
        await dev.read(0, now);
        expect(now.equals(model), `after the MiB at ${m}, pass ${pass}`).toBe(true);
      }
      if (pass === 0) expect(dev.compactions).toBeGreaterThan(0);
    }
    // The first rewrite finds no run until the free list holds a MiB (4 writes), and none after.
    expect(refused).toBeLessThanOrEqual(4);
    const back = Buffer.alloc(16 * MiB);
    await dev.read(0, back);
    expect(back.equals(model)).toBe(true);
    expect(dev.storeBytes).toBeLessThanOrEqual(store + MiB); // emptied slabs, not new ones
    expectSlotsBack(dev);
  });

  it('moves only pages nothing holds: a view and a held target see their bytes throughout compaction, and every volume matches a byte model', async () => {
    const MiB = 1 << 20;
    const SIZE = 4 * MiB; // 1024 pages: four slabs once full
    const op = fc.oneof(
      { arbitrary: fc.record({ kind: fc.constant('page' as const), page: fc.nat(1023), fill: fc.integer({ min: 1, max: 255 }) }), weight: 6 },
      { arbitrary: fc.record({ kind: fc.constant('big' as const), first: fc.nat(767), pages: fc.integer({ min: 32, max: 256 }), fill: fc.integer({ min: 1, max: 255 }), hold: fc.boolean() }), weight: 3 },
      { arbitrary: fc.record({ kind: fc.constant('view' as const), page: fc.nat(1023), pages: fc.integer({ min: 1, max: 64 }) }), weight: 1 },
      { arbitrary: fc.record({ kind: fc.constant('release' as const), which: fc.nat() }), weight: 1 },
      { arbitrary: fc.record({ kind: fc.constant('trim' as const), page: fc.nat(1023), pages: fc.integer({ min: 1, max: 8 }) }), weight: 1 },
    );
    let compactions = 0;
    await fc.assert(
      fc.asyncProperty(fc.array(op, { minLength: 50, maxLength: 250, size: 'max' }), fc.integer({ min: 1, max: 1 << 30 }), async (ops, seed) => {
        const dev = new MemoryDevice(SIZE);
        const model = Buffer.alloc(SIZE);
        // Scrambled from the start: every page written once in a shuffled order.
        let x = seed;
        const order = Array.from({ length: 1024 }, (_, i) => i);
        for (let i = order.length - 1; i > 0; i--) {
          x = (Math.imul(x, 1103515245) + 12345) >>> 0;
          const j = (x >>> 8) % (i + 1);
          [order[i], order[j]] = [order[j]!, order[i]!];
        }
        for (const p of order) await dev.write(p * 4096, Buffer.alloc(4096, 1 + (p % 250)));
        for (const p of order) model.fill(1 + (p % 250), p * 4096, (p + 1) * 4096);
        const out: { views: ReadViews; want: Buffer[] }[] = [];
        for (const o of ops) {
          if (o.kind === 'page') {
            await dev.write(o.page * 4096, Buffer.alloc(4096, o.fill));
            model.fill(o.fill, o.page * 4096, (o.page + 1) * 4096);
          } else if (o.kind === 'big') {
            const t = dev.writeTarget(o.first * 4096, o.pages * 4096, 0);
            if (t === null) continue;
            for (const piece of t.pieces) piece.fill(o.fill);
            if (o.hold) {
              const held = t.hold!();
              out.push({ views: held, want: held.pieces.map((q) => Buffer.from(q)) });
            }
            await t.commit(Buffer.alloc(0));
            model.fill(o.fill, o.first * 4096, (o.first + o.pages) * 4096);
          } else if (o.kind === 'view') {
            const len = Math.min(o.pages, 1024 - o.page) * 4096;
            const views = dev.readViews(o.page * 4096, len);
            out.push({ views, want: views.pieces.map((q) => Buffer.from(q)) });
          } else if (o.kind === 'release') {
            if (out.length === 0) continue;
            out.splice(o.which % out.length, 1)[0]!.views.release();
          } else {
            const len = Math.min(o.pages, 1024 - o.page) * 4096;
            await dev.trim(o.page * 4096, len);
            model.fill(0, o.page * 4096, o.page * 4096 + len);
          }
          for (const h of out) h.views.pieces.forEach((q, i) => expect(q.equals(h.want[i]!), 'a held page changed').toBe(true));
          expect(dev.auditPool(), JSON.stringify(o)).toEqual([]);
        }
        const back = Buffer.alloc(SIZE);
        await dev.read(0, back);
        expect(back.equals(model)).toBe(true);
        for (const h of out) h.views.release();
        compactions += dev.compactions;
        expectSlotsBack(dev);
      }),
      { numRuns: 20 },
    );
    expect(compactions).toBeGreaterThan(0); // the runs did empty slabs, not only refuse or find runs
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

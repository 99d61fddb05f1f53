// The memory volumes of one storage system share a SlabPool, and a write of another volume's held
// whole pages adopts them instead of copying (memory.ts). Each side must then see only its own
// writes: the adopter's changes go to new pages by copy on write, and the owner's stay in place
// once the adopter has a copy of its own (eviction). And every slot must stay in exactly one
// place, in its own volume's arena, and come back (SlabPool.audit).
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { MemoryDevice, SlabPool } from '../src/blockdev/memory.js';
import type { ReadViews } from '../src/blockdev/types.js';

const KiB = 1024;
const MiB = 1024 * KiB;

async function bytes(dev: MemoryDevice, offset: number, length: number): Promise<Buffer> {
  const b = Buffer.alloc(length);
  await dev.read(offset, b);
  return b;
}

/** A WRITE of `fill` through a write target of `dev`, held (as a sync pair holds its master's pages) before the commit. */
async function heldWrite(dev: MemoryDevice, offset: number, length: number, fill: number): Promise<ReadViews> {
  const t = dev.writeTarget(offset, length, 0)!;
  expect(t).not.toBeNull();
  for (const p of t.pieces) p.fill(fill);
  const held = t.hold!();
  await t.commit(Buffer.alloc(0));
  return held;
}

describe('memory volumes on one pool', () => {
  it('a mirror takes the master\'s held pages without a copy, and each side then changes its own pages only', async () => {
    const pool = new SlabPool();
    const master = new MemoryDevice(8 * MiB, false, pool);
    const mirror = new MemoryDevice(8 * MiB, false, pool);
    const held = await heldWrite(master, 0, 2 * MiB, 0xaa);
    await mirror.write(0, held.pieces);
    held.release();
    expect(mirror.adoptedBytes).toBe(2 * MiB);
    expect(master.storeBytes).toBe(2 * MiB);
    expect(mirror.storeBytes).toBe(0); // the mirror made no page of its own
    expect(master.auditPool()).toEqual([]);
    expect((await bytes(mirror, 0, 2 * MiB)).equals(Buffer.alloc(2 * MiB, 0xaa))).toBe(true);

    // The master changes part of a shared page, then the whole of another.
    await master.write(8 * KiB + 100, Buffer.alloc(50, 0x11));
    await master.write(MiB, Buffer.alloc(4 * KiB, 0x22));
    expect((await bytes(mirror, 0, 2 * MiB)).equals(Buffer.alloc(2 * MiB, 0xaa))).toBe(true);
    const m = await bytes(master, 0, 2 * MiB);
    expect(m.subarray(8 * KiB + 100, 8 * KiB + 150).equals(Buffer.alloc(50, 0x11))).toBe(true);
    expect(m[8 * KiB + 99]).toBe(0xaa);
    expect(m.subarray(MiB, MiB + 4 * KiB).equals(Buffer.alloc(4 * KiB, 0x22))).toBe(true);
    expect(master.auditPool()).toEqual([]);

    // The mirror (split) changes one of its adopted pages in part, trims a range, zeroes another.
    await mirror.write(4 * KiB + 10, Buffer.alloc(20, 0x33));
    await mirror.trim(1536 * KiB, 256 * KiB);
    await mirror.zero(16 * KiB, 8 * KiB, { noHole: true });
    const r = await bytes(mirror, 0, 2 * MiB);
    expect(r.subarray(4 * KiB + 10, 4 * KiB + 30).equals(Buffer.alloc(20, 0x33))).toBe(true);
    expect(r.subarray(1536 * KiB, 1792 * KiB).equals(Buffer.alloc(256 * KiB))).toBe(true);
    expect(r.subarray(16 * KiB, 24 * KiB).equals(Buffer.alloc(8 * KiB))).toBe(true);
    const m2 = await bytes(master, 0, 2 * MiB);
    expect(m2.subarray(4 * KiB, 4 * KiB + 4 * KiB).equals(Buffer.alloc(4 * KiB, 0xaa))).toBe(true);
    expect(m2.subarray(1536 * KiB, 1792 * KiB).equals(Buffer.alloc(256 * KiB, 0xaa))).toBe(true);
    expect(master.auditPool()).toEqual([]);

    // The master goes: the mirror keeps its pages, and once it goes too every slot is free.
    await master.close();
    expect((await bytes(mirror, 1792 * KiB, 256 * KiB)).equals(Buffer.alloc(256 * KiB, 0xaa))).toBe(true);
    expect(mirror.auditPool()).toEqual([]);
    await mirror.close();
    expect(mirror.auditPool()).toEqual([]);
    expect(mirror.freeBytes).toBe(mirror.storeBytes);
  });

  it('adopts the whole pages after a WRITE\'s head that came with its header, and copies the head\'s page', async () => {
    const pool = new SlabPool();
    const master = new MemoryDevice(MiB, false, pool);
    const mirror = new MemoryDevice(MiB, false, pool);
    // The first 100 bytes came with the header; the target holds the rest of the 64 KiB WRITE.
    const t = master.writeTarget(0, 64 * KiB, 100)!;
    for (const p of t.pieces) p.fill(5);
    const held = t.hold!();
    const head = Buffer.alloc(100, 4);
    await t.commit(head);
    await mirror.write(0, [head, ...held.pieces]);
    held.release();
    expect(mirror.adoptedBytes).toBe(60 * KiB);
    const want = Buffer.alloc(64 * KiB, 5);
    want.fill(4, 0, 100);
    expect((await bytes(mirror, 0, 64 * KiB)).equals(want)).toBe(true);
    expect((await bytes(master, 0, 64 * KiB)).equals(want)).toBe(true);
    expect(master.auditPool()).toEqual([]);
  });

  it('copies what is not a held whole page of the pool: a plain buffer, a page in part, a page nobody holds, another pool\'s page', async () => {
    const pool = new SlabPool();
    const a = new MemoryDevice(MiB, false, pool);
    const b = new MemoryDevice(MiB, false, pool);
    const other = new MemoryDevice(MiB, false, new SlabPool());
    await b.write(0, Buffer.alloc(64 * KiB, 1));
    const held = await heldWrite(a, 0, 64 * KiB, 2);
    await b.write(64 * KiB, held.pieces[0]!.subarray(1, 4 * KiB + 1));
    await b.write(128 * KiB, held.pieces[0]!.subarray(0, 2 * KiB));
    const heldOther = await heldWrite(other, 0, 64 * KiB, 3);
    await b.write(192 * KiB, heldOther.pieces);
    expect(b.adoptedBytes).toBe(0);
    held.release();
    heldOther.release();
    // A view released: nothing holds its page now, so it is copied too.
    const views = a.readViews(0, 64 * KiB)!;
    const unheldCopy = Buffer.from(views.pieces[0]!);
    views.release();
    await b.write(320 * KiB, views.pieces[0]!);
    expect(b.adoptedBytes).toBe(0);
    expect((await bytes(b, 320 * KiB, unheldCopy.length)).equals(unheldCopy)).toBe(true);
    expect(a.auditPool()).toEqual([]);
  });

  it('gives a removed volume\'s memory back once no other volume uses its pages, and reuses the slab numbers', async () => {
    const pool = new SlabPool();
    const master = new MemoryDevice(16 * MiB, false, pool);
    const mirror = new MemoryDevice(16 * MiB, false, pool);
    const other = new MemoryDevice(16 * MiB, false, pool);
    await other.write(0, Buffer.alloc(MiB, 3));
    const held = await heldWrite(master, 0, 4 * MiB, 0x5a);
    await mirror.write(0, held.pieces);
    held.release();
    await master.write(4 * MiB, Buffer.alloc(2 * MiB, 1)); // pages only the master has
    expect(pool.slabBytes).toBe(7 * MiB);
    // The master goes: its own pages are free at once, but the mirror still has 4 MiB of its slabs.
    await master.close();
    expect(pool.slabBytes).toBe(7 * MiB);
    expect((await bytes(mirror, 0, 4 * MiB)).equals(Buffer.alloc(4 * MiB, 0x5a))).toBe(true);
    // The mirror lets go of them a MiB at a time: the master's slabs go with the last page.
    for (let m = 0; m < 4; m++) await mirror.trim(m * MiB, MiB);
    expect(pool.slabBytes).toBe(MiB); // the other volume's only
    expect(pool.audit()).toEqual([]);
    // A new volume makes new slabs under the freed numbers, and the other volume is untouched.
    const next = new MemoryDevice(16 * MiB, false, pool);
    await next.write(0, Buffer.alloc(3 * MiB, 9));
    expect(pool.slabBytes).toBe(4 * MiB);
    expect(pool.slabs.length).toBeLessThanOrEqual(7);
    expect((await bytes(next, 0, 3 * MiB)).equals(Buffer.alloc(3 * MiB, 9))).toBe(true);
    expect((await bytes(other, 0, MiB)).equals(Buffer.alloc(MiB, 3))).toBe(true);
    expect(pool.audit()).toEqual([]);
  });

  it('keeps each volume\'s slots together through a sync pair\'s small random writes over shared pages, so its large writes still land in runs', async () => {
    const pool = new SlabPool();
    const master = new MemoryDevice(64 * MiB, false, pool);
    const mirror = new MemoryDevice(64 * MiB, false, pool);
    const model = Buffer.alloc(32 * MiB);
    let refused = 0;
    /** A 1 MiB WRITE as a sync pair does it: into the master's held target, then the mirror from the held pages. */
    const syncMiB = async (at: number, fill: number) => {
      const t = master.writeTarget(at, MiB, 0);
      if (!t) {
        refused++;
        const b = Buffer.alloc(MiB, fill);
        await master.write(at, b);
        await mirror.write(at, b);
      } else {
        for (const p of t.pieces) p.fill(fill);
        const held = t.hold!();
        await t.commit(Buffer.alloc(0));
        await mirror.write(at, held.pieces);
        held.release();
      }
      model.fill(fill, at, at + MiB);
    };
    for (let m = 0; m < 32; m++) await syncMiB(m * MiB, 1 + m);
    expect(mirror.adoptedBytes).toBe(32 * MiB);
    const before = master.storeBytes;
    // Small random writes to both, as a sync pair makes them: each first one to a shared page
    // leaves the master's page in place and gives the mirror a copy of its own.
    let seed = 7;
    for (let i = 0; i < 20000; i++) {
      seed = (Math.imul(seed, 1103515245) + 12345) >>> 0;
      const at = ((seed >>> 8) % (32 * 256)) * 4 * KiB;
      const b = Buffer.alloc(4 * KiB, i & 0xff);
      await master.write(at, b);
      await mirror.write(at, b);
      b.copy(model, at);
    }
    expect(pool.evictions).toBeGreaterThan(0);
    expect(master.storeBytes).toBe(before); // not a slot more: every small write went in place
    for (let m = 0; m < 32; m++) await syncMiB(m * MiB, 100 + m);
    expect(refused).toBe(0);
    expect(master.storeBytes).toBeLessThanOrEqual(before + 2 * MiB);
    expect(mirror.adoptedBytes).toBe(32 * MiB);
    expect((await bytes(master, 0, 32 * MiB)).equals(model)).toBe(true);
    expect((await bytes(mirror, 0, 32 * MiB)).equals(model)).toBe(true);
    expect(pool.audit()).toEqual([]);
  });

  it('keeps every volume equal to a byte model and the pool\'s accounting right, whatever is written, adopted, held, trimmed or closed', async () => {
    const SIZE = 128 * KiB;
    let adoptedSeen = 0;
    let evictions = 0;
    const op = fc.oneof(
      { arbitrary: fc.record({ kind: fc.constant('write' as const), dev: fc.nat(2), page: fc.nat(31), at: fc.nat(4095), len: fc.integer({ min: 1, max: 20 * KiB }), fill: fc.integer({ min: 1, max: 255 }) }), weight: 3 },
      { arbitrary: fc.record({ kind: fc.constant('target' as const), dev: fc.nat(2), page: fc.nat(31), pages: fc.integer({ min: 1, max: 16 }), fill: fc.integer({ min: 1, max: 255 }), abort: fc.boolean() }), weight: 2 },
      { arbitrary: fc.record({ kind: fc.constant('adopt' as const), dev: fc.nat(2), which: fc.nat(), page: fc.nat(31) }), weight: 3 },
      { arbitrary: fc.record({ kind: fc.constant('view' as const), dev: fc.nat(2), page: fc.nat(31), pages: fc.integer({ min: 1, max: 8 }) }), weight: 1 },
      { arbitrary: fc.record({ kind: fc.constant('release' as const), which: fc.nat() }), weight: 3 },
      { arbitrary: fc.record({ kind: fc.constant('trim' as const), dev: fc.nat(2), page: fc.nat(31), at: fc.nat(4095), len: fc.integer({ min: 1, max: 40 * KiB }), noHole: fc.boolean() }), weight: 1 },
      { arbitrary: fc.record({ kind: fc.constant('reopen' as const), dev: fc.nat(2) }), weight: 1 },
    );
    await fc.assert(
      fc.asyncProperty(fc.array(op, { minLength: 1, maxLength: 80, size: 'max' }), async (ops) => {
        const pool = new SlabPool();
        const devs = [0, 1, 2].map(() => new MemoryDevice(SIZE, false, pool));
        const model = [0, 1, 2].map(() => Buffer.alloc(SIZE));
        // Held pages (of write targets) and views, with the bytes they showed when taken: they must not change.
        const out: { views: ReadViews; want: Buffer[] }[] = [];
        const clip = (o: number, l: number) => Math.max(0, Math.min(l, SIZE - o));
        for (const o of ops) {
          if (o.kind === 'write') {
            const off = o.page * 4 * KiB + o.at;
            const len = clip(off, o.len);
            if (len === 0) continue;
            await devs[o.dev]!.write(off, Buffer.alloc(len, o.fill));
            model[o.dev]!.fill(o.fill, off, off + len);
          } else if (o.kind === 'target') {
            const off = o.page * 4 * KiB;
            const len = clip(off, o.pages * 4 * KiB);
            const t = devs[o.dev]!.writeTarget(off, len, 0);
            if (!t) continue;
            for (const p of t.pieces) p.fill(o.fill);
            const held = t.hold!();
            out.push({ views: held, want: held.pieces.map((p) => Buffer.from(p)) });
            if (o.abort) t.abort();
            else {
              await t.commit(Buffer.alloc(0));
              model[o.dev]!.fill(o.fill, off, off + len);
            }
          } else if (o.kind === 'adopt') {
            if (out.length === 0) continue;
            const src = out[o.which % out.length]!;
            const total = src.want.reduce((n, p) => n + p.length, 0);
            const off = o.page * 4 * KiB;
            if (off + total > SIZE) continue;
            await devs[o.dev]!.write(off, src.views.pieces);
            Buffer.concat(src.want).copy(model[o.dev]!, off);
            adoptedSeen += devs[o.dev]!.adoptedBytes;
          } else if (o.kind === 'view') {
            const off = o.page * 4 * KiB;
            const views = devs[o.dev]!.readViews(off, clip(off, o.pages * 4 * KiB));
            if (views) out.push({ views, want: views.pieces.map((p) => Buffer.from(p)) });
          } else if (o.kind === 'release') {
            if (out.length === 0) continue;
            const [gone] = out.splice(o.which % out.length, 1);
            gone!.views.release();
          } else if (o.kind === 'trim') {
            const off = o.page * 4 * KiB + o.at;
            const len = clip(off, o.len);
            if (len === 0) continue;
            if (o.noHole) await devs[o.dev]!.zero(off, len, { noHole: true });
            else await devs[o.dev]!.trim(off, len);
            model[o.dev]!.fill(0, off, off + len);
          } else {
            await devs[o.dev]!.close();
            devs[o.dev] = new MemoryDevice(SIZE, false, pool);
            model[o.dev]!.fill(0);
          }
          for (let d = 0; d < 3; d++) expect((await bytes(devs[d]!, 0, SIZE)).equals(model[d]!), `volume ${d} after ${JSON.stringify(o)}`).toBe(true);
          for (const h of out) h.views.pieces.forEach((p, i) => expect(p.equals(h.want[i]!), 'a held page changed').toBe(true));
          expect(pool.audit(), JSON.stringify(o)).toEqual([]);
        }
        for (const h of out) h.views.release();
        expect(pool.audit()).toEqual([]);
        expect(devs[0]!.heldBytes).toBe(0);
        evictions += pool.evictions;
        for (const d of devs) await d.close();
        expect(pool.audit()).toEqual([]);
        expect(pool.slabBytes).toBe(0); // every volume gone: every slab given back
        expect(devs[0]!.freeBytes).toBe(devs[0]!.storeBytes);
      }),
      { numRuns: 150 },
    );
    expect(adoptedSeen).toBeGreaterThan(0); // the runs did adopt pages, not only copy them
    expect(evictions).toBeGreaterThan(0); // and owners wrote in place, the adopters taking copies
  });
});

// Zero-copy reads from the memory store (readViews) against a byte model: views taken at any
// moment must keep that moment's bytes through any later writes, trims and zeroes until they are
// released (a reply waiting in the socket's queue), and must never show another offset's data
// when freed pages are reused. Released views give their pages back.
//
// Zero-copy writes (writeTarget) in the same model: a target's pieces are filled with garbage
// when it opens (as a socket would, byte by byte, at any time) and with the payload just before
// it commits; until then the volume must not change, several targets over the same bytes may be
// open at once and commit in any order (the model applies each at its commit), and an aborted
// one leaves no trace. A target may be held once its payload has landed (WriteTarget.hold, what a
// sync pair writes its mirrors from): the held bytes must stay the payload's through its commit or
// abort and any later write, trim or zero, until released. After every step each slot is exactly
// one of: in the table, free, retired or reserved (no page leaked, none in two places).
import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { MemoryDevice } from '../src/blockdev/memory.js';
import { AtomicDevice } from '../src/blockdev/atomic.js';
import { FilterDevice } from '../src/blockdev/filter.js';
import type { ReadViews, WriteTarget } from '../src/blockdev/types.js';
import { pseudoRandom } from './helpers/clients.js';

const PAGE = 4096;
const SIZE = 2 * 1024 * 1024 + 3 * PAGE + 100; // two slabs and a ragged tail

type Op =
  | { kind: 'write'; off: number; len: number; seed: number }
  | { kind: 'trim' | 'zero' | 'zeroKeep'; off: number; len: number }
  | { kind: 'view'; off: number; len: number }
  | { kind: 'release'; pick: number }
  | { kind: 'target'; off: number; len: number; seed: number; from: number }
  | { kind: 'commit' | 'abort' | 'hold'; pick: number };

// Spans biased to page edges, so whole-page trims (which free slots) and partial writes both come up,
// and half of them to the first pages, so operations overlap often.
const span = fc
  .tuple(fc.oneof(fc.integer({ min: 0, max: Math.floor(SIZE / PAGE) }), fc.integer({ min: 0, max: 24 })), fc.integer({ min: -2, max: 2 }), fc.integer({ min: 1, max: 80 }), fc.integer({ min: -3, max: 3 }))
  .map(([page, skew, pages, tail]) => {
    const off = Math.min(Math.max(page * PAGE + skew * 512, 0), SIZE - 1);
    const len = Math.max(1, Math.min(pages * PAGE + tail * 512, SIZE - off));
    return { off, len };
  });

const op: fc.Arbitrary<Op> = fc.oneof(
  { arbitrary: fc.tuple(span, fc.integer()).map(([s, seed]) => ({ kind: 'write' as const, ...s, seed })), weight: 4 },
  { arbitrary: span.map((s) => ({ kind: 'trim' as const, ...s })), weight: 2 },
  { arbitrary: span.map((s) => ({ kind: 'zero' as const, ...s })), weight: 1 },
  { arbitrary: span.map((s) => ({ kind: 'zeroKeep' as const, ...s })), weight: 1 },
  { arbitrary: span.map((s) => ({ kind: 'view' as const, ...s })), weight: 4 },
  { arbitrary: fc.nat().map((pick) => ({ kind: 'release' as const, pick })), weight: 2 },
  {
    arbitrary: fc.tuple(span, fc.integer(), fc.double({ min: 0, max: 1, noNaN: true })).map(([s, seed, f]) => ({
      kind: 'target' as const, ...s, seed, from: Math.min(s.len - 1, Math.floor(f * s.len)),
    })),
    weight: 4,
  },
  { arbitrary: fc.nat().map((pick) => ({ kind: 'commit' as const, pick })), weight: 3 },
  { arbitrary: fc.nat().map((pick) => ({ kind: 'abort' as const, pick })), weight: 1 },
  { arbitrary: fc.nat().map((pick) => ({ kind: 'hold' as const, pick })), weight: 4 },
);

interface Open {
  target: WriteTarget;
  off: number;
  data: Buffer;
  from: number;
}


interface Out {
  views: ReadViews;
  off: number;
  expected: Buffer;
}

function checkViews(out: Out[]): void {
  for (const o of out) {
    const got = Buffer.concat(o.views.pieces);
    expect(got.length).toBe(o.expected.length);
    if (!got.equals(o.expected)) {
      let i = 0;
      while (got[i] === o.expected[i]) i++;
      expect.fail(`a view of offset ${o.off} (${o.expected.length} bytes) changed at byte ${i} before it was released`);
    }
  }
}

/** Each slot is in exactly one place: the table, the free list, the retired set or a write target; no free one is held. */
function checkSlots(dev: MemoryDevice): void {
  expect(dev.allocatedBytes + dev.freeBytes + dev.retiredBytes + dev.reservedBytes).toBe(dev.storeBytes);
  expect(dev.heldFreeBytes).toBe(0);
}

async function apply(dev: MemoryDevice, model: Buffer, out: Out[], o: Op, open: Open[] = []): Promise<void> {
  switch (o.kind) {
    case 'write': {
      const data = pseudoRandom(o.len, o.seed);
      await dev.write(o.off, data);
      data.copy(model, o.off);
      return;
    }
    case 'trim':
      await dev.trim(o.off, o.len);
      model.fill(0, o.off, o.off + o.len);
      return;
    case 'zero':
    case 'zeroKeep':
      await dev.zero(o.off, o.len, { noHole: o.kind === 'zeroKeep' });
      model.fill(0, o.off, o.off + o.len);
      return;
    case 'view':
      out.push({ views: dev.readViews(o.off, o.len), off: o.off, expected: Buffer.from(model.subarray(o.off, o.off + o.len)) });
      return;
    case 'release':
      if (out.length > 0) out.splice(o.pick % out.length, 1)[0]!.views.release();
      return;
    case 'target': {
      const target = dev.writeTarget(o.off, o.len, o.from);
      if (!target) return; // free slots too scattered: the caller copies instead
      expect(target.pieces.reduce((n, p) => n + p.length, 0)).toBe(o.len - o.from);
      for (const p of target.pieces) p.fill(0xee); // bytes still arriving: never visible
      open.push({ target, off: o.off, data: pseudoRandom(o.len, o.seed), from: o.from });
      return;
    }
    case 'commit': {
      if (open.length === 0) return;
      const t = open.splice(o.pick % open.length, 1)[0]!;
      let at = t.from;
      for (const p of t.target.pieces) at += t.data.copy(p, 0, at);
      await t.target.commit(t.data.subarray(0, t.from));
      t.data.copy(model, t.off);
      return;
    }
    case 'abort':
      if (open.length > 0) open.splice(o.pick % open.length, 1)[0]!.target.abort();
      return;
    case 'hold': {
      // The payload has landed (the socket is done with the pieces); the target stays open.
      if (open.length === 0) return;
      const t = open[o.pick % open.length]!;
      let at = t.from;
      for (const p of t.target.pieces) at += t.data.copy(p, 0, at);
      out.push({ views: t.target.hold!(), off: t.off + t.from, expected: Buffer.from(t.data.subarray(t.from)) });
      return;
    }
  }
}

describe('MemoryDevice.readViews', () => {
  it('keeps every view (and every held write target) at the bytes of the moment it was taken until released, whatever is written (copied or through write targets), trimmed or zeroed meanwhile', async () => {
    await fc.assert(
      fc.asyncProperty(fc.array(op, { maxLength: 40 }), async (ops) => {
        const dev = new MemoryDevice(SIZE);
        const model = Buffer.alloc(SIZE);
        const out: Out[] = [];
        const open: Open[] = [];
        for (const o of ops) {
          await apply(dev, model, out, o, open);
          checkViews(out);
          checkSlots(dev);
          const now = Buffer.alloc(SIZE);
          await dev.read(0, now);
          expect(now.equals(model)).toBe(true);
        }
        for (const o of out) o.views.release();
        for (const t of open) t.target.abort();
        // Every page a view kept out of the table is free again once the views are gone, and every reserved one.
        expect(dev.retiredBytes).toBe(0);
        expect(dev.reservedBytes).toBe(0);
        checkSlots(dev);
      }),
      { numRuns: 300 },
    );
  });

  it('gives a view of written pages as slices of the store, with no copy', async () => {
    const dev = new MemoryDevice(SIZE);
    const data = pseudoRandom(256 * PAGE, 7);
    await dev.write(0, data);
    const v = dev.readViews(PAGE, 8 * PAGE);
    expect(v.pieces.length).toBe(1);
    await dev.write(PAGE, Buffer.alloc(PAGE, 0xee)); // copy on write: the store moves, the view stays
    expect(v.pieces[0]!.equals(data.subarray(PAGE, 9 * PAGE))).toBe(true);
    const fresh = Buffer.alloc(PAGE);
    await dev.read(PAGE, fresh);
    expect(fresh.equals(Buffer.alloc(PAGE, 0xee))).toBe(true);
    v.release();
    v.release(); // twice is harmless
    expect(dev.retiredBytes).toBe(0);
  });

  it('never lets a page freed under a view be reused by another offset until the view is released', async () => {
    const dev = new MemoryDevice(SIZE);
    await dev.write(0, Buffer.alloc(PAGE, 0xaa));
    const v = dev.readViews(0, PAGE);
    await dev.trim(0, PAGE); // frees the page's slot, but the view holds it
    expect(dev.retiredBytes).toBe(PAGE);
    await dev.write(64 * PAGE, Buffer.alloc(PAGE, 0xbb)); // must not land in the held slot
    expect(v.pieces[0]!.equals(Buffer.alloc(PAGE, 0xaa))).toBe(true);
    v.release();
    expect(dev.retiredBytes).toBe(0);
    expect(dev.allocatedBytes).toBe(PAGE);
  });
});

describe('MemoryDevice.writeTarget', () => {
  it('reads the payload into the store\'s own pages: the committed pages are the very memory the pieces pointed at', async () => {
    const dev = new MemoryDevice(SIZE);
    const data = pseudoRandom(64 * PAGE, 3);
    const t = dev.writeTarget(0, data.length, 0)!;
    expect(t.pieces).toHaveLength(1);
    data.copy(t.pieces[0]!);
    await t.commit([]);
    const v = dev.readViews(0, data.length);
    expect(v.pieces).toHaveLength(1);
    expect(v.pieces[0]!.buffer).toBe(t.pieces[0]!.buffer);
    expect(v.pieces[0]!.byteOffset).toBe(t.pieces[0]!.byteOffset);
    expect(v.pieces[0]!.equals(data)).toBe(true);
    v.release();
  });

  it('keeps the bytes around a write that starts and ends inside pages as they are at commit, not as they were when the target opened', async () => {
    const dev = new MemoryDevice(SIZE);
    await dev.write(0, Buffer.alloc(8 * PAGE, 0x11));
    const off = PAGE + 100;
    const len = 5 * PAGE;
    const t = dev.writeTarget(off, len, 1000)!;
    await dev.write(0, Buffer.alloc(8 * PAGE, 0x22)); // lands while the payload is still arriving
    const data = pseudoRandom(len, 9);
    let at = 1000;
    for (const p of t.pieces) at += data.copy(p, 0, at);
    await t.commit(data.subarray(0, 1000));
    const want = Buffer.alloc(8 * PAGE, 0x22);
    data.copy(want, off);
    const got = Buffer.alloc(8 * PAGE);
    await dev.read(0, got);
    expect(got.equals(want)).toBe(true);
  });

  it('gives an aborted target\'s pages back and leaves the volume as it was', async () => {
    const dev = new MemoryDevice(SIZE);
    await dev.write(0, Buffer.alloc(16 * PAGE, 0x33));
    const t = dev.writeTarget(0, 16 * PAGE, 0)!;
    t.pieces[0]!.fill(0x44);
    expect(dev.reservedBytes).toBe(16 * PAGE);
    t.abort();
    t.abort(); // twice is harmless
    expect(dev.reservedBytes).toBe(0);
    expect(dev.freeBytes + dev.allocatedBytes).toBe(dev.storeBytes);
    const got = Buffer.alloc(16 * PAGE);
    await dev.read(0, got);
    expect(got.equals(Buffer.alloc(16 * PAGE, 0x33))).toBe(true);
    await expect(t.commit([])).rejects.toThrow(/already used/);
  });

  it('retires, not frees, the old pages a committed write replaces while a view holds them', async () => {
    const dev = new MemoryDevice(SIZE);
    await dev.write(0, Buffer.alloc(4 * PAGE, 0xaa));
    const v = dev.readViews(0, 4 * PAGE);
    const t = dev.writeTarget(0, 4 * PAGE, 0)!;
    t.pieces[0]!.fill(0xbb);
    await t.commit([]);
    expect(dev.retiredBytes).toBe(4 * PAGE);
    const again = dev.writeTarget(64 * PAGE, 4 * PAGE, 0)!; // must not be given the held pages
    again.pieces[0]!.fill(0xcc);
    expect(Buffer.concat(v.pieces).equals(Buffer.alloc(4 * PAGE, 0xaa))).toBe(true);
    again.abort();
    v.release();
    expect(dev.retiredBytes).toBe(0);
  });

  it('keeps a held target\'s bytes after its commit while a later write replaces its pages, and frees them at the release', async () => {
    const dev = new MemoryDevice(SIZE);
    const data = pseudoRandom(16 * PAGE, 12);
    const t = dev.writeTarget(0, 16 * PAGE, 0)!;
    data.copy(t.pieces[0]!);
    const h = t.hold!();
    await t.commit([]);
    await dev.write(0, Buffer.alloc(16 * PAGE, 0x5a)); // copy on write: the held pages are retired
    expect(dev.retiredBytes).toBe(16 * PAGE);
    const next = dev.writeTarget(32 * PAGE, 16 * PAGE, 0)!; // never the held pages
    next.pieces[0]!.fill(0x6b);
    await next.commit([]);
    expect(Buffer.concat(h.pieces).equals(data)).toBe(true);
    h.release();
    h.release(); // twice is harmless
    expect(dev.retiredBytes).toBe(0);
    expect(dev.heldBytes).toBe(0);
    checkSlots(dev);
  });

  it('retires an aborted target\'s held pages until the release, then frees them', async () => {
    const dev = new MemoryDevice(SIZE);
    const t = dev.writeTarget(0, 8 * PAGE, 0)!;
    t.pieces[0]!.fill(0x77);
    const h = t.hold!();
    t.abort();
    expect(dev.reservedBytes).toBe(0);
    expect(dev.retiredBytes).toBe(8 * PAGE);
    const other = dev.writeTarget(64 * PAGE, 8 * PAGE, 0)!;
    other.pieces[0]!.fill(0x11);
    expect(Buffer.concat(h.pieces).equals(Buffer.alloc(8 * PAGE, 0x77))).toBe(true);
    other.abort();
    h.release();
    expect(dev.retiredBytes).toBe(0);
    checkSlots(dev);
    expect(dev.heldFreeBytes).toBe(0);
  });

  it('sorts scattered free slots by address to give a target few runs, instead of refusing it', async () => {
    const dev = new MemoryDevice(SIZE);
    await dev.write(0, pseudoRandom(128 * PAGE, 4)); // slots 0..127
    for (let i = 0; i < 128; i++) await dev.trim(((i * 37) % 128) * PAGE, PAGE); // freed in a scrambled order
    const t = dev.writeTarget(0, 64 * PAGE, 0)!;
    expect(t).not.toBeNull();
    expect(t.pieces).toHaveLength(1);
    t.abort();
  });

  it('refuses a target past 64 MiB of open targets, so payloads that never finish cannot grow the store without bound', () => {
    const dev = new MemoryDevice(256 * 1024 * 1024);
    const MiB32 = 32 * 1024 * 1024;
    const a = dev.writeTarget(0, MiB32, 0)!;
    const b = dev.writeTarget(MiB32, MiB32, 0)!;
    expect(dev.reservedBytes).toBe(2 * MiB32);
    expect(dev.writeTarget(2 * MiB32, PAGE, 0)).toBeNull();
    a.abort();
    expect(dev.writeTarget(2 * MiB32, MiB32, 0)).not.toBeNull();
    b.abort();
  });

  it('refuses a target on a read-only device and after close, and a commit of a target opened before close', async () => {
    expect(new MemoryDevice(SIZE, true).writeTarget(0, PAGE, 0)).toBeNull();
    const dev = new MemoryDevice(SIZE);
    const t = dev.writeTarget(0, 16 * PAGE, 0)!;
    await dev.close();
    await expect(t.commit([])).rejects.toThrow(/closed/);
  });
});

describe('AtomicDevice.writeTarget', () => {
  it('commits under the range lock, in the order commits and writes over the same bytes were called', async () => {
    const mem = new MemoryDevice(SIZE);
    const dev = new AtomicDevice(mem);
    const held = await dev.locks.acquire(0, PAGE); // an earlier writer of the first page
    const t = dev.writeTarget(0, 32 * PAGE, 0)!;
    t.pieces[0]!.fill(0x01);
    const committed = t.commit([]);
    const later = dev.write(PAGE, Buffer.alloc(PAGE, 0x02)); // called after the commit: applies after it
    await new Promise((r) => setImmediate(r));
    const now = Buffer.alloc(32 * PAGE);
    await dev.read(0, now);
    expect(now.equals(Buffer.alloc(32 * PAGE))).toBe(true); // nothing applied while the lock is held
    held();
    await Promise.all([committed, later]);
    const want = Buffer.alloc(32 * PAGE, 0x01);
    want.fill(0x02, PAGE, 2 * PAGE);
    await dev.read(0, now);
    expect(now.equals(want)).toBe(true);
  });

  it('has no write target above a layer that does not offer one (the copy path keeps every filter\'s rules)', () => {
    expect(new AtomicDevice(new MemoryDevice(SIZE)).writeTarget(0, 32 * PAGE, 0)).not.toBeNull();
    expect(new AtomicDevice(new FilterDevice(new MemoryDevice(SIZE))).writeTarget(0, 32 * PAGE, 0)).toBeNull();
  });
});

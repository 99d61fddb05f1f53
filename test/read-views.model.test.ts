// Zero-copy reads from the memory store (readViews) against a byte model: views taken at any
// moment must keep that moment's bytes through any later writes, trims and zeroes until they are
// released (a reply waiting in the socket's queue), and must never show another offset's data
// when freed pages are reused. Released views give their pages back.
import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { MemoryDevice } from '../src/blockdev/memory.js';
import type { ReadViews } from '../src/blockdev/types.js';
import { pseudoRandom } from './helpers/clients.js';

const PAGE = 4096;
const SIZE = 2 * 1024 * 1024 + 3 * PAGE + 100; // two slabs and a ragged tail

type Op =
  | { kind: 'write'; off: number; len: number; seed: number }
  | { kind: 'trim' | 'zero' | 'zeroKeep'; off: number; len: number }
  | { kind: 'view'; off: number; len: number }
  | { kind: 'release'; pick: number };

// Spans biased to page edges, so whole-page trims (which free slots) and partial writes both come up.
const span = fc
  .tuple(fc.integer({ min: 0, max: Math.floor(SIZE / PAGE) }), fc.integer({ min: -2, max: 2 }), fc.integer({ min: 1, max: 80 }), fc.integer({ min: -3, max: 3 }))
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
);


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

async function apply(dev: MemoryDevice, model: Buffer, out: Out[], o: Op): Promise<void> {
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
  }
}

describe('MemoryDevice.readViews', () => {
  it('keeps every view at the bytes of the moment it was taken until released, whatever is written, trimmed or zeroed meanwhile', async () => {
    await fc.assert(
      fc.asyncProperty(fc.array(op, { maxLength: 40 }), async (ops) => {
        const dev = new MemoryDevice(SIZE);
        const model = Buffer.alloc(SIZE);
        const out: Out[] = [];
        for (const o of ops) {
          await apply(dev, model, out, o);
          checkViews(out);
          const now = Buffer.alloc(SIZE);
          await dev.read(0, now);
          expect(now.equals(model)).toBe(true);
        }
        for (const o of out) o.views.release();
        // Every page a view kept out of the table is free again once the views are gone.
        expect(dev.retiredBytes).toBe(0);
      }),
      { numRuns: 150 },
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

// Model-based test of the cache memory: random sequences of requests, some
// of them concurrent, against a plain Buffer that says what every read must
// return, with power losses ("crash": the cache is dropped, the backing
// kept) checked against what the last completed flush promised. Some runs
// send writes of 4 or 8 KiB and more, and sequential streams once that
// long, past the cache (rule 5), among cached writes, reads, trims and
// destages of the same ranges.
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { MemoryDevice } from '../src/blockdev/memory.js';
import type { BlockDevice, Extent, Payload, ZeroOptions } from '../src/blockdev/types.js';
import { CacheMemory, type CachedDevice } from '../src/controller/cache.js';

const KiB = 1024;
const DEV = 256 * KiB;
const BS = 4 * KiB;
const CACHE = 32 * KiB;
const UNIT = BS / 32;

/**
 * The volume behind the cache: a MemoryDevice reached after a few turns of
 * the event loop, so requests, destages and read-allocates interleave. The
 * bytes of a write are taken when it lands, as a disk doing DMA late would.
 * After a power loss, writes still on their way are lost.
 */
class SlowDevice implements BlockDevice {
  readonly size = DEV;
  readonly readOnly = false;
  readonly multiConnSafe = true;
  readonly fastZero = true;
  dead = false;

  constructor(
    private readonly mem: MemoryDevice,
    private readonly rnd: () => number,
  ) {}

  private async lag(): Promise<void> {
    const n = Math.floor(this.rnd() * 3);
    for (let i = 0; i < n; i++) await new Promise((r) => setImmediate(r));
  }

  /** The bytes are taken after a lag and arrive after another, so a write may land in between. */
  async read(offset: number, dest: Buffer): Promise<void> {
    await this.lag();
    const got = Buffer.allocUnsafe(dest.length);
    this.mem.readSync(offset, got);
    await this.lag();
    got.copy(dest);
  }

  async write(offset: number, data: Payload): Promise<void> {
    await this.lag();
    if (!this.dead) this.mem.writeSync(offset, data);
  }

  async flush(): Promise<void> {
    await this.lag();
  }

  async trim(offset: number, length: number): Promise<void> {
    await this.lag();
    if (!this.dead) await this.mem.trim(offset, length);
  }

  async zero(offset: number, length: number, opts?: ZeroOptions): Promise<void> {
    await this.lag();
    if (!this.dead) await this.mem.zero(offset, length, opts);
  }

  extents(offset: number, length: number): Promise<Extent[]> {
    return this.mem.extents(offset, length);
  }

  async close(): Promise<void> {}
}

type Range = { off: number; len: number };
type Op =
  | ({ t: 'write'; seed: number; split: number; fua: boolean } & Range)
  // A write where the batch's last write ended: sequential streams, which go past the cache once long enough.
  | { t: 'next'; len: number; seed: number }
  | ({ t: 'read' } & Range)
  | ({ t: 'trim' | 'zero'; fua: boolean } & Range)
  | { t: 'flush' }
  | { t: 'tick'; ms: number }
  | { t: 'destage' };
type Step = { t: 'crash' } | { t: 'batch'; ops: Op[] };

const rangeArb: fc.Arbitrary<Range> = fc
  .tuple(
    fc.oneof(
      { weight: 2, arbitrary: fc.integer({ min: 0, max: DEV - 1 }) },
      // A hot spot of a few cache sizes: hits, evictions and overlaps.
      { weight: 3, arbitrary: fc.integer({ min: 0, max: 3 * CACHE }) },
      { weight: 2, arbitrary: fc.integer({ min: 0, max: 20 }).map((b) => b * BS) },
      // On a validity unit's boundary (BS / 32) but mid-block: bypassing writes that cover blocks in part.
      { weight: 2, arbitrary: fc.integer({ min: 0, max: (3 * CACHE) / UNIT }).map((u) => u * UNIT) },
    ),
    fc.oneof(
      fc.integer({ min: 1, max: 600 }),
      fc.integer({ min: 1, max: (3 * BS) / UNIT }).map((u) => u * UNIT),
      fc.integer({ min: 1, max: 3 }).map((n) => n * BS),
      fc.integer({ min: 1, max: CACHE + 8 * KiB }), // bigger than the cache now and then
    ),
  )
  .map(([off, len]) => ({ off, len: Math.min(len, DEV - off) }));

const opArb: fc.Arbitrary<Op> = fc.oneof(
  {
    weight: 6,
    arbitrary: fc
      .tuple(rangeArb, fc.integer(), fc.integer({ min: 1, max: 3 }), fc.integer({ min: 0, max: 3 }))
      .map(([r, seed, split, f]) => ({ t: 'write' as const, ...r, seed, split, fua: f === 0 })),
  },
  { weight: 5, arbitrary: rangeArb.map((r) => ({ t: 'read' as const, ...r })) },
  {
    weight: 3,
    arbitrary: fc
      .tuple(fc.oneof(fc.integer({ min: 1, max: 3 }).map((n) => n * BS), fc.integer({ min: 1, max: (2 * BS) / UNIT }).map((u) => u * UNIT)), fc.integer())
      .map(([len, seed]) => ({ t: 'next' as const, len, seed })),
  },
  { weight: 1, arbitrary: fc.tuple(fc.constantFrom('trim' as const, 'zero' as const), fc.boolean(), rangeArb).map(([t, fua, r]) => ({ t, fua, ...r })) },
  { weight: 1, arbitrary: fc.constant({ t: 'flush' as const }) },
  // Mostly one turn of the event loop; now and then long enough for the destage timer.
  { weight: 1, arbitrary: fc.constantFrom(0, 0, 0, 1, 2).map((ms) => ({ t: 'tick' as const, ms })) },
  { weight: 1, arbitrary: fc.constant({ t: 'destage' as const }) },
);

const stepArb: fc.Arbitrary<Step> = fc.oneof(
  { weight: 1, arbitrary: fc.constant({ t: 'crash' as const }) },
  { weight: 12, arbitrary: fc.array(opArb, { minLength: 1, maxLength: 5 }).map((ops) => ({ t: 'batch' as const, ops })) },
);

function mulberry32(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function bytes(seed: number, n: number): Buffer {
  const rnd = mulberry32(seed);
  const b = Buffer.allocUnsafe(n);
  for (let i = 0; i < n; i++) b[i] = (rnd() * 256) | 0;
  return b;
}

/** A mutation of a batch: the bytes it leaves in [off, off + data.length). */
interface Mutation {
  off: number;
  data: Buffer;
  fua: boolean;
}

/**
 * Every byte of got (read at off) is as in before, or as one of the
 * mutations that cover it left it (before null: only the latter).
 */
function checkRead(off: number, got: Buffer, before: Buffer | null, muts: Mutation[], what: string): void {
  for (let i = 0; i < got.length; i++) {
    const p = off + i;
    if (before !== null && got[i] === before[p]) continue;
    if (muts.some((m) => p >= m.off && p < m.off + m.data.length && m.data[p - m.off] === got[i])) continue;
    expect.fail(`${what}: byte ${p} is ${got[i]}, expected ${before ? before[p] : 'none'} or a concurrent request's byte`);
  }
}

/** Bytes that went past the cache over all runs: the bypass must have been exercised. */
let bypassed = 0;

async function run(steps: Step[], delayMs: number, bypass: number, seed: number): Promise<void> {
  const mem = new MemoryDevice(DEV);
  const rnd = mulberry32(seed);
  let slow = new SlowDevice(mem, rnd);
  let cache = new CacheMemory({ size: CACHE, blockSize: BS, destageDelayMs: delayMs, bypass });
  let dev: CachedDevice = cache.wrap(slow, 'vol');
  const model = Buffer.alloc(DEV); // what a read must return
  let lastEnd = 0; // where the last write ended: a 'next' write starts there
  let durable = Buffer.alloc(DEV); // what the backing must hold after a crash, but for...
  let since: Mutation[] = []; // ...bytes changed since the last completed flush

  for (const step of steps) {
    if (step.t === 'crash') {
      bypassed += cache.stats.bypassedBytes;
      cache.crash();
      slow.dead = true;
      const disk = Buffer.alloc(DEV);
      mem.readSync(0, disk);
      // A byte must be as flushed, or one that was written to it afterwards: never garbage.
      checkRead(0, disk, durable, since, 'after a crash');
      disk.copy(model);
      durable = Buffer.from(disk);
      since = [];
      slow = new SlowDevice(mem, rnd);
      cache = new CacheMemory({ size: CACHE, blockSize: BS, destageDelayMs: delayMs, bypass });
      dev = cache.wrap(slow, 'vol');
      continue;
    }

    const before = Buffer.from(model);
    const muts: Mutation[] = [];
    const reads: { off: number; buf: Buffer }[] = [];
    const pending: Promise<unknown>[] = [];
    let flushed = false;
    for (const op of step.ops) {
      switch (op.t) {
        case 'next': {
          const off = lastEnd >= DEV ? 0 : lastEnd;
          const len = Math.min(op.len, DEV - off);
          const data = bytes(op.seed, len);
          muts.push({ off, data, fua: false });
          pending.push(dev.write(off, data));
          lastEnd = off + len;
          break;
        }
        case 'write':
        case 'trim':
        case 'zero': {
          if (op.len === 0) break;
          if (op.t === 'write') lastEnd = op.off + op.len;
          if (op.t === 'write') {
            const data = bytes(op.seed, op.len);
            const cut = Math.floor(op.len / op.split);
            const payload = op.split === 1 ? data : [data.subarray(0, cut), data.subarray(cut)];
            muts.push({ off: op.off, data, fua: op.fua });
            pending.push(dev.write(op.off, payload, op.fua));
          } else {
            muts.push({ off: op.off, data: Buffer.alloc(op.len), fua: op.fua });
            pending.push(op.t === 'trim' ? dev.trim(op.off, op.len, op.fua) : dev.zero(op.off, op.len, { fua: op.fua, noHole: op.fua }));
          }
          break;
        }
        case 'read': {
          if (op.len === 0) break;
          const buf = Buffer.alloc(op.len);
          reads.push({ off: op.off, buf });
          pending.push(dev.read(op.off, buf));
          break;
        }
        case 'flush':
          flushed = true;
          pending.push(dev.flush());
          break;
        case 'tick':
          pending.push(new Promise((r) => (op.ms === 0 ? setImmediate(r) : setTimeout(r, op.ms))));
          break;
        case 'destage':
          pending.push(cache.destageAll());
          break;
      }
    }
    await Promise.all(pending);

    for (const r of reads) checkRead(r.off, r.buf, before, muts, `read of [${r.off}, +${r.buf.length})`);
    for (const m of muts) m.data.copy(model, m.off);
    // Where mutations of the batch overlap, any of them may have won, byte by
    // byte: read what the volume now says, check it, and hold it to that.
    const contested = new Set<Mutation>();
    for (let i = 0; i < muts.length; i++) {
      for (let j = i + 1; j < muts.length; j++) {
        const a = muts[i]!;
        const b = muts[j]!;
        const lo = Math.max(a.off, b.off);
        const hi = Math.min(a.off + a.data.length, b.off + b.data.length);
        if (lo >= hi) continue;
        contested.add(a).add(b);
        const got = Buffer.alloc(hi - lo);
        await dev.read(lo, got);
        checkRead(lo, got, null, muts, `after overlapping requests, [${lo}, ${hi})`);
        got.copy(model, lo);
      }
    }
    // A flush covers what completed before it started: with the rest of its batch
    // running alongside, that is the state before the batch.
    if (flushed) {
      durable = before;
      since = [...muts];
    } else since.push(...muts);
    // FUA makes that one request durable, whatever else is still in cache
    // (unless a concurrent request overwrote some of it).
    for (const m of muts) if (m.fua && !contested.has(m)) m.data.copy(durable, m.off);

    expect(cache.stats.usedBytes).toBeLessThanOrEqual(CACHE);
    expect(cache.stats.dirtyBytes).toBeLessThanOrEqual(cache.stats.usedBytes);
  }

  // Afterwards the volume holds exactly the model, through the cache and on the backing.
  const all = Buffer.alloc(DEV);
  await dev.read(0, all);
  checkRead(0, all, model, [], 'final read');
  await dev.flush();
  expect(cache.stats.dirtyBytes).toBe(0);
  mem.readSync(0, all);
  checkRead(0, all, model, [], 'backing after the final flush');
  bypassed += cache.stats.bypassedBytes;
  await cache.close();
  await dev.close();
  expect(cache.stats.usedBytes).toBe(0);
}

// CACHE_MODEL_RUNS=2000 for a longer soak.
const RUNS = Number(process.env.CACHE_MODEL_RUNS ?? 100);

describe('CacheMemory against a reference model', () => {
  it('returns what was last written, keeps the budget, and loses nothing flushed in a crash', { timeout: Math.max(30_000, RUNS * 200) }, async () => {
    await fc.assert(
      // Bypass: none, or writes of 1 or 2 cache blocks and more (units of 128 bytes).
      fc.asyncProperty(fc.array(stepArb, { maxLength: 25 }), fc.constantFrom(0, 1, 20), fc.constantFrom(0, BS, 2 * BS), fc.integer(), run),
      { numRuns: RUNS },
    );
    expect(bypassed).toBeGreaterThan(0);
  });
});

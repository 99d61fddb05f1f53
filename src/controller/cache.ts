// The storage system's cache memory: a write-back cache shared by all the
// volumes of one storage system, like an enterprise array's. Writes are
// acknowledged once they are in cache; a background destager writes them to
// the volume later. Reads are served from cache where possible.
//
// One CacheMemory holds a fixed byte budget, cut into cache blocks of
// `blockSize` bytes (64 KiB by default) keyed by (volume, block index). Each
// volume wraps its backing device in a CachedDevice.
//
// Validity is tracked per unit of blockSize/32 bytes (2 KiB for 64 KiB
// blocks) in two 32-bit masks. This is the choice between "fill the block
// first" (read-modify-write) and "track valid ranges":
// - a 4 KiB write into an uncached 64 KiB block costs no backing read;
// - a read miss reads only what was asked, straight into the caller's buffer.
// Only a write that covers part of a unit which is not cached reads that
// unit from the backing device first (at most two units per write).
//
// A unit is in one of these states (per block):
//
//   valid dirty | meaning                             | reads   | destage
//   ------------+-------------------------------------+---------+----------
//     0     0   | not cached: the backing is current  | backing | -
//     1     0   | clean: cache == backing             | cache   | -
//     1     1   | dirty: cache is newer than backing  | cache   | writes it
//
// and a block as a whole is in exactly one place:
//
//   dirty mask | destaging | list        | evictable
//   -----------+-----------+-------------+-----------------------
//        0     |    no     | clean (LRU) | yes, unless pinned
//      != 0    |    no     | dirty queue | no (oldest destaged first)
//      any     |    yes    | none        | no
//
// Rules that keep reads from going back in time, and trims from being undone:
// 1. Every data write to the backing device is a destage of dirty units of a
//    present block, and a block is never destaged twice at once (two writes
//    of one range in flight could land in either order).
// 2. A destage takes the dirty mask and zeroes it; a write landing during
//    the destage sets bits again, so the block stays dirty and is destaged
//    again. The mask is the block's version, per unit: nothing is marked
//    clean that was written after the destage took its snapshot.
//    Destages write views of the cache block, not a copy: a backing device
//    that reads the buffer late may store part of the newer write, which is
//    just as acceptable (the unit stays dirty and is written again).
// 3. Units only go from valid to not valid when the block is evicted (clean
//    only) or dropped, or by a trim/zero, which bumps the block's epoch. So
//    a unit that is not valid when a read starts has no data newer than the
//    backing, and it may be filled from that read only if the block is the
//    same object with the same epoch when the read completes.
// 4. A trim/zero on a volume is a barrier for destages of its range: it
//    waits for destages already in flight, no new one starts until it is
//    done, and it changes the cache after the backing op. Destages never
//    overtake it in either direction.
//
// Other choices:
// - Eviction takes the least recently used *clean* block. Dirty blocks are
//   never evicted: when every block is dirty (or pinned), a writer waits for
//   the destager, which then ignores the destage delay. Writes slow down to
//   backing speed and the budget holds. Reads never wait for space; they
//   just don't cache what they read.
// - Reads allocate (keep what they read) but do not read ahead: the
//   client's readahead decides what to read.
// - The destager writes the oldest dirty blocks first, together with their
//   dirty neighbours (up to 1 MiB per run, a few runs in flight). It starts
//   once a block has been dirty for destageDelayMs, or at once above the
//   high-water mark, or when a writer waits for space.
// - A failed destage puts the units back as dirty and backs off. flush()
//   retries and reports the error, and writers waiting for space get it.
// - FUA: the written range is destaged, then the backing is flushed.
// - Hits and misses are counted per cache block touched by a read.

import type { Logger } from 'pino';
import {
  BlockDeviceError,
  payloadLength,
  toBlockDeviceError,
  type BlockDevice,
  type Extent,
  type Payload,
  type ZeroOptions,
} from '../blockdev/types.js';

export interface CacheMemoryOptions {
  /** Budget in bytes. The cache never holds more than this. */
  size: number;
  /** Cache block size, a power of two of at least 512 (default 64 KiB, smaller for tiny caches). */
  blockSize?: number;
  /** How long a block may stay dirty before the destager writes it (default 50 ms). */
  destageDelayMs?: number;
  /** Fraction of the budget that may be dirty before destaging starts at once (default 0.5). */
  highWater?: number;
  /** Destage runs in flight at once (default 4). */
  parallelDestages?: number;
  log?: Logger;
}

export interface CacheStats {
  /** Blocks of read requests served from cache. */
  hits: number;
  /** Blocks of read requests that needed the backing device. */
  misses: number;
  /** Bytes in blocks holding data not yet on the backing device (whole blocks). */
  dirtyBytes: number;
  /** Bytes in cache blocks in use (whole blocks). */
  usedBytes: number;
  /** Bytes written to the backing devices by destages. */
  destagedBytes: number;
}

const DEFAULT_BLOCK = 64 * 1024;
const MIN_BLOCK = 512;
/** Unit offsets are computed with 32-bit shifts. */
const MAX_BLOCK = 16 * 1024 * 1024;
const UNITS = 32;
/** A destage run writes up to this much (contiguous blocks coalesced into one backing write). */
const MAX_RUN_BYTES = 1024 * 1024;

/** Bits lo..hi-1 of a unit mask (int32, as every mask here is). */
function unitMask(lo: number, hi: number): number {
  return hi <= lo ? 0 : ((-1 >>> (UNITS - (hi - lo))) << lo) | 0;
}

/** Count of trailing zero bits; 32 for 0. */
function ctz(x: number): number {
  return x === 0 ? 32 : 31 - Math.clz32(x & -x);
}

interface Barrier {
  start: number;
  end: number;
  done: Promise<void>;
}

type DestageResult = BlockDeviceError | undefined;

class CacheBlock {
  prev: CacheBlock | null = null;
  next: CacheBlock | null = null;
  list: BlockList | null = null;
  valid = 0;
  dirty = 0;
  /** Dirty units taken by the destage in flight (put back if it fails). */
  taken = 0;
  destaging: Promise<DestageResult> | null = null;
  /** Bumped when units stop being valid other than by eviction (trim/zero): see rule 3. */
  epoch = 0;
  /** In use by a read or a fill across an await: not evictable. */
  pins = 0;
  dirtiedAt = 0;

  constructor(
    readonly dev: CachedDevice,
    readonly index: number,
    /** Byte offset of the block in the volume. */
    readonly start: number,
    /** Bytes of the volume in this block (less than blockSize only for the last block). */
    readonly len: number,
    readonly data: Buffer,
  ) {}
}

/** Intrusive doubly linked list: O(1) move-to-tail without allocation. */
class BlockList {
  head: CacheBlock | null = null;
  tail: CacheBlock | null = null;

  push(b: CacheBlock): void {
    b.list = this;
    b.prev = this.tail;
    b.next = null;
    if (this.tail) this.tail.next = b;
    else this.head = b;
    this.tail = b;
  }

  remove(b: CacheBlock): void {
    if (b.prev) b.prev.next = b.next;
    else this.head = b.next;
    if (b.next) b.next.prev = b.prev;
    else this.tail = b.prev;
    b.prev = b.next = null;
    b.list = null;
  }
}

function shutdown(what: string): BlockDeviceError {
  return new BlockDeviceError('ESHUTDOWN', `${what}: cache memory is shut down`);
}

export class CacheMemory {
  readonly size: number;
  readonly blockSize: number;
  /** Bytes per validity unit (blockSize / 32). */
  readonly unitSize: number;
  readonly stats: CacheStats = { hits: 0, misses: 0, dirtyBytes: 0, usedBytes: 0, destagedBytes: 0 };

  /** @internal */ readonly unitShift: number;
  private readonly capacity: number;
  private readonly delay: number;
  private readonly highWaterBlocks: number;
  private readonly parallel: number;
  private readonly runBlocks: number;
  private readonly log: Logger | undefined;

  private inUse = 0;
  private dirtyBlocks = 0;
  /** Buffers of dropped blocks, reused before allocating more (never more than capacity in all). */
  private readonly pool: Buffer[] = [];
  /** Clean blocks, least recently used first: eviction candidates. */
  private readonly clean = new BlockList();
  /** Dirty blocks not being destaged, oldest dirtied first. */
  private readonly dirtyQueue = new BlockList();
  private readonly devices = new Set<CachedDevice>();
  /** Writers waiting for a block to become free. */
  private waiters: { resolve: () => void; reject: (e: Error) => void }[] = [];

  private destagesInFlight = 0;
  private timer: NodeJS.Timeout | undefined;
  private pumpQueued = false;
  /** After a failed destage, background destaging backs off until then. */
  private retryAt = 0;
  /** Destages are failing (logged once per stretch, not once per retry). */
  private failing = false;
  private closed: Promise<void> | undefined;
  /** No new requests (close or crash under way). */
  private closing = false;
  /** The destager is stopped. */
  private stopped = false;

  constructor(opts: CacheMemoryOptions) {
    const { size, destageDelayMs = 50, highWater = 0.5, parallelDestages = 4, log } = opts;
    if (!(Number.isSafeInteger(size) && size > 0)) throw new Error(`invalid cache size ${size}`);
    let bs = opts.blockSize;
    if (bs === undefined) {
      // A small cache gets smaller blocks rather than a handful of big ones.
      bs = DEFAULT_BLOCK;
      while (bs > 4096 && size / bs < 16) bs /= 2;
    }
    if (!(Number.isSafeInteger(bs) && bs >= MIN_BLOCK && bs <= MAX_BLOCK && (bs & (bs - 1)) === 0)) {
      throw new Error(`invalid cache block size ${bs}: expected a power of two from ${MIN_BLOCK} to ${MAX_BLOCK}`);
    }
    if (size < bs) throw new Error(`cache size ${size} is smaller than one cache block (${bs} bytes)`);
    if (!(destageDelayMs >= 0)) throw new Error(`invalid destage delay ${destageDelayMs}`);
    this.size = size;
    this.blockSize = bs;
    this.unitSize = bs / UNITS;
    this.unitShift = Math.log2(this.unitSize);
    this.capacity = Math.floor(size / bs);
    this.delay = destageDelayMs;
    this.highWaterBlocks = Math.max(0, Math.floor(this.capacity * highWater));
    this.parallel = Math.max(1, parallelDestages);
    this.runBlocks = Math.max(1, Math.floor(MAX_RUN_BYTES / bs));
    this.log = log;
  }

  /** The cached view of one volume. */
  wrap(backing: BlockDevice, name: string): CachedDevice {
    if (this.closing) throw shutdown('wrap');
    const dev = new CachedDevice(this, backing, name);
    this.devices.add(dev);
    return dev;
  }

  /** Destage every dirty block of every volume (without a backing flush). */
  async destageAll(): Promise<void> {
    let err: Error | undefined;
    for (const dev of [...this.devices]) err ??= await this.syncBlocks(dev, dev.blocksIn(0, dev.size));
    if (err) throw err;
  }

  /**
   * Graceful stop: refuse new requests, let those in flight finish, destage
   * everything and flush the backing devices, stop the destager. Volumes are
   * closed by their owners (CachedDevice.close still works afterwards).
   */
  close(): Promise<void> {
    return (this.closed ??= this.doClose());
  }

  private async doClose(): Promise<void> {
    if (this.closing) return; // crashed: nothing left to destage
    this.closing = true;
    let err: unknown;
    for (const dev of [...this.devices]) {
      await dev.whenIdle();
      try {
        await dev.syncAll();
        await dev.backing.flush();
      } catch (e) {
        err ??= e;
      }
    }
    this.stop(shutdown('write'));
    if (err) throw err;
  }

  /**
   * Power loss: forget every cached block, dirty or not, without writing
   * anything. The backing devices stay open and keep whatever reached them.
   * For crash tests and fault injection.
   */
  crash(): void {
    this.closing = true;
    this.stop(shutdown('write'));
    for (const dev of this.devices) {
      for (const b of [...dev.blocks.values()]) this.dropBlock(b);
    }
    this.devices.clear();
  }

  /** @internal A volume closed. */
  forget(dev: CachedDevice): void {
    this.devices.delete(dev);
  }

  private stop(err: Error): void {
    this.stopped = true;
    if (this.timer) clearTimeout(this.timer);
    this.timer = undefined;
    this.rejectWaiters(err);
  }

  // ---- block management (used by CachedDevice) ----------------------------

  /** @internal */ get isClosing(): boolean {
    return this.closing;
  }

  /** @internal */ get hasWaiters(): boolean {
    return this.waiters.length > 0;
  }

  /** @internal A new, empty (clean) block for dev:index, evicting the LRU clean block if the budget is used up. */
  tryAllocate(dev: CachedDevice, index: number): CacheBlock | undefined {
    if (this.stopped) return undefined;
    let data: Buffer;
    if (this.inUse < this.capacity) {
      data = this.pool.pop() ?? Buffer.allocUnsafeSlow(this.blockSize);
      this.inUse++;
      this.stats.usedBytes += this.blockSize;
    } else {
      let victim = this.clean.head;
      while (victim !== null && victim.pins > 0) victim = victim.next;
      if (victim === null) return undefined;
      this.clean.remove(victim);
      victim.dev.blocks.delete(victim.index);
      victim.epoch++;
      data = victim.data;
    }
    const start = index * this.blockSize;
    const blk = new CacheBlock(dev, index, start, Math.min(this.blockSize, dev.size - start), data);
    dev.blocks.set(index, blk);
    this.clean.push(blk);
    return blk;
  }

  /** @internal Wait until a block may be free (then try again). Rejects if destaging fails or the cache shuts down. */
  waitForSpace(): Promise<void> {
    if (this.stopped) return Promise.reject(shutdown('write'));
    return new Promise((resolve, reject) => {
      this.waiters.push({ resolve, reject });
      this.queuePump();
    });
  }

  private notifySpace(): void {
    if (this.waiters.length === 0) return;
    const w = this.waiters;
    this.waiters = [];
    for (const x of w) x.resolve();
  }

  private rejectWaiters(err: Error): void {
    const w = this.waiters;
    this.waiters = [];
    for (const x of w) x.reject(err);
  }

  /** @internal Remove a block from the cache without writing it. */
  dropBlock(b: CacheBlock): void {
    if (b.list) b.list.remove(b);
    if (b.dirty !== 0 || b.destaging) this.uncountDirty();
    b.dev.blocks.delete(b.index);
    b.valid = 0;
    b.dirty = 0;
    b.epoch++;
    // A destage in flight (only after a crash) may still read the buffer.
    if (!b.destaging) this.pool.push(b.data);
    this.inUse--;
    this.stats.usedBytes -= this.blockSize;
    this.notifySpace();
  }

  private uncountDirty(): void {
    this.dirtyBlocks--;
    this.stats.dirtyBytes -= this.blockSize;
  }

  /** @internal A read hit: most recently used. */
  touch(b: CacheBlock): void {
    if (b.list === this.clean && this.clean.tail !== b) {
      this.clean.remove(b);
      this.clean.push(b);
    }
  }

  /** @internal */ unpin(b: CacheBlock): void {
    if (--b.pins === 0 && b.list === this.clean) this.notifySpace();
  }

  /** @internal Units m of b now hold data newer than the backing. */
  markDirty(b: CacheBlock, m: number): void {
    if (b.dirty === 0 && b.destaging === null) {
      this.clean.remove(b);
      b.dirtiedAt = performance.now();
      this.dirtyQueue.push(b);
      this.dirtyBlocks++;
      this.stats.dirtyBytes += this.blockSize;
      if (this.delay === 0 || this.dirtyBlocks > this.highWaterBlocks) this.queuePump();
      else if (this.timer === undefined) this.armTimer(this.delay);
    }
    b.dirty |= m;
  }

  /** @internal Units m of b no longer hold data for the backing (trimmed). */
  clearDirty(b: CacheBlock, m: number): void {
    if ((b.dirty & m) === 0) return;
    b.dirty &= ~m;
    if (b.dirty === 0 && b.destaging === null) {
      this.dirtyQueue.remove(b);
      this.clean.push(b);
      this.uncountDirty();
      this.notifySpace();
    }
  }

  // ---- destaging ----------------------------------------------------------

  /** @internal Run the destager soon (a barrier lifted, or space is wanted). */
  queuePump(): void {
    if (this.pumpQueued || this.stopped) return;
    this.pumpQueued = true;
    queueMicrotask(() => {
      this.pumpQueued = false;
      this.pump();
    });
  }

  private armTimer(ms: number): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = setTimeout(() => {
      this.timer = undefined;
      this.pump();
    }, Math.max(1, Math.ceil(ms)));
    // Dirty data must not keep a process alive that forgot to close: close() destages.
    this.timer.unref();
  }

  private pump(): void {
    if (this.stopped) return;
    const now = performance.now();
    if (now < this.retryAt) {
      this.armTimer(this.retryAt - now);
      return;
    }
    // Writers waiting for space, or too much dirty: destage regardless of age.
    const urgent = this.waiters.length > 0 || this.dirtyBlocks > this.highWaterBlocks;
    let b = this.dirtyQueue.head;
    while (b !== null && this.destagesInFlight < this.parallel) {
      if (!urgent && now - b.dirtiedAt < this.delay) break;
      if (b.dev.barrierOver(b.start, b.start + b.len)) {
        b = b.next; // its barrier's end queues another pump
        continue;
      }
      const run = this.collectRun(b);
      this.destagesInFlight++;
      void this.issueRun(b.dev, run).then(() => {
        this.destagesInFlight--;
        this.pump();
      });
      b = this.dirtyQueue.head;
    }
    const head = this.dirtyQueue.head;
    if (head !== null && this.destagesInFlight < this.parallel && !urgent) {
      this.armTimer(head.dirtiedAt + this.delay - now);
    }
  }

  /** b and its dirty neighbours (not being destaged, outside barriers), in index order. */
  private collectRun(b: CacheBlock): CacheBlock[] {
    const dev = b.dev;
    const run = [b];
    const ok = (n: CacheBlock | undefined): n is CacheBlock =>
      n !== undefined && n.list === this.dirtyQueue && dev.barrierOver(n.start, n.start + n.len) === undefined;
    for (let i = b.index - 1; run.length < this.runBlocks; i--) {
      const n = dev.blocks.get(i);
      if (!ok(n)) break;
      run.unshift(n);
    }
    for (let i = b.index + 1; run.length < this.runBlocks; i++) {
      const n = dev.blocks.get(i);
      if (!ok(n)) break;
      run.push(n);
    }
    return run;
  }

  /**
   * Write the dirty units of run (consecutive blocks of dev, each dirty, none
   * destaging, none under a barrier) to the backing device. Contiguous dirty
   * ranges become one backing write of several pieces. Resolves (never
   * rejects) with the error, if any, once every backing write has settled.
   */
  private issueRun(dev: CachedDevice, run: CacheBlock[]): Promise<DestageResult> {
    const writes: Promise<void>[] = [];
    const shift = this.unitShift;
    let wStart = -1;
    let wEnd = -1;
    let pieces: Buffer[] = [];
    let bytes = 0;
    const emit = (): void => {
      if (wStart < 0) return;
      writes.push(callWrite(dev.backing, wStart, pieces.length === 1 ? pieces[0]! : pieces));
    };
    for (const b of run) {
      const d = b.dirty;
      const v = b.valid;
      // Dirty runs of units, bridged over clean valid gaps (rewriting clean
      // data is harmless and saves a backing write); never over units that
      // are not cached, whose current data is only on the backing.
      let m = d;
      let s0 = -1;
      let s1 = -1;
      for (;;) {
        let u0 = 32;
        let u1 = 32;
        if (m !== 0) {
          u0 = ctz(m);
          u1 = u0 + ctz(~(m >>> u0));
          m &= ~unitMask(u0, u1);
        }
        if (s0 >= 0 && u0 < 32) {
          const gap = unitMask(s1, u0);
          if ((v & gap) === gap) {
            s1 = u1;
            continue;
          }
        }
        if (s0 >= 0) {
          const from = b.start + (s0 << shift);
          const to = b.start + Math.min(s1 << shift, b.len);
          const view = b.data.subarray(from - b.start, to - b.start);
          if (from === wEnd) pieces.push(view);
          else {
            emit();
            wStart = from;
            pieces = [view];
          }
          wEnd = to;
          bytes += to - from;
        }
        if (u0 >= 32) break;
        s0 = u0;
        s1 = u1;
      }
      b.taken = d;
      b.dirty = 0;
      this.dirtyQueue.remove(b);
    }
    emit();
    // allSettled: a block is destaged again only after every write of this run has landed (rule 1).
    const p = Promise.allSettled(writes).then((results) => {
      const failed = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
      return this.runDone(dev, run, failed ? toBlockDeviceError(failed.reason, `destage ${dev.name}`) : undefined, bytes);
    });
    for (const b of run) b.destaging = p;
    return p;
  }

  private runDone(dev: CachedDevice, run: CacheBlock[], err: DestageResult, bytes: number): DestageResult {
    const now = performance.now();
    for (const b of run) {
      b.destaging = null;
      if (err) b.dirty |= b.taken;
      b.taken = 0;
      if (dev.blocks.get(b.index) !== b) continue; // dropped by a crash
      if (b.dirty !== 0) {
        b.dirtiedAt = now;
        this.dirtyQueue.push(b);
      } else {
        this.clean.push(b);
        this.uncountDirty();
      }
    }
    if (err) {
      if (!this.failing) this.log?.warn({ err, volume: dev.name }, 'destage failed; the data stays dirty in cache and will be retried');
      this.failing = true;
      this.retryAt = now + Math.max(this.delay, 10);
      // A writer waiting for space would otherwise wait for a destage that keeps failing.
      this.rejectWaiters(err);
      if (!this.stopped) this.armTimer(this.retryAt - now);
    } else {
      if (this.failing) this.log?.info({ volume: dev.name }, 'destaging works again');
      this.failing = false;
      this.stats.destagedBytes += bytes;
      this.notifySpace();
    }
    return err;
  }

  /**
   * @internal Make the data of targets (blocks of dev, in index order) that
   * was dirty when this was called reach the backing device. Resolves with
   * the first error.
   */
  async syncBlocks(dev: CachedDevice, targets: CacheBlock[]): Promise<DestageResult> {
    // A destage in flight may predate our writes (or not): wait it out
    // before writing the block again (rule 1).
    const inFlight = new Set<Promise<DestageResult>>();
    for (const b of targets) if (b.destaging) inFlight.add(b.destaging);
    // Their errors do not matter: failed units are dirty again and written below.
    for (const p of inFlight) await p;

    for (;;) {
      const live = targets.filter((b) => dev.blocks.get(b.index) === b && (b.dirty !== 0 || b.destaging !== null));
      if (live.length === 0) return undefined;
      const bar = dev.barrierOver(live[0]!.start, live[live.length - 1]!.start + this.blockSize);
      if (bar) {
        await bar;
        continue;
      }
      const waits: Promise<DestageResult>[] = [];
      let run: CacheBlock[] = [];
      const flushRun = (): void => {
        if (run.length > 0) waits.push(this.issueRun(dev, run));
        run = [];
      };
      for (const b of live) {
        // Started after we were called: it carries our data.
        if (b.destaging) {
          waits.push(b.destaging);
          continue;
        }
        const last = run[run.length - 1];
        if (last && (last.index + 1 !== b.index || run.length >= this.runBlocks)) flushRun();
        run.push(b);
      }
      flushRun();
      let err: DestageResult;
      for (const e of await Promise.all(waits)) err ??= e;
      return err;
    }
  }
}

function callWrite(dev: BlockDevice, offset: number, data: Payload): Promise<void> {
  try {
    return dev.write(offset, data);
  } catch (e) {
    return Promise.reject(e);
  }
}

/**
 * One volume seen through the cache memory. Not a cache of its own: every
 * connection shares the CacheMemory, so a flush through any of them covers
 * writes from all.
 */
export class CachedDevice implements BlockDevice {
  readonly size: number;
  readonly readOnly: boolean;
  readonly multiConnSafe: boolean;
  readonly fastZero: boolean;

  /** @internal This volume's cache blocks by index. */
  readonly blocks = new Map<number, CacheBlock>();
  /** @internal Trims/zeros in progress (rule 4); almost always empty. */
  readonly barriers: Barrier[] = [];

  private readonly B: number;
  private inFlight = 0;
  private idle: (() => void)[] = [];
  private closed = false;
  private closing: Promise<void> | undefined;

  constructor(
    private readonly mem: CacheMemory,
    readonly backing: BlockDevice,
    readonly name: string,
  ) {
    this.size = backing.size;
    this.readOnly = backing.readOnly;
    this.multiConnSafe = backing.multiConnSafe;
    this.fastZero = backing.fastZero;
    this.B = mem.blockSize;
  }

  async read(offset: number, dest: Buffer): Promise<void> {
    this.enter('read');
    try {
      await this.readCached(offset, dest);
    } finally {
      this.leave();
    }
  }

  private async readCached(offset: number, dest: Buffer): Promise<void> {
    const cache = this.mem;
    const B = this.B;
    const shift = cache.unitShift;
    const stats = cache.stats;
    const end = offset + dest.length;
    // Everything cached is copied now, before any await: a dirty unit may be
    // destaged and evicted while our backing read is in flight, and that read,
    // racing the destage, could return what the backing held before it.
    let gapStart = -1;
    let gapEnd = -1;
    let gaps: number[] | null = null;
    let fills: CacheBlock[] | null = null;
    let epochs: number[] | null = null;
    let idx = Math.floor(offset / B);
    let pos = offset;
    while (pos < end) {
      const bStart = idx * B;
      const a = pos - bStart;
      const b = Math.min(end - bStart, B);
      const uLo = a >>> shift;
      const uHi = ((b - 1) >>> shift) + 1;
      const need = unitMask(uLo, uHi);
      let blk = this.blocks.get(idx);
      if (blk !== undefined && (blk.valid & need) === need) {
        blk.data.copy(dest, pos - offset, a, b);
        stats.hits++;
        cache.touch(blk);
      } else {
        stats.misses++;
        // Read-allocate, unless writers are waiting for space.
        if (blk === undefined && !cache.hasWaiters) blk = cache.tryAllocate(this, idx);
        const v = blk !== undefined ? blk.valid & need : 0;
        if (blk !== undefined) {
          blk.pins++;
          (fills ??= []).push(blk);
          (epochs ??= []).push(blk.epoch);
        }
        for (let u = uLo; u < uHi; ) {
          const bit = (v >>> u) & 1;
          let u2 = u + 1;
          while (u2 < uHi && ((v >>> u2) & 1) === bit) u2++;
          const s = Math.max(a, u << shift);
          const e = Math.min(b, u2 << shift);
          if (bit === 1) blk!.data.copy(dest, bStart + s - offset, s, e);
          else if (bStart + s === gapEnd) gapEnd = bStart + e;
          else {
            if (gapStart >= 0) (gaps ??= []).push(gapStart, gapEnd);
            gapStart = bStart + s;
            gapEnd = bStart + e;
          }
          u = u2;
        }
      }
      pos = bStart + b;
      idx++;
    }
    if (gapStart < 0) return;

    let err: unknown;
    try {
      if (gaps === null) await this.backing.read(gapStart, dest.subarray(gapStart - offset, gapEnd - offset));
      else {
        gaps.push(gapStart, gapEnd);
        const reads: Promise<void>[] = [];
        for (let i = 0; i < gaps.length; i += 2) {
          reads.push(this.backing.read(gaps[i]!, dest.subarray(gaps[i]! - offset, gaps[i + 1]! - offset)));
        }
        // Settle all before returning: dest must not be written after we answer.
        for (const r of await Promise.allSettled(reads)) if (r.status === 'rejected') err ??= r.reason;
      }
    } catch (e) {
      err = e;
    }
    if (fills === null) {
      if (err) throw toBlockDeviceError(err, 'read');
      return;
    }
    for (let i = 0; i < fills.length; i++) {
      const blk = fills[i]!;
      cache.unpin(blk);
      if (err || this.blocks.get(blk.index) !== blk || blk.epoch !== epochs![i]) continue;
      // Fill only whole units that are still not cached (rule 3).
      const a = Math.max(offset, blk.start) - blk.start;
      const b = Math.min(end, blk.start + blk.len) - blk.start;
      const m = fullUnits(a, b, blk.len, shift) & ~blk.valid;
      copyUnits(dest, blk.start - offset, blk.data, m, shift, blk.len);
      blk.valid |= m;
    }
    if (err) throw toBlockDeviceError(err, 'read');
  }

  async write(offset: number, data: Payload, fua = false): Promise<void> {
    this.enter('write');
    let pinned: CacheBlock | null = null;
    try {
      if (this.readOnly) throw new BlockDeviceError('EPERM', `write: ${this.name} is read-only`);
      const cache = this.mem;
    const B = this.B;
      const shift = cache.unitShift;
      const end = offset + payloadLength(data);
      const single = Buffer.isBuffer(data) ? data : null;
      const pieces = single === null ? (data as readonly Buffer[]) : null;
      let pi = 0; // piece index and offset within it, when data comes in pieces
      let po = 0;
      let pos = offset;
      while (pos < end) {
        const idx = Math.floor(pos / B);
        const bStart = idx * B;
        const blen = Math.min(B, this.size - bStart);
        const a = pos - bStart;
        const b = Math.min(end - bStart, blen);
        const blk = this.blocks.get(idx) ?? cache.tryAllocate(this, idx);
        if (blk === undefined) {
          // Every block is dirty or busy: wait for the destager (writes slow to backing speed).
          await cache.waitForSpace();
          continue;
        }
        const fill = partialUnits(a, b, blen, shift) & ~blk.valid;
        if (fill !== 0) {
          // Stay pinned until we have copied, or the filled block could be evicted under us.
          if (pinned !== blk) {
            if (pinned) cache.unpin(pinned);
            blk.pins++;
            pinned = blk;
          }
          await this.fillUnits(blk, fill);
          continue;
        }
        const n = b - a;
        if (single !== null) single.copy(blk.data, a, pos - offset, pos - offset + n);
        else {
          let done = 0;
          while (done < n) {
            const p = pieces![pi]!;
            const k = Math.min(p.length - po, n - done);
            p.copy(blk.data, a + done, po, po + k);
            done += k;
            po += k;
            if (po === p.length) {
              pi++;
              po = 0;
            }
          }
        }
        const m = unitMask(a >>> shift, ((b - 1) >>> shift) + 1);
        blk.valid |= m;
        cache.markDirty(blk, m);
        if (pinned !== null) {
          cache.unpin(pinned);
          pinned = null;
        }
        pos = bStart + b;
      }
      if (fua) {
        await this.syncRange(offset, end);
        await this.backing.flush();
      }
    } finally {
      if (pinned !== null) this.mem.unpin(pinned);
      this.leave();
    }
  }

  /** Read units m of blk (not cached) from the backing, for a write that covers them only in part. */
  private async fillUnits(blk: CacheBlock, m: number): Promise<void> {
    const shift = this.mem.unitShift;
    const epoch = blk.epoch;
    const reads: Promise<void>[] = [];
    const bufs: Buffer[] = [];
    const runs: number[] = [];
    for (let r = m; r !== 0; ) {
      const u0 = ctz(r);
      const u1 = u0 + ctz(~(r >>> u0));
      r &= ~unitMask(u0, u1);
      const s = u0 << shift;
      const e = Math.min(u1 << shift, blk.len);
      const buf = Buffer.allocUnsafe(e - s);
      bufs.push(buf);
      runs.push(u0, u1);
      reads.push(this.backing.read(blk.start + s, buf));
    }
    try {
      await Promise.all(reads);
    } catch (e) {
      throw toBlockDeviceError(e, 'write: reading the rest of a cache unit');
    }
    if (this.blocks.get(blk.index) !== blk || blk.epoch !== epoch) return; // trimmed meanwhile: the caller retries
    for (let i = 0; i < bufs.length; i++) {
      const u0 = runs[2 * i]!;
      const run = unitMask(u0, runs[2 * i + 1]!) & ~blk.valid; // a write may have filled some meanwhile
      copyUnits(bufs[i]!, -(u0 << shift), blk.data, run, shift, blk.len);
      blk.valid |= run;
    }
  }

  async flush(): Promise<void> {
    this.enter('flush');
    try {
      await this.syncAll();
      await this.backing.flush();
    } finally {
      this.leave();
    }
  }

  trim(offset: number, length: number, fua = false): Promise<void> {
    return this.invalidate('trim', offset, length, () => this.backing.trim(offset, length, fua));
  }

  zero(offset: number, length: number, opts: ZeroOptions = {}): Promise<void> {
    if (opts.fastZero && !this.backing.fastZero) {
      return Promise.reject(new BlockDeviceError('ENOTSUP', `zero: fast zeroing is not supported on ${this.name}`));
    }
    return this.invalidate('zero', offset, length, () => this.backing.zero(offset, length, opts));
  }

  /** Trim and zero: the backing op under a barrier, then the cache (rule 4). */
  private async invalidate(op: string, offset: number, length: number, backingOp: () => Promise<void>): Promise<void> {
    this.enter(op);
    try {
      if (this.readOnly) throw new BlockDeviceError('EPERM', `${op}: ${this.name} is read-only`);
      if (length === 0) return await backingOp();
      const end = offset + length;
      let release!: () => void;
      const barrier: Barrier = { start: offset, end, done: new Promise<void>((r) => (release = r)) };
      this.barriers.push(barrier);
      try {
        // Destages issued before the barrier must land before the backing op, or they would undo it.
        for (;;) {
          const busy = this.blocksIn(offset, end).find((b) => b.destaging !== null);
          if (!busy) break;
          await busy.destaging;
        }
        let err: unknown;
        try {
          await backingOp();
        } catch (e) {
          // ENOTSUP: the backing did nothing (fast zero refused), so neither do we.
          if (e instanceof BlockDeviceError && e.errno === 'ENOTSUP') throw e;
          err = e;
        }
        // Even after a failure the range is in an unknown state on the backing; drop
        // our copy of it rather than keep claiming clean data that may be gone.
        this.applyInvalidate(offset, end);
        if (err) throw toBlockDeviceError(err, op);
      } finally {
        this.barriers.splice(this.barriers.indexOf(barrier), 1);
        release();
        this.mem.queuePump();
      }
    } finally {
      this.leave();
    }
  }

  /** The backing range [start, end) now reads as zeroes: make the cache agree. */
  private applyInvalidate(start: number, end: number): void {
    const cache = this.mem;
    const shift = cache.unitShift;
    for (const b of this.blocksIn(start, end)) {
      const a = Math.max(start, b.start) - b.start;
      const e = Math.min(end, b.start + b.len) - b.start;
      if (a === 0 && e === b.len) {
        cache.dropBlock(b);
        continue;
      }
      const full = fullUnits(a, e, b.len, shift);
      // Cached units only partly covered keep their other bytes: zero the covered ones,
      // which is what the backing now holds there; a dirty unit stays dirty.
      if ((unitMask(a >>> shift, ((e - 1) >>> shift) + 1) & ~full & b.valid) !== 0) b.data.fill(0, a, e);
      b.valid &= ~full;
      cache.clearDirty(b, full);
      b.epoch++;
    }
  }

  async extents(offset: number, length: number): Promise<Extent[]> {
    this.enter('extents');
    try {
      // Dirty data is not allocated on the backing yet: write it first, then ask.
      await this.syncRange(offset, offset + length);
      return await this.backing.extents(offset, length);
    } finally {
      this.leave();
    }
  }

  /** Prefetch: read the range through the cache (at most half of the cache's worth). */
  async cache(offset: number, length: number): Promise<void> {
    const limit = Math.min(length, Math.floor(this.mem.size / 2));
    if (limit <= 0) return;
    const chunk = Math.min(limit, MAX_RUN_BYTES);
    const scratch = Buffer.allocUnsafe(chunk);
    for (let done = 0; done < limit; done += chunk) {
      const n = Math.min(chunk, limit - done);
      await this.read(offset + done, n === chunk ? scratch : scratch.subarray(0, n));
    }
  }

  /** Destage this volume's dirty blocks, close the backing device. */
  close(): Promise<void> {
    return (this.closing ??= this.doClose());
  }

  private async doClose(): Promise<void> {
    this.closed = true;
    await this.whenIdle();
    let err: unknown;
    try {
      await this.syncAll();
    } catch (e) {
      err = e;
    }
    for (const b of [...this.blocks.values()]) this.mem.dropBlock(b);
    this.mem.forget(this);
    await this.backing.close();
    if (err) throw err;
  }

  // ---- helpers --------------------------------------------------------------

  /** @internal Destage every dirty block of this volume. */
  syncAll(): Promise<void> {
    return this.syncRange(0, this.size);
  }

  private async syncRange(start: number, end: number): Promise<void> {
    const targets = this.blocksIn(start, end).filter((b) => b.dirty !== 0 || b.destaging !== null);
    if (targets.length === 0) return;
    const err = await this.mem.syncBlocks(this, targets);
    if (err) throw err;
  }

  /** @internal Cached blocks overlapping [start, end), in index order. */
  blocksIn(start: number, end: number): CacheBlock[] {
    const out: CacheBlock[] = [];
    if (end <= start || this.blocks.size === 0) return out;
    const first = Math.floor(start / this.B);
    const last = Math.floor((end - 1) / this.B);
    if (last - first + 1 <= this.blocks.size) {
      for (let i = first; i <= last; i++) {
        const b = this.blocks.get(i);
        if (b) out.push(b);
      }
      return out;
    }
    for (const b of this.blocks.values()) if (b.index >= first && b.index <= last) out.push(b);
    return out.sort((x, y) => x.index - y.index);
  }

  /** @internal The barrier overlapping [start, end), if any. */
  barrierOver(start: number, end: number): Promise<void> | undefined {
    for (const b of this.barriers) if (b.start < end && start < b.end) return b.done;
    return undefined;
  }

  /** @internal Resolves when no request of this volume is in flight. */
  whenIdle(): Promise<void> {
    if (this.inFlight === 0) return Promise.resolve();
    return new Promise((resolve) => this.idle.push(resolve));
  }

  private enter(op: string): void {
    if (this.closed) throw new BlockDeviceError('ESHUTDOWN', `${op}: ${this.name} is closed`);
    if (this.mem.isClosing) throw shutdown(op);
    this.inFlight++;
  }

  private leave(): void {
    if (--this.inFlight === 0 && this.idle.length > 0) {
      const w = this.idle;
      this.idle = [];
      for (const r of w) r();
    }
  }
}

/** Units touched by [a, b) only in part (they need their other bytes from somewhere). */
function partialUnits(a: number, b: number, blen: number, shift: number): number {
  const size = 1 << shift;
  let m = 0;
  if ((a & (size - 1)) !== 0) m |= 1 << (a >>> shift);
  // The last unit of the volume may be short: reaching the volume's end covers it.
  if ((b & (size - 1)) !== 0 && b !== blen) m |= 1 << ((b - 1) >>> shift);
  return m;
}

/** Units wholly inside [a, b) of a block of blen bytes. */
function fullUnits(a: number, b: number, blen: number, shift: number): number {
  const size = 1 << shift;
  const lo = (a + size - 1) >>> shift;
  const hi = b === blen ? (b + size - 1) >>> shift : b >>> shift;
  return unitMask(lo, hi);
}

/**
 * Copy units m from src into dst (a cache block's buffer), where byte x of
 * the block is byte x + srcOff of src.
 */
function copyUnits(src: Buffer, srcOff: number, dst: Buffer, m: number, shift: number, blen: number): void {
  while (m !== 0) {
    const u0 = ctz(m);
    const u1 = u0 + ctz(~(m >>> u0));
    m &= ~unitMask(u0, u1);
    const s = u0 << shift;
    const e = Math.min(u1 << shift, blen);
    src.copy(dst, s, s + srcOff, e + srcOff);
  }
}

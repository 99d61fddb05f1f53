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
//    present block, or a large write going past the cache (rule 5), and a
//    block is never destaged twice at once (two writes of one range in
//    flight could land in either order).
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
// 5. Large writes go past the cache: a write of at least `bypassBytes`
//    (1 MiB by default, the destager's largest run), or of a cache block or
//    more that continues a sequential stream which has already written
//    `bypassBytes` (a volume follows its last 8 streams), whose ends fall on
//    unit boundaries, is written straight to the backing device under a
//    barrier, as a trim is (rule 4). Once it has landed, the units it
//    covers are neither valid nor dirty any more (it replaced them) and the
//    epoch is bumped, so a fill that read the backing meanwhile is dropped
//    (rule 3).
//    After a failure, dirty units stay: they hold acknowledged data.
//    Why: staging such a write buys nothing the destager would not also
//    do, and costs a copy and the cache's space. Under a steady stream of
//    them the cache fills with dirty blocks and every write waits for the
//    destager anyway; going past it, a 1 MiB write costs what it costs
//    without a cache, and lands in the memory store's own pages (its
//    write target), which a sync mirror in the same storage system adopts
//    instead of copying. Linux's bcache skips its cache for sequential
//    I/O past a cutoff for the same reasons; a kernel client writes a file
//    in requests of 128-512 KiB, which get there as a stream. bypassBytes 0
//    stages every write.
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
  toBlockDeviceError,
  type BlockDevice,
} from '../../blockdev/types.js';
import { CachedDevice, callWrite } from './device.js';
import { BlockList, CacheBlock, DEFAULT_BLOCK, DEFAULT_BYPASS, DestageResult, MAX_BLOCK, MAX_RUN_BYTES, MIN_BLOCK, UNITS, ctz, shutdown, unitMask } from './blocks.js';

export interface CacheMemoryOptions {
  /** Budget in bytes. The cache never holds more than this. */
  size: number;
  /** Cache block size, a power of two of at least 512 (default 64 KiB, smaller for tiny caches). */
  blockSize?: number;
  /** Writes of at least this many bytes, and sequential streams once they have written this many, go past the cache (rule 5); 0: none. Default 1 MiB. */
  bypass?: number;
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
  /** Bytes of writes that went past the cache, straight to the backing devices (rule 5). */
  bypassedBytes: number;
}

export class CacheMemory {
  readonly size: number;
  readonly blockSize: number;
  /**
   * Write-through (cache policy `write-through`): every write is on the backing before it is
   * acknowledged, as if it carried FUA; reads still hit. Write-back (the default) destages later.
   * Changed at run time by `blockmirror apply`.
   */
  writeThrough = false;
  /** Writes this large, and streams once this long, go past the cache (rule 5); 0: none. Changed at run time by `blockmirror apply`. */
  bypassBytes: number;
  /** Bytes per validity unit (blockSize / 32). */
  readonly unitSize: number;
  readonly stats: CacheStats = { hits: 0, misses: 0, dirtyBytes: 0, usedBytes: 0, destagedBytes: 0, bypassedBytes: 0 };

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
    const { size, bypass = DEFAULT_BYPASS, destageDelayMs = 50, highWater = 0.5, parallelDestages = 4, log } = opts;
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
    if (!(Number.isSafeInteger(bypass) && bypass >= 0)) throw new Error(`invalid cache bypass size ${bypass}: expected a number of bytes, or 0 for none`);
    this.bypassBytes = bypass;
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


// One volume seen through the cache memory (memory.ts has the design: states, rules, choices).
import {
  BlockDeviceError,
  payloadLength,
  toBlockDeviceError,
  type BlockDevice,
  type Extent,
  type Payload,
  type WriteTarget,
  type ZeroOptions,
} from '../../blockdev/types.js';
import { CacheMemory } from './memory.js';
import { Barrier, CacheBlock, MAX_RUN_BYTES, ctz, shutdown, unitMask } from './blocks.js';

/** Sequential streams of writes followed per volume (rule 5): a few writers at once, as bcache follows its last ones. */
const STREAMS = 8;

export function callWrite(dev: BlockDevice, offset: number, data: Payload): Promise<void> {
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

  /**
   * The last STREAMS sequential streams of writes (rule 5): where each ended and how many bytes
   * it has written in a row; a write that starts where none ended replaces the oldest.
   */
  private readonly streamEnd = new Float64Array(STREAMS).fill(-1);
  private readonly streamRun = new Float64Array(STREAMS);
  private streamNext = 0;

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

  write(offset: number, data: Payload, fua = false): Promise<void> {
    const length = payloadLength(data);
    const bypass = this.bypasses(offset, length);
    this.noteWrite(offset, length);
    if (bypass) return this.writeAround(offset, length, fua, (f) => this.backing.write(offset, data, f));
    return this.writeCached(offset, data, fua);
  }

  /**
   * Does this write go past the cache (memory.ts, rule 5)? A write of at least the cache's bypass
   * size, or of a cache block or more that continues a sequential stream which has already
   * written that much; either way with its ends on unit boundaries, so it replaces whole units.
   */
  private bypasses(offset: number, length: number): boolean {
    const min = this.mem.bypassBytes;
    if (min === 0) return false;
    if (length < min && (length < this.B || this.streamBefore(offset) < min)) return false;
    const mask = this.mem.unitSize - 1;
    const end = offset + length;
    // Offsets beyond 2^32 keep their low bits under `&`.
    return (offset & mask) === 0 && ((end & mask) === 0 || end === this.size);
  }

  /**
   * A bypassing write may land in the backing's own memory (the memory store's pages): its
   * target, committed as writeAround commits a write. A sync pair's mirror, written from the held
   * pages, bypasses its cache too and adopts them.
   */
  writeTarget(offset: number, length: number, from: number): WriteTarget | null {
    if (this.closed || this.readOnly || !this.bypasses(offset, length)) return null;
    const below = this.backing.writeTarget?.(offset, length, from);
    // No target: the caller write()s the payload instead, and write() notes it in its stream.
    if (!below) return null;
    this.noteWrite(offset, length);
    return {
      pieces: below.pieces,
      commit: (head: Payload, fua = false): Promise<void> => {
        let used = false;
        const commit = (f: boolean): Promise<void> => {
          used = true;
          return below.commit(head, f);
        };
        // Refused before reaching the volume (closed, shutting down): the target goes back unused.
        return this.writeAround(offset, length, fua, commit).finally(() => {
          if (!used) below.abort();
        });
      },
      abort: () => below.abort(),
      ...(below.hold ? { hold: () => below.hold!() } : {}),
    };
  }

  /** Bytes the stream that ended at `offset` wrote in a row (0: none ended there). */
  private streamBefore(offset: number): number {
    for (let i = 0; i < STREAMS; i++) if (this.streamEnd[i] === offset) return this.streamRun[i]!;
    return 0;
  }

  /** A write of [offset, offset + length) continues the stream that ended at offset, or starts one. */
  private noteWrite(offset: number, length: number): void {
    const end = offset + length;
    for (let i = 0; i < STREAMS; i++) {
      if (this.streamEnd[i] === offset) {
        this.streamEnd[i] = end;
        this.streamRun[i]! += length;
        return;
      }
    }
    const i = this.streamNext;
    this.streamNext = (i + 1) % STREAMS;
    this.streamEnd[i] = end;
    this.streamRun[i] = length;
  }

  /**
   * Write [offset, offset + length) straight to the backing with `op`, under a barrier as a trim
   * is (rule 4); then the cache lets go of the range (rule 5).
   */
  private async writeAround(offset: number, length: number, fua: boolean, op: (fua: boolean) => Promise<void>): Promise<void> {
    const end = offset + length;
    // Write-through: on the volume before the answer, as a write through the cache would be.
    await this.underBarrier('write', offset, length, () => op(fua || this.mem.writeThrough), (failed) => this.applyWritten(offset, end, !failed));
    this.mem.stats.bypassedBytes += length;
  }

  /**
   * The backing now holds a bypassing write of [start, end) (whole units), or, if it failed, an
   * unknown mix there. Units cached in the range drop out, and a fill begun meanwhile is dropped
   * (the epoch): what the cache held there is older than the backing. Dirty units go too once
   * the write landed (it replaced them, or raced them and won), but stay after a failure: they
   * hold acknowledged data, which their destage puts back.
   */
  private applyWritten(start: number, end: number, landed: boolean): void {
    const cache = this.mem;
    const shift = cache.unitShift;
    for (const b of this.blocksIn(start, end)) {
      const a = Math.max(start, b.start) - b.start;
      const e = Math.min(end, b.start + b.len) - b.start;
      if (landed && a === 0 && e === b.len) {
        cache.dropBlock(b);
        continue;
      }
      const covered = fullUnits(a, e, b.len, shift);
      if (landed) {
        b.valid &= ~covered;
        cache.clearDirty(b, covered);
      } else b.valid &= ~covered | b.dirty;
      b.epoch++;
    }
  }

  private async writeCached(offset: number, data: Payload, fua: boolean): Promise<void> {
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
      if (fua || this.mem.writeThrough) {
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
  private invalidate(op: string, offset: number, length: number, backingOp: () => Promise<void>): Promise<void> {
    // Even after a failure the range is in an unknown state on the backing; drop our copy of it
    // rather than keep claiming clean data that may be gone.
    return this.underBarrier(op, offset, length, backingOp, () => this.applyInvalidate(offset, offset + length));
  }

  /**
   * The backing op on [offset, offset + length) under a barrier (rule 4): destages of the range
   * issued before it land first (or they would undo it), none starts until it is done, and
   * `after` brings the cache in line, told whether the op failed, before the barrier lifts. An
   * ENOTSUP means the backing did nothing (fast zero refused), so neither does the cache.
   */
  private async underBarrier(op: string, offset: number, length: number, backingOp: () => Promise<void>, after: (failed: boolean) => void): Promise<void> {
    this.enter(op);
    try {
      if (this.readOnly) throw new BlockDeviceError('EPERM', `${op}: ${this.name} is read-only`);
      if (length === 0) return await backingOp();
      const end = offset + length;
      let release!: () => void;
      const barrier: Barrier = { start: offset, end, done: new Promise<void>((r) => (release = r)) };
      this.barriers.push(barrier);
      try {
        for (;;) {
          const busy = this.blocksIn(offset, end).find((b) => b.destaging !== null);
          if (!busy) break;
          await busy.destaging;
        }
        let err: unknown;
        try {
          await backingOp();
        } catch (e) {
          if (e instanceof BlockDeviceError && e.errno === 'ENOTSUP') throw e;
          err = e;
        }
        after(err !== undefined);
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
export function partialUnits(a: number, b: number, blen: number, shift: number): number {
  const size = 1 << shift;
  let m = 0;
  if ((a & (size - 1)) !== 0) m |= 1 << (a >>> shift);
  // The last unit of the volume may be short: reaching the volume's end covers it.
  if ((b & (size - 1)) !== 0 && b !== blen) m |= 1 << ((b - 1) >>> shift);
  return m;
}

/** Units wholly inside [a, b) of a block of blen bytes. */
export function fullUnits(a: number, b: number, blen: number, shift: number): number {
  const size = 1 << shift;
  const lo = (a + size - 1) >>> shift;
  const hi = b === blen ? (b + size - 1) >>> shift : b >>> shift;
  return unitMask(lo, hi);
}

/**
 * Copy units m from src into dst (a cache block's buffer), where byte x of
 * the block is byte x + srcOff of src.
 */
export function copyUnits(src: Buffer, srcOff: number, dst: Buffer, m: number, shift: number, blen: number): void {
  while (m !== 0) {
    const u0 = ctz(m);
    const u1 = u0 + ctz(~(m >>> u0));
    m &= ~unitMask(u0, u1);
    const s = u0 << shift;
    const e = Math.min(u1 << shift, blen);
    src.copy(dst, s, s + srcOff, e + srcOff);
  }
}


// The cache memory's bookkeeping: blocks of validity units, the LRU list, and unit masks.
import { BlockDeviceError } from '../../blockdev/types.js';
import { CachedDevice } from './device.js';

export const DEFAULT_BLOCK = 64 * 1024;
export const MIN_BLOCK = 512;
/** Unit offsets are computed with 32-bit shifts. */
export const MAX_BLOCK = 16 * 1024 * 1024;
export const UNITS = 32;
/** A destage run writes up to this much (contiguous blocks coalesced into one backing write). */
export const MAX_RUN_BYTES = 1024 * 1024;
/** Writes this large go past the cache by default (memory.ts, rule 5): no larger than a destage run. */
export const DEFAULT_BYPASS = MAX_RUN_BYTES;

/** Bits lo..hi-1 of a unit mask (int32, as every mask here is). */
export function unitMask(lo: number, hi: number): number {
  return hi <= lo ? 0 : ((-1 >>> (UNITS - (hi - lo))) << lo) | 0;
}

/** Count of trailing zero bits; 32 for 0. */
export function ctz(x: number): number {
  return x === 0 ? 32 : 31 - Math.clz32(x & -x);
}

export interface Barrier {
  start: number;
  end: number;
  done: Promise<void>;
}

export type DestageResult = BlockDeviceError | undefined;

export class CacheBlock {
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
export class BlockList {
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

export function shutdown(what: string): BlockDeviceError {
  return new BlockDeviceError('ESHUTDOWN', `${what}: cache memory is shut down`);
}


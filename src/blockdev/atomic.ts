// The layer that makes COMPARE AND WRITE atomic against every other write to the same LBAs, from
// any protocol: every volume's host device (what NBD and iSCSI both call) is wrapped by one
// AtomicDevice, and writes, trims and zeroes take a range lock on their bytes. Reads take none:
// a read racing a write may see either, as on any disk.
import { FilterDevice } from './filter.js';
import { RangeLock } from './range-lock.js';
import { payloadLength, type BlockDevice, type Payload, type ReadViews, type WriteTarget, type ZeroOptions } from './types.js';

/** The compare step of compareAndWrite found different bytes; nothing was written. */
export class MiscompareError extends Error {
  override readonly name = 'MiscompareError';
  readonly code = 'EMISCOMPARE';
  constructor(
    /** Byte offset of the first differing byte, relative to the start of the compare. */
    readonly firstDifference: number,
  ) {
    super(`compare and write: data differs at byte ${firstDifference}`);
  }
}

export class AtomicDevice extends FilterDevice {
  /**
   * @param locks shared by every AtomicDevice over the same bytes: each front end (NBD, iSCSI) has
   *   its own AtomicDevice over its own counters (volume-stack.ts), and one lock table keeps them atomic.
   */
  constructor(
    next: BlockDevice,
    readonly locks = new RangeLock(),
  ) {
    super(next);
  }

  /** Reads take no lock here, so views from below are what read() would return. */
  readViews(offset: number, length: number): ReadViews | null {
    return this.next.readViews?.(offset, length) ?? null;
  }

  /**
   * The target below, committed under the same lock as write(): taken when commit() is called,
   * so overlapping writes still apply in the order they are committed or written.
   */
  writeTarget(offset: number, length: number, from: number): WriteTarget | null {
    const below = this.next.writeTarget?.(offset, length, from);
    if (!below) return null;
    return {
      pieces: below.pieces,
      commit: async (head: Payload, fua?: boolean): Promise<void> => {
        const release = await this.locks.acquire(offset, length);
        try {
          await below.commit(head, fua);
        } finally {
          release();
        }
      },
      abort: () => below.abort(),
    };
  }

  override async write(offset: number, data: Payload, fua?: boolean): Promise<void> {
    const release = await this.locks.acquire(offset, payloadLength(data));
    try {
      await this.next.write(offset, data, fua);
    } finally {
      release();
    }
  }

  override async trim(offset: number, length: number, fua?: boolean): Promise<void> {
    const release = await this.locks.acquire(offset, length);
    try {
      await this.next.trim(offset, length, fua);
    } finally {
      release();
    }
  }

  override async zero(offset: number, length: number, opts?: ZeroOptions): Promise<void> {
    const release = await this.locks.acquire(offset, length);
    try {
      await this.next.zero(offset, length, opts);
    } finally {
      release();
    }
  }

  /** Read a range, let `change` compute the new contents, and write them, all under one lock (ORWRITE). */
  async readModifyWrite(offset: number, length: number, change: (current: Buffer) => Buffer, fua?: boolean): Promise<void> {
    const release = await this.locks.acquire(offset, length);
    try {
      const cur = Buffer.allocUnsafe(length);
      await this.next.read(offset, cur);
      await this.next.write(offset, change(cur), fua);
    } finally {
      release();
    }
  }

  /** Read [offset, offset+expected.length); if it equals `expected`, write `data` there, all under one lock. */
  async compareAndWrite(offset: number, expected: Buffer, data: Buffer, fua?: boolean): Promise<void> {
    const release = await this.locks.acquire(offset, Math.max(expected.length, data.length));
    try {
      const cur = Buffer.allocUnsafe(expected.length);
      await this.next.read(offset, cur);
      if (!cur.equals(expected)) {
        let i = 0;
        while (cur[i] === expected[i]) i++;
        throw new MiscompareError(i);
      }
      await this.next.write(offset, data, fua);
    } finally {
      release();
    }
  }
}

/** The atomic layer of a device stack, if it has one. */
export function asAtomic(dev: BlockDevice): AtomicDevice | undefined {
  return dev instanceof AtomicDevice ? dev : undefined;
}

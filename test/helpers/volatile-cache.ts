// A disk with a volatile write cache, for power-loss tests of what the S-VOL group records
// (test/svol-restore.test.ts, test/svol-destage.test.ts).
import { FilterDevice } from '../../src/blockdev/filter.js';
import type { BlockDevice, Payload } from '../../src/blockdev/types.js';

/**
 * A disk with a volatile write cache: what it holds after a power loss is `durable`, its bytes
 * at the start plus every write that completed before a flush that then completed.
 */
export class VolatileCache extends FilterDevice {
  durable: Buffer;
  private unflushed: { at: number; data: Buffer }[] = [];
  constructor(
    next: BlockDevice,
    initial: Buffer,
    /** Called as each write or flush starts: a moment for a power loss. */
    private readonly onWrite: () => void,
  ) {
    super(next);
    this.durable = Buffer.from(initial);
  }
  override async write(offset: number, data: Payload): Promise<void> {
    this.onWrite();
    await this.next.write(offset, data);
    this.unflushed.push({ at: offset, data: Buffer.concat(Buffer.isBuffer(data) ? [data] : data) });
  }
  override async zero(offset: number, length: number): Promise<void> {
    this.onWrite();
    await this.next.zero(offset, length);
    this.unflushed.push({ at: offset, data: Buffer.alloc(length) });
  }
  override async trim(offset: number, length: number): Promise<void> {
    return this.zero(offset, length);
  }
  override async flush(): Promise<void> {
    this.onWrite();
    const covered = this.unflushed.splice(0);
    await this.next.flush();
    for (const w of covered) w.data.copy(this.durable, w.at);
  }
}


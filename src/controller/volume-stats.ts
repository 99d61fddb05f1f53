// Host I/O counters of one volume: a thin BlockDevice wrapper at the top of
// the stack, so they count what hosts asked for, not what mirroring did.
import { payloadLength, type BlockDevice, type Extent, type Payload, type ZeroOptions } from '../blockdev/types.js';

export interface IoCounters {
  readBytes: number;
  writeBytes: number;
  readOps: number;
  writeOps: number;
}

export class CountingDevice implements BlockDevice {
  readonly counters: IoCounters = { readBytes: 0, writeBytes: 0, readOps: 0, writeOps: 0 };

  constructor(private readonly inner: BlockDevice) {}

  get size(): number {
    return this.inner.size;
  }
  get readOnly(): boolean {
    return this.inner.readOnly;
  }
  get multiConnSafe(): boolean {
    return this.inner.multiConnSafe;
  }
  get fastZero(): boolean {
    return this.inner.fastZero;
  }

  async read(offset: number, dest: Buffer): Promise<void> {
    await this.inner.read(offset, dest);
    this.counters.readOps++;
    this.counters.readBytes += dest.length;
  }

  async write(offset: number, data: Payload, fua?: boolean): Promise<void> {
    await this.inner.write(offset, data, fua);
    this.counters.writeOps++;
    this.counters.writeBytes += payloadLength(data);
  }

  flush(): Promise<void> {
    return this.inner.flush();
  }
  trim(offset: number, length: number, fua?: boolean): Promise<void> {
    return this.inner.trim(offset, length, fua);
  }
  zero(offset: number, length: number, opts?: ZeroOptions): Promise<void> {
    return this.inner.zero(offset, length, opts);
  }
  extents(offset: number, length: number): Promise<Extent[]> {
    return this.inner.extents(offset, length);
  }
  cache(offset: number, length: number): Promise<void> {
    return this.inner.cache?.(offset, length) ?? Promise.resolve();
  }
  close(): Promise<void> {
    return this.inner.close();
  }
}

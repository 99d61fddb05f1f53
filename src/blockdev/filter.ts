// The pass-through base of every layer of a volume stack (nbdkit's filters in TypeScript):
// a FilterDevice forwards each call to `next`, so a layer overrides only what it changes.
//
//   class Slow extends FilterDevice {
//     override async read(offset: number, dest: Buffer) { await sleep(5); return super.read(offset, dest); }
//   }
//
// Capabilities (size, readOnly, multiConnSafe, fastZero) are read through from `next` each
// time, so a layer whose `next` changes behaviour (a role change) reports it at once.
import type { BlockDevice, Extent, Payload, ZeroOptions } from './types.js';

export class FilterDevice implements BlockDevice {
  constructor(private readonly below: BlockDevice) {}

  /** The layer below. A layer that switches what lies below it (a role change) overrides this getter. */
  protected get next(): BlockDevice {
    return this.below;
  }

  get size(): number {
    return this.next.size;
  }
  get readOnly(): boolean {
    return this.next.readOnly;
  }
  get multiConnSafe(): boolean {
    return this.next.multiConnSafe;
  }
  get fastZero(): boolean {
    return this.next.fastZero;
  }

  read(offset: number, dest: Buffer): Promise<void> {
    return this.next.read(offset, dest);
  }
  write(offset: number, data: Payload, fua?: boolean): Promise<void> {
    return this.next.write(offset, data, fua);
  }
  flush(): Promise<void> {
    return this.next.flush();
  }
  trim(offset: number, length: number, fua?: boolean): Promise<void> {
    return this.next.trim(offset, length, fua);
  }
  zero(offset: number, length: number, opts?: ZeroOptions): Promise<void> {
    return this.next.zero(offset, length, opts);
  }
  extents(offset: number, length: number): Promise<Extent[]> {
    return this.next.extents(offset, length);
  }
  cache(offset: number, length: number): Promise<void> {
    return this.next.cache?.(offset, length) ?? Promise.resolve();
  }
  /** A filter does not own `next` unless it says so: closing a layer closes nothing below. */
  async close(): Promise<void> {}
}

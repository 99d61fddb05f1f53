// A layer that refuses every request while a condition holds: what a storage system that
// can no longer prove it is the master (its etcd lease lapsed, or a newer epoch names another
// master) puts in front of its master volumes. The refusal is ESHUTDOWN, which a gateway reads
// as "go to the new master" and a directly attached host sees as an I/O error.
import { FilterDevice } from './filter.js';
import { BlockDeviceError, type BlockDevice, type Extent, type Payload, type WriteTarget, type ZeroOptions } from './types.js';

/** Returns why requests are refused now, or null to let them through. */
export type Guard = () => string | null;

export class GuardDevice extends FilterDevice {
  constructor(
    next: BlockDevice,
    private readonly guard: Guard,
  ) {
    super(next);
  }

  private check(): void {
    const why = this.guard();
    if (why !== null) throw new BlockDeviceError('ESHUTDOWN', why);
  }

  override async read(offset: number, dest: Buffer): Promise<void> {
    this.check();
    await this.next.read(offset, dest);
    // Data read across the moment the fence closed may already be older than the new master's.
    this.check();
  }
  override async write(offset: number, data: Payload, fua?: boolean): Promise<void> {
    this.check();
    await this.next.write(offset, data, fua);
    // A write acknowledged after the fence closed must not be acknowledged: check again.
    this.check();
  }
  /** The target below, committed with write()'s checks: refused before (the target given back) and after. */
  writeTarget(offset: number, length: number, from: number): WriteTarget | null {
    if (this.guard() !== null) return null; // write() refuses it
    const below = this.next.writeTarget?.(offset, length, from);
    if (!below) return null;
    return {
      pieces: below.pieces,
      commit: async (head: Payload, fua?: boolean): Promise<void> => {
        try {
          this.check();
        } catch (e) {
          below.abort();
          throw e;
        }
        await below.commit(head, fua);
        this.check();
      },
      abort: () => below.abort(),
    };
  }
  override async flush(): Promise<void> {
    this.check();
    await this.next.flush();
    this.check();
  }
  override async trim(offset: number, length: number, fua?: boolean): Promise<void> {
    this.check();
    await this.next.trim(offset, length, fua);
    this.check();
  }
  override async zero(offset: number, length: number, opts?: ZeroOptions): Promise<void> {
    this.check();
    await this.next.zero(offset, length, opts);
    this.check();
  }
  override async extents(offset: number, length: number): Promise<Extent[]> {
    this.check();
    return this.next.extents(offset, length);
  }
}

// The export a cluster file system client reads through (`vol<ID>@current`): the volume's host
// device, which refuses to describe or return data while the copy is not current (a split or
// suspended mirror, a remote mirror that cannot hear its master) instead of serving its
// point-in-time image. The client then reports the copy failed and the CFS server hands out
// another: a CFS read never returns stale bytes because a pair changed state under it.
import { FilterDevice } from '../blockdev/filter.js';
import { BlockDeviceError, type BlockDevice, type Extent } from '../blockdev/types.js';

export function currentExportName(vol: number): string {
  return `vol${vol}@current`;
}

export class CurrentCopyDevice extends FilterDevice {
  constructor(
    host: BlockDevice,
    /** Why this copy is not current now, or null. */
    private readonly staleReason: () => string | null,
  ) {
    super(host);
  }

  private check(): void {
    const why = this.staleReason();
    if (why !== null) throw new BlockDeviceError('EIO', `not a current copy: ${why}`);
  }

  override async read(offset: number, dest: Buffer): Promise<void> {
    this.check();
    await super.read(offset, dest);
    // A state change while the read was in flight: the bytes may predate it, so they are not given out.
    this.check();
  }

  override async extents(offset: number, length: number): Promise<Extent[]> {
    this.check();
    return super.extents(offset, length);
  }

  override async cache(offset: number, length: number): Promise<void> {
    this.check();
    return super.cache(offset, length);
  }
}

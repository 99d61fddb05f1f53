// The host-facing devices of an S-VOL group, layers of the volume stack (blockdev/filter.ts):
//
//   PvolVolume      the P-VOL: reads pass through; writes mirrored to paired members, tracked
//                   for split ones (SvolGroup.pvolWrite)
//   LogicalVolume   a member under its logical ID: every request asks the group's map which
//                   physical volume it is now, so a recovery remaps under a connected host
//                   without a reconnect
import { FilterDevice } from '../../blockdev/filter.js';
import { payloadLength, type BlockDevice, type Extent, type Payload, type ZeroOptions } from '../../blockdev/types.js';
import type { SvolGroup } from './group.js';

export class PvolVolume extends FilterDevice {
  constructor(
    pvol: BlockDevice,
    private readonly group: SvolGroup,
  ) {
    super(pvol);
  }

  override write(offset: number, data: Payload, fua = false): Promise<void> {
    return this.group.pvolWrite(offset, payloadLength(data), data, (d) => d.write(offset, data, fua));
  }

  override trim(offset: number, length: number, fua = false): Promise<void> {
    // What a trim leaves is the backend's business: the members' checksums of it are not known.
    return this.group.pvolWrite(offset, length, undefined, (d) => d.trim(offset, length, fua));
  }

  override zero(offset: number, length: number, opts: ZeroOptions = {}): Promise<void> {
    return this.group.pvolWrite(offset, length, null, (d) => d.zero(offset, length, opts));
  }

  /** A P-VOL write may have reached paired members too: flush them all. */
  override async flush(): Promise<void> {
    await super.flush();
    await this.group.flushPaired();
  }
}

export class LogicalVolume extends FilterDevice {
  constructor(
    private readonly group: SvolGroup,
    private readonly i: number,
    private readonly volumes: Map<number, { device: BlockDevice }>,
  ) {
    super(volumes.get(group.logical(i).vol)!.device);
  }

  /** The physical volume the map points at now. */
  protected override get next(): BlockDevice {
    return this.volumes.get(this.group.logical(this.i).vol)!.device;
  }

  override get size(): number {
    return this.group.size;
  }

  /** RO members, and every member while paired: NBD's READ_ONLY flag, iSCSI's write protect. */
  override get readOnly(): boolean {
    return this.group.isReadOnly(this.i);
  }

  override get fastZero(): boolean {
    return false;
  }

  override read(offset: number, dest: Buffer): Promise<void> {
    return this.group.logicalRead(this.i, offset, dest);
  }

  override write(offset: number, data: Payload): Promise<void> {
    // The pieces as they came: a gathering copy into a fresh 1 MiB buffer costs more than the write.
    return this.group.logicalWrite(this.i, offset, data);
  }

  /** Trim and zero are zero writes: the increments log them like any other change. */
  override trim(offset: number, length: number): Promise<void> {
    return this.zero(offset, length);
  }

  override async zero(offset: number, length: number): Promise<void> {
    const piece = Buffer.alloc(Math.min(length, 1024 * 1024));
    for (let at = offset; at < offset + length; at += piece.length) await this.group.logicalWrite(this.i, at, piece.subarray(0, Math.min(piece.length, offset + length - at)));
  }

  override flush(): Promise<void> {
    return this.group.logicalFlush(this.i);
  }

  /** Every byte reported as data: a member's own allocation may not be what the map serves. */
  override async extents(_offset: number, length: number): Promise<Extent[]> {
    return [{ length, flags: 0 }];
  }

  override cache(): Promise<void> {
    return Promise.resolve();
  }
}

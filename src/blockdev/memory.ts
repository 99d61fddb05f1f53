// Sparse in-memory block device. Data lives in 4 KiB pages that exist only
// once something was written into them, so untouched regions cost nothing,
// read as zeroes and report as holes.
//
// Pages are slots in 1 MiB slabs, and the page table maps a page index to a
// slot number: no JS object per page. That keeps the garbage collector's
// work independent of how much is stored, and first-touch writes cheap.
// Pages written in order get consecutive slots, so sequential I/O copies
// whole runs of pages at once.
//
//   slot = slab * PAGES_PER_SLAB + index in slab      (freed slots are reused)
//
// 4 KiB pages keep memory proportional to what was written even for random
// 4k writes across a large export.
import { BlockDeviceError, type BlockDevice, type Extent, type Payload, type ZeroOptions } from './types.js';
import { State } from '../protocol/constants.js';

const PAGE_SHIFT = 12;
const PAGE = 1 << PAGE_SHIFT;
const SLAB_SHIFT = 8; // 256 pages = 1 MiB per slab
const PAGES_PER_SLAB = 1 << SLAB_SHIFT;
const MAX_EXTENTS = 1 << 16;
const HOLE = State.HOLE | State.ZERO;

export class MemoryDevice implements BlockDevice {
  readonly multiConnSafe = true; // one store shared by every connection, no cache
  readonly fastZero = true;
  private readonly table = new Map<number, number>();
  private readonly slabs: Buffer[] = [];
  private readonly freeSlots: number[] = [];
  private nextSlot = 0;

  constructor(
    readonly size: number,
    readonly readOnly = false,
  ) {}

  /** Bytes of page storage in use (for tests and stats). */
  get allocatedBytes(): number {
    return this.table.size * PAGE;
  }

  async read(offset: number, dest: Buffer): Promise<void> {
    this.readSync(offset, dest);
  }

  /** Synchronous read: the memory device never waits. */
  readSync(offset: number, dest: Buffer): void {
    let done = 0;
    const n = dest.length;
    while (done < n) {
      const pos = offset + done;
      const pi = Math.floor(pos / PAGE);
      const inPage = pos - pi * PAGE;
      const slot = this.table.get(pi);
      if (slot === undefined) {
        // A run of missing pages reads as zeroes in one fill.
        let end = (pi + 1) * PAGE;
        while (end < offset + n && !this.table.has(end / PAGE)) end += PAGE;
        const k = Math.min(end - pos, n - done);
        dest.fill(0, done, done + k);
        done += k;
        continue;
      }
      const k = Math.min(this.runBytes(pi, slot, offset + n) - inPage, n - done);
      const slab = this.slabs[slot >>> SLAB_SHIFT]!;
      const at = ((slot & (PAGES_PER_SLAB - 1)) << PAGE_SHIFT) + inPage;
      slab.copy(dest, done, at, at + k);
      done += k;
    }
  }

  /** Bytes from the start of page pi that sit contiguously in one slab (up to byte `limit` of the device). */
  private runBytes(pi: number, slot: number, limit: number): number {
    let len = PAGE;
    let p = pi + 1;
    let s = slot + 1;
    while (p * PAGE < limit && (s & (PAGES_PER_SLAB - 1)) !== 0 && this.table.get(p) === s) {
      len += PAGE;
      p++;
      s++;
    }
    return len;
  }

  async write(offset: number, data: Payload): Promise<void> {
    this.writeSync(offset, data);
  }

  writeSync(offset: number, data: Payload): void {
    if (this.readOnly) throw new BlockDeviceError('EPERM', 'write: read-only device');
    if (Buffer.isBuffer(data)) {
      this.writePiece(offset, data);
      return;
    }
    let at = offset;
    for (const piece of data) {
      this.writePiece(at, piece);
      at += piece.length;
    }
  }

  private writePiece(offset: number, data: Buffer): void {
    let done = 0;
    const n = data.length;
    while (done < n) {
      const pos = offset + done;
      const pi = Math.floor(pos / PAGE);
      const inPage = pos - pi * PAGE;
      let slot = this.table.get(pi);
      // A whole-page write needs no zero fill; a partial one into a new page does.
      if (slot === undefined) slot = this.allocate(pi, inPage !== 0 || n - done < PAGE);
      const k = Math.min(this.runBytes(pi, slot, offset + n) - inPage, n - done);
      const slab = this.slabs[slot >>> SLAB_SHIFT]!;
      data.copy(slab, ((slot & (PAGES_PER_SLAB - 1)) << PAGE_SHIFT) + inPage, done, done + k);
      done += k;
    }
  }

  private allocate(pi: number, zeroFill: boolean): number {
    let slot = this.freeSlots.pop();
    if (slot === undefined) {
      slot = this.nextSlot++;
      if ((slot & (PAGES_PER_SLAB - 1)) === 0) this.slabs.push(Buffer.allocUnsafeSlow(PAGES_PER_SLAB * PAGE));
    }
    if (zeroFill) this.slotBytes(slot).fill(0);
    this.table.set(pi, slot);
    return slot;
  }

  private slotBytes(slot: number): Buffer {
    const at = (slot & (PAGES_PER_SLAB - 1)) << PAGE_SHIFT;
    return this.slabs[slot >>> SLAB_SHIFT]!.subarray(at, at + PAGE);
  }

  async flush(): Promise<void> {}

  async trim(offset: number, length: number): Promise<void> {
    this.zeroSync(offset, length, false);
  }

  async zero(offset: number, length: number, opts: ZeroOptions = {}): Promise<void> {
    this.zeroSync(offset, length, opts.noHole === true);
  }

  private zeroSync(offset: number, length: number, keepAllocated: boolean): void {
    if (this.readOnly) throw new BlockDeviceError('EPERM', 'zero: read-only device');
    const end = offset + length;
    let pos = offset;
    while (pos < end) {
      const pi = Math.floor(pos / PAGE);
      const inPage = pos - pi * PAGE;
      const k = Math.min(PAGE - inPage, end - pos);
      const slot = this.table.get(pi);
      if (slot !== undefined && k === PAGE && !keepAllocated) {
        this.table.delete(pi);
        this.freeSlots.push(slot);
      } else if (slot !== undefined) this.slotBytes(slot).fill(0, inPage, inPage + k);
      else if (keepAllocated) this.allocate(pi, true);
      pos += k;
    }
  }

  async extents(offset: number, length: number): Promise<Extent[]> {
    const out: Extent[] = [];
    const end = offset + length;
    let pos = offset;
    while (pos < end && out.length < MAX_EXTENTS) {
      const pi = Math.floor(pos / PAGE);
      const k = Math.min((pi + 1) * PAGE, end) - pos;
      const flags = this.table.has(pi) ? 0 : HOLE;
      const last = out[out.length - 1];
      if (last && last.flags === flags) last.length += k;
      else out.push({ length: k, flags });
      pos += k;
    }
    return out;
  }

  async close(): Promise<void> {
    this.table.clear();
    this.slabs.length = 0;
    this.freeSlots.length = 0;
  }
}

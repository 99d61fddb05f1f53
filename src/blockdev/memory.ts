// Sparse in-memory block device. Storage is a map of 4 KiB pages: a page
// exists only once something non-trimmed was written into it, so untouched
// regions cost nothing, read as zeroes and report as holes.
//
// 4 KiB pages keep memory proportional to what was written even for random
// 4k writes across a large export (64 KiB pages would cost 16x for those).
import { BlockDeviceError, type BlockDevice, type Extent, type ZeroOptions } from './types.js';
import { State } from '../protocol/constants.js';

const PAGE_SHIFT = 12;
const PAGE = 1 << PAGE_SHIFT;
const MAX_EXTENTS = 1 << 16;
const HOLE = State.HOLE | State.ZERO;

export class MemoryDevice implements BlockDevice {
  readonly multiConnSafe = true; // one store shared by every connection, no cache
  readonly fastZero = true;
  private readonly pages = new Map<number, Buffer>();

  constructor(
    readonly size: number,
    readonly readOnly = false,
  ) {}

  /** Bytes of page storage in use (for tests and stats). */
  get allocatedBytes(): number {
    return this.pages.size * PAGE;
  }

  async read(offset: number, dest: Buffer): Promise<void> {
    this.readSync(offset, dest);
  }

  /** Synchronous read: the memory device never waits, and the server's hot path may use this directly. */
  readSync(offset: number, dest: Buffer): void {
    let done = 0;
    const n = dest.length;
    while (done < n) {
      const pos = offset + done;
      const pi = Math.floor(pos / PAGE);
      const inPage = pos - pi * PAGE;
      const k = Math.min(PAGE - inPage, n - done);
      const page = this.pages.get(pi);
      if (page) page.copy(dest, done, inPage, inPage + k);
      else dest.fill(0, done, done + k);
      done += k;
    }
  }

  async write(offset: number, data: Buffer | readonly Buffer[]): Promise<void> {
    this.writeSync(offset, data);
  }

  writeSync(offset: number, data: Buffer | readonly Buffer[]): void {
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
      const k = Math.min(PAGE - inPage, n - done);
      let page = this.pages.get(pi);
      if (!page) {
        // A whole-page write needs no zero fill; a partial one does.
        page = k === PAGE ? Buffer.allocUnsafeSlow(PAGE) : Buffer.alloc(PAGE);
        this.pages.set(pi, page);
      }
      data.copy(page, inPage, done, done + k);
      done += k;
    }
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
      const page = this.pages.get(pi);
      if (k === PAGE && !keepAllocated) this.pages.delete(pi);
      else if (page) page.fill(0, inPage, inPage + k);
      else if (keepAllocated) this.pages.set(pi, Buffer.alloc(PAGE));
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
      const flags = this.pages.has(pi) ? 0 : HOLE;
      const last = out[out.length - 1];
      if (last && last.flags === flags) last.length += k;
      else out.push({ length: k, flags });
      pos += k;
    }
    return out;
  }

  async close(): Promise<void> {
    this.pages.clear();
  }
}

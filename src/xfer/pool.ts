// Segment buffers, reused. A fresh 1 MiB buffer per segment cost more than the transfer itself:
// the kernel zero-fills its pages on first touch and the garbage collector frees them again
// (profile of a 128 MiB send: a third of its CPU). The sender fills a buffer from the input,
// writes it and gives it back once the write completed; the receiver reads a segment into one and
// gives it back once the piece was delivered. Aligned buffers (O_DIRECT paths) come from
// blockdev/native's alignedBuffer; segments of 2 MiB and more from its hugeBuffer (2 MiB pages,
// aligned for O_DIRECT as well), and `warm` touches them while the side waits anyway (the
// claim's settle, the wait for a sender), so that their page faults are not paid when the first
// piece is read.
import { HUGE_PAGE, alignedBuffer, hugeBuffer } from '../blockdev/native.js';
import { BLOCK } from './layout.js';

export class BufferPool {
  private readonly free: Buffer[] = [];

  constructor(
    /** Bytes per buffer: a whole segment. */
    readonly size: number,
    /** Memory aligned to a block, for paths opened with O_DIRECT. */
    private readonly aligned = false,
    /** Buffers kept for reuse; more may be out at once, the rest are left to the garbage collector. */
    private readonly keep = 64,
  ) {}

  take(): Buffer {
    return this.free.pop() ?? this.make();
  }

  private make(): Buffer {
    if (this.size >= HUGE_PAGE) return hugeBuffer(this.size);
    return this.aligned ? alignedBuffer(this.size, BLOCK) : Buffer.allocUnsafeSlow(this.size);
  }

  /** Have `n` buffers ready for reuse (at most `keep`), their pages touched. */
  warm(n: number): void {
    for (let i = this.free.length; i < Math.min(n, this.keep); i++) this.free.push(this.make().fill(0));
  }

  /** Buffers ready for reuse (tests). */
  get ready(): number {
    return this.free.length;
  }

  /** Only buffers of this pool, whole, and no longer used by anyone. */
  give(buf: Buffer): void {
    if (buf.length === this.size && this.free.length < this.keep) this.free.push(buf);
  }
}

// Segment buffers, reused. A fresh 1 MiB buffer per segment cost more than the transfer itself:
// the kernel zero-fills its pages on first touch and the garbage collector frees them again
// (profile of a 128 MiB send: a third of its CPU). The sender fills a buffer from the input,
// writes it and gives it back once the write completed; the receiver reads a segment into one and
// gives it back once the piece was delivered. Aligned buffers (O_DIRECT paths) come from
// blockdev/native's alignedBuffer.
import { alignedBuffer } from '../blockdev/native.js';
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
    return this.free.pop() ?? (this.aligned ? alignedBuffer(this.size, BLOCK) : Buffer.allocUnsafeSlow(this.size));
  }

  /** Only buffers of this pool, whole, and no longer used by anyone. */
  give(buf: Buffer): void {
    if (buf.length === this.size && this.free.length < this.keep) this.free.push(buf);
  }
}

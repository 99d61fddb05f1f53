// I/O buffers (READ replies, sync-daemon copies), reused once the socket has handed them to the
// kernel. A fresh 1 MiB ArrayBuffer per read costs an mmap, page faults and
// external-memory pressure on the garbage collector; a recycled one costs a
// pop() from a free list.
//
// Buffers come in power-of-two classes from 4 KiB to 64 MiB; smaller
// requests use Node's own pooled allocUnsafe. The pool keeps at most
// `maxPooled` bytes of idle buffers.

const MIN_SHIFT = 12;
const MAX_SHIFT = 26;

export class BufferPool {
  private readonly free: Buffer[][] = Array.from({ length: MAX_SHIFT + 1 }, () => []);
  private pooled = 0;

  constructor(private readonly maxPooled = 64 * 1024 * 1024) {}

  /** A buffer of exactly n bytes (its contents are garbage). */
  get(n: number): Buffer {
    const c = classOf(n);
    if (c < 0) return Buffer.allocUnsafe(n);
    const list = this.free[c]!;
    const whole = list.pop();
    if (whole) {
      this.pooled -= whole.length;
      return whole.subarray(0, n);
    }
    return Buffer.allocUnsafeSlow(1 << c).subarray(0, n);
  }

  /** Give back a buffer from get() once nothing reads it any more. */
  put(b: Buffer): void {
    const c = classOf(b.length);
    if (c < 0 || b.byteOffset !== 0 || b.buffer.byteLength !== 1 << c) return;
    if (this.pooled + b.buffer.byteLength > this.maxPooled) return;
    this.pooled += b.buffer.byteLength;
    this.free[c]!.push(Buffer.from(b.buffer, 0, b.buffer.byteLength));
  }
}

function classOf(n: number): number {
  if (n <= 1 << (MIN_SHIFT - 1)) return -1;
  const c = Math.max(MIN_SHIFT, 32 - Math.clz32(n - 1));
  return c > MAX_SHIFT ? -1 : c;
}

/** One pool per process: NBD replies and sync-daemon copies share it. */
export const ioBuffers = new BufferPool();

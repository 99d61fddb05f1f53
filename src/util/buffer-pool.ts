// I/O buffers (READ replies, sync-daemon copies), reused once the socket has handed them to the
// kernel. A fresh 1 MiB ArrayBuffer per read costs an mmap, page faults and
// external-memory pressure on the garbage collector; a recycled one costs a
// pop() from a free list.
//
// Buffers come in power-of-two classes from 4 KiB to 64 MiB; smaller
// requests use Node's own pooled allocUnsafe. The pool keeps at most
// `maxPooled` bytes of idle buffers; when full, a returned buffer evicts idle
// ones of the classes least recently returned to.

const MIN_SHIFT = 12;
const MAX_SHIFT = 26;

export class BufferPool {
  /** Idle buffers per class, oldest first. */
  private readonly free: Buffer[][] = Array.from({ length: MAX_SHIFT + 1 }, () => []);
  /** When each class last had a buffer returned (a put() counter), to evict the stalest class first. */
  private readonly lastPut: number[] = new Array<number>(MAX_SHIFT + 1).fill(0);
  private puts = 0;
  private pooled = 0;

  constructor(private readonly maxPooled = 64 * 1024 * 1024) {}

  /** Bytes of idle buffers held. */
  get idleBytes(): number {
    return this.pooled;
  }

  /** A buffer of exactly n bytes (its contents are garbage). */
  get(n: number): Buffer {
    const c = classOf(n);
    if (c < 0) return Buffer.allocUnsafe(n);
    const whole = this.free[c]!.pop();
    if (whole) {
      this.pooled -= whole.length;
      return whole.subarray(0, n);
    }
    return Buffer.allocUnsafeSlow(1 << c).subarray(0, n);
  }

  /**
   * Give back a buffer from get() once nothing reads it any more. When the pool is full, idle
   * buffers of the classes returned to least recently make room: the pool follows the workload
   * (nbdcopy's 256 KiB reads, then the CFS's 4 MiB ones) instead of keeping the first one's, whose
   * successor would otherwise get fresh buffers, and page faults, all along.
   */
  put(b: Buffer): void {
    const c = classOf(b.length);
    const bytes = b.buffer.byteLength;
    if (c < 0 || b.byteOffset !== 0 || bytes !== 1 << c || bytes > this.maxPooled) return;
    this.lastPut[c] = ++this.puts;
    while (this.pooled + bytes > this.maxPooled) {
      let stalest = -1;
      for (let k = MIN_SHIFT; k <= MAX_SHIFT; k++) {
        if (k !== c && this.free[k]!.length > 0 && (stalest < 0 || this.lastPut[k]! < this.lastPut[stalest]!)) stalest = k;
      }
      if (stalest < 0) return; // full of idle buffers of this very class: enough of them
      this.pooled -= this.free[stalest]!.shift()!.length;
    }
    this.pooled += bytes;
    this.free[c]!.push(Buffer.from(b.buffer, 0, bytes));
  }
}

function classOf(n: number): number {
  if (n <= 1 << (MIN_SHIFT - 1)) return -1;
  const c = Math.max(MIN_SHIFT, 32 - Math.clz32(n - 1));
  return c > MAX_SHIFT ? -1 : c;
}

/** One pool per process: NBD replies and sync-daemon copies share it. */
export const ioBuffers = new BufferPool();

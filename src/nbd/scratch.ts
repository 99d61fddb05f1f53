// The scratch buffers a connection's socket reads land in (transmission.ts), recycled.
//
// A read of more than COPY_MAX bytes is handed to the request parser as it is: the WRITEs in it
// keep views into it as their payloads until the device has them. A fresh buffer for every such
// read (one per large WRITE) costs far more than its bytes: 128 KiB from malloc is an mmap, its
// first touch 32 page faults, its free a munmap. Measured in a loop, a fresh 128 KiB buffer
// filled once took 50-90 µs of CPU against 1.5 µs to fill a reused one; at 1 MiB WRITEs that
// is thousands of buffers a second. So a lent buffer comes back once
//
//   1. the parser has taken all its bytes (its queued mark passed) and holds no piece of it in
//      a WRITE whose payload is still arriving, and
//   2. every request that took pieces of it (hold) has finished with them (release).
//
// A request that never releases (say, refused before it reached the device) only keeps its
// buffer from coming back: it is garbage collected as before.

/** What the parser tells about the bytes given to it. */
export interface ParserMarks {
  /** Bytes queued so far, in total; a lent buffer's mark is this right after it was pushed. */
  readonly queued: number;
  /** Of those, the bytes the parser has taken. */
  readonly consumed: number;
  /** Does a WRITE still arriving hold pieces of this memory? */
  holds(memory: ArrayBufferLike): boolean;
}

interface Lent {
  buf: Buffer;
  /** Pieces of it in requests that have not finished. */
  refs: number;
  /** The parser's queued mark after it. */
  end: number;
}

export class ScratchBuffers {
  /** In the order they were lent, which is the order of their marks. */
  private readonly lent = new Map<ArrayBufferLike, Lent>();
  private readonly spare: Buffer[] = [];
  /** Where the next read lands. */
  current: Buffer;

  constructor(
    private readonly size: number,
    private readonly parser: ParserMarks,
    /** Free buffers kept for reuse; more are left to the garbage collector. */
    private readonly keep = 8,
  ) {
    this.current = Buffer.allocUnsafeSlow(size);
  }

  /** The current buffer was pushed to the parser whole: lend it, and read into another. */
  lend(): void {
    this.lent.set(this.current.buffer, { buf: this.current, refs: 0, end: this.parser.queued });
    this.current = this.spare.pop() ?? Buffer.allocUnsafeSlow(this.size);
  }

  /** A request goes on using these pieces (a WRITE's payload) after the parser gave them out. */
  hold(pieces: readonly Buffer[]): void {
    for (const p of pieces) {
      const l = this.lent.get(p.buffer);
      if (l) l.refs++;
    }
  }

  /** The request that held these pieces is done with them. */
  release(pieces: readonly Buffer[]): void {
    for (const p of pieces) {
      const l = this.lent.get(p.buffer);
      if (l && --l.refs === 0) this.reclaim(l);
    }
  }

  /** After parsing: the buffers whose bytes the parser has all taken may be free now. */
  sweep(): void {
    const consumed = this.parser.consumed;
    for (const l of this.lent.values()) {
      if (l.end > consumed) break;
      if (l.refs === 0) this.reclaim(l);
    }
  }

  /** Lent buffers not yet back (tests). */
  get outstanding(): number {
    return this.lent.size;
  }

  /** Free buffers ready for reuse (tests). */
  get free(): number {
    return this.spare.length;
  }

  private reclaim(l: Lent): void {
    if (l.refs > 0 || l.end > this.parser.consumed || this.parser.holds(l.buf.buffer)) return;
    this.lent.delete(l.buf.buffer);
    if (this.spare.length < this.keep) this.spare.push(l.buf);
  }
}

// Byte-range locks for the write path: a holder excludes every other holder whose range overlaps.
// Waiters are served in arrival order per overlap, so a stream of small writes cannot starve a
// COMPARE AND WRITE. Ranges are half-open [start, end).

interface Held {
  start: number;
  end: number;
  done: Promise<void>;
}

export class RangeLock {
  private held: Held[] = [];

  /** Wait until [offset, offset+length) overlaps no holder, take it, and return the release function. */
  async acquire(offset: number, length: number): Promise<() => void> {
    const start = offset;
    const end = offset + Math.max(length, 1);
    // Claim our place first, then wait for those who came before us: FIFO among overlapping ranges.
    const before = this.held.filter((h) => h.start < end && start < h.end).map((h) => h.done);
    let release!: () => void;
    const me: Held = { start, end, done: new Promise<void>((r) => (release = r)) };
    this.held.push(me);
    if (before.length) await Promise.all(before);
    return () => {
      this.held = this.held.filter((h) => h !== me);
      release();
    };
  }

  /** Ranges held or waited for (tests, stats). */
  get size(): number {
    return this.held.length;
  }
}

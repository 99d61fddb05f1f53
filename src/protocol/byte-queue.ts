// A queue of received chunks. Frames inside one chunk are handed on as
// views; only a frame that straddles chunks is joined, once, at its exact
// length. Payloads can also be taken as a list of views (no copy at all),
// which is how WRITE data reaches the block device.

export class ByteQueue {
  private chunks: Buffer[] = [];
  private head = 0; // read position inside chunks[0]
  private total = 0;

  get length(): number {
    return this.total;
  }

  push(chunk: Buffer): void {
    if (chunk.length === 0) return;
    this.chunks.push(chunk);
    this.total += chunk.length;
  }

  /** The big-endian u32 at the front (length >= 4), without taking it. */
  peekUInt32BE(): number {
    const first = this.chunks[0]!;
    if (first.length - this.head >= 4) return first.readUInt32BE(this.head);
    let v = 0;
    let ci = 0;
    let at = this.head;
    for (let k = 0; k < 4; k++) {
      while (at >= this.chunks[ci]!.length) {
        ci++;
        at = 0;
      }
      v = v * 256 + this.chunks[ci]![at++]!;
    }
    return v;
  }

  /** Take n bytes (n <= length) as one Buffer: a view when possible, else one exact copy. */
  take(n: number): Buffer {
    if (n === 0) return Buffer.alloc(0);
    const first = this.chunks[0]!;
    const avail = first.length - this.head;
    if (n <= avail) {
      const out = first.subarray(this.head, this.head + n);
      this.advance(n);
      return out;
    }
    const out = Buffer.allocUnsafe(n);
    let filled = 0;
    while (filled < n) {
      const c = this.chunks[0]!;
      const k = Math.min(c.length - this.head, n - filled);
      c.copy(out, filled, this.head, this.head + k);
      filled += k;
      this.advance(k);
    }
    return out;
  }

  /** Take n bytes as a list of views into the received chunks: zero copies. */
  takeVec(n: number): Buffer[] {
    const out: Buffer[] = [];
    let left = n;
    while (left > 0) {
      const c = this.chunks[0]!;
      const k = Math.min(c.length - this.head, left);
      out.push(c.subarray(this.head, this.head + k));
      left -= k;
      this.advance(k);
    }
    return out;
  }

  /** Move up to into.length - at bytes into `into` at `at`; returns how many were moved. */
  copyOut(into: Buffer, at: number): number {
    let moved = 0;
    while (this.total > 0 && at < into.length) {
      const c = this.chunks[0]!;
      const k = c.copy(into, at, this.head, Math.min(c.length, this.head + into.length - at));
      at += k;
      moved += k;
      this.advance(k);
    }
    return moved;
  }

  /** Drop up to n bytes; returns how many were dropped. */
  skip(n: number): number {
    let left = Math.min(n, this.total);
    const dropped = left;
    while (left > 0) {
      const c = this.chunks[0]!;
      const k = Math.min(c.length - this.head, left);
      left -= k;
      this.advance(k);
    }
    return dropped;
  }

  private advance(k: number): void {
    this.head += k;
    this.total -= k;
    if (this.head === this.chunks[0]!.length) {
      this.chunks.shift();
      this.head = 0;
    }
  }
}

// Transmission-phase request framing (server side), pure: bytes in, events out.
//
// Compact request, 28 bytes, big-endian:
//   0  u32 magic 0x25609513
//   4  u16 command flags
//   6  u16 type
//   8  u64 cookie (opaque, echoed verbatim)
//  16  u64 offset
//  24  u32 length
//  28  payload (WRITE only), `length` bytes
//
// A WRITE whose length exceeds the payload limit is not buffered: its payload
// is drained as it arrives and the request is delivered with `oversize` set,
// so the server can refuse it while the stream stays in sync.

import { ByteQueue } from './byte-queue.js';
import { Cmd, REQUEST_MAGIC, REQUEST_SIZE } from './constants.js';

export interface Request {
  flags: number;
  type: number;
  /** The cookie's 8 bytes, copied out of the receive buffer. */
  cookie: Buffer;
  /** Offset as a JS number; Infinity when it does not fit in 2^53 (always out of range). */
  offset: number;
  length: number;
  /** WRITE payload as views into the received chunks (no copy). */
  payload?: Buffer[];
  /** A WRITE over the payload limit: its bytes were discarded. */
  oversize?: boolean;
  /**
   * The last pieces of `payload` were filled in place, in the buffers the parser's allocator gave
   * for this request (a pooled buffer, or the device's own memory): its owner takes them back.
   */
  landed?: readonly Buffer[];
}

/**
 * Buffers for the `n` missing bytes of a large WRITE's payload, to be filled in order (their
 * lengths add up to n): where the caller reads those bytes in place.
 */
export type LandingAlloc = (req: Request, n: number) => readonly Buffer[];

export type ParseEvent =
  | { kind: 'request'; request: Request }
  | { kind: 'bad-magic'; magic: number };

const TWO32 = 2 ** 32;

/** A WRITE missing at least this much is filled in place (see directTarget). */
export const DIRECT_MIN = 64 * 1024;

export class RequestParser {
  private readonly q = new ByteQueue();
  private pending: Request | null = null; // header seen, payload outstanding
  private draining = 0; // oversize payload bytes still to discard
  private broken = false;
  /**
   * A large pending WRITE: the payload bytes that had arrived (views into the received chunks,
   * never copied) and the buffers the rest is read into in place: the one being filled, and how
   * much of it is.
   */
  private head: Buffer[] = [];
  private direct: readonly Buffer[] | null = null;
  private piece = 0;
  private filled = 0;
  /** Bytes queued by push() so far (see consumed, and src/nbd/scratch.ts). */
  queued = 0;

  /**
   * @param maxPayload larger WRITEs are drained, not buffered
   * @param inPlace offer directTarget() for large payloads (the caller reads into it)
   */
  constructor(
    private readonly maxPayload: number,
    private readonly inPlace = false,
    private readonly alloc: LandingAlloc = (_req, n) => [Buffer.allocUnsafe(n)],
  ) {}

  /**
   * The unfilled tail of a large pending WRITE payload, or null: the caller
   * may read received bytes straight into it and report them with
   * directFilled(), so they are never copied in user space.
   */
  directTarget(): Buffer | null {
    const d = this.direct;
    return d && this.piece < d.length ? d[this.piece]!.subarray(this.filled) : null;
  }

  /** Between two requests: nothing of the next one has arrived yet. */
  atBoundary(): boolean {
    return this.pending === null && this.q.length === 0;
  }

  /** n bytes were read into directTarget(). */
  directFilled(n: number): void {
    this.filled += n;
    this.settle();
  }

  /** Past the pieces that are full. */
  private settle(): void {
    const d = this.direct!;
    while (this.piece < d.length && this.filled === d[this.piece]!.length) {
      this.piece++;
      this.filled = 0;
    }
  }

  /** Queue received bytes (the parser keeps references: the caller must not reuse the chunk); take framed requests with next(). */
  push(chunk: Buffer): void {
    if (this.broken) return;
    const d = this.direct;
    // Bytes of a payload being filled in place go there first.
    while (d && this.piece < d.length && chunk.length > 0) {
      const k = chunk.copy(d[this.piece]!, this.filled);
      this.filled += k;
      chunk = chunk.subarray(k);
      this.settle();
    }
    this.queued += chunk.length;
    this.q.push(chunk);
  }

  /** Of the bytes queued, how many have been taken out of the queue (as requests or their payloads). */
  get consumed(): number {
    return this.queued - this.q.length;
  }

  /** Does the WRITE whose payload is still arriving hold pieces of this memory? */
  holds(memory: ArrayBufferLike): boolean {
    for (const b of this.head) if (b.buffer === memory) return true;
    return false;
  }

  /**
   * The next complete request, or null until more bytes arrive. Taking one at
   * a time lets the caller stop between requests when it has too much in
   * flight; what is not yet taken stays queued, unparsed.
   */
  next(): ParseEvent | null {
    if (this.broken) return null;
    for (;;) {
      if (this.draining > 0) {
        this.draining -= this.q.skip(this.draining);
        if (this.draining > 0) return null;
        const req = this.pending!;
        this.pending = null;
        return { kind: 'request', request: req };
      }
      if (this.pending && this.direct) {
        if (this.piece < this.direct.length) return null;
        const req = this.pending;
        for (const b of this.direct) this.head.push(b);
        req.payload = this.head;
        req.landed = this.direct;
        this.pending = null;
        this.direct = null;
        this.head = [];
        return { kind: 'request', request: req };
      }
      if (this.pending) {
        if (this.q.length < this.pending.length) {
          if (this.inPlace && this.pending.length - this.q.length >= DIRECT_MIN) {
            // What has arrived stays where it is, as the payload's first pieces; only the rest
            // gets a buffer, which the caller reads into directly (no byte is copied).
            this.head = this.q.takeVec(this.q.length);
            this.direct = this.alloc(this.pending, this.pending.length - this.head.reduce((n, b) => n + b.length, 0));
            this.piece = 0;
            this.filled = 0;
            this.settle(); // an allocator may give empty pieces
          }
          return null;
        }
        const req = this.pending;
        this.pending = null;
        req.payload = this.q.takeVec(req.length);
        return { kind: 'request', request: req };
      }
      if (this.q.length < REQUEST_SIZE) return null;
      const h = this.q.take(REQUEST_SIZE);
      const magic = h.readUInt32BE(0);
      if (magic !== REQUEST_MAGIC) {
        this.broken = true;
        return { kind: 'bad-magic', magic };
      }
      const hi = h.readUInt32BE(16);
      const req: Request = {
        flags: h.readUInt16BE(4),
        type: h.readUInt16BE(6),
        cookie: Buffer.from(h.subarray(8, 16)),
        offset: hi < 0x200000 ? hi * TWO32 + h.readUInt32BE(20) : Infinity,
        length: h.readUInt32BE(24),
      };
      if (req.type === Cmd.WRITE && req.length > 0) {
        this.pending = req;
        if (req.length > this.maxPayload) {
          req.oversize = true;
          this.draining = req.length;
        }
        continue;
      }
      return { kind: 'request', request: req };
    }
  }
}

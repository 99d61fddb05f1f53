// Frames of the control channel: a 4-byte big-endian length, then that many bytes of JSON.
// Received chunks go into a ByteQueue: a frame inside one chunk is parsed from a view, and only a
// frame that straddles chunks is joined, once, at its exact length — never a concatenation of the
// whole receive buffer per chunk.
import { ByteQueue } from '../../protocol/byte-queue.js';
import { BadFrame } from './messages.js';

/** Largest frame: a bitmap snapshot of a 4 TiB volume in 64 KiB clusters, base64, fits with room. */
export const MAX_FRAME = 64 * 1024 * 1024;

export function encodeFrame(msg: object): Buffer {
  const body = Buffer.from(JSON.stringify(msg), 'utf8');
  const frame = Buffer.allocUnsafe(4 + body.length);
  frame.writeUInt32BE(body.length, 0);
  body.copy(frame, 4);
  return frame;
}

export class FrameReader {
  private readonly queue = new ByteQueue();

  /** The largest frame taken; the peer server lowers it until a hello has been read. */
  constructor(public maxFrame = MAX_FRAME) {}

  /** Bytes received and not yet taken as frames. */
  get buffered(): number {
    return this.queue.length;
  }

  /**
   * Add a chunk; returns the JSON text of every frame now complete, in order. Throws BadFrame
   * for a frame announced larger than the limit (before any of it is buffered).
   */
  push(chunk: Buffer): string[] {
    this.queue.push(chunk);
    const out: string[] = [];
    while (this.queue.length >= 4) {
      const len = this.queue.peekUInt32BE();
      if (len > this.maxFrame) throw new BadFrame(`an oversized frame (${len} bytes, the limit is ${this.maxFrame})`);
      if (this.queue.length < 4 + len) break;
      this.queue.skip(4);
      out.push(this.queue.take(len).toString('utf8'));
    }
    return out;
  }
}

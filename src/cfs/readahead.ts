// Sequential read-ahead for the FUSE mount. The kernel asks for at most 128 KiB per read; one NBD
// round trip per request would cap a stream at a fraction of what the storage system can send. Once
// reads run sequentially, this keeps DEPTH chunks of CHUNK bytes in flight ahead of the reader and
// answers the kernel's requests from them.
//
// The kernel sends its read-ahead requests several at a time, and they arrive out of order, so
// "sequential" means within SLACK of the end of the previous read, not exactly at it. Any other read
// (fio's random verify reads, a seek) is served directly, as small as asked, and leaves the window
// alone.
//
// Any write, truncate or commit through the file drops the window (the chunks may hold old data).
import type { CfsFile } from './file.js';

const CHUNK = 2 * 1024 * 1024;
const DEPTH = 8;
/** How far from the end of the previous read a read may start and still count as part of the stream. */
const SLACK = 1024 * 1024;

interface Chunk {
  start: number;
  /** Bytes in this chunk (the last one ends at the end of the file). */
  length: number;
  buf: Buffer;
  data: Promise<Buffer>;
}

export class ReadAhead {
  private chunks = new Map<number, Chunk>();
  /**
   * Chunk buffers are reused: a fresh 2 MiB buffer per chunk is external memory that V8 answers
   * with full garbage collections, which cost more than the copies.
   */
  private spare: Buffer[] = [];
  private lastEnd = -1;
  private streak = 0;

  constructor(private readonly file: CfsFile) {}

  async read(dest: Buffer, position: number): Promise<number> {
    const size = this.file.size;
    if (position >= size) return 0;
    const length = Math.min(dest.length, size - position);
    const first = Math.floor(position / CHUNK);
    const near = this.lastEnd >= 0 && Math.abs(position - this.lastEnd) <= SLACK;
    this.streak = near ? this.streak + 1 : 0;
    this.lastEnd = near ? Math.max(this.lastEnd, position + length) : position + length;
    // A lone or random read: straight to the copy, as small as asked.
    if (this.streak < 2) return this.file.read(dest.subarray(0, length), position);

    for (const [k, c] of this.chunks) if (k < first - 1) this.retire(k, c);
    for (let k = first; k < first + DEPTH && k * CHUNK < size; k++) if (!this.chunks.has(k)) this.fetch(k, size);
    let done = 0;
    while (done < length) {
      const at = position + done;
      const k = Math.floor(at / CHUNK);
      const chunk = this.chunks.get(k) ?? this.fetch(k, size);
      let data: Buffer;
      try {
        data = await chunk.data;
      } catch (e) {
        if (this.chunks.get(k) === chunk) this.chunks.delete(k);
        throw e;
      }
      const from = at - chunk.start;
      if (from >= chunk.length) break;
      const n = Math.min(length - done, chunk.length - from);
      data.copy(dest, done, from, from + n);
      done += n;
    }
    return done;
  }

  invalidate(): void {
    for (const [k, c] of this.chunks) this.retire(k, c);
  }

  /** Forget a chunk; its buffer is reused once no read can be copying out of it or into it. */
  private retire(k: number, c: Chunk): void {
    this.chunks.delete(k);
    c.data.then(
      () => setImmediate(() => this.spare.length < DEPTH + 2 && this.spare.push(c.buf)),
      () => {},
    );
  }

  private fetch(k: number, size: number): Chunk {
    const start = k * CHUNK;
    const length = Math.min(CHUNK, size - start);
    // Shared memory, so the data path's read worker can fill it (datapath.ts).
    const buf = (this.spare.pop() ?? Buffer.from(new SharedArrayBuffer(CHUNK))).subarray(0, length);
    const chunk: Chunk = { start, length, buf: Buffer.from(buf.buffer, buf.byteOffset, CHUNK), data: this.file.read(buf, start).then(() => buf) };
    chunk.data.catch(() => {}); // a failed chunk is reported to the read that waits for it
    this.chunks.set(k, chunk);
    return chunk;
  }
}

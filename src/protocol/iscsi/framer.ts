// Cuts a byte stream into PDUs. A state table in the libnbd manner: each state wants a number of
// bytes; once the queue holds them, the state decodes and moves on.
//
//   state   wants                                   then
//   BHS     48                                      AHS (or HDIGEST, DATA)
//   AHS     TotalAHSLength                          HDIGEST if header digests, else DATA
//   HDIGEST 4                                       check, DATA
//   DATA    DataSegmentLength + padding             DDIGEST if data digests (and data), else emit
//   DDIGEST 4                                       check, emit
//
// A data segment longer than the negotiated MaxRecvDataSegmentLength is not buffered: it is read and
// thrown away as it arrives (bounded memory), and the frame is emitted with `oversize` so the
// connection can answer with a Reject and stay in sync.
//
// Write data can land where it belongs: when the header is in, `landing` may name the buffer its
// data segment goes to (a write's buffer). Bytes already queued are copied there, and the rest
// is read straight into it (directTarget/directFilled) when the socket reads into buffers we
// choose; the frame comes out with `direct` set and its data in that buffer.
import { ByteQueue } from '../byte-queue.js';
import { BHS_LENGTH, DIGEST_LENGTH } from './constants.js';
import { digest, pad4 } from './digest.js';

export interface Frame {
  /** The raw 48-byte header (decode with decodeBhs). */
  bhs: Buffer;
  ahs: Buffer;
  /** The data segment without padding (empty when oversize), joined into one Buffer on first use. */
  readonly data: Buffer;
  /**
   * The same bytes as views into the received chunks, no copy: a 256 KiB Data-Out segment spans
   * several 64 KiB socket reads, and joining it only to copy it again into the task's buffer
   * cost a fresh allocation and a copy per PDU.
   */
  readonly pieces: readonly Buffer[];
  /** DataSegmentLength as the header said. */
  dataLength: number;
  /** The data segment was put straight into the buffer `landing` gave (`data` is that buffer). */
  readonly direct: boolean;
  headerDigestOk: boolean;
  dataDigestOk: boolean;
  oversize: boolean;
}

export interface FramerLimits {
  headerDigest: boolean;
  dataDigest: boolean;
  /** Our MaxRecvDataSegmentLength: the most we accept in one data segment. */
  maxRecvDataSegmentLength: number;
}

const EMPTY = Buffer.alloc(0);

interface FrameInProgress {
  state: 'BHS' | 'AHS' | 'HDIGEST' | 'DATA' | 'DDIGEST';
  skipLeft: number;
  bhs?: Buffer;
  ahs?: Buffer;
  pieces?: Buffer[];
  /** The segment with its padding, for the data digest. */
  padded?: Buffer[];
  dataLength?: number;
  headerDigestOk?: boolean;
  dataDigestOk?: boolean;
  oversize?: boolean;
  /** Where the data segment lands, and how much of it is there. */
  direct?: { into: Buffer; filled: number };
  landingAsked?: boolean;
}

/** Below this a data segment is not worth a landing: it is copied from the received chunk anyway. */
export const DIRECT_MIN = 16 * 1024;

export class PduFramer {
  private readonly q = new ByteQueue();
  private cur: FrameInProgress = { state: 'BHS', skipLeft: 0 };

  /**
   * Where the data segment of the PDU whose header is `bhs` should land (a buffer of exactly
   * `dataLength` bytes), or undefined to take it as views. Asked once per PDU, only for segments
   * of DIRECT_MIN bytes or more without padding or data digest, whose header digest (if any) held.
   */
  landing?: (bhs: Buffer, dataLength: number) => Buffer | undefined;

  /**
   * Set when a frame handed out views of the received chunks (its data segment). A reader that
   * reuses its read buffer clears it before a push and may reuse the buffer only if it stayed
   * clear and nothing is left queued (`buffered` is 0).
   */
  lent = false;

  constructor(public limits: FramerLimits) {}

  /** Where the next read should go: the unfilled rest of a landing buffer, when one is waiting. */
  directTarget(): Buffer | undefined {
    const d = this.cur.direct;
    return d && this.q.length === 0 && d.filled < d.into.length ? d.into.subarray(d.filled) : undefined;
  }

  /** n bytes were read into what directTarget() gave. */
  directFilled(n: number): void {
    this.cur.direct!.filled += n;
  }

  /** Bytes queued but not yet framed (for backpressure). */
  get buffered(): number {
    return this.q.length;
  }

  push(chunk: Buffer): void {
    this.q.push(chunk);
  }

  /** The next complete frame, or undefined when more bytes are needed. */
  next(): Frame | undefined {
    const c = this.cur;
    const L = this.limits;
    for (;;) {
      switch (c.state) {
        case 'BHS': {
          if (this.q.length < BHS_LENGTH) return undefined;
          c.bhs = Buffer.from(this.q.take(BHS_LENGTH)); // own copy: the header outlives the chunk
          c.dataLength = c.bhs.readUIntBE(5, 3);
          c.oversize = c.dataLength > L.maxRecvDataSegmentLength;
          c.state = 'AHS';
          break;
        }
        case 'AHS': {
          const n = c.bhs![4]! * 4;
          if (this.q.length < n) return undefined;
          c.ahs = n ? Buffer.from(this.q.take(n)) : EMPTY;
          c.state = L.headerDigest ? 'HDIGEST' : 'DATA';
          c.headerDigestOk = true;
          c.skipLeft = c.dataLength! + pad4(c.dataLength!);
          break;
        }
        case 'HDIGEST': {
          if (this.q.length < DIGEST_LENGTH) return undefined;
          const got = this.q.take(DIGEST_LENGTH).readUInt32LE(0);
          c.headerDigestOk = got === digest([c.bhs!, c.ahs!]);
          c.state = 'DATA';
          break;
        }
        case 'DATA': {
          const total = c.dataLength! + pad4(c.dataLength!);
          if (c.oversize) {
            c.skipLeft -= this.q.skip(c.skipLeft);
            if (c.skipLeft > 0) return undefined;
            c.pieces = [];
          } else {
            if (!c.landingAsked) {
              c.landingAsked = true;
              const into = this.landing && total === c.dataLength && total >= DIRECT_MIN && !L.dataDigest && c.headerDigestOk ? this.landing(c.bhs!, total) : undefined;
              if (into) c.direct = { into, filled: 0 };
            }
            const d = c.direct;
            if (d) {
              d.filled += this.q.copyOut(d.into, d.filled);
              if (d.filled < d.into.length) return undefined;
              c.dataDigestOk = true;
              return this.emit();
            }
            if (this.q.length < total) return undefined;
            // Views into the received chunks: the segment is copied once, where it goes.
            const withPad = total ? this.q.takeVec(total) : [];
            if (total) this.lent = true;
            c.pieces = unpad(withPad, c.dataLength!);
            c.skipLeft = 0;
            c.padded = withPad;
          }
          c.dataDigestOk = true;
          if (L.dataDigest && c.dataLength! > 0) c.state = 'DDIGEST';
          else return this.emit();
          break;
        }
        case 'DDIGEST': {
          if (this.q.length < DIGEST_LENGTH) return undefined;
          const got = this.q.take(DIGEST_LENGTH).readUInt32LE(0);
          const padded = c.padded;
          c.dataDigestOk = c.oversize ? false : got === digest(padded!);
          return this.emit();
        }
      }
    }
  }

  private emit(): Frame {
    const c = this.cur;
    const f = new ReceivedFrame(c.bhs!, c.ahs!, c.direct ? [c.direct.into] : c.pieces!, c.dataLength!, c.headerDigestOk!, c.dataDigestOk!, c.oversize!, !!c.direct);
    this.cur = { state: 'BHS', skipLeft: 0 };
    return f;
  }
}

class ReceivedFrame implements Frame {
  private joined?: Buffer;
  constructor(
    readonly bhs: Buffer,
    readonly ahs: Buffer,
    readonly pieces: readonly Buffer[],
    readonly dataLength: number,
    readonly headerDigestOk: boolean,
    readonly dataDigestOk: boolean,
    readonly oversize: boolean,
    readonly direct: boolean,
  ) {}

  get data(): Buffer {
    if (!this.joined) {
      const p = this.pieces;
      this.joined = p.length === 0 ? EMPTY : p.length === 1 ? p[0]! : Buffer.concat(p as Buffer[], this.dataLength);
    }
    return this.joined;
  }
}

/** The first n bytes of a list of views (the segment without its padding). */
function unpad(pieces: Buffer[], n: number): Buffer[] {
  const out: Buffer[] = [];
  for (const p of pieces) {
    if (n <= 0) break;
    out.push(p.length <= n ? p : p.subarray(0, n));
    n -= p.length;
  }
  return out;
}

/** Serialise a PDU: header, AHS, header digest, data, padding, data digest, as a list to cork. */
export function framePdu(bhs: Buffer, data: Buffer | undefined, opts: { headerDigest: boolean; dataDigest: boolean; ahs?: Buffer }): Buffer[] {
  const ahs = opts.ahs ?? EMPTY;
  const len = data?.length ?? 0;
  bhs[4] = ahs.length / 4;
  bhs.writeUIntBE(len, 5, 3);
  const out: Buffer[] = [bhs];
  if (ahs.length) out.push(ahs);
  if (opts.headerDigest) out.push(u32le(digest(ahs.length ? [bhs, ahs] : bhs)));
  if (len) {
    out.push(data!);
    const p = pad4(len);
    const padding = p ? PADS[p]! : undefined;
    if (padding) out.push(padding);
    if (opts.dataDigest) out.push(u32le(digest(padding ? [data!, padding] : data!)));
  }
  return out;
}

const PADS = [EMPTY, Buffer.alloc(1), Buffer.alloc(2), Buffer.alloc(3)];

function u32le(n: number): Buffer {
  const b = Buffer.allocUnsafe(4);
  b.writeUInt32LE(n >>> 0, 0);
  return b;
}

// The framer's landing path: write data read straight into the buffer it belongs in, and a reader
// that reuses its read buffer whenever the framer says nothing points into it. A model: whatever
// the split of the byte stream into reads, whichever PDUs get a landing buffer, and however the
// reader scribbles over a buffer it was allowed to reuse, every frame carries the bytes that were
// sent, and a landed frame carries them in its landing buffer.
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { encodeBhs } from '../src/protocol/iscsi/bhs.js';
import { Op } from '../src/protocol/iscsi/constants.js';
import { DIRECT_MIN, framePdu, PduFramer, type Frame } from '../src/protocol/iscsi/framer.js';

interface Sent {
  itt: number;
  data: Buffer;
}

const PATTERN = Buffer.alloc(128 * 1024);
for (let k = 0; k < PATTERN.length; k++) PATTERN[k] = (k * 7 + (k >> 8) * 31) & 0xff;

/** PDUs with data segments around DIRECT_MIN (some land, some are too short, some padded). */
function pdus(lengths: number[]): { bytes: Buffer; sent: Sent[] } {
  const parts: Buffer[] = [];
  const sent: Sent[] = [];
  lengths.forEach((len, i) => {
    const data = PATTERN.subarray(i * 97, i * 97 + len);
    sent.push({ itt: i, data });
    parts.push(...framePdu(encodeBhs({ opcode: Op.DATA_OUT, itt: i, dataSegmentLength: len }), len ? data : undefined, { headerDigest: false, dataDigest: false }));
  });
  return { bytes: Buffer.concat(parts), sent };
}

describe('the framer landing write data where it belongs', () => {
  it('delivers every data segment intact through reads of any size into a reused buffer, landed or not', () => {
    const length = fc.oneof(fc.integer({ min: 0, max: 300 }), fc.integer({ min: DIRECT_MIN - 8, max: DIRECT_MIN + 20_000 }));
    fc.assert(
      fc.property(
        fc.array(length, { minLength: 1, maxLength: 12 }),
        fc.array(fc.oneof(fc.integer({ min: 1, max: 100 }), fc.integer({ min: 100, max: 70_000 })), { minLength: 1, maxLength: 30 }),
        fc.array(fc.boolean(), { minLength: 1, maxLength: 12 }),
        (lengths, readSizes, wantLanding) => {
          const { bytes, sent } = pdus(lengths);
          const framer = new PduFramer({ headerDigest: false, dataDigest: false, maxRecvDataSegmentLength: 1 << 20 });
          const landed = new Map<number, Buffer>();
          framer.landing = (bhs, n) => {
            const itt = bhs.readUInt32BE(16);
            if (!wantLanding[itt % wantLanding.length]) return undefined;
            const b = Buffer.alloc(n, 0xee);
            landed.set(itt, b);
            return b;
          };
          const frames: Frame[] = [];
          let spare: Buffer | undefined;
          let at = 0;
          let r = 0;
          while (at < bytes.length) {
            const want = readSizes[r++ % readSizes.length]!;
            const direct = framer.directTarget();
            const into = direct ?? (spare ??= Buffer.allocUnsafe(want));
            const n = Math.min(want, into.length, bytes.length - at);
            bytes.copy(into, 0, at, at + n);
            at += n;
            if (direct) framer.directFilled(n);
            else {
              framer.lent = false;
              framer.push(into.subarray(0, n));
            }
            for (let f = framer.next(); f; f = framer.next()) frames.push(f);
            if (!direct) {
              // What the connection does: reuse the buffer only when nothing points into it.
              if (framer.lent || framer.buffered > 0) spare = undefined;
              else spare!.fill(0xa5, 0, n); // scribble: a frame that kept a view would now be wrong
            }
          }
          expect(frames.map((f) => f.bhs.readUInt32BE(16))).toEqual(sent.map((s) => s.itt));
          for (const [i, f] of frames.entries()) {
            expect(f.data.equals(sent[i]!.data)).toBe(true);
            const l = landed.get(i);
            expect(f.direct).toBe(!!l);
            if (l) expect(l.equals(sent[i]!.data)).toBe(true);
          }
          // Only long, unpadded segments are offered a landing.
          for (const itt of landed.keys()) expect(lengths[itt]! >= DIRECT_MIN && lengths[itt]! % 4 === 0).toBe(true);
        },
      ),
      { numRuns: 200 },
    );
  });
});

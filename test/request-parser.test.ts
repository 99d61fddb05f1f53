// The server's request framing (src/protocol/requests.ts) as the NBD connection drives it
// (src/nbd/transmission.ts): each read lands either in the rest of a large WRITE's payload
// (directTarget) or in a scratch buffer, which the connection copies out of or hands over. A
// model: random requests, serialised, cut into random reads; every request must come out as
// sent, payload byte for byte, whichever way its bytes came, and the parser must never keep a
// view into a scratch buffer the caller reuses.
import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { RequestParser, type Request } from '../src/protocol/requests.js';
import { encodeRequest } from '../src/protocol/replies.js';
import { Cmd, MAX_PAYLOAD } from '../src/protocol/constants.js';

interface Sent {
  type: number;
  offset: number;
  payload: Buffer;
}

const request = fc.oneof(
  fc.record({ type: fc.constant(Cmd.READ), offset: fc.nat(1 << 30), payload: fc.constant(Buffer.alloc(0)) }),
  fc.record({ type: fc.constant(Cmd.FLUSH), offset: fc.constant(0), payload: fc.constant(Buffer.alloc(0)) }),
  fc.record({
    type: fc.constant(Cmd.WRITE),
    offset: fc.nat(1 << 30),
    // Small ones stay in the scratch buffer; from 64 KiB missing on, the rest is read in place.
    payload: fc.oneof(fc.integer({ min: 1, max: 5000 }), fc.integer({ min: 60_000, max: 400_000 })).map((n) => Buffer.from(Array.from({ length: n }, (_, i) => (i * 7 + n) & 255))),
  }),
);

function wire(reqs: Sent[]): Buffer {
  return Buffer.concat(
    reqs.flatMap((r, i) => [
      encodeRequest({ flags: 0, type: r.type, cookie: BigInt(i + 1), offset: r.offset, length: r.type === Cmd.READ ? 4096 : r.payload.length }),
      r.payload,
    ]),
  );
}

/** Feed `bytes` as the connection does: reads of at most `sizes[i]` bytes into the target of the moment. */
function drive(bytes: Buffer, sizes: number[], copyMax: number, scratchSize: number): { reqs: Request[]; direct: number } {
  const parser = new RequestParser(MAX_PAYLOAD, true);
  const reqs: Request[] = [];
  let scratch = Buffer.alloc(scratchSize);
  let at = 0;
  let direct = 0;
  for (let i = 0; at < bytes.length; i++) {
    const target = parser.directTarget();
    const into = target ?? scratch;
    const n = Math.min(sizes[i % sizes.length]!, into.length, bytes.length - at);
    bytes.copy(into, 0, at, at + n);
    at += n;
    if (target) {
      parser.directFilled(n);
      direct += n;
    } else if (n <= copyMax) {
      parser.push(Buffer.from(scratch.subarray(0, n)));
      scratch.fill(0xee); // reused by the next read: a view kept into it would now read 0xee
    } else {
      parser.push(scratch.subarray(0, n));
      scratch = Buffer.alloc(scratchSize);
    }
    for (let ev = parser.next(); ev; ev = parser.next()) {
      expect(ev.kind).toBe('request');
      if (ev.kind === 'request') reqs.push(ev.request);
    }
  }
  return { reqs, direct };
}

describe('the server request parser, driven as an NBD connection reads', () => {
  it('gives every request as sent, payloads byte for byte, through copied, handed-over and in-place reads', () => {
    fc.assert(
      fc.property(
        fc.array(request, { minLength: 1, maxLength: 12 }),
        fc.array(fc.integer({ min: 1, max: 200_000 }), { minLength: 1, maxLength: 8 }),
        fc.constantFrom(0, 16 * 1024, Infinity),
        (sent, sizes, copyMax) => {
          const { reqs } = drive(wire(sent), sizes, copyMax, 128 * 1024);
          expect(reqs.map((r) => [r.type, r.offset])).toEqual(sent.map((s) => [s.type, s.offset]));
          reqs.forEach((r, i) => {
            if (r.type !== Cmd.WRITE) return;
            expect(Buffer.concat(r.payload!).equals(sent[i]!.payload)).toBe(true);
            expect(r.cookie.readBigUInt64BE(0)).toBe(BigInt(i + 1));
          });
        },
      ),
      { numRuns: 200 },
    );
  });

  it('reads the rest of a large WRITE in place, keeping the bytes that came with the header as they are', () => {
    const payload = Buffer.from(Array.from({ length: 1 << 20 }, (_, i) => i & 255));
    const bytes = wire([{ type: Cmd.WRITE, offset: 4096, payload }]);
    const { reqs, direct } = drive(bytes, [128 * 1024], 16 * 1024, 128 * 1024);
    expect(reqs).toHaveLength(1);
    const r = reqs[0]!;
    // The first read brought the header and 128 KiB - 28 bytes of payload; the rest went in place.
    expect(direct).toBe(bytes.length - 128 * 1024);
    expect(r.ownedPayload!.length).toBe(direct);
    expect(r.payload!.at(-1)).toBe(r.ownedPayload);
    expect(r.payload![0]!.length).toBe(128 * 1024 - 28);
    expect(Buffer.concat(r.payload!).equals(payload)).toBe(true);
  });
});

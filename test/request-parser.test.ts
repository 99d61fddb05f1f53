// The server's request framing (src/protocol/requests.ts) as the NBD connection drives it
// (src/nbd/transmission.ts): each read lands either in the rest of a large WRITE's payload
// (directTarget) or in a scratch buffer, which the connection copies out of or hands over. A
// model: random requests, serialised, cut into random reads; every request must come out as
// sent, payload byte for byte, whichever way its bytes came, and the parser must never keep a
// view into a scratch buffer the caller reuses.
import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { RequestParser, type LandingAlloc, type Request } from '../src/protocol/requests.js';
import { encodeRequest } from '../src/protocol/replies.js';
import { Cmd, MAX_PAYLOAD } from '../src/protocol/constants.js';
import { ScratchBuffers } from '../src/nbd/scratch.js';

/** n bytes of a pattern that differs with `seed` (a loop: Array.from is ten times slower). */
function pattern(n: number, seed: number): Buffer {
  const b = Buffer.allocUnsafe(n);
  for (let i = 0; i < n; i++) b[i] = (i * 7 + seed) & 255;
  return b;
}

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
    payload: fc.oneof(fc.integer({ min: 1, max: 5000 }), fc.integer({ min: 60_000, max: 400_000 })).map((n) => pattern(n, n)),
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

/**
 * Buffers for a payload's missing bytes cut at `cuts` (fractions), some empty, as a device's
 * write target gives them (runs of pages in different slabs).
 */
function cutInto(cuts: number[]): LandingAlloc {
  return (_req, n) => {
    const at = [0, ...cuts.map((c) => Math.floor(c * n)).sort((a, b) => a - b), n];
    return at.slice(1).map((end, i) => Buffer.alloc(end - at[i]!));
  };
}

/** Feed `bytes` as the connection does: reads of at most `sizes[i]` bytes into the target of the moment. */
function drive(bytes: Buffer, sizes: number[], copyMax: number, scratchSize: number, alloc?: LandingAlloc): { reqs: Request[]; direct: number } {
  const parser = new RequestParser(MAX_PAYLOAD, true, alloc);
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

  it('fills a large WRITE\'s missing bytes into the pieces its allocator gives, in order, empty pieces included', () => {
    fc.assert(
      fc.property(
        fc.array(request, { minLength: 1, maxLength: 8 }),
        fc.array(fc.integer({ min: 1, max: 200_000 }), { minLength: 1, maxLength: 8 }),
        fc.array(fc.double({ min: 0, max: 1, noNaN: true }), { maxLength: 5 }),
        (sent, sizes, cuts) => {
          const { reqs } = drive(wire(sent), sizes, 16 * 1024, 128 * 1024, cutInto(cuts));
          expect(reqs.map((r) => [r.type, r.offset])).toEqual(sent.map((s) => [s.type, s.offset]));
          reqs.forEach((r, i) => {
            if (r.type !== Cmd.WRITE) return;
            expect(Buffer.concat(r.payload!).equals(sent[i]!.payload)).toBe(true);
            // The landed pieces are the payload's last ones, the allocator's buffers themselves.
            const tail = r.payload!.slice(r.payload!.length - (r.landed?.length ?? 0));
            expect(tail.every((piece, k) => piece === r.landed![k])).toBe(true);
          });
        },
      ),
      { numRuns: 200 },
    );
  });

  it('reads the rest of a large WRITE in place, keeping the bytes that came with the header as they are', () => {
    const payload = pattern(1 << 20, 0);
    const bytes = wire([{ type: Cmd.WRITE, offset: 4096, payload }]);
    const { reqs, direct } = drive(bytes, [128 * 1024], 16 * 1024, 128 * 1024);
    expect(reqs).toHaveLength(1);
    const r = reqs[0]!;
    // The first read brought the header and 128 KiB - 28 bytes of payload; the rest went in place.
    expect(direct).toBe(bytes.length - 128 * 1024);
    expect(r.landed).toHaveLength(1);
    expect(r.landed![0]!.length).toBe(direct);
    expect(r.payload!.at(-1)).toBe(r.landed![0]);
    expect(r.payload![0]!.length).toBe(128 * 1024 - 28);
    expect(Buffer.concat(r.payload!).equals(payload)).toBe(true);
  });
});

/**
 * Feed `bytes` as the connection does, with its recycled scratch buffers (src/nbd/scratch.ts):
 * every WRITE the parser gives out is held, as the device would, until `releases` lets it go, in
 * any order. Before each read, the whole scratch buffer is poisoned (0xee), so a buffer reused
 * while a request still held a view into it shows in that request's payload.
 */
function driveRecycled(sent: Sent[], sizes: number[], releases: number[], scratchSize: number): { distinct: number; scratch: ScratchBuffers } {
  const bytes = wire(sent);
  const parser = new RequestParser(MAX_PAYLOAD, true);
  const scratch = new ScratchBuffers(scratchSize, parser, 2);
  const held: { req: Request; i: number }[] = [];
  const seen = new Set<ArrayBufferLike>();
  let got = 0;
  const release = (k: number) => {
    const [h] = held.splice(k % held.length, 1);
    const { req, i } = h!;
    expect(Buffer.concat(req.payload!).equals(sent[i]!.payload)).toBe(true);
    scratch.release(req.payload!);
  };
  let at = 0;
  for (let i = 0; at < bytes.length; i++) {
    const target = parser.directTarget();
    if (!target) scratch.current.fill(0xee);
    const into = target ?? scratch.current;
    seen.add(scratch.current.buffer);
    const n = Math.min(sizes[i % sizes.length]!, into.length, bytes.length - at);
    bytes.copy(into, 0, at, at + n);
    at += n;
    if (target) parser.directFilled(n);
    else if (n <= 16 * 1024) parser.push(Buffer.from(into.subarray(0, n)));
    else {
      parser.push(into.subarray(0, n));
      scratch.lend();
    }
    for (let ev = parser.next(); ev; ev = parser.next()) {
      if (ev.kind !== 'request') throw new Error('bad magic');
      const k = got++;
      if (ev.request.type === Cmd.WRITE) {
        scratch.hold(ev.request.payload!);
        held.push({ req: ev.request, i: k });
      }
    }
    scratch.sweep();
    for (let r = releases[i % releases.length]!; r > 0 && held.length > 0; r--) release(r * 7 + i);
  }
  while (held.length > 0) release(0);
  scratch.sweep();
  expect(got).toBe(sent.length);
  return { distinct: seen.size, scratch };
}

describe('the connection\'s recycled scratch buffers, driven as an NBD connection reads', () => {
  it('never reuses a scratch buffer while a request it lent pieces to is in flight, with requests finishing in any order', () => {
    fc.assert(
      fc.property(
        fc.array(request, { minLength: 1, maxLength: 16 }),
        fc.array(fc.integer({ min: 1, max: 200_000 }), { minLength: 1, maxLength: 8 }),
        fc.array(fc.integer({ min: 0, max: 3 }), { minLength: 1, maxLength: 8 }),
        (sent, sizes, releases) => {
          const { scratch } = driveRecycled(sent, sizes, releases, 128 * 1024);
          // Every request finished and every byte was taken: every lent buffer came back.
          expect(scratch.outstanding).toBe(0);
        },
      ),
      { numRuns: 300 },
    );
  });

  it('reads a stream of large WRITEs through two scratch buffers, not one new buffer per WRITE', () => {
    const sent: Sent[] = Array.from({ length: 20 }, (_, k) => ({ type: Cmd.WRITE, offset: k << 20, payload: pattern(1 << 20, k) }));
    // Each WRITE finishes before the next one's first read: one buffer is lent while the other is read into.
    const { distinct, scratch } = driveRecycled(sent, [128 * 1024], [1], 128 * 1024);
    expect(distinct).toBe(2);
    expect(scratch.free).toBeGreaterThan(0);
  });

  it('keeps a scratch buffer whose bytes start a WRITE still arriving, until that WRITE is given out and done', () => {
    const parser = new RequestParser(MAX_PAYLOAD, true);
    const scratch = new ScratchBuffers(128 * 1024, parser, 2);
    const payload = Buffer.alloc(1 << 20, 0x5a);
    const bytes = wire([{ type: Cmd.WRITE, offset: 0, payload }]);
    const first = scratch.current;
    bytes.copy(first, 0, 0, 128 * 1024);
    parser.push(first.subarray(0, 128 * 1024));
    scratch.lend();
    expect(parser.next()).toBeNull(); // the header and 128 KiB - 28 bytes taken as the payload's head
    scratch.sweep();
    expect(parser.holds(first.buffer)).toBe(true);
    expect(scratch.outstanding).toBe(1); // all its bytes are taken, but the head still points into it
    const rest = parser.directTarget()!;
    bytes.copy(rest, 0, 128 * 1024);
    parser.directFilled(rest.length);
    const ev = parser.next();
    if (ev?.kind !== 'request') throw new Error('no request');
    scratch.hold(ev.request.payload!);
    scratch.sweep();
    expect(scratch.outstanding).toBe(1); // now the request holds it
    scratch.release(ev.request.payload!);
    expect(scratch.outstanding).toBe(0);
    expect(scratch.free).toBe(1);
  });
});

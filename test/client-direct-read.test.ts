// The NBD client's receive path: READ payloads read by the kernel straight into the caller's
// buffer (src/nbd/client/receive.ts). Real servers for the byte-for-byte reads, a scripted fake
// server for what real ones do not do on demand: replies split and interleaved out of order,
// written in odd fragments, or cut off in the middle of a payload.
import { describe, it, expect, afterEach, beforeAll } from 'vitest';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import fc from 'fast-check';
import { connect, NbdClient, NbdConnectionError } from '../src/nbd/client.js';
import { ReplyType } from '../src/protocol/constants.js';
import { DIRECT_MIN, SCRATCH } from '../src/nbd/client/receive.js';
import { startNbdkit, startServe, tmpDir, type RunningServer } from './helpers/servers.js';
import { Peer, be, chunk, closeFakeServers, fakeServer, readRequest, rejection, serveHandshake, simpleReply, type FakeRequest } from './helpers/fake-nbd.js';

const KiB = 1024;
const MiB = 1024 * KiB;

const opened: NbdClient[] = [];
afterEach(async () => {
  await Promise.all(opened.splice(0).map((c) => c.close()));
  await closeFakeServers();
});
async function open(...args: Parameters<typeof connect>): Promise<NbdClient> {
  const c = await connect(...args);
  opened.push(c);
  return c;
}

/** Read `length` bytes at `offset` into the middle of a larger buffer; the guard bytes either side must stay as they were. */
async function guardedRead(c: NbdClient, offset: number, length: number): Promise<Buffer> {
  const GUARD = 4099;
  const whole = Buffer.alloc(GUARD + length + GUARD, 0xa5);
  const dest = whole.subarray(GUARD, GUARD + length);
  const got = await c.pread(dest, offset);
  expect(got).toBe(dest);
  expect(whole.subarray(0, GUARD).every((b) => b === 0xa5), 'bytes before the destination were written').toBe(true);
  expect(whole.subarray(GUARD + length).every((b) => b === 0xa5), 'bytes after the destination were written').toBe(true);
  return dest;
}

// ---------------------------------------------------------------------------
// Real servers, a file of random bytes

const FILE_SIZE = 40 * MiB;
let file = '';
let disk: Buffer;
beforeAll(() => {
  file = path.join(tmpDir('bm-direct-'), 'disk.img');
  disk = crypto.randomBytes(FILE_SIZE);
  fs.writeFileSync(file, disk);
});

// Each size class at an offset that is not a multiple of anything, and one aligned.
const SIZES: Array<[label: string, offset: number, length: number]> = [
  ['1 byte', 12_345_677, 1],
  ['1 byte at the very end', FILE_SIZE - 1, 1],
  ['unaligned 12345 bytes', 777, 12_345],
  ['4 KiB', 8 * MiB, 4 * KiB],
  ['just under DIRECT_MIN', 3 * MiB + 5, DIRECT_MIN - 1],
  ['1 MiB, unaligned', 5 * MiB + 4097, MiB],
  ['32 MiB (the largest payload)', 3 * MiB + 512, 32 * MiB],
];

type Kind = 'nbdkit file' | 'blockmirror serve --file' | 'blockmirror serve --file (unix socket)';
async function start(kind: Kind): Promise<{ server: RunningServer; target: Parameters<typeof connect>[0] }> {
  if (kind === 'nbdkit file') {
    const server = await startNbdkit(['file', file]);
    return { server, target: { host: server.host, port: server.port } };
  }
  const socket = kind.includes('unix') ? path.join(tmpDir('bm-direct-'), 'nbd.sock') : undefined;
  const server = await startServe(['--file', file, '--log-level', 'warn'], { socket });
  return { server, target: socket ? { path: socket, exportName: 'disk' } : { host: server.host, port: server.port, exportName: 'disk' } };
}

const KINDS: Kind[] = ['nbdkit file', 'blockmirror serve --file', 'blockmirror serve --file (unix socket)'];

describe.each(KINDS)('reads straight into the caller\'s buffer from %s', (kind) => {
  for (const structuredReplies of [true, false]) {
    const replies = structuredReplies ? 'structured' : 'simple';
    it(`returns every size class byte for byte as the file holds it, touching nothing around the destination (${replies} replies)`, async () => {
      const { server, target } = await start(kind);
      try {
        const c = await open(target, { structuredReplies });
        expect(c.structuredReplies).toBe(structuredReplies);
        for (const [label, offset, length] of SIZES) {
          const got = await guardedRead(c, offset, length);
          expect(got.equals(disk.subarray(offset, offset + length)), `${label} at ${offset}`).toBe(true);
        }
        // Of each payload, at most the scratch read with its header and a tail under DIRECT_MIN were copied.
        const total = SIZES.reduce((n, [, , l]) => n + l, 0);
        expect(c.readBytes.direct + c.readBytes.copied).toBe(total);
        expect(c.readBytes.copied).toBeLessThanOrEqual(SIZES.reduce((n, [, , l]) => n + Math.min(l, SCRATCH + DIRECT_MIN), 0));
        expect(c.readBytes.direct).toBeGreaterThanOrEqual(32 * MiB + MiB - 2 * (SCRATCH + DIRECT_MIN));
        await c.disconnect();
      } finally {
        await server.stop();
      }
    });
  }

  it('answers 48 concurrent reads of mixed sizes, issued at once, each with its own bytes', async () => {
    const { server, target } = await start(kind);
    try {
      const c = await open(target);
      const lengths = [1, 511, 4 * KiB, 64 * KiB + 3, DIRECT_MIN, 300 * KiB, MiB, 2 * MiB + 1];
      const reads = Array.from({ length: 48 }, (_, i) => {
        const length = lengths[i % lengths.length]!;
        const offset = (i * 7_654_321 + 13) % (FILE_SIZE - length);
        return { offset, length, p: guardedRead(c, offset, length) };
      });
      for (const r of reads) expect((await r.p).equals(disk.subarray(r.offset, r.offset + r.length)), `read ${r.offset}+${r.length}`).toBe(true);
      expect(c.readBytes.direct).toBeGreaterThan(0);
      await c.disconnect();
    } finally {
      await server.stop();
    }
  });
});

// ---------------------------------------------------------------------------
// A fake server choreographs the replies

const FAKE_DISK = crypto.randomBytes(8 * MiB);

/**
 * Write `stream` in fragments of the given sizes (cycling), yielding to the event loop between
 * them; after 300 fragments the rest goes at once (1-byte fragments of megabytes would take minutes).
 */
async function writeFragmented(p: Peer, stream: Buffer, sizes: number[]): Promise<void> {
  for (let at = 0, i = 0; at < stream.length; i++) {
    const n = i < 300 ? Math.min(sizes[i % sizes.length]!, stream.length - at) : stream.length - at;
    p.write(stream.subarray(at, at + n));
    at += n;
    await new Promise((r) => setImmediate(r));
  }
}

interface Layout {
  /** Pieces of each reply, in order: [fraction where the piece ends, is a hole]. Structured replies only. */
  pieces: Array<Array<[end: number, hole: boolean]>>;
  /** Order in which the replies' chunks are interleaved: index of the reply whose next chunk goes. */
  picks: number[];
  fragments: number[];
}

/**
 * The replies to `reqs` laid out as `layout` says, and what each read must return: FAKE_DISK's
 * bytes, with zeroes where a piece was sent as a hole.
 */
function replies(reqs: FakeRequest[], sr: boolean, layout: Layout): { stream: Buffer; expected: Map<bigint, Buffer>; dataBytes: number } {
  const expected = new Map<bigint, Buffer>();
  let dataBytes = 0;
  const queues: Buffer[][] = reqs.map((r, i) => {
    const want = Buffer.from(FAKE_DISK.subarray(r.offset, r.offset + r.length));
    expected.set(r.cookie, want);
    if (!sr) {
      dataBytes += r.length;
      return [simpleReply(r.cookie), FAKE_DISK.subarray(r.offset, r.offset + r.length)];
    }
    const cuts = [...(layout.pieces[i % layout.pieces.length] ?? []), [1, false] as [number, boolean]];
    const out: Buffer[] = [];
    let from = 0;
    for (const [end, hole] of cuts) {
      const to = Math.max(from, Math.min(r.length, Math.ceil(end * r.length)));
      if (to === from) continue;
      const last = to === r.length;
      if (hole) {
        want.fill(0, from, to);
        out.push(chunk(r.cookie, ReplyType.OFFSET_HOLE, Buffer.concat([be(8, r.offset + from), be(4, to - from)]), last));
      } else {
        dataBytes += to - from;
        out.push(chunk(r.cookie, ReplyType.OFFSET_DATA, Buffer.concat([be(8, r.offset + from), FAKE_DISK.subarray(r.offset + from, r.offset + to)]), last));
      }
      from = to;
    }
    return out;
  });
  // Simple replies go whole (header and data are one reply); chunks of different replies interleave.
  const units: Buffer[][] = sr ? queues.map((q) => q.map((b) => b)) : queues.map((q) => [Buffer.concat(q)]);
  const out: Buffer[] = [];
  let k = 0;
  while (units.some((u) => u.length > 0)) {
    const live = units.map((u, i) => (u.length > 0 ? i : -1)).filter((i) => i >= 0);
    const pick = live[(layout.picks[k++ % Math.max(1, layout.picks.length)] ?? 0) % live.length]!;
    out.push(units[pick]!.shift()!);
  }
  return { stream: Buffer.concat(out), expected, dataBytes };
}

/** A fake server that reads `count` READs, then answers them all as `layout` says. */
async function choreographed(count: number, sr: boolean, layout: Layout) {
  let expected = new Map<bigint, Buffer>();
  let dataBytes = 0;
  const { port } = await fakeServer(async (p) => {
    await serveHandshake(p, { sr, size: FAKE_DISK.length });
    const reqs: FakeRequest[] = [];
    while (reqs.length < count) reqs.push(await readRequest(p));
    const r = replies(reqs, sr, layout);
    expected = r.expected;
    dataBytes = r.dataBytes;
    await writeFragmented(p, r.stream, layout.fragments);
  });
  return { port, expected: () => expected, dataBytes: () => dataBytes };
}

describe('the direct receive path against a choreographed server', () => {
  it('reassembles 32 reads answered out of order, each split into data and hole chunks interleaved with the others', async () => {
    const pieces: Layout['pieces'] = [
      [[0.25, false], [0.5, true], [0.9, false]],
      [[0.1, true]],
      [[0.5, false]],
      [],
      [[0.3, false], [0.31, true], [0.6, false], [0.99, false]],
    ];
    const layout: Layout = { pieces, picks: [5, 3, 17, 2, 11, 29, 7, 1, 13], fragments: [1, 19, 65_537, 700_000, 20, 4096, 300_000] };
    const lengths = [1, 3, 4 * KiB, 100 * KiB, MiB + 7, 2 * MiB, 33, DIRECT_MIN + 1];
    const srv = await choreographed(32, true, layout);
    const c = await open({ host: '127.0.0.1', port: srv.port });
    const reads = Array.from({ length: 32 }, (_, i) => {
      const length = lengths[i % lengths.length]!;
      const offset = (i * 1_234_567) % (FAKE_DISK.length - length);
      return guardedRead(c, offset, length);
    });
    const got = await Promise.all(reads);
    const want = srv.expected();
    // Cookies are issued 1, 2, 3... in the order of the calls.
    got.forEach((g, i) => expect(g.equals(want.get(BigInt(i + 1))!), `read ${i}`).toBe(true));
    expect(c.readBytes.direct).toBeGreaterThan(0);
    expect(c.readBytes.copied).toBeGreaterThan(0);
  });

  for (const sr of [true, false]) {
    it(`fails the READ cut off in the middle of its payload, and every other request in flight, with a clear error (${sr ? 'structured' : 'simple'} replies)`, async () => {
      const { port } = await fakeServer(async (p) => {
        await serveHandshake(p, { sr, size: FAKE_DISK.length });
        const big = await readRequest(p);
        await readRequest(p);
        await readRequest(p);
        const head = sr
          ? chunk(big.cookie, ReplyType.OFFSET_DATA, Buffer.concat([be(8, big.offset), FAKE_DISK.subarray(big.offset, big.offset + big.length)]), true)
          : Buffer.concat([simpleReply(big.cookie), FAKE_DISK.subarray(big.offset, big.offset + big.length)]);
        // The header and the first MiB of the 4 MiB payload, then the end of the stream.
        p.sock.end(head.subarray(0, (sr ? 28 : 16) + MiB));
      });
      const c = await open({ host: '127.0.0.1', port });
      const big = c.pread(4 * MiB, 1000);
      const small = c.pread(4 * KiB, 0);
      const flush = c.flush();
      const err = await rejection(big);
      expect(err).toBeInstanceOf(NbdConnectionError);
      expect(err).toMatchObject({ code: 'ECONNRESET' });
      expect(err.message).toMatch(/closed the connection 3145728 bytes before the end of a READ reply with 3 requests in flight/);
      expect(await rejection(small)).toBe(err);
      expect(await rejection(flush)).toBe(err);
      expect(await c.closed).toBe(err);
      // The first MiB went past the scratch read straight into the buffer before the stream ended.
      expect(c.readBytes.direct).toBeGreaterThan(0);
      expect(c.readBytes.direct + c.readBytes.copied).toBe(MiB);
      expect(await rejection(c.pread(1, 0))).toMatchObject({ code: 'ENOTCONN' });
    });
  }

  for (const [what, shift] of [['past its end', 512 * KiB], ['before its start', -4096]] as const) {
    it(`never writes a data chunk that reaches ${what} outside the caller's buffer, nor reads it in place: the connection fails with a protocol error`, async () => {
      const { port } = await fakeServer(async (p) => {
        await serveHandshake(p, { sr: true, size: FAKE_DISK.length });
        const r = await readRequest(p);
        const from = r.offset + shift;
        p.write(chunk(r.cookie, ReplyType.OFFSET_DATA, Buffer.concat([be(8, from), FAKE_DISK.subarray(from, from + r.length)]), true));
      });
      const c = await open({ host: '127.0.0.1', port });
      const GUARD = 1024 * KiB;
      const whole = Buffer.alloc(GUARD + MiB + GUARD, 0xa5);
      const err = await rejection(c.pread(whole.subarray(GUARD, GUARD + MiB), 2 * MiB));
      expect(err).toMatchObject({ name: 'NbdProtocolError' });
      expect(err.message).toMatch(/outside the request 2097152\+1048576/);
      // The part of the chunk inside the request may have been copied before the rest was seen (the
      // read fails, so its buffer holds nothing promised); nothing outside the buffer is touched, and
      // nothing of the chunk was read in place.
      expect(whole.subarray(0, GUARD).every((b) => b === 0xa5), 'memory before the buffer was written').toBe(true);
      expect(whole.subarray(GUARD + MiB).every((b) => b === 0xa5), 'memory after the buffer was written').toBe(true);
      expect(c.readBytes.direct).toBe(0);
      expect(await c.closed).toBe(err);
    });
  }

  it('keeps every read equal to the model whatever the server\'s chunking, interleaving and fragmentation (property)', async () => {
    const read = fc.record({ offset: fc.nat({ max: FAKE_DISK.length - 1 }), length: fc.integer({ min: 1, max: MiB + 5 }) });
    const layout = fc.record({
      pieces: fc.array(fc.array(fc.tuple(fc.double({ min: 0, max: 1, noNaN: true }), fc.boolean()), { maxLength: 4 }).map((p) => p.sort((a, b) => a[0] - b[0])), { minLength: 1, maxLength: 4 }),
      picks: fc.array(fc.nat({ max: 64 }), { minLength: 1, maxLength: 8 }),
      fragments: fc.array(fc.oneof(fc.integer({ min: 1, max: 64 }), fc.integer({ min: 1, max: 400_000 })), { minLength: 1, maxLength: 6 }),
    });
    await fc.assert(
      fc.asyncProperty(fc.array(read, { minLength: 1, maxLength: 8 }), layout, fc.boolean(), async (reads, lay, sr) => {
        const srv = await choreographed(reads.length, sr, lay);
        const c = await connect({ host: '127.0.0.1', port: srv.port });
        try {
          const got = await Promise.all(
            reads.map((r) => {
              const length = Math.min(r.length, FAKE_DISK.length - r.offset);
              return c.pread(length, r.offset);
            }),
          );
          const want = srv.expected();
          got.forEach((g, i) => expect(g.equals(want.get(BigInt(i + 1))!), `read ${i}`).toBe(true));
          // Every data byte was placed once, either way; holes are filled, not received.
          expect(c.readBytes.direct + c.readBytes.copied).toBe(srv.dataBytes());
        } finally {
          await c.close();
          await closeFakeServers();
        }
      }),
      { numRuns: 30 },
    );
  });
});

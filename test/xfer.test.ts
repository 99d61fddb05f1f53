// The transfer layer in one process, on files: layout, the send/recv flows, cleanup, gc, the
// process ID table and segment pool limits, and torn, stale or corrupt reads refused rather
// than delivered. The CLI and real NBD servers are in xfer-cli.test.ts.
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { Readable } from 'node:stream';
import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { BLOCK, Command, MCB, PTR, PtrFlag, Role, SEC, SEG, SEG_HEADER, Status } from '../src/xfer/layout.js';
import { xxh64 } from '@node-rs/xxhash';
import { crc32c } from '@node-rs/crc32';
import { XferCorruptError, XferFormatError, XferPathError, XferPeerError, XferTableFullError, XferUsageError } from '../src/xfer/errors.js';
import { XferVolume, formatVolume, perPathInFlight } from '../src/xfer/volume.js';
import { send, sendMessages, pieces } from '../src/xfer/sender.js';
import { recv } from '../src/xfer/receiver.js';
import { gc } from '../src/xfer/gc.js';
import { describe as describeVolume } from '../src/xfer/inspect.js';
import { PathSet, openPath, type XferPath } from '../src/xfer/paths.js';
import { BufferPool } from '../src/xfer/pool.js';
import { HUGE_PAGE, isAligned } from '../src/blockdev/native.js';
import { FAST, HookedPath, exchange, formattedFiles, volumeOf } from './helpers/xfer.js';

const SMALL = { segSize: 8192, segments: 8, maxConn: 2 };
const freePtrTable = (slot: number) => ({ slot, token: 0, writer: 0, entries: Array.from({ length: 128 }, () => ({ flag: 0, last: 0, dev: 0, offset: 0, length: 0, seq: 0, msg: 0, part: 0 })) });
const freeAckTable = (slot: number) => ({ slot, token: 0, reader: 0, entries: Array.from({ length: 128 }, () => ({ flag: 0, last: 0, seq: 0, msg: 0, part: 0 })) });

async function allFree(vol: XferVolume): Promise<void> {
  const r = await describeVolume(vol);
  expect(r.connections.map((c) => [c.state, c.segmentsInUse, c.pointers.length])).toEqual(r.connections.map(() => ['free', 0, 0]));
}

describe('xfer layout', () => {
  it('writes MAS_EMC on the first device and SEC_EMC naming the same volume on the others', async () => {
    const files = await formattedFiles(SMALL, 3);
    const vol = await volumeOf(files);
    const heads = await Promise.all(files.map(async (f) => (await openPath(f)).read(0, BLOCK)));
    const mcb = MCB.decode('master', heads[0]!);
    expect(mcb).toMatchObject({ segSize: 8192, segments: 8, maxConn: 2, devices: 3, entries: 12 });
    expect(heads.slice(1).map((h) => SEC.decode('sec', h).index)).toEqual([1, 2]);
    expect(heads.slice(1).every((h) => SEC.decode('sec', h).volume.equals(mcb.volume))).toBe(true);
    // Slot 0 owns the 8 master segments and 4 of device 1; slot 1 the rest.
    expect(vol.segments(0).map((s) => s.dev)).toEqual([0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1]);
    expect(vol.segments(1).map((s) => s.dev)).toEqual([1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2]);
    await vol.close();
  });

  it('refuses a device without an MCB, a secondary of another volume, and a missing secondary', async () => {
    const [blank] = await formattedFiles(SMALL).then(async (f) => {
      const p = await openPath(f[0]!);
      await p.write(0, Buffer.alloc(BLOCK));
      await p.close();
      return f;
    });
    await expect(volumeOf([blank!])).rejects.toThrow(/is not a transfer device \(it starts with zeroes, neither "MAS_EMC" nor "SEC_EMC"\): format it/);
    const one = await formattedFiles(SMALL, 2);
    const other = await formattedFiles(SMALL, 2);
    await expect(volumeOf([one[0]!, other[1]!])).rejects.toThrow(/is a secondary device of another volume/);
    await expect(volumeOf([one[0]!])).rejects.toThrow(/secondary device 1 of the volume has no path among --dev/);
    await expect(volumeOf([one[1]!])).rejects.toThrow(XferFormatError);
  });

  it('refuses a geometry that does not fit, and two arguments that are one device', async () => {
    const files = await formattedFiles(SMALL, 1, 1 << 20);
    await expect(formatVolume(files, { segSize: 1 << 20, segments: 64, maxConn: 4 })).rejects.toThrow(/needs \d+ \(tables and 64 segments/);
    await expect(formatVolume(files, { segSize: 1000, segments: 4, maxConn: 1 })).rejects.toThrow(XferUsageError);
    await expect(formatVolume(files, { segSize: 4096, segments: 2, maxConn: 4 })).rejects.toThrow(/fewer than --max-conn/);
    await expect(formatVolume(files, { segSize: 4096, segments: 200, maxConn: 1 })).rejects.toThrow(/at most 128/);
    await expect(formatVolume([files[0]!, files[0]!], { segSize: 4096, segments: 4, maxConn: 1 })).rejects.toThrow(/overwritten by another argument/);
  });

  it('cuts input into segment-sized pieces and marks only the final one last', async () => {
    const sizes = async (chunks: number[], cap: number) => {
      const out: [number, boolean][] = [];
      for await (const p of pieces(Readable.from(chunks.map((n) => Buffer.alloc(n, 7))), cap)) out.push([p.length, p.last]);
      return out;
    };
    expect(await sizes([], 10)).toEqual([[0, true]]);
    expect(await sizes([10], 10)).toEqual([[10, true]]);
    expect(await sizes([3, 7, 1], 10)).toEqual([[10, false], [1, true]]);
    expect(await sizes([25], 10)).toEqual([[10, false], [10, false], [5, true]]);
  });
});

describe('xfer segment buffers', () => {
  /** Bytes of this process's mappings that carry madvise(MADV_HUGEPAGE) ("hg" in smaps' VmFlags). */
  const advisedBytes = () => {
    let total = 0;
    let size = 0;
    for (const line of fs.readFileSync('/proc/self/smaps', 'utf8').split('\n')) {
      if (line.startsWith('Size:')) size = Number(line.split(/\s+/)[1]) * 1024;
      else if (line.startsWith('VmFlags:') && line.split(/\s+/).includes('hg')) total += size;
    }
    return total;
  };

  it('gives segments of 2 MiB and more on 2 MiB boundaries, advised for huge pages, and warms them ready for reuse', () => {
    const before = advisedBytes();
    const pool = new BufferPool(4 << 20, false, 3);
    pool.warm(5); // at most what the pool keeps
    expect(pool.ready).toBe(3);
    const bufs = [pool.take(), pool.take(), pool.take()];
    expect(pool.ready).toBe(0);
    for (const b of bufs) {
      expect(b.length).toBe(4 << 20);
      expect(isAligned(b, HUGE_PAGE)).toBe(true);
      // Touched when warmed: the pages are there, zero-filled.
      expect(b[0]! | b[b.length - 1]!).toBe(0);
    }
    expect(advisedBytes() - before).toBeGreaterThanOrEqual(3 * (4 << 20));
    for (const b of bufs) pool.give(b);
    expect(pool.ready).toBe(3);
    expect(pool.take()).toBe(bufs[2]);
    // Smaller segments stay ordinary buffers (block-aligned for O_DIRECT paths).
    const small = new BufferPool(1 << 20, true, 2);
    const s = small.take();
    expect([s.length, isAligned(s, BLOCK), isAligned(s, HUGE_PAGE) && isAligned(small.take(), HUGE_PAGE)]).toEqual([1 << 20, true, false]);
  });
});

describe('xfer flows', () => {
  it('delivers messages of any size exactly once, in order and intact, and leaves every segment free', async () => {
    const files = await formattedFiles(SMALL, 2);
    const a = await volumeOf(files);
    const b = await volumeOf(files);
    const cap = a.capacity;
    const pool = 16 * a.mcb.segSize;
    await fc.assert(
      fc.asyncProperty(fc.oneof(fc.constantFrom(0, 1, cap - 1, cap, cap + 1, pool + 3), fc.integer({ min: 0, max: 3 * pool })), async (size) => {
        const data = randomBytes(size);
        const { sent, got, out } = await exchange(a, b, data);
        expect(out.equals(data)).toBe(true);
        expect(got.segments).toBe(Math.max(1, Math.ceil(size / cap)));
        expect(sent.segments).toBe(got.segments);
        await allFree(a);
      }),
      { numRuns: 12 },
    );
    await a.close();
    await b.close();
  });

  it('runs as many concurrent connections as the table holds, each to its own receiver', async () => {
    const files = await formattedFiles({ segSize: 8192, segments: 12, maxConn: 3 });
    const vols = await Promise.all(Array.from({ length: 6 }, () => volumeOf(files)));
    const msgs = [0, 1, 2].map((i) => randomBytes(20_000 + i * 9_000));
    // Three senders claim at once; only when all three hold a slot do the receivers start.
    const sends = msgs.map((m, i) => send(vols[2 * i]!, 10 + i, 20 + i, Readable.from([m]), FAST));
    await waitFor(async () => (await vols[0]!.readPidTable()).every((e) => e.req.command.status === Status.PENDING));
    const table = await vols[0]!.readPidTable();
    expect(table.map((e) => e.req.requestor).sort()).toEqual([10, 11, 12]);
    const outs = msgs.map(() => [] as Buffer[]);
    const got = await Promise.all(msgs.map((_, i) => recv(vols[2 * i + 1]!, 20 + i, async (d) => void outs[i]!.push(Buffer.from(d)), FAST)));
    await Promise.all(sends);
    outs.forEach((o, i) => expect(Buffer.concat(o).equals(msgs[i]!)).toBe(true));
    expect(got.map((g) => g.from)).toEqual([10, 11, 12]);
    await allFree(vols[0]!);
    await Promise.all(vols.map((v) => v.close()));
  });

  it('keeps 16 MiB of segment I/O in flight per path on each side: 4 segments of 4 MiB, 8 of 1 MiB, 1 of 64 MiB', async () => {
    expect([4 << 20, 1 << 20, 64 << 20, 8192].map(perPathInFlight)).toEqual([4, 8, 1, 8]);
    const SEG = 4 << 20;
    const files = await formattedFiles({ segSize: SEG, segments: 16, maxConn: 1 }, 1, 80 << 20);
    // Segment I/Os (header and data, whole) at once on the one path of each side, at their peak.
    const peaks = { write: 0, read: 0 };
    const counting = (p: XferPath): XferPath => {
      const now = { write: 0, read: 0 };
      const track = async <T>(op: 'write' | 'read', length: number, io: () => Promise<T>): Promise<T> => {
        if (length < SEG / 2) return io();
        peaks[op] = Math.max(peaks[op], ++now[op]);
        try {
          return await io();
        } finally {
          now[op]--;
        }
      };
      return Object.assign(Object.create(p) as XferPath, {
        read: (offset: number, length: number, dest?: Buffer) => track('read', length, () => p.read(offset, length, dest)),
        write: (offset: number, data: Buffer) => track('write', data.length, () => p.write(offset, data)),
      });
    };
    const a = await volumeOf(files, counting);
    const b = await volumeOf(files, counting);
    expect([a.inFlight, b.inFlight]).toEqual([4, 4]);
    const data = randomBytes(8 * a.capacity + 1);
    const { out } = await exchange(a, b, data);
    expect(out.equals(data)).toBe(true);
    expect(peaks.write).toBeGreaterThan(1);
    expect(peaks.write).toBeLessThanOrEqual(4);
    expect(peaks.read).toBeLessThanOrEqual(4);
    await a.close();
    await b.close();
  });

  it('makes a sender wait for a full segment pool: it reuses a segment only after its acknowledgement', async () => {
    const files = await formattedFiles({ segSize: 4096, segments: 2, maxConn: 1 });
    const a = await volumeOf(files);
    const writes: number[] = [];
    const b = await volumeOf(files, (p) => new HookedPath(p, { write: (off) => void writes.push(off) }));
    const data = randomBytes(40 * a.capacity + 5);
    const { out } = await exchange(a, b, data);
    expect(out.equals(data)).toBe(true);
    // The receiver acknowledged at least once per two segments: the sender had to wait for it.
    expect(writes.filter((o) => o === a.mcb.ackTables).length).toBeGreaterThanOrEqual(20);
    await a.close();
    await b.close();
  });

  it('answers a full process ID table with a clear error after the wait', async () => {
    const files = await formattedFiles({ segSize: 8192, segments: 4, maxConn: 1 });
    const a = await volumeOf(files);
    const ac = new AbortController();
    const first = send(a, 1, 2, Readable.from([Buffer.alloc(10)]), { ...FAST, signal: ac.signal });
    first.catch(() => undefined);
    await waitFor(async () => (await a.readPid(0)).req.command.code === Command.CONNECT);
    await expect(send(a, 3, 4, Readable.from([Buffer.alloc(10)]), { ...FAST, timeoutMs: 100 })).rejects.toThrow(XferTableFullError);
    ac.abort(new Error('test over'));
    await expect(first).rejects.toThrow('test over');
    await allFree(a);
    await a.close();
  });

  it('lets a sender whose claim was overwritten by a rival back off without writing, and claim another slot', async () => {
    const files = await formattedFiles(SMALL);
    const rivalVol = await volumeOf(files);
    const rival = { slot: 0, role: Role.REQUESTOR, requestor: 9, requestee: 8, token: 4242, heartbeat: 1, command: { code: Command.CONNECT, status: Status.NONE } };
    let landed = false;
    let pendingSeen = false;
    let a: XferVolume | undefined;
    a = await volumeOf(files, (p) =>
      new HookedPath(p, {
        write: (off, data) => {
          // byte 33: the command status of a PID_EMC entry (see layout.ts)
          if (a && off === a.mcb.pidTable && data[33] === Status.PENDING) pendingSeen = true;
        },
        // Right after our PENDING, a rival's claim of slot 0 lands (it read the slot as free too).
        read: async (off, data) => {
          if (!a || landed || !pendingSeen || off !== a.mcb.pidTable || data.length !== 2 * BLOCK) return undefined;
          landed = true;
          await rivalVol.writePid(rival);
          return p.read(off, data.length);
        },
      }),
    );
    const b = await volumeOf(files);
    const data = randomBytes(50_000);
    const { sent, out } = await exchange(a, b, data);
    expect(landed).toBe(true);
    expect(sent.slot).toBe(1);
    expect(out.equals(data)).toBe(true);
    expect((await a.readPid(0)).req).toMatchObject({ token: 4242, requestor: 9 });
    await Promise.all([a.close(), b.close(), rivalVol.close()]);
  });

  it('has a waiting receiver that sees a claim for it settling look again within a millisecond, not a poll interval later', async () => {
    const files = await formattedFiles(SMALL);
    const a = await volumeOf(files);
    const b = await volumeOf(files);
    const data = randomBytes(30_000);
    // The sender's claim settles for 5 poll intervals of 100 ms; the receiver polls once a minute.
    const sending = send(a, 1, 2, Readable.from([data]), { ...FAST, pollMs: 100 });
    await waitFor(async () => (await b.readPidTable()).some((e) => e.req.command.code === Command.CONNECT && e.req.command.status === Status.NONE));
    const parts: Buffer[] = [];
    // It sees the claim on its first look, before PENDING; a minute's sleep after that would
    // outlast this test's time limit.
    const got = await recv(b, 2, async (d) => void parts.push(Buffer.from(d)), { ...FAST, pollMs: 60_000 });
    await sending;
    expect(Buffer.concat(parts).equals(data)).toBe(true);
    expect(got.from).toBe(1);
    await allFree(a);
    await a.close();
    await b.close();
  }, 20_000);

  it('has a waiting receiver touch its segment buffers one per look at the table, and accept a sender found at its first look before touching any', async () => {
    const files = await formattedFiles(SMALL);
    const spyOn = (v: XferVolume) => {
      const seen = { pool: undefined as BufferPool | undefined, readyAtLooks: [] as number[], readyAtAccept: -1 };
      const segmentPool = v.segmentPool.bind(v);
      v.segmentPool = (keep) => (seen.pool ??= segmentPool(keep));
      const readPidTable = v.readPidTable.bind(v);
      v.readPidTable = async () => {
        seen.readyAtLooks.push(seen.pool?.ready ?? 0);
        return readPidTable();
      };
      const writeAck = v.writeAck.bind(v);
      v.writeAck = async (ack) => {
        if (seen.readyAtAccept < 0) seen.readyAtAccept = seen.pool?.ready ?? 0;
        return writeAck(ack);
      };
      return seen;
    };
    // A sender already PENDING: accepted at the first look, nothing touched before.
    const a = await volumeOf(files);
    const b = await volumeOf(files);
    const data = randomBytes(20_000);
    const first = spyOn(b);
    const sending = send(a, 1, 2, Readable.from([data]), FAST);
    await waitFor(async () => (await a.readPidTable()).some((e) => e.req.command.status === Status.PENDING));
    const parts: Buffer[] = [];
    await recv(b, 2, async (d) => void parts.push(Buffer.from(d)), FAST);
    await sending;
    expect(Buffer.concat(parts).equals(data)).toBe(true);
    expect(first.readyAtAccept).toBe(0);
    // No sender yet: a buffer more per look, up to the pool's size, then the sender is served.
    const c = await volumeOf(files);
    const waiting = spyOn(c);
    const parts2: Buffer[] = [];
    const receiving = recv(c, 2, async (d) => void parts2.push(Buffer.from(d)), FAST);
    // The receiver's pool: a segment read ahead per entry of the window, and two more.
    const full = Math.max(1, Math.min(c.mcb.entries, c.inFlight)) + 2;
    await waitFor(async () => waiting.pool?.ready === full);
    await send(a, 1, 2, Readable.from([data]), FAST);
    await receiving;
    expect(Buffer.concat(parts2).equals(data)).toBe(true);
    const looks = waiting.readyAtLooks;
    expect(looks.slice(0, full + 1)).toEqual(Array.from({ length: full + 1 }, (_, i) => i));
    await allFree(a);
    await Promise.all([a.close(), b.close(), c.close()]);
  });

  it('tells a sender whose receiver never comes to start one, and frees its slot', async () => {
    const files = await formattedFiles(SMALL);
    const a = await volumeOf(files);
    await expect(send(a, 1, 2, Readable.from([Buffer.alloc(10)]), { ...FAST, timeoutMs: 100 })).rejects.toThrow(/no receiver 2 accepted connection 0 .*start blockmirror xfer recv --as 2/);
    await allFree(a);
    await a.close();
  });
});

describe('xfer refuses what does not check out', () => {
  /** A receiver volume whose reads of the first segment come back damaged `times` times. */
  async function damagedFirstSegment(times: number, damage: (b: Buffer) => void) {
    const files = await formattedFiles(SMALL);
    const a = await volumeOf(files);
    let left = times;
    const seg0 = a.segments(0)[0]!.offset;
    const b = await volumeOf(files, (p) =>
      new HookedPath(p, {
        read: (off, data) => {
          if (off !== seg0 || left === 0) return undefined;
          left--;
          const copy = Buffer.from(data);
          damage(copy);
          return copy;
        },
      }),
    );
    return { a, b, reads: () => times - left };
  }

  it("sums each segment's data with xxHash64 (version 3): the header holds its low 32 bits", async () => {
    const files = await formattedFiles(SMALL);
    const a = await volumeOf(files);
    const b = await volumeOf(files);
    const data = randomBytes(a.capacity + 100);
    const { out } = await exchange(a, b, data);
    expect(out.equals(data)).toBe(true);
    // The segments stay on the volume after the transfer: part 0, then part 1 of the message.
    for (const [i, part] of [data.subarray(0, a.capacity), data.subarray(a.capacity)].entries()) {
      const seg = await a.readSegment(a.segments(0)[i]!, part.length);
      const h = SEG.decode('segment', seg);
      expect(h.dataLength).toBe(part.length);
      expect(seg.readUInt16LE(8)).toBe(3);
      expect(h.dataSum).toBe(Number(xxh64(part) & 0xffffffffn));
      expect(h.dataSum).not.toBe(crc32c(part) >>> 0);
    }
    await a.close();
    await b.close();
  });

  it('reads a torn segment again later and delivers it intact', async () => {
    const { a, b, reads } = await damagedFirstSegment(5, (c) => (c[SEG_HEADER + 3]! ^= 1));
    const data = randomBytes(30_000);
    const { out } = await exchange(a, b, data);
    expect(reads()).toBe(5);
    expect(out.equals(data)).toBe(true);
    await a.close();
    await b.close();
  });

  it.each([
    ['a header whose checksum fails', (c: Buffer) => (c[20]! ^= 0xff), /segment 0 \(seq 1\) of connection 0 header: fails its checksum/],
    ['data that fails the header checksum', (c: Buffer) => (c[SEG_HEADER]! ^= 0xff), /its data fails the header's checksum/],
    ['a header of another sequence number', (c: Buffer) => c.fill(0, 0, SEG_HEADER), /header: is not a segment header/],
  ])('refuses %s after its retries, delivering and acknowledging nothing', async (_, damage, message) => {
    const { a, b } = await damagedFirstSegment(Infinity, damage);
    const got: Buffer[] = [];
    const sender = send(a, 1, 2, Readable.from([randomBytes(30_000)]), FAST);
    sender.catch(() => undefined);
    const err = await recv(b, 2, async (d) => void got.push(d), FAST).catch((e: Error) => e);
    expect(err).toBeInstanceOf(XferCorruptError);
    expect((err as Error).message).toMatch(message);
    expect((err as Error).message).toContain('refused after 20 reads (nothing of it was delivered or acknowledged)');
    expect(got).toEqual([]);
    await expect(sender).rejects.toThrow(XferPeerError);
    await allFree(a);
    await a.close();
    await b.close();
  });

  it('reads a torn table again at once: the acknowledgement, pointer and process ID tables each come back torn a few times, and the transfer goes on intact', async () => {
    const files = await formattedFiles(SMALL);
    const probe = await volumeOf(files);
    const { ackTables, ptrTables, pidTable } = probe.mcb;
    await probe.close();
    // Each read of a table, on either side, comes back torn (a flipped byte, as a read racing a
    // write sees) up to 4 times in a row, then whole: fewer than the re-reads the volume allows.
    const torn = new Map<number, number>();
    const tear = (off: number, data: Buffer) => {
      if (off !== ackTables && off !== ptrTables && off !== pidTable) return undefined;
      const n = torn.get(off) ?? 0;
      if (n % 5 === 4) {
        torn.set(off, n + 1);
        return undefined;
      }
      torn.set(off, n + 1);
      const copy = Buffer.from(data);
      copy[40]! ^= 1;
      return copy;
    };
    const a = await volumeOf(files, (p) => new HookedPath(p, { read: tear }));
    const b = await volumeOf(files, (p) => new HookedPath(p, { read: tear }));
    const data = randomBytes(20 * a.capacity + 17);
    const { out } = await exchange(a, b, data);
    expect(out.equals(data)).toBe(true);
    for (const off of [ackTables, ptrTables, pidTable]) expect(torn.get(off), `table at ${off}`).toBeGreaterThan(4);
    await allFree(a);
    await a.close();
    await b.close();
  });

  it('refuses a pointer table that fails its checksum, and a pointer entry aimed at another segment', async () => {
    for (const [damage, message] of [
      [(c: Buffer) => (c[40]! ^= 1), /pointer table of connection 0: fails its checksum/],
      [
        (c: Buffer) => {
          const t = PTR.decode('t', c);
          if (t.entries[0]!.flag === PtrFlag.WRITTEN) t.entries[0]!.offset += BLOCK;
          PTR.encode(t, c);
        },
        /pointer entry 0 \(seq 1\) of connection 0 points at device 0 offset \d+, not at its segment/,
      ],
      [
        // A damaged entry under a checksum that holds: read (lazily) and refused like the others.
        (c: Buffer) => {
          if (PTR.decode('t', c).entries[0]!.flag !== PtrFlag.WRITTEN) return;
          PTR.patch(c, 0, { flag: 9, last: 0, dev: 0, offset: 0, length: 0, seq: 1, msg: 1, part: 0 });
        },
        /pointer table of connection 0: entry 0 has flag 9, last 0: damaged; refused after/,
      ],
    ] as const) {
      const files = await formattedFiles(SMALL);
      const a = await volumeOf(files);
      const b = await volumeOf(files, (p) => new HookedPath(p, { read: (off, data) => (off === a.mcb.ptrTables ? (damage(data), data) : undefined) }));
      const got: Buffer[] = [];
      const sender = send(a, 1, 2, Readable.from([randomBytes(10_000)]), FAST);
      sender.catch(() => undefined);
      await expect(recv(b, 2, async (d) => void got.push(d), FAST)).rejects.toThrow(message);
      expect(got).toEqual([]);
      // The receiver refused the transfer: the sender hears it, it does not end as if delivered.
      await expect(sender).rejects.toThrow(XferPeerError);
      await a.close();
      await b.close();
    }
  });

  it('never crashes on arbitrary bytes: every decoder throws only XferFormatError', async () => {
    const { ACK, PID, SDT, SEG } = await import('../src/xfer/layout.js');
    const all = [MCB, SEC, SDT, PID, PTR, ACK, SEG];
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: BLOCK + 16 }), fc.nat(all.length - 1), fc.boolean(), (bytes, k, withMagic) => {
        const s = all[k]!;
        const buf = Buffer.from(bytes);
        if (withMagic && buf.length >= 8) Buffer.from(s.magic.padEnd(8, '\0'), 'latin1').copy(buf);
        try {
          s.decode('fuzz', buf);
        } catch (e) {
          expect(e).toBeInstanceOf(XferFormatError);
        }
      }),
      { numRuns: 2000 },
    );
  });

  it('refuses a valid-checksum structure whose fields are out of range, and any single flipped bit', () => {
    const good = PTR.encode({ slot: 0, token: 5, writer: 1, entries: Array.from({ length: 128 }, () => ({ flag: 0, last: 0, dev: 0, offset: 0, length: 0, seq: 0, msg: 0, part: 0 })) });
    fc.assert(
      fc.property(fc.nat(PTR.size * 8 - 1), (bit) => {
        const b = Buffer.from(good);
        b[bit >> 3]! ^= 1 << (bit & 7);
        expect(() => PTR.decode('flip', b)).toThrow(XferFormatError);
      }),
      { numRuns: 500 },
    );
    const bad = PTR.encode({ slot: 0, token: 5, writer: 1, entries: Array.from({ length: 128 }, (_, i) => ({ flag: i === 7 ? 9 : 0, last: 0, dev: 0, offset: 0, length: 0, seq: 0, msg: 0, part: 0 })) });
    expect(() => PTR.decode('pointer table', bad)).toThrow('pointer table: entry 7 has flag 9, last 0: damaged');
  });

  it('patches entries of an encoded table into exactly the bytes a whole encode gives, and views it as decode reads it', async () => {
    const { ACK } = await import('../src/xfer/layout.js');
    const u32 = fc.nat(0xffffffff);
    const ptrEntry = fc.record({ flag: fc.constantFrom(0, 1), last: fc.nat(3), dev: fc.nat(64), offset: fc.nat(2 ** 40), length: u32, seq: u32, msg: u32, part: u32 });
    const ackEntry = fc.record({ flag: fc.constantFrom(0, 2), last: fc.nat(3), seq: u32, msg: u32, part: u32 });
    for (const [table, entry, peer] of [
      [PTR, ptrEntry, 'writer'],
      [ACK, ackEntry, 'reader'],
    ] as const) {
      fc.assert(
        fc.property(fc.nat(0xffff), u32, u32, fc.array(fc.tuple(fc.nat(127), entry), { maxLength: 20 }), (slot, token, id, changes) => {
          const model = { ...(table === PTR ? freePtrTable(slot) : freeAckTable(slot)), token, [peer]: id };
          const block = (table as typeof PTR).encode(model as never);
          for (const [i, e] of changes) {
            (table as typeof PTR).patch(block, i, e as never);
            model.entries[i] = e as never;
          }
          expect(block.equals((table as typeof PTR).encode(model as never))).toBe(true);
          const whole = (table as typeof PTR).decode('t', block);
          const view = (table as typeof PTR).view('t', block);
          expect(view.head).toEqual({ slot, token, [peer]: id });
          for (const [i] of changes) expect(view.entry(i)).toEqual(whole.entries[i]);
          expect(view.entry(127)).toEqual(whole.entries[127]);
        }),
        { numRuns: 200 },
      );
    }
  });

  it('views a table only when decode would take it whole, and refuses a damaged entry when it is read', () => {
    const good = PTR.encode(freePtrTable(0));
    fc.assert(
      fc.property(fc.nat(PTR.size * 8 - 1), (bit) => {
        const b = Buffer.from(good);
        b[bit >> 3]! ^= 1 << (bit & 7);
        expect(() => PTR.view('flip', b)).toThrow(XferFormatError);
      }),
      { numRuns: 500 },
    );
    const bad = Buffer.from(good);
    PTR.patch(bad, 7, { flag: 9, last: 0, dev: 0, offset: 0, length: 0, seq: 0, msg: 0, part: 0 });
    const view = PTR.view('pointer table', bad);
    expect(view.entry(6).flag).toBe(PtrFlag.FREE);
    expect(() => view.entry(7)).toThrow('pointer table: entry 7 has flag 9, last 0: damaged');
    expect(() => view.entry(128)).toThrow(RangeError);
    expect(() => PTR.patch(bad, -1, view.entry(0))).toThrow(RangeError);
  });
});

describe('xfer paths and gc', () => {
  it('carries on over the other path when one fails mid-transfer, with no loss, duplication or reordering', async () => {
    const files = await formattedFiles(SMALL);
    let ops = 0;
    const dies = (p: Awaited<ReturnType<typeof openPath>>) =>
      new HookedPath(p, {
        read: () => {
          if (++ops > 40) throw new Error('path cut');
          return undefined;
        },
        write: () => {
          if (++ops > 40) throw new Error('path cut');
        },
      });
    const open2 = async (f: string) => XferVolume.fromPaths([dies(await openPath(f)), await openPath(f)]);
    const a = await open2(files[0]!);
    const b = await open2(files[0]!);
    const data = randomBytes(300_000);
    const { out } = await exchange(a, b, data);
    expect(out.equals(data)).toBe(true);
    expect(a.master.paths.map((p) => p.live)).toEqual([false, true]);
    expect(b.master.paths.map((p) => p.live)).toEqual([false, true]);
    await a.close();
    await b.close();
  });

  it('lets a failed path rejoin once it reconnects, and sends it work again', async () => {
    const files = await formattedFiles(SMALL);
    let down = true;
    let served = 0;
    const flaky = new HookedPath(await openPath(files[0]!), {
      read: () => {
        if (down) throw new Error('link down');
        served++;
        return undefined;
      },
      reconnect: () => !down,
    });
    const set = new PathSet('the master device', [flaky, await openPath(files[0]!)], undefined, 5);
    await set.read(0, BLOCK);
    expect(set.paths.map((p) => p.live)).toEqual([false, true]);
    down = false;
    await waitFor(async () => set.paths[0]!.live);
    await Promise.all(Array.from({ length: 8 }, () => set.read(0, BLOCK)));
    expect(served).toBeGreaterThan(0);
    await set.close();
  });

  it('fails with every path named when the last path to a device fails', async () => {
    const files = await formattedFiles(SMALL);
    let broken = false;
    const a = await volumeOf(files, (p) => new HookedPath(p, { read: () => { if (broken) throw new Error('cable pulled'); return undefined; } }));
    broken = true;
    await expect(a.readPidTable()).rejects.toThrow(XferPathError);
    await expect(a.readPidTable()).rejects.toThrow(/read on the master device: every path failed \(hooked .*dev0.img\)/);
    await a.close();
  });

  it('keeps trying a device whose every path is down for the failover time, and carries on when one comes back', async () => {
    const files = await formattedFiles(SMALL);
    let broken = false;
    let attempts = 0;
    const paths = await Promise.all([openPath(files[0]!), openPath(files[0]!)]);
    const hooked = paths.map(
      (p) =>
        new HookedPath(p, {
          read: () => {
            if (broken) throw new Error('master swapping');
            return undefined;
          },
          // The new master answers from the third attempt on.
          reconnect: () => ++attempts >= 3 && !(broken = false),
        }),
    );
    const a = await XferVolume.fromPaths(hooked, { graceMs: 60_000, rejoinMs: 60_000 });
    broken = true;
    const table = await a.readPidTable();
    expect(table).toHaveLength(SMALL.maxConn);
    expect(attempts).toBeGreaterThanOrEqual(3);
    expect(a.master.paths.some((p) => p.live)).toBe(true);
    await a.close();
  });

  it('moves messages byte for byte through files opened with O_DIRECT, the kernel says so for every path', async () => {
    // tmpfs refuses O_DIRECT: the files live on the root disk.
    const dir = fs.mkdtempSync('/var/tmp/bm-xfer-direct-');
    try {
      const files = [path.join(dir, 'dev0.img'), path.join(dir, 'dev1.img')];
      for (const f of files) {
        fs.writeFileSync(f, '');
        fs.truncateSync(f, 4 << 20);
      }
      await formatVolume(files, { segSize: 16384, segments: 8, maxConn: 1 }, { direct: true });
      const a = await XferVolume.open(files, { direct: true });
      const b = await XferVolume.open(files, { direct: true });
      expect([...a.devices, ...b.devices].map((d) => d.direct)).toEqual([true, true, true, true]);
      // Every descriptor this process holds on the files carries O_DIRECT.
      const target = (fd: string) => {
        try {
          return fs.readlinkSync(`/proc/self/fd/${fd}`, { encoding: 'utf8' });
        } catch {
          return ''; // the descriptor readdir itself used is closed by now
        }
      };
      const held = fs.readdirSync('/proc/self/fd').filter((fd) => files.includes(target(fd)));
      expect(held).toHaveLength(4);
      for (const fd of held) {
        const flags = parseInt(/^flags:\s+(\d+)/m.exec(fs.readFileSync(`/proc/self/fdinfo/${fd}`, 'utf8'))![1]!, 8);
        expect(flags & fs.constants.O_DIRECT, `fd ${fd}`).toBe(fs.constants.O_DIRECT);
      }
      // Sizes that are no multiple of a block: the data ends mid-block, the tables are single blocks.
      const msgs = [1, a.capacity + 1, 5 * a.capacity + 77].map((n) => randomBytes(n));
      const got: Buffer[][] = [];
      await Promise.all([
        sendMessages(a, 1, 2, msgs.map((m) => Readable.from([m])), FAST),
        recv(b, 2, async (d, p) => void (got[p.msg - 1] ??= []).push(Buffer.from(d)), FAST),
      ]);
      expect(got.map((parts) => Buffer.concat(parts))).toEqual(msgs);
      await allFree(a);
      await Promise.all([a.close(), b.close()]);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  it('reclaims the halves of dead processes after the timeout, and leaves a live sender alone', async () => {
    const files = await formattedFiles({ segSize: 8192, segments: 8, maxConn: 2 });
    const a = await volumeOf(files);
    // Slot 0: a sender that died after writing two segments and its pointer table.
    await a.writePid({ slot: 0, role: Role.REQUESTOR, requestor: 7, requestee: 8, token: 99, heartbeat: 3, command: { code: Command.CONNECT, status: Status.PENDING } });
    await a.writePid({ slot: 0, role: Role.REQUESTEE, requestor: 7, requestee: 8, token: 99, heartbeat: 1, command: { code: Command.CONNECT, status: Status.ACCEPTED } });
    const t = PTR.decode('t', PTR.encode({ slot: 0, token: 99, writer: 7, entries: Array.from({ length: 128 }, () => ({ flag: 0, last: 0, dev: 0, offset: 0, length: 0, seq: 0, msg: 0, part: 0 })) }));
    t.entries[0] = { flag: PtrFlag.WRITTEN, last: 0, dev: 0, offset: a.segments(0)[0]!.offset, length: 100, seq: 1, msg: 1, part: 0 };
    t.entries[1] = { flag: PtrFlag.WRITTEN, last: 0, dev: 0, offset: a.segments(0)[1]!.offset, length: 100, seq: 2, msg: 1, part: 1 };
    await a.writePtr(t);
    expect((await describeVolume(a)).connections[0]).toMatchObject({ state: 'connected', segmentsInUse: 2 });
    // Slot 1: a live sender waiting for its receiver, beating every 20 ms.
    const ac = new AbortController();
    const live = send(a, 1, 2, Readable.from([Buffer.alloc(1)]), { ...FAST, signal: ac.signal });
    live.catch(() => undefined);
    await waitFor(async () => (await a.readPid(1)).req.command.code === Command.CONNECT);
    const done = await gc(a, 200);
    expect(done).toEqual([
      { slot: 0, side: 'sender', id: 7, segments: 2 },
      { slot: 0, side: 'receiver', id: 8, segments: 0 },
    ]);
    const after = await describeVolume(a);
    expect(after.connections[0]).toMatchObject({ state: 'free', segmentsInUse: 0 });
    expect(after.connections[1]).toMatchObject({ state: 'connecting', requestor: 1, requestee: 2 });
    ac.abort(new Error('test over'));
    await expect(live).rejects.toThrow('test over');
    await a.close();
  });
});

async function waitFor(check: () => Promise<boolean>): Promise<void> {
  while (!(await check())) await new Promise((r) => setTimeout(r, 5));
}

// The S-VOL members' checksums (src/controller/svol/checksums.ts) and the member I/O around them
// (member-io.ts): what a write records, what a read catches, what a damaged file costs, a read
// racing a write, and a request that hangs past ioTimeout.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { pino } from 'pino';
import { describe, expect, it } from 'vitest';
import { FilterDevice } from '../src/blockdev/filter.js';
import { MemoryDevice } from '../src/blockdev/memory.js';
import type { Payload } from '../src/blockdev/types.js';
import { ChecksumTables, SUM_BLOCK } from '../src/controller/svol/checksums.js';
import { ChecksumMismatchError, MemberIo, MemberTimeoutError } from '../src/controller/svol/member-io.js';

const SIZE = 16 * SUM_BLOCK;

function logCapture(): { log: pino.Logger; lines: string[] } {
  const lines: string[] = [];
  return { log: pino({ level: 'warn' }, { write: (l: string) => lines.push(l) }), lines };
}

function pattern(len: number, seed: number): Buffer {
  const b = Buffer.alloc(len);
  for (let i = 0; i < len; i++) b[i] = (i * 31 + seed) & 0xff;
  return b;
}

describe('S-VOL member checksums', () => {
  it('records the blocks a write covers whole, from pieces that straddle blocks, and leaves the blocks it covers in part unchecked', () => {
    const t = new ChecksumTables(SIZE, undefined, pino({ level: 'silent' }));
    const data = pattern(3 * SUM_BLOCK, 7);
    // 100 bytes into block 1, to 100 bytes into block 4: blocks 2 and 3 whole, in three pieces.
    const at = SUM_BLOCK + 100;
    t.record(2, at, data.length, [data.subarray(0, 5000), data.subarray(5000, 9001), data.subarray(9001)]);
    expect(t.knownBlocks(2)).toBe(2);
    const image = Buffer.alloc(SIZE);
    data.copy(image, at);
    expect(t.check(2, 0, image)).toBeUndefined();
    image[3 * SUM_BLOCK + 17] ^= 1;
    expect(t.check(2, 0, image)).toMatchObject({ offset: 3 * SUM_BLOCK });
    // A flipped byte in a block written in part is not caught: its checksum is not known.
    image[3 * SUM_BLOCK + 17] ^= 1;
    image[SUM_BLOCK + 200] ^= 1;
    expect(t.check(2, 0, image)).toBeUndefined();
    // Zeroes (a trim or zero) are recorded without bytes.
    t.record(2, 8 * SUM_BLOCK, 2 * SUM_BLOCK, null);
    expect(t.check(2, 8 * SUM_BLOCK, Buffer.alloc(2 * SUM_BLOCK))).toBeUndefined();
    expect(t.check(2, 8 * SUM_BLOCK, Buffer.alloc(2 * SUM_BLOCK, 1))).toMatchObject({ offset: 8 * SUM_BLOCK });
    // A write starting makes its blocks unknown until it records them.
    t.forget(2, 8 * SUM_BLOCK + 1, 1);
    expect(t.check(2, 8 * SUM_BLOCK, Buffer.alloc(2 * SUM_BLOCK, 1))).toMatchObject({ offset: 9 * SUM_BLOCK });
  });

  it('saves and loads its tables; a damaged or foreign-sized file costs one warning and no checks, never the start', () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bm-svol-sums-'));
    try {
      const file = path.join(dir, 'g.sums');
      const a = new ChecksumTables(SIZE, file, pino({ level: 'silent' }));
      a.record(2, 0, SIZE, pattern(SIZE, 1));
      a.record(4, 0, SIZE, pattern(SIZE, 2));
      a.save(3, true);
      const b = new ChecksumTables(SIZE, file, pino({ level: 'silent' }));
      expect(b.load()).toEqual({ generation: 3, clean: true });
      expect(b.check(2, 0, pattern(SIZE, 1))).toBeUndefined();
      expect(b.check(4, 0, pattern(SIZE, 1))).toBeDefined();
      // After a crash the caller keeps only what cannot have changed: volume 2, blocks 0..7.
      b.keepOnly(new Map([[2, (blk: number) => blk < 8]]));
      expect([b.knownBlocks(2), b.knownBlocks(4)]).toEqual([8, 0]);

      const bytes = fs.readFileSync(file);
      bytes[bytes.length - 10] ^= 0xff;
      fs.writeFileSync(file, bytes);
      const { log, lines } = logCapture();
      const c = new ChecksumTables(SIZE, file, log);
      expect(c.load()).toBeUndefined();
      expect(c.knownBlocks(2)).toBe(0);
      expect(lines).toHaveLength(1);
      expect(lines[0]).toContain('the checksum tables are truncated or damaged; member reads are not checked until their blocks are written again');

      const d = new ChecksumTables(2 * SIZE, file, logCapture().log);
      expect(d.load()).toBeUndefined();
      fs.writeFileSync(file, 'not ours at all');
      const e = logCapture();
      expect(new ChecksumTables(SIZE, file, e.log).load()).toBeUndefined();
      expect(e.lines[0]).toContain('is not a blockmirror S-VOL checksum file');
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});

/** A volume whose reads can be made to return other bytes, and whose requests can be held. */
class Flaky extends FilterDevice {
  flip = false;
  /** Flip a bit of the next read only. */
  flipOnce = false;
  holdReads = false;
  holdWrites = false;
  held: (() => void)[] = [];

  override async read(offset: number, dest: Buffer): Promise<void> {
    if (this.holdReads) await new Promise<void>((r) => this.held.push(r));
    await super.read(offset, dest);
    if (this.flip || this.flipOnce) dest[0] ^= 1;
    this.flipOnce = false;
  }

  override async write(offset: number, data: Payload): Promise<void> {
    if (this.holdWrites) await new Promise<void>((r) => this.held.push(r));
    return super.write(offset, data);
  }

  release(): void {
    for (const r of this.held.splice(0)) r();
  }
}

describe('S-VOL member I/O', () => {
  it('fails a read whose bytes miss their checksum, also while the volume takes writes elsewhere, but not a read that raced a write to the same block', async () => {
    const dev = new Flaky(new MemoryDevice(SIZE));
    const io = new MemberIo(() => dev, new ChecksumTables(SIZE, undefined, pino({ level: 'silent' })), 0, SIZE);
    const data = pattern(SIZE, 3);
    await io.write(7, 0, SIZE, data, () => dev.write(0, data));
    const dest = Buffer.alloc(SUM_BLOCK);
    await io.read(7, 0, dest);
    expect(dest.equals(data.subarray(0, SUM_BLOCK))).toBe(true);

    dev.flip = true;
    const err = await io.read(7, 100, Buffer.alloc(10)).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(ChecksumMismatchError);
    expect(err).toMatchObject({ errno: 'EIO', vol: 7, at: 0, code: 'ECHECKSUM' });
    expect(io.mismatches).toBe(1);

    // A write to another block in flight (an RW member's destage writes all the time) excuses nothing.
    dev.holdWrites = true;
    const w = io.write(7, 4 * SUM_BLOCK, SUM_BLOCK, data.subarray(0, SUM_BLOCK), () => dev.write(4 * SUM_BLOCK, data.subarray(0, SUM_BLOCK)));
    await expect(io.read(7, 0, Buffer.alloc(SUM_BLOCK))).rejects.toBeInstanceOf(ChecksumMismatchError);
    expect(io.mismatches).toBe(2);
    dev.release();
    await w;
    dev.holdWrites = false;

    // A write to the same block that ends while the read is out: the read's odd bytes may be the
    // old ones against the new checksum; no verdict, the read is tried again and comes back right.
    dev.flip = false;
    dev.holdReads = true;
    const got = Buffer.alloc(SUM_BLOCK);
    const r = io.read(7, 0, got);
    await expect.poll(() => dev.held.length).toBe(1);
    const next = pattern(SUM_BLOCK, 9);
    await io.write(7, 0, SUM_BLOCK, next, () => dev.write(0, next));
    dev.holdReads = false;
    dev.flipOnce = true;
    dev.release();
    await r;
    expect(got.equals(next)).toBe(true);
    expect(io.mismatches).toBe(2);
  });

  it('fails a request that hangs past the timeout, and a hung read that ends later never writes into the caller\'s buffer', async () => {
    const dev = new Flaky(new MemoryDevice(SIZE));
    await dev.write(0, Buffer.alloc(SIZE, 0x5a));
    const io = new MemberIo(() => dev, new ChecksumTables(SIZE, undefined, pino({ level: 'silent' })), 100, SIZE);
    dev.holdReads = true;
    const dest = Buffer.alloc(SUM_BLOCK, 0x11);
    const err = await io.read(3, 0, dest).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(MemberTimeoutError);
    expect((err as Error).message).toBe('volume 3: read at 0 did not complete in 100 ms (ioTimeout): the volume hangs');
    expect(io.readsInFlight(3)).toBe(0);
    dev.holdWrites = true;
    await expect(io.write(3, 0, 512, Buffer.alloc(512), () => dev.write(0, Buffer.alloc(512)))).rejects.toBeInstanceOf(MemberTimeoutError);
    expect(io.timeouts).toBe(2);
    // The volume answers at last: the read lands in MemberIo's own buffer, not in dest.
    dev.release();
    await new Promise((r) => setImmediate(r));
    expect(dest.equals(Buffer.alloc(SUM_BLOCK, 0x11))).toBe(true);
  });
});

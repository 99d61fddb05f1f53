import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { SYNC_WRITE_MAX, openFileDevice, type FileDevice } from '../src/blockdev/file.js';
import { punchHole, pwritevSync, seekData, seekHole, type SyncWrite } from '../src/blockdev/native.js';
import { BlockDeviceError } from '../src/blockdev/types.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const DATA = 0;
const HOLE_ZERO = 3;

let dir: string;
let file: string;
const open: FileDevice[] = [];

beforeEach(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'blockmirror-file-'));
  file = path.join(dir, 'disk.img');
});

afterEach(async () => {
  for (const dev of open.splice(0)) await dev.close();
  fs.rmSync(dir, { recursive: true, force: true });
});

async function device(opts: Parameters<typeof openFileDevice>[1]): Promise<FileDevice> {
  const dev = await openFileDevice(file, opts);
  open.push(dev);
  return dev;
}

const TMPFS_MAGIC = 0x01021994;

function onTmpfs(p: string): boolean {
  try {
    return fs.statfsSync(p).type === TMPFS_MAGIC;
  } catch {
    return false;
  }
}

function pattern(length: number, seed: number): Buffer {
  const b = Buffer.alloc(length);
  for (let i = 0; i < length; i++) b[i] = (i * 31 + seed) & 0xff || 1;
  return b;
}

async function readBack(dev: FileDevice, offset: number, length: number): Promise<Buffer> {
  const b = Buffer.alloc(length, 0xee);
  await dev.read(offset, b);
  return b;
}

/** 512-byte sectors allocated to the file, after the filesystem has settled delayed allocation. */
function allocatedBytes(): number {
  return fs.statSync(file).blocks * 512;
}

describe('FileDevice', () => {
  it('reads back what was written at odd offsets and lengths', async () => {
    const dev = await device({ size: 4 * MiB });
    const a = pattern(12345, 7);
    const b = pattern(70001, 91);
    await dev.write(4097, a);
    await dev.write(1 * MiB - 3, b, true);
    expect((await readBack(dev, 4097, a.length)).equals(a)).toBe(true);
    expect((await readBack(dev, 1 * MiB - 3, b.length)).equals(b)).toBe(true);
    // Unwritten bytes around the writes read as zeros, straddling reads too.
    const around = await readBack(dev, 4000, 97 + a.length + 50);
    expect(around.subarray(0, 97).every((x) => x === 0)).toBe(true);
    expect(around.subarray(97, 97 + a.length).equals(a)).toBe(true);
    expect(around.subarray(97 + a.length).every((x) => x === 0)).toBe(true);
    await dev.flush();
  });

  it('does buffered writes of up to 1 MiB on the event loop, and larger or FUA ones on the pool, all landing', async () => {
    const dev = await device({ size: 8 * MiB });
    const small = pattern(4 * KiB, 1);
    const whole = pattern(SYNC_WRITE_MAX, 2);
    const pieces = [pattern(100 * KiB, 3), pattern(SYNC_WRITE_MAX - 100 * KiB, 4)];
    const large = pattern(SYNC_WRITE_MAX + 1, 5);
    const fua = pattern(8 * KiB, 6);
    await dev.write(0, small);
    await dev.write(1 * MiB, whole);
    await dev.write(2 * MiB + 1, pieces);
    expect(dev.writesDone).toEqual({ sync: 3, pool: 0 });
    await dev.write(4 * MiB, large);
    await dev.write(6 * MiB, fua, true);
    expect(dev.writesDone).toEqual({ sync: 3, pool: 2 });
    expect((await readBack(dev, 0, small.length)).equals(small)).toBe(true);
    expect((await readBack(dev, 1 * MiB, whole.length)).equals(whole)).toBe(true);
    expect((await readBack(dev, 2 * MiB + 1, SYNC_WRITE_MAX)).equals(Buffer.concat(pieces))).toBe(true);
    expect((await readBack(dev, 4 * MiB, large.length)).equals(large)).toBe(true);
    expect(fs.readFileSync(file).subarray(6 * MiB, 6 * MiB + fua.length).equals(fua)).toBe(true);
  });

  it('sends writes to the pool for a while after a synchronous write that slept for 2 ms or more, not after a short sleep', async () => {
    // Stands in a disk that throttles: the write sleeps (as balance_dirty_pages would) and says so.
    const nap = new Int32Array(new SharedArrayBuffer(4));
    let napMs = 0;
    const syncWrite = (fd: number, pieces: readonly Buffer[], position: number): SyncWrite => {
      if (napMs > 0) Atomics.wait(nap, 0, 0, napMs);
      return { written: pwritevSync(fd, pieces, position).written, slept: true };
    };
    const dev = await device({ size: 4 * MiB, syncWrite });
    const a = pattern(64 * KiB, 7);
    const b = pattern(64 * KiB, 8);
    const c = pattern(1 * MiB, 9);
    await dev.write(0, a); // slept, but briefly: stays on the event loop
    expect(dev.writesDone).toEqual({ sync: 1, pool: 0 });
    napMs = 5;
    await dev.write(64 * KiB, b);
    await dev.write(1 * MiB, c);
    await dev.write(3 * MiB, a);
    expect(dev.writesDone).toEqual({ sync: 2, pool: 2 });
    expect((await readBack(dev, 0, 128 * KiB)).equals(Buffer.concat([a, b]))).toBe(true);
    expect((await readBack(dev, 1 * MiB, c.length)).equals(c)).toBe(true);
    expect((await readBack(dev, 3 * MiB, a.length)).equals(a)).toBe(true);
  });

  it('reads into the caller buffer, including a slice of a larger buffer', async () => {
    const dev = await device({ size: 1 * MiB });
    await dev.write(333, pattern(1000, 3));
    const big = Buffer.alloc(3000, 0xaa);
    await dev.read(333, big.subarray(1000, 2000));
    expect(big.subarray(1000, 2000).equals(pattern(1000, 3))).toBe(true);
    expect(big[999]).toBe(0xaa);
    expect(big[2000]).toBe(0xaa);
  });

  it('reports holes and data as merged extents that start at the requested offset and stop at its end', async () => {
    const dev = await device({ size: 1 * MiB });
    expect(await dev.extents(0, 1 * MiB)).toEqual([{ length: 1 * MiB, flags: HOLE_ZERO }]);

    await dev.write(64 * KiB, pattern(8 * KiB, 1));
    await dev.write(72 * KiB, pattern(8 * KiB, 2)); // adjacent: merges with the first
    expect(await dev.extents(0, 1 * MiB)).toEqual([
      { length: 64 * KiB, flags: HOLE_ZERO },
      { length: 16 * KiB, flags: DATA },
      { length: 1 * MiB - 80 * KiB, flags: HOLE_ZERO },
    ]);
    // Starting inside a hole and inside data, ending inside data and inside a hole.
    expect(await dev.extents(60000, 10000)).toEqual([
      { length: 64 * KiB - 60000, flags: HOLE_ZERO },
      { length: 70000 - 64 * KiB, flags: DATA },
    ]);
    expect(await dev.extents(64 * KiB + 100, 1000)).toEqual([{ length: 1000, flags: DATA }]);
    expect(await dev.extents(70 * KiB, 20 * KiB)).toEqual([
      { length: 10 * KiB, flags: DATA },
      { length: 10 * KiB, flags: HOLE_ZERO },
    ]);
    // The last byte of the device.
    expect(await dev.extents(1 * MiB - 1, 1)).toEqual([{ length: 1, flags: HOLE_ZERO }]);
  });

  it('turns trimmed and zeroed ranges back into holes that read as zeros', async () => {
    const dev = await device({ size: 1 * MiB });
    await dev.write(0, pattern(256 * KiB, 5));
    await dev.trim(64 * KiB, 64 * KiB);
    await dev.zero(192 * KiB, 32 * KiB);
    expect(await dev.extents(0, 1 * MiB)).toEqual([
      { length: 64 * KiB, flags: DATA },
      { length: 64 * KiB, flags: HOLE_ZERO },
      { length: 64 * KiB, flags: DATA },
      { length: 32 * KiB, flags: HOLE_ZERO },
      { length: 32 * KiB, flags: DATA },
      { length: 768 * KiB, flags: HOLE_ZERO },
    ]);
    expect((await readBack(dev, 64 * KiB, 64 * KiB)).every((x) => x === 0)).toBe(true);
    expect((await readBack(dev, 192 * KiB, 32 * KiB)).every((x) => x === 0)).toBe(true);
    expect((await readBack(dev, 0, 64 * KiB)).equals(pattern(256 * KiB, 5).subarray(0, 64 * KiB))).toBe(true);
  });

  it('zeroes unaligned trim ranges exactly, leaving the neighbouring bytes alone', async () => {
    const dev = await device({ size: 64 * KiB });
    const data = pattern(32 * KiB, 9);
    await dev.write(0, data);
    await dev.trim(1000, 10000, true);
    const back = await readBack(dev, 0, 32 * KiB);
    expect(back.subarray(0, 1000).equals(data.subarray(0, 1000))).toBe(true);
    expect(back.subarray(1000, 11000).every((x) => x === 0)).toBe(true);
    expect(back.subarray(11000).equals(data.subarray(11000))).toBe(true);
  });

  it('zeroes with noHole without freeing the blocks', async () => {
    const dev = await device({ size: 1 * MiB });
    await dev.write(0, pattern(256 * KiB, 4));
    await dev.flush();
    const before = allocatedBytes();
    expect(before).toBeGreaterThanOrEqual(256 * KiB);

    await dev.zero(0, 256 * KiB, { noHole: true, fua: true });
    expect((await readBack(dev, 0, 256 * KiB)).every((x) => x === 0)).toBe(true);
    expect(allocatedBytes()).toBeGreaterThanOrEqual(256 * KiB);
    // ZERO_RANGE leaves allocated-but-unwritten extents, which SEEK_DATA
    // (ext4, xfs) reports as holes; a filesystem without ZERO_RANGE gets
    // real zeros written, i.e. data. Either way one uniform extent that
    // never claims non-zero content it does not have.
    const ext = await dev.extents(0, 256 * KiB);
    expect(ext).toHaveLength(1);
    expect(ext[0]!.length).toBe(256 * KiB);
    expect([DATA, HOLE_ZERO]).toContain(ext[0]!.flags);

    // Without noHole the blocks go away.
    await dev.zero(0, 256 * KiB, { fastZero: true });
    expect(allocatedBytes()).toBeLessThan(64 * KiB);
    expect(await dev.extents(0, 1 * MiB)).toEqual([{ length: 1 * MiB, flags: HOLE_ZERO }]);
  });

  it(
    'falls back to writing zeros where ZERO_RANGE is unsupported, unless fastZero forbids it',
    async () => {
      // Linux machines (ours and CI) mount /dev/shm as tmpfs; elsewhere this test has no subject.
      expect(onTmpfs('/dev/shm'), '/dev/shm must be tmpfs for this test').toBe(true);
      // tmpfs punches holes but has no FALLOC_FL_ZERO_RANGE.
      file = path.join(fs.mkdtempSync('/dev/shm/blockmirror-file-'), 'disk.img');
      try {
        const dev = await device({ size: 1 * MiB });
        await dev.write(0, pattern(64 * KiB, 3));
        const err = await dev.zero(0, 64 * KiB, { noHole: true, fastZero: true }).catch((e: unknown) => e);
        expect((err as BlockDeviceError).errno).toBe('ENOTSUP');
        await dev.zero(4 * KiB, 60 * KiB, { noHole: true });
        const back = await readBack(dev, 0, 64 * KiB);
        expect(back.subarray(0, 4 * KiB).equals(pattern(4 * KiB, 3))).toBe(true);
        expect(back.subarray(4 * KiB).every((x) => x === 0)).toBe(true);
        expect(await dev.extents(0, 1 * MiB)).toEqual([
          { length: 64 * KiB, flags: DATA },
          { length: 960 * KiB, flags: HOLE_ZERO },
        ]);
        await dev.trim(0, 64 * KiB);
        expect(await dev.extents(0, 1 * MiB)).toEqual([{ length: 1 * MiB, flags: HOLE_ZERO }]);
      } finally {
        for (const dev of open.splice(0)) await dev.close();
        fs.rmSync(path.dirname(file), { recursive: true, force: true });
      }
    },
  );

  it('caps the number of extents and then answers for less than was asked', async () => {
    const dev = await device({ size: 1 * MiB, maxExtents: 3 });
    for (let i = 0; i < 4; i++) await dev.write(i * 64 * KiB + 32 * KiB, pattern(4 * KiB, i));
    const ext = await dev.extents(0, 1 * MiB);
    expect(ext).toEqual([
      { length: 32 * KiB, flags: HOLE_ZERO },
      { length: 4 * KiB, flags: DATA },
      { length: 60 * KiB, flags: HOLE_ZERO },
    ]);
  });

  it('refuses writes, trims and zeroes on a read-only device with EPERM', async () => {
    fs.writeFileSync(file, pattern(64 * KiB, 1));
    const dev = await device({ readOnly: true });
    expect(dev.readOnly).toBe(true);
    expect(dev.size).toBe(64 * KiB);
    for (const attempt of [
      () => dev.write(0, Buffer.alloc(512)),
      () => dev.trim(0, 4096),
      () => dev.zero(0, 4096),
      () => dev.zero(0, 4096, { noHole: true }),
    ]) {
      const err = await attempt().catch((e: unknown) => e);
      expect(err).toBeInstanceOf(BlockDeviceError);
      expect((err as BlockDeviceError).errno).toBe('EPERM');
    }
    expect((await readBack(dev, 0, 64 * KiB)).equals(pattern(64 * KiB, 1))).toBe(true);
    await dev.flush();
  });

  it('creates a missing file sparse, at the requested size', async () => {
    const dev = await device({ size: 64 * MiB });
    expect(dev.size).toBe(64 * MiB);
    expect(fs.statSync(file).size).toBe(64 * MiB);
    expect(allocatedBytes()).toBeLessThan(64 * KiB);
    expect(dev.multiConnSafe).toBe(true);
    expect(dev.fastZero).toBe(true);
  });

  it('uses the existing size when none is given and extends a smaller file sparsely', async () => {
    fs.writeFileSync(file, pattern(8 * KiB, 2));
    const same = await openFileDevice(file, {});
    expect(same.size).toBe(8 * KiB);
    await same.close();

    const dev = await device({ size: 64 * MiB });
    expect(dev.size).toBe(64 * MiB);
    expect(fs.statSync(file).size).toBe(64 * MiB);
    expect(allocatedBytes()).toBeLessThan(64 * KiB);
    expect((await readBack(dev, 0, 8 * KiB)).equals(pattern(8 * KiB, 2))).toBe(true);
  });

  it('refuses a file larger than the requested size instead of truncating it', async () => {
    fs.writeFileSync(file, Buffer.alloc(8 * KiB));
    await expect(openFileDevice(file, { size: 4 * KiB })).rejects.toThrow(
      `file ${file} is larger (8192 bytes) than --size 4096`,
    );
    expect(fs.statSync(file).size).toBe(8 * KiB);
  });

  it('refuses to create a file without a size, or read-only', async () => {
    await expect(openFileDevice(file, {})).rejects.toThrow(/does not exist; give --size/);
    await expect(openFileDevice(file, { size: MiB, readOnly: true })).rejects.toThrow(/does not exist/);
    expect(fs.existsSync(file)).toBe(false);
  });

  it('frees the blocks of trimmed data', async () => {
    const dev = await device({ size: 64 * MiB });
    await dev.write(8 * MiB, pattern(2 * MiB, 6), true);
    expect(allocatedBytes()).toBeGreaterThanOrEqual(2 * MiB);
    await dev.trim(8 * MiB, 2 * MiB, true);
    expect(allocatedBytes()).toBeLessThan(64 * KiB);
    expect(await dev.extents(0, 64 * MiB)).toEqual([{ length: 64 * MiB, flags: HOLE_ZERO }]);
  });

  it('rejects operations after close and waits for in-flight ones before closing', async () => {
    const dev = await openFileDevice(file, { size: 4 * MiB });
    const pending = dev.write(0, pattern(4 * MiB, 8));
    await dev.close();
    await pending;
    const err = await dev.read(0, Buffer.alloc(16)).catch((e: unknown) => e);
    expect((err as BlockDeviceError).errno).toBe('ESHUTDOWN');
    expect(fs.readFileSync(file).equals(pattern(4 * MiB, 8))).toBe(true);
  });
});

describe('sparse native addon', () => {
  it('writes pieces at a position with pwritevSync, and says the thread slept when an O_DSYNC write waited for the disk', () => {
    const dev = fs.openSync(file, 'w+');
    try {
      const r = pwritevSync(dev, [pattern(1000, 1), pattern(3000, 2)], 5000);
      expect(r.written).toBe(4000);
      expect(fs.readFileSync(file).subarray(5000).equals(Buffer.concat([pattern(1000, 1), pattern(3000, 2)]))).toBe(true);
    } finally {
      fs.closeSync(dev);
    }
    // /var/tmp is on a disk on every Linux we run on (never tmpfs): a synchronous write there sleeps.
    expect(onTmpfs('/var/tmp'), '/var/tmp must be on a disk filesystem for this test').toBe(false);
    const disk = fs.mkdtempSync('/var/tmp/blockmirror-file-');
    try {
      const fd = fs.openSync(path.join(disk, 'sync.img'), fs.constants.O_RDWR | fs.constants.O_CREAT | fs.constants.O_DSYNC);
      try {
        expect(pwritevSync(fd, [pattern(64 * KiB, 3)], 0)).toEqual({ written: 64 * KiB, slept: true });
      } finally {
        fs.closeSync(fd);
      }
    } finally {
      fs.rmSync(disk, { recursive: true, force: true });
    }
  });

  it('refuses bad arguments to pwritevSync with a type error and reports a failed write by its errno name', () => {
    const fd = fs.openSync(file, 'w+');
    try {
      for (const args of [[fd, [], 0], [fd, Buffer.alloc(1), 0], [fd, ['x'], 0], [fd, [Buffer.alloc(1)], -1], [fd, Array(65).fill(Buffer.alloc(1)), 0]]) {
        expect(() => pwritevSync(...(args as [number, Buffer[], number]))).toThrow(/expected \(fd, buffers/);
      }
    } finally {
      fs.closeSync(fd);
    }
    const ro = fs.openSync(file, 'r');
    try {
      expect(() => pwritevSync(ro, [Buffer.alloc(16)], 0)).toThrow(expect.objectContaining({ code: 'EBADF', syscall: 'pwritev' }));
    } finally {
      fs.closeSync(ro);
    }
  });

  it('finds data and holes and treats the end of file as the last hole', async () => {
    const fd = fs.openSync(file, 'w+');
    try {
      fs.ftruncateSync(fd, 1 * MiB);
      fs.writeSync(fd, pattern(4 * KiB, 1), 0, 4 * KiB, 128 * KiB);
      expect(await seekData(fd, 0)).toBe(128 * KiB);
      expect(await seekHole(fd, 128 * KiB)).toBe(132 * KiB);
      expect(await seekData(fd, 132 * KiB)).toBe(-1);
      expect(await seekHole(fd, 2 * MiB)).toBe(1 * MiB);
    } finally {
      fs.closeSync(fd);
    }
  });

  it('reports failures as errors carrying the errno name in code', async () => {
    // Far above any RLIMIT_NOFILE: a closed-then-reused small fd could be some other file.
    const badFd = 0x3fffffff;
    const err = await punchHole(badFd, 0, 4096).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(Error);
    expect((err as NodeJS.ErrnoException).code).toBe('EBADF');
    await expect(punchHole(0, -1, 10)).rejects.toThrow(/offset/);
  });
});

// A BlockDevice backed by a (sparse) regular file.
//
// The hot path (read/write) uses the callback fs API on a raw fd: FileHandle
// promises add an allocation and an extra hop per call, and a benchmark
// compares us with `nbdkit file`. Trim, zero and extents go through the
// native addon (fallocate, SEEK_DATA/SEEK_HOLE).
//
// One fd serves every connection and we keep no cache of our own, so a
// flush through any connection covers writes from all of them.

import fs from 'node:fs';
import { promisify } from 'node:util';
import { BlockDeviceError, payloadLength, toBlockDeviceError, type BlockDevice, type Extent, type Payload, type ZeroOptions } from './types.js';
import { loadSparseAddon, preadNoWait, punchHole, pwritevSync, seekData, seekHole, zeroRange, type SyncWrite } from './native.js';

const fdatasync = promisify(fs.fdatasync);
const closeFd = promisify(fs.close);

const HOLE_ZERO = 3; // NBD_STATE_HOLE | NBD_STATE_ZERO
const DATA = 0;
/** Upper bound on extents per answer: bounds both the reply size and the number of lseek calls. */
export const MAX_EXTENTS = 65536;
const ZERO_CHUNK = 1 << 20;
/** Largest read tried synchronously from the page cache (a bigger copy would hold the event loop too long). */
const NOWAIT_MAX = 1024 * 1024;
/**
 * Largest write done synchronously into the page cache. Through libuv's pool a write costs two
 * thread hand-offs, and at 1 MiB QD8 the context switches were a sixth of the server's CPU; done
 * here, 1 MiB writes went from 0.8x to 1.0-1.1x nbdkit's file plugin (bench/RESULTS.md, "File
 * volumes: writes on the event loop").
 */
export const SYNC_WRITE_MAX = 1024 * 1024;
/**
 * A synchronous write in which the thread slept (writeback throttling, waiting for a page or for
 * block allocation: the native call tells) and that took this long met what the page cache cannot
 * absorb at once. The event loop, which serves every connection and renews the leases, must not
 * wait on it again, so the pool takes every write for SYNC_BACKOFF_MS. Being preempted does not
 * count: on a loaded machine a clock alone mistook that for a slow disk. A 1 MiB copy into cached
 * pages takes ~0.1-0.3 ms here.
 */
export const SYNC_SLOW_MS = 2;
export const SYNC_BACKOFF_MS = 1000;
/** At most this many pieces go to one synchronous pwritev (the addon's limit). */
const SYNC_MAX_PIECES = 64;

let zeroChunk: Buffer | undefined;

export interface FileDeviceOptions {
  /** Device size in bytes. Omitted: the file's current size (the file must exist). */
  size?: number;
  readOnly?: boolean;
  /** Cap on extents per extents() answer (default MAX_EXTENTS); lower it to test truncated answers. */
  maxExtents?: number;
  /** The synchronous write, for tests to stand in a slow disk: pwritevSync by default. */
  syncWrite?: (fd: number, pieces: readonly Buffer[], position: number) => SyncWrite;
}

/**
 * Open (or create, sparse) a file as a block device. A smaller file is
 * extended to `size` (sparsely); a larger one is refused rather than
 * silently truncated.
 */
export async function openFileDevice(path: string, opts: FileDeviceOptions = {}): Promise<FileDevice> {
  const { size, readOnly = false, maxExtents = MAX_EXTENTS, syncWrite = pwritevSync } = opts;
  if (size !== undefined && !(Number.isSafeInteger(size) && size >= 0)) {
    throw new Error(`invalid size ${size} for file ${path}: expected a non-negative integer number of bytes`);
  }
  if (!(Number.isSafeInteger(maxExtents) && maxExtents >= 1)) throw new Error(`invalid maxExtents ${maxExtents}`);
  // Fail on a missing addon now, not on the first trim of a live export.
  loadSparseAddon();

  const exists = await fs.promises.stat(path).then(
    () => true,
    (err: NodeJS.ErrnoException) => {
      if (err.code === 'ENOENT') return false;
      throw err;
    },
  );
  if (!exists) {
    if (readOnly) throw new Error(`file ${path} does not exist (cannot create it read-only)`);
    if (size === undefined) throw new Error(`file ${path} does not exist; give --size to create it`);
  }

  const flags = readOnly ? fs.constants.O_RDONLY : fs.constants.O_RDWR | fs.constants.O_CREAT;
  // A raw fd, not a FileHandle: the hot path uses the callback API, and a
  // FileHandle would also close the fd behind our back when collected.
  const fd = await promisify(fs.open)(path, flags, 0o644);
  try {
    const st = await promisify(fs.fstat)(fd);
    if (!st.isFile()) throw new Error(`${path} is not a regular file`);
    let devSize = st.size;
    if (size !== undefined && size !== st.size) {
      if (st.size > size) {
        throw new Error(`file ${path} is larger (${st.size} bytes) than --size ${size}`);
      }
      if (readOnly) {
        throw new Error(`file ${path} is smaller (${st.size} bytes) than --size ${size} and cannot be extended read-only`);
      }
      // ftruncate extends sparsely: no blocks are allocated for the new tail.
      await promisify(fs.ftruncate)(fd, size);
      devSize = size;
    }
    return new FileDevice(path, fd, devSize, readOnly, maxExtents, syncWrite);
  } catch (err) {
    await closeFd(fd).catch(() => undefined);
    throw err;
  }
}

export class FileDevice implements BlockDevice {
  readonly multiConnSafe = true;
  /** fallocate is O(extents), not O(bytes). */
  readonly fastZero = true;

  private closed = false;
  private inFlight = 0;
  private drained: (() => void) | undefined;
  // Learned on the first EOPNOTSUPP so later calls skip a doomed syscall.
  private canPunch = true;
  private canZeroRange = true;
  private canSeek = true;
  /** Until when (performance.now()) writes go to the pool after a slow synchronous one. */
  private poolUntil = 0;
  /** How writes were done, for tests and the curious: synchronously, or on libuv's pool. */
  readonly writesDone = { sync: 0, pool: 0 };

  constructor(
    readonly path: string,
    private readonly fd: number,
    readonly size: number,
    readonly readOnly: boolean,
    private readonly maxExtents = MAX_EXTENTS,
    private readonly syncWrite = pwritevSync,
  ) {}

  read(offset: number, dest: Buffer): Promise<void> {
    if (this.closed) return Promise.reject(closedError());
    const total = dest.length;
    if (total === 0) return Promise.resolve();
    // Page-cache hits are served right here, without two thread hand-offs
    // through libuv's pool; anything that would wait for the disk goes there.
    let first = total <= NOWAIT_MAX ? preadNoWait(this.fd, dest, offset) : -1;
    if (first === total) return Promise.resolve();
    if (first < 0) first = 0;
    this.inFlight++;
    return new Promise<void>((resolve, reject) => {
      let done = first;
      const onRead = (err: NodeJS.ErrnoException | null, n: number): void => {
        if (err) return this.settle(reject, toBlockDeviceError(err, 'pread'));
        if (n === 0) {
          // EOF cannot happen on a correctly sized file, but if someone
          // truncated it under us, the missing tail reads as a hole would.
          dest.fill(0, done);
          return this.settle(resolve);
        }
        done += n;
        if (done < total) fs.read(this.fd, dest, done, total - done, offset + done, onRead);
        else this.settle(resolve);
      };
      fs.read(this.fd, dest, done, total - done, offset + done, onRead);
    });
  }

  write(offset: number, data: Payload, fua = false): Promise<void> {
    const refused = this.refuseWrite('write');
    if (refused) return refused;
    const total = payloadLength(data);
    if (total === 0 && !fua) return Promise.resolve();
    const pieces = Buffer.isBuffer(data) ? [data] : (data as Buffer[]);
    if (!fua && total <= SYNC_WRITE_MAX && pieces.length <= SYNC_MAX_PIECES && (this.poolUntil === 0 || this.poolUntil < performance.now())) {
      // A buffered write only copies into the page cache: doing it here costs one syscall, where
      // the pool costs two thread hand-offs. Watched, so that one that had to wait is the last.
      try {
        const start = performance.now();
        const { written: n, slept } = this.syncWrite(this.fd, pieces, offset);
        if (slept) {
          const end = performance.now();
          if (end - start >= SYNC_SLOW_MS) this.poolUntil = end + SYNC_BACKOFF_MS;
        } else this.poolUntil = 0;
        this.writesDone.sync++;
        if (n < total) {
          // Short write (rare): finish the rest on the pool.
          const rest = Buffer.concat(pieces).subarray(n);
          this.inFlight++;
          return new Promise<void>((resolve, reject) =>
            this.writeAll(offset + n, rest, 0, rest.length, (err) => (err ? this.settle(reject, err) : this.settle(resolve))),
          );
        }
        return Promise.resolve();
      } catch (err) {
        return Promise.reject(toBlockDeviceError(err, 'pwritev'));
      }
    }
    this.writesDone.pool++;
    this.inFlight++;
    return new Promise<void>((resolve, reject) => {
      const done = (err: BlockDeviceError | null): void => {
        if (err) return this.settle(reject, err);
        if (!fua) return this.settle(resolve);
        // Synced inside the same in-flight window, so a close() cannot slip
        // between the write and its FUA.
        fs.fdatasync(this.fd, (e) => (e ? this.settle(reject, toBlockDeviceError(e, 'fdatasync')) : this.settle(resolve)));
      };
      // Pieces (views into the receive buffers) go out in one pwritev: no gathering copy.
      if (Buffer.isBuffer(data)) this.writeAll(offset, data, 0, data.length, done);
      else if (data.length === 1) this.writeAll(offset, data[0]!, 0, data[0]!.length, done);
      else this.writevAll(offset, data, done);
    });
  }

  private writevAll(offset: number, pieces: readonly Buffer[], cb: (err: BlockDeviceError | null) => void): void {
    const total = payloadLength(pieces);
    fs.writev(this.fd, pieces as Buffer[], offset, (err, n) => {
      if (err) return cb(toBlockDeviceError(err, 'pwritev'));
      if (n === total) return cb(null);
      // Short write: finish the rest piece by piece from where it stopped.
      let skip = n;
      const rest: Buffer[] = [];
      for (const p of pieces) {
        if (skip >= p.length) skip -= p.length;
        else {
          rest.push(p.subarray(skip));
          skip = 0;
        }
      }
      this.writevAll(offset + n, rest, cb);
    });
  }

  flush(): Promise<void> {
    // Nothing of ours can be dirty on a read-only fd.
    return this.guard(async () => {
      if (!this.readOnly) await mapError(fdatasync(this.fd), 'fdatasync');
    });
  }

  trim(offset: number, length: number, fua = false): Promise<void> {
    return this.guard(async () => {
      this.checkWritable('trim');
      if (length > 0) {
        if (!(await this.punch(offset, length, 'trim'))) {
          // Our trims promise zeros afterwards; without hole punching, zero instead.
          await this.zeroKeep(offset, length, false);
        }
      }
      if (fua) await mapError(fdatasync(this.fd), 'fdatasync');
    });
  }

  zero(offset: number, length: number, opts: ZeroOptions = {}): Promise<void> {
    return this.guard(async () => {
      this.checkWritable('zero');
      const { noHole = false, fastZero = false, fua = false } = opts;
      if (length > 0) {
        const punched = !noHole && (await this.punch(offset, length, 'zero'));
        if (!punched) await this.zeroKeep(offset, length, fastZero);
      }
      if (fua) await mapError(fdatasync(this.fd), 'fdatasync');
    });
  }

  extents(offset: number, length: number): Promise<Extent[]> {
    return this.guard(() => this.mapExtents(offset, length));
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    // Closing under an in-flight pread/pwrite/fallocate would let the fd
    // number be reused and the operation land in some other file.
    if (this.inFlight > 0) await new Promise<void>((resolve) => (this.drained = resolve));
    await closeFd(this.fd);
  }

  private async mapExtents(offset: number, length: number): Promise<Extent[]> {
    const end = offset + length;
    if (!this.canSeek) return [{ length, flags: DATA }];
    const out: Extent[] = [];
    const push = (len: number, flags: number): void => {
      const last = out[out.length - 1];
      if (last && last.flags === flags) last.length += len;
      else out.push({ length: len, flags });
    };
    let pos = offset;
    try {
      while (pos < end && out.length < this.maxExtents) {
        const data = await seekData(this.fd, pos);
        if (data < 0 || data >= end) {
          push(end - pos, HOLE_ZERO);
          break;
        }
        if (data > pos) {
          push(data - pos, HOLE_ZERO);
          pos = data;
          if (out.length >= this.maxExtents) break;
        }
        const hole = await seekHole(this.fd, pos);
        // hole <= pos only if the data vanished between the two calls (a
        // concurrent trim); looking for data again from pos sorts it out.
        if (hole <= pos) continue;
        const stop = Math.min(hole, end);
        push(stop - pos, DATA);
        pos = stop;
      }
    } catch (err) {
      // A filesystem without SEEK_DATA/SEEK_HOLE: everything is data.
      if (out.length > 0 || !(isNotSupported(err) || errCode(err) === 'EINVAL')) throw toBlockDeviceError(err, 'extents');
      this.canSeek = false;
      return [{ length, flags: DATA }];
    }
    return out;
  }

  /** Punch a hole; false when the filesystem cannot. */
  private async punch(offset: number, length: number, op: string): Promise<boolean> {
    if (!this.canPunch) return false;
    try {
      await punchHole(this.fd, offset, length);
      return true;
    } catch (err) {
      if (!isNotSupported(err)) throw toBlockDeviceError(err, op);
      this.canPunch = false;
      return false;
    }
  }

  /** Zero keeping the range allocated: ZERO_RANGE, else (unless fastZero) plain writes of zeros. */
  private async zeroKeep(offset: number, length: number, fastZero: boolean): Promise<void> {
    if (this.canZeroRange) {
      try {
        await zeroRange(this.fd, offset, length);
        return;
      } catch (err) {
        if (!isNotSupported(err)) throw toBlockDeviceError(err, 'zero');
        this.canZeroRange = false;
      }
    }
    // The client asked us to fail rather than fall back to slow writes.
    if (fastZero) throw new BlockDeviceError('ENOTSUP', `zero: fast zeroing is not supported on ${this.path}`);
    zeroChunk ??= Buffer.alloc(ZERO_CHUNK);
    const chunk = zeroChunk;
    for (let pos = 0; pos < length; pos += ZERO_CHUNK) {
      const n = Math.min(ZERO_CHUNK, length - pos);
      await new Promise<void>((resolve, reject) => {
        this.writeAll(offset + pos, chunk, 0, n, (err) => (err ? reject(err) : resolve()));
      });
    }
  }

  private checkWritable(op: string): void {
    if (this.readOnly) throw new BlockDeviceError('EPERM', `${op}: ${this.path} is open read-only`);
  }

  private refuseWrite(op: string): Promise<void> | undefined {
    if (this.closed) return Promise.reject(closedError());
    if (this.readOnly) return Promise.reject(new BlockDeviceError('EPERM', `${op}: ${this.path} is open read-only`));
    return undefined;
  }

  private settle<T>(fn: (v: T) => void, v?: T): void {
    if (--this.inFlight === 0 && this.drained) this.drained();
    fn(v as T);
  }

  /** Run a whole (multi-syscall) operation as one in-flight unit, so close() waits for all of it. */
  private async guard<T>(fn: () => Promise<T>): Promise<T> {
    if (this.closed) throw closedError();
    this.inFlight++;
    try {
      return await fn();
    } finally {
      if (--this.inFlight === 0 && this.drained) this.drained();
    }
  }

  private writeAll(
    offset: number,
    buf: Buffer,
    start: number,
    end: number,
    cb: (err: BlockDeviceError | null) => void,
  ): void {
    let done = start;
    const onWrite = (err: NodeJS.ErrnoException | null, n: number): void => {
      if (err) return cb(toBlockDeviceError(err, 'pwrite'));
      // pwrite returning 0 for a non-empty buffer would loop forever.
      if (n === 0) return cb(new BlockDeviceError('EIO', `pwrite: wrote 0 bytes to ${this.path}`));
      done += n;
      if (done < end) fs.write(this.fd, buf, done, end - done, offset + done - start, onWrite);
      else cb(null);
    };
    if (start >= end) return cb(null);
    fs.write(this.fd, buf, start, end - start, offset, onWrite);
  }
}

async function mapError<T>(p: Promise<T>, op: string): Promise<T> {
  try {
    return await p;
  } catch (err) {
    throw toBlockDeviceError(err, op);
  }
}

function closedError(): BlockDeviceError {
  return new BlockDeviceError('ESHUTDOWN', 'device is closed');
}

/** The errno name behind err, looking through a BlockDeviceError to the original fs/addon error. */
function errCode(err: unknown): string | undefined {
  const cause = err instanceof BlockDeviceError ? err.cause : err;
  return (cause as NodeJS.ErrnoException | undefined)?.code;
}

/** The filesystem (or kernel) lacks the operation, as opposed to the operation failing. */
function isNotSupported(err: unknown): boolean {
  const code = errCode(err);
  return code === 'EOPNOTSUPP' || code === 'ENOTSUP' || code === 'ENOSYS';
}

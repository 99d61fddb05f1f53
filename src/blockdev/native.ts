// Loader and promise wrappers for the sparse-file addon (native/sparse.c):
// fallocate(PUNCH_HOLE / ZERO_RANGE) and lseek(SEEK_DATA / SEEK_HOLE), which
// Node's fs module does not offer. The calls run on the libuv threadpool.
//
// Errors are Error objects with .code set to the errno name ('EOPNOTSUPP',
// 'EIO', ...), ready for toBlockDeviceError.

import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';

type Callback = (err: NodeJS.ErrnoException | null, result: number) => void;

interface SparseAddon {
  punchHole(fd: number, offset: number, length: number, cb: Callback): void;
  zeroRange(fd: number, offset: number, length: number, cb: Callback): void;
  seekData(fd: number, offset: number, cb: Callback): void;
  seekHole(fd: number, offset: number, cb: Callback): void;
  preadNoWait(fd: number, buffer: Buffer, position: number): number;
  pwriteNoWait(fd: number, buffer: Buffer, position: number): number;
  pwritevSync(fd: number, buffers: readonly Buffer[], position: number): number;
  pidfdGetfd(pid: number, fd: number): number;
  alignGap(buffer: Buffer, align: number): number;
  adviseHuge(buffer: Buffer): number;
}

// Same relative path from src/blockdev/ (vitest runs the TS sources) and from
// dist/blockdev/ (the compiled package).
export const ADDON_PATH = fileURLToPath(new URL('../../native/build/Release/sparse.node', import.meta.url));

let addon: SparseAddon | undefined;

/**
 * Load the addon (once). Throws a clear Error when it has not been built.
 * Callers that need it should call this up front, so a missing addon fails
 * at open time rather than on the first trim.
 */
export function loadSparseAddon(): SparseAddon {
  if (addon) return addon;
  const require = createRequire(import.meta.url);
  try {
    addon = require(ADDON_PATH) as SparseAddon;
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    const why = code === 'MODULE_NOT_FOUND' ? 'it has not been built' : `loading failed: ${(err as Error).message}`;
    throw new Error(
      `native addon ${ADDON_PATH} is unavailable (${why}); run \`npm run build:native\` ` +
        '(npm install builds it through the prepare script; it needs a C compiler, make and python3)',
      { cause: err },
    );
  }
  return addon;
}

/** Deallocate [offset, offset+length); the file size is kept, the range reads back as zeros. */
export function punchHole(fd: number, offset: number, length: number): Promise<void> {
  const a = loadSparseAddon();
  return new Promise((resolve, reject) => {
    a.punchHole(fd, offset, length, (err) => (err ? reject(err) : resolve()));
  });
}

/** Zero [offset, offset+length) while keeping it allocated (NBD NO_HOLE); the file size is kept. */
export function zeroRange(fd: number, offset: number, length: number): Promise<void> {
  const a = loadSparseAddon();
  return new Promise((resolve, reject) => {
    a.zeroRange(fd, offset, length, (err) => (err ? reject(err) : resolve()));
  });
}

/** Start of the first data at or after offset, or -1 when there is none before EOF. */
export function seekData(fd: number, offset: number): Promise<number> {
  const a = loadSparseAddon();
  return new Promise((resolve, reject) => {
    a.seekData(fd, offset, (err, result) => (err ? reject(err) : resolve(result)));
  });
}

/** Start of the first hole at or after offset; the file size when offset is at or past EOF (the implicit hole). */
export function seekHole(fd: number, offset: number): Promise<number> {
  const a = loadSparseAddon();
  return new Promise((resolve, reject) => {
    a.seekHole(fd, offset, (err, result) => (err ? reject(err) : resolve(result)));
  });
}

/**
 * Read from the page cache without waiting for a disk (preadv2 RWF_NOWAIT),
 * synchronously. Bytes read, or -1 when that would block: then use the
 * thread pool.
 */
export function preadNoWait(fd: number, buffer: Buffer, position: number): number {
  return loadSparseAddon().preadNoWait(fd, buffer, position);
}

/** What pwritevSync did: bytes written, and whether the thread slept in the call (a voluntary context switch). */
export interface SyncWrite {
  written: number;
  slept: boolean;
}

/**
 * pwritev on the calling thread (up to 64 pieces), telling whether it slept: copying into cached
 * pages does not, waiting for writeback throttling, a page or a block does. Throws the errno as
 * .code on failure.
 */
export function pwritevSync(fd: number, pieces: readonly Buffer[], position: number): SyncWrite {
  const r = loadSparseAddon().pwritevSync(fd, pieces, position);
  return r >= 0 ? { written: r, slept: false } : { written: -r - 1, slept: true };
}

/** A duplicate, in this process, of fd `fd` of process `pid` (pidfd_getfd); -errno on failure. */
export function pidfdGetfd(pid: number, fd: number): number {
  return loadSparseAddon().pidfdGetfd(pid, fd);
}

/** A zeroed buffer of `length` bytes whose memory starts at a multiple of `align` (O_DIRECT I/O). */
export function alignedBuffer(length: number, align = 4096): Buffer {
  const raw = Buffer.alloc(length + align);
  const gap = loadSparseAddon().alignGap(raw, align);
  return raw.subarray(gap, gap + length);
}

/** A transparent huge page: the unit adviseHuge works in. */
export const HUGE_PAGE = 2 << 20;

/**
 * `length` bytes of memory (not zeroed) that start at a 2 MiB boundary and are advised for
 * transparent huge pages (madvise MADV_HUGEPAGE) before anything touches them, so that their first
 * touch faults in 2 MiB pages rather than 4 KiB ones. For the buffers of a few MiB that a process
 * fills and reuses (xfer's segments): a fresh 4 MiB buffer cost 13-17 ms of page faults here,
 * 3-5 ms advised (this VM's faults are slow), and a sender or receiver touches six of them before
 * its first byte moves. Where THP is off the advice does nothing and the buffer is an ordinary one.
 * Aligned to 2 MiB, it is aligned for O_DIRECT too.
 */
export function hugeBuffer(length: number): Buffer {
  // Fresh memory: a Buffer this large is a new mapping or untouched heap, so the advice comes first.
  const raw = Buffer.allocUnsafeSlow(length + HUGE_PAGE);
  const a = loadSparseAddon();
  const gap = a.alignGap(raw, HUGE_PAGE);
  const buf = raw.subarray(gap, gap + length);
  a.adviseHuge(buf);
  return buf;
}

/** True when `buf` starts at a multiple of `align` and its length is one. */
export function isAligned(buf: Buffer, align = 4096): boolean {
  return buf.length % align === 0 && loadSparseAddon().alignGap(buf, align) === 0;
}

// `blockmirror cfs mount`: the CFS as a FUSE file system, so cp, cat, dd and fio work on it.
//
// fuse-native runs libfuse's multi-threaded loop on its own threads; each callback reaches the event
// loop and the FUSE thread waits until we call back. Every callback here only starts async work
// (server requests, NBD I/O) and answers when it settles: nothing blocks the event loop.
//
// Files opened several times in this mount share one CfsFile (one server handle), as one inode in a
// kernel file system would: a process reads what another wrote through its own descriptor. Writes
// become visible to other clients at flush (every close(2)) and fsync: close-to-open consistency.
import path from 'node:path';
import fs from 'node:fs/promises';
import Fuse from 'fuse-native';
import type { Logger } from 'pino';
import type { CfsClient } from './client.js';
import type { CfsFile } from './file.js';
import { CfsError } from './protocol.js';
import { ReadAhead } from './readahead.js';

export interface CfsMount {
  dir: string;
  unmount(): Promise<void>;
}

interface Shared {
  file: CfsFile;
  readAhead: ReadAhead;
  refs: number;
}

/** libfuse 2 caps a request at 128 KiB; ask for that much (the default for writes is 4 KiB). */
const MAX_IO = 128 * 1024;

class CfsFuse extends Fuse {
  protected override _fuseOptions(): string {
    const base = super._fuseOptions();
    const ours = `big_writes,max_write=${MAX_IO},max_read=${MAX_IO}`;
    return base ? `${base},${ours}` : `-o${ours}`;
  }
}

export async function mountCfs(client: CfsClient, dir: string, log: Logger): Promise<CfsMount> {
  const mnt = path.resolve(dir);
  const st = await fs.stat(mnt).catch(() => undefined);
  if (!st?.isDirectory()) throw new CfsError('ENOTDIR', `mount point ${mnt} is not a directory`);

  // Read-ahead chunks are filled by a worker thread: this event loop answers the kernel.
  client.data.useReadWorkers(1);
  const fds = new Map<number, Shared>();
  const byIno = new Map<number, Shared>();
  const opening = new Map<number, Promise<Shared>>();
  let nextFd = 1;
  const uid = process.getuid?.() ?? 0;
  const gid = process.getgid?.() ?? 0;

  type Cb = (...a: never[]) => void;
  /** Wrap an async op: FUSE passes its callback last; the result (or errno) goes there, and nothing throws. */
  const op =
    <R>(name: string, fn: (...args: any[]) => Promise<R>, answer: (cb: Cb, r: R) => void) =>
    (...args: unknown[]): void => {
      const cb = args.pop() as Cb;
      fn(...args).then(
        (r) => answer(cb, r),
        (e: unknown) => {
          const code = errno(e);
          if (code === Fuse.EIO) log.warn({ op: name, path: args[0], err: (e as Error).message }, 'cfs mount: operation failed');
          else log.debug({ op: name, path: args[0], err: (e as Error).message }, 'cfs mount: operation refused');
          (cb as (code: number) => void)(code);
        },
      );
    };
  const ok = (cb: Cb) => (cb as (c: number) => void)(0);
  const value = <T>(cb: Cb, v: T) => (cb as (c: number, v: T) => void)(0, v);
  const count = (cb: Cb, n: number) => (cb as (n: number) => void)(n);

  const fileStat = (size: number, mtime: number, blocks: number): Fuse.Stat => ({
    mode: 0o100644,
    uid,
    gid,
    nlink: 1,
    size,
    blksize: MAX_IO,
    blocks: Math.ceil((blocks * client.blockSize) / 512),
    atime: mtime,
    mtime,
    ctime: mtime,
  });
  const dirStat = (mtime: number): Fuse.Stat => ({ mode: 0o40755, uid, gid, nlink: 2, size: 4096, blksize: MAX_IO, atime: mtime, mtime, ctime: mtime });

  const getattr = async (p: string): Promise<Fuse.Stat> => {
    const s = await client.stat(p);
    if (s.type === 'dir') return dirStat(s.mtime);
    // Our own writes not committed yet: the kernel must see the size it wrote.
    const open = byIno.get(s.ino);
    if (open?.file.isDirty) return fileStat(open.file.size, Date.now(), s.blocks);
    return fileStat(s.size, s.mtime, s.blocks);
  };

  /** Open (or share) the file at `p`; `create` makes it if missing. */
  const openShared = async (p: string, create: boolean): Promise<number> => {
    let ino: number | undefined;
    try {
      const s = await client.stat(p);
      if (s.type === 'dir') throw new CfsError('EISDIR', `is a directory: ${p}`);
      ino = s.ino;
    } catch (e) {
      if (!(e instanceof CfsError && e.code === 'ENOENT' && create)) throw e;
    }
    let shared = ino === undefined ? undefined : byIno.get(ino);
    if (shared) {
      shared.refs++;
      // Close-to-open: a new open sees what others committed, unless we have writes of our own.
      await shared.file.refresh().catch(() => {});
      shared.readAhead.invalidate();
    } else {
      const pending = ino === undefined ? undefined : opening.get(ino);
      if (pending) {
        shared = await pending;
        shared.refs++;
      } else {
        const started = client.open(p, 'r+', { create }).then((file): Shared => {
          const existing = byIno.get(file.ino);
          if (existing) {
            void file.close({ discard: true });
            return existing;
          }
          const s: Shared = { file, readAhead: new ReadAhead(file), refs: 0 };
          byIno.set(file.ino, s);
          return s;
        });
        if (ino !== undefined) opening.set(ino, started);
        try {
          shared = await started;
        } finally {
          if (ino !== undefined) opening.delete(ino);
        }
        shared.refs++;
      }
    }
    const fd = nextFd++;
    fds.set(fd, shared);
    return fd;
  };

  const byFd = (fd: number): Shared => {
    const s = fds.get(fd);
    if (!s) throw new CfsError('EBADF', `no open file ${fd}`);
    return s;
  };

  const release = async (fd: number): Promise<void> => {
    const s = fds.get(fd);
    if (!s) return;
    fds.delete(fd);
    if (--s.refs > 0) return;
    byIno.delete(s.file.ino);
    await s.file.close();
  };

  /** With an open file in this mount, change it there, so its own view stays right. */
  const truncatePath = async (p: string, size: number): Promise<void> => {
    const s = await client.stat(p);
    const open = byIno.get(s.ino);
    if (open) {
      await open.file.truncate(size);
      open.readAhead.invalidate();
    } else await client.truncate(p, size);
  };

  const ops: Fuse.Operations = {
    init: (cb) => cb(0),
    statfs: op(
      'statfs',
      async () => {
        const s = await client.space();
        const total = s.pairs.reduce((n, p) => n + p.totalBlocks, 0);
        const free = s.pairs.reduce((n, p) => n + p.freeBlocks, 0);
        return { bsize: s.blockSize, frsize: s.blockSize, blocks: total, bfree: free, bavail: free, files: s.files + s.dirs + 1_000_000, ffree: 1_000_000, favail: 1_000_000, fsid: 0, flag: 0, namemax: 255 };
      },
      value,
    ),
    getattr: op('getattr', getattr, value),
    access: (_p, _m, cb) => cb(0),
    readdir: op(
      'readdir',
      async (p: string) => ['.', '..', ...(await client.readdir(p)).map((e) => e.name)],
      value,
    ),
    open: op('open', (p: string) => openShared(p, false), value),
    create: op('create', (p: string) => openShared(p, true), value),
    read: op(
      'read',
      async (_p: string, fd: number, buf: Buffer, len: number, pos: number) => byFd(fd).readAhead.read(buf.subarray(0, len), pos),
      count,
    ),
    write: op(
      'write',
      async (_p: string, fd: number, buf: Buffer, len: number, pos: number) => {
        const s = byFd(fd);
        s.readAhead.invalidate();
        await s.file.write(buf.subarray(0, len), pos);
        return len;
      },
      count,
    ),
    flush: op('flush', async (_p: string, fd: number) => {
      const s = fds.get(fd);
      if (s?.file.isDirty) await s.file.sync();
    }, ok),
    fsync: op('fsync', async (_p: string, _d: boolean, fd: number) => {
      const s = fds.get(fd);
      if (s) await s.file.sync();
    }, ok),
    release: op('release', (_p: string, fd: number) => release(fd), ok),
    truncate: op('truncate', truncatePath, ok),
    ftruncate: op(
      'ftruncate',
      async (_p: string, fd: number, size: number) => {
        const s = byFd(fd);
        await s.file.truncate(size);
        s.readAhead.invalidate();
      },
      ok,
    ),
    // fuse-native passes the access time in both time arguments; a set time is a set time.
    utimens: op('utimens', (p: string, _a: number, m: number) => client.setMtime(p, m), ok),
    // No owners or permission bits are kept: accept the change (cp -p, tar) without storing it.
    chmod: (_p, _m, cb) => cb(0),
    chown: (_p, _u, _g, cb) => cb(0),
    unlink: op('unlink', (p: string) => client.unlink(p), ok),
    rename: op('rename', (a: string, b: string) => client.rename(a, b), ok),
    mkdir: op('mkdir', (p: string) => client.mkdir(p), ok),
    rmdir: op('rmdir', (p: string) => client.rmdir(p), ok),
  };

  const fuse = new CfsFuse(mnt, ops, { fsname: 'blockmirror-cfs', subtype: 'cfs', timeout: false, force: true });
  await new Promise<void>((resolve, reject) => fuse.mount((err) => (err ? reject(new CfsError('EIO', `cannot mount ${mnt}: ${err.message}`)) : resolve())));

  let unmounted = false;
  return {
    dir: mnt,
    async unmount() {
      if (unmounted) return;
      unmounted = true;
      await new Promise<void>((resolve) =>
        fuse.unmount((err) => {
          if (err) log.warn({ dir: mnt, err: err.message }, 'cfs mount: unmount failed');
          resolve();
        }),
      );
      // Whatever is still open gets its writes committed before the client goes.
      await Promise.all([...new Set(fds.values())].map((s) => s.file.close().catch((e: Error) => log.warn({ err: e.message }, 'cfs mount: commit at unmount failed'))));
      fds.clear();
      byIno.clear();
    },
  };
}

function errno(e: unknown): number {
  if (e instanceof CfsError) {
    const n = (Fuse as unknown as Record<string, number | undefined>)[e.code];
    return typeof n === 'number' ? n : Fuse.EIO;
  }
  return Fuse.EIO;
}

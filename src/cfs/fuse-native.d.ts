// The part of fuse-native (2.x, no bundled types) that src/cfs/fuse.ts uses.
// Callbacks take an errno as a negative number (Fuse.ENOENT is -2), or 0 and a value.
declare module 'fuse-native' {
  namespace Fuse {
    interface Stat {
      mode: number;
      uid?: number;
      gid?: number;
      size?: number;
      dev?: number;
      nlink?: number;
      ino?: number;
      rdev?: number;
      blksize?: number;
      blocks?: number;
      /** Milliseconds since the epoch, or a Date. */
      atime?: number | Date;
      mtime?: number | Date;
      ctime?: number | Date;
    }

    interface StatFs {
      bsize: number;
      frsize: number;
      blocks: number;
      bfree: number;
      bavail: number;
      files: number;
      ffree: number;
      favail: number;
      fsid: number;
      flag: number;
      namemax: number;
    }

    type Done = (code: number) => void;

    interface Operations {
      init?(cb: Done): void;
      statfs?(path: string, cb: (code: number, s?: StatFs) => void): void;
      getattr?(path: string, cb: (code: number, s?: Stat) => void): void;
      access?(path: string, mode: number, cb: Done): void;
      readdir?(path: string, cb: (code: number, names?: string[], stats?: Stat[]) => void): void;
      open?(path: string, flags: number, cb: (code: number, fd?: number) => void): void;
      create?(path: string, mode: number, cb: (code: number, fd?: number) => void): void;
      /** cb(bytes read) or cb(negative errno) */
      read?(path: string, fd: number, buf: Buffer, len: number, pos: number, cb: (result: number) => void): void;
      /** cb(bytes written) or cb(negative errno) */
      write?(path: string, fd: number, buf: Buffer, len: number, pos: number, cb: (result: number) => void): void;
      flush?(path: string, fd: number, cb: Done): void;
      fsync?(path: string, datasync: boolean, fd: number, cb: Done): void;
      release?(path: string, fd: number, cb: Done): void;
      truncate?(path: string, size: number, cb: Done): void;
      ftruncate?(path: string, fd: number, size: number, cb: Done): void;
      utimens?(path: string, atime: number, mtime: number, cb: Done): void;
      chmod?(path: string, mode: number, cb: Done): void;
      chown?(path: string, uid: number, gid: number, cb: Done): void;
      unlink?(path: string, cb: Done): void;
      rename?(src: string, dest: string, cb: Done): void;
      mkdir?(path: string, mode: number, cb: Done): void;
      rmdir?(path: string, cb: Done): void;
    }

    interface Options {
      debug?: boolean;
      force?: boolean;
      mkdir?: boolean;
      /** Per operation, in ms; false for none. */
      timeout?: number | false;
      fsname?: string;
      subtype?: string;
      allowOther?: boolean;
      maxRead?: number;
      attrTimeout?: number;
      entryTimeout?: number;
    }
  }

  class Fuse {
    constructor(mnt: string, ops: Fuse.Operations, opts?: Fuse.Options);
    readonly mnt: string;
    mount(cb: (err: Error | null) => void): void;
    unmount(cb: (err: Error | null) => void): void;
    /** The "-o a,b,c" string handed to libfuse. */
    protected _fuseOptions(): string;
    static unmount(mnt: string, cb: (err: Error | null) => void): void;
    static readonly EPERM: number;
    static readonly ENOENT: number;
    static readonly EIO: number;
    static readonly EBADF: number;
    static readonly EEXIST: number;
    static readonly ENOTDIR: number;
    static readonly EISDIR: number;
    static readonly EINVAL: number;
    static readonly ENOSPC: number;
    static readonly ENOTEMPTY: number;
    static readonly ENAMETOOLONG: number;
    static readonly ESTALE: number;
    static readonly EBUSY: number;
    static readonly ETIMEDOUT: number;
    static readonly EPROTO: number;
    static readonly ECONNRESET: number;
    static readonly EXDEV: number;
    static readonly ENOSYS: number;
  }

  export = Fuse;
}

// The block-device interface: what the NBD server (and later the mirroring
// controller, the cache and fault injection) sees of storage. Every layer
// above a backend wraps a BlockDevice and is itself a BlockDevice.
//
// Ranges are already validated by the caller (the NBD server checks bounds,
// alignment and capabilities before it calls in), so a device may assume
// 0 <= offset, offset + length <= size.

/** Write data: one buffer, or pieces written back to back. */
export type Payload = Buffer | readonly Buffer[];

export function payloadLength(p: Payload): number {
  if (Buffer.isBuffer(p)) return p.length;
  let n = 0;
  for (const b of p) n += b.length;
  return n;
}

/** Copy a payload's bytes into `into` from byte `at`; returns where they end. */
export function copyPayload(p: Payload, into: Buffer, at: number): number {
  if (Buffer.isBuffer(p)) return at + p.copy(into, at);
  for (const b of p) at += b.copy(into, at);
  return at;
}

/**
 * Views of a device's own memory holding one instant's bytes of a range (readViews). They stay
 * those bytes, whatever is written, trimmed or zeroed meanwhile, until release(): the NBD server
 * sends them with writev and releases them when the socket's write completes.
 */
export interface ReadViews {
  readonly pieces: readonly Buffer[];
  /** The views are no longer used: the device may change or reuse that memory. Idempotent. */
  release(): void;
}

/**
 * Fresh memory of a device that a WRITE's payload is read into straight from the socket
 * (writeTarget), then committed as the write, or aborted without touching the volume. Until
 * commit nothing can see it: no read, no other write, no view.
 */
export interface WriteTarget {
  /** To be filled, in order, with the payload's bytes from `from` (writeTarget's) to its end. */
  readonly pieces: readonly Buffer[];
  /**
   * Apply the write, `head` being the payload's bytes before `from`: the same effect and the
   * same ordering as write(offset, head + pieces) called at this moment (a filter's locks
   * included). The target is used up, whatever the outcome.
   */
  commit(head: Payload, fua?: boolean): Promise<void>;
  /** The payload will never be complete (a client gone mid-payload, a refused request): give the memory back. Idempotent; nothing after commit. */
  abort(): void;
  /**
   * Optional: views of `pieces` that keep the payload's bytes, whatever happens to the target
   * (commit, abort) or to the volume afterwards, until release(), as readViews' views do. Taken
   * before commit, it lets a sync pair write its mirrors from the very memory the master's write
   * committed, with no copy of its own, while later writes to those pages copy on write.
   */
  hold?(): ReadViews;
}

/**
 * A target's bytes copied out, after `head`: what a layer writes with write() when the target
 * cannot be committed where it was taken (the layer below changed since, a fault set appeared).
 * The caller aborts the target afterwards.
 */
export function landedPayload(head: Payload, target: WriteTarget): Buffer[] {
  return [...(Buffer.isBuffer(head) ? [head] : head), Buffer.concat(target.pieces)];
}

/** One run of equal allocation state, as base:allocation reports it. */
export interface Extent {
  length: number;
  /** bit0 HOLE, bit1 ZERO (NBD_STATE_*). 0 means allocated data. */
  flags: number;
}

export interface ZeroOptions {
  /** Keep the range allocated (NBD_CMD_FLAG_NO_HOLE). */
  noHole?: boolean;
  /** Fail fast with ENOTSUP unless zeroing is cheaper than writing (NBD_CMD_FLAG_FAST_ZERO). */
  fastZero?: boolean;
  fua?: boolean;
}

export interface BlockDevice {
  /** Size in bytes. */
  readonly size: number;
  readonly readOnly: boolean;
  /**
   * True when a flush through any handle makes every write acknowledged on
   * any handle durable (one shared cache, or none): lets the server
   * advertise CAN_MULTI_CONN honestly.
   */
  readonly multiConnSafe: boolean;
  /** Can zero() honour fastZero (i.e. is zeroing cheaper than writing)? */
  readonly fastZero: boolean;

  /** Fill dest (dest.length bytes) from offset. The only copy of the payload. */
  read(offset: number, dest: Buffer): Promise<void>;
  /**
   * Write data at offset; with fua, durable before the promise resolves.
   * A payload may arrive as a list of pieces (views into the receive
   * buffers), so it is copied at most once, into the store.
   */
  write(offset: number, data: Payload, fua?: boolean): Promise<void>;
  /** Make every completed write durable. */
  flush(): Promise<void>;
  /** Discard a range: contents afterwards read as zero in our backends. */
  trim(offset: number, length: number, fua?: boolean): Promise<void>;
  /** Make a range read back as zeroes. */
  zero(offset: number, length: number, opts?: ZeroOptions): Promise<void>;
  /** Allocation map of [offset, offset+length): contiguous extents, each length > 0, covering at least one byte. */
  extents(offset: number, length: number): Promise<Extent[]>;
  /**
   * Zero-copy read, optional: stable views of [offset, offset+length) (see ReadViews), or null
   * when the device cannot give them now (the caller then read()s a copy). Only a device that
   * can keep such views stable offers it, and a filter forwards it only where its read() would
   * return the same bytes at the same instant: FilterDevice does not forward it, a layer opts in.
   */
  readViews?(offset: number, length: number): ReadViews | null;
  /**
   * Zero-copy write, optional: memory to read bytes [from, length) of a WRITE to
   * [offset, offset+length) into (see WriteTarget), or null when the device cannot give it now
   * (the caller then write()s a buffer). Like readViews, FilterDevice does not forward it: a
   * layer opts in only if its write() would do nothing but pass the bytes down.
   */
  writeTarget?(offset: number, length: number, from: number): WriteTarget | null;
  /** Prefetch hint; may do nothing. */
  cache?(offset: number, length: number): Promise<void>;
  close(): Promise<void>;
}

/**
 * An error from a block device. It carries a POSIX errno name; the NBD
 * server maps it to the wire in exactly one place (nbd/errors.ts).
 */
export class BlockDeviceError extends Error {
  // A string, so a more precise failure (a member's checksum mismatch) can be a subclass with its own name.
  override readonly name: string = 'BlockDeviceError';
  constructor(
    readonly errno: Errno,
    message: string,
    options?: { cause?: unknown },
  ) {
    super(message, options);
  }
}

export type Errno =
  | 'EPERM'
  | 'EIO'
  | 'ENOMEM'
  | 'EINVAL'
  | 'ENOSPC'
  | 'EOVERFLOW'
  | 'ENOTSUP'
  | 'ESHUTDOWN'
  | 'EDQUOT'
  | 'EFBIG'
  | 'EROFS';

/** Wrap any thrown value (a Node fs error, say) as a BlockDeviceError. */
export function toBlockDeviceError(err: unknown, op: string): BlockDeviceError {
  if (err instanceof BlockDeviceError) return err;
  const code = (err as NodeJS.ErrnoException | undefined)?.code;
  const known: readonly string[] = ['EPERM', 'EIO', 'ENOMEM', 'EINVAL', 'ENOSPC', 'EOVERFLOW', 'ENOTSUP', 'EDQUOT', 'EFBIG', 'EROFS'];
  const errno = (code && known.includes(code) ? code : code === 'EOPNOTSUPP' ? 'ENOTSUP' : 'EIO') as Errno;
  const msg = err instanceof Error ? err.message : String(err);
  return new BlockDeviceError(errno, `${op}: ${msg}`, { cause: err });
}

// Every request the group sends to a member volume (not the P-VOL, not increments volumes) goes
// through here, which adds what a member needs and a plain volume does not:
//
//   concern         read                                   write
//   checksums       checked per 4 KiB block (checksums.ts)  forgotten before, recorded after
//   hang timeout    EIO (MemberTimeoutError) after ioTimeout; the request may still finish later:
//                   a read lands in a private buffer, never in the host's
//   in flight       counted per volume (a role change waits)  kept with its range: a read whose
//                                                            bad block a write overlapped gets no verdict
//
// A timeout or a checksum mismatch is an EIO, so the group's ordinary recovery handles it: the
// host's request is served by a sibling and the member is rebuilt.
import { BlockDeviceError, type BlockDevice, type Payload } from '../../blockdev/types.js';
import { SUM_BLOCK, type ChecksumTables } from './checksums.js';

/** A member's bytes are not what the group wrote there: a silent data error, found on read. */
export class ChecksumMismatchError extends BlockDeviceError {
  override readonly name = 'ChecksumMismatchError';
  readonly code = 'ECHECKSUM';
  constructor(
    readonly vol: number,
    readonly at: number,
    message: string,
  ) {
    super('EIO', message);
  }
}

/** A member's request did not complete within ioTimeout: the volume hangs (offline, a dead path). */
export class MemberTimeoutError extends BlockDeviceError {
  override readonly name = 'MemberTimeoutError';
  readonly code = 'ETIMEDOUT';
  constructor(
    readonly vol: number,
    message: string,
  ) {
    super('EIO', message);
  }
}

/** Extent flag: the range reads as zeroes (NBD_STATE_ZERO). */
const EXTENT_ZERO = 2;
/** A read that raced writes to its volume this many times in a row is returned unchecked. */
const RACED_RETRIES = 3;
/** Writes remembered per volume for telling a raced read from a bad block; older ones count as racing every read. */
const RECENT_WRITES = 256;

/** A write to a member volume: seq when it started, and when it ended (undefined: in flight). */
interface RecentWrite {
  offset: number;
  end: number;
  started: number;
  ended: number | undefined;
}

export class MemberIo {
  private readonly readsIn = new Map<number, Set<Promise<void>>>();
  /** Bumped when a write to the volume starts and when it ends. */
  private readonly writeSeq = new Map<number, number>();
  /** The volume's writes in flight and the last ones that ended, oldest first. */
  private readonly recent = new Map<number, RecentWrite[]>();
  /** Timeouts and mismatches so far (status). */
  timeouts = 0;
  mismatches = 0;

  constructor(
    private readonly dev: (vol: number) => BlockDevice,
    readonly sums: ChecksumTables,
    /** 0: no timeout. */
    readonly timeoutMs: number,
    private readonly size: number,
  ) {}

  readsInFlight(vol: number): number {
    return this.readsIn.get(vol)?.size ?? 0;
  }

  /** Resolves once every counted read of `vol` in flight now has ended (later ones are not waited for). */
  async readsDone(vol: number): Promise<void> {
    await Promise.allSettled([...(this.readsIn.get(vol) ?? [])]);
  }

  /**
   * Read `dest.length` bytes of `vol` at `offset`, checked against the checksums. Counted in
   * flight unless `uncounted` (the reads of the member being rebuilt itself). `own`: `dest` is
   * the caller's, who drops it if the read fails (a restore's copy buffer), so a block-aligned
   * read may land in it straight, without a buffer of its own and a copy.
   */
  read(vol: number, offset: number, dest: Buffer, uncounted = false, own = false): Promise<void> {
    const p = this.checkedRead(vol, offset, dest, own);
    if (uncounted) return p;
    // Counted before the first await: a caller that picked `vol` and a role change never interleave.
    let set = this.readsIn.get(vol);
    if (!set) this.readsIn.set(vol, (set = new Set()));
    set.add(p);
    return p.finally(() => set.delete(p));
  }

  private async checkedRead(vol: number, offset: number, dest: Buffer, own: boolean): Promise<void> {
    // Whole blocks, so each can be checked; into a buffer of our own, which a read that
    // outlives its timeout may still fill without touching the host's.
    const start = Math.floor(offset / SUM_BLOCK) * SUM_BLOCK;
    const end = Math.min(this.size, Math.ceil((offset + dest.length) / SUM_BLOCK) * SUM_BLOCK);
    const straight = own && start === offset && end === offset + dest.length;
    for (let attempt = 0; ; attempt++) {
      const seq = this.writeSeq.get(vol) ?? 0;
      const buf = straight ? dest : Buffer.allocUnsafeSlow(end - start);
      await this.timed(this.dev(vol).read(start, buf), vol, `read at ${start}`);
      const bad = this.sums.check(vol, start, buf);
      if (bad) {
        const raced = this.raced(vol, seq, bad.offset);
        if (raced && attempt < RACED_RETRIES) continue;
        if (!raced) {
          this.mismatches++;
          throw new ChecksumMismatchError(
            vol,
            bad.offset,
            `volume ${vol}: checksum mismatch in the 4 KiB block at byte ${bad.offset} (written with CRC32C ${hex(bad.stored)}, read back ${hex(bad.computed)}): a silent data error`,
          );
        }
      }
      if (!straight) buf.copy(dest, 0, offset - start, offset - start + dest.length);
      return;
    }
  }

  /**
   * Run `op`, a write of `length` bytes at `offset` to `vol` whose bytes are `data` (null: zeroes;
   * undefined: not known, the blocks stay unchecked until written again). `copyOf`: `data` was
   * read (checked) from that volume at the same offset, whose known checksums it takes over.
   */
  async write(vol: number, offset: number, length: number, data: Payload | null | undefined, op: () => Promise<void>, copyOf?: number): Promise<void> {
    this.sums.forget(vol, offset, length);
    const w: RecentWrite = { offset, end: offset + length, started: this.bump(vol), ended: undefined };
    let list = this.recent.get(vol);
    if (!list) this.recent.set(vol, (list = []));
    const mine = list;
    mine.push(w);
    // In flight until the volume answers, even past a timeout: a late write still races reads.
    const done = op().finally(() => {
      w.ended = this.bump(vol);
      // Forget the oldest that ended; those in flight stay (they still race).
      while (mine.length > RECENT_WRITES) {
        const k = mine.findIndex((x) => x.ended !== undefined);
        if (k < 0) break;
        mine.splice(k, 1);
      }
    });
    await this.timed(done, vol, `write at ${offset}`);
    if (data !== undefined) this.sums.record(vol, offset, length, data, copyOf);
  }

  /**
   * Does `vol` say it reads as zeroes over [offset, offset+length) (its extents), with no
   * checksum there that knows other bytes? Then a copy of the range may zero its target
   * instead of reading it. Timed like a read: a volume that hangs fails it.
   */
  async readsAsZeroes(vol: number, offset: number, length: number): Promise<boolean> {
    if (this.sums.knownNonZero(vol, offset, length)) return false;
    const extents = await this.timed(this.dev(vol).extents(offset, length), vol, `block status at ${offset}`);
    let covered = 0;
    for (const e of extents) {
      if (!(e.flags & EXTENT_ZERO)) return false;
      covered += e.length;
    }
    return covered >= length;
  }

  private bump(vol: number): number {
    const n = (this.writeSeq.get(vol) ?? 0) + 1;
    this.writeSeq.set(vol, n);
    return n;
  }

  /**
   * Did a write to the block at `at` run while a read that started at write seq `seq` did? Then
   * the read may hold the old bytes against the new checksum. Writes elsewhere on the volume do
   * not excuse a bad block (the destager writes other blocks of an RW member all the time).
   */
  private raced(vol: number, seq: number, at: number): boolean {
    const list = this.recent.get(vol) ?? [];
    // Writes forgotten since the read began: it may have raced one of them.
    if (list.length >= RECENT_WRITES && list[0]!.started > seq) return true;
    return list.some((x) => x.offset < at + SUM_BLOCK && at < x.end && (x.ended === undefined || x.ended > seq));
  }

  flush(vol: number): Promise<void> {
    return this.timed(this.dev(vol).flush(), vol, 'flush');
  }

  private timed<T>(p: Promise<T>, vol: number, what: string): Promise<T> {
    if (!this.timeoutMs) return p;
    let timer: NodeJS.Timeout | undefined;
    const expired = new Promise<never>((_, reject) => {
      timer = setTimeout(() => {
        this.timeouts++;
        reject(new MemberTimeoutError(vol, `volume ${vol}: ${what} did not complete in ${this.timeoutMs} ms (ioTimeout): the volume hangs`));
      }, this.timeoutMs);
    });
    // Its end after the timeout concerns nobody: the member is already being replaced.
    p.catch(() => {});
    return Promise.race([p, expired]).finally(() => clearTimeout(timer));
  }
}

function hex(n: number): string {
  return `0x${n.toString(16).padStart(8, '0')}`;
}

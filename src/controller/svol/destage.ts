// The destager of an S-VOL group's RW members (issue 15). A host write to a split RW member is
// acknowledged once it is in the member's increments volume (slot + map): the increments hold
// the whole current cluster of every changed cluster, so they are the truth for those clusters.
// The member's own volume is brought up to date behind the host, one run at a time:
//
//   cluster of an RW member     where its current bytes are        a read of the logical ID
//   unchanged since the split   the member's volume                the member's volume
//   changed, destaged           increments slot = member's volume  the member's volume
//   changed, pending            increments slot only               the increments slot
//
// Which clusters are pending is kept in memory only: a restart marks every changed cluster
// pending again (destaging a cluster twice writes the same bytes), so nothing is persisted.
//
// Within a pending cluster only the 4 KiB blocks host writes touched since its last destage
// differ from the member's volume (the rest of the slot is the cluster's base, read from that
// volume, or was destaged before), so a run copies those blocks alone: a 4 KiB random write
// costs a 4 KiB destage, not a whole cluster's read, write and checksum.
//
//   pending cluster of            blocks copied
//   a host write                  the blocks it touched (and those of earlier writes not destaged)
//   a restart                     all of the cluster (what was destaged before is not known)
//
// A destage run holds the member's logical lock over its clusters: a host write to them waits
// for one run (at most DESTAGE_RUN bytes), and every command that takes the member's whole
// range (init, resync, attr, the end of a restore) finds no run in flight and the member's
// state changed under the lock, so no destage write lands after it. A destage write that fails
// with EIO fails the member as a host write would (the RW recovery); the host saw no error.
import type { Logger } from 'pino';
import type { RangeLock } from '../../blockdev/range-lock.js';
import { BlockDeviceError } from '../../blockdev/types.js';
import { ClusterBitmap } from '../bitmap.js';

/** Bytes one destage run covers (its clusters are locked against host writes meanwhile). */
export const DESTAGE_RUN = 1024 * 1024;
/** What a host write marks for the destage: a cluster's blocks of this size (the checksums' block). */
const DESTAGE_BLOCK = 4096;

/** What the destager needs of the group. */
export interface DestageHost {
  readonly clusterSize: number;
  readonly clusters: number;
  readonly size: number;
  readonly log: Logger;
  /** The member's volume while it is a split RW member the destager may write; undefined otherwise. */
  target(i: number): number | undefined;
  lock(i: number): RangeLock;
  /** Read cluster c's increments slot of member i, `dest.length` bytes from `within` bytes into it. */
  readSlot(i: number, c: number, within: number, dest: Buffer): Promise<void>;
  /** Write the member's volume (checksums recorded, hang timeout). */
  writeMember(vol: number, offset: number, data: Buffer): Promise<void>;
  flushMember(vol: number): Promise<void>;
  /** Member i's increments map is durable up to its last entry (before any member write of its clusters). */
  mapDurable(i: number): Promise<void>;
  /** The member's volume failed: the RW recovery. */
  fail(i: number, op: string, err: Error, vol: number): void;
  /** The group is closing: stop. */
  readonly closed: boolean;
}

export class Destager {
  /** Per logical member: clusters whose current bytes are in the increments only. */
  private readonly pending: ClusterBitmap[] = [];
  /** Per logical member: the blocks of its pending clusters that differ from its volume. */
  private readonly dirty: ClusterBitmap[] = [];
  private running: Promise<void> | null = null;
  /** Set by add(): the loop's pass that found nothing to do looks again. */
  private again = false;
  /** Bytes a dirty bit stands for: DESTAGE_BLOCK, or the cluster if that does not divide it. */
  private readonly unit: number;
  private readonly blocks: number;
  constructor(private readonly host: DestageHost) {
    this.unit = host.clusterSize % DESTAGE_BLOCK === 0 ? DESTAGE_BLOCK : host.clusterSize;
    this.blocks = Math.ceil(host.size / this.unit);
  }

  private bm(i: number): ClusterBitmap {
    while (this.pending.length <= i) {
      this.pending.push(new ClusterBitmap(this.host.clusters));
      this.dirty.push(new ClusterBitmap(this.blocks));
    }
    return this.pending[i]!;
  }

  /** Clusters of member i not yet on its volume. */
  pendingCount(i: number): number {
    return this.pending[i]?.invalidCount ?? 0;
  }

  /** Any of clusters first..last of member i pending: a read must take those from the increments. */
  anyPending(i: number, first: number, last: number): boolean {
    const b = this.pending[i];
    return b !== undefined && b.invalidCount > 0 && b.anyInvalid(first, last);
  }

  isPending(i: number, c: number): boolean {
    return this.pending[i]?.isInvalid(c) ?? false;
  }

  /** A write of `length` bytes at `offset` to member i was logged (the caller holds its clusters' lock): destage it. */
  add(i: number, offset: number, length: number): void {
    const cs = this.host.clusterSize;
    this.bm(i).setRangeInvalid(Math.floor(offset / cs), Math.floor((offset + length - 1) / cs));
    this.dirty[i]!.setRangeInvalid(Math.floor(offset / this.unit), Math.floor((offset + length - 1) / this.unit));
    this.again = true;
    this.wake();
  }

  /** Clusters of member i, changed before a restart: destage them again, whole. */
  addAll(i: number, clusters: Iterable<number>): void {
    const b = this.bm(i);
    const per = this.host.clusterSize / this.unit;
    for (const c of clusters) {
      b.setInvalid(c);
      this.dirty[i]!.setRangeInvalid(c * per, Math.min(this.blocks, (c + 1) * per) - 1);
    }
    this.again = true;
    this.wake();
  }

  /**
   * Member i's volume no longer takes destage writes (resync, init, a restore that applied the
   * increments, a new split). The caller holds the member's whole range locked, so no run is
   * in flight for it.
   */
  forget(i: number): void {
    if (!this.pending[i]) return;
    this.pending[i] = new ClusterBitmap(this.host.clusters);
    this.dirty[i] = new ClusterBitmap(this.blocks);
  }

  /** Resolves once no member has a pending cluster the destager can write, or it stopped. */
  async drained(): Promise<void> {
    while (this.running) await this.running;
  }

  wake(): void {
    if (this.running || this.host.closed) return;
    this.running = this.loop()
      .catch((e: Error) => this.host.log.error({ err: e.message }, `destage stopped: ${e.message}`))
      .finally(() => {
        this.running = null;
      });
  }

  private async loop(): Promise<void> {
    const cs = this.host.clusterSize;
    const maxRun = Math.max(1, Math.floor(DESTAGE_RUN / cs));
    const buf = Buffer.allocUnsafe(maxRun * cs);
    for (;;) {
      let did = false;
      this.again = false;
      const written = new Set<number>();
      for (let i = 0; i < this.pending.length; i++) {
        const bm = this.pending[i]!;
        let c = bm.nextInvalid(0);
        while (c >= 0 && !this.host.closed && this.host.target(i) !== undefined) {
          let end = c;
          while (end + 1 < this.host.clusters && end - c + 1 < maxRun && bm.isInvalid(end + 1)) end++;
          const off = c * cs;
          const len = Math.min((end + 1) * cs, this.host.size) - off;
          // The run's clusters are in the map (logged before add()): durable before the member changes.
          await this.host.mapDurable(i);
          const release = await this.host.lock(i).acquire(off, len);
          let failed = false;
          try {
            // Under the lock: the member may have been resynced, failed or remapped meanwhile.
            const vol = this.host.target(i);
            const cur = this.pending[i];
            if (vol === undefined || cur !== bm) break;
            // Only this loop clears bits, and forget() swaps the bitmaps: c..end are all still pending.
            const dirty = this.dirty[i]!;
            const spans = this.dirtySpans(dirty, off, off + len);
            // A failing increments volume is not the member's fault: that stops the destage (logged).
            await Promise.all(spans.map(([from, to]) => this.readSpan(i, buf, off, from, to)));
            try {
              await Promise.all(spans.map(([from, to]) => this.host.writeMember(vol, from, buf.subarray(from - off, to - off))));
            } catch (e) {
              if (!(e instanceof BlockDeviceError) || e.errno !== 'EIO') throw e;
              // The increments keep every write: the member is rebuilt by the RW recovery.
              this.host.fail(i, 'write', e, vol);
              failed = true;
            }
            if (!failed) {
              written.add(vol);
              for (let k = c; k <= end; k++) bm.setValid(k);
              for (const [from, to] of spans) for (let b = from / this.unit; b * this.unit < to; b++) dirty.setValid(b);
            }
          } finally {
            release();
          }
          if (failed) break;
          did = true;
          // Host I/O first: the next run starts after the event loop has served what is queued.
          await new Promise((r) => setImmediate(r));
          c = end + 1 < this.host.clusters ? bm.nextInvalid(end + 1) : -1;
          if (c >= 0 && c <= end) c = -1;
        }
      }
      // Durable on the members before the loop rests (a restart would destage them again anyway).
      for (const vol of written) await this.host.flushMember(vol).catch((e: Error) => this.host.log.warn({ vol, err: e.message }, `destage: flush of volume ${vol}: ${e.message}`));
      if ((!did && !this.again) || this.host.closed) return;
    }
  }

  /** Byte ranges of dirty blocks in [start, end) (block-aligned, ascending, each a run of neighbours). */
  private dirtySpans(dirty: ClusterBitmap, start: number, end: number): [number, number][] {
    const out: [number, number][] = [];
    const last = Math.ceil(end / this.unit) - 1;
    for (let b = start / this.unit; b <= last; b++) {
      if (!dirty.isInvalid(b)) continue;
      let e = b;
      while (e + 1 <= last && dirty.isInvalid(e + 1)) e++;
      out.push([b * this.unit, Math.min(end, (e + 1) * this.unit)]);
      b = e;
    }
    return out;
  }

  /** Bytes [from, to) of member i from its slots into `buf` (the run's, which starts at byte `runAt`). */
  private async readSpan(i: number, buf: Buffer, runAt: number, from: number, to: number): Promise<void> {
    const cs = this.host.clusterSize;
    const reads: Promise<void>[] = [];
    for (let at = from; at < to; ) {
      const c = Math.floor(at / cs);
      const stop = Math.min(to, (c + 1) * cs);
      reads.push(this.host.readSlot(i, c, at - c * cs, buf.subarray(at - runAt, stop - runAt)));
      at = stop;
    }
    await Promise.all(reads);
  }
}

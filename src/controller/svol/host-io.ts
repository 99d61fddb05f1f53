// A logical member's host I/O (docs/svol.md): reads by the member's state (its volume, the P-VOL
// while a cluster is not copied yet, a sibling when it failed, its increments for what it wrote),
// writes of an RW member into its increments, flushes. Split from group-core.ts, which keeps the
// group's state, its record and the copy; recovery.ts builds on both.
// What each state does to a read and a write: the table at the top of group-core.ts.
import { BlockDeviceError, payloadLength, type Payload } from '../../blockdev/types.js';
import { clusterRange } from '../bitmap.js';
import type { LogicalRecord } from './group-file.js';
import { SvolGroupCore } from './group-core.js';

export abstract class SvolGroupHostIo extends SvolGroupCore {
  /** Where the next spread read starts among the RO siblings (round robin). */
  private spreadNext = 0;

  logical(i: number): LogicalRecord {
    return this.rec.logical[i]!;
  }

  isReadOnly(i: number): boolean {
    const l = this.rec.logical[i]!;
    return l.attr === 'RO' || l.state === 'paired' || l.state === 'simplex';
  }

  async logicalRead(i: number, offset: number, dest: Buffer): Promise<void> {
    const l = this.rec.logical[i]!;
    if (l.state === 'error' || l.state === 'restoring') return this.degradedRead(i, offset, dest);
    const [first, last] = clusterRange(offset, dest.length, this.ctx.clusterSize);
    if (l.state === 'paired' && this.bitmaps[i]!.anyInvalid(first, last)) {
      this.count(this.spec.pvol, 'reads');
      return this.dev(this.spec.pvol).read(offset, dest);
    }
    for (;;) {
      const j = this.readerFor(i);
      const vol = this.rec.logical[j]!.vol;
      // A split RW member's clusters not destaged yet are current only in its increments.
      const pending = j === i && this.destage.anyPending(i, first, last);
      if (!pending) this.count(vol, 'reads');
      try {
        // Only the pending ones from there: the member's own volume (and its checksums) serves the rest.
        if (pending) return await this.readFrom(i, vol, offset, dest, false, (c) => this.destage.isPending(i, c));
        return await this.readVol(vol, offset, dest);
      } catch (e) {
        if (!(e instanceof BlockDeviceError) || e.errno !== 'EIO' || this.rec.logical[j]!.state === 'simplex') throw e;
        // The host's read succeeds from a sibling (or the P-VOL); the recovery starts behind it.
        this.fail(j, 'read', e, vol);
        // Read by the map as it is now: the member degraded or remapped (or, when the request
        // outlived a remap, on its new volume).
        if (j === i) return this.logicalRead(i, offset, dest);
        // A sibling that served a spread read failed: it is out of the spread now; next pick.
      }
    }
  }

  /**
   * Which member serves a read of logical i: i itself, or with spreadReads (an RO member, split)
   * any healthy RO member of its split generation, which holds the same bytes. In turn, skipping
   * those with more reads in flight. The pick and the count of the read in flight happen without
   * an await between them, so a role change that waits for a volume's reads sees this one.
   */
  protected readerFor(i: number): number {
    const me = this.rec.logical[i]!;
    if (!this.spec.spreadReads || me.attr !== 'RO' || me.state !== 'split') return i;
    const same: number[] = [];
    this.rec.logical.forEach((l, j) => {
      if (l.attr === 'RO' && l.state === 'split' && l.generation === me.generation) same.push(j);
    });
    const start = this.spreadNext++ % same.length;
    let best = same[start]!;
    for (let k = 1; k < same.length; k++) {
      const j = same[(start + k) % same.length]!;
      if (this.io.readsInFlight(this.rec.logical[j]!.vol) < this.io.readsInFlight(this.rec.logical[best]!.vol)) best = j;
    }
    return best;
  }

  /** Serve a failed member: the P-VOL while paired; else an RO sibling of its generation, its increments first. */
  protected async degradedRead(i: number, offset: number, dest: Buffer): Promise<void> {
    const l = this.rec.logical[i]!;
    // A member without a split generation is (or was) paired: the P-VOL holds its data.
    if (l.generation === undefined) {
      this.count(this.spec.pvol, 'reads');
      return this.dev(this.spec.pvol).read(offset, dest);
    }
    // The member being rebuilt reads its own donor: those reads never hold up its last step.
    const mine = this.rec.restore?.logical === i;
    for (;;) {
      const pick = mine ? undefined : this.donorFor(i);
      const donor = mine ? this.rec.restore!.donor : pick?.vol;
      if (donor === undefined) throw new BlockDeviceError('EIO', `${this.name}: vol${l.id} has failed and no RO sibling of split generation ${l.generation} can serve it`);
      try {
        return await this.readFrom(i, donor, offset, dest, mine);
      } catch (e) {
        // A donor that fails its checksum (or its disk) is failed in turn; the next sibling serves.
        if (mine || !pick || !(e instanceof BlockDeviceError) || e.errno !== 'EIO') throw e;
        this.fail(pick.index, 'read', e, pick.vol);
      }
    }
  }

  /** Logical i's bytes from `donor`, its increments first (RW): every changed cluster, or those `fromIncr` says. */
  protected async readFrom(i: number, donor: number, offset: number, dest: Buffer, mine: boolean, fromIncr?: (c: number) => boolean): Promise<void> {
    const l = this.rec.logical[i]!;
    this.count(donor, 'reads');
    const incr = this.incr.get(i);
    if (l.attr !== 'RW' || !incr || incr.count === 0) return this.readVol(donor, offset, dest, mine);
    const cs = this.ctx.clusterSize;
    for (let at = offset; at < offset + dest.length; ) {
      const c = Math.floor(at / cs);
      const end = Math.min(offset + dest.length, (c + 1) * cs);
      const piece = dest.subarray(at - offset, end - offset);
      if (incr.has(c) && (!fromIncr || fromIncr(c))) await incr.read(c, at - c * cs, piece);
      else await this.readVol(donor, at, piece, mine);
      at = end;
    }
  }

  async logicalWrite(i: number, offset: number, data: Payload): Promise<void> {
    const l = this.rec.logical[i]!;
    if (l.attr === 'RO') throw new BlockDeviceError('EPERM', `vol${l.id} is an RO S-VOL of group ${this.name}: host writes are refused`);
    if (l.state === 'paired' || l.state === 'simplex') throw new BlockDeviceError('EPERM', `vol${l.id} is ${l.state === 'paired' ? 'paired with its P-VOL' : 'not initialized'} in group ${this.name}: writable once the group is split`);
    const incr = this.incr.get(i)!;
    const cs = this.ctx.clusterSize;
    const [first, last] = clusterRange(offset, payloadLength(data), cs);
    // Whole clusters: two writes into one cluster must not both give it a new increments slot.
    const release = await this.logicalLocks[i]!.acquire(first * cs, (last + 1 - first) * cs);
    try {
      // The increments map is this write's intent on disk: after a crash the group takes its
      // clusters as changed (open), and no member write of them starts before the map entry
      // is durable (destage, restore). The bitmap's own bits follow in the background, so a
      // first write to a cluster waits for no bitmap flush.
      this.bitmaps[i]!.setRangeInvalid(first, last);
      void this.store.mark([i], first, last).catch((e: Error) => this.log.warn({ err: e.message }, `S-VOL group ${this.name}: bitmap: ${e.message}`));
      // Acknowledged once in the increments (the truth for changed clusters); the member's
      // volume follows behind the host (destage.ts), or a restore applies the increments.
      await incr.log(offset, data, this.size, (c, buf) => this.baseOf(i, c, buf));
      if (l.state === 'split') this.destage.add(i, offset, payloadLength(data));
    } finally {
      release();
    }
  }

  /** What cluster c of logical i holds before a first write since the split. */
  protected async baseOf(i: number, c: number, buf: Buffer): Promise<void> {
    const l = this.rec.logical[i]!;
    const at = c * this.ctx.clusterSize;
    if (l.state === 'split') {
      const vol = l.vol;
      try {
        return await this.readVol(vol, at, buf);
      } catch (e) {
        if (!(e instanceof BlockDeviceError) || e.errno !== 'EIO') throw e;
        this.fail(i, 'read', e, vol);
      }
    }
    return this.degradedRead(i, at, buf);
  }

  async logicalFlush(i: number): Promise<void> {
    const l = this.rec.logical[i]!;
    await this.incr.get(i)?.flush();
    // An RW member's writes are durable in its increments; the destager flushes the member's volume.
    if ((l.state !== 'split' && l.state !== 'paired') || (l.attr === 'RW' && l.state === 'split')) return;
    await this.io.flush(l.vol);
  }

  /** Flush the members a P-VOL write reaches (paired ones). */
  async flushPaired(): Promise<void> {
    await Promise.all(
      this.rec.logical.map(async (l, i) => {
        if (l.state !== 'paired') return;
        const vol = l.vol;
        try {
          await this.io.flush(vol);
        } catch (e) {
          // The P-VOL holds the writes: a member that cannot make them durable is replaced and recopied.
          this.fail(i, 'flush', e as Error, vol);
        }
      }),
    );
  }
}

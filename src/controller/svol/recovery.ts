// An S-VOL group's recovery (Tomita, US 7,146,526; docs/svol.md "Recovery"): a member that failed
// under I/O (EIO, a checksum mismatch, a hang past ioTimeout) is rebuilt from the least-accessed
// healthy RO sibling of the SAME split generation, and its logical ID remapped onto the result:
//
//   failure of      spare available                        no spare
//   RO, split       copy donor -> spare, remap ID          reads served by the donor (error)
//   RW, split       copy donor -> spare, remap the donor's  reads from increments + donor,
//                   RO ID to it; increments -> donor's     writes to the increments (error)
//                   volume, remap the RW ID there (claim 1)
//   any, paired     remap ID to the spare, full copy        reads from the P-VOL (error)
//   restore by hand the same, or in place without a spare
//
// One restore at a time; its progress is in the group record, so a restart resumes it.
import { BlockDeviceError } from '../../blockdev/types.js';
import { PairCommandError } from '../status.js';
import { COPY_RUN } from './group-core.js';
import { SvolGroupHostIo } from './host-io.js';
import type { RestoreRecord } from './group-file.js';
import type { IncrementsVolume } from './increments.js';

/** A restore records its progress this often (bytes), so a restart resumes near where it stopped. */
export const RESTORE_CHECKPOINT = 16 * 1024 * 1024;
/** Copy runs of a restore in flight at once. */
const RESTORE_DEPTH = 4;

export abstract class SvolGroupRecovery extends SvolGroupHostIo {
  /** A member's volume failed under host I/O: mark it, and start its recovery in the background. */
  protected override fail(i: number, op: string, err: Error, vol?: number): void {
    const l = this.rec.logical[i]!;
    if (l.state === 'error' || l.state === 'restoring' || (vol !== undefined && vol !== l.vol)) return;
    l.state = 'error';
    l.error = `${op}: ${err.message}`;
    this.log.error({ logical: l.id, vol: l.vol, err: err.message }, `S-VOL group ${this.name}: vol${l.id} (volume ${l.vol}) failed on ${op}; recovering`);
    this.save();
    try {
      this.recover(i, l.error, false);
    } catch (e) {
      this.log.error({ logical: l.id, err: (e as Error).message }, `S-VOL group ${this.name}: vol${l.id} cannot be recovered now`);
    }
  }

  /** Pick the recovery for logical i by the group's state and the member's attribute; throws PairCommandError when none applies. */
  protected recover(i: number, reason: string, inPlace: boolean): void {
    const l = this.rec.logical[i]!;
    if (this.rec.restore) throw new PairCommandError('refused', `${this.name}: a restore of vol${this.rec.logical[this.rec.restore.logical]!.id} is running; vol${l.id} waits for it`);
    const spareAt = this.rec.pool.findIndex((p) => p.state === 'spare');
    if (l.generation === undefined) {
      if (spareAt < 0) throw new PairCommandError('refused', `${this.name}: no spare to replace vol${l.id}; its reads come from the P-VOL`);
      const spare = this.rec.pool.splice(spareAt, 1)[0]!;
      this.rec.pool.push({ vol: l.vol, state: 'error', error: reason });
      this.io.sums.forgetVolume(l.vol);
      this.log.warn({ logical: l.id, from: l.vol, to: spare.vol }, `S-VOL group ${this.name}: vol${l.id} remapped from volume ${l.vol} to spare ${spare.vol}; copying from the P-VOL`);
      l.vol = spare.vol;
      l.state = this.rec.state === 'simplex' ? 'simplex' : 'paired';
      delete l.error;
      this.bitmaps[i]!.setAllInvalid();
      const marked: Promise<void> = this.store
        .mark([i], 0, this.clusters - 1)
        .then(() => this.wake())
        .catch((e: Error) => this.log.error({ err: e.message }, `S-VOL group ${this.name}: bitmap: ${e.message}`))
        .finally(() => {
          if (this.pending === marked) this.pending = null;
        });
      this.pending = marked;
      this.save();
      return;
    }
    const donor = this.donorFor(i);
    if (!donor) {
      l.state = 'error';
      l.error = `no RO sibling of split generation ${l.generation} to rebuild from (siblings split at another time are not interchangeable)`;
      this.save();
      throw new PairCommandError('refused', `${this.name}: vol${l.id}: ${l.error}`);
    }
    let target = l.vol;
    if (spareAt >= 0) target = this.rec.pool.splice(spareAt, 1)[0]!.vol;
    else if (!inPlace) {
      this.save();
      throw new PairCommandError('refused', `${this.name}: no spare to rebuild vol${l.id} on; it is served by vol${this.rec.logical[donor.index]!.id} until you add a spare (attr GROUP VOL spare) and run svol restore`);
    }
    // An RW member with a spare: its RO sibling becomes the RW member (with the increments), the spare its RO copy.
    const promote = l.attr === 'RW' && target !== l.vol ? donor.index : undefined;
    this.rec.restore = { logical: i, target, donor: donor.vol, failed: l.vol, next: 0, reason, ...(promote !== undefined ? { promote } : {}) };
    l.state = 'restoring';
    this.restoreFrontier = 0;
    this.save();
    this.log.warn(
      { logical: l.id, donor: donor.vol, target },
      promote !== undefined
        ? `S-VOL group ${this.name}: rebuilding RW vol${l.id} on RO sibling volume ${donor.vol} (vol${this.rec.logical[promote]!.id}), whose RO role moves to spare ${target}`
        : `S-VOL group ${this.name}: restoring vol${l.id} onto volume ${target} from RO sibling volume ${donor.vol}`,
    );
    this.startRestore();
  }

  /** Members that failed while another restore ran (or before a restart): their turn now, if a recovery applies. */
  protected override recoverWaiting(): void {
    this.rec.logical.forEach((l, i) => {
      if (l.state !== 'error' || this.rec.restore) return;
      try {
        this.recover(i, l.error ?? 'failed', false);
      } catch (e) {
        this.log.warn({ logical: l.id, err: (e as Error).message }, `S-VOL group ${this.name}: vol${l.id} stays in error: ${(e as Error).message}`);
      }
    });
  }

  protected override startRestore(): void {
    if (this.restoring) return;
    this.restoring = this.runRestore()
      .catch((e: Error) => this.log.error({ err: e.message }, `S-VOL group ${this.name}: restore stopped: ${e.message}`))
      .finally(() => {
        this.restoring = null;
        // One restore at a time: members that failed meanwhile go next.
        if (!this.closed) this.recoverWaiting();
      });
  }

  /** Copy donor -> target from the recorded cluster on, apply the increments (RW), remap. */
  protected async runRestore(): Promise<void> {
    const r = this.rec.restore!;
    const l = this.rec.logical[r.logical]!;
    const donorErrors = new Set<unknown>();
    try {
      if (!(await this.copyForRestore(r, donorErrors))) return;
      await this.io.flush(r.target);
      // All of it durable: a restart after this point (the RW promotion below saves) copies nothing again.
      r.next = this.clusters;
      const release = await this.logicalLocks[r.logical]!.acquire(0, this.size);
      try {
        let home = r.target;
        if (r.promote !== undefined) {
          // The spare, now a copy of the sibling, serves the sibling's RO logical ID; once no read
          // is left on the sibling's volume, that volume takes the increments and the RW role.
          const sib = this.rec.logical[r.promote]!;
          if (sib.vol === r.donor) {
            sib.vol = r.target;
            this.save();
            this.saveSums();
          }
          await this.readsDone(r.donor);
          home = r.donor;
        }
        const incr = this.incr.get(r.logical);
        if (l.attr === 'RW' && incr) {
          // The map is the write intent of these clusters: durable before `home` takes them.
          await incr.mapDurable();
          await this.applyIncrements(incr, home);
          await this.io.flush(home);
        }
        if (r.failed !== home) {
          this.rec.pool.push({ vol: r.failed, state: 'error', error: r.reason });
          this.io.sums.forgetVolume(r.failed);
        }
        // Every change is on `home` now: nothing is left to destage (the lock holds no run in flight).
        this.destage.forget(r.logical);
        l.vol = home;
        l.state = 'split';
        delete l.error;
        delete this.rec.restore;
        this.save();
        this.saveSums();
      } finally {
        release();
      }
      this.log.info({ logical: l.id, vol: l.vol }, `S-VOL group ${this.name}: vol${l.id} restored onto volume ${l.vol}`);
    } catch (e) {
      if (this.closed) return;
      if (donorErrors.has(e) && e instanceof BlockDeviceError && e.errno === 'EIO') {
        // The donor failed (a bad copy, a dead disk), not the target: the target goes back to the pool as a spare,
        // the donor's member is failed in turn, and this member waits for a sound donor.
        if (r.target !== r.failed) this.rec.pool.unshift({ vol: r.target, state: 'spare' });
        l.state = 'error';
        l.error = r.reason;
        delete this.rec.restore;
        this.save();
        const d = this.rec.logical.findIndex((x) => x.vol === r.donor);
        if (d >= 0) this.fail(d, 'restore read', e, r.donor);
        throw e;
      }
      // The target failed too: out of service; the member stays served by its sibling.
      if (r.target !== r.failed) this.rec.pool.push({ vol: r.target, state: 'error', error: `restore: ${(e as Error).message}` });
      l.state = 'error';
      l.error = `restore onto volume ${r.target} failed: ${(e as Error).message}`;
      delete this.rec.restore;
      this.save();
      throw e;
    }
  }

  /**
   * Write every changed cluster of `incr` to `home`: contiguous clusters as one write of up to
   * COPY_RUN bytes (their slots need not be contiguous: each is read on its own, at once), and
   * RESTORE_DEPTH such runs in flight. The group's RW member is locked whole meanwhile.
   */
  private async applyIncrements(incr: IncrementsVolume, home: number): Promise<void> {
    const cs = this.ctx.clusterSize;
    const runMax = Math.max(1, Math.floor(COPY_RUN / cs));
    const runs: { first: number; count: number }[] = [];
    for (const c of incr.changed()) {
      const last = runs[runs.length - 1];
      if (last && last.first + last.count === c && last.count < runMax) last.count++;
      else runs.push({ first: c, count: 1 });
    }
    let next = 0;
    let failure: { e: unknown } | undefined;
    // After a failure no run starts, and the error is thrown once none is in flight (the caller's
    // cleanup then sees no write of this restore still landing).
    const worker = async (): Promise<void> => {
      for (let run = runs[next++]; run && !failure; run = runs[next++]) {
        const off = run.first * cs;
        const buf = Buffer.allocUnsafe(Math.min(run.count * cs, this.size - off));
        try {
          await Promise.all(Array.from({ length: run.count }, (_, k) => incr.read(run.first + k, 0, buf.subarray(k * cs, Math.min((k + 1) * cs, buf.length)))));
          await this.io.write(home, off, buf.length, buf, () => this.dev(home).write(off, buf));
        } catch (e) {
          failure ??= { e };
        }
      }
    };
    await Promise.all(Array.from({ length: Math.min(RESTORE_DEPTH, runs.length) }, worker));
    if (failure) throw failure.e;
  }

  /**
   * The copy of a restore, donor -> target, from the recorded cluster on: RESTORE_DEPTH runs of
   * COPY_RUN bytes in flight (reads from the page cache and writes on the pool overlap), each
   * its own buffer. A run the donor says reads as zeroes is zeroed on the target, not copied.
   * Every RESTORE_CHECKPOINT bytes a flush of the target starts beside the copy, and once it
   * is done the record's `next` moves to where the copy had come when the flush started: the
   * record never names a cluster whose copy is not durable, so a restart re-copies at most the
   * runs since the last checkpoint and skips none. Resolves false if the group closed.
   * Errors of the donor are put in `donorErrors` before they are thrown.
   */
  private async copyForRestore(r: RestoreRecord, donorErrors: Set<unknown>): Promise<boolean> {
    const cs = this.ctx.clusterSize;
    const runClusters = Math.max(1, Math.floor(COPY_RUN / cs));
    const every = Math.max(1, Math.floor((this.ctx.restoreCheckpoint ?? RESTORE_CHECKPOINT) / cs));
    // Runs done out of order: the frontier moves over those that follow it.
    const done = new Set<number>();
    let frontier = r.next;
    this.restoreFrontier = frontier;
    let issue = r.next;
    let failure: { e: unknown } | undefined;
    let checkpoint: Promise<void> | null = null;
    let recorded = r.next;
    const free: Buffer[] = [];
    const inFlight = new Set<Promise<void>>();
    const copyRun = async (c: number, buf: Buffer): Promise<void> => {
      const off = c * cs;
      const len = Math.min(runClusters * cs, this.size - off);
      const piece = buf.subarray(0, len);
      this.count(r.donor, 'reads');
      let zeroes: boolean;
      try {
        zeroes = await this.io.readsAsZeroes(r.donor, off, len);
        if (!zeroes) await this.io.read(r.donor, off, piece, true, true);
      } catch (e) {
        donorErrors.add(e);
        throw e;
      }
      // The controller writes the target whatever its attribute: RO refuses hosts, not restores.
      if (zeroes) await this.io.write(r.target, off, len, null, () => this.dev(r.target).zero(off, len));
      else await this.io.write(r.target, off, len, piece, () => this.dev(r.target).write(off, piece), r.donor);
    };
    for (;;) {
      while (!failure && !this.closed && issue < this.clusters && inFlight.size < RESTORE_DEPTH) {
        const c = issue;
        issue = Math.min(this.clusters, c + runClusters);
        const buf = free.pop() ?? Buffer.allocUnsafe(runClusters * cs);
        const p: Promise<void> = copyRun(c, buf)
          .then(
            () => {
              // A failed run's buffer is not reused: a read past its timeout may still land in it.
              free.push(buf);
              done.add(c);
              while (done.delete(frontier)) frontier = Math.min(this.clusters, frontier + runClusters);
              this.restoreFrontier = frontier;
            },
            (e: unknown) => {
              failure ??= { e };
            },
          )
          .finally(() => inFlight.delete(p));
        inFlight.add(p);
      }
      if (inFlight.size === 0) break;
      await Promise.race(inFlight);
      if (!checkpoint && !failure && frontier - recorded >= every) {
        const at = frontier;
        checkpoint = this.io
          .flush(r.target)
          .then(
            () => {
              recorded = at;
              if (this.rec.restore !== r || this.closed) return;
              r.next = at;
              this.save();
            },
            (e: unknown) => {
              failure ??= { e };
            },
          )
          .finally(() => (checkpoint = null));
      }
    }
    await checkpoint;
    if (failure) throw failure.e;
    return !this.closed;
  }
}

// An S-VOL group's commands (docs/svol.md): init, split, resync, restore, attr, verify, and its
// status. The state machine and the copy are in group-core.ts, host I/O in host-io.ts, recovery in recovery.ts.
import { PairCommandError } from '../status.js';
import { COPY_RUN } from './group-core.js';
import { SvolGroupRecovery } from './recovery.js';
import type { SvolGroupStatus, SvolMemberStatus, SvolVerifyStatus } from './status.js';

export type { SvolGroupContext, SvolGroupSpec } from './group-core.js';

export class SvolGroup extends SvolGroupRecovery {
  // ---- commands ----

  protected index(member: string): number {
    const n = Number(member.replace(/^vol/, ''));
    const i = this.rec.logical.findIndex((l) => l.id === n);
    if (i < 0) throw new PairCommandError('not-found', `group ${this.name} has no logical ID ${member} (its logical IDs: ${this.rec.logical.map((l) => l.id).join(', ')})`);
    return i;
  }

  protected busy(what: string): void {
    if (this.rec.restore) throw new PairCommandError('refused', `${what} ${this.name}: a restore of vol${this.rec.logical[this.rec.restore.logical]!.id} is running (${this.restoreProgress()}); wait for it`);
  }

  protected restoreProgress(): string {
    const r = this.rec.restore;
    return r ? `${Math.floor((100 * r.next) / Math.max(1, this.clusters))}%` : '';
  }

  /** Full copy from the P-VOL to every member in service; members paired. */
  init(): Promise<void> {
    return this.quiesce(async () => {
      this.busy('init');
      // The members' own writers are held too (RW members of a split group).
      const held = await Promise.all(this.logicalLocks.map((lock) => lock.acquire(0, this.size)));
      const live: number[] = [];
      try {
        this.rec.logical.forEach((l, i) => {
          if (l.state === 'error') return;
          l.state = 'paired';
          delete l.generation;
          this.bitmaps[i]!.setAllInvalid();
          live.push(i);
        });
        if (live.length) await this.store.mark(live, 0, this.clusters - 1);
        // Under the members' locks no destage run is in flight; the copy overwrites what they held.
        for (const i of live) this.destage.forget(i);
        for (const i of live) await this.incr.get(i)?.reset(this.rec.generation);
        // A sibling's spread read still on a member's volume ends before the copy overwrites it.
        for (const i of live) await this.readsDone(this.rec.logical[i]!.vol);
      } finally {
        for (const r of held) r();
      }
      this.rec.state = 'paired';
      this.save();
      this.log.info(`S-VOL group ${this.name}: init, full copy from the P-VOL to ${live.length} member(s)`);
      this.wake();
    });
  }

  /** Every paired member split at one instant: a new split generation. */
  split(): Promise<void> {
    return this.quiesce(async () => {
      this.busy('split');
      if (this.rec.state === 'simplex') throw new PairCommandError('refused', `split ${this.name}: the group is not initialized; run svol init first`);
      if (this.rec.state === 'split') throw new PairCommandError('refused', `split ${this.name}: already split at generation ${this.rec.generation}; resync first`);
      const copying = this.rec.logical.map((l, i) => ({ l, n: this.bitmaps[i]!.invalidCount })).filter(({ l, n }) => l.state === 'paired' && n > 0);
      if (copying.length) throw new PairCommandError('refused', `split ${this.name}: still copying from the P-VOL (${copying.map(({ l, n }) => `vol${l.id}: ${n} clusters left`).join(', ')}); wait, then split`);
      const members = this.rec.logical.filter((l) => l.state === 'paired');
      // The point-in-time image: every acknowledged P-VOL write is on the members.
      await Promise.all(members.map((l) => this.dev(l.vol).flush()));
      const gen = this.rec.generation + 1;
      for (const [i, v] of this.incr) if (this.rec.logical[i]!.state === 'paired') await v.reset(gen);
      for (const l of members) {
        l.state = 'split';
        l.generation = gen;
      }
      this.rec.state = 'split';
      this.rec.generation = gen;
      this.rec.splitTime = new Date().toISOString();
      this.save();
      // The checksums of the split images: what a restart after a crash may trust.
      this.saveSums();
      this.log.info({ generation: gen, members: members.map((l) => l.id) }, `S-VOL group ${this.name} split (generation ${gen})`);
    });
  }

  /** Rejoin the P-VOL: copy only the clusters either side changed since the split. */
  resync(member?: string): Promise<void> {
    return this.quiesce(async () => {
      this.busy('resync');
      if (this.rec.state !== 'split') throw new PairCommandError('refused', `resync ${this.name}: the group is ${this.rec.state}, not split`);
      const targets = member === undefined ? this.rec.logical.map((_, i) => i).filter((i) => this.rec.logical[i]!.state === 'split') : [this.index(member)];
      for (const i of targets) {
        const l = this.rec.logical[i]!;
        if (l.state !== 'split') throw new PairCommandError('refused', `resync ${this.name}: vol${l.id} is ${l.state}${l.state === 'error' ? ': restore it first' : ''}`);
      }
      // Hold the members' writers too: their last writes are in the bitmaps before the copy starts.
      const held = await Promise.all(targets.map((i) => this.logicalLocks[i]!.acquire(0, this.size)));
      try {
        for (const i of targets) {
          const l = this.rec.logical[i]!;
          l.state = 'paired';
          delete l.generation;
          // No destage run is in flight under the lock, and none starts: the copy from the P-VOL
          // covers every cluster the member changed (its bitmap), so a late destage would corrupt it.
          this.destage.forget(i);
          await this.incr.get(i)?.reset(this.rec.generation);
        }
        // A sibling's spread read still on a member's volume ends before the copy overwrites it.
        for (const i of targets) await this.readsDone(this.rec.logical[i]!.vol);
      } finally {
        for (const r of held) r();
      }
      if (this.rec.logical.every((l) => l.state === 'paired' || l.state === 'error')) {
        this.rec.state = 'paired';
        delete this.rec.splitTime;
      }
      this.save();
      this.log.info({ members: targets.map((i) => this.rec.logical[i]!.id), changed: targets.map((i) => this.bitmaps[i]!.invalidCount) }, `S-VOL group ${this.name}: resync`);
      this.wake();
    });
  }

  /** Run the recovery of a member by hand (in place when no spare is left). */
  async restore(member: string): Promise<void> {
    const i = this.index(member);
    const l = this.rec.logical[i]!;
    this.busy('restore');
    if (l.generation === undefined && l.state !== 'error') throw new PairCommandError('refused', `restore ${this.name}: vol${l.id} is ${l.state}; a paired member is copied from the P-VOL (svol init)`);
    this.recover(i, l.error ?? 'restore by hand', true);
  }

  /**
   * Look for data errors: where a member's bitmap says neither side changed since the split (or
   * the copy is done), its cluster must equal the P-VOL's. A split member that differs is
   * restored from an RO sibling of its generation (onto a spare, else in place); a paired one
   * gets the differing clusters copied again from the P-VOL.
   */
  async verify(): Promise<SvolVerifyStatus> {
    this.busy('verify');
    const cs = this.ctx.clusterSize;
    const run = Math.max(1, Math.floor(COPY_RUN / cs));
    const result: SvolVerifyStatus = { time: new Date().toISOString(), checkedClusters: 0, members: [] };
    const a = Buffer.allocUnsafe(run * cs);
    const b = Buffer.allocUnsafe(run * cs);
    for (let i = 0; i < this.rec.logical.length; i++) {
      const l = this.rec.logical[i]!;
      if (l.state !== 'split' && l.state !== 'paired') continue;
      const differing: number[] = [];
      for (let first = 0; first < this.clusters && !this.closed; first += run) {
        const off = first * cs;
        const len = Math.min(run * cs, this.size - off);
        const releaseP = await this.pvolLock.acquire(off, len);
        const releaseL = await this.logicalLocks[i]!.acquire(off, len);
        try {
          if (l.state !== 'split' && l.state !== 'paired') break;
          await this.dev(this.spec.pvol).read(off, a.subarray(0, len));
          this.count(l.vol, 'reads');
          await this.dev(l.vol).read(off, b.subarray(0, len));
          for (let c = first; c < first + Math.ceil(len / cs); c++) {
            if (this.bitmaps[i]!.isInvalid(c)) continue;
            const o = (c - first) * cs;
            const e = Math.min(o + cs, len);
            if (!a.subarray(o, e).equals(b.subarray(o, e))) differing.push(c);
          }
        } catch (e) {
          this.fail(i, 'verify', e as Error, l.vol);
          break;
        } finally {
          releaseL();
          releaseP();
        }
        result.checkedClusters += Math.ceil(len / cs);
      }
      result.members.push({ logicalId: l.id, vol: l.vol, differing: differing.length, first: differing.slice(0, 20) });
      if (differing.length === 0) continue;
      const reason = `data error: ${differing.length} clusters differ from the P-VOL where neither side changed (first ${differing.slice(0, 5).join(', ')})`;
      this.log.error({ logical: l.id, vol: l.vol, differing: differing.length }, `S-VOL group ${this.name}: verify: vol${l.id} (volume ${l.vol}): ${reason}`);
      if (l.state === 'paired') {
        for (const c of differing) this.bitmaps[i]!.setInvalid(c);
        for (const c of differing) await this.store.mark([i], c, c);
        this.wake();
        continue;
      }
      l.state = 'error';
      l.error = reason;
      this.save();
      try {
        this.recover(i, reason, true);
      } catch (e) {
        this.log.error({ logical: l.id, err: (e as Error).message }, `S-VOL group ${this.name}: vol${l.id} cannot be restored now`);
      }
    }
    this.lastVerify = result;
    return result;
  }

  /** RO or RW for a logical ID; spare for a volume of the pool (a replaced member, repaired). */
  async setAttr(member: string, attr: 'RO' | 'RW' | 'spare'): Promise<void> {
    const n = Number(member.replace(/^vol/, ''));
    if (attr === 'spare') {
      const p = this.rec.pool.find((x) => x.vol === n);
      if (!p) {
        const exported = this.rec.logical.find((l) => l.vol === n);
        if (exported) throw new PairCommandError('refused', `attr ${this.name} ${member} spare: volume ${n} serves vol${exported.id} to hosts; only a replaced volume of the pool becomes a spare again`);
        throw new PairCommandError('not-found', `group ${this.name} has no volume ${n} in its pool (its pool: ${this.rec.pool.map((x) => `${x.vol} (${x.state})`).join(', ') || 'empty'})`);
      }
      p.state = 'spare';
      delete p.error;
      this.save();
      this.log.info({ vol: n }, `S-VOL group ${this.name}: volume ${n} is a spare again`);
      return;
    }
    const li = this.index(member);
    const l = this.rec.logical[li]!;
    if (l.attr === attr) return;
    return this.quiesce(async () => {
      const release = await this.logicalLocks[li]!.acquire(0, this.size);
      try {
        const incr = this.incr.get(li);
        if (attr === 'RW') {
          if (!incr) throw new PairCommandError('refused', `attr ${this.name} ${member}: vol${l.id} has no increments volume; add increments: VOL to its member in the configuration`);
          if (l.state === 'split') await incr.reset(l.generation ?? this.rec.generation);
          this.destage.forget(li);
        } else if (l.state !== 'paired' && l.state !== 'simplex' && incr && incr.count > 0) {
          throw new PairCommandError('refused', `attr ${this.name} ${member}: vol${l.id} has ${incr.count} clusters changed since the split; resync it first, then make it RO`);
        }
        l.attr = attr;
        this.save();
        // No sibling's spread read is left on a volume that takes host writes from now on.
        if (attr === 'RW') await this.readsDone(l.vol);
        this.log.info({ logical: l.id, attr }, `S-VOL group ${this.name}: vol${l.id} is now ${attr}`);
      } finally {
        release();
      }
    });
  }

  /** Resolves once the destager rests (nothing pending it may write), e.g. before reading a member's volume file. */
  destageIdle(): Promise<void> {
    return this.destage.drained();
  }

  status(): SvolGroupStatus {
    const r = this.rec.restore;
    const members: SvolMemberStatus[] = this.rec.logical.map((l, i) => {
      const a = this.access.get(l.vol) ?? { reads: 0, writes: 0 };
      const incr = this.incr.get(i);
      return {
        logicalId: l.id,
        vol: l.vol,
        attr: l.attr,
        state: l.state,
        ...(l.generation !== undefined ? { generation: l.generation } : {}),
        reads: a.reads,
        writes: a.writes,
        changedClusters: this.bitmaps[i]!.invalidCount,
        copiedBytes: this.copied[i]!,
        checkedBlocks: this.io.sums.knownBlocks(l.vol),
        ...(incr ? { destagePending: this.destage.pendingCount(i) } : {}),
        ...(incr ? { increments: { vol: l.increments!, clusters: incr.count, bytes: incr.bytes, capacity: incr.capacity } } : {}),
        ...(l.error ? { error: l.error } : {}),
      };
    });
    for (const p of this.rec.pool) {
      const a = this.access.get(p.vol) ?? { reads: 0, writes: 0 };
      members.push({ vol: p.vol, attr: 'spare', state: r?.target === p.vol ? 'restoring' : p.state, reads: a.reads, writes: a.writes, ...(p.error ? { error: p.error } : {}) });
    }
    return {
      name: this.name,
      pvol: this.spec.pvol,
      state: this.rec.state,
      generation: this.rec.generation,
      ...(this.rec.splitTime ? { splitTime: this.rec.splitTime } : {}),
      clusterSize: this.ctx.clusterSize,
      clusters: this.clusters,
      spreadReads: this.spec.spreadReads ?? false,
      ioTimeoutMs: this.io.timeoutMs,
      checksumMismatches: this.io.mismatches,
      ioTimeouts: this.io.timeouts,
      members,
      ...(this.lastVerify ? { verify: this.lastVerify } : {}),
      ...(r ? { restore: { logicalId: this.rec.logical[r.logical]!.id, target: r.target, donor: r.donor, failed: r.failed, copiedClusters: Math.max(r.next, this.restoreFrontier), checkpointClusters: r.next, totalClusters: this.clusters, reason: r.reason } } : {}),
    };
  }
}

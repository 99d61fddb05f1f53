// An S-VOL group (Tomita, US 7,146,526): a P-VOL and its secondary volumes in one storage
// system. Hosts reach each member under its logical ID; the group keeps the logical->physical
// map, and a recovery remaps the ID onto a rebuilt volume, so hosts keep the same volume.
//
// States of a logical member, and what its logical ID does:
//
//   state      read                                   write (RW)              write (RO)
//   simplex    its volume (before svol init)          EPERM                   EPERM
//   paired     its volume; P-VOL where still Invalid  EPERM                   EPERM
//   split      its volume (RW: pending ones increments) increments (destaged)   EPERM
//   error      a sibling (RW: increments first)       increments              EPERM
//   restoring  the donor (RW: increments first)       increments              EPERM
//
//   event \ group   simplex         paired                      split
//   init            paired, copy    paired, full copy           paired, full copy
//   split           refused         split (gen+1, one instant)  refused
//   resync [m]      refused         -                           m (or all) paired, copy changed
//
// Per logical member a ClusterBitmap says which clusters differ from the P-VOL: while paired,
// those not copied yet; while split, those either side changed since the split. It is
// persisted (bitmap-store.ts), so a resync after a restart still copies only what changed.
//
// Recovery (recovery.ts) is by the member's attribute, always from an RO sibling of the SAME split
// generation (siblings split at other times are not interchangeable). Member I/O goes through
// member-io.ts: checksums on read, a timeout for a hanging volume. A logical member's host reads,
// writes and flushes are in host-io.ts.
import fs from 'node:fs';
import path from 'node:path';
import type { Logger } from 'pino';
import { RangeLock } from '../../blockdev/range-lock.js';
import type { BlockDevice, Payload } from '../../blockdev/types.js';
import { ClusterBitmap, clusterRange } from '../bitmap.js';
import { FileBitmapStore, markRuns, MemoryBitmapStore, type BitmapStore } from '../bitmap-store.js';
import { ChecksumTables, SUM_BLOCK } from './checksums.js';
import { Destager } from './destage.js';
import { MemberIo } from './member-io.js';
import { readGroupRecord, saveGroupRecord, type GroupRecord } from './group-file.js';
import { IncrementsVolume } from './increments.js';
import type { SvolVerifyStatus } from './status.js';
import { FormatError } from '../../util/format.js';

export interface SvolGroupSpec {
  name: string;
  pvol: number;
  members: { vol: number; attr: 'RO' | 'RW' | 'spare'; logicalId?: number; increments?: number }[];
  /** Spread host reads of an RO logical ID over its healthy RO siblings of the same split generation. */
  spreadReads?: boolean;
  /** Milliseconds a member's request may take before the member is declared failed; 0: never. */
  ioTimeout?: number;
}

/** A member that hangs is declared failed after this long, unless the group says otherwise. */
export const DEFAULT_IO_TIMEOUT_MS = 30_000;

export interface SvolGroupContext {
  clusterSize: number;
  /** The controller's view of the storage system's volumes (faults, cache, backend). */
  volumes: Map<number, { device: BlockDevice }>;
  /** dataDir/svol, or undefined in memory. */
  dir: string | undefined;
  log: Logger;
  /** Bytes between a restore's recorded checkpoints (recovery.ts RESTORE_CHECKPOINT); tests make it small. */
  restoreCheckpoint?: number;
}

export const COPY_RUN = 1024 * 1024;

/** The group's state, data paths, copy and recovery; the commands are in group.ts. */
export abstract class SvolGroupCore {
  readonly name: string;
  readonly size: number;
  readonly clusters: number;
  protected rec!: GroupRecord;
  protected bitmaps: ClusterBitmap[] = [];
  protected store!: BitmapStore;
  /** Logical index -> its increments volume (RW members). */
  protected readonly incr = new Map<number, IncrementsVolume>();
  /** P-VOL writes against the copier: a run and a write to the same bytes never interleave. */
  protected readonly pvolLock = new RangeLock();
  protected readonly logicalLocks: RangeLock[] = [];
  /** Reads and writes per physical volume (access frequency). */
  protected readonly access = new Map<number, { reads: number; writes: number }>();
  protected readonly copied: number[] = [];
  protected gate: Promise<void> | null = null;
  protected pvolWrites = 0;
  protected drained: (() => void) | null = null;
  protected copying: Promise<void> | null = null;
  protected restoring: Promise<void> | null = null;
  /** Clusters below this are copied by the restore running (its record's `next` is the durable part). */
  protected restoreFrontier = 0;
  /** A remap's bitmap write, before its copy starts. */
  protected pending: Promise<void> | null = null;
  protected closed = false;
  protected readonly file: string | undefined;
  protected readonly log: Logger;
  protected lastVerify: SvolVerifyStatus | undefined;
  /** Requests to member volumes: checksums, hang timeout, reads in flight (member-io.ts). */
  protected readonly io: MemberIo;
  /** Brings split RW members' volumes up to date from their increments, behind the host (destage.ts). */
  protected readonly destage: Destager;

  constructor(
    readonly spec: SvolGroupSpec,
    protected readonly ctx: SvolGroupContext,
  ) {
    this.name = spec.name;
    this.size = this.dev(spec.pvol).size;
    this.clusters = Math.ceil(this.size / ctx.clusterSize);
    this.file = ctx.dir ? path.join(ctx.dir, `${spec.name}.group`) : undefined;
    this.log = ctx.log.child({ svolGroup: spec.name });
    const sums = new ChecksumTables(this.size, ctx.dir ? path.join(ctx.dir, `${spec.name}.sums`) : undefined, this.log);
    this.io = new MemberIo((vol) => this.dev(vol), sums, spec.ioTimeout ?? DEFAULT_IO_TIMEOUT_MS, this.size);
    const group = this;
    this.destage = new Destager({
      clusterSize: ctx.clusterSize,
      clusters: this.clusters,
      size: this.size,
      log: this.log,
      get closed() {
        return group.closed;
      },
      target: (i) => {
        const l = this.rec.logical[i]!;
        return l.attr === 'RW' && l.state === 'split' ? l.vol : undefined;
      },
      lock: (i) => this.logicalLocks[i]!,
      readSlot: (i, c, within, dest) => this.incr.get(i)!.read(c, within, dest),
      writeMember: (vol, offset, data) => {
        this.count(vol, 'writes');
        return this.io.write(vol, offset, data.length, data, () => this.dev(vol).write(offset, data));
      },
      flushMember: (vol) => this.io.flush(vol),
      mapDurable: (i) => this.incr.get(i)!.mapDurable(),
      fail: (i, op, err, vol) => this.fail(i, op, err, vol),
    });
  }

  /** Logical IDs, in the order of the configuration: what the storage system exports. */
  get logicalIds(): number[] {
    return this.rec.logical.map((l) => l.id);
  }

  /** Every volume the group holds (P-VOL, members, spares, increments volumes). */
  get volumes(): number[] {
    return [this.spec.pvol, ...this.spec.members.map((m) => m.vol), ...this.spec.members.flatMap((m) => (m.increments ? [m.increments] : []))];
  }

  async open(): Promise<void> {
    const { spec, ctx } = this;
    if (ctx.dir) fs.mkdirSync(ctx.dir, { recursive: true });
    const fromConfig: GroupRecord = {
      state: 'simplex',
      generation: 0,
      logical: spec.members
        .filter((m) => m.attr !== 'spare')
        .map((m) => ({ id: m.logicalId ?? m.vol, vol: m.vol, attr: m.attr as 'RO' | 'RW', ...(m.increments ? { increments: m.increments } : {}), state: 'simplex' as const })),
      pool: spec.members.filter((m) => m.attr === 'spare').map((m) => ({ vol: m.vol, state: 'spare' as const })),
    };
    const saved = this.file ? readGroupRecord(this.file) : undefined;
    if (saved) this.checkAgainstConfig(saved, fromConfig);
    this.rec = saved ?? fromConfig;
    const n = this.rec.logical.length;
    let loaded: Uint8Array[] | null = null;
    if (ctx.dir) {
      const opened = await FileBitmapStore.open(path.join(ctx.dir, `${spec.name}.bitmap`), { clusterSize: ctx.clusterSize, clusters: this.clusters, mirrors: n }, this.log);
      this.store = opened.store;
      loaded = opened.loaded;
    } else this.store = new MemoryBitmapStore(this.clusters, n);
    this.bitmaps = this.rec.logical.map((_, i) => new ClusterBitmap(this.clusters, loaded?.[i]));
    for (let i = 0; i < n; i++) {
      this.logicalLocks.push(new RangeLock());
      this.copied.push(0);
      const l = this.rec.logical[i]!;
      if (l.increments) {
        const v = new IncrementsVolume(this.dev(l.increments), `vol${l.increments} (increments of logical vol${l.id} in group ${this.name})`, ctx.clusterSize, this.clusters, this.log);
        await v.open(l.generation ?? this.rec.generation);
        this.incr.set(i, v);
        // What was destaged before the restart is not known: every changed cluster again.
        if (l.attr === 'RW' && l.state === 'split') this.destage.addAll(i, v.changed());
        // The map is the RW member's write intent (logicalWrite): its clusters are changed since the split.
        if (l.attr === 'RW' && l.state !== 'simplex' && l.state !== 'paired') {
          const changed = [...v.changed()].filter((c) => this.bitmaps[i]!.setInvalid(c));
          await markRuns(this.store, i, changed);
        }
      }
    }
    this.save();
    this.loadSums();
    this.log.info({ state: this.rec.state, generation: this.rec.generation, map: this.rec.logical.map((l) => `vol${l.id}->${l.vol}`) }, 'S-VOL group ready');
    const r = this.rec.restore;
    if (r) {
      this.log.warn({ logical: this.rec.logical[r.logical]!.id, target: r.target, next: r.next }, `S-VOL group ${this.name}: resuming the restore of vol${this.rec.logical[r.logical]!.id} onto volume ${r.target} at cluster ${r.next} of ${this.clusters}`);
      this.startRestore();
    } else this.recoverWaiting();
    this.wake();
  }

  /** The record on disk must describe the same volumes as the configuration: a changed group is not silently remapped. */
  protected checkAgainstConfig(saved: GroupRecord, cfg: GroupRecord): void {
    // Every volume the record holds: the map, the pool, and those a restore in progress moves between.
    const vols = (r: GroupRecord) =>
      [...new Set([...r.logical.map((l) => l.vol), ...r.pool.map((p) => p.vol), ...(r.restore ? [r.restore.target, r.restore.donor, r.restore.failed] : [])])].sort((a, b) => a - b).join(',');
    const ids = (r: GroupRecord) => r.logical.map((l) => l.id).join(',');
    if (vols(saved) !== vols(cfg) || ids(saved) !== ids(cfg)) {
      throw new FormatError(
        this.file!,
        `S-VOL group ${this.name} was recorded with logical IDs ${ids(saved)} on volumes ${vols(saved)}, the configuration now says ${ids(cfg)} on ${vols(cfg)}; change the configuration back, or move the record away to start the group anew`,
      );
    }
  }

  /**
   * The checksum tables from the last run: all of them after a clean close; after a crash only
   * those of split members of this generation, less the clusters an RW member changed since.
   */
  private loadSums(): void {
    const sums = this.io.sums;
    const got = sums.load();
    if (got && !(got.clean && got.generation === this.rec.generation)) {
      const keep = new Map<number, (block: number) => boolean>();
      const perCluster = this.ctx.clusterSize / SUM_BLOCK;
      this.rec.logical.forEach((l, i) => {
        if (got.generation !== this.rec.generation || l.state !== 'split' || l.generation !== this.rec.generation) return;
        const incr = this.incr.get(i);
        keep.set(l.vol, l.attr === 'RW' && incr ? (b) => !incr.has(Math.floor(b / perCluster)) : () => true);
      });
      sums.keepOnly(keep);
    }
    // Unclean until close() says otherwise.
    this.saveSums();
  }

  protected saveSums(clean = false): void {
    try {
      this.io.sums.save(this.rec.generation, clean);
    } catch (e) {
      this.log.warn({ err: (e as Error).message }, `S-VOL group ${this.name}: cannot save the checksums: ${(e as Error).message}`);
    }
  }

  protected dev(vol: number): BlockDevice {
    return this.ctx.volumes.get(vol)!.device;
  }

  protected save(): void {
    if (this.file) saveGroupRecord(this.file, this.rec);
  }

  /**
   * Read from a member's volume, checked against its checksums and counted in flight (unless
   * `uncounted`: the reads of the member being rebuilt itself), so a volume changes role only
   * once none is left.
   */
  protected readVol(vol: number, offset: number, dest: Buffer, uncounted = false): Promise<void> {
    return this.io.read(vol, offset, dest, uncounted);
  }

  protected readsDone(vol: number): Promise<void> {
    return this.io.readsDone(vol);
  }

  protected count(vol: number, op: 'reads' | 'writes'): void {
    let a = this.access.get(vol);
    if (!a) this.access.set(vol, (a = { reads: 0, writes: 0 }));
    a[op]++;
  }

  // ---- the P-VOL's write path ----

  /** A host write to the P-VOL of `data` (null: zeroes; undefined: not known): mirrored to paired members, tracked for the others. */
  async pvolWrite(offset: number, length: number, data: Payload | null | undefined, apply: (d: BlockDevice) => Promise<void>): Promise<void> {
    while (this.gate) await this.gate;
    this.pvolWrites++;
    try {
      const [first, last] = clusterRange(offset, length, this.ctx.clusterSize);
      const release = await this.pvolLock.acquire(offset, length);
      try {
        const paired: number[] = [];
        const marked: number[] = [];
        this.rec.logical.forEach((l, i) => {
          if (l.state === 'simplex') return;
          // Write intent on disk for every member: a crash mid-write recopies these clusters.
          marked.push(i);
          if (l.state === 'paired' && !this.bitmaps[i]!.anyInvalid(first, last)) paired.push(i);
          else this.bitmaps[i]!.setRangeInvalid(first, last);
        });
        if (marked.length) await this.store.mark(marked, first, last);
        const vols = paired.map((i) => this.rec.logical[i]!.vol);
        const results = await Promise.allSettled([apply(this.dev(this.spec.pvol)), ...vols.map((vol) => this.io.write(vol, offset, length, data, () => apply(this.dev(vol))))]);
        if (results[0]!.status === 'rejected') {
          for (const i of paired) this.bitmaps[i]!.setRangeInvalid(first, last);
          throw results[0].reason;
        }
        results.slice(1).forEach((r, k) => {
          const i = paired[k]!;
          if (r.status === 'fulfilled') {
            // Both copies hold the write: the intent bits may go (lazily, as a pair's cleaner does).
            if (!this.bitmaps[i]!.anyInvalid(first, last)) void this.store.clear(i, range(first, last)).catch(() => {});
            return;
          }
          this.bitmaps[i]!.setRangeInvalid(first, last);
          this.fail(i, 'write', r.reason as Error, vols[k]);
        });
        if (marked.some((i) => this.rec.logical[i]!.state === 'paired' && this.bitmaps[i]!.invalidCount > 0)) this.wake();
      } finally {
        release();
      }
    } finally {
      if (--this.pvolWrites === 0 && this.drained) this.drained();
    }
  }

  /** Hold new P-VOL writes, wait for those in flight, run fn: one instant for every member. */
  protected async quiesce<T>(fn: () => Promise<T>): Promise<T> {
    while (this.gate) await this.gate;
    let open!: () => void;
    this.gate = new Promise((r) => (open = r));
    try {
      if (this.pvolWrites > 0) await new Promise<void>((r) => (this.drained = r));
      this.drained = null;
      return await fn();
    } finally {
      this.gate = null;
      open();
    }
  }

  /** The healthy RO member of the same split generation that is accessed least: the donor for copies. */
  protected donorFor(i: number): { index: number; vol: number } | undefined {
    const me = this.rec.logical[i]!;
    let best: { index: number; vol: number; n: number } | undefined;
    this.rec.logical.forEach((l, j) => {
      if (j === i || l.attr !== 'RO' || l.state !== 'split' || l.generation !== me.generation) return;
      const a = this.access.get(l.vol);
      const n = a ? a.reads + a.writes : 0;
      if (!best || n < best.n) best = { index: j, vol: l.vol, n };
    });
    return best;
  }

  // ---- failures and recovery (recovery.ts) ----

  /**
   * A member's volume failed under host I/O: mark it, and start its recovery in the background.
   * `vol`, the volume the failed request went to: a request that outlived a remap (a read that
   * hung past ioTimeout while the member was rebuilt elsewhere) fails nothing.
   */
  protected abstract fail(i: number, op: string, err: Error, vol?: number): void;
  /** Resume the restore the record holds. */
  protected abstract startRestore(): void;
  /** Start the recovery of members in error, if one applies. */
  protected abstract recoverWaiting(): void;

  // ---- the background copy P-VOL -> paired members ----

  protected wake(): void {
    if (this.copying || this.closed) return;
    this.copying = this.copyLoop()
      .catch((e: Error) => this.log.error({ err: e.message }, `S-VOL group ${this.name}: copy stopped: ${e.message}`))
      .finally(() => {
        this.copying = null;
      });
  }

  protected async copyLoop(): Promise<void> {
    const cs = this.ctx.clusterSize;
    const maxRun = Math.max(1, Math.floor(COPY_RUN / cs));
    const buf = Buffer.allocUnsafe(maxRun * cs);
    for (;;) {
      let did = false;
      for (let i = 0; i < this.rec.logical.length; i++) {
        const l = this.rec.logical[i]!;
        const bm = this.bitmaps[i]!;
        let c = bm.nextInvalid(0);
        while (c >= 0 && l.state === 'paired' && !this.closed) {
          let end = c;
          while (end + 1 < this.clusters && end - c + 1 < maxRun && bm.isInvalid(end + 1)) end++;
          const off = c * cs;
          const len = Math.min((end + 1) * cs, this.size) - off;
          const vol = l.vol;
          const release = await this.pvolLock.acquire(off, len);
          const done: number[] = [];
          try {
            if (l.state !== 'paired' || l.vol !== vol) break;
            const piece = buf.subarray(0, len);
            // The P-VOL failing is not the member's fault: the copy stops (and says so), the member stays.
            await this.dev(this.spec.pvol).read(off, piece);
            try {
              await this.io.write(vol, off, len, piece, () => this.dev(vol).write(off, piece));
            } catch (e) {
              this.fail(i, 'copy', e as Error, vol);
              break;
            }
            for (let k = c; k <= end; k++) if (bm.setValid(k)) done.push(k);
            this.copied[i]! += len;
          } finally {
            release();
          }
          try {
            await this.io.flush(vol);
          } catch (e) {
            this.fail(i, 'flush', e as Error, vol);
            break;
          }
          await markRunsClear(this.store, i, done);
          did = true;
          c = end + 1 < this.clusters ? bm.nextInvalid(end + 1) : -1;
          if (c >= 0 && c <= end) c = -1;
        }
      }
      if (!did || this.closed) return;
    }
  }

  /** Resolves once no copy or restore runs (tests, close). */
  async idle(): Promise<void> {
    while (this.copying || this.restoring || this.pending) await Promise.all([this.copying, this.restoring, this.pending]);
  }

  async close(): Promise<void> {
    this.closed = true;
    // The run in flight ends; what is still pending is destaged again at the next open.
    await Promise.all([this.idle(), this.destage.drained()]);
    this.save();
    this.saveSums(true);
    await this.store.close();
  }
}

async function markRunsClear(store: BitmapStore, m: number, clusters: number[]): Promise<void> {
  if (clusters.length) await store.clear(m, clusters);
}

function range(first: number, last: number): number[] {
  const out: number[] = [];
  for (let c = first; c <= last; c++) out.push(c);
  return out;
}

// A pair: one master volume and N mirrors in this storage system, with the
// Data Write module (sync or async), the Data Read module with Check Invalid,
// the bitmap table and the pair state machine.
//
// State machine (names as storage admins know them):
//
//   from \ event   all Valid   Invalid appears   split        resync       mirror error
//   COPY           PAIR        COPY              refused      COPY         PSUE
//   PAIR           PAIR        COPY              PSUS         PAIR         PSUE
//   PSUS           -           PSUS (tracked)    PSUS         COPY         PSUS
//   PSUE           -           PSUE (tracked)    PSUS         COPY         PSUE
//
// Per cluster the pair keeps `gen` (bumped when a write starts and when it
// ends) and `inflight` (writes in progress). The sync daemon and the cleaner
// may mark a cluster Valid / clear its on-disk bit only if its gen did not
// move and no write is in flight: a write that hits a cluster during a copy
// can never be lost.
import { createHash } from 'node:crypto';
import type { Logger } from 'pino';
import { FilterDevice } from '../blockdev/filter.js';
import { BlockDeviceError, payloadLength, type BlockDevice, type Extent, type Payload, type ReadViews, type WriteTarget, type ZeroOptions } from '../blockdev/types.js';
import { CopyRateMeter, syncEta } from './copy-rate.js';
import { ClusterBitmap, clusterRange } from './bitmap.js';
import { MARKED, type BitmapStore } from './bitmap-store.js';
import type { MirrorStatus, PairMode, PairState, PairStatus, VerifyStatus, VolRef } from './status.js';

/**
 * What the pair sees of a mirror in another storage system, besides its data
 * device: the control channel that keeps the mirror's copy of the bitmap
 * (docs/replication.md).
 */
export interface RemotePort {
  /** A session is up: the mirror's storage system holds our bitmap and takes our writes. */
  readonly connected: boolean;
  /**
   * Tell the mirror's storage system these clusters are Invalid. Resolves once it
   * knows, or once the link is declared down (never later than the peer timeout).
   */
  invalidate(first: number, last: number): Promise<void>;
  /**
   * Resolves once the mirror's storage system has acknowledged the invalidation of every cluster
   * of [first, last] that is still in flight (at once when none is), or the link is down.
   */
  barrier(first: number, last: number): Promise<void>;
  /** A cluster was copied: the mirror may serve it from its own data again. Ordered after earlier invalidations. */
  valid(c: number): void;
  /** Checksums of `count` clusters from `first` on the mirror (verify). */
  hashes(first: number, count: number): Promise<string[]>;
}

export type FenceLevel = 'never' | 'data';

/** A pair as a storage system is told about it (from the YAML's pairs). */
export interface PairSpec {
  name: string;
  mode: PairMode;
  master: VolRef;
  mirrors: VolRef[];
  /** Sync daemon limit, bytes per second. */
  syncRate?: number;
  fence?: FenceLevel;
}

/** Progress and result of a verify: the `verify` field of the pair's status. */
export type VerifyProgress = VerifyStatus;

export interface MirrorLink {
  ref: VolRef;
  device: BlockDevice;
  remote?: RemotePort;
  bitmap: ClusterBitmap;
  copiedBytes: number;
  /** The sync daemon's copy rate to this mirror, for the ETA. */
  meter: CopyRateMeter;
  /** Where the sync daemon resumes its scan. */
  cursor: number;
}

export interface PairOptions {
  name: string;
  mode: PairMode;
  clusterSize: number;
  master: { ref: VolRef; device: BlockDevice };
  mirrors: { ref: VolRef; device: BlockDevice; remote?: RemotePort }[];
  store: BitmapStore;
  /** Sync pairs: what a mirror write failure does (default never: suspend and go on). */
  fence?: FenceLevel;
  /** Inside resync's quiet point, before mirroring restarts: remote mirrors hand over what they changed. */
  beforeResync?: () => Promise<void>;
  /** Inside split's quiet point, after the mirrors are flushed: remote mirrors learn they are writable. */
  afterSplit?: () => Promise<void>;
  /**
   * Persisted bits per mirror from the last run, or null for a new pair.
   * A new pair starts with every cluster Invalid unless `identical`.
   */
  loaded: Uint8Array[] | null;
  identical: boolean;
  /** Persisted user state (PSUS survives a restart). */
  initialState?: 'PSUS';
  syncRate?: number;
  log: Logger;
  /** Called when clusters become Invalid (wakes the sync daemon). */
  onInvalid?: () => void;
  /** Called on every host write (the sync daemon yields to host I/O). */
  onHostWrite?: () => void;
  /** Called after a state change (persisted by the storage system). */
  onStateChange?: (state: PairState) => void;
  /**
   * Called when the pair suspends (PSUE). Until it resolves, no write is acknowledged: with
   * etcd, it records the mirrors as outdated first, so a mirror that misses writes is never
   * promoted by a failover (DRBD's resource-level fencing). A rejection is retried.
   */
  onSuspend?: (reason: string) => Promise<void>;
  /** How long after the last write the cleaner clears on-disk bits. */
  cleanDelayMs?: number;
}

export class Pair {
  readonly name: string;
  readonly mode: PairMode;
  readonly clusterSize: number;
  readonly clusters: number;
  readonly size: number;
  readonly master: { ref: VolRef; device: BlockDevice };
  readonly mirrors: MirrorLink[];
  /** Changed at run time by `blockmirror apply` (the daemon reads it for every run). */
  syncRate: number | undefined;
  /** Changed at run time by `blockmirror apply`; a write reads it once it is past the gate. */
  fence: FenceLevel;
  readonly store: BitmapStore;
  verifyProgress: VerifyProgress | undefined;
  private readonly gen: Uint32Array;
  private readonly inflight: Uint32Array;
  private readonly all: number[];
  private userState: 'PSUS' | 'PSUE' | null = null;
  error: string | undefined;
  private writesInFlight = 0;
  private gate: Promise<void> | null = null;
  /** onSuspend still running: writes wait for it before they are acknowledged. */
  private suspending: Promise<void> | null = null;
  private drained: (() => void) | null = null;
  private cleanTimer: NodeJS.Timeout | null = null;
  private cleaning: Promise<void> | null = null;
  private closed = false;
  /** This copy stopped being the master (swap, or a takeover elsewhere): host writes are refused. */
  private retired = false;
  private readonly log: Logger;
  private readonly opts: PairOptions;

  constructor(opts: PairOptions) {
    this.opts = opts;
    this.name = opts.name;
    this.mode = opts.mode;
    this.clusterSize = opts.clusterSize;
    this.size = opts.master.device.size;
    this.clusters = Math.ceil(this.size / this.clusterSize);
    this.master = opts.master;
    this.syncRate = opts.syncRate;
    this.fence = opts.fence ?? 'never';
    this.store = opts.store;
    this.log = opts.log;
    this.gen = new Uint32Array(this.clusters);
    this.inflight = new Uint32Array(this.clusters);
    this.all = opts.mirrors.map((_, i) => i);
    this.mirrors = opts.mirrors.map((m, i) => {
      const bitmap = new ClusterBitmap(this.clusters, opts.loaded?.[i]);
      return { ref: m.ref, device: m.device, ...(m.remote ? { remote: m.remote } : {}), bitmap, copiedBytes: 0, meter: new CopyRateMeter(), cursor: 0 };
    });
    if (opts.loaded === null && !opts.identical) {
      // A new pair whose mirror may hold anything: copy it all. Persist the
      // bits first, so an interrupted initial copy resumes rather than lies.
      for (const m of this.mirrors) m.bitmap.setAllInvalid();
      void this.store.mark(this.all, 0, this.clusters - 1).catch((e: Error) => this.suspend(`bitmap: ${e.message}`));
    }
    if (opts.initialState) this.userState = opts.initialState;
  }

  get state(): PairState {
    if (this.userState) return this.userState;
    return this.mirrors.some((m) => m.bitmap.invalidCount > 0) ? 'COPY' : 'PAIR';
  }

  /** Is the pair mirroring (not split, not suspended)? */
  get replicating(): boolean {
    return this.userState === null;
  }

  /** Host-facing device of the master volume. */
  masterDevice(): BlockDevice {
    return new MasterVolume(this);
  }

  /** Host-facing device of mirror i (read-only unless the pair is split). */
  mirrorDevice(i: number): BlockDevice {
    return new MirrorVolume(this, i);
  }

  // ---- Data Write module ----

  /**
   * Run a modifying operation on the master (write, trim, zero) under the pair's rules. `apply`
   * does it to a copy's device; `toMirrors`, if given, is called once, just before a sync write
   * reaches the master, for what to do to the mirrors instead (a write target's: write them from
   * the master's held pages).
   */
  async hostWrite(offset: number, length: number, fua: boolean, apply: (dev: BlockDevice) => Promise<void>, toMirrors?: () => (dev: BlockDevice) => Promise<void>): Promise<void> {
    if (this.gate) await this.gate;
    if (this.suspending) await this.suspending;
    if (this.retired) throw new BlockDeviceError('EPERM', `${this.name}: this volume is no longer the master of the pair`);
    if (this.mode === 'sync' && this.fence === 'data' && this.userState === 'PSUE') {
      throw new BlockDeviceError('EIO', `${this.name} is suspended (${this.error ?? 'mirror unreachable'}) and its fence level is data: writes are refused`);
    }
    const [first, last] = clusterRange(offset, length, this.clusterSize);
    this.opts.onHostWrite?.();
    this.begin(first, last);
    try {
      if (this.mode === 'async' || !this.replicating) {
        // Async: mirrors' clusters Invalid (in memory and on disk) before the master changes.
        let woke = false;
        let told: Promise<void>[] | undefined;
        for (const m of this.mirrors) {
          let newly = false;
          for (let c = first; c <= last; c++) newly = m.bitmap.setInvalid(c) || newly;
          woke ||= newly;
          // A remote mirror's storage system must know before the ack, or a read there could be stale.
          // Bits already set were sent before: wait only if their message is not acknowledged yet.
          if (m.remote?.connected) (told ??= []).push(newly ? m.remote.invalidate(first, last) : m.remote.barrier(first, last));
        }
        await this.store.mark(this.all, first, last);
        // FUA reaches the master only: the mirrors' share is covered by the persisted bitmap.
        if (told) await Promise.all([apply(this.master.device), ...told]);
        else await apply(this.master.device);
        if (woke && this.replicating) this.opts.onInvalid?.();
        return;
      }
      // Sync: write-intent bits on disk first, so a crash mid-write resyncs just these clusters.
      const marked = this.store.mark(this.all, first, last);
      if (marked !== MARKED) await marked;
      const mirrorApply = toMirrors ? toMirrors() : apply;
      const results = await Promise.allSettled([apply(this.master.device), ...this.mirrors.map((m) => mirrorApply(m.device))]);
      if (results[0]!.status === 'rejected') {
        // The mirrors may now hold what the master refused: recopy these clusters from the master.
        for (const m of this.mirrors) m.bitmap.setRangeInvalid(first, last);
        this.opts.onInvalid?.();
        throw results[0]!.reason;
      }
      // The common case, every mirror written, costs one pass over the results and nothing else.
      let failed: Error | undefined;
      let told: Promise<void>[] | undefined;
      for (let i = 1; i < results.length; i++) {
        const r = results[i]!;
        if (r.status === 'fulfilled') continue;
        const m = this.mirrors[i - 1]!;
        m.bitmap.setRangeInvalid(first, last);
        if (m.remote?.connected) (told ??= []).push(m.remote.invalidate(first, last));
        failed ??= r.reason as Error;
        this.suspend(`mirror ss${m.ref.ss}/vol${m.ref.vol}: ${(r.reason as Error).message}`);
      }
      if (told) await Promise.all(told);
      // The mirrors are known outdated (onSuspend) before this write is acknowledged without them.
      if (failed && this.suspending) await this.suspending;
      if (failed && this.fence === 'data') {
        throw new BlockDeviceError('EIO', `${this.name}: a mirror could not be written and the fence level is data: ${failed.message}`);
      }
    } finally {
      this.end(first, last);
    }
  }

  /** FLUSH/FUA scope: the master always; every mirror of a sync pair. */
  async flush(): Promise<void> {
    const targets = this.mode === 'sync' && this.replicating ? [this.master.device, ...this.mirrors.map((m) => m.device)] : [this.master.device];
    await Promise.all(targets.map((d) => d.flush()));
  }

  private begin(first: number, last: number): void {
    this.writesInFlight++;
    for (let c = first; c <= last; c++) {
      this.inflight[c]!++;
      this.gen[c]!++;
    }
  }

  private end(first: number, last: number): void {
    for (let c = first; c <= last; c++) {
      this.inflight[c]!--;
      this.gen[c]!++;
    }
    if (--this.writesInFlight === 0 && this.drained) this.drained();
    this.scheduleClean();
  }

  // ---- Data Read module ----

  /** Read for mirror i: Valid clusters from the mirror, otherwise the whole range from the master. */
  async mirrorRead(i: number, offset: number, dest: Buffer): Promise<void> {
    const m = this.mirrors[i]!;
    if (this.userState === 'PSUS') return m.device.read(offset, dest);
    const [first, last] = clusterRange(offset, dest.length, this.clusterSize);
    // One source for the whole range: never a mix of stale and new data.
    if (m.bitmap.anyInvalid(first, last)) return this.master.device.read(offset, dest);
    return m.device.read(offset, dest);
  }

  async mirrorExtents(i: number, offset: number, length: number): Promise<Extent[]> {
    const m = this.mirrors[i]!;
    if (this.userState !== 'PSUS') {
      const [first, last] = clusterRange(offset, length, this.clusterSize);
      if (m.bitmap.anyInvalid(first, last)) return this.master.device.extents(offset, length);
    }
    return m.device.extents(offset, length);
  }

  /** A host write to a split mirror: tracked so that resync recopies it from the master. */
  async mirrorWrite(i: number, offset: number, length: number, apply: (dev: BlockDevice) => Promise<void>): Promise<void> {
    if (this.gate) await this.gate;
    const m = this.mirrors[i]!;
    if (this.userState !== 'PSUS') {
      throw new BlockDeviceError('EPERM', `vol${m.ref.vol} is a mirror of ${this.name}: read-only unless the pair is split`);
    }
    const [first, last] = clusterRange(offset, length, this.clusterSize);
    // Counted like a master write, so a resync waits for it and the daemon never marks these clusters Valid under it.
    this.begin(first, last);
    try {
      m.bitmap.setRangeInvalid(first, last);
      await this.store.mark([i], first, last);
      await apply(m.device);
    } finally {
      this.end(first, last);
    }
  }

  // ---- sync daemon support ----

  /** Snapshot for a copy: the gen of a cluster, or -1 if a write is in flight there. */
  copyToken(c: number): number {
    return this.inflight[c]! > 0 ? -1 : this.gen[c]!;
  }

  /** After a copy: mark Valid only if no write hit the cluster meanwhile. */
  completeCopy(i: number, c: number, token: number): boolean {
    if (token < 0 || this.inflight[c]! > 0 || this.gen[c] !== token || !this.replicating) return false;
    const m = this.mirrors[i]!;
    if (!m.bitmap.setValid(c)) return false;
    m.remote?.valid(c);
    const bytes = Math.min(this.clusterSize, this.size - c * this.clusterSize);
    m.copiedBytes += bytes;
    m.meter.record(bytes);
    this.scheduleClean();
    return true;
  }

  // ---- cleaner: clears on-disk bits once every copy is durable ----

  private scheduleClean(): void {
    if (this.cleanTimer || this.closed) return;
    this.cleanTimer = setTimeout(() => {
      this.cleanTimer = null;
      void this.clean();
    }, this.opts.cleanDelayMs ?? 1000);
    this.cleanTimer.unref();
  }

  /** Clear on-disk bits whose clusters are Valid, idle, and durable on every copy. */
  clean(): Promise<void> {
    if (this.cleaning) return this.cleaning;
    this.cleaning = this.doClean().finally(() => {
      this.cleaning = null;
    });
    return this.cleaning;
  }

  private async doClean(): Promise<void> {
    const candidates: { m: number; c: number; token: number }[] = [];
    this.mirrors.forEach((link, m) => {
      const img = this.store.image(m);
      for (let byte = 0; byte < img.length; byte++) {
        if (img[byte] === 0) continue;
        for (let bit = 0; bit < 8; bit++) {
          const c = byte * 8 + bit;
          if (c >= this.clusters || !(img[byte]! & (1 << bit))) continue;
          if (link.bitmap.isInvalid(c)) continue;
          const token = this.copyToken(c);
          if (token >= 0) candidates.push({ m, c, token });
        }
      }
    });
    if (candidates.length === 0) return;
    // A remote mirror without a session cannot be flushed: keep the bits until it is back.
    if (this.mirrors.some((m) => m.remote && !m.remote.connected)) return;
    try {
      // Durable on every copy first: a cleared bit must never hide data only one side holds.
      await Promise.all([this.master.device.flush(), ...this.mirrors.map((m) => m.device.flush())]);
    } catch (e) {
      this.log.warn({ pair: this.name, err: (e as Error).message }, 'flush before clearing bitmap failed; bits kept');
      return;
    }
    const byMirror = new Map<number, number[]>();
    for (const { m, c, token } of candidates) {
      if (this.mirrors[m]!.bitmap.isInvalid(c) || this.copyToken(c) !== token) continue;
      let list = byMirror.get(m);
      if (!list) byMirror.set(m, (list = []));
      list.push(c);
    }
    for (const [m, list] of byMirror) await this.store.clear(m, list);
  }

  // ---- pair commands ----

  /** Hold new writes and wait for those in flight: a clean point for a state change. */
  async quiesce<T>(fn: () => T | Promise<T>): Promise<T> {
    while (this.gate) await this.gate;
    let open!: () => void;
    this.gate = new Promise((r) => (open = r));
    try {
      if (this.writesInFlight > 0) await new Promise<void>((r) => (this.drained = r));
      this.drained = null;
      return await fn();
    } finally {
      this.gate = null;
      open();
    }
  }

  split(): Promise<void> {
    return this.quiesce(async () => {
      if (this.state === 'COPY') throw new PairStateError(`${this.name} is in COPY: the mirror is not a consistent copy yet`);
      if (this.userState === 'PSUS') return;
      // The point-in-time image: everything acknowledged so far is on the mirror.
      await Promise.all(this.mirrors.map((m) => m.device.flush()));
      this.userState = 'PSUS';
      await this.opts.afterSplit?.();
      this.log.info({ pair: this.name }, 'pair split (PSUS)');
      this.opts.onStateChange?.('PSUS');
    });
  }

  resync(): Promise<void> {
    return this.quiesce(async () => {
      if (this.userState === null) return;
      await this.opts.beforeResync?.();
      this.userState = null;
      this.error = undefined;
      this.log.info({ pair: this.name, invalid: this.mirrors.map((m) => m.bitmap.invalidCount) }, 'pair resync (COPY)');
      this.opts.onStateChange?.(this.state);
      this.opts.onInvalid?.();
    });
  }

  /** Suspend by error (PSUE): keep acknowledging, track writes in the bitmap. */
  suspend(reason: string): void {
    if (this.userState === 'PSUS' || this.userState === 'PSUE') return;
    this.userState = 'PSUE';
    this.error = reason;
    this.log.error({ pair: this.name, reason }, 'pair suspended (PSUE)');
    this.opts.onStateChange?.('PSUE');
    const hook = this.opts.onSuspend;
    if (hook) {
      const attempt = (): Promise<void> =>
        hook(reason).catch(async (e: Error) => {
          if (this.closed) return;
          this.log.warn({ pair: this.name, err: e.message }, 'recording the suspension failed; writes wait, retrying');
          await new Promise((r) => setTimeout(r, 200));
          return attempt();
        });
      const run = attempt().finally(() => {
        if (this.suspending === run) this.suspending = null;
      });
      this.suspending = run;
    }
  }

  status(): PairStatus {
    const state = this.state;
    const mirrors: MirrorStatus[] = this.mirrors.map((m) => {
      const copyRate = m.meter.rate();
      return {
        ss: m.ref.ss,
        vol: m.ref.vol,
        invalidClusters: m.bitmap.invalidCount,
        syncProgress: this.clusters === 0 ? 1 : 1 - m.bitmap.invalidCount / this.clusters,
        copiedBytes: m.copiedBytes,
        copyRate: Math.round(copyRate),
        etaSeconds: syncEta(state, m.bitmap.invalidCount * this.clusterSize, copyRate),
        ...(m.remote ? { connected: m.remote.connected } : {}),
      };
    });
    return {
      name: this.name,
      mode: this.mode,
      state,
      master: this.master.ref,
      clusterSize: this.clusterSize,
      clusters: this.clusters,
      ...(this.syncRate !== undefined ? { syncRate: this.syncRate } : {}),
      ...(this.error ? { error: this.error } : {}),
      fence: this.fence,
      role: 'master',
      ...(this.verifyProgress ? { verify: { ...this.verifyProgress, differing: this.verifyProgress.differing.slice() } } : {}),
      mirrors,
    };
  }

  /** Mark clusters Invalid on mirror i from outside a write (verify, a resync's handover): memory, disk, and the mirror's SS. */
  async invalidate(i: number, clusters: Iterable<number>): Promise<number> {
    const m = this.mirrors[i]!;
    let n = 0;
    const runs: [number, number][] = [];
    for (const c of clusters) {
      if (!m.bitmap.setInvalid(c)) continue;
      n++;
      const run = runs[runs.length - 1];
      if (run && run[1] === c - 1) run[1] = c;
      else runs.push([c, c]);
    }
    for (const [a, b] of runs) await this.store.mark([i], a, b);
    if (m.remote?.connected) await Promise.all(runs.map(([a, b]) => m.remote!.invalidate(a, b)));
    if (n > 0 && this.replicating) this.opts.onInvalid?.();
    return n;
  }

  /**
   * Compare every mirror with the master cluster by cluster, by checksum (only
   * checksums cross the network for a remote mirror). Differences are marked
   * Invalid, so the sync daemon repairs them from the master; nothing else is
   * changed. Clusters already Invalid are skipped: they are known to differ.
   */
  async verify(onProgress?: (p: VerifyProgress) => void): Promise<VerifyProgress> {
    if (this.verifyProgress?.running) throw new PairStateError(`${this.name}: a verify is already running`);
    const p: VerifyProgress = { running: true, checked: 0, total: this.clusters * this.mirrors.length, differences: 0, differing: [] };
    this.verifyProgress = p;
    const batch = Math.max(1, Math.floor((4 * 1024 * 1024) / this.clusterSize));
    try {
      for (let i = 0; i < this.mirrors.length; i++) {
        const m = this.mirrors[i]!;
        for (let first = 0; first < this.clusters; first += batch) {
          if (this.closed) throw new Error('the storage system is closing');
          const count = Math.min(batch, this.clusters - first);
          const offset = first * this.clusterSize;
          const length = Math.min(count * this.clusterSize, this.size - offset);
          const buf = Buffer.allocUnsafe(length);
          await this.master.device.read(offset, buf);
          const ours = hashClusters(buf, this.clusterSize);
          let theirs: string[];
          if (m.remote) theirs = await m.remote.hashes(first, count);
          else {
            await m.device.read(offset, buf);
            theirs = hashClusters(buf, this.clusterSize);
          }
          const differ: number[] = [];
          for (let k = 0; k < count; k++) if (ours[k] !== theirs[k] && !m.bitmap.isInvalid(first + k)) differ.push(first + k);
          if (differ.length > 0) {
            await this.invalidate(i, differ);
            p.differences += differ.length;
            for (const c of differ) if (p.differing.length < 100) p.differing.push(c);
          }
          p.checked += count;
          onProgress?.(p);
        }
      }
      if (p.differences > 0) this.log.warn({ pair: this.name, differences: p.differences, first: p.differing.slice(0, 10) }, 'verify found differences; marked Invalid');
      else this.log.info({ pair: this.name }, 'verify: mirrors match the master');
    } catch (e) {
      p.error = (e as Error).message;
      throw e;
    } finally {
      p.running = false;
    }
    return p;
  }

  /** Refuse host writes from now on (called inside quiesce, before a role change). */
  retire(): void {
    this.retired = true;
  }

  async close(opts: { keepStore?: boolean } = {}): Promise<void> {
    this.closed = true;
    if (this.cleanTimer) clearTimeout(this.cleanTimer);
    this.cleanTimer = null;
    await this.clean();
    if (!opts.keepStore) await this.store.close();
  }
}

export class PairStateError extends Error {
  override readonly name = 'PairStateError';
}

/** SHA-1 of each cluster of `buf` (the last one may be short), hex: what verify compares. */
export function hashClusters(buf: Buffer, clusterSize: number): string[] {
  const out: string[] = [];
  for (let o = 0; o < buf.length; o += clusterSize) out.push(createHash('sha1').update(buf.subarray(o, Math.min(buf.length, o + clusterSize))).digest('hex'));
  return out;
}

/**
 * The master volume as hosts see it: writes go through the pair's write module; reads,
 * extents and hints go to the master's own volume (FilterDevice's pass-through).
 */
class MasterVolume extends FilterDevice {
  private readonly safe: boolean;
  private readonly fast: boolean;

  constructor(private readonly pair: Pair) {
    super(pair.master.device);
    this.safe = pair.master.device.multiConnSafe && pair.mirrors.every((m) => m.device.multiConnSafe);
    this.fast = pair.master.device.fastZero && pair.mirrors.every((m) => m.device.fastZero);
  }

  override get multiConnSafe(): boolean {
    return this.safe;
  }

  override get fastZero(): boolean {
    return this.fast;
  }

  override get readOnly(): boolean {
    return false;
  }

  override write(offset: number, data: Payload, fua = false): Promise<void> {
    return this.pair.hostWrite(offset, payloadLength(data), fua, (d) => d.write(offset, data, fua));
  }

  /**
   * The master volume's own target: the payload lands in the master's memory, and the commit is a
   * host write under the pair's rules, exactly as write() (bitmap marks, gate, fence, ordering).
   * A sync pair's mirrors are written from those pages (a local mirror copies them once, a remote
   * one's NBD client sends them), held from before the commit until every mirror write has
   * settled: a later write to the master copies on write instead of changing them, and an aborted
   * or faulted commit leaves them retired, not reused. So a sync pair needs a target that can hold.
   */
  writeTarget(offset: number, length: number, from: number): WriteTarget | null {
    const below = this.pair.master.device.writeTarget?.(offset, length, from);
    if (!below) return null;
    if (this.pair.mode === 'sync' && !below.hold) {
      below.abort();
      return null;
    }
    return {
      pieces: below.pieces,
      commit: async (head: Payload, fua = false): Promise<void> => {
        let committed = false;
        let held: ReadViews | undefined;
        try {
          await this.pair.hostWrite(
            offset,
            length,
            fua,
            () => {
              committed = true;
              return below.commit(head, fua);
            },
            () => {
              held = below.hold!();
              const bytes = Buffer.isBuffer(head) ? (head.length > 0 ? [head, ...held.pieces] : held.pieces) : [...head, ...held.pieces];
              return (d) => d.write(offset, bytes, fua);
            },
          );
        } finally {
          // Refused before reaching the master (gate, retired, fence): the target goes back unused.
          if (!committed) below.abort();
          held?.release();
        }
      },
      abort: () => below.abort(),
    };
  }

  override flush(): Promise<void> {
    return this.pair.flush();
  }

  override trim(offset: number, length: number, fua = false): Promise<void> {
    return this.pair.hostWrite(offset, length, fua, (d) => d.trim(offset, length, fua));
  }

  override zero(offset: number, length: number, opts: ZeroOptions = {}): Promise<void> {
    return this.pair.hostWrite(offset, length, opts.fua === true, (d) => d.zero(offset, length, opts));
  }
}

/** A mirror volume as hosts see it: reads check the bitmap; writes only while split. */
class MirrorVolume extends FilterDevice {
  private readonly safe: boolean;

  constructor(
    private readonly pair: Pair,
    private readonly i: number,
  ) {
    super(pair.mirrors[i]!.device);
    this.safe = pair.mirrors[i]!.device.multiConnSafe && pair.master.device.multiConnSafe;
  }

  override get multiConnSafe(): boolean {
    return this.safe;
  }

  /** Read-only to hosts unless the pair is split (new connections see the change). */
  override get readOnly(): boolean {
    return this.pair.state !== 'PSUS';
  }

  override read(offset: number, dest: Buffer): Promise<void> {
    return this.pair.mirrorRead(this.i, offset, dest);
  }

  override write(offset: number, data: Payload, fua = false): Promise<void> {
    return this.pair.mirrorWrite(this.i, offset, payloadLength(data), (d) => d.write(offset, data, fua));
  }

  override trim(offset: number, length: number, fua = false): Promise<void> {
    return this.pair.mirrorWrite(this.i, offset, length, (d) => d.trim(offset, length, fua));
  }

  override zero(offset: number, length: number, opts: ZeroOptions = {}): Promise<void> {
    return this.pair.mirrorWrite(this.i, offset, length, (d) => d.zero(offset, length, opts));
  }

  override extents(offset: number, length: number): Promise<Extent[]> {
    return this.pair.mirrorExtents(this.i, offset, length);
  }

  /** A prefetch hint for this copy: only what it would read itself (Valid clusters); never a reason to skip the master. */
  override cache(): Promise<void> {
    return Promise.resolve();
  }
}

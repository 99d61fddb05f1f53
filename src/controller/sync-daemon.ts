// The sync daemon of a storage system: copies Invalid clusters from master to
// mirror in the background, contiguous runs at a time, a few in parallel,
// throttled per pair by syncRate, and woken by async writes.
//
// A run of clusters is copied as: take each cluster's token (its write gen,
// or skip it while a write is in flight) -> read the run from the master ->
// write it to the mirror -> mark Valid only the clusters whose token did not
// move (Pair.completeCopy). A write landing during the copy keeps its cluster
// Invalid, and the daemon comes back for it.
import type { Logger } from 'pino';
import type { Pair } from './pair.js';
import { ioBuffers } from '../util/buffer-pool.js';

export interface SyncDaemonOptions {
  log: Logger;
  /** Largest copy, bytes (rounded to whole clusters). */
  maxRun?: number;
  /** Copies in flight at once across all pairs. */
  parallel?: number;
  /**
   * While hosts are writing (a write within this many ms), copy one run at a
   * time with a pause between runs, so foreground I/O keeps priority (as md's
   * speed_limit_min/max do for a resync).
   */
  foregroundWindowMs?: number;
}

/**
 * While hosts are writing, the daemon copies one cluster per BUSY_GAP_MS: a guaranteed minimum
 * rate (64 KiB clusters: about 3 MiB/s; md's speed_limit_min defaults to 1 MiB/s), and the rest
 * of the time for host I/O. The gap runs from the end of one copy to the start of the next,
 * whatever wakes the daemon: every write that makes a cluster Invalid wakes it, so without that
 * it copied back to back under a steady load. A cluster copied under load is often written
 * again soon, and that write pays its invalidation once more (to a remote mirror, a round trip
 * on the control channel before the host's acknowledgement). Async 4k random writes through a
 * cross-SS pair, master ÷ standalone (bench/remote-ab.js, issue 18):
 *
 *   daemon between copies under load      ratio
 *   gap skipped when woken (before)       0.67
 *   5 ms gap kept                         0.89-0.90
 *   20 ms gap kept                        0.95
 */
const BUSY_RUN = 64 * 1024;
const BUSY_GAP_MS = 20;

interface Job {
  pair: Pair;
  mirror: number;
  first: number;
  tokens: number[];
}

export class SyncDaemon {
  private readonly pairs: Pair[] = [];
  private readonly maxRun: number;
  private readonly parallel: number;
  private running = 0;
  private stopped = false;
  private paused = false;
  private wakeScheduled = false;
  private idleWaiters: (() => void)[] = [];
  /** Per pair token bucket: bytes we may copy now. */
  private readonly budget = new Map<Pair, { tokens: number; at: number }>();
  /** Clusters currently being copied, per pair and mirror, so parallel jobs never overlap. */
  private readonly busy = new Map<string, Set<number>>();
  /** Copies in flight per pair (forget waits for them). */
  private readonly copying = new Map<Pair, number>();
  private retryTimer: NodeJS.Timeout | null = null;
  private rr = 0;
  private lastHostIo = -Infinity;
  /** When the last copy ended: under host load the next starts BUSY_GAP_MS later. */
  private lastCopyEnd = -Infinity;
  private readonly fgWindow: number;

  constructor(private readonly opts: SyncDaemonOptions) {
    this.maxRun = opts.maxRun ?? 4 * 1024 * 1024;
    this.parallel = opts.parallel ?? 4;
    this.fgWindow = opts.foregroundWindowMs ?? 50;
  }

  /** A host wrote to a pair: the daemon steps back for a while. */
  noteHostIo(): void {
    this.lastHostIo = performance.now();
  }

  private get foregroundBusy(): boolean {
    return performance.now() - this.lastHostIo < this.fgWindow;
  }

  add(pair: Pair): void {
    this.pairs.push(pair);
    this.wake();
  }

  /** Forget a pair (its role changed); copies of it already running finish on their own. */
  remove(pair: Pair): void {
    const i = this.pairs.indexOf(pair);
    if (i >= 0) this.pairs.splice(i, 1);
    this.budget.delete(pair);
    for (const key of [...this.busy.keys()]) if (key.startsWith(`${pair.name}/`)) this.busy.delete(key);
    this.rr = 0;
  }

  /**
   * Forget a pair and wait for its copies in flight: after this, nothing of the daemon writes
   * to its mirrors (live reconfiguration replaces the pair with one of other mirrors).
   */
  async forget(pair: Pair): Promise<void> {
    this.remove(pair);
    while ((this.copying.get(pair) ?? 0) > 0) await new Promise((r) => setTimeout(r, 2));
  }

  /** Something became Invalid: look for work (coalesced to once per tick). */
  wake(): void {
    if (this.wakeScheduled || this.stopped) return;
    this.wakeScheduled = true;
    setImmediate(() => {
      this.wakeScheduled = false;
      this.fill();
    });
  }

  /** Stop copying (tests step the daemon by hand with step()). */
  pause(): void {
    this.paused = true;
  }

  resume(): void {
    this.paused = false;
    this.wake();
  }

  /** Copy one run now, whatever the state of the background loop; false if there was nothing to copy. */
  async step(): Promise<boolean> {
    const job = this.nextJob(true);
    if (!job) return false;
    await this.copy(job);
    return true;
  }

  /** Resolves when no pair has Invalid clusters left to copy (or copying is impossible right now). */
  idle(): Promise<void> {
    if (this.running === 0 && !this.hasWork()) return Promise.resolve();
    return new Promise((r) => this.idleWaiters.push(r));
  }

  async stop(): Promise<void> {
    this.stopped = true;
    if (this.retryTimer) clearTimeout(this.retryTimer);
    while (this.running > 0) await new Promise((r) => setTimeout(r, 5));
  }

  private hasWork(): boolean {
    return this.pairs.some((p) => p.replicating && p.mirrors.some((m) => m.bitmap.invalidCount > 0));
  }

  private fill(): void {
    if (this.stopped || this.paused) return;
    const busy = this.foregroundBusy;
    if (busy) {
      const wait = this.lastCopyEnd + BUSY_GAP_MS - performance.now();
      if (wait > 0) {
        this.retryLater(Math.ceil(wait));
        return;
      }
    }
    const limit = busy ? 1 : this.parallel;
    while (this.running < limit) {
      const job = this.nextJob(false);
      if (!job) break;
      this.running++;
      void this.copy(job).finally(() => {
        this.running--;
        this.lastCopyEnd = performance.now();
        // Under host load, leave the event loop to host requests between runs.
        if (this.foregroundBusy) this.retryLater(BUSY_GAP_MS);
        else this.fill();
      });
    }
    if (this.running === 0) {
      if (this.hasWork()) this.retryLater();
      else this.notifyIdle();
    }
  }

  private notifyIdle(): void {
    const w = this.idleWaiters;
    this.idleWaiters = [];
    for (const r of w) r();
  }

  /** Work exists but none could start (writes in flight, or the rate budget is spent): look again soon. */
  private retryLater(delay = 10): void {
    if (this.retryTimer || this.stopped) return;
    this.retryTimer = setTimeout(() => {
      this.retryTimer = null;
      this.fill();
    }, delay);
  }

  private nextJob(ignoreRate: boolean): Job | null {
    const n = this.pairs.length;
    for (let k = 0; k < n; k++) {
      const pair = this.pairs[(this.rr + k) % n]!;
      if (!pair.replicating) continue;
      for (let mi = 0; mi < pair.mirrors.length; mi++) {
        const link = pair.mirrors[mi]!;
        if (link.bitmap.invalidCount === 0) continue;
        // A remote mirror without a session waits for its storage system to come back.
        if (link.remote && !link.remote.connected) continue;
        const busy = this.busySet(pair, mi);
        const allowance = ignoreRate ? Infinity : this.allowance(pair);
        if (allowance <= 0) {
          this.retryLater(20);
          continue;
        }
        // Under host load, small runs: a 4 MiB copy would hold the event loop for milliseconds.
        const run = this.foregroundBusy ? BUSY_RUN : this.maxRun;
        const maxClusters = Math.max(1, Math.floor(Math.min(run, allowance) / pair.clusterSize));
        // Scan from the cursor for an Invalid cluster we can copy now.
        let c = link.bitmap.nextInvalid(link.cursor);
        const startC = c;
        while (c >= 0 && (busy.has(c) || pair.copyToken(c) < 0)) {
          c = link.bitmap.nextInvalid(c + 1);
          if (c === startC) c = -1;
        }
        if (c < 0) continue;
        const tokens: number[] = [];
        for (let x = c; x < pair.clusters && tokens.length < maxClusters; x++) {
          if (!link.bitmap.isInvalid(x) || busy.has(x)) break;
          const t = pair.copyToken(x);
          if (t < 0) break;
          tokens.push(t);
        }
        link.cursor = c + tokens.length;
        for (let x = c; x < c + tokens.length; x++) busy.add(x);
        if (!ignoreRate) this.spend(pair, tokens.length * pair.clusterSize);
        this.rr = (this.rr + k + 1) % n;
        return { pair, mirror: mi, first: c, tokens };
      }
    }
    return null;
  }

  private async copy(job: Job): Promise<void> {
    const { pair, mirror, first, tokens } = job;
    const link = pair.mirrors[mirror]!;
    const offset = first * pair.clusterSize;
    const length = Math.min(tokens.length * pair.clusterSize, pair.size - offset);
    const busy = this.busySet(pair, mirror);
    const buf = ioBuffers.get(length);
    this.copying.set(pair, (this.copying.get(pair) ?? 0) + 1);
    try {
      await pair.master.device.read(offset, buf);
      await link.device.write(offset, buf);
      tokens.forEach((t, k) => pair.completeCopy(mirror, first + k, t));
      // The mirror's device has the data now (a cache copies it in), so the buffer is free again.
      ioBuffers.put(buf);
    } catch (e) {
      pair.suspend(`sync daemon: copy to ss${link.ref.ss}/vol${link.ref.vol} failed: ${(e as Error).message}`);
      this.opts.log.error({ pair: pair.name, err: (e as Error).message }, 'sync copy failed');
    } finally {
      for (let x = first; x < first + tokens.length; x++) busy.delete(x);
      const n = (this.copying.get(pair) ?? 1) - 1;
      if (n > 0) this.copying.set(pair, n);
      else this.copying.delete(pair);
    }
  }

  private busySet(pair: Pair, mirror: number): Set<number> {
    const key = `${pair.name}/${mirror}`;
    let s = this.busy.get(key);
    if (!s) this.busy.set(key, (s = new Set()));
    return s;
  }

  /** Bytes the pair may copy now under its syncRate (token bucket, one second of burst). */
  private allowance(pair: Pair): number {
    if (pair.syncRate === undefined) return Infinity;
    const now = performance.now();
    let b = this.budget.get(pair);
    if (!b) this.budget.set(pair, (b = { tokens: pair.syncRate / 10, at: now }));
    b.tokens = Math.min(pair.syncRate, b.tokens + ((now - b.at) / 1000) * pair.syncRate);
    b.at = now;
    // A run of at least one cluster may start once the bucket is positive; it goes into debt.
    return b.tokens > 0 ? Math.max(b.tokens, pair.clusterSize) : 0;
  }

  private spend(pair: Pair, bytes: number): void {
    const b = this.budget.get(pair);
    if (b) b.tokens -= bytes;
  }
}

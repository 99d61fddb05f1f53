// What the sender and the receiver share: their tunables, the heartbeat each writes into its own
// half of the process ID table, and the watch each keeps on the other's.
import type { Logger } from 'pino';
import type { PidEntry } from './layout.js';
import { XferPeerError } from './errors.js';
import type { XferVolume } from './volume.js';

export interface SessionOptions {
  /** Between two polls of the other side's table (ms). */
  pollMs?: number;
  /** Between two heartbeats of our own half of the process ID table (ms). */
  heartbeatMs?: number;
  /** A peer whose heartbeat stands still this long is gone (ms). */
  timeoutMs?: number;
  /** Reads of a segment or table that does not check out before it is refused. */
  retries?: number;
  log?: Logger;
  /** Stops the session between two steps (tests, signals). */
  signal?: AbortSignal;
}

export interface Tunables {
  pollMs: number;
  heartbeatMs: number;
  timeoutMs: number;
  retries: number;
  log: Logger | undefined;
  signal: AbortSignal | undefined;
}

export function tunables(o: SessionOptions): Tunables {
  const pollMs = o.pollMs ?? 10;
  return {
    pollMs,
    heartbeatMs: o.heartbeatMs ?? 500,
    timeoutMs: o.timeoutMs ?? 30_000,
    retries: o.retries ?? 100,
    log: o.log,
    signal: o.signal,
  };
}

export function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  signal?.throwIfAborted();
  return new Promise((resolve, reject) => {
    const t = setTimeout(() => {
      signal?.removeEventListener('abort', onAbort);
      resolve();
    }, ms);
    const onAbort = () => {
      clearTimeout(t);
      reject(signal!.reason);
    };
    signal?.addEventListener('abort', onAbort, { once: true });
  });
}

/**
 * A non-zero token naming one connection. It only has to differ from other connections' tokens
 * (two senders racing for a slot, a slot's earlier connection), not to be unguessable: anyone who
 * can write the volume can write any table. V8 seeds Math.random per process from the OS's
 * entropy, and node:crypto cost a send or recv a dozen built-in modules at start-up.
 */
export const newToken = (): number => 1 + Math.floor(Math.random() * 0xfffffffe);

/** Our half of a slot: rewritten whole on every beat, so only we ever write it. */
export class OwnHalf {
  private lastBeat = 0;

  constructor(
    private readonly vol: XferVolume,
    readonly entry: PidEntry,
    private readonly heartbeatMs: number,
  ) {}

  async write(): Promise<void> {
    this.entry.heartbeat = (this.entry.heartbeat + 1) >>> 0;
    this.lastBeat = Date.now();
    await this.vol.writePid(this.entry);
  }

  /** Beat if the last one is older than the heartbeat interval. */
  async beat(): Promise<void> {
    if (Date.now() - this.lastBeat >= this.heartbeatMs) await this.write();
  }
}

/** Notices a peer whose heartbeat has stood still for longer than the timeout. */
export class PeerWatch {
  private seen = -1;
  private since = Date.now();

  constructor(
    private readonly who: string,
    private readonly timeoutMs: number,
  ) {}

  observe(heartbeat: number): void {
    if (heartbeat !== this.seen) {
      this.seen = heartbeat;
      this.since = Date.now();
    } else if (Date.now() - this.since > this.timeoutMs) {
      throw new XferPeerError(`${this.who} stopped: no heartbeat for ${this.timeoutMs} ms; if it died, run blockmirror xfer gc to reclaim its segments`);
    }
  }
}

/** The half of a process that is to be taken over, once its heartbeat has stood still for a while. */
export async function standingStill(vol: XferVolume, slot: number, half: 'req' | 'rsp', who: string, t: Tunables) {
  const before = (await vol.readPid(slot))[half];
  await sleep(Math.max(3 * t.heartbeatMs, 100), t.signal);
  const after = (await vol.readPid(slot))[half];
  if (after.heartbeat !== before.heartbeat || after.token !== before.token)
    throw new XferPeerError(`${who} of connection ${slot} is still alive (its heartbeat moves): stop it before resuming`);
  return after;
}

/** Polls back off from 1 ms to the poll interval while nothing happens, and start quick again after progress. */
export class Backoff {
  private delay: number;
  constructor(private readonly max: number) {
    this.delay = Math.min(1, max);
  }
  async sleep(signal?: AbortSignal): Promise<void> {
    await sleep(this.delay, signal);
    this.delay = Math.min(this.max, this.delay * 2);
  }
  reset(): void {
    this.delay = Math.min(1, this.max);
  }
}

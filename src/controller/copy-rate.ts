// How fast the sync daemon copies to a mirror, and when it will be done at that pace.
//
// The rate is what was copied over the last WINDOW_MS, in buckets of BUCKET_MS, so a copy limited
// by syncRate (bursts, then waits) still shows its average, and a copy that stopped decays to 0
// within the window. The ETA uses the copy rate, not how fast the Invalid count falls: host writes
// that keep marking clusters Invalid would make that one "—" for as long as they last.
//
//   state          invalid  rate   etaSeconds
//   any            0        any    0           in sync
//   PSUS, PSUE     > 0      any    null        nothing is copied until a resync
//   COPY, PAIR     > 0      0      null        not measured yet (or the daemon is stalled)
//   COPY, PAIR     > 0      > 0    ceil(invalid bytes / rate)
import type { PairState } from './status.js';

export const WINDOW_MS = 10_000;
const BUCKET_MS = 250;

export class CopyRateMeter {
  private readonly buckets: { start: number; bytes: number }[] = [];

  constructor(private readonly now: () => number = () => performance.now()) {}

  /** The sync daemon copied `bytes` to the mirror just now. */
  record(bytes: number): void {
    const t = this.now();
    const last = this.buckets[this.buckets.length - 1];
    if (last && t - last.start < BUCKET_MS) last.bytes += bytes;
    else this.buckets.push({ start: t, bytes });
    this.prune(t);
  }

  /** Bytes per second over the last WINDOW_MS; 0 when nothing was copied in it. */
  rate(): number {
    const t = this.now();
    this.prune(t);
    if (this.buckets.length === 0) return 0;
    let bytes = 0;
    for (const b of this.buckets) bytes += b.bytes;
    // From the first bucket kept, and never less than one bucket: one early copy is not a rate.
    const span = Math.max(t - this.buckets[0]!.start, BUCKET_MS);
    return (bytes * 1000) / span;
  }

  private prune(t: number): void {
    while (this.buckets.length > 0 && this.buckets[0]!.start <= t - WINDOW_MS) this.buckets.shift();
  }
}

/** Seconds until the mirror is in sync at the measured rate; null when that cannot be said (table above). */
export function syncEta(state: PairState, invalidBytes: number, rate: number): number | null {
  if (invalidBytes === 0) return 0;
  if (state === 'PSUS' || state === 'PSUE' || rate <= 0) return null;
  return Math.ceil(invalidBytes / rate);
}

// Recent throughput of each pair, for the dashboard's sparklines and GET /api/status.
//
// Every SAMPLE_MS the storage system that holds a pair's master reads the pair's running totals and
// keeps the rate over that interval; the last SAMPLES rates stay, oldest first:
//
//   series   running total it comes from                          what it shows
//   read     bytes hosts read from the master (CountingDevice)    host reads
//   write    bytes hosts wrote to the master                      host writes
//   copy     bytes the sync daemon copied to the mirrors          async catch-up, resync
//
// A total that goes down (the pair was removed and added again) starts the series over.

/** How often a sample is taken, and how many are kept: one minute at one per second. */
export const SAMPLE_MS = 1000;
export const SAMPLES = 60;

export interface PairTotals {
  readBytes: number;
  writeBytes: number;
  copiedBytes: number;
}

/** Bytes per second over each interval, oldest first; at most SAMPLES of each. */
export interface ThroughputSamples {
  intervalMs: number;
  read: number[];
  write: number[];
  copy: number[];
}

interface Series {
  at: number;
  last: PairTotals;
  read: number[];
  write: number[];
  copy: number[];
}

export class ThroughputHistory {
  private readonly series = new Map<string, Series>();

  constructor(private readonly now: () => number = () => performance.now()) {}

  /** The running totals of every pair measured now; pairs not in `totals` are forgotten. */
  sample(totals: ReadonlyMap<string, PairTotals>): void {
    const t = this.now();
    for (const name of this.series.keys()) if (!totals.has(name)) this.series.delete(name);
    for (const [name, now] of totals) {
      const s = this.series.get(name);
      if (!s || now.readBytes < s.last.readBytes || now.writeBytes < s.last.writeBytes || now.copiedBytes < s.last.copiedBytes) {
        this.series.set(name, { at: t, last: { ...now }, read: [], write: [], copy: [] });
        continue;
      }
      const seconds = (t - s.at) / 1000;
      if (seconds <= 0) continue;
      push(s.read, (now.readBytes - s.last.readBytes) / seconds);
      push(s.write, (now.writeBytes - s.last.writeBytes) / seconds);
      push(s.copy, (now.copiedBytes - s.last.copiedBytes) / seconds);
      s.at = t;
      s.last = { ...now };
    }
  }

  /** The samples of one pair; undefined before its first interval ends (or when not measured here). */
  of(name: string): ThroughputSamples | undefined {
    const s = this.series.get(name);
    if (!s || s.read.length === 0) return undefined;
    return { intervalMs: SAMPLE_MS, read: s.read.slice(), write: s.write.slice(), copy: s.copy.slice() };
  }
}

function push(xs: number[], rate: number): void {
  xs.push(Math.round(rate));
  if (xs.length > SAMPLES) xs.shift();
}

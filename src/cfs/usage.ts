// The Usage Table of Pairs (a drawing of Kodama, US 7,281,032): for every copy of every pair, how many opens it is
// serving now and has served in all. open picks the copy with the fewest current opens; ties go
// round-robin from a per-pair cursor, so opens that come and go one at a time still spread.
//
// Counts are soft state: they restart at zero with the server, and a connection that goes away
// returns its opens (docs/cfs.md).
import type { CopyRef, UsageCopy, UsageReport } from './protocol.js';

interface Copy extends UsageCopy {
  failedUntil: number;
}

interface PairUsage {
  name: string;
  copies: Copy[];
  cursor: number;
}

export interface PairCopies {
  name: string;
  copies: CopyRef[];
}

export class UsageTable {
  private readonly pairs = new Map<string, PairUsage>();

  constructor(
    pairs: PairCopies[],
    private readonly opts: { readFromMaster: boolean; failedForMs: number; now?: () => number },
  ) {
    for (const p of pairs) {
      this.pairs.set(p.name, {
        name: p.name,
        cursor: 0,
        copies: p.copies.map((c) => ({ ss: c.ss, vol: c.vol, mirror: c.mirror, role: c.mirror === 0 ? 'master' : 'mirror', opens: 0, opensTotal: 0, failedUntil: 0 })),
      });
    }
  }

  /**
   * Choose the copy for a new open, count it, and return it. Copies in `exclude` and copies reported
   * failing are passed over while any other is left; the master is the last resort, as it always
   * holds current data.
   */
  pick(pair: string, exclude: ReadonlySet<number> = new Set(), live: { current: (c: CopyRef) => boolean; master: number } = { current: () => true, master: 0 }): CopyRef {
    const p = this.get(pair);
    const now = this.now();
    // Only copies whose reads are current (live.current); the master is one by definition.
    const usable = (c: Copy, allowFailed: boolean) =>
      live.current(c) && !exclude.has(c.mirror) && (allowFailed || c.failedUntil <= now) && (c.mirror !== live.master || this.opts.readFromMaster || p.copies.length === 1);
    let candidates = p.copies.filter((c) => usable(c, false));
    if (candidates.length === 0) candidates = p.copies.filter((c) => usable(c, true));
    if (candidates.length === 0) candidates = [p.copies[live.master]!];
    const least = Math.min(...candidates.map((c) => c.opens));
    // Round-robin among the tied: the first at or after the cursor.
    const tied = candidates.filter((c) => c.opens === least);
    const chosen = tied.find((c) => c.mirror >= p.cursor) ?? tied[0]!;
    p.cursor = (chosen.mirror + 1) % p.copies.length;
    chosen.opens++;
    chosen.opensTotal++;
    return { mirror: chosen.mirror, ss: chosen.ss, vol: chosen.vol };
  }

  release(pair: string, mirror: number): void {
    const c = this.get(pair).copies[mirror];
    if (c && c.opens > 0) c.opens--;
  }

  /** A client could not read this copy: pass it over for a while. */
  markFailed(pair: string, mirror: number, forMs = this.opts.failedForMs): void {
    const c = this.get(pair).copies[mirror];
    if (c) c.failedUntil = this.now() + forMs;
  }

  copies(pair: string): readonly CopyRef[] {
    return this.get(pair).copies;
  }

  report(): UsageReport {
    const now = this.now();
    return {
      pairs: [...this.pairs.values()].map((p) => ({
        name: p.name,
        copies: p.copies.map((c) => ({
          ss: c.ss,
          vol: c.vol,
          role: c.role,
          mirror: c.mirror,
          opens: c.opens,
          opensTotal: c.opensTotal,
          ...(c.failedUntil > now ? { failed: true } : {}),
        })),
      })),
    };
  }

  private get(pair: string): PairUsage {
    const p = this.pairs.get(pair);
    if (!p) throw new Error(`no pair ${pair} in the usage table`);
    return p;
  }

  private now(): number {
    return this.opts.now ? this.opts.now() : Date.now();
  }
}

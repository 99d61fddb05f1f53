// Which bytes of a write's buffer the initiator has sent. A write runs once every byte of it has
// arrived, not once as many bytes as it wants have: two Data-Out PDUs for the same offsets (a
// buggy or hostile initiator, or DataPDUInOrder=No) must not leave a hole whose old contents,
// from a recycled buffer that held another host's data, would reach the volume.

/** Disjoint, sorted, non-adjacent [start, end) ranges. */
export class Coverage {
  private readonly ranges: Array<[number, number]> = [];
  /** Bytes covered so far. */
  bytes = 0;

  /** Mark [start, end) as received; returns how many of its bytes were new. */
  add(start: number, end: number): number {
    if (end <= start) return 0;
    const r = this.ranges;
    // The usual case: in order, right after the last range.
    const last = r[r.length - 1];
    if (!last || start > last[1]) {
      r.push([start, end]);
      this.bytes += end - start;
      return end - start;
    }
    if (start === last[1]) {
      last[1] = end;
      this.bytes += end - start;
      return end - start;
    }
    // Anywhere else: merge every range that touches [start, end).
    let i = 0;
    while (i < r.length && r[i]![1] < start) i++;
    let j = i;
    let lo = start;
    let hi = end;
    let old = 0;
    while (j < r.length && r[j]![0] <= end) {
      lo = Math.min(lo, r[j]![0]);
      hi = Math.max(hi, r[j]![1]);
      old += r[j]![1] - r[j]![0];
      j++;
    }
    r.splice(i, j - i, [lo, hi]);
    const added = hi - lo - old;
    this.bytes += added;
    return added;
  }
}

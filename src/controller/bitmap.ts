// ClusterBitmap: one bit per cluster of a mirror. A set bit means Invalid:
// the master holds data for that cluster which this mirror lacks (or, while
// the pair is split, the two sides may differ there).
//
//   bit   meaning                                   read of the mirror
//   0     Valid: mirror == master for the cluster   from the mirror
//   1     Invalid                                   from the master
//
// The bitmap is pure state; persistence (write-intent) is BitmapStore's job.

export class ClusterBitmap {
  readonly bits: Uint8Array;
  /** The same bytes as 32-bit words (the whole ones), for counting 32 clusters at a time. */
  private readonly words: Uint32Array;
  private count = 0;

  constructor(
    readonly clusters: number,
    bits?: Uint8Array,
  ) {
    this.bits = new Uint8Array(Math.ceil(clusters / 8));
    this.words = new Uint32Array(this.bits.buffer, 0, this.bits.length >>> 2);
    if (bits) {
      this.bits.set(bits.subarray(0, this.bits.length));
      // Bits past the last cluster carry no meaning: keep them clear so counts stay exact.
      const tail = clusters % 8;
      if (tail) this.bits[this.bits.length - 1]! &= (1 << tail) - 1;
      this.count = popcount(this.bits);
    }
  }

  /** Number of Invalid clusters. */
  get invalidCount(): number {
    return this.count;
  }

  isInvalid(c: number): boolean {
    return (this.bits[c >>> 3]! & (1 << (c & 7))) !== 0;
  }

  /** Mark Invalid; true if the bit changed. */
  setInvalid(c: number): boolean {
    const i = c >>> 3;
    const m = 1 << (c & 7);
    const b = this.bits[i]!;
    if (b & m) return false;
    this.bits[i] = b | m;
    this.count++;
    return true;
  }

  /** Mark Valid; true if the bit changed. */
  setValid(c: number): boolean {
    const i = c >>> 3;
    const m = 1 << (c & 7);
    const b = this.bits[i]!;
    if (!(b & m)) return false;
    this.bits[i] = b & ~m;
    this.count--;
    return true;
  }

  setRangeInvalid(first: number, last: number): void {
    for (let c = first; c <= last; c++) this.setInvalid(c);
  }

  setAllInvalid(): void {
    this.setRangeInvalid(0, this.clusters - 1);
  }

  /** Is any cluster in [first, last] Invalid? (the Check Invalid module) */
  anyInvalid(first: number, last: number): boolean {
    if (this.count === 0) return false;
    for (let c = first; c <= last; c++) {
      // Skip whole clear bytes: most reads of a mostly valid mirror test a few bytes.
      if ((c & 7) === 0 && c + 7 <= last && this.bits[c >>> 3] === 0) {
        c += 7;
        continue;
      }
      if (this.isInvalid(c)) return true;
    }
    return false;
  }

  /** First Invalid cluster at or after `from`, wrapping around; -1 if none. */
  nextInvalid(from: number): number {
    if (this.count === 0) return -1;
    const start = from >= this.clusters ? 0 : from;
    const found = this.scan(start, this.clusters);
    return found >= 0 ? found : this.scan(0, start);
  }

  /**
   * Invalid clusters per bucket: the clusters are cut into `buckets` runs of
   * near-equal length (bucket i holds clusters [floor(i*C/n), floor((i+1)*C/n))),
   * and each run's Invalid bits are counted. A dashboard draws a volume of
   * millions of clusters in a few thousand pixels this way.
   */
  invalidPerBucket(buckets: number): Uint32Array {
    const n = Math.max(1, Math.min(buckets, this.clusters));
    const out = new Uint32Array(n);
    if (this.count === 0) return out;
    let start = 0;
    for (let i = 0; i < n; i++) {
      const end = Math.floor(((i + 1) * this.clusters) / n);
      out[i] = this.countInvalid(start, end);
      start = end;
    }
    return out;
  }

  /** Invalid clusters in [from, to): bit by bit up to a byte edge, bytes up to a word edge, then whole words. */
  private countInvalid(from: number, to: number): number {
    let n = 0;
    let c = from;
    for (; c < to && (c & 7) !== 0; c++) if (this.isInvalid(c)) n++;
    for (; c + 8 <= to && (c & 31) !== 0; c += 8) n += popcount32(this.bits[c >>> 3]!);
    for (; c + 32 <= to; c += 32) n += popcount32(this.words[c >>> 5]!);
    for (; c + 8 <= to; c += 8) n += popcount32(this.bits[c >>> 3]!);
    for (; c < to; c++) if (this.isInvalid(c)) n++;
    return n;
  }

  private scan(from: number, to: number): number {
    let c = from;
    while (c < to) {
      if ((c & 7) === 0 && this.bits[c >>> 3] === 0) {
        c += 8;
        continue;
      }
      if (this.isInvalid(c)) return c;
      c++;
    }
    return -1;
  }
}

function popcount32(v: number): number {
  v -= (v >>> 1) & 0x55555555;
  v = (v & 0x33333333) + ((v >>> 2) & 0x33333333);
  return Math.imul((v + (v >>> 4)) & 0x0f0f0f0f, 0x01010101) >>> 24;
}

function popcount(bytes: Uint8Array): number {
  let n = 0;
  for (const b of bytes) {
    let v = b;
    while (v) {
      v &= v - 1;
      n++;
    }
  }
  return n;
}

/** Clusters [first, last] touched by a byte range (a partly covered cluster counts whole). */
export function clusterRange(offset: number, length: number, clusterSize: number): [number, number] {
  return [Math.floor(offset / clusterSize), Math.floor((offset + Math.max(length, 1) - 1) / clusterSize)];
}

/**
 * Extents of a copy, with every byte of a cluster that may be stale (`stale(c)`) reported as
 * allocated data (flags 0): a copy never calls a cluster a hole or zeroes when its own bytes there
 * may not be the master's, so sparse-aware copy tools (nbdcopy, qemu-img) read it instead of
 * skipping it. Runs of equal flags are merged again.
 */
export function maskStale(extents: readonly { length: number; flags: number }[], offset: number, clusterSize: number, stale: (c: number) => boolean): { length: number; flags: number }[] {
  const out: { length: number; flags: number }[] = [];
  const push = (length: number, flags: number) => {
    const last = out[out.length - 1];
    if (last && last.flags === flags) last.length += length;
    else out.push({ length, flags });
  };
  let at = offset;
  for (const e of extents) {
    const end = at + e.length;
    if (e.flags === 0) {
      push(e.length, 0);
      at = end;
      continue;
    }
    while (at < end) {
      const c = Math.floor(at / clusterSize);
      const next = Math.min(end, (c + 1) * clusterSize);
      push(next - at, stale(c) ? 0 : e.flags);
      at = next;
    }
  }
  return out;
}

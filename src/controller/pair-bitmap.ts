// The dashboard's view of a pair's bitmap: each mirror's Invalid clusters, counted per bucket.
import type { Pair } from './pair.js';
import type { PairBitmap } from './status.js';

export function bitmapOf(p: Pair, buckets: number): PairBitmap {
  const mirrors = p.mirrors.map((m) => ({ ...m.ref, invalidClusters: m.bitmap.invalidCount, invalid: Array.from(m.bitmap.invalidPerBucket(buckets)) }));
  return { name: p.name, clusters: p.clusters, buckets: mirrors[0]?.invalid.length ?? 0, mirrors };
}

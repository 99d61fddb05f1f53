import { describe, expect, it } from 'vitest';
import { SAMPLES, ThroughputHistory, type PairTotals } from '../src/controller/throughput.js';

function history() {
  let t = 0;
  const h = new ThroughputHistory(() => t);
  return { h, tick: (ms: number, totals: Record<string, PairTotals>) => ((t += ms), h.sample(new Map(Object.entries(totals)))) };
}

describe('ThroughputHistory', () => {
  it('turns running totals into bytes per second over each interval, oldest first', () => {
    const { h, tick } = history();
    tick(0, { p: { readBytes: 0, writeBytes: 0, copiedBytes: 0 } });
    expect(h.of('p')).toBeUndefined(); // one reading is not a rate
    tick(1000, { p: { readBytes: 1000, writeBytes: 4096, copiedBytes: 0 } });
    tick(500, { p: { readBytes: 1000, writeBytes: 4096 + 2048, copiedBytes: 512 } });
    expect(h.of('p')).toEqual({ intervalMs: 1000, read: [1000, 0], write: [4096, 4096], copy: [0, 1024] });
  });

  it(`keeps the last ${SAMPLES} samples`, () => {
    const { h, tick } = history();
    for (let i = 0; i <= SAMPLES + 5; i++) tick(1000, { p: { readBytes: 0, writeBytes: i * i, copiedBytes: 0 } });
    const w = h.of('p')!.write;
    expect(w).toHaveLength(SAMPLES);
    expect(w.at(-1)).toBe((SAMPLES + 5) ** 2 - (SAMPLES + 4) ** 2);
    expect(w[0]).toBe(6 ** 2 - 5 ** 2);
  });

  it('forgets a pair that is gone and starts over when its totals go down', () => {
    const { h, tick } = history();
    tick(0, { p: { readBytes: 0, writeBytes: 0, copiedBytes: 0 }, q: { readBytes: 0, writeBytes: 0, copiedBytes: 0 } });
    tick(1000, { p: { readBytes: 0, writeBytes: 100, copiedBytes: 0 }, q: { readBytes: 0, writeBytes: 5, copiedBytes: 0 } });
    tick(1000, { p: { readBytes: 0, writeBytes: 10, copiedBytes: 0 } });
    expect(h.of('q')).toBeUndefined();
    expect(h.of('p')).toBeUndefined(); // totals went down: a new pair under the old name
    tick(1000, { p: { readBytes: 0, writeBytes: 30, copiedBytes: 0 } });
    expect(h.of('p')!.write).toEqual([20]);
  });
});

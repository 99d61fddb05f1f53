// Zero-copy READ replies (views of the memory store in the socket's write queue) as a real
// client sees them: python3-libnbd queues many READs and, behind them, trims, zeroes and
// rewrites of the same bytes, and reads no reply until all are sent. Every reply must hold, for
// each block, one instant's bytes of that block (never a mix, never another offset's data).
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { assertHealthy, requireLibnbdPython, runPy, startTarget, type Target } from './helpers/raw.js';

interface Race {
  replies: number;
  blocks_checked: number;
  versions_seen: number;
  torn: string[];
  leak: string[];
  final_ok: boolean;
}

let t: Target;

beforeAll(async () => {
  await requireLibnbdPython();
  t = await startTarget({ sizeMiB: 16 });
});

afterAll(async () => {
  await t?.stop();
});

describe('READ replies served from the store while later commands change it', () => {
  it('gives every READ one instant of each block, never torn and never another offset\'s pages, and ends with what the last commands left', async () => {
    const r = await runPy<Race>('views_race.py', [t.uri, '4']);
    expect(r.leak).toEqual([]);
    expect(r.torn).toEqual([]);
    expect(r.replies).toBe(4 * 3 * 16);
    // The replies carried written data, not only zeroes: the check had something to check.
    expect(r.versions_seen).toBeGreaterThan(r.blocks_checked / 4);
    expect(r.final_ok).toBe(true);
    await assertHealthy(t);
  });
});

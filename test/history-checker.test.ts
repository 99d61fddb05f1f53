// The history checker of test/cluster-history.test.ts must find what it is there to find: these
// histories are made by hand, each with one anomaly (or none), on the clock of microseconds.
import { describe, expect, it } from 'vitest';
import { TORN, checkHistory, parseOps, type Op } from './helpers/history.js';

const w = (block: number, value: number, inv: number, end: number, ok = true): Op => ({ kind: 'write', client: 1, block, value, inv, end, ok });
const r = (block: number, value: number, inv: number, end: number): Op => ({ kind: 'read', client: 2, block, value, inv, end, ok: true });
const kinds = (ops: Op[], final: [number, number][]) => checkHistory(ops, new Map(final)).map((a) => a.kind);

describe('the history checker', () => {
  it('accepts the last acknowledged value, or a concurrent or unacknowledged later one', () => {
    const ops = [w(0, 11, 0, 10), w(0, 12, 20, 30), w(0, 13, 25, 40), w(0, 14, 50, 60, false)];
    expect(kinds(ops, [[0, 13]])).toEqual([]);
    expect(kinds(ops, [[0, 12]])).toEqual([]); // 12 and 13 overlap: either may be last
    expect(kinds(ops, [[0, 14]])).toEqual([]); // failed, yet it may have landed
  });

  it('finds a lost write: the final value predates an acknowledged write', () => {
    expect(kinds([w(0, 11, 0, 10), w(0, 12, 20, 30)], [[0, 11]])).toEqual(['lost write']);
    expect(kinds([w(3, 11, 0, 10)], [[3, 0]])).toEqual(['lost write']);
  });

  it('finds a stale read, a future read, a phantom value and a torn block', () => {
    const base = [w(0, 11, 0, 10), w(0, 12, 20, 30)];
    expect(kinds([...base, r(0, 11, 40, 45)], [[0, 12]])).toEqual(['stale read']);
    expect(kinds([...base, r(0, 11, 25, 45)], [[0, 12]])).toEqual([]); // the read overlaps the write of 12
    expect(kinds([...base, r(0, 12, 5, 15)], [[0, 12]])).toEqual(['future read']);
    expect(kinds([...base, r(0, 99, 40, 45)], [[0, 12]])).toEqual(['phantom value']);
    expect(kinds(base, [[0, TORN]])).toEqual(['torn block']);
  });

  it('reads the clients\' lines, with the message of a failed operation, and ignores anything else', () => {
    const ops = parseOps(4, 'w 3 17179869185 100 200 ok\nr 3 17179869185 300 310 ok\nr 1 0 5 6 torn\nw 2 17179869186 7 8 err Input/output error\nnoise\n');
    expect(ops).toEqual([
      { kind: 'write', client: 4, block: 3, value: 17179869185, inv: 100, end: 200, ok: true },
      { kind: 'read', client: 4, block: 3, value: 17179869185, inv: 300, end: 310, ok: true },
      { kind: 'read', client: 4, block: 1, value: 0, inv: 5, end: 6, ok: true, torn: true },
      { kind: 'write', client: 4, block: 2, value: 17179869186, inv: 7, end: 8, ok: false, error: 'Input/output error' },
    ]);
  });
});

// Coverage decides when a write's data-out buffer is full. Its buffers are recycled, so a byte it
// wrongly counts as received would send another write's old data to the volume.
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { Coverage } from '../src/iscsi/coverage.js';

describe('the coverage of a write buffer', () => {
  it('counts every byte once, whatever the order and overlap of the ranges (model: a byte array)', () => {
    fc.assert(
      fc.property(fc.array(fc.tuple(fc.nat(300), fc.nat(80)), { maxLength: 40 }), (ranges) => {
        const c = new Coverage();
        const model = new Uint8Array(400);
        for (const [start, len] of ranges) {
          const before = model.reduce((a, b) => a + b, 0);
          model.fill(1, start, start + len);
          const after = model.reduce((a, b) => a + b, 0);
          expect(c.add(start, start + len)).toBe(after - before);
          expect(c.bytes).toBe(after);
        }
      }),
      { numRuns: 2000 },
    );
  });

  it('does not call a buffer full when one range came twice and another never came', () => {
    const c = new Coverage();
    c.add(0, 4096);
    c.add(0, 4096);
    expect(c.bytes).toBe(4096);
    c.add(8192, 12288);
    expect(c.bytes).toBe(8192);
    c.add(4096, 8192);
    expect(c.bytes).toBe(12288);
  });
});

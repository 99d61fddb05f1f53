// Model-based test of live reconfiguration (controller/reconfigure.ts), in-process on memory
// volumes: fast-check draws a sequence of target layouts (volumes, local pairs and their mirrors,
// sync rates) and host writes in between. After each apply, the storage system runs exactly the
// target, or (refused) exactly what it ran before; and once the sync daemon is idle, every mirror
// holds its master's bytes and every volume the data the model says it has.
import fc from 'fast-check';
import { pino } from 'pino';
import { describe, expect, it } from 'vitest';
import { planChanges, ReconfigureRefused, runSteps } from '../src/controller/reconfigure.js';
import { StorageSystem, type StorageSystemSpec } from '../src/controller/storage-system.js';
import type { PairSpec } from '../src/controller/pair.js';

const KiB = 1024;
const CLUSTER = 16 * KiB;
const VOLS = [1, 2, 3, 4, 5];
const log = pino({ level: 'silent' });

interface Layout {
  volumes: { id: number; size: number }[];
  pairs: PairSpec[];
}

/** A layout YAML could give: volumes of two sizes, pairs among volumes of one size, each volume in one pair at most. */
const layoutArb: fc.Arbitrary<Layout> = fc
  .record({
    present: fc.subarray(VOLS, { minLength: 1 }),
    big: fc.subarray(VOLS),
    groups: fc.array(fc.record({ vols: fc.shuffledSubarray(VOLS, { minLength: 2, maxLength: 3 }), mode: fc.constantFrom('sync' as const, 'async' as const), rate: fc.option(fc.constantFrom(256 * KiB, 1024 * KiB), { nil: undefined }) }), { maxLength: 2 }),
  })
  .map(({ present, big, groups }) => {
    const volumes = present.map((id) => ({ id, size: big.includes(id) ? 256 * KiB : 128 * KiB }));
    const size = new Map(volumes.map((v) => [v.id, v.size]));
    const used = new Set<number>();
    const pairs: PairSpec[] = [];
    groups.forEach((g, i) => {
      const vols = g.vols.filter((v) => size.has(v) && !used.has(v) && size.get(v) === size.get(g.vols[0]!));
      if (vols.length < 2 || vols[0] !== g.vols[0]) return;
      for (const v of vols) used.add(v);
      pairs.push({ name: `p${i}`, mode: g.mode, master: { ss: 1, vol: vols[0]! }, mirrors: vols.slice(1).map((vol) => ({ ss: 1, vol })), fence: 'never', ...(g.rate ? { syncRate: g.rate } : {}) });
    });
    return { volumes, pairs };
  });

const stepArb = fc.record({ layout: layoutArb, write: fc.record({ vol: fc.constantFrom(...VOLS), block: fc.nat(7), byte: fc.integer({ min: 1, max: 255 }) }) });

function specOf(l: Layout): StorageSystemSpec {
  return { id: 1, nbd: { host: '127.0.0.1', port: 0 }, clusterSize: CLUSTER, volumes: l.volumes, pairs: l.pairs, remotePairs: [], peers: [], peerTimeout: 5000, faults: [] };
}

async function read(ss: StorageSystem, vol: number): Promise<Buffer> {
  const dev = ss.volumeDevice(vol)!;
  const buf = Buffer.alloc(dev.size);
  await dev.read(0, buf);
  return buf;
}

describe('live reconfiguration, model-based', () => {
  it('runs exactly the target layout or, refused, exactly the one before; mirrors end equal to their masters and no volume loses data', async () => {
    await fc.assert(
      fc.asyncProperty(layoutArb, fc.array(stepArb, { minLength: 1, maxLength: 6 }), async (first, steps) => {
        const ss = await StorageSystem.start(specOf(first), log);
        // The model: what each volume holds (its master's bytes, for a mirror, once copied).
        const model = new Map<number, Buffer>(first.volumes.map((v) => [v.id, Buffer.alloc(v.size)]));
        let layout = first;
        try {
          for (const { layout: target, write } of steps) {
            // A host write to a master or a simplex volume, through its export.
            const isMirror = layout.pairs.some((p) => p.mirrors.some((m) => m.vol === write.vol));
            const exp = ss.nbd.exports.get(`vol${write.vol}`);
            if (exp && !isMirror) {
              const off = write.block * CLUSTER;
              if (off + CLUSTER <= exp.device.size) {
                const data = Buffer.alloc(CLUSTER, write.byte);
                await exp.device.write(off, data);
                data.copy(model.get(write.vol)!, off);
              }
            }
            // In sync before the change: a mirror that leaves its pair keeps its master's bytes.
            await ss.daemon.idle();
            for (const p of layout.pairs) for (const m of p.mirrors) model.set(m.vol, Buffer.from(model.get(p.master.vol)!));
            const before = JSON.stringify(ss.spec);
            let refused = false;
            try {
              await runSteps(await planChanges(ss, specOf(target)), log);
            } catch (e) {
              if (!(e instanceof ReconfigureRefused)) throw e;
              refused = true;
              expect(JSON.stringify(ss.spec)).toBe(before);
            }
            if (!refused) {
              layout = target;
              // The model follows: new volumes hold zeroes; resized ones keep their bytes up to the new size.
              for (const v of target.volumes) {
                const had = model.get(v.id);
                const now = Buffer.alloc(v.size);
                had?.copy(now, 0, 0, Math.min(had.length, v.size));
                model.set(v.id, now);
              }
              for (const id of [...model.keys()]) if (!target.volumes.some((v) => v.id === id)) model.delete(id);
              // A mirror copies its master.
              for (const p of target.pairs) for (const m of p.mirrors) model.set(m.vol, Buffer.from(model.get(p.master.vol)!));
            }
            const report = ss.report();
            expect(report.storageSystems[0]!.volumes.map((v) => [v.id, v.size]).sort()).toEqual(layout.volumes.map((v) => [v.id, v.size]).sort());
            expect(report.pairs.map((p) => [p.name, p.mode, p.master.vol, p.mirrors.map((m) => m.vol), p.syncRate ?? null]).sort()).toEqual(layout.pairs.map((p) => [p.name, p.mode, p.master.vol, p.mirrors.map((m) => m.vol), p.syncRate ?? null]).sort());
            await ss.daemon.idle();
            for (const [id, bytes] of model) expect((await read(ss, id)).equals(bytes), `vol${id}`).toBe(true);
          }
        } finally {
          await ss.close();
        }
      }),
      { numRuns: 40 },
    );
  });
});

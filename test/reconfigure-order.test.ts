// Live reconfiguration that moves a volume from one local pair to another in one apply
// (controller/reconfigure.ts, orderChanges). Each changed pair is replaced whole, and the volumes its
// new layout leaves become simplex: the pair that lets a volume go must change before the pair that
// takes it, or the volume comes back simplex and its new pair's mirror stops getting its writes (found
// by test/reconfigure.model.test.ts in CI: a sync mirror that read back stale data). In-process, on
// memory volumes; every copy is compared byte for byte at the end.
import { pino } from 'pino';
import { describe, expect, it } from 'vitest';
import { orderChanges, planChanges, ReconfigureRefused, runSteps } from '../src/controller/reconfigure.js';
import { StorageSystem, type StorageSystemSpec } from '../src/controller/storage-system.js';
import type { PairSpec } from '../src/controller/pair.js';

const log = pino({ level: 'silent' });
const KiB = 1024;
const CLUSTER = 16 * KiB;
const SIZE = 128 * KiB;
const spec = (ids: number[], pairs: PairSpec[]): StorageSystemSpec => ({
  id: 1, nbd: { host: '127.0.0.1', port: 0 }, clusterSize: CLUSTER, volumes: ids.map((id) => ({ id, size: SIZE })), pairs, remotePairs: [], peers: [], peerTimeout: 5000, faults: [],
});
const pair = (name: string, master: number, mirror: number): PairSpec => ({ name, mode: 'sync', master: { ss: 1, vol: master }, mirrors: [{ ss: 1, vol: mirror }], fence: 'never' });

async function bytes(ss: StorageSystem, vol: number): Promise<Buffer> {
  const buf = Buffer.alloc(SIZE);
  await ss.volumeDevice(vol)!.read(0, buf);
  return buf;
}

describe('a volume that moves between local pairs in one apply', () => {
  // Volume 1 is the mirror of the pair holding 4 and becomes the master of the pair holding 3. The
  // pair that takes it comes first in the YAML, or last (where the YAML's order happens to be right).
  for (const takesFirst of [true, false]) {
    const [takes, lets] = ['p0', 'p1'];
    it(`is let go by its old pair before its new one takes it, whichever the YAML lists first (${takesFirst ? 'the taker' : 'the other'}): the new mirror gets its writes`, async () => {
      const pairs = [pair(takes, 5, 3), pair(lets, 4, 1)];
      const ss = await StorageSystem.start(spec([1, 3, 4, 5], takesFirst ? pairs : pairs.reverse()), log);
      try {
        await ss.nbd.exports.get('vol4')!.device.write(0, Buffer.alloc(CLUSTER, 4));
        await ss.nbd.exports.get('vol5')!.device.write(CLUSTER, Buffer.alloc(CLUSTER, 5));
        await ss.daemon.idle();
        const steps = await planChanges(ss, spec([1, 2, 3, 4, 5], [pair(takes, 1, 3), pair(lets, 4, 2)]));
        // The pair that lets volume 1 go changes first.
        expect(steps.map((s) => s.line).filter((l) => /: p[01]: /.test(l)).map((l) => l.split(': ')[1])).toEqual([lets, takes]);
        await runSteps(steps, log);
        await ss.daemon.idle();
        // Written through volume 1's export after the change: its sync mirror, 3, must get it.
        await ss.nbd.exports.get('vol1')!.device.write(2 * CLUSTER, Buffer.alloc(CLUSTER, 0x11));
        await ss.nbd.exports.get('vol4')!.device.write(3 * CLUSTER, Buffer.alloc(CLUSTER, 0x44));
        await ss.daemon.idle();
        const v1 = await bytes(ss, 1);
        expect(v1.subarray(0, CLUSTER).every((b) => b === 4)).toBe(true); // what it held as 4's mirror
        expect(v1.subarray(2 * CLUSTER, 3 * CLUSTER).every((b) => b === 0x11)).toBe(true);
        expect((await bytes(ss, 3)).equals(v1)).toBe(true);
        expect((await bytes(ss, 2)).equals(await bytes(ss, 4))).toBe(true);
        expect((await bytes(ss, 4))[3 * CLUSTER]).toBe(0x44);
        expect(ss.report().pairs.map((p) => [p.name, p.state, p.master.vol, p.mirrors.map((m) => m.vol)]).sort()).toEqual(
          [[takes, 'PAIR', 1, [3]], [lets, 'PAIR', 4, [2]]].sort(),
        );
      } finally {
        await ss.close();
      }
    });
  }

  it('is refused, changing nothing, when two pairs would exchange volumes (no pair can go first)', async () => {
    const ss = await StorageSystem.start(spec([1, 2, 3, 4], [pair('p0', 1, 2), pair('p1', 3, 4)]), log);
    try {
      const before = JSON.stringify(ss.spec);
      const plan = planChanges(ss, spec([1, 2, 3, 4], [pair('p0', 1, 4), pair('p1', 3, 2)]));
      await expect(plan).rejects.toThrow(ReconfigureRefused);
      await expect(plan).rejects.toThrow(/pairs p0, p1 would exchange volumes in one change.*apply it in two steps/);
      expect(JSON.stringify(ss.spec)).toBe(before);
    } finally {
      await ss.close();
    }
  });

  it('keeps the YAML order when no pair takes another\'s volume, and orders chains', () => {
    const refuse = (why: string): never => {
      throw new Error(why);
    };
    const names = (c: [PairSpec, PairSpec][]) => orderChanges(c, refuse).map(([a]) => a.name);
    // Independent changes: as given.
    expect(names([[pair('a', 1, 2), pair('a', 1, 3)], [pair('b', 4, 5), pair('b', 4, 6)]])).toEqual(['a', 'b']);
    // c takes 5 from b, b takes 2 from a: a, then b, then c.
    expect(names([[pair('c', 7, 8), pair('c', 7, 5)], [pair('b', 4, 5), pair('b', 4, 2)], [pair('a', 1, 2), pair('a', 1, 3)]])).toEqual(['a', 'b', 'c']);
  });
});

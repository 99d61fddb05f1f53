// The destager of RW S-VOL members (destage.ts, issue 15): a host write to a split RW member is
// acknowledged once it is in the increments, and the member's own volume follows behind. These
// tests hold the destage back (a delay on the member's volume writes) so that reads, a restart, a
// resync and an attribute change meet it with clusters pending, and fail it (EIO on the member's
// writes). Each ends with the member's volume compared byte for byte.
import fs from 'node:fs';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { FilterDevice } from '../src/blockdev/filter.js';
import { payloadLength, type Payload } from '../src/blockdev/types.js';
import type { SvolGroupSpec } from '../src/controller/svol/group.js';
import { tmpDir } from './helpers/servers.js';
import { VolatileCache } from './helpers/volatile-cache.js';
import { SvolRig as Rig } from './helpers/svol-rig.js';

const CLUSTER = 4096;
const CLUSTERS = 32;
const SIZE = CLUSTER * CLUSTERS;
const SPEC: SvolGroupSpec = {
  name: 'g',
  pvol: 1,
  members: [
    { vol: 2, attr: 'RO' },
    { vol: 3, attr: 'RW', increments: 9 },
    { vol: 5, attr: 'spare' },
  ],
};

const rigs: Rig[] = [];
afterEach(async () => {
  for (const r of rigs.splice(0)) await r.close();
});

/** A group whose P-VOL holds 0x11 everywhere, copied to its members and split. */
async function splitRig(prefix: string, cluster = CLUSTER, size = SIZE): Promise<Rig> {
  const rig = new Rig(tmpDir(prefix), SPEC, cluster, size);
  rigs.push(rig);
  await rig.open();
  await rig.pvol.write(0, Buffer.alloc(size, 0x11));
  await rig.group.init();
  await rig.group.idle();
  await rig.group.split();
  return rig;
}

/** A split group whose P-VOL holds 0x11; the RW member (vol3, volume 3) then gets `writes` clusters, every other one, written 0x33 while its destage is held back. */
async function pendingRig(writes: number): Promise<{ rig: Rig; image: Buffer; rw: Buffer }> {
  const rig = await splitRig('bm-svol-destage-');
  const image = Buffer.alloc(SIZE, 0x11);
  const rw = Buffer.from(image);
  // Each destage run (one per gap-separated cluster) waits 50 ms on the member's volume.
  rig.faults.get(3)!.set({ kind: 'delay', ms: 50, ops: ['write'] });
  for (let k = 0; k < writes; k++) {
    const at = 2 * k * CLUSTER + 100;
    await rig.lv(3).write(at, Buffer.alloc(1000, 0x33));
    rw.fill(0x33, at, at + 1000);
  }
  return { rig, image, rw };
}

describe('S-VOL destage of RW members', () => {
  it('serves reads of clusters not destaged yet from the increments, and brings the member volume up to date behind the host', async () => {
    const { rig, rw } = await pendingRig(8);
    expect(rig.member(3).destagePending).toBeGreaterThan(1);
    // The member's volume is behind, the logical ID is not.
    expect((rig.volume(3)).equals(rw)).toBe(false);
    expect((await rig.read(rig.lv(3))).equals(rw)).toBe(true);
    const part = Buffer.alloc(3 * CLUSTER);
    await rig.lv(3).read(13 * CLUSTER, part);
    expect(part.equals(rw.subarray(13 * CLUSTER, 16 * CLUSTER))).toBe(true);
    // An RW member with changes stays RW while the destage runs (and after): resync it first.
    await expect(rig.group.setAttr('3', 'RO')).rejects.toThrow(/resync it first/);
    await rig.group.destageIdle();
    expect(rig.member(3).destagePending).toBe(0);
    expect((rig.volume(3)).equals(rw)).toBe(true);
    expect((await rig.read(rig.lv(3))).equals(rw)).toBe(true);
  });

  it('destages every changed cluster again after a restart that left some pending, with the logical ID right throughout', async () => {
    const { rig, rw } = await pendingRig(8);
    expect(rig.member(3).destagePending).toBeGreaterThan(1);
    await rig.close();
    expect((rig.volume(3)).equals(rw)).toBe(false);
    await rig.open();
    // Which clusters had reached the volume is not kept: all 8 are pending again.
    expect(rig.member(3).destagePending).toBeGreaterThan(1);
    expect(rig.member(3).destagePending).toBeLessThanOrEqual(8);
    expect((await rig.read(rig.lv(3))).equals(rw)).toBe(true);
    await rig.group.destageIdle();
    expect(rig.member(3).destagePending).toBe(0);
    expect((rig.volume(3)).equals(rw)).toBe(true);
  });

  it('stops the destage of members resynced while it runs: no destage write lands on the copy from the P-VOL', async () => {
    const { rig } = await pendingRig(8);
    const pvol = Buffer.alloc(SIZE, 0x11);
    expect(rig.member(3).destagePending).toBeGreaterThan(1);
    await rig.group.resync();
    expect(rig.member(3).destagePending).toBe(0);
    await rig.group.idle();
    await rig.group.destageIdle();
    rig.faults.get(3)!.clear();
    expect((await rig.read(rig.lv(3))).equals(pvol)).toBe(true);
    expect((rig.volume(3)).equals(pvol)).toBe(true);
    // Split again: the member starts a new log, and its writes destage onto the resynced volume.
    await rig.group.split();
    await rig.lv(3).write(5 * CLUSTER, Buffer.alloc(CLUSTER, 0x55));
    pvol.fill(0x55, 5 * CLUSTER, 6 * CLUSTER);
    await rig.group.destageIdle();
    expect((rig.volume(3)).equals(pvol)).toBe(true);
  });

  it('fails the RW member on a destage write error (EIO) and rebuilds it from its sibling and the increments, while no host write or read fails', async () => {
    const { rig, image, rw } = await pendingRig(4);
    rig.faults.get(3)!.set({ kind: 'error', ops: ['write'] });
    // More host writes while the member's volume refuses every write: all acknowledged.
    for (let k = 0; k < 4; k++) {
      const at = (20 + k) * CLUSTER;
      await rig.lv(3).write(at, Buffer.alloc(CLUSTER, 0x44));
      rw.fill(0x44, at, at + CLUSTER);
    }
    expect((await rig.read(rig.lv(3))).equals(rw)).toBe(true);
    await rig.group.destageIdle();
    await rig.group.idle();
    const st = rig.group.status();
    // Tomita claim 1: the RO sibling's volume (2) took the increments and the RW role; the spare (5) its RO role.
    expect(st.members.find((m) => m.logicalId === 3)).toMatchObject({ vol: 2, state: 'split', destagePending: 0 });
    expect(st.members.find((m) => m.logicalId === 2)).toMatchObject({ vol: 5, state: 'split' });
    expect(st.members.find((m) => m.vol === 3)).toMatchObject({ state: 'error', error: expect.stringMatching(/^write: /) });
    expect((await rig.read(rig.lv(3))).equals(rw)).toBe(true);
    expect((rig.volume(2)).equals(rw)).toBe(true);
    expect((rig.volume(5)).equals(image)).toBe(true);
  });
  it('destages only the 4 KiB blocks host writes touched in a 64 KiB cluster, and a changed cluster whole after a restart', async () => {
    const big = 64 * 1024;
    const size = 16 * big;
    const rig = await splitRig('bm-svol-destage-blocks-', big, size);
    const writes: [number, number][] = [];
    class WriteLog extends FilterDevice {
      override write(offset: number, data: Payload): Promise<void> {
        writes.push([offset, payloadLength(data)]);
        return this.next.write(offset, data);
      }
    }
    rig.volumes.set(3, { device: new WriteLog(rig.volumes.get(3)!.device) });
    const rw = Buffer.alloc(size, 0x11);
    // A whole block, a part of one, and two writes into one block of a third cluster.
    await rig.lv(3).write(big + 8192, Buffer.alloc(4096, 0x33));
    rw.fill(0x33, big + 8192, big + 12288);
    await rig.lv(3).write(5 * big + 100, Buffer.alloc(1000, 0x44));
    rw.fill(0x44, 5 * big + 100, 5 * big + 1100);
    await rig.lv(3).write(9 * big + 60 * 1024, Buffer.alloc(512, 0x55));
    await rig.lv(3).write(9 * big + 61 * 1024, Buffer.alloc(512, 0x66));
    rw.fill(0x55, 9 * big + 60 * 1024, 9 * big + 60 * 1024 + 512);
    rw.fill(0x66, 9 * big + 61 * 1024, 9 * big + 61 * 1024 + 512);
    await rig.group.destageIdle();
    // (The block written twice may be destaged after each write: the destager runs between them.)
    expect([...new Set(writes.map(([at, len]) => `${at}+${len}`))].map((w) => w.split('+').map(Number)).sort((a, b) => a[0]! - b[0]!)).toEqual([
      [big + 8192, 4096],
      [5 * big, 4096],
      [9 * big + 60 * 1024, 4096],
    ]);
    expect(rig.volume(3).equals(rw)).toBe(true);
    expect((await rig.read(rig.lv(3))).equals(rw)).toBe(true);

    // What reached the volume before a restart is not known: the changed clusters go again, whole.
    // (A block of a changed cluster that no host wrote, spoiled behind the group's back, shows it.)
    await rig.close();
    const fd = fs.openSync(path.join(rig.dir, 'vol3.img'), 'r+');
    fs.writeSync(fd, Buffer.alloc(4096, 0xee), 0, 4096, big);
    fs.closeSync(fd);
    await rig.open();
    await rig.group.destageIdle();
    expect(rig.volume(3).equals(rw)).toBe(true);
  });
  it('takes an RW member\'s increments map as its write intent: a restart whose bitmap lost the bits still counts the clusters changed, and no destage write starts before their map entries are durable', async () => {
    const rig = await splitRig('bm-svol-intent-');
    const bitmapFile = path.join(rig.dir, 'svol', 'g.bitmap');
    const atSplit = fs.readFileSync(bitmapFile);
    // The increments volume keeps only what a flush covered; each member write checks the map on that disk.
    let incr: VolatileCache | undefined;
    const early: number[] = [];
    class MapCheck extends FilterDevice {
      override write(offset: number, data: Payload): Promise<void> {
        for (let c = Math.floor(offset / CLUSTER); c * CLUSTER < offset + payloadLength(data); c++) if (incr!.durable.readUInt32LE(4096 + 4 * c) === 0) early.push(c);
        return this.next.write(offset, data);
      }
    }
    await rig.close();
    rig.wrap = (v, dev) => (v === 9 ? (incr = new VolatileCache(dev, rig.volume(9), () => {})) : v === 3 ? new MapCheck(dev) : dev);
    await rig.open();
    rig.wrap = undefined;
    const rw = Buffer.alloc(SIZE, 0x11);
    for (const c of [3, 7, 8, 20]) {
      await rig.lv(3).write(c * CLUSTER + 512, Buffer.alloc(1024, c));
      rw.fill(c, c * CLUSTER + 512, c * CLUSTER + 1536);
    }
    await rig.group.destageIdle();
    expect(rig.volume(3).equals(rw)).toBe(true);
    expect(early).toEqual([]);
    expect(rig.member(3).changedClusters).toBe(4);

    // The bitmap file as it was at the split (its bits for these writes lost): the map still says which clusters changed.
    await rig.close();
    fs.writeFileSync(bitmapFile, atSplit);
    await rig.open();
    expect(rig.member(3).changedClusters).toBe(4);
    expect((await rig.read(rig.lv(3))).equals(rw)).toBe(true);
    // So a resync copies them back from the P-VOL.
    await rig.group.resync();
    await rig.group.idle();
    expect(rig.volume(3).equals(Buffer.alloc(SIZE, 0x11))).toBe(true);
  });
});

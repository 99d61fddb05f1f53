// The copy of an S-VOL restore (recovery.ts copyForRestore, issue 15): runs in flight at once,
// checkpoints recorded only once a flush made the copy below them durable, and ranges the donor
// reads as zeroes (its allocation, and no checksum that knows other bytes) zeroed on the target
// instead of copied; an RW member's increments applied in runs of contiguous clusters. In process
// (test/helpers/svol-rig.ts), over file volumes.
import fs from 'node:fs';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { FilterDevice } from '../src/blockdev/filter.js';
import { openFileDevice } from '../src/blockdev/file.js';
import { ChecksumTables, SUM_BLOCK } from '../src/controller/svol/checksums.js';
import type { SvolGroupSpec } from '../src/controller/svol/group.js';
import { decodeGroupRecord } from '../src/controller/svol/group-file.js';
import { MemberIo } from '../src/controller/svol/member-io.js';
import { pino } from 'pino';
import { tmpDir } from './helpers/servers.js';
import { VolatileCache } from './helpers/volatile-cache.js';
import { SvolRig as Rig } from './helpers/svol-rig.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const CLUSTER = 4 * KiB;
const SIZE = 8 * MiB;
const SPEC: SvolGroupSpec = {
  name: 'g',
  pvol: 1,
  members: [
    { vol: 2, attr: 'RO' },
    { vol: 4, attr: 'RO' },
    { vol: 5, attr: 'spare' },
  ],
};

const rigs: Rig[] = [];
afterEach(async () => {
  for (const r of rigs.splice(0)) await r.close();
});

function pattern(len: number, seed: number): Buffer {
  const b = Buffer.alloc(len);
  for (let i = 0; i < len; i++) b[i] = (i * 131 + seed + (i >>> 12)) & 0xff;
  return b;
}

/** Reads of a volume, by range. */
class ReadLog extends FilterDevice {
  reads: [number, number][] = [];
  override read(offset: number, dest: Buffer): Promise<void> {
    this.reads.push([offset, offset + dest.length]);
    return this.next.read(offset, dest);
  }
}

/** Writes to a volume, by range. */
class WriteLog extends FilterDevice {
  writes: [number, number][] = [];
  override write(offset: number, data: Buffer): Promise<void> {
    this.writes.push([offset, offset + data.length]);
    return this.next.write(offset, data);
  }
}

/** A split group whose P-VOL holds `image`; the spare (volume 5) holds 0xee. */
async function splitRig(image: Buffer, checkpoint?: number): Promise<Rig> {
  const dir = tmpDir('bm-svol-restore-');
  fs.writeFileSync(path.join(dir, 'vol5.img'), Buffer.alloc(SIZE, 0xee));
  const rig = new Rig(dir, SPEC, CLUSTER, SIZE, checkpoint);
  rigs.push(rig);
  await rig.open();
  await rig.pvol.write(0, image);
  await rig.group.init();
  await rig.group.idle();
  await rig.group.split();
  return rig;
}

describe('S-VOL restore copy', () => {
  it('records a restore\'s progress only where a flush made the copy durable: after a power loss at any write of the restore, the restart resumes and the target ends equal to its donor', async () => {
    const image = pattern(SIZE, 7);
    // A checkpoint every 1 MiB: several during the 8 MiB copy, with runs in flight past each.
    const rig = await splitRig(image, 1 * MiB);
    const svolDir = path.join(rig.dir, 'svol');
    const crashes: { files: Map<string, Buffer>; disk: Buffer }[] = [];
    const spare: VolatileCache = new VolatileCache(rig.volumes.get(5)!.device, rig.volume(5), () => {
      // The power goes at this instant: the group's files as they are, the spare as its disk holds it.
      const files = new Map(fs.readdirSync(svolDir).map((f) => [f, fs.readFileSync(path.join(svolDir, f))]));
      crashes.push({ files, disk: Buffer.from(spare.durable) });
    });
    rig.volumes.set(5, { device: spare });
    // Slow writes: checkpoints are recorded while later runs are in flight.
    rig.faults.get(5)!.set({ kind: 'delay', ms: 20, ops: ['write'] });
    rig.faults.get(2)!.set({ kind: 'error', ops: ['read'] });
    const first = Buffer.alloc(4 * KiB);
    await rig.lv(2).read(0, first);
    expect(first.equals(image.subarray(0, 4 * KiB))).toBe(true);
    await rig.group.idle();
    expect(rig.member(2)).toMatchObject({ vol: 5, state: 'split' });
    expect(rig.volume(5).equals(image)).toBe(true);
    await rig.close();

    rig.faults.get(5)!.clear();
    // Crashes after a checkpoint, with runs copied past it that no flush covered: the case that matters.
    const recorded = crashes.map((c) => decodeGroupRecord('g.group', c.files.get('g.group')!).restore?.next);
    expect(recorded.some((n) => n !== undefined && n > 0 && n < SIZE / CLUSTER), `recorded: ${recorded.join(' ')}`).toBe(true);
    expect(crashes.length).toBeGreaterThanOrEqual(8);
    for (const [k, crash] of crashes.entries()) {
      const dir = tmpDir('bm-svol-restore-crash-');
      for (const v of [1, 2, 4]) fs.copyFileSync(path.join(rig.dir, `vol${v}.img`), path.join(dir, `vol${v}.img`));
      fs.writeFileSync(path.join(dir, 'vol5.img'), crash.disk);
      fs.mkdirSync(path.join(dir, 'svol'));
      for (const [f, b] of crash.files) fs.writeFileSync(path.join(dir, 'svol', f), b);
      const again = new Rig(dir, SPEC, CLUSTER, SIZE, 1 * MiB);
      rigs.push(again);
      await again.open();
      await again.group.idle();
      expect(again.member(2), `crash ${k} (recorded at cluster ${recorded[k]})`).toMatchObject({ vol: 5, state: 'split' });
      expect(again.volume(5).equals(image), `crash ${k}: volume 5 after the resumed restore`).toBe(true);
      expect((await again.read(again.lv(2))).equals(image), `crash ${k}: vol2 read by a host`).toBe(true);
      await again.close();
    }
  });

  it('zeroes the target where the donor reads as zeroes by its allocation and checksums, without reading there, and copies the rest', async () => {
    // Data in [0, 2 MiB) and [6 MiB, 7 MiB); zeroes elsewhere, which the donor then gives back (a thin volume, fstrim).
    const image = Buffer.alloc(SIZE);
    pattern(2 * MiB, 3).copy(image, 0);
    pattern(1 * MiB, 9).copy(image, 6 * MiB);
    const rig = await splitRig(image);
    const holes: [number, number][] = [
      [2 * MiB, 6 * MiB],
      [7 * MiB, 8 * MiB],
    ];
    // Below the group, as the backend itself would: the checksums still know these blocks, as zeroes.
    for (const [from, to] of holes) await rig.volumes.get(4)!.device.trim(from, to - from);
    const allocation = await rig.volumes.get(4)!.device.extents(2 * MiB, 4 * MiB);
    expect(allocation.every((e) => e.flags & 2)).toBe(true);
    const donor = new ReadLog(rig.volumes.get(4)!.device);
    rig.volumes.set(4, { device: donor });
    rig.faults.get(2)!.set({ kind: 'error', ops: ['read'] });
    await rig.lv(2).read(0, Buffer.alloc(4 * KiB));
    await rig.group.idle();
    expect(rig.member(2)).toMatchObject({ vol: 5, state: 'split' });
    // The spare held 0xee everywhere: the zeroed ranges read as zeroes now, the rest as the donor.
    expect(rig.volume(5).equals(image)).toBe(true);
    expect(donor.reads.filter(([from, to]) => holes.some(([h0, h1]) => from < h1 && h0 < to))).toEqual([]);
    expect(donor.reads.some(([from, to]) => from < 7 * MiB && 6 * MiB < to)).toBe(true);
    // And the host reads of the rebuilt member are checked against what the zeroing recorded.
    expect((await rig.read(rig.lv(2))).equals(image)).toBe(true);
  });

  it('calls a range zeroes only when the volume reports it unallocated and no checksum there knows other bytes', async () => {
    const dir = tmpDir('bm-svol-zeroes-');
    const size = 64 * SUM_BLOCK;
    const dev = await openFileDevice(path.join(dir, 'v.img'), { size });
    try {
      const io = new MemberIo(() => dev, new ChecksumTables(size, undefined, pino({ level: 'silent' })), 0, size);
      const data = pattern(16 * SUM_BLOCK, 5);
      // Blocks 0-15 data, 16-31 written as zeroes, 32-63 never written.
      await io.write(7, 0, data.length, data, () => dev.write(0, data));
      const zeroes = Buffer.alloc(16 * SUM_BLOCK);
      await io.write(7, 16 * SUM_BLOCK, zeroes.length, zeroes, () => dev.write(16 * SUM_BLOCK, zeroes));
      expect(await io.readsAsZeroes(7, 32 * SUM_BLOCK, 32 * SUM_BLOCK)).toBe(true);
      // Allocated zeroes are read (the backend does not say they are zeroes).
      expect(await io.readsAsZeroes(7, 16 * SUM_BLOCK, 16 * SUM_BLOCK)).toBe(false);
      // Holes where the checksums know data: a block that lost its bytes, read so that the check catches it.
      await dev.trim(0, 32 * SUM_BLOCK);
      expect(await io.readsAsZeroes(7, 16 * SUM_BLOCK, 48 * SUM_BLOCK)).toBe(true);
      expect(await io.readsAsZeroes(7, 15 * SUM_BLOCK, SUM_BLOCK)).toBe(false);
      expect(await io.readsAsZeroes(7, 0, 64 * SUM_BLOCK)).toBe(false);
    } finally {
      await dev.close();
    }
  });

  it('applies an RW member\'s increments to its new volume in runs of contiguous clusters, one write per run, and the member reads as its host wrote it', async () => {
    const spec: SvolGroupSpec = {
      name: 'g',
      pvol: 1,
      members: [
        { vol: 2, attr: 'RO' },
        { vol: 3, attr: 'RW', increments: 9 },
        { vol: 5, attr: 'spare' },
      ],
    };
    const dir = tmpDir('bm-svol-restore-rw-');
    const rig = new Rig(dir, spec, CLUSTER, SIZE);
    rigs.push(rig);
    await rig.open();
    const image = pattern(SIZE, 11);
    await rig.pvol.write(0, image);
    await rig.group.init();
    await rig.group.idle();
    await rig.group.split();
    // 64 contiguous clusters, then one on its own.
    const run = pattern(256 * KiB, 5);
    const lone = pattern(4 * KiB, 6);
    await rig.lv(3).write(1 * MiB, run);
    await rig.lv(3).write(5 * MiB, lone);
    const expected = Buffer.from(image);
    run.copy(expected, 1 * MiB);
    lone.copy(expected, 5 * MiB);
    // The RO sibling's volume (2) takes the RW role and the increments; the spare becomes the RO copy.
    const home = new WriteLog(rig.volumes.get(2)!.device);
    rig.volumes.set(2, { device: home });
    rig.faults.get(3)!.set({ kind: 'error', ops: ['read'] });
    await rig.lv(3).read(3 * MiB, Buffer.alloc(4 * KiB));
    await rig.group.idle();
    expect(rig.member(3)).toMatchObject({ vol: 2, state: 'split' });
    expect(rig.member(2)).toMatchObject({ vol: 5, state: 'split' });
    expect(home.writes.filter(([from, to]) => from < 2 * MiB && 1 * MiB < to)).toEqual([[1 * MiB, 1 * MiB + 256 * KiB]]);
    expect(home.writes.filter(([from, to]) => from < 6 * MiB && 5 * MiB < to)).toEqual([[5 * MiB, 5 * MiB + 4 * KiB]]);
    expect(rig.volume(2).equals(expected)).toBe(true);
    expect((await rig.read(rig.lv(3))).equals(expected)).toBe(true);
    expect((await rig.read(rig.lv(2))).equals(image)).toBe(true);
  });
});

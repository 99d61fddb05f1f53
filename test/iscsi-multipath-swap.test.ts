// Multipath across a pair swap, as dm-multipath with the ALUA device handler would do it, proved
// with two iSCSI sessions of one initiator: path A to the master storage system's target, path B
// to the mirror's. (The kernel's own dm-multipath, without scsi_dh_alua or multipathd, follows a
// swap in test/iscsi-kernel-multipath-swap.test.ts: docs/iscsi.md.) What a multipath host relies on:
//
//   check                                   before the swap                after `blockmirror pair swap`
//   VPD 0x83 NAA (device identity)          the same on A and B            the same
//   VPD 0x83 target port group              A: 1, B: 2                     A: 1, B: 2
//   REPORT TARGET PORT GROUPS               A active/optimized, B standby  A standby, B active/optimized
//   WRITE                                   A GOOD, B NOT READY 02/04/0B   A 02/04/0B, B GOOD
//   MODE SENSE WP (Linux: read-only disk)   0 on both                      0 on both
//   first command of each path after it     -                              UNIT ATTENTION 2A/06, once
//
// The test's path selector does what scsi_dh_alua and dm-multipath do: send writes to the
// active/optimized path; on 2A/06 recheck the port groups; on 02/04/0B (a path error) fail over.
// Every acknowledged write is then read back through the new master and through the standby path,
// and both volume files hold the same bytes.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { requireTools } from './helpers/clients.js';
import { startIscsiPair, type IscsiPairCluster } from './helpers/iscsi.js';
import { RawInitiator, type ScsiOutcome } from './helpers/iscsi-raw.js';
import { CLI, run, type RunningCluster } from './helpers/servers.js';

const MiB = 1 << 20;
const SIZE = 8 * MiB;
const BLOCKS_PER_WRITE = 8;
const target = (ss: number) => `iqn.2026-12.org.blockmirror:ss${ss}`;
const rw10 = (op: number, lba: number, blocks: number) => Buffer.from([op, 0, lba >>> 24, (lba >> 16) & 255, (lba >> 8) & 255, lba & 255, 0, blocks >> 8, blocks & 255, 0]);
/** MODE SENSE(6)'s WP bit: a standby path must not look write-protected (Linux would make it read-only). */
async function writeProtected(ini: RawInitiator): Promise<boolean> {
  const r = await ini.scsi(1, Buffer.from([0x1a, 0x08, 0x3f, 0, 255, 0]), { readLength: 255 });
  expect(r.status).toBe(0);
  return (r.data[2]! & 0x80) !== 0;
}
const sense = (r: ScsiOutcome) => (r.status === 0 ? 'GOOD' : `${(r.senseKey ?? 0).toString(16)}/${(r.asc ?? 0).toString(16).padStart(4, '0')}`);

/** VPD 0x83 of LUN 1: the NAA designator (hex) and the target port group. */
async function identity(ini: RawInitiator): Promise<{ naa: string; portGroup: number; relativePort: number }> {
  const r = await ini.scsi(1, Buffer.from([0x12, 0x01, 0x83, 0x01, 0x00, 0]), { readLength: 256 });
  expect(r.status).toBe(0);
  const out = { naa: '', portGroup: -1, relativePort: -1 };
  for (let at = 4; at + 4 <= r.data.length; ) {
    const type = r.data[at + 1]! & 0x0f;
    const len = r.data[at + 3]!;
    const id = r.data.subarray(at + 4, at + 4 + len);
    if (type === 3) out.naa = id.toString('hex');
    if (type === 5) out.portGroup = id.readUInt16BE(2);
    if (type === 4) out.relativePort = id.readUInt16BE(2);
    at += 4 + len;
  }
  return out;
}

/**
 * REPORT TARGET PORT GROUPS: [group, state] of each descriptor (0 active/optimized, 2 standby).
 * A unit attention is retried, as scsi_dh_alua's RTPG does; `uas` collects them.
 */
async function portGroups(ini: RawInitiator, uas: string[] = []): Promise<Array<[number, number]>> {
  let r = await ini.scsi(1, Buffer.from([0xa3, 0x0a, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]), { readLength: 256 });
  for (let i = 0; i < 3 && r.senseKey === 0x6; i++) {
    uas.push(sense(r));
    r = await ini.scsi(1, Buffer.from([0xa3, 0x0a, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]), { readLength: 256 });
  }
  expect(r.status, sense(r)).toBe(0);
  const groups: Array<[number, number]> = [];
  for (let at = 4; at + 8 <= 4 + r.data.readUInt32BE(0); at += 8 + 4 * r.data[at + 7]!) groups.push([r.data.readUInt16BE(at + 2), r.data[at]! & 0x0f]);
  return groups;
}

/** dm-multipath with scsi_dh_alua, reduced to what a write needs (see the header). */
class PathSelector {
  active = 0;
  readonly events: string[] = [];
  constructor(readonly paths: Array<{ name: string; ini: RawInitiator }>) {}

  /** Pick the path whose port group is active/optimized (multipathd's prioritizer). */
  async recheck(): Promise<void> {
    for (const [i, p] of this.paths.entries()) {
      const uas: string[] = [];
      const [[, state]] = (await portGroups(p.ini, uas)) as [[number, number]];
      for (const ua of uas) this.events.push(`${p.name} ${ua}`);
      if (state === 0) {
        if (i !== this.active) this.events.push(`switch to ${p.name}`);
        this.active = i;
        return;
      }
    }
    throw new Error('no path is active/optimized');
  }

  async write(lba: number, data: Buffer): Promise<void> {
    for (let attempt = 0; attempt < 100; attempt++) {
      const p = this.paths[this.active]!;
      const r = await p.ini.scsi(1, rw10(0x2a, lba, data.length / 512), { dataOut: data });
      if (r.status === 0) return;
      this.events.push(`${p.name} ${sense(r)}`);
      if (r.senseKey === 0x6) {
        if (r.asc === 0x2a06) await this.recheck(); // ALUA state changed: recheck, retry
        continue;
      }
      if (r.senseKey === 0x2 && r.asc === 0x040b) {
        await this.recheck(); // standby: a path error, fail over
        continue;
      }
      if (r.senseKey === 0x2 && r.asc === 0x040a) {
        // ALUA state transition: scsi_dh_alua retries on the same path (after a pause, as Linux's requeue).
        await new Promise((res) => setTimeout(res, 10));
        continue;
      }
      throw new Error(`write at ${lba} failed on ${p.name}: ${sense(r)}`);
    }
    throw new Error(`write at ${lba} did not complete in 100 attempts: ${this.events.slice(-8).join(', ')}`);
  }
}

describe('multipath across a pair swap (two paths: the master and the mirror storage system)', () => {
  let dir: string;
  let c: RunningCluster;
  let p: IscsiPairCluster['p'];

  beforeAll(async () => {
    requireTools('iscsi-inq');
    ({ dir, c, p } = await startIscsiPair('bm-iscsi-mpath-', '8MiB'));
  }, 60_000);

  afterAll(async () => {
    await c?.stop();
  });

  it('gives both paths one device identity, and libiscsi\'s iscsi-inq reads the same NAA on both', async () => {
    const naa = async (ss: number) => {
      const r = await run('iscsi-inq', ['-e', '1', '-c', '131', `iscsi://127.0.0.1:${p.iscsi[ss - 1]}/${target(ss)}/1`]);
      expect(r.code, r.stderr).toBe(0);
      // iscsi-inq prints each designator as "Designator Type:(3) NAA" then "Designator:[raw bytes]".
      const m = /Designator Type:\(3\) NAA\nDesignator:\[([\s\S]*)\]\s*$/.exec(r.stdout);
      expect(m, r.stdout).not.toBeNull();
      expect(r.stdout).toMatch(/Designator Type:\(5\) TARGET_PORT_GROUP/);
      return m![1]!;
    };
    const [a, b] = [await naa(1), await naa(2)];
    expect(a.length).toBeGreaterThanOrEqual(16);
    expect(a).toBe(b);
  });

  it('keeps writes going across `blockmirror pair swap`: ALUA flips, the old master answers 02/04/0B, and every acknowledged write is on both volume files', async () => {
    const A = await RawInitiator.connect(p.iscsi[0]!);
    const B = await RawInitiator.connect(p.iscsi[1]!);
    const acked = new Map<number, Buffer>();
    try {
      await A.login(target(1));
      await B.login(target(2));
      for (const ini of [A, B]) expect(await ini.clearUnitAttentions(1)).toEqual(['6/2900']);

      const [ia, ib] = [await identity(A), await identity(B)];
      expect(ia.naa).toMatch(/^6[0-9a-f]{31}$/);
      expect(ib.naa).toBe(ia.naa);
      expect([ia.portGroup, ib.portGroup, ia.relativePort, ib.relativePort]).toEqual([1, 2, 1, 2]);
      expect(await portGroups(A)).toEqual([[1, 0]]);
      expect(await portGroups(B)).toEqual([[2, 2]]);
      expect(sense(await B.scsi(1, rw10(0x2a, 0, 1), { dataOut: Buffer.alloc(512) }))).toBe('2/040b');
      expect([await writeProtected(A), await writeProtected(B)]).toEqual([false, false]);

      const mp = new PathSelector([{ name: 'A', ini: A }, { name: 'B', ini: B }]);
      await mp.recheck();
      let seq = 0;
      const writeOne = async () => {
        const lba = (seq * 37 % (SIZE / 512 / BLOCKS_PER_WRITE)) * BLOCKS_PER_WRITE;
        const data = crypto.randomBytes(BLOCKS_PER_WRITE * 512);
        seq++;
        await mp.write(lba, data);
        acked.set(lba, data);
      };
      for (let i = 0; i < 50; i++) await writeOne();
      expect(mp.active).toBe(0);

      // The swap runs while the writes go on; then more writes, all through whatever path is active.
      let swapped = false;
      const swap = run(process.execPath, [CLI, 'pair', 'swap', 'px', '-c', path.join(dir, 'cluster.yaml')]).then((r) => ((swapped = true), r));
      while (!swapped) await writeOne();
      const s = await swap;
      expect(s.code, s.stderr).toBe(0);
      for (let i = 0; i < 50; i++) await writeOne();

      console.log(`path events: ${mp.events.join(", ")}; ${acked.size} writes acknowledged`);
      expect(mp.active).toBe(1);
      expect(mp.events).toContain('A 6/2a06'); // the old master told its path once...
      expect(mp.events).toContain('switch to B'); // ...the selector failed over...
      expect(mp.events.filter((e) => e === 'A 6/2a06')).toHaveLength(1);
      expect(mp.events.filter((e) => e.startsWith('B ')).every((e) => e === 'B 6/2a06')).toBe(true); // ...and B said only that it changed
      expect(await portGroups(A)).toEqual([[1, 2]]);
      expect(await portGroups(B)).toEqual([[2, 0]]);
      expect(sense(await A.scsi(1, rw10(0x2a, 0, 1), { dataOut: Buffer.alloc(512) }))).toBe('2/040b');
      expect([await writeProtected(A), await writeProtected(B)]).toEqual([false, false]);
      expect((await identity(A)).naa).toBe(ia.naa);

      // Every acknowledged write, read through the new master (B) and through the standby path (A).
      for (const [lba, data] of acked) {
        for (const [name, ini] of [['B', B], ['A', A]] as const) {
          const r = await ini.scsi(1, rw10(0x28, lba, BLOCKS_PER_WRITE), { readLength: data.length });
          expect(r.status, `${name} READ ${lba}`).toBe(0);
          expect(r.data.equals(data), `${name} READ ${lba}`).toBe(true);
        }
      }
    } finally {
      A.close();
      B.close();
    }
    await c.stop();
    const one = fs.readFileSync(path.join(dir, 'ss1', 'vol1.img'));
    const two = fs.readFileSync(path.join(dir, 'ss2', 'vol1.img'));
    expect(one.length).toBe(SIZE);
    expect(one.equals(two)).toBe(true);
    for (const [lba, data] of acked) expect(one.subarray(lba * 512, lba * 512 + data.length).equals(data), `LBA ${lba}`).toBe(true);
  }, 120_000);
});

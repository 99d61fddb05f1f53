// Never stale through iSCSI's description of data (issue 11, part 1): GET LBA STATUS on the LUN of
// an async mirror whose sync daemon is behind never calls a cluster the master wrote
// "deallocated", and qemu's libiscsi driver, which skips what GET LBA STATUS calls deallocated,
// copies the mirror's LUN equal to the master's.
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { adminFetch } from './helpers/admin.js';
import { pseudoRandom, requireTools } from './helpers/clients.js';
import { startIscsiPair, type IscsiPairCluster } from './helpers/iscsi.js';
import { RawInitiator } from './helpers/iscsi-raw.js';
import { run } from './helpers/servers.js';

const MiB = 1024 * 1024;
const url = (p: IscsiPairCluster, i: number) => `iscsi://127.0.0.1:${p.p.iscsi[i]}/iqn.2026-12.org.blockmirror:ss${i + 1}/1`;

describe('GET LBA STATUS on the LUN of a mirror that is behind', () => {
  let c: IscsiPairCluster;
  beforeAll(async () => {
    requireTools('qemu-io', 'qemu-img');
    // The daemon copies 256 KiB/s: the mirror stays behind for the whole test.
    c = await startIscsiPair('bm-iscsi-lbas-', '32MiB', { mode: 'async', syncRate: '256KiB' });
  }, 60_000);
  afterAll(async () => {
    await c?.c.stop();
  });

  it('reports every block the master wrote as mapped, and a sparse-aware copy of the mirror equals the master', async () => {
    const file = path.join(c.dir, 'w.bin');
    fs.writeFileSync(file, pseudoRandom(6 * MiB, 21));
    const w = await run('qemu-io', ['-f', 'raw', '-c', `write -s ${file} ${4 * MiB} ${6 * MiB}`, url(c, 0)]);
    expect(w.code, w.stderr + w.stdout).toBe(0);
    const pair = (await (await adminFetch(`http://127.0.0.1:${c.p.admin[0]}/api/pairs/px`)).json()) as { mirrors: Array<{ invalidClusters: number }> };
    expect(pair.mirrors[0]!.invalidClusters).toBeGreaterThan(0); // the mirror is behind: the test means something

    const ini = await RawInitiator.connect(c.p.iscsi[1]!);
    try {
      await ini.login('iqn.2026-12.org.blockmirror:ss2');
      await ini.clearUnitAttentions(1);
      // From LBA 0, 64 descriptors at most; the volume has data only where the master wrote.
      const cdb = Buffer.alloc(16);
      cdb[0] = 0x9e;
      cdb[1] = 0x12;
      cdb.writeUInt32BE(8 + 64 * 16, 10);
      const r = await ini.scsi(1, cdb, { readLength: 8 + 64 * 16 });
      expect(r.status).toBe(0);
      const descs = [];
      for (let o = 8; o + 16 <= r.data.length; o += 16) {
        descs.push({ start: Number(r.data.readBigUInt64BE(o)) * 512, length: r.data.readUInt32BE(o + 8) * 512, deallocated: (r.data[o + 12]! & 0x0f) === 1 });
      }
      expect(descs.length).toBeGreaterThan(0);
      const overlapping = descs.filter((d) => d.deallocated && d.start < 10 * MiB && d.start + d.length > 4 * MiB);
      expect(overlapping, 'a block the master wrote is reported deallocated on the mirror').toEqual([]);
    } finally {
      ini.close();
    }

    const master = path.join(c.dir, 'master.img');
    const mirror = path.join(c.dir, 'mirror.img');
    for (const [i, out] of [[0, master], [1, mirror]] as const) {
      const q = await run('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', url(c, i), out]);
      expect(q.code, q.stderr).toBe(0);
    }
    expect(fs.readFileSync(mirror).equals(fs.readFileSync(master)), 'qemu-img convert of the mirror LUN equals the master').toBe(true);
  });
});

// `blockmirror up` with `iscsi:` on a storage system: one target per storage system, each volume a
// LUN, a pair's mirror read-only over iSCSI as over NBD (ALUA standby: writes end in NOT READY
// 04/0B, the sense multipath fails over on), and both protocols seeing the same data.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import fs from 'node:fs';
import path from 'node:path';
import { requireTools } from './helpers/clients.js';
import { startIscsiPair, type IscsiPairCluster } from './helpers/iscsi.js';
import { RawInitiator } from './helpers/iscsi-raw.js';
import { CLI, freePort, run, startUp, tmpDir, type RunningCluster } from './helpers/servers.js';
import { adminFetch } from './helpers/admin.js';
import { connect } from '../src/nbd/client.js';
import { SSProcess, inSync, loopbackAddrs, qemuIo, type SSAddr } from './helpers/remote.js';

describe('a storage system with iscsi: in its YAML', () => {
  let dir: string;
  let c: RunningCluster;
  let iscsi: number;
  let nbd: number;
  let admin: number;
  const target = 'iqn.2026-12.org.blockmirror:ss1';

  beforeAll(async () => {
    requireTools('iscsi-ls', 'qemu-io', 'iscsi-inq');
    dir = tmpDir('bm-iscsi-ss-');
    [iscsi, nbd] = [await freePort(), await freePort()];
    admin = await freePort();
    fs.writeFileSync(
      path.join(dir, 'cluster.yaml'),
      `storageSystems:
  - id: 1
    nbd: 127.0.0.1:${nbd}
    admin: 127.0.0.1:${admin}
    iscsi: 127.0.0.1:${iscsi}
    volumes:
      - { id: 1, size: 16MiB }
      - { id: 2, size: 16MiB }
      - { id: 3, size: 8MiB, iscsiTarget: "iqn.2026-12.org.blockmirror:own" }
pairs:
  - { name: p1, mode: sync, master: { ss: 1, vol: 1 }, mirrors: [{ ss: 1, vol: 2 }] }
`,
    );
    c = await startUp(path.join(dir, 'cluster.yaml'), [nbd, admin, iscsi]);
  });

  afterAll(async () => {
    await c?.stop();
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  it('discovers the storage system target and the per-volume target', async () => {
    const r = await run('iscsi-ls', ['-s', `iscsi://127.0.0.1:${iscsi}`]);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toContain(`Target:${target} Portal:127.0.0.1:${iscsi},1`);
    expect(r.stdout).toContain('Target:iqn.2026-12.org.blockmirror:own');
    expect(r.stdout).toMatch(/Lun:1\s+Type:DIRECT_ACCESS/);
    expect(r.stdout).toMatch(/Lun:2\s+Type:DIRECT_ACCESS/);
  });

  it('writes to the master LUN reach the mirror LUN and NBD, and the mirror LUN refuses writes (standby)', async () => {
    const w = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x3c 64k 128k', '-c', 'flush', `iscsi://127.0.0.1:${iscsi}/${target}/1`]);
    expect(w.code, w.stderr).toBe(0);
    const m = await run('qemu-io', ['-f', 'raw', '-r', '-c', 'read -P 0x3c 64k 128k', `iscsi://127.0.0.1:${iscsi}/${target}/2`]);
    expect(m.code, m.stderr).toBe(0);
    expect(m.stdout + m.stderr).not.toMatch(/verification failed/);
    const n = await run('qemu-io', ['-f', 'raw', '-r', '-c', 'read -P 0x3c 64k 128k', `nbd://127.0.0.1:${nbd}/vol2`]);
    expect(n.code, n.stderr).toBe(0);
    expect(n.stdout + n.stderr).not.toMatch(/verification failed/);
    const bad = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x11 0 4k', `iscsi://127.0.0.1:${iscsi}/${target}/2`]);
    expect(bad.stdout + bad.stderr).toMatch(/write failed|Permission denied|read-only|protect/i);
  });

  it('lists the logged-in sessions in status, the CLI and the metrics, with their I/O, and forgets them at logout', async () => {
    const ini = await RawInitiator.connect(iscsi);
    try {
      await ini.login(target);
      expect(await ini.clearUnitAttentions(1)).toEqual(['6/2900']); // a new I_T nexus: POWER ON OR RESET
      // READ(10) of one block of LUN 1.
      const read = await ini.scsi(1, Buffer.from([0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0]), { readLength: 512 });
      expect(read.status).toBe(0);
      const st = (await (await adminFetch(`http://127.0.0.1:${admin}/api/status`)).json()) as { storageSystems: { iscsi?: { address: string; sessions: { initiator: string; target: string; luns: number[]; commands: number; readBytes: number }[] } }[] };
      const t = st.storageSystems[0]!.iscsi!;
      expect(t.address).toBe(`127.0.0.1:${iscsi}`);
      expect(t.sessions).toEqual([expect.objectContaining({ initiator: 'iqn.2026-12.test:raw', target, luns: [1, 2] })]);
      expect(t.sessions[0]!.commands).toBeGreaterThanOrEqual(1);
      expect(t.sessions[0]!.readBytes).toBe(512);
      const cli = await run(process.execPath, [CLI, 'status', '-c', path.join(dir, 'cluster.yaml')]);
      expect(cli.stdout).toMatch(/ISCSI SESSIONS\n.*INITIATOR.*\n\s+1\s+iqn\.2026-12\.test:raw\s+127\.0\.0\.1\s+iqn\.2026-12\.org\.blockmirror:ss1\s+1\s+1,2\s+\d+\s+512B/);
      const metrics = await (await adminFetch(`http://127.0.0.1:${admin}/metrics`)).text();
      expect(metrics).toContain('blockmirror_frontend_sessions{ss="1",protocol="iscsi"} 1');
      expect(JSON.stringify(st)).not.toMatch(/secret/i);
    } finally {
      ini.sock.destroy();
    }
    for (let i = 0; i < 100; i++) {
      const st = (await (await adminFetch(`http://127.0.0.1:${admin}/api/status`)).json()) as { storageSystems: { iscsi?: { sessions: unknown[] } }[] };
      if (st.storageSystems[0]!.iscsi!.sessions.length === 0) return;
      await new Promise((r) => setTimeout(r, 50));
    }
    throw new Error('the session was still listed after the initiator went away');
  });

  it('counts each volume\'s host I/O under protocol="nbd" or protocol="iscsi" in /metrics, by where it came from', async () => {
    const series = (m: string, name: string, protocol: string) => {
      const key = `${name}{ss="1",vol="3",protocol="${protocol}"} `;
      const line = m.split('\n').find((l) => l.startsWith(key));
      if (line === undefined) throw new Error(`no ${key}in /metrics`);
      return Number(line.slice(key.length));
    };
    const scrape = async () => (await adminFetch(`http://127.0.0.1:${admin}/metrics`)).text();
    const names = ['blockmirror_volume_write_ops_total', 'blockmirror_volume_write_bytes_total', 'blockmirror_volume_read_ops_total', 'blockmirror_volume_read_bytes_total', 'blockmirror_volume_write_latency_seconds_count'];
    const delta = (a: string, b: string, protocol: string) => names.map((n) => series(b, n, protocol) - series(a, n, protocol));
    const before = await scrape();

    // Over iSCSI (LUN 0 of the volume's own target): two WRITE(10) of 8 and 4 blocks, one READ(10) of 2.
    const ini = await RawInitiator.connect(iscsi);
    try {
      await ini.login('iqn.2026-12.org.blockmirror:own');
      expect(await ini.clearUnitAttentions(0)).toEqual(['6/2900']);
      for (const [lba, blocks] of [[0, 8], [64, 4]] as const) {
        const w = await ini.scsi(0, Buffer.from([0x2a, 0, 0, 0, 0, lba, 0, 0, blocks, 0]), { dataOut: Buffer.alloc(blocks * 512, 0x5a) });
        expect(w.status).toBe(0);
      }
      const r = await ini.scsi(0, Buffer.from([0x28, 0, 0, 0, 0, 0, 0, 0, 2, 0]), { readLength: 1024 });
      expect(r.status).toBe(0);
      expect(r.data.equals(Buffer.alloc(1024, 0x5a))).toBe(true);
    } finally {
      ini.close();
    }
    // Over NBD: one 64 KiB write and three 4 KiB reads, which see the iSCSI writes.
    const nbdClient = await connect(`nbd://127.0.0.1:${nbd}/vol3`);
    try {
      await nbdClient.pwrite(Buffer.alloc(65536, 0xa5), 1 << 20);
      for (let i = 0; i < 3; i++) expect((await nbdClient.pread(4096, 0)).subarray(0, 4096).equals(Buffer.alloc(4096, 0x5a))).toBe(true);
    } finally {
      await nbdClient.close();
    }

    const after = await scrape();
    expect(delta(before, after, 'iscsi')).toEqual([2, 12 * 512, 1, 1024, 2]);
    expect(delta(before, after, 'nbd')).toEqual([1, 65536, 3, 3 * 4096, 1]);
    // The status totals are the sum of both protocols.
    const st = (await (await adminFetch(`http://127.0.0.1:${admin}/api/status`)).json()) as { storageSystems: { volumes: { id: number; writeOps: number; readOps: number }[] }[] };
    const vol3 = st.storageSystems[0]!.volumes.find((v) => v.id === 3)!;
    expect(vol3.writeOps).toBe(series(after, 'blockmirror_volume_write_ops_total', 'nbd') + series(after, 'blockmirror_volume_write_ops_total', 'iscsi'));
    expect(vol3.readOps).toBe(series(after, 'blockmirror_volume_read_ops_total', 'nbd') + series(after, 'blockmirror_volume_read_ops_total', 'iscsi'));
  });

  it('tells every session of a LUN about a target reset (29/03), and about a split and a resync that make the mirror LUN writable and read-only again (2A/06), on its next command', async () => {
    const [a, b] = [await RawInitiator.connect(iscsi), await RawInitiator.connect(iscsi)];
    const TUR = Buffer.from([0, 0, 0, 0, 0, 0]);
    const write = (ini: RawInitiator, lun: number) => ini.scsi(lun, Buffer.from([0x2a, 0, 0, 0, 0x10, 0, 0, 0, 1, 0]), { dataOut: Buffer.alloc(512, lun) });
    const rtpgState = async (ini: RawInitiator, lun: number) => (await ini.scsi(lun, Buffer.from([0xa3, 0x0a, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]), { readLength: 256 })).data[4]! & 0x0f;
    const ua = (r: { status: number; senseKey?: number; asc?: number }) => [r.status, r.senseKey, r.asc];
    try {
      for (const ini of [a, b]) await ini.login(target);
      // Each new session hears of the power on once per LUN, then nothing.
      for (const ini of [a, b]) for (const lun of [1, 2]) expect(await ini.clearUnitAttentions(lun)).toEqual(['6/2900']);

      expect(await a.tmf(6)).toBe(0); // TARGET WARM RESET: function complete
      for (const ini of [a, b]) {
        for (const lun of [1, 2]) {
          expect(ua(await ini.scsi(lun, TUR))).toEqual([2, 0x6, 0x2903]);
          expect((await ini.scsi(lun, TUR)).status).toBe(0);
        }
      }
      expect([await rtpgState(a, 1), await rtpgState(a, 2)]).toEqual([0, 2]); // active/optimized, standby

      expect(ua(await write(a, 2))).toEqual([2, 0x2, 0x040b]); // the mirror: NOT READY, TARGET PORT IN STANDBY STATE
      const command = async (c: string) => {
        const r = await adminFetch(`http://127.0.0.1:${admin}/api/pairs/p1/${c}`, { method: 'POST' });
        expect(r.status, await r.text()).toBe(200);
      };
      await command('split');
      // Each session hears of the mirror's new role once, whatever its next command is; the master LUN did not change.
      expect(ua(await write(a, 2))).toEqual([2, 0x6, 0x2a06]);
      expect((await write(a, 2)).status).toBe(0);
      expect((await write(a, 1)).status).toBe(0);
      expect(ua(await b.scsi(2, TUR))).toEqual([2, 0x6, 0x2a06]);
      expect([await rtpgState(b, 1), await rtpgState(b, 2)]).toEqual([0, 0]);

      await command('resync');
      for (const ini of [b, a]) expect(ua(await write(ini, 2))).toEqual([2, 0x6, 0x2a06]);
      expect(ua(await write(a, 2))).toEqual([2, 0x2, 0x040b]);
      expect([await rtpgState(b, 1), await rtpgState(b, 2)]).toEqual([0, 2]);
    } finally {
      a.close();
      b.close();
    }
  });
});

describe('a pair across two storage systems, both with iscsi:', () => {
  let dir: string;
  let c: RunningCluster;
  let p: IscsiPairCluster['p'];
  const target = (ss: number) => `iqn.2026-12.org.blockmirror:ss${ss}`;

  beforeAll(async () => {
    // The pair is in PAIR before anyone logs in, so the mirror is standby from the first command.
    ({ dir, c, p } = await startIscsiPair('bm-iscsi-swap-', '8MiB'));
  }, 60_000);

  afterAll(async () => {
    await c?.stop();
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  it('after a swap, each LUN\'s session hears of its new role (2A/06); the new master\'s LUN takes writes that the old one, now standby, refuses and reads', async () => {
    const [one, two] = [await RawInitiator.connect(p.iscsi[0]!), await RawInitiator.connect(p.iscsi[1]!)];
    const write = (ini: RawInitiator, fill: number) => ini.scsi(1, Buffer.from([0x2a, 0, 0, 0, 0x20, 0, 0, 0, 1, 0]), { dataOut: Buffer.alloc(512, fill) });
    const read = async (ini: RawInitiator) => (await ini.scsi(1, Buffer.from([0x28, 0, 0, 0, 0x20, 0, 0, 0, 1, 0]), { readLength: 512 })).data;
    const ua = (r: { status: number; senseKey?: number; asc?: number }) => [r.status, r.senseKey, r.asc];
    try {
      await one.login(target(1));
      await two.login(target(2));
      for (const ini of [one, two]) expect(await ini.clearUnitAttentions(1)).toEqual(['6/2900']);
      expect((await write(one, 0x11)).status).toBe(0);
      expect(ua(await write(two, 0x22))).toEqual([2, 0x2, 0x040b]); // standby

      const swap = await adminFetch(`http://127.0.0.1:${p.admin[0]}/api/pairs/px/swap`, { method: 'POST' });
      expect(swap.status, await swap.text()).toBe(200);
      expect(ua(await write(two, 0x33))).toEqual([2, 0x6, 0x2a06]);
      expect((await write(two, 0x33)).status).toBe(0);
      expect(ua(await write(one, 0x44))).toEqual([2, 0x6, 0x2a06]);
      expect(ua(await write(one, 0x44))).toEqual([2, 0x2, 0x040b]);
      expect((await read(one)).equals(Buffer.alloc(512, 0x33))).toBe(true);
    } finally {
      one.close();
      two.close();
    }
  });
});

describe('a pair across two storage systems in two processes, both with iscsi:', () => {
  it('after kill -9 of the master and a takeover, the survivor\'s LUN hears of its new role (2A/06), holds every acknowledged write and takes new ones', async () => {
    const dir = tmpDir('bm-iscsi-takeover-');
    const [a, b] = await loopbackAddrs();
    const iscsi = [await freePort(), await freePort()];
    const ss = (i: number, x: SSAddr) => `  - id: ${i + 1}
    nbd: 127.0.0.1:${x.nbd}
    admin: 127.0.0.1:${x.admin}
    peer: 127.0.0.1:${x.peer}
    iscsi: 127.0.0.1:${iscsi[i]}
    dataDir: ss${i + 1}
    volumes:
      - { id: 1, size: 8MiB }`;
    const file = path.join(dir, 'cluster.yaml');
    fs.writeFileSync(file, `peerTimeout: 1s\nstorageSystems:\n${ss(0, a)}\n${ss(1, b)}\npairs:\n  - { name: px, mode: sync, master: { ss: 1, vol: 1 }, mirrors: [{ ss: 2, vol: 1 }] }\n`);
    const ss1 = new SSProcess(1, file, a);
    const ss2 = new SSProcess(2, file, b);
    const survivor = await (async () => {
      await Promise.all([ss1.start(), ss2.start()]);
      await ss1.waitPair('px', inSync, 'in sync');
      return RawInitiator.connect(iscsi[1]!);
    })();
    const write = (fill: number) => survivor.scsi(1, Buffer.from([0x2a, 0, 0, 0, 0, 0x40, 0, 0, 1, 0]), { dataOut: Buffer.alloc(512, fill) });
    const read = async (lba: number) => (await survivor.scsi(1, Buffer.from([0x28, 0, 0, 0, lba >> 8, lba & 0xff, 0, 0, 1, 0]), { readLength: 512 })).data;
    const sense = (r: { status: number; senseKey?: number; asc?: number }) => [r.status, r.senseKey, r.asc];
    try {
      await survivor.login('iqn.2026-12.org.blockmirror:ss2');
      expect(await survivor.clearUnitAttentions(1)).toEqual(['6/2900']);
      // A sync write acknowledged by the master (LBA 0x20), then the master dies.
      expect((await qemuIo(ss1.uri(1), ['write -P 0x5a 16k 512'])).code).toBe(0);
      expect(sense(await write(0x11))).toEqual([2, 0x2, 0x040b]); // the mirror's LUN: standby
      await ss1.kill();
      await ss2.waitPair('px', (p) => p.stale === true, 'stale');
      const t = await run(process.execPath, [CLI, 'pair', 'takeover', 'px', '-c', file]);
      expect(t.code, t.stderr).toBe(0);
      await ss2.waitPair('px', (p) => p.role === 'master' && p.epoch === 2, 'the master role');
      expect(sense(await write(0x22))).toEqual([2, 0x6, 0x2a06]); // told once: the LUN is writable now
      expect((await write(0x22)).status).toBe(0);
      expect((await read(0x40)).equals(Buffer.alloc(512, 0x22))).toBe(true);
      expect((await read(0x20)).equals(Buffer.alloc(512, 0x5a))).toBe(true);
    } finally {
      survivor.close();
      await Promise.all([ss1.kill(), ss2.kill()]);
    }
    // The survivor's volume file holds both writes, byte for byte what the LUN returned.
    const img = fs.readFileSync(ss2.volumeFile(dir, 1));
    expect(img.subarray(0x20 * 512, 0x21 * 512).equals(Buffer.alloc(512, 0x5a))).toBe(true);
    expect(img.subarray(0x40 * 512, 0x41 * 512).equals(Buffer.alloc(512, 0x22))).toBe(true);
    fs.rmSync(dir, { recursive: true, force: true });
  });
});

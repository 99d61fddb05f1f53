// `blockmirror up` with `iscsi:` on a storage system: one target per storage system, each volume a
// LUN, a pair's mirror write protected over iSCSI exactly as over NBD, and both protocols seeing
// the same data.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import fs from 'node:fs';
import path from 'node:path';
import { requireTools } from './helpers/clients.js';
import { RawInitiator } from './helpers/iscsi-raw.js';
import { CLI, freePort, run, startUp, tmpDir, type RunningCluster } from './helpers/servers.js';
import { adminFetch } from './helpers/admin.js';

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

  it('writes to the master LUN reach the mirror LUN and NBD, and the mirror LUN refuses writes as write protected', async () => {
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
});

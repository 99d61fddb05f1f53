// `blockmirror up` with `iscsi:` on a storage system: one target per storage system, each volume a
// LUN, a pair's mirror write protected over iSCSI exactly as over NBD, and both protocols seeing
// the same data.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import fs from 'node:fs';
import path from 'node:path';
import { requireTools } from './helpers/clients.js';
import { freePort, run, startUp, tmpDir, type RunningCluster } from './helpers/servers.js';

describe('a storage system with iscsi: in its YAML', () => {
  let dir: string;
  let c: RunningCluster;
  let iscsi: number;
  let nbd: number;
  const target = 'iqn.2026-12.org.blockmirror:ss1';

  beforeAll(async () => {
    requireTools('iscsi-ls', 'qemu-io', 'iscsi-inq');
    dir = tmpDir('bm-iscsi-ss-');
    [iscsi, nbd] = [await freePort(), await freePort()];
    const admin = await freePort();
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
  }, 60_000);

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
});

// The Linux kernel's NBD client in a VM (test/vm/nbd-client-vm.sh) against `blockmirror up` with
// cache memory, on the master of a sync pair of memory volumes and of one of file volumes (the
// latter over two connections): mkfs.ext4, mount, write 32 MiB, e2fsck, re-attach and reread. The
// kernel writes a file in requests of at most 1.25 MiB (its max_sectors_kb), one after another:
// sequential streams. With `bypass: 4MiB` no single request is that large, so what goes past the
// cache here went as part of a stream that had written 4 MiB (cache/memory.ts, rule 5), while the
// filesystem's small metadata writes are staged in it. Afterwards the host checks each pair:
// the master and the mirror equal byte for byte, e2fsck clean, and the guest's file intact.
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { cacheStatus, cachedSyncPairsYaml } from './helpers/admin.js';
import { Cleanup, describeRun, requireTools, runOk } from './helpers/clients.js';
import { ROOT, freePort, run, startUp, type CmdResult, type RunningCluster } from './helpers/servers.js';
import { guestSha256, hostCheck, vmLines } from './helpers/vm.js';

const HARNESS = path.join(ROOT, 'test/vm/nbd-client-vm.sh');
const MiB = 1024 * 1024;
/** Guest boot plus two filesystems under TCG, with room for a first-time kernel download. */
const VM_TIMEOUT_S = 300;

const cleanup = new Cleanup();
let up: RunningCluster;
let dir: string;
let ports: { nbd1: number; admin1: number; nbd2: number; admin2: number };
let vm: CmdResult;
const bypassedBefore: number[] = [];

beforeAll(async () => {
  requireTools('qemu-system-x86_64', 'busybox', 'nbd-client', 'mkfs.ext4', 'e2fsck', 'debugfs', 'nbdcopy');
  fs.accessSync(HARNESS, fs.constants.X_OK);
  dir = cleanup.dir('bm-vm-cache-');
  ports = { nbd1: await freePort(), admin1: await freePort(), nbd2: await freePort(), admin2: await freePort() };
  const file = path.join(dir, 'cluster.yaml');
  // The guest reaches the host's loopback as 10.0.2.2, so the storage systems listen on 127.0.0.1.
  fs.writeFileSync(file, cachedSyncPairsYaml(ports, '{ size: 16MiB, bypass: 4MiB }', '128MiB'));
  up = await startUp(file, [ports.nbd1, ports.admin1, ports.nbd2, ports.admin2]);
  for (const admin of [ports.admin1, ports.admin2]) bypassedBefore.push((await cacheStatus(admin)).bypassedBytes);
  vm = await run('bash', [HARNESS, '--timeout', String(VM_TIMEOUT_S), `memory:${ports.nbd1}:vol5`, `file:${ports.nbd2}:vol5:2`], {
    timeoutMs: (VM_TIMEOUT_S + 60) * 1000,
  });
}, (VM_TIMEOUT_S + 90) * 1000);

afterAll(async () => {
  await up?.stop();
  await cleanup.run();
});

const linesFor = (label: string): string[] => vmLines(vm.stdout, label);

describe('the Linux kernel NBD client on sync pairs with cache memory', () => {
  it('formats, fills, checks and rereads both masters', () => {
    expect(vm.code, describeRun('test/vm/nbd-client-vm.sh', vm)).toBe(0);
    for (const label of ['memory', 'file']) {
      const lines = linesFor(label);
      for (const step of ['mkfs.ext4 ok', 'mount ok', 'wrote 32 MiB', 'e2fsck clean', 'reread ok', 'PASS']) {
        expect(lines, describeRun('test/vm/nbd-client-vm.sh', vm)).toContain(step);
      }
    }
  });

  it('sent the file\'s data past the caches, on each master and its mirror', async () => {
    expect(vm.code, describeRun('test/vm/nbd-client-vm.sh', vm)).toBe(0);
    for (const [i, admin] of [ports.admin1, ports.admin2].entries()) {
      const c = await cacheStatus(admin);
      // 32 MiB on the master and 32 on the mirror; a stream's first 4 MiB, and the metadata, are staged.
      expect(c.bypassedBytes - bypassedBefore[i]!, `storage system ${i + 1}`).toBeGreaterThanOrEqual(32 * MiB);
    }
  });

  for (const [label, ss] of [
    ['memory', 1],
    ['file', 2],
  ] as const) {
    it(`left the ${label} pair's master and mirror equal, a clean ext4 with the guest's file on them`, async () => {
      expect(vm.code, describeRun('test/vm/nbd-client-vm.sh', vm)).toBe(0);
      const nbd = ss === 1 ? ports.nbd1 : ports.nbd2;
      const images = [];
      for (const vol of [5, 6]) {
        const image = path.join(dir, `ss${ss}-vol${vol}.img`);
        await runOk('nbdcopy', [`nbd://127.0.0.1:${nbd}/vol${vol}`, image]);
        images.push(image);
      }
      const [master, mirror] = images.map((f) => fs.readFileSync(f));
      expect(master!.length).toBe(128 * MiB);
      expect(master!.equals(mirror!)).toBe(true);
      const { fsck, sha256 } = await hostCheck(images[0]!, dir);
      expect(fsck.code, describeRun('e2fsck -fn', fsck)).toBe(0);
      const sha = guestSha256(vm.stdout, label);
      expect(sha).toMatch(/^[0-9a-f]{64}$/);
      expect(sha256).toBe(sha);
    });
  }
});

// The Linux kernel's NBD client (nbd.ko + nbd-client) against `blockmirror
// serve`, inside a small VM (test/vm/nbd-client-vm.sh): attach, mkfs.ext4,
// mount, write 32 MiB, umount, e2fsck, re-attach and reread, for a memory
// export and a --file export in one boot. Afterwards the host checks the
// exported bytes itself: e2fsck on the image and the file's sha256 against the
// one the guest computed.
//
// The kernel speaks only simple replies and needs FLUSH/FUA/TRIM; it is the
// client most unlike the libnbd and qemu ones (nbd.md §2). Slow: the VM runs
// under software emulation, 1-2 minutes on a busy 2-core machine.
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ROOT, run, startServe, type CmdResult, type RunningServer } from './helpers/servers.js';
import { Cleanup, describeRun, requireTools, runOk } from './helpers/clients.js';
import { guestSha256 as guestSha256Of, hostCheck, vmLines } from './helpers/vm.js';

const HARNESS = path.join(ROOT, 'test/vm/nbd-client-vm.sh');
const MiB = 1024 * 1024;
const EXPORT_SIZE = 128 * MiB;
/** Guest boot plus two filesystems under TCG, with room for a first-time kernel download. */
const VM_TIMEOUT_S = 300;

const cleanup = new Cleanup();
let memory: RunningServer;
let file: RunningServer;
let backing: string;
let vm: CmdResult;

const linesFor = (label: string): string[] => vmLines(vm.stdout, label);
const guestSha256 = (label: string): string => guestSha256Of(vm.stdout, label);

beforeAll(async () => {
  requireTools('qemu-system-x86_64', 'busybox', 'nbd-client', 'mkfs.ext4', 'e2fsck', 'debugfs', 'nbdcopy');
  fs.accessSync(HARNESS, fs.constants.X_OK);

  // The guest reaches the host's loopback as 10.0.2.2, so both servers listen on 127.0.0.1.
  backing = path.join(cleanup.dir('bm-vm-'), 'disk.img');
  memory = cleanup.server(await startServe(['--size', String(EXPORT_SIZE)]));
  file = cleanup.server(await startServe(['--size', String(EXPORT_SIZE), '--file', backing]));
  expect(memory.host).toBe('127.0.0.1');

  vm = await run(
    'bash',
    // The file export gets two sockets: the kernel then spreads requests over both, which is
    // safe only because serve advertises CAN_MULTI_CONN.
    [HARNESS, '--timeout', String(VM_TIMEOUT_S), `memory:${memory.port}:disk`, `file:${file.port}:disk:2`],
    { timeoutMs: (VM_TIMEOUT_S + 60) * 1000 },
  );
}, (VM_TIMEOUT_S + 90) * 1000);

afterAll(() => cleanup.run());

describe('the Linux kernel NBD client in a VM', () => {
  it('boots and reports on both exports', () => {
    // Exit 2 is a setup failure of the harness (missing tool, no kernel): say so plainly.
    expect(vm.code, describeRun('test/vm/nbd-client-vm.sh', vm)).toBe(0);
    expect(vm.stdout).toContain('VMTEST: memory: PASS');
    expect(vm.stdout).toContain('VMTEST: file: PASS');
  });

  for (const label of ['memory', 'file'] as const) {
    const how = label === 'memory' ? '/dev/nbd0' : '/dev/nbd1 over two connections';
    it(`formats, fills, checks and rereads the ${label} export through ${how}`, () => {
      const lines = linesFor(label);
      const context = describeRun('test/vm/nbd-client-vm.sh', vm);
      const [dev, conns] = label === 'memory' ? [0, 1] : [1, 2];
      expect(lines, context).toContain(`attached /dev/nbd${dev}, ${EXPORT_SIZE / 512} sectors, ${conns} connection(s)`);
      for (const step of ['mkfs.ext4 ok', 'mount ok', 'wrote 32 MiB', 'e2fsck clean', 'reread ok', 'PASS']) {
        expect(lines, context).toContain(step);
      }
      expect(guestSha256(label)).toMatch(/^[0-9a-f]{64}$/);
    });
  }

  it('left a clean ext4 image with the guest file in the --file export backing file', async () => {
    expect(vm.code, describeRun('test/vm/nbd-client-vm.sh', vm)).toBe(0);
    const { fsck, sha256 } = await hostCheck(backing, cleanup.dir());
    expect(fsck.code, describeRun('e2fsck -fn', fsck)).toBe(0);
    expect(sha256).toBe(guestSha256('file'));
  });

  it('left a clean ext4 image with the guest file in the memory export', async () => {
    expect(vm.code, describeRun('test/vm/nbd-client-vm.sh', vm)).toBe(0);
    const dir = cleanup.dir();
    const image = path.join(dir, 'memory.img');
    await runOk('nbdcopy', [memory.uri, image]);
    expect(fs.statSync(image).size).toBe(EXPORT_SIZE);
    const { fsck, sha256 } = await hostCheck(image, dir);
    expect(fsck.code, describeRun('e2fsck -fn', fsck)).toBe(0);
    expect(sha256).toBe(guestSha256('memory'));
  });

  it('kept both servers running throughout', () => {
    expect([memory.proc.exitCode, file.proc.exitCode]).toEqual([null, null]);
  });
});

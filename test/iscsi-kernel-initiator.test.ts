// The Linux kernel initiator (iscsi_tcp + open-iscsi) against `blockmirror serve --iscsi` with
// CHAP, inside a small VM (/work/shared/tools/linux-iscsi-initiator-vm): discovery, login, mkfs.ext4,
// mount, write 32 MiB, e2fsck, reread, logout. Afterwards the host checks the same bytes through
// NBD: e2fsck on a copy of the export. Slow: the VM runs under software emulation.
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { describeRun, requireTools } from './helpers/clients.js';
import { startIscsiServe, type IscsiServe } from './helpers/iscsi.js';
import { run, tmpDir } from './helpers/servers.js';

const TOOL = '/work/shared/tools/linux-iscsi-initiator-vm';
const VM_TIMEOUT_S = 420;

describe('the Linux kernel iSCSI initiator in a VM', () => {
  let s: IscsiServe;
  let dir: string;
  const secret = 'kernel-secret-1234';

  beforeAll(async () => {
    requireTools('qemu-system-x86_64', 'iscsiadm', 'mkfs.ext4', 'e2fsck', 'nbdcopy');
    if (!fs.existsSync(TOOL)) throw new Error(`${TOOL} is missing: the kernel initiator test needs it`);
    dir = tmpDir('bm-iscsi-vm-');
    fs.writeFileSync(path.join(dir, 'chap'), `vmuser:${secret}\n`);
    s = await startIscsiServe(['--size', '128MiB', '--iscsi-chap-file', path.join(dir, 'chap')]);
  });
  afterAll(async () => {
    await s?.stop();
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  it('logs in with CHAP, makes and checks an ext4 file system, and the host reads a clean file system through NBD', async () => {
    const vm = await run(TOOL, ['--chap', `vmuser:${secret}`, String(s.iscsiPort), s.target], { timeoutMs: VM_TIMEOUT_S * 1000 });
    expect(vm.code, describeRun('linux-iscsi-initiator-vm', vm)).toBe(0);
    expect(vm.stdout).toMatch(/VMTEST:/);
    const img = path.join(dir, 'copy.img');
    const c = await run('nbdcopy', ['--', s.uri, img]);
    expect(c.code, c.stderr).toBe(0);
    const fsck = await run('e2fsck', ['-fn', img]);
    expect(fsck.code, fsck.stdout + fsck.stderr).toBe(0);
    expect(s.stderr()).not.toContain(secret);
  }, VM_TIMEOUT_S * 1000 + 60_000);
});

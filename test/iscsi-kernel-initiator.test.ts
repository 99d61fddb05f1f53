// The Linux kernel initiator (iscsi_tcp + open-iscsi) against `blockmirror serve --iscsi` with
// CHAP, inside a small VM (/work/shared/tools/linux-iscsi-initiator-vm): discovery, login, mkfs.ext4,
// mount, write 32 MiB, e2fsck, reread, logout. Afterwards the host checks the same bytes through
// NBD: e2fsck on a copy of the export. Then mutual CHAP (test/vm/iscsi-mutual-chap.sh): a wrong
// target secret makes the initiator refuse the target; the right one logs in, a fio verify job runs, and the data the
// guest wrote is what NBD reads. Slow: the VM runs under software emulation.
import crypto from 'node:crypto';
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

describe('the Linux kernel iSCSI initiator in a VM with mutual CHAP', () => {
  let s: IscsiServe;
  let dir: string;
  const secret = 'initiator-secret-5678';
  const targetSecret = 'target-secret-90123';

  beforeAll(async () => {
    requireTools('qemu-system-x86_64', 'iscsiadm', 'nbdcopy', 'fio');
    if (!fs.existsSync(TOOL)) throw new Error(`${TOOL} is missing: the kernel initiator test needs it`);
    dir = tmpDir('bm-iscsi-vm-mutual-');
    fs.writeFileSync(path.join(dir, 'chap'), `vmuser:${secret}\ntheta:${targetSecret}\n`);
    s = await startIscsiServe(['--size', '32MiB', '--iscsi-chap-file', path.join(dir, 'chap')]);
  });
  afterAll(async () => {
    await s?.stop();
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  it('refuses a target that proves a wrong secret, logs in when it proves the right one, passes a fio verify job, and the guest\'s data reads back through NBD', async () => {
    const script = path.join(dir, 'mutual.sh');
    fs.writeFileSync(script, `TARGET_USER='theta' TARGET_SECRET='${targetSecret}'\n` + fs.readFileSync(new URL('./vm/iscsi-mutual-chap.sh', import.meta.url), 'utf8'));
    const vm = await run(TOOL, ['--with-fio', '--chap', `vmuser:${secret}`, '--script', script, String(s.iscsiPort), s.target], { timeoutMs: VM_TIMEOUT_S * 1000 });
    expect(vm.code, describeRun('linux-iscsi-initiator-vm', vm)).toBe(0);
    expect(vm.stdout).toContain('VMTEST: wrong target secret refused ok');
    expect(vm.stdout).toContain('VMTEST: mutual CHAP login ok');
    expect(vm.stdout).toContain('VMTEST: fio verify ok');
    const sum = /VMTEST: read back sha256 ok ([0-9a-f]{16})/.exec(vm.stdout)?.[1];
    expect(sum, vm.stdout).toBeDefined();
    const img = path.join(dir, 'copy.img');
    const c = await run('nbdcopy', ['--', s.uri, img]);
    expect(c.code, c.stderr).toBe(0);
    const host = crypto.createHash('sha256').update(fs.readFileSync(img).subarray(0, 4 << 20)).digest('hex').slice(0, 16);
    expect(host).toBe(sum);
    expect(s.stderr()).not.toContain(targetSecret);
    expect(s.stderr()).not.toContain(secret);
  }, VM_TIMEOUT_S * 1000 + 60_000);
});

// Real initiators against `blockmirror serve --iscsi`: libiscsi's tools (with and without CHAP,
// allow-list) and qemu's libiscsi driver, with the data compared through NBD and iSCSI.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { requireTools } from './helpers/clients.js';
import { startIscsiServe, type IscsiServe } from './helpers/iscsi.js';
import { run, tmpDir } from './helpers/servers.js';

let dir: string;
beforeAll(() => {
  requireTools('iscsi-inq', 'iscsi-ls', 'iscsi-readcapacity16', 'qemu-img', 'qemu-io', 'nbdcopy');
  dir = tmpDir('bm-iscsi-clients-');
});
afterAll(() => {
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

describe('libiscsi tools without CHAP', () => {
  let s: IscsiServe;
  beforeAll(async () => {
    s = await startIscsiServe(['--size', '64MiB']);
  });
  afterAll(async () => {
    await s?.stop();
  });

  it('iscsi-ls discovers the target at the portal it listens on, and lists LUN 0 with -s', async () => {
    const r = await run('iscsi-ls', [`iscsi://127.0.0.1:${s.iscsiPort}`]);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toContain(`Target:${s.target} Portal:127.0.0.1:${s.iscsiPort},1`);
    const rs = await run('iscsi-ls', ['-s', `iscsi://127.0.0.1:${s.iscsiPort}`]);
    expect(rs.code, rs.stderr).toBe(0);
    expect(rs.stdout).toMatch(/Lun:0\s+Type:DIRECT_ACCESS/);
  });

  it('iscsi-inq reads standard INQUIRY and the unit serial VPD page', async () => {
    const r = await run('iscsi-inq', [s.lunUrl]);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toContain('Vendor:BLKMIRR');
    expect(r.stdout).toContain('Version Descriptor:04c0 SBC-3');
    const v = await run('iscsi-inq', ['-e', '1', '-c', '128', s.lunUrl]); // -c takes decimal page codes
    expect(v.code, v.stderr).toBe(0);
    expect(v.stdout).toContain('Unit Serial Number:[disk]');
  });

  it('iscsi-readcapacity16 reports the size and thin provisioning', async () => {
    const r = await run('iscsi-readcapacity16', [s.lunUrl]);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toContain('Total size:67108864');
    expect(r.stdout).toContain('LBPME:1 LBPRZ:1');
  });

  it('qemu-img convert writes a random image over iscsi://, and NBD and iSCSI both read it back identical', async () => {
    const src = path.join(dir, 'src.img');
    const img = crypto.randomBytes(8 << 20);
    img.fill(0, 2 << 20, 3 << 20); // a zero run for the driver to skip or unmap
    fs.writeFileSync(src, img);
    const c = await run('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', src, s.lunUrl], { timeoutMs: 120_000 });
    expect(c.code, c.stderr).toBe(0);
    const viaNbd = path.join(dir, 'nbd.img');
    const n = await run('nbdcopy', ['--', s.uri, viaNbd]);
    expect(n.code, n.stderr).toBe(0);
    expect(fs.readFileSync(viaNbd).subarray(0, img.length).equals(img)).toBe(true);
    const viaIscsi = path.join(dir, 'iscsi.img');
    const i = await run('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', s.lunUrl, viaIscsi], { timeoutMs: 120_000 });
    expect(i.code, i.stderr).toBe(0);
    expect(fs.readFileSync(viaIscsi).subarray(0, img.length).equals(img)).toBe(true);
    const cmp = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', viaNbd, viaIscsi]);
    expect(cmp.code, cmp.stdout + cmp.stderr).toBe(0);
  }, 180_000);

  it('qemu-io writes, flushes and discards over iSCSI, and NBD sees each result', async () => {
    const w = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 1M 256k', '-c', 'flush', '-c', 'discard 1M 64k', '-c', 'read -P 0 1M 64k', '-c', 'read -P 0x5a 1088k 192k', s.lunUrl]);
    expect(w.code, w.stderr).toBe(0);
    expect(w.stdout + w.stderr).not.toMatch(/Pattern verification failed|error/i);
    const n = await run('qemu-io', ['-f', 'raw', '-r', '-c', 'read -P 0 1M 64k', '-c', 'read -P 0x5a 1088k 192k', s.uri]);
    expect(n.code, n.stderr).toBe(0);
    expect(n.stdout + n.stderr).not.toMatch(/Pattern verification failed/);
  });
});

describe('libiscsi tools with CHAP and an allow-list', () => {
  let s: IscsiServe;
  const secret = 'a-secret-of-16ch';
  beforeAll(async () => {
    const chap = path.join(dir, 'chap');
    fs.writeFileSync(chap, `alice:${secret}\n`);
    s = await startIscsiServe(['--size', '16MiB', '--iscsi-chap-file', chap, '--iscsi-allow', 'iqn.2007-10.com.github:sahlberg:*', '127.0.0.0/8', '--log-level', 'debug']);
  });
  afterAll(async () => {
    await s?.stop();
  });

  const url = (user: string, pw: string) => `iscsi://${user}%${pw}@127.0.0.1:${s.iscsiPort}/${s.target}/0`;

  it('logs in with the right CHAP secret', async () => {
    const r = await run('iscsi-inq', [url('alice', secret)]);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toContain('Vendor:BLKMIRR');
  });

  it('refuses a wrong secret, a wrong user and no CHAP at all, and never logs the secret', async () => {
    for (const u of [url('alice', 'wrong-secret-123'), url('mallory', secret), s.lunUrl]) {
      const r = await run('iscsi-inq', [u]);
      expect(r.code, `${u} was let in`).not.toBe(0);
      expect(r.stderr).toMatch(/[Aa]uthentication|login|Failed/);
    }
    expect(s.stderr()).toContain('iscsi login refused');
    expect(s.stderr()).not.toContain(secret);
  });

  it('refuses an initiator name outside the allow-list', async () => {
    const r = await run('iscsi-inq', ['-i', 'iqn.1994-05.com.example:intruder', url('alice', secret)]);
    expect(r.code).not.toBe(0);
    expect(s.stderr()).toContain('is not on the allow-list');
  });
});

describe('libiscsi tools with mutual CHAP', () => {
  let s: IscsiServe;
  const secret = 'alice-secret-16ch';
  const targetSecret = 'target-secret-16c';
  beforeAll(async () => {
    const chap = path.join(dir, 'chap-mutual');
    fs.writeFileSync(chap, `alice:${secret}\ntheta:${targetSecret}\n`);
    s = await startIscsiServe(['--size', '16MiB', '--iscsi-chap-file', chap, '--log-level', 'debug']);
  });
  afterAll(async () => {
    await s?.stop();
  });

  // libiscsi: USER%SECRET@ is what the initiator proves; target_user/target_password what it asks the target to prove.
  const url = (targetPassword?: string) =>
    `iscsi://alice%${secret}@127.0.0.1:${s.iscsiPort}/${s.target}/0${targetPassword === undefined ? '' : `?target_user=theta&target_password=${targetPassword}`}`;

  it('logs in when each side proves its own secret (iscsi-inq, iscsi-readcapacity16, iscsi-ls)', async () => {
    const inq = await run('iscsi-inq', [url(targetSecret)]);
    expect(inq.code, inq.stderr).toBe(0);
    expect(inq.stdout).toContain('Vendor:BLKMIRR');
    const cap = await run('iscsi-readcapacity16', [url(targetSecret)]);
    expect(cap.code, cap.stderr).toBe(0);
    expect(cap.stdout).toContain('Total size:16777216');
    const ls = await run('iscsi-ls', [`iscsi://alice%${secret}@127.0.0.1:${s.iscsiPort}?target_user=theta&target_password=${targetSecret}`]);
    expect(ls.code, ls.stderr).toBe(0);
    expect(ls.stdout).toContain(`Target:${s.target}`);
  });

  it('makes the initiator refuse a target that proves the wrong secret, in a normal and in a discovery session', async () => {
    const r = await run('iscsi-inq', [url('not-the-target-secret')]);
    expect(r.code).not.toBe(0);
    expect(r.stderr).toContain('Invalid CHAP_R response from the target');
    const ls = await run('iscsi-ls', [`iscsi://alice%${secret}@127.0.0.1:${s.iscsiPort}?target_user=theta&target_password=not-the-target-secret`]);
    expect(ls.code).not.toBe(0);
    expect(ls.stdout).not.toContain(s.target);
  });

  it('refuses an initiator that does not ask the target to prove itself, and never logs either secret', async () => {
    const r = await run('iscsi-inq', [url()]);
    expect(r.code).not.toBe(0);
    expect(r.stderr).toMatch(/Authentication failure/);
    expect(s.stderr()).toContain('the target requires mutual CHAP, but the initiator sent no challenge');
    expect(s.stderr()).not.toContain(secret);
    expect(s.stderr()).not.toContain(targetSecret);
  });
});

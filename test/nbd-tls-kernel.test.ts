// The Linux kernel's NBD client over TLS: nbd-client does the TLS handshake (GnuTLS, with a client
// certificate from the cluster CA) and relays for nbd.ko, in the VM of test/vm/nbd-client-vm.sh,
// against `blockmirror serve --tls require --tls-verify-peer`: mkfs.ext4, mount, write, e2fsck,
// re-attach and reread in the guest; the host then checks the exported bytes itself. The same
// guest without a client certificate is refused. Slow (a VM under software emulation).
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { makePki, type Pki } from './helpers/pki.js';
import { ROOT, run, startServe, tmpDir, type CmdResult, type RunningServer } from './helpers/servers.js';
import { describeRun, runOk } from './helpers/clients.js';

const HARNESS = path.join(ROOT, 'test/vm/nbd-client-vm.sh');
const VM_TIMEOUT_S = 300;
let pki: Pki;
let dir: string;
let server: RunningServer;
let vm: CmdResult;

beforeAll(async () => {
  pki = makePki();
  dir = tmpDir('bm-tls-vm-');
  const certs = path.join(dir, 'certs');
  const guest = path.join(dir, 'guest');
  fs.mkdirSync(certs);
  fs.mkdirSync(guest);
  const s = pki.cert('localhost');
  fs.copyFileSync(s.cert, path.join(certs, 'server-cert.pem'));
  fs.copyFileSync(s.key, path.join(certs, 'server-key.pem'));
  fs.copyFileSync(pki.ca, path.join(certs, 'ca-cert.pem'));
  const c = pki.cert('kernel-host');
  fs.copyFileSync(pki.ca, path.join(guest, 'ca.pem'));
  fs.copyFileSync(c.cert, path.join(guest, 'client.pem'));
  fs.copyFileSync(c.key, path.join(guest, 'client-key.pem'));
  server = await startServe(['--size', '128MiB', '--file', path.join(dir, 'disk.img'), '--tls', 'require', '--tls-certificates', certs, '--tls-verify-peer']);
  vm = await run('bash', [HARNESS, '--timeout', String(VM_TIMEOUT_S), '--tls', guest, `nocert:${server.port}:disk:1:tls-nocert`, `tls:${server.port}:disk:1:tls`], {
    timeoutMs: (VM_TIMEOUT_S + 60) * 1000,
  });
}, (VM_TIMEOUT_S + 90) * 1000);

afterAll(async () => {
  await server?.stop();
  pki?.cleanup();
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

describe('the kernel NBD client over TLS', () => {
  it('is refused without a client certificate, and attaches, formats, writes and rereads with one', () => {
    expect(vm.code, describeRun('test/vm/nbd-client-vm.sh', vm)).toBe(0);
    expect(vm.stdout).toContain('VMTEST: nocert: refused without a client certificate');
    expect(vm.stdout).toContain('VMTEST: tls: e2fsck clean');
    expect(vm.stdout).toContain('VMTEST: tls: reread ok');
    expect(vm.stdout).toContain('VMTEST: tls: PASS');
  });

  it('leaves on the export the file system and the bytes the guest wrote', async () => {
    const image = path.join(dir, 'disk.img');
    await runOk('e2fsck', ['-fn', image]);
    const dumped = path.join(dir, 'f');
    await runOk('debugfs', ['-R', `dump /f ${dumped}`, image]);
    const sha = createHash('sha256').update(fs.readFileSync(dumped)).digest('hex');
    expect(vm.stdout).toContain(`VMTEST: tls: sha256 ${sha}`);
  });
});

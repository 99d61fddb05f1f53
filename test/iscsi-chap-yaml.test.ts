// CHAP from the YAML with real initiators (libiscsi's iscsi-inq and iscsi-ls): secrets inline on
// the storage system, a volume's own target with its own inline secrets (mutual) or its own CHAP
// file and allow-list, and none of the secrets in the logs, `status`, /api/status, /api/config or /metrics.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import fs from 'node:fs';
import path from 'node:path';
import { requireTools } from './helpers/clients.js';
import { CLI, freePort, run, startUp, tmpDir, type RunningCluster } from './helpers/servers.js';
import { adminFetch } from './helpers/admin.js';

const SS_SECRET = 'ss-inline-secret-7f3a';
const VOL_SECRET = 'vol-inline-secret-91c2';
const VOL_MUTUAL = 'vol-mutual-secret-44d8';
const FILE_SECRET = 'vol-file-secret-0be6';
/** The secret a refused `blockmirror apply` tries to set: it must not reach the logs either. */
const NEW_SECRET = 'vol-new-secret-5e21';
const SECRETS = [SS_SECRET, VOL_SECRET, VOL_MUTUAL, FILE_SECRET, NEW_SECRET];

describe('CHAP secrets in the YAML, per target, with real initiators', () => {
  let dir: string;
  let c: RunningCluster;
  let iscsi: number;
  let admin: number;
  let logs = '';
  const ssTarget = 'iqn.2026-12.org.blockmirror:ss1';
  const ownTarget = 'iqn.2026-12.org.blockmirror:own';
  const fileTarget = 'iqn.2026-12.org.blockmirror:filed';
  const portal = () => `127.0.0.1:${iscsi}`;
  const inq = (user: string, secret: string, target: string, lun: number, extra: string[] = [], query = '') =>
    run('iscsi-inq', [...extra, `iscsi://${user}%${secret}@${portal()}/${target}/${lun}${query}`]);

  beforeAll(async () => {
    requireTools('iscsi-inq', 'iscsi-ls');
    dir = tmpDir('bm-iscsi-chap-yaml-');
    const nbd = await freePort();
    [iscsi, admin] = [await freePort(), await freePort()];
    fs.writeFileSync(path.join(dir, 'filed.chap'), `carol:${FILE_SECRET}\n`, { mode: 0o600 });
    fs.writeFileSync(
      path.join(dir, 'cluster.yaml'),
      `storageSystems:
  - id: 1
    nbd: 127.0.0.1:${nbd}
    admin: 127.0.0.1:${admin}
    iscsi: 127.0.0.1:${iscsi}
    iscsiChap: { user: alice, secret: "${SS_SECRET}" }
    volumes:
      - { id: 1, size: 4MiB }
      - id: 2
        size: 4MiB
        iscsiTarget: "${ownTarget}"
        iscsiChap: { user: bob, secret: "${VOL_SECRET}", mutualUser: vault, mutualSecret: "${VOL_MUTUAL}" }
      - { id: 3, size: 4MiB, iscsiTarget: "${fileTarget}", iscsiChapFile: filed.chap, iscsiAllow: ["iqn.2026-12.test:allowed*"] }
`,
    );
    c = await startUp(path.join(dir, 'cluster.yaml'), [nbd, admin, iscsi], ['--log-level', 'debug']);
    c.proc.stdout?.setEncoding('utf8').on('data', (d: string) => (logs += d));
  });

  afterAll(async () => {
    await c?.stop();
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  it("logs in to the storage system's target with its inline secret and is refused with a wrong one", async () => {
    const ok = await inq('alice', SS_SECRET, ssTarget, 1);
    expect(ok.code, ok.stderr).toBe(0);
    expect(ok.stdout).toMatch(/Peripheral Device Type/i);
    const bad = await inq('alice', 'not-the-ss-secret-1', ssTarget, 1);
    expect(bad.code).not.toBe(0);
    expect(bad.stdout).not.toMatch(/Peripheral Device Type/i);
  });

  it("refuses the storage system's secret on a volume's own target and accepts that target's own, mutual, secret", async () => {
    const withSs = await inq('alice', SS_SECRET, ownTarget, 0);
    expect(withSs.code).not.toBe(0);
    const mutual = `?target_user=vault&target_password=${VOL_MUTUAL}`;
    const own = await inq('bob', VOL_SECRET, ownTarget, 0, [], mutual);
    expect(own.code, own.stderr).toBe(0);
    expect(own.stdout).toMatch(/Peripheral Device Type/i);
    // The target proves VOL_MUTUAL; an initiator expecting another secret refuses it.
    const wrongMutual = await inq('bob', VOL_SECRET, ownTarget, 0, [], '?target_user=vault&target_password=not-the-mutual-0');
    expect(wrongMutual.code).not.toBe(0);
    // And the volume's secret opens nothing on the storage system's target.
    const crossed = await inq('bob', VOL_SECRET, ssTarget, 1);
    expect(crossed.code).not.toBe(0);
  });

  it("gives a volume's target its CHAP file and allow-list: the right initiator name and secret log in, others are refused", async () => {
    const ok = await inq('carol', FILE_SECRET, fileTarget, 0, ['-i', 'iqn.2026-12.test:allowed-host']);
    expect(ok.code, ok.stderr).toBe(0);
    expect(ok.stdout).toMatch(/Peripheral Device Type/i);
    const notListed = await inq('carol', FILE_SECRET, fileTarget, 0, ['-i', 'iqn.2026-12.test:other-host']);
    expect(notListed.code).not.toBe(0);
    const ssSecret = await inq('alice', SS_SECRET, fileTarget, 0, ['-i', 'iqn.2026-12.test:allowed-host']);
    expect(ssSecret.code).not.toBe(0);
    // The storage system's own target keeps the storage system's allow-list (none): any name logs in.
    const anyName = await inq('alice', SS_SECRET, ssTarget, 1, ['-i', 'iqn.2026-12.test:other-host']);
    expect(anyName.code, anyName.stderr).toBe(0);
  });

  it("discovers the targets an initiator may use with the storage system's secret, and not with a volume's", async () => {
    const ls = await run('iscsi-ls', [`iscsi://alice%${SS_SECRET}@${portal()}`]);
    expect(ls.code, ls.stderr).toBe(0);
    for (const t of [ssTarget, ownTarget]) expect(ls.stdout).toContain(`Target:${t} `);
    // SendTargets answers by each target's allow-list: the CHAP-file target only to the names it allows.
    expect(ls.stdout).not.toContain(fileTarget);
    const allowed = await run('iscsi-ls', ['-i', 'iqn.2026-12.test:allowed-host', `iscsi://alice%${SS_SECRET}@${portal()}`]);
    expect(allowed.code, allowed.stderr).toBe(0);
    expect(allowed.stdout).toContain(`Target:${fileTarget} `);
    const bad = await run('iscsi-ls', [`iscsi://bob%${VOL_SECRET}@${portal()}`]);
    expect(bad.code).not.toBe(0);
  });

  it("refuses to change a volume's own CHAP at run time (blockmirror apply), without showing either secret, and the old one keeps working", async () => {
    const file = path.join(dir, 'cluster.yaml');
    const edited = path.join(dir, 'edited.yaml');
    fs.writeFileSync(edited, fs.readFileSync(file, 'utf8').replace(VOL_SECRET, NEW_SECRET));
    const r = await run(process.execPath, [CLI, 'apply', '-c', edited], { timeoutMs: 60_000 });
    expect(r.code).toBe(1);
    expect(r.stderr).toBe('blockmirror: storage system 1: volume 2: its allow list and iSCSI target (with its CHAP and iscsiAllow) cannot change at run time; restart the storage system; nothing was applied\n');
    for (const s of SECRETS) expect(r.stdout + r.stderr).not.toContain(s);
    const still = await inq('bob', VOL_SECRET, ownTarget, 0, [], `?target_user=vault&target_password=${VOL_MUTUAL}`);
    expect(still.code, still.stderr).toBe(0);
  });

  it('never shows a secret in the logs, blockmirror status, /api/status, /api/config or /metrics, while the logs record the logins and refusals', async () => {
    expect((await inq('bob', 'a-wrong-secret-xyz', ownTarget, 0)).code).not.toBe(0);
    const api = await (await adminFetch(`http://127.0.0.1:${admin}/api/status`)).text();
    expect(api).toContain(`"address":"127.0.0.1:${iscsi}"`);
    const metrics = await (await adminFetch(`http://127.0.0.1:${admin}/metrics`)).text();
    expect(metrics).toMatch(/blockmirror_frontend_sessions\{[^}]*protocol="iscsi"/);
    // The running YAML through the API: the CHAP keys are there, their secrets are not.
    const config = ((await (await adminFetch(`http://127.0.0.1:${admin}/api/config`)).json()) as { yaml: string }).yaml;
    expect(config).toMatch(/iscsiChap:/);
    expect(config).toMatch(/secret: <redacted>/);
    const cli = await run(process.execPath, [CLI, 'status', '-c', path.join(dir, 'cluster.yaml')]);
    expect(cli.code, cli.stderr).toBe(0);
    const json = await run(process.execPath, [CLI, 'status', '-c', path.join(dir, 'cluster.yaml'), '--json']);
    expect(json.code, json.stderr).toBe(0);
    const all = logs + c.stderr();
    // The logs did record the logins and the refusals: they were looked at, not empty.
    expect(all).toMatch(/iscsi login refused/);
    expect(all).toMatch(/CHAP authentication failed/);
    expect(all).toMatch(/"msg":"iscsi login"/);
    for (const [where, text] of [['logs', all], ['/api/status', api], ['/metrics', metrics], ['/api/config', config], ['status', cli.stdout + cli.stderr], ['status --json', json.stdout]] as const) {
      for (const s of SECRETS) expect(text.includes(s), `${where} shows a CHAP secret`).toBe(false);
    }
  });
});

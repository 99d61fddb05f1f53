// targets/iscsi-login: the iscsiadm commands it runs for a cluster's targets (a stub iscsiadm logs
// them), CHAP secrets passed to iscsiadm but masked in --dry-run, logout, and bad input.
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { ROOT, run, tmpDir } from './helpers/servers.js';

const SCRIPT = path.join(ROOT, 'targets/iscsi-login');
const dir = tmpDir('bm-iscsi-login-');
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

const stub = path.join(dir, 'iscsiadm');
const log = path.join(dir, 'iscsiadm.log');
// Logs each call; a second --login of the same target says "already present" (exit 15), as iscsiadm does.
fs.writeFileSync(stub, `#!/bin/sh\necho "$*" >> ${log}\ncase "$*" in *--login*) grep -c -- "$*" ${log} | grep -q '^1$' || exit 15;; esac\nexit 0\n`, { mode: 0o755 });
fs.writeFileSync(path.join(dir, 'chap.txt'), 'alice:alice-secret-123456\ntarget:target-secret-654321\n', { mode: 0o600 });
const yaml = path.join(dir, 'cluster.yaml');
fs.writeFileSync(
  yaml,
  `storageSystems:
  - id: 1
    nbd: 127.0.0.1:10809
    admin: 127.0.0.1:9001
    iscsi: 127.0.0.1:3260
    iscsiChapFile: chap.txt
    volumes: [ { id: 1, size: 1MiB }, { id: 2, size: 1MiB, iscsiTarget: "iqn.2026-12.org.example:db" } ]
  - id: 2
    nbd: 127.0.0.1:10819
    admin: 127.0.0.1:9002
    iscsi: "127.0.0.1:3261"
    volumes: [ { id: 1, size: 1MiB } ]
`,
);
const login = (args: string[]) => run(SCRIPT, args, { env: { BM_ISCSIADM: stub } });

const inlineYaml = path.join(dir, 'inline.yaml');
fs.writeFileSync(
  inlineYaml,
  `storageSystems:
  - id: 1
    nbd: 127.0.0.1:10809
    admin: 127.0.0.1:9001
    iscsi: 127.0.0.1:3260
    iscsiChap: { user: alice, secret: "inline-ss-secret-1234" }
    volumes:
      - { id: 1, size: 1MiB }
      - { id: 2, size: 1MiB, iscsiTarget: "iqn.2026-12.org.example:vault", iscsiChap: { user: bob, secret: "inline-vol-secret-5678", mutualUser: vault, mutualSecret: "inline-vol-mutual-9012" } }
      - { id: 3, size: 1MiB, iscsiTarget: "iqn.2026-12.org.example:vault", iscsiChap: { user: bob, secret: "inline-vol-secret-5678", mutualUser: vault, mutualSecret: "inline-vol-mutual-9012" } }
      - { id: 4, size: 1MiB, iscsiTarget: "iqn.2026-12.org.example:plain" }
`,
);

describe('targets/iscsi-login', () => {
  it("sets inline iscsiChap, and a volume's own target's CHAP, masked in --dry-run and passed to iscsiadm", async () => {
    const r = await login(['-c', inlineYaml, '--dry-run']);
    expect(r.code, r.stderr).toBe(0);
    const ss = '-m node -T iqn.2026-12.org.blockmirror:ss1 -p 127.0.0.1:3260';
    const vault = '-m node -T iqn.2026-12.org.example:vault -p 127.0.0.1:3260';
    const plain = '-m node -T iqn.2026-12.org.example:plain -p 127.0.0.1:3260';
    expect(r.stdout.split('\n').filter(Boolean)).toEqual([
      'iscsiadm -m discovery -t sendtargets -p 127.0.0.1:3260',
      `iscsiadm ${ss} -o update -n node.session.auth.authmethod -v CHAP`,
      `iscsiadm ${ss} -o update -n node.session.auth.username -v alice`,
      `iscsiadm ${ss} -o update -n node.session.auth.password -v ********`,
      `iscsiadm ${ss} --login`,
      `iscsiadm ${vault} -o update -n node.session.auth.authmethod -v CHAP`,
      `iscsiadm ${vault} -o update -n node.session.auth.username -v bob`,
      `iscsiadm ${vault} -o update -n node.session.auth.password -v ********`,
      `iscsiadm ${vault} -o update -n node.session.auth.username_in -v vault`,
      `iscsiadm ${vault} -o update -n node.session.auth.password_in -v ********`,
      `iscsiadm ${vault} --login`,
      `iscsiadm ${plain} -o update -n node.session.auth.authmethod -v CHAP`,
      `iscsiadm ${plain} -o update -n node.session.auth.username -v alice`,
      `iscsiadm ${plain} -o update -n node.session.auth.password -v ********`,
      `iscsiadm ${plain} --login`,
    ]);
    expect(r.stdout + r.stderr).not.toMatch(/inline-(ss|vol)-/);
    const real = await login(['-c', inlineYaml]);
    expect(real.code, real.stderr).toBe(0);
    const calls = fs.readFileSync(log, 'utf8');
    expect(calls).toContain(`${vault} -o update -n node.session.auth.password -v inline-vol-secret-5678`);
    expect(calls).toContain(`${vault} -o update -n node.session.auth.password_in -v inline-vol-mutual-9012`);
    expect(calls).toContain(`${plain} -o update -n node.session.auth.password -v inline-ss-secret-1234`);
    fs.rmSync(log);
  });

  it('prints the discovery, CHAP and login commands with the secrets masked in --dry-run', async () => {
    const r = await login(['-c', yaml, '--dry-run']);
    expect(r.code, r.stderr).toBe(0);
    const node1 = '-m node -T iqn.2026-12.org.blockmirror:ss1 -p 127.0.0.1:3260';
    expect(r.stdout.split('\n').filter(Boolean)).toEqual([
      'iscsiadm -m discovery -t sendtargets -p 127.0.0.1:3260',
      'iscsiadm -m discovery -t sendtargets -p 127.0.0.1:3261',
      `iscsiadm ${node1} -o update -n node.session.auth.authmethod -v CHAP`,
      `iscsiadm ${node1} -o update -n node.session.auth.username -v alice`,
      `iscsiadm ${node1} -o update -n node.session.auth.password -v ********`,
      `iscsiadm ${node1} -o update -n node.session.auth.username_in -v target`,
      `iscsiadm ${node1} -o update -n node.session.auth.password_in -v ********`,
      `iscsiadm ${node1} --login`,
      'iscsiadm -m node -T iqn.2026-12.org.example:db -p 127.0.0.1:3260 -o update -n node.session.auth.authmethod -v CHAP',
      'iscsiadm -m node -T iqn.2026-12.org.example:db -p 127.0.0.1:3260 -o update -n node.session.auth.username -v alice',
      'iscsiadm -m node -T iqn.2026-12.org.example:db -p 127.0.0.1:3260 -o update -n node.session.auth.password -v ********',
      'iscsiadm -m node -T iqn.2026-12.org.example:db -p 127.0.0.1:3260 -o update -n node.session.auth.username_in -v target',
      'iscsiadm -m node -T iqn.2026-12.org.example:db -p 127.0.0.1:3260 -o update -n node.session.auth.password_in -v ********',
      'iscsiadm -m node -T iqn.2026-12.org.example:db -p 127.0.0.1:3260 --login',
      'iscsiadm -m node -T iqn.2026-12.org.blockmirror:ss2 -p 127.0.0.1:3261 --login',
    ]);
    expect(fs.existsSync(log)).toBe(false); // a dry run runs nothing
  });

  it('runs them, passing the real secrets to iscsiadm, and takes "already logged in" as done', async () => {
    for (let i = 0; i < 2; i++) {
      const r = await login(['-c', yaml, '--ss', '1']);
      expect(r.code, r.stderr).toBe(0);
      expect(r.stdout).toBe('iqn.2026-12.org.blockmirror:ss1 127.0.0.1:3260 logged in\niqn.2026-12.org.example:db 127.0.0.1:3260 logged in\n');
    }
    const calls = fs.readFileSync(log, 'utf8');
    expect(calls).toContain('-n node.session.auth.password -v alice-secret-123456');
    expect(calls).toContain('-n node.session.auth.password_in -v target-secret-654321');
    expect(calls).not.toContain('3261');
  });

  it('logs out', async () => {
    const r = await login(['-c', yaml, '--ss', '2', '--logout']);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toBe('iqn.2026-12.org.blockmirror:ss2 127.0.0.1:3261 logged out\n');
    expect(fs.readFileSync(log, 'utf8')).toContain('-m node -T iqn.2026-12.org.blockmirror:ss2 -p 127.0.0.1:3261 --logout');
  });

  it('refuses bad input with one line and exit 2, and says what to install when iscsiadm is missing', async () => {
    const cases: [string[], string][] = [
      [[], 'iscsi-login: -c FILE is required: the cluster YAML (see --help)\n'],
      [['-c', yaml, '--ss', 'x'], 'iscsi-login: --ss "x": expected a storage system id (see --help)\n'],
      [['-c', yaml, '--ss', '7'], `iscsi-login: --ss 7: ${yaml} has no storage system 7 (see --help)\n`],
    ];
    for (const [args, msg] of cases) {
      const r = await login(args);
      expect([r.code, r.stderr]).toEqual([2, msg]);
    }
    const missing = await run(SCRIPT, ['-c', yaml], { env: { BM_ISCSIADM: path.join(dir, 'nope') } });
    expect([missing.code, missing.stderr]).toEqual([1, `iscsi-login: ${path.join(dir, 'nope')} is missing: install open-iscsi (apt-get install open-iscsi)\n`]);
  });
});

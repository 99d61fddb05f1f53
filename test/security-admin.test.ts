// The admin API's token and Host check, as `up` sets them up with no token given: the token file
// made on first start (mode 0600), found by the CLI and by `admin token`; 401 without it, 421 for
// a DNS-rebinding Host; the dashboard in a real browser asking for the token; and the token kept
// out of the logs, the status and the metrics.
import fs from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import { chromium, type Browser } from 'playwright-core';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CLI, freePort, run, startUp, tmpDir, type RunningCluster } from './helpers/servers.js';

// This file's processes get no token from the environment (test/helpers/setup-env.ts gives one to every other file).
const env = { BLOCKMIRROR_ADMIN_TOKEN: '', XDG_RUNTIME_DIR: '' };
let dir: string;
let runtime: string;
let file: string;
let up: RunningCluster;
let admin: number;
let admin2: number;
let browser: Browser;

beforeAll(async () => {
  dir = tmpDir('bm-admin-sec-');
  runtime = path.join(dir, 'run');
  fs.mkdirSync(runtime);
  env.XDG_RUNTIME_DIR = runtime;
  admin = await freePort();
  admin2 = await freePort();
  const nbd = await freePort();
  const nbd2 = await freePort();
  file = path.join(dir, 'cluster.yaml');
  fs.writeFileSync(
    file,
    `storageSystems:
  - { id: 1, nbd: "127.0.0.1:${nbd}", admin: "127.0.0.1:${admin}", volumes: [ { id: 1, size: 4MiB }, { id: 2, size: 4MiB } ] }
  - { id: 2, nbd: "127.0.0.1:${nbd2}", admin: "127.0.0.1:${admin2}", dataDir: ss2, volumes: [ { id: 1, size: 4MiB } ] }
pairs:
  - { name: p, mode: sync, master: { ss: 1, vol: 1 }, mirrors: [ { ss: 1, vol: 2 } ] }
`,
  );
  [up, browser] = await Promise.all([startUp(file, [nbd, admin, nbd2, admin2], ['--log-level', 'info'], env), chromium.launch({ executablePath: '/usr/bin/chromium', args: ['--no-sandbox'] })]);
});

afterAll(async () => {
  await browser?.close();
  await up?.stop();
  fs.rmSync(dir, { recursive: true, force: true });
});

const cli = (args: string[]) => run(process.execPath, [CLI, ...args], { env });
const tokenOf = async (ss: number) => {
  const r = await cli(['admin', 'token', '-c', file, '--ss', String(ss)]);
  expect(r.code, r.stderr).toBe(0);
  return r.stdout.trim();
};

describe('the admin token', () => {
  it('is made on first start with mode 0600: in the data dir, or in the runtime directory for a storage system in memory', async () => {
    const inDataDir = path.join(dir, 'ss2', 'admin.token');
    expect(fs.statSync(inDataDir).mode & 0o777).toBe(0o600);
    const [inRuntime] = fs.readdirSync(path.join(runtime, `blockmirror-${process.getuid!()}`));
    expect(inRuntime).toMatch(/^[0-9a-f]{12}-ss1\.token$/);
    const f = path.join(runtime, `blockmirror-${process.getuid!()}`, inRuntime!);
    expect(fs.statSync(f).mode & 0o777).toBe(0o600);
    expect(await tokenOf(1)).toBe(fs.readFileSync(f, 'utf8').trim());
    expect(await tokenOf(2)).toBe(fs.readFileSync(inDataDir, 'utf8').trim());
    expect(up.stderr()).toContain(`storage system 2: created its admin token in ${inDataDir} (mode 0600)`);
  });

  it('is required for every call but the page and /healthz; the CLI finds it by itself', async () => {
    const noToken = await fetch(`http://127.0.0.1:${admin}/api/status`);
    expect(noToken.status).toBe(401);
    expect(noToken.headers.get('www-authenticate')).toBe('Bearer realm="blockmirror"');
    expect(await noToken.json()).toEqual({ error: 'this admin API needs its token: send Authorization: Bearer TOKEN (blockmirror admin token -c FILE prints it)' });
    const wrong = await fetch(`http://127.0.0.1:${admin}/api/pairs/p/split`, { method: 'POST', headers: { authorization: 'Bearer not-the-token' } });
    expect(wrong.status).toBe(401);
    for (const open of ['/', '/assets/app.js', '/healthz']) expect((await fetch(`http://127.0.0.1:${admin}${open}`)).status).toBe(200);
    expect((await fetch(`http://127.0.0.1:${admin}/metrics`)).status).toBe(401);
    const status = await cli(['status', '-c', file, '--json']);
    expect(status.code, status.stderr).toBe(0);
    expect(JSON.parse(status.stdout).pairs[0]).toMatchObject({ name: 'p', state: 'PAIR' });
  });

  it('refuses a DNS-rebinding Host header with 421, even with the right token, and changes nothing', async () => {
    const token = await tokenOf(1);
    // fetch() will not send a Host header of our choosing; node:http will, as curl -H would.
    const res = await new Promise<{ status: number; body: string }>((resolve, reject) => {
      const req = http.request(
        { host: '127.0.0.1', port: admin, path: '/api/pairs/p/split', method: 'POST', headers: { host: `evil.example:${admin}`, origin: `http://evil.example:${admin}`, authorization: `Bearer ${token}` } },
        (r) => {
          let body = '';
          r.setEncoding('utf8').on('data', (d: string) => (body += d)).on('end', () => resolve({ status: r.statusCode!, body }));
        },
      );
      req.on('error', reject);
      req.end();
    });
    expect(res.status).toBe(421);
    expect(JSON.parse(res.body)).toEqual({ error: `Host evil.example:${admin} is not a name of this admin API; if it is yours, add it to security.adminHosts` });
    const ok = await fetch(`http://localhost:${admin}/api/pairs/p`, { headers: { authorization: `Bearer ${token}` } });
    expect(((await ok.json()) as { state: string }).state).toBe('PAIR');
  });

  it('never appears in the log, the status or the metrics', async () => {
    const token = await tokenOf(1);
    const headers = { authorization: `Bearer ${token}` };
    const status = await (await fetch(`http://127.0.0.1:${admin}/api/status`, { headers })).text();
    const metrics = await (await fetch(`http://127.0.0.1:${admin}/metrics`, { headers })).text();
    for (const text of [status, metrics, up.stderr()]) expect(text).not.toContain(token);
  });
});

describe('the dashboard', () => {
  it('asks for the token once, keeps it for the tab, and splits a pair with it', async () => {
    const token = await tokenOf(1);
    const page = await browser.newPage();
    const asked: string[] = [];
    page.on('dialog', (d) => {
      asked.push(d.message());
      void (d.type() === 'prompt' ? d.accept(token) : d.accept());
    });
    await page.goto(`http://127.0.0.1:${admin}/`);
    await page.waitForSelector('#live.live');
    expect(asked).toEqual(['Admin token of this storage system (blockmirror admin token -c FILE prints it):']);
    await page.reload();
    await page.waitForSelector('#live.live');
    expect(asked).toHaveLength(1);
    await page.click('article[data-pair="p"] button[data-command="split"]');
    await page.waitForFunction(() => document.querySelector('#message')?.textContent?.includes('PSUS'));
    const r = await cli(['pair', 'resync', 'p', '-c', file]);
    expect(r.code, r.stderr).toBe(0);
    await page.close();
  });
});

describe('the admin API over HTTPS (security.adminTls)', () => {
  it('serves HTTPS only, checked against the cluster CA, and the CLI talks to it', async () => {
    const { makePki } = await import('./helpers/pki.js');
    const https = await import('node:https');
    const pki = makePki();
    const d = tmpDir('bm-admin-tls-');
    try {
      const [nbdPort, adminPort] = [await freePort(), await freePort()];
      const cert = pki.cert('localhost');
      const f = path.join(d, 'cluster.yaml');
      fs.writeFileSync(f, `security: { ca: ${pki.ca}, adminTls: true }
storageSystems:
  - { id: 1, nbd: "127.0.0.1:${nbdPort}", admin: "127.0.0.1:${adminPort}", tls: { mode: off, cert: ${cert.cert}, key: ${cert.key} }, volumes: [ { id: 1, size: 1MiB } ] }
`);
      const u = await startUp(f, [nbdPort, adminPort]);
      try {
        const st = await run(process.execPath, [CLI, 'status', '-c', f, '--json']);
        expect(st.code, st.stderr).toBe(0);
        expect(JSON.parse(st.stdout).storageSystems[0]).toMatchObject({ id: 1, reachable: true });
        const noToken = await new Promise<number>((resolve, reject) => {
          https.get({ host: '127.0.0.1', port: adminPort, path: '/api/status', ca: fs.readFileSync(pki.ca) }, (r) => {
            r.resume();
            resolve(r.statusCode!);
          }).on('error', reject);
        });
        expect(noToken).toBe(401);
        // Plain HTTP gets no HTTP answer from a TLS port.
        await expect(fetch(`http://127.0.0.1:${adminPort}/healthz`, { signal: AbortSignal.timeout(3000) })).rejects.toThrow();
        const url = await run(process.execPath, [CLI, 'admin', 'token', '-c', f, '--url']);
        expect(url.stdout).toMatch(new RegExp(`^https://127\\.0\\.0\\.1:${adminPort}/#token=`));
      } finally {
        await u.stop();
      }
    } finally {
      pki.cleanup();
      fs.rmSync(d, { recursive: true, force: true });
    }
  });
});

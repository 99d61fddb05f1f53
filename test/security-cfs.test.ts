// The CFS with its security on: clients must show the token of cfs.tokenFile before any
// operation, and the storage system under it requires TLS with a client certificate, which the
// CLI's data path presents (security.client). Paths are bounded.
import crypto from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import tls from 'node:tls';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startCfsCluster, type CfsCluster } from './helpers/cfs.js';
import { makePki, type Pki } from './helpers/pki.js';
import { run, tmpDir } from './helpers/servers.js';

let pki: Pki;
let c: CfsCluster;
let token: string;

beforeAll(async () => {
  pki = makePki();
  const dir = tmpDir('bm-cfs-sec-');
  token = crypto.randomBytes(32).toString('hex');
  fs.writeFileSync(path.join(dir, 'cfs.token'), `${token}\n`, { mode: 0o600 });
  const server = pki.cert('localhost');
  const client = pki.cert('cfs-client');
  c = await startCfsCluster({
    dir,
    prefix: `security:\n  ca: ${pki.ca}\n  client: { cert: ${client.cert}, key: ${client.key} }\n`,
    ssExtra: `    tls: { mode: require, cert: ${server.cert}, key: ${server.key}, verifyClients: true }\n`,
    cfsExtra: '  tokenFile: cfs.token\n  tls: true\n',
  });
});

afterAll(async () => {
  await c?.stop();
  fs.rmSync(c?.dir ?? '/nonexistent', { recursive: true, force: true });
  pki?.cleanup();
});

/** Requests on a raw TLS connection: the reply lines, and whether the server closed afterwards. */
function raw(lines: object[]): Promise<{ replies: Record<string, unknown>[]; closed: boolean }> {
  return new Promise((resolve) => {
    const s = tls.connect({ host: '127.0.0.1', port: c.ports.cfs, ca: fs.readFileSync(pki.ca) });
    let text = '';
    const t = setTimeout(() => {
      s.destroy();
      resolve({ replies: parse(), closed: false });
    }, 3000);
    const parse = () => text.split('\n').filter(Boolean).map((l) => JSON.parse(l) as Record<string, unknown>);
    s.on('data', (d) => (text += d.toString()));
    s.on('error', () => {});
    s.on('close', () => {
      clearTimeout(t);
      resolve({ replies: parse(), closed: true });
    });
    s.on('secureConnect', () => s.write(lines.map((l) => `${JSON.stringify(l)}\n`).join('')));
  });
}

describe('CFS authentication', () => {
  it('speaks only TLS: a plaintext client gets no reply and a closed connection, and the refusal is logged', async () => {
    const replies = await new Promise<string>((resolve) => {
      const s = net.connect({ host: '127.0.0.1', port: c.ports.cfs });
      let got = '';
      s.on('data', (d) => (got += d.toString('latin1')));
      s.on('error', () => {});
      s.on('close', () => resolve(got));
      s.on('connect', () => s.write(`${JSON.stringify({ id: 1, op: 'hello', version: 1, client: 'plain', token })}\n`));
    });
    expect(replies).not.toContain('"ok"');
    expect(c.up.stderr()).toMatch(/cfs: TLS refused for 127\.0\.0\.1/);
  });

  it('answers any operation before a valid hello with EACCES and closes the connection', async () => {
    const r = await raw([{ id: 1, op: 'stat', path: '/' }]);
    expect(r).toEqual({ closed: true, replies: [{ id: 1, ok: false, code: 'EACCES', message: 'this CFS server needs its token (cfs.tokenFile, or BLOCKMIRROR_CFS_TOKEN)' }] });
    const wrong = await raw([{ id: 1, op: 'hello', version: 1, client: 'mallory', token: 'f'.repeat(64) }, { id: 2, op: 'readdir', path: '/' }]);
    expect(wrong.closed).toBe(true);
    expect(wrong.replies).toHaveLength(1);
    expect(wrong.replies[0]).toMatchObject({ id: 1, code: 'EACCES' });
    expect(c.up.stderr()).toMatch(/cfs: refused .*mallory|cfs: refused 127\.0\.0\.1/);
  });

  it('moves a file through the CLI with the token from the YAML and TLS to the storage system, byte for byte', async () => {
    const local = path.join(c.dir, 'in.bin');
    const data = crypto.randomBytes(3 * 1024 * 1024 + 123);
    fs.writeFileSync(local, data);
    const put = await c.cli(['put', local, '/f.bin']);
    expect(put.code, put.stderr).toBe(0);
    const out = path.join(c.dir, 'out.bin');
    const get = await c.cli(['get', '/f.bin', out]);
    expect(get.code, get.stderr).toBe(0);
    expect(fs.readFileSync(out).equals(data)).toBe(true);
  });

  it('refuses the CLI with a wrong token from the environment, saying what to do', async () => {
    const r = await run(process.execPath, [path.resolve('bin/blockmirror.js'), 'cfs', 'ls', '/', '-c', c.config], { env: { BLOCKMIRROR_CFS_TOKEN: 'x'.repeat(32) } });
    expect(r.code).not.toBe(0);
    expect(r.stderr).toContain('this CFS server needs its token (cfs.tokenFile, or BLOCKMIRROR_CFS_TOKEN)');
  });

  it('refuses, on the server, a path longer than PATH_MAX with ENAMETOOLONG', async () => {
    const r = await raw([{ id: 1, op: 'hello', version: 1, client: 'test', token }, { id: 2, op: 'stat', path: `/${'a/'.repeat(2100)}` }]);
    const byId = r.replies.sort((a, b) => (a.id as number) - (b.id as number));
    expect(byId[0]).toMatchObject({ id: 1, ok: true });
    expect(byId[1]).toEqual({ id: 2, ok: false, code: 'ENAMETOOLONG', message: 'path longer than 4096 bytes' });
  });
});

// NBD over TLS (STARTTLS) and per-export access lists, with real clients: nbdinfo, nbdcopy,
// qemu-img/qemu-io and fio through libnbd and GnuTLS, our own client, X.509 and PSK on one port.
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Opt, Rep, ClientFlag } from '../src/protocol/constants.js';
import { connect } from '../src/nbd/client.js';
import { makePki, type Pki } from './helpers/pki.js';
import { RawClient, goData } from './helpers/raw.js';
import { freePort, run, startUp, tmpDir, type RunningCluster } from './helpers/servers.js';
import { fio, pseudoRandom, firstDifference } from './helpers/clients.js';

const MiB = 1024 * 1024;
let pki: Pki;
let up: RunningCluster;
let port: number;
let port2: number;
let dir: string;
let psk: { path: string; keys: Record<string, string> };
let looseKey: string;

beforeAll(async () => {
  pki = makePki();
  dir = tmpDir('bm-tls-');
  port = await freePort();
  port2 = await freePort();
  const admin = await freePort();
  const admin2 = await freePort();
  const server = pki.cert('localhost');
  psk = pki.pskFile('keys.psk', { alice: undefined, bob: undefined });
  // Storage system 2's key is readable by everyone: it is used, with one warning.
  looseKey = path.join(dir, 'loose-key.pem');
  fs.copyFileSync(server.key, looseKey);
  fs.chmodSync(looseKey, 0o644);
  fs.writeFileSync(
    path.join(dir, 'cluster.yaml'),
    `security:
  ca: ${pki.ca}
storageSystems:
  - id: 1
    nbd: 127.0.0.1:${port}
    admin: 127.0.0.1:${admin}
    tls: { mode: require, cert: ${server.cert}, key: ${server.key}, pskFile: ${psk.path}, verifyClients: true }
    volumes:
      - { id: 1, size: 16MiB }
      - { id: 2, size: 16MiB, allow: [ alice ] }
      - { id: 3, size: 16MiB, allow: [ 10.9.9.0/24 ] }
  - id: 2
    nbd: 127.0.0.1:${port2}
    admin: 127.0.0.1:${admin2}
    tls: { mode: require, cert: ${server.cert}, key: ${looseKey} }
    volumes:
      - { id: 1, size: 16MiB }
`,
  );
  up = await startUp(path.join(dir, 'cluster.yaml'), [port, admin, port2, admin2], ['--log-level', 'info']);
});

afterAll(async () => {
  await up?.stop();
  pki?.cleanup();
  fs.rmSync(dir, { recursive: true, force: true });
});

const pskUri = (id: string, vol: number, file = psk.path) => `nbds://${id}@127.0.0.1:${port}/vol${vol}?tls-psk-file=${file}`;
const certUri = (name: string, vol: number) => `nbds://127.0.0.1:${port}/vol${vol}?tls-certificates=${pki.clientDir(name)}`;

async function plainOption(option: number, data?: Buffer) {
  const c = await RawClient.connect({ host: '127.0.0.1', port });
  try {
    await c.readGreeting();
    c.sendClientFlags(ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES);
    return await c.option(option, data);
  } finally {
    c.destroy();
  }
}

describe('tls: require', () => {
  it('answers LIST and GO in the clear with NBD_REP_ERR_TLS_REQD, listing no export', async () => {
    const list = await plainOption(Opt.LIST);
    expect(list.map((r) => r.type)).toEqual([Rep.ERR_TLS_REQD]);
    const go = await plainOption(Opt.GO, goData('vol1'));
    expect(go.map((r) => r.type)).toEqual([Rep.ERR_TLS_REQD]);
    expect(go[0]!.data.toString()).toBe('this server requires TLS: connect with nbds:// (or --tls)');
    const r = await run('nbdinfo', ['--list', `nbd://127.0.0.1:${port}`]);
    expect(r.code).not.toBe(0);
    expect(r.stdout).not.toContain('vol1');
  });

  it('lets nbdinfo in with a PSK, and lists only the exports the identity may use', async () => {
    const r = await run('nbdinfo', ['--list', '--json', pskUri('alice', 1)]);
    expect(r.code, r.stderr).toBe(0);
    const names = (JSON.parse(r.stdout).exports as { 'export-name': string }[]).map((e) => e['export-name']).sort();
    expect(names).toEqual(['vol1', 'vol2']);
    const b = await run('nbdinfo', ['--list', '--json', pskUri('bob', 1)]);
    expect((JSON.parse(b.stdout).exports as { 'export-name': string }[]).map((e) => e['export-name'])).toEqual(['vol1']);
  });

  it('fails the handshake for a wrong PSK, an unknown identity and a certificate from a foreign CA', async () => {
    const wrong = pki.pskFile('wrong.psk', { alice: 'ab'.repeat(32) });
    const stranger = pki.pskFile('stranger.psk', { mallory: undefined });
    for (const uri of [pskUri('alice', 1, wrong.path), pskUri('mallory', 1, stranger.path)]) {
      const r = await run('nbdinfo', [uri]);
      expect(r.code, uri).not.toBe(0);
      expect(r.stdout).not.toContain('export-size');
    }
    // A client certificate signed by another CA: GnuTLS sends none, the server refuses "no certificate and no PSK".
    const foreign = pki.clientDir('foreign-alice');
    fs.copyFileSync(pki.ca, path.join(foreign, 'ca-cert.pem'));
    const f = await run('nbdinfo', [`nbds://127.0.0.1:${port}/vol1?tls-certificates=${foreign}`]);
    expect(f.code).not.toBe(0);
    // The server's log line may reach us after nbdinfo has exited (a stress run under load saw that): wait for it.
    await expect.poll(() => up.stderr(), { timeout: 15_000 }).toContain('the client presented neither a certificate signed by the configured CA nor a known PSK');
  });

  it('carries data written by qemu-io with an X.509 client certificate to nbdcopy with a PSK, byte for byte', async () => {
    const cdir = pki.clientDir('alice');
    const tlsObj = `tls-creds-x509,id=tls0,endpoint=client,dir=${cdir}`;
    const w = await run('qemu-io', ['--object', tlsObj, '--image-opts', `driver=raw,file.driver=nbd,file.host=127.0.0.1,file.port=${port},file.export=vol2,file.tls-creds=tls0`, '-c', 'write -P 0x5a 1M 3M']);
    expect(w.code, w.stderr).toBe(0);
    const out = path.join(dir, 'copy.img');
    const c = await run('nbdcopy', [pskUri('alice', 2), out]);
    expect(c.code, c.stderr).toBe(0);
    const got = fs.readFileSync(out);
    const want = Buffer.alloc(16 * MiB);
    want.fill(0x5a, 1 * MiB, 4 * MiB);
    expect(firstDifference(got, want)).toBe(-1);
  });

  it('serves qemu-img with a PSK credential directory', async () => {
    const pdir = path.join(dir, 'qemu-psk');
    fs.mkdirSync(pdir, { recursive: true });
    fs.copyFileSync(psk.path, path.join(pdir, 'keys.psk'));
    const r = await run('qemu-img', ['info', '--output=json', '--object', `tls-creds-psk,id=tls0,endpoint=client,dir=${pdir},username=bob`, '--image-opts', `driver=nbd,host=127.0.0.1,port=${port},export=vol1,tls-creds=tls0`]);
    expect(r.code, r.stderr).toBe(0);
    expect(JSON.parse(r.stdout)['virtual-size']).toBe(16 * MiB);
  });

  it('runs fio with crc32c verify over nbds:// through libnbd, on a server that does not ask for client certificates', async () => {
    // fio's nbd engine refuses credential files named in the URI, so it runs anonymously over TLS.
    const jobs = await fio(`nbds://127.0.0.1:${port2}/vol1`, dir, ['--name=tls', '--rw=randwrite', '--bs=4k', '--iodepth=8', '--size=4M', '--verify=crc32c', '--do_verify=1']);
    expect(jobs.map((j) => [j.error, j.write.io_bytes, j.read.io_bytes])).toEqual([[0, 4 * MiB, 4 * MiB]]);
    const plain = await run('nbdinfo', [`nbd://127.0.0.1:${port2}/vol1`]);
    expect(plain.code).not.toBe(0);
  });

  it('speaks TLS from our own client, with a certificate and with a PSK, and refuses TLS to a server without it', async () => {
    const data = pseudoRandom(256 * 1024, 7);
    const a = await connect(certUri('alice', 1));
    await a.pwrite(data, 8 * MiB);
    await a.disconnect();
    const b = await connect(pskUri('bob', 1));
    const back = Buffer.alloc(data.length);
    await b.pread(back, 8 * MiB);
    await b.disconnect();
    expect(back.equals(data)).toBe(true);
    // TLS records are decrypted into Node's buffers: the payload was copied, never read in place.
    expect(b.readBytes).toEqual({ direct: 0, copied: data.length });
    await expect(connect(`nbd://127.0.0.1:${port}/vol1`)).rejects.toThrow(/requires TLS/);
  });
});

describe('allow lists', () => {
  it('answers a client outside an export list with NBD_REP_ERR_POLICY, and logs the refusal once', async () => {
    for (let i = 0; i < 2; i++) {
      const r = await run('nbdinfo', [pskUri('alice', 3)]);
      expect(r.code).not.toBe(0);
    }
    await expect(connect(pskUri('alice', 3))).rejects.toThrow(/access to export vol3 is not allowed for this client/);
    await expect(connect(pskUri('bob', 2))).rejects.toThrow(/access to export vol2 is not allowed for this client/);
    const lines = up.stderr().split('\n').filter((l) => l.includes('refused 127.0.0.1 (alice) access to export vol3: not in its allow list'));
    expect(lines).toHaveLength(1);
    // The keys themselves never reach the log.
    for (const key of Object.values(psk.keys)) expect(up.stderr()).not.toContain(key);
  });
});

describe('key files', () => {
  it('warns once about a private key other users can read, naming the file and the fix', () => {
    const lines = up.stderr().split('\n').filter((l) => l.includes(`the private key ${looseKey} is readable by other users; chmod 600 ${looseKey}`));
    expect(lines).toHaveLength(1);
    expect(up.stderr()).not.toContain(fs.readFileSync(looseKey, 'utf8').split('\n')[1]!);
  });
});

describe('serve and gateway TLS options', () => {
  it('refuses to listen on another network without --tls require, and TLS without a credential, with one line', async () => {
    const { CLI } = await import('./helpers/servers.js');
    const cases: [string[], string][] = [
      [['serve', '--size', '1MiB', '--listen', '0.0.0.0:0'], 'blockmirror: --listen 0.0.0.0:0 is reachable from other hosts without TLS: add --tls require with --tls-certificates or --tls-psk, or --insecure to accept the risk\n'],
      [['serve', '--size', '1MiB', '--tls', 'require'], 'blockmirror: --tls require needs --tls-certificates DIR or --tls-psk FILE\n'],
      [['serve', '--size', '1MiB', '--tls', 'maybe'], 'blockmirror: --tls: expected off, allow or require, got "maybe"\n'],
      [['serve', '--size', '1MiB', '--allow', '10.0.0.0/40'], 'blockmirror: --allow: "10.0.0.0/40" has a prefix longer than 32 bits\n'],
      [['serve', '--size', '1MiB', '--tls', 'require', '--tls-psk', '/nonexistent.psk'], 'blockmirror: cannot read the psk file /nonexistent.psk: ENOENT\n'],
    ];
    for (const [args, msg] of cases) {
      const r = await run(process.execPath, [CLI, ...args]);
      expect([r.code, r.stderr], args.join(' ')).toEqual([2, msg]);
    }
  });
});

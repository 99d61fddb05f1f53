// The peer channel as an attacker on the same network sees it, with mutual TLS configured: a
// stranger without credentials, a storage system's certificate used to speak for another, a
// certificate from a foreign CA, replication data through the host-facing port, and a replayed
// swap from an old epoch. Each is refused and logged; the pair's state and every byte on both
// sides stay as they were.
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import tls from 'node:tls';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { encodeFrame, FrameReader } from '../src/controller/peer/framing.js';
import { PROTOCOL_VERSION } from '../src/controller/peer/messages.js';
import { makePki, type Pki } from './helpers/pki.js';
import { SSProcess, inSync, loopbackAddrs, qemuIo, sameBytes, twoSSYaml, writeConfig, type SSAddr } from './helpers/remote.js';
import { run } from './helpers/servers.js';

let pki: Pki;
let dir: string;
let ss1: SSProcess;
let ss2: SSProcess;
let b: SSAddr;

beforeAll(async () => {
  pki = makePki();
  const [a, bb] = await loopbackAddrs();
  b = bb;
  const cfg = writeConfig(twoSSYaml(a, b, [{ name: 'p', mode: 'sync', vol: 1 }], { peerTimeout: '1s', tls: { ca: pki.ca, certs: { 1: pki.cert('ss1'), 2: pki.cert('ss2') } } }));
  dir = cfg.dir;
  ss1 = new SSProcess(1, cfg.file, a);
  ss2 = new SSProcess(2, cfg.file, b);
  await Promise.all([ss1.start(), ss2.start()]);
  await ss1.waitPair('p', inSync, 'PAIR');
  const w = await qemuIo(ss1.uri(1), ['write -P 0x37 0 1M', 'write -P 0x38 3M 512k']);
  expect(w.code, w.stderr).toBe(0);
  await ss1.waitPair('p', inSync, 'PAIR');
});

afterAll(async () => {
  await Promise.all([ss1?.kill(), ss2?.kill()]);
  pki?.cleanup();
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

/** Send frames on a socket, collect what comes back until the peer closes (or `ms` pass). */
function converse(socket: net.Socket, frames: object[], readyEvent: string, ms = 3000): Promise<{ frames: unknown[]; closed: boolean; error?: string }> {
  return new Promise((resolve) => {
    const reader = new FrameReader();
    const got: unknown[] = [];
    let error: string | undefined;
    const done = (closed: boolean) => {
      clearTimeout(t);
      socket.destroy();
      resolve({ frames: got, closed, ...(error ? { error } : {}) });
    };
    const t = setTimeout(() => done(false), ms);
    socket.on('data', (c: Buffer) => {
      try {
        for (const text of reader.push(c)) got.push(JSON.parse(text));
      } catch {
        got.push('<not a frame>');
      }
    });
    socket.on('error', (e) => (error = e.message));
    socket.on('close', () => done(true));
    socket.once(readyEvent, () => {
      for (const f of frames) socket.write(encodeFrame(f));
    });
  });
}

const asPeer = (name: string) => {
  const c = pki.cert(name);
  return tls.connect({ host: '127.0.0.1', port: b.peer, cert: fs.readFileSync(c.cert), key: fs.readFileSync(c.key), ca: fs.readFileSync(pki.ca), checkServerIdentity: () => undefined });
};

describe('a hostile peer', () => {
  it('gets nothing without credentials: a plaintext hello is not even TLS', async () => {
    const r = await converse(net.connect({ host: '127.0.0.1', port: b.peer }), [{ t: 'hello', v: PROTOCOL_VERSION, from: 1, to: 2 }], 'connect');
    expect(r.closed).toBe(true);
    expect(r.frames).toEqual([]);
  });

  it("cannot speak for storage system 1 with storage system 3's certificate, for control or for data", async () => {
    const hello = await converse(asPeer('ss3'), [{ t: 'hello', v: PROTOCOL_VERSION, from: 1, to: 2 }], 'secureConnect');
    expect(hello).toMatchObject({ closed: true, frames: [] });
    const data = await converse(asPeer('ss3'), [{ t: 'data', v: PROTOCOL_VERSION, from: 3, to: 2, export: 'vol1' }], 'secureConnect');
    expect(data).toMatchObject({ closed: true, frames: [] });
    expect(ss2.stderr).toContain('its certificate says storage system 3, but its hello frame claims to come from 1');
    expect(ss2.stderr).toContain('a data connection from storage system 3 to 2, which shares no pair with storage system 2');
  });

  it('is refused the TLS handshake with a certificate from a foreign CA', async () => {
    const r = await converse(asPeer('foreign-ss1'), [{ t: 'hello', v: PROTOCOL_VERSION, from: 1, to: 2 }], 'secureConnect');
    expect(r.closed).toBe(true);
    expect(r.frames).toEqual([]);
    expect(ss2.stderr).toMatch(/peer channel: refused a connection from 127\.0\.0\.1:\d+: TLS: /);
  });

  it('finds no replication export on the host-facing NBD port, listed or guessed', async () => {
    const list = await run('nbdinfo', ['--list', '--json', `nbd://127.0.0.1:${b.nbd}`]);
    expect((JSON.parse(list.stdout) as { exports: { 'export-name': string }[] }).exports.map((e) => e['export-name'])).toEqual(['vol1']);
    const guess = await qemuIo(`nbd://127.0.0.1:${b.nbd}/.replication%2Fvol1%2F00000000000000000000000000000000`, ['write -P 1 0 4k']);
    expect(guess.code).not.toBe(0);
  });

  it('cannot promote the mirror by replaying a swap from the current epoch, even with the master\'s credential', async () => {
    const r = await converse(asPeer('ss1'), [{ t: 'hello', v: PROTOCOL_VERSION, from: 1, to: 2 }, { t: 'req', id: 1, op: 'swap', pair: 'p', epoch: 1 }], 'secureConnect', 3000);
    expect(r.frames).toContainEqual({ t: 'res', id: 1, ok: false, error: 'p: refused a swap to epoch 1: the pair is in epoch 1, so the next is 2' });
  });

  it('leaves the pair in sync and both copies byte for byte equal', async () => {
    const p = await ss1.waitPair('p', inSync, 'PAIR again');
    expect(p.epoch).toBe(1);
    expect((await ss2.pair('p'))?.role).toBe('mirror');
    expect(await sameBytes(ss1.volumeFile(dir, 1), ss2.volumeFile(dir, 1))).toBe(true);
    const back = await run('qemu-io', ['-f', 'raw', '-r', '-c', 'read -P 0x37 0 1M', '-c', 'read -P 0x38 3M 512k', ss2.uri(1)]);
    expect(back.code, back.stdout + back.stderr).toBe(0);
  });
});

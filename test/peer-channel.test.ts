// The replication control channel (src/controller/peer/): frames parse the same however the
// bytes are split; a live storage system shrugs off garbage, truncated, oversized and malformed
// frames with a logged reason and a closed connection, and its pairs and data stay as they were;
// link faults (delay, drop, reset) do what they say, end to end.
import net from 'node:net';
import { afterEach, describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { FrameReader, encodeFrame } from '../src/controller/peer/framing.js';
import { BadFrame, parseFrame, parseRequest } from '../src/controller/peer/messages.js';
import { SSProcess, loopbackAddrs, qemuIo, sameBytes, twoSSYaml, writeConfig, type SSAddr } from './helpers/remote.js';
import { CLI, run } from './helpers/servers.js';

describe('frames', () => {
  it('parse to the same frames whether the bytes come whole, one by one or in random splits', () => {
    const msgs = [{ t: 'ping' }, { t: 'req', id: 1, op: 'bits', pair: 'p', ops: [['i', 1, 2]] }, { t: 'res', id: 1, ok: true }, { t: 'req', id: 2, op: 'resync', pair: 'p'.repeat(60) }];
    const stream = Buffer.concat(msgs.map(encodeFrame));
    const whole = new FrameReader().push(stream);
    expect(whole.map((t) => JSON.parse(t))).toEqual(msgs);
    const bytewise = new FrameReader();
    const one: string[] = [];
    for (let i = 0; i < stream.length; i++) one.push(...bytewise.push(stream.subarray(i, i + 1)));
    expect(one).toEqual(whole);
    fc.assert(
      fc.property(fc.array(fc.integer({ min: 1, max: stream.length }), { maxLength: 20 }), (cuts) => {
        const r = new FrameReader();
        const out: string[] = [];
        let at = 0;
        for (const c of [...new Set(cuts)].sort((a, b) => a - b)) {
          out.push(...r.push(stream.subarray(at, c)));
          at = c;
        }
        out.push(...r.push(stream.subarray(at)));
        expect(out).toEqual(whole);
        expect(r.buffered).toBe(0);
      }),
    );
  });

  it('refuses an oversized frame from its length alone, before buffering it', () => {
    const r = new FrameReader(1024);
    const head = Buffer.alloc(4);
    head.writeUInt32BE(1_000_000);
    expect(() => r.push(head)).toThrow(new BadFrame('an oversized frame (1000000 bytes, the limit is 1024)'));
  });

  it('names what is wrong with a frame that is not one of ours', () => {
    expect(() => parseFrame('{"t":')).toThrow('a frame that is not JSON');
    expect(() => parseFrame('[1,2]')).toThrow('a frame that is not a JSON object');
    expect(() => parseFrame('{"t":"launch"}')).toThrow('a frame of unknown type "launch"');
    expect(() => parseFrame('{"t":"req","id":1,"op":"format"}')).toThrow(/a malformed req frame \(op: Invalid option/);
    expect(() => parseRequest('attach', { pair: 'p', epoch: 'one', master: 1, vol: 2 })).toThrow(/a malformed attach request \(epoch: /);
    expect(() => parseRequest('bits', { pair: 'p', ops: [['x', 1]] })).toThrow(/a malformed bits request/);
    expect(parseRequest('bits', { pair: 'p', ops: [['i', 1, 5], ['v', 3]] })).toEqual({ pair: 'p', ops: [['i', 1, 5], ['v', 3]] });
  });
});

const procs: SSProcess[] = [];
afterEach(async () => {
  await Promise.all(procs.splice(0).map((p) => p.kill()));
});

async function pairOfTwo(mode: 'sync' | 'async' = 'sync') {
  const [a, b] = await loopbackAddrs();
  const cfg = writeConfig(twoSSYaml(a, b, [{ name: 'p', mode, vol: 1 }], { peerTimeout: '1s' }));
  const ss1 = new SSProcess(1, cfg.file, a);
  const ss2 = new SSProcess(2, cfg.file, b);
  procs.push(ss1, ss2);
  await ss1.start();
  await ss2.start();
  await ss1.waitPair('p', (x) => x.state === 'PAIR', 'PAIR');
  return { a, b, cfg, ss1, ss2 };
}

/** Open a connection to a peer port, send bytes, and resolve when the other side closes it (or after `ms`). */
function hostile(addr: SSAddr, bytes: Buffer[], ms = 5000): Promise<{ closed: boolean; got: Buffer }> {
  return new Promise((resolve) => {
    const s = net.connect({ host: addr.host, port: addr.peer });
    const got: Buffer[] = [];
    const timer = setTimeout(() => {
      s.destroy();
      resolve({ closed: false, got: Buffer.concat(got) });
    }, ms);
    s.on('data', (d) => got.push(d));
    s.on('error', () => {});
    s.on('close', () => {
      clearTimeout(timer);
      resolve({ closed: true, got: Buffer.concat(got) });
    });
    s.on('connect', () => {
      for (const b of bytes) s.write(b);
    });
  });
}

describe('a live storage system on its peer port', () => {
  it('closes connections that send garbage, truncated, oversized or out-of-order frames, logs why, and keeps its pair and data', async () => {
    const { a, b, cfg, ss1, ss2 } = await pairOfTwo();
    expect((await qemuIo(ss1.uri(1), ['write -P 0x61 0 1M'])).code).toBe(0);
    const big = Buffer.alloc(4);
    big.writeUInt32BE(64 * 1024 * 1024);
    const attempts: [string, Buffer[]][] = [
      ['garbage', [Buffer.from('GET / HTTP/1.1\r\nHost: x\r\n\r\n')]],
      ['oversized', [big]],
      ['not JSON', [encodeFrame({}).subarray(0, 4), Buffer.from('{{{{')]],
      ['an unknown frame', [encodeFrame({ t: 'launch' })]],
      ['a request before any hello', [encodeFrame({ t: 'req', id: 1, op: 'swap', pair: 'p', epoch: 9 })]],
      ['a hello without a protocol version', [encodeFrame({ t: 'hello', from: 1, to: 2 })]],
      ['a hello from another protocol version', [encodeFrame({ t: 'hello', v: 1, from: 1, to: 2 })]],
      ['a hello in the wrong direction', [encodeFrame({ t: 'hello', v: 2, from: 2, to: 1 })]],
    ];
    for (const [what, bytes] of attempts) {
      const r = await hostile(b, bytes);
      expect(r.closed, what).toBe(true);
      expect(r.got.length, what).toBe(0);
    }
    const r = await hostile(a, [encodeFrame({ t: 'hello', v: 2, from: 2, to: 1 }), encodeFrame({ t: 'req', id: 7, op: 'swap', pair: 'p', epoch: 9 })]);
    expect(r.closed).toBe(true);
    // A truncated frame: the connection just waits for the rest; the storage system is unharmed.
    const t = await hostile(b, [Buffer.from([0, 0, 0, 50, 0x7b])], 300);
    expect(t.closed).toBe(false);
    for (let i = 0; i < 100 && !ss2.stderr.includes('refused a connection'); i++) await new Promise((res) => setTimeout(res, 20));
    expect(ss2.stderr).toContain('peer channel: refused a connection from');
    expect(ss2.stderr).toContain('an oversized frame (1195725856 bytes, the limit is 4096)'); // "GET " read as a length
    expect(ss2.stderr).toContain('an oversized frame (67108864 bytes, the limit is 4096)');
    expect(ss2.stderr).toContain('a frame of unknown type \\"launch\\"');
    expect(ss2.stderr).toContain('a req frame before any hello');
    expect(ss2.stderr).toContain('a malformed hello frame (v: ');
    expect(ss2.stderr).toContain('protocol version 1; this storage system speaks 2');
    expect(ss2.stderr).toContain('a hello from storage system 2 to 1, which is not a peer that dials storage system 2');
    const p = await ss1.waitPair('p', (x) => x.state === 'PAIR' && x.epoch === 1 && x.role === 'master', 'PAIR, epoch 1, on SS 1');
    expect(p.mirrors[0]!.connected).toBe(true);
    expect((await ss2.pair('p'))?.role).toBe('mirror');
    expect((await qemuIo(ss1.uri(1), ['write -P 0x62 1M 1M'])).code).toBe(0);
    const back = await qemuIo(ss2.uri(1), ['read -P 0x61 0 1M', 'read -P 0x62 1M 1M'], true);
    expect(back.stdout + back.stderr).not.toMatch(/fail|error/i);
    await ss1.kill('SIGTERM');
    await ss2.kill('SIGTERM');
    expect(await sameBytes(ss1.volumeFile(cfg.dir, 1), ss2.volumeFile(cfg.dir, 1))).toBe(true);
  });

  it('suspends a sync pair when its link is cut silently (drop), keeps writing, and resyncs after the fault is cleared', async () => {
    const { cfg, ss1, ss2 } = await pairOfTwo();
    const set = await run(process.execPath, [CLI, 'fault', 'set', '-c', cfg.file, 'link:1-2', 'drop']);
    expect(set.code, set.stderr).toBe(0);
    expect(set.stdout).toBe('link:1-2: drop (silent cut)\n');
    const w = await qemuIo(ss1.uri(1), ['write -P 0x71 0 512k']);
    expect(w.code, w.stderr).toBe(0);
    const down = await ss1.waitPair('p', (x) => x.state === 'PSUE', 'PSUE');
    expect(down.error).toMatch(/unreachable|cut|silent/);
    expect((await run(process.execPath, [CLI, 'fault', 'clear', '-c', cfg.file, 'link:1-2'])).code).toBe(0);
    await ss1.waitPair('p', (x) => x.state === 'PAIR' && x.mirrors[0]!.connected === true, 'PAIR again');
    await ss1.kill('SIGTERM');
    await ss2.kill('SIGTERM');
    expect(await sameBytes(ss1.volumeFile(cfg.dir, 1), ss2.volumeFile(cfg.dir, 1))).toBe(true);
  });

  it('resets the link and refuses redials until cleared, then resyncs; a delay slows but loses nothing', async () => {
    const { cfg, ss1, ss2 } = await pairOfTwo();
    expect((await run(process.execPath, [CLI, 'fault', 'set', '-c', cfg.file, 'link:1-2', 'reset'])).code).toBe(0);
    await ss1.waitPair('p', (x) => x.state === 'PSUE', 'PSUE');
    expect((await qemuIo(ss1.uri(1), ['write -P 0x81 0 256k'])).code).toBe(0);
    const list = await run(process.execPath, [CLI, 'fault', 'list', '-c', cfg.file]);
    expect(list.stdout).toBe('link:1-2: reset\n');
    expect((await run(process.execPath, [CLI, 'fault', 'set', '-c', cfg.file, 'link:1-2', 'delay', '--ms', '20'])).code).toBe(0);
    await ss1.waitPair('p', (x) => x.state === 'PAIR' && x.mirrors[0]!.connected === true, 'PAIR again under delay');
    const w = await qemuIo(ss1.uri(1), ['write -P 0x82 1M 256k']);
    expect(w.code).toBe(0);
    const r = await qemuIo(ss2.uri(1), ['read -P 0x81 0 256k', 'read -P 0x82 1M 256k'], true);
    expect(r.stdout + r.stderr).not.toMatch(/fail|error/i);
    expect((await run(process.execPath, [CLI, 'fault', 'clear', '-c', cfg.file, 'link:1-2'])).code).toBe(0);
    await ss1.kill('SIGTERM');
    await ss2.kill('SIGTERM');
    expect(await sameBytes(ss1.volumeFile(cfg.dir, 1), ss2.volumeFile(cfg.dir, 1))).toBe(true);
  });
});

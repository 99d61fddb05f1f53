// Hostile and malformed input over raw sockets. Every case ends with a fresh,
// well-behaved client writing and reading on the same server process
// (afterEach), because the one property that matters most here is that one
// bad client can never take the server, or anyone else's data, down with it.
import { describe, it, expect, beforeAll, afterAll, afterEach } from 'vitest';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import {
  HandshakeFlag, ClientFlag, Opt, Rep, Info, Cmd, CmdFlag, TransmissionFlag, IHAVEOPT,
  MAX_PAYLOAD, REQUEST_MAGIC, isErrorReply, nameOf,
} from '../src/protocol/constants.js';
import {
  RawClient, ConnectionClosedError, ReadTimeoutError, openSession, readAt, writeAt, goData, metaContextData,
  encodeOption, encodeRequest, startTarget, assertHealthy, rssBytes, type Target, type Reply, type Session, type Request,
} from './helpers/raw.js';
import { tmpDir } from './helpers/servers.js';

const MiB = 1024 * 1024;
const U64_MAX = (1n << 64n) - 1n;

let t: Target;
const clients: RawClient[] = [];

beforeAll(async () => {
  t = await startTarget({ sizeMiB: 64 });
});

afterAll(async () => {
  await t?.stop();
});

afterEach(async () => {
  for (const c of clients.splice(0)) c.destroy();
  await assertHealthy(t);
});

/** Connects, checks the greeting offers fixed newstyle + NO_ZEROES, sends `flags`. */
async function negotiating(flags: number = ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES): Promise<RawClient> {
  const c = await RawClient.connect(t);
  clients.push(c);
  const hs = await c.readGreeting();
  expect(hs & HandshakeFlag.FIXED_NEWSTYLE, 'server offers FIXED_NEWSTYLE').toBeTruthy();
  expect(hs & HandshakeFlag.NO_ZEROES, 'server offers NO_ZEROES').toBeTruthy();
  c.sendClientFlags(flags);
  return c;
}

async function session(structured: boolean, metaContext = false): Promise<Session> {
  const s = await openSession(t, { name: t.exportName, structured, metaContext });
  clients.push(s.client);
  return s;
}

const last = (rs: { type: number }[]): string => nameOf('rep', rs[rs.length - 1].type);

/** After a refused option: GO on the real export still succeeds and a READ works, i.e. the stream is in sync. */
async function expectGoWorks(c: RawClient): Promise<void> {
  const go = await c.go(t.exportName);
  expect(nameOf('rep', go.final)).toBe('ACK');
  expect(go.export?.size).toBe(t.size);
  const r = await c.request({ type: Cmd.READ, cookie: 77n, offset: 0n, length: 512 });
  expect(r.error).toBe(0);
  expect(r.data?.length).toBe(512);
}

/** Outcome of waiting for one reply: the reply, the server closing, or nothing at all. */
async function replyOrClose(c: RawClient, ms: number): Promise<Reply | 'closed' | 'silence'> {
  try {
    return await c.nextReply(ms);
  } catch (e) {
    if (e instanceof ConnectionClosedError) return 'closed';
    if (e instanceof ReadTimeoutError) return 'silence';
    throw e;
  }
}

const errName = (r: Reply): string => (r.error === 0 ? 'OK' : nameOf('err', r.error));

describe('handshake phase', () => {
  it('closes the connection when the client answers the greeting with random bytes instead of client flags', async () => {
    const g = await RawClient.connect(t);
    clients.push(g);
    await g.readGreeting();
    const junk = randomBytes(64);
    junk[0] |= 0x80; // make sure the would-be flags word has unknown bits
    g.write(junk);
    expect(await g.waitClosed(3000), 'server closed after garbage flags').toBe(true);
  });

  it('closes the connection on client flags with unknown bits set', async () => {
    for (const flags of [ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES | (1 << 2), 0x80000000]) {
      const c = await negotiating(flags);
      expect(await c.waitClosed(3000), `server closed after client flags 0x${flags.toString(16)}`).toBe(true);
    }
  });

  it('closes the connection when an option does not start with IHAVEOPT', async () => {
    const c = await negotiating();
    const bad = encodeOption(Opt.GO, goData(t.exportName));
    bad.writeBigUInt64BE(IHAVEOPT ^ 1n, 0);
    c.write(bad);
    expect(await c.waitClosed(3000), 'server closed after a bad option magic').toBe(true);
  });

  it('answers ERR_UNSUP to unknown options, swallowing their data, and keeps the stream in sync', async () => {
    const c = await negotiating();
    // The data of one unknown option is a complete, valid GO: a server that
    // does not consume it would start transmission instead of replying.
    const embeddedGo = encodeOption(Opt.GO, goData(t.exportName));
    const cases: [number, Buffer][] = [
      [0x7654321, Buffer.from('nbd-tester-client probe')],
      [Opt.PEEK_EXPORT, Buffer.alloc(0)],
      [Opt.EXTENDED_HEADERS, Buffer.alloc(0)], // not implemented (yet): nbd.md §0 says ERR_UNSUP
      [12, randomBytes(1000)],
      [0x7fffffff, embeddedGo],
      [0xffffffff, Buffer.alloc(0)],
    ];
    for (const [opt, data] of cases) {
      const rs = await c.option(opt, data);
      expect(rs.map((r) => [r.option >>> 0, nameOf('rep', r.type)]), `option ${opt}`).toEqual([[opt >>> 0, 'ERR_UNSUP']]);
    }
    await expectGoWorks(c);
  });

  it('never allocates an option\'s declared 4 GiB length: it closes or keeps draining, and serves others meanwhile', async () => {
    const pid = t.proc.pid!;
    const before = await rssBytes(pid);
    const c1 = await negotiating();
    c1.sendRawOption(0x7654321, 0xfffffff0, randomBytes(MiB));
    const c2 = await negotiating();
    c2.sendRawOption(Opt.GO, 0x7fffffff, goData(t.exportName));
    const c3 = await negotiating();
    c3.sendRawOption(Opt.LIST, 0xffffffff, Buffer.alloc(100));
    // While those hang (or are closed), another client works.
    await assertHealthy(t);
    const closed = await Promise.all([c1, c2, c3].map((c) => c.waitClosed(1000)));
    // Without the declared data the only correct answers are silence (still draining) or a close.
    [c1, c2, c3].forEach((c, i) => {
      if (!closed[i]) expect(c.queue.length, `client ${i + 1}: no reply before the declared data arrived`).toBe(0);
    });
    const grew = (await rssBytes(pid)) - before;
    expect(grew, `server RSS grew by ${grew} bytes`).toBeLessThan(256 * MiB);
  });

  it('answers an over-long option whose data is all sent with an error (or closes), and stays in sync if it answered', async () => {
    for (const opt of [0x7654321, Opt.GO, Opt.SET_META_CONTEXT]) {
      const c = await negotiating();
      c.sendOption(opt, Buffer.alloc(128 * 1024, 0x41));
      let rs;
      try {
        rs = await c.optionReplies();
      } catch (e) {
        if (e instanceof ConnectionClosedError) continue;
        throw e;
      }
      expect(rs.length, `${nameOf('opt', opt)}: one reply`).toBe(1);
      expect(isErrorReply(rs[0].type), `${nameOf('opt', opt)}: got ${nameOf('rep', rs[0].type)}`).toBe(true);
      await expectGoWorks(c);
    }
  });

  it('answers ERR_INVALID to LIST with data, then lists the export with its description', async () => {
    const c = await negotiating();
    const bad = await c.option(Opt.LIST, Buffer.from('junk'));
    expect(bad.map((r) => nameOf('rep', r.type))).toEqual(['ERR_INVALID']);
    const list = await c.option(Opt.LIST);
    expect(last(list)).toBe('ACK');
    const servers = list.filter((r) => r.type === Rep.SERVER).map((r) => {
      const n = r.data.readUInt32BE(0);
      return { name: r.data.subarray(4, 4 + n).toString(), description: r.data.subarray(4 + n).toString() };
    });
    expect(servers).toEqual([{ name: t.exportName, description: t.description }]);
    await expectGoWorks(c);
  });

  it('answers ERR_POLICY to STARTTLS, as a server without TLS, and stays in sync', async () => {
    const c = await negotiating();
    const rs = await c.option(Opt.STARTTLS);
    expect(rs.map((r) => nameOf('rep', r.type))).toEqual(['ERR_POLICY']);
    await expectGoWorks(c);
  });

  it('answers ERR_UNKNOWN with no INFO before it to INFO and GO for an unknown export, then GO for the right name works', async () => {
    const c = await negotiating();
    for (const opt of [Opt.INFO, Opt.GO]) {
      const rs = await c.option(opt, goData('no-such-export', [Info.NAME, Info.DESCRIPTION, Info.BLOCK_SIZE]));
      expect(rs.map((r) => nameOf('rep', r.type)), nameOf('opt', opt)).toEqual(['ERR_UNKNOWN']);
    }
    await expectGoWorks(c);
  });

  it('maps the default export "" to the named export', async () => {
    const c = await negotiating();
    const go = await c.go('', [Info.NAME]);
    expect(nameOf('rep', go.final)).toBe('ACK');
    expect(go.export?.size).toBe(t.size);
  });

  it('answers ERR_INVALID to malformed INFO/GO and meta-context options and stays in sync', async () => {
    const c = await negotiating();
    expect(last(await c.option(Opt.STRUCTURED_REPLY))).toBe('ACK');
    const nameTooLong = goData(t.exportName);
    nameTooLong.writeUInt32BE(1000, 0); // name length beyond the option's data
    const countTooBig = goData(t.exportName, [Info.NAME]);
    countTooBig.writeUInt16BE(50, countTooBig.length - 4); // 50 info requests announced, 1 sent
    const metaTrunc = metaContextData(t.exportName, ['base:allocation']).subarray(0, 12 + t.exportName.length);
    const cases: [number, Buffer][] = [
      [Opt.GO, Buffer.alloc(2)],
      [Opt.INFO, nameTooLong],
      [Opt.GO, countTooBig],
      [Opt.LIST_META_CONTEXT, metaTrunc],
      [Opt.SET_META_CONTEXT, Buffer.alloc(3)],
      [Opt.STRUCTURED_REPLY, Buffer.from('x')],
    ];
    for (const [opt, data] of cases) {
      const rs = await c.option(opt, data);
      expect(rs.map((r) => nameOf('rep', r.type)), `${nameOf('opt', opt)} with ${data.toString('hex')}`).toEqual(['ERR_INVALID']);
    }
    await expectGoWorks(c);
  });

  it('refuses an export name longer than 4096 bytes with an error reply and stays in sync', async () => {
    const c = await negotiating();
    const rs = await c.option(Opt.GO, goData('x'.repeat(5000)));
    expect(rs.length).toBe(1);
    expect(isErrorReply(rs[0].type), `got ${nameOf('rep', rs[0].type)}`).toBe(true);
    await expectGoWorks(c);
  });

  it('closes the connection, without sending anything, on EXPORT_NAME for an unknown export', async () => {
    const c = await negotiating();
    c.sendOption(Opt.EXPORT_NAME, Buffer.from('no-such-export'));
    expect(await c.waitClosed(3000), 'server closed').toBe(true);
    expect(c.queue.length, 'bytes sent before closing').toBe(0);
  });

  it('sends the 124 zero bytes after EXPORT_NAME only when the client did not set NO_ZEROES', async () => {
    const withZeroes = await negotiating(ClientFlag.C_FIXED_NEWSTYLE);
    const a = await withZeroes.exportName('', false);
    expect(a.size).toBe(t.size);
    expect(a.zeroes?.equals(Buffer.alloc(124))).toBe(true);
    expect((await withZeroes.request({ type: Cmd.READ, cookie: 5n, offset: 0n, length: 4096 })).error).toBe(0);

    const noZeroes = await negotiating();
    const b = await noZeroes.exportName(t.exportName, true);
    expect(b).toEqual({ size: t.size, flags: a.flags });
    // If zeroes followed anyway, this reply would not start with a reply magic.
    expect((await noZeroes.request({ type: Cmd.READ, cookie: 6n, offset: 0n, length: 4096 })).error).toBe(0);
  });

  it('serves a non-fixed newstyle client (client flags 0) that goes straight to EXPORT_NAME', async () => {
    const c = await negotiating(0);
    const e = await c.exportName(t.exportName, false);
    expect(e.size).toBe(t.size);
    expect(e.flags & TransmissionFlag.HAS_FLAGS).toBeTruthy();
    await writeAt(c, 8192n, Buffer.alloc(512, 0x5a), 7n);
    expect((await readAt(c, 8192n, 512, 8n)).equals(Buffer.alloc(512, 0x5a))).toBe(true);
  });

  it('gives byte-identical INFO and GO answers for the same request', async () => {
    const c = await negotiating();
    const infos = [Info.NAME, Info.DESCRIPTION, Info.BLOCK_SIZE];
    const info = await c.go(t.exportName, infos, Opt.INFO);
    const go = await c.go(t.exportName, infos, Opt.GO);
    const strip = (rs: { type: number; data: Buffer }[]) => rs.map((r) => [nameOf('rep', r.type), r.data.toString('hex')]).sort();
    expect(strip(info.replies)).toEqual(strip(go.replies));
    expect(info.description).toBe(t.description);
    expect(info.export?.size).toBe(t.size);
  });

  it('handles client flags, options and the first requests all arriving in one segment, before it sent anything', async () => {
    for (const viaGo of [true, false]) {
      const c = await RawClient.connect(t);
      clients.push(c);
      const flags = Buffer.alloc(4);
      flags.writeUInt32BE(ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES);
      // Requests in flight together may run in any order, so the READ reads
      // bytes written beforehand and the WRITE goes elsewhere.
      const before = randomBytes(4096);
      const data = randomBytes(4096);
      const offset = viaGo ? 40960n : 45056n;
      const setup = await session(false);
      await writeAt(setup.client, offset, before, 1n);
      const reqs: Request[] = [
        { type: Cmd.WRITE, cookie: 1n, offset: offset + 8192n, length: 4096, payload: data },
        { type: Cmd.READ, cookie: 2n, offset, length: 4096 },
      ];
      const enter = viaGo ? encodeOption(Opt.GO, goData(t.exportName)) : encodeOption(Opt.EXPORT_NAME, Buffer.from(t.exportName));
      c.write(Buffer.concat([flags, encodeOption(0x7654321, Buffer.alloc(7)), enter, ...reqs.map(encodeRequest)]));
      await c.readGreeting();
      expect((await c.readOptionReply()).type).toBe(Rep.ERR_UNSUP);
      if (viaGo) expect((await c.optionReplies()).at(-1)?.type).toBe(Rep.ACK);
      else expect((await c.read(10)).readBigUInt64BE(0)).toBe(t.size);
      c.noteRead(reqs[1]);
      const replies = [await c.nextReply(), await c.nextReply()];
      const byCookie = new Map(replies.map((r) => [r.cookie, r]));
      expect(byCookie.get(1n)?.error).toBe(0);
      expect(byCookie.get(2n)?.data?.equals(before)).toBe(true);
      expect((await readAt(c, offset + 8192n, 4096, 3n)).equals(data)).toBe(true);
    }
  });

  it('uses structured replies for READ after STRUCTURED_REPLY followed by EXPORT_NAME', async () => {
    const c = await negotiating();
    expect(last(await c.option(Opt.STRUCTURED_REPLY))).toBe('ACK');
    await c.exportName(t.exportName, true);
    const r = await c.request({ type: Cmd.READ, cookie: 1n, offset: 0n, length: 4096 });
    expect([r.kind, r.error, r.data?.length]).toEqual(['structured', 0, 4096]);
  });

  it('keeps serving while 100 clients sit idle at various points of the handshake', async () => {
    const idle = await Promise.all(Array.from({ length: 100 }, async (_, i) => {
      const c = await RawClient.connect(t);
      clients.push(c);
      if (i % 3 >= 1) {
        await c.readGreeting();
        c.sendClientFlags(ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES);
      }
      if (i % 3 === 2) c.sendRawOption(Opt.GO, 50, Buffer.alloc(10)); // 40 bytes short
      return c;
    }));
    await assertHealthy(t);
    expect(idle.filter((c) => c.isClosed)).toEqual([]);
  });

  it('acknowledges ABORT, even with data attached, and then closes', async () => {
    for (const data of [Buffer.alloc(0), Buffer.from('ignored')]) {
      const c = await negotiating();
      const rs = await c.option(Opt.ABORT, data);
      expect(rs.map((r) => [nameOf('opt', r.option), nameOf('rep', r.type)])).toEqual([['ABORT', 'ACK']]);
      expect(await c.waitClosed(3000)).toBe(true);
    }
  });

  it('survives clients that vanish mid-greeting, mid-option header and mid-option data', async () => {
    const a = await RawClient.connect(t);
    a.destroy();
    const b = await negotiating();
    b.write(Buffer.from('IHAVE'));
    await new Promise((r) => setTimeout(r, 50));
    b.destroy();
    const c = await negotiating();
    c.sendRawOption(Opt.GO, 100, Buffer.alloc(10));
    await new Promise((r) => setTimeout(r, 50));
    c.destroy();
    await new Promise((r) => setTimeout(r, 100));
    expect(t.alive()).toBe(true);
  });
});

describe('transmission phase', () => {
  it('closes the connection on a request with a bad magic', async () => {
    const { client: c } = await session(true);
    const bad = encodeRequest({ type: Cmd.READ, cookie: 1n, offset: 0n, length: 512 });
    bad.writeUInt32BE(REQUEST_MAGIC ^ 0x01000000, 0);
    c.write(bad);
    expect(await c.waitClosed(3000), 'server closed after a bad request magic').toBe(true);
  });

  it('survives a client that sends half a request header and closes', async () => {
    const { client: c } = await session(false);
    c.write(encodeRequest({ type: Cmd.READ, cookie: 1n, offset: 0n, length: 512 }).subarray(0, 10));
    await new Promise((r) => setTimeout(r, 50));
    c.destroy();
    await new Promise((r) => setTimeout(r, 100));
    expect(t.alive()).toBe(true);
  });

  it('drains a 33 MiB WRITE above the advertised 32 MiB maximum, answers EINVAL and keeps the connection usable', async () => {
    const { client: c, go } = await session(true);
    expect(go.blockSize?.maximum, 'advertised maximum payload').toBe(MAX_PAYLOAD);
    const offset = 0n;
    const marker = randomBytes(4096);
    await writeAt(c, offset, marker, 1n);
    const len = 33 * MiB;
    await c.writeAndDrain(encodeRequest({ type: Cmd.WRITE, cookie: 2n, offset, length: len, payload: Buffer.alloc(len, 0xee) }));
    const r = await c.nextReply(20_000);
    expect(r.cookie).toBe(2n);
    expect(errName(r)).toBe('EINVAL');
    expect((await readAt(c, offset, 4096, 3n)).equals(marker), 'refused write left the data alone').toBe(true);
  });

  it('closes, refuses or quietly drains a 1 GiB WRITE header that never gets its payload, without allocating it', async () => {
    const pid = t.proc.pid!;
    const before = await rssBytes(pid);
    const { client: c } = await session(true);
    c.write(encodeRequest({ type: Cmd.WRITE, cookie: 9n, offset: 0n, length: 1024 * MiB, payload: Buffer.alloc(64 * 1024) }));
    // Three acceptable answers: close (DoS-sized payload), an error reply, or
    // waiting for the rest of the payload to discard it. Success is not one.
    const out = await replyOrClose(c, 1500);
    if (out !== 'closed' && out !== 'silence') {
      expect(out.cookie).toBe(9n);
      expect(out.error, 'a 1 GiB write must not succeed').not.toBe(0);
    }
    const grew = (await rssBytes(pid)) - before;
    expect(grew, `server RSS grew by ${grew} bytes`).toBeLessThan(256 * MiB);
  });

  it('accepts READ and WRITE of exactly the 32 MiB maximum payload and refuses READ of one byte more with EINVAL', async () => {
    for (const structured of [false, true]) {
      const { client: c } = await session(structured);
      const data = randomBytes(MAX_PAYLOAD);
      await writeAt(c, 4096n, data, 1n);
      expect((await readAt(c, 4096n, MAX_PAYLOAD, 2n)).equals(data)).toBe(true);
      const r = await c.request({ type: Cmd.READ, cookie: 3n, offset: 0n, length: MAX_PAYLOAD + 1 });
      expect(errName(r)).toBe('EINVAL');
      c.destroy();
    }
  });

  it('survives a client that sends a 1 MiB WRITE header, half the payload, and vanishes', async () => {
    const { client: c } = await session(false);
    const req = encodeRequest({ type: Cmd.WRITE, cookie: 1n, offset: 0n, length: MiB, payload: randomBytes(MiB) });
    await c.writeAndDrain(req.subarray(0, 28 + MiB / 2));
    await new Promise((r) => setTimeout(r, 100));
    c.destroy();
    await new Promise((r) => setTimeout(r, 100));
    expect(t.alive()).toBe(true);
  });

  for (const structured of [false, true]) {
    const mode = structured ? 'structured' : 'simple';
    it(`rejects ranges past the end or wrapping past 2^64 with EINVAL or ENOSPC and keeps going (${mode} replies)`, async () => {
      const { client: c } = await session(structured);
      const size = t.size;
      const pay = (n: number) => Buffer.alloc(n, 0xab);
      const cases: [string, Request, string][] = [
        ['READ wrapping 2^64', { type: Cmd.READ, cookie: 1n, offset: U64_MAX - 511n, length: 1024 }, 'EINVAL'],
        ['READ at 2^64-1', { type: Cmd.READ, cookie: 2n, offset: U64_MAX, length: 1 }, 'EINVAL'],
        ['READ at 2^63', { type: Cmd.READ, cookie: 3n, offset: 1n << 63n, length: 512 }, 'EINVAL'],
        ['READ past end', { type: Cmd.READ, cookie: 4n, offset: size, length: 512 }, 'EINVAL'],
        ['READ crossing end', { type: Cmd.READ, cookie: 5n, offset: size - 512n, length: 1024 }, 'EINVAL'],
        ['TRIM wrapping 2^64', { type: Cmd.TRIM, cookie: 6n, offset: U64_MAX - 511n, length: 1024 }, 'EINVAL'],
        ['TRIM past end', { type: Cmd.TRIM, cookie: 7n, offset: size, length: 4096 }, 'EINVAL'],
        ['CACHE past end', { type: Cmd.CACHE, cookie: 8n, offset: size, length: 4096 }, 'EINVAL'],
        ['WRITE wrapping 2^64', { type: Cmd.WRITE, cookie: 9n, offset: U64_MAX - 511n, length: 1024, payload: pay(1024) }, 'ENOSPC'],
        ['WRITE past end', { type: Cmd.WRITE, cookie: 10n, offset: size, length: 512, payload: pay(512) }, 'ENOSPC'],
        ['WRITE crossing end', { type: Cmd.WRITE, cookie: 11n, offset: size - 512n, length: 1024, payload: pay(1024) }, 'ENOSPC'],
        ['WRITE_ZEROES past end', { type: Cmd.WRITE_ZEROES, cookie: 12n, offset: size, length: 4096 }, 'ENOSPC'],
        ['WRITE_ZEROES wrapping 2^64', { type: Cmd.WRITE_ZEROES, cookie: 13n, offset: U64_MAX - 511n, length: 1024 }, 'ENOSPC'],
      ];
      const tail = randomBytes(512);
      await writeAt(c, size - 512n, tail, 100n);
      const got: [string, string][] = [];
      for (const [what, req] of cases) {
        const r = await c.request(req);
        got.push([what, errName(r)]);
        // With structured replies a READ's reply MUST be structured, even an early error.
        if (structured && req.type === Cmd.READ) expect(r.kind, `${what} reply framing`).toBe('structured');
      }
      expect(got).toEqual(cases.map(([what, , e]) => [what, e]));
      expect((await readAt(c, size - 512n, 512, 101n)).equals(tail), 'refused writes left the last sector alone').toBe(true);
    });
  }

  it('accepts TRIM, WRITE_ZEROES, CACHE and BLOCK_STATUS longer than the maximum payload', async () => {
    const { client: c } = await session(true, true);
    const len = 48 * MiB; // over MAX_PAYLOAD, inside the 64 MiB export
    await writeAt(c, BigInt(len - 4096), randomBytes(4096), 1n);
    const cases: [string, Request][] = [
      ['TRIM', { type: Cmd.TRIM, cookie: 2n, offset: 0n, length: len }],
      ['WRITE_ZEROES', { type: Cmd.WRITE_ZEROES, cookie: 3n, offset: 0n, length: len }],
      ['CACHE', { type: Cmd.CACHE, cookie: 4n, offset: 0n, length: len }],
      ['BLOCK_STATUS', { type: Cmd.BLOCK_STATUS, cookie: 5n, offset: 0n, length: len }],
    ];
    const got: [string, string][] = [];
    for (const [what, req] of cases) got.push([what, errName(await c.request(req))]);
    expect(got).toEqual(cases.map(([what]) => [what, 'OK']));
    expect((await readAt(c, BigInt(len - 4096), 4096, 6n)).equals(Buffer.alloc(4096)), 'zeroed').toBe(true);
  });

  it('answers EINVAL to unknown command 99, with or without a length, and reads no payload for it', async () => {
    const { client: c } = await session(true);
    for (const length of [0, 512]) {
      const r = await c.request({ type: 99, cookie: 0x99n, offset: 0n, length });
      expect(errName(r), `command 99 length ${length}`).toBe('EINVAL');
    }
    expect((await c.request({ type: Cmd.READ, cookie: 1n, offset: 0n, length: 512 })).error).toBe(0);
  });

  it('answers EINVAL to unknown flag bits and to flags that do not belong to the command, draining WRITE payloads', async () => {
    const { client: c } = await session(true);
    const marker = randomBytes(512);
    await writeAt(c, 4096n, marker, 1n);
    const w = (flags: number, cookie: bigint): Request =>
      ({ type: Cmd.WRITE, flags, cookie, offset: 4096n, length: 512, payload: Buffer.alloc(512, 0x11) });
    const cases: [string, Request][] = [
      ['READ flag bit 5', { type: Cmd.READ, flags: 1 << 5, cookie: 10n, offset: 0n, length: 512 }],
      ['READ flag bit 15', { type: Cmd.READ, flags: 1 << 15, cookie: 11n, offset: 0n, length: 512 }],
      ['WRITE flag bit 9', w(1 << 9, 12n)],
      ['WRITE with NO_HOLE', w(CmdFlag.NO_HOLE, 13n)],
      ['WRITE with DF', w(CmdFlag.DF, 14n)],
      ['WRITE with FAST_ZERO', w(CmdFlag.FAST_ZERO, 15n)],
      ['READ with REQ_ONE', { type: Cmd.READ, flags: CmdFlag.REQ_ONE, cookie: 16n, offset: 0n, length: 512 }],
      ['TRIM with FAST_ZERO', { type: Cmd.TRIM, flags: CmdFlag.FAST_ZERO, cookie: 17n, offset: 8192n, length: 512 }],
      ['FLUSH with NO_HOLE', { type: Cmd.FLUSH, flags: CmdFlag.NO_HOLE, cookie: 18n }],
      ['CACHE with flag bit 7', { type: Cmd.CACHE, flags: 1 << 7, cookie: 19n, offset: 0n, length: 512 }],
    ];
    const got: [string, string][] = [];
    for (const [what, req] of cases) got.push([what, errName(await c.request(req))]);
    expect(got).toEqual(cases.map(([what]) => [what, 'EINVAL']));
    expect((await readAt(c, 4096n, 512, 2n)).equals(marker), 'refused writes left the data alone').toBe(true);
  });

  it('accepts FUA on every command, as it advertises SEND_FUA', async () => {
    const { client: c, flags } = await session(true);
    expect(flags & TransmissionFlag.SEND_FUA).toBeTruthy();
    const F = CmdFlag.FUA;
    const cases: [string, Request][] = [
      ['WRITE', { type: Cmd.WRITE, flags: F, cookie: 1n, offset: 0n, length: 512, payload: Buffer.alloc(512, 1) }],
      ['READ', { type: Cmd.READ, flags: F, cookie: 2n, offset: 0n, length: 512 }],
      ['FLUSH', { type: Cmd.FLUSH, flags: F, cookie: 3n }],
      ['TRIM', { type: Cmd.TRIM, flags: F, cookie: 4n, offset: 65536n, length: 65536 }],
      ['WRITE_ZEROES', { type: Cmd.WRITE_ZEROES, flags: F | CmdFlag.NO_HOLE, cookie: 5n, offset: 65536n, length: 4096 }],
      ['CACHE', { type: Cmd.CACHE, flags: F, cookie: 6n, offset: 0n, length: 4096 }],
    ];
    const got: [string, string][] = [];
    for (const [what, req] of cases) got.push([what, errName(await c.request(req))]);
    expect(got).toEqual(cases.map(([what]) => [what, 'OK']));
  });

  it('answers EINVAL to a zero-length READ, in a structured reply when structured replies are on', async () => {
    for (const structured of [false, true]) {
      const { client: c } = await session(structured);
      const r = await c.request({ type: Cmd.READ, cookie: 0x1234n, offset: 0n, length: 0 });
      expect(errName(r)).toBe('EINVAL');
      expect(r.kind).toBe(structured ? 'structured' : 'simple');
    }
  });

  it('answers EINVAL to BLOCK_STATUS when no meta context was negotiated', async () => {
    const { client: c } = await session(true);
    const r = await c.request({ type: Cmd.BLOCK_STATUS, cookie: 3n, offset: 0n, length: 4096 });
    expect(errName(r)).toBe('EINVAL');
    expect((await c.request({ type: Cmd.READ, cookie: 4n, offset: 0n, length: 512 })).error).toBe(0);
  });

  for (const structured of [false, true]) {
    it(`answers 200 pipelined reads sent in one write exactly once each, by cookie (${structured ? 'structured' : 'simple'} replies)`, async () => {
      const { client: c } = await session(structured);
      const base = 16n * BigInt(MiB);
      const pattern = randomBytes(200 * 4096);
      await writeAt(c, base, pattern, 1n);
      const reqs: Request[] = Array.from({ length: 200 }, (_, i) => ({
        type: Cmd.READ,
        // Distinct in every byte of the 64 bits, so a truncated or byte-swapped echo shows up.
        cookie: 0xa5a5_0000_0000_0000n | (BigInt(i) << 24n) | BigInt(199 - i),
        offset: base + BigInt(i * 4096 + (i % 7) * 64),
        length: 512 + (i % 5) * 700,
      }));
      c.sendRequests(reqs);
      const seen = new Map<bigint, Reply>();
      for (let i = 0; i < reqs.length; i++) {
        const r = await c.nextReply(10_000);
        expect(seen.has(r.cookie), `cookie 0x${r.cookie.toString(16)} answered twice`).toBe(false);
        seen.set(r.cookie, r);
      }
      for (const req of reqs) {
        const r = seen.get(req.cookie);
        expect(r, `cookie 0x${req.cookie.toString(16)} not answered`).toBeDefined();
        expect(r!.error).toBe(0);
        const at = Number((req.offset ?? 0n) - base);
        expect(r!.data?.equals(pattern.subarray(at, at + (req.length ?? 0))), `data for cookie 0x${req.cookie.toString(16)}`).toBe(true);
      }
      // Nothing extra after the 200 replies.
      expect(await replyOrClose(c, 200)).toBe('silence');
    });
  }

  it('answers 1000 pipelined 64 KiB reads (more than fits in flight) from a client that reads nothing for a while', async () => {
    const { client: c } = await session(true);
    c.sock.pause(); // let replies pile up in the server's socket buffers
    const reqs: Request[] = Array.from({ length: 1000 }, (_, i) => ({
      type: Cmd.READ, cookie: BigInt(i + 1), offset: BigInt((i % 512) * 65536), length: 65536,
    }));
    c.sendRequests(reqs);
    await new Promise((r) => setTimeout(r, 300));
    expect(t.alive()).toBe(true);
    c.sock.resume();
    const seen = new Set<bigint>();
    for (let i = 0; i < reqs.length; i++) {
      const r = await c.nextReply(10_000);
      expect(r.error).toBe(0);
      expect(seen.has(r.cookie)).toBe(false);
      seen.add(r.cookie);
    }
    expect(seen.size).toBe(1000);
  });

  it('bounds the reply data it buffers for a client that pipelines 600 reads of 1 MiB and reads nothing', async () => {
    const pid = t.proc.pid!;
    const before = await rssBytes(pid);
    const { client: c } = await session(true);
    c.sock.pause();
    // 600 x 28 bytes of requests ask for 600 MiB of replies; a server with
    // backpressure stops reading requests once a few tens of MiB are queued.
    c.sendRequests(Array.from({ length: 600 }, (_, i) => ({
      type: Cmd.READ, cookie: BigInt(i), offset: BigInt((i % 60) * MiB), length: MiB,
    })));
    let peak = 0;
    for (let i = 0; i < 6; i++) {
      await new Promise((r) => setTimeout(r, 250));
      peak = Math.max(peak, (await rssBytes(pid)) - before);
    }
    c.destroy();
    expect(peak, `server RSS grew by ${Math.round(peak / MiB)} MiB`).toBeLessThan(256 * MiB);
  });

  it('parses a WRITE and a READ that arrive one byte per TCP segment', async () => {
    const { client: c } = await session(true);
    const data = randomBytes(512);
    await c.dribble([{ type: Cmd.WRITE, cookie: 1n, offset: 12288n, length: 512, payload: data }]);
    expect((await c.nextReply()).error).toBe(0);
    await c.dribble([{ type: Cmd.READ, cookie: 2n, offset: 12288n, length: 512 }]);
    expect((await c.nextReply()).data?.equals(data)).toBe(true);
  });
});

// Ending a connection with requests in flight: their replies must all go out
// before the close. A file backend completes I/O later than the memory one,
// which widens the window in which a reply can be lost.
describe('ending a connection with requests in flight', () => {
  let fileTarget: Target;
  let dir: string;

  beforeAll(async () => {
    dir = tmpDir();
    fileTarget = await startTarget({ sizeMiB: 16, file: path.join(dir, 'disk.img') });
  });

  afterAll(async () => {
    await fileTarget?.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  afterEach(async () => {
    await assertHealthy(fileTarget);
  });

  const ending = { DISC: true, 'a half-close': false } as const;
  for (const backend of ['memory', 'file'] as const) {
    for (const [how, disc] of Object.entries(ending)) {
      it(`answers every request in flight before closing on ${how} (${backend} backend)`, async () => {
        const s = await openSession(backend === 'memory' ? t : fileTarget, { name: t.exportName, structured: true });
        const c = s.client;
        clients.push(c);
        // In-flight requests may run in any order: the READ reads bytes
        // written beforehand, the WRITE goes elsewhere.
        const data = randomBytes(65536);
        await writeAt(c, 1048576n, data, 9n);
        const reqs: Request[] = [
          { type: Cmd.WRITE, cookie: 1n, offset: 2097152n, length: 65536, payload: randomBytes(65536) },
          { type: Cmd.READ, cookie: 2n, offset: 1048576n, length: data.length },
          { type: Cmd.FLUSH, cookie: 3n },
        ];
        c.sendRequests(disc ? [...reqs, { type: Cmd.DISC, cookie: 4n }] : reqs);
        if (!disc) c.sock.end();
        expect(await c.waitClosed(3000), 'server closed the connection').toBe(true);
        const replies: Reply[] = [];
        while (c.queue.length > 0) replies.push(await c.nextReply(100));
        // Each request gets exactly one reply. ESHUTDOWN is accepted besides
        // success because nbdkit 1.32 fails requests still queued at DISC or
        // EOF that way; a lost reply is never acceptable.
        expect(replies.map((r) => r.cookie).sort(), 'cookies answered before the close (none for DISC)').toEqual([1n, 2n, 3n]);
        for (const r of replies) expect(['OK', 'ESHUTDOWN'], `cookie ${r.cookie}`).toContain(errName(r));
        const read = replies.find((r) => r.cookie === 2n);
        if (read?.error === 0) expect(read.data?.equals(data), 'READ data').toBe(true);
      });
    }
  }
});

import { describe, it, expect, afterEach } from 'vitest';
import net from 'node:net';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import {
  connect,
  connectTransport,
  listExports,
  parseNbdUri,
  NbdClient,
  NbdError,
  NbdConnectionError,
  NbdTimeoutError,
  NbdProtocolError,
  NbdOptionError,
  type BlockStatusExtent,
} from '../src/nbd/client.js';
import { COOKIE_MAX } from '../src/nbd/client/client.js';
import {
  NBDMAGIC,
  IHAVEOPT,
  OPTION_REPLY_MAGIC,
  SIMPLE_REPLY_MAGIC,
  STRUCTURED_REPLY_MAGIC,
  HandshakeFlag,
  TransmissionFlag,
  Opt,
  Rep,
  Info,
  Cmd,
  ReplyFlag,
  ReplyType,
  CmdFlag,
  State,
  NbdErr,
  BASE_ALLOCATION,
  DEFAULT_PORT,
  REQUEST_SIZE,
} from '../src/protocol/constants.js';
import { startNbdkit, startServe, freePort, tmpDir, run } from './helpers/servers.js';
import { Peer, be, chunk, closeFakeServers, type FakeRequest, fakeServer, readRequest, rejection, serveHandshake, simpleReply } from './helpers/fake-nbd.js';

const MiB = 1024 * 1024;
const KiB = 1024;
const SIZE = 64 * MiB;

// ---------------------------------------------------------------------------
// Servers under test. The same suite runs against every kind; add a kind by
// adding a starter (the lead adds blockmirror's own server here).

type ServerKind = 'nbdkit' | 'blockmirror';

interface ServerSpec {
  readOnly?: boolean;
  /** Listen on a unix socket instead of TCP. */
  unix?: boolean;
  /** Advertise these block size constraints (INFO_BLOCK_SIZE). */
  blockSize?: { min: number; preferred: number; max: number };
  /** Serve exactly these export names (each described as "disk NAME"), refusing others. */
  exports?: string[];
}

interface TestServer {
  kind: ServerKind;
  host: string;
  port: number;
  socket?: string;
  /** The export tests connect to by default. */
  exportName: string;
  size: number;
  /** nbd:// or nbd+unix:// URI of an export (default: exportName). */
  uri(exportName?: string): string;
  /** Die abruptly, as a crash would (SIGKILL). */
  kill(): Promise<void>;
  stop(): Promise<void>;
}

const starters: Record<ServerKind, (spec: ServerSpec) => Promise<TestServer>> = {
  async nbdkit(spec) {
    const filters: string[] = [];
    const params: string[] = [];
    if (spec.blockSize) {
      filters.push('--filter=blocksize-policy');
      const b = spec.blockSize;
      params.push(`blocksize-minimum=${b.min}`, `blocksize-preferred=${b.preferred}`, `blocksize-maximum=${b.max}`);
    }
    if (spec.exports) {
      filters.push('--filter=exportname');
      params.push('exportname-list=explicit', 'exportname-strict=true', ...spec.exports.map((n) => `exportname=${n}`));
      params.push('exportdesc=script:echo "disk $name"');
    }
    const socket = spec.unix ? path.join(tmpDir('bm-client-'), 'nbd.sock') : undefined;
    const s = await startNbdkit([...(spec.readOnly ? ['-r'] : []), ...filters, 'memory', String(SIZE), ...params], { socket });
    const exportName = spec.exports?.[0] ?? '';
    return {
      kind: 'nbdkit',
      host: s.host,
      port: s.port,
      socket,
      exportName,
      size: SIZE,
      uri: (name = exportName) =>
        socket ? `nbd+unix:///${encodeURIComponent(name)}?socket=${socket}` : `nbd://${s.host}:${s.port}/${encodeURIComponent(name)}`,
      kill: async () => void (await s.stop('SIGKILL')),
      stop: async () => void (await s.stop()),
    };
  },
  async blockmirror(spec) {
    if (spec.blockSize || spec.exports) throw new Error('blockmirror serve has one export and the default block sizes');
    const socket = spec.unix ? path.join(tmpDir('bm-client-'), 'nbd.sock') : undefined;
    const s = await startServe(['--size', String(SIZE), '--log-level', 'warn', ...(spec.readOnly ? ['--read-only'] : [])], { socket });
    return {
      kind: 'blockmirror',
      host: s.host,
      port: s.port,
      socket,
      exportName: '',
      size: SIZE,
      uri: (name = '') =>
        socket ? `nbd+unix:///${encodeURIComponent(name)}?socket=${socket}` : `nbd://${s.host}:${s.port}/${encodeURIComponent(name)}`,
      kill: async () => void (await s.stop('SIGKILL')),
      stop: async () => void (await s.stop()),
    };
  },
};

/** What a server kind can be asked for beyond the basics. */
const capabilities: Record<ServerKind, { blockSize: boolean; exports: boolean }> = {
  nbdkit: { blockSize: true, exports: true },
  blockmirror: { blockSize: false, exports: false },
};

async function withServer<T>(kind: ServerKind, spec: ServerSpec, fn: (s: TestServer) => Promise<T>): Promise<T> {
  const server = await starters[kind](spec);
  try {
    return await fn(server);
  } finally {
    // Clients first: a server may wait for its connections before exiting.
    await Promise.all(opened.splice(0).map((c) => c.close()));
    await server.stop();
  }
}

// Every client and fake server a test opens is closed afterwards, whatever the outcome.
const opened: NbdClient[] = [];
afterEach(async () => {
  await Promise.all(opened.splice(0).map((c) => c.close()));
  await closeFakeServers();
});
async function open(target: Parameters<typeof connect>[0], opts: Parameters<typeof connect>[1] = {}): Promise<NbdClient> {
  const c = await connect(target, opts);
  opened.push(c);
  return c;
}

/** Deterministic PRNG (mulberry32) so a failing run can be replayed. */
function rng(seed: number) {
  let a = seed >>> 0;
  const next = () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 2 ** 32;
  };
  return {
    int: (min: number, max: number) => min + Math.floor(next() * (max - min + 1)),
    bytes: (n: number) => {
      const b = Buffer.allocUnsafe(n);
      for (let i = 0; i < n; i++) b[i] = (next() * 256) | 0;
      return b;
    },
    shuffle: <T>(xs: T[]) => {
      for (let i = xs.length - 1; i > 0; i--) {
        const j = Math.floor(next() * (i + 1));
        [xs[i], xs[j]] = [xs[j], xs[i]];
      }
      return xs;
    },
  };
}

/** Clip extents to [0, length) and merge neighbours with equal flags: servers may split runs as they like. */
function coalesce(extents: BlockStatusExtent[], length: number): BlockStatusExtent[] {
  const out: BlockStatusExtent[] = [];
  let at = 0;
  for (const e of extents) {
    if (at >= length) break;
    const len = Math.min(e.length, length - at);
    at += len;
    const last = out[out.length - 1];
    if (last && last.flags === e.flags) last.length += len;
    else out.push({ length: len, flags: e.flags });
  }
  return out;
}

// ---------------------------------------------------------------------------

function clientSuite(kind: ServerKind) {
  it('negotiates the same size and capabilities that nbdinfo (libnbd) reports', async () => {
    await withServer(kind, {}, async (s) => {
      const c = await open(s.uri(), { metaContexts: [BASE_ALLOCATION] });
      const r = await run('nbdinfo', ['--json', s.uri()]);
      expect(r.code, r.stderr).toBe(0);
      const info = JSON.parse(r.stdout).exports[0];
      expect(c.size).toBe(s.size);
      expect(c.size).toBe(info['export-size']);
      expect(c.flags & TransmissionFlag.HAS_FLAGS).toBe(TransmissionFlag.HAS_FLAGS);
      expect(c.structuredReplies).toBe(true);
      expect({
        readOnly: c.readOnly,
        rotational: c.isRotational,
        cache: c.canCache,
        df: c.canDf,
        fastZero: c.canFastZero,
        flush: c.canFlush,
        fua: c.canFua,
        multiConn: c.canMultiConn,
        trim: c.canTrim,
        zero: c.canZero,
      }).toEqual({
        readOnly: info.is_read_only,
        rotational: info.is_rotational,
        cache: info.can_cache,
        df: info.can_df,
        fastZero: info.can_fast_zero,
        flush: info.can_flush,
        fua: info.can_fua,
        multiConn: info.can_multi_conn,
        trim: info.can_trim,
        zero: info.can_zero,
      });
      expect(info.contexts).toContain(BASE_ALLOCATION);
      expect([...c.metaContexts.keys()]).toEqual([BASE_ALLOCATION]);
      expect(c.metaContexts.get(BASE_ALLOCATION)).toEqual(expect.any(Number));
      // Nothing advertised: the protocol's defaults.
      expect(c.blockSize).toEqual({ min: 1, preferred: 4096, max: 32 * MiB });
    });
  });

  if (capabilities[kind].blockSize) it('reports advertised block sizes and refuses unaligned requests locally', async () => {
    const blockSize = { min: 512, preferred: 4096, max: MiB };
    await withServer(kind, { blockSize }, async (s) => {
      const c = await open(s.uri());
      expect(c.blockSize).toEqual(blockSize);
      const r = await run('nbdinfo', ['--json', s.uri()]);
      const info = JSON.parse(r.stdout).exports[0];
      expect(c.blockSize).toEqual({ min: info.block_size_minimum, preferred: info.block_size_preferred, max: info.block_size_maximum });
      const unaligned = await rejection(c.pread(512, 100));
      expect(unaligned).toMatchObject({ name: 'NbdError', code: 'EINVAL', origin: 'client' });
      const tooBig = await rejection(c.pwrite(Buffer.alloc(2 * MiB), 0));
      expect(tooBig).toMatchObject({ code: 'EINVAL', origin: 'client' });
      expect(c.inFlight).toBe(0);
      await expect(c.pread(512, 512)).resolves.toHaveLength(512);
    });
  });

  for (const structuredReplies of [true, false]) {
    it(`keeps hundreds of pipelined random writes and reads consistent with a model (${structuredReplies ? 'structured' : 'simple'} replies)`, async () => {
      await withServer(kind, {}, async (s) => {
        const c = await open(s.uri(), { structuredReplies });
        expect(c.structuredReplies).toBe(structuredReplies);
        const r = rng(structuredReplies ? 1 : 2);
        const REGION = 16 * MiB;
        const SLOT = 32 * KiB;
        const model = Buffer.alloc(REGION);

        // Large writes first: each overfills the socket buffer, so most wait in the drain queue.
        const big = Array.from({ length: REGION / MiB }, (_, i) => {
          const data = r.bytes(MiB);
          data.copy(model, i * MiB);
          return c.pwrite(data, i * MiB);
        });
        expect(c.inFlight).toBe(REGION / MiB);
        await Promise.all(big);

        let maxInFlight = 0;
        for (let round = 0; round < 3; round++) {
          // Writes and reads of one round touch disjoint slots: the server may run them in any order.
          const slots = r.shuffle(Array.from({ length: REGION / SLOT }, (_, i) => i));
          const ops: Promise<unknown>[] = [];
          for (const slot of slots.slice(0, 150)) {
            const off = slot * SLOT + r.int(0, SLOT - 1);
            const len = r.int(1, slot * SLOT + SLOT - off);
            const data = r.bytes(len);
            data.copy(model, off);
            ops.push(c.pwrite(data, off, { fua: r.int(0, 9) === 0 }));
          }
          for (const slot of slots.slice(150, 300)) {
            const off = slot * SLOT + r.int(0, SLOT - 1);
            const len = r.int(1, slot * SLOT + SLOT - off);
            // Read into the middle of a larger buffer: the guards prove nothing outside the view is touched.
            const outer = Buffer.alloc(len + 32, 0xee);
            const expected = Buffer.from(model.subarray(off, off + len));
            ops.push(
              c.pread(outer.subarray(16, 16 + len), off).then((got) => {
                expect(got.buffer).toBe(outer.buffer);
                expect(got.equals(expected), `read ${off}+${len}`).toBe(true);
                expect(outer.subarray(0, 16).every((b) => b === 0xee) && outer.subarray(16 + len).every((b) => b === 0xee)).toBe(true);
              }),
            );
          }
          maxInFlight = Math.max(maxInFlight, c.inFlight);
          await Promise.all(ops);
        }
        expect(maxInFlight).toBe(300);
        for (let off = 0; off < REGION; off += 4 * MiB) {
          const got = await c.pread(4 * MiB, off);
          expect(got.equals(model.subarray(off, off + 4 * MiB)), `final read at ${off}`).toBe(true);
        }
        await c.flush();
      });
    });
  }

  it('shows zeroed and trimmed ranges as holes in blockStatus, and reads them back as zeroes', async () => {
    await withServer(kind, {}, async (s) => {
      const c = await open(s.uri(), { metaContexts: [BASE_ALLOCATION] });
      const data = rng(3).bytes(MiB);
      await c.pwrite(data, 0);
      expect(coalesce(await c.blockStatus(0, MiB), MiB)).toEqual([{ length: MiB, flags: 0 }]);
      await c.zero(256 * KiB, 256 * KiB);
      await c.trim(512 * KiB, 256 * KiB);
      const extents = await c.blockStatus(0, MiB);
      expect(extents.reduce((n, e) => n + e.length, 0)).toBeGreaterThanOrEqual(MiB);
      expect(coalesce(extents, MiB)).toEqual([
        { length: 256 * KiB, flags: 0 },
        { length: 512 * KiB, flags: State.HOLE | State.ZERO },
        { length: 256 * KiB, flags: 0 },
      ]);
      const one = await c.blockStatus(300 * KiB, 100 * KiB, { reqOne: true });
      expect(one).toHaveLength(1);
      expect(one[0].flags).toBe(State.HOLE | State.ZERO);
      expect(one[0].length).toBeLessThanOrEqual(100 * KiB);
      const back = await c.pread(MiB, 0);
      expect(back.subarray(256 * KiB, 768 * KiB).every((b) => b === 0)).toBe(true);
      expect(back.subarray(0, 256 * KiB).equals(data.subarray(0, 256 * KiB))).toBe(true);
      expect(back.subarray(768 * KiB).equals(data.subarray(768 * KiB))).toBe(true);
      await c.zero(0, 64 * KiB, { noHole: true, fua: true });
      expect((await c.pread(64 * KiB, 0)).every((b) => b === 0)).toBe(true);
    });
  });

  it('sends the optional commands and flags the server advertises, and refuses the others locally', async () => {
    await withServer(kind, {}, async (s) => {
      const c = await open(s.uri());
      const attempts: Array<[advertised: boolean, run: () => Promise<unknown>, refusal: string]> = [
        [c.canFua, () => c.pwrite(Buffer.alloc(4096, 7), 8192, { fua: true }), 'EINVAL'],
        [c.canFlush, () => c.flush(), 'ENOTSUP'],
        [c.canCache, () => c.cache(0, MiB), 'ENOTSUP'],
        [c.canDf, () => c.pread(4096, 8192, { df: true }), 'EINVAL'],
        [c.canZero, () => c.zero(MiB, 4096, { fua: c.canFua }), 'ENOTSUP'],
        [c.canTrim, () => c.trim(2 * MiB, 4096), 'ENOTSUP'],
      ];
      for (const [advertised, attempt, refusal] of attempts) {
        if (advertised) await attempt();
        else expect(await rejection(attempt())).toMatchObject({ code: refusal, origin: 'client' });
      }
      // FAST_ZERO may be refused by the server too, but only ever with ENOTSUP.
      const fast = await c.zero(3 * MiB, MiB, { fastZero: true }).then(() => undefined, (e: NbdError) => e);
      if (!c.canFastZero) expect(fast).toMatchObject({ code: 'EINVAL', origin: 'client' });
      else if (fast) expect(fast).toMatchObject({ code: 'ENOTSUP', origin: 'server' });
      if (c.canFua) expect((await c.pread(4096, 8192)).every((b) => b === 7)).toBe(true);
    });
  });

  it('gets EINVAL from the server for a read past the end, and carries on', async () => {
    await withServer(kind, {}, async (s) => {
      const c = await open(s.uri(), { strict: false });
      const err = await rejection(c.pread(4096, s.size - 1024));
      expect(err).toBeInstanceOf(NbdError);
      expect(err).toMatchObject({ code: 'EINVAL', errno: NbdErr.EINVAL, origin: 'server', op: 'pread' });
      expect(err.message).toMatch(/^pread: server replied EINVAL/);
      // The stream is still in sync.
      await c.pwrite(Buffer.from('still here'), 0);
      expect((await c.pread(10, 0)).toString()).toBe('still here');
    });
  });

  it('gets ENOSPC from the server for a write past the end', async () => {
    await withServer(kind, {}, async (s) => {
      const c = await open(s.uri(), { strict: false });
      const err = await rejection(c.pwrite(Buffer.alloc(4096), s.size - 1024));
      expect(err).toMatchObject({ name: 'NbdError', code: 'ENOSPC', errno: NbdErr.ENOSPC, origin: 'server', op: 'pwrite' });
      expect(err.message).toMatch(/^pwrite: server replied ENOSPC/);
    });
  });

  it('refuses locally, without sending, what strict mode knows the server would reject', async () => {
    await withServer(kind, {}, async (s) => {
      const c = await open(s.uri());
      const cases: Array<[Promise<unknown>, string]> = [
        [c.pread(4096, s.size - 1024), 'EINVAL'],
        [c.pwrite(Buffer.alloc(4096), s.size - 1024), 'ENOSPC'],
        [c.pread(0, 0), 'EINVAL'],
        [c.pread(16, -1), 'EINVAL'],
        [c.trim(0, 2 ** 32), 'EINVAL'],
        [c.blockStatus(0, 4096), 'ENOTSUP'], // no meta context was asked for
      ];
      for (const [p, code] of cases) expect(await rejection(p)).toMatchObject({ name: 'NbdError', code, origin: 'client' });
      expect(c.inFlight).toBe(0);
    });
  });

  it('refuses writes on a read-only export locally with EPERM, and the server agrees when asked anyway', async () => {
    await withServer(kind, { readOnly: true }, async (s) => {
      const strict = await open(s.uri());
      expect(strict.readOnly).toBe(true);
      for (const p of [strict.pwrite(Buffer.alloc(512), 0), strict.trim(0, 512), strict.zero(0, 512)]) {
        expect(await rejection(p)).toMatchObject({ code: 'EPERM', errno: NbdErr.EPERM, origin: 'client' });
      }
      const lax = await open(s.uri(), { strict: false });
      expect(await rejection(lax.pwrite(Buffer.alloc(512), 0))).toMatchObject({ code: 'EPERM', origin: 'server' });
    });
  });

  it('connects over a unix socket by path and by nbd+unix:// URI', async () => {
    await withServer(kind, { unix: true }, async (s) => {
      expect(s.uri()).toMatch(/^nbd\+unix:\/\//);
      const byUri = await open(s.uri());
      const byPath = await open({ path: s.socket, exportName: s.exportName });
      await byUri.pwrite(Buffer.from('over unix'), 4096);
      expect((await byPath.pread(9, 4096)).toString()).toBe('over unix');
    });
  });

  it('connects by nbd:// URI and by host and port', async () => {
    await withServer(kind, {}, async (s) => {
      const byUri = await open(s.uri());
      const byHost = await open({ host: s.host, port: s.port, exportName: s.exportName });
      expect(byUri.size).toBe(byHost.size);
      await byHost.pwrite(Buffer.from('over tcp'), 0);
      expect((await byUri.pread(8, 0)).toString()).toBe('over tcp');
    });
  });

  if (capabilities[kind].exports) it('lists exports with their descriptions, as nbdinfo --list does, and reaches a named one', async () => {
    await withServer(kind, { exports: ['alpha', 'beta'] }, async (s) => {
      const list = await listExports(s.uri());
      expect(list).toEqual([
        { name: 'alpha', description: 'disk alpha' },
        { name: 'beta', description: 'disk beta' },
      ]);
      const r = await run('nbdinfo', ['--list', '--json', s.uri()]);
      const theirs = JSON.parse(r.stdout).exports.map((e: Record<string, string>) => ({ name: e['export-name'], description: e.description }));
      expect(list).toEqual(theirs);
      const beta = await open(s.uri('beta'));
      expect(beta.exportName).toBe('beta');
      const missing = await rejection(connect(s.uri('gamma')));
      expect(missing).toBeInstanceOf(NbdOptionError);
      expect(missing).toMatchObject({ code: 'ERR_UNKNOWN', errno: 2 });
    });
  });

  it('fails every in-flight request quickly when the server is killed mid-request', async () => {
    await withServer(kind, {}, async (s) => {
      const c = await open(s.uri());
      const dest = Buffer.alloc(4 * MiB); // shared on purpose: only the outcome matters
      const reads = Array.from({ length: 128 }, (_, i) => c.pread(dest, (i % 16) * 4 * MiB));
      const settled = reads.map((p) => p.then(() => 'ok', (e: Error) => e));
      await Promise.race(settled); // the server is busy answering
      const t0 = performance.now();
      await s.kill();
      const results = await Promise.all(settled);
      expect(performance.now() - t0).toBeLessThan(2000);
      const failed = results.filter((r): r is Error => r instanceof Error);
      expect(failed.length).toBeGreaterThan(0);
      for (const e of failed) {
        expect(e).toBeInstanceOf(NbdConnectionError);
        expect(['ECONNRESET', 'EPIPE']).toContain((e as NbdConnectionError).code);
      }
      expect(await c.closed).toBeInstanceOf(NbdConnectionError);
      expect(c.isOpen).toBe(false);
      expect(await rejection(c.pread(512, 0))).toMatchObject({ code: 'ENOTCONN' });
    });
  });

  it('disconnects cleanly after answering what is in flight, and the data is there for the next client', async () => {
    await withServer(kind, {}, async (s) => {
      const c = await connect(s.uri());
      const writes = Array.from({ length: 64 }, (_, i) => c.pwrite(Buffer.alloc(4096, i), i * 4096));
      const done = c.disconnect();
      expect(await rejection(c.pread(512, 0))).toMatchObject({ code: 'ESHUTDOWN' });
      await Promise.all(writes);
      await done;
      expect(await c.closed).toBeUndefined();
      const again = await open(s.uri());
      const back = await again.pread(64 * 4096, 0);
      for (let i = 0; i < 64; i++) expect(back[i * 4096 + 4095]).toBe(i);
    });
  });

  it('fails in-flight requests with ECONNABORTED on a hard close()', async () => {
    await withServer(kind, {}, async (s) => {
      const c = await connect(s.uri());
      const reads = Array.from({ length: 32 }, (_, i) => c.pread(MiB, i * MiB));
      await c.close();
      for (const r of await Promise.allSettled(reads)) {
        expect(r.status).toBe('rejected');
        expect((r as PromiseRejectedResult).reason).toMatchObject({ name: 'NbdConnectionError', code: 'ECONNABORTED' });
      }
    });
  });
}

describe('NbdClient against nbdkit', () => clientSuite('nbdkit'));
describe('NbdClient against blockmirror serve', () => clientSuite('blockmirror'));

// ---------------------------------------------------------------------------
// Failure handling that needs a misbehaving peer: plain net servers and a
// scripted fake NBD server.

const pattern = (offset: number, length: number) => Buffer.from(Array.from({ length }, (_, i) => ((offset + i) * 31 + 7) & 255));

describe('NbdClient failure handling', () => {
  it('fails with ECONNREFUSED when nothing listens on the port', async () => {
    const port = await freePort();
    const err = await rejection(connect({ host: '127.0.0.1', port }));
    expect(err).toBeInstanceOf(NbdConnectionError);
    expect(err).toMatchObject({ code: 'ECONNREFUSED' });
    expect(err.message).toContain(`127.0.0.1:${port}`);
  });

  it('fails with ENOENT when the unix socket does not exist', async () => {
    const sock = path.join(tmpDir('bm-client-'), 'missing.sock');
    const err = await rejection(connect(`nbd+unix:///?socket=${sock}`));
    expect(err).toMatchObject({ name: 'NbdConnectionError', code: 'ENOENT' });
    expect(err.message).toContain(sock);
  });

  it('times out the handshake with ETIMEDOUT against a server that accepts but never answers', async () => {
    const { port, peers } = await fakeServer(() => new Promise(() => undefined));
    const t0 = performance.now();
    const err = await rejection(connect({ host: '127.0.0.1', port, timeoutMs: 300 }));
    const took = performance.now() - t0;
    expect(err).toBeInstanceOf(NbdTimeoutError);
    expect(err).toMatchObject({ code: 'ETIMEDOUT' });
    expect(took).toBeGreaterThanOrEqual(290);
    expect(took).toBeLessThan(2000);
    expect(peers).toHaveLength(1);
  });

  it('gives up the handshake when the AbortSignal fires', async () => {
    const { port } = await fakeServer(() => new Promise(() => undefined));
    const ac = new AbortController();
    setTimeout(() => ac.abort(), 50);
    expect(await rejection(connect({ host: '127.0.0.1', port, signal: ac.signal }))).toMatchObject({ code: 'ABORT_ERR' });
  });

  it('rejects a command that outlives timeoutMs with ETIMEDOUT and closes the connection', async () => {
    const { port, peers } = await fakeServer(async (p) => {
      await serveHandshake(p);
      for (;;) await readRequest(p); // never answers
    });
    const c = await open({ host: '127.0.0.1', port, timeoutMs: 300 });
    const t0 = performance.now();
    const first = rejection(c.pread(512, 0));
    await new Promise((r) => setTimeout(r, 100));
    const second = rejection(c.pread(512, 512));
    const err = await first;
    expect(err).toBeInstanceOf(NbdTimeoutError);
    expect(err).toMatchObject({ code: 'ETIMEDOUT', op: 'pread' });
    expect(performance.now() - t0).toBeGreaterThanOrEqual(290);
    expect(await second).toMatchObject({ name: 'NbdConnectionError', code: 'ECONNABORTED', cause: err });
    expect(await c.closed).toMatchObject({ code: 'ECONNABORTED' });
    await (await peers[0]).whenClosed(); // the server saw the connection go
  });

  it('matches out-of-order, interleaved reply chunks to their requests by cookie', async () => {
    const { port } = await fakeServer(async (p) => {
      await serveHandshake(p);
      const reqs: FakeRequest[] = [];
      for (let i = 0; i < 8; i++) reqs.push(await readRequest(p));
      // Every read gets: data for its first quarter, a hole for the second, data for the rest;
      // all first quarters go out in reverse order, then the tails, then the holes (with DONE).
      const q = (r: FakeRequest) => r.length / 4;
      const data = (r: (typeof reqs)[number], from: number, to: number, done: boolean) =>
        chunk(r.cookie, ReplyType.OFFSET_DATA, Buffer.concat([be(8, r.offset + from), pattern(r.offset + from, to - from)]), done);
      const stream = [
        ...[...reqs].reverse().map((r) => data(r, 0, q(r), false)),
        ...reqs.map((r) => data(r, 2 * q(r), r.length, false)),
        ...reqs.map((r) => chunk(r.cookie, ReplyType.OFFSET_HOLE, Buffer.concat([be(8, r.offset + q(r)), be(4, q(r))]), true)),
      ];
      p.write(...stream);
    });
    const c = await open({ host: '127.0.0.1', port });
    const offsets = [0, 4096, 65536, 1 << 20, 12345 * 512, 7, 999, 3 << 20];
    const bufs = await Promise.all(offsets.map((o) => c.pread(Buffer.alloc(4096, 0x55), o)));
    offsets.forEach((o, i) => {
      const want = Buffer.concat([pattern(o, 1024), Buffer.alloc(1024), pattern(o + 2048, 2048)]);
      expect(bufs[i].equals(want), `read at ${o}`).toBe(true);
    });
  });

  it('refuses commands and flags a minimal server did not advertise, and sends them when strict is off', async () => {
    const seen: string[] = [];
    const { port } = await fakeServer(async (p) => {
      await serveHandshake(p, { flags: TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH });
      for (;;) {
        const r = await readRequest(p);
        seen.push(`${r.type}:${r.flags}`);
        if (r.type === Cmd.FLUSH) p.write(simpleReply(r.cookie));
        else if (r.type === Cmd.READ) {
          const msg = Buffer.from('bad sector');
          p.write(chunk(r.cookie, ReplyType.ERROR_OFFSET, Buffer.concat([be(4, NbdErr.EIO), be(2, msg.length), msg, be(8, r.offset + 512)]), true));
        } else p.write(simpleReply(r.cookie, NbdErr.EINVAL));
      }
    });
    const strict = await open({ host: '127.0.0.1', port });
    const refusals: Array<[Promise<unknown>, string]> = [
      [strict.trim(0, 512), 'ENOTSUP'],
      [strict.zero(0, 512), 'ENOTSUP'],
      [strict.cache(0, 512), 'ENOTSUP'],
      [strict.pwrite(Buffer.alloc(512), 0, { fua: true }), 'EINVAL'],
      [strict.pread(512, 0, { df: true }), 'EINVAL'],
    ];
    for (const [p, code] of refusals) expect(await rejection(p)).toMatchObject({ name: 'NbdError', code, origin: 'client' });
    await strict.flush();
    expect(seen).toEqual([`${Cmd.FLUSH}:0`]); // only the flush reached the server

    const lax = await open({ host: '127.0.0.1', port, strict: false });
    expect(await rejection(lax.trim(0, 512))).toMatchObject({ code: 'EINVAL', origin: 'server', op: 'trim' });
    const readErr = await rejection(lax.pread(1024, 4096, { df: true }));
    expect(readErr).toMatchObject({ code: 'EIO', errno: NbdErr.EIO, origin: 'server', offset: 4608 });
    expect(readErr.message).toBe('pread: server replied EIO at offset 4608: bad sector');
    await lax.flush(); // still in sync after the errors
    expect(seen.slice(1)).toEqual([`${Cmd.TRIM}:0`, `${Cmd.READ}:${CmdFlag.DF}`, `${Cmd.FLUSH}:0`]);
  });

  it('falls back to EXPORT_NAME when GO is unsupported and to simple replies when structured ones are', async () => {
    const { port } = await fakeServer(async (p) => {
      await serveHandshake(p, { sr: false, go: false, size: 3 * MiB });
      const r = await readRequest(p);
      p.write(simpleReply(r.cookie), pattern(r.offset, r.length));
    });
    const c = await open({ host: '127.0.0.1', port, metaContexts: [BASE_ALLOCATION] });
    expect(c.size).toBe(3 * MiB);
    expect(c.structuredReplies).toBe(false);
    expect(c.metaContexts.size).toBe(0);
    expect(c.blockSize).toEqual({ min: 1, preferred: 4096, max: 32 * MiB });
    expect((await c.pread(100, 5000)).equals(pattern(5000, 100))).toBe(true);
  });

  it('fails every in-flight request with NbdProtocolError when a reply names an unknown cookie', async () => {
    const { port, peers } = await fakeServer(async (p) => {
      await serveHandshake(p);
      for (let i = 0; i < 3; i++) await readRequest(p);
      p.write(simpleReply(999n));
    });
    const c = await open({ host: '127.0.0.1', port });
    const results = await Promise.allSettled([c.flush(), c.flush(), c.pread(16, 0)]);
    for (const r of results) {
      expect(r.status).toBe('rejected');
      expect((r as PromiseRejectedResult).reason).toBeInstanceOf(NbdProtocolError);
      expect((r as PromiseRejectedResult).reason.message).toMatch(/unknown cookie 999/);
    }
    expect(await c.closed).toBeInstanceOf(NbdProtocolError);
    await (await peers[0]).whenClosed();
  });

  it('refuses a reply whose 64-bit cookie matches an issued one only in its low 32 bits, or only once rounded to a double', async () => {
    for (const bad of [(1n << 32n) | 1n, (1n << 60n) | 1n]) {
      const { port, peers } = await fakeServer(async (p) => {
        await serveHandshake(p);
        const r = await readRequest(p);
        expect(r.cookie).toBe(1n);
        p.write(simpleReply(bad));
      });
      const c = await open({ host: '127.0.0.1', port });
      const err = await rejection(c.flush());
      expect(err).toBeInstanceOf(NbdProtocolError);
      expect(err.message).toMatch(/unknown cookie/);
      expect(await c.closed).toBeInstanceOf(NbdProtocolError);
      await (await peers[0]).whenClosed();
    }
  });

  it('starts cookies again from 1 after COOKIE_MAX, skipping one still in flight, and routes every reply to its own request', async () => {
    const seen: bigint[] = [];
    let heldRead!: () => void;
    const gotHeld = new Promise<void>((r) => (heldRead = r));
    const { port } = await fakeServer(async (p) => {
      await serveHandshake(p, { size: 3 * MiB });
      const held = await readRequest(p); // cookie 1: answered last
      seen.push(held.cookie);
      heldRead();
      for (let i = 0; i < 3; i++) {
        const r = await readRequest(p);
        seen.push(r.cookie);
        p.write(simpleReply(r.cookie), pattern(r.offset, r.length));
      }
      p.write(simpleReply(held.cookie), pattern(held.offset, held.length));
    });
    const c = await open({ host: '127.0.0.1', port });
    const first = c.pread(16, 4096);
    await gotHeld;
    (c as unknown as { nextCookie: number }).nextCookie = COOKIE_MAX - 1;
    const later = [c.pread(16, 0), c.pread(16, 512), c.pread(16, 1024)];
    const data = await Promise.all(later);
    expect(seen).toEqual([1n, BigInt(COOKIE_MAX - 1), BigInt(COOKIE_MAX), 2n]);
    expect(data.map((d, i) => d.equals(pattern(i * 512, 16)))).toEqual([true, true, true]);
    expect((await first).equals(pattern(4096, 16))).toBe(true);
    expect(c.inFlight).toBe(0);
  });

  it('reports a peer that is not an NBD server as a protocol error', async () => {
    const { port } = await fakeServer(async (p) => p.write(Buffer.from('HTTP/1.1 400 Bad Request\r\n\r\n')));
    const err = await rejection(connect({ host: '127.0.0.1', port }));
    expect(err).toBeInstanceOf(NbdProtocolError);
    expect(err.message).toMatch(/not an NBD server/);
  });

  it('reports a server that hangs up mid-handshake as a truncated handshake', async () => {
    const { port } = await fakeServer(async (p) => {
      p.write(be(8, NBDMAGIC), be(8, IHAVEOPT));
      p.sock.end();
    });
    const err = await rejection(connect({ host: '127.0.0.1', port }));
    expect(err).toBeInstanceOf(NbdProtocolError);
    expect(err.message).toMatch(/truncated handshake/);
  });

  it('waits for drain instead of piling requests into a socket the server does not read', async () => {
    let release!: () => void;
    const released = new Promise<void>((r) => (release = r));
    let lastPayload: Buffer | undefined;
    const { port } = await fakeServer(async (p) => {
      await serveHandshake(p, { flags: TransmissionFlag.HAS_FLAGS });
      p.sock.pause();
      await released;
      p.sock.resume();
      for (let i = 0; i < 32; i++) {
        const r = await readRequest(p);
        lastPayload = r.payload;
        p.write(simpleReply(r.cookie));
      }
    });
    const sock = net.connect({ host: '127.0.0.1', port });
    const c = await connectTransport(sock);
    opened.push(c);
    const writes = Array.from({ length: 32 }, (_, i) => c.pwrite(Buffer.alloc(MiB, i), i * MiB));
    await new Promise((r) => setTimeout(r, 200));
    expect(c.inFlight).toBe(32);
    // Without backpressure all 32 MiB would sit in the socket's user-space buffer.
    expect(sock.writableLength).toBeLessThan(4 * MiB);
    release();
    await Promise.all(writes);
    expect(lastPayload?.every((b) => b === 31)).toBe(true);
  });
});

describe('parseNbdUri', () => {
  it('reads host, port and export from nbd:// URIs, and socket and export from nbd+unix:// ones', () => {
    expect(parseNbdUri('nbd://example.com:10810/disk%201')).toEqual({ host: 'example.com', port: 10810, exportName: 'disk 1' });
    expect(parseNbdUri('nbd://[::1]/')).toEqual({ host: '::1', port: DEFAULT_PORT, exportName: '' });
    expect(parseNbdUri('nbd+unix:///vol?socket=/run/nbd.sock')).toEqual({ path: '/run/nbd.sock', exportName: 'vol' });
  });

  it('reads TLS URIs, and refuses other schemes, a unix URI without a socket and a psk file it cannot read', () => {
    expect(parseNbdUri('nbds://host:10810/x')).toEqual({ host: 'host', port: 10810, exportName: 'x', tls: {} });
    expect(() => parseNbdUri('nbds://bob@host/x?tls-psk-file=/nonexistent.psk')).toThrow('cannot read /nonexistent.psk: ENOENT');
    expect(() => parseNbdUri('http://host/x')).toThrow(/unsupported URI scheme/);
    expect(() => parseNbdUri('nbd+unix:///x')).toThrow(/socket=PATH/);
  });
});

// Large WRITE payloads read straight into the memory store's pages (writeTarget) as real clients
// drive them: python3-libnbd with overlapping WRITEs, TRIMs, ZEROes and READs in flight at once,
// nbdcopy, and a raw client that goes away mid-payload or sends a WRITE the server refuses.
// Each test counts the targets the device handed out, so it proves the zero-copy path was taken,
// and ends with every slot of the store accounted for.
import fs from 'node:fs';
import path from 'node:path';
import { afterEach, describe, expect, it, vi } from 'vitest';
import pino from 'pino';
import { AtomicDevice } from '../src/blockdev/atomic.js';
import { MemoryDevice } from '../src/blockdev/memory.js';
import type { WriteTarget } from '../src/blockdev/types.js';
import { ExportTable } from '../src/nbd/exports.js';
import { NbdServer } from '../src/nbd/server.js';
import { Cmd, CmdFlag, NbdErr } from '../src/protocol/constants.js';
import { PY_DIR, encodeRequest, openSession, readAt, requireLibnbdPython, writeAt } from './helpers/raw.js';
import { expectSlotsBack } from './helpers/memory.js';
import { PYTHON, run, tmpDir } from './helpers/servers.js';
import { pseudoRandom, requireTools } from './helpers/clients.js';

const MiB = 1024 * 1024;

/** A memory store that counts the write targets it handed out and how they ended. */
class CountedStore extends MemoryDevice {
  opened = 0;
  refused = 0;
  committed = 0;
  aborted = 0;
  /** Targets for a whole payload (nothing of it came with the header, so nothing is copied), and the bytes that did come with one. */
  whole = 0;
  headBytes = 0;
  override writeTarget(offset: number, length: number, from: number): WriteTarget | null {
    const t = super.writeTarget(offset, length, from);
    if (!t) {
      this.refused++;
      return null;
    }
    this.opened++;
    if (from === 0) this.whole++;
    this.headBytes += from;
    return {
      pieces: t.pieces,
      commit: (head, fua) => {
        this.committed++;
        return t.commit(head, fua);
      },
      abort: () => {
        this.aborted++;
        t.abort();
      },
    };
  }
}

let server: NbdServer | undefined;

async function serveStore(size: number): Promise<{ dev: CountedStore; uri: string; host: string; port: number }> {
  const dev = new CountedStore(size);
  const exports = new ExportTable();
  exports.add({ name: 'disk', description: '', device: new AtomicDevice(dev), readOnly: false });
  server = new NbdServer({ exports, log: pino({ level: 'silent' }) });
  const addr = await server.listen({ kind: 'tcp', host: '127.0.0.1', port: 0 });
  const [host, port] = addr.split(':') as [string, string];
  return { dev, uri: `nbd://${addr}/disk`, host, port: Number(port) };
}

/** Once every connection is gone: no slot reserved, held or retired, each slot in one place. */
async function expectAllSlotsBack(dev: MemoryDevice): Promise<void> {
  await vi.waitFor(() => expect(server!.connectionsTo('disk')).toBe(0), { timeout: 10_000 });
  expectSlotsBack(dev);
}

afterEach(async () => {
  await server?.close();
  server = undefined;
});

interface Race {
  replies: number;
  words_checked: number;
  tagged_words: number;
  writes: number;
  leak: string[];
  final_ok: boolean;
}

describe('large WRITEs read into the store\'s pages while other commands change the same bytes', () => {
  it('applies overlapping WRITEs, TRIMs and ZEROes in the order they arrived, and no READ ever shows a page of another offset or of an unfinished payload', async () => {
    await requireLibnbdPython();
    const { dev, uri } = await serveStore(16 * MiB);
    for (const seed of [1, 2]) {
      const r = await run(PYTHON, [path.join(PY_DIR, 'writes_race.py'), uri, '3', String(seed)], { env: { PYTHONDONTWRITEBYTECODE: '1' }, timeoutMs: 120_000 });
      expect(r.code, r.stderr).toBe(0);
      const race = JSON.parse(r.stdout.trim().split('\n').at(-1)!) as Race;
      expect(race.leak).toEqual([]);
      expect(race.final_ok).toBe(true);
      expect(race.writes).toBeGreaterThan(20);
      // The replies carried written data, not only zeroes: the check had something to check.
      expect(race.tagged_words).toBeGreaterThan(race.words_checked / 10);
    }
    // Every WRITE of the race misses 64 KiB or more after its header's read, so each asked for a
    // target: the first ones, into an empty store, got one; later ones are refused while trims and
    // retired pages leave the free slots scattered (the copying path then takes them).
    expect(dev.committed + dev.refused).toBeGreaterThanOrEqual(40);
    expect(dev.committed).toBeGreaterThanOrEqual(5);
    expect(dev.aborted).toBe(0);
    await expectAllSlotsBack(dev);
  });

  it('takes an nbdcopy of 24 MiB byte for byte through write targets', async () => {
    requireTools('nbdcopy');
    const { dev, uri } = await serveStore(32 * MiB);
    const file = path.join(tmpDir(), 'src.img');
    const data = pseudoRandom(24 * MiB + 12_345, 17);
    fs.writeFileSync(file, data);
    const r = await run('nbdcopy', ['--', file, uri], { timeoutMs: 60_000 });
    expect(r.code, r.stderr).toBe(0);
    expect(dev.committed).toBeGreaterThan(0);
    const back = Buffer.alloc(data.length);
    await dev.read(0, back);
    expect(back.equals(data)).toBe(true);
    await expectAllSlotsBack(dev);
  });

  it('reads the header after a large WRITE alone, so that the next large WRITE\'s payload lands whole and none of it is copied', async () => {
    requireTools('nbdcopy');
    const { dev, uri } = await serveStore(64 * MiB);
    const file = path.join(tmpDir(), 'src.img');
    const data = pseudoRandom(48 * MiB, 23);
    fs.writeFileSync(file, data);
    // nbdcopy keeps up to 64 WRITEs of 256 KiB in flight: the socket always holds the next
    // header and payload. Read in 128 KiB pieces, half of every payload came with its header.
    const r = await run('nbdcopy', ['--request-size=262144', '--', file, uri], { timeoutMs: 60_000 });
    expect(r.code, r.stderr).toBe(0);
    expect(dev.committed).toBe(dev.opened);
    // Only the first WRITE, and one whose header arrived in two reads, may bring bytes along.
    expect(dev.whole).toBeGreaterThanOrEqual(Math.floor(dev.opened * 0.9));
    expect(dev.headBytes).toBeLessThan(data.length / 10);
    const back = Buffer.alloc(data.length);
    await dev.read(0, back);
    expect(back.equals(data)).toBe(true);
    await expectAllSlotsBack(dev);
  });
});

describe('a WRITE whose payload never arrives whole', () => {
  it('leaves the volume\'s bytes untouched and gives every reserved page back when the client disconnects mid-payload, and other clients go on', async () => {
    const { dev, host, port } = await serveStore(8 * MiB);
    const before = pseudoRandom(4 * MiB, 5);
    await dev.write(0, before);
    const s = await openSession({ host, port }, { name: 'disk' });
    // A 2 MiB WRITE whose payload stops after 700 KiB.
    await s.client.writeAndDrain(encodeRequest({ type: Cmd.WRITE, cookie: 7n, offset: 4096n + 100n, length: 2 * MiB, payload: Buffer.alloc(700 * 1024, 0xee) }));
    // The payload's rest is being read into the store's pages by now.
    await vi.waitFor(() => expect(dev.reservedBytes).toBeGreaterThan(0), { timeout: 10_000 });
    s.client.destroy();
    await vi.waitFor(() => expect(dev.aborted).toBe(1), { timeout: 10_000 });
    expect(dev.committed).toBe(0);
    await expectAllSlotsBack(dev);
    const now = Buffer.alloc(4 * MiB);
    await dev.read(0, now);
    expect(now.equals(before)).toBe(true);
    // Another client's large WRITE takes the freed pages and reads back as written.
    const other = await openSession({ host, port }, { name: 'disk' });
    const data = pseudoRandom(MiB, 6);
    await writeAt(other.client, 4096n + 100n, data);
    expect((await readAt(other.client, 4096n + 100n, MiB)).equals(data)).toBe(true);
    await other.client.disconnect();
    expect(dev.committed).toBe(1);
    await expectAllSlotsBack(dev);
  });

  it('refuses a large WRITE with a flag it does not allow without reserving pages for it, and the connection goes on in step', async () => {
    const { dev, host, port } = await serveStore(8 * MiB);
    const s = await openSession({ host, port }, { name: 'disk' });
    const bad = await s.client.request({ type: Cmd.WRITE, cookie: 3n, offset: 0n, length: MiB, payload: Buffer.alloc(MiB, 0xee), flags: CmdFlag.DF });
    expect(bad.error).toBe(NbdErr.EINVAL);
    const past = await s.client.request({ type: Cmd.WRITE, cookie: 4n, offset: BigInt(8 * MiB - 4096), length: MiB, payload: Buffer.alloc(MiB, 0xee) });
    expect(past.error).toBe(NbdErr.ENOSPC);
    expect(dev.opened).toBe(0);
    expect(dev.allocatedBytes).toBe(0);
    const data = pseudoRandom(MiB, 8);
    await writeAt(s.client, 0n, data, 5n);
    expect((await readAt(s.client, 0n, MiB, 6n)).equals(data)).toBe(true);
    expect(dev.committed).toBe(1);
    await s.client.disconnect();
    await expectAllSlotsBack(dev);
  });
});

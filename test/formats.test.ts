// On-disk formats (src/util/format.ts): each file blockmirror keeps round-trips, and a corrupt,
// truncated, foreign or future file is refused at start with one line that says what to do —
// never reused silently, never reset silently. A torn bitmap page is the one damage a crash
// can cause: its clusters are resynced instead.
import fs from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { FileBitmapStore } from '../src/controller/bitmap-store.js';
import { FormatError } from '../src/util/format.js';
import { CLI, freePort, run, tmpDir } from './helpers/servers.js';

const GEOMETRY = { clusterSize: 65536, clusters: 40_000, mirrors: 2 };

async function fresh(): Promise<string> {
  const file = path.join(tmpDir('bm-fmt-'), 'p.bitmap');
  const { store, loaded } = await FileBitmapStore.open(file, GEOMETRY);
  expect(loaded).toBeNull();
  await store.mark([0], 5, 9);
  await store.mark([1], 39_990, 39_999);
  await store.mark([0, 1], 33_000, 33_001);
  await store.close();
  return file;
}

function setBits(img: Uint8Array): number[] {
  const out: number[] = [];
  for (let c = 0; c < img.length * 8; c++) if (img[c >>> 3]! & (1 << (c & 7))) out.push(c);
  return out;
}

function flip(file: string, offset: number): void {
  const fd = fs.openSync(file, 'r+');
  const b = Buffer.alloc(1);
  fs.readSync(fd, b, 0, 1, offset);
  b[0]! ^= 0x40;
  fs.writeSync(fd, b, 0, 1, offset);
  fs.closeSync(fd);
}

describe('bitmap files', () => {
  it('round-trip every bit of every mirror, across page boundaries', async () => {
    const file = await fresh();
    const { store, loaded } = await FileBitmapStore.open(file, GEOMETRY);
    expect(setBits(loaded![0]!)).toEqual([5, 6, 7, 8, 9, 33_000, 33_001]);
    expect(setBits(loaded![1]!)).toEqual([33_000, 33_001, ...Array.from({ length: 10 }, (_, i) => 39_990 + i)]);
    await store.close();
  });

  it('refuses a damaged header with the checksum it failed', async () => {
    const file = await fresh();
    flip(file, 13);
    await expect(FileBitmapStore.open(file, GEOMETRY)).rejects.toThrow(new RegExp(`^${file}: bitmap file header fails its checksum \\(stored 0x[0-9a-f]{8}, computed 0x[0-9a-f]{8}\\): the file is damaged; move it away \\(a pair then copies in full\\)$`));
  });

  it('refuses a foreign file, a truncated one and one from a newer blockmirror', async () => {
    const dir = tmpDir('bm-fmt-');
    const foreign = path.join(dir, 'foreign.bitmap');
    fs.writeFileSync(foreign, Buffer.from('PK\x03\x04 a zip file, not ours'));
    await expect(FileBitmapStore.open(foreign, GEOMETRY)).rejects.toThrow(`${foreign}: is not a blockmirror bitmap file (it starts with "PK.. a z", not "BMBITMP2"); move it away, or point the configuration at the right directory`);
    const file = await fresh();
    const truncated = path.join(dir, 'short.bitmap');
    fs.writeFileSync(truncated, fs.readFileSync(file).subarray(0, 20));
    await expect(FileBitmapStore.open(truncated, GEOMETRY)).rejects.toThrow(`${truncated}: has a bitmap file header of 20 bytes, expected 36: truncated or damaged`);
    const future = path.join(dir, 'future.bitmap');
    const bytes = fs.readFileSync(file);
    bytes.writeUInt16LE(3, 8);
    fs.writeFileSync(future, bytes);
    await expect(FileBitmapStore.open(future, GEOMETRY)).rejects.toThrow(`${future}: is a bitmap file of format version 3, newer than this blockmirror reads (2); run a newer blockmirror`);
    await expect(FileBitmapStore.open(file, { ...GEOMETRY, clusters: 50_000 })).rejects.toThrow(FormatError);
  });

  it('resyncs the clusters of a page that fails its checksum (a torn write) and says so', async () => {
    const file = await fresh();
    // Page 1 holds mirror 0's clusters 0..32703: damage one bit of it.
    flip(file, 4096 + 100);
    const warned: string[] = [];
    const { store, loaded } = await FileBitmapStore.open(file, GEOMETRY, { warn: (_o, msg) => warned.push(msg) });
    expect(warned).toEqual([`${file}: 1 bitmap page(s) failed their checksum (a write torn by a crash?); their clusters will be resynced`]);
    const bits = setBits(loaded![0]!);
    expect(bits.slice(0, 3)).toEqual([0, 1, 2]);
    expect(bits).toContain(32_703);
    expect(bits).not.toContain(32_704); // the next page was fine
    expect(setBits(loaded![1]!)).toHaveLength(12);
    await store.close();
    // The page was rewritten with its checksum: the next start trusts it again.
    const again = await FileBitmapStore.open(file, GEOMETRY, { warn: (_o, msg) => warned.push(msg) });
    expect(warned).toHaveLength(1);
    expect(setBits(again.loaded![0]!)).toEqual(bits);
    await again.store.close();
  });

  it('migrates a format-1 file (no checksums) in place, keeping every bit', async () => {
    const dir = tmpDir('bm-fmt-');
    const file = path.join(dir, 'old.bitmap');
    const bytes = Math.ceil(GEOMETRY.clusters / 8);
    const stride = Math.ceil(bytes / 4096) * 4096;
    const img = Buffer.alloc(4096 + 2 * stride);
    img.write('BMBITMP1', 0);
    img.writeUInt32LE(GEOMETRY.clusterSize, 8);
    img.writeUInt32LE(GEOMETRY.clusters, 12);
    img.writeUInt32LE(2, 16);
    img[4096 + 1] = 0b101; // mirror 0: clusters 8 and 10
    img[4096 + stride + 4000] = 0x80; // mirror 1: cluster 32007
    fs.writeFileSync(file, img);
    const { store, loaded } = await FileBitmapStore.open(file, GEOMETRY);
    expect(setBits(loaded![0]!)).toEqual([8, 10]);
    expect(setBits(loaded![1]!)).toEqual([32_007]);
    await store.close();
    expect(fs.readFileSync(file).subarray(0, 8).toString()).toBe('BMBITMP2');
  });

  it('stops `blockmirror up` with one line naming the damaged file', async () => {
    const dir = tmpDir('bm-fmt-up-');
    const [nbd, admin] = [await freePort(), await freePort()];
    const yaml = path.join(dir, 'c.yaml');
    fs.writeFileSync(
      yaml,
      `storageSystems:\n  - { id: 1, nbd: 127.0.0.1:${nbd}, admin: 127.0.0.1:${admin}, dataDir: data, volumes: [ { id: 1, size: 1MiB }, { id: 2, size: 1MiB } ] }\npairs:\n  - { name: p, mode: async, master: { ss: 1, vol: 1 }, mirrors: [ { ss: 1, vol: 2 } ] }\n`,
    );
    fs.mkdirSync(path.join(dir, 'data/pairs'), { recursive: true });
    const bitmap = path.join(dir, 'data/pairs/p.bitmap');
    fs.writeFileSync(bitmap, 'hello, I am a text file and not a bitmap\n');
    const r = await run(process.execPath, [CLI, 'up', '-c', yaml, '--log-level', 'silent'], { timeoutMs: 20_000 });
    expect(r.code).toBe(1);
    expect(r.stderr).toBe(`blockmirror: ${bitmap}: is not a blockmirror bitmap file (it starts with "hello, I", not "BMBITMP2"); move it away, or point the configuration at the right directory\n`);
    expect(fs.readFileSync(bitmap, 'utf8')).toBe('hello, I am a text file and not a bitmap\n');
  });
});

describe('pair records', () => {
  it('read the records of older versions, and refuse a damaged, invalid or future one with what to do', async () => {
    const { readGeneration, readPairState, saveGeneration } = await import('../src/controller/pair-files.js');
    const dir = tmpDir('bm-rec-');
    const gen = path.join(dir, 'p.generation.json');
    fs.writeFileSync(gen, '{"epoch":3,"master":2}\n');
    expect(readGeneration(gen)).toEqual({ epoch: 3, master: 2 });
    saveGeneration(gen, { epoch: 4, master: 1, initialCopy: true });
    expect(JSON.parse(fs.readFileSync(gen, 'utf8'))).toEqual({ version: 1, epoch: 4, master: 1, initialCopy: true });
    expect(readGeneration(gen)).toEqual({ epoch: 4, master: 1, initialCopy: true });
    fs.writeFileSync(gen, '{"epoch":3,"mas');
    expect(() => readGeneration(gen)).toThrow(`${gen}: the generation record is not JSON (damaged?); move it away only if you know the pair's state, then restart`);
    fs.writeFileSync(gen, '{"epoch":0,"master":2}');
    expect(() => readGeneration(gen)).toThrow(/is not a valid generation record \(epoch: Too small/);
    fs.writeFileSync(gen, '{"version":9,"epoch":1,"master":2}');
    expect(() => readGeneration(gen)).toThrow(`${gen}: is a generation record of format version 9, newer than this blockmirror reads (1); run a newer blockmirror`);
    const state = path.join(dir, 'p.state.json');
    fs.writeFileSync(state, '{"state":"PSUS"}');
    expect(readPairState(state)).toBe('PSUS');
    fs.writeFileSync(state, '{"state":"SPLIT"}');
    expect(() => readPairState(state)).toThrow(/is not a valid pair state record/);
    expect(readPairState(path.join(dir, 'absent.json'))).toBeUndefined();
  });
});

describe('CFS metadata files', () => {
  async function stored(dir: string) {
    const { JournalStore } = await import('../src/cfs/journal.js');
    const { Namespace } = await import('../src/cfs/namespace.js');
    const ns = new Namespace(65536);
    const store = await JournalStore.open(dir, await JournalStore.load(dir), () => ns.snapshot());
    const body = { t: 'mkdir' as const, parent: 1, name: 'd', ino: 2, mtime: 1 };
    ns.apply(body);
    store.append(body);
    await store.sync();
    await store.close();
    // Reopening compacts the record into the snapshot.
    const again = await JournalStore.open(dir, await JournalStore.load(dir), () => ns.snapshot());
    await again.close();
    return { JournalStore, Namespace };
  }

  it('refuse a damaged snapshot, a foreign journal and a journal from a newer blockmirror', async () => {
    const dir = tmpDir('bm-cfsfmt-');
    const { JournalStore, Namespace } = await stored(dir);
    const state = await JournalStore.load(dir);
    expect(Namespace.fromSnapshot(state.snapshot!, 65536).resolve('/d')).toMatchObject({ ino: 2 });
    const snap = path.join(dir, 'snapshot');
    const good = fs.readFileSync(snap);
    const bad = Buffer.from(good);
    bad[bad.length - 3] ^= 0x20;
    fs.writeFileSync(snap, bad);
    await expect(JournalStore.load(dir)).rejects.toThrow(`${snap}: the CFS snapshot's body (${good.length - 32} of ${good.length - 32} bytes) fails its checksum: the file is damaged; restore it from a backup`);
    fs.writeFileSync(snap, good);
    const journal = path.join(dir, 'journal');
    const j = fs.readFileSync(journal);
    j.writeUInt16LE(7, 8);
    fs.writeFileSync(journal, j);
    await expect(JournalStore.load(dir)).rejects.toThrow(`${journal}: is a CFS journal of format version 7, newer than this blockmirror reads (1); run a newer blockmirror`);
    fs.writeFileSync(journal, 'BMBITMP2 is a bitmap, not a journal');
    await expect(JournalStore.load(dir)).rejects.toThrow(/is not a blockmirror CFS journal/);
  });

  it('reads a first-format snapshot.json and journal, and rewrites them in the current format', async () => {
    const dir = tmpDir('bm-cfsold-');
    const { Namespace } = await import('../src/cfs/namespace.js');
    const { JournalStore } = await import('../src/cfs/journal.js');
    const ns = new Namespace(65536);
    ns.apply({ t: 'mkdir', parent: 1, name: 'old', ino: 2, mtime: 1 });
    fs.writeFileSync(path.join(dir, 'snapshot.json'), JSON.stringify({ ...ns.snapshot(), seq: 1 }));
    // One first-format frame: u32 length, u32 CRC-32 (zlib), JSON.
    const rec = Buffer.from(JSON.stringify({ t: 'mkdir', parent: 1, name: 'newer', ino: 3, mtime: 2, seq: 2 }));
    const { crc32 } = await import('node:zlib');
    const frame = Buffer.alloc(8);
    frame.writeUInt32LE(rec.length, 0);
    frame.writeUInt32LE(crc32(rec) >>> 0, 4);
    fs.writeFileSync(path.join(dir, 'journal'), Buffer.concat([frame, rec]));
    const state = await JournalStore.load(dir);
    expect(state.legacy).toBe(true);
    const loaded = Namespace.fromSnapshot(state.snapshot!, 65536);
    for (const r of state.records) loaded.apply(r);
    expect(loaded.resolve('/newer')).toMatchObject({ ino: 3 });
    const store = await JournalStore.open(dir, state, () => loaded.snapshot());
    await store.close();
    expect(fs.existsSync(path.join(dir, 'snapshot.json'))).toBe(false);
    expect(fs.readFileSync(path.join(dir, 'snapshot')).subarray(0, 8).toString()).toBe('BMCFSSNP');
    expect(fs.readFileSync(path.join(dir, 'journal')).subarray(0, 8).toString()).toBe('BMCFSJNL');
    const after = await JournalStore.load(dir);
    expect(Namespace.fromSnapshot(after.snapshot!, 65536).resolve('/old')).toMatchObject({ ino: 2 });
  });
});

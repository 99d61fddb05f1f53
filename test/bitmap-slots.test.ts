// The slot table of a bitmap file (src/controller/bitmap-store.ts): which copy each slot is for.
// A pair across storage systems whose mirrors change writes its next bitmap whole and renames it
// in (`replace`); a restart that names other copies than the file remaps the bits by copy, so a
// kill -9 in the middle of the change loses no bit whichever membership the restart runs.
import fs from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { FileBitmapStore, type SlotTable } from '../src/controller/bitmap-store.js';
import { FormatError } from '../src/util/format.js';
import { tmpDir } from './helpers/servers.js';

const CLUSTERS = 40_000; // two pages per slot
const geometry = (mirrors: number) => ({ clusterSize: 65536, clusters: CLUSTERS, mirrors });
const ONE: SlotTable = { master: '1:1', mirrors: ['2:1'] };
const TWO: SlotTable = { master: '1:1', mirrors: ['2:1', '3:1'] };

function setBits(img: Uint8Array): number[] {
  const out: number[] = [];
  for (let c = 0; c < img.length * 8; c++) if (img[c >>> 3]! & (1 << (c & 7))) out.push(c);
  return out;
}

const ALL = Array.from({ length: CLUSTERS }, (_, c) => c);

/** A file of the one-mirror pair with clusters 5-9 and 39 990-39 999 marked for 2:1. */
async function oneMirrorFile(): Promise<string> {
  const file = path.join(tmpDir('bm-slots-'), 'pair1.bitmap');
  const { store, loaded } = await FileBitmapStore.open(file, geometry(1), undefined, ONE);
  expect(loaded).toBeNull();
  await store.mark([0], 5, 9);
  await store.mark([0], 39_990, 39_999);
  await store.close();
  return file;
}
const MARKED = [5, 6, 7, 8, 9, ...Array.from({ length: 10 }, (_, i) => 39_990 + i)];

describe('the slot table of a bitmap file', () => {
  it('opens a file for the same copies as it is, bits and all', async () => {
    const file = await oneMirrorFile();
    const warned: string[] = [];
    const { store, loaded } = await FileBitmapStore.open(file, geometry(1), { warn: (_o, m) => warned.push(m) }, ONE);
    expect(setBits(loaded![0]!)).toEqual(MARKED);
    expect(warned).toEqual([]);
    await store.close();
  });

  it('remaps a file for fewer mirrors by copy: the mirror it knows keeps its bits, the new one is all "may differ", and says so', async () => {
    const file = await oneMirrorFile();
    const warned: string[] = [];
    const { store, loaded } = await FileBitmapStore.open(file, geometry(2), { warn: (_o, m) => warned.push(m) }, TWO);
    expect(setBits(loaded![0]!)).toEqual(MARKED);
    expect(setBits(loaded![1]!)).toEqual(ALL);
    expect(warned).toEqual([`${file}: the bitmap was for master 1:1 with mirrors 2:1; the configuration says master 1:1 with mirrors 2:1, 3:1 (a change of mirrors stopped by a crash?): kept the bits of 2:1; 3:1 will be copied in full`]);
    await store.mark([1], 0, 0); // the remapped file is the store's own, and takes marks
    await store.close();
    const again = await FileBitmapStore.open(file, geometry(2), undefined, TWO);
    expect(setBits(again.loaded![0]!)).toEqual(MARKED);
    expect(setBits(again.loaded![1]!)).toEqual(ALL);
    await again.store.close();
  });

  it('remaps a file for more mirrors by copy, in the configuration\'s order, and drops the slot of a mirror it no longer has', async () => {
    const file = path.join(tmpDir('bm-slots-'), 'pair1.bitmap');
    const { store } = await FileBitmapStore.open(file, geometry(2), undefined, TWO);
    await store.mark([0], 100, 100);
    await store.mark([1], 200, 201);
    await store.close();
    const three = await FileBitmapStore.open(file, geometry(1), undefined, { master: '1:1', mirrors: ['3:1'] });
    expect(setBits(three.loaded![0]!)).toEqual([200, 201]);
    await three.store.close();
  });

  it('makes every mirror "may differ" when the file was for another master', async () => {
    const file = await oneMirrorFile();
    const { store, loaded } = await FileBitmapStore.open(file, geometry(1), undefined, { master: '1:2', mirrors: ['2:1'] });
    expect(setBits(loaded![0]!)).toEqual(ALL);
    await store.close();
  });

  it('replace puts a whole new file in by rename: the old one until then, the new one after, and no file beside it', async () => {
    const file = await oneMirrorFile();
    const dir = path.dirname(file);
    const images = [new Uint8Array(CLUSTERS / 8), new Uint8Array(CLUSTERS / 8).fill(0xff)];
    images[0]![0] = 0b1010;
    const store = await FileBitmapStore.replace(file, geometry(2), TWO, images);
    expect(fs.readdirSync(dir)).toEqual(['pair1.bitmap']);
    await store.close();
    const { store: s2, loaded } = await FileBitmapStore.open(file, geometry(2), undefined, TWO);
    expect(setBits(loaded![0]!)).toEqual([1, 3]);
    expect(setBits(loaded![1]!)).toEqual(ALL);
    await s2.close();
  });

  it('a file without a table (an older blockmirror\'s) or opened without copies keeps the strict check of its number of mirrors', async () => {
    const file = path.join(tmpDir('bm-slots-'), 'pair1.bitmap');
    await (await FileBitmapStore.open(file, geometry(1))).store.close();
    await expect(FileBitmapStore.open(file, geometry(2), undefined, TWO)).rejects.toThrow(FormatError);
    const tabled = await oneMirrorFile();
    await expect(FileBitmapStore.open(tabled, geometry(2))).rejects.toThrow(/was made for clusterSize 65536, 40000 clusters, 1 mirrors; the config now says 65536, 40000, 2/);
  });
});

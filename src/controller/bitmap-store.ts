// Persisted bitmap table of one pair, with write-intent semantics (as md's
// write-intent bitmap and DRBD's activity log):
//
//   * a bit is on disk BEFORE the write that needs it starts anywhere, so a
//     kill -9 at any moment never loses track of a cluster a mirror misses;
//   * a bit already on disk costs nothing on later writes (no I/O, no await);
//   * bits are cleared lazily, and only by the pair's cleaner after every copy
//     was flushed, so a cleared bit never hides data that only one side holds.
//
// File layout (format 2, little-endian), one file per pair, in 4 KiB pages:
//   page 0              header (util/format.ts): magic "BMBITMP2", version 2, clusterSize u32,
//                       clusters u64, mirrors u32, page size u32, CRC32C; zero padding
//   page 1 + m*P + k    page k of mirror m's bitset (1 = may differ), P pages per mirror:
//                         0     4088  bits of clusters [k*32704, (k+1)*32704)
//                         4088  4     the page's own number (a misdirected write shows)
//                         4092  4     CRC32C of the 4092 bytes before it
//
// Page 0 may also name the copies the slots belong to (the slot table), from byte 2048:
//   2048  4     length L of the JSON text (0: no table, a file of an older blockmirror)
//   2052  L     {"master": "1:1", "mirrors": ["2:1", "3:1"]} (slot m is mirrors[m])
//   ..    4     CRC32C of the length and the text
// A pair whose mirrors change at run time writes its next bitmap beside the file and renames it
// over (`replace`): a crash leaves the old file or the new one, whole. Opened with the copies a
// configuration names, a file whose table names others is remapped by copy ("ss:vol"): a mirror
// it knows keeps its bits, one it does not know is all "may differ", one it names that the
// configuration does not is dropped; another master makes every mirror "may differ". So a
// restart after a crash in the middle of such a change runs either membership safely.
//
// Each page carries its checksum, so marking still costs one pwrite per dirty page and one
// fdatasync per group commit. A page that fails its checksum at start (a write torn by a crash)
// is not trusted: every cluster it covers is marked "may differ", and resynced. A bad header is
// refused with a FormatError. A format-1 file ("BMBITMP1", no checksums) is migrated in place.
//
// Marking is group-committed: writers that mark while a commit runs share the
// next one (one pwrite per dirty 4 KiB page, one fdatasync).
import fs from 'node:fs';
import { dirname } from 'node:path';
import { promisify } from 'node:util';
import * as BL from 'buffer-layout';
import { FileFormat, FormatError, crc } from '../util/format.js';

interface BitmapHeader {
  clusterSize: number;
  clusters: number;
  mirrors: number;
  pageSize: number;
}
const HEADER_FORMAT = new FileFormat<BitmapHeader>('bitmap file', 'BMBITMP2', 2, [BL.u32('clusterSize'), BL.nu64('clusters'), BL.u32('mirrors'), BL.u32('pageSize')]);
const V1_MAGIC = Buffer.from('BMBITMP1');
const HEADER = 4096;
const PAGE = 4096;
/** Bytes of bits in one page: the rest holds the page number and the checksum. */
const BITS = PAGE - 8;
/** Where the slot table starts in page 0, and its most bytes of JSON. */
const TABLE_AT = 2048;
const TABLE_MAX = HEADER - TABLE_AT - 8;
const pwrite = promisify(fs.write);
const fdatasync = promisify(fs.fdatasync);
const RESOLVED = Promise.resolve();
/**
 * What mark() returns when the bits were durable already (or the store keeps none on disk): a
 * writer may go on at once instead of awaiting it, which saves a turn of the microtask queue per
 * write of a sync pair.
 */
export const MARKED: Promise<void> = RESOLVED;

/** Which copies a bitmap's slots are for: the master and, per slot, its mirror ("ss:vol"). */
export interface SlotTable {
  master: string;
  mirrors: string[];
}

export interface BitmapStore {
  /** The on-disk image of mirror m (1 = may differ). Read-only for callers. */
  image(m: number): Uint8Array;
  /** Ensure the bits of clusters [first, last] of every listed mirror are on disk. */
  mark(mirrors: readonly number[], first: number, last: number): Promise<void>;
  /** Clear bits (lazily persisted: losing a clear only costs a resync). */
  clear(m: number, clusters: readonly number[]): Promise<void>;
  close(): Promise<void>;
}

/** Persist the bits of `clusters` (ascending) in slot m, one mark per contiguous run. */
export async function markRuns(store: BitmapStore, m: number, clusters: readonly number[]): Promise<void> {
  for (let k = 0; k < clusters.length; ) {
    let j = k;
    while (j + 1 < clusters.length && clusters[j + 1] === clusters[j]! + 1) j++;
    await store.mark([m], clusters[k]!, clusters[j]!);
    k = j + 1;
  }
}

/** For storage systems without a dataDir: volumes die with the process, and so may the bitmap. */
export class MemoryBitmapStore implements BitmapStore {
  private readonly images: Uint8Array[];
  constructor(clusters: number, mirrors: number) {
    this.images = Array.from({ length: mirrors }, () => new Uint8Array(Math.ceil(clusters / 8)));
  }
  image(m: number): Uint8Array {
    return this.images[m]!;
  }
  mark(mirrors: readonly number[], first: number, last: number): Promise<void> {
    for (const m of mirrors) for (let c = first; c <= last; c++) this.images[m]![c >>> 3]! |= 1 << (c & 7);
    return RESOLVED;
  }
  async clear(m: number, clusters: readonly number[]): Promise<void> {
    for (const c of clusters) this.images[m]![c >>> 3]! &= ~(1 << (c & 7));
  }
  async close(): Promise<void> {}
}

export class FileBitmapStore implements BitmapStore {
  private readonly images: Uint8Array[];
  /** Pages of the file each mirror's bitset takes. */
  private readonly pagesPerMirror: number;
  private dirty = new Set<number>(); // file page indexes
  private running: Promise<void> | null = null;
  private next: Promise<void> | null = null;
  private closed = false;

  private constructor(
    private readonly fd: number,
    readonly clusters: number,
    readonly mirrors: number,
    images: Uint8Array[],
  ) {
    this.images = images;
    this.pagesPerMirror = Math.max(1, Math.ceil(Math.ceil(clusters / 8) / BITS));
  }

  /**
   * Open or create the bitmap file. `loaded` is null when the file is new
   * (the caller decides whether the mirror is known identical), else the
   * persisted bits per mirror.
   */
  static async open(
    path: string,
    geometry: { clusterSize: number; clusters: number; mirrors: number },
    log?: { warn(obj: object, msg: string): void },
    /** The copies the configuration names for the slots: written in a new file, and a file for other copies is remapped. */
    slots?: SlotTable,
  ): Promise<{ store: FileBitmapStore; loaded: Uint8Array[] | null }> {
    const { clusterSize, clusters, mirrors } = geometry;
    const bytes = Math.ceil(clusters / 8);
    const exists = fs.existsSync(path);
    if (exists) migrateV1(path);
    if (exists && slots) {
      const remapped = remap(path, geometry, slots, log);
      if (remapped) return { store: await FileBitmapStore.replace(path, geometry, slots, remapped), loaded: remapped.map((i) => i.slice()) };
    }
    const fd = fs.openSync(path, exists ? 'r+' : 'w+');
    try {
      if (exists) {
        const h = Buffer.alloc(HEADER_FORMAT.size);
        const n = fs.readSync(fd, h, 0, h.length, 0);
        const head = HEADER_FORMAT.decode(path, h.subarray(0, n));
        if (head.clusterSize !== clusterSize || head.clusters !== clusters || head.mirrors !== mirrors || head.pageSize !== PAGE) {
          throw new FormatError(
            path,
            `was made for clusterSize ${head.clusterSize}, ${head.clusters} clusters, ${head.mirrors} mirrors; the config now says ${clusterSize}, ${clusters}, ${mirrors} (move the file away to start a full copy)`,
          );
        }
        const store = new FileBitmapStore(fd, clusters, mirrors, Array.from({ length: mirrors }, () => new Uint8Array(bytes)));
        const bad = store.load();
        if (bad.length > 0) {
          log?.warn({ file: path, pages: bad }, `${path}: ${bad.length} bitmap page(s) failed their checksum (a write torn by a crash?); their clusters will be resynced`);
          for (const p of bad) store.dirty.add(p);
        }
        return { store, loaded: store.images.map((i) => i.slice()) };
      }
      const store = FileBitmapStore.write(fd, geometry, slots, Array.from({ length: mirrors }, () => new Uint8Array(bytes)));
      return { store, loaded: null };
    } catch (e) {
      fs.closeSync(fd);
      throw e;
    }
  }

  /**
   * A new file for other copies (a pair's mirrors changed at run time), with these bits: written
   * beside `path`, flushed, then renamed over it, so a crash leaves the old file or this one.
   */
  static async replace(path: string, geometry: { clusterSize: number; clusters: number; mirrors: number }, slots: SlotTable | undefined, images: Uint8Array[]): Promise<FileBitmapStore> {
    const next = `${path}.next`;
    const fd = fs.openSync(next, 'w+');
    let store: FileBitmapStore;
    try {
      store = FileBitmapStore.write(fd, geometry, slots, images.map((i) => i.slice()));
    } catch (e) {
      fs.closeSync(fd);
      fs.rmSync(next, { force: true });
      throw e;
    }
    fs.renameSync(next, path);
    syncDir(path);
    return store;
  }

  /** Page 0 (header and slot table) and every bitset page, then fdatasync: a whole file on `fd`. */
  private static write(fd: number, geometry: { clusterSize: number; clusters: number; mirrors: number }, slots: SlotTable | undefined, images: Uint8Array[]): FileBitmapStore {
    const { clusterSize, clusters, mirrors } = geometry;
    const page0 = Buffer.alloc(HEADER);
    HEADER_FORMAT.encode({ clusterSize, clusters, mirrors, pageSize: PAGE }).copy(page0);
    if (slots) writeTable(page0, slots);
    fs.writeSync(fd, page0, 0, HEADER, 0);
    const store = new FileBitmapStore(fd, clusters, mirrors, images);
    // Every page written once, with its checksum: an all-zero page would not pass it.
    for (let p = 1; p <= mirrors * store.pagesPerMirror; p++) fs.writeSync(fd, store.pageBytes(p), 0, PAGE, p * PAGE);
    fs.fdatasyncSync(fd);
    return store;
  }

  /** The bits of every slot of a file, read as at a start (a page failing its checksum reads as all "may differ"). */
  static readImages(path: string, clusters: number, mirrors: number): Uint8Array[] {
    const fd = fs.openSync(path, 'r');
    try {
      const store = new FileBitmapStore(fd, clusters, mirrors, Array.from({ length: mirrors }, () => new Uint8Array(Math.ceil(clusters / 8))));
      store.load();
      return store.images;
    } finally {
      fs.closeSync(fd);
    }
  }

  /** Read every page into the images; a page that fails its checksum reads as all "may differ". Returns those pages. */
  private load(): number[] {
    const bad: number[] = [];
    const buf = Buffer.alloc(PAGE);
    for (let p = 1; p <= this.mirrors * this.pagesPerMirror; p++) {
      const n = fs.readSync(this.fd, buf, 0, PAGE, p * PAGE);
      const { m, off } = this.locate(p);
      const img = this.images[m]!;
      const end = Math.min(img.length, off + BITS);
      const ok = n === PAGE && buf.readUInt32LE(BITS) === p && buf.readUInt32LE(BITS + 4) === crc(buf.subarray(0, BITS + 4));
      if (ok) img.set(buf.subarray(0, end - off), off);
      else {
        img.fill(0xff, off, end);
        bad.push(p);
      }
    }
    // Bits past the last cluster stay clear, whatever a bad page said.
    const tail = this.clusters & 7;
    if (tail) for (const img of this.images) if (img.length > 0) img[img.length - 1]! &= (1 << tail) - 1;
    return bad;
  }

  image(m: number): Uint8Array {
    return this.images[m]!;
  }

  mark(mirrors: readonly number[], first: number, last: number): Promise<void> {
    let changed = false;
    for (const m of mirrors) {
      const img = this.images[m]!;
      for (let c = first; c <= last; c++) {
        const i = c >>> 3;
        const bit = 1 << (c & 7);
        if (img[i]! & bit) continue;
        img[i]! |= bit;
        this.dirty.add(this.pageOf(m, i));
        changed = true;
      }
    }
    // Already on disk (or on its way in a commit we must still wait for).
    if (!changed) return this.running && this.hasPending(mirrors, first, last) ? this.commit() : RESOLVED;
    return this.commit();
  }

  async clear(m: number, clusters: readonly number[]): Promise<void> {
    const img = this.images[m]!;
    for (const c of clusters) {
      const i = c >>> 3;
      const bit = 1 << (c & 7);
      if (!(img[i]! & bit)) continue;
      img[i]! &= ~bit;
      this.dirty.add(this.pageOf(m, i));
    }
    if (this.dirty.size > 0) await this.commit();
  }

  async close(): Promise<void> {
    if (this.closed) return;
    if (this.dirty.size > 0 || this.running) await this.commit();
    this.closed = true;
    fs.closeSync(this.fd);
  }

  private pageOf(m: number, byteIndex: number): number {
    return 1 + m * this.pagesPerMirror + Math.floor(byteIndex / BITS);
  }

  /** Which mirror's bitset a file page holds, and at which byte of it. */
  private locate(p: number): { m: number; off: number } {
    const m = Math.floor((p - 1) / this.pagesPerMirror);
    return { m, off: ((p - 1) % this.pagesPerMirror) * BITS };
  }

  // A bit set by a writer whose commit is still running must not be reported
  // durable to a second writer of the same cluster before that commit ends.
  private inFlightPages = new Set<number>();
  private hasPending(mirrors: readonly number[], first: number, last: number): boolean {
    for (const m of mirrors) {
      for (let i = first >>> 3; i <= last >>> 3; i++) {
        const p = this.pageOf(m, i);
        if (this.inFlightPages.has(p) || this.dirty.has(p)) return true;
      }
    }
    return false;
  }

  private commit(): Promise<void> {
    if (!this.running) {
      this.running = this.writeDirty().finally(() => {
        this.running = null;
      });
      return this.running;
    }
    // Our bits may have missed the running commit's snapshot: share the next one.
    if (!this.next) {
      this.next = this.running.then(() => {
        this.next = null;
        return this.commit();
      });
    }
    return this.next;
  }

  private async writeDirty(): Promise<void> {
    const pages = [...this.dirty].sort((a, b) => a - b);
    this.dirty.clear();
    this.inFlightPages = new Set(pages);
    try {
      for (const p of pages) {
        const buf = this.pageBytes(p);
        await pwrite(this.fd, buf, 0, buf.length, p * PAGE);
      }
      if (pages.length > 0) await fdatasync(this.fd);
    } catch (e) {
      for (const p of pages) this.dirty.add(p);
      throw e;
    } finally {
      this.inFlightPages = new Set();
    }
  }

  /** Current contents of one file page, taken from the in-memory images, with its number and checksum. */
  private pageBytes(p: number): Buffer {
    const buf = Buffer.alloc(PAGE);
    const { m, off } = this.locate(p);
    const img = this.images[m]!;
    if (off < img.length) buf.set(img.subarray(off, Math.min(img.length, off + BITS)), 0);
    buf.writeUInt32LE(p, BITS);
    buf.writeUInt32LE(crc(buf.subarray(0, BITS + 4)), BITS + 4);
    return buf;
  }
}

function writeTable(page0: Buffer, slots: SlotTable): void {
  const text = Buffer.from(JSON.stringify({ master: slots.master, mirrors: slots.mirrors }));
  if (text.length > TABLE_MAX) return; // hundreds of mirrors: no table, the file is read as before tables
  page0.writeUInt32LE(text.length, TABLE_AT);
  text.copy(page0, TABLE_AT + 4);
  page0.writeUInt32LE(crc(page0.subarray(TABLE_AT, TABLE_AT + 4 + text.length)), TABLE_AT + 4 + text.length);
}

/** The slot table of page 0, or undefined (none, or one that fails its checksum). */
function readTable(page0: Buffer): SlotTable | undefined {
  if (page0.length < HEADER) return undefined;
  const len = page0.readUInt32LE(TABLE_AT);
  if (len === 0 || len > TABLE_MAX) return undefined;
  const end = TABLE_AT + 4 + len;
  if (page0.readUInt32LE(end) !== crc(page0.subarray(TABLE_AT, end))) return undefined;
  try {
    const t = JSON.parse(page0.subarray(TABLE_AT + 4, end).toString()) as SlotTable;
    return typeof t.master === 'string' && Array.isArray(t.mirrors) && t.mirrors.every((m) => typeof m === 'string') ? t : undefined;
  } catch {
    return undefined;
  }
}

/**
 * The bits of an existing file for the copies `slots` names, when its slot table names others
 * (see the header comment); undefined when it has no table or the same one (opened as it is).
 */
function remap(path: string, geometry: { clusterSize: number; clusters: number; mirrors: number }, slots: SlotTable, log?: { warn(obj: object, msg: string): void }): Uint8Array[] | undefined {
  const page0 = Buffer.alloc(HEADER);
  const fd = fs.openSync(path, 'r');
  let table: SlotTable | undefined;
  let head: BitmapHeader;
  try {
    const n = fs.readSync(fd, page0, 0, HEADER, 0);
    head = HEADER_FORMAT.decode(path, page0.subarray(0, Math.min(n, HEADER_FORMAT.size)));
    table = readTable(page0.subarray(0, n));
  } finally {
    fs.closeSync(fd);
  }
  if (!table || table.mirrors.length !== head.mirrors) return undefined;
  if (table.master === slots.master && JSON.stringify(table.mirrors) === JSON.stringify(slots.mirrors)) return undefined;
  if (head.clusterSize !== geometry.clusterSize || head.clusters !== geometry.clusters || head.pageSize !== PAGE) return undefined; // refused by open, with its geometry
  // Read the file as it is, with its own number of slots (its pages' checksums checked as at any start).
  const bytes = Math.ceil(geometry.clusters / 8);
  const all = new Uint8Array(bytes).fill(0xff);
  if (geometry.clusters & 7) all[bytes - 1] = (1 << (geometry.clusters & 7)) - 1;
  const old = FileBitmapStore.readImages(path, geometry.clusters, head.mirrors);
  const sameMaster = table.master === slots.master;
  const images = slots.mirrors.map((key) => {
    const i = sameMaster ? table.mirrors.indexOf(key) : -1;
    return i >= 0 ? old[i]!.slice() : all.slice();
  });
  const kept = slots.mirrors.filter((k) => sameMaster && table.mirrors.includes(k));
  const copied = slots.mirrors.filter((k) => !kept.includes(k));
  log?.warn(
    { file: path, was: table, now: slots },
    `${path}: the bitmap was for master ${table.master} with mirrors ${table.mirrors.join(', ') || 'none'}; the configuration says master ${slots.master} with mirrors ${slots.mirrors.join(', ')} (a change of mirrors stopped by a crash?): ${kept.length ? `kept the bits of ${kept.join(', ')}` : 'kept no bits'}${copied.length ? `; ${copied.join(', ')} will be copied in full` : ''}`,
  );
  return images;
}

/** fsync the directory of `file`: a rename in it is durable only then. */
function syncDir(file: string): void {
  const dir = fs.openSync(dirname(file), 'r');
  try {
    fs.fsyncSync(dir);
  } finally {
    fs.closeSync(dir);
  }
}

/**
 * Format 1 ("BMBITMP1": a bare header, bitsets at 4096 + m * stride, no checksums) becomes
 * format 2 in place: read the bits, write a new file beside it, rename over it.
 */
function migrateV1(path: string): void {
  const fd = fs.openSync(path, 'r');
  let images: Uint8Array[];
  let geometry: { clusterSize: number; clusters: number; mirrors: number };
  try {
    const h = Buffer.alloc(20);
    if (fs.readSync(fd, h, 0, 20, 0) < 20 || !h.subarray(0, 8).equals(V1_MAGIC)) return;
    geometry = { clusterSize: h.readUInt32LE(8), clusters: h.readUInt32LE(12), mirrors: h.readUInt32LE(16) };
    const bytes = Math.ceil(geometry.clusters / 8);
    const stride = Math.ceil(bytes / PAGE) * PAGE;
    images = Array.from({ length: geometry.mirrors }, (_, i) => {
      const img = new Uint8Array(bytes);
      fs.readSync(fd, img, 0, bytes, HEADER + i * stride);
      return img;
    });
  } finally {
    fs.closeSync(fd);
  }
  const tmp = `${path}.v2`;
  const out = fs.openSync(tmp, 'w');
  try {
    const page0 = Buffer.alloc(HEADER);
    HEADER_FORMAT.encode({ ...geometry, pageSize: PAGE }).copy(page0);
    fs.writeSync(out, page0, 0, HEADER, 0);
    const perMirror = Math.max(1, Math.ceil(Math.ceil(geometry.clusters / 8) / BITS));
    for (let m = 0; m < geometry.mirrors; m++) {
      for (let k = 0; k < perMirror; k++) {
        const p = 1 + m * perMirror + k;
        const buf = Buffer.alloc(PAGE);
        buf.set(images[m]!.subarray(k * BITS, Math.min(images[m]!.length, (k + 1) * BITS)), 0);
        buf.writeUInt32LE(p, BITS);
        buf.writeUInt32LE(crc(buf.subarray(0, BITS + 4)), BITS + 4);
        fs.writeSync(out, buf, 0, PAGE, p * PAGE);
      }
    }
    fs.fdatasyncSync(out);
  } finally {
    fs.closeSync(out);
  }
  fs.renameSync(tmp, path);
}

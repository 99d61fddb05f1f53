// Persisted bitmap table of one pair, with write-intent semantics (as md's
// write-intent bitmap and DRBD's activity log):
//
//   * a bit is on disk BEFORE the write that needs it starts anywhere, so a
//     kill -9 at any moment never loses track of a cluster a mirror misses;
//   * a bit already on disk costs nothing on later writes (no I/O, no await);
//   * bits are cleared lazily, and only by the pair's cleaner after every copy
//     was flushed, so a cleared bit never hides data that only one side holds.
//
// File layout (little-endian), one file per pair:
//   0   8  magic "BMBITMP1"
//   8   4  clusterSize
//   12  4  clusters
//   16  4  mirror count
//   20  ..  zero padding to 4096
//   4096 + m * stride   mirror m's bitset (1 = may differ), stride = bitset size rounded up to 4096
//
// Marking is group-committed: writers that mark while a commit runs share the
// next one (one pwrite per dirty 4 KiB page, one fdatasync).
import fs from 'node:fs';
import { promisify } from 'node:util';

const MAGIC = Buffer.from('BMBITMP1');
const HEADER = 4096;
const PAGE = 4096;
const pwrite = promisify(fs.write);
const fdatasync = promisify(fs.fdatasync);
const RESOLVED = Promise.resolve();

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
  private readonly stride: number;
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
    this.stride = Math.ceil(Math.ceil(clusters / 8) / PAGE) * PAGE;
  }

  /**
   * Open or create the bitmap file. `loaded` is null when the file is new
   * (the caller decides whether the mirror is known identical), else the
   * persisted bits per mirror.
   */
  static async open(
    path: string,
    geometry: { clusterSize: number; clusters: number; mirrors: number },
  ): Promise<{ store: FileBitmapStore; loaded: Uint8Array[] | null }> {
    const { clusterSize, clusters, mirrors } = geometry;
    const bytes = Math.ceil(clusters / 8);
    const stride = Math.ceil(bytes / PAGE) * PAGE;
    const exists = fs.existsSync(path);
    const fd = fs.openSync(path, exists ? 'r+' : 'w+');
    try {
      if (exists) {
        const h = Buffer.alloc(20);
        fs.readSync(fd, h, 0, 20, 0);
        if (!h.subarray(0, 8).equals(MAGIC)) throw new Error(`${path} is not a blockmirror bitmap`);
        const [cs, n, m] = [h.readUInt32LE(8), h.readUInt32LE(12), h.readUInt32LE(16)];
        if (cs !== clusterSize || n !== clusters || m !== mirrors) {
          throw new Error(
            `${path} was made for clusterSize ${cs}, ${n} clusters, ${m} mirrors; the config now says ${clusterSize}, ${clusters}, ${mirrors} (move the file away to start a full copy)`,
          );
        }
        const images = Array.from({ length: mirrors }, (_, i) => {
          const img = new Uint8Array(bytes);
          fs.readSync(fd, img, 0, bytes, HEADER + i * stride);
          return img;
        });
        return { store: new FileBitmapStore(fd, clusters, mirrors, images), loaded: images.map((i) => i.slice()) };
      }
      const h = Buffer.alloc(HEADER);
      MAGIC.copy(h, 0);
      h.writeUInt32LE(clusterSize, 8);
      h.writeUInt32LE(clusters, 12);
      h.writeUInt32LE(mirrors, 16);
      fs.writeSync(fd, h, 0, HEADER, 0);
      fs.ftruncateSync(fd, HEADER + mirrors * stride);
      fs.fdatasyncSync(fd);
      const images = Array.from({ length: mirrors }, () => new Uint8Array(bytes));
      return { store: new FileBitmapStore(fd, clusters, mirrors, images), loaded: null };
    } catch (e) {
      fs.closeSync(fd);
      throw e;
    }
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
    return (HEADER + m * this.stride + byteIndex) >>> 12;
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

  /** Current contents of one file page, taken from the in-memory images. */
  private pageBytes(p: number): Buffer {
    const buf = Buffer.alloc(PAGE);
    const pos = p * PAGE - HEADER;
    const m = Math.floor(pos / this.stride);
    const off = pos - m * this.stride;
    const img = this.images[m]!;
    const end = Math.min(img.length, off + PAGE);
    if (off < img.length) buf.set(img.subarray(off, end), 0);
    return buf;
  }
}

// The increments volume of an RW S-VOL: a real volume of the storage system that holds every
// cluster the member changed since its split, so the member can be rebuilt on an RO sibling of
// the same split (Tomita claim 1). Layout on the volume:
//
//   offset        size               what
//   0             4 KiB              header "BMSVINC1": clusterSize, clusters, generation, crc
//   4 KiB         4 * clusters       changed-block map: u32 per P-VOL cluster, slot + 1 (0 = unchanged)
//   dataStart     clusterSize * n    slots: the member's whole cluster as it is now
//
// A first write to a cluster copies the cluster's base (the member's, or a sibling's if the
// member failed) into a fresh slot with the write laid over it; the map entry is written after
// the slot, so a crash never points the map at a half-written slot. Later writes to the
// cluster go into its slot. No slot left: ENOSPC, said once in the log.
import * as BL from 'buffer-layout';
import type { Logger } from 'pino';
import { BlockDeviceError, copyPayload, payloadLength, type BlockDevice, type Payload } from '../../blockdev/types.js';
import { FileFormat, FormatError } from '../../util/format.js';

const FORMAT = new FileFormat<{ clusterSize: number; clusters: number; generation: number }>('increments volume', 'BMSVINC1', 1, [
  BL.u32('clusterSize'),
  BL.u32('clusters'),
  BL.u32('generation'),
]);
const MAP_AT = 4096;

/** Bytes an increments volume needs before its first slot (config-svol.ts checks the same). */
export function incrementsDataStart(clusters: number, clusterSize: number): number {
  return Math.ceil((MAP_AT + 4 * clusters) / clusterSize) * clusterSize;
}

export class IncrementsVolume {
  /** Slot + 1 per P-VOL cluster, 0 when unchanged. */
  private map: Uint32Array;
  private used = 0;
  private fullSaid = false;
  /** Map writes completed, and how many of them a completed flush covers (both only grow, across resets too). */
  private mapped = 0;
  private mappedDurable = 0;
  generation = 0;
  readonly slots: number;
  private readonly dataStart: number;

  constructor(
    readonly device: BlockDevice,
    /** Names it in messages: "vol9 (increments of vol3 in group backup)". */
    readonly label: string,
    private readonly clusterSize: number,
    private readonly clusters: number,
    private readonly logger: Logger,
  ) {
    this.map = new Uint32Array(clusters);
    this.dataStart = incrementsDataStart(clusters, clusterSize);
    this.slots = Math.max(0, Math.floor((device.size - this.dataStart) / clusterSize));
  }

  /** Read the header and map; a volume that holds no header yet is formatted for `generation`. */
  async open(generation: number): Promise<void> {
    const head = Buffer.alloc(FORMAT.size);
    await this.device.read(0, head);
    if (!FORMAT.matches(head)) return this.reset(generation);
    const h = FORMAT.decode(this.label, head);
    if (h.clusterSize !== this.clusterSize || h.clusters !== this.clusters) {
      throw new FormatError(this.label, `was made for clusterSize ${h.clusterSize} and ${h.clusters} clusters, the configuration now says ${this.clusterSize} and ${this.clusters}`);
    }
    this.generation = h.generation;
    const raw = Buffer.alloc(4 * this.clusters);
    await this.device.read(MAP_AT, raw);
    this.used = 0;
    for (let c = 0; c < this.clusters; c++) {
      const v = raw.readUInt32LE(4 * c);
      this.map[c] = v;
      if (v > this.used) this.used = v;
    }
  }

  /** Forget every change: a new split (or a resync) starts an empty log for `generation`. */
  async reset(generation: number): Promise<void> {
    await this.device.zero(MAP_AT, this.dataStart - MAP_AT);
    await this.device.write(0, FORMAT.encode({ clusterSize: this.clusterSize, clusters: this.clusters, generation }));
    await this.device.flush();
    this.map = new Uint32Array(this.clusters);
    this.used = 0;
    this.generation = generation;
    this.fullSaid = false;
  }

  has(c: number): boolean {
    return this.map[c] !== 0;
  }

  /** Changed clusters. */
  get count(): number {
    let n = 0;
    for (const v of this.map) if (v) n++;
    return n;
  }

  /** Bytes of data held (whole clusters). */
  get bytes(): number {
    return this.used * this.clusterSize;
  }

  get capacity(): number {
    return this.slots * this.clusterSize;
  }

  *changed(): Generator<number> {
    for (let c = 0; c < this.clusters; c++) if (this.map[c]) yield c;
  }

  /** Read `dest.length` bytes of cluster c's slot from `within` bytes into it. */
  read(c: number, within: number, dest: Buffer): Promise<void> {
    return this.device.read(this.dataStart + (this.map[c]! - 1) * this.clusterSize + within, dest);
  }

  /**
   * Log a write of `data` at `offset` (P-VOL byte address). `base(c, buf)` fills a whole cluster
   * with what the member holds there before the write; it is asked only for a new cluster the
   * write covers in part. `alongside`, the member's own write, starts once those reads are done
   * and runs with the increments' writes. The caller holds the range locked.
   *
   *   step                                   why
   *   slots for every new cluster, at once   ENOSPC before anything is written; a run of new
   *                                          clusters gets consecutive slots
   *   base of new clusters covered in part   before `alongside` changes the member under them
   *   slot writes, coalesced                 a 1 MiB write to new clusters is one write
   *   map entries, coalesced                 after the slots: a crash never maps a half slot
   */
  async log(offset: number, data: Payload, size: number, base: (c: number, buf: Buffer) => Promise<void>, alongside?: () => Promise<void>): Promise<void> {
    const cs = this.clusterSize;
    const end = offset + payloadLength(data);
    const first = Math.floor(offset / cs);
    const last = Math.floor((end - 1) / cs);
    let fresh = 0;
    for (let c = first; c <= last; c++) if (!this.map[c]) fresh++;
    if (this.used + fresh > this.slots) {
      if (!this.fullSaid) this.logger.error({ increments: this.label, slots: this.slots }, `${this.label} is full (${this.used} clusters changed since the split): writes fail with ENOSPC until a resync or a larger increments volume`);
      this.fullSaid = true;
      throw new BlockDeviceError('ENOSPC', `${this.label} is full: ${this.used} of ${this.slots} slots used, this write needs ${fresh} more`);
    }
    // Slots are taken before the first await: a concurrent writer of other clusters takes the next ones.
    const slots: number[] = [];
    for (let c = first; c <= last; c++) slots.push(this.map[c] || ++this.used);
    // The host's pieces are written as they came (views, no gathering copy: a fresh 1 MiB buffer
    // per write costs more than the write itself).
    const writes: { at: number; bufs: Buffer[] }[] = [];
    const mapped: { c: number; slot: number }[] = [];
    for (let c = first; c <= last; c++) {
      const cStart = c * cs;
      const cEnd = Math.min(cStart + cs, size);
      const from = Math.max(offset, cStart);
      const to = Math.min(end, cEnd);
      const piece = slicePayload(data, from - offset, to - offset);
      const slot = slots[c - first]!;
      const slotAt = this.dataStart + (slot - 1) * cs;
      if (this.map[c]) {
        writes.push({ at: slotAt + (from - cStart), bufs: piece });
        continue;
      }
      let bufs = piece;
      if (from !== cStart || to !== cEnd) {
        const buf = Buffer.allocUnsafe(cEnd - cStart);
        await base(c, buf);
        copyPayload(piece, buf, from - cStart);
        bufs = [buf];
      }
      writes.push({ at: slotAt, bufs });
      mapped.push({ c, slot });
    }
    const member = alongside?.();
    const logged = (async () => {
      await Promise.all(coalesce(writes).map((w) => this.device.write(w.at, w.bufs)));
      const entries: { at: number; bufs: Buffer[] }[] = [];
      for (const { c, slot } of mapped) {
        const e = Buffer.allocUnsafe(4);
        e.writeUInt32LE(slot);
        entries.push({ at: MAP_AT + 4 * c, bufs: [e] });
      }
      await Promise.all(coalesce(entries).map((w) => this.device.write(w.at, w.bufs)));
      for (const { c, slot } of mapped) this.map[c] = slot;
      if (mapped.length) this.mapped++;
    })();
    const [a, b] = await Promise.allSettled([logged, member]);
    if (a.status === 'rejected') throw a.reason;
    if (b?.status === 'rejected') throw b.reason;
  }

  async flush(): Promise<void> {
    const upto = this.mapped;
    await this.device.flush();
    if (upto > this.mappedDurable) this.mappedDurable = upto;
  }

  /**
   * Every map entry written so far is durable: the member's volume may take the clusters' new
   * bytes (destage, a restore's apply) without a crash leaving a change there that neither this
   * map nor the group's bitmap knows. One flush covers every entry written before it.
   */
  mapDurable(): Promise<void> {
    return this.mappedDurable < this.mapped ? this.flush() : Promise.resolve();
  }
}

/** Writes that follow each other on the volume, joined into one write of several pieces. */
function coalesce(writes: { at: number; bufs: Buffer[] }[]): { at: number; bufs: Buffer[] }[] {
  const out: { at: number; bufs: Buffer[]; end: number }[] = [];
  for (const w of writes) {
    const prev = out[out.length - 1];
    const len = payloadLength(w.bufs);
    if (prev && prev.end === w.at) {
      prev.bufs.push(...w.bufs);
      prev.end += len;
    } else out.push({ at: w.at, bufs: [...w.bufs], end: w.at + len });
  }
  return out;
}

/** Bytes start..end of a payload, as views of its pieces. */
function slicePayload(p: Payload, start: number, end: number): Buffer[] {
  if (Buffer.isBuffer(p)) return [p.subarray(start, end)];
  const out: Buffer[] = [];
  let at = 0;
  for (const b of p) {
    const s = Math.max(start, at);
    const e = Math.min(end, at + b.length);
    if (s < e) out.push(b.subarray(s - at, e - at));
    at += b.length;
    if (at >= end) break;
  }
  return out;
}

// Checksums of what the group wrote to each member volume, so a read that returns other bytes
// (a silent data error: bad media, a bad cable, the fault layer's `corrupt`) is caught on read,
// served from a sibling, and the member rebuilt (Tomita step 6), instead of waiting for
// `svol verify`.
//
// One CRC32C per 4 KiB block of every member and spare (not the P-VOL, not increments volumes).
// A cluster's checksums are its blocks': 4 KiB rather than a whole cluster, so a 4 KiB host read
// checks only what it reads. A block's checksum is "known" once the group wrote the whole block
// (a copy, a mirrored P-VOL write or zero, an RW write, a restore); a write of part of a block,
// or a trim (what it leaves is the backend's), makes it unknown, and an unknown block is not checked.
//
// Kept in DATADIR/svol/NAME.sums, rewritten whole at start (marked unclean), at split, when a
// restore ends and at a clean close:
//
//   offset  size               field
//   0       ..                 header BMSVSUM1: blockSize, blocks, generation, clean, volumes, bodyCrc
//   ..      per volume         u32 volume id, blocks x u32 CRC32C, blocks x u8 known
//
// After a crash (clean = 0) only what cannot have changed since the save is trusted: the tables of
// split members of the generation the file was saved at, without the clusters an RW member
// changed since (the caller decides, with `keepOnly`). Never a false alarm: a table that may be
// stale is dropped, which only means fewer blocks checked until they are written again.
import fs from 'node:fs';
import * as BL from 'buffer-layout';
import { crc32c } from '../../util/crc32c.js';
import type { Logger } from 'pino';
import type { Payload } from '../../blockdev/types.js';
import { crc, FileFormat, FormatError } from '../../util/format.js';

export const SUM_BLOCK = 4096;

const FORMAT = new FileFormat<{ blockSize: number; blocks: number; generation: number; clean: number; volumes: number; bodyCrc: number }>('S-VOL checksum file', 'BMSVSUM1', 1, [
  BL.u32('blockSize'),
  BL.u32('blocks'),
  BL.u32('generation'),
  BL.u32('clean'),
  BL.u32('volumes'),
  BL.u32('bodyCrc'),
]);

interface Table {
  crcs: Uint32Array;
  known: Uint8Array;
}

/** Where a read's bytes disagree with what was written there. */
export interface Mismatch {
  offset: number;
  stored: number;
  computed: number;
}

export class ChecksumTables {
  readonly blocks: number;
  private readonly tables = new Map<number, Table>();

  constructor(
    readonly size: number,
    private readonly file: string | undefined,
    private readonly log: Logger,
  ) {
    this.blocks = Math.ceil(size / SUM_BLOCK);
  }

  private table(vol: number): Table {
    let t = this.tables.get(vol);
    if (!t) this.tables.set(vol, (t = { crcs: new Uint32Array(this.blocks), known: new Uint8Array(this.blocks) }));
    return t;
  }

  /** Blocks of [offset, offset+length) become unknown: a write to them is starting. */
  forget(vol: number, offset: number, length: number): void {
    const t = this.tables.get(vol);
    if (!t || length <= 0) return;
    t.known.fill(0, Math.floor(offset / SUM_BLOCK), Math.ceil((offset + length) / SUM_BLOCK));
  }

  /** Forget a whole volume (it left the group's service, or its contents are not known). */
  forgetVolume(vol: number): void {
    this.tables.delete(vol);
  }

  /**
   * `data` (or zeroes, when null) was written at `offset`: the blocks it covers whole get its
   * checksum; blocks it covers in part stay unknown (forget() ran before the write).
   */
  record(vol: number, offset: number, length: number, data: Payload | null, from?: number): void {
    const t = this.table(vol);
    const first = Math.ceil(offset / SUM_BLOCK);
    const end = offset + length;
    const src = from === undefined ? undefined : this.tables.get(from);
    if (src && Buffer.isBuffer(data) && offset % SUM_BLOCK === 0) return this.recordCopy(t, src, offset, data);
    const pieces: readonly Buffer[] = data === null ? [] : Buffer.isBuffer(data) ? [data] : data;
    if (first * SUM_BLOCK >= end) return;
    let piece = 0;
    let within = 0;
    // Skip to the first whole block.
    let skip = first * SUM_BLOCK - offset;
    while (data !== null && skip > 0) {
      const left = pieces[piece]!.length - within;
      const n = Math.min(left, skip);
      within += n;
      skip -= n;
      if (within === pieces[piece]!.length) (piece++, (within = 0));
    }
    for (let b = first; b * SUM_BLOCK < end; b++) {
      const blockLen = Math.min(SUM_BLOCK, this.size - b * SUM_BLOCK);
      if (b * SUM_BLOCK + blockLen > end) break;
      let sum = 0;
      if (data === null) sum = zeroCrc(blockLen);
      else {
        let need = blockLen;
        while (need > 0) {
          const p = pieces[piece]!;
          const n = Math.min(p.length - within, need);
          sum = crc32c(p.subarray(within, within + n), sum);
          within += n;
          need -= n;
          if (within === p.length) (piece++, (within = 0));
        }
      }
      t.crcs[b] = sum >>> 0;
      t.known[b] = 1;
    }
  }

  /**
   * `data`, a block-aligned copy of volume `src`'s bytes, was written at `offset`: a block whose
   * checksum `src` knows gets that one (the read that fetched it was checked against it), the
   * others are computed. Half the CRC work of a restore.
   */
  private recordCopy(t: Table, src: Table, offset: number, data: Buffer): void {
    const first = offset / SUM_BLOCK;
    for (let k = 0; k * SUM_BLOCK < data.length; k++) {
      const b = first + k;
      const blockLen = Math.min(SUM_BLOCK, this.size - b * SUM_BLOCK);
      // A block the write covers in part stays unknown (forget() ran before the write).
      if (k * SUM_BLOCK + blockLen > data.length) break;
      t.crcs[b] = src.known[b] ? src.crcs[b]! : crc32c(data.subarray(k * SUM_BLOCK, k * SUM_BLOCK + blockLen)) >>> 0;
      t.known[b] = 1;
    }
  }

  /**
   * Might `vol` hold anything but zeroes in [offset, offset+length) by its checksums? False when
   * every block there is unknown or known as zeroes: a hole of the volume there is its real
   * contents, not a block that lost its data.
   */
  knownNonZero(vol: number, offset: number, length: number): boolean {
    const t = this.tables.get(vol);
    if (!t) return false;
    const end = Math.ceil((offset + length) / SUM_BLOCK);
    for (let b = Math.floor(offset / SUM_BLOCK); b < end; b++) {
      if (t.known[b] && t.crcs[b] !== zeroCrc(Math.min(SUM_BLOCK, this.size - b * SUM_BLOCK))) return true;
    }
    return false;
  }

  /**
   * Check `buf`, read from `vol` at `offset` (block-aligned; it may end at the volume's end).
   * Returns the first block whose known checksum the bytes fail, or undefined.
   */
  check(vol: number, offset: number, buf: Buffer): Mismatch | undefined {
    const t = this.tables.get(vol);
    if (!t) return undefined;
    const first = offset / SUM_BLOCK;
    for (let k = 0; k * SUM_BLOCK < buf.length; k++) {
      const b = first + k;
      if (!t.known[b]) continue;
      const computed = crc32c(buf.subarray(k * SUM_BLOCK, Math.min(buf.length, (k + 1) * SUM_BLOCK))) >>> 0;
      if (computed !== t.crcs[b]) return { offset: b * SUM_BLOCK, stored: t.crcs[b]!, computed };
    }
    return undefined;
  }

  /** Blocks of `vol` whose checksum is known (status, tests). */
  knownBlocks(vol: number): number {
    const t = this.tables.get(vol);
    if (!t) return 0;
    let n = 0;
    for (const k of t.known) n += k;
    return n;
  }

  /** After a crash: keep only these volumes' tables, and in them only the blocks `keep` says. */
  keepOnly(vols: Map<number, (block: number) => boolean>): void {
    for (const [vol, t] of this.tables) {
      const keep = vols.get(vol);
      if (!keep) {
        this.tables.delete(vol);
        continue;
      }
      for (let b = 0; b < this.blocks; b++) if (t.known[b] && !keep(b)) t.known[b] = 0;
    }
  }

  /** Read the file; returns its generation and whether it was closed cleanly, or undefined (none, or not usable). */
  load(): { generation: number; clean: boolean } | undefined {
    if (!this.file) return undefined;
    let buf: Buffer;
    try {
      buf = fs.readFileSync(this.file);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
      throw new FormatError(this.file, `cannot read the checksums: ${(e as Error).message}`, { cause: e });
    }
    // A damaged checksum file costs only checks until blocks are written again: say so, go on.
    const drop = (why: string) => {
      this.log.warn({ file: this.file }, `${this.file}: ${why}; member reads are not checked until their blocks are written again (svol verify still compares them)`);
      return undefined;
    };
    let h;
    try {
      h = FORMAT.decode(this.file, buf);
    } catch (e) {
      return drop((e as Error).message);
    }
    if (h.blockSize !== SUM_BLOCK || h.blocks !== this.blocks) return drop(`made for ${h.blocks} blocks of ${h.blockSize} bytes, the volumes now have ${this.blocks} of ${SUM_BLOCK}`);
    const per = 4 + 5 * this.blocks;
    const body = buf.subarray(FORMAT.size);
    if (body.length !== per * h.volumes || crc(body) !== h.bodyCrc) return drop('the checksum tables are truncated or damaged');
    for (let v = 0; v < h.volumes; v++) {
      const at = v * per;
      const vol = body.readUInt32LE(at);
      const crcs = new Uint32Array(this.blocks);
      Buffer.from(crcs.buffer).set(body.subarray(at + 4, at + 4 + 4 * this.blocks));
      const known = new Uint8Array(body.subarray(at + 4 + 4 * this.blocks, at + per));
      this.tables.set(vol, { crcs, known });
    }
    return { generation: h.generation, clean: h.clean === 1 };
  }

  /** Write every table, atomically (tmp, fsync, rename). */
  save(generation: number, clean: boolean): void {
    if (!this.file) return;
    const per = 4 + 5 * this.blocks;
    const body = Buffer.alloc(per * this.tables.size);
    let at = 0;
    for (const [vol, t] of this.tables) {
      body.writeUInt32LE(vol, at);
      Buffer.from(t.crcs.buffer, t.crcs.byteOffset, t.crcs.byteLength).copy(body, at + 4);
      body.set(t.known, at + 4 + 4 * this.blocks);
      at += per;
    }
    const head = FORMAT.encode({ blockSize: SUM_BLOCK, blocks: this.blocks, generation, clean: clean ? 1 : 0, volumes: this.tables.size, bodyCrc: crc(body) });
    const tmp = `${this.file}.tmp`;
    const fd = fs.openSync(tmp, 'w');
    try {
      fs.writeSync(fd, head);
      fs.writeSync(fd, body);
      fs.fsyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
    fs.renameSync(tmp, this.file);
  }
}

const zeroCrcs = new Map<number, number>();
function zeroCrc(len: number): number {
  let c = zeroCrcs.get(len);
  if (c === undefined) zeroCrcs.set(len, (c = crc32c(Buffer.alloc(len)) >>> 0));
  return c;
}

// Block commands (SBC-3): READ/WRITE 6/10/12/16, VERIFY and WRITE AND VERIFY, WRITE SAME, UNMAP,
// SYNCHRONIZE CACHE, COMPARE AND WRITE, GET LBA STATUS, READ CAPACITY 10/16.
//
//   CDB      LBA bytes   length bytes   flags byte 1
//   6        1..3 (21b)  4 (0 = 256)    -
//   10       2..5        7..8           PROTECT 7..5, DPO 0x10, FUA 0x08, (WS: UNMAP 0x08, ANCHOR 0x10)
//   12       2..5        6..9           as 10
//   16       2..9        10..13         as 10 (WS16: NDOB 0x01)
import { BLOCK_SHIFT, BLOCK_SIZE, ScsiOp } from './constants.js';
import { Limits } from './inquiry.js';
import { invalidField, invalidParameter, lbaOutOfRange, miscompare, parameterListLength, writeProtected } from './sense.js';
import type { BlockDevice } from '../../blockdev/types.js';
import type { AtomicDevice } from '../../blockdev/atomic.js';
import { State } from '../../protocol/constants.js';
import { ioBuffers } from '../../util/buffer-pool.js';

export interface BlockRange {
  lba: bigint;
  blocks: number;
  flags: number;
}

export function decodeRange(cdb: Buffer): BlockRange {
  switch (cdb[0]! >> 5) {
    case 0: {
      const blocks = cdb[4]!;
      return { lba: BigInt(((cdb[1]! & 0x1f) << 16) | cdb.readUInt16BE(2)), blocks: blocks === 0 && cdb[0] !== ScsiOp.WRITE_SAME_10 ? 256 : blocks, flags: 0 };
    }
    case 1:
    case 2:
      return { lba: BigInt(cdb.readUInt32BE(2)), blocks: cdb.readUInt16BE(7), flags: cdb[1]! };
    case 5:
      return { lba: BigInt(cdb.readUInt32BE(2)), blocks: cdb.readUInt32BE(6), flags: cdb[1]! };
    default:
      return { lba: cdb.readBigUInt64BE(2), blocks: cdb.readUInt32BE(10), flags: cdb[1]! };
  }
}

export function capacityBlocks(dev: BlockDevice): bigint {
  return BigInt(Math.floor(dev.size / BLOCK_SIZE));
}

/** LBA range check first (LBA OUT OF RANGE), then the transfer limit (INVALID FIELD), as SBC-3 orders them. */
export function checkRange(dev: BlockDevice, r: BlockRange, maxBlocks: number, lengthByte: number): { offset: number; length: number } {
  if (r.lba + BigInt(r.blocks) > capacityBlocks(dev)) throw lbaOutOfRange();
  if (r.blocks > maxBlocks) throw invalidField(lengthByte);
  return { offset: Number(r.lba) * BLOCK_SIZE, length: r.blocks * BLOCK_SIZE };
}

function lengthByteOf(op: number): number {
  const group = op >> 5;
  return group === 0 ? 4 : group === 5 ? 6 : group === 4 ? 10 : 7;
}

function noProtection(cdb: Buffer): void {
  if (cdb[0]! >> 5 !== 0 && cdb[1]! & 0xe0) throw invalidField(1, 5);
}

export async function read(dev: BlockDevice, cdb: Buffer): Promise<Buffer> {
  noProtection(cdb);
  const r = decodeRange(cdb);
  const { offset, length } = checkRange(dev, r, Limits.maxTransferBlocks, lengthByteOf(cdb[0]!));
  // From the pool (the connection gives it back once sent, ScsiResult.pooled): a fresh buffer per
  // READ is an mmap and page faults from 128 KiB on.
  const buf = ioBuffers.get(length);
  if (length) {
    try {
      await dev.read(offset, buf);
    } catch (e) {
      ioBuffers.put(buf);
      throw e;
    }
  }
  return buf;
}

/** Bytes of Data-Out the command wants (for residuals and R2T). */
export function dataOutLength(cdb: Buffer): number {
  const op = cdb[0]!;
  switch (op) {
    case ScsiOp.WRITE_6:
    case ScsiOp.WRITE_10:
    case ScsiOp.WRITE_12:
    case ScsiOp.WRITE_16:
    case ScsiOp.WRITE_AND_VERIFY_10:
    case ScsiOp.WRITE_AND_VERIFY_12:
    case ScsiOp.WRITE_AND_VERIFY_16:
    case ScsiOp.ORWRITE_16:
      return decodeRange(cdb).blocks * BLOCK_SIZE;
    case ScsiOp.VERIFY_10:
    case ScsiOp.VERIFY_12:
    case ScsiOp.VERIFY_16: {
      const bytchk = (cdb[1]! >> 1) & 3;
      return bytchk === 0 ? 0 : bytchk === 3 ? BLOCK_SIZE : decodeRange(cdb).blocks * BLOCK_SIZE;
    }
    case ScsiOp.WRITE_SAME_10:
    case ScsiOp.WRITE_SAME_16:
      return op === ScsiOp.WRITE_SAME_16 && cdb[1]! & 0x01 ? 0 : BLOCK_SIZE;
    case ScsiOp.COMPARE_AND_WRITE:
      return cdb[13]! * 2 * BLOCK_SIZE;
    case ScsiOp.UNMAP:
      return cdb.readUInt16BE(7);
    case ScsiOp.MODE_SELECT_6:
      return cdb[4]!;
    case ScsiOp.MODE_SELECT_10:
      return cdb.readUInt16BE(7);
    case ScsiOp.PERSISTENT_RESERVE_OUT:
      return cdb.readUInt32BE(5);
    default:
      return 0;
  }
}

export async function write(dev: BlockDevice, cdb: Buffer, data: Buffer, forceFua: boolean, swp: boolean): Promise<void> {
  noProtection(cdb);
  const r = decodeRange(cdb);
  const { offset, length } = checkRange(dev, r, Limits.maxTransferBlocks, lengthByteOf(cdb[0]!));
  if (dev.readOnly || swp) throw writeProtected();
  // An initiator that sent less than the CDB asks for (iSCSI underflow) gets the whole blocks it sent written.
  const n = Math.min(length, data.length - (data.length % BLOCK_SIZE));
  if (n === 0) return;
  const fua = forceFua || (cdb[0]! >> 5 !== 0 && (cdb[1]! & 0x08) !== 0) || cdb[0] === ScsiOp.WRITE_AND_VERIFY_10 || cdb[0] === ScsiOp.WRITE_AND_VERIFY_12 || cdb[0] === ScsiOp.WRITE_AND_VERIFY_16;
  await dev.write(offset, data.subarray(0, n), fua);
}

export async function verify(dev: BlockDevice, cdb: Buffer, data: Buffer | undefined): Promise<void> {
  if (cdb[1]! & 0xe0) throw invalidField(1, 5);
  const bytchk = (cdb[1]! >> 1) & 3;
  if (bytchk === 2) throw invalidField(1, 1);
  const r = decodeRange(cdb);
  const { offset, length } = checkRange(dev, r, Limits.maxTransferBlocks, lengthByteOf(cdb[0]!));
  if (length === 0) return;
  const cur = Buffer.allocUnsafe(length);
  await dev.read(offset, cur); // BYTCHK 0: a medium check, which reading is
  if (bytchk === 0) return;
  for (let i = 0; i < length; i++) {
    const want = bytchk === 3 ? data![i % BLOCK_SIZE] : data![i];
    if (cur[i] !== want) throw miscompare(i);
  }
}

export async function writeSame(dev: BlockDevice, cdb: Buffer, data: Buffer | undefined, forceFua: boolean, swp: boolean): Promise<void> {
  const op = cdb[0]!;
  if (cdb[1]! & 0xe0) throw invalidField(1, 5);
  if (cdb[1]! & 0x10) throw invalidField(1, 4); // ANCHOR: we never anchor
  const unmap = (cdb[1]! & 0x08) !== 0;
  const ndob = op === ScsiOp.WRITE_SAME_16 && (cdb[1]! & 0x01) !== 0;
  const r = decodeRange(cdb);
  if (r.blocks === 0) throw invalidField(op === ScsiOp.WRITE_SAME_16 ? 10 : 7); // WSNZ
  const { offset, length } = checkRange(dev, r, Limits.maxWriteSameBlocks, op === ScsiOp.WRITE_SAME_16 ? 10 : 7);
  if (dev.readOnly || swp) throw writeProtected();
  const block = ndob ? Buffer.alloc(BLOCK_SIZE) : data!.subarray(0, BLOCK_SIZE);
  const zero = block.every((b) => b === 0);
  if (zero && unmap) return dev.trim(offset, length, forceFua);
  if (zero) return dev.zero(offset, length, { noHole: true, fua: forceFua });
  // Non-zero pattern: write it in chunks of up to 1 MiB.
  const chunkBlocks = Math.min(r.blocks, 2048);
  const chunk = Buffer.allocUnsafe(chunkBlocks * BLOCK_SIZE);
  for (let i = 0; i < chunkBlocks; i++) block.copy(chunk, i * BLOCK_SIZE);
  for (let done = 0; done < length; done += chunk.length) {
    const n = Math.min(chunk.length, length - done);
    await dev.write(offset + done, chunk.subarray(0, n), forceFua);
  }
}

export async function unmap(dev: BlockDevice, cdb: Buffer, data: Buffer | undefined, swp: boolean): Promise<void> {
  if (cdb[1]! & 0x01) throw invalidField(1, 0); // ANCHOR
  const listLength = cdb.readUInt16BE(7);
  if (listLength === 0) return;
  if (listLength < 8 || !data || data.length < 8) throw parameterListLength();
  if (dev.readOnly || swp) throw writeProtected();
  const descLength = data.readUInt16BE(2);
  if (descLength % 16 !== 0 || 8 + descLength > data.length) throw parameterListLength();
  const n = descLength / 16;
  if (n > Limits.maxUnmapDescriptors) throw invalidParameter(2);
  const cap = capacityBlocks(dev);
  const ranges: Array<[number, number]> = [];
  for (let i = 0; i < n; i++) {
    const lba = data.readBigUInt64BE(8 + i * 16);
    const blocks = data.readUInt32BE(16 + i * 16);
    if (lba + BigInt(blocks) > cap) throw lbaOutOfRange();
    if (blocks > Limits.maxUnmapBlocks) throw invalidParameter(16 + i * 16);
    if (blocks) ranges.push([Number(lba) * BLOCK_SIZE, blocks * BLOCK_SIZE]);
  }
  for (const [offset, length] of ranges) await dev.trim(offset, length);
}

/** PRE-FETCH 10/16: a hint to the volume stack's cache layer. */
export async function preFetch(dev: BlockDevice, cdb: Buffer): Promise<void> {
  const r = cdb[0] === ScsiOp.PRE_FETCH_16 ? { lba: cdb.readBigUInt64BE(2), blocks: cdb.readUInt32BE(10), flags: 0 } : { lba: BigInt(cdb.readUInt32BE(2)), blocks: cdb.readUInt16BE(7), flags: 0 };
  if (r.lba + BigInt(r.blocks) > capacityBlocks(dev)) throw lbaOutOfRange();
  const length = r.blocks ? r.blocks * BLOCK_SIZE : dev.size - Number(r.lba) * BLOCK_SIZE;
  if (length > 0) await dev.cache?.(Number(r.lba) * BLOCK_SIZE, Math.min(length, 64 << 20));
}

export async function synchronizeCache(dev: BlockDevice, cdb: Buffer): Promise<void> {
  const r = cdb[0] === ScsiOp.SYNCHRONIZE_CACHE_16 ? { lba: cdb.readBigUInt64BE(2), blocks: cdb.readUInt32BE(10), flags: 0 } : { lba: BigInt(cdb.readUInt32BE(2)), blocks: cdb.readUInt16BE(7), flags: 0 };
  if (r.lba + BigInt(r.blocks) > capacityBlocks(dev)) throw lbaOutOfRange();
  await dev.flush();
}

export async function compareAndWrite(atomic: AtomicDevice, cdb: Buffer, data: Buffer, forceFua: boolean, swp: boolean): Promise<void> {
  if (cdb[1]! & 0xe0) throw invalidField(1, 5);
  const blocks = cdb[13]!;
  const r = { lba: cdb.readBigUInt64BE(2), blocks, flags: cdb[1]! };
  const { offset, length } = checkRange(atomic, r, Limits.maxCompareAndWriteBlocks, 13);
  if (atomic.readOnly || swp) throw writeProtected();
  if (blocks === 0) return;
  const fua = forceFua || (cdb[1]! & 0x08) !== 0;
  await atomic.compareAndWrite(offset, data.subarray(0, length), data.subarray(length, 2 * length), fua);
}

/** ORWRITE(16) (SBC-3 5.8): each block becomes its old contents OR the data, atomically. */
export async function orWrite(atomic: AtomicDevice, cdb: Buffer, data: Buffer, forceFua: boolean, swp: boolean): Promise<void> {
  if (cdb[1]! & 0xe0) throw invalidField(1, 5);
  const r = decodeRange(cdb);
  const { offset, length } = checkRange(atomic, r, Limits.maxTransferBlocks, 10);
  if (atomic.readOnly || swp) throw writeProtected();
  if (length === 0) return;
  const bits = data.subarray(0, length);
  await atomic.readModifyWrite(offset, length, (cur) => {
    for (let i = 0; i < cur.length; i++) cur[i] = cur[i]! | (bits[i] ?? 0);
    return cur;
  }, forceFua || (cdb[1]! & 0x08) !== 0);
}

export function readCapacity10(dev: BlockDevice, cdb: Buffer): Buffer {
  if (!(cdb[8]! & 0x01) && cdb.readUInt32BE(2) !== 0) throw invalidField(2); // LBA set without PMI
  const last = capacityBlocks(dev) - 1n;
  const b = Buffer.alloc(8);
  b.writeUInt32BE(last > 0xffffffffn ? 0xffffffff : Number(last), 0);
  b.writeUInt32BE(BLOCK_SIZE, 4);
  return b;
}

export function readCapacity16(dev: BlockDevice, lbpme: boolean): Buffer {
  const b = Buffer.alloc(32);
  b.writeBigUInt64BE(capacityBlocks(dev) - 1n, 0);
  b.writeUInt32BE(BLOCK_SIZE, 8);
  // LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT 0: allocation is reported per 512-byte block.
  b[14] = lbpme ? 0x80 | 0x40 : 0; // LBPME, LBPRZ
  return b;
}

/** GET LBA STATUS from the device's allocation: only a hole is "deallocated"; data (and anything unsure) is mapped. */
export async function getLbaStatus(dev: BlockDevice, cdb: Buffer): Promise<Buffer> {
  const lba = cdb.readBigUInt64BE(2);
  const alloc = cdb.readUInt32BE(10);
  const cap = capacityBlocks(dev);
  if (lba >= cap) throw lbaOutOfRange();
  const maxDescs = Math.max(1, Math.min(64, Math.floor((Math.max(alloc, 24) - 8) / 16)));
  const offset = Number(lba) * BLOCK_SIZE;
  const span = Math.min(dev.size - offset, 64 << 20);
  const extents = await dev.extents(offset, span);
  // Block granularity: a block with any data byte is mapped; only whole blocks of hole are deallocated.
  const runs: Array<{ start: number; end: number; status: number }> = [];
  let pos = offset;
  for (const e of extents) {
    const end = Math.min(pos + e.length, offset + span);
    const hole = (e.flags & State.HOLE) !== 0;
    const start = hole ? Math.ceil(pos / BLOCK_SIZE) : Math.floor(pos / BLOCK_SIZE);
    const stop = hole ? Math.floor(end / BLOCK_SIZE) : Math.ceil(end / BLOCK_SIZE);
    if (stop > start) runs.push({ start, end: stop, status: hole ? 1 : 0 });
    pos = end;
    if (pos >= offset + span) break;
  }
  const descs: Buffer[] = [];
  let cur: { start: number; end: number; status: number } | undefined;
  const flush = () => {
    if (!cur || descs.length >= maxDescs) return;
    const d = Buffer.alloc(16);
    d.writeBigUInt64BE(BigInt(cur.start), 0);
    d.writeUInt32BE(cur.end - cur.start, 8);
    d[12] = cur.status;
    descs.push(d);
  };
  for (const run of runs) {
    const start = cur ? Math.max(run.start, cur.end) : run.start;
    if (start >= run.end) continue;
    if (cur && start > cur.end) {
      // A gap is a block shared by a hole and data: mapped.
      if (cur.status === 0) cur.end = start;
      else {
        flush();
        cur = { start: cur.end, end: start, status: 0 };
      }
    }
    if (cur && cur.status === run.status) cur.end = run.end;
    else {
      flush();
      cur = { start, end: run.end, status: run.status };
    }
  }
  flush();
  const out = Buffer.alloc(8 + descs.length * 16);
  out.writeUInt32BE(4 + descs.length * 16, 0);
  descs.forEach((d, i) => d.copy(out, 8 + i * 16));
  return out;
}

export const BLOCK_BYTES = 1 << BLOCK_SHIFT;

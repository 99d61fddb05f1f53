// The persisted record of one S-VOL group: DATADIR/svol/NAME.group, written by atomic replace
// with fsync (a crash leaves the old record or the new one). A buffer-layout header
// (util/format.ts) carries the version and a checksum of the JSON body after it:
//
//   offset  size  field
//   0       8     magic "BMSVOLG1"
//   8       2     version (1)
//   10      2     header length
//   12      4     bodyLength   bytes of JSON after the header
//   16      4     bodyCrc      CRC32C of those bytes
//   20      4     crc          of the header
//   24      ..    JSON: the logical->physical map, attributes, states, split generation, restore
//
// A damaged or foreign record stops the start with a FormatError: never a silent remap.
import fs from 'node:fs';
import * as BL from 'buffer-layout';
import * as z from 'zod';
import { crc, FileFormat, FormatError } from '../../util/format.js';

const FORMAT = new FileFormat<{ bodyLength: number; bodyCrc: number }>('S-VOL group record', 'BMSVOLG1', 1, [BL.u32('bodyLength'), BL.u32('bodyCrc')]);

export const LOGICAL_STATES = ['simplex', 'paired', 'split', 'error', 'restoring'] as const;
export type LogicalState = (typeof LOGICAL_STATES)[number];

const Logical = z.strictObject({
  /** Exported as vol<id>. */
  id: z.number().int().positive(),
  /** The physical volume behind it now. */
  vol: z.number().int().positive(),
  attr: z.enum(['RO', 'RW']),
  increments: z.number().int().positive().optional(),
  state: z.enum(LOGICAL_STATES),
  /** Split generation of its image (split, error, restoring). */
  generation: z.number().int().nonnegative().optional(),
  error: z.string().optional(),
});

const PoolVolume = z.strictObject({
  vol: z.number().int().positive(),
  /** spare: ready to replace a member; error: a replaced member, out of service until `attr VOL spare`. */
  state: z.enum(['spare', 'error']),
  error: z.string().optional(),
});

const Restore = z.strictObject({
  /** Index of the logical member being rebuilt. */
  logical: z.number().int().nonnegative(),
  target: z.number().int().positive(),
  donor: z.number().int().positive(),
  /** The volume it replaces (equal to target for a restore in place). */
  failed: z.number().int().positive(),
  /** Next cluster to copy from the donor. */
  next: z.number().int().nonnegative(),
  /**
   * An RW member rebuilt as Tomita claim 1 says: the donor (logical index `promote`, RO) is copied
   * to the spare (target), which takes its RO role; the donor's volume gets the increments and
   * becomes the RW member.
   */
  promote: z.number().int().nonnegative().optional(),
  reason: z.string(),
});

export const GroupRecordSchema = z.strictObject({
  state: z.enum(['simplex', 'paired', 'split']),
  generation: z.number().int().nonnegative(),
  splitTime: z.string().optional(),
  logical: z.array(Logical),
  pool: z.array(PoolVolume),
  restore: Restore.optional(),
});

export type GroupRecord = z.infer<typeof GroupRecordSchema>;
export type LogicalRecord = z.infer<typeof Logical>;
export type RestoreRecord = z.infer<typeof Restore>;

export function encodeGroupRecord(r: GroupRecord): Buffer {
  const body = Buffer.from(JSON.stringify(r));
  return Buffer.concat([FORMAT.encode({ bodyLength: body.length, bodyCrc: crc(body) }), body]);
}

export function decodeGroupRecord(file: string, buf: Buffer): GroupRecord {
  const head = FORMAT.decode(file, buf);
  const body = buf.subarray(FORMAT.size, FORMAT.size + head.bodyLength);
  if (body.length !== head.bodyLength) throw new FormatError(file, `is truncated: the group record needs ${head.bodyLength} bytes after its header, the file has ${body.length}`);
  if (crc(body) !== head.bodyCrc) throw new FormatError(file, 'the group record fails its checksum: the file is damaged; restore it from a backup or move it away to start the group from the configuration');
  let json: unknown;
  try {
    json = JSON.parse(body.toString('utf8'));
  } catch {
    throw new FormatError(file, 'the group record is not JSON although its checksum matches: written by something else?');
  }
  const r = GroupRecordSchema.safeParse(json);
  if (!r.success) throw new FormatError(file, `is not a valid S-VOL group record (${r.error.issues.map((i) => `${i.path.join('.') || 'record'}: ${i.message}`).join('; ')})`);
  return r.data;
}

export function readGroupRecord(file: string): GroupRecord | undefined {
  let buf: Buffer;
  try {
    buf = fs.readFileSync(file);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw new FormatError(file, `cannot read the S-VOL group record: ${(e as Error).message}`, { cause: e });
  }
  return decodeGroupRecord(file, buf);
}

export function saveGroupRecord(file: string, r: GroupRecord): void {
  const tmp = `${file}.tmp`;
  const fd = fs.openSync(tmp, 'w');
  try {
    fs.writeSync(fd, encodeGroupRecord(r));
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
  fs.renameSync(tmp, file);
}

// On-disk headers: every file blockmirror writes for itself starts with one, declared with
// buffer-layout, so the bytes on disk are written down in one place and read back by the same
// declaration:
//
//   offset  size  field
//   0       8     magic      names the kind of file, e.g. "BMBITMP2"
//   8       2     version    of that kind's format; a newer one is refused, an older one migrated
//   10      2     length     bytes of the header, this field included (kinds add their own fields)
//   12      ..    the kind's own fields
//   len-4   4     crc        CRC32C of every byte before it
//
// A file that is not ours, is from a newer blockmirror, or fails its checksum is refused with a
// FormatError at start: never reused silently, never reset silently.
import * as BL from 'buffer-layout';
import { crc32c } from './crc32c.js';

export class FormatError extends Error {
  override readonly name = 'FormatError';
  readonly code = 'EFORMAT';
  constructor(
    readonly file: string,
    message: string,
    options?: { cause?: unknown },
  ) {
    super(`${file}: ${message}`, options);
  }
}

export function crc(buf: Uint8Array): number {
  return crc32c(Buffer.from(buf.buffer, buf.byteOffset, buf.byteLength)) >>> 0;
}

const COMMON = [BL.blob(8, 'magic'), BL.u16('version'), BL.u16('length')];

export interface HeaderBase {
  magic: Buffer;
  version: number;
  length: number;
  crc: number;
}

/** A kind of file: its magic, its current version, and the layout of its own header fields. */
export class FileFormat<T extends object> {
  readonly layout: BL.Structure<T & HeaderBase>;
  readonly size: number;
  private readonly magicBytes: Buffer;

  constructor(
    /** Names the kind in messages, e.g. "bitmap file". */
    readonly kind: string,
    magic: string,
    readonly version: number,
    fields: BL.Layout<any>[],
  ) {
    if (Buffer.byteLength(magic) !== 8) throw new Error(`magic ${magic} must be 8 bytes`);
    this.magicBytes = Buffer.from(magic);
    this.layout = BL.struct<T & HeaderBase>([...COMMON, ...fields, BL.u32('crc')]);
    this.size = this.layout.span;
  }

  get magic(): string {
    return this.magicBytes.toString();
  }

  /** The header bytes for these fields, with magic, version, length and checksum filled in. */
  encode(fields: T): Buffer {
    const buf = Buffer.alloc(this.size);
    this.layout.encode({ ...fields, magic: this.magicBytes, version: this.version, length: this.size, crc: 0 } as T & HeaderBase, buf);
    buf.writeUInt32LE(crc(buf.subarray(0, this.size - 4)), this.size - 4);
    return buf;
  }

  /** Does `buf` start with this kind's magic (any version)? */
  matches(buf: Buffer): boolean {
    return buf.length >= 8 && buf.subarray(0, 8).equals(this.magicBytes);
  }

  /** Read and check a header: magic, version, length and checksum, each refused with what to do. */
  decode(file: string, buf: Buffer): T & HeaderBase {
    if (!this.matches(buf)) {
      const shown = JSON.stringify(buf.subarray(0, 8).toString('latin1').replace(/[^\x20-\x7e]/g, '.'));
      throw new FormatError(file, `is not a blockmirror ${this.kind} (it starts with ${shown}, not "${this.magic}"); move it away, or point the configuration at the right directory`);
    }
    if (buf.length < 12) throw new FormatError(file, `is truncated: its ${this.kind} header is ${buf.length} bytes`);
    const version = buf.readUInt16LE(8);
    const length = buf.readUInt16LE(10);
    if (version > this.version) throw new FormatError(file, `is a ${this.kind} of format version ${version}, newer than this blockmirror reads (${this.version}); run a newer blockmirror`);
    if (version < this.version) throw new FormatError(file, `is a ${this.kind} of format version ${version}, which this blockmirror no longer reads; move it away (a pair then copies in full)`);
    if (length !== this.size || buf.length < this.size) throw new FormatError(file, `has a ${this.kind} header of ${Math.min(length, buf.length)} bytes, expected ${this.size}: truncated or damaged`);
    const want = buf.readUInt32LE(this.size - 4);
    const got = crc(buf.subarray(0, this.size - 4));
    if (want !== got) throw new FormatError(file, `${this.kind} header fails its checksum (stored ${hex(want)}, computed ${hex(got)}): the file is damaged; move it away (a pair then copies in full)`);
    return this.layout.decode(buf);
  }
}

function hex(n: number): string {
  return `0x${n.toString(16).padStart(8, '0')}`;
}

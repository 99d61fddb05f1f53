// The on-device layout of a transfer volume (seed 4, EMC US 6,983,330), every structure declared
// with buffer-layout and written as whole 4 KiB blocks. Each starts with the same four fields and
// ends with a CRC32C of everything before it:
//
//   offset  size  field
//   0       8     magic      "MAS_EMC\0", "SEC_EMC\0", "SDT_EMC\0", "PID_EMC\0", "PTR_EMC\0", "ACK_EMC\0", "SEG_EMC\0"
//   8       2     version    VERSION (3); any other is refused
//   10      2     length     bytes of the structure, crc included
//   12      ..    the structure's own fields (below)
//   len-4   4     crc        CRC32C of bytes 0..len-4
//
// Master device (the first one given to format):        a secondary device:
//   block 0            MCB "MAS_EMC"                       block 0   SEC "SEC_EMC"
//   block 1            secondary device table              block 1.. its segments
//   pidTable           2 blocks per connection slot:
//                      requestor half, requestee half
//   ptrTables          1 block per slot, the writer's pointer table
//   ackTables          1 block per slot, the reader's acknowledgement table
//   segPool            segments, segSize bytes each
//
// Who writes what (the only rule that makes this lock-free: one writer per block):
//   MCB, SEC, SDT           format only
//   requestor half, PTR     the sender of that slot (gc once the sender is dead)
//   requestee half, ACK     the receiver of that slot (gc once the receiver is dead)
//   segments of slot s      the sender of slot s: slot s owns segments [s*E, (s+1)*E) of the pool
import * as BL from 'buffer-layout';
import { crc } from '../util/format.js';
import { XferFormatError } from './errors.js';

export const BLOCK = 4096;
/** 2: messages (msg, part and the END/LAST bits) so a connection carries several; 3: the segment data's checksum is xxHash64. */
export const VERSION = 3;
/** Pointer (and acknowledgement) entries per connection slot: what one block holds. */
export const MAX_ENTRIES = 128;
export const MAX_SECONDARY = 64;
/** Bytes reserved for the segment header at the start of every segment; the data follows. */
export const SEG_HEADER = 64;

export const Command = { NONE: 0, CONNECT: 1 } as const;
export const Status = { NONE: 0, PENDING: 1, ACCEPTED: 2 } as const;
export const Role = { REQUESTOR: 0, REQUESTEE: 1 } as const;
export const PtrFlag = { FREE: 0, WRITTEN: 1 } as const;
export const AckFlag = { FREE: 0, READ: 2 } as const;
/**
 * The `last` bits of a piece (pointer entry, segment header, echoed in the acknowledgement):
 *   END   the last piece of its message
 *   LAST  the last piece of the connection: both sides clean up after it
 * A connection's final message ends END|LAST; a connection closed after its messages were
 * written ends with an empty piece that is LAST alone (no message).
 */
export const Piece = { END: 2, LAST: 1 } as const;
const PIECE_BITS = Piece.END | Piece.LAST;

interface Base {
  magic: Buffer;
  version: number;
  length: number;
  crc: number;
}

/** One kind of on-disk structure: its magic and fields, encoded and checked in one place. */
export class Structure<T extends object> {
  readonly layout: BL.Structure<T & Base>;
  readonly size: number;
  private readonly magicBytes: Buffer;

  constructor(
    readonly kind: string,
    magic: string,
    fields: BL.Layout<any>[],
    private readonly check: (v: T) => string | undefined = () => undefined,
  ) {
    this.magicBytes = Buffer.alloc(8);
    this.magicBytes.write(magic);
    this.layout = BL.struct<T & Base>([BL.blob(8, 'magic'), BL.u16('version'), BL.u16('length'), ...fields, BL.u32('crc')]);
    this.size = this.layout.span;
    if (this.size > BLOCK) throw new Error(`${kind} is ${this.size} bytes, more than a block`);
  }

  get magic(): string {
    return this.magicBytes.toString('latin1').replace(/\0+$/, '');
  }

  /** Encode into `into` (a whole block by default) at `offset`, crc filled in. */
  encode(fields: T, into: Buffer = Buffer.alloc(BLOCK), offset = 0): Buffer {
    const view = into.subarray(offset, offset + this.size);
    this.layout.encode({ ...fields, magic: this.magicBytes, version: VERSION, length: this.size, crc: 0 } as T & Base, view);
    this.seal(view);
    return into;
  }

  /** The crc of an encoded structure, after a change to its bytes. */
  protected seal(view: Buffer): void {
    view.writeUInt32LE(crc(view.subarray(0, this.size - 4)), this.size - 4);
  }

  matches(buf: Buffer, offset = 0): boolean {
    return buf.length >= offset + 8 && buf.subarray(offset, offset + 8).equals(this.magicBytes);
  }

  /** Decode and check magic, version, length, crc and the fields' own ranges; XferFormatError otherwise. */
  decode(what: string, buf: Buffer, offset = 0): T {
    this.verify(what, buf, offset);
    const v = this.layout.decode(buf, offset);
    const bad = this.check(v);
    if (bad) throw new XferFormatError(what, `${bad}: damaged`);
    return v;
  }

  /** Magic, version, length and crc; XferFormatError otherwise. */
  protected verify(what: string, buf: Buffer, offset: number): void {
    if (!this.matches(buf, offset)) {
      const head = buf.subarray(offset, offset + 8);
      const shown = head.every((b) => b === 0) ? 'zeroes' : JSON.stringify(head.toString('latin1').replace(/[^\x20-\x7e]/g, '.'));
      throw new XferFormatError(what, `is not a ${this.kind} (it starts with ${shown}, not "${this.magic}")`);
    }
    if (buf.length < offset + this.size) throw new XferFormatError(what, `is truncated: ${buf.length - offset} bytes, a ${this.kind} needs ${this.size}`);
    const version = buf.readUInt16LE(offset + 8);
    const length = buf.readUInt16LE(offset + 10);
    if (version !== VERSION) throw new XferFormatError(what, `is a ${this.kind} of version ${version}; this blockmirror reads version ${VERSION}`);
    if (length !== this.size) throw new XferFormatError(what, `says it is ${length} bytes; a ${this.kind} is ${this.size}: damaged`);
    const want = buf.readUInt32LE(offset + this.size - 4);
    const got = crc(buf.subarray(offset, offset + this.size - 4));
    if (want !== got) throw new XferFormatError(what, `fails its checksum (stored ${hex(want)}, computed ${hex(got)}): torn, stale or damaged`);
  }
}

/** A table's own fields, without its entries. */
export type Head<T> = Omit<T, 'entries'>;

/**
 * A table of MAX_ENTRIES entries of one layout after a head (the pointer and acknowledgement
 * tables), whose users touch a few entries at a time: a writer keeps its table encoded and
 * `patch`es the entries it changes, a poller checks the whole block (magic, version, length, crc)
 * and decodes the head and only the entries it reads (`view`). buffer-layout's encode or decode of
 * all 128 entries took 0.3-0.4 ms of CPU per call in a CLI process, whose ~400 table reads and
 * writes per GiB never get that code optimized: ~0.13 s of a 1 GiB transfer, both sides together;
 * patch and view take 0.07-0.1 ms (bench/RESULTS.md, "xfer, issue 17 fourth part"). encode and
 * decode of the whole table stay for everyone else (resume, ls, gc, tests).
 */
export class EntryTable<T extends { entries: E[] }, E extends object> extends Structure<T> {
  private readonly entriesAt: number;
  private readonly headFields: { property: string; at: number; layout: BL.Layout<unknown> }[];

  constructor(
    kind: string,
    magic: string,
    head: BL.Layout<any>[],
    private readonly entry: BL.Structure<E>,
    /** What is wrong with an entry ("has flag 9, last 0"), or undefined. */
    private readonly entryProblem: (e: E) => string | undefined,
  ) {
    super(kind, magic, [...head, BL.seq(entry, MAX_ENTRIES, 'entries')], (t) => {
      for (let i = 0; i < t.entries.length; i++) {
        const bad = entryProblem(t.entries[i]!);
        if (bad) return `entry ${i} ${bad}`;
      }
      return undefined;
    });
    this.entriesAt = this.layout.offsetOf('entries')!;
    this.headFields = head.filter((f) => f.property !== undefined && f.property !== 'pad').map((f) => ({ property: f.property!, at: this.layout.offsetOf(f.property!)!, layout: f }));
  }

  /** Entry `i` of `block` (a whole table from encode) set to `e`, and the crc again. */
  patch(block: Buffer, i: number, e: E): void {
    if (!Number.isInteger(i) || i < 0 || i >= MAX_ENTRIES) throw new RangeError(`${this.kind} entry ${i}: 0 to ${MAX_ENTRIES - 1}`);
    this.entry.encode(e, block, this.entriesAt + i * this.entry.span);
    this.seal(block);
  }

  /** Checked as decode checks it, the head decoded at once and each entry when first read; XferFormatError otherwise. */
  view(what: string, buf: Buffer): TableView<T, E> {
    this.verify(what, buf, 0);
    const head: Record<string, unknown> = {};
    for (const f of this.headFields) head[f.property] = f.layout.decode(buf, f.at);
    return new TableView<T, E>(head as Head<T>, (i) => {
      const e = this.entry.decode(buf, this.entriesAt + i * this.entry.span);
      const bad = this.entryProblem(e);
      if (bad) throw new XferFormatError(what, `entry ${i} ${bad}: damaged`);
      return e;
    });
  }
}

/** A table read whole and checked, its entries decoded (and checked) when first asked for. */
export class TableView<T extends { entries: E[] }, E> {
  private readonly decoded: (E | undefined)[] = [];
  constructor(
    readonly head: Head<T>,
    private readonly decodeEntry: (i: number) => E,
  ) {}

  /** Entry `i`: the same object on every call, not to be changed. XferFormatError when it is damaged. */
  entry(i: number): E {
    if (!Number.isInteger(i) || i < 0 || i >= MAX_ENTRIES) throw new RangeError(`table entry ${i}: 0 to ${MAX_ENTRIES - 1}`);
    return (this.decoded[i] ??= this.decodeEntry(i));
  }
}

function hex(n: number): string {
  return `0x${n.toString(16).padStart(8, '0')}`;
}

const pad16 = (name: string) => BL.u16(name);

// -- the master control block and its secondary device table

export interface Mcb {
  volume: Buffer;
  blockSize: number;
  segSize: number;
  /** Segments on the master device. */
  segments: number;
  maxConn: number;
  /** Pointer entries per slot = segments each slot owns. */
  entries: number;
  /** Devices, the master included. */
  devices: number;
  pidTable: number;
  secTable: number;
  ptrTables: number;
  ackTables: number;
  segPool: number;
}

export const MCB = new Structure<Mcb>(
  'master control block',
  'MAS_EMC',
  [
    BL.blob(16, 'volume'),
    BL.u32('blockSize'),
    BL.u32('segSize'),
    BL.u32('segments'),
    BL.u32('maxConn'),
    BL.u32('entries'),
    BL.u16('devices'),
    pad16('pad'),
    BL.nu64('pidTable'),
    BL.nu64('secTable'),
    BL.nu64('ptrTables'),
    BL.nu64('ackTables'),
    BL.nu64('segPool'),
  ],
  (m) => {
    if (m.blockSize !== BLOCK) return `block size ${m.blockSize}, not ${BLOCK}`;
    if (m.segSize < BLOCK || m.segSize % BLOCK !== 0) return `segment size ${m.segSize} is not a multiple of ${BLOCK}`;
    if (m.maxConn < 1 || m.entries < 1 || m.entries > MAX_ENTRIES) return `${m.maxConn} connections of ${m.entries} entries`;
    if (m.devices < 1 || m.devices > MAX_SECONDARY + 1) return `${m.devices} devices`;
    for (const k of ['pidTable', 'secTable', 'ptrTables', 'ackTables', 'segPool'] as const) if (m[k] % BLOCK !== 0) return `${k} at ${m[k]} is not block-aligned`;
    return undefined;
  },
);

export interface Sec {
  volume: Buffer;
  /** 1.. (0 is the master). */
  index: number;
  segments: number;
  segPool: number;
}

export const SEC = new Structure<Sec>(
  'secondary control block',
  'SEC_EMC',
  [BL.blob(16, 'volume'), BL.u16('index'), pad16('pad'), BL.u32('segments'), BL.nu64('segPool')],
  (s) => (s.index < 1 || s.index > MAX_SECONDARY ? `device index ${s.index}` : s.segPool % BLOCK !== 0 ? `segment pool at ${s.segPool}` : undefined),
);

export interface SecEntry {
  index: number;
  segments: number;
  segPool: number;
}
export interface Sdt {
  count: number;
  devices: SecEntry[];
}

const SecEntryLayout = BL.struct<SecEntry>([BL.u16('index'), pad16('pad'), BL.u32('segments'), BL.nu64('segPool')]);

export const SDT = new Structure<Sdt>('secondary device table', 'SDT_EMC', [BL.u16('count'), pad16('pad'), BL.seq(SecEntryLayout, MAX_SECONDARY, 'devices')], (t) =>
  t.count > MAX_SECONDARY ? `${t.count} secondary devices` : t.devices.slice(0, t.count).some((d, i) => d.index !== i + 1) ? 'device indexes out of order' : undefined,
);

// -- the process ID table: two halves per slot, each with its command structure

export interface CommandStruct {
  /** Command.* */
  code: number;
  /** Status.* */
  status: number;
}
const CommandLayout = BL.struct<CommandStruct>([BL.u8('code'), BL.u8('status'), pad16('pad')], 'command');

export interface PidEntry {
  slot: number;
  /** Role.*: which side owns this half. */
  role: number;
  requestor: number;
  requestee: number;
  /** Names one connection: a new one in the same slot gets a new token, so stale tables are ignored. */
  token: number;
  /** Bumped by the owner while it lives; gc reclaims a half whose heartbeat stands still. */
  heartbeat: number;
  command: CommandStruct;
}

export const PID = new Structure<PidEntry>(
  'process ID table entry',
  'PID_EMC',
  [BL.u16('slot'), BL.u8('role'), BL.u8('pad'), BL.u32('requestor'), BL.u32('requestee'), BL.u32('token'), BL.u32('heartbeat'), CommandLayout],
  (p) =>
    p.role > 1
      ? `role ${p.role}`
      : p.command.code > Command.CONNECT || p.command.status > Status.ACCEPTED
        ? `command ${p.command.code}/${p.command.status}`
        : undefined,
);

export const freePid = (slot: number, role: number): PidEntry => ({
  slot,
  role,
  requestor: 0,
  requestee: 0,
  token: 0,
  heartbeat: 0,
  command: { code: Command.NONE, status: Status.NONE },
});

// -- the writer's pointer table and the reader's acknowledgement table

export interface PtrEntry {
  /** PtrFlag.* */
  flag: number;
  /** Piece.* bits. */
  last: number;
  /** The message (from 1 in a connection) and the piece's index in it: the piece holds its bytes from part × capacity. */
  msg: number;
  part: number;
  /** Device index (0 = master) and byte offset of the segment. */
  dev: number;
  offset: number;
  length: number;
  seq: number;
}
const PtrEntryLayout = BL.struct<PtrEntry>([BL.u8('flag'), BL.u8('last'), BL.u16('dev'), BL.u32('length'), BL.u32('seq'), BL.u32('msg'), BL.u32('part'), BL.nu64('offset')]);

export interface PtrTable {
  slot: number;
  token: number;
  writer: number;
  entries: PtrEntry[];
}

export const PTR = new EntryTable<PtrTable, PtrEntry>('pointer table', 'PTR_EMC', [BL.u16('slot'), pad16('pad'), BL.u32('token'), BL.u32('writer')], PtrEntryLayout, (e) =>
  e.flag > PtrFlag.WRITTEN || (e.last & ~PIECE_BITS) !== 0 ? `has flag ${e.flag}, last ${e.last}` : undefined,
);

export interface AckEntry {
  /** AckFlag.* */
  flag: number;
  /** The entry's Piece bits, message and part, echoed: a receiver resumed after a crash knows where it was. */
  last: number;
  seq: number;
  msg: number;
  part: number;
}
const AckEntryLayout = BL.struct<AckEntry>([BL.u8('flag'), BL.u8('last'), pad16('pad'), BL.u32('seq'), BL.u32('msg'), BL.u32('part')]);

export interface AckTable {
  slot: number;
  token: number;
  reader: number;
  entries: AckEntry[];
}

export const ACK = new EntryTable<AckTable, AckEntry>('acknowledgement table', 'ACK_EMC', [BL.u16('slot'), pad16('pad'), BL.u32('token'), BL.u32('reader')], AckEntryLayout, (e) =>
  (e.flag !== AckFlag.FREE && e.flag !== AckFlag.READ) || (e.last & ~PIECE_BITS) !== 0 ? `has flag ${e.flag}, last ${e.last}` : undefined,
);

export const freePtr = (slot: number): PtrTable => ({
  slot,
  token: 0,
  writer: 0,
  entries: Array.from({ length: MAX_ENTRIES }, () => ({ flag: PtrFlag.FREE, last: 0, dev: 0, offset: 0, length: 0, seq: 0, msg: 0, part: 0 })),
});
export const freeAck = (slot: number): AckTable => ({
  slot,
  token: 0,
  reader: 0,
  entries: Array.from({ length: MAX_ENTRIES }, () => ({ flag: AckFlag.FREE, last: 0, seq: 0, msg: 0, part: 0 })),
});

// -- the segment header, checked by the reader against the pointer entry

export interface SegHeader {
  slot: number;
  /** Piece.* bits. */
  last: number;
  msg: number;
  part: number;
  token: number;
  writer: number;
  seq: number;
  /** Data bytes (named apart from the common `length`, the structure's own size). */
  dataLength: number;
  /**
   * The low 32 bits of the data's xxHash64 (util/xxh64.ts): a torn or stale segment is caught even
   * when its header is whole. Not CRC32C like the structures: over megabytes of data per segment
   * that cost three times as much CPU, on both sides of every transfer.
   */
  dataSum: number;
}

export const SEG = new Structure<SegHeader>(
  'segment header',
  'SEG_EMC',
  [BL.u16('slot'), BL.u8('last'), BL.u8('pad'), BL.u32('token'), BL.u32('writer'), BL.u32('seq'), BL.u32('msg'), BL.u32('part'), BL.u32('dataLength'), BL.u32('dataSum')],
  (h) => ((h.last & ~PIECE_BITS) !== 0 ? `last flags ${h.last}` : undefined),
);
if (SEG.size > SEG_HEADER) throw new Error('segment header outgrew its reserved bytes');

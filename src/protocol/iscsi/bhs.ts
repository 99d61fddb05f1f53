// The 48-byte Basic Header Segment of every PDU RFC 7143 defines, encoded and decoded from one
// table per opcode. Byte 0 (I bit, opcode) and bytes 4-7 (TotalAHSLength, DataSegmentLength) are
// common; everything else is named per opcode:
//
//   byte 0   .I oooooo        I = immediate delivery, o = opcode
//   byte 1   F ......         final bit and opcode-specific flags
//   byte 4   TotalAHSLength   in 4-byte words
//   5..7     DataSegmentLength (24 bits, without padding)
//   8..15    LUN or opcode-specific (ISID/TSIH in login)
//   16..19   Initiator Task Tag
//   20..47   opcode-specific (tags, sequence numbers, CDB ...)
import { BHS_LENGTH, Op, OP_NAMES, type Opcode } from './constants.js';

type Kind = 'u8' | 'u16' | 'u24' | 'u32' | 'u48' | 'u64' | 'cdb';
interface FieldSpec {
  kind: Kind | 'bit' | 'bits';
  off: number;
  /** for bit(s): mask within byte `off`, and shift. */
  mask?: number;
  shift?: number;
}

const u8 = (off: number) => ({ kind: 'u8' as const, off });
const u16 = (off: number) => ({ kind: 'u16' as const, off });
const u32 = (off: number) => ({ kind: 'u32' as const, off });
const u48 = (off: number) => ({ kind: 'u48' as const, off });
const u64 = (off: number) => ({ kind: 'u64' as const, off });
const bit = (off: number, mask: number) => ({ kind: 'bit' as const, off, mask });
const bits = (off: number, mask: number, shift: number) => ({ kind: 'bits' as const, off, mask, shift });

const F = bit(1, 0x80);
const LUN = u64(8);
const ITT = u32(16);
const TTT = u32(20);
const STAT_SN = u32(24);
const EXP_CMD_SN = u32(28);
const MAX_CMD_SN = u32(32);

// The field table. Names follow RFC 7143 section 11 (camelCase).
const SPECS = {
  [Op.NOP_OUT]: { final: F, lun: LUN, itt: ITT, ttt: TTT, cmdSN: u32(24), expStatSN: u32(28) },
  [Op.SCSI_CMD]: {
    final: F, read: bit(1, 0x40), write: bit(1, 0x20), attr: bits(1, 0x07, 0),
    lun: LUN, itt: ITT, expectedDataTransferLength: u32(20), cmdSN: u32(24), expStatSN: u32(28), cdb: { kind: 'cdb' as const, off: 32 },
  },
  [Op.TMF_REQ]: {
    final: F, function: bits(1, 0x7f, 0), lun: LUN, itt: ITT, referencedTaskTag: u32(20), cmdSN: u32(24), expStatSN: u32(28),
    refCmdSN: u32(32), expDataSN: u32(36),
  },
  [Op.LOGIN_REQ]: {
    transit: bit(1, 0x80), continue: bit(1, 0x40), csg: bits(1, 0x0c, 2), nsg: bits(1, 0x03, 0), versionMax: u8(2), versionMin: u8(3),
    isid: u48(8), tsih: u16(14), itt: ITT, cid: u16(20), cmdSN: u32(24), expStatSN: u32(28),
  },
  [Op.TEXT_REQ]: { final: F, continue: bit(1, 0x40), lun: LUN, itt: ITT, ttt: TTT, cmdSN: u32(24), expStatSN: u32(28) },
  [Op.DATA_OUT]: { final: F, lun: LUN, itt: ITT, ttt: TTT, expStatSN: u32(28), dataSN: u32(36), bufferOffset: u32(40) },
  [Op.LOGOUT_REQ]: { final: F, reason: bits(1, 0x7f, 0), itt: ITT, cid: u16(20), cmdSN: u32(24), expStatSN: u32(28) },
  [Op.SNACK]: { final: F, type: bits(1, 0x0f, 0), lun: LUN, itt: ITT, ttt: TTT, expStatSN: u32(28), begRun: u32(40), runLength: u32(44) },

  [Op.NOP_IN]: { final: F, lun: LUN, itt: ITT, ttt: TTT, statSN: STAT_SN, expCmdSN: EXP_CMD_SN, maxCmdSN: MAX_CMD_SN },
  [Op.SCSI_RESP]: {
    final: F, bidiOverflow: bit(1, 0x10), bidiUnderflow: bit(1, 0x08), overflow: bit(1, 0x04), underflow: bit(1, 0x02),
    response: u8(2), status: u8(3), itt: ITT, snackTag: u32(20), statSN: STAT_SN, expCmdSN: EXP_CMD_SN, maxCmdSN: MAX_CMD_SN,
    expDataSN: u32(36), bidiResidualCount: u32(40), residualCount: u32(44),
  },
  [Op.TMF_RESP]: { final: F, response: u8(2), itt: ITT, statSN: STAT_SN, expCmdSN: EXP_CMD_SN, maxCmdSN: MAX_CMD_SN },
  [Op.LOGIN_RESP]: {
    transit: bit(1, 0x80), continue: bit(1, 0x40), csg: bits(1, 0x0c, 2), nsg: bits(1, 0x03, 0), versionMax: u8(2), versionActive: u8(3),
    isid: u48(8), tsih: u16(14), itt: ITT, statSN: STAT_SN, expCmdSN: EXP_CMD_SN, maxCmdSN: MAX_CMD_SN, statusClass: u8(36), statusDetail: u8(37),
  },
  [Op.TEXT_RESP]: { final: F, continue: bit(1, 0x40), lun: LUN, itt: ITT, ttt: TTT, statSN: STAT_SN, expCmdSN: EXP_CMD_SN, maxCmdSN: MAX_CMD_SN },
  [Op.DATA_IN]: {
    final: F, acknowledge: bit(1, 0x40), overflow: bit(1, 0x04), underflow: bit(1, 0x02), hasStatus: bit(1, 0x01), status: u8(3),
    lun: LUN, itt: ITT, ttt: TTT, statSN: STAT_SN, expCmdSN: EXP_CMD_SN, maxCmdSN: MAX_CMD_SN, dataSN: u32(36), bufferOffset: u32(40),
    residualCount: u32(44),
  },
  [Op.LOGOUT_RESP]: {
    final: F, response: u8(2), itt: ITT, statSN: STAT_SN, expCmdSN: EXP_CMD_SN, maxCmdSN: MAX_CMD_SN, time2Wait: u16(40), time2Retain: u16(42),
  },
  [Op.R2T]: {
    final: F, lun: LUN, itt: ITT, ttt: TTT, statSN: STAT_SN, expCmdSN: EXP_CMD_SN, maxCmdSN: MAX_CMD_SN, r2tSN: u32(36), bufferOffset: u32(40),
    desiredDataTransferLength: u32(44),
  },
  [Op.ASYNC]: {
    final: F, lun: LUN, itt: ITT, statSN: STAT_SN, expCmdSN: EXP_CMD_SN, maxCmdSN: MAX_CMD_SN, asyncEvent: u8(36), asyncVCode: u8(37),
    parameter1: u16(38), parameter2: u16(40), parameter3: u16(42),
  },
  [Op.REJECT]: { final: F, reason: u8(2), itt: ITT, statSN: STAT_SN, expCmdSN: EXP_CMD_SN, maxCmdSN: MAX_CMD_SN, dataSN: u32(36) },
} as const satisfies Record<Opcode, Record<string, FieldSpec>>;

type Specs = typeof SPECS;
type ValueOf<S> = S extends { kind: 'bit' } ? boolean : S extends { kind: 'u64' } ? bigint : S extends { kind: 'cdb' } ? Buffer : number;
type FieldsOf<O extends Opcode> = { -readonly [K in keyof Specs[O]]: ValueOf<Specs[O][K]> };

/** A decoded BHS: the opcode, the I bit, the two lengths, and the opcode's named fields. */
export type Bhs<O extends Opcode = Opcode> = O extends Opcode
  ? { opcode: O; immediate: boolean; totalAhsLength: number; dataSegmentLength: number } & FieldsOf<O>
  : never;

/** Fields an encoder may leave out (they default to 0 / false / empty). */
export type BhsInit<O extends Opcode> = { opcode: O; immediate?: boolean; totalAhsLength?: number; dataSegmentLength?: number } & Partial<FieldsOf<O>>;

export class BhsError extends Error {
  override readonly name = 'BhsError';
  constructor(
    readonly code: 'EBADOPCODE' | 'ESHORT' | 'ERANGE',
    message: string,
  ) {
    super(message);
  }
}

export function opcodeName(op: number): string {
  return OP_NAMES[op] ?? `0x${op.toString(16)}`;
}

export function isKnownOpcode(op: number): op is Opcode {
  return Object.prototype.hasOwnProperty.call(SPECS, op);
}

/** Decode 48 bytes. Throws BhsError for an opcode RFC 7143 does not define. */
export function decodeBhs(buf: Buffer): Bhs {
  if (buf.length < BHS_LENGTH) throw new BhsError('ESHORT', `BHS needs ${BHS_LENGTH} bytes, got ${buf.length}`);
  const opcode = buf[0]! & 0x3f;
  if (!isKnownOpcode(opcode)) throw new BhsError('EBADOPCODE', `unknown opcode ${opcodeName(opcode)}`);
  const out: Record<string, unknown> = {
    opcode,
    immediate: (buf[0]! & 0x40) !== 0,
    totalAhsLength: buf[4]! * 4,
    dataSegmentLength: buf.readUIntBE(5, 3),
  };
  const spec = SPECS[opcode] as Record<string, FieldSpec>;
  for (const name in spec) {
    const f = spec[name]!;
    switch (f.kind) {
      case 'u8': out[name] = buf[f.off]; break;
      case 'u16': out[name] = buf.readUInt16BE(f.off); break;
      case 'u24': out[name] = buf.readUIntBE(f.off, 3); break;
      case 'u32': out[name] = buf.readUInt32BE(f.off); break;
      case 'u48': out[name] = buf.readUIntBE(f.off, 6); break;
      case 'u64': out[name] = buf.readBigUInt64BE(f.off); break;
      case 'cdb': out[name] = buf.subarray(f.off, f.off + 16); break;
      case 'bit': out[name] = (buf[f.off]! & f.mask!) !== 0; break;
      case 'bits': out[name] = (buf[f.off]! & f.mask!) >> f.shift!; break;
    }
  }
  return out as Bhs;
}

/** Encode into `into` (48 bytes, zeroed here) or a fresh buffer. */
export function encodeBhs<O extends Opcode>(init: BhsInit<O>, into?: Buffer): Buffer {
  const buf = into ?? Buffer.allocUnsafe(BHS_LENGTH);
  buf.fill(0, 0, BHS_LENGTH);
  const ahs = init.totalAhsLength ?? 0;
  const dsl = init.dataSegmentLength ?? 0;
  if (ahs % 4 !== 0 || ahs > 255 * 4) throw new BhsError('ERANGE', `TotalAHSLength ${ahs} is not a multiple of 4 up to 1020`);
  if (dsl > 0xffffff) throw new BhsError('ERANGE', `DataSegmentLength ${dsl} exceeds 24 bits`);
  buf[0] = init.opcode | (init.immediate ? 0x40 : 0);
  buf[4] = ahs / 4;
  buf.writeUIntBE(dsl, 5, 3);
  const spec = SPECS[init.opcode] as Record<string, FieldSpec>;
  const vals = init as Record<string, unknown>;
  for (const name in spec) {
    const v = vals[name];
    if (v === undefined) continue;
    const f = spec[name]!;
    switch (f.kind) {
      case 'u8': buf[f.off] = v as number; break;
      case 'u16': buf.writeUInt16BE(v as number, f.off); break;
      case 'u24': buf.writeUIntBE(v as number, f.off, 3); break;
      case 'u32': buf.writeUInt32BE((v as number) >>> 0, f.off); break;
      case 'u48': buf.writeUIntBE(v as number, f.off, 6); break;
      case 'u64': buf.writeBigUInt64BE(v as bigint, f.off); break;
      case 'cdb': (v as Buffer).copy(buf, f.off, 0, Math.min(16, (v as Buffer).length)); break;
      case 'bit': if (v) buf[f.off]! |= f.mask!; break;
      case 'bits': buf[f.off]! |= ((v as number) << f.shift!) & f.mask!; break;
    }
  }
  return buf;
}

/** The fields of one opcode, for tests that walk every field. */
export function fieldNames(op: Opcode): string[] {
  return Object.keys(SPECS[op]);
}

// Fixed-format sense data (SPC-4 4.5.3) and the one error type SCSI handlers throw.
//
//   byte 0   0x70 | VALID(0x80 when INFORMATION is set)
//   byte 2   sense key
//   3..6     INFORMATION (e.g. the miscompare offset)
//   byte 7   additional length (10)
//   12, 13   ASC, ASCQ
//   15..17   sense-key specific (SKSV 0x80, C/D 0x40, BPV, bit; field pointer)
import { Asc, SenseKey } from './constants.js';

export const FIXED_SENSE_LENGTH = 18;

export interface SenseData {
  key: number;
  /** ASC << 8 | ASCQ */
  asc: number;
  information?: number;
  /** Field pointer into the CDB (cd) or parameter list, for INVALID FIELD errors. */
  field?: { cd: boolean; byte: number; bit?: number };
}

export function fixedSense(s: SenseData): Buffer {
  const b = Buffer.alloc(FIXED_SENSE_LENGTH);
  b[0] = 0x70 | (s.information !== undefined ? 0x80 : 0);
  b[2] = s.key & 0x0f;
  if (s.information !== undefined) b.writeUInt32BE(s.information >>> 0, 3);
  b[7] = FIXED_SENSE_LENGTH - 8;
  b[12] = s.asc >> 8;
  b[13] = s.asc & 0xff;
  if (s.field) {
    b[15] = 0x80 | (s.field.cd ? 0x40 : 0) | (s.field.bit !== undefined ? 0x08 | (s.field.bit & 7) : 0);
    b.writeUInt16BE(s.field.byte, 16);
  }
  return b;
}

/** A command ended in CHECK CONDITION with this sense. */
export class SenseError extends Error {
  override readonly name = 'SenseError';
  constructor(
    readonly sense: SenseData,
    message?: string,
  ) {
    super(message ?? `sense ${sense.key.toString(16)}/${(sense.asc >> 8).toString(16)}/${(sense.asc & 0xff).toString(16)}`);
  }
}

/** A command ended with a status other than CHECK CONDITION (RESERVATION CONFLICT, BUSY). */
export class StatusError extends Error {
  override readonly name = 'StatusError';
  constructor(readonly status: number) {
    super(`status 0x${status.toString(16)}`);
  }
}

export const invalidField = (byte: number, bit?: number): SenseError =>
  new SenseError({ key: SenseKey.ILLEGAL_REQUEST, asc: Asc.INVALID_FIELD_IN_CDB, field: { cd: true, byte, bit } });
export const invalidParameter = (byte: number): SenseError =>
  new SenseError({ key: SenseKey.ILLEGAL_REQUEST, asc: Asc.INVALID_FIELD_IN_PARAMETER_LIST, field: { cd: false, byte } });
export const invalidOpcode = (): SenseError => new SenseError({ key: SenseKey.ILLEGAL_REQUEST, asc: Asc.INVALID_OPCODE, field: { cd: true, byte: 0 } });
export const lbaOutOfRange = (): SenseError => new SenseError({ key: SenseKey.ILLEGAL_REQUEST, asc: Asc.LBA_OUT_OF_RANGE });
export const writeProtected = (): SenseError => new SenseError({ key: SenseKey.DATA_PROTECT, asc: Asc.WRITE_PROTECTED });
export const parameterListLength = (): SenseError => new SenseError({ key: SenseKey.ILLEGAL_REQUEST, asc: Asc.PARAMETER_LIST_LENGTH_ERROR });
export const miscompare = (offset: number): SenseError => new SenseError({ key: SenseKey.MISCOMPARE, asc: Asc.MISCOMPARE_DURING_VERIFY, information: offset });

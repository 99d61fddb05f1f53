// LUN addressing (SAM-5 single level) and REPORT LUNS for a LUN the target does not have.
import { Asc, SenseKey, Status } from './scsi/constants.js';
import { fixedSense } from './scsi/sense.js';
import type { ScsiResult } from './scsi/types.js';
import type { TargetSpec } from './target.js';

/** LUN field (SAM-5 single level): peripheral addressing below 256, flat space above. */
export function lunOf(lun: bigint): number {
  const top = Number(lun >> 48n);
  return (top >> 14) === 1 ? top & 0x3fff : (top >> 8) === 0 ? top & 0xff : -1;
}

export function lunField(id: number): bigint {
  return id < 256 ? BigInt(id) << 48n : BigInt(0x4000 | id) << 48n;
}

export function anyReportLuns(t: TargetSpec, cdb: Buffer): ScsiResult {
  const luns = [...t.luns.keys()].sort((a, b) => a - b);
  const b = Buffer.alloc(8 + luns.length * 8);
  b.writeUInt32BE(luns.length * 8, 0);
  luns.forEach((l, i) => {
    if (l < 256) b[9 + i * 8] = l;
    else b.writeUInt16BE(0x4000 | l, 8 + i * 8);
  });
  if (cdb.readUInt32BE(6) < 16) return { status: Status.CHECK_CONDITION, sense: fixedSense({ key: SenseKey.ILLEGAL_REQUEST, asc: Asc.INVALID_FIELD_IN_CDB }) };
  return { status: Status.GOOD, dataIn: b };
}

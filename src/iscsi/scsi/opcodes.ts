// REPORT SUPPORTED OPERATION CODES (SPC-4 6.35): the command table the dispatcher implements,
// with CDB usage bitmaps (which bits of each CDB byte the command looks at).
import { ScsiOp, ServiceAction } from './constants.js';
import { invalidField } from './sense.js';

interface Supported {
  op: number;
  sa?: number;
  usage: number[];
}

const RW10 = [0xff, 0xff, 0xff, 0xff, 0xff, 0x1f, 0xff, 0xff, 0x07];
const RW16 = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x1f, 0x07];
const RW12 = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x1f, 0x07];

/** Every command the LU implements; the dispatcher answers INVALID OPERATION CODE to the rest. */
export const SUPPORTED: readonly Supported[] = [
  { op: ScsiOp.TEST_UNIT_READY, usage: [0, 0, 0, 0, 0x07] },
  { op: ScsiOp.REQUEST_SENSE, usage: [0x01, 0, 0, 0xff, 0x07] },
  { op: ScsiOp.READ_6, usage: [0x1f, 0xff, 0xff, 0xff, 0x07] },
  { op: ScsiOp.WRITE_6, usage: [0x1f, 0xff, 0xff, 0xff, 0x07] },
  { op: ScsiOp.INQUIRY, usage: [0x01, 0xff, 0xff, 0xff, 0x07] },
  { op: ScsiOp.MODE_SELECT_6, usage: [0x11, 0, 0, 0xff, 0x07] },
  { op: ScsiOp.RESERVE_6, usage: [0, 0, 0, 0, 0x07] },
  { op: ScsiOp.RELEASE_6, usage: [0, 0, 0, 0, 0x07] },
  { op: ScsiOp.MODE_SENSE_6, usage: [0x08, 0xff, 0xff, 0xff, 0x07] },
  { op: ScsiOp.START_STOP_UNIT, usage: [0x01, 0, 0x0f, 0xf7, 0x07] },
  { op: ScsiOp.PREVENT_ALLOW_MEDIUM_REMOVAL, usage: [0, 0, 0, 0x03, 0x07] },
  { op: ScsiOp.READ_CAPACITY_10, usage: [0, 0xff, 0xff, 0xff, 0xff, 0, 0, 0x01, 0x07] },
  { op: ScsiOp.READ_10, usage: [0xf8, ...RW10.slice(1)] },
  { op: ScsiOp.WRITE_10, usage: [0xf8, ...RW10.slice(1)] },
  { op: ScsiOp.WRITE_AND_VERIFY_10, usage: [0xf2, ...RW10.slice(1)] },
  { op: ScsiOp.VERIFY_10, usage: [0xf6, ...RW10.slice(1)] },
  { op: ScsiOp.SYNCHRONIZE_CACHE_10, usage: [0x02, 0xff, 0xff, 0xff, 0xff, 0x1f, 0xff, 0xff, 0x07] },
  { op: ScsiOp.WRITE_SAME_10, usage: [0xf8, ...RW10.slice(1)] },
  { op: ScsiOp.UNMAP, usage: [0x01, 0, 0, 0, 0, 0x1f, 0xff, 0xff, 0x07] },
  { op: ScsiOp.MODE_SELECT_10, usage: [0x11, 0, 0, 0, 0, 0, 0xff, 0xff, 0x07] },
  { op: ScsiOp.MODE_SENSE_10, usage: [0x18, 0xff, 0xff, 0, 0, 0, 0xff, 0xff, 0x07] },
  { op: ScsiOp.PERSISTENT_RESERVE_IN, sa: undefined, usage: [0x1f, 0, 0, 0, 0, 0, 0xff, 0xff, 0x07] },
  { op: ScsiOp.PERSISTENT_RESERVE_OUT, sa: undefined, usage: [0x1f, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, 0x07] },
  { op: ScsiOp.READ_16, usage: [0xf8, ...RW16.slice(1)] },
  { op: ScsiOp.COMPARE_AND_WRITE, usage: [0xf8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0xff, 0x1f, 0x07] },
  { op: ScsiOp.ORWRITE_16, usage: [0xf8, ...RW16.slice(1)] },
  { op: ScsiOp.WRITE_16, usage: [0xf8, ...RW16.slice(1)] },
  { op: ScsiOp.WRITE_AND_VERIFY_16, usage: [0xf2, ...RW16.slice(1)] },
  { op: ScsiOp.VERIFY_16, usage: [0xf6, ...RW16.slice(1)] },
  { op: ScsiOp.SYNCHRONIZE_CACHE_16, usage: [0x02, ...RW16.slice(1)] },
  { op: ScsiOp.WRITE_SAME_16, usage: [0xf9, ...RW16.slice(1)] },
  { op: ScsiOp.SERVICE_ACTION_IN_16, sa: ServiceAction.READ_CAPACITY_16, usage: [0x1f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01, 0x07] },
  { op: ScsiOp.SERVICE_ACTION_IN_16, sa: ServiceAction.GET_LBA_STATUS, usage: [0x1f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0x07] },
  { op: ScsiOp.REPORT_LUNS, usage: [0, 0xff, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0x07] },
  { op: ScsiOp.MAINTENANCE_IN, sa: ServiceAction.REPORT_TARGET_PORT_GROUPS, usage: [0xff, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0x07] },
  { op: ScsiOp.MAINTENANCE_IN, sa: ServiceAction.REPORT_SUPPORTED_OPCODES, usage: [0x1f, 0x87, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0x07] },
  { op: ScsiOp.READ_12, usage: [0xf8, ...RW12.slice(1)] },
  { op: ScsiOp.WRITE_12, usage: [0xf8, ...RW12.slice(1)] },
  { op: ScsiOp.VERIFY_12, usage: [0xf6, ...RW12.slice(1)] },
  { op: ScsiOp.WRITE_AND_VERIFY_12, usage: [0xf2, ...RW12.slice(1)] },
  { op: ScsiOp.PRE_FETCH_10, usage: [0x02, 0xff, 0xff, 0xff, 0xff, 0x1f, 0xff, 0xff, 0x07] },
  { op: ScsiOp.PRE_FETCH_16, usage: [0x02, ...RW16.slice(1)] },
];

function timeouts(): Buffer {
  const t = Buffer.alloc(12);
  t.writeUInt16BE(0x0a, 0);
  t.writeUInt32BE(30, 4); // nominal command processing timeout (s)
  t.writeUInt32BE(60, 8); // recommended command timeout (s)
  return t;
}

export function reportSupportedOpcodes(cdb: Buffer, offered: (s: Supported) => boolean): Buffer {
  const options = cdb[2]! & 0x07;
  const rctd = (cdb[2]! & 0x80) !== 0;
  const table = SUPPORTED.filter(offered);
  if (options === 0) {
    const descs = table.map((s) => {
      const d = Buffer.alloc(8);
      d[0] = s.op;
      if (s.sa !== undefined) {
        d.writeUInt16BE(s.sa, 2);
        d[5] = 0x01;
      }
      if (rctd) d[5]! |= 0x02;
      d.writeUInt16BE(s.usage.length + 1, 6);
      return rctd ? Buffer.concat([d, timeouts()]) : d;
    });
    const body = Buffer.concat(descs);
    const h = Buffer.alloc(4);
    h.writeUInt32BE(body.length, 0);
    return Buffer.concat([h, body]);
  }
  if (options > 3) throw invalidField(2);
  const op = cdb[3]!;
  const sa = cdb.readUInt16BE(4);
  const withSa = table.filter((s) => s.op === op && s.sa !== undefined);
  if (options === 1 && withSa.length) throw invalidField(2);
  if (options === 2 && !withSa.length && table.some((s) => s.op === op)) throw invalidField(2);
  const found = table.find((s) => s.op === op && (options === 1 || options === 3 ? s.sa === undefined || (options === 3 && s.sa === sa) : s.sa === sa));
  if (!found) {
    const b = Buffer.alloc(4);
    b[1] = 0x01; // SUPPORT: not supported
    return b;
  }
  const usage = Buffer.from([found.op, ...found.usage]);
  if (found.sa !== undefined) usage[1] = (usage[1]! & 0xe0) | found.sa;
  const h = Buffer.alloc(4);
  h[1] = 0x03 | (rctd ? 0x80 : 0); // SUPPORT: as the standard says
  h.writeUInt16BE(usage.length, 2);
  return Buffer.concat(rctd ? [h, usage, timeouts()] : [h, usage]);
}

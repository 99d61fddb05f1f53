// MODE SENSE / MODE SELECT 6 and 10 (SPC-4 6.11-6.14) with the caching page (SBC-3 6.4.5) and the
// control page (SPC-4 7.5.8). The caching page's WCE is the LU's write-cache policy: with WCE 0
// every write is forced to FUA. The control page's SWP write-protects the LU by software.
//
//   page  len   byte 2 (changeable bits)
//   0x08  0x12  WCE 0x04 (RCD 0x01 fixed 0)
//   0x0A  0x0A  byte 4: SWP 0x08
import { capacityBlocks } from './rw.js';
import { Asc, BLOCK_SIZE, ScsiOp, SenseKey } from './constants.js';
import { invalidField, invalidParameter, parameterListLength, SenseError } from './sense.js';
import type { BlockDevice } from '../../blockdev/types.js';

export interface ModeState {
  writeCache: boolean;
  softwareWriteProtect: boolean;
}

type PageControl = 0 | 1 | 2;

function cachingPage(s: ModeState, pc: PageControl): Buffer {
  const p = Buffer.alloc(20);
  p[0] = 0x08;
  p[1] = 0x12;
  if (pc === 1) p[2] = 0x04;
  else if (pc === 2 || s.writeCache) p[2] = 0x04;
  return p;
}

function controlPage(s: ModeState, pc: PageControl): Buffer {
  const p = Buffer.alloc(12);
  p[0] = 0x0a;
  p[1] = 0x0a;
  if (pc === 1) p[4] = 0x08;
  else {
    p[3] = 0x10; // QUEUE ALGORITHM MODIFIER 1: unrestricted reordering
    if (pc === 0 && s.softwareWriteProtect) p[4] = 0x08;
    p.writeUInt16BE(0xffff, 8); // BUSY TIMEOUT PERIOD: unlimited
  }
  return p;
}

const PAGES: Record<number, (s: ModeState, pc: PageControl) => Buffer> = { 0x08: cachingPage, 0x0a: controlPage };

/**
 * `standby`: the LU's port group is ALUA standby (a pair's mirror, src/iscsi/wiring.ts). Its WP bit
 * stays 0: the medium is not write-protected, the path is standby (writes get 02/04/0B). Linux's sd
 * makes a disk with WP read-only at scan and keeps it so, and dm-multipath then cannot open the path
 * for writing (EROFS), nor use it once a swap makes it the master's.
 */
export function modeSense(cdb: Buffer, dev: BlockDevice, s: ModeState, opts: { standby?: boolean } = {}): Buffer {
  const ten = cdb[0] === ScsiOp.MODE_SENSE_10;
  const dbd = (cdb[1]! & 0x08) !== 0;
  const llbaa = ten && (cdb[1]! & 0x10) !== 0;
  const pc = cdb[2]! >> 6;
  const page = cdb[2]! & 0x3f;
  const subpage = cdb[3]!;
  if (pc === 3) throw new SenseError({ key: SenseKey.ILLEGAL_REQUEST, asc: Asc.SAVING_PARAMETERS_NOT_SUPPORTED });
  let pages: Buffer[];
  if (page === 0x3f) {
    if (subpage !== 0 && subpage !== 0xff) throw invalidField(3);
    pages = Object.values(PAGES).map((f) => f(s, pc as PageControl));
  } else {
    const f = PAGES[page];
    if (!f || subpage !== 0) throw invalidField(2);
    pages = [f(s, pc as PageControl)];
  }
  const blocks = capacityBlocks(dev);
  let bd = Buffer.alloc(0);
  if (!dbd) {
    if (llbaa) {
      bd = Buffer.alloc(16);
      bd.writeBigUInt64BE(blocks, 0);
      bd.writeUInt32BE(BLOCK_SIZE, 12);
    } else {
      bd = Buffer.alloc(8);
      bd.writeUInt32BE(blocks > 0xffffffffn ? 0xffffffff : Number(blocks), 0);
      bd.writeUIntBE(BLOCK_SIZE, 5, 3);
    }
  }
  const body = Buffer.concat([bd, ...pages]);
  // Device-specific parameter: WP 0x80, DPOFUA 0x10.
  const devSpecific = ((dev.readOnly && !opts.standby) || s.softwareWriteProtect ? 0x80 : 0) | 0x10;
  if (ten) {
    const h = Buffer.alloc(8);
    h.writeUInt16BE(6 + body.length, 0);
    h[3] = devSpecific;
    if (llbaa && !dbd) h[4] = 0x01;
    h.writeUInt16BE(bd.length, 6);
    return Buffer.concat([h, body]);
  }
  const h = Buffer.alloc(4);
  h[0] = Math.min(255, 3 + body.length);
  h[2] = devSpecific;
  h[3] = bd.length;
  return Buffer.concat([h, body]);
}

export function modeSelect(cdb: Buffer, data: Buffer | undefined, s: ModeState): void {
  const ten = cdb[0] === ScsiOp.MODE_SELECT_10;
  if (cdb[1]! & 0x01) throw invalidField(1, 0); // SP: we cannot save pages
  const listLength = ten ? cdb.readUInt16BE(7) : cdb[4]!;
  if (listLength === 0) return;
  if (!data || data.length < listLength) throw parameterListLength();
  const list = data.subarray(0, listLength);
  const hlen = ten ? 8 : 4;
  if (list.length < hlen) throw parameterListLength();
  const bdLength = ten ? list.readUInt16BE(6) : list[3]!;
  let pos = hlen + bdLength;
  if (pos > list.length) throw parameterListLength();
  const next = { ...s };
  while (pos < list.length) {
    if (pos + 2 > list.length) throw parameterListLength();
    const code = list[pos]! & 0x3f;
    if (list[pos]! & 0x40) throw invalidParameter(pos); // SPF: no subpages
    const len = list[pos + 1]!;
    const page = list.subarray(pos, pos + 2 + len);
    if (page.length < 2 + len) throw parameterListLength();
    const current = PAGES[code];
    if (!current) throw invalidParameter(pos);
    const mask = current(s, 1);
    const cur = current(s, 0);
    if (len !== cur.length - 2) throw invalidParameter(pos + 1);
    for (let i = 2; i < cur.length; i++) {
      // Only changeable bits may differ from the current value.
      if ((page[i]! ^ cur[i]!) & ~mask[i]!) throw invalidParameter(pos + i);
    }
    if (code === 0x08) next.writeCache = (page[2]! & 0x04) !== 0;
    if (code === 0x0a) next.softwareWriteProtect = (page[4]! & 0x08) !== 0;
    pos += 2 + len;
  }
  Object.assign(s, next);
}

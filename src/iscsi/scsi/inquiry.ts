// INQUIRY: standard data and the VPD pages 0x00 0x80 0x83 0xB0 0xB1 0xB2 (SPC-4 6.6, 7.8; SBC-3 6.6).
import { createHash } from 'node:crypto';
import { invalidField } from './sense.js';

export const VENDOR = 'BLKMIRR ';
export const PRODUCT = 'blockmirror disk';
export const REVISION = '0001';

/** Block limits we advertise (VPD 0xB0), also enforced by the read/write handlers. */
export const Limits = {
  maxTransferBlocks: 65536, // 32 MiB
  optimalTransferBlocks: 256,
  maxCompareAndWriteBlocks: 255,
  maxUnmapBlocks: 0x100000,
  maxUnmapDescriptors: 256,
  maxWriteSameBlocks: 0x100000,
} as const;

export interface InquiryIdentity {
  serial: string;
  targetName: string;
  relativeTargetPort: number;
  targetPortGroup: number;
  lbpme: boolean;
  /** A device identity shared by several LUs (a pair's members), instead of target name and serial. */
  deviceId?: string;
}

export function naaId(serial: string, targetName: string, deviceId?: string): Buffer {
  // NAA 6 (IEEE registered extended): 4-bit NAA, 24-bit OUI, 100 bits vendor-specific from a hash.
  const h = createHash('sha256').update(deviceId !== undefined ? `device/${deviceId}` : `${targetName}/${serial}`).digest();
  const b = Buffer.alloc(16);
  h.copy(b, 0, 0, 16);
  b[0] = 0x60 | (b[0]! & 0x0f);
  return b;
}

export function inquiry(cdb: Buffer, id: InquiryIdentity): Buffer {
  const evpd = cdb[1]! & 0x01;
  if (cdb[1]! & 0xfe) throw invalidField(1);
  const page = cdb[2]!;
  if (!evpd) {
    if (page !== 0) throw invalidField(2);
    return standard();
  }
  switch (page) {
    case 0x00:
      return vpd(0x00, Buffer.from([0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2]));
    case 0x80:
      return vpd(0x80, Buffer.from(id.serial, 'ascii'));
    case 0x83:
      return vpd(0x83, deviceIdentification(id));
    case 0xb0:
      return vpd(0xb0, blockLimits());
    case 0xb1: {
      const p = Buffer.alloc(0x3c);
      p.writeUInt16BE(1, 0); // MEDIUM ROTATION RATE: non-rotating medium
      return vpd(0xb1, p);
    }
    case 0xb2: {
      const p = Buffer.alloc(4);
      // LBPU | LBPWS | LBPWS10 | LBPRZ: UNMAP and WRITE SAME(10/16) with UNMAP deallocate; deallocated blocks read zero.
      p[1] = id.lbpme ? 0x80 | 0x40 | 0x20 | 0x04 : 0;
      p[2] = id.lbpme ? 0x02 : 0; // PROVISIONING TYPE: thin
      return vpd(0xb2, p);
    }
    default:
      throw invalidField(2);
  }
}

function standard(): Buffer {
  const b = Buffer.alloc(96);
  b[0] = 0x00; // direct access block device, connected
  b[2] = 0x06; // SPC-4
  b[3] = 0x12; // HISUP, response data format 2
  b[4] = 96 - 5;
  b[5] = 0x10; // TPGS = implicit ALUA; no 3PC, no PROTECT
  b[7] = 0x02; // CMDQUE
  b.write(VENDOR, 8, 'ascii');
  b.write(PRODUCT.padEnd(16), 16, 'ascii');
  b.write(REVISION, 32, 'ascii');
  // Version descriptors: SAM-5, iSCSI, SPC-4, SBC-3.
  [0x00a0, 0x0960, 0x0460, 0x04c0].forEach((v, i) => b.writeUInt16BE(v, 58 + 2 * i));
  return b;
}

function vpd(page: number, payload: Buffer): Buffer {
  const b = Buffer.alloc(4 + payload.length);
  b[1] = page;
  b.writeUInt16BE(payload.length, 2);
  payload.copy(b, 4);
  return b;
}

function designator(codeSet: number, assocType: number, id: Buffer, proto = 0): Buffer {
  const b = Buffer.alloc(4 + id.length);
  b[0] = (proto << 4) | codeSet;
  b[1] = (proto ? 0x80 : 0) | assocType;
  b[3] = id.length;
  id.copy(b, 4);
  return b;
}

function deviceIdentification(id: InquiryIdentity): Buffer {
  const port = Buffer.alloc(4);
  port.writeUInt16BE(id.relativeTargetPort, 2);
  const tpg = Buffer.alloc(4);
  tpg.writeUInt16BE(id.targetPortGroup, 2);
  const name = Buffer.from(id.targetName + '\0'.repeat(4 - (id.targetName.length % 4)), 'utf8');
  return Buffer.concat([
    designator(1, 0x03, naaId(id.serial, id.targetName, id.deviceId)), // binary, LU, NAA
    designator(1, 0x14, port, 5), // binary, target port, relative target port (iSCSI)
    designator(1, 0x15, tpg, 5), // binary, target port, target port group
    designator(3, 0x28, name, 5), // UTF-8, target device, SCSI name string
  ]);
}

function blockLimits(): Buffer {
  const p = Buffer.alloc(0x3c);
  p[0] = 0x01; // WSNZ: WRITE SAME with NUMBER OF LOGICAL BLOCKS 0 is refused
  p[1] = Limits.maxCompareAndWriteBlocks;
  p.writeUInt16BE(8, 2); // OPTIMAL TRANSFER LENGTH GRANULARITY: 4 KiB
  p.writeUInt32BE(Limits.maxTransferBlocks, 4);
  p.writeUInt32BE(Limits.optimalTransferBlocks, 8);
  p.writeUInt32BE(Limits.maxUnmapBlocks, 16);
  p.writeUInt32BE(Limits.maxUnmapDescriptors, 20);
  p.writeUInt32BE(8, 24); // OPTIMAL UNMAP GRANULARITY: 4 KiB pages
  p.writeBigUInt64BE(BigInt(Limits.maxWriteSameBlocks), 32);
  return p;
}

// A READ's Data-In comes from the I/O buffer pool and goes back to it on the socket write callback
// of its last PDU (src/iscsi/scsi/rw.ts, connection.ts). This checks the data side of that under
// pressure: an initiator that stops reading while 64 READs of 512 KiB are answered, then reads
// everything, and every block must be the one it asked for.
//
// What it cannot show on every machine: a buffer given back before its write completes. That needs
// Data-In still queued in the target's user space when a later READ takes the buffer, and here
// loopback's receive buffer alone may grow to tcp_rmem's 32 MiB, so the queue may never form (a
// mutation that gives the buffer back at once passed). The write callback is the guarantee.
import fs from 'node:fs';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { decodeBhs, encodeBhs } from '../src/protocol/iscsi/bhs.js';
import { Op } from '../src/protocol/iscsi/constants.js';
import { startIscsiServe, type IscsiServe } from './helpers/iscsi.js';
import { RawInitiator } from './helpers/iscsi-raw.js';
import { tmpDir } from './helpers/servers.js';

const BLOCK = 512;
const READ_BLOCKS = 1024; // 512 KiB
const READS = 64;
const SIZE = READS * READ_BLOCKS * BLOCK;

/** Every 512-byte block holds its LBA, then a byte pattern of it, so a block out of place shows. */
function image(): Buffer {
  const b = Buffer.allocUnsafe(SIZE);
  for (let lba = 0; lba < SIZE / BLOCK; lba++) {
    const at = lba * BLOCK;
    b.fill(lba & 0xff, at, at + BLOCK);
    b.writeUInt32BE(lba, at);
  }
  return b;
}

function read10(lba: number, blocks: number): Buffer {
  const cdb = Buffer.alloc(16);
  cdb[0] = 0x28;
  cdb.writeUInt32BE(lba, 2);
  cdb.writeUInt16BE(blocks, 7);
  return cdb;
}

let target: IscsiServe | undefined;
afterEach(async () => {
  await target?.stop();
  target = undefined;
});

describe('iSCSI READ buffers from the pool', () => {
  it('gives every READ its own blocks when the initiator stops reading and the target must queue its Data-In', async () => {
    const file = path.join(tmpDir('bm-iscsi-readbuf-'), 'lun.img');
    const want = image();
    fs.writeFileSync(file, want);
    target = await startIscsiServe(['--file', file]);
    const ini = await RawInitiator.connect(target.iscsiPort);
    const login = decodeBhs((await ini.login(target.target))!.bhs) as { statusClass: number };
    expect(login.statusClass).toBe(0);
    await ini.clearUnitAttentions(0);

    ini.sock.pause();
    // Highest LBA first, so a buffer reused by a later READ holds different blocks.
    const order = Array.from({ length: READS }, (_, i) => READS - 1 - i);
    for (const k of order) {
      ini.send(
        encodeBhs({
          opcode: Op.SCSI_CMD, final: true, read: true, write: false, attr: 1, lun: 0n, itt: 5000 + k,
          expectedDataTransferLength: READ_BLOCKS * BLOCK, cmdSN: ini.cmdSN++, expStatSN: 0, cdb: read10(k * READ_BLOCKS, READ_BLOCKS),
        }),
      );
    }
    // Let the target answer into a socket nobody reads (a condition to set up, not a timing asserted).
    await new Promise((r) => setTimeout(r, 500));
    ini.sock.resume();

    const got = new Map<number, Buffer>();
    const status = new Map<number, number>();
    while (status.size < READS) {
      const f = await ini.next();
      if (!f) throw new Error('the target closed the connection');
      const b = decodeBhs(f.bhs) as Record<string, unknown> & { opcode: number; itt: number };
      expect(b.opcode).toBe(Op.DATA_IN);
      const k = b.itt - 5000;
      const buf = got.get(k) ?? Buffer.alloc(READ_BLOCKS * BLOCK);
      got.set(k, buf);
      f.data.copy(buf, b.bufferOffset as number);
      if (b.hasStatus) status.set(k, b.status as number);
    }
    ini.close();
    for (let k = 0; k < READS; k++) {
      expect(status.get(k)).toBe(0);
      const expected = want.subarray(k * READ_BLOCKS * BLOCK, (k + 1) * READ_BLOCKS * BLOCK);
      if (!got.get(k)!.equals(expected)) {
        const at = got.get(k)!.findIndex((x, i) => x !== expected[i]!);
        throw new Error(`READ ${k} (LBA ${k * READ_BLOCKS}) differs at byte ${at}: block of LBA ${got.get(k)!.readUInt32BE(at - (at % BLOCK))} where ${k * READ_BLOCKS + Math.floor(at / BLOCK)} belongs`);
      }
    }
  });
});

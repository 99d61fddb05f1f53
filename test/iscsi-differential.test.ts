// Differential: the same seeded random sequence of SCSI commands against tgt (the reference) and
// our target, LUNs of the same size, must give the same status, the same sense keys, the same data
// read back, and at the end the same bytes on both LUNs.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { decodeBhs } from '../src/protocol/iscsi/bhs.js';
import { requireTools } from './helpers/clients.js';
import { startIscsiServe, startTgtd, type IscsiServe, type Tgtd } from './helpers/iscsi.js';
import { RawInitiator, type ScsiOutcome } from './helpers/iscsi-raw.js';
import { tmpDir } from './helpers/servers.js';

const SIZE = 4 << 20;
const BLOCKS = SIZE / 512;

function cdb(bytes: number[]): Buffer {
  const b = Buffer.alloc(16);
  Buffer.from(bytes).copy(b);
  return b;
}
const rw10 = (op: number, lba: number, n: number) => cdb([op, 0, lba >>> 24, (lba >> 16) & 255, (lba >> 8) & 255, lba & 255, 0, n >> 8, n & 255, 0]);
const rw16 = (op: number, lba: number, n: number) => {
  const b = Buffer.alloc(16);
  b[0] = op;
  b.writeBigUInt64BE(BigInt(lba), 2);
  b.writeUInt32BE(n, 10);
  return b;
};

describe('differential against tgt', () => {
  let ours: IscsiServe;
  let tgt: Tgtd;
  let dir: string;
  let a: RawInitiator;
  let b: RawInitiator;

  async function open(url: string): Promise<[RawInitiator, number]> {
    const m = /^iscsi:\/\/127\.0\.0\.1:(\d+)\/([^/]+)\/(\d+)$/.exec(url)!;
    const c = await RawInitiator.connect(Number(m[1]));
    const f = await c.login(m[2]!, [['ImmediateData', 'Yes'], ['MaxRecvDataSegmentLength', '262144']]);
    expect(decodeBhs(f.bhs)).toMatchObject({ statusClass: 0, nsg: 3 });
    return [c, Number(m[3])];
  }

  beforeAll(async () => {
    requireTools('tgtd', 'tgtadm');
    dir = tmpDir('bm-iscsi-diff-');
    const file = path.join(dir, 'tgt.img');
    fs.writeFileSync(file, Buffer.alloc(SIZE));
    ours = await startIscsiServe(['--size', String(SIZE)]);
    tgt = await startTgtd(file);
  });

  afterAll(async () => {
    a?.close();
    b?.close();
    await ours?.stop();
    await tgt?.stop();
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  it('gives the same status, sense keys and data for 400 random commands, and the same LUN contents at the end', async () => {
    const [ca, lunA] = await open(ours.lunUrl);
    const [cb, lunB] = await open(tgt.lunUrl);
    a = ca;
    b = cb;
    // tgt reports POWER ON / RESET as a unit attention first; initiators clear it with TEST UNIT READY.
    for (const [c, lun] of [[a, lunA], [b, lunB]] as const) {
      for (let i = 0; i < 5 && (await c.scsi(lun, cdb([0, 0, 0, 0, 0, 0]))).status !== 0; i++);
    }
    let seed = 42;
    const rnd = (n: number) => ((seed = (seed * 1103515245 + 12345) >>> 0) % n);
    const both = async (what: string, c: Buffer, opts: { dataOut?: Buffer; readLength?: number } = {}) => {
      const [x, y] = [await a.scsi(lunA, c, opts), await b.scsi(lunB, c, opts)];
      const view = (r: ScsiOutcome) => ({ status: r.status, senseKey: r.senseKey, data: r.data.toString('hex') });
      expect(view(x), what).toEqual(view(y));
    };
    for (let i = 0; i < 400; i++) {
      const n = 1 + rnd(16);
      // Mostly in range, sometimes running past the end.
      const lba = rnd(10) === 0 ? BLOCKS - rnd(8) : rnd(BLOCKS - n);
      switch (rnd(7)) {
        case 0:
        case 1:
          await both(`#${i} WRITE(10) ${lba}+${n}`, rw10(0x2a, lba, n), { dataOut: crypto.randomBytes(n * 512) });
          break;
        case 2:
          await both(`#${i} WRITE(16) ${lba}+${n}`, rw16(0x8a, lba, n), { dataOut: Buffer.alloc(n * 512, rnd(256)) });
          break;
        case 3:
          await both(`#${i} READ(10) ${lba}+${n}`, rw10(0x28, lba, n), { readLength: n * 512 });
          break;
        case 4:
          await both(`#${i} READ(16) ${lba}+${n}`, rw16(0x88, lba, n), { readLength: n * 512 });
          break;
        case 5:
          await both(`#${i} SYNCHRONIZE CACHE(10)`, cdb([0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0]));
          break;
        case 6:
          await both(`#${i} invalid opcode`, cdb([0xc5, 0, 0, 0, 0, 0]));
          break;
      }
    }
    for (let lba = 0; lba < BLOCKS; lba += 128) await both(`final READ(16) ${lba}`, rw16(0x88, lba, 128), { readLength: 128 * 512 });
  });
});

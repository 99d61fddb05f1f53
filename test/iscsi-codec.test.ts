import { describe, it, expect } from 'vitest';
import fc from 'fast-check';
import { decodeBhs, encodeBhs, fieldNames, BhsError, type Bhs } from '../src/protocol/iscsi/bhs.js';
import { Op, BHS_LENGTH, type Opcode } from '../src/protocol/iscsi/constants.js';
import { digest } from '../src/protocol/iscsi/digest.js';
import { PduFramer, framePdu, type Frame } from '../src/protocol/iscsi/framer.js';
import { parseText, encodeText, parseNumber, parseBinary, TextError } from '../src/protocol/iscsi/text.js';

const ALL_OPS = Object.values(Op) as Opcode[];

describe('iSCSI BHS codec', () => {
  it('lays out a SCSI Command header byte by byte as RFC 7143 11.3 says', () => {
    const cdb = Buffer.from([0x28, 0, 0, 0, 0, 8, 0, 0, 1, 0]);
    const b = encodeBhs({ opcode: Op.SCSI_CMD, immediate: true, final: true, read: true, attr: 1, lun: 0x0001000000000000n, itt: 0x11223344, expectedDataTransferLength: 512, cmdSN: 7, expStatSN: 9, cdb, dataSegmentLength: 5 });
    const want = Buffer.alloc(48);
    want[0] = 0x41;
    want[1] = 0xc1;
    want.writeUIntBE(5, 5, 3);
    want[9] = 0x01;
    want.writeUInt32BE(0x11223344, 16);
    want.writeUInt32BE(512, 20);
    want.writeUInt32BE(7, 24);
    want.writeUInt32BE(9, 28);
    cdb.copy(want, 32);
    expect(b.equals(want)).toBe(true);
    const d = decodeBhs(b) as Bhs<typeof Op.SCSI_CMD>;
    expect(d).toMatchObject({ opcode: Op.SCSI_CMD, immediate: true, final: true, read: true, write: false, attr: 1, itt: 0x11223344, cmdSN: 7, dataSegmentLength: 5 });
    expect(d.cdb.subarray(0, 10).equals(cdb)).toBe(true);
  });

  it('lays out a Login Response with stages, ISID, TSIH and status in the right bytes', () => {
    const b = encodeBhs({ opcode: Op.LOGIN_RESP, transit: true, csg: 1, nsg: 3, versionMax: 0, versionActive: 0, isid: 0x23d000000001, tsih: 0x1234, itt: 5, statSN: 1, expCmdSN: 2, maxCmdSN: 33, statusClass: 2, statusDetail: 1 });
    expect(b[0]).toBe(0x23);
    expect(b[1]).toBe(0x87);
    expect(b.subarray(8, 14).toString('hex')).toBe('23d000000001');
    expect(b.readUInt16BE(14)).toBe(0x1234);
    expect(b[36]).toBe(2);
    expect(b[37]).toBe(1);
  });

  it('round-trips every field of every opcode for random values', () => {
    for (const op of ALL_OPS) {
      fc.assert(
        fc.property(fc.array(fc.integer({ min: 0, max: 0xffffffff }), { minLength: 20, maxLength: 20 }), fc.boolean(), fc.bigInt({ min: 0n, max: 2n ** 64n - 1n }), (vals, imm, big) => {
          const init: Record<string, unknown> = { opcode: op, immediate: imm };
          const sample = decodeBhs(encodeBhs({ opcode: op }));
          fieldNames(op).forEach((name, i) => {
            const zero = (sample as Record<string, unknown>)[name];
            if (typeof zero === 'boolean') init[name] = (vals[i]! & 1) === 1;
            else if (typeof zero === 'bigint') init[name] = big;
            else if (Buffer.isBuffer(zero)) init[name] = Buffer.alloc(16, vals[i]! & 0xff);
            else init[name] = vals[i]! % widthOf(op, name);
          });
          const back = decodeBhs(encodeBhs(init as never)) as Record<string, unknown>;
          for (const [k, v] of Object.entries(init)) {
            if (Buffer.isBuffer(v)) expect((back[k] as Buffer).equals(v)).toBe(true);
            else expect(back[k]).toEqual(v);
          }
        }),
        { numRuns: 50 },
      );
    }
  });

  it('refuses an opcode RFC 7143 does not define, and a short header', () => {
    const b = Buffer.alloc(48);
    b[0] = 0x1c;
    expect(() => decodeBhs(b)).toThrow(BhsError);
    expect(() => decodeBhs(Buffer.alloc(47))).toThrow(/48 bytes/);
  });

  it('refuses a data segment length beyond 24 bits when encoding', () => {
    expect(() => encodeBhs({ opcode: Op.NOP_IN, dataSegmentLength: 1 << 24 })).toThrow(/24 bits/);
  });
});

/** Largest value + 1 a numeric field can hold, found by probing the encoder. */
function widthOf(op: Opcode, name: string): number {
  for (const w of [2 ** 48, 2 ** 32, 2 ** 16, 2 ** 8, 2 ** 7, 2 ** 4, 2 ** 3, 2 ** 2]) {
    let back: Record<string, unknown>;
    try {
      back = decodeBhs(encodeBhs({ opcode: op, [name]: w - 1 } as never)) as Record<string, unknown>;
    } catch {
      continue; // too wide for this field: Buffer refuses the write
    }
    if (back[name] === w - 1) return w;
  }
  return 2;
}

describe('CRC32C digests', () => {
  it('matches the RFC 3720 B.4 test vector (32 zero bytes) in wire byte order', () => {
    const b = Buffer.alloc(4);
    b.writeUInt32LE(digest(Buffer.alloc(32)), 0);
    expect(b.toString('hex')).toBe('aa36918a');
  });
  it('gives the same digest for a buffer and for the same bytes in pieces', () => {
    const data = Buffer.from('the quick brown fox jumps over the lazy dog');
    expect(digest([data.subarray(0, 7), data.subarray(7)])).toBe(digest(data));
  });
});

function stream(opts: { headerDigest: boolean; dataDigest: boolean }, n: number, seed: number): { bytes: Buffer; datas: Buffer[] } {
  const parts: Buffer[] = [];
  const datas: Buffer[] = [];
  let x = seed;
  for (let i = 0; i < n; i++) {
    x = (x * 1103515245 + 12345) >>> 0;
    const len = x % 37;
    const data = Buffer.alloc(len, i);
    datas.push(data);
    const bhs = encodeBhs({ opcode: Op.DATA_OUT, itt: i, dataSegmentLength: len });
    parts.push(...framePdu(bhs, len ? data : undefined, opts));
  }
  return { bytes: Buffer.concat(parts), datas };
}

function drain(f: PduFramer): Frame[] {
  const out: Frame[] = [];
  for (let fr = f.next(); fr; fr = f.next()) out.push(fr);
  return out;
}

describe('PDU framer', () => {
  for (const digests of [false, true]) {
    it(`frames the same PDUs whole, byte by byte and in random splits (digests ${digests ? 'on' : 'off'})`, () => {
      const opts = { headerDigest: digests, dataDigest: digests };
      const { bytes, datas } = stream(opts, 40, 3);
      const limits = { ...opts, maxRecvDataSegmentLength: 8192 };
      const whole = new PduFramer(limits);
      whole.push(bytes);
      const ref = drain(whole);
      expect(ref.map((f) => f.data.toString('hex'))).toEqual(datas.map((d) => d.toString('hex')));
      expect(ref.every((f) => f.headerDigestOk && f.dataDigestOk)).toBe(true);
      const one = new PduFramer(limits);
      const got: Frame[] = [];
      for (const byte of bytes) {
        one.push(Buffer.from([byte]));
        got.push(...drain(one));
      }
      expect(got.map((f) => f.bhs.toString('hex') + f.data.toString('hex'))).toEqual(ref.map((f) => f.bhs.toString('hex') + f.data.toString('hex')));
      fc.assert(
        fc.property(fc.array(fc.integer({ min: 1, max: bytes.length }), { maxLength: 20 }), (cuts) => {
          const points = [...new Set(cuts)].sort((a, b) => a - b);
          const fr = new PduFramer(limits);
          const out: Frame[] = [];
          let prev = 0;
          for (const p of [...points, bytes.length]) {
            fr.push(bytes.subarray(prev, p));
            prev = p;
            out.push(...drain(fr));
          }
          expect(out.map((f) => f.data.toString('hex'))).toEqual(ref.map((f) => f.data.toString('hex')));
        }),
        { numRuns: 100 },
      );
    });
  }

  it('flags a bad header digest and a bad data digest', () => {
    const opts = { headerDigest: true, dataDigest: true };
    const bytes = Buffer.concat(framePdu(encodeBhs({ opcode: Op.NOP_OUT }), Buffer.from('ping'), opts));
    const badH = Buffer.from(bytes);
    badH[48] ^= 1;
    const f1 = new PduFramer({ ...opts, maxRecvDataSegmentLength: 100 });
    f1.push(badH);
    expect(f1.next()).toMatchObject({ headerDigestOk: false });
    const badD = Buffer.from(bytes);
    badD[bytes.length - 1] ^= 1;
    const f2 = new PduFramer({ ...opts, maxRecvDataSegmentLength: 100 });
    f2.push(badD);
    expect(f2.next()).toMatchObject({ headerDigestOk: true, dataDigestOk: false });
  });

  it('throws away an oversize data segment without buffering it and stays in sync for the next PDU', () => {
    const opts = { headerDigest: false, dataDigest: false };
    const big = framePdu(encodeBhs({ opcode: Op.DATA_OUT, itt: 1 }), Buffer.alloc(100_001, 7), opts);
    const small = framePdu(encodeBhs({ opcode: Op.NOP_OUT, itt: 2 }), undefined, opts);
    const f = new PduFramer({ ...opts, maxRecvDataSegmentLength: 8192 });
    const bytes = Buffer.concat([...big, ...small]);
    const frames: Frame[] = [];
    for (let i = 0; i < bytes.length; i += 1000) {
      f.push(bytes.subarray(i, i + 1000));
      frames.push(...drain(f));
      expect(f.buffered).toBeLessThan(2000);
    }
    expect(frames.map((x) => [x.oversize, x.data.length, x.bhs.readUInt32BE(16)])).toEqual([
      [true, 0, 1],
      [false, 0, 2],
    ]);
  });
});

describe('text key=value', () => {
  it('parses pairs, ignores padding and encodes them back', () => {
    const data = Buffer.concat([encodeText([['HeaderDigest', 'None,CRC32C'], ['MaxRecvDataSegmentLength', '262144']]), Buffer.alloc(3)]);
    expect(parseText(data)).toEqual([['HeaderDigest', 'None,CRC32C'], ['MaxRecvDataSegmentLength', '262144']]);
  });
  it('accepts a value that contains "=" and an empty value', () => {
    expect(parseText(Buffer.from('CHAP_R=0xab=\0X=\0'))).toEqual([['CHAP_R', '0xab='], ['X', '']]);
  });
  it('refuses a missing "=", a 64-byte key, an 8193-byte value, a duplicate key and bad key characters', () => {
    expect(() => parseText(Buffer.from('novalue\0'))).toThrow(TextError);
    expect(() => parseText(Buffer.from(`${'k'.repeat(64)}=1\0`))).toThrow(/63 bytes/);
    expect(() => parseText(Buffer.from(`K=${'v'.repeat(8193)}\0`))).toThrow(/8192/);
    expect(() => parseText(Buffer.from('A=1\0A=2\0'))).toThrow(/twice/);
    expect(() => parseText(Buffer.from('A B=1\0'))).toThrow(/key set/);
  });
  it('reads decimal and hex numbers and refuses anything else', () => {
    expect(parseNumber('262144')).toBe(262144);
    expect(parseNumber('0x40000')).toBe(262144);
    expect(parseNumber('-1')).toBeNaN();
    expect(parseNumber('1e9')).toBeNaN();
    expect(parseNumber('9'.repeat(40))).toBeNaN();
  });
  it('reads CHAP binary values in hex and base64', () => {
    expect(parseBinary('0x0aff')!.toString('hex')).toBe('0aff');
    expect(parseBinary('0bAQI=')!.toString('hex')).toBe('0102');
    expect(parseBinary('zz')).toBeUndefined();
  });
});

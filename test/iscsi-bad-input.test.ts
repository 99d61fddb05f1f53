// Bad input against a live target: malformed PDUs, oversize segments, bad digests, CmdSN outside
// the window, absurd login values and a fuzz run of mutated PDUs. The target answers as RFC 7143
// says, never crashes, keeps its memory bounded, and other sessions carry on.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import fs from 'node:fs';
import net from 'node:net';
import { decodeBhs, encodeBhs } from '../src/protocol/iscsi/bhs.js';
import { Op, RejectReason } from '../src/protocol/iscsi/constants.js';
import { framePdu, PduFramer, type Frame } from '../src/protocol/iscsi/framer.js';
import { encodeText, parseText } from '../src/protocol/iscsi/text.js';
import { requireTools } from './helpers/clients.js';
import { startIscsiServe, type IscsiServe } from './helpers/iscsi.js';
import { RawInitiator } from './helpers/iscsi-raw.js';
import { run } from './helpers/servers.js';

describe('bad input to the iSCSI target', () => {
  let s: IscsiServe;
  beforeAll(async () => {
    requireTools('iscsi-inq');
    s = await startIscsiServe(['--size', '16MiB']);
  });
  afterAll(async () => {
    await s?.stop();
  });

  async function session(keys: Array<[string, string]> = []): Promise<RawInitiator> {
    const c = await RawInitiator.connect(s.iscsiPort);
    const f = await c.login(s.target, keys);
    const r = decodeBhs(f.bhs) as { opcode: number; statusClass: number; nsg: number };
    expect(r).toMatchObject({ opcode: Op.LOGIN_RESP, statusClass: 0, nsg: 3 });
    return c;
  }

  it('rejects an unknown opcode with "command not supported" and keeps the session', async () => {
    const c = await session();
    const bad = encodeBhs({ opcode: Op.NOP_OUT, itt: 5 });
    bad[0] = 0x1c;
    c.send(bad);
    const rej = await c.next();
    expect(decodeBhs(rej!.bhs)).toMatchObject({ opcode: Op.REJECT, reason: RejectReason.COMMAND_NOT_SUPPORTED });
    expect(rej!.data.subarray(0, 48).equals(bad)).toBe(true);
    expect(decodeBhs((await c.ping(6))!.bhs)).toMatchObject({ opcode: Op.NOP_IN, itt: 6 });
    c.close();
  });

  it('throws away a data segment longer than MaxRecvDataSegmentLength, rejects it, and stays in sync', async () => {
    const c = await session();
    c.send(encodeBhs({ opcode: Op.NOP_OUT, immediate: true, final: true, itt: 7, ttt: 0xffffffff }), Buffer.alloc(300_000, 0xee));
    expect(decodeBhs((await c.next())!.bhs)).toMatchObject({ opcode: Op.REJECT, reason: RejectReason.PROTOCOL_ERROR });
    expect(decodeBhs((await c.ping(8))!.bhs)).toMatchObject({ opcode: Op.NOP_IN, itt: 8 });
    c.close();
  });

  it('drops the connection on a header digest error once digests are negotiated', async () => {
    const c = await session([['HeaderDigest', 'CRC32C'], ['DataDigest', 'CRC32C']]);
    c.digests = true;
    c.framer.limits = { headerDigest: true, dataDigest: true, maxRecvDataSegmentLength: 1 << 20 };
    expect(decodeBhs((await c.ping(9))!.bhs)).toMatchObject({ opcode: Op.NOP_IN, itt: 9 });
    const pdu = Buffer.concat(framePdu(encodeBhs({ opcode: Op.NOP_OUT, immediate: true, final: true, itt: 10, ttt: 0xffffffff }), undefined, { headerDigest: true, dataDigest: true }));
    pdu[48] ^= 0xff;
    c.sock.write(pdu);
    expect(await c.next()).toBeUndefined();
  });

  it('ignores a command whose CmdSN is outside the window and answers the next one in it', async () => {
    const c = await session();
    c.send(encodeBhs({ opcode: Op.NOP_OUT, final: true, itt: 11, ttt: 0xffffffff, cmdSN: c.cmdSN + 100_000 }));
    c.send(encodeBhs({ opcode: Op.NOP_OUT, final: true, itt: 12, ttt: 0xffffffff, cmdSN: c.cmdSN }));
    expect(decodeBhs((await c.next())!.bhs)).toMatchObject({ opcode: Op.NOP_IN, itt: 12 });
    c.close();
  });

  it('counts a Data-Out sent twice once: the write waits for the bytes it never got, then stores exactly what was sent', async () => {
    const c = await session();
    await c.clearUnitAttentions(0);
    const itt = 77;
    const lba64 = (op: number) => Buffer.from([op, 0, 0, 0, 0, 0x40, 0, 0, 16, 0]); // 16 blocks at LBA 64
    /** Every PDU up to the end of task `tag` (its SCSI Response or its Data-In with status); data of its Data-In. */
    const until = async (tag: number) => {
      const seen: Array<{ opcode: number; itt: number; status?: number }> = [];
      const data: Buffer[] = [];
      for (;;) {
        const f = (await c.next())!;
        const b = decodeBhs(f.bhs) as { opcode: number; itt: number; status?: number; hasStatus?: boolean };
        seen.push(b);
        if (b.itt === tag && b.opcode === Op.DATA_IN) data.push(Buffer.from(f.data));
        if (b.itt === tag && (b.opcode === Op.SCSI_RESP || b.hasStatus)) return { seen, status: b.status, data: Buffer.concat(data) };
      }
    };
    c.send(encodeBhs({ opcode: Op.SCSI_CMD, final: true, write: true, attr: 1, itt, expectedDataTransferLength: 8192, cmdSN: c.cmdSN++, expStatSN: 1, cdb: lba64(0x2a) }));
    const r2t = decodeBhs((await c.next())!.bhs) as { opcode: number; ttt: number; bufferOffset: number; desiredDataTransferLength: number };
    expect(r2t).toMatchObject({ opcode: Op.R2T, bufferOffset: 0, desiredDataTransferLength: 8192 });
    const first = Buffer.alloc(4096, 0x11);
    const second = Buffer.alloc(4096, 0x22);
    // The first half twice: 8192 bytes arrive, but the second half is still missing. The write's
    // pooled buffer may hold another write's bytes there, which must never reach the volume.
    c.send(encodeBhs({ opcode: Op.DATA_OUT, final: false, itt, ttt: r2t.ttt, dataSN: 0, bufferOffset: 0 }), first);
    c.send(encodeBhs({ opcode: Op.DATA_OUT, final: false, itt, ttt: r2t.ttt, dataSN: 1, bufferOffset: 0 }), first);
    const read = () => c.send(encodeBhs({ opcode: Op.SCSI_CMD, final: true, read: true, attr: 1, itt: 78, expectedDataTransferLength: 8192, cmdSN: c.cmdSN++, expStatSN: 1, cdb: lba64(0x28) }));
    read();
    const meanwhile = await until(78);
    expect(meanwhile.seen.filter((b) => b.itt === itt)).toEqual([]); // the write has not run
    expect(meanwhile.data.equals(Buffer.alloc(8192))).toBe(true);
    c.send(encodeBhs({ opcode: Op.DATA_OUT, final: true, itt, ttt: r2t.ttt, dataSN: 2, bufferOffset: 4096 }), second);
    expect((await until(itt)).status).toBe(0);
    read();
    const back = await until(78);
    expect(back.status).toBe(0);
    expect(back.data.equals(Buffer.concat([first, second]))).toBe(true);
    c.close();
  });

  it('answers absurd negotiation values with Reject and refuses a login whose text is malformed', async () => {
    const c = await RawInitiator.connect(s.iscsiPort);
    const f = await c.login(s.target, [['MaxRecvDataSegmentLength', '99999999999'], ['MaxBurstLength', '-5'], ['InitialR2T', 'Maybe'], ['X-Vendor-Key', '1']]);
    const answers = new Map(parseText(f.data));
    expect(answers.get('MaxRecvDataSegmentLength')).toBe('Reject');
    expect(answers.get('MaxBurstLength')).toBe('Reject');
    expect(answers.get('InitialR2T')).toBe('Reject');
    expect(answers.get('X-Vendor-Key')).toBe('NotUnderstood');
    c.close();
    const d = await RawInitiator.connect(s.iscsiPort);
    d.send(encodeBhs({ opcode: Op.LOGIN_REQ, immediate: true, transit: true, csg: 0, nsg: 3, isid: 1, itt: 1 }), Buffer.from(`InitiatorName=x\0${'K'.repeat(100)}=1\0`));
    const r = decodeBhs((await d.next())!.bhs) as { statusClass: number };
    expect(r.statusClass).toBe(2);
    expect(await d.next()).toBeUndefined();
  });

  it('survives mutated PDUs without crashing, hanging or growing, while another session keeps working', async () => {
    const total = Number(process.env.ISCSI_FUZZ_PDUS ?? 3000);
    const pid = s.proc.pid!;
    const rss = () => Number(/VmRSS:\s+(\d+)/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'))![1]) * 1024;
    const base = rss();
    let seed = 12345;
    const rnd = (n: number) => ((seed = (seed * 1103515245 + 12345) >>> 0) % n);
    const templates = [
      encodeBhs({ opcode: Op.SCSI_CMD, final: true, read: true, itt: 1, expectedDataTransferLength: 4096, cmdSN: 1, cdb: Buffer.from([0x28, 0, 0, 0, 0, 0, 0, 0, 8, 0]) }),
      encodeBhs({ opcode: Op.SCSI_CMD, final: false, write: true, itt: 2, expectedDataTransferLength: 8192, cmdSN: 2, cdb: Buffer.from([0x2a, 0, 0, 0, 0, 0, 0, 0, 16, 0]) }),
      encodeBhs({ opcode: Op.DATA_OUT, final: true, itt: 2, ttt: 0xffffffff, bufferOffset: 0 }),
      encodeBhs({ opcode: Op.TMF_REQ, function: 1, itt: 3, cmdSN: 3 }),
      encodeBhs({ opcode: Op.TEXT_REQ, final: true, itt: 4, ttt: 0xffffffff, cmdSN: 4 }),
      encodeBhs({ opcode: Op.NOP_OUT, final: true, itt: 5, ttt: 0xffffffff, cmdSN: 5 }),
      encodeBhs({ opcode: Op.LOGOUT_REQ, final: true, itt: 6, cmdSN: 6 }),
    ];
    const perConn = 500;
    for (let sent = 0; sent < total; sent += perConn) {
      const c = await session();
      c.sock.on('data', () => undefined);
      for (let i = 0; i < perConn && sent + i < total; i++) {
        const t = Buffer.from(templates[rnd(templates.length)]!);
        const flips = 1 + rnd(4);
        for (let k = 0; k < flips; k++) t[rnd(48)] = rnd(256);
        t.writeUIntBE(rnd(4) === 0 ? rnd(600) : 0, 5, 3); // sometimes a (bounded) data segment
        t[4] = 0; // no AHS: a random one would only desynchronise the stream sooner
        const len = t.readUIntBE(5, 3);
        c.sock.write(Buffer.concat([t, Buffer.alloc(len + ((4 - (len & 3)) & 3), rnd(256))]));
      }
      await new Promise((r) => setTimeout(r, 20));
      c.close();
      // Another session is served between every batch.
      const ok = await session();
      expect(decodeBhs((await ok.ping(77))!.bhs)).toMatchObject({ opcode: Op.NOP_IN, itt: 77 });
      ok.close();
    }
    expect(s.proc.exitCode).toBeNull();
    const r = await run('iscsi-inq', [s.lunUrl]);
    expect(r.code, r.stderr).toBe(0);
    expect(rss() - base).toBeLessThan(256 << 20);
  }, 300_000);
});

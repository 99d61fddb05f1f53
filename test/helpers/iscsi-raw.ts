// A bare-bones iSCSI initiator for tests: one connection, PDUs in and out, for what no real
// initiator sends (malformed PDUs) and for driving tgt and our target with the same SCSI commands.
import net from 'node:net';
import { decodeBhs, encodeBhs } from '../../src/protocol/iscsi/bhs.js';
import { Op } from '../../src/protocol/iscsi/constants.js';
import { framePdu, PduFramer, type Frame } from '../../src/protocol/iscsi/framer.js';
import { encodeText } from '../../src/protocol/iscsi/text.js';

export interface ScsiOutcome {
  status: number;
  senseKey?: number;
  asc?: number;
  data: Buffer;
}

/** ISIDs of this process's sessions: distinct, so two RawInitiators are two I_T nexuses, never a reinstatement. */
let nextIsid = 0x800000000001 + Math.floor(Math.random() * 0x10000) * 0x100;

/** A bare-bones initiator: one connection, PDUs in and out, for feeding a target what no real initiator sends. */
export class RawInitiator {
  readonly framer: PduFramer;
  private frames: Frame[] = [];
  private waiters: Array<() => void> = [];
  closed = false;
  cmdSN = 1;
  digests = false;

  constructor(readonly sock: net.Socket) {
    this.framer = new PduFramer({ headerDigest: false, dataDigest: false, maxRecvDataSegmentLength: 1 << 20 });
    sock.on('data', (d) => {
      this.framer.push(d);
      for (let f = this.framer.next(); f; f = this.framer.next()) this.frames.push(f);
      this.wake();
    });
    sock.on('close', () => ((this.closed = true), this.wake()));
    sock.on('error', () => undefined);
  }

  static connect(port: number): Promise<RawInitiator> {
    return new Promise((resolve, reject) => {
      const s = net.connect({ host: '127.0.0.1', port }, () => resolve(new RawInitiator(s)));
      s.once('error', reject);
    });
  }

  private wake(): void {
    for (const w of this.waiters.splice(0)) w();
  }

  send(bhs: Buffer, data?: Buffer): void {
    for (const b of framePdu(bhs, data, { headerDigest: this.digests, dataDigest: this.digests })) this.sock.write(b);
  }

  /** The next PDU, or undefined when the target closed the connection. */
  async next(): Promise<Frame | undefined> {
    for (;;) {
      const f = this.frames.shift();
      if (f) return f;
      if (this.closed) return undefined;
      await new Promise<void>((r) => this.waiters.push(r));
    }
  }

  /** Log in to `target`, going on to the operational stage if the target asks for it (tgt does). */
  async login(target: string, keys: Array<[string, string]> = []): Promise<Frame> {
    const isid = nextIsid++;
    const text = encodeText([['InitiatorName', 'iqn.2026-12.test:raw'], ['TargetName', target], ['SessionType', 'Normal'], ['AuthMethod', 'None'], ...keys]);
    this.send(encodeBhs({ opcode: Op.LOGIN_REQ, immediate: true, transit: true, csg: 0, nsg: 3, isid, itt: 1, cmdSN: this.cmdSN }), text);
    for (let round = 0; ; round++) {
      const f = await this.next();
      if (!f) throw new Error('target closed the connection during login');
      const r = decodeBhs(f.bhs) as { statusClass: number; transit: boolean; nsg: number; csg: number; tsih: number };
      if (r.statusClass !== 0 || (r.transit && r.nsg === 3) || round > 3) return f;
      const csg = r.transit ? r.nsg : r.csg;
      this.send(encodeBhs({ opcode: Op.LOGIN_REQ, immediate: true, transit: true, csg, nsg: 3, isid, tsih: r.tsih, itt: 1, cmdSN: this.cmdSN }), encodeText(keys));
    }
  }

  async ping(itt: number): Promise<Frame | undefined> {
    this.send(encodeBhs({ opcode: Op.NOP_OUT, immediate: true, final: true, itt, ttt: 0xffffffff, cmdSN: this.cmdSN }));
    return this.next();
  }

  private statSN = 0;
  private itt = 100;

  /** A task management function (RFC 7143 11.5: 5 LUN RESET, 6 TARGET WARM RESET, ...) on `lun`; resolves with its response code. */
  async tmf(fn: number, lun = 0): Promise<number> {
    const itt = this.itt++;
    this.send(encodeBhs({ opcode: Op.TMF_REQ, immediate: true, final: true, function: fn, lun: BigInt(lun) << 48n, itt, referencedTaskTag: 0xffffffff, cmdSN: this.cmdSN, expStatSN: this.statSN + 1 }));
    for (;;) {
      const f = await this.next();
      if (!f) throw new Error('the target closed the connection');
      const b = decodeBhs(f.bhs) as Record<string, unknown> & { opcode: number };
      if (b.opcode === Op.TMF_RESP && b.itt === itt) return b.response as number;
    }
  }

  /** Run one SCSI command on `lun` (Data-Out as immediate data, at most 8 KiB) and collect Data-In and status. */
  async scsi(lun: number, cdb: Buffer, opts: { dataOut?: Buffer; readLength?: number } = {}): Promise<ScsiOutcome> {
    const itt = this.itt++;
    const out = opts.dataOut;
    this.send(
      encodeBhs({
        opcode: Op.SCSI_CMD, final: true, read: (opts.readLength ?? 0) > 0, write: !!out, attr: 1, lun: BigInt(lun) << 48n, itt,
        expectedDataTransferLength: out ? out.length : (opts.readLength ?? 0), cmdSN: this.cmdSN++, expStatSN: this.statSN + 1, cdb,
      }),
      out,
    );
    const chunks: Buffer[] = [];
    for (;;) {
      const f = await this.next();
      if (!f) throw new Error('the target closed the connection');
      const b = decodeBhs(f.bhs) as Record<string, unknown> & { opcode: number };
      if (b.opcode === Op.DATA_IN) {
        chunks.push(Buffer.from(f.data));
        if (b.hasStatus) {
          this.statSN = b.statSN as number;
          return { status: b.status as number, data: Buffer.concat(chunks) };
        }
      } else if (b.opcode === Op.SCSI_RESP) {
        this.statSN = b.statSN as number;
        const r: ScsiOutcome = { status: b.status as number, data: Buffer.concat(chunks) };
        if (f.data.length >= 2 + 14) {
          const sense = f.data.subarray(2);
          r.senseKey = sense[2]! & 0x0f;
          r.asc = (sense[12]! << 8) | sense[13]!;
        }
        return r;
      } else if (b.opcode === Op.NOP_IN) {
        if (b.ttt !== 0xffffffff) this.send(encodeBhs({ opcode: Op.NOP_OUT, immediate: true, final: true, itt: 0xffffffff, ttt: b.ttt as number, cmdSN: this.cmdSN }));
      } else throw new Error(`unexpected PDU 0x${b.opcode.toString(16)} while waiting for a SCSI response`);
    }
  }

  /**
   * TEST UNIT READY on `lun` until it is GOOD, as real initiators do after login (libiscsi's connect,
   * Linux's scan): returns the unit attentions it cleared, as "SK/ASC" hex like "6/2900".
   */
  async clearUnitAttentions(lun: number): Promise<string[]> {
    const seen: string[] = [];
    for (let i = 0; i < 8; i++) {
      const r = await this.scsi(lun, Buffer.alloc(6));
      if (r.status === 0) return seen;
      seen.push(`${(r.senseKey ?? 0).toString(16)}/${(r.asc ?? 0).toString(16).padStart(4, '0')}`);
    }
    throw new Error(`LUN ${lun} still not ready after 8 TEST UNIT READYs: ${seen.join(', ')}`);
  }

  close(): void {
    this.sock.destroy();
  }
}


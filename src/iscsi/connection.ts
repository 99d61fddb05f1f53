// One iSCSI connection: login, then the full feature phase of its session (ERL 0, one connection
// per session). Frames come from the PduFramer; each is handled in arrival order, SCSI commands
// run concurrently and answer when they finish.
//
//   outcome of a bad PDU                 what happens (RFC 7143 7.x)
//   header digest error                  connection dropped (ERL 0)
//   data digest error                    Reject (data digest error); a write task ends in CHECK CONDITION
//   data segment > MaxRecvDataSegmentLength  data thrown away, Reject (protocol error)
//   unknown or target-only opcode        Reject (command not supported / protocol error)
//   CmdSN outside [ExpCmdSN, MaxCmdSN]   ignored silently
//   non-login PDU during login           Login Response 0x020B, connection closed
import type net from 'node:net';
import type { Logger } from 'pino';
import { decodeBhs, encodeBhs, type Bhs, type BhsInit } from '../protocol/iscsi/bhs.js';
import { BHS_LENGTH, isInitiatorOpcode, LoginStatus, LogoutResponse, Op, RejectReason, RESERVED_TAG, TmfFunction, TmfResponse, type Opcode } from '../protocol/iscsi/constants.js';
import { framePdu, PduFramer, type Frame } from '../protocol/iscsi/framer.js';
import { encodeText, parseText, type TextPairs } from '../protocol/iscsi/text.js';
import type { ChapSecrets } from './chap.js';
import { LoginError, LoginPhase, type LoginResult } from './login.js';
import { negotiate, TARGET_LIMITS, type SessionParams } from './negotiation.js';
import { Asc, SenseKey, Status } from './scsi/constants.js';
import { dataOutLength } from './scsi/rw.js';
import { fixedSense } from './scsi/sense.js';
import type { LogicalUnit } from './scsi/lu.js';
import type { Nexus, ScsiResult } from './scsi/types.js';
import type { TargetSpec } from './target.js';
import { AllowList, initiatorPortName } from './target.js';
import { anyReportLuns, lunField, lunOf } from './luns.js';
import { copyPayload } from '../blockdev/types.js';
import { ioBuffers } from '../util/buffer-pool.js';
import { adopt } from '../util/read-into.js';
import { Coverage } from './coverage.js';

export interface ConnectionHooks {
  log: Logger;
  findTarget(name: string): TargetSpec | undefined;
  targets(): TargetSpec[];
  /** What discovery sessions must prove; default: the first target with CHAP. */
  discoveryChap?: ChapSecrets;
  portals(): string[];
  /** Full feature phase reached: returns the TSIH (reinstating an older session of the same ISID), or a login status to refuse. */
  admit(conn: IscsiConnection, login: LoginResult): number | { status: number };
  closed(conn: IscsiConnection): void;
  /** LUN RESET / TARGET RESET: abort tasks in every session of the target. */
  reset(target: TargetSpec, lun: number | undefined, cold: boolean): void;
  nopIntervalMs: number;
  nopTimeoutMs: number;
  loginTimeoutMs: number;
  queueDepth: number;
}

/** Largest ExpectedDataTransferLength we buffer for one write (the LU refuses larger transfers anyway). */
const MAX_WRITE_BUFFER = 32 << 20;
const WRITE_HIGH_WATER = 8 << 20;
/** Reads that are not write data go into one of these; a read that filled little of it is copied out. */
const READ_CHUNK = 256 * 1024;
const READ_COPY_MAX = 16 * 1024;

interface Task {
  itt: number;
  cmdSN: number;
  lunId: number;
  cdb: Buffer;
  edtl: number;
  read: boolean;
  write: boolean;
  buf?: Buffer;
  /** buf came from the I/O buffer pool: it goes back once the command has run. */
  pooled?: boolean;
  /** Bytes of the data-out buffer received so far (bytes sent twice count once). */
  received: number;
  filled: Coverage;
  /** Next offset to solicit with R2T. */
  nextR2T: number;
  outstanding: Map<number, { offset: number; length: number }>;
  r2tSN: number;
  unsolicitedDone: boolean;
  dataSN: number;
  aborted: boolean;
  running: boolean;
  digestError: boolean;
  /** Expected DataSN of the next Data-Out in the current sequence (unsolicited, or per R2T). */
  expDataSN: Map<number, number>;
}

export interface ConnectionCounters {
  commands: number;
  readBytes: number;
  writeBytes: number;
}

export class IscsiConnection {
  readonly framer = new PduFramer({ headerDigest: false, dataDigest: false, maxRecvDataSegmentLength: 8192 });
  private login?: LoginPhase;
  phase: 'login' | 'ffp' | 'closed' = 'login';
  session?: LoginResult & { tsih: number };
  params?: SessionParams;
  private statSN = 0;
  private expCmdSN = 0;
  private readonly tasks = new Map<number, Task>();
  private readonly waiting = new Map<number, Frame>();
  private nextTtt = 1;
  private lastHeard = Date.now();
  private pingOut?: { ttt: number; sent: number };
  private timer?: NodeJS.Timeout;
  private textPending?: { ttt: number; rest: Buffer };
  readonly counters: ConnectionCounters = { commands: 0, readBytes: 0, writeBytes: 0 };
  readonly remoteAddress: string;

  readonly socket: net.Socket;
  /** The buffer the next read that is not write data goes into (onread sockets only). */
  private spare?: Buffer;

  constructor(
    accepted: net.Socket,
    private readonly hooks: ConnectionHooks,
  ) {
    this.remoteAddress = accepted.remoteAddress ?? '';
    const discoveryChap = hooks.discoveryChap ?? hooks.targets().find((t) => t.chap)?.chap;
    this.login = new LoginPhase({ findTarget: (n) => hooks.findTarget(n), remoteAddress: this.remoteAddress, ...(discoveryChap ? { discoveryChap } : {}) });
    // Write data goes from the kernel straight into the write's buffer (read-into.ts), in reads as
    // large as the data segment: with 'data' events every 64 KiB came in a fresh buffer and was
    // copied again. A socket that cannot be adopted (TLS) keeps 'data' events; the framer copies
    // write data into its landing buffer then.
    this.framer.landing = this.landing;
    const adopted = adopt(accepted, { buffer: this.readTarget, callback: this.onRead });
    const socket = (this.socket = adopted ?? accepted);
    // During login the initiator may send up to 8192 bytes per PDU (its default view of our limit).
    if (!adopted) socket.on('data', (chunk: Buffer) => this.onData(chunk));
    socket.on('error', (e) => hooks.log.debug({ err: e.message, remote: this.remoteAddress }, 'iscsi socket error'));
    socket.on('close', () => this.onClose());
    socket.on('drain', () => socket.resume());
    // An adopted socket allows half-open connections: the initiator's end is ours too, once what we owe it is sent.
    socket.on('end', () => socket.end());
    this.timer = setInterval(() => this.tick(), Math.max(200, Math.min(hooks.nopIntervalMs, hooks.loginTimeoutMs) / 2));
    this.timer.unref();
  }

  /** The I_T nexus of this session's commands, made once. */
  private nexus?: Nexus;

  get initiatorPort(): string {
    const s = this.session!;
    return initiatorPortName(s.initiatorName, s.isid);
  }

  get activeTasks(): number {
    return this.tasks.size;
  }

  close(): void {
    if (this.phase === 'closed') return;
    this.phase = 'closed';
    this.socket.destroy();
  }

  /** Abort tasks (TMF or reset from another session): their responses are never sent. */
  abortTasks(lunId: number | undefined): void {
    for (const t of this.tasks.values()) if (lunId === undefined || t.lunId === lunId) t.aborted = true;
    for (const t of [...this.tasks.values()]) if (t.aborted && !t.running) this.tasks.delete(t.itt);
  }

  private onClose(): void {
    this.phase = 'closed';
    clearInterval(this.timer);
    for (const t of this.tasks.values()) t.aborted = true;
    this.hooks.closed(this);
  }

  private tick(): void {
    const now = Date.now();
    if (this.phase === 'login' && now - this.lastHeard > this.hooks.loginTimeoutMs) {
      this.hooks.log.info({ remote: this.remoteAddress }, 'iscsi login timed out; connection closed');
      return this.close();
    }
    if (this.phase !== 'ffp') return;
    if (this.pingOut && now - this.pingOut.sent > this.hooks.nopTimeoutMs) {
      this.hooks.log.warn({ remote: this.remoteAddress, initiator: this.session?.initiatorName }, 'iscsi initiator did not answer NOP-In; connection dropped');
      return this.close();
    }
    if (!this.pingOut && now - this.lastHeard > this.hooks.nopIntervalMs) {
      const ttt = this.takeTtt();
      this.pingOut = { ttt, sent: now };
      this.send({ opcode: Op.NOP_IN, final: true, itt: RESERVED_TAG, ttt, lun: 0n }, undefined, false);
    }
  }

  private takeTtt(): number {
    const t = this.nextTtt;
    this.nextTtt = (this.nextTtt + 1) % 0xfffffffe || 1;
    return t;
  }

  /** Where a data segment of a write lands: its task's pooled buffer (Data-Out), or a new one (immediate data). */
  private readonly landing = (bhs: Buffer, length: number): Buffer | undefined => {
    if (this.phase !== 'ffp') return undefined;
    const opcode = bhs[0]! & 0x3f;
    if (opcode === Op.DATA_OUT) {
      const task = this.tasks.get(bhs.readUInt32BE(16));
      const offset = bhs.readUInt32BE(40);
      if (!task?.pooled || task.running || task.aborted || offset + length > task.edtl) return undefined;
      return task.buf!.subarray(offset, offset + length);
    }
    if (opcode === Op.SCSI_CMD && bhs[1]! & 0x20) {
      // Immediate data of a write: its buffer is made now, and onScsiCommand takes it over.
      const edtl = bhs.readUInt32BE(20);
      if (length > edtl || edtl > MAX_WRITE_BUFFER) return undefined;
      return ioBuffers.get(edtl).subarray(0, length);
    }
    return undefined;
  };

  /** Where the next read lands: the rest of a write's data segment, or the spare buffer. */
  private readonly readTarget = (): Buffer => this.framer.directTarget() ?? (this.spare ??= Buffer.allocUnsafe(READ_CHUNK));

  /** n bytes were read into `buf`; false stops reading until the socket is resumed. */
  private readonly onRead = (n: number, buf: Buffer): boolean => {
    if (this.phase === 'closed') return false;
    if (buf.buffer !== this.spare?.buffer) {
      this.framer.directFilled(n);
      this.pump();
    } else if (n <= READ_COPY_MAX) {
      // The framer may keep views of what it is given: a short read is copied out, the spare kept.
      this.onData(Buffer.copyBytesFrom(buf, 0, n));
    } else {
      // Headers are copied and write data copied on into its landing buffer: then the spare is
      // free again. Otherwise a frame or the framer's queue holds views of it, and it is theirs.
      this.framer.lent = false;
      this.onData(buf.subarray(0, n));
      if (this.framer.lent || this.framer.buffered > 0) this.spare = undefined;
    }
    return !this.socket.isPaused();
  };

  private onData(chunk: Buffer): void {
    this.framer.push(chunk);
    this.pump();
  }

  private pump(): void {
    this.lastHeard = Date.now();
    try {
      while (this.phase !== 'closed') {
        const f = this.framer.next();
        if (!f) break;
        this.onFrame(f);
      }
    } catch (e) {
      // A bug or an input we failed to foresee ends this connection only.
      this.hooks.log.error({ err: (e as Error).message, remote: this.remoteAddress }, 'iscsi connection failed; closing it');
      this.close();
    }
    if (this.socket.writableLength > WRITE_HIGH_WATER) this.socket.pause();
  }

  // ---- sending -------------------------------------------------------------------------------

  /** Fill the sequence numbers of a target PDU and write it. `status` PDUs take a StatSN. */
  private send<O extends Opcode>(init: BhsInit<O>, data: Buffer | undefined, status: boolean, onSent?: () => void): void {
    if (this.phase === 'closed') return onSent?.();
    const f = init as BhsInit<O> & { statSN?: number; expCmdSN?: number; maxCmdSN?: number };
    f.statSN = this.statSN;
    if (status) this.statSN = (this.statSN + 1) >>> 0;
    f.expCmdSN = this.expCmdSN;
    f.maxCmdSN = (this.expCmdSN + this.hooks.queueDepth - 1) >>> 0;
    const bhs = encodeBhs(init);
    const p = this.params;
    const parts = framePdu(bhs, data, { headerDigest: this.phase === 'ffp' && !!p?.headerDigest, dataDigest: this.phase === 'ffp' && !!p?.dataDigest });
    this.socket.cork();
    const last = parts.length - 1;
    for (let i = 0; i < last; i++) this.socket.write(parts[i]!);
    if (onSent) this.socket.write(parts[last]!, onSent);
    else this.socket.write(parts[last]!);
    process.nextTick(() => this.socket.uncork());
  }

  private reject(bhs: Buffer, reason: number): void {
    this.send({ opcode: Op.REJECT, final: true, reason, itt: RESERVED_TAG, dataSN: 0 }, Buffer.from(bhs.subarray(0, BHS_LENGTH)), true);
  }

  // ---- login ---------------------------------------------------------------------------------

  private onLoginFrame(f: Frame, bhs: Bhs): void {
    if (bhs.opcode !== Op.LOGIN_REQ) {
      this.loginReject(bhs.itt, LoginStatus.INVALID_DURING_LOGIN, `${bhs.opcode} during login`, f.bhs);
      return;
    }
    if (f.oversize || !f.headerDigestOk) return this.loginReject(bhs.itt, LoginStatus.INITIATOR_ERROR, 'login PDU too long', f.bhs);
    if (this.statSN === 0 && this.expCmdSN === 0) {
      this.statSN = bhs.expStatSN;
      this.expCmdSN = bhs.cmdSN;
    }
    let reply;
    try {
      reply = this.login!.handle(bhs, f.data);
    } catch (e) {
      if (!(e instanceof LoginError)) throw e;
      return this.loginReject(bhs.itt, e.status, e.message, f.bhs, bhs);
    }
    const result = this.login!.result;
    let tsih = bhs.tsih;
    if (result) {
      const admitted = this.hooks.admit(this, result);
      if (typeof admitted !== 'number') return this.loginReject(bhs.itt, admitted.status, 'login refused', f.bhs, bhs);
      tsih = admitted;
    }
    this.send(
      {
        opcode: Op.LOGIN_RESP, transit: reply.transit, continue: false, csg: reply.csg, nsg: reply.nsg, versionMax: 0, versionActive: 0,
        isid: bhs.isid, tsih, itt: bhs.itt, statusClass: reply.status >> 8, statusDetail: reply.status & 0xff,
      },
      reply.text.length ? encodeText(reply.text) : undefined,
      true,
    );
    if (result) {
      this.session = { ...result, tsih };
      this.params = result.params;
      this.phase = 'ffp';
      this.login = undefined;
      this.framer.limits = { headerDigest: result.params.headerDigest, dataDigest: result.params.dataDigest, maxRecvDataSegmentLength: TARGET_LIMITS.maxRecvDataSegmentLength };
      this.hooks.log.info({ initiator: result.initiatorName, remote: this.remoteAddress, target: result.target?.name ?? '(discovery)', tsih }, 'iscsi login');
    }
  }

  private loginReject(itt: number, status: number, why: string, _raw: Buffer, req?: Bhs): void {
    const r = req as Bhs<typeof Op.LOGIN_REQ> | undefined;
    this.hooks.log.info({ remote: this.remoteAddress, status: status.toString(16), why }, 'iscsi login refused');
    this.send({ opcode: Op.LOGIN_RESP, isid: r?.isid ?? 0, tsih: 0, itt, statusClass: status >> 8, statusDetail: status & 0xff }, undefined, true);
    this.socket.end();
    this.phase = 'closed';
  }

  // ---- full feature phase --------------------------------------------------------------------

  private onFrame(f: Frame): void {
    if (!f.headerDigestOk) {
      this.hooks.log.warn({ remote: this.remoteAddress }, 'iscsi header digest error; connection dropped (ERL 0)');
      return this.close();
    }
    let bhs: Bhs;
    try {
      bhs = decodeBhs(f.bhs);
    } catch {
      if (this.phase === 'login') return this.loginReject(f.bhs.readUInt32BE(16), LoginStatus.INVALID_DURING_LOGIN, 'unknown opcode', f.bhs);
      return this.reject(f.bhs, RejectReason.COMMAND_NOT_SUPPORTED);
    }
    if (this.phase === 'login') return this.onLoginFrame(f, bhs);
    if (!isInitiatorOpcode(bhs.opcode)) return this.reject(f.bhs, RejectReason.PROTOCOL_ERROR);
    if (f.oversize) return this.reject(f.bhs, RejectReason.PROTOCOL_ERROR);
    if (!f.dataDigestOk) {
      this.reject(f.bhs, RejectReason.DATA_DIGEST_ERROR);
      if (bhs.opcode === Op.DATA_OUT || bhs.opcode === Op.SCSI_CMD) {
        const t = this.tasks.get(bhs.itt);
        if (t) t.digestError = true;
        if (bhs.opcode === Op.SCSI_CMD && !bhs.immediate && bhs.cmdSN === this.expCmdSN) this.expCmdSN = (this.expCmdSN + 1) >>> 0;
        if (t && bhs.opcode === Op.DATA_OUT) this.onDataOut(bhs, [], bhs.dataSegmentLength, false);
      }
      return;
    }
    if (bhs.opcode === Op.DATA_OUT) return this.onDataOut(bhs, f.pieces, f.dataLength, f.direct);
    if (bhs.opcode === Op.SNACK) return this.reject(f.bhs, RejectReason.COMMAND_NOT_SUPPORTED); // ERL 0
    if (bhs.opcode === Op.LOGIN_REQ) return this.reject(f.bhs, RejectReason.PROTOCOL_ERROR);
    // Ordered delivery by CmdSN for non-immediate commands.
    const cmd = bhs as Bhs<typeof Op.SCSI_CMD>;
    if (!cmd.immediate) {
      const d = (cmd.cmdSN - this.expCmdSN) | 0;
      if (d < 0 || d >= this.hooks.queueDepth) {
        this.hooks.log.debug({ cmdSN: cmd.cmdSN, expCmdSN: this.expCmdSN }, 'iscsi CmdSN outside the window; ignored');
        return;
      }
      if (d > 0) {
        this.waiting.set(cmd.cmdSN, f);
        return;
      }
      this.expCmdSN = (this.expCmdSN + 1) >>> 0;
    }
    this.dispatch(bhs, f);
    for (let next = this.waiting.get(this.expCmdSN); next && this.phase === 'ffp'; next = this.waiting.get(this.expCmdSN)) {
      this.waiting.delete(this.expCmdSN);
      this.expCmdSN = (this.expCmdSN + 1) >>> 0;
      this.dispatch(decodeBhs(next.bhs), next);
    }
  }

  private dispatch(bhs: Bhs, f: Frame): void {
    const discovery = this.session!.discovery;
    switch (bhs.opcode) {
      case Op.NOP_OUT:
        return this.onNopOut(bhs, f.data);
      case Op.TEXT_REQ:
        return this.onText(bhs, f.data);
      case Op.LOGOUT_REQ:
        return this.onLogout(bhs);
      case Op.SCSI_CMD:
        if (discovery) return this.reject(f.bhs, RejectReason.PROTOCOL_ERROR);
        return this.onScsiCommand(bhs, f);
      case Op.TMF_REQ:
        if (discovery) return this.reject(f.bhs, RejectReason.PROTOCOL_ERROR);
        return this.onTmf(bhs);
      default:
        return this.reject(f.bhs, RejectReason.PROTOCOL_ERROR);
    }
  }

  private onNopOut(bhs: Bhs<typeof Op.NOP_OUT>, data: Buffer): void {
    if (bhs.ttt !== RESERVED_TAG) {
      if (this.pingOut?.ttt === bhs.ttt) this.pingOut = undefined;
      return;
    }
    this.pingOut = undefined;
    if (bhs.itt === RESERVED_TAG) return; // a ping that wants no answer
    this.send({ opcode: Op.NOP_IN, final: true, itt: bhs.itt, ttt: RESERVED_TAG, lun: bhs.lun }, data.length ? Buffer.from(data) : undefined, true);
  }

  private onLogout(bhs: Bhs<typeof Op.LOGOUT_REQ>): void {
    // Closing the session or this connection; removing a connection for recovery needs ERL 2.
    const ok = bhs.reason === 0 || bhs.reason === 1;
    this.send({ opcode: Op.LOGOUT_RESP, final: true, response: ok ? LogoutResponse.OK : LogoutResponse.RECOVERY_UNSUPPORTED, itt: bhs.itt, time2Wait: 0, time2Retain: 0 }, undefined, true);
    if (ok) {
      this.phase = 'closed';
      this.socket.end();
    }
  }

  private onText(bhs: Bhs<typeof Op.TEXT_REQ>, data: Buffer): void {
    const max = this.params!.maxXmitDataSegmentLength;
    let body: Buffer;
    if (bhs.ttt !== RESERVED_TAG && this.textPending?.ttt === bhs.ttt) {
      body = this.textPending.rest;
      this.textPending = undefined;
    } else {
      let pairs: TextPairs;
      try {
        pairs = parseText(data);
      } catch {
        return this.reject(encodeBhs({ ...bhs }), RejectReason.PROTOCOL_ERROR);
      }
      const out: TextPairs = [];
      for (const [k, v] of pairs) {
        if (k === 'SendTargets') out.push(...this.sendTargets(v));
      }
      out.push(...negotiate(pairs.filter(([k]) => k !== 'SendTargets'), this.params!, this.session!.discovery));
      body = encodeText(out);
    }
    const more = body.length > max;
    const part = more ? body.subarray(0, max) : body;
    const ttt = more ? this.takeTtt() : RESERVED_TAG;
    if (more) this.textPending = { ttt, rest: body.subarray(max) };
    this.send({ opcode: Op.TEXT_RESP, final: !more, continue: more, lun: bhs.lun, itt: bhs.itt, ttt }, part.length ? part : undefined, true);
  }

  private sendTargets(which: string): TextPairs {
    const s = this.session!;
    let targets = this.hooks.targets().filter((t) => new AllowList(t.allow).allows(s.initiatorName, this.remoteAddress));
    if (which === 'All') {
      if (!s.discovery && !s.target) return [];
    } else if (which === '') targets = s.target ? [s.target] : [];
    else targets = targets.filter((t) => t.name === which.toLowerCase());
    const out: TextPairs = [];
    for (const t of targets) {
      out.push(['TargetName', t.name]);
      for (const p of this.hooks.portals()) out.push(['TargetAddress', `${p},1`]);
    }
    return out;
  }

  private onTmf(bhs: Bhs<typeof Op.TMF_REQ>): void {
    const lunId = lunOf(bhs.lun);
    let response: number = TmfResponse.COMPLETE;
    switch (bhs.function) {
      case TmfFunction.ABORT_TASK: {
        const t = this.tasks.get(bhs.referencedTaskTag);
        if (t) {
          t.aborted = true;
          if (!t.running) this.tasks.delete(t.itt);
        } else {
          // Not seen yet but inside the window and before this TMF: "function complete" (RFC 7143 11.5.1);
          // already answered: the task does not exist.
          const pending = ((bhs.refCmdSN - this.expCmdSN) | 0) >= 0 && ((bhs.refCmdSN - bhs.cmdSN) | 0) < 0;
          if (pending) this.waiting.delete(bhs.refCmdSN);
          else response = TmfResponse.NO_TASK;
        }
        break;
      }
      case TmfFunction.ABORT_TASK_SET:
      case TmfFunction.CLEAR_TASK_SET:
        this.abortTasks(lunId);
        break;
      case TmfFunction.LOGICAL_UNIT_RESET:
        if (!this.session!.target!.luns.has(lunId)) response = TmfResponse.NO_LUN;
        else this.hooks.reset(this.session!.target!, lunId, false);
        break;
      case TmfFunction.TARGET_WARM_RESET:
      case TmfFunction.TARGET_COLD_RESET:
        this.hooks.reset(this.session!.target!, undefined, false);
        break;
      case TmfFunction.TASK_REASSIGN:
        response = TmfResponse.NO_REASSIGN;
        break;
      default:
        response = TmfResponse.NOT_SUPPORTED;
    }
    this.send({ opcode: Op.TMF_RESP, final: true, response, itt: bhs.itt }, undefined, true);
    if (bhs.function === TmfFunction.TARGET_COLD_RESET && response === TmfResponse.COMPLETE) {
      // A cold reset ends every connection of the target, this one after its answer (11.5.1).
      this.hooks.reset(this.session!.target!, undefined, true);
      this.socket.end();
      this.phase = 'closed';
    }
  }

  // ---- SCSI commands and data ----------------------------------------------------------------

  private onScsiCommand(bhs: Bhs<typeof Op.SCSI_CMD>, f: Frame): void {
    const p = this.params!;
    if (this.tasks.has(bhs.itt)) return this.reject(encodeBhs({ ...bhs }), RejectReason.TASK_IN_PROGRESS);
    // Immediate commands sit outside the CmdSN window: bound them by the queue depth too.
    if (bhs.immediate && this.tasks.size >= this.hooks.queueDepth) return this.reject(encodeBhs({ ...bhs }), RejectReason.IMMEDIATE_COMMAND_REJECT);
    this.counters.commands++;
    const task: Task = {
      itt: bhs.itt, cmdSN: bhs.cmdSN, lunId: lunOf(bhs.lun), cdb: Buffer.from(bhs.cdb), edtl: bhs.expectedDataTransferLength, read: bhs.read, write: bhs.write,
      received: 0, filled: new Coverage(), nextR2T: 0, outstanding: new Map(), r2tSN: 0, unsolicitedDone: bhs.final, dataSN: 0, aborted: false, running: false, digestError: false, expDataSN: new Map(),
    };
    this.tasks.set(task.itt, task);
    if (task.write && task.edtl > 0) {
      const n = f.dataLength;
      if (n && (!p.immediateData || n > Math.min(p.firstBurstLength, task.edtl))) {
        this.tasks.delete(task.itt);
        return this.reject(encodeBhs({ ...bhs }), RejectReason.PROTOCOL_ERROR);
      }
      // All the data came as immediate data in one received chunk (a small write): that view is the
      // buffer, no copy. Otherwise a pooled buffer: a fresh zeroed 1 MiB per write cost an mmap and
      // page faults every time. Coverage (not a byte count) decides when it is full, so no byte of
      // the recycled buffer's old contents can reach the volume.
      if (f.direct) {
        // The data landed in a pooled buffer of the command's whole length (landing()).
        task.buf = Buffer.from(f.data.buffer, f.data.byteOffset, task.edtl);
        task.pooled = true;
      } else if (n === task.edtl && f.pieces.length === 1) task.buf = f.pieces[0];
      else if (task.edtl <= MAX_WRITE_BUFFER) {
        task.buf = ioBuffers.get(task.edtl);
        task.pooled = true;
        copyPayload(f.pieces, task.buf, 0);
      }
      task.filled.add(0, n);
      task.received = task.filled.bytes;
      // Without InitialR2T the initiator may follow with unsolicited Data-Out up to FirstBurstLength.
      task.nextR2T = p.initialR2T || task.unsolicitedDone ? task.received : Math.max(task.received, Math.min(p.firstBurstLength, task.edtl));
      return this.progressWrite(task);
    }
    void this.run(task);
  }

  private onDataOut(bhs: Bhs<typeof Op.DATA_OUT>, pieces: readonly Buffer[], length: number, landed: boolean): void {
    const task = this.tasks.get(bhs.itt);
    if (!task || !task.write) {
      // Data for a task we no longer have (aborted): drop it quietly.
      return;
    }
    if (bhs.bufferOffset + length > task.edtl) return this.reject(encodeBhs({ ...bhs }), RejectReason.PROTOCOL_ERROR);
    const want = task.expDataSN.get(bhs.ttt) ?? 0;
    task.expDataSN.set(bhs.ttt, want + 1);
    if (bhs.dataSN !== want) {
      // ERL 0 cannot ask for the missing PDU again: reject it, and fail the task when its data is in.
      this.reject(encodeBhs({ ...bhs }), RejectReason.PROTOCOL_ERROR);
      task.digestError = true;
    }
    // Data past the point where the command started running is a protocol error; it must not
    // change a buffer the volume may be reading.
    if (task.running) return;
    if (task.buf && !landed) copyPayload(pieces, task.buf, bhs.bufferOffset);
    task.filled.add(bhs.bufferOffset, bhs.bufferOffset + length);
    task.received = task.filled.bytes;
    if (bhs.ttt === RESERVED_TAG) {
      if (bhs.final) task.unsolicitedDone = true;
    } else if (bhs.final) {
      task.outstanding.delete(bhs.ttt);
    }
    this.progressWrite(task);
  }

  /** Solicit what is missing with R2Ts (at most MaxOutstandingR2T at once), or run the task when all data is in. */
  private progressWrite(task: Task): void {
    const p = this.params!;
    if (task.aborted) {
      if (task.unsolicitedDone && task.outstanding.size === 0) this.tasks.delete(task.itt);
      return;
    }
    if (task.received >= task.edtl) return void this.run(task);
    if (!task.unsolicitedDone) return;
    if (task.nextR2T < task.received) task.nextR2T = task.received;
    while (task.outstanding.size < p.maxOutstandingR2T && task.nextR2T < task.edtl) {
      const length = Math.min(p.maxBurstLength, task.edtl - task.nextR2T);
      const ttt = this.takeTtt();
      task.outstanding.set(ttt, { offset: task.nextR2T, length });
      this.send({ opcode: Op.R2T, final: true, lun: lunField(task.lunId), itt: task.itt, ttt, r2tSN: task.r2tSN++, bufferOffset: task.nextR2T, desiredDataTransferLength: length }, undefined, false);
      task.nextR2T += length;
    }
  }

  private async run(task: Task): Promise<void> {
    if (task.running) return;
    task.running = true;
    let result: ScsiResult;
    if (task.digestError) {
      result = { status: Status.CHECK_CONDITION, sense: fixedSense({ key: SenseKey.ABORTED_COMMAND, asc: 0x4703 }) };
    } else if (task.write && !task.buf && task.edtl > 0) {
      result = { status: Status.CHECK_CONDITION, sense: fixedSense({ key: SenseKey.ILLEGAL_REQUEST, asc: Asc.INVALID_FIELD_IN_CDB }) };
    } else {
      const lu = this.session!.target!.luns.get(task.lunId);
      result = lu ? await this.execute(lu, task) : this.noSuchLun(task);
    }
    this.tasks.delete(task.itt);
    // The volume stack keeps no reference to a write's data once it has resolved (BlockDevice.write).
    if (task.pooled) ioBuffers.put(task.buf!);
    if (task.aborted || this.phase !== 'ffp') return;
    this.respond(task, result);
  }

  private async execute(lu: LogicalUnit, task: Task): Promise<ScsiResult> {
    const want = dataOutLength(task.cdb);
    const dataOut = task.buf ? (task.buf.length > want ? task.buf.subarray(0, want) : task.buf) : undefined;
    this.nexus ??= { initiatorPort: this.initiatorPort, relativeTargetPort: 1 };
    const r = await lu.execute({ cdb: task.cdb, dataOut, edtl: task.write ? task.edtl : 0, nexus: this.nexus });
    if (task.write) this.counters.writeBytes += Math.min(task.edtl, want);
    return r;
  }

  private noSuchLun(task: Task): ScsiResult {
    const op = task.cdb[0];
    if (op === 0x12 && !(task.cdb[1]! & 1)) {
      const b = Buffer.alloc(36);
      b[0] = 0x7f; // peripheral qualifier 3: no LU here
      b[2] = 0x06;
      b[3] = 0x02;
      b[4] = 31;
      return { status: Status.GOOD, dataIn: b };
    }
    if (op === 0xa0) {
      const any = [...this.session!.target!.luns.values()][0];
      if (any) return anyReportLuns(this.session!.target!, task.cdb);
    }
    return { status: Status.CHECK_CONDITION, sense: fixedSense({ key: SenseKey.ILLEGAL_REQUEST, asc: Asc.LUN_NOT_SUPPORTED }) };
  }

  /** Data-In with phase collapse (status in the last Data-In), or a SCSI Response; residuals both ways. */
  private respond(task: Task, r: ScsiResult): void {
    const p = this.params!;
    const lun = lunField(task.lunId);
    let residual = 0;
    let under = false;
    let over = false;
    let data = r.dataIn;
    if (task.read || (!task.write && data)) {
      const produced = data?.length ?? 0;
      if (produced > task.edtl) {
        over = true;
        residual = produced - task.edtl;
        data = data!.subarray(0, task.edtl);
      } else if (produced < task.edtl) {
        under = true;
        residual = task.edtl - produced;
      }
    } else if (task.write) {
      // Overflow: the command wanted more than ExpectedDataTransferLength allowed; underflow: less.
      const want = dataOutLength(task.cdb);
      if (want > task.edtl) {
        over = true;
        residual = want - task.edtl;
      } else if (want < task.edtl) {
        under = true;
        residual = task.edtl - want;
      }
    } else if (task.edtl > 0) {
      under = true;
      residual = task.edtl;
    }
    if (r.status === Status.GOOD && data && data.length > 0 && task.read) {
      this.counters.readBytes += data.length;
      const max = p.maxXmitDataSegmentLength;
      // A pooled READ buffer goes back once the kernel has its last piece (writes complete in order).
      const pooled = r.pooled ? r.dataIn! : undefined;
      const giveBack = pooled && (() => ioBuffers.put(pooled));
      for (let off = 0; off < data.length; off += max) {
        const last = off + max >= data.length;
        const piece = data.subarray(off, Math.min(data.length, off + max));
        this.send(
          {
            opcode: Op.DATA_IN, final: last, hasStatus: last, status: last ? r.status : 0, overflow: last && over, underflow: last && under,
            lun, itt: task.itt, ttt: RESERVED_TAG, dataSN: task.dataSN++, bufferOffset: off, residualCount: last ? residual : 0,
          },
          piece,
          last,
          last ? giveBack || undefined : undefined,
        );
      }
      return;
    }
    let senseData: Buffer | undefined;
    if (r.sense) {
      senseData = Buffer.alloc(2 + r.sense.length);
      senseData.writeUInt16BE(r.sense.length, 0);
      r.sense.copy(senseData, 2);
    }
    if (r.status !== Status.GOOD && task.read) {
      // No data went out: the whole expected length is residual.
      under = task.edtl > 0;
      over = false;
      residual = task.edtl;
    }
    this.send(
      {
        opcode: Op.SCSI_RESP, final: true, overflow: over, underflow: under, response: 0, status: r.status, itt: task.itt, snackTag: 0, expDataSN: task.dataSN,
        residualCount: residual,
      },
      senseData,
      true,
    );
  }
}

// A logical unit: one volume seen as an SBC-3 disk. `execute` is the one choke point: it checks the
// reservation, dispatches on the opcode, and turns every error into status and sense.
import { ScsiOp, ServiceAction, SenseKey, Status, Asc } from './constants.js';
import { fixedSense, invalidField, invalidOpcode, SenseError, StatusError } from './sense.js';
import { senseForDeviceError } from './errors.js';
import { inquiry } from './inquiry.js';
import { modeSelect, modeSense, type ModeState } from './mode.js';
import { PersistentReservations } from './pr.js';
import { reportSupportedOpcodes } from './opcodes.js';
import * as rw from './rw.js';
import { UaCode, UnitAttentions } from './unit-attention.js';
import { AluaState, type LogicalUnitOptions, type ScsiRequest, type ScsiResult } from './types.js';

/** Their Data-In comes from the I/O buffer pool (rw.read). */
const POOLED_READS = new Set<number>([ScsiOp.READ_6, ScsiOp.READ_10, ScsiOp.READ_12, ScsiOp.READ_16]);
const READ_CLASS = new Set<number>([
  ScsiOp.READ_6, ScsiOp.READ_10, ScsiOp.READ_12, ScsiOp.READ_16, ScsiOp.PRE_FETCH_10, ScsiOp.PRE_FETCH_16, ScsiOp.VERIFY_10, ScsiOp.VERIFY_12, ScsiOp.VERIFY_16, ScsiOp.MODE_SENSE_6, ScsiOp.MODE_SENSE_10,
]);
const WRITE_CLASS = new Set<number>([
  ScsiOp.WRITE_6, ScsiOp.WRITE_10, ScsiOp.WRITE_12, ScsiOp.WRITE_16, ScsiOp.WRITE_AND_VERIFY_10, ScsiOp.WRITE_AND_VERIFY_12, ScsiOp.WRITE_AND_VERIFY_16, ScsiOp.WRITE_SAME_10,
  ScsiOp.WRITE_SAME_16, ScsiOp.UNMAP, ScsiOp.COMPARE_AND_WRITE, ScsiOp.ORWRITE_16, ScsiOp.SYNCHRONIZE_CACHE_10, ScsiOp.SYNCHRONIZE_CACHE_16, ScsiOp.MODE_SELECT_6,
  ScsiOp.MODE_SELECT_10, ScsiOp.START_STOP_UNIT, ScsiOp.RESERVE_6, ScsiOp.RELEASE_6,
]);

/**
 * What an LU in the ALUA standby state refuses with NOT READY / LOGICAL UNIT NOT ACCESSIBLE, TARGET
 * PORT IN STANDBY STATE (SPC-4 5.15.2.4.4): the writes to the medium. A multipath host takes that
 * for a path error and sends the write down another path (the master); DATA PROTECT would be a
 * target error and fail the write. Reads are still served (never stale: Invalid clusters come from
 * the master), which SPC-4 would also refuse: a superset that loses nothing.
 */
const STANDBY_REFUSED = new Set<number>([
  ScsiOp.WRITE_6, ScsiOp.WRITE_10, ScsiOp.WRITE_12, ScsiOp.WRITE_16, ScsiOp.WRITE_AND_VERIFY_10, ScsiOp.WRITE_AND_VERIFY_12, ScsiOp.WRITE_AND_VERIFY_16, ScsiOp.WRITE_SAME_10,
  ScsiOp.WRITE_SAME_16, ScsiOp.UNMAP, ScsiOp.COMPARE_AND_WRITE, ScsiOp.ORWRITE_16,
]);

/** The CDB's ALLOCATION LENGTH: data-in beyond it is cut here, not reported as an iSCSI residual. */
function allocationLength(cdb: Buffer): number | undefined {
  switch (cdb[0]) {
    case ScsiOp.INQUIRY:
      return cdb.readUInt16BE(3);
    case ScsiOp.REQUEST_SENSE:
    case ScsiOp.MODE_SENSE_6:
      return cdb[4];
    case ScsiOp.MODE_SENSE_10:
    case ScsiOp.PERSISTENT_RESERVE_IN:
      return cdb.readUInt16BE(7);
    case ScsiOp.REPORT_LUNS:
    case ScsiOp.MAINTENANCE_IN:
      return cdb.readUInt32BE(6);
    case ScsiOp.SERVICE_ACTION_IN_16:
      return cdb.readUInt32BE(10);
    default:
      return undefined;
  }
}

/** What another initiator may still do while one holds RESERVE(6) (SPC-2 5.5.1). */
const LEGACY_ALLOWED = new Set<number>([ScsiOp.INQUIRY, ScsiOp.REQUEST_SENSE, ScsiOp.REPORT_LUNS, ScsiOp.RELEASE_6, ScsiOp.PERSISTENT_RESERVE_IN, ScsiOp.MAINTENANCE_IN]);

/** CDB length by group code (SAM-5 table): 0 -> 6, 1-2 -> 10, 4 -> 16, 5 -> 12. */
export function cdbLength(op: number): number {
  return [6, 10, 10, 16, 16, 12, 16, 16][op >> 5]!;
}

export interface LuCounters {
  readOps: number;
  readBytes: number;
  writeOps: number;
  writeBytes: number;
}

export class LogicalUnit {
  readonly mode: ModeState = { writeCache: true, softwareWriteProtect: false };
  readonly pr: PersistentReservations;
  readonly counters: LuCounters = { readOps: 0, readBytes: 0, writeOps: 0, writeBytes: 0 };
  /** RESERVE(6) holder (SPC-2 reservations), released by RELEASE(6), LUN reset or loss of its nexus. */
  private legacyHolder?: string;
  readonly unitAttentions = new UnitAttentions();
  /** What the initiators were last told of the device: a change raises a unit attention. */
  private seen: { readOnly: boolean; alua: number; size: number; deviceId: string | undefined };

  constructor(readonly opts: LogicalUnitOptions) {
    this.pr = new PersistentReservations(opts.prFile);
    this.seen = this.observe();
  }

  private observe(): { readOnly: boolean; alua: number; size: number; deviceId: string | undefined } {
    const dev = this.opts.device;
    return { readOnly: dev.readOnly, alua: this.opts.alua?.() ?? AluaState.ACTIVE_OPTIMIZED, size: dev.size, deviceId: this.opts.deviceId?.() };
  }

  /**
   * Asked before every command rather than told by the controller: a swap, a takeover, an S-VOL
   * attribute change or anything else that flips the device's role is noticed the same way, and
   * the layers below need not know iSCSI exists.
   */
  private noticeChanges(): void {
    const now = this.observe();
    const was = this.seen;
    if (now.readOnly === was.readOnly && now.alua === was.alua && now.size === was.size && now.deviceId === was.deviceId) return;
    this.seen = now;
    if (now.readOnly !== was.readOnly || now.alua !== was.alua) this.unitAttentions.raise(UaCode.ASYMMETRIC_ACCESS_STATE_CHANGED);
    if (now.size !== was.size) this.unitAttentions.raise(UaCode.CAPACITY_CHANGED);
    if (now.deviceId !== was.deviceId) this.unitAttentions.raise(UaCode.INQUIRY_DATA_CHANGED);
  }

  /**
   * One target port group with one target port per storage system: the pair's members are the
   * groups of one device, each reporting its own state (Linux's scsi_dh_alua looks up its group).
   */
  private get portGroup(): number {
    return this.opts.portGroup ?? 1;
  }

  get lun(): number {
    return this.opts.lun;
  }

  /** Thin provisioning is reported when the device can deallocate, i.e. it is writable. */
  private get lbpme(): boolean {
    return !this.opts.device.readOnly;
  }

  async execute(req: ScsiRequest): Promise<ScsiResult> {
    this.noticeChanges();
    const op = req.cdb[0]!;
    // REQUEST SENSE for descriptor format is refused below whatever is pending: leave the UA for later.
    if (!(op === ScsiOp.REQUEST_SENSE && req.cdb[1]! & 0x01)) {
      const ua = this.unitAttentions.check(req.nexus.initiatorPort, op);
      if (ua.kind === 'report') return { status: Status.CHECK_CONDITION, sense: fixedSense({ key: SenseKey.UNIT_ATTENTION, asc: ua.asc }) };
      if (ua.kind === 'sense') return { status: Status.GOOD, dataIn: fixedSense({ key: SenseKey.UNIT_ATTENTION, asc: ua.asc }).subarray(0, req.cdb[4]) };
    }
    try {
      const dataIn = await this.dispatch(req);
      const alloc = allocationLength(req.cdb);
      return { status: Status.GOOD, dataIn: dataIn && alloc !== undefined && dataIn.length > alloc ? dataIn.subarray(0, alloc) : dataIn, pooled: POOLED_READS.has(op) };
    } catch (e) {
      if (e instanceof StatusError) return { status: e.status };
      const writing = WRITE_CLASS.has(req.cdb[0]!);
      const sense = senseForDeviceError(e, writing);
      if (writing && sense.asc === Asc.WRITE_PROTECTED && !(e instanceof SenseError) && this.opts.alua) {
        // A write held by a swap finds its volume no longer the master (nothing was written).
        // Answer as the LU is now, so a multipath host retries it and then on the new master:
        //   the role change is seen          the nexus's UA (2A/06), else NOT READY 04/0B (standby)
        //   the device still says writable   NOT READY 04/0A: ALUA state transition, retry
        this.noticeChanges();
        if (this.seen.alua === AluaState.STANDBY) {
          const ua = this.unitAttentions.check(req.nexus.initiatorPort, op);
          const now = ua.kind === 'report' ? { key: SenseKey.UNIT_ATTENTION, asc: ua.asc } : { key: SenseKey.NOT_READY, asc: Asc.LOGICAL_UNIT_NOT_READY_STANDBY };
          return { status: Status.CHECK_CONDITION, sense: fixedSense(now) };
        }
        if (!this.opts.device.readOnly) return { status: Status.CHECK_CONDITION, sense: fixedSense({ key: SenseKey.NOT_READY, asc: Asc.ASYMMETRIC_ACCESS_STATE_TRANSITION }) };
      }
      return { status: Status.CHECK_CONDITION, sense: fixedSense(sense) };
    }
  }

  private async dispatch(req: ScsiRequest): Promise<Buffer | undefined> {
    const { cdb, dataOut, nexus } = req;
    const op = cdb[0]!;
    const dev = this.opts.device;
    if (this.legacyHolder !== undefined && this.legacyHolder !== nexus.initiatorPort && !LEGACY_ALLOWED.has(op)) throw new StatusError(Status.RESERVATION_CONFLICT);
    if (READ_CLASS.has(op)) this.pr.check(nexus.initiatorPort, 'read');
    else if (WRITE_CLASS.has(op)) this.pr.check(nexus.initiatorPort, 'write');
    if (STANDBY_REFUSED.has(op) && this.seen.alua === AluaState.STANDBY) throw new SenseError({ key: SenseKey.NOT_READY, asc: Asc.LOGICAL_UNIT_NOT_READY_STANDBY });
    const forceFua = !this.mode.writeCache;
    const swp = this.mode.softwareWriteProtect;
    switch (op) {
      case ScsiOp.TEST_UNIT_READY:
        return undefined;
      case ScsiOp.REQUEST_SENSE:
        if (cdb[1]! & 0x01) throw invalidField(1, 0); // descriptor format: we only speak fixed
        return fixedSense({ key: SenseKey.NO_SENSE, asc: Asc.NO_ADDITIONAL });
      case ScsiOp.INQUIRY:
        return inquiry(cdb, { serial: this.opts.serial, targetName: this.opts.targetName, relativeTargetPort: this.portGroup, targetPortGroup: this.portGroup, lbpme: this.lbpme, deviceId: this.seen.deviceId });
      case ScsiOp.REPORT_LUNS:
        return this.reportLuns(cdb);
      case ScsiOp.READ_CAPACITY_10:
        return rw.readCapacity10(dev, cdb);
      case ScsiOp.SERVICE_ACTION_IN_16: {
        const sa = cdb[1]! & 0x1f;
        if (sa === ServiceAction.READ_CAPACITY_16) return rw.readCapacity16(dev, this.lbpme);
        if (sa === ServiceAction.GET_LBA_STATUS) {
          this.pr.check(nexus.initiatorPort, 'read');
          return rw.getLbaStatus(dev, cdb);
        }
        throw invalidField(1);
      }
      case ScsiOp.READ_6:
      case ScsiOp.READ_10:
      case ScsiOp.READ_12:
      case ScsiOp.READ_16: {
        const b = await rw.read(dev, cdb);
        this.counters.readOps++;
        this.counters.readBytes += b.length;
        return b;
      }
      case ScsiOp.WRITE_6:
      case ScsiOp.WRITE_10:
      case ScsiOp.WRITE_12:
      case ScsiOp.WRITE_16:
      case ScsiOp.WRITE_AND_VERIFY_10:
      case ScsiOp.WRITE_AND_VERIFY_12:
      case ScsiOp.WRITE_AND_VERIFY_16: {
        if ((op === ScsiOp.WRITE_AND_VERIFY_10 || op === ScsiOp.WRITE_AND_VERIFY_12 || op === ScsiOp.WRITE_AND_VERIFY_16) && ((cdb[1]! >> 1) & 3) > 1) throw invalidField(1, 1);
        const data = dataOut ?? Buffer.alloc(0);
        await rw.write(dev, cdb, data, forceFua, swp);
        this.counters.writeOps++;
        this.counters.writeBytes += rw.dataOutLength(cdb);
        return undefined;
      }
      case ScsiOp.VERIFY_10:
      case ScsiOp.VERIFY_12:
      case ScsiOp.VERIFY_16:
        await rw.verify(dev, cdb, dataOut);
        return undefined;
      case ScsiOp.WRITE_SAME_10:
      case ScsiOp.WRITE_SAME_16:
        if (req.edtl !== undefined && req.edtl !== rw.dataOutLength(cdb)) throw invalidField(0);
        await rw.writeSame(dev, cdb, dataOut, forceFua, swp);
        return undefined;
      case ScsiOp.UNMAP:
        await rw.unmap(dev, cdb, dataOut, swp);
        return undefined;
      case ScsiOp.SYNCHRONIZE_CACHE_10:
      case ScsiOp.SYNCHRONIZE_CACHE_16:
        await rw.synchronizeCache(dev, cdb);
        return undefined;
      case ScsiOp.PRE_FETCH_10:
      case ScsiOp.PRE_FETCH_16:
        await rw.preFetch(dev, cdb);
        return undefined;
      case ScsiOp.COMPARE_AND_WRITE:
        if (!this.opts.atomic) throw invalidOpcode();
        if (req.edtl !== undefined && req.edtl !== rw.dataOutLength(cdb)) throw invalidField(13);
        await rw.compareAndWrite(this.opts.atomic, cdb, dataOut ?? Buffer.alloc(0), forceFua, swp);
        return undefined;
      case ScsiOp.ORWRITE_16:
        if (!this.opts.atomic) throw invalidOpcode();
        await rw.orWrite(this.opts.atomic, cdb, dataOut ?? Buffer.alloc(0), forceFua, swp);
        this.counters.writeOps++;
        return undefined;
      case ScsiOp.MODE_SENSE_6:
      case ScsiOp.MODE_SENSE_10:
        return modeSense(cdb, dev, this.mode, { standby: this.seen.alua === AluaState.STANDBY });
      case ScsiOp.MODE_SELECT_6:
      case ScsiOp.MODE_SELECT_10: {
        if (!(cdb[1]! & 0x10)) throw invalidField(1, 4); // PF must be set: we only know the standard page format
        const before = { ...this.mode };
        modeSelect(cdb, dataOut, this.mode);
        if (before.writeCache !== this.mode.writeCache || before.softwareWriteProtect !== this.mode.softwareWriteProtect) this.unitAttentions.raise(UaCode.MODE_PARAMETERS_CHANGED, nexus.initiatorPort);
        return undefined;
      }
      case ScsiOp.START_STOP_UNIT:
        // A non-removable disk that is always ready: stopping it only makes the cache durable.
        if (!(cdb[4]! & 0x01)) await dev.flush();
        return undefined;
      case ScsiOp.PREVENT_ALLOW_MEDIUM_REMOVAL:
        return undefined;
      case ScsiOp.RESERVE_6:
        if (cdb[1]! & 0x01 || cdb[1]! & 0x02) throw invalidField(1); // third-party and extent reservations are obsolete
        if (this.pr.registrations.size > 0 || this.pr.reservation) throw new StatusError(Status.RESERVATION_CONFLICT);
        this.legacyHolder = nexus.initiatorPort;
        return undefined;
      case ScsiOp.RELEASE_6:
        if (this.legacyHolder === nexus.initiatorPort) this.legacyHolder = undefined;
        return undefined;
      case ScsiOp.PERSISTENT_RESERVE_IN:
        return this.pr.in(cdb);
      case ScsiOp.PERSISTENT_RESERVE_OUT:
        this.pr.out(cdb, dataOut, nexus.initiatorPort);
        return undefined;
      case ScsiOp.MAINTENANCE_IN: {
        const sa = cdb[1]! & 0x1f;
        if (sa === ServiceAction.REPORT_SUPPORTED_OPCODES) return reportSupportedOpcodes(cdb, (s) => (s.op !== ScsiOp.COMPARE_AND_WRITE && s.op !== ScsiOp.ORWRITE_16) || !!this.opts.atomic);
        if (sa === ServiceAction.REPORT_TARGET_PORT_GROUPS) return this.reportTargetPortGroups(cdb);
        throw invalidField(1);
      }
      default:
        throw invalidOpcode();
    }
  }

  /** LUN reset: SPC-2 reservations end (persistent ones stay, as SPC-4 says); every nexus gets a unit attention. */
  reset(): void {
    this.legacyHolder = undefined;
    this.unitAttentions.raise(UaCode.RESET);
  }

  /** An I_T nexus logged in to the target: it hears of every change from now on, not of those before it came. */
  nexusJoined(initiatorPort: string): void {
    this.noticeChanges();
    this.unitAttentions.join(initiatorPort);
  }

  /** The I_T nexus is gone (logout, dropped connection): its RESERVE(6) and pending unit attentions end with it. */
  nexusLost(initiatorPort: string): void {
    if (this.legacyHolder === initiatorPort) this.legacyHolder = undefined;
    this.unitAttentions.leave(initiatorPort);
  }

  private reportLuns(cdb: Buffer): Buffer {
    if (cdb[2]! > 2) throw invalidField(2);
    if (cdb.readUInt32BE(6) < 16) throw invalidField(6);
    const luns = this.opts.luns();
    const b = Buffer.alloc(8 + luns.length * 8);
    b.writeUInt32BE(luns.length * 8, 0);
    luns.forEach((l, i) => {
      // Peripheral addressing below 256, flat space above (SAM-5 4.7).
      if (l < 256) b[9 + i * 8] = l;
      else b.writeUInt16BE(0x4000 | l, 8 + i * 8);
    });
    return b;
  }

  /** ALUA: one target port group per LU role; master active/optimized, mirror standby. */
  private reportTargetPortGroups(cdb: Buffer): Buffer {
    const extended = (cdb[1]! >> 5) === 1;
    const state = this.opts.alua?.() ?? AluaState.ACTIVE_OPTIMIZED;
    const d = Buffer.alloc(12);
    d[0] = 0x80 | state; // PREF
    d[1] = 0x04 | 0x01 | 0x02; // S_SUP, AO_SUP, AN_SUP
    d.writeUInt16BE(this.portGroup, 2);
    d[5] = 0x02; // STATUS CODE: altered by implicit transition
    d[7] = 1;
    d.writeUInt16BE(this.portGroup, 10);
    const h = Buffer.alloc(extended ? 8 : 4);
    h.writeUInt32BE(h.length - 4 + d.length, 0);
    if (extended) h[4] = 0x10;
    return Buffer.concat([h, d]);
  }
}

export { SenseError, cdbLength as scsiCdbLength };

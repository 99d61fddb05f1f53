// What the SCSI emulation sees of a command, and what it answers. The iSCSI layer turns these into
// PDUs (Data-In, SCSI Response, residuals); nothing here knows about sockets.
import type { BlockDevice } from '../../blockdev/types.js';
import type { AtomicDevice } from '../../blockdev/atomic.js';

/** The I_T nexus: who sends the command (SPC-4 "initiator port"), for reservations. */
export interface Nexus {
  /** "iqn....,i,0x<ISID>" as iSCSI names an initiator port (RFC 7143 10.1.1). */
  initiatorPort: string;
  /** Relative target port identifier (1 per portal group). */
  relativeTargetPort: number;
}

export interface ScsiRequest {
  cdb: Buffer;
  /** Data-Out as received (ExpectedDataTransferLength bytes), for commands that carry data. */
  dataOut?: Buffer;
  /** ExpectedDataTransferLength of a command with Data-Out (exact-size checks, e.g. COMPARE AND WRITE). */
  edtl?: number;
  nexus: Nexus;
}

export interface ScsiResult {
  status: number;
  /** Data-In; may be longer than the initiator's allocation: the iSCSI layer truncates and reports residuals. */
  dataIn?: Buffer;
  /** Sense data for CHECK CONDITION. */
  sense?: Buffer;
  /** dataIn came from the I/O buffer pool (a READ): give it back once it has gone out. */
  pooled?: boolean;
}

/** ALUA asymmetric access states (SPC-4 6.37). */
export const AluaState = { ACTIVE_OPTIMIZED: 0x0, ACTIVE_NON_OPTIMIZED: 0x1, STANDBY: 0x2, UNAVAILABLE: 0x3 } as const;
export type AluaStateValue = (typeof AluaState)[keyof typeof AluaState];

export interface LogicalUnitOptions {
  lun: number;
  /** The volume's host device (reads fall back to the master inside it). */
  device: BlockDevice;
  /** The atomic layer over the same device, for COMPARE AND WRITE; without it the command is not offered. */
  atomic?: AtomicDevice;
  /** Unit serial number (VPD 0x80) and the seed of the NAA identifier. */
  serial: string;
  targetName: string;
  /** Role of the volume now: master active/optimized, mirror standby. Asked on every REPORT TARGET PORT GROUPS. */
  alua?: () => AluaStateValue;
  /**
   * The device this LU is a path to, when it is not just this volume: the members of a pair
   * share one (the pair's name), so VPD 0x83 gives both paths one NAA and multipath joins them.
   * Undefined: the NAA comes from target name and serial.
   */
  deviceId?: () => string | undefined;
  /** Target port group and relative target port of this target (one per storage system: its ID); default 1. */
  portGroup?: number;
  /** Where persistent reservations are kept across restarts (JSON); none keeps them in memory. */
  prFile?: string;
  /** Every LUN of the target, for REPORT LUNS. */
  luns: () => number[];
}

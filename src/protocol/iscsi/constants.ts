// iSCSI wire constants (RFC 7143). Debug names are derived from these tables, never retyped.

export const BHS_LENGTH = 48;
export const DEFAULT_ISCSI_PORT = 3260;
/** A data segment is padded to a multiple of 4 bytes; digests are 4 bytes. */
export const DIGEST_LENGTH = 4;
/** The reserved "no tag" value (ITT/TTT 0xffffffff). */
export const RESERVED_TAG = 0xffffffff;

export const Op = {
  // initiator -> target
  NOP_OUT: 0x00,
  SCSI_CMD: 0x01,
  TMF_REQ: 0x02,
  LOGIN_REQ: 0x03,
  TEXT_REQ: 0x04,
  DATA_OUT: 0x05,
  LOGOUT_REQ: 0x06,
  SNACK: 0x10,
  // target -> initiator
  NOP_IN: 0x20,
  SCSI_RESP: 0x21,
  TMF_RESP: 0x22,
  LOGIN_RESP: 0x23,
  TEXT_RESP: 0x24,
  DATA_IN: 0x25,
  LOGOUT_RESP: 0x26,
  R2T: 0x31,
  ASYNC: 0x32,
  REJECT: 0x3f,
} as const;
export type Opcode = (typeof Op)[keyof typeof Op];

export const OP_NAMES: Record<number, string> = Object.fromEntries(Object.entries(Op).map(([k, v]) => [v, k]));

export function isInitiatorOpcode(op: number): boolean {
  return op <= 0x06 || op === 0x10;
}

/** Reject reasons (RFC 7143 11.17.1). */
export const RejectReason = {
  DATA_DIGEST_ERROR: 0x02,
  SNACK_REJECT: 0x03,
  PROTOCOL_ERROR: 0x04,
  COMMAND_NOT_SUPPORTED: 0x05,
  IMMEDIATE_COMMAND_REJECT: 0x06,
  TASK_IN_PROGRESS: 0x07,
  INVALID_DATA_ACK: 0x08,
  INVALID_PDU_FIELD: 0x09,
  OUT_OF_RESOURCES: 0x0a,
  WAITING_FOR_LOGOUT: 0x0c,
} as const;

/** Task management functions (11.5.1) and responses (11.6.1). */
export const TmfFunction = {
  ABORT_TASK: 1,
  ABORT_TASK_SET: 2,
  CLEAR_ACA: 3,
  CLEAR_TASK_SET: 4,
  LOGICAL_UNIT_RESET: 5,
  TARGET_WARM_RESET: 6,
  TARGET_COLD_RESET: 7,
  TASK_REASSIGN: 8,
} as const;
export const TmfResponse = {
  COMPLETE: 0,
  NO_TASK: 1,
  NO_LUN: 2,
  TASK_ALLEGIANT: 3,
  NO_REASSIGN: 4,
  NOT_SUPPORTED: 5,
  AUTH_FAILED: 6,
  REJECTED: 255,
} as const;

/** Login stages (CSG/NSG). */
export const Stage = { SECURITY: 0, OPERATIONAL: 1, FULL_FEATURE: 3 } as const;

/** Login status class << 8 | detail (11.13.5). */
export const LoginStatus = {
  SUCCESS: 0x0000,
  TARGET_MOVED_TEMP: 0x0101,
  INITIATOR_ERROR: 0x0200,
  AUTH_FAILED: 0x0201,
  FORBIDDEN: 0x0202,
  NOT_FOUND: 0x0203,
  TARGET_REMOVED: 0x0204,
  UNSUPPORTED_VERSION: 0x0205,
  TOO_MANY_CONNECTIONS: 0x0206,
  MISSING_PARAMETER: 0x0207,
  CANT_INCLUDE_IN_SESSION: 0x0208,
  SESSION_TYPE_NOT_SUPPORTED: 0x0209,
  SESSION_DOES_NOT_EXIST: 0x020a,
  INVALID_DURING_LOGIN: 0x020b,
  TARGET_ERROR: 0x0300,
  SERVICE_UNAVAILABLE: 0x0301,
  OUT_OF_RESOURCES: 0x0302,
} as const;

/** Logout reasons and responses. */
export const LogoutReason = { CLOSE_SESSION: 0, CLOSE_CONNECTION: 1, REMOVE_FOR_RECOVERY: 2 } as const;
export const LogoutResponse = { OK: 0, CID_NOT_FOUND: 1, RECOVERY_UNSUPPORTED: 2, CLEANUP_FAILED: 3 } as const;

/** SCSI Response "response" byte. */
export const ScsiResponse = { COMPLETED: 0x00, TARGET_FAILURE: 0x01 } as const;

/** Async events (11.9.1). */
export const AsyncEvent = { SCSI: 0, LOGOUT_REQUEST: 1, DROP_CONNECTION: 2, DROP_ALL: 3, NEGOTIATE: 4 } as const;

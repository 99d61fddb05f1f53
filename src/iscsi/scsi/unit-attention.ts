// Unit attention conditions of one logical unit (SAM-5 5.14, SPC-4 5.12): something changed that
// every initiator must hear about before its next command runs. Kept per I_T nexus (initiator
// port), so a multipath host learns the news once on each path.
//
//   event                                      ASC/ASCQ  established for
//   a new I_T nexus (login; SAM-5 6.3.2)       29/00     that nexus, for each LU (POWER ON, RESET, OR
//                                                        BUS DEVICE RESET OCCURRED; as tgt does)
//   LUN RESET, TARGET WARM RESET               29/03     every nexus of the LU, the resetting one too
//                                                        (BUS DEVICE RESET FUNCTION OCCURRED)
//   role change: the volume starts or stops    2A/06     every nexus (ASYMMETRIC ACCESS STATE
//   taking host writes (swap, takeover,                  CHANGED: ALUA follows the role)
//   split, resync, S-VOL attribute)
//   capacity change                            2A/09     every nexus (CAPACITY DATA HAS CHANGED)
//   MODE SELECT changed a page                 2A/01     every nexus but the one that changed it
//   the device identity changed (a pair made,  3F/03     every nexus (INQUIRY DATA HAS CHANGED:
//   split, resynced or deleted)                          VPD 0x83 names another device now)
//
//   pending UA and a command of the nexus      what happens (UA_INTLCK_CTRL = 0)
//   INQUIRY, REPORT LUNS                       runs; the UA stays
//   REQUEST SENSE                              returns the UA's sense data; the UA is cleared
//   anything else                              CHECK CONDITION, UNIT ATTENTION; the UA is cleared
//
// A reset supersedes what was queued before it (the initiator rereads everything after a reset).
// A new nexus starts with 29/00 only: what changed before it came is no news to it. Real initiators
// expect it and clear it (Linux's scan retries, libiscsi's connect sends TEST UNIT READY).
// A nexus that is lost (logout, dropped connection) takes its pending UAs with it.
import { Asc, ScsiOp } from './constants.js';

/** ASC/ASCQ of the unit attentions this target raises. */
export const UaCode = {
  POWER_ON_OR_RESET: Asc.POWER_ON_RESET,
  RESET: 0x2903,
  MODE_PARAMETERS_CHANGED: Asc.MODE_PARAMETERS_CHANGED,
  ASYMMETRIC_ACCESS_STATE_CHANGED: Asc.ASYMMETRIC_ACCESS_STATE_CHANGED,
  CAPACITY_CHANGED: 0x2a09,
  INQUIRY_DATA_CHANGED: 0x3f03,
} as const;

/** What a pending unit attention does to a command (see the table above). */
export type UaOutcome = { kind: 'none' } | { kind: 'report'; asc: number } | { kind: 'sense'; asc: number };

export class UnitAttentions {
  /** Initiator port -> pending ASC/ASCQ, oldest first. */
  private readonly pending = new Map<string, number[]>();

  /** A new nexus (login, or its first command): it hears of the power on / reset first, then of what follows. */
  join(nexus: string): void {
    if (!this.pending.has(nexus)) this.pending.set(nexus, [UaCode.POWER_ON_OR_RESET]);
  }

  leave(nexus: string): void {
    this.pending.delete(nexus);
  }

  /** Establish `asc` for every known nexus, but `except`. */
  raise(asc: number, except?: string): void {
    for (const [nexus, queue] of this.pending) {
      if (nexus === except) continue;
      if (asc === UaCode.RESET) queue.length = 0;
      if (!queue.includes(asc)) queue.push(asc);
    }
  }

  /** What the pending UA (if any) does to a command with opcode `op` from `nexus`; clears it where SPC-4 says. */
  check(nexus: string, op: number): UaOutcome {
    if (!this.pending.has(nexus)) this.join(nexus);
    const queue = this.pending.get(nexus)!;
    if (queue.length === 0 || op === ScsiOp.INQUIRY || op === ScsiOp.REPORT_LUNS) return { kind: 'none' };
    const asc = queue.shift()!;
    return op === ScsiOp.REQUEST_SENSE ? { kind: 'sense', asc } : { kind: 'report', asc };
  }

  /** Pending UAs of a nexus, oldest first (tests, status). */
  of(nexus: string): readonly number[] {
    return this.pending.get(nexus) ?? [];
  }
}

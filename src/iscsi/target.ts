// What the iSCSI server serves: targets (an IQN, its LUNs, CHAP, an allow-list) and portals.
import type { ChapSecrets } from './chap.js';
import type { LogicalUnit } from './scsi/lu.js';

export { AllowList } from '../util/allow-list.js';

export interface TargetSpec {
  name: string;
  alias?: string;
  luns: Map<number, LogicalUnit>;
  chap?: ChapSecrets;
  /** Initiators allowed to log in: IQN patterns (`*` matches any run) and CIDRs. Empty or absent: everyone. */
  allow?: string[];
}

/** The SCSI initiator port name of a session: "iqn....,i,0x<ISID>" (RFC 7143 10.1.1), the I_T nexus of reservations and unit attentions. */
export function initiatorPortName(initiatorName: string, isid: number): string {
  return `${initiatorName},i,0x${isid.toString(16).padStart(12, '0')}`;
}

/** Target names are IQNs or EUIs, lower case (RFC 3722 stringprep folds case): compare them so. */
export function normaliseName(name: string): string {
  return name.toLowerCase();
}


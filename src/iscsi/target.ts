// What the iSCSI server serves: targets (an IQN, its LUNs, CHAP, an allow-list) and portals.
import net from 'node:net';
import type { ChapSecrets } from './chap.js';
import type { LogicalUnit } from './scsi/lu.js';

export interface TargetSpec {
  name: string;
  alias?: string;
  luns: Map<number, LogicalUnit>;
  chap?: ChapSecrets;
  /** Initiators allowed to log in: IQN patterns (`*` matches any run) and CIDRs. Empty or absent: everyone. */
  allow?: string[];
}

/** Target names are IQNs or EUIs, lower case (RFC 3722 stringprep folds case): compare them so. */
export function normaliseName(name: string): string {
  return name.toLowerCase();
}

export class AllowList {
  private readonly names: RegExp[] = [];
  private readonly nets = new net.BlockList();
  private nNets = 0;

  constructor(entries: string[] | undefined) {
    for (const e of entries ?? []) {
      const cidr = /^([0-9a-fA-F:.]+)\/(\d{1,3})$/.exec(e);
      if (cidr) {
        const type = net.isIPv6(cidr[1]!) ? 'ipv6' : 'ipv4';
        this.nets.addSubnet(cidr[1]!, Number(cidr[2]), type);
        this.nNets++;
      } else if (net.isIP(e)) {
        this.nets.addAddress(e, net.isIPv6(e) ? 'ipv6' : 'ipv4');
        this.nNets++;
      } else {
        const re = e.toLowerCase().replace(/[.+?^${}()|[\]\\]/g, '\\$&').replace(/\*/g, '.*');
        this.names.push(new RegExp(`^${re}$`));
      }
    }
  }

  /** Both kinds must agree when both are given: a known IQN from an unknown network is refused. */
  allows(initiatorName: string, address: string): boolean {
    const n = initiatorName.toLowerCase();
    const nameOk = this.names.length === 0 || this.names.some((r) => r.test(n));
    const addr = address.startsWith('::ffff:') ? address.slice(7) : address;
    const netOk = this.nNets === 0 || this.nets.check(addr, net.isIPv6(addr) ? 'ipv6' : 'ipv4');
    return nameOk && netOk;
  }
}

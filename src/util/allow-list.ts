// Access lists for the front ends: who may use a target or an export.
//
//   entry            matches
//   10.0.0.0/8       a client address in the subnet (IPv4 or IPv6)
//   10.1.2.3, ::1    that one address
//   anything else    a name pattern, `*` matching any run: an iSCSI initiator's IQN, or an NBD
//                    client's TLS identity (its PSK identity or its certificate's common name)
//
// When a list has both kinds, a client must match both: a known name from an unknown network is
// refused. An empty list admits everyone.
import net from 'node:net';

export class AllowList {
  private readonly names: RegExp[] = [];
  private readonly nets = new net.BlockList();
  private nNets = 0;
  readonly entries: readonly string[];

  constructor(entries: string[] | undefined) {
    this.entries = entries ?? [];
    for (const e of this.entries) {
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

  get empty(): boolean {
    return this.entries.length === 0;
  }

  /** `name` is the IQN or TLS identity ("" when the client has none); `address` the peer's IP ("" for a unix socket). */
  allows(name: string, address: string): boolean {
    const n = name.toLowerCase();
    const nameOk = this.names.length === 0 || (n !== '' && this.names.some((r) => r.test(n)));
    const addr = address.startsWith('::ffff:') ? address.slice(7) : address;
    const netOk = this.nNets === 0 || (net.isIP(addr) !== 0 && this.nets.check(addr, net.isIPv6(addr) ? 'ipv6' : 'ipv4'));
    return nameOk && netOk;
  }
}

/** Why an entry cannot be an allow-list entry, or undefined when it can. */
export function allowEntryProblem(e: string): string | undefined {
  const cidr = /^([0-9a-fA-F:.]+)\/(\d{1,3})$/.exec(e);
  if (cidr) {
    const ip = net.isIP(cidr[1]!);
    if (ip === 0) return `${JSON.stringify(e)} is not a subnet: ${cidr[1]} is not an IP address`;
    if (Number(cidr[2]) > (ip === 4 ? 32 : 128)) return `${JSON.stringify(e)} has a prefix longer than ${ip === 4 ? 32 : 128} bits`;
    return undefined;
  }
  if (!/^[A-Za-z0-9*][A-Za-z0-9.:_*@-]*$/.test(e)) return `${JSON.stringify(e)} is neither an address, a subnet (10.0.0.0/8) nor a name pattern (letters, digits, . : _ - @ and *)`;
  return undefined;
}

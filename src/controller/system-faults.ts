// The faults injected into one storage system (docs/faults.md): on its volumes (their fault
// filter, blockdev/fault.ts) and on its end of each link to a peer (peer/link.ts). Requests are
// checked and resolved by fault-table.ts; this applies them, lists them, and clears them.
import type { Logger } from 'pino';
import { describeFault, type VolumeFault } from '../blockdev/fault.js';
import {
  FaultSpecError,
  formatFaultTarget,
  linkFaultStatus,
  parseFaultTarget,
  resolveFault,
  volumeFaultStatus,
  type FaultRequest,
  type FaultStatus,
  type FaultTarget,
  type LinkFault,
} from './fault-table.js';
import type { PeerLink } from './peer/link.js';
import { PairCommandError } from './status.js';
import type { VolumeStack } from './volume-stack.js';

export class SystemFaults {
  private readonly linkFaults = new Map<number, LinkFault>();

  constructor(
    private readonly self: number,
    private readonly volumes: Map<number, VolumeStack>,
    private readonly links: Map<number, PeerLink>,
    private readonly log: Logger,
  ) {}

  /** Set a fault on one of our volumes, or on our end of a link; refused with a clear line otherwise. */
  set(req: FaultRequest): FaultStatus[] {
    let resolved;
    try {
      resolved = resolveFault(req);
    } catch (e) {
      if (e instanceof FaultSpecError) throw new PairCommandError('refused', e.message, { cause: e });
      throw e;
    }
    const { target } = resolved;
    if ('volume' in resolved) {
      const v = target.type === 'volume' && target.ss === this.self ? this.volumes.get(target.vol) : undefined;
      if (!v) throw new PairCommandError('not-found', `storage system ${this.self} has no volume ${req.target} (its volumes: ${[...this.volumes.keys()].map((id) => `${this.self}:${id}`).join(', ')})`);
      v.faults.set(resolved.volume);
      this.log.warn({ target: req.target, fault: describeFault(resolved.volume) }, `fault injected on ${req.target}`);
    } else {
      const link = this.linkFor(resolved.target);
      link.setFault(resolved.link);
      this.linkFaults.set(link.peer, resolved.link);
      this.log.warn({ target: req.target, fault: resolved.link.kind }, `fault injected on ${req.target}`);
    }
    return this.list();
  }

  /** Clear the faults of a target (every kind, or one). */
  clear(targetText: string, kind?: string): FaultStatus[] {
    let target: FaultTarget;
    try {
      target = parseFaultTarget(targetText);
    } catch (e) {
      if (e instanceof FaultSpecError) throw new PairCommandError('refused', e.message, { cause: e });
      throw e;
    }
    if (target.type === 'volume') {
      const v = target.ss === this.self ? this.volumes.get(target.vol) : undefined;
      if (!v) throw new PairCommandError('not-found', `storage system ${this.self} has no volume ${targetText}`);
      v.faults.clear(kind as VolumeFault['kind'] | undefined);
    } else {
      const link = this.linkFor(target);
      link.setFault(null);
      this.linkFaults.delete(link.peer);
    }
    this.log.warn({ target: targetText }, `faults cleared on ${targetText}`);
    return this.list();
  }

  list(): FaultStatus[] {
    const out: FaultStatus[] = [];
    for (const v of this.volumes.values()) for (const f of v.faults.list()) out.push(volumeFaultStatus(`${this.self}:${v.id}`, f));
    for (const [peer, f] of this.linkFaults) out.push(linkFaultStatus(formatFaultTarget({ type: 'link', a: Math.min(peer, this.self), b: Math.max(peer, this.self) }), f));
    return out;
  }

  private linkFor(t: FaultTarget): PeerLink {
    const peer = t.type === 'link' ? (t.a === this.self ? t.b : t.b === this.self ? t.a : undefined) : undefined;
    const link = peer === undefined ? undefined : this.links.get(peer);
    if (!link) {
      const ends = t.type === 'link' ? `${t.a}-${t.b}` : '';
      throw new PairCommandError('not-found', `storage system ${this.self} has no link ${ends}: it links to ${this.links.size > 0 ? [...this.links.keys()].join(', ') : 'no other storage system'}`);
    }
    return link;
  }
}

// The host-facing device of a volume in a pair across storage systems (RemotePair.hostDevice):
// one object per volume for the pair's life, whose requests go to whatever its current role
// serves (the master's pair layer, or the mirror side), so hosts stay attached across a swap.
import { landedPayload, type BlockDevice, type Payload, type WriteTarget } from '../../blockdev/types.js';
import { FilterDevice } from '../../blockdev/filter.js';

/** A volume whose behaviour follows its current role in the pair: one map lookup per request. */
export class RoleFollower extends FilterDevice {
  constructor(private readonly current: () => BlockDevice) {
    super(current());
  }
  protected override get next(): BlockDevice {
    return this.current();
  }

  /**
   * The current role's target. A role change before the commit (a swap, a takeover) sends the
   * landed bytes, copied out, to the new role's device, as a write() at that moment would go.
   */
  writeTarget(offset: number, length: number, from: number): WriteTarget | null {
    const dev = this.current();
    const below = dev.writeTarget?.(offset, length, from);
    if (!below) return null;
    return {
      pieces: below.pieces,
      commit: (head: Payload, fua?: boolean): Promise<void> => {
        const now = this.current();
        if (now === dev) return below.commit(head, fua);
        const data = landedPayload(head, below);
        below.abort();
        return now.write(offset, data, fua);
      },
      abort: () => below.abort(),
    };
  }
}

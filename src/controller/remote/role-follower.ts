// The host-facing device of a volume in a pair across storage systems (RemotePair.hostDevice):
// one object per volume for the pair's life, whose requests go to whatever its current role
// serves (the master's pair layer, or the mirror side), so hosts stay attached across a swap.
import type { BlockDevice } from '../../blockdev/types.js';
import { FilterDevice } from '../../blockdev/filter.js';

/** A volume whose behaviour follows its current role in the pair: one map lookup per request. */
export class RoleFollower extends FilterDevice {
  constructor(private readonly current: () => BlockDevice) {
    super(current());
  }
  protected override get next(): BlockDevice {
    return this.current();
  }
}

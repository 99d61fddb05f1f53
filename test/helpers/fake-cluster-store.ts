// The etcd tables a gateway's logical volume reads (src/gateway/logical-volume.ts), faked in memory
// with their 'change' event, for tests of the gateway against real NBD servers without etcd.
import { EventEmitter } from 'node:events';
import type { ClusterStore } from '../../src/cluster/etcd/store.js';

export class FakeStore extends EventEmitter {
  readonly tables = {
    logicalVolumes: new Map<string, { name: string; master: { ss: number; vol: number } }>(),
    storageSystems: new Map<number, { nbd: string }>(),
    mirrors: new Map<string, { mirrors: { ss: number; vol: number; state: string }[] }>(),
  };

  /** Logical volume `lv`'s master is now volume 1 of storage system `ss`. */
  point(ss: number): void {
    this.tables.logicalVolumes.set('lv', { name: 'lv', master: { ss, vol: 1 } });
    this.emit('change');
  }

  /** As the logical volume takes it. */
  get asStore(): ClusterStore {
    return this as unknown as ClusterStore;
  }
}

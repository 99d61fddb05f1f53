// What a server exports: named block devices. The storage system later fills
// this table with its volumes ("vol8", ...); `serve` puts a single one in it.
import type { BlockDevice } from '../blockdev/types.js';
import type { AllowList } from '../util/allow-list.js';

export interface Export {
  name: string;
  description: string;
  device: BlockDevice;
  /** Hosts may not write (a paired mirror, or --read-only). */
  readOnly: boolean;
  /** Reachable by name but left out of LIST (a storage system's replication exports). */
  hidden?: boolean;
  /** Who may use it (address and TLS identity); absent: everyone who reaches the server. */
  allow?: AllowList;
}

export class ExportTable {
  private readonly byName = new Map<string, Export>();
  /** The export the empty name "" (NBD's default export) resolves to, if any. */
  defaultName: string | undefined;

  add(e: Export): void {
    if (this.byName.has(e.name)) throw new Error(`export ${e.name} is defined twice`);
    this.byName.set(e.name, e);
  }

  remove(name: string): void {
    this.byName.delete(name);
  }

  get(name: string): Export | undefined {
    if (name === '' && this.defaultName !== undefined) return this.byName.get(this.defaultName);
    return this.byName.get(name);
  }

  /** What LIST shows: every export but the hidden ones. */
  list(): Export[] {
    return [...this.byName.values()].filter((e) => !e.hidden);
  }
}

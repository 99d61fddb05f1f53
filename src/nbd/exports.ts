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

/** Names listed in an unknown-export message; nbdinfo --list shows the rest. */
const MAX_LISTED = 10;

function clip(s: string, max: number): string {
  return s.length > max ? `${s.slice(0, max - 1)}…` : s;
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

  /**
   * The ERR_UNKNOWN message for a name that is not here: what exists, so the client's user can
   * correct it. Hidden exports stay hidden; past MAX_LISTED names it says how many more.
   */
  unknownExportMessage(name: string, visible: (e: Export) => boolean = () => true): string {
    const names = this.list().filter(visible).map((e) => e.name);
    const shown = names.slice(0, MAX_LISTED).map((n) => clip(n, 64));
    const more = names.length > MAX_LISTED ? ` and ${names.length - MAX_LISTED} more` : '';
    const asked = JSON.stringify(clip(name, 64));
    if (names.length === 0) return `no export named ${asked}; this server lists no exports`;
    return `no export named ${asked}; the exports are: ${shown.join(', ')}${more} (nbdinfo --list shows them all)`;
  }

  /** What LIST shows: every export but the hidden ones. */
  list(): Export[] {
    return [...this.byName.values()].filter((e) => !e.hidden);
  }
}

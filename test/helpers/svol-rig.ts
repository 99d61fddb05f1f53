// An S-VOL group in process, without a server (test/svol-destage.test.ts, test/svol.model.test.ts):
// a file volume for the P-VOL, each member and each increments volume, each under a fault layer,
// then the group, its P-VOL and a host device per logical ID. Tests fail members through `faults`
// and read the files below the fault layer with `volume()`.
import fs from 'node:fs';
import path from 'node:path';
import { pino } from 'pino';
import { FaultDevice, FaultSet } from '../../src/blockdev/fault.js';
import { openFileDevice } from '../../src/blockdev/file.js';
import type { BlockDevice } from '../../src/blockdev/types.js';
import { SvolGroup, type SvolGroupSpec } from '../../src/controller/svol/group.js';
import type { SvolMemberStatus } from '../../src/controller/svol/status.js';
import { LogicalVolume, PvolVolume } from '../../src/controller/svol/logical-volume.js';

export class SvolRig {
  /** Per physical volume; kept across close() and open(), so a fault outlives a restart. */
  faults = new Map<number, FaultSet>();
  volumes = new Map<number, { device: BlockDevice }>();
  group!: SvolGroup;
  pvol!: PvolVolume;
  /** The host's device for each logical ID. */
  logical = new Map<number, LogicalVolume>();
  private files: BlockDevice[] = [];
  /** Put a device of the test's over a volume at the next open() (an increments volume's device is held from then on). */
  wrap: ((vol: number, dev: BlockDevice) => BlockDevice) | undefined;

  /** `size` of the P-VOL and each member; an increments volume gets two clusters more (its header). */
  constructor(
    readonly dir: string,
    readonly spec: SvolGroupSpec,
    readonly clusterSize: number,
    readonly size: number,
    /** Bytes between a restore's checkpoints (the group's default unless given). */
    readonly restoreCheckpoint?: number,
  ) {}

  async open(): Promise<void> {
    const increments = new Set(this.spec.members.flatMap((m) => (m.increments !== undefined ? [m.increments] : [])));
    const vols = [this.spec.pvol, ...this.spec.members.map((m) => m.vol), ...increments];
    for (const v of vols) {
      const file = await openFileDevice(path.join(this.dir, `vol${v}.img`), { size: increments.has(v) ? 2 * this.clusterSize + this.size : this.size });
      this.files.push(file);
      const set = this.faults.get(v) ?? new FaultSet();
      this.faults.set(v, set);
      const dev = new FaultDevice(file, set, `vol${v}`);
      this.volumes.set(v, { device: this.wrap ? this.wrap(v, dev) : dev });
    }
    this.group = new SvolGroup(this.spec, { clusterSize: this.clusterSize, volumes: this.volumes, dir: path.join(this.dir, 'svol'), log: pino({ level: 'silent' }), ...(this.restoreCheckpoint ? { restoreCheckpoint: this.restoreCheckpoint } : {}) });
    await this.group.open();
    this.pvol = new PvolVolume(this.volumes.get(this.spec.pvol)!.device, this.group);
    this.logical.clear();
    this.group.logicalIds.forEach((id, i) => this.logical.set(id, new LogicalVolume(this.group, i, this.volumes)));
  }

  async close(): Promise<void> {
    await this.group.close();
    for (const f of this.files) await f.close();
    this.files = [];
  }

  /** The host's device for logical ID `id`. */
  lv(id: number): LogicalVolume {
    const dev = this.logical.get(id);
    if (!dev) throw new Error(`no logical ID ${id} in group ${this.spec.name}`);
    return dev;
  }

  /** The whole of a device, read through it. */
  async read(dev: BlockDevice): Promise<Buffer> {
    const b = Buffer.alloc(this.size);
    await dev.read(0, b);
    return b;
  }

  /** The bytes on a physical volume: its file, below the fault layer. */
  volume(v: number): Buffer {
    return fs.readFileSync(path.join(this.dir, `vol${v}.img`));
  }

  /** The group's status of the member at logical ID `id`. */
  member(id: number): SvolMemberStatus {
    const m = this.group.status().members.find((x) => x.logicalId === id);
    if (!m) throw new Error(`no logical ID ${id} in group ${this.spec.name}`);
    return m;
  }
}

// A pair whose master and mirrors are all in this storage system, as a PairController: the
// Pair (write and read modules, bitmap, states) plus what a storage system needs around it —
// its bitmap file and state record, its host devices, and the commands.
import path from 'node:path';
import type { Logger } from 'pino';
import type { BlockDevice } from '../blockdev/types.js';
import fs from 'node:fs';
import { FileBitmapStore, MemoryBitmapStore, markRuns, type BitmapStore } from './bitmap-store.js';
import { crashPoint } from '../util/crash-point.js';
import { setBits } from './remote/bits.js';
import { bitmapOf } from './pair-bitmap.js';
import { Pair, PairStateError, type FenceLevel, type PairSpec } from './pair.js';
import type { PairController } from './pair-controller.js';
import { readPairState, savePairState } from './pair-files.js';
import { PairCommandError, type PairBitmap, type PairStatus } from './status.js';
import type { SyncDaemon } from './sync-daemon.js';

/** What the storage system lends a local pair: its volumes (below any pair logic) and its daemon. */
export interface LocalPairContext {
  self: number;
  clusterSize: number;
  /** Volume id -> the controller's view of it (cache, faults) and whether this start created it. */
  volumes: Map<number, { device: BlockDevice; createdEmpty: boolean }>;
  daemon: SyncDaemon;
  /** dataDir/pairs, or undefined for a storage system in memory. */
  dir: string | undefined;
  log: Logger;
  /**
   * Live reconfiguration: the bits to start from, per mirror ("ss:vol" -> bitset; a mirror not
   * listed is all Invalid, a full copy). The bitmap file is made anew with this geometry.
   */
  seed?: Map<string, Uint8Array>;
}

export const mirrorKey = (ref: { ss: number; vol: number }): string => `${ref.ss}:${ref.vol}`;

export class LocalPair implements PairController {
  readonly name: string;
  readonly volumes: readonly number[];
  private pair!: Pair;
  private readonly hosts = new Map<number, BlockDevice>();

  constructor(
    private readonly spec: PairSpec,
    private readonly ctx: LocalPairContext,
  ) {
    this.name = spec.name;
    this.volumes = [spec.master.vol, ...spec.mirrors.map((m) => m.vol)];
    for (const ref of [spec.master, ...spec.mirrors]) {
      if (ref.ss !== ctx.self || !ctx.volumes.has(ref.vol)) throw new Error(`pair ${spec.name}: ss${ref.ss}/vol${ref.vol} is not a volume of storage system ${ctx.self}`);
    }
  }

  async open(): Promise<void> {
    const { spec, ctx } = this;
    const master = ctx.volumes.get(spec.master.vol)!;
    const mirrors = spec.mirrors.map((m) => ctx.volumes.get(m.vol)!);
    const clusters = Math.ceil(master.device.size / ctx.clusterSize);
    let store: BitmapStore;
    let loaded: Uint8Array[] | null = null;
    const geometry = { clusterSize: ctx.clusterSize, clusters, mirrors: mirrors.length };
    // The file names the copy of each slot: a restart with another YAML remaps the bits by copy (bitmap-store.ts).
    const copies = { master: mirrorKey(spec.master), mirrors: spec.mirrors.map(mirrorKey) };
    if (ctx.dir && ctx.seed) {
      // A rebuild: the new membership's bitmap is renamed over the old file, so a crash leaves one or the other, whole.
      loaded = seedImages(spec, ctx.seed, clusters);
      store = await FileBitmapStore.replace(this.bitmapFile!, geometry, copies, loaded);
      crashPoint('rebuild:bitmap-replaced');
    } else if (ctx.dir) {
      const opened = await FileBitmapStore.open(this.bitmapFile!, geometry, ctx.log, copies);
      store = opened.store;
      loaded = opened.loaded;
    } else {
      store = new MemoryBitmapStore(clusters, mirrors.length);
      if (ctx.seed) {
        loaded = seedImages(spec, ctx.seed, clusters);
        for (const [m, img] of loaded.entries()) await markRuns(store, m, setBits(img, clusters));
      }
    }
    const statePath = ctx.dir ? path.join(ctx.dir, `${spec.name}.state.json`) : undefined;
    this.pair = new Pair({
      name: spec.name,
      mode: spec.mode,
      clusterSize: ctx.clusterSize,
      master: { ref: spec.master, device: master.device },
      mirrors: mirrors.map((m, i) => ({ ref: spec.mirrors[i]!, device: m.device })),
      store,
      loaded,
      // Known identical: every volume of the pair was created empty by this start.
      identical: master.createdEmpty && mirrors.every((m) => m.createdEmpty),
      initialState: readPairState(statePath),
      syncRate: spec.syncRate,
      ...(spec.fence ? { fence: spec.fence } : {}),
      log: ctx.log,
      onInvalid: () => ctx.daemon.wake(),
      onHostWrite: () => ctx.daemon.noteHostIo(),
      onStateChange: (state) => savePairState(statePath, state),
    });
    ctx.daemon.add(this.pair);
    this.hosts.set(spec.master.vol, this.pair.masterDevice());
    spec.mirrors.forEach((m, i) => this.hosts.set(m.vol, this.pair.mirrorDevice(i)));
    ctx.log.info({ pair: spec.name, mode: spec.mode, state: this.pair.state, invalid: this.pair.mirrors.map((m) => m.bitmap.invalidCount) }, 'pair ready');
  }

  private get bitmapFile(): string | undefined {
    return this.ctx.dir ? path.join(this.ctx.dir, `${this.spec.name}.bitmap`) : undefined;
  }

  /** Each mirror's Invalid clusters now ("ss:vol" -> a copy of its bitset): the seed of the pair that replaces this one. */
  bits(): Map<string, Uint8Array> {
    return new Map(this.pair.mirrors.map((m) => [mirrorKey(m.ref), m.bitmap.bits.slice()]));
  }

  /** Sync rate and fence level, at run time. */
  configure(o: { syncRate: number | undefined; fence: FenceLevel }): void {
    this.pair.syncRate = o.syncRate;
    this.pair.fence = o.fence;
    this.ctx.daemon.wake();
  }

  /** The pair is deleted: its bitmap and state records go too (a new pair of that name starts afresh). */
  removeFiles(): void {
    if (!this.ctx.dir) return;
    for (const f of [this.bitmapFile!, path.join(this.ctx.dir, `${this.spec.name}.state.json`)]) fs.rmSync(f, { force: true });
  }

  hostDevice(vol: number): BlockDevice {
    return this.hosts.get(vol)!;
  }

  roleOf(vol: number): 'master' | 'mirror' {
    return vol === this.spec.master.vol ? 'master' : 'mirror';
  }

  staleReason(vol: number): string | null {
    if (this.roleOf(vol) === 'master') return null;
    const state = this.pair.state;
    return state === 'PAIR' || state === 'COPY' ? null : `vol${vol} is a mirror of ${this.spec.name}, which is ${state}: its data is as of the ${state === 'PSUS' ? 'split' : 'suspension'}`;
  }

  status(): PairStatus {
    return this.pair.status();
  }

  bitmap(buckets: number): PairBitmap {
    return bitmapOf(this.pair, buckets);
  }

  async split(): Promise<void> {
    try {
      await this.pair.split();
    } catch (e) {
      if (e instanceof PairStateError) throw new PairCommandError('refused', e.message, { cause: e });
      throw e;
    }
  }

  resync(): Promise<void> {
    return this.pair.resync();
  }

  async verify(): Promise<void> {
    if (this.pair.verifyProgress?.running) throw new PairCommandError('refused', `${this.name}: a verify is already running`);
    void this.pair.verify().catch((e: Error) => this.ctx.log.error({ pair: this.name, err: e.message }, 'verify failed'));
  }

  async swap(): Promise<void> {
    throw new PairCommandError('refused', `swap ${this.name}: master and mirror are in the same storage system; swap is for pairs across storage systems`);
  }

  async takeover(): Promise<void> {
    throw new PairCommandError('refused', `takeover ${this.name}: master and mirror are in the same storage system; takeover is for pairs across storage systems`);
  }

  async close(): Promise<void> {
    // Wait for the daemon's copies: a replacing pair must not see a late write to a mirror.
    await this.ctx.daemon.forget(this.pair);
    await this.pair.close();
  }
}

/** The bits a rebuilt pair starts from: each mirror's from the seed, all Invalid for one it does not list. */
function seedImages(spec: PairSpec, seed: Map<string, Uint8Array>, clusters: number): Uint8Array[] {
  const bytes = Math.ceil(clusters / 8);
  return spec.mirrors.map((ref) => {
    const given = seed.get(mirrorKey(ref));
    const img = new Uint8Array(bytes);
    if (given && given.length === bytes) img.set(given);
    else {
      img.fill(0xff);
      if (clusters & 7) img[bytes - 1] = (1 << (clusters & 7)) - 1;
    }
    return img;
  });
}

// A pair that spans storage systems, as one storage system runs its part of it
// (docs/replication.md has the protocol; Kodama figs. 26-29 the idea).
//
// Each storage system of the pair holds one RemotePair. Its role follows the
// persisted generation record {epoch, master}:
//   master role  a Pair whose remote mirrors are RemoteMirrorDevices (data over
//                NBD to the mirror's replication export) plus RemotePorts (the
//                bitmap kept in step over the control channel);
//   mirror role  a MirrorSide: its volume, the master's bitmap as last told
//                (the replica), a sync client reading Invalid clusters from the
//                master, and the replication export that takes the master's writes.
//
// One bitmap store slot serves both roles with one meaning: "this cluster may
// differ between the two copies". A master marks it for writes its mirror has
// not got; a mirror marks it for host writes of its own (split, takeover).
// When a role changes, the bits carry over unchanged, and the next handshake
// ORs both sides' bits into the resync set, as DRBD does.
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import type { Logger } from 'pino';
import { BlockDeviceError, payloadLength, toBlockDeviceError, type BlockDevice, type Extent, type Payload, type ZeroOptions } from '../blockdev/types.js';
import { connect, type NbdClient } from '../nbd/client.js';
import type { ExportTable } from '../nbd/exports.js';
import { ClusterBitmap, clusterRange } from './bitmap.js';
import { readGeneration, readPairState, saveGeneration, savePairState, type Generation } from './pair-files.js';
import { markRuns, type BitmapStore } from './bitmap-store.js';
import { Pair, PairStateError, hashClusters, type FenceLevel, type PairSpec, type RemotePort } from './pair.js';
import type { PeerLink, PeerMessage } from './peer-link.js';
import type { SyncDaemon } from './sync-daemon.js';
import { PairCommandError, type PairBitmap, type PairState, type PairStatus, type VolRef } from './status.js';
import type { PairController, TakeoverOptions } from './pair-controller.js';
import { bitmapOf } from './pair-bitmap.js';
import { FilterDevice } from '../blockdev/filter.js';

/** `master` is as configured: the current master may differ after a swap or a takeover. */
export interface RemotePairSpec extends PairSpec {
  fence: FenceLevel;
  autoResync: boolean;
}

export type { Generation } from './pair-files.js';

export interface RemotePairContext {
  self: number;
  clusterSize: number;
  peerTimeout: number;
  /** This storage system's volumes of the pair: id -> device (below any pair logic). */
  volumes: Map<number, { device: BlockDevice; fresh: boolean }>;
  links: Map<number, PeerLink>;
  /** NBD address of each storage system. */
  nbd: Map<number, { host: string; port: number }>;
  exports: ExportTable;
  daemon: SyncDaemon;
  /** One slot per mirror in master role (slot 0 only for the mirror role). */
  openStore(slots: number): Promise<{ store: BitmapStore; loaded: Uint8Array[] | null }>;
  generationFile?: string;
  /** The cluster layer (etcd): record the mirrors outdated before writes go on without them. */
  onSuspend?: (pair: string, mirrors: VolRef[], reason: string) => Promise<void>;
  statePath?: string;
  log: Logger;
}

const b64 = (bits: Uint8Array) => Buffer.from(bits.buffer, bits.byteOffset, bits.byteLength).toString('base64');
const fromB64 = (s: unknown, clusters: number) => {
  const bytes = Buffer.from(typeof s === 'string' ? s : '', 'base64');
  const out = new Uint8Array(Math.ceil(clusters / 8));
  out.set(bytes.subarray(0, out.length));
  return out;
};
function setBits(bits: Uint8Array, clusters: number): number[] {
  const out: number[] = [];
  for (let byte = 0; byte < bits.length; byte++) {
    if (bits[byte] === 0) continue;
    for (let bit = 0; bit < 8; bit++) if (bits[byte]! & (1 << bit)) out.push(byte * 8 + bit);
  }
  return out.filter((c) => c < clusters);
}

export class RemotePair implements PairController {
  readonly name: string;
  readonly spec: RemotePairSpec;
  readonly clusters: number;
  gen: Generation;
  /** Master role. */
  pair: Pair | null = null;
  private ports = new Map<number, Port>();
  /** Mirror role. */
  mirror: MirrorSide | null = null;
  private store!: BitmapStore;
  private lock: Promise<unknown> = Promise.resolve();
  /** The pair was suspended by a lost peer: auto resync undoes only that. */
  private peerLost = false;
  /** Suspended only because no session was up yet since start: the first session resyncs whatever autoResync says. */
  private starting = false;
  private closed = false;
  private readonly ctx: RemotePairContext;
  readonly volumeSize: number;

  constructor(spec: RemotePairSpec, ctx: RemotePairContext) {
    this.spec = spec;
    this.name = spec.name;
    this.ctx = ctx;
    const mine = this.copies.find((c) => c.ss === ctx.self)!;
    this.volumeSize = ctx.volumes.get(mine.vol)!.device.size;
    this.clusters = Math.ceil(this.volumeSize / ctx.clusterSize);
    this.gen = { epoch: 1, master: spec.master.ss };
  }

  /** Master first, as configured. */
  get copies(): VolRef[] {
    return [this.spec.master, ...this.spec.mirrors];
  }

  get role(): 'master' | 'mirror' {
    return this.gen.master === this.ctx.self ? 'master' : 'mirror';
  }

  /** The current master copy and the others. */
  private layout(): { master: VolRef; mirrors: VolRef[] } {
    const master = this.copies.find((c) => c.ss === this.gen.master) ?? this.spec.master;
    return { master, mirrors: this.copies.filter((c) => c !== master) };
  }

  private get mine(): VolRef {
    return this.copies.find((c) => c.ss === this.ctx.self)!;
  }

  async open(): Promise<void> {
    const saved = this.readGeneration();
    if (saved) this.gen = saved;
    else {
      this.gen = { epoch: 1, master: this.spec.master.ss, initialCopy: true };
      this.saveGeneration();
    }
    // One slot per mirror for the master; one for a mirror. Roles change only in two-copy pairs, where both are one.
    const { store, loaded } = await this.ctx.openStore(this.role === 'master' ? this.copies.length - 1 : 1);
    this.store = store;
    if (this.role === 'master') await this.becomeMasterNow(loaded);
    else this.becomeMirrorNow();
    for (const ss of this.peerIds()) {
      const link = this.ctx.links.get(ss)!;
      link.on('up', () => this.onLinkUp(ss));
      link.on('down', (reason: string) => this.onLinkDown(ss, reason));
      if (link.up) this.onLinkUp(ss);
    }
  }

  private peerIds(): number[] {
    return [...new Set(this.copies.map((c) => c.ss).filter((ss) => ss !== this.ctx.self))];
  }

  /** Runs one role operation at a time (handshakes, role changes, commands). */
  private serial<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.lock.then(fn, fn);
    this.lock = run.catch(() => {});
    return run;
  }

  // ---- roles ----

  private async becomeMasterNow(loaded: Uint8Array[] | null, suspendReason?: string): Promise<void> {
    const { master, mirrors } = this.layout();
    const local = this.ctx.volumes.get(master.vol)!;
    this.ports = new Map();
    const bytes = Math.ceil(this.clusters / 8);
    // Remote mirrors' content is settled at their first session (Generation.initialCopy). A local
    // mirror of a new pair is copied in full unless both volumes were just created empty.
    const initial = mirrors.map((ref, i) => {
      if (loaded) return loaded[i]!;
      const bits = new Uint8Array(bytes);
      const vol = ref.ss === this.ctx.self ? this.ctx.volumes.get(ref.vol)! : undefined;
      if (vol && !(vol.fresh && local.fresh)) bits.fill(0xff);
      return bits;
    });
    for (let i = 0; i < initial.length; i++) if (!loaded && initial[i]![0] === 0xff) await this.store.mark([i], 0, this.clusters - 1);
    const pair = new Pair({
      name: this.name,
      mode: this.spec.mode,
      clusterSize: this.ctx.clusterSize,
      master: { ref: master, device: local.device },
      mirrors: mirrors.map((ref, i) => {
        if (ref.ss === this.ctx.self) return { ref, device: this.ctx.volumes.get(ref.vol)!.device };
        const port = new Port(this, i, ref, this.ctx.links.get(ref.ss)!, this.ctx);
        this.ports.set(i, port);
        return { ref, device: port.device, remote: port };
      }),
      store: this.store,
      loaded: initial,
      identical: true,
      initialState: readPairState(this.ctx.statePath),
      ...(this.spec.syncRate !== undefined ? { syncRate: this.spec.syncRate } : {}),
      fence: this.spec.fence,
      log: this.ctx.log,
      onInvalid: () => this.ctx.daemon.wake(),
      onHostWrite: () => this.ctx.daemon.noteHostIo(),
      onStateChange: (state) => savePairState(this.ctx.statePath, state),
      ...(this.ctx.onSuspend ? { onSuspend: (reason: string) => this.ctx.onSuspend!(this.name, mirrors, reason) } : {}),
      beforeResync: () => this.collectMirrorChanges(),
      afterSplit: () => this.tellMirrors('state', { state: 'PSUS' }),
    });
    // Until a session is up, a remote mirror gets nothing: suspended, writes tracked.
    if (suspendReason) pair.suspend(suspendReason);
    else if ([...this.ports.values()].some((p) => !p.connected) && pair.state !== 'PSUS') {
      this.starting = true;
      pair.suspend('waiting for the mirror storage system');
    }
    this.pair = pair;
    this.mirror = null;
    this.ctx.daemon.add(pair);
  }

  private becomeMirrorNow(): void {
    this.pair = null;
    this.ports = new Map();
    const { master } = this.layout();
    const mine = this.mine;
    const vol = this.ctx.volumes.get(mine.vol)!;
    this.mirror = new MirrorSide(this, master, mine, vol.device, vol.fresh, this.store, this.ctx);
  }

  /** Master -> mirror (swap, or a newer master turned up). Writes held, then refused; bits kept. */
  private async demote(gen: Generation): Promise<void> {
    const pair = this.pair;
    if (pair) {
      await pair.quiesce(async () => {
        pair.retire();
      });
      this.ctx.daemon.remove(pair);
      for (const p of this.ports.values()) p.close();
      await pair.close({ keepStore: true });
    }
    this.gen = { epoch: gen.epoch, master: gen.master };
    this.saveGeneration();
    savePairState(this.ctx.statePath, 'PAIR');
    this.ctx.log.warn({ pair: this.name, epoch: gen.epoch, master: gen.master }, `pair ${this.name}: this copy is now a mirror of storage system ${gen.master}`);
    this.becomeMirrorNow();
  }

  /** Mirror -> master (swap or takeover). What this copy changed, and what it lacked, become resync bits. */
  private async promote(epoch: number, suspendReason?: string): Promise<void> {
    const side = this.mirror!;
    const lacked = side.replica;
    side.close();
    const loaded = new Uint8Array(this.store.image(0));
    for (let i = 0; i < loaded.length; i++) loaded[i]! |= lacked.bits[i]!;
    await markRuns(this.store, 0, setBits(loaded, this.clusters));
    this.gen = { epoch, master: this.ctx.self };
    this.saveGeneration();
    savePairState(this.ctx.statePath, 'PAIR');
    this.ctx.log.warn({ pair: this.name, epoch }, `pair ${this.name}: this copy is now the master`);
    await this.becomeMasterNow([loaded], suspendReason);
    if (!suspendReason) for (const ss of this.peerIds()) if (this.ctx.links.get(ss)!.up) void this.onLinkUp(ss);
  }

  // ---- sessions ----

  private onLinkUp(ss: number): void {
    if (this.closed || this.role !== 'master') return;
    void this.serial(() => this.attachAll(ss)).catch((e: Error) => {
      this.ctx.log.error({ pair: this.name, peer: ss, err: e.message }, 'replication session failed; reconnecting');
      // A new connection brings a new handshake: the only retry there is.
      this.ctx.links.get(ss)!.drop(`session for ${this.name} failed: ${e.message}`);
    });
  }

  private onLinkDown(ss: number, reason: string): void {
    if (this.role === 'master') {
      let lost = false;
      for (const p of this.ports.values()) if (p.ref.ss === ss && p.detach()) lost = true;
      if (lost && this.pair && this.pair.state !== 'PSUS') {
        this.peerLost = true;
        this.starting = false;
        this.pair.suspend(`storage system ${ss} unreachable: ${reason}`);
      }
    } else this.mirror?.linkDown(ss);
  }

  /** Master side: open a session with every mirror on storage system `ss`. */
  private async attachAll(ss: number): Promise<void> {
    const link = this.ctx.links.get(ss)!;
    for (const port of [...this.ports.values()]) {
      if (port.ref.ss !== ss || port.connected || this.role !== 'master' || !link.up) continue;
      const reply = await link.request('attach', { pair: this.name, epoch: this.gen.epoch, master: this.ctx.self, vol: port.ref.vol });
      if (reply.demote) {
        await this.demote({ epoch: Number(reply.epoch), master: Number(reply.master) });
        return;
      }
      const pair = this.pair!;
      const theirs = fromB64(reply.dirty, this.clusters);
      const blank = reply.blank === true;
      const masterFresh = this.ctx.volumes.get(this.layout().master.vol)!.fresh;
      const full = (blank && !masterFresh) || (!blank && this.gen.initialCopy === true);
      await pair.quiesce(async () => {
        const state = pair.state;
        const changes = full ? Array.from({ length: this.clusters }, (_, c) => c) : state === 'PSUS' ? [] : setBits(theirs, this.clusters);
        if (changes.length > 0) await pair.invalidate(port.index, changes);
        await port.open(String(reply.token));
        // The snapshot and the first invalidations travel in this order on one stream.
        const snapshot = link.request('snapshot', {
          pair: this.name,
          state,
          bits: b64(pair.mirrors[port.index]!.bitmap.bits),
          clearDirty: state !== 'PSUS',
        });
        port.connected = true;
        await snapshot;
      });
      if (this.gen.initialCopy) {
        delete this.gen.initialCopy;
        this.saveGeneration();
      }
      this.ctx.log.info({ pair: this.name, mirror: `ss${port.ref.ss}/vol${port.ref.vol}`, full, invalid: pair.mirrors[port.index]!.bitmap.invalidCount }, 'replication session up');
    }
    const pair = this.pair;
    const resume = this.starting || (this.peerLost && this.spec.autoResync);
    if (pair && resume && pair.state === 'PSUE' && [...this.ports.values()].every((p) => p.connected)) {
      this.peerLost = false;
      this.starting = false;
      await pair.resync();
    }
    this.ctx.daemon.wake();
  }

  /** Inside resync's quiet point: each remote mirror hands over the clusters it changed itself. */
  private async collectMirrorChanges(): Promise<void> {
    for (const port of this.ports.values()) {
      if (!port.connected) throw new PairCommandError('refused', `${this.name}: mirror ss${port.ref.ss}/vol${port.ref.vol} is unreachable; resync when its storage system is back`);
      const reply = await port.link.request('resync', { pair: this.name });
      const pair = this.pair!;
      await pair.invalidate(port.index, setBits(fromB64(reply.dirty, this.clusters), this.clusters));
      await port.link.request('snapshot', { pair: this.name, state: 'COPY', bits: b64(pair.mirrors[port.index]!.bitmap.bits), clearDirty: true });
    }
  }

  private async tellMirrors(op: string, body: Record<string, unknown>): Promise<void> {
    await Promise.all([...this.ports.values()].filter((p) => p.connected).map((p) => p.link.request(op, { ...body, pair: this.name })));
  }

  // ---- requests from a peer (routed here by pair name) ----

  handle(ss: number, msg: PeerMessage): Promise<Record<string, unknown> | void> | Record<string, unknown> | void {
    switch (msg.op) {
      case 'attach':
        return this.serial(() => this.onAttach(ss, msg));
      case 'swap':
        return this.serial(() => this.onSwap(ss, msg));
      default:
        if (!this.mirror || this.mirror.master.ss !== ss) throw new Error(`${this.name}: storage system ${this.ctx.self} is not a mirror of storage system ${ss} for this pair`);
        return this.mirror.handle(msg);
    }
  }

  private async onAttach(ss: number, msg: PeerMessage): Promise<Record<string, unknown>> {
    const epoch = Number(msg.epoch);
    if (this.role === 'master') {
      if (this.gen.epoch > epoch) return { demote: true, epoch: this.gen.epoch, master: this.ctx.self };
      if (this.gen.epoch === epoch) {
        this.pair?.suspend(`split brain: storage system ${ss} also masters epoch ${epoch}`);
        throw new Error(`split brain: storage systems ${this.ctx.self} and ${ss} both master ${this.name} in epoch ${epoch}; resolve by hand`);
      }
      await this.demote({ epoch, master: ss });
    } else if (this.gen.epoch > epoch) {
      return { demote: true, epoch: this.gen.epoch, master: this.gen.master };
    } else if (epoch > this.gen.epoch || this.gen.master !== ss) {
      this.gen = { epoch, master: ss };
      this.saveGeneration();
      this.mirror?.close();
      this.becomeMirrorNow();
    }
    return this.mirror!.attach(ss);
  }

  /** The master hands its role over (planned swap): it has copied everything and holds its writes. */
  private async onSwap(ss: number, msg: PeerMessage): Promise<Record<string, unknown>> {
    if (this.role !== 'mirror' || this.gen.master !== ss) throw new Error(`${this.name}: storage system ${this.ctx.self} is not the mirror of storage system ${ss}`);
    await this.promote(Number(msg.epoch));
    return {};
  }

  // ---- commands ----

  private masterPair(command: string): Pair {
    if (this.role !== 'master' || !this.pair) {
      throw new PairCommandError('refused', `${command} ${this.name}: storage system ${this.ctx.self} holds a mirror; the master is in storage system ${this.gen.master}`);
    }
    return this.pair;
  }

  async split(): Promise<void> {
    const pair = this.masterPair('split');
    try {
      await pair.split();
    } catch (e) {
      if (e instanceof PairStateError) throw new PairCommandError('refused', e.message);
      throw e;
    }
  }

  async resync(): Promise<void> {
    const pair = this.masterPair('resync');
    this.peerLost = false;
    this.starting = false;
    await pair.resync();
  }

  /** The pair to verify, when this side masters it and reaches every mirror. */
  pairToVerify(): Pair {
    const pair = this.masterPair('verify');
    if ([...this.ports.values()].some((p) => !p.connected)) throw new PairCommandError('refused', `${this.name}: a mirror is unreachable; verify needs every copy`);
    return pair;
  }

  /** Planned swap, on the master: copy the last writes, hand the role over, become the mirror. */
  swap(): Promise<void> {
    return this.serial(async () => {
      const pair = this.masterPair('swap');
      if (this.copies.length !== 2 || this.ports.size !== 1) throw new PairCommandError('refused', `swap ${this.name}: only a pair of two copies in different storage systems can swap roles`);
      const port = [...this.ports.values()][0]!;
      if (!port.connected) throw new PairCommandError('refused', `swap ${this.name}: the mirror's storage system ${port.ref.ss} is unreachable (use takeover there)`);
      if (pair.state === 'PSUS' || pair.state === 'PSUE') throw new PairCommandError('refused', `swap ${this.name}: the pair is ${pair.state}; resync it first`);
      const epoch = this.gen.epoch + 1;
      await pair.quiesce(async () => {
        // Writes are held: wait for the daemon to copy what is left, then make it durable there.
        const deadline = performance.now() + 60_000;
        while (pair.mirrors[port.index]!.bitmap.invalidCount > 0) {
          if (!port.connected || performance.now() > deadline) throw new PairCommandError('refused', `swap ${this.name}: the mirror did not catch up`);
          this.ctx.daemon.wake();
          await new Promise((r) => setTimeout(r, 10));
        }
        await pair.flush();
        await Promise.all(pair.mirrors.map((m) => m.device.flush()));
        // The last "valid" messages go first, so the new master does not recopy what is in sync.
        await port.drain();
        await port.link.request('swap', { pair: this.name, epoch });
        pair.retire();
      });
      await this.demote({ epoch, master: port.ref.ss });
    });
  }

  /** Unplanned, on a mirror whose master is gone: promote this copy in a new epoch. */
  takeover(opts: TakeoverOptions = {}): Promise<void> {
    return this.serial(async () => {
      if (this.role === 'master') throw new PairCommandError('refused', `takeover ${this.name}: storage system ${this.ctx.self} is already the master`);
      if (this.copies.length !== 2) throw new PairCommandError('refused', `takeover ${this.name}: only a pair of two copies can be taken over`);
      const link = this.ctx.links.get(this.gen.master)!;
      if (link.up && !opts.force) throw new PairCommandError('refused', `takeover ${this.name}: the master's storage system ${this.gen.master} is reachable; use swap`);
      const epoch = opts.epoch ?? this.gen.epoch + 1;
      if (epoch <= this.gen.epoch) throw new PairCommandError('refused', `takeover ${this.name}: epoch ${epoch} is not newer than ${this.gen.epoch}`);
      const old = this.gen.master;
      await this.promote(epoch, `takeover: storage system ${old} unreachable`);
      this.peerLost = true;
      // Still connected to the old master (cut from etcd, not from us): a new session makes the
      // handshake tell it about the new epoch, and it becomes our mirror.
      if (link.up) link.drop(`this copy took over ${this.name} in epoch ${epoch}`);
    });
  }

  status(): PairStatus {
    if (this.pair) return { ...this.pair.status(), epoch: this.gen.epoch };
    const side = this.mirror!;
    const { master } = this.layout();
    const invalid = side.replica.invalidCount;
    return {
      name: this.name,
      mode: this.spec.mode,
      state: side.state,
      master,
      clusterSize: this.ctx.clusterSize,
      clusters: this.clusters,
      fence: this.spec.fence,
      role: 'mirror',
      epoch: this.gen.epoch,
      stale: !side.fresh,
      mirrors: [{ ...this.mine, invalidClusters: invalid, syncProgress: this.clusters === 0 ? 1 : 1 - invalid / this.clusters, copiedBytes: 0, connected: side.fresh }],
    };
  }

  get volumes(): number[] {
    return this.copies.filter((c) => c.ss === this.ctx.self).map((c) => c.vol);
  }

  roleOf(vol: number): 'master' | 'mirror' {
    return this.pair?.master.ref.ss === this.ctx.self && this.pair.master.ref.vol === vol ? 'master' : 'mirror';
  }

  bitmap(buckets: number): PairBitmap {
    if (!this.pair) throw new PairCommandError('refused', `storage system ${this.ctx.self} holds a mirror of ${this.name}; ask the master's storage system`);
    return bitmapOf(this.pair, buckets);
  }

  async verify(): Promise<void> {
    const p = this.pairToVerify();
    if (p.verifyProgress?.running) throw new PairCommandError('refused', `${this.name}: a verify is already running`);
    void p.verify().catch((e: Error) => this.ctx.log.error({ pair: this.name, err: e.message }, 'verify failed'));
  }

  private readonly followers = new Map<number, BlockDevice>();

  /** The host-facing device of this storage system's volume in the pair: one per volume, following the role. */
  hostDevice(vol: number): BlockDevice {
    let d = this.followers.get(vol);
    if (!d) this.followers.set(vol, (d = new RoleFollower(() => this.currentHostDevice(vol))));
    return d;
  }

  private currentHostDevice(vol: number): BlockDevice {
    if (this.pair) {
      if (this.pair.master.ref.vol === vol && this.pair.master.ref.ss === this.ctx.self) return this.pair.masterDevice();
      const i = this.pair.mirrors.findIndex((m) => m.ref.ss === this.ctx.self && m.ref.vol === vol);
      return this.pair.mirrorDevice(i);
    }
    return this.mirror!.hostDevice;
  }

  async close(): Promise<void> {
    this.closed = true;
    await this.lock;
    for (const p of this.ports.values()) p.close();
    this.mirror?.close();
    if (this.pair) {
      this.ctx.daemon.remove(this.pair);
      await this.pair.close();
    } else await this.store.close();
  }

  // ---- persistence ----

  private readGeneration(): Generation | undefined {
    return readGeneration(this.ctx.generationFile);
  }

  private saveGeneration(): void {
    saveGeneration(this.ctx.generationFile, this.gen);
  }

}

// ---------------------------------------------------------------------------------------------
// Master side of one remote mirror: the control port and the data device.

type BitOp = ['i', number, number] | ['v', number];

interface Batch {
  promise: Promise<void>;
  resolve: () => void;
  /** Clusters this batch invalidates. */
  clusters: number[];
}

const RESOLVED = Promise.resolve();
/** How long "valid" operations may wait for an invalidation to travel with. */
const VALID_DELAY_MS = 20;

class Port implements RemotePort {
  connected = false;
  readonly device: RemoteMirrorDevice;
  private queue: BitOp[] = [];
  /** The batch being gathered this tick (sent at setImmediate). */
  private current: Batch | null = null;
  /** Clusters whose invalidation is sent but not yet acknowledged -> the batch that carries it. */
  private readonly pending = new Map<number, Promise<void>>();
  /** The last batch sent: drain() waits for it. */
  private lastSent: Promise<void> = RESOLVED;
  /** Pending "valid" operations leave by this timer when no invalidation takes them first. */
  private lazy: NodeJS.Timeout | null = null;

  constructor(
    private readonly owner: RemotePair,
    readonly index: number,
    readonly ref: VolRef,
    readonly link: PeerLink,
    ctx: RemotePairContext,
  ) {
    this.device = new RemoteMirrorDevice(ref, ctx, owner.volumeSize, (why) => link.drop(why));
  }

  invalidate(first: number, last: number): Promise<void> {
    if (!this.connected) return RESOLVED;
    this.queue.push(['i', first, last]);
    const b = this.batch();
    for (let c = first; c <= last; c++) {
      b.clusters.push(c);
      this.pending.set(c, b.promise);
    }
    return b.promise;
  }

  /**
   * Nobody waits for a "valid": until it arrives the mirror reads that cluster from the master,
   * which is only slower. So these ride with the next invalidation, or leave after VALID_DELAY_MS.
   */
  valid(c: number): void {
    if (!this.connected) return;
    this.queue.push(['v', c]);
    if (this.current || this.lazy) return;
    this.lazy = setTimeout(() => {
      this.lazy = null;
      if (this.queue.length > 0) this.batch();
    }, VALID_DELAY_MS);
    this.lazy.unref();
  }

  /** Only clusters whose invalidation is still unacknowledged make a writer wait. */
  barrier(first: number, last: number): Promise<void> {
    if (this.pending.size === 0) return RESOLVED;
    let wait: Promise<void>[] | undefined;
    for (let c = first; c <= last; c++) {
      const p = this.pending.get(c);
      if (p && !wait?.includes(p)) (wait ??= []).push(p);
    }
    return wait ? Promise.all(wait).then(() => {}) : RESOLVED;
  }

  /** Everything queued or sent so far is acknowledged (or the link is down). */
  drain(): Promise<void> {
    if (this.queue.length > 0) this.batch();
    const cur = this.current;
    return cur ? cur.promise.then(() => this.lastSent) : this.lastSent;
  }

  private batch(): Batch {
    if (this.current) return this.current;
    if (this.lazy) clearTimeout(this.lazy);
    this.lazy = null;
    let resolve!: () => void;
    const promise = new Promise<void>((r) => (resolve = r));
    const b: Batch = { promise, resolve, clusters: [] };
    this.current = b;
    // The bit operations of one tick travel as one ordered request.
    setImmediate(() => this.send(b));
    return b;
  }

  private send(b: Batch): void {
    if (this.current !== b) return; // detached meanwhile
    this.current = null;
    const ops = this.queue;
    this.queue = [];
    // A lost link is the link's business (it suspends the pair): the writer goes on either way.
    const sent = this.link.request('bits', { pair: this.owner.name, ops }).then(
      () => {},
      () => {},
    );
    this.lastSent = sent;
    void sent.then(() => {
      for (const c of b.clusters) if (this.pending.get(c) === b.promise) this.pending.delete(c);
      b.resolve();
    });
  }

  async hashes(first: number, count: number): Promise<string[]> {
    const reply = await this.link.request('hashes', { pair: this.owner.name, first, count });
    return reply.hashes as string[];
  }

  async open(token: string): Promise<void> {
    await this.device.open(token);
  }

  /** The link went down: true if a session was up. Nobody waits for the lost acknowledgements. */
  detach(): boolean {
    const was = this.connected;
    this.connected = false;
    this.queue = [];
    this.current?.resolve();
    this.current = null;
    if (this.lazy) clearTimeout(this.lazy);
    this.lazy = null;
    this.pending.clear();
    this.device.disconnect();
    return was;
  }

  close(): void {
    this.detach();
  }
}

/**
 * A mirror volume in another storage system, as the master's pair writes it:
 * NBD to that storage system's replication export for this session. Every
 * request is bounded by the peer timeout; a failure takes the link down, so
 * the next session starts clean.
 */
class RemoteMirrorDevice implements BlockDevice {
  readonly readOnly = false;
  readonly multiConnSafe = true;
  readonly fastZero = false;
  private client: NbdClient | null = null;

  constructor(
    private readonly ref: VolRef,
    private readonly ctx: RemotePairContext,
    readonly size: number,
    private readonly fail: (why: string) => void,
  ) {}

  async open(token: string): Promise<void> {
    this.disconnect();
    const addr = this.ctx.nbd.get(this.ref.ss)!;
    // One connection: the requests pipeline on it, and more connections measured slower (bench/RESULTS.md).
    this.client = await connect({ host: addr.host, port: addr.port, exportName: replicationExport(this.ref.vol, token), timeoutMs: this.ctx.peerTimeout });
  }

  disconnect(): void {
    const c = this.client;
    this.client = null;
    if (c) void c.close().catch(() => {});
  }

  /** The pair does not own the remote volume: closing it only ends our connection. */
  async close(): Promise<void> {
    this.disconnect();
  }

  private async run<T>(op: (c: NbdClient) => Promise<T>): Promise<T> {
    const c = this.client;
    if (!c) throw new BlockDeviceError('EIO', `mirror ss${this.ref.ss}/vol${this.ref.vol}: no replication session`);
    try {
      return await op(c);
    } catch (e) {
      const err = toBlockDeviceError(e, `mirror ss${this.ref.ss}/vol${this.ref.vol}`);
      this.fail(`replication to ss${this.ref.ss}/vol${this.ref.vol} failed: ${err.message}`);
      throw err;
    }
  }

  read(offset: number, dest: Buffer): Promise<void> {
    return this.run(async (c) => {
      await c.pread(dest, offset);
    });
  }

  write(offset: number, data: Payload, fua = false): Promise<void> {
    return this.run((c) => c.pwrite(data, offset, { fua }));
  }

  flush(): Promise<void> {
    return this.run((c) => c.flush());
  }

  trim(offset: number, length: number, fua = false): Promise<void> {
    return this.run((c) => c.trim(offset, length, { fua }));
  }

  zero(offset: number, length: number, opts: ZeroOptions = {}): Promise<void> {
    return this.run((c) => c.zero(offset, length, { fua: opts.fua === true }));
  }

  async extents(offset: number, length: number): Promise<Extent[]> {
    return [{ length, flags: 0 }];
  }
}

export function replicationExport(vol: number, token: string): string {
  return `.replication/vol${vol}/${token}`;
}

// ---------------------------------------------------------------------------------------------
// Mirror side.

class MirrorSide {
  /** The master's bitmap for this copy, as last told; meaningful only while `fresh`. */
  replica: ClusterBitmap;
  state: PairState = 'COPY';
  readonly hostDevice: BlockDevice;
  private token: string | null = null;
  private exportName: string | null = null;
  private session = -1;
  private fallback: Promise<NbdClient> | null = null;
  /** Created empty by this start and never written since. */
  blank: boolean;
  private closed = false;

  constructor(
    private readonly owner: RemotePair,
    readonly master: VolRef,
    readonly mine: VolRef,
    readonly device: BlockDevice,
    fresh: boolean,
    readonly store: BitmapStore,
    private readonly ctx: RemotePairContext,
  ) {
    this.replica = new ClusterBitmap(owner.clusters);
    this.replica.setAllInvalid();
    this.blank = fresh && setBits(store.image(0), owner.clusters).length === 0;
    this.hostDevice = new MirrorHostDevice(this);
  }

  get link(): PeerLink {
    return this.ctx.links.get(this.master.ss)!;
  }

  get clusterSize(): number {
    return this.ctx.clusterSize;
  }

  /** The replica can be trusted: a session with the master is up and the lease is live. */
  get fresh(): boolean {
    return this.token !== null && this.session === this.link.session && this.link.fresh;
  }

  attach(_ss: number): Record<string, unknown> {
    if (this.exportName) this.ctx.exports.remove(this.exportName);
    this.token = randomBytes(16).toString('hex');
    this.session = -1;
    this.exportName = replicationExport(this.mine.vol, this.token);
    this.ctx.exports.add({ name: this.exportName, description: `replication into ${this.owner.name}`, device: new ReplicationTarget(this, this.token), readOnly: false, hidden: true });
    return { token: this.token, blank: this.blank, dirty: b64(this.store.image(0)) };
  }

  linkDown(ss: number): void {
    if (ss !== this.master.ss) return;
    this.session = -1;
    this.closeFallback();
  }

  isCurrent(token: string): boolean {
    return !this.closed && token === this.token;
  }

  async handle(msg: PeerMessage): Promise<Record<string, unknown> | void> {
    switch (msg.op) {
      case 'snapshot': {
        this.replica = new ClusterBitmap(this.owner.clusters, fromB64(msg.bits, this.owner.clusters));
        this.state = msg.state as PairState;
        if (msg.clearDirty) {
          const dirty = setBits(this.store.image(0), this.owner.clusters);
          if (dirty.length > 0) await this.store.clear(0, dirty);
        }
        this.session = this.link.session;
        return;
      }
      case 'bits': {
        for (const op of msg.ops as BitOp[]) {
          if (op[0] === 'i') this.replica.setRangeInvalid(op[1], op[2]);
          else this.replica.setValid(op[1]);
        }
        return;
      }
      case 'state':
        this.state = msg.state as PairState;
        return;
      case 'resync':
        // From here on host writes are refused; what was written is handed over.
        this.state = 'COPY';
        return { dirty: b64(this.store.image(0)) };
      case 'hashes': {
        const first = Number(msg.first);
        const count = Number(msg.count);
        const offset = first * this.ctx.clusterSize;
        const length = Math.min(count * this.ctx.clusterSize, this.device.size - offset);
        if (!(first >= 0 && count > 0 && length > 0)) throw new Error(`hashes: bad range ${first}+${count}`);
        const buf = Buffer.allocUnsafe(length);
        await this.device.read(offset, buf);
        return { hashes: hashClusters(buf, this.ctx.clusterSize) };
      }
      default:
        throw new Error(`unknown request ${msg.op}`);
    }
  }

  /** Read from the master through the sync client (Invalid clusters while the pair is connected). */
  async readFromMaster(offset: number, dest: Buffer): Promise<void> {
    if (!this.fallback) {
      const addr = this.ctx.nbd.get(this.master.ss)!;
      this.fallback = connect({ host: addr.host, port: addr.port, exportName: `vol${this.master.vol}`, timeoutMs: this.ctx.peerTimeout });
      this.fallback.catch(() => (this.fallback = null));
    }
    try {
      const c = await this.fallback;
      await c.pread(dest, offset);
    } catch (e) {
      this.closeFallback();
      throw toBlockDeviceError(e, `read from the master ss${this.master.ss}/vol${this.master.vol}`);
    }
  }

  private closeFallback(): void {
    const f = this.fallback;
    this.fallback = null;
    if (f) void f.then((c) => c.close()).catch(() => {});
  }

  close(): void {
    this.closed = true;
    if (this.exportName) this.ctx.exports.remove(this.exportName);
    this.exportName = null;
    this.token = null;
    this.closeFallback();
  }

  get closedNow(): boolean {
    return this.closed;
  }
}

/** The mirror volume as hosts see it: Check Invalid against the replica, fall back to the master. */
class MirrorHostDevice implements BlockDevice {
  readonly size: number;
  readonly multiConnSafe: boolean;
  readonly fastZero: boolean;

  constructor(private readonly side: MirrorSide) {
    this.size = side.device.size;
    this.multiConnSafe = side.device.multiConnSafe;
    this.fastZero = side.device.fastZero;
  }

  get readOnly(): boolean {
    return this.side.state !== 'PSUS';
  }

  private check(): void {
    if (this.side.closedNow) throw new BlockDeviceError('EPERM', 'the volume changed role; reconnect');
  }

  async read(offset: number, dest: Buffer): Promise<void> {
    this.check();
    const s = this.side;
    if (s.state !== 'PSUS' && s.fresh) {
      const [first, last] = clusterRange(offset, dest.length, s.clusterSize);
      if (s.replica.anyInvalid(first, last)) return s.readFromMaster(offset, dest);
    }
    // Split (a point-in-time image), or no master to ask: this copy's own data (status says stale).
    return s.device.read(offset, dest);
  }

  private async modify(offset: number, length: number, apply: () => Promise<void>): Promise<void> {
    this.check();
    const s = this.side;
    if (s.state !== 'PSUS') throw new BlockDeviceError('EPERM', `vol${s.mine.vol} is a mirror: read-only unless the pair is split`);
    const [first, last] = clusterRange(offset, length, s.clusterSize);
    s.blank = false;
    await s.store.mark([0], first, last);
    await apply();
  }

  write(offset: number, data: Payload, fua = false): Promise<void> {
    return this.modify(offset, payloadLength(data), () => this.side.device.write(offset, data, fua));
  }

  trim(offset: number, length: number, fua = false): Promise<void> {
    return this.modify(offset, length, () => this.side.device.trim(offset, length, fua));
  }

  zero(offset: number, length: number, opts: ZeroOptions = {}): Promise<void> {
    return this.modify(offset, length, () => this.side.device.zero(offset, length, opts));
  }

  flush(): Promise<void> {
    return this.side.device.flush();
  }

  extents(offset: number, length: number): Promise<Extent[]> {
    return this.side.device.extents(offset, length);
  }

  async close(): Promise<void> {}
}

/** The replication export: the master's session writes here, and only while its token is current. */
class ReplicationTarget implements BlockDevice {
  readonly readOnly = false;
  readonly multiConnSafe = true;
  readonly size: number;
  readonly fastZero: boolean;

  constructor(
    private readonly side: MirrorSide,
    private readonly token: string,
  ) {
    this.size = side.device.size;
    this.fastZero = side.device.fastZero;
  }

  private get dev(): BlockDevice {
    if (!this.side.isCurrent(this.token)) throw new BlockDeviceError('EPERM', 'this replication session has ended');
    this.side.blank = false;
    return this.side.device;
  }

  async read(offset: number, dest: Buffer): Promise<void> {
    return this.dev.read(offset, dest);
  }
  async write(offset: number, data: Payload, fua = false): Promise<void> {
    return this.dev.write(offset, data, fua);
  }
  async flush(): Promise<void> {
    return this.dev.flush();
  }
  async trim(offset: number, length: number, fua = false): Promise<void> {
    return this.dev.trim(offset, length, fua);
  }
  async zero(offset: number, length: number, opts: ZeroOptions = {}): Promise<void> {
    return this.dev.zero(offset, length, opts);
  }
  async extents(offset: number, length: number): Promise<Extent[]> {
    return this.dev.extents(offset, length);
  }
  async close(): Promise<void> {}
}

/** A volume whose behaviour follows its current role in the pair. */
class RoleFollower extends FilterDevice {
  constructor(private readonly current: () => BlockDevice) {
    super(current());
  }
  protected override get next(): BlockDevice {
    return this.current();
  }
}

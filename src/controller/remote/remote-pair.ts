// A pair that spans storage systems, as one storage system runs its part of it
// (docs/replication.md has the protocol; Kodama figs. 26-29 the idea).
//
// Each storage system of the pair holds one RemotePair. Its role follows the persisted
// generation record {epoch, master} (generation.ts):
//   master role  a Pair whose remote mirrors are MirrorPorts (mirror-port.ts: the data device
//                to the mirror's replication export, and the bitmap kept in step)
//   mirror role  a MirrorSide (mirror-side.ts): its volume, the master's bitmap as last told,
//                the sync client to the master, and the replication export
//
// One bitmap store slot serves both roles with one meaning: "this cluster may differ between
// the two copies". A master marks it for writes its mirror has not got; a mirror marks it for
// host writes of its own (split, takeover). When a role changes, the bits carry over unchanged,
// and the next handshake ORs both sides' bits into the resync set, as DRBD does.
import type { BlockDevice } from '../../blockdev/types.js';
import { markRuns, type BitmapStore, type SlotTable } from '../bitmap-store.js';
import { crashPoint } from '../../util/crash-point.js';
import { bitmapOf } from '../pair-bitmap.js';
import type { PairController, TakeoverOptions } from '../pair-controller.js';
import { readGeneration, readPairState, saveGeneration, savePairState, type Generation } from '../pair-files.js';
import { Pair, PairStateError, type FenceLevel } from '../pair.js';
import type { PeerLink } from '../peer/link.js';
import type { Op, RequestOf, ResponseOf } from '../peer/messages.js';
import { PairCommandError, type PairBitmap, type PairStatus, type VolRef } from '../status.js';
import { mirrorKey as refKey } from '../local-pair.js';
import { b64, fromB64, setBits } from './bits.js';
import type { RemotePairContext, RemotePairSpec } from './context.js';
import { judgeAttach } from './generation.js';
import { MirrorPort } from './mirror-port.js';
import { MirrorSide } from './mirror-side.js';
import { RoleFollower } from './role-follower.js';

export type { RemotePairContext, RemotePairSpec } from './context.js';

export class RemotePair implements PairController {
  readonly name: string;
  readonly spec: RemotePairSpec;
  readonly clusters: number;
  generation: Generation;
  /** Master role. */
  pair: Pair | null = null;
  private ports = new Map<number, MirrorPort>();
  /** Master role: the host devices of our volumes, made once per role change. */
  private masterHosts = new Map<number, BlockDevice>();
  /** Mirror role. */
  mirror: MirrorSide | null = null;
  private store!: BitmapStore;
  private lock: Promise<unknown> = Promise.resolve();
  /** The pair was suspended by a lost peer: auto resync undoes only that. */
  private peerLost = false;
  /** Suspended only because no session was up yet since start: the first session resyncs whatever autoResync says. */
  private starting = false;
  private closed = false;
  private readonly followers = new Map<number, BlockDevice>();
  /** The links whose events this pair follows, by storage system. */
  private readonly followed = new Map<number, PeerLink>();
  readonly volumeSize: number;

  constructor(
    spec: RemotePairSpec,
    private readonly ctx: RemotePairContext,
  ) {
    this.spec = spec;
    this.name = spec.name;
    const mine = this.copies.find((c) => c.ss === ctx.self)!;
    this.volumeSize = ctx.volumes.get(mine.vol)!.device.size;
    this.clusters = Math.ceil(this.volumeSize / ctx.clusterSize);
    this.generation = { epoch: 1, master: spec.master.ss };
  }

  /** Master first, as configured. */
  get copies(): VolRef[] {
    return [this.spec.master, ...this.spec.mirrors];
  }

  get volumes(): number[] {
    return this.copies.filter((c) => c.ss === this.ctx.self).map((c) => c.vol);
  }

  get role(): 'master' | 'mirror' {
    return this.generation.master === this.ctx.self ? 'master' : 'mirror';
  }

  roleOf(vol: number): 'master' | 'mirror' {
    return this.pair?.master.ref.ss === this.ctx.self && this.pair.master.ref.vol === vol ? 'master' : 'mirror';
  }

  staleReason(vol: number): string | null {
    if (this.roleOf(vol) === 'master') return null;
    const side = this.mirror;
    if (!side) return `vol${vol} of ${this.name} has no replication session`;
    if (side.state !== 'PAIR' && side.state !== 'COPY') return `vol${vol} is a mirror of ${this.name}, which is ${side.state}`;
    return side.trustsReplica ? null : `vol${vol} is a mirror of ${this.name} that cannot hear its master`;
  }

  /** The current master copy and the others. */
  private layout(): { master: VolRef; mirrors: VolRef[] } {
    const master = this.copies.find((c) => c.ss === this.generation.master) ?? this.spec.master;
    return { master, mirrors: this.copies.filter((c) => c !== master) };
  }

  private get mine(): VolRef {
    return this.copies.find((c) => c.ss === this.ctx.self)!;
  }

  async open(): Promise<void> {
    const saved = readGeneration(this.ctx.generationFile);
    if (saved) this.generation = saved;
    else {
      this.generation = { epoch: 1, master: this.spec.master.ss, initialCopy: true };
      this.saveGeneration();
    }
    // One slot per mirror for the master; one for a mirror. Roles change only in two-copy pairs, where both are one.
    const { store, loaded } = this.role === 'master' ? await this.ctx.openStore(this.copies.length - 1, { copies: this.slotTable() }) : await this.ctx.openStore(1);
    this.store = store;
    if (this.role === 'master') await this.becomeMasterNow(loaded);
    else this.becomeMirrorNow();
    for (const ss of this.peerIds()) this.follow(ss);
  }

  /** Which copy each slot of the master's bitmap is for, kept in its file (a restart after a crash in a reshape remaps by it). */
  private slotTable(): SlotTable {
    const { master, mirrors } = this.layout();
    return { master: refKey(master), mirrors: mirrors.map(refKey) };
  }

  /** Sessions follow the link to storage system `ss` (once per link: a reshape may add peers, and an undone one drop a link that a later one makes anew). */
  private follow(ss: number): void {
    const link = this.ctx.links.get(ss)!;
    if (this.followed.get(ss) === link) return;
    this.followed.set(ss, link);
    link.on('up', () => this.onLinkUp(ss));
    link.on('down', (reason: string) => this.onLinkDown(ss, reason));
    if (link.up) this.onLinkUp(ss);
  }

  private peerIds(): number[] {
    return [...new Set(this.copies.map((c) => c.ss).filter((ss) => ss !== this.ctx.self))];
  }

  private saveGeneration(): void {
    saveGeneration(this.ctx.generationFile, this.generation);
  }

  /** Runs one role operation at a time (handshakes, role changes, commands). */
  private serial<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.lock.then(fn, fn);
    this.lock = run.catch(() => {});
    return run;
  }

  // ---- roles ----

  /**
   * Build the master's Pair. `carried`: the connected ports of mirrors that stay (reshape), by
   * "ss:vol"; their sessions go on, and a new port waits for `attachPort` before the pair writes to it.
   */
  private async becomeMasterNow(loaded: Uint8Array[] | null, suspendReason?: string, carried?: { ports: Map<string, MirrorPort>; split: boolean }): Promise<void> {
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
      if (vol && !(vol.createdEmpty && local.createdEmpty)) bits.fill(0xff);
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
        const port = carried?.ports.get(refKey(ref)) ?? new MirrorPort(this.name, i, ref, this.ctx.links.get(ref.ss)!, this.ctx, this.volumeSize);
        port.index = i;
        this.ports.set(i, port);
        return { ref, device: port.device, remote: port };
      }),
      store: this.store,
      loaded: initial,
      identical: true,
      // A reshape keeps a split as it was (persisted with a dataDir, not without); a suspension comes as suspendReason.
      initialState: carried ? (carried.split ? 'PSUS' : undefined) : readPairState(this.ctx.statePath),
      ...(this.spec.syncRate !== undefined ? { syncRate: this.spec.syncRate } : {}),
      fence: this.spec.fence,
      log: this.ctx.log,
      onInvalid: () => this.ctx.daemon.wake(),
      onHostWrite: () => this.ctx.daemon.noteHostIo(),
      onStateChange: (state) => savePairState(this.ctx.statePath, state),
      ...(this.ctx.onSuspend ? { onSuspend: (reason: string) => this.ctx.onSuspend!(this.name, mirrors, reason) } : {}),
      beforeResync: () => this.collectMirrorChanges(),
      afterSplit: () => this.tellMirrors('state', { pair: this.name, state: 'PSUS' }),
    });
    // Until a session is up, a remote mirror gets nothing: suspended, writes tracked.
    if (suspendReason) pair.suspend(suspendReason);
    else if (!carried && [...this.ports.values()].some((p) => !p.connected) && pair.state !== 'PSUS') {
      this.starting = true;
      pair.suspend(this.waitingReason());
    }
    this.pair = pair;
    this.mirror = null;
    this.masterHosts = new Map([[master.vol, pair.masterDevice()]]);
    mirrors.forEach((ref, i) => {
      if (ref.ss === this.ctx.self) this.masterHosts.set(ref.vol, pair.mirrorDevice(i));
    });
    this.ctx.daemon.add(pair);
  }

  /** Why a master starts suspended: which storage system it waits for, and what the operator does. */
  private waitingReason(): string {
    const ids = [...new Set([...this.ports.values()].filter((p) => !p.connected).map((p) => p.ref.ss))];
    const where = ids.map((id) => {
      const a = this.ctx.links.get(id)!.address;
      return `storage system ${id} (peer ${a.host.includes(':') ? `[${a.host}]` : a.host}:${a.port})`;
    });
    return `waiting for ${where.join(' and ')}: start it on its host (blockmirror up --only ${ids.join(',')}); writes are tracked and copied once it connects`;
  }

  private becomeMirrorNow(): void {
    this.pair = null;
    this.ports = new Map();
    this.masterHosts = new Map();
    const { master } = this.layout();
    const mine = this.mine;
    const vol = this.ctx.volumes.get(mine.vol)!;
    this.mirror = new MirrorSide(this.name, this.clusters, master, mine, vol.device, vol.createdEmpty, this.store, this.ctx);
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
    this.generation = { epoch: gen.epoch, master: gen.master };
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
    this.generation = { epoch, master: this.ctx.self };
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
      if (!(await this.attachPort(port))) return;
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

  /** The handshake of one mirror's session (generation.ts): its bits, then its writes. False if we were told to step down. */
  private async attachPort(port: MirrorPort): Promise<boolean> {
    const link = port.link;
    const reply = await link.request('attach', { pair: this.name, epoch: this.generation.epoch, master: this.ctx.self, vol: port.ref.vol });
    if ('demote' in reply) {
      await this.demote({ epoch: reply.epoch, master: reply.master });
      return false;
    }
    const pair = this.pair!;
    const theirs = fromB64(reply.dirty, this.clusters);
    const masterEmpty = this.ctx.volumes.get(this.layout().master.vol)!.createdEmpty;
    const full = (reply.blank && !masterEmpty) || (!reply.blank && this.generation.initialCopy === true);
    await pair.quiesce(async () => {
      const state = pair.state;
      const changes = full ? Array.from({ length: this.clusters }, (_, c) => c) : state === 'PSUS' ? [] : setBits(theirs, this.clusters);
      if (changes.length > 0) await pair.invalidate(port.index, changes);
      await port.open(reply.token);
      // The snapshot and the first invalidations travel in this order on one stream.
      const snapshot = link.request('snapshot', { pair: this.name, state, bits: b64(pair.mirrors[port.index]!.bitmap.bits), clearDirty: state !== 'PSUS' });
      port.connected = true;
      await snapshot;
    });
    if (this.generation.initialCopy) {
      delete this.generation.initialCopy;
      this.saveGeneration();
    }
    this.ctx.log.info({ pair: this.name, mirror: `ss${port.ref.ss}/vol${port.ref.vol}`, full, invalid: pair.mirrors[port.index]!.bitmap.invalidCount }, 'replication session up');
    return true;
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

  private async tellMirrors(op: 'state', body: RequestOf<'state'>): Promise<void> {
    await Promise.all([...this.ports.values()].filter((p) => p.connected).map((p) => p.link.request(op, body)));
  }

  // ---- requests from a peer (routed here by pair name, checked against their op's schema) ----

  handle<K extends Op>(ss: number, op: K, body: RequestOf<K>): Promise<ResponseOf<K>> {
    switch (op) {
      case 'attach':
        return this.serial(() => this.onAttach(ss, body as RequestOf<'attach'>)) as Promise<ResponseOf<K>>;
      case 'swap':
        return this.serial(() => this.onSwap(ss, body as RequestOf<'swap'>)) as Promise<ResponseOf<K>>;
      default:
        if (!this.mirror || this.mirror.master.ss !== ss) {
          return Promise.reject(new Error(`${this.name}: storage system ${this.ctx.self} is not a mirror of storage system ${ss} for this pair`));
        }
        return this.mirror.handle(op, body);
    }
  }

  private async onAttach(ss: number, msg: RequestOf<'attach'>): Promise<ResponseOf<'attach'>> {
    switch (judgeAttach(this.generation, this.ctx.self, ss, msg.epoch)) {
      case 'refuse-older':
        return { demote: true, epoch: this.generation.epoch, master: this.generation.master };
      case 'split-brain':
        this.pair?.suspend(`split brain: storage system ${ss} also masters epoch ${msg.epoch}`);
        throw new Error(`split brain: storage systems ${this.ctx.self} and ${ss} both master ${this.name} in epoch ${msg.epoch}; resolve by hand`);
      case 'step-down':
        await this.demote({ epoch: msg.epoch, master: ss });
        break;
      case 'follow':
        this.generation = { epoch: msg.epoch, master: ss };
        this.saveGeneration();
        this.mirror?.close();
        this.becomeMirrorNow();
        break;
      case 'same':
        break;
    }
    return this.mirror!.attach();
  }

  /** The master hands its role over (planned swap): it has copied everything and holds its writes. */
  private async onSwap(ss: number, msg: RequestOf<'swap'>): Promise<ResponseOf<'swap'>> {
    if (this.role !== 'mirror' || this.generation.master !== ss) throw new Error(`${this.name}: storage system ${this.ctx.self} is not the mirror of storage system ${ss}`);
    // A swap names the next epoch; anything else is replayed or stale, and must not promote us.
    if (msg.epoch !== this.generation.epoch + 1) throw new Error(`${this.name}: refused a swap to epoch ${msg.epoch}: the pair is in epoch ${this.generation.epoch}, so the next is ${this.generation.epoch + 1}`);
    await this.promote(msg.epoch);
    return {};
  }

  // ---- commands ----

  private masterPair(command: string): Pair {
    if (this.role !== 'master' || !this.pair) {
      throw new PairCommandError('refused', `${command} ${this.name}: storage system ${this.ctx.self} holds a mirror; the master is in storage system ${this.generation.master}`);
    }
    return this.pair;
  }

  async split(): Promise<void> {
    const pair = this.masterPair('split');
    try {
      await pair.split();
    } catch (e) {
      if (e instanceof PairStateError) throw new PairCommandError('refused', e.message, { cause: e });
      throw e;
    }
  }

  async resync(): Promise<void> {
    const pair = this.masterPair('resync');
    this.peerLost = false;
    this.starting = false;
    await pair.resync();
  }

  async verify(): Promise<void> {
    const pair = this.masterPair('verify');
    if ([...this.ports.values()].some((p) => !p.connected)) throw new PairCommandError('refused', `${this.name}: a mirror is unreachable; verify needs every copy`);
    if (pair.verifyProgress?.running) throw new PairCommandError('refused', `${this.name}: a verify is already running`);
    void pair.verify().catch((e: Error) => this.ctx.log.error({ pair: this.name, err: e.message }, 'verify failed'));
  }

  bitmap(buckets: number): PairBitmap {
    return bitmapOf(this.masterPair('bitmap'), buckets);
  }

  /** Planned swap, on the master: copy the last writes, hand the role over, become the mirror. */
  swap(): Promise<void> {
    return this.serial(async () => {
      const pair = this.masterPair('swap');
      if (this.copies.length !== 2 || this.ports.size !== 1) throw new PairCommandError('refused', `swap ${this.name}: only a pair of two copies in different storage systems can swap roles`);
      const port = [...this.ports.values()][0]!;
      if (!port.connected) throw new PairCommandError('refused', `swap ${this.name}: the mirror's storage system ${port.ref.ss} is unreachable (use takeover there)`);
      if (pair.state === 'PSUS' || pair.state === 'PSUE') throw new PairCommandError('refused', `swap ${this.name}: the pair is ${pair.state}; resync it first`);
      const epoch = this.generation.epoch + 1;
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
      const link = this.ctx.links.get(this.generation.master)!;
      if (link.up && !opts.force) throw new PairCommandError('refused', `takeover ${this.name}: the master's storage system ${this.generation.master} is reachable; use swap`);
      const epoch = opts.epoch ?? this.generation.epoch + 1;
      if (epoch <= this.generation.epoch) throw new PairCommandError('refused', `takeover ${this.name}: epoch ${epoch} is not newer than ${this.generation.epoch}`);
      const old = this.generation.master;
      await this.promote(epoch, `takeover: storage system ${old} unreachable`);
      this.peerLost = true;
      // Still connected to the old master (cut from etcd, not from us): a new session makes the
      // handshake tell it about the new epoch, and it becomes our mirror.
      if (link.up) link.drop(`this copy took over ${this.name} in epoch ${epoch}`);
    });
  }

  status(): PairStatus {
    if (this.pair) return { ...this.pair.status(), epoch: this.generation.epoch };
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
      epoch: this.generation.epoch,
      stale: !side.trustsReplica,
      mirrors: [{ ...this.mine, invalidClusters: invalid, syncProgress: this.clusters === 0 ? 1 : 1 - invalid / this.clusters, copiedBytes: 0, connected: side.trustsReplica }],
    };
  }

  /** Sync rate and fence level, at run time (`blockmirror apply`): now, and for every later role. */
  configure(o: { syncRate: number | undefined; fence: FenceLevel }): void {
    if (o.syncRate === undefined) delete this.spec.syncRate;
    else this.spec.syncRate = o.syncRate;
    this.spec.fence = o.fence;
    if (this.pair) {
      this.pair.syncRate = o.syncRate;
      this.pair.fence = o.fence;
    }
    this.ctx.daemon.wake();
  }

  /**
   * Mirrors added and removed at run time (`blockmirror apply`, controller/reconfigure.ts), on
   * the master, with host I/O held above the pair (Peers.reshape, peers.ts):
   *
   *   1  the daemon forgets the pair; the pair closes (its bits persisted, then read here)
   *   2  a removed mirror is told it is split (PSUS: a simplex volume with what it has, never a
   *      copy that claims PAIR while nothing reaches it any more), then its port closes
   *   3  a new store of one slot per mirror: kept mirrors keep their bits, a new one is all Invalid,
   *      renamed in whole with its slot table, so a restart after a kill -9 runs either YAML (bitmap-store.ts)
   *   4  the Pair of the new layout, the kept ports with their sessions (becomeMasterNow)
   *   5  a new mirror's session (attachPort, the start-up handshake): its mirror side exists
   *      already (its storage system applied first), so the pair writes to it only once it is up
   *
   * The generation stays: same master, same epoch; the new mirror follows it at its attach.
   */
  reshape(next: RemotePairSpec): Promise<void> {
    return this.serial(async () => {
      const old = this.masterPair('reshape');
      this.checkReshape(next);
      const had = new Set(this.spec.mirrors.map(refKey));
      const bits = new Map(old.mirrors.map((m) => [refKey(m.ref), m.bitmap.bits.slice()]));
      const oldPorts = new Map([...this.ports.values()].map((p) => [refKey(p.ref), p]));
      const keep = new Set(next.mirrors.map(refKey));
      const [split, suspended] = [old.state === 'PSUS', old.state === 'PSUE' ? (old.error ?? 'suspended') : undefined];
      await this.ctx.daemon.forget(old);
      for (const [key, port] of oldPorts) {
        if (keep.has(key)) continue;
        if (port.connected) {
          await port.drain();
          await port.link.request('state', { pair: this.name, state: 'PSUS' }).catch(() => {});
        }
        port.close();
        oldPorts.delete(key);
      }
      await old.close();
      crashPoint('reshape:old-closed');
      this.spec.mirrors = next.mirrors.map((m) => ({ ...m }));
      const { mirrors } = this.layout();
      const all = new Uint8Array(Math.ceil(this.clusters / 8)).fill(0xff);
      if (this.clusters & 7) all[all.length - 1] = (1 << (this.clusters & 7)) - 1;
      const loaded = mirrors.map((ref) => bits.get(refKey(ref)) ?? all.slice());
      // The new membership and its bits in one file, renamed over the old one: a crash leaves one or the other, whole.
      const { store } = await this.ctx.openStore(mirrors.length, { copies: this.slotTable(), seed: loaded });
      this.store = store;
      crashPoint('reshape:bitmap-replaced');
      await this.becomeMasterNow(loaded, suspended, { ports: oldPorts, split });
      for (const port of this.ports.values()) {
        if (!port.connected && had.has(refKey(port.ref))) continue; // a kept mirror that is away: its next session attaches it
        if (!port.connected) await this.attachPort(port);
      }
      for (const ss of this.peerIds()) this.follow(ss);
      this.ctx.daemon.wake();
    });
  }

  /** Can `reshape(next)` attach every new mirror now? Throws, with what to do, if one's storage system is not connected; changes nothing. */
  checkReshape(next: RemotePairSpec): void {
    const had = new Set(this.spec.mirrors.map(refKey));
    for (const m of next.mirrors) {
      const link = this.ctx.links.get(m.ss);
      if (had.has(refKey(m)) || link?.up) continue;
      throw new Error(`storage system ${m.ss} is not connected over the peer channel${link?.lastError ? ` (${link.lastError})` : ''}: start it (blockmirror up --only ${m.ss}), then apply again`);
    }
  }

  /** On a mirror, the other copies of the pair as the YAML now says (they matter once this copy is the master). */
  setCopies(next: RemotePairSpec): void {
    this.spec.mirrors = next.mirrors.map((m) => ({ ...m }));
  }

  /** How long the NBD connections of this pair wait for a peer (the links have their own). */
  setPeerTimeout(ms: number): void {
    this.ctx.peerTimeout = ms;
  }

  /** The host-facing device of this storage system's volume in the pair: one per volume, following the role. */
  hostDevice(vol: number): BlockDevice {
    let d = this.followers.get(vol);
    if (!d) this.followers.set(vol, (d = new RoleFollower(() => this.masterHosts.get(vol) ?? this.mirror!.hostDevice)));
    return d;
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
}

// Mirror side of a pair across storage systems: this storage system holds a mirror of a master
// elsewhere. It keeps:
//   - the replica: the master's bitmap for this copy, as last told over the control channel,
//     trusted only while a session is up and the master was heard within half the peer timeout;
//   - the replication export that takes the master's writes, open only to this session's token;
//   - a sync client that reads Invalid clusters from the master (Kodama's Data Read module);
//   - the host-facing device: Check Invalid against the replica, fall back to the master.
import { randomBytes } from 'node:crypto';
import { FilterDevice } from '../../blockdev/filter.js';
import { BlockDeviceError, payloadLength, toBlockDeviceError, type BlockDevice, type Extent, type Payload, type WriteTarget, type ZeroOptions } from '../../blockdev/types.js';
import { connectTransport, type NbdClient } from '../../nbd/client.js';
import { AllowList } from '../../util/allow-list.js';
import { ClusterBitmap, clusterRange, maskStale } from '../bitmap.js';
import type { BitmapStore } from '../bitmap-store.js';
import { hashClusters } from '../pair.js';
import type { PeerLink } from '../peer/link.js';
import type { Op, RequestOf, ResponseOf } from '../peer/messages.js';
import type { PairState, VolRef } from '../status.js';
import { b64, fromB64, setBits } from './bits.js';
import type { RemotePairContext } from './context.js';
import { linkFaultGate, replicationExport } from './replication-sender.js';

export class MirrorSide {
  /** The master's bitmap for this copy, as last told; meaningful only while `trustsReplica`. */
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
  /** Host reads are being refused (readUnsure); logged once per episode. */
  private refusing = false;

  constructor(
    readonly pairName: string,
    readonly clusters: number,
    readonly master: VolRef,
    readonly mine: VolRef,
    readonly device: BlockDevice,
    createdEmpty: boolean,
    readonly store: BitmapStore,
    private readonly ctx: RemotePairContext,
  ) {
    this.replica = new ClusterBitmap(clusters);
    this.replica.setAllInvalid();
    this.blank = createdEmpty && setBits(store.image(0), clusters).length === 0;
    this.hostDevice = new MirrorHostDevice(this);
  }

  get link(): PeerLink {
    return this.ctx.links.get(this.master.ss)!;
  }

  get clusterSize(): number {
    return this.ctx.clusterSize;
  }

  /** The replica can be trusted: a session with the master is up and its lease is live. */
  get trustsReplica(): boolean {
    return this.token !== null && this.session === this.link.session && this.link.heardRecently;
  }

  /**
   * A read while the replica cannot be trusted: this copy cannot know what the master acknowledged
   * since (a sync pair with `fence: never` goes on without it once the peer timeout passes), so
   * every cluster counts as Invalid and the whole read comes from the master. With no master to
   * ask, nothing is served rather than data that may be old: EIO, and one log line per episode.
   * The ways to use this copy then are the master, or `pair takeover` here.
   */
  async readUnsure(offset: number, dest: Buffer): Promise<void> {
    try {
      await this.readFromMaster(offset, dest);
      this.refusing = false;
    } catch (e) {
      const why = `vol${this.mine.vol} is a mirror of ${this.pairName} that cannot hear its master (storage system ${this.master.ss}), so its data may be behind`;
      if (!this.refusing) {
        this.refusing = true;
        this.ctx.log.warn({ pair: this.pairName, vol: this.mine.vol, err: (e as Error).message }, `${why}: host reads get EIO until the master is back; read the master, or run pair takeover ${this.pairName} here`);
      }
      throw new BlockDeviceError('EIO', `${why}: read the master, or run pair takeover ${this.pairName} here`, { cause: e });
    }
  }

  attach(): ResponseOf<'attach'> {
    if (this.exportName) this.ctx.peerExports.remove(this.exportName);
    this.token = randomBytes(16).toString('hex');
    this.session = -1;
    this.exportName = replicationExport(this.mine.vol, this.token);
    // Only the master's storage system may open it, over its authenticated data connection.
    this.ctx.peerExports.add({
      name: this.exportName,
      description: `replication into ${this.pairName}`,
      device: new ReplicationTarget(this, this.token),
      readOnly: false,
      hidden: true,
      allow: new AllowList([`ss${this.master.ss}`]),
    });
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

  /** A request of the master's, already checked against its op's schema. */
  async handle<K extends Op>(op: K, body: RequestOf<K>): Promise<ResponseOf<K>> {
    return (await this.handleAny(op, body as RequestOf<Op>)) as ResponseOf<K>;
  }

  private async handleAny(op: Op, body: RequestOf<Op>): Promise<object> {
    switch (op) {
      case 'snapshot': {
        const m = body as RequestOf<'snapshot'>;
        this.replica = new ClusterBitmap(this.clusters, fromB64(m.bits, this.clusters));
        this.state = m.state;
        if (m.clearDirty) {
          const dirty = setBits(this.store.image(0), this.clusters);
          if (dirty.length > 0) await this.store.clear(0, dirty);
        }
        this.session = this.link.session;
        this.refusing = false; // a new session: the next episode without a master is logged again
        return {};
      }
      case 'bits': {
        for (const o of (body as RequestOf<'bits'>).ops) {
          if (o[0] === 'i') this.replica.setRangeInvalid(o[1], Math.min(o[2], this.clusters - 1));
          else if (o[1] < this.clusters) this.replica.setValid(o[1]);
        }
        return {};
      }
      case 'state':
        this.state = (body as RequestOf<'state'>).state;
        return {};
      case 'resync':
        // From here on host writes are refused; what was written is handed over.
        this.state = 'COPY';
        return { dirty: b64(this.store.image(0)) };
      case 'hashes': {
        const { first, count } = body as RequestOf<'hashes'>;
        const offset = first * this.ctx.clusterSize;
        const length = Math.min(count * this.ctx.clusterSize, this.device.size - offset);
        if (!(length > 0)) throw new Error(`hashes: bad range ${first}+${count}`);
        const buf = Buffer.allocUnsafe(length);
        await this.device.read(offset, buf);
        return { hashes: hashClusters(buf, this.ctx.clusterSize) };
      }
      default:
        throw new Error(`${this.pairName}: a mirror does not take ${op}`);
    }
  }

  /** Read from the master through the sync client (Invalid clusters while the pair is connected). */
  async readFromMaster(offset: number, dest: Buffer): Promise<void> {
    const what = `read from the master ss${this.master.ss}/vol${this.master.vol}`;
    if (this.link.fault) await linkFaultGate(this.link, what);
    if (!this.fallback) {
      const exportName = `vol${this.master.vol}`;
      // A busy master is not a lost one (the lease says when it is gone), so a large read gets
      // several peer timeouts before it fails: on a loaded machine 4 MiB can take longer than one.
      this.fallback = this.link.openData(exportName).then((socket) => connectTransport(socket, { exportName, timeoutMs: this.ctx.peerTimeout * 4 }));
      this.fallback.catch(() => (this.fallback = null));
    }
    try {
      const c = await this.fallback;
      await c.pread(dest, offset);
    } catch (e) {
      this.closeFallback();
      throw toBlockDeviceError(e, what);
    }
  }

  private closeFallback(): void {
    const f = this.fallback;
    this.fallback = null;
    if (f) void f.then((c) => c.close()).catch(() => {});
  }

  close(): void {
    this.closed = true;
    if (this.exportName) this.ctx.peerExports.remove(this.exportName);
    this.exportName = null;
    this.token = null;
    this.closeFallback();
  }

  get closedNow(): boolean {
    return this.closed;
  }
}

/** The mirror volume as hosts see it: Check Invalid against the replica, fall back to the master. */
class MirrorHostDevice extends FilterDevice {
  constructor(private readonly side: MirrorSide) {
    super(side.device);
  }

  override get readOnly(): boolean {
    return this.side.state !== 'PSUS';
  }

  private check(): void {
    if (this.side.closedNow) throw new BlockDeviceError('EPERM', 'the volume changed role; reconnect');
  }

  override async read(offset: number, dest: Buffer): Promise<void> {
    this.check();
    const s = this.side;
    if (s.state !== 'PSUS') {
      if (!s.trustsReplica) return s.readUnsure(offset, dest);
      const [first, last] = clusterRange(offset, dest.length, s.clusterSize);
      if (s.replica.anyInvalid(first, last)) return s.readFromMaster(offset, dest);
    }
    // In the pair with its Invalid clusters read from the master, or split (a point-in-time image by request).
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

  override write(offset: number, data: Payload, fua = false): Promise<void> {
    return this.modify(offset, payloadLength(data), () => this.side.device.write(offset, data, fua));
  }

  override trim(offset: number, length: number, fua = false): Promise<void> {
    return this.modify(offset, length, () => this.side.device.trim(offset, length, fua));
  }

  override zero(offset: number, length: number, opts: ZeroOptions = {}): Promise<void> {
    return this.modify(offset, length, () => this.side.device.zero(offset, length, opts));
  }

  /**
   * Never a hole where this copy may be stale: while the pair mirrors, an Invalid cluster is
   * reported as data (every cluster, without a trusted replica), so sparse-aware copies read it
   * (through the master, or EIO) instead of skipping it. Split, the copy describes itself.
   */
  override async extents(offset: number, length: number): Promise<Extent[]> {
    this.check();
    const s = this.side;
    const own = await s.device.extents(offset, length);
    if (s.state === 'PSUS') return own;
    const trusted = s.trustsReplica;
    return maskStale(own, offset, s.clusterSize, (c) => !trusted || s.replica.isInvalid(c));
  }

  /** A prefetch hint never makes a mirror serve its own Invalid clusters: ignore it. */
  override async cache(): Promise<void> {}
}

/** The replication export: the master's session writes here, and only while its token is current. */
class ReplicationTarget extends FilterDevice {
  constructor(
    private readonly side: MirrorSide,
    private readonly token: string,
  ) {
    super(side.device);
  }

  override get readOnly(): boolean {
    return false;
  }
  override get size(): number {
    return this.side.device.size;
  }
  override get multiConnSafe(): boolean {
    return true;
  }
  override get fastZero(): boolean {
    return this.side.device.fastZero;
  }

  protected override get next(): BlockDevice {
    if (!this.side.isCurrent(this.token)) throw new BlockDeviceError('EPERM', 'this replication session has ended');
    this.side.blank = false;
    return this.side.device;
  }

  override async read(offset: number, dest: Buffer): Promise<void> {
    return this.next.read(offset, dest);
  }
  override async write(offset: number, data: Payload, fua = false): Promise<void> {
    return this.next.write(offset, data, fua);
  }
  /**
   * A replicated WRITE's payload read from the data connection straight into the mirror volume's
   * memory (a memory volume without faults): SS2 copied every byte of a sync 1 MiB write once
   * more before (issue 18). The session is checked again at commit, as write() would check it then.
   */
  writeTarget(offset: number, length: number, from: number): WriteTarget | null {
    if (!this.side.isCurrent(this.token)) return null; // write() refuses it with EPERM
    const below = this.side.device.writeTarget?.(offset, length, from);
    if (!below) return null;
    return {
      pieces: below.pieces,
      commit: (head: Payload, fua?: boolean): Promise<void> => {
        if (!this.side.isCurrent(this.token)) {
          below.abort();
          return Promise.reject(new BlockDeviceError('EPERM', 'this replication session has ended'));
        }
        this.side.blank = false;
        return below.commit(head, fua);
      },
      abort: () => below.abort(),
    };
  }
  override async flush(): Promise<void> {
    return this.next.flush();
  }
  override async trim(offset: number, length: number, fua = false): Promise<void> {
    return this.next.trim(offset, length, fua);
  }
  override async zero(offset: number, length: number, opts: ZeroOptions = {}): Promise<void> {
    return this.next.zero(offset, length, opts);
  }
  override async extents(offset: number, length: number): Promise<Extent[]> {
    return this.next.extents(offset, length);
  }
}

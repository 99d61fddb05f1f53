// Master side of one mirror in another storage system: the bitmap kept in step over the control
// channel (the invalidation batcher), and the data device writes go through.
//
// Bit operations gathered in one event-loop tick travel as one ordered `bits` request. A writer
// waits only for the acknowledgement of its own clusters' invalidations (barrier); "valid"
// operations ride with the next invalidation, or leave after VALID_DELAY_MS, since nobody waits
// for them: until one arrives, the mirror reads that cluster from the master, which is only slower.
import type { RemotePort } from '../pair.js';
import type { PeerLink } from '../peer/link.js';
import type { BitOp } from '../peer/messages.js';
import type { VolRef } from '../status.js';
import type { RemotePairContext } from './context.js';
import { ReplicationSender } from './replication-sender.js';

interface Batch {
  promise: Promise<void>;
  resolve: () => void;
  /** Clusters this batch invalidates. */
  clusters: number[];
}

const RESOLVED = Promise.resolve();
/** How long "valid" operations may wait for an invalidation to travel with. */
const VALID_DELAY_MS = 20;

export class MirrorPort implements RemotePort {
  connected = false;
  readonly device: ReplicationSender;
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
    private readonly pairName: string,
    /** The mirror's index in the pair: a reshape that drops a mirror before it moves it down. */
    public index: number,
    readonly ref: VolRef,
    readonly link: PeerLink,
    ctx: RemotePairContext,
    volumeSize: number,
  ) {
    this.device = new ReplicationSender(ref, ctx, link, volumeSize);
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
    const sent = this.link.request('bits', { pair: this.pairName, ops }).then(
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
    return (await this.link.request('hashes', { pair: this.pairName, first, count })).hashes;
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

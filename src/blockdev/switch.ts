// A layer whose lower part can be replaced while hosts stay connected: what live
// reconfiguration (`blockmirror apply`) swaps under a volume's host stack when the volume joins
// a pair, leaves one, or its pair gains a mirror. An NBD or iSCSI connection keeps the device it
// attached to for its whole life, so the object hosts hold never changes; only `next` does.
//
//   call       while open                  while held
//   any I/O    counted, passed to next     waits for release(), then goes to the new next
//   hold()     stops new I/O, resolves once the I/O in flight has finished
//   release()  sets the new next (if given) and lets the waiting I/O through
//
// Holding is a pause the host sees as latency, never as an error: the point where no request
// is half way through the old pair and none has reached the new one yet.
import { FilterDevice } from './filter.js';
import { landedPayload, type BlockDevice, type Extent, type Payload, type WriteTarget, type ZeroOptions } from './types.js';

export class SwitchDevice extends FilterDevice {
  private current: BlockDevice;
  private inFlight = 0;
  private gate: Promise<void> | null = null;
  private open: (() => void) | null = null;
  private drained: (() => void) | null = null;

  constructor(next: BlockDevice) {
    super(next);
    this.current = next;
  }

  protected override get next(): BlockDevice {
    return this.current;
  }

  /** Is I/O held now? */
  get held(): boolean {
    return this.gate !== null;
  }

  /** Stop new I/O and wait for the I/O in flight. Holding twice is one hold. */
  async hold(): Promise<void> {
    if (!this.gate) this.gate = new Promise((r) => (this.open = r));
    if (this.inFlight > 0) await new Promise<void>((r) => (this.drained = r));
  }

  /** Let I/O through again, to `next` from now on if given. */
  release(next?: BlockDevice): void {
    if (next) this.current = next;
    const open = this.open;
    this.gate = null;
    this.open = null;
    open?.();
  }

  /** The hot path: no await while open; the request is counted out by two functions bound once. */
  private pass<T>(op: (d: BlockDevice) => Promise<T>): Promise<T> {
    if (this.gate) return this.gate.then(() => this.pass(op));
    this.inFlight++;
    let p: Promise<T>;
    try {
      p = op(this.current);
    } catch (e) {
      p = Promise.reject(e as Error);
    }
    return p.then(this.doneOk as (v: T) => T, this.doneErr);
  }

  private readonly doneOk = <T>(v: T): T => {
    this.leave();
    return v;
  };

  private readonly doneErr = (e: unknown): never => {
    this.leave();
    throw e;
  };

  private leave(): void {
    if (--this.inFlight === 0 && this.drained) {
      const d = this.drained;
      this.drained = null;
      d();
    }
  }

  override read(offset: number, dest: Buffer): Promise<void> {
    return this.pass((d) => d.read(offset, dest));
  }
  override write(offset: number, data: Payload, fua?: boolean): Promise<void> {
    return this.pass((d) => d.write(offset, data, fua));
  }
  /**
   * The target of the layer below now. Its commit passes like a write, so a hold waits for it; if
   * the layer was swapped meanwhile, the landed bytes are copied out and written to the new one,
   * where write() would send them at that moment.
   */
  writeTarget(offset: number, length: number, from: number): WriteTarget | null {
    if (this.gate) return null; // held: a write() waits at the gate with a copy
    const dev = this.current;
    const below = dev.writeTarget?.(offset, length, from);
    if (!below) return null;
    return {
      pieces: below.pieces,
      commit: (head: Payload, fua?: boolean): Promise<void> =>
        this.pass((d) => {
          if (d === dev) return below.commit(head, fua);
          const data = landedPayload(head, below);
          below.abort();
          return d.write(offset, data, fua);
        }),
      abort: () => below.abort(),
    };
  }
  override flush(): Promise<void> {
    return this.pass((d) => d.flush());
  }
  override trim(offset: number, length: number, fua?: boolean): Promise<void> {
    return this.pass((d) => d.trim(offset, length, fua));
  }
  override zero(offset: number, length: number, opts?: ZeroOptions): Promise<void> {
    return this.pass((d) => d.zero(offset, length, opts));
  }
  override extents(offset: number, length: number): Promise<Extent[]> {
    return this.pass((d) => d.extents(offset, length));
  }
  override cache(offset: number, length: number): Promise<void> {
    return this.pass((d) => d.cache?.(offset, length) ?? Promise.resolve());
  }
}

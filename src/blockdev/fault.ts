// Fault injection for a volume: a layer of the volume stack that makes the volume below
// misbehave the way failing media do, on purpose, for tests and for operators rehearsing a
// failure (nbdkit's error and delay filters, and dm-flakey, in one layer).
//
//   kind      what a request that the fault matches sees
//   error     EIO, for the ops and byte range given, with a probability (default 1)
//   delay     `ms` more latency (plus 0..jitter), then the request goes on
//   offline   mode hang: the request waits until the fault is cleared, then goes on;
//             mode fail: EIO at once (a volume that vanished)
//   corrupt   the read succeeds, but one bit of each 512-byte sector read inside the range
//             is flipped: a silent data error, as a bad disk or cable gives
//   torn      a write persists only a sector-aligned prefix (half, rounded down), then fails
//             with EIO, as a write cut by a power loss does
//
// A fault matches a request when the request's op is among its ops (default: all; trim and
// zero count as writes), the request overlaps its byte range (default: the whole volume), and
// the dice say so. Faults are kept in a FaultSet, which the storage system's fault table
// changes at run time; the layer reads it on every request, so a change applies at once.
import { FilterDevice } from './filter.js';
import { BlockDeviceError, landedPayload, payloadLength, type BlockDevice, type Extent, type Payload, type WriteTarget, type ZeroOptions } from './types.js';

export type FaultOp = 'read' | 'write' | 'flush';
export const FAULT_OPS: readonly FaultOp[] = ['read', 'write', 'flush'];
export const VOLUME_FAULT_KINDS = ['error', 'delay', 'offline', 'corrupt', 'torn'] as const;
export type VolumeFaultKind = (typeof VOLUME_FAULT_KINDS)[number];

export interface ByteRange {
  start: number;
  length: number;
}

export interface VolumeFault {
  kind: VolumeFaultKind;
  /** Which requests it hits; absent means every op. */
  ops?: FaultOp[];
  /** Which bytes; absent means the whole volume. */
  range?: ByteRange;
  /** 0..1, default 1. */
  probability?: number;
  /** delay: milliseconds added. */
  ms?: number;
  /** delay: up to this many more milliseconds, uniformly. */
  jitter?: number;
  /** offline: hang until cleared (default) or fail at once. */
  mode?: 'hang' | 'fail';
}

/** One line for logs, status and the CLI: "error on write, 0+1048576, p=0.5". */
export function describeFault(f: VolumeFault): string {
  const parts: string[] = [f.kind];
  if (f.kind === 'offline') parts.push(f.mode ?? 'hang');
  if (f.kind === 'delay') parts.push(`${f.ms ?? 0} ms${f.jitter ? ` ± ${f.jitter}` : ''}`);
  if (f.ops && f.ops.length < FAULT_OPS.length) parts.push(`on ${f.ops.join('/')}`);
  if (f.range) parts.push(`bytes ${f.range.start}+${f.range.length}`);
  if (f.probability !== undefined && f.probability < 1) parts.push(`p=${f.probability}`);
  return parts.join(', ');
}

/**
 * The faults of one volume, changed at run time. At most one fault per kind: setting a kind
 * again replaces it. Clearing an offline fault releases the requests it holds.
 */
export class FaultSet {
  private faults: VolumeFault[] = [];
  private release: (() => void) | null = null;
  private released: Promise<void> | null = null;
  /** Any fault set: while false, the layer forwards every request untouched. */
  active = false;

  constructor(private readonly random: () => number = Math.random) {}

  list(): readonly VolumeFault[] {
    return this.faults;
  }

  set(f: VolumeFault): void {
    this.faults = [...this.faults.filter((x) => x.kind !== f.kind), f];
    this.active = true;
    if (f.kind === 'offline' && !this.released) this.released = new Promise((r) => (this.release = r));
  }

  /** Remove one kind, or every fault. */
  clear(kind?: VolumeFaultKind): void {
    this.faults = kind ? this.faults.filter((x) => x.kind !== kind) : [];
    this.active = this.faults.length > 0;
    if (!this.faults.some((x) => x.kind === 'offline') && this.release) {
      this.release();
      this.release = null;
      this.released = null;
    }
  }

  /** The fault of `kind` that hits this request, if any. */
  hit(kind: VolumeFaultKind, op: FaultOp, offset: number, length: number): VolumeFault | undefined {
    for (const f of this.faults) {
      if (f.kind !== kind) continue;
      if (f.ops && !f.ops.includes(op)) continue;
      if (f.range && op !== 'flush' && (offset + length <= f.range.start || offset >= f.range.start + f.range.length)) continue;
      if (f.probability !== undefined && f.probability < 1 && this.random() >= f.probability) continue;
      return f;
    }
    return undefined;
  }

  /** Resolves when the offline fault is cleared. */
  whenOnline(): Promise<void> {
    return this.released ?? Promise.resolve();
  }

  roll(n: number): number {
    return Math.floor(this.random() * n);
  }
}

const SECTOR = 512;

export class FaultDevice extends FilterDevice {
  constructor(
    next: BlockDevice,
    readonly faults: FaultSet,
    /** Names the volume in error messages ("ss1/vol8"). */
    private readonly label: string,
  ) {
    super(next);
  }

  /** Errors, delays and offline hangs that apply before the request reaches the volume. */
  private async before(op: FaultOp, offset: number, length: number): Promise<void> {
    const set = this.faults;
    const offline = set.hit('offline', op, offset, length);
    if (offline) {
      if (offline.mode === 'fail') throw new BlockDeviceError('EIO', `${this.label}: ${op}: injected fault: the volume is offline`);
      await set.whenOnline();
    }
    const delay = set.hit('delay', op, offset, length);
    if (delay) {
      const ms = (delay.ms ?? 0) + (delay.jitter ? set.roll(delay.jitter + 1) : 0);
      if (ms > 0) await new Promise((r) => setTimeout(r, ms));
    }
    if (set.hit('error', op, offset, length)) throw new BlockDeviceError('EIO', `${this.label}: ${op} at ${offset}: injected I/O error`);
  }

  // Without a fault set, each call goes straight to the layer below: no async wrapper, no await.
  override read(offset: number, dest: Buffer): Promise<void> {
    return this.faults.active ? this.faultyRead(offset, dest) : this.next.read(offset, dest);
  }

  override write(offset: number, data: Payload, fua?: boolean): Promise<void> {
    return this.faults.active ? this.faultyWrite(offset, data, fua) : this.next.write(offset, data, fua);
  }

  /**
   * Without a fault set, the target below, as write() would pass the bytes straight down. A fault
   * set between the target and its commit still applies: the commit then copies the landed bytes
   * out, gives the target back and takes write()'s faulty path, as a write at that moment would.
   */
  writeTarget(offset: number, length: number, from: number): WriteTarget | null {
    if (this.faults.active) return null;
    const below = this.next.writeTarget?.(offset, length, from);
    if (!below) return null;
    return {
      pieces: below.pieces,
      commit: (head: Payload, fua?: boolean): Promise<void> => {
        if (!this.faults.active) return below.commit(head, fua);
        const landed = landedPayload(head, below);
        below.abort();
        return this.faultyWrite(offset, landed, fua);
      },
      abort: () => below.abort(),
      ...(below.hold ? { hold: () => below.hold!() } : {}),
    };
  }

  override flush(): Promise<void> {
    return this.faults.active ? this.before('flush', 0, 0).then(() => this.next.flush()) : this.next.flush();
  }

  override trim(offset: number, length: number, fua?: boolean): Promise<void> {
    return this.faults.active ? this.before('write', offset, length).then(() => this.next.trim(offset, length, fua)) : this.next.trim(offset, length, fua);
  }

  override zero(offset: number, length: number, opts?: ZeroOptions): Promise<void> {
    return this.faults.active ? this.before('write', offset, length).then(() => this.next.zero(offset, length, opts)) : this.next.zero(offset, length, opts);
  }

  override extents(offset: number, length: number): Promise<Extent[]> {
    return this.faults.active ? this.faultyExtents(offset, length) : this.next.extents(offset, length);
  }

  private async faultyRead(offset: number, dest: Buffer): Promise<void> {
    await this.before('read', offset, dest.length);
    await this.next.read(offset, dest);
    const corrupt = this.faults.hit('corrupt', 'read', offset, dest.length);
    if (corrupt) flipBits(dest, offset, corrupt.range ?? { start: 0, length: this.size });
  }

  private async faultyWrite(offset: number, data: Payload, fua?: boolean): Promise<void> {
    const length = payloadLength(data);
    await this.before('write', offset, length);
    if (this.faults.hit('torn', 'write', offset, length)) {
      const keep = Math.floor(length / 2 / SECTOR) * SECTOR;
      if (keep > 0) {
        const whole = Buffer.isBuffer(data) ? data : Buffer.concat(data as Buffer[]);
        await this.next.write(offset, whole.subarray(0, keep), fua);
      }
      throw new BlockDeviceError('EIO', `${this.label}: write at ${offset}: injected torn write (${keep} of ${length} bytes persisted)`);
    }
    return this.next.write(offset, data, fua);
  }

  private async faultyExtents(offset: number, length: number): Promise<Extent[]> {
    const offline = this.faults.hit('offline', 'read', offset, length);
    if (offline?.mode === 'fail') throw new BlockDeviceError('EIO', `${this.label}: block status: injected fault: the volume is offline`);
    if (offline) await this.faults.whenOnline();
    return this.next.extents(offset, length);
  }
}

/** Flip the lowest bit of the first byte of every sector of `dest` (read at `offset`) inside `range`. */
function flipBits(dest: Buffer, offset: number, range: ByteRange): void {
  const from = Math.max(offset, range.start);
  const to = Math.min(offset + dest.length, range.start + range.length);
  for (let at = Math.ceil(from / SECTOR) * SECTOR; at < to; at += SECTOR) dest[at - offset]! ^= 1;
  // A range smaller than a sector, or not sector-aligned, still gets one flipped byte.
  if (to > from && Math.ceil(from / SECTOR) * SECTOR >= to) dest[from - offset]! ^= 1;
}

// An open CFS file on the client (Kodama's drawings of the client's open, read, write and close
// modules).
//
// Reads go to the copy the server chose at open (block list offsets are the same on every copy),
// writes always to the master. If the copy fails mid-read, the file asks the server for another
// copy and reads the rest from there.
//
// Writes are copy-on-write per block. A block the file has not written since its last commit is
// shared: others may be reading it. The first write to it goes to a fresh block reserved from the
// server; a write that covers only part of that block first fills the rest from the old block (or
// with zeros for a hole or past the end), so every private block is whole before it is used. sync()
// flushes the master and commits the private blocks; close() syncs.
//
//   view of block i:   priv.get(i)  ??  map[i]  ??  hole (zeros)
//                      (ours, not yet  (committed,
//                       committed)      shared)
//
// Invariant kept by every writer: bytes past the end of a file inside its last block are zero, so
// growing a file (truncate up, or a write past the end) never exposes old data.
import { NbdError } from '../nbd/client.js';
import { dataError, isCopyFailure, type DataPath } from './datapath.js';
import { HOLE } from './namespace.js';
import { CfsError, type CopyRef, type Extent, type FileView, type OpName, type Ops, type OpenReply, type VolRun, type VolumeAddress } from './protocol.js';

/** Largest single NBD request the file issues; bigger reads and writes are split and sent together. */
const MAX_IO = 4 * 1024 * 1024;
/** Reservations start small and double while a file keeps growing, up to this many bytes. */
const MAX_RESERVE_BYTES = 64 * 1024 * 1024;

/** What a file needs of its client. */
export interface FileHost {
  call<K extends OpName>(op: K, args: Ops[K]['args']): Promise<Ops[K]['reply']>;
  /** Changes whenever the connection to the server is lost: handles of an older one are gone. */
  readonly generation: number;
  readonly data: DataPath;
}

export type OpenMode = 'r' | 'r+' | 'w' | 'wx';

/** How long a write keeps looking for a master that moved (a takeover by hand takes a few seconds). */
const MASTER_MOVE_MS = 30_000;

/**
 * The master refused as a mirror (EPERM: from the server, or from our client when the export it
 * reconnected to says read-only), is fenced (ESHUTDOWN), or cannot be reached: it may have moved.
 */
function mayHaveMoved(e: unknown): boolean {
  if (e instanceof NbdError) return e.code === 'EPERM' || e.code === 'ESHUTDOWN' || e.code === 'EROFS';
  return isCopyFailure(e);
}

export class CfsFile {
  readonly writable: boolean;
  readonly blockSize: number;
  readonly pair: string;
  /** Where writes go: the pair's master, which a swap or a takeover moves (masterMoved below). */
  master: VolumeAddress;
  ino: number;
  size: number;
  mtime: number;
  private handle: number;
  private generation: number;
  private copyRef: CopyRef;
  private map: number[] = [];
  private readonly priv = new Map<number, number>();
  /** Blocks being made private: other writes to them wait. */
  private readonly busy = new Map<number, Promise<void>>();
  private pool: VolRun[] = [];
  private poolSize = 0;
  private reserveBlocks = 16;
  private truncTo: number | undefined;
  private setSize = false;
  private dirty: boolean;
  private replacePending: boolean;
  private assigning: Promise<void> = Promise.resolve();
  private writesInFlight = 0;
  private drained: (() => void) | undefined;
  private gate: Promise<void> | undefined;
  private failing: Promise<void> | undefined;
  private moving: Promise<void> | undefined;
  private closed = false;
  private broken: CfsError | undefined;

  constructor(
    private readonly host: FileHost,
    readonly path: string,
    mode: OpenMode,
    o: OpenReply,
  ) {
    this.writable = mode !== 'r';
    this.blockSize = o.blockSize;
    this.pair = o.pair;
    this.master = o.master;
    this.ino = o.ino;
    this.size = o.size;
    this.mtime = o.mtime;
    this.handle = o.handle;
    this.generation = host.generation;
    this.copyRef = o.copy;
    this.setView(o);
    this.replacePending = mode === 'w' || mode === 'wx';
    this.dirty = this.replacePending;
  }

  /** The copy reads go to: mirror 0 is the master. */
  get copy(): CopyRef {
    return this.copyRef;
  }

  /** Has writes (or a truncate) that sync() has not committed yet. */
  get isDirty(): boolean {
    return this.dirty;
  }

  // -------------------------------------------------------------------------------------------
  // Read

  /** Read into `dest` from `position`; resolves with the bytes read (0 at the end of the file). */
  async read(dest: Uint8Array, position: number): Promise<number> {
    this.usable();
    if (this.generation !== this.host.generation) await this.revive();
    if (position >= this.size || dest.length === 0) return 0;
    const length = Math.min(dest.length, this.size - position);
    const buf = Buffer.isBuffer(dest) ? dest : Buffer.from(dest.buffer, dest.byteOffset, dest.byteLength);
    const reads: Promise<void>[] = [];
    for (const seg of this.segments(position, length)) {
      const part = buf.subarray(seg.at, seg.at + seg.length);
      if (seg.vol === HOLE) part.fill(0);
      else reads.push(this.readCopy(part, seg.vol));
    }
    await settled(reads);
    return length;
  }

  /**
   * [position, position+length) as runs that are contiguous on the volume (or holes), each at most
   * MAX_IO: `vol` is a byte offset on the volume, `at` the offset in the caller's buffer.
   */
  private segments(position: number, length: number): { at: number; vol: number; length: number }[] {
    const bs = this.blockSize;
    const out: { at: number; vol: number; length: number }[] = [];
    let pos = position;
    const end = position + length;
    while (pos < end) {
      const b = Math.floor(pos / bs);
      const within = pos - b * bs;
      const n = Math.min(bs - within, end - pos);
      const vb = this.blockOf(b);
      const vol = vb === HOLE ? HOLE : vb * bs + within;
      const last = out[out.length - 1];
      if (last && ((vol === HOLE && last.vol === HOLE) || (vol !== HOLE && last.vol !== HOLE && last.vol + last.length === vol)) && last.length + n <= MAX_IO) {
        last.length += n;
      } else out.push({ at: pos - position, vol, length: n });
      pos += n;
    }
    return out;
  }

  private blockOf(b: number): number {
    return this.priv.get(b) ?? (b < this.map.length ? this.map[b]! : HOLE);
  }

  /** Read from the chosen copy; on a copy failure move to another copy and try again. */
  private async readCopy(dest: Buffer, volOffset: number): Promise<void> {
    const tries = 4;
    for (let attempt = 1; ; attempt++) {
      const copy = this.copyRef;
      try {
        await this.host.data.pread(copy, dest, volOffset);
        return;
      } catch (e) {
        if (!isCopyFailure(e) || attempt >= tries) throw dataError('read', copy, e);
        this.host.data.dropAll(copy);
        await this.failover(copy);
      }
    }
  }

  /** Ask the server for another copy than `failed` (once, however many reads failed together). */
  private failover(failed: CopyRef): Promise<void> {
    if (this.copyRef.mirror !== failed.mirror) return Promise.resolve();
    this.failing ??= this.call('reopen', { handle: this.handle, failed: failed.mirror })
      .then((r) => {
        this.copyRef = r.copy;
      })
      .finally(() => (this.failing = undefined));
    return this.failing;
  }

  // -------------------------------------------------------------------------------------------
  // Write

  /** Write `data` at `position` (to the master). The buffer must stay unchanged until this resolves. */
  async write(data: Uint8Array, position: number): Promise<void> {
    this.usable();
    if (!this.writable) throw new CfsError('EBADF', `${this.path} is open for reading only`);
    if (data.length === 0) return;
    while (this.gate) await this.gate;
    this.writesInFlight++;
    try {
      if (this.generation !== this.host.generation) await this.revive();
      await this.writeBlocks(Buffer.isBuffer(data) ? data : Buffer.from(data.buffer, data.byteOffset, data.byteLength), position);
      this.size = Math.max(this.size, position + data.length);
      this.dirty = true;
    } finally {
      if (--this.writesInFlight === 0) this.drained?.();
    }
  }

  private async writeBlocks(data: Buffer, position: number): Promise<void> {
    const bs = this.blockSize;
    const first = Math.floor(position / bs);
    const last = Math.floor((position + data.length - 1) / bs);
    const fresh: { b: number; vb: number; whole: boolean }[] = [];
    const done: (() => void)[] = [];
    // Assignment is serialised so two writes never make the same block private twice.
    await this.serially(async () => {
      for (let b = first; b <= last; b++) {
        const wait = this.busy.get(b);
        if (wait) await wait;
      }
      const need: number[] = [];
      for (let b = first; b <= last; b++) if (!this.priv.has(b)) need.push(b);
      if (need.length === 0) return;
      await this.reserve(need.length);
      for (const b of need) {
        const vb = this.takeBlock();
        const whole = b * bs >= position && (b + 1) * bs <= position + data.length;
        fresh.push({ b, vb, whole });
        let release!: () => void;
        this.busy.set(b, new Promise<void>((r) => (release = r)));
        done.push(() => {
          this.busy.delete(b);
          release();
        });
      }
    });
    const freshAt = new Map(fresh.map((f) => [f.b, f]));
    try {
      const writes: Promise<void>[] = [];
      // Partly covered fresh blocks: old content (or zeros) around the new bytes, written whole.
      for (const f of fresh) if (!f.whole) writes.push(this.fillBlock(f.b, f.vb, data, position));
      // Everything else goes straight from `data`, in runs contiguous on the volume.
      let run: { vol: number; from: number; length: number } | undefined;
      const flushRun = () => {
        if (run) writes.push(this.writeMaster(data.subarray(run.from, run.from + run.length), run.vol));
        run = undefined;
      };
      for (let b = first; b <= last; b++) {
        const f = freshAt.get(b);
        if (f && !f.whole) {
          flushRun();
          continue;
        }
        const vb = f ? f.vb : this.priv.get(b)!;
        const from = Math.max(position, b * bs);
        const to = Math.min(position + data.length, (b + 1) * bs);
        const vol = vb * bs + (from - b * bs);
        if (run && run.vol + run.length === vol && run.length + (to - from) <= MAX_IO) run.length += to - from;
        else {
          flushRun();
          run = { vol, from: from - position, length: to - from };
        }
      }
      flushRun();
      await settled(writes);
      for (const f of fresh) this.priv.set(f.b, f.vb);
    } finally {
      for (const d of done) d();
    }
  }

  /** Make fresh block vb the private copy of file block b with `data` written over its old content. */
  private async fillBlock(b: number, vb: number, data: Buffer, position: number): Promise<void> {
    const bs = this.blockSize;
    const block = Buffer.alloc(bs);
    const old = b < this.map.length ? this.map[b]! : HOLE;
    if (old !== HOLE && b * bs < this.size) await this.readCopy(block, old * bs);
    const from = Math.max(position, b * bs);
    const to = Math.min(position + data.length, (b + 1) * bs);
    data.copy(block, from - b * bs, from - position, to - position);
    await this.writeMaster(block, vb * bs);
  }

  private async writeMaster(data: Buffer, volOffset: number): Promise<void> {
    return this.onMaster('write', (m) => this.host.data.pwrite(m, data, volOffset));
  }

  /**
   * Run `op` on the master. When it fails in a way that says the master may have moved (the copy
   * now refuses writes as a mirror, or its storage system is gone), ask the server where the
   * master is now and run it there: a swap or a takeover under a running put is not the user's
   * problem. Blocks keep their numbers on every copy, so the retry writes the same place.
   */
  private async onMaster(what: string, op: (m: VolumeAddress) => Promise<void>): Promise<void> {
    const deadline = performance.now() + MASTER_MOVE_MS;
    for (;;) {
      const m = this.master;
      try {
        await op(m);
        return;
      } catch (e) {
        if (isCopyFailure(e)) this.host.data.drop(m);
        if (!mayHaveMoved(e) || performance.now() > deadline || this.generation !== this.host.generation) throw dataError(what, m, e);
        await this.masterMoved(m);
      }
    }
  }

  /** Ask the server where the master is (once, however many writes failed together); wait a little if it has not moved yet. */
  private async masterMoved(failed: VolumeAddress): Promise<void> {
    if (this.master.ss !== failed.ss || this.master.vol !== failed.vol) return;
    this.moving ??= this.call('where', { handle: this.handle })
      .then(async (r) => {
        if (r.master.ss === failed.ss && r.master.vol === failed.vol) await new Promise((res) => setTimeout(res, 200));
        this.master = r.master;
        this.copyRef = r.copy;
      })
      .finally(() => (this.moving = undefined));
    return this.moving;
  }

  /** Have at least `blocks` reserved blocks in the pool, asking the server for more (and then some). */
  async reserve(blocks: number): Promise<void> {
    if (this.poolSize >= blocks) return;
    const need = blocks - this.poolSize;
    let want = Math.max(need, this.reserveBlocks);
    this.reserveBlocks = Math.min(this.reserveBlocks * 2, Math.max(1, MAX_RESERVE_BYTES / this.blockSize));
    const goal = this.nextGoal();
    let r;
    try {
      r = await this.call('alloc', { handle: this.handle, count: want, ...(goal !== undefined ? { goal } : {}) });
    } catch (e) {
      // Reserving ahead is a speed-up, not a need: with little space left, ask for what is needed.
      if (!(e instanceof CfsError && e.code === 'ENOSPC') || want === need) throw e;
      want = need;
      this.reserveBlocks = 16;
      r = await this.call('alloc', { handle: this.handle, count: want, ...(goal !== undefined ? { goal } : {}) });
    }
    for (const run of r.runs) this.pool.push([run[0], run[1]]);
    this.poolSize += want;
  }

  /** Where a new block would continue the file: after its last block on the volume. */
  private nextGoal(): number | undefined {
    const lastPool = this.pool[this.pool.length - 1];
    if (lastPool) return lastPool[0] + lastPool[1];
    let last = HOLE;
    for (const vb of this.priv.values()) last = Math.max(last, vb);
    for (let i = this.map.length - 1; i >= 0 && last === HOLE; i--) last = this.map[i]!;
    return last === HOLE ? undefined : last + 1;
  }

  private takeBlock(): number {
    const run = this.pool[0]!;
    const vb = run[0];
    run[0]++;
    if (--run[1] === 0) this.pool.shift();
    this.poolSize--;
    return vb;
  }

  private serially(fn: () => Promise<void>): Promise<void> {
    const next = this.assigning.then(fn);
    this.assigning = next.catch(() => {});
    return next;
  }

  // -------------------------------------------------------------------------------------------
  // Truncate, sync, close

  /** Set the size. Shrinking drops the blocks past the end and zeroes the tail of the new last block. */
  async truncate(size: number): Promise<void> {
    this.usable();
    if (!this.writable) throw new CfsError('EBADF', `${this.path} is open for reading only`);
    if (!Number.isSafeInteger(size) || size < 0) throw new CfsError('EINVAL', `invalid size ${size}`);
    await this.exclusive(async () => {
      if (this.generation !== this.host.generation) await this.revive();
      const bs = this.blockSize;
      if (size < this.size) {
        const keep = Math.ceil(size / bs);
        for (const [b, vb] of [...this.priv]) {
          if (b >= keep) {
            this.priv.delete(b);
            this.pool.unshift([vb, 1]);
            this.poolSize++;
          }
        }
        if (this.map.length > keep) this.map.length = keep;
        this.truncTo = Math.min(this.truncTo ?? Infinity, keep);
        const tail = size % bs;
        const b = Math.floor(size / bs);
        // The new last block keeps its head and gets zeros past the new end (in a private copy).
        if (tail !== 0 && this.blockOf(b) !== HOLE) await this.writeBlocks(Buffer.alloc(bs - tail), size);
      }
      this.size = size;
      this.setSize = true;
      this.dirty = true;
    });
  }

  /** Make every write so far durable and visible: FLUSH the master, then commit the block map. */
  async sync(): Promise<void> {
    this.usable();
    await this.exclusive(() => this.commit());
  }

  /** The committed view again, if this file has nothing uncommitted (close-to-open for a file kept open). */
  async refresh(): Promise<void> {
    this.usable();
    if (this.dirty) return;
    if (this.generation !== this.host.generation) return this.revive();
    const v = await this.call('refresh', { handle: this.handle });
    if (!this.dirty) this.setView(v);
  }

  /** Sync (unless `discard`), then release the handle. */
  async close(opts: { discard?: boolean } = {}): Promise<void> {
    if (this.closed) return;
    try {
      if (!opts.discard && !this.broken) await this.sync();
    } finally {
      this.closed = true;
      if (this.generation === this.host.generation) await this.call('close', { handle: this.handle }).catch(() => {});
    }
  }

  private async commit(): Promise<void> {
    if (!this.dirty) return;
    if (this.generation !== this.host.generation) await this.revive();
    if (this.priv.size > 0) await this.onMaster('flush', (m) => this.host.data.flush(m));
    const extents: Extent[] = [];
    for (const b of [...this.priv.keys()].sort((x, y) => x - y)) {
      const vb = this.priv.get(b)!;
      const last = extents[extents.length - 1];
      if (last && last[0] + last[2] === b && last[1] + last[2] === vb) last[2]++;
      else extents.push([b, vb, 1]);
    }
    const v = await this.call('commit', {
      handle: this.handle,
      size: this.size,
      ...(this.setSize ? { setSize: true } : {}),
      ...(this.truncTo !== undefined ? { trunc: this.truncTo } : {}),
      extents,
    });
    this.priv.clear();
    this.truncTo = undefined;
    this.setSize = false;
    this.dirty = false;
    this.replacePending = false;
    this.setView(v);
  }

  /** Run fn with no write in flight and none starting (commit and truncate need a still file). */
  private async exclusive(fn: () => Promise<void>): Promise<void> {
    while (this.gate) await this.gate;
    let open!: () => void;
    this.gate = new Promise<void>((r) => (open = r));
    try {
      if (this.writesInFlight > 0) await new Promise<void>((r) => (this.drained = r));
      this.drained = undefined;
      await fn();
    } finally {
      this.gate = undefined;
      open();
    }
  }

  private setView(v: FileView): void {
    this.size = v.size;
    this.mtime = v.mtime;
    const map: number[] = [];
    for (const [fb, vb, n] of v.extents) {
      while (map.length < fb) map.push(HOLE);
      for (let k = 0; k < n; k++) map[fb + k] = vb + k;
    }
    this.map = map;
  }

  /**
   * The server connection was lost, and with it this handle. A file with nothing uncommitted opens
   * again by inode; uncommitted writes are lost (their blocks were only reserved) and say so.
   */
  private async revive(): Promise<void> {
    if (this.dirty || this.replacePending) {
      this.broken = new CfsError('EIO', `lost the connection to the CFS server: uncommitted writes to ${this.path} are lost`);
      throw this.broken;
    }
    const generation = this.host.generation;
    const o = await this.host.call('open', { ino: this.ino, mode: this.writable ? 'rw' : 'r' });
    this.handle = o.handle;
    this.generation = generation;
    this.copyRef = o.copy;
    this.pool = [];
    this.poolSize = 0;
    this.setView(o);
  }

  private call<K extends OpName>(op: K, args: Ops[K]['args']): Promise<Ops[K]['reply']> {
    return this.host.call(op, args);
  }

  private usable(): void {
    if (this.broken) throw this.broken;
    if (this.closed) throw new CfsError('EBADF', `${this.path} is closed`);
  }
}

/**
 * Wait for every one of them, then throw the first failure. Never return while a request may still be
 * reading from or writing into the caller's buffer: the FUSE mount hands us libfuse's own memory.
 */
async function settled(ps: Promise<void>[]): Promise<void> {
  const results = await Promise.allSettled(ps);
  const failed = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
  if (failed) throw failed.reason;
}

// Sparse in-memory block device. Data lives in 4 KiB pages that exist only
// once something was written into them, so untouched regions cost nothing,
// read as zeroes and report as holes.
//
// Pages are slots in 1 MiB slabs, and the page table maps a page index to a
// slot number: no JS object per page. That keeps the garbage collector's
// work independent of how much is stored, and first-touch writes cheap.
// Pages written in order get consecutive slots, so sequential I/O copies
// whole runs of pages at once.
//
//   slot = slab * PAGES_PER_SLAB + index in slab      (freed slots are reused)
//
// 4 KiB pages keep memory proportional to what was written even for random
// 4k writes across a large export.
//
// Zero-copy reads (readViews) hand out views of the slabs themselves, which
// sit in the socket's write queue until the kernel has them. So a page a view
// covers is *held* until the view is released, and a held page never changes:
//
//   write / partial zero to a held page  -> copy on write: a new slot takes the
//                                           page's place, the old one is retired
//   trim / zero of a whole held page     -> dropped from the table, retired
//   retired slot, last hold released     -> free, reusable
//
// Free slots are only ever unheld ones, so a view never shows another
// offset's data, nor a mix of two instants.
//
// Zero-copy writes (writeTarget) go the other way: a large WRITE's payload is
// read from the socket straight into *reserved* slots, which are in no table
// and on no free list, so nothing can see them. Its commit, in the order
// writes apply, swaps them into the table:
//
//   reserve  n slots (free ones first), sorted into runs of consecutive slots;
//            too many runs: sort the free list by address (if anything was freed since it
//            last was), try again; still too many: the lowest window of the sorted list
//            that makes few runs
//   commit   the pages' bytes outside the write come from the current pages,
//            the reserved slots replace the old ones, which go like a trim's
//            (free, or retired while a view holds them), then the bytes that
//            came with the header are written the usual way
//   abort    the reserved slots are free again; the volume never changed
//   hold     the reserved slots get a view's holds: after the commit they are pages like any
//            held one (a write copies on write, a trim retires), an abort retires them, and the
//            release frees what is retired (a sync pair writes its mirrors from them meanwhile)
import { BlockDeviceError, type BlockDevice, type Extent, type Payload, type ReadViews, type WriteTarget, type ZeroOptions } from './types.js';
import { State } from '../protocol/constants.js';

const PAGE_SHIFT = 12;
const PAGE = 1 << PAGE_SHIFT;
const SLAB_SHIFT = 8; // 256 pages = 1 MiB per slab
const PAGES_PER_SLAB = 1 << SLAB_SHIFT;
const MAX_EXTENTS = 1 << 16;
const HOLE = State.HOLE | State.ZERO;
/**
 * A write target in more runs than one per this many pages is refused (the caller copies): each
 * run is a socket read of its own, and reads of a page or two cost more than the copy they save.
 */
const PAGES_PER_RUN = 16;
/**
 * Reserved slots of all open write targets, at most: a slab once made is never given back, so
 * clients that start large WRITEs and never finish them (or many at once) must not grow the store
 * past this. Beyond it the payload goes to a pooled buffer, which the garbage collector can take.
 */
const MAX_RESERVED_PAGES = (64 * 1024 * 1024) >>> PAGE_SHIFT;
/** A free list longer than this (64 MiB of slots) is not sorted for a write target: the sort would cost more than the copy. */
const MAX_SORTED_FREE = 16384;
/** What holes read as in views: never written. */
const ZEROES = Buffer.alloc(PAGES_PER_SLAB * PAGE);

const CHUNK = 1024; // pages per chunk of the page table: 4 MiB of the device

/**
 * Page index -> slot, in two levels: chunks of 1024 entries (an Int32Array of slot + 1, 0 for
 * none), made when a page of theirs is first set, found through a Map of chunk numbers with the
 * last one used at hand (I/O goes through a chunk's pages in order). A Map of pages did this
 * before, and its hash lookups were most of the store's own time on large I/O (a 4 MiB write
 * commits 1024 pages, a 4 MiB read looks up as many): 17 % of a serving process under xfer's
 * 4 MiB segments, and about 50 bytes of heap per page stored. Memory stays proportional to what
 * is written, whatever the device's size: 4 KiB per 4 MiB chunk touched.
 */
class PageTable {
  private readonly chunks = new Map<number, Int32Array>();
  private lastIndex = -1;
  private last: Int32Array | undefined;
  size = 0;

  private chunk(ci: number): Int32Array | undefined {
    if (ci !== this.lastIndex) {
      this.lastIndex = ci;
      this.last = this.chunks.get(ci);
    }
    return this.last;
  }

  get(pi: number): number | undefined {
    const ci = Math.floor(pi / CHUNK);
    const v = this.chunk(ci)?.[pi - ci * CHUNK] ?? 0;
    return v === 0 ? undefined : v - 1;
  }

  has(pi: number): boolean {
    const ci = Math.floor(pi / CHUNK);
    return (this.chunk(ci)?.[pi - ci * CHUNK] ?? 0) !== 0;
  }

  set(pi: number, slot: number): void {
    const ci = Math.floor(pi / CHUNK);
    let c = this.chunk(ci);
    if (c === undefined) {
      c = new Int32Array(CHUNK);
      this.chunks.set(ci, c);
      this.last = c;
    }
    const i = pi - ci * CHUNK;
    if (c[i] === 0) this.size++;
    c[i] = slot + 1;
  }

  delete(pi: number): void {
    const ci = Math.floor(pi / CHUNK);
    const c = this.chunk(ci);
    const i = pi - ci * CHUNK;
    if (c === undefined || c[i] === 0) return;
    c[i] = 0;
    this.size--;
  }

  clear(): void {
    this.chunks.clear();
    this.lastIndex = -1;
    this.last = undefined;
    this.size = 0;
  }
}

/**
 * The runs of consecutive slots in one slab of `slots` (in address order), as [first index,
 * count]...; null when there are more than one per PAGES_PER_RUN pages: each run is a socket read
 * of its own.
 */
function runsOf(slots: Int32Array): number[] | null {
  const n = slots.length;
  const runs: number[] = [0, 1];
  for (let i = 1; i < n; i++) {
    if (slots[i] === slots[i - 1]! + 1 && (slots[i]! & (PAGES_PER_SLAB - 1)) !== 0) runs[runs.length - 1]!++;
    else runs.push(i, 1);
  }
  return runs.length / 2 <= 1 + Math.floor(n / PAGES_PER_RUN) ? runs : null;
}

export class MemoryDevice implements BlockDevice {
  readonly multiConnSafe = true; // one store shared by every connection, no cache
  readonly fastZero = true;
  private readonly table = new PageTable();
  private readonly slabs: Buffer[] = [];
  private readonly freeSlots: number[] = [];
  private nextSlot = 0;
  /** Per slab, the views holding each of its slots. */
  private holds: Int32Array[] = [];
  /** Sum of all holds: 0 keeps writes on their fast path. */
  private holding = 0;
  /** Slots out of the table that wait for their holds to drop before they are free. */
  private readonly retired = new Set<number>();
  /** Slots of write targets not yet committed or aborted. */
  private reserved = 0;
  /**
   * Whether the free list is in address order (lowest on top) since writeTarget last sorted it: a
   * slot freed since then may be anywhere. Putting back what reserveRuns popped keeps the order.
   */
  private freeSorted = true;
  /** Bumped by close(): a target from before cannot commit into the emptied store. */
  private generation = 0;

  constructor(
    readonly size: number,
    readonly readOnly = false,
  ) {}

  /** Bytes of page storage in use (for tests and stats). */
  get allocatedBytes(): number {
    return this.table.size * PAGE;
  }

  /** Page holds of views not yet released, in bytes (tests). */
  get heldBytes(): number {
    return this.holding * PAGE;
  }

  /** Pages out of the table that views still hold (tests). */
  get retiredBytes(): number {
    return this.retired.size * PAGE;
  }

  /** Slots of write targets not yet committed or aborted, in bytes (tests). */
  get reservedBytes(): number {
    return this.reserved * PAGE;
  }

  /** Free slots, in bytes: with the table's, the retired and the reserved ones, storeBytes (tests). */
  get freeBytes(): number {
    return this.freeSlots.length * PAGE;
  }

  /** Free slots that a view still holds, in bytes: always 0, or a view could show another offset's data (tests). */
  get heldFreeBytes(): number {
    let n = 0;
    for (const slot of this.freeSlots) if (this.held(slot)) n++;
    return n * PAGE;
  }

  /** Every slot the slabs hold, in bytes (tests). */
  get storeBytes(): number {
    return this.nextSlot * PAGE;
  }

  async read(offset: number, dest: Buffer): Promise<void> {
    this.readSync(offset, dest);
  }

  /** Synchronous read: the memory device never waits. */
  readSync(offset: number, dest: Buffer): void {
    let done = 0;
    const n = dest.length;
    while (done < n) {
      const pos = offset + done;
      const pi = Math.floor(pos / PAGE);
      const inPage = pos - pi * PAGE;
      const slot = this.table.get(pi);
      if (slot === undefined) {
        // A run of missing pages reads as zeroes in one fill.
        let end = (pi + 1) * PAGE;
        while (end < offset + n && !this.table.has(end / PAGE)) end += PAGE;
        const k = Math.min(end - pos, n - done);
        dest.fill(0, done, done + k);
        done += k;
        continue;
      }
      const k = Math.min(this.runBytes(pi, slot, offset + n) - inPage, n - done);
      const slab = this.slabs[slot >>> SLAB_SHIFT]!;
      const at = ((slot & (PAGES_PER_SLAB - 1)) << PAGE_SHIFT) + inPage;
      slab.copy(dest, done, at, at + k);
      done += k;
    }
  }

  /** Bytes from the start of page pi that sit contiguously in one slab (up to byte `limit` of the device). */
  private runBytes(pi: number, slot: number, limit: number): number {
    let len = PAGE;
    let p = pi + 1;
    let s = slot + 1;
    while (p * PAGE < limit && (s & (PAGES_PER_SLAB - 1)) !== 0 && this.table.get(p) === s) {
      len += PAGE;
      p++;
      s++;
    }
    return len;
  }

  /** Views of the slabs themselves (no copy); the pages they cover stay unchanged until release(). */
  readViews(offset: number, length: number): ReadViews {
    const pieces: Buffer[] = [];
    /** Held runs of slots: first slot, count, first slot, count... */
    const runs: number[] = [];
    let done = 0;
    while (done < length) {
      const pos = offset + done;
      const pi = Math.floor(pos / PAGE);
      const inPage = pos - pi * PAGE;
      const slot = this.table.get(pi);
      if (slot === undefined) {
        let end = (pi + 1) * PAGE;
        while (end < offset + length && !this.table.has(end / PAGE)) end += PAGE;
        const k = Math.min(end - pos, length - done, ZEROES.length);
        pieces.push(ZEROES.subarray(0, k));
        done += k;
        continue;
      }
      const k = Math.min(this.runBytes(pi, slot, offset + length) - inPage, length - done);
      const at = ((slot & (PAGES_PER_SLAB - 1)) << PAGE_SHIFT) + inPage;
      pieces.push(this.slabs[slot >>> SLAB_SHIFT]!.subarray(at, at + k));
      const count = ((inPage + k - 1) >>> PAGE_SHIFT) + 1;
      const holds = this.holds[slot >>> SLAB_SHIFT]!;
      for (let i = 0; i < count; i++) holds[(slot + i) & (PAGES_PER_SLAB - 1)]!++;
      this.holding += count;
      runs.push(slot, count);
      done += k;
    }
    return this.viewsOf(pieces, runs);
  }

  /**
   * `pieces` as views whose release (once; later calls do nothing) drops the holds on `runs`
   * (first slot, count, first slot, count...). After a close() it drops nothing: the store has new
   * slabs under the same numbers.
   */
  private viewsOf(pieces: Buffer[], runs: number[]): ReadViews {
    const generation = this.generation;
    let released = false;
    return {
      pieces,
      release: () => {
        if (released) return;
        released = true;
        if (generation !== this.generation) return;
        for (let r = 0; r < runs.length; r += 2) this.unhold(runs[r]!, runs[r + 1]!);
      },
    };
  }

  private unhold(first: number, count: number): void {
    const holds = this.holds[first >>> SLAB_SHIFT];
    if (!holds) return; // closed meanwhile
    this.holding -= count;
    for (let s = first; s < first + count; s++) {
      if (--holds[s & (PAGES_PER_SLAB - 1)]! === 0 && this.retired.delete(s)) this.freeSlot(s);
    }
  }

  /** Does a view hold any of `count` consecutive slots from `first` (one slab's)? */
  private anyHeld(first: number, count: number): boolean {
    const holds = this.holds[first >>> SLAB_SHIFT]!;
    for (let i = 0; i < count; i++) if (holds[(first + i) & (PAGES_PER_SLAB - 1)]! > 0) return true;
    return false;
  }

  private held(slot: number): boolean {
    return this.holds[slot >>> SLAB_SHIFT]![slot & (PAGES_PER_SLAB - 1)]! > 0;
  }

  /**
   * Page pi is about to change: if a view holds its slot, give the page a new slot (with the old
   * bytes when `keep`, i.e. the change covers part of the page) and retire the old one.
   */
  private unshare(pi: number, slot: number, keep: boolean): number {
    if (this.holding === 0 || !this.held(slot)) return slot;
    const fresh = this.allocate(pi, false);
    if (keep) this.slotBytes(slot).copy(this.slotBytes(fresh));
    this.retired.add(slot);
    return fresh;
  }

  /** Take page pi out of the table: its slot is free now, or once no view holds it. */
  private drop(pi: number, slot: number): void {
    this.table.delete(pi);
    if (this.holding > 0 && this.held(slot)) this.retired.add(slot);
    else this.freeSlot(slot);
  }

  async write(offset: number, data: Payload): Promise<void> {
    this.writeSync(offset, data);
  }

  writeSync(offset: number, data: Payload): void {
    if (this.readOnly) throw new BlockDeviceError('EPERM', 'write: read-only device');
    if (Buffer.isBuffer(data)) {
      this.writePiece(offset, data);
      return;
    }
    let at = offset;
    for (const piece of data) {
      this.writePiece(at, piece);
      at += piece.length;
    }
  }

  private writePiece(offset: number, data: Buffer): void {
    let done = 0;
    const n = data.length;
    while (done < n) {
      const pos = offset + done;
      const pi = Math.floor(pos / PAGE);
      const inPage = pos - pi * PAGE;
      let slot = this.table.get(pi);
      // A whole-page write needs no zero fill; a partial one into a new page does.
      if (slot === undefined) slot = this.allocate(pi, inPage !== 0 || n - done < PAGE);
      let k = Math.min(this.runBytes(pi, slot, offset + n) - inPage, n - done);
      if (this.holding > 0 && this.anyHeld(slot, ((inPage + k - 1) >>> PAGE_SHIFT) + 1)) {
        // A view holds a page of this run: one page at a time, each held one copied on write.
        k = Math.min(PAGE - inPage, n - done);
        slot = this.unshare(pi, slot, k < PAGE);
      }
      const slab = this.slabs[slot >>> SLAB_SHIFT]!;
      data.copy(slab, ((slot & (PAGES_PER_SLAB - 1)) << PAGE_SHIFT) + inPage, done, done + k);
      done += k;
    }
  }

  private allocate(pi: number, zeroFill: boolean): number {
    const slot = this.freeSlots.pop() ?? this.newSlot();
    if (zeroFill) this.slotBytes(slot).fill(0);
    this.table.set(pi, slot);
    return slot;
  }

  private newSlot(): number {
    const slot = this.nextSlot++;
    if ((slot & (PAGES_PER_SLAB - 1)) === 0) {
      this.slabs.push(Buffer.allocUnsafeSlow(PAGES_PER_SLAB * PAGE));
      this.holds.push(new Int32Array(PAGES_PER_SLAB));
    }
    return slot;
  }

  /**
   * Reserved slots for the pages of [offset+from, offset+length), for the socket to read the
   * payload's rest into (WriteTarget); null when read-only, when open targets already hold
   * MAX_RESERVED_PAGES, or when the free slots are too scattered to make few runs.
   */
  writeTarget(offset: number, length: number, from: number): WriteTarget | null {
    if (this.readOnly || from >= length) return null;
    const start = offset + from;
    const end = offset + length;
    const p0 = Math.floor(start / PAGE);
    const n = Math.ceil(end / PAGE) - p0;
    if (this.reserved + n > MAX_RESERVED_PAGES) return null;
    const slots = new Int32Array(n);
    let runs = this.reserveRuns(slots);
    if (!runs && this.freeSlots.length <= MAX_SORTED_FREE) {
      if (!this.freeSorted) {
        // Scattered free slots (trims, pages retired under views): in address order, from the
        // top of the stack, the next pops come in runs wherever the free slots have them.
        const sorted = Int32Array.from(this.freeSlots).sort();
        for (let i = 0; i < sorted.length; i++) this.freeSlots[i] = sorted[sorted.length - 1 - i]!;
        this.freeSorted = true;
        runs = this.reserveRuns(slots);
      }
      // The lowest free slots are the scattered ones: slots in runs from further down the list.
      runs ??= this.reserveWindow(slots);
    }
    if (!runs) return null;
    this.reserved += n;
    const pieces: Buffer[] = [];
    for (let r = 0; r < runs.length; r += 2) {
      const first = slots[runs[r]!]!;
      const at = (first & (PAGES_PER_SLAB - 1)) << PAGE_SHIFT;
      const slab = this.slabs[first >>> SLAB_SHIFT]!;
      // The first run starts at the write's byte in its page, the last ends at the write's end.
      const skip = r === 0 ? start - p0 * PAGE : 0;
      const bytes = runs[r + 1]! * PAGE - skip - (r === runs.length - 2 ? (p0 + n) * PAGE - end : 0);
      pieces.push(slab.subarray(at + skip, at + skip + bytes));
    }
    const generation = this.generation;
    let used = false;
    return {
      pieces,
      commit: async (head: Payload): Promise<void> => {
        if (used) throw new BlockDeviceError('EINVAL', 'write: this write target was already used');
        used = true;
        if (generation !== this.generation) throw new BlockDeviceError('EIO', 'write: the device was closed');
        this.reserved -= n;
        this.commitPages(offset, start, end, slots);
        this.writeSync(offset, head);
      },
      abort: (): void => {
        if (used) return;
        used = true;
        if (generation !== this.generation) return;
        this.reserved -= n;
        for (let i = n - 1; i >= 0; i--) {
          const slot = slots[i]!;
          if (this.holding > 0 && this.held(slot)) this.retired.add(slot);
          else this.freeSlot(slot);
        }
      },
      hold: (): ReadViews => {
        // The reserved slots held like a view's pages: once committed, a write or trim over them
        // retires them rather than reuses them; aborted, they wait in `retired` for the release.
        if (generation !== this.generation) return { pieces, release: () => {} };
        const runs: number[] = [];
        for (let i = 0; i < n; i++) {
          this.holds[slots[i]! >>> SLAB_SHIFT]![slots[i]! & (PAGES_PER_SLAB - 1)]!++;
          runs.push(slots[i]!, 1);
        }
        this.holding += n;
        return this.viewsOf(pieces, runs);
      },
    };
  }

  /**
   * Fill `slots` with slots taken off the free list (new ones when it runs out), in address
   * order, and return their runs of consecutive slots in one slab ([first index, count]...); or
   * put them back and return null when there would be more runs than one per PAGES_PER_RUN pages.
   */
  private reserveRuns(slots: Int32Array): number[] | null {
    const n = slots.length;
    let k = 0;
    while (k < n && this.freeSlots.length > 0) slots[k++] = this.freeSlots.pop()!;
    while (k < n) slots[k++] = this.newSlot();
    slots.sort();
    const runs = runsOf(slots);
    if (runs) return runs;
    for (let i = n - 1; i >= 0; i--) this.freeSlots.push(slots[i]!);
    return null;
  }

  /**
   * With the free list in address order and its lowest slots too scattered: the lowest `slots.length`
   * consecutive entries of the list that make few enough runs, taken out of it; or, when the list
   * is shorter than that, new slots (one run per slab). Without this, a few scattered slots on top
   * refused every write target until something else changed the list, which a store taking only
   * copied writes never does: after an xfer transfer, 3957 and then all 4096 of an nbdcopy's
   * targets were refused, for good.
   */
  private reserveWindow(slots: Int32Array): number[] | null {
    const n = slots.length;
    const free = this.freeSlots;
    if (free.length < n) {
      for (let i = 0; i < n; i++) slots[i] = this.newSlot();
      return runsOf(slots);
    }
    const limit = 1 + Math.floor(n / PAGES_PER_RUN);
    // free[k] and free[k - 1] are apart (not consecutive slots of one slab): a new run starts.
    const apart = (k: number) => free[k - 1] !== free[k]! + 1 || (free[k - 1]! & (PAGES_PER_SLAB - 1)) === 0;
    // The window is free[j - n + 1 .. j], lowest slot at j; its runs are 1 + the breaks inside.
    let j = free.length - 1;
    let breaks = 0;
    for (let k = j; k > j - n + 1; k--) if (apart(k)) breaks++;
    for (;;) {
      if (1 + breaks <= limit) break;
      if (j - n < 0) return null;
      // Slide one entry up the addresses: drop the pair at the bottom, add the one at the top.
      if (apart(j)) breaks--;
      j--;
      if (apart(j - n + 2)) breaks++;
    }
    const taken = free.splice(j - n + 1, n);
    for (let i = 0; i < n; i++) slots[i] = taken[n - 1 - i]!;
    return runsOf(slots);
  }

  /** A slot back on the free list: the list may be out of address order now. */
  private freeSlot(slot: number): void {
    this.freeSlots.push(slot);
    this.freeSorted = false;
  }

  /**
   * The reserved `slots`, whose bytes [start, end) hold the payload, become pages
   * floor(start/PAGE)... The rest of the first and last pages comes from the current pages,
   * except what the payload's head (from `offset`) is about to overwrite anyway.
   */
  private commitPages(offset: number, start: number, end: number, slots: Int32Array): void {
    const p0 = Math.floor(start / PAGE);
    const n = slots.length;
    const keepFrom = p0 * PAGE;
    const keepTo = Math.min(Math.max(offset, keepFrom), start);
    if (keepTo > keepFrom) this.readSync(keepFrom, this.slotBytes(slots[0]!).subarray(0, keepTo - keepFrom));
    const tail = end - (p0 + n - 1) * PAGE;
    if (tail < PAGE) this.readSync(end, this.slotBytes(slots[n - 1]!).subarray(tail));
    for (let i = 0; i < n; i++) {
      const old = this.table.get(p0 + i);
      this.table.set(p0 + i, slots[i]!);
      if (old === undefined) continue;
      if (this.holding > 0 && this.held(old)) this.retired.add(old);
      else this.freeSlot(old);
    }
  }

  private slotBytes(slot: number): Buffer {
    const at = (slot & (PAGES_PER_SLAB - 1)) << PAGE_SHIFT;
    return this.slabs[slot >>> SLAB_SHIFT]!.subarray(at, at + PAGE);
  }

  async flush(): Promise<void> {}

  async trim(offset: number, length: number): Promise<void> {
    this.zeroSync(offset, length, false);
  }

  async zero(offset: number, length: number, opts: ZeroOptions = {}): Promise<void> {
    this.zeroSync(offset, length, opts.noHole === true);
  }

  private zeroSync(offset: number, length: number, keepAllocated: boolean): void {
    if (this.readOnly) throw new BlockDeviceError('EPERM', 'zero: read-only device');
    const end = offset + length;
    let pos = offset;
    while (pos < end) {
      const pi = Math.floor(pos / PAGE);
      const inPage = pos - pi * PAGE;
      const k = Math.min(PAGE - inPage, end - pos);
      const slot = this.table.get(pi);
      if (slot !== undefined && k === PAGE && !keepAllocated) this.drop(pi, slot);
      else if (slot !== undefined) this.slotBytes(this.unshare(pi, slot, k < PAGE)).fill(0, inPage, inPage + k);
      else if (keepAllocated) this.allocate(pi, true);
      pos += k;
    }
  }

  async extents(offset: number, length: number): Promise<Extent[]> {
    const out: Extent[] = [];
    const end = offset + length;
    let pos = offset;
    while (pos < end && out.length < MAX_EXTENTS) {
      const pi = Math.floor(pos / PAGE);
      const k = Math.min((pi + 1) * PAGE, end) - pos;
      const flags = this.table.has(pi) ? 0 : HOLE;
      const last = out[out.length - 1];
      if (last && last.flags === flags) last.length += k;
      else out.push({ length: k, flags });
      pos += k;
    }
    return out;
  }

  async close(): Promise<void> {
    this.table.clear();
    this.slabs.length = 0;
    this.freeSlots.length = 0;
    // Views still out keep their slabs alive (they are plain Buffers) and release into nothing.
    this.holds = [];
    this.holding = 0;
    this.retired.clear();
    this.reserved = 0;
    this.nextSlot = 0;
    this.generation++;
  }
}

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
//            that makes few runs; no such window (pages first written in random order, then
//            rewritten): *compact*, i.e. empty the slabs with the most free slots by moving
//            their unheld pages to free slots elsewhere, and take those slabs whole
//   commit   the pages' bytes outside the write come from the current pages,
//            the reserved slots replace the old ones, which go like a trim's
//            (free, or retired while a view holds them), then the bytes that
//            came with the header are written the usual way
//   abort    the reserved slots are free again; the volume never changed
//   hold     the reserved slots get a view's holds: after the commit they are pages like any
//            held one (a write copies on write, a trim retires), an abort retires them, and the
//            release frees what is retired (a sync pair writes its mirrors from them meanwhile)
//
// The memory volumes of one storage system share one SlabPool, and a page one of them hands to
// another is shared, not copied: a sync pair's master writes its mirror in the same storage system
// from its held pages, and the mirror's table takes those very slots (*adopted*), each adoption
// counted as a hold. Only whole pages of a slab that something holds, and that nothing adopted yet,
// are adopted (their bytes cannot change under the mirror); anything else is copied.
//
// Each volume takes its slots from its own *arena*, the slabs it made, and a freed slot goes back
// to its slab's arena whoever held it last. So a volume's slots stay together whatever the others
// do, and the runs its large writes need come back (on one free list for all, the two tables of a
// pair took their slots alternately, and after small writes 249 of 256 later 1 MiB targets were
// refused). A closed volume's arena waits for the next volume, and once none of its slots is used
// any more (another volume may have adopted some), its slabs go and their numbers are reused.
//
//   adopt    the page's old slot is released (freed, retired, or unheld if it was adopted),
//            the source slot gets a hold and its adopter's mark (volume and page), the table
//            marks the page adopted
//   change   of an adopted page: copy on write from the volume's own arena (the owner keeps its
//            page); of an owned page that only an adoption holds: *evict*, the adopter gets a
//            copy from its own arena and the owner writes in place, so the master's runs survive
//            a sync pair's small writes; of an owned page a view holds: copy on write, as ever
//   release  of an adopted page: unhold; of an owned one: retired while held, else free
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
 * Reserved slots of all open write targets, at most: a slab once made stays while its volume lives, so
 * clients that start large WRITEs and never finish them (or many at once) must not grow the store
 * past this. Beyond it the payload goes to a pooled buffer, which the garbage collector can take.
 */
const MAX_RESERVED_PAGES = (64 * 1024 * 1024) >>> PAGE_SHIFT;
/** Slabs beyond those a write target needs that reserveCompacted looks at before it gives up. */
const MAX_COMPACT_TRIES = 8;
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
    return v === 0 ? undefined : (v >>> 1) - 1;
  }

  /** Page pi's entry as stored: 0 for none, else (slot + 1) << 1 | adopted. */
  raw(pi: number): number {
    const ci = Math.floor(pi / CHUNK);
    return this.chunk(ci)?.[pi - ci * CHUNK] ?? 0;
  }

  /** Is page pi's slot adopted from another table (held on its behalf), not owned? */
  adopted(pi: number): boolean {
    return (this.raw(pi) & 1) === 1;
  }

  /** Every page, its slot and whether it is adopted (close, audit). */
  *entries(): Generator<[page: number, slot: number, adopted: boolean]> {
    for (const [ci, c] of this.chunks) {
      for (let i = 0; i < CHUNK; i++) if (c[i] !== 0) yield [ci * CHUNK + i, (c[i]! >>> 1) - 1, (c[i]! & 1) === 1];
    }
  }

  has(pi: number): boolean {
    const ci = Math.floor(pi / CHUNK);
    return (this.chunk(ci)?.[pi - ci * CHUNK] ?? 0) !== 0;
  }

  set(pi: number, slot: number, adopted = false): void {
    const ci = Math.floor(pi / CHUNK);
    let c = this.chunk(ci);
    if (c === undefined) {
      c = new Int32Array(CHUNK);
      this.chunks.set(ci, c);
      this.last = c;
    }
    const i = pi - ci * CHUNK;
    if (c[i] === 0) this.size++;
    c[i] = ((slot + 1) << 1) | (adopted ? 1 : 0);
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

/** Slots out of every table that wait for their holds to drop: a flag per slot, no hashing (a 1 MiB commit retires 256). */
class RetiredSlots {
  private flags: Uint8Array[] = [];
  size = 0;

  add(slot: number): void {
    const si = slot >>> SLAB_SHIFT;
    const f = (this.flags[si] ??= new Uint8Array(PAGES_PER_SLAB));
    const i = slot & (PAGES_PER_SLAB - 1);
    if (f[i] === 0) {
      f[i] = 1;
      this.size++;
    }
  }

  has(slot: number): boolean {
    return this.flags[slot >>> SLAB_SHIFT]?.[slot & (PAGES_PER_SLAB - 1)] === 1;
  }

  /** Was `slot` retired? It is not any more. */
  delete(slot: number): boolean {
    const f = this.flags[slot >>> SLAB_SHIFT];
    const i = slot & (PAGES_PER_SLAB - 1);
    if (f === undefined || f[i] === 0) return false;
    f[i] = 0;
    this.size--;
    return true;
  }

  clear(): void {
    this.flags = [];
    this.size = 0;
  }
}

/**
 * One volume's part of a pool: the slabs it made, whose slots it takes, and whose freed slots come
 * back to it, whoever held them last. So each volume's slots stay together in its own slabs,
 * whatever the others do, and its freed slots make runs again.
 */
class Arena {
  readonly freeSlots: number[] = [];
  /**
   * Whether the free list is in address order (lowest on top) since writeTarget last sorted it: a
   * slot freed since then may be anywhere. Putting back what reserveRuns popped keeps the order.
   */
  freeSorted = true;
  /** The next slot of its last slab never handed out; -1, or the first slot after that slab, when it needs a new one. */
  next = -1;
  /** Slots handed out by newSlot, ever. */
  made = 0;
  /** Its volume; null once that closed (the next volume made on the pool takes the arena). */
  device: MemoryDevice | null = null;
  /** The slabs it made. */
  readonly slabs: number[] = [];
}

/** Where a slab given back was (its number waits for a new slab). */
const NO_SLAB = Buffer.alloc(0);

/**
 * Slabs and slots, shared by the memory volumes of one storage system (or one volume's own): the
 * slot numbers of every table on it mean the same pages, so one can adopt another's. Each slab
 * belongs to one volume's arena.
 */
export class SlabPool {
  readonly slabs: Buffer[] = [];
  /** Per slab, the arena it belongs to. */
  private readonly arenaOf: Arena[] = [];
  /** Per slab, how many of its slots were handed out. */
  private readonly made: number[] = [];
  private readonly arenas: Arena[] = [];
  /** Per slab, the holds on each of its slots: views, held write targets, and adoptions. */
  holds: Int32Array[] = [];
  /**
   * Per slab, the volume that adopted each slot (its id + 1; 0: none) and the page it did so at:
   * a slot is adopted once at most, so its owner can give the adopter a copy of its own and
   * write in place instead of copying on write (MemoryDevice.unshare).
   */
  adopter: Int32Array[] = [];
  adopterPage: Float64Array[] = [];
  /**
   * Per slab, the page each slot was last placed at by the table that owns it (MemoryDevice.place):
   * right while that table maps the page to the slot, which is how compaction finds a slot's page.
   */
  pageOf: Float64Array[] = [];
  /** Sum of all holds: 0 keeps writes on their fast path. */
  holding = 0;
  /** Slots in no table that wait for their holds to drop before they are free. */
  readonly retired = new RetiredSlots();
  /** Holds that are adoptions (a table's page on another's slot), not views or targets. */
  adoptions = 0;
  /** Adopted pages given their own copy so that their owner could write in place (stats, tests). */
  evictions = 0;
  /** Write targets made of slabs emptied by moving their pages, on every volume of the pool (stats). */
  compactions = 0;
  /** The volumes whose tables use these slots, by id (adoption, audit). */
  readonly devices: (MemoryDevice | undefined)[] = [];
  private readonly slabIndex = new Map<ArrayBufferLike, number>();
  /** Numbers of slabs given back, for new ones. */
  private readonly deadSlabs: number[] = [];

  /** Bytes of the slabs alive (tests, stats): the pool's memory. */
  get slabBytes(): number {
    return (this.slabs.length - this.deadSlabs.length) * PAGES_PER_SLAB * PAGE;
  }

  /** Bytes of pages one volume has adopted from another: memory shared instead of copied (stats). */
  get sharedBytes(): number {
    return this.adoptions * PAGE;
  }

  /** A volume joins: its id, and an arena (one whose volume closed, or a new one). */
  join(device: MemoryDevice): { id: number; arena: Arena } {
    let id = this.devices.indexOf(undefined);
    if (id < 0) id = this.devices.length;
    this.devices[id] = device;
    let arena = this.arenas.find((a) => a.device === null);
    if (!arena) this.arenas.push((arena = new Arena()));
    arena.device = device;
    return { id, arena };
  }

  /**
   * A volume leaves (closed, its pages given back): its arena waits for the next one, and its
   * slabs go once none of their slots is used any more (another volume may still have adopted
   * some, or a view hold them).
   */
  leave(id: number, arena: Arena): void {
    this.devices[id] = undefined;
    arena.device = null;
    this.dropIfIdle(arena);
  }

  /**
   * An arena without a volume whose every slot is free: its slabs go (the garbage collector takes
   * them), and their numbers wait for new slabs. Nothing holds or adopts a free slot, so nothing
   * can still read them. Without this, a removed memory volume's memory stayed with the pool.
   */
  private dropIfIdle(arena: Arena): void {
    if (arena.device !== null || arena.freeSlots.length !== arena.made) return;
    for (const si of arena.slabs) {
      this.slabIndex.delete(this.slabs[si]!.buffer);
      this.slabs[si] = NO_SLAB;
      this.made[si] = 0;
      this.deadSlabs.push(si);
    }
    arena.slabs.length = 0;
    arena.freeSlots.length = 0;
    arena.freeSorted = true;
    arena.made = 0;
    arena.next = -1;
  }

  /** A slot never used before, from `arena`'s last slab, or a new slab's first. */
  newSlot(arena: Arena): number {
    if (arena.next < 0 || (arena.next & (PAGES_PER_SLAB - 1)) === 0) {
      const slab = Buffer.allocUnsafeSlow(PAGES_PER_SLAB * PAGE);
      // A dead slab's number: its holds and adoption marks are all 0 (its slots were free).
      let si = this.deadSlabs.pop();
      if (si === undefined) {
        si = this.slabs.length;
        this.slabs.push(slab);
        this.holds.push(new Int32Array(PAGES_PER_SLAB));
        this.adopter.push(new Int32Array(PAGES_PER_SLAB));
        this.adopterPage.push(new Float64Array(PAGES_PER_SLAB));
        this.pageOf.push(new Float64Array(PAGES_PER_SLAB));
        this.arenaOf.push(arena);
        this.made.push(0);
      } else {
        this.slabs[si] = slab;
        this.arenaOf[si] = arena;
      }
      this.slabIndex.set(slab.buffer, si);
      arena.slabs.push(si);
      arena.next = si << SLAB_SHIFT;
    }
    this.made[arena.next >>> SLAB_SHIFT]!++;
    arena.made++;
    return arena.next++;
  }

  /** Were all of slab si's slots handed out (none still waiting in its arena's last slab)? */
  complete(si: number): boolean {
    return this.made[si] === PAGES_PER_SLAB;
  }

  /** A slot back on its arena's free list, whoever had it last: the list may be out of address order now. */
  free(slot: number): void {
    const arena = this.arenaOf[slot >>> SLAB_SHIFT]!;
    arena.freeSlots.push(slot);
    arena.freeSorted = false;
    if (arena.device === null) this.dropIfIdle(arena);
  }

  /**
   * The slot whose page is bytes [at, at + PAGE) of `data`, if those are a whole page of one of
   * this pool's slabs that something holds (so they cannot change) and nothing adopted yet; else -1.
   */
  heldSlotAt(data: Buffer, at: number, si = this.slabIndex.get(data.buffer)): number {
    if (si === undefined) return -1;
    const byte = data.byteOffset + at;
    if ((byte & (PAGE - 1)) !== 0) return -1;
    const i = byte >>> PAGE_SHIFT;
    return this.holds[si]![i]! > 0 && this.adopter[si]![i] === 0 ? (si << SLAB_SHIFT) | i : -1;
  }

  /** The slab `data` is a view of, if one of this pool's. */
  slabOf(data: Buffer): number | undefined {
    return this.slabIndex.get(data.buffer);
  }

  /**
   * Every slot in exactly one place (one table that owns it, its arena's free list, retired, or
   * reserved by an open target), owned only by its arena's volume, adopted at most once and as
   * its adopter says, holds that cover the adoptions, no free slot held or adopted, no retired
   * one unheld: the problems found, none when the accounting is right (tests).
   */
  audit(): string[] {
    const problems: string[] = [];
    const owned = new Map<number, MemoryDevice>();
    const adopted = new Map<number, number>();
    let reserved = 0;
    for (const d of this.devices) {
      if (!d) continue;
      reserved += d.reservedBytes / PAGE;
      for (const [pi, slot, a] of d.pageSlots()) {
        if (a) {
          adopted.set(slot, (adopted.get(slot) ?? 0) + 1);
          const si = slot >>> SLAB_SHIFT;
          const i = slot & (PAGES_PER_SLAB - 1);
          if (this.devices[this.adopter[si]![i]! - 1] !== d || this.adopterPage[si]![i] !== pi) problems.push(`slot ${slot}: adopted at page ${pi}, but its adopter says ${this.adopter[si]![i]! - 1}:${this.adopterPage[si]![i]}`);
        } else {
          if (owned.has(slot)) problems.push(`slot ${slot}: owned twice`);
          if (this.pageOf[slot >>> SLAB_SHIFT]![slot & (PAGES_PER_SLAB - 1)] !== pi) problems.push(`slot ${slot}: owned at page ${pi}, but placed at ${this.pageOf[slot >>> SLAB_SHIFT]![slot & (PAGES_PER_SLAB - 1)]}`);
          owned.set(slot, d);
          if (this.arenaOf[slot >>> SLAB_SHIFT]!.device !== d) problems.push(`slot ${slot}: owned by a volume not its arena's`);
        }
      }
    }
    const free = new Map<number, number>();
    for (const arena of this.arenas) {
      for (const slot of arena.freeSlots) {
        free.set(slot, (free.get(slot) ?? 0) + 1);
        if (this.arenaOf[slot >>> SLAB_SHIFT] !== arena) problems.push(`slot ${slot}: free in another arena`);
      }
    }
    let placeless = 0;
    let holdSum = 0;
    let adoptSum = 0;
    for (let si = 0; si < this.slabs.length; si++) {
      for (let i = 0; i < PAGES_PER_SLAB; i++) {
        const slot = (si << SLAB_SHIFT) | i;
        const h = this.holds[si]![i]!;
        const a = adopted.get(slot) ?? 0;
        const marked = this.adopter[si]![i]! !== 0 ? 1 : 0;
        if (i >= this.made[si]!) {
          if (h !== 0 || a !== 0 || marked !== 0 || owned.has(slot) || free.has(slot)) problems.push(`slot ${slot}: never made, but in use`);
          continue;
        }
        const o = owned.has(slot) ? 1 : 0;
        const f = free.get(slot) ?? 0;
        const r = this.retired.has(slot);
        holdSum += h;
        adoptSum += a;
        const places = o + (f > 0 ? 1 : 0) + (r ? 1 : 0);
        if (f > 1 || places > 1) problems.push(`slot ${slot}: owned ${o}, free ${f}, retired ${r}`);
        if (places === 0) placeless++;
        if (f > 0 && (h > 0 || a > 0)) problems.push(`slot ${slot}: free but held ${h}, adopted ${a}`);
        if (r && h === 0) problems.push(`slot ${slot}: retired but unheld`);
        if (h < a) problems.push(`slot ${slot}: ${a} adoptions but ${h} holds`);
        if (a !== marked) problems.push(`slot ${slot}: adopted ${a} times, marked ${marked}`);
      }
    }
    if (placeless !== reserved) problems.push(`${placeless} slots in no place, ${reserved} reserved`);
    if (holdSum !== this.holding) problems.push(`holds sum to ${holdSum}, holding says ${this.holding}`);
    if (adoptSum !== this.adoptions) problems.push(`${adoptSum} adopted pages, adoptions says ${this.adoptions}`);
    return problems;
  }

  /** Forget everything (a private pool's volume closed): views still out release into nothing. */
  reset(): void {
    this.adoptions = 0;
    this.slabs.length = 0;
    this.arenaOf.length = 0;
    this.made.length = 0;
    for (const a of this.arenas) {
      a.freeSlots.length = 0;
      a.freeSorted = true;
      a.next = -1;
      a.made = 0;
      a.slabs.length = 0;
    }
    this.deadSlabs.length = 0;
    this.slabIndex.clear();
    this.holds = [];
    this.adopter = [];
    this.adopterPage = [];
    this.pageOf = [];
    this.holding = 0;
    this.retired.clear();
  }
}

export class MemoryDevice implements BlockDevice {
  readonly multiConnSafe = true; // one store shared by every connection, no cache
  readonly fastZero = true;
  private readonly table = new PageTable();
  private readonly pool: SlabPool;
  /** On a pool of other volumes too: pages are adopted, and close() gives back only this table's. */
  private readonly shared: boolean;
  /** Its number on the pool (adopter marks) and the arena its slots come from and go back to. */
  private id: number;
  private arena: Arena;
  /** Closed while on a shared pool: it left the pool, and joins again if used. */
  private left = false;
  /** Slots of write targets not yet committed or aborted. */
  private reserved = 0;
  /** Write targets made of slabs emptied by moving their pages (reserveCompacted; tests, stats). */
  compactions = 0;
  /** Bumped by close(): a target from before cannot commit into the emptied store. */
  private generation = 0;

  constructor(
    readonly size: number,
    readonly readOnly = false,
    pool?: SlabPool,
  ) {
    this.pool = pool ?? new SlabPool();
    this.shared = pool !== undefined;
    ({ id: this.id, arena: this.arena } = this.pool.join(this));
  }

  /** Used again after close() on a shared pool: a place on it again. */
  private rejoin(): void {
    ({ id: this.id, arena: this.arena } = this.pool.join(this));
    this.left = false;
  }

  /** Does this volume share its pool (and adopt pages)? (tests) */
  get sharesPool(): boolean {
    return this.shared;
  }

  /** The pool's accounting problems, none when right (tests: SlabPool.audit). */
  auditPool(): string[] {
    return this.pool.audit();
  }

  /** Every page, its slot and whether it is adopted (SlabPool.audit). */
  pageSlots(): Iterable<[page: number, slot: number, adopted: boolean]> {
    return this.table.entries();
  }

  private get slabs(): Buffer[] {
    return this.pool.slabs;
  }

  private get holds(): Int32Array[] {
    return this.pool.holds;
  }

  private get freeSlots(): number[] {
    return this.arena.freeSlots;
  }

  private get retired(): RetiredSlots {
    return this.pool.retired;
  }

  private get holding(): number {
    return this.pool.holding;
  }

  private set holding(n: number) {
    this.pool.holding = n;
  }

  private get freeSorted(): boolean {
    return this.arena.freeSorted;
  }

  private set freeSorted(v: boolean) {
    this.arena.freeSorted = v;
  }

  /** Bytes of page storage in use (for tests and stats). */
  get allocatedBytes(): number {
    return this.table.size * PAGE;
  }

  /** Page holds of views and held write targets not yet released, in bytes, the pool's (tests). */
  get heldBytes(): number {
    return (this.holding - this.pool.adoptions) * PAGE;
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

  /** Every slot of this volume's arena, in bytes (tests). */
  get storeBytes(): number {
    return this.arena.made * PAGE;
  }

  /** Pages of this volume that are another table's slots, adopted, in bytes (tests). */
  get adoptedBytes(): number {
    let n = 0;
    for (const [, , adopted] of this.table.entries()) if (adopted) n++;
    return n * PAGE;
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
   * (first slot, count, first slot, count...). After a close() of a volume on its own pool it drops
   * nothing: the store has new slabs under the same numbers (a shared pool keeps its slabs).
   */
  private viewsOf(pieces: Buffer[], runs: number[]): ReadViews {
    const generation = this.generation;
    let released = false;
    return {
      pieces,
      release: () => {
        if (released) return;
        released = true;
        // A private pool emptied by close() has new slabs under the same numbers: nothing of ours there.
        if (generation !== this.generation && !this.shared) return;
        for (let r = 0; r < runs.length; r += 2) this.unhold(runs[r]!, runs[r + 1]!);
      },
    };
  }

  private unhold(first: number, count: number): void {
    const holds = this.holds[first >>> SLAB_SHIFT];
    if (!holds) return; // closed meanwhile
    this.holding -= count;
    for (let s = first; s < first + count; s++) {
      if (--holds[s & (PAGES_PER_SLAB - 1)]! === 0 && this.retired.delete(s)) this.pool.free(s);
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
    // An adopted page is held (by this table's own adoption): always copied on write. An owned
    // one that only an adoption holds stays: the adopter gets its own copy instead.
    const adopted = this.table.adopted(pi);
    if (!adopted && this.evict(slot)) return slot;
    const fresh = this.allocate(pi, false);
    if (keep) this.slotBytes(slot).copy(this.slotBytes(fresh));
    this.release(slot, adopted);
    return fresh;
  }

  /** Take page pi out of the table: its slot is free now, or once no view holds it. */
  private drop(pi: number, slot: number): void {
    const adopted = this.table.adopted(pi);
    this.table.delete(pi);
    this.release(slot, adopted);
  }

  /**
   * `slot`, this table's own, is about to change: if the one thing holding it is another table's
   * adoption, that table takes a copy of the page from its own arena, and this one keeps the slot
   * (where its neighbours are, so its runs survive). True when nothing holds the slot now.
   */
  private evict(slot: number): boolean {
    const si = slot >>> SLAB_SHIFT;
    const i = slot & (PAGES_PER_SLAB - 1);
    const by = this.pool.adopter[si]![i]!;
    if (by === 0 || this.holds[si]![i] !== 1) return false;
    const fresh = this.pool.devices[by - 1]!.allocate(this.pool.adopterPage[si]![i]!, false);
    this.slotBytes(slot).copy(this.slotBytes(fresh));
    this.release(slot, true); // the adoption's hold: the adopter's page is `fresh` now
    this.pool.evictions++;
    return true;
  }

  /** A table no longer has `slot`: an adopted one loses this table's hold; an owned one is retired while held, else free. */
  private release(slot: number, adopted: boolean): void {
    if (adopted) {
      this.pool.adoptions--;
      this.pool.adopter[slot >>> SLAB_SHIFT]![slot & (PAGES_PER_SLAB - 1)] = 0;
      this.unhold(slot, 1);
    }
    else if (this.holding > 0 && this.held(slot)) this.retired.add(slot);
    else this.pool.free(slot);
  }

  async write(offset: number, data: Payload): Promise<void> {
    this.writeSync(offset, data);
  }

  writeSync(offset: number, data: Payload): void {
    if (this.readOnly) throw new BlockDeviceError('EPERM', 'write: read-only device');
    if (this.left) this.rejoin();
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
    // A view of the pool's own slab (a held page of another volume): adopted page by page.
    const si = this.shared && this.holding > 0 && n >= PAGE ? this.pool.slabOf(data) : undefined;
    while (done < n) {
      const pos = offset + done;
      const pi = Math.floor(pos / PAGE);
      const inPage = pos - pi * PAGE;
      if (si !== undefined && inPage === 0 && n - done >= PAGE) {
        const src = this.pool.heldSlotAt(data, done, si);
        if (src >= 0) {
          this.adopt(pi, src);
          done += PAGE;
          continue;
        }
      }
      let slot = this.table.get(pi);
      // A whole-page write needs no zero fill; a partial one into a new page does.
      if (slot === undefined) slot = this.allocate(pi, inPage !== 0 || n - done < PAGE);
      let k = Math.min(this.runBytes(pi, slot, offset + n) - inPage, n - done);
      // From the pool's slabs: a page at a time, so the next whole held page is adopted, not copied.
      if (si !== undefined) k = Math.min(k, PAGE - inPage);
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

  /** Page pi becomes `src`, a held slot of the pool (another table's page, or a held write target's), without a copy. */
  private adopt(pi: number, src: number): void {
    const v = this.table.raw(pi);
    const old = (v >>> 1) - 1;
    if (old === src) return; // the page's own bytes, written onto it
    const si = src >>> SLAB_SHIFT;
    const i = src & (PAGES_PER_SLAB - 1);
    this.holds[si]![i]!++;
    this.holding++;
    this.pool.adoptions++;
    this.pool.adopter[si]![i] = this.id + 1;
    this.pool.adopterPage[si]![i] = pi;
    this.table.set(pi, src, true);
    if (v !== 0) this.release(old, (v & 1) === 1);
  }

  private allocate(pi: number, zeroFill: boolean): number {
    const slot = this.freeSlots.pop() ?? this.newSlot();
    if (zeroFill) this.slotBytes(slot).fill(0);
    this.place(pi, slot);
    return slot;
  }

  /** Page pi is `slot`, this table's own. */
  private place(pi: number, slot: number): void {
    this.table.set(pi, slot);
    this.pool.pageOf[slot >>> SLAB_SHIFT]![slot & (PAGES_PER_SLAB - 1)] = pi;
  }

  private newSlot(): number {
    return this.pool.newSlot(this.arena);
  }

  /**
   * Reserved slots for the pages of [offset+from, offset+length), for the socket to read the
   * payload's rest into (WriteTarget); null when read-only, when open targets already hold
   * MAX_RESERVED_PAGES, or when the free slots are too scattered to make few runs.
   */
  writeTarget(offset: number, length: number, from: number): WriteTarget | null {
    if (this.readOnly || from >= length) return null;
    if (this.left) this.rejoin();
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
      // No runs anywhere (pages first written in random order, then rewritten): empty whole slabs.
      runs ??= this.reserveCompacted(slots);
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
        if (generation !== this.generation) {
          // A shared pool lives on: the slots go back to it.
          if (this.shared) this.unreserve(slots);
          throw new BlockDeviceError('EIO', 'write: the device was closed');
        }
        this.reserved -= n;
        this.commitPages(offset, start, end, slots);
        this.writeSync(offset, head);
      },
      abort: (): void => {
        if (used) return;
        used = true;
        if (generation !== this.generation) {
          if (this.shared) this.unreserve(slots);
          return;
        }
        this.reserved -= n;
        this.unreserve(slots);
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

  /**
   * With the free list in address order and too scattered for any window: the slabs of this arena
   * with the most free slots, emptied by moving their pages to free slots elsewhere (a copy each),
   * become the target's slots. A volume whose pages were first written in random order and are
   * then rewritten in large writes has its freed slots scattered for good otherwise: every target
   * was refused and each write copied. A moved page costs what the copy would have, once: the
   * rewritten pages then sit in runs, and so do their slots when freed. Only slabs whose every
   * slot in use is a page of this table that nothing holds qualify; null when too few do, or when
   * the other free slots cannot take their pages.
   */
  private reserveCompacted(slots: Int32Array): number[] | null {
    const n = slots.length;
    const need = Math.ceil(n / PAGES_PER_SLAB);
    const free = this.freeSlots;
    const perSlab = new Map<number, number>();
    for (const s of free) perSlab.set(s >>> SLAB_SHIFT, (perSlab.get(s >>> SLAB_SHIFT) ?? 0) + 1);
    const chosen: number[] = [];
    const isFree = new Uint8Array(PAGES_PER_SLAB);
    let moves = 0;
    let freeInChosen = 0;
    let tried = 0;
    for (const [si, count] of [...perSlab].sort((a, b) => b[1] - a[1])) {
      // Each look is a pass over the free list: a few, not one per slab.
      if (chosen.length === need || tried++ === need + MAX_COMPACT_TRIES) break;
      if (!this.pool.complete(si)) continue;
      isFree.fill(0);
      for (const s of free) if (s >>> SLAB_SHIFT === si) isFree[s & (PAGES_PER_SLAB - 1)] = 1;
      if (!this.movable(si, isFree)) continue;
      chosen.push(si);
      moves += PAGES_PER_SLAB - count;
      freeInChosen += count;
    }
    if (chosen.length < need || free.length - freeInChosen < moves) return null;
    // The rest of the free list keeps its order (lowest on top): the moved pages take its lowest slots.
    let w = 0;
    for (let r = 0; r < free.length; r++) if (!chosen.includes(free[r]! >>> SLAB_SHIFT)) free[w++] = free[r]!;
    free.length = w;
    const pageOf = this.pool.pageOf;
    for (const si of chosen) {
      for (let i = 0; i < PAGES_PER_SLAB; i++) {
        const slot = (si << SLAB_SHIFT) | i;
        const pi = pageOf[si]![i]!;
        if (this.table.raw(pi) !== (slot + 1) << 1) continue; // free: not this table's page
        const dest = free.pop()!;
        this.slotBytes(slot).copy(this.slotBytes(dest));
        this.place(pi, dest);
      }
    }
    let k = 0;
    for (const si of chosen) for (let i = 0; i < PAGES_PER_SLAB && k < n; i++) slots[k++] = (si << SLAB_SHIFT) | i;
    // What the target does not need of the last slab is free (in address order, lowest on top).
    const last = chosen[chosen.length - 1]!;
    const used = n - (chosen.length - 1) * PAGES_PER_SLAB;
    for (let i = PAGES_PER_SLAB - 1; i >= used; i--) free.push((last << SLAB_SHIFT) | i);
    this.freeSorted = false;
    this.compactions++;
    this.pool.compactions++;
    return runsOf(slots);
  }

  /** Is every slot of slab si that `isFree` does not mark a page of this table (not adopted) that nothing holds? */
  private movable(si: number, isFree: Uint8Array): boolean {
    const holds = this.holds[si]!;
    const pageOf = this.pool.pageOf[si]!;
    for (let i = 0; i < PAGES_PER_SLAB; i++) {
      if (isFree[i] === 1) continue;
      if (holds[i] !== 0 || this.table.raw(pageOf[i]!) !== (((si << SLAB_SHIFT) | i) + 1) << 1) return false;
    }
    return true;
  }

  /** Reserved slots of a target that never became pages: retired while held, else free. */
  private unreserve(slots: Int32Array): void {
    for (let i = slots.length - 1; i >= 0; i--) this.release(slots[i]!, false);
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
      const v = this.table.raw(p0 + i);
      this.place(p0 + i, slots[i]!);
      if (v !== 0) this.release((v >>> 1) - 1, (v & 1) === 1);
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
    if (this.left) this.rejoin();
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
    if (this.left) return;
    if (this.shared) {
      // The pool stays with the other volumes: give back this table's slots (and adoptions) only.
      for (const [, slot, adopted] of this.table.entries()) this.release(slot, adopted);
      this.pool.leave(this.id, this.arena);
      this.left = true;
    } else {
      // Views still out keep their slabs alive (they are plain Buffers) and release into nothing.
      this.pool.reset();
    }
    this.table.clear();
    this.reserved = 0;
    this.generation++;
  }
}

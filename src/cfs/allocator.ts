// Free-space tracking for one master volume, in blocks of cfs.blockSize.
//
// The free space is a sorted list of extents [start, length), merged on free. It is never persisted:
// at start-up the server rebuilds it as "every block no file points at" (see docs/cfs.md), so a
// crash cannot leave a block both free and in use.
//
// Allocation prefers one contiguous run: the free extent at `goal` if it is long enough (a growing
// file continues where it ends), then the first extent after `goal` that is long enough, then the
// first anywhere; only when no single extent is long enough does it take the largest ones.
import type { VolRun } from './protocol.js';

export class BlockAllocator {
  /** Free extents, sorted by start, never adjacent (merged). */
  private starts: number[] = [];
  private lengths: number[] = [];
  private free = 0;

  constructor(readonly totalBlocks: number) {
    if (totalBlocks > 0) {
      this.starts.push(0);
      this.lengths.push(totalBlocks);
      this.free = totalBlocks;
    }
  }

  get freeBlocks(): number {
    return this.free;
  }

  get usedBlocks(): number {
    return this.totalBlocks - this.free;
  }

  /** Free extents, for the consistency check. */
  extents(): VolRun[] {
    return this.starts.map((s, i) => [s, this.lengths[i]!]);
  }

  /** Mark [start, start+count) used; false when any of it is not free (shared or out of range). */
  take(start: number, count: number): boolean {
    const i = this.find(start);
    if (i < 0) return false;
    const s = this.starts[i]!;
    const len = this.lengths[i]!;
    if (start + count > s + len) return false;
    this.cut(i, start, count);
    return true;
  }

  /** Up to `count` blocks as few runs as it can; [] (nothing taken) when fewer are free. */
  allocate(count: number, goal?: number): VolRun[] {
    if (count <= 0) return [];
    if (count > this.free) return [];
    if (goal !== undefined) {
      const i = this.find(goal);
      if (i >= 0 && this.starts[i]! + this.lengths[i]! - goal >= count) {
        this.cut(i, goal, count);
        return [[goal, count]];
      }
    }
    const from = goal === undefined ? 0 : this.firstAfter(goal);
    for (const i of [...range(from, this.starts.length), ...range(0, from)]) {
      if (this.lengths[i]! >= count) {
        const s = this.starts[i]!;
        this.cut(i, s, count);
        return [[s, count]];
      }
    }
    // Fragmented: the largest extents first, so the file gets as few runs as possible.
    const order = range(0, this.starts.length).sort((a, b) => this.lengths[b]! - this.lengths[a]!);
    const picked: VolRun[] = [];
    let left = count;
    for (const i of order) {
      const n = Math.min(left, this.lengths[i]!);
      picked.push([this.starts[i]!, n]);
      left -= n;
      if (left === 0) break;
    }
    for (const [s, n] of picked) this.take(s, n);
    return picked.sort((a, b) => a[0] - b[0]);
  }

  /** Return [start, start+count) to the free list. Throws on a double free: that is a bug, not an input. */
  release(start: number, count: number): void {
    if (count <= 0) return;
    if (start < 0 || start + count > this.totalBlocks) throw new Error(`free of blocks ${start}+${count} outside 0..${this.totalBlocks}`);
    const at = this.firstAfter(start); // first extent starting after `start`
    const prev = at - 1;
    if (prev >= 0 && this.starts[prev]! + this.lengths[prev]! > start) throw new Error(`double free of block ${start}`);
    if (at < this.starts.length && this.starts[at]! < start + count) throw new Error(`double free of block ${this.starts[at]}`);
    this.free += count;
    const joinPrev = prev >= 0 && this.starts[prev]! + this.lengths[prev]! === start;
    const joinNext = at < this.starts.length && this.starts[at]! === start + count;
    if (joinPrev && joinNext) {
      this.lengths[prev]! += count + this.lengths[at]!;
      this.starts.splice(at, 1);
      this.lengths.splice(at, 1);
    } else if (joinPrev) {
      this.lengths[prev]! += count;
    } else if (joinNext) {
      this.starts[at] = start;
      this.lengths[at]! += count;
    } else {
      this.starts.splice(at, 0, start);
      this.lengths.splice(at, 0, count);
    }
  }

  /** Index of the free extent containing `block`, or -1. */
  private find(block: number): number {
    const i = this.firstAfter(block) - 1;
    return i >= 0 && block < this.starts[i]! + this.lengths[i]! ? i : -1;
  }

  /** Index of the first extent that starts after `block` (binary search). */
  private firstAfter(block: number): number {
    let lo = 0;
    let hi = this.starts.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (this.starts[mid]! <= block) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }

  /** Remove [start, start+count) from extent i, which contains it. */
  private cut(i: number, start: number, count: number): void {
    const s = this.starts[i]!;
    const end = s + this.lengths[i]!;
    this.free -= count;
    const before = start - s;
    const after = end - (start + count);
    if (before > 0 && after > 0) {
      this.lengths[i] = before;
      this.starts.splice(i + 1, 0, start + count);
      this.lengths.splice(i + 1, 0, after);
    } else if (before > 0) {
      this.lengths[i] = before;
    } else if (after > 0) {
      this.starts[i] = start + count;
      this.lengths[i] = after;
    } else {
      this.starts.splice(i, 1);
      this.lengths.splice(i, 1);
    }
  }
}

function range(from: number, to: number): number[] {
  const out: number[] = [];
  for (let i = from; i < to; i++) out.push(i);
  return out;
}

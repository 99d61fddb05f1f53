// The directory tree and the File Allocation Table (a drawing of Kodama, US 7,281,032; seeds.md section 1), as inodes.
//
// Every change is a JournalRecord, and apply() is the only code that changes the tree: the server
// validates a request, builds its record, applies it and journals it; start-up replays the same
// records through the same apply(). Records name inodes, not paths, so a rename of a directory is
// one record and replay is deterministic.
//
// A file's map is one entry per file block: the block of the pair's master volume that holds it, or
// HOLE. Invariant (kept by apply): map.length <= ceil(size / blockSize).
import { CfsError, normalizePath, splitPath, type Extent, type FileType } from './protocol.js';

export const ROOT_INO = 1;
export const HOLE = -1;

export interface FileInode {
  ino: number;
  type: 'file';
  size: number;
  mtime: number;
  /** The pair whose master volume holds every block of the file. */
  pair: string;
  map: number[];
}

export interface DirInode {
  ino: number;
  type: 'dir';
  mtime: number;
  children: Map<string, number>;
}

export type Inode = FileInode | DirInode;

/** Blocks that a record stopped pointing at: the server frees them once no open handle can read them. */
export interface Freed {
  /** The file that held them. */
  ino: number;
  pair: string;
  runs: [volBlock: number, count: number][];
}

export type JournalRecord =
  | { t: 'mkdir'; seq: number; parent: number; name: string; ino: number; mtime: number }
  | { t: 'create'; seq: number; parent: number; name: string; ino: number; pair: string; mtime: number }
  /** Map extents into a file, cutting it to `trunc` blocks first; then set its size. */
  | { t: 'write'; seq: number; ino: number; size: number; mtime: number; trunc?: number; extents: Extent[] }
  /** A new file that takes the place of parent/name, whatever was there (a put). */
  | { t: 'put'; seq: number; parent: number; name: string; ino: number; pair: string; size: number; mtime: number; extents: Extent[] }
  /** unlink or rmdir */
  | { t: 'remove'; seq: number; parent: number; name: string; mtime: number }
  | { t: 'rename'; seq: number; from: [parent: number, name: string]; to: [parent: number, name: string]; mtime: number }
  | { t: 'mtime'; seq: number; ino: number; mtime: number };

/** Without seq: what the server hands to the journal, which numbers it. */
export type RecordBody = JournalRecord extends infer R ? (R extends JournalRecord ? Omit<R, 'seq'> : never) : never;

export interface NamespaceSnapshot {
  version: 1;
  nextIno: number;
  inodes: SnapshotInode[];
}

type SnapshotInode =
  | { ino: number; type: 'file'; size: number; mtime: number; pair: string; extents: Extent[] }
  | { ino: number; type: 'dir'; mtime: number; children: [string, number][] };

export class Namespace {
  readonly inodes = new Map<number, Inode>();
  nextIno = ROOT_INO + 1;

  constructor(readonly blockSize: number) {
    this.inodes.set(ROOT_INO, { ino: ROOT_INO, type: 'dir', mtime: Date.now(), children: new Map() });
  }

  // -- lookups (throw CfsError with the path the user gave)

  /** The inode at `path`; ENOENT or ENOTDIR as a shell would say them. */
  resolve(path: string): Inode {
    const p = normalizePath(path);
    let node: Inode = this.inodes.get(ROOT_INO)!;
    let at = '';
    for (const name of splitPath(p)) {
      if (node.type !== 'dir') throw new CfsError('ENOTDIR', `not a directory: ${at || '/'}`);
      at += `/${name}`;
      const ino = node.children.get(name);
      if (ino === undefined) throw new CfsError('ENOENT', `no such file: ${p}`);
      node = this.inodes.get(ino)!;
    }
    return node;
  }

  /** The directory that holds `path`, and the last name; refuses "/". */
  parentOf(path: string): { dir: DirInode; name: string; path: string } {
    const p = normalizePath(path);
    const names = splitPath(p);
    if (names.length === 0) throw new CfsError('EINVAL', 'the root directory cannot be changed this way');
    const name = names.pop()!;
    const parentPath = `/${names.join('/')}`;
    const dir = this.resolve(parentPath);
    if (dir.type !== 'dir') throw new CfsError('ENOTDIR', `not a directory: ${parentPath}`);
    return { dir, name, path: p };
  }

  file(ino: number): FileInode | undefined {
    const node = this.inodes.get(ino);
    return node?.type === 'file' ? node : undefined;
  }

  allocateIno(): number {
    return this.nextIno++;
  }

  /** Is `ino` the directory `ancestor` or inside it? (a directory cannot move into itself) */
  isWithin(ino: number, ancestor: number): boolean {
    if (ino === ancestor) return true;
    // Parents are not stored; walk down from the ancestor instead. Directories are few next to files.
    const dir = this.inodes.get(ancestor);
    if (dir?.type !== 'dir') return false;
    for (const child of dir.children.values()) if (this.inodes.get(child)?.type === 'dir' && this.isWithin(ino, child)) return true;
    return false;
  }

  // -- the one way to change the tree

  apply(r: JournalRecord | RecordBody): Freed[] {
    const freed: Freed[] = [];
    switch (r.t) {
      case 'mkdir': {
        this.dir(r.parent).children.set(r.name, r.ino);
        this.inodes.set(r.ino, { ino: r.ino, type: 'dir', mtime: r.mtime, children: new Map() });
        this.touch(r.parent, r.mtime);
        this.nextIno = Math.max(this.nextIno, r.ino + 1);
        break;
      }
      case 'create': {
        this.dir(r.parent).children.set(r.name, r.ino);
        this.inodes.set(r.ino, { ino: r.ino, type: 'file', size: 0, mtime: r.mtime, pair: r.pair, map: [] });
        this.touch(r.parent, r.mtime);
        this.nextIno = Math.max(this.nextIno, r.ino + 1);
        break;
      }
      case 'write': {
        const f = this.file(r.ino);
        if (!f) throw new Error(`journal: write to missing file inode ${r.ino}`);
        const out: [number, number][] = [];
        if (r.trunc !== undefined) cut(f, r.trunc, out);
        for (const [fb, vb, n] of r.extents) {
          while (f.map.length < fb + n) f.map.push(HOLE);
          for (let k = 0; k < n; k++) {
            const old = f.map[fb + k]!;
            if (old !== HOLE) pushRun(out, old, 1);
            f.map[fb + k] = vb + k;
          }
        }
        f.size = r.size;
        cut(f, Math.ceil(r.size / this.blockSize), out);
        f.mtime = r.mtime;
        if (out.length) freed.push({ ino: f.ino, pair: f.pair, runs: out });
        break;
      }
      case 'put': {
        const dir = this.dir(r.parent);
        const old = dir.children.get(r.name);
        if (old !== undefined) freed.push(...this.drop(old));
        const map: number[] = [];
        for (const [fb, vb, n] of r.extents) {
          while (map.length < fb) map.push(HOLE);
          for (let k = 0; k < n; k++) map[fb + k] = vb + k;
        }
        dir.children.set(r.name, r.ino);
        this.inodes.set(r.ino, { ino: r.ino, type: 'file', size: r.size, mtime: r.mtime, pair: r.pair, map });
        this.touch(r.parent, r.mtime);
        this.nextIno = Math.max(this.nextIno, r.ino + 1);
        break;
      }
      case 'remove': {
        const dir = this.dir(r.parent);
        const ino = dir.children.get(r.name);
        if (ino === undefined) throw new Error(`journal: remove of missing ${r.name} in inode ${r.parent}`);
        dir.children.delete(r.name);
        freed.push(...this.drop(ino));
        this.touch(r.parent, r.mtime);
        break;
      }
      case 'rename': {
        const from = this.dir(r.from[0]);
        const to = this.dir(r.to[0]);
        const ino = from.children.get(r.from[1]);
        if (ino === undefined) throw new Error(`journal: rename of missing ${r.from[1]} in inode ${r.from[0]}`);
        const old = to.children.get(r.to[1]);
        from.children.delete(r.from[1]);
        if (old !== undefined && old !== ino) freed.push(...this.drop(old));
        to.children.set(r.to[1], ino);
        this.touch(r.from[0], r.mtime);
        this.touch(r.to[0], r.mtime);
        break;
      }
      case 'mtime': {
        const node = this.inodes.get(r.ino);
        if (node) node.mtime = r.mtime;
        break;
      }
    }
    return freed;
  }

  // -- snapshot

  snapshot(): NamespaceSnapshot {
    const inodes: SnapshotInode[] = [];
    for (const node of this.inodes.values()) {
      inodes.push(
        node.type === 'file'
          ? { ino: node.ino, type: 'file', size: node.size, mtime: node.mtime, pair: node.pair, extents: toExtents(node.map) }
          : { ino: node.ino, type: 'dir', mtime: node.mtime, children: [...node.children] },
      );
    }
    return { version: 1, nextIno: this.nextIno, inodes };
  }

  static fromSnapshot(s: NamespaceSnapshot, blockSize: number): Namespace {
    if (s.version !== 1) throw new Error(`unknown snapshot version ${String(s.version)}`);
    const ns = new Namespace(blockSize);
    ns.inodes.clear();
    for (const i of s.inodes) {
      if (i.type === 'dir') ns.inodes.set(i.ino, { ino: i.ino, type: 'dir', mtime: i.mtime, children: new Map(i.children) });
      else {
        const map: number[] = [];
        for (const [fb, vb, n] of i.extents) {
          while (map.length < fb) map.push(HOLE);
          for (let k = 0; k < n; k++) map[fb + k] = vb + k;
        }
        ns.inodes.set(i.ino, { ino: i.ino, type: 'file', size: i.size, mtime: i.mtime, pair: i.pair, map });
      }
    }
    if (ns.inodes.get(ROOT_INO)?.type !== 'dir') throw new Error('snapshot has no root directory');
    ns.nextIno = s.nextIno;
    return ns;
  }

  /** Paths of every file, for messages and checks. */
  *files(): Generator<{ path: string; file: FileInode }> {
    const walk = function* (this: Namespace, dir: DirInode, at: string): Generator<{ path: string; file: FileInode }> {
      for (const [name, ino] of dir.children) {
        const node = this.inodes.get(ino)!;
        const p = `${at}/${name}`;
        if (node.type === 'file') yield { path: p, file: node };
        else yield* walk.call(this, node, p);
      }
    };
    yield* walk.call(this, this.inodes.get(ROOT_INO) as DirInode, '');
  }

  typeOf(ino: number): FileType | undefined {
    return this.inodes.get(ino)?.type;
  }

  private dir(ino: number): DirInode {
    const d = this.inodes.get(ino);
    if (d?.type !== 'dir') throw new Error(`journal: inode ${ino} is not a directory`);
    return d;
  }

  private touch(ino: number, mtime: number): void {
    const d = this.inodes.get(ino);
    if (d) d.mtime = mtime;
  }

  /** Forget an inode (and, for a directory, everything under it); what its files held is freed. */
  private drop(ino: number): Freed[] {
    const node = this.inodes.get(ino);
    if (!node) return [];
    this.inodes.delete(ino);
    if (node.type === 'dir') return [...node.children.values()].flatMap((c) => this.drop(c));
    const runs: [number, number][] = [];
    for (const vb of node.map) if (vb !== HOLE) pushRun(runs, vb, 1);
    return runs.length ? [{ ino: node.ino, pair: node.pair, runs }] : [];
  }
}

/** Cut a file's map to `blocks` entries, collecting what falls off. */
function cut(f: FileInode, blocks: number, out: [number, number][]): void {
  if (f.map.length <= blocks) return;
  for (let i = blocks; i < f.map.length; i++) if (f.map[i] !== HOLE) pushRun(out, f.map[i]!, 1);
  f.map.length = blocks;
}

function pushRun(runs: [number, number][], start: number, count: number): void {
  const last = runs[runs.length - 1];
  if (last && last[0] + last[1] === start) last[1] += count;
  else runs.push([start, count]);
}

/** A map as extents [fileBlock, volBlock, count], holes left out. */
export function toExtents(map: readonly number[]): Extent[] {
  const out: Extent[] = [];
  for (let i = 0; i < map.length; i++) {
    const vb = map[i]!;
    if (vb === HOLE) continue;
    const last = out[out.length - 1];
    if (last && last[0] + last[2] === i && last[1] + last[2] === vb) last[2]++;
    else out.push([i, vb, 1]);
  }
  return out;
}

export function allocatedBlocks(map: readonly number[]): number {
  let n = 0;
  for (const vb of map) if (vb !== HOLE) n++;
  return n;
}

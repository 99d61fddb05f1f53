// The CFS server (the "CFS server" of Kodama's drawings): metadata only. It owns the namespace and File
// Allocation Table, the free space of each pair's master volume and the Usage Table of Pairs, and
// answers clients over the line protocol of protocol.ts. File data never passes through it.
//
// Every request is validated and applied in one synchronous step (so requests are serialised without
// locks), journaled, and answered once its record - and any record before it - is durable.
//
// Blocks are copy-on-write. A client writes new data only into blocks reserved for its handle
// (`alloc`), then `commit` maps them into the file; a block that a commit, truncate, unlink or
// replace stops using is freed only when no handle that could still read it is open (epochs, below).
// Committed blocks are therefore never written again while anyone can see them: readers never see a
// torn block, and a crash at any point leaves the old or the new version of each commit.
import { randomUUID } from 'node:crypto';
import net from 'node:net';
import tls from 'node:tls';
import type { Logger } from 'pino';
import type { CfsConfig, ClusterConfig } from '../cluster/config.js';
import { BlockAllocator } from './allocator.js';
import { JournalStore, MemoryStore, type MetadataStore } from './journal.js';
import { HOLE, Namespace, allocatedBlocks, toExtents, type FileInode, type Freed, type RecordBody } from './namespace.js';
import {
  CFS_PROTOCOL_VERSION,
  CfsError,
  LineSplitter,
  encodeLine,
  normalizePath,
  type CheckReport,
  type CopyRef,
  type DirEntry,
  type FileView,
  type OpName,
  type Ops,
  type Request,
  type SpaceReport,
  type VolumeAddress,
} from './protocol.js';
import { UsageTable } from './usage.js';
import { sameSecret } from '../util/secrets.js';
import { readCfsToken } from './token.js';

export { CFS_TOKEN_ENV, readCfsToken } from './token.js';

export interface CfsServerOptions {
  /** A connection silent for this long is dropped and its opens returned (clients ping every third of it). */
  leaseMs?: number;
  /** How long a copy a client reported failing is passed over. */
  failedForMs?: number;
  /** Clients must send it in their hello (read from cfs.tokenFile by the caller when absent). */
  token?: string;
  /**
   * The pairs as the storage systems report them now (the composition root asks their admin
   * APIs): each pair's current master and the mirrors fit for reads. Without it, the YAML's
   * masters are taken as current and every copy as readable.
   */
  pairView?: () => Promise<Map<string, LivePair>>;
  /** Serve TLS with this certificate (cfs.tls: the certificate of the storage system that runs the server). */
  tls?: { cert: Buffer; key: Buffer };
}

/** A pair's copies as they are now: its master (after any swap or takeover), and the mirrors whose reads are current. */
export interface LivePair {
  master: VolumeAddress;
  readable: VolumeAddress[];
}

/** How often the pairs are looked at again, besides when a client says its master moved. */
const PAIR_VIEW_MS = 500;

const DEFAULT_LEASE_MS = 30_000;
const DEFAULT_FAILED_FOR_MS = 10_000;
const MAX_ALLOC = 1 << 20;

interface PairInfo {
  name: string;
  master: VolumeAddress;
  copies: CopyRef[];
  allocator: BlockAllocator;
}

interface Handle {
  id: number;
  session: Session;
  ino: number;
  pair: string;
  mode: 'r' | 'rw' | 'replace';
  copy: CopyRef;
  /** Mirrors this handle was moved off after read failures. */
  failed: Set<number>;
  /** Blocks reserved for this handle and not yet committed: private, free again at close. */
  pool: Set<number>;
  /** The epoch of the committed view the client holds (see reclaim()). */
  viewEpoch: number;
  /** For mode replace until its first commit: where the new file goes. */
  replace?: { parent: number; name: string; exclusive: boolean };
}

interface Session {
  id: number;
  socket: net.Socket;
  client: string;
  handles: Map<number, Handle>;
  lastSeen: number;
  /** Said hello with the token (always true when the server has none). */
  authenticated: boolean;
}

export class CfsServer {
  private readonly sessions = new Set<Session>();
  private readonly handles = new Map<number, Handle>();
  private readonly bootId = randomUUID();
  private nextHandle = 1;
  private nextSession = 1;
  private leaseTimer: NodeJS.Timeout | undefined;
  private token: string | undefined;
  private live: Map<string, LivePair> | undefined;
  private livePoll: Promise<void> | undefined;
  private liveTimer: NodeJS.Timeout | undefined;
  private pairView: (() => Promise<Map<string, LivePair>>) | undefined;
  /** Open handles by inode: whose views a free must wait for. */
  private readonly openByIno = new Map<number, Set<Handle>>();
  /**
   * Freed blocks wait here until no handle that could still read them is open. Each free bumps the
   * epoch; a handle remembers the epoch of the view it holds; blocks a file stopped using at epoch e
   * are released once no handle open on that file has viewEpoch < e. Handles on other files do not
   * hold them up.
   */
  private epoch = 0;
  private deferred: (Freed & { epoch: number })[] = [];

  private constructor(
    private readonly config: ClusterConfig,
    private readonly cfs: CfsConfig,
    private readonly ns: Namespace,
    private readonly pairs: Map<string, PairInfo>,
    private readonly store: MetadataStore,
    private readonly usage: UsageTable,
    private readonly server: net.Server,
    private readonly log: Logger,
    private readonly leaseMs: number,
  ) {}

  /** Load (or create) the metadata, rebuild free space, and listen on cfs.listen. */
  static async start(config: ClusterConfig, log: Logger, opts: CfsServerOptions = {}): Promise<CfsServer> {
    const cfs = config.cfs;
    if (!cfs) throw new Error(`${config.source}: no cfs: section`);
    const pairs = new Map<string, PairInfo>();
    for (const name of cfs.pairs) {
      const p = config.pairs.find((x) => x.name === name)!;
      const size = config.storageSystems.find((s) => s.id === p.master.ss)!.volumes.find((v) => v.id === p.master.vol)!.size;
      pairs.set(name, {
        name,
        master: { ss: p.master.ss, vol: p.master.vol },
        copies: [p.master, ...p.mirrors].map((r, mirror) => ({ mirror, ss: r.ss, vol: r.vol })),
        allocator: new BlockAllocator(Math.floor(size / cfs.blockSize)),
      });
    }

    let ns: Namespace;
    let store: MetadataStore;
    if (cfs.dataDir) {
      const state = await JournalStore.load(cfs.dataDir);
      if (state.tornBytes > 0) log.warn({ bytes: state.tornBytes }, 'cfs: cut a torn record from the end of the journal (a crash mid-write)');
      ns = state.snapshot ? Namespace.fromSnapshot(state.snapshot, cfs.blockSize) : new Namespace(cfs.blockSize);
      for (const r of state.records) ns.apply(r);
      rebuildFreeSpace(ns, pairs, cfs.dataDir);
      store = await JournalStore.open(cfs.dataDir, state, () => ns.snapshot());
    } else {
      ns = new Namespace(cfs.blockSize);
      store = new MemoryStore();
    }

    const usage = new UsageTable(
      [...pairs.values()].map((p) => ({ name: p.name, copies: p.copies })),
      { readFromMaster: cfs.readFromMaster, failedForMs: opts.failedForMs ?? DEFAULT_FAILED_FOR_MS },
    );
    const server = opts.tls ? tls.createServer({ cert: opts.tls.cert, key: opts.tls.key, minVersion: 'TLSv1.2' }) : net.createServer();
    const self = new CfsServer(config, cfs, ns, pairs, store, usage, server, log, opts.leaseMs ?? DEFAULT_LEASE_MS);
    const token = opts.token ?? (cfs.tokenFile ? readCfsToken(cfs.tokenFile, log) : undefined);
    if (token !== undefined) self.token = token;
    if (opts.pairView) {
      self.pairView = opts.pairView;
      await self.refreshLive();
      self.liveTimer = setInterval(() => void self.refreshLive(), PAIR_VIEW_MS);
      self.liveTimer.unref();
    }
    if (opts.tls) {
      server.on('secureConnection', (s: net.Socket) => self.accept(s));
      server.on('tlsClientError', (e: Error, s: net.Socket) => log.warn({ from: s.remoteAddress, reason: e.message }, `cfs: TLS refused for ${s.remoteAddress}: ${e.message}`));
    } else server.on('connection', (s) => self.accept(s));
    try {
      await new Promise<void>((resolve, reject) => {
        server.once('error', reject);
        server.listen(cfs.listen.port, cfs.listen.host, () => {
          server.off('error', reject);
          resolve();
        });
      });
    } catch (e) {
      await store.close();
      throw new Error(`cfs: cannot listen on ${cfs.listen.host}:${cfs.listen.port}: ${(e as Error).message}`);
    }
    self.leaseTimer = setInterval(() => self.expireLeases(), Math.max(100, self.leaseMs / 3));
    self.leaseTimer.unref();
    let files = 0;
    for (const _ of ns.files()) files++;
    log.info({ listen: self.address, metadata: store.where, files, pairs: cfs.pairs }, 'cfs server up');
    return self;
  }

  get address(): string {
    const a = this.server.address() as net.AddressInfo;
    return a.family === 'IPv6' ? `[${a.address}]:${a.port}` : `${a.address}:${a.port}`;
  }

  get port(): number {
    return (this.server.address() as net.AddressInfo).port;
  }

  async close(): Promise<void> {
    if (this.leaseTimer) clearInterval(this.leaseTimer);
    if (this.liveTimer) clearInterval(this.liveTimer);
    const closed = new Promise<void>((r) => this.server.close(() => r()));
    for (const s of [...this.sessions]) this.endSession(s, 'server shutting down');
    await closed;
    await this.store.close();
  }

  // -------------------------------------------------------------------------------------------
  // Connections

  private accept(socket: net.Socket): void {
    socket.setNoDelay(true);
    const session: Session = { id: this.nextSession++, socket, client: socket.remoteAddress ?? '?', handles: new Map(), lastSeen: Date.now(), authenticated: this.token === undefined };
    this.sessions.add(session);
    const splitter = new LineSplitter((line) => this.onLine(session, line));
    socket.on('data', (chunk: Buffer) => {
      session.lastSeen = Date.now();
      try {
        splitter.feed(chunk);
      } catch (e) {
        this.endSession(session, (e as Error).message);
      }
    });
    socket.on('error', () => {});
    socket.on('close', () => this.endSession(session, 'connection closed'));
  }

  /** The connection is gone: its handles are closed, their opens returned and reservations freed. */
  private endSession(session: Session, why: string): void {
    if (!this.sessions.delete(session)) return;
    if (session.handles.size > 0) this.log.info({ client: session.client, handles: session.handles.size, why }, 'cfs: closing the handles of a client that went away');
    for (const h of [...session.handles.values()]) this.closeHandle(h);
    session.socket.destroy();
  }

  private expireLeases(): void {
    const now = Date.now();
    for (const s of [...this.sessions]) if (now - s.lastSeen > this.leaseMs) this.endSession(s, `silent for more than ${this.leaseMs} ms`);
  }

  private onLine(session: Session, line: Buffer): void {
    let req: Request;
    try {
      req = JSON.parse(line.toString('utf8')) as Request;
    } catch {
      return this.endSession(session, 'a message that is not JSON');
    }
    if (typeof req !== 'object' || req === null || typeof req.id !== 'number' || typeof req.op !== 'string') {
      return this.endSession(session, 'a message without id and op');
    }
    void this.answer(session, req);
  }

  private async answer(session: Session, req: Request): Promise<void> {
    let reply: object;
    if (!session.authenticated && !(req.op === 'hello' && this.authenticate(session, req))) {
      // One answer, then the door closes: no operation runs for a client that has not shown the token.
      this.log.warn({ client: session.client, op: req.op }, `cfs: refused ${session.client}: no valid token`);
      if (!session.socket.destroyed) session.socket.end(encodeLine({ id: req.id, ok: false, code: 'EACCES', message: 'this CFS server needs its token (cfs.tokenFile, or BLOCKMIRROR_CFS_TOKEN)' }));
      this.endSession(session, 'no valid token');
      return;
    }
    try {
      const handler = this.ops[req.op as OpName] as ((s: Session, r: Request) => unknown) | undefined;
      if (!handler) throw new CfsError('EINVAL', `unknown operation ${JSON.stringify(req.op)}`);
      // Handlers run synchronously from validation to apply; only `where` waits (for a look at the pairs).
      const result = (await handler(session, req)) as object;
      // Whatever this request saw or changed must be durable before anyone hears of it.
      await this.store.sync();
      reply = { id: req.id, ok: true, ...result };
    } catch (e) {
      if (e instanceof CfsError) reply = { id: req.id, ok: false, code: e.code, message: e.message };
      else {
        this.log.error({ err: (e as Error).message, op: req.op }, 'cfs: request failed');
        reply = { id: req.id, ok: false, code: 'EIO', message: `${req.op}: ${(e as Error).message}` };
      }
    }
    if (!session.socket.destroyed) session.socket.write(encodeLine(reply));
  }

  /** Look at the pairs again (one look at a time: callers share the one under way). */
  private refreshLive(): Promise<void> {
    if (!this.pairView) return Promise.resolve();
    this.livePoll ??= this.pairView()
      .then(
        (v) => {
          for (const [name, p] of v) {
            const before = this.live?.get(name)?.master;
            if (before && (before.ss !== p.master.ss || before.vol !== p.master.vol)) this.log.warn({ pair: name, master: p.master }, `cfs: the master of ${name} is now ss${p.master.ss}/vol${p.master.vol}`);
          }
          // A pair nobody reported this time keeps its last view rather than falling back to the YAML.
          this.live = new Map([...(this.live ?? []), ...v]);
        },
        (e: Error) => this.log.debug({ err: e.message }, 'cfs: could not read the pairs; keeping the last view'),
      )
      .finally(() => (this.livePoll = undefined));
    return this.livePoll;
  }

  /** The pair's current master: from the storage systems' reports, else as configured. */
  private masterOf(pair: string): VolumeAddress {
    return this.live?.get(pair)?.master ?? this.pairs.get(pair)!.master;
  }

  /** Whether reads from `c` return the pair's current data. */
  private isCurrent(pair: string, c: VolumeAddress): boolean {
    const l = this.live?.get(pair);
    if (!l) return true;
    const same = (a: VolumeAddress) => a.ss === c.ss && a.vol === c.vol;
    return same(l.master) || l.readable.some(same);
  }

  /** A copy for a handle's reads: a current one, least used; the master when none other is. */
  private pickCopy(pair: string, exclude: ReadonlySet<number> = new Set()): CopyRef {
    const master = this.masterOf(pair);
    const masterIndex = this.pairs.get(pair)!.copies.find((c) => c.ss === master.ss && c.vol === master.vol)?.mirror ?? 0;
    return this.usage.pick(pair, exclude, { current: (c) => this.isCurrent(pair, c), master: masterIndex });
  }

  private authenticate(session: Session, req: Request): boolean {
    const given = (req as { token?: unknown }).token;
    session.authenticated = typeof given === 'string' && this.token !== undefined && sameSecret(given, this.token);
    return session.authenticated;
  }

  // -------------------------------------------------------------------------------------------
  // Operations. Each runs synchronously from validation to apply.

  private readonly ops: { [K in OpName]: (s: Session, r: Ops[K]['args']) => Ops[K]['reply'] | Promise<Ops[K]['reply']> } = {
    hello: (s, r) => {
      if (r.version !== CFS_PROTOCOL_VERSION) throw new CfsError('EPROTO', `protocol version ${r.version} is not supported (server speaks ${CFS_PROTOCOL_VERSION})`);
      if (typeof r.client === 'string') s.client = `${r.client}@${s.socket.remoteAddress ?? '?'}`;
      return {
        version: CFS_PROTOCOL_VERSION,
        bootId: this.bootId,
        blockSize: this.cfs.blockSize,
        storageSystems: this.config.storageSystems.map((ss) => ({ id: ss.id, host: ss.nbd.host, port: ss.nbd.port })),
      };
    },

    ping: () => ({}),

    stat: (_s, r) => {
      const node = this.ns.resolve(r.path);
      if (node.type === 'dir') return { ino: node.ino, type: 'dir', size: 0, mtime: node.mtime, blocks: 0 };
      return { ino: node.ino, type: 'file', size: node.size, mtime: node.mtime, blocks: allocatedBlocks(node.map), pair: node.pair };
    },

    readdir: (_s, r) => {
      const node = this.ns.resolve(r.path);
      if (node.type !== 'dir') throw new CfsError('ENOTDIR', `not a directory: ${normalizePath(r.path)}`);
      const entries: DirEntry[] = [];
      for (const [name, ino] of node.children) {
        const c = this.ns.inodes.get(ino)!;
        entries.push({ name, type: c.type, size: c.type === 'file' ? c.size : 0, mtime: c.mtime });
      }
      entries.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
      return { entries };
    },

    mkdir: (_s, r) => {
      const p = normalizePath(r.path);
      if (p === '/') {
        if (r.parents) return {};
        throw new CfsError('EEXIST', 'file exists: /');
      }
      if (r.parents) {
        const names = p.slice(1).split('/');
        for (let i = 1; i <= names.length; i++) {
          const sub = `/${names.slice(0, i).join('/')}`;
          const { dir, name } = this.ns.parentOf(sub);
          const existing = dir.children.get(name);
          if (existing === undefined) this.apply({ t: 'mkdir', parent: dir.ino, name, ino: this.ns.allocateIno(), mtime: Date.now() });
          else if (this.ns.typeOf(existing) !== 'dir') throw new CfsError('ENOTDIR', `not a directory: ${sub}`);
        }
        return {};
      }
      const { dir, name } = this.ns.parentOf(p);
      if (dir.children.has(name)) throw new CfsError('EEXIST', `file exists: ${p}`);
      this.apply({ t: 'mkdir', parent: dir.ino, name, ino: this.ns.allocateIno(), mtime: Date.now() });
      return {};
    },

    rmdir: (_s, r) => {
      const { dir, name, path } = this.ns.parentOf(r.path);
      const ino = dir.children.get(name);
      if (ino === undefined) throw new CfsError('ENOENT', `no such directory: ${path}`);
      const node = this.ns.inodes.get(ino)!;
      if (node.type !== 'dir') throw new CfsError('ENOTDIR', `not a directory: ${path}`);
      if (node.children.size > 0) throw new CfsError('ENOTEMPTY', `directory not empty: ${path}`);
      this.apply({ t: 'remove', parent: dir.ino, name, mtime: Date.now() });
      return {};
    },

    unlink: (_s, r) => {
      const { dir, name, path } = this.ns.parentOf(r.path);
      const ino = dir.children.get(name);
      if (ino === undefined) throw new CfsError('ENOENT', `no such file: ${path}`);
      if (this.ns.typeOf(ino) === 'dir') throw new CfsError('EISDIR', `is a directory: ${path}`);
      this.apply({ t: 'remove', parent: dir.ino, name, mtime: Date.now() });
      return {};
    },

    rename: (_s, r) => {
      const src = this.ns.parentOf(r.from);
      const dst = this.ns.parentOf(r.to);
      const ino = src.dir.children.get(src.name);
      if (ino === undefined) throw new CfsError('ENOENT', `no such file: ${src.path}`);
      if (src.dir.ino === dst.dir.ino && src.name === dst.name) return {};
      const node = this.ns.inodes.get(ino)!;
      if (node.type === 'dir' && this.ns.isWithin(dst.dir.ino, ino)) throw new CfsError('EINVAL', `cannot move ${src.path} into itself (${dst.path})`);
      const target = dst.dir.children.get(dst.name);
      if (target !== undefined) {
        const t = this.ns.inodes.get(target)!;
        if (t.type === 'dir' && node.type === 'file') throw new CfsError('EISDIR', `is a directory: ${dst.path}`);
        if (t.type === 'file' && node.type === 'dir') throw new CfsError('ENOTDIR', `not a directory: ${dst.path}`);
        if (t.type === 'dir' && t.children.size > 0) throw new CfsError('ENOTEMPTY', `directory not empty: ${dst.path}`);
      }
      this.apply({ t: 'rename', from: [src.dir.ino, src.name], to: [dst.dir.ino, dst.name], mtime: Date.now() });
      return {};
    },

    setmtime: (_s, r) => {
      const node = this.ns.resolve(r.path);
      if (!Number.isFinite(r.mtime)) throw new CfsError('EINVAL', 'mtime must be milliseconds since the epoch');
      this.apply({ t: 'mtime', ino: node.ino, mtime: Math.round(r.mtime) });
      return {};
    },

    open: (s, r) => {
      if (r.mode !== 'r' && r.mode !== 'rw' && r.mode !== 'replace') throw new CfsError('EINVAL', `unknown open mode ${JSON.stringify(r.mode)}`);
      let file: FileInode;
      let replace: Handle['replace'];
      if (r.ino !== undefined) {
        const f = this.ns.file(r.ino);
        if (!f || r.mode === 'replace') throw new CfsError('ESTALE', `the file (inode ${r.ino}) is gone`);
        file = f;
      } else if (r.mode === 'replace') {
        const { dir, name, path } = this.ns.parentOf(r.path ?? '');
        const existing = dir.children.get(name);
        if (existing !== undefined && this.ns.typeOf(existing) === 'dir') throw new CfsError('EISDIR', `is a directory: ${path}`);
        if (existing !== undefined && r.exclusive) throw new CfsError('EEXIST', `file exists: ${path}`);
        const pair = this.choosePair(r.pair ?? (existing !== undefined ? this.ns.file(existing)?.pair : undefined));
        // The inode is only journaled by the put record at the first commit.
        file = { ino: this.ns.allocateIno(), type: 'file', size: 0, mtime: Date.now(), pair, map: [] };
        replace = { parent: dir.ino, name, exclusive: r.exclusive === true };
      } else {
        const { dir, name, path } = this.ns.parentOf(r.path ?? '');
        const existing = dir.children.get(name);
        if (existing === undefined) {
          if (!r.create || r.mode !== 'rw') throw new CfsError('ENOENT', `no such file: ${path}`);
          const ino = this.ns.allocateIno();
          this.apply({ t: 'create', parent: dir.ino, name, ino, pair: this.choosePair(r.pair), mtime: Date.now() });
          file = this.ns.file(ino)!;
        } else {
          const f = this.ns.file(existing);
          if (!f) throw new CfsError('EISDIR', `is a directory: ${path}`);
          if (r.exclusive) throw new CfsError('EEXIST', `file exists: ${path}`);
          file = f;
        }
      }
      const copy = this.pickCopy(file.pair);
      const h: Handle = {
        id: this.nextHandle++,
        session: s,
        ino: file.ino,
        pair: file.pair,
        mode: r.mode,
        copy,
        failed: new Set(),
        pool: new Set(),
        viewEpoch: this.epoch,
        ...(replace ? { replace } : {}),
      };
      this.handles.set(h.id, h);
      s.handles.set(h.id, h);
      this.track(h);
      return {
        handle: h.id,
        ino: file.ino,
        size: file.size,
        mtime: file.mtime,
        pair: file.pair,
        blockSize: this.cfs.blockSize,
        copy,
        master: this.masterOf(file.pair),
        extents: toExtents(file.map),
      };
    },

    refresh: (s, r) => {
      const h = this.handle(s, r.handle);
      const f = this.ns.file(h.ino);
      if (!f) {
        if (h.replace) return { size: 0, mtime: Date.now(), extents: [] };
        throw new CfsError('ESTALE', 'the file was removed while open');
      }
      h.viewEpoch = this.epoch;
      this.reclaim();
      return view(f);
    },

    where: async (s, r) => {
      const h = this.handle(s, r.handle);
      await this.refreshLive();
      if (!this.isCurrent(h.pair, h.copy)) {
        this.usage.release(h.pair, h.copy.mirror);
        h.copy = this.pickCopy(h.pair, h.failed);
      }
      return { master: this.masterOf(h.pair), copy: h.copy };
    },

    reopen: (s, r) => {
      const h = this.handle(s, r.handle);
      if (r.failed === h.copy.mirror) {
        this.usage.markFailed(h.pair, r.failed);
        h.failed.add(r.failed);
        this.usage.release(h.pair, h.copy.mirror);
        h.copy = this.pickCopy(h.pair, h.failed);
        this.log.warn({ pair: h.pair, failed: r.failed, now: h.copy.mirror, client: s.client }, 'cfs: a client could not read a copy; moved it to another');
      }
      return { copy: h.copy };
    },

    alloc: (s, r) => {
      const h = this.writable(s, r.handle);
      if (!Number.isSafeInteger(r.count) || r.count <= 0 || r.count > MAX_ALLOC) throw new CfsError('EINVAL', `alloc: count must be 1..${MAX_ALLOC}`);
      const pair = this.pairs.get(h.pair)!;
      const runs = pair.allocator.allocate(r.count, Number.isSafeInteger(r.goal) ? r.goal : undefined);
      if (runs.length === 0) {
        throw new CfsError('ENOSPC', `no space left on pair ${h.pair}: ${pair.allocator.freeBlocks} blocks free, ${r.count} needed (blocks of ${this.cfs.blockSize} bytes)`);
      }
      for (const [start, n] of runs) for (let k = 0; k < n; k++) h.pool.add(start + k);
      return { runs };
    },

    commit: (s, r) => {
      const h = this.writable(s, r.handle);
      const pair = this.pairs.get(h.pair)!;
      const bs = this.cfs.blockSize;
      if (!Number.isSafeInteger(r.size) || r.size < 0) throw new CfsError('EINVAL', 'commit: size must be a byte count');
      if (Math.ceil(r.size / bs) > pair.allocator.totalBlocks) throw new CfsError('ENOSPC', `file too large for pair ${h.pair}: ${r.size} bytes`);
      if (r.trunc !== undefined && (!Number.isSafeInteger(r.trunc) || r.trunc < 0)) throw new CfsError('EINVAL', 'commit: trunc must be a block count');
      if (!Array.isArray(r.extents)) throw new CfsError('EINVAL', 'commit: extents must be a list');
      const seen = new Set<number>();
      for (const e of r.extents) {
        const [fb, vb, n] = Array.isArray(e) ? e : [];
        if (!Number.isSafeInteger(fb) || !Number.isSafeInteger(vb) || !Number.isSafeInteger(n) || fb! < 0 || n! <= 0) throw new CfsError('EINVAL', `commit: bad extent ${JSON.stringify(e)}`);
        for (let k = 0; k < n!; k++) {
          const b = vb! + k;
          if (!h.pool.has(b) || seen.has(b)) throw new CfsError('EINVAL', `commit: block ${b} is not reserved by this handle`);
          seen.add(b);
        }
      }
      const finalSize = h.replace || r.setSize ? r.size : Math.max(this.ns.file(h.ino)?.size ?? 0, r.size);
      for (const [fb, , n] of r.extents) {
        if (fb + n > Math.ceil(finalSize / bs)) throw new CfsError('EINVAL', `commit: extent of blocks ${fb}..${fb + n - 1} is past the end of the file (${finalSize} bytes)`);
      }
      const now = Date.now();
      if (h.replace) {
        const dir = this.ns.inodes.get(h.replace.parent);
        if (dir?.type !== 'dir') throw new CfsError('ENOENT', 'the directory of the new file was removed');
        const existing = dir.children.get(h.replace.name);
        if (existing !== undefined && this.ns.typeOf(existing) === 'dir') throw new CfsError('EISDIR', `is a directory: ${h.replace.name}`);
        if (existing !== undefined && h.replace.exclusive) throw new CfsError('EEXIST', `file exists: ${h.replace.name}`);
        this.apply({ t: 'put', parent: h.replace.parent, name: h.replace.name, ino: h.ino, pair: h.pair, size: r.size, mtime: now, extents: r.extents });
        delete h.replace;
      } else {
        const f = this.ns.file(h.ino);
        if (!f) throw new CfsError('ESTALE', 'the file was removed while open');
        const size = r.setSize ? r.size : Math.max(f.size, r.size);
        this.apply({ t: 'write', ino: h.ino, size, mtime: now, ...(r.trunc !== undefined ? { trunc: r.trunc } : {}), extents: r.extents });
      }
      for (const b of seen) h.pool.delete(b);
      h.viewEpoch = this.epoch;
      this.reclaim();
      return view(this.ns.file(h.ino)!);
    },

    close: (s, r) => {
      this.closeHandle(this.handle(s, r.handle));
      return {};
    },

    usage: () => this.usage.report(),

    space: () => this.space(),

    check: () => this.check(),
  };

  // -------------------------------------------------------------------------------------------

  private apply(body: RecordBody): void {
    // Journal first: a store that can no longer write throws here, before the tree changes.
    this.store.append(body);
    const freed = this.ns.apply(body);
    if (freed.length > 0) {
      this.epoch++;
      for (const f of freed) this.deferred.push({ ...f, epoch: this.epoch });
      this.reclaim();
    }
  }

  /** Release deferred frees that no open handle can still read. */
  private reclaim(): void {
    if (this.deferred.length === 0) return;
    const still: typeof this.deferred = [];
    for (const d of this.deferred) {
      let pinned = false;
      for (const h of this.openByIno.get(d.ino) ?? []) if (h.viewEpoch < d.epoch) pinned = true;
      if (pinned) still.push(d);
      else {
        const a = this.pairs.get(d.pair)?.allocator;
        for (const [start, n] of d.runs) a?.release(start, n);
      }
    }
    this.deferred = still;
  }

  private track(h: Handle): void {
    let set = this.openByIno.get(h.ino);
    if (!set) this.openByIno.set(h.ino, (set = new Set()));
    set.add(h);
  }

  private untrack(h: Handle): void {
    const set = this.openByIno.get(h.ino);
    set?.delete(h);
    if (set?.size === 0) this.openByIno.delete(h.ino);
  }

  private closeHandle(h: Handle): void {
    if (!this.handles.delete(h.id)) return;
    h.session.handles.delete(h.id);
    this.untrack(h);
    const a = this.pairs.get(h.pair)!.allocator;
    for (const b of h.pool) a.release(b, 1);
    h.pool.clear();
    this.usage.release(h.pair, h.copy.mirror);
    this.reclaim();
  }

  private handle(s: Session, id: number): Handle {
    const h = s.handles.get(id);
    if (!h) throw new CfsError('EBADF', `no open file with handle ${id} on this connection`);
    return h;
  }

  private writable(s: Session, id: number): Handle {
    const h = this.handle(s, id);
    if (h.mode === 'r') throw new CfsError('EBADF', 'the file is open for reading only');
    return h;
  }

  /** A requested pair, or the one with the most free space (configuration order breaks ties). */
  private choosePair(requested: string | undefined): string {
    if (requested !== undefined) {
      if (!this.pairs.has(requested)) throw new CfsError('EINVAL', `unknown pair ${requested} (the file system uses ${[...this.pairs.keys()].join(', ')})`);
      return requested;
    }
    let best: PairInfo | undefined;
    for (const p of this.pairs.values()) if (!best || p.allocator.freeBlocks > best.allocator.freeBlocks) best = p;
    return best!.name;
  }

  private space(): SpaceReport {
    let files = 0;
    let dirs = 0;
    const used = new Map<string, number>();
    for (const node of this.ns.inodes.values()) {
      if (node.type === 'dir') dirs++;
      else {
        files++;
        used.set(node.pair, (used.get(node.pair) ?? 0) + allocatedBlocks(node.map));
      }
    }
    const reserved = new Map<string, number>();
    for (const h of this.handles.values()) reserved.set(h.pair, (reserved.get(h.pair) ?? 0) + h.pool.size);
    const deferred = new Map<string, number>();
    for (const d of this.deferred) deferred.set(d.pair, (deferred.get(d.pair) ?? 0) + d.runs.reduce((n, [, c]) => n + c, 0));
    return {
      blockSize: this.cfs.blockSize,
      files,
      dirs,
      pairs: [...this.pairs.values()].map((p) => ({
        name: p.name,
        totalBlocks: p.allocator.totalBlocks,
        usedBlocks: used.get(p.name) ?? 0,
        freeBlocks: p.allocator.freeBlocks,
        reservedBlocks: reserved.get(p.name) ?? 0,
        deferredBlocks: deferred.get(p.name) ?? 0,
      })),
    };
  }

  /** Every block is exactly one of: in one file, reserved by one handle, waiting in deferred, free. */
  private check(): CheckReport {
    const problems: string[] = [];
    for (const p of this.pairs.values()) {
      const owner = new Map<number, string>();
      const claim = (b: number, who: string) => {
        const prior = owner.get(b);
        if (prior !== undefined) problems.push(`pair ${p.name}: block ${b} belongs to both ${prior} and ${who}`);
        else if (b < 0 || b >= p.allocator.totalBlocks) problems.push(`pair ${p.name}: ${who} has block ${b}, outside the volume`);
        else owner.set(b, who);
      };
      for (const { path, file } of this.ns.files()) if (file.pair === p.name) for (const b of file.map) if (b !== HOLE) claim(b, path);
      for (const h of this.handles.values()) if (h.pair === p.name) for (const b of h.pool) claim(b, `handle ${h.id}`);
      for (const d of this.deferred) if (d.pair === p.name) for (const [s, n] of d.runs) for (let k = 0; k < n; k++) claim(s + k, `deferred free ${d.epoch}`);
      for (const [s, n] of p.allocator.extents()) for (let k = 0; k < n; k++) claim(s + k, 'free space');
      if (owner.size !== p.allocator.totalBlocks) problems.push(`pair ${p.name}: ${p.allocator.totalBlocks - owner.size} blocks are neither used nor free`);
    }
    return { consistent: problems.length === 0, problems: problems.slice(0, 20) };
  }
}

function view(f: FileInode): FileView {
  return { size: f.size, mtime: f.mtime, extents: toExtents(f.map) };
}

/** Free space = every block no file points at. Refuses metadata that points outside a volume or shares blocks. */
function rebuildFreeSpace(ns: Namespace, pairs: Map<string, PairInfo>, where: string): void {
  const problems: string[] = [];
  for (const { path, file } of ns.files()) {
    const p = pairs.get(file.pair);
    if (!p) {
      problems.push(`${path} is on pair ${file.pair}, which is not in cfs.pairs`);
      continue;
    }
    for (const [, vb, n] of toExtents(file.map)) {
      if (!p.allocator.take(vb, n)) problems.push(`${path}: blocks ${vb}..${vb + n - 1} of pair ${p.name} are outside its master volume or also used by another file`);
    }
  }
  if (problems.length > 0) {
    const more = problems.length > 5 ? ` (and ${problems.length - 5} more)` : '';
    throw new Error(`cfs metadata in ${where} does not fit the configuration: ${problems.slice(0, 5).join('; ')}${more}`);
  }
}

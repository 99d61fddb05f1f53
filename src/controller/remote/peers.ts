// The peer channel of one storage system (docs/replication.md): its links to the storage systems
// it shares pairs with, its listener, the exports peers reach over data connections, and its
// parts of pairs across storage systems, by name (where peer requests are routed). Links and
// parts are made at start, and at run time when a pair gains a mirror in a storage system this
// one shared nothing with. The run-time steps of remote-membership.ts act here: a part joins,
// is reshaped (the master's) or leaves, with host I/O held at the volumes' switch layer.
import fs from 'node:fs';
import type { Socket } from 'node:net';
import path from 'node:path';
import type { Logger } from 'pino';
import { ExportTable } from '../../nbd/exports.js';
import type { NbdServer } from '../../nbd/server.js';
import { AllowList } from '../../util/allow-list.js';
import { FileBitmapStore, MemoryBitmapStore, markRuns } from '../bitmap-store.js';
import { PeerLink, PeerServer } from '../peer/link.js';
import { OPS, type Op, type RequestOf } from '../peer/messages.js';
import type { PairController } from '../pair-controller.js';
import type { StorageSystemSpec } from '../storage-system.js';
import type { VolRef } from '../status.js';
import type { SyncDaemon } from '../sync-daemon.js';
import type { VolumeStack } from '../volume-stack.js';
import { setBits } from './bits.js';
import type { RemotePairSpec } from './context.js';
import { RemotePair } from './remote-pair.js';

export interface PeersHost {
  /** The spec the storage system runs now (reconfiguration replaces it). */
  spec: () => StorageSystemSpec;
  log: Logger;
  daemon: SyncDaemon;
  volumes: Map<number, VolumeStack>;
  nbd: NbdServer;
  onSuspend: () => ((pair: string, mirrors: VolRef[], reason: string) => Promise<void>) | undefined;
  /** The storage system's table of pairs: a part that joins or leaves enters or leaves it. */
  addPair: (p: PairController) => void;
  removePair: (p: PairController) => void;
  /** Export a volume to hosts again, as its pair (or none) now says. */
  reexport: (v: VolumeStack) => void;
}

export class Peers {
  readonly links = new Map<number, PeerLink>();
  /** What peers reach over data connections of the peer channel (remote/context.ts). */
  readonly exports = new ExportTable();
  readonly remotes = new Map<string, RemotePair>();
  private server: PeerServer | null = null;

  constructor(private readonly host: PeersHost) {}

  private get dir(): string | undefined {
    const { dataDir } = this.host.spec();
    return dataDir ? path.join(dataDir, 'pairs') : undefined;
  }

  /** The control channel to one peer; requests are routed to our part of the pair they name. */
  linkTo(peer: { id: number; peer: { host: string; port: number } }): PeerLink {
    const spec = this.host.spec();
    const link = new PeerLink({ self: spec.id, peer: peer.id, address: peer.peer, timeoutMs: spec.peerTimeout ?? 5000, log: this.host.log, ...(spec.peerTls ? { tls: spec.peerTls } : {}) });
    this.links.set(peer.id, link);
    const route = <K extends Op>(op: K) =>
      link.onRequest(op, (body: RequestOf<K>) => {
        const rp = this.remotes.get(body.pair);
        if (!rp || !rp.copies.some((c) => c.ss === peer.id)) throw new Error(`storage system ${spec.id} has no pair ${body.pair} shared with storage system ${peer.id}`);
        return rp.handle(peer.id, op, body);
      });
    for (const op of OPS) route(op);
    return link;
  }

  /** Our part of a pair across storage systems (not opened yet). */
  remotePair(given: RemotePairSpec): RemotePair {
    const spec = this.host.spec();
    const { volumes } = this.host;
    const dir = this.dir;
    const clusters = (size: number) => Math.ceil(size / spec.clusterSize);
    // Our own copy: `configure` and `reshape` change it at run time, and the spec it came from stays as it was.
    const p = { ...given, mirrors: given.mirrors.map((m) => ({ ...m })) };
    const mine = [p.master, ...p.mirrors].filter((r) => r.ss === spec.id);
    for (const ref of mine) if (!volumes.has(ref.vol)) throw new Error(`pair ${p.name}: ss${ref.ss}/vol${ref.vol} is not a volume of storage system ${spec.id}`);
    const size = volumes.get(mine[0]!.vol)!.size;
    const onSuspend = this.host.onSuspend();
    return new RemotePair(p, {
      self: spec.id,
      clusterSize: spec.clusterSize,
      peerTimeout: spec.peerTimeout ?? 5000,
      volumes: new Map(mine.map((r) => [r.vol, { device: volumes.get(r.vol)!.device, createdEmpty: volumes.get(r.vol)!.createdEmpty }])),
      links: this.links,
      peerExports: this.exports,
      daemon: this.host.daemon,
      openStore: async (slots, opts) => {
        const geometry = { clusterSize: spec.clusterSize, clusters: clusters(size), mirrors: slots };
        if (!dir) {
          const store = new MemoryBitmapStore(geometry.clusters, slots);
          for (const [m, bits] of (opts?.seed ?? []).entries()) await markRuns(store, m, setBits(bits, geometry.clusters));
          return { store, loaded: opts?.seed ?? null };
        }
        const file = path.join(dir, `${p.name}.bitmap`);
        if (opts?.seed) return { store: await FileBitmapStore.replace(file, geometry, opts.copies, opts.seed), loaded: opts.seed };
        return FileBitmapStore.open(file, geometry, this.host.log, opts?.copies);
      },
      ...(dir ? { generationFile: path.join(dir, `${p.name}.generation.json`), statePath: path.join(dir, `${p.name}.state.json`) } : {}),
      ...(onSuspend ? { onSuspend } : {}),
      log: this.host.log,
    });
  }

  /** Listen on our peer address (once): control and data connections from the peers. */
  async listen(): Promise<void> {
    const spec = this.host.spec();
    if (this.server || !spec.peer) return;
    // Data connections from peers get NBD on the peer exports only, as the storage system their credential names.
    const onData = (socket: Socket, from: number) => this.host.nbd.serveConnection(socket, this.exports, `ss${from}`);
    const server = new PeerServer(spec.id, this.links, this.host.log, { ...(spec.peerTls ? { tls: spec.peerTls } : {}), onData });
    await server.listen(spec.peer);
    this.server = server;
  }

  /**
   * Links to the peers `next` names that have none yet (a mirror in a storage system this one
   * shared no pair with), and our listener if it had none; they dial as at start. With `wait`
   * (the master, before it attaches a new mirror), waits for the new links to come up, at most
   * the peer timeout and two redials. Returns the storage systems linked anew, for `unlink`.
   */
  async linkPeers(next: StorageSystemSpec, wait: boolean): Promise<number[]> {
    const fresh = (next.peers ?? []).filter((p) => !this.links.has(p.id)).map((p) => this.linkTo(p));
    if (fresh.length === 0) return [];
    await this.listen().catch(async (e: unknown) => {
      await this.unlink(fresh.map((l) => l.peer));
      throw e;
    });
    for (const l of fresh) l.start();
    if (wait) {
      const ms = (next.peerTimeout ?? 5000) + 2000;
      await Promise.all(
        fresh.map((l) =>
          l.up
            ? undefined
            : new Promise<void>((r) => {
                const t = setTimeout(r, ms);
                l.once('up', () => (clearTimeout(t), r()));
              }),
        ),
      );
    }
    return fresh.map((l) => l.peer);
  }

  /**
   * Forget links `linkPeers` made, when the change that needed them failed or was undone: they
   * stop dialling, and our listener closes if no link is left (as a storage system that shares
   * no pair starts without one).
   */
  async unlink(ids: number[]): Promise<void> {
    for (const id of ids) {
      this.links.get(id)?.close();
      this.links.delete(id);
    }
    if (ids.length > 0 && this.links.size === 0) {
      await this.server?.close();
      this.server = null;
    }
  }

  /**
   * Close the links to storage systems `next` shares no pair with any more (a removed mirror's,
   * once the change is applied everywhere in this process), as a start with `next` would not
   * make them: they stop dialling, and a storage system left with no peer closes its listener.
   */
  async unlinkUnshared(next: StorageSystemSpec): Promise<void> {
    const shared = new Set((next.peers ?? []).map((p) => p.id));
    await this.unlink([...this.links.keys()].filter((id) => !shared.has(id)));
  }

  /** Is the peer channel to storage system `ss` up? Undefined: no link to it yet. */
  peerUp(ss: number): boolean | undefined {
    return this.links.get(ss)?.up;
  }

  /** The master's part: add and remove mirrors of pair `name`, with host I/O held; on a failure, back to `prev`. */
  async reshape(name: string, next: RemotePairSpec, prev: RemotePairSpec): Promise<void> {
    const rp = this.remotes.get(name)!;
    rp.checkReshape(next); // a new mirror's storage system is down: nothing to go back from
    const stacks = rp.volumes.map((id) => this.host.volumes.get(id)!);
    await Promise.all(stacks.map((v) => v.slot!.hold()));
    try {
      await rp.reshape(next);
    } catch (e) {
      await rp.reshape(prev).catch((u: Error) => this.host.log.error({ pair: name, err: u.message }, `pair ${name}: could not go back to its mirrors before the failed change`));
      throw e;
    } finally {
      for (const v of stacks) {
        v.slot!.release();
        this.exportVolume(v, rp);
      }
    }
  }

  /** On a mirror of pair `name`: the other copies as the YAML now says. */
  setCopies(name: string, next: RemotePairSpec): void {
    this.remotes.get(name)!.setCopies(next);
  }

  /**
   * A simplex volume of ours becomes a mirror of a pair across storage systems: our part of it
   * starts as at start-up, in a first generation (any file of an older membership dropped), and
   * the master's attach brings the epoch and a full copy.
   */
  async join(spec: RemotePairSpec): Promise<void> {
    const self = this.host.spec().id;
    const mine = [spec.master, ...spec.mirrors].find((r) => r.ss === self)!;
    const v = this.host.volumes.get(mine.vol)!;
    this.removeFiles(spec.name);
    await v.slot!.hold();
    let rp: RemotePair | undefined;
    try {
      rp = this.remotePair(spec);
      await rp.open();
      this.remotes.set(spec.name, rp);
      this.host.addPair(rp);
    } finally {
      v.slot!.release(rp ? rp.hostDevice(v.id) : v.device);
      if (rp) this.exportVolume(v, rp);
      this.host.reexport(v);
    }
  }

  /** Our mirror leaves pair `name` (its master stopped replicating to it first): a simplex volume with its data. */
  async leave(name: string): Promise<void> {
    const rp = this.remotes.get(name)!;
    const stacks = rp.volumes.map((id) => this.host.volumes.get(id)!);
    await Promise.all(stacks.map((v) => v.slot!.hold()));
    try {
      await rp.close();
      this.remotes.delete(name);
      this.host.removePair(rp);
      this.removeFiles(name);
    } finally {
      for (const v of stacks) {
        v.slot!.release(v.device);
        this.exports.remove(`vol${v.id}`);
        this.host.reexport(v);
      }
    }
  }

  /** vol<ID> on the peer channel, for the other copies of its pair (a mirror reads its Invalid clusters here). */
  exportVolume(v: VolumeStack, pair: RemotePair): void {
    const spec = this.host.spec();
    const members = pair.copies.filter((c) => c.ss !== spec.id).map((c) => `ss${c.ss}`);
    this.exports.remove(`vol${v.id}`);
    this.exports.add({ name: `vol${v.id}`, description: `SS${spec.id} vol${v.id} for the peers of ${pair.name}`, device: v.front!.nbd, readOnly: true, hidden: true, allow: new AllowList(members) });
  }

  /** The files of our part of pair `name` (an old membership's, before a join; ours, after a leave). */
  removeFiles(name: string): void {
    const dir = this.dir;
    if (dir) for (const f of ['bitmap', 'generation.json', 'state.json']) fs.rmSync(path.join(dir, `${name}.${f}`), { force: true });
  }

  async close(): Promise<void> {
    await this.server?.close();
    for (const l of this.links.values()) l.close();
  }
}

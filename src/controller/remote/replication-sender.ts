// A mirror volume in another storage system, as the master's pair writes it: NBD, over a data
// connection of the peer channel, to that storage system's replication export for this session. Every request is bounded by the peer timeout; a
// failure takes the link down, so the next session starts clean. A fault on the link applies here
// too: `drop` holds requests until the link is declared down, `reset` fails them at once.
import { BlockDeviceError, toBlockDeviceError, type BlockDevice, type Extent, type Payload, type ZeroOptions } from '../../blockdev/types.js';
import { connectTransport, type NbdClient } from '../../nbd/client.js';
import type { PeerLink } from '../peer/link.js';
import type { VolRef } from '../status.js';
import type { RemotePairContext } from './context.js';

export function replicationExport(vol: number, token: string): string {
  return `.replication/vol${vol}/${token}`;
}

/** Wait out a link fault on the data path: a silent cut hangs until the link is down; a reset fails now. */
export async function linkFaultGate(link: PeerLink, what: string): Promise<void> {
  const f = link.fault;
  if (!f || f.kind === 'delay') {
    if (f?.kind === 'delay') await new Promise((r) => setTimeout(r, (f.ms ?? 0) + (f.jitter ? Math.random() * f.jitter : 0)));
    return;
  }
  if (f.kind === 'drop' && link.up) await new Promise((r) => link.once('down', r));
  throw new BlockDeviceError('EIO', `${what}: the link to storage system ${link.peer} is cut (injected fault: ${f.kind})`);
}

const FUA = { fua: true } as const;
const PLAIN = { fua: false } as const;

export class ReplicationSender implements BlockDevice {
  readonly readOnly = false;
  readonly multiConnSafe = true;
  readonly fastZero = false;
  private client: NbdClient | null = null;
  private readonly what: string;

  constructor(
    private readonly ref: VolRef,
    private readonly ctx: RemotePairContext,
    private readonly link: PeerLink,
    readonly size: number,
  ) {
    this.what = `mirror ss${ref.ss}/vol${ref.vol}`;
  }

  async open(token: string): Promise<void> {
    this.disconnect();
    // One connection: the requests pipeline on it, and more connections measured slower (bench/RESULTS.md).
    // It is a data connection on the peer channel, authenticated like the control connection.
    const exportName = replicationExport(this.ref.vol, token);
    this.client = await connectTransport(await this.link.openData(exportName), { exportName, timeoutMs: this.ctx.peerTimeout });
  }

  disconnect(): void {
    const c = this.client;
    this.client = null;
    if (c) void c.close().catch(() => {});
  }

  /** The pair does not own the remote volume: closing it only ends our connection. */
  async close(): Promise<void> {
    this.disconnect();
  }

  private async run<T>(op: (c: NbdClient) => Promise<T>): Promise<T> {
    const c = this.client;
    if (!c) throw new BlockDeviceError('EIO', `${this.what}: no replication session`);
    try {
      if (this.link.fault) await linkFaultGate(this.link, this.what);
      return await op(c);
    } catch (e) {
      return this.failed(e);
    }
  }

  /** A request failed: the link goes down (the next session starts clean) and the caller gets the error. */
  private readonly failed = (e: unknown): never => {
    const err = toBlockDeviceError(e, this.what);
    this.link.drop(`replication to ss${this.ref.ss}/vol${this.ref.vol} failed: ${err.message}`);
    throw err;
  };

  read(offset: number, dest: Buffer): Promise<void> {
    return this.run(async (c) => {
      await c.pread(dest, offset);
    });
  }

  /**
   * Every write of a sync pair comes here: with a session and no injected fault it is the client's
   * own promise with one handler, not an async wrapper, a closure and an options object per write.
   */
  write(offset: number, data: Payload, fua = false): Promise<void> {
    const c = this.client;
    if (!c || this.link.fault) return this.run((c) => c.pwrite(data, offset, { fua }));
    return c.pwrite(data, offset, fua ? FUA : PLAIN).catch(this.failed);
  }

  flush(): Promise<void> {
    return this.run((c) => c.flush());
  }

  trim(offset: number, length: number, fua = false): Promise<void> {
    return this.run((c) => c.trim(offset, length, { fua }));
  }

  zero(offset: number, length: number, opts: ZeroOptions = {}): Promise<void> {
    return this.run((c) => c.zero(offset, length, { fua: opts.fua === true }));
  }

  /** The master reports its own extents; nobody asks the mirror's through the sender. */
  async extents(_offset: number, length: number): Promise<Extent[]> {
    return [{ length, flags: 0 }];
  }
}

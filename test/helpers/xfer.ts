// Test seams for the transfer layer: volumes on files, paths that fail or corrupt on cue, and a
// send/recv pair run in one process.
import fs from 'node:fs';
import path from 'node:path';
import { Readable } from 'node:stream';
import { openPath, type XferPath } from '../../src/xfer/paths.js';
import { XferVolume, formatVolume, type Geometry } from '../../src/xfer/volume.js';
import { send, type SendResult } from '../../src/xfer/sender.js';
import { recv, type RecvOptions, type RecvResult } from '../../src/xfer/receiver.js';
import type { SessionOptions } from '../../src/xfer/session.js';
import { tmpDir } from './servers.js';

export async function formattedFiles(g: Geometry, devices = 1, bytes = 32 << 20): Promise<string[]> {
  const dir = tmpDir('bm-xfer-');
  const files = Array.from({ length: devices }, (_, i) => path.join(dir, `dev${i}.img`));
  for (const f of files) {
    fs.writeFileSync(f, '');
    fs.truncateSync(f, bytes);
  }
  await formatVolume(files, g);
  return files;
}

/** A path that passes through, except what `hook` changes: it may throw, or return other bytes. */
export class HookedPath implements XferPath {
  constructor(
    private readonly inner: XferPath,
    readonly hook: {
      read?: (offset: number, data: Buffer) => Buffer | undefined | Promise<Buffer | undefined>;
      write?: (offset: number, data: Buffer) => void;
      reconnect?: () => boolean;
    } = {},
  ) {}
  get name(): string {
    return `hooked ${this.inner.name}`;
  }
  get size(): number {
    return this.inner.size;
  }
  async read(offset: number, length: number): Promise<Buffer> {
    const b = await this.inner.read(offset, length);
    return (await this.hook.read?.(offset, b)) ?? b;
  }
  async write(offset: number, data: Buffer): Promise<void> {
    this.hook.write?.(offset, data);
    return this.inner.write(offset, data);
  }
  reconnect(): Promise<boolean> {
    return Promise.resolve(this.hook.reconnect?.() ?? false);
  }
  close(): Promise<void> {
    return this.inner.close();
  }
}

export async function volumeOf(files: string[], wrap?: (p: XferPath, i: number) => XferPath): Promise<XferVolume> {
  const paths = await Promise.all(files.map((f) => openPath(f)));
  return XferVolume.fromPaths(wrap ? paths.map(wrap) : paths);
}

export const FAST: SessionOptions = { pollMs: 2, heartbeatMs: 20, timeoutMs: 5000, retries: 20 };

/** Send `data` from 1 to 2 and receive it, each side on its own volume handle. */
export async function exchange(
  a: XferVolume,
  b: XferVolume,
  data: Buffer,
  ids: { from: number; to: number } = { from: 1, to: 2 },
  opts: { send?: SessionOptions; recv?: RecvOptions } = {},
): Promise<{ sent: SendResult; got: RecvResult; out: Buffer }> {
  const parts: Buffer[] = [];
  const [sent, got] = await Promise.all([
    send(a, ids.from, ids.to, Readable.from([data]), { ...FAST, ...opts.send }),
    recv(b, ids.to, async (d) => void parts.push(Buffer.from(d)), { ...FAST, ...opts.recv }),
  ]);
  return { sent, got, out: Buffer.concat(parts) };
}

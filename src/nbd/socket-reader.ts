// Exact-length reads over a socket for the handshake phase, where clarity
// matters more than speed: each step awaits the bytes it needs.
import type { Socket } from 'node:net';
import { ByteQueue } from '../protocol/byte-queue.js';

export class ConnectionClosed extends Error {
  override readonly name = 'ConnectionClosed';
}

export class SocketReader {
  readonly queue = new ByteQueue();
  private waiter: { n: number; resolve: () => void; reject: (e: Error) => void } | null = null;
  private ended: Error | null = null;
  private readonly onData = (chunk: Buffer) => {
    this.queue.push(chunk);
    this.wake();
  };
  private readonly onEnd = () => this.fail(new ConnectionClosed('client closed the connection'));
  private readonly onError = (e: Error) => this.fail(e);

  constructor(private readonly socket: Socket) {
    socket.on('data', this.onData);
    socket.on('end', this.onEnd);
    socket.on('close', this.onEnd);
    socket.on('error', this.onError);
  }

  /** Resolve once n bytes are queued. */
  private need(n: number): Promise<void> {
    if (this.queue.length >= n) return Promise.resolve();
    if (this.ended) return Promise.reject(this.ended);
    return new Promise((resolve, reject) => {
      this.waiter = { n, resolve, reject };
    });
  }

  async read(n: number): Promise<Buffer> {
    await this.need(n);
    return this.queue.take(n);
  }

  /** Discard n bytes as they arrive, never holding more than what one chunk brings. */
  async skip(n: number): Promise<void> {
    let left = n;
    while (left > 0) {
      await this.need(1);
      left -= this.queue.skip(left);
    }
  }

  /** Stop listening; the queue keeps whatever arrived beyond the handshake. */
  detach(): ByteQueue {
    this.socket.off('data', this.onData);
    this.socket.off('end', this.onEnd);
    this.socket.off('close', this.onEnd);
    this.socket.off('error', this.onError);
    return this.queue;
  }

  private wake(): void {
    const w = this.waiter;
    if (w && this.queue.length >= w.n) {
      this.waiter = null;
      w.resolve();
    }
  }

  private fail(e: Error): void {
    if (!this.ended) this.ended = e;
    const w = this.waiter;
    if (w) {
      this.waiter = null;
      w.reject(e);
    }
  }
}

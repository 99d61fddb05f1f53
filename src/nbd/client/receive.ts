// NBD client receive side: READ payloads read straight into the caller's buffer.
//
// A net.Socket in its default mode reads at most 64 KiB per syscall into a fresh buffer, which the
// client then copied into the READ's destination: for `cfs get` that copy was 44% of the CLI's
// busy time (bench/RESULTS.md, cfs-client). With `onread`, the socket reads into a buffer we choose
// before each read, so:
//
//   state after the last read                      next read goes to
//   inside a READ payload with >= DIRECT_MIN left  the caller's buffer, at the payload's place, at
//                                                  most the payload's remaining length (never the next
//                                                  reply's header)
//   anything else (headers, small payloads,        one reused scratch buffer: the parser copies what
//   status chunks, the handshake)                  it keeps (headers straddling reads, small payload
//                                                  pieces into the destination) before it is reused
//
// so of each READ payload at most the scratch read that brought its header and a tail under
// DIRECT_MIN are copied (the tail comes with the next headers), and many small replies still
// arrive in one syscall. Node calls `buffer()` right after each callback, so the choice
// always follows the parser's state; the only other things that change that state (a timeout, a
// close) destroy the socket, after which nothing more is read into a caller's buffer.
//
// Only sockets the client makes itself get this (connect() without TLS): `onread` must be given
// when the socket is created, a TLS socket's reads are the TLS layer's decrypted records, and a
// transport handed to connectTransport() belongs to the caller. Those keep the 'data' path.
import type { Inbox } from './handshake.js';

/** Bytes of a READ payload still to come for which reading straight into the destination beats the scratch buffer. */
export const DIRECT_MIN = 32 * 1024;
/** The scratch buffer: one read can bring this many bytes of headers and small replies. */
export const SCRATCH = 64 * 1024;

/** The transmission phase's side: where a payload's next bytes belong, and what arrived. */
export interface DirectReceiver {
  /** The part of a READ's buffer the next read may fill, or undefined for the scratch buffer. */
  directTarget(): Buffer | undefined;
  /** n bytes were read into the buffer directTarget() returned. False: stop reading. */
  directFilled(n: number): boolean;
  /** n bytes were read into the scratch buffer, which is reused once this returns. False: stop reading. */
  received(scratch: Buffer, n: number): boolean;
}

/**
 * The `onread` of a socket made by connect(): reads go to the handshake's Inbox (copied, they are
 * few and small) until a DirectReceiver takes over.
 */
export class DirectReads {
  private readonly scratch = Buffer.allocUnsafeSlow(SCRATCH);
  private inbox: Inbox | undefined;
  private early: Buffer[] = [];
  private receiver: DirectReceiver | undefined;

  readonly onread = {
    buffer: (): Buffer => this.receiver?.directTarget() ?? this.scratch,
    callback: (n: number, buf: Buffer): boolean => {
      const r = this.receiver;
      if (r) return buf === this.scratch ? r.received(buf, n) : r.directFilled(n);
      const copy = Buffer.copyBytesFrom(buf, 0, n);
      if (this.inbox) this.inbox.receive(copy);
      else this.early.push(copy);
      return true;
    },
  };

  /** The handshake starts: bytes read so far (none, normally) and from now on go to `inbox`. */
  attach(inbox: Inbox): void {
    this.inbox = inbox;
    for (const c of this.early) inbox.receive(c);
    this.early = [];
  }

  /** The transmission phase starts (after the Inbox handed over what it held). */
  takeOver(receiver: DirectReceiver): void {
    this.receiver = receiver;
  }
}

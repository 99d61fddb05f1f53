// Transmission phase of one connection: frame requests, check them at one
// choke point, pass them to the block device, answer (possibly out of
// order) with simple or structured replies.
//
// Three outcomes are kept apart:
//   a bad request       -> an error reply, the connection goes on;
//   a broken stream     -> (bad magic, socket error) that connection is destroyed;
//   DISC                -> in-flight requests finish, then a clean close.
import type { Socket } from 'node:net';
import type { Logger } from 'pino';
import {
  CHUNK_HEADER_SIZE,
  Cmd,
  REQUEST_SIZE,
  CmdFlag,
  MAX_PAYLOAD,
  NbdErr,
  ReplyFlag,
  ReplyType,
  TransmissionFlag as TF,
  nameOf,
} from '../protocol/constants.js';
import { DIRECT_MIN, RequestParser, type Request } from '../protocol/requests.js';
import {
  encodeBlockStatusChunk,
  encodeErrorChunk,
  encodeSimpleReply,
  writeChunkHeader,
} from '../protocol/server-codec.js';
import type { BlockDevice, Extent, WriteTarget } from '../blockdev/types.js';
import { nbdErrorFor } from './errors.js';
import { ioBuffers as replyBuffers } from '../util/buffer-pool.js';
import { adopt } from '../util/read-into.js';
import { ScratchBuffers } from './scratch.js';
import { BASE_ALLOCATION_ID, allowedFlags, type Negotiated } from './handshake.js';

/** Pause reading when this much reply data is queued or this many requests are in flight. */
const HIGH_WATER_BYTES = 64 * 1024 * 1024;
const MAX_IN_FLIGHT = 512;


/**
 * Reads that do not go into a payload buffer land in a scratch buffer. A read of up to COPY_MAX
 * bytes (headers, small WRITEs) is copied out of it, and the scratch buffer is read into again;
 * a larger one (the start of a large WRITE's payload) is handed to the parser as it is, and the
 * next read gets another scratch buffer (scratch.ts recycles them): copying 128 KiB of every
 * 1 MiB WRITE, twice, was a tenth of a gateway's CPU (bench/RESULTS.md, gateway).
 */
const SCRATCH = 128 * 1024;
const COPY_MAX = 16 * 1024;

/**
 * After a WRITE of at least this many bytes, the next request's header is read alone, so that its
 * payload, if it is another large WRITE, lands whole where it belongs (the device's pages, or one
 * pooled buffer) instead of partly in the scratch buffer, whence it was copied: a 256 KiB WRITE
 * (nbdcopy's) had half its bytes copied, 38% of the server's CPU. One more read per request,
 * only while large WRITEs come one after another.
 */
const HEADER_ALONE_AFTER = DIRECT_MIN;

export class Connection {
  private readonly parser: RequestParser;
  private readonly socket: Socket;
  private scratch: ScratchBuffers | null = null;
  /** Where a request header is read alone (HEADER_ALONE_AFTER), and whether the next one is. */
  private readonly headerBuf = Buffer.allocUnsafeSlow(REQUEST_SIZE);
  private headerAlone = false;
  private readonly dev: BlockDevice;
  private readonly size: number;
  private readonly flags: number;
  private readonly allowed: number;
  private readonly sr: boolean;
  private readonly base: boolean;
  private inFlight = 0;
  private inFlightBytes = 0;
  private paused = false;
  private corked = false;
  private closed = false;
  private draining = false; // DISC received or server shutting down: accept no more work
  private idle: (() => void) | null = null;
  /** The device memory the payload of the WRITE now arriving is read into (land), until handle() takes it. */
  private landing: { req: Request; target: WriteTarget } | null = null;
  readonly done: Promise<void>;
  private resolveDone!: () => void;

  constructor(
    accepted: Socket,
    neg: Negotiated,
    private readonly log: Logger,
  ) {
    this.dev = neg.export.device;
    this.size = this.dev.size;
    this.flags = neg.transmissionFlags;
    this.allowed = allowedFlags(this.flags);
    this.sr = neg.structuredReplies;
    this.base = neg.baseAllocation;
    this.done = new Promise((r) => (this.resolveDone = r));

    // Reads straight into payload buffers when the socket can be adopted (read-into.ts), else 'data' events.
    this.parser = new RequestParser(MAX_PAYLOAD, true, this.land);
    this.scratch = new ScratchBuffers(SCRATCH, this.parser);
    const adopted = adopt(accepted, { buffer: this.readTarget, callback: this.onRead });
    if (!adopted) {
      this.scratch = null;
      this.parser = new RequestParser(MAX_PAYLOAD, false);
      accepted.on('data', this.onData);
    }
    const socket = (this.socket = adopted ?? accepted);
    socket.on('drain', this.maybeResume);
    socket.on('error', (e) => {
      this.log.debug({ err: e.message }, 'socket error');
      socket.destroy();
    });
    socket.on('close', () => {
      this.closed = true;
      // A payload cut off mid-way: the device's memory goes back, the volume never saw it.
      this.landing?.target.abort();
      this.landing = null;
      this.resolveDone();
    });
    socket.on('end', () => this.finish());
    // Bytes that arrived with the end of the handshake are the first requests.
    const q = neg.leftover;
    if (q.length > 0) this.onData(q.take(q.length));
  }

  /** Stop accepting requests, answer those in flight, then close. */
  async shutdown(): Promise<void> {
    this.draining = true;
    this.finish();
    await this.done;
  }

  private readonly onData = (chunk: Buffer): void => {
    if (this.closed) return;
    this.parser.push(chunk);
    this.pump();
  };

  /**
   * Where the rest of a large WRITE's payload is read in place: straight into the device's own
   * memory when it offers a write target (a memory volume: no copy at all), else a pooled buffer
   * that write() then copies. Only for a request that will reach the device: a refused one
   * would have to give the target back unused.
   */
  private readonly land = (req: Request, n: number): readonly Buffer[] => {
    if (this.dev.writeTarget && !this.draining && this.validate(req) === null) {
      const target = this.dev.writeTarget(req.offset, req.length, req.length - n);
      if (target) {
        this.landing = { req, target };
        return target.pieces;
      }
    }
    return [replyBuffers.get(n)];
  };

  /** Where the next read lands: the rest of a large WRITE payload, or the scratch buffer. */
  private readonly readTarget = (): Buffer =>
    this.parser.directTarget() ?? (this.headerAlone && this.parser.atBoundary() ? this.headerBuf : this.scratch!.current);

  /** n bytes were read into `buf`; false stops reading (backpressure) until maybeResume(). */
  private readonly onRead = (n: number, buf: Buffer): boolean => {
    if (this.closed) return false;
    const scratch = this.scratch!;
    if (buf.buffer === this.headerBuf.buffer) this.parser.push(Buffer.copyBytesFrom(buf, 0, n));
    else if (buf.buffer !== scratch.current.buffer) this.parser.directFilled(n);
    else if (n <= COPY_MAX) this.parser.push(Buffer.copyBytesFrom(buf, 0, n));
    else {
      // The parser keeps views into these bytes until their requests are done: lend it the buffer.
      this.parser.push(buf.subarray(0, n));
      scratch.lend();
    }
    this.pump();
    scratch.sweep();
    return !this.paused && !this.draining;
  };

  /**
   * Take requests one at a time while under the limits. When over them, stop
   * reading: what is unparsed stays in the parser, and the socket's own
   * buffer pushes back on the client through TCP.
   */
  private pump(): void {
    while (!this.closed && !this.draining) {
      if (this.overLimit()) {
        if (!this.paused) {
          this.paused = true;
          this.socket.pause();
        }
        return;
      }
      const ev = this.parser.next();
      if (!ev) return;
      if (ev.kind === 'request') this.headerAlone = ev.request.type === Cmd.WRITE && ev.request.length >= HEADER_ALONE_AFTER;
      if (ev.kind === 'bad-magic') {
        this.log.warn({ magic: `0x${ev.magic.toString(16)}` }, 'bad request magic: closing connection');
        this.socket.destroy();
        return;
      }
      this.handle(ev.request);
    }
  }

  private overLimit(): boolean {
    return this.inFlight >= MAX_IN_FLIGHT || this.inFlightBytes + this.socket.writableLength >= HIGH_WATER_BYTES;
  }

  private readonly maybeResume = (): void => {
    if (!this.paused || this.draining) return;
    if (this.inFlight < MAX_IN_FLIGHT / 2 && this.inFlightBytes + this.socket.writableLength < HIGH_WATER_BYTES / 2) {
      this.paused = false;
      this.socket.resume();
      this.pump();
    }
  };

  private handle(req: Request): void {
    let target: WriteTarget | undefined;
    if (this.landing?.req === req) {
      target = this.landing.target;
      this.landing = null;
    }
    if (req.type === Cmd.DISC) {
      this.draining = true;
      this.finish();
      return;
    }
    if (this.draining) {
      target?.abort();
      this.replyError(req, NbdErr.ESHUTDOWN, 'server is shutting down');
      return;
    }
    const bad = this.validate(req);
    if (bad) {
      target?.abort();
      this.log.debug({ cmd: nameOf('cmd', req.type), offset: req.offset, length: req.length, err: bad[1] }, 'refused request');
      this.replyError(req, bad[0], bad[1]);
      return;
    }
    const fua = (req.flags & CmdFlag.FUA) !== 0;
    switch (req.type) {
      case Cmd.READ:
        return this.read(req);
      case Cmd.WRITE: {
        const payload = req.payload!;
        this.scratch?.hold(payload);
        if (target) {
          // The landed pieces are the device's already; only the bytes that came with the header are copied.
          const head = payload.slice(0, payload.length - req.landed!.length);
          return this.track(req, req.length, target.commit(head, fua), undefined, payload);
        }
        return this.track(req, req.length, this.dev.write(req.offset, payload, fua), req.landed?.[0], payload);
      }
      case Cmd.FLUSH:
        return this.track(req, 0, this.dev.flush());
      case Cmd.TRIM:
        return this.track(req, 0, this.dev.trim(req.offset, req.length, fua));
      case Cmd.WRITE_ZEROES:
        return this.track(
          req,
          0,
          this.dev.zero(req.offset, req.length, {
            fua,
            noHole: (req.flags & CmdFlag.NO_HOLE) !== 0,
            fastZero: (req.flags & CmdFlag.FAST_ZERO) !== 0,
          }),
        );
      case Cmd.CACHE:
        return this.track(req, 0, this.dev.cache ? this.dev.cache(req.offset, req.length) : Promise.resolve());
      case Cmd.BLOCK_STATUS:
        return this.blockStatus(req);
    }
  }

  /** The choke point: [errno, message] for a request that must not reach the device. Order follows nbdkit. */
  private validate(req: Request): [number, string] | null {
    const { type, flags, offset, length } = req;
    switch (type) {
      case Cmd.READ:
      case Cmd.WRITE:
      case Cmd.TRIM:
      case Cmd.WRITE_ZEROES:
      case Cmd.CACHE:
      case Cmd.BLOCK_STATUS:
        if (length === 0 || offset + length > this.size) {
          const errno = type === Cmd.WRITE || type === Cmd.WRITE_ZEROES ? NbdErr.ENOSPC : NbdErr.EINVAL;
          return [errno, `${nameOf('cmd', type)}: offset ${offset} length ${length} is outside the export (size ${this.size})`];
        }
        break;
      case Cmd.FLUSH:
        if (offset !== 0 || length !== 0) return [NbdErr.EINVAL, 'FLUSH: offset and length must be 0'];
        break;
      default:
        return [NbdErr.EINVAL, `unknown command ${type}`];
    }
    // Before the flag checks: a read-only export advertises no FUA, and EPERM is the real reason.
    if (this.flags & TF.READ_ONLY && (type === Cmd.WRITE || type === Cmd.TRIM || type === Cmd.WRITE_ZEROES)) {
      return [NbdErr.EPERM, `${nameOf('cmd', type)}: export is read-only`];
    }
    if (flags & ~this.allowed) return [NbdErr.EINVAL, `unsupported flags 0x${flags.toString(16)}`];
    if (flags & (CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO) && type !== Cmd.WRITE_ZEROES) {
      return [NbdErr.EINVAL, 'NO_HOLE and FAST_ZERO apply to WRITE_ZEROES only'];
    }
    if (flags & CmdFlag.DF && type !== Cmd.READ) return [NbdErr.EINVAL, 'DF applies to READ only'];
    if (flags & CmdFlag.REQ_ONE && type !== Cmd.BLOCK_STATUS) return [NbdErr.EINVAL, 'REQ_ONE applies to BLOCK_STATUS only'];
    if ((type === Cmd.READ || type === Cmd.WRITE) && (length > MAX_PAYLOAD || req.oversize)) {
      return [NbdErr.EINVAL, `${nameOf('cmd', type)}: length ${length} exceeds the maximum payload ${MAX_PAYLOAD}`];
    }
    if (type === Cmd.BLOCK_STATUS && !(this.sr && this.base)) {
      return [NbdErr.EINVAL, 'BLOCK_STATUS needs structured replies and base:allocation'];
    }
    return null;
  }

  private read(req: Request): void {
    const { length } = req;
    // Zero-copy when the device can lend its own memory: the views stay stable until the socket's
    // write of the last one completes (libuv calls back once the kernel has the bytes).
    const views = this.dev.readViews?.(req.offset, length);
    if (views) {
      this.send(this.readHead(req));
      const { pieces } = views;
      for (let i = 0; i < pieces.length - 1; i++) this.send(pieces[i]!);
      this.send(pieces[pieces.length - 1]!, false, views.release);
      return;
    }
    // The header apart from the data: a power-of-two read then takes a buffer of its own size
    // from the pool, not one of twice its size (RSS); both leave in the same writev (send corks).
    const buf = replyBuffers.get(length);
    this.begin(length);
    this.dev.read(req.offset, buf).then(
      () => {
        this.send(this.readHead(req));
        this.send(buf, true);
        this.end(length);
      },
      (err) => {
        replyBuffers.put(buf);
        this.replyError(req, nbdErrorFor(err, req.flags), errMessage(err));
        this.end(length);
      },
    );
  }

  /** The header of a successful READ's reply; its data follows. */
  private readHead(req: Request): Buffer {
    if (!this.sr) return encodeSimpleReply(0, req.cookie);
    const head = Buffer.allocUnsafe(CHUNK_HEADER_SIZE + 8);
    writeChunkHeader(head, 0, ReplyFlag.DONE, ReplyType.OFFSET_DATA, req.cookie, 8 + req.length);
    head.writeUInt32BE(Math.floor(req.offset / 2 ** 32), CHUNK_HEADER_SIZE);
    head.writeUInt32BE(req.offset >>> 0, CHUNK_HEADER_SIZE + 4);
    return head;
  }

  private blockStatus(req: Request): void {
    this.begin(0);
    this.dev.extents(req.offset, req.length).then(
      (extents) => {
        let list: Extent[] = extents.length > 0 ? extents : [{ length: req.length, flags: 0 }];
        if (req.flags & CmdFlag.REQ_ONE) list = [{ length: Math.min(list[0]!.length, req.length), flags: list[0]!.flags }];
        this.send(encodeBlockStatusChunk(req.cookie, BASE_ALLOCATION_ID, list));
        this.end(0);
      },
      (err) => {
        this.replyError(req, nbdErrorFor(err, req.flags), errMessage(err));
        this.end(0);
      },
    );
  }

  /** Run a command whose success reply carries no data; then give back its payload's buffers. */
  private track(req: Request, bytes: number, op: Promise<void>, release?: Buffer, pieces?: Buffer[]): void {
    this.begin(bytes);
    op.then(
      () => {
        if (release) replyBuffers.put(release);
        if (pieces) this.scratch?.release(pieces);
        this.send(encodeSimpleReply(0, req.cookie));
        this.end(bytes);
      },
      (err) => {
        if (release) replyBuffers.put(release);
        if (pieces) this.scratch?.release(pieces);
        this.log.debug({ cmd: nameOf('cmd', req.type), err: errMessage(err) }, 'device error');
        this.replyError(req, nbdErrorFor(err, req.flags), errMessage(err));
        this.end(bytes);
      },
    );
  }

  private begin(bytes: number): void {
    this.inFlight++;
    this.inFlightBytes += bytes;
  }

  private end(bytes: number): void {
    this.inFlight--;
    this.inFlightBytes -= bytes;
    if (this.inFlight === 0 && this.idle) this.idle();
    else this.maybeResume();
  }

  private replyError(req: Request, errno: number, message: string): void {
    // Structured replies let the client see why; the message is for humans.
    this.send(this.sr ? encodeErrorChunk(req.cookie, errno, message) : encodeSimpleReply(errno, req.cookie));
  }

  /**
   * Queue a reply. Replies finished in the same tick (all the requests of one
   * received chunk, for a memory device) leave in one writev. A pooled READ
   * buffer goes back to the pool once the kernel has it, and `sent` runs then
   * (or at once when the socket is gone; an errored write calls back too).
   */
  private send(buf: Buffer, pooled = false, sent?: () => void): void {
    if (this.closed || this.socket.destroyed) {
      if (pooled) replyBuffers.put(buf);
      sent?.();
      return;
    }
    if (!this.corked) {
      this.corked = true;
      this.socket.cork();
      process.nextTick(this.uncork);
    }
    if (pooled) this.socket.write(buf, () => replyBuffers.put(buf));
    else if (sent) this.socket.write(buf, sent);
    else this.socket.write(buf);
  }

  private readonly uncork = (): void => {
    this.corked = false;
    if (!this.socket.destroyed) this.socket.uncork();
  };

  /** After DISC, EOF or shutdown: wait for in-flight requests, then end the socket. */
  private finish(): void {
    if (this.idle) return;
    this.socket.pause();
    const close = () => {
      if (this.corked) this.uncork();
      // Ending our side is not enough: a paused reader never sees EOF, so close outright once the replies are out.
      this.socket.end(() => this.socket.destroy());
    };
    if (this.inFlight === 0) close();
    else this.idle = close;
  }
}

function errMessage(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

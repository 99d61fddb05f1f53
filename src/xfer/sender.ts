// The writer's side of a connection (seed 4, flows 1, 2 and 4):
//
//   claim a free slot      write our requestor half (CONNECT, a fresh token), wait, read it back:
//                          still ours, or another sender won the slot and we look again
//   fresh pointer table    all entries FREE, under our token; then CONNECT/PENDING, which is what
//                          a receiver waits for
//   wait for ACCEPTED      in the requestee half, with our token
//   per piece of input     entry i = (seq-1) mod E, reused only once the receiver acknowledged it;
//                          the segment (header + data) is written first, and its entry goes into
//                          the next pointer-table write once that completed: data before
//                          pointers, whatever paths carry them. Messages follow each other on the
//                          connection; the last piece of each is END, the connection's last LAST
//   after the last ack     free the pointer table, then our half of the process ID table
import { xxh64Low } from '../util/xxh64.js';
import { AckFlag, Command, PTR, Piece, PtrFlag, Role, SEG, SEG_HEADER, Status, freePid, freePtr, type AckEntry, type AckTable, type PtrEntry, type PtrTable, type TableView } from './layout.js';
import { BufferPool } from './pool.js';
import { XferPeerError, XferTableFullError } from './errors.js';
import { Backoff, OwnHalf, PeerWatch, newToken, sleep, standingStill, tunables, type SessionOptions, type Tunables } from './session.js';
import { roundUp, type XferVolume } from './volume.js';

export interface SendResult {
  slot: number;
  token: number;
  /** Segments written by this call (after a resume: since it), the empty last one of an empty message included. */
  segments: number;
  bytes: number;
}

/** Fills `length` bytes of `buf` from `offset`, or fewer; 0 at the end (a file: read straight into the segment buffers). */
export interface Reader {
  read(buf: Buffer, offset: number, length: number): Promise<number>;
}
/** One message's bytes. */
export type Input = AsyncIterable<Uint8Array> | Reader;
/** The messages of one connection, in order; an array ends the connection with its last message's last piece. */
export type Messages = readonly Input[] | AsyncIterable<Input>;

const isReader = (i: Input): i is Reader => typeof (i as Reader).read === 'function' && !(Symbol.asyncIterator in i);

/** Where a connection goes on: the last sequence written, the message and part of the next piece. */
interface Position {
  seq: number;
  msg: number;
  part: number;
  /** The connection's LAST piece is written already: only its acknowledgement is awaited. */
  done?: boolean;
}

/** Send one message on a connection of its own. */
export function send(vol: XferVolume, from: number, to: number, input: Input, opts: SessionOptions = {}): Promise<SendResult> {
  return sendMessages(vol, from, to, [input], opts);
}

/** Send several messages, in order, on one connection; the receiver gets each whole, with its number. */
export async function sendMessages(vol: XferVolume, from: number, to: number, messages: Messages, opts: SessionOptions = {}): Promise<SendResult> {
  const t = tunables(opts);
  const pool = vol.segmentPool(window(vol) + 2);
  for (;;) {
    // The segment buffers' pages are touched while the claim settles, when we wait anyway.
    const own = await claim(vol, from, to, t, () => pool.warm(window(vol) + 2));
    const { slot, token } = own.entry;
    t.log?.debug({ slot, token }, 'claimed connection slot');
    const ptr: PtrTable = { ...freePtr(slot), token, writer: from };
    try {
      // The pointer table is ours and fresh before a receiver may accept: only then PENDING.
      await vol.writePtr(ptr);
      own.entry.command.status = Status.PENDING;
      await own.write();
      t.log?.debug({ slot }, 'connection pending');
      if (!(await waitAccepted(vol, own, to, t))) {
        // A rival's claim landed after our read-back: the slot is its now, so we write nothing more.
        t.log?.debug({ slot }, 'lost the slot to another sender; claiming again');
        continue;
      }
      t.log?.debug({ slot }, 'accepted');
      const result = await transfer(vol, own, ptr, to, messages, t, { seq: 0, msg: 1, part: 0 }, pool);
      await cleanup(vol, own);
      t.log?.debug({ slot }, 'connection freed');
      return result;
    } catch (e) {
      // We are alive and own these blocks, so we free them ourselves; the receiver sees our token go.
      await cleanup(vol, own).catch((ce: Error) => t.log?.warn({ err: ce.message }, `could not free connection ${slot}; blockmirror xfer gc will`));
      throw e;
    }
  }
}

/**
 * Pick up a connection whose sender died (kill -9, host restart) from the on-disk tables. The
 * pointer table's highest written entry is message m, part p: the next piece is part p+1 of m, at
 * byte (p+1) × capacity of it (every piece but a message's last is full), or, when p ended m, the
 * start of message m+1. `open(msg, offset)` gives the messages from there on, the first one from
 * that byte (messages are numbered from 1).
 */
export async function resumeSend(vol: XferVolume, from: number, to: number, open: (msg: number, offset: number) => Messages, opts: SessionOptions = {}): Promise<SendResult> {
  const t = tunables(opts);
  const table = await vol.readPidTable();
  // Accepted, or still waiting for its receiver: both are taken over (a claim not yet PENDING is not).
  const slot = table.findIndex(({ req }) => req.command.code === Command.CONNECT && req.command.status === Status.PENDING && req.requestor === from && req.requestee === to);
  if (slot < 0) throw new XferPeerError(`no connection from ${from} to ${to} to resume: send again without --resume`);
  const req = await standingStill(vol, slot, 'req', `sender ${from}`, t);
  const own = new OwnHalf(vol, req, t.heartbeatMs);
  await own.write();
  try {
    if (!(await waitAccepted(vol, own, to, t))) throw new XferPeerError(`connection ${slot} was taken by another sender; send again without --resume`);
  } catch (e) {
    await cleanup(vol, own).catch(() => undefined);
    throw e;
  }
  const ptr = await vol.readPtr(slot);
  // PENDING is written only after the fresh pointer table, so another token there means the
  // sender was killed in its cleanup, after the last acknowledgement: only the cleanup is left.
  if (ptr.token !== req.token) {
    await cleanup(vol, own);
    return { slot, token: req.token, segments: 0, bytes: 0 };
  }
  let top: PtrEntry | undefined;
  for (const e of ptr.entries.slice(0, vol.mcb.entries)) if (e.flag === PtrFlag.WRITTEN && e.seq > (top?.seq ?? 0)) top = e;
  const at: Position = !top
    ? { seq: 0, msg: 1, part: 0 }
    : top.last & Piece.LAST
      ? { seq: top.seq, msg: top.msg, part: top.part, done: true }
      : top.last & Piece.END
        ? { seq: top.seq, msg: top.msg + 1, part: 0 }
        : { seq: top.seq, msg: top.msg, part: top.part + 1 };
  t.log?.info({ slot, ...at }, 'resuming connection');
  try {
    const result = await transfer(vol, own, ptr, to, at.done ? [] : open(at.msg, at.part * vol.capacity), t, at, vol.segmentPool(window(vol) + 2));
    await cleanup(vol, own);
    return result;
  } catch (e) {
    await cleanup(vol, own).catch((ce: Error) => t.log?.warn({ err: ce.message }, `could not free connection ${slot}; blockmirror xfer gc will`));
    throw e;
  }
}

/** Segment writes in flight: enough to keep every path busy; the window of E entries bounds them too. */
const window = (vol: XferVolume): number => Math.max(2, Math.min(vol.mcb.entries, vol.inFlight));

/** `whileSettling` runs once our claim is written, and counts towards the settle time. */
async function claim(vol: XferVolume, from: number, to: number, t: Tunables, whileSettling?: () => void): Promise<OwnHalf> {
  const started = Date.now();
  // Long enough for a rival that read the same free slot to have written its claim too.
  const settleMs = Math.max(5 * t.pollMs, 50);
  for (;;) {
    const table = await vol.readPidTable();
    const slot = table.findIndex(({ req, rsp }) => req.command.code === Command.NONE && rsp.command.code === Command.NONE);
    if (slot >= 0) {
      const own = new OwnHalf(
        vol,
        { slot, role: Role.REQUESTOR, requestor: from, requestee: to, token: newToken(), heartbeat: 0, command: { code: Command.CONNECT, status: Status.NONE } },
        t.heartbeatMs,
      );
      await own.write();
      const wrote = performance.now();
      whileSettling?.();
      await sleep(Math.max(0, settleMs - (performance.now() - wrote)), t.signal);
      const { req } = await vol.readPid(slot);
      if (req.token === own.entry.token) return own;
      continue;
    }
    if (Date.now() - started > t.timeoutMs)
      throw new XferTableFullError(`all ${vol.mcb.maxConn} connections of the process ID table are in use (waited ${t.timeoutMs} ms): wait for one to end, or run blockmirror xfer gc to reclaim dead ones`);
    await sleep(t.pollMs, t.signal);
  }
}

/** True once accepted; false when another sender's claim has replaced ours. */
async function waitAccepted(vol: XferVolume, own: OwnHalf, to: number, t: Tunables): Promise<boolean> {
  const started = Date.now();
  // A waiting receiver accepts within a poll interval or two of PENDING: look soon, then less often.
  const backoff = new Backoff(t.pollMs);
  for (;;) {
    const { req, rsp } = await vol.readPid(own.entry.slot);
    if (req.token !== own.entry.token) return false;
    if (rsp.token === own.entry.token && rsp.command.status === Status.ACCEPTED) return true;
    if (Date.now() - started > t.timeoutMs)
      throw new XferPeerError(`no receiver ${to} accepted connection ${own.entry.slot} within ${t.timeoutMs} ms: start blockmirror xfer recv --as ${to} on the other host`);
    await own.beat();
    await backoff.sleep(t.signal);
  }
}

async function transfer(
  vol: XferVolume,
  own: OwnHalf,
  ptr: PtrTable,
  to: number,
  messages: Messages,
  t: Tunables,
  /** Where to go on: the last sequence written, and the message and part of the first piece to write. */
  start: Position,
  /** Segment buffers, window(vol) + 2 of them. */
  pool: BufferPool,
): Promise<SendResult> {
  const { slot, token, requestor: from } = own.entry;
  const E = vol.mcb.entries;
  const segs = vol.segments(slot);
  const watch = new PeerWatch(`receiver ${to}`, t.timeoutMs);
  const maxInFlight = window(vol);
  const backoff = new Backoff(t.pollMs);
  // The receiver's acknowledgements as last read, once it wrote them under our token.
  let ack: TableView<AckTable, AckEntry> | undefined;
  let seq = start.seq;
  let bytes = 0;
  // The sequence each entry carries, written or on its way: the entry is reused only once that one is acknowledged.
  const assigned = ptr.entries.map((e) => (e.flag === PtrFlag.WRITTEN ? e.seq : 0));
  const inFlight = new Set<Promise<void>>();
  // Segments whose write completed, by sequence, until every one before them did too.
  const landed = new Map<number, PtrEntry>();
  let tableSeq = start.seq;
  let failure: unknown;
  // The pointer table on the volume, kept encoded here: an entry is set in it only once its
  // segment's write completed (and every earlier one's), and one table write at a time carries
  // all of them: data before pointers, on whatever paths, and the reader sees each segment one
  // table write after its data landed. Each write sends a copy, as the block changes meanwhile.
  const ptrBlock = PTR.encode(ptr);
  let tableWrite: Promise<void> | undefined;
  let tableStale = false;
  const publish = () => {
    if (tableWrite) return void (tableStale = true);
    tableStale = false;
    tableWrite = vol.writePtrBlock(slot, Buffer.from(ptrBlock)).then(
      () => {
        tableWrite = undefined;
        if (tableStale) publish();
      },
      (e: unknown) => {
        failure ??= e;
        tableWrite = undefined;
      },
    );
  };
  const settled = async () => {
    while (inFlight.size > 0 || tableWrite) await Promise.allSettled([...inFlight, tableWrite]);
    if (failure) throw failure;
  };

  const acked = (i: number, s: number) => {
    const e = ack?.entry(i);
    return e !== undefined && e.flag === AckFlag.READ && e.seq === s;
  };
  const isFree = (i: number) => assigned[i] === 0 || acked(i, assigned[i]);
  const poll = async () => {
    const { rsp } = await vol.readPid(slot);
    if (rsp.token !== token || rsp.command.status !== Status.ACCEPTED) throw new XferPeerError(`receiver ${to} left connection ${slot} before the last message`);
    watch.observe(rsp.heartbeat);
    const a = await vol.readAckView(slot);
    if (a.head.token === token) ack = a;
    await own.beat();
  };

  const place = async (seg: Buffer, length: number, last: number, msg: number, part: number) => {
    seq = (seq + 1) >>> 0;
    const i = (seq - 1) % E;
    if (!isFree(i)) {
      while (!isFree(i)) {
        if (failure) throw failure;
        await poll();
        if (!isFree(i)) await backoff.sleep(t.signal);
      }
      backoff.reset();
    }
    while (inFlight.size >= maxInFlight) await Promise.race(inFlight);
    if (failure) throw failure;
    const data = seg.subarray(SEG_HEADER, SEG_HEADER + length);
    const whole = roundUp(SEG_HEADER + length);
    // A reused buffer: nothing of an earlier segment goes out with this one.
    seg.fill(0, SEG.size, SEG_HEADER);
    seg.fill(0, SEG_HEADER + length, whole);
    SEG.encode({ slot, last, msg, part, token, writer: from, seq, dataLength: length, dataSum: xxh64Low(data) }, seg);
    const s = seq;
    assigned[i] = s;
    const w = vol.writeSegment(segs[i], seg.subarray(0, whole)).then(
      () => {
        pool.give(seg);
        landed.set(s, { flag: PtrFlag.WRITTEN, last, msg, part, dev: segs[i].dev, offset: segs[i].offset, length, seq: s });
        // Entries go into the table in sequence order only: a resumed sender goes on after the
        // highest one, so a later piece published before an earlier one landed would leave a hole.
        let moved = false;
        for (let e = landed.get(tableSeq + 1); e; e = landed.get(tableSeq + 1)) {
          landed.delete(e.seq);
          PTR.patch(ptrBlock, (e.seq - 1) % E, e);
          tableSeq = e.seq;
          moved = true;
        }
        if (moved) publish();
      },
      (e: unknown) => void (failure ??= e),
    );
    inFlight.add(w);
    void w.finally(() => inFlight.delete(w));
    bytes += length;
    await own.beat();
    // Let the write go out now. A file is read on this thread without waiting (what the page
    // cache holds), so filling the next buffers is a chain of promise jobs; the NBD client sends
    // what was queued at the end of the tick, and without this the first writes waited until
    // every pool buffer was full (six 4 MiB reads, 130 ms while their pages were first touched).
    await new Promise<void>((resolve) => setImmediate(resolve));
  };

  try {
    if (!start.done) {
      const known = Array.isArray(messages) ? messages.length : -1;
      let msg = start.msg;
      let part = start.part;
      let k = 0;
      let closed = false;
      for await (const input of messages) {
        const final = k === known - 1;
        for await (const piece of pieces(input, vol.capacity, pool)) {
          const last = piece.last ? Piece.END | (final ? Piece.LAST : 0) : 0;
          await place(piece.seg, piece.length, last, msg, part++);
          closed ||= (last & Piece.LAST) !== 0;
        }
        msg = (msg + 1) >>> 0;
        part = 0;
        k++;
      }
      // A stream of messages ends with a piece that only closes the connection.
      if (!closed) await place(pool.take(), 0, Piece.LAST, msg, 0);
    }
    await settled();
    t.log?.debug({ slot, seq }, 'every segment written, waiting for the last acknowledgement');
    const last = (seq - 1) % E;
    while (!acked(last, seq)) {
      await poll();
      if (!acked(last, seq)) await backoff.sleep(t.signal);
    }
    return { slot, token, segments: seq - start.seq, bytes };
  } finally {
    // Nothing of ours may land after we return: a late pointer table would undo the cleanup.
    await Promise.allSettled([...inFlight, tableWrite]);
  }
}

async function cleanup(vol: XferVolume, own: OwnHalf): Promise<void> {
  await vol.writePtr(freePtr(own.entry.slot));
  Object.assign(own.entry, { ...freePid(own.entry.slot, Role.REQUESTOR), heartbeat: own.entry.heartbeat });
  await own.write();
}

interface PieceBuf {
  /** A whole segment buffer from the pool: header room, then `length` bytes of data. */
  seg: Buffer;
  length: number;
  /** The last piece of its message. */
  last: boolean;
}

/**
 * Cut one message into segment-sized pieces, each in a pool buffer: a Reader fills the buffers
 * itself (no copy), a stream's chunks are copied in once. One piece is held back until the next
 * byte arrives, so the last one is known as last; an empty message is one empty last piece.
 */
export async function* pieces(input: Input, capacity: number, pool: BufferPool = new BufferPool(roundUp(SEG_HEADER + capacity))): AsyncGenerator<PieceBuf> {
  if (isReader(input)) {
    const fill = async (seg: Buffer) => {
      let n = 0;
      for (let got = -1; n < capacity && got !== 0; n += got) got = await input.read(seg, SEG_HEADER + n, capacity - n);
      return n;
    };
    let cur = pool.take();
    let n = await fill(cur);
    while (n === capacity) {
      const next = pool.take();
      const m = await fill(next);
      if (m === 0) {
        pool.give(next);
        break;
      }
      yield { seg: cur, length: capacity, last: false };
      cur = next;
      n = m;
    }
    yield { seg: cur, length: n, last: true };
    return;
  }
  let cur = pool.take();
  let fill = 0;
  let held: Buffer | undefined;
  for await (const chunk of input) {
    const c = Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength);
    let off = 0;
    while (off < c.length) {
      if (fill === capacity) {
        if (held) yield { seg: held, length: capacity, last: false };
        held = cur;
        cur = pool.take();
        fill = 0;
      }
      const n = Math.min(capacity - fill, c.length - off);
      c.copy(cur, SEG_HEADER + fill, off, off + n);
      fill += n;
      off += n;
    }
  }
  if (held) yield { seg: held, length: capacity, last: fill === 0 };
  if (fill > 0 || !held) yield { seg: cur, length: fill, last: true };
  else pool.give(cur);
}

// The reader's side of a connection (seed 4, flows 1, 3 and 4):
//
//   find a CONNECT for us       a requestor half naming us as requestee, not yet accepted
//   fresh acknowledgement table then ACCEPTED in our requestee half, with the connection's token
//   poll the pointer table      entries in sequence order; each segment's header is checked
//                               against its pointer entry (slot, token, writer, seq, length, last)
//                               and its data against the header's checksum (xxHash64)
//   deliver, then acknowledge   flag READ and the sequence number, in our own table, written in
//                               the background (one write at a time, each carrying all so far);
//                               a mismatch (torn or stale read) is read again later, never
//                               delivered nor acknowledged, and refused after `retries` reads
//   after the LAST piece        wait for the sender to free its half, then free ours
import { xxh64Low } from '../util/xxh64.js';
import { ACK, AckFlag, Command, Piece, PtrFlag, Role, SEG, SEG_HEADER, Status, freeAck, freePid, type AckEntry, type AckTable, type PtrEntry, type PtrTable, type TableView } from './layout.js';
import { XferCorruptError, XferFormatError, XferPeerError } from './errors.js';
import { Backoff, OwnHalf, PeerWatch, sleep, standingStill, tunables, type SessionOptions, type Tunables } from './session.js';
import type { BufferPool } from './pool.js';
import type { XferVolume } from './volume.js';

export interface RecvOptions extends SessionOptions {
  /** Only accept a connection from this process ID. */
  from?: number;
  /** Give up waiting for a sender after this long (ms); forever when unset. */
  waitMs?: number;
  /**
   * Take over the accepted connection of a receiver that died, from its acknowledgement table.
   * Called first with where delivery goes on: message `msg` (from 1) at byte `offset`. Messages
   * before it were acknowledged whole; what was delivered beyond that point is delivered again,
   * so the output must be cut back to it.
   */
  resume?: (msg: number, offset: number) => Promise<void>;
}

export interface RecvResult {
  slot: number;
  from: number;
  segments: number;
  /** Messages delivered whole by this call. */
  messages: number;
  bytes: number;
}

/** Where a delivered piece belongs: message `msg` (from 1), piece `part` of it; `end` on its last. */
export interface PieceInfo {
  msg: number;
  part: number;
  end: boolean;
}
/** Takes the pieces in order. `data` is a pool buffer, reused once the promise settles: copy what you keep. */
export type Deliver = (data: Buffer, piece: PieceInfo) => Promise<void>;

/** Receive the messages of one connection for process `as`, handing their pieces in order to `deliver`. */
export async function recv(vol: XferVolume, as: number, deliver: Deliver, opts: RecvOptions = {}): Promise<RecvResult> {
  const t = tunables(opts);
  if (opts.resume) return resumeRecv(vol, as, deliver, opts.resume, opts, t);
  // Connections whose sender went before its first piece: never accepted again.
  const abandoned = new Set<number>();
  // The segment buffers' pages are touched while we wait for a sender (its claim alone settles
  // for 50 ms), one buffer per look at the table, so that a claim turned PENDING is accepted at
  // once: 4 MiB of fresh pages took 1 to 9 ms to touch here, all six up to 55 ms. A sender found at
  // the first look is accepted first; the buffers then fault in as the segments are read into them.
  const pool = vol.segmentPool(window(vol) + 2);
  const warmOne = () => pool.warm(Math.min(pool.ready + 1, window(vol) + 2));
  for (;;) {
    const { slot, token, from } = await findConnect(vol, as, opts, t, abandoned, warmOne);
    const ack: AckTable = { ...freeAck(slot), token, reader: as };
    await vol.writeAck(ack);
    const own = new OwnHalf(vol, { slot, role: Role.REQUESTEE, requestor: from, requestee: as, token, heartbeat: 0, command: { code: Command.CONNECT, status: Status.ACCEPTED } }, t.heartbeatMs);
    await own.write();
    t.log?.debug({ slot, token, from }, 'accepted connection');
    try {
      const result = await consume(vol, own, ack, deliver, t, pool);
      t.log?.debug({ slot }, 'last piece delivered and acknowledged');
      await waitSenderGone(vol, own, t);
      await cleanup(vol, own);
      t.log?.debug({ slot }, 'connection freed');
      return result;
    } catch (e) {
      await cleanup(vol, own).catch((ce: Error) => t.log?.warn({ err: ce.message }, `could not free connection ${slot}; blockmirror xfer gc will`));
      if (e instanceof Abandoned) {
        t.log?.warn(e.message);
        abandoned.add(token);
        continue;
      }
      throw e;
    }
  }
}

async function resumeRecv(vol: XferVolume, as: number, deliver: Deliver, resume: (msg: number, offset: number) => Promise<void>, opts: RecvOptions, t: Tunables): Promise<RecvResult> {
  const table = await vol.readPidTable();
  // Our half says ACCEPTED; the sender's may already be gone if it saw our last acknowledgement.
  const slot = table.findIndex(({ rsp }) => rsp.command.status === Status.ACCEPTED && rsp.requestee === as && (opts.from === undefined || rsp.requestor === opts.from));
  if (slot < 0) throw new XferPeerError(`no accepted connection for ${as} to resume: receive again without --resume`);
  const rsp = await standingStill(vol, slot, 'rsp', `receiver ${as}`, t);
  const own = new OwnHalf(vol, rsp, t.heartbeatMs);
  const done = (segments: number): RecvResult => ({ slot, from: rsp.requestor, segments, messages: 0, bytes: 0 });
  try {
    const ack = await vol.readAck(slot);
    // Killed in its cleanup, after the acknowledgement table was freed: the message was whole.
    if (ack.token !== rsp.token) {
      await cleanup(vol, own);
      return done(0);
    }
    let top: AckEntry | undefined;
    for (const e of ack.entries.slice(0, vol.mcb.entries)) if (e.flag === AckFlag.READ && e.seq > (top?.seq ?? 0)) top = e;
    const acked = top?.seq ?? 0;
    t.log?.info({ slot, acked, msg: top?.msg, part: top?.part, last: top?.last }, 'resuming connection');
    if (top && top.last & Piece.LAST) {
      // Delivered and acknowledged whole before the kill: only the end of the flow is left.
      await waitSenderGone(vol, own, t);
      await cleanup(vol, own);
      return done(acked);
    }
    const { req } = await vol.readPid(slot);
    if (req.token !== rsp.token) throw new XferPeerError(`sender ${rsp.requestor} left connection ${slot} before its last message`);
    if (!top) await resume(1, 0);
    else if (top.last & Piece.END) await resume(top.msg + 1, 0);
    else await resume(top.msg, (top.part + 1) * vol.capacity);
    const result = await consume(vol, own, ack, deliver, t, vol.segmentPool(window(vol) + 2), acked + 1);
    await waitSenderGone(vol, own, t);
    await cleanup(vol, own);
    return result;
  } catch (e) {
    await cleanup(vol, own).catch((ce: Error) => t.log?.warn({ err: ce.message }, `could not free connection ${slot}; blockmirror xfer gc will`));
    throw e;
  }
}

/** The sender's token went, or it went silent, before its first piece: wait for another. */
class Abandoned extends Error {
  override readonly name = 'Abandoned';
}

/** `idle` runs after each look that found no sender for us, before the wait for the next. */
async function findConnect(vol: XferVolume, as: number, opts: RecvOptions, t: Tunables, abandoned: ReadonlySet<number>, idle?: () => void) {
  const started = Date.now();
  for (;;) {
    const table = await vol.readPidTable();
    const slot = table.findIndex(
      ({ req, rsp }) =>
        req.command.code === Command.CONNECT &&
        req.command.status === Status.PENDING &&
        req.requestee === as &&
        (opts.from === undefined || req.requestor === opts.from) &&
        !abandoned.has(req.token) &&
        !(rsp.token === req.token && rsp.command.status === Status.ACCEPTED),
    );
    if (slot >= 0) return { slot, token: table[slot].req.token, from: table[slot].req.requestor };
    if (opts.waitMs !== undefined && Date.now() - started > opts.waitMs)
      throw new XferPeerError(`no sender connected to ${as} within ${opts.waitMs} ms: start blockmirror xfer send --to ${as} on the other host`);
    // A claim for us that is still settling turns PENDING within the sender's settle time (50 ms
    // or more): look every millisecond until then, not a whole poll interval after it.
    const settling = table.some(({ req }) => req.command.code === Command.CONNECT && req.command.status === Status.NONE && req.requestee === as && (opts.from === undefined || req.requestor === opts.from));
    idle?.();
    await sleep(settling ? Math.min(1, t.pollMs) : t.pollMs, t.signal);
  }
}

interface Ready {
  seq: number;
  i: number;
  entry: PtrEntry;
  /** The segment, on its way into a pool buffer. */
  read: Promise<Buffer>;
  buf: Buffer;
}

// A pipeline: segment reads are issued as soon as the pointer table shows them, up to a window
// ahead of delivery, while earlier pieces are checked and delivered in order; the acknowledgement
// table is written in the background, one write at a time carrying every piece delivered so far.
//
//   poll the pointer table ── issue reads of new entries, in sequence order (≤ ahead in flight)
//   the oldest read ──────── check header and sum ── deliver ── mark READ ── ack write (coalesced)
//   nothing new ─────────── heartbeat checks, back off from 1 ms to the poll interval
/** Segment reads ahead of delivery: enough to keep every path busy; the window of E entries bounds them too. */
const window = (vol: XferVolume): number => Math.max(1, Math.min(vol.mcb.entries, vol.inFlight));

/** `pool` holds window(vol) + 2 segment buffers. */
async function consume(vol: XferVolume, own: OwnHalf, ack: AckTable, deliver: Deliver, t: Tunables, pool: BufferPool, first = 1): Promise<RecvResult> {
  const { slot, token, requestor: from } = own.entry;
  const segs = vol.segments(slot);
  const watch = new PeerWatch(`sender ${from}`, t.timeoutMs);
  const E = vol.mcb.entries;
  const ahead = window(vol);
  const backoff = new Backoff(t.pollMs);
  const queue: Ready[] = [];
  let next = first; // the next sequence to deliver
  let issued = first; // the next sequence to read
  let bytes = 0;
  let messages = 0;
  let failures = 0;
  let sawLast = false;
  let failure: unknown;
  // Our acknowledgement table, kept encoded: each delivered piece patches its entry, and each
  // write sends a copy, as the block changes meanwhile.
  const ackBlock = ACK.encode(ack);
  let ackWrite: Promise<void> | undefined;
  let ackStale = false;
  const acknowledge = () => {
    if (ackWrite) return void (ackStale = true);
    ackStale = false;
    ackWrite = vol.writeAckBlock(slot, Buffer.from(ackBlock)).then(
      () => {
        ackWrite = undefined;
        if (ackStale) acknowledge();
      },
      (e: unknown) => {
        failure ??= e;
        ackWrite = undefined;
      },
    );
  };
  const ackSettled = async () => {
    while (ackWrite) await ackWrite;
    if (failure) throw failure;
  };
  // A read that does not check out is retried after a poll interval; only a run of them is an error.
  const retryLater = async (problem: string) => {
    if (++failures > t.retries) throw new XferCorruptError(`${problem}; refused after ${t.retries} reads (nothing of it was delivered or acknowledged)`);
    t.log?.debug({ problem, failures }, 'read again later');
    await sleep(t.pollMs, t.signal);
  };
  // Reads issued from a table that turned out wrong: drop them, read again from `next`.
  const dropQueue = async () => {
    const dropped = queue.splice(0);
    await Promise.allSettled(dropped.map((r) => r.read));
    for (const r of dropped) pool.give(r.buf);
    issued = next;
    sawLast = false;
  };

  // The pointer table is read in the background, one read at a time, while earlier pieces are
  // checked and delivered: its reply comes behind the segment reads already on the path (up to
  // `ahead` segments), and awaiting it before every delivery drained the pipeline once per
  // segment: 1058 ms of waiting in a 256 MiB transfer of 1 MiB segments, 22 ms since (measured
  // with timers, load 10). A snapshot is used only when the loop gets to it, so `issued` moves in
  // order whatever the timing.
  let table: Promise<TableView<PtrTable, PtrEntry> | Error> | undefined;
  let tableDone = false;
  const readTable = () => {
    tableDone = false;
    table = vol.readPtrView(slot).then(
      (ptr) => ptr,
      (e: unknown) => (e instanceof Error ? e : new Error(String(e))),
    );
    void table.then(() => (tableDone = true));
  };

  try {
    for (;;) {
      if (failure) throw failure;
      // Top up the reads from a fresh copy of the pointer table: at once when nothing is queued,
      // else when the background read has come back.
      if (!table && queue.length < ahead && !sawLast) readTable();
      if (table && (tableDone || queue.length === 0)) {
        const got = await table;
        table = undefined;
        let ptr: TableView<PtrTable, PtrEntry>;
        try {
          if (!(got instanceof Error) && (got.head.token !== token || got.head.writer !== from)) {
            await dropQueue();
            await retryLater(`pointer table of connection ${slot} belongs to token ${got.head.token} of writer ${got.head.writer}, not token ${token} of writer ${from}`);
            continue;
          }
          if (got instanceof Error) throw got;
          ptr = got;
        } catch (e) {
          if (!(e instanceof XferFormatError)) throw e;
          await dropQueue();
          await retryLater(e.message);
          continue;
        }
        let problem: string | undefined;
        for (; queue.length < ahead && !sawLast; issued = (issued + 1) >>> 0) {
          const i = (issued - 1) % E;
          let entry: PtrEntry;
          try {
            entry = { ...ptr.entry(i) };
          } catch (e) {
            // A damaged entry in a table whose checksum holds: like an entry aimed elsewhere.
            if (!(e instanceof XferFormatError)) throw e;
            problem = e.message;
            break;
          }
          if (entry.flag !== PtrFlag.WRITTEN || entry.seq !== issued) break;
          problem = checkEntry(vol, slot, { seq: issued, i, entry }, segs[i]);
          if (problem) break;
          const buf = pool.take();
          const read = vol.readSegment(segs[i], entry.length, buf);
          read.catch(() => undefined); // awaited in order below, or dropped
          queue.push({ seq: issued, i, entry, read, buf });
          if (entry.last & Piece.LAST) {
            sawLast = true;
            issued = (issued + 1) >>> 0;
            break;
          }
        }
        if (problem && queue.length === 0) {
          await retryLater(problem);
          continue;
        }
        // More may be written already: read the table again behind the reads just issued.
        if (queue.length < ahead && !sawLast) readTable();
      }

      const head = queue.shift();
      if (!head) {
        const { req } = await vol.readPid(slot);
        if (req.token !== token || req.command.code !== Command.CONNECT) {
          if (next === 1 && first === 1) throw new Abandoned(`sender ${from} left connection ${slot} before its first piece; waiting for another`);
          throw new XferPeerError(`sender ${from} left connection ${slot} before its last message`);
        }
        try {
          watch.observe(req.heartbeat);
        } catch (e) {
          // A claim whose sender died before writing anything: gc frees it, we wait for a live one.
          if (next === 1 && first === 1) throw new Abandoned(`sender ${from} of connection ${slot} went silent before its first piece; waiting for another`);
          throw e;
        }
        await own.beat();
        await backoff.sleep(t.signal);
        continue;
      }
      backoff.reset();

      const seg = await head.read;
      const problem = checkSegment(slot, token, from, head, seg);
      if (problem) {
        pool.give(head.buf);
        await dropQueue();
        await retryLater(problem);
        continue;
      }
      const e = head.entry;
      // The closing piece of a stream of messages carries no message: nothing to deliver.
      if (e.length > 0 || e.last & Piece.END) await deliver(seg.subarray(SEG_HEADER, SEG_HEADER + e.length), { msg: e.msg, part: e.part, end: (e.last & Piece.END) !== 0 });
      pool.give(head.buf);
      ACK.patch(ackBlock, head.i, { flag: AckFlag.READ, last: e.last, seq: head.seq, msg: e.msg, part: e.part });
      bytes += e.length;
      if (e.last & Piece.END) messages++;
      next = (head.seq + 1) >>> 0;
      failures = 0;
      if (e.last & Piece.LAST) {
        acknowledge();
        await ackSettled();
        return { slot, from, segments: head.seq, messages, bytes };
      }
      acknowledge();
      await own.beat();
    }
  } finally {
    await Promise.allSettled([...queue.map((r) => r.read), ackWrite, table]);
  }
}

/** A pointer entry must name the segment its index owns, with a length that fits. */
function checkEntry(vol: XferVolume, slot: number, r: Pick<Ready, 'seq' | 'i' | 'entry'>, at: { dev: number; offset: number }): string | undefined {
  const e = r.entry;
  if (e.dev !== at.dev || e.offset !== at.offset)
    return `pointer entry ${r.i} (seq ${r.seq}) of connection ${slot} points at device ${e.dev} offset ${e.offset}, not at its segment (device ${at.dev} offset ${at.offset})`;
  if (e.length > vol.capacity) return `pointer entry ${r.i} (seq ${r.seq}) of connection ${slot} says ${e.length} bytes, more than a segment holds (${vol.capacity})`;
  return undefined;
}

/** The segment's header against its pointer entry, and its data against the header. */
function checkSegment(slot: number, token: number, from: number, r: Pick<Ready, 'seq' | 'i' | 'entry'>, seg: Buffer): string | undefined {
  const what = `segment ${r.i} (seq ${r.seq}) of connection ${slot}`;
  let h;
  try {
    h = SEG.decode(`${what} header`, seg);
  } catch (e) {
    if (e instanceof XferFormatError) return e.message;
    throw e;
  }
  const want = { slot, token, writer: from, seq: r.seq, dataLength: r.entry.length, last: r.entry.last, msg: r.entry.msg, part: r.entry.part };
  for (const [k, v] of Object.entries(want)) {
    const got = h[k as keyof typeof want];
    if (got !== v) return `${what}: its header says ${k} ${got}, its pointer entry ${v}`;
  }
  if (xxh64Low(seg.subarray(SEG_HEADER, SEG_HEADER + r.entry.length)) !== h.dataSum) return `${what}: its data fails the header's checksum (torn or stale)`;
  return undefined;
}

/** The sender frees its half once it has seen the last acknowledgement; we wait for that. */
async function waitSenderGone(vol: XferVolume, own: OwnHalf, t: Tunables): Promise<void> {
  const watch = new PeerWatch(`sender ${own.entry.requestor}`, t.timeoutMs);
  // The sender frees its half a few requests after it reads our last acknowledgement: look soon.
  const backoff = new Backoff(t.pollMs);
  for (;;) {
    const { req } = await vol.readPid(own.entry.slot);
    if (req.token !== own.entry.token || req.command.code === Command.NONE) return;
    try {
      watch.observe(req.heartbeat);
    } catch {
      t.log?.warn(`sender ${own.entry.requestor} did not free connection ${own.entry.slot} after the last message; freeing our half (blockmirror xfer gc frees its)`);
      return;
    }
    await own.beat();
    await backoff.sleep(t.signal);
  }
}

async function cleanup(vol: XferVolume, own: OwnHalf): Promise<void> {
  await vol.writeAck(freeAck(own.entry.slot));
  Object.assign(own.entry, { ...freePid(own.entry.slot, Role.REQUESTEE), heartbeat: own.entry.heartbeat });
  await own.write();
}

// The writer's side of a connection (seed 4, flows 1, 2 and 4):
//
//   claim a free slot      write our requestor half (CONNECT, a fresh token), wait, read it back:
//                          still ours, or another sender won the slot and we look again
//   fresh pointer table    all entries FREE, under our token; then CONNECT/PENDING, which is what
//                          a receiver waits for
//   wait for ACCEPTED      in the requestee half, with our token
//   per piece of input     entry i = (seq-1) mod E, reused only once the receiver acknowledged it;
//                          the segment (header + data) is written first, then, for a batch of them,
//                          the pointer table: data before pointers, whatever paths carry them
//   after the last ack     free the pointer table, then our half of the process ID table
import { crc } from '../util/format.js';
import { AckFlag, Command, PTR, PtrFlag, Role, SEG, SEG_HEADER, Status, freeAck, freePid, freePtr, type AckTable, type PtrTable } from './layout.js';
import { XferPeerError, XferTableFullError } from './errors.js';
import { OwnHalf, PeerWatch, newToken, sleep, standingStill, tunables, type SessionOptions, type Tunables } from './session.js';
import { roundUp, type XferVolume } from './volume.js';

export interface SendResult {
  slot: number;
  token: number;
  /** Segments written by this call (after a resume: since it), the empty last one of an empty message included. */
  segments: number;
  bytes: number;
}

export async function send(vol: XferVolume, from: number, to: number, input: AsyncIterable<Uint8Array>, opts: SessionOptions = {}): Promise<SendResult> {
  const t = tunables(opts);
  for (;;) {
    const own = await claim(vol, from, to, t);
    const { slot, token } = own.entry;
    t.log?.debug({ slot, token }, 'claimed connection slot');
    const ptr: PtrTable = { ...freePtr(slot), token, writer: from };
    try {
      // The pointer table is ours and fresh before a receiver may accept: only then PENDING.
      await vol.writePtr(ptr);
      own.entry.command.status = Status.PENDING;
      await own.write();
      if (!(await waitAccepted(vol, own, to, t))) {
        // A rival's claim landed after our read-back: the slot is its now, so we write nothing more.
        t.log?.debug({ slot }, 'lost the slot to another sender; claiming again');
        continue;
      }
      const result = await transfer(vol, own, ptr, to, input, t);
      await cleanup(vol, own);
      return result;
    } catch (e) {
      // We are alive and own these blocks, so we free them ourselves; the receiver sees our token go.
      await cleanup(vol, own).catch((ce: Error) => t.log?.warn({ err: ce.message }, `could not free connection ${slot}; blockmirror xfer gc will`));
      throw e;
    }
  }
}

/**
 * Pick up a connection whose sender died (kill -9, host restart) from the on-disk tables: the
 * pointer table says which pieces were written; the next one is piece h+1, at byte h × capacity
 * of the input (every piece but the last is full), which `open` must start at.
 */
export async function resumeSend(vol: XferVolume, from: number, to: number, open: (offset: number) => AsyncIterable<Uint8Array>, opts: SessionOptions = {}): Promise<SendResult> {
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
  let written = 0;
  let lastWritten = false;
  for (const e of ptr.entries.slice(0, vol.mcb.entries))
    if (e.flag === PtrFlag.WRITTEN && e.seq > written) {
      written = e.seq;
      lastWritten = e.last === 1;
    }
  t.log?.info({ slot, written, lastWritten }, 'resuming connection');
  try {
    const result = await transfer(vol, own, ptr, to, lastWritten ? nothing() : open(written * vol.capacity), t, written, lastWritten);
    await cleanup(vol, own);
    return result;
  } catch (e) {
    await cleanup(vol, own).catch((ce: Error) => t.log?.warn({ err: ce.message }, `could not free connection ${slot}; blockmirror xfer gc will`));
    throw e;
  }
}

async function claim(vol: XferVolume, from: number, to: number, t: Tunables): Promise<OwnHalf> {
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
      await sleep(settleMs, t.signal);
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
  for (;;) {
    const { req, rsp } = await vol.readPid(own.entry.slot);
    if (req.token !== own.entry.token) return false;
    if (rsp.token === own.entry.token && rsp.command.status === Status.ACCEPTED) return true;
    if (Date.now() - started > t.timeoutMs)
      throw new XferPeerError(`no receiver ${to} accepted connection ${own.entry.slot} within ${t.timeoutMs} ms: start blockmirror xfer recv --as ${to} on the other host`);
    await own.beat();
    await sleep(t.pollMs, t.signal);
  }
}

async function transfer(
  vol: XferVolume,
  own: OwnHalf,
  ptr: PtrTable,
  to: number,
  input: AsyncIterable<Uint8Array>,
  t: Tunables,
  /** Pieces already written (on a resume), and whether the last of them was the last piece. */
  written = 0,
  lastWritten = false,
): Promise<SendResult> {
  const { slot, token, requestor: from } = own.entry;
  const E = vol.mcb.entries;
  const segs = vol.segments(slot);
  const watch = new PeerWatch(`receiver ${to}`, t.timeoutMs);
  // An eighth of the window per pointer-table write: the reader starts early and acknowledges
  // early, so writing, reading and acknowledging overlap.
  const batchMax = Math.max(1, Math.floor(E / 8));
  let ack: AckTable = freeAck(slot);
  let batch: Promise<void>[] = [];
  let seq = written;
  let bytes = 0;
  // Pointer-table writes, one after another. Each is encoded when its batch closes, so it names
  // only segments of batches before it, and is written only once their data is: data before
  // pointers, while the next batch's data is already on its way.
  let pointers: Promise<void> = Promise.resolve();

  const acked = (i: number, s: number) => ack.entries[i].flag === AckFlag.READ && ack.entries[i].seq === s;
  const isFree = (i: number) => ptr.entries[i].flag === PtrFlag.FREE || acked(i, ptr.entries[i].seq);
  const flush = () => {
    if (batch.length === 0) return;
    const data = Promise.all(batch);
    batch = [];
    const block = PTR.encode(ptr);
    pointers = Promise.all([pointers, data]).then(() => vol.writePtrBlock(slot, block));
    pointers.catch(() => undefined); // awaited before every wait and at the end
  };
  const poll = async () => {
    await pointers;
    const { rsp } = await vol.readPid(slot);
    if (rsp.token !== token || rsp.command.status !== Status.ACCEPTED) throw new XferPeerError(`receiver ${to} left connection ${slot} before the last message`);
    watch.observe(rsp.heartbeat);
    const a = await vol.readAck(slot);
    if (a.token === token) ack = a;
    await own.beat();
  };

  try {
    return await pump();
  } finally {
    // Nothing of ours may land after we return: a late pointer table would undo the cleanup.
    await Promise.allSettled([...batch, pointers]);
  }

  async function pump(): Promise<SendResult> {
    if (!lastWritten)
    for await (const piece of pieces(input, vol.capacity)) {
      seq = (seq + 1) >>> 0;
      const i = (seq - 1) % E;
      while (!isFree(i)) {
        flush();
        await poll();
        if (!isFree(i)) await sleep(t.pollMs, t.signal);
      }
      const length = piece.length;
      const data = piece.seg.subarray(SEG_HEADER, SEG_HEADER + length);
      SEG.encode({ slot, last: piece.last ? 1 : 0, token, writer: from, seq, dataLength: length, dataCrc: crc(data) }, piece.seg);
      Object.assign(ptr.entries[i], { flag: PtrFlag.WRITTEN, last: piece.last ? 1 : 0, dev: segs[i].dev, offset: segs[i].offset, length, seq });
      const written = vol.writeSegment(segs[i], piece.seg.subarray(0, roundUp(SEG_HEADER + length)));
      written.catch(() => undefined); // awaited by the flush of its batch
      batch.push(written);
      bytes += length;
      if (batch.length >= batchMax) {
        flush();
        await own.beat();
      }
    }
    flush();
    await pointers;
    const last = (seq - 1) % E;
    while (!acked(last, seq)) {
      await poll();
      if (!acked(last, seq)) await sleep(t.pollMs, t.signal);
    }
    return { slot, token, segments: seq - written, bytes };
  }
}

/** The rest of an input whose last piece is already written. */
async function* nothing(): AsyncGenerator<Uint8Array> {}

async function cleanup(vol: XferVolume, own: OwnHalf): Promise<void> {
  await vol.writePtr(freePtr(own.entry.slot));
  Object.assign(own.entry, { ...freePid(own.entry.slot, Role.REQUESTOR), heartbeat: own.entry.heartbeat });
  await own.write();
}

interface Piece {
  /** A whole segment buffer: header room, then `length` bytes of data, zero padding. */
  seg: Buffer;
  length: number;
  last: boolean;
}

/**
 * Cut the input into segment-sized pieces, copied once into their segment buffers. One piece is
 * held back until the next byte arrives, so the last one is known as last; an empty input is one
 * empty last piece.
 */
export async function* pieces(input: AsyncIterable<Uint8Array>, capacity: number): AsyncGenerator<Piece> {
  const segBytes = roundUp(SEG_HEADER + capacity);
  let cur = Buffer.alloc(segBytes);
  let fill = 0;
  let held: Buffer | undefined;
  for await (const chunk of input) {
    const c = Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength);
    let off = 0;
    while (off < c.length) {
      if (fill === capacity) {
        if (held) yield { seg: held, length: capacity, last: false };
        held = cur;
        cur = Buffer.alloc(segBytes);
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
}

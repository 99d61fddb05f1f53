// A transfer volume: the master device and its secondaries, each reached over one or more paths,
// and the table and segment I/O of the layout in layout.ts. Every write here is whole blocks.
import { createRequire } from 'node:module';
import type { Logger } from 'pino';
import {
  ACK,
  BLOCK,
  MAX_ENTRIES,
  MAX_SECONDARY,
  MCB,
  PID,
  PTR,
  Role,
  SDT,
  SEC,
  SEG_HEADER,
  freeAck,
  freePid,
  freePtr,
  type AckEntry,
  type AckTable,
  type Mcb,
  type PidEntry,
  type PtrEntry,
  type PtrTable,
  type Sdt,
  type Sec,
  type TableView,
} from './layout.js';
import { XferFormatError, XferUsageError } from './errors.js';
import { BufferPool } from './pool.js';
import { PathSet, openPath, type PathOptions, type XferPath } from './paths.js';

export interface Geometry {
  segSize: number;
  /** Segments on each device. */
  segments: number;
  maxConn: number;
}

export const roundUp = (n: number, to = BLOCK) => Math.ceil(n / to) * to;

/**
 * Segment reads or writes one side keeps in flight per path: 16 MiB of them, from 1 to 8 segments.
 * Measured on 1 GiB over one path (bench/RESULTS.md, "xfer, issue 17 third part"): 4 MiB
 * segments 8 deep cost 4.6-4.9 s of CPU across send, recv and serve, 4 deep 4.2-4.3; every byte
 * more in flight is a buffer more out of the caches, and the server's buffer pool (64 MiB, both
 * sides' requests) stops recycling once they pass it.
 */
export const IN_FLIGHT_BYTES = 16 * 1024 * 1024;
export const perPathInFlight = (segSize: number): number => Math.max(1, Math.min(8, Math.floor(IN_FLIGHT_BYTES / segSize)));

/**
 * The tables are rewritten by the other side while we poll them, and a read that races a write
 * can come back torn (a page copied half old, half new: its checksum fails). Reading again gets
 * it whole, so a table is damaged only when this many reads in a row fail; the waits between
 * them grow by 1 ms. Seen in CI: a sender's poll of the acknowledgement table, torn while the
 * receiver wrote it, failed the whole transfer.
 */
const TABLE_READS = 5;

async function rereadTorn<T>(read: () => Promise<T>): Promise<T> {
  for (let k = 1; ; k++) {
    try {
      return await read();
    } catch (e) {
      if (!(e instanceof XferFormatError) || k >= TABLE_READS) throw e;
      await new Promise((r) => setTimeout(r, k));
    }
  }
}

/** Where the master's tables and pool lie for this geometry. */
function masterLayout(g: Geometry) {
  const pidTable = 2 * BLOCK;
  const ptrTables = pidTable + 2 * g.maxConn * BLOCK;
  const ackTables = ptrTables + g.maxConn * BLOCK;
  const segPool = ackTables + g.maxConn * BLOCK;
  return { pidTable, secTable: BLOCK, ptrTables, ackTables, segPool, end: segPool + g.segments * g.segSize };
}

/**
 * Write SEC blocks on the secondaries, the tables (all free) and then the MCB on the master:
 * a volume whose format was interrupted has no MCB and is refused, never half-used.
 */
export async function formatVolume(specs: string[], g: Geometry, opts: PathOptions = {}): Promise<Mcb> {
  if (specs.length === 0) throw new XferUsageError('format: give at least one device');
  if (specs.length > MAX_SECONDARY + 1) throw new XferUsageError(`format: at most ${MAX_SECONDARY + 1} devices`);
  if (!Number.isSafeInteger(g.segSize) || g.segSize < BLOCK || g.segSize % BLOCK !== 0 || g.segSize > 64 * 1024 * 1024)
    throw new XferUsageError(`--seg-size ${g.segSize}: a multiple of ${BLOCK} bytes up to 64 MiB`);
  if (!Number.isSafeInteger(g.maxConn) || g.maxConn < 1 || g.maxConn > 4096) throw new XferUsageError(`--max-conn ${g.maxConn}: 1 to 4096`);
  if (!Number.isSafeInteger(g.segments) || g.segments < 1) throw new XferUsageError(`--segments ${g.segments}: at least 1`);
  const total = g.segments * specs.length;
  const entries = Math.floor(total / g.maxConn);
  if (entries < 1) throw new XferUsageError(`--segments ${g.segments} on ${specs.length} device(s) is fewer than --max-conn ${g.maxConn}: every connection needs at least one segment`);
  if (entries > MAX_ENTRIES) throw new XferUsageError(`each connection would own ${entries} segments, at most ${MAX_ENTRIES} fit its pointer table: raise --max-conn or lower --segments`);

  const paths = await openAll(specs, opts);
  try {
    const m = masterLayout(g);
    // node:crypto only here, in format: every other command would load it for nothing (start-up).
    const { randomBytes } = createRequire(import.meta.url)('node:crypto') as typeof import('node:crypto');
    const volume = randomBytes(16);
    const secEnd = BLOCK + g.segments * g.segSize;
    paths.forEach((p, i) => {
      const need = i === 0 ? m.end : secEnd;
      if (p.size < need) throw new XferUsageError(`${p.name} is ${p.size} bytes; this geometry needs ${need} (${i === 0 ? 'tables and ' : ''}${g.segments} segments of ${g.segSize})`);
    });
    const secs: Sec[] = paths.slice(1).map((_, i) => ({ volume, index: i + 1, segments: g.segments, segPool: BLOCK }));
    for (let i = 1; i < paths.length; i++) await paths[i].write(0, SEC.encode(secs[i - 1]));
    const tables = Buffer.alloc(m.segPool - BLOCK);
    const at = (off: number) => off - BLOCK;
    SDT.encode({ count: secs.length, devices: padSecs(secs) }, tables, at(m.secTable));
    for (let s = 0; s < g.maxConn; s++) {
      PID.encode(freePid(s, Role.REQUESTOR), tables, at(m.pidTable + 2 * s * BLOCK));
      PID.encode(freePid(s, Role.REQUESTEE), tables, at(m.pidTable + (2 * s + 1) * BLOCK));
      PTR.encode(freePtr(s), tables, at(m.ptrTables + s * BLOCK));
      ACK.encode(freeAck(s), tables, at(m.ackTables + s * BLOCK));
    }
    await paths[0].write(BLOCK, tables);
    const { end: _end, ...tables_ } = m;
    const mcb: Mcb = { volume, blockSize: BLOCK, segSize: g.segSize, segments: g.segments, maxConn: g.maxConn, entries, devices: specs.length, ...tables_ };
    await paths[0].write(0, MCB.encode(mcb));
    // Two arguments that are paths to one volume would have overwritten each other: say so.
    for (let i = 0; i < paths.length; i++) {
      const b = await paths[i].read(0, BLOCK);
      const ok = i === 0 ? MCB.matches(b) : SEC.matches(b) && SEC.decode(paths[i].name, b).index === i;
      if (!ok) throw new XferUsageError(`format: ${specs[i]} was overwritten by another argument: give format one path per device (paths to the same device are for send, recv, ls and gc)`);
    }
    return mcb;
  } finally {
    await Promise.all(paths.map((p) => p.close()));
  }
}

function padSecs(secs: Sec[]) {
  const list = secs.map((s) => ({ index: s.index, segments: s.segments, segPool: s.segPool }));
  while (list.length < MAX_SECONDARY) list.push({ index: 0, segments: 0, segPool: 0 });
  return list;
}

async function openAll(specs: string[], opts: PathOptions): Promise<XferPath[]> {
  const settled = await Promise.allSettled(specs.map((s) => openPath(s, opts)));
  const failed = settled.find((r) => r.status === 'rejected');
  if (failed) {
    await Promise.all(settled.map((r) => (r.status === 'fulfilled' ? r.value.close() : undefined)));
    throw (failed as PromiseRejectedResult).reason;
  }
  return settled.map((r) => (r as PromiseFulfilledResult<XferPath>).value);
}

export interface SegmentAddress {
  dev: number;
  offset: number;
}

export interface VolumeOptions extends PathOptions {
  log?: Logger;
  /** How long a failed path waits before it tries to rejoin (ms). */
  rejoinMs?: number;
  /** With every path to a device down, how long an operation tries them again before it fails (ms). */
  graceMs?: number;
}

export class XferVolume {
  /** Segment data bytes per segment (the header takes SEG_HEADER). */
  readonly capacity: number;
  private readonly slotSegments: SegmentAddress[][];

  private constructor(
    readonly mcb: Mcb,
    readonly sdt: Sdt,
    /** Index 0 is the master. */
    readonly devices: PathSet[],
  ) {
    this.capacity = mcb.segSize - SEG_HEADER;
    const pool: SegmentAddress[] = [];
    for (let i = 0; i < mcb.segments; i++) pool.push({ dev: 0, offset: mcb.segPool + i * mcb.segSize });
    for (const d of sdt.devices.slice(0, sdt.count)) for (let i = 0; i < d.segments; i++) pool.push({ dev: d.index, offset: d.segPool + i * mcb.segSize });
    this.slotSegments = Array.from({ length: mcb.maxConn }, (_, s) => pool.slice(s * mcb.entries, (s + 1) * mcb.entries));
  }

  /** Open every --dev; paths whose block 0 names the same device are grouped. */
  static async open(specs: string[], opts: VolumeOptions = {}): Promise<XferVolume> {
    if (specs.length === 0) throw new XferUsageError('give the volume with --dev (one or more paths)');
    return XferVolume.fromPaths(await openAll(specs, opts), opts);
  }

  static async fromPaths(paths: XferPath[], opts: VolumeOptions = {}): Promise<XferVolume> {
    try {
      const small = paths.find((p) => p.size < 2 * BLOCK);
      if (small) throw new XferFormatError(small.name, `is ${small.size} bytes, too small to be a transfer device: check --dev`);
      const heads = await Promise.all(paths.map((p) => p.read(0, BLOCK)));
      let mcb: Mcb | undefined;
      const groups = new Map<number, XferPath[]>();
      const secs: { path: XferPath; sec: Sec }[] = [];
      heads.forEach((b, i) => {
        const p = paths[i];
        if (MCB.matches(b)) {
          const m = MCB.decode(`${p.name}: master control block`, b);
          if (mcb && !mcb.volume.equals(m.volume)) throw new XferUsageError(`${p.name} is the master of another volume than ${groups.get(0)![0].name}: give the paths of one volume`);
          mcb = m;
          groups.set(0, [...(groups.get(0) ?? []), p]);
        } else if (SEC.matches(b)) {
          secs.push({ path: p, sec: SEC.decode(`${p.name}: secondary control block`, b) });
        } else {
          const head = b.subarray(0, 8);
          const shown = head.every((x) => x === 0) ? 'zeroes' : JSON.stringify(head.toString('latin1').replace(/[^\x20-\x7e]/g, '.'));
          throw new XferFormatError(p.name, `is not a transfer device (it starts with ${shown}, neither "MAS_EMC" nor "SEC_EMC"): format it with blockmirror xfer format, or check --dev`);
        }
      });
      if (!mcb) throw new XferFormatError(paths.map((p) => p.name).join(', '), 'has no master control block (MAS_EMC): give a path to the first device too');
      for (const { path, sec } of secs) {
        if (!sec.volume.equals(mcb.volume)) throw new XferUsageError(`${path.name} is a secondary device of another volume: give the paths of one volume`);
        groups.set(sec.index, [...(groups.get(sec.index) ?? []), path]);
      }
      const master = groups.get(0)![0];
      const sdt = SDT.decode(`${master.name}: secondary device table`, await master.read(mcb.secTable, BLOCK));
      if (sdt.count !== mcb.devices - 1) throw new XferFormatError(`${master.name}: secondary device table`, `lists ${sdt.count} devices, the MCB ${mcb.devices - 1}`);
      for (const { path, sec } of secs) {
        const listed = sdt.devices[sec.index - 1];
        if (sec.index > sdt.count || !listed || listed.segments !== sec.segments || listed.segPool !== sec.segPool)
          throw new XferFormatError(`${path.name}: secondary control block`, `says device ${sec.index} with ${sec.segments} segments, the master's table disagrees: damaged`);
      }
      const sets: PathSet[] = [];
      for (let d = 0; d < mcb.devices; d++) {
        const g = groups.get(d);
        if (!g) throw new XferUsageError(`secondary device ${d} of the volume has no path among --dev: add one`);
        sets.push(new PathSet(d === 0 ? 'the master device' : `secondary device ${d}`, g, opts.log, opts.rejoinMs, opts.graceMs));
      }
      return new XferVolume(mcb, sdt, sets);
    } catch (e) {
      await Promise.all(paths.map((p) => p.close()));
      throw e;
    }
  }

  get master(): PathSet {
    return this.devices[0];
  }

  /** The segments slot `slot` owns, entry i ↔ segment i. */
  segments(slot: number): readonly SegmentAddress[] {
    return this.slotSegments[slot];
  }

  private pidOffset(slot: number, role: number): number {
    return this.mcb.pidTable + (2 * slot + role) * BLOCK;
  }

  /** Both halves of every slot, in one read of the table. */
  readPidTable(): Promise<{ req: PidEntry; rsp: PidEntry }[]> {
    return rereadTorn(async () => {
      const buf = await this.master.read(this.mcb.pidTable, 2 * this.mcb.maxConn * BLOCK);
      return Array.from({ length: this.mcb.maxConn }, (_, s) => this.decodePid(s, buf, 2 * s * BLOCK));
    });
  }

  readPid(slot: number): Promise<{ req: PidEntry; rsp: PidEntry }> {
    return rereadTorn(async () => this.decodePid(slot, await this.master.read(this.pidOffset(slot, 0), 2 * BLOCK), 0));
  }

  private decodePid(slot: number, buf: Buffer, at: number) {
    const req = PID.decode(`process ID table, connection ${slot}, requestor half`, buf, at);
    const rsp = PID.decode(`process ID table, connection ${slot}, requestee half`, buf, at + BLOCK);
    if (req.slot !== slot || rsp.slot !== slot || req.role !== Role.REQUESTOR || rsp.role !== Role.REQUESTEE)
      throw new XferFormatError(`process ID table, connection ${slot}`, 'names another slot or role: damaged');
    return { req, rsp };
  }

  writePid(e: PidEntry): Promise<void> {
    return this.master.write(this.pidOffset(e.slot, e.role), PID.encode(e));
  }

  readPtr(slot: number): Promise<PtrTable> {
    return rereadTorn(async () => {
      const t = PTR.decode(`pointer table of connection ${slot}`, await this.master.read(this.mcb.ptrTables + slot * BLOCK, BLOCK));
      if (t.slot !== slot) throw new XferFormatError(`pointer table of connection ${slot}`, `names connection ${t.slot}: damaged`);
      return t;
    });
  }

  /** The pointer table checked whole, its entries decoded as they are read: the receiver's poll. */
  readPtrView(slot: number): Promise<TableView<PtrTable, PtrEntry>> {
    return rereadTorn(async () => {
      const what = `pointer table of connection ${slot}`;
      const t = PTR.view(what, await this.master.read(this.mcb.ptrTables + slot * BLOCK, BLOCK));
      if (t.head.slot !== slot) throw new XferFormatError(what, `names connection ${t.head.slot}: damaged`);
      return t;
    });
  }

  writePtr(t: PtrTable): Promise<void> {
    return this.writePtrBlock(t.slot, PTR.encode(t));
  }

  /** A pointer table encoded earlier: what it said then, whatever the table says now. */
  writePtrBlock(slot: number, block: Buffer): Promise<void> {
    return this.master.write(this.mcb.ptrTables + slot * BLOCK, block);
  }

  readAck(slot: number): Promise<AckTable> {
    return rereadTorn(async () => {
      const t = ACK.decode(`acknowledgement table of connection ${slot}`, await this.master.read(this.mcb.ackTables + slot * BLOCK, BLOCK));
      if (t.slot !== slot) throw new XferFormatError(`acknowledgement table of connection ${slot}`, `names connection ${t.slot}: damaged`);
      return t;
    });
  }

  /** The acknowledgement table checked whole, its entries decoded as they are read: the sender's poll. */
  readAckView(slot: number): Promise<TableView<AckTable, AckEntry>> {
    return rereadTorn(async () => {
      const what = `acknowledgement table of connection ${slot}`;
      const t = ACK.view(what, await this.master.read(this.mcb.ackTables + slot * BLOCK, BLOCK));
      if (t.head.slot !== slot) throw new XferFormatError(what, `names connection ${t.head.slot}: damaged`);
      return t;
    });
  }

  writeAck(t: AckTable): Promise<void> {
    return this.writeAckBlock(t.slot, ACK.encode(t));
  }

  /** An acknowledgement table encoded earlier (and patched since): not to be changed until written. */
  writeAckBlock(slot: number, block: Buffer): Promise<void> {
    return this.master.write(this.mcb.ackTables + slot * BLOCK, block);
  }

  /** Header plus `length` data bytes, rounded up to whole blocks; into `dest` (a pool buffer) when given. */
  readSegment(at: SegmentAddress, length: number, dest?: Buffer): Promise<Buffer> {
    return this.devices[at.dev].read(at.offset, roundUp(SEG_HEADER + length), dest);
  }

  /** Segment I/Os to keep in flight on all paths together (see perPathInFlight). */
  get inFlight(): number {
    return perPathInFlight(this.mcb.segSize) * this.devices.reduce((n, d) => n + d.paths.length, 0);
  }

  /** Buffers of a whole segment, aligned when a path needs it. */
  segmentPool(keep?: number): BufferPool {
    return new BufferPool(this.mcb.segSize, this.devices.some((d) => d.direct), keep);
  }

  /** `seg` holds the header and data, whole blocks long. */
  writeSegment(at: SegmentAddress, seg: Buffer): Promise<void> {
    return this.devices[at.dev].write(at.offset, seg);
  }

  async close(): Promise<void> {
    await Promise.all(this.devices.map((d) => d.close()));
  }
}

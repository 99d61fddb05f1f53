// The metadata store: a snapshot plus a journal of the records applied since, in cfs.dataDir.
//
//   snapshot        the whole namespace as of record `seq`; replaced atomically
//                   (write snapshot.tmp, fsync, rename, fsync the directory)
//                     header (util/format.ts): "BMCFSSNP" v1, seq u64, body bytes u32,
//                     body CRC32C u32, header CRC32C; then the body: the namespace as JSON
//   journal         header: "BMCFSJNL" v1, header CRC32C; then the frames appended since,
//                   each   u32le length | u32le CRC32C of the record | JSON record
//
// A snapshot or journal header that is damaged, foreign or from a newer blockmirror stops the
// server at start with one line (FormatError). Files of the first format (snapshot.json, a
// journal without a header, CRC-32 frames) are read once and rewritten in this one.
//
// Durability: append() numbers a record and queues it; one writer loop writes whatever is queued in
// one write() and fdatasync()s it (group commit), so concurrent requests share an fsync. sync(seq)
// resolves once record `seq` is on disk; the server answers a request only after that.
//
// Recovery: load the snapshot, then replay the journal's frames with seq above the snapshot's. The
// first frame that is short or fails its CRC is a torn tail from a crash mid-append: the journal is
// truncated there. (A frame is only acknowledged after its fsync, so nothing acknowledged is lost.)
//
// Compaction: once the journal passes COMPACT_BYTES the loop writes a new snapshot of the current
// state (which includes every record appended so far, written or not) and empties the journal.
import fs from 'node:fs/promises';
import path from 'node:path';
import * as BL from 'buffer-layout';
import { FileFormat, FormatError, crc } from '../util/format.js';
import type { JournalRecord, NamespaceSnapshot, RecordBody } from './namespace.js';

const SNAPSHOT = 'snapshot';
const LEGACY_SNAPSHOT = 'snapshot.json';
const JOURNAL = 'journal';
const COMPACT_BYTES = 8 * 1024 * 1024;

interface SnapshotHeader {
  seq: number;
  bodyBytes: number;
  bodyCrc: number;
}
const SNAPSHOT_FORMAT = new FileFormat<SnapshotHeader>('CFS snapshot', 'BMCFSSNP', 1, [BL.nu64('seq'), BL.u32('bodyBytes'), BL.u32('bodyCrc')]);
const JOURNAL_FORMAT = new FileFormat<Record<string, never>>('CFS journal', 'BMCFSJNL', 1, []);
/** Bytes of the journal's header: a journal holding no record is this long. */
export const JOURNAL_HEADER = JOURNAL_FORMAT.size;
/** Each record: its length and checksum, then the record. */
const FRAME = BL.struct<{ length: number; crc: number }>([BL.u32('length'), BL.u32('crc')]);
const FRAME_HEADER = FRAME.span;

export interface StoredState {
  snapshot?: NamespaceSnapshot;
  records: JournalRecord[];
  /** Bytes cut from a torn journal tail; 0 for a clean one. */
  tornBytes: number;
  /** Read from files of the first format: open() rewrites them in this one. */
  legacy?: boolean;
}

export interface MetadataStore {
  /** Number the record and queue it for the disk; returns its seq. */
  append(body: RecordBody): JournalRecord;
  /** Resolves once every record up to `seq` (default: the last appended) is durable. */
  sync(seq?: number): Promise<void>;
  close(): Promise<void>;
  readonly where: string;
}

/** Metadata of a file system whose volumes are in memory: it lives exactly as long as they do. */
export class MemoryStore implements MetadataStore {
  private seq = 0;
  readonly where = 'memory';
  append(body: RecordBody): JournalRecord {
    return { ...body, seq: ++this.seq } as JournalRecord;
  }
  async sync(): Promise<void> {}
  async close(): Promise<void> {}
}

export class JournalStore implements MetadataStore {
  private seq: number;
  private durable: number;
  private queue: { seq: number; frame: Buffer }[] = [];
  private waiters: { seq: number; resolve: () => void; reject: (e: Error) => void }[] = [];
  private writing = false;
  private broken: Error | undefined;
  private journalBytes: number;
  private closed = false;
  private idle: Promise<void> = Promise.resolve();
  private markIdle: () => void = () => {};

  private constructor(
    private readonly dir: string,
    private readonly fh: fs.FileHandle,
    lastSeq: number,
    journalBytes: number,
    private readonly snapshotOf: () => NamespaceSnapshot,
  ) {
    this.seq = lastSeq;
    this.durable = lastSeq;
    this.journalBytes = journalBytes;
  }

  get where(): string {
    return this.dir;
  }

  /** Read what is stored (cutting a torn tail). Call open() afterwards to append. */
  static async load(dir: string): Promise<StoredState> {
    await fs.mkdir(dir, { recursive: true });
    await fs.rm(path.join(dir, `${SNAPSHOT}.tmp`), { force: true });
    const found = (await readSnapshot(path.join(dir, SNAPSHOT))) ?? (await readLegacySnapshot(path.join(dir, LEGACY_SNAPSHOT)));
    const { legacy: legacySnapshot, ...snapshot } = found ?? { legacy: false };
    const after = found ? found.seq : 0;
    const file = path.join(dir, JOURNAL);
    let buf: Buffer;
    try {
      buf = await fs.readFile(file);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e;
      buf = Buffer.alloc(0);
    }
    // A journal of the first format has no header, and starts with a whole CRC-32 frame; an
    // empty one is new; anything else must carry our header (decode refuses it otherwise).
    const legacy = buf.length > 0 && !JOURNAL_FORMAT.matches(buf) && startsWithLegacyFrame(buf);
    let at = 0;
    if (buf.length > 0 && !legacy) {
      JOURNAL_FORMAT.decode(file, buf.subarray(0, JOURNAL_FORMAT.size));
      at = JOURNAL_FORMAT.size;
    }
    const check = legacy ? legacyCrc32 : crc;
    const records: JournalRecord[] = [];
    let last = after;
    while (at + FRAME_HEADER <= buf.length) {
      const frame = FRAME.decode(buf, at);
      if (at + FRAME_HEADER + frame.length > buf.length) break;
      const payload = buf.subarray(at + FRAME_HEADER, at + FRAME_HEADER + frame.length);
      if (check(payload) !== frame.crc) break;
      let rec: JournalRecord;
      try {
        rec = JSON.parse(payload.toString('utf8')) as JournalRecord;
      } catch {
        break;
      }
      at += FRAME_HEADER + frame.length;
      if (rec.seq <= after) continue; // already in the snapshot (a crash between snapshot and truncation)
      if (rec.seq !== last + 1) throw new FormatError(file, `record ${rec.seq} follows ${last}: the journal does not belong to this snapshot; move both away only if you accept losing the CFS metadata`);
      records.push(rec);
      last = rec.seq;
    }
    const torn = buf.length - at;
    if (torn > 0) {
      const fh = await fs.open(file, 'r+');
      try {
        await fh.truncate(at);
        await fh.datasync();
      } finally {
        await fh.close();
      }
    }
    return { ...(found ? { snapshot: snapshot as NamespaceSnapshot & { seq: number } } : {}), records, tornBytes: torn, ...(legacy || legacySnapshot ? { legacy: true } : {}) };
  }

  /** Open for appending after load(); `snapshotOf` gives the state to compact into. */
  static async open(dir: string, state: StoredState, snapshotOf: () => NamespaceSnapshot): Promise<JournalStore> {
    const file = path.join(dir, JOURNAL);
    const fh = await fs.open(file, 'a');
    await fsyncDir(dir); // the journal's directory entry, if it was just created
    const last = state.records.length ? state.records[state.records.length - 1]!.seq : ((state.snapshot as { seq?: number } | undefined)?.seq ?? 0);
    let { size } = await fh.stat();
    if (size === 0) {
      await fh.write(JOURNAL_FORMAT.encode({}));
      await fh.datasync();
      size = JOURNAL_FORMAT.size;
    }
    const store = new JournalStore(dir, fh, last, size, snapshotOf);
    // Replay is bounded by compacting at start-up whatever the journal holds; files of the first
    // format are rewritten in this one the same way.
    if (state.records.length > 0 || state.legacy) await store.compact();
    await fs.rm(path.join(dir, LEGACY_SNAPSHOT), { force: true });
    return store;
  }

  append(body: RecordBody): JournalRecord {
    if (this.broken) throw this.broken;
    const rec = { ...body, seq: ++this.seq } as JournalRecord;
    const payload = Buffer.from(JSON.stringify(rec));
    const frame = Buffer.allocUnsafe(FRAME_HEADER + payload.length);
    FRAME.encode({ length: payload.length, crc: crc(payload) }, frame, 0);
    payload.copy(frame, FRAME_HEADER);
    this.queue.push({ seq: rec.seq, frame });
    if (!this.writing) void this.writeLoop();
    return rec;
  }

  sync(seq = this.seq): Promise<void> {
    if (this.broken) return Promise.reject(this.broken);
    if (seq <= this.durable) return Promise.resolve();
    return new Promise((resolve, reject) => this.waiters.push({ seq, resolve, reject }));
  }

  async close(): Promise<void> {
    if (this.closed) return;
    await this.sync().catch(() => {});
    this.closed = true;
    await this.idle;
    await this.fh.close();
  }

  private async writeLoop(): Promise<void> {
    this.writing = true;
    this.idle = new Promise((r) => (this.markIdle = r));
    try {
      while (this.queue.length > 0 && !this.broken) {
        const batch = this.queue;
        this.queue = [];
        const bytes = Buffer.concat(batch.map((b) => b.frame));
        await this.fh.write(bytes);
        await this.fh.datasync();
        this.journalBytes += bytes.length;
        this.settle(batch[batch.length - 1]!.seq);
        if (this.journalBytes >= COMPACT_BYTES) await this.compact();
      }
    } catch (e) {
      this.broken = new Error(`metadata journal in ${this.dir} failed: ${(e as Error).message}; no further changes are accepted`);
      for (const w of this.waiters.splice(0)) w.reject(this.broken);
    } finally {
      this.writing = false;
      this.markIdle();
    }
  }

  /** Snapshot the current state (every record appended so far) and empty the journal. */
  private async compact(): Promise<void> {
    const seq = this.seq;
    const body = Buffer.from(JSON.stringify({ ...this.snapshotOf(), seq }));
    const tmp = path.join(this.dir, `${SNAPSHOT}.tmp`);
    const fh = await fs.open(tmp, 'w');
    try {
      await fh.writeFile(Buffer.concat([SNAPSHOT_FORMAT.encode({ seq, bodyBytes: body.length, bodyCrc: crc(body) }), body]));
      await fh.sync();
    } finally {
      await fh.close();
    }
    await fs.rename(tmp, path.join(this.dir, SNAPSHOT));
    await fsyncDir(this.dir);
    // Everything up to `seq` is in the snapshot: queued frames of it need not be written.
    this.queue = this.queue.filter((q) => q.seq > seq);
    this.settle(seq);
    await this.fh.truncate(0);
    await this.fh.write(JOURNAL_FORMAT.encode({}));
    await this.fh.datasync();
    this.journalBytes = JOURNAL_FORMAT.size;
  }

  private settle(seq: number): void {
    this.durable = Math.max(this.durable, seq);
    const still: typeof this.waiters = [];
    for (const w of this.waiters) (w.seq <= this.durable ? w.resolve() : still.push(w));
    this.waiters = still;
  }
}

async function fsyncDir(dir: string): Promise<void> {
  const fh = await fs.open(dir, 'r');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

const CRC_TABLE = (() => {
  const t = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    t[n] = c >>> 0;
  }
  return t;
})();

async function readSnapshot(file: string): Promise<(NamespaceSnapshot & { seq: number; legacy?: boolean }) | undefined> {
  let buf: Buffer;
  try {
    buf = await fs.readFile(file);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw new FormatError(file, `cannot read the CFS snapshot: ${(e as Error).message}`, { cause: e });
  }
  const head = SNAPSHOT_FORMAT.decode(file, buf);
  const body = buf.subarray(SNAPSHOT_FORMAT.size);
  if (body.length !== head.bodyBytes || crc(body) !== head.bodyCrc) {
    throw new FormatError(file, `the CFS snapshot's body (${body.length} of ${head.bodyBytes} bytes) fails its checksum: the file is damaged; restore it from a backup`);
  }
  const snap = JSON.parse(body.toString('utf8')) as NamespaceSnapshot & { seq: number };
  if (snap.seq !== head.seq) throw new FormatError(file, `the CFS snapshot's header says record ${head.seq} but its body says ${snap.seq}: the file is damaged`);
  return snap;
}

/** snapshot.json of the first format: plain JSON. */
async function readLegacySnapshot(file: string): Promise<(NamespaceSnapshot & { seq: number; legacy: boolean }) | undefined> {
  let text: string;
  try {
    text = await fs.readFile(file, 'utf8');
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw new FormatError(file, `cannot read the CFS snapshot: ${(e as Error).message}`, { cause: e });
  }
  try {
    return { ...(JSON.parse(text) as NamespaceSnapshot & { seq: number }), legacy: true };
  } catch {
    throw new FormatError(file, 'the CFS snapshot (first format) is not JSON: the file is damaged; restore it from a backup');
  }
}

function startsWithLegacyFrame(buf: Buffer): boolean {
  if (buf.length < FRAME_HEADER) return false;
  const { length, crc: stored } = FRAME.decode(buf, 0);
  return FRAME_HEADER + length <= buf.length && legacyCrc32(buf.subarray(FRAME_HEADER, FRAME_HEADER + length)) === stored;
}

/** CRC-32 (IEEE), as zlib computes it: the frames of a first-format journal. */
function legacyCrc32(data: Uint8Array): number {
  let c = 0xffffffff;
  for (let i = 0; i < data.length; i++) c = CRC_TABLE[(c ^ data[i]!) & 0xff]! ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

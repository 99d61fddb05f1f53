// `blockmirror xfer ...`: host-to-host transfer through a shared volume (docs/xfer.md). format
// lays out the volume; send and recv move one message (a file or stdin) between two processes
// that share nothing but the volume; ls shows the tables; gc reclaims a dead process's part.
// Heavy modules load only when a command runs.
import fs from 'node:fs';
import path from 'node:path';
import type { Command } from 'commander';
import type { Logger } from 'pino';
import { SYNC_BACKOFF_MS, SYNC_SLOW_MS } from '../blockdev/file.js';
import { preadNoWait, pwritevSync, type SyncWrite } from '../blockdev/native.js';
import { lazyCliLogger } from './logger.js';
import { SizeError, formatSize, parseSize } from '../util/size.js';
import { UsageError } from './errors.js';
import { exitDone } from './exit.js';

interface Tuning {
  dev: string[];
  pollMs: string;
  timeout: string;
  heartbeatMs: string;
  retries: string;
  failoverMs: string;
  direct?: boolean;
}

const DEV_HELP = 'a path to the volume: nbd://HOST:PORT/NAME, a block device or a file; repeat it for more paths (and for secondary devices)';

export function registerXferCommand(program: Command): void {
  const xfer = program
    .command('xfer')
    .description('transfer data between hosts through a shared volume (EMC US 6,983,330): format, send, recv, ls, gc')
    .argument('[command]')
    .allowExcessArguments()
    .allowUnknownOption()
    .usage('format|send|recv|ls|gc ...')
    .action((sub: string | undefined) => {
      const expected = 'format, send, recv, ls or gc';
      throw new UsageError(sub === undefined ? `xfer: missing command (${expected})` : `xfer: unknown command "${sub}" (expected ${expected})`);
    });

  xfer
    .command('format <dev...>')
    .description('write the master control block on the first device and SEC blocks on the others (one path per device)')
    .option('--seg-size <size>', 'bytes per segment, a multiple of 4 KiB (e.g. 1MiB)', '4MiB')
    .option('--segments <n>', 'segments on each device', '64')
    .option('--max-conn <n>', 'connection slots in the process ID table; each owns an equal share of the segments', '4')
    .allowExcessArguments(false)
    .action(async (devs: string[], opts: { segSize: string; segments: string; maxConn: string }) => {
      const segSize = size('--seg-size', opts.segSize);
      const segments = int('--segments', opts.segments, 1);
      const maxConn = int('--max-conn', opts.maxConn, 1);
      const { formatVolume } = await import('../xfer/volume.js');
      const mcb = await usage(formatVolume(devs, { segSize, segments, maxConn }));
      process.stdout.write(
        `formatted ${devs.length} device(s): ${segments * devs.length} segments of ${formatSize(segSize)}, ${maxConn} connections of ${mcb.entries} segments each\n`,
      );
    });

  tuned(
    xfer
      .command('send [files...]')
      .description('send each FILE (or stdin, -) from process ID --from to process ID --to as one message, all on one connection')
      .requiredOption('--from <id>', 'our process ID (1 to 4294967295)')
      .requiredOption('--to <id>', 'the receiving process ID')
      .option('--resume', 'take over the connection of a sender --from that died (kill -9, restart), from the on-disk tables; needs the same FILEs'),
  ).action(async (files: string[], opts: Tuning & { from: string; to: string; resume?: boolean }, cmd: Command) => {
    const from = id('--from', opts.from);
    const to = id('--to', opts.to);
    const tuning = session(opts);
    const stdin = files.length === 0 || (files.length === 1 && files[0] === '-');
    if (!stdin && files.includes('-')) throw new UsageError('send: stdin (-) is the only message when given; name files otherwise');
    if (stdin && opts.resume) throw new UsageError('send --resume needs the FILEs again (stdin cannot be rewound)');
    const lib = early(import('../xfer/sender.js'));
    const handles: fs.promises.FileHandle[] = [];
    try {
      for (const file of stdin ? [] : files) {
        try {
          if (!fs.statSync(file).isFile()) throw new UsageError(`send: ${file} is not a file`);
          handles.push(await fs.promises.open(file, 'r'));
        } catch (e) {
          if (e instanceof UsageError) throw e;
          throw new UsageError(`send: cannot read ${file}: ${(e as Error).message}`);
        }
      }
      // Files are read straight into the segment buffers (no copy); messages are numbered from 1.
      const open = (msg: number, offset: number) =>
        stdin ? [process.stdin as AsyncIterable<Uint8Array>] : handles.slice(msg - 1).map((fh, k) => fileReader(fh, k === 0 ? offset : 0));
      const log = await lazyCliLogger(cmd);
      await withVolume(opts.dev, log, { direct: opts.direct === true, graceMs: int('--failover-ms', opts.failoverMs, 0) }, lib, async (vol, signal, { sendMessages, resumeSend }) => {
        const o = { ...tuning, log, signal };
        const r = opts.resume ? await resumeSend(vol, from, to, open, o) : await sendMessages(vol, from, to, open(1, 0), o);
        process.stderr.write(`sent ${r.bytes} bytes in ${r.segments} segments over connection ${r.slot}\n`);
      });
    } finally {
      await Promise.all(handles.map((h) => h.close()));
    }
    exitDone();
  });

  tuned(
    xfer
      .command('recv')
      .description('receive the messages of one connection for process ID --as: to --out FILE (one after another), --out-dir DIR (one file each) or stdout')
      .requiredOption('--as <id>', 'our process ID')
      .option('--from <id>', 'only accept a connection from this process ID')
      .option('--out <file>', 'write the messages here, one after another (default stdout)')
      .option('--out-dir <dir>', 'write message N to DIR/message-N')
      .option('--wait <ms>', 'give up when no sender connects within this time (default: wait forever)')
      .option('--resume', 'take over the connection of a receiver --as that died, from the on-disk tables; cuts the output back to what was acknowledged'),
  ).action(async (opts: Tuning & { as: string; from?: string; out?: string; outDir?: string; wait?: string; resume?: boolean }, cmd: Command) => {
    const as = id('--as', opts.as);
    const from = opts.from === undefined ? undefined : id('--from', opts.from);
    const waitMs = opts.wait === undefined ? undefined : int('--wait', opts.wait, 0);
    const tuning = session(opts);
    if (opts.out !== undefined && opts.outDir !== undefined) throw new UsageError('recv: give --out or --out-dir, not both');
    if (opts.resume && opts.out === undefined && opts.outDir === undefined) throw new UsageError('recv --resume needs --out FILE or --out-dir DIR (stdout cannot be cut back)');
    if (opts.outDir !== undefined && !fs.statSync(opts.outDir, { throwIfNoEntry: false })?.isDirectory()) throw new UsageError(`recv: --out-dir ${opts.outDir} is not a directory`);
    const lib = early(import('../xfer/receiver.js'));
    const out = new Output(opts.out, opts.outDir, opts.resume === true);
    await out.open();
    const log = await lazyCliLogger(cmd);
    try {
      await withVolume(opts.dev, log, { direct: opts.direct === true, graceMs: int('--failover-ms', opts.failoverMs, 0) }, lib, async (vol, signal, { recv }) => {
        const r = await recv(vol, as, (data, piece) => out.deliver(data, piece.msg), {
          ...tuning,
          log,
          signal,
          ...(from !== undefined ? { from } : {}),
          ...(waitMs !== undefined ? { waitMs } : {}),
          ...(opts.resume ? { resume: (msg: number, offset: number) => out.cutBack(msg, offset) } : {}),
        });
        process.stderr.write(`received ${r.bytes} bytes in ${r.segments} segments from ${r.from} over connection ${r.slot} (${r.messages} message${r.messages === 1 ? '' : 's'})\n`);
      });
    } finally {
      await out.close();
    }
    exitDone();
  });

  xfer
    .command('ls')
    .description('show the master control block, the devices and their paths, the connections, their pointer tables and the segments in use')
    .option('--dev <dev>', DEV_HELP, collect, [])
    .option('--json', 'print JSON')
    .action(async (opts: { dev: string[]; json?: boolean }, cmd: Command) => {
      await withVolume(opts.dev, await lazyCliLogger(cmd), {}, early(import('../xfer/inspect.js')), async (vol, _signal, { describe }) => {
        const r = await describe(vol);
        if (opts.json) return void process.stdout.write(JSON.stringify(r, null, 2) + '\n');
        const lines = [
          `volume ${r.volume}: ${r.totalSegments} segments of ${formatSize(r.segSize)}, ${r.maxConnections} connections of ${r.segmentsPerConnection} segments`,
          ...r.devices.map((d) => `device ${d.index} (${d.index === 0 ? 'MAS_EMC' : 'SEC_EMC'}): ${d.segments} segments, paths ${d.paths.map((p) => p.name + (p.live ? '' : ' (down)')).join(', ')}`),
          'CONN  STATE       FROM        TO          TOKEN       HEARTBEATS  IN USE',
          ...r.connections.map((c) =>
            [String(c.slot).padEnd(5), c.state.padEnd(11), String(c.requestor).padEnd(11), String(c.requestee).padEnd(11), String(c.token).padEnd(11), `${c.heartbeats[0]}/${c.heartbeats[1]}`.padEnd(11), String(c.segmentsInUse)].join(' '),
          ),
        ];
        for (const c of r.connections)
          for (const p of c.pointers)
            lines.push(`  conn ${c.slot} entry ${p.entry}: seq ${p.seq}, ${p.length} bytes at device ${p.dev} offset ${p.offset}${p.last ? ', last' : ''}, ${p.acked ? 'read' : 'written'}`);
        process.stdout.write(lines.join('\n') + '\n');
      });
    });

  xfer
    .command('gc')
    .description('reclaim the connections and segments of processes whose heartbeat stood still for --timeout')
    .option('--dev <dev>', DEV_HELP, collect, [])
    .option('--timeout <ms>', 'how long a heartbeat must stand still', '30000')
    .action(async (opts: { dev: string[]; timeout: string }, cmd: Command) => {
      const timeoutMs = int('--timeout', opts.timeout, 0);
      await withVolume(opts.dev, await lazyCliLogger(cmd), {}, early(import('../xfer/gc.js')), async (vol, signal, { gc }) => {
        const done = await gc(vol, timeoutMs, signal);
        if (done.length === 0) process.stdout.write('nothing to reclaim\n');
        for (const r of done) process.stdout.write(`reclaimed connection ${r.slot}: the ${r.side} half of process ${r.id}${r.side === 'sender' ? `, ${r.segments} segments` : ''}\n`);
      });
    });
}

/**
 * Reads a file from `start` on, into the buffers it is given. What the page cache holds is read
 * right here (preadv2 with RWF_NOWAIT, through the native addon), the rest through libuv's pool:
 * 4 MiB reads of a cached file through the pool took 155 ms of CPU per GiB, here 110 (two thread
 * hand-offs per read; bench/RESULTS.md, "xfer, issue 17 fourth part"), and nothing else in a
 * sender's event loop waits on a segment's copy. `nowait` is for tests.
 */
export function fileReader(fh: fs.promises.FileHandle, start: number, nowait: (fd: number, buf: Buffer, position: number) => number = preadNoWait) {
  let position = start;
  return {
    async read(buf: Buffer, offset: number, length: number): Promise<number> {
      // Bytes read (0 at the end of the file), or -1 when the cache does not have the first of them.
      let n = nowait(fh.fd, buf.subarray(offset, offset + length), position);
      if (n < 0) n = (await fh.read(buf, offset, length, position)).bytesRead;
      position += n;
      return n;
    },
  };
}

/**
 * Where recv puts the messages. Files get positioned writes, each complete before its piece is
 * acknowledged: after a kill they hold at least what was acknowledged, and --resume cuts them
 * back to exactly that.
 *   --out FILE     the messages one after another
 *   --out-dir DIR  message N in DIR/message-N
 *   neither        stdout
 */
export class Output {
  private fh: fs.promises.FileHandle | undefined;
  private msg = 0;
  private position = 0;

  constructor(
    private readonly file: string | undefined,
    private readonly dir: string | undefined,
    private readonly resume: boolean,
    /** The synchronous write, for tests to stand in a slow disk: pwritevSync by default. */
    private readonly syncWrite: (fd: number, pieces: readonly Buffer[], position: number) => SyncWrite = pwritevSync,
  ) {}

  /** A pipe (a FIFO given as --out) takes its bytes in order, without positions. */
  private seekable = true;
  /**
   * Pieces are written on this thread (pwritev) while that only copies into the page cache: a
   * piece through libuv's pool cost two thread hand-offs, and delivery waits for each write
   * (4 % of a 1 GiB transfer's time, into /dev/null). A write in which the thread slept for
   * SYNC_SLOW_MS or more met a disk that cannot keep up, and the pool takes the writes for
   * SYNC_BACKOFF_MS: the file volumes' rule (blockdev/file.ts). An output that refuses positioned
   * writes (a tty) goes to the pool for good.
   */
  private syncUntil = 0;
  private syncOk = true;
  /** Pieces written on this thread and through the pool (tests). */
  readonly writes = { sync: 0, pool: 0 };

  async open(): Promise<void> {
    if (this.file === undefined) return;
    this.fh = await this.openFile(this.file, this.resume ? 'r+' : 'w');
    const st = await this.fh.stat();
    this.seekable = st.isFile();
    // Character devices such as /dev/null take pwritev (the position means nothing to them).
    this.syncOk = st.isFile() || st.isCharacterDevice();
  }

  /** Bytes of `data` written here without waiting; 0 when it is the pool's to write. */
  private writeHere(fd: number, data: Buffer): number {
    if (!this.syncOk || (this.syncUntil !== 0 && performance.now() < this.syncUntil)) return 0;
    const start = performance.now();
    let r: SyncWrite;
    try {
      r = this.syncWrite(fd, [data], this.position);
    } catch {
      // ESPIPE and the like: this output is for the pool; a real error shows again there.
      this.syncOk = false;
      return 0;
    }
    this.syncUntil = r.slept && performance.now() - start >= SYNC_SLOW_MS ? performance.now() + SYNC_BACKOFF_MS : 0;
    this.writes.sync++;
    return r.written;
  }

  private async openFile(file: string, flags: string): Promise<fs.promises.FileHandle> {
    return fs.promises.open(file, flags).catch((e: Error) => {
      throw new UsageError(`recv: cannot write ${file}: ${e.message}`);
    });
  }

  private messageFile(msg: number): string {
    return path.join(this.dir!, `message-${msg}`);
  }

  async deliver(data: Buffer, msg: number): Promise<void> {
    if (this.dir !== undefined && msg !== this.msg) {
      await this.fh?.close();
      this.fh = await this.openFile(this.messageFile(msg), 'w');
      this.position = 0;
    }
    this.msg = msg;
    if (!this.fh) {
      // The callback fires once stdout is done with the buffer, which is reused after we return.
      await new Promise<void>((resolve, reject) => process.stdout.write(data, (e) => (e ? reject(e) : resolve())));
      return;
    }
    let done = this.writeHere(this.fh.fd, data);
    if (done < data.length) this.writes.pool++;
    while (done < data.length) done += (await this.fh.write(data, done, data.length - done, this.seekable ? this.position + done : null)).bytesWritten;
    this.position += data.length;
  }

  /** Resume: delivery goes on at message `msg`, byte `offset`; whatever lies beyond is removed. */
  async cutBack(msg: number, offset: number): Promise<void> {
    if (this.dir !== undefined) {
      for (const name of await fs.promises.readdir(this.dir)) {
        const n = /^message-(\d+)$/.exec(name);
        if (n && Number(n[1]) > msg) await fs.promises.rm(path.join(this.dir, name));
      }
      await fs.promises.writeFile(this.messageFile(msg), '', { flag: 'a' });
      this.fh = await this.openFile(this.messageFile(msg), 'r+');
      await this.fh.truncate(offset);
      this.msg = msg;
      this.position = offset;
      return;
    }
    // One file: where message msg starts is known only for the first one.
    if (msg !== 1) throw new UsageError(`recv --resume --out: the connection was in its message ${msg}, and --out does not say where that one starts; receive with --out-dir to resume connections of several messages`);
    await this.fh!.truncate(offset);
    this.position = offset;
  }

  async close(): Promise<void> {
    await this.fh?.close();
  }
}

/** The options send and recv share. */
function tuned(cmd: Command): Command {
  return cmd
    .option('--dev <dev>', DEV_HELP, collect, [])
    .option('--poll-ms <ms>', 'between two polls of the other side', '10')
    .option('--timeout <ms>', 'a peer silent this long is gone; also the wait for a free slot and for the receiver', '30000')
    .option('--heartbeat-ms <ms>', 'between two heartbeats of our half of the process ID table', '500')
    .option('--retries <n>', 'reads of a segment or table that does not check out before it is refused', '100')
    .option('--failover-ms <ms>', 'with every path to a device down, how long to keep trying them (a pair swapping its master)', '10000')
    .option('--direct', 'open file paths with O_DIRECT too, bypassing this host\'s page cache (block devices always are)')
    .allowExcessArguments(false);
}

function collect(value: string, previous: string[]): string[] {
  return [...previous, value];
}

function session(o: Tuning) {
  return {
    pollMs: int('--poll-ms', o.pollMs, 1),
    timeoutMs: int('--timeout', o.timeout, 1),
    heartbeatMs: int('--heartbeat-ms', o.heartbeatMs, 1),
    retries: int('--retries', o.retries, 0),
  };
}

/**
 * A module import started early, to load while other things wait (files opening, the NBD
 * handshake): each command asks for its library first and awaits it once the volume is open.
 * Marked handled so that an error before that await (a usage error) does not also report it;
 * awaiting it still throws.
 */
function early<T>(p: Promise<T>): Promise<T> {
  p.catch(() => undefined);
  return p;
}

/** Open the volume, run `fn` with the library `lib` once both are ready, close; SIGINT/SIGTERM stop the run so it frees what it holds. */
async function withVolume<L>(
  devs: string[],
  log: Logger,
  paths: { direct?: boolean; graceMs?: number },
  lib: Promise<L>,
  fn: (vol: import('../xfer/volume.js').XferVolume, signal: AbortSignal, lib: L) => Promise<void>,
): Promise<void> {
  const { XferVolume } = await import('../xfer/volume.js');
  const vol = await usage(XferVolume.open(devs, { log, ...paths }));
  log.debug({ paths: vol.devices.reduce((n, d) => n + d.paths.length, 0) }, 'volume open');
  const ac = new AbortController();
  const stop = () => ac.abort(new Error('interrupted'));
  process.once('SIGINT', stop);
  process.once('SIGTERM', stop);
  try {
    await fn(vol, ac.signal, await lib);
  } finally {
    process.off('SIGINT', stop);
    process.off('SIGTERM', stop);
    await vol.close();
  }
}

/** The library's usage errors are the command line's. */
async function usage<T>(p: Promise<T>): Promise<T> {
  const { XferUsageError } = await import('../xfer/errors.js');
  return p.catch((e: unknown) => {
    throw e instanceof XferUsageError ? new UsageError(e.message) : e;
  });
}

function id(name: string, text: string): number {
  const n = Number(text);
  if (!/^\d+$/.test(text) || !Number.isSafeInteger(n) || n < 1 || n > 0xffffffff) throw new UsageError(`${name} "${text}": a process ID is an integer from 1 to 4294967295`);
  return n;
}

function int(name: string, text: string, min: number): number {
  const n = Number(text);
  if (!/^\d+$/.test(text) || !Number.isSafeInteger(n) || n < min) throw new UsageError(`${name} "${text}": expected an integer of at least ${min}`);
  return n;
}

function size(name: string, text: string): number {
  try {
    return parseSize(text);
  } catch (e) {
    throw new UsageError(`${name}: ${(e as SizeError).message}`);
  }
}

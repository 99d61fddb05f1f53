// NBD client request side: the in-flight table with its timeout sweep, the corked writer with
// backpressure, and the policy that refuses locally what the server did not advertise.
import { performance } from 'node:perf_hooks';
import {
  TransmissionFlag,
  Cmd,
  CmdFlag,
  nameOf,
} from '../../protocol/constants.js';
import {
  type BlockStatusExtent,
} from '../../protocol/replies.js';
import { NbdTransport, Negotiated } from './handshake.js';
import { NbdError, badReply, refused } from './errors.js';
import { WritePayload } from './client.js';

// ---------------------------------------------------------------------------
// Transmission: the pieces

// The resolve/reject pair of the promise being made: a shared executor stores them here, so
// starting a command makes no closure of its own (Promise.withResolvers needs Node 22).
let resolveNext: (value: unknown) => void = () => undefined;
let rejectNext: (reason: Error) => void = () => undefined;
const capture = (resolve: (value: unknown) => void, reject: (reason: Error) => void): void => {
  resolveNext = resolve;
  rejectNext = reject;
};

/** One request from submit to its settled promise; its result depends on its type (settle()). */
export class Command {
  /** READ bytes covered so far by data and holes. */
  seen = 0;
  extents: Map<number, BlockStatusExtent[]> | undefined = undefined;
  error: NbdError | undefined = undefined;
  // Set by start(), before anything can settle the command.
  private resolve!: (value: unknown) => void;
  private reject!: (reason: Error) => void;

  constructor(
    readonly op: string,
    readonly cookie: number,
    readonly type: number,
    readonly offset: number,
    readonly length: number,
    readonly issued: number,
    /** READ destination. */
    readonly buf: Buffer | undefined,
    /** BLOCK_STATUS: the meta context asked for, and its negotiated id. */
    readonly context?: string,
    readonly contextId?: number,
  ) {}

  start(): Promise<unknown> {
    const p = new Promise(capture);
    this.resolve = resolveNext;
    this.reject = rejectNext;
    return p;
  }

  /** Settle with `err`, or with the result the reply makes: READ -> buf, BLOCK_STATUS -> extents, else undefined. */
  settle(err?: Error): void {
    if (err) return this.reject(err);
    if (this.type === Cmd.READ) {
      if (this.seen !== this.length) return this.reject(badReply(this.op, `server sent ${this.seen} of ${this.length} bytes`));
      return this.resolve(this.buf);
    }
    if (this.type === Cmd.BLOCK_STATUS) {
      const list = this.contextId === undefined ? undefined : this.extents?.get(this.contextId);
      if (!list) return this.reject(badReply(this.op, `no extents for ${this.context}`));
      if (list.some((e) => e.length === 0)) return this.reject(badReply(this.op, 'zero-length extent'));
      return this.resolve(list);
    }
    this.resolve(undefined);
  }
}

/**
 * In-flight commands by cookie. Map keeps insertion order and cookies are
 * issued in order, so the first entry is always the oldest: one timer aimed
 * at it replaces a timer per request.
 */
export class InFlight {
  private readonly map = new Map<number, Command>();
  private timer: NodeJS.Timeout | undefined;
  private idleWaiters: Array<() => void> = [];

  constructor(
    private readonly timeoutMs: number | undefined,
    private readonly onTimeout: (c: Command) => void,
  ) {}

  get size(): number {
    return this.map.size;
  }

  add(c: Command): void {
    this.map.set(c.cookie, c);
    if (this.timeoutMs !== undefined && !this.timer) this.arm(this.timeoutMs);
  }

  get(cookie: number): Command | undefined {
    return this.map.get(cookie);
  }

  delete(cookie: number): void {
    this.map.delete(cookie);
    if (this.map.size === 0) this.becameIdle();
  }

  /** Empty the table (connection death); the caller settles what it gets. */
  drain(): Command[] {
    const all = [...this.map.values()];
    this.map.clear();
    if (this.timer) clearTimeout(this.timer);
    this.timer = undefined;
    this.becameIdle();
    return all;
  }

  whenIdle(): Promise<void> {
    return this.map.size === 0 ? Promise.resolve() : new Promise((r) => this.idleWaiters.push(r));
  }

  // The sweep timer stays armed when the table empties: a pipeline that empties between bursts
  // (a sync pair's replication at low queue depth) would otherwise make and cancel a timer per
  // burst. A sweep that finds the table empty just ends; the next add() arms it again.
  private becameIdle(): void {
    const w = this.idleWaiters;
    this.idleWaiters = [];
    for (const r of w) r();
  }

  private arm(ms: number): void {
    this.timer = setTimeout(this.sweep, ms);
    this.timer.unref();
  }

  private readonly sweep = (): void => {
    this.timer = undefined;
    const oldest = this.map.values().next().value;
    if (!oldest || this.timeoutMs === undefined) return;
    const left = oldest.issued + this.timeoutMs - performance.now();
    if (left <= 0) this.onTimeout(oldest);
    else this.arm(Math.ceil(left));
  };
}

/**
 * Writes requests in issue order. All requests made in one tick go out under
 * one cork (one writev), header and payload together. When the socket says
 * its buffer is full, later requests wait here for 'drain' instead of piling
 * up inside the socket.
 */
export class RequestWriter {
  private corked = false;
  private blocked = false;
  private queue: Array<[Buffer, WritePayload | undefined] | undefined> = [];
  private head = 0;

  constructor(private readonly t: NbdTransport) {}

  /** Requests waiting for 'drain'. */
  get backlog(): number {
    return this.queue.length - this.head;
  }

  send(header: Buffer, payload?: WritePayload): void {
    if (this.blocked) this.queue.push([header, payload]);
    else this.write(header, payload);
  }

  drained(): void {
    this.blocked = false;
    while (!this.blocked && this.head < this.queue.length) {
      const [h, p] = this.queue[this.head]!;
      this.queue[this.head++] = undefined;
      this.write(h, p);
    }
    if (this.head === this.queue.length) {
      this.queue = [];
      this.head = 0;
    }
  }

  discard(): void {
    this.queue = [];
    this.head = 0;
  }

  private write(header: Buffer, payload: WritePayload | undefined): void {
    if (!this.corked) {
      this.corked = true;
      this.t.cork();
      process.nextTick(this.uncork);
    }
    let ok = this.t.write(header);
    if (payload instanceof Uint8Array) ok = this.t.write(payload);
    else if (payload) for (const piece of payload) ok = this.t.write(piece);
    if (!ok) this.blocked = true;
  }

  private readonly uncork = (): void => {
    this.corked = false;
    this.t.uncork();
  };
}

export interface Rule {
  /** Transmission flag that must be advertised. */
  needs?: number;
  /** Modifies data: refused on READ_ONLY exports. */
  writes?: boolean;
  /** The length is a payload size, bounded by the maximum block size. */
  payload?: boolean;
  /** Error for a range past the end (proto.md §1.10). */
  pastEnd: 'EINVAL' | 'ENOSPC';
}

export const RULES: Record<number, Rule> = {
  [Cmd.READ]: { payload: true, pastEnd: 'EINVAL' },
  [Cmd.WRITE]: { writes: true, payload: true, pastEnd: 'ENOSPC' },
  [Cmd.FLUSH]: { needs: TransmissionFlag.SEND_FLUSH, pastEnd: 'EINVAL' },
  [Cmd.TRIM]: { needs: TransmissionFlag.SEND_TRIM, writes: true, pastEnd: 'EINVAL' },
  [Cmd.CACHE]: { needs: TransmissionFlag.SEND_CACHE, pastEnd: 'EINVAL' },
  [Cmd.WRITE_ZEROES]: { needs: TransmissionFlag.SEND_WRITE_ZEROES, writes: true, pastEnd: 'ENOSPC' },
  [Cmd.BLOCK_STATUS]: { pastEnd: 'EINVAL' },
};

export const FLAG_NEEDS: Array<[flag: number, needs: number, name: string]> = [
  [CmdFlag.FUA, TransmissionFlag.SEND_FUA, 'FUA'],
  [CmdFlag.DF, TransmissionFlag.SEND_DF, 'DF'],
  [CmdFlag.FAST_ZERO, TransmissionFlag.SEND_FAST_ZERO, 'FAST_ZERO'],
  [CmdFlag.NO_HOLE, TransmissionFlag.SEND_WRITE_ZEROES, 'NO_HOLE'],
];

export const U32_MAX = 0xffffffff;

/**
 * Every command passes here before it gets a cookie. Argument sanity is
 * always checked (the wire cannot carry a negative offset); what the server
 * advertised is checked only in strict mode.
 */
export class RequestPolicy {
  constructor(
    private readonly n: Negotiated,
    private readonly strict: boolean,
  ) {}

  check(op: string, type: number, flags: number, offset: number, length: number): NbdError | undefined {
    if (!Number.isSafeInteger(offset) || offset < 0) return refused(op, 'EINVAL', `offset ${offset} is not a non-negative integer`);
    if (!Number.isSafeInteger(length) || length < 0 || length > U32_MAX) return refused(op, 'EINVAL', `length ${length} does not fit in 32 bits`);
    if (!Number.isSafeInteger(offset + length)) return refused(op, 'EINVAL', `range end ${offset + length} is beyond 2^53`);
    if (!this.strict) return undefined;
    const rule = RULES[type];
    const eflags = this.n.flags;
    if (rule.writes && eflags & TransmissionFlag.READ_ONLY) return refused(op, 'EPERM', 'the export is read-only');
    if (rule.needs && !(eflags & rule.needs)) return refused(op, 'ENOTSUP', `the server does not support ${nameOf('cmd', type)}`);
    for (const [flag, needs, name] of FLAG_NEEDS) {
      if (flags & flag && !(eflags & needs)) return refused(op, 'EINVAL', `the server does not support the ${name} flag`);
    }
    if (flags & CmdFlag.DF && !this.n.structuredReplies) return refused(op, 'EINVAL', 'DF needs structured replies');
    if (type === Cmd.FLUSH) return undefined;
    if (length === 0) return refused(op, 'EINVAL', 'zero-length request');
    if (offset + length > this.n.size) {
      return refused(op, rule.pastEnd, `range ${offset}+${length} runs past the end of the ${this.n.size}-byte export`);
    }
    const { min, max } = this.n.blockSize;
    if (this.n.blockSizeAdvertised && min > 1 && (offset % min !== 0 || (length % min !== 0 && offset + length !== this.n.size))) {
      return refused(op, 'EINVAL', `range ${offset}+${length} is not aligned to the ${min}-byte minimum block size`);
    }
    if (rule.payload && length > max) return refused(op, 'EINVAL', `${length} bytes exceeds the ${max}-byte maximum payload`);
    return undefined;
  }
}


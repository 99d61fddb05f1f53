import { describe, it, expect } from 'vitest';
import fc from 'fast-check';
import {
  ReplyParser,
  NbdProtocolError,
  encodeRequest,
  encodeOption,
  encodeExportQuery,
  encodeMetaContextQuery,
  encodeClientFlags,
  decodeGreeting,
  decodeOptionReplyHeader,
  decodeInfoReply,
  decodeServerReply,
  decodeMetaContextReply,
  decodeExportNameReply,
  type ReplyEvent,
  type ReadTarget,
} from '../src/protocol/replies.js';
import {
  NBDMAGIC,
  IHAVEOPT,
  OPTION_REPLY_MAGIC,
  REQUEST_MAGIC,
  SIMPLE_REPLY_MAGIC,
  STRUCTURED_REPLY_MAGIC,
  Cmd,
  CmdFlag,
  Opt,
  Rep,
  Info,
  NbdErr,
  ReplyFlag,
  ReplyType,
  State,
  REQUEST_SIZE,
} from '../src/protocol/constants.js';

// Recorded from nbdkit 1.32.5 (`nbdkit -U - memory 1M`) by running blockmirror's
// client and capturing every byte received after the handshake. Requests, one at
// a time, cookies from 1: pwrite 512@4096; pread 64@4104; blockStatus 0+65536
// (SR only); pread 16@1M (past the end: EINVAL); flush; trim 4096@8192;
// zero 4096@0 FAST_ZERO; pwrite 512@1M (ENOSPC).
const RECORDED_SR = Buffer.from(
  '67446698000000000000000000000001668e33ef0001000100000000000000020000004800000000000010083b424950575e656c737a81888f969da4abb2b9c0c7ced5dce3eaf1f8ff060d141b222930373e454c535a61686f767d848b9299a0a7aeb5bcc3cad1d8dfe6edf4668e33ef000100050000000000000003000000140000000100008000000000000000800000000003668e33ef00018001000000000000000400000006000000160000674466980000000000000000000000056744669800000000000000000000000667446698000000000000000000000007674466980000001c0000000000000008',
  'hex',
);
const RECORDED_SR_READS = new Map<number, ReadTarget>([
  [2, { offset: 4104, length: 64 }],
  [4, { offset: 1048576, length: 16 }],
]);
// The same requests (minus blockStatus) against `nbdkit --no-sr`: simple replies, READ data inline.
const RECORDED_SIMPLE = Buffer.from(
  '67446698000000000000000000000001674466980000000000000000000000023b424950575e656c737a81888f969da4abb2b9c0c7ced5dce3eaf1f8ff060d141b222930373e454c535a61686f767d848b9299a0a7aeb5bcc3cad1d8dfe6edf467446698000000160000000000000003674466980000000000000000000000046744669800000000000000000000000567446698000000000000000000000006674466980000001c0000000000000007',
  'hex',
);
const RECORDED_SIMPLE_READS = new Map<number, ReadTarget>([
  [2, { offset: 4104, length: 64 }],
  [3, { offset: 1048576, length: 16 }],
]);
const PATTERN = Buffer.from(Array.from({ length: 512 }, (_, i) => (i * 7 + 3) & 255));

// ---------------------------------------------------------------------------
// Helpers: a server-side encoder for test streams, and event normalisation.

function simple(cookie: bigint, error = 0, data?: Buffer): Buffer {
  const h = Buffer.alloc(16);
  h.writeUInt32BE(SIMPLE_REPLY_MAGIC, 0);
  h.writeUInt32BE(error, 4);
  h.writeBigUInt64BE(cookie, 8);
  return data ? Buffer.concat([h, data]) : h;
}

function chunk(cookie: bigint, type: number, payload: Buffer, done: boolean): Buffer {
  const h = Buffer.alloc(20);
  h.writeUInt32BE(STRUCTURED_REPLY_MAGIC, 0);
  h.writeUInt16BE(done ? ReplyFlag.DONE : 0, 4);
  h.writeUInt16BE(type, 6);
  h.writeBigUInt64BE(cookie, 8);
  h.writeUInt32BE(payload.length, 16);
  return Buffer.concat([h, payload]);
}

const u64 = (n: number | bigint) => {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(BigInt(n));
  return b;
};
const u32 = (n: number) => {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n);
  return b;
};
const u16 = (n: number) => {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(n);
  return b;
};

const offsetData = (cookie: bigint, offset: number, data: Buffer, done = false) =>
  chunk(cookie, ReplyType.OFFSET_DATA, Buffer.concat([u64(offset), data]), done);
const hole = (cookie: bigint, offset: number, size: number, done = false) =>
  chunk(cookie, ReplyType.OFFSET_HOLE, Buffer.concat([u64(offset), u32(size)]), done);
const blockStatus = (cookie: bigint, id: number, extents: Array<[number, number]>, done = false) =>
  chunk(cookie, ReplyType.BLOCK_STATUS, Buffer.concat([u32(id), ...extents.flatMap(([l, f]) => [u32(l), u32(f)])]), done);
const errorChunk = (cookie: bigint, error: number, message: string, offset?: number, done = true) => {
  const m = Buffer.from(message);
  const parts = [u32(error), u16(m.length), m, ...(offset === undefined ? [] : [u64(offset)])];
  return chunk(cookie, offset === undefined ? ReplyType.ERROR : ReplyType.ERROR_OFFSET, Buffer.concat(parts), done);
};
const none = (cookie: bigint) => chunk(cookie, ReplyType.NONE, Buffer.alloc(0), true);

type Plain = Record<string, unknown>;

/**
 * Events as plain data, with data pieces of one chunk merged: how a chunk's
 * payload is split into pieces depends on the socket reads, nothing else may.
 */
function normalise(events: ReplyEvent[]): Plain[] {
  const out: Plain[] = [];
  for (const e of events) {
    if (e.type === 'data') {
      const last = out[out.length - 1];
      if (last?.type === 'data' && last.cookie === e.cookie && (last.offset as number) + (last.hex as string).length / 2 === e.offset) {
        last.hex = (last.hex as string) + e.data.toString('hex');
        continue;
      }
      out.push({ type: 'data', cookie: e.cookie, offset: e.offset, hex: e.data.toString('hex') });
    } else if (e.type === 'unknown') {
      out.push({ ...e, payload: e.payload.toString('hex') });
    } else {
      out.push({ ...e });
    }
  }
  return out;
}

interface ParseResult {
  events: ReplyEvent[];
  error?: unknown;
  idle: boolean;
}

function parse(pieces: Buffer[], reads = new Map<number, ReadTarget>(), structuredReplies = true): ParseResult {
  const events: ReplyEvent[] = [];
  const p = new ReplyParser({ structuredReplies, readTarget: (c) => reads.get(c), onEvent: (e) => events.push(e) });
  try {
    for (const piece of pieces) p.feed(piece);
  } catch (error) {
    return { events, error, idle: p.idle };
  }
  return { events, idle: p.idle };
}

const bytewise = (b: Buffer) => Array.from({ length: b.length }, (_, i) => b.subarray(i, i + 1));

function splitAt(b: Buffer, cuts: number[]): Buffer[] {
  const points = [...new Set(cuts.map((c) => c % (b.length + 1)))].sort((x, y) => x - y);
  const out: Buffer[] = [];
  let prev = 0;
  for (const p of [...points, b.length]) {
    out.push(b.subarray(prev, p));
    prev = p;
  }
  return out; // may contain empty pieces on purpose: feeding nothing must be harmless
}

// ---------------------------------------------------------------------------

describe('ReplyParser on recorded nbdkit streams', () => {
  it('decodes the structured-reply recording into the replies nbdkit sent', () => {
    const { events, error, idle } = parse([RECORDED_SR], RECORDED_SR_READS);
    expect(error).toBeUndefined();
    expect(idle).toBe(true);
    expect(normalise(events)).toEqual([
      { type: 'simple', cookie: 1, error: 0 },
      { type: 'done', cookie: 1 },
      { type: 'chunk', cookie: 2, flags: ReplyFlag.DONE, replyType: ReplyType.OFFSET_DATA, length: 72 },
      { type: 'data', cookie: 2, offset: 4104, hex: PATTERN.subarray(8, 72).toString('hex') },
      { type: 'done', cookie: 2 },
      { type: 'chunk', cookie: 3, flags: ReplyFlag.DONE, replyType: ReplyType.BLOCK_STATUS, length: 20 },
      { type: 'blockStatus', cookie: 3, contextId: 1, extents: [{ length: 32768, flags: 0 }, { length: 32768, flags: State.HOLE | State.ZERO }] },
      { type: 'done', cookie: 3 },
      { type: 'chunk', cookie: 4, flags: ReplyFlag.DONE, replyType: ReplyType.ERROR, length: 6 },
      { type: 'error', cookie: 4, replyType: ReplyType.ERROR, error: NbdErr.EINVAL, message: '' },
      { type: 'done', cookie: 4 },
      ...[5, 6, 7].flatMap((cookie) => [{ type: 'simple', cookie, error: 0 }, { type: 'done', cookie }]),
      { type: 'simple', cookie: 8, error: NbdErr.ENOSPC },
      { type: 'done', cookie: 8 },
    ]);
  });

  it('decodes the simple-reply recording, taking READ data lengths from the requests', () => {
    const { events, error } = parse([RECORDED_SIMPLE], RECORDED_SIMPLE_READS, false);
    expect(error).toBeUndefined();
    expect(normalise(events)).toEqual([
      { type: 'simple', cookie: 1, error: 0 },
      { type: 'done', cookie: 1 },
      { type: 'simple', cookie: 2, error: 0 },
      { type: 'data', cookie: 2, offset: 4104, hex: PATTERN.subarray(8, 72).toString('hex') },
      { type: 'done', cookie: 2 },
      { type: 'simple', cookie: 3, error: NbdErr.EINVAL },
      { type: 'done', cookie: 3 },
      ...[4, 5, 6].flatMap((cookie) => [{ type: 'simple', cookie, error: 0 }, { type: 'done', cookie }]),
      { type: 'simple', cookie: 7, error: NbdErr.ENOSPC },
      { type: 'done', cookie: 7 },
    ]);
  });

  for (const [name, stream, reads, sr] of [
    ['structured', RECORDED_SR, RECORDED_SR_READS, true],
    ['simple', RECORDED_SIMPLE, RECORDED_SIMPLE_READS, false],
  ] as const) {
    it(`yields identical events for the ${name} recording fed one byte at a time`, () => {
      const whole = parse([stream], reads, sr);
      const bytes = parse(bytewise(stream), reads, sr);
      expect(bytes.error).toBeUndefined();
      expect(normalise(bytes.events)).toEqual(normalise(whole.events));
      // Not vacuous: one byte at a time really did split the read payload.
      expect(bytes.events.filter((e) => e.type === 'data').length).toBe(64);
    });

    it(`yields identical events for the ${name} recording in random splits`, () => {
      const expected = normalise(parse([stream], reads, sr).events);
      fc.assert(
        fc.property(fc.array(fc.nat(), { maxLength: 40 }), (cuts) => {
          const r = parse(splitAt(stream, cuts), reads, sr);
          expect(r.error).toBeUndefined();
          expect(normalise(r.events)).toEqual(expected);
        }),
        { numRuns: 300 },
      );
    });
  }
});

// A model of a reply stream: the events are derived from the model, not from the parser.
type Reply =
  | { kind: 'simple'; cookie: bigint; error: number; read?: { offset: number; data: Buffer } }
  | { kind: 'data'; cookie: bigint; offset: number; data: Buffer; done: boolean }
  | { kind: 'hole'; cookie: bigint; offset: number; size: number; done: boolean }
  | { kind: 'status'; cookie: bigint; id: number; extents: Array<[number, number]>; done: boolean }
  | { kind: 'error'; cookie: bigint; error: number; message: string; offset?: number; done: boolean }
  | { kind: 'none'; cookie: bigint };

const cookieArb = fc.bigInt({ min: 0n, max: (1n << 64n) - 1n });
const offsetArb = fc.integer({ min: 0, max: Number.MAX_SAFE_INTEGER - 70000 });
const replyArb: fc.Arbitrary<Reply> = fc.oneof(
  fc.record({ kind: fc.constant('simple' as const), cookie: cookieArb, error: fc.constantFrom(0, NbdErr.EIO, NbdErr.EINVAL) }),
  fc.record({ kind: fc.constant('simple' as const), cookie: cookieArb, error: fc.constant(0), read: fc.record({ offset: offsetArb, data: fc.uint8Array({ minLength: 1, maxLength: 300 }).map((a) => Buffer.from(a)) }) }),
  fc.record({ kind: fc.constant('data' as const), cookie: cookieArb, offset: offsetArb, data: fc.uint8Array({ minLength: 1, maxLength: 300 }).map((a) => Buffer.from(a)), done: fc.boolean() }),
  fc.record({ kind: fc.constant('hole' as const), cookie: cookieArb, offset: offsetArb, size: fc.integer({ min: 1, max: 2 ** 32 - 1 }), done: fc.boolean() }),
  fc.record({ kind: fc.constant('status' as const), cookie: cookieArb, id: fc.nat(), extents: fc.array(fc.tuple(fc.integer({ min: 1, max: 2 ** 32 - 1 }), fc.nat({ max: 3 })), { minLength: 1, maxLength: 20 }), done: fc.boolean() }),
  fc.record({ kind: fc.constant('error' as const), cookie: cookieArb, error: fc.integer({ min: 1, max: 2 ** 32 - 1 }), message: fc.string({ maxLength: 40 }), offset: fc.option(offsetArb, { nil: undefined }), done: fc.boolean() }),
  fc.record({ kind: fc.constant('none' as const), cookie: cookieArb }),
);

function encode(r: Reply): Buffer {
  switch (r.kind) {
    case 'simple':
      return simple(r.cookie, r.error, r.read?.data);
    case 'data':
      return offsetData(r.cookie, r.offset, r.data, r.done);
    case 'hole':
      return hole(r.cookie, r.offset, r.size, r.done);
    case 'status':
      return blockStatus(r.cookie, r.id, r.extents, r.done);
    case 'error':
      return errorChunk(r.cookie, r.error, r.message, r.offset, r.done);
    case 'none':
      return none(r.cookie);
  }
}

function expected(r: Reply): Plain[] {
  // The parser reports cookies as numbers: exact below 2^53, rounded above (replies.ts readCookie).
  const cookie = Number(r.cookie);
  const done = [{ type: 'done', cookie }];
  const header = (replyType: number, length: number, isDone: boolean) => ({ type: 'chunk', cookie, flags: isDone ? ReplyFlag.DONE : 0, replyType, length });
  switch (r.kind) {
    case 'simple':
      return [{ type: 'simple', cookie, error: r.error }, ...(r.read ? [{ type: 'data', cookie, offset: r.read.offset, hex: r.read.data.toString('hex') }] : []), ...done];
    case 'data':
      return [header(ReplyType.OFFSET_DATA, 8 + r.data.length, r.done), { type: 'data', cookie, offset: r.offset, hex: r.data.toString('hex') }, ...(r.done ? done : [])];
    case 'hole':
      return [header(ReplyType.OFFSET_HOLE, 12, r.done), { type: 'hole', cookie, offset: r.offset, length: r.size }, ...(r.done ? done : [])];
    case 'status':
      return [
        header(ReplyType.BLOCK_STATUS, 4 + 8 * r.extents.length, r.done),
        { type: 'blockStatus', cookie, contextId: r.id, extents: r.extents.map(([length, flags]) => ({ length, flags })) },
        ...(r.done ? done : []),
      ];
    case 'error': {
      const m = Buffer.byteLength(r.message);
      const base = { type: 'error', cookie, error: r.error, message: r.message };
      return r.offset === undefined
        ? [header(ReplyType.ERROR, 6 + m, r.done), { ...base, replyType: ReplyType.ERROR }, ...(r.done ? done : [])]
        : [header(ReplyType.ERROR_OFFSET, 14 + m, r.done), { ...base, replyType: ReplyType.ERROR_OFFSET, offset: r.offset }, ...(r.done ? done : [])];
    }
    case 'none':
      return [header(ReplyType.NONE, 0, true), ...done];
  }
}

describe('ReplyParser on generated streams', () => {
  it('decodes any mix of simple replies and interleaved chunks, however the bytes are split', () => {
    fc.assert(
      fc.property(fc.array(replyArb, { minLength: 1, maxLength: 25 }), fc.array(fc.nat(), { maxLength: 30 }), (replies, cuts) => {
        // Cookies of simple READ replies must be unique for the read-target lookup.
        const reads = new Map<number, ReadTarget>();
        const kept = replies.filter((r) => {
          if (r.kind !== 'simple' || !r.read) return true;
          if (reads.has(Number(r.cookie))) return false;
          reads.set(Number(r.cookie), { offset: r.read.offset, length: r.read.data.length });
          return true;
        });
        // Non-read simple replies must not share a cookie with a simple READ (the lookup would expect data).
        const model = kept.filter((r) => !(r.kind === 'simple' && !r.read && reads.has(Number(r.cookie))));
        const stream = Buffer.concat(model.map(encode));
        const r = parse(splitAt(stream, cuts), reads);
        expect(r.error).toBeUndefined();
        expect(r.idle).toBe(true);
        expect(normalise(r.events)).toEqual(model.flatMap(expected));
      }),
      { numRuns: 300 },
    );
  });

  it('hands OFFSET_DATA payloads on as views of the fed chunk, copying nothing', () => {
    const payload = Buffer.alloc(4096, 0xab);
    const stream = offsetData(9n, 512, payload, true);
    const events: ReplyEvent[] = [];
    const p = new ReplyParser({ structuredReplies: true, readTarget: () => undefined, onEvent: (e) => events.push(e) });
    p.feed(stream);
    const data = events.find((e) => e.type === 'data');
    expect(data?.type === 'data' && data.data.buffer).toBe(stream.buffer);
    expect(data?.type === 'data' && data.data.byteOffset).toBe(stream.byteOffset + 28);
  });

  it('keeps a large BLOCK_STATUS chunk intact when it arrives in many pieces', () => {
    const extents = Array.from({ length: 5000 }, (_, i): [number, number] => [4096 * (i + 1), i % 4]);
    const stream = blockStatus(3n, 7, extents, true);
    const r = parse(splitAt(stream, Array.from({ length: 50 }, (_, i) => i * 811 + 3)));
    const bs = r.events.find((e) => e.type === 'blockStatus');
    expect(bs?.type === 'blockStatus' && bs.extents.length).toBe(5000);
    expect(bs?.type === 'blockStatus' && bs.extents[4999]).toEqual({ length: 4096 * 5000, flags: 3 });
  });
});

describe('ReplyParser on broken streams', () => {
  const cases: Array<[string, Buffer, RegExp, boolean?]> = [
    ['a bad reply magic', Buffer.from('1234567800000000000000000000000000', 'hex'), /bad reply magic 0x12345678/],
    ['a structured chunk when structured replies were not negotiated', none(1n), /not negotiated/, false],
    ['a NONE chunk without the DONE flag', chunk(1n, ReplyType.NONE, Buffer.alloc(0), false), /lacks the DONE flag/],
    ['a NONE chunk with a payload', chunk(1n, ReplyType.NONE, Buffer.alloc(4), true), /has a payload/],
    ['an OFFSET_DATA chunk with no data', chunk(1n, ReplyType.OFFSET_DATA, u64(0), true), /too short/],
    ['an OFFSET_HOLE chunk of 11 bytes', chunk(1n, ReplyType.OFFSET_HOLE, Buffer.alloc(11), true), /not 12 bytes/],
    ['an OFFSET_HOLE of size 0', hole(1n, 0, 0, true), /size 0/],
    ['a BLOCK_STATUS chunk without extents', chunk(1n, ReplyType.BLOCK_STATUS, u32(1), true), /4 \+ 8n/],
    ['a BLOCK_STATUS chunk of 4 + 8n + 3 bytes', chunk(1n, ReplyType.BLOCK_STATUS, Buffer.alloc(15), true), /4 \+ 8n/],
    ['an ERROR chunk with error 0', errorChunk(1n, 0, 'x'), /error 0/],
    ['an ERROR chunk whose message overruns it', chunk(1n, ReplyType.ERROR, Buffer.concat([u32(5), u16(10), Buffer.from('abc')]), true), /does not fit/],
    ['an ERROR_OFFSET chunk too short for its offset', chunk(1n, ReplyType.ERROR_OFFSET, Buffer.concat([u32(5), u16(0), u32(0)]), true), /too short/],
    ['an offset beyond 2^53', offsetData(1n, 0, Buffer.from('x'), true).fill(0xff, 20, 24), /beyond 2\^53/],
  ];

  for (const [what, stream, message, sr] of cases) {
    it(`fails with NbdProtocolError on ${what}, whether fed whole or byte by byte`, () => {
      for (const pieces of [[stream], bytewise(stream)]) {
        const r = parse(pieces, undefined, sr ?? true);
        expect(r.error).toBeInstanceOf(NbdProtocolError);
        expect((r.error as NbdProtocolError).code).toBe('EPROTO');
        expect((r.error as Error).message).toMatch(message);
      }
    });
  }

  it('refuses all input after a failure', () => {
    const p = new ReplyParser({ structuredReplies: true, readTarget: () => undefined, onEvent: () => undefined });
    expect(() => p.feed(Buffer.alloc(16))).toThrow(NbdProtocolError);
    expect(() => p.feed(simple(1n))).toThrow(/bad reply magic/);
  });

  it('passes unknown non-error chunks on whole, and decodes unknown error chunks as ERROR', () => {
    const unknownType = 77;
    const unknownError = (1 << 15) + 99;
    const stream = Buffer.concat([
      chunk(1n, unknownType, Buffer.from('hello'), false),
      chunk(1n, unknownError, Buffer.concat([u32(NbdErr.EIO), u16(2), Buffer.from('no')]), true),
    ]);
    expect(normalise(parse(bytewise(stream)).events)).toEqual([
      { type: 'chunk', cookie: 1, flags: 0, replyType: unknownType, length: 5 },
      { type: 'unknown', cookie: 1, replyType: unknownType, payload: Buffer.from('hello').toString('hex') },
      { type: 'chunk', cookie: 1, flags: ReplyFlag.DONE, replyType: unknownError, length: 8 },
      { type: 'error', cookie: 1, replyType: unknownError, error: NbdErr.EIO, message: 'no' },
      { type: 'done', cookie: 1 },
    ]);
  });

  it('reports a reply cut short as not idle', () => {
    const stream = offsetData(1n, 0, Buffer.alloc(100), true);
    expect(parse([stream.subarray(0, 50)]).idle).toBe(false);
    expect(parse([stream.subarray(0, 10)]).idle).toBe(false);
    expect(parse([stream]).idle).toBe(true);
  });
});

describe('request and option encoders', () => {
  it('lays out a request header as magic, flags, type, cookie, offset, length', () => {
    const offset = 2 ** 40 + 12345;
    const cookie = 0xfedcba9876543210n;
    const b = encodeRequest({ flags: CmdFlag.FUA | CmdFlag.NO_HOLE, type: Cmd.WRITE_ZEROES, cookie, offset, length: 0xfffffffe });
    expect(b.length).toBe(REQUEST_SIZE);
    expect(b.readUInt32BE(0)).toBe(REQUEST_MAGIC);
    expect(b.readUInt16BE(4)).toBe(CmdFlag.FUA | CmdFlag.NO_HOLE);
    expect(b.readUInt16BE(6)).toBe(Cmd.WRITE_ZEROES);
    expect(b.readBigUInt64BE(8)).toBe(cookie);
    expect(b.readBigUInt64BE(16)).toBe(BigInt(offset));
    expect(b.readUInt32BE(24)).toBe(0xfffffffe);
  });

  it('frames an option with IHAVEOPT and its length', () => {
    const b = encodeOption(Opt.GO, Buffer.from('abc'));
    expect(b.readBigUInt64BE(0)).toBe(IHAVEOPT);
    expect(b.readUInt32BE(8)).toBe(Opt.GO);
    expect(b.readUInt32BE(12)).toBe(3);
    expect(b.subarray(16).toString()).toBe('abc');
    expect(encodeClientFlags(3).toString('hex')).toBe('00000003');
  });

  it('encodes GO data as name length, name, info count and info types', () => {
    const b = encodeExportQuery('disk', [Info.BLOCK_SIZE, Info.DESCRIPTION]);
    expect(b.toString('hex')).toBe('00000004' + Buffer.from('disk').toString('hex') + '0002' + '0003' + '0002');
  });

  it('encodes meta context queries as export name then counted, length-prefixed queries', () => {
    const b = encodeMetaContextQuery('', ['base:allocation', 'qemu:']);
    expect(b.toString('hex')).toBe(
      '00000000' + '00000002' + '0000000f' + Buffer.from('base:allocation').toString('hex') + '00000005' + Buffer.from('qemu:').toString('hex'),
    );
  });

  it('refuses names longer than 4096 bytes', () => {
    expect(() => encodeExportQuery('x'.repeat(4097), [])).toThrow(RangeError);
  });
});

describe('option reply decoders', () => {
  it('reads the newstyle greeting and rejects other servers and the oldstyle handshake', () => {
    const g = Buffer.alloc(18);
    g.writeBigUInt64BE(NBDMAGIC, 0);
    g.writeBigUInt64BE(IHAVEOPT, 8);
    g.writeUInt16BE(3, 16);
    expect(decodeGreeting(g)).toEqual({ handshakeFlags: 3 });
    const old = Buffer.from(g);
    old.writeBigUInt64BE(0x00420281861253n, 8);
    expect(() => decodeGreeting(old)).toThrow(/oldstyle/);
    expect(() => decodeGreeting(Buffer.from('HTTP/1.1 400 Bad Request'))).toThrow(/not an NBD server/);
  });

  it('reads option reply headers and refuses a bad magic', () => {
    const h = Buffer.alloc(20);
    h.writeBigUInt64BE(OPTION_REPLY_MAGIC, 0);
    h.writeUInt32BE(Opt.LIST, 8);
    h.writeUInt32BE(Rep.ERR_POLICY, 12);
    h.writeUInt32BE(7, 16);
    expect(decodeOptionReplyHeader(h)).toEqual({ option: Opt.LIST, reply: Rep.ERR_POLICY, length: 7 });
    h[0] ^= 1;
    expect(() => decodeOptionReplyHeader(h)).toThrow(NbdProtocolError);
  });

  it('decodes INFO_EXPORT, INFO_BLOCK_SIZE, INFO_DESCRIPTION and ignores unknown infos', () => {
    expect(decodeInfoReply(Buffer.concat([u16(Info.EXPORT), u64(2 ** 45), u16(0x0ded)]))).toEqual({ info: 'export', size: 2 ** 45, flags: 0x0ded });
    expect(decodeInfoReply(Buffer.concat([u16(Info.BLOCK_SIZE), u32(512), u32(4096), u32(1 << 20)]))).toEqual({
      info: 'blockSize',
      blockSize: { min: 512, preferred: 4096, max: 1 << 20 },
    });
    expect(decodeInfoReply(Buffer.concat([u16(Info.DESCRIPTION), Buffer.from('a disk')]))).toEqual({ info: 'description', description: 'a disk' });
    expect(decodeInfoReply(Buffer.concat([u16(42), Buffer.from('??')]))).toEqual({ info: 'unknown', type: 42 });
    expect(() => decodeInfoReply(Buffer.concat([u16(Info.EXPORT), u64(1)]))).toThrow(/expected 12/);
  });

  it('decodes LIST, META_CONTEXT and EXPORT_NAME replies', () => {
    expect(decodeServerReply(Buffer.concat([u32(4), Buffer.from('diskThe disk')]))).toEqual({ name: 'disk', description: 'The disk' });
    expect(() => decodeServerReply(Buffer.concat([u32(40), Buffer.from('disk')]))).toThrow(/overruns/);
    expect(decodeMetaContextReply(Buffer.concat([u32(7), Buffer.from('base:allocation')]))).toEqual({ id: 7, name: 'base:allocation' });
    expect(decodeExportNameReply(Buffer.concat([u64(64 << 20), u16(0x43)]))).toEqual({ size: 64 << 20, flags: 0x43 });
  });
});

describe('ReplyParser with a reader that places data itself (skipData)', () => {
  it('moves past the bytes the reader placed, reports the rest as data, and ends the reply when its payload is complete', () => {
    const events: ReplyEvent[] = [];
    const p = new ReplyParser({ structuredReplies: true, readTarget: () => undefined, onEvent: (e) => events.push(e) });
    const data = Buffer.from('abcdefghij');
    const stream = offsetData(9n, 1000, data, true);
    // Header and offset (28 bytes) and the first 2 data bytes arrive; the reader places 5; the last 3 arrive.
    p.feed(stream.subarray(0, 30));
    expect(p.dataRemaining).toBe(8);
    expect(p.dataCursor).toBe(1002);
    p.skipData(5);
    expect(p.dataRemaining).toBe(3);
    expect(p.dataCursor).toBe(1007);
    expect(events.some((e) => e.type === 'done')).toBe(false);
    p.feed(stream.subarray(35));
    expect(events.map((e) => (e.type === 'data' ? `data ${e.offset} ${e.data.toString()}` : e.type))).toEqual(['chunk', 'data 1000 ab', 'data 1007 hij', 'done']);
    expect(p.dataRemaining).toBe(0);
    expect(p.idle).toBe(true);
  });

  it('ends a simple READ reply whose data the reader placed entirely', () => {
    const events: ReplyEvent[] = [];
    const p = new ReplyParser({ structuredReplies: false, readTarget: (c) => (c === 4 ? { offset: 4096, length: 65536 } : undefined), onEvent: (e) => events.push(e) });
    p.feed(simple(4n));
    expect(p.dataRemaining).toBe(65536);
    p.skipData(65536);
    expect(events.map((e) => e.type)).toEqual(['simple', 'done']);
    expect(p.idle).toBe(true);
  });

  it('refuses to skip outside a data payload or past its end, and then refuses all input', () => {
    const p = new ReplyParser({ structuredReplies: true, readTarget: () => undefined, onEvent: () => undefined });
    expect(() => p.skipData(1)).toThrow(/outside a data payload \(0 bytes left\)/);
    expect(() => p.feed(simple(1n))).toThrow(NbdProtocolError);
    const q = new ReplyParser({ structuredReplies: true, readTarget: () => undefined, onEvent: () => undefined });
    q.feed(offsetData(2n, 0, Buffer.alloc(10), true).subarray(0, 28));
    expect(() => q.skipData(11)).toThrow(/10 bytes left/);
  });
});

// The replication control channel's messages (docs/replication.md), as one versioned, typed
// union checked with zod at the edge: a frame that does not parse into one of these is a bad
// frame, and never reaches the pair code.
//
//   frame                              direction          answered by
//   {t:"hello", v, from, to}           dialer -> acceptor  {t:"welcome", v, from, to}
//   {t:"req", id, op, ...request(op)}  either way          {t:"res", id, ok:true, ...response(op)}
//                                                          or {t:"res", id, ok:false, error}
//   {t:"ping"}                         either way          nothing (any frame refreshes liveness)
//   {t:"data", v, from, to, export}    opens a data conn.  the NBD greeting: the connection carries
//                                                          NBD for that one export from then on
//
// With mutual TLS, `from` must be the identity of the certificate (CN=ssN): a message field never
// says who is speaking on its own.
//
//   op        request fields                              response fields
//   attach    pair, epoch, master, vol                    token, blank, dirty | demote, epoch, master
//   snapshot  pair, state, bits (base64), clearDirty      -
//   bits      pair, ops: [["i", first, last] | ["v", c]]  -
//   state     pair, state                                 -
//   resync    pair                                        dirty (base64)
//   hashes    pair, first, count                          hashes (hex SHA-1 per cluster)
//   swap      pair, epoch                                 -
import * as z from 'zod';

/** Bumped when a frame changes shape; a peer speaking another version is refused at hello. */
export const PROTOCOL_VERSION = 2;

const id = z.number().int().positive();
const count = z.number().int().nonnegative();
const pair = z.string().min(1).max(64);
const state = z.enum(['COPY', 'PAIR', 'PSUS', 'PSUE']);
const base64 = z.string().max(96 * 1024 * 1024);

export const Requests = {
  attach: z.strictObject({ pair, epoch: id, master: id, vol: id }),
  snapshot: z.strictObject({ pair, state, bits: base64, clearDirty: z.boolean() }),
  bits: z.strictObject({ pair, ops: z.array(z.union([z.tuple([z.literal('i'), count, count]), z.tuple([z.literal('v'), count])])).max(1 << 22) }),
  state: z.strictObject({ pair, state }),
  resync: z.strictObject({ pair }),
  hashes: z.strictObject({ pair, first: count, count: id.max(1 << 16) }),
  swap: z.strictObject({ pair, epoch: id }),
} as const;

export const Responses = {
  attach: z.union([
    z.strictObject({ demote: z.literal(true), epoch: id, master: id }),
    z.strictObject({ token: z.string().regex(/^[0-9a-f]{32}$/), blank: z.boolean(), dirty: base64 }),
  ]),
  snapshot: z.strictObject({}),
  bits: z.strictObject({}),
  state: z.strictObject({}),
  resync: z.strictObject({ dirty: base64 }),
  hashes: z.strictObject({ hashes: z.array(z.string().regex(/^[0-9a-f]{40}$/)) }),
  swap: z.strictObject({}),
} as const;

export type Op = keyof typeof Requests;
export const OPS = Object.keys(Requests) as Op[];
export type RequestOf<K extends Op> = z.infer<(typeof Requests)[K]>;
export type ResponseOf<K extends Op> = z.infer<(typeof Responses)[K]>;
export type BitOp = RequestOf<'bits'>['ops'][number];

const Hello = z.strictObject({ t: z.literal('hello'), v: z.number().int(), from: id, to: id });
const Welcome = z.strictObject({ t: z.literal('welcome'), v: z.number().int(), from: id, to: id });
const Ping = z.strictObject({ t: z.literal('ping') });
const Data = z.strictObject({ t: z.literal('data'), v: z.number().int(), from: id, to: id, export: z.string().min(1).max(256) });
const ReqFrame = z.looseObject({ t: z.literal('req'), id, op: z.enum(OPS as [Op, ...Op[]]) });
const ResFrame = z.looseObject({ t: z.literal('res'), id, ok: z.boolean(), error: z.string().max(4096).optional() });

export type Hello = z.infer<typeof Hello>;
export type Welcome = z.infer<typeof Welcome>;
export type DataOpen = z.infer<typeof Data>;
export type Frame =
  | Hello
  | DataOpen
  | Welcome
  | z.infer<typeof Ping>
  | { t: 'req'; id: number; op: Op; body: unknown }
  | { t: 'res'; id: number; ok: boolean; error?: string; body: Record<string, unknown> };

/** A frame that is not one of ours: the reason is logged and the connection closed. */
export class BadFrame extends Error {
  override readonly name = 'BadFrame';
}

function issues(e: z.ZodError): string {
  return e.issues
    .slice(0, 3)
    .map((i) => `${i.path.join('.') || 'frame'}: ${i.message}`)
    .join('; ');
}

/** JSON text of one frame -> a typed frame (request bodies are checked later, per op). */
export function parseFrame(text: string): Frame {
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch {
    throw new BadFrame('a frame that is not JSON');
  }
  if (typeof json !== 'object' || json === null || Array.isArray(json)) throw new BadFrame('a frame that is not a JSON object');
  const t = (json as { t?: unknown }).t;
  const check = <T>(schema: z.ZodType<T>): T => {
    const r = schema.safeParse(json);
    if (!r.success) throw new BadFrame(`a malformed ${String(t)} frame (${issues(r.error)})`);
    return r.data;
  };
  switch (t) {
    case 'hello':
      return check(Hello);
    case 'welcome':
      return check(Welcome);
    case 'ping':
      return check(Ping);
    case 'data':
      return check(Data);
    case 'req': {
      const { t: _t, id: rid, op, ...body } = check(ReqFrame);
      return { t: 'req', id: rid, op, body };
    }
    case 'res': {
      const { t: _t, id: rid, ok, error, ...body } = check(ResFrame);
      return { t: 'res', id: rid, ok, ...(error !== undefined ? { error } : {}), body };
    }
    default:
      throw new BadFrame(`a frame of unknown type ${JSON.stringify(t)?.slice(0, 40)}`);
  }
}

export function parseRequest<K extends Op>(op: K, body: unknown): RequestOf<K> {
  const r = Requests[op].safeParse(body);
  if (!r.success) throw new BadFrame(`a malformed ${op} request (${issues(r.error)})`);
  return r.data as RequestOf<K>;
}

export function parseResponse<K extends Op>(op: K, body: unknown): ResponseOf<K> {
  const r = Responses[op].safeParse(body);
  if (!r.success) throw new BadFrame(`a malformed answer to ${op} (${issues(r.error)})`);
  return r.data as ResponseOf<K>;
}

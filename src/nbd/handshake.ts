// Newstyle negotiation, server side. One function per option; each either
// answers and continues, or ends the handshake by entering transmission
// (GO, EXPORT_NAME) or closing (ABORT, protocol violations).
//
//   greeting ──► client flags ──► option loop ──► GO / EXPORT_NAME ──► transmission
//                    │                │
//                    └─ unknown bits  └─ bad magic, ABORT, unknown EXPORT_NAME ──► close
//
// STARTTLS (tls.ts) swaps the socket under the option loop and forgets what was negotiated in the
// clear. With `tls: require`, every option but STARTTLS and ABORT before it gets ERR_TLS_REQD.
// An export's allow list (util/allow-list.ts) is checked against the client's address and TLS
// identity: a refused client gets ERR_POLICY, and LIST leaves the export out.
import type { Socket } from 'node:net';
import type { Logger } from 'pino';
import {
  BASE_ALLOCATION,
  ClientFlag,
  CmdFlag,
  HandshakeFlag,
  IHAVEOPT,
  Info,
  MAX_OPTION_LENGTH,
  MAX_PAYLOAD,
  MIN_BLOCK,
  OPTION_HEADER_SIZE,
  Opt,
  PREFERRED_BLOCK,
  Rep,
  TransmissionFlag as TF,
  nameOf,
} from '../protocol/constants.js';
import {
  OptionFormatError,
  decodeInfoRequest,
  decodeMetaContextRequest,
  encodeExportNameReply,
  encodeGreeting,
  encodeInfoBlockSize,
  encodeInfoExport,
  encodeInfoString,
  encodeMetaContext,
  encodeOptionReply,
  encodeServerEntry,
  encodeString,
} from '../protocol/server-codec.js';
import type { ByteQueue } from '../protocol/byte-queue.js';
import type { Export, ExportTable } from './exports.js';
import { SocketReader } from './socket-reader.js';
import type { TlsServer } from './tls.js';

/** Context id we hand out for base:allocation (the only context we serve). */
export const BASE_ALLOCATION_ID = 1;

export interface Negotiated {
  export: Export;
  transmissionFlags: number;
  structuredReplies: boolean;
  /** base:allocation selected for this export (BLOCK_STATUS allowed). */
  baseAllocation: boolean;
  /** Bytes received after the handshake: the start of the transmission stream. */
  leftover: ByteQueue;
  /** The socket transmission runs on: the accepted one, or the TLS socket STARTTLS made. */
  socket: Socket;
  /** The client's TLS identity (PSK identity or certificate CN), '' without one. */
  identity: string;
}

export class HandshakeAbort extends Error {
  override readonly name = 'HandshakeAbort';
}

export interface HandshakeOptions {
  exports: ExportTable;
  log: Logger;
  /** When true, options other than ABORT get ERR_SHUTDOWN. */
  shuttingDown: () => boolean;
  /** STARTTLS: absent means TLS is off (STARTTLS gets ERR_POLICY). */
  tls?: TlsServer;
  /** Who the client already is, when the transport proved it (a peer storage system: "ss2"). */
  identity?: string;
  /** A client was refused an export by its allow list (the server logs it). */
  refused?: (exportName: string, identity: string) => void;
}

/** Transmission flags of an export for a connection; INFO and GO must agree, so this is the one source. */
export function transmissionFlags(e: Export, structuredReplies: boolean): number {
  let f = TF.HAS_FLAGS | TF.SEND_FLUSH | TF.SEND_CACHE;
  const dev = e.device;
  if (e.readOnly || dev.readOnly) f |= TF.READ_ONLY;
  else {
    f |= TF.SEND_FUA | TF.SEND_TRIM | TF.SEND_WRITE_ZEROES;
    if (dev.fastZero) f |= TF.SEND_FAST_ZERO;
  }
  if (structuredReplies) f |= TF.SEND_DF;
  if (dev.multiConnSafe) f |= TF.CAN_MULTI_CONN;
  return f;
}

/** Command flags valid for a connection, derived from what it advertised. */
export function allowedFlags(flags: number): number {
  let a = CmdFlag.NO_HOLE | CmdFlag.REQ_ONE;
  if (flags & TF.SEND_FUA) a |= CmdFlag.FUA;
  if (flags & TF.SEND_DF) a |= CmdFlag.DF;
  if (flags & TF.SEND_FAST_ZERO) a |= CmdFlag.FAST_ZERO;
  return a;
}

export async function negotiate(accepted: Socket, opts: HandshakeOptions): Promise<Negotiated | null> {
  let socket = accepted;
  let reader = new SocketReader(socket);
  const send = (b: Buffer) => socket.write(b);
  const reply = (option: number, type: number, data?: Buffer) => send(encodeOptionReply(option, type, data));
  const log = opts.log;
  const address = accepted.remoteAddress ?? '';
  const tlsRequired = opts.tls?.policy.mode === 'require';
  let identity = opts.identity ?? '';
  let secure = false;

  send(encodeGreeting(HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES));
  const clientFlags = (await reader.read(4)).readUInt32BE(0);
  if (clientFlags & ~(ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES)) {
    throw new HandshakeAbort(`unknown client flags 0x${clientFlags.toString(16)}`);
  }
  const noZeroes = (clientFlags & ClientFlag.C_NO_ZEROES) !== 0;

  let sr = false;
  // The meta context selection: which export it was made for, and whether base:allocation is in it.
  let selection: { exportName: string; base: boolean } | null = null;
  /** The export by name, if this client may use it: undefined when unknown, 'refused' when its allow list says no. */
  const lookup = (name: string): Export | 'refused' | undefined => {
    const e = opts.exports.get(name);
    if (!e || !e.allow || e.allow.allows(identity, address)) return e;
    opts.refused?.(e.name, identity);
    return 'refused';
  };
  /** The reply to an unknown name lists the exports this client could use, and no others. */
  const unknown = (name: string) => opts.exports.unknownExportMessage(name, (e) => !e.allow || e.allow.allows(identity, address));

  for (;;) {
    const h = await reader.read(OPTION_HEADER_SIZE);
    if (h.readBigUInt64BE(0) !== IHAVEOPT) throw new HandshakeAbort('bad option magic');
    const option = h.readUInt32BE(8);
    const length = h.readUInt32BE(12);
    log.debug({ option: nameOf('opt', option), length }, 'option');

    if (length > MAX_OPTION_LENGTH) {
      if (option === Opt.EXPORT_NAME) throw new HandshakeAbort('EXPORT_NAME longer than any export name');
      // Drain without buffering, so the option stream stays in sync.
      await reader.skip(length);
      reply(option, isKnown(option) ? Rep.ERR_TOO_BIG : Rep.ERR_UNSUP);
      continue;
    }
    const data = await reader.read(length);

    if (opts.shuttingDown() && option !== Opt.ABORT) {
      if (option === Opt.EXPORT_NAME) throw new HandshakeAbort('server is shutting down');
      reply(option, Rep.ERR_SHUTDOWN);
      continue;
    }
    if (tlsRequired && !secure && option !== Opt.STARTTLS && option !== Opt.ABORT) {
      if (option === Opt.EXPORT_NAME) throw new HandshakeAbort('EXPORT_NAME before STARTTLS on a server that requires TLS');
      reply(option, Rep.ERR_TLS_REQD, Buffer.from('this server requires TLS: connect with nbds:// (or --tls)'));
      continue;
    }

    switch (option) {
      case Opt.EXPORT_NAME: {
        const e = lookup(data.toString('utf8'));
        // EXPORT_NAME has no error reply: the protocol's only answer is to close. The log says why.
        if (!e) throw new HandshakeAbort(`EXPORT_NAME: ${unknown(data.toString('utf8'))}`);
        if (e === 'refused') throw new HandshakeAbort(`EXPORT_NAME for ${JSON.stringify(data.toString('utf8'))}, which this client may not use`);
        const flags = transmissionFlags(e, sr);
        send(encodeExportNameReply(e.device.size, flags, noZeroes));
        return done(e, flags);
      }
      case Opt.ABORT:
        reply(option, Rep.ACK);
        socket.end();
        return null;
      case Opt.LIST:
        if (length !== 0) {
          reply(option, Rep.ERR_INVALID);
          break;
        }
        for (const e of opts.exports.list()) {
          if (!e.allow || e.allow.allows(identity, address)) reply(option, Rep.SERVER, encodeServerEntry(e.name, e.description));
        }
        reply(option, Rep.ACK);
        break;
      case Opt.STARTTLS: {
        if (length !== 0 || secure) {
          reply(option, Rep.ERR_INVALID);
          break;
        }
        if (!opts.tls || opts.tls.policy.mode === 'off') {
          reply(option, Rep.ERR_POLICY, Buffer.from('TLS is not configured on this server'));
          break;
        }
        // Nothing may follow STARTTLS in the clear: bytes already queued would be a protocol violation.
        const early = reader.detach();
        if (early.length > 0) throw new HandshakeAbort('data after STARTTLS before the TLS handshake');
        reply(option, Rep.ACK);
        const up = await opts.tls.upgrade(socket);
        socket = up.socket;
        identity = up.identity;
        secure = true;
        reader = new SocketReader(socket);
        // What was negotiated in the clear is forgotten (the NBD spec's STARTTLS rules).
        sr = false;
        selection = null;
        log.debug({ identity }, 'TLS established');
        break;
      }
      case Opt.STRUCTURED_REPLY:
        if (length !== 0) {
          reply(option, Rep.ERR_INVALID);
          break;
        }
        sr = true;
        reply(option, Rep.ACK);
        break;
      case Opt.INFO:
      case Opt.GO: {
        let req;
        try {
          req = decodeInfoRequest(data);
        } catch (err) {
          if (!(err instanceof OptionFormatError)) throw err;
          reply(option, Rep.ERR_INVALID);
          break;
        }
        const e = lookup(req.name);
        if (!e) {
          reply(option, Rep.ERR_UNKNOWN, encodeString(unknown(req.name)));
          break;
        }
        if (e === 'refused') {
          reply(option, Rep.ERR_POLICY, Buffer.from(`access to export ${req.name} is not allowed for this client`));
          break;
        }
        const flags = transmissionFlags(e, sr);
        reply(option, Rep.INFO, encodeInfoExport(e.device.size, flags));
        if (req.requests.includes(Info.NAME)) reply(option, Rep.INFO, encodeInfoString(Info.NAME, e.name));
        if (req.requests.includes(Info.DESCRIPTION) && e.description) {
          reply(option, Rep.INFO, encodeInfoString(Info.DESCRIPTION, e.description));
        }
        // Always sent: our limits are the protocol defaults, and saying so costs nothing.
        reply(option, Rep.INFO, encodeInfoBlockSize(MIN_BLOCK, PREFERRED_BLOCK, MAX_PAYLOAD));
        reply(option, Rep.ACK);
        if (option === Opt.GO) return done(e, flags);
        break;
      }
      case Opt.LIST_META_CONTEXT:
      case Opt.SET_META_CONTEXT: {
        const isSet = option === Opt.SET_META_CONTEXT;
        if (isSet) selection = null; // replaced even on failure
        if (!sr) {
          reply(option, Rep.ERR_INVALID);
          break;
        }
        let req;
        try {
          req = decodeMetaContextRequest(data);
        } catch (err) {
          if (!(err instanceof OptionFormatError)) throw err;
          reply(option, Rep.ERR_INVALID);
          break;
        }
        const target = lookup(req.name);
        if (!target) {
          reply(option, Rep.ERR_UNKNOWN, encodeString(unknown(req.name)));
          break;
        }
        if (target === 'refused') {
          reply(option, Rep.ERR_POLICY, Buffer.from(`access to export ${req.name} is not allowed for this client`));
          break;
        }
        const matches = isSet
          ? req.queries.some((q) => q === BASE_ALLOCATION)
          : req.queries.length === 0 || req.queries.some((q) => q === 'base:' || q === BASE_ALLOCATION);
        if (matches) reply(option, Rep.META_CONTEXT, encodeMetaContext(isSet ? BASE_ALLOCATION_ID : 0, BASE_ALLOCATION));
        if (isSet) selection = { exportName: req.name, base: matches };
        reply(option, Rep.ACK);
        break;
      }
      default:
        reply(option, Rep.ERR_UNSUP);
    }
  }

  function done(e: Export, flags: number): Negotiated {
    const chosen = selection && opts.exports.get(selection.exportName) === e && selection.base;
    return {
      export: e,
      transmissionFlags: flags,
      structuredReplies: sr,
      baseAllocation: Boolean(chosen),
      leftover: reader.detach(),
      socket,
      identity,
    };
  }
}

function isKnown(option: number): boolean {
  return option >= Opt.EXPORT_NAME && option <= Opt.SET_META_CONTEXT && option !== Opt.PEEK_EXPORT;
}

// NBD client errors: one class per kind of failure, each with errno, code and cause.
import { constants as osConstants } from 'node:os';
import {
  NbdErr,
  nameOf,
} from '../../protocol/constants.js';

// ---------------------------------------------------------------------------
// Errors: one class per kind of failure, each with errno, code and cause.

export const osErrno = (code: string): number => (osConstants.errno as Record<string, number | undefined>)[code] ?? 0;
export const NBD_ERRNOS: ReadonlySet<number> = new Set(Object.values(NbdErr));

/** A request failed: the server replied with an error, or the client refused it before sending. */
export class NbdError extends Error {
  override readonly name = 'NbdError';
  constructor(
    /** The command, e.g. 'pread'. */
    readonly op: string,
    readonly code: string,
    readonly errno: number,
    message: string,
    /** 'client' when refused locally (strict mode, bad arguments), never sent. */
    readonly origin: 'server' | 'client',
    /** From an ERROR_OFFSET chunk: where the failure happened. */
    readonly offset?: number,
  ) {
    super(message);
  }
}

/** The connection is gone (refused, reset, closed, shut down): nothing more can be sent. */
export class NbdConnectionError extends Error {
  override readonly name = 'NbdConnectionError';
  readonly errno: number;
  constructor(
    readonly code: string,
    message: string,
    options?: { cause?: unknown },
  ) {
    super(message, options);
    this.errno = osErrno(code);
  }
}

/** A request (or the handshake) took longer than allowed. */
export class NbdTimeoutError extends Error {
  override readonly name = 'NbdTimeoutError';
  readonly code = 'ETIMEDOUT';
  readonly errno = osErrno('ETIMEDOUT');
  constructor(
    readonly op: string,
    readonly timeoutMs: number,
  ) {
    super(`${op}: no answer within ${timeoutMs} ms`);
  }
}

// How libnbd and qemu surface option errors as errno.
export const OPTION_ERRNO: Record<string, string> = {
  ERR_UNSUP: 'ENOTSUP',
  ERR_POLICY: 'EPERM',
  ERR_INVALID: 'EINVAL',
  ERR_PLATFORM: 'EOPNOTSUPP',
  ERR_TLS_REQD: 'EPERM',
  ERR_UNKNOWN: 'ENOENT',
  ERR_SHUTDOWN: 'ESHUTDOWN',
  ERR_BLOCK_SIZE_REQD: 'EINVAL',
  ERR_TOO_BIG: 'E2BIG',
};

/** The server refused an option during the handshake (e.g. ERR_UNKNOWN for a missing export). */
export class NbdOptionError extends Error {
  override readonly name = 'NbdOptionError';
  /** The reply name, e.g. 'ERR_UNKNOWN'. */
  readonly code: string;
  readonly errno: number;
  constructor(
    readonly option: number,
    readonly reply: number,
    serverMessage: string,
  ) {
    const code = nameOf('rep', reply);
    super(`${nameOf('opt', option)}: server replied ${code}${serverMessage ? `: ${serverMessage}` : ''}`);
    this.code = code;
    this.errno = osErrno(OPTION_ERRNO[code] ?? 'EINVAL');
  }
}

export function serverError(op: string, wire: number, serverMessage: string, offset?: number): NbdError {
  // proto.md: a client reads an unknown error value as EINVAL.
  const known = NBD_ERRNOS.has(wire);
  const code = known ? nameOf('err', wire) : 'EINVAL';
  const what = known ? code : `unknown error ${wire} (read as EINVAL)`;
  const at = offset === undefined ? '' : ` at offset ${offset}`;
  return new NbdError(op, code, known ? wire : NbdErr.EINVAL, `${op}: server replied ${what}${at}${serverMessage ? `: ${serverMessage}` : ''}`, 'server', offset);
}

export function refused(op: string, code: keyof typeof NbdErr, why: string): NbdError {
  return new NbdError(op, code, NbdErr[code], `${op}: ${why}`, 'client');
}

/** The server broke a rule for one request, but the stream itself is intact. */
export function badReply(op: string, why: string): NbdError {
  return new NbdError(op, 'EPROTO', osErrno('EPROTO'), `${op}: ${why}`, 'server');
}


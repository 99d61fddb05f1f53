// The failures of a transfer through a shared volume, one class each, so the CLI prints one line
// and tests match on `code`.

/** An on-disk structure that is not ours, from a newer version, damaged or inconsistent. */
export class XferFormatError extends Error {
  override readonly name = 'XferFormatError';
  readonly code = 'EXFERFORMAT';
  constructor(
    /** What was being decoded, e.g. "pointer table of connection 2". */
    readonly what: string,
    message: string,
    options?: { cause?: unknown },
  ) {
    super(`${what}: ${message}`, options);
  }
}

/** A segment whose header or data does not match its pointer entry after every retry. */
export class XferCorruptError extends Error {
  override readonly name = 'XferCorruptError';
  readonly code = 'EXFERCORRUPT';
}

/** Bad geometry or arguments for format, send or recv. */
export class XferUsageError extends Error {
  override readonly name = 'XferUsageError';
  readonly code = 'EXFERUSAGE';
}

/** Every path to one device failed. */
export class XferPathError extends Error {
  override readonly name = 'XferPathError';
  readonly code = 'EXFERPATH';
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
  }
}

/** The process ID table has no free entry within the wait. */
export class XferTableFullError extends Error {
  override readonly name = 'XferTableFullError';
  readonly code = 'EXFERFULL';
}

/** The peer stopped writing its heartbeat, or went away, or never came. */
export class XferPeerError extends Error {
  override readonly name = 'XferPeerError';
  readonly code = 'EXFERPEER';
}

// The admin client's failures (client.ts), apart from the client itself: the CLI's entry point
// tells AdminUnreachableError apart on every command, and importing client.ts there would load
// node:http into every CLI process, `xfer send` and `--version` included (~10 ms of CPU each).
export class AdminClientError extends Error {
  override readonly name: string = 'AdminClientError';
}

export class AdminUnreachableError extends AdminClientError {
  override readonly name = 'AdminUnreachableError';
  /** The storage system that did not answer, when the endpoint named it. */
  readonly ss: number | undefined;
  constructor(
    message: string,
    /** errno-style code: ECONNREFUSED, ENOTFOUND, ETIMEDOUT, ... */
    readonly code: string,
    options?: { cause?: unknown; ss?: number },
  ) {
    super(message, options);
    this.ss = options?.ss;
  }
}

export class AdminReplyError extends AdminClientError {
  override readonly name = 'AdminReplyError';
  constructor(
    message: string,
    /** HTTP status of the reply. */
    readonly status: number,
    /** The server's `error` text, when it sent one. */
    readonly serverMessage?: string,
  ) {
    super(message);
  }
}

// The logger of a command, at --log-level. pino is loaded here, when a command runs, not when the
// command line is parsed: `--help` and the one-shot client commands start faster without it.
import type { Command } from 'commander';
import type { Logger } from 'pino';

export async function cliLogger(cmd: Command): Promise<Logger> {
  const { createLogger } = await import('../util/log.js');
  return createLogger(cmd.optsWithGlobals().logLevel as string);
}

/** The same, made only when something is logged at or above the level (util/log.ts, lazyLogger). */
export async function lazyCliLogger(cmd: Command): Promise<Logger> {
  const { lazyLogger } = await import('../util/log.js');
  return lazyLogger(cmd.optsWithGlobals().logLevel as string);
}

// Logging: human-readable on a TTY, JSON lines otherwise, always on stderr
// (stdout stays free for command output).
//
// pino is required when a logger is made, not when this module loads, and lazyLogger() makes it
// only when something is logged at or above the level: loading pino costs ~0.06 s of CPU, which
// a command that logs nothing (a transfer without trouble) need not spend (bench/RESULTS.md,
// "xfer, issue 17 third part").
import { createRequire } from 'node:module';
import type { Logger, LevelWithSilent } from 'pino';

export const LEVELS: LevelWithSilent[] = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'];

/** pino's own numbers for its levels: a call is written when its number is at least the logger's. */
const RANK: Record<string, number> = { trace: 10, debug: 20, info: 30, warn: 40, error: 50, fatal: 60, silent: Infinity };

function checkLevel(level: string): void {
  if (!LEVELS.includes(level as LevelWithSilent)) throw new Error(`invalid log level "${level}" (expected one of ${LEVELS.join(', ')})`);
}

export function createLogger(level: string = 'info'): Logger {
  checkLevel(level);
  const { pino } = createRequire(import.meta.url)('pino') as typeof import('pino');
  if (process.stderr.isTTY) {
    return pino({
      level,
      transport: { target: 'pino-pretty', options: { destination: 2, colorize: true, translateTime: 'SYS:HH:MM:ss.l', ignore: 'pid,hostname' } },
    });
  }
  return pino({ level, base: { pid: process.pid } }, pino.destination({ dest: 2, sync: true }));
}

/**
 * A logger made by `make` at the first call at or above `level` (or the first use of anything but
 * the level methods); calls below the level are dropped without making it.
 */
export function lazyLogger(level: string = 'info', make: (level: string) => Logger = createLogger): Logger {
  checkLevel(level);
  const threshold = RANK[level]!;
  const quiet = () => undefined;
  let real: Logger | undefined;
  return new Proxy({} as Logger, {
    get(_, key) {
      // Not a promise: `await` and async returns look for `then`, which must not make the logger.
      if (key === 'then') return undefined;
      if (typeof key === 'string' && key !== 'silent' && RANK[key] !== undefined && RANK[key] < threshold) return quiet;
      real ??= make(level);
      const v: unknown = Reflect.get(real, key);
      return typeof v === 'function' ? (v as (...a: unknown[]) => unknown).bind(real) : v;
    },
  });
}

// Logging: human-readable on a TTY, JSON lines otherwise, always on stderr
// (stdout stays free for command output).
import { pino, type Logger, type LevelWithSilent } from 'pino';

export const LEVELS: LevelWithSilent[] = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'];

export function createLogger(level: string = 'info'): Logger {
  if (!LEVELS.includes(level as LevelWithSilent)) throw new Error(`invalid log level "${level}" (expected one of ${LEVELS.join(', ')})`);
  if (process.stderr.isTTY) {
    return pino({
      level,
      transport: { target: 'pino-pretty', options: { destination: 2, colorize: true, translateTime: 'SYS:HH:MM:ss.l', ignore: 'pid,hostname' } },
    });
  }
  return pino({ level, base: { pid: process.pid } }, pino.destination({ dest: 2, sync: true }));
}

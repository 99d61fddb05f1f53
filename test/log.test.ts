// The lazy logger of the xfer commands (src/util/log.ts): pino is made only for a call that logs.
import type { Logger } from 'pino';
import { describe, expect, it } from 'vitest';
import { lazyLogger } from '../src/util/log.js';

/** A stand-in for createLogger that records what it was asked to make and every call made on it. */
function recorder() {
  const made: string[] = [];
  const calls: unknown[][] = [];
  const make = (level: string) => {
    made.push(level);
    const log = { level, warn: (...a: unknown[]) => void calls.push(['warn', ...a]), debug: (...a: unknown[]) => void calls.push(['debug', ...a]) };
    return log as unknown as Logger;
  };
  return { made, calls, make };
}

describe('lazyLogger', () => {
  it('drops calls below its level without making the logger, and makes it once at the first call at or above', async () => {
    const r = recorder();
    const log = lazyLogger('info', r.make);
    // An async function returning it, and an await of it, look for `then`: that must not make it.
    expect(await (async () => log)()).toBe(log);
    log.debug({ slot: 1 }, 'claimed connection slot');
    log.trace('nothing');
    expect(r.made).toEqual([]);
    log.warn({ path: 'p' }, 'path p failed');
    log.warn('again');
    expect(r.made).toEqual(['info']);
    expect(r.calls).toEqual([
      ['warn', { path: 'p' }, 'path p failed'],
      ['warn', 'again'],
    ]);
    expect(log.level).toBe('info');
  });

  it('passes every call through at a level that wants them, makes nothing when silent, and refuses an unknown level', () => {
    const r = recorder();
    const debug = lazyLogger('debug', r.make);
    debug.debug('d');
    expect(r.calls).toEqual([['debug', 'd']]);
    const s = recorder();
    const silent = lazyLogger('silent', s.make);
    silent.warn('w');
    silent.debug('d');
    expect(s.made).toEqual([]);
    expect(() => lazyLogger('loud', r.make)).toThrow('invalid log level "loud" (expected one of fatal, error, warn, info, debug, trace, silent)');
  });
});

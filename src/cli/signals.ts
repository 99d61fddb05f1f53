// A server runs until SIGTERM or SIGINT, then shuts down gracefully and exits 0.
// A second signal during shutdown exits at once with status 1.
import type { Logger } from 'pino';

export interface StopSignals {
  /** Shut down with `shutdown` at the first signal, or at once if one came already. */
  until(shutdown: () => Promise<void>): Promise<void>;
}

/**
 * Catch SIGTERM and SIGINT from now on. A server calls this before it starts listening: a
 * supervisor may send SIGTERM as soon as it reads "listening", and until the handler is in place
 * that signal's default action would kill the process, with nothing flushed or answered. A signal
 * that comes while the server is still starting waits for `until`, which then shuts down at once;
 * a second one exits at once with status 1 (a start that hangs can still be interrupted).
 */
export function catchStopSignals(log: Logger): StopSignals {
  let pending: NodeJS.Signals | undefined;
  let handler: ((sig: NodeJS.Signals) => void) | undefined;
  const onSignal = (sig: NodeJS.Signals) => {
    if (handler) return handler(sig);
    if (pending) {
      log.warn({ signal: sig }, 'second signal while starting: exiting');
      process.exit(1);
    }
    pending = sig;
    log.info({ signal: sig }, 'signal while starting: stopping once started (a second signal exits now)');
  };
  process.on('SIGTERM', onSignal);
  process.on('SIGINT', onSignal);
  return {
    until(shutdown) {
      return new Promise(() => {
        let stopping = false;
        handler = (sig) => {
          if (stopping) {
            log.warn({ signal: sig }, 'second signal: exiting without finishing');
            process.exit(1);
          }
          stopping = true;
          log.info({ signal: sig }, 'shutting down: finishing requests in flight');
          // A client that never lets its requests finish must not keep us from exiting.
          setTimeout(() => {
            log.error('shutdown did not finish within 30 s: exiting');
            process.exit(1);
          }, 30_000).unref();
          shutdown().then(
            () => {
              log.info('stopped');
              process.exit(0);
            },
            (err: Error) => {
              log.error({ err: err.message }, 'shutdown failed');
              process.exit(1);
            },
          );
        };
        if (pending) handler(pending);
      });
    },
  };
}

// Run until SIGTERM or SIGINT, then shut down gracefully and exit 0.
// A second signal during shutdown exits at once with status 1.
import type { Logger } from 'pino';

export function runUntilSignal(log: Logger, shutdown: () => Promise<void>): Promise<void> {
  return new Promise((resolve) => {
    let stopping = false;
    const onSignal = (sig: NodeJS.Signals) => {
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
          resolve();
          process.exit(0);
        },
        (err: Error) => {
          log.error({ err: err.message }, 'shutdown failed');
          process.exit(1);
        },
      );
    };
    process.on('SIGTERM', onSignal);
    process.on('SIGINT', onSignal);
  });
}

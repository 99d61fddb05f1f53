// src/cli/signals.ts: a server catches SIGTERM and SIGINT before it starts listening. A signal that
// comes while it is still starting is held and stops it gracefully once it is up (exit 0); a
// second one exits at once (1); once up, a signal shuts it down as before.
import { spawn } from 'node:child_process';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { ROOT } from './helpers/servers.js';

/**
 * A child that catches the signals (dist/cli/signals.js), says "catching", and goes on "starting"
 * until its stdin says it is up; each step is told on stderr, so the test sends signals on events.
 */
const CHILD = `
const { catchStopSignals } = await import(${JSON.stringify(path.join(ROOT, 'dist/cli/signals.js'))});
const say = (msg) => process.stderr.write(msg + '\\n');
const line = (level) => (o, m) => say(level + ' ' + (typeof o === 'string' ? o : m)); // pino's (obj, msg) or (msg)
const log = { info: line('info'), warn: line('warn'), error: line('error') };
const stop = catchStopSignals(log);
say('catching');
process.stdin.once('data', () => {
  say('up');
  stop.until(async () => say('shutdown ran'));
});
`;

function startChild() {
  const child = spawn(process.execPath, ['--input-type=module', '-e', CHILD], { stdio: ['pipe', 'ignore', 'pipe'] });
  let stderr = '';
  const waiters: { re: RegExp; resolve: () => void }[] = [];
  child.stderr.setEncoding('utf8').on('data', (d: string) => {
    stderr += d;
    for (const w of waiters.splice(0)) if (w.re.test(stderr)) w.resolve();
    else waiters.push(w);
  });
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  /** Resolves when stderr matches `re`; fails, saying what it did print, if the child exits first. */
  const seen = (re: RegExp) =>
    Promise.race([
      new Promise<void>((resolve) => (re.test(stderr) ? resolve() : waiters.push({ re, resolve }))),
      exited.then((code) => (re.test(stderr) ? undefined : Promise.reject(new Error(`exited ${code} before printing ${re}: ${stderr}`)))),
    ]);
  return { child, exited, seen, stderr: () => stderr };
}

describe('stop signals of a server', () => {
  it('hold a SIGTERM that comes while starting, then shut down gracefully once up: exit 0', async () => {
    const c = startChild();
    await c.seen(/catching/);
    c.child.kill('SIGTERM');
    await c.seen(/signal while starting/);
    expect(c.child.exitCode).toBeNull(); // still running: held, not killed
    c.child.stdin.write('up\n');
    expect(await c.exited).toBe(0);
    expect(c.stderr().split('\n').filter(Boolean)).toEqual([
      'catching',
      'info signal while starting: stopping once started (a second signal exits now)',
      'up',
      'info shutting down: finishing requests in flight',
      'shutdown ran',
      'info stopped',
    ]);
  });

  it('exit at once with status 1 at a second signal while starting (a start that hangs can be interrupted)', async () => {
    const c = startChild();
    await c.seen(/catching/);
    c.child.kill('SIGINT');
    await c.seen(/signal while starting/);
    c.child.kill('SIGINT');
    expect(await c.exited).toBe(1);
    expect(c.stderr()).toMatch(/warn second signal while starting: exiting/);
    expect(c.stderr()).not.toMatch(/shutdown ran/);
  });

  it('shut down gracefully at a signal once up: exit 0', async () => {
    const c = startChild();
    await c.seen(/catching/);
    c.child.stdin.write('up\n');
    await c.seen(/^up$/m);
    c.child.kill('SIGTERM');
    expect(await c.exited).toBe(0);
    expect(c.stderr()).toMatch(/info shutting down[\s\S]*shutdown ran\ninfo stopped/);
  });
});

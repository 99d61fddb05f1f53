// bin/server-flags.js: bin/blockmirror.js's first line has no V8 flag (client commands keep Node's
// own code cache), and a server command started without --max-semi-space-size restarts itself
// with it through execv: same pid, same stdio, same socket-activation fds, and it serves.
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { CLI, ROOT, freePort, run } from './helpers/servers.js';

interface ServerFlags {
  SERVER_NODE_FLAGS: string[];
  missingServerFlags(execArgv: string[], nodeOptions: string | undefined): string[];
  isServerCommand(args: string[]): boolean;
  restartWithServerFlags(): void;
}
const flags = createRequire(import.meta.url)(path.join(ROOT, 'bin/server-flags.js')) as ServerFlags;

const cmdline = (pid: number) => fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0').filter(Boolean);

/** Servers a test started: killed after it, whether it passed or not. */
const live = new Set<ChildProcess>();
afterEach(() => {
  for (const c of live) c.kill('SIGKILL');
  live.clear();
});

/**
 * Starts `argv` (the script itself, or node with flags) and resolves once it says `listening` on
 * stderr, or rejects if it exits first. One whose stderr was lost never says it: the test times out.
 */
async function startListening(argv: string[], env: NodeJS.ProcessEnv = {}) {
  const child = spawn(argv[0]!, argv.slice(1), { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, ...env } });
  live.add(child);
  let stderr = '';
  child.stdout.resume();
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  await new Promise<void>((resolve, reject) => {
    child.stderr.setEncoding('utf8').on('data', (d: string) => {
      stderr += d;
      if (/listening: nbd:/.test(stderr)) resolve();
    });
    void exited.then((code) => reject(new Error(`exited ${code} before saying "listening": ${stderr}`)));
  });
  return { child, stderr: () => stderr, exited };
}

describe('the flags of the server commands', () => {
  it('are missing unless the command line or NODE_OPTIONS sets that flag, with any value and spelling', () => {
    expect(flags.SERVER_NODE_FLAGS).toEqual(['--max-semi-space-size=4']);
    expect(flags.missingServerFlags([], undefined)).toEqual(['--max-semi-space-size=4']);
    expect(flags.missingServerFlags(['--cpu-prof', '--max-old-space-size=300'], '--trace-gc')).toEqual(['--max-semi-space-size=4']);
    expect(flags.missingServerFlags(['--max-semi-space-size=4'], undefined)).toEqual([]);
    expect(flags.missingServerFlags(['--max_semi_space_size=16'], undefined)).toEqual([]);
    expect(flags.missingServerFlags(['--max-semi-space-size', '2'], undefined)).toEqual([]);
    expect(flags.missingServerFlags([], ' --max-semi-space-size=8  --trace-gc')).toEqual([]);
  });

  it('are wanted by up, serve, gateway, cfs serve and cfs mount, and by no other command nor any --help', () => {
    for (const args of [['up', '-c', 'x.yaml'], ['--log-level', 'warn', 'serve'], ['gateway', '-c', 'x'], ['cfs', 'serve', '-c', 'x'], ['cfs', '-c', 'x', 'mount', '/mnt'], ['--log-level=warn', 'up']]) {
      expect(flags.isServerCommand(args), args.join(' ')).toBe(true);
    }
    for (const args of [[], ['--version'], ['status', '-c', 'x'], ['cfs', 'get', 'serve', 'x'], ['cfs', 'ls'], ['pair', 'split', 'up'], ['--log-level', 'up', 'status'], ['up', '--help'], ['serve', '-h'], ['etcd', 'dump'], ['--', 'up']]) {
      expect(flags.isServerCommand(args), args.join(' ')).toBe(false);
    }
  });

  it('go unset, and the process runs on, when execv fails (execSelf returns -errno) or is called wrongly', () => {
    const addon = createRequire(import.meta.url)(path.join(ROOT, 'native/build/Release/sparse.node')) as { execSelf(p: unknown, argv: unknown, keep: unknown): number };
    expect(addon.execSelf('/nonexistent/node', ['node', '-e', '0'], [])).toBe(-2); // ENOENT
    expect(addon.execSelf(path.join(ROOT, 'README.md'), ['x'], [])).toBe(-13); // EACCES: not executable
    expect(() => addon.execSelf('/bin/true', [], [])).toThrow(TypeError);
    expect(() => addon.execSelf('/bin/true', ['true', 7], [])).not.toThrow(); // a non-string argument: -EINVAL, no exec
    expect(addon.execSelf('/bin/true', ['true', 7], [])).toBe(-22);
    expect(() => addon.execSelf('/bin/true', ['true'], 'fd')).toThrow(TypeError);
  });

  it('never replace a process that is not bin/blockmirror.js (this test runner)', () => {
    const argv = process.argv;
    process.argv = [argv[0]!, argv[1]!, 'serve'];
    try {
      flags.restartWithServerFlags(); // would replace vitest's worker if it did not check
    } finally {
      process.argv = argv;
    }
    expect(process.env.BLOCKMIRROR_SERVER_RESTARTED).toBeUndefined();
  });
});

describe('a server started from the script alone (its first line has no flag)', () => {
  it('restarts in place with the flag: the same pid, its log on the same stderr, serving, and exit 0 on SIGTERM', async () => {
    expect(fs.readFileSync(CLI, 'utf8').split('\n', 1)[0]).toBe('#!/usr/bin/env node');
    const port = await freePort();
    const s = await startListening([CLI, 'serve', '--size', '4MiB', '--listen', `127.0.0.1:${port}`, '--log-level', 'info']);
    expect(cmdline(s.child.pid!)).toEqual(['node', '--max-semi-space-size=4', CLI, 'serve', '--size', '4MiB', '--listen', `127.0.0.1:${port}`, '--log-level', 'info']);
    const info = await run('nbdinfo', ['--size', `nbd://127.0.0.1:${port}/disk`]);
    expect(info.stdout.trim()).toBe(String(4 * 2 ** 20));
    s.child.kill('SIGTERM');
    expect(await s.exited).toBe(0);
    expect(s.stderr()).toMatch(/"msg":"stopped"/);
  });

  it('keeps socket activation\'s fd 3 across the restart (nbdinfo runs the script as its captive server)', async () => {
    const r = await run('nbdinfo', ['--size', '--', '[', CLI, 'serve', '--size', '3MiB', '--log-level', 'warn', ']'], { timeoutMs: 30_000 });
    expect(r.stderr).toBe('');
    expect(r.stdout.trim()).toBe(String(3 * 2 ** 20));
  });

  it('does not restart when the flag is given (on the command line or in NODE_OPTIONS) or after a restart', async () => {
    const cases: { argv: string[]; env?: NodeJS.ProcessEnv }[] = [
      { argv: [process.execPath, '--max-semi-space-size=8', CLI] },
      { argv: [CLI], env: { NODE_OPTIONS: '--max-semi-space-size=2' } },
      { argv: [CLI], env: { BLOCKMIRROR_SERVER_RESTARTED: '1' } },
    ];
    for (const c of cases) {
      const port = await freePort();
      const argv = [...c.argv, 'serve', '--size', '1MiB', '--listen', `127.0.0.1:${port}`];
      const s = await startListening(argv, c.env);
      const seen = cmdline(s.child.pid!);
      expect(seen.slice(1), JSON.stringify(c)).toEqual(c.argv[0] === CLI ? [CLI, ...argv.slice(1)] : argv.slice(1));
      s.child.kill('SIGTERM');
      expect(await s.exited).toBe(0);
    }
  });
});

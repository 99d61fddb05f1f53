// Spawns real servers for tests: blockmirror's own CLI and nbdkit, each on a
// free loopback port or a unix socket, and stops them afterwards.
import { spawn, type ChildProcess } from 'node:child_process';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import fs from 'node:fs';
import { fileURLToPath } from 'node:url';

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
export const CLI = path.join(ROOT, 'bin/blockmirror.js');

export interface RunningServer {
  /** nbd:// URI of the export (or nbd+unix:// when listening on a socket). */
  uri: string;
  host: string;
  port: number;
  /** unix socket path when started with one. */
  socket?: string;
  proc: ChildProcess;
  /** Everything the server wrote to stderr so far. */
  stderr(): string;
  /** SIGTERM, then SIGKILL after 5 s; resolves with the exit code. */
  stop(signal?: NodeJS.Signals): Promise<number | null>;
}

/**
 * Ports for test servers come from below the kernel's ephemeral range (ip_local_port_range), so no
 * outgoing connection can take the port of a server that a test kills and starts again (a restarted
 * storage system once failed with EADDRINUSE on its own peer port). Each vitest worker draws from
 * its own slice (VITEST_POOL_ID), never hands a port out twice, and checks that it is free now.
 */
const EPHEMERAL_LOW = (() => {
  try {
    return Number(fs.readFileSync('/proc/sys/net/ipv4/ip_local_port_range', 'utf8').trim().split(/\s+/)[0]) || 32768;
  } catch {
    return 32768;
  }
})();
const SLICES = 8;
const SLICE = Math.max(200, Math.floor((EPHEMERAL_LOW - 10_000) / SLICES));
const sliceLow = 10_000 + ((Number(process.env.VITEST_POOL_ID ?? 0) || 0) % SLICES) * SLICE;
const handedOut = new Set<number>();

function canListen(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.createServer();
    s.once('error', () => resolve(false));
    s.listen(port, '127.0.0.1', () => s.close(() => resolve(true)));
  });
}

export async function freePort(): Promise<number> {
  for (let tries = 0; tries < 2000; tries++) {
    const port = sliceLow + Math.floor(Math.random() * SLICE);
    if (handedOut.has(port) || port >= EPHEMERAL_LOW) continue;
    if (!(await canListen(port))) continue;
    handedOut.add(port);
    return port;
  }
  throw new Error(`freePort: no free port in ${sliceLow}-${sliceLow + SLICE - 1}`);
}

const made: string[] = [];

/** A new directory under the run's TMPDIR, removed after the test file (removeTmpDirs). */
export function tmpDir(prefix = 'bm-test-'): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  made.push(dir);
  return dir;
}

/** Removes every directory tmpDir made in this test file; setup-env.ts calls it after the file. */
export function removeTmpDirs(): void {
  if (process.env.BLOCKMIRROR_KEEP_TMP) return;
  for (const dir of made.splice(0)) fs.rmSync(dir, { recursive: true, force: true, maxRetries: 5 });
}

function track(proc: ChildProcess): { stderr(): string; exited: Promise<number | null> } {
  let err = '';
  proc.stderr?.setEncoding('utf8');
  proc.stderr?.on('data', (d: string) => (err += d));
  proc.stdout?.resume();
  const exited = new Promise<number | null>((resolve) => proc.once('exit', (code) => resolve(code)));
  return { stderr: () => err, exited };
}

function stopper(proc: ChildProcess, exited: Promise<number | null>) {
  return async (signal: NodeJS.Signals = 'SIGTERM') => {
    if (proc.exitCode !== null || proc.signalCode !== null) return proc.exitCode;
    proc.kill(signal);
    const t = setTimeout(() => proc.kill('SIGKILL'), 5000);
    const code = await exited;
    clearTimeout(t);
    return code;
  };
}

async function waitFor(check: () => Promise<boolean>, what: string, proc: ChildProcess, stderr: () => string, ms = 60_000) {
  const deadline = Date.now() + ms;
  while (Date.now() < deadline) {
    if (proc.exitCode !== null) throw new Error(`${what} exited with ${proc.exitCode}: ${stderr()}`);
    if (await check()) return;
    await new Promise((r) => setTimeout(r, 20));
  }
  throw new Error(`${what} did not become ready: ${stderr()}`);
}

const canConnect = (opts: net.NetConnectOpts) => () =>
  new Promise<boolean>((resolve) => {
    const s = net.connect(opts);
    s.once('connect', () => { s.destroy(); resolve(true); });
    s.once('error', () => resolve(false));
  });

/**
 * Start `blockmirror serve` with the given extra arguments (e.g. ['--size', '64MiB']).
 * Listens on a free loopback port unless `socket` is set. Export name defaults to 'disk'.
 */
export async function startServe(args: string[], opts: { socket?: string; env?: NodeJS.ProcessEnv } = {}): Promise<RunningServer> {
  const port = opts.socket ? 0 : await freePort();
  const listen = opts.socket ? ['--socket', opts.socket] : ['--listen', `127.0.0.1:${port}`];
  const proc = spawn(process.execPath, [CLI, 'serve', ...listen, ...args], {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, ...opts.env },
  });
  const { stderr, exited } = track(proc);
  const name = args.includes('--name') ? args[args.indexOf('--name') + 1] : 'disk';
  if (opts.socket) await waitFor(canConnect({ path: opts.socket }), 'blockmirror serve', proc, stderr);
  else await waitFor(canConnect({ host: '127.0.0.1', port }), 'blockmirror serve', proc, stderr);
  const uri = opts.socket ? `nbd+unix:///${name}?socket=${opts.socket}` : `nbd://127.0.0.1:${port}/${name}`;
  return { uri, host: '127.0.0.1', port, socket: opts.socket, proc, stderr, stop: stopper(proc, exited) };
}

/** Start `nbdkit PLUGIN ARGS...` in the foreground on a free port (or a unix socket). */
export async function startNbdkit(pluginArgs: string[], opts: { socket?: string } = {}): Promise<RunningServer> {
  const port = opts.socket ? 0 : await freePort();
  const listen = opts.socket ? ['-U', opts.socket] : ['-i', '127.0.0.1', '-p', String(port)];
  const proc = spawn('nbdkit', ['-f', '--exit-with-parent', ...listen, ...pluginArgs], { stdio: ['ignore', 'pipe', 'pipe'] });
  const { stderr, exited } = track(proc);
  if (opts.socket) await waitFor(canConnect({ path: opts.socket }), 'nbdkit', proc, stderr);
  else await waitFor(canConnect({ host: '127.0.0.1', port }), 'nbdkit', proc, stderr);
  const uri = opts.socket ? `nbd+unix:///?socket=${opts.socket}` : `nbd://127.0.0.1:${port}/`;
  return { uri, host: '127.0.0.1', port, socket: opts.socket, proc, stderr, stop: stopper(proc, exited) };
}

export interface CmdResult { code: number | null; stdout: string; stderr: string }

/** Run a command to completion (no shell), capturing output. */
export function run(cmd: string, args: string[], opts: { input?: string | Buffer; timeoutMs?: number; env?: NodeJS.ProcessEnv; cwd?: string } = {}): Promise<CmdResult> {
  return new Promise((resolve, reject) => {
    const p = spawn(cmd, args, { stdio: ['pipe', 'pipe', 'pipe'], env: { ...process.env, ...opts.env }, cwd: opts.cwd });
    let stdout = '';
    let stderr = '';
    p.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    p.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    const t = setTimeout(() => p.kill('SIGKILL'), opts.timeoutMs ?? 60_000);
    p.once('error', (e) => { clearTimeout(t); reject(e); });
    p.once('close', (code) => { clearTimeout(t); resolve({ code, stdout, stderr }); });
    // A command that exits before reading its stdin (most do) makes this write fail with EPIPE: harmless.
    p.stdin.on('error', () => {});
    p.stdin.end(opts.input ?? '');
  });
}

/** python3 with Debian's python3-libnbd: the system interpreter, not a pyenv shim. */
export const PYTHON = '/usr/bin/python3';

export interface RunningCluster {
  configPath: string;
  dir: string;
  proc: ChildProcess;
  stderr(): string;
  stop(signal?: NodeJS.Signals): Promise<number | null>;
}

/**
 * Start `blockmirror up -c FILE` for a YAML text and wait until every listed
 * TCP port accepts (NBD and admin ports of the storage systems it runs).
 */
export async function startUp(configPath: string, ports: number[], extraArgs: string[] = [], env?: NodeJS.ProcessEnv): Promise<RunningCluster> {
  const proc = spawn(process.execPath, [CLI, 'up', '-c', configPath, '--log-level', 'warn', ...extraArgs], { stdio: ['ignore', 'pipe', 'pipe'], ...(env ? { env: { ...process.env, ...env } } : {}) });
  const { stderr, exited } = track(proc);
  for (const port of ports) await waitFor(canConnect({ host: '127.0.0.1', port }), 'blockmirror up', proc, stderr, 20_000);
  return { configPath, dir: path.dirname(configPath), proc, stderr, stop: stopper(proc, exited) };
}

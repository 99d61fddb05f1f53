// Helpers for driving real NBD clients (nbdinfo, qemu-io, qemu-img, nbdcopy,
// fio, python3-libnbd) against the servers that servers.ts starts.
//
// Every tool is looked up before a test uses it, and a missing one throws:
// these tests must fail, never skip, when CI forgot to install something.
import fs from 'node:fs';
import path from 'node:path';
import { run, startNbdkit, startServe, tmpDir, type CmdResult, type RunningServer } from './servers.js';

/** Directories searched for tools, PATH first; the sbin ones hold nbd-client and mkfs.ext4 on Debian. */
function searchPath(): string[] {
  const dirs = (process.env.PATH ?? '').split(path.delimiter).filter(Boolean);
  for (const d of ['/usr/local/sbin', '/usr/local/bin', '/usr/sbin', '/usr/bin', '/sbin', '/bin']) if (!dirs.includes(d)) dirs.push(d);
  return dirs;
}

/** Absolute path of an executable, or undefined. */
export function which(tool: string): string | undefined {
  if (tool.includes('/')) return isExecutable(tool) ? tool : undefined;
  for (const dir of searchPath()) {
    const p = path.join(dir, tool);
    if (isExecutable(p)) return p;
  }
  return undefined;
}

function isExecutable(p: string): boolean {
  try {
    fs.accessSync(p, fs.constants.X_OK);
    return fs.statSync(p).isFile();
  } catch {
    return false;
  }
}

/** Debian package that provides each tool the interop tests use, for the error message. */
const PACKAGE: Record<string, string> = {
  nbdinfo: 'libnbd-bin',
  nbdcopy: 'libnbd-bin',
  'qemu-img': 'qemu-utils',
  'qemu-io': 'qemu-utils',
  fio: 'fio',
  nbdkit: 'nbdkit',
  'qemu-system-x86_64': 'qemu-system-x86',
  busybox: 'busybox-static',
  'nbd-client': 'nbd-client',
  'mkfs.ext4': 'e2fsprogs',
  e2fsck: 'e2fsprogs',
  debugfs: 'e2fsprogs',
  cpio: 'cpio',
};

/** Throw, naming the Debian packages, unless every tool is installed. */
export function requireTools(...tools: string[]): void {
  const missing = tools.filter((t) => which(t) === undefined);
  if (missing.length > 0) {
    const pkgs = [...new Set(missing.map((t) => PACKAGE[t] ?? t))].join(' ');
    throw new Error(`required tool(s) missing: ${missing.join(', ')} (install with: apt-get install ${pkgs})`);
  }
}

/** Throw unless /usr/bin/python3 can import the libnbd bindings. */
export async function requirePythonLibnbd(python: string): Promise<void> {
  const r = await run(python, ['-c', 'import nbd; print(nbd.NBD().get_version())']).catch((e: Error) => ({
    code: -1,
    stdout: '',
    stderr: e.message,
  }));
  if (r.code !== 0) throw new Error(`${python} cannot import nbd (install python3-libnbd): ${r.stderr.trim()}`);
}

/** Format a command's failure so a test failure shows what the client said. */
export function describeRun(what: string, r: CmdResult): string {
  return `${what} exited ${r.code}\n--- stdout ---\n${r.stdout.slice(-4000)}\n--- stderr ---\n${r.stderr.slice(-4000)}`;
}

/** Run and insist on exit status 0, returning the result. */
export async function runOk(cmd: string, args: string[], opts: Parameters<typeof run>[2] = {}): Promise<CmdResult> {
  const r = await run(cmd, args, opts);
  if (r.code !== 0) throw new Error(describeRun(`${cmd} ${args.join(' ')}`, r));
  return r;
}

// ---------------------------------------------------------------------------
// Targets: the same test body runs against each kind of server.

export interface StartOptions {
  /** Export size in bytes. */
  size: number;
  readOnly?: boolean;
  description?: string;
  /** Extra `blockmirror serve` arguments (ignored by nbdkit). */
  extra?: string[];
  /** For file targets: bytes to put in the backing file before the server starts. */
  initial?: Buffer;
  /** Listen on this unix socket instead of a loopback TCP port. */
  socket?: string;
}

export interface StartedTarget extends RunningServer {
  /** Backing file of a file target. */
  file?: string;
}

export interface Target {
  /** Shown in test names. */
  label: string;
  kind: 'memory' | 'file';
  server: 'blockmirror' | 'nbdkit';
  start(opts: StartOptions): Promise<StartedTarget>;
}

/** Stops every server and removes every directory a test created through `track`. */
export class Cleanup {
  private readonly servers: RunningServer[] = [];
  private readonly dirs: string[] = [];

  server<T extends RunningServer>(s: T): T {
    this.servers.push(s);
    return s;
  }

  dir(prefix?: string): string {
    const d = tmpDir(prefix);
    this.dirs.push(d);
    return d;
  }

  async run(): Promise<void> {
    const servers = this.servers.splice(0);
    await Promise.all(servers.map((s) => s.stop()));
    for (const d of this.dirs.splice(0)) fs.rmSync(d, { recursive: true, force: true });
  }
}

function writeInitial(file: string, opts: StartOptions): void {
  if (!opts.initial) return;
  fs.writeFileSync(file, opts.initial);
  fs.truncateSync(file, opts.size);
}

export function serveMemory(cleanup: Cleanup): Target {
  return {
    label: 'serve (memory)',
    kind: 'memory',
    server: 'blockmirror',
    async start(opts) {
      if (opts.initial) throw new Error('a memory target cannot start with initial contents');
      const args = ['--size', String(opts.size), ...serveFlags(opts)];
      return cleanup.server(await startServe(args, { socket: opts.socket }));
    },
  };
}

export function serveFile(cleanup: Cleanup): Target {
  return {
    label: 'serve --file',
    kind: 'file',
    server: 'blockmirror',
    async start(opts) {
      const file = path.join(cleanup.dir('bm-file-'), 'disk.img');
      writeInitial(file, opts);
      const args = ['--size', String(opts.size), '--file', file, ...serveFlags(opts)];
      return { ...cleanup.server(await startServe(args, { socket: opts.socket })), file };
    },
  };
}

function serveFlags(opts: StartOptions): string[] {
  const a: string[] = [];
  if (opts.readOnly) a.push('--read-only');
  if (opts.description !== undefined) a.push('--description', opts.description);
  return [...a, ...(opts.extra ?? [])];
}

export function nbdkitMemory(cleanup: Cleanup): Target {
  return {
    label: 'nbdkit memory (reference)',
    kind: 'memory',
    server: 'nbdkit',
    async start(opts) {
      const ro = opts.readOnly ? ['-r'] : [];
      return cleanup.server(await startNbdkit([...ro, 'memory', String(opts.size)], { socket: opts.socket }));
    },
  };
}

export function nbdkitFile(cleanup: Cleanup): Target {
  return {
    label: 'nbdkit file (reference)',
    kind: 'file',
    server: 'nbdkit',
    async start(opts) {
      const file = path.join(cleanup.dir('bm-nbdkit-'), 'disk.img');
      fs.writeFileSync(file, '');
      writeInitial(file, opts);
      fs.truncateSync(file, opts.size);
      const ro = opts.readOnly ? ['-r'] : [];
      return { ...cleanup.server(await startNbdkit([...ro, 'file', file], { socket: opts.socket })), file };
    },
  };
}

// ---------------------------------------------------------------------------
// Client wrappers.

export interface MapExtent {
  offset: number;
  length: number;
  /** base:allocation flags: bit0 HOLE, bit1 ZERO. */
  type: number;
  description: string;
}

/** `nbdinfo --map --json URI`: base:allocation extents of the whole export. */
export async function nbdinfoMap(uri: string): Promise<MapExtent[]> {
  const r = await runOk('nbdinfo', ['--map', '--json', uri]);
  return JSON.parse(r.stdout) as MapExtent[];
}

/** `nbdinfo --json URI`: the first export's properties. */
export async function nbdinfoJson(uri: string): Promise<{ info: Record<string, unknown>; whole: Record<string, unknown> }> {
  const r = await runOk('nbdinfo', ['--json', uri]);
  const whole = JSON.parse(r.stdout) as Record<string, unknown>;
  const exports = whole.exports as Record<string, unknown>[];
  if (!Array.isArray(exports) || exports.length === 0) throw new Error(`nbdinfo --json listed no export:\n${r.stdout}`);
  return { info: exports[0], whole };
}

/**
 * Run qemu-io commands (each a `-c` string) on a raw image at `uri`.
 * Returns the result without judging it; see qemuIoOk.
 */
export function qemuIo(uri: string, commands: string[], flags: string[] = []): Promise<CmdResult> {
  return run('qemu-io', ['-f', 'raw', ...flags, ...commands.flatMap((c) => ['-c', c]), uri]);
}

/** qemu-io that must exit 0 and must not report a failed pattern check or a failed command. */
export async function qemuIoOk(uri: string, commands: string[], flags: string[] = []): Promise<CmdResult> {
  const r = await qemuIo(uri, commands, flags);
  const out = r.stdout + r.stderr;
  if (r.code !== 0 || /Pattern verification failed|failed:|error/i.test(out)) {
    throw new Error(describeRun(`qemu-io ${commands.join(' ; ')}`, r));
  }
  return r;
}

export interface FioJobResult {
  jobname: string;
  error: number;
  read: { io_bytes: number };
  write: { io_bytes: number };
}

/** Run one fio job with the nbd engine; JSON results go to a file (fio also chats on stdout). */
export async function fio(uri: string, dir: string, args: string[], timeoutMs = 120_000, env?: NodeJS.ProcessEnv): Promise<FioJobResult[]> {
  const out = path.join(dir, `fio-${Date.now()}-${Math.random().toString(36).slice(2)}.json`);
  // Run in `dir` and keep no verify state: fio otherwise leaves *-verify.state files in the cwd.
  const r = await run(
    'fio',
    ['--ioengine=nbd', `--uri=${uri}`, '--output-format=json', `--output=${out}`, '--verify_state_save=0', ...args],
    { timeoutMs, cwd: dir, ...(env ? { env } : {}) },
  );
  const text = fs.existsSync(out) ? fs.readFileSync(out, 'utf8') : '';
  if (r.code !== 0) throw new Error(describeRun(`fio ${args.join(' ')}`, r) + `\n--- json ---\n${text.slice(-4000)}`);
  // fio may print warnings before the JSON document.
  const json = JSON.parse(text.slice(text.indexOf('{'))) as { jobs: FioJobResult[] };
  return json.jobs;
}

/** Deterministic pseudo-random bytes (xorshift32), so failures are reproducible; every byte, the tail of a length not a multiple of 4 included. */
export function pseudoRandom(length: number, seed: number): Buffer {
  const b = Buffer.alloc(length);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < length; i += 4) {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    if (i + 4 <= length) b.writeUInt32LE(x, i);
    else for (let k = 0; i + k < length; k++) b[i + k] = (x >>> (8 * k)) & 0xff;
  }
  return b;
}

/** First offset where two buffers differ, or -1. */
export function firstDifference(a: Buffer, b: Buffer): number {
  if (a.equals(b)) return -1;
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) if (a[i] !== b[i]) return i;
  return n;
}

// Test clusters with a CFS: a YAML, `blockmirror up` (optionally without the CFS server, which then
// runs as `blockmirror cfs serve`), the CLI, library clients and FUSE mounts, all stopped afterwards.
import { spawn, type ChildProcess } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { CfsClient } from '../../src/cfs/client.js';
import { CLI, freePort, run, startUp, tmpDir, type CmdResult, type RunningCluster } from './servers.js';

export interface CfsClusterOptions {
  /** The volumes and pairs part of storage system 1 (YAML lines, indented under the file's top level). */
  layout?: 'one-mirror' | 'two-mirrors';
  /** Keep the volumes and the CFS metadata on disk, under the test directory. */
  onDisk?: boolean;
  /** Extra lines for the cfs: mapping (indented by 2). */
  cfsExtra?: string;
  /** Extra lines for storage system 1 (indented by 4), and a top-level prefix (e.g. a security: section). */
  ssExtra?: string;
  prefix?: string;
  /** Start `up --no-cfs` and the CFS server as its own `cfs serve` process. */
  separateServer?: boolean;
  dir?: string;
}

export interface CfsCluster {
  dir: string;
  config: string;
  ports: { nbd: number; admin: number; cfs: number };
  up: RunningCluster;
  /** The `cfs serve` process when separateServer. */
  server?: Proc;
  /** `blockmirror cfs ARGS -c CONFIG` */
  cli(args: string[], opts?: { input?: string | Buffer; timeoutMs?: number }): Promise<CmdResult>;
  client(opts?: { reconnect?: boolean }): Promise<CfsClient>;
  startServer(): Promise<Proc>;
  stop(): Promise<void>;
}

export interface Proc {
  proc: ChildProcess;
  stderr(): string;
  /** Resolves with the exit code (null when killed by a signal). */
  exited: Promise<number | null>;
  kill(signal?: NodeJS.Signals): Promise<number | null>;
}

const LAYOUTS = {
  'one-mirror': `    volumes:
      - { id: 8, size: 128MiB }
      - { id: 7, size: 128MiB }
pairs:
  - { name: pair1, mode: async, master: { ss: 1, vol: 8 }, mirrors: [ { ss: 1, vol: 7 } ] }
`,
  'two-mirrors': `    volumes:
      - { id: 8, size: 128MiB }
      - { id: 7, size: 128MiB }
      - { id: 6, size: 128MiB }
pairs:
  - { name: pair1, mode: async, master: { ss: 1, vol: 8 }, mirrors: [ { ss: 1, vol: 7 }, { ss: 1, vol: 6 } ] }
`,
};

export function spawnProc(args: string[]): Proc {
  const proc = spawn(process.execPath, [CLI, ...args, '--log-level', 'warn'], { stdio: ['ignore', 'pipe', 'pipe'] });
  let err = '';
  proc.stderr!.setEncoding('utf8').on('data', (d: string) => (err += d));
  proc.stdout!.resume();
  const exited = new Promise<number | null>((resolve) => proc.once('exit', (code) => resolve(code)));
  return {
    proc,
    stderr: () => err,
    exited,
    async kill(signal: NodeJS.Signals = 'SIGTERM') {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill(signal);
      const t = setTimeout(() => proc.kill('SIGKILL'), 10_000);
      const code = await exited;
      clearTimeout(t);
      return code;
    },
  };
}

export async function waitForPort(port: number, p: Proc | undefined, what: string, ms = 60_000): Promise<void> {
  const deadline = Date.now() + ms;
  while (Date.now() < deadline) {
    if (p && p.proc.exitCode !== null) throw new Error(`${what} exited with ${p.proc.exitCode}: ${p.stderr()}`);
    const ok = await new Promise<boolean>((resolve) => {
      const s = net.connect({ host: '127.0.0.1', port });
      s.once('connect', () => {
        s.destroy();
        resolve(true);
      });
      s.once('error', () => resolve(false));
    });
    if (ok) return;
    await new Promise((r) => setTimeout(r, 25));
  }
  throw new Error(`${what} did not listen on ${port}: ${p?.stderr() ?? ''}`);
}

export async function startCfsCluster(opts: CfsClusterOptions = {}): Promise<CfsCluster> {
  const dir = opts.dir ?? tmpDir('bm-cfs-');
  const ports = { nbd: await freePort(), admin: await freePort(), cfs: await freePort() };
  const config = path.join(dir, 'cluster.yaml');
  fs.writeFileSync(
    config,
    `${opts.prefix ?? ''}clusterSize: 64KiB
storageSystems:
  - id: 1
    nbd: 127.0.0.1:${ports.nbd}
    admin: 127.0.0.1:${ports.admin}
${opts.ssExtra ?? ''}${opts.onDisk ? '    dataDir: data\n' : ''}${LAYOUTS[opts.layout ?? 'one-mirror']}cfs:
  listen: 127.0.0.1:${ports.cfs}
${opts.onDisk ? '  dataDir: meta\n' : ''}${opts.cfsExtra ?? ''}`,
  );
  const up = await startUp(config, opts.separateServer ? [ports.nbd, ports.admin] : [ports.nbd, ports.admin, ports.cfs], opts.separateServer ? ['--no-cfs'] : []);
  const clients: CfsClient[] = [];
  const cluster: CfsCluster = {
    dir,
    config,
    ports,
    up,
    cli: (args, o = {}) => run(process.execPath, [CLI, 'cfs', ...args, '-c', config], o),
    async client(o = {}) {
      const c = await CfsClient.connect({ server: { host: '127.0.0.1', port: ports.cfs }, name: 'test', ...o });
      clients.push(c);
      return c;
    },
    async startServer() {
      const p = spawnProc(['cfs', 'serve', '-c', config]);
      await waitForPort(ports.cfs, p, 'cfs serve');
      cluster.server = p;
      return p;
    },
    async stop() {
      await Promise.all(clients.splice(0).map((c) => c.close().catch(() => {})));
      await cluster.server?.kill('SIGKILL');
      await up.stop('SIGKILL');
      // The volumes and files of a test are hundreds of MiB: do not leave them in /tmp.
      if (!opts.dir) fs.rmSync(dir, { recursive: true, force: true });
    },
  };
  if (opts.separateServer) await cluster.startServer();
  return cluster;
}

/** `blockmirror cfs mount`, ready once the directory shows up in /proc/mounts. */
export async function mountCfs(config: string, dir: string): Promise<Proc> {
  fs.mkdirSync(dir, { recursive: true });
  const p = spawnProc(['cfs', 'mount', '-c', config, dir]);
  const deadline = Date.now() + 60_000;
  while (!isMounted(dir)) {
    if (p.proc.exitCode !== null) throw new Error(`cfs mount exited with ${p.proc.exitCode}: ${p.stderr()}`);
    if (Date.now() > deadline) throw new Error(`cfs mount did not mount ${dir}: ${p.stderr()}`);
    await new Promise((r) => setTimeout(r, 25));
  }
  return p;
}

export function isMounted(dir: string): boolean {
  return fs.readFileSync('/proc/mounts', 'utf8').split('\n').some((l) => l.split(' ')[1] === path.resolve(dir));
}

/** Deterministic bytes: the same (seed, length) always gives the same content. */
export function pattern(seed: string, length: number): Buffer {
  const out = Buffer.alloc(Math.ceil(length / 4) * 4);
  let x = crypto.createHash('sha256').update(seed).digest().readUInt32LE(0) || 1;
  for (let at = 0; at < out.length; at += 4) {
    // xorshift32: fast, and different for every seed
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    out.writeUInt32LE(x >>> 0, at);
  }
  return out.subarray(0, length);
}

// Two storage systems in two `blockmirror up --only` processes, sharing pairs
// across them: the harness of test/remote.test.ts and test/netns.test.ts.
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { CLI, freePort, run, tmpDir } from './servers.js';
import { adminFetch } from './admin.js';

export interface SSAddr {
  host: string;
  nbd: number;
  admin: number;
  peer: number;
}

export interface PairSpec {
  name: string;
  mode: 'sync' | 'async';
  vol: number;
  syncRate?: string;
  fence?: 'never' | 'data';
  autoResync?: boolean;
}

/** Volumes and pairs: vol N of SS1 is the master, vol N of SS2 its mirror. */
export interface PeerCredentials {
  ca: string;
  /** Certificate and key of each storage system (CN=ssN). */
  certs: Record<number, { cert: string; key: string }>;
}

export function twoSSYaml(a: SSAddr, b: SSAddr, pairs: PairSpec[], opts: { peerTimeout?: string; size?: string; tls?: PeerCredentials; insecure?: boolean } = {}): string {
  const size = opts.size ?? '16MiB';
  const vols = pairs.map((p) => `      - { id: ${p.vol}, size: ${size} }`).join('\n');
  const ss = (id: number, s: SSAddr) => `  - id: ${id}
    nbd: ${s.host}:${s.nbd}
    admin: ${s.host}:${s.admin}
    peer: ${s.host}:${s.peer}
    dataDir: ss${id}${opts.tls ? `\n    tls: { mode: off, cert: ${opts.tls.certs[id]!.cert}, key: ${opts.tls.certs[id]!.key} }` : ''}
    volumes:
${vols}`;
  const pr = pairs
    .map(
      (p) => `  - name: ${p.name}
    mode: ${p.mode}
    master: { ss: 1, vol: ${p.vol} }
    mirrors: [ { ss: 2, vol: ${p.vol} } ]${p.syncRate ? `\n    syncRate: ${p.syncRate}` : ''}${p.fence ? `\n    fence: ${p.fence}` : ''}${p.autoResync === false ? '\n    autoResync: false' : ''}`,
    )
    .join('\n');
  const security = opts.tls || opts.insecure ? `security:\n${opts.tls ? `  ca: ${opts.tls.ca}\n` : ''}${opts.insecure ? '  insecure: true\n' : ''}` : '';
  return `${security}peerTimeout: ${opts.peerTimeout ?? '1s'}\nstorageSystems:\n${ss(1, a)}\n${ss(2, b)}\npairs:\n${pr}\n`;
}

/**
 * Storage systems with vol1 (16 MiB) in each, and one sync pair `name` whose master is ss1 vol1
 * and whose mirrors are vol1 of `mirrors`; `tail` is appended (an etcd: section).
 */
export function nSSPairYaml(a: SSAddr[], mirrors: number[], opts: { name: string; syncRate?: string; tail?: string }): string {
  const ss = a.map((s, i) => `  - id: ${i + 1}
    nbd: ${s.host}:${s.nbd}
    admin: ${s.host}:${s.admin}
    peer: ${s.host}:${s.peer}
    dataDir: ss${i + 1}
    volumes:
      - { id: 1, size: 16MiB }`);
  return `peerTimeout: 2s
storageSystems:
${ss.join('\n')}
pairs:
  - name: ${opts.name}
    mode: sync
    master: { ss: 1, vol: 1 }
    mirrors: [ ${mirrors.map((m) => `{ ss: ${m}, vol: 1 }`).join(', ')} ]${opts.syncRate ? `\n    syncRate: ${opts.syncRate}` : ''}
${opts.tail ?? ''}`;
}

export async function loopbackAddrs(): Promise<[SSAddr, SSAddr]> {
  const one = async (): Promise<SSAddr> => ({ host: '127.0.0.1', nbd: await freePort(), admin: await freePort(), peer: await freePort() });
  return [await one(), await one()];
}

export class SSProcess {
  proc: ChildProcess | null = null;
  /** Added to the environment of the next start (a crash point: src/util/crash-point.ts). */
  env: Record<string, string> = {};
  private err = '';
  constructor(
    readonly id: number,
    readonly config: string,
    readonly addr: SSAddr,
  ) {}

  get stderr(): string {
    return this.err;
  }

  get cliPath(): string {
    return CLI;
  }

  protected cliArgs(): string[] {
    return [CLI, 'up', '-c', this.config, '--only', String(this.id), '--log-level', 'info'];
  }

  protected spawnWith(argv: string[]): ChildProcess {
    const [cmd, ...rest] = argv;
    this.err = '';
    const proc = spawn(cmd!, rest, { stdio: ['ignore', 'ignore', 'pipe'], env: { ...process.env, ...this.env } });
    proc.stderr!.setEncoding('utf8');
    proc.stderr!.on('data', (d: string) => (this.err += d));
    this.proc = proc;
    return proc;
  }

  /** Start it; `ms` is room for a loaded machine (node, fastify and the etcd client load slowly there). */
  async start(ms = 60_000): Promise<void> {
    const proc = this.spawnWith([process.execPath, ...this.cliArgs()]);
    const deadline = Date.now() + ms;
    while (Date.now() < deadline) {
      if (proc.exitCode !== null) throw new Error(`ss${this.id} exited with ${proc.exitCode}: ${this.err}`);
      if ((await canConnect(this.addr.host, this.addr.admin)) && (await canConnect(this.addr.host, this.addr.nbd))) return;
      await new Promise((r) => setTimeout(r, 25));
    }
    throw new Error(`ss${this.id} did not start: ${this.err}`);
  }

  async kill(signal: NodeJS.Signals = 'SIGKILL'): Promise<void> {
    const p = this.proc;
    if (!p || p.exitCode !== null || p.signalCode !== null) return;
    const exited = new Promise((r) => p.once('exit', r));
    p.kill(signal);
    await exited;
  }

  uri(vol: number): string {
    return `nbd://${this.addr.host}:${this.addr.nbd}/vol${vol}`;
  }

  /** GET /api/status, or undefined when it does not answer. */
  async status(): Promise<StatusReport | undefined> {
    try {
      const res = await adminFetch(`http://${this.addr.host}:${this.addr.admin}/api/status`, { signal: AbortSignal.timeout(2000) });
      return (await res.json()) as StatusReport;
    } catch {
      return undefined;
    }
  }

  async pair(name: string): Promise<PairView | undefined> {
    return (await this.status())?.pairs.find((p) => p.name === name);
  }

  /** Wait for this storage system's view of the pair to satisfy `ok`. */
  async waitPair(name: string, ok: (p: PairView) => boolean, what: string, ms = 60_000): Promise<PairView> {
    const deadline = Date.now() + ms;
    let last: PairView | undefined;
    while (Date.now() < deadline) {
      last = await this.pair(name);
      if (last && ok(last)) return last;
      await new Promise((r) => setTimeout(r, 50));
    }
    throw new Error(`ss${this.id}: ${name} never got ${what}; last: ${JSON.stringify(last)}\n${this.err.slice(-3000)}`);
  }

  volumeFile(dir: string, vol: number): string {
    return path.join(dir, `ss${this.id}`, `vol${vol}.img`);
  }
}

export interface PairView {
  name: string;
  state: string;
  role?: string;
  epoch?: number;
  stale?: boolean;
  error?: string;
  master: { ss: number; vol: number };
  clusters?: number;
  mirrors: { ss: number; vol: number; invalidClusters: number; connected?: boolean }[];
  verify?: { running: boolean; differences: number; differing: number[] };
}

export interface StatusReport {
  storageSystems: { id: number; peers?: { ss: number; connected: boolean }[] }[];
  pairs: PairView[];
}

export function canConnect(host: string, port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.connect({ host, port });
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
}

export function writeConfig(text: string): { dir: string; file: string } {
  const dir = tmpDir('bm-remote-');
  const file = path.join(dir, 'cluster.yaml');
  fs.writeFileSync(file, text);
  return { dir, file };
}

export async function qemuIo(target: string, cmds: string[], readOnly = false) {
  return run('qemu-io', ['-f', 'raw', ...(readOnly ? ['-r'] : []), ...cmds.flatMap((c) => ['-c', c]), target]);
}

/** Byte-for-byte comparison of two volume files (the oracle DRBD's and md's tests end with). */
export async function sameBytes(a: string, b: string): Promise<boolean> {
  const r = await run('cmp', [a, b]);
  return r.code === 0;
}

export const inSync = (p: PairView) => p.state === 'PAIR' && p.role === 'master' && p.mirrors.every((m) => m.invalidClusters === 0 && m.connected !== false);

// A real etcd cluster for the tests: N members on loopback ports, each with its own data dir,
// started and stopped by the test (Debian's etcd-server).
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { freePort, tmpDir } from './servers.js';

export interface EtcdMember {
  name: string;
  client: number;
  peer: number;
  proc: ChildProcess | null;
  log: string[];
}

export class EtcdCluster {
  private constructor(
    readonly members: EtcdMember[],
    private readonly dir: string,
  ) {}

  get endpoints(): string[] {
    return this.members.map((m) => `127.0.0.1:${m.client}`);
  }

  static async start(n = 3): Promise<EtcdCluster> {
    const dir = tmpDir('bm-etcd-');
    const members: EtcdMember[] = [];
    for (let i = 0; i < n; i++) members.push({ name: `m${i}`, client: await freePort(), peer: await freePort(), proc: null, log: [] });
    const cluster = new EtcdCluster(members, dir);
    for (const m of members) cluster.run(m);
    await cluster.waitHealthy();
    return cluster;
  }

  private run(m: EtcdMember): void {
    const initial = this.members.map((x) => `${x.name}=http://127.0.0.1:${x.peer}`).join(',');
    const proc = spawn(
      'etcd',
      [
        '--name', m.name,
        '--data-dir', path.join(this.dir, m.name),
        '--listen-client-urls', `http://127.0.0.1:${m.client}`,
        '--advertise-client-urls', `http://127.0.0.1:${m.client}`,
        '--listen-peer-urls', `http://127.0.0.1:${m.peer}`,
        '--initial-advertise-peer-urls', `http://127.0.0.1:${m.peer}`,
        '--initial-cluster', initial,
        '--initial-cluster-state', 'new',
        '--heartbeat-interval', '50',
        '--election-timeout', '500',
      ],
      { stdio: ['ignore', 'ignore', 'pipe'] },
    );
    proc.stderr!.setEncoding('utf8').on('data', (t: string) => {
      m.log.push(t);
      if (m.log.length > 200) m.log.shift();
    });
    m.proc = proc;
  }

  /** Every running member answers /health with true. */
  async waitHealthy(ms = 60_000): Promise<void> {
    const deadline = Date.now() + ms;
    for (;;) {
      const ok = await Promise.all(
        this.members.filter((m) => m.proc).map((m) =>
          fetch(`http://127.0.0.1:${m.client}/health`)
            .then(async (r) => ((await r.json()) as { health: string }).health === 'true')
            .catch(() => false),
        ),
      );
      if (ok.every(Boolean)) return;
      if (Date.now() > deadline) throw new Error(`etcd did not become healthy:\n${this.members.map((m) => m.log.slice(-5).join('')).join('\n')}`);
      await new Promise((r) => setTimeout(r, 100));
    }
  }

  async kill(i: number): Promise<void> {
    const m = this.members[i]!;
    const p = m.proc;
    m.proc = null;
    if (p && p.exitCode === null) {
      const exited = new Promise((r) => p.once('exit', r));
      p.kill('SIGKILL');
      await exited;
    }
  }

  /** Start a killed member again on its data dir; resolves once the cluster is healthy. */
  async restart(i: number): Promise<void> {
    const m = this.members[i]!;
    if (m.proc) return;
    this.run(m);
    await this.waitHealthy();
  }

  /** Kills every member and removes the data dirs (384 MB of preallocated WAL per 3 members). */
  async stop(): Promise<void> {
    for (let i = 0; i < this.members.length; i++) await this.kill(i);
    if (!process.env.BLOCKMIRROR_KEEP_TMP) fs.rmSync(this.dir, { recursive: true, force: true, maxRetries: 5 });
  }
}

// Network namespaces for the tests that need separate "hosts" (root only; CI runs as root):
// commands inside a namespace, and a storage system started and asked inside one.
import { run } from './servers.js';
import { SSProcess, type SSAddr } from './remote.js';

/** Run a command that must succeed; its stdout. */
export async function sh(cmd: string, args: string[]): Promise<string> {
  const r = await run(cmd, args);
  if (r.code !== 0) throw new Error(`${cmd} ${args.join(' ')}: exit ${r.code}: ${r.stderr.trim()}`);
  return r.stdout;
}

/** A command inside a namespace. */
export const inNs = (ns: string, cmd: string, args: string[], timeoutMs?: number) => run('ip', ['netns', 'exec', ns, cmd, ...args], timeoutMs ? { timeoutMs } : {});

/** The storage systems' admin APIs are reachable only inside their namespaces: ask from there. */
export class NsSS extends SSProcess {
  constructor(
    id: number,
    config: string,
    addr: SSAddr,
    readonly ns: string,
  ) {
    super(id, config, addr);
  }

  /**
   * Start it inside its namespace; ready once its admin and NBD ports accept connections there.
   * The probe is bash's /dev/tcp, not a node process per try: on a loaded machine, probes that
   * start node kept a starting storage system from the CPU for most of a minute.
   */
  override async start(ms = 60_000): Promise<void> {
    const args = [process.execPath, ...this.cliArgs()];
    this.spawnWith(['ip', 'netns', 'exec', this.ns, ...args]);
    const deadline = Date.now() + ms;
    const open = async (port: number) => (await inNs(this.ns, 'bash', ['-c', `exec 3<>/dev/tcp/${this.addr.host}/${port}`])).code === 0;
    while (Date.now() < deadline) {
      if (this.proc!.exitCode !== null) throw new Error(`ss${this.id} exited: ${this.stderr}`);
      if ((await open(this.addr.admin)) && (await open(this.addr.nbd))) return;
      await new Promise((r) => setTimeout(r, 200));
    }
    throw new Error(`ss${this.id} did not start: ${this.stderr}`);
  }

  override async status() {
    const r = await inNs(this.ns, process.execPath, [
      '-e',
      `fetch(process.argv[1],{signal:AbortSignal.timeout(2000),headers:{authorization:'Bearer '+process.env.BLOCKMIRROR_ADMIN_TOKEN}}).then(r=>r.text()).then(t=>process.stdout.write(t),()=>process.exit(1))`,
      `http://${this.addr.host}:${this.addr.admin}/api/status`,
    ]);
    return r.code === 0 && r.stdout ? (JSON.parse(r.stdout) as Awaited<ReturnType<SSProcess['status']>>) : undefined;
  }

  cli(args: string[]) {
    return inNs(this.ns, process.execPath, [this.cliPath, ...args]);
  }

  qemuIo(vol: number, cmds: string[], readOnly = false) {
    return inNs(this.ns, 'qemu-io', ['-f', 'raw', ...(readOnly ? ['-r'] : []), ...cmds.flatMap((c) => ['-c', c]), this.uri(vol)]);
  }
}

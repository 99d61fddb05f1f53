// `blockmirror cfs ...`: the cluster file system (docs/cfs.md). `serve` runs the CFS server
// alone; `mount` mounts it with FUSE; the rest are one-shot client commands. Every command takes
// -c FILE (the cluster YAML with a cfs: section) and loads its heavy modules only when it runs.
import path from 'node:path';
import fs from 'node:fs';
import type { Command } from 'commander';
import type { CfsClient, DirEntry, UsageReport } from '../cfs/client.js';
import type { ClusterConfig, HostPort } from '../cluster/config.js';
import { loadConfigOrUsage } from './config-cache.js';
import { UsageError } from './errors.js';
import { exitDone } from './exit.js';
import { cliLogger } from './logger.js';
import { catchStopSignals } from './signals.js';
import { humanBytes, humanSeconds, progressBar } from './progress.js';

interface Common {
  config: string;
  server?: string;
}

/** Progress bars only for transfers at least this big, and only on a terminal. */
const PROGRESS_MIN_BYTES = 16 * 1024 * 1024;

export function registerCfsCommand(program: Command): void {
  const cfs = program
    .command('cfs')
    .description('the cluster file system: files on mirrored pairs, metadata on a CFS server, data over NBD')
    .argument('[command]')
    .allowExcessArguments()
    .allowUnknownOption()
    .usage('serve|put|get|cat|ls|rm|mkdir|mv|usage|mount ... -c <file>')
    .action((sub: string | undefined) => {
      const expected = 'serve, put, get, cat, ls, rm, mkdir, mv, usage or mount';
      throw new UsageError(sub === undefined ? `cfs: missing command (${expected})` : `cfs: unknown command "${sub}" (expected ${expected})`);
    });
  const command = (spec: string, description: string) =>
    cfs
      .command(spec)
      .description(description)
      .allowExcessArguments(false)
      .requiredOption('-c, --config <file>', 'cluster configuration (YAML) with a cfs: section')
      .option('--server <host:port>', 'the CFS server (default: cfs.listen of the configuration)');

  command('serve', 'run the CFS server alone (up runs it too when the YAML has cfs:)').action(async (opts: Common, cmd: Command) => {
    const log = await cliLogger(cmd);
    const config = await loadCfsConfig(opts.config);
    const { CfsServer } = await import('../cfs/server.js');
    const { livePairs } = await import('./status.js');
    const { cfsServerTls } = await import('../cluster/credentials.js');
    const tls = cfsServerTls(config);
    const stop = catchStopSignals(log);
    const server = await CfsServer.start(config, log, { pairView: () => livePairs(config, 1000), ...(tls ? { tls } : {}) }).catch((e: Error) => {
      throw new Error(e.message);
    });
    await stop.until(() => server.close());
  });

  command('put <local> <path>', 'copy a local file (- for stdin) into the CFS; the file appears whole when the copy is done')
    .option('--pair <name>', 'the pair to put the file on (default: the one with the most free space)')
    .option('--no-clobber', 'refuse to replace an existing file')
    .option('--json', 'print what was copied as JSON (no progress bar)')
    .action(async (local: string, target: string, opts: Common & { pair?: string; clobber: boolean; json?: boolean }) => {
      await withClient(opts, async (client) => {
        let dest = target;
        if (dest.endsWith('/')) {
          if (local === '-') throw new UsageError('put: give the file name to put stdin as (not a directory)');
          dest += path.basename(local);
        }
        const existing = await client.stat(dest).catch(() => undefined);
        if (existing?.type === 'dir') throw new CfsCliError(`is a directory: ${normalize(dest)} (to put into it, end the path with /)`);
        const parent = path.posix.dirname(normalize(dest));
        const up = existing ? undefined : await client.stat(parent).catch(() => null);
        if (up === null) throw new CfsCliError(`no such directory: ${parent} (make it first: blockmirror cfs mkdir -p ${parent} -c ${opts.config})`);
        if (up?.type === 'file') throw new CfsCliError(`not a directory: ${parent}`);
        const size = local === '-' ? undefined : localSize(local);
        await transfer({ op: 'put', from: local, to: normalize(dest), size, json: opts.json }, (onProgress) =>
          client.putFile(local === '-' ? process.stdin : local, dest, {
            ...(opts.pair ? { pair: opts.pair } : {}),
            exclusive: !opts.clobber,
            onProgress,
          }),
        );
      });
    });

  command('get <path> <local>', 'copy a CFS file to a local file (- for stdout, or into a local directory)')
    .option('--json', 'print what was copied as JSON (no progress bar)')
    .action(async (source: string, local: string, opts: Common & { json?: boolean }) => {
      if (local === '-' && opts.json) throw new UsageError('get: --json needs a local file, not - (stdout carries the data)');
      await withClient(opts, async (client) => {
        const st = await client.stat(source);
        if (st.type === 'dir') throw new CfsCliError(`is a directory: ${normalize(source)}`);
        if (local === '-') return void (await client.getFile(source, process.stdout));
        let dest = local;
        if (fs.existsSync(dest) && fs.statSync(dest).isDirectory()) dest = path.join(dest, path.posix.basename(normalize(source)));
        await transfer({ op: 'get', from: normalize(source), to: dest, size: st.size, json: opts.json }, (onProgress) => client.getFile(source, dest, { onProgress }));
      });
    });

  command('cat <path>', 'write a CFS file to stdout').action(async (source: string, opts: Common) => {
    await withClient(opts, async (client) => {
      const st = await client.stat(source);
      if (st.type === 'dir') throw new CfsCliError(`is a directory: ${normalize(source)}`);
      await client.getFile(source, process.stdout);
    });
  });

  command('ls [path]', 'list a directory (name, size in bytes, mtime), or show one file')
    .option('--json', 'print JSON')
    .action(async (target: string | undefined, opts: Common & { json?: boolean }) => {
      await withClient(opts, async (client) => {
        const p = target ?? '/';
        const st = await client.stat(p);
        const entries: DirEntry[] = st.type === 'dir' ? await client.readdir(p) : [{ name: path.posix.basename(normalize(p)), type: 'file', size: st.size, mtime: st.mtime }];
        process.stdout.write(opts.json ? `${JSON.stringify({ path: normalize(p), entries }, null, 2)}\n` : renderListing(entries));
      });
    });

  command('rm <path>', 'remove a file (with -r, a directory and everything in it)')
    .option('-r, --recursive', 'remove a directory and its contents')
    .action(async (target: string, opts: Common & { recursive?: boolean }) => {
      await withClient(opts, async (client) => {
        const st = await client.stat(target);
        if (st.type === 'file') return client.unlink(target);
        if (!opts.recursive) throw new CfsCliError(`is a directory: ${normalize(target)} (rm -r removes it and its contents)`);
        await removeTree(client, normalize(target));
      });
    });

  command('mkdir <path>', 'make a directory')
    .option('-p, --parents', 'make parent directories as needed; no error if it exists')
    .action(async (target: string, opts: Common & { parents?: boolean }) => {
      await withClient(opts, (client) => client.mkdir(target, { parents: opts.parents === true }));
    });

  command('mv <from> <to>', 'rename or move a file or directory (into <to> if it is a directory)').action(async (from: string, to: string, opts: Common) => {
    await withClient(opts, async (client) => {
      // Like mv(1): into B when B is a directory.
      let dest = to;
      const target = await client.stat(to).catch(() => undefined);
      if (target?.type === 'dir' && normalize(to) !== normalize(from)) dest = `${normalize(to) === '/' ? '' : normalize(to)}/${path.posix.basename(normalize(from))}`;
      await client.rename(from, dest);
    });
  });

  command('usage', 'show the usage table: current and total opens of every copy of every pair')
    .option('--json', 'print JSON')
    .action(async (opts: Common & { json?: boolean }) => {
      await withClient(opts, async (client) => {
        const u = await client.usage();
        process.stdout.write(opts.json ? `${JSON.stringify(u, null, 2)}\n` : renderUsage(u));
      });
    });

  command('mount <dir>', 'mount the CFS on a directory with FUSE until SIGINT or SIGTERM').action(async (dir: string, opts: Common, cmd: Command) => {
    const log = await cliLogger(cmd);
    const config = await loadCfsConfig(opts.config);
    const client = await connectClient(config, opts, { reconnect: true, name: `mount ${path.resolve(dir)}` });
    const { mountCfs } = await import('../cfs/fuse.js');
    const stop = catchStopSignals(log);
    let mount;
    try {
      mount = await mountCfs(client, dir, log);
    } catch (e) {
      await client.close();
      throw e;
    }
    log.info({ dir: mount.dir }, 'cfs mounted');
    await stop.until(async () => {
      await mount.unmount();
      await client.close();
    });
  });
}

/** A CFS failure the CLI reports itself: one line, exit code 1. */
class CfsCliError extends Error {
  override readonly name = 'CfsCliError';
}

async function loadCfsConfig(file: string): Promise<ClusterConfig> {
  const config = await loadConfigOrUsage(file);
  if (!config.cfs) throw new UsageError(`${file} has no cfs: section (see config/cfs.yaml)`);
  return config;
}

function serverAddress(config: ClusterConfig, given: string | undefined): HostPort {
  if (given !== undefined) {
    const m = /^(?:\[([^\]]+)\]|([^:]+)):(\d{1,5})$/.exec(given);
    if (!m || Number(m[3]) === 0 || Number(m[3]) > 65535) throw new UsageError(`--server: expected HOST:PORT, got "${given}"`);
    return { host: m[1] ?? m[2]!, port: Number(m[3]) };
  }
  const l = config.cfs!.listen;
  if (l.port === 0) throw new UsageError(`${config.source}: cfs.listen has port 0 (any free port), so clients cannot know it; give --server`);
  // A server listening on every address is reached on loopback from its own host.
  const host = l.host === '0.0.0.0' ? '127.0.0.1' : l.host === '::' ? '::1' : l.host;
  return { host, port: l.port };
}

async function connectClient(config: ClusterConfig, opts: Common, extra: { reconnect?: boolean; name?: string } = {}): Promise<CfsClient> {
  const { CfsClient } = await import('../cfs/client.js');
  const { CFS_TOKEN_ENV, readCfsToken } = await import('../cfs/token.js');
  const { clientTlsFor, cfsClientCa } = await import('../cluster/credentials.js');
  const tlsCa = cfsClientCa(config);
  const server = serverAddress(config, opts.server);
  const token = process.env[CFS_TOKEN_ENV] || (config.cfs?.tokenFile ? readCfsToken(config.cfs.tokenFile) : undefined);
  const byId = new Map(config.storageSystems.map((s) => [s.id, s.nbd]));
  const connect = CfsClient.connect({
    server,
    nbd: (ss) => {
      const a = byId.get(ss);
      if (!a || a.port === 0) return undefined;
      const tls = clientTlsFor(config, ss);
      return { host: a.host === '0.0.0.0' || a.host === '::' ? server.host : a.host, port: a.port, ...(tls ? { tls } : {}) };
    },
    ...(token ? { token } : {}),
    ...(tlsCa ? { tlsCa } : {}),
    ...extra,
  });
  return connect.catch((e: Error) => {
    if (!e.message.startsWith('cannot reach the CFS server')) throw e;
    const next = opts.server
      ? 'start the CFS server there, or check --server'
      : `start it: blockmirror up -c ${opts.config} runs it with the storage systems, blockmirror cfs serve -c ${opts.config} alone (or give its address with --server)`;
    throw new CfsCliError(`${e.message}; ${next}`, { cause: e });
  });
}

async function withClient(opts: Common, fn: (client: CfsClient) => Promise<unknown>): Promise<void> {
  const config = await loadCfsConfig(opts.config);
  const client = await connectClient(config, opts);
  try {
    await fn(client);
  } finally {
    await client.close();
  }
  exitDone();
}

function normalize(p: string): string {
  const out = path.posix.normalize(`/${p}`);
  return out.length > 1 && out.endsWith('/') ? out.slice(0, -1) : out;
}

function localSize(file: string): number {
  try {
    const st = fs.statSync(file);
    if (st.isDirectory()) throw new CfsCliError(`is a directory: ${file}`);
    return st.size;
  } catch (e) {
    if (e instanceof CfsCliError) throw e;
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') throw new CfsCliError(`no such local file: ${file}`);
    throw new CfsCliError(`${file}: ${(e as Error).message}`);
  }
}

async function removeTree(client: CfsClient, dir: string): Promise<void> {
  for (const e of await client.readdir(dir)) {
    const p = `${dir === '/' ? '' : dir}/${e.name}`;
    if (e.type === 'dir') await removeTree(client, p);
    else await client.unlink(p);
  }
  if (dir !== '/') await client.rmdir(dir);
}

/**
 * Runs one put or get, with a bar on a terminal for a large file (progress.ts). Without a bar, a
 * large file ends with one summary line on stderr (stdout may be the data); --json prints the
 * summary as JSON on stdout instead, whatever the size.
 */
async function transfer(t: { op: 'put' | 'get'; from: string; to: string; size: number | undefined; json?: boolean | undefined }, run: (onProgress: (done: number) => void) => Promise<number>): Promise<void> {
  const large = t.size !== undefined && t.size >= PROGRESS_MIN_BYTES;
  const MiB = 1024 * 1024;
  const totalMiB = Math.ceil((t.size ?? 0) / MiB);
  const started = performance.now();
  const bar = large ? await progressBar({ label: t.op, total: totalMiB, format: '{value}/{total} MiB | {speed}/s | ETA {eta_formatted}', payload: { speed: '0B' }, json: t.json }) : undefined;
  let bytes = 0;
  try {
    bytes = await run((done) => {
      const seconds = Math.max(0.001, (performance.now() - started) / 1000);
      bar?.update(done >= t.size! ? totalMiB : Math.floor(done / MiB), undefined, { speed: humanBytes(done / seconds) });
    });
  } finally {
    bar?.stop();
  }
  const seconds = (performance.now() - started) / 1000;
  if (t.json) process.stdout.write(`${JSON.stringify({ op: t.op, from: t.from, to: t.to, bytes, seconds: Number(seconds.toFixed(3)) })}\n`);
  else if (large && !bar) process.stderr.write(`${t.op} ${t.from} -> ${t.to}: ${humanBytes(bytes)} in ${humanSeconds(seconds)} (${humanBytes(bytes / Math.max(0.001, seconds))}/s)\n`);
}

function renderListing(entries: DirEntry[]): string {
  const rows = entries.map((e) => [e.type === 'dir' ? `${e.name}/` : e.name, String(e.size), new Date(e.mtime).toISOString().replace(/\.\d{3}Z$/, 'Z')]);
  const w0 = Math.max(0, ...rows.map((r) => r[0]!.length));
  const w1 = Math.max(0, ...rows.map((r) => r[1]!.length));
  return rows.map((r) => `${r[0]!.padEnd(w0)}  ${r[1]!.padStart(w1)}  ${r[2]}\n`).join('');
}

function renderUsage(u: UsageReport): string {
  const rows = [['PAIR', 'COPY', 'SS', 'VOL', 'ROLE', 'OPENS', 'TOTAL']];
  for (const p of u.pairs) {
    p.copies.forEach((c, i) => rows.push([i === 0 ? p.name : '', String(c.mirror), String(c.ss), String(c.vol), c.failed ? `${c.role} (failed)` : c.role, String(c.opens), String(c.opensTotal)]));
  }
  const widths = rows[0]!.map((_, c) => Math.max(...rows.map((r) => r[c]!.length)));
  const right = new Set([1, 2, 3, 5, 6]);
  return rows.map((r) => `${r.map((cell, c) => (right.has(c) ? cell.padStart(widths[c]!) : cell.padEnd(widths[c]!))).join('  ').trimEnd()}\n`).join('');
}

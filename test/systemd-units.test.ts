// The systemd units of targets/ (targets/README.md): systemd's own checker accepts each one, every
// blockmirror command line in them is one the CLI accepts, and the gateway serves the socket
// systemd hands it (socket activation), with systemd-socket-activate standing in for systemd.
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Command, Option } from 'commander';
import { buildProgram } from '../src/cli/main.js';
import { EtcdCluster } from './helpers/etcd.js';
import { SSProcess, loopbackAddrs, twoSSYaml, writeConfig } from './helpers/remote.js';
import { freePort, ROOT, run, tmpDir } from './helpers/servers.js';

const TARGETS = path.join(ROOT, 'targets');
/** The node flags of the server commands (bin/server-flags.js): a unit passes them, so its server starts once. */
const SERVER_NODE_FLAGS = (createRequire(import.meta.url)(path.join(ROOT, 'bin/server-flags.js')) as { SERVER_NODE_FLAGS: string[] }).SERVER_NODE_FLAGS;
const UNITS = fs.readdirSync(TARGETS).filter((f) => /\.(service|socket)$/.test(f));
/** Templates get an instance, as systemctl would start them. */
const INSTANCE: Record<string, string> = { 'blockmirror@.service': 'demo', 'blockmirror-attach@.service': 'demo', 'blockmirror-cfs@.service': 'mnt-cfs' };

/** [Section] -> [key, value] lines, in order. */
function parseUnit(text: string): Map<string, [string, string][]> {
  const sections = new Map<string, [string, string][]>();
  let current: [string, string][] | undefined;
  for (const raw of text.split('\n')) {
    const line = raw.trim();
    if (line === '' || line.startsWith('#') || line.startsWith(';')) continue;
    const head = /^\[(.+)\]$/.exec(line);
    if (head) sections.set(head[1]!, (current = []));
    else {
      const eq = line.indexOf('=');
      current!.push([line.slice(0, eq), line.slice(eq + 1)]);
    }
  }
  return sections;
}

/**
 * Every Exec*= line of the unit as the argv systemd would run: prefixes (-, @, +, !) dropped,
 * %i and %f expanded, ${VAR} as one word and $VAR split into words, from the unit's Environment=
 * (or `env`, as a drop-in would set it).
 */
function execLines(file: string, env: Record<string, string> = {}): { key: string; argv: string[] }[] {
  const unit = parseUnit(fs.readFileSync(path.join(TARGETS, file), 'utf8'));
  const service = unit.get('Service') ?? [];
  const vars: Record<string, string> = {};
  for (const [k, v] of service) if (k === 'Environment') for (const m of v.matchAll(/"?([A-Z_]+)=([^"]*)"?/g)) vars[m[1]!] = m[2]!;
  Object.assign(vars, env);
  const instance = INSTANCE[file] ?? '';
  return service
    .filter(([k]) => k.startsWith('Exec'))
    .map(([key, value]) => {
      const words = value.replace(/^[-@+!]+/, '').split(/\s+/).filter(Boolean);
      const argv = words.flatMap((w) => {
        const one = /^\$\{([A-Z_]+)\}$/.exec(w);
        if (one) return [vars[one[1]!] ?? ''];
        const split = /^\$([A-Z_]+)$/.exec(w);
        if (split) return (vars[split[1]!] ?? '').split(/\s+/).filter(Boolean);
        return [w.replace(/%i/g, instance).replace(/%f/g, `/${instance.replace(/-/g, '/')}`)];
      });
      return { key, argv };
    });
}

/** Why commander would refuse `args` (unknown command or option, missing argument), or undefined. */
async function cliProblem(args: string[]): Promise<string | undefined> {
  let cmd: Command = await buildProgram();
  let i = 0;
  for (; i < args.length; i++) {
    const sub = cmd.commands.find((c) => c.name() === args[i]);
    if (!sub) break;
    cmd = sub;
  }
  if (cmd.commands.length > 0) return `"${args.slice(0, i + 1).join(' ')}" is not a command`;
  const options: Option[] = [];
  for (let c: Command | null = cmd; c; c = c.parent) options.push(...c.options);
  const positionals: string[] = [];
  for (; i < args.length; i++) {
    const a = args[i]!;
    if (!a.startsWith('-')) {
      positionals.push(a);
      continue;
    }
    const o = options.find((x) => x.long === a || x.short === a);
    if (!o) return `unknown option ${a} for ${cmd.name()}`;
    if (o.required || o.optional) i++;
  }
  const required = cmd.registeredArguments.filter((a) => a.required).length;
  if (positionals.length < required) return `${cmd.name()} needs ${required} arguments, got ${positionals.length}`;
  const missing = cmd.options.find((o) => o.mandatory && !args.includes(o.long!) && !args.includes(o.short ?? '\0'));
  return missing ? `${cmd.name()} needs ${missing.long}` : undefined;
}

describe('the systemd units in targets/', () => {
  it('has a unit for the storage system daemon, the CFS mount and the gateway with its socket', () => {
    expect(UNITS.sort()).toEqual(['blockmirror-attach@.service', 'blockmirror-cfs@.service', 'blockmirror-gateway.service', 'blockmirror-gateway.socket', 'blockmirror@.service']);
  });

  it('passes systemd-analyze verify without a warning, with /opt/blockmirror pointing at this checkout', async () => {
    // verify checks that every Exec*= program exists and is executable, so the units are checked
    // as installed from this checkout.
    const dir = tmpDir('bm-units-');
    const files = UNITS.map((f) => {
      const name = f.replace('@.', `@${INSTANCE[f] ?? ''}.`);
      fs.writeFileSync(path.join(dir, name), fs.readFileSync(path.join(TARGETS, f), 'utf8').replaceAll('/opt/blockmirror', ROOT));
      return path.join(dir, name);
    });
    const r = await run('systemd-analyze', ['verify', '--man=no', ...files]);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    // And it does find a broken unit: the checker is not silent whatever it reads.
    const broken = path.join(dir, 'broken.service');
    fs.writeFileSync(broken, '[Service]\nExecStart=/usr/bin/node-not-there x\nRestartt=always\n');
    const b = await run('systemd-analyze', ['verify', '--man=no', broken]);
    expect(b.code).not.toBe(0);
    expect(b.stderr).toMatch(/Unknown key 'Restartt'/);
    expect(b.stderr).toMatch(/node-not-there is not executable/);
  });

  it('runs only blockmirror command lines the CLI accepts, each with its help', async () => {
    let checked = 0;
    for (const unit of UNITS) {
      for (const { key, argv } of execLines(unit)) {
        const script = argv.findIndex((a) => a.endsWith('/bin/blockmirror.js'));
        if (script < 0) continue;
        expect(argv[0], `${unit} ${key}`).toBe('/usr/bin/node');
        // With the server commands' flags, which they would otherwise restart themselves to get.
        expect(argv.slice(1, script), `${unit} ${key}`).toEqual(SERVER_NODE_FLAGS);
        expect(argv[script]).toBe('/opt/blockmirror/bin/blockmirror.js');
        const args = argv.slice(script + 1);
        expect(await cliProblem(args), `${unit} ${key}: blockmirror ${args.join(' ')}`).toBeUndefined();
        const help = await run(process.execPath, [path.join(ROOT, 'bin/blockmirror.js'), ...args, '--help']);
        expect(help.code, help.stderr).toBe(0);
        expect(help.stdout).toMatch(new RegExp(`^Usage: blockmirror ${args.filter((a) => /^[a-z]+$/.test(a)).slice(0, 2).join(' ')}`));
        checked++;
      }
    }
    expect(checked).toBe(3); // up, cfs mount, gateway
    // The checker itself refuses what commander would refuse.
    expect(await cliProblem(['up', '-c', 'x', '--onyl', '1'])).toBe('unknown option --onyl for up');
    expect(await cliProblem(['cfs', 'mount', '-c', 'x'])).toBe('mount needs 1 arguments, got 0');
    expect(await cliProblem(['gateway'])).toBe('gateway needs --config');
    expect(await cliProblem(['cfs', 'mnt'])).toBe('"cfs mnt" is not a command');
  });
});

describe('the gateway under socket activation', () => {
  let etcd: EtcdCluster;
  let ss: SSProcess[] = [];
  let config: string;
  let master: string;
  const activators: ChildProcess[] = [];

  beforeAll(async () => {
    etcd = await EtcdCluster.start(1);
    const [a, b] = await loopbackAddrs();
    const yaml = twoSSYaml(a, b, [{ name: 'pair1', mode: 'sync', vol: 1 }], { size: '16MiB' });
    config = writeConfig(`${yaml}etcd:\n  endpoints: [ ${etcd.endpoints.join(', ')} ]\n  prefix: /bm-units-${process.pid}\n  leaseTtl: 2s\n`).file;
    ss = [new SSProcess(1, config, a), new SSProcess(2, config, b)];
    for (const s of ss) await s.start();
    await ss[0]!.waitPair('pair1', (p) => p.state === 'PAIR', 'PAIR');
    master = ss[0]!.uri(1);
  });
  afterAll(async () => {
    for (const p of activators) if (p.exitCode === null) p.kill('SIGKILL');
    await Promise.all(ss.map((s) => s.kill()));
    await etcd?.stop();
  });

  /** systemd-socket-activate listening on `address`, running the unit's ExecStart on the first connection. */
  async function activate(address: string): Promise<{ proc: ChildProcess; stderr: () => string; exited: Promise<number | null> }> {
    const [{ argv }] = execLines('blockmirror-gateway.service', { GATEWAY_CONFIG: config });
    const cmd = [process.execPath, ...argv.slice(1).map((a) => a.replace('/opt/blockmirror', ROOT)), '--log-level', 'info'];
    const proc = spawn('systemd-socket-activate', ['-l', address, ...cmd], { stdio: ['ignore', 'ignore', 'pipe'] });
    activators.push(proc);
    let err = '';
    proc.stderr!.setEncoding('utf8').on('data', (d: string) => (err += d));
    const exited = new Promise<number | null>((r) => proc.once('exit', (code) => r(code)));
    // Wait for the socket without connecting to it: a connection would start the gateway.
    await expect.poll(() => err, { timeout: 10_000 }).toMatch(/Listening on .* as 3\./);
    return { proc, stderr: () => err, exited };
  }

  const comm = (pid: number) => fs.readFileSync(`/proc/${pid}/comm`, 'utf8').trim();

  it('starts the gateway on the first connection and serves the pair on the socket systemd holds, byte for byte with the master', async () => {
    const port = await freePort();
    const gw = await activate(`127.0.0.1:${port}`);
    // No connection yet: no gateway, only the socket.
    expect(comm(gw.proc.pid!)).toBe('systemd-socket-');
    const size = await run('nbdinfo', ['--size', `nbd://127.0.0.1:${port}/pair1`], { timeoutMs: 30_000 });
    expect(size.stdout.trim(), size.stderr + gw.stderr()).toBe(String(16 * 1024 * 1024));
    // The same process, now the gateway (systemd-socket-activate execs it, as systemd does).
    expect(comm(gw.proc.pid!)).toBe('node');
    expect(gw.stderr()).toContain('gateway serving NBD on 127.0.0.1:' + port);
    const w = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 1M 3M', '-c', 'flush', `nbd://127.0.0.1:${port}/pair1`]);
    expect(w.code, w.stderr + w.stdout).toBe(0);
    const cmp = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', `nbd://127.0.0.1:${port}/pair1`, master]);
    expect(cmp.stdout).toContain('Images are identical');
    const mirror = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', master, ss[1]!.uri(1)]);
    expect(mirror.stdout).toContain('Images are identical');
    gw.proc.kill('SIGTERM');
    expect(await gw.exited).toBe(0);
  });

  it('refuses a socket other hosts can reach without TLS, naming the socket and what to add', async () => {
    const port = await freePort();
    const gw = await activate(`0.0.0.0:${port}`);
    await run('nbdinfo', ['--size', `nbd://127.0.0.1:${port}/pair1`], { timeoutMs: 30_000 });
    expect(await gw.exited).toBe(2);
    expect(gw.stderr().split('\n').filter((l) => l.startsWith('blockmirror:'))).toEqual([
      `blockmirror: the socket systemd passed, 0.0.0.0:${port} is reachable from other hosts without TLS: add --tls require with --tls-certificates or --tls-psk, or --insecure to accept the risk`,
    ]);
  });
});

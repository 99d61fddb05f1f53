#!/usr/bin/env node
// targets/attach: attach a blockmirror cluster's exports on this Linux host with the kernel NBD client.
//
// Reads the cluster YAML with the project's own loader (dist/cluster/config.js), so a file is
// checked exactly as `blockmirror up` checks it, then runs one nbd-client per export on a free
// /dev/nbdX and records what it attached in a state file, which --detach reads back.
// Plain JavaScript on purpose: it runs from a checkout after `npm install`, with no build of its own.
//
// Test seams (environment): BM_NBD_CLIENT (the nbd-client binary), BM_MODPROBE (the modprobe binary),
// BM_SYSFS_BLOCK (default /sys/block), BM_STATE_FILE (default /run/blockmirror/attached.json).
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { Failure, loadCluster, usageError } from './cluster.js';

const PROG = 'attach';
const DEFAULT_STATE = '/run/blockmirror/attached.json';
const BLOCK_SIZES = [512, 1024, 2048, 4096];
const MAX_CONNECTIONS = 64;
/** The nbd module's default nbds_max: what a dry run assumes when the module is not loaded yet. */
const DEFAULT_NBDS_MAX = 16;

const USAGE = `usage: targets/attach -c FILE [options]
Attach the host-facing exports of a blockmirror cluster to free /dev/nbdX devices with nbd-client:
the master of every pair and every volume in no pair. Needs root, nbd-client and the nbd module.

  -c, --config FILE      the cluster YAML (the file \`blockmirror up -c\` reads); required
      --ss ID            only the exports of storage system ID
      --mirrors          also attach the mirrors, read-only (-R): a mirror takes no host writes
                         unless its pair is split
  -C, --connections N    sockets per device (nbd-client -C); default nbd-client's, 1
  -b, --block-size N     512, 1024, 2048 or 4096 (nbd-client -b); default 4096
      --host HOST        connect to HOST instead of the address in the YAML (say, when it is 0.0.0.0)
      --dry-run          print the commands, change nothing
      --detach           detach what earlier runs attached for FILE (read from the state file)
      --nbdtab           print /etc/nbdtab lines (nbd0, nbd1, ... in order) for the exports and exit
      --state FILE       where attached devices are recorded; default $BM_STATE_FILE or
                         ${DEFAULT_STATE}
  -h, --help

Output: one line per export, e.g. "vol8 ss1 127.0.0.1:10809 -> /dev/nbd0".
Exit status: 0 done, 1 failed, 2 usage error.`;


function parseOptions(argv) {
  let parsed;
  try {
    parsed = parseArgs({
      args: argv,
      strict: true,
      allowPositionals: false,
      options: {
        config: { type: 'string', short: 'c' },
        ss: { type: 'string' },
        mirrors: { type: 'boolean' },
        connections: { type: 'string', short: 'C' },
        'block-size': { type: 'string', short: 'b' },
        host: { type: 'string' },
        'dry-run': { type: 'boolean' },
        detach: { type: 'boolean' },
        nbdtab: { type: 'boolean' },
        state: { type: 'string' },
        help: { type: 'boolean', short: 'h' },
      },
    });
  } catch (e) {
    throw usageError(e.message.split('\n')[0].replace(/\.$/, ''));
  }
  const v = parsed.values;
  if (v.help) return { help: true };
  if (v.config === undefined || v.config === '') throw usageError('-c FILE is required: the cluster YAML');
  if (v.detach && v.nbdtab) throw usageError('--detach and --nbdtab do not go together');
  const int = (name, text, ok, expected) => {
    const n = /^\d+$/.test(text) ? Number(text) : NaN;
    if (!ok(n)) throw usageError(`--${name} ${JSON.stringify(text)}: expected ${expected}`);
    return n;
  };
  const opts = {
    config: v.config,
    ss: v.ss === undefined ? undefined : int('ss', v.ss, (n) => Number.isSafeInteger(n) && n > 0, 'a storage system id'),
    mirrors: v.mirrors ?? false,
    connections:
      v.connections === undefined
        ? undefined
        : int('connections', v.connections, (n) => n >= 1 && n <= MAX_CONNECTIONS, `1 to ${MAX_CONNECTIONS}`),
    blockSize: v['block-size'] === undefined ? 4096 : int('block-size', v['block-size'], (n) => BLOCK_SIZES.includes(n), BLOCK_SIZES.join(', ')),
    host: v.host,
    dryRun: v['dry-run'] ?? false,
    detach: v.detach ?? false,
    nbdtab: v.nbdtab ?? false,
    state: v.state ?? (process.env.BM_STATE_FILE || DEFAULT_STATE),
  };
  if (opts.host !== undefined && !/^(?:[A-Za-z0-9.-]+|\[?[0-9A-Fa-f:.]+\]?)$/.test(opts.host)) throw usageError(`--host ${JSON.stringify(opts.host)}: expected a host name or address`);
  if (opts.host !== undefined) opts.host = opts.host.replace(/^\[(.*)\]$/, '$1');
  return opts;
}

// ---------------------------------------------------------------------------------------------
// The cluster: which exports a host sees.

const hostPort = (host, port) => (host.includes(':') ? `[${host}]:${port}` : `${host}:${port}`);

/** The exports to attach, in file order: storage systems, then their volumes. */
function exportsOf(cfg, opts) {
  if (opts.ss !== undefined && !cfg.storageSystems.some((s) => s.id === opts.ss)) {
    const ids = cfg.storageSystems.map((s) => s.id).join(', ');
    throw new Failure(`${cfg.source}: there is no storage system ${opts.ss} (it has ${ids})`);
  }
  const roles = new Map();
  for (const p of cfg.pairs) {
    roles.set(`${p.master.ss}/${p.master.vol}`, { role: 'master', pair: p.name });
    for (const m of p.mirrors) roles.set(`${m.ss}/${m.vol}`, { role: 'mirror', pair: p.name });
  }
  const out = [];
  for (const ss of cfg.storageSystems) {
    if (opts.ss !== undefined && ss.id !== opts.ss) continue;
    for (const vol of ss.volumes) {
      const { role, pair } = roles.get(`${ss.id}/${vol.id}`) ?? { role: 'simplex' };
      if (role === 'mirror' && !opts.mirrors) continue;
      if (ss.nbd.port === 0) throw new Failure(`${cfg.source}: storage system ${ss.id} listens on port 0 (any free port), so a host cannot know where to attach`);
      out.push({ ss: ss.id, vol: vol.id, name: `vol${vol.id}`, host: opts.host ?? ss.nbd.host, port: ss.nbd.port, role, pair, readOnly: role === 'mirror' });
    }
  }
  if (out.length === 0) {
    const which = opts.ss === undefined ? '' : ` of storage system ${opts.ss}`;
    throw new Failure(`${cfg.source}: no export${which} to attach${opts.mirrors ? '' : ' (mirrors need --mirrors)'}`);
  }
  return out;
}

function describeRole(e) {
  if (e.role === 'master') return `master of ${e.pair}`;
  if (e.role === 'mirror') return `mirror of ${e.pair}, read-only unless the pair is split`;
  return 'simplex volume';
}

// ---------------------------------------------------------------------------------------------
// nbdtab(5): "<device> <host> <export> [opt,opt=val,...]". nbd-client 3.24 knows port, bs, conns,
// timeout, the TLS files and a few flags, but no read-only one: the kernel still makes a mirror's
// device read-only, since the export advertises READ_ONLY.
// Beware: nbd-client before 3.26 reads port= but never uses it (fixed upstream by 915444bc, "fix port
// setting from nbdtab"), so 3.24 (Debian 12) connects every nbdtab line to port 10809.

const NBD_DEFAULT_PORT = 10809;

function nbdtab(cfg, exports, opts) {
  const rows = exports.map((e, i) => {
    const options = [`port=${e.port}`, `bs=${opts.blockSize}`];
    if (opts.connections !== undefined) options.push(`conns=${opts.connections}`);
    return { comment: `# ss${e.ss} ${e.name}: ${describeRole(e)}`, fields: [`nbd${i}`, e.host, e.name, options.join(',')] };
  });
  const widths = [0, 1, 2].map((k) => Math.max(...rows.map((r) => r.fields[k].length), ['# <device>', '<host>', '<export>'][k].length));
  const line = (fields) => fields.map((f, k) => (k < 3 ? f.padEnd(widths[k]) : f)).join('  ');
  const out = [
    `# /etc/nbdtab for ${cfg.source}, from targets/attach --nbdtab (see nbdtab(5) and targets/README.md)`,
    '# `nbd-client nbd0` attaches the device nbd0 as listed here, `nbd-client -d /dev/nbd0` detaches it.',
  ];
  if (exports.some((e) => e.port !== NBD_DEFAULT_PORT)) {
    out.push(`# port= needs nbd-client 3.26 or later: older ones (3.24 in Debian 12) ignore it and connect to ${NBD_DEFAULT_PORT}.`);
  }
  out.push(line(['# <device>', '<host>', '<export>', '<options>']));
  for (const r of rows) out.push(r.comment, line(r.fields));
  return out.join('\n') + '\n';
}

/** The installed nbd-client's version as [major, minor], if there is one and it says. */
function nbdClientVersion() {
  let bin;
  try {
    bin = findExecutable('nbd-client', 'BM_NBD_CLIENT');
  } catch {
    return undefined;
  }
  if (!bin) return undefined;
  const r = runTool(bin, ['-V']);
  const m = /from nbd (\d+)\.(\d+)/.exec(r.output ?? '');
  return m ? [Number(m[1]), Number(m[2])] : undefined;
}

// ---------------------------------------------------------------------------------------------
// The host: nbd devices, nbd-client, state.

const sysfsBlock = () => process.env.BM_SYSFS_BLOCK || '/sys/block';

function readTrim(file) {
  try {
    return fs.readFileSync(file, 'utf8').trim();
  } catch {
    return undefined;
  }
}

/** /sys/block/nbdN, in number order. Connected: the kernel has a pid file for it, or a size. */
function nbdDevices() {
  let names;
  try {
    names = fs.readdirSync(sysfsBlock());
  } catch {
    return [];
  }
  return names
    .map((n) => /^nbd(\d+)$/.exec(n))
    .filter(Boolean)
    .map((m) => ({ name: m[0], index: Number(m[1]) }))
    .sort((a, b) => a.index - b.index)
    .map((d) => ({ ...d, device: `/dev/${d.name}`, ...deviceState(d.name) }));
}

function deviceState(name) {
  const dir = path.join(sysfsBlock(), name);
  const pid = readTrim(path.join(dir, 'pid'));
  const size = Number(readTrim(path.join(dir, 'size')) ?? 0);
  return { connected: pid !== undefined || size > 0, pid: pid ?? null };
}

function findExecutable(name, envVar) {
  const given = process.env[envVar];
  if (given) {
    try {
      fs.accessSync(given, fs.constants.X_OK);
      return given;
    } catch {
      throw new Failure(`${envVar}=${given} is not an executable file`);
    }
  }
  // /sbin and /usr/sbin are often missing from a non-root PATH; nbd-client lives there.
  const dirs = [...(process.env.PATH ?? '').split(':').filter(Boolean), '/usr/sbin', '/sbin'];
  for (const d of dirs) {
    const p = path.join(d, name);
    try {
      fs.accessSync(p, fs.constants.X_OK);
      if (fs.statSync(p).isFile()) return p;
    } catch {
      // not here
    }
  }
  return undefined;
}

function nbdClient() {
  const bin = findExecutable('nbd-client', 'BM_NBD_CLIENT');
  if (!bin) throw new Failure('nbd-client not found (Debian/Ubuntu: apt-get install nbd-client; Fedora: dnf install nbd)');
  return bin;
}

/**
 * Runs a command to completion; its output goes to a temporary file rather than a pipe, so that
 * a child it leaves behind (nbd-client in ioctl mode stays as the device's daemon) cannot hold us.
 */
function runTool(bin, args) {
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'bm-attach-'));
  const log = path.join(tmp, 'out');
  const fd = fs.openSync(log, 'w');
  try {
    const r = spawnSync(bin, args, { stdio: ['ignore', fd, fd] });
    const output = fs.readFileSync(log, 'utf8');
    if (r.error) return { ok: false, why: r.error.message };
    const last = output.split('\n').map((l) => l.trim()).filter(Boolean).pop();
    const status = r.status === null ? `killed by ${r.signal}` : `exit ${r.status}`;
    return { ok: r.status === 0, why: last ? `${last} (${status})` : status, output };
  } finally {
    fs.closeSync(fd);
    fs.rmSync(tmp, { recursive: true, force: true });
  }
}

function readState(file) {
  let text;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (e) {
    if (e.code === 'ENOENT') return { version: 1, attached: [] };
    throw new Failure(`cannot read the state file ${file}: ${e.message}`);
  }
  try {
    const s = JSON.parse(text);
    if (!s || !Array.isArray(s.attached)) throw new Error('no "attached" list');
    return s;
  } catch (e) {
    throw new Failure(`the state file ${file} is damaged (${e.message}); check \`nbd-client -c /dev/nbdX\` by hand, then delete it`);
  }
}

function writeState(file, state) {
  try {
    fs.mkdirSync(path.dirname(file), { recursive: true });
    const tmp = `${file}.${process.pid}.tmp`;
    fs.writeFileSync(tmp, JSON.stringify(state, null, 2) + '\n');
    fs.renameSync(tmp, file);
  } catch (e) {
    throw new Failure(`cannot write the state file ${file}: ${e.message}`);
  }
}

const quote = (a) => (/^[A-Za-z0-9_./:=@%+,-]+$/.test(a) ? a : `'${a.replace(/'/g, `'\\''`)}'`);
const commandLine = (args) => ['nbd-client', ...args].map(quote).join(' ');
const sameExport = (r, configPath, e) => r.config === configPath && r.ss === e.ss && r.export === e.name;

// ---------------------------------------------------------------------------------------------
// The three jobs.

async function attach(opts) {
  const cfg = await loadCluster(opts.config);
  const exports = exportsOf(cfg, opts);
  if (opts.nbdtab) {
    process.stdout.write(nbdtab(cfg, exports, opts));
    const v = nbdClientVersion();
    const odd = exports.find((e) => e.port !== NBD_DEFAULT_PORT);
    if (odd && v && (v[0] < 3 || (v[0] === 3 && v[1] < 26))) {
      process.stderr.write(
        `${PROG}: warning: this host's nbd-client ${v.join('.')} ignores port= in /etc/nbdtab and would connect ` +
          `${odd.name} of ss${odd.ss} to port ${NBD_DEFAULT_PORT}, not ${odd.port}: use targets/attach (or its systemd unit) instead\n`,
      );
    }
    return 0;
  }
  const configPath = path.resolve(opts.config);
  const bin = opts.dryRun ? undefined : nbdClient();
  const print = (line) => process.stdout.write(line + '\n');

  let devices = nbdDevices();
  if (devices.length === 0) {
    if (opts.dryRun) {
      print('modprobe nbd');
      devices = Array.from({ length: DEFAULT_NBDS_MAX }, (_, i) => ({ name: `nbd${i}`, index: i, device: `/dev/nbd${i}`, connected: false, pid: null }));
    } else {
      const modprobe = findExecutable('modprobe', 'BM_MODPROBE');
      if (!modprobe) throw new Failure('no /dev/nbd devices and no modprobe to load the nbd module');
      const r = runTool(modprobe, ['nbd']);
      if (!r.ok) throw new Failure(`no /dev/nbd devices and \`modprobe nbd\` failed: ${r.why}`);
      devices = nbdDevices();
      if (devices.length === 0) throw new Failure(`\`modprobe nbd\` succeeded but ${sysfsBlock()} has no nbd devices`);
    }
  }

  // What an earlier run attached and is still connected stays; stale records go.
  const state = readState(opts.state);
  const byName = new Map(devices.map((d) => [d.device, d]));
  const live = state.attached.filter((r) => {
    const d = byName.get(r.device);
    return d?.connected && (r.pid == null || d.pid == null || r.pid === d.pid);
  });
  const stale = state.attached.length - live.length;

  const plan = exports.map((e) => ({ e, had: live.find((r) => sameExport(r, configPath, e)) }));
  const todo = plan.filter((p) => !p.had);
  const free = devices.filter((d) => !d.connected && !live.some((r) => r.device === d.device));
  if (todo.length > free.length) {
    const need = todo.length - free.length;
    throw new Failure(
      `no free /dev/nbd device for ${todo.slice(free.length).map(({ e }) => `ss${e.ss} ${e.name}`).join(', ')}: ` +
        `${free.length} of ${devices.length} free, ${need} more needed (reload the module with a larger nbds_max, or detach some)`,
    );
  }
  todo.forEach((p, i) => (p.dev = free[i]));

  const next = { version: 1, attached: live };
  if (stale > 0 && !opts.dryRun) writeState(opts.state, next);
  let failed = 0;
  for (const { e, had, dev } of plan) {
    if (failed > 0) break;
    if (had) {
      print(`${opts.dryRun ? '# ' : ''}${e.name} ss${e.ss} ${hostPort(e.host, e.port)} -> ${had.device} (already attached)`);
      continue;
    }
    const args = [e.host, String(e.port), dev.device, '-N', e.name, '-b', String(opts.blockSize)];
    if (opts.connections !== undefined) args.push('-C', String(opts.connections));
    if (e.readOnly) args.push('-R');
    if (opts.dryRun) {
      print(commandLine(args));
      continue;
    }
    const r = runTool(bin, args);
    if (!r.ok) {
      failed++;
      process.stderr.write(`${PROG}: nbd-client failed for ${e.name} of ss${e.ss} at ${hostPort(e.host, e.port)} on ${dev.device}: ${r.why}\n`);
      continue;
    }
    next.attached.push({
      config: configPath,
      ss: e.ss,
      export: e.name,
      host: e.host,
      port: e.port,
      device: dev.device,
      readOnly: e.readOnly,
      pid: deviceState(dev.name).pid,
      at: new Date().toISOString(),
    });
    writeState(opts.state, next);
    print(`${e.name} ss${e.ss} ${hostPort(e.host, e.port)} -> ${dev.device}${e.readOnly ? ' (read-only)' : ''}`);
  }
  if (failed > 0) {
    process.stderr.write(`${PROG}: stopped; what was attached is recorded in ${opts.state} (detach it with --detach)\n`);
    return 1;
  }
  return 0;
}

/** Detaches from the state file alone, so it works even when the YAML has since changed or gone. */
function detach(opts) {
  const configPath = path.resolve(opts.config);
  const state = readState(opts.state);
  const mine = state.attached.filter((r) => r.config === configPath && (opts.ss === undefined || r.ss === opts.ss));
  if (mine.length === 0) {
    process.stderr.write(`${PROG}: nothing recorded as attached for ${opts.config}${opts.ss === undefined ? '' : ` ss${opts.ss}`} in ${opts.state}\n`);
    return 0;
  }
  const bin = opts.dryRun ? undefined : nbdClient();
  const keep = state.attached.filter((r) => !mine.includes(r));
  let failed = 0;
  for (const r of mine) {
    const label = `${r.export} ss${r.ss} ${r.device}`;
    if (opts.dryRun) {
      process.stdout.write(commandLine(['-d', r.device]) + '\n');
      continue;
    }
    const now = deviceState(path.basename(r.device));
    if (!now.connected) {
      process.stdout.write(`${label} was no longer connected\n`);
      continue;
    }
    if (r.pid != null && now.pid != null && r.pid !== now.pid) {
      // Disconnected and since attached again by someone else: not ours to take down.
      process.stdout.write(`${label} now belongs to another connection (pid ${now.pid}, not ${r.pid}); left alone\n`);
      continue;
    }
    const res = runTool(bin, ['-d', r.device]);
    if (res.ok) {
      process.stdout.write(`${label} detached\n`);
    } else {
      failed++;
      keep.push(r);
      process.stderr.write(`${PROG}: nbd-client -d ${r.device} failed: ${res.why}\n`);
    }
  }
  if (!opts.dryRun) writeState(opts.state, { version: 1, attached: keep });
  return failed > 0 ? 1 : 0;
}

async function main(argv) {
  const opts = parseOptions(argv);
  if (opts.help) {
    process.stdout.write(USAGE + '\n');
    return 0;
  }
  return opts.detach ? detach(opts) : attach(opts);
}

try {
  process.exitCode = await main(process.argv.slice(2));
} catch (e) {
  if (!(e instanceof Failure)) throw e;
  process.stderr.write(`${PROG}: ${e.message}\n`);
  process.exitCode = e.code;
}

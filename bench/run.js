#!/usr/bin/env node
// blockmirror vs nbdkit, measured with fio's nbd engine. See bench/README.md.
//
//   npm run bench:nbd                     # all of this file's jobs, writes bench/RESULTS.md
//   BENCH_REPS=3 BENCH_RUNTIME=3 npm run bench:nbd
//   node bench/run.js --only memory-tcp,randread-4k-qd1 --cpu-prof bench/out/prof
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { JOBS, fioArgs, runFio, uriFor } from './lib/fio.js';
import { clockTicks, codeInfo, loadAvg, machineInfo, newestMtime } from './lib/machine.js';
import { freePort, installCleanup, NODE_FLAGS, onExit, readCpuSeconds, readMemory, run, startServer } from './lib/proc.js';
import { readNotes, renderConsole, renderResults } from './lib/report.js';
import { max, median, min } from './lib/stats.js';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const ROOT = path.resolve(HERE, '..');
const BIN = path.join(ROOT, 'bin', 'blockmirror.js');
const EXPORT_SIZE = { ours: '1GiB', nbdkit: '1G', bytes: 2 ** 30, label: '1 GiB' };
const RSS_WRITE = '64M';
const RSS_GOAL = 150 * 2 ** 20;

const SECTIONS = [
  { id: 'memory-tcp', backend: 'memory', transport: 'tcp' },
  { id: 'memory-unix', backend: 'memory', transport: 'unix' },
  { id: 'file-tcp', backend: 'file', transport: 'tcp' },
];

const HELP = `usage: node bench/run.js [options]   (npm run bench:nbd builds first)

  --reps N        interleaved repetitions per job        (BENCH_REPS, default 5)
  --runtime S     seconds per timed run                  (BENCH_RUNTIME, default 5)
  --ramp S        ramp seconds before each timed run     (BENCH_RAMP, default 1)
  --size SIZE     fio region inside the 1 GiB export     (BENCH_SIZE, default 256M)
  --only LIST     comma-separated sections (${SECTIONS.map((s) => s.id).join(', ')}, rss)
                  and/or jobs (${JOBS.map((j) => j.id).join(', ')})   (BENCH_ONLY)
  --out FILE      where to write the results             (BENCH_OUT, default bench/RESULTS.md)
  --cpu-prof DIR  run our server under node --cpu-prof, profiles into DIR (BENCH_CPU_PROF)
  --from-json F   measure nothing: re-render the results file from a saved run (bench/out/last-run.json)
  --help

A partial run (--only) or a profiled run writes no results file unless --out is given.
`;

function options() {
  const { values } = parseArgs({
    options: {
      reps: { type: 'string' },
      runtime: { type: 'string' },
      ramp: { type: 'string' },
      size: { type: 'string' },
      only: { type: 'string' },
      out: { type: 'string' },
      'cpu-prof': { type: 'string' },
      'from-json': { type: 'string' },
      help: { type: 'boolean' },
    },
  });
  if (values.help) {
    process.stdout.write(HELP);
    process.exit(0);
  }
  const env = process.env;
  const num = (name, v, def) => {
    if (v === undefined || v === '') return def;
    const n = Number(v);
    if (!(Number.isFinite(n) && n > 0)) throw new Error(`${name} must be a positive number, got "${v}"`);
    return n;
  };
  const only = (values.only ?? env.BENCH_ONLY ?? '')
    .split(',')
    .map((x) => x.trim())
    .filter(Boolean);
  const known = new Set([...SECTIONS.map((s) => s.id), 'rss', ...JOBS.map((j) => j.id)]);
  for (const t of only) if (!known.has(t)) throw new Error(`--only: unknown "${t}" (known: ${[...known].join(', ')})`);
  const outGiven = values.out ?? env.BENCH_OUT;
  const cpuProf = values['cpu-prof'] ?? env.BENCH_CPU_PROF;
  return {
    reps: Math.round(num('reps', values.reps ?? env.BENCH_REPS, 5)),
    runtime: num('runtime', values.runtime ?? env.BENCH_RUNTIME, 5),
    ramp: num('ramp', values.ramp ?? env.BENCH_RAMP, 1),
    size: values.size ?? env.BENCH_SIZE ?? '256M',
    only,
    cpuProf: cpuProf ? path.resolve(cpuProf) : undefined,
    // A partial or profiled run must not overwrite the recorded full results by accident.
    fromJson: values['from-json'],
    out: outGiven ? path.resolve(outGiven) : only.length === 0 && !cpuProf ? path.join(HERE, 'RESULTS.md') : undefined,
  };
}

function selected(opts) {
  const sectionTokens = opts.only.filter((t) => SECTIONS.some((s) => s.id === t) || t === 'rss');
  const jobTokens = opts.only.filter((t) => JOBS.some((j) => j.id === t));
  return {
    sections: SECTIONS.filter((s) => sectionTokens.length === 0 || sectionTokens.includes(s.id)),
    rss: sectionTokens.length === 0 || sectionTokens.includes('rss'),
    jobs: JOBS.filter((j) => jobTokens.length === 0 || jobTokens.includes(j.id)),
  };
}

const log = (msg) => process.stderr.write(`${msg}\n`);

let profSeq = 0;
function oursCommand(opts, section, endpoint, file) {
  const nodeArgs = [];
  if (opts.cpuProf) {
    nodeArgs.push('--cpu-prof', `--cpu-prof-dir=${opts.cpuProf}`, `--cpu-prof-name=ours-${section}-${++profSeq}-${process.pid}.cpuprofile`);
  }
  const args = [...NODE_FLAGS, ...nodeArgs, BIN, 'serve', '--size', EXPORT_SIZE.ours, '--log-level', 'warn'];
  if (endpoint.kind === 'tcp') args.push('--listen', `${endpoint.host}:${endpoint.port}`);
  else args.push('--socket', endpoint.path);
  if (file) args.push('--file', file);
  return [process.execPath, args];
}

function nbdkitCommand(endpoint, file) {
  const args = ['-f', '--exit-with-parent'];
  if (endpoint.kind === 'tcp') args.push('-i', endpoint.host, '-p', String(endpoint.port));
  else args.push('-U', endpoint.path);
  if (file) args.push('file', file);
  else args.push('memory', EXPORT_SIZE.nbdkit);
  return ['nbdkit', args];
}

let endpointSeq = 0;
async function endpointFor(transport, dir, who) {
  return transport === 'tcp'
    ? { kind: 'tcp', host: '127.0.0.1', port: await freePort() }
    : { kind: 'unix', path: path.join(dir, `${who}-${++endpointSeq}.sock`) };
}

/** fio against one server, with that server's CPU time over the run. */
async function measure(server, job, opts, clkTck) {
  const args = fioArgs({ name: job.id, uri: uriFor(server.endpoint), rw: job.rw, bs: job.bs, iodepth: job.iodepth, size: opts.size, runtime: opts.runtime, ramp: opts.ramp });
  const cpu0 = readCpuSeconds(server.pid, clkTck);
  const t0 = process.hrtime.bigint();
  let res;
  try {
    res = await runFio(args, { timeoutMs: (opts.runtime + opts.ramp + 60) * 1000 });
  } catch (e) {
    throw new Error(`${server.label} (${server.describeExit()}): ${e.message}\n--- ${server.label} output ---\n${server.output()}`);
  }
  const wall = Number(process.hrtime.bigint() - t0) / 1e9;
  const cpu = readCpuSeconds(server.pid, clkTck) - cpu0;
  if (!server.alive()) throw new Error(`${server.label} ${server.describeExit()} during ${job.id}:\n${server.output()}`);
  // CPU is sampled over the whole fio run (connect, ramp, timed window): scale it to the timed window.
  const ops = res.iops * res.seconds;
  return {
    value: job.unit === 'IOPS' ? res.iops : res.bwMiB,
    clatUs: res.clatUs,
    cpuFrac: cpu / wall,
    cpuPerOpUs: ops > 0 ? (cpu * 1e6 * (res.seconds / wall)) / ops : NaN,
  };
}

async function prefill(server, opts) {
  const args = fioArgs({ name: 'prefill', uri: uriFor(server.endpoint), rw: 'write', bs: '1M', iodepth: 8, size: opts.size });
  try {
    await runFio(args, { timeoutMs: 300000 });
  } catch (e) {
    throw new Error(`pre-fill of ${server.label} (${server.describeExit()}): ${e.message}\n--- ${server.label} output ---\n${server.output()}`);
  }
}

function fsyncFile(file) {
  const fd = fs.openSync(file, 'r+');
  try {
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

const DIST = path.join(ROOT, 'dist');
let distStamp = 0;
const rebuilt = [];

/** Servers load dist/ when they start: note it when a section starts on a different build than the run did. */
function checkDist(what) {
  const now = newestMtime(DIST);
  if (now !== distStamp) {
    rebuilt.push(`dist/ was rebuilt (${new Date(now).toISOString().slice(11, 19)} UTC) before ${what} started`);
    log(`warning: ${rebuilt[rebuilt.length - 1]}`);
    distStamp = now;
  }
}

/**
 * On a shared machine a run can fail for reasons that are not ours (a
 * connection cut, a server killed from outside): retry it, and say so in
 * the results rather than losing a 15-minute run.
 */
const incidents = [];
async function withRetry(what, fn, attempts = 3) {
  for (let attempt = 1; ; attempt++) {
    try {
      return await fn();
    } catch (e) {
      const first = String(e instanceof Error ? e.message : e).split('\n').slice(0, 2).join(' / ');
      if (attempt >= attempts) throw e;
      incidents.push(`${what}: attempt ${attempt} failed (${first.slice(0, 240)}); retried`);
      log(`warning: ${incidents[incidents.length - 1]}`);
      await new Promise((r) => setTimeout(r, 1000));
    }
  }
}

/**
 * Start one server on a new endpoint. A TCP port from freePort() can be taken
 * by someone else before the server binds it, and then the readiness probe
 * would be answered by a stranger: so the server must still be running a
 * moment after the probe, or we try again on another port.
 */
async function startFresh(who, section, opts, tmp, file) {
  return withRetry(`${section.id} start ${who}`, async () => {
    const ep = await endpointFor(section.transport, tmp, who);
    const [cmd, args] = who === 'ours' ? oursCommand(opts, section.id, ep, file) : nbdkitCommand(ep, file);
    const s = await startServer(who, cmd, args, ep);
    await new Promise((r) => setTimeout(r, 200));
    if (!s.alive()) throw new Error(`${who} ${s.describeExit()} right after it looked ready:\n${s.output()}`);
    return s;
  });
}

async function runSection(section, jobs, opts, tmp, clkTck) {
  log(`\n== ${section.id} ==`);
  checkDist(section.id);
  let oursFile;
  let nbdkitFile;
  if (section.backend === 'file') {
    // Same directory, same filesystem, same preallocation: the only difference is the server.
    oursFile = path.join(tmp, 'ours.img');
    nbdkitFile = path.join(tmp, 'nbdkit.img');
    for (const f of [oursFile, nbdkitFile]) {
      fs.rmSync(f, { force: true });
      const r = await run('fallocate', ['-l', String(EXPORT_SIZE.bytes), f]);
      if (r.code !== 0) throw new Error(`fallocate ${f}: ${r.stderr}`);
    }
  }
  const files = { ours: oursFile, nbdkit: nbdkitFile };
  const servers = [];
  /** Fresh server on a fresh endpoint, pre-filled. Also used to replace one that died mid-section. */
  const launch = async (who) => {
    const s = await startFresh(who, section, opts, tmp, files[who]);
    try {
      await prefill(s, opts);
      if (files[who]) fsyncFile(files[who]);
    } catch (e) {
      await s.stop();
      throw e;
    }
    return s;
  };
  try {
    log(`starting servers, pre-fill: ${opts.size} sequential writes on each`);
    for (const who of ['ours', 'nbdkit']) servers.push(await launch(who));

    const rows = [];
    for (const job of jobs) {
      const samples = [];
      for (let rep = 1; rep <= opts.reps; rep++) {
        const pair = {};
        for (let i = 0; i < servers.length; i++) {
          pair[servers[i].label] = await withRetry(`${section.id} ${job.id} rep ${rep} ${servers[i].label}`, async () => {
            if (!servers[i].alive()) {
              incidents.push(`${section.id}: ${servers[i].label} ${servers[i].describeExit()} between runs; restarted and pre-filled before ${job.id} rep ${rep}`);
              log(`warning: ${incidents[incidents.length - 1]}`);
              servers[i] = await launch(servers[i].label);
            }
            return measure(servers[i], job, opts, clkTck);
          });
        }
        pair.ratio = pair.ours.value / pair.nbdkit.value;
        samples.push(pair);
        log(
          `[${section.id}] ${job.id} rep ${rep}/${opts.reps}: ours ${pair.ours.value.toFixed(1)} nbdkit ${pair.nbdkit.value.toFixed(1)} ` +
            `${job.unit} ratio ${pair.ratio.toFixed(2)} (cpu ${(pair.ours.cpuFrac * 100).toFixed(0)}% / ${(pair.nbdkit.cpuFrac * 100).toFixed(0)}%)`,
        );
      }
      const ratios = samples.map((x) => x.ratio);
      const goal = job.goal[section.backend];
      const ratio = median(ratios);
      rows.push({
        section,
        job,
        samples,
        oursMedian: median(samples.map((x) => x.ours.value)),
        nbdkitMedian: median(samples.map((x) => x.nbdkit.value)),
        ratio,
        ratioMin: min(ratios),
        ratioMax: max(ratios),
        oursCpu: median(samples.map((x) => x.ours.cpuFrac)),
        nbdkitCpu: median(samples.map((x) => x.nbdkit.cpuFrac)),
        oursCpuPerOp: median(samples.map((x) => x.ours.cpuPerOpUs)),
        nbdkitCpuPerOp: median(samples.map((x) => x.nbdkit.cpuPerOpUs)),
        goal,
        met: ratio >= goal,
      });
    }
    return rows;
  } finally {
    for (const s of servers) {
      const wasAlive = s.alive();
      const res = await s.stop();
      if (wasAlive && s.label === 'ours' && res.code !== 0) log(`warning: ours exited with ${res.signal ?? `code ${res.code}`} on SIGTERM:\n${s.output()}`);
    }
    for (const f of [oursFile, nbdkitFile]) if (f) fs.rmSync(f, { force: true });
  }
}

async function measureRss(opts, tmp) {
  log('\n== rss ==');
  checkDist('rss');
  const out = {};
  for (const who of ['ours', 'nbdkit']) {
    const s = await startFresh(who, { id: 'rss', transport: 'tcp' }, opts, tmp);
    try {
      const idle = readMemory(s.pid);
      await runFio(fioArgs({ name: 'rss', uri: uriFor(s.endpoint), rw: 'write', bs: '1M', iodepth: 8, size: RSS_WRITE }), { timeoutMs: 120000 });
      // Let the last replies and socket buffers settle before reading.
      await new Promise((r) => setTimeout(r, 1000));
      const after = readMemory(s.pid);
      out[who] = { idle, after };
      log(`${who}: idle ${(idle.rss / 2 ** 20).toFixed(1)} MiB, after ${RSS_WRITE} ${(after.rss / 2 ** 20).toFixed(1)} MiB (HWM ${(after.hwm / 2 ** 20).toFixed(1)} MiB)`);
    } finally {
      await s.stop();
    }
  }
  return { ...out, goalBytes: RSS_GOAL };
}

async function main() {
  installCleanup();
  const opts = options();
  if (opts.fromJson) {
    const saved = JSON.parse(fs.readFileSync(opts.fromJson, 'utf8'));
    const out = opts.out ?? path.join(HERE, 'RESULTS.md');
    fs.writeFileSync(out, renderResults(saved, readNotes(out)));
    log(renderConsole(saved) + `\n\nwrote ${out} from ${opts.fromJson}`);
    return;
  }
  const sel = selected(opts);
  if (!fs.existsSync(path.join(ROOT, 'dist', 'cli', 'main.js'))) throw new Error('dist/ is missing: run `npm run build` (or `npm run bench:nbd`)');
  // `npm run bench` rebuilds the TypeScript only; a stale addon would measure old file-backend code (or fail).
  const addon = path.join(ROOT, 'native', 'build', 'Release', 'sparse.node');
  const addonSrc = path.join(ROOT, 'native', 'sparse.c');
  if (fs.existsSync(addonSrc) && (!fs.existsSync(addon) || fs.statSync(addon).mtimeMs < fs.statSync(addonSrc).mtimeMs)) {
    log('warning: native/build/Release/sparse.node is older than native/sparse.c: run `npm run build:native`');
  }
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'blockmirror-bench-'));
  onExit(() => fs.rmSync(tmp, { recursive: true, force: true }));
  if (opts.cpuProf) fs.mkdirSync(opts.cpuProf, { recursive: true });

  const started = Date.now();
  distStamp = newestMtime(DIST);
  const result = {
    date: new Date().toISOString().replace(/\.\d+Z$/, 'Z'),
    machine: machineInfo(),
    code: codeInfo(ROOT),
    rebuilt,
    incidents,
    loadStart: loadAvg(),
    settings: { reps: opts.reps, runtime: opts.runtime, ramp: opts.ramp, size: opts.size, exportSize: EXPORT_SIZE.label },
    rows: [],
    rss: undefined,
  };
  log(`blockmirror bench: ${opts.reps} reps x ${opts.runtime} s (+${opts.ramp} s ramp), region ${opts.size}; temp dir ${tmp}`);
  const clkTck = clockTicks();
  for (const section of sel.sections) result.rows.push(...(await runSection(section, sel.jobs, opts, tmp, clkTck)));
  if (sel.rss) result.rss = await measureRss(opts, tmp);
  result.loadEnd = loadAvg();
  result.wallMinutes = (Date.now() - started) / 60000;

  log('\n' + renderConsole(result));
  const rawDir = path.join(HERE, 'out');
  fs.mkdirSync(rawDir, { recursive: true });
  // A quick partial run must not clobber the raw data behind the recorded results.
  const raw = path.join(rawDir, opts.out ? 'last-run.json' : 'last-partial-run.json');
  fs.writeFileSync(raw, JSON.stringify(result, null, 2));
  const rawRel = path.relative(process.cwd(), raw) || raw;
  if (opts.out) {
    fs.writeFileSync(opts.out, renderResults(result, readNotes(opts.out)));
    log(`\nwrote ${path.relative(process.cwd(), opts.out) || opts.out} (raw samples: ${rawRel})`);
  } else {
    log(`\npartial or profiled run: results file left alone (raw samples: ${rawRel})`);
  }
  if (opts.cpuProf) log(`profiles in ${opts.cpuProf}; summarise with: node bench/lib/cpuprofile.js FILE`);
}

main().then(
  () => process.exit(0),
  (err) => {
    log(`bench: ${err instanceof Error ? err.message : String(err)}`);
    process.exit(1);
  },
);

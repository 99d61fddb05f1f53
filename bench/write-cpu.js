#!/usr/bin/env node
// Server CPU per GiB written, two builds side by side: a fixed amount of fio writes (not a fixed
// time) into a `blockmirror serve` memory export of each build, interleaved A B B A, so the
// figure holds on a loaded machine where throughput ratios are set by scheduling. Used for the
// zero-copy WRITE change (issue 18: payloads read straight into the memory store's pages).
//
//   node bench/write-cpu.js --baseline DIR     # before = DIR (another built checkout), after = this one
//   BENCH_REPS=2 BENCH_GIB=1 node bench/write-cpu.js --baseline DIR     # shorter
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { clockTicks, loadAvg } from './lib/machine.js';
import { freePort, installCleanup, NODE_FLAGS, readCpuSeconds, readMemory, startServer } from './lib/proc.js';
import { fioArgs, runFio, uriFor } from './lib/fio.js';
import { median } from './lib/stats.js';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const AFTER = path.resolve(HERE, '..');
const USAGE = 'usage: node bench/write-cpu.js --baseline DIR   (DIR: another built checkout; BENCH_REPS, BENCH_GIB)\n';
const argv = process.argv.slice(2);
if (argv.includes('--help')) {
  process.stdout.write(USAGE);
  process.exit(0);
}
const at = argv.indexOf('--baseline');
const BEFORE = at >= 0 ? argv[at + 1] : undefined;
if (!BEFORE || argv.length !== 2) {
  process.stderr.write(`bench/write-cpu.js: --baseline DIR is required, and nothing else\n${USAGE}`);
  process.exit(2);
}
const REPS = Number(process.env.BENCH_REPS ?? 3);
const GIB = Number(process.env.BENCH_GIB ?? 2);
const TICK = clockTicks();
installCleanup();

const JOBS = [
  { id: '1M seq write QD8', rw: 'write', bs: '1M', iodepth: 8, bytes: GIB * 1024 },
  { id: '4k rand write QD16', rw: 'randwrite', bs: '4k', iodepth: 16, bytes: Math.max(64, GIB * 64) },
];

async function start(dir) {
  const port = await freePort();
  const ep = { kind: 'tcp', host: '127.0.0.1', port };
  const args = [...NODE_FLAGS, path.join(dir, 'bin', 'blockmirror.js'), 'serve', '--size', '1GiB', '--log-level', 'warn', '--listen', `127.0.0.1:${port}`];
  const s = await startServer(dir, process.execPath, args, ep);
  // Written once over the fio region, as bench/run.js pre-fills: the timed writes overwrite pages.
  await runFio(fioArgs({ name: 'prefill', uri: uriFor(ep), rw: 'write', bs: '1M', iodepth: 8, size: '256M' }), { timeoutMs: 300_000 });
  return { s, ep };
}

const servers = { before: await start(BEFORE), after: await start(AFTER) };
const rows = [];
process.stderr.write(`load at start ${loadAvg()}\n`);
for (const job of JOBS) {
  const cpu = { before: [], after: [] };
  const speed = { before: [], after: [] };
  for (let rep = 0; rep < REPS; rep++) {
    for (const who of ['before', 'after', 'after', 'before']) {
      const { s, ep } = servers[who];
      const args = fioArgs({ name: job.id, uri: uriFor(ep), rw: job.rw, bs: job.bs, iodepth: job.iodepth, size: '256M' });
      args.push(`--io_size=${job.bytes}M`);
      const c0 = readCpuSeconds(s.pid, TICK);
      const r = await runFio(args, { timeoutMs: 600_000 });
      const c1 = readCpuSeconds(s.pid, TICK);
      cpu[who].push(((c1 - c0) * 1024) / (r.ioBytes / 2 ** 20));
      speed[who].push(job.rw === 'write' ? r.bwMiB : r.iops);
      process.stderr.write(`${job.id} ${who}: ${cpu[who].at(-1).toFixed(3)} s CPU per GiB, ${speed[who].at(-1).toFixed(0)} ${job.rw === 'write' ? 'MiB/s' : 'IOPS'} (load ${loadAvg()})\n`);
    }
  }
  rows.push({ job: job.id, before: median(cpu.before), after: median(cpu.after), speedBefore: median(speed.before), speedAfter: median(speed.after) });
}
const rss = { before: readMemory(servers.before.s.pid), after: readMemory(servers.after.s.pid) };
await servers.before.s.stop();
await servers.after.s.stop();

console.log(`\nserver CPU per GiB written (median of ${REPS * 2} runs each, A B B A), load at end ${loadAvg()}`);
console.log('| job | before: CPU s/GiB | after: CPU s/GiB | after ÷ before | before speed | after speed |');
console.log('|---|---:|---:|---:|---:|---:|');
for (const r of rows) {
  console.log(`| ${r.job} | ${r.before.toFixed(3)} | ${r.after.toFixed(3)} | ${(r.after / r.before).toFixed(2)} | ${r.speedBefore.toFixed(0)} | ${r.speedAfter.toFixed(0)} |`);
}
console.log(`RSS at the end (peak): before ${(rss.before.rss / 2 ** 20).toFixed(1)} (${(rss.before.hwm / 2 ** 20).toFixed(1)}) MiB, after ${(rss.after.rss / 2 ** 20).toFixed(1)} (${(rss.after.hwm / 2 ** 20).toFixed(1)}) MiB`);

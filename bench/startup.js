#!/usr/bin/env node
// CLI start-up against bare `node -e 0`, in the same run (issue 18: `--version` ≤ 150 ms where
// bare node takes ~75 ms; `status`, `pair` and `cfs get` must feel instant).
//
// One `blockmirror up` (memory volumes, one sync pair, the CFS server with one 64 KiB file) answers
// the commands that talk to a cluster. Each round runs every command once, in the order A B C ...
// and then reversed (... C B A), so drift in the machine's load hits all of them alike; a command's
// figure is the median over the rounds, and its ratio is the median of the per-round ratios to
// `node -e 0` of the same round. CPU is the child's user+system time (from /proc/self/stat's
// cutime/cstime, 10 ms ticks, so it is summed over the rounds and divided).
//   usage: npm run build && node bench/startup.js [--rounds N] [--append]
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { freePort, installCleanup, NODE_FLAGS, nodeFlagsOf, run } from './lib/proc.js';
import { replaceSection } from './lib/report.js';
import { median } from './lib/stats.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const BIN = path.join(ROOT, 'bin', 'blockmirror.js');
const arg = (name, dflt) => {
  const i = process.argv.indexOf(name);
  return i > 0 ? process.argv[i + 1] : dflt;
};
const ROUNDS = Number(arg('--rounds', process.env.BENCH_ROUNDS ?? 6));
const APPEND = process.argv.includes('--append');

installCleanup();
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bm-bench-startup-'));
process.on('exit', () => fs.rmSync(dir, { recursive: true, force: true }));
const env = { ...process.env, BLOCKMIRROR_ADMIN_TOKEN: process.env.BLOCKMIRROR_ADMIN_TOKEN ?? 'bench-startup-token' };

const [nbd, admin, cfsPort] = [await freePort(), await freePort(), await freePort()];
const config = path.join(dir, 'cluster.yaml');
fs.writeFileSync(
  config,
  `storageSystems:
  - id: 1
    nbd: 127.0.0.1:${nbd}
    admin: 127.0.0.1:${admin}
    volumes:
      - { id: 1, size: 64MiB }
      - { id: 2, size: 64MiB }
pairs:
  - { name: p1, mode: sync, master: { ss: 1, vol: 1 }, mirrors: [ { ss: 1, vol: 2 } ] }
cfs:
  listen: 127.0.0.1:${cfsPort}
`,
);
const up = spawn(process.execPath, [...NODE_FLAGS, BIN, 'up', '-c', config, '--log-level', 'warn'], { env, stdio: ['ignore', 'inherit', 'inherit'] });
process.on('exit', () => up.kill('SIGKILL'));
for (let i = 0; ; i++) {
  const r = await fetch(`http://127.0.0.1:${admin}/healthz`).catch(() => undefined);
  if (r?.ok) break;
  if (i > 600) throw new Error('up did not answer /healthz');
  await new Promise((r) => setTimeout(r, 50));
}
const local = path.join(dir, 'small.bin');
fs.writeFileSync(local, Buffer.alloc(65536, 7));
for (let i = 0; ; i++) {
  const r = await run(process.execPath, [...NODE_FLAGS, BIN, 'cfs', 'put', local, '/small.bin', '-c', config], { timeoutMs: 30000 });
  if (r.code === 0) break;
  if (i > 50) throw new Error(`cfs put: ${r.stderr}`);
  await new Promise((r) => setTimeout(r, 200));
}

// --baseline DIR: another checkout of blockmirror (built), run side by side: before/after in one run.
const BASE = arg('--baseline', undefined);
let split = false;
const CLI = [
  { id: '--version', args: () => ['--version'] },
  { id: '--help', args: () => ['--help'] },
  { id: 'status', args: () => ['status', '-c', config] },
  // Every run flips it, whichever checkout runs it: split, resync (nothing written, so instant), split...
  { id: 'pair split / resync', args: () => ['pair', (split = !split) ? 'split' : 'resync', 'p1', '-c', config] },
  { id: 'cfs get (64 KiB)', args: () => ['cfs', 'get', '/small.bin', path.join(dir, 'got.bin'), '-c', config] },
  { id: 'cfs ls', args: () => ['cfs', 'ls', '/', '-c', config] },
];
const COMMANDS = [
  { id: 'node -e 0', argv: () => [process.execPath, '-e', '0'] },
  ...CLI.map((c) => ({ id: c.id, argv: () => [process.execPath, ...NODE_FLAGS, BIN, ...c.args()] })),
  ...(BASE ? CLI.map((c) => ({ id: `${c.id} (baseline)`, argv: () => [process.execPath, ...nodeFlagsOf(path.resolve(BASE)), path.join(path.resolve(BASE), 'bin', 'blockmirror.js'), ...c.args()] })) : []),
];

function childTicks() {
  const f = fs.readFileSync('/proc/self/stat', 'utf8').split(') ')[1].split(' ');
  return Number(f[13]) + Number(f[14]); // cutime + cstime, fields 16 and 17
}
const tick = 1000 / Number(spawnSync('getconf', ['CLK_TCK']).stdout.toString().trim() || 100);

const wall = new Map(COMMANDS.map((c) => [c.id, []]));
const cpuTicks = new Map(COMMANDS.map((c) => [c.id, 0]));
const load0 = os.loadavg();
for (let round = 0; round < ROUNDS; round++) {
  const order = round % 2 === 0 ? COMMANDS : [...COMMANDS].reverse();
  for (const c of order) {
    const [cmd, ...args] = c.argv();
    const t0 = childTicks();
    const s = process.hrtime.bigint();
    const r = spawnSync(cmd, args, { env, stdio: ['ignore', 'pipe', 'pipe'] });
    const ms = Number(process.hrtime.bigint() - s) / 1e6;
    if (r.status !== 0) throw new Error(`${c.id}: exit ${r.status}: ${r.stderr}`);
    cpuTicks.set(c.id, cpuTicks.get(c.id) + childTicks() - t0);
    wall.get(c.id).push(ms);
  }
}
const load1 = os.loadavg();
const bare = wall.get('node -e 0');
const rows = COMMANDS.map((c) => {
  const w = wall.get(c.id);
  const ratio = median(w.map((x, i) => x / bare[i]));
  return { id: c.id, wall: median(w), ratio, cpu: (cpuTicks.get(c.id) * tick) / ROUNDS };
});
const byId = new Map(rows.map((r) => [r.id, r]));
const table = [
  `| command | wall (median) | ÷ \`node -e 0\` | CPU (mean) |${BASE ? ' baseline wall | baseline ÷ node | after ÷ before (wall) |' : ''}`,
  `|---|---:|---:|---:|${BASE ? '---:|---:|---:|' : ''}`,
  ...rows
    .filter((r) => !r.id.endsWith('(baseline)'))
    .map((r) => {
      const b = byId.get(`${r.id} (baseline)`);
      const extra = b ? ` ${b.wall.toFixed(0)} ms | ${b.ratio.toFixed(2)} | ${median(wall.get(r.id).map((x, i) => x / wall.get(b.id)[i])).toFixed(2)} |` : BASE ? ' | | |' : '';
      return `| \`${r.id}\` | ${r.wall.toFixed(0)} ms | ${r.ratio.toFixed(2)} | ${r.cpu.toFixed(0)} ms |${extra}`;
    }),
].join('\n');
const head = `CLI start-up, ${new Date().toISOString()}, node ${process.version}, ${os.cpus().length} cores, ${ROUNDS} rounds (A…Z Z…A); load average ${load0.map((x) => x.toFixed(1)).join(' ')} at start, ${load1.map((x) => x.toFixed(1)).join(' ')} at end.`;
console.log(`${head}\n\n${table}`);
if (APPEND) replaceSection(path.join(ROOT, 'bench', 'RESULTS.md'), 'startup', `## CLI start-up (bench/startup.js)\n\n${head}\n\n${table}`);
up.kill('SIGTERM');
process.exit(0);

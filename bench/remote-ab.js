#!/usr/bin/env node
// Pairs across storage systems, two builds side by side (before/after a change), or one build
// profiled. Each build runs its own two `blockmirror up --only` processes (the same layout as
// bench/remote.js); every repetition runs the chosen kinds on build A, then B, then B, then A
// (A B B A), so a pair of builds shares the machine's drift. Reports, per build, the median of the
// per-repetition master ÷ standalone ratios, and how that ratio moved from A to B.
//
//   node bench/remote-ab.js --a /path/to/checkout-before --b . [--jobs 4k,1m] [--kinds async,sync]
//                           [--reps 3] [--runtime 3]
//   node bench/remote-ab.js --b . --prof DIR --jobs 4k --kinds sync    # --cpu-prof of both `up`s
//
// A checkout is a directory with bin/blockmirror.js and a built dist/. With --prof, each up
// process writes DIR/ssN-*.cpuprofile at exit; `node bench/lib/cpuprofile.js FILE 25` reads one.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { fioArgs, runFio } from './lib/fio.js';
import { loadAvg } from './lib/machine.js';
import { waitPairs } from './lib/admin.js';
import { freePort, installCleanup, startServer } from './lib/proc.js';
import { median } from './lib/stats.js';

const JOBS = {
  '4k': { label: '4k rand write QD16', rw: 'randwrite', bs: '4k', iodepth: 16, unit: 'IOPS' },
  '1m': { label: '1M seq write QD8', rw: 'write', bs: '1M', iodepth: 8, unit: 'MiB/s' },
};
const VOLUMES = { standalone: 9, async: 8, sync: 5 };
const SIZE = '256M';

const { values: opt } = parseArgs({
  options: {
    a: { type: 'string' },
    b: { type: 'string', default: '.' },
    jobs: { type: 'string', default: '4k,1m' },
    kinds: { type: 'string', default: 'async,sync' },
    reps: { type: 'string', default: '3' },
    runtime: { type: 'string', default: '3' },
    prof: { type: 'string' },
  },
});

function yaml(p) {
  const ss = (id, a) => `  - id: ${id}
    nbd: 127.0.0.1:${a.nbd}
    admin: 127.0.0.1:${a.admin}
    peer: 127.0.0.1:${a.peer}
    volumes:
      - { id: 9, size: 1GiB }
      - { id: 8, size: 1GiB }
      - { id: 5, size: 1GiB }`;
  return `clusterSize: 64KiB
storageSystems:
${ss(1, p[0])}
${ss(2, p[1])}
pairs:
  - { name: apair, mode: async, master: { ss: 1, vol: 8 }, mirrors: [ { ss: 2, vol: 8 } ] }
  - { name: spair, mode: sync, master: { ss: 1, vol: 5 }, mirrors: [ { ss: 2, vol: 5 } ] }
`;
}

async function startBuild(name, root, dir) {
  const bin = path.join(path.resolve(root), 'bin', 'blockmirror.js');
  if (!fs.existsSync(bin)) throw new Error(`${root}: no bin/blockmirror.js (give a checkout with a built dist/)`);
  // Each build runs with the node flags of its own bin's shebang, as its `blockmirror` command would.
  const shebang = /^#!\/usr\/bin\/env -S node(.*)$/.exec(fs.readFileSync(bin, 'utf8').split('\n', 1)[0]);
  const flags = shebang ? shebang[1].trim().split(/\s+/).filter(Boolean) : [];
  const addrs = [];
  for (let i = 0; i < 2; i++) addrs.push({ nbd: await freePort(), admin: await freePort(), peer: await freePort() });
  const file = path.join(dir, `${name}.yaml`);
  fs.writeFileSync(file, yaml(addrs));
  const servers = [];
  for (const id of [2, 1]) {
    const prof = opt.prof ? ['--cpu-prof', `--cpu-prof-dir=${path.resolve(opt.prof)}`, `--cpu-prof-name=ss${id}-${name}-${process.pid}.cpuprofile`] : [];
    const args = [...flags, ...prof, bin, 'up', '-c', file, '--only', String(id), '--log-level', 'warn'];
    servers.push(await startServer(`${name}/ss${id}`, process.execPath, args, { kind: 'tcp', host: '127.0.0.1', port: addrs[id - 1].nbd }));
  }
  await waitPairs(addrs[0].admin);
  const uri = (vol) => `nbd://127.0.0.1:${addrs[0].nbd}/vol${vol}`;
  for (const vol of Object.values(VOLUMES)) await runFio(fioArgs({ name: 'fill', uri: uri(vol), rw: 'write', bs: '1M', iodepth: 8, size: SIZE }));
  return { name, root, admin: addrs[0].admin, uri, servers };
}

// utime + stime of a process, in clock ticks (USER_HZ, 100 on Linux).
const TICK_US = 10_000;
function cpuTicks(pid) {
  const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return Number(f[11]) + Number(f[12]);
}

async function main() {
  installCleanup();
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bm-bench-remote-ab-'));
  if (opt.prof) fs.mkdirSync(opt.prof, { recursive: true });
  const reps = Number(opt.reps);
  const runtime = Number(opt.runtime);
  const kinds = ['standalone', ...opt.kinds.split(',').filter((k) => k !== 'standalone')];
  const builds = [];
  console.error(`load at start ${loadAvg()}`);
  try {
    if (opt.a) builds.push(await startBuild('A', opt.a, dir));
    builds.push(await startBuild('B', opt.b, dir));
    for (const jobId of opt.jobs.split(',')) {
      const job = JOBS[jobId];
      if (!job) throw new Error(`--jobs: unknown job ${jobId} (4k, 1m)`);
      const samples = new Map(builds.map((b) => [b.name, Object.fromEntries(kinds.map((k) => [k, []]))]));
      // µs of CPU per I/O, per kind, per server (servers[0] is ss2, servers[1] ss1: the order they start).
      const cpu = new Map(builds.map((b) => [b.name, Object.fromEntries(kinds.map((k) => [k, [[], []]]))]));
      for (let rep = 0; rep < reps; rep++) {
        const order = builds.length === 1 ? builds : rep % 2 === 0 ? builds : [...builds].reverse();
        for (const b of order) {
          for (const kind of kinds) {
            await waitPairs(b.admin);
            const before = b.servers.map((s) => cpuTicks(s.pid));
            const r = await runFio(fioArgs({ name: jobId, uri: b.uri(VOLUMES[kind]), rw: job.rw, bs: job.bs, iodepth: job.iodepth, size: SIZE, runtime, ramp: 1 }));
            samples.get(b.name)[kind].push(job.unit === 'IOPS' ? r.iops : r.bwMiB);
            // CPU per I/O of each `up` over the whole fio run; the ramp's I/Os are estimated at the measured rate.
            const ios = r.iops * (r.seconds + 1);
            b.servers.forEach((s, i) => cpu.get(b.name)[kind][i].push(((cpuTicks(s.pid) - before[i]) * TICK_US) / ios));
          }
        }
      }
      for (const b of builds) {
        const s = samples.get(b.name);
        const parts = kinds.map((k) => {
          const v = `${k} ${Math.round(median(s[k]))}`;
          return k === 'standalone' ? v : `${v} (${median(s[k].map((x, i) => x / s.standalone[i])).toFixed(2)}x)`;
        });
        console.log(`${job.label} ${b.name} [${b.root}]: ${parts.join(', ')} ${job.unit}; raw ${JSON.stringify(s)}`);
        const c = cpu.get(b.name);
        console.log(`${job.label} ${b.name} CPU µs per I/O (median; ss1 / ss2): ${kinds.map((k) => `${k} ${median(c[k][1]).toFixed(1)} / ${median(c[k][0]).toFixed(1)}`).join(', ')}`);
      }
      if (builds.length === 2) {
        const ratio = (b, k) => median(samples.get(b)[k].map((x, i) => x / samples.get(b).standalone[i]));
        const moved = kinds.filter((k) => k !== 'standalone').map((k) => `${k} ${ratio('A', k).toFixed(2)} -> ${ratio('B', k).toFixed(2)} (${(ratio('B', k) / ratio('A', k)).toFixed(2)}x)`);
        console.log(`${job.label} A -> B, master ÷ standalone: ${moved.join(', ')}`);
      }
    }
  } finally {
    for (const b of builds) for (const s of b.servers) await s.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  }
  console.error(`load at end ${loadAvg()}`);
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});

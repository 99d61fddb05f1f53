#!/usr/bin/env node
// The storage-system controller's cost: a standalone volume vs the master of
// an async pair vs the master of a sync pair (one mirror in the same SS), all
// memory volumes in one `blockmirror up`, with and without cache memory;
// plus the unthrottled sync daemon's copy rate. See bench/README.md.
//
//   npm run bench:controller                 # writes the controller section of bench/RESULTS-controller.md
//   BENCH_REPS=3 BENCH_RUNTIME=3 node bench/controller.js
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import './lib/admin.js'; // sets the admin token the servers inherit
import { fioArgs, runFio } from './lib/fio.js';
import { loadAvg, machineInfo } from './lib/machine.js';
import { freePort, installCleanup, NODE_FLAGS, run, startServer } from './lib/proc.js';
import { fmtRatio, median } from './lib/stats.js';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const ROOT = path.resolve(HERE, '..');
const BIN = path.join(ROOT, 'bin', 'blockmirror.js');
const OUT = process.env.BENCH_OUT ?? path.join(HERE, 'RESULTS-controller.md');
const REPS = Number(process.env.BENCH_REPS ?? 5);
const RUNTIME = Number(process.env.BENCH_RUNTIME ?? 4);
const RAMP = 1;
const SIZE = '256M';

const JOBS = [
  { id: 'randwrite-4k-qd16', label: '4k rand write QD16', rw: 'randwrite', bs: '4k', iodepth: 16, unit: 'IOPS', goal: { async: 0.9, sync: 0.8 } },
  { id: 'seqwrite-1m-qd8', label: '1M seq write QD8', rw: 'write', bs: '1M', iodepth: 8, unit: 'MiB/s', goal: { async: 0.9, sync: 0.85 } }, // issue 18: same-SS sync 1 MiB ≥ 0.85
];
const VOLUMES = { standalone: 9, async: 8, sync: 5 };

function yaml(nbd, admin, cache) {
  return `clusterSize: 64KiB
storageSystems:
  - id: 1
    nbd: 127.0.0.1:${nbd}
    admin: 127.0.0.1:${admin}
${cache ? '    cache: { size: 256MiB }\n' : ''}    volumes:
      - { id: 9, size: 1GiB }
      - { id: 8, size: 1GiB }
      - { id: 7, size: 1GiB }
      - { id: 5, size: 1GiB }
      - { id: 6, size: 1GiB }
pairs:
  - { name: apair, mode: async, master: { ss: 1, vol: 8 }, mirrors: [ { ss: 1, vol: 7 } ] }
  - { name: spair, mode: sync, master: { ss: 1, vol: 5 }, mirrors: [ { ss: 1, vol: 6 } ] }
`;
}

async function status(admin) {
  const r = await fetch(`http://127.0.0.1:${admin}/api/status`, { headers: { authorization: `Bearer ${process.env.BLOCKMIRROR_ADMIN_TOKEN}` } });
  if (!r.ok) throw new Error(`admin status: HTTP ${r.status}`);
  return r.json();
}

async function waitPair(admin, name, ms = 120_000) {
  const deadline = Date.now() + ms;
  while (Date.now() < deadline) {
    const s = await status(admin);
    if (s.pairs.find((p) => p.name === name).state === 'PAIR') return;
    await new Promise((r) => setTimeout(r, 20));
  }
  throw new Error(`${name} did not reach PAIR`);
}

async function section(cache, dir) {
  const nbd = await freePort();
  const admin = await freePort();
  const file = path.join(dir, `cluster-${cache ? 'cache' : 'nocache'}.yaml`);
  fs.writeFileSync(file, yaml(nbd, admin, cache));
  const server = await startServer('blockmirror up', process.execPath, [...NODE_FLAGS, BIN, 'up', '-c', file, '--log-level', 'warn'], { kind: 'tcp', host: '127.0.0.1', port: nbd });
  const uri = (vol) => `nbd://127.0.0.1:${nbd}/vol${vol}`;
  try {
    // Same state everywhere: the region written once, mirrors in sync.
    for (const vol of Object.values(VOLUMES)) await runFio(fioArgs({ name: 'fill', uri: uri(vol), rw: 'write', bs: '1M', iodepth: 8, size: SIZE }));
    await waitPair(admin, 'apair');
    const rows = [];
    for (const job of JOBS) {
      const samples = { standalone: [], async: [], sync: [] };
      for (let rep = 0; rep < REPS; rep++) {
        for (const kind of ['standalone', 'async', 'sync']) {
          await waitPair(admin, 'apair'); // each run starts with the daemon idle
          const r = await runFio(fioArgs({ name: job.id, uri: uri(VOLUMES[kind]), rw: job.rw, bs: job.bs, iodepth: job.iodepth, size: SIZE, runtime: RUNTIME, ramp: RAMP }));
          samples[kind].push(job.unit === 'IOPS' ? r.iops : r.bwMiB);
        }
      }
      const ratio = (k) => median(samples[k].map((v, i) => v / samples.standalone[i]));
      rows.push({ job, samples, async: ratio('async'), sync: ratio('sync') });
      console.error(`${cache ? 'cache' : 'no cache'} ${job.label}: async ${ratio('async').toFixed(2)}x sync ${ratio('sync').toFixed(2)}x`);
    }
    // The daemon's copy rate: split, rewrite 1 GiB on the master, resync, time to PAIR. Both volumes
    // are written in full first, so the copy measures the daemon, not the kernel zero-filling fresh pages.
    await runFio(fioArgs({ name: 'warm', uri: uri(8), rw: 'write', bs: '1M', iodepth: 8, size: '1G' }));
    await waitPair(admin, 'apair');
    await run(process.execPath, [...NODE_FLAGS, BIN, 'pair', 'split', 'apair', '-c', file]);
    await runFio(fioArgs({ name: 'dirty', uri: uri(8), rw: 'write', bs: '1M', iodepth: 8, size: '1G' }));
    const t0 = performance.now();
    await run(process.execPath, [...NODE_FLAGS, BIN, 'pair', 'resync', 'apair', '-c', file]);
    await waitPair(admin, 'apair');
    const copyGBs = 2 ** 30 / 1e9 / ((performance.now() - t0) / 1000);
    console.error(`${cache ? 'cache' : 'no cache'} sync daemon: ${copyGBs.toFixed(2)} GB/s`);
    return { cache, rows, copyGBs };
  } finally {
    await server.stop();
  }
}

function fmt(v, unit) {
  return unit === 'IOPS' ? Math.round(v).toLocaleString('en-US') : `${Math.round(v)} MiB/s`;
}

async function main() {
  installCleanup();
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bm-bench-ctl-'));
  const loadStart = loadAvg();
  const started = new Date();
  const sections = [];
  for (const cache of [false, true]) sections.push(await section(cache, dir));
  const m = machineInfo();
  const lines = [
    '# blockmirror controller benchmark',
    '',
    `Generated by \`npm run bench:controller\` on ${started.toISOString().replace(/\.\d+Z$/, 'Z')}.`,
    '',
    `Machine: ${m.cpuModel}, nproc ${m.nproc}; ${m.kernel}; Node ${m.node}; ${m.fio}. Load average at start ${loadStart}, at end ${loadAvg()}.`,
    `${REPS} interleaved repetitions (standalone, async, sync, standalone, ...), ${RUNTIME} s each after a ${RAMP} s ramp, over ${SIZE} of 1 GiB memory volumes in one storage system; each run starts with the async pair in PAIR.`,
    '',
    '| cache | job | standalone (median) | async master | sync master | async ratio | goal | sync ratio | goal |',
    '|---|---|---:|---:|---:|---:|---:|---:|---:|',
  ];
  for (const s of sections) {
    for (const r of s.rows) {
      const med = (k) => fmt(median(r.samples[k]), r.job.unit);
      const met = (v, g) => `${fmtRatio(v, g)}${v >= g ? '' : ' **(no)**'}`; // 0.899 shows as 0.899, not 0.90
      lines.push(`| ${s.cache ? '256 MiB' : 'none'} | ${r.job.label} | ${med('standalone')} | ${med('async')} | ${med('sync')} | ${met(r.async, r.job.goal.async)} | ≥ ${r.job.goal.async} | ${met(r.sync, r.job.goal.sync)} | ≥ ${r.job.goal.sync} |`);
    }
  }
  lines.push('', '| cache | unthrottled sync daemon copy (1 GiB resync after a split) | goal |', '|---|---:|---:|');
  for (const s of sections) lines.push(`| ${s.cache ? '256 MiB' : 'none'} | ${s.copyGBs.toFixed(2)} GB/s | ≥ 1 GB/s |`);
  lines.push('', 'Ratio = median of the per-repetition master/standalone ratios.', '');
  // Hand-written notes (from "## Notes" on) survive a rerun.
  const prev = fs.existsSync(OUT) ? fs.readFileSync(OUT, 'utf8') : '';
  const notes = prev.indexOf('\n## Notes');
  fs.writeFileSync(OUT, lines.join('\n') + (notes >= 0 ? `\n${prev.slice(notes)}` : ''));
  console.log(lines.join('\n'));
  fs.rmSync(dir, { recursive: true, force: true });
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});

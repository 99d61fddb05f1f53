#!/usr/bin/env node
// Pairs across storage systems: a standalone volume vs the master of an async
// and of a sync pair whose mirror is in another storage system (another
// `blockmirror up --only` process, over TCP loopback). Memory volumes, no cache.
// Runs interleave (standalone, async, sync, standalone, ...); ratios are medians
// of per-repetition ratios. See bench/README.md.
//
//   npm run bench:remote        # rewrites the "pairs across storage systems" section of bench/RESULTS.md
//   BENCH_REPS=3 BENCH_RUNTIME=3 node bench/remote.js
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { fioArgs, runFio } from './lib/fio.js';
import { loadAvg, machineInfo } from './lib/machine.js';
import { waitPairs } from './lib/admin.js';
import { freePort, installCleanup, NODE_FLAGS, startServer } from './lib/proc.js';
import { startQsdMirror } from './lib/qsd.js';
import { replaceSection } from './lib/report.js';
import { median } from './lib/stats.js';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const BIN = path.join(HERE, '..', 'bin', 'blockmirror.js');
const OUT = process.env.BENCH_OUT ?? path.join(HERE, 'RESULTS.md');
const REPS = Number(process.env.BENCH_REPS ?? 5);
const RUNTIME = Number(process.env.BENCH_RUNTIME ?? 4);
const RAMP = 1;
const SIZE = '256M';

const JOBS = [
  { id: 'randwrite-4k-qd16', label: '4k rand write QD16', rw: 'randwrite', bs: '4k', iodepth: 16, unit: 'IOPS' },
  { id: 'seqwrite-1m-qd8', label: '1M seq write QD8', rw: 'write', bs: '1M', iodepth: 8, unit: 'MiB/s' },
];
const GOAL = { async: 0.9, sync: 0.6 }; // issue 18: async 4 KiB ≥ 0.9, sync 4 KiB ≥ 0.6
// Our sync master ÷ qemu-storage-daemon's write-blocking mirror (issue 18: keep ≥ 3 and ≥ 2).
const QSD_GOAL = { 'randwrite-4k-qd16': 3, 'seqwrite-1m-qd8': 2 };
const VOLUMES = { standalone: 9, async: 8, sync: 5 };

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

function qsdVersion() {
  const out = execFileSync('qemu-storage-daemon', ['--version'], { encoding: 'utf8' });
  return out.split('\n')[0].replace(/ Copyright.*$/, '');
}

function fmt(v, unit) {
  return unit === 'IOPS' ? Math.round(v).toLocaleString('en-US') : `${Math.round(v)} MiB/s`;
}

async function main() {
  installCleanup();
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bm-bench-remote-'));
  const addrs = [];
  for (let i = 0; i < 2; i++) addrs.push({ nbd: await freePort(), admin: await freePort(), peer: await freePort() });
  const file = path.join(dir, 'cluster.yaml');
  fs.writeFileSync(file, yaml(addrs));
  const loadStart = loadAvg();
  const started = new Date();
  const servers = [];
  for (const id of [2, 1]) {
    const a = addrs[id - 1];
    servers.push(await startServer(`ss${id}`, process.execPath, [...NODE_FLAGS, BIN, 'up', '-c', file, '--only', String(id), '--log-level', 'warn'], { kind: 'tcp', host: '127.0.0.1', port: a.nbd }));
  }
  const uri = (vol) => `nbd://127.0.0.1:${addrs[0].nbd}/vol${vol}`;
  const rows = [];
  const qsdRows = [];
  let qsd;
  try {
    await waitPairs(addrs[0].admin);
    // Same state everywhere: the region written once, mirrors in sync.
    for (const vol of Object.values(VOLUMES)) await runFio(fioArgs({ name: 'fill', uri: uri(vol), rw: 'write', bs: '1M', iodepth: 8, size: SIZE }));
    for (const job of JOBS) {
      const samples = { standalone: [], async: [], sync: [] };
      for (let rep = 0; rep < REPS; rep++) {
        for (const kind of ['standalone', 'async', 'sync']) {
          await waitPairs(addrs[0].admin); // each run starts with the daemon idle
          const r = await runFio(fioArgs({ name: job.id, uri: uri(VOLUMES[kind]), rw: job.rw, bs: job.bs, iodepth: job.iodepth, size: SIZE, runtime: RUNTIME, ramp: RAMP }));
          samples[kind].push(job.unit === 'IOPS' ? r.iops : r.bwMiB);
        }
      }
      const ratio = (k) => median(samples[k].map((v, i) => v / samples.standalone[i]));
      rows.push({ job, samples, async: ratio('async'), sync: ratio('sync') });
      console.error(`${job.label}: async ${ratio('async').toFixed(2)}x sync ${ratio('sync').toFixed(2)}x`);
    }
    // The sync master against qemu-storage-daemon mirroring to a second daemon, A B B A.
    qsd = await startQsdMirror(dir, 1 << 30);
    await runFio(fioArgs({ name: 'fill', uri: qsd.uri, rw: 'write', bs: '1M', iodepth: 8, size: SIZE }));
    for (const job of JOBS) {
      const samples = { sync: [], qsd: [] };
      for (let rep = 0; rep < REPS; rep++) {
        for (const kind of rep % 2 === 0 ? ['sync', 'qsd'] : ['qsd', 'sync']) {
          if (kind === 'sync') await waitPairs(addrs[0].admin);
          const r = await runFio(fioArgs({ name: job.id, uri: kind === 'qsd' ? qsd.uri : uri(VOLUMES.sync), rw: job.rw, bs: job.bs, iodepth: job.iodepth, size: SIZE, runtime: RUNTIME, ramp: RAMP }));
          samples[kind].push(job.unit === 'IOPS' ? r.iops : r.bwMiB);
        }
      }
      const ratio = median(samples.sync.map((v, i) => v / samples.qsd[i]));
      qsdRows.push({ job, samples, ratio });
      console.error(`${job.label}: sync ÷ qemu-storage-daemon ${ratio.toFixed(2)}x`);
    }
    await qsd.stop(); // both daemons exit, so the images are settled
    if (!qsd.same(256 << 20)) throw new Error('qemu-storage-daemon: the mirror target differs from the source');
  } finally {
    for (const s of servers) await s.stop();
    await qsd?.stop();
    qsd?.drop();
  }
  const m = machineInfo();
  const met = (v, g) => `${v.toFixed(2)}${v >= g ? '' : ' **(no)**'}`;
  const lines = [
    '## Pairs across storage systems',
    '',
    `Generated by \`npm run bench:remote\` on ${started.toISOString().replace(/\.\d+Z$/, 'Z')}. Machine: ${m.cpuModel}, nproc ${m.nproc}; ${m.kernel}; Node ${m.node}; ${m.fio}. Load average at start ${loadStart}, at end ${loadAvg()}.`,
    '',
    `Two \`blockmirror up --only\` processes on TCP loopback; the masters and the standalone volume are in storage system 1, the mirrors in storage system 2. Memory volumes of 1 GiB, no cache, ${SIZE} written; ${REPS} interleaved repetitions of ${RUNTIME} s after a ${RAMP} s ramp; each run starts with both pairs in PAIR.`,
    '',
    '| job | standalone (median) | async master | sync master | async ratio | goal | sync ratio | goal |',
    '|---|---:|---:|---:|---:|---:|---:|---:|',
    ...rows.map((r) => {
      const med = (k) => fmt(median(r.samples[k]), r.job.unit);
      return `| ${r.job.label} | ${med('standalone')} | ${med('async')} | ${med('sync')} | ${met(r.async, GOAL.async)} | ≥ ${GOAL.async} | ${met(r.sync, GOAL.sync)} | ≥ ${GOAL.sync} |`;
    }),
    '',
    'Ratio = median of the per-repetition master/standalone ratios.',
    '',
    `The sync master against \`qemu-storage-daemon\` (${qsdVersion()}): one daemon exports the source to fio and mirrors it to a second daemon over NBD with \`blockdev-mirror sync=full copy-mode=write-blocking\` (a write completes once both copies hold it), started once the job is READY; both images are files in /dev/shm. Runs alternate A B B A; the images are compared at the end.`,
    '',
    '| job | our sync master | qemu-storage-daemon mirror | ratio | goal |',
    '|---|---:|---:|---:|---:|',
    ...qsdRows.map((r) => `| ${r.job.label} | ${fmt(median(r.samples.sync), r.job.unit)} | ${fmt(median(r.samples.qsd), r.job.unit)} | ${met(r.ratio, QSD_GOAL[r.job.id])} | ≥ ${QSD_GOAL[r.job.id]} |`),
  ];
  replaceSection(OUT, 'remote', lines.join('\n'));
  console.log(lines.join('\n'));
  fs.rmSync(dir, { recursive: true, force: true });
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});

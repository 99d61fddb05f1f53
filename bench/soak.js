#!/usr/bin/env node
// Memory over a soak (issue 18: RSS ≤ 150 MiB in every benchmark, and flat over a soak with mixed
// I/O). One `blockmirror up` with 1 GiB volumes in sparse files (memory volumes would hold the data
// written in RSS): an async pair and a sync pair. fio (nbd
// engine) runs mixed I/O on both masters at once for the whole soak: 70/30 random read/write with
// block sizes from 4 KiB to 256 KiB, QD8, over 256 MiB of each volume (the working set is fixed,
// so the stored data stops growing after the first pass and RSS should level off). Every 5 s the
// process's VmRSS is sampled; the slope is a least-squares line through the samples after the
// first third (warm-up), in MiB per minute. The issue asks for 10 minutes: --seconds 600.
//   usage: npm run build && node bench/soak.js [--seconds 180] [--append]
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { freePort, installCleanup, NODE_FLAGS } from './lib/proc.js';
import { replaceSection } from './lib/report.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const BIN = path.join(ROOT, 'bin', 'blockmirror.js');
const arg = (name, dflt) => {
  const i = process.argv.indexOf(name);
  return i > 0 ? process.argv[i + 1] : dflt;
};
const SECONDS = Number(arg('--seconds', process.env.BENCH_SOAK_SECONDS ?? 180));
const APPEND = process.argv.includes('--append');
const TOKEN = 'bench-soak-token';

installCleanup();
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bm-bench-soak-'));
process.on('exit', () => fs.rmSync(dir, { recursive: true, force: true }));
const [nbd, admin] = [await freePort(), await freePort()];
const config = path.join(dir, 'cluster.yaml');
fs.writeFileSync(
  config,
  `storageSystems:
  - id: 1
    nbd: 127.0.0.1:${nbd}
    admin: 127.0.0.1:${admin}
    dataDir: data
    volumes:
      - { id: 1, size: 1GiB }
      - { id: 2, size: 1GiB }
      - { id: 3, size: 1GiB }
      - { id: 4, size: 1GiB }
pairs:
  - { name: a, mode: async, master: { ss: 1, vol: 1 }, mirrors: [ { ss: 1, vol: 2 } ] }
  - { name: s, mode: sync, master: { ss: 1, vol: 3 }, mirrors: [ { ss: 1, vol: 4 } ] }
`,
);
const up = spawn(process.execPath, [...NODE_FLAGS, BIN, 'up', '-c', config, '--log-level', 'warn'], { env: { ...process.env, BLOCKMIRROR_ADMIN_TOKEN: TOKEN }, stdio: ['ignore', 'ignore', 'inherit'] });
process.on('exit', () => up.kill('SIGKILL'));
for (let i = 0; ; i++) {
  const r = await fetch(`http://127.0.0.1:${admin}/healthz`).catch(() => undefined);
  if (r?.ok) break;
  if (up.exitCode !== null || i > 2000) throw new Error('up did not start');
  await new Promise((r) => setTimeout(r, 20));
}

const rss = () => Number(/^VmRSS:\s+(\d+) kB/m.exec(fs.readFileSync(`/proc/${up.pid}/status`, 'utf8'))[1]) / 1024;
/** The server's user+system CPU seconds so far (/proc/PID/stat, fields 14 and 15, in clock ticks of 1/100 s). */
const cpu = () => {
  const f = fs.readFileSync(`/proc/${up.pid}/stat`, 'utf8').split(') ')[1].split(' ');
  return (Number(f[11]) + Number(f[12])) / 100;
};
const hwm = () => Number(/^VmHWM:\s+(\d+) kB/m.exec(fs.readFileSync(`/proc/${up.pid}/status`, 'utf8'))[1]) / 1024;
const fio = (vol) =>
  spawn(
    'fio',
    [
      `--name=soak-vol${vol}`,
      '--ioengine=nbd',
      `--uri=nbd://127.0.0.1:${nbd}/vol${vol}`,
      '--rw=randrw',
      '--rwmixread=70',
      '--bsrange=4k-256k',
      '--iodepth=8',
      '--size=256M',
      '--norandommap',
      '--randrepeat=0',
      '--time_based',
      `--runtime=${SECONDS}s`,
      '--thread',
      '--output-format=json',
    ],
    { stdio: ['ignore', 'pipe', 'inherit'] },
  );
const samples = [];
const t0 = performance.now();
const load0 = os.loadavg();
const cpu0 = cpu();
const jobs = [fio(1), fio(3)].map((p) => {
  let out = '';
  p.stdout.on('data', (d) => (out += d));
  process.on('exit', () => p.kill('SIGKILL'));
  return new Promise((resolve, reject) =>
    p.on('exit', (code) => {
      if (code !== 0) return reject(new Error(`fio exited with ${code}`));
      const j = JSON.parse(out.slice(out.indexOf('{'))).jobs[0];
      resolve({ readMiB: j.read.io_bytes / 2 ** 20, writeMiB: j.write.io_bytes / 2 ** 20 });
    }),
  );
});
const timer = setInterval(() => samples.push({ t: (performance.now() - t0) / 1000, rss: rss() }), 5000);
const done = await Promise.all(jobs);
clearInterval(timer);
const load1 = os.loadavg();
const peak = hwm();
const cpuUsed = cpu() - cpu0;

// Least squares over the samples after the warm-up third.
const tail = samples.filter((s) => s.t >= SECONDS / 3);
const n = tail.length;
const mt = tail.reduce((a, s) => a + s.t, 0) / n;
const mr = tail.reduce((a, s) => a + s.rss, 0) / n;
const slope = (tail.reduce((a, s) => a + (s.t - mt) * (s.rss - mr), 0) / tail.reduce((a, s) => a + (s.t - mt) ** 2, 0)) * 60;
const moved = done.reduce((a, d) => a + d.readMiB + d.writeMiB, 0);
const text = [
  `Run ${new Date().toISOString()}, node ${process.version}; ${SECONDS} s of fio randrw 70/30, 4k–256k, QD8, on an async and a sync master at once (256 MiB of each 1 GiB volume, sparse files); ${moved.toFixed(0)} MiB moved. Load average ${load0.map((x) => x.toFixed(1)).join(' ')} at start, ${load1.map((x) => x.toFixed(1)).join(' ')} at end.`,
  '',
  '| RSS at 1/3 | RSS at end | RSS peak (VmHWM) | slope after warm-up | server CPU per GiB moved | goal |',
  '|---:|---:|---:|---:|---:|---|',
  `| ${tail[0]?.rss.toFixed(1)} MiB | ${samples.at(-1)?.rss.toFixed(1)} MiB | ${peak.toFixed(1)} MiB | ${slope >= 0 ? '+' : ''}${slope.toFixed(2)} MiB/min | ${((cpuUsed / moved) * 1024).toFixed(2)} s | peak ≤ 150 MiB, slope ≈ 0 |`,
  '',
  `RSS samples (MiB, every 5 s): ${samples.map((s) => s.rss.toFixed(0)).join(' ')}`,
].join('\n');
console.log(text);
if (APPEND) replaceSection(path.join(ROOT, 'bench', 'RESULTS.md'), 'soak', `## Soak: memory under mixed I/O (bench/soak.js)\n\n${text}`);
up.kill('SIGTERM');
process.exit(0);

#!/usr/bin/env node
// Multi-conn (issue 18): does a memory export get faster with more NBD connections, as nbdkit's
// does? Both servers advertise NBD_FLAG_CAN_MULTI_CONN for a memory export (ours: handshake.ts,
// from BlockDevice.multiConnSafe). Two clients, 1, 2 and 4 connections each:
//   nbdcopy --connections=N   a 256 MiB file of random bytes into the export (time to finish);
//   fio --numjobs=N           nbd engine, 1 MiB sequential writes QD8 per job (one connection
//                             per job), over the first 256 MiB, time-based.
// One `blockmirror serve --size 1GiB` and one `nbdkit memory 1G` run side by side for the whole
// run; each (client, N) alternates ours and nbdkit, A B B A over the repetitions; medians.
//   usage: npm run build && node bench/multiconn.js [--reps 3] [--runtime 3] [--append]
import { spawn } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { freePort, installCleanup, NODE_FLAGS, run, startServer } from './lib/proc.js';
import { replaceSection } from './lib/report.js';
import { median } from './lib/stats.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const BIN = path.join(ROOT, 'bin', 'blockmirror.js');
const arg = (name, dflt) => {
  const i = process.argv.indexOf(name);
  return i > 0 ? process.argv[i + 1] : dflt;
};
const REPS = Number(arg('--reps', process.env.BENCH_REPS ?? 3));
const RUNTIME = Number(arg('--runtime', process.env.BENCH_RUNTIME ?? 3));
const APPEND = process.argv.includes('--append');
const CONNS = [1, 2, 4];

installCleanup();
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bm-bench-multiconn-'));
process.on('exit', () => fs.rmSync(dir, { recursive: true, force: true }));
const src = path.join(dir, 'src.img');
{
  const fd = fs.openSync(src, 'w');
  for (let i = 0; i < 256; i++) fs.writeSync(fd, crypto.randomBytes(1 << 20));
  fs.closeSync(fd);
}

const [p1, p2] = [await freePort(), await freePort()];
const servers = {
  ours: await startServer('ours', process.execPath, [...NODE_FLAGS, BIN, 'serve', '--size', '1GiB', '--listen', `127.0.0.1:${p1}`, '--log-level', 'warn'], { kind: 'tcp', host: '127.0.0.1', port: p1 }),
  nbdkit: await startServer('nbdkit', 'nbdkit', ['-f', '--exit-with-parent', '-i', '127.0.0.1', '-p', String(p2), 'memory', '1G'], { kind: 'tcp', host: '127.0.0.1', port: p2 }),
};
const uri = { ours: `nbd://127.0.0.1:${p1}/`, nbdkit: `nbd://127.0.0.1:${p2}/` };
const cpuOf = (pid) => {
  const f = fs.readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1].split(' ');
  return (Number(f[11]) + Number(f[12])) * 10; // utime + stime, ms (100 Hz)
};

async function nbdcopy(who, n) {
  const t0 = performance.now();
  const r = await run('nbdcopy', [`--connections=${n}`, '--flush', src, uri[who]], { timeoutMs: 120000 });
  if (r.code !== 0) throw new Error(`nbdcopy: ${r.stderr}`);
  return 256 / ((performance.now() - t0) / 1000);
}

async function fio(who, n) {
  const r = await run(
    'fio',
    ['--name=mc', '--ioengine=nbd', `--uri=${uri[who]}`, '--rw=write', '--bs=1M', '--iodepth=8', '--size=256M', `--numjobs=${n}`, '--group_reporting', '--thread', '--time_based', `--runtime=${RUNTIME}s`, '--ramp_time=1s', '--output-format=json'],
    { timeoutMs: 120000 },
  );
  const j = JSON.parse(r.stdout.slice(r.stdout.indexOf('{'))).jobs[0];
  if (r.code !== 0 || j.error) throw new Error(`fio: ${r.stderr}`);
  return j.write.bw_bytes / 2 ** 20;
}

const CLIENTS = { 'nbdcopy --connections': nbdcopy, 'fio --numjobs (1M write QD8 each)': fio };
const results = new Map(); // `${client} ${n} ${who}` -> { mib: [], cpu: [] }
const load0 = os.loadavg();
let flip = false;
for (let rep = 0; rep < REPS; rep++) {
  for (const [client, fn] of Object.entries(CLIENTS)) {
    for (const n of CONNS) {
      const order = (flip = !flip) ? ['ours', 'nbdkit'] : ['nbdkit', 'ours'];
      for (const who of order) {
        const key = `${client} ${n} ${who}`;
        if (!results.has(key)) results.set(key, { mib: [], cpu: [] });
        const c0 = cpuOf(servers[who].pid);
        const w0 = performance.now();
        const mib = await fn(who, n);
        const e = results.get(key);
        e.mib.push(mib);
        e.cpu.push((cpuOf(servers[who].pid) - c0) / (performance.now() - w0));
      }
    }
  }
}
const load1 = os.loadavg();
await servers.ours.stop();
await servers.nbdkit.stop();

const lines = ['| client | connections | ours MiB/s | nbdkit MiB/s | ours ÷ nbdkit | ours N ÷ 1 | nbdkit N ÷ 1 | ours CPU | nbdkit CPU |', '|---|---:|---:|---:|---:|---:|---:|---:|---:|'];
for (const client of Object.keys(CLIENTS)) {
  const m = (n, who) => results.get(`${client} ${n} ${who}`);
  for (const n of CONNS) {
    const o = m(n, 'ours');
    const k = m(n, 'nbdkit');
    const ratio = median(o.mib.map((x, i) => x / k.mib[i]));
    lines.push(
      `| ${client} | ${n} | ${median(o.mib).toFixed(0)} | ${median(k.mib).toFixed(0)} | ${ratio.toFixed(2)} | ${(median(o.mib) / median(m(1, 'ours').mib)).toFixed(2)} | ${(median(k.mib) / median(m(1, 'nbdkit').mib)).toFixed(2)} | ${(median(o.cpu) * 100).toFixed(0)}% | ${(median(k.cpu) * 100).toFixed(0)}% |`,
    );
  }
}
const head = `Run ${new Date().toISOString()}, node ${process.version}, ${os.cpus().length} cores; ${REPS} repetitions, ours and nbdkit alternated A B B A; fio ${RUNTIME} s after a 1 s ramp. Load average ${load0.map((x) => x.toFixed(1)).join(' ')} at start, ${load1.map((x) => x.toFixed(1)).join(' ')} at end. CPU = server user+system time over wall time (100% = one core).`;
const text = `${head}\n\n${lines.join('\n')}`;
console.log(text);
if (APPEND) replaceSection(path.join(ROOT, 'bench', 'RESULTS.md'), 'multiconn', `## Multi-conn: 1, 2 and 4 connections (bench/multiconn.js)\n\n${text}`);
process.exit(0);

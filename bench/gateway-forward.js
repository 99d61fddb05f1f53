#!/usr/bin/env node
// What a gateway's forward path costs, alone (docs/cluster.md, "Gateways"): one master
// (`blockmirror serve`, memory, no mirror, no etcd) and one gateway process in front of it
// (bench/lib/gateway-proc.js: the real NBD server and logical volume, the table fixed in memory).
// Per job, each rep runs fio straight to the master and through the gateway, A B B A A B; medians.
//
//   measure                 how
//   gateway / direct        fio's throughput through the gateway over fio's straight to the master
//                           (median of the per-pair ratios)
//   gateway CPU per GiB     user + system seconds of the gateway process over a run, per GiB fio
//                           wrote (/proc/PID/stat): what forwarding costs, less swayed by load
//                           than throughput on a shared machine
//
//   node bench/gateway-forward.js                             # 3 reps of 5 s runs; replaces its section of bench/RESULTS.md
//   BENCH_REPS=1 BENCH_RUNTIME=2 node bench/gateway-forward.js  # a short run
//   BENCH_JOBS=seqwrite-1m-qd8 ...                            # only these jobs (comma-separated ids)
//   BENCH_NO_REPORT=1 ...                                     # print only
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { fioArgs, runFio } from './lib/fio.js';
import { clockTicks, codeInfo, loadAvg, machineInfo } from './lib/machine.js';
import { freePort, installCleanup, NODE_FLAGS, readCpuSeconds, startServer } from './lib/proc.js';
import { replaceSection } from './lib/report.js';
import { median } from './lib/stats.js';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const ROOT = path.join(HERE, '..');
const BIN = path.join(ROOT, 'bin', 'blockmirror.js');
const OUT = process.env.BENCH_OUT ?? path.join(HERE, 'RESULTS.md');
const REPS = Number(process.env.BENCH_REPS ?? 3);
const RUNTIME = Number(process.env.BENCH_RUNTIME ?? 5);
const RAMP = 1;
const SIZE = 256 * 1024 * 1024;
const ONLY = process.env.BENCH_JOBS ? process.env.BENCH_JOBS.split(',') : undefined;
const JOBS = [
  { id: 'seqwrite-1m-qd8', label: '1 MiB sequential write QD8', rw: 'write', bs: '1M', iodepth: 8, unit: 'MiB/s' },
  { id: 'seqwrite-1m-qd1', label: '1 MiB sequential write QD1', rw: 'write', bs: '1M', iodepth: 1, unit: 'MiB/s' },
  { id: 'randwrite-4k-qd16', label: '4 KiB random write QD16', rw: 'randwrite', bs: '4k', iodepth: 16, unit: 'IOPS' },
].filter((j) => !ONLY || ONLY.includes(j.id));

async function main() {
  installCleanup();
  const clk = clockTicks();
  const loadStart = loadAvg();
  const started = new Date();
  const masterPort = await freePort();
  const master = await startServer('master', process.execPath, [...NODE_FLAGS, BIN, 'serve', '--size', String(SIZE), '--name', 'vol1', '--listen', `127.0.0.1:${masterPort}`], { kind: 'tcp', host: '127.0.0.1', port: masterPort });
  const gwPort = await freePort();
  const gw = await startServer('gateway', process.execPath, [...NODE_FLAGS, path.join(HERE, 'lib', 'gateway-proc.js'), String(gwPort), `127.0.0.1:${masterPort}`, 'vol1', String(SIZE)], { kind: 'tcp', host: '127.0.0.1', port: gwPort });
  const uri = { direct: `nbd://127.0.0.1:${masterPort}/vol1`, gateway: `nbd://127.0.0.1:${gwPort}/lv` };
  const results = [];
  try {
    // Every page of the memory export exists before the first measured run.
    await runFio(fioArgs({ name: 'fill', uri: uri.direct, rw: 'write', bs: '1M', iodepth: 8, size: SIZE }));
    for (const job of JOBS) {
      const samples = { direct: [], gateway: [] };
      const cpu = [];
      for (let rep = 0; rep < REPS; rep++) {
        for (const kind of rep % 2 === 0 ? ['direct', 'gateway'] : ['gateway', 'direct']) {
          const before = readCpuSeconds(gw.pid, clk);
          const r = await runFio(fioArgs({ name: job.id, uri: uri[kind], rw: job.rw, bs: job.bs, iodepth: job.iodepth, size: SIZE, runtime: RUNTIME, ramp: RAMP }));
          samples[kind].push(job.unit === 'IOPS' ? r.iops : r.bwMiB);
          // The ramp's CPU is counted and its bytes are not: the figure errs high.
          if (kind === 'gateway') cpu.push((readCpuSeconds(gw.pid, clk) - before) / (r.ioBytes / 2 ** 30));
        }
      }
      const ratio = median(samples.gateway.map((g, i) => g / samples.direct[i]));
      results.push({ job, samples, cpu, ratio });
      console.error(`${job.label}: gateway/direct ${ratio.toFixed(2)}, gateway CPU ${median(cpu).toFixed(2)} s per GiB`);
    }
  } finally {
    await gw.stop();
    await master.stop();
  }

  const m = machineInfo();
  const code = codeInfo(ROOT);
  const fmt = (v, unit) => (unit === 'IOPS' ? `${Math.round(v).toLocaleString('en-US')} IOPS` : `${Math.round(v)} MiB/s`);
  const lines = [
    `## A gateway's forward path alone (bench/gateway-forward.js, ${started.toISOString().slice(0, 10)})`,
    '',
    `Run ${started.toISOString().replace(/\.\d+Z$/, 'Z')} on ${m.cpuModel}, nproc ${m.nproc}; ${m.kernel}; Node ${m.node}; ${m.fio}; commit ${code.head}.`,
    `Load average at start ${loadStart}, at end ${loadAvg()}. One \`blockmirror serve\` master (memory, ${SIZE / 2 ** 20} MiB, no mirror), one gateway process in front of it (bench/lib/gateway-proc.js, no etcd), all on loopback; ${REPS} interleaved pairs of ${RUNTIME} s fio runs after a ${RAMP} s ramp.`,
    '',
    '| job | direct | gateway | gateway / direct | gateway CPU s per GiB |',
    '|---|---:|---:|---:|---:|',
    ...results.map((r) => `| ${r.job.label} | ${fmt(median(r.samples.direct), r.job.unit)} | ${fmt(median(r.samples.gateway), r.job.unit)} | ${r.ratio.toFixed(2)} | ${median(r.cpu).toFixed(2)} |`),
  ];
  if (process.env.BENCH_NO_REPORT !== '1') replaceSection(OUT, 'gateway-forward', lines.join('\n'));
  console.log(lines.join('\n'));
  fs.mkdirSync(path.join(HERE, 'out'), { recursive: true });
  fs.writeFileSync(path.join(HERE, 'out', 'gateway-forward-last-run.json'), JSON.stringify(results, null, 2));
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});

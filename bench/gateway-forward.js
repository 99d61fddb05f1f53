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
//   the peer                nbdkit's nbd plugin in front of the same master: a proxy in C with a
//                           thread per request, what a forwarding hop costs without Node; each
//                           rep runs direct, gateway and nbdkit in turn (reversed every other rep)
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
  const pxPort = await freePort();
  const px = await startServer('nbdkit nbd plugin', 'nbdkit', ['-f', '--exit-with-parent', '-i', '127.0.0.1', '-p', String(pxPort), 'nbd', 'hostname=127.0.0.1', `port=${masterPort}`, 'export=vol1'], { kind: 'tcp', host: '127.0.0.1', port: pxPort });
  const uri = { direct: `nbd://127.0.0.1:${masterPort}/vol1`, gateway: `nbd://127.0.0.1:${gwPort}/lv`, nbdkit: `nbd://127.0.0.1:${pxPort}/` };
  const pids = { gateway: gw.pid, nbdkit: px.pid };
  const results = [];
  try {
    // Every page of the memory export exists before the first measured run.
    await runFio(fioArgs({ name: 'fill', uri: uri.direct, rw: 'write', bs: '1M', iodepth: 8, size: SIZE }));
    for (const job of JOBS) {
      const samples = { direct: [], gateway: [], nbdkit: [] };
      const cpu = { gateway: [], nbdkit: [] };
      for (let rep = 0; rep < REPS; rep++) {
        for (const kind of rep % 2 === 0 ? ['direct', 'gateway', 'nbdkit'] : ['nbdkit', 'gateway', 'direct']) {
          const before = pids[kind] ? readCpuSeconds(pids[kind], clk) : 0;
          const r = await runFio(fioArgs({ name: job.id, uri: uri[kind], rw: job.rw, bs: job.bs, iodepth: job.iodepth, size: SIZE, runtime: RUNTIME, ramp: RAMP }));
          samples[kind].push(job.unit === 'IOPS' ? r.iops : r.bwMiB);
          // The ramp's CPU is counted and its bytes are not: the figure errs high.
          if (pids[kind]) cpu[kind].push((readCpuSeconds(pids[kind], clk) - before) / (r.ioBytes / 2 ** 30));
        }
      }
      const ratio = median(samples.gateway.map((g, i) => g / samples.direct[i]));
      const peerRatio = median(samples.nbdkit.map((g, i) => g / samples.direct[i]));
      const vsPeer = median(samples.gateway.map((g, i) => g / samples.nbdkit[i]));
      results.push({ job, samples, cpu, ratio, peerRatio, vsPeer });
      console.error(`${job.label}: gateway/direct ${ratio.toFixed(2)}, nbdkit nbd/direct ${peerRatio.toFixed(2)}, gateway/nbdkit ${vsPeer.toFixed(2)}, CPU s per GiB gateway ${median(cpu.gateway).toFixed(2)} nbdkit ${median(cpu.nbdkit).toFixed(2)}`);
    }
  } finally {
    await px.stop();
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
    `Load average at start ${loadStart}, at end ${loadAvg()}. One \`blockmirror serve\` master (memory, ${SIZE / 2 ** 20} MiB, no mirror); in front of it one gateway process (bench/lib/gateway-proc.js, no etcd) and, as the peer, nbdkit's nbd plugin (${m.nbdkit}), all on loopback; ${REPS} rounds of direct, gateway and nbdkit (reversed every other round), ${RUNTIME} s fio runs after a ${RAMP} s ramp. Ratios are medians of the per-round ratios; CPU is user + system seconds of the proxy's process per GiB written.`,
    '',
    '| job | direct | gateway | nbdkit nbd plugin | gateway / direct | nbdkit / direct | gateway / nbdkit | CPU s per GiB: gateway | nbdkit |',
    '|---|---:|---:|---:|---:|---:|---:|---:|---:|',
    ...results.map(
      (r) =>
        `| ${r.job.label} | ${fmt(median(r.samples.direct), r.job.unit)} | ${fmt(median(r.samples.gateway), r.job.unit)} | ${fmt(median(r.samples.nbdkit), r.job.unit)} | ${r.ratio.toFixed(2)} | ${r.peerRatio.toFixed(2)} | ${r.vsPeer.toFixed(2)} | ${median(r.cpu.gateway).toFixed(2)} | ${median(r.cpu.nbdkit).toFixed(2)} |`,
    ),
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

#!/usr/bin/env node
// The symmetric cluster on etcd (docs/cluster.md): how long a failover takes, and what a gateway
// costs. A real 3-member etcd, two `blockmirror up --only` processes holding the sync pair pair1
// (files), one `blockmirror gateway`.
//
//   measure            how
//   failover time      a host writes 4 KiB at QD1 through the gateway without pause; the master's
//                      storage system is killed with -9; time from the kill to the first write
//                      that completes after the process is gone. The old master is restarted and
//                      resynced before the next kill, so kills alternate between the two. p50/p99.
//   gateway overhead   fio through the gateway (nbd://GW/pair1) vs fio straight to the master
//                      (nbd://SS/vol1): 4 KiB random write QD16, 1 MiB sequential write QD8;
//                      interleaved A B B A A B, ratio = median of the per-pair ratios.
//
//   node bench/cluster.js                              # 20 kills, 3 pairs of 4 s runs; appends to bench/RESULTS.md
//   BENCH_KILLS=5 BENCH_RUNTIME=2 node bench/cluster.js  # a short run
//   BENCH_PROFILE=1 ...                                # the gateway runs under node --cpu-prof (bench/out/)
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { fioArgs, runFio } from './lib/fio.js';
import { codeInfo, loadAvg, machineInfo } from './lib/machine.js';
import { freePort, installCleanup, NODE_FLAGS, run, startServer } from './lib/proc.js';
import { replaceSection } from './lib/report.js';
import { median } from './lib/stats.js';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const ROOT = path.join(HERE, '..');
const BIN = path.join(ROOT, 'bin', 'blockmirror.js');
const OUT = process.env.BENCH_OUT ?? path.join(HERE, 'RESULTS.md');
const KILLS = Number(process.env.BENCH_KILLS ?? 20);
const REPS = Number(process.env.BENCH_REPS ?? 3);
const RUNTIME = Number(process.env.BENCH_RUNTIME ?? 4);
const PROFILE = process.env.BENCH_PROFILE === '1';
const RAMP = 1;
const SIZE = '128M';
const LEASE = '2s';
const TOKEN = (process.env.BLOCKMIRROR_ADMIN_TOKEN ??= `bench-${process.pid}-${Date.now()}`);
const JOBS = [
  { id: 'randwrite-4k-qd16', label: '4 KiB random write QD16', rw: 'randwrite', bs: '4k', iodepth: 16, unit: 'IOPS' },
  { id: 'seqwrite-1m-qd8', label: '1 MiB sequential write QD8', rw: 'write', bs: '1M', iodepth: 8, unit: 'MiB/s' },
];
const GOAL = { overhead: 0.8, p99: 3000 };

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** A 3-member etcd on loopback, each member with its own data dir. */
async function startEtcd(dir) {
  const members = [];
  for (let i = 0; i < 3; i++) members.push({ name: `m${i}`, client: await freePort(), peer: await freePort() });
  const initial = members.map((m) => `${m.name}=http://127.0.0.1:${m.peer}`).join(',');
  const procs = members.map((m) =>
    spawn('etcd', ['--name', m.name, '--data-dir', path.join(dir, m.name), '--listen-client-urls', `http://127.0.0.1:${m.client}`, '--advertise-client-urls', `http://127.0.0.1:${m.client}`,
      '--listen-peer-urls', `http://127.0.0.1:${m.peer}`, '--initial-advertise-peer-urls', `http://127.0.0.1:${m.peer}`, '--initial-cluster', initial, '--initial-cluster-state', 'new',
      '--heartbeat-interval', '50', '--election-timeout', '500'], { stdio: 'ignore' }),
  );
  process.on('exit', () => procs.forEach((p) => p.kill('SIGKILL')));
  const endpoints = members.map((m) => `127.0.0.1:${m.client}`);
  for (let i = 0; i < 200; i++) {
    if ((await run('etcdctl', ['--endpoints', endpoints.join(','), 'endpoint', 'health'], { timeoutMs: 10_000 })).code === 0) return endpoints;
    await sleep(100);
  }
  throw new Error('etcd did not become healthy');
}

function yaml(addrs, endpoints, dir) {
  const ss = (id, a) => `  - id: ${id}
    nbd: 127.0.0.1:${a.nbd}
    admin: 127.0.0.1:${a.admin}
    peer: 127.0.0.1:${a.peer}
    dataDir: ${path.join(dir, `ss${id}`)}
    volumes:
      - { id: 1, size: 256MiB }`;
  return `clusterSize: 64KiB
peerTimeout: 1s
storageSystems:
${ss(1, addrs[0])}
${ss(2, addrs[1])}
pairs:
  - { name: pair1, mode: sync, master: { ss: 1, vol: 1 }, mirrors: [ { ss: 2, vol: 1 } ] }
etcd:
  endpoints: [ ${endpoints.join(', ')} ]
  prefix: /bench
  leaseTtl: ${LEASE}
`;
}

async function status(admin) {
  try {
    const res = await fetch(`http://127.0.0.1:${admin}/api/status`, { headers: { authorization: `Bearer ${TOKEN}` }, signal: AbortSignal.timeout(2000) });
    return await res.json();
  } catch {
    return undefined;
  }
}

async function etcdGet(endpoints, key) {
  const r = await run('etcdctl', ['--endpoints', endpoints.join(','), 'get', `/bench/${key}`, '--print-value-only'], { timeoutMs: 10_000 });
  return r.code === 0 && r.stdout.trim() ? JSON.parse(r.stdout) : undefined;
}

/** The master's storage system says PAIR with nothing to copy, and etcd records its mirror as PAIR (what a failover needs). */
async function settled(endpoints, addrs, ms = 120_000) {
  const deadline = Date.now() + ms;
  while (Date.now() < deadline) {
    const lv = await etcdGet(endpoints, 'lv/pair1');
    const p = lv && (await status(addrs[lv.master.ss - 1].admin))?.pairs.find((x) => x.name === 'pair1');
    const rows = await etcdGet(endpoints, 'mirrors/pair1');
    if (p?.role === 'master' && p.state === 'PAIR' && p.epoch === lv.epoch && p.mirrors.every((m) => m.invalidClusters === 0 && m.connected !== false) && rows?.mirrors.every((m) => m.state === 'PAIR')) return lv;
    await sleep(100);
  }
  throw new Error('pair1 did not settle in PAIR');
}

/** A host writing 4 KiB blocks at QD1 through the gateway, as fast as it can; remembers when each write completed. */
async function startWriter(port) {
  const { connect } = await import('../dist/nbd/client.js');
  const client = await connect(`nbd://127.0.0.1:${port}/pair1`);
  // completions: when the latest writes completed (trimmed); count: how many ever did (never goes down).
  const w = { completions: [], count: 0, errors: 0, stopped: false, done: null };
  const block = Buffer.alloc(4096, 0x5a);
  w.done = (async () => {
    for (let i = 0; !w.stopped; i++) {
      try {
        await client.pwrite(block, (i % 4096) * 4096);
        w.completions.push(performance.now());
        w.count++;
        if (w.completions.length > 10_000) w.completions.splice(0, 5_000);
      } catch (e) {
        w.errors++;
        console.error(`bench: a host write failed: ${e.message}`);
        await sleep(10);
      }
    }
    await client.close();
  })();
  return w;
}

async function main() {
  installCleanup();
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bm-bench-cluster-'));
  const outDir = path.join(HERE, 'out');
  fs.mkdirSync(outDir, { recursive: true });
  const loadStart = loadAvg();
  const started = new Date();
  const endpoints = await startEtcd(path.join(dir, 'etcd'));
  const addrs = [];
  for (let i = 0; i < 2; i++) addrs.push({ nbd: await freePort(), admin: await freePort(), peer: await freePort() });
  const file = path.join(dir, 'cluster.yaml');
  fs.writeFileSync(file, yaml(addrs, endpoints, dir));
  const ss = [];
  const startSS = async (id) => {
    ss[id - 1] = await startServer(`ss${id}`, process.execPath, [...NODE_FLAGS, BIN, 'up', '-c', file, '--only', String(id), '--log-level', 'warn'], { kind: 'tcp', host: '127.0.0.1', port: addrs[id - 1].nbd }, { readyTimeoutMs: 60_000 });
  };
  await startSS(1);
  await startSS(2);
  const gwPort = await freePort();
  const prof = PROFILE ? ['--cpu-prof', `--cpu-prof-dir=${outDir}`] : [];
  const gw = await startServer('gateway', process.execPath, [...NODE_FLAGS, ...prof, BIN, 'gateway', '-c', file, '--listen', `127.0.0.1:${gwPort}`, '--log-level', 'warn'], { kind: 'tcp', host: '127.0.0.1', port: gwPort }, { readyTimeoutMs: 60_000 });
  const overhead = [];
  const failovers = [];
  let writerErrors = 0;
  try {
    await settled(endpoints, addrs);
    const viaGateway = `nbd://127.0.0.1:${gwPort}/pair1`;
    await runFio(fioArgs({ name: 'fill', uri: viaGateway, rw: 'write', bs: '1M', iodepth: 8, size: SIZE }));

    // Gateway overhead: direct, gateway and the peer in turn, reversed every other round. The peer
    // is nbdkit's nbd plugin in front of the same master (a forwarding hop written in C, with a
    // thread per request), started once the master is known; no failover happens meanwhile.
    const lv0 = await settled(endpoints, addrs);
    const masterUri = `nbd://127.0.0.1:${addrs[lv0.master.ss - 1].nbd}/vol${lv0.master.vol}`;
    const pxPort = await freePort();
    const px = await startServer('nbdkit nbd plugin', 'nbdkit', ['-f', '--exit-with-parent', '-i', '127.0.0.1', '-p', String(pxPort), 'nbd', 'hostname=127.0.0.1', `port=${addrs[lv0.master.ss - 1].nbd}`, `export=vol${lv0.master.vol}`], { kind: 'tcp', host: '127.0.0.1', port: pxPort });
    try {
      for (const job of JOBS) {
        const samples = { direct: [], gateway: [], nbdkit: [] };
        for (let rep = 0; rep < REPS; rep++) {
          const order = rep % 2 === 0 ? ['direct', 'gateway', 'nbdkit'] : ['nbdkit', 'gateway', 'direct'];
          for (const kind of order) {
            const lv = await settled(endpoints, addrs);
            if (lv.master.ss !== lv0.master.ss || lv.master.vol !== lv0.master.vol) throw new Error('the master changed during the overhead runs');
            const uri = kind === 'gateway' ? viaGateway : kind === 'nbdkit' ? `nbd://127.0.0.1:${pxPort}/` : masterUri;
            const r = await runFio(fioArgs({ name: job.id, uri, rw: job.rw, bs: job.bs, iodepth: job.iodepth, size: SIZE, runtime: RUNTIME, ramp: RAMP }));
            samples[kind].push(job.unit === 'IOPS' ? r.iops : r.bwMiB);
          }
        }
        const ratio = median(samples.gateway.map((g, i) => g / samples.direct[i]));
        const peerRatio = median(samples.nbdkit.map((g, i) => g / samples.direct[i]));
        const vsPeer = median(samples.gateway.map((g, i) => g / samples.nbdkit[i]));
        overhead.push({ job, samples, ratio, peerRatio, vsPeer });
        console.error(`${job.label}: gateway/direct ${ratio.toFixed(2)}, nbdkit nbd plugin/direct ${peerRatio.toFixed(2)}, gateway/nbdkit ${vsPeer.toFixed(2)}`);
      }
    } finally {
      await px.stop();
    }

    // Failover time: kill -9 the master, measure, restart it, let it resync; KILLS times (0: overhead only, e.g. to profile).
    const writer = KILLS > 0 ? await startWriter(gwPort) : { stopped: true, done: Promise.resolve(), errors: 0, completions: [] };
    try {
      for (let k = 0; k < KILLS; k++) {
        const lv = await settled(endpoints, addrs);
        const before = writer.count;
        while (writer.count < before + 50) await sleep(20); // writes are flowing
        const victim = ss[lv.master.ss - 1];
        const killedAt = performance.now();
        process.kill(victim.pid, 'SIGKILL');
        await victim.stop();
        const goneAt = performance.now();
        let first;
        while ((first = writer.completions.find((t) => t > goneAt)) === undefined) await sleep(5);
        failovers.push(first - killedAt);
        console.error(`kill ${k + 1}/${KILLS}: ss${lv.master.ss} killed; first write through the gateway after ${Math.round(first - killedAt)} ms`);
        await startSS(lv.master.ss);
      }
      await settled(endpoints, addrs);
    } finally {
      writer.stopped = true;
      await writer.done;
      writerErrors = writer.errors;
    }
  } finally {
    await gw.stop();
    for (const s of ss) await s.stop();
  }

  const sorted = [...failovers].sort((a, b) => a - b);
  const pct = (p) => sorted[Math.min(sorted.length - 1, Math.ceil((p / 100) * sorted.length) - 1)];
  const m = machineInfo();
  const code = codeInfo(ROOT);
  const etcdVersion = (await run('etcd', ['--version'])).stdout.split('\n')[0];
  const yes = (ok) => (ok ? 'yes' : '**no**');
  const fmt = (v, unit) => (unit === 'IOPS' ? `${Math.round(v).toLocaleString('en-US')} IOPS` : `${Math.round(v)} MiB/s`);
  const failoverRows = failovers.length === 0 ? [] : [
    `| failover, kill -9 of the master to the first host write through the gateway, p50 (${failovers.length} kills) | ${Math.round(pct(50))} ms | | |`,
    `| the same, p99 | ${Math.round(pct(99))} ms | ≤ ${GOAL.p99} ms | ${yes(pct(99) <= GOAL.p99)} |`,
    `| the same, min / max | ${Math.round(sorted[0])} / ${Math.round(sorted[sorted.length - 1])} ms | | |`,
    `| host write errors during the kills | ${writerErrors} | 0 | ${yes(writerErrors === 0)} |`,
  ];
  const lines = [
    `## The symmetric cluster on etcd: failover time and gateway overhead (bench/cluster.js, ${started.toISOString().slice(0, 10)})`,
    '',
    `Run ${started.toISOString().replace(/\.\d+Z$/, 'Z')} on ${m.cpuModel}, nproc ${m.nproc}; ${m.kernel}; Node ${m.node}; ${m.fio}; ${etcdVersion}; commit ${code.head}.`,
    `Load average at start ${loadStart}, at end ${loadAvg()}. A 3-member etcd, two \`up --only\` processes (pair1, sync, 256 MiB files), one gateway, all on loopback; lease TTL ${LEASE} (the default).`,
    '',
    '| measure | figure | goal | met? |',
    '|---|---:|---:|:---:|',
    ...failoverRows,
    ...overhead.flatMap((o) => [
      `| gateway / direct to the master, ${o.job.label} (${fmt(median(o.samples.gateway), o.job.unit)} / ${fmt(median(o.samples.direct), o.job.unit)}) | ${o.ratio.toFixed(2)} | ≥ ${GOAL.overhead} | ${yes(o.ratio >= GOAL.overhead)} |`,
      `| the peer, nbdkit's nbd plugin in front of the same master / direct, ${o.job.label} (${fmt(median(o.samples.nbdkit), o.job.unit)}) | ${o.peerRatio.toFixed(2)} | | |`,
      `| gateway / nbdkit's nbd plugin, ${o.job.label} | ${o.vsPeer.toFixed(2)} | | |`,
    ]),
    '',
    `Failover: a host writes 4 KiB at QD1 through the gateway without pause; each kill waits for PAIR (and etcd's record of it), kills the master's process with -9, and takes the first write that completes after the process is gone; the old master is restarted (it rejoins as the mirror) before the next kill. With a ${LEASE} lease, etcd drops the registration 2 to 3 s after the last renewal, then the mirror's one transaction and takeover follow. Overhead: ${REPS} rounds of direct, gateway and nbdkit's nbd plugin (${m.nbdkit}, a proxy in C, as the peer), reversed every other round, ${RUNTIME} s fio runs after a ${RAMP} s ramp over ${SIZE}; ratios are medians of the per-round ratios; the direct runs go to the master's own export, so all three include the sync mirror's round trip.`,
    '',
    'The anchors, as their documentation gives them: **Pacemaker with DRBD** notices a dead node when Corosync\'s totem token is lost (3 s by default since Corosync 3 / RHEL 8.4, 1 s before; consensus 1.2 × token), then must fence it (STONITH) before it promotes the DRBD secondary and starts the resource: seconds to tens of seconds, dominated by the fencing agent. **Ceph** marks an OSD down after `osd_heartbeat_grace` = 20 s without heartbeats (peers ping every `osd_heartbeat_interval` = 6 s), then re-peers its placement groups; client I/O to the affected PGs waits that long.',
  ];
  if (process.env.BENCH_NO_REPORT !== '1') replaceSection(OUT, 'cluster', lines.join('\n'));
  console.log(lines.join('\n'));
  fs.writeFileSync(path.join(outDir, 'cluster-last-run.json'), JSON.stringify({ failovers, overhead, writerErrors }, null, 2));
  fs.rmSync(dir, { recursive: true, force: true });
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});

#!/usr/bin/env node
// Every benchmark, one after another, each writing its own part of the results (issue 18: one
// command runs all of it). `npm run bench` builds first and runs this; `npm run bench:nbd` runs
// only the fio table against nbdkit (bench/run.js).
//
//   node bench/all.js [--only a,b] [--skip a,b] [--list]
//
// A benchmark that fails is reported and the next one runs; the exit code is 1 if any failed.
// The benchmarks are never run at once: each one's peer runs in the same run, interleaved, and a
// second benchmark would be noise in both.
import { spawnSync } from 'node:child_process';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const HERE = path.dirname(fileURLToPath(import.meta.url));

/** Name, script, the arguments that make it write its results, what it compares, and where it writes. */
const BENCHES = [
  ['nbd', 'run.js', [], 'NBD server vs nbdkit, fio (about 17 min)', 'RESULTS.md, top'],
  ['controller', 'controller.js', [], 'sync/async masters vs a standalone volume', 'RESULTS-controller.md'],
  ['remote', 'remote.js', [], 'pairs across storage systems vs standalone, and vs qemu-storage-daemon', 'RESULTS.md section'],
  ['cfs', 'cfs.js', [], 'cfs put/get and the FUSE mount vs nbdcopy', 'RESULTS-cfs.md'],
  ['cfs-client', 'cfs-client.js', [], 'cfs get/put through the NBD client vs nbdcopy', 'RESULTS.md section'],
  ['iscsi', 'iscsi.js', ['--append'], 'iSCSI target vs tgt', 'RESULTS.md section'],
  ['multiconn', 'multiconn.js', ['--append'], '1, 2 and 4 connections vs nbdkit', 'RESULTS.md section'],
  ['tls', 'tls.js', ['--append'], 'TLS vs plain, and vs nbdkit --tls', 'RESULTS.md section'],
  ['startup', 'startup.js', ['--append'], 'CLI start-up vs bare node', 'RESULTS.md section'],
  ['scale', 'scale.js', ['--append'], '1, 16 and 64 GiB volumes: start-up, bitmap, resync', 'RESULTS.md section, scale.svg'],
  ['soak', 'soak.js', ['--append'], 'RSS over a 10-minute soak (BENCH_SOAK_SECONDS, default 600 here)', 'RESULTS.md section'],
  ['switch', 'switch.js', [], 'the live-reconfiguration layer vs none', 'RESULTS.md section'],
  ['svol', 'svol.js', [], 'S-VOL restore vs nbdcopy, RW member vs plain volume, fault to I/O', 'RESULTS.md sections'],
  ['xfer', 'xfer.js', [], 'transfer through a shared volume vs nbdcopy', 'RESULTS.md section'],
  ['cluster', 'cluster.js', [], 'failover over 20 kills, gateway vs direct', 'RESULTS.md section'],
];

function list(flag) {
  const i = process.argv.indexOf(flag);
  if (i < 0) return undefined;
  const v = process.argv[i + 1];
  if (!v || v.startsWith('--')) die(`${flag} needs a comma-separated list of benchmarks (see --list)`);
  const names = v.split(',');
  for (const n of names) if (!BENCHES.some(([name]) => name === n)) die(`${flag}: no benchmark "${n}" (known: ${BENCHES.map(([name]) => name).join(', ')})`);
  return names;
}

function die(msg) {
  console.error(`bench/all.js: ${msg}`);
  process.exit(2);
}

if (process.argv.includes('--list') || process.argv.includes('--help')) {
  console.log('usage: node bench/all.js [--only a,b] [--skip a,b] [--list]\n');
  for (const [name, script, , what, out] of BENCHES) console.log(`${name.padEnd(11)} bench/${script.padEnd(14)} ${what} -> ${out}`);
  process.exit(0);
}
const only = list('--only');
const skip = list('--skip') ?? [];
const chosen = BENCHES.filter(([name]) => (!only || only.includes(name)) && !skip.includes(name));

// The soak is 10 minutes; bench/soak.js alone defaults to 3 (a quicker look).
process.env.BENCH_SOAK_SECONDS ??= '600';
const results = [];
for (const [name, script, args] of chosen) {
  const t0 = Date.now();
  const load = os.loadavg()[0].toFixed(2);
  console.log(`\n=== bench ${name}: node bench/${script} ${args.join(' ')} (load ${load}) ===`);
  const r = spawnSync(process.execPath, [path.join(HERE, script), ...args], { stdio: 'inherit' });
  const status = r.error ? `could not start: ${r.error.message}` : r.status === 0 ? 'done' : r.signal ? `killed by ${r.signal}` : `FAILED (exit ${r.status})`;
  results.push({ name, status, minutes: (Date.now() - t0) / 60000 });
}

console.log('\n| benchmark | result | minutes |\n|---|---|---:|');
for (const r of results) console.log(`| ${r.name} | ${r.status} | ${r.minutes.toFixed(1)} |`);
const failed = results.filter((r) => r.status !== 'done');
if (failed.length) {
  console.error(`bench/all.js: ${failed.length} of ${results.length} benchmarks failed: ${failed.map((r) => r.name).join(', ')}; rerun one with --only NAME`);
  process.exit(1);
}

#!/usr/bin/env node
// TLS against plain, side by side (docs/SECURITY.md):
//   - fio (nbd engine, libnbd + GnuTLS) on a 1 GiB memory export: blockmirror plain, blockmirror
//     --tls require, nbdkit --tls=require; 1 MiB sequential write QD8 and 4 KiB random read QD16;
//   - a cross-SS sync pair (two storage systems in one `up`), plain and with mutual TLS on the
//     peer channel: fio 4 KiB random write QD16 on the master.
// Interleaved A B B A, median of 3 (BENCH_REPS), BENCH_RUNTIME seconds per run. Prints a table;
// --append writes it into bench/RESULTS.md.
//   usage: npm run build && node bench/tls.js [--append]
import { spawn, execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { fioArgs, runFio } from './lib/fio.js';
import { freePort, NODE_FLAGS } from './lib/proc.js';
import { replaceSection } from './lib/report.js';
import { median } from './lib/stats.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const BIN = path.join(ROOT, 'bin', 'blockmirror.js');
const REPS = Number(process.env.BENCH_REPS ?? 3);
const RUNTIME = Number(process.env.BENCH_RUNTIME ?? 4);
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bm-bench-tls-'));
const procs = [];
process.on('exit', () => {
  for (const p of procs) p.kill('SIGKILL');
  fs.rmSync(dir, { recursive: true, force: true });
});

// Credentials: a CA, a server certificate for 127.0.0.1 in nbdkit's layout, and ss1/ss2 for the peer channel.
const ossl = (...a) => execFileSync('openssl', a, { cwd: dir, stdio: 'ignore' });
ossl('req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-days', '2', '-subj', '/CN=bench-ca', '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign', '-keyout', 'ca-key.pem', '-out', 'ca-cert.pem');
for (const cn of ['server', 'ss1', 'ss2']) {
  fs.writeFileSync(path.join(dir, `${cn}.ext`), 'basicConstraints=critical,CA:FALSE\nextendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n');
  ossl('req', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-subj', `/CN=${cn}`, '-keyout', `${cn}-key.pem`, '-out', `${cn}.csr`);
  ossl('x509', '-req', '-in', `${cn}.csr`, '-CA', 'ca-cert.pem', '-CAkey', 'ca-key.pem', '-CAcreateserial', '-days', '2', '-extfile', `${cn}.ext`, '-out', `${cn}-cert.pem`);
}
const certs = path.join(dir, 'certs');
fs.mkdirSync(certs);
fs.copyFileSync(path.join(dir, 'server-cert.pem'), path.join(certs, 'server-cert.pem'));
fs.copyFileSync(path.join(dir, 'server-key.pem'), path.join(certs, 'server-key.pem'));
fs.copyFileSync(path.join(dir, 'ca-cert.pem'), path.join(certs, 'ca-cert.pem'));

async function waitPort(port) {
  const net = await import('node:net');
  for (let i = 0; i < 500; i++) {
    const ok = await new Promise((r) => {
      const s = net.connect({ host: '127.0.0.1', port }, () => (s.destroy(), r(true)));
      s.on('error', () => r(false));
    });
    if (ok) return;
    await new Promise((r) => setTimeout(r, 20));
  }
  throw new Error(`nothing listens on ${port}`);
}

async function start(cmd, args, port) {
  const p = spawn(cmd, args, { stdio: 'ignore' });
  procs.push(p);
  await waitPort(port);
  return { stop: () => p.kill('SIGKILL') };
}

const servers = {
  'blockmirror plain': async (port) => ({ ...(await start(process.execPath, [...NODE_FLAGS, BIN, 'serve', '--size', '1GiB', '--listen', `127.0.0.1:${port}`, '--log-level', 'warn'], port)), uri: `nbd://127.0.0.1:${port}/` }),
  'blockmirror TLS': async (port) => ({ ...(await start(process.execPath, [...NODE_FLAGS, BIN, 'serve', '--size', '1GiB', '--listen', `127.0.0.1:${port}`, '--tls', 'require', '--tls-certificates', certs, '--log-level', 'warn'], port)), uri: `nbds://127.0.0.1:${port}/` }),
  'nbdkit TLS': async (port) => ({ ...(await start('nbdkit', ['-f', '--exit-with-parent', '-i', '127.0.0.1', '-p', String(port), '--tls=require', `--tls-certificates=${certs}`, 'memory', '1G'], port)), uri: `nbds://127.0.0.1:${port}/` }),
};

const JOBS = [
  { id: '1M seq write QD8', rw: 'write', bs: '1M', iodepth: 8, unit: 'MiB/s' },
  { id: '4k rand read QD16', rw: 'randread', bs: '4k', iodepth: 16, unit: 'IOPS' },
];

async function measure(name, job) {
  const s = await servers[name](await freePort());
  try {
    // Reads of never-written blocks are holes for us and not for nbdkit: write the region first.
    if (job.rw === 'randread') await runFio(fioArgs({ name: 'fill', uri: s.uri, rw: 'write', bs: '1M', iodepth: 8, size: '256M' }));
    const r = await runFio(fioArgs({ name: 'job', uri: s.uri, rw: job.rw, bs: job.bs, iodepth: job.iodepth, size: '256M', runtime: RUNTIME, ramp: 1 }));
    return job.unit === 'IOPS' ? r.iops : r.bwMiB;
  } finally {
    s.stop();
  }
}

/** A B B A ... over REPS, medians. */
async function pairwise(a, b, job) {
  const xs = { [a]: [], [b]: [] };
  for (let i = 0; i < REPS; i++) for (const n of i % 2 === 0 ? [a, b] : [b, a]) xs[n].push(await measure(n, job));
  return [median(xs[a]), median(xs[b])];
}

async function pairBench(tls) {
  const p = { nbd1: await freePort(), admin1: await freePort(), peer1: await freePort(), nbd2: await freePort(), admin2: await freePort(), peer2: await freePort() };
  const tlsLine = (id) => (tls ? `\n    tls: { mode: off, cert: ${dir}/ss${id}-cert.pem, key: ${dir}/ss${id}-key.pem }` : '');
  const yaml = `${tls ? `security: { ca: ${dir}/ca-cert.pem }\n` : ''}storageSystems:
  - { id: 1, nbd: "127.0.0.1:${p.nbd1}", admin: "127.0.0.1:${p.admin1}", peer: "127.0.0.1:${p.peer1}", volumes: [ { id: 1, size: 512MiB } ]${tls ? `, tls: { mode: off, cert: ${dir}/ss1-cert.pem, key: ${dir}/ss1-key.pem }` : ''} }
  - { id: 2, nbd: "127.0.0.1:${p.nbd2}", admin: "127.0.0.1:${p.admin2}", peer: "127.0.0.1:${p.peer2}", volumes: [ { id: 1, size: 512MiB } ]${tls ? `, tls: { mode: off, cert: ${dir}/ss2-cert.pem, key: ${dir}/ss2-key.pem }` : ''} }
pairs:
  - { name: p, mode: sync, master: { ss: 1, vol: 1 }, mirrors: [ { ss: 2, vol: 1 } ] }
`;
  void tlsLine;
  const file = path.join(dir, `pair-${tls ? 'tls' : 'plain'}.yaml`);
  fs.writeFileSync(file, yaml);
  const s = await start(process.execPath, [...NODE_FLAGS, BIN, 'up', '-c', file, '--log-level', 'warn'], p.admin2);
  try {
    await waitPort(p.nbd1);
    // Wait for the pair to be in PAIR (the initial copy of a blank mirror is nothing).
    const token = process.env.BLOCKMIRROR_ADMIN_TOKEN;
    for (let i = 0; i < 200; i++) {
      const r = await fetch(`http://127.0.0.1:${p.admin1}/api/pairs/p`, { headers: { authorization: `Bearer ${token}` } }).then((x) => x.json(), () => ({}));
      if (r.state === 'PAIR') break;
      await new Promise((r2) => setTimeout(r2, 50));
    }
    const r = await runFio(fioArgs({ name: 'pair', uri: `nbd://127.0.0.1:${p.nbd1}/vol1`, rw: 'randwrite', bs: '4k', iodepth: 16, size: '256M', runtime: RUNTIME, ramp: 1 }));
    return r.iops;
  } finally {
    s.stop();
  }
}

process.env.BLOCKMIRROR_ADMIN_TOKEN ??= `bench-${Math.random().toString(36).slice(2)}-${Date.now()}`;
const rows = [];
for (const job of JOBS) {
  const [tls, plain] = await pairwise('blockmirror TLS', 'blockmirror plain', job);
  const [tls2, kit] = await pairwise('blockmirror TLS', 'nbdkit TLS', job);
  rows.push(`| ${job.id} | ${tls.toFixed(0)} / ${plain.toFixed(0)} ${job.unit} | **${(tls / plain).toFixed(2)}** | ${tls2.toFixed(0)} / ${kit.toFixed(0)} ${job.unit} | **${(tls2 / kit).toFixed(2)}** |`);
  console.log(rows[rows.length - 1]);
}
const pt = [];
const pp = [];
for (let i = 0; i < REPS; i++) for (const t of i % 2 === 0 ? [true, false] : [false, true]) (t ? pt : pp).push(await pairBench(t));
const pairRow = `| cross-SS sync pair, 4k rand write QD16 on the master | ${median(pt).toFixed(0)} / ${median(pp).toFixed(0)} IOPS | **${(median(pt) / median(pp)).toFixed(2)}** | | |`;
console.log(pairRow);

const versions = `node ${process.version}, ${execFileSync('nbdkit', ['--version']).toString().trim()}, ${execFileSync('fio', ['--version']).toString().trim()}`;
const text = `Measured ${new Date().toISOString().slice(0, 10)} (${versions}; ${os.cpus().length} cores; load average ${os.loadavg().map((x) => x.toFixed(1)).join(' ')} at the end). ${REPS} interleaved runs of ${RUNTIME} s each, medians. fio's nbd engine over libnbd ${execFileSync('nbdinfo', ['--version']).toString().split('\n')[1] ?? ''} with GnuTLS; TLS 1.3, server certificate, no client certificate (fio cannot name credential files).

| job | ours TLS / ours plain | ratio (goal ≥ 0.7 on 1 MiB) | ours TLS / nbdkit TLS | ratio (goal ≥ 1.0) |
|---|---|---|---|---|
${rows.join('\n')}
${pairRow.replace('| | |', '| (goal ≥ 0.8 with mutual TLS on the peer channel) | |')}
`;
console.log(text);
if (process.argv.includes('--append')) replaceSection(path.join(ROOT, 'bench/RESULTS.md'), 'TLS against plain (bench/tls.js)', text);
process.exit(0);

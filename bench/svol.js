#!/usr/bin/env node
// S-VOL groups (docs/svol.md), against peers in the same run, interleaved A B B A:
//   - restore of a member onto a spare vs a raw nbdcopy of the same size between two exports;
//   - an RW member's writes (increments logging) vs a plain volume, fio 4k rand QD16 and 1M seq QD8;
//     after each RW run the bench waits for the member's destage to finish (and reports how long);
//   - time from a fault on an RO member to the host's reads of its logical ID flowing again, p50 and
//     p99 over --faults runs each of an EIO fault and a hang (offline, mode hang: ioTimeout decides).
//
//   node bench/svol.js [--size 256MiB] [--runtime 3] [--reps 1] [--faults 20] [--only failover|rw|restore] [--fresh] [--peer-flush] [--profile DIR]
//
// --size takes MiB or GiB (256MiB, 1GiB; a bare number is MiB). --fresh makes every restore's spare and nbdcopy's target a never-written
// file again before each run (truncated to 0 and back): a real spare often was never written, and a file
// system allocates blocks on the first write, so this is the case that counts. --peer-flush runs nbdcopy --flush
// (its copy durable at the end, as a restore's is before the remap).
// --only rw (restore) prints the write (restore) figures without touching RESULTS.md; --profile DIR runs the storage
// system under node --cpu-prof (its .cpuprofile lands in DIR when it stops).
// Writes its sections of bench/RESULTS.md. Needs a built tree (npm run build), fio, nbdcopy, qemu-io.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { fioArgs, runFio } from './lib/fio.js';
import { codeInfo, loadAvg, machineInfo } from './lib/machine.js';
import { freePort, installCleanup, NODE_FLAGS, run, startServer } from './lib/proc.js';
import { replaceSection } from './lib/report.js';
import { median } from './lib/stats.js';
import { connect } from '../dist/nbd/client/client.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const CLI = path.join(ROOT, 'bin/blockmirror.js');
const MiB = 1024 * 1024;

function arg(name, dflt) {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 ? process.argv[i + 1] : dflt;
}
if (process.argv.includes('--help') || process.argv.includes('-h')) {
  // The usage is the comment at the top of this file.
  const text = fs.readFileSync(fileURLToPath(import.meta.url), 'utf8').split('\n');
  console.log(text.slice(1, text.findIndex((l) => l.startsWith('import'))).map((l) => l.replace(/^\/\/ ?/, '')).join('\n'));
  process.exit(0);
}
const KNOWN = new Set(['--size', '--runtime', '--reps', '--faults', '--only', '--profile', '--fresh', '--peer-flush']);
for (const a of process.argv.slice(2)) {
  if (a.startsWith('--') && !KNOWN.has(a)) {
    console.error(`bench/svol.js: unknown option ${a} (see --help)`);
    process.exit(2);
  }
}
/** --size in MiB: a bare number, or with MiB or GiB. */
const sizeMiB = (() => {
  const text = arg('size', '256MiB');
  const m = /^(\d+)(MiB|GiB)?$/.exec(text);
  if (!m) {
    console.error(`bench/svol.js: --size ${text}: give MiB or GiB, e.g. 256MiB or 1GiB`);
    process.exit(2);
  }
  return Number(m[1]) * (m[2] === 'GiB' ? 1024 : 1);
})();
const runtime = Number(arg('runtime', '3'));
const reps = Number(arg('reps', '1'));
const faultRuns = Number(arg('faults', '20'));
const only = arg('only', '');
const profile = arg('profile', '');
const fresh = process.argv.includes('--fresh');
/** nbdcopy --flush: the peer's copy durable at its end, as a restore's must be before the remap. */
const peerFlush = process.argv.includes('--peer-flush');
/** The group's ioTimeout: a hang costs at least this much before the host's I/O flows again. */
const IO_TIMEOUT_MS = 1000;

installCleanup();
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bm-bench-svol-'));
const nbd = await freePort();
const admin = await freePort();
const file = path.join(dir, 'cluster.yaml');
const size = `${sizeMiB}MiB`;
fs.writeFileSync(
  file,
  `clusterSize: 64KiB
storageSystems:
  - id: 1
    nbd: 127.0.0.1:${nbd}
    admin: 127.0.0.1:${admin}
    dataDir: data
    volumes:
${[1, 2, 3, 4, 5, 6, 7, 8].map((v) => `      - { id: ${v}, size: ${size} }`).join('\n')}
      - { id: 9, size: ${sizeMiB + 4}MiB }
    svolGroups:
      - name: bench
        pvol: 1
        members:
          - { vol: 2, attr: RO }
          - { vol: 3, attr: RW, increments: 9 }
          - { vol: 4, attr: RO, logicalId: 40 }
          - { vol: 5, attr: spare }
          - { vol: 6, attr: spare }
        ioTimeout: ${IO_TIMEOUT_MS}ms
`,
);
const started = new Date();
const loadStart = loadAvg();
const up = await startServer('blockmirror up', process.execPath, [...NODE_FLAGS, ...(profile ? ['--cpu-prof', '--cpu-prof-dir', path.resolve(profile)] : []), CLI, 'up', '-c', file, '--log-level', 'warn'], { kind: 'tcp', host: '127.0.0.1', port: nbd });
const uri = (v) => `nbd://127.0.0.1:${nbd}/vol${v}`;
const cli = async (...a) => {
  const r = await run(process.execPath, [...NODE_FLAGS, CLI, ...a, '-c', file], { timeoutMs: 600_000 });
  if (r.code !== 0) throw new Error(`blockmirror ${a.join(' ')}: ${r.stderr}`);
  return r.stdout;
};
// Polled straight from the admin API: a CLI process per poll would add its start to every figure.
const api = async (method, p, body) => {
  const token = fs.readFileSync(path.join(dir, 'data', 'admin.token'), 'utf8').trim();
  const res = await fetch(`http://127.0.0.1:${admin}${p}`, {
    method,
    headers: { authorization: `Bearer ${token}`, ...(body ? { 'content-type': 'application/json' } : {}) },
    ...(body ? { body: JSON.stringify(body) } : {}),
  });
  if (!res.ok) throw new Error(`${method} ${p}: ${res.status} ${await res.text()}`);
  return res.json();
};
const query = () => api('GET', '/api/svol/bench');
const settledOn = async (ok) => {
  for (;;) {
    const s = await query();
    if (ok(s)) return s;
    await new Promise((r) => setTimeout(r, 20));
  }
};
const sh = async (cmd, a) => {
  const r = await run(cmd, a, { timeoutMs: 600_000 });
  if (r.code !== 0) throw new Error(`${cmd} ${a.join(' ')}: ${r.stderr}`);
};

/**
 * One fault on vol40's volume while a host reads vol40 (4 KiB random reads, QD1, our NBD client):
 * milliseconds from the fault being in force (the admin API answered) to the first read issued
 * after it that completes. Then the rebuild ends, the fault goes, the volume returns to the pool.
 */
async function failover(kind) {
  const g = await query();
  const phys = g.members.find((m) => m.logicalId === 40).vol;
  const host = await connect({ host: '127.0.0.1', port: nbd, exportName: 'vol40' });
  const buf = Buffer.alloc(4096);
  let faultAt = Infinity;
  let flowing;
  let errors = 0;
  let stop = false;
  const reader = (async () => {
    while (!stop) {
      const issued = performance.now();
      try {
        await host.pread(buf, 4096 * Math.floor(Math.random() * (sizeMiB * 256)));
        if (issued >= faultAt && flowing === undefined) flowing = performance.now() - faultAt;
      } catch {
        errors++;
      }
    }
  })();
  await new Promise((r) => setTimeout(r, 50));
  const target = encodeURIComponent(`1:${phys}`);
  await api('PUT', `/api/faults/${target}/${kind === 'hang' ? 'offline' : 'error'}`, kind === 'hang' ? { mode: 'hang' } : { op: 'read' });
  faultAt = performance.now();
  await settledOn(() => flowing !== undefined);
  await settledOn((s) => !s.restore && s.members.find((m) => m.logicalId === 40).state === 'split' && s.members.find((m) => m.logicalId === 40).vol !== phys);
  stop = true;
  await reader;
  await host.close();
  await api('DELETE', `/api/faults/${target}`);
  await api('POST', '/api/svol/bench/attr', { member: phys, attr: 'spare' });
  if (errors) throw new Error(`${errors} host reads failed during a ${kind} fault: the host must never see the failure`);
  return flowing;
}

function pct(xs, p) {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.ceil((p / 100) * s.length) - 1)];
}

try {
  for (const v of [1, 7]) await sh('qemu-io', ['-f', 'raw', '-c', `write -P 0x5a 0 ${sizeMiB}M`, uri(v)]);
  await cli('svol', 'init', 'bench', '--wait');
  await cli('svol', 'split', 'bench');

  // Fault to I/O flowing again: EIO and hang runs interleaved.
  const flow = { eio: [], hang: [] };
  if (only === '' || only === 'failover') {
  for (let r = 0; r < faultRuns; r++) for (const kind of r % 2 ? ['hang', 'eio'] : ['eio', 'hang']) flow[kind].push(await failover(kind));
  const fm = machineInfo();
  const fcode = codeInfo(ROOT);
  const frow = (label, xs) => `| ${label} | ${xs.length} | ${pct(xs, 50).toFixed(1)} ms | ${pct(xs, 99).toFixed(1)} ms | ${Math.max(...xs).toFixed(1)} ms |`;
  const ftext = `## S-VOL groups: fault to host I/O flowing again (bench/svol.js)

Run ${started.toISOString()} on ${fm.cpuModel}, nproc ${os.cpus().length}; Node ${process.version}; commit ${fcode.head}.
Load average at start ${loadStart}, at end ${loadAvg()}. ${sizeMiB} MiB volumes in files, clusterSize 64 KiB, ioTimeout ${IO_TIMEOUT_MS} ms.
A host reads vol40 (an RO member) with 4 KiB random reads, one at a time, through our NBD client; a fault is
set on vol40's volume through the admin API; the figure is the time from the API's answer to the end of
the first read issued after it. Each run then waits for the rebuild on a spare, clears the fault and returns
the volume to the pool. No host read failed in any run (the bench stops if one does).

| fault | runs | p50 | p99 | max |
|---|---:|---:|---:|---:|
${frow('EIO on read (the read is served by a sibling at once)', flow.eio)}
${frow(`offline, mode hang (failed after ioTimeout ${IO_TIMEOUT_MS} ms)`, flow.hang)}
`;
  replaceSection(path.join(ROOT, 'bench/RESULTS.md'), 'svol-failover', ftext);
  process.stdout.write(ftext);
  }

  // Restore vs nbdcopy, A B B A.
  const copyS = [];
  const restoreS = [];
  const volFile = (v) => path.join(dir, 'data', `vol${v}.img`);
  /** Frees every block of a volume's file: the next write to it is a first write, as on a new spare. */
  const unwrite = (v) => {
    fs.truncateSync(volFile(v), 0);
    fs.truncateSync(volFile(v), sizeMiB * MiB);
  };
  // Every step starts with nothing dirty in the page cache: on ext4 (data=ordered) the journal commit that a
  // flush of a newly allocated file forces writes out every file's newly allocated dirty data, so without
  // this a restore's first flush pays for the nbdcopy before it, which never flushes.
  const settle = () => sh('sync', []);
  const nbdcopy = async () => {
    if (fresh) unwrite(8);
    await settle();
    const t = performance.now();
    await sh('nbdcopy', [...(peerFlush ? ['--flush'] : []), uri(7), uri(8)]);
    copyS.push((performance.now() - t) / 1000);
  };
  const restore = async () => {
    const g = await query();
    const phys = g.members.find((m) => m.logicalId === 40).vol;
    if (fresh) for (const m of g.members) if (m.attr === 'spare') unwrite(m.vol);
    await cli('fault', 'set', `1:${phys}`, 'error', '--op', 'read');
    await settle();
    const t = performance.now();
    await sh('qemu-io', ['-f', 'raw', '-r', '-c', 'read 0 4k', uri(40)]);
    for (;;) {
      const s = await query();
      if (!s.restore && s.members.find((m) => m.logicalId === 40).state === 'split') break;
      await new Promise((r) => setTimeout(r, 20));
    }
    restoreS.push((performance.now() - t) / 1000);
    await cli('fault', 'clear', `1:${phys}`);
    await cli('svol', 'attr', 'bench', String(phys), 'spare');
  };
  if (only === '' || only === 'restore') for (let r = 0; r < reps; r++) for (const step of [nbdcopy, restore, restore, nbdcopy]) await step();
  if (only === 'restore') {
    const c = median(copyS);
    const rs = median(restoreS);
    process.stdout.write(`restore ${rs.toFixed(2)} s (${restoreS.map((x) => x.toFixed(2)).join(' ')}), nbdcopy ${c.toFixed(2)} s (${copyS.map((x) => x.toFixed(2)).join(' ')}), ratio ${(c / rs).toFixed(2)}${fresh ? ', every target never written' : ''}${peerFlush ? ', nbdcopy --flush' : ''}; load ${loadAvg()}\n`);
  }

  // RW member vs plain volume, A B B A per job.
  const jobs = [
    { label: '4k rand write QD16', rw: 'randwrite', bs: '4k', iodepth: 16, unit: 'IOPS', pick: (x) => x.iops },
    { label: '1M seq write QD8', rw: 'write', bs: '1M', iodepth: 8, unit: 'MiB/s', pick: (x) => x.bwMiB },
  ];
  const rows = [];
  for (const j of only === '' || only === 'rw' ? jobs : []) {
    const plain = [];
    const rwm = [];
    const drains = [];
    const one = async (vol, into) => {
      const res = await runFio(fioArgs({ name: 'svol', uri: uri(vol), rw: j.rw, bs: j.bs, iodepth: j.iodepth, size: `${sizeMiB}M`, runtime, ramp: 1 }));
      into.push(j.pick(res));
      // The RW member's volume catches up behind the host (destage): the next run starts once it
      // has, so no run pays for the one before. The time it took is reported.
      if (vol !== 3) return;
      const t = performance.now();
      while ((await query()).members.find((m) => m.logicalId === 3).destagePending > 0) await new Promise((r) => setTimeout(r, 20));
      drains.push((performance.now() - t) / 1000);
    };
    for (let r = 0; r < reps; r++) for (const [vol, into] of [[7, plain], [3, rwm], [3, rwm], [7, plain]]) await one(vol, into);
    rows.push({ ...j, plain: median(plain), rwm: median(rwm), drain: median(drains), runs: { plain, rwm } });
  }

  if (only === 'rw') {
    for (const r of rows) process.stdout.write(`${r.label}: RW member ${r.rwm.toFixed(0)} ${r.unit}, plain ${r.plain.toFixed(0)} ${r.unit}, ratio ${(r.rwm / r.plain).toFixed(2)} (runs: RW ${r.runs.rwm.map((x) => x.toFixed(0)).join(' ')}, plain ${r.runs.plain.map((x) => x.toFixed(0)).join(' ')}); destage after the run ${r.drain.toFixed(2)} s; load ${loadAvg()}\n`);
  }
  if (only === '') {
  const m = machineInfo();
  const code = codeInfo(ROOT);
  const fmt = (v, unit) => (unit === 'IOPS' ? `${Math.round(v).toLocaleString('en')} IOPS` : `${v.toFixed(0)} MiB/s`);
  const copyMed = median(copyS);
  const restoreMed = median(restoreS);
  const text = `## S-VOL groups (bench/svol.js)

Run ${started.toISOString()} on ${m.cpuModel}, nproc ${os.cpus().length}; Node ${process.version}; commit ${code.head}.
Load average at start ${loadStart}, at end ${loadAvg()}. ${sizeMiB} MiB volumes in files, clusterSize 64 KiB, ${reps} round(s) of A B B A, fio ${runtime} s after a 1 s ramp.
A short first run on a shared 2-core machine: rerun on a quiet one for figures to rely on.

| measure | ours | peer | ratio | goal | met? |
|---|---:|---:|---:|---:|:---:|
| restore of a ${sizeMiB} MiB RO member onto a spare (fault to remapped) vs nbdcopy of ${sizeMiB} MiB between two exports | ${restoreMed.toFixed(2)} s | ${copyMed.toFixed(2)} s | ${(copyMed / restoreMed).toFixed(2)} | ≥ 0.8 | ${copyMed / restoreMed >= 0.8 ? 'yes' : '**no**'} |
${rows.map((r) => `| RW member ${r.label} vs a plain volume | ${fmt(r.rwm, r.unit)} | ${fmt(r.plain, r.unit)} | ${(r.rwm / r.plain).toFixed(2)} | ≥ 0.7 | ${r.rwm / r.plain >= 0.7 ? 'yes' : '**no**'} |`).join('\n')}

Each run, in the order run (A B B A): restore ${restoreS.map((x) => x.toFixed(2)).join(' / ')} s, nbdcopy ${copyS.map((x) => x.toFixed(2)).join(' / ')} s;
${rows.map((r) => `${r.label}: RW member ${r.runs.rwm.map((x) => x.toFixed(0)).join(' / ')}, plain ${r.runs.plain.map((x) => x.toFixed(0)).join(' / ')} ${r.unit}`).join('; ')}.
The restore copies 4 runs of 1 MiB at once, flushes every 16 MiB beside the copy and once before the remap (nbdcopy
does not flush). The RW member's first write to each cluster after the split copies the cluster's base into its
increments slot (64 KiB read and written for a 4 KiB write), so its first 4k run is the slow one until every cluster
was written once.

Time from fault to the host's I/O flowing again: the section "fault to host I/O flowing again" below.
`;
  replaceSection(path.join(ROOT, 'bench/RESULTS.md'), 'svol', text);
  process.stdout.write(text);
  }
} finally {
  await up.stop();
  fs.rmSync(dir, { recursive: true, force: true });
}

#!/usr/bin/env node
// S-VOL groups (docs/svol.md), against peers in the same run, interleaved A B B A:
//   - restore of a member onto a spare vs a raw nbdcopy of the same size between two exports;
//   - an RW member's writes (increments logging) vs a plain volume, fio 4k rand QD16 and 1M seq QD8.
//
//   node bench/svol.js [--size 256MiB] [--runtime 3] [--reps 1]
//
// Writes its section of bench/RESULTS.md. Needs a built tree (npm run build), fio, nbdcopy, qemu-io.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { fioArgs, runFio } from './lib/fio.js';
import { codeInfo, loadAvg, machineInfo } from './lib/machine.js';
import { freePort, installCleanup, run, startServer } from './lib/proc.js';
import { replaceSection } from './lib/report.js';
import { median } from './lib/stats.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const CLI = path.join(ROOT, 'bin/blockmirror.js');
const MiB = 1024 * 1024;

function arg(name, dflt) {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 ? process.argv[i + 1] : dflt;
}
const sizeMiB = parseInt(arg('size', '256MiB'), 10);
const runtime = Number(arg('runtime', '3'));
const reps = Number(arg('reps', '1'));

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
`,
);
const started = new Date();
const loadStart = loadAvg();
const up = await startServer('blockmirror up', process.execPath, [CLI, 'up', '-c', file, '--log-level', 'warn'], { kind: 'tcp', host: '127.0.0.1', port: nbd });
const uri = (v) => `nbd://127.0.0.1:${nbd}/vol${v}`;
const cli = async (...a) => {
  const r = await run(process.execPath, [CLI, ...a, '-c', file], { timeoutMs: 600_000 });
  if (r.code !== 0) throw new Error(`blockmirror ${a.join(' ')}: ${r.stderr}`);
  return r.stdout;
};
// Polled straight from the admin API: a CLI process per poll would add its start to every figure.
const query = async () => {
  const token = fs.readFileSync(path.join(dir, 'data', 'admin.token'), 'utf8').trim();
  const res = await fetch(`http://127.0.0.1:${admin}/api/svol/bench`, { headers: { authorization: `Bearer ${token}` } });
  if (!res.ok) throw new Error(`GET /api/svol/bench: ${res.status} ${await res.text()}`);
  return res.json();
};
const sh = async (cmd, a) => {
  const r = await run(cmd, a, { timeoutMs: 600_000 });
  if (r.code !== 0) throw new Error(`${cmd} ${a.join(' ')}: ${r.stderr}`);
};

try {
  for (const v of [1, 7]) await sh('qemu-io', ['-f', 'raw', '-c', `write -P 0x5a 0 ${sizeMiB}M`, uri(v)]);
  await cli('svol', 'init', 'bench', '--wait');
  await cli('svol', 'split', 'bench');

  // Restore vs nbdcopy, A B B A.
  const copyS = [];
  const restoreS = [];
  const nbdcopy = async () => {
    const t = performance.now();
    await sh('nbdcopy', [uri(7), uri(8)]);
    copyS.push((performance.now() - t) / 1000);
  };
  const restore = async () => {
    const g = await query();
    const phys = g.members.find((m) => m.logicalId === 40).vol;
    await cli('fault', 'set', `1:${phys}`, 'error', '--op', 'read');
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
  for (let r = 0; r < reps; r++) for (const step of [nbdcopy, restore, restore, nbdcopy]) await step();

  // RW member vs plain volume, A B B A per job.
  const jobs = [
    { label: '4k rand write QD16', rw: 'randwrite', bs: '4k', iodepth: 16, unit: 'IOPS', pick: (x) => x.iops },
    { label: '1M seq write QD8', rw: 'write', bs: '1M', iodepth: 8, unit: 'MiB/s', pick: (x) => x.bwMiB },
  ];
  const rows = [];
  for (const j of jobs) {
    const plain = [];
    const rwm = [];
    const one = async (vol, into) => {
      const res = await runFio(fioArgs({ name: 'svol', uri: uri(vol), rw: j.rw, bs: j.bs, iodepth: j.iodepth, size: `${sizeMiB}M`, runtime, ramp: 1 }));
      into.push(j.pick(res));
    };
    for (let r = 0; r < reps; r++) for (const [vol, into] of [[7, plain], [3, rwm], [3, rwm], [7, plain]]) await one(vol, into);
    rows.push({ ...j, plain: median(plain), rwm: median(rwm) });
  }

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

Not measured yet: time from fault to the host's I/O flowing again (p50/p99 over 20 runs).
`;
  replaceSection(path.join(ROOT, 'bench/RESULTS.md'), 'svol', text);
  process.stdout.write(text);
} finally {
  await up.stop();
  fs.rmSync(dir, { recursive: true, force: true });
}

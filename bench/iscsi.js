#!/usr/bin/env node
// iSCSI benchmark: `blockmirror serve --iscsi` (memory LUN) against tgtd (LUN on a /dev/shm file),
// in the same run, interleaved A B B A A B, median of the runs, ratio printed, our RSS.
//   reads:  iscsi-perf (libiscsi) 4 KiB random QD32, 128 KiB and 1 MiB sequential QD8
//   writes: qemu-img bench -w over qemu's libiscsi driver (iscsi-perf only reads), 4 KiB QD32 and
//           1 MiB QD8, sequential, as many requests as fill about --seconds at the first run's rate
//   usage: node bench/iscsi.js [--seconds N] [--only WORD] [--append]   (--append rewrites its section of bench/RESULTS.md)
//   --only keeps the jobs whose name contains WORD (e.g. "write"); --cpu-prof profiles our target.
import { spawn, execFileSync } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { replaceSection } from './lib/report.js';
import { NODE_FLAGS } from './lib/proc.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const args = process.argv.slice(2);
const seconds = Number(args[args.indexOf('--seconds') + 1] || 5) || 5;
const only = args.includes('--only') ? args[args.indexOf('--only') + 1] : undefined;
const cpuProf = args.includes('--cpu-prof');
const SIZE = 256 << 20;

const freePort = () => new Promise((r) => { const s = net.createServer(); s.listen(0, '127.0.0.1', () => { const p = s.address().port; s.close(() => r(p)); }); });
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
async function waitPort(port) {
  for (let i = 0; i < 300; i++) {
    const ok = await new Promise((r) => { const s = net.connect({ host: '127.0.0.1', port }, () => { s.destroy(); r(true); }); s.on('error', () => r(false)); });
    if (ok) return;
    await sleep(20);
  }
  throw new Error(`nothing listens on ${port}`);
}
/** CPU seconds a process (all its threads) has used: utime + stime from /proc, 100 ticks a second. */
const cpuSeconds = (pid) => {
  const f = fs.readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1].split(' ');
  return (Number(f[11]) + Number(f[12])) / 100;
};
const rss = (pid) => Number(/VmRSS:\s+(\d+)/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'))[1]) * 1024;

async function ours() {
  const port = await freePort();
  const iport = await freePort();
  const prof = cpuProf ? ['--cpu-prof', '--cpu-prof-dir', path.join(os.tmpdir(), 'bm-iscsi-prof')] : [];
  const p = spawn(process.execPath, [...NODE_FLAGS, ...prof, path.join(ROOT, 'bin/blockmirror.js'), 'serve', '--size', String(SIZE), '--listen', `127.0.0.1:${port}`, '--iscsi', `127.0.0.1:${iport}`, '--log-level', 'warn'], { stdio: 'ignore' });
  await waitPort(iport);
  // SIGTERM when profiling: the profile is written at a clean exit.
  const exited = new Promise((r) => p.once('exit', r));
  return { name: 'blockmirror', url: `iscsi://127.0.0.1:${iport}/iqn.2026-12.org.blockmirror:serve/0`, pid: p.pid, stop: () => (p.kill(cpuProf ? 'SIGTERM' : 'SIGKILL'), exited) };
}

async function tgt() {
  const file = path.join(fs.existsSync('/dev/shm') ? '/dev/shm' : os.tmpdir(), `bm-bench-tgt-${process.pid}.img`);
  fs.writeFileSync(file, '');
  fs.truncateSync(file, SIZE);
  const port = await freePort();
  const control = 100 + Math.floor(Math.random() * 9000);
  // tgt at its best: with glibc's default malloc, each of its I/O threads gets every 128 KiB+ read buffer
  // from a fresh mmap and gives it back with munmap (strace: one munmap per READ), so every read pays
  // page faults on new memory: 79 MB/s at 128 KiB QD8 here. A fixed mmap threshold keeps those buffers
  // in malloc's arenas: 941 MB/s in the same minute. Its default 16 I/O threads beat 1, 2 and 4 here.
  const env = { ...process.env, MALLOC_MMAP_THRESHOLD_: String(4 << 20) };
  const p = spawn('tgtd', ['-f', '--iscsi', `portal=127.0.0.1:${port}`, '-C', String(control)], { stdio: 'ignore', env });
  await waitPort(port);
  const adm = (...a) => execFileSync('tgtadm', ['-C', String(control), '--lld', 'iscsi', ...a]);
  adm('--op', 'new', '--mode', 'target', '--tid', '1', '-T', 'iqn.2026-12.bench:tgt');
  adm('--op', 'new', '--mode', 'logicalunit', '--tid', '1', '--lun', '1', '-b', file);
  adm('--op', 'bind', '--mode', 'target', '--tid', '1', '-I', 'ALL');
  return { name: 'tgt', url: `iscsi://127.0.0.1:${port}/iqn.2026-12.bench:tgt/1`, pid: p.pid, stop: () => { p.kill('SIGKILL'); fs.rmSync(file, { force: true }); } };
}

/** Write every block first, so both targets read allocated data (ours would otherwise serve holes as zeroes). */
function prefill(url) {
  execFileSync('qemu-io', ['-f', 'raw', '-c', `write -P 0x5a 0 ${SIZE}`, url], { stdio: 'ignore' });
}

function perf(url, qd, blocks, random) {
  return new Promise((resolve) => {
    const p = spawn('iscsi-perf', ['-m', String(qd), '-b', String(blocks), ...(random ? ['-r'] : []), url], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    p.stdout.on('data', (d) => (out += d));
    p.stderr.on('data', (d) => (out += d));
    setTimeout(() => p.kill('SIGINT'), seconds * 1000);
    p.on('close', () => {
      const all = [...out.matchAll(/iops average (\d+) \((\d+) MB\/s\)/g)];
      const last = all[all.length - 1];
      resolve(last ? { iops: Number(last[1]), mbs: Number(last[2]), ops: Number(last[1]) * seconds } : { iops: 0, mbs: 0, ops: 0 });
    });
  });
}

/** qemu-img bench -w: `count` sequential writes of `size` bytes, `qd` in flight; wraps at the end of the LUN. */
function qemuBench(url, qd, size, count) {
  return new Promise((resolve, reject) => {
    const p = spawn('qemu-img', ['bench', '-f', 'raw', '-w', '-s', String(size), '-d', String(qd), '-c', String(count), url], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    p.stdout.on('data', (d) => (out += d));
    p.stderr.on('data', (d) => (out += d));
    p.on('close', (code) => {
      const m = /Run completed in ([\d.]+) seconds/.exec(out);
      if (code !== 0 || !m) return reject(new Error(`qemu-img bench failed: ${out.trim()}`));
      const s = Number(m[1]);
      resolve({ iops: Math.round(count / s), mbs: Math.round((count * size) / s / 1e6), ops: count });
    });
  });
}

const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

const jobs = [
  { name: '4 KiB random read QD32', qd: 32, blocks: 8, random: true, unit: 'iops' },
  { name: '128 KiB sequential read QD8', qd: 8, blocks: 256, random: false, unit: 'mbs' },
  { name: '1 MiB sequential read QD8', qd: 8, blocks: 2048, random: false, unit: 'mbs' },
  { name: '4 KiB sequential write QD32', qd: 32, size: 4096, write: true, unit: 'iops' },
  { name: '1 MiB sequential write QD8', qd: 8, size: 1 << 20, write: true, unit: 'mbs' },
].filter((j) => !only || j.name.includes(only));

/** A write job's request count: what a probe of 64 MiB (outside the measured runs) says fills about `seconds`. */
async function calibrate(j, url) {
  const probe = await qemuBench(url, j.qd, j.size, Math.max(j.qd * 4, Math.round((64 << 20) / j.size)));
  j.count = Math.max(j.qd * 4, Math.round(probe.iops * seconds));
}

function runJob(j, url) {
  return j.write ? qemuBench(url, j.qd, j.size, j.count) : perf(url, j.qd, j.blocks, j.random);
}

const load0 = os.loadavg().map((x) => x.toFixed(2)).join(' ');
const a = await ours();
const b = await tgt();
// Reads need allocated data on both; writes do not (and a profile of writes stays about writes).
if (jobs.some((j) => !j.write)) {
  prefill(a.url);
  prefill(b.url);
}
const rows = [];
let peakRss = 0;
try {
  for (const j of jobs) {
    const res = { blockmirror: [], tgt: [] };
    // Target CPU per request: unlike throughput, it hardly depends on how busy the shared machine is.
    const cpu = { blockmirror: [], tgt: [] };
    if (j.write) await calibrate(j, a.url);
    for (const t of [a, b, b, a, a, b]) {
      const c0 = cpuSeconds(t.pid);
      const r = await runJob(j, t.url);
      res[t.name].push(r[j.unit]);
      if (r.ops > 0) cpu[t.name].push(((cpuSeconds(t.pid) - c0) / r.ops) * 1e6);
      if (t === a) peakRss = Math.max(peakRss, rss(a.pid));
    }
    const m = { ours: median(res.blockmirror), tgt: median(res.tgt) };
    const us = { oursCpu: median(cpu.blockmirror), tgtCpu: median(cpu.tgt) };
    rows.push({ job: j.name, unit: j.unit === 'iops' ? 'IOPS' : 'MB/s', ...m, ...us, ratio: m.tgt ? m.ours / m.tgt : NaN });
  }
} finally {
  await a.stop();
  b.stop();
}
const load = os.loadavg().map((x) => x.toFixed(2)).join(' ');
const node = process.version;
const tgtVer = (() => { try { return execFileSync('dpkg-query', ['-W', '-f', '${Version}', 'tgt']).toString(); } catch { return '?'; } })();
const commit = (() => { try { return execFileSync('git', ['-C', ROOT, 'rev-parse', '--short', 'HEAD']).toString().trim(); } catch { return '?'; } })();
let text = `\n## iSCSI target vs tgt (${new Date().toISOString().slice(0, 10)}, commit ${commit}, node ${node}, tgt ${tgtVer}, ${seconds} s per run, median of 3, interleaved A B B A A B; shared 2-core machine; load average at start ${load0}, at end ${load})\n\n| job | blockmirror | tgt | ratio | target CPU per request, ours / tgt |\n|---|---|---|---|---|\n`;
for (const r of rows) text += `| ${r.job} | ${r.ours} ${r.unit} | ${r.tgt} ${r.unit} | ${r.ratio.toFixed(2)}x | ${r.oursCpu?.toFixed(1)} / ${r.tgtCpu?.toFixed(1)} µs |\n`;
text += `\nblockmirror RSS peak during the run: ${(peakRss / 1048576).toFixed(0)} MiB. The LUNs: 256 MiB${jobs.some((j) => !j.write) ? ', written in full first' : ''}, ours in memory, tgt's on /dev/shm (tgtd with its default 16 I/O threads and MALLOC_MMAP_THRESHOLD_=4 MiB: see tgt() in the script). Reads: iscsi-perf; writes: qemu-img bench -w (qemu's libiscsi driver), sequential, wrapping at the end of the LUN.\n`;
console.log(text);
if (args.includes('--append')) replaceSection(path.join(ROOT, 'bench/RESULTS.md'), 'iscsi', text);

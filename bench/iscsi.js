#!/usr/bin/env node
// iSCSI benchmark: iscsi-perf against `blockmirror serve --iscsi` (memory LUN) and tgtd (LUN on a
// /dev/shm file), in the same run, interleaved A B B A, median of the runs, ratio printed, our RSS.
//   jobs: 4 KiB random reads QD32, 128 KiB sequential reads QD8
//   usage: node bench/iscsi.js [--seconds N] [--append]   (append writes bench/RESULTS.md)
import { spawn, execFileSync } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const args = process.argv.slice(2);
const seconds = Number(args[args.indexOf('--seconds') + 1] || 5) || 5;
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
const rss = (pid) => Number(/VmRSS:\s+(\d+)/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'))[1]) * 1024;

async function ours() {
  const port = await freePort();
  const iport = await freePort();
  const p = spawn(process.execPath, [path.join(ROOT, 'bin/blockmirror.js'), 'serve', '--size', String(SIZE), '--listen', `127.0.0.1:${port}`, '--iscsi', `127.0.0.1:${iport}`, '--log-level', 'warn'], { stdio: 'ignore' });
  await waitPort(iport);
  return { name: 'blockmirror', url: `iscsi://127.0.0.1:${iport}/iqn.2026-12.org.blockmirror:serve/0`, pid: p.pid, stop: () => p.kill('SIGKILL') };
}

async function tgt() {
  const file = path.join(fs.existsSync('/dev/shm') ? '/dev/shm' : os.tmpdir(), `bm-bench-tgt-${process.pid}.img`);
  fs.writeFileSync(file, '');
  fs.truncateSync(file, SIZE);
  const port = await freePort();
  const control = 100 + Math.floor(Math.random() * 9000);
  const p = spawn('tgtd', ['-f', '--iscsi', `portal=127.0.0.1:${port}`, '-C', String(control)], { stdio: 'ignore' });
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
      resolve(last ? { iops: Number(last[1]), mbs: Number(last[2]) } : { iops: 0, mbs: 0 });
    });
  });
}

const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

const jobs = [
  { name: '4 KiB random read QD32', qd: 32, blocks: 8, random: true, unit: 'iops' },
  { name: '128 KiB sequential read QD8', qd: 8, blocks: 256, random: false, unit: 'mbs' },
];

const a = await ours();
const b = await tgt();
prefill(a.url);
prefill(b.url);
const rows = [];
let peakRss = 0;
try {
  for (const j of jobs) {
    const res = { blockmirror: [], tgt: [] };
    for (const t of [a, b, b, a, a, b]) {
      const r = await perf(t.url, j.qd, j.blocks, j.random);
      res[t.name].push(r[j.unit]);
      if (t === a) peakRss = Math.max(peakRss, rss(a.pid));
    }
    const m = { ours: median(res.blockmirror), tgt: median(res.tgt) };
    rows.push({ job: j.name, unit: j.unit === 'iops' ? 'IOPS' : 'MB/s', ...m, ratio: m.tgt ? m.ours / m.tgt : NaN });
  }
} finally {
  a.stop();
  b.stop();
}
const load = os.loadavg().map((x) => x.toFixed(2)).join(' ');
const node = process.version;
const tgtVer = (() => { try { return execFileSync('dpkg-query', ['-W', '-f', '${Version}', 'tgt']).toString(); } catch { return '?'; } })();
let text = `\n## iSCSI target vs tgt (${new Date().toISOString().slice(0, 10)}, node ${node}, tgt ${tgtVer}, ${seconds} s per run, median of 3, interleaved A B B A A B; shared 2-core machine; load average ${load})\n\n| job | blockmirror | tgt | ratio |\n|---|---|---|---|\n`;
for (const r of rows) text += `| ${r.job} | ${r.ours} ${r.unit} | ${r.tgt} ${r.unit} | ${r.ratio.toFixed(2)}x |\n`;
text += `\nblockmirror RSS peak during the run: ${(peakRss / 1048576).toFixed(0)} MiB. The LUNs: 256 MiB, written in full first, ours in memory, tgt's on /dev/shm.\n`;
console.log(text);
if (args.includes('--append')) fs.appendFileSync(path.join(ROOT, 'bench/RESULTS.md'), text);

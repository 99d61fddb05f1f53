#!/usr/bin/env node
// Cost as the volumes grow (issue 18, "Scale and memory"): sparse file volumes of 1, 16 and 64 GiB
// in a data directory, one sync pair (master + mirror) per size, clusterSize 64 KiB. Per size:
//
//   start-up      `blockmirror up` from spawn until the admin API answers and the pair is in PAIR,
//                 first start (files created) and restart (files and bitmap opened);
//   bitmap        the in-memory bitset (1 bit per cluster per mirror), the pair's per-cluster
//                 write bookkeeping, and the bitmap file (size and blocks allocated);
//   RSS           VmRSS after start and VmHWM at the end, from /proc/PID/status;
//   resync        split, K 4 KiB host writes on the master at clusters spread evenly over the
//                 whole volume, resync, time until PAIR; for two values of K. Linear in K and
//                 flat in the volume size is the goal.
//
// Sizes are interleaved: for each repetition, 1 16 64 then 64 16 1 (A B C C B A), one `up` per
// size kept running for the whole run; medians of the repetitions.
//   usage: npm run build && node bench/scale.js [--reps N] [--sizes 1,16,64] [--k 64,512] [--append]
// --append writes a table into bench/RESULTS.md and the plot to bench/scale.svg; the raw figures
// go to bench/out/last-scale.json (--from-json FILE redraws the plot from them).
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { freePort, installCleanup, NODE_FLAGS } from './lib/proc.js';
import { replaceSection } from './lib/report.js';
import { median } from './lib/stats.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const BIN = path.join(ROOT, 'bin', 'blockmirror.js');
const { connect } = await import(path.join(ROOT, 'dist', 'nbd', 'client.js'));
const arg = (name, dflt) => {
  const i = process.argv.indexOf(name);
  return i > 0 ? process.argv[i + 1] : dflt;
};
const REPS = Number(arg('--reps', process.env.BENCH_REPS ?? 3));
const SIZES = arg('--sizes', '1,16,64').split(',').map(Number);
const KS = arg('--k', '64,512').split(',').map(Number);
const APPEND = process.argv.includes('--append');
// --from-json FILE: redraw bench/scale.svg from a saved run (bench/out/last-scale.json) and stop.
const FROM = arg('--from-json', undefined);
if (FROM) {
  fs.writeFileSync(path.join(ROOT, 'bench', 'scale.svg'), `${svg(JSON.parse(fs.readFileSync(FROM, 'utf8')).plot)}\n`);
  process.exit(0);
}
const CLUSTER = 64 * 1024;
const TOKEN = 'bench-scale-token';

installCleanup();
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bm-bench-scale-'));
process.on('exit', () => fs.rmSync(dir, { recursive: true, force: true }));
const env = { ...process.env, BLOCKMIRROR_ADMIN_TOKEN: TOKEN };

function procStatus(pid) {
  const s = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
  const kb = (k) => Number(new RegExp(`^${k}:\\s+(\\d+) kB`, 'm').exec(s)?.[1] ?? NaN) * 1024;
  return { rss: kb('VmRSS'), hwm: kb('VmHWM') };
}

async function api(sys, method, p) {
  const r = await fetch(`http://127.0.0.1:${sys.admin}${p}`, { method, headers: { authorization: `Bearer ${TOKEN}` } });
  if (!r.ok) throw new Error(`${method} ${p}: ${r.status} ${await r.text()}`);
  return r.json();
}

async function pairState(sys) {
  const s = await api(sys, 'GET', '/api/status');
  return s.pairs.find((p) => p.name === 'p1');
}

async function waitState(sys, state, ms = 600_000) {
  const deadline = Date.now() + ms;
  for (;;) {
    const p = await pairState(sys).catch(() => undefined);
    if (p?.state === state) return p;
    if (Date.now() > deadline) throw new Error(`pair of ${sys.gib} GiB not in ${state} (is ${p?.state})`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

/** Start `up` for one size; resolves with the time until the pair is in PAIR. */
async function start(sys) {
  const t0 = performance.now();
  sys.child = spawn(process.execPath, [...NODE_FLAGS, BIN, 'up', '-c', sys.config, '--log-level', 'warn'], { env, stdio: ['ignore', 'ignore', 'inherit'] });
  process.on('exit', () => sys.child.kill('SIGKILL'));
  for (let i = 0; ; i++) {
    const r = await fetch(`http://127.0.0.1:${sys.admin}/healthz`).catch(() => undefined);
    if (r?.ok) break;
    if (sys.child.exitCode !== null) throw new Error(`up for ${sys.gib} GiB exited with ${sys.child.exitCode}`);
    await new Promise((r) => setTimeout(r, 5));
  }
  const healthy = performance.now() - t0;
  await waitState(sys, 'PAIR');
  return { healthy, pair: performance.now() - t0 };
}

async function stop(sys) {
  const exited = new Promise((r) => sys.child.once('exit', r));
  sys.child.kill('SIGTERM');
  await exited;
}

const systems = [];
for (const gib of SIZES) {
  const [nbd, admin] = [await freePort(), await freePort()];
  const d = path.join(dir, `ss-${gib}g`);
  fs.mkdirSync(d);
  const config = path.join(d, 'cluster.yaml');
  fs.writeFileSync(
    config,
    `clusterSize: 64KiB
storageSystems:
  - id: 1
    nbd: 127.0.0.1:${nbd}
    admin: 127.0.0.1:${admin}
    dataDir: data
    volumes:
      - { id: 1, size: ${gib}GiB }
      - { id: 2, size: ${gib}GiB }
pairs:
  - { name: p1, mode: sync, master: { ss: 1, vol: 1 }, mirrors: [ { ss: 1, vol: 2 } ] }
`,
  );
  systems.push({ gib, nbd, admin, config, data: path.join(d, 'data'), clusters: (gib * 2 ** 30) / CLUSTER });
}

const load0 = os.loadavg();
// First starts (the files are created), then restarts (opened), interleaved A B C C B A.
for (const s of systems) s.first = await start(s);
for (const s of systems) s.rssStart = procStatus(s.child.pid).rss;
for (const s of [...systems].reverse()) await stop(s);
for (const s of systems) s.restarts = [];
for (const s of [...systems].reverse()) s.restarts.push(await start(s));

async function resync(sys, k) {
  const client = await connect({ host: '127.0.0.1', port: sys.nbd, exportName: 'vol1' });
  try {
    await api(sys, 'POST', '/api/pairs/p1/split');
    await waitState(sys, 'PSUS');
    const data = Buffer.alloc(4096, k & 0xff);
    for (let i = 0; i < k; i++) await client.pwrite(data, Math.floor((i * sys.clusters) / k) * CLUSTER);
    const before = await pairState(sys);
    const invalid = before.mirrors[0].invalidClusters;
    if (invalid !== k) throw new Error(`${sys.gib} GiB: ${invalid} Invalid clusters after ${k} writes`);
    const t0 = performance.now();
    await api(sys, 'POST', '/api/pairs/p1/resync');
    await waitState(sys, 'PAIR');
    return performance.now() - t0;
  } finally {
    await client.disconnect();
  }
}

for (const s of systems) s.resync = new Map(KS.map((k) => [k, []]));
for (let rep = 0; rep < REPS; rep++) {
  const order = rep % 2 === 0 ? systems : [...systems].reverse();
  for (const k of KS) for (const s of order) s.resync.get(k).push(await resync(s, k));
}
for (const s of systems) {
  s.end = procStatus(s.child.pid);
  const f = path.join(s.data, 'pairs', 'p1.bitmap');
  const st = fs.statSync(f);
  s.bitmapFile = { size: st.size, allocated: st.blocks * 512 };
}
const load1 = os.loadavg();
for (const s of [...systems].reverse()) await stop(s);

const MiB = (b) => `${(b / 2 ** 20).toFixed(1)} MiB`;
const KiB = (b) => `${(b / 1024).toFixed(0)} KiB`;
const ms = (x) => `${x.toFixed(0)} ms`;
const rows = systems.map((s) => {
  const bitset = Math.ceil(s.clusters / 8);
  // Pair.gen and Pair.inflight: one Uint32 each per cluster (src/controller/pair.ts).
  const perCluster = s.clusters * 8;
  return [
    `${s.gib} GiB`,
    s.clusters.toLocaleString('en-US'),
    ms(s.first.pair),
    ms(median(s.restarts.map((r) => r.pair))),
    KiB(bitset),
    KiB(perCluster),
    `${KiB(s.bitmapFile.size)} (${KiB(s.bitmapFile.allocated)} allocated)`,
    MiB(s.rssStart),
    MiB(s.end.hwm),
    ...KS.map((k) => ms(median(s.resync.get(k)))),
  ];
});
const header = ['volume', 'clusters', '`up` first start', '`up` restart', 'bitset / mirror', 'write bookkeeping', 'bitmap file', 'RSS after start', 'RSS peak', ...KS.map((k) => `resync ${k} Invalid`)];
const table = [`| ${header.join(' | ')} |`, `|${header.map((_, i) => (i === 0 ? '---' : '---:')).join('|')}|`, ...rows.map((r) => `| ${r.join(' | ')} |`)].join('\n');
const perCluster = KS.length > 1 ? systems.map((s) => (median(s.resync.get(KS[1])) - median(s.resync.get(KS[0]))) / (KS[1] - KS[0])) : [];
const head = `Run ${new Date().toISOString()}, node ${process.version}, ${os.cpus().length} cores; one first start and one restart per size, ${REPS} repetitions of each resync, sizes interleaved A B C C B A; load average ${load0.map((x) => x.toFixed(1)).join(' ')} at start, ${load1.map((x) => x.toFixed(1)).join(' ')} at end. Start-up is spawn → admin API answers → pair in PAIR; resync is the admin API's resync → PAIR after K 4 KiB writes spread over the whole master while split.`;
const slope = perCluster.length ? `\n\nResync cost per extra Invalid cluster (from K=${KS[0]} to K=${KS[1]}): ${systems.map((s, i) => `${s.gib} GiB ${perCluster[i].toFixed(2)} ms`).join(', ')}.` : '';
console.log(`${head}\n\n${table}${slope}`);

// The plot, two panels against volume size: resync time per K (left), `up` start-up (right).
function svg(d) {
  const W = 760;
  const H = 360;
  const B = 50;
  const colors = ['#1f77b4', '#d62728', '#2ca02c'];
  const out = [`<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" font-family="sans-serif" font-size="12">`, `<rect width="${W}" height="${H}" fill="white"/>`];
  const panel = (x0, width, title, series) => {
    const L = x0 + 50;
    const R = x0 + width - 10;
    const ymax = Math.max(...series.flatMap((sr) => sr.ys)) * 1.25 || 1;
    const xs = d.sizes.map((g) => Math.log2(g));
    const [a, b] = [Math.min(...xs), Math.max(...xs)];
    const px = (x) => L + ((x - a) / (b - a || 1)) * (R - L - 20) + 10;
    const py = (y) => H - B - (y / ymax) * (H - B - 60);
    out.push(`<text x="${(L + R) / 2}" y="20" text-anchor="middle" font-size="13">${title}</text>`);
    out.push(`<line x1="${L}" y1="${H - B}" x2="${R}" y2="${H - B}" stroke="black"/><line x1="${L}" y1="40" x2="${L}" y2="${H - B}" stroke="black"/>`);
    d.sizes.forEach((g, j) => out.push(`<text x="${px(xs[j])}" y="${H - B + 16}" text-anchor="middle">${g} GiB</text>`));
    out.push(`<text x="${(L + R) / 2}" y="${H - 12}" text-anchor="middle">volume size (log scale)</text>`);
    for (let i = 0; i <= 4; i++) {
      const y = (ymax * i) / 4;
      out.push(`<text x="${L - 6}" y="${py(y) + 4}" text-anchor="end">${y.toFixed(0)}</text><line x1="${L}" y1="${py(y)}" x2="${R}" y2="${py(y)}" stroke="#ddd"/>`);
    }
    out.push(`<text x="${x0 + 12}" y="${H / 2}" transform="rotate(-90 ${x0 + 12} ${H / 2})" text-anchor="middle">ms (median)</text>`);
    series.forEach((sr, i) => {
      out.push(`<polyline points="${sr.ys.map((y, j) => `${px(xs[j]).toFixed(1)},${py(y).toFixed(1)}`).join(' ')}" fill="none" stroke="${colors[i]}" stroke-width="2"/>`);
      sr.ys.forEach((y, j) => out.push(`<circle cx="${px(xs[j]).toFixed(1)}" cy="${py(y).toFixed(1)}" r="3" fill="${colors[i]}"/>`));
      out.push(`<rect x="${L + 10}" y="${34 + i * 16}" width="10" height="10" fill="${colors[i]}"/><text x="${L + 26}" y="${43 + i * 16}">${sr.name}</text>`);
    });
  };
  panel(0, W / 2, 'resync until PAIR', d.ks.map((k) => ({ name: `${k} Invalid clusters`, ys: d.resync[k] })));
  panel(W / 2, W / 2, 'blockmirror up until PAIR', [{ name: 'first start', ys: d.first }, { name: 'restart', ys: d.restart }]);
  out.push('</svg>');
  return out.join('\n');
}
const plot = {
  sizes: systems.map((s) => s.gib),
  ks: KS,
  resync: Object.fromEntries(KS.map((k) => [k, systems.map((s) => median(s.resync.get(k)))])),
  first: systems.map((s) => s.first.pair),
  restart: systems.map((s) => median(s.restarts.map((r) => r.pair))),
};
fs.mkdirSync(path.join(ROOT, 'bench', 'out'), { recursive: true });
fs.writeFileSync(path.join(ROOT, 'bench', 'out', 'last-scale.json'), JSON.stringify({ plot, head, table, slope }, null, 2));
if (APPEND) {
  fs.writeFileSync(path.join(ROOT, 'bench', 'scale.svg'), `${svg(plot)}\n`);
  replaceSection(path.join(ROOT, 'bench', 'RESULTS.md'), 'scale', `## Scale: volume size (bench/scale.js)\n\n${head}\n\n${table}${slope}\n\n![resync and start-up against volume size](scale.svg)`);
}
process.exit(0);

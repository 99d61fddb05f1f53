#!/usr/bin/env node
// The NBD client's data path, seen from the CLI: `blockmirror cfs get` (and `cfs put`) of a 256 MiB
// file against nbdcopy moving the same bytes from (to) a raw export of the same storage system.
// With --baseline DIR (another built checkout), the baseline's CLI runs in the same rounds against
// the same server: before and after in one run, under the same load. The `up` is this checkout's
// unless --server DIR names another build's (to measure a server change: one run per server).
//
//   node bench/cfs-client.js [--reps 3] [--ops get,put] [--baseline DIR] [--server DIR] [--profile DIR] [--profile-server DIR] [--no-write]
//
// One round per rep, interleaved A B C C B A (A = nbdcopy, B = this checkout, C = the baseline);
// ratio = nbdcopy time / CFS time per round (mean of its two runs each), median over the rounds.
// `cfs ls /` once per round gives the CLI start-up, which every put and get includes; the
// "data path" columns take it off. --profile DIR writes a `--cpu-prof` profile of one more get
// (and put) of this checkout and prints its top functions. --profile-server DIR, after the rounds,
// starts a second `up` under `--cpu-prof` per op and has it serve one put and PROFILE_RUNS gets (or
// PROFILE_RUNS puts) of this checkout, then prints the server's top functions. Writes the `cfs-client` section of
// bench/RESULTS.md unless --no-write.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { clockTicks, loadAvg, machineInfo, codeInfo } from './lib/machine.js';
import { waitPairs } from './lib/admin.js';
import { freePort, installCleanup, NODE_FLAGS, nodeFlagsOf, onExit, readCpuSeconds, readMinorFaults, run, startServer } from './lib/proc.js';
import { median } from './lib/stats.js';
import { replaceSection } from './lib/report.js';
import { summarise, formatSummary } from './lib/cpuprofile.js';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const ROOT = path.resolve(HERE, '..');
const arg = (name, dflt) => {
  const i = process.argv.indexOf(name);
  return i > 0 ? process.argv[i + 1] : dflt;
};
const REPS = Number(arg('--reps', 3));
const OPS = arg('--ops', 'get').split(',');
const BASE = arg('--baseline', undefined);
const SERVER = arg('--server', undefined);
const PROFILE = arg('--profile', undefined);
const PROFILE_SERVER = arg('--profile-server', undefined);
const PROFILE_RUNS = 4;
const WRITE = !process.argv.includes('--no-write');
const SIZE = 256 * 2 ** 20;
// The admin API (waitPairs) needs a token; `up` and the CLI inherit it.
process.env.BLOCKMIRROR_ADMIN_TOKEN ??= `bench-cfs-client-${process.pid}`;

const yaml = (p) => `clusterSize: 64KiB
storageSystems:
  - id: 1
    nbd: 127.0.0.1:${p.nbd}
    admin: 127.0.0.1:${p.admin}
    volumes:
      - { id: 8, size: 1GiB }
      - { id: 7, size: 1GiB }
      - { id: 5, size: 256MiB }
      - { id: 4, size: 256MiB }
pairs:
  - { name: cfs, mode: async, master: { ss: 1, vol: 8 }, mirrors: [ { ss: 1, vol: 7 } ] }
  - { name: raw, mode: async, master: { ss: 1, vol: 5 }, mirrors: [ { ss: 1, vol: 4 } ] }
cfs:
  listen: 127.0.0.1:${p.cfs}
  pairs: [cfs]
`;

const TICK = clockTicks();
/** CPU seconds of our reaped children (cutime + cstime): around one run(), that command's CPU. */
function childCpu() {
  const f = fs.readFileSync('/proc/self/stat', 'utf8').split(') ')[1].split(' ');
  return (Number(f[13]) + Number(f[14])) / TICK;
}
let serverPid = 0;
/** CPU seconds of the last timed() command and of the server meanwhile, and the server's minor page faults. */
const lastCpu = { cmd: 0, server: 0, faults: 0 };

async function timed(cmd, args) {
  const c0 = childCpu();
  const s0 = serverPid ? readCpuSeconds(serverPid, TICK) : 0;
  const f0 = serverPid ? readMinorFaults(serverPid) : 0;
  const t0 = performance.now();
  const r = await run(cmd, args, { timeoutMs: 300_000 });
  const s = (performance.now() - t0) / 1000;
  if (r.code !== 0) throw new Error(`${cmd} ${args.join(' ')} failed (${r.code}): ${r.stderr.trim()}`);
  lastCpu.cmd = childCpu() - c0;
  lastCpu.server = serverPid ? readCpuSeconds(serverPid, TICK) - s0 : 0;
  lastCpu.faults = serverPid ? readMinorFaults(serverPid) - f0 : 0;
  return s;
}

async function main() {
  installCleanup();
  const work = fs.mkdtempSync(path.join(os.tmpdir(), 'bm-bench-cfsc-'));
  const local = fs.existsSync('/dev/shm') ? fs.mkdtempSync('/dev/shm/bm-bench-cfsc-') : work;
  onExit(() => {
    fs.rmSync(local, { recursive: true, force: true });
    fs.rmSync(work, { recursive: true, force: true });
  });
  const p = { nbd: await freePort(), admin: await freePort(), cfs: await freePort() };
  const config = path.join(work, 'cluster.yaml');
  fs.writeFileSync(config, yaml(p));
  const src = path.join(local, 'src.bin');
  const dst = path.join(local, 'dst.bin');
  const fd = fs.openSync(src, 'w');
  const chunk = Buffer.alloc(2 ** 20);
  for (let i = 0; i < SIZE / chunk.length; i++) {
    for (let j = 0; j < chunk.length; j += 4) chunk.writeUInt32LE((i * 2654435761 + j * 40503) >>> 0, j);
    fs.writeSync(fd, chunk);
  }
  fs.closeSync(fd);

  const loadStart = loadAvg();
  const started = new Date();
  const bin = (root) => path.join(path.resolve(root), 'bin', 'blockmirror.js');
  const builds = [{ id: 'after', bin: bin(ROOT) }, ...(BASE ? [{ id: 'before', bin: bin(BASE) }] : [])];
  const server = await startServer('blockmirror up', process.execPath, [...NODE_FLAGS, bin(SERVER ?? ROOT), 'up', '-c', config, '--log-level', 'warn'], { kind: 'tcp', host: '127.0.0.1', port: p.nbd });
  serverPid = server.pid;
  const raw = `nbd://127.0.0.1:${p.nbd}/vol5`;
  // Each build's CLI with the node flags of its own first line, as its users' `blockmirror` runs it.
  const cfs = (b, ...args) => [...nodeFlagsOf(path.dirname(path.dirname(b.bin))), b.bin, 'cfs', ...args, '-c', config];
  const jobs = {
    get: { peer: () => timed('nbdcopy', [raw, dst]), ours: (b) => timed(process.execPath, cfs(b, 'get', '/file.bin', dst)), label: '`cfs get` ÷ `nbdcopy nbd://…/raw FILE`' },
    put: { peer: () => timed('nbdcopy', ['--flush', src, raw]), ours: (b) => timed(process.execPath, cfs(b, 'put', src, '/file.bin')), label: '`cfs put` ÷ `nbdcopy --flush FILE nbd://…/raw`' },
  };
  const samples = {}; // `${op}:${who}` -> seconds per run
  const push = (k, v) => (samples[k] ??= []).push(v);
  let profiled = '';
  try {
    // Warm-up. A put writes fresh blocks (copy on write) and the allocator alternates between two
    // runs, so two puts touch every page the timed puts will: the memory volumes' first-touch page
    // faults (about 1 s of CPU per 256 MiB here) then hit no timed run, as nbdcopy's do not.
    await timed('nbdcopy', [src, raw]);
    for (let i = 0; i < 2; i++) {
      await waitPairs(p.admin);
      await timed(process.execPath, cfs(builds[0], 'put', src, '/file.bin'));
    }
    for (let rep = 0; rep < REPS; rep++) {
      for (const b of builds) push(`ls:${b.id}`, await timed(process.execPath, cfs(b, 'ls', '/')));
      for (const op of OPS) {
        const order = [{ id: 'peer' }, ...builds];
        for (const who of [...order, ...order.reverse()]) {
          // Every run starts with the pairs in sync: the server's CPU is then this run's, not the async copy of the last put.
          await waitPairs(p.admin);
          push(`${op}:${who.id}`, who.id === 'peer' ? await jobs[op].peer() : await jobs[op].ours(who));
          push(`cpu:${op}:${who.id}`, lastCpu.cmd);
          push(`server:${op}:${who.id}`, lastCpu.server);
          push(`faults:${op}:${who.id}`, lastCpu.faults);
          if (op === 'get' && who.id !== 'peer') {
            const check = await run('cmp', [src, dst]);
            if (check.code !== 0) throw new Error(`cfs get (${who.id}) returned different bytes: ${check.stdout}${check.stderr}`);
          }
        }
      }
      console.error(`rep ${rep + 1}: ${Object.entries(samples).filter(([k]) => !/^(cpu|server|faults):/.test(k)).map(([k, v]) => `${k} ${v.at(-1).toFixed(2)}`).join(', ')}`);
    }
    if (PROFILE) {
      fs.mkdirSync(PROFILE, { recursive: true });
      for (const op of OPS) {
        const dir = path.join(PROFILE, `cfs-${op}`);
        fs.rmSync(dir, { recursive: true, force: true });
        if (op === 'put') await waitPairs(p.admin);
        const args = op === 'get' ? ['get', '/file.bin', dst] : ['put', src, '/file.bin'];
        await timed(process.execPath, ['--cpu-prof', '--cpu-prof-dir', dir, ...cfs(builds[0], ...args)]);
        const file = fs.readdirSync(dir).find((f) => f.endsWith('.cpuprofile'));
        profiled += `\n### \`cfs ${op}\` (this checkout), top functions\n\n\`\`\`\n${formatSummary(summarise(JSON.parse(fs.readFileSync(path.join(dir, file), 'utf8'))), 15)}\n\`\`\`\n`;
      }
      console.error(profiled);
    }
  } finally {
    await server.stop();
  }
  if (PROFILE_SERVER) {
    for (const op of OPS) {
      const dir = path.join(PROFILE_SERVER, `up-${op}`);
      fs.rmSync(dir, { recursive: true, force: true });
      const up = await startServer('blockmirror up (profiled)', process.execPath, [...NODE_FLAGS, '--cpu-prof', '--cpu-prof-dir', dir, bin(ROOT), 'up', '-c', config, '--log-level', 'warn'], { kind: 'tcp', host: '127.0.0.1', port: p.nbd });
      try {
        await timed(process.execPath, cfs(builds[0], 'put', src, '/file.bin'));
        for (let i = 0; i < PROFILE_RUNS; i++) {
          await waitPairs(p.admin);
          await timed(process.execPath, cfs(builds[0], ...(op === 'get' ? ['get', '/file.bin', dst] : ['put', src, '/file.bin'])));
        }
      } finally {
        await up.stop();
      }
      const file = fs.readdirSync(dir).find((f) => f.endsWith('.cpuprofile'));
      profiled += `\n### the \`up\` serving one put and ${PROFILE_RUNS} \`cfs ${op}\` (this checkout), top functions\n\n\`\`\`\n${formatSummary(summarise(JSON.parse(fs.readFileSync(path.join(dir, file), 'utf8'))), 20)}\n\`\`\`\n`;
    }
    console.error(profiled);
  }

  // Per round: the mean of each side's two runs.
  const rounds = (k) => Array.from({ length: REPS }, (_, i) => (samples[k][2 * i] + samples[k][2 * i + 1]) / 2);
  const ratio = (op, who, off = 0) => {
    const peer = rounds(`${op}:peer`);
    const ours = rounds(`${op}:${who}`);
    const ls = samples[`ls:${who}`];
    return median(peer.map((t, i) => t / (ours[i] - off * ls[i])));
  };
  const m = machineInfo();
  const code = codeInfo(ROOT);
  const nbdcopy = (await run('nbdcopy', ['--version'])).stdout.split('\n')[0];
  const lines = [
    `## CFS through the NBD client: \`cfs ${OPS.join('` and `cfs ')}\` vs nbdcopy (bench/cfs-client.js)`,
    '',
    `${started.toISOString().replace(/\.\d+Z$/, 'Z')}, code at ${code.head}${code.changed.length ? ` plus uncommitted changes in ${code.changed.length} files` : ''}${BASE ? ` against the baseline build in ${BASE}` : ''}; the \`up\` is ${SERVER ? `the build in ${SERVER}` : 'this build'}; ${m.cpuModel}, nproc ${m.nproc}, Node ${m.node}, ${nbdcopy}.`,
    `${MiBs(SIZE)} file, memory volumes, one \`up\`; ${REPS} rounds interleaved A B${BASE ? ' C C B' : ' B'} A (A = nbdcopy, B = this build${BASE ? ', C = before' : ''}), median of the per-round ratios. Load average at start ${loadStart}, at end ${loadAvg()}.`,
    '',
    `| job | ${builds.map((b) => `${b.id} (median s)`).join(' | ')} | nbdcopy (median s) | ${builds.map((b) => `${b.id}: ratio`).join(' | ')} | ${builds.map((b) => `${b.id}: ratio without CLI start-up`).join(' | ')} |`,
    `|---|${builds.map(() => '---:').join('|')}|---:|${builds.map(() => '---:|---:').join('|')}|`,
    ...OPS.map(
      (op) =>
        `| ${jobs[op].label} | ${builds.map((b) => median(samples[`${op}:${b.id}`]).toFixed(2)).join(' | ')} | ${median(samples[`${op}:peer`]).toFixed(2)} | ${builds.map((b) => ratio(op, b.id).toFixed(2)).join(' | ')} | ${builds.map((b) => ratio(op, b.id, 1).toFixed(2)).join(' | ')} |`,
    ),
    '',
    `CLI start-up (\`cfs ls /\`, median): ${builds.map((b) => `${b.id} ${median(samples[`ls:${b.id}`]).toFixed(2)} s`).join(', ')}.`,
    '',
    'CPU seconds per run (median; user + system, all threads): the command, and the `up` serving it meanwhile. On a loaded machine these say more than wall times.',
    '',
    `| job | ${[...builds.map((b) => b.id), 'nbdcopy'].map((w) => `${w}: command | ${w}: server`).join(' | ')} |`,
    `|---|${[...builds, 0].map(() => '---:|---:').join('|')}|`,
    ...OPS.map((op) => `| \`cfs ${op}\` | ${[...builds.map((b) => b.id), 'peer'].map((w) => `${median(samples[`cpu:${op}:${w}`]).toFixed(2)} | ${median(samples[`server:${op}:${w}`]).toFixed(2)}`).join(' | ')} |`),
    '',
    "The server's minor page faults per run (median): a fresh page the kernel zeroes and maps, which costs more CPU here than copying it.",
    '',
    `| job | ${[...builds.map((b) => b.id), 'nbdcopy'].join(' | ')} |`,
    `|---|${[...builds, 0].map(() => '---:').join('|')}|`,
    ...OPS.map((op) => `| \`cfs ${op}\` | ${[...builds.map((b) => b.id), 'peer'].map((w) => median(samples[`faults:${op}:${w}`]).toFixed(0)).join(' | ')} |`),
    '',
    'Raw samples (s): ' + Object.entries(samples).filter(([k]) => !/^(cpu|server|faults):/.test(k)).map(([k, v]) => `${k} ${v.map((x) => x.toFixed(3)).join(' ')}`).join('; ') + '.',
    profiled,
  ];
  const text = lines.join('\n');
  console.log(text);
  if (WRITE) replaceSection(path.join(HERE, 'RESULTS.md'), 'cfs-client', text);
}

const MiBs = (n) => `${n / 2 ** 20} MiB`;

main().catch((e) => {
  console.error(e);
  process.exit(1);
});

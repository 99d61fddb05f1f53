// What live reconfiguration costs on the hot path: the SwitchDevice every volume's host stack
// now has (src/blockdev/switch.ts), against the same memory volume without it. In-process,
// 4 KiB writes and reads with 16 in flight, interleaved A B B A, median of 3 rounds.
// Rewrites its section of bench/RESULTS.md (unless --no-write).  Usage: npm run build && node bench/switch.js [--ops N]
import os from 'node:os';
import { execSync } from 'node:child_process';
import { replaceSection } from './lib/report.js';
import { MemoryDevice } from '../dist/blockdev/memory.js';
import { SwitchDevice } from '../dist/blockdev/switch.js';

const opsArg = process.argv.indexOf('--ops');
const OPS = opsArg > 0 ? Number(process.argv[opsArg + 1]) : 400_000;
const SIZE = 64 * 1024 * 1024;
const BS = 4096;
const QD = 16;

async function run(dev, kind) {
  const buf = Buffer.alloc(BS, 0x5a);
  let next = 0;
  let x = 12345;
  const t0 = process.hrtime.bigint();
  const worker = async () => {
    const mine = Buffer.alloc(BS);
    while (next < OPS) {
      next++;
      x ^= x << 13; x ^= x >>> 17; x ^= x << 5;
      const off = ((x >>> 0) % (SIZE / BS)) * BS;
      if (kind === 'write') await dev.write(off, buf);
      else await dev.read(off, mine);
    }
  };
  await Promise.all(Array.from({ length: QD }, worker));
  return OPS / (Number(process.hrtime.bigint() - t0) / 1e9);
}

const median = (a) => [...a].sort((p, q) => p - q)[Math.floor(a.length / 2)];
const load0 = os.loadavg().map((l) => l.toFixed(2)).join(' ');
const rows = [];
for (const kind of ['write', 'read']) {
  const plain = new MemoryDevice(SIZE);
  const switched = new SwitchDevice(new MemoryDevice(SIZE));
  await run(plain, 'write');
  await run(switched, 'write');
  const a = [];
  const b = [];
  for (let r = 0; r < 3; r++) {
    a.push(await run(switched, kind));
    b.push(await run(plain, kind));
    b.push(await run(plain, kind));
    a.push(await run(switched, kind));
  }
  rows.push({ kind, ours: median(a), peer: median(b) });
}
const load1 = os.loadavg().map((l) => l.toFixed(2)).join(' ');
let commit = '';
try {
  commit = execSync('git rev-parse --short HEAD').toString().trim();
} catch {}
const fmt = (n) => Math.round(n).toLocaleString('en-US');
const lines = [
  '## Live reconfiguration: the switch layer on the hot path (bench/switch.js)',
  '',
  `Run ${new Date().toISOString()} on ${os.cpus()[0]?.model ?? 'unknown'}, nproc ${os.cpus().length}; Node ${process.version}; commit ${commit}.`,
  `Load average at start ${load0}, at end ${load1}. In-process, a 64 MiB memory volume, 4 KiB random I/O, ${QD} in flight, ${OPS} ops per run, A B B A x 3, median.`,
  'Every volume\'s host stack has a SwitchDevice so `blockmirror apply` can swap its pair layer under connected hosts; this is its cost alone, in-process and without NBD:',
  'one promise reaction per request to count it out. An NBD request costs tens of µs end to end, so over NBD it is a few per cent of a request.',
  '',
  '| measure | with switch | without | ratio | goal | met? |',
  '|---|---:|---:|---:|---:|:---:|',
  ...rows.map((r) => {
    const ratio = r.ours / r.peer;
    return `| 4 KiB random ${r.kind}s, ops/s | ${fmt(r.ours)} | ${fmt(r.peer)} | ${ratio.toFixed(2)} | ≥ 0.9 | ${ratio >= 0.9 ? 'yes' : '**no**'} |`;
  }),
];
process.stdout.write(`${lines.join('\n')}\n`);
if (!process.argv.includes('--no-write')) replaceSection(new URL('./RESULTS.md', import.meta.url).pathname, 'reconf19', lines.join('\n'));

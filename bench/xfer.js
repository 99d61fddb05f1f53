#!/usr/bin/env node
// Transfer through a shared volume (docs/xfer.md) against nbdcopy of the same bytes to the same
// export. One `blockmirror serve` (memory) holds the volume; per repetition, interleaved A B B A:
//   xfer     `xfer recv --out /dev/null` and `xfer send FILE` started together, timed until both
//            have exited (the CLI's start-up included, as a user runs it); the bytes cross the
//            export twice (written by the sender, read by the receiver)
//   nbdcopy  `nbdcopy FILE nbd://...` (one write of the bytes)
// and the same xfer run over 2 paths (two NBD connections per process) for the scaling line.
//
//   node bench/xfer.js                          # 256 MiB, 3 repetitions, appends to bench/RESULTS.md
//   BENCH_MIB=64 BENCH_REPS=3 node bench/xfer.js
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { randomBytes } from 'node:crypto';
import { fileURLToPath } from 'node:url';
import { codeInfo, loadAvg } from './lib/machine.js';
import { freePort, installCleanup, onExit, run, startServer } from './lib/proc.js';
import { median } from './lib/stats.js';
import { replaceSection } from './lib/report.js';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const ROOT = path.resolve(HERE, '..');
const BIN = path.join(ROOT, 'bin', 'blockmirror.js');
const OUT = process.env.BENCH_OUT ?? path.join(HERE, 'RESULTS.md');
const MIB = Number(process.env.BENCH_MIB ?? 256);
const REPS = Number(process.env.BENCH_REPS ?? 3);
const SEG = process.env.BENCH_SEG ?? '1MiB';

installCleanup();

async function must(cmd, args) {
  const t0 = performance.now();
  const r = await run(cmd, args, { timeoutMs: 600_000 });
  if (r.code !== 0) throw new Error(`${cmd} ${args.join(' ')} failed (${r.code}): ${r.stderr.toString().trim()}`);
  return (performance.now() - t0) / 1000;
}

async function main() {
  const loadStart = loadAvg();
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bm-bench-xfer-'));
  onExit(() => fs.rmSync(dir, { recursive: true, force: true }));
  const input = path.join(dir, 'in.bin');
  fs.writeFileSync(input, randomBytes(MIB << 20));
  const port = await freePort();
  const server = await startServer('serve', process.execPath, [BIN, 'serve', '--size', `${Math.max(1024, 2 * MIB)}MiB`, '--listen', `127.0.0.1:${port}`, '--log-level', 'warn'], { kind: 'tcp', host: '127.0.0.1', port });
  const uri = `nbd://127.0.0.1:${port}/disk`;

  const xfer = async (paths) => {
    // nbdcopy overwrote the volume: format it again (not timed).
    await must(process.execPath, [BIN, 'xfer', 'format', uri, '--seg-size', SEG, '--segments', '64', '--max-conn', '1']);
    const devs = Array.from({ length: paths }, () => ['--dev', uri]).flat();
    const t0 = performance.now();
    await Promise.all([
      must(process.execPath, [BIN, 'xfer', 'recv', ...devs, '--as', '2', '--out', '/dev/null']),
      must(process.execPath, [BIN, 'xfer', 'send', ...devs, '--from', '1', '--to', '2', input]),
    ]);
    return MIB / ((performance.now() - t0) / 1000);
  };
  const nbdcopy = async () => MIB / (await must('nbdcopy', [input, uri]));

  const rows = { xfer1: [], xfer2: [], nbdcopy: [] };
  for (let rep = 0; rep < REPS; rep++) {
    // A B B A within a repetition, so drift in the machine's load hits both alike.
    rows.xfer1.push(await xfer(1));
    rows.nbdcopy.push(await nbdcopy());
    rows.nbdcopy.push(await nbdcopy());
    rows.xfer1.push(await xfer(1));
    rows.xfer2.push(await xfer(2));
    process.stderr.write(`rep ${rep + 1}/${REPS}: xfer ${rows.xfer1.slice(-2).map((x) => x.toFixed(0)).join(', ')} MiB/s, nbdcopy ${rows.nbdcopy.slice(-2).map((x) => x.toFixed(0)).join(', ')} MiB/s, 2 paths ${rows.xfer2.at(-1).toFixed(0)} MiB/s\n`);
  }
  await server.stop();
  const x1 = median(rows.xfer1);
  const x2 = median(rows.xfer2);
  const nc = median(rows.nbdcopy);
  const code = codeInfo(ROOT);
  const ncVersion = (await run('nbdcopy', ['--version'])).stdout.toString().split('\n')[0];
  const text = `## Transfer through a shared volume (xfer) vs nbdcopy (${new Date().toISOString().slice(0, 10)}, node ${process.version}, ${ncVersion}, ${MIB} MiB, segments of ${SEG}, median of ${REPS * 2} interleaved A B B A; load average ${loadStart} at start, ${loadAvg()} at end)

| run | MiB/s | vs nbdcopy | goal |
|---|---:|---:|---:|
| xfer send+recv, 1 path each | ${x1.toFixed(1)} | ${(x1 / nc).toFixed(2)}x | ≥ 0.5x |
| xfer send+recv, 2 paths each | ${x2.toFixed(1)} | ${(x2 / nc).toFixed(2)}x | — |
| nbdcopy FILE to the export | ${nc.toFixed(1)} | 1.00x | — |

Code ${code.head} (${code.subject.slice(0, 60)}). One \`blockmirror serve\` (memory) holds the volume, formatted with 64 segments, 1 connection.
The 2-path row is one run per repetition (median of ${REPS}), after the A B B A of the other two.
xfer is timed from starting \`recv\` and \`send\` to both exiting, Node start-up included; its bytes cross the
export twice (written, then read), nbdcopy's once. \`node bench/xfer.js\` (BENCH_MIB, BENCH_REPS, BENCH_SEG).
`;
  replaceSection(OUT, 'xfer', text);
  process.stdout.write(text);
}

main().then(
  () => process.exit(0),
  (e) => {
    process.stderr.write(`bench/xfer.js: ${e.message}\n`);
    process.exit(1);
  },
);

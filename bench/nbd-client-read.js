#!/usr/bin/env node
// The NBD client's READ receive path alone, in process: reads in place (`connect()`, onread,
// src/nbd/client/receive.ts) against the 'data' path (the same client over a socket handed to
// `connectTransport()`, which copies every payload from Node's 64 KiB chunks), from one
// `blockmirror serve` memory export. Rounds A B B A; per job the median MiB/s and the client's
// CPU per GiB (process.cpuUsage, the server runs in its own process).
//
//   node bench/nbd-client-read.js [--reps 3] [--seconds 1.5]
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { loadAvg } from './lib/machine.js';
import { freePort, installCleanup, NODE_FLAGS, startServer } from './lib/proc.js';
import { median } from './lib/stats.js';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const ROOT = path.resolve(HERE, '..');
const { connect, connectTransport } = await import(path.join(ROOT, 'dist/nbd/client.js'));
const arg = (name, dflt) => {
  const i = process.argv.indexOf(name);
  return i > 0 ? process.argv[i + 1] : dflt;
};
const REPS = Number(arg('--reps', 3));
const SECONDS = Number(arg('--seconds', 1.5));
const SIZE = 256 * 2 ** 20;
const JOBS = [
  { name: '4 KiB QD16', bs: 4096, qd: 16 },
  { name: '64 KiB QD8', bs: 65536, qd: 8 },
  { name: '1 MiB QD8', bs: 2 ** 20, qd: 8 },
  { name: '8 MiB QD4', bs: 8 * 2 ** 20, qd: 4 },
];

async function job(c, { bs, qd }) {
  const end = performance.now() + SECONDS * 1000;
  const cpu0 = process.cpuUsage();
  let bytes = 0;
  let next = 0;
  const t0 = performance.now();
  await Promise.all(
    Array.from({ length: qd }, async () => {
      const buf = Buffer.allocUnsafe(bs);
      while (performance.now() < end) {
        const at = next;
        next = (next + bs) % SIZE;
        await c.pread(buf, at);
        bytes += bs;
      }
    }),
  );
  const s = (performance.now() - t0) / 1000;
  const cpu = process.cpuUsage(cpu0);
  return { mibs: bytes / 2 ** 20 / s, cpuPerGiB: (cpu.user + cpu.system) / 1e6 / (bytes / 2 ** 30) };
}

async function main() {
  installCleanup();
  const port = await freePort();
  const load0 = loadAvg();
  const server = await startServer('blockmirror serve', process.execPath, [...NODE_FLAGS, path.join(ROOT, 'bin/blockmirror.js'), 'serve', '--size', String(SIZE), '--listen', `127.0.0.1:${port}`, '--log-level', 'warn'], { kind: 'tcp', host: '127.0.0.1', port });
  const modes = {
    direct: () => connect({ host: '127.0.0.1', port }),
    data: () => {
      const s = net.connect({ host: '127.0.0.1', port });
      s.setNoDelay(true);
      return connectTransport(s);
    },
  };
  const out = {};
  try {
    const clients = { direct: await modes.direct(), data: await modes.data() };
    // Written once, so no read is of a hole.
    const fill = Buffer.alloc(8 * 2 ** 20, 7);
    for (let at = 0; at < SIZE; at += fill.length) await clients.direct.pwrite(fill, at);
    for (const j of JOBS) {
      for (let rep = 0; rep < REPS; rep++) {
        for (const m of ['data', 'direct', 'direct', 'data']) {
          const r = await job(clients[m], j);
          ((out[j.name] ??= {})[m] ??= []).push(r);
        }
      }
    }
    await Promise.all(Object.values(clients).map((c) => c.disconnect()));
  } finally {
    await server.stop();
  }
  const med = (rs, k) => median(rs.map((r) => r[k]));
  const lines = [
    `NBD client reads, in place vs 'data' events (bench/nbd-client-read.js), ${new Date().toISOString()}, node ${process.version}; ${REPS} rounds A B B A of ${SECONDS} s per run; load average ${load0} at start, ${loadAvg()} at end.`,
    '',
    '| job | data path MiB/s | in place MiB/s | in place ÷ data | data path client CPU s/GiB | in place client CPU s/GiB |',
    '|---|---:|---:|---:|---:|---:|',
    ...JOBS.map((j) => {
      const o = out[j.name];
      const ratio = median(o.direct.map((r, i) => r.mibs / o.data[i].mibs));
      return `| ${j.name} | ${med(o.data, 'mibs').toFixed(0)} | ${med(o.direct, 'mibs').toFixed(0)} | ${ratio.toFixed(2)} | ${med(o.data, 'cpuPerGiB').toFixed(2)} | ${med(o.direct, 'cpuPerGiB').toFixed(2)} |`;
    }),
  ];
  console.log(lines.join('\n'));
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});

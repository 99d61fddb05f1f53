// fio through its nbd engine (libnbd): argument building and JSON parsing.
import { run } from './proc.js';

/** The measured jobs. `goal` is the minimum ours/nbdkit ratio per backend (issue 18: 1.0 for every job). */
export const JOBS = [
  { id: 'seqwrite-1m-qd8', label: '1M seq write QD8', rw: 'write', bs: '1M', iodepth: 8, unit: 'MiB/s', goal: { memory: 1.0, file: 1.0 } },
  { id: 'seqread-1m-qd8', label: '1M seq read QD8', rw: 'read', bs: '1M', iodepth: 8, unit: 'MiB/s', goal: { memory: 1.0, file: 1.0 } },
  { id: 'randwrite-4k-qd16', label: '4k rand write QD16', rw: 'randwrite', bs: '4k', iodepth: 16, unit: 'IOPS', goal: { memory: 1.0, file: 1.0 } },
  { id: 'randread-4k-qd16', label: '4k rand read QD16', rw: 'randread', bs: '4k', iodepth: 16, unit: 'IOPS', goal: { memory: 1.0, file: 1.0 } },
  { id: 'randread-4k-qd1', label: '4k rand read QD1', rw: 'randread', bs: '4k', iodepth: 1, unit: 'IOPS', goal: { memory: 1.0, file: 1.0 } },
];

export function uriFor(endpoint) {
  return endpoint.kind === 'tcp' ? `nbd://${endpoint.host}:${endpoint.port}/` : `nbd+unix:///?socket=${endpoint.path}`;
}

/**
 * fio arguments for one job. --thread keeps the whole of fio in one process,
 * so killing its pid on an error leaves no forked job process behind.
 */
export function fioArgs({ name, uri, rw, bs, iodepth, size, runtime, ramp }) {
  const args = [
    `--name=${name}`,
    '--ioengine=nbd',
    `--uri=${uri}`,
    `--rw=${rw}`,
    `--bs=${bs}`,
    `--iodepth=${iodepth}`,
    `--size=${size}`,
    '--numjobs=1',
    '--thread',
    '--output-format=json',
  ];
  // Random offsets without the coverage bitmap: less fio CPU on a 2-core box,
  // and the same cost for both servers.
  if (rw.startsWith('rand')) args.push('--norandommap', '--randrepeat=0');
  if (runtime !== undefined) args.push('--time_based', `--runtime=${runtime}s`, `--ramp_time=${ramp}s`);
  return args;
}

/**
 * Run fio and return { bwMiB, iops, clatUs, ioBytes, seconds }. fio may print
 * lines ("fio: connected to NBD server", warnings) before its JSON.
 */
export async function runFio(args, { timeoutMs = 120000 } = {}) {
  const res = await run('fio', args, { timeoutMs });
  const start = res.stdout.indexOf('{');
  if (res.code !== 0 || start < 0) {
    throw new Error(`fio failed (${res.signal ?? `exit ${res.code}`}): fio ${args.join(' ')}\n${res.stderr}${res.stdout.slice(0, 4000)}`);
  }
  let json;
  try {
    json = JSON.parse(res.stdout.slice(start));
  } catch (e) {
    throw new Error(`cannot parse fio JSON (${e.message}):\n${res.stdout.slice(0, 4000)}`);
  }
  const job = json.jobs?.[0];
  if (!job) throw new Error(`fio JSON without jobs:\n${res.stdout.slice(0, 4000)}`);
  if (job.error) throw new Error(`fio job error ${job.error}:\n${res.stderr}`);
  const rwArg = args.find((a) => a.startsWith('--rw='));
  const side = rwArg && rwArg.includes('write') ? job.write : job.read;
  return {
    bwMiB: side.bw_bytes / 2 ** 20,
    iops: side.iops,
    clatUs: (side.clat_ns?.mean ?? NaN) / 1000,
    ioBytes: side.io_bytes,
    seconds: side.runtime / 1000,
  };
}

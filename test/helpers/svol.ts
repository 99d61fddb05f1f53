// S-VOL group scenarios (test/svol*.test.ts): one storage system under `blockmirror up` with a
// P-VOL, two RO members (vol2, vol40 on volume 4), an RW member (vol3, increments on volume 9) and
// two spares; the hosts are qemu-io, nbdcopy and fio; the CLI and the admin API drive the group.
import fs from 'node:fs';
import path from 'node:path';
import { expect } from 'vitest';
import { adminFetch } from './admin.js';
import { CLI, freePort, run, startUp, tmpDir, type RunningCluster } from './servers.js';
import type { SvolGroupStatus } from '../../src/controller/svol/status.js';

export const KiB = 1024;
export const MiB = 1024 * KiB;
export const CLUSTER = 64 * KiB;
const running: RunningCluster[] = [];
/** Every storage system a test started and did not stop: for afterEach. */
export async function stopAll(): Promise<void> {
  await Promise.all(running.splice(0).map((c) => c.stop('SIGKILL')));
}

export interface Cluster {
  c: RunningCluster;
  nbd: number;
  admin: number;
  file: string;
  data: string;
}

export const GROUP = `
    svolGroups:
      - name: backup
        pvol: 1
        members:
          - { vol: 2, attr: RO }
          - { vol: 3, attr: RW, increments: 9 }
          - { vol: 4, attr: RO, logicalId: 40 }
          - { vol: 5, attr: spare }
          - { vol: 6, attr: spare }`;

export interface StartOptions {
  size?: string;
  /** Lines added to the group's mapping (spreadReads, ioTimeout). */
  groupKeys?: string;
  incrSize?: string;
  group?: string;
  iscsi?: number;
}

function writeConfig(dir: string, nbd: number, admin: number, opts: StartOptions = {}): string {
  const file = path.join(dir, 'cluster.yaml');
  const size = opts.size ?? '8MiB';
  fs.writeFileSync(
    file,
    `
clusterSize: 64KiB
storageSystems:
  - id: 1
    nbd: 127.0.0.1:${nbd}
    admin: 127.0.0.1:${admin}
    dataDir: data${opts.iscsi ? `\n    iscsi: 127.0.0.1:${opts.iscsi}` : ''}
    volumes:
${[1, 2, 3, 4, 5, 6].map((v) => `      - { id: ${v}, size: ${size} }`).join('\n')}
      - { id: 9, size: ${opts.incrSize ?? '4MiB'} }
${opts.group ?? GROUP}${opts.groupKeys ? `\n        ${opts.groupKeys.trim().split('\n').join('\n        ')}` : ''}
`,
  );
  return file;
}

export async function start(opts: StartOptions = {}): Promise<Cluster> {
  const nbd = await freePort();
  const admin = await freePort();
  const dir = tmpDir('bm-svol-');
  const file = writeConfig(dir, nbd, admin, opts);
  const c = await startUp(file, [nbd, admin, ...(opts.iscsi ? [opts.iscsi] : [])]);
  running.push(c);
  return { c, nbd, admin, file, data: path.join(dir, 'data') };
}

export async function restart(k: Cluster, signal: NodeJS.Signals = 'SIGTERM'): Promise<Cluster> {
  await k.c.stop(signal);
  running.splice(running.indexOf(k.c), 1);
  const c = await startUp(k.file, [k.nbd, k.admin]);
  running.push(c);
  return { ...k, c };
}

export const uri = (k: Cluster, vol: number) => `nbd://127.0.0.1:${k.nbd}/vol${vol}`;
export const qemuIo = (target: string, cmds: string[], readOnly = false) => run('qemu-io', ['-f', 'raw', ...(readOnly ? ['-r'] : []), ...cmds.flatMap((c) => ['-c', c]), target]);
export const cli = (...args: string[]) => run(process.execPath, [CLI, ...args]);

export async function hostWrite(k: Cluster, vol: number, offset: number, length: number, byte: number): Promise<void> {
  const w = await qemuIo(uri(k, vol), [`write -P ${byte} ${offset} ${length}`]);
  expect(w.code, w.stderr + w.stdout).toBe(0);
  expect(w.stdout + w.stderr).not.toMatch(/error|fail/i);
}

/** The whole export as a host reads it (nbdcopy). */
export async function hostImage(k: Cluster, vol: number): Promise<Buffer> {
  const out = path.join(path.dirname(k.data), `read-vol${vol}-${Date.now()}.img`);
  const r = await run('nbdcopy', [uri(k, vol), out]);
  expect(r.code, r.stderr).toBe(0);
  const b = fs.readFileSync(out);
  fs.rmSync(out);
  return b;
}

export const volFile = (k: Cluster, vol: number) => fs.readFileSync(path.join(k.data, `vol${vol}.img`));

export async function query(k: Cluster): Promise<SvolGroupStatus> {
  const res = await adminFetch(`http://127.0.0.1:${k.admin}/api/svol/backup`);
  expect(res.status).toBe(200);
  return (await res.json()) as SvolGroupStatus;
}

export async function waitFor(k: Cluster, ok: (g: SvolGroupStatus) => boolean, what: string): Promise<SvolGroupStatus> {
  let last: SvolGroupStatus | undefined;
  for (let i = 0; i < 600; i++) {
    last = await query(k);
    if (ok(last)) return last;
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`group never became ${what}; last: ${JSON.stringify(last)}`);
}

export const member = (g: SvolGroupStatus, logicalId: number) => g.members.find((m) => m.logicalId === logicalId)!;
/** Every RW member's volume holds its increments (destage.ts): what a compare of its volume file needs first. */
export const destaged = (k: Cluster) => waitFor(k, (g) => g.members.every((m) => (m.destagePending ?? 0) === 0), 'destaged');
export const settled = (g: SvolGroupStatus) => !g.restore && g.members.every((m) => m.state !== 'paired' || m.changedClusters === 0);

export function fill(size: number, byte: number): Buffer {
  return Buffer.alloc(size, byte);
}

export async function svol(k: Cluster, ...args: string[]): Promise<string> {
  const r = await cli('svol', ...args, '-c', k.file);
  expect(r.code, r.stderr + r.stdout).toBe(0);
  return r.stdout;
}

/** Volumes filled with 0x11 through the P-VOL, the group initialized and split at generation 1. */
export async function splitGroup(k: Cluster, size: number): Promise<Buffer> {
  await hostWrite(k, 1, 0, size, 0x11);
  await svol(k, 'init', 'backup', '--wait');
  await svol(k, 'split', 'backup');
  return fill(size, 0x11);
}

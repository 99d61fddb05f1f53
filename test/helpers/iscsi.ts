// Real iSCSI targets for tests: `blockmirror serve --iscsi` and tgtd (the reference), each on a
// free loopback port, plus a parser for iscsi-test-cu's summary.
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { adminFetch } from './admin.js';
import { CLI, freePort, run, startUp, tmpDir, type RunningCluster, type RunningServer } from './servers.js';

export interface IscsiServe extends RunningServer {
  iscsiPort: number;
  target: string;
  /** iscsi://127.0.0.1:PORT/TARGET/0 */
  lunUrl: string;
}

async function waitPort(port: number, what: string, alive: () => boolean, stderr: () => string): Promise<void> {
  for (let i = 0; i < 500; i++) {
    if (!alive()) throw new Error(`${what} exited: ${stderr()}`);
    const ok = await new Promise<boolean>((resolve) => {
      const s = net.connect({ host: '127.0.0.1', port });
      s.once('connect', () => (s.destroy(), resolve(true)));
      s.once('error', () => resolve(false));
    });
    if (ok) return;
    await new Promise((r) => setTimeout(r, 20));
  }
  throw new Error(`${what} did not listen on ${port}: ${stderr()}`);
}

export async function startIscsiServe(args: string[], target = 'iqn.2026-12.org.blockmirror:test'): Promise<IscsiServe> {
  const port = await freePort();
  const iscsiPort = await freePort();
  const proc = spawn(process.execPath, [CLI, 'serve', '--listen', `127.0.0.1:${port}`, '--iscsi', `127.0.0.1:${iscsiPort}`, '--iscsi-target', target, ...args], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let err = '';
  proc.stderr.setEncoding('utf8').on('data', (d: string) => (err += d));
  proc.stdout.resume();
  const exited = new Promise<number | null>((r) => proc.once('exit', (c) => r(c)));
  await waitPort(iscsiPort, 'blockmirror serve --iscsi', () => proc.exitCode === null, () => err);
  return {
    uri: `nbd://127.0.0.1:${port}/disk`, host: '127.0.0.1', port, proc, stderr: () => err, iscsiPort, target,
    lunUrl: `iscsi://127.0.0.1:${iscsiPort}/${target}/0`,
    stop: async (signal: NodeJS.Signals = 'SIGTERM') => {
      if (proc.exitCode !== null) return proc.exitCode;
      proc.kill(signal);
      const t = setTimeout(() => proc.kill('SIGKILL'), 5000);
      const c = await exited;
      clearTimeout(t);
      return c;
    },
  };
}

export interface Tgtd {
  lunUrl: string;
  stop(): Promise<void>;
}

/** tgtd in the foreground with one file-backed LUN (nbd.md section 5); its own control port so parallel runs don't meet. */
export async function startTgtd(file: string, target = 'iqn.2026-12.test:tgt1'): Promise<Tgtd> {
  const port = await freePort();
  const control = 100 + Math.floor(Math.random() * 9000);
  const proc = spawn('tgtd', ['-f', '--iscsi', `portal=127.0.0.1:${port}`, '-C', String(control)], { stdio: ['ignore', 'pipe', 'pipe'] });
  let err = '';
  proc.stderr.setEncoding('utf8').on('data', (d: string) => (err += d));
  proc.stdout.resume();
  const exited = new Promise<void>((r) => proc.once('exit', () => r()));
  await waitPort(port, 'tgtd', () => proc.exitCode === null, () => err);
  const adm = async (...a: string[]) => {
    const r = await run('tgtadm', ['-C', String(control), '--lld', 'iscsi', ...a]);
    if (r.code !== 0) throw new Error(`tgtadm ${a.join(' ')}: ${r.stderr}`);
  };
  await adm('--op', 'new', '--mode', 'target', '--tid', '1', '-T', target);
  await adm('--op', 'new', '--mode', 'logicalunit', '--tid', '1', '--lun', '1', '-b', file);
  await adm('--op', 'bind', '--mode', 'target', '--tid', '1', '-I', 'ALL');
  return {
    lunUrl: `iscsi://127.0.0.1:${port}/${target}/1`,
    stop: async () => {
      if (proc.exitCode === null) proc.kill('SIGKILL');
      await exited;
    },
  };
}

export interface CuSummary {
  run: number;
  passed: number;
  failed: number;
  /** Test names that failed. */
  failures: string[];
  /** "[SKIPPED] X is not implemented" messages, de-duplicated per test. */
  notImplemented: string[];
  skips: string[];
}

export function parseCu(out: string): CuSummary {
  const m = /tests\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)/.exec(out);
  if (!m) throw new Error(`iscsi-test-cu printed no summary:\n${out.slice(-2000)}`);
  const failures: string[] = [];
  const skips = new Set<string>();
  let suite = '';
  let test = '';
  for (const line of out.split('\n')) {
    const s = /^Suite: (.*)/.exec(line);
    if (s) suite = s[1]!;
    const t = /^\s+Test: (\S+)/.exec(line);
    if (t) test = `${suite}.${t[1]}`;
    if (/\.\.\.FAILED|^FAILED/.test(line.trim()) && !failures.includes(test)) failures.push(test);
    const k = /\[SKIPPED\] ([^\n]*)/.exec(line);
    if (k) skips.add(`${test}: ${k[1]!.trim()}`);
  }
  const all = [...skips];
  return { run: Number(m[2]), passed: Number(m[3]), failed: Number(m[4]), failures, skips: all, notImplemented: all.filter((x) => /not implemented/i.test(x)) };
}

/** Two storage systems, each an iSCSI target, in one `up`, and the ports of each (index 0: ss1). */
export interface IscsiPairCluster {
  dir: string;
  c: RunningCluster;
  p: { iscsi: number[]; nbd: number[]; admin: number[]; peer: number[] };
}

/**
 * A cross-SS pair `px` (sync unless told) exported over iSCSI by both storage systems: ss1 vol1 the
 * master, ss2 vol1 the mirror, both of `size`; returns once the pair is in PAIR. A `syncRate` keeps
 * an async mirror behind.
 */
export async function startIscsiPair(prefix: string, size: string, opts: { mode?: 'sync' | 'async'; syncRate?: string } = {}): Promise<IscsiPairCluster> {
  const dir = tmpDir(prefix);
  const p = { iscsi: [0, 0], nbd: [0, 0], admin: [0, 0], peer: [0, 0] };
  for (const k of ['iscsi', 'nbd', 'admin', 'peer'] as const) p[k] = [await freePort(), await freePort()];
  const ss = (i: number) => `  - id: ${i + 1}
    nbd: 127.0.0.1:${p.nbd[i]}
    admin: 127.0.0.1:${p.admin[i]}
    peer: 127.0.0.1:${p.peer[i]}
    iscsi: 127.0.0.1:${p.iscsi[i]}
    dataDir: ss${i + 1}
    volumes:
      - { id: 1, size: ${size} }`;
  fs.writeFileSync(path.join(dir, 'cluster.yaml'), `storageSystems:\n${ss(0)}\n${ss(1)}\npairs:\n  - { name: px, mode: ${opts.mode ?? 'sync'},${opts.syncRate ? ` syncRate: ${opts.syncRate},` : ''} master: { ss: 1, vol: 1 }, mirrors: [{ ss: 2, vol: 1 }] }\n`);
  const c = await startUp(path.join(dir, 'cluster.yaml'), [...p.iscsi, ...p.admin]);
  for (let i = 0; ; i++) {
    const st = (await (await adminFetch(`http://127.0.0.1:${p.admin[0]}/api/pairs/px`)).json()) as { state: string };
    if (st.state === 'PAIR') break;
    if (i > 1200) throw new Error(`pair px stayed ${st.state}`);
    await new Promise((r) => setTimeout(r, 50));
  }
  return { dir, c, p };
}
